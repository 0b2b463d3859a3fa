"""
Tests of kernels.py on the CPU: the Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1,
set in conftest.py before triton is imported), and each must equal both its PyTorch
fallback in mellum2.py and a brute-force reference written here, forward and backward. Where
triton does not install (Windows, macOS) the tests that launch a kernel are skipped; the rest check
that kernels.py works, and refuses clearly, without it.
"""

import collections
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import kernels
import mellum2
from mellum2 import Mellum2, Mellum2Config
from test_mellum2 import SMALL  # the small config every model test uses

needs_triton = pytest.mark.skipif(kernels.triton is None, reason="launches a Triton kernel (triton is Linux only)")

# Interpreter fp32 is exact up to summation order; fp16 keeps ~3 decimal digits, bf16 ~2 (and the
# interpreter rounds bf16 stores toward zero where a GPU rounds to nearest).
TOLERANCES = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def assert_close(actual, expected, dtype=torch.float32, what=""):
    """Max abs error relative to the expected tensor's scale (max(1, max |expected|))."""
    assert actual.shape == expected.shape, what
    scale = max(1.0, expected.abs().max().item())
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= TOLERANCES[dtype] * scale, f"{what} max error {error:.3g} (scale {scale:.3g}, {dtype})"


# -----------------------------------------------------------------------------------------------
# Attention

def brute_force_attention(q, k, v, window):
    """Softmax attention with the window written out element by element: query i sees key j iff
    i - window < j <= i. K/V heads copied to their G query heads. fp32."""
    B, H, T, hd = q.shape
    G = H // k.shape[1]
    k, v = k.float().repeat_interleave(G, dim=1), v.float().repeat_interleave(G, dim=1)
    visible = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            visible[i, j] = j <= i and (window is None or i - j < window)
    scores = (q.float() @ k.mT) / hd ** 0.5
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


def attention_inputs(T, H, Hkv, hd=16, B=1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, heads, T, hd, generator=g).to(dtype).requires_grad_()
            for heads in (H, Hkv, Hkv)]


def training_mask(T, window):
    """What mellum2's trunk passes to `attend` in training: None on full layers, else (T, T)."""
    positions = torch.arange(T)
    return None if window is None else mellum2.attention_mask(positions, positions, window)


def log_sum_exp(q, k, window):
    """Each query's log-sum-exp of its visible scores (B, H, T): what the forward saves for the backward."""
    T = q.shape[2]
    scores = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).mT) / q.shape[-1] ** 0.5  # (B, H, T, T)
    visible = torch.ones(T, T, dtype=torch.bool).tril() if window is None else training_mask(T, window)
    return scores.masked_fill(~visible, float("-inf")).logsumexp(-1)


ATTENTION_CASES = [  # T, window, H, Hkv, block_m, block_n, hd
    (100, None, 4, 4, 32, 32, 16),  # full causal, T not a block multiple, GQA group 1
    (100, 8, 4, 2, 32, 32, 16),     # window smaller than a block, group 2
    (64, 40, 8, 1, 32, 16, 16),     # window not a block multiple, group 8 (MQA), BLOCK_M != BLOCK_N
    (50, 200, 4, 2, 16, 32, 16),    # window longer than the sequence = plain causal
    (37, 1, 2, 1, 16, 16, 16),      # window 1: each query sees only itself
    (70, 34, 2, 2, 32, 32, 16),     # query 64 sees key 31, the last of block 0: pins the lower bound's off-by-one
    (40, 12, 4, 2, 16, 16, 24),     # a head dim that is no power of two: the kernel masks the padded dims
    (30, None, 2, 1, 16, 16, 8),    # a head dim below 16, padded up to the smallest legal tl.dot
]


@needs_triton
@pytest.mark.parametrize("T, window, H, Hkv, block_m, block_n, hd", ATTENTION_CASES)
def test_kernel_attention_matches_sdpa_and_brute_force(T, window, H, Hkv, block_m, block_n, hd):
    q, k, v = attention_inputs(T, H, Hkv, hd)
    y = kernels.flash_attention(q, k, v, window, block_m, block_n)
    fallback = mellum2.sdpa_attend(q, k, v, training_mask(T, window), window)
    reference = brute_force_attention(q, k, v, window)
    assert_close(y, fallback)
    assert_close(y, reference)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), dy)
    for expected in (torch.autograd.grad(fallback, (q, k, v), dy), torch.autograd.grad(reference, (q, k, v), dy)):
        for actual, wanted in zip(grads, expected):
            assert_close(actual, wanted)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_attention_half_precision(dtype):
    q, k, v = attention_inputs(70, 4, 2, dtype=dtype)
    y = kernels.flash_attention(q, k, v, 24)
    assert y.dtype == dtype
    reference = brute_force_attention(q, k, v, 24)  # fp32 on the same rounded inputs
    assert_close(y, reference, dtype)
    dy = torch.randn(y.shape).to(dtype)
    for actual, wanted in zip(torch.autograd.grad(y, (q, k, v), dy),
                              torch.autograd.grad(reference, (q, k, v), dy.float())):
        assert actual.dtype == dtype
        assert_close(actual, wanted, dtype)


@needs_triton
def test_kernel_attention_takes_any_layout_and_autocast_dtype():
    # q with the head dim not the fastest (the same values): the result must not change.
    q, k, v = attention_inputs(40, 2, 1)
    strided = q.mT.contiguous().mT
    assert strided.stride(-1) != 1
    assert_close(kernels.flash_attention(strided, k, v, 8), brute_force_attention(q, k, v, 8))
    # k and v each by its own strides: a batch of 2 with k cut from a longer buffer.
    q, k, v = (t.detach() for t in attention_inputs(20, 2, 2, B=2))
    longer = torch.zeros(2, 2, 28, 16)
    longer[:, :, :20] = k
    assert_close(kernels.flash_attention(q, longer[:, :, :20], v, 8, 16, 16), brute_force_attention(q, k, v, 8))
    # Under bf16 autocast the model hands over q, k and v of either dtype, as its layers leave them:
    # the kernel computes in autocast's, as F.scaled_dot_product_attention would.
    q, k, v = q.detach(), k.detach().bfloat16(), v.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.flash_attention(q, k, v, 8)
    assert y.dtype == torch.bfloat16
    assert_close(y, brute_force_attention(*(t.bfloat16() for t in (q, k, v)), 8), torch.bfloat16)


@needs_triton
def test_kernel_attention_saves_the_log_sum_exp():
    q, k, v = (t.detach() for t in attention_inputs(45, 2, 1))
    _, lse = kernels.attention_forward(q, k, v, 10, 16, 16)
    expected = log_sum_exp(q, k, 10)
    assert_close(lse, expected)


@needs_triton
def test_kernel_attention_window_convention():
    """Window 3 = the query and the 2 keys before it (Hugging Face's `sliding_window`, FA's left = 2)."""
    q, k, v = (t.detach() for t in attention_inputs(40, 2, 2))
    y = kernels.flash_attention(q, k, v, 3)
    i = 20
    scores = (q[:, :, i:i + 1] @ k[:, :, i - 2:i + 1].mT) / 16 ** 0.5
    assert_close(y[:, :, i:i + 1], scores.softmax(-1) @ v[:, :, i - 2:i + 1])


@pytest.mark.parametrize("n_queries", [3, 11])
def test_kernel_attend_falls_back_when_decoding_with_a_cache(n_queries):
    """Anything but training's masks stays with SDPA: decoding (fewer queries than keys), and a
    prefill into an empty cache, as many queries as keys but with the cache's (B, 1, T, T) mask
    (left padding), which the kernel's causal window could not express."""
    q, _, _ = attention_inputs(n_queries, 4, 2)
    _, k, v = attention_inputs(11, 4, 2, seed=1)
    mask = torch.rand(1, 1, n_queries, 11) > 0.3
    mask[..., 0] = True
    assert torch.equal(kernels.triton_attend(q, k, v, mask, 8), mellum2.sdpa_attend(q, k, v, mask, 8))


def keys_unreadable_outside(q, k, v):
    """With T = 128 in blocks of 32 and a window of 8, queries 64..95 see keys 57..95 only, so key
    blocks 0 and 3 are never to be read for them. A skipped block costs time and changes no value,
    so their keys and values become NaN here: a masked score is 0, but 0 * NaN is NaN in p @ v, and
    a kernel that loads such a block at all spoils those queries."""
    k, v = k.detach().clone(), v.detach().clone()
    for t in (k, v):
        t[:, :, :32] = t[:, :, 96:] = float("nan")
    return q, k, v


@needs_triton
@pytest.mark.parametrize("window, block_m, block_n, unread", [(1, 32, 32, 32), (8, 32, 16, 16)])
def test_kernel_attention_starts_at_the_first_key_block_its_window_reaches(window, block_m, block_n, unread):
    """Queries 32..63: the first key they see starts a block (window 1), or a query block spans two
    key blocks (window 8, keys from 25 on): the keys before the first block reached, here NaN, are
    never loaded."""
    q, k, v = (t.detach() for t in attention_inputs(64, 2, 2))
    unreadable = [t.clone() for t in (k, v)]
    for t in unreadable:
        t[:, :, :unread] = float("nan")
    y = kernels.flash_attention(q, *unreadable, window, block_m, block_n)
    assert torch.isfinite(y[:, :, 32:]).all()
    assert_close(y[:, :, 32:], brute_force_attention(q, k, v, window)[:, :, 32:])


@needs_triton
def test_kernel_attention_reads_no_key_block_outside_the_window():
    q, k, v = (t.detach() for t in attention_inputs(128, 4, 2))
    y = kernels.flash_attention(*keys_unreadable_outside(q, k, v), 8, 32, 32)
    assert torch.isfinite(y[:, :, 64:96]).all()
    assert_close(y[:, :, 64:96], brute_force_attention(q, k, v, 8)[:, :, 64:96])


def test_attention_backward_reads_no_key_outside_its_band():
    q, k, v = attention_inputs(128, 4, 2)
    y = brute_force_attention(q, k, v, 8)
    dy = torch.randn_like(y)
    expected_dq, = torch.autograd.grad(y, (q,), dy)
    lse = log_sum_exp(q, k, 8)
    dq, _, _ = kernels.attention_backward(*keys_unreadable_outside(q.detach(), k, v), y.detach(), lse.detach(), dy,
                                          8, chunk=32)
    assert torch.isfinite(dq[:, :, 64:96]).all()
    assert_close(dq[:, :, 64:96], expected_dq[:, :, 64:96])
    # The band's first key exactly: with window 8, the chunk of queries 8..15 reaches back to key 1,
    # not to key 0 (NaN here).
    q, k, v = attention_inputs(16, 2, 2)
    y = brute_force_attention(q, k, v, 8)
    dy = torch.randn_like(y)
    expected_dq, = torch.autograd.grad(y, (q,), dy)
    lse = log_sum_exp(q, k, 8)
    unreadable = [t.detach().clone() for t in (k, v)]
    for t in unreadable:
        t[:, :, 0] = float("nan")
    dq, _, _ = kernels.attention_backward(q.detach(), *unreadable, y.detach(), lse.detach(), dy, 8, chunk=8)
    assert torch.isfinite(dq[:, :, 8:]).all()
    assert_close(dq[:, :, 8:], expected_dq[:, :, 8:])


@pytest.mark.parametrize("window, chunk", [(None, 7), (5, 7), (20, 16), (20, 300)])
def test_attention_backward_in_chunks(window, chunk):
    """The backward walks the queries in chunks, each with only the band of keys its window shows:
    every chunk size gives the gradients of the brute force, chunks shorter than the window and
    than the sequence included. (PyTorch only: it runs without triton too.)"""
    q, k, v = attention_inputs(45, 4, 2)
    y = brute_force_attention(q, k, v, window)
    dy = torch.randn_like(y)
    expected = torch.autograd.grad(y, (q, k, v), dy)
    lse = log_sum_exp(q, k, window)
    grads = kernels.attention_backward(q.detach(), k.detach(), v.detach(), y.detach(), lse.detach(), dy, window,
                                       chunk)
    for actual, wanted in zip(grads, expected):
        assert_close(actual, wanted)


# -----------------------------------------------------------------------------------------------
# Mixture of experts

def brute_force_moe(x, weights, experts, gate_proj, up_proj, down_proj):
    """One token and one slot at a time: out[n] = sum_k w[n,k] * expert_{e[n,k]}(x[n])."""
    rows = []
    for n in range(x.shape[0]):
        out = torch.zeros_like(x[n])
        for slot, e in enumerate(experts[n].tolist()):
            h = F.silu(gate_proj[e] @ x[n]) * (up_proj[e] @ x[n])
            out = out + weights[n, slot] * (down_proj[e] @ h)
        rows.append(out)
    return torch.stack(rows)


def moe_inputs(N, D, F_, E, K, routing, dtype=torch.float32, seed=0):
    """x, routing weights (renormalised, a leaf so its gradient is checked), expert ids, the three
    stacked expert weights. routing: "random", "skewed" (every token picks experts 0..K-1: expert 0
    gets all tokens, the others none) or "one_empty" (nobody picks expert 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    scores = torch.rand(N, E, generator=g)
    if routing == "skewed":
        scores[:, :K] += 10
    if routing == "one_empty":
        scores[:, 1] = -1
    experts = scores.topk(K, dim=-1).indices
    weights = torch.rand(N, K, generator=g) + 0.1
    weights = weights / weights.sum(-1, keepdim=True)
    params = [torch.randn(E, F_, D, generator=g) * 0.3, torch.randn(E, F_, D, generator=g) * 0.3,
              torch.randn(E, D, F_, generator=g) * 0.3]
    leaves = [t.to(dtype).requires_grad_() for t in [x, weights] + params]
    return leaves[0], leaves[1], experts, *leaves[2:]


def grouped_fallback(x, weights, experts, gate_proj, up_proj, down_proj):
    """mellum2.MoE.experts_grouped, the model's default path, with the given weights."""
    E, F_, D = gate_proj.shape
    config = Mellum2Config(n_embd=D, expert_dim=F_, n_expert=E, n_expert_active=experts.shape[1])
    moe = SimpleNamespace(config=config, grouped_mm=mellum2.grouped_mm, gate_proj=gate_proj, up_proj=up_proj,
                          down_proj=down_proj)  # the method only reads these attributes
    return mellum2.MoE.experts_grouped(moe, x, weights, experts)


def test_kernel_moe_plan_of_the_docstring_example():
    sorted_ids, block_expert, segments = kernels.moe_plan(torch.tensor([[2, 0], [0, 1], [2, 0]]), 3, 4)
    assert sorted_ids.tolist() == [1, 2, 5, 6, 3, 6, 6, 6, 0, 4, 6, 6]
    assert block_expert.tolist() == [0, 1, 2]
    assert segments.tolist() == [0, 4, 8, 12]
    # An expert with exactly one block of pairs gets no padding, one without pairs no block at all.
    sorted_ids, block_expert, segments = kernels.moe_plan(torch.tensor([[2, 0], [2, 0], [2, 3], [2, 0]]), 4, 4)
    assert sorted_ids.tolist() == [1, 3, 7, 8, 0, 2, 4, 6, 5, 8, 8, 8]
    assert block_expert.tolist() == [0, 2, 3] and segments.tolist() == [0, 4, 4, 8, 12]


MOE_CASES = [  # N, D, F, E, K, routing; D and F are not multiples of the 32-wide blocks, N not of 16
    (37, 40, 24, 8, 2, "random"),
    (37, 40, 24, 8, 2, "skewed"),      # expert 0 receives every token, 6 experts receive none
    (50, 32, 48, 8, 2, "one_empty"),
    (24, 40, 24, 16, 4, "random"),
    (16, 32, 16, 64, 8, "random"),     # the release's 64-choose-8 routing: one or two pairs per expert
]


@needs_triton
@pytest.mark.parametrize("N, D, F_, E, K, routing", MOE_CASES)
def test_kernel_moe_matches_grouped_and_brute_force(N, D, F_, E, K, routing):
    inputs = moe_inputs(N, D, F_, E, K, routing)
    leaves = [t for t in inputs if t.requires_grad]
    if routing == "skewed":
        assert (inputs[2] == 0).any(-1).all()  # every token chose expert 0
        assert torch.bincount(inputs[2].flatten(), minlength=E)[K:].sum() == 0
    y = kernels.fused_moe(*inputs)
    fallback, reference = grouped_fallback(*inputs), brute_force_moe(*inputs)
    assert_close(y, fallback)
    assert_close(y, reference)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    for expected in (torch.autograd.grad(fallback, leaves, dy), torch.autograd.grad(reference, leaves, dy)):
        for actual, wanted in zip(grads, expected):
            assert_close(actual, wanted)


@needs_triton
def test_kernel_moe_reads_each_weight_in_its_own_layout():
    """up_proj stored transposed in memory (the same values): the result must not change."""
    x, weights, experts, gate_proj, up_proj, down_proj = moe_inputs(20, 32, 16, 4, 2, "random")
    up_proj = up_proj.detach().mT.contiguous().mT
    assert up_proj.stride() != gate_proj.stride()
    assert_close(kernels.fused_moe(x, weights, experts, gate_proj, up_proj, down_proj),
                 brute_force_moe(x, weights, experts, gate_proj, up_proj, down_proj))


@needs_triton
def test_kernel_moe_takes_inputs_and_gradients_in_any_layout():
    """x and the routing weights column-major, and the gradient arriving transposed (y used as y.mT
    downstream), the same values as contiguous ones: neither the result nor any gradient may change."""
    x, weights, experts, gate_proj, up_proj, down_proj = moe_inputs(20, 32, 16, 4, 2, "random")
    leaves = [x, weights, gate_proj, up_proj, down_proj]
    column_major = [t.mT.contiguous().mT for t in (x, weights)]
    assert not any(t.is_contiguous() for t in column_major)
    y = kernels.fused_moe(*column_major, experts, gate_proj, up_proj, down_proj)
    reference = brute_force_moe(x, weights, experts, gate_proj, up_proj, down_proj)
    assert_close(y, reference)
    mix = torch.randn(32, 20)
    for actual, wanted in zip(torch.autograd.grad((y.mT * mix).sum(), leaves),
                              torch.autograd.grad((reference.mT * mix).sum(), leaves)):
        assert_close(actual, wanted)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_moe_half_precision(dtype):
    inputs = moe_inputs(40, 40, 24, 8, 2, "one_empty", dtype=dtype)
    leaves = [t for t in inputs if t.requires_grad]
    y = kernels.fused_moe(*inputs)
    assert y.dtype == dtype
    fp32 = [t.detach().float().requires_grad_() if t.is_floating_point() else t for t in inputs]
    reference = brute_force_moe(*fp32)
    assert_close(y, reference, dtype)
    dy = torch.randn(y.shape).to(dtype)
    expected = torch.autograd.grad(reference, [t for t in fp32 if t.requires_grad], dy.float())
    for actual, wanted in zip(torch.autograd.grad(y, leaves, dy), expected):
        assert actual.dtype == dtype
        assert_close(actual, wanted, dtype)
    # fp32 inputs under autocast: computed in autocast's dtype, as the PyTorch path would be.
    with torch.autocast("cpu", dtype=dtype):
        y = kernels.fused_moe(*(t.detach() for t in fp32))
    assert y.dtype == dtype
    assert_close(y, reference, dtype)


# -----------------------------------------------------------------------------------------------
# install() and a whole training step



@needs_triton
def test_kernel_training_step_matches_the_torch_path(monkeypatch):
    torch.manual_seed(0)
    reference = Mellum2(SMALL)
    model = Mellum2(SMALL)
    model.load_state_dict(reference.state_dict())
    assert kernels.install(model, "triton") == "triton"
    ran = collections.Counter()  # the kernels' calls: a fallback to the torch path would agree too

    def counted(name):
        kernel = getattr(kernels, name)

        def call(*args):
            ran[name] += 1
            return kernel(*args)
        return call
    for name in ("flash_attention", "fused_moe"):
        monkeypatch.setattr(kernels, name, counted(name))
    idx = torch.randint(0, SMALL.vocab_size, (2, 21))  # 21 tokens: not a block multiple, > window
    _, loss = model(idx, torch.roll(idx, -1, 1))
    assert ran == {"flash_attention": SMALL.n_layer + 1, "fused_moe": SMALL.n_layer + 1}  # the MTP block's too
    _, expected = reference(idx, torch.roll(idx, -1, 1))
    assert_close(loss, expected)
    loss.backward()
    expected.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, what=name)


@needs_triton
def test_kernel_install_torch_keeps_the_model_functions():
    model = Mellum2(SMALL)
    assert kernels.install(model, "torch") == "torch"
    for m in model.modules():
        if isinstance(m, mellum2.Attention):
            assert m.attend is mellum2.sdpa_attend
        if isinstance(m, mellum2.MoE):
            assert "experts_grouped" not in vars(m)
    kernels.install(model, "triton")
    kernels.install(model, "torch")  # and switching back restores them
    assert all(m.attend is mellum2.sdpa_attend for m in model.modules() if isinstance(m, mellum2.Attention))
    assert all("experts_grouped" not in vars(m) for m in model.modules() if isinstance(m, mellum2.MoE))


def test_kernel_modes_and_errors(monkeypatch):
    model = Mellum2(SMALL)
    with pytest.raises(ValueError, match="unknown kernel mode 'fast'"):
        kernels.install(model, "fast")
    monkeypatch.setenv("MELLUM2_KERNELS", "torch")
    assert kernels.install(model) == "torch"
    with pytest.raises(ValueError, match="^unknown kernel mode 'fast'"):  # the mode given, not the variable, is blamed
        kernels.install(model, "fast")
    monkeypatch.setenv("MELLUM2_KERNELS", "cuda")
    with pytest.raises(ValueError, match="unknown MELLUM2_KERNELS=cuda"):  # the error names the variable
        kernels.install(model)
    monkeypatch.delenv("MELLUM2_KERNELS")
    assert kernels.install(model) == "torch"  # the model is on the CPU, whatever this machine has
    # On a GPU machine, auto follows the model: a --device cpu run keeps the PyTorch functions.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kernels.resolve_mode("auto", "cpu") == "torch"
    assert kernels.install(model) == "torch"


@needs_triton
def test_kernel_mode_triton_needs_a_gpu_or_the_interpreter(monkeypatch):
    model = Mellum2(SMALL)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # The variable is read when kernels.py is imported, as Triton reads it: changing it later
    # changes nothing, since the kernels stay interpreted.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kernels.resolve_mode("triton", "cpu") == "triton"
    monkeypatch.setattr(kernels, "INTERPRETING", False)
    with pytest.raises(ValueError, match="'triton' needs a model on a CUDA GPU, or TRITON_INTERPRET=1"):
        kernels.install(model, "triton")
    assert kernels.resolve_mode("auto", "cuda:0") == kernels.resolve_mode("triton", "cuda:0") == "triton"
    # No device named (bench.py): this machine's best.
    assert kernels.resolve_mode("auto") == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kernels.resolve_mode("auto") == "triton"


def test_kernels_without_triton(monkeypatch):
    """Windows and macOS, where triton does not install: auto means torch even on a CUDA GPU, asking
    for triton is refused with where the request came from, and so is calling a kernel directly."""
    monkeypatch.setattr(kernels, "triton", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = Mellum2(SMALL)
    assert kernels.resolve_mode("auto", "cuda:0") == "torch" and kernels.install(model) == "torch"
    with pytest.raises(ValueError, match="^kernel mode 'triton' needs triton, which installs on Linux only"):
        kernels.install(model, "triton")
    monkeypatch.setenv("MELLUM2_KERNELS", "triton")
    with pytest.raises(ValueError, match="^MELLUM2_KERNELS=triton needs triton"):
        kernels.install(model)
    q, k, v = attention_inputs(5, 2, 1)
    for attention in (kernels.flash_attention, lambda q, k, v: kernels.attention_forward(q, k, v, None)):
        with pytest.raises(RuntimeError, match="need triton"):
            attention(q, k, v)
    with pytest.raises(RuntimeError, match="need triton"):
        kernels.fused_moe(*moe_inputs(4, 8, 8, 4, 2, "random"))


@needs_triton
def test_replaced_expert_matmuls_keep_the_torch_path_under_triton():
    """train.py --fp8 swaps each MoE's grouped_mm for an FP8 one, which the fused kernel would skip."""
    torch.manual_seed(0)
    model = Mellum2(SMALL)
    kernels.install(model, "triton")
    calls = []

    def counted(x, w, offsets):
        calls.append(1)
        return mellum2.grouped_mm(x, w, offsets)

    for m in model.modules():
        if isinstance(m, mellum2.MoE):
            m.grouped_mm = counted
    idx = torch.randint(0, SMALL.vocab_size, (1, 9))
    model(idx)
    assert len(calls) == 3 * SMALL.n_layer  # gate, up and down of every trunk MoE (no targets: no MTP)


# -----------------------------------------------------------------------------------------------
# On a GPU, compiled (not interpreted): TRITON_INTERPRET=0 python -m pytest -q test_kernels.py -k cuda

@pytest.mark.skipif(not torch.cuda.is_available() or kernels.INTERPRETING,
                    reason="needs CUDA with TRITON_INTERPRET=0 (the kernels compiled, not interpreted)")
@pytest.mark.parametrize("window", [256, None])
def test_kernel_cuda_bf16_matches_the_fp32_fallbacks(window):
    """bf16 kernels at near-real shapes (hd 128, groups of 4, D and F not block multiples) against
    mellum2's own functions in fp32 on the same rounded inputs, forward and backward."""
    torch.manual_seed(0)
    q, k, v = (t.detach().cuda().requires_grad_() for t in attention_inputs(1000, 8, 2, hd=128, B=2,
                                                                             dtype=torch.bfloat16))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    y = kernels.flash_attention(q, k, v, window)
    mask = None if window is None else training_mask(1000, window).cuda()
    expected = mellum2.sdpa_attend(q32, k32, v32, mask, window)
    assert_close(y, expected, torch.bfloat16)
    dy = torch.randn(y.shape, device="cuda")
    for actual, wanted in zip(torch.autograd.grad(y, (q, k, v), dy.bfloat16()),
                              torch.autograd.grad(expected, (q32, k32, v32), dy)):
        assert_close(actual, wanted, torch.bfloat16)
    inputs = [t.detach().cuda() for t in moe_inputs(700, 200, 136, 16, 4, "one_empty", dtype=torch.bfloat16)]
    inputs = [t.requires_grad_() if t.is_floating_point() else t for t in inputs]
    fp32 = [t.detach().float().requires_grad_() if t.is_floating_point() else t for t in inputs]
    y, expected = kernels.fused_moe(*inputs), grouped_fallback(*fp32)
    assert_close(y, expected, torch.bfloat16)
    dy = torch.randn(y.shape, device="cuda")
    for actual, wanted in zip(torch.autograd.grad(y, [t for t in inputs if t.requires_grad], dy.bfloat16()),
                              torch.autograd.grad(expected, [t for t in fp32 if t.requires_grad], dy)):
        assert_close(actual, wanted, torch.bfloat16)
