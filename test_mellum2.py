"""Tests for mellum2, in the order of the files: the model, the data, pre-training. Each compares
against something we did not write where one exists (transformers' MellumForCausalLM,
torch.optim.Muon, brute-force loops, hand computations) and would fail if the thing were wrong.
Run: python -m pytest -q"""

import collections
import contextlib
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types
import unittest.mock
import weakref
from dataclasses import replace

import numpy as np
import pytest
import regex
import torch
import torch.nn.functional as F
import transformers  # the reference (requirements.txt installs it): without it the suite must fail, not skip

import data
import evaluate
import kernels
import mellum2
import sample
import train
from mellum2 import (IGNORE_INDEX, CheckpointError, KVCache, Mellum2, Mellum2Config, RMSNorm,
                     apply_rope, attention_mask, load_balancing_loss, rope_inv_freq)


# A small config with every structural feature: 3:1 sliding/full, GQA groups of 2, 8 experts top-2.
SMALL = Mellum2Config(vocab_size=256, n_layer=4, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, n_expert=8,
                      n_expert_active=2, expert_dim=32, sliding_window=8, max_seq_len=64)


def randomize(model, seed=0):
    """Every parameter random, norm gains included: with unit gains some mistakes cancel (RMSNorm
    commutes with a rotation, so QK-norm before or after RoPE would look the same)."""
    g = torch.Generator().manual_seed(seed)
    gains = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in gains:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def hf_config(config):
    """The transformers MellumConfig for one of ours, built by hand from transformers' own names."""
    rope_full = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.yarn_factor != 1.0:
        rope_full = {"rope_type": "yarn", "rope_theta": config.rope_theta, "factor": config.yarn_factor,
                     "original_max_position_embeddings": config.yarn_original_max_seq_len}
    plain = {"rope_type": "default", "rope_theta": config.rope_theta}
    rope_sliding = rope_full if config.yarn_layers == "all" else plain
    return transformers.MellumConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head, head_dim=config.head_dim,
        num_experts=config.n_expert, num_experts_per_tok=config.n_expert_active,
        moe_intermediate_size=config.expert_dim, sliding_window=config.sliding_window,
        layer_types=config.layer_types, max_position_embeddings=config.max_seq_len,
        rope_parameters={"full_attention": rope_full, "sliding_attention": rope_sliding},
    )


def random_configs():
    """A few random small configs: head grouping, window, layer pattern, YaRN and the norms' eps all
    vary (every pattern has a full layer within 4 layers, so YaRN always acts somewhere)."""
    g = torch.Generator().manual_seed(1234)
    pick = lambda options: options[torch.randint(len(options), (1,), generator=g).item()]  # noqa: E731
    configs = []
    # 12 experts in two of them: the checkpoint lists experts.10 before experts.2, and they must still
    # be stacked by number.
    for yarn, layers, n_expert in ((1.0, "full", 4), (1.0, "full", 12), (4.0, "full", 8), (4.0, "full", 12),
                                   (4.0, "all", 4)):
        n_kv = pick([1, 2, 4])
        configs.append(replace(SMALL, n_kv_head=n_kv, n_head=n_kv * pick([1, 2, 4]), n_layer=pick([4, 5]),
                               sliding_window=pick([3, 8, 16]), attn_pattern=pick(["SSSF", "SF", "FS"]),
                               n_expert=n_expert, n_expert_active=pick([1, 2, 3]), yarn_factor=yarn,
                               yarn_original_max_seq_len=16 if yarn > 1 else 8192, yarn_layers=layers,
                               rms_norm_eps=pick([1e-6, 1e-5, 1e-2])))
    return configs


def config_id(c):
    return f"yarn{c.yarn_factor}{c.yarn_layers}-{c.attn_pattern}"


def logits_of_hf(model_dir, idx):
    hf = transformers.MellumForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(idx).logits


# -----------------------------------------------------------------------------------------------
# Equality with transformers' MellumForCausalLM, both ways

@pytest.mark.parametrize("config", random_configs(), ids=config_id)
def test_hf_weights_into_ours_match_hf(config, tmp_path):
    torch.manual_seed(0)
    hf = transformers.MellumForCausalLM(hf_config(config)).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    ours = Mellum2.from_pretrained(tmp_path, device="cpu", dtype=torch.float32).eval()
    idx = torch.randint(0, config.vocab_size, (2, 3 * config.sliding_window + 5))  # longer than the window
    with torch.no_grad():
        expected = hf(idx).logits
        got, _ = ours(idx)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("config", random_configs(), ids=config_id)
def test_ours_exported_into_hf_match_ours(config, tmp_path):
    torch.manual_seed(0)
    ours = randomize(Mellum2(config)).eval()
    ours.save_pretrained(tmp_path, max_shard_bytes=100_000)  # several shards and an index file
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    idx = torch.randint(0, config.vocab_size, (2, 3 * config.sliding_window + 5))
    with torch.no_grad():
        got, _ = ours(idx)
    assert (got - logits_of_hf(tmp_path, idx)).abs().max().item() < 1e-5
    # ... and back: our own loader reads our export exactly, the MTP layer included.
    again = Mellum2.from_pretrained(tmp_path, device="cpu")
    assert again.config == ours.config
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_an_export_replaces_the_one_in_its_folder(tmp_path):
    """Sharded over single-file and the other way round: only the new export's files stay, and both
    loaders read the new weights (a stale model.safetensors would win in transformers, stale shards
    in a loader that reads every file)."""
    idx = torch.randint(0, SMALL.vocab_size, (1, 9))
    for max_shard_bytes in (100_000, 2**40, 200_000, 100_000):
        model = randomize(Mellum2(SMALL)).eval()
        model.save_pretrained(tmp_path, max_shard_bytes=max_shard_bytes)
        shards = sorted(f for f in os.listdir(tmp_path) if f.startswith("model"))
        index = tmp_path / "model.safetensors.index.json"
        assert shards == ["model.safetensors"] if max_shard_bytes == 2**40 else \
            shards == sorted({*json.load(open(index))["weight_map"].values(), index.name})
        with torch.no_grad():
            expected = model(idx)[0]
            assert torch.equal(Mellum2.from_pretrained(tmp_path, device="cpu")(idx)[0], expected)
            assert (logits_of_hf(tmp_path, idx) - expected).abs().max() < 1e-5
    # A file the index does not list is no part of the checkpoint, whatever it holds.
    from safetensors.torch import save_file
    save_file({"model.norm.weight": torch.zeros(SMALL.n_embd)}, tmp_path / "model-00099-of-00099.safetensors")
    with torch.no_grad():
        assert torch.equal(Mellum2.from_pretrained(tmp_path, device="cpu")(idx)[0], expected)


def test_an_export_says_its_dtype_and_sizes_as_loaders_read_them(tmp_path):
    """Beside the tensors: config.json's dtype, the index's total size in bytes, one file when the
    weights come to exactly max_shard_bytes, and intermediate_size as the release writes it (K * F,
    read by no layer of a model that has only MoE layers)."""
    model = Mellum2(SMALL).to(torch.bfloat16)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(tmp_path / "whole", max_shard_bytes=total)
    assert sorted(f for f in os.listdir(tmp_path / "whole") if f.startswith("model")) == ["model.safetensors"]
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["dtype"] == "bfloat16"
    model.float().save_pretrained(tmp_path / "shards", max_shard_bytes=total // 3)
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2 * total  # fp32 now
    # Read in the dtype asked for, not the file's (fp32) nor the device's default (fp32 on a CPU).
    loaded = Mellum2.from_pretrained(tmp_path / "shards", device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    # Without a dtype, the device's: a bf16 checkpoint (the release) computes in fp32 on a CPU.
    assert {p.dtype for p in Mellum2.from_pretrained(tmp_path / "whole", device="cpu").parameters()} == {torch.float32}
    # A tensor larger than a shard's size gets a shard of its own, and no shard is left empty.
    model.save_pretrained(tmp_path / "one-each", max_shard_bytes=1)
    index = json.loads((tmp_path / "one-each" / "model.safetensors.index.json").read_text())
    files = sorted(f for f in os.listdir(tmp_path / "one-each") if f.endswith(".safetensors"))
    assert files == sorted(set(index["weight_map"].values())) and len(files) == len(index["weight_map"])
    # A shard the index lists that is not there: a download not finished.
    os.remove(tmp_path / "one-each" / files[1])
    with pytest.raises(CheckpointError, match=f"missing {files[1]}, listed in model.safetensors.index.json"):
        Mellum2.from_pretrained(tmp_path / "one-each", device="cpu")
    assert mellum2.config_to_hf(Mellum2Config())["intermediate_size"] == 8 * 896


@pytest.mark.skipif(os.name == "nt", reason="Windows files have no permission bits for others")
def test_exports_and_checkpoints_get_the_permissions_of_any_new_file(tmp_path):
    """safetensors writes its files readable by their owner alone: an export on a shared machine
    would load for no one else. Every file we write gets what the umask gives any new file."""
    model = Mellum2(SMALL)
    old_umask = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "export", max_shard_bytes=100_000)  # shards, index, config
        train.save_checkpoint(str(tmp_path / "ckpt.pt"), model, [], 1, {"steps": 1})
        os.umask(0o077)  # a private umask is honoured as well
        model.save_pretrained(tmp_path / "private")
    finally:
        os.umask(old_umask)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert len(modes) > 4 and all(mode == (0o600 if name.startswith("private/") else 0o644)
                                  for name, mode in modes.items()), modes


def test_mtp_tensors_are_read_when_config_json_leaves_out_their_count(tmp_path):
    ours = randomize(Mellum2(SMALL)).eval()
    ours.save_pretrained(tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    del hf_config["num_nextn_predict_layers"], hf_config["mtp_layer_types"], hf_config["mtp_mlp_layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    again = Mellum2.from_pretrained(tmp_path, device="cpu")
    assert again.config == ours.config
    assert torch.equal(again.mtp.fc.weight, ours.mtp.fc.weight)
    # The other way round: a checkpoint without the MTP layer whose config.json still counts one, as
    # transformers re-saves ours (it drops mtp.*), loads as the trunk it holds.
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k: t for k, t in tensors.items() if not k.startswith("mtp.")}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "num_nextn_predict_layers": 1}))
    trunk = Mellum2.from_pretrained(tmp_path, device="cpu")
    assert trunk.config == replace(ours.config, n_mtp=0)
    idx = torch.randint(0, SMALL.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(trunk(idx)[0], ours(idx)[0])


def test_loading_lets_each_layers_experts_go_once_they_are_stacked(tmp_path, monkeypatch):
    # The released checkpoint is 24 GB in bf16: holding every expert's matrix beside the stacks made
    # of them would need twice that. Here a bf16 export is read into fp32, tensor by tensor.
    ours = randomize(Mellum2(SMALL)).to(torch.bfloat16)
    ours.save_pretrained(tmp_path)
    tensors = mellum2.read_safetensors(tmp_path, "cpu", torch.float32)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    experts = [weakref.ref(t) for k, t in tensors.items() if mellum2.EXPERT_KEY.match(k)]
    unstacked = lambda: sum(r() is not None for r in experts)  # noqa: E731
    stack = torch.stack

    def watched_stack(pieces, *args, **kwargs):
        held = unstacked() - sum(1 for k in tensors if mellum2.EXPERT_KEY.match(k))  # read, not yet stacked
        assert held <= 3 * SMALL.n_expert  # one layer's: shards list gate, up and down of each expert together
        return stack(pieces, *args, **kwargs)

    monkeypatch.setattr(torch, "stack", watched_stack)
    state = mellum2.hf_to_state_dict(tensors, SMALL)
    monkeypatch.undo()
    assert tensors == {} and unstacked() == 0  # nothing the caller holds keeps a second copy
    for k, t in ours.state_dict().items():
        assert state[k].dtype == torch.float32 and torch.equal(state[k], t.float()), k
    again = Mellum2.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)
    assert {p.dtype for p in again.parameters()} == {torch.float32}


def assert_rope_matches_transformers(config, hf, layer_type):
    """Bit for bit: at position 131072 one unit in the last place of a frequency moves cos and sin
    by up to 0.007."""
    default = transformers.models.mellum.modeling_mellum.MellumRotaryEmbedding.compute_default_rope_parameters
    rope_type = hf.rope_parameters[layer_type]["rope_type"]
    init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS.get(rope_type, default)
    expected_freq, expected_factor = init(hf, "cpu", layer_type=layer_type)
    freq, factor = rope_inv_freq(config, layer_type)
    assert torch.equal(freq, expected_freq) and factor == pytest.approx(expected_factor, rel=1e-15), layer_type


def test_yarn_frequencies_match_transformers():
    for yarn_factor in (16.0, 3.0, 1.0):
        cfg = Mellum2Config.from_preset("mellum2-12b", yarn_factor=yarn_factor)
        for layer_type in ("full_attention", "sliding_attention"):
            assert_rope_matches_transformers(cfg, hf_config(cfg), layer_type)
    # A correction range that reaches past the last pair (hd/2 pairs, clamped at hd - 1 as transformers does)
    cfg = replace(SMALL, n_head=2, n_kv_head=1, head_dim=16, rope_theta=100.0, yarn_factor=4.0,
                  yarn_original_max_seq_len=2048)
    assert_rope_matches_transformers(cfg, hf_config(cfg), "full_attention")
    cfg = Mellum2Config.from_preset("mellum2-12b", yarn_factor=16.0)
    got, factor = rope_inv_freq(cfg, "full_attention")
    assert factor == pytest.approx(1.2772588722239782)
    # Layer-selective: sliding layers keep plain RoPE and no attention scaling.
    plain, one = rope_inv_freq(cfg, "sliding_attention")
    assert one == 1.0 and torch.allclose(plain, 500000.0 ** (-torch.arange(0, 128, 2) / 128))
    # The report's correction range: pairs up to 18 untouched, from 35 on divided by 16.
    assert torch.allclose(got[:19], plain[:19]) and torch.allclose(got[35:], plain[35:] / 16)


# -----------------------------------------------------------------------------------------------
# The pieces, each against a brute-force or hand computation

def test_attention_mask_matches_brute_force():
    q, k = torch.arange(5, 17), torch.arange(0, 17)  # queries at positions 5..16 over keys 0..16
    for window in (None, 1, 3, 8, 100):
        mask = attention_mask(q, k, window)
        for i, qp in enumerate(q.tolist()):
            for j, kp in enumerate(k.tolist()):
                allowed = kp <= qp and (window is None or qp - kp <= window - 1)
                assert mask[i, j].item() == allowed, (window, qp, kp)


@pytest.mark.parametrize("pattern,window", [("S", 5), ("F", 5)])
def test_receptive_field_of_one_layer(pattern, window):
    """With one layer, the logits at position q change when token p changes exactly when attention
    lets q see p: p <= q for full attention, and q - window < p <= q for a sliding layer."""
    cfg = replace(SMALL, n_layer=1, attn_pattern=pattern, sliding_window=window, n_mtp=0)
    model = randomize(Mellum2(cfg)).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    p = 7
    changed = idx.clone()
    changed[0, p] = (idx[0, p] + 1) % cfg.vocab_size
    with torch.no_grad():
        diff = (model(idx)[0] - model(changed)[0]).abs().amax(dim=-1)[0]
    # A changed token moves other tokens within the grouped matmul's blocks, which can change their
    # rounding (about 1e-6); a token that sees the change moves by far more than 1e-4.
    seen = [q for q in range(20) if diff[q] > 1e-4]
    expected = list(range(p, 20)) if pattern == "F" else list(range(p, p + window))
    assert seen == expected


def test_layer_pattern_of_the_release():
    types = Mellum2Config.from_preset("mellum2-12b").layer_types
    assert [i for i, t in enumerate(types) if t == "full_attention"] == [3, 7, 11, 15, 19, 23, 27]
    assert types.count("sliding_attention") == 21


def test_rope_pairs_dimension_j_with_j_plus_half():
    """Rotate-half RoPE treats (x_j, x_{j+hd/2}) as the complex number x_j + i x_{j+hd/2} and
    multiplies it by e^{i * pos * freq_j}."""
    hd, T = 8, 6
    x = torch.randn(1, T, 2, hd)
    freq = 10000.0 ** (-torch.arange(0, hd, 2) / hd)
    angle = torch.arange(T)[:, None] * freq[None, :]  # (T, hd/2)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2:]) * torch.polar(torch.ones_like(angle), angle)[None, :, None]
    expected = torch.cat([z.real, z.imag], dim=-1)
    assert torch.allclose(apply_rope(x, cos, sin), expected, atol=1e-6)


def test_router_renormalises_the_top_k():
    cfg = replace(SMALL, n_expert=8, n_expert_active=3)
    moe = randomize(Mellum2(cfg)).layers[0].mlp
    x = torch.randn(50, cfg.n_embd)
    logits, weights, experts = moe.route(x)
    assert torch.allclose(weights.sum(-1), torch.ones(50), atol=1e-6)
    # Softmax over all experts, top-k, renormalise == softmax over the chosen logits alone.
    assert torch.allclose(weights, logits.gather(1, experts).softmax(-1), atol=1e-6)
    assert torch.equal(experts, logits.topk(3, dim=-1).indices)


def test_the_router_stays_fp32_under_bf16_autocast():
    moe = randomize(Mellum2(SMALL)).layers[0].mlp
    x = torch.randn(64, SMALL.n_embd)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # how train.py runs on GPUs
        logits, _, experts = moe.route(x.bfloat16())
    reference = x.bfloat16().float() @ moe.gate.weight.T
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_a_bf16_model_keeps_to_bf16_in_the_forward_and_in_decoding():
    """sample.py loads a model in bf16 on GPUs: every part hands bf16 on (the router computes in fp32
    and returns bf16 weights), in a forward and in cached decoding, and stays near the fp32 model."""
    idx = torch.randint(0, SMALL.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    fp32, bf16 = (randomize(Mellum2(SMALL), seed=5).eval() for _ in range(2))
    bf16.to(torch.bfloat16)
    with torch.no_grad():
        want, _ = fp32(idx)
        got, _ = bf16(idx)
        cache = KVCache(SMALL, 2, 24, dtype=torch.bfloat16)
        h, _ = bf16.trunk(idx, cache)
        h_next, _ = bf16.trunk(idx[:, :1], cache)  # one decoding step: the per-token expert path
        step_got, step_want = bf16.lm_head(h_next[:, -1]), fp32(torch.cat([idx, idx[:, :1]], dim=1))[0][:, -1]
    assert got.dtype == h.dtype == h_next.dtype == torch.bfloat16
    # On average: where bf16 rounding flips a near-tied router choice, a position's experts differ.
    assert (got.float() - want).abs().mean() < 0.05 * want.abs().mean()
    assert (step_got.float() - step_want).abs().mean() < 0.05 * step_want.abs().mean()


def test_norms_and_the_loss_keep_fp32_where_transformers_does():
    """An fp32 gain on bf16 activations (autocast) gives fp32, as in transformers; a bf16 gain
    gives bf16. A bf16 model's cross-entropy is taken over fp32 logits, so its loss is fp32."""
    norm = RMSNorm(8, 1e-6)
    assert norm(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.float32
    assert norm.to(torch.bfloat16)(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    model = randomize(Mellum2(SMALL)).to(torch.bfloat16)
    idx = torch.randint(0, SMALL.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, loss = model(idx, idx)
    assert loss.dtype == torch.float32
    expected = F.cross_entropy(logits.float().flatten(0, 1), idx.flatten())
    assert model.loss_parts["ntp"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_moe_loop_and_grouped_agree_forward_and_backward():
    cfg = replace(SMALL, n_expert=8, n_expert_active=3)
    torch.manual_seed(0)
    base = randomize(Mellum2(cfg))
    idx = torch.randint(0, cfg.vocab_size, (3, 30))
    targets = torch.randint(0, cfg.vocab_size, (3, 30))
    results = []
    for impl in ("loop", "grouped"):
        model = Mellum2(replace(cfg, moe_impl=impl))
        model.load_state_dict(base.state_dict())
        logits, loss = model(idx, targets)
        loss.backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    (logits_a, grads_a), (logits_b, grads_b) = results
    assert torch.allclose(logits_a, logits_b, atol=1e-5)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5), name


def test_grouped_experts_take_any_size_and_float64():
    """torch's grouped matmul wants rows of a multiple of 16 bytes, in fp32 or half precision; other
    sizes (expert_dim 6, an fp32 row of 24 bytes) and float64 take the matmul-per-expert path."""
    for expert_dim, dtype in ((6, torch.float32), (12, torch.float32), (16, torch.float64)):
        moe = mellum2.MoE(replace(SMALL, n_expert=4, n_expert_active=2, expert_dim=expert_dim)).to(dtype)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.5)
        x = torch.randn(10, SMALL.n_embd, dtype=dtype)
        _, weights, experts = moe.route(x)
        expected = moe.experts_loop(x, weights, experts)
        assert torch.allclose(moe.experts_grouped(x, weights, experts), expected, atol=1e-5), (expert_dim, dtype)
    # A batch that leaves the last experts without tokens (a collapsed router): every expert still has
    # its group, empty ones included.
    moe = randomize(Mellum2(replace(SMALL, n_expert=16))).layers[0].mlp
    x, weights = torch.randn(20, SMALL.n_embd), torch.rand(20, 2)
    experts = torch.stack([torch.randperm(5)[:2] for _ in range(20)])  # only experts 0..4 of 16
    assert torch.allclose(moe.experts_grouped(x, weights, experts), moe.experts_loop(x, weights, experts), atol=1e-5)


def test_moe_decoding_path_matches_the_loop_forward_and_backward(monkeypatch):
    """With fewer (token, expert) pairs than experts, as in decoding, the MoE runs each token's
    experts one by one (experts_per_token): same outputs and gradients as the reference loop, the
    router's included."""
    cfg = replace(SMALL, n_expert=8, n_expert_active=3)
    moe = randomize(Mellum2(cfg)).layers[0].mlp
    used = []
    monkeypatch.setattr(moe, "experts_per_token", lambda *a: used.append(1) or type(moe).experts_per_token(moe, *a))
    for n in (1, 2):
        x = torch.randn(1, n, cfg.n_embd, requires_grad=True)
        results = []
        for impl in ("grouped", "loop"):
            moe.config = replace(cfg, moe_impl=impl)
            out, _, _ = moe(x)
            grads = torch.autograd.grad(out.square().sum(), [x, moe.gate.weight, moe.gate_proj, moe.down_proj])
            results.append((out, grads))
        assert len(used) == n  # the default ("grouped") took the per-token path
        (out_a, grads_a), (out_b, grads_b) = results
        assert torch.allclose(out_a, out_b, atol=1e-5)
        for a, b in zip(grads_a, grads_b):
            assert torch.allclose(a, b, atol=1e-5)
    moe.config = cfg
    moe(torch.randn(1, 3, cfg.n_embd))  # 9 pairs >= 8 experts: the grouped matmul again
    assert len(used) == 2


def test_moe_is_dropless_against_a_per_token_loop():
    """Every token's output is the weighted sum of exactly its K experts, however unbalanced the
    routing: here the router is biased so that most tokens pick the same experts."""
    cfg = replace(SMALL, n_expert=8, n_expert_active=2)
    moe = randomize(Mellum2(cfg)).layers[0].mlp
    with torch.no_grad():
        moe.gate.weight[0] += 2.0 * moe.gate.weight[0].sign()  # expert 0 becomes very popular
    x = torch.randn(1, 40, cfg.n_embd)
    out, _, _ = moe(x)
    _, weights, experts = moe.route(x[0])
    for t in range(40):
        expected = sum(w * (F.silu(moe.gate_proj[e] @ x[0, t]) * (moe.up_proj[e] @ x[0, t])) @ moe.down_proj[e].T
                       for w, e in zip(weights[t], experts[t].tolist()))
        assert torch.allclose(out[0, t], expected, atol=1e-5)


def test_init_sets_every_norm_gain_to_one_and_draws_every_weight():
    """initializer_range (0.02) for every weight, 1 for every RMSNorm gain, the MTP layer's input
    norms included (their names do not end in "norm.weight")."""
    torch.manual_seed(0)
    model = Mellum2(SMALL)
    gains = {name for name, p in model.named_parameters()
             if any(p is m.weight for m in model.modules() if isinstance(m, RMSNorm))}
    assert {"mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight"} <= gains
    assert len(gains) == 4 * SMALL.n_layer + 1 + (2 + 4 + 1)  # 4 per block, the final norm, the MTP layer's
    weights = []
    for name, p in model.named_parameters():
        if name in gains:
            assert torch.all(p == 1), name
        else:
            assert p.std() > 0.01, name
            weights.append(p.flatten())
    assert torch.cat(weights).std().item() == pytest.approx(0.02, rel=0.02)
    # initializer_range is the config's: a config.json asking for another gets it.
    narrow = Mellum2(replace(SMALL, init_std=0.005))
    drawn = torch.cat([p.detach().flatten() for name, p in narrow.named_parameters() if name not in gains])
    assert drawn.std().item() == pytest.approx(0.005, rel=0.02)


def test_aux_loss_is_one_at_perfect_balance_and_larger_otherwise():
    E, K = 8, 2
    # Token i strongly prefers experts i, i+1 (mod E): every expert gets the same share of slots and,
    # by symmetry, the same mean probability.
    logits = torch.zeros(4 * E, E)
    for i in range(4 * E):
        logits[i, [i % E, (i + 1) % E]] = 5.0
    experts = logits.topk(K, dim=-1).indices
    assert load_balancing_loss(logits, experts, E).item() == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.zeros(4 * E, E, requires_grad=True)
    with torch.no_grad():
        collapsed[:, :2] = 5.0  # everyone picks experts 0 and 1
    loss = load_balancing_loss(collapsed, collapsed.topk(K, dim=-1).indices, E)
    assert loss.item() > 3.0
    # Its gradient, through the mean probabilities alone, lowers the overloaded experts' logits and
    # raises the others' (descent moves against the gradient).
    loss.backward()
    assert (collapsed.grad[:, :2] > 0).all() and (collapsed.grad[:, 2:] < 0).all()


def test_router_z_loss_is_the_mean_squared_log_sum_exp():
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(0)) * 3
    assert mellum2.router_z_loss(torch.zeros(5, 8)).item() == pytest.approx(math.log(8) ** 2)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 6
    assert mellum2.router_z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


def test_padding_is_left_out_of_the_routing_losses():
    model = randomize(Mellum2(SMALL))
    torch.manual_seed(1)
    a, b = torch.randint(0, 200, (24,)), torch.randint(0, 200, (14,))
    pad = torch.zeros(2, 24, dtype=torch.bool)
    pad[1, len(b):] = True                                    # row 1: 14 tokens, then 10 of padding
    losses = []
    for fill in (torch.full((10,), SMALL.vocab_size - 1), torch.randint(0, 200, (10,))):
        x = torch.stack([a, torch.cat([b, fill])])
        y = torch.cat([x[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1).masked_fill(pad, IGNORE_INDEX)
        model(x, y, pad=pad)
        masked = [model.loss_parts[k].item() for k in ("aux", "z")]
        model(x, y)
        losses.append((masked, [model.loss_parts[k].item() for k in ("aux", "z")]))
    # Whatever fills the padding, the routing losses over the real tokens are the same ...
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    # ... while without the mask the padding's own routing counts.
    assert losses[0][1] != pytest.approx(losses[1][1], rel=1e-3)


def naive_block(block, x, window):
    """One decoder block written out the long way: explicit attention scores with the K/V heads
    repeated, and the MoE token by token."""
    cfg = block.self_attn.config
    att, T = block.self_attn, x.shape[0]
    rms = lambda v, w: w * v / v.pow(2).mean(-1, keepdim=True).add(cfg.rms_norm_eps).sqrt()  # noqa: E731
    h = rms(x, block.input_layernorm.weight)
    q = rms((h @ att.q_proj.weight.T).view(T, cfg.n_head, cfg.head_dim), att.q_norm.weight)
    k = rms((h @ att.k_proj.weight.T).view(T, cfg.n_kv_head, cfg.head_dim), att.k_norm.weight)
    v = (h @ att.v_proj.weight.T).view(T, cfg.n_kv_head, cfg.head_dim)
    freq = cfg.rope_theta ** (-torch.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    angle = torch.arange(T)[:, None] * freq
    cos, sin = torch.cat([angle.cos()] * 2, -1)[:, None], torch.cat([angle.sin()] * 2, -1)[:, None]
    half = lambda u: torch.cat([-u[..., cfg.head_dim // 2:], u[..., : cfg.head_dim // 2]], -1)  # noqa: E731
    q, k = q * cos + half(q) * sin, k * cos + half(k) * sin
    group = cfg.n_head // cfg.n_kv_head
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(cfg.head_dim)
    allowed = torch.tensor([[0 <= i - j < window for j in range(T)] for i in range(T)])
    y = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
    x = x + y.reshape(T, -1) @ att.o_proj.weight.T
    h = rms(x, block.post_attention_layernorm.weight)
    moe, out = block.mlp, torch.zeros_like(x)
    for t in range(T):
        p = (moe.gate.weight @ h[t]).softmax(-1)
        top = p.topk(cfg.n_expert_active)
        for w, e in zip(top.values / top.values.sum(), top.indices.tolist()):
            out[t] += w * (F.silu(moe.gate_proj[e] @ h[t]) * (moe.up_proj[e] @ h[t])) @ moe.down_proj[e].T
    return x + out


@torch.no_grad()
def naive_final_states_and_mtp_logits(model, idx):
    """By hand, for a text idx (T,): the trunk's final normalised states h (T, D), and the MTP
    head's logits (T-1, V), which at position t read h_t and the embedding of token t+1."""
    cfg, mtp = model.config, model.mtp
    rms = lambda v, w: w * F.rms_norm(v, (cfg.n_embd,), eps=cfg.rms_norm_eps)  # noqa: E731
    h = rms(naive_trunk_states(model, idx), model.norm.weight)
    e = model.embed_tokens.weight[idx[1:]]
    x = torch.cat([rms(e, mtp.pre_fc_norm_embedding.weight), rms(h[:-1], mtp.pre_fc_norm_hidden.weight)], -1)
    y = rms(naive_block(mtp.layers[0], x @ mtp.fc.weight.T, cfg.sliding_window), mtp.norm.weight)
    return h, y @ model.lm_head.weight.T


def test_mtp_loss_matches_hand_computation():
    """The MTP head at position t reads h_t (the trunk's final normalised state) and the embedding of
    token t+1, and is scored on token t+2."""
    cfg = replace(SMALL, sliding_window=5)
    model = randomize(Mellum2(cfg), seed=3)
    idx = torch.randint(0, cfg.vocab_size, (1, 12))
    targets = torch.cat([idx[:, 1:], torch.randint(0, cfg.vocab_size, (1, 1))], dim=1)
    targets[0, 4] = IGNORE_INDEX  # an ignored target is skipped by both heads
    with torch.no_grad():
        logits, loss = model(idx, targets)
        h, mtp_logits = naive_final_states_and_mtp_logits(model, idx[0])
        expected_mtp = F.cross_entropy(mtp_logits, targets[0, 1:], ignore_index=IGNORE_INDEX)
        expected_ntp = F.cross_entropy(h @ model.lm_head.weight.T, targets[0], ignore_index=IGNORE_INDEX)
    assert torch.allclose(logits[0], h @ model.lm_head.weight.T, atol=1e-4)
    assert model.loss_parts["ntp"].item() == pytest.approx(expected_ntp.item(), abs=1e-5)
    assert model.loss_parts["mtp"].item() == pytest.approx(expected_mtp.item(), abs=1e-5)
    parts = model.loss_parts
    # Every MoE layer, the MTP block's included, adds its own balance and z-losses at 1e-3 (as
    # Megatron does); the logged parts are their means over the layers.
    n_moe = cfg.n_layer + 1
    total = parts["ntp"] + 0.1 * parts["mtp"] + 1e-3 * n_moe * (parts["aux"] + parts["z"])
    assert loss.item() == pytest.approx(total.item(), abs=1e-6)
    # The logged expert load is the trunk's, one row per layer (the MTP block's balance shows in
    # "aux"): each row the shares of the routing slots, summing to 1.
    assert parts["expert_load"].shape == (cfg.n_layer, cfg.n_expert)
    assert torch.allclose(parts["expert_load"].sum(-1), torch.ones(cfg.n_layer))
    # Each coefficient multiplies its own loss (SFT sets the balance loss's to 1e-4, --aux-coef any).
    model.config = replace(cfg, mtp_loss_weight=0.3, aux_loss_coef=0.05, z_loss_coef=0.003)
    with torch.no_grad():
        _, loss = model(idx, targets)
    total = parts["ntp"] + 0.3 * parts["mtp"] + n_moe * (0.05 * parts["aux"] + 0.003 * parts["z"])
    assert loss.item() == pytest.approx(total.item(), abs=1e-6)
    # Two tokens are the shortest text with an MTP target: token 1 read at position 0, scored on target 1.
    with torch.no_grad():
        model(idx[:, :2], targets[:, :2])
        expected_mtp = F.cross_entropy(mtp_logits[:1], targets[0, 1:2])
    assert model.loss_parts["mtp"].item() == pytest.approx(expected_mtp.item(), abs=1e-5)


def naive_trunk_states(model, tokens):
    x = model.embed_tokens.weight[tokens]
    for block in model.layers:
        window = model.config.sliding_window if block.layer_type == "sliding_attention" else len(tokens)
        x = naive_block(block, x, window)
    return x


# -----------------------------------------------------------------------------------------------
# Parameter counts, configs, errors

def test_parameter_counts_of_the_release():
    with torch.device("meta"):
        model = Mellum2(Mellum2Config.from_preset("mellum2-12b"))
    total, active = model.num_params(), model.num_params(active=True)
    assert abs(total / 12e9 - 1) < 0.03 and abs(active / 2.5e9 - 1) < 0.03
    assert total == pytest.approx(12.15e9, rel=1e-3) and active == pytest.approx(2.44e9, rel=1e-3)
    # The MTP layer is one more MoE decoder layer plus the 2D -> D projection (~0.43B).
    assert model.num_params(include_mtp=True) - total == pytest.approx(0.428e9, rel=1e-2)


@pytest.mark.parametrize("overrides,message", [
    (dict(n_head=6, n_kv_head=4), "divisible"),
    (dict(n_expert=4, n_expert_active=5), "n_expert_active"),
    (dict(n_expert_active=0), "n_expert_active \\(0\\) must be between 1"),  # a router that picks nothing
    (dict(attn_pattern=""), "attn_pattern must be a non-empty string"),
    (dict(head_dim=15), "head_dim must be even"),                 # RoPE rotates pairs of channels
    (dict(yarn_factor=0.5), "yarn_factor must be >= 1.0"),        # < 1 would shrink the context
    (dict(sliding_window=0), "sliding_window"),
    (dict(attn_pattern="SXF"), "attn_pattern"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps"),  # every norm would output NaN
    (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
    (dict(yarn_factor=float("inf")), "yarn_factor"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(rope_theta=1.0), "rope_theta"),        # YaRN divides by log(theta)
    (dict(n_kv_head=0), "divisible"),             # not a ZeroDivisionError
    (dict(yarn_original_max_seq_len=0), "yarn_original_max_seq_len"),
    (dict(yarn_beta_slow=0.0), "yarn_beta"),
    (dict(yarn_beta_fast=0.5), "yarn_beta"),      # below beta_slow: the ramp would run backwards
    (dict(yarn_attention_factor=-1.0), "yarn_attention_factor"),
    (dict(aux_loss_coef=float("nan")), "aux_loss_coef and z_loss_coef must be at least 0"),  # NaN among others
    (dict(mtp_loss_weight=-0.1), "mtp_loss_weight"),
    (dict(z_loss_coef=float("inf")), "z_loss_coef"),
    (dict(init_std=0.0), "init_std"),
    (dict(vocab_size=512, eos_token_id=(2, 512)), "eos_token_id must be ids below vocab_size \\(512\\)"),
    (dict(vocab_size=512, bos_token_id=-1), "bos_token_id"),
    (dict(rms_norm_eps=1.0), "rms_norm_eps"),              # a gain on inputs of norm ~1: would swamp them
    (dict(yarn_attention_factor=0.0), "yarn_attention_factor"),  # full layers' cos and sin would be 0
    (dict(expert_dim=0), "all sizes must be positive"),
    (dict(n_layer=0), "all sizes must be positive"),
    (dict(n_mtp=True), "n_mtp must be int, got True"),     # a JSON true is no count
    (dict(n_layer=4.0), "n_layer must be int, got 4.0"),
])
def test_invalid_configs_raise_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        replace(SMALL, **overrides)


def test_configs_take_a_whole_number_for_a_float_and_zero_for_a_loss_coefficient():
    """A hand-written config.json's "rope_theta": 500000 is a float setting given as an int; a
    coefficient of 0 is the way to switch the MTP, balance or z-loss off."""
    assert replace(SMALL, rope_theta=20000).rope_theta == 20000
    hf = mellum2.config_to_hf(SMALL)
    for rope in hf["rope_parameters"].values():
        rope["rope_theta"] = 20000
    assert mellum2.config_from_hf(hf).rope_theta == 20000
    off = replace(SMALL, mtp_loss_weight=0.0, aux_loss_coef=0.0, z_loss_coef=0.0)
    idx = torch.randint(0, SMALL.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model = randomize(Mellum2(off))
    _, loss = model(idx, idx)
    assert loss.item() == pytest.approx(model.loss_parts["ntp"].item(), rel=1e-6)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny"):
        Mellum2Config.from_preset("huge")


def test_presets_keep_the_structure():
    for name in ("tiny", "small"):
        cfg = Mellum2Config.from_preset(name)
        assert cfg.layer_types.count("full_attention") * 4 == cfg.n_layer
        assert cfg.sliding_window < cfg.max_seq_len and cfg.n_head // cfg.n_kv_head > 1
        assert cfg.n_expert >= 16 and cfg.n_expert_active * 8 == cfg.n_expert and cfg.n_mtp == 1
        assert cfg.n_embd % 64 == 0 and cfg.head_dim % 64 == 0


def test_loading_names_the_problems(tmp_path):
    Mellum2(SMALL).save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    tensors["model.norm.weight"] = torch.ones(3)
    tensors["model.layers.0.extra.weight"] = torch.ones(1)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        Mellum2.from_pretrained(tmp_path)
    text = str(err.value)
    for expected in ["missing layers.1.self_attn.k_norm.weight", "missing layers.2.mlp.up_proj",
                     "norm.weight has shape (3,)", "unexpected layers.0.extra.weight"]:
        assert expected in text
    # An expert the config does not count, numbered so that it is read before the others (10 < 2 as
    # text) or just past the last: named as unexpected, not dropped, and not taken for a gap among
    # its layer's experts.
    Mellum2(SMALL).save_pretrained(tmp_path / "more-experts")
    tensors = load_file(tmp_path / "more-experts" / "model.safetensors")
    for number in (SMALL.n_expert + 2, SMALL.n_expert):
        extra = f"layers.3.mlp.experts.{number}.gate_proj.weight"
        save_file({**tensors, "model." + extra: tensors["model.layers.3.mlp.experts.0.gate_proj.weight"].clone()},
                  tmp_path / "more-experts" / "model.safetensors")
        with pytest.raises(CheckpointError, match=rf"does not match its config.json: unexpected {re.escape(extra)}$"):
            Mellum2.from_pretrained(tmp_path / "more-experts")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].int()  # not read as floats
    save_file(tensors, tmp_path / "more-experts" / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: model.embed_tokens.weight holds torch.int32 values"):
        Mellum2.from_pretrained(tmp_path / "more-experts")
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value in config.items():  # two more layers: dozens of tensors missing
        if isinstance(value, list) and len(value) == config["num_hidden_layers"]:
            config[key] = value + value[:2]
    config["num_hidden_layers"] += 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing layers\.4\..*; and \d+ more$") as err:
        Mellum2.from_pretrained(tmp_path)
    assert len(str(err.value)) < 600


def test_a_list_of_end_ids_survives_export():
    """transformers' MellumConfig takes one eos_token_id or a list (a chat model's)."""
    config = mellum2.config_from_hf({"model_type": "mellum", "eos_token_id": [28, 5]})
    assert config.eos_token_id == (28, 5) and config.eos_ids == (28, 5)
    assert mellum2.config_from_hf(mellum2.config_to_hf(config)) == config
    assert transformers.MellumConfig(**{k: v for k, v in mellum2.config_to_hf(config).items()
                                        if k != "model_type"}).eos_token_id == [28, 5]
    assert Mellum2Config.from_preset("tiny").eos_ids == (4080,) and replace(SMALL, eos_token_id=None).eos_ids == ()


def test_a_config_survives_export_with_every_setting_changed():
    config = replace(SMALL, yarn_factor=4.0, yarn_original_max_seq_len=32, yarn_beta_fast=16.0, yarn_beta_slow=2.0,
                     yarn_attention_factor=1.3, yarn_layers="all", rope_theta=20000.0, rms_norm_eps=1e-5,
                     mtp_loss_weight=0.3, aux_loss_coef=0.05, z_loss_coef=0.003, init_std=0.01, moe_impl="loop",
                     attn_pattern="SFSF", bos_token_id=1, eos_token_id=2)  # kept as written, not as "SF"
    hf = mellum2.config_to_hf(config)
    assert mellum2.config_from_hf(hf) == config
    # and transformers reads the same RoPE from it, YaRN's attention factor and ramp included
    hf_read = transformers.MellumConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    for layer_type in ("full_attention", "sliding_attention"):
        assert_rope_matches_transformers(config, hf_read, layer_type)
    assert rope_inv_freq(config, "full_attention")[1] == 1.3


@pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")  # read all the same, as tested
def test_config_keys_left_out_mean_what_they_mean_to_transformers():
    """A hand-written config.json gets transformers' MellumConfig defaults for the keys it leaves
    out (the released sizes, 131072 positions, full attention everywhere), and the keys it sets
    the meaning transformers gives them."""
    yarn_on_full_layers = {
        "full_attention": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0,
                           "original_max_position_embeddings": 4096},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    four_layers = {"num_hidden_layers": 4, "layer_types": ["sliding_attention"] * 3 + ["full_attention"]}
    written = [
        {"model_type": "mellum"},
        {"model_type": "mellum", **four_layers, "rope_parameters": yarn_on_full_layers},
        {"model_type": "mellum", **four_layers, "rope_scaling": yarn_on_full_layers},  # the older name
    ]
    for keys in written:
        hf = transformers.MellumConfig(**{k: v for k, v in keys.items() if k != "model_type"})
        ours = mellum2.config_from_hf(keys)
        assert (ours.vocab_size, ours.n_layer, ours.n_embd, ours.head_dim) == \
            (hf.vocab_size, hf.num_hidden_layers, hf.hidden_size, hf.head_dim)
        assert (ours.n_head, ours.n_kv_head, ours.n_expert, ours.n_expert_active, ours.expert_dim) == \
            (hf.num_attention_heads, hf.num_key_value_heads, hf.num_experts, hf.num_experts_per_tok,
             hf.moe_intermediate_size)
        assert (ours.sliding_window, ours.max_seq_len) == (hf.sliding_window, hf.max_position_embeddings)
        assert ours.layer_types == hf.layer_types
        for layer_type in set(hf.layer_types):
            assert_rope_matches_transformers(ours, hf, layer_type)


@pytest.mark.parametrize("keys,message", [
    ({"num_hidden_layers": 4, "layer_types": ["sliding_attention"] * 4}, "different RoPE bases"),  # 10000 vs 500000
    ({"sliding_window": None, "layer_types": ["sliding_attention"] * 28}, "sliding_window null"),
    ({"num_nextn_predict_layers": 1, "mtp_layer_types": ["full_attention"]}, "mtp_layer_types"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.7,
                                             "mscale_all_dim": 0.7}}}, "mscale"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn"}}}, "unreadable.*factor"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 1.0, "attention_factor": 1.5}}},
     "factor 1 and an attention_factor"),                                    # would be dropped silently
    ({"num_hidden_layers": "4", "layer_types": ["sliding_attention"] * 4}, r"num_hidden_layers '4', where a number"),
    ({"num_hidden_layers": 4.0}, "num_hidden_layers 4.0, where"),          # was a TypeError from list * float
    ({"num_hidden_layers": 0}, "num_hidden_layers 0, where"),
    ({"num_attention_heads": 6}, "unreadable.*divisible"),
    ({"layer_types": ["local"] * 28}, r"layer_types \['local', .*\], where a list of sliding_attention and full"),
    ({"num_hidden_layers": 4, "layer_types": "full"}, "layer_types 'full', where a list"),  # not KeyError 'f'
    ({"rope_parameters": {"full_attention": 5}}, "rope_parameters full_attention 5, where an object"),
    ({"num_nextn_predict_layers": 1, "sliding_window": None}, "sliding_window null"),  # the MTP block slides
    ({"num_nextn_predict_layers": 1, "mtp_mlp_layer_types": ["dense"]}, "mtp_mlp_layer_types"),
    ({"norm_topk_prob": False}, "norm_topk_prob=False"),      # Mellum 2 renormalises the top-k weights
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0, "truncate": False}}},
     "truncate=False"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 16.0},
                          "sliding_attention": {"rope_type": "yarn", "factor": 4.0}}}, "RoPE type"),
    ({"hidden_size": 2304.0}, "n_embd must be int, got 2304.0"),           # not torch.empty's TypeError
    ({"eos_token_id": [28, "x"]}, "eos_token_id must be an id or ids"),
    ({"layer_types": ["sliding_attention"] * 4},
     r"layer_types lists 4 layers, num_hidden_layers is 28 \(MellumConfig's default: config.json does not give it\)"),
    ({"num_hidden_layers": 28, "mlp_layer_types": ["sparse"]}, r"lists 1 layers, num_hidden_layers is 28\)"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e3, "factor": 4.0}}, "not keyed by layer type"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "default", "partial_rotary_factor": 0.5}}},
     "partial_rotary_factor"),
    ({"initializer_range": None}, "init_std must be float, got None"),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1"),                  # transformers applies it in training
    ({"mellum2": ["tiny"]}, r"mellum2 \['tiny'\], where an object"),       # was an AttributeError's words
])
def test_config_json_that_cannot_be_loaded_says_why(keys, message):
    with pytest.raises(CheckpointError, match=message):
        mellum2.config_from_hf({"model_type": "mellum", **keys})


def test_a_config_json_that_is_no_object_says_so():
    with pytest.raises(CheckpointError, match="a JSON object was expected, got list"):
        mellum2.config_from_hf([{"model_type": "mellum"}])


def test_a_config_json_with_null_for_our_settings_reads_as_one_without():
    """Our exports add a "mellum2" object of training settings; null there means none, as absent does."""
    absent = mellum2.config_from_hf({"model_type": "mellum"})
    assert mellum2.config_from_hf({"model_type": "mellum", "mellum2": None}) == absent


def test_bad_checkpoint_directories(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        Mellum2.from_pretrained(tmp_path)
    Mellum2(SMALL).save_pretrained(tmp_path)
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        Mellum2.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable config"):
        Mellum2.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type"):
        Mellum2.from_pretrained(tmp_path)


def test_same_seed_same_numbers():
    idx = torch.randint(0, SMALL.vocab_size, (2, 20))
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        model = Mellum2(SMALL)
        runs.append(model(idx, idx)[1])
    assert torch.equal(runs[0], runs[1])


def test_importing_top_level_files_does_no_work():
    here = os.path.dirname(os.path.abspath(__file__))
    modules = [f[:-3] for f in os.listdir(here) if f.endswith(".py") and not f.startswith("test_")]
    code = "import " + ", ".join(sorted(modules))
    result = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


# -----------------------------------------------------------------------------------------------
# Data (data.py): tokenizer, corpus and cache, curriculum, FIM, packing; tiny corpora in tmp dirs

# -- helpers

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = (data.SPECIAL_TOKENS[t] for t in ("<fim_prefix>", "<fim_middle>", "<fim_suffix>"))


def within(count, n, p, sigmas=5):
    """True if `count` successes of `n` is within `sigmas` binomial standard deviations of n*p."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def write_tiny_corpus(root, seed=0, n=12):
    """root/web, root/code, root/math: n small documents each, routed by folder name."""
    rng = random.Random(seed)
    words = ("the", "function", "returns", "a", "list", "of", "values", "when", "called", "with",
             "an", "argument", "object", "is", "not", "none", "and", "raises", "error", "if")
    for i in range(n):
        (root / "web").mkdir(parents=True, exist_ok=True)
        (root / "code").mkdir(parents=True, exist_ok=True)
        (root / "math").mkdir(parents=True, exist_ok=True)
        (root / "web" / f"page{i}.txt").write_text(
            " ".join(rng.choice(words) for _ in range(rng.randint(20, 60))).capitalize() + ".\n")
        (root / "code" / f"mod{i}.py").write_text(
            f"def f{i}(x, y={i}):\n    total = x * {rng.randint(2, 99)} + y\n"
            f"    return [total + k for k in range({rng.randint(1, 9)})]\n")
        (root / "math" / f"p{i}.txt").write_text(data.synthetic_math(1, seed * 1000 + i)[0])
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = write_tiny_corpus(tmp_path_factory.mktemp("tiny"))
    return data.build_corpus([root], cache_dir=tmp_path_factory.mktemp("cache"), progress=False,
                             default_sources=False)


@pytest.fixture(scope="module")
def enc():
    return data.load_tokenizer()


def full_rows(batch):
    """(B, T+1) rows as lists: x plus the last target."""
    return torch.cat([batch.x, batch.y[:, -1:]], dim=1).tolist()


def complete_items(row):
    """The documents of a packed row that end in <|endoftext|> (the final cut piece is left out)."""
    items, current = [], []
    for t in row:
        if t == data.EOT:
            items.append(current)
            current = []
        else:
            current.append(t)
    return items


def fim_reassemble(ids):
    """Inverse of data.fim_transform: a PSM/SPM example (optionally ending in <|endoftext|>) -> the
    original tokens prefix + middle + suffix; a plain sequence comes back without its final
    <|endoftext|>."""
    ids = list(ids)
    if ids and ids[-1] == data.EOT:
        ids = ids[:-1]
    if not ids or ids[0] not in (FIM_PREFIX, FIM_SUFFIX):
        return ids
    i_prefix, i_suffix, i_middle = ids.index(FIM_PREFIX), ids.index(FIM_SUFFIX), ids.index(FIM_MIDDLE)
    if ids[0] == FIM_PREFIX:   # PSM
        prefix, suffix = ids[i_prefix + 1:i_suffix], ids[i_suffix + 1:i_middle]
    else:                      # SPM
        suffix, prefix = ids[i_suffix + 1:i_prefix], ids[i_prefix + 1:i_middle]
    return prefix + ids[i_middle + 1:] + suffix


def contains(haystack, needle):
    return any(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


# --- §3.1.4 tokenizer ---------------------------------------------------------------------------

def test_vocab_and_special_ids(enc):
    assert enc.n_vocab == data.VOCAB_SIZE == 4096
    names = [token for token, _ in data.SPECIAL_TOKEN_TABLE]
    assert len(names) == 16 and len(set(names)) == 16
    assert [data.SPECIAL_TOKENS[t] for t in names] == list(range(4080, 4096))
    assert (data.EOT, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX) == (4080, 4081, 4082, 4083)
    for token, i in data.SPECIAL_TOKENS.items():
        assert enc.encode(token, allowed_special="all") == [i]
        assert enc.decode([i]) == token
    for b in range(256):   # byte-level: every single byte is a token, rank == byte value
        assert enc.decode_single_token_bytes(b) == bytes([b])


def test_round_trip_random_unicode(enc):
    rng = random.Random(1)
    ranges = [(0x00, 0x7F), (0x80, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x600, 0x6FF),
              (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF),
              (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]
    for _ in range(300):
        chars = []
        for _ in range(rng.randint(0, 80)):
            lo, hi = rng.choice(ranges)
            cp = rng.randint(lo, hi)
            if 0xD800 <= cp <= 0xDFFF:
                continue
            chars.append(chr(cp))
            if rng.random() < 0.1:
                chars.append(rng.choice((" ", "\n", "\t", "\r\n", "    ", "123", "<|endoftext|>", "'ll")))
        text = "".join(chars)
        ids = enc.encode_ordinary(text)
        assert max(ids, default=0) < data.N_RANKS
        assert enc.decode(ids) == text
        assert enc.decode_bytes(ids) == text.encode("utf-8")


def test_round_trip_bytes_and_surrogates(enc):
    rng = random.Random(2)
    for _ in range(200):
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))   # mostly invalid UTF-8
        assert enc.decode_bytes(list(raw)) == raw     # any byte string is a token sequence
        assert enc.decode(list(raw)) == raw.decode("utf-8", errors="replace")
        text = raw.decode("utf-8", errors="surrogateescape")                 # lone surrogates
        ids = enc.encode_ordinary(text)                                      # must not raise
        assert max(ids, default=0) < data.N_RANKS


def test_special_strings_in_text_stay_ordinary(enc):
    text = "x = '<fim_middle>' + \"<|endoftext|>\"  # " + " ".join(data.SPECIAL_TOKENS)
    ids = enc.encode_ordinary(text)
    assert all(i < data.N_RANKS for i in ids)
    assert enc.decode(ids) == text
    with pytest.raises(ValueError):   # plain encode() refuses special-token text: callers can't slip
        enc.encode(text)


def test_one_digit_per_token(enc):
    ids = enc.encode_ordinary("12345 + 67890")
    digits = [enc.decode([i]) for i in ids if enc.decode([i]).strip().isdigit()]
    assert digits == list("1234567890")
    # ... because the split pattern cuts numbers into digits before any merge: a retrained rank file
    # could hold no multi-digit token either.
    pieces = regex.findall(data.SPLIT_PATTERN, "x = 12345 + y7890")
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("123457890")


def naive_bpe(texts, n_ranks):
    """The textbook trainer: recount every pair after every merge. Same tie-break: smallest pair."""
    counts = collections.Counter()
    for text in texts:
        counts.update(regex.findall(data.SPLIT_PATTERN, text))
    words = {chunk: list(chunk.encode("utf-8")) for chunk in counts}
    vocab = [bytes([b]) for b in range(256)]
    rank_of = {t: i for i, t in enumerate(vocab)}
    while len(vocab) < n_ranks:
        pairs = collections.Counter()
        for chunk, ids in words.items():
            for pair in zip(ids, ids[1:]):
                pairs[pair] += counts[chunk]
        if not pairs:
            break
        pair = min(pairs, key=lambda p: (-pairs[p], p))
        merged = vocab[pair[0]] + vocab[pair[1]]
        if merged not in rank_of:
            rank_of[merged] = len(vocab)
            vocab.append(merged)
        words = {chunk: data._merge(ids, pair, rank_of[merged]) for chunk, ids in words.items()}
    return rank_of


def small_training_text():
    rng = random.Random(3)
    code = "\n".join(f"def f{i}(self, x):\n    return self.value_{i % 7} + x * {i}\n" for i in range(40))
    prose = " ".join(rng.choice(("the", "then", "there", "other", "these", "function", "funny", "a", "an"))
                     for _ in range(600))
    return [code, prose, "aaaaaaa bbbb aaaa ab ab ab", "\n".join(data.synthetic_math(30, 4))]


def test_bpe_matches_naive_reference():
    texts = small_training_text()
    assert data.train_bpe(texts, 256 + 150) == naive_bpe(texts, 256 + 150)
    # Both use the one merge step, so it is pinned on its own: left to right, never overlapping.
    assert data._merge([1, 1, 1], (1, 1), 9) == [9, 1] and data._merge([1, 1, 1, 1], (1, 1), 9) == [9, 9]
    assert data._merge([2, 1, 1, 3, 1], (1, 1), 9) == [2, 9, 3, 1]


def test_bpe_is_deterministic_and_round_trips(tmp_path):
    texts = small_training_text()
    first, second = data.train_bpe(texts, 600), data.train_bpe(list(texts), 600)
    assert first == second and sorted(first.values()) == list(range(len(first)))
    path = tmp_path / "r.tiktoken"
    data.save_ranks(first, path)
    assert data.parse_ranks(path.read_bytes()) == first


def test_each_message_of_the_chat_template_spelled_out(enc):
    """The template token by token, against the form in data.py's comment (its tests elsewhere
    compare rendered chats with each other): reasoning, then the text, then the call; a tool's answer
    comes back in a user turn."""
    special, text = data.SPECIAL_TOKENS, enc.encode_ordinary
    call = {"name": "calculator", "arguments": {"expression": "2 + 2"}}
    turn = {"role": "assistant", "reasoning": "Add them.", "content": "Let me compute.", "tool_call": call}
    assert data.render_message(enc, turn) == [
        special["<|assistant|>"], special["<think>"], *text("Add them."), special["</think>"], *text("Let me compute."),
        special["<tool_call>"], *text(json.dumps(call)), special["</tool_call>"], special["<|end|>"]]
    assert data.render_message(enc, {"role": "tool", "content": "4"}) == [
        special["<|user|>"], *text("<tool_response>4</tool_response>"), special["<|end|>"]]
    # What is printed of it: the text alone, every special token (the end of text too) left out.
    assert data.text_of(enc, [special["<|assistant|>"], *text("4"), special["<|end|>"], data.EOT]) == "4"


def test_the_tokenizer_retraining_command_writes_a_rank_file(tmp_path, monkeypatch, capsys):
    # The default corpus and 3824 merges take minutes: the same command on small texts, 150 merges.
    inputs = [data.InputFile(source, "text", f"{source}/{i}", text)
              for i, text in enumerate(small_training_text()) for source in data.SOURCES]
    monkeypatch.setattr(data, "_default_inputs", lambda: inputs)
    real_train_bpe = data.train_bpe
    monkeypatch.setattr(data, "train_bpe", lambda texts, n_ranks: real_train_bpe(texts, 256 + 150))
    data.train_tokenizer(tmp_path / "ranks.tiktoken")
    expected = real_train_bpe(data.tokenizer_training_texts(data._documents(inputs, progress=False)), 256 + 150)
    assert data.parse_ranks((tmp_path / "ranks.tiktoken").read_bytes()) == expected
    assert f"trained {len(expected)} ranks" in capsys.readouterr().out


def test_the_tokenizer_trains_on_training_documents_alone_within_each_source_budget(monkeypatch):
    """Held-out text never shapes the vocabulary; each source gives whole documents until its bytes
    reach the budget (here 20 web documents of 14 bytes against a budget that holds them all, and
    15-byte code documents against 10 bytes)."""
    monkeypatch.setattr(data, "TOKENIZER_MIX_BYTES", {"web": 1000, "code": 10, "math": 0})
    docs = {s: {"train": [(f"{s}/t{i}", f"{s} train {i:04d}") for i in range(20)],
                "val": [(f"{s}/v{i}", f"{s} held out {i}") for i in range(5)]} for s in data.SOURCES}
    texts = data.tokenizer_training_texts(docs)
    assert not any("held out" in text for text in texts)
    taken = {s: sum(text.startswith(s + " ") for text in texts) for s in data.SOURCES}
    assert taken == {"web": 20, "code": 1, "math": 0}
    # The documents taken are a sample drawn by a salted hash of their keys, not the first by name
    # (which for the default code would all be from one corner of the standard library).
    assert texts[-1] == min(docs["code"]["train"], key=lambda d: data.key_hash(d[0], salt="tokenizer:"))[1]
    assert texts[-1] != "code train 0000"


def test_loader_rereads_a_replaced_file_and_names_a_damaged_one(tmp_path):
    """tiktoken's own loader caches by path; ours must see a file replaced at the same path."""
    ranks = data.parse_ranks(data.TOKENIZER_FILE.read_bytes())
    path = tmp_path / "tok.tiktoken"
    data.save_ranks(ranks, path)
    assert data.load_tokenizer(path).encode_ordinary("hello world") == \
        data.load_tokenizer().encode_ordinary("hello world")
    swapped = dict(ranks)
    a, b = sorted(ranks, key=ranks.get)[-2:]
    swapped[a], swapped[b] = ranks[b], ranks[a]
    data.save_ranks(swapped, path)
    assert data.parse_ranks(path.read_bytes()) == swapped
    assert data.load_tokenizer(path).encode_single_token(a) == ranks[b]
    path.write_bytes(data.TOKENIZER_FILE.read_bytes()[:5000] + b"\nnot-base64 x\n")  # truncated, then garbage
    with pytest.raises(data.DataError, match=f"{path}: unreadable tokenizer rank file"):
        data.load_tokenizer(path)
    with pytest.raises(data.DataError, match=f"{path}: unreadable tokenizer rank file"):
        data.build_corpus([tmp_path], cache_dir=tmp_path / "cache", default_sources=False, tokenizer_path=path)
    # A rank given twice, and a file cut at a line's end: each named, not left to tiktoken to crash on.
    with pytest.raises(data.DataError, match="ranks are not 0..n-1, each once"):
        data.parse_ranks(b"YQ== 0\nYg== 0\n")
    data.save_ranks({token: rank for token, rank in ranks.items() if rank < 4000}, path)
    with pytest.raises(data.DataError, match="unreadable tokenizer rank file .tokenizer has 4000 ranks, expected 4080"):
        data.load_tokenizer(path)


# --- §3.1 sources, split, cache -------------------------------------------------------------------

def test_synthetic_math_is_checked_and_stable():
    problems = data.synthetic_math(300, 7)
    assert problems == data.synthetic_math(300, 7)
    assert all(data.check_math(p) for p in problems)
    wrong_step = regex.sub(r"=(\d+)>>", lambda m: f"={int(m[1]) + 1}>>", problems[0], count=1)
    assert not data.check_math(wrong_step)
    assert not data.check_math(problems[0].replace(">>", "+1>>", 1))      # malformed markup
    assert not data.check_math(problems[0].rsplit("#### ", 1)[0] + "#### 123456")
    assert not data.check_math("2 + 2 = <<2+2=5>>5\n#### 5")
    assert data.check_math("2 + 2 = <<2+2=4>>4\n4 * 2 = <<4*2=8>>8\n#### 8")
    assert not data.check_math("2 + 2 = <<2+2=4>>4\n4 * 2 = <<4*2=8>>8\n#### 4")  # an answer, but not the last step's
    assert len({p.split("\n")[0].split()[0] for p in problems}) > 5   # several templates


def test_default_inputs_listing():
    """The one check on the real install: what the default corpus would read (no tokenizing)."""
    inputs = data._default_inputs()
    keys = {(f.source, f.key) for f in inputs}
    assert ("code", "stdlib/json/decoder.py") in keys and ("web", "stdlib/json/decoder.py") in keys
    assert not any("/test/" in k or "/tests/" in k or k.startswith("stdlib/encodings/") for _, k in keys)
    assert {f.source for f in inputs} == set(data.SOURCES)
    assert sum(len(f.text) for f in inputs if f.source == "code") > data.MIN_STDLIB_CODE_BYTES
    # The web source reads the standard library's docstrings, not its code a second time; and with a
    # full standard library there, the code is its own, not the packages' (a stand-in for a stripped one).
    assert all(f.kind == "docstrings" for f in inputs if f.source == "web" and f.key.startswith("stdlib/"))
    if sum(len(f.text) for f in inputs if f.key.startswith("stdlib/") and f.source == "code") \
            >= data.MIN_STDLIB_CODE_BYTES:
        assert all(k.startswith("stdlib/") for s, k in keys if s == "code")


def test_docstrings_of_twelve_words_or_more_from_modules_classes_and_functions():
    twelve = "Return the sum of the two numbers given, in the order given."
    eleven = "Return the sum of the two numbers given, in the order."
    assert len(twelve.split()) == 12 and len(eleven.split()) == 11
    source = (f'"""Module: {twelve}"""\nclass A:\n    """Class: {twelve}"""\n    def f(self):\n'
              f'        """{eleven}"""\nasync def g():\n    """{twelve}"""\n')
    assert data._docstrings(source) == f"Module: {twelve}\n\nClass: {twelve}\n\n{twelve}"  # not f's 11 words


def test_val_split_is_stable_and_near_5_percent():
    keys = [f"lib/module_{i}.py" for i in range(4000)]
    val = data._val_keys(keys)
    assert within(len(val), 4000, 0.05)
    assert val == {k for k in keys if data.key_hash(k) < 0.05}  # exactly those whose hash is in the lowest 5%
    assert val == data._val_keys(reversed(keys))
    assert data._val_keys(keys[:2000]) == {k for k in val if k in set(keys[:2000])}
    # A small source keeps a document on each side; one of a single document trains on it.
    held_out = sorted(val)[:2]  # keys that the hash alone sends to validation
    assert data._val_keys(held_out[:1]) == set() and len(data._val_keys(held_out)) == 1
    assert train.describe_eval({}, "pretrain") == "validation loss: no held-out text"  # what such a run logs


def test_corpus_splits_do_not_overlap(tiny, enc):
    assert tiny.sources == data.SOURCES
    for source in data.SOURCES:
        train, val = tiny.train[source], tiny.val[source]
        assert len(val.keys) >= 1 and len(train.keys) >= 1
        assert not set(train.keys) & set(val.keys)
        assert train.tokens.dtype == np.uint16 and len(train.offsets) == len(train.keys) + 1
        val_texts = {enc.decode(val.doc(i).tolist()) for i in range(len(val.keys))}
        train_texts = {enc.decode(train.doc(i).tolist()) for i in range(len(train.keys))}
        assert not val_texts & train_texts
    assert enc.decode(tiny.train["code"].doc(0).tolist()).startswith("def f")


def test_bad_input_is_skipped_with_counts(tmp_path):
    empty, bad = tmp_path / "empty", tmp_path / "bad"
    empty.mkdir()
    (bad / "sub").mkdir(parents=True)
    (bad / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (bad / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (bad / "blank.md").write_text("  \n\n")
    (bad / "sub" / "dangling.py").symlink_to(tmp_path / "nowhere.py")
    (bad / ".hidden.txt").write_text("hidden files are never read")
    with pytest.raises(data.DataError, match="no usable input files") as error:
        data.build_corpus([empty, bad], cache_dir=tmp_path / "cache", progress=False, default_sources=False)
    assert "\n" not in str(error.value)
    for reason in ("1 binary", "1 empty,", "1 empty folder", "1 non-UTF-8", "1 unreadable"):
        assert reason in str(error.value)
    (bad / "good.py").write_text("print('hello')\n")
    corpus = data.build_corpus([empty, bad], cache_dir=tmp_path / "cache", progress=False, default_sources=False)
    assert corpus.skipped == {"binary": 1, "empty": 1, "empty folder": 1, "non-UTF-8": 1, "unreadable": 1}
    assert corpus.sources == ("code",)
    with pytest.raises(data.DataError, match="does not exist"):
        data.build_corpus([tmp_path / "typo"], cache_dir=tmp_path / "cache", progress=False, default_sources=False)


def test_a_name_that_is_not_utf8_is_read_like_any_other(tmp_path):
    folder = tmp_path / os.fsdecode(b"caf\xe9")  # Latin-1 names, as an old archive may hold
    try:
        folder.mkdir()
        (folder / os.fsdecode(b"r\xe9sum\xe9.py")).write_text("print('bonjour')\n")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes UTF-8 names only")
    (folder / "other.py").write_text("print('hello')\n")
    corpus = data.build_corpus([folder], cache_dir=tmp_path / "cache", progress=False, default_sources=False)
    keys = corpus.train["code"].keys + corpus.val["code"].keys
    assert sorted(keys) == ["caf\\xe9/other.py", "caf\\xe9/r\\xe9sum\\xe9.py"] and not any(corpus.skipped.values())


def test_a_data_folder_routes_each_file_by_its_first_folder_else_its_suffix(tmp_path, monkeypatch):
    """A file named like a source goes by its suffix (only a folder routes); the user's own test
    modules are read (only the default sources leave them out); a hidden folder (.git) is not."""
    files = {"math/drills/p.txt": "math", "web/code/notes.py": "web", "LOUD.PY": "code", "readme.txt": "web",
             "code": "web", "test_utils.py": "code", ".git/config": None}
    for rel in files:
        (tmp_path / "mine" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "mine" / rel).write_text("x = 1\nprint(x)\n" * 20)
    inputs = data._user_inputs([tmp_path / "mine"], collections.Counter())
    assert {i.key: i.source for i in inputs} == {f"mine/{rel}": source for rel, source in files.items() if source}
    # In the same order whatever order the file system lists its entries in.
    listed = os.walk

    def backwards(root, **options):
        for folder, dirs, names in listed(root, **options):
            dirs.reverse()  # in place: the walk still descends into what the caller keeps of them
            yield folder, dirs, names[::-1]
    monkeypatch.setattr(os, "walk", backwards)
    assert data._user_inputs([tmp_path / "mine"], collections.Counter()) == inputs


def test_data_folders_of_one_name_keep_their_files_apart(tmp_path):
    """a/src/README.md and b/src/README.md are two documents: one of them is trained on (with one
    key for both, both were held out, and the web source was gone)."""
    for parent in ("a", "b"):
        (tmp_path / parent / "src").mkdir(parents=True)
        (tmp_path / parent / "src" / "README.md").write_text(f"Notes from {parent}, in a few words.\n")
        (tmp_path / parent / "src" / f"{parent}.py").write_text(f"print('{parent}')\n")
    folders = [tmp_path / "a" / "src", tmp_path / "b" / "src"]
    corpus = data.build_corpus(folders, cache_dir=tmp_path / "cache", progress=False, default_sources=False)
    web = corpus.train["web"].keys + corpus.val["web"].keys
    assert sorted(web) == ["src#2/README.md", "src/README.md"] and len(corpus.train["web"].keys) == 1
    with pytest.raises(data.DataError, match="is given twice"):
        data.build_corpus([folders[0], folders[0]], cache_dir=tmp_path / "cache", progress=False,
                          default_sources=False)


def test_an_atomic_write_reaches_the_disk_before_its_rename(tmp_path, monkeypatch):
    # A rename can reach the disk before the data it names: after a power cut, an unsynced
    # checkpoint could come back as an empty file where the previous one was.
    events, fsync, replace_file = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.fstat(fd).st_size)) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", b)) or replace_file(a, b))

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"weights")

    data.write_atomically(str(tmp_path / "ckpt.pt"), write)
    assert events == [("fsync", 7), ("replace", str(tmp_path / "ckpt.pt"))]
    assert (tmp_path / "ckpt.pt").read_bytes() == b"weights" and os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links need extra rights on Windows")
def test_an_atomic_write_through_a_symbolic_link_replaces_the_file_it_points_at(tmp_path):
    (tmp_path / "big-disk").mkdir()
    (tmp_path / "big-disk" / "results.json").write_text("old")
    (tmp_path / "results.json").symlink_to(tmp_path / "big-disk" / "results.json")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("new")

    data.write_atomically(str(tmp_path / "results.json"), write)
    assert (tmp_path / "results.json").is_symlink() and (tmp_path / "big-disk" / "results.json").read_text() == "new"
    assert sorted(os.listdir(tmp_path / "big-disk")) == ["results.json"]  # no temporary file left


def test_cache_reused_and_rebuilt_on_change(tmp_path, enc):
    root = write_tiny_corpus(tmp_path / "src", seed=5, n=4)
    cache = tmp_path / "cache"
    first = data.build_corpus([root], cache_dir=cache, progress=False, default_sources=False)
    again = data.build_corpus([root], cache_dir=cache, progress=False, default_sources=False)
    assert not first.from_cache and again.from_cache and again.folder == first.folder
    assert not list(cache.rglob("*.tmp*"))   # atomic writes leave no temporary files
    for source in data.SOURCES:
        assert np.array_equal(first.train[source].tokens, again.train[source].tokens)
    (root / "code" / "mod0.py").write_text("def changed():\n    return 'new text'\n")
    changed = data.build_corpus([root], cache_dir=cache, progress=False, default_sources=False)
    assert not changed.from_cache and changed.folder != first.folder
    split = changed.train["code"] if "src/code/mod0.py" in changed.train["code"].keys else changed.val["code"]
    doc = split.doc(split.keys.index("src/code/mod0.py"))
    assert enc.decode(doc.tolist()) == "def changed():\n    return 'new text'\n"
    # The same texts, in the same order, one under another name: keys (and the split a document
    # falls in) follow the name.
    (root / "code" / "mod0.py").rename(root / "code" / "mod0b.py")
    renamed = data.build_corpus([root], cache_dir=cache, progress=False, default_sources=False)
    assert not renamed.from_cache and "src/code/mod0b.py" in renamed.train["code"].keys + renamed.val["code"].keys
    # The same texts and names, another tokenizer: two tokens trade ids, so the cached ids are wrong.
    lines = data.TOKENIZER_FILE.read_bytes().splitlines()
    (first_bytes, first_rank), (second_bytes, second_rank) = lines[300].split(), lines[301].split()
    lines[300:302] = [first_bytes + b" " + second_rank, second_bytes + b" " + first_rank]
    traded = tmp_path / "traded.tiktoken"
    traded.write_bytes(b"\n".join(lines) + b"\n")
    retokenized = data.build_corpus([root], cache_dir=cache, progress=False, default_sources=False,
                                    tokenizer_path=traded)
    assert not retokenized.from_cache and retokenized.folder not in (first.folder, renamed.folder)


def test_cache_rebuilt_when_the_split_pattern_the_held_out_share_or_the_docstring_cut_changes(tmp_path, monkeypatch):
    """The same rank file with another pre-tokenization pattern encodes differently: the cached
    tokens of the old pattern must not be reused."""
    root = write_tiny_corpus(tmp_path / "src", seed=5, n=4)
    first = data.build_corpus([root], cache_dir=tmp_path / "cache", progress=False, default_sources=False)
    monkeypatch.setattr(data, "SPLIT_PATTERN", r"\S+|\s+")  # whole words with their punctuation
    changed = data.build_corpus([root], cache_dir=tmp_path / "cache", progress=False, default_sources=False)
    assert not changed.from_cache and changed.folder != first.folder
    split = changed.train["code"]
    assert split.doc(0).tolist() == data.load_tokenizer().encode_ordinary(
        (root.parent / split.keys[0]).read_text())
    assert split.doc(0).tolist() != first.train["code"].doc(first.train["code"].keys.index(split.keys[0])).tolist()
    # Another held-out share moves documents between the splits: that cache cannot be reused either.
    monkeypatch.setattr(data, "VAL_FRACTION", 0.5)
    halved = data.build_corpus([root], cache_dir=tmp_path / "cache", progress=False, default_sources=False)
    assert not halved.from_cache and halved.folder not in (first.folder, changed.folder)
    # Nor one whose docstring documents were cut at another word count (the default corpus's web and math).
    monkeypatch.setattr(data, "MIN_DOCSTRING_WORDS", 5)
    wordier = data.build_corpus([root], cache_dir=tmp_path / "cache", progress=False, default_sources=False)
    assert not wordier.from_cache and wordier.folder not in (first.folder, changed.folder, halved.folder)
    # Nor one whose files went to another source: the same notes.txt, as code instead of web.
    (root / "notes.txt").write_text("x = 1\nprint(x)\n")
    as_web = data.build_corpus([root], cache_dir=tmp_path / "cache", progress=False, default_sources=False)
    monkeypatch.setattr(data, "CODE_SUFFIXES", data.CODE_SUFFIXES | {".txt"})
    as_code = data.build_corpus([root], cache_dir=tmp_path / "cache", progress=False, default_sources=False)
    assert not as_code.from_cache and "src/notes.txt" in as_code.train["code"].keys + as_code.val["code"].keys
    assert as_web.folder != as_code.folder


@pytest.mark.parametrize("damage", ["truncated tokens", "empty offsets", "garbled offsets", "torn manifest",
                                    "shortened tokens", "overwritten tokens", "swapped offsets",
                                    "shifted offsets"])
def test_damaged_cache_is_rebuilt(tmp_path, damage):
    root = write_tiny_corpus(tmp_path / "src", seed=5, n=4)
    first = data.build_corpus([root], cache_dir=tmp_path / "cache", progress=False, default_sources=False)
    # Copies: the damage below rewrites files that first's arrays are memory maps of.
    expected = {s: (np.array(first.train[s].tokens), first.val[s].offsets.copy()) for s in data.SOURCES}
    tokens = first.folder / "code.train.tokens.npy"
    if damage == "truncated tokens":
        tokens.write_bytes(tokens.read_bytes()[:150])
    elif damage == "empty offsets":
        (first.folder / "code.val.offsets.npy").write_bytes(b"")
    elif damage == "garbled offsets":
        (first.folder / "web.val.offsets.npy").write_bytes(b"not an array")
    elif damage == "torn manifest":
        (first.folder / "manifest.json").write_text('{"fingerprint": "')
    elif damage == "shortened tokens":  # a valid array, but shorter than the offsets say
        np.save(tokens, np.load(tokens)[:-3])
    elif damage == "overwritten tokens":  # the same size, but ids no tokenizer gives (the embedding would fail)
        np.save(tokens, np.full_like(np.load(tokens), 65535))
    elif damage == "swapped offsets":  # the same size, but a document that ends before it starts
        offsets = np.load(first.folder / "code.train.offsets.npy")
        offsets[[1, 2]] = offsets[[2, 1]]
        np.save(first.folder / "code.train.offsets.npy", offsets)
    else:  # the same size, but the first document starts a token late: that token would belong to none
        offsets = np.load(first.folder / "code.train.offsets.npy")
        offsets[0] = 1
        np.save(first.folder / "code.train.offsets.npy", offsets)
    rebuilt = data.build_corpus([root], cache_dir=tmp_path / "cache", progress=False, default_sources=False)
    assert not rebuilt.from_cache and rebuilt.folder == first.folder
    for source, (train_tokens, val_offsets) in expected.items():
        assert np.array_equal(rebuilt.train[source].tokens, train_tokens)
        assert np.array_equal(rebuilt.val[source].offsets, val_offsets)

# --- §3.2 curriculum and §3.2.1 repetition -------------------------------------------------------

# Report Table 3 and §3.2.2, copied here independently of data.PHASES so a typo there fails a test.
TABLE_3 = [(58.0, {"web": 70, "code": 23, "math": 6}), (26.2, {"web": 44, "code": 42, "math": 14}),
           (15.9, {"web": 23, "code": 59, "math": 18})]
FIM_RATES = [{"web": 0.5, "code": 0.5, "math": 0.5}, {"web": 0.1, "code": 0.1, "math": 0.1},
             {"web": 0.0, "code": 0.5, "math": 0.0}]


def expected_mixture(p):
    mix = TABLE_3[p][1]
    return {s: w / sum(mix.values()) for s, w in mix.items()}


def test_phase_table_matches_report():
    assert [(p.share, p.mixture) for p in data.PHASES] == TABLE_3
    for p, phase in enumerate(data.PHASES):
        assert data.phase_mixture(phase) == pytest.approx(expected_mixture(p))
        rates = {s: phase.fim_rate if s == "code" or not phase.fim_code_only else 0.0 for s in data.SOURCES}
        assert rates == FIM_RATES[p]


def test_phase_boundaries():
    total = 10_000
    phases = [data.phase_index(step, total) for step in range(total)]
    assert phases == sorted(phases) and set(phases) == {0, 1, 2}
    norm = sum(share for share, _ in TABLE_3)   # 100.1: Table 3's shares do not sum to 100
    # Each phase starts at the first step whose fraction of the run reaches the shares before it:
    # 58.0 / 100.1 of 10,000 steps is 5794.2, so phase 2 starts at step 5795 (and phase 3 at 8412).
    assert [phases.index(i) for i in range(3)] == [0, math.ceil(total * 58.0 / norm),
                                                   math.ceil(total * (58.0 + 26.2) / norm)] == [0, 5795, 8412]


def test_repetition_cap(tiny):
    n_code = len(tiny.train["code"].tokens)
    code_share = sum(p.share * data.phase_mixture(p)["code"] for p in data.PHASES) / sum(p.share for p in data.PHASES)
    budget_at_cap = data.MAX_REPETITION * n_code / code_share
    reps = data.planned_repetition(tiny, budget_at_cap * 0.99)
    assert abs(reps["code"] - 0.99 * data.MAX_REPETITION) < 1e-6
    data.check_repetition(tiny, 100)
    # Just under and just over the cap, for the source the plan repeats most.
    per_token = data.planned_repetition(tiny, 1_000_000)
    most = max(per_token, key=per_token.get)
    at_cap = data.MAX_REPETITION * 1_000_000 / per_token[most]
    data.check_repetition(tiny, int(at_cap * 0.99))
    with pytest.raises(data.RepetitionError, match=rf"repeat {most} 4\.0x"):
        data.check_repetition(tiny, int(at_cap * 1.01))
    with pytest.raises(data.RepetitionError, match="cap of 4x"):
        data.check_repetition(tiny, 1_000_000)
    data.check_repetition(tiny, 1_000_000, allow_over_repetition=True)
    with pytest.raises(data.RepetitionError):
        data.BatchSampler(tiny, seed=0, batch_size=8, seq_len=64, total_steps=10_000)
    data.BatchSampler(tiny, seed=0, batch_size=8, seq_len=64, total_steps=10_000, allow_over_repetition=True)
    # One phase at every step (the long-context stage): that phase's mix is what gets repeated.
    last = len(data.PHASES) - 1
    per_step = data.planned_repetition(tiny, 8 * 64, phase=last)  # epochs per step of 8 x 64 tokens
    assert per_step["code"] == pytest.approx(8 * 64 * data.phase_mixture(data.PHASES[last])["code"] / n_code)
    steps = int(0.9 * data.MAX_REPETITION / max(data.planned_repetition(tiny, 8 * 64).values()))
    data.BatchSampler(tiny, seed=0, batch_size=8, seq_len=64, total_steps=steps)  # the curriculum: under the cap
    with pytest.raises(data.RepetitionError):  # phase 3 alone reads code more than the curriculum does
        data.BatchSampler(tiny, seed=0, batch_size=8, seq_len=64, total_steps=steps, phase=last)


def test_data_report_prints_plan(tiny, capsys):
    data.data_report(tiny, 50_000)
    out = capsys.readouterr().out
    for needle in ("foundation", "quality uplift", "capability sharpening", "repetition", "bytes/token",
                   "OVER THE CAP"):
        assert needle in out
    # the figures, not only the labels: the repetition row is the plan's, and each source's tokens
    # over the three phases add up to its share of the budget
    plan = data.planned_repetition(tiny, 50_000)
    assert re.search(r"repetition \(epochs\) +" + " +".join(f"{plan[s]:.2f}x" for s in data.SOURCES), out)
    rows = [re.search(rf"^{name} +[\d.]+% +.*?([\d,]+) +([\d,]+) +([\d,]+)$", out, re.M) for name in
            ("foundation", "quality uplift", "capability sharpening")]
    for i, source in enumerate(data.SOURCES):
        planned = sum(int(row.group(i + 1).replace(",", "")) for row in rows)
        assert planned == pytest.approx(plan[source] * len(tiny.train[source].tokens), abs=3)
    # The long stage's report, of its one phase: the repetition row is that phase's plan.
    last = len(data.PHASES) - 1
    data.data_report(tiny, 50_000, phase=last)
    plan = data.planned_repetition(tiny, 50_000, phase=last)
    assert plan != data.planned_repetition(tiny, 50_000)
    assert re.search(r"repetition \(epochs\) +" + " +".join(f"{plan[s]:.2f}x" for s in data.SOURCES),
                     capsys.readouterr().out)
    # The released model's budget, trillions of tokens, keeps the columns straight: every line of the
    # plan ends where its header does.
    data.data_report(tiny, 10_853_483_020_288)
    table = capsys.readouterr().out.split("normalised to 100%)\n")[1].splitlines()
    table[-2] = table[-2].split("   cap")[0]
    assert table[0].startswith("phase") and table[-2].startswith("repetition")
    assert len({len(line) for line in table[:-1]}) == 1 and len(table[0]) > 80


def test_the_long_stage_data_report_plans_its_own_sequences(small_corpus, tmp_path, capsys, monkeypatch):
    # Its token budget counts sequences of the long context (4x the context of the model it starts
    # from, not of the --size preset), read from phase 3.
    (tmp_path / "base").mkdir()
    base = replace(SMALL, max_seq_len=48)
    train.save_checkpoint(tmp_path / "base" / "ckpt.pt", Mellum2(base), [], 10, {"stage": "pretrain", "steps": 10})
    monkeypatch.setenv("MELLUM2_KERNELS", "triton")  # a setting the report never uses does not stop it
    monkeypatch.setattr(kernels, "triton", None)
    train.train(run_args(small_corpus, tmp_path / "long", "--stage", "long", "--init-from", str(tmp_path / "base"),
                         "--max-steps", "3", "--data-report"))
    out = capsys.readouterr().out
    assert f"plan for {3 * 4 * 4 * 48:,} training tokens" in out
    assert re.search(r"foundation +0\.0%.*\ncapability|capability sharpening +100\.0%", out)
    assert not (tmp_path / "long").exists()
    # A context the run would refuse, the report refuses too (it planned for -3 x 4 x 48 tokens).
    with pytest.raises(ValueError, match="--context -48 must be longer than the model's pre-training context"):
        train.train(run_args(small_corpus, tmp_path / "long", "--stage", "long", "--init-from",
                             str(tmp_path / "base"), "--max-steps", "3", "--context", "-48", "--data-report"))
    # With --compare: every variant trains on those tokens, and one report tells of them all.
    train.main(["--size", "tiny", "--data", small_corpus, "--no-default-data", "--out-dir", str(tmp_path / "long"),
                "--batch-size", "4", "--allow-over-repetition", "--stage", "long",
                "--init-from", str(tmp_path / "base"), "--max-steps", "3", "--data-report", "--compare"])
    assert capsys.readouterr().out.count(f"plan for {3 * 4 * 4 * 48:,} training tokens") == 1
    assert not (tmp_path / "long").exists()


# --- sampler: mixture, FIM, packing, filter, resume ----------------------------------------------

def sampler(corpus, **kw):
    args = dict(seed=11, batch_size=8, seq_len=64, total_steps=1000, allow_over_repetition=True)
    return data.BatchSampler(corpus, **{**args, **kw})


def test_batch_shapes_and_targets(tiny):
    x, y = sampler(tiny).get_batch(0)
    assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < data.VOCAB_SIZE and int(x.min()) >= 0


def test_resume_gives_identical_batches(tiny):
    run = sampler(tiny)
    uninterrupted = [run.get_batch(step) for step in range(12)]
    resumed = sampler(tiny)
    for step in (11, 7, 8, 9, 10):   # any order, fresh object: only (seed, step) matters
        x, y = resumed.get_batch(step)
        assert torch.equal(x, uninterrupted[step][0]) and torch.equal(y, uninterrupted[step][1])
    assert not torch.equal(uninterrupted[0][0], uninterrupted[1][0])
    other_seed = sampler(tiny, seed=12)  # no (seed, step) pair's batch is another's (seed + step would be)
    for step in (0, 1):
        assert not any(torch.equal(other_seed.get_batch(step)[0], batch[0]) for batch in uninterrupted)


def test_phase_mixture_matches_table(tiny):
    s = sampler(tiny, batch_size=32)
    # The sampler switches where test_phase_boundaries puts the switch (of 1000 steps, 58.0/100.1
    # and 84.2/100.1): phase 3's first step is the schedule's first lowered one.
    assert [data.PHASES.index(s.phase_at(step)) for step in (579, 580, 841, 842)] == [0, 1, 1, 2]
    for p, steps in ((0, range(0, 150)), (1, range(600, 750)), (2, range(850, 1000))):
        counts = collections.Counter(src for step in steps for src in s.sample(step).sources)
        n = sum(counts.values())
        for source, prob in expected_mixture(p).items():
            assert within(counts[source], n, prob), (p, source, counts)
    # The long stage holds one phase (the third) from its first step on; any phase can be held, the
    # first too, at steps where the curriculum would be in another.
    for phase, steps in ((2, range(0, 150)), (0, range(850, 1000))):
        held = sampler(tiny, batch_size=32, phase=phase)
        counts = collections.Counter(src for step in steps for src in held.sample(step).sources)
        for source, prob in expected_mixture(phase).items():
            assert within(counts[source], sum(counts.values()), prob), (phase, source, counts)


def test_pieces_are_drawn_alike_the_last_one_too(tiny):
    s = sampler(tiny)
    s.pieces["code"] = s.pieces["code"][-2:]  # a table of two, the corpus's last two pieces of code
    items = [tuple(s._item(np.random.default_rng([1, i]), "code", 0.0)) for i in range(400)]
    kinds = collections.Counter(items)
    assert len(kinds) == 2 and all(within(count, 400, 0.5) for count in kinds.values()), kinds


def test_best_fit_packing_fills_rows_without_cutting(tiny, monkeypatch):
    """Pieces of 12, 5, 5 and 12 tokens into two rows of 17: best fit puts each into the fullest row
    that still holds it, so both rows end exactly full ([12, 5] and [5, 12]) and nothing is cut;
    placing each piece in the emptiest row would cut the last one."""
    s = sampler(tiny, seq_len=16)
    lengths = iter([12, 5, 5, 12])
    monkeypatch.setattr(s, "_item", lambda rng, source, fim_rate: np.arange(next(lengths)))
    rows = s._pack(np.random.default_rng(0), "code", data.PHASES[0], 2)
    assert [[len(piece) for piece in row] for row in rows] == [[12, 5], [5, 12]]
    # A piece that fits nowhere (8, with 5 and 7 free) is cut into the emptiest row, leaving the
    # other room for a whole one; cut into the fullest, it would leave two cuts.
    lengths = iter([12, 10, 8, 5, 3])
    rows = s._pack(np.random.default_rng(0), "code", data.PHASES[0], 2)
    assert [[len(piece) for piece in row] for row in rows] == [[12, 5], [10, 7]]


def test_pieces_tile_each_document_and_leave_room_for_fim(tiny):
    """Documents are cut into pieces of at most seq_len - 3 tokens, so that a piece made a FIM example
    (three sentinels) with its <|endoftext|> still fits a row of seq_len + 1 whole."""
    s = sampler(tiny, seq_len=16)
    for source in s.sources:
        starts, ends, ends_document = s.pieces[source].T
        offsets = tiny.train[source].offsets
        assert (ends - starts).max() == 16 - 3 and (ends > starts).all()
        assert starts[0] == 0 and (starts[1:] == ends[:-1]).all() and ends[-1] == offsets[-1]
        assert set(ends[ends_document == 1].tolist()) == set(offsets[1:].tolist())


def test_a_row_the_diversity_filter_drops_is_packed_again(tiny, monkeypatch):
    """Only the dropped row is packed again, so the batch ends with exactly its size."""
    checked = []

    def drop_the_first(row, seq_len):
        checked.append(len(row))
        return len(checked) > 1
    monkeypatch.setattr(data, "keep_sequence", drop_the_first)
    x, _ = sampler(tiny).get_batch(0)
    assert x.shape == (8, 64) and len(checked) == 8 + 1


def test_fim_rates_by_phase_and_items_reassemble(tiny):
    """Every complete document in a row is a slice of a training document of the row's source
    (after undoing FIM); <|endoftext|> follows plain text only where a document ends, never where
    a long one was cut into pieces; FIM and PSM/SPM rates match §3.2.2 per phase."""
    s = sampler(tiny, batch_size=16)
    cap = s.seq_len - 3  # the longest piece; a piece that does not end its document is this long
    train_docs = {src: [tiny.train[src].doc(i).tolist() for i in range(len(tiny.train[src].keys))]
                  for src in data.SOURCES}
    assert any(len(doc) > cap for doc in train_docs["math"])  # some documents are cut
    endings = {src: {tuple(doc[-n:]) for doc in docs for n in range(1, 17)} for src, docs in train_docs.items()}
    for p, steps in ((0, range(0, 200)), (1, range(600, 800)), (2, range(845, 1000))):
        fim, spm = collections.Counter(), collections.Counter()
        total = collections.Counter()
        for step in steps:
            batch = s.sample(step)
            for row, source in zip(full_rows(batch), batch.sources):
                for item in complete_items(row):
                    if FIM_MIDDLE not in item:  # plain text up to <|endoftext|>: a document's end
                        assert tuple(item[-16:]) in endings[source]
                    if len(fim_reassemble(item)) >= cap - 3:  # may be a cut piece run on into the next item
                        continue
                    is_fim = bool(item) and item[0] in (FIM_PREFIX, FIM_SUFFIX)
                    total[source] += 1
                    fim[source] += is_fim
                    spm[source] += is_fim and item[0] == FIM_SUFFIX
                    original = fim_reassemble(item)
                    assert max(original, default=0) < data.N_RANKS
                    assert any(contains(doc, original) for doc in train_docs[source])
        for source in data.SOURCES:
            assert total[source] > 100
            assert within(fim[source], total[source], FIM_RATES[p][source]), (p, source, fim, total)
        assert within(sum(spm.values()), sum(fim.values()), 0.5)


def test_fim_transform_inverse_and_formats():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        doc = rng.integers(0, data.N_RANKS, size=rng.integers(0, 40))
        spm = bool(rng.random() < 0.5)
        out = data.fim_transform(doc, rng, spm)
        assert len(out) == len(doc) + 3
        assert out[0] == (FIM_SUFFIX if spm else FIM_PREFIX)
        assert fim_reassemble(out) == doc.tolist()
        assert fim_reassemble(list(out) + [data.EOT]) == doc.tolist()
    S, P, M = FIM_SUFFIX, FIM_PREFIX, FIM_MIDDLE
    assert data.fim_prompt([1, 2], [3]) == [S, 3, P, 1, 2, M]             # Mellum-4B order (SPM)
    assert data.fim_prompt([1, 2], [3], spm=False) == [P, 1, 2, S, 3, M]  # PSM
    assert fim_reassemble([5, 6, data.EOT]) == [5, 6]


def test_cut_points_are_uniform():
    """Each of the 3 parts gets 1/3 of the tokens on average (two uniform cuts)."""
    rng = np.random.default_rng(1)
    doc = np.arange(300)
    lengths = np.zeros(3)
    for _ in range(3000):
        out = data.fim_transform(doc, rng, spm=False).tolist()
        i_s, i_m = out.index(FIM_SUFFIX), out.index(FIM_MIDDLE)
        lengths += (i_s - 1, len(out) - i_m - 1, i_m - i_s - 1)   # prefix, middle, suffix
    assert np.allclose(lengths / lengths.sum(), 1 / 3, atol=0.02)


def test_unique_token_filter(tmp_path):
    assert data.min_unique_tokens(8192) == 82 and data.min_unique_tokens(256) == 3
    assert data.keep_sequence(np.arange(82), 8192) and not data.keep_sequence(np.arange(81), 8192)
    root = tmp_path / "src"
    (root / "code").mkdir(parents=True)
    (root / "code" / "flat.py").write_text("0 " * 4000)             # ~3 distinct tokens
    cache = tmp_path / "cache"
    degenerate = data.build_corpus([root], cache_dir=cache, progress=False, default_sources=False)
    with pytest.raises(data.DataError, match="1%-unique"):
        sampler(degenerate, seq_len=1024, batch_size=2).get_batch(0)
    (root / "code" / "varied.py").write_text(" ".join(f"v{i} = {i * 7919 % 1000}" for i in range(800)))
    mixed = data.build_corpus([root], cache_dir=cache, progress=False, default_sources=False)
    s = sampler(mixed, seq_len=1024, batch_size=4)
    for step in range(10):
        for row in s.get_batch(step)[0]:
            assert len(torch.unique(row)) >= data.min_unique_tokens(1024)
    # The whole row counts: a file of 600 flat tokens, then 400 varied ones, gives rows whose first
    # half is as flat as flat.py, and those rows are kept.
    (tmp_path / "half" / "code").mkdir(parents=True)
    (tmp_path / "half" / "code" / "half.py").write_text("0 " * 300 + " ".join(f"v{i} = {i}" for i in range(60)))
    half = data.build_corpus([tmp_path / "half"], cache_dir=cache, progress=False, default_sources=False)
    rows = torch.cat([sampler(half, seq_len=1024, batch_size=4).get_batch(step)[0] for step in range(5)])
    assert any(len(torch.unique(row[:512])) < data.min_unique_tokens(1024) for row in rows)


def test_val_batches(tiny):
    seen = []
    for source in data.SOURCES:
        batches = list(data.val_batches(tiny, source, batch_size=2, seq_len=16, max_rows=6))
        assert 1 <= len(batches) <= 3
        again = list(data.val_batches(tiny, source, batch_size=2, seq_len=16, max_rows=6))
        for (x, y), (x2, y2) in zip(batches, again):
            assert x.shape[1] == 16 and torch.equal(x[:, 1:], y[:, :-1])
            assert torch.equal(x, x2) and torch.equal(y, y2)
        seen.append(torch.cat([x for x, _ in batches]))
        val_tokens = set(np.asarray(tiny.val[source].tokens).tolist()) | {data.EOT}
        assert set(seen[-1].flatten().tolist()) <= val_tokens



def test_val_batches_lay_the_documents_end_to_end(tmp_path):
    """The held-out documents, each followed by <|endoftext|>, cut into consecutive rows of T + 1
    tokens (a row's last target is the next row's first input); with max_rows, rows from all over."""
    corpus = data.build_corpus([write_tiny_corpus(tmp_path / "src", n=60)], cache_dir=tmp_path / "cache",
                               progress=False, default_sources=False)
    split = corpus.val["code"]
    stream = [t for i in range(len(split.keys)) for t in [*split.doc(i).tolist(), data.EOT]]
    assert len(split.keys) >= 2 and len(stream) % 5 == 0  # with T = 5 the last T tokens make no row

    def rows_of(batches):
        return [x_row.tolist() + [y_row[-1].item()] for x, y in batches for x_row, y_row in zip(x, y)]
    for T in (4, 5):
        rows = [stream[s:s + T + 1] for s in range(0, len(stream) - T, T)]
        assert rows_of(data.val_batches(corpus, "code", batch_size=3, seq_len=T)) == rows
        for batch_size in (1, 2):
            assert rows_of(data.val_batches(corpus, "code", batch_size, seq_len=T, max_rows=2)) == \
                [rows[0], rows[len(rows) // 2]]
        # A count whose steps of n_rows // n rows would leave the last rows out: spread by i * n_rows // n.
        used = next(n for n in range(3, len(rows)) if len(rows) % n > 1)
        assert rows_of(data.val_batches(corpus, "code", 2, seq_len=T, max_rows=used)) == \
            [rows[i * len(rows) // used] for i in range(used)]
    # One row of the whole stream: the last document's <|endoftext|> is its last target.
    assert rows_of(data.val_batches(corpus, "code", 1, seq_len=len(stream) - 1)) == [stream]
    # A source the corpus does not have gives no batches.
    code_only = data.build_corpus([tmp_path / "src" / "code"], cache_dir=tmp_path / "cache", progress=False,
                                  default_sources=False)
    assert code_only.sources == ("code",) and list(data.val_batches(code_only, "web", 2, 16)) == []


@torch.no_grad()
def test_the_validation_loss_is_the_mean_over_rows_whatever_the_batching(tmp_path):
    corpus = data.build_corpus([write_tiny_corpus(tmp_path / "src", n=60)], cache_dir=tmp_path / "cache",
                               progress=False, default_sources=False)
    model = randomize(Mellum2(replace(SMALL, vocab_size=data.VOCAB_SIZE))).eval()
    rows = [(x, y) for x, y in data.val_batches(corpus, "code", batch_size=1, seq_len=5)]
    batch_size = next(b for b in range(2, len(rows)) if len(rows) % b)  # the last batch is short
    per_row = [F.cross_entropy(model(x)[0][0], y[0]).item() for x, y in rows]
    loss = train.validation_loss(model, corpus, "code", batch_size, 5, None, "cpu")
    assert loss == pytest.approx(sum(per_row) / len(per_row), rel=1e-5)
    # A number of rows is the same rows whatever the batch size (a run resumed with another --micro-batch)
    assert train.validation_loss(model, corpus, "code", batch_size, 5, 3, "cpu") == \
        pytest.approx(train.validation_loss(model, corpus, "code", 1, 5, 3, "cpu"), rel=1e-5)


# -----------------------------------------------------------------------------------------------
# Pre-training (train.py): Muon against torch.optim.Muon, the schedule, FP8, distributed, resume



def muon_pair(shapes, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, theirs


def step_with_grads(params_and_optimizers, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = None
        for params, opt in params_and_optimizers:
            grads = grads or [torch.randn(p.shape, generator=g) for p in params]
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt.step()


def test_muon_equals_torch_muon_on_matrices():
    shapes = [(64, 256), (256, 64), (128, 128), (96, 200)]
    ours, theirs = muon_pair(shapes)
    opt = train.Muon(ours, lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)  # torch's Muon iterates in bf16
    ref = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    step_with_grads([(ours, opt), (theirs, ref)], steps=5)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)  # the same arithmetic in the same order: bit-identical


# Tall; wide, as the release's gate and up stacks (E, F, D) are; more experts than rows or columns.
@pytest.mark.parametrize("shape", [(6, 48, 32), (6, 32, 48), (64, 32, 48)])
def test_muon_orthogonalises_each_expert_on_its_own(shape):
    experts = torch.nn.Parameter(torch.randn(shape))
    slices = [torch.nn.Parameter(experts.detach()[e].clone()) for e in range(shape[0])]
    opt = train.Muon([experts], lr=0.01, weight_decay=0.1, ns_dtype=torch.bfloat16)
    ref = torch.optim.Muon(slices, lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        grad = torch.randn(experts.shape, generator=g)
        experts.grad = grad.clone()
        for e, p in enumerate(slices):
            p.grad = grad[e].clone()
        opt.step()
        ref.step()
    assert (experts.detach() - torch.stack([p.detach() for p in slices])).abs().max().item() < 1e-6
    # Flattening the stack into one (E*out, in) matrix would be a different, wrong update.
    flat = train.orthogonalize(torch.randn(6 * 48, 32)).view(6, 48, 32)
    assert not torch.allclose(flat, train.orthogonalize(flat.float()), atol=1e-2)


def test_a_gpu_is_picked_by_an_index_it_has(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert mellum2.pick_device() == torch.device("cuda") and mellum2.pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="device 'cuda:2' is not available on this machine"):  # numbered from 0
        mellum2.pick_device("cuda:2")


def test_a_mac_gpu_is_picked_when_there_is_no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert mellum2.pick_device() == torch.device("mps")


def test_bf16_only_on_gpus_with_bf16_matrix_units(monkeypatch):
    # A T4 (compute capability 7.5) emulates bf16, so torch.cuda.is_bf16_supported() says yes; but
    # there it is slow, and Triton's bf16 dots do not compile. The capability is the asked device's.
    asked = []
    for capability, dtype in (((7, 5), torch.float32), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device=None, capability=capability: asked.append(device) or capability)
        assert mellum2.pick_dtype("cuda:1") == dtype
    assert asked == [torch.device("cuda:1")] * 3
    assert mellum2.pick_dtype("cpu") == mellum2.pick_dtype("mps") == torch.float32


def test_muon_iterates_in_the_models_compute_dtype():
    # On a CPU the model computes in fp32, and so does Newton-Schulz: bf16 matmuls are emulated, and
    # slow, on CPUs without bf16 instructions. An explicit ns_dtype still wins.
    def update(**kwargs):
        p = torch.nn.Parameter(torch.zeros(48, 32))
        p.grad = torch.randn(48, 32, generator=torch.Generator().manual_seed(3))
        train.Muon([p], lr=1.0, weight_decay=0.0, momentum=0.0, **kwargs).step()
        return -p.detach() / (0.2 * math.sqrt(48))
    grad = torch.randn(48, 32, generator=torch.Generator().manual_seed(3))
    assert train.pick_dtype("cpu") == torch.float32
    in_fp32, in_bf16 = train.orthogonalize(grad, dtype=torch.float32), train.orthogonalize(grad).float()
    assert (in_fp32 - in_bf16).abs().max() > 1e-3  # the two are told apart
    assert (update() - in_fp32).abs().max() < 1e-6
    assert (update(ns_dtype=torch.bfloat16) - in_bf16).abs().max() < 1e-6


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="matrices"):
        train.Muon([torch.nn.Parameter(torch.ones(5))], lr=0.1)


def test_optimizer_routing():
    model = Mellum2(SMALL)
    adamw, muon = train.build_optimizers(model, 1e-3)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in in_muon}
    assert "layers.0.self_attn.q_proj.weight" in names and "layers.0.mlp.gate_proj" in names
    assert "mtp.fc.weight" in names and "mtp.layers.0.mlp.down_proj" in names
    for n in ("embed_tokens.weight", "lm_head.weight", "layers.0.mlp.gate.weight", "norm.weight"):
        assert n not in names
    assert not {n for n in names if n.endswith("mlp.gate.weight")}  # every router, the MTP layer's too
    assert sum(len(g["params"]) for g in adamw.param_groups) + len(in_muon) == len(list(model.parameters()))
    assert adamw.defaults["betas"] == (0.9, 0.95) and adamw.defaults["eps"] == 1e-8  # App. B
    # With no gradient, one step only decays: the matrices (the routers' too) by lr * 0.1, the norm
    # gains not at all.
    gain, head, router = model.norm.weight, model.lm_head.weight, model.layers[0].mlp.gate.weight
    with torch.no_grad():
        gain.mul_(2.0)
    before = {p: p.detach().clone() for p in (gain, head, router)}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for optimizer in (adamw, muon):
        optimizer.step()
    assert torch.equal(gain, before[gain])
    for matrix in (head, router):
        assert torch.allclose(matrix, before[matrix] * (1 - 1e-3 * 0.1))


def test_warmup_hold_decay_at_its_boundaries():
    total, warmup = 1000, 20
    m = lambda s: train.lr_multiplier(s, total, warmup)  # noqa: E731
    decay_start = total - 159
    assert m(0) == pytest.approx(1 / 20) and m(19) == 1.0 and m(20) == 1.0
    assert m(decay_start - 1) == 1.0 and m(decay_start) == 1.0
    assert m(decay_start + 1) == pytest.approx(158 / 159) and m(total - 1) == pytest.approx(1 / 159)
    assert m(total) == 0.0  # linear to exactly zero
    values = [m(s) for s in range(total)]
    assert all(a <= b for a, b in zip(values[:warmup], values[1:warmup]))
    assert all(a >= b for a, b in zip(values[decay_start:], values[decay_start + 1:]))
    # A run's warmup is at most half of it, which shortens no preset's own run.
    for runs in (train.RUNS, train.LONG_RUNS, train.SFT_RUNS, train.GRPO_RUNS):
        for run in runs.values():
            for steps in {run.steps, run.thinking_steps or run.steps}:
                assert train.warmup_within(run.warmup_steps, steps) == run.warmup_steps
    # A run cut short: half of it warms up, the rest holds and decays. One of one step has no warmup,
    # and starts at the peak.
    assert train.warmup_within(20, 10) == 5 and train.warmup_within(20, 41) == 20
    assert train.warmup_within(5, 1) == 0 and train.lr_multiplier(0, 1, 0, decay_fraction=0.0) == 1.0
    assert train.linear_warmup(0, 0) == 1.0


def test_the_learning_rate_falls_from_the_first_step_of_phase_3():
    for run in (train.RUNS["tiny"], train.RUNS["small"]):
        first = next(step for step in range(run.steps) if data.phase_index(step, run.steps) == 2)
        assert train.lr_multiplier(first - 1, run.steps, run.warmup_steps, run.decay_fraction) == 1.0
        assert train.lr_multiplier(first, run.steps, run.warmup_steps, run.decay_fraction) < 1.0


def test_sft_cosine_goes_from_the_peak_to_a_tenth_of_it():
    m = lambda s: train.cosine_multiplier(s, 111, 10)  # noqa: E731  (after warmup, progress (s - 10) / 100)
    assert m(0) == pytest.approx(0.1) and m(9) == 1.0 and m(10) == pytest.approx(1.0)
    assert m(60) == pytest.approx(0.55) and m(110) == pytest.approx(0.1)


def test_the_released_thinking_runs_have_their_own_length():
    """§5.1.2: 3 epochs of 119,334 (Instruct) or 425,322 (Thinking) packed sequences at 64 per step;
    Table 8: RL ran 500 steps (Instruct) and 100 (Thinking). The small presets train both alike."""
    thinking, instruct = train.parse_args(["--variant", "thinking"]), train.parse_args([])
    assert train.preset_steps(train.SFT_RUNS["mellum2-12b"], instruct) == round(3 * 119_334 / 64)
    assert train.preset_steps(train.SFT_RUNS["mellum2-12b"], thinking) == round(3 * 425_322 / 64)
    assert [train.preset_steps(train.GRPO_RUNS["mellum2-12b"], a) for a in (instruct, thinking)] == [500, 100]
    assert train.preset_steps(train.SFT_RUNS["tiny"], thinking) == train.SFT_RUNS["tiny"].steps


def test_batch_ramp_at_its_boundary():
    sizes = [train.batch_size_at(s, 100, 16) for s in range(100)]
    assert sizes[:6] == [8] * 6 and sizes[6:] == [16] * 94
    # 6% of 108 steps is 6.48: steps 0..6 are at half batch, the 7 that train() announces (a ceil).
    sizes = [train.batch_size_at(s, 108, 16) for s in range(108)]
    assert sizes.count(8) == 7 == math.ceil(0.06 * 108) and sizes[7] == 16


def test_fp8_matmul_error_within_the_format_bound():
    """q(x) q(w)^T differs from x w^T by at most what rounding each factor to e4m3 allows: relative
    2^-4 per element (3 mantissa bits, round to nearest) plus, for subnormals, half their spacing."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 96, generator=g) * 3, torch.randn(48, 96, generator=g) * 0.05
    (x8, sx), (w8, sw) = train.to_fp8(x, train.E4M3), train.to_fp8(w, train.E4M3)
    got = train.scaled_mm(x8, sx, w8.t(), sw, torch.float32)
    # Off a GPU, scaled_mm widens to fp32 instead of calling torch's slow CPU FP8 kernel: same numbers.
    reference = torch._scaled_mm(x8, w8.t(), scale_a=sx.reciprocal(), scale_b=sw.reciprocal(),
                                 out_dtype=torch.float32)
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6)
    u = 2.0 ** -4
    ex, ew = u * x.abs() + 2.0 ** -10 / sx, u * w.abs() + 2.0 ** -10 / sw  # per-element error bounds
    bound = x.abs() @ ew.T + ex @ w.abs().T + ex @ ew.T
    err = (got - x @ w.T).abs()
    assert (err <= bound * 1.001 + 1e-6).all()
    assert err.max() > 0 and (err / bound).max() > 0.05  # it does quantise, and the bound is not vacuous
    # The emulated path (round, then an ordinary matmul) is the same arithmetic as the scaled matmul.
    emulated = train._FakeQuant.apply(x, train.E4M3) @ train._FakeQuant.apply(w, train.E4M3).T
    assert torch.allclose(got, emulated, rtol=1e-5, atol=1e-5)


def test_fp8_dense_and_expert_matmuls_follow_the_recipe():
    """y = q4(x) q4(W)^T, dx = q5(g) q4(W), dW = q5(g)^T q4(x), with q4 / q5 the tensorwise rounding
    to e4m3 / e5m2: the dense layer (torch._scaled_mm) and the experts' emulation alike."""
    def rounded(t, dtype):  # what the recipe multiplies: t in 8 bits, scaled back
        t8, scale = train.to_fp8(t, dtype)
        return t8.float() / scale
    torch.manual_seed(0)
    x, w, g = torch.randn(8, 32) * 2, torch.randn(16, 32) * 0.1, torch.randn(8, 16)
    q4x, q4w, q5g = rounded(x, train.E4M3), rounded(w, train.E4M3), rounded(g, train.E5M2)
    expected = (q4x @ q4w.T, q5g @ q4w, q5g.T @ q4x)
    layer = train.Float8Linear(32, 16, bias=False)
    layer.weight.data.copy_(w)
    xd = x.clone().requires_grad_()
    y = layer(xd)
    y.backward(g)
    for got, want in zip((y, xd.grad, layer.weight.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Two experts, the second's weights 1000x smaller: each is rounded with its own scale, so the
    # second expert's output is exactly the first's / 1000 (a shared scale would round it coarsely).
    we = torch.stack([w.T, w.T / 1000]).requires_grad_()  # (2, in, out)
    xe = torch.cat([x, x]).requires_grad_()               # rows 0-7 to expert 0, rows 8-15 to expert 1
    y = train.fp8_grouped_mm(xe, we, torch.tensor([8, 16], dtype=torch.int32))
    y.backward(torch.cat([g, g]))
    (y_want, dx_want, dw_want) = expected
    for got, want in zip((y[:8], y[8:] * 1000, xe.grad[:8], xe.grad[8:] * 1000, we.grad[0].T, we.grad[1].T),
                         (y_want, y_want, dx_want, dx_want, dw_want, dw_want)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(q5g, rounded(g, train.E4M3))  # the two formats do differ here


# -- whole runs on a small corpus of our own (fast, and independent of the installed Python)

@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = torch.Generator().manual_seed(0)
    words = "the model reads code and text then learns to predict the next token of each file".split()
    for i in range(40):
        n = torch.randint(0, len(words), (400,), generator=rng).tolist()
        (folder / f"notes_{i}.txt").write_text(" ".join(words[j] for j in n) + ".\n")
        (folder / f"module_{i}.py").write_text("".join(
            f"def f_{i}_{k}(x):\n    return x * {k} + {i}\n\n" for k in range(40)))
    return str(folder)


def run_args(corpus, out_dir, *extra):
    return train.parse_args(["--size", "tiny", "--data", corpus, "--no-default-data", "--out-dir", str(out_dir),
                             "--batch-size", "4", "--allow-over-repetition", *extra])


def test_the_training_loop_trains_the_ramped_batch(small_corpus, tmp_path, monkeypatch):
    """§3.4.3: the first steps take half the batch, as the run header and the token count say."""
    sizes, train_step = [], train.train_step
    monkeypatch.setattr(train, "train_step",
                        lambda model, x, *args: sizes.append(len(x)) or train_step(model, x, *args))
    train.train(run_args(small_corpus, tmp_path, "--max-steps", "5"))
    assert sizes == [2] + [4] * 4
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["tokens"] == sum(sizes) * 256


def test_a_batch_beyond_memory_is_refused_before_any_step(small_corpus, tmp_path):
    # Else it would draw 10**23 rows (an overflow deep in numpy), or at 10**9 be killed by the system.
    with pytest.raises(ValueError, match=f"--batch-size {10**23}: the token ids of a step would need about "
                                         f"[\\d,]+ GiB and this machine has"):
        train.train(run_args(small_corpus, tmp_path, "--batch-size", str(10**23)))
    assert not (tmp_path / "ckpt.pt").exists()


def rows_per_step(monkeypatch):
    """The list of how many rows each training step takes, filled as train.train_step runs."""
    rows, train_step = [], train.train_step

    def counting_rows(model, x, *args, **kwargs):
        rows.append(len(x))
        return train_step(model, x, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", counting_rows)
    return rows


def test_training_reduces_the_loss_and_writes_metrics(small_corpus, tmp_path, monkeypatch, capsys):
    rows = rows_per_step(monkeypatch)
    train.train(run_args(small_corpus, tmp_path, "--max-steps", "12", "--lr", "3e-3"))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 13))
    # The batch ramp (6% of 12 steps: the first) trains on half of --batch-size 4, and the token count says so,
    # as does the run's header beforehand (the sampler still draws 4 rows a step, as the data plan counts).
    assert rows == [2] + [4] * 11
    assert [r["tokens"] for r in records] == [256 * sum(rows[:i + 1]) for i in range(12)]
    header = f"tokens {records[-1]['tokens']:,} to train (12 steps x 4 x 256, half batch for the first 1); " \
             f"the data plan covers {12 * 4 * 256:,}"
    assert header in capsys.readouterr().out
    assert records[-1]["ntp"] < records[0]["ntp"] - 1.0
    assert {"ntp", "mtp", "aux", "z", "lr", "expert_balance", "phase"} <= set(records[0])
    assert records[-1]["lr"] > 0 and "val" in records[-1]
    # 12 of tiny's 200 steps: warm up for half of them (not the preset's 10), hold, decay
    lrs = [r["lr"] for r in records]
    assert lrs[0] == pytest.approx(3e-3 / 6) and lrs[5] == lrs[10] == 3e-3 and lrs[-1] == pytest.approx(3e-3 / 2)
    state = train.load_checkpoint(tmp_path / "ckpt.pt")
    assert state["step"] == 12 and state["tokenizer"]["sha256"]
    # Every parameter group, the norm gains' too, followed the schedule to its last step.
    assert {group["lr"] for opt in state["optimizers"] for group in opt["param_groups"]} == {lrs[-1]}
    # Each step is logged under the phase its batch came from.
    assert [r["phase"] for r in records] == [data.PHASES[data.phase_index(i, 12)].name for i in range(12)]


def test_a_data_folder_with_nothing_usable_is_reported(small_corpus, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    train.train(run_args(small_corpus, tmp_path / "out", "--max-steps", "1", "--data", str(tmp_path / "empty")))
    assert "skipped in --data: 1 empty folder" in capsys.readouterr().out


def test_only_a_stop_by_hand_spares_the_run_being_replaced(capfd):
    for signum, by_hand in ((signal.SIGTERM, False), (signal.SIGINT, True)):  # SIGTERM: a scheduler
        stop = train.StopRequest()
        try:
            stop(signum, None)
            assert stop.requested and stop.by_hand == by_hand
            assert "stopping after this step" in capfd.readouterr().err
            with pytest.raises(KeyboardInterrupt):  # asked again: at once
                stop(signal.SIGINT, None)
        finally:
            stop.release()
    with unittest.mock.patch.object(sys, "stderr", io.StringIO()):  # a notebook's: no file behind it
        stop = train.StopRequest()
        try:
            stop(signal.SIGINT, None)
            assert stop.requested
        finally:
            stop.release()
    replacing, fresh = train.MetricsLog.__new__(train.MetricsLog), train.MetricsLog.__new__(train.MetricsLog)
    replacing.waiting, fresh.waiting = [], None
    assert train.keeps_the_replaced_run(replacing, True, 3, 8, 5)
    assert not train.keeps_the_replaced_run(replacing, False, 3, 8, 5)  # SIGTERM: it saves
    assert not train.keeps_the_replaced_run(replacing, True, 5, 8, 5)   # a checkpoint was due anyway
    assert not train.keeps_the_replaced_run(fresh, True, 3, 8, 5)       # nothing to spare


def test_a_replacement_stopped_before_its_first_checkpoint_keeps_the_finished_run(small_corpus, tmp_path, capsys):
    train.train(run_args(small_corpus, tmp_path, "--max-steps", "2"))
    finished = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "metrics.jsonl")}
    capsys.readouterr()
    train.train(run_args(small_corpus, tmp_path, "--max-steps", "8"), stop_after=3)  # as Ctrl-C at step 3
    assert {name: (tmp_path / name).read_bytes() for name in finished} == finished
    out, err = capsys.readouterr()
    assert f"note: replacing the finished run in {tmp_path}" in out
    assert f"before this run's first checkpoint: {tmp_path} keeps the finished run" in err
    train.train(run_args(small_corpus, tmp_path, "--max-steps", "3"), stop_after=3)  # its last step: done
    assert train.load_checkpoint(tmp_path / "ckpt.pt")["settings"]["steps"] == 3


def test_the_speed_logged_after_a_resume_counts_only_its_own_tokens(small_corpus, tmp_path, monkeypatch):
    # A clock that moves one second per training step and stands still otherwise: each record's
    # tokens_per_s is then its tokens since the run (re)started over the steps since.
    clock, train_step = [0.0], train.train_step

    def timed_step(*args, **kwargs):
        clock[0] += 1.0
        return train_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", timed_step)
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: clock[0]))
    train.train(run_args(small_corpus, tmp_path, "--max-steps", "6"), stop_after=3)
    train.train(run_args(small_corpus, tmp_path, "--resume"))
    records = [record for _, record in train.metrics_lines(tmp_path / "metrics.jsonl")]
    assert [r["tokens"] for r in records] == [512, 1536, 2560, 3584, 4608, 5632]  # the first step at half batch
    assert [r["tokens_per_s"] for r in records] == [512, 768, 2560 / 3, 1024, 1024, 1024]


def test_resume_continues_exactly(small_corpus, tmp_path, capsys):
    straight = train.train(run_args(small_corpus, tmp_path / "a", "--max-steps", "6"))
    train.train(run_args(small_corpus, tmp_path / "b", "--max-steps", "6"), stop_after=3)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "tokens": 61')  # the line a crash in the middle of writing it leaves
    capsys.readouterr()
    resumed = train.train(run_args(small_corpus, tmp_path / "b", "--resume", "--lr", "0.5"))
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert "--lr" in note[0] and note[0].endswith("ignored: a resumed run keeps its own settings")
    assert "--size" in note[0]  # with --out-dir given it names no folder either
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    logged = lambda d, key: [json.loads(line)[key] for line in open(d / "metrics.jsonl")]  # noqa: E731
    for key in ("ntp", "tokens"):
        assert logged(tmp_path / "a", key) == logged(tmp_path / "b", key), key
    assert train.load_checkpoint(tmp_path / "b" / "ckpt.pt")["tokens"] == logged(tmp_path / "a", "tokens")[-1]
    # No GPU generator states: nothing draws from them, and restoring one per GPU of the machine that
    # wrote the checkpoint failed (IndexError) on a machine with fewer.
    assert set(train.load_checkpoint(tmp_path / "b" / "ckpt.pt")["rng"]) == {"torch", "python"}


def test_a_resumed_run_goes_on_with_the_random_streams_where_they_were(small_corpus, tmp_path, monkeypatch):
    """Nothing in a step draws from torch's or Python's global generator today; a change that does
    (dropout, say) must still resume exactly. Here each step draws one number from each."""
    draws, train_step = [], train.train_step

    def drawing(*args, **kwargs):
        draws.append((torch.rand(1).item(), random.random()))
        return train_step(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", drawing)
    random.seed(7)  # train() seeds torch's generator, not Python's: both runs start from the same state
    train.train(run_args(small_corpus, tmp_path / "a", "--max-steps", "4"))
    straight = draws[:]
    draws.clear()
    random.seed(7)
    train.train(run_args(small_corpus, tmp_path / "b", "--max-steps", "4"), stop_after=2)
    torch.manual_seed(12345)  # whatever ran in between
    random.seed(12345)
    train.train(run_args(small_corpus, tmp_path / "b", "--resume"))
    assert draws == straight and len(set(draws)) == 4


def test_a_resumed_run_may_split_its_steps_into_smaller_micro_batches(small_corpus, tmp_path, capsys, monkeypatch):
    # What to do after running out of memory: the same steps, in smaller pieces.
    for error in (RuntimeError("[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 40000000000000 bytes."),   # torch's, on a CPU
                  MemoryError("Unable to allocate 191. GiB for an array"),        # numpy's (a huge batch)
                  RuntimeError("MPS backend out of memory (MPS allocated: 7.50 GiB, other allocations: 1.20 GiB, "
                               "max allowed: 9.07 GiB). Tried to allocate 2.00 GiB on private pool.")):  # a Mac's
        def out_of_memory(args, error=error):
            raise error
        monkeypatch.setattr(train, "train", out_of_memory)
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--out-dir", str(tmp_path / "oom")])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 1 and len(err.splitlines()) == 1
        assert err.startswith("error: out of memory") and "--resume --micro-batch N" in err
    monkeypatch.setattr(train, "grpo", lambda args: train.train(args))  # GRPO takes none of those flags
    with pytest.raises(SystemExit):
        train.main(["--stage", "grpo", "--init-from", str(tmp_path), "--out-dir", str(tmp_path / "oom")])
    assert capsys.readouterr().err.strip().endswith("): a smaller --group-size needs less")
    monkeypatch.setattr(train, "grpo", lambda args: out_of_memory(args, MemoryError()))  # Python's own says nothing
    with pytest.raises(SystemExit):
        train.main(["--stage", "grpo", "--init-from", str(tmp_path), "--out-dir", str(tmp_path / "oom")])
    assert capsys.readouterr().err.strip() == "error: out of memory (MemoryError): a smaller --group-size needs less"
    monkeypatch.undo()

    straight = train.train(run_args(small_corpus, tmp_path / "a", "--max-steps", "4"))
    train.train(run_args(small_corpus, tmp_path / "b", "--max-steps", "4"), stop_after=2)
    # A setting this version reads, gone (an edited file): said before any step, not as a KeyError
    # when the schedule first reads it.
    state = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    torch.save({**state, "settings": {k: v for k, v in state["settings"].items() if k != "decay_fraction"}},
               tmp_path / "b" / "ckpt.pt")
    with pytest.raises(CheckpointError, match="settings lack decay_fraction, which this train.py reads"):
        train.train(run_args(small_corpus, tmp_path / "b", "--resume"))
    # One of another kind: said before the run, not as a TypeError where the data or the schedule reads it.
    for key, value in [("data", 5), ("seed", 1.0), ("optimizer", None)]:
        torch.save({**state, "settings": {**state["settings"], key: value}}, tmp_path / "b" / "ckpt.pt")
        with pytest.raises(CheckpointError, match=f"setting {key} = {value} is not a"):
            train.train(run_args(small_corpus, tmp_path / "b", "--resume"))
    # As an earlier version wrote it: validation counted in batches of the micro-batch (16 x 4 rows),
    # and no dense baseline to ask for.
    assert state["settings"].pop("eval_rows") == 64 and state["settings"]["micro_batch"] == 4
    assert state["settings"].pop("dense") is False
    torch.save({**state, "settings": {**state["settings"], "eval_batches": 16}}, tmp_path / "b" / "ckpt.pt")
    capsys.readouterr()
    resumed = train.train(run_args(small_corpus, tmp_path / "b", "--resume", "--micro-batch", "2"))
    assert "--micro-batch" not in capsys.readouterr().out  # the flag is taken, not ignored
    assert train.load_checkpoint(tmp_path / "b" / "ckpt.pt")["settings"]["micro_batch"] == 2
    # Validated on the same rows, two at a time: the same losses, up to the rounding the weights took on.
    last_val = lambda d: json.loads(open(d / "metrics.jsonl").readlines()[-1])["val"]  # noqa: E731
    assert last_val(tmp_path / "b") == pytest.approx(last_val(tmp_path / "a"), rel=1e-4)
    # The same steps up to fp32 rounding (and the balance loss, taken per micro-batch): the weights
    # stay close and so does the loss; Adam's normalised steps make single weights a poor measure.
    losses = lambda d: [json.loads(line)["ntp"] for line in open(d / "metrics.jsonl")]  # noqa: E731
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=1e-4)
    assert straight.layers[0].mlp.up_proj.allclose(resumed.layers[0].mlp.up_proj, atol=1e-3)


def test_a_refused_run_does_not_say_it_replaces_the_finished_one(small_corpus, tmp_path, capsys):
    train.save_checkpoint(tmp_path / "ckpt.pt", Mellum2(SMALL), [], 10, {"stage": "pretrain", "steps": 10})
    with pytest.raises(SystemExit):  # refused after the folder was checked: at the model's vocabulary
        train.main(["--size", "mellum2-12b", "--data", small_corpus, "--no-default-data", "--out-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "--size mellum2-12b has a 98304-token vocabulary" in err and "replacing" not in out
    assert train.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 10


def test_a_checkpoint_that_cannot_be_written_leaves_the_last_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    train.save_checkpoint(path, Mellum2(SMALL), [], 1, {"stage": "pretrain", "steps": 2})

    def disk_full(state, file):
        open(file, "wb").write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: types.SimpleNamespace(free=2**21))
    with pytest.raises(CheckpointError, match="cannot write the checkpoint .*unexpected pos 64; 2 MiB free there"):
        train.save_checkpoint(path, Mellum2(SMALL), [], 2, {"stage": "pretrain", "steps": 2})
    assert os.listdir(tmp_path) == ["ckpt.pt"] and train.load_checkpoint(path)["step"] == 1
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="gone/ckpt.pt: cannot write the checkpoint \\(.*\\); the previous one"):
        train.save_checkpoint(tmp_path / "gone" / "ckpt.pt", Mellum2(SMALL), [], 2, {"steps": 1})  # its folder removed


def test_fp8_is_refused_where_it_can_neither_run_nor_be_emulated(monkeypatch):
    # An A100 (8.0) has no FP8 matrix units and MPS no 8-bit floats: such a run failed at its first step.
    asked = []
    for capability, refused in (((8, 0), True), ((8, 9), False), ((9, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device=None, capability=capability: asked.append(device) or capability)
        with pytest.raises(ValueError, match="--fp8 needs a GPU with FP8") if refused else contextlib.nullcontext():
            train.check_fp8("cuda:1")
    assert asked == [torch.device("cuda:1")] * 3
    with pytest.raises(ValueError, match="mps has none"):
        train.check_fp8("mps")
    train.check_fp8("cpu")


def test_fp8_training_runs(small_corpus, tmp_path, monkeypatch):
    # Off a GPU scaled_mm takes any shapes; each call here also goes through torch._scaled_mm's shape
    # checks (its meta kernel), so that a product a GPU would refuse fails here too: the MTP block's
    # B * (T - 1) rows, summed over for dW, are no multiple of 16.
    scaled_mm = train.scaled_mm

    def checked(a8, scale_a, b8, scale_b, out_dtype):
        meta = lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")  # noqa: E731
        torch._scaled_mm(meta(a8), meta(b8.t()).t(), scale_a=meta(scale_a), scale_b=meta(scale_b),
                         out_dtype=out_dtype)
        return scaled_mm(a8, scale_a, b8, scale_b, out_dtype)

    monkeypatch.setattr(train, "scaled_mm", checked)
    model = train.train(run_args(small_corpus, tmp_path, "--max-steps", "2", "--fp8"))
    # Every attention projection and the MTP layer's fc, and no other linear: the routers and the
    # head stay in high precision.
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert [n for n, m in model.named_modules() if type(m) is train.Float8Linear] == \
        [n for n, _ in model.named_modules() if n.split(".")[-1] in projections or n == "mtp.fc"]
    assert all(m.grouped_mm is train.fp8_grouped_mm for m in model.modules() if isinstance(m, mellum2.MoE))
    assert all(math.isfinite(json.loads(line)["ntp"]) for line in open(tmp_path / "metrics.jsonl"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(small_corpus, tmp_path, monkeypatch, capsys):
    train.train(run_args(small_corpus, tmp_path, "--max-steps", "6"), stop_after=2)
    before = (tmp_path / "ckpt.pt").read_bytes()
    real_forward = Mellum2.forward

    def poisoned(self, idx, targets=None, pad=None):
        logits, loss = real_forward(self, idx, targets, pad)
        self.loss_parts["ntp"] = torch.tensor(float("nan"))
        return logits, loss

    monkeypatch.setattr(Mellum2, "forward", poisoned)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--size", "tiny", "--data", small_corpus, "--no-default-data", "--out-dir", str(tmp_path),
                    "--resume"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1
    assert err.startswith("error: non-finite loss at step 3")
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_a_run_that_fails_before_replacing_a_finished_one_leaves_it_whole(small_corpus, tmp_path, monkeypatch):
    train.train(run_args(small_corpus, tmp_path, "--max-steps", "2"))
    before = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "metrics.jsonl")}
    real_forward, calls = Mellum2.forward, []

    def poisoned_from_the_second_step(self, idx, targets=None, pad=None):
        logits, loss = real_forward(self, idx, targets, pad)
        calls.append(idx.shape)
        if len(calls) > 1:
            self.loss_parts["ntp"] = torch.tensor(float("nan"))
        return logits, loss

    monkeypatch.setattr(Mellum2, "forward", poisoned_from_the_second_step)
    with pytest.raises(train.NonFiniteLoss, match="step 2 .* the finished run .* is kept as it was"):
        train.train(run_args(small_corpus, tmp_path, "--max-steps", "3"))
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # the old model beside its own log
    monkeypatch.undo()
    train.train(run_args(small_corpus, tmp_path, "--max-steps", "3"))  # this one replaces it: its log alone
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"x": 1}\n5\n')  # lines that are no step's record, edited in: --resume drops them
    train.train(run_args(small_corpus, tmp_path, "--resume"))
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_metrics_log_keeps_what_its_checkpoint_covers(tmp_path, monkeypatch):
    """Resumed at step 2: the lines up to it (the step-0 evaluation included; a torn last line
    dropped). A fresh start (step 0, after a crash before the first checkpoint): none, so the dead
    start's step-0 line is not logged twice. An interrupt while the file is trimmed leaves it whole."""
    path = tmp_path / "metrics.jsonl"
    lines = "".join(json.dumps({"step": step}) + "\n" for step in (0, 1, 2, 3)) + '{"step": 4, "lo'
    path.write_text(lines)
    train.MetricsLog(str(path), 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]
    path.write_bytes(b'{"step": 0}\n{"step": 1, "note": "\xff"}\n{"st\xfe\n')  # bytes that are no UTF-8: an edit
    train.MetricsLog(str(path), 2)
    assert [json.loads(line)["step"] for line in path.read_text(encoding="utf-8").splitlines()] == [0, 1]
    train.MetricsLog(str(path), 0)
    assert path.read_text() == ""
    path.write_text(lines)

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.MetricsLog(str(path), 2)
    assert path.read_text() == lines and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_ctrl_c_writes_a_checkpoint_and_resume_continues(small_corpus, tmp_path):
    repo = os.path.dirname(os.path.abspath(__file__))
    argv = [sys.executable, "train.py", "--size", "tiny", "--data", small_corpus, "--no-default-data",
            "--out-dir", str(tmp_path), "--batch-size", "4", "--max-steps", "500", "--allow-over-repetition"]
    proc = subprocess.Popen(argv, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    step = train.load_checkpoint(tmp_path / "ckpt.pt")["step"]
    assert step >= 2 and len(metrics.read_text().splitlines()) == step
    assert f"stopped at step {step}" in err and "Traceback" not in err and "interrupted" not in err


def test_ctrl_c_outside_the_loop_says_so(tmp_path, monkeypatch, capsys):
    """Between steps the loop stops itself and says where its checkpoint is; a Ctrl-C elsewhere
    (building the corpus, the final evaluation) still ends with a line saying what happened."""
    def interrupted(args, settings_of=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--size", "tiny", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 130 and err == "error: interrupted; checkpoints written before are kept"


def test_a_stop_request_in_the_last_step_lets_the_run_finish(small_corpus, tmp_path, monkeypatch, capsys):
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(train.StopRequest, "all_agree", lambda self: True)  # as if Ctrl-C came in every step
    train.train(run_args(small_corpus, tmp_path, "--max-steps", "1"))
    assert "done: 1 steps" in capsys.readouterr().out and train.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 1
    assert signal.getsignal(signal.SIGINT) is handler  # after the loop Ctrl-C interrupts again


@pytest.mark.parametrize("argv,message", [
    (["--max-steps", "0", "--out-dir", "{tmp}/unfinished"], "--max-steps must be positive"),  # flags first
    (["--batch-size", "3"], "--batch-size 3 must be a multiple of 2: the batch ramp"),
    (["--resume", "--out-dir", "{tmp}/nothing"], "no checkpoint there"),
    (["--resume", "--out-dir", "{tmp}/corrupt"], "unreadable checkpoint"),
    (["--out-dir", "{tmp}/corrupt"], "move it away, or choose another --out-dir"),
    (["--stage", "sft", "--init-from", "{tmp}/finished/ckpt.pt", "--out-dir", "{tmp}/sft"],
     "is a file: give the folder that holds it"),
    (["--stage", "sft", "--init-from", "{tmp}/foreign-vocab", "--out-dir", "{tmp}/sft"],
     "brings its own tokenizer.json"),
    (["--resume", "--out-dir", "{tmp}/foreign"], "not a train.py checkpoint"),
    (["--resume", "--stage", "sft", "--out-dir", "{tmp}/unfinished"], "resume it with --stage pretrain"),
    (["--resume", "--stage", "sft", "--variant", "thinking", "--out-dir", "{tmp}/instruct"],
     "holds a run of the instruct variant: resume it with --variant instruct"),
    (["--resume", "--stage", "sft", "--variant", "instruct", "--out-dir", "{tmp}/thinking"],  # typed at its default
     "holds a run of the thinking variant: resume it with --variant thinking"),
    (["--resume", "--stage", "long", "--rope-variant", "theta", "--out-dir", "{tmp}/long"],
     "holds a run of the selective-yarn RoPE variant: resume it with --rope-variant selective-yarn"),
    (["--out-dir", "{tmp}/unfinished"], "holds an unfinished run (step 3 of 10)"),
    (["--out-dir", "{tmp}/a-file"], "is a file"),
    (["--stage", "sft", "--init-from", "{tmp}/nothing", "--out-dir", "{tmp}/sft"], "no such folder"),
    (["--compare"], "--compare is for --stage long, not --stage pretrain"),
    (["--data-report", "--stage", "sft", "--init-from", "{tmp}/unfinished"],
     "--data-report is for --stage pretrain or long, not --stage sft"),
    (["--stage", "grpo", "--init-from", "{tmp}/finished", "--batch-size", "64"], "--batch-size is for --stage"),
    (["--stage", "sft", "--init-from", "{tmp}/finished", "--sync"], "--sync is for --stage grpo, not --stage sft"),
    (["--variant", "thinking"], "--variant is for --stage sft or grpo"),
    (["--variant", "instruct"], "--variant is for --stage sft or grpo"),  # the default value, but typed
    (["--context", "1024"], "--context is for --stage long"),
    (["--stage", "long", "--compare", "--resume", "--init-from", "{tmp}/finished", "--out-dir", "{tmp}/nothing"],
     "no --compare run to resume there"),
    (["--seed", "-1"], "--seed"),
    (["--lr", "inf"], "--lr must be positive and at most 1,000,000"),
    (["--lr", "1e38"], "--lr must be positive and at most"),  # finite, but AdamW's first step overflows fp32
    (["--stage", "long", "--init-from", "{tmp}/finished", "--rope-variant", "unchanged", "--yarn-factor", "4"],
     "--yarn-factor has no effect with --rope-variant unchanged"),
    (["--aux-coef", "nan"], "--aux-coef"),
    (["--yarn-factor", "inf", "--stage", "long", "--init-from", "{tmp}/finished"], "--yarn-factor"),
    (["--stage", "long", "--init-from", "{tmp}/finished", "--context", "1000000", "--out-dir", "{tmp}/long-run"],
     "too long for a vocabulary of 4096"),
    (["--out-dir", ""], "--out-dir needs a folder name"),
    (["--init-from", "", "--stage", "sft"], "--init-from needs a folder name"),
    (["--init-from", "{tmp}", "--stage", "sft"], ", instruct, long, thinking, unfinished: give one, e.g. "),
    (["--init-from", "{tmp}/finished", "--dense"], "--dense and --no-mtp shape a fresh model"),
    (["--data", ""], "--data needs a folder name"),
    (["--batch-size", "8", "--micro-batch", "16"], "--micro-batch at most --batch-size"),
    (["--out-dir", "{tmp}/blocked"], "is in the way"),
    (["--out-dir", "{tmp}/a-file/run"], "a-file/run: Not a directory"),
    (["--stage", "long", "--init-from", "{tmp}/finished", "--out-dir", "{tmp}/finished"],
     "is also this run's folder, whose checkpoint the run would replace"),
    (["--init-from", "{tmp}/finished", "--out-dir", "{tmp}/finished/."],  # "train it further", as pre-training
     "is also this run's folder, whose checkpoint the run would replace with its own: give another --out-dir"),
    (["--stage", "long", "--init-from", "{tmp}/finished", "--out-dir", "{tmp}/finished-too"],
     "holds a finished --stage pretrain run"),  # another stage's finished run is kept: it may be a model to start from
])
def test_bad_input_gives_one_line_and_a_nonzero_exit(argv, message, tmp_path, capsys):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "ckpt.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "foreign").mkdir()
    torch.save({"a": 1}, tmp_path / "foreign" / "ckpt.pt")
    (tmp_path / "unfinished").mkdir()
    train.save_checkpoint(tmp_path / "unfinished" / "ckpt.pt", Mellum2(SMALL), [], 3,
                          {"stage": "pretrain", "steps": 10})
    (tmp_path / "finished").mkdir()
    train.save_checkpoint(tmp_path / "finished" / "ckpt.pt", Mellum2(SMALL), [], 10,
                          {"stage": "pretrain", "steps": 10})
    shutil.copytree(tmp_path / "finished", tmp_path / "finished-too")
    (tmp_path / "blocked" / "ckpt.pt").mkdir(parents=True)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "instruct").mkdir()
    train.save_checkpoint(tmp_path / "instruct" / "ckpt.pt", Mellum2(SMALL), [], 3,
                          {"stage": "sft", "variant": "instruct", "steps": 10})
    (tmp_path / "thinking").mkdir()
    train.save_checkpoint(tmp_path / "thinking" / "ckpt.pt", Mellum2(SMALL), [], 3,
                          {"stage": "sft", "variant": "thinking", "steps": 10})
    (tmp_path / "long").mkdir()
    train.save_checkpoint(tmp_path / "long" / "ckpt.pt", Mellum2(SMALL), [], 3,
                          {"stage": "long", "rope_variant": "selective-yarn", "steps": 10})
    Mellum2(SMALL).save_pretrained(tmp_path / "foreign-vocab")
    (tmp_path / "foreign-vocab" / "tokenizer.json").write_text("{}")  # the released model's, say

    def left():  # a run folder's .lock may stay: it is how train.py tells a folder is in use
        return sorted(p for p in tmp_path.rglob("*") if p.name != ".lock")
    before = left()
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--size", "tiny", *[a.format(tmp=tmp_path) for a in argv]])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0 and message in err and len(err.splitlines()) == 1
    assert left() == before  # not even an empty run folder is left behind


def test_only_a_run_that_ramps_its_batch_needs_an_even_one():
    long = dict(stage="long", init_from="out/tiny", steps=10, batch_size=3, micro_batch=3, ramp_fraction=0.0)
    train.check_settings(long, world=1)  # no half-size steps: 3 rows are fine
    with pytest.raises(ValueError, match="^--batch-size 3 must be a multiple of 2: the batch ramp's first steps"):
        train.check_settings({**long, "stage": "pretrain", "ramp_fraction": 0.06}, world=1)
    with pytest.raises(ValueError, match="^--batch-size 3 must split evenly over 2 process"):
        train.check_settings(long, world=2)


@pytest.mark.parametrize("mmap", [False, True])
def test_a_file_that_is_no_checkpoint_is_called_that(tmp_path, mmap):
    train.save_checkpoint(tmp_path / "ckpt.pt", Mellum2(SMALL), [], 1, {"steps": 1})
    whole = (tmp_path / "ckpt.pt").read_bytes()
    for damaged in (b"", b"step: 12\n", whole[:len(whole) // 2]):  # empty, text, truncated
        (tmp_path / "ckpt.pt").write_bytes(damaged)
        with pytest.raises(CheckpointError, match="unreadable checkpoint \\(not a zip archive as torch.save writes"):
            train.load_checkpoint(tmp_path / "ckpt.pt", mmap=mmap)


def test_a_bit_flipped_on_disk_is_found_by_the_checksum_not_loaded_as_a_weight(tmp_path, capsys):
    model = Mellum2(SMALL)
    train.save_checkpoint(tmp_path / "ckpt.pt", model, [], 1, {"steps": 1})
    whole = bytearray((tmp_path / "ckpt.pt").read_bytes())
    at = whole.find(model.lm_head.weight.detach().numpy().tobytes()) + 5
    whole[at] ^= 0x10
    (tmp_path / "ckpt.pt").write_bytes(whole)
    # torch.load alone takes it: one weight quietly changed.
    peeked = train.load_checkpoint(tmp_path / "ckpt.pt", mmap=True, verify=False)["model"]["lm_head.weight"]
    assert not torch.equal(peeked, model.lm_head.weight)
    with pytest.raises(CheckpointError, match="ckpt.pt: damaged checkpoint \\(part ckpt.pt/data/\\d+ does not match"):
        train.load_checkpoint(tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit) as exit_info:  # sample.py reads the weights only, and checks them too
        sample.main(["--init-from", str(tmp_path), "--start", "x"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1 and "damaged checkpoint" in err


def test_a_checkpoint_that_cannot_be_opened_says_why(tmp_path, monkeypatch):
    import builtins
    train.save_checkpoint(tmp_path / "ckpt.pt", Mellum2(SMALL), [], 1, {"steps": 1})
    real_open = builtins.open

    def no_permission(file, *args, **kwargs):
        if str(file) == str(tmp_path / "ckpt.pt"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", no_permission)
    with pytest.raises(CheckpointError, match="ckpt.pt: unreadable checkpoint \\(Permission denied\\)$"):
        train.load_checkpoint(tmp_path / "ckpt.pt")


def test_a_checkpoint_with_a_part_missing_or_of_another_type_is_refused(tmp_path):
    train.save_checkpoint(tmp_path / "ckpt.pt", Mellum2(SMALL), [], 1, {"steps": 1})
    whole = torch.load(tmp_path / "ckpt.pt")
    for key, value in [("step", "1"), ("settings", None), ("rng", None), ("optimizers", {})]:
        state = {k: v for k, v in whole.items() if k != key}
        if value is not None:
            state[key] = value
        torch.save(state, tmp_path / "ckpt.pt")
        with pytest.raises(CheckpointError, match="not a train.py checkpoint .*step \\(int\\)"):
            train.load_checkpoint(tmp_path / "ckpt.pt")
    # The right parts, damaged inside: each said at load time, before a resumed run could crash on it
    # hours later (a zero ckpt_every after its last step, losing the final checkpoint).
    weights_as_numbers = {k: 1 for k in whole["model"]}
    for key, value, message in [
            ("model", weights_as_numbers, "weights that are not tensors"), ("tokens", "x", "token count of type str"),
            ("rng", {}, "random generator states"), ("rng", {**whole["rng"], "torch": torch.zeros(3)}, "random"),
            ("rng", {**whole["rng"], "python": [3]}, "random"), ("settings", {"steps": "3"}, "steps = '3'"),
            ("rng", {**whole["rng"], "torch": whole["rng"]["torch"][:-8]}, "random"),  # the right type, cut short
            ("rng", {**whole["rng"], "python": (3, (1, 2), None)}, "random"), ("tokens", -5, "token count of -5"),
            ("settings", {"steps": 3, "lr": "abc"}, "lr = 'abc', where a number from 0 to 1e+06 belongs"),
            ("settings", {"steps": 3, "lr": math.nan}, "lr = nan"), ("settings", {"steps": 3, "seed": -1}, "seed"),
            ("settings", {"steps": 3, "decay_fraction": 2.0}, "decay_fraction = 2.0, where a number from 0 to 1"),
            ("settings", {"steps": 3, "warmup_steps": 4}, "4 warmup steps in a 3-step run"),
            ("settings", {"steps": 3, "run": {"oversample": 0.5}}, "oversample = 0.5"),
            ("settings", {"steps": 3, "ckpt_every": 0}, "ckpt_every = 0, where a count of at least 1"),
            ("settings", {"steps": 3, "run": {"eval_every": 0}}, "eval_every = 0"),  # a GRPO run's schedule
            ("settings", {"steps": 3, "run": [1]}, "GRPO schedule (settings run) of type list"),
            ("settings", {"seed": 1}, "settings without steps"),
            ("step", 2, "step 2 of a 1-step run"), ("step", -1, "step -1 of a 1-step run"),
            ("settings", {"steps": 1, "stage": "rl"}, "stage 'rl', none of pretrain, long, sft, grpo")]:
        torch.save({**whole, key: value}, tmp_path / "ckpt.pt")
        with pytest.raises(CheckpointError, match=f"not a train.py checkpoint \\(.*{re.escape(message)}"):
            train.load_checkpoint(tmp_path / "ckpt.pt")
    torch.save(whole, tmp_path / "ckpt.pt")
    assert train.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 1


def test_a_resumed_run_restores_every_optimizer_or_stops():
    model = Mellum2(SMALL)
    saved = [opt.state_dict() for opt in train.build_optimizers(model, 1e-3)]
    with pytest.raises(CheckpointError, match="holds 0 optimizer states, this run has 2"):
        train.restore_optimizers(train.build_optimizers(model, 1e-3), {"optimizers": []})
    with pytest.raises(CheckpointError, match="optimizer state does not fit this run"):  # AdamW's for Muon's
        train.restore_optimizers(train.build_optimizers(model, 1e-3), {"optimizers": saved[::-1]})


def test_a_checkpoint_of_another_tokenizer_is_refused(tmp_path):
    train.save_checkpoint(tmp_path / "ckpt.pt", Mellum2(SMALL), [], 1, {"steps": 1})
    state = torch.load(tmp_path / "ckpt.pt")
    state["tokenizer"]["sha256"] = "0" * 64
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="trained with another"):
        train.load_checkpoint(tmp_path / "ckpt.pt")


@pytest.mark.parametrize("damage", ["missing", "garbled"])
def test_a_damaged_tokenizer_file_is_named_not_blamed_on_the_checkpoint(damage, tmp_path, monkeypatch, capsys):
    (tmp_path / "run").mkdir()
    train.save_checkpoint(tmp_path / "run" / "ckpt.pt", Mellum2(SMALL), [], 1, {"steps": 1})
    if damage == "garbled":
        (tmp_path / "ranks").write_text("garbage")
    monkeypatch.setattr(data, "TOKENIZER_FILE", tmp_path / "ranks")
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--init-from", str(tmp_path / "run"), "--start", "x"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1
    assert "ranks: unreadable tokenizer rank file" in err and "another" not in err


def test_resume_notes_changed_data(small_corpus, tmp_path, capsys):
    corpus = shutil.copytree(small_corpus, tmp_path / "corpus")
    train.train(run_args(str(corpus), tmp_path / "run", "--max-steps", "3"), stop_after=1)
    train.train(run_args(str(corpus), tmp_path / "run", "--resume"), stop_after=2)
    assert "the data changed" not in capsys.readouterr().out
    (corpus / "extra.py").write_text("def extra():\n    return 'new text'\n")
    train.train(run_args(str(corpus), tmp_path / "run", "--resume"))
    assert "note: the data changed since this run started" in capsys.readouterr().out


def test_a_kernel_mode_this_machine_cannot_run_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """As on Windows or macOS, where triton does not install: train.py refuses before building the
    corpus, sample.py before loading a model that may take minutes to read."""
    monkeypatch.setattr(kernels, "triton", None)
    monkeypatch.setattr(data, "build_corpus", lambda *a, **k: pytest.fail("the corpus was built"))
    monkeypatch.setattr(sample, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for main, argv in [(train.main, ["--size", "tiny", "--out-dir", str(tmp_path / "run"), "--kernels", "triton"]),
                       (sample.main, ["--init-from", str(tmp_path), "--kernels", "triton"])]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 1 and len(err.splitlines()) == 1
        assert "kernel mode 'triton' needs triton, which installs on Linux only" in err
    assert not (tmp_path / "run").exists()


def test_a_run_folder_in_use_is_refused(tmp_path, tmp_path_factory, capsys):
    with train.run_folder_lock(str(tmp_path)):  # as another train.py would hold it
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--size", "tiny", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 1 and "in use by another train.py run" in capsys.readouterr().err
    with train.run_folder_lock(str(tmp_path)):  # released when the holder is done
        pass
    # A checkpoint half written by a killed process is cleared away by the next run; other files stay.
    (tmp_path / "theta").mkdir()  # a --compare run's variant
    for name in ("ckpt.pt.tmp4242", "metrics.jsonl.tmp17", "notes.tmp", "ckpt.pt", "results.json.tmp99",
                 "theta/ckpt.pt.tmp5"):
        (tmp_path / name).write_text("x")
    # A checkpoint linked to another disk is written there, and so is what a killed write leaves.
    disk = tmp_path_factory.mktemp("disk")
    for name in ("ckpt.pt.tmp31", "ckpt.pt.tmpx", "ckpt.pt"):
        (disk / name).write_text("x")
    (tmp_path / "theta" / "ckpt.pt").symlink_to(disk / "ckpt.pt")
    with train.run_folder_lock(str(tmp_path)):
        assert sorted(os.listdir(tmp_path)) == [".lock", "ckpt.pt", "notes.tmp", "results.json.tmp99", "theta"]
        assert os.listdir(tmp_path / "theta") == ["ckpt.pt"]
        assert sorted(os.listdir(disk)) == ["ckpt.pt", "ckpt.pt.tmpx"]


def test_interrupted_writes_are_found_once_however_the_path_is_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("ckpt.pt", "ckpt.pt.tmp12", "ckpt.pt.tmp", "ckpt.pt.tmp3x", "ckpt.pt2.tmp4", "other.tmp5"):
        (tmp_path / name).write_text("x")
    assert data.interrupted_writes("ckpt.pt") == [os.path.realpath(tmp_path / "ckpt.pt.tmp12")]
    assert data.interrupted_writes(str(tmp_path / "missing" / "ckpt.pt")) == []


def test_micro_batches_add_up_to_one_step_when_rows_hold_different_numbers_of_targets():
    config = replace(SMALL, n_mtp=0, aux_loss_coef=0.0, z_loss_coef=0.0)  # the next-token loss alone
    torch.manual_seed(0)
    x = torch.randint(0, 200, (4, 16))
    y = x.roll(-1, dims=1)
    for row, targets in enumerate((15, 3, 9, 1)):  # SFT-like: a few answer tokens, the rest masked
        y[row, :16 - targets] = IGNORE_INDEX
    results = []
    for micro_batch in (4, 1):
        model = randomize(Mellum2(config))
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        parts, _ = train.train_step(model, x, y, micro_batch, [sgd], torch.autocast("cpu", enabled=False),
                                    grad_clip=math.inf)
        results.append((parts["ntp"], torch.cat([p.flatten() for p in model.parameters()])))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-6)


def test_the_expert_balance_logged_is_the_whole_steps():
    """Max over mean expert load, from the routing slots of every micro-batch: the same step reads
    the same however it is split (the last micro-batch alone reads less balanced the smaller it is)."""
    torch.manual_seed(0)
    x = torch.randint(0, 200, (8, 16))
    y = x.roll(-1, dims=1)
    y[:4, :12] = IGNORE_INDEX  # SFT's masked prompts: no targets there, but every token is routed
    model = randomize(Mellum2(SMALL), seed=1)
    model(x, y)  # the whole batch in one forward: each trunk layer's load over all its rows
    expected = train.expert_balance(model.loss_parts["expert_load"])
    for micro_batch in (8, 2, 1):
        parts, _ = train.train_step(model, x, y, micro_batch,
                                    [torch.optim.SGD(model.parameters(), lr=0.0)], torch.autocast("cpu", enabled=False))
        assert parts["expert_balance"] == pytest.approx(expected, rel=1e-6), micro_batch
    # With SFT's right padding, micro-batches route different numbers of tokens: each weighs by its own.
    model = randomize(Mellum2(replace(SMALL, vocab_size=data.VOCAB_SIZE)), seed=1)
    x[:4, 4:] = data.PAD
    y = x.roll(-1, dims=1).masked_fill(x == data.PAD, IGNORE_INDEX)
    model(x, y, pad=x == data.PAD)
    expected = train.expert_balance(model.loss_parts["expert_load"])
    for micro_batch in (8, 4, 2):
        parts, _ = train.train_step(model, x, y, micro_batch,
                                    [torch.optim.SGD(model.parameters(), lr=0.0)], torch.autocast("cpu", enabled=False))
        assert parts["expert_balance"] == pytest.approx(expected, rel=1e-6), micro_batch
    # Max over mean load, per layer, then the mean over layers: a balanced layer reads 1.0, one whose
    # experts are all bypassed but one reads E.
    assert train.expert_balance(torch.tensor([[0.5, 0.5], [1.0, 0.0]])) == 1.5


def test_a_training_step_leaves_padding_out_of_the_routing_losses():
    model = randomize(Mellum2(replace(SMALL, vocab_size=data.VOCAB_SIZE)))
    torch.manual_seed(0)
    x = torch.randint(0, 200, (2, 16))
    x[1, 6:] = data.PAD                                                  # an SFT batch's right padding
    y = torch.cat([x[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1).masked_fill(x == data.PAD, IGNORE_INDEX)
    model(x, y, pad=x == data.PAD)
    expected = {k: model.loss_parts[k].item() for k in ("aux", "z")}
    parts, _ = train.train_step(model, x, y, 2, [torch.optim.SGD(model.parameters(), lr=0.0)],
                                torch.autocast("cpu", enabled=False))
    assert {k: parts[k] for k in ("aux", "z")} == pytest.approx(expected, rel=1e-6)


def test_a_non_finite_gradient_stops_before_the_step(tmp_path):
    model = Mellum2(SMALL)
    opts = train.build_optimizers(model, 0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.lm_head.weight.register_hook(lambda grad: grad * float("inf"))  # a finite loss, an overflowing gradient
    x = torch.randint(0, SMALL.vocab_size, (2, 16))
    with pytest.raises(train.NonFiniteLoss, match="gradient norm"):
        train.train_step(model, x, x, 2, opts, torch.autocast("cpu", enabled=False))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_gradient_is_clipped_to_norm_one():
    model = Mellum2(SMALL)
    x = torch.randint(0, SMALL.vocab_size, (2, 16))
    model(x, x)[1].mul(1e3).backward()  # a gradient far above norm 1
    total_norm = lambda: torch.cat([p.grad.double().flatten() for p in model.parameters()]).norm()  # noqa: E731
    expected = total_norm()
    norm = train.clip_finite_grad_norm(model, 1.0)
    after = total_norm()
    assert expected > 10 and norm == pytest.approx(expected.item(), rel=1e-4)  # the norm before clipping
    assert after == pytest.approx(1.0, rel=1e-4)
    # And a training step clips at 1: with SGD at lr 1 the parameters move by exactly the clipped step.
    model.zero_grad()
    model.lm_head.weight.register_hook(lambda grad: grad * 1e4)
    before = [p.detach().clone() for p in model.parameters()]
    _, norm = train.train_step(model, x, x.roll(-1, dims=1), 2, [torch.optim.SGD(model.parameters(), lr=1.0)],
                               torch.autocast("cpu", enabled=False))
    moved = torch.cat([(p.detach() - b).double().flatten() for p, b in zip(model.parameters(), before)]).norm()
    assert norm > 10 and moved.item() == pytest.approx(1.0, rel=1e-3)


def test_unknown_size_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--size", "huge"])
    assert exit_info.value.code != 0 and "invalid choice: 'huge'" in capsys.readouterr().err


DIST_WORKER = '''
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import train
from test_mellum2 import SMALL, randomize
from mellum2 import Mellum2, IGNORE_INDEX
torch.set_num_threads(1)
rank, world, device = train.setup_distributed("cpu")

def run(distributed, optimizer):
    torch.manual_seed(0)
    model = randomize(Mellum2(SMALL))
    if optimizer == "muon":
        opts, clip = train.build_optimizers(model, 1e-3), 1.0
    else:  # SGD unclipped moves by the gradient itself, where Muon's and AdamW's steps hide its scale
        opts, clip = [torch.optim.SGD(model.parameters(), lr=0.1)], float("inf")
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randint(0, SMALL.vocab_size, (8, 24), generator=g)
        y = torch.randint(0, SMALL.vocab_size, (8, 24), generator=g)
        y[:3, 4:] = IGNORE_INDEX  # as in SFT: the first process holds fewer targets than the second
        if distributed:
            x, y = x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4]
        parts, _ = train.train_step(wrapped, x, y, 2, opts, torch.autocast("cpu", enabled=False), clip)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), parts

together = {{optimizer: run(True, optimizer) for optimizer in ("muon", "sgd")}}
gathered = {{optimizer: [torch.empty_like(params) for _ in range(world)]
            for optimizer, (params, _) in together.items()}}
for optimizer, (params, _) in together.items():
    dist.all_gather(gathered[optimizer], params)
stop = train.StopRequest()
stop.requested = rank == 1  # a signal that reached one process alone stops them all
agreed = [torch.empty(1) for _ in range(world)]
dist.all_gather(agreed, torch.tensor([float(stop.all_agree())]))
stop.release()
train.leave_process_group()  # on every rank: exiting with DDP or gloo threads still alive aborts
if rank == 0:
    print("stop_agreed", all(flag.item() == 1 for flag in agreed))
    for optimizer, (params, parts) in together.items():
        alone, alone_parts = run(False, optimizer)
        print(optimizer + "_replicas_equal", torch.equal(gathered[optimizer][0], gathered[optimizer][1]))
        print(optimizer + "_max_diff", (params - alone).abs().max().item())
        print(optimizer + "_logged_diff", max(abs(parts[k] - alone_parts[k]) for k in alone_parts))
'''


def test_two_processes_equal_one(tmp_path):
    """One torchrun launch of two gloo processes, each on half of every batch (with fewer targets on
    one, as in SFT), against one process on the whole batch: the same parameters within 1e-6
    (fp32 Newton-Schulz, as bf16 would amplify the last-bit difference between a mean of two
    half-batch means and one full-batch mean)."""
    repo = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "worker.py"
    script.write_text(DIST_WORKER.format(repo=repo))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, timeout=300, cwd=repo, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = dict(line.split() for line in result.stdout.splitlines() if line.startswith(("muon_", "sgd_", "stop_")))
    assert out["stop_agreed"] == "True"
    for optimizer in ("muon", "sgd"):
        assert out[f"{optimizer}_replicas_equal"] == "True"
        assert float(out[f"{optimizer}_max_diff"]) < 1e-6, optimizer
        # What the step logs too: the loss parts and the expert balance of the whole batch, not of one process's half
        assert float(out[f"{optimizer}_logged_diff"]) < 1e-5, optimizer


def test_a_two_process_run_equals_a_one_process_run(small_corpus, tmp_path):
    """train.py itself under torchrun: each process takes its contiguous share of every batch (micro-batches
    of 2 rows, which a one-process run also forms, the ramp's half batch included), and the run ends
    with the parameters of the same run in one process, and logs what it logs."""
    repo = os.path.dirname(os.path.abspath(__file__))
    command = ["train.py", "--size", "tiny", "--data", small_corpus, "--no-default-data", "--allow-over-repetition",
               "--batch-size", "8", "--micro-batch", "2", "--max-steps", "3", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for launcher, out_dir in ((torchrun, "two"), ([], "one")):
        result = subprocess.run([sys.executable, *launcher, *command, "--out-dir", str(tmp_path / out_dir)],
                                capture_output=True, text=True, timeout=300, cwd=repo, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (train.load_checkpoint(tmp_path / d / "ckpt.pt") for d in ("one", "two"))
    for name, weight in one["model"].items():
        assert (weight - two["model"][name]).abs().max().item() < 1e-6, name
    records = {d: [record for _, record in train.metrics_lines(tmp_path / d / "metrics.jsonl")] for d in ("one", "two")}
    assert [r["tokens"] for r in records["two"]] == [r["tokens"] for r in records["one"]] == [1024, 3072, 5120]
    assert two["tokens"] == 5120
    for a, b in zip(records["one"], records["two"]):
        for key in ("ntp", "expert_balance"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


@pytest.mark.parametrize("env", [{"RANK": "1"}, {"RANK": "abc", "LOCAL_RANK": "0"}])
def test_a_rank_not_set_as_torchrun_sets_it_is_one_line(env, tmp_path, monkeypatch, capsys):
    # A RANK without LOCAL_RANK: another launcher, or a variable left in the shell.
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--out-dir", str(tmp_path / "run"), "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1
    assert err.startswith(f"error: RANK is set ({env['RANK']!r})") and err.endswith("or unset RANK")
    assert not (tmp_path / "run").exists()


def test_only_the_first_process_of_all_nodes_locks_the_run_folder(tmp_path, monkeypatch):
    # On a second node, the first process (LOCAL_RANK 0) is RANK 1 or more: with a shared file system
    # it would find the folder locked by RANK 0 and refuse to run.
    locked = []
    monkeypatch.setattr(train, "run_folder_lock", lambda folder: locked.append(folder) or contextlib.nullcontext())
    monkeypatch.setattr(train, "train", lambda args: None)
    for rank, local_rank in (("0", "0"), ("1", "0"), ("2", "0"), ("1", "1")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        train.main(["--out-dir", str(tmp_path / "run")])
    assert locked == [str(tmp_path / "run")]


def test_a_refusal_under_torchrun_is_one_line_per_process(tmp_path):
    """Process 0 refuses the data while process 1 waits for it at a barrier: process 0 says why, process 1
    that it stopped with it, and neither prints a traceback (torchrun's own report follows)."""
    repo = os.path.dirname(os.path.abspath(__file__))
    (tmp_path / "empty").mkdir()
    command = ["train.py", "--size", "tiny", "--data", str(tmp_path / "empty"), "--no-default-data",
               "--out-dir", str(tmp_path / "run")]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *command], capture_output=True, text=True, timeout=300, cwd=repo,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode != 0
    assert "error: no usable input files" in result.stderr
    assert "error: process 1 of the run stopped because another one did" in result.stderr
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr


# -----------------------------------------------------------------------------------------------
# Inference (sample.py): the KV cache, batching, transformers' generate, speculative decoding

@torch.no_grad()
def test_cached_decoding_equals_a_full_forward():
    cfg = replace(SMALL, max_seq_len=64)
    model = randomize(Mellum2(cfg)).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 45))  # over 5 windows long
    full, _ = model(idx)
    cache = KVCache(cfg, 2, 64)
    keys_read = {"full_attention": [], "sliding_attention": []}  # per step, over the layers of the type
    for layer in model.layers:
        layer.self_attn.attend = lambda q, k, v, mask, window, seen=keys_read[layer.layer_type]: (
            seen.append(k.shape[2]) or mellum2.sdpa_attend(q, k, v, mask, window))
    pieces, start, steps = [], 0, [13, 1, 1, 3, 9, 10, 8]
    # A prefill, then steps of several sizes. Up to spare + 1 = 9 tokens are stored before
    # they attend; the 10 must attend next to the old buffer, since they overwrite keys still needed.
    for size in steps:
        h, _ = model.trunk(idx[:, start:start + size], cache)
        pieces.append(model.lm_head(h))
        start += size
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() < 1e-5
    # A full layer reads only the slots filled so far (of 64), a sliding layer its whole buffer,
    # next to the new keys when they must attend before being stored.
    n_full, buffer = cfg.layer_types.count("full_attention"), cfg.sliding_window + 8
    assert keys_read["full_attention"] == [n for n in itertools.accumulate(steps) for _ in range(n_full)]
    assert set(keys_read["sliding_attention"]) == {buffer, buffer + 13, buffer + 10}
    # The sliding layers' rolling buffers stay window + spare slots long; the full layer keeps all.
    sizes = {layer.k.shape[1] for layer, t in zip(cache.layers, cfg.layer_types) if t == "sliding_attention"}
    assert sizes == {cfg.sliding_window + 8}


def test_a_prompt_longer_than_a_rolling_buffer_writes_each_slot_once():
    # Of a chunk longer than the buffer only the last `size` tokens are stored: two writes to one
    # slot in one indexing op land in an undefined order on a GPU (on a CPU, in order, so the
    # decoding tests cannot see it).
    slots = mellum2.Slots(batch_size=2, size=10, window=8, device="cpu")
    positions = torch.stack([torch.arange(25), torch.arange(-3, 22).clamp(min=-1)])  # row 1: 3 padding
    target, source, _, _ = slots.place(positions)
    written = list(zip(*(t.tolist() for t in target)))
    assert len(written) == len(set(written)) == 20
    assert sorted(slots.pos[0].tolist()) == list(range(15, 25)) and sorted(slots.pos[1].tolist()) == list(range(12, 22))


@torch.no_grad()
def test_rollback_forgets_exactly_the_dropped_tokens():
    cfg = replace(SMALL, max_seq_len=64)
    model = randomize(Mellum2(cfg)).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 30))
    full, _ = model(idx)
    cache = KVCache(cfg, 1, 64)
    model.trunk(idx[:, :20], cache)
    model.trunk(torch.randint(0, cfg.vocab_size, (1, 2)), cache)  # two wrong tokens ...
    cache.rollback(torch.tensor([20]))                           # ... taken back
    h, _ = model.trunk(idx[:, 20:], cache)
    assert (model.lm_head(h) - full[:, 20:]).abs().max().item() < 1e-5


def test_a_step_past_the_cache_is_refused_and_changes_nothing():
    cache = KVCache(SMALL, 1, 10)
    cache.advance(8)
    with pytest.raises(ValueError, match="at most 10 tokens"):
        cache.advance(5)
    assert cache.length.tolist() == [8] and cache.advance(2).tolist() == [[8, 9]]


def test_decoding_caches_hold_what_the_call_can_reach(monkeypatch):
    """A full layer's buffer holds the prompt and the new tokens, not the whole context (131072
    positions for a YaRN-extended model), in both decoding loops, up to the context's end."""
    model = randomize(Mellum2(replace(SMALL, max_seq_len=64))).eval()
    made = []
    monkeypatch.setattr(sample, "KVCache", lambda *a, **kw: made.append(KVCache(*a, **kw)) or made[-1])
    sample.generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], 6)
    sample.generate_speculative(model, [1, 2, 3], 6)
    assert len(sample.generate_speculative(model, list(range(60)), 10)[0]) == 4  # the context's last 4
    assert len(sample.generate(model, [list(range(60))], 10)[0]) == 4
    full = SMALL.layer_types.index("full_attention")
    assert [cache.layers[full].k.shape[1] for cache in made] == [5 + 6, 3 + 6, 64, 64]


@torch.no_grad()
def test_batch_decoding_equals_one_by_one():
    model = randomize(Mellum2(replace(SMALL, max_seq_len=64)), seed=5).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, SMALL.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 9)]
    together = sample.generate(model, prompts, 12, temperature=0)
    alone = [sample.generate(model, [p], 12, temperature=0)[0] for p in prompts]
    assert together == alone
    # A row that meets a stop id ends there while the others go on.
    stops = {alone[0][2], alone[1][7]}
    alone = [sample.generate(model, [p], 12, temperature=0, stop_ids=stops)[0] for p in prompts]
    assert [len(new) for new in alone] == [3, 8, 12]
    assert sample.generate(model, prompts, 12, temperature=0, stop_ids=stops) == alone


@torch.no_grad()
def test_batch_decoding_survives_attention_that_gives_nan_where_a_query_sees_nothing():
    # On a CPU, SDPA returns zeros for a row its mask hides entirely; a plain softmax (CUDA's math
    # path, many kernels) returns NaN there. A padding query is given keys to look at, or its NaN
    # would reach its values in the next layer and, through weight-0 terms, every real query.
    def softmax_attend(q, k, v, mask, window):  # q (B, H, T, hd), k and v (B, Hkv, S, hd)
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1) @ v

    # Prompts longer and shorter than a step the cache stores before attending (spare + 1 = 9 tokens),
    # and a full layer first, whose NaN would reach a sliding one's keys.
    for pattern, prompts in (("SSSF", [[1, 2, 3], list(range(10, 27))]), ("FS", [[1, 2, 3], list(range(4, 10))])):
        model = randomize(Mellum2(replace(SMALL, max_seq_len=64, attn_pattern=pattern)), seed=5).eval()
        alone = [sample.generate(model, [p], 6, temperature=0)[0] for p in prompts]
        for layer in model.layers:
            layer.self_attn.attend = softmax_attend
        assert sample.generate(model, prompts, 6, temperature=0) == alone, pattern


@torch.no_grad()
def test_long_prompts_go_into_the_cache_a_chunk_at_a_time(monkeypatch):
    """Attention over a cache masks every new query against every key (and CUDA's math path scores
    them all), so prompts go in sample.PREFILL_CHUNK queries at a time: the states are those of a
    pass over each prompt alone, in a padded batch whose short rows are padding for whole chunks."""
    model = randomize(Mellum2(replace(SMALL, max_seq_len=64)), seed=3).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, SMALL.vocab_size, (n,), generator=g).tolist() for n in (45, 6, 20)]
    queries = []
    for layer in model.layers:
        layer.self_attn.attend = lambda q, k, v, mask, window: queries.append(q.shape[2]) or mellum2.sdpa_attend(
            q, k, v, mask, window)
    monkeypatch.setattr(sample, "PREFILL_CHUNK", 7)
    idx, pad = torch.zeros(3, 45, dtype=torch.long), torch.ones(3, 45, dtype=torch.bool)
    for row, prompt in enumerate(prompts):  # left-padded, as generate() lays them out
        idx[row, 45 - len(prompt):], pad[row, 45 - len(prompt):] = torch.tensor(prompt), False
    h = sample.prefill(model, idx, KVCache(model.config, 3, 64), pad)
    assert sorted(set(queries)) == [3, 7]  # 6 chunks of 7 and the last 3
    for row, prompt in enumerate(prompts):
        alone, _ = model(torch.tensor([prompt]))  # (1, n, V), no cache
        torch.testing.assert_close(model.lm_head(h[row, 45 - len(prompt):]), alone[0], atol=1e-5, rtol=0)
    queries.clear()
    chunked = sample.generate(model, prompts, 10, temperature=0)
    assert max(queries) == 7
    monkeypatch.setattr(sample, "PREFILL_CHUNK", 1024)
    assert sample.generate(model, prompts, 10, temperature=0) == chunked


@torch.no_grad()
def test_greedy_generation_equals_transformers_generate(tmp_path):
    cfg = replace(SMALL, max_seq_len=64, vocab_size=300)
    randomize(Mellum2(cfg), seed=11).save_pretrained(tmp_path)
    ours = Mellum2.from_pretrained(tmp_path, device="cpu").eval()
    hf = transformers.MellumForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(3))
    expected = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = sample.generate(ours, [prompt[0].tolist()], 24, temperature=0)[0]
    assert got == expected[0, 20:].tolist()


def test_no_room_gives_no_tokens_and_a_prompt_past_the_context_is_an_error():
    model = Mellum2(SMALL).eval()
    full = [i % SMALL.vocab_size for i in range(SMALL.max_seq_len)]
    assert sample.generate(model, [full], 5) == [[]] and sample.generate_speculative(model, full, 5) == ([], 0, 0)
    assert sample.generate_speculative(model, [1, 2], 0) == ([], 0, 0)
    for decode in (lambda p: sample.generate(model, [p], 5), lambda p: sample.generate_speculative(model, p, 5)):
        with pytest.raises(ValueError, match="the prompt is 65 tokens; this model's context is 64"):
            decode(full + [1])
    # In a batch, the longest prompt sets the room, wherever it stands.
    assert [len(new) for new in sample.generate(model, [[1, 2, 3], full[:60]], 10)] == [4, 4]


@pytest.mark.parametrize("seed", range(6))
def test_greedy_speculative_output_equals_plain(seed):
    """Half the models are trained a little on a repetitive pattern so most drafts are accepted;
    the others are untrained, so most are rejected: both paths must give the plain output."""
    cfg = replace(SMALL, max_seq_len=96, sliding_window=6)
    torch.manual_seed(seed)
    model = Mellum2(cfg)
    if seed % 2:
        pattern = torch.arange(40).repeat(3)[None] % 17
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(40):
            model(pattern[:, :-1], pattern[:, 1:])[1].backward()
            opt.step()
            opt.zero_grad()
    model.eval()

    def decode_shown(decode, prompt, stop_ids=(), k=0):
        """Greedy output, checking that on_token saw each token returned once, in order (the stop id
        too, in both loops); it asks to stop after k tokens."""
        shown = []
        out = decode(model, [prompt] if decode is sample.generate else prompt, 30, temperature=0,
                     stop_ids=stop_ids, on_token=lambda row, token: shown.append(token) or len(shown) == k)[0]
        assert out == shown, decode.__name__
        return out

    g = torch.Generator().manual_seed(seed)
    for n in (1, 5, 20):
        prompt = (torch.arange(n) % 17).tolist() if seed % 2 else torch.randint(0, 256, (n,), generator=g).tolist()
        plain = sample.generate(model, [prompt], 30, temperature=0)[0]
        fast, drafts, accepted = sample.generate_speculative(model, prompt, 30, temperature=0)
        assert fast == plain
        assert drafts > 0 and (accepted > drafts // 2 if seed % 2 else accepted < drafts)
        # A stop id ends both at its first occurrence, whether it came as the checked token, or as
        # the bonus after an accepted draft (the pattern's tokens come both ways).
        for decode in (sample.generate, sample.generate_speculative):
            for stop in {plain[0], plain[1], plain[10], plain[-1]}:
                assert decode_shown(decode, prompt, stop_ids={stop}) == plain[:plain.index(stop) + 1]
            for k in (1, 2, 11):  # so does on_token asking to stop
                assert decode_shown(decode, prompt, k=k) == plain[:k]
        # Sampling with a nucleus holding only the likeliest token draws what greedy decoding chooses.
        assert sample.generate(model, [prompt], 30, temperature=1.0, top_p=1e-6, seed=seed)[0] == plain
        assert sample.generate_speculative(model, prompt, 30, temperature=1.0, top_p=1e-6, seed=seed)[0] == plain


@pytest.mark.parametrize("chunk", [1024, 3])
def test_every_draft_equals_the_mtp_head_over_the_whole_text(chunk, monkeypatch):
    """The MTP layer's cache stays in step with the text through accepted drafts (after which it
    reads two pairs) and rejected ones, in a window shorter than the text: each draft's logits equal,
    within fp32 rounding, the hand-computed MTP logits of the final text at the draft's position.
    With chunks of 3 the MTP layer reads the prompt's pairs 3 at a time, as the trunk its tokens."""
    monkeypatch.setattr(sample, "PREFILL_CHUNK", chunk)
    cfg = replace(SMALL, max_seq_len=48, sliding_window=5)
    model = randomize(Mellum2(cfg), seed=2)
    pattern = torch.arange(48)[None] % 11
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(6):  # a few steps on a repeating pattern: some drafts right, some wrong
        model(pattern[:, :-1], pattern[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    drafted, draft = [], model.draft
    monkeypatch.setattr(model, "draft", lambda h, ids, cache, positions: drafted.append(
        (int(positions[0, -1]), ids.shape[1], draft(h, ids, cache, positions))) or drafted[-1][2])
    # A prompt of n tokens leaves n (state, token) pairs for the first calls to read: 7, and 6, a
    # whole number of chunks.
    for prompt, prompt_pairs in (([3, 4, 5, 6, 7, 8, 9], [3, 3, 1] if chunk == 3 else [7]),
                                 ([3, 4, 5, 6, 7, 8], [3, 3] if chunk == 3 else [6])):
        drafted.clear()
        new, drafts, accepted = sample.generate_speculative(model, prompt, 36, temperature=0)
        assert 0 < accepted < drafts
        _, expected = naive_final_states_and_mtp_logits(model, torch.tensor(prompt + new))
        for position, _, logits in drafted:  # a draft reads (h at position - 1, the token at position)
            torch.testing.assert_close(logits[0], expected[position - 1], atol=1e-4, rtol=1e-4)
        assert [pairs for _, pairs, _ in drafted[:len(prompt_pairs)]] == prompt_pairs


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.5, 0), (1.0, 3)])
def test_sampled_speculative_decoding_keeps_the_model_distribution(temperature, top_k):
    """Whole sampled generations: the first three new tokens, drawn with MTP drafts kept or redrawn by
    the speculative rule, follow the trunk's own joint distribution after temperature and top-k (each
    of the 64 outcomes on a 4-token vocabulary within 5 binomial standard deviations), while the
    drafts alone do not. Both the draft's distribution and the trunk's must go through the same
    adjustments: the rule is exact only for the distributions the tokens were drawn from."""
    cfg = replace(SMALL, vocab_size=4, max_seq_len=16)
    model = randomize(Mellum2(cfg), seed=7).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # sharper: drafts differ from the trunk's choice about half the time
        prompt = [1, 2, 3]
        texts = torch.tensor([prompt + [a, b] for a in range(4) for b in range(4)])  # (16, 5)
        probs = sample.next_token_probs(model(texts)[0].flatten(0, 1), temperature, top_k).view(16, 5, 4)  # (16, 5, V)
        first, second, third = probs[0, 2], probs[::4, 3], probs[:, 4].view(4, 4, 4)  # (V,), (V, V), (V, V, V)
        expected = first[:, None, None] * second[:, :, None] * third  # p(a, b, c)
        # What keeping every draft would give: the second token from the MTP head instead of the trunk.
        _, mtp_logits = zip(*(naive_final_states_and_mtp_logits(model, t) for t in texts[::4]))
        mtp_probs = sample.next_token_probs(torch.stack(mtp_logits)[:, 2], temperature, top_k)  # (V, V)
        drafts_only = first[:, None, None] * mtp_probs[:, :, None] * third
    n = 800
    counts = torch.zeros(4, 4, 4)
    for seed in range(n):
        a, b, c = sample.generate_speculative(model, prompt, 3, temperature=temperature, top_k=top_k, seed=seed)[0]
        counts[a, b, c] += 1
    sigma = (n * expected * (1 - expected)).sqrt()
    assert ((counts - n * expected).abs() <= 5 * sigma + 1).all()
    assert ((counts - n * drafts_only).abs() > 5 * sigma + 1).any()


def test_speculative_sampling_keeps_the_target_distribution():
    """verify_draft on a 5-token vocabulary: draft from q, keep or redraw; the tokens that come out
    must follow p (each frequency within 5 binomial standard deviations), and the drafts kept must
    be the largest share any exact rule can keep, sum_x min(p(x), q(x))."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.4, 0.1, 0.3, 0.1])  # far from p: without the correction the output follows q
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts, kept = torch.zeros(5), 0
    for _ in range(n):
        draft = int(torch.multinomial(q, 1, generator=g))
        ok, token = sample.verify_draft(p, q, draft, g)
        counts[token] += 1
        kept += ok
    sigma = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * sigma).all(), counts / n
    overlap = torch.minimum(p, q).sum().item()  # 0.55
    assert abs(kept - n * overlap) <= 5 * math.sqrt(n * overlap * (1 - overlap)), kept / n


def test_a_draft_the_trunk_rules_out_is_never_kept(monkeypatch):
    """Even at the edge of the uniform draw (torch.rand returning exactly 0), a draft of probability 0
    under the trunk is replaced by the trunk's own token."""
    monkeypatch.setattr(torch, "rand", lambda *size, generator=None, device=None: torch.zeros(*size))
    assert sample.verify_draft(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), 0, None) == (False, 1)


def test_a_rejected_draft_with_nothing_left_over_is_redrawn_from_the_trunk():
    """When q lies above p wherever they differ (the same distribution up to rounding), max(p - q, 0)
    is empty: the redraw comes from p itself, never an id p rules out."""
    p, q = torch.tensor([0.0, 0.5, 0.5]), torch.tensor([0.1, 0.5, 0.5])  # the draft, id 0, is always rejected
    g = torch.Generator().manual_seed(0)
    tokens = [sample.verify_draft(p, q, 0, g) for _ in range(200)]
    assert {ok for ok, _ in tokens} == {False} and {token for _, token in tokens} == {1, 2}


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    """Inverse-CDF sampling against the probabilities it was given: frequencies within 5 binomial
    standard deviations on an unnormalised row with zeros at both ends; a one-hot row is its argmax."""
    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 4.0, 2.0, 0.0])
    p = weights / weights.sum()
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(sample.draw(weights.expand(n, -1), g), minlength=7).float()
    assert (counts[p == 0] == 0).all()
    assert ((counts - n * p).abs() <= 5 * (n * p * (1 - p)).sqrt()).all(), counts / n
    one_hot = F.one_hot(torch.tensor([4, 0, 6]), 7).float()
    assert sample.draw(one_hot, g).tolist() == [4, 0, 6]
    # Each row scaled by its own total: a row of small weights after a row of large ones is even too.
    ids = sample.draw(torch.tensor([[4.0, 4.0], [1.0, 1.0]]).repeat(500, 1), g)
    assert ids.max() < 2 and abs((ids[1::2] == 0).float().mean().item() - 0.5) < 0.1
    # Nor with a GPU's cumsum, which can leave a zero's running total a rounding unit above the one
    # before it; here u is the largest it can be, the total, and a zero is last.
    cumsum = torch.Tensor.cumsum

    def parallel_cumsum(self, dim):
        totals = cumsum(self, dim)
        return torch.where(self == 0, totals.nextafter(torch.tensor(math.inf)), totals)

    with unittest.mock.patch.object(torch.Tensor, "cumsum", parallel_cumsum), \
            unittest.mock.patch.object(torch, "rand", lambda *shape, **kwargs: torch.zeros(shape)):
        assert sample.draw(torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]), g).tolist() == [1, 1]


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    top2 = logits[0, :2].softmax(-1)  # the kept tokens share the mass in their own proportions
    torch.testing.assert_close(sample.next_token_probs(logits, 1.0, top_k=2)[0], torch.cat([top2, torch.zeros(3)]))
    probs = logits.softmax(-1)[0]
    nucleus = sample.next_token_probs(logits, 1.0, top_p=float(probs[0] + probs[1]) - 1e-3)[0]
    torch.testing.assert_close(nucleus, torch.cat([top2, torch.zeros(3)]))
    assert torch.equal(sample.next_token_probs(logits, 0.0)[0], torch.tensor([1.0, 0, 0, 0, 0]))
    # A tie at the threshold: the best token alone holds exactly top_p, so it is the whole nucleus.
    tie = torch.tensor([[math.log(2.0), 0.0, 0.0]])
    assert sample.next_token_probs(tie, 1.0, top_p=0.5)[0].tolist() == [1.0, 0.0, 0.0]
    # A top_p too small for fp32 (it would round to 0 and keep nothing) keeps the best token, as 1e-6 does.
    for top_p in (1e-6, 1e-46, 5e-324):
        assert sample.next_token_probs(logits, 1.0, top_p=top_p)[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    # A top_k beyond the vocabulary keeps all of it.
    torch.testing.assert_close(sample.next_token_probs(logits, 1.0, top_k=50), logits.softmax(-1))


@torch.no_grad()
def test_generate_records_the_log_probability_each_token_was_drawn_with():
    """What a GRPO rollout stores as the engine's log-probs: log p(token) under the tempered,
    filtered distribution of a full forward pass over the text so far."""
    model = randomize(Mellum2(SMALL)).eval()
    prompts, logprobs = [[5, 6, 7], [8, 9, 10, 11, 12]], []
    out = sample.generate(model, prompts, 6, temperature=0.7, top_k=50, seed=0, logprobs=logprobs)
    for prompt, new, recorded in zip(prompts, out, logprobs):
        logits, _ = model(torch.tensor([prompt + new[:-1]]))
        probs = sample.next_token_probs(logits[0, len(prompt) - 1:], 0.7, top_k=50)  # (6, V)
        assert recorded == pytest.approx(probs[torch.arange(6), new].log().tolist(), abs=1e-4)
    # Greedy: the chosen token had all the probability, and the text is greedy decoding's.
    out = sample.generate(model, prompts, 6, temperature=0, logprobs=logprobs)
    assert out == sample.generate(model, prompts, 6, temperature=0) and logprobs == [[0.0] * 6] * 2


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (7, 1.0), (0, 0.9), (0, 0.05), (20, 0.5)])
def test_sampling_distribution_equals_transformers_warpers(temperature, top_k, top_p):
    """next_token_probs against the softmax of transformers' temperature, top-k and top-p warpers
    applied in generate's order, on random rows of varied sharpness."""
    from transformers.generation import logits_process as lp
    sharpness = torch.linspace(0.5, 6, 8)[:, None]
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(top_k)) * sharpness
    warped = lp.TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        warped = lp.TopKLogitsWarper(top_k)(None, warped)
    if top_p < 1.0:
        warped = lp.TopPLogitsWarper(top_p)(None, warped)
    torch.testing.assert_close(sample.next_token_probs(logits, temperature, top_k, top_p), warped.softmax(-1),
                               rtol=1e-5, atol=1e-6)


def test_scripts_say_how_to_make_the_default_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a fresh checkout: nothing trained yet
    for main in (sample.main, evaluate.main):
        with pytest.raises(SystemExit) as exit_info:
            main([])
        assert exit_info.value.code == 1
        assert capsys.readouterr().err == "error: out/tiny: no such folder; python train.py --size tiny trains it\n"
    with pytest.raises(SystemExit):  # another missing folder has nothing to suggest
        sample.main(["--init-from", "out/small"])
    assert capsys.readouterr().err == "error: out/small: no such folder\n"


@pytest.mark.parametrize("argv,message", [
    (["--init-from", "{tmp}/nothing"], "no such folder"),
    (["--init-from", ""], "--init-from needs a folder name"),
    (["--init-from", "{tmp}"], "no ckpt.pt (a train.py run) or config.json (a Hugging Face directory); it holds the "
                               "runs corrupt, diverged, foreign, mismatch: give one, e.g. "),  # as a --compare run's
    (["--init-from", "{tmp}/corrupt"], "unreadable checkpoint"),
    (["--start", ""], "the prompt is empty"),
    (["--start", "x = 1\n" * 100], "this model's context is 256"),
    (["--start", " a" * 256], "the prompt is 256 tokens and fills this model's 256-token context"),
    (["--start", "FILE:{tmp}/huge.py"], "holds over 16,777,216 characters"),
    (["--init-from", "{tmp}/model/config.json"], "is a file: give the folder"),
    (["--init-from", "{tmp}/unfinished-download"], "missing model-00002-of-00002.safetensors"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "inf"], "--temperature must be >= 0 and finite, got inf"),
    (["--temperature", "nan"], "--temperature must be >= 0 and finite, got nan"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-k", "-3"], "--top-k"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--init-from", "{tmp}/foreign"], "not a train.py checkpoint"),
    (["--init-from", "{tmp}/mismatch"], "ckpt.pt: its weights do not fit its config"),
    (["--init-from", "{tmp}/diverged"], "diverged: the weights hold NaN or infinite values"),
    (["--init-from", "{tmp}/bad-config"], "bad-config/config.json: unreadable"),
    (["--init-from", "{tmp}/bad-tokenizer"], "unreadable tokenizer"),
    (["--init-from", "{tmp}/wider-vocab"], "the model has 8192 tokens and no tokenizer.json"),
    (["--chat", "--start", ""], "the prompt is empty"),
    (["--prefix", "", "--suffix", ""], "the prompt is empty"),
    (["--prefix", "a", "--suffix", "b", "--start", "x"], "do not combine"),
    (["--prefix", "a", "--suffix", "b", "--chat"], "do not combine"),
    (["--hide-thinking"], "--hide-thinking is for --chat"),
    (["--stop", ""], "--stop needs"),
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--seed", str(2**64)], "--seed must be between 0 and 2**64 - 1"),
    (["--seed", "-1"], "--seed must be between 0 and 2**64 - 1, got -1"),
    (["--prefix", "a"], "--prefix and --suffix go together"),
    (["--suffix", "b"], "--prefix and --suffix go together"),
    (["--device", "nonsense"], "unknown device"),
    (["--device", ""], "unknown device ''"),
    (["--device", "cuda:64"], "not available"),
])
def test_sample_bad_input(argv, message, tmp_path, capsys):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "ckpt.pt").write_bytes(b"\x00garbage")
    (tmp_path / "foreign").mkdir()
    torch.save({"a": 1}, tmp_path / "foreign" / "ckpt.pt")
    (tmp_path / "mismatch").mkdir()
    train.save_checkpoint(tmp_path / "mismatch" / "ckpt.pt", Mellum2(SMALL), [], 0, {"steps": 1})
    state = torch.load(tmp_path / "mismatch" / "ckpt.pt")
    state["config"]["n_layer"] = 2  # weights of 4 layers under a config of 2
    torch.save(state, tmp_path / "mismatch" / "ckpt.pt")
    diverged = Mellum2(replace(SMALL, vocab_size=data.VOCAB_SIZE))
    diverged.lm_head.weight.data[3, 5] = float("nan")
    (tmp_path / "diverged").mkdir()
    train.save_checkpoint(tmp_path / "diverged" / "ckpt.pt", diverged, [], 0, {"steps": 1})
    Mellum2(Mellum2Config.from_preset("tiny")).save_pretrained(tmp_path / "model")
    (tmp_path / "huge.py").write_text("x" * (sample.MAX_PROMPT_CHARS + 1))
    Mellum2(SMALL).save_pretrained(tmp_path / "unfinished-download")
    Mellum2(replace(SMALL, vocab_size=8192)).save_pretrained(tmp_path / "wider-vocab")
    (tmp_path / "unfinished-download" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model.safetensors",
                        "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    for damaged, name, text in [("bad-config", "config.json", '{"model_type": "mellum", "layer_types": ["x"]}'),
                                ("bad-tokenizer", "tokenizer.json", "garbage")]:
        Mellum2(SMALL).save_pretrained(tmp_path / damaged)
        (tmp_path / damaged / name).write_text(text)
    args = ["--init-from", str(tmp_path / "model")] + [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        sample.main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and message in err and len(err.splitlines()) == 1
    assert len(err) < 500  # the mismatched weights: a few names and a count, not all 79


def test_a_tiny_temperature_is_nearly_greedy():
    for logits in (torch.tensor([[3.0, 1.0, 3.5, -2.0]]), torch.tensor([[30.0, 10.0, 35.0, -20.0]])):
        for temperature in (1e-40, 1e-300):  # 35 / 1e-40 overflows fp32: the logits must be shifted first
            assert torch.equal(sample.next_token_probs(logits, temperature), torch.tensor([[0.0, 0, 1, 0]]))
    # Each row of a batch is shifted by its own best logit, however far below the other rows' it lies.
    batch = torch.tensor([[3.0, 1.0, 3.5, -2.0], [-20.0, -10.0, -15.0, -30.0]])
    assert torch.equal(sample.next_token_probs(batch, 1e-40), torch.tensor([[0.0, 0, 1, 0], [0, 1, 0, 0]]))


def test_top_k_keeps_the_ties_of_the_kth_and_top_p_one_keeps_every_token():
    """As transformers' warpers do. A token tied with the k-th likeliest stays; and top_p = 1.0 is
    off, even for a token whose share is too small to move fp32's running sum off 1."""
    tied = sample.next_token_probs(torch.tensor([[2.0, 1.0, 1.0, 0.0]]), 1.0, top_k=2)
    torch.testing.assert_close(tied, torch.tensor([[*torch.tensor([2.0, 1.0, 1.0]).softmax(-1), 0.0]]))
    tiny_share = sample.next_token_probs(torch.tensor([[0.0, 0.0, -20.0]]), 1.0, top_p=1.0)
    torch.testing.assert_close(tiny_share, torch.tensor([[0.0, 0.0, -20.0]]).softmax(-1), rtol=1e-5, atol=0)


def test_printer_holds_back_what_may_still_change(capsys):
    """A stop string that arrives over several tokens is never partly printed, and a character whose
    UTF-8 bytes arrive in separate tokens is printed whole."""
    enc = data.load_tokenizer()
    vocab = sample.Vocabulary(enc, data.SPECIAL_TOKENS, {data.EOT})
    text = "x = '日本語 €'\nimport sys\nprint(x)\n"
    ids = enc.encode_ordinary(text)
    assert any(b"\xe6\x97\xa5".startswith(enc.decode_bytes([i])) for i in ids)  # a piece of a character
    printer, shown = sample.Printer(vocab, ["import sys"], hide_thinking=False), []
    for i in ids:
        stopped = printer(0, i)
        shown.append(capsys.readouterr().out)
        if stopped:
            break
    printer.finish()
    assert "".join(shown) + capsys.readouterr().out == "x = '日本語 €'\n"
    assert not any("\ufffd" in piece or "im" in piece for piece in shown)
    # Without a stop string in the text, what was held back comes out at the end: here "import o"
    # might have become "import os" until the text ended.
    printer = sample.Printer(vocab, ["import os"], hide_thinking=False)
    for i in enc.encode_ordinary(text + "import o"):
        printer(0, i)
    assert capsys.readouterr().out == text
    printer.finish()
    assert capsys.readouterr().out == "import o"
    # Two stop strings: the text ends where the first of them starts, in whatever order they were given
    for stops in (["port", "import"], ["import", "port"]):
        printer = sample.Printer(vocab, stops, hide_thinking=False)
        any(printer(0, i) for i in ids)
        printer.finish()
        assert capsys.readouterr().out == "x = '日本語 €'\n", stops
    # A byte that begins no character (a model may write one) prints as U+FFFD once the next token
    # shows it stays alone, and the text after it streams and stops as any other.
    printer = sample.Printer(vocab, ["import"], hide_thinking=False)
    assert any(printer(0, i) for i in [enc.encode_single_token(b"\x80"), *enc.encode_ordinary(" ok\nimport sys\n")])
    assert capsys.readouterr().out == "\ufffd ok\n"


def test_printer_hides_every_think_block_and_only_them(capsys):
    """Text before, between and after the reasoning is printed, no reasoning ever is, and a stop
    string counts only where it would be printed."""
    enc, special = data.load_tokenizer(), data.SPECIAL_TOKENS
    vocab = sample.Vocabulary(enc, special, {data.EOT})
    think, end = [special["<think>"]], [special["</think>"]]
    ids = [*enc.encode_ordinary("Hi "), *think, *enc.encode_ordinary("plan one"), *end,
           *enc.encode_ordinary("x = 1"), *think, *enc.encode_ordinary("plan two"), *end, *enc.encode_ordinary(" ok")]
    for stops, hide, expected in [([], True, "Hi x = 1 ok"), (["plan"], True, "Hi x = 1 ok"),
                                  (["plan"], False, "Hi <think>"), (["1 o"], True, "Hi x = ")]:
        printer, shown = sample.Printer(vocab, stops, hide_thinking=hide), []
        for i in ids:
            if printer(0, i):
                break
            shown.append(capsys.readouterr().out)
        printer.finish()
        assert "".join(shown) + capsys.readouterr().out == expected, (stops, hide)
        assert not any("plan" in piece for piece in shown) or not hide
    # One token may end a stop string and begin what could still become a tag, which is held back:
    # after the stop nothing more is printed, that beginning included.
    one_token = types.SimpleNamespace(decode_bytes=lambda ids: b"a stop<" * len(ids))
    printer = sample.Printer(sample.Vocabulary(one_token, {}, set()), ["stop"], hide_thinking=True)
    assert printer(0, 0)
    printer.finish()
    assert capsys.readouterr().out == "a "


class RecordingDecoder:
    """A tokenizer's decoder for the printer tests: the project's, optionally dropping the leading
    space of each text it decodes (as a tokenizer.json's Metaspace decoder does), and recording how
    many ids each call was given."""

    def __init__(self, enc, drop_leading_space=False):
        self.enc, self.drop_leading_space, self.lengths = enc, drop_leading_space, []

    def decode_bytes(self, ids):
        self.lengths.append(len(ids))
        text = self.enc.decode_bytes(ids)
        return text.removeprefix(b" ") if self.drop_leading_space else text


def shown_at_once(text, hide_thinking, stops):
    """What the printer shows of a whole text (bytes): its think blocks removed (an open one to the
    end) if hidden, cut at the first stop string."""
    text = text.decode(errors="replace")
    if hide_thinking:
        text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL).split("<think>", 1)[0]
    return text[:min([text.index(s) for s in stops if s in text], default=len(text))]


def test_printer_streams_exactly_what_the_whole_text_says(capsys):
    """Random texts of think blocks (as special tokens and as plain text arriving in pieces), stop
    strings and characters split over tokens: at every step what is printed is the start of what
    the whole text, decoded at once, shows (its think blocks removed, cut at the first stop string),
    and in the end all of it. Each token decodes only the few ids still undecided, however long the
    text has grown, and a decoder that treats the start of a text apart sees each piece after the
    one before it."""
    enc, special = data.load_tokenizer(), data.SPECIAL_TOKENS
    pieces = [enc.encode_ordinary(t) for t in ("x = 1\n", " 日本語", "€ ", "plan", " import sys", "<thi", "nk>",
                                               "</", "think>", "<think>", " ok")]
    pieces += [[special["<think>"]], [special["</think>"]], [special["<fim_pad>"]]]  # the last is never shown
    rng = random.Random(0)
    for trial in range(60):
        ids = [i for _ in range(rng.randrange(1, 40)) for i in rng.choice(pieces)]
        hide, stops = trial % 2 == 0, rng.choice([[], ["import"], ["ok", "x = 1\nplan"], ["\n<th", "本"]])
        decoder = RecordingDecoder(enc, drop_leading_space=trial % 3 == 0)
        vocab = sample.Vocabulary(decoder, special, {data.EOT})
        printer, printed, fed = sample.Printer(vocab, stops, hide), "", []
        for i in ids:
            fed.append(i)
            stopped = printer(0, i)
            printed += capsys.readouterr().out
            whole = shown_at_once(decoder.decode_bytes([i for i in fed if i != special["<fim_pad>"]]), hide, stops)
            assert whole.startswith(printed), (trial, printed, whole)
            if stopped:
                break
        printer.finish()
        assert printed + capsys.readouterr().out == whole, trial
    # A long answer: every call decodes a few ids, not all of them so far.
    decoder = RecordingDecoder(enc)
    printer = sample.Printer(sample.Vocabulary(decoder, special, {data.EOT}), ["import zebra"], hide_thinking=True)
    with open(sample.__file__, encoding="utf-8") as f:
        code = f.read()
    for i in enc.encode_ordinary(code):
        printer(0, i)
    printer.finish()
    assert capsys.readouterr().out == shown_at_once(code.encode(), True, ["import zebra"])
    assert len(decoder.lengths) > 2 * 5000 and max(decoder.lengths) <= 4


def test_sample_notes_a_capped_length_and_stops_quietly_on_a_closed_pipe(tmp_path, capsys):
    Mellum2(Mellum2Config.from_preset("tiny")).save_pretrained(tmp_path)
    prompt = "x = 1\n" * 50
    room = 256 - len(data.load_tokenizer().encode_ordinary(prompt))
    assert 0 < room < 10
    sample.main(["--init-from", str(tmp_path), "--start", prompt, "--max-new-tokens", "10"])
    assert f"note: {room} new tokens fit in this model's 256-token context" in capsys.readouterr().err
    command = [sys.executable, "sample.py", "--init-from", str(tmp_path), "--max-new-tokens", "100"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=os.path.dirname(os.path.abspath(__file__)))
    process.stdout.close()  # the reader goes away before the first token
    err = process.stderr.read().decode()
    assert process.wait() == 1 and err == ""


@pytest.mark.parametrize("script,argv", [("sample", ["--max-new-tokens", "2"]), ("bench", ["params"]),
                                         ("train", ["--data-report"]), ("evaluate", [])])
def test_a_closed_standard_output_is_refused_not_written_into(script, argv, tmp_path, monkeypatch, capsys):
    """`python sample.py >&-` printed into nothing and exited 0; so did bench.py and the data report.
    evaluate.py without --json said so only after the whole evaluation."""
    if script == "sample":
        Mellum2(Mellum2Config.from_preset("tiny")).save_pretrained(tmp_path)
        argv = ["--init-from", str(tmp_path), *argv]
    monkeypatch.setattr(sys, "stdout", None)  # what Python sets when descriptor 1 is closed
    with pytest.raises(SystemExit) as stopped:
        {"sample": sample, "bench": __import__("bench"), "train": train, "evaluate": evaluate}[script].main(argv)
    assert stopped.value.code == 1
    assert capsys.readouterr().err == "error: the standard output is closed: there is nowhere to write\n"


def test_the_data_report_stops_quietly_on_a_closed_pipe(tiny, tmp_path, monkeypatch, capsys):
    """python train.py --data-report | head: as sample.py does (it said "error: Broken pipe")."""
    handle = open(tmp_path / "stdout", "w")

    class GoneReader(io.StringIO):  # a pipe whose reader has exited, on a real file descriptor
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return handle.fileno()

    monkeypatch.setattr(sys, "stdout", GoneReader())
    monkeypatch.setattr(train, "train", lambda args: data.data_report(tiny, 50_000))
    with pytest.raises(SystemExit) as stopped:
        train.main(["--data-report"])
    handle.close()
    assert stopped.value.code == 1 and capsys.readouterr().err == ""


def test_chat_with_a_base_model_says_what_teaches_it_to_chat(tmp_path, capsys):
    model = Mellum2(Mellum2Config.from_preset("tiny"))
    for stage in ("long", "sft", None):  # None: a run of a version that wrote no stage, all pre-training
        (tmp_path / str(stage)).mkdir()
        settings = {"steps": 1} if stage is None else {"stage": stage, "steps": 1}
        train.save_checkpoint(tmp_path / str(stage) / "ckpt.pt", model, [], 1, settings)
        sample.main(["--init-from", str(tmp_path / str(stage)), "--chat", "--start", "hi", "--max-new-tokens", "2"])
        assert ("is a pre-trained base model" in capsys.readouterr().err) == (stage != "sft")


def test_chat_runs_the_calculator_and_lets_the_model_go_on(tmp_path, monkeypatch, capsys):
    """A scripted model: its first turn calls the tool, its second answers with what the tool said."""
    enc, special = data.load_tokenizer(), data.SPECIAL_TOKENS
    call = '{"name": "calculator", "arguments": {"expression": "382 * 47"}}'
    turns = [[special["<tool_call>"], *enc.encode_ordinary(call), special["</tool_call>"], special["<|end|>"]],
             [*enc.encode_ordinary("382 * 47 = 17954"), special["<|end|>"]]]
    prompts, draws = [], []

    def scripted(model, prompts_, max_new_tokens, on_token=None, seed=None, **options):
        prompts.append(prompts_[0])
        draws.append(torch.rand(1, generator=sample.seeded_generator(seed, "cpu")).item())
        for token in turns[len(prompts) - 1]:
            on_token(0, token)
        return [turns[len(prompts) - 1]]

    monkeypatch.setattr(sample, "generate", scripted)
    train.save_checkpoint(tmp_path / "ckpt.pt", Mellum2(Mellum2Config.from_preset("tiny")), [], 1,
                          {"stage": "sft", "steps": 1})
    sample.main(["--init-from", str(tmp_path), "--chat", "--start", "Use the calculator to work out 382 * 47."])
    assert capsys.readouterr().out == f"<tool_call>{call}</tool_call>\n<tool_response>17954</tool_response>\n" \
                                      "382 * 47 = 17954\n"
    reply = data.render_message(enc, {"role": "tool", "content": "17954"}) + [special["<|assistant|>"]]
    assert prompts[1] == prompts[0] + turns[0] + reply  # the model reads its call and the reply, then goes on
    # The second turn goes on drawing from the seeded stream instead of repeating its first numbers.
    assert draws == torch.rand(2, generator=torch.Generator().manual_seed(1337)).tolist()


def scripted_calls(monkeypatch, speculative):
    """Replaces the decoding loop sample.main uses with one whose every turn calls the calculator
    (its speculative form counting 5 drafts, 2 accepted) -> (the call's ids, the prompt and the
    budget of each turn, as they grow)."""
    enc, special = data.load_tokenizer(), data.SPECIAL_TOKENS
    request = '{"name": "calculator", "arguments": {"expression": "2 + 2"}}'
    call = [special["<tool_call>"], *enc.encode_ordinary(request), special["</tool_call>"], special["<|end|>"]]
    turns, budgets = [], []

    def always_calls(model, prompt, max_new_tokens, on_token=None, **options):
        turns.append(prompt if speculative else prompt[0])  # generate() takes a batch of prompts
        budgets.append(max_new_tokens)
        for token in call:
            on_token(0, token)
        return (call, 5, 2) if speculative else [call]

    monkeypatch.setattr(sample, "generate_speculative" if speculative else "generate", always_calls)
    return call, turns, budgets


@pytest.mark.parametrize("speculative", [False, True])
def test_chat_leaves_a_call_in_its_last_turn_unanswered(speculative, tmp_path, monkeypatch, capsys):
    """As in the rollouts that trained it: no turn is left to read the reply, so none is printed."""
    call, turns, budgets = scripted_calls(monkeypatch, speculative)
    train.save_checkpoint(tmp_path / "ckpt.pt", Mellum2(Mellum2Config.from_preset("tiny")), [], 1,
                          {"stage": "sft", "steps": 1})
    sample.main(["--init-from", str(tmp_path), "--chat", "--start", "2 + 2?", "--max-new-tokens", "200"]
                + ["--speculative"] * speculative)
    out, err = capsys.readouterr()
    assert len(turns) == train.MAX_TURNS and out.count("<tool_response>4</tool_response>") == train.MAX_TURNS - 1
    assert budgets == [200 - turn * len(call) for turn in range(train.MAX_TURNS)]  # --max-new-tokens for them all
    assert out.endswith("</tool_call>\n") and out.count("<tool_call>") == train.MAX_TURNS
    if speculative:  # the drafts of all turns: accepted first
        assert err.splitlines()[-1].startswith(f"speculative: {2 * train.MAX_TURNS}/{5 * train.MAX_TURNS} drafts "
                                               "accepted (40%), ")


def test_chat_ends_with_a_note_when_a_tool_reply_fills_the_context(tmp_path, monkeypatch, capsys):
    enc = data.load_tokenizer()
    call, turns, _ = scripted_calls(monkeypatch, speculative=False)
    reply = data.render_message(enc, {"role": "tool", "content": "4"}) + [data.SPECIAL_TOKENS["<|assistant|>"]]
    question = " a" * (256 - 3 - len(call) - len(reply))  # <|user|> question <|end|> <|assistant|>
    Mellum2(Mellum2Config.from_preset("tiny")).save_pretrained(tmp_path)
    sample.main(["--init-from", str(tmp_path), "--chat", "--start", question])
    assert len(turns[0]) + len(call) + len(reply) == 256
    out, err = capsys.readouterr()
    assert len(turns) == 1 and out.endswith("<tool_response>4</tool_response>\n\n")
    assert err.splitlines()[-1] == "note: with the tool's reply the chat fills this model's 256-token context"


def test_speculative_sampling_prints_the_plain_text_and_then_its_acceptance(tmp_path, capsys):
    Mellum2(Mellum2Config.from_preset("tiny")).save_pretrained(tmp_path)
    texts = []
    for argv in ([], ["--speculative"], ["--speculative", "--max-new-tokens", "1"]):
        sample.main(["--init-from", str(tmp_path), "--temperature", "0", "--max-new-tokens", "20"] + argv)
        texts.append(capsys.readouterr())
    assert texts[0].out == texts[1].out and texts[0].err == ""
    accepted, drafts, share = map(int, re.fullmatch(r"speculative: (\d+)/(\d+) drafts accepted \((\d+)%\), "
                                                    r"\d+\.\d tokens/s", texts[1].err.splitlines()[-1]).groups())
    assert 0 <= accepted <= drafts and drafts > 0 and share == round(100 * accepted / drafts)
    assert re.fullmatch(r"speculative: 0/0 drafts accepted \(0%\), \d+\.\d tokens/s", texts[2].err.strip())


def test_sample_prints_what_the_output_encoding_cannot_hold_as_question_marks(tmp_path, monkeypatch):
    """A redirect on Windows writes cp1252, say: a character outside it must not end the output."""
    ids = data.load_tokenizer().encode_ordinary("s = '日本'\n")
    monkeypatch.setattr(sample, "generate", lambda model, prompts, max_new_tokens, on_token=None, **options: [
        [token for token in ids if not on_token(0, token)]])
    train.save_checkpoint(tmp_path / "ckpt.pt", Mellum2(Mellum2Config.from_preset("tiny")), [], 1, {"steps": 1})
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, encoding="ascii"))
    sample.main(["--init-from", str(tmp_path), "--start", "x"])
    sys.stdout.flush()
    assert out.getvalue() == b"s = '??'\n\n"  # and the newline that ends the output


def test_fill_in_the_middle_prompt_puts_the_suffix_first(tmp_path):
    """SPM, from the typed text or files: <fim_suffix> suffix <fim_prefix> prefix <fim_middle>."""
    enc = data.load_tokenizer()
    vocab = sample.Vocabulary(enc, data.SPECIAL_TOKENS, {data.EOT})
    prefix, suffix = "def area(r):\n    return ", "\n\nprint(area(2))\n"
    expected = [FIM_SUFFIX, *enc.encode_ordinary(suffix), FIM_PREFIX, *enc.encode_ordinary(prefix), FIM_MIDDLE]
    (tmp_path / "before.py").write_text(prefix)
    (tmp_path / "after.py").write_text(suffix)
    for argv in (["--prefix", prefix, "--suffix", suffix],
                 ["--prefix", f"FILE:{tmp_path / 'before.py'}", "--suffix", f"FILE:{tmp_path / 'after.py'}"]):
        assert sample.build_prompt(sample.parse_args(argv), vocab) == (expected, {data.EOT})
    # A gap at the start of a file: the prefix is empty, the suffix alone is the prompt's text.
    ids, _ = sample.build_prompt(sample.parse_args(["--prefix", "", "--suffix", suffix]), vocab)
    assert ids == [FIM_SUFFIX, *enc.encode_ordinary(suffix), FIM_PREFIX, FIM_MIDDLE]


def test_fill_in_the_middle_needs_all_three_sentinels():
    special = {t: data.SPECIAL_TOKENS[t] for t in ("<|endoftext|>", "<fim_middle>")}  # no <fim_prefix>, <fim_suffix>
    vocab = sample.Vocabulary(data.load_tokenizer(), special, {data.EOT})
    with pytest.raises(ValueError, match="this tokenizer has no FIM sentinels"):
        sample.build_prompt(sample.parse_args(["--prefix", "a", "--suffix", "b"]), vocab)


def test_sample_stops_on_ctrl_c_with_one_line(monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(sample, "load_model", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        sample.main([])
    assert exit_info.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_a_prompt_file_of_exactly_the_limit_is_read(tmp_path):
    (tmp_path / "limit.py").write_text("x" * sample.MAX_PROMPT_CHARS)
    assert len(sample.read_text(f"FILE:{tmp_path / 'limit.py'}")) == sample.MAX_PROMPT_CHARS


def test_a_prompt_file_may_begin_with_a_byte_order_mark(tmp_path):
    vocab = sample.Vocabulary(data.load_tokenizer(), data.SPECIAL_TOKENS, {data.EOT})
    (tmp_path / "plain.py").write_bytes(b"def f(x):\n    return")
    (tmp_path / "marked.py").write_bytes(b"\xef\xbb\xbfdef f(x):\n    return")  # as some editors save
    ids = [sample.build_prompt(sample.parse_args(["--start", f"FILE:{tmp_path / name}"]), vocab)[0]
           for name in ("plain.py", "marked.py")]
    assert ids[0] == ids[1]


def test_special_token_text_in_a_prompt_stays_text(capsys):
    enc = data.load_tokenizer()
    args = sample.parse_args(["--start", "<|endoftext|><fim_middle> hi"])
    vocab = sample.Vocabulary(enc, data.SPECIAL_TOKENS, {data.EOT})
    ids, _ = sample.build_prompt(args, vocab)
    assert "note: <|endoftext|> in the prompt is read as plain text" in capsys.readouterr().err
    assert not set(ids) & set(data.SPECIAL_TOKENS.values())
    assert enc.decode(ids) == "<|endoftext|><fim_middle> hi"
    sample.build_prompt(sample.parse_args(["--prefix", "x = ", "--suffix", "<|endoftext|>"]), vocab)
    assert "note: <|endoftext|> in the prompt is read as plain text" in capsys.readouterr().err  # the suffix too
    chat, stops = sample.build_prompt(sample.parse_args(["--chat", "--start", "<|assistant|>"]), vocab)
    assert chat.count(data.SPECIAL_TOKENS["<|assistant|>"]) == 1 and chat[-1] == data.SPECIAL_TOKENS["<|assistant|>"]
    assert data.SPECIAL_TOKENS["<|end|>"] in stops


def byte_level_tokenizer(specials):
    """A small byte-level BPE tokenizer of the released checkpoint's kind (a tokenizer.json): about
    300 tokens, `specials` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 50, trainer)
    return tok


def test_a_hugging_face_directory_brings_its_own_tokenizer(tmp_path, capsys):
    """Like the released checkpoint: a tokenizer.json beside the weights, another vocabulary with
    other ids for the FIM sentinels and the end of text."""
    tok = byte_level_tokenizer(["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>"])
    tok.add_tokens(["    "])  # an added token that is not special: four spaces kept whole, plain text
    randomize(Mellum2(replace(SMALL, vocab_size=320, eos_token_id=(0, 1))), seed=2).save_pretrained(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    model, vocab = sample.load_model(str(tmp_path), "cpu")
    assert vocab.special["<fim_middle>"] == 2 and "    " not in vocab.special
    assert vocab.stop_ids == {0, 1}  # each of the config's end ids stops
    ids, _ = sample.build_prompt(sample.parse_args(["--start", "def <fim_middle>(a):"]), vocab)
    assert vocab.enc.decode_bytes(ids) == b"def <fim_middle>(a):" and 2 not in ids
    fim, _ = sample.build_prompt(sample.parse_args(["--prefix", "def f(", "--suffix", "):"]), vocab)
    assert fim[0] == 3 and fim[-1] == 2  # SPM: <fim_suffix> first, ends with <fim_middle>
    with pytest.raises(ValueError, match="--chat renders the project's chat template, which this tokenizer"):
        sample.build_prompt(sample.parse_args(["--chat", "--start", "hi"]), vocab)
    capsys.readouterr()
    sample.build_prompt(sample.parse_args(["--start", "def f():\n    return 1"]), vocab)
    assert "note:" not in capsys.readouterr().err  # four spaces are text, not a special token typed in
    sample.main(["--init-from", str(tmp_path), "--start", "def add", "--max-new-tokens", "5", "--temperature", "0"])
    new = sample.generate(model, [vocab.enc.encode_ordinary("def add")], 5, stop_ids=vocab.stop_ids)[0]
    written = vocab.enc.decode_bytes([i for i in new if i not in vocab.stop_ids]).decode()
    assert capsys.readouterr().out == written + "\n" != "\n"
    # Its decoder returns text, with U+FFFD for a character not yet whole: streaming still prints
    # each character once, whole.
    printer, text = sample.Printer(vocab, [], hide_thinking=False), "s = '日本 €'\n    return s\n"
    for i in vocab.enc.encode_ordinary(text):
        printer(0, i)
    printer.finish()
    assert capsys.readouterr().out == text


def test_a_run_folder_speaks_the_projects_tokenizer_and_says_its_stage(tmp_path):
    """A tokenizer.json left in a run folder is not its vocabulary; a Hugging Face directory does not
    say what stage trained it; infinite weights are refused like NaN; and a directory without its
    own tokenizer.json must have the project's vocabulary size."""
    model = Mellum2(replace(SMALL, vocab_size=data.VOCAB_SIZE))
    (tmp_path / "run").mkdir()
    train.save_checkpoint(tmp_path / "run" / "ckpt.pt", model, [], 1, {"steps": 1})
    byte_level_tokenizer(["<|endoftext|>"]).save(str(tmp_path / "run" / "tokenizer.json"))
    _, vocab = sample.load_model(str(tmp_path / "run"), "cpu")
    assert vocab.special is data.SPECIAL_TOKENS and vocab.stop_ids == {data.EOT}
    model.save_pretrained(tmp_path / "export")
    assert sample.trained_stage(str(tmp_path / "run")) == "pretrain"
    assert sample.trained_stage(str(tmp_path / "export")) is None
    model.lm_head.weight.data[3, 5] = float("inf")
    train.save_checkpoint(tmp_path / "run" / "ckpt.pt", model, [], 1, {"steps": 1})
    with pytest.raises(CheckpointError, match="run: the weights hold NaN or infinite values"):
        sample.load_model(str(tmp_path / "run"), "cpu")
    Mellum2(SMALL).save_pretrained(tmp_path / "narrow-vocab")  # 256 tokens
    with pytest.raises(CheckpointError, match="the model has 256 tokens and no tokenizer.json; the project's"):
        sample.load_model(str(tmp_path / "narrow-vocab"), "cpu")


def test_a_hugging_face_tokenizer_fits_its_model_and_ends_text_itself(tmp_path, capsys):
    tok = byte_level_tokenizer(["<|endoftext|>", "<think>"])
    n_vocab = len(tok.get_vocab())
    for name, rows in (("short", n_vocab - 1), ("exact", n_vocab)):
        Mellum2(replace(SMALL, vocab_size=rows, eos_token_id=None)).save_pretrained(tmp_path / name)
        tok.save(str(tmp_path / name / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=f"the tokenizer has {n_vocab} tokens, the model only {n_vocab - 1}"):
        sample.load_model(str(tmp_path / "short"), "cpu")
    _, vocab = sample.load_model(str(tmp_path / "exact"), "cpu")
    assert vocab.stop_ids == {vocab.special["<|endoftext|>"]}  # its config.json names no end id
    # Special tokens are spelled out, as tiktoken's decode_bytes does: the printer shows <think>.
    assert vocab.enc.decode_bytes([vocab.special["<|endoftext|>"]]) == b"<|endoftext|>"
    printer = sample.Printer(vocab, [], hide_thinking=False)
    for i in [vocab.special["<think>"], *vocab.enc.encode_ordinary("a + b")]:
        printer(0, i)
    printer.finish()
    assert capsys.readouterr().out == "<think>a + b"


def test_a_prompt_a_foreign_tokenizer_cannot_spell_is_refused(tmp_path):
    from tokenizers import Tokenizer, models
    Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "tokenizer.json"))  # no bytes
    enc = sample.HFTokenizer(str(tmp_path / "tokenizer.json"))
    vocab = sample.Vocabulary(enc, enc.special, {0})
    assert sample.build_prompt(sample.parse_args(["--start", "ab"]), vocab)[0] == [0, 1]
    with pytest.raises(ValueError, match="the prompt encodes to no tokens in this model's tokenizer"):
        sample.build_prompt(sample.parse_args(["--start", "def"]), vocab)


# -----------------------------------------------------------------------------------------------
# Long context (train.py --stage long): layer-selective YaRN and the passkey test

def test_layer_selective_yarn_changes_only_the_full_layers():
    base = Mellum2Config.from_preset("tiny")
    for variant in train.ROPE_VARIANTS:
        cfg = train.long_context_config(base, 1024, variant=variant)
        assert cfg.max_seq_len == 1024
        changed = {t: not torch.equal(rope_inv_freq(cfg, t)[0], rope_inv_freq(base, t)[0])
                   for t in ("sliding_attention", "full_attention")}
        expected = {"selective-yarn": {"sliding_attention": False, "full_attention": True},
                    "all-yarn": {"sliding_attention": True, "full_attention": True},
                    "theta": {"sliding_attention": True, "full_attention": True},
                    "unchanged": {"sliding_attention": False, "full_attention": False}}[variant]
        assert changed == expected, variant
    selective = train.long_context_config(base, 1024)
    assert selective.yarn_factor == 4.0 and selective.yarn_original_max_seq_len == 256
    assert rope_inv_freq(selective, "full_attention")[1] == pytest.approx(0.1 * math.log(4) + 1)
    # "NTK-aware" theta: the base grows by s^(d/(d-2)), so the slowest pair turns exactly s times slower
    # and the fastest (frequency 1) not at all.
    theta, _ = rope_inv_freq(train.long_context_config(base, 1024, variant="theta"), "full_attention")
    plain, _ = rope_inv_freq(base, "full_attention")
    assert (plain[-1] / theta[-1]).item() == pytest.approx(4.0, rel=1e-5) and theta[0] == plain[0] == 1.0
    # --yarn-factor, when given, rather than the ratio of the contexts
    assert train.long_context_config(base, 1024, yarn_factor=8.0).yarn_factor == 8.0
    theta, _ = rope_inv_freq(train.long_context_config(base, 1024, 8.0, variant="theta"), "full_attention")
    assert (plain[-1] / theta[-1]).item() == pytest.approx(8.0, rel=1e-5)
    # With --compare it is for the variants that use it, whatever --rope-variant says: not refused there.
    train.check_command(train.parse_args(["--stage", "long", "--compare", "--rope-variant", "unchanged",
                                          "--yarn-factor", "8"]))


def test_the_long_stage_of_the_release_size_reaches_the_released_context():
    """--stage long --size mellum2-12b: 8192 -> 131072 positions with YaRN x16, the released config
    (§4); the miniature sizes go to 4x their context."""
    release = Mellum2Config.from_preset("mellum2-12b")
    extended = train.long_context_config(release, train.long_context({"context": None, "size": "mellum2-12b"}, release))
    assert (extended.max_seq_len, extended.yarn_factor, extended.yarn_original_max_seq_len) == (131072, 16.0, 8192)
    assert train.long_context({"context": None, "size": "tiny"}, Mellum2Config.from_preset("tiny")) == 1024
    assert train.long_context({"context": 512, "size": "mellum2-12b"}, release) == 512


@pytest.mark.parametrize("variant", ["selective-yarn", "all-yarn"])
def test_long_context_config_round_trips_through_transformers(variant, tmp_path):
    cfg = train.long_context_config(replace(SMALL, max_seq_len=32), 128, variant=variant)
    Mellum2(cfg).save_pretrained(tmp_path)
    hf = transformers.MellumConfig.from_pretrained(tmp_path)
    full, sliding = hf.rope_parameters["full_attention"], hf.rope_parameters["sliding_attention"]
    assert full["rope_type"] == "yarn" and full["factor"] == 4.0 and full["original_max_position_embeddings"] == 32
    assert sliding["rope_type"] == ("yarn" if variant == "all-yarn" else "default")
    assert mellum2.config_from_hf(hf.to_dict()) == cfg
    assert Mellum2.from_pretrained(tmp_path).config == cfg


def test_the_long_context_evaluation_scores_held_out_code_at_each_length(monkeypatch):
    asked = []
    monkeypatch.setattr(train, "validation_loss", lambda model, corpus, source, batch_size, seq_len, rows, device:
                        asked.append((source, seq_len)) or 1.0 * seq_len)
    monkeypatch.setattr(train, "passkey_accuracy", lambda model, enc, length, n, rng: 0.5)
    results = train.long_context_eval(Mellum2(SMALL), None, 32, "cpu")
    assert asked == [("code", 32), ("code", 64), ("code", 128), ("code", 256)]  # 1x, 2x, 4x and 8x
    assert results == {n: (float(n), 0.5) for n in (32, 64, 128, 256)}


def test_passkey_prompts_and_scoring():
    enc = data.load_tokenizer()
    for length, depth in [(256, 0.0), (300, 0.5), (1000, 1.0)]:
        prompt, answer = data.passkey_example(enc, length, depth, 48213)
        text = enc.decode(prompt)
        assert len(prompt) == length and enc.decode(answer) == " 48213"
        assert text.endswith("What is the pass key? The pass key is") and "The pass key is 48213." in text
        where = text.index("The pass key is 48213") / len(text)
        assert abs(where - depth) < 0.15
    with pytest.raises(ValueError, match="at least") as refused:
        data.passkey_example(enc, 10, 0.5, 12345)
    shortest = int(re.search(r"at least (\d+) tokens", str(refused.value))[1])  # the needle and the question
    assert len(data.passkey_example(enc, shortest, 0.5, 12345)[0]) == shortest
    answer = [7, 8, 9]
    logits = torch.zeros(5 + len(answer) - 1, 20)
    for i, token in enumerate(answer):  # the argmax before each answer position is that answer token
        logits[4 + i, token] = 1.0
    assert train.passkey_correct(logits, 5, answer)
    logits[5, 8], logits[5, 3] = 0.0, 2.0  # the second digit goes wrong
    assert not train.passkey_correct(logits, 5, answer)


class PasskeyOracle(torch.nn.Module):
    """Given the text of the last passkey prompt made and its answer but the last token, writes the
    answer (or, with `miss`, its last digit wrong); anything else gets no preference at all."""

    def __init__(self, vocab_size, miss=False):
        super().__init__()
        self.vocab_size, self.miss, self.anchor = vocab_size, miss, torch.nn.Parameter(torch.zeros(()))
        self.prompt = self.answer = None

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab_size)
        if idx[0].tolist() == self.prompt + self.answer[:-1]:
            for i, token in enumerate(self.answer):
                wrong = self.miss and i == len(self.answer) - 1
                logits[0, len(self.prompt) - 1 + i, (token + 1) % self.vocab_size if wrong else token] = 1.0
        return logits, None


def test_passkey_accuracy_counts_the_passkeys_written(monkeypatch, enc):
    example = data.passkey_example
    for miss, expected in ((False, 1.0), (True, 0.0)):
        oracle = PasskeyOracle(data.VOCAB_SIZE, miss)

        def remembered(*args):
            oracle.prompt, oracle.answer = example(*args)
            return oracle.prompt, oracle.answer
        monkeypatch.setattr(data, "passkey_example", remembered)
        assert train.passkey_accuracy(oracle, enc, 120, 3, random.Random(0)) == expected
        assert len(oracle.prompt) == 120


def test_long_stage_trains_from_a_checkpoint(small_corpus, tmp_path, capsys):
    train.train(run_args(small_corpus, tmp_path / "base", "--max-steps", "2"))
    capsys.readouterr()
    model = train.train(run_args(small_corpus, tmp_path / "long", "--stage", "long", "--init-from",
                                 str(tmp_path / "base"), "--max-steps", "2", "--context", "512", "--aux-coef", "0.05"))
    assert model.config.max_seq_len == 512 and model.config.yarn_factor == 2.0
    # Its header plans the repetition of phase 3's mixture, the one it reads.
    corpus, header = data.build_corpus([small_corpus], progress=False, default_sources=False), capsys.readouterr().out
    plan = data.planned_repetition(corpus, 2 * 4 * 512, phase=len(data.PHASES) - 1)
    assert plan != data.planned_repetition(corpus, 2 * 4 * 512)
    for source, repetition in plan.items():
        assert f"{source}: {len(corpus.train[source].tokens):,} training tokens, planned repetition " \
               f"{repetition:.2f}x" in header
    assert model.config.aux_loss_coef == 0.05  # the run's, not that of the checkpoint it starts from
    assert model.config.yarn_original_max_seq_len == 256 and model.config.yarn_layers == "full"
    # It goes on from the pre-trained weights (two steps at a tenth of the learning rate move each
    # matrix by a few percent; a fresh initialisation is as far from them as they are long).
    base = train.model_from_checkpoint(train.load_checkpoint(tmp_path / "base" / "ckpt.pt"))
    for (name, after), before in zip(model.state_dict().items(), base.state_dict().values()):
        assert (after - before).norm() < 0.2 * before.norm(), name
    metrics = tmp_path / "long" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    assert sorted(map(int, json.loads(lines[-1])["long_context_eval"])) == [256, 512, 1024, 2048]
    # Its batches hold the third phase's mixture from the first step (§4), not the curriculum's start.
    assert {json.loads(line).get("phase") for line in lines} - {None} == {data.PHASES[-1].name}
    # Whole batches from the first step: pre-training alone ramps its batch (§3.4.3).
    assert [record["tokens"] for line in lines if "tokens" in (record := json.loads(line))] == [4 * 512, 8 * 512]
    # Resumed when finished it has nothing to do; stopped during its final evaluation, it evaluates.
    capsys.readouterr()
    for metrics_before, evaluates in ((lines, False), (lines[:-1], True)):
        metrics.write_text("".join(line + "\n" for line in metrics_before))
        train.train(run_args(small_corpus, tmp_path / "long", "--stage", "long", "--resume"))
        assert ("nothing to do" in capsys.readouterr().out) != evaluates
        assert metrics.read_text().splitlines()[:-1] == lines[:-1] and "long_context_eval" in metrics.read_text()
    # Started with another run's settings (a --compare variant begun on resuming), the flags don't count.
    settings = train.load_checkpoint(tmp_path / "long" / "ckpt.pt")["settings"]
    train.train(run_args(small_corpus, tmp_path / "theta", "--stage", "long", "--rope-variant", "theta",
                         "--max-steps", "5", "--micro-batch", "2"), stop_after=1, settings_of=settings)
    assert train.load_checkpoint(tmp_path / "theta" / "ckpt.pt")["settings"] == \
        {**settings, "rope_variant": "theta", "micro_batch": 2}  # but the micro-batch, as a resumed run takes it


def test_an_interrupted_compare_resumes_the_variants_it_started(tmp_path, monkeypatch):
    """--compare --resume continues the variants that have a checkpoint and starts the others with
    their settings, not with the flags of the resuming command."""
    (tmp_path / "selective-yarn").mkdir()
    begun = {"stage": "long", "steps": 2, "context": 512, "rope_variant": "selective-yarn"}
    train.save_checkpoint(tmp_path / "selective-yarn" / "ckpt.pt", Mellum2(SMALL), [], 1, begun)
    with pytest.raises(ValueError, match="holds the variants of a --compare run.*: resume them with --compare$"):
        train.train(train.parse_args(["--stage", "long", "--resume", "--out-dir", str(tmp_path)]))  # --compare left out
    calls = []
    monkeypatch.setattr(train, "train", lambda args, settings_of: calls.append((args.rope_variant, args.resume,
                                                                                settings_of)))
    monkeypatch.setattr(train, "rope_comparison", lambda base_dir: {"selective-yarn": {256: (4.0, 0.0)}})
    train.compare_rope_variants(train.parse_args(["--stage", "long", "--compare", "--resume", "--out-dir",
                                                  str(tmp_path), "--max-steps", "1"]))
    assert [(v, resume) for v, resume, _ in calls] == \
        [("selective-yarn", True), ("all-yarn", False), ("theta", False), ("unchanged", False)]
    assert all(settings == begun for _, _, settings in calls)


def test_a_model_of_another_vocabulary_is_refused_before_it_is_built(small_corpus, tmp_path, monkeypatch):
    """The mellum2-12b preset has the released 98K vocabulary: train.py says so at once, not after
    allocating 48 GB (or with advice to find more memory)."""
    monkeypatch.setattr(train, "check_memory", lambda config, device: pytest.fail("got as far as the memory check"))
    args = run_args(small_corpus, tmp_path / "run", "--size", "mellum2-12b")
    with pytest.raises(CheckpointError, match="--size mellum2-12b has a 98304-token vocabulary, and train.py trains "
                                              "with this project's 4096-token tokenizer"):
        train.train(args)
    Mellum2(replace(SMALL, vocab_size=8192)).save_pretrained(tmp_path / "wider")
    with pytest.raises(CheckpointError, match="the model has a 8192-token vocabulary"):
        train.train(run_args(small_corpus, tmp_path / "long", "--stage", "long", "--init-from",
                             str(tmp_path / "wider")))


def test_a_compare_run_refuses_an_unfinished_variant_before_training_any(tmp_path, monkeypatch):
    """Without --resume, an unfinished variant is refused up front, not after the finished variants
    before it have been trained again."""
    for variant, step in (("selective-yarn", 2), ("theta", 1)):
        (tmp_path / variant).mkdir()
        train.save_checkpoint(tmp_path / variant / "ckpt.pt", Mellum2(SMALL), [], step, {"stage": "long", "steps": 2})
    calls = []
    monkeypatch.setattr(train, "train", lambda args, settings_of: calls.append(args.rope_variant))
    with pytest.raises(ValueError, match=r"theta holds an unfinished run \(step 1 of 2\)"):
        train.compare_rope_variants(train.parse_args(["--stage", "long", "--compare", "--out-dir", str(tmp_path)]))
    assert calls == []


@pytest.mark.parametrize("argv,message", [
    (["--stage", "long"], "give --init-from"),
    (["--stage", "long", "--init-from", "{base}", "--context", "256"], "must be longer"),
    (["--stage", "long", "--init-from", "{base}", "--context", "0"], "must be longer"),  # 0 is not "the default"
    (["--stage", "long", "--init-from", "{base}", "--yarn-factor", "0.5"], "at least 1"),
    (["--stage", "long", "--init-from", "{tmp}/nothing"], "no such folder"),
    (["--stage", "long", "--init-from", "{tmp}"], "no ckpt.pt (a train.py run) or config.json (a Hugging Face "),
    (["--stage", "long", "--init-from", "{unfinished}"], "holds an unfinished pretrain run (step 1 of 3)"),
])
def test_long_stage_bad_input(argv, message, small_corpus, tmp_path, capsys):
    base = tmp_path / "base"
    Mellum2(Mellum2Config.from_preset("tiny")).save_pretrained(base)
    unfinished = tmp_path / "unfinished"
    if "{unfinished}" in argv:  # a pre-training run stopped after 1 of its 3 steps
        train.train(run_args(small_corpus, unfinished, "--max-steps", "3"), stop_after=1)
        capsys.readouterr()  # that run's own output is not the error under test
    argv = [a.format(base=base, tmp=tmp_path, unfinished=unfinished) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--size", "tiny", "--data", small_corpus, "--no-default-data", "--allow-over-repetition",
                    "--out-dir", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and message in err and len(err.splitlines()) == 1


# -----------------------------------------------------------------------------------------------
# Evaluation (evaluate.py)

class UniformModel(torch.nn.Module):
    """Predicts every token with probability 1/V: its loss is ln V nats a token, by definition."""

    def __init__(self, config):
        super().__init__()
        self.config, self.anchor = config, torch.nn.Parameter(torch.zeros(()))

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.config.vocab_size), None


@pytest.fixture(scope="module")
def small_built_corpus(small_corpus, tmp_path_factory):
    return data.build_corpus([small_corpus], cache_dir=tmp_path_factory.mktemp("cache"), progress=False,
                             default_sources=False)


def test_bits_per_byte_of_a_uniform_model(small_built_corpus, enc):
    config = Mellum2Config.from_preset("tiny")
    targets = torch.cat([y.flatten() for _, y in data.val_batches(small_built_corpus, "web", 8, 256, 8)])
    assert data.EOT in targets.tolist()  # rows that cross from one file to the next: a special token has no bytes
    n_bytes = len(enc.decode_bytes([t for t in targets.tolist() if t < data.N_RANKS]))
    shapes = []

    class Counted(UniformModel):
        def forward(self, idx):
            shapes.append(tuple(idx.shape))
            return super().forward(idx)
    assert len(targets) == 5 * 256  # the held-out rows there are, up to 8
    # All in one forward, or as many as batch_tokens holds, at least one: the same scores.
    for batch_tokens, batches in [(8192, [(5, 256)]), (600, [(2, 256)] * 2 + [(1, 256)]), (100, [(1, 256)] * 5)]:
        shapes.clear()
        loss, bpb = evaluate.loss_and_bits_per_byte(Counted(config), enc, small_built_corpus, "web", 256, 8,
                                                    batch_tokens)
        assert shapes == batches
        assert loss == pytest.approx(math.log(config.vocab_size))
        assert bpb == pytest.approx(len(targets) * math.log2(config.vocab_size) / n_bytes)
    # Fewer rows than there are: the bytes counted are those of the rows scored.
    two_rows = torch.cat([y.flatten() for _, y in data.val_batches(small_built_corpus, "web", 8, 256, 2)]).tolist()
    _, bpb = evaluate.loss_and_bits_per_byte(UniformModel(config), enc, small_built_corpus, "web", 256, 2)
    two_rows_bytes = len(enc.decode_bytes([t for t in two_rows if t < data.N_RANKS]))
    assert bpb == pytest.approx(len(two_rows) * math.log2(config.vocab_size) / two_rows_bytes)


def test_fim_examples_cut_one_held_out_line(small_built_corpus, enc):
    examples = evaluate.fim_examples(enc, small_built_corpus, 6, budget=64, seed=1)
    held_out = [enc.decode(small_built_corpus.val["code"].doc(i).tolist())
                for i in range(len(small_built_corpus.val["code"].offsets) - 1)]
    assert len(examples) == 6
    # Asked for more than there are, every line comes once: no problem is scored twice.
    every = evaluate.fim_examples(enc, small_built_corpus, 10**6, budget=64, seed=1)
    assert len(every) == sum(len(line.strip()) >= 4 for doc in held_out for line in doc.split("\n"))
    assert len({(tuple(prompt), line) for prompt, line in every}) == len(every)
    for prompt, line in examples + every:   # prefix + line + suffix is a stretch of a held-out file, cut at lines
        assert line.strip() and prompt[-1] == FIM_MIDDLE
        text = enc.decode(fim_reassemble(prompt + enc.encode_ordinary(line)))
        first_line = text.startswith(f"{line}\n") and any(doc.startswith(text) for doc in held_out)
        assert (f"\n{line}\n" in text or first_line) and any(text in doc for doc in held_out)
        # SPM, <fim_suffix> suffix <fim_prefix> prefix <fim_middle>: at most a quarter of the budget
        # after the line, three quarters before it, so the prompt leaves the context room to answer.
        cut = prompt.index(FIM_PREFIX)
        assert cut - 1 <= 64 // 4 and len(prompt) - cut - 2 <= 3 * 64 // 4


def test_fim_examples_take_four_character_lines_and_three_quarters_of_the_budget_before(tmp_path, enc):
    for name in ("a.py", "b.py"):  # two files: one of them is held out
        (tmp_path / "src" / "code").mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "code" / name).write_text("".join(f"def f{i}(x):\n    pass\n" for i in range(40)))
    corpus = data.build_corpus([tmp_path / "src"], cache_dir=tmp_path / "cache", progress=False,
                               default_sources=False)
    every = evaluate.fim_examples(enc, corpus, 10**6, budget=64)
    assert sum(line == "    pass" for _, line in every) == 40  # "pass" is a line worth completing
    held_out = enc.decode(corpus.val["code"].doc(0).tolist())
    for prompt, line in every:  # <fim_suffix> suffix <fim_prefix> prefix <fim_middle>
        cut = prompt.index(FIM_PREFIX)
        prefix, suffix = prompt[cut + 1:-1], prompt[1:cut]
        before = held_out[:held_out.index(enc.decode(prefix + enc.encode_ordinary(line) + suffix))]
        # All of the budget's three quarters before the line is used when there is that much code.
        assert len(prefix) == min(48, len(prefix) + len(enc.encode_ordinary(before)))
        assert len(suffix) <= 16


def test_evaluate_puts_each_score_under_its_name(small_built_corpus, enc, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "loss_and_bits_per_byte", lambda model, enc, corpus, source, *args: (1.5, 2.5))
    monkeypatch.setattr(evaluate, "fim_exact_match", lambda model, enc, examples: 0.25)
    monkeypatch.setattr(evaluate, "synthetic_math_accuracy", lambda model, enc, corpus, n: math.nan)
    monkeypatch.setattr(train, "evaluate_tasks", lambda model, n, cap: {"math": 0.1, "code": 0.2, "tool": 0.3})
    passkeys = []
    monkeypatch.setattr(train, "passkey_accuracy", lambda model, enc, length, n, rng: passkeys.append(n) or 0.5)
    model = Mellum2(replace(SMALL, vocab_size=data.VOCAB_SIZE, max_seq_len=128))
    results = evaluate.evaluate(model, small_built_corpus, n=20)
    assert passkeys == [16]  # at most 16 full-context passkeys, whatever n
    assert results == {**{f"val_loss/{s}": 1.5 for s in small_built_corpus.sources},
                       **{f"bits_per_byte/{s}": 2.5 for s in small_built_corpus.sources},
                       "fim_exact_match": 0.25, "synthetic_math": results["synthetic_math"],
                       "tasks/math": 0.1, "tasks/code": 0.2, "tasks/tool": 0.3, "passkey": 0.5}
    evaluate.print_table({"val_loss/web": 1.5, "bits_per_byte/web": 2.5, "synthetic_math": math.nan, "passkey": 0.5})
    assert capsys.readouterr().out.splitlines() == ["val_loss/web          1.500", "bits_per_byte/web     2.500",
                                                    "synthetic_math            -", "passkey               50.0%"]


def test_fim_exact_match_scores_whole_lines(monkeypatch, enc):
    examples = [([1], "x = 1"), ([2], "    return x"), ([3], "y = 2"), ([4], "    return z")]
    answers = {1: " x = 1\n", 2: "    return y", 3: "y = 2", 4: "    return z"}
    def generate(model, prompts, max_new_tokens, stop_ids=()):  # writes on past <|endoftext|> unless stopped
        written = [enc.encode_ordinary(answers[p[0]]) + [data.EOT] + enc.encode_ordinary("\nz = 3") for p in prompts]
        return [ids[:ids.index(data.EOT) + 1] if data.EOT in stop_ids else ids for ids in written]
    monkeypatch.setattr(evaluate.sample, "generate", generate)
    assert evaluate.fim_exact_match(None, enc, examples) == pytest.approx(3 / 4)
    assert math.isnan(evaluate.fim_exact_match(None, enc, []))  # no held-out code: no score, not 0%


def test_evaluate_runs_on_a_small_model_and_writes_json(small_built_corpus, tmp_path, monkeypatch, capsys):
    model = Mellum2(replace(SMALL, vocab_size=data.VOCAB_SIZE, max_seq_len=128)).eval()
    lengths, passkey_accuracy = [], train.passkey_accuracy

    def recording_the_length(model, enc, length, *args):
        lengths.append(length)
        return passkey_accuracy(model, enc, length, *args)

    monkeypatch.setattr(train, "passkey_accuracy", recording_the_length)
    fim_prompts, fim_exact_match = [], evaluate.fim_exact_match
    monkeypatch.setattr(evaluate, "fim_exact_match", lambda model, enc, examples: fim_prompts.extend(
        prompt for prompt, _ in examples) or fim_exact_match(model, enc, examples))
    results = evaluate.evaluate(model, small_built_corpus, n=2, max_rows=8)
    assert lengths == [128 - 8]  # at the model's full context, less the answer's room
    assert fim_prompts and sample.room_after(model, max(map(len, fim_prompts)), 48) == 48  # a whole middle's room
    assert {"val_loss/code", "bits_per_byte/web", "fim_exact_match", "synthetic_math", "tasks/code",
            "passkey"} <= set(results)
    assert results["val_loss/code"] > 0 and math.isnan(results["synthetic_math"])   # this corpus has no math
    assert all(0 <= v <= 1 for k, v in results.items() if k.startswith(("tasks", "fim", "passkey")))
    evaluate.print_table(results)
    assert "fim_exact_match" in capsys.readouterr().out
    with pytest.raises(ValueError, match="context \\(40 tokens\\) is too short for this evaluation"):
        evaluate.evaluate(Mellum2(replace(SMALL, vocab_size=data.VOCAB_SIZE, max_seq_len=40)), small_built_corpus)


def test_synthetic_math_leaves_out_problems_also_trained_on(tmp_path, enc, monkeypatch):
    """A drill generated twice can land on both sides of the split: the held-out copy is not held
    out, and is not asked. The others are, and a model writing the reference solutions gets all."""
    # The single ones all have negative answers, which the verifier must read with their sign.
    negative = (p for p in (data.synthetic_math(1, seed)[0] for seed in itertools.count(1000)) if "#### -" in p)
    for i, single in zip(range(100), negative):
        problem = data.synthetic_math(1, i)[0]
        (tmp_path / "src" / "math").mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "math" / f"twin{i}a.txt").write_text(problem)
        (tmp_path / "src" / "math" / f"twin{i}b.txt").write_text(problem)
        (tmp_path / "src" / "math" / f"single{i}.txt").write_text(single)
    corpus = data.build_corpus([tmp_path / "src"], cache_dir=tmp_path / "cache", progress=False,
                               default_sources=False)
    split, trained = corpus.val["math"], set(corpus.train["math"].keys)
    held_out = {enc.decode(split.doc(i).tolist()) for i in range(len(split.keys))}
    also_trained = {enc.decode(split.doc(i).tolist()) for i, key in enumerate(split.keys)
                    if {key.replace("a.txt", "b.txt"), key.replace("b.txt", "a.txt")} & trained}
    assert also_trained and held_out - also_trained
    question = lambda text: text[:text.index("\n") + 1]  # noqa: E731  (the prompt: the first line)
    solutions = {question(text): text[len(question(text)):] for text in held_out}
    asked = []

    def reference(model, prompts, max_new_tokens, **options):
        asked.extend(enc.decode(p) for p in prompts)
        return [enc.encode_ordinary(solutions[enc.decode(p)]) for p in prompts]
    monkeypatch.setattr(evaluate.sample, "generate", reference)
    assert evaluate.synthetic_math_accuracy(None, enc, corpus, n=64) == 1.0
    assert sorted(asked) == sorted(map(question, held_out - also_trained))
    asked.clear()
    assert evaluate.synthetic_math_accuracy(None, enc, corpus, n=3) == 1.0 and len(asked) == 3

    # Wherever the twin lies in the training split: here it is its last document.
    def split_of(*texts):
        docs = [enc.encode_ordinary(text) for text in texts]
        return data.TokenSplit(np.array(sum(docs, []), dtype=np.uint16), np.cumsum([0] + [len(d) for d in docs]),
                               [f"math/{i}.txt" for i in range(len(docs))], 0)
    first, twin, other = sorted(held_out - also_trained)[:3]
    asked.clear()
    evaluate.synthetic_math_accuracy(None, enc, replace(corpus, train={"math": split_of(first, twin)},
                                                        val={"math": split_of(twin, other)}), n=64)
    assert asked == [question(other)]


def loaded_stand_in(*args):
    """sample.load_model's answer for evaluate.main tests that replace the evaluation itself: a small
    model, and a vocabulary that is never read."""
    return Mellum2(SMALL), sample.Vocabulary(None, {}, set())


def test_evaluate_runs_the_kernels_asked_for(monkeypatch, capsys):
    loaded = []
    monkeypatch.setattr(evaluate.sample, "load_model", lambda *a: loaded.append(loaded_stand_in()) or loaded[-1])
    monkeypatch.setattr(evaluate.data, "build_corpus", lambda **k: None)
    monkeypatch.setattr(evaluate, "evaluate", lambda model, *a: {  # the "score": whether it runs Triton's attention
        "passkey": float(model.layers[0].self_attn.attend is kernels.triton_attend)})
    monkeypatch.setenv("MELLUM2_KERNELS", "cuda")  # a mistyped variable is refused before the model loads
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([])
    assert exit_info.value.code == 1 and not loaded
    assert capsys.readouterr().err == "error: unknown MELLUM2_KERNELS=cuda; choose one of auto, triton, torch\n"
    monkeypatch.delenv("MELLUM2_KERNELS")
    evaluate.main(["--kernels", "torch"])
    assert re.search(r"passkey +0\.0%", capsys.readouterr().out)
    if kernels.triton is not None:  # under the interpreter (conftest.py) the Triton kernels run on the CPU
        evaluate.main(["--kernels", "triton"])
        assert re.search(r"passkey +100\.0%", capsys.readouterr().out)


def test_evaluate_stops_with_one_line_when_the_cache_cannot_be_written(monkeypatch, capsys):
    monkeypatch.setattr(evaluate.sample, "load_model", loaded_stand_in)

    def read_only(**options):
        raise PermissionError(13, "Permission denied", "cache/corpus-0123")
    monkeypatch.setattr(evaluate.data, "build_corpus", read_only)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and err.startswith("error: ") and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv,message", [
    (["--init-from", "{tmp}/nothing"], "no such folder"),
    (["--json", "{tmp}/no-such-folder/results.json"], "--json"),
    (["--json", "{tmp}"], "--json"),
    (["--json", "{tmp}/ckpt.pt"], "give a .json file"),
    (["--json", "{tmp}/config.json"], "not config.json"),
    (["--n", "100000"], "--n must be between 1 and 1000"),
    (["--n", "0"], "--n must be between 1 and 1000"),
    (["--n", "-3"], "--n must be between 1 and 1000"),
])
def test_evaluate_bad_input(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # a bad --json path is caught before the model loads
        evaluate.main(["--init-from", str(tmp_path / "nothing")] + [a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and message in err and len(err.splitlines()) == 1


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links need extra rights on Windows")
def test_evaluate_checks_the_folder_a_json_link_points_into(tmp_path, capsys):
    (tmp_path / "results.json").symlink_to(tmp_path / "gone" / "results.json")
    with pytest.raises(SystemExit) as exit_info:  # refused before the model loads, not after the evaluation
        evaluate.main(["--init-from", str(tmp_path / "nothing"), "--json", str(tmp_path / "results.json")])
    assert exit_info.value.code == 1 and "in an existing folder" in capsys.readouterr().err


def test_evaluate_out_of_memory_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(evaluate.sample, "load_model", loaded_stand_in)
    monkeypatch.setattr(evaluate.data, "build_corpus", lambda **k: None)

    def too_big(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 17179869184 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(evaluate, "evaluate", too_big)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1
    assert err.startswith("error: out of memory") and err.endswith("a smaller --n decodes fewer problems at once")
    with pytest.raises(SystemExit):  # with one problem at a time, no advice to decode fewer
        evaluate.main(["--n", "1"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: out of memory") and "--n" not in err


def test_evaluate_writes_the_json_even_when_the_terminal_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate.sample, "load_model", loaded_stand_in)
    monkeypatch.setattr(evaluate.data, "build_corpus", lambda **k: None)
    monkeypatch.setattr(evaluate, "evaluate", lambda *a: {"passkey": 0.5})

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate, "print_table", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--json", str(tmp_path / "results.json")])
    assert exit_info.value.code == 1 and "standard output" in capsys.readouterr().err
    assert json.loads((tmp_path / "results.json").read_text()) == {"passkey": 0.5}
    # Started with its standard output closed (`>&-`): said in one line too, not a traceback.
    monkeypatch.undo()
    monkeypatch.setattr(evaluate.sample, "load_model", loaded_stand_in)
    monkeypatch.setattr(evaluate.data, "build_corpus", lambda **k: None)
    monkeypatch.setattr(evaluate, "evaluate", lambda *a: {"passkey": 0.25})
    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--json", str(tmp_path / "results.json")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err == "error: cannot write the results to the standard output: it is closed\n"
    assert json.loads((tmp_path / "results.json").read_text()) == {"passkey": 0.25}


def test_evaluate_prints_the_table_even_when_the_json_cannot_be_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate.sample, "load_model", loaded_stand_in)
    monkeypatch.setattr(evaluate.data, "build_corpus", lambda **k: None)
    monkeypatch.setattr(evaluate, "evaluate", lambda *a: {"passkey": 0.5})
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder: refused before any work
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--json", str(tmp_path / "results.json")])
    assert exit_info.value.code == 1 and "cannot write in" in capsys.readouterr().err
    monkeypatch.setattr(os, "access", lambda path, mode: True)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate.data, "write_atomically", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--json", str(tmp_path / "results.json")])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 1 and "passkey" in out and "No space left on device" in err


def test_plot_series_come_from_the_metrics(tmp_path, capsys, monkeypatch):
    import plots
    records = [{"step": 1, "ntp": 5.0, "lr": 0.1}, {"step": 2, "ntp": 4.0, "lr": 0.2, "val": {"code": 4.5}},
               {"step": 3, "ntp": 3.0, "lr": 0.3}]
    assert plots.series(records, "ntp") == ([1, 2, 3], [5.0, 4.0, 3.0])
    assert plots.series(records, "val", "code") == ([2], [4.5])
    edited = records + [{"step": 4, "ntp": "2.0", "lr": math.nan}, {"step": 5, "ntp": None, "lr": True}]
    assert plots.series(edited, "ntp") == ([1, 2, 3], [5.0, 4.0, 3.0]) and plots.series(edited, "lr")[0] == [1, 2, 3]
    for variant, loss in (("selective-yarn", 4.0), ("unchanged", 4.2)):
        (tmp_path / variant).mkdir()
        (tmp_path / variant / "metrics.jsonl").write_text(  # evaluated twice (a resumed run): the last counts
            json.dumps({"step": 10, "long_context_eval": {"256": [9.0, 0.0], "512": [9.0, 0.0]}}) + "\n" +
            json.dumps({"step": 9, "loss": 1.0}) + "\n" +
            json.dumps({"step": 10, "long_context_eval": {"256": [loss, 0.5], "512": [loss + 1, 0.0]}}) + "\n")
    (tmp_path / "theta").mkdir()  # still training: no evaluation yet, and a line cut short by a crash
    (tmp_path / "theta" / "metrics.jsonl").write_bytes(  # and a line edited into bytes that are no UTF-8
        json.dumps({"step": 1, "loss": 1.0}).encode() + b'\n{"step": 2, "lo\xff\n{"step": 2, "lo')
    assert train.rope_comparison(tmp_path) == {"selective-yarn": {256: (4.0, 0.5), 512: (5.0, 0.0)},
                                               "unchanged": {256: (4.2, 0.5), 512: (5.2, 0.0)}}
    assert plots.read_metrics(tmp_path / "theta") == [{"step": 1, "loss": 1.0}]
    (tmp_path / "theta" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no step's record yet"):
        plots.read_metrics(tmp_path / "theta")
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # as on a machine without it: one clear line
    with pytest.raises(SystemExit) as exit_info:
        plots.main([str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and "pip install matplotlib" in err and len(err.splitlines()) == 1
    # With matplotlib, a file where the plots folder goes is one line too (pictures stood in for).
    pyplot = unittest.mock.MagicMock()
    pyplot.subplots.return_value = (unittest.mock.MagicMock(), (unittest.mock.MagicMock(), unittest.mock.MagicMock()))
    monkeypatch.setitem(sys.modules, "matplotlib", types.SimpleNamespace(use=lambda backend: None, pyplot=pyplot))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    (tmp_path / "plots").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        plots.main([str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and err.startswith("error: ") and "plots" in err and len(err.splitlines()) == 1
    (tmp_path / "nothing-here").mkdir()  # and a folder that is not a run names itself once
    with pytest.raises(SystemExit) as exit_info:
        plots.main([str(tmp_path / "nothing-here")])
    assert capsys.readouterr().err.strip() == \
        f"error: {tmp_path / 'nothing-here'}: cannot plot it (no metrics.jsonl in it (a train.py run folder has one))"
    with pytest.raises(SystemExit) as exit_info:  # a file: named as one, not as a folder without metrics
        plots.main([str(tmp_path / "plots")])
    assert capsys.readouterr().err.strip() == \
        f"error: {tmp_path / 'plots'}: cannot plot it (a file, where a train.py run folder belongs)"
    with pytest.raises(SystemExit) as exit_info:  # a mistyped name
        plots.main([str(tmp_path / "nowhere")])
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nowhere'}: cannot plot it (no such folder)"


def mock_axes_grid():
    """Stand-ins for plt.subplots(2, 2)'s axes, indexed [row, col] as matplotlib's."""
    grid = np.empty((2, 2), dtype=object)
    for row, col in itertools.product(range(2), range(2)):
        grid[row, col] = unittest.mock.MagicMock()
    return grid


def test_post_training_runs_plot_accuracy_apart_from_the_losses():
    """SFT and GRPO log held-out accuracies under "val" where pre-training logs losses: those go on a
    0-1 axis of their own, not onto the log-scale loss panel."""
    import plots
    sft = [{"step": 0, "val": {"math": 0.0, "code": 0.5, "tool": 0.25, "reflection_words": 0.0}},
           {"step": 1, "ntp": 5.0, "mtp": 5.1, "aux": 1.0, "z": 0.4, "lr": 1e-4}]
    pretrain = [{"step": 1, "ntp": 5.0, "val": {"web": 4.0, "code": 3.5, "math": 3.0}}]
    for records, accuracy in ((sft, True), (pretrain, False)):
        grid, single, plt = mock_axes_grid(), unittest.mock.MagicMock(), unittest.mock.MagicMock()
        plt.subplots.side_effect = [("training figure", grid), ("accuracy figure", single)]
        figures = plots.training_figures(records, plt)
        on_loss_panel = [call.kwargs["label"] for call in grid[0, 0].plot.call_args_list]
        assert on_loss_panel[:4] == ["ntp", "mtp", "aux", "z"]
        assert grid[0, 1].plot.call_args.args == (([1], [1e-4]) if accuracy else ([], []))  # the learning rate
        assert [label for label in on_loss_panel if label.startswith("validation")] == \
            ([] if accuracy else ["validation code", "validation math", "validation web"])
        assert figures == ({"training": "training figure", "held_out": "accuracy figure"} if accuracy
                           else {"training": "training figure"})
        drawn = {call.kwargs["label"]: call.args[:2] for call in single.plot.call_args_list}
        assert drawn == ({"math": ([0], [0.0]), "code": ([0], [0.5]), "tool": ([0], [0.25])} if accuracy else {})


def test_grpo_and_yarn_runs_get_figures_of_their_own(tmp_path, monkeypatch, capsys):
    import plots
    figure, left, right, pyplot = (unittest.mock.MagicMock() for _ in range(4))
    pyplot.subplots.return_value = (figure, (left, right))
    monkeypatch.setitem(sys.modules, "matplotlib", types.SimpleNamespace(use=lambda backend: None, pyplot=pyplot))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    # A GRPO run: its first record, the evaluation before any batch, has no reward yet.
    records = [{"step": 0, "val": {"math": 0.25, "code": 0.0, "tool": 0.5, "reflection_words": 0.0}},
               {"step": 1, "reward": 0.5, "suite_accuracy": {"math": 0.5, "code": 0.0, "tool": 1.0}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plots.main([str(tmp_path)])
    assert capsys.readouterr().out == f"{tmp_path / 'plots' / 'grpo.png'}\n"
    drawn = [{call.kwargs["label"]: call.args[:2] for call in ax.plot.call_args_list} for ax in (left, right)]
    assert drawn == [{"math": ([1], [0.5]), "code": ([1], [0.0]), "tool": ([1], [1.0])},   # sampled answers
                     {"math": ([0], [0.25]), "code": ([0], [0.0]), "tool": ([0], [0.5])}]  # held out
    # The YaRN comparison: the loss on the left, passkey accuracy on the right.
    left.reset_mock(), right.reset_mock()
    plots.rope_figures({"selective-yarn": {512: (5.0, 0.0), 256: (4.0, 0.5)}}, pyplot)
    assert left.plot.call_args.args[:2] == ([256, 512], [4.0, 5.0])
    assert right.plot.call_args.args[:2] == ([256, 512], [0.5, 0.0])
    # An edited record whose "val" is a number, not a dict of them: one line, not a traceback.
    pyplot.subplots.return_value = (figure, mock_axes_grid())
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "val": 1.5}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        plots.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "cannot plot it" in err and len(err.splitlines()) == 1


# -----------------------------------------------------------------------------------------------
# The README: every command in it names real scripts and flags

def readme_commands():
    """Every `python ...` / `torchrun ...` command of the README: code-block lines and inline code."""
    text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    found = [line.strip() for line in text.splitlines() if line.startswith("    ")
             and re.match(r"(\S+=\S+ )*(pip|python|torchrun|bash) ", line.strip())]
    found += re.findall(r"`((?:\S+=\S+ )*(?:python|torchrun) [^`]+)`", text)
    return [part.strip() for command in found for part in command.split("&&")]


def test_every_readme_command_parses():
    import bench
    import plots
    parsers = {"train.py": train.parse_args, "sample.py": sample.parse_args, "evaluate.py": evaluate.parse_args,
               "plots.py": plots.parse_args, "bench.py": bench.parse_args}
    checked = 0
    for command in readme_commands():
        words = shlex.split(command, comments=True)
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        if not scripts:   # pip install, python -m pytest, bash .ci/run
            assert words[0] in ("pip", "python", "bash"), command
            continue
        script, argv = words[scripts[0]], words[scripts[0] + 1:]
        if script == "data.py":
            assert argv == ["--train-tokenizer"], command
        elif argv not in (["-h"], ["--help"]):
            args = parsers[script](argv)   # an unknown flag or a bad value exits here, naming the command's problem
            if script == "train.py":
                train.check_command(args)  # and a flag its stage does not read
        checked += 1
    assert checked >= 25


def test_a_mistyped_flag_or_value_is_one_line_on_every_script(capsys):
    # argparse's own report starts with the whole usage: a dozen lines or more for train.py, the mistake last.
    import bench
    import plots
    cases = [(train.parse_args, ["--bogus"], "unrecognized arguments: --bogus"),
             (train.parse_args, ["--max-steps", "x"], "--max-steps: invalid int value"),
             (sample.parse_args, ["--temperature", "warm"], "--temperature: invalid float value"),
             (evaluate.parse_args, ["--n"], "--n: expected one argument"),
             (plots.parse_args, [], "required: folder"),
             (bench.parse_args, ["decode", "--prompts", "0"], "--prompts: must be from 1 to 2**31 - 1, got 0"),
             (bench.parse_args, ["model", "--experts", str(2**31), "2"], "--experts: must be from 1 to 2**31 - 1")]
    for parse, argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            parse(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith("error: ") and message in err and "--help" in err, err
    # data.py has one command and no parser
    for argv in ([], ["--train-tokenizer", "extra"]):
        done = subprocess.run([sys.executable, "data.py", *argv], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
        assert done.returncode == 1 and done.stdout == "" and len(done.stderr.splitlines()) == 1
        assert done.stderr.startswith("error: python data.py takes one flag, --train-tokenizer")
    if os.path.exists("/dev/full"):  # Linux's always-full device: output that cannot be written is one line too
        with open("/dev/full", "w") as full:
            done = subprocess.run([sys.executable, "data.py", "--help"], stdout=full, stderr=subprocess.PIPE,
                                  text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        assert done.returncode == 1 and done.stderr == "error: [Errno 28] No space left on device\n"


def test_readme_line_anchors_point_at_what_they_name():
    here = os.path.dirname(os.path.abspath(__file__))
    readme = open(os.path.join(here, "README.md")).read()
    links = re.findall(r"\[`(\w+\.py): (\w+)`\]\((\w+\.py)#L(\d+)\)", readme)
    assert len(links) >= 30
    assert len(links) == len(re.findall(r"\]\(\w+\.py#L\d+\)", readme))  # every line link names file and definition
    for shown, name, path, line in links:
        assert shown == path
        text = open(os.path.join(here, path)).read().splitlines()[int(line) - 1]
        assert re.match(rf"(def|class) {name}\b|{name} = ", text), (path, line, name)


def test_dense_counterpart_has_the_same_active_parameters(small_corpus, tmp_path):
    moe = Mellum2Config.from_preset("tiny")
    dense = mellum2.dense_config(moe)
    assert dense.n_expert == dense.n_expert_active == 1 and dense.expert_dim == moe.n_expert_active * moe.expert_dim
    assert dense.n_mtp == moe.n_mtp == 1  # the baseline differs in the MLP only
    # the same weights per token, but for the router's (E x D instead of 1 x D)
    difference = Mellum2(moe).num_params(active=True) - Mellum2(dense).num_params(active=True)
    assert difference == moe.n_layer * (moe.n_expert - 1) * moe.n_embd
    train.train(run_args(small_corpus, tmp_path, "--max-steps", "2", "--dense"))
    assert train.load_checkpoint(tmp_path / "ckpt.pt")["config"]["n_expert"] == 1
