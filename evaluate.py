"""
Scoring a checkpoint without downloads: the report's evaluations (§3.7 pre-training, §5.3
post-training) in miniature, on held-out data this project never trains on.

    python evaluate.py --init-from out/tiny                     # a table on stdout
    python evaluate.py --init-from out/tiny-grpo-instruct --json results.json

What is measured, and on what:
  - validation loss and bits per byte, per source: 64 sequences spread over the held-out 5% of each
    source (data.py), those tiny's training validates on. Bits per byte divide out the tokenizer, so
    models with different vocabularies compare
  - FIM exact match: one whole line cut out of held-out standard-library code, filled in greedily
    from the code around it (the task Mellum is built for: completion inside a file)
  - synthetic math: held-out GSM-style problems from the math source, answered in the pre-training
    format ("#### N"); what a base model can be asked
  - the post-training suites (tasks.py): greedy accuracy on held-out math, code (pass@1, run in the
    sandbox) and tool tasks, in the chat template; what an SFT or RL model is asked
  - passkey retrieval at the model's full context (the long-context check of §4)
"""

import errno
import json
import math
import os
import random
import re
import sys
import time

import data
import kernels
import sample
import tasks
import train
from mellum2 import CheckpointError, pick_device


def loss_and_bits_per_byte(model, enc, corpus, source, seq_len, max_rows, batch_tokens=8192):
    """(mean next-token loss in nats, bits per byte) on a source's held-out split. Bits per byte:
    the summed loss in bits over the UTF-8 bytes of the text predicted (special tokens carry none).
    A forward takes about batch_tokens tokens: 8 rows of a 1024-token context, or one row of a
    long-context model's 131072, whose logits alone take 2 GiB (a training micro-batch of one
    holds as much)."""
    device = next(model.parameters()).device
    loss = train.validation_loss(model, corpus, source, max(1, batch_tokens // seq_len), seq_len, max_rows, device)
    if loss is None:
        return math.nan, math.nan
    n_tokens, n_bytes = 0, 0
    for _, y in data.val_batches(corpus, source, 64, seq_len, max_rows):  # the same rows, for their text
        n_tokens += y.numel()
        n_bytes += len(enc.decode_bytes([t for t in y.flatten().tolist() if t < data.N_RANKS]))
    return loss, loss * n_tokens / math.log(2) / n_bytes


def fim_examples(enc, corpus, n, budget, seed=0):
    """n FIM line-completion problems from held-out code (fewer if it has fewer lines), each line a
    different one: (prompt ids, the line). The line has 4 or more characters between its indent
    and its trailing spaces; the prompt keeps the nearest code around it within `budget` tokens,
    3/4 before."""
    split = corpus.val.get("code")
    files = [enc.decode(split.doc(d).tolist()).split("\n") for d in range(len(split.offsets) - 1)] if split else []
    candidates = [(f, i) for f, lines in enumerate(files) for i, line in enumerate(lines) if len(line.strip()) >= 4]
    examples = []
    for f, i in random.Random(seed).sample(candidates, min(n, len(candidates))):
        lines = files[f]
        prefix = enc.encode_ordinary("".join(line + "\n" for line in lines[:i]))[-(3 * budget // 4):]
        suffix = enc.encode_ordinary("\n" + "\n".join(lines[i + 1:]))[:budget // 4]
        examples.append((data.fim_prompt(prefix, suffix), lines[i]))
    return examples


def fim_exact_match(model, enc, examples, max_new_tokens=48):
    """Fraction of lines the model writes exactly (leading and trailing whitespace aside)."""
    if not examples:
        return math.nan
    outputs = sample.generate(model, [prompt for prompt, _ in examples], max_new_tokens, stop_ids={data.EOT})
    written = [data.text_of(enc, out) for out in outputs]
    return sum(text.strip() == line.strip() for text, (_, line) in zip(written, examples)) / len(examples)


def synthetic_math_accuracy(model, enc, corpus, n, max_new_tokens=128):
    """Held-out generated problems: the question line as the prompt, right when the first "#### N"
    in the worked solution the model writes has the right N. The generator's longest worked
    solution is 122 tokens. Drills repeat (the same small equation comes up more than once in 10,000
    problems), so a held-out problem that is also a training document is left out."""
    split, training, problems = corpus.val.get("math"), corpus.train.get("math"), []
    trained = {training.doc(i).tobytes() for i in range(len(training.offsets) - 1)} if training else set()
    for i in range(len(split.offsets) - 1 if split else 0):
        if split.doc(i).tobytes() in trained:
            continue
        text = enc.decode(split.doc(i).tolist())
        answer = re.search(data.ANSWER_PATTERN, text)
        if answer:
            problems.append((enc.encode_ordinary(text[:text.index("\n") + 1]), answer.group(1)))
        if len(problems) == n:
            break
    if not problems:
        return math.nan
    outputs = sample.generate(model, [p for p, _ in problems], max_new_tokens, stop_ids={data.EOT})
    found = [re.search(r"#### (-?\d+(?:\.\d+)?)", data.text_of(enc, out)) for out in outputs]
    return sum(bool(f) and f.group(1) == answer for f, (_, answer) in zip(found, problems)) / len(problems)


# A FIM prompt of 64 tokens and room for its middle, and the Instruct chat tasks' prompts and answers
# (a Thinking model's longest conversations, up to 145 tokens, are cut at a context this short).
MIN_CONTEXT = 128


def evaluate(model, corpus, n=64, max_rows=64):
    """Every score above -> one flat dict (what --json writes)."""
    enc, seq_len, results = data.load_tokenizer(), model.config.max_seq_len, {}
    if seq_len < MIN_CONTEXT:
        raise ValueError(f"the model's context ({seq_len} tokens) is too short for this evaluation, "
                         f"which needs {MIN_CONTEXT}")
    for source in corpus.sources:
        loss, bpb = loss_and_bits_per_byte(model, enc, corpus, source, seq_len, max_rows)
        results[f"val_loss/{source}"], results[f"bits_per_byte/{source}"] = loss, bpb
    results["fim_exact_match"] = fim_exact_match(model, enc, fim_examples(enc, corpus, n, seq_len - 64))
    results["synthetic_math"] = synthetic_math_accuracy(model, enc, corpus, n)
    chat = train.evaluate_tasks(model, n, train.MAX_ANSWER_TOKENS["thinking"])
    results.update({f"tasks/{suite}": chat[suite] for suite in tasks.SUITES})
    # passkeys at the model's full context (less room for the answer's few tokens)
    results["passkey"] = train.passkey_accuracy(model, enc, seq_len - 8, min(n, 16), random.Random(0))
    return results


def print_table(results, file=None):
    width = max(map(len, results))
    for name, value in results.items():
        shown = f"{value:.3f}" if name.startswith(("val_loss", "bits_per_byte")) else f"{value:.1%}"
        shown = "-" if math.isnan(value) else shown
        print(f"{name:<{width}}  {shown:>8}", file=file)


def parse_args(argv=None):
    p = train.ArgumentParser(__doc__)
    p.add_argument("--init-from", default=train.QUICK_START_RUN,
                   help="a train.py run folder, or a Hugging Face directory of ours (exported with save_pretrained)")
    p.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    p.add_argument("--n", type=int, default=64, help="problems per task (default 64)")
    p.add_argument("--device", help="cpu, cuda, mps (default: the best available)")
    kernels.add_kernels_flag(p)
    return p.parse_args(argv)


MAX_N = 1000  # each task's problems are decoded as one batch, so memory grows with --n


def main(argv=None):
    args = parse_args(argv)
    try:
        if not 1 <= args.n <= MAX_N:
            raise ValueError(f"--n must be between 1 and {MAX_N}, got {args.n}")
        if args.json is not None:
            # The folder checked is the one written in: a link's target's (see data.write_atomically).
            name, folder = os.path.basename(os.path.abspath(args.json)), os.path.dirname(os.path.realpath(args.json))
            if not name.endswith(".json") or name == "config.json" or not os.path.isdir(folder) \
                    or os.path.isdir(args.json):
                raise ValueError(f"--json {args.json}: give a .json file (not config.json) in an existing folder")
            if not os.access(folder, os.W_OK):  # found now, not after minutes of evaluation
                raise ValueError(f"--json {args.json}: cannot write in {folder}")
        else:  # the table is the only output
            train.check_stdout_open()
        kernels.resolve_mode(args.kernels, pick_device(args.device))  # before the model is loaded
        model, vocab = sample.load_model(args.init_from, args.device)
        kernels.install(model, args.kernels)
        if isinstance(vocab.enc, sample.HFTokenizer):
            raise ValueError("evaluate.py scores models that speak this project's tokenizer")
        corpus = data.build_corpus(progress=False)
        started = time.time()
        results = evaluate(model, corpus, args.n)
    except (ValueError, CheckpointError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # the corpus cache cannot be written: a read-only checkout, a full disk
        print(f"error: {train.describe_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    except (RuntimeError, MemoryError) as e:
        if not train.out_of_memory(e):
            raise
        advice = ": a smaller --n decodes fewer problems at once" if args.n > 1 else ""
        print(f"error: out of memory ({train.one_line(e)[:160]}){advice}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    # Each output is tried whatever became of the other: a full disk must not lose the table, nor a
    # closed terminal the JSON file.
    failed, reader_gone = None, False
    if args.json is not None:
        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1)
        try:
            data.write_atomically(args.json, write)
        except OSError as e:
            failed = f"cannot write {args.json}: {e.strerror or e}"
    try:
        if sys.stdout is None:  # closed from the start (`>&-`): refused up front unless --json
            raise OSError(errno.EBADF, "it is closed")
        print(f"{args.init_from}: {time.time() - started:.0f} s")
        print_table(results)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: not an error of ours, but the JSON's still is
        reader_gone = True
    except OSError as e:
        failed = failed or f"cannot write the results to the standard output: {e.strerror or e}"
    if failed:
        print(f"error: {failed}", file=sys.stderr)
    if reader_gone:
        train.on_closed_pipe()
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
