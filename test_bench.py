"""
Tests of bench.py. A benchmark's figures are only as good as what it times against what, and the
arithmetic that turns times into ratios: each benchmark runs here on small shapes with its clock, or
its medians, scripted, so that every printed figure has one right value.
"""

import os
import re
import sys
import types
from dataclasses import replace

import pytest
import torch

import bench
import data
import sample
import train
from mellum2 import PRESETS, Mellum2
from test_mellum2 import SMALL, randomize


def scripted_medians(medians, run=()):
    """A stand-in for bench.time_interleaved that calls the candidates named in `run` once each (to
    see what they do) and returns the given medians, checking first that they are for exactly the
    candidates the benchmark passed."""
    def time_interleaved(steps, **candidates):
        assert list(candidates) == list(medians)
        for name in run:
            candidates[name]()
        return dict(medians)
    return time_interleaved


# -----------------------------------------------------------------------------------------------
# The helpers every benchmark uses

def test_bench_times_in_turn_and_compares_each_prompts_pair(monkeypatch):
    # A clock that advances only when a candidate runs: a takes 5 s on its first (warm-up) call, then 1,
    # 1 and 9 (a burst of load); b takes 2 s each time. Calls alternate a, b, a, b, ...
    clock, calls, costs = [0.0], [], {"a": iter([5.0, 1.0, 1.0, 9.0]), "b": iter([2.0] * 4)}
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def candidate(name):
        def call():
            calls.append(name)
            clock[0] += next(costs[name])
        return call
    medians = bench.time_interleaved(3, a=candidate("a"), b=candidate("b"))
    assert calls == ["a", "b"] * 4 and medians == {"a": 1.0, "b": 2.0}  # warm-up left out, medians not means
    # The median of each prompt's ratio: a burst on one pair drops out, and it says how many times faster.
    assert bench.paired_speedup([1.0, 2.0, 9.0], [1.0, 1.0, 1.0]) == 2.0
    assert bench.paired_speedup([4.0, 4.0, 40.0], [2.0, 1.0, 10.0]) == 4.0  # a ratio of medians would give 2
    assert bench.paired_speedup([2.0, 1.0, 4.0], [1.0, 2.0, 2.0]) == 2.0    # each run with its own prompt's


def test_the_reference_holds_our_weights_in_fp32():
    model = randomize(Mellum2(SMALL)).eval()
    hf = bench.as_transformers(model).eval()
    idx = torch.randint(0, SMALL.vocab_size, (2, 24))
    assert hf.dtype == torch.float32
    torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="the peak is read from Linux's /proc")
def test_peak_memory_is_what_ran_since_the_reset():
    block = b"\x01" * (300 * 2**20)  # a high peak long before (written, so resident)
    del block
    before = bench.peak_resident_kib(reset=True)
    block = b"\x01" * (50 * 2**20)
    del block
    assert 45 * 2**10 < bench.peak_resident_kib() - before < 150 * 2**10


def test_peak_memory_is_none_where_it_cannot_be_read(monkeypatch):
    def no_proc(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory")
    monkeypatch.setattr(bench, "open", no_proc, raising=False)
    assert bench.peak_resident_kib() is None and bench.peak_resident_kib(reset=True) is None


# -----------------------------------------------------------------------------------------------
# The benchmarks

def test_params_prints_each_presets_three_counts(capsys):
    bench.params()
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == set(PRESETS)
    tiny = Mellum2(PRESETS["tiny"])
    counts = [tiny.num_params(), tiny.num_params(active=True), tiny.num_params(include_mtp=True)]
    assert rows["tiny"] == [f"{c / 1e6:.2f}M" for c in counts] and len(set(rows["tiny"])) == 3


def test_model_benchmark_compares_the_same_work(monkeypatch, capsys):
    losses = {}

    class Recorded(Mellum2):  # each model's loss, by how it runs its experts and whether it has an MTP layer
        def forward(self, idx, targets=None, pad=None):
            logits, loss = super().forward(idx, targets, pad)
            losses[self.config.moe_impl, self.config.n_mtp] = loss.item()
            return logits, loss

    reference_calls, as_transformers = [], bench.as_transformers

    def recorded_reference(model, folder=None):
        hf = as_transformers(model, folder)
        hf.register_forward_pre_hook(lambda module, args, kwargs: reference_calls.append(kwargs), with_kwargs=True)
        return hf
    monkeypatch.setattr(bench, "Mellum2", Recorded)
    monkeypatch.setattr(bench, "as_transformers", recorded_reference)
    monkeypatch.setattr(bench, "time_interleaved", scripted_medians(
        {"transformers": 2.0, "ours": 1.0, "ours_loop_moe": 4.0, "ours_with_mtp": 1.0},
        run=("transformers", "ours", "ours_loop_moe")))
    bench.main(["model", "--batch", "2", "--steps", "1", "--experts", "4", "2"])
    out = capsys.readouterr().out
    assert out.startswith("tiny (E=4, K=2), batch 2 x 256 tokens")
    assert re.search(r"ours +512 tokens/s +2\.00x transformers", out)
    assert re.search(r"ours_loop_moe +128 tokens/s +0\.50x transformers", out)
    # The loop reference runs the same weights as ours, and transformers adds the balance loss as we do.
    assert losses["loop", 0] == pytest.approx(losses["grouped", 0], rel=1e-5)
    assert reference_calls and all(kwargs["output_router_logits"] is True for kwargs in reference_calls)


def test_train_benchmark_runs_each_recipe(monkeypatch, capsys):
    optimizers, clipped, build_optimizers = [], [], train.build_optimizers

    def recorded_optimizers(model, lr, optimizer="muon", **kwargs):
        optimizers.append(optimizer)
        return build_optimizers(model, lr, optimizer=optimizer, **kwargs)
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(train, "build_optimizers", recorded_optimizers)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, norm: clipped.append(norm) or clip(params, norm))
    monkeypatch.setattr(bench, "time_interleaved", scripted_medians(
        {"transformers_adamw": 4.0, "ours_adamw_no_mtp": 2.0, "ours_as_trained": 3.0, "dense_as_trained": 1.0,
         "dense_adamw": 0.5, "moe_adamw": 2.0}, run=("transformers_adamw",)))
    bench.main(["train", "--batch", "1", "--steps", "1"])
    out = capsys.readouterr().out
    assert re.search(r"ours_adamw_no_mtp +128 tokens/s +2\.00x transformers", out)
    assert "MoE / dense step time: 3.00x as trained, 4.00x with AdamW everywhere" in out
    # no MTP with AdamW (as transformers), MoE as trained, dense as trained, dense and MoE with AdamW
    assert optimizers == ["adamw", "muon", "muon", "adamw", "adamw"]
    assert clipped == [1.0]  # the reference step clips as train.py does


def test_pass_costs_replay_the_text_as_each_pass_meets_it(monkeypatch):
    model = randomize(Mellum2(SMALL)).eval()
    trunk_inputs, drafts, head_rows = [], [], []
    trunk, draft = model.trunk, model.draft

    def recorded_draft(h, next_idx, cache, positions):
        drafts.append((h.shape[1], next_idx.tolist(), positions.tolist()))
        return draft(h, next_idx, cache, positions)
    monkeypatch.setattr(model, "trunk", lambda idx, cache: trunk_inputs.append(idx.tolist()) or trunk(idx, cache))
    monkeypatch.setattr(model, "draft", recorded_draft)
    model.lm_head.register_forward_hook(lambda module, inputs, output: head_rows.append(inputs[0].shape[0]))
    costs = bench.speculative_pass_costs(model, [1, 2, 3], [4, 5, 6, 7, 8, 9])
    assert {name: len(seconds) for name, seconds in costs.items()} == {"plain": 4, "verify": 2, "draft": 4}
    # Prefill, then one token at a time; prefill again, then two at a time: the tokens decoding would feed.
    assert trunk_inputs == [[[1, 2, 3]], [[4]], [[5]], [[6]], [[7]], [[1, 2, 3]], [[4, 5]], [[6, 7]]]
    # Each draft reads the state at p (token 4 is at position 3) with the token at p + 1.
    assert drafts == [(1, [[5]], [[4]]), (1, [[6]], [[5]]), (1, [[7]], [[6]]), (1, [[8]], [[7]])]
    assert head_rows == [1, 1] * 4 + [2, 2]  # a verify pass ends in the head on both its tokens


def test_decode_benchmark_reports_each_ratio_of_the_right_runs(tmp_path, monkeypatch, capsys):
    """A scripted clock: transformers takes 4 s a prompt (3 with its MTP drafting), ours 2, 2 and 8,
    ours speculative 1; in the long-context comparison the trained configuration 1 s, the long one 2."""
    Mellum2(replace(SMALL, vocab_size=data.VOCAB_SIZE)).save_pretrained(tmp_path)
    clock, order, text = [0.0], [], [7, 8, 9]
    ours_costs = iter([2.0, 2.0, 8.0, 1.0, 1.0, 1.0])

    def runs(name, seconds, output):
        order.append(name)
        clock[0] += seconds
        return output

    class Reference:
        def eval(self):
            return self

        def generate(self, idx, use_mtp, **options):
            name = "transformers_mtp" if use_mtp else "transformers"
            return runs(name, 3.0 if use_mtp else 4.0, torch.cat([idx, torch.tensor([text])], dim=1))

    def generate(model, prompts, n, temperature):
        if model.config.max_seq_len == 131072:
            return runs("long", 2.0, [text])
        return runs("ours", next(ours_costs), [text])
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(bench, "as_transformers", lambda model, folder: Reference())
    monkeypatch.setattr(data, "build_corpus", lambda **options: None)
    monkeypatch.setattr(data, "val_batches", lambda corpus, source, rows, length, n: (
        (torch.arange(100 * i, 100 * i + length)[None], None) for i in range(n)))
    monkeypatch.setattr(sample, "generate", generate)
    monkeypatch.setattr(sample, "generate_speculative", lambda *args, **options: runs("ours_speculative", 1.0,
                                                                                      (text, 4, 3)))
    monkeypatch.setattr(bench, "speculative_pass_costs", lambda model, prompt, plain: {
        "plain": [0.001], "verify": [0.0012], "draft": [0.0003]})
    # a prompt and its new tokens that exactly fill the 64-token context
    argv = ["decode", "--init-from", str(tmp_path), "--prompts", "3", "--prompt-len", "61", "--new-tokens", "3"]
    bench.main(argv)
    out = capsys.readouterr().out
    assert re.search(r"transformers +0\.8 tokens/s +1\.00x transformers", out)
    assert re.search(r"ours +1\.5 tokens/s +2\.00x transformers", out)  # medians, and the median pair's ratio
    assert "speculative vs plain: ours 2.00x, transformers 1.33x; 9/12 of our drafts accepted (75%)" in out
    assert "plain step 1.00 ms, verify over 2 tokens 1.20 ms (1.20x), MTP draft 0.30 ms (0.30x)" in out
    assert "gains only above 50% acceptance" in out
    assert "at most 1.33x plain: 2 tokens for 1.50 plain steps" in out
    assert "instead of 64: 1.5 tokens/s, 0.50x the speed" in out
    # Each decoder takes each place in turn; then ours and the long configuration swap places from prompt
    # to prompt.
    decoders = ["transformers", "transformers_mtp", "ours", "ours_speculative"]
    assert order[:12] == decoders + decoders[1:] + decoders[:1] + decoders[2:] + decoders[:2]
    assert order[12:] == ["long", "ours", "ours", "long", "long", "ours"]
    # Outputs that differ are not reported as a speed.
    monkeypatch.setattr(sample, "generate_speculative", lambda *args, **options: ([7, 8, 0], 1, 1))
    ours_costs = iter([1.0] * 6)  # the first run took all the costs scripted
    with pytest.raises(AssertionError, match="outputs differ"):
        bench.main(argv)


def test_bench_prefill_compares_chunks_with_one_pass(monkeypatch, capsys):
    monkeypatch.setattr(sample, "PREFILL_CHUNK", 16)
    bench.main(["prefill", "--prompt-len", "40", "--steps", "1"])  # it also checks both give the same token
    out = capsys.readouterr().out
    assert "a 40-token prompt" in out and re.search(r"chunks of 16: [\d.]+ s; one pass: [\d.]+ s", out)
    assert sample.PREFILL_CHUNK == 16


def test_prefill_benchmark_reports_each_way_under_its_name(monkeypatch, capsys):
    chunks, generate = [], sample.generate

    def recorded_generate(model, prompts, n):
        chunks.append(sample.PREFILL_CHUNK)
        new = generate(model, prompts, n)
        assert model.config.max_seq_len == 41 and len(new[0]) == 1  # room for the one token after the prompt
        return new
    # Memory: each way's peak grows with its chunk, by a MiB a token.
    monkeypatch.setattr(bench, "peak_resident_kib",
                        lambda reset=False: 1000 + (0 if reset else sample.PREFILL_CHUNK * 2**10))
    monkeypatch.setattr(sample, "PREFILL_CHUNK", 16)
    monkeypatch.setattr(sample, "generate", recorded_generate)
    monkeypatch.setattr(bench, "time_interleaved", scripted_medians({"chunked": 1.0, "one_pass": 4.0},
                                                                    run=("chunked", "one_pass")))
    bench.main(["prefill", "--prompt-len", "40", "--steps", "1"])
    out = capsys.readouterr().out
    assert "chunks of 16: 1.00 s; one pass: 4.00 s; chunked is 4.00x as fast" in out
    assert "peak memory added: chunks of 16: 16 MiB; one pass: 40 MiB" in out
    assert chunks == [16, 40, 16, 40] and sample.PREFILL_CHUNK == 16
    monkeypatch.setattr(sample, "generate", lambda model, prompts, n: [[sample.PREFILL_CHUNK]])
    with pytest.raises(AssertionError, match="outputs differ"):
        bench.main(["prefill", "--prompt-len", "40", "--steps", "1"])


def test_kernel_benchmark_times_each_candidate_in_each_mode(monkeypatch, capsys):
    results = []  # per timing: what each candidate's call returned

    def time_interleaved(steps, **calls):  # the fallbacks take 2 ms, the others 1 ms
        results.append({name: call() for name, call in calls.items()})
        return {name: 0.002 if "(fallback)" in name else 0.001 for name in calls}
    monkeypatch.setattr(bench, "time_interleaved", time_interleaved)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bench.main(["kernels", "--steps", "1"])
    lines = capsys.readouterr().out.splitlines()
    fallback = [line for line in lines if "(fallback)" in line]
    assert fallback and all(re.search(r"forward +2\.00 ms +1\.00x +forward\+backward +2\.00 ms +1\.00x", line)
                            for line in fallback)
    others = [line for line in lines if line.startswith("  ") and "(fallback)" not in line and "ms" in line]
    assert others and all(re.search(r"forward +1\.00 ms +2\.00x +forward\+backward +1\.00 ms +2\.00x", line)
                          for line in others)
    # Each size is timed forward (the call returns the output), then forward+backward (it returns nothing),
    # and each candidate runs its own function: the window changes the output.
    sizes = [line for line in lines[1:] if not line.startswith(" ")]
    assert len(sizes) == 5 and len(results) == 2 * len(sizes)
    for forward, backward in zip(results[::2], results[1::2]):
        assert all(isinstance(out, torch.Tensor) for out in forward.values())
        assert all(out is None for out in backward.values())
    assert not torch.equal(results[0]["sdpa_attend (fallback)"], results[0]["sdpa causal, no window"])


# -----------------------------------------------------------------------------------------------
# The command line

@pytest.mark.parametrize("argv", [
    ["prefill", "--prompt-len", "0"], ["prefill", "--steps", "0"], ["model", "--threads", "0"],
    ["decode", "--prompt-len", "-5"], ["decode", "--new-tokens", "0"], ["decode", "--prompts", "0"],
    ["model", "--batch", "0"], ["train", "--steps", "0"], ["kernels", "--steps", "0"],
    ["model", "--experts", str(2**31), "2"],
])
def test_every_count_is_positive(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2 and "must be from 1 to 2**31 - 1" in capsys.readouterr().err


def test_decode_measures_the_quick_starts_model_by_default():
    assert bench.parse_args(["decode"]).init_from == "out/tiny"


def test_threads_are_set_up_to_the_machines_count(monkeypatch):
    monkeypatch.setattr(bench, "model", lambda args: None)
    threads = torch.get_num_threads()
    try:
        for n in (os.cpu_count(), 1):  # as many as the machine has is allowed
            bench.main(["model", "--threads", str(n)])
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("argv,message", [
    (["decode", "--new-tokens", "2"], "--new-tokens must be at least 3"),
    (["decode", "--init-from", "nowhere"], "nowhere: no such folder"),
    (["decode", "--threads", "100000"], f"--threads 100000: this machine has {os.cpu_count()} CPUs"),
    (["prefill", "--prompt-len", "10000000"], "--prompt-len 10000000: the one-pass prefill would need about 745,058"),
])
def test_bench_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("error,code,message", [
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"), 1,
     "error: out of memory (RuntimeError: DefaultCPUAllocator"),
    (OSError(28, "No space left on device"), 1, "error: No space left on device"),  # python bench.py > full disk
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_bench_stops_with_one_line(error, code, message, monkeypatch, capsys):
    def fail():
        raise error
    monkeypatch.setattr(bench, "params", fail)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["params"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == code and err.startswith(message) and len(err.splitlines()) == 1


def test_only_running_out_of_memory_is_told_as_such(monkeypatch, capsys):
    def out_of_memory(args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(bench, "train_steps", out_of_memory)
    with pytest.raises(SystemExit):
        bench.main(["train"])
    assert capsys.readouterr().err.strip().endswith(": a smaller --batch or --size needs less")

    def bug():
        raise RuntimeError("a bug of ours")
    monkeypatch.setattr(bench, "params", bug)
    with pytest.raises(RuntimeError, match="a bug of ours"):  # with its traceback, to be found
        bench.main(["params"])


def test_a_reader_that_goes_away_ends_it_quietly(monkeypatch):
    def reader_gone():
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(bench, "params", reader_gone)
    monkeypatch.setattr(train, "on_closed_pipe", lambda: sys.exit(41))
    with pytest.raises(SystemExit) as exit_info:  # python bench.py params | head
        bench.main(["params"])
    assert exit_info.value.code == 41
