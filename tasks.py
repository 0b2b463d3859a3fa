"""
Mellum 2's post-training data (report §5): verifiable tasks, chat samples with loss masks, and the
verification stack that scores answers.

  - three task suites, generated offline from a seed, each with a held-out split    -> §5.2.2 Data
      math  arithmetic and GSM-style word problems (numeric answer)
      code  a small Python function described in words (checked on test cases)
      tool  a calculation that needs the calculator tool (<tool_call> JSON, its result, the answer)
  - demonstrations of each task, with a worked reasoning trace for Thinking models    -> §5.1.1
  - SFT samples: Instruct trains on every assistant turn without reasoning; Thinking
    only on the final turn with its reasoning, a conversation unfolding into up to
    five samples; anything longer than the context is dropped, never truncated       -> §5.1
  - the verifiers (exact numeric match; fraction of test cases passed in a sandbox),
    reached through a small pool that retries its own failures but scores an
    unusable answer 0                                                                -> §5.2.1
  - run_sandboxed(source, timeout): untrusted code in a separate, limited process

The tasks are small on purpose: a 15M-parameter model pre-trained for a few minutes must solve some of
them after a few minutes of SFT, or reinforcement learning has nothing to reinforce.
Everything is a pure function of a seed, so a run and its held-out scores repeat exactly.
"""

import ast
import concurrent.futures
import dataclasses
import inspect
import itertools
import json
import math
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile

import torch

import data
from mellum2 import IGNORE_INDEX

SUITES = ("math", "code", "tool")
VARIANTS = ("instruct", "thinking")
HELD_OUT_SHARE = 0.2   # of each suite's problems (by content, so held-out questions are never trained on)
MAX_UNFOLD = 5         # §5.1: a Thinking conversation gives at most five samples


@dataclasses.dataclass(frozen=True)
class Task:
    suite: str          # one of SUITES; picks the verifier
    prompt: str         # the user's message
    answer: str         # math and tool: the number; code: a reference solution
    key: str            # what makes two tasks the same problem (the held-out split hashes it)
    reasoning: tuple    # worked reasoning per assistant turn, for Thinking demonstrations
    tool_call: dict = None  # tool: the call the demonstration makes
    cases: tuple = ()   # code: ((args, expected), ...), its test cases


def held_out(key):
    """True for the share of problems kept for evaluation, decided by a hash of the problem."""
    return data.key_hash(key) < HELD_OUT_SHARE


# -----------------------------------------------------------------------------------------------
# Suite "math": arithmetic on numbers up to 30 and one-step word problems. The Thinking trace works column by
# column, the scratchpad that helps small transformers learn arithmetic (Lee et al., 2023).

def addition_trace(a, b):
    steps, carry, place = [], 0, 0
    while a // 10**place or b // 10**place or carry:
        x, y = a // 10**place % 10, b // 10**place % 10
        total = x + y + carry
        steps.append(f"{x} + {y}" + (f" + {carry}" if carry else "") + f" = {total}, write {total % 10}"
                     + (" carry 1" if total >= 10 else ""))
        carry, place = total // 10, place + 1
    return ". ".join(steps) + f". So {a} + {b} = {a + b}."


def subtraction_trace(a, b):  # a >= b
    steps, borrow, place = [], 0, 0
    while a // 10**place:
        x, y = a // 10**place % 10 - borrow, b // 10**place % 10
        borrow = int(x < y)
        steps.append(f"{x + 10 * borrow} - {y} = {x + 10 * borrow - y}" + (" borrow 1" if borrow else ""))
        place += 1
    return ". ".join(steps) + f". So {a} - {b} = {a - b}."


def math_task(rng):
    name, thing = rng.choice(data.NAMES), rng.choice(data.THINGS)
    kind = rng.choice(("add", "subtract", "multiply", "gain", "loss", "boxes"))
    if kind in ("multiply", "boxes"):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        value, trace = a * b, f"{a} * {b} = {a * b}."
    else:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        if kind in ("subtract", "loss"):
            a, b = max(a, b), min(a, b)
            value, trace = a - b, subtraction_trace(a, b)
        else:
            value, trace = a + b, addition_trace(a, b)
    prompt = {"add": f"What is {a} + {b}?", "subtract": f"What is {a} - {b}?", "multiply": f"What is {a} * {b}?",
              "gain": f"{name} has {a} {thing}s and gets {b} more. How many {thing}s does {name} have now?",
              "loss": f"{name} had {a} {thing}s and gave {b} away. How many {thing}s are left?",
              "boxes": f"A box holds {a} {thing}s. How many {thing}s are in {b} boxes?"}[kind]
    op = {"add": "+", "gain": "+", "subtract": "-", "loss": "-", "multiply": "*", "boxes": "*"}[kind]
    return Task("math", prompt, str(value), key=f"{a}{op}{b}", reasoning=(trace,))


# -----------------------------------------------------------------------------------------------
# Suite "code": "Write a Python function f(x) that returns x times 3." Each template is (words,
# Python expression, kind of argument); the constant k is drawn. The expected values come from the
# reference expression itself, evaluated here on our own generated text (trusted, unlike answers).

# Every template has a k, so the held-out problems are seen templates with unseen constants.
CODE_TEMPLATES = (
    ("x plus {k}", "x + {k}", "int"), ("x minus {k}", "x - {k}", "int"), ("x times {k}", "x * {k}", "int"),
    ("x to the power {k}", "x ** {k}", "int"), ("the remainder of x divided by {k}", "x % {k}", "int"),
    ("x divided by {k}, rounded down", "x // {k}", "int"), ("{k} times x plus 1", "{k} * x + 1", "int"),
    ("the larger of x and {k}", "max(x, {k})", "int"), ("the smaller of x and {k}", "min(x, {k})", "int"),
    ("s reversed, then its first {k} characters", "s[::-1][:{k}]", "str"),
    ("the length of s plus {k}", "len(s) + {k}", "str"), ("the last {k} characters of s", "s[-{k}:]", "str"),
    ("s repeated {k} times", "s * {k}", "str"), ("the first {k} characters of s", "s[:{k}]", "str"),
    ("the sum of xs plus {k}", "sum(xs) + {k}", "list"),
    ("the largest element of xs times {k}", "max(xs) * {k}", "list"),
    ("the first {k} elements of xs sorted", "sorted(xs)[:{k}]", "list"),
    ("the number of times {k} appears in xs", "xs.count({k})", "list"),
)
CODE_ARGUMENTS = {"int": "x", "str": "s", "list": "xs"}
WORDS = ("cat", "river", "python", "moon", "table", "green", "code", "apple",   # shorter than k, or not:
         "watermelon", "lighthouse", "blackboard", "strawberry")                # "the first 9 characters"
# Answers that ignore the task. A set of test cases one of them passes is drawn again: when the
# cases were three random inputs with no such check, `return x` passed "the larger of x and 7" and
# `return s` "the first 8 characters of s" on one held-out code task in six.
SHORTCUTS = {"int": ("x", "0", "1", "{k}"), "str": ("s", "''", "s[::-1]", "len(s)"),
             "list": ("xs", "sorted(xs)", "[]", "0", "sum(xs)", "max(xs)", "len(xs)")}
N_CASES = 4


def typed(value, type=type, list=list, int=int, float=float, str=str, bool=bool):
    """A result as plain data that says its type all the way down: [type name, value], a list
    element by element, anything else ["other", None]. Two results are the same when these are
    (True is not 1, 2.0 is not 2, and an object whose == always says yes is neither). The code
    verifier runs this very function in the sandbox, defined before the answer: the defaults keep
    the builtins it had then."""
    kind = type(value)
    if kind is list:
        return ["list", [typed(v) for v in value]]
    if kind in (int, float, str, bool):
        return [kind.__name__, value]
    return ["other", None]


def same(got, want):
    """A right result: equal, and of the expected type all the way down (see typed)."""
    return typed(got) == typed(want)


def code_task(rng):
    words, expression, kind = rng.choice(CODE_TEMPLATES)
    k = rng.randint(2, 9)
    words, expression, arg = words.format(k=k), expression.format(k=k), CODE_ARGUMENTS[kind]
    reference, *shortcuts = (eval(f"lambda {arg}: {body.format(k=k)}")  # noqa: S307 (our own text, not model output)
                             for body in (expression, *SHORTCUTS[kind]))
    inputs = {"int": lambda: rng.randint(0, 50), "str": lambda: rng.choice(WORDS),
              "list": lambda: [rng.randint(-9, 20) for _ in range(rng.randint(2, 12))]}[kind]
    while True:
        cases = tuple(((x,), reference(x)) for x in (inputs() for _ in range(N_CASES)))
        if not any(all(same(shortcut(*args), want) for args, want in cases) for shortcut in shortcuts):
            break
    solution = f"def f({arg}):\n    return {expression}"
    trace = f"The function returns {words}, which in Python is {expression}."
    return Task("code", f"Write a Python function f({arg}) that returns {words}.", solution, key=f"{words}",
                reasoning=(trace,), cases=cases)


# -----------------------------------------------------------------------------------------------
# Suite "tool": a product or sum too long to do in the head, so the answer needs one calculator call.

def tool_task(rng):
    if rng.random() < 0.5:
        a, b, op = rng.randint(100, 999), rng.randint(10, 99), "*"
    else:
        a, b, op = rng.randint(1000, 9999), rng.randint(1000, 9999), "+"
    expression = f"{a} {op} {b}"
    value = a * b if op == "*" else a + b
    return Task("tool", f"Use the calculator to work out {expression}.", str(value), key=expression,
                reasoning=(f"{expression} is too long to do reliably in my head, so I will call the calculator.",
                           f"The calculator returned {value}."),
                tool_call={"name": "calculator", "arguments": {"expression": expression}})


MAKERS = {"math": math_task, "code": code_task, "tool": tool_task}


def make_task(suite, rng, split="train"):
    """One task of `suite` from the given split ("train" or "eval"), drawn with `rng`."""
    while True:
        task = MAKERS[suite](rng)
        if held_out(task.key) == (split == "eval"):
            return task


def eval_tasks(suite, n, seed=0):
    """A fixed list of n held-out tasks, the same in every run with the same seed."""
    rng = random.Random(f"eval-{suite}-{seed}")
    return [make_task(suite, rng, "eval") for _ in range(n)]


# -----------------------------------------------------------------------------------------------
# Demonstrations (§5.1.1) and their SFT samples with loss masks (§5.1)

REFLECTIVE_SHARE = 0.15  # Instruct math answers that "think aloud" inline; see the concision penalty
REFLECTION_WORDS = ("wait", "actually", "hmm", "let me think", "let me check", "hold on", "double-check",
                    "alternatively", "on second thought")
REFLECTION_PATTERN = re.compile(r"\b(" + "|".join(re.escape(w) for w in REFLECTION_WORDS) + r")\b", re.IGNORECASE)


def count_reflection_words(text):
    return len(REFLECTION_PATTERN.findall(text))


def reflection_words_written(enc, ids):
    """Reflection words in generated ids, in <think> blocks and around tool calls too. Each run of text
    between special tokens is read on its own: "wait</think>2" holds "wait", not "wait2"."""
    return sum(count_reflection_words(enc.decode(list(run)))
               for is_text, run in itertools.groupby(ids, key=lambda i: i < data.N_RANKS) if is_text)


def demonstration(task, reflective=False):
    """The ideal conversation for a task: messages with the Thinking reasoning attached to each
    assistant turn (Instruct samples drop it). A reflective answer is the habit §5.2.3 saw Instruct
    RL learn, reasoning inline with "wait"; a few such answers are in the Instruct SFT data so that
    the concision penalty has something to remove."""
    user = {"role": "user", "content": task.prompt}
    if task.suite == "tool":
        return [user, {"role": "assistant", "content": "", "reasoning": task.reasoning[0], "tool_call": task.tool_call},
                {"role": "tool", "content": task.answer},
                {"role": "assistant", "content": f"{task.tool_call['arguments']['expression']} = {task.answer}",
                 "reasoning": task.reasoning[1]}]
    content = task.answer
    if reflective and task.suite == "math":
        content = f"Hmm, let me think. Wait, {task.answer}? Actually, let me check. Yes: {task.answer}"
    return [user, {"role": "assistant", "content": content, "reasoning": task.reasoning[0]}]


def sft_samples(enc, messages, variant, max_tokens):
    """One conversation -> SFT samples [(ids, mask)], mask[t] = 1 where ids[t] is trained.
    Instruct: one sample, every assistant turn trained, reasoning removed. Thinking: one sample per
    assistant turn (the last MAX_UNFOLD) as the final turn, trained on it with its reasoning, the
    earlier turns as context; a turn without reasoning gives no Thinking sample. Context turns keep
    their reasoning only since the user last spoke (the call before a tool's reply): that is what
    a rollout has in front of it, since it keeps its own reasoning while the tool answers.
    Samples over max_tokens are dropped."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if variant == "instruct":
        samples = [data.render_training_chat(enc, messages, set(assistant), set())]
    else:
        asked = [i for i, m in enumerate(messages) if m["role"] == "user"]

        def since_asked(i):  # assistant turn i and those before it since the user last spoke
            return {j for j in assistant if max(u for u in asked if u < i) < j <= i}
        samples = [data.render_training_chat(enc, messages[:i + 1], {i}, since_asked(i))
                   for i in assistant[-MAX_UNFOLD:] if messages[i].get("reasoning")]
    return [(ids, mask) for ids, mask in samples if len(ids) <= max_tokens]


def conversation(rng, variant):
    """Usually one task, sometimes two or three asked one after another in a single chat: multi-turn
    data, which the Thinking variant unfolds (tool tasks are two assistant turns already). Only
    Instruct data has reflective answers: only Instruct RL has the concision penalty."""
    messages = []
    for _ in range(rng.choice((1, 1, 1, 1, 2, 3))):
        task = make_task(rng.choice(SUITES), rng)
        messages += demonstration(task, reflective=rng.random() < REFLECTIVE_SHARE and variant == "instruct")
    return messages


class SFTSampler:
    """Batches of SFT samples as (x, y): right-padded, targets IGNORE_INDEX wherever the mask is 0.
    Batch `step` is a pure function of (seed, step), so a resumed run sees the same batches."""

    def __init__(self, variant, seed, batch_size, seq_len):
        self.variant, self.seed, self.batch_size, self.seq_len = variant, seed, batch_size, seq_len
        self.enc = data.load_tokenizer()

    def get_batch(self, step):
        rng = random.Random(f"sft-{self.seed}-{step}")
        samples = []
        while len(samples) < self.batch_size:
            samples += sft_samples(self.enc, conversation(rng, self.variant), self.variant, self.seq_len + 1)
        samples = samples[:self.batch_size]
        T = max(len(ids) for ids, _ in samples) - 1
        x = torch.full((self.batch_size, T), data.PAD, dtype=torch.long)
        y = torch.full((self.batch_size, T), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, mask) in enumerate(samples):
            ids, mask = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
            x[row, :len(ids) - 1] = ids[:-1]
            y[row, :len(ids) - 1] = ids[1:].masked_fill(~mask[1:], IGNORE_INDEX)
        return x, y


# -----------------------------------------------------------------------------------------------
# Reading a generated assistant turn, and the calculator tool

@dataclasses.dataclass
class Turn:
    content: str     # the text after any reasoning (which only the model itself reads back)
    tool_call: str   # the JSON text between <tool_call> tags, or None


def parse_turn(enc, ids):
    """Generated ids of one assistant turn (after <|assistant|>, up to <|end|>) -> its parts."""
    special = data.SPECIAL_TOKENS
    if special["</think>"] in ids:  # the answer is what follows the last reasoning block
        ids = ids[len(ids) - ids[::-1].index(special["</think>"]):]
    if special["<think>"] in ids:  # and it ends where a block opens that never closes: reasoning is no answer
        ids = ids[:ids.index(special["<think>"])]
    tool_call = None
    if special["<tool_call>"] in ids:
        start = ids.index(special["<tool_call>"])
        end = ids.index(special["</tool_call>"], start) if special["</tool_call>"] in ids[start:] else len(ids)
        tool_call, ids = data.text_of(enc, ids[start + 1:end]), ids[:start] + ids[end + 1:]
    return Turn(data.text_of(enc, ids), tool_call)


CALCULATOR_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
                  ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b, ast.Div: lambda a, b: a / b}


def calculate(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -calculate(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in CALCULATOR_OPS:
        return CALCULATOR_OPS[type(node.op)](calculate(node.left), calculate(node.right))
    raise ValueError("only numbers and + - * / // % are allowed")


def call_tool(call_text):
    """Run a model's tool call. The result, or the error, is what the model reads next (§5.2.1: the
    error string is shown to the model), so a malformed call is a turn, not a crash."""
    try:
        call = json.loads(call_text)
        if not isinstance(call, dict) or call.get("name") != "calculator":
            return "error: the only tool is calculator"
        expression = call["arguments"]["expression"]
        if not isinstance(expression, str) or len(expression) > 64:
            return "error: expression must be a string of at most 64 characters"
        value = calculate(ast.parse(expression, mode="eval").body)
        return str(int(value) if float(value).is_integer() else round(value, 6))
    except (ValueError, KeyError, TypeError, SyntaxError, ZeroDivisionError, RecursionError) as e:
        return f"error: {type(e).__name__}: {e}"


def tool_reply(enc, call_text):
    """What follows an assistant turn that called the tool: the tool's reply, then <|assistant|>,
    where the model takes over again (a rollout's next turn; sample.py --chat's too)."""
    reply = data.render_message(enc, {"role": "tool", "content": call_tool(call_text)})
    return reply + [data.SPECIAL_TOKENS["<|assistant|>"]]


# -----------------------------------------------------------------------------------------------
# The sandbox (§5.2.1 Infrastructure: the code-execution backend of the verification stack)
#
# Each program runs in a fresh interpreter (isolated mode: no environment variables, no user site,
# only the standard library), with an empty environment, in a fresh temporary directory, under limits
# on CPU time, address space, file size, processes and open files, and a wall-clock timeout after
# which its whole process group is killed. Output goes to files in that directory, so a flood stops
# at the file-size limit instead of filling our memory, and a program may open only so many files
# for writing, so that it cannot fill the disk with small ones either.
#
# Started by root (as CI is), the interpreter first loads, with the library modules an answer may
# import, then drops to the unprivileged `nobody`: the process limit binds only below root, and
# `nobody` owns no files outside its directory (it may still write where anyone may, like /tmp).
# (Starting directly as `nobody` fails where the interpreter lives under root's home, which is also
# why modules not loaded before the drop are out of reach.) An audit hook then refuses new
# processes, sockets, foreign code and writes outside the directory, which also guards a non-root
# user's files. This contains accidents and a misbehaving model; it is not a jail for an attacker
# (for that: containers, gVisor, or a VM).

SANDBOX_PRELUDE = r"""
import json, os, resource, sys
settings = json.loads(sys.argv[1])
source = sys.stdin.read()
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # an answer reading stdin gets an end of file, not the harness
for name, value in settings["rlimits"].items():
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
    except (ValueError, OSError) as e:  # e.g. macOS refuses RLIMIT_AS
        print(f"sandbox: {name} not set ({e})", file=sys.stderr)
# What an answer may import, loaded before the drop: `nobody` may not read the library itself.
import bisect, collections, copy, functools, heapq, itertools, math, operator, random, re, statistics, string, typing
if settings["uid"] is not None:
    os.setgroups([])
    os.setgid(settings["gid"])
    os.setuid(settings["uid"])
here = os.getcwd() + os.sep
BLOCKED = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
           "os.kill", "os.killpg", "socket.", "ctypes.", "sys.addaudithook", "os.setuid", "os.setgid")
# The modules beneath those calls, which start processes and send signals without an audit event of
# their own. _signal is loaded at start-up: out of sys.modules, importing it again meets the guard.
BLOCKED_MODULES = ("_posixsubprocess", "signal", "_signal")
sys.modules.pop("_signal", None)
PATH_EVENTS = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
               "os.link", "os.truncate", "os.utime", "shutil.")
TWO_PATH_EVENTS = ("os.rename", "os.symlink", "os.link", "shutil.copy", "shutil.move")  # both ends count
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
writes_left = [settings["max_writes"]]  # with the size limit per file, a bound on what it can leave on disk
def inside(path):
    return isinstance(path, (str, bytes)) and os.path.realpath(os.fsdecode(path)).startswith(here)
def guard(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0] in BLOCKED_MODULES:
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open" and not isinstance(args[0], int):
        writes = any(c in args[1] for c in "wax+") if args[1] else args[2] & WRITE_FLAGS
        if writes and not inside(args[0]):
            raise PermissionError(f"sandbox: writing outside the working directory")
        if writes:
            writes_left[0] -= 1
            if writes_left[0] < 0:
                raise PermissionError("sandbox: too many files opened for writing")
    paths = args[:2] if event.startswith(TWO_PATH_EVENTS) else args[:1]  # a descriptor is never inside
    if event.startswith(PATH_EVENTS) and not all(inside(path) for path in paths):
        raise PermissionError(f"sandbox: {event} outside the working directory")
sys.addaudithook(guard)
del json, resource, settings
exec(compile(source, "<candidate>", "exec"), {"__name__": "__main__"})
"""


@dataclasses.dataclass
class SandboxResult:
    ok: bool          # exited with status 0, within every limit
    stdout: str
    stderr: str
    timed_out: bool   # killed at the wall-clock limit
    returncode: int   # negative: killed by that signal (SIGXCPU: CPU time); output past its limit is an OSError


def sandbox_user():
    """(uid, gid) to run as when we are root, else (None, None)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None, None
    import pwd
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def run_sandboxed(source, timeout=2.0, memory_mb=256, max_output=65536, max_processes=16, max_open_files=32,
                  max_writes=64):
    """Run untrusted Python `source` in a separate limited process; never raises for anything the
    program does. Returns a SandboxResult."""
    if os.name != "posix":
        raise OSError("the code sandbox needs a POSIX system (Linux or macOS)")
    uid, gid = sandbox_user()
    rlimits = {"RLIMIT_CPU": math.ceil(timeout), "RLIMIT_AS": memory_mb * 2**20, "RLIMIT_FSIZE": max_output,
               "RLIMIT_NPROC": max_processes, "RLIMIT_NOFILE": max_open_files, "RLIMIT_CORE": 0}
    settings = json.dumps({"rlimits": rlimits, "uid": uid, "gid": gid, "max_writes": max_writes})
    with tempfile.TemporaryDirectory(prefix="sandbox-") as workdir:
        if uid is not None:
            os.chown(workdir, uid, gid)
        paths = {name: os.path.join(workdir, f".{name}") for name in ("stdin", "stdout", "stderr")}
        with open(paths["stdin"], "w", encoding="utf-8") as f:
            f.write(source)
        with open(paths["stdin"], "rb") as stdin, open(paths["stdout"], "w+b") as stdout, \
                open(paths["stderr"], "w+b") as stderr:
            os.remove(paths["stdin"])  # open, it is still read; gone, the program cannot find it
            process = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", SANDBOX_PRELUDE, settings],
                                       stdin=stdin, stdout=stdout, stderr=stderr, cwd=workdir, env={},
                                       start_new_session=True, close_fds=True)
            try:
                process.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            try:  # the whole group: whatever the program started dies with it
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()

            def read(f):  # through our own descriptor: whatever now sits at its path (a pipe, say) is not read
                f.seek(0)
                return f.read(max_output).decode("utf-8", "replace")
            return SandboxResult(ok=process.returncode == 0 and not timed_out, stdout=read(stdout),
                                 stderr=read(stderr), timed_out=timed_out, returncode=process.returncode)


# -----------------------------------------------------------------------------------------------
# Verifiers (§5.2.1): every task carries its own check; reward in [0, 1]

class VerifierError(Exception):
    """Our side failed (not the answer): retried, and never scored as a wrong answer."""


def last_number(text):
    """The last number in text, decimals whole ("2.5" is not a 5), thousands' commas dropped ("1,234"
    is 1234; "4,2" and "1, 2" are two numbers)."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text))
    return float(numbers[-1]) if numbers else None


def extract_code(text):
    fenced = re.search(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", text, re.DOTALL | re.IGNORECASE)
    return fenced.group(1) if fenced else text


def code_reward(task, text, timeout=2.0):
    """Fraction of the task's test cases the answer passes (the report's reward for its own code
    tasks). The sandbox only calls the answer's f on each case's arguments and reports what came
    back, typed, after a fresh random tag; the expected values never enter it, and the comparison
    happens here. Whatever a program does to the harness (redefine print, rewrite its output, read
    the harness's own text), it cannot produce right results without computing them."""
    tag = secrets.token_hex(8)
    harness = (f"import json as __json\n"
               f"{inspect.getsource(typed)}\n"
               f"__print = print\n"
               f"__answer = {{'__name__': 'answer'}}  # not __main__: a demo under that guard does not run\n"
               f"exec({extract_code(text)!r}, __answer)\n"
               f"__results = []\n"
               f"for __args in {[list(args) for args, _ in task.cases]!r}:\n"
               f"    try:\n"
               f"        __results.append(typed(__answer['f'](*__args)))\n"
               f"    except Exception:\n"
               f"        __results.append(None)\n"
               f"__print('\\n' + {tag!r}, __json.dumps(__results))  # on a line of its own, whatever f printed\n")
    try:
        result = run_sandboxed(harness, timeout=timeout)
    except OSError as e:  # could not start a process at all: the verifier's failure, not the answer's
        raise VerifierError(f"sandbox did not start: {e}") from e
    reports = [line[len(tag) + 1:] for line in result.stdout.splitlines() if line.startswith(tag + " ")]
    try:
        results = json.loads(reports[-1]) if result.ok and reports else None
    except (ValueError, RecursionError):  # mangled, or nested deeper than the decoder follows
        results = None
    if not isinstance(results, list) or len(results) != len(task.cases):
        return 0.0   # syntax error, crash, timeout, limit, no report or a mangled one: reward 0
    wanted = [json.loads(json.dumps(typed(want))) for _, want in task.cases]  # as the report reads back
    return sum(got == want for got, want in zip(results, wanted)) / len(task.cases)


def reward(task, text):
    """The verifier of `task` on the final answer text: 1 for a right number (math, tool), the
    fraction of test cases passed (code); an unparseable answer scores 0."""
    if task.suite == "code":
        return code_reward(task, text)
    return float(last_number(text) == int(task.answer))


class Verifier:
    """The gateway: answers go in, rewards come back as futures, scored in parallel worker threads
    (they only wait on sandbox processes). A failure of our own is retried; one that persists gives
    None (the sample is left out, not punished), and the pool keeps serving."""

    def __init__(self, workers=2, retries=2):
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        self.retries = retries

    def _score(self, task, text):
        for attempt in range(self.retries + 1):
            try:
                return reward(task, text)
            except VerifierError:
                if attempt == self.retries:
                    return None

    def submit(self, task, text):
        return self.pool.submit(self._score, task, text)

    def score_all(self, pairs):
        """[(task, text)] -> [reward or None]; identical answers to the same task are scored once."""
        futures = {}
        for task, text in pairs:
            if (id(task), text) not in futures:
                futures[id(task), text] = self.submit(task, text)
        return [futures[id(task), text].result() for task, text in pairs]

    def close(self):
        self.pool.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
