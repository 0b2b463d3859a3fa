"""
Pre-training Mellum 2 (report §3 Pre-Training), from a laptop CPU to many GPUs.

    python train.py --size tiny                   # the whole recipe on a 2-core CPU in minutes
    python train.py --size tiny --data-report     # what the data curriculum will do, then exit
    torchrun --standalone --nproc_per_node=8 train.py --size small

The recipe, in the report's order, each piece where it happens:
  - data: three phases of web / code / math with FIM and best-fit packing    -> data.py (§3.2)
  - optimizer: Muon in the Moonlight configuration on every hidden matrix and -> Muon (§3.4.1)
    on each expert matrix; AdamW on embeddings, head, router and norm gains
  - schedule: Warmup-Hold-Decay, linear decay to zero over the last 15.9%     -> lr_multiplier (§3.4.2)
  - batch ramp: half the batch for the first 6% of steps, then the full one   -> batch_size_at (§3.4.3)
  - loss: next-token + 0.1 MTP + 1e-3 balance + 1e-3 router z-loss            -> mellum2.py (§2.1.5, §3.4.5)
  - precision: fp32 on CPU, bf16 autocast on GPUs, --fp8 tensorwise matmuls   -> Float8Linear (§3.4.4)
  - many processes: DDP under torchrun, with a distributed Muon               -> setup_distributed (§3.4.7)
  - checkpoints written atomically; --resume continues exactly; Ctrl-C saves  -> save_checkpoint
  - long context: --stage long, layer-selective YaRN and its ablations        -> long_context_config (§4)
  - Triton kernels for attention and the experts on GPUs (--kernels)          -> kernels.py
"""

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import kernels
import mellum2
from mellum2 import CheckpointError, Mellum2, Mellum2Config, pick_device, pick_dtype


# -----------------------------------------------------------------------------------------------
# Muon (§3.4.1 Optimizer, App. B Table 11: momentum 0.95, Nesterov, 5 Newton-Schulz steps,
# "spectral" scale with extra factor 0.2, i.e. the Moonlight configuration)

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the standard quintic: steepest slope at zero, 5 steps suffice


def orthogonalize(G, steps=5, eps=1e-7, dtype=torch.bfloat16):
    """The nearest semi-orthogonal matrix to each matrix in G (..., m, n): U V^T of G's SVD, by a
    Newton-Schulz iteration that only needs matmuls. Leading dimensions are a batch, so a stack of
    experts (E, out, in) is orthogonalised one expert at a time, never flattened into one matrix.
    The quintic pushes every singular value into about [0.7, 1.2] rather than exactly 1, which
    trains as well and is much cheaper. bf16 is enough: only the direction of the update matters."""
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

    Distributed (torch.distributed initialised, gradients already averaged by DDP): momentum is kept
    on every rank (cheap, element-wise), but matrix i is orthogonalised only by rank i % world_size,
    which broadcasts O to the others; every rank then applies the same update, so replicas stay
    identical while the expensive Newton-Schulz work is split world_size ways.
    """

    def __init__(self, params, lr, momentum=0.95, nesterov=True, weight_decay=0.1, ns_steps=5,
                 ns_dtype=torch.bfloat16, eps=1e-7):
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
            if i % world == rank:  # contiguous: a broadcast sends raw memory, so the layouts must agree
                updates.append(orthogonalize(u, group["ns_steps"], group["eps"], group["ns_dtype"]).contiguous())
            else:
                updates.append(torch.empty(p.shape, dtype=group["ns_dtype"], device=p.device))
        if world > 1:
            for handle in [dist.broadcast(o, src=i % world, async_op=True) for i, o in enumerate(updates)]:
                handle.wait()
        for (p, group), o in zip(work, updates):
            scale = 0.2 * math.sqrt(max(p.shape[-2:]))
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(o, alpha=-group["lr"] * scale)


def build_optimizers(model, lr, weight_decay=0.1, optimizer="muon", ns_dtype=torch.bfloat16):
    """Muon for every hidden matrix and expert stack; AdamW for the rest (App. B: Adam betas (0.9,
    0.95), eps 1e-8). Embedding and head rows are per-token vectors rather than linear maps between
    hidden spaces, and the router's rows are per-expert score directions: orthogonalising those would
    equalise what should differ, so they stay with AdamW, as do the norm gains (vectors). Gains are
    not decayed: pulling them to 0 would fight the normalisation they exist to undo.
    With optimizer="adamw" everything uses AdamW (the report's baseline, §3.4.1)."""
    def with_adamw(name, p):
        return optimizer == "adamw" or p.ndim == 1 or name.startswith(("embed_tokens", "lm_head")) \
            or name.endswith("mlp.gate.weight")

    named = list(model.named_parameters())
    decayed = [p for n, p in named if with_adamw(n, p) and p.ndim > 1]
    gains = [p for n, p in named if with_adamw(n, p) and p.ndim == 1]
    matrices = [p for n, p in named if not with_adamw(n, p)]
    adamw = torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                               {"params": gains, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)
    return [adamw] + ([Muon(matrices, lr=lr, weight_decay=weight_decay, ns_dtype=ns_dtype)] if matrices else [])


# -----------------------------------------------------------------------------------------------
# Warmup-Hold-Decay (§3.4.2) and the batch-size ramp (§3.4.3)

def lr_multiplier(step, total_steps, warmup_steps, decay_fraction=0.159):
    """Linear warmup to the peak, hold it, then decay linearly to exactly zero over the final
    decay_fraction of training: the report's phase 3 (15.9% of tokens), found better than a cosine
    to a non-zero floor. One multiplier scales both optimizers."""
    decay_start = total_steps - round(decay_fraction * total_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step < decay_start:
        return 1.0
    return (total_steps - step) / (total_steps - decay_start)


def batch_size_at(step, total_steps, batch_size, ramp_fraction=0.06):
    """Half the batch for the first ramp_fraction of steps, then the full batch. The report doubles
    2,048 -> 4,096 sequences once, near step 19K of 323K (~6%): early on, when gradients are large and
    consistent, a smaller batch gives more updates per token at no loss in quality."""
    return batch_size // 2 if step < ramp_fraction * total_steps else batch_size


# -----------------------------------------------------------------------------------------------
# FP8 "tensorwise" hybrid precision (§3.4.4 Precision, App. B: hybrid, tensorwise, most-recent amax)
#
# Every operand of a big matmul is scaled by one number per tensor per call, so that its largest
# magnitude lands on the format's largest finite value, and rounded to 8 bits: e4m3 (more precision)
# for activations and weights, e5m2 (more range) for gradients. Products are accumulated in high
# precision and unscaled. Master weights, optimizer state, the router, embeddings, the head and the
# norms stay in high precision ("hybrid"). Dense layers call torch._scaled_mm, a real FP8 matmul on
# GPUs with FP8 units (and an exact CPU kernel); experts use a quantise-dequantise emulation in front
# of the grouped matmul, numerically the same recipe, because torch has no tensorwise FP8 grouped kernel.

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def to_fp8(x, dtype):
    """x -> (x8, scale) with x8 = saturate(x * scale) in `dtype` and x ~= x8 / scale."""
    fp8_max = torch.finfo(dtype).max
    scale = fp8_max / x.detach().abs().max().float().clamp(min=1e-12)
    return (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype), scale


def scaled_mm(a8, scale_a, b8, scale_b, out_dtype):
    """(a8 / scale_a) @ (b8 / scale_b) with FP8 inputs; GPUs want a row-major and b column-major."""
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
        (g8, sg), (x8, sx), (w8, sw) = to_fp8(g, E5M2), to_fp8(x, E4M3), to_fp8(w, E4M3)
        return scaled_mm(g8, sg, w8, sw, g.dtype), scaled_mm(g8.t(), sg, x8, sx, w.dtype)


class Float8Linear(nn.Linear):
    """A bias-free nn.Linear whose matmuls run in FP8 (the weight and its name are unchanged)."""

    def forward(self, x):
        return _FP8Matmul.apply(x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class _FakeQuant(torch.autograd.Function):
    """Forward: round x to FP8 and back (tensorwise). Backward: pass the gradient through unchanged,
    since the recipe computes dx and dW from the 8-bit operands but applies them to the originals."""

    @staticmethod
    def forward(ctx, x, dtype):
        x8, scale = to_fp8(x, dtype)
        return (x8.float() / scale).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None


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
    dx = q(g) q(w)^T and dW = q(x)^T q(g), as in _FP8Matmul."""
    y = mellum2.grouped_mm(_FakeQuant.apply(x, E4M3), _FakeQuant.apply(w, E4M3), offsets)
    return _FakeQuantGrad.apply(y)


def convert_to_fp8(model):
    """Swap the attention projections and the MTP projection for Float8Linear, and route every MoE's
    expert matmuls through fp8_grouped_mm. The router and the head stay in high precision: small
    rounding there flips expert choices or token probabilities."""
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
    eval_batches: int    # validation batches per source
    ckpt_every: int      # steps between checkpoints
    decay_fraction: float = 0.159  # the final share of steps over which the LR decays to 0 (phase 3)
    ramp_fraction: float = 0.06    # the first share of steps at half batch


RUNS = {
    # About 7 minutes on 2 laptop CPU cores: 200 steps of 16 x 256 tokens, 0.8M tokens in all.
    "tiny": Run(batch_size=16, micro_batch=16, steps=200, lr=3e-3, warmup_steps=10, eval_every=50,
                eval_batches=4, ckpt_every=50),
    "small": Run(batch_size=64, micro_batch=16, steps=5000, lr=2e-3, warmup_steps=100, eval_every=250,
                 eval_batches=16, ckpt_every=500),
    # The report's run (Table 4, App. B): 4096 x 8192 tokens per step (2048 while ramping), micro-batch 2.
    "mellum2-12b": Run(batch_size=4096, micro_batch=2, steps=323459, lr=3e-4, warmup_steps=2000,
                       eval_every=1000, eval_batches=8, ckpt_every=1000),
}

# The long-context stage (§4.3): a tenth of the pre-training LR, Warmup-Hold-Decay with the last
# 1/7 decaying (500 of 3,500 iterations), no batch ramp; for the small sizes about the same tokens
# per step as pre-training at 4x the sequence length.
LONG_RUNS = {
    "tiny": Run(batch_size=4, micro_batch=4, steps=60, lr=3e-4, warmup_steps=6, eval_every=30, eval_batches=2,
                ckpt_every=30, decay_fraction=0.143, ramp_fraction=0.0),
    "small": Run(batch_size=16, micro_batch=4, steps=500, lr=2e-4, warmup_steps=50, eval_every=100,
                 eval_batches=4, ckpt_every=100, decay_fraction=0.143, ramp_fraction=0.0),
    "mellum2-12b": Run(batch_size=256, micro_batch=1, steps=3500, lr=3e-5, warmup_steps=100, eval_every=500,
                       eval_batches=4, ckpt_every=500, decay_fraction=0.143, ramp_fraction=0.0),
}


# -----------------------------------------------------------------------------------------------
# Long context (§4.1 Layer-Selective YaRN, Fig. 7): the four ways of handling positions beyond the
# pre-training context that the report compares

ROPE_VARIANTS = {
    "selective-yarn": "YaRN on the full-attention layers; sliding layers keep plain RoPE (the report's)",
    "all-yarn": "the same YaRN on every layer",
    "theta": "plain RoPE with a larger base on every layer (theta * s^(d/(d-2)), 'NTK-aware')",
    "unchanged": "plain RoPE as in pre-training",
}


def long_context_config(config, context, yarn_factor=None, variant="selective-yarn"):
    """The config for training at `context` tokens, from a pre-trained one. Sliding layers only ever
    look a window back, a distance they were trained on, which is why the report leaves their RoPE
    alone (selective); the other variants are its ablations."""
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
        hits = 0
        for _ in range(n_passkeys):
            prompt, answer = data.passkey_example(enc, length, rng.random(), rng.randrange(10000, 100000))
            logits, _ = model(torch.tensor([prompt + answer[:-1]], device=device))
            hits += passkey_correct(logits[0], len(prompt), answer)
        results[length] = (validation_loss(model, corpus, "code", 1, length, 2, device), hits / n_passkeys)
    model.train()
    return results


def passkey_correct(logits, prompt_len, answer):
    """logits (T, V) of prompt + answer[:-1]: True iff each answer token is the argmax before it."""
    predicted = logits[prompt_len - 1:prompt_len - 1 + len(answer)].argmax(dim=-1)
    return predicted.tolist() == list(answer)


# -----------------------------------------------------------------------------------------------
# Processes and devices

def setup_distributed(requested_device):
    """(rank, world_size, device). Under torchrun (which sets RANK / WORLD_SIZE / LOCAL_RANK) join the
    process group: NCCL between GPUs, gloo between CPU processes; otherwise a single process."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(requested_device)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = pick_device(requested_device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM only raises a flag; the loop stops at the next step boundary,
    where model and optimizer are consistent, and writes a checkpoint first."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        self.requested = True

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


def save_checkpoint(path, model, optimizers, step, settings):
    state = {
        "model": model.state_dict(),
        "optimizers": [opt.state_dict() for opt in optimizers],
        "step": step,  # the next step to run; the data sampler needs nothing else (data.BatchSampler)
        "config": dataclasses.asdict(model.config),
        "settings": settings,
        "tokenizer": tokenizer_reference(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    data.write_atomically(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


def model_from_checkpoint(state):
    model = Mellum2(Mellum2Config(**state["config"]))
    model.load_state_dict(state["model"])
    return model


def init_model(config, init_from, pretrained=False):
    """A fresh model, or the weights of `init_from`: one of our run folders or a Hugging Face directory.
    With pretrained=True a run folder must hold a finished pre-training run (the long stage's start)."""
    if init_from is None:
        return Mellum2(config)
    if os.path.isfile(os.path.join(init_from, "ckpt.pt")):
        state = load_checkpoint(os.path.join(init_from, "ckpt.pt"))
        run = state["settings"]
        if pretrained and (run.get("stage", "pretrain") != "pretrain" or state["step"] < run["steps"]):
            raise ValueError(f"{init_from} holds no finished pre-training (a {run.get('stage', 'pretrain')} run "
                             f"at step {state['step']} of {run['steps']}): finish it with --resume, or start "
                             f"from a pre-training run")
        return model_from_checkpoint(state)
    return Mellum2.from_pretrained(init_from, device="cpu", dtype=torch.float32)


# -----------------------------------------------------------------------------------------------
# Logging: one progress line, a JSON-lines metrics file, and per-source validation loss

@torch.no_grad()
def validation_losses(model, corpus, micro_batch, seq_len, max_batches, device):
    """Mean next-token loss on each source's held-out split (the MTP head is not scored)."""
    model.eval()
    losses = {source: validation_loss(model, corpus, source, micro_batch, seq_len, max_batches, device)
              for source in corpus.sources}
    model.train()
    return {source: loss for source, loss in losses.items() if not math.isnan(loss)}


@torch.no_grad()
def validation_loss(model, corpus, source, batch_size, seq_len, max_batches, device):
    """Mean next-token loss over validation batches of one source; NaN if its split is too short."""
    losses = []
    for x, y in data.val_batches(corpus, source, batch_size, seq_len, max_batches):
        logits, _ = model(x.to(device))  # (B, T, V)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()).item())
    return sum(losses) / len(losses) if losses else float("nan")


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


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path, step):
    """Drop metric lines of steps after `step`: a run resumed from its checkpoint at `step` logs them again."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(kept)


# -----------------------------------------------------------------------------------------------
# The training step and the loop

class NonFiniteLoss(Exception):
    pass


def train_step(model, x, y, micro_batch, optimizers, autocast, grad_clip=1.0):
    """One optimizer step on the rows (x, y) this process holds. Micro-batches accumulate gradients,
    each weighted by its share of the rows, so the step equals one on all rows at once; under DDP the
    gradients are averaged across processes during the last micro-batch's backward. Returns the
    loss parts (averaged over rows and processes) and the gradient norm before clipping."""
    raw = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    starts = range(0, len(x), micro_batch)
    parts = {}
    for i, start in enumerate(starts):
        last = i == len(starts) - 1
        sync = contextlib.nullcontext() if last or raw is model else model.no_sync()
        xm, ym = x[start:start + micro_batch], y[start:start + micro_batch]
        with sync, autocast:
            _, loss = model(xm, ym)
            (loss * len(xm) / len(x)).backward()
        for k, v in raw.loss_parts.items():
            if k != "expert_load":
                parts[k] = parts.get(k, 0.0) + v.float() * len(xm) / len(x)
    stacked = torch.stack(list(parts.values()))
    if dist.is_initialized():
        dist.all_reduce(stacked, op=dist.ReduceOp.AVG)
    if not torch.isfinite(stacked).all():
        raise NonFiniteLoss(", ".join(f"{k} {v:.4g}" for k, v in zip(parts, stacked.tolist())))
    grad_norm = nn.utils.clip_grad_norm_(raw.parameters(), grad_clip)
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return dict(zip(parts, stacked.tolist())), grad_norm.item()


def train(args, stop_after=None):
    """The whole run. stop_after=N stops after N steps as Ctrl-C would (tests use it)."""
    rank, world, device = setup_distributed(args.device)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    out_dir = args.out_dir or os.path.join("out", args.size + ("-long" if args.stage == "long" else ""))
    ckpt_path = os.path.join(out_dir, "ckpt.pt")

    # 1. Settings: the size's defaults and the flags, or exactly those of the run being resumed.
    resumed = load_checkpoint(ckpt_path) if args.resume else None
    if resumed:
        settings = resumed["settings"]
        say(f"resuming {ckpt_path} at step {resumed['step']} with the settings it was started with")
    else:
        run = (LONG_RUNS if args.stage == "long" else RUNS)[args.size]
        given = lambda flag, default: default if flag is None else flag  # noqa: E731  (0 is a value, not "unset")
        batch_size = given(args.batch_size, run.batch_size)
        settings = dict(size=args.size, seed=args.seed, steps=given(args.max_steps, run.steps),
                        batch_size=batch_size, micro_batch=given(args.micro_batch, min(run.micro_batch, batch_size)),
                        lr=given(args.lr, run.lr), warmup_steps=run.warmup_steps, decay_fraction=run.decay_fraction,
                        ramp_fraction=run.ramp_fraction, eval_every=run.eval_every, eval_batches=run.eval_batches,
                        ckpt_every=run.ckpt_every, optimizer=args.optimizer, mtp=not args.no_mtp, fp8=args.fp8,
                        aux_coef=args.aux_coef,
                        data=list(args.data), default_data=not args.no_default_data,
                        allow_over_repetition=args.allow_over_repetition,
                        init_from=args.init_from, stage=args.stage, context=args.context,
                        yarn_factor=args.yarn_factor, rope_variant=args.rope_variant)
    s = settings
    check_settings(s, world)

    # 2. Data. Process 0 builds the token caches; the others wait, then read them.
    if not master:
        dist.barrier()
    corpus = data.build_corpus(s["data"], progress=master, default_sources=s["default_data"])
    if master and world > 1:
        dist.barrier()
    # 3. The model, fresh, from --init-from weights, or restored; its context sets the sequence length.
    config = Mellum2Config(**resumed["config"]) if resumed else \
        Mellum2Config.from_preset(s["size"], n_mtp=1 if s["mtp"] else 0, aux_loss_coef=s["aux_coef"])
    if args.data_report:  # before building the model: the report needs none (and 12B would not fit)
        data.data_report(corpus, s["steps"] * s["batch_size"] * config.max_seq_len)
        return None
    if s["init_from"] and os.path.isfile(os.path.join(s["init_from"], "config.json")):
        config = mellum2.config_from_hf(mellum2.read_hf_config(s["init_from"]))
    check_memory(config, device)
    torch.manual_seed(s["seed"])
    raw = model_from_checkpoint(resumed) if resumed else init_model(config, s["init_from"], s["stage"] == "long")
    if s["stage"] == "long" and not resumed:  # same weights, longer context, new RoPE for the far positions
        pretrained = raw
        raw = Mellum2(long_context_config(pretrained.config, s["context"] or 4 * pretrained.config.max_seq_len,
                                          s["yarn_factor"], s["rope_variant"]))
        raw.load_state_dict(pretrained.state_dict())
        s["original_context"] = pretrained.config.max_seq_len
    config = raw.config
    if config.vocab_size != data.VOCAB_SIZE:
        raise CheckpointError(f"the model's vocabulary ({config.vocab_size}) is not the tokenizer's "
                              f"({data.VOCAB_SIZE})")
    seq_len = config.max_seq_len
    token_budget = s["steps"] * s["batch_size"] * seq_len
    # The long-context stage trains on the phase-3 mix (§4.2 starts from it).
    sampler = data.BatchSampler(corpus, s["seed"], s["batch_size"], seq_len, s["steps"], s["allow_over_repetition"],
                                phase=len(data.PHASES) - 1 if s["stage"] == "long" else None)

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
        for opt, state in zip(optimizers, resumed["optimizers"]):
            opt.load_state_dict(state)
        rng = resumed["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        start_step = resumed["step"]
    # Master weights stay fp32; on GPUs with bf16 the matmuls run in bf16 under autocast (§3.4.4).
    use_bf16 = pick_dtype(device) == torch.bfloat16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    # 5. Say what will happen: every number this run uses.
    if master:
        os.makedirs(out_dir, exist_ok=True)
        say(f"device {device} x {world} process(es), {'bf16 autocast' if use_bf16 else 'fp32'}"
            f"{', FP8 matmuls' if s['fp8'] else ''}, {kernel_mode} kernels")
        say("model  " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items()))
        say(f"params {raw.num_params() / 1e6:.2f}M total, {raw.num_params(active=True) / 1e6:.2f}M active, "
            f"{raw.num_params(include_mtp=True) - raw.num_params():,} in the MTP layer")
        say("run    " + ", ".join(f"{k}={v}" for k, v in s.items()))
        say(f"tokens {token_budget:,} planned ({s['steps']} steps x {s['batch_size']} x {seq_len}; "
            f"half batch for the first {math.ceil(s['ramp_fraction'] * s['steps'])} steps)")
        for source, r in data.planned_repetition(corpus, token_budget).items():
            say(f"       {source}: {len(corpus.train[source].tokens):,} training tokens, planned repetition {r:.2f}x")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if master:
        truncate_metrics(metrics_path, start_step)

    # 6. The loop.
    stop = StopRequest()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    progress = Progress(s["steps"], master)
    tokens_seen = sum(batch_size_at(i, s["steps"], s["batch_size"], s["ramp_fraction"]) for i in range(start_step))
    tokens_seen *= seq_len
    t_start, tokens_at_start, val = time.time(), tokens_seen, {}
    step = start_step
    try:
        while step < s["steps"]:
            lr = s["lr"] * lr_multiplier(step, s["steps"], s["warmup_steps"], s["decay_fraction"])
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr
            batch = batch_size_at(step, s["steps"], s["batch_size"], s["ramp_fraction"])
            x, y = sampler.get_batch(step)
            # This process's rows: a contiguous block, so that its micro-batches are exactly micro-batches
            # of a single-process run (the balance loss depends on which rows share a micro-batch).
            rows = slice(rank * batch // world, (rank + 1) * batch // world)
            x, y = x[:batch][rows].to(device), y[:batch][rows].to(device)
            parts, grad_norm = train_step(model, x, y, s["micro_batch"], optimizers, autocast)
            step += 1
            tokens_seen += batch * seq_len
            balance = expert_balance(raw.loss_parts["expert_load"])
            elapsed = time.time() - t_start
            speed = (tokens_seen - tokens_at_start) / elapsed
            phase = sampler.phase_at(step - 1).name
            record = dict(step=step, tokens=tokens_seen, lr=lr, grad_norm=grad_norm, expert_balance=balance,
                          phase=phase, tokens_per_s=speed, **parts)
            if step % s["eval_every"] == 0 or step == s["steps"]:
                val = validation_losses(raw, corpus, s["micro_batch"], seq_len, s["eval_batches"], device)
                record["val"] = val
                progress.message(f"step {step}: validation loss " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
            if master:
                append_jsonl(metrics_path, record)
            progress.update(step - 1, f"loss {parts['ntp']:.3f} mtp {parts.get('mtp', 0):.3f} aux {parts['aux']:.3f} "
                            f"z {parts['z']:.2f} | lr {lr:.2e} | {phase} | load max/mean {balance:.2f} | "
                            f"{speed:,.0f} tok/s", elapsed / (step - start_step) * (s["steps"] - step))
            interrupted = stop.all_agree()
            if master and (step % s["ckpt_every"] == 0 or step == s["steps"] or interrupted or step == stop_after):
                save_checkpoint(ckpt_path, raw, optimizers, step, s)
            if interrupted or step == stop_after:
                progress.message(f"stopped at step {step}; checkpoint {ckpt_path}; continue with --resume")
                if interrupted:
                    raise KeyboardInterrupt
                return raw
    except NonFiniteLoss as e:
        raise NonFiniteLoss(f"non-finite loss at step {step + 1} ({e}); stopped, the last good checkpoint "
                            f"in {out_dir} is kept") from None

    # 7. Summary.
    elapsed = time.time() - t_start
    say(f"\ndone: {step} steps, {tokens_seen:,} tokens, {elapsed:.0f} s, "
        f"{(tokens_seen - tokens_at_start) / elapsed:,.0f} tokens/s")
    say("validation loss per source: " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
    if s["stage"] == "long":
        results = long_context_eval(raw, corpus, s["original_context"], device)
        say(f"long context ({s['rope_variant']}): " + ", ".join(
            f"{length} tokens loss {loss:.3f} passkey {acc:.0%}" for length, (loss, acc) in results.items()))
        if master:
            append_jsonl(metrics_path, {"step": step, "long_context_eval": results})
    say(f"checkpoint: {ckpt_path}")
    return raw


def compare_rope_variants(args):
    """--stage long --compare: every RoPE variant trained from the same checkpoint on the same tokens,
    then one table, a miniature of the report's Fig. 7."""
    base_dir = args.out_dir or os.path.join("out", f"{args.size}-long")
    start, table = time.time(), {}
    for variant in ROPE_VARIANTS:
        out_dir = os.path.join(base_dir, variant)
        train(argparse.Namespace(**{**vars(args), "rope_variant": variant, "out_dir": out_dir, "compare": False}))
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            table[variant] = json.loads(f.readlines()[-1])["long_context_eval"]
    lengths = list(next(iter(table.values())))
    print(f"\nlong-context comparison, {time.time() - start:.0f} s: validation loss (code) / passkey accuracy")
    print(f"{'variant':<16}" + "".join(f"{length + ' tokens':>22}" for length in lengths))
    for variant, results in table.items():
        print(f"{variant:<16}" + "".join(f"{results[n][0]:>15.3f} / {results[n][1]:>4.0%}" for n in lengths))
    return table


def check_memory(config, device):
    """Refuse, with the numbers, a model whose training state cannot fit: fp32 weights, gradients and
    up to two optimizer moments are 16 bytes a parameter, on every process (DDP replicates them)."""
    with torch.device("meta"):
        n_params = Mellum2(config).num_params(include_mtp=True)
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[1]
    elif hasattr(os, "sysconf"):
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return  # no portable way to ask on this system; let it try
    if 16 * n_params > have:
        raise ValueError(f"training {n_params / 1e9:.1f}B parameters needs about {16 * n_params / 2**30:.0f} GiB "
                         f"(weights, gradients, optimizer state) on each process; this {device.type} has "
                         f"{have / 2**30:.0f} GiB: choose a smaller --size")


def check_settings(s, world):
    problems = [
        (s["stage"] == "pretrain" or s["init_from"],
         "--stage long continues a pre-trained model: give --init-from DIR (a train.py run or a Hugging Face "
         "directory)"),
        (s["steps"] > 0, f"--max-steps must be positive, got {s['steps']}"),
        (s["batch_size"] > 0 and s["micro_batch"] > 0,
         f"batch sizes must be positive, got --batch-size {s['batch_size']} --micro-batch {s['micro_batch']}"),
        (s["batch_size"] % (2 * world) == 0,
         f"--batch-size {s['batch_size']} must split evenly over {world} process(es), also at half size while ramping"),
        (s["lr"] > 0, f"--lr must be positive, got {s['lr']}"),
    ]
    for ok, message in problems:
        if not ok:
            raise ValueError(message)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--size", default="tiny", choices=list(RUNS),
                   help="model preset and its run settings (default: tiny)")
    g.add_argument("--out-dir", help="folder for ckpt.pt and metrics.jsonl (default: out/SIZE)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir exactly where it stopped")
    g.add_argument("--init-from", metavar="DIR",
                   help="start from these weights: a run folder of ours or a Hugging Face directory")
    g.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    g.add_argument("--kernels", choices=kernels.MODES,
                   help="attention and MoE kernels: triton, torch, or auto = triton on CUDA when installed "
                        "(default: $MELLUM2_KERNELS, else auto)")
    g.add_argument("--seed", type=int, default=1337, help="seeds the weights and the data order (default: 1337)")
    g = p.add_argument_group("long context (report §4): python train.py --stage long --init-from out/tiny")
    g.add_argument("--stage", default="pretrain", choices=["pretrain", "long"],
                   help="pretrain, or long: continue --init-from at a longer context with layer-selective YaRN")
    g.add_argument("--context", type=int, help="the long stage's sequence length (default: 4x the model's)")
    g.add_argument("--yarn-factor", type=float, help="YaRN scale factor (default: context / original context)")
    g.add_argument("--rope-variant", default="selective-yarn", choices=list(ROPE_VARIANTS),
                   help="; ".join(f"{k}: {v}" for k, v in ROPE_VARIANTS.items()))
    g.add_argument("--compare", action="store_true",
                   help="train every --rope-variant from the same --init-from and token budget, then print one "
                        "table of validation loss and passkey accuracy at 1x, 2x, 4x and 8x the original context")
    g = p.add_argument_group("optimization (defaults come from --size)")
    g.add_argument("--max-steps", type=int, help="optimizer steps in the whole run (the schedule spans them)")
    g.add_argument("--batch-size", type=int, help="sequences per step, all processes together")
    g.add_argument("--micro-batch", type=int, help="sequences per forward pass per process")
    g.add_argument("--lr", type=float, help="peak learning rate of Muon and AdamW")
    g.add_argument("--optimizer", default="muon", choices=["muon", "adamw"],
                   help="muon: Muon on matrices + AdamW on the rest (the report); adamw: AdamW everywhere")
    g.add_argument("--no-mtp", action="store_true", help="train without the MTP layer (the report's ablation)")
    g.add_argument("--fp8", action="store_true", help="FP8 tensorwise matmuls in attention, MTP and experts")
    g.add_argument("--aux-coef", type=float, default=1e-3,
                   help="load-balancing loss coefficient (default 1e-3, the report's; it found 1e-2 better on "
                        "short runs)")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", default=[], metavar="DIR",
                   help="add your own folder of text or code (repeatable)")
    g.add_argument("--no-default-data", action="store_true",
                   help="train only on the --data folders, without the built-in corpus")
    g.add_argument("--data-report", action="store_true",
                   help="print tokens per source and split, the plan per phase and each source's repetition, then exit")
    g.add_argument("--allow-over-repetition", action="store_true",
                   help="allow a plan that repeats a source more than 4 times (the report's cap)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        compare_rope_variants(args) if args.compare else train(args)
    except (ValueError, CheckpointError, data.DataError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # the checkpoint is already written (or no step had run yet)
        sys.exit(130)
    finally:
        leave_process_group()


def leave_process_group():
    """Free DDP's gradient reducer (it sits in reference cycles) while the process group it talks to
    still exists, then close the group; otherwise a process can abort on exit."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
