"""
Benchmarks. Speed is reported as ratios measured in one run (ours against a reference on the same
machine, the two interleaved step by step so background load hits both alike), with medians.

  python bench.py params          # total and active parameter counts of every preset
  python bench.py model           # forward+backward tokens/s of a preset: ours vs transformers

On a shared machine set OMP_WAIT_POLICY=PASSIVE first: busy-waiting OpenMP threads distort timings.
"""

import argparse
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from mellum2 import PRESETS, Mellum2, Mellum2Config


def params():
    print(f"{'preset':<12} {'total':>10} {'active':>10} {'with MTP':>10}")
    for name, config in PRESETS.items():
        with torch.device("meta"):  # shapes only: the 12B model costs no memory here
            model = Mellum2(config)
        counts = [model.num_params(), model.num_params(active=True), model.num_params(include_mtp=True)]
        print(f"{name:<12} " + " ".join(f"{c / 1e6:>9.2f}M" for c in counts))


def time_interleaved(steps, **candidates):
    """Median seconds per call of each candidate, calling them in turn; the first round is warm-up."""
    times = {name: [] for name in candidates}
    for step in range(steps + 1):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            if step:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def model(args):
    import transformers  # the reference; only this benchmark and the tests need it

    torch.manual_seed(0)
    config = Mellum2Config.from_preset(args.size, **({"n_expert": args.experts[0], "n_expert_active": args.experts[1]}
                                                     if args.experts else {}))
    trunk = Mellum2(replace(config, n_mtp=0))  # the computation transformers' model does
    full = Mellum2(config)
    loop = Mellum2(replace(config, n_mtp=0, moe_impl="loop"))
    loop.load_state_dict(trunk.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        trunk.save_pretrained(tmp)
        hf = transformers.MellumForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    hf.train()
    B, T = args.batch, config.max_seq_len
    idx = torch.randint(0, config.vocab_size, (B, T))
    targets = torch.roll(idx, -1, dims=1)

    def ours(m):
        return lambda: m(idx, targets)[1].backward()

    def reference():  # next-token loss plus the router's balance loss, as in our trunk
        hf(idx, labels=idx, output_router_logits=True).loss.backward()

    seconds = time_interleaved(args.steps, transformers=reference, ours=ours(trunk), ours_loop_moe=ours(loop),
                               ours_with_mtp=ours(full))
    print(f"{args.size} (E={config.n_expert}, K={config.n_expert_active}), batch {B} x {T} tokens, "
          f"{torch.get_num_threads()} threads, fp32, forward+backward, median of {args.steps} steps")
    for name, s in seconds.items():
        print(f"  {name:<16} {B * T / s:>9.0f} tokens/s   {seconds['transformers'] / s:5.2f}x transformers")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("params", help="parameter counts of every preset")
    p = sub.add_parser("model", help="forward+backward speed against transformers' MellumForCausalLM")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"], help="preset to measure")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (each of the preset's length)")
    p.add_argument("--steps", type=int, default=7, help="timed steps per candidate")
    p.add_argument("--experts", type=int, nargs=2, metavar=("E", "K"),
                   help="override the expert count and top-k, e.g. 64 8 for the release's routing")
    args = parser.parse_args()
    params() if args.what == "params" else model(args)


if __name__ == "__main__":
    main()
