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


# -----------------------------------------------------------------------------------------------
# Pre-training (train.py): Muon against torch.optim.Muon, the schedule, FP8, distributed, resume

import train  # noqa: E402


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
    opt = train.Muon(ours, lr=0.02, weight_decay=0.1)
    ref = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    step_with_grads([(ours, opt), (theirs, ref)], steps=5)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)  # the same arithmetic in the same order: bit-identical


def test_muon_orthogonalises_each_expert_on_its_own():
    experts = torch.nn.Parameter(torch.randn(6, 48, 32))
    slices = [torch.nn.Parameter(experts.detach()[e].clone()) for e in range(6)]
    opt = train.Muon([experts], lr=0.01, weight_decay=0.1)
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
    assert sum(len(g["params"]) for g in adamw.param_groups) + len(in_muon) == len(list(model.parameters()))


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


def test_batch_ramp_at_its_boundary():
    sizes = [train.batch_size_at(s, 100, 16) for s in range(100)]
    assert sizes[:6] == [8] * 6 and sizes[6:] == [16] * 94


def test_fp8_matmul_error_within_the_format_bound():
    """q(x) q(w)^T differs from x w^T by at most what rounding each factor to e4m3 allows: relative
    2^-4 per element (3 mantissa bits, round to nearest) plus, for subnormals, half their spacing."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 96, generator=g) * 3, torch.randn(48, 96, generator=g) * 0.05
    (x8, sx), (w8, sw) = train.to_fp8(x, train.E4M3), train.to_fp8(w, train.E4M3)
    got = train.scaled_mm(x8, sx, w8.t(), sw, torch.float32)
    u = 2.0 ** -4
    ex, ew = u * x.abs() + 2.0 ** -10 / sx, u * w.abs() + 2.0 ** -10 / sw  # per-element error bounds
    bound = x.abs() @ ew.T + ex @ w.abs().T + ex @ ew.T
    err = (got - x @ w.T).abs()
    assert (err <= bound * 1.001 + 1e-6).all()
    assert err.max() > 0 and (err / bound).max() > 0.05  # it does quantise, and the bound is not vacuous
    # The emulated path (round, then an ordinary matmul) is the same arithmetic as the scaled matmul.
    emulated = train._FakeQuant.apply(x, train.E4M3) @ train._FakeQuant.apply(w, train.E4M3).T
    assert torch.allclose(got, emulated, rtol=1e-5, atol=1e-5)


def test_fp8_linear_gradients_use_e5m2():
    layer = train.Float8Linear(32, 16, bias=False)
    x = torch.randn(8, 32, requires_grad=True)
    layer(x).pow(2).sum().backward()
    ref = torch.nn.Linear(32, 16, bias=False)
    ref.weight.data.copy_(layer.weight.data)
    x2 = x.detach().clone().requires_grad_()
    ref(x2).pow(2).sum().backward()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert 0 < rel(x.grad, x2.grad) < 0.15 and 0 < rel(layer.weight.grad, ref.weight.grad) < 0.15


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


def test_training_reduces_the_loss_and_writes_metrics(small_corpus, tmp_path):
    train.train(run_args(small_corpus, tmp_path, "--max-steps", "12", "--lr", "3e-3"))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["ntp"] < records[0]["ntp"] - 1.0
    assert {"ntp", "mtp", "aux", "z", "lr", "expert_balance", "phase"} <= set(records[0])
    assert records[-1]["lr"] > 0 and "val" in records[-1]
    state = train.load_checkpoint(tmp_path / "ckpt.pt")
    assert state["step"] == 12 and state["tokenizer"]["sha256"]


def test_resume_continues_exactly(small_corpus, tmp_path):
    straight = train.train(run_args(small_corpus, tmp_path / "a", "--max-steps", "6"))
    train.train(run_args(small_corpus, tmp_path / "b", "--max-steps", "6"), stop_after=3)
    resumed = train.train(run_args(small_corpus, tmp_path / "b", "--resume"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    losses = lambda d: [json.loads(line)["ntp"] for line in open(d / "metrics.jsonl")]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_fp8_training_runs(small_corpus, tmp_path):
    model = train.train(run_args(small_corpus, tmp_path, "--max-steps", "2", "--fp8"))
    assert isinstance(model.layers[0].self_attn.q_proj, train.Float8Linear)
    assert model.layers[0].mlp.grouped_mm is train.fp8_grouped_mm
    assert all(math.isfinite(json.loads(line)["ntp"]) for line in open(tmp_path / "metrics.jsonl"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(small_corpus, tmp_path, monkeypatch):
    train.train(run_args(small_corpus, tmp_path, "--max-steps", "6"), stop_after=2)
    before = (tmp_path / "ckpt.pt").read_bytes()
    real_forward = Mellum2.forward

    def poisoned(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        self.loss_parts["ntp"] = torch.tensor(float("nan"))
        return logits, loss

    monkeypatch.setattr(Mellum2, "forward", poisoned)
    with pytest.raises(train.NonFiniteLoss, match="non-finite loss at step 3"):
        train.train(run_args(small_corpus, tmp_path, "--resume"))
    assert (tmp_path / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("argv,message", [
    (["--max-steps", "0"], "--max-steps must be positive"),
    (["--batch-size", "3"], "must split evenly"),
    (["--resume", "--out-dir", "{tmp}/nothing"], "no checkpoint there"),
    (["--resume", "--out-dir", "{tmp}/corrupt"], "unreadable checkpoint"),
])
def test_bad_input_gives_one_line_and_a_nonzero_exit(argv, message, tmp_path, capsys):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--size", "tiny", *[a.format(tmp=tmp_path) for a in argv]])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0 and message in err and len(err.splitlines()) == 1


def test_unknown_size_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--size", "huge"])
    assert exit_info.value.code != 0 and "invalid choice: 'huge'" in capsys.readouterr().err


DIST_WORKER = '''
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import train
from test_mellum2 import SMALL, randomize
from mellum2 import Mellum2
torch.set_num_threads(1)
rank, world, device = train.setup_distributed("cpu")

def run(distributed):
    torch.manual_seed(0)
    model = randomize(Mellum2(SMALL))
    opts = train.build_optimizers(model, 1e-2, ns_dtype=torch.float32)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randint(0, SMALL.vocab_size, (8, 24), generator=g)
        y = torch.randint(0, SMALL.vocab_size, (8, 24), generator=g)
        if distributed:
            x, y = x[rank::world], y[rank::world]
        train.train_step(wrapped, x, y, 2, opts, torch.autocast("cpu", enabled=False))
    return torch.cat([p.detach().flatten() for p in model.parameters()])

together = run(distributed=True)
gathered = [torch.empty_like(together) for _ in range(world)]
dist.all_gather(gathered, together)
if rank == 0:
    dist.destroy_process_group()
    alone = run(distributed=False)
    print("replicas_equal", torch.equal(gathered[0], gathered[1]))
    print("max_diff", (together - alone).abs().max().item())
'''


def test_two_processes_equal_one(tmp_path):
    """One torchrun launch of two gloo processes, each on half of every batch, against one process
    on the whole batch: the same parameters within 1e-6 (fp32 Newton-Schulz, as bf16 would amplify
    the last-bit difference between a mean of two half-batch means and one full-batch mean)."""
    repo = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "worker.py"
    script.write_text(DIST_WORKER.format(repo=repo))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, timeout=300, cwd=repo, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = dict(line.split() for line in result.stdout.splitlines() if line.startswith(("replicas", "max_diff")))
    assert out["replicas_equal"] == "True"
    assert float(out["max_diff"]) < 1e-6
