"""Token-level masking: exact counts, 80/10/10, specials, counter-based determinism, validation."""

import math

import pytest
import torch

from maskedlm.config import MaskingConfig, load_config
from maskedlm.errors import UserError
from maskedlm.masking import (
    MaskedBatch,
    Selection,
    _mix32,
    corrupt,
    default_k_max,
    mask_batch,
    select_positions,
)
from maskedlm.tokenizer import SpecialIds

SP = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)
V = 30000


def make_rows(B, T, seed=0, vocab=V):
    """Packed-looking rows: [CLS] first, [SEP] between documents, a few [UNK], some rows padded at the end."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)  # (B, T)
    ids[torch.rand(B, T, generator=g) < 0.02] = SP.sep
    ids[torch.rand(B, T, generator=g) < 0.005] = SP.unk
    ids[:, 0] = SP.cls
    pad_from = torch.randint(T // 2, T + 1, (B,), generator=g)  # (B,)
    padded = torch.rand(B, generator=g) < 0.25  # (B,)
    ids[padded.unsqueeze(1) & (torch.arange(T).unsqueeze(0) >= pad_from.unsqueeze(1))] = SP.pad
    return ids


def eligible(ids):
    return ~torch.isin(ids, torch.tensor(SP.all()))


@pytest.fixture(scope="module")
def big():
    """≥ 1M eligible tokens, masked once at the default 15% with 80/10/10."""
    B, T = 8192, 144
    ids = make_rows(B, T)
    rows = torch.arange(B, dtype=torch.long) * 7 + 1000  # global row indices need not be 0..B-1
    cfg = MaskingConfig()
    mb = mask_batch(ids, rows, 0, cfg, SP, V)
    elig = eligible(ids)
    assert int(elig.sum()) >= 1_000_000
    return ids, rows, cfg, mb, elig


def test_lowbias32_matches_plain_integer_reference():
    # The hash splits multiplications into 16-bit halves; check it against plain Python integers (arbitrary precision).
    def ref(x):
        m = 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & m
        x ^= x >> 15
        x = (x * 0x846CA68B) & m
        return x ^ (x >> 16)

    xs = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF] + list(range(1000, 200000, 7919))
    t = torch.tensor(xs, dtype=torch.long)
    assert _mix32(t).tolist() == [ref(x) for x in xs]
    assert len(set(_mix32(torch.arange(100000)).tolist())) == 100000  # a bijection: no collisions


def test_selected_fraction_and_exact_counts(big):
    ids, rows, cfg, mb, elig = big
    sel = mb.selection.mask
    frac = float(sel.sum()) / float(elig.sum())
    assert abs(frac - cfg.mask_rate) < 0.002, frac
    # k = floor(rate·n + u): every row has floor(rate·n) or floor(rate·n) + 1 positions.
    n = elig.sum(1).double()
    k = sel.sum(1).double()
    lo = torch.floor(cfg.mask_rate * n)
    assert bool(((k == lo) | (k == lo + 1)).all())
    # and the rounding is unbiased: the share of rows rounded up tracks the fractional part
    assert abs(float((k - cfg.mask_rate * n).mean())) < 0.02


def test_never_special_or_padding(big):
    ids, rows, cfg, mb, elig = big
    sel = mb.selection.mask
    assert int((sel & ~elig).sum()) == 0
    assert int(sel[ids == SP.pad].sum()) == 0
    # valid positions point at selected, non-special tokens
    assert bool(sel.gather(1, mb.positions)[mb.valid].all())


def test_80_10_10_and_no_special_introduced(big):
    ids, rows, cfg, mb, elig = big
    sel = mb.selection.mask
    x_bar = mb.input_ids
    n = float(sel.sum())
    masked = (x_bar == SP.mask) & sel
    replaced = (x_bar != ids) & (x_bar != SP.mask) & sel
    kept = (x_bar == ids) & sel
    assert abs(float(masked.sum()) / n - 0.8) < 0.01
    assert abs(float(replaced.sum()) / n - 0.1) < 0.01  # a random draw equal to x_i (p = 1/V) counts as kept
    assert abs(float(kept.sum()) / n - 0.1) < 0.01
    # outside A(x) nothing changes; random replacements are never special tokens and stay in the vocabulary
    assert torch.equal(x_bar[~sel], ids[~sel])
    assert not bool(torch.isin(x_bar[replaced], torch.tensor(SP.all())).any())
    assert int(x_bar.max()) < V and int(x_bar.min()) >= 0


def test_random_replacement_uniform_over_non_special():
    vocab = 25  # 20 non-special ids: each should get 1/20 of the replacements
    ids = make_rows(4096, 128, seed=3, vocab=vocab)
    cfg = MaskingConfig(mask_rate=0.5, mask_token_prob=0.0, random_token_prob=1.0)
    mb = mask_batch(ids, torch.arange(4096), 0, cfg, SP, vocab)
    sel = mb.selection.mask
    drawn = mb.input_ids[sel]
    counts = torch.bincount(drawn, minlength=vocab).double()
    assert counts[list(SP.all())].sum() == 0
    expected = float(sel.sum()) / (vocab - 5)
    chi2 = float((((counts[5:] - expected) ** 2) / expected).sum())
    assert chi2 < 45.3, chi2  # chi-square, 19 degrees of freedom, p = 0.001


def test_masked_batch_lists_the_selected_positions_in_order_with_their_original_tokens(big):
    ids, rows, cfg, mb, elig = big
    assert isinstance(mb, MaskedBatch)
    B, T = ids.shape
    K = default_k_max(T, cfg.mask_rate)
    assert mb.positions.shape == (B, K) and mb.valid.shape == (B, K) and mb.targets.shape == (B, K)
    assert mb.positions.dtype == torch.long and mb.valid.dtype == torch.bool
    assert int(mb.num_selected) == int(mb.valid.sum()) == int(mb.selection.mask.sum())
    assert bool((mb.positions[~mb.valid] == 0).all())
    # valid entries first, ascending
    v = mb.valid.long()
    assert bool((v[:, 1:] <= v[:, :-1]).all())
    p = torch.where(mb.valid, mb.positions, T)
    assert bool((p[:, 1:] >= p[:, :-1]).all())
    # targets are the original tokens x_i at A(x), -100 elsewhere
    assert torch.equal(mb.targets[mb.valid], ids.gather(1, mb.positions)[mb.valid])
    assert bool((mb.targets[~mb.valid] == -100).all())
    # the boolean mask and the index form agree
    back = torch.zeros_like(ids, dtype=torch.bool).scatter(1, mb.positions, mb.valid)
    back[:, 0] |= mb.selection.mask[:, 0]  # position 0 is also the padding target
    assert torch.equal(back, mb.selection.mask)


def test_default_k_max_bounds_every_row():
    for T in (16, 128, 512):
        for rate in (0.05, 0.15, 0.3, 0.5, 0.9):
            K = default_k_max(T, rate)
            assert K == min(T, math.floor(rate * T) + 1)
            ids = torch.randint(5, 100, (64, T))  # no special token: n = T, the largest k
            mb = mask_batch(ids, torch.arange(64), 0, MaskingConfig(mask_rate=rate), SP, 100, k_max=K)
            assert mb.positions.shape[1] == K
            assert int(mb.selection.mask.sum(1).max()) <= K
            assert int(mb.num_selected) == int(mb.selection.mask.sum())


def test_same_row_same_mask_in_any_batch():
    ids = make_rows(256, 96, seed=5)
    rows = torch.arange(256) + 50_000
    cfg = MaskingConfig(mask_rate=0.2)
    whole = mask_batch(ids, rows, 3, cfg, SP, V)
    # the same rows in another order, inside batches of different sizes next to other rows
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(1))
    others = make_rows(64, 96, seed=6)
    for chunk in torch.split(perm, 37):
        batch_ids = torch.cat([others[: len(chunk)], ids[chunk]])
        batch_rows = torch.cat([torch.arange(len(chunk)) + 9_000_000, rows[chunk]])
        part = mask_batch(batch_ids, batch_rows, 3, cfg, SP, V)
        m = len(chunk)
        assert torch.equal(part.input_ids[m:], whole.input_ids[chunk])
        assert torch.equal(part.selection.mask[m:], whole.selection.mask[chunk])
        assert torch.equal(part.positions[m:], whole.positions[chunk])
        assert torch.equal(part.targets[m:], whole.targets[chunk])
    # one row at a time, too
    one = mask_batch(ids[7:8], rows[7:8], 3, cfg, SP, V)
    assert torch.equal(one.input_ids[0], whole.input_ids[7])


def test_epochs_seeds_and_rows_differ():
    ids = make_rows(512, 128, seed=7)
    rows = torch.arange(512)
    cfg = MaskingConfig()
    e0 = select_positions(ids, rows, 0, cfg, SP).mask
    e1 = select_positions(ids, rows, 1, cfg, SP).mask
    s1 = select_positions(ids, rows, 0, MaskingConfig(seed=1), SP).mask
    same_ids = ids[:1].expand(512, -1)  # identical rows under different row indices
    r = select_positions(same_ids, rows, 0, cfg, SP).mask
    assert torch.equal(e0, select_positions(ids, rows, 0, cfg, SP).mask)  # pure: same inputs, same mask
    assert float((e0 != e1).any(1).float().mean()) > 0.99
    assert float((e0 != s1).any(1).float().mean()) > 0.99
    assert len({tuple(x.nonzero().flatten().tolist()) for x in r}) > 500
    # the overlap between epochs is what independent draws give (≈ rate), not more
    overlap = float((e0 & e1).sum()) / float(e0.sum())
    assert abs(overlap - cfg.mask_rate) < 0.03


def test_no_global_rng_state_touched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    mask_batch(make_rows(8, 32), torch.arange(8), 0, MaskingConfig(), SP, V)
    assert torch.equal(state, torch.get_rng_state())


def test_corrupt_takes_a_given_selection():
    # inference builds a Selection by hand (explain): corrupt must work from mask alone
    ids = torch.randint(5, 100, (1, 40))
    m = torch.zeros_like(ids, dtype=torch.bool)
    m[0, [3, 9, 20]] = True
    sel = Selection(mask=m, positions=torch.tensor([[3, 9, 20]]), valid=torch.ones(1, 3, dtype=torch.bool))
    out = corrupt(ids, sel, torch.tensor([0]), 0, MaskingConfig(mask_token_prob=1.0, random_token_prob=0.0), SP, 100)
    assert torch.equal(out[m], torch.full((3,), SP.mask))
    assert torch.equal(out[~m], ids[~m])


@pytest.mark.parametrize(
    "key,value",
    [
        ("mask_rate", 1.5),
        ("mask_rate", 0.0),
        ("mask_token_prob", -0.1),
        ("random_token_prob", 1.2),
        ("unit", "sentence"),
        ("rate_schedule", "step"),
        ("random_token_dist", "zipf"),
        ("predict_rate", 1.0),
        ("span_max_words", 0),
    ],
)
def test_validation_names_key_and_value(key, value):
    cfg = MaskingConfig(**{key: value})
    with pytest.raises(UserError) as e:
        select_positions(torch.randint(5, 50, (2, 8)), torch.arange(2), 0, cfg, SP)
    assert f"masking.{key}" in str(e.value) and str(value) in str(e.value)
    with pytest.raises(UserError) as e:
        load_config(None, [f"masking.{key}={value!r}".replace("'", '"')])
    assert f"masking.{key}" in str(e.value)


def test_validation_of_probability_sum():
    with pytest.raises(UserError, match=r"mask_token_prob \+ masking.random_token_prob must be <= 1, got 1.2"):
        select_positions(torch.randint(5, 50, (2, 8)), torch.arange(2), 0, MaskingConfig(mask_token_prob=0.9, random_token_prob=0.3), SP)
