"""
Classroom exercises: rewrite one function of the model or its training, then let its check tell you
whether you got it right.

    1. Replace the body of the function named in an exercise with `raise NotImplementedError`; keep
       its docstring, which says what goes in and what comes out (shapes, types, batch dimensions).
    2. Write your own version, using the hints below and the report section named.
    3. Run its check:  python -m pytest -q -k exercise_03   (all of them: -k exercise)
       Two more tests run with it (the self-tests at the end of this file); they pass either way.
    4. `git diff FILE` shows your version against ours; `git checkout -- FILE` puts ours back, which
       the whole suite wants: some tests compare with other libraries to the last bit.

Every check compares the function with something written independently: a loop, a textbook formula,
a PyTorch built-in, or numbers worked out by hand. At the end of this file, one more test proves that
each check fails on a blanked function and on a plausible near miss, so a passing check means
something.

 #  function to rewrite             report        hints
 1  mellum2.RMSNorm.forward         §2.2          mean of squares over the last dim, in fp32; eps inside the sqrt;
                                                  cast back to x's dtype, then multiply by the gain
 2  mellum2.apply_rope              §2.2          pair dim j with dim j + hd/2 ("rotate half"); one angle per pair;
                                                  cos and sin may have a batch dim (decoding: rows at other positions)
 3  mellum2.attention_mask          §2.1.4        causal; a sliding layer sees its own position and window-1 before;
                                                  positions may be batched, and keys in any order (a KV cache's)
 4  mellum2.MoE.route               §2.2, §3.4.5  softmax over all experts in fp32 (whatever x's dtype), top-k,
                                                  renormalise the k weights
 5  mellum2.load_balancing_loss     §3.4.5        E * sum_e f_e P_e: f counts routing slots, P averages probabilities
 6  train.orthogonalize             §3.4.1        Newton-Schulz quintic on G / ||G||; transpose tall matrices first;
                                                  an (E, out, in) expert stack is E matrices, each on its own
 7  train.lr_multiplier             §3.4.2        linear warmup, step 0 at 1/warmup; hold; linear decay over the
                                                  last share (rounded to whole steps), reaching exactly 0 at step
                                                  total_steps (one past the last)
 8  data.fim_format                 §3.2.2        PSM: prefix, suffix, middle; SPM: suffix first; a sentinel each;
                                                  an int64 numpy array, no <|endoftext|>
 9  train.leave_one_out_advantages  §5.2.3        each reward minus the mean of the other G-1 rewards of its group
10  train.icepop_weight             §5.2.3        keep rho where 0.5 <= rho <= 5, else 0; never clip
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import mellum2
import train
from mellum2 import Mellum2Config

CONFIG = Mellum2Config(vocab_size=256, n_layer=4, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, n_expert=8,
                       n_expert_active=3, expert_dim=32, sliding_window=8, max_seq_len=64)


def check_rmsnorm():
    torch.manual_seed(0)
    norm = mellum2.RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    # bf16 input: statistics in fp32, then back to bf16, then the (fp32) gain; bf16 statistics are off.
    for x in (torch.randn(3, 5, 48), torch.randn(2, 48) * 1e-4, (torch.randn(4, 48) + 3).bfloat16()):
        expected = norm.weight * F.rms_norm(x.float(), (48,), eps=1e-6).to(x.dtype)
        assert torch.allclose(norm(x), expected, rtol=1e-5, atol=1e-5)


def check_apply_rope():
    torch.manual_seed(0)
    B, T, H, hd = 2, 7, 3, 16
    x = torch.randn(B, T, H, hd)
    angles = torch.rand(T, hd // 2) * 10                        # one angle per position and pair
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    pairs = torch.complex(x[..., :hd // 2], x[..., hd // 2:])   # pair j = (x_j, x_{j + hd/2})
    turned = pairs * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    assert torch.allclose(mellum2.apply_rope(x, cos, sin), torch.cat([turned.real, turned.imag], -1), atol=1e-5)
    # Decoding: every row of the batch at positions of its own, so cos and sin are (B, T, hd).
    angles = torch.rand(B, T, hd // 2) * 10
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    turned = pairs * torch.polar(torch.ones_like(angles), angles)[:, :, None, :]
    assert torch.allclose(mellum2.apply_rope(x, cos, sin), torch.cat([turned.real, turned.imag], -1), atol=1e-5)


def check_attention_mask():
    def brute_force(q, k, window):
        return torch.tensor([[kp <= qp and (window is None or qp - kp < window) for kp in k] for qp in q])

    # A training sequence: the queries are the last keys.
    q, k = torch.arange(4, 11), torch.arange(0, 11)
    for window in (None, 1, 3, 8):
        assert torch.equal(mellum2.attention_mask(q, k, window), brute_force(q.tolist(), k.tolist(), window))
    # Decoding, two rows at different points: the keys are a rolling buffer's slots (position % 6,
    # so not in order), the queries the new tokens, one of whose keys is already stored.
    q = torch.tensor([[9, 10], [3, 4]])
    k = torch.tensor([[6, 7, 8, 9, 4, 5], [0, 1, 2, 3, 4, 5]])
    for window in (None, 2, 4):
        expected = torch.stack([brute_force(qr, kr, window) for qr, kr in zip(q.tolist(), k.tolist())])
        assert torch.equal(mellum2.attention_mask(q, k, window), expected)


def check_route():
    torch.manual_seed(0)
    moe = mellum2.MoE(CONFIG)
    # bf16 activations (GPU training): the router still multiplies and normalises in fp32.
    for x in (torch.randn(20, CONFIG.n_embd), torch.randn(20, CONFIG.n_embd).bfloat16()):
        logits, weights, experts = moe.route(x)
        assert logits.dtype == torch.float32
        assert torch.allclose(logits, (x.double() @ moe.gate.weight.double().T).float(), atol=1e-5)
        for n in range(20):
            probs = logits[n].softmax(-1).tolist()
            best = sorted(range(CONFIG.n_expert), key=lambda e: -probs[e])[:CONFIG.n_expert_active]
            total = sum(probs[e] for e in best)
            chosen = dict(zip(experts[n].tolist(), weights[n].float().tolist()))  # in any order
            assert sorted(chosen) == sorted(best)
            tolerance = 1e-6 if x.dtype == torch.float32 else 1e-2  # the weights come back in x's dtype
            assert [chosen[e] for e in best] == pytest.approx([probs[e] / total for e in best], abs=tolerance)
        assert weights.dtype == x.dtype, "the weights come back in x's dtype, ready to scale its experts' outputs"
    # Two experts 0.001 apart, equal in bf16 (in both orders, whichever way a tie falls): fp32 keeps the larger.
    near = mellum2.MoE(CONFIG)
    with torch.no_grad():
        near.gate.weight.zero_()
        near.gate.weight[:4, 0] = torch.tensor([4.0, 3.0, 2.001, 2.0])
        near.gate.weight[:4, 1] = torch.tensor([4.0, 3.0, 2.0, 2.001])
    x = torch.zeros(2, CONFIG.n_embd, dtype=torch.bfloat16)
    x[0, 0] = x[1, 1] = 1
    assert [sorted(row) for row in near.route(x)[2].tolist()] == [[0, 1, 2], [0, 1, 3]], "near ties need fp32"


def check_load_balancing_loss():
    torch.manual_seed(0)
    N, K, E = 30, 2, 6
    logits, experts = torch.randn(N, E), torch.randint(0, E, (N, K))
    share = [sum(int(e == i) for e in experts.flatten().tolist()) / (N * K) for i in range(E)]
    mean_prob = [sum(logits[n].softmax(-1)[i].item() for n in range(N)) / N for i in range(E)]
    expected = E * sum(f * p for f, p in zip(share, mean_prob))
    assert mellum2.load_balancing_loss(logits.requires_grad_(), experts, E).item() == pytest.approx(expected, rel=1e-5)
    # The loss trains the router through P (f counts discrete choices and carries no gradient).
    mellum2.load_balancing_loss(logits, experts, E).backward()
    probs, f = logits.detach().softmax(-1), torch.tensor(share)
    expected_grad = E / N * probs * (f - (probs @ f)[:, None])  # d/dlogits[n, j] = E/N p_nj (f_j - sum_e f_e p_ne)
    assert torch.allclose(logits.grad, expected_grad, atol=1e-6), "no gradient reaches the router's logits"


def check_orthogonalize():
    torch.manual_seed(0)
    # Square, tall, wide, and a stack of three experts' matrices of very different sizes, which must
    # come out as three semi-orthogonal matrices, each of its own.
    scales = torch.tensor([1.0, 1e-3, 50.0])[:, None, None]
    for G in (torch.randn(32, 32), torch.randn(64, 16), torch.randn(16, 64), torch.randn(3, 24, 40) * scales):
        O = train.orthogonalize(G, dtype=torch.float32)
        assert O.shape == G.shape
        for g, o in zip(G.reshape(-1, *G.shape[-2:]), O.reshape(-1, *O.shape[-2:])):
            U, S, Vh = torch.linalg.svd(g, full_matrices=False)
            # The quintic trades exactness for speed: singular values land near 1 (about 0.7 to 1.2), not
            # on it, and the directions are those of U V^T.
            singular = torch.linalg.svdvals(o)
            assert singular.min() > 0.5 and singular.max() < 1.3
            cosine = (o * (U @ Vh)).sum() / (o.norm() * (U @ Vh).norm())
            assert cosine > 0.97


def check_lr_multiplier():
    m = lambda step: train.lr_multiplier(step, total_steps=100, warmup_steps=10, decay_fraction=0.2)  # noqa: E731
    assert [m(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [m(s) for s in (10, 50, 79, 80)] == pytest.approx([1.0, 1.0, 1.0, 1.0])
    assert [m(s) for s in (85, 90, 99)] == pytest.approx([0.75, 0.5, 0.05])
    assert train.lr_multiplier(100, 100, 10, 0.2) == 0.0
    # A share that is no whole number of steps: 159.4 of 1000 decay over 159 steps, 159.6 over 160.
    for share, last_held in ((0.1594, 841), (0.1596, 840)):
        assert [train.lr_multiplier(s, 1000, 10, share) for s in (last_held, last_held + 1)] == \
            pytest.approx([1.0, (1000 - last_held - 1) / (1000 - last_held)]), share


def check_fim_format():
    s = data.SPECIAL_TOKENS
    P, M, S_ = s["<fim_prefix>"], s["<fim_middle>"], s["<fim_suffix>"]
    psm = data.fim_format([1, 2], [5], [3, 4], spm=False)
    assert isinstance(psm, np.ndarray) and psm.dtype == np.int64, "an int64 numpy array, like the documents"
    assert psm.tolist() == [P, 1, 2, S_, 5, M, 3, 4]
    assert data.fim_format([1, 2], [5], [3, 4], spm=True).tolist() == [S_, 5, P, 1, 2, M, 3, 4]
    assert data.fim_format([], [], spm=True).tolist() == [S_, P, M]
    # Another tokenizer's sentinel ids (a released checkpoint's), as `special` gives them
    theirs = {t: i + 1000 for t, i in s.items()}
    assert data.fim_format([1, 2], [5], [3, 4], spm=False, special=theirs).tolist() == [P + 1000, 1, 2, S_ + 1000, 5,
                                                                                        M + 1000, 3, 4]


def check_leave_one_out_advantages():
    torch.manual_seed(0)
    rewards = torch.rand(5, 6)
    expected = [[r - (sum(row) - r) / (len(row) - 1) for r in row] for row in rewards.tolist()]
    assert torch.allclose(train.leave_one_out_advantages(rewards), torch.tensor(expected), atol=1e-6)


def check_icepop_weight():
    rho = torch.tensor([0.0, 0.3, 0.4999, 0.5, 0.9, 1.0, 2.5, 5.0, 5.0001, 80.0])
    expected = [r if 0.5 <= r <= 5.0 else 0.0 for r in rho.tolist()]
    assert train.icepop_weight(rho).tolist() == pytest.approx(expected)
    narrow = [r if 0.8 <= r <= 2.0 else 0.0 for r in rho.tolist()]  # a band of its own, not the report's
    assert train.icepop_weight(rho, band=(0.8, 2.0)).tolist() == pytest.approx(narrow)


EXERCISES = {
    "exercise_01_rmsnorm": check_rmsnorm,
    "exercise_02_apply_rope": check_apply_rope,
    "exercise_03_attention_mask": check_attention_mask,
    "exercise_04_route": check_route,
    "exercise_05_load_balancing_loss": check_load_balancing_loss,
    "exercise_06_orthogonalize": check_orthogonalize,
    "exercise_07_lr_multiplier": check_lr_multiplier,
    "exercise_08_fim_format": check_fim_format,
    "exercise_09_leave_one_out_advantages": check_leave_one_out_advantages,
    "exercise_10_icepop_weight": check_icepop_weight,
}


@pytest.mark.parametrize("name", EXERCISES)
def test_exercise(name):
    EXERCISES[name]()


# -----------------------------------------------------------------------------------------------
# The checks themselves are checked: each fails on a blanked function and on a near miss

def blank(*args, **kwargs):
    raise NotImplementedError


def rmsnorm_eps_outside(self, x):
    return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)


def rope_interleaved(x, cos, sin):
    pairs = x.unflatten(-1, (-1, 2))
    c, s = cos[..., ::2].unsqueeze(-2), sin[..., ::2].unsqueeze(-2)
    return torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c], -1).flatten(-2)


def rope_for_one_sequence(x, cos, sin):  # right for a (T, hd) table; a batch of decoding rows breaks it
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[None, :, None] + torch.cat([-x2, x1], dim=-1) * sin[None, :, None]


def mask_window_off_by_one(q, k, window=None):
    distance = q[:, None] - k[None, :]
    return (distance >= 0) & (distance <= window) if window else distance >= 0


def mask_from_the_shapes(q, k, window=None):  # right only when the queries are the last keys, in order
    Tq, Tk = q.shape[-1], k.shape[-1]
    allowed = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    return allowed & ~torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq - window) if window else allowed


def route_without_renormalising(self, x):
    logits = F.linear(x.float(), self.gate.weight.float())
    weights, experts = logits.softmax(-1).topk(self.config.n_expert_active, dim=-1)
    return logits, weights, experts


def route_in_the_activations_dtype(self, x):  # bf16 logits: near-tied experts swap places
    logits = F.linear(x, self.gate.weight.to(x.dtype)).float()
    top, experts = logits.softmax(-1).topk(self.config.n_expert_active, dim=-1)
    return logits, (top / top.sum(-1, keepdim=True)).to(x.dtype), experts


def route_normalised_in_the_activations_dtype(self, x):  # fp32 logits, bf16 softmax: near ties fall either way
    logits = F.linear(x.float(), self.gate.weight.float())
    top, experts = logits.to(x.dtype).softmax(-1).topk(self.config.n_expert_active, dim=-1)
    return logits, top / top.sum(-1, keepdim=True), experts


def balance_by_tokens(logits, experts, n_expert):  # counts tokens rather than routing slots
    f = torch.bincount(experts.flatten(), minlength=n_expert).float() / experts.shape[0]
    return n_expert * (f * logits.softmax(-1).mean(0)).sum()


def orthogonalize_normalise_only(G, steps=5, eps=1e-7, dtype=torch.bfloat16):
    return G / (G.norm() + eps)


def orthogonalize_with_one_norm_per_stack(G, steps=5, eps=1e-7, dtype=torch.bfloat16):
    X = G.to(dtype) / (G.norm() + eps)  # a small expert's matrix starts far below the others
    for _ in range(steps):
        A = X @ X.mT
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    return X


def lr_cosine(step, total_steps, warmup_steps, decay_fraction=0.159):
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))


def fim_without_spm(prefix, suffix, middle=(), spm=True, special=data.SPECIAL_TOKENS):  # always PSM
    ids = [special["<fim_prefix>"], *prefix, special["<fim_suffix>"], *suffix, special["<fim_middle>"], *middle]
    return np.array(ids, dtype=np.int64)


def advantages_with_self(rewards):  # mean over the whole group, scaled like Dr. GRPO
    return rewards - rewards.mean(dim=-1, keepdim=True)


def icepop_clip(rho, band=(0.5, 5.0)):
    return rho.clamp(*band)


NEAR_MISSES = {
    "exercise_01_rmsnorm": (mellum2.RMSNorm, "forward", [rmsnorm_eps_outside]),
    "exercise_02_apply_rope": (mellum2, "apply_rope", [rope_interleaved, rope_for_one_sequence]),
    "exercise_03_attention_mask": (mellum2, "attention_mask", [mask_window_off_by_one, mask_from_the_shapes]),
    "exercise_04_route": (mellum2.MoE, "route", [route_without_renormalising, route_in_the_activations_dtype,
                                                      route_normalised_in_the_activations_dtype]),
    "exercise_05_load_balancing_loss": (mellum2, "load_balancing_loss", [balance_by_tokens]),
    "exercise_06_orthogonalize": (train, "orthogonalize", [orthogonalize_normalise_only,
                                                           orthogonalize_with_one_norm_per_stack]),
    "exercise_07_lr_multiplier": (train, "lr_multiplier", [lr_cosine]),
    "exercise_08_fim_format": (data, "fim_format", [fim_without_spm]),
    "exercise_09_leave_one_out_advantages": (train, "leave_one_out_advantages", [advantages_with_self]),
    "exercise_10_icepop_weight": (train, "icepop_weight", [icepop_clip]),
}


@pytest.mark.parametrize("name", EXERCISES)
@pytest.mark.parametrize("replacement", ["blank", "near miss"])
def test_checks_catch_a_wrong_function(name, replacement, monkeypatch):
    owner, attribute, near_misses = NEAR_MISSES[name]
    # A wrong function may fail by a wrong answer or by an error the check's inputs provoke (a table
    # with a batch dim it did not expect): either way the check does not pass.
    for wrong in [blank] if replacement == "blank" else near_misses:
        monkeypatch.setattr(owner, attribute, wrong)
        with pytest.raises((AssertionError, NotImplementedError, RuntimeError)):
            EXERCISES[name]()
