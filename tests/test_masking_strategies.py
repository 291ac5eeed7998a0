"""Masking strategies: whole words on real tokenizers, SpanBERT spans, n-grams, predict vs corrupt rates,
rate schedules, unigram replacement, determinism for every strategy, and `maskedlm masks`."""

import functools
import json
import math
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from maskedlm.config import MaskingConfig
from maskedlm.errors import UserError
from maskedlm.masking import (
    FLAG_DOC_START,
    FLAG_WORD_START,
    config_k_max,
    mask_batch,
    rate_at,
    select_positions,
    unit_length_probs,
)
from maskedlm.tokenizer import SpecialIds

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SP = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)


def chi2_sf(x: float, dof: int) -> float:
    """P(χ²_dof ≥ x) from the series of the regularized lower incomplete gamma function (no scipy needed)."""
    a, z = dof / 2.0, x / 2.0
    if z <= 0:
        return 1.0
    term = 1.0 / a
    total = term
    for n in range(1, 2000):
        term *= z / (a + n)
        total += term
        if term < total * 1e-15:
            break
    lower = math.exp(a * math.log(z) - z - math.lgamma(a)) * total
    return max(0.0, 1.0 - lower)


def test_chi2_sf_matches_known_values():
    # Table values: χ²(0.95; 1) = 3.841, χ²(0.99; 9) = 21.666, χ²(0.5; 2) = 1.386 (= 2 ln 2)
    assert abs(chi2_sf(3.841, 1) - 0.05) < 1e-3
    assert abs(chi2_sf(21.666, 9) - 0.01) < 1e-4
    assert abs(chi2_sf(2 * math.log(2), 2) - 0.5) < 1e-9


# ---------------------------------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=8)
def generated_docs(n_docs, seed=0):
    rng = random.Random(seed)
    syl = ["ka", "ro", "mi", "te", "su", "lan", "dor", "ex", "qui", "bo", "na", "ri", "tho", "ven", "al", "is", "é", "ß"]
    lexicon = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 5))) for _ in range(4000)]
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(lexicon) + rng.choice(["", "", "", "", ",", ".", "'s"]) for _ in range(rng.randint(30, 250))]
        docs.append(" ".join(words))
    return tuple(docs)


def train_tokenizer(kind, texts):
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=SPECIALS)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=SPECIALS, unk_token="[UNK]")
    tok.train_from_iterator(texts, trainer=trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2, 3, 4]
    return tok


def pack(tok, docs, T):
    """Rows as prepare lays them out: [CLS] first, documents joined by [SEP]; flags from the tokenizer's word ids.

    Also returns, per token, a key naming its word as the tokenizer sees it (document, word id), -1 for specials.
    """
    ids, flags, word_key = [], [], []
    for d, enc in enumerate(tok.encode_batch(list(docs), add_special_tokens=False)):
        prev = None
        for j, (i, w) in enumerate(zip(enc.ids, enc.word_ids)):
            ids.append(i)
            f = FLAG_WORD_START if (w is None or w != prev) else 0
            if j == 0:
                f |= FLAG_DOC_START
            flags.append(f)
            word_key.append(d * 100000 + (w if w is not None else 99999))
            prev = w
        ids.append(SP.sep)
        flags.append(FLAG_WORD_START)
        word_key.append(-1)
    n = (len(ids) // (T - 1)) * (T - 1)
    ids = torch.tensor(ids[:n]).view(-1, T - 1)
    flags = torch.tensor(flags[:n], dtype=torch.uint8).view(-1, T - 1)
    word_key = torch.tensor(word_key[:n]).view(-1, T - 1)
    B = ids.shape[0]
    ids = torch.cat([torch.full((B, 1), SP.cls), ids], 1)  # (B, T)
    flags = torch.cat([torch.full((B, 1), FLAG_WORD_START, dtype=torch.uint8), flags], 1)  # (B, T)
    word_key = torch.cat([torch.full((B, 1), -1), word_key], 1)  # (B, T)
    return ids, flags, word_key


def eligible(ids):
    return ~torch.isin(ids, torch.tensor(SP.all()))


def synthetic_rows(B, T, seed=0, mean_doc_tokens=80):
    """Rows with words of 1-3 tokens and documents of about mean_doc_tokens tokens, [SEP] before each document."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 5000, (B, T), generator=g)  # (B, T)
    word_start = torch.rand(B, T, generator=g) < 0.6  # (B, T) ~1.7 tokens per word
    doc_start = torch.rand(B, T, generator=g) < 1.0 / mean_doc_tokens  # (B, T)
    doc_start[:, :2] = False
    sep = torch.zeros_like(doc_start)
    sep[:, :-1] = doc_start[:, 1:]
    ids[sep] = SP.sep
    ids[:, 0] = SP.cls
    flags = (word_start | sep | doc_start).to(torch.uint8) * FLAG_WORD_START + doc_start.to(torch.uint8) * FLAG_DOC_START
    flags[:, 0] = FLAG_WORD_START
    flags[:, 1] |= FLAG_WORD_START
    return ids, flags


# ---------------------------------------------------------------------------------------------------- word


@pytest.fixture(scope="module", params=["wordpiece", "bpe", "unigram"])
def packed(request):
    docs = generated_docs(1400, seed=1)
    tok = train_tokenizer(request.param, docs[:60])
    ids, flags, word_key = pack(tok, docs, 128)
    return request.param, ids, flags, word_key


def test_word_masking_never_splits_a_tokenizer_word(packed):
    kind, ids, flags, word_key = packed
    elig = eligible(ids)
    # the test means something only if many words have several tokens
    keys = word_key[elig]
    _, per_word = torch.unique(keys, return_counts=True)
    assert float((per_word > 1).float().mean()) > 0.2, kind
    reps = max(1, math.ceil(1_000_000 / int(elig.sum())))  # the same rows under other row indices: other masks
    cfg = MaskingConfig(unit="word")
    sel_total, elig_total, rand_total = 0, 0, 0
    for r in range(reps):
        rows = torch.arange(len(ids)) + r * len(ids)
        mb = mask_batch(ids, rows, 0, cfg, SP, 400, flags=flags)
        sel = mb.selection.mask
        assert int((sel & ~elig).sum()) == 0
        # a word, as the tokenizer's own word ids define it, is selected whole or not at all: every token that
        # continues the previous token's word (same document, same word id) shares its selection
        same_word = (word_key[:, 1:] == word_key[:, :-1]) & elig[:, 1:] & elig[:, :-1]
        assert int(same_word.sum()) > 0
        split = int((sel[:, 1:] != sel[:, :-1])[same_word].sum())
        assert split == 0, f"{kind}: {split} words partly selected"
        # each row within one word of mask_rate·n
        n = elig.sum(1).double()
        max_word = int(per_word.max())
        assert bool(((sel.sum(1).double() - cfg.mask_rate * n).abs() <= max_word + 1).all())
        sel_total += int(sel.sum())
        elig_total += int(elig.sum())
        x_bar = mb.input_ids
        rand_total += int(((x_bar != ids) & (x_bar != SP.mask) & sel).sum())
    assert elig_total >= 1_000_000
    assert abs(sel_total / elig_total - cfg.mask_rate) < 0.005, (kind, sel_total / elig_total)
    assert rand_total > 0 and abs(rand_total / sel_total - 0.1) < 0.01  # random replacement kept, per token


def test_word_masking_without_word_starts_is_refused():
    with pytest.raises(UserError, match="word starts"):
        select_positions(torch.randint(5, 50, (2, 16)), torch.arange(2), 0, MaskingConfig(unit="word"), SP)


# ---------------------------------------------------------------------------------------------------- spans, n-grams


def units_of(sel, ids, flags):
    """Per selected unit: (row, first position, last position, tokens, words, doc starts inside after its first token)."""
    unit = sel.unit_id
    B, T = unit.shape
    inside = unit >= 0
    key = (torch.arange(B).unsqueeze(1) * (T + 1) + unit)[inside]
    pos = torch.arange(T).expand(B, T)[inside]
    _, inv = torch.unique(key, return_inverse=True)
    m = int(inv.max()) + 1
    first = torch.full((m,), T).scatter_reduce(0, inv, pos, "amin")
    last = torch.full((m,), -1).scatter_reduce(0, inv, pos, "amax")
    tokens = torch.zeros(m, dtype=torch.long).scatter_add(0, inv, torch.ones_like(pos))
    word_start = ((flags.long() & FLAG_WORD_START) != 0)[inside].long()
    words = torch.zeros(m, dtype=torch.long).scatter_add(0, inv, word_start)
    doc = ((flags.long() & FLAG_DOC_START) != 0)[inside]
    doc_inside = torch.zeros(m, dtype=torch.long).scatter_add(0, inv, (doc & (pos != first[inv])).long())
    return first, last, tokens, words, doc_inside


@pytest.fixture(scope="module")
def span_rows():
    ids, flags = synthetic_rows(8192, 144, seed=11)
    assert int(eligible(ids).sum()) >= 1_000_000
    return ids, flags


@pytest.mark.parametrize("unit", ["span", "ngram"])
def test_span_and_ngram_lengths_follow_their_distribution(span_rows, unit):
    ids, flags = span_rows
    cfg = MaskingConfig(unit=unit)
    sel = select_positions(ids, torch.arange(len(ids)), 0, cfg, SP, flags=flags)
    elig = eligible(ids)
    assert int((sel.mask & ~elig).sum()) == 0
    first, last, tokens, words, doc_inside = units_of(sel, ids, flags)
    # contiguous runs (no overlap, nothing skipped), of whole words, never across a document start
    assert torch.equal(last - first + 1, tokens)
    assert int(doc_inside.sum()) == 0
    ws = (flags.long() & FLAG_WORD_START) != 0
    cont = ~ws[:, 1:] & elig[:, 1:]  # token t+1 continues the word of token t
    assert torch.equal(sel.mask[:, 1:][cont], sel.mask[:, :-1][cont])  # whole words only
    # lengths in words against the configured distribution
    probs = torch.tensor(unit_length_probs(cfg), dtype=torch.float64)
    L = len(probs)
    hist = torch.bincount(words, minlength=L + 1).double()
    assert hist[0] == 0 and len(hist) == L + 1
    n = float(hist.sum())
    assert n > 20000
    expected = probs * n
    chi2 = float(((hist[1:] - expected) ** 2 / expected).sum())
    p = chi2_sf(chi2, L - 1)
    assert p > 0.01, (unit, chi2, p, hist.tolist())
    analytic_mean = float((probs * torch.arange(1, L + 1)).sum())
    mean = float(words.double().mean())
    assert abs(mean - analytic_mean) / analytic_mean < 0.02, (mean, analytic_mean)
    if unit == "span":
        assert abs(analytic_mean - 3.8) < 0.01  # SpanBERT's published mean span length
    # and the budget: mask_rate of the words in expectation, hence of the tokens
    assert abs(float(sel.mask.sum()) / float(elig.sum()) - cfg.mask_rate) < 0.005


def test_ngram_probabilities_are_inverse_n():
    assert unit_length_probs(MaskingConfig(unit="ngram", max_ngram=3)) == pytest.approx([6 / 11, 3 / 11, 2 / 11])


def test_spans_never_cross_short_documents():
    ids, flags = synthetic_rows(2048, 128, seed=12, mean_doc_tokens=12)  # many document starts per row
    sel = select_positions(ids, torch.arange(2048), 0, MaskingConfig(unit="span"), SP, flags=flags)
    first, last, tokens, words, doc_inside = units_of(sel, ids, flags)
    assert int(doc_inside.sum()) == 0 and torch.equal(last - first + 1, tokens)
    assert int(sel.mask.sum()) > 0


# ---------------------------------------------------------------------------------------------------- predict vs corrupt


@pytest.mark.parametrize("predict,corrupt", [(0.4, 0.15), (0.15, 0.4), (0.3, 0.3)])
def test_predict_and_corrupt_rates(span_rows, predict, corrupt):
    ids, flags = span_rows
    cfg = MaskingConfig(predict_rate=predict, corrupt_rate=corrupt, mask_token_prob=1.0, random_token_prob=0.0)
    mb = mask_batch(ids, torch.arange(len(ids)), 0, cfg, SP, 5000, flags=flags)
    sel = mb.selection
    elig = eligible(ids)
    n = float(elig.sum())
    corrupted = sel.corrupt_mask if sel.corrupt_mask is not None else sel.mask
    assert abs(float(sel.mask.sum()) / n - predict) < 0.005
    assert abs(float(corrupted.sum()) / n - corrupt) < 0.005
    # x̄ is [MASK] exactly at the corrupted positions (mask_token_prob = 1); everything else is x
    assert torch.equal(mb.input_ids == SP.mask, corrupted)
    # the loss is taken at exactly the predicted positions: targets valid there and nowhere else
    back = torch.zeros_like(sel.mask).scatter(1, mb.positions, mb.valid)
    back[:, 0] |= sel.mask[:, 0]
    assert torch.equal(back, sel.mask)
    assert torch.equal(mb.targets[mb.valid], ids.gather(1, mb.positions)[mb.valid])
    # the smaller set sits inside the larger
    small, large = (sel.mask, corrupted) if predict <= corrupt else (corrupted, sel.mask)
    assert int((small & ~large).sum()) == 0


# ---------------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_rate_schedule_is_the_configured_function_of_step(schedule):
    cfg = MaskingConfig(rate_schedule=schedule, rate_start=0.3, rate_end=0.15, rate_schedule_steps=1000)
    for s in (0, 1, 250, 500, 999, 1000, 5000):
        t = min(s, 1000) / 1000
        want = 0.3 + (0.15 - 0.3) * t if schedule == "linear" else 0.15 + 0.15 * 0.5 * (1 + math.cos(math.pi * t))
        assert rate_at(cfg, s) == pytest.approx(want, abs=1e-12)
    ids, flags = synthetic_rows(512, 128, seed=13)
    elig = float(eligible(ids).sum())
    K = config_k_max(cfg, 128)
    for s in (0, 500, 1000):
        a = mask_batch(ids, torch.arange(512), 2, cfg, SP, 5000, flags=flags, step=s)
        assert a.positions.shape[1] == K  # static over training
        assert abs(float(a.num_selected) / elig - rate_at(cfg, s)) < 0.003
        # resuming at step s (a fresh config, nothing carried over) gives the same masks
        fresh = MaskingConfig(rate_schedule=schedule, rate_start=0.3, rate_end=0.15, rate_schedule_steps=1000)
        b = mask_batch(ids, torch.arange(512), 2, fresh, SP, 5000, flags=flags, step=s)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.positions, b.positions)


def test_a_rate_schedule_needs_its_length_and_a_k_max_fit_for_its_start():
    unset = MaskingConfig(rate_schedule="linear", rate_start=0.3)
    unset.validate()  # rate_schedule_steps 0 is valid: train fills in the run's steps
    with pytest.raises(UserError, match="masking.rate_schedule_steps > 0"):  # anything else must be told the length
        rate_at(unset, 0)
    with pytest.raises(UserError, match="masking.rate_schedule_steps must be >= 0"):
        MaskingConfig(rate_schedule="linear", rate_schedule_steps=-1).validate()
    with pytest.raises(ValueError, match="config_k_max"):  # a K sized for 15% would silently cap a 30% start
        cfg = MaskingConfig(rate_schedule="linear", rate_start=0.3, rate_schedule_steps=10)
        select_positions(torch.randint(5, 50, (2, 128)), torch.arange(2), 0, cfg, SP, k_max=20)


# ---------------------------------------------------------------------------------------------------- unigram


def test_unigram_replacement_follows_counts():
    V = 40
    counts = np.zeros(V, dtype=np.int64)
    counts[5:] = np.arange(1, V - 4) ** 2  # skewed
    counts[SP.sep] = 10**9  # a special token's count must not matter
    ids, flags = synthetic_rows(4096, 128, seed=14)
    ids = torch.where(ids >= 5, ids % (V - 5) + 5, ids)
    cfg = MaskingConfig(mask_rate=0.5, mask_token_prob=0.0, random_token_prob=1.0, random_token_dist="unigram")
    mb = mask_batch(ids, torch.arange(4096), 0, cfg, SP, V, flags=flags, token_counts=counts)
    drawn = mb.input_ids[mb.selection.mask]
    hist = torch.bincount(drawn, minlength=V).double()
    assert hist[:5].sum() == 0
    expected = torch.tensor(counts[5:] / counts[5:].sum()) * float(hist.sum())
    chi2 = float(((hist[5:] - expected) ** 2 / expected).sum())
    assert chi2_sf(chi2, V - 6) > 0.001, chi2
    with pytest.raises(UserError, match="token_counts"):
        mask_batch(ids[:2], torch.arange(2), 0, cfg, SP, V, flags=flags[:2])


# ---------------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize(
    "overrides",
    [
        dict(unit="token"),
        dict(unit="word"),
        dict(unit="span"),
        dict(unit="ngram", max_ngram=4),
        dict(unit="word", predict_rate=0.3, corrupt_rate=0.15),
        dict(unit="span", random_token_dist="unigram"),
        dict(rate_schedule="cosine", rate_start=0.4, rate_end=0.1, rate_schedule_steps=100),
    ],
)
def test_same_row_same_mask_for_every_strategy(overrides):
    ids, flags = synthetic_rows(192, 128, seed=15)
    rows = torch.arange(192) * 3 + 77
    counts = np.ones(5000, dtype=np.int64)
    cfg = MaskingConfig(**overrides)
    whole = mask_batch(ids, rows, 4, cfg, SP, 5000, flags=flags, step=37, token_counts=counts)
    perm = torch.randperm(192, generator=torch.Generator().manual_seed(2))
    other_ids, other_flags = synthetic_rows(50, 128, seed=16)
    for chunk in torch.split(perm, 50):
        m = len(chunk) // 2
        b_ids = torch.cat([other_ids[:m], ids[chunk]])
        b_flags = torch.cat([other_flags[:m], flags[chunk]])
        b_rows = torch.cat([torch.arange(m) + 10**9, rows[chunk]])
        part = mask_batch(b_ids, b_rows, 4, cfg, SP, 5000, flags=b_flags, step=37, token_counts=counts)
        assert torch.equal(part.input_ids[m:], whole.input_ids[chunk])
        assert torch.equal(part.positions[m:], whole.positions[chunk])
        assert torch.equal(part.valid[m:], whole.valid[chunk])
    other_epoch = mask_batch(ids, rows, 5, cfg, SP, 5000, flags=flags, step=37, token_counts=counts)
    assert float((other_epoch.selection.mask != whole.selection.mask).any(1).float().mean()) > 0.95


# ---------------------------------------------------------------------------------------------------- maskedlm masks


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A prepared data dir in the on-disk layout of the contract, built here with np.save (no prepare needed)."""
    d = tmp_path_factory.mktemp("data")
    docs = generated_docs(200, seed=3)
    tok = train_tokenizer("wordpiece", docs[:100])
    ids, flags, _ = pack(tok, docs, 64)
    V = tok.get_vocab_size()
    tok.save(str(d / "tokenizer.json"))
    n_val = 20
    for split, sl in (("train", slice(n_val, None)), ("val", slice(0, n_val))):
        (d / split).mkdir()
        np.save(d / split / "shard_00000.ids.npy", ids[sl].numpy().astype(np.uint16))
        np.save(d / split / "shard_00000.flags.npy", flags[sl].numpy())
    np.save(d / "token_counts.npy", np.bincount(ids[n_val:].flatten().numpy(), minlength=V).astype(np.int64))
    meta = {
        "format_version": 1, "vocab_size": V, "seq_len": 64, "dtype": "uint16", "tokenizer_hash": "",
        "special_ids": {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4},
        "splits": {
            "train": {"rows": len(ids) - n_val, "tokens": (len(ids) - n_val) * 64, "documents": 0, "shards": ["shard_00000"]},
            "val": {"rows": n_val, "tokens": n_val * 64, "documents": 0, "shards": ["shard_00000"]},
        },
    }
    (d / "meta.json").write_text(json.dumps(meta))
    return d, ids[n_val:], flags[n_val:]


@pytest.mark.parametrize("unit", ["token", "word", "span", "ngram"])
def test_masks_json_statistics(data_dir, capsys, unit):
    from maskedlm.cli import main

    d, ids, flags = data_dir
    main(["masks", str(d), "--json", "--rows", "0", f"masking.unit={unit}"])
    stats = json.loads(capsys.readouterr().out)
    for key in ("selected_share", "mask_share", "random_share", "kept_share", "special_selected", "unit_length_histogram"):
        assert key in stats
    assert stats["special_selected"] == 0
    assert stats["rows"] == len(ids)
    assert stats["eligible_tokens"] == int(eligible(ids).sum())
    assert abs(stats["selected_share"] - 0.15) < 0.01
    assert abs(stats["mask_share"] + stats["random_share"] + stats["kept_share"] - 1) < 1e-9
    assert abs(stats["mask_share"] - 0.8) < 0.03
    # the statistics are those of mask_batch on the same rows (row index = position in the split, epoch 0)
    cfg = MaskingConfig(unit=unit)
    mb = mask_batch(ids, torch.arange(len(ids)), 0, cfg, SP, 10**4, flags=flags)
    assert stats["selected_tokens"] == int(mb.num_selected)
    assert stats["mask_share"] == int(mb.corruption.to_mask.sum()) / int(mb.selection.mask.sum())  # its own decisions
    hist = stats["unit_length_histogram"]
    if unit == "token":
        assert hist == {"1": int(mb.num_selected)}
    else:
        assert sum(int(k) * v for k, v in hist.items()) >= 1


def test_masks_text_shows_rows_as_words(data_dir, capsys):
    from maskedlm.cli import main

    d, ids, flags = data_dir
    main(["masks", str(d), "--rows", "2", "--config", "tiny", "unit=word", "mask_rate=0.3"])
    out = capsys.readouterr().out
    assert out.count("row ") >= 2 and "⟦" in out and "[MASK]" in out and "x̄" in out
    assert "special tokens selected: 0" in out
    assert "##" not in out  # word pieces are joined into words


def test_masks_refuses_a_bad_masking_override_and_an_unprepared_dir(data_dir, tmp_path):
    from maskedlm.masks import masks_report

    d, _, _ = data_dir
    with pytest.raises(UserError, match="masking.mask_rate"):
        masks_report(d, overrides=["masking.mask_rate=1.5"])
    with pytest.raises(UserError, match="prepare"):
        masks_report(tmp_path)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "unigram"])
def test_masks_on_data_from_prepare(tmp_path, capsys, kind):
    """End to end with the real tokenizer trainer and prepare: their word starts give whole-word and span masks."""
    from maskedlm.cli import main
    from maskedlm.data.prepare import prepare
    from maskedlm.data.shards import load_meta, open_split
    from maskedlm.tokenizer import train_tokenizer as train_ours

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(generated_docs(120, seed=9)) + "\n", encoding="utf-8")
    tok_dir = train_ours([str(corpus)], vocab_size=300, kind=kind, out=tmp_path / "tok").parent
    prepare([str(corpus)], str(tok_dir), 64, tmp_path / "data", val_fraction=0.05, workers=1)
    meta = load_meta(tmp_path / "data")
    ids, flags = open_split(tmp_path / "data", "train").rows(np.arange(len(open_split(tmp_path / "data", "train"))))
    ids, flags = torch.from_numpy(ids), torch.from_numpy(flags)
    sp = SpecialIds(**meta["special_ids"])
    elig = ~torch.isin(ids, torch.tensor(sp.all()))
    ws = (flags.long() & FLAG_WORD_START) != 0
    assert float((~ws & elig).float().mean()) > 0.1  # words of several tokens exist
    for unit in ("word", "span"):
        main(["masks", str(tmp_path / "data"), "--json", f"masking.unit={unit}", "--rows", "0"])
        stats = json.loads(capsys.readouterr().out)
        assert stats["special_selected"] == 0 and abs(stats["selected_share"] - 0.15) < 0.02
        sel = select_positions(ids, torch.arange(len(ids)), 0, MaskingConfig(unit=unit), sp, flags=flags).mask
        cont = ~ws[:, 1:] & elig[:, 1:] & elig[:, :-1]
        assert torch.equal(sel[:, 1:][cont], sel[:, :-1][cont])
        assert int(sel.sum()) == stats["selected_tokens"]
