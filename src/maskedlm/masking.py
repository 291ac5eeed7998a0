"""A(x) and x̄: which positions of a row are predicted, and what the encoder sees there.

Pure, vectorised torch: every random decision is a counter-based hash of (seed, epoch, global row index, position,
stream), so a row gets the same mask in any batch, on any worker or rank, after any restart; no global RNG is touched.
Units: tokens, whole words, SpanBERT spans or n-grams of words. Nothing here reads data or runs models (masks.py does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from maskedlm.config import MaskingConfig
from maskedlm.errors import UserError

# The flag bits of prepared rows (the on-disk format in data/shards.py; repeated so masking needs no data imports).
FLAG_DOC_START = 1
FLAG_WORD_START = 2

# Stream ids: one per kind of random decision, so that no two decisions share a random number.
_S_COUNT = 1  # per row: u in k = floor(rate·n + u)
_S_ORDER = 2  # per unit: the order in which units are taken
_S_ROUND = 3  # per unit: whether the unit crossing the budget is taken
_S_SPLIT = 4  # per unit: predicted and/or corrupted (predict_rate vs corrupt_rate)
_S_KIND = 5  # per token: [MASK] / random / unchanged
_S_RANDOM = 6  # per token: which random token
_S_RANDOM2 = 7  # per token: low bits for unigram draws
_S_LENGTH = 8  # per span: its length in words
_S_SLOT = 16  # per placement attempt (16, 17, ...): where the spans go

_SPAN_ATTEMPTS = 8  # placements tried per row before spans that cross a document start are dropped
_M32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------- counter hash
# lowbias32 (Wellons, "Prospecting for hash functions", 2018): a bijection on 32-bit integers with near-ideal avalanche.
# Values live in int64 tensors holding 32 bits, and no product may exceed 2^63: torch has no uint32/uint64 arithmetic
# everywhere, and int64 overflow is not something to rely on. x·c with x < 2^32 and c < 2^31 fits; the second constant
# (≥ 2^31) is applied as x·(c − 2^31) + x·2^31, where x·2^31 mod 2^32 is just x's lowest bit moved to bit 31.


def _mul32(x, c: int):
    """(x · c) mod 2^32 for x in [0, 2^32) (tensor or int) and a constant c < 2^32."""
    if c < (1 << 31):
        return (x * c) & _M32
    return (x * (c - (1 << 31)) + ((x & 1) << 31)) & _M32


def _mix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key(seed: int, epoch: int, stream: int) -> int:
    """The scalar part of the counter, hashed on the host: (seed, epoch, stream) → 32 bits."""
    h = _mix32((int(seed) & _M32) ^ 0x9E3779B9)
    for part in ((int(seed) >> 32) & _M32, int(epoch) & _M32, (int(epoch) >> 32) & _M32, int(stream) & _M32):
        h = _mix32(h ^ part)
    return h


def _row_hash(key: int, row_index: torch.Tensor) -> torch.Tensor:
    r = row_index.long()  # (B,)
    h = _mix32((r & _M32) ^ key)  # (B,)
    return _mix32(h ^ ((r >> 32) & _M32))  # (B,)


def _hash(seed: int, epoch: int, stream: int, row_index: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """32-bit hashes of (seed, epoch, stream, row, col): int64 (B, C); cols is (C,) or (B, C), values < 2^32.

    For a fixed row the map col → hash is a bijection, so hashes within a row never tie.
    """
    h = _row_hash(_key(seed, epoch, stream), row_index)  # (B,)
    cols = cols.long()
    if cols.dim() == 1:
        cols = cols.unsqueeze(0)  # (1, C)
    return _mix32(h.unsqueeze(1) ^ cols)  # (B, C)


def _hash_at(seed: int, epoch: int, stream: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The same hashes as _hash, for matching 1-D (row index, col) pairs: only where a decision is needed."""
    return _mix32(_row_hash(_key(seed, epoch, stream), rows) ^ cols.long())  # (N,)


def _unit_float(h: torch.Tensor) -> torch.Tensor:
    """Uniform in [0, 1) from a 32-bit hash, exactly representable in float32 (24 bits)."""
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _unit_double(h: torch.Tensor) -> torch.Tensor:
    return h.to(torch.float64) * (1.0 / (1 << 32))


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class Selection:
    """A(x) as a boolean mask and as padded, ascending positions (static K so compiled graphs see fixed shapes)."""

    mask: torch.Tensor  # (B, T) bool: i ∈ A(x), the predicted positions
    positions: torch.Tensor  # (B, K) long: A(x) in ascending order; padded entries point at 0
    valid: torch.Tensor  # (B, K) bool: which entries of positions are real
    # Positions whose input is corrupted (80/10/10); None means A(x) itself (the standard objective). Differs from
    # mask only when masking.predict_rate != masking.corrupt_rate (Wettig et al. 2022).
    corrupt_mask: torch.Tensor | None = None  # (B, T) bool
    # Which selected unit (word, span, n-gram; a token for unit=token) each position belongs to, -1 elsewhere; numbered
    # per row. For statistics (`maskedlm masks`) and tests; training does not need it.
    unit_id: torch.Tensor | None = None  # (B, T) long


@dataclass
class Corruption:
    """x̄ and the per-token decisions that made it; the decisions are for statistics (`maskedlm masks`) and tests."""

    input_ids: torch.Tensor  # (B, T) long: x̄
    to_mask: torch.Tensor  # (B, T) bool: became [MASK]
    to_random: torch.Tensor  # (B, T) bool: became a random token (which may happen to equal x_i)


@dataclass
class MaskedBatch:
    input_ids: torch.Tensor  # (B, T) long: x̄
    positions: torch.Tensor  # (B, K) long: A(x), padded with 0
    valid: torch.Tensor  # (B, K) bool
    targets: torch.Tensor  # (B, K) long: x_i at A(x), -100 where not valid
    num_selected: torch.Tensor  # () long: |A(x)| in the batch (count of valid)
    selection: Selection | None = None
    corruption: Corruption | None = None


# ---------------------------------------------------------------------------------------------------- rates


def rate_at(cfg: MaskingConfig, step: int = 0) -> float:
    """The scheduled selection rate at optimizer step `step` (mask_rate for the constant schedule)."""
    if cfg.rate_schedule == "constant":
        return float(cfg.mask_rate)
    r0 = cfg.rate_start or cfg.mask_rate
    r1 = cfg.rate_end or cfg.mask_rate
    steps = int(cfg.rate_schedule_steps)
    if steps <= 0:
        # train fills 0 in from the run's step budget; anything else (e.g. `maskedlm masks`) must be told the length.
        raise UserError(f"masking.rate_schedule={cfg.rate_schedule!r} needs masking.rate_schedule_steps > 0 (the "
                        f"schedule's length in steps; train fills it from train.max_steps), got {steps}")
    t = min(max(int(step), 0), steps) / steps
    if cfg.rate_schedule == "linear":
        return float(r0 + (r1 - r0) * t)
    return float(r1 + (r0 - r1) * 0.5 * (1.0 + math.cos(math.pi * t)))  # cosine


def rates_at(cfg: MaskingConfig, step: int) -> tuple[float, float]:
    """(predict rate, corrupt rate) at `step`; 0 in the config means "= mask_rate" (or the scheduled rate)."""
    base = rate_at(cfg, step)
    return (cfg.predict_rate or base), (cfg.corrupt_rate or base)


def _max_rate(cfg: MaskingConfig) -> float:
    """The largest selection rate this configuration ever uses (for a K that is static over training)."""
    if cfg.rate_schedule == "constant":
        base = cfg.mask_rate
    else:
        base = max(cfg.rate_start or cfg.mask_rate, cfg.rate_end or cfg.mask_rate)
    return max(cfg.predict_rate or base, cfg.corrupt_rate or base)


def default_k_max(seq_len: int, mask_rate: float) -> int:
    """K of token-level masking: k = floor(rate·n + u) ≤ floor(rate·T) + 1, so K depends only on (T, rate)."""
    return int(min(int(seq_len), math.floor(float(mask_rate) * int(seq_len)) + 1))


def config_k_max(cfg: MaskingConfig, seq_len: int) -> int:
    """K for a whole configuration: the largest scheduled rate, plus room for whole units.

    Word, span and n-gram units select whole words, so a row may go past rate·n by up to a unit; the margins keep
    nearly every unit (a unit that would not fit in K is left out whole, never cut).
    """
    k = default_k_max(seq_len, _max_rate(cfg))
    if cfg.unit == "word":
        k += 8  # one word of up to 8 extra tokens; longer words at the budget's edge are skipped
    elif cfg.unit in ("span", "ngram"):
        k = int(math.ceil(k * 1.5)) + 4 * _max_unit_words(cfg)  # word budget + overshoot + multi-token words
    return int(min(int(seq_len), k))


def _max_unit_words(cfg: MaskingConfig) -> int:
    return int(cfg.span_max_words if cfg.unit == "span" else cfg.max_ngram if cfg.unit == "ngram" else 1)


@lru_cache(maxsize=64)
def _length_probs(unit: str, p: float, max_words: int) -> tuple[float, ...]:
    """P(length = 1..max_words) in words: truncated geometric (span) or ∝ 1/n (ngram)."""
    if unit == "span":
        # SpanBERT (Joshi et al. 2020) samples Geometric(p) and clips at 10 by renormalising over 1..10 (its code
        # draws from the normalised truncated table): mean 3.8 words for p = 0.2.
        w = [p * (1.0 - p) ** (n - 1) for n in range(1, max_words + 1)]
    else:
        w = [1.0 / n for n in range(1, max_words + 1)]  # Megatron-LM / ERNIE n-gram masking: P(n) ∝ 1/n
    s = sum(w)
    return tuple(x / s for x in w)


def unit_length_probs(cfg: MaskingConfig) -> list[float]:
    """The configured distribution of unit lengths in words (index 0 = length 1); [1.0] for token/word units."""
    if cfg.unit not in ("span", "ngram"):
        return [1.0]
    p = cfg.span_geometric_p if cfg.unit == "span" else 0.0
    return list(_length_probs(cfg.unit, float(p), _max_unit_words(cfg)))


# ---------------------------------------------------------------------------------------------------- selection


def _special_tensor(special, device) -> torch.Tensor:
    return torch.tensor(sorted(set(int(i) for i in special.all())), dtype=torch.long, device=device)


def eligible(ids: torch.Tensor, special) -> torch.Tensor:
    """Which tokens may be selected: (B, T) bool, not a special token (padding is [PAD], a special token)."""
    return ~torch.isin(ids, _special_tensor(special, ids.device))  # (B, T)


def unit_starts(elig: torch.Tensor, flags: torch.Tensor | None, unit: str) -> torch.Tensor:
    """Where a unit (token or word) starts; every ineligible token is a unit of its own, and so is what follows it."""
    if flags is None:
        raise UserError(f"masking.unit={unit!r} needs the word starts that `maskedlm prepare` stores (flags); none were given")
    starts = (flags.to(torch.long) & FLAG_WORD_START) != 0  # (B, T)
    prev_inelig = torch.ones_like(elig)  # (B, T)
    prev_inelig[:, 1:] = ~elig[:, :-1]
    return starts | ~elig | prev_inelig  # (B, T)


def _select_ranked(elig, starts, row_index, epoch, seed, rate, k_max):
    """Units (tokens, starts=None, or words) in hashed order until k = floor(rate·n + u) tokens (n = eligible tokens).

    The unit that crosses k is taken with probability (k − before)/length, so the expected count is exactly rate·n and
    any row is within one unit of it. Returns (selected (B, T) bool, unit index (B, T) long, unit first position).
    """
    B, T = elig.shape
    dev = elig.device
    pos = torch.arange(T, device=dev)  # (T,)
    n = elig.sum(dim=1)  # (B,)
    u = _unit_double(_hash(seed, epoch, _S_COUNT, row_index, torch.zeros(1, device=dev)))[:, 0]  # (B,)
    k = torch.floor(float(rate) * n.to(torch.float64) + u).long().clamp(max=n).unsqueeze(1)  # (B, 1)
    if starts is None:  # unit = token: every unit is one token, so the k best-scored eligible tokens
        score = torch.where(elig, _hash(seed, epoch, _S_ORDER, row_index, pos), -1)  # (B, T)
        top = torch.topk(score, min(int(k_max), T), dim=1).indices  # (B, K) best first; scores never tie in a row
        take = torch.arange(top.shape[1], device=dev).unsqueeze(0) < k  # (B, K)
        selected = torch.zeros((B, T), dtype=torch.bool, device=dev).scatter(1, top, take) & elig  # (B, T)
        return selected, pos.expand(B, T), pos.expand(B, T)
    first = torch.cummax(torch.where(starts, pos, 0), dim=1).values  # (B, T) first position of each token's unit
    uid = torch.cumsum(starts.long(), dim=1) - 1  # (B, T) unit index in position order
    order_h = _hash(seed, epoch, _S_ORDER, row_index, pos)  # (B, T)
    score = torch.where(elig, order_h.gather(1, first), -1)  # (B, T) a unit's score is its first token's hash
    unit_score = torch.full((B, T), -1, dtype=torch.long, device=dev).scatter_reduce(1, uid, score, "amax")  # (B, U)
    unit_len = torch.zeros((B, T), dtype=torch.long, device=dev).scatter_add(1, uid, elig.long())  # (B, U)
    unit_first = torch.zeros((B, T), dtype=torch.long, device=dev).scatter_reduce(1, uid, first, "amax")  # (B, U)
    order = torch.argsort(unit_score, dim=1, descending=True, stable=True)  # (B, U) scores never tie among units
    length = unit_len.gather(1, order)  # (B, U)
    after = torch.cumsum(length, dim=1)  # (B, U) tokens taken once this unit is in
    before = after - length  # (B, U)
    crossing = (before < k) & (after > k)  # (B, U) at most one unit per row
    # The draw for the crossing unit is keyed by its first position, like every other per-unit decision.
    cross_first = unit_first.gather(1, order).gather(1, crossing.long().argmax(dim=1, keepdim=True))  # (B, 1)
    v = _unit_double(_hash(seed, epoch, _S_ROUND, row_index, cross_first))  # (B, 1)
    take = (after <= k) | (crossing & (v * length.to(torch.float64) < (k - before).to(torch.float64)))  # (B, U)
    take &= (length > 0) & (after <= int(k_max))  # (B, U) a unit that does not fit in K is left out whole
    chosen = torch.zeros((B, T), dtype=torch.bool, device=dev).scatter(1, order, take)  # (B, U)
    selected = chosen.gather(1, uid) & elig  # (B, T)
    return selected, uid, first


@lru_cache(maxsize=32)
def _expected_total(probs: tuple[float, ...], n_max: int) -> torch.Tensor:
    """A[m] = F(m), m = 0..n_max: expected words in the spans used when span j is used while the words before it
    are < m (lengths iid from probs): F(m) = Σ_ℓ p(ℓ)·(ℓ + F(m − ℓ)), F(m ≤ 0) = 0. Strictly increasing in m."""
    F = [0.0] * (n_max + 1)
    for m in range(1, n_max + 1):
        F[m] = sum(p * (ell + (F[m - ell] if m - ell > 0 else 0.0)) for ell, p in enumerate(probs, start=1))
    return torch.tensor(F, dtype=torch.float64)


def _select_spans(elig, starts, flags, row_index, epoch, seed, rate, k_max, probs):
    """Non-overlapping runs of whole words with lengths drawn from `probs`, never across a document start.

    Span lengths ℓ_1, ℓ_2, … are drawn first; span j is used while ℓ_1 + … + ℓ_{j−1} is below the word budget
    (a stopping rule that does not look at ℓ_j, so used lengths keep the configured distribution exactly). The J spans
    are then placed uniformly at random among the row's W eligible words: a random J-subset of W − Σℓ + J slots
    (stars and bars). A placement with a span across a document start is redrawn (same lengths); after
    _SPAN_ATTEMPTS tries, such spans are dropped.
    """
    words = _Words.of(elig, starts, flags)
    lengths, before, used = _span_lengths(words.count, elig.shape[1], row_index, epoch, seed, rate, probs)
    start, ok = _place_spans(words.segment, words.count, lengths, before, used, row_index, epoch, seed)
    return _cover(elig, words, start, lengths, used & ok, k_max)


@dataclass
class _Words:
    """The eligible words of each row, indexed 0..W-1 in position order (tensors padded to T words)."""

    index: torch.Tensor  # (B, T) word index of each eligible token
    count: torch.Tensor  # (B,) eligible words per row
    prefix: torch.Tensor  # (B, W+1) tokens before word w
    segment: torch.Tensor  # (B, W) which document piece each word is in: no span may cross from one to the next

    @staticmethod
    def of(elig, starts, flags) -> _Words:
        B, T = elig.shape
        wstart = starts & elig  # (B, T) first token of each eligible word
        widx = (torch.cumsum(wstart.long(), dim=1) - 1).clamp(min=0)  # (B, T) word index of each eligible token
        tok_len = torch.zeros((B, T), dtype=torch.long, device=elig.device).scatter_add(1, widx, elig.long())  # (B, W)
        prefix = torch.zeros((B, T + 1), dtype=torch.long, device=elig.device)  # (B, W+1) tokens before word w
        prefix[:, 1:] = torch.cumsum(tok_len, dim=1)
        prev_inelig = torch.ones_like(elig)  # (B, T)
        prev_inelig[:, 1:] = ~elig[:, :-1]
        doc = ((flags.to(torch.long) & FLAG_DOC_START) != 0) if flags is not None else torch.zeros_like(elig)  # (B, T)
        barrier_tok = wstart & (doc | prev_inelig)  # (B, T) a word no span may reach back across
        barrier = torch.zeros_like(widx).scatter_reduce(1, widx, barrier_tok.long(), "amax")  # (B, W)
        return _Words(widx, wstart.sum(dim=1), prefix, torch.cumsum(barrier, dim=1))


def _span_lengths(W, T: int, row_index, epoch, seed, rate, probs):
    """Span lengths (B, J) in words, the words of the spans before each (B, J), and which spans are used (B, J): a
    prefix of them, with an expected total of exactly rate·W words."""
    dev = W.device
    # Span j is used only if the j spans before it (≥ 1 word each) leave room under the threshold (< rate·T + 1),
    # so at most J spans per row.
    J = max(1, min(T, math.floor(float(rate) * T) + 2))
    cdf = torch.tensor(probs, dtype=torch.float64, device=dev).cumsum(0)  # (L,)
    cdf[-1] = 2.0  # guard against rounding: every u < 1 falls inside
    u_len = _unit_double(_hash(seed, epoch, _S_LENGTH, row_index, torch.arange(J, device=dev)))  # (B, J)
    lengths = torch.searchsorted(cdf, u_len, right=True) + 1  # (B, J) words per span
    after = torch.cumsum(lengths, dim=1)  # (B, J)
    before = after - lengths  # (B, J)
    # Span j is used while `before` (the words of the spans before it) < t, a rule that never looks at ℓ_j. The
    # threshold t = y + u (u uniform) is set so that the expected total is exactly rate·W words: E[total | t] is the
    # renewal table F (_expected_total), and with the dither it is F interpolated linearly in y.
    table = _expected_total(probs, T + 2).to(dev)  # (N,) E[total] at y = -1, 0, 1, …
    want = float(rate) * W.to(torch.float64)  # (B,)
    i = torch.searchsorted(table, want.unsqueeze(1)).squeeze(1).clamp(1, table.numel() - 1)  # (B,)
    lo, hi = table[i - 1], table[i]  # (B,) (B,)
    y = (i - 2).to(torch.float64) + (want - lo) / (hi - lo)  # (B,)
    u = _unit_double(_hash(seed, epoch, _S_COUNT, row_index, torch.zeros(1, device=dev)))[:, 0]  # (B,)
    target = y + u  # (B,)
    used = (before.to(torch.float64) < target.unsqueeze(1)) & (after <= W.unsqueeze(1))  # (B, J) a prefix of spans
    return lengths, before, used


def _place_spans(segment, W, lengths, before, used, row_index, epoch, seed):
    """First word of each span (B, J) at uniformly random slots, redrawn while a span crosses a document start, and
    whether each span stayed within one document (B, J) in the placement kept (the last try's, where all failed)."""
    (B, J), T, dev = lengths.shape, segment.shape[1], lengths.device
    pos, jj = torch.arange(T, device=dev), torch.arange(J, device=dev)  # (T,) (J,)
    n_spans = used.sum(dim=1)  # (B,)
    slots = W - (lengths * used).sum(dim=1) + n_spans  # (B,) words outside the spans, plus a slot per span
    chosen_start = torch.zeros((B, J), dtype=torch.long, device=dev)  # (B, J)
    chosen_ok = torch.ones((B, J), dtype=torch.bool, device=dev)  # (B, J)
    todo = torch.arange(B, device=dev)  # (R,) rows still without a placement that respects document starts
    for attempt in range(_SPAN_ATTEMPTS):
        h = _hash(seed, epoch, _S_SLOT + attempt, row_index[todo], pos)  # (R, T) one score per slot
        h = torch.where(pos.unsqueeze(0) < slots[todo].unsqueeze(1), h, -1)  # (R, T)
        top = torch.topk(h, J, dim=1).indices  # (R, J) best-scored slots first: a uniform random subset
        top = torch.where(jj.unsqueeze(0) < n_spans[todo].unsqueeze(1), top, T + 1)  # (R, J) keep the first n_spans
        slot = torch.sort(top, dim=1).values  # (R, J) span j sits at the j-th chosen slot
        start = (slot - jj.unsqueeze(0) + before[todo]).clamp(max=T - 1)  # (R, J) first word of span j
        end = (start + lengths[todo] - 1).clamp(max=T - 1)  # (R, J) last word of span j
        seg = segment[todo]  # (R, W)
        ok = (~used[todo]) | (seg.gather(1, start) == seg.gather(1, end))  # (R, J)
        row_ok = ok.all(dim=1)  # (R,)
        adopt = row_ok | (attempt == _SPAN_ATTEMPTS - 1)  # (R,) the last try is kept, minus its bad spans
        chosen_start[todo[adopt]] = start[adopt]
        chosen_ok[todo[adopt]] = ok[adopt]
        todo = todo[~row_ok]
        if todo.numel() == 0:
            break
    return chosen_start, chosen_ok


def _cover(elig, words: _Words, start, lengths, keep, k_max):
    """The tokens of the kept spans that fit in k_max tokens, in order: (selected (B, T), span number (B, T) or -1)."""
    (B, J), T, dev = start.shape, elig.shape[1], elig.device
    jj = torch.arange(J, device=dev)  # (J,)
    stop = (start + lengths).clamp(max=T)  # (B, J) one past the last word
    span_tokens = words.prefix.gather(1, stop) - words.prefix.gather(1, start)  # (B, J)
    keep = keep & (torch.cumsum(span_tokens * keep, dim=1) <= int(k_max))  # (B, J) spans that do not fit in K are out
    diff = torch.zeros((B, T + 1), dtype=torch.long, device=dev)  # (B, W+1)
    diff.scatter_add_(1, torch.where(keep, start, T), keep.long())
    diff.scatter_add_(1, torch.where(keep, stop, T), -keep.long())
    covered = torch.cumsum(diff, dim=1)[:, :T] > 0  # (B, W)
    mark = torch.full((B, T + 1), -1, dtype=torch.long, device=dev)  # (B, W+1)
    mark.scatter_(1, torch.where(keep, start, T), torch.where(keep, jj.unsqueeze(0).expand(B, J), -1))
    span_of_word = torch.where(covered, torch.cummax(mark[:, :T], dim=1).values, -1)  # (B, W)
    selected = elig & covered.gather(1, words.index)  # (B, T)
    unit = torch.where(selected, span_of_word.gather(1, words.index), -1)  # (B, T)
    return selected, unit


def select_positions(
    ids: torch.Tensor,
    row_index: torch.Tensor,
    epoch: int,
    cfg: MaskingConfig,
    special,
    flags: torch.Tensor | None = None,
    step: int = 0,
    k_max: int | None = None,
) -> Selection:
    """A(x) for each row of `ids` (B, T): never a special token or padding; a pure function of
    (cfg.seed, epoch, row_index, position, step's rate). `k_max` None: config_k_max(cfg, T)."""
    row_index, flags, K = _checked_selection_args(ids, row_index, cfg, flags, k_max)
    predict, corrupt_rate = rates_at(cfg, step)
    rate = max(predict, corrupt_rate)
    ids = ids.long()  # (B, T)
    elig = eligible(ids, special)  # (B, T)
    seed = int(cfg.seed)
    starts = None if cfg.unit == "token" else unit_starts(elig, flags, cfg.unit)  # (B, T)
    if cfg.unit in ("token", "word"):
        selected, uid, first = _select_ranked(elig, starts, row_index, epoch, seed, rate, K)  # (B, T) ×3
        unit = torch.where(selected, uid, -1)  # (B, T)
        split_key = first  # (B, T) the unit's first position keys its predicted/corrupted draw
    else:
        probs = _length_probs(cfg.unit, float(cfg.span_geometric_p if cfg.unit == "span" else 0.0), _max_unit_words(cfg))
        selected, unit = _select_spans(elig, starts, flags, row_index, epoch, seed, rate, K, probs)  # (B, T) ×2
        split_key = torch.where(selected, unit, 0)  # (B, T) the span's number keys its draw
    predicted, corrupted = _split_selected(selected, split_key, row_index, epoch, seed, predict, corrupt_rate)
    positions, valid = _padded_positions(predicted, K)  # (B, K) ×2
    return Selection(mask=predicted, positions=positions, valid=valid, corrupt_mask=corrupted, unit_id=unit)


def _checked_selection_args(ids, row_index, cfg: MaskingConfig, flags, k_max) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(row_index as (B,) long, flags on ids' device, K) after checking shapes and that K fits the config."""
    cfg.validate()
    if ids.dim() != 2:
        raise ValueError(f"ids must be (B, T), got shape {tuple(ids.shape)}")
    B, T = ids.shape
    row_index = torch.as_tensor(row_index, dtype=torch.long, device=ids.device).reshape(-1)  # (B,)
    if row_index.numel() != B:
        raise ValueError(f"row_index has {row_index.numel()} entries for {B} rows")
    if flags is not None:
        flags = torch.as_tensor(flags, device=ids.device)
    K = config_k_max(cfg, T) if k_max is None else int(k_max)
    if K < config_k_max(cfg, T):
        # A K made for a lower rate or for single tokens would silently cap rows (and bend span lengths): callers
        # size K with config_k_max(cfg, T), which is default_k_max(T, mask_rate) for the standard token objective.
        raise ValueError(
            f"k_max={K} is below the {config_k_max(cfg, T)} that masking.unit={cfg.unit!r} at rate up to "
            f"{_max_rate(cfg)} needs at seq_len {T}; pass masking.config_k_max(cfg, seq_len) or k_max=None"
        )
    return row_index, flags, K


def _split_selected(selected, split_key, row_index, epoch, seed, predict, corrupt_rate):
    """(predicted (B, T), corrupted (B, T) or None when it equals predicted) from the selected units.

    predict_rate vs corrupt_rate: a unit is predicted with probability predict/rate and corrupted with probability
    corrupt/rate, from one uniform draw, so the smaller set is inside the larger (Wettig et al. 2022)."""
    rate = max(predict, corrupt_rate)
    if not (predict < rate or corrupt_rate < rate):
        return selected, None
    pos = torch.arange(selected.shape[1], device=selected.device)  # (T,)
    v = _unit_float(_hash(seed, epoch, _S_SPLIT, row_index, pos)).gather(1, split_key)  # (B, T) the unit's draw
    return selected & (v * rate < predict), selected & (v * rate < corrupt_rate)  # (B, T) ×2


def _padded_positions(predicted, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (B, K), valid (B, K)): each row's predicted positions ascending, padded with 0 (valid False)."""
    B, T = predicted.shape
    pos = torch.arange(T, device=predicted.device)  # (T,)
    # Padded positions: ascending real positions first, then T (sorted last), then mapped to 0.
    idx = torch.where(predicted, pos, T)  # (B, T)
    idx = torch.sort(idx, dim=1).values[:, : min(K, T)]  # (B, K')
    if idx.shape[1] < K:
        idx = torch.cat([idx, torch.full((B, K - idx.shape[1]), T, dtype=torch.long, device=predicted.device)], dim=1)
    valid = idx < T  # (B, K)
    return torch.where(valid, idx, 0), valid  # (B, K) ×2


# ---------------------------------------------------------------------------------------------------- corruption


def _check_counts(token_counts, vocab_size: int, special, device) -> torch.Tensor:
    if token_counts is None:
        raise UserError(
            "masking.random_token_dist='unigram' needs token counts (token_counts.npy in the data dir); "
            "prepare the data again or use masking.random_token_dist=uniform"
        )
    counts = torch.as_tensor(token_counts).to(device=device, dtype=torch.float64).reshape(-1)  # (V',)
    if counts.numel() < vocab_size or bool((counts < 0).any()):
        raise UserError(f"token counts must be {vocab_size} non-negative numbers, got {counts.numel()} values")
    counts = counts[:vocab_size].clone()  # (V,)
    sp = _special_tensor(special, device)
    counts[sp[sp < vocab_size]] = 0.0
    if float(counts.sum()) <= 0:
        raise UserError("token counts are all zero outside the special tokens; use masking.random_token_dist=uniform")
    return counts


@lru_cache(maxsize=16)
def _non_special(vocab_size: int, special_ids: tuple[int, ...]) -> torch.Tensor:
    sp = set(special_ids)
    return torch.tensor([i for i in range(vocab_size) if i not in sp], dtype=torch.long)


def _corruption_plan(ids, target, row_index, epoch, cfg, special, vocab_size, token_counts=None):
    """Per-token decisions of the corruption: ([MASK] (B, T) bool, random (B, T) bool, replacement ids (B, T)).

    The hashes are computed only at the target positions (a few percent of the batch); each is the same function of
    (seed, epoch, row, position) as on the full grid, so the result does not depend on which positions those are.
    """
    dev = ids.device
    seed = int(cfg.seed)
    b, t = target.nonzero(as_tuple=True)  # (N,) (N,)
    rows = row_index[b]  # (N,)
    u = _unit_float(_hash_at(seed, epoch, _S_KIND, rows, t))  # (N,)
    p_mask = float(cfg.mask_token_prob)
    p_rand = float(cfg.random_token_prob)
    to_mask = torch.zeros_like(target)  # (B, T)
    to_mask[b, t] = u < p_mask
    to_rand = torch.zeros_like(target)  # (B, T)
    is_rand = (u >= p_mask) & (u < p_mask + p_rand)  # (N,)
    to_rand[b, t] = is_rand
    if p_rand <= 0.0:
        return to_mask, to_rand, ids
    vocab_size = int(vocab_size)
    b, t, rows = b[is_rand], t[is_rand], rows[is_rand]  # (R,)
    h = _hash_at(seed, epoch, _S_RANDOM, rows, t)  # (R,)
    if cfg.random_token_dist == "unigram":
        counts = _check_counts(token_counts, vocab_size, special, dev)  # (V,)
        cdf = torch.cumsum(counts, dim=0)  # (V,)
        h2 = _hash_at(seed, epoch, _S_RANDOM2, rows, t)  # (R,)
        # 53 random bits: frequencies of rare tokens among billions of counts still resolve.
        u53 = ((h << 21) | (h2 >> 11)).to(torch.float64) * (1.0 / (1 << 53))  # (R,)
        drawn = torch.searchsorted(cdf, u53 * cdf[-1], right=True).clamp(max=vocab_size - 1)  # (R,)
    else:
        allowed = _non_special(vocab_size, tuple(sorted(int(i) for i in special.all()))).to(dev)  # (V−S,)
        if allowed.numel() == 0:
            raise UserError(f"vocab_size {vocab_size} leaves no non-special token for random replacement")
        # floor(h · n / 2^32): an exact integer map of 32 random bits onto n choices (h·n < 2^63).
        drawn = allowed[(h * allowed.numel()) >> 32]  # (R,)
    replacement = ids.clone()  # (B, T)
    replacement[b, t] = drawn
    return to_mask, to_rand, replacement


def corruption(
    ids: torch.Tensor,
    selection: Selection,
    row_index: torch.Tensor,
    epoch: int,
    cfg: MaskingConfig,
    special,
    vocab_size: int,
    token_counts=None,
) -> Corruption:
    """x̄: of the corrupted positions (A(x) by default), mask_token_prob become [MASK], random_token_prob a random
    non-special token (uniform, or by corpus frequency: `token_counts` [V]), the rest stay x_i. Decided per token."""
    cfg.validate()
    ids = ids.long()  # (B, T)
    row_index = torch.as_tensor(row_index, dtype=torch.long, device=ids.device).reshape(-1)  # (B,)
    target = selection.corrupt_mask if selection.corrupt_mask is not None else selection.mask  # (B, T)
    to_mask, to_rand, replacement = _corruption_plan(
        ids, target.to(ids.device), row_index, epoch, cfg, special, vocab_size, token_counts
    )  # (B, T) ×3
    out = torch.where(to_mask, torch.full_like(ids, int(special.mask)), ids)  # (B, T)
    return Corruption(input_ids=torch.where(to_rand, replacement, out), to_mask=to_mask, to_random=to_rand)


def corrupt(ids, selection, row_index, epoch, cfg, special, vocab_size, token_counts=None) -> torch.Tensor:
    """x̄ alone, (B, T) long: `corruption` without the per-token decisions (same arguments)."""
    return corruption(ids, selection, row_index, epoch, cfg, special, vocab_size, token_counts).input_ids


def mask_batch(
    ids: torch.Tensor,
    row_index: torch.Tensor,
    epoch: int,
    cfg: MaskingConfig,
    special,
    vocab_size: int,
    flags: torch.Tensor | None = None,
    step: int = 0,
    k_max: int | None = None,
    token_counts=None,
) -> MaskedBatch:
    """select_positions then corrupt: x̄, A(x) as padded positions, and the targets x_i (−100 where not valid)."""
    ids = ids.long()  # (B, T)
    sel = select_positions(ids, row_index, epoch, cfg, special, flags=flags, step=step, k_max=k_max)
    cor = corruption(ids, sel, row_index, epoch, cfg, special, vocab_size, token_counts=token_counts)
    targets = torch.where(sel.valid, ids.gather(1, sel.positions), -100)  # (B, K)
    return MaskedBatch(
        input_ids=cor.input_ids, positions=sel.positions, valid=sel.valid, targets=targets,
        num_selected=sel.valid.sum(), selection=sel, corruption=cor,
    )
