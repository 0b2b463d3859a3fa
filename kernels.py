"""
Triton kernels for Mellum 2's two hot spots, with mellum2.py's PyTorch functions as the fallbacks.

Training time goes to two places, and PyTorch alone does both poorly on a GPU:

  - the experts (§2.1.2): 64 experts of width 896 with 8 active per token. mellum2.MoE sorts the
    N*K (token, expert) pairs and runs three grouped matmuls, with the gathered inputs, the SwiGLU
    activations and the per-pair outputs all written to memory in between.         -> fused_moe
  - sliding-window attention (§2.1.4) on 3 of every 4 layers: each query sees 1024 keys, but
    scaled_dot_product_attention with a mask still visits all T keys, so a 8192-token sequence
    costs 8x more than it should.                                                  -> flash_attention

Both kernels are the standard designs, written small enough to read:

  fused_moe        vLLM's "fused MoE": pairs sorted by expert, each expert's segment padded to a
                   whole block of rows (dropless, §3.4.5: no token is ever dropped, padding costs
                   less than one block per expert), one launch for gate+up with SiLU(gate)*up in
                   the epilogue, one for down with the routing weight in the epilogue (App. B's
                   grouped GEMM, without the pointer lists of Triton's grouped-GEMM tutorial).
                   Backward: Triton too, reusing the same GEMM kernel plus one weight-gradient kernel.
  flash_attention  FlashAttention-2's forward: online softmax over key blocks, causal, the window
                   bounding which key blocks a query block visits at all, GQA by pointing query head
                   h at key/value head h // (H / Hkv). Backward: PyTorch, recomputing the
                   probabilities from the saved log-sum-exp one band of queries at a time.

`install(model, mode)` is the one place that decides which path a model uses; the seams are the
`attend` attribute of every mellum2.Attention and the `experts_grouped` method of every mellum2.MoE.

Triton exists for Linux only (no Windows or macOS wheels), so this file imports without it, and
the "torch" mode is the model's own code. Without a GPU the kernels still run under Triton's
interpreter (TRITON_INTERPRET=1 set before this file is imported: Triton reads it when the kernels
are decorated), which executes each program with numpy: slow, but exact enough to test them on a CPU.
On a GPU, fp32 inputs reach tl.dot as TF32 (Triton's default on Ampere and later), about 1e-3 from
the fallbacks; the model runs in bf16 there (mellum2.pick_dtype).

Shapes: B batch, T time, H query heads, Hkv key/value heads, G = H // Hkv, hd head dim, N = B*T
tokens, K experts per token, E experts, D hidden size, F expert width; "pair" = one (token, slot).
"""

from __future__ import annotations  # keeps `tl.constexpr` annotations unevaluated when triton is absent

import functools
import math
import os

import torch
import torch.nn.functional as F

import mellum2

try:
    import triton
    import triton.language as tl
except ImportError:  # no wheels for Windows and macOS: only the "torch" mode is available there
    triton = tl = None


def _jit(fn):
    """triton.jit where triton is installed; elsewhere the plain function, which is never launched."""
    return triton.jit(fn) if triton is not None else fn


def require_triton():
    """The kernels themselves need triton. Without it (Windows, macOS) mellum2's PyTorch functions do
    the same work: install(model, "torch"), or simply never install the kernels."""
    if triton is None:
        raise RuntimeError("kernels.py's Triton kernels need triton, which installs on Linux only; "
                           "mellum2's PyTorch functions run everywhere")


# True when Triton runs kernels on the CPU with numpy (TRITON_INTERPRET=1): for tests. Read once, here:
# Triton chooses between interpreting and compiling as the kernels below are decorated, and a later
# change of the variable would make the block sizes and bf16 handling disagree with that choice.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _upcast(dtype):
    """The interpreter computes bf16 on raw uint16 bit patterns (wrong numbers), so there the kernels
    convert bf16 tiles to fp32 right after loading them. On a GPU bf16 tiles go to the tensor cores."""
    return INTERPRETING and dtype == torch.bfloat16


# -----------------------------------------------------------------------------------------------
# Mixture of experts (§2.1.2 experts, §3.4.5 dropless, App. B grouped GEMM)
#
# Step 1, in PyTorch: plan the work. The N*K pairs are sorted by expert, and each expert's segment
# is padded up to a multiple of BLOCK_M rows with a sentinel (N*K, "no pair"), so that every block
# of BLOCK_M rows belongs to exactly one expert. An expert without pairs gets no block at all.
#
#     experts (N=3, K=2)   [[2, 0], [0, 1], [2, 0]]  -> pairs 0..5 choose experts 2 0 0 1 2 0
#     sorted_ids (BM=4)    [1 2 5 S | 3 S S S | 0 4 S S]      S = 6, the sentinel
#     block_expert         [0, 1, 2]                           one expert id per row block
#     segments             [0, 4, 8, 12]                       padded segment of expert e: [s[e], s[e+1])

def moe_plan(experts, n_expert, block_m):
    """experts (N, K) -> sorted_ids (P,) int32, block_expert (P // block_m,) int32, segments (E+1,)
    int32, with P the padded number of rows."""
    flat = experts.flatten()                                   # (N*K,): pair p is token p // K, slot p % K
    order = flat.argsort(stable=True)                          # the pairs, grouped by expert
    counts = torch.bincount(flat, minlength=n_expert)          # (E,) pairs per expert, no capacity limit
    padded = (counts + block_m - 1) // block_m * block_m       # (E,) rounded up to whole row blocks
    segments = F.pad(padded.cumsum(0), (1, 0))                 # (E+1,) where each padded segment starts
    # The padded length has to reach the host once per layer to size the tensors below; vLLM allocates
    # the worst case N*K + E*(block_m-1) instead, which CUDA graphs need and a teaching model does not.
    rows = int(segments[-1])
    sorted_experts = flat[order]
    first_pair = counts.cumsum(0) - counts                     # (E,) index in `order` of each expert's first pair
    rank = torch.arange(flat.numel(), device=flat.device) - first_pair[sorted_experts]  # place within its segment
    sorted_ids = torch.full((rows,), flat.numel(), dtype=torch.int32, device=flat.device)
    sorted_ids[segments[sorted_experts] + rank] = order.to(torch.int32)
    block_expert = torch.repeat_interleave(torch.arange(n_expert, dtype=torch.int32, device=flat.device),
                                           padded // block_m, output_size=rows // block_m)
    return sorted_ids, block_expert, segments.to(torch.int32)


@_jit
def _moe_gemm_kernel(
    A, W1, W2, C, RowScale, SortedIds, BlockExpert,
    n_pairs, n_in, n_out, a_div,
    stride_a, stride_we, stride_win, stride_wout, stride_c,
    GLU: tl.constexpr, SCALE_ROWS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program = one (BLOCK_M pairs) x (BLOCK_N outputs) tile of C (n_pairs, n_out), all from one
    expert e:   C[p] = A[p // a_div] @ W1[e]          (W1[e] read as (n_in, n_out) through strides)
    GLU:        C[p] = silu(A[p // a_div] @ W1[e]) * (A[p // a_div] @ W2[e])
    SCALE_ROWS: C[p] *= RowScale[p]
    a_div = K reads token p // K's row of x (no gathered copy of x); a_div = 1 reads per-pair rows."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    pairs = tl.load(SortedIds + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # (BM,) pair ids, n_pairs = padding
    real = pairs < n_pairs
    pairs = pairs.to(tl.int64)  # at full size pair * stride passes 2^31
    expert = tl.load(BlockExpert + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + (pairs // a_div)[:, None] * stride_a + offs_k[None, :]                    # (BM, BK)
    w_offs = expert * stride_we + offs_k[:, None] * stride_win + offs_n[None, :] * stride_wout  # (BK, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GLU:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        k_in = offs_k < n_in - k0
        w_mask = k_in[:, None] & (offs_n[None, :] < n_out)
        a = tl.load(a_ptrs, mask=real[:, None] & k_in[None, :], other=0.0)
        w = tl.load(W1 + w_offs, mask=w_mask, other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc)
        if GLU:  # the up projection shares the loaded rows of x: one read of x for both matmuls
            w_up = tl.load(W2 + w_offs, mask=w_mask, other=0.0)
            if UPCAST:
                w_up = w_up.to(tl.float32)
            acc_up = tl.dot(a, w_up, acc_up)
        a_ptrs += BLOCK_K
        w_offs += BLOCK_K * stride_win
    # Epilogues, in fp32 while the tile is still in registers: neither gate nor up ever reaches memory.
    if GLU:
        acc = acc * tl.sigmoid(acc) * acc_up  # SiLU(gate) * up
    if SCALE_ROWS:
        acc = acc * tl.load(RowScale + pairs, mask=real, other=0.0).to(tl.float32)[:, None]
    c_ptrs = C + pairs[:, None] * stride_c + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=real[:, None] & (offs_n[None, :] < n_out))


@_jit
def _moe_weight_grad_kernel(
    X, Y, DW, SortedIds, Segments,
    n_pairs, n_i, n_j, x_div, y_div,
    stride_x, stride_y, stride_dwe, stride_dwi,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """DW[e] (n_i, n_j) = sum over the pairs p of expert e of X[p // x_div]^T Y[p // y_div].
    One program = one (BLOCK_I, BLOCK_J) tile of one expert's gradient, walking that expert's padded
    segment of sorted_ids; an expert without pairs walks nothing and writes zeros."""
    e, pid_i, pid_j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    start, end = tl.load(Segments + e), tl.load(Segments + e + 1)
    for r0 in range(start, end, BLOCK_M):
        pairs = tl.load(SortedIds + r0 + tl.arange(0, BLOCK_M))
        real = pairs < n_pairs
        pairs = pairs.to(tl.int64)
        x = tl.load(X + (pairs // x_div)[:, None] * stride_x + offs_i[None, :],
                    mask=real[:, None] & (offs_i[None, :] < n_i), other=0.0)   # (BM, BI)
        y = tl.load(Y + (pairs // y_div)[:, None] * stride_y + offs_j[None, :],
                    mask=real[:, None] & (offs_j[None, :] < n_j), other=0.0)   # (BM, BJ)
        if UPCAST:
            x, y = x.to(tl.float32), y.to(tl.float32)
        acc = tl.dot(tl.trans(x), y, acc)
    dw_ptrs = DW + e.to(tl.int64) * stride_dwe + offs_i[:, None] * stride_dwi + offs_j[None, :]
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=(offs_i[:, None] < n_i) & (offs_j[None, :] < n_j))


def _moe_blocks():
    """(BLOCK_M, BLOCK_N, BLOCK_K). GPU: 64-row blocks suit training batches (N*K/E ~ thousands of
    pairs per expert, so padding wastes < 2%); for small decoding batches 16 would waste less.
    Interpreter: small blocks keep the CPU tests fast and still GPU-legal (every dim >= 16)."""
    return (16, 32, 32) if INTERPRETING else (64, 64, 64)


def _moe_gemm(a, a_div, w, plan, transposed=False, w_up=None, row_scale=None):
    """Per pair p of expert e: a[p // a_div] @ w[e].T (w (E, out, in), as nn.Linear stores it), or
    a[...] @ w[e] when transposed (w (E, in, out), the backward's direction) -> (n_pairs, out).
    With w_up: the SwiGLU silu(a @ w[e].T) * (a @ w_up[e].T), w_up laid out like w (the kernel reads
    both through w's strides); with row_scale (n_pairs,): rows scaled."""
    sorted_ids, block_expert, _ = plan
    block_m, block_n, block_k = _moe_blocks()
    n_pairs = a.shape[0] * a_div
    stride_win, stride_wout = (w.stride(1), w.stride(2)) if transposed else (w.stride(2), w.stride(1))
    n_in, n_out = w.shape[1 if transposed else 2], w.shape[2 if transposed else 1]
    c = torch.empty(n_pairs, n_out, dtype=a.dtype, device=a.device)
    grid = (len(block_expert), triton.cdiv(n_out, block_n))
    _moe_gemm_kernel[grid](
        a, w, w if w_up is None else w_up, c, a if row_scale is None else row_scale, sorted_ids, block_expert,
        n_pairs, n_in, n_out, a_div, a.stride(0), w.stride(0), stride_win, stride_wout, c.stride(0),
        GLU=w_up is not None, SCALE_ROWS=row_scale is not None, UPCAST=_upcast(a.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return c


def _moe_weight_grad(x, x_div, y, y_div, plan, n_expert, dtype):
    """(E, n_i, n_j): for each expert, the sum over its pairs of x[p // x_div]^T y[p // y_div]."""
    sorted_ids, _, segments = plan
    block_m, block_n, _ = _moe_blocks()
    n_pairs, n_i, n_j = x.shape[0] * x_div, x.shape[1], y.shape[1]
    dw = torch.empty(n_expert, n_i, n_j, dtype=dtype, device=x.device)
    grid = (n_expert, triton.cdiv(n_i, block_n), triton.cdiv(n_j, block_n))
    _moe_weight_grad_kernel[grid](
        x, y, dw, sorted_ids, segments, n_pairs, n_i, n_j, x_div, y_div,
        x.stride(0), y.stride(0), dw.stride(0), dw.stride(1),
        UPCAST=_upcast(x.dtype), BLOCK_M=block_m, BLOCK_I=block_n, BLOCK_J=block_n)
    return dw


class FusedMoE(torch.autograd.Function):
    """Forward: two launches and a sum. Backward: five launches of the same GEMM kernel and three of
    the weight-gradient kernel, all in Triton, because the alternative (a PyTorch backward) is either
    a Python loop over 64 experts or torch's grouped matmul, which on CUDA takes bf16 only."""

    @staticmethod
    def forward(ctx, x, weights, experts, gate_proj, up_proj, down_proj):
        N, K = experts.shape
        plan = moe_plan(experts, gate_proj.shape[0], _moe_blocks()[0])
        h = _moe_gemm(x, K, gate_proj, plan, w_up=up_proj)                        # (N*K, F) SiLU(x Wg^T) * x Wu^T
        y = _moe_gemm(h, 1, down_proj, plan, row_scale=weights.flatten())         # (N*K, D) weighted by the router
        ctx.save_for_backward(x, weights, gate_proj, up_proj, down_proj, *plan)
        return y.view(N, K, -1).sum(1)  # each token's K outputs, summed in a fixed order: deterministic

    @staticmethod
    def backward(ctx, dout):
        x, weights, gate_proj, up_proj, down_proj, *plan = ctx.saved_tensors
        N, K = weights.shape
        E = gate_proj.shape[0]
        dout = dout.contiguous()                                                   # (N, D)
        # Recompute gate and up (two (N*K, F) tensors are cheaper to recompute than to keep per layer).
        gate = _moe_gemm(x, K, gate_proj, plan).float()                            # (N*K, F)
        up = _moe_gemm(x, K, up_proj, plan).float()
        sig = torch.sigmoid(gate)
        h = gate * sig * up                                                        # SiLU(gate) * up
        # y_p = w_p * (h_p @ Wd[e]^T), so with g_p = dout[token] @ Wd[e]:  dw_p = <g_p, h_p>, dh_p = w_p g_p.
        g = _moe_gemm(dout, K, down_proj, plan, transposed=True).float()          # (N*K, F)
        w = weights.flatten().float()[:, None]                                     # (N*K, 1)
        d_weights = (g * h).sum(-1).view(N, K).to(weights.dtype)
        dh = g * w
        d_gate = (dh * up * sig * (1 + gate * (1 - sig))).to(x.dtype)              # SiLU'(z) = s (1 + z (1 - s))
        d_up = (dh * gate * sig).to(x.dtype)
        # Weight gradients: per expert, sum over its pairs of (output grad)^T (input).
        d_down_proj = _moe_weight_grad(dout, K, (h * w).to(x.dtype), 1, plan, E, down_proj.dtype)  # (E, D, F)
        d_gate_proj = _moe_weight_grad(d_gate, 1, x, K, plan, E, gate_proj.dtype)                  # (E, F, D)
        d_up_proj = _moe_weight_grad(d_up, 1, x, K, plan, E, up_proj.dtype)                        # (E, F, D)
        dx = (_moe_gemm(d_gate, 1, gate_proj, plan, transposed=True)
              + _moe_gemm(d_up, 1, up_proj, plan, transposed=True))                # (N*K, D)
        return dx.view(N, K, -1).sum(1), d_weights, None, d_gate_proj, d_up_proj, d_down_proj


def fused_moe(x, weights, experts, gate_proj, up_proj, down_proj):
    """The Triton version of mellum2.MoE.experts_grouped: x (N, D), weights and experts (N, K),
    gate_proj, up_proj (E, F, D) and down_proj (E, D, F) -> (N, D)."""
    require_triton()
    x, weights, gate_proj, up_proj, down_proj = mellum2.in_compute_dtype(x, weights, gate_proj, up_proj, down_proj)
    # Contiguous, as the model's parameters already are: the gate+up launch reads both through one
    # set of strides.
    gate_proj, up_proj, down_proj = (w.contiguous() for w in (gate_proj, up_proj, down_proj))
    return FusedMoE.apply(x.contiguous(), weights, experts, gate_proj, up_proj, down_proj)


def triton_experts(moe, x, weights, experts):
    """The `experts_grouped` seam of one mellum2.MoE (install binds `moe`): its stacked weights
    through fused_moe. FP8 training (train.py --fp8 replaces moe.grouped_mm) keeps mellum2's own
    path, whose grouped matmuls it quantises: fused_moe has no FP8 version."""
    if moe.grouped_mm is not mellum2.grouped_mm:
        return mellum2.MoE.experts_grouped(moe, x, weights, experts)
    return fused_moe(x, weights, experts, moe.gate_proj, moe.up_proj, moe.down_proj)


# -----------------------------------------------------------------------------------------------
# Sliding-window GQA attention (§2.1.4, §2.2), FlashAttention-2 forward
#
# A program owns BLOCK_M queries of one head and keeps, per query, the running maximum m of its
# scores, the running sum l of exp(score - m) and the running output acc. Each key block updates
# them ("online softmax"): scores are never stored, and memory is O(T) instead of O(T^2).
#
# Which keys does query block [q0, q0 + BLOCK_M) need? Causal: none after its last query, so the
# loop stops at q0 + BLOCK_M. Sliding window W (mellum2's convention: query i sees keys i-W+1 .. i,
# W keys including itself): none before q0 - W + 1, so the loop starts at the key block holding it.
# A full layer is the window W = T. Key blocks outside [lo, hi) are never loaded: a sliding layer
# costs O(T W), not O(T^2). Inside the range a per-element mask handles the block edges.
#
#     keys ->  | b0 | b1 | b2 | b3 | b4 |        W = 1.5 blocks, query block 3:
#     q blk 3  |    |  ..|####|####|    |        lo = block 1 (partly in the window), hi = end of block 3

@_jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    n_head, T, group, window, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program = BLOCK_M queries of one (batch, head). q, k, v, o are read through their strides
    (the last dim contiguous), so the (B, T, heads, hd) projections need no transposed copy."""
    m_block, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // n_head).to(tl.int64), (bh % n_head).to(tl.int64)
    kv_h = h // group  # GQA: query heads h = G*j .. G*j + G-1 all read key/value head j
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=(offs_m[:, None] < T) & d_in[None, :], other=0.0)   # (BM, hd), loaded once
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    # A finite "minus infinity" as the start of the running max: a row whose keys in the first block
    # are all masked then gets exp2(-inf - (-1e30)) = 0 instead of exp2(-inf - (-inf)) = NaN.
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    q0 = m_block * BLOCK_M
    lo = tl.maximum(q0 - window + 1, 0) // BLOCK_N * BLOCK_N  # the key block holding the oldest visible key
    hi = tl.minimum(q0 + BLOCK_M, T)                           # one past the newest visible key
    for n0 in range(lo, hi, BLOCK_N):
        offs_k = n0 + offs_n  # key positions
        kv_mask = (offs_k[:, None] < T) & d_in[None, :]
        k = tl.load(k_base + offs_k[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_k[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        # Scores in base 2: exp2 is the GPU's native instruction, and scale_log2 = hd^-0.5 * log2(e).
        s = tl.dot(q, tl.trans(k)) * scale_log2                    # (BM, BN)
        distance = offs_m[:, None] - offs_k[None, :]
        visible = (distance >= 0) & (distance < window) & (offs_k[None, :] < T)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)                               # rescales what was summed so far
        p = tl.exp2(s - m_new[:, None])                            # (BM, BN), 0 where not visible
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_i = tl.where(l_i > 0, l_i, 1.0)  # only padding rows past T see no key; avoid 0/0 there
    o = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=(offs_m[:, None] < T) & d_in[None, :])
    # log-sum-exp of the scaled scores, natural log: the backward rebuilds P = exp(q k^T / sqrt(hd) - lse).
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=offs_m < T)


def _attention_blocks():
    """(BLOCK_M, BLOCK_N): 64 x 64 tiles of hd = 128 fit a GPU's shared memory with two pipeline
    stages in bf16 (what the model runs in on a GPU), and in fp32 on A100/H100-class GPUs, not on
    consumer ones; the interpreter's cost is per program and per op, so 32 x 32 there."""
    return (32, 32) if INTERPRETING else (64, 64)


def attention_forward(q, k, v, window, block_m=None, block_n=None):
    """q (B, H, T, hd), k, v (B, Hkv, T, hd) -> o (B, H, T, hd), lse (B, H, T) fp32."""
    require_triton()
    B, H, T, hd = q.shape
    block_m, block_n = block_m or _attention_blocks()[0], block_n or _attention_blocks()[1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # o lives in (B, T, H, hd) memory: Attention's transpose back and reshape to (B, T, H*hd) are then free.
    o = torch.empty(B, T, H, hd, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(T, block_m), B * H)
    _attention_fwd_kernel[grid](
        q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, T, H // k.shape[1], window or T, hd ** -0.5 * math.log2(math.e),
        # A power of two, and at least 16: tl.dot on 16-bit inputs needs 16 along its inner dimension.
        HEAD_DIM=hd, BLOCK_D=max(16, triton.next_power_of_2(hd)), UPCAST=_upcast(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, num_stages=2)
    return o, lse


def attention_backward(q, k, v, o, lse, do, window, chunk=256):
    """dq, dk, dv from the saved lse, in PyTorch: for each chunk of `chunk` queries, only the band of
    keys the window lets them see is used, so memory is O(chunk * (chunk + W)) per head, not O(T^2).
        P = exp(q k^T / sqrt(hd) - lse)            the forward's probabilities, exactly
        dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = dS K / sqrt(hd),  dK = dS^T Q / sqrt(hd)
    GQA: queries are viewed as (B, Hkv, G, ...), keys as (B, Hkv, 1, ...) and broadcast; dk and dv sum
    over the G query heads of their group. Everything in fp32, whatever the input dtype."""
    B, H, T, hd = q.shape
    Hkv = k.shape[1]
    scale = hd ** -0.5
    dq = torch.empty(B, H, T, hd, dtype=torch.float32, device=q.device)
    dk = torch.zeros(B, Hkv, T, hd, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    delta = (o.float() * do.float()).sum(-1)  # (B, H, T) = rowsum(dO * O) = rowsum(P * dP)
    positions = torch.arange(T, device=q.device)
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        ks = max(0, s - window + 1) if window else 0  # the oldest key any query of the chunk sees

        def by_group(t):  # (B, H, T, ...) -> this chunk's queries as (B, Hkv, G, C, ...), fp32
            return t[:, :, s:e].float().unflatten(1, (Hkv, H // Hkv))

        qc, doc, lse_c, delta_c = by_group(q), by_group(do), by_group(lse), by_group(delta)
        kc, vc = (t[:, :, ks:e].float().unsqueeze(2) for t in (k, v))  # (B, Hkv, 1, L, hd)
        visible = mellum2.attention_mask(positions[s:e], positions[ks:e], window)  # (C, L), the model's rule
        p = torch.exp((qc @ kc.mT) * scale - lse_c[..., None]).masked_fill(~visible, 0.0)  # (B, Hkv, G, C, L)
        dv[:, :, ks:e] += (p.mT @ doc).sum(2)
        ds = p * (doc @ vc.mT - delta_c[..., None]) * scale
        dq[:, :, s:e] = (ds @ kc).flatten(1, 2)
        dk[:, :, ks:e] += (ds.mT @ qc).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FlashAttention(torch.autograd.Function):
    """Triton forward, PyTorch backward. The FlashAttention-2 backward in Triton (two kernels, five
    matmuls, transposed window bounds) is the hardest code this project would have, and its GPU-only
    failure modes are invisible to CPU tests; the recompute costs memory bandwidth, not correctness."""

    @staticmethod
    def forward(ctx, q, k, v, window, block_m, block_n):
        o, lse = attention_forward(q, k, v, window, block_m, block_n)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.window = window
        return o

    @staticmethod
    def backward(ctx, do):
        return *attention_backward(*ctx.saved_tensors, do, ctx.window), None, None, None


def flash_attention(q, k, v, window=None, block_m=None, block_n=None):
    """Causal self-attention, each query seeing at most `window` keys (None: all before it), with
    the scale hd^-0.5: the same numbers as mellum2.sdpa_attend with the training mask.
    q (B, H, T, hd), k, v (B, Hkv, T, hd) -> (B, H, T, hd)."""
    require_triton()
    q, k, v = mellum2.in_compute_dtype(q, k, v)
    return FlashAttention.apply(q, k, v, window, block_m, block_n)


def triton_attend(q, k, v, mask, window):
    """The `attend` seam of mellum2.Attention. In training (as many keys as queries, and the mask
    None or the (T, T) causal window that `window` describes) the Triton kernel; decoding with a KV
    cache (a (B, 1, Tq, Tk) mask of cached positions) stays with mellum2.sdpa_attend."""
    if q.shape[2] == k.shape[2] and (mask is None or mask.dim() == 2):
        return flash_attention(q, k, v, window)
    return mellum2.sdpa_attend(q, k, v, mask, window)


# -----------------------------------------------------------------------------------------------
# Dispatch: the one place that decides which code a model runs

MODES = ("auto", "triton", "torch")


def add_kernels_flag(parser):
    """The --kernels flag, as every script that runs a model takes it."""
    parser.add_argument("--kernels", choices=MODES,
                        help="attention and MoE kernels: triton, torch, or auto = triton on CUDA when installed "
                             "(default: $MELLUM2_KERNELS, else auto)")


def resolve_mode(mode=None, device=None):
    """"auto" | "triton" | "torch" (None: $MELLUM2_KERNELS, else auto) -> "triton" or "torch" for a
    model on `device` (None: this machine's best). auto is triton for a model on a CUDA GPU with
    triton installed, else torch (a --device cpu run on a GPU machine included). Asking for triton
    where it cannot run is an error rather than a silent fallback."""
    from_environment = not mode and os.environ.get("MELLUM2_KERNELS")
    mode = mode or os.environ.get("MELLUM2_KERNELS") or "auto"
    # An error names where the mode came from: a variable set long ago in a shell profile included.
    named = f"MELLUM2_KERNELS={mode}" if from_environment else f"kernel mode {mode!r}"
    if mode not in MODES:
        raise ValueError(f"unknown {named}; choose one of {', '.join(MODES)}")
    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if mode == "auto":
        return "triton" if triton is not None and on_gpu else "torch"
    if mode == "triton" and triton is None:
        raise ValueError(f"{named} needs triton, which installs on Linux only (pip install triton); "
                         "auto and torch run everywhere")
    if mode == "triton" and not on_gpu and not INTERPRETING:
        raise ValueError(f"{named} needs a model on a CUDA GPU, or TRITON_INTERPRET=1 (set before "
                         "importing kernels) to run the kernels slowly on the CPU")
    return mode


def install(model, mode=None):
    """Point every Attention (trunk and MTP) and every MoE of `model` at the kernels of `mode`, and
    return the mode used. "torch" restores mellum2's own functions (sdpa_attend, experts_grouped)."""
    mode = resolve_mode(mode, next(model.parameters()).device)
    for module in model.modules():
        if isinstance(module, mellum2.Attention):
            module.attend = triton_attend if mode == "triton" else mellum2.sdpa_attend
        elif isinstance(module, mellum2.MoE):
            if mode == "triton":  # an instance attribute shadows the class's experts_grouped method
                module.experts_grouped = functools.partial(triton_experts, module)
            else:
                module.__dict__.pop("experts_grouped", None)
    return mode
