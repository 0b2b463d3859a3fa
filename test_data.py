"""Tests for data.py: tokenizer, corpus and cache, curriculum, FIM, packing. Tiny corpora in tmp dirs."""

import collections
import math
import random

import numpy as np
import pytest
import regex
import torch

import data


# --- helpers ------------------------------------------------------------------------------------

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


def contains(haystack, needle):
    return any(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


# --- §3.1.4 tokenizer ---------------------------------------------------------------------------

def test_vocab_and_special_ids(enc):
    assert enc.n_vocab == data.VOCAB_SIZE == 4096
    names = [token for token, _ in data.SPECIAL_TOKEN_TABLE]
    assert len(names) == 16 and len(set(names)) == 16
    assert [data.SPECIAL_TOKENS[t] for t in names] == list(range(4080, 4096))
    assert (data.EOT, data.FIM_PREFIX, data.FIM_MIDDLE, data.FIM_SUFFIX) == (4080, 4081, 4082, 4083)
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


def test_bpe_is_deterministic_and_round_trips(tmp_path):
    texts = small_training_text()
    first, second = data.train_bpe(texts, 600), data.train_bpe(list(texts), 600)
    assert first == second and sorted(first.values()) == list(range(len(first)))
    path = tmp_path / "r.tiktoken"
    data.save_ranks(first, path)
    assert data.parse_ranks(path.read_bytes()) == first


def test_loader_rereads_a_replaced_file(tmp_path):
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
    assert len({p.split("\n")[0].split()[0] for p in problems}) > 5   # several templates


def test_default_inputs_listing():
    """The one check on the real install: what the default corpus would read (no tokenizing)."""
    skipped = collections.Counter()
    inputs = data._default_inputs(skipped)
    keys = {(f.source, f.key) for f in inputs}
    assert ("code", "stdlib/json/decoder.py") in keys and ("web", "stdlib/json/decoder.py") in keys
    assert not any("/test/" in k or "/tests/" in k or k.startswith("stdlib/encodings/") for _, k in keys)
    assert {f.source for f in inputs} == set(data.SOURCES)
    assert sum(len(f.text) for f in inputs if f.source == "code") > data.MIN_STDLIB_CODE_BYTES


def test_val_split_is_stable_and_near_5_percent():
    keys = [f"lib/module_{i}.py" for i in range(4000)]
    val = data._val_keys(keys)
    assert within(len(val), 4000, data.VAL_FRACTION)
    assert val == data._val_keys(reversed(keys))
    assert data._val_keys(keys[:2000]) == {k for k in val if k in set(keys[:2000])}


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
    shares = [phases.count(i) / total for i in range(3)]
    norm = sum(share for share, _ in TABLE_3)   # 100.1: Table 3's shares do not sum to 100
    for share, (table_share, _) in zip(shares, TABLE_3):
        assert abs(share - table_share / norm) < 1e-3


def test_repetition_cap(tiny):
    n_code = len(tiny.train["code"].tokens)
    code_share = sum(p.share * data.phase_mixture(p)["code"] for p in data.PHASES) / sum(p.share for p in data.PHASES)
    budget_at_cap = data.MAX_REPETITION * n_code / code_share
    reps = data.planned_repetition(tiny, budget_at_cap * 0.99)
    assert abs(reps["code"] - 0.99 * data.MAX_REPETITION) < 1e-6
    data.check_repetition(tiny, 100)
    with pytest.raises(data.RepetitionError, match="cap of 4x"):
        data.check_repetition(tiny, 1_000_000)
    data.check_repetition(tiny, 1_000_000, allow_over_repetition=True)
    with pytest.raises(data.RepetitionError):
        data.BatchSampler(tiny, seed=0, batch_size=8, seq_len=64, total_steps=10_000)
    data.BatchSampler(tiny, seed=0, batch_size=8, seq_len=64, total_steps=10_000, allow_over_repetition=True)


def test_data_report_prints_plan(tiny, capsys):
    data.data_report(tiny, 50_000)
    out = capsys.readouterr().out
    for needle in ("foundation", "quality uplift", "capability sharpening", "repetition", "bytes/token", "OVER THE CAP"):
        assert needle in out


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
    assert not torch.equal(sampler(tiny, seed=12).get_batch(0)[0], uninterrupted[0][0])


def test_phase_mixture_matches_table(tiny):
    s = sampler(tiny, batch_size=32)
    for p, steps in ((0, range(0, 150)), (1, range(600, 750)), (2, range(850, 1000))):
        counts = collections.Counter(src for step in steps for src in s.sample(step).sources)
        n = sum(counts.values())
        for source, prob in expected_mixture(p).items():
            assert within(counts[source], n, prob), (p, source, counts)


def test_fim_rates_by_phase_and_items_reassemble(tiny):
    """Every complete document in a row is a slice of a training document of the row's source
    (after undoing FIM); FIM and PSM/SPM rates match §3.2.2 per phase."""
    s = sampler(tiny, batch_size=16)
    train_docs = {src: [tiny.train[src].doc(i).tolist() for i in range(len(tiny.train[src].keys))]
                  for src in data.SOURCES}
    for p, steps in ((0, range(0, 200)), (1, range(600, 800)), (2, range(845, 1000))):
        fim, spm = collections.Counter(), collections.Counter()
        total = collections.Counter()
        for step in steps:
            batch = s.sample(step)
            for row, source in zip(full_rows(batch), batch.sources):
                for item in complete_items(row):
                    is_fim = bool(item) and item[0] in (data.FIM_PREFIX, data.FIM_SUFFIX)
                    total[source] += 1
                    fim[source] += is_fim
                    spm[source] += is_fim and item[0] == data.FIM_SUFFIX
                    original = data.fim_reassemble(item)
                    assert max(original, default=0) < data.N_RANKS
                    assert any(contains(doc, original) for doc in train_docs[source])
        for source in data.SOURCES:
            assert total[source] > 150
            assert within(fim[source], total[source], FIM_RATES[p][source]), (p, source, fim, total)
        assert within(sum(spm.values()), sum(fim.values()), 0.5)


def test_fim_transform_inverse_and_formats():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        doc = rng.integers(0, data.N_RANKS, size=rng.integers(0, 40))
        spm = bool(rng.random() < 0.5)
        out = data.fim_transform(doc, rng, spm)
        assert len(out) == len(doc) + 3
        assert out[0] == (data.FIM_SUFFIX if spm else data.FIM_PREFIX)
        assert data.fim_reassemble(out) == doc.tolist()
        assert data.fim_reassemble(list(out) + [data.EOT]) == doc.tolist()
    S, P, M = data.FIM_SUFFIX, data.FIM_PREFIX, data.FIM_MIDDLE
    assert data.fim_prompt([1, 2], [3]) == [S, 3, P, 1, 2, M]             # Mellum-4B order (SPM)
    assert data.fim_prompt([1, 2], [3], spm=False) == [P, 1, 2, S, 3, M]  # PSM
    assert data.fim_reassemble([5, 6, data.EOT]) == [5, 6]


def test_cut_points_are_uniform():
    """Each of the 3 parts gets 1/3 of the tokens on average (two uniform cuts)."""
    rng = np.random.default_rng(1)
    doc = np.arange(300)
    lengths = np.zeros(3)
    for _ in range(3000):
        out = data.fim_transform(doc, rng, spm=False).tolist()
        i_s, i_m = out.index(data.FIM_SUFFIX), out.index(data.FIM_MIDDLE)
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


def test_val_batches(tiny):
    seen = []
    for source in data.SOURCES:
        batches = list(data.val_batches(tiny, source, batch_size=2, seq_len=16, max_batches=3))
        assert 1 <= len(batches) <= 3
        again = list(data.val_batches(tiny, source, batch_size=2, seq_len=16, max_batches=3))
        for (x, y), (x2, y2) in zip(batches, again):
            assert x.shape[1] == 16 and torch.equal(x[:, 1:], y[:, :-1])
            assert torch.equal(x, x2) and torch.equal(y, y2)
        seen.append(torch.cat([x for x, _ in batches]))
        val_tokens = set(np.asarray(tiny.val[source].tokens).tolist()) | {data.EOT}
        assert set(seen[-1].flatten().tolist()) <= val_tokens
