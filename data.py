"""
Mellum 2, the data (report section 3: pre-training data, curriculum, FIM, filtering, packing).

Everything the model reads comes through this file, in the order the report describes it:
  - a byte-level BPE tokenizer, trained here and committed as a rank file        -> §3.1.4 Tokenizer
  - a web / code / math corpus harvested from what a Python install carries,
    cached as memory-mapped uint16 token files with a held-out validation split  -> §3.1 sources
  - the three-phase curriculum of Table 3 and the 4x repetition cap              -> §3.2, §3.2.1
  - fill-in-the-middle (FIM) by phase, 50/50 PSM and SPM                         -> §3.2.2
  - the "fewer than 1% unique tokens" filter and best-fit sequence packing       -> §3.3, §3.4.6

The report trains on 10.65T tokens of crawled and synthetic data. A tiny model on a laptop needs a
few million tokens that can be had without a network, so the sources are stand-ins with the same
roles: the stdlib's code for "code", docstrings and help topics for "web" (technical English), and
sympy/mpmath docstrings plus generated GSM-style problems for "math".

Public API (train.py / sample.py use these):
  load_tokenizer() -> tiktoken.Encoding           SPECIAL_TOKENS: name -> id     DataError
  build_corpus(extra_dirs, cache_dir, ...) -> Corpus   .train / .val: {source: TokenSplit}, .skipped
  PHASES, phase_index(step, total_steps), plan_tokens(...), planned_repetition(...)
  BatchSampler(corpus, seed, batch_size, seq_len, total_steps, allow_over_repetition=False, phase=None)
      .get_batch(step) -> (x, y)
  val_batches(corpus, source, batch_size, seq_len, max_rows) -> iterator of (x, y)
  fim_prompt(prefix_ids, suffix_ids), render_chat(enc, messages),
  render_training_chat(enc, messages, trained, reasoning)   (post-training's loss masks)
  passkey_example(enc, length, depth, key)          (the long-context test, train.py --stage long)
  data_report(corpus, token_budget)                  write_atomically(path, write)
"""

import ast
import base64
import bisect
import collections
import contextlib
import dataclasses
import hashlib
import heapq
import importlib.util
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import regex
import tiktoken
import torch

REPO_DIR = Path(__file__).resolve().parent
TOKENIZER_FILE = REPO_DIR / "tokenizer" / "mellum2.tiktoken"
DEFAULT_CACHE_DIR = REPO_DIR / "cache"     # git-ignored; one sub-folder per distinct corpus
SOURCES = ("web", "code", "math")          # the report's three data families (Table 3)


class DataError(Exception):
    """Something about the data makes training impossible; the message says what, in one line."""


class RepetitionError(DataError):
    """A training plan would repeat a source more often than the report's cap (§3.2.1)."""


# ------------------------------------------------------------------------------------------------
# §3.1.4 Tokenizer: byte-level BPE, 4080 learned ranks + 16 special tokens = 4096 ids
# ------------------------------------------------------------------------------------------------
# The report's tokenizer (98,304 ids, the same as Mellum-4B's) comes with the released checkpoint
# (sample.py reads its tokenizer.json), but it is far too large for a tiny model: at d_model 256 the
# output head alone would be most of the compute, and how it was trained is not told. We train our own
# byte-level BPE with 4096 ids, the same kind of tokenizer (runtimes treat Mellum's as byte-level BPE).
# Byte-level means the 256 single bytes are always in the vocabulary, so ANY byte string encodes and
# decodes exactly: there is no "unknown token".

N_RANKS = 4080    # learned BPE ranks: 256 single bytes + 3824 merges

# Before BPE, text is cut into chunks that merges never cross (GPT-4's rule set), so a token never
# glues the end of one word to the start of the next. One change from GPT-4: digits are split ONE per
# chunk (GPT-4 allows runs of up to 3). It costs ~18% more tokens on math and nothing elsewhere, and it
# gives a small model one token per digit, which is known to help it learn arithmetic.
SPLIT_PATTERN = "|".join([
    r"'(?i:[sdmt]|ll|ve|re)",         # English contractions: 's 'd 'm 't 'll 've 're, any case
    r"[^\r\n\p{L}\p{N}]?+\p{L}++",    # a word, with at most one non-letter before it (usually a space)
    r"\p{N}",                         # a single digit
    r" ?[^\s\p{L}\p{N}]++[\r\n]*+",   # a run of punctuation or symbols, e.g. " ==" or "):\n"
    r"\s++$",                         # whitespace at the very end of the text
    r"\s*[\r\n]+",                    # line breaks, with any spaces before them
    r"\s+(?!\S)",                     # spaces, leaving the last one to start the next word: "   x"
    r"\s",                            # one last whitespace character
])

# The 16 special ids sit after the 4080 ranks. Corpus text is always encoded with encode_ordinary, so
# a file that merely CONTAINS the string "<fim_middle>" is ordinary text; only code that builds prompts
# (FIM below, chat templates in post-training) inserts these ids. The FIM strings are Mellum-4B's
# (the report says the tokenizer is identical to Mellum-4B's but does not list its special tokens).
SPECIAL_TOKEN_TABLE = (
    # token              purpose                                                               id
    ("<|endoftext|>", "end of a document; separates documents in a packed sequence"),      # 4080
    ("<fim_prefix>",  "FIM: the text before the gap follows"),                               # 4081
    ("<fim_middle>",  "FIM: the text of the gap follows (the part the model writes)"),       # 4082
    ("<fim_suffix>",  "FIM: the text after the gap follows"),                                # 4083
    ("<fim_pad>",     "FIM: padding (reserved; packing here needs none)"),                   # 4084
    ("<filename>",    "repository-level FIM: a file path follows (reserved)"),               # 4085
    ("<reponame>",    "repository-level FIM: a repository name follows (reserved)"),         # 4086
    ("<|system|>",    "chat: system turn"),                                                  # 4087
    ("<|user|>",      "chat: user turn"),                                                    # 4088
    ("<|assistant|>", "chat: assistant turn"),                                               # 4089
    ("<|end|>",       "chat: end of a turn"),                                                # 4090
    ("<think>",       "Thinking model: reasoning starts"),                                   # 4091
    ("</think>",      "Thinking model: reasoning ends"),                                     # 4092
    ("<tool_call>",   "a JSON tool call starts"),                                            # 4093
    ("</tool_call>",  "a JSON tool call ends"),                                              # 4094
    ("<|pad|>",       "padding of batches: prompts, SFT, GRPO (never a training target)"),   # 4095
)
SPECIAL_TOKENS = {token: N_RANKS + i for i, (token, _) in enumerate(SPECIAL_TOKEN_TABLE)}
VOCAB_SIZE = N_RANKS + len(SPECIAL_TOKENS)   # 4096, the tiny and small presets' vocab_size
EOT = SPECIAL_TOKENS["<|endoftext|>"]
PAD = SPECIAL_TOKENS["<|pad|>"]


def _merge(ids, pair, new_id):
    """Replace every non-overlapping occurrence of `pair` in `ids`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(texts, n_ranks=N_RANKS):
    """Learn byte-level BPE ranks from `texts`; returns {token bytes: rank}, ranks 0..n-1.

    The textbook algorithm recounts every pair in the corpus after each merge: on 10 MB that is
    seconds per merge, hours for 3824 merges. Three indexes make each merge touch only the chunks
    that contain the merged pair:
      pair_counts  (left id, right id) -> occurrences in the whole corpus
      where        (left id, right id) -> indices of the distinct chunks that contain it
      heap         (-count, pair) entries; stale ones are skipped when popped ("lazy deletion")
    Ties are broken by the smaller (left id, right id), so training is deterministic.
    """
    # Split into chunks and count each distinct chunk once: ~63k distinct chunks stand for 10 MB.
    chunk_counts = collections.Counter()
    for text in texts:
        chunk_counts.update(regex.findall(SPLIT_PATTERN, text))
    chunks = sorted(chunk_counts)
    words = [list(chunk.encode("utf-8")) for chunk in chunks]   # each chunk as a list of byte ids
    counts = [chunk_counts[chunk] for chunk in chunks]

    pair_counts = collections.defaultdict(int)
    where = collections.defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[i]
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)

    vocab = [bytes([b]) for b in range(256)]        # id -> bytes; ids 0..255 are the single bytes
    rank_of = {token: i for i, token in enumerate(vocab)}
    while len(vocab) < n_ranks and heap:
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts[pair]
        if count != -neg_count:                     # stale: the count changed since this push
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        merged = vocab[pair[0]] + vocab[pair[1]]
        new_id = rank_of.get(merged)                # two different pairs can spell the same bytes:
        if new_id is None:                          # then the merge reuses the existing id
            new_id = len(vocab)
            vocab.append(merged)
            rank_of[merged] = new_id
        touched = set()
        for i in sorted(where.pop(pair)):
            old, new = words[i], _merge(words[i], pair, new_id)
            old_pairs, new_pairs = list(zip(old, old[1:])), list(zip(new, new[1:]))
            for p in old_pairs:
                pair_counts[p] -= counts[i]
            for p in new_pairs:
                pair_counts[p] += counts[i]
            for p in set(old_pairs) - set(new_pairs):
                where[p].discard(i)
            for p in new_pairs:
                where[p].add(i)
            touched.update(new_pairs)
            words[i] = new
        where.pop(pair, None)
        for p in touched:                           # counts that went up need a fresh heap entry
            heapq.heappush(heap, (-pair_counts[p], p))
    return rank_of


# The rank file is tiktoken's format: one "base64(token bytes) rank" line per token, sorted by rank.
# We write and read it ourselves: tiktoken's own loader caches files by their PATH string, so after
# regenerating the tokenizer at the same path it would silently keep returning the old ranks.
def save_ranks(ranks, path):
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}\n"
             for token, rank in sorted(ranks.items(), key=lambda item: item[1])]
    write_atomically(path, lambda tmp: Path(tmp).write_text("".join(lines), encoding="ascii"))


def parse_ranks(data):
    """Bytes of a rank file -> {token bytes: rank}; the ranks must be exactly 0..n-1."""
    ranks = {}
    for line in data.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError("ranks are not 0..n-1, each once")
    return ranks


def _encoding(ranks):
    if len(ranks) != N_RANKS:
        raise DataError(f"tokenizer has {len(ranks)} ranks, expected {N_RANKS} (+16 special = 4096)")
    return tiktoken.Encoding(name="mellum2", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens=SPECIAL_TOKENS, explicit_n_vocab=VOCAB_SIZE)


def load_tokenizer(path=TOKENIZER_FILE):
    """The project's tokenizer from the committed rank file: a tiktoken.Encoding, n_vocab 4096.

    Use enc.encode_ordinary(text) for text (special-token strings stay ordinary text) and
    enc.decode(ids) / enc.decode_bytes(ids) to go back.
    """
    try:
        return _encoding(parse_ranks(Path(path).read_bytes()))
    except (OSError, ValueError, DataError) as e:  # missing, truncated or edited (base64 errors are ValueErrors)
        raise DataError(f"{path}: unreadable tokenizer rank file ({e}); git checkout restores it") from None


def text_of(enc, ids):
    """The text of generated ids, without the special tokens around and inside it (markup, not text)."""
    return enc.decode([i for i in ids if i < N_RANKS])


# ------------------------------------------------------------------------------------------------
# §3.1 Sources: what a Python install already carries, harvested on this machine, never downloaded
# ------------------------------------------------------------------------------------------------
# code: the stdlib's own .py files (~10 MB). Left out: tests (half the tree and very repetitive),
#       `encodings` (mostly generated codec tables, 1.3 MB of literals) and `pydoc_data` (prose).
# web:  the `help()` topics and the docstrings of the stdlib, numpy, networkx and torch (~11 MB of
#       technical English, the only English prose a Python install has). torch's docstrings are half
#       of it and half the build time (~12 s of parsing), but they double the web source, which halves
#       how often a run repeats it (§3.2.1 caps repetition at 4x).
# math: sympy and mpmath docstrings (~5 MB of mathematical text), plus generated GSM-style word
#       problems and drills with worked, checked solutions (byte-identical on every Python version).
# A docstring document is every docstring of one module with >= 12 words (shorter ones are mostly
# "Return x."), joined by blank lines.
# The report's §3.3 quality filters (heuristics, web quality classifiers, MinHash near-dedup) are made
# for web-scale crawls and are not reproduced: these sources are a few curated packages. Its filter
# on training sequences (fewer than 1% unique tokens) is, in the batch sampler below.
DOCSTRING_PACKAGES = {"web": ("numpy", "networkx", "torch"), "math": ("sympy", "mpmath")}
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "encodings", "pydoc_data"}
MIN_DOCSTRING_WORDS = 12
N_SYNTHETIC_MATH = 10_000     # problems, about 2.0 MB
SYNTHETIC_MATH_SEED = 2605    # any fixed number; changing it changes the corpus
MIN_STDLIB_CODE_BYTES = 3_000_000   # less than this: a stripped install (e.g. no sources), see below

# Files in a user folder (train.py --data DIR) go to the source named by their first sub-folder
# (DIR/web/..., DIR/code/..., DIR/math/...), otherwise "code" for these suffixes and "web" for the rest.
CODE_SUFFIXES = {".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".java", ".kt", ".scala",
                 ".js", ".ts", ".go", ".rs", ".rb", ".php", ".cs", ".swift", ".lua", ".jl", ".sh",
                 ".sql", ".r", ".m", ".pl", ".hs", ".ml"}


@dataclasses.dataclass(frozen=True)
class InputFile:
    source: str   # "web" | "code" | "math"
    kind: str     # "text": the whole text is one document; "docstrings": its docstrings, joined, are one
    key: str      # stable name, e.g. "stdlib/json/decoder.py"; decides the split (see _val_keys)
    text: str


def _read_text(path, skipped):
    """The file as text, or None after counting why not (bad input is skipped, never fatal)."""
    try:
        data = path.read_bytes()
    except OSError:
        skipped["unreadable"] += 1
        return None
    if not data.strip():
        skipped["empty"] += 1
    elif b"\0" in data:                  # text files never hold NUL bytes; binary files nearly always do
        skipped["binary"] += 1
    else:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            skipped["non-UTF-8"] += 1
    return None


def _walk(root, skipped, skip_dirs=frozenset(), suffixes=None):
    """Files under `root`, in sorted order (os.walk order depends on the file system)."""
    def unreadable(error):
        skipped["unreadable"] += 1
    for folder, dirs, files in os.walk(root, onerror=unreadable):
        # hidden folders and files (.git, .venv, ...) are never corpus text
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs and not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or (suffixes and Path(name).suffix not in suffixes):
                continue
            if skip_dirs and name.startswith("test_"):   # default sources: test modules outside test/
                continue
            path = Path(folder, name)
            if path.exists() and not path.is_file():  # a pipe or a device would block or never end
                skipped["not a regular file"] += 1
                continue
            yield path


def _package_dir(name):
    """Folder of an installed package, found without importing it (importing sympy takes seconds)."""
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _default_inputs():
    skipped = collections.Counter()  # empty __init__.py files and the like: not the user's concern
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [InputFile("code", "text", f"stdlib/{path.relative_to(stdlib).as_posix()}", text)
            for path in _walk(stdlib, skipped, SKIP_DIRS, {".py"})
            if (text := _read_text(path, skipped)) is not None]
    inputs = code + [dataclasses.replace(f, source="web", kind="docstrings") for f in code]
    try:
        from pydoc_data.topics import topics   # the text of help("assert") etc.; absent on some distros
        inputs += [InputFile("web", "text", f"pydoc_data.topics/{name}", topics[name]) for name in sorted(topics)]
    except ImportError:
        pass
    package_files = []
    for source, packages in DOCSTRING_PACKAGES.items():
        for package in packages:
            root = _package_dir(package)
            if root is not None:
                package_files += [InputFile(source, "docstrings", f"{package}/{path.relative_to(root).as_posix()}",
                                            text)
                                  for path in _walk(root, skipped, SKIP_DIRS, {".py"})
                                  if (text := _read_text(path, skipped)) is not None]
    inputs += package_files
    # Debian's python3 without the -dev/-full packages, or an embeddable zip, has little or no stdlib
    # source: then the packages' code stands in for it, so a default run still has a code source.
    if sum(len(f.text) for f in code) < MIN_STDLIB_CODE_BYTES:
        inputs += [dataclasses.replace(f, source="code", kind="text") for f in package_files]
    inputs += [InputFile("math", "text", f"synthetic-math/{i:05d}", text)
               for i, text in enumerate(synthetic_math(N_SYNTHETIC_MATH, SYNTHETIC_MATH_SEED))]
    return inputs


def _user_inputs(dirs, skipped):
    inputs, names, resolved = [], collections.Counter(), set()
    for folder in map(Path, dirs):
        if not folder.is_dir():
            raise DataError(f"--data folder {folder} does not exist or is not a folder")
        if (where := folder.resolve()) in resolved:
            raise DataError(f"--data folder {folder} is given twice")
        resolved.add(where)
        # A document's key starts with its folder's name; two folders of one name (a/src, b/src) are
        # src and src#2, or their files' keys could coincide, and the held-out split, drawn by key,
        # would hold out both files of a pair (a source of two such files, all of it).
        names[folder.name] += 1
        label = folder.name if names[folder.name] == 1 else f"{folder.name}#{names[folder.name]}"
        paths = list(_walk(folder, skipped))
        if not paths:
            skipped["empty folder"] += 1
        for path in paths:
            text = _read_text(path, skipped)
            if text is None:
                continue
            rel = path.relative_to(folder)
            source = (rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in SOURCES
                      else "code" if path.suffix.lower() in CODE_SUFFIXES else "web")
            # Keys are hashed as UTF-8: a name that is not (an old Latin-1 archive's) keeps its bytes as \xNN
            key = os.fsencode(f"{label}/{rel.as_posix()}").decode("utf-8", "backslashreplace")
            inputs.append(InputFile(source, "text", key, text))
    return inputs


def _docstrings(source_text):
    """Every docstring of a module (module, classes, functions) with >= 12 words, joined by blank lines."""
    try:
        tree = ast.parse(source_text)
    except (SyntaxError, ValueError):   # e.g. files written for another Python version
        return ""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc.split()) >= MIN_DOCSTRING_WORDS:
                found.append(doc)
    return "\n\n".join(found)


# --- Synthetic math: GSM8K-style problems whose every step is checked -----------------------------
# Format as in GSM8K: each calculation is written "a op b = <<a op b=c>>c" and the answer follows
# "#### N". check_math() re-evaluates every <<expr=value>>; generation refuses any item that fails
# (it caught a template that produced non-integer money). The generators draw only from a seeded
# random.Random and tuples (never sets, whose order changes between runs), so the text is
# byte-identical across runs and Python versions.
NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena",
         "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yara")
THINGS = ("apple", "pencil", "notebook", "marble", "sticker", "cookie", "book", "shell", "card", "toy car")
VEHICLES = ("train", "bus", "cyclist", "truck", "boat", "car")


def _shopping(rng):
    name, (a_item, b_item) = rng.choice(NAMES), rng.sample(THINGS, 2)
    a, p, b, q = rng.randint(2, 12), rng.randint(1, 15), rng.randint(2, 12), rng.randint(1, 15)
    cost_a, cost_b = a * p, b * q
    total = cost_a + cost_b
    bill = next(x for x in (20, 50, 100, 200, 500) if x >= total)
    return (f"{name} buys {a} {a_item}s at ${p} each and {b} {b_item}s at ${q} each. "
            f"{name} pays with a ${bill} bill. How much change does {name} get?\n"
            f"The {a_item}s cost {a} * {p} = <<{a}*{p}={cost_a}>>{cost_a} dollars.\n"
            f"The {b_item}s cost {b} * {q} = <<{b}*{q}={cost_b}>>{cost_b} dollars.\n"
            f"Together they cost {cost_a} + {cost_b} = <<{cost_a}+{cost_b}={total}>>{total} dollars.\n"
            f"The change is {bill} - {total} = <<{bill}-{total}={bill - total}>>{bill - total} dollars.\n"
            f"#### {bill - total}")


def _travel(rng):
    vehicle, v, t, d = rng.choice(VEHICLES), rng.randint(10, 90), rng.randint(2, 9), rng.randint(5, 60)
    first = v * t
    return (f"A {vehicle} travels at {v} km per hour for {t} hours and then another {d} km. "
            f"How many km does it travel in total?\n"
            f"In {t} hours it travels {v} * {t} = <<{v}*{t}={first}>>{first} km.\n"
            f"In total it travels {first} + {d} = <<{first}+{d}={first + d}>>{first + d} km.\n"
            f"#### {first + d}")


def _sharing(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    friends, each, kept = rng.randint(2, 9), rng.randint(2, 25), rng.randint(1, 20)
    total, shared = friends * each + kept, friends * each
    return (f"{name} has {total} {thing}s, keeps {kept} and shares the rest equally among {friends} "
            f"friends. How many {thing}s does each friend get?\n"
            f"{name} shares {total} - {kept} = <<{total}-{kept}={shared}>>{shared} {thing}s.\n"
            f"Each friend gets {shared} / {friends} = <<{shared}/{friends}={each}>>{each} {thing}s.\n"
            f"#### {each}")


def _discount(rng):
    thing, percent = rng.choice(THINGS), rng.choice((10, 20, 25, 30, 40, 50, 75))
    step = 100 // math.gcd(percent, 100)          # the price is a multiple of this: whole dollars off
    price = step * rng.randint(1, 400 // step + 1)
    off = price * percent // 100
    return (f"A {thing} costs ${price}. It is sold at {percent}% off. What is the sale price in dollars?\n"
            f"The discount is {price} * {percent} / 100 = <<{price}*{percent}/100={off}>>{off} dollars.\n"
            f"The sale price is {price} - {off} = <<{price}-{off}={price - off}>>{price - off} dollars.\n"
            f"#### {price - off}")


def _linear(rng):
    a, x, b = rng.randint(2, 12), rng.randint(-20, 30), rng.randint(1, 50)
    c = a * x + b
    return (f"Solve for x: {a}x + {b} = {c}.\n"
            f"Subtract {b} from both sides: {a}x = {c} - {b} = <<{c}-{b}={a * x}>>{a * x}.\n"
            f"Divide both sides by {a}: x = {a * x} / {a} = <<{a * x}/{a}={x}>>{x}.\n"
            f"#### {x}")


def _arithmetic(rng):
    a, b, c = rng.randint(10, 999), rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(("+", "-"))
    product = b * c
    result = a + product if op == "+" else a - product
    return (f"Compute {a} {op} {b} * {c}.\n"
            f"Multiply first: {b} * {c} = <<{b}*{c}={product}>>{product}.\n"
            f"Then {a} {op} {product} = <<{a}{op}{product}={result}>>{result}.\n"
            f"#### {result}")


def _sequence(rng):
    start, diff, n = rng.randint(-20, 50), rng.randint(2, 15), rng.randint(4, 6)
    terms = [start + diff * i for i in range(n)]
    nxt = terms[-1] + diff
    return (f"What number comes next: {', '.join(map(str, terms))}, ...?\n"
            f"Each term is {diff} more than the one before: {terms[1]} - {terms[0]} = "
            f"<<{terms[1]}-{terms[0]}={diff}>>{diff}.\n"
            f"The next term is {terms[-1]} + {diff} = <<{terms[-1]}+{diff}={nxt}>>{nxt}.\n"
            f"#### {nxt}")


MATH_TEMPLATES = (_shopping, _travel, _sharing, _discount, _linear, _arithmetic, _sequence)
CALCULATION_PATTERN = r"<<([0-9+\-*/(). ]+)=(-?[0-9.]+)>>"    # <<expression=value>>
ANSWER_PATTERN = r"\n#### (-?[0-9]+)$"                         # a problem's last line, and its answer


def check_math(text):
    """True if every <<expr=value>> in `text` is right and '#### N' repeats the last value."""
    results = regex.findall(CALCULATION_PATTERN, text)
    answer = regex.search(ANSWER_PATTERN, text)
    if not results or answer is None or text.count("<<") != len(results):   # malformed markup
        return False
    # Only our own generated text comes here: the pattern keeps letters out, not ** (2**9**9 hangs)
    if any(abs(eval(expr, {"__builtins__": {}}) - float(value)) > 1e-9 for expr, value in results):
        return False
    return float(answer.group(1)) == float(results[-1][1])


def synthetic_math(n, seed):
    """`n` checked word problems and drills, a pure function of (n, seed)."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        text = rng.choice(MATH_TEMPLATES)(rng)
        if not check_math(text):
            raise AssertionError(f"a math template produced a wrong solution:\n{text}")
        problems.append(text)
    return problems


# --- Passkey retrieval: a long-context test that needs no downloads (§4, RULER-style) --------------
# A five-digit number hidden at some depth of a long, boring text, asked for at the end. A model that
# can use its whole context copies it; one whose positions break beyond its training length cannot.
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_example(enc, length, depth, key):
    """A prompt of exactly `length` tokens with "The pass key is KEY." hidden at `depth` (0.0 = the
    start of the filler, 1.0 = its end) and the question at the end -> (prompt ids, answer ids)."""
    needle = enc.encode_ordinary(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = enc.encode_ordinary(" What is the pass key? The pass key is")
    filler = enc.encode_ordinary(PASSKEY_FILLER)
    n_filler = length - len(needle) - len(question)
    if n_filler < 0:
        raise ValueError(f"a passkey prompt needs at least {len(needle) + len(question)} tokens, got {length}")
    filler = (filler * (n_filler // len(filler) + 1))[:n_filler]
    cut = round(depth * n_filler)
    return filler[:cut] + needle + filler[cut:] + question, enc.encode_ordinary(f" {key}")


# ------------------------------------------------------------------------------------------------
# Held-out validation split
# ------------------------------------------------------------------------------------------------
# A document goes to validation when a hash of its KEY falls in the lowest 5% (1 in 20). hashlib, not
# hash(): Python salts hash() per process. Code files and their docstrings share a key, so the
# docstrings of a held-out module are held out too: the "web" validation text never appeared inside
# a training code file. In a tiny corpus the rule is clamped so each source with 2+ documents has at
# least one validation document and at least one training document; a source of one document trains.
VAL_FRACTION = 0.05


def key_hash(key, salt=""):
    """A stable number in [0, 1) for a string key."""
    return int.from_bytes(hashlib.sha256((salt + key).encode("utf-8")).digest()[:8], "big") / 2 ** 64


def _val_keys(keys):
    keys = sorted(keys, key=key_hash)
    n_val = sum(key_hash(k) < VAL_FRACTION for k in keys)
    n_val = min(max(n_val, 1), len(keys) - 1)  # 0 for a single document: training needs it more
    return set(keys[:n_val])


def _documents(inputs, progress):
    """InputFiles -> {source: {split: [(key, text)] sorted by key}}; docstring files become their docstrings."""
    by_source = collections.defaultdict(list)
    for f in _progress(inputs, "reading documents", progress):
        text = _docstrings(f.text) if f.kind == "docstrings" else f.text
        if text.strip():
            by_source[f.source].append((f.key, text))
    docs = {}
    for source in SOURCES:
        if by_source[source]:
            val = _val_keys(key for key, _ in by_source[source])
            ordered = sorted(by_source[source])
            docs[source] = {"train": [d for d in ordered if d[0] not in val],
                            "val": [d for d in ordered if d[0] in val]}
    if not docs:
        raise DataError("no usable documents: every input file was empty, binary, non-UTF-8 or unreadable")
    return docs


# ------------------------------------------------------------------------------------------------
# Token caches: memory-mapped uint16 arrays, built once, rebuilt when anything they depend on changes
# ------------------------------------------------------------------------------------------------
# Per source and split, two files:  <source>.<split>.tokens.npy  (N,) uint16: all documents back to back
#                                   <source>.<split>.offsets.npy (D+1,) int64: document d is
#                                                                tokens[offsets[d]:offsets[d+1]]
# uint16 holds ids < 65536 (we have 4096) at half the size of int32. No <|endoftext|> is stored:
# separators and FIM sentinels are added when sequences are built. The folder's name is a hash of
# every input text, the tokenizer file and the settings below, so any change builds a new folder
# and an unchanged setup loads in a fraction of a second. Old folders are left in place (delete
# cache/ to reclaim the space). Files are written to a temporary name and
# renamed (atomic on one file system), the manifest last: a half-built folder is never used.

CACHE_VERSION = 1   # bump when a change to this file changes the documents or the cache layout


@dataclasses.dataclass
class TokenSplit:
    tokens: np.ndarray     # (N,) uint16, memory-mapped
    offsets: np.ndarray    # (D+1,) int64
    keys: list             # (D,) document keys, in the same order
    n_bytes: int           # UTF-8 bytes of the text these tokens encode

    def doc(self, i):
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


@dataclasses.dataclass
class Corpus:
    folder: Path
    train: dict            # source -> TokenSplit
    val: dict              # source -> TokenSplit (may hold 0 documents in a tiny corpus)
    skipped: dict          # reason -> number of --data input files skipped for it
    from_cache: bool       # True if loaded from an earlier build
    build_seconds: float   # time the build took (when it was built)

    @property
    def sources(self):
        """Sources with training tokens, in SOURCES order; the curriculum mixes only these."""
        return tuple(s for s in SOURCES if s in self.train and len(self.train[s].tokens) > 0)


TMP_MARK = ".tmp"  # write_atomically's temporary file for `path`: path + TMP_MARK + the writer's process id


def interrupted_writes(path):
    """The temporary files that write_atomically(path) calls killed mid-write (SIGKILL skips their
    clean-up) left: beside `path`, and beside the file it links to, where a link's writes go."""
    found = set()
    beside_link = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
    for written in {beside_link, os.path.realpath(path)}:  # both folders resolved: one folder is listed once
        folder, name = os.path.split(written)
        with contextlib.suppress(OSError):  # no such folder: nothing left there
            found.update(os.path.join(folder, entry) for entry in os.listdir(folder)
                         if entry.startswith(name + TMP_MARK) and entry[len(name + TMP_MARK):].isdigit())
    return sorted(found)


def write_atomically(path, write):
    """Create the file `path` so that a crash leaves either the old file or the new one, never half of
    one: write(tmp) fills a temporary file beside it, which then replaces `path` in a single rename.
    (The model's exports and train.py's checkpoints are written this way too.) The file keeps the
    permissions a plain open() gives a new file, even when `write` replaces it with one of its own:
    safetensors makes its files readable by their owner alone, and others on a shared machine could
    not load an export. A symbolic link stays one: the file it points at is replaced (a checkpoint
    linked to a larger disk, say, is not written beside the link)."""
    path = os.path.realpath(path)
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
    try:
        open(tmp, "wb").close()
        permissions = os.stat(tmp).st_mode
        write(tmp)
        os.chmod(tmp, permissions)
        with open(tmp, "rb+") as f:  # on the disk before the name points at it: after a power cut, a file
            os.fsync(f.fileno())     # renamed unsynced can come back empty on some file systems
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: no half-written file is left behind either
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _save_array(path, array):
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a bare name
            np.save(f, array)
    write_atomically(path, write)


def _progress(items, label, enabled):
    """Yield `items`, drawing a one-line bar on stderr: `label  [#######.......]  312/610`. Redrawn in
    place on a terminal; in a log file only the finished bar is written."""
    items = list(items)
    step = max(1, len(items) // 100)
    redraw = enabled and sys.stderr.isatty()
    for i, item in enumerate(items):
        if redraw and i % step == 0:
            bar = "#" * (30 * i // len(items))
            print(f"\r{label:<20} [{bar:<30}] {i}/{len(items)}", end="", file=sys.stderr, flush=True)
        yield item
    if enabled:
        print(f"\r{label:<20} [{'#' * 30}] {len(items)}/{len(items)}", file=sys.stderr, flush=True)


def _fingerprint(inputs, tokenizer_bytes):
    """What the token files depend on: the inputs, how documents are cut from them, and the tokenizer,
    which is its rank file and the pattern that splits text before the merges."""
    h = hashlib.sha256(repr((CACHE_VERSION, MIN_DOCSTRING_WORDS, VAL_FRACTION, SPLIT_PATTERN)).encode("utf-8"))
    h.update(hashlib.sha256(tokenizer_bytes).digest())
    for f in inputs:
        h.update(f"{f.source}\0{f.kind}\0{f.key}\0".encode("utf-8"))
        h.update(hashlib.sha256(f.text.encode("utf-8")).digest())
    return h.hexdigest()


def build_corpus(extra_dirs=(), cache_dir=None, progress=True, default_sources=True, tokenizer_path=TOKENIZER_FILE):
    """Harvest, tokenize and cache the corpus, or load it from the cache if nothing changed.

    extra_dirs:      folders of the user's own text (train.py --data DIR); see CODE_SUFFIXES for routing
    cache_dir:       where token files go (default: cache/ beside this file)
    progress:        draw progress bars on stderr while building
    default_sources: include the built-in corpus (stdlib, docstrings, synthetic math); tests turn it off
    Returns a Corpus: corpus.train[source] / corpus.val[source] are TokenSplits of memory-mapped tokens.
    Raises DataError if no usable text remains after skipping bad input (counted in corpus.skipped).
    """
    start = time.perf_counter()
    skipped = collections.Counter()
    inputs = (_default_inputs() if default_sources else []) + _user_inputs(extra_dirs, skipped)
    if not inputs:
        raise DataError(f"no usable input files ({describe_skipped(skipped) or 'no files at all'})")
    enc = load_tokenizer(tokenizer_path)  # first: a damaged rank file is named before any work
    tokenizer_bytes = Path(tokenizer_path).read_bytes()
    fingerprint = _fingerprint(inputs, tokenizer_bytes)
    folder = Path(cache_dir or DEFAULT_CACHE_DIR) / f"corpus-{fingerprint[:16]}"
    cached = _read_cache(folder, fingerprint)
    from_cache = cached is not None
    if not from_cache:  # never built, or damaged since
        _write_cache(folder, fingerprint, _documents(inputs, progress), enc, progress, start)
        cached = _read_cache(folder, fingerprint)
        if cached is None:
            raise DataError(f"{folder}: the token cache just written cannot be read back")
    splits, manifest = cached
    return Corpus(folder, splits["train"], splits["val"], dict(skipped), from_cache, manifest["build_seconds"])


def _read_cache(folder, fingerprint):
    """The cached (splits, manifest) of this fingerprint, or None when the folder holds no complete,
    readable build of it. The manifest is written last, so an interrupted build has none; a file
    truncated or damaged since (ids beyond the vocabulary, offsets that go backwards: what training
    would trip over) is caught here too, and the caller builds the cache again."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        if manifest["fingerprint"] != fingerprint:
            return None
        splits = {split: {} for split in ("train", "val")}
        for source, info in manifest["sources"].items():
            for split in splits:
                tokens = np.load(folder / f"{source}.{split}.tokens.npy", mmap_mode="r")
                offsets = np.load(folder / f"{source}.{split}.offsets.npy")
                if (len(offsets) != len(info[split]["keys"]) + 1 or offsets[0] != 0 or offsets[-1] != len(tokens)
                        or (np.diff(offsets) < 0).any() or (len(tokens) and tokens.max() >= N_RANKS)):
                    return None
                splits[split][source] = TokenSplit(tokens, offsets, info[split]["keys"], info[split]["bytes"])
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError):  # missing, truncated, foreign
        return None
    return splits, manifest


def _write_cache(folder, fingerprint, docs, enc, progress, start):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)
    manifest = {"fingerprint": fingerprint, "sources": {}}
    for source, splits in docs.items():
        manifest["sources"][source] = {}
        for split, split_docs in splits.items():
            label = f"tokenizing {source}/{split}"
            ids = [enc.encode_ordinary(text) for _, text in _progress(split_docs, label, progress)]
            offsets = np.zeros(len(ids) + 1, dtype=np.int64)
            np.cumsum([len(x) for x in ids], out=offsets[1:])
            tokens = np.fromiter((t for x in ids for t in x), dtype=np.uint16, count=int(offsets[-1]))
            _save_array(folder / f"{source}.{split}.tokens.npy", tokens)
            _save_array(folder / f"{source}.{split}.offsets.npy", offsets)
            manifest["sources"][source][split] = {"keys": [key for key, _ in split_docs],
                                                  "bytes": sum(len(text.encode("utf-8")) for _, text in split_docs)}
    manifest["build_seconds"] = round(time.perf_counter() - start, 1)
    write_atomically(folder / "manifest.json", lambda tmp: Path(tmp).write_text(json.dumps(manifest), encoding="utf-8"))


def describe_skipped(skipped):
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()) if n)


# ------------------------------------------------------------------------------------------------
# §3.2 Three-phase curriculum (Table 3) and §3.2.1 repetition
# ------------------------------------------------------------------------------------------------
# Each phase takes a share of the token budget and mixes web / code / math in fixed proportions.
# The report's numbers do not quite add up: the phase shares sum to 100.1% and phase 1's mixture to
# 99% (70/23/6), so both are normalised to 1 where they are used. FIM rates are from §3.2.2.

@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    share: float             # % of all training tokens (Table 3)
    mixture: dict            # % web / code / math (Table 3)
    fim_rate: float          # fraction of documents turned into FIM examples (§3.2.2; ours: of pieces)
    fim_code_only: bool      # phase 3 applies FIM to source-code files only


PHASES = (
    Phase("foundation",            58.0, {"web": 70, "code": 23, "math": 6},  fim_rate=0.5, fim_code_only=False),
    Phase("quality uplift",        26.2, {"web": 44, "code": 42, "math": 14}, fim_rate=0.1, fim_code_only=False),
    Phase("capability sharpening", 15.9, {"web": 23, "code": 59, "math": 18}, fim_rate=0.5, fim_code_only=True),
)
MAX_REPETITION = 4.0     # §3.2.1: no dataset is seen more than 4 times; beyond that gains stop


def phase_index(step, total_steps):
    """Index into PHASES of the phase that step `step` (0-based) of `total_steps` belongs to."""
    done, total, fraction = 0.0, sum(p.share for p in PHASES), step / total_steps
    for i, phase in enumerate(PHASES):
        done += phase.share / total
        if fraction < done:
            return i
    return len(PHASES) - 1


def phase_mixture(phase, sources=SOURCES):
    """{source: probability} for the sources present, normalised to sum to 1."""
    weights = {s: phase.mixture[s] for s in sources}
    total = sum(weights.values())
    return {s: w / total for s, w in weights.items()}


def plan_tokens(corpus, token_budget, phase=None):
    """[{source: tokens}] per phase: how a budget of `token_budget` training tokens is spent over the
    curriculum, or, with `phase` (an index into PHASES), all in that phase's mix."""
    shares = [p.share if phase in (None, i) else 0.0 for i, p in enumerate(PHASES)]
    return [{s: token_budget * share / sum(shares) * w for s, w in phase_mixture(p, corpus.sources).items()}
            for p, share in zip(PHASES, shares)]


def planned_repetition(corpus, token_budget, phase=None):
    """{source: epochs}: how many times the plan reads each source's training split."""
    plan = plan_tokens(corpus, token_budget, phase)
    return {s: sum(phase[s] for phase in plan) / len(corpus.train[s].tokens) for s in corpus.sources}


def check_repetition(corpus, token_budget, allow_over_repetition=False, phase=None):
    """Raise RepetitionError if the plan repeats a source more than MAX_REPETITION times."""
    over = {s: r for s, r in planned_repetition(corpus, token_budget, phase).items() if r > MAX_REPETITION}
    if over and not allow_over_repetition:
        worst = ", ".join(f"{s} {r:.1f}x" for s, r in over.items())
        raise RepetitionError(f"{token_budget:,} tokens would repeat {worst}, over the report's cap of "
                              f"{MAX_REPETITION:g}x (§3.2.1): add data, train fewer steps, or override the cap")


# ------------------------------------------------------------------------------------------------
# §3.2.2 Fill-in-the-middle
# ------------------------------------------------------------------------------------------------
# Cut a document at two uniformly random points into prefix / middle / suffix and move the middle to
# the end, so plain next-token training teaches the model to write a gap given the text on both sides.
#   PSM  <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle <|endoftext|>
#   SPM  <fim_suffix> suffix <fim_prefix> prefix <fim_middle> middle <|endoftext|>
# Our SPM is Mellum-4B's completion format (a sentinel before each part), not the SPM variant of
# Bavarian et al. 2022 that writes prefix and middle back to back. The report uses both orders 50/50.
# The cuts are at token positions of the cached tokens, not at characters: nothing is decoded and
# re-encoded per sample, and the three parts always reassemble into exactly the original tokens.
# The price: a gap always starts and ends on a token boundary of the whole-document tokenization,
# while a user's cursor may sit inside a token, and often does: "):\n" and ")\n" are single tokens,
# so most code lines end inside one. A prompt cut there (sample.py's FIM, evaluate.py's line
# completion) is a tokenization training never showed; cutting text, not tokens, would avoid it.

def fim_format(prefix, suffix, middle=(), spm=True, special=SPECIAL_TOKENS):
    """Token ids in PSM or SPM order, an int64 array; with no `middle` this is the prompt the model
    completes. The <|endoftext|> after the middle is not added here: the packer ends every document
    with one, FIM or not. `special` maps the sentinel strings to ids (another tokenizer's, for a
    released checkpoint)."""
    fim_prefix, fim_middle, fim_suffix = (special[t] for t in ("<fim_prefix>", "<fim_middle>", "<fim_suffix>"))
    if spm:
        parts = [[fim_suffix], suffix, [fim_prefix], prefix, [fim_middle], middle]
    else:
        parts = [[fim_prefix], prefix, [fim_suffix], suffix, [fim_middle], middle]
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


# The chat template (rendered as ids, never as text, so a user cannot type a role marker):
#   <|system|> text <|end|> <|user|> text <|end|>
#   <|assistant|> [<think> reasoning </think>] text [<tool_call> {json} </tool_call>] <|end|>
#   <|user|> <tool_response> result </tool_response> <|end|>        (a tool's answer, Qwen3's way)
# An Instruct model answers directly; a Thinking model first writes its reasoning between <think> tags.
# A tool's answer comes back in a user turn wrapped in <tool_response> text, as in Qwen3's template,
# which Mellum 2's architecture follows; the 16 special ids have no spare room for a tool role.

def render_message(enc, message, reasoning=True):
    """One message -> its ids, role marker first and <|end|> last. reasoning=False drops the
    message's "reasoning" (Instruct data, and turns before the last user message of a Thinking one)."""
    if message["role"] == "tool":
        reply = enc.encode_ordinary(f"<tool_response>{message['content']}</tool_response>")
        return [SPECIAL_TOKENS["<|user|>"], *reply, SPECIAL_TOKENS["<|end|>"]]
    ids = [SPECIAL_TOKENS[f"<|{message['role']}|>"]]
    if reasoning and message.get("reasoning"):
        ids += [SPECIAL_TOKENS["<think>"], *enc.encode_ordinary(message["reasoning"]), SPECIAL_TOKENS["</think>"]]
    ids += enc.encode_ordinary(message["content"])
    if message.get("tool_call"):
        ids += [SPECIAL_TOKENS["<tool_call>"], *enc.encode_ordinary(json.dumps(message["tool_call"])),
                SPECIAL_TOKENS["</tool_call>"]]
    return ids + [SPECIAL_TOKENS["<|end|>"]]


def render_chat(enc, messages, generation_prompt=True):
    """[{"role": "system" | "user" | "assistant" | "tool", "content": str, "reasoning": str (optional),
    "tool_call": dict (optional)}] -> token ids; with generation_prompt the ids end with <|assistant|>,
    where the model takes over."""
    ids = [i for message in messages for i in render_message(enc, message)]
    return ids + [SPECIAL_TOKENS["<|assistant|>"]] * generation_prompt


def render_training_chat(enc, messages, trained, reasoning):
    """The SFT form of a conversation: (ids, mask), mask[t] = 1 where ids[t] is a training target.
    `trained` and `reasoning` are sets of message indices: the assistant turns that carry loss and
    the ones whose reasoning is kept. A trained turn's targets are everything after its <|assistant|>
    marker up to and including its <|end|>: the marker itself is what the prompt ends with."""
    ids, mask = [], []
    for i, message in enumerate(messages):
        turn = render_message(enc, message, reasoning=i in reasoning)
        ids += turn
        mask += [0] + [int(i in trained)] * (len(turn) - 1)
    return ids, mask


def fim_prompt(prefix, suffix, spm=True, special=SPECIAL_TOKENS):
    """The FIM prompt for sample.py: (prefix ids, suffix ids) -> list of ids ending in <fim_middle>.

    SPM by default, the order Mellum-4B's completion prompt uses. The model then writes the middle and
    ends it with <|endoftext|>, exactly as in training.
    """
    return fim_format(prefix, suffix, spm=spm, special=special).tolist()


def fim_transform(tokens, rng, spm):
    """(n,) document tokens -> (n+3,) FIM example with two cut points drawn uniformly from 0..n."""
    a, b = np.sort(rng.integers(0, len(tokens) + 1, size=2))
    return fim_format(tokens[:a], tokens[b:], tokens[a:b], spm)


# ------------------------------------------------------------------------------------------------
# §3.3 Low-diversity filter and §3.4.6 best-fit packing: the batch sampler
# ------------------------------------------------------------------------------------------------
# The report drops every training sequence with fewer than 82 distinct tokens out of 8192 (1%), which
# removed its two early loss spikes; scaled to our sequence length that is ceil(seq_len / 100).

def min_unique_tokens(seq_len):
    return math.ceil(seq_len / 100)


def keep_sequence(row, seq_len):
    """The §3.3 filter: True if `row` has at least 1% distinct tokens."""
    return len(np.unique(row)) >= min_unique_tokens(seq_len)


@dataclasses.dataclass
class Batch:
    x: torch.Tensor    # (B, T) int64 inputs
    y: torch.Tensor    # (B, T) int64 next-token targets: y[:, t] == x[:, t+1]
    sources: tuple     # (B,) source of each row


class BatchSampler:
    """Training batches as a pure function of (seed, step): resuming at step N gives exactly the
    batches an uninterrupted run would have seen, with no sampler state to save.

    For each step: take the phase of Table 3 for this step; give each of the B rows a source drawn
    from that phase's mixture (a row holds one source only, so the mixture is exact per row); fill
    each source's rows with its documents by best-fit packing, with FIM at the phase's rate; drop
    rows that fail the 1%-unique filter and pack new ones.

    Long documents: a row holds seq_len + 1 tokens (x plus the one extra target), so every document
    is cut into pieces of at most seq_len - 3 tokens (room for 3 FIM sentinels and <|endoftext|>).
    The report's 8192-token sequences hold most files whole; at seq_len 256 a stdlib file is ~18
    pieces. FIM is applied per piece, so a FIM example is never split across rows. <|endoftext|>
    follows a plain piece only where its document ends: a cut inside a file is not an end, and a
    model taught that it is would learn to stop mid-file (a FIM example always ends with it, which
    is where its middle ends). A piece cut from inside a file leaves up to 4 tokens of its row free
    (the room kept for FIM's tokens), which a piece drawn later may fill: those few targets follow
    one document into another with no <|endoftext|> between. Pieces are drawn uniformly; a row's
    last piece is cut to fit, so a piece's first tokens are read a little more often than its last.
    """

    def __init__(self, corpus, seed, batch_size, seq_len, total_steps, allow_over_repetition=False, phase=None):
        """phase: an index into PHASES to use at every step instead of following the curriculum (the
        long-context stage trains on the phase-3 mix, §4.2)."""
        if seq_len < 8:
            raise ValueError(f"seq_len must be at least 8, got {seq_len}")
        check_repetition(corpus, total_steps * batch_size * seq_len, allow_over_repetition, phase)
        self.corpus, self.seed, self.total_steps, self.phase = corpus, seed, total_steps, phase
        self.batch_size, self.seq_len = batch_size, seq_len
        self.sources = corpus.sources
        self.pieces = {s: self._piece_table(corpus.train[s].offsets, seq_len - 3) for s in self.sources}

    @staticmethod
    def _piece_table(offsets, cap):
        """(P, 3) [start, end) of every piece, each document cut on a grid of `cap` tokens, and 1
        where the piece ends its document."""
        lengths = np.diff(offsets)
        n_pieces = -(-lengths // cap)                                    # (D,) ceil(length / cap)
        doc = np.repeat(np.arange(len(lengths)), n_pieces)               # (P,) document of each piece
        first = np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)      # (P,) its document's first piece
        starts = offsets[doc] + (np.arange(len(doc)) - first) * cap
        ends = np.minimum(starts + cap, offsets[doc + 1])
        return np.stack([starts, ends, ends == offsets[doc + 1]], axis=1)

    def _item(self, rng, source, fim_rate):
        """One document piece as it goes into a row: FIM or plain, then <|endoftext|> after a FIM
        example or the last piece of a document."""
        start, end, ends_document = self.pieces[source][rng.integers(len(self.pieces[source]))]
        piece = self.corpus.train[source].tokens[start:end].astype(np.int64)
        if rng.random() < fim_rate:
            return np.append(fim_transform(piece, rng, spm=rng.random() < 0.5), EOT)
        return np.append(piece, EOT) if ends_document else piece

    def _pack(self, rng, source, phase, n_rows):
        """Best-fit packing: n_rows rows of seq_len + 1 tokens from documents of one source.

        Why not concatenate-and-chunk: it cuts documents at every row boundary, and the next row
        then starts mid-document with its beginning out of sight; the report chose best-fit for
        less truncation and fewer hallucinations across documents. Best-fit puts each piece, in the
        order drawn, into the row with the least free space that still holds it, so rows fill
        almost exactly with whole pieces. When a piece fits nowhere, its start fills the emptiest
        row ("cut") and its rest is dropped, never continued in another row: every target is a real
        token and no padding is needed. The usual best-fit packing (Ding et al. 2024, "Fewer
        Truncations Improve Language Modeling") sorts a large buffer longest-first, which packs
        tighter but leaves short pieces unplaced more often; with short math problems next to long
        docstrings that would quietly shift the mixture, so here pieces are placed in draw order.
        """
        fim_rate = phase.fim_rate if source == "code" or not phase.fim_code_only else 0.0
        rows = [[] for _ in range(n_rows)]
        free = [(self.seq_len + 1, r) for r in range(n_rows)]       # (free space, row), sorted
        while free:
            tokens = self._item(rng, source, fim_rate)
            j = bisect.bisect_left(free, (len(tokens), -1))          # least free space that holds it
            if j == len(free):                                        # fits nowhere: cut it
                j = len(free) - 1
                tokens = tokens[:free[j][0]]
            space, r = free.pop(j)
            rows[r].append(tokens)
            if space > len(tokens):
                bisect.insort(free, (space - len(tokens), r))
        return rows

    def phase_at(self, step):
        """The Phase whose mixture and FIM rate step `step` uses."""
        return PHASES[phase_index(step, self.total_steps) if self.phase is None else self.phase]

    def sample(self, step):
        """The Batch for `step`; depends only on (seed, step) and the corpus."""
        rng = np.random.default_rng([self.seed, step])
        phase = self.phase_at(step)
        mixture = phase_mixture(phase, self.sources)
        row_source = rng.choice(len(self.sources), size=self.batch_size, p=list(mixture.values()))
        out = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for s, source in enumerate(self.sources):
            rows = np.flatnonzero(row_source == s)
            if len(rows) == 0:
                continue
            kept = []
            for _ in range(100):
                for row in self._pack(rng, source, phase, len(rows) - len(kept)):
                    tokens = np.concatenate(row)
                    if keep_sequence(tokens, self.seq_len):
                        kept.append(tokens)
                if len(kept) == len(rows):
                    break
            else:
                raise DataError(f"source {source!r}: 100 packings left rows that fail the 1%-unique-token filter")
            out[rows] = np.stack(kept)
        full = torch.from_numpy(out)
        return Batch(full[:, :-1].contiguous(), full[:, 1:].contiguous(),
                     tuple(self.sources[s] for s in row_source))

    def get_batch(self, step):
        """(x, y), two (B, T) int64 tensors with y the next-token targets of x."""
        batch = self.sample(step)
        return batch.x, batch.y


def val_batches(corpus, source, batch_size, seq_len, max_rows=None):
    """Validation batches (x, y) of one source, from its held-out split only; the same every call.

    No FIM, no packing: the split's documents, each followed by <|endoftext|>, are laid end to end
    and cut into rows of seq_len + 1 tokens, so the loss measures plain next-token prediction and is
    comparable between runs. With max_rows, the rows used are spread evenly over the whole split, and
    they are the same rows whatever the batch size.
    Yields nothing if the split, with its <|endoftext|> separators, holds fewer than seq_len + 1 tokens.
    """
    split = corpus.val.get(source)
    if split is None or len(split.tokens) == 0:
        return
    stream = np.insert(split.tokens.astype(np.int64), split.offsets[1:], EOT)   # (N + D,)
    n_rows = (len(stream) - 1) // seq_len
    n_used = n_rows if max_rows is None else min(n_rows, max_rows)
    starts = np.arange(n_used) * n_rows // max(n_used, 1) * seq_len
    for b in range(0, n_used, batch_size):
        rows = torch.from_numpy(np.stack([stream[s:s + seq_len + 1] for s in starts[b:b + batch_size]]))
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


# ------------------------------------------------------------------------------------------------
# The data report (python train.py --data-report)
# ------------------------------------------------------------------------------------------------

def data_report(corpus, token_budget, file=None, phase=None):
    """Print tokens per source and split, the plan per phase, and the planned repetition per source."""
    out = file or sys.stdout
    how = "loaded from cache" if corpus.from_cache else f"built in {corpus.build_seconds:.1f} s"
    print(f"corpus: {corpus.folder.name} ({how})", file=out)
    print(f"{'source':<6} {'split':<5} {'docs':>7} {'MB':>8} {'tokens':>12} {'bytes/token':>12}", file=out)
    for source in SOURCES:
        for split_name, splits in (("train", corpus.train), ("val", corpus.val)):
            if source in splits:
                s = splits[source]
                n = len(s.tokens)
                print(f"{source:<6} {split_name:<5} {len(s.keys):>7,} {s.n_bytes / 1e6:>8.2f} {n:>12,} "
                      f"{(s.n_bytes / n if n else 0):>12.2f}", file=out)
    missing = [s for s in SOURCES if s not in corpus.sources]
    if missing:
        print(f"no training text for: {', '.join(missing)} (the phase mixtures are renormalised without it)", file=out)
    if corpus.skipped:
        print(f"skipped input files: {describe_skipped(corpus.skipped)}", file=out)
    print(f"\nplan for {token_budget:,} training tokens (Table 3; shares and mixtures normalised to 100%)", file=out)
    plan, repetition = plan_tokens(corpus, token_budget, phase), planned_repetition(corpus, token_budget, phase)
    planned = [{s: f"{tokens[s]:,.0f}" for s in corpus.sources} for tokens in plan]
    repeated = {s: f"{repetition[s]:.2f}x" for s in corpus.sources}
    width = max(11, *(len(cell) for row in [*planned, repeated] for cell in row.values()))  # a 12B run's trillions
    print(f"{'phase':<24} {'share':>6} {'FIM':>12}" + "".join(f" {s:>{width}}" for s in corpus.sources), file=out)
    for spec, tokens, cells in zip(PHASES, plan, planned):
        fim = f"{spec.fim_rate:.0%}" + (" code" if spec.fim_code_only else " all")
        print(f"{spec.name:<24} {sum(tokens.values()) / token_budget:>6.1%} {fim:>12}"
              + "".join(f" {cells[s]:>{width}}" for s in corpus.sources), file=out)
    print(f"{'repetition (epochs)':<44}" + "".join(f" {repeated[s]:>{width}}" for s in corpus.sources)
          + f"   cap {MAX_REPETITION:g}x (§3.2.1)", file=out)
    over = [s for s in corpus.sources if repetition[s] > MAX_REPETITION]
    if over:
        print(f"OVER THE CAP: {', '.join(over)}", file=out)


# ------------------------------------------------------------------------------------------------
# Regenerating the committed tokenizer: python data.py --train-tokenizer
# ------------------------------------------------------------------------------------------------
# Training mix: ~10 MB of the default corpus's TRAINING documents (so validation bytes/token is
# honest), taken whole in a hash-shuffled order: 4 MB web, 4.5 MB code, 1.5 MB math. The result
# depends on the Python version's stdlib, which is why the rank file is committed rather than
# trained on first run: retrained elsewhere, most ids would move and cached tokens and checkpoints
# would no longer match.
TOKENIZER_MIX_BYTES = {"web": 4_000_000, "code": 4_500_000, "math": 1_500_000}


def tokenizer_training_texts(docs):
    texts = []
    for source, budget in TOKENIZER_MIX_BYTES.items():
        taken = 0
        for key, text in sorted(docs[source]["train"], key=lambda d: key_hash(d[0], salt="tokenizer:")):
            if taken >= budget:
                break
            texts.append(text)
            taken += len(text.encode("utf-8"))
    return texts


def train_tokenizer(path=TOKENIZER_FILE):
    """Retrain the BPE ranks on the default corpus's training mix and write them to `path`."""
    docs = _documents(_default_inputs(), progress=True)
    texts = tokenizer_training_texts(docs)
    start = time.perf_counter()
    ranks = train_bpe(texts, N_RANKS)
    seconds = time.perf_counter() - start
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_ranks(ranks, path)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"trained {len(ranks)} ranks (+{len(SPECIAL_TOKENS)} special = {len(ranks) + len(SPECIAL_TOKENS)}) "
          f"on {mb:.1f} MB in {seconds:.1f} s with Python {sys.version.split()[0]} -> {path}")


if __name__ == "__main__":
    usage = "usage: python data.py --train-tokenizer   (regenerates tokenizer/mellum2.tiktoken)"
    try:
        if sys.argv[1:] in (["-h"], ["--help"]):
            print(usage)
        elif sys.argv[1:] == ["--train-tokenizer"]:
            train_tokenizer()
        else:
            sys.exit("error: python data.py takes one flag, --train-tokenizer (it regenerates "
                     "tokenizer/mellum2.tiktoken)")
    except OSError as e:  # the rank file or the text cannot be written: a full disk, a read-only folder
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # save_ranks writes atomically: the committed file is as it was
        sys.exit("error: interrupted; tokenizer/mellum2.tiktoken is unchanged")
