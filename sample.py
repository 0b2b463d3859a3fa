"""
Inference with Mellum 2: KV-cache decoding, fill-in-the-middle, chat, and speculative decoding with
the MTP layer as the draft model (report §2.1.5, §6).

    python sample.py --start "def fibonacci(n):"           # complete code (default model: out/tiny)
    python sample.py --prefix $'def add(a, b):\\n    ' --suffix $'\\n\\nprint(add(1, 2))'   # fill the gap (bash)
    python sample.py --chat --init-from out/tiny-sft-instruct --start "Write a function that reverses a string."
    python sample.py --speculative --start FILE:prompt.py   # the MTP layer drafts, the trunk checks

Decoding, step by step:
  1. prefill: the prompt goes through the model once, 1024 tokens at a time (see prefill); every
     layer's keys and values stay in a KVCache (only the 4 KV heads of GQA; a rolling window-sized
     buffer on sliding layers; room for the prompt and the new tokens on full layers, of which
     attention reads the filled part)
  2. decode: each new token is one forward pass of length 1 that reads the cache
  3. speculative: the MTP layer guesses the token after the next one from the trunk's last state;
     the trunk then scores both in one pass of length 2 and keeps the guess when it agrees. Greedy
     output is identical to plain decoding; sampled output has the same distribution.
"""

import dataclasses
import io
import os
import sys
import time

import torch

import data
import kernels
import tasks
import train
from mellum2 import CheckpointError, KVCache, Mellum2, pick_device, pick_dtype


# -----------------------------------------------------------------------------------------------
# Loading

@dataclasses.dataclass
class Vocabulary:
    enc: object         # encode_ordinary(text) -> ids and decode_bytes(ids) -> bytes, as a tiktoken.Encoding
    special: dict       # special token string -> id
    stop_ids: set       # ids that end a completion


class HFTokenizer:
    """The tokenizer.json of a Hugging Face directory (the released checkpoint's 98K vocabulary),
    behind the two methods of a tiktoken.Encoding that sample.py uses."""

    def __init__(self, path):
        from tokenizers import Tokenizer  # installed with transformers; only needed for such directories
        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # the library raises a bare Exception for a damaged file
            raise CheckpointError(f"{path}: unreadable tokenizer ({e})") from None
        self.tokenizer.encode_special_tokens = True  # a special token's spelling in a prompt stays text
        # Only tokens flagged special are control tokens; an added token that is not (a run of spaces,
        # say) is ordinary text that the vocabulary keeps whole, printed like any other.
        self.special = {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}

    def encode_ordinary(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode_bytes(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=False).encode("utf-8")


def load_model(init_from, device=None):
    """One of our run folders (ckpt.pt) or a Hugging Face directory -> (model in eval mode, Vocabulary).
    A Hugging Face directory with its own tokenizer.json (the released checkpoint) brings its own
    vocabulary; anything else speaks the project's tokenizer."""
    hf_tokenizer = os.path.join(init_from, "tokenizer.json")
    if not os.path.isdir(init_from):
        raise train.missing_folder(init_from)
    if os.path.isfile(os.path.join(init_from, "ckpt.pt")):
        # Mapped, not read: of a run's checkpoint only the weights are needed, not the optimizer's state.
        model = train.model_from_checkpoint(train.load_checkpoint(os.path.join(init_from, "ckpt.pt"), mmap=True))
        device = pick_device(device)
        model.to(device=device, dtype=pick_dtype(device))
        hf_tokenizer = None
    elif os.path.isfile(os.path.join(init_from, "config.json")):
        model = Mellum2.from_pretrained(init_from, device=device)
    else:
        raise train.not_a_model_folder(init_from)
    if hf_tokenizer and os.path.isfile(hf_tokenizer):
        enc = HFTokenizer(hf_tokenizer)
        n_vocab = len(enc.tokenizer.get_vocab())
        stop_ids = {*model.config.eos_ids, enc.special.get("<|endoftext|>")} - {None}
        vocab = Vocabulary(enc, enc.special, stop_ids)
        if n_vocab > model.config.vocab_size:  # fewer is fine: the model's extra rows are padding
            raise CheckpointError(f"{init_from}: the tokenizer has {n_vocab} tokens, the model only "
                                  f"{model.config.vocab_size}")
    else:
        # The project's tokenizer cannot spell an id beyond its own, so the sizes must agree.
        if model.config.vocab_size != data.VOCAB_SIZE:
            raise CheckpointError(f"{init_from}: the model has {model.config.vocab_size} tokens and no "
                                  f"tokenizer.json; the project's tokenizer has {data.VOCAB_SIZE}")
        vocab = Vocabulary(data.load_tokenizer(), data.SPECIAL_TOKENS, {data.EOT})
    if not all(torch.isfinite(p).all() for p in model.parameters()):  # a run that diverged, or a damaged file
        raise CheckpointError(f"{init_from}: the weights hold NaN or infinite values")
    return model.eval(), vocab


def trained_stage(init_from):
    """The train.py stage a run folder's model finished (pretrain, long, sft, grpo); None for a
    Hugging Face directory, which does not say."""
    path = os.path.join(init_from, "ckpt.pt")
    if not os.path.isfile(path):
        return None
    return train.load_checkpoint(path, mmap=True, verify=False)["settings"].get("stage", "pretrain")


# -----------------------------------------------------------------------------------------------
# Sampling: temperature, top-k, top-p, as one distribution per row

def next_token_probs(logits, temperature, top_k=0, top_p=1.0):
    """logits (B, V) -> the distribution to sample from (B, V). Temperature 0 is greedy decoding,
    written as a one-hot distribution so that it is a distribution like any other (a rollout records
    log-probabilities from it). The decoding loops take the argmax directly when that is all they need."""
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    # Shifted so the best logit is 0 before dividing: a tiny temperature then sends the others to
    # -inf, where dividing first would send the best to +inf and make the softmax NaN. (Temperatures
    # below fp32's smallest normal number are raised to it, so all of them act alike.)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p. (A top_p that
        # fp32 rounds to 0 would keep none: it is raised to fp32's smallest normal number, which
        # keeps the most likely token alone, as any top_p below its probability does.)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= max(top_p, torch.finfo(torch.float32).tiny)
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def seeded_generator(seed, device):
    """A random generator started from `seed`; a generator passed in is used as it is, so a chat's
    later turns carry on drawing from the first turn's (a fresh one would repeat its numbers)."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    return torch.Generator(device).manual_seed(seed)


def draw(probs, generator):
    """One id per row of probs (B, V), by inverse-CDF sampling: the first id whose running total
    reaches u ~ U(0, 1]. The rows need not sum to 1 (u is scaled by each row's total), and an id of
    probability 0 is never drawn. On a 4K vocabulary a cumsum and a binary search take 0.4x the time
    of torch.multinomial for one row (0.2x for eight), and decoding draws once per token."""
    cdf = probs.float().cumsum(dim=-1)  # (B, V)
    # A GPU sums in parallel, in another order for each prefix, and can put the total of an id of
    # probability 0 a rounding unit above the one before it, a sliver for u to land in. Zeroing such
    # ids' totals and carrying the running maximum over them closes it (and keeps cdf sorted).
    cdf = cdf.masked_fill(probs == 0, 0).cummax(dim=-1).values
    u = (1 - torch.rand(len(cdf), 1, generator=generator, device=cdf.device)) * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u)[:, 0]  # (B,)


def verify_draft(p, q, draft, generator):
    """The speculative-sampling rule for one drafted token: p (V,) the trunk's distribution, q (V,)
    the draft's, draft the drafted id. Keep the draft with probability min(1, p/q); otherwise draw
    from the leftover max(p - q, 0), renormalised. The kept-or-redrawn token is then distributed
    exactly as p. Greedy decoding is the case of one-hot p and q: the draft is kept iff both argmaxes
    agree, else the trunk's argmax replaces it, the exact match generate_speculative checks directly.
    Returns (accepted, token)."""
    u = 1 - torch.rand((), generator=generator, device=p.device)  # in (0, 1]: a p of 0 never keeps the draft
    if u * q[draft] <= p[draft]:
        return True, draft
    leftover = (p - q).clamp(min=0)  # renormalised by draw
    if not leftover.any():  # p and q equal but for rounding, q a hair above p at the draft: p is what is left
        leftover = p
    return False, int(draw(leftover[None], generator))


def room_after(model, prompt_len, max_new_tokens):
    """How many of max_new_tokens fit in the context after a prompt (0 when it fills it)."""
    if prompt_len > model.config.max_seq_len:
        raise ValueError(f"the prompt is {prompt_len} tokens; this model's context is {model.config.max_seq_len}")
    return min(max_new_tokens, model.config.max_seq_len - prompt_len)


# -----------------------------------------------------------------------------------------------
# Prefill, a chunk at a time
#
# Attention over a cache masks every new token against every key it could see: a (B, T, keys) mask,
# and on CUDA, whose SDPA takes its math path for a mask with GQA, (B, H, T, keys) scores as well.
# For the released model a 32K-token prompt in one pass would need at least 64 GiB of scores (bf16),
# a 128K one a terabyte. Fed in chunks, a prompt needs them for one chunk's queries at a time, and
# gives the same states: each chunk attends to the keys the ones before it stored.

PREFILL_CHUNK = 1024  # queries per pass: long enough to keep a GPU busy, short enough for 128K keys


def prefill(model, idx, cache, pad=None):
    """Feed prompts idx (B, T) (pad (B, T): True at left padding) into the cache -> the trunk's
    final states (B, T, D)."""
    chunks = range(0, idx.shape[1], PREFILL_CHUNK)
    pads = [None if pad is None else pad[:, i:i + PREFILL_CHUNK] for i in chunks]
    return torch.cat([model.trunk(idx[:, i:i + PREFILL_CHUNK], cache, p)[0] for i, p in zip(chunks, pads)], dim=1)


# -----------------------------------------------------------------------------------------------
# Plain decoding: a batch of prompts of different lengths, left-padded
#
# Both decoding loops run under inference_mode rather than no_grad: it also skips the version
# counters and autograd bookkeeping on every new tensor, which is a tenth of a CPU decoding step.

@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, stop_ids=(), seed=None,
             on_token=None, logprobs=None):
    """prompts: lists of token ids -> the new ids of each (up to max_new_tokens, ending at a stop id).
    seed: an int, or a torch.Generator to go on drawing from (see seeded_generator).
    on_token(row, id) is called as each token is chosen (streaming), the stop id included, so that it
    sees exactly what is returned; if it returns True, that row stops.
    With a list for `logprobs`, it receives per row the log-probability each new token had in the
    distribution it was drawn from (what an RL rollout engine records, train.py --stage grpo)."""
    device = next(model.parameters()).device
    generator = seeded_generator(seed, device)
    B, longest = len(prompts), max(len(p) for p in prompts)
    max_new_tokens = room_after(model, longest, max_new_tokens)
    idx = torch.zeros(B, longest, dtype=torch.long, device=device)
    pad = torch.ones(B, longest, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):  # left padding: every row's last prompt token is at the end
        idx[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
        pad[row, longest - len(prompt):] = False
    # Room for what this call can reach, not the whole context: for the released model's 131072
    # positions the full layers' buffers would take 1.9 GB per row in bf16.
    cache = KVCache(model.config, B, longest + max_new_tokens, device, next(model.parameters()).dtype)
    h = prefill(model, idx, cache, pad)
    out, done = [[] for _ in range(B)], [False] * B
    if logprobs is not None:
        logprobs[:] = [[] for _ in range(B)]
    for step in range(max_new_tokens):
        logits = model.lm_head(h[:, -1])  # (B, V)
        if temperature == 0 and logprobs is None:  # greedy: what a draw from the one-hot would give
            tokens, chosen = logits.argmax(dim=-1), None
        else:
            probs = next_token_probs(logits, temperature, top_k, top_p)
            tokens = draw(probs, generator)
            chosen = probs.gather(1, tokens[:, None])[:, 0].log().tolist() if logprobs is not None else None
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                out[row].append(token)
                if chosen is not None:
                    logprobs[row].append(chosen[row])
                done[row] = bool(on_token and on_token(row, token)) or token in stop_ids  # it sees a stop id too
        if all(done) or step == max_new_tokens - 1:  # the last token needs no forward of its own
            break
        h, _ = model.trunk(tokens[:, None], cache)
    return out


# -----------------------------------------------------------------------------------------------
# Speculative decoding with the MTP layer (one drafted token per step; batch of one)

@torch.inference_mode()
def generate_speculative(model, prompt, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, stop_ids=(),
                         seed=None, on_token=None):
    """Like generate() for one prompt, drafting with the MTP layer. Returns (new ids, drafts, accepted).

    The state between steps: the trunk has cached positions 0..n-1 and chosen token x_n (not yet fed
    in); its state h_{n-1} is known. One step:
      draft   the MTP layer reads (h_{n-1}, x_n) and proposes d for position n+1
      verify  the trunk reads [x_n, d]: its logits at n say what n+1 should be, at n+1 what n+2 is
      accept  greedy: d is kept iff it is the trunk's own choice (exact match); sampled: by
              verify_draft. Kept: the logits at n+1 give a bonus token, two tokens per trunk pass;
              rejected: the trunk's token replaces d and d's cache entry is dropped
    The MTP layer only ever reads confirmed (state, token) pairs, which it catches up on in its next
    call, so its own cache never needs rolling back."""
    if model.mtp is None:
        raise ValueError("this model has no MTP layer to draft with; run without --speculative")
    device = next(model.parameters()).device
    generator = seeded_generator(seed, device)
    greedy = temperature == 0
    adjust = lambda logits: next_token_probs(logits, temperature, top_k, top_p)  # noqa: E731

    def choose(logits):
        """logits (1, V) -> a token and the distribution it came from (None when greedy: exact match
        needs no distribution, and an argmax costs a fraction of building and drawing from a one-hot)."""
        if greedy:
            return int(logits.argmax()), None
        probs = adjust(logits)
        return int(draw(probs, generator)), probs[0]

    max_new_tokens = room_after(model, len(prompt), max_new_tokens)
    if max_new_tokens < 1:  # no room, as in generate(): not even the first token
        return [], 0, 0
    cache = KVCache(model.config, 1, len(prompt) + max_new_tokens, device, next(model.parameters()).dtype)
    idx = torch.tensor([prompt], device=device)
    h = prefill(model, idx, cache)                               # (1, n, D): positions 0..n-1
    n = len(prompt)
    x_n, _ = choose(model.lm_head(h[:, -1]))
    out = [x_n]
    stopped = bool(on_token and on_token(0, x_n))
    # Confirmed (state at p-1, token at p) pairs the MTP layer has not read yet, p = 1..n.
    mtp_states, mtp_tokens = h, torch.cat([idx[:, 1:], torch.tensor([[x_n]], device=device)], dim=1)
    while mtp_tokens.shape[1] > PREFILL_CHUNK:  # a long prompt's pairs go in chunks too, like the prompt
        first = n - mtp_tokens.shape[1] + 1
        positions = torch.arange(first, first + PREFILL_CHUNK, device=device)[None]
        model.draft(mtp_states[:, :PREFILL_CHUNK], mtp_tokens[:, :PREFILL_CHUNK], cache, positions)
        mtp_states, mtp_tokens = mtp_states[:, PREFILL_CHUNK:], mtp_tokens[:, PREFILL_CHUNK:]
    drafts = accepted = 0
    while len(out) < max_new_tokens and x_n not in stop_ids and not stopped:
        k = mtp_tokens.shape[1]
        positions = torch.arange(n - k + 1, n + 1, device=device)[None]
        d, q = choose(model.draft(mtp_states, mtp_tokens, cache, positions))
        h2, _ = model.trunk(torch.tensor([[x_n, d]], device=device), cache)  # positions n, n+1
        logits = model.lm_head(h2[0])                                         # (2, V)
        if greedy:  # exact match: the draft stays iff it is the trunk's own choice
            token, bonus = logits.argmax(dim=-1).tolist()
            ok = token == d
        else:
            ok, token = verify_draft(adjust(logits[:1])[0], q, d, generator)
            bonus = choose(logits[1:])[0] if ok else None
        drafts, accepted = drafts + 1, accepted + ok
        new = [token]
        if ok and token not in stop_ids and len(out) + 1 < max_new_tokens:
            new.append(bonus)
            mtp_states, mtp_tokens = h2, torch.tensor([[d, bonus]], device=device)
            n += 2
        else:  # d rejected, or the text ends with `token`: forget the trunk's pass at n+1
            cache.rollback(torch.tensor([n + 1], device=device))
            mtp_states, mtp_tokens = h2[:, :1], torch.tensor([[token]], device=device)
            n += 1
        for t in new:
            if not stopped:
                out.append(t)
                stopped = bool(on_token and on_token(0, t))
        x_n = out[-1]
    return out, drafts, accepted


# -----------------------------------------------------------------------------------------------
# The command line

MAX_PROMPT_CHARS = 2**24  # far beyond any context (131072 tokens of code are about half a million)


def read_text(value):
    """A flag's text, or the contents of a file when it is written FILE:path."""
    if value is None or not value.startswith("FILE:"):
        return value
    try:
        with open(value[5:], encoding="utf-8-sig") as f:  # -sig: an editor's byte-order mark is no text
            text = f.read(MAX_PROMPT_CHARS + 1)  # not all of /dev/zero
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {value[5:]}: {e}") from None
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{value[5:]} holds over {MAX_PROMPT_CHARS:,} characters, more than any context")
    return text


def parse_args(argv=None):
    p = train.ArgumentParser(__doc__)
    p.add_argument("--init-from", default=train.QUICK_START_RUN,
                   help=f"a train.py run folder or a Hugging Face directory (default: {train.QUICK_START_RUN})")
    p.add_argument("--start", help='the prompt, or FILE:path to read it from a file (default: "def ")')
    p.add_argument("--prefix", help="fill-in-the-middle: the text before the gap (or FILE:path)")
    p.add_argument("--suffix", help="fill-in-the-middle: the text after the gap (or FILE:path)")
    p.add_argument("--chat", action="store_true", help="treat --start as a user message in the chat template")
    p.add_argument("--hide-thinking", action="store_true", help="in chat, do not print the <think> block")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens only (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0 = off)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (default: 1337)")
    p.add_argument("--stop", action="append", default=[],
                   help="stop when this text appears in what is printed (repeatable)")
    p.add_argument("--speculative", action="store_true", help="draft with the MTP layer, verify with the trunk")
    p.add_argument("--device", help="cpu, cuda, mps (default: the best available)")
    kernels.add_kernels_flag(p)
    return p.parse_args(argv)


def check_args(args):
    problems = [
        (args.max_new_tokens > 0, f"--max-new-tokens must be positive, got {args.max_new_tokens}"),
        (0 <= args.temperature < train.FP32_MAX, f"--temperature must be >= 0 and finite, got {args.temperature}"),
        (args.top_k >= 0, f"--top-k must be >= 0, got {args.top_k}"),
        (0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        ((args.prefix is None) == (args.suffix is None), "--prefix and --suffix go together"),
        (args.prefix is None or (args.start is None and not args.chat),
         "--prefix and --suffix fill a gap in code; they do not combine with --start or --chat"),
        (args.chat or not args.hide_thinking, "--hide-thinking is for --chat"),
        (all(args.stop), "--stop needs some text"),
        (0 <= args.seed < 2**64, f"--seed must be between 0 and 2**64 - 1, got {args.seed}"),
    ]
    for ok, message in problems:
        if not ok:
            raise ValueError(message)
    kernels.resolve_mode(args.kernels, pick_device(args.device))  # before a model of many GB is loaded


def build_prompt(args, vocab):
    """Token ids of the prompt and the ids that end generation. Typed text is always encoded as
    ordinary text: a special token's spelling in a prompt is just characters."""
    enc, special = vocab.enc, vocab.special
    if args.prefix is not None:
        if not {"<fim_prefix>", "<fim_suffix>", "<fim_middle>"} <= special.keys():
            raise ValueError("this tokenizer has no FIM sentinels (<fim_prefix>, <fim_suffix>, <fim_middle>)")
        texts = [read_text(args.prefix), read_text(args.suffix)]
        ids = data.fim_prompt(*map(enc.encode_ordinary, texts), special=special)
    elif args.chat:
        if special is not data.SPECIAL_TOKENS:
            raise ValueError("--chat renders the project's chat template, which this tokenizer does not have")
        texts = [read_text(args.start or "")]
        ids = data.render_chat(enc, [{"role": "user", "content": texts[0]}])
    else:
        texts = [read_text("def " if args.start is None else args.start)]
        ids = enc.encode_ordinary(texts[0])
    typed = "".join(texts)
    if not typed:
        raise ValueError("the prompt is empty")
    if not ids:  # a tokenizer.json whose vocabulary cannot spell it (one without byte-level fallback)
        raise ValueError("the prompt encodes to no tokens in this model's tokenizer")
    for token in [t for t in special if t in typed]:
        print(f"note: {token} in the prompt is read as plain text, not as the special token", file=sys.stderr)
    return ids, vocab.stop_ids | ({special["<|end|>"]} if args.chat else set())


class Printer:
    """Streams decoded text to stdout as tokens arrive, hides <think> blocks if asked, and notices
    stop strings in what it prints (not in hidden reasoning). What may still change waits for the
    next token: a character whose UTF-8 bytes have not all arrived, and an ending that could be the
    start of a think tag or of a stop string. Each stage keeps only what it is still unsure of, so a
    token costs the same at the end of a 100K-token answer as at its start."""

    def __init__(self, vocab, stops, hide_thinking):
        self.enc, self.stops, self.hide_thinking = vocab.enc, stops, hide_thinking
        shown = {"<think>", "</think>", "<tool_call>", "</tool_call>"}
        self.silent = {i for t, i in vocab.special.items() if t not in shown}  # not printed
        self.ids, self.start, self.settled = [], 0, 0  # ids[settled:]: not yet whole characters
        self.thinking, self.tag_start = False, ""      # inside a think block; what may begin a tag
        self.held, self.stopped = "", False            # text that may begin a stop string

    def __call__(self, row, token):
        if self.stopped or token in self.silent:
            return self.stopped
        self.ids.append(token)
        text = self.new_text()
        if not text.endswith("\ufffd"):  # whole characters: final
            self.start, self.settled = self.settled, len(self.ids)
            self.add(self.visible(text))
        return self.stopped

    def new_text(self):
        """The text the ids since the last whole character add, U+FFFD marking a character not yet
        whole (as a tokenizer.json's decoder does). A decoder may treat the start of a text apart (drop
        a leading space, say), so the new ids are decoded after the piece before them, and only what
        they add is kept."""
        def decode(ids):
            return self.enc.decode_bytes(ids).decode("utf-8", errors="replace")
        return decode(self.ids[self.start:])[len(decode(self.ids[self.start:self.settled])):]

    def visible(self, text, final=False):
        """text minus what lies inside think blocks (when hiding them). An ending that may be the
        start of the next tag waits for more, unless the text is over."""
        if not self.hide_thinking:
            return text
        text, shown = self.tag_start + text, []
        while True:
            tag = "</think>" if self.thinking else "<think>"
            at = text.find(tag)
            if at < 0:
                break
            if not self.thinking:
                shown.append(text[:at])
            text, self.thinking = text[at + len(tag):], not self.thinking
        wait = 0 if final else max((n for n in range(1, len(tag)) if text.endswith(tag[:n])), default=0)
        self.tag_start = text[len(text) - wait:]
        if not self.thinking:
            shown.append(text[:len(text) - wait])
        return "".join(shown)

    def add(self, text):
        """Print new visible text, up to a stop string (the one that starts first) or, without one,
        up to an ending that may be the start of one."""
        self.held += text
        cuts = [self.held.index(stop) for stop in self.stops if stop in self.held]
        if cuts:
            self.held, self.stopped = self.held[:min(cuts)], True
            wait = 0
        else:
            wait = max((n for stop in self.stops for n in range(1, len(stop)) if self.held.endswith(stop[:n])),
                       default=0)
        print(self.held[:len(self.held) - wait], end="", flush=True)
        self.held = self.held[len(self.held) - wait:]

    def finish(self):
        """The text has ended: what was held back is final."""
        if not self.stopped:
            self.add(self.visible(self.new_text(), final=True))
            print(self.held, end="", flush=True)
            self.held = ""


def main(argv=None):
    args = parse_args(argv)
    # A file or pipe in a legacy encoding (cp1252: a redirect on Windows) cannot take every character
    # a model writes; those print as "?" instead of ending the output.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="replace")
    try:
        check_args(args)
        train.check_stdout_open()
        model, vocab = load_model(args.init_from, args.device)
        kernels.install(model, args.kernels)
        ids, stop_ids = build_prompt(args, vocab)
        if args.chat and trained_stage(args.init_from) in ("pretrain", "long"):
            print(f"note: {args.init_from} is a pre-trained base model; chat is what --stage sft teaches it",
                  file=sys.stderr)
        context = model.config.max_seq_len
        room = room_after(model, len(ids), args.max_new_tokens)
        if room == 0:
            raise ValueError(f"the prompt is {len(ids)} tokens and fills this model's {context}-token context")
        if room < args.max_new_tokens:
            print(f"note: {room} new tokens fit in this model's {context}-token context", file=sys.stderr)
        options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_ids=stop_ids,
                       seed=seeded_generator(args.seed, next(model.parameters()).device))
        start, written, drafts, accepted = time.time(), 0, 0, 0
        # A chat turn that calls the calculator gets its reply, printed as the model reads it, and the
        # model goes on: at most train.MAX_TURNS turns, as in the rollouts that trained it, so a call
        # in the last turn, which no turn would read the reply of, ends the chat unanswered.
        for turn in range(train.MAX_TURNS if args.chat else 1):
            printer = Printer(vocab, args.stop, args.hide_thinking)
            budget = args.max_new_tokens - written  # both generators also stop at the context's end
            if args.speculative:
                new, d, a = generate_speculative(model, ids, budget, on_token=printer, **options)
                drafts, accepted = drafts + d, accepted + a
            else:
                new = generate(model, [ids], budget, on_token=printer, **options)[0]
            printer.finish()
            ids, written = ids + new, written + len(new)
            if not args.chat or printer.stopped or not new or new[-1] != data.SPECIAL_TOKENS["<|end|>"]:
                break
            call = tasks.parse_turn(vocab.enc, new[:-1]).tool_call
            if call is None or turn + 1 == train.MAX_TURNS:
                break
            reply = tasks.tool_reply(vocab.enc, call)
            print("\n" + data.text_of(vocab.enc, reply), flush=True)
            ids += reply
            if len(ids) >= context:
                print(f"note: with the tool's reply the chat fills this model's {context}-token context",
                      file=sys.stderr)
                break
            if written >= args.max_new_tokens:
                break
        seconds = time.time() - start
        print()
        if args.speculative:
            print(f"speculative: {accepted}/{drafts} drafts accepted ({accepted / max(drafts, 1):.0%}), "
                  f"{written / seconds:.1f} tokens/s", file=sys.stderr)
    except (ValueError, CheckpointError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:
        train.on_closed_pipe()
    except OSError as e:  # writing the answer failed: a full disk behind the redirection
        print(f"error: {train.describe_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C while it writes: stop there, like any command-line tool
        print("\ninterrupted", file=sys.stderr)  # on a line of its own, after the text so far
        sys.exit(130)


if __name__ == "__main__":
    main()
