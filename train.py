"""
Training Mellum 2, from a laptop CPU to many GPUs: pre-training (report §3), the long-context stage
(§4) and post-training (§5).

    python train.py --size tiny                   # the whole pre-training recipe on a 2-core CPU in minutes
    python train.py --size tiny --data-report     # what the data curriculum will do, then exit
    torchrun --standalone --nproc_per_node=8 train.py --size small
    python train.py --stage sft --variant instruct --init-from out/tiny            # SFT, then RL:
    python train.py --stage grpo --variant instruct --init-from out/tiny-sft-instruct

The recipe, in the report's order, each piece where it happens:
  - data: three phases of web / code / math with FIM and best-fit packing    -> data.py (§3.2)
  - optimizer: Muon in the Moonlight configuration on every hidden matrix and -> Muon (§3.4.1)
    on each expert matrix; AdamW on embeddings, head and norm gains, and (our
    choice: the report does not say) on the router
  - schedule: Warmup-Hold-Decay, linear decay to zero over the last 15.9%     -> lr_multiplier (§3.4.2)
  - batch ramp: half the batch for the first 6% of steps, then the full one   -> batch_size_at (§3.4.3)
  - loss: next-token + 0.1 MTP + 1e-3 balance + 1e-3 router z-loss            -> mellum2.py (§2.1.5, §3.4.5)
  - precision: fp32 on CPU, bf16 autocast on GPUs, --fp8 tensorwise matmuls   -> Float8Linear (§3.4.4)
  - many processes: DDP under torchrun, with a distributed Muon               -> setup_distributed (§3.4.7)
  - checkpoints written atomically; --resume continues exactly; Ctrl-C saves  -> save_checkpoint
  - long context: --stage long, layer-selective YaRN and its ablations        -> long_context_config (§4)
  - Triton kernels for attention and the experts on GPUs (--kernels)          -> kernels.py
  - SFT, Instruct and Thinking: masked demonstrations of verifiable tasks     -> tasks.py, train() (§5.1)
  - RL: GRPO with leave-one-out advantages, clip-higher, IcePop, reward       -> grpo (§5.2)
    shaping, asynchronous rollouts and a sandboxed verifier
"""

import argparse
import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import gc
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import time
import zipfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import kernels
import mellum2
import tasks
from mellum2 import CheckpointError, Mellum2, Mellum2Config, pick_device, pick_dtype
from tasks import run_sandboxed  # noqa: F401  (the verification stack's sandbox: from train import run_sandboxed)


# -----------------------------------------------------------------------------------------------
# Muon (§3.4.1 Optimizer, App. B Table 11: momentum 0.95, Nesterov, 5 Newton-Schulz steps,
# "spectral" scale with extra factor 0.2, i.e. the Moonlight configuration)

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the standard quintic: steepest slope at zero, 5 steps suffice


def orthogonalize(G, steps=5, eps=1e-7, dtype=torch.bfloat16):
    """The nearest semi-orthogonal matrix to G (m, n), or to each matrix of a stack G (E, m, n): U V^T
    of its SVD, by a Newton-Schulz iteration that only needs matmuls. A stack of experts (E, out, in)
    is orthogonalised one expert at a time, never flattened into one matrix.
    The quintic pushes every singular value above about 1/500 of G's norm into [0.68, 1.2] rather than
    exactly 1 (smaller ones stay smaller), which trains as well and is much cheaper. bf16 is enough:
    only the direction of the update matters."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    X = X if X.ndim == 3 else X[None]         # (batch, m, n)
    tall = X.shape[-2] > X.shape[-1]
    if tall:                                  # iterate on the wide side: X X^T is then the small Gram matrix
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT                                           # (batch, m, m)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)            # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)                     # a X + B X
    if tall:
        X = X.mT
    return X if G.ndim == 3 else X[0]


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D weight matrices and (E, out, in) expert stacks.

    Each step: a Nesterov momentum buffer of the gradient; its orthogonalisation O (all singular values
    about 1, so every direction of the matrix learns at the same rate); then, with decoupled weight decay,
        W <- W * (1 - lr * weight_decay) - lr * 0.2 * sqrt(max(out, in)) * O
    The factor 0.2 * sqrt(max(out, in)) gives the update the RMS of a typical AdamW update (Moonlight),
    so Muon and the AdamW that trains the other parameters can share one learning rate and schedule;
    the report found Megatron's unscaled default (1.0) diverged on dense models.

    The Newton-Schulz iteration runs in bf16 where the model computes in bf16 (GPUs, as in the report)
    and in fp32 elsewhere (ns_dtype=None; pick_dtype decides): a CPU without bf16 matrix instructions,
    which is most laptops, emulates bf16 matmuls: 40x slower than fp32 on an AVX2 CPU we measured,
    where `--size tiny` took hours instead of 10 minutes.

    Distributed (torch.distributed initialised, gradients already averaged by DDP): momentum is kept
    on every rank (cheap, element-wise), but matrix i is orthogonalised only by rank i % world_size,
    which broadcasts O to the others; every rank then applies the same update, so replicas stay
    identical while the expensive Newton-Schulz work is split world_size ways.
    """

    def __init__(self, params, lr, momentum=0.95, nesterov=True, weight_decay=0.1, ns_steps=5,
                 ns_dtype=None, eps=1e-7):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps, ns_dtype=ns_dtype, eps=eps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon takes matrices and stacks of matrices, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self):
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        work = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        updates = []
        for i, (p, group) in enumerate(work):
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            buf.lerp_(p.grad, 1 - group["momentum"])                   # buf = mu buf + (1 - mu) grad
            u = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
            ns_dtype = group["ns_dtype"] or pick_dtype(p.device)
            if i % world == rank:  # contiguous: a broadcast sends raw memory, so the layouts must agree
                updates.append(orthogonalize(u, group["ns_steps"], group["eps"], ns_dtype).contiguous())
            else:
                updates.append(torch.empty(p.shape, dtype=ns_dtype, device=p.device))
        if world > 1:
            for handle in [dist.broadcast(o, src=i % world, async_op=True) for i, o in enumerate(updates)]:
                handle.wait()
        for (p, group), o in zip(work, updates):
            scale = 0.2 * math.sqrt(max(p.shape[-2:]))
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(o, alpha=-group["lr"] * scale)


def build_optimizers(model, lr, weight_decay=0.1, optimizer="muon", ns_dtype=None, betas=(0.9, 0.95)):
    """Muon for every hidden matrix and expert stack; AdamW for the rest (App. B: Adam betas (0.9,
    0.95), eps 1e-8). Embedding and head rows are per-token vectors rather than linear maps between
    hidden spaces, and the router's rows are per-expert score directions: orthogonalising those would
    equalise what should differ, so they stay with AdamW, as do the norm gains (vectors). Gains are
    not decayed: pulling them to 0 would fight the normalisation they exist to undo.
    With optimizer="adamw" everything uses AdamW (the report's baseline, §3.4.1, and its RL optimizer)."""
    def with_adamw(name, p):
        return optimizer == "adamw" or p.ndim == 1 or name.startswith(("embed_tokens", "lm_head")) \
            or name.endswith("mlp.gate.weight")

    named = list(model.named_parameters())
    decayed = [p for n, p in named if with_adamw(n, p) and p.ndim > 1]
    gains = [p for n, p in named if with_adamw(n, p) and p.ndim == 1]
    matrices = [p for n, p in named if not with_adamw(n, p)]
    adamw = torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                               {"params": gains, "weight_decay": 0.0}], lr=lr, betas=betas, eps=1e-8)
    return [adamw] + ([Muon(matrices, lr=lr, weight_decay=weight_decay, ns_dtype=ns_dtype)] if matrices else [])


# -----------------------------------------------------------------------------------------------
# Warmup-Hold-Decay (§3.4.2) and the batch-size ramp (§3.4.3)

def linear_warmup(step, warmup_steps):
    """The rise to the peak learning rate every stage starts with: 1/warmup_steps of it at step 0,
    all of it from step warmup_steps - 1 on."""
    return min(1.0, (step + 1) / max(1, warmup_steps))


def lr_multiplier(step, total_steps, warmup_steps, decay_fraction=0.159):
    """Linear warmup to the peak, hold it, then decay linearly toward zero (reached one step after
    the last) over the final decay_fraction of the steps: phase 3, the report's 15.9% of the tokens,
    here of the steps, found better than a cosine to a non-zero floor. One multiplier scales both
    optimizers. (For tiny and small the first lowered step is data.phase_index's first of phase 3.
    Table 3's shares add up to 100.1, so that phase is 15.88% of the steps, and for the 12B recipe
    the decay begins 51 of its 323,459 steps early.)"""
    decay_start = total_steps - round(decay_fraction * total_steps)
    if step < warmup_steps:
        return linear_warmup(step, warmup_steps)
    if step < decay_start:
        return 1.0
    return (total_steps - step) / (total_steps - decay_start)


def warmup_within(warmup_steps, total_steps):
    """A preset's warmup, but at most half the run (the report's Thinking RL warms up for half of its
    100 steps): a run cut short with --max-steps still warms up, holds and decays, instead of ending
    mid-warmup."""
    return min(warmup_steps, total_steps // 2)


def cosine_multiplier(step, total_steps, warmup_steps, floor=0.1):
    """SFT's schedule (§5.1.2): linear warmup, then a cosine from the peak down to floor x peak
    (3e-5 to 3e-6 in the report)."""
    if step < warmup_steps:
        return linear_warmup(step, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_size_at(step, total_steps, batch_size, ramp_fraction=0.06):
    """Half the batch for the first ramp_fraction of steps, then the full batch. The report ramps
    2,048 -> 4,096 sequences "during the initial phase"; its Fig. 5 draws one doubling, near step 19K
    of 323K (~6%). Early on, when gradients are large and consistent, a smaller batch gives more
    updates per token at no loss in quality."""
    return batch_size // 2 if step < ramp_fraction * total_steps else batch_size


# -----------------------------------------------------------------------------------------------
# FP8 "tensorwise" hybrid precision (§3.4.4 Precision, App. B: hybrid, tensorwise, most-recent amax)
#
# Every operand of a big matmul is scaled by one number per tensor per call, so that its largest
# magnitude lands on the format's largest finite value, and rounded to 8 bits: e4m3 (more precision)
# for activations and weights, e5m2 (more range) for gradients; the two formats are what "hybrid"
# names. Products are accumulated in high precision and unscaled. Master weights, optimizer state,
# the router, embeddings, the head and the norms stay in high precision. Dense layers call
# torch._scaled_mm, a real FP8 matmul on GPUs with FP8 units (elsewhere the same arithmetic in fp32,
# see scaled_mm); experts use a quantise-dequantise emulation in front of the grouped matmul,
# numerically the same recipe, because torch has no tensorwise FP8 grouped kernel. An expert stack
# is E matrices, and each gets its own scale, like any other matrix.

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def to_fp8(x, dtype, dims=None):
    """x -> (x8, scale) with x8 = saturate(x * scale) in `dtype` and x ~= x8 / scale. One scale for
    the whole tensor, or one per slice over `dims` (an expert stack's last two: one per expert)."""
    fp8_max = torch.finfo(dtype).max
    amax = x.detach().abs().max() if dims is None else x.detach().abs().amax(dim=dims, keepdim=True)
    scale = fp8_max / amax.float().clamp(min=1e-12)
    return (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype), scale


def scaled_mm(a8, scale_a, b8, scale_b, out_dtype):
    """(a8 / scale_a) @ (b8 / scale_b) with FP8 inputs. On a GPU, torch._scaled_mm multiplies in FP8
    (it wants a row-major and b column-major). Elsewhere the 8-bit values are widened to fp32, where
    their products are exact, multiplied and summed, and unscaled once, as the GPU does: torch's CPU
    kernel for _scaled_mm can be a scalar loop (0.45 s for one 256 x 256 x 256 product on a 2-core
    server CPU), which made a two-step test run of the tiny model take six minutes."""
    if a8.device.type != "cuda":
        return ((a8.float() @ b8.float()) / (scale_a * scale_b)).to(out_dtype)
    return torch._scaled_mm(a8.contiguous(), b8.t().contiguous().t(), scale_a=scale_a.reciprocal(),
                            scale_b=scale_b.reciprocal(), out_dtype=out_dtype)


class _FP8Matmul(torch.autograd.Function):
    """y = x W^T with the three GEMMs of a linear layer in FP8: y from (x8, W8), dx from (g8, W8),
    dW from (g8, x8). x and W are saved in high precision and quantised again in backward."""

    @staticmethod
    def forward(ctx, x, w):  # x (M, in), w (out, in)
        ctx.save_for_backward(x, w)
        (x8, sx), (w8, sw) = to_fp8(x, E4M3), to_fp8(w, E4M3)
        return scaled_mm(x8, sx, w8.t(), sw, x.dtype)  # (M, out)

    @staticmethod
    def backward(ctx, g):  # g (M, out)
        x, w = ctx.saved_tensors
        # dW sums over the M rows, and an FP8 matmul wants the length it sums over to be a multiple
        # of 16 (the MTP block's M is B * (T - 1)): zero rows, which add nothing, make it one.
        M = len(g)
        if M % 16:
            g, x = F.pad(g, (0, 0, 0, -M % 16)), F.pad(x, (0, 0, 0, -M % 16))  # (M', out), (M', in)
        (g8, sg), (x8, sx), (w8, sw) = to_fp8(g, E5M2), to_fp8(x, E4M3), to_fp8(w, E4M3)
        return scaled_mm(g8[:M], sg, w8, sw, g.dtype), scaled_mm(g8.t(), sg, x8, sx, w.dtype)


class Float8Linear(nn.Linear):
    """A bias-free nn.Linear whose matmuls run in FP8 (the weight and its name are unchanged)."""

    def forward(self, x):
        return _FP8Matmul.apply(x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class _FakeQuant(torch.autograd.Function):
    """Forward: round x to FP8 and back (tensorwise, or per slice over dims). Backward: pass the
    gradient through unchanged, since the recipe computes dx and dW from the 8-bit operands but
    applies them to the originals."""

    @staticmethod
    def forward(ctx, x, dtype, dims=None):
        x8, scale = to_fp8(x, dtype, dims)
        return (x8.float() / scale).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _FakeQuantGrad(torch.autograd.Function):
    """Forward: identity. Backward: round the incoming gradient to e5m2 (tensorwise)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        g8, scale = to_fp8(g, E5M2)
        return (g8.float() / scale).to(g.dtype)


def fp8_grouped_mm(x, w, offsets):
    """The MoE's grouped matmul with FP8 operands: q(x) q(w) forward, and through autograd
    dx = q(g) q(w)^T and dW = q(x)^T q(g), as in _FP8Matmul. Each expert's matrix w[e] gets a scale of
    its own, as each nn.Linear does: one shared scale would round a small-weighted expert coarsely."""
    y = mellum2.grouped_mm(_FakeQuant.apply(x, E4M3), _FakeQuant.apply(w, E4M3, (-2, -1)), offsets)
    return _FakeQuantGrad.apply(y)


def check_fp8(device):
    """FP8 runs on GPUs with FP8 matrix units (compute capability 8.9: Ada, Hopper and later) and is
    emulated on a CPU; older GPUs cannot run torch._scaled_mm, and MPS has no 8-bit float types."""
    device = torch.device(device)
    if device.type == "mps" or (device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9)):
        raise ValueError(f"--fp8 needs a GPU with FP8 matrix units (compute capability 8.9 or later) or a CPU; "
                         f"{device} has none")


def convert_to_fp8(model):
    """Swap the attention projections and the MTP projection for Float8Linear, and route every MoE's
    expert matmuls through fp8_grouped_mm. The router and the head stay in high precision: small
    rounding there flips expert choices or token probabilities."""
    check_fp8(next(model.parameters()).device)
    for module in model.modules():
        if isinstance(module, mellum2.Attention):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # same weight tensor, FP8 forward
                getattr(module, name).__class__ = Float8Linear
        elif isinstance(module, mellum2.MTP):
            module.fc.__class__ = Float8Linear
        elif isinstance(module, mellum2.MoE):
            module.grouped_mm = fp8_grouped_mm
    return model


# -----------------------------------------------------------------------------------------------
# Run settings per size (Table 4 and App. B for the release; the small sizes scaled to fit)

@dataclasses.dataclass(frozen=True)
class Run:
    batch_size: int      # sequences per optimizer step, all processes together
    micro_batch: int     # sequences per forward pass per process (gradient accumulation fills the rest)
    steps: int           # optimizer steps
    lr: float            # peak learning rate of both optimizers
    warmup_steps: int
    eval_every: int      # steps between validation passes
    eval_rows: int       # validation sequences per source (the same ones whatever the micro-batch)
    ckpt_every: int      # steps between checkpoints
    decay_fraction: float = 0.159  # the final share of steps over which the LR decays to 0 (phase 3)
    ramp_fraction: float = 0.06    # the first share of steps at half batch
    eval_tasks: int = 0            # post-training: held-out tasks per suite at each evaluation
    thinking_steps: int = 0        # post-training: the Thinking variant's steps, where they differ
    context_factor: int = 4        # the long stage: its sequence length over the pre-trained one


RUNS = {
    # About 10 minutes on 2 CPU cores: 200 steps of 16 x 256 tokens, 0.8M tokens in all.
    "tiny": Run(batch_size=16, micro_batch=16, steps=200, lr=3e-3, warmup_steps=10, eval_every=50,
                eval_rows=64, ckpt_every=50),
    "small": Run(batch_size=64, micro_batch=16, steps=5000, lr=2e-3, warmup_steps=100, eval_every=250,
                 eval_rows=256, ckpt_every=500),
    # The report's run (Table 4, App. B): 4096 x 8192 tokens per step (2048 while ramping), micro-batch 2.
    # Its LR decays over the last 15.9% of the steps (phase 3's share), 51,430, where App. B lists
    # 49,306: the report counts the phase in tokens (see the README's Warmup-Hold-Decay paragraph).
    "mellum2-12b": Run(batch_size=4096, micro_batch=2, steps=323459, lr=3e-4, warmup_steps=2000,
                       eval_every=1000, eval_rows=16, ckpt_every=1000),
}

# The long-context stage (§4.3): a tenth of the pre-training LR, Warmup-Hold-Decay with the last
# 1/7 decaying (500 of 3,500 iterations), no batch ramp; for the small sizes about the same tokens
# per step as pre-training at 4x the sequence length, for the release 8K -> 128K (§4), 16x.
LONG_RUNS = {
    "tiny": Run(batch_size=4, micro_batch=4, steps=60, lr=3e-4, warmup_steps=6, eval_every=30, eval_rows=8,
                ckpt_every=30, decay_fraction=0.143, ramp_fraction=0.0),
    "small": Run(batch_size=16, micro_batch=4, steps=500, lr=2e-4, warmup_steps=50, eval_every=100,
                 eval_rows=16, ckpt_every=100, decay_fraction=0.143, ramp_fraction=0.0),
    "mellum2-12b": Run(batch_size=256, micro_batch=1, steps=3500, lr=3e-5, warmup_steps=100, eval_every=500,
                       eval_rows=4, ckpt_every=500, decay_fraction=0.143, ramp_fraction=0.0, context_factor=16),
}


# SFT (§5.1.2): a lower LR than pre-training (the report's 3e-5 is a tenth; tiny's 1e-3 a third), 100
# warmup iterations, cosine to a tenth of the peak, no batch ramp. Tiny: 14 (Thinking) to 20 (Instruct)
# minutes on 2 CPU cores. RL needs a model that is sometimes right: the tiny model makes the calculator
# call early but copies the numbers into it wrongly for a long time (Instruct's held-out tool accuracy:
# 9% at 150 steps, 59% at 250), so it runs 250 steps. (Thinking, with its longer answers, may still
# not have learnt it by then: README, Post-training.)
SFT_RUNS = {
    "tiny": Run(batch_size=32, micro_batch=32, steps=250, lr=1e-3, warmup_steps=10, eval_every=50,
                eval_rows=0, ckpt_every=50, ramp_fraction=0.0, eval_tasks=64),
    "small": Run(batch_size=64, micro_batch=16, steps=1000, lr=2e-4, warmup_steps=50, eval_every=250,
                 eval_rows=0, ckpt_every=250, ramp_fraction=0.0, eval_tasks=128),
    # 3 epochs of 119,334 (Instruct) or 425,322 (Thinking) packed sequences, 64 per step.
    "mellum2-12b": Run(batch_size=64, micro_batch=1, steps=5594, lr=3e-5, warmup_steps=100, eval_every=500,
                       eval_rows=0, ckpt_every=500, ramp_fraction=0.0, eval_tasks=256, thinking_steps=19937),
}


# -----------------------------------------------------------------------------------------------
# Long context (§4.1 Layer-Selective YaRN, Fig. 7): the report compares three ways of handling positions
# beyond the pre-training context (selective YaRN, a larger base, unchanged RoPE); we add YaRN everywhere

ROPE_VARIANTS = {
    "selective-yarn": "YaRN on the full-attention layers; sliding layers keep plain RoPE (the report's)",
    "all-yarn": "the same YaRN on every layer",
    "theta": "plain RoPE with a larger base on every layer (theta * s^(d/(d-2)), 'NTK-aware')",
    "unchanged": "plain RoPE as in pre-training",
}


def long_context_config(config, context, yarn_factor=None, variant="selective-yarn"):
    """The config for training at `context` tokens, from a pre-trained one. Sliding layers only ever
    look a window back, a distance they were trained on, which is why the report leaves their RoPE
    alone (selective); the other variants are what it is compared with."""
    original = config.max_seq_len
    yarn_factor = context / original if yarn_factor is None else yarn_factor
    if config.yarn_factor != 1.0:
        raise ValueError("this model's context was extended already (its config has YaRN)")
    if context <= original:
        raise ValueError(f"--context {context} must be longer than the model's pre-training context ({original})")
    if yarn_factor < 1.0:
        raise ValueError(f"--yarn-factor must be at least 1, got {yarn_factor}")
    longer = dataclasses.replace(config, max_seq_len=context)
    if variant == "unchanged":
        return longer
    if variant == "theta":  # stretch the slowest pair's wavelength by exactly the factor
        d = config.head_dim
        return dataclasses.replace(longer, rope_theta=config.rope_theta * yarn_factor ** (d / (d - 2)))
    return dataclasses.replace(longer, yarn_factor=yarn_factor, yarn_original_max_seq_len=original,
                               yarn_layers="full" if variant == "selective-yarn" else "all")


@torch.no_grad()
def long_context_eval(model, corpus, original, device, n_passkeys=8, seed=0):
    """{length: (validation loss, passkey accuracy)} at 1x, 2x, 4x and 8x the pre-training context.
    The loss is on the held-out code (its long files); a passkey counts when greedy decoding would
    write it exactly, i.e. when the argmax at each answer position is the answer's next token."""
    model.eval()
    enc, rng, results = data.load_tokenizer(), random.Random(seed), {}
    for length in (original, 2 * original, 4 * original, 8 * original):
        loss = validation_loss(model, corpus, "code", 1, length, 2, device)
        results[length] = (math.nan if loss is None else loss, passkey_accuracy(model, enc, length, n_passkeys, rng))
    model.train()
    return results


@torch.no_grad()
def passkey_accuracy(model, enc, length, n, rng):
    """The share of n passkeys, hidden at random depths of `length`-token prompts, that greedy
    decoding would write exactly."""
    device, hits = next(model.parameters()).device, 0
    for _ in range(n):
        prompt, answer = data.passkey_example(enc, length, rng.random(), rng.randrange(10000, 100000))
        logits, _ = model(torch.tensor([prompt + answer[:-1]], device=device))
        hits += passkey_correct(logits[0], len(prompt), answer)
    return hits / n


def passkey_correct(logits, prompt_len, answer):
    """logits (T, V) of prompt + answer[:-1]: True iff each answer token is the argmax before it."""
    predicted = logits[prompt_len - 1:prompt_len - 1 + len(answer)].argmax(dim=-1)
    return predicted.tolist() == list(answer)


# -----------------------------------------------------------------------------------------------
# Processes and devices

def launch_ranks():
    """(RANK, LOCAL_RANK) as torchrun sets them, or (0, 0) for a process started on its own."""
    if "RANK" not in os.environ:
        return 0, 0
    try:
        return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError):  # a launcher other than torchrun, or a RANK left in the shell
        raise ValueError(f"RANK is set ({os.environ['RANK']!r}) but RANK and LOCAL_RANK are not both whole "
                         f"numbers, as torchrun sets them: start with torchrun, or unset RANK") from None


def setup_distributed(requested_device):
    """(rank, world_size, device). Under torchrun (which sets RANK / WORLD_SIZE / LOCAL_RANK) join the
    process group: NCCL between GPUs, gloo between CPU processes; otherwise a single process."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(requested_device)
    _, local_rank = launch_ranks()
    device = pick_device(requested_device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


class Stopped(KeyboardInterrupt):
    """A run that stopped on request at a step boundary, having said where its checkpoint is."""


class StopRequest:
    """From its creation until release(), Ctrl-C (SIGINT) or SIGTERM only raises a flag; the loop
    stops at the next step boundary, where model and optimizer are consistent, and writes a
    checkpoint first (see keeps_the_replaced_run for the one exception). A step of a large model or
    an evaluation can take minutes, so the first request says so, and a second one stops at once,
    as an interrupt: what was checkpointed before is kept, the steps since are lost. Released, the
    handlers before are back: an interrupt during the final evaluation ends it at once (the
    checkpoint is written by then)."""

    def __init__(self):
        self.requested = self.by_hand = False
        self.before = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.by_hand = signum == signal.SIGINT  # SIGTERM: a scheduler taking the machine back
        try:  # os.write, not print: the signal may have come in the middle of a print to stderr
            os.write(sys.stderr.fileno(), b"\nstopping after this step, once its checkpoint is written; "
                                          b"Ctrl-C again stops at once, losing the steps since the last one\n")
        except (OSError, ValueError):  # a stderr with no file behind it (a notebook's): the flag is what counts
            pass

    def release(self):
        for sig, handler in self.before.items():
            signal.signal(sig, handler)

    def all_agree(self):  # every process must stop at the same step, or collectives hang
        flag = torch.tensor([float(self.requested)])
        if dist.is_initialized() and dist.get_backend() == "gloo":
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        elif dist.is_initialized():
            flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# -----------------------------------------------------------------------------------------------
# Checkpoints: one file, written to a temporary name and renamed, so a crash never leaves half a file

def tokenizer_reference():
    """The tokenizer a checkpoint was trained with: its file name and content hash."""
    with open(data.TOKENIZER_FILE, "rb") as f:
        return {"file": data.TOKENIZER_FILE.name, "sha256": hashlib.sha256(f.read()).hexdigest()}


def save_checkpoint(path, model, optimizers, step, settings, tokens=0, **extra):
    state = {
        "model": model.state_dict(),
        "optimizers": [opt.state_dict() for opt in optimizers],
        "step": step,  # the next step to run; the data sampler needs nothing else (data.BatchSampler)
        "tokens": tokens,
        "config": dataclasses.asdict(model.config),
        "settings": settings,
        "tokenizer": tokenizer_reference(),
        # Not a GPU's generator: nothing draws from it (the weights are drawn on the CPU), and a run
        # may resume on a machine with fewer GPUs, whose generators would not take one state each.
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        **extra,
    }
    try:
        data.write_atomically(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as e:  # a full disk; torch.save reports it as a RuntimeError
        # whose words ("unexpected pos ...") do not say so: the free space there does.
        try:
            free = f"; {shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20:,.0f} MiB free there"
        except OSError:  # the folder itself has gone
            free = ""
        raise CheckpointError(f"{path}: cannot write the checkpoint ({one_line(e)}{free}); the previous one, if "
                              f"any, is intact") from None


# What save_checkpoint writes that every reader relies on, and its type.
CHECKPOINT_KEYS = {"model": dict, "optimizers": list, "step": int, "config": dict, "settings": dict, "rng": dict}


def one_line(error):
    """An exception as one line of an error message: library messages can span several, and some
    are empty (Python's MemoryError)."""
    words = " ".join(str(error).split())
    return f"{type(error).__name__}: {words}" if words else type(error).__name__


def describe_os_error(error):
    """An OSError as the end of a one-line message: the file it concerns and why, without errno."""
    return f"{error.filename}: {error.strerror}" if error.filename else error.strerror or one_line(error)


def check_stdout_open():
    """Started with its standard output closed (`>&-`), a script would print into nothing and exit 0."""
    if sys.stdout is None:
        raise ValueError("the standard output is closed: there is nowhere to write")


def on_closed_pipe():
    """The reader of our output has gone (`python sample.py | head`): stop quietly, and point stdout
    at nothing so Python's own flush at exit does not raise again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)


def load_checkpoint(path, mmap=False, verify=True):
    """A checkpoint's contents. weights_only: a checkpoint holds tensors, numbers and strings only,
    so loading one cannot run code that came with the file. mmap: map the tensors instead of
    reading them (a 12B run's checkpoint is about 100 GB, most of it the optimizers' state).
    verify: read every part once to check it against the CRC-32 torch.save wrote for it, which
    torch.load does not: a bit flipped on disk would load as a changed weight. A look at the step
    and settings goes without (verify=False)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        with open(path, "rb") as f:
            is_zip = zipfile.is_zipfile(f)  # which would take a file it cannot open for a damaged one
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e.strerror or one_line(e)})") from None
    if not is_zip:  # said plainly: torch.load's own errors for these suggest re-saving the file
        raise CheckpointError(f"{path}: unreadable checkpoint (not a zip archive as torch.save writes: truncated, "
                              f"damaged, or another kind of file)")
    if verify:
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except Exception as e:  # a part whose header is damaged, or a file that cannot be read
            raise CheckpointError(f"{path}: unreadable checkpoint ({one_line(e)})") from None
        if damaged:
            raise CheckpointError(f"{path}: damaged checkpoint (part {damaged} does not match its checksum: the file "
                                  f"changed on disk or in a copy)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: unreadable checkpoint (it holds Python objects besides tensors, numbers "
                              f"and strings: an older train.py's, or not ours; loading those could run code)") from None
    except Exception as e:  # torch.load raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: unreadable checkpoint ({one_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(k), t) for k, t in CHECKPOINT_KEYS.items()):
        raise CheckpointError(f"{path}: not a train.py checkpoint (those hold "
                              f"{', '.join(f'{k} ({t.__name__})' for k, t in CHECKPOINT_KEYS.items())})")
    problem = checkpoint_problem(state)
    if problem:  # an edited file, or another program's: said now, not as a crash after hours of training
        raise CheckpointError(f"{path}: not a train.py checkpoint ({problem})")
    data.load_tokenizer(data.TOKENIZER_FILE)  # a missing or damaged file is named as that, not as a mismatch
    here = tokenizer_reference()
    if state.get("tokenizer", here) != here:  # its ids would mean other text
        raise CheckpointError(f"{path}: trained with another {data.TOKENIZER_FILE.name} than the one here")
    try:
        config = Mellum2Config(**state["config"])
    except (TypeError, ValueError) as e:  # written by another version, or edited
        raise CheckpointError(f"{path}: its config is not one this version reads ({one_line(e)})") from None
    with torch.device("meta"):  # shapes only: checking a 12B checkpoint allocates nothing
        problems = mellum2.state_mismatch(Mellum2(config), state["model"])
    if problems:
        raise CheckpointError(f"{path}: its weights do not fit its config ({problems})")
    return state


# Settings that count something, each a whole number of at least 1 wherever a run has it: a zero
# ckpt_every in an edited checkpoint, found only after the last step, would lose the final checkpoint.
COUNT_SETTINGS = ("steps", "batch_size", "micro_batch", "eval_every", "ckpt_every", "group_size", "prompts",
                  "minibatches")


def checkpoint_problem(state):
    """What in a checkpoint with the right parts is not as save_checkpoint writes it, or None."""
    if not all(isinstance(t, torch.Tensor) for t in state["model"].values()):
        return "weights that are not tensors"
    if not isinstance(state.get("tokens", 0), int):
        return f"a token count of type {type(state['tokens']).__name__}"
    if state.get("tokens", 0) < 0:
        return f"a token count of {state['tokens']}"
    rng = state["rng"]
    try:  # each state as the generator it restores reads it: one of the wrong length or content is refused
        torch.Generator().set_state(rng["torch"])
        random.Random().setstate(rng["python"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        return "random generator states that torch's and Python's generators do not take back"
    schedule = state["settings"].get("run", {})  # a GRPO run keeps its schedule there
    if not isinstance(schedule, dict):
        return f"a GRPO schedule (settings run) of type {type(schedule).__name__}"
    counts = {**schedule, **state["settings"]}
    for key in COUNT_SETTINGS:
        if key in counts and not (type(counts[key]) is int and counts[key] >= 1):
            return f"setting {key} = {counts[key]!r}, where a count of at least 1 belongs"
    for key, (low, high) in SETTING_RANGES.items():
        value = counts.get(key)
        if value is not None and not (type(value) in (int, float) and low <= value <= high):
            return f"setting {key} = {value!r}, where a number from {low:g} to {high:g} belongs"
    if "steps" not in counts:
        return "settings without steps"
    if counts.get("warmup_steps", 0) > counts["steps"]:
        return f"{counts['warmup_steps']} warmup steps in a {counts['steps']}-step run"
    if not 0 <= state["step"] <= counts["steps"]:
        return f"step {state['step']} of a {counts['steps']}-step run"
    stage = state["settings"].get("stage", "pretrain")
    if stage not in START_STAGES:
        return f"stage {stage!r}, none of {', '.join(START_STAGES)}"
    return None


def restore_optimizers(optimizers, state):
    """Each optimizer's state from a checkpoint being resumed; one missing or of another shape would
    make the run go on with fresh moments, no longer exactly as it would have."""
    saved = state["optimizers"]
    if len(saved) != len(optimizers):
        raise CheckpointError(f"the checkpoint holds {len(saved)} optimizer states, this run has {len(optimizers)}")
    for optimizer, optimizer_state in zip(optimizers, saved):
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"the checkpoint's optimizer state does not fit this run ({one_line(e)})") from None


def model_from_checkpoint(state):
    """The model of a checkpoint from load_checkpoint, which made sure its weights fit its config."""
    model = Mellum2(Mellum2Config(**state["config"]))
    model.load_state_dict(state["model"])
    return model


# The settings of the flags a run may go without (None), and the only ones that may be None.
OPTIONAL_SETTINGS = ("init_from", "context", "yarn_factor")


def check_resumable(saved, fresh):
    """A run that continues a checkpoint reads each setting a new run of its kind has, of the kind it
    has there (a whole number may stand for a float): one missing (an edited file, or an earlier
    train.py's from before the setting existed) or of another kind is said now, not found by a crash
    partway through the run."""
    missing = [key for key in fresh if key not in saved]
    if missing:
        raise CheckpointError(f"the checkpoint's settings lack {', '.join(missing)}, which this train.py reads: it "
                              f"was edited, or written by an earlier version; start the run again")
    for key, value in fresh.items():
        kept = saved[key]
        if key in OPTIONAL_SETTINGS and None in (kept, value):  # given to one run and not the other
            continue
        if type(kept) is not type(value) and (type(kept), type(value)) != (int, float):
            raise CheckpointError(f"the checkpoint's setting {key} = {kept!r} is not a {type(value).__name__} as "
                                  f"a run's is: the file was edited; start the run again")


# What the README's quick start trains (python train.py --size tiny), and so the model sample.py,
# evaluate.py and bench.py read unless told otherwise.
QUICK_START_RUN = os.path.join("out", "tiny")


def run_folder(args):
    """--out-dir, else out/SIZE, out/SIZE-long, out/SIZE-sft-VARIANT or out/SIZE-grpo-VARIANT."""
    suffix = {"pretrain": "", "long": "-long", "sft": f"-sft-{args.variant}", "grpo": f"-grpo-{args.variant}"}
    return args.out_dir or os.path.join("out", args.size + suffix[args.stage])


def resumed_run(args, out_dir, say):
    """--resume: the checkpoint to continue. It must be of this stage: the stage decides the data and
    the schedule, so another stage's run cannot be continued as this one."""
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    variants = [os.path.join(out_dir, v, "ckpt.pt") for v in ROPE_VARIANTS]
    if not os.path.exists(ckpt_path) and any(map(os.path.isfile, variants)):
        raise ValueError(f"{out_dir} holds the variants of a --compare run, each in a folder of its own: resume "
                         f"them with --compare")
    state = load_checkpoint(ckpt_path)
    saved = state["settings"].get("stage", "pretrain")
    if saved != args.stage:
        raise ValueError(f"{out_dir} holds a {saved} run: resume it with --stage {saved}")
    for flag, key, kind in (("--variant", "variant", "variant"), ("--rope-variant", "rope_variant", "RoPE variant")):
        saved_value = state["settings"].get(key)  # these decide what the run is: they cannot change midway
        if flag in args.typed_flags and getattr(args, key) != saved_value:
            raise ValueError(f"{out_dir} holds a run of the {saved_value} {kind}: resume it with {flag} {saved_value}")
    say(f"resuming {ckpt_path} at step {state['step']} with the settings it was started with")
    used = {"--resume", "--out-dir", "--stage", "--variant", "--device", "--kernels", "--rope-variant", "--micro-batch",
            "--compare"}
    if "--out-dir" not in args.typed_flags:
        used.add("--size")  # it named the folder, out/SIZE...
    ignored = args.typed_flags - used
    if ignored:
        say(f"note: {', '.join(sorted(ignored))} ignored: a resumed run keeps its own settings")
    return state


def check_out_dir(out_dir, stage):
    """Before a fresh run writes anything: it loses no work, and it can write. An unfinished run in
    the folder is kept for --resume, and so is a finished run of another stage (it may be the model
    this one starts from); a finished run of this stage is replaced: the note to say so, or None."""
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out-dir {out_dir} is a file, not a folder")
    if os.path.exists(ckpt_path) and not os.path.isfile(ckpt_path):
        raise ValueError(f"{ckpt_path} is in the way: the run's checkpoint goes there")
    if os.path.isfile(ckpt_path):
        try:
            state = load_checkpoint(ckpt_path, mmap=True, verify=False)
        except CheckpointError as e:  # neither this run nor --resume can use it; only its owner may drop it
            raise CheckpointError(f"{e}: move it away, or choose another --out-dir") from None
        step, steps = state["step"], state["settings"]["steps"]
        if step < steps:
            raise ValueError(f"{out_dir} holds an unfinished run (step {step} of {steps}): continue it with "
                             f"--resume, or choose another --out-dir")
        finished = state["settings"].get("stage", "pretrain")
        if finished != stage:
            raise ValueError(f"{out_dir} holds a finished --stage {finished} run: choose another --out-dir")
    os.makedirs(out_dir, exist_ok=True)  # now rather than at the first checkpoint: a bad path fails at once
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"--out-dir {out_dir} is not writable")
    return f"note: replacing the finished run in {out_dir}" if os.path.isfile(ckpt_path) else None


# The stages a run folder must have finished to start each stage from it (a Hugging Face directory
# says nothing about its history and is taken as it is).
START_STAGES = {"pretrain": (), "long": ("pretrain",), "sft": ("pretrain", "long"), "grpo": ("sft",)}


def missing_folder(path):
    """The error for a model folder that is not one: a file (the run's ckpt.pt, say), or nothing."""
    if not path:
        return CheckpointError("--init-from needs a folder name")
    if os.path.isfile(path):
        return CheckpointError(f"{path} is a file: give the folder that holds it (a train.py run or a Hugging "
                               f"Face directory)")
    if os.path.normpath(path) == QUICK_START_RUN:  # a first run of the other scripts, before any training
        return CheckpointError(f"{path}: no such folder; python train.py --size tiny trains it")
    return CheckpointError(f"{path}: no such folder")


def not_a_model_folder(path):
    """The error for a folder that holds neither of the two kinds of model. A --compare run's folder
    holds its variants' runs one level down: those are named."""
    runs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "ckpt.pt")))
    held = f"; it holds the runs {', '.join(runs)}: give one, e.g. {os.path.join(path, runs[0])}" if runs else ""
    return CheckpointError(f"{path}: no ckpt.pt (a train.py run) or config.json (a Hugging Face directory){held}")


def init_config(init_from):
    """The config of the model in `init_from` (a run folder or a Hugging Face directory), read
    without loading its weights."""
    if not os.path.isdir(init_from):
        raise missing_folder(init_from)
    if os.path.isfile(os.path.join(init_from, "ckpt.pt")):
        state = load_checkpoint(os.path.join(init_from, "ckpt.pt"), mmap=True, verify=False)
        return Mellum2Config(**state["config"])
    if os.path.isfile(os.path.join(init_from, "tokenizer.json")):  # the released model's, say: another vocabulary
        raise CheckpointError(f"{init_from} brings its own tokenizer.json; train.py trains with this project's")
    if not os.path.isfile(os.path.join(init_from, "config.json")):
        raise not_a_model_folder(init_from)
    return mellum2.read_hf_config(init_from)


def init_model(config, init_from, after=()):
    """A fresh model, or the weights of `init_from`: one of our run folders or a Hugging Face directory
    (its callers have made sure the folder exists). With `after`, a run folder must hold a finished
    run of one of those stages."""
    if init_from is None:
        return Mellum2(config)
    if os.path.isfile(os.path.join(init_from, "ckpt.pt")):
        state = load_checkpoint(os.path.join(init_from, "ckpt.pt"))
        run = state["settings"]
        stage = run.get("stage", "pretrain")
        if after and stage not in after:
            raise ValueError(f"{init_from} holds a --stage {stage} run: start from a --stage "
                             f"{' or '.join(after)} run")
        if after and state["step"] < run["steps"]:
            raise ValueError(f"{init_from} holds an unfinished {stage} run (step {state['step']} of "
                             f"{run['steps']}): finish it with --resume")
        return model_from_checkpoint(state)
    return Mellum2.from_pretrained(init_from, device="cpu", dtype=torch.float32)


# -----------------------------------------------------------------------------------------------
# Logging: one progress line, a JSON-lines metrics file, and per-source validation loss

@torch.no_grad()
def validation_losses(model, corpus, micro_batch, seq_len, rows, device):
    """Mean next-token loss on `rows` sequences of each source's held-out split, micro_batch at a time
    (the MTP head is not scored)."""
    model.eval()
    losses = {source: validation_loss(model, corpus, source, micro_batch, seq_len, rows, device)
              for source in corpus.sources}
    model.train()
    return {source: loss for source, loss in losses.items() if loss is not None}


@torch.no_grad()
def validation_loss(model, corpus, source, batch_size, seq_len, rows, device):
    """Mean next-token loss over the validation rows of one source (a short last batch weighs no more
    than its tokens); None if its split is too short."""
    total, count = 0.0, 0
    for x, y in data.val_batches(corpus, source, batch_size, seq_len, rows):
        logits, _ = model(x.to(device))  # (B, T, V)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        count += y.numel()
    return total / count if count else None


def expert_balance(expert_load):
    """Max over mean expert load, averaged over layers: 1.0 is a perfectly balanced router."""
    return (expert_load.max(dim=-1).values * expert_load.shape[-1]).mean().item()


class Progress:
    """A status line redrawn in place on a terminal; elsewhere (logs, CI) a plain line now and then."""

    def __init__(self, total_steps, enabled):
        self.total, self.enabled, self.tty = total_steps, enabled, sys.stderr.isatty()
        self.last_print = 0.0

    def update(self, step, text, eta_seconds):
        if not self.enabled:
            return
        bar = "#" * (20 * (step + 1) // self.total)
        line = f"[{bar:<20}] {step + 1}/{self.total} {text} eta {eta_seconds / 60:.1f}m"
        if self.tty:
            print("\r" + line[:200], end="", file=sys.stderr, flush=True)
        elif time.time() - self.last_print > 10 or step + 1 == self.total:
            print(line, file=sys.stderr, flush=True)
            self.last_print = time.time()

    def message(self, text):  # a line of its own, above the status line
        if self.enabled:
            print(("\r\033[K" if self.tty else "") + text, file=sys.stderr, flush=True)


class MetricsLog:
    """A run folder's metrics.jsonl, one JSON line per step, kept in step with its checkpoint.

    A resumed run drops the lines after its checkpoint's step: it logs those steps again. A fresh run
    (step 0) starts the file anew, a crashed start's step-0 evaluation included, except when it
    replaces a finished run: then that run's lines stay until the new run's first checkpoint
    replaces the model, so that a run which fails before then leaves the folder as it found it, not
    one run's model beside another's log. The file is rewritten atomically: a crash while it is
    being trimmed leaves it whole."""

    def __init__(self, path, step, replacing=False):
        self.path = path
        self.waiting = [] if replacing else None  # lines held back until the first checkpoint
        if not replacing and os.path.exists(path):  # else the first record makes the file
            kept = []
            if step:  # resumed: the lines up to its checkpoint
                kept = [line for line, record in metrics_lines(path) if record["step"] <= step]
            self._replace_with(kept)

    def _replace_with(self, lines):
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:  # as metrics_lines reads: a kept line may hold a replaced byte
                f.writelines(lines)
        data.write_atomically(self.path, write)

    def append(self, record):
        if self.waiting is not None:
            self.waiting.append(record)
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint_written(self):
        """The run's checkpoint has just been written: from now on the file is this run's."""
        if self.waiting is None:
            return
        self._replace_with(json.dumps(record) + "\n" for record in self.waiting)
        self.waiting = None


def keeps_the_replaced_run(log, by_hand, step, steps, ckpt_every):
    """Whether a run stopped by hand (Ctrl-C) at `step` writes no checkpoint: it is replacing a
    finished run and has not reached its first one. The finished model outlives a replacement
    stopped early, perhaps by someone who read the note that it was being replaced. SIGTERM (a
    scheduler's pre-emption) still saves: that run is meant to go on with --resume."""
    return by_hand and log.waiting is not None and step % ckpt_every != 0 and step != steps


def stopped_message(step, out_dir, kept_replaced):
    if kept_replaced:
        return f"stopped at step {step}, before this run's first checkpoint: {out_dir} keeps the finished run"
    return f"stopped at step {step}; checkpoint {os.path.join(out_dir, 'ckpt.pt')}; continue with --resume"


def parsed_jsonl(line):
    """One metrics record, or None for a line that is not one: cut short by a crash in the middle
    of writing it, or edited."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def metrics_lines(path):
    """(line, record) of each line of a metrics.jsonl that holds a record, in order. It is read as
    UTF-8 on every system, as it is written; a byte that is not (an edit) spoils its own line only."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [(line, record) for line in f if (record := parsed_jsonl(line))]


# -----------------------------------------------------------------------------------------------
# The training step and the loop

class NonFiniteLoss(Exception):
    pass


def clip_finite_grad_norm(model, grad_clip):
    """Clip the gradient to norm grad_clip and return the norm before; a non-finite norm (a finite
    loss can still overflow its gradient, under a huge --lr) stops the run before the step is taken."""
    norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not torch.isfinite(norm):
        raise NonFiniteLoss(f"gradient norm {norm.item():.4g}")
    return norm


def train_step(model, x, y, micro_batch, optimizers, autocast, grad_clip=1.0):
    """One optimizer step on the rows (x, y) this process holds. Micro-batches accumulate gradients,
    each weighted by its share of the targets, so the next-token loss is the mean over all targets
    at once even when SFT rows hold different numbers of them (pre-training rows are all targets);
    under DDP the gradients are averaged across processes during the last micro-batch's backward,
    so a share there is of the mean count per process, and a target weighs the same on every one.
    Returns the loss parts (weighted alike, averaged over processes) with the step's expert balance,
    and the gradient norm before clipping. SFT's right padding is passed to the model, which leaves
    it out of the routing losses and the expert load."""
    raw = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    device = next(raw.parameters()).device
    # x and y arrive on the CPU: counting targets and padding there costs a GPU no synchronisation.
    starts = range(0, len(x), micro_batch)
    targets, routed = y != mellum2.IGNORE_INDEX, x != data.PAD
    n_targets, n_routed = targets.sum().item(), routed.sum().item()
    if dist.is_initialized():
        count = torch.tensor(float(n_targets), dtype=torch.float64, device=device)
        dist.all_reduce(count)
        n_targets = count.item() / dist.get_world_size()
    parts, load = {}, 0.0
    for i, start in enumerate(starts):
        last = i == len(starts) - 1
        sync = contextlib.nullcontext() if last or raw is model else model.no_sync()
        xm, ym = x[start:start + micro_batch], y[start:start + micro_batch]
        share = targets[start:start + micro_batch].sum().item() / n_targets
        pad = xm == data.PAD
        with sync, autocast:
            _, loss = model(xm.to(device), ym.to(device), pad=pad.to(device) if pad.any() else None)
            (loss * share).backward()
        for k, v in raw.loss_parts.items():
            if k != "expert_load":
                parts[k] = parts.get(k, 0.0) + v.float() * share
        # Each expert's share of the step's routing slots, (n_layer, E): the micro-batch's, by its share
        # of the tokens routed. (The last micro-batch's alone, 2 of the 12B recipe's 4096 rows, would
        # read as far less balanced than the step is.)
        load = load + raw.loss_parts["expert_load"] * (routed[start:start + micro_batch].sum().item() / n_routed)
    stacked = torch.stack(list(parts.values()))
    if dist.is_initialized():
        dist.all_reduce(stacked, op=dist.ReduceOp.AVG)
        dist.all_reduce(load, op=dist.ReduceOp.AVG)
    if not torch.isfinite(stacked).all():
        raise NonFiniteLoss(", ".join(f"{k} {v:.4g}" for k, v in zip(parts, stacked.tolist())))
    grad_norm = clip_finite_grad_norm(raw, grad_clip)
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return {**dict(zip(parts, stacked.tolist())), "expert_balance": expert_balance(load)}, grad_norm.item()


def preset_steps(run, args):
    """The run's length in its preset: the Thinking variant's own where it has one."""
    return run.thinking_steps if args.variant == "thinking" and run.thinking_steps else run.steps


def given(flag, default):
    """A flag's value, or the default when it was not given (0 is a value, not "unset")."""
    return default if flag is None else flag


def long_context(settings, config):
    """The long stage's sequence length: --context, else the size's multiple of the pre-trained one."""
    return given(settings["context"], LONG_RUNS[settings["size"]].context_factor * config.max_seq_len)


def run_settings(args):
    """A new pre-training, long-context or SFT run's settings: its size's preset for the stage, and the
    flags. They are saved with each checkpoint, and a resumed run takes them from there."""
    run = {"long": LONG_RUNS, "sft": SFT_RUNS}.get(args.stage, RUNS)[args.size]
    batch_size, steps = given(args.batch_size, run.batch_size), given(args.max_steps, preset_steps(run, args))
    return dict(size=args.size, seed=args.seed, steps=steps,
                batch_size=batch_size, micro_batch=given(args.micro_batch, min(run.micro_batch, batch_size)),
                lr=given(args.lr, run.lr), warmup_steps=warmup_within(run.warmup_steps, steps),
                decay_fraction=run.decay_fraction,
                ramp_fraction=run.ramp_fraction, eval_every=run.eval_every, eval_rows=run.eval_rows,
                ckpt_every=run.ckpt_every, optimizer=args.optimizer, mtp=not args.no_mtp, fp8=args.fp8,
                aux_coef=given(args.aux_coef, 1e-4 if args.stage == "sft" else 1e-3), eval_tasks=run.eval_tasks,
                dense=args.dense,
                data=list(args.data), default_data=not args.no_default_data,
                allow_over_repetition=args.allow_over_repetition,
                init_from=args.init_from, stage=args.stage, context=args.context,
                yarn_factor=args.yarn_factor, rope_variant=args.rope_variant, variant=args.variant)


def train(args, stop_after=None, settings_of=None):
    """The whole run. stop_after=N stops once step N is done, checkpointed as Ctrl-C leaves a run, and
    returns the model (tests use it; at the last step, before the summary). settings_of: the
    settings of another run to start this one with (--compare --resume: a variant not begun yet
    takes those of the ones that were, whatever flags the resuming command gives but --micro-batch)."""
    rank, world, device = setup_distributed(args.device)
    if not args.data_report:  # a mode this machine cannot run stops here, before any work
        kernels.resolve_mode(args.kernels, device)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    sft = args.stage == "sft"
    out_dir = run_folder(args)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")

    # 1. Settings: the size's defaults and the flags, or exactly those of the run being resumed.
    resumed = resumed_run(args, out_dir, say) if args.resume else None
    if resumed or settings_of:
        settings = resumed["settings"] if resumed else {**settings_of, "rope_variant": args.rope_variant}
        # An earlier version's run: from before the dense baseline, and validated in batches of micro_batch.
        settings.setdefault("dense", False)
        if "eval_rows" not in settings and {"eval_batches", "micro_batch"} <= settings.keys():
            settings["eval_rows"] = settings.pop("eval_batches") * settings["micro_batch"]
        check_resumable(settings, run_settings(args))
        # Taken: it changes how a step is split, not what it computes (up to rounding and the balance
        # loss, taken per micro-batch), and it is how a run that ran out of memory goes on.
        if args.micro_batch is not None:
            settings["micro_batch"] = args.micro_batch
    else:
        settings = run_settings(args)
    s = settings
    check_settings(s, world)
    # The folder is checked before any work (the data report writes none); that the run replaces a
    # finished one is said once nothing can refuse the run any more (the model it starts from, say).
    replacing_note = check_out_dir(out_dir, s["stage"]) if not resumed and not args.data_report else None

    # 2. Data. Process 0 builds the token caches; the others wait, then read them. (SFT makes its own.)
    corpus = None
    if not sft:
        if not master:
            dist.barrier()
        corpus = data.build_corpus(s["data"], progress=master, default_sources=s["default_data"])
        if master and world > 1:
            dist.barrier()
        if resumed and resumed.get("corpus", corpus.folder.name) != corpus.folder.name:
            say("note: the data changed since this run started (--data folders, or the installed packages the "
                "built-in corpus reads): it continues on the new data, not as it would have")
    # 3. The model, fresh, from --init-from weights, or restored; its context sets the sequence length.
    if resumed:
        config = Mellum2Config(**resumed["config"])
    elif s["init_from"]:  # the shape of the model it starts from (its weights are loaded below)
        config = init_config(s["init_from"])
    else:
        config = Mellum2Config.from_preset(s["size"], n_mtp=1 if s["mtp"] else 0, aux_loss_coef=s["aux_coef"])
        if s["dense"]:
            config = mellum2.dense_config(config)
    # The long-context stage trains on the phase-3 mix (§4.2 starts from it); SFT on demonstrations.
    only_phase = len(data.PHASES) - 1 if s["stage"] == "long" else None
    if args.data_report:  # before building the model: the report needs none (and 12B would not fit)
        seq_len = config.max_seq_len
        if s["stage"] == "long" and not resumed:  # the context the run would train at, refused as it would be
            seq_len = long_context_config(config, long_context(s, config), s["yarn_factor"],
                                          s["rope_variant"]).max_seq_len
        data.data_report(corpus, s["steps"] * s["batch_size"] * seq_len, phase=only_phase)
        return None
    if config.vocab_size != data.VOCAB_SIZE:  # before a model is built (the released shape: 48 GB in fp32)
        what = f"--size {s['size']}" if not (resumed or s["init_from"]) else "the model"
        raise CheckpointError(f"{what} has a {config.vocab_size}-token vocabulary, and train.py trains with this "
                              f"project's {data.VOCAB_SIZE}-token tokenizer")
    check_memory(config, device)
    torch.manual_seed(s["seed"])
    raw = model_from_checkpoint(resumed) if resumed else init_model(config, s["init_from"], START_STAGES[s["stage"]])
    if s["stage"] == "long" and not resumed:  # same weights, longer context, new RoPE for the far positions
        pretrained = raw
        raw = Mellum2(long_context_config(pretrained.config, long_context(s, pretrained.config),
                                          s["yarn_factor"], s["rope_variant"]))
        raw.load_state_dict(pretrained.state_dict())
        s["original_context"] = pretrained.config.max_seq_len
    # The run's balance-loss coefficient, not that of the weights it starts from (§5.1.2: SFT's is a
    # tenth of pre-training's; --aux-coef sets it for any stage this function runs).
    raw.config = dataclasses.replace(raw.config, aux_loss_coef=s["aux_coef"])
    config = raw.config
    seq_len = config.max_seq_len
    token_budget = s["steps"] * s["batch_size"] * seq_len
    # A step's rows are drawn whole on the CPU, inputs and targets of 8-byte token ids.
    check_fits(16 * s["batch_size"] * seq_len, f"--batch-size {s['batch_size']}: the token ids of a step")
    if sft:
        sampler = tasks.SFTSampler(s["variant"], s["seed"], s["batch_size"], seq_len)
    else:
        sampler = data.BatchSampler(corpus, s["seed"], s["batch_size"], seq_len, s["steps"], s["allow_over_repetition"],
                                    phase=only_phase)

    # 4. Optimizers, fresh or restored.
    raw.to(device)
    if s["fp8"]:
        convert_to_fp8(raw)
    kernel_mode = kernels.install(raw, args.kernels)  # Triton on CUDA when available (kernels.py)
    model = nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else raw
    optimizers = build_optimizers(raw, s["lr"], optimizer=s["optimizer"])
    start_step = 0
    if resumed:
        restore_optimizers(optimizers, resumed)
        # Nothing here draws from the global generators after initialisation (the data, the tasks and
        # the rollouts have seeded generators of their own); restored all the same, so that a change
        # that does (dropout, say) still resumes exactly.
        rng = resumed["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        start_step = resumed["step"]
    # Master weights stay fp32; on GPUs with bf16 the matmuls run in bf16 under autocast (§3.4.4).
    use_bf16 = pick_dtype(device) == torch.bfloat16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    # 5. Say what will happen: every number this run uses.
    if master:
        say(f"device {device} x {world} process(es), {'bf16 autocast' if use_bf16 else 'fp32'}"
            f"{', FP8 matmuls' if s['fp8'] else ''}, {kernel_mode} kernels")
        say("model  " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items()))
        say(f"params {raw.num_params() / 1e6:.2f}M total, {raw.num_params(active=True) / 1e6:.2f}M active, "
            f"{raw.num_params(include_mtp=True) - raw.num_params():,} in the MTP layer")
        say("run    " + ", ".join(f"{k}={v}" for k, v in s.items()))
        if sft:
            say(f"data   {s['steps']} steps x {s['batch_size']} {s['variant']} samples of at most {seq_len} tokens, "
                f"generated from the task suites {', '.join(tasks.SUITES)}")
        else:
            batches = [batch_size_at(i, s["steps"], s["batch_size"], s["ramp_fraction"]) for i in range(s["steps"])]
            ramp_steps = sum(batch < s["batch_size"] for batch in batches)
            # The sampler draws whole batches while the ramp trains on their first half, so the data
            # plan (and its repetition) covers a little more than the run trains on.
            say(f"tokens {seq_len * sum(batches):,} to train ({s['steps']} steps x {s['batch_size']} x {seq_len}"
                + (f", half batch for the first {ramp_steps}" if ramp_steps else "")
                + f"); the data plan covers {token_budget:,}")
            for source, r in data.planned_repetition(corpus, token_budget, only_phase).items():
                say(f"       {source}: {len(corpus.train[source].tokens):,} training tokens, "
                    f"planned repetition {r:.2f}x")
            if corpus.skipped:  # an empty --data folder would otherwise go unnoticed
                say(f"       skipped in --data: {data.describe_skipped(corpus.skipped)}")
    if master:  # a checkpoint at a fresh start is the finished run this one replaces (check_out_dir)
        if replacing_note:
            say(replacing_note)
        log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), start_step, replacing=replacing_note is not None)

    # 6. The loop.
    progress = Progress(s["steps"], master)
    tokens_seen = resumed.get("tokens", 0) if resumed else 0
    t_start, tokens_at_start, val = time.time(), tokens_seen, {}
    step = start_step
    if sft and not resumed:  # where SFT starts from: the pre-trained model's held-out accuracy
        val = evaluate_tasks(raw, s["eval_tasks"], MAX_ANSWER_TOKENS[s["variant"]])
        progress.message("before SFT: " + describe_eval(val, "sft"))
        if master:
            log.append({"step": 0, "val": val})
    stop = StopRequest()
    try:
        while step < s["steps"]:
            if sft:
                lr = s["lr"] * cosine_multiplier(step, s["steps"], s["warmup_steps"])
            else:
                lr = s["lr"] * lr_multiplier(step, s["steps"], s["warmup_steps"], s["decay_fraction"])
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr
            batch = batch_size_at(step, s["steps"], s["batch_size"], s["ramp_fraction"])
            x, y = sampler.get_batch(step)
            # This process's rows: a contiguous block, so that its micro-batches are exactly micro-batches
            # of a single-process run (the balance loss depends on which rows share a micro-batch).
            rows = slice(rank * batch // world, (rank + 1) * batch // world)
            x, y = x[:batch][rows], y[:batch][rows]
            parts, grad_norm = train_step(model, x, y, s["micro_batch"], optimizers, autocast)
            step += 1
            tokens_seen += batch * x.shape[1]
            balance = parts.pop("expert_balance")
            elapsed = time.time() - t_start
            speed = (tokens_seen - tokens_at_start) / elapsed
            phase = s["variant"] if sft else sampler.phase_at(step - 1).name
            record = dict(step=step, tokens=tokens_seen, lr=lr, grad_norm=grad_norm, expert_balance=balance,
                          phase=phase, tokens_per_s=speed, **parts)
            if step % s["eval_every"] == 0 or step == s["steps"]:
                if sft:
                    val = evaluate_tasks(raw, s["eval_tasks"], MAX_ANSWER_TOKENS[s["variant"]])
                else:
                    val = validation_losses(raw, corpus, s["micro_batch"], seq_len, s["eval_rows"], device)
                record["val"] = val
                progress.message(f"step {step}: " + describe_eval(val, s["stage"]))
            if master:
                log.append(record)
            progress.update(step - 1, f"loss {parts['ntp']:.3f} mtp {parts.get('mtp', 0):.3f} aux {parts['aux']:.3f} "
                            f"z {parts['z']:.2f} | lr {lr:.2e} | {phase} | load max/mean {balance:.2f} | "
                            f"{speed:,.0f} tok/s", elapsed / (step - start_step) * (s["steps"] - step))
            interrupted = stop.all_agree() and step < s["steps"]  # in the last step: the run is done anyway
            stopping = interrupted or step == stop_after
            by_hand = (interrupted and stop.by_hand) or step == stop_after
            keep_replaced = master and keeps_the_replaced_run(log, by_hand, step, s["steps"], s["ckpt_every"])
            if master and (step % s["ckpt_every"] == 0 or step == s["steps"] or stopping) and not keep_replaced:
                save_checkpoint(ckpt_path, raw, optimizers, step, s, tokens=tokens_seen,
                                corpus=corpus.folder.name if corpus else None)
                log.checkpoint_written()
            if stopping:
                progress.message(stopped_message(step, out_dir, keep_replaced))
                if interrupted:
                    raise Stopped
                return raw
    except NonFiniteLoss as e:
        if master and log.waiting is not None:
            kept = f"the finished run in {out_dir} it would have replaced is kept as it was"
        elif os.path.isfile(ckpt_path):
            kept = f"the last good checkpoint in {out_dir} is kept"
        else:
            kept = "no checkpoint was written"
        raise NonFiniteLoss(f"non-finite loss at step {step + 1} ({e}); stopped, {kept}") from None
    finally:
        stop.release()

    # 7. Summary.
    # --resume of a finished run: it gave its summary when it finished, unless it is a long-context
    # run stopped during its final evaluation, which then evaluates.
    trained_now = step > start_step
    if not trained_now and (s["stage"] != "long" or last_long_context_eval(out_dir) is not None):
        say(f"the run in {out_dir} had finished all {step} steps: nothing to do")
        return raw
    if trained_now:
        elapsed = time.time() - t_start
        say(f"\ndone: {step} steps, {tokens_seen:,} tokens, {elapsed:.0f} s, "
            f"{(tokens_seen - tokens_at_start) / elapsed:,.0f} tokens/s")
        say(describe_eval(val, s["stage"]))
    if s["stage"] == "long":
        results = long_context_eval(raw, corpus, s["original_context"], device)
        say(f"long context ({s['rope_variant']}): " + ", ".join(
            f"{length} tokens loss {loss:.3f} passkey {acc:.0%}" for length, (loss, acc) in results.items()))
        if master:
            log.append({"step": step, "long_context_eval": results})
    say(f"checkpoint: {ckpt_path}")
    return raw


def compare_rope_variants(args):
    """--stage long --compare: every RoPE variant trained from the same checkpoint on the same tokens,
    then one table, a miniature of the report's Fig. 7."""
    base_dir = run_folder(args)
    checkpoints = [os.path.join(base_dir, v, "ckpt.pt") for v in ROPE_VARIANTS]
    begun = [path for path in checkpoints if os.path.isfile(path)] if args.resume else []
    if args.resume and not begun:
        raise ValueError(f"{base_dir}: no --compare run to resume there (its variants' folders hold no checkpoint)")
    # The variants not begun yet start with the settings of those that were, so that all of them
    # train on the same tokens for the same steps, whatever flags the resuming command gives.
    settings = load_checkpoint(begun[0], mmap=True, verify=False)["settings"] if begun else None
    if not args.resume:  # all refusals first: an unfinished last variant would stop the loop after the others ran
        for path in checkpoints:
            check_out_dir(os.path.dirname(path), args.stage)  # train() says its notes
    start = time.time()
    for variant, path in zip(ROPE_VARIANTS, checkpoints):
        train(argparse.Namespace(**{**vars(args), "rope_variant": variant, "out_dir": os.path.dirname(path),
                                    "compare": False, "resume": path in begun}), settings_of=settings)
    table = rope_comparison(base_dir)
    lengths = list(next(iter(table.values())))
    print(f"\nlong-context comparison, {time.time() - start:.0f} s: validation loss (code) / passkey accuracy")
    print(f"{'variant':<16}" + "".join(f"{f'{length} tokens':>22}" for length in lengths))
    for variant, results in table.items():
        print(f"{variant:<16}" + "".join(f"{results[n][0]:>15.3f} / {results[n][1]:>4.0%}" for n in lengths))
    return table


def rope_comparison(base_dir):
    """{variant: {context length: (validation loss, passkey accuracy)}} of the variants trained under
    a --compare folder, from the last long-context evaluation in each one's metrics (a variant still
    training has none yet and is left out)."""
    table = {}
    for variant in ROPE_VARIANTS:
        evaluation = last_long_context_eval(os.path.join(base_dir, variant))
        if evaluation is not None:
            table[variant] = {int(n): tuple(v) for n, v in evaluation.items()}
    return table


def last_long_context_eval(run_dir):
    """The last long-context evaluation ({length: [loss, passkey accuracy]}) in a run folder's
    metrics, or None: none yet, or no such run."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    evaluations = [r["long_context_eval"] for _, r in metrics_lines(path) if "long_context_eval" in r]
    return evaluations[-1] if evaluations else None


# -----------------------------------------------------------------------------------------------
# Post-training (§5). SFT (§5.1) is a stage of train() above: the same loop on tasks.SFTSampler's
# masked demonstrations. What follows is shared by SFT and RL (rollouts and held-out scores), then
# the RL stage (§5.2): GRPO with the report's four changes, its reward shaping, and the asynchronous
# rollout worker.

# Length caps of an answer, all turns together: ours need at most about 55 tokens (Instruct) and 100
# (Thinking), before the cap's last quarter, where the overlong penalty starts; the report's RL
# sequences, prompt and answer together, run to 16384 and 40960 tokens (Table 8).
MAX_ANSWER_TOKENS = {"instruct": 96, "thinking": 192}
MAX_TURNS = 3   # model turns: up to two tool calls, each answered, then the reply (the report allows 10)


@dataclasses.dataclass
class Rollout:
    task: tasks.Task
    prompt: list                                  # the chat up to and including <|assistant|>
    ids: list = dataclasses.field(default_factory=list)      # everything after the prompt
    written: list = dataclasses.field(default_factory=list)  # 1 where the model wrote ids[t]; 0 for a tool's reply
    logp: list = dataclasses.field(default_factory=list)     # the rollout engine's log-prob of each written token
    finished: bool = False    # the final turn ended within the token cap
    answer: str = ""          # the final turn's text, which the verifier reads
    reward: float = None      # the verifier's score; None when our side failed to score it
    shaped: float = None      # after the overlong and concision shaping: what the advantage uses
    reflections: int = 0      # reflection words in all the model wrote, every turn and <think> block


def rollout(model, enc, task_list, max_tokens, temperature=1.0, seed=None):
    """Answer every task, turn by turn: each turn is one batched sample.generate call over the rows
    still talking; a turn that calls the tool gets the tool's reply appended and goes on. A row that
    exhausts max_tokens (written tokens, all turns together) stays unfinished."""
    import sample  # sample.py imports this file, so it cannot be imported at the top
    end = data.SPECIAL_TOKENS["<|end|>"]
    rows = [Rollout(t, data.render_chat(enc, [{"role": "user", "content": t.prompt}])) for t in task_list]
    active = rows
    for turn in range(MAX_TURNS):
        if not active:  # every row has finished or stopped (or there were no tasks)
            break
        budget = [max_tokens - sum(r.written) for r in active]
        written = [0] * len(active)

        def at_budget(row, token):
            written[row] += 1
            return written[row] >= budget[row]

        logprobs = []
        new = sample.generate(model, [r.prompt + r.ids for r in active], max(budget), temperature,
                              stop_ids={end, data.EOT}, seed=None if seed is None else seed * MAX_TURNS + turn,
                              on_token=at_budget, logprobs=logprobs)
        talking = []
        for r, ids, lps in zip(active, new, logprobs):
            r.ids, r.written, r.logp = r.ids + ids, r.written + [1] * len(ids), r.logp + lps
            # Counted in the reasoning and the calls too: else a "wait" moved into <think> tags or before
            # a tool call would slip past the concision penalty.
            r.reflections += tasks.reflection_words_written(enc, ids)
            if not ids or ids[-1] not in (end, data.EOT):
                continue   # cut off by the cap (or the context): unfinished
            said = tasks.parse_turn(enc, ids[:-1])
            if said.tool_call is not None and sum(r.written) >= max_tokens:
                continue   # a call that reaches the cap leaves no room for an answer: unfinished too
            if said.tool_call is not None and turn + 1 < MAX_TURNS:
                reply = tasks.tool_reply(enc, said.tool_call)
                r.ids, r.written = r.ids + reply, r.written + [0] * len(reply)
                if len(r.prompt) + len(r.ids) < model.config.max_seq_len:   # else: out of context, unfinished
                    talking.append(r)
            else:
                r.finished, r.answer = True, said.content
        active = talking
    return rows


def score(rollouts, verifier):
    """Fill in each rollout's reward; an unfinished one scores 0 without being checked."""
    finished = [r for r in rollouts if r.finished]
    for r, value in zip(finished, verifier.score_all([(r.task, r.answer) for r in finished])):
        r.reward = value
    for r in rollouts:
        if not r.finished:
            r.reward = 0.0


@torch.no_grad()
def evaluate_tasks(model, n_per_suite, max_tokens, seed=0):
    """Greedy held-out accuracy per suite (a task counts when its verifier gives full marks), plus
    the reflection words per rollout, reasoning and calls included (what the concision penalty counts)."""
    was_training = model.training
    model.eval()
    task_list = [task for suite in tasks.SUITES for task in tasks.eval_tasks(suite, n_per_suite, seed)]
    rows = rollout(model, data.load_tokenizer(), task_list, max_tokens, temperature=0.0)
    with tasks.Verifier() as verifier:
        score(rows, verifier)
    model.train(was_training)
    result = {}
    for suite in tasks.SUITES:  # over the answers scored: None is our verifier failing, not a wrong answer
        rewards = [r.reward for r in rows if r.task.suite == suite and r.reward is not None]
        result[suite] = sum(reward == 1.0 for reward in rewards) / len(rewards) if rewards else math.nan
    result["reflection_words"] = sum(r.reflections for r in rows) / len(rows) if rows else math.nan
    return result


def describe_eval(val, stage):
    if stage in ("sft", "grpo"):
        accuracy = ", ".join(f"{k} unscored" if math.isnan(val[k]) else f"{k} {val[k]:.0%}" for k in tasks.SUITES)
        return f"held-out accuracy {accuracy} | reflection words per answer {val['reflection_words']:.2f}"
    if not val:  # every source's documents went to training (a one-file --data folder, say)
        return "validation loss: no held-out text"
    return "validation loss " + ", ".join(f"{k} {v:.3f}" for k, v in val.items())


# --- The GRPO objective (§5.2.3 RL algorithm) ----------------------------------------------------
#   L = -(1/N_tok) sum_{i,t} M(rho_it) * min(r_it A_i, clip(r_it, 1 - 0.2, 1 + 0.28) A_i)
#   A_i    = R_i - mean of the other G-1 rewards of its group   (leave-one-out, no std: Dr. GRPO)
#   r_it   = pi_train(theta) / pi_train(theta_old)              (the PPO ratio; clip-higher: DAPO)
#   rho_it = pi_train(theta_old) / pi_infer(theta_old)          (trainer vs rollout engine)
#   M(rho) = rho inside [0.5, 5], else 0                        (IcePop: drop the token, don't clip)
#   N_tok  = every valid generated token of the mini-batch      (token-level: DAPO); no KL term

CLIP_LOW, CLIP_HIGH = 0.2, 0.28
ICEPOP_BAND = (0.5, 5.0)


def leave_one_out_advantages(rewards):
    """(groups, G) rewards -> (groups, G) advantages, each reward minus the mean of the others."""
    G = rewards.shape[-1]
    return rewards - (rewards.sum(dim=-1, keepdim=True) - rewards) / (G - 1)


def icepop_weight(rho, band=ICEPOP_BAND):
    """The per-token IcePop weight: rho itself where it lies in the band, 0 outside (never clipped)."""
    return torch.where((rho >= band[0]) & (rho <= band[1]), rho, torch.zeros_like(rho))


def grpo_loss(logp, logp_old, logp_infer, advantages, mask, n_tokens):
    """logp / logp_old / logp_infer (N, T): each sampled token's log-prob under the policy being
    trained, the trainer before this update, and the rollout engine; advantages (N,); mask (N, T)
    1 on valid generated tokens. n_tokens: valid tokens of the optimizer step's whole mini-batch (the
    normaliser, also when the mini-batch is split into micro-batches). Returns the loss and its statistics."""
    ratio = (logp - logp_old).exp()
    weight = icepop_weight((logp_old - logp_infer).exp()).detach()
    A = advantages[:, None]
    surrogate = torch.minimum(ratio * A, ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH) * A)
    loss = -(weight * surrogate * mask).sum() / n_tokens
    with torch.no_grad():
        clipped = ((ratio < 1 - CLIP_LOW) | (ratio > 1 + CLIP_HIGH)) & (mask > 0)
        stats = {"icepop_masked": ((weight == 0) & (mask > 0)).sum().item(), "clipped": clipped.sum().item(),
                 "abs_log_rho": ((logp_old - logp_infer).abs() * mask).sum().item()}
    return loss, stats


# --- Reward shaping (§5.2.3) ---------------------------------------------------------------------

OVERLONG_BUFFER = 0.25   # the last quarter of the cap (DAPO used a fifth, 4096 of 20480); the report gives none
OVERLONG_FLOOR = 0.0     # the reward at the cap; the report's floor is not published


def overlong_shaped(reward, length, cap, buffer_fraction=OVERLONG_BUFFER, floor=OVERLONG_FLOOR):
    """The report's soft overlong penalty: inside the buffer below the cap the reward slides linearly
    from its raw value (at the buffer's start) to the floor (at the cap). A rollout cut off at the
    cap scored 0 unchecked, the floor: its tokens are left out of the loss (grpo_tensors), but its
    reward still counts in its group's baseline, as a failure."""
    start = cap - buffer_fraction * cap
    if length <= start:
        return reward
    return reward + (floor - reward) * (length - start) / (cap - start)


# The concision penalty's three tiers: our choice, the report does not publish them.
CONCISION_TIERS = ((0, 1.0), (2, 0.9), (5, 0.7), (math.inf, 0.5))   # (up to n reflection words, multiplier)


def concision_multiplier(n_words):
    """The concision penalty: a correct Instruct answer's reward is multiplied by a factor that
    shrinks with its count of reflection words ("wait", "actually", ...), in three tiers."""
    return next(multiplier for most, multiplier in CONCISION_TIERS if n_words <= most)


def shape_rewards(rollouts, variant, cap, concision=True):
    for r in rollouts:
        if r.reward is None:
            continue
        shaped = overlong_shaped(r.reward, sum(r.written), cap)
        # Correct answers only (a partly right program keeps its share), and Instruct only: Thinking
        # answers may reflect, that is their reasoning.
        if concision and variant == "instruct" and r.reward == 1.0:
            shaped *= concision_multiplier(r.reflections)
        r.shaped = shaped


def usable_groups(rollouts, group_size, wanted):
    """Dynamic sampling: split into groups of one prompt's G answers, drop groups whose shaped rewards
    are all equal (their advantages are all 0) and keep at most `wanted`. A rollout our verifier
    could not score takes its whole group out (it is neither right nor wrong, so the others' baseline
    would be wrong)."""
    groups = [rollouts[i:i + group_size] for i in range(0, len(rollouts), group_size)]
    kept = [g for g in groups if all(r.shaped is not None for r in g) and len({r.shaped for r in g}) > 1]
    return kept[:wanted], len(groups)


def token_logprobs(model, x, targets):
    """x, targets (N, T) -> (N, T) log-prob of each target under the model (next-token head only:
    RL here trains without the MTP and balance losses, which score no answer)."""
    logits, _ = model(x)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]


def grpo_tensors(groups, pad_id):
    """Groups of rollouts -> x, targets, mask, logp_infer (N, T) and advantages (N,). A position is
    trained when the model wrote its target token and the rollout finished within the cap."""
    rows = [r for g in groups for r in g]
    advantages = leave_one_out_advantages(torch.tensor([[r.shaped for r in g] for g in groups])).flatten()
    T = max(len(r.prompt) + len(r.ids) for r in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask, logp_infer = torch.zeros(len(rows), T), torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        ids = torch.tensor(r.prompt + r.ids)
        x[i, :len(ids) - 1], targets[i, :len(ids) - 1] = ids[:-1], ids[1:]
        written = torch.tensor(r.written, dtype=torch.bool)
        positions = torch.arange(len(r.prompt) - 1, len(ids) - 1)[written]
        mask[i, positions] = float(r.finished)
        logp_infer[i, positions] = torch.tensor(r.logp)
    return x, targets, mask, logp_infer, advantages


def grpo_update(model, optimizers, groups, minibatches=2, micro_batch=16, grad_clip=1.0):
    """One batch of groups -> `minibatches` optimizer steps. logp_old is computed for the whole batch
    first, so in the second mini-batch r != 1 and the clip has work to do (in the first, r == 1 and
    only IcePop acts). Returns summed statistics."""
    device = next(model.parameters()).device
    tensors = grpo_tensors(groups, data.PAD)
    x, targets, mask, logp_infer, advantages = (t.to(device) for t in tensors)
    with torch.no_grad():
        logp_old = torch.cat([token_logprobs(model, x[i:i + micro_batch], targets[i:i + micro_batch])
                              for i in range(0, len(x), micro_batch)])
    totals = collections.Counter(tokens=mask.sum().item())
    order = torch.arange(len(x), device=device)
    for rows in order.chunk(minibatches):
        n_tokens = mask[rows].sum().clamp(min=1)
        for chunk in rows.split(micro_batch):
            logp = token_logprobs(model, x[chunk], targets[chunk])
            loss, stats = grpo_loss(logp, logp_old[chunk], logp_infer[chunk], advantages[chunk], mask[chunk], n_tokens)
            loss.backward()
            totals.update(stats, loss=loss.item())
        clip_finite_grad_norm(model, grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return totals


# --- Asynchronous rollouts (§5.2.1: collectors, a trajectory buffer, staleness <= 2) --------------

MAX_STALENESS = 4  # the report allows 2; each step more keeps another copy of the weights waiting


@dataclasses.dataclass(frozen=True)
class RLRun:
    steps: int            # optimizer batches (each one or more optimizer steps, see minibatches)
    prompts: int          # groups trained per batch, after zero-variance groups are dropped
    group_size: int       # G answers per prompt
    lr: float
    warmup_steps: int
    eval_every: int
    eval_tasks: int       # held-out tasks per suite
    ckpt_every: int
    oversample: float = 1.5   # prompts sampled per prompt kept (§5.2.4), to refill dropped groups
    minibatches: int = 2
    thinking_steps: int = 0   # the Thinking variant's steps, where they differ


GRPO_RUNS = {
    # 3 (Instruct) to 5 (Thinking) minutes on 2 CPU cores. AdamW at 1e-4, a common choice at this size,
    # made held-out tool accuracy swing by 50 points between evaluations; at 3e-5 it fell from 59% to
    # 27-44% in 60 batches; at 1e-5 it holds (README); at 3e-6 it holds too, and the reward rises no
    # faster. small takes tiny's, untried.
    "tiny": RLRun(steps=60, prompts=8, group_size=8, lr=1e-5, warmup_steps=5, eval_every=20, eval_tasks=64,
                  ckpt_every=10),
    "small": RLRun(steps=200, prompts=16, group_size=8, lr=1e-5, warmup_steps=10, eval_every=50, eval_tasks=128,
                   ckpt_every=25),
    # §5.2.4, Table 8: 256 prompts x 16 answers, AdamW at 1e-6 after 50 warmup steps; Instruct ran 500
    # steps, Thinking 100.
    "mellum2-12b": RLRun(steps=500, prompts=256, group_size=16, lr=1e-6, warmup_steps=50, eval_every=50,
                         eval_tasks=256, ckpt_every=10, thinking_steps=100),
}


def copy_weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class RolloutWorker:
    """A thread with its own copy of the policy (the rollout engine) and the verifier pool. Batch k
    is sampled with the policy of version k - staleness: with staleness 1 the learner trains on
    batch k while batch k + 1 is being sampled, the report's asynchronous loop in one process, and
    which weights sample which batch never depends on timing, so a run repeats exactly.
    With staleness 0 (--sync) every batch waits for the weights it is trained with."""

    def __init__(self, model, run, variant, seed, concision, threads):
        self.policy = copy.deepcopy(model).eval()
        self.run, self.variant, self.seed, self.concision = run, variant, seed, concision
        self.enc, self.verifier = data.load_tokenizer(), tasks.Verifier()
        self.pool = concurrent.futures.ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,))
        self.pending = {}   # batch index -> (policy version, weights, future)

    def submit(self, index, version, weights):
        future = self.pool.submit(self._sample, index, weights)
        self.pending[index] = (version, weights, future)

    def take(self, index):
        version, _, future = self.pending.pop(index)
        return version, future.result()

    @torch.no_grad()
    def _sample(self, index, weights):
        self.policy.load_state_dict(weights)
        rng = random.Random(f"grpo-{self.seed}-{index}")
        n_prompts = math.ceil(self.run.prompts * self.run.oversample)
        prompts = [tasks.make_task(rng.choice(tasks.SUITES), rng) for _ in range(n_prompts)]
        started = time.time()
        # One sampling seed per (run seed, batch), distinct while a run has fewer than 100,003 batches;
        # rollout() numbers its turns within it the same way (seed * MAX_TURNS + turn).
        rows = rollout(self.policy, self.enc, [t for t in prompts for _ in range(self.run.group_size)],
                       MAX_ANSWER_TOKENS[self.variant], temperature=1.0, seed=self.seed * 100_003 + index)
        score(rows, self.verifier)
        shape_rewards(rows, self.variant, MAX_ANSWER_TOKENS[self.variant], self.concision)
        return rows, time.time() - started

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.verifier.close()


def grpo_settings(args):
    """A new RL run's settings: its size's preset, and the flags."""
    preset = GRPO_RUNS[args.size]
    steps = given(args.max_steps, preset_steps(preset, args))
    run = dataclasses.replace(preset, warmup_steps=warmup_within(preset.warmup_steps, steps))
    return dict(stage="grpo", size=args.size, variant=args.variant, seed=args.seed, init_from=args.init_from,
                steps=steps, group_size=given(args.group_size, run.group_size),
                lr=given(args.lr, run.lr), staleness=0 if args.sync else args.max_staleness,
                concision=not args.no_concision, run=dataclasses.asdict(run))


def grpo(args, stop_after=None):
    """The RL stage: python train.py --stage grpo --variant instruct --init-from out/tiny-sft-instruct."""
    if "RANK" in os.environ:
        raise ValueError("--stage grpo runs in one process; start it with python, not torchrun")
    device = pick_device(args.device)
    out_dir = run_folder(args)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    resumed = resumed_run(args, out_dir, print) if args.resume else None
    if resumed:
        s = resumed["settings"]
        fresh = grpo_settings(args)
        check_resumable(s, fresh)
        check_resumable(s["run"], fresh["run"])  # the schedule, an RLRun
        raw = model_from_checkpoint(resumed)
    else:
        s = grpo_settings(args)
        if s["group_size"] < 2:
            raise ValueError(f"--group-size must be at least 2 (the leave-one-out baseline needs another "
                             f"answer), got {s['group_size']}")
        if s["steps"] <= 0 or not 0 <= s["staleness"] <= MAX_STALENESS:
            raise ValueError(f"--max-steps must be positive and --max-staleness between 0 and {MAX_STALENESS} "
                             f"(each step of staleness holds one more copy of the weights), got {s['steps']} "
                             f"and {s['staleness']}")
        if not args.init_from:
            raise ValueError("--stage grpo continues an SFT model: give --init-from DIR (a train.py --stage sft run)")
        if not os.path.isfile(os.path.join(args.init_from, "ckpt.pt")):
            raise ValueError(f"{args.init_from}: --stage grpo starts from a train.py --stage sft run folder")
        raw = init_model(None, args.init_from, START_STAGES["grpo"])
        sft_run = load_checkpoint(os.path.join(args.init_from, "ckpt.pt"), mmap=True, verify=False)
        tuned_as = sft_run["settings"]["variant"]
        if tuned_as != args.variant:
            raise ValueError(f"{args.init_from} was fine-tuned as {tuned_as}; GRPO --variant {args.variant} needs "
                             f"a {args.variant} SFT run (the report trains each separately)")
        replacing_note = check_out_dir(out_dir, "grpo")
        if replacing_note:
            print(replacing_note)
    run = RLRun(**{**s["run"], "group_size": s["group_size"]})
    # A batch's rollouts decode together, each row with fp32 K and V for every layer up to the
    # context (fewer on sliding layers: an upper bound) and a row of logits.
    c, rollouts = raw.config, math.ceil(run.prompts * run.oversample) * run.group_size
    check_fits(rollouts * 4 * (c.max_seq_len * c.n_layer * 2 * c.n_kv_head * c.head_dim + c.vocab_size),
               f"--group-size {run.group_size}: {rollouts:,} rollouts at once")
    torch.manual_seed(s["seed"])
    raw.to(device)
    # §5.2.4: AdamW (0.9, 0.999), weight decay 0.01, constant LR after a linear warmup, clip 1.0.
    optimizers = build_optimizers(raw, s["lr"], weight_decay=0.01, optimizer="adamw", betas=(0.9, 0.999))
    step = 0
    if resumed:
        restore_optimizers(optimizers, resumed)
        step = resumed["step"]
    if step >= s["steps"]:  # --resume of a finished run: it gave its summary when it finished
        print(f"the run in {out_dir} had finished all {step} GRPO batches: nothing to do")
        return raw
    log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), step,
                     replacing=not resumed and os.path.isfile(ckpt_path))
    # Two threads on a few cores: each gets half, or they fight over the same ones.
    threads_before = torch.get_num_threads()
    threads = max(1, threads_before // 2) if s["staleness"] else threads_before
    torch.set_num_threads(threads)
    print(f"GRPO ({s['variant']}) on {device}: {run.prompts} prompts x {run.group_size} answers per batch "
          f"({run.oversample}x oversampled), {s['steps']} batches of {run.minibatches} optimizer steps, "
          f"lr {s['lr']:g}, rollouts at most {s['staleness']} step(s) stale"
          f"{' (--sync)' if not s['staleness'] else ''}, "
          f"concision penalty {'on' if s['concision'] and s['variant'] == 'instruct' else 'off'}, "
          f"{threads} thread(s) per worker")
    if not resumed:
        val = evaluate_tasks(raw, run.eval_tasks, MAX_ANSWER_TOKENS[s["variant"]])
        print("before GRPO: " + describe_eval(val, "grpo"))
        log.append({"step": 0, "val": val})

    worker = RolloutWorker(raw, run, s["variant"], s["seed"], s["concision"], threads)
    # The policies that sample the next `staleness` batches: the current one at a fresh start, the
    # saved ones on resume (so a resumed run samples exactly what the uninterrupted one would).
    for index, (version, weights) in sorted((resumed or {}).get("rollout_policies", {}).items()):
        worker.submit(index, version, weights)
    for index in range(step, min(step + s["staleness"], s["steps"])):
        if index not in worker.pending:
            worker.submit(index, step, copy_weights(raw))
    stop = StopRequest()
    progress = Progress(s["steps"], True)
    t_start, n_rollouts, step_at_start = time.time(), 0, step
    try:
        while step < s["steps"]:
            if step + s["staleness"] < s["steps"]:
                worker.submit(step + s["staleness"], step, copy_weights(raw))
            waited = time.time()
            version, (rows, sample_time) = worker.take(step)
            waited = time.time() - waited
            lr = s["lr"] * linear_warmup(step, run.warmup_steps)  # then constant (§5.2.4)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr
            groups, n_groups = usable_groups(rows, run.group_size, run.prompts)
            t_train = time.time()
            totals = grpo_update(raw, optimizers, groups, run.minibatches) if groups else collections.Counter()
            t_train = time.time() - t_train
            step += 1
            n_rollouts += len(rows)
            tokens = max(totals["tokens"], 1)
            record = dict(step=step, lr=lr, staleness=step - 1 - version,
                          reward=sum(r.reward or 0 for r in rows) / len(rows),
                          accuracy=sum(r.reward == 1.0 for r in rows) / len(rows),
                          suite_accuracy={suite: sum(r.reward == 1.0 for r in rows if r.task.suite == suite) /
                                          max(1, sum(r.task.suite == suite for r in rows)) for suite in tasks.SUITES},
                          groups_kept=len(groups), unfinished=sum(not r.finished for r in rows) / len(rows),
                          answer_tokens=sum(sum(r.written) for r in rows) / len(rows),
                          reflection_words=sum(r.reflections for r in rows) / len(rows),
                          icepop_masked=totals["icepop_masked"] / tokens, clipped=totals["clipped"] / tokens,
                          abs_log_rho=totals["abs_log_rho"] / tokens, loss=totals["loss"],
                          sample_s=sample_time, wait_s=waited, train_s=t_train,
                          rollouts_per_s=n_rollouts / (time.time() - t_start))
            record["zero_variance"] = sum(len({r.shaped for r in rows[i:i + run.group_size]}) == 1
                                          for i in range(0, len(rows), run.group_size)) / n_groups
            if step % run.eval_every == 0 or step == s["steps"]:
                record["val"] = evaluate_tasks(raw, run.eval_tasks, MAX_ANSWER_TOKENS[s["variant"]])
                progress.message(f"step {step}: " + describe_eval(record["val"], "grpo"))
            log.append(record)
            elapsed = time.time() - t_start
            progress.update(step - 1, f"reward {record['reward']:.2f} acc {record['accuracy']:.0%} | groups "
                            f"{len(groups)}/{n_groups} | icepop {record['icepop_masked']:.1%} | "
                            f"{record['rollouts_per_s']:.1f} rollouts/s", elapsed / (step - step_at_start) *
                            (s["steps"] - step))
            interrupted = stop.requested and step < s["steps"]
            stopping = interrupted or step == stop_after
            by_hand = (interrupted and stop.by_hand) or step == stop_after
            keep_replaced = keeps_the_replaced_run(log, by_hand, step, s["steps"], run.ckpt_every)
            if (step % run.ckpt_every == 0 or step == s["steps"] or stopping) and not keep_replaced:
                policies = {i: (v, w) for i, (v, w, _) in worker.pending.items()}
                save_checkpoint(ckpt_path, raw, optimizers, step, s, rollout_policies=policies)
                log.checkpoint_written()
            if stopping:
                progress.message(stopped_message(step, out_dir, keep_replaced))
                if interrupted:
                    raise Stopped
                return raw
    except NonFiniteLoss as e:
        raise NonFiniteLoss(f"non-finite GRPO step {step + 1} ({e}); stopped before taking it, "
                              f"checkpoints written so far are kept") from None
    finally:
        stop.release()
        worker.close()
        torch.set_num_threads(threads_before)
    elapsed = time.time() - t_start
    print(f"\ndone: {step} GRPO batches, {n_rollouts} rollouts in {elapsed:.0f} s "
          f"({n_rollouts / elapsed:.1f} rollouts/s)")
    print(f"checkpoint: {ckpt_path}")
    return raw


def memory_of(device):
    """Bytes of memory on `device`: a CUDA GPU's own, else the machine's; None where Python has no
    portable way to ask (Windows)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def check_fits(need, what):
    """Refuse, with the numbers, work that needs more than this machine's memory: the system would kill
    the process outright on running out, with no message, or it would swap for hours first."""
    have = memory_of(torch.device("cpu"))
    if have is not None and need > have:
        raise ValueError(f"{what} would need about {need / 2**30:,.0f} GiB and this machine has "
                         f"{have / 2**30:.0f} GiB")


def check_memory(config, device):
    """Refuse, with the numbers, a model whose training state cannot fit: fp32 weights, gradients and
    up to two optimizer moments are 16 bytes a parameter, on every process (DDP replicates them)."""
    with torch.device("meta"):
        n_params = Mellum2(config).num_params(include_mtp=True)
    have = memory_of(device)
    if have is not None and 16 * n_params > have:  # None: no way to ask on this system; let it try
        raise ValueError(f"training {n_params / 1e9:.1f}B parameters needs about {16 * n_params / 2**30:.0f} GiB "
                         f"(weights, gradients, optimizer state) on each process; this {device.type} has "
                         f"{have / 2**30:.0f} GiB: choose a smaller --size")


def check_settings(s, world):
    split = 2 * world if s["ramp_fraction"] else world  # a ramping run's first steps take half the batch
    problems = [
        (s["stage"] == "pretrain" or s["init_from"],
         f"--stage {s['stage']} continues a pre-trained model: give --init-from DIR (a train.py run or a Hugging "
         f"Face directory)"),
        (s["steps"] > 0, f"--max-steps must be positive, got {s['steps']}"),
        (0 < s["micro_batch"] <= s["batch_size"],
         f"batch sizes must be positive, --micro-batch at most --batch-size, got --batch-size {s['batch_size']} "
         f"--micro-batch {s['micro_batch']}"),
        (s["batch_size"] % split == 0,
         f"--batch-size {s['batch_size']} must be a multiple of {split}: the batch ramp's first steps take half "
         f"of it, and each step's rows split evenly over {world} process(es)" if split > world else
         f"--batch-size {s['batch_size']} must split evenly over {world} process(es)"),
        (not s.get("context") or data.min_unique_tokens(s["context"]) <= data.VOCAB_SIZE,  # no text could pass §3.3
         f"--context {s.get('context')} is too long for a vocabulary of {data.VOCAB_SIZE}: the data filter keeps "
         f"sequences with 1% distinct tokens"),
    ]
    for ok, message in problems:
        if not ok:
            raise ValueError(message)


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' command lines (train, sample, evaluate, plots, bench): argparse, with a mistyped
    flag or value reported in one line like every other error here. argparse would print the whole
    usage first, a dozen lines or more for train.py, and the mistake last."""

    def __init__(self, description=None, **kwargs):  # bench.py's subcommands come here with their prog
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see python {self.prog} --help)\n")


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    g = p.add_argument_group("run")
    g.add_argument("--size", default="tiny", choices=list(RUNS),
                   help="model preset and its run settings (default: tiny; mellum2-12b, the released shape with "
                        "its 98K vocabulary, is for --data-report: train.py trains with this project's tokenizer)")
    g.add_argument("--out-dir", help="folder for ckpt.pt and metrics.jsonl (default: out/SIZE, out/SIZE-long, "
                   "out/SIZE-sft-VARIANT, out/SIZE-grpo-VARIANT by --stage)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir exactly where it stopped")
    g.add_argument("--init-from", metavar="DIR",
                   help="start from these weights: a run folder of ours or a Hugging Face directory")
    g.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    kernels.add_kernels_flag(g)
    g.add_argument("--seed", type=int, default=1337, help="seeds the weights and the data order (default: 1337)")
    g = p.add_argument_group("long context (report §4): python train.py --stage long --init-from out/tiny")
    g.add_argument("--stage", default="pretrain", choices=list(START_STAGES),
                   help="pretrain; long: continue --init-from at a longer context with layer-selective YaRN; "
                        "sft and grpo: post-training (see below)")
    g.add_argument("--context", type=int,
                   help="the long stage's sequence length (default: 4x the model's, 16x for mellum2-12b)")
    g.add_argument("--yarn-factor", type=float, help="YaRN scale factor (default: context / original context)")
    g.add_argument("--rope-variant", default="selective-yarn", choices=list(ROPE_VARIANTS),
                   help="; ".join(f"{k}: {v}" for k, v in ROPE_VARIANTS.items()))
    g.add_argument("--compare", action="store_true",
                   help="train every --rope-variant from the same --init-from and token budget, then print one "
                        "table of validation loss and passkey accuracy at 1x, 2x, 4x and 8x the original context")
    g = p.add_argument_group("post-training (report §5): --stage sft --init-from out/tiny, then --stage grpo "
                             "--init-from out/tiny-sft-instruct")
    g.add_argument("--variant", default="instruct", choices=tasks.VARIANTS,
                   help="instruct: answers directly, trained on every assistant turn; thinking: reasons in "
                        "<think> first, trained on the final turn with its reasoning (default: instruct)")
    g.add_argument("--group-size", type=int,
                   help="GRPO: answers sampled per prompt (default from --size: 8, 16 for mellum2-12b)")
    g.add_argument("--max-staleness", type=int, default=1,
                   help="GRPO: rollouts come from the policy this many steps old while the learner trains "
                        "(default 1; the report allows 2)")
    g.add_argument("--sync", action="store_true", help="GRPO: sample each batch with the current policy, then train")
    g.add_argument("--no-concision", action="store_true",
                   help="GRPO: without the concision penalty on reflection words (Instruct)")
    g = p.add_argument_group("optimization (defaults come from --size)")
    g.add_argument("--max-steps", type=int,
                   help="steps in the whole run, which the schedule spans: optimizer steps (GRPO: batches of "
                        "rollouts)")
    g.add_argument("--batch-size", type=int, help="sequences per step, all processes together")
    g.add_argument("--micro-batch", type=int, help="sequences per forward pass per process")
    g.add_argument("--lr", type=float, help="peak learning rate of Muon and AdamW")
    g.add_argument("--optimizer", default="muon", choices=["muon", "adamw"],
                   help="muon: Muon on matrices + AdamW on the rest (the report); adamw: AdamW everywhere")
    g.add_argument("--no-mtp", action="store_true", help="train without the MTP layer (the report's ablation)")
    g.add_argument("--dense", action="store_true",
                   help="a dense model with the same active parameters instead of the MoE (§2.1.2's trade-off)")
    g.add_argument("--fp8", action="store_true", help="FP8 tensorwise matmuls in attention, MTP and experts")
    g.add_argument("--aux-coef", type=float,
                   help="load-balancing loss coefficient (default 1e-3, the report's, and 1e-4 in SFT; it found "
                        "1e-2 better on short pre-training runs)")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", default=[], metavar="DIR",
                   help="add your own folder of text or code (repeatable)")
    g.add_argument("--no-default-data", action="store_true",
                   help="train only on the --data folders, without the built-in corpus")
    g.add_argument("--data-report", action="store_true",
                   help="print tokens per source and split, the plan per phase and each source's repetition, then exit")
    g.add_argument("--allow-over-repetition", action="store_true",
                   help="allow a plan that repeats a source more than 4 times (the report's cap)")
    args = p.parse_args(argv)
    # The flags typed, whatever their values: one typed at its default value still says what the user
    # means (--variant instruct to resume a thinking run is a mistake). argparse keeps no record of
    # them; parsed again with every default suppressed, only they are left.
    for action in p._actions:
        action.default = argparse.SUPPRESS
    args.typed_flags = {"--" + name.replace("_", "-") for name in vars(p.parse_args(argv))}
    return args


FP32_MAX = torch.finfo(torch.float32).max  # larger settings overflow the fp32 tensors they scale
# Far above any learning rate that trains (the presets' peak is 3e-3): the optimizers scale it (AdamW by
# 10 in its first step), and well below fp32's limit their arithmetic would overflow with a traceback.
MAX_LR = 1e6
# The numbers other than counts (COUNT_SETTINGS) a run reads from its settings, and the range each
# keeps: checkpoint_problem refuses an edited file with one outside (it would train wrongly or crash
# midway); check_command holds the flags among them within these, so that every run can be resumed.
SETTING_RANGES = {"seed": (0, 2**63 - 1), "lr": (0, MAX_LR), "aux_coef": (0, FP32_MAX), "yarn_factor": (1, FP32_MAX),
                  "decay_fraction": (0, 1), "ramp_fraction": (0, 1), "oversample": (1, math.inf),
                  "staleness": (0, MAX_STALENESS), "warmup_steps": (0, math.inf), "eval_rows": (0, math.inf),
                  "eval_tasks": (0, math.inf)}


# The flags only some stages read: given to another, they would change nothing, silently.
STAGE_FLAGS = {
    "--context": ("long",), "--yarn-factor": ("long",), "--rope-variant": ("long",), "--compare": ("long",),
    "--variant": ("sft", "grpo"),
    "--group-size": ("grpo",), "--max-staleness": ("grpo",), "--sync": ("grpo",), "--no-concision": ("grpo",),
    "--data": ("pretrain", "long"), "--no-default-data": ("pretrain", "long"),
    "--allow-over-repetition": ("pretrain", "long"), "--data-report": ("pretrain", "long"),
    "--dense": ("pretrain",), "--no-mtp": ("pretrain",),
    **dict.fromkeys(["--batch-size", "--micro-batch", "--optimizer", "--fp8", "--aux-coef", "--kernels"],
                    ("pretrain", "long", "sft")),  # GRPO's batches and optimizer are its own (§5.2.4), and
                                                    # it runs PyTorch's attention and MoE
}


def check_command(args):
    """What the flags alone can tell is wrong, before any file is read or written."""
    for flag in sorted(args.typed_flags & set(STAGE_FLAGS)):
        if args.stage not in STAGE_FLAGS[flag]:
            raise ValueError(f"{flag} is for --stage {' or '.join(STAGE_FLAGS[flag])}, not --stage {args.stage}")
    problems = [
        (0 <= args.seed < 2**63, f"--seed must be between 0 and 2**63 - 1, got {args.seed}"),
        (args.lr is None or 0 < args.lr <= MAX_LR, f"--lr must be positive and at most {MAX_LR:,.0f}, got {args.lr}"),
        (args.yarn_factor is None or 1 <= args.yarn_factor < FP32_MAX,
         f"--yarn-factor must be at least 1 and below {FP32_MAX:.3g} (fp32's largest), got {args.yarn_factor}"),
        (not (args.yarn_factor is not None and args.rope_variant == "unchanged" and not args.compare),
         "--yarn-factor has no effect with --rope-variant unchanged"),
        (not (args.init_from and (args.dense or args.no_mtp)),
         "--dense and --no-mtp shape a fresh model; with --init-from the model comes as it was trained"),
        (args.out_dir != "", "--out-dir needs a folder name"),
        (args.init_from != "", "--init-from needs a folder name"),  # not the current folder's ckpt.pt
        (not (args.init_from and not args.resume
              and os.path.realpath(args.init_from) == os.path.realpath(run_folder(args))),
         f"--init-from {args.init_from} is also this run's folder, whose checkpoint the run would replace with "
         f"its own: give another --out-dir"),
        (not (args.sync and "--max-staleness" in args.typed_flags), "--max-staleness has no effect with --sync"),
        ("" not in args.data, "--data needs a folder name"),
        (args.aux_coef is None or 0 <= args.aux_coef <= FP32_MAX,
         f"--aux-coef must be at least 0 and at most {FP32_MAX:.3g} (fp32's largest), got {args.aux_coef}"),
    ]
    for ok, message in problems:
        if not ok:
            raise ValueError(message)


@contextlib.contextmanager
def run_folder_lock(out_dir):
    """Hold out_dir/.lock while this command runs, so that a second train.py given the same folder
    stops with an error instead of interleaving its checkpoints and metrics with ours. The operating
    system drops the lock when the process ends, however it ends: a crash leaves no stale lock."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out-dir {out_dir} is a file, not a folder")
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    lock_path = os.path.join(out_dir, ".lock")
    try:
        with open(lock_path, "w") as f:
            try:
                if os.name == "nt":
                    import msvcrt
                    msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
                else:
                    import fcntl
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise ValueError(f"{out_dir} is in use by another train.py run") from None
            # What a process killed while writing a checkpoint or log left (SIGKILL skips the clean-up
            # in data.write_atomically), here or in a --compare run's variant folders, or beside the
            # file a linked checkpoint points at, where write_atomically writes; with the lock held,
            # no other run is writing them.
            for folder, _, _ in os.walk(out_dir):
                for name in ("ckpt.pt", "metrics.jsonl"):
                    for leftover in data.interrupted_writes(os.path.join(folder, name)):
                        os.remove(leftover)
            yield
    finally:
        if created and os.listdir(out_dir) == [".lock"]:  # refused before writing anything: leave no trace
            with contextlib.suppress(OSError):
                os.remove(lock_path)
                os.rmdir(out_dir)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_command(args)
        if args.data_report:  # the report is all it writes (a run's progress may go nowhere)
            check_stdout_open()
        # One process of a run holds the lock (torchrun starts several); --data-report writes nothing.
        holds_lock = launch_ranks()[0] == 0 and not args.data_report
        with run_folder_lock(run_folder(args)) if holds_lock else contextlib.nullcontext():
            if args.stage == "grpo":
                grpo(args)
            else:
                # The variants train on the same tokens: one data report tells of them all.
                compare_rope_variants(args) if args.compare and not args.data_report else train(args)
    except (ValueError, CheckpointError, data.DataError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # python train.py --data-report | head: the reader has gone, as sample.py's can
        on_closed_pipe()
    except OSError as e:  # the file system refused: a folder where a file should be, no permission, a full disk
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    except (RuntimeError, MemoryError) as e:
        if peer_stopped(e):  # the process that stopped first has printed why; a traceback here would bury it
            print(f"error: process {dist.get_rank()} of the run stopped because another one did (see its "
                  f"message above)", file=sys.stderr)
            sys.exit(1)
        if not out_of_memory(e):
            raise
        advice = "a smaller --group-size needs less" if args.stage == "grpo" else \
            "a smaller --micro-batch or --batch-size needs less; an interrupted run continues from its last " \
            "checkpoint with --resume --micro-batch N"
        print(f"error: out of memory ({one_line(e)[:160]}): {advice}", file=sys.stderr)
        sys.exit(1)
    except Stopped:  # the checkpoint is written (unless none was due: keeps_the_replaced_run)
        sys.exit(130)
    except KeyboardInterrupt:  # before the loop, or in the final evaluation after its last checkpoint
        print("error: interrupted; checkpoints written before are kept", file=sys.stderr)
        sys.exit(130)
    finally:
        leave_process_group()


def out_of_memory(error):
    """A CUDA GPU's OutOfMemoryError, the plain RuntimeError of the CPU's and of Apple's MPS allocator
    for the same thing, or Python's (and numpy's) MemoryError."""
    return (isinstance(error, (torch.OutOfMemoryError, MemoryError))
            or any(words in str(error) for words in ("can't allocate memory", "MPS backend out of memory")))


def peer_stopped(error):
    """A collective that failed because another process of a torchrun launch exited: NCCL says so
    with a DistError, gloo with a plain RuntimeError about the closed connection."""
    return dist.is_initialized() and (isinstance(error, dist.DistError) or "closed by peer" in str(error))


def leave_process_group():
    """Free DDP's gradient reducer (it sits in reference cycles) while the process group it talks to
    still exists, then close the group; otherwise a process can abort on exit."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
