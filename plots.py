"""
Pictures of a run, written as PNG files in a folder beside its metrics (matplotlib is optional:
nothing else in the project needs it; pip install matplotlib).

    python plots.py out/tiny                  # pre-training: loss parts, learning rate, expert load
    python plots.py out/tiny-sft-instruct     # SFT: the same, and held-out accuracy per suite
    python plots.py out/tiny-long             # after train.py --stage long --compare: the YaRN comparison
    python plots.py out/tiny-grpo-instruct    # GRPO: answers right per suite and held-out accuracy

Each command prints the files it wrote (FOLDER/plots/*.png).
"""

import math
import os
import sys

import tasks
import train


def read_metrics(folder):
    path = os.path.join(folder, "metrics.jsonl")
    if os.path.isfile(folder):
        raise ValueError("a file, where a train.py run folder belongs")
    if not os.path.isdir(folder):
        raise ValueError("no such folder")
    if not os.path.isfile(path):
        raise ValueError("no metrics.jsonl in it (a train.py run folder has one)")
    records = [record for _, record in train.metrics_lines(path)]  # a line cut short by a crash is skipped
    if not records:
        raise ValueError("its metrics.jsonl holds no step's record yet")
    return records


def series(records, key, inner=None):
    """(steps, values) of one logged number, or of one entry of a logged dict (inner). A value that
    is no finite number (an edited file's) is left out: matplotlib would plot text as categories."""
    points = [(r["step"], r[key] if inner is None else r[key][inner]) for r in records
              if key in r and (inner is None or inner in r[key])]
    points = [(step, v) for step, v in points if type(v) in (int, float) and math.isfinite(v)]
    return [p[0] for p in points], [p[1] for p in points]


def post_training(records):
    """Whether "val" holds held-out accuracy per task suite (SFT and GRPO, train.evaluate_tasks, which
    always adds the reflection-word rate) rather than validation loss per source (pre-training)."""
    return any("reflection_words" in r.get("val", {}) for r in records)


def held_out_accuracy(ax, records, xlabel):
    for suite in tasks.SUITES:
        ax.plot(*series(records, "val", suite), "o-", label=suite)
    ax.set(title="held-out greedy accuracy", xlabel=xlabel, ylim=(-0.05, 1.05))
    ax.legend()


def training_figures(records, plt):
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for part in ("ntp", "mtp", "aux", "z"):
        axes[0, 0].plot(*series(records, part), label=part)
    if not post_training(records):
        for source in sorted({s for r in records for s in r.get("val", {})}):
            axes[0, 0].plot(*series(records, "val", source), "o--", label=f"validation {source}")
    axes[0, 0].set(title="loss parts (§2.1.5, §3.4.5)", xlabel="step", yscale="log")
    axes[0, 1].plot(*series(records, "lr"))
    schedule = "warmup, then a cosine (§5.1.2)" if post_training(records) else "Warmup-Hold-Decay (§3.4.2)"
    axes[0, 1].set(title=f"learning rate: {schedule}", xlabel="step")
    axes[1, 0].plot(*series(records, "expert_balance"))
    axes[1, 0].axhline(1.0, color="grey", linestyle=":")
    axes[1, 0].set(title="expert load: busiest / mean (1 = balanced)", xlabel="step")
    axes[1, 1].plot(*series(records, "grad_norm"))
    axes[1, 1].set(title="gradient norm before clipping", xlabel="step", yscale="log")
    axes[0, 0].legend(fontsize=7)
    if not post_training(records):
        return {"training": fig}
    accuracy_fig, ax = plt.subplots(figsize=(5.5, 4))
    held_out_accuracy(ax, records, "step")
    return {"training": fig, "held_out": accuracy_fig}


def grpo_figures(records, plt):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for suite in tasks.SUITES:
        left.plot(*series(records, "suite_accuracy", suite), label=suite)
    left.set(title="sampled answers fully right, per suite", xlabel="batch")
    left.legend()
    held_out_accuracy(right, records, "batch")
    return {"grpo": fig}


def rope_figures(table, plt):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for variant, results in table.items():
        lengths = sorted(results)
        left.plot(lengths, [results[n][0] for n in lengths], "o-", label=variant)
        right.plot(lengths, [results[n][1] for n in lengths], "o-", label=variant)
    for ax, title in ((left, "held-out code loss"), (right, "passkey accuracy")):
        ax.set(title=title, xlabel="context (tokens)", xscale="log")
    left.legend()
    fig.suptitle("§4.1 Layer-Selective YaRN, in miniature")
    return {"rope_variants": fig}


def parse_args(argv=None):
    p = train.ArgumentParser(__doc__)
    p.add_argument("folder", help="a train.py run folder, or a --stage long --compare folder")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")   # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: plots need matplotlib (pip install matplotlib); nothing else does", file=sys.stderr)
        sys.exit(1)
    try:
        table = train.rope_comparison(args.folder)
        if table:
            figures = rope_figures(table, plt)
        else:
            records = read_metrics(args.folder)
            figures = (grpo_figures if any("reward" in r for r in records) else training_figures)(records, plt)
        os.makedirs(os.path.join(args.folder, "plots"), exist_ok=True)
        for name, fig in figures.items():
            path = os.path.join(args.folder, "plots", f"{name}.png")
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            print(path)
    except (ValueError, KeyError, IndexError, TypeError) as e:  # not a run folder, or an edited or foreign metrics file
        why = " ".join(str(e).split()) if isinstance(e, ValueError) else train.one_line(e)
        print(f"error: {args.folder}: cannot plot it ({why})", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a file where the plots folder goes, no permission, a full disk
        print(f"error: {train.describe_os_error(e)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
