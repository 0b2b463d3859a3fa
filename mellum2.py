"""
Mellum 2, the model (report §2 Model Architecture, §2.2 Final Architecture, Table 2).

A decoder-only Mixture-of-Experts transformer that follows the Qwen3-MoE recipe. Read it top to
bottom: configuration, then the pieces in the order a token meets them, the KV cache for decoding,
then the whole model and its checkpoint format. Differences from a plain GPT, each explained where it happens:

  - RMSNorm before attention and before the MoE, no biases anywhere          -> RMSNorm, Block
  - rotary positions (theta 500000), and YaRN on the full-attention layers   -> rope_inv_freq
    only ("layer-selective YaRN", §4.1), used after the long-context stage
  - grouped-query attention: 32 query heads share 4 key/value heads          -> Attention
  - QK-norm: RMSNorm over each head's 128 dims of q and k, before RoPE       -> Attention
  - sliding window of 1024 tokens on 3 of every 4 layers, full attention     -> attn_pattern,
    on the 4th (layers 3, 7, 11, ...)                                            attention_mask
  - every layer is MoE: 64 SiLU-gated experts of width 896, top-8, no        -> MoE
    shared expert, dropless; a load-balancing loss and a router z-loss
  - untied input embedding and output head                                   -> Mellum2
  - one multi-token-prediction (MTP) layer that predicts the token after     -> MTP
    next during training (loss weight 0.1) and drafts tokens for speculative decoding

Shapes in comments use B batch, T time (sequence), D hidden size, H query heads, Hkv key/value
heads, hd head dim, E experts, K experts per token (top-k), F expert width, N = B*T tokens, V vocab.

The released checkpoint loads with `Mellum2.from_pretrained(dir)`, and `save_pretrained(dir)` writes
the same Hugging Face layout, so `transformers.MellumForCausalLM` can load what we train.
"""

import functools
import json
import math
import os
import re
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from data import load_tokenizer  # noqa: F401  (re-exported: the vocabulary is part of the model)
from data import write_atomically

IGNORE_INDEX = -1  # targets with this value (padding, prompt tokens in SFT) carry no loss


# -----------------------------------------------------------------------------------------------
# Configuration (report Table 2) and the presets

@dataclass(frozen=True)
class Mellum2Config:
    vocab_size: int = 98304
    n_layer: int = 28
    n_embd: int = 2304            # D, the residual stream width
    n_head: int = 32              # H query heads
    n_kv_head: int = 4            # Hkv key/value heads; each serves n_head // n_kv_head query heads
    head_dim: int = 128           # hd; n_head * head_dim (4096) need not equal n_embd (2304)
    n_expert: int = 64            # E routed experts per layer
    n_expert_active: int = 8      # K experts each token is sent to
    expert_dim: int = 896         # F, the hidden width of one SiLU-gated expert
    sliding_window: int = 1024    # a sliding layer's query sees itself and the 1023 tokens before it
    attn_pattern: str = "SSSF"    # layer i is sliding ('S') or full ('F') by attn_pattern[i % len]
    max_seq_len: int = 8192       # the context the model is trained for (131072 after §4)
    rope_theta: float = 500000.0  # the same base on sliding and full layers (§2.2)
    # Layer-selective YaRN (§4.1): applied to the full-attention layers only; factor 1.0 = off.
    yarn_factor: float = 1.0
    yarn_original_max_seq_len: int = 8192
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_attention_factor: float | None = None  # None: the YaRN paper's 0.1 * ln(factor) + 1
    yarn_layers: str = "full"     # "full": layer-selective, the report's; "all": every layer (a comparison)
    rms_norm_eps: float = 1e-6
    n_mtp: int = 1                # multi-token-prediction layers (the report uses exactly one)
    mtp_loss_weight: float = 0.1  # alpha in L = L_ntp + alpha * L_mtp (§2.1.5)
    aux_loss_coef: float = 1e-3   # load-balancing loss coefficient (§3.4.5)
    z_loss_coef: float = 1e-3     # router z-loss coefficient (§3.4.5)
    init_std: float = 0.02        # the released config's initializer_range
    moe_impl: str = "grouped"     # "grouped" (sorted tokens, grouped matmuls) or "loop" (reference)
    bos_token_id: int | None = None
    eos_token_id: int | tuple | None = None  # a chat model's config.json may list several ids

    def __post_init__(self):
        # The types first: a config.json or a checkpoint may hold 256.0 for a size or a list for an id.
        for field in fields(self):
            kinds = typing.get_args(field.type) or (field.type,)  # (float, NoneType) for float | None
            value = getattr(self, field.name)
            if not any(type(value) in ((int, float) if kind is float else (kind,)) for kind in kinds):
                names = " or ".join("None" if kind is type(None) else kind.__name__ for kind in kinds)
                raise ValueError(f"invalid Mellum2Config: {field.name} must be {names}, got {value!r}")
        checks = [
            (self.n_kv_head >= 1 and self.n_head % self.n_kv_head == 0,
             f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})"),
            (1 <= self.n_expert_active <= self.n_expert,
             f"n_expert_active ({self.n_expert_active}) must be between 1 and n_expert ({self.n_expert})"),
            (self.sliding_window >= 1, f"sliding_window must be at least 1, got {self.sliding_window}"),
            (len(self.attn_pattern) > 0 and set(self.attn_pattern) <= {"S", "F"},
             f"attn_pattern must be a non-empty string of 'S' and 'F', got {self.attn_pattern!r}"),
            (self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}"),
            (self.n_mtp in (0, 1), f"n_mtp must be 0 or 1 (the report uses one MTP layer), got {self.n_mtp}"),
            (1.0 <= self.yarn_factor < math.inf, f"yarn_factor must be >= 1.0 (1.0 = off) and finite, got "
                                                  f"{self.yarn_factor}"),
            (0 < self.rms_norm_eps < 1, f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}"),
            (1 < self.rope_theta < math.inf, f"rope_theta must be above 1 and finite, got {self.rope_theta}"),
            (self.yarn_original_max_seq_len >= 1,
             f"yarn_original_max_seq_len must be positive, got {self.yarn_original_max_seq_len}"),
            (0 < self.yarn_beta_slow < self.yarn_beta_fast < math.inf, f"yarn_beta_slow and yarn_beta_fast must "
             f"satisfy 0 < slow < fast, got {self.yarn_beta_slow} and {self.yarn_beta_fast}"),
            (self.yarn_attention_factor is None or 0 < self.yarn_attention_factor < math.inf,
             f"yarn_attention_factor must be positive and finite, got {self.yarn_attention_factor}"),
            (self.yarn_layers in ("full", "all"), f"yarn_layers must be 'full' or 'all', got {self.yarn_layers!r}"),
            (self.moe_impl in ("grouped", "loop"), f"moe_impl must be 'grouped' or 'loop', got {self.moe_impl!r}"),
            (type(self.eos_token_id) is not tuple or all(type(i) is int for i in self.eos_token_id),
             f"eos_token_id must be an id or ids, got {self.eos_token_id!r}"),
            (min(self.vocab_size, self.n_layer, self.n_embd, self.n_head, self.n_kv_head, self.head_dim,
                 self.n_expert, self.expert_dim, self.max_seq_len) >= 1, "all sizes must be positive"),
            # NaN fails these comparisons too: a NaN weight would otherwise only show as a loss of NaN.
            (all(0 <= c < math.inf for c in (self.mtp_loss_weight, self.aux_loss_coef, self.z_loss_coef)),
             f"mtp_loss_weight, aux_loss_coef and z_loss_coef must be at least 0 and finite, got "
             f"{self.mtp_loss_weight}, {self.aux_loss_coef} and {self.z_loss_coef}"),
            (0 < self.init_std < math.inf, f"init_std must be positive and finite, got {self.init_std}"),
            (all(type(i) is not int or 0 <= i < self.vocab_size for i in (self.bos_token_id, *self.eos_ids)),
             f"bos_token_id and eos_token_id must be ids below vocab_size ({self.vocab_size}), got "
             f"{self.bos_token_id} and {self.eos_token_id}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid Mellum2Config: {message}")

    @property
    def eos_ids(self):
        """The end-of-text ids as a tuple (empty when the config names none)."""
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if type(self.eos_token_id) is tuple else (self.eos_token_id,)

    @property
    def layer_types(self):
        """'sliding_attention' or 'full_attention' for each layer, the names the HF config uses."""
        names = {"S": "sliding_attention", "F": "full_attention"}
        return [names[self.attn_pattern[i % len(self.attn_pattern)]] for i in range(self.n_layer)]

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS = {
    # The released model's architecture (Table 2 and the released config.json) as pre-trained, at 8192
    # positions: 28 layers, 7 of them full attention (3, 7, ..., 27), 12.15B parameters of which 2.44B
    # are active per token. The released checkpoint adds YaRN x16 on the full layers for 131072
    # positions (§4: config_from_hf reads it from the released config.json; train.py's LONG_RUNS holds
    # that stage's recipe, which train.py itself runs only on models of this project's vocabulary).
    "mellum2-12b": Mellum2Config(bos_token_id=0, eos_token_id=28),
    # Trains on a 2-core laptop CPU in minutes and keeps every structural feature: the 3:1 sliding /
    # full pattern (one full layer of four), a window (64) shorter than the training sequence (256),
    # GQA groups of 2, 16 experts with 2 active (the report's 1/8), and the MTP layer. The vocabulary
    # is the project's own 4096-token BPE (see data.py); dimensions are multiples of 64.
    "tiny": Mellum2Config(
        vocab_size=4096, n_layer=4, n_embd=256, n_head=4, n_kv_head=2, head_dim=64,
        n_expert=16, n_expert_active=2, expert_dim=256, sliding_window=64, max_seq_len=256,
        eos_token_id=4080,
    ),
    # One GPU: 12 layers (3 full), 32 experts with 4 active, window 256 against 1024-token sequences.
    "small": Mellum2Config(
        vocab_size=4096, n_layer=12, n_embd=768, n_head=12, n_kv_head=4, head_dim=64,
        n_expert=32, n_expert_active=4, expert_dim=384, sliding_window=256, max_seq_len=1024,
        eos_token_id=4080,
    ),
}


def dense_config(config):
    """The dense model with the same active parameters, the other side of the MoE trade-off §2.1.2
    weighs: one "expert" as wide as the K active ones, so each token meets the same number of
    weights, always the same ones."""
    return replace(config, n_expert=1, n_expert_active=1, expert_dim=config.n_expert_active * config.expert_dim)


def pick_device(requested=None):
    """The device to run on: the one asked for, else CUDA, then Apple's MPS, then the CPU."""
    if requested is not None:  # an empty --device "" is a mistake, not a request for the default
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise ValueError(f"unknown device {requested!r} (cpu, cuda, cuda:N, mps)") from None
        available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        missing_gpu = device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()
        if not available.get(device.type) or missing_gpu:
            raise ValueError(f"device {requested!r} is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device):
    """bf16 on GPUs with bf16 matrix units, Ampere (compute capability 8) and later (the report
    trains in BF16, §3.4.4); fp32 elsewhere: older GPUs only emulate bf16 (slowly, and Triton cannot
    compile bf16 dots for them), CPUs without bf16 instructions run bf16 matmuls slowly, CPU runs are
    where results are compared against references, and MPS has known bf16 numerics problems."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float32


# -----------------------------------------------------------------------------------------------
# RMSNorm (Table 2: RMSNorm, eps 1e-6)

class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps) over the last dim. The statistics are computed in fp32 even
    under bf16, because the mean of squares of 2304 bf16 numbers loses too many bits; the gain is
    applied after casting back. (PyTorch's F.rms_norm gives the same numbers a little faster than
    spelling it out, and decoding runs four norms per layer on single vectors, where that adds up.)"""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        """x (..., dim) of any float dtype -> the same shape, normalised over the last dim, in x's dtype
        or the gain's if that is wider: fp32 gains on bf16 activations (autocast) give fp32, as in
        transformers."""
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


# -----------------------------------------------------------------------------------------------
# Rotary position embeddings, and layer-selective YaRN (§2.2, §4.1 Layer-Selective YaRN)

def stretched_by_yarn(config, layer_type):
    """Whether YaRN changes this layer type's RoPE: full layers only (yarn_layers="full", the
    report's choice) or every layer ("all", for comparison)."""
    return config.yarn_factor != 1.0 and (layer_type == "full_attention" or config.yarn_layers == "all")


@functools.lru_cache  # a config is frozen: compute each layer type's frequencies once, not every step
def rope_inv_freq(config, layer_type):
    """Per-pair rotation frequencies (hd/2,) and the factor that multiplies cos and sin.

    Sliding layers only ever look 1024 tokens back, a span they were trained on, so they keep plain
    RoPE forever. Full layers see the whole context; to stretch them from 8K to 128K, YaRN slows down
    only the pairs that rotate less than about once over the original context (they never saw a full
    turn, so their angles beyond 8K would be new to the model) and leaves the fast pairs untouched,
    with a linear ramp between. It also sharpens attention by `attention_factor` on cos and sin.
    """
    hd = config.head_dim
    # Written as transformers writes it, so the frequencies agree to the bit: one unit in the last
    # place is 0.016 radians at position 131072.
    wavelengths = config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)  # (hd/2,), over 2 pi
    base = 1.0 / wavelengths
    if not stretched_by_yarn(config, layer_type):
        return base, 1.0

    s, original = config.yarn_factor, config.yarn_original_max_seq_len

    def pair_index_for(rotations):  # the pair j that turns `rotations` times over the original context
        return hd * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(config.rope_theta))

    low = max(math.floor(pair_index_for(config.yarn_beta_fast)), 0)      # 18 for the released model
    high = min(math.ceil(pair_index_for(config.yarn_beta_slow)), hd - 1)  # 35 for the released model
    j = torch.arange(hd // 2, dtype=torch.float32)
    ramp = ((j - low) / max(high - low, 1e-3)).clamp(0, 1)  # 0: keep the frequency, 1: divide it by s
    keep = 1 - ramp  # and 1 - keep below, not ramp: transformers' rounding
    inv_freq = 1.0 / (s * wavelengths) * (1 - keep) + base * keep
    attention_factor = config.yarn_attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(s) + 1.0
    return inv_freq, attention_factor


def rope_cos_sin(inv_freq, attention_factor, positions, dtype):
    """cos and sin tables of shape (..., T, hd) for absolute `positions` (..., T): (T,) when every
    row of a batch starts at 0 (training), (B, T) when rows are at different points (decoding)."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device)  # (..., T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, hd): pair j is (dim j, dim j + hd/2)
    return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)


def apply_rope(x, cos, sin):
    """Rotate each pair (x_j, x_{j+hd/2}) of x (B, T, heads, hd) by its angle: the "rotate-half"
    (GPT-NeoX) pairing of the released checkpoint, not the interleaved (x_2j, x_2j+1) one."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (..., T, 1, hd): the same angle for every head
    return x * cos + rotated * sin


# -----------------------------------------------------------------------------------------------
# Attention: GQA with QK-norm, causal, sliding window on 3 of 4 layers (§2.1.4, §2.2)

def attention_mask(q_positions, k_positions, window=None):
    """(..., Tq, Tk) boolean mask for positions (..., Tq) and (..., Tk), True where the query may
    look: causal, and for a sliding layer only the key at the query's own position and the window-1
    positions before it."""
    q, k = q_positions[..., :, None], k_positions[..., None, :]  # (..., Tq, 1), (..., 1, Tk)
    # Compared as they are rather than through their difference: a (..., Tq, Tk) matrix of int64
    # distances is 8x the size of the boolean mask (a 0.5 GiB matrix for an 8192-token sequence).
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed


def sdpa_attend(q, k, v, mask, window):
    """softmax(q k^T / sqrt(hd) + mask) v for q (B, H, Tq, hd) and k, v (B, Hkv, Tk, hd). mask None
    means plain causal; otherwise it already holds the causal window (`window` is for kernels that
    skip the blocks outside it). enable_gqa lets each group of H // Hkv query heads read the same K/V
    head, so K and V are never stored as H heads: the KV cache stays 8x smaller. (Whether attention
    also reads them in place depends on SDPA's backend: the CPU kernel does; on CUDA, the math path
    that a mask selects copies them to H heads for the call.)"""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)


class Attention(nn.Module):

    def __init__(self, config, layer_type):
        super().__init__()
        self.config = config
        self.layer_type = layer_type
        D, H, Hkv, hd = config.n_embd, config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(D, H * hd, bias=False)
        self.k_proj = nn.Linear(D, Hkv * hd, bias=False)
        self.v_proj = nn.Linear(D, Hkv * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, D, bias=False)
        # QK-norm normalises each head's query and key to unit RMS (times a learned gain) so attention
        # logits cannot grow without bound, the usual source of loss spikes in long training runs.
        # It acts on one head's hd dims, and before RoPE: rotating first would mix in the position.
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        self.window = config.sliding_window if layer_type == "sliding_attention" else None
        # The seam for a faster attention kernel: kernels.py replaces this function; the default is
        # PyTorch's scaled_dot_product_attention.
        self.attend = sdpa_attend

    def forward(self, x, cos, sin, mask, cache=None, positions=None):
        """x (B, T, D) -> (B, T, D). With a LayerCache, the new keys and values join those of the
        tokens before (positions (B, T) say where the new tokens are) and the cache makes the mask."""
        B, T, _ = x.shape
        hd = self.config.head_dim
        q = self.q_norm(self.q_proj(x).view(B, T, self.config.n_head, hd))     # (B, T, H, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.config.n_kv_head, hd))  # (B, T, Hkv, hd)
        v = self.v_proj(x).view(B, T, self.config.n_kv_head, hd)               # (B, T, Hkv, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v, mask = cache.update(k, v, positions)  # (B, S or S+T, Hkv, hd) x 2 and the mask; S: slots in use
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T or keys, hd), the layout SDPA wants
        y = self.attend(q, k, v, mask, self.window)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


# -----------------------------------------------------------------------------------------------
# Mixture of experts (§2.1.2 Expert Configuration, §3.4.5 MoE-Specific Training)

def in_compute_dtype(*tensors):
    """The tensors in autocast's dtype when autocast is on, else in the first one's dtype. Autocast
    covers neither torch's private grouped matmul nor custom kernels, which want one dtype."""
    device = tensors[0].device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensors[0].dtype
    return [t.to(dtype) for t in tensors]


def grouped_mm(x, w, offsets):
    """Multiply consecutive row groups of x (M, in) by their own matrix w[g] (G, in, out): rows
    offsets[g-1]:offsets[g] use w[g]."""
    x, w = in_compute_dtype(x, w)
    # torch's kernel wants rows whose bytes are a multiple of 16 (dims of 4 in fp32, 8 in bf16)
    rows_fit = all(n * x.element_size() % 16 == 0 for n in (x.shape[-1], w.shape[-1]))
    if rows_fit and (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
                     or x.device.type == "cuda" and x.dtype == torch.bfloat16):
        return torch._grouped_mm(x, w, offs=offsets)
    # Elsewhere (MPS, fp32 on CUDA, float64, odd sizes) one matmul per contiguous group.
    starts = [0] + offsets[:-1].tolist()
    return torch.cat([x[s:e] @ w[g] for g, (s, e) in enumerate(zip(starts, offsets.tolist()))])


class MoE(nn.Module):
    """Top-K routing over E SiLU-gated experts, dropless: every token reaches all K of its experts,
    however unbalanced the router is (no capacity factor; §3.4.5 found no quality difference and
    dropless is what inference does anyway)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        E, D, F_ = config.n_expert, config.n_embd, config.expert_dim
        self.gate = nn.Linear(D, E, bias=False)  # the router: one logit per expert
        # Expert weights stacked on a leading expert axis, [out, in] per expert like nn.Linear.
        self.gate_proj = nn.Parameter(torch.empty(E, F_, D))
        self.up_proj = nn.Parameter(torch.empty(E, F_, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))
        # The seam for lower-precision expert matmuls: train.py --fp8 replaces this function; the
        # default is torch's grouped matmul. (kernels.py's Triton path replaces experts_grouped as a
        # whole, and comes back here when this seam is replaced.)
        self.grouped_mm = grouped_mm

    def route(self, x):
        """Router logits (N, E), the renormalised weights (N, K) and expert ids (N, K) of each token."""
        # The router runs in fp32 (§3.4.5, App. B): in bf16, near-tied logits flip which experts win.
        if torch.is_autocast_enabled(x.device.type):  # it would run the matmul in bf16 whatever its inputs
            with torch.autocast(x.device.type, enabled=False):
                return self.route(x)
        logits = F.linear(x.float(), self.gate.weight.float())       # (N, E)
        probs = logits.softmax(dim=-1)                               # softmax over all E experts
        top_probs, top_experts = probs.topk(self.config.n_expert_active, dim=-1)  # (N, K)
        # Renormalise the K chosen probabilities to sum to 1 (norm_topk_prob): the expert mix keeps
        # unit weight even when the router is unsure, instead of shrinking the MoE output.
        weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), top_experts

    def experts_loop(self, x, weights, experts):
        """The reference: for each expert, gather its tokens, run the SiLU-gated MLP, and add the
        weighted result back. Slow (3 small matmuls per expert, plus bookkeeping) but obvious."""
        out = torch.zeros_like(x)  # (N, D)
        for e in range(self.config.n_expert):
            token, slot = (experts == e).nonzero(as_tuple=True)  # tokens that chose e, and in which slot
            if token.numel() == 0:
                continue
            h = F.silu(x[token] @ self.gate_proj[e].T) * (x[token] @ self.up_proj[e].T)  # (n_e, F)
            out.index_add_(0, token, (h @ self.down_proj[e].T) * weights[token, slot, None])
        return out

    def experts_grouped(self, x, weights, experts):
        """The default: sort the N*K (token, expert) pairs by expert so each expert's tokens are one
        contiguous block, then run all experts with three grouped matmuls. Same numbers as the loop."""
        K = self.config.n_expert_active
        flat_experts = experts.flatten()                      # (N*K,), pair p = token p // K, slot p % K
        order = flat_experts.argsort(stable=True)             # pairs sorted by expert
        token = order // K                                    # (N*K,) token of each sorted pair
        counts = torch.bincount(flat_experts, minlength=self.config.n_expert)  # (E,) dropless: no cap
        offsets = counts.cumsum(0).to(torch.int32)            # (E,) end of each expert's block
        xs = x[token]                                         # (N*K, D), gathered in expert order
        gate, up = self.grouped_mm(xs, self.gate_proj.mT, offsets), self.grouped_mm(xs, self.up_proj.mT, offsets)
        h = F.silu(gate) * up                                 # (N*K, F)
        ys = self.grouped_mm(h, self.down_proj.mT, offsets)   # (N*K, D)
        ys = ys * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token, ys)   # sum each token's K expert outputs

    def experts_per_token(self, x, weights, experts):
        """Decoding: each token runs its K experts one after another, the MoE formula as written.
        With one or two tokens per step this costs a few small matmuls per chosen expert, where the
        grouped matmul on a CPU walks all E groups and sorts the tokens first."""
        gate_proj, up_proj, down_proj = self.gate_proj, self.up_proj, self.down_proj
        rows = []
        for x_t, w_t, chosen in zip(x.split(1), weights, experts.tolist()):  # x_t (1, D), w_t (K,)
            y = 0
            for w, e in zip(w_t.unbind(), chosen):
                h = F.silu(F.linear(x_t, gate_proj[e])) * F.linear(x_t, up_proj[e])  # (1, F)
                y = y + w * F.linear(h, down_proj[e])  # (1, D)
            rows.append(y)
        return torch.cat(rows)  # (N, D)

    def forward(self, x):
        """x (B, T, D) -> (output (B, T, D), router logits (N, E), chosen experts (N, K))."""
        B, T, D = x.shape
        x = x.reshape(B * T, D)
        logits, weights, experts = self.route(x)
        if self.config.moe_impl == "loop":
            run = self.experts_loop
        elif x.device.type == "cpu" and experts.numel() < self.config.n_expert:
            run = self.experts_per_token  # fewer (token, expert) pairs than experts: decoding
        else:
            run = self.experts_grouped
        return run(x, weights, experts).view(B, T, D), logits, experts


def load_balancing_loss(logits, experts, n_expert):
    """Switch-Transformer balance loss of one layer over the tokens it is given (§3.4.5 counts over
    the global batch; train.py gives it each micro-batch, see the README's notes): E * sum_e f_e * P_e,
    with f_e the fraction of the N*K routing slots that went to expert e and P_e the mean router
    probability of e. Only P_e carries a gradient; it pushes probability away from overloaded experts.
    We normalise f_e by N*K, so a perfectly balanced router scores exactly 1 (transformers'
    `load_balancing_loss_func` normalises by N and scores K instead, and pools all layers' statistics
    into one product; Megatron, like Mellum2.forward, adds each layer's own)."""
    f = torch.bincount(experts.flatten(), minlength=n_expert).float() / experts.numel()  # (E,)
    P = logits.softmax(dim=-1).mean(dim=0)                                               # (E,)
    return n_expert * (f * P).sum()


def router_z_loss(logits):
    """ST-MoE z-loss: mean squared log-sum-exp of the router logits. It keeps the logits small, where
    fp32 softmax stays accurate and the router stays responsive."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


# -----------------------------------------------------------------------------------------------
# The decoder block, and the MTP layer (§2.1.5 Multi-Token Prediction)

class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + moe(norm(x))."""

    def __init__(self, config, layer_type):
        super().__init__()
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_type)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = MoE(config)

    def forward(self, x, rope, masks, cache=None, positions=None, last_only=False):
        """x (B, T, D) -> (output (B, T, D), router logits (B*T, E), chosen experts (B*T, K)). With
        last_only, the last position's alone ((B, 1, D), and B rows of routing): when only its output
        is wanted (drafting), the others have done their part once their keys and values are in the
        cache, and skip the MoE, a decoding step's costliest part."""
        cos, sin = rope[self.layer_type]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, masks[self.layer_type], cache, positions)
        if last_only:
            x = x[:, -1:]  # (B, 1, D)
        moe_out, router_logits, experts = self.mlp(self.post_attention_layernorm(x))
        return x + moe_out, router_logits, experts


class MTP(nn.Module):
    """The multi-token-prediction layer. At position t it combines what the trunk knows (its final,
    normalised hidden state h_t) with the token that actually comes next (t+1), and predicts t+2:

        x = fc([norm(embed(token_{t+1})), norm(h_t)])     2D -> D, embedding first
        y = norm(Block(x))                                 one sliding-attention MoE block
        logits_{t+2} = lm_head(y)                          the trunk's own head and embedding

    Training it (weight 0.1) makes the trunk's states carry information about more than one future
    token (Table 1: +10.4 HumanEval; §2.1.5: at +7% training time). At inference it is a draft model
    that needs no training of its own: given the token the trunk just chose, it guesses the one
    after, and the trunk checks the guess (sample.py --speculative).
    Parameter names follow the released checkpoint's `mtp.*` tensors."""

    def __init__(self, config):
        super().__init__()
        D = config.n_embd
        self.pre_fc_norm_embedding = RMSNorm(D, config.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(D, config.rms_norm_eps)
        self.fc = nn.Linear(2 * D, D, bias=False)
        self.layers = nn.ModuleList([Block(config, "sliding_attention")])
        self.norm = RMSNorm(D, config.rms_norm_eps)

    def forward(self, next_token_emb, hidden, rope, masks, cache=None, positions=None, last_only=False):
        """next_token_emb, hidden: (B, T', D), aligned so that position t holds embed(token_{t+1})
        and h_t. Returns the normalised output (B, T', D), or (B, 1, D) for the last position alone
        (last_only, see Block), and the block's router logits and experts."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(next_token_emb),
                               self.pre_fc_norm_hidden(hidden)], dim=-1))  # (B, T', D)
        x, router_logits, experts = self.layers[0](x, rope, masks, cache, positions, last_only)
        return self.norm(x), router_logits, experts


# -----------------------------------------------------------------------------------------------
# The KV cache: decoding one token at a time re-uses the keys and values of every token before

class Slots:
    """Which position each slot of a cache buffer holds, per row of a batch (-1 = none). A full-attention
    layer keeps every position (slot = position), so its keys fill the buffer from the front and
    attention reads only the filled part, however long the buffer. A sliding layer keeps a rolling
    buffer of the last `size` = window + spare positions (slot = position % size): its memory stays
    O(window) however long the text grows. The spare slots (8, a few more than decoding steps need)
    let a step of up to spare + 1 tokens be stored before it attends, and let speculative decoding
    take back a rejected token without losing keys that are still inside the window. Every trunk
    layer of one type stores the same positions in the same slots, so they share one Slots: a step's
    bookkeeping (where the new tokens go, what each may attend to), a dozen small ops, runs once per
    layer type instead of once per layer."""

    def __init__(self, batch_size, size, window, device):
        self.pos = torch.full((batch_size, size), -1, device=device)  # (B, S)
        self.rows = torch.arange(batch_size, device=device)[:, None]   # (B, 1), to index a slot per row
        self.window = window
        self.placed = self.placement = None  # the positions of the step in progress, and the answer

    def in_use(self, held):
        """How many slots from the front hold keys, given positions `held` that include the highest
        one stored: a full layer's slots 0..highest, a sliding layer's whole rolling buffer."""
        return self.pos.shape[1] if self.window else int(held.max()) + 1

    def place(self, positions):
        """Record the positions (B, T) of a step's new tokens (-1 = padding) -> (target, source, mask,
        end): the slots the new keys go to, which of the new keys go there (None: all of them, stored
        before attending), what each new token may attend to, (B, 1, T, end) or (B, 1, T, end+T), and
        how many slots from the front it reads. Every layer of the type passes the same positions
        tensor in a step; the first call does the work."""
        if positions is self.placed:
            return self.placement
        size = self.pos.shape[1]
        if positions.min() >= 0 and positions.shape[1] <= size - (self.window or 0) + 1:
            # Decoding: a few consecutive positions. Each gets a slot of its own, and none of the
            # slots they overwrite holds a key still inside the window, so the new keys are stored
            # first and the queries attend over the buffer itself, with no copy of it.
            target, source = (self.rows, positions % size), None
            self.pos[target] = positions
            end = self.in_use(positions)
            allowed = attention_mask(positions, self.pos[:, :end], self.window) & (self.pos[:, None, :end] >= 0)
        else:
            # A padded batch or a long prompt, whose later tokens would overwrite keys its earlier
            # tokens still need: they attend over the old buffer and the new keys side by side, and
            # then the real tokens are stored, of a chunk longer than the buffer only the last `size`.
            end = self.in_use(self.pos)
            key_positions = torch.cat([self.pos[:, :end], positions], dim=1)  # (B, end+T)
            allowed = attention_mask(positions, key_positions, self.window) & (key_positions >= 0)[:, None, :]
            allowed |= (positions < 0)[:, :, None]  # a padding query may look anywhere; its output is unused
            keep = (positions >= 0) & (positions > positions.max(dim=1, keepdim=True).values - size)
            rows, cols = keep.nonzero(as_tuple=True)
            target, source = (rows, positions[rows, cols] % size), (rows, cols)
            self.pos[target] = positions[source]
        self.placed, self.placement = positions, (target, source, allowed[:, None], end)
        return self.placement

    def rollback(self, lengths):
        """Forget positions >= lengths (B,), e.g. a rejected speculative token."""
        self.pos[self.pos >= lengths[:, None]] = -1
        self.placed = self.placement = None


class LayerCache:
    """The keys and values one attention layer has seen, per row of a batch, in the slots its Slots
    assigns. Only the n_kv_head heads are stored, so GQA makes the cache 8x smaller than caching 32."""

    def __init__(self, slots, config, dtype):
        shape = (*slots.pos.shape, config.n_kv_head, config.head_dim)
        self.k = torch.zeros(shape, device=slots.pos.device, dtype=dtype)  # (B, S, Hkv, hd)
        self.v = torch.zeros(shape, device=slots.pos.device, dtype=dtype)
        self.slots = slots

    def update(self, k, v, positions):
        """New keys and values (B, T, Hkv, hd) at positions (B, T) are stored -> the keys and values
        to attend to (B, end or end+T, Hkv, hd) and the mask (B, 1, T, end or end+T)."""
        target, source, mask, end = self.slots.place(positions)
        if source is None:
            self.k[target], self.v[target] = k, v
            return self.k[:, :end], self.v[:, :end], mask
        keys, values = torch.cat([self.k[:, :end], k], dim=1), torch.cat([self.v[:, :end], v], dim=1)
        self.k[target], self.v[target] = k[source], v[source]
        return keys, values, mask


class KVCache:
    """One LayerCache per trunk layer (and one for the MTP block), and how many tokens each row holds."""

    def __init__(self, config, batch_size, max_len, device=None, dtype=torch.float32, spare=8):
        def slots(layer_type):
            sliding = layer_type == "sliding_attention"
            size = min(config.sliding_window + spare, max_len) if sliding else max_len
            return Slots(batch_size, size, config.sliding_window if sliding else None, device)

        self.trunk_slots = {t: slots(t) for t in sorted(set(config.layer_types))}  # shared by the layers of a type
        self.layers = [LayerCache(self.trunk_slots[t], config, dtype) for t in config.layer_types]
        # The MTP block reads positions behind the trunk's, so it has slots of its own.
        self.layers += [LayerCache(slots("sliding_attention"), config, dtype) for _ in range(config.n_mtp)]
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens per row
        self.max_len = max_len

    def advance(self, n, pad=None):
        """Positions (B, n) for the next n tokens of each row (-1 where pad (B, n) is True)."""
        if pad is None:
            positions = self.length[:, None] + torch.arange(n, device=self.length.device)
            length = self.length + n
        else:
            positions = (self.length[:, None] + (~pad).cumsum(dim=1) - 1).masked_fill(pad, -1)
            length = self.length + (~pad).sum(dim=1)
        if length.max() > self.max_len:  # refused before anything changes: the cache stays usable
            raise ValueError(f"the cache holds at most {self.max_len} tokens per row")
        self.length = length
        return positions

    def rollback(self, lengths):
        """Shorten each row to lengths (B,) tokens in the trunk's layers. (The MTP block only ever
        reads tokens the trunk has confirmed, so its cache never needs taking back.)"""
        self.length = lengths.clone()
        for slots in self.trunk_slots.values():
            slots.rollback(lengths)


# -----------------------------------------------------------------------------------------------
# The model

class Mellum2(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList([Block(config, t) for t in config.layer_types])
        self.norm = RMSNorm(config.n_embd, config.rms_norm_eps)
        # Untied: with a 98K vocabulary the input and output roles of a token differ enough that
        # separate matrices pay for their 226M parameters (Table 2).
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.mtp = MTP(config) if config.n_mtp else None
        self.loss_parts = {}  # the loss parts and expert load of the last forward with targets, for logging
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """All initialisation in one place, as the released config describes it (initializer_range):
        every matrix, the stacked experts and the router ~ N(0, 0.02); every RMSNorm gain = 1. The
        gains are found by type, not by name: the MTP layer's two input norms are called
        pre_fc_norm_embedding and pre_fc_norm_hidden."""
        for p in self.parameters():
            p.normal_(0.0, self.config.init_std)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def rope(self, positions, dtype):
        """cos and sin for each layer type at `positions`, shared by all layers of that type, and by
        both types while they turn alike (before YaRN stretches the full layers)."""
        sliding = rope_cos_sin(*rope_inv_freq(self.config, "sliding_attention"), positions, dtype)
        if stretched_by_yarn(self.config, "sliding_attention") == stretched_by_yarn(self.config, "full_attention"):
            return {"sliding_attention": sliding, "full_attention": sliding}
        full = rope_cos_sin(*rope_inv_freq(self.config, "full_attention"), positions, dtype)
        return {"sliding_attention": sliding, "full_attention": full}

    def trunk(self, idx, cache=None, pad=None):
        """The transformer without its head: idx (B, T) -> final normalised states h (B, T, D) and
        the (router logits, chosen experts) of every layer. With a KVCache the tokens continue what
        the cache holds; pad (B, T) marks left padding in a batch of prompts of different lengths."""
        x = self.embed_tokens(idx)  # (B, T, D)
        if cache is None:
            positions = torch.arange(idx.shape[1], device=idx.device)  # (T,), the same for every row
            # Full layers pass mask=None so SDPA can use its built-in causal path.
            masks = {"full_attention": None,
                     "sliding_attention": attention_mask(positions, positions, self.config.sliding_window)}
            layer_caches = [None] * len(self.layers)
        else:
            positions = cache.advance(idx.shape[1], pad)  # (B, T), -1 at padding
            masks = {"full_attention": None, "sliding_attention": None}  # each LayerCache makes its own
            layer_caches = cache.layers
        rope = self.rope(positions.clamp(min=0), x.dtype)
        routing = []
        for layer, layer_cache in zip(self.layers, layer_caches):
            x, router_logits, experts = layer(x, rope, masks, layer_cache, positions)
            routing.append((router_logits, experts))
        return self.norm(x), routing

    def forward(self, idx, targets=None, pad=None):
        """idx (B, T) token ids -> logits (B, T, V) and, with targets (B, T) (the next token at each
        position, IGNORE_INDEX where there is none), the total loss
            L = L_ntp + 0.1 * L_mtp + 1e-3 * sum over MoE layers (L_aux + L_z)
        whose detached parts land in `self.loss_parts` for logging. pad (B, T) marks right padding
        (SFT batches): causal attention keeps it from the real tokens, and it is left out of the
        routing statistics, as transformers leaves out the positions its attention mask hides."""
        T = idx.shape[1]
        cfg = self.config
        h, routing = self.trunk(idx)  # (B, T, D)
        logits = self.lm_head(h)  # (B, T, V)
        if targets is None:
            return logits, None

        ntp_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        loss = ntp_loss
        parts = {"ntp": ntp_loss}
        if self.mtp is not None and T >= 2:
            # Position t sees h_t and embed(idx_{t+1}) = embed(token t+1) and predicts targets_{t+1},
            # the token at t+2; the last position has no token t+1, so the MTP sequence is T-1 long.
            # RoPE is relative, so numbering the MTP positions 0..T-2 or 1..T-1 gives the same result.
            positions = torch.arange(T - 1, device=idx.device)
            mtp_masks = {"sliding_attention": attention_mask(positions, positions, cfg.sliding_window)}
            y, router_logits, experts = self.mtp(self.embed_tokens(idx[:, 1:]), h[:, :-1],
                                                 self.rope(positions, h.dtype), mtp_masks)
            routing.append((router_logits, experts))
            mtp_logits = self.lm_head(y)  # (B, T-1, V)
            mtp_loss = F.cross_entropy(mtp_logits.float().flatten(0, 1), targets[:, 1:].flatten(),
                                       ignore_index=IGNORE_INDEX)
            loss = loss + cfg.mtp_loss_weight * mtp_loss
            parts["mtp"] = mtp_loss
        if pad is not None:  # padding is no token the experts serve: route statistics over real ones only
            # Each layer's (logits (N, E), experts (N, K)) keep their real rows: N = B*T in the trunk,
            # B*(T-1) in the MTP block, whose position t is padding when token t+1 is.
            real = [~pad.flatten()] * cfg.n_layer + [~pad[:, 1:].flatten()] * (len(routing) - cfg.n_layer)
            routing = [(lg[keep], ex[keep]) for (lg, ex), keep in zip(routing, real)]
        # Balance and z-losses: every MoE layer (the MTP block's included) adds its own with the full
        # coefficient, as Megatron, where the report's 1e-3 were set (App. B), attaches coef * loss to
        # each router. The pull on one router is then the same whatever the depth; averaging over
        # layers would weaken it 29-fold in the released model. Logged as the mean over layers, so
        # the logged aux loss is 1 at perfect balance.
        aux_loss = torch.stack([load_balancing_loss(lg, ex, cfg.n_expert) for lg, ex in routing])  # (layers,)
        z_loss = torch.stack([router_z_loss(lg) for lg, _ in routing])                             # (layers,)
        loss = loss + cfg.aux_loss_coef * aux_loss.sum() + cfg.z_loss_coef * z_loss.sum()
        parts.update(aux=aux_loss.mean(), z=z_loss.mean())
        self.loss_parts = {k: v.detach() for k, v in parts.items()}
        # Fraction of routing slots each expert received, per trunk layer: (n_layer, E), 1/E = balanced.
        self.loss_parts["expert_load"] = torch.stack(
            [torch.bincount(ex.flatten(), minlength=cfg.n_expert) / ex.numel() for _, ex in routing[:cfg.n_layer]])
        return logits, loss

    def draft(self, h, next_idx, cache, positions):
        """Inference with the MTP layer: h (B, T', D), the trunk's final states at positions p - 1,
        and next_idx (B, T'), the tokens at p (positions (B, T')) -> logits (B, V) for the token after
        the last one. The MTP block's own LayerCache (the KVCache's last) keeps the earlier pairs; of
        several new pairs only the last goes through the block's MoE (last_only)."""
        masks = {"sliding_attention": None}
        y, _, _ = self.mtp(self.embed_tokens(next_idx), h, self.rope(positions, h.dtype), masks,
                           cache.layers[-1], positions, last_only=True)
        return self.lm_head(y[:, -1])

    def num_params(self, active=False, include_mtp=False):
        """Parameters of the trunk, embedding and head included. With active=True only K of the E
        experts of each layer count: the parameters one token actually uses."""
        total = 0
        for name, p in self.named_parameters():
            if name.startswith("mtp.") and not include_mtp:
                continue
            n = p.numel()
            if active and name.endswith(("gate_proj", "up_proj", "down_proj")):
                n = n * self.config.n_expert_active // self.config.n_expert
            total += n
        return total

    # -------------------------------------------------------------------------------------------
    # The Hugging Face checkpoint format: config.json plus safetensors shards, experts stored one
    # tensor per expert, the trunk under "model.", the MTP layer under "mtp.".

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None):
        """Load a local Hugging Face directory: the released checkpoint, or one we exported. Raises
        CheckpointError naming the missing, unexpected or mis-shaped tensors (state_mismatch).

        Memory peaks near one copy of the model (24 GB for the released one in bf16), not two: each
        tensor goes to the device and dtype as it is read from the memory-mapped shards, and each
        layer's stack of experts replaces its experts' matrices as soon as it is made."""
        config = read_hf_config(path)
        device = pick_device(device)
        tensors = read_safetensors(path, device, dtype or pick_dtype(device))
        # The MTP layer is optional in released checkpoints, and config.json may leave out its count
        # (transformers' MellumForCausalLM skips mtp.* either way): it has the layers whose tensors are there.
        config = replace(config, n_mtp=len({k.split(".")[2] for k in tensors if k.startswith("mtp.layers.")}))
        state = hf_to_state_dict(tensors, config)
        with torch.device("meta"):
            model = cls(config)
        problems = state_mismatch(model, state)
        if problems:
            raise CheckpointError(f"{path}: checkpoint does not match its config.json: {problems}")
        model.load_state_dict(state, assign=True)
        return model

    def save_pretrained(self, path, max_shard_bytes=5 * 2**30):
        """Write config.json and safetensors shards that `transformers` loads as MellumForCausalLM
        (it reads the trunk and ignores mtp.*), replacing an export already in the folder. Each file
        is written whole, then renamed into place."""
        os.makedirs(path, exist_ok=True)
        tensors = state_dict_to_hf(self.state_dict(), self.config)
        shards, current, size = [], {}, 0
        for key, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[key] = t
            size += nbytes
        shards.append(current)
        if len(shards) == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
            text = json.dumps(index, indent=2)
            write_atomically(os.path.join(path, "model.safetensors.index.json"), lambda tmp: Path(tmp).write_text(text))
        for name, shard in zip(names, shards):
            write_atomically(os.path.join(path, name), lambda tmp, shard=shard: save_file(shard, tmp, {"format": "pt"}))
        dtype = next(iter(tensors.values())).dtype
        text = json.dumps(config_to_hf(self.config, dtype), indent=2)
        write_atomically(os.path.join(path, "config.json"), lambda tmp: Path(tmp).write_text(text))
        # An earlier export's shards and index go: a folder must hold one checkpoint, or a loader may
        # read old tensors (transformers prefers a model.safetensors to an index beside it).
        written = set(names) | ({"model.safetensors.index.json"} if len(shards) > 1 else set())
        for name in os.listdir(path):
            if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json", name) \
                    and name not in written:
                os.remove(os.path.join(path, name))


def state_mismatch(model, state, shown=4):
    """Why the tensors `state` (name -> tensor) do not load into `model`, in one short line; "" when
    they do. The first few problems and how many more: a config.json with one layer too many
    misses a dozen tensors, and an error line naming them all would hide the cause."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    problems = [f"missing {k} {tuple(s)}" for k, s in expected.items() if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k} has shape {tuple(state[k].shape)}, expected {tuple(s)}"
                 for k, s in expected.items() if k in state and state[k].shape != s]
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, or does not fit its configuration."""


def read_hf_config(path):
    """The Mellum2Config of a Hugging Face directory's config.json; an error names the file."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        with open(file) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable config ({e})") from None
    try:
        return config_from_hf(hf)
    except CheckpointError as e:  # its message starts "config.json: "
        raise CheckpointError(os.path.join(path, str(e))) from None


def read_safetensors(path, device="cpu", dtype=None):
    """Every tensor of the checkpoint's safetensors shards, the ones model.safetensors.index.json lists
    or, without one, every *.safetensors file in the directory, by name, on `device` and in `dtype`
    (None: as stored)."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    index = os.path.join(path, "model.safetensors.index.json")  # a sharded checkpoint lists its shards
    if os.path.isfile(index):
        try:
            with open(index) as f:
                listed = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable ({type(e).__name__}: {e})") from None
        if missing := sorted(listed - set(files)):
            raise CheckpointError(f"{path}: missing {', '.join(missing)}, listed in model.safetensors.index.json "
                                  f"(a download not finished?)")
        files = sorted(listed)  # and only those: another file there is not part of this checkpoint
    tensors = {}
    for name in files:
        try:
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if not t.is_floating_point():  # converted to `dtype`, integers would pass for weights
                        raise CheckpointError(f"{os.path.join(path, name)}: {key} holds {t.dtype} values, where "
                                              f"weights are floating-point")
                    tensors[key] = t.to(device=device, dtype=dtype)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise CheckpointError(f"{os.path.join(path, name)}: unreadable safetensors file ({e})") from None
    return tensors


EXPERT_KEY = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def hf_to_state_dict(tensors, config):
    """Checkpoint names -> ours: strip "model.", and stack the per-expert matrices of each layer
    (layers.N.mlp.experts.e.gate_proj.weight, e = 0..E-1) into one (E, out, in) tensor. `tensors` is
    emptied on the way and each stack is made as soon as its last expert arrives, so that the experts'
    own matrices (91% of the released model) are let go one layer at a time rather than held beside
    their stacks. A layer with experts absent is left out, and an expert numbered beyond the config's
    count kept under its own name: the caller reports the stack as missing and the expert as unexpected."""
    state, experts = {}, {}
    for key in list(tensors):
        t = tensors.pop(key)
        match = EXPERT_KEY.match(key)
        if not match or int(match[2]) >= config.n_expert:  # not an expert's, or one the config does not count
            state[key.removeprefix("model.")] = t
            continue
        prefix, e, proj = match.groups()
        by_index = experts.setdefault((prefix, proj), {})
        by_index[int(e)] = t
        if sorted(by_index) == list(range(config.n_expert)):
            stack = torch.stack([by_index[i] for i in range(config.n_expert)])  # (E, out, in)
            state[f"{prefix.removeprefix('model.')}.{proj}"] = stack
            del experts[prefix, proj]
    return state


def state_dict_to_hf(state, config):
    """Ours -> checkpoint names: the inverse of hf_to_state_dict."""
    tensors = {}
    for key, t in state.items():
        name = key if key.startswith(("mtp.", "lm_head.")) else "model." + key
        proj = key.rsplit(".", 1)[-1]
        if proj in ("gate_proj", "up_proj", "down_proj"):
            base = name.rsplit(".", 1)[0]
            for e in range(config.n_expert):
                tensors[f"{base}.experts.{e}.{proj}.weight"] = t[e].contiguous()
        else:
            tensors[name] = t.contiguous()
    return tensors


def config_to_hf(config, dtype=torch.float32):
    """Our config as the released config.json spells it (transformers' MellumConfig)."""
    sliding = {"rope_type": "default", "rope_theta": config.rope_theta}
    full = dict(sliding)
    if config.yarn_factor != 1.0:
        full = {"rope_type": "yarn", "rope_theta": config.rope_theta, "factor": config.yarn_factor,
                "original_max_position_embeddings": config.yarn_original_max_seq_len,
                "beta_fast": config.yarn_beta_fast, "beta_slow": config.yarn_beta_slow}
        if config.yarn_attention_factor is not None:  # else both sides use 0.1 * ln(factor) + 1
            full["attention_factor"] = config.yarn_attention_factor
        if config.yarn_layers == "all":
            sliding = dict(full)
    eos = config.eos_token_id
    hf = {
        "architectures": ["MellumForCausalLM"], "model_type": "mellum",
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim,
        "num_experts": config.n_expert, "num_experts_per_tok": config.n_expert_active,
        "moe_intermediate_size": config.expert_dim,
        # Only used by dense MLP layers, which Mellum 2 does not have; the release sets it to K * F.
        "intermediate_size": config.n_expert_active * config.expert_dim,
        "norm_topk_prob": True, "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
        "rms_norm_eps": config.rms_norm_eps, "initializer_range": config.init_std,
        "sliding_window": config.sliding_window, "layer_types": config.layer_types,
        "mlp_layer_types": ["sparse"] * config.n_layer,
        "max_position_embeddings": config.max_seq_len,
        "rope_parameters": {"full_attention": full, "sliding_attention": sliding},
        "router_aux_loss_coef": config.aux_loss_coef,
        "bos_token_id": config.bos_token_id, "eos_token_id": list(eos) if type(eos) is tuple else eos,
        "dtype": str(dtype).removeprefix("torch."),
        # Our own training settings, kept so a round trip through this file loses nothing.
        "mellum2": {"mtp_loss_weight": config.mtp_loss_weight, "z_loss_coef": config.z_loss_coef,
                    "moe_impl": config.moe_impl, "attn_pattern": config.attn_pattern},
    }
    if config.n_mtp:
        hf.update(num_nextn_predict_layers=config.n_mtp, mtp_layer_types=["sliding_attention"],
                  mtp_mlp_layer_types=["sparse"])
    return hf


def config_from_hf(hf):
    """A config.json (released or ours) -> Mellum2Config. A key it leaves out means what it means to
    transformers' MellumConfig: the released model's value, plain RoPE with base 10000 on sliding
    layers, full attention everywhere. Refuses variants this model cannot express, and says which
    key is wrong in a damaged file."""
    try:
        return Mellum2Config(**settings_from_hf(hf))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, StopIteration) as e:
        raise CheckpointError(f"config.json: unreadable ({type(e).__name__}: {e})") from None


def settings_from_hf(hf):
    """config_from_hf's work: the config.json's keys -> Mellum2Config's fields."""
    def unsupported(what):
        return CheckpointError(f"config.json: unsupported {what}")

    if not isinstance(hf, dict):
        raise CheckpointError(f"config.json: unreadable (a JSON object was expected, got {type(hf).__name__})")
    if hf.get("model_type") != "mellum":
        raise unsupported(f"model_type {hf.get('model_type')!r} (expected 'mellum')")
    defaults = Mellum2Config()  # the released model, as are MellumConfig's defaults
    n_layer = hf.get("num_hidden_layers", defaults.n_layer)
    if type(n_layer) is not int or n_layer < 1:
        raise CheckpointError(f"config.json: unreadable (num_hidden_layers {n_layer!r}, where a number of layers "
                              f"belongs)")
    for key in ("layer_types", "mlp_layer_types"):  # checked first: a count that differs is the whole story
        if isinstance(hf.get(key), list) and len(hf[key]) != n_layer:
            given = "" if "num_hidden_layers" in hf else " (MellumConfig's default: config.json does not give it)"
            raise CheckpointError(f"config.json: unreadable ({key} lists {len(hf[key])} layers, "
                                  f"num_hidden_layers is {n_layer}{given})")
    for key, wanted in [("norm_topk_prob", True), ("attention_bias", False), ("hidden_act", "silu"),
                        ("tie_word_embeddings", False), ("attention_dropout", 0.0)]:
        if hf.get(key, wanted) != wanted:
            raise unsupported(f"{key}={hf[key]!r}")
    if hf.get("mlp_layer_types", ["sparse"] * n_layer) != ["sparse"] * n_layer:
        raise unsupported("dense MLP layers (every Mellum 2 layer is MoE)")
    n_mtp = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers")) or 0
    for key, wanted in [("mtp_layer_types", "sliding_attention"), ("mtp_mlp_layer_types", "sparse")]:
        if hf.get(key) not in (None, [wanted] * n_mtp):
            raise unsupported(f"{key}={hf[key]!r} (the MTP layer is one sliding-window MoE block)")
    layer_types = hf.get("layer_types") or ["full_attention"] * n_layer
    letter_of = {"sliding_attention": "S", "full_attention": "F"}
    if not (isinstance(layer_types, list) and all(t in letter_of for t in layer_types)):
        raise CheckpointError(f"config.json: unreadable (layer_types {layer_types!r}, where a list of "
                              f"{' and '.join(letter_of)} belongs)")
    letters = "".join(letter_of[t] for t in layer_types)
    slides = "S" in letters or n_mtp > 0  # a trunk layer or the MTP block has a sliding window
    window = hf.get("sliding_window", defaults.sliding_window)
    if window is None:
        if slides:
            raise unsupported("sliding_window null with sliding-window layers")
        window = 1  # no layer slides: the value is never read
    ours = hf.get("mellum2") or {}  # what only our exports write (null or absent: none of it)
    if not isinstance(ours, dict):
        raise CheckpointError(f"config.json: unreadable (mellum2 {ours!r}, where an object of this project's "
                              f"settings belongs)")
    # The layer types as a repeating pattern: the one we wrote if it still fits, else the shortest.
    candidates = [ours.get("attn_pattern", "")] + [letters[:p] for p in range(1, n_layer + 1)]
    pattern = next(c for c in candidates if c and all(letters[i] == c[i % len(c)] for i in range(n_layer)))
    # rope_scaling is the older name, which transformers still reads as rope_parameters. Neither given:
    # MellumConfig's default, base 10000 on sliding layers.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {
        "full_attention": {"rope_type": "default", "rope_theta": defaults.rope_theta},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    if not set(rope) <= {"full_attention", "sliding_attention"}:  # as transformers, which reads it per layer type
        raise unsupported("rope_parameters not keyed by layer type (full_attention, sliding_attention)")
    full, sliding = rope.get("full_attention", {}), rope.get("sliding_attention", {})
    for kind, params in (("full_attention", full), ("sliding_attention", sliding)):
        if not isinstance(params, dict):
            raise CheckpointError(f"config.json: unreadable (rope_parameters {kind} {params!r}, where an object of "
                                  f"RoPE parameters belongs)")
    theta = full.get("rope_theta", defaults.rope_theta)
    if slides and sliding.get("rope_theta", theta) != theta:
        raise unsupported("different RoPE bases on sliding and full layers")
    yarn = full.get("rope_type") == "yarn"
    yarn_everywhere = yarn and sliding == full
    if full.get("rope_type", "default") not in ("default", "yarn") or \
            (sliding.get("rope_type", "default") != "default" and not yarn_everywhere):
        raise unsupported("RoPE type (plain RoPE, and YaRN on the full layers or the same YaRN on all)")
    for params in (full, sliding):
        for key, plain in [("partial_rotary_factor", 1.0), ("mscale", None), ("mscale_all_dim", None),
                           ("truncate", True)]:
            if params.get(key, plain) != plain:
                raise unsupported(f"RoPE parameter {key}={params[key]!r}")
    if yarn and full.get("factor") == 1.0 and full.get("attention_factor", 1.0) != 1.0:
        raise unsupported("YaRN with factor 1 and an attention_factor (factor 1 means no YaRN here)")
    eos = hf.get("eos_token_id")  # an id, or a list of them (a chat model stops at its turn's end too)
    return dict(
        vocab_size=hf.get("vocab_size", defaults.vocab_size), n_layer=n_layer,
        n_embd=hf.get("hidden_size", defaults.n_embd), n_head=hf.get("num_attention_heads", defaults.n_head),
        n_kv_head=hf.get("num_key_value_heads", defaults.n_kv_head),
        head_dim=hf.get("head_dim", defaults.head_dim),
        n_expert=hf.get("num_experts", hf.get("num_local_experts", defaults.n_expert)),
        n_expert_active=hf.get("num_experts_per_tok", defaults.n_expert_active),
        expert_dim=hf.get("moe_intermediate_size", defaults.expert_dim), sliding_window=window,
        attn_pattern=pattern, max_seq_len=hf.get("max_position_embeddings", 131072), rope_theta=theta,
        yarn_factor=full["factor"] if yarn else 1.0,
        yarn_original_max_seq_len=full.get("original_max_position_embeddings", defaults.yarn_original_max_seq_len),
        yarn_beta_fast=full.get("beta_fast") or 32.0, yarn_beta_slow=full.get("beta_slow") or 1.0,
        yarn_attention_factor=full.get("attention_factor"), yarn_layers="all" if yarn_everywhere else "full",
        rms_norm_eps=hf.get("rms_norm_eps", defaults.rms_norm_eps), n_mtp=n_mtp,
        mtp_loss_weight=ours.get("mtp_loss_weight", defaults.mtp_loss_weight),
        aux_loss_coef=hf.get("router_aux_loss_coef", defaults.aux_loss_coef),
        z_loss_coef=ours.get("z_loss_coef", defaults.z_loss_coef),
        init_std=hf.get("initializer_range", defaults.init_std), moe_impl=ours.get("moe_impl", "grouped"),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=tuple(eos) if type(eos) is list else eos,
    )
