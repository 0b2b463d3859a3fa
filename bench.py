"""
Benchmarks. Speed is reported as ratios measured in one run (ours against a reference on the same
machine, the two interleaved step by step, or prompt by prompt, so background load hits both alike),
with medians.

  python bench.py params          # total and active parameter counts of every preset
  python bench.py model           # forward+backward tokens/s of a preset: ours vs transformers
  python bench.py train           # whole training steps: ours vs transformers + AdamW, MoE vs dense
  python bench.py decode          # decoding on a trained model: ours vs transformers, speculative vs plain,
                                  # what one plain, verify and draft pass costs, and what an unused long
                                  # context costs
  python bench.py prefill         # a long prompt into the KV cache in chunks (as sample.py) vs in one pass
  python bench.py kernels         # kernels.py's Triton kernels vs their PyTorch fallbacks (GPU), fallbacks (CPU)

On a shared machine set OMP_WAIT_POLICY=PASSIVE first: busy-waiting OpenMP threads distort timings.
"""

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import torch

import data
import mellum2
import sample
import train
from mellum2 import PRESETS, Mellum2, Mellum2Config


def params():
    print(f"{'preset':<12} {'total':>10} {'active':>10} {'with MTP':>10}")
    for name, config in PRESETS.items():
        with torch.device("meta"):  # shapes only: the 12B model costs no memory here
            model = Mellum2(config)
        counts = [model.num_params(), model.num_params(active=True), model.num_params(include_mtp=True)]
        print(f"{name:<12} " + " ".join(f"{c / 1e6:>9.2f}M" for c in counts))


def as_transformers(model, folder=None):
    """The same weights in transformers' MellumForCausalLM (the reference), through our export to
    `folder`, or to a temporary one. Drafting with generate(use_mtp=True) needs a folder that stays:
    transformers loads the MTP layer from the model's directory only when it starts drafting."""
    import transformers  # the reference; only the benchmarks and the tests need it

    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            return as_transformers(model, tmp)
    model.save_pretrained(folder)
    return transformers.MellumForCausalLM.from_pretrained(folder, dtype=torch.float32)


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
    torch.manual_seed(0)
    config = Mellum2Config.from_preset(args.size, **({"n_expert": args.experts[0], "n_expert_active": args.experts[1]}
                                                     if args.experts else {}))
    trunk = Mellum2(replace(config, n_mtp=0))  # transformers' model has no MTP layer (nor our z-loss)
    full = Mellum2(config)
    loop = Mellum2(replace(config, n_mtp=0, moe_impl="loop"))
    loop.load_state_dict(trunk.state_dict())
    hf = as_transformers(trunk).train()
    B, T = args.batch, config.max_seq_len
    idx = torch.randint(0, config.vocab_size, (B, T))
    targets = torch.roll(idx, -1, dims=1)

    def ours(m):
        return lambda: m(idx, targets)[1].backward()

    def reference():  # next-token loss plus the routers' balance loss (one term over the layers)
        hf(idx, labels=idx, output_router_logits=True).loss.backward()

    seconds = time_interleaved(args.steps, transformers=reference, ours=ours(trunk), ours_loop_moe=ours(loop),
                               ours_with_mtp=ours(full))
    print(f"{args.size} (E={config.n_expert}, K={config.n_expert_active}), batch {B} x {T} tokens, "
          f"{torch.get_num_threads()} threads, fp32, forward+backward, median of {args.steps} steps")
    for name, s in seconds.items():
        print(f"  {name:<16} {B * T / s:>9.0f} tokens/s   {seconds['transformers'] / s:5.2f}x transformers")


def train_steps(args):
    """Whole optimizer steps as train.py takes them (forward, backward, clipping, optimizers)."""

    torch.manual_seed(0)
    config = Mellum2Config.from_preset(args.size)
    B, T = args.batch, config.max_seq_len
    idx = torch.randint(0, config.vocab_size, (B, T))
    targets = torch.roll(idx, -1, dims=1)
    no_autocast = torch.autocast("cpu", enabled=False)

    def ours(config, optimizer="muon"):
        model = Mellum2(config)
        optimizers = train.build_optimizers(model, 1e-3, optimizer=optimizer)
        return lambda: train.train_step(model, idx, targets, B, optimizers, no_autocast)

    trunk = Mellum2(replace(config, n_mtp=0))
    hf = as_transformers(trunk).train()
    hf_adamw = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def reference():
        hf(idx, labels=idx, output_router_logits=True).loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_adamw.step()
        hf_adamw.zero_grad(set_to_none=True)

    dense = mellum2.dense_config(config)
    seconds = time_interleaved(
        args.steps, transformers_adamw=reference, ours_adamw_no_mtp=ours(replace(config, n_mtp=0), "adamw"),
        ours_as_trained=ours(config), dense_as_trained=ours(dense), dense_adamw=ours(dense, "adamw"),
        moe_adamw=ours(config, "adamw"))
    print(f"{args.size}, batch {B} x {T} tokens, {torch.get_num_threads()} threads, fp32, median of {args.steps} "
          f"steps; 'as trained' = MTP + Muon/AdamW as train.py runs it")
    for name, s in seconds.items():
        print(f"  {name:<20} {B * T / s:>9.0f} tokens/s   {seconds['transformers_adamw'] / s:5.2f}x transformers")
    print(f"  MoE / dense step time: {seconds['ours_as_trained'] / seconds['dense_as_trained']:.2f}x as trained, "
          f"{seconds['moe_adamw'] / seconds['dense_adamw']:.2f}x with AdamW everywhere")


def paired_speedup(reference, candidate):
    """How many times faster `candidate` is: the median over prompts of reference / candidate seconds
    on the same prompt. Each prompt's runs follow one another, so a burst of load from elsewhere on
    the machine lands on one pair, and the median over prompts drops that pair; a ratio of medians
    would compare runs minutes apart, and with speed varying from prompt to prompt, different prompts."""
    return statistics.median(r / c for r, c in zip(reference, candidate))


@torch.inference_mode()  # as sample.py decodes
def speculative_pass_costs(model, prompt, text):
    """Seconds of each pass speculative decoding is made of, replayed along `text` (the
    greedy continuation of `prompt`) so that each pass meets the experts real decoding meets: a plain
    step (the trunk over 1 new token, then the head), a verify step (over 2 tokens, the head on both)
    and a draft (the MTP layer over one (state, token) pair, and the head). After an accepted draft
    the speculative loop's MTP layer reads two pairs, which costs a little more (the first only leaves
    its keys and values): these are lower bounds."""
    costs = {"plain": [], "verify": [], "draft": []}
    for width, name in ((1, "plain"), (2, "verify")):
        cache = mellum2.KVCache(model.config, 1, model.config.max_seq_len)
        model.trunk(torch.tensor([prompt]), cache)
        for i in range(0, len(text) - 2, width):
            start = time.perf_counter()
            h, _ = model.trunk(torch.tensor([text[i:i + width]]), cache)  # (1, width, D)
            model.lm_head(h[0])
            costs[name].append(time.perf_counter() - start)
            if width == 1:  # h is the state at position p = len(prompt) + i; the MTP reads it with token p + 1
                start = time.perf_counter()
                model.draft(h, torch.tensor([text[i + 1:i + 2]]), cache, torch.tensor([[len(prompt) + i + 1]]))
                costs["draft"].append(time.perf_counter() - start)
    return costs


def decoding(args):
    """Greedy decoding on held-out code: ours vs transformers' generate on the same weights (plain and
    with its own MTP drafting), speculative vs plain decoding with the acceptance rate, and the cost of
    each kind of pass, which says what acceptance speculative decoding needs to pay."""
    if args.new_tokens < 3:  # fewer leave the replay of the passes below nothing to time
        raise ValueError(f"--new-tokens must be at least 3, got {args.new_tokens}")
    model, _ = sample.load_model(args.init_from, "cpu")
    if model.mtp is None:
        raise ValueError(f"{args.init_from} has no MTP layer to draft with: decode measures speculative decoding")
    if args.prompt_len + args.new_tokens > model.config.max_seq_len:
        raise ValueError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceed the model's "
                         f"{model.config.max_seq_len}-token context")
    corpus = data.build_corpus(progress=False)
    prompts = [x[0, :args.prompt_len].tolist()
               for x, _ in data.val_batches(corpus, "code", 1, model.config.max_seq_len, args.prompts)]
    export = tempfile.TemporaryDirectory()
    hf = as_transformers(model, export.name).eval()
    n = args.new_tokens
    drafts = accepted = 0

    def with_transformers(use_mtp):
        # With use_mtp, every generate() loads the MTP layer from the folder first (about 3% of a call
        # here): timed as transformers' API does it.
        def run(prompt):
            with torch.no_grad():
                return hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=0, use_mtp=use_mtp)[0, len(prompt):].tolist()
        return run

    def speculative(prompt):
        nonlocal drafts, accepted
        new, d, a = sample.generate_speculative(model, prompt, n, temperature=0)
        drafts, accepted = drafts + d, accepted + a
        return new

    decoders = {"transformers": with_transformers(False), "transformers_mtp": with_transformers(True),
                "ours": lambda prompt: sample.generate(model, [prompt], n, temperature=0)[0],
                "ours_speculative": speculative}
    times = {name: [] for name in decoders}
    passes = {"plain": [], "verify": [], "draft": []}
    for i, prompt in enumerate(prompts):
        # Each decoder takes each place in the order in turn: whichever runs first after another one's
        # weights went through the caches starts colder, and a fixed order would favour the others.
        order = list(decoders)[i % len(decoders):] + list(decoders)[:i % len(decoders)]
        outputs = {}
        for name in order:
            start = time.perf_counter()
            outputs[name] = decoders[name](prompt)
            times[name].append(time.perf_counter() - start)
        plain = outputs["ours"]
        assert all(out[:len(plain)] == plain for out in outputs.values()), "outputs differ"
        for name, seconds in speculative_pass_costs(model, prompt, plain).items():
            passes[name] += seconds
    export.cleanup()
    print(f"{len(prompts)} held-out code prompts of {args.prompt_len} tokens, {n} new tokens each, greedy, "
          f"batch 1, {torch.get_num_threads()} threads (outputs identical across all four)")
    for name, seconds in times.items():
        print(f"  {name:<18} {n / statistics.median(seconds):>8.1f} tokens/s   "
              f"{paired_speedup(times['transformers'], seconds):5.2f}x transformers")
    print(f"  speculative vs plain: ours {paired_speedup(times['ours'], times['ours_speculative']):.2f}x, "
          f"transformers {paired_speedup(times['transformers'], times['transformers_mtp']):.2f}x; "
          f"{accepted}/{drafts} of our drafts "
          f"accepted ({accepted / drafts:.0%})")
    # A speculative step costs a verify and a draft and yields 1 + (acceptance) tokens; a plain step
    # yields 1. In a MoE the verify's second token brings K experts of its own to read from memory.
    plain, verify, draft = (statistics.median(passes[k]) * 1e3 for k in ("plain", "verify", "draft"))
    print(f"  median pass: plain step {plain:.2f} ms, verify over 2 tokens {verify:.2f} ms ({verify / plain:.2f}x), "
          f"MTP draft {draft:.2f} ms ({draft / plain:.2f}x)")
    print(f"  speculative decoding gains only above {(verify + draft) / plain - 1:.0%} acceptance "
          f"(two-pair drafts after accepted ones and the loop's bookkeeping raise that bar further)")
    print(f"  and with every draft accepted would reach at most {2 * plain / (verify + draft):.2f}x plain: "
          f"2 tokens for {(verify + draft) / plain:.2f} plain steps")
    # A context that goes unused should cost nothing: the same weights configured for 131072
    # positions, the released model's context (RoPE left as trained), decode these short texts as
    # fast, because a full layer's cache holds only what the call can reach and attention reads only
    # its filled slots.
    long_context = Mellum2(replace(model.config, max_seq_len=131072)).eval()
    long_context.load_state_dict(model.state_dict())
    seconds = {"trained": [], "long": []}
    for i, prompt in enumerate(prompts):
        outputs = []
        for name, m in (("trained", model), ("long", long_context))[::1 if i % 2 else -1]:  # in turn, as above
            start = time.perf_counter()
            outputs.append(sample.generate(m, [prompt], n, temperature=0)[0])
            seconds[name].append(time.perf_counter() - start)
        assert outputs[0] == outputs[1], "outputs differ"
    print(f"  configured for 131072 positions instead of {model.config.max_seq_len}: "
          f"{n / statistics.median(seconds['long']):.1f} tokens/s, "
          f"{paired_speedup(seconds['trained'], seconds['long']):.2f}x the speed (identical outputs)")


def peak_resident_kib(reset=False):
    """The process's peak resident memory in KiB (Linux; None elsewhere). reset=True first lowers the
    peak to what is resident now, so that a later call sees the peak of what ran in between."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1))
    except OSError:
        return None


def prefill(args):
    """A long prompt into the KV cache as sample.py feeds it (sample.PREFILL_CHUNK tokens at a time)
    against all of it in one pass: time and peak memory, on the tiny preset stretched to the prompt's
    length (untrained weights: a prefill costs the same whatever they hold)."""
    # One pass holds (T, T) masks and attention weights: about 7 bytes an entry as measured here. The
    # system would kill the process outright on running out, with no message.
    train.check_fits(8 * args.prompt_len**2, f"--prompt-len {args.prompt_len}: the one-pass prefill")
    torch.manual_seed(0)
    config = Mellum2Config.from_preset("tiny", max_seq_len=args.prompt_len + 1)
    model = Mellum2(config).eval()
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,)).tolist()
    chunked, outputs = sample.PREFILL_CHUNK, {}

    def run(chunk, name):
        def call():
            sample.PREFILL_CHUNK = chunk
            outputs[name] = sample.generate(model, [prompt], 1)
        return call

    # Peaks first, chunked first: memory a run frees may stay with the process and serve the next
    # one unseen, which can only hide part of the larger peak, the one-pass run's.
    peaks = {}
    for name, chunk in (("chunked", chunked), ("one_pass", args.prompt_len)):
        before = peak_resident_kib(reset=True)
        run(chunk, name)()
        peaks[name] = before and peak_resident_kib() - before
    seconds = time_interleaved(args.steps, chunked=run(chunked, "chunked"), one_pass=run(args.prompt_len, "one_pass"))
    sample.PREFILL_CHUNK = chunked
    assert outputs["chunked"] == outputs["one_pass"], "outputs differ"
    print(f"tiny preset, a {args.prompt_len}-token prompt, fp32 on the CPU, {torch.get_num_threads()} threads, "
          f"median of {args.steps} interleaved rounds (the same next token both ways)")
    print(f"  chunks of {chunked}: {seconds['chunked']:.2f} s; one pass: {seconds['one_pass']:.2f} s; "
          f"chunked is {seconds['one_pass'] / seconds['chunked']:.2f}x as fast")
    if peaks["chunked"] is not None:
        print(f"  peak memory added: chunks of {chunked}: {peaks['chunked'] / 2**10:.0f} MiB; "
              f"one pass: {peaks['one_pass'] / 2**10:.0f} MiB")


def kernel_speed(args):
    """Each Triton kernel against the fallback the model runs without it (mellum2.sdpa_attend with
    the sliding-window mask; MoE.experts_grouped) and a plainer reference (causal SDPA without the
    window; the per-expert loop), forward and forward+backward. Without a GPU there is no Triton to
    time: the fallbacks and references are timed alone, at sizes a CPU finishes in a minute or two."""
    import kernels

    cuda = torch.cuda.is_available()
    triton = cuda and kernels.resolve_mode("auto") == "triton"
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    gpu_sizes = args.gpu_sizes or cuda
    # (B, T, window, H, Hkv, hd): the real model's 8192-token sequences with 32 query heads sharing 4
    # K/V heads of 128, on a sliding (window 1024) and a full layer; the CPU gets smaller sequences.
    attention_sizes = [(1, 8192, 1024, 32, 4, 128), (1, 8192, None, 32, 4, 128)] if gpu_sizes else \
        [(1, 256, 64, 4, 2, 64), (1, 1024, 256, 8, 2, 64), (1, 2048, 256, 8, 1, 64)]
    # (N, D, F, E, K): one 8192-token sequence (the release's micro-batch holds two) through one of
    # its MoE layers; on the CPU the tiny preset's layer and a narrower one with its 64-choose-8 routing.
    moe_sizes = [(8192, 2304, 896, 64, 8)] if gpu_sizes else [(1024, 256, 256, 16, 2), (1024, 256, 64, 64, 8)]
    print(f"{device}, {dtype}, {torch.get_num_threads()} threads, median of {args.steps} interleaved rounds; "
          f"ratios = fallback time / candidate time (above 1 = faster than the fallback)")
    if not triton:
        print("  no CUDA + triton here: timing the PyTorch fallbacks only (the Triton kernels need a GPU; "
              "under TRITON_INTERPRET=1 they run, slowly, only to be tested)")

    def synced(fn):  # GPU calls return before the work is done: wait for it inside the timed call
        return (lambda: (fn(), torch.cuda.synchronize())) if cuda else fn

    def report(title, fallback, candidates):
        """Time every candidate forward (no grad) and forward+backward (the gradient of the sum)."""
        print(title)
        rows = {}
        for mode in ("forward", "forward+backward"):
            calls = {}
            for name, (fn, inputs) in candidates.items():
                def call(fn=fn, inputs=inputs):
                    if mode == "forward":
                        with torch.no_grad():
                            return fn(*inputs)
                    out = fn(*inputs)
                    out.backward(torch.ones_like(out))
                calls[name] = synced(call)
            rows[mode] = time_interleaved(args.steps, **calls)
        for name in candidates:
            cells = [f"{rows[m][name] * 1e3:9.2f} ms {rows[m][fallback] / rows[m][name]:5.2f}x" for m in rows]
            print(f"  {name:<26} forward {cells[0]}   forward+backward {cells[1]}")

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    for B, T, window, H, Hkv, hd in attention_sizes:
        q, k, v = leaf(B, H, T, hd), leaf(B, Hkv, T, hd), leaf(B, Hkv, T, hd)
        positions = torch.arange(T, device=device)
        mask = None if window is None else mellum2.attention_mask(positions, positions, window)
        candidates = {"sdpa_attend (fallback)": (mellum2.sdpa_attend, (q, k, v, mask, window))}
        if window is not None:  # what the window would cost if it were free: plain causal SDPA
            candidates["sdpa causal, no window"] = (mellum2.sdpa_attend, (q, k, v, None, None))
        if triton:
            candidates["triton flash_attention"] = (kernels.flash_attention, (q, k, v, window))
        report(f"attention B={B} T={T} window={window} heads {H}/{Hkv} hd={hd}", "sdpa_attend (fallback)", candidates)

    for N, D, F_, E, K in moe_sizes:
        moe = mellum2.MoE(Mellum2Config(n_embd=D, expert_dim=F_, n_expert=E, n_expert_active=K)).to(device, dtype)
        for p in moe.parameters():
            torch.nn.init.normal_(p, 0.0, 0.02)
        x = leaf(N, D)
        with torch.no_grad():
            _, weights, experts = moe.route(x)
        candidates = {"experts_grouped (fallback)": (moe.experts_grouped, (x, weights, experts)),
                      "experts_loop (reference)": (moe.experts_loop, (x, weights, experts))}
        if triton:
            candidates["triton fused_moe"] = (lambda *a: kernels.fused_moe(*a, moe.gate_proj, moe.up_proj,
                                                                           moe.down_proj), (x, weights, experts))
        report(f"MoE N={N} tokens D={D} F={F_} E={E} top-{K}", "experts_grouped (fallback)", candidates)


def positive(text):
    """argparse type: an integer of at least 1 (every count here: a batch, steps, tokens, threads),
    below 2**31, so that products of them stay within torch's 64-bit sizes."""
    value = int(text)
    if not 1 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"must be from 1 to 2**31 - 1, got {value}")
    return value


def parse_args(argv=None):
    parser = train.ArgumentParser(__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("params", help="parameter counts of every preset")
    p = sub.add_parser("model", help="forward+backward speed against transformers' MellumForCausalLM")
    p.add_argument("--experts", type=positive, nargs=2, metavar=("E", "K"),
                   help="override the expert count and top-k, e.g. 64 8 for the release's routing")
    t = sub.add_parser("train", help="training-step speed: ours vs transformers + AdamW, and MoE vs dense")
    for q in (p, t):
        q.add_argument("--size", default="tiny", choices=["tiny", "small"], help="preset to measure")
        q.add_argument("--batch", type=positive, default=16, help="sequences per step (each of the preset's length)")
        q.add_argument("--steps", type=positive, default=7, help="timed steps per candidate")
    d = sub.add_parser("decode", help="decoding speed: ours vs transformers' generate, speculative vs plain")
    d.add_argument("--init-from", default=train.QUICK_START_RUN,
                   help=f"a trained run folder (default: {train.QUICK_START_RUN})")
    d.add_argument("--prompts", type=positive, default=10, help="held-out code prompts (default: 10)")
    d.add_argument("--prompt-len", type=positive, default=64, help="prompt tokens (default: 64)")
    d.add_argument("--new-tokens", type=positive, default=128, help="tokens to generate per prompt (default: 128)")
    f = sub.add_parser("prefill", help="a long prompt into the KV cache in chunks, as sample.py does, vs in one pass")
    f.add_argument("--prompt-len", type=positive, default=16384, help="prompt tokens (default: 16384)")
    f.add_argument("--steps", type=positive, default=3, help="timed rounds per candidate (default: 3)")
    k = sub.add_parser("kernels", help="Triton kernels vs their PyTorch fallbacks, forward and forward+backward")
    k.add_argument("--steps", type=positive, default=5, help="timed rounds per candidate")
    k.add_argument("--gpu-sizes", action="store_true",
                   help="the real model's sizes (T=8192, 64 experts of 896 at D=2304); automatic on CUDA")
    for q in (p, t, d, f, k):
        q.add_argument("--threads", type=positive, help="CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if getattr(args, "threads", None):
        if args.threads > (os.cpu_count() or 1):  # far more threads than cores: OpenMP can crash outright
            print(f"error: --threads {args.threads}: this machine has {os.cpu_count()} CPUs", file=sys.stderr)
            sys.exit(1)
        torch.set_num_threads(args.threads)
    try:
        train.check_stdout_open()
        {"params": params, "model": lambda: model(args), "train": lambda: train_steps(args),
         "decode": lambda: decoding(args),
         "prefill": lambda: prefill(args), "kernels": lambda: kernel_speed(args)}[args.what]()
    except (ValueError, mellum2.CheckpointError, data.DataError) as e:  # bad counts, a missing checkpoint or tokenizer
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (RuntimeError, MemoryError) as e:
        if not train.out_of_memory(e):
            raise
        advice = ": a smaller --batch or --size needs less" if args.what in ("model", "train") else ""
        print(f"error: out of memory ({train.one_line(e)[:160]}){advice}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # python bench.py params | head
        train.on_closed_pipe()
    except OSError as e:  # writing the results failed: a full disk behind the redirection
        print(f"error: {train.describe_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
