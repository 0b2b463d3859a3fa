"""Tests for mellum2: each compares against something we did not write (transformers'
MellumForCausalLM, brute-force loops, hand computations) and would fail if the thing were wrong.
Run: python -m pytest -q"""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mellum2 import (IGNORE_INDEX, CheckpointError, Mellum2, Mellum2Config, apply_rope, attention_mask,
                     load_balancing_loss, rope_inv_freq)

transformers = pytest.importorskip("transformers")

# A small config with every structural feature: 3:1 sliding/full, GQA groups of 2, 8 experts top-2.
SMALL = Mellum2Config(vocab_size=256, n_layer=4, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, n_expert=8,
                      n_expert_active=2, expert_dim=32, sliding_window=8, max_seq_len=64)


def randomize(model, seed=0):
    """Every parameter random, norm gains included: with unit gains some mistakes cancel (RMSNorm
    commutes with a rotation, so QK-norm before or after RoPE would look the same)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
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
    return transformers.MellumConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head, head_dim=config.head_dim,
        num_experts=config.n_expert, num_experts_per_tok=config.n_expert_active,
        moe_intermediate_size=config.expert_dim, sliding_window=config.sliding_window,
        layer_types=config.layer_types, max_position_embeddings=config.max_seq_len,
        rope_parameters={"full_attention": rope_full,
                         "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_theta}},
    )


def random_configs():
    """A few random small configs: head grouping, window, layer pattern and YaRN all vary (every
    pattern has a full layer within 4 layers, so YaRN always acts somewhere)."""
    g = torch.Generator().manual_seed(1234)
    pick = lambda options: options[torch.randint(len(options), (1,), generator=g).item()]  # noqa: E731
    configs = []
    for yarn in (1.0, 4.0):
        for _ in range(2):
            n_kv = pick([1, 2, 4])
            configs.append(replace(SMALL, n_kv_head=n_kv, n_head=n_kv * pick([1, 2, 4]), n_layer=pick([4, 5]),
                                   sliding_window=pick([3, 8, 16]), attn_pattern=pick(["SSSF", "SF", "FS"]),
                                   n_expert=pick([4, 8]), n_expert_active=pick([1, 2, 3]),
                                   yarn_factor=yarn, yarn_original_max_seq_len=16 if yarn > 1 else 8192))
    return configs


def logits_of_hf(model_dir, idx):
    hf = transformers.MellumForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(idx).logits


# -----------------------------------------------------------------------------------------------
# Equality with transformers' MellumForCausalLM, both ways

@pytest.mark.parametrize("config", random_configs(), ids=lambda c: f"yarn{c.yarn_factor}-{c.attn_pattern}")
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


@pytest.mark.parametrize("config", random_configs(), ids=lambda c: f"yarn{c.yarn_factor}-{c.attn_pattern}")
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


def test_yarn_frequencies_match_transformers():
    cfg = Mellum2Config.from_preset("mellum2-12b", yarn_factor=16.0)
    hf = hf_config(cfg)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    expected, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu", layer_type="full_attention")
    got, factor = rope_inv_freq(cfg, "full_attention")
    assert torch.allclose(got, expected, rtol=1e-6, atol=0)
    assert factor == pytest.approx(1.2772588722239782) and factor == pytest.approx(expected_factor)
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
    idx = torch.randint(0, cfg.vocab_size, (1, 20))
    p = 7
    changed = idx.clone()
    changed[0, p] = (idx[0, p] + 1) % cfg.vocab_size
    with torch.no_grad():
        diff = (model(idx)[0] - model(changed)[0]).abs().amax(dim=-1)[0]
    seen = [q for q in range(20) if diff[q] > 1e-6]
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


def test_aux_loss_is_one_at_perfect_balance_and_larger_otherwise():
    E, K = 8, 2
    # Token i strongly prefers experts i, i+1 (mod E): every expert gets the same share of slots and,
    # by symmetry, the same mean probability.
    logits = torch.zeros(4 * E, E)
    for i in range(4 * E):
        logits[i, [i % E, (i + 1) % E]] = 5.0
    experts = logits.topk(K, dim=-1).indices
    assert load_balancing_loss(logits, experts, E).item() == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.zeros(4 * E, E)
    collapsed[:, :2] = 5.0  # everyone picks experts 0 and 1
    assert load_balancing_loss(collapsed, collapsed.topk(K, dim=-1).indices, E).item() > 3.0


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
        h = model.norm.weight * F.rms_norm(naive_trunk_states(model, idx[0]), (cfg.n_embd,), eps=cfg.rms_norm_eps)
        mtp = model.mtp
        rms = lambda v, w: w * F.rms_norm(v, (cfg.n_embd,), eps=cfg.rms_norm_eps)  # noqa: E731
        e = model.embed_tokens.weight[idx[0, 1:]]
        x = torch.cat([rms(e, mtp.pre_fc_norm_embedding.weight), rms(h[:-1], mtp.pre_fc_norm_hidden.weight)], -1)
        y = rms(naive_block(mtp.layers[0], x @ mtp.fc.weight.T, cfg.sliding_window), mtp.norm.weight)
        expected_mtp = F.cross_entropy(y @ model.lm_head.weight.T, targets[0, 1:], ignore_index=IGNORE_INDEX)
        expected_ntp = F.cross_entropy(h @ model.lm_head.weight.T, targets[0], ignore_index=IGNORE_INDEX)
    assert torch.allclose(logits[0], h @ model.lm_head.weight.T, atol=1e-4)
    assert model.loss_parts["ntp"].item() == pytest.approx(expected_ntp.item(), abs=1e-5)
    assert model.loss_parts["mtp"].item() == pytest.approx(expected_mtp.item(), abs=1e-5)
    parts = model.loss_parts
    total = parts["ntp"] + 0.1 * parts["mtp"] + 1e-3 * parts["aux"] + 1e-3 * parts["z"]
    assert loss.item() == pytest.approx(total.item(), abs=1e-6)


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
    (dict(sliding_window=0), "sliding_window"),
    (dict(attn_pattern="SXF"), "attn_pattern"),
])
def test_invalid_configs_raise_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        replace(SMALL, **overrides)


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


def test_loading_names_every_problem(tmp_path):
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
