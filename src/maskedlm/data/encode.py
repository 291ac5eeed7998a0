"""Text → token ids, fast: a tokenizer's own ids and word starts for every text, by a per-chunk cache (each distinct
word tokenized once), texts joined by [SEP], or the tokenizer's batch encode, in a worker pool.

Every path writes the bytes tokenizers' own encode() gives (tests/test_prepare.py checks each condition); reading
corpora is corpus.py's job, packing the ids into rows prepare.py's.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import string
from bisect import bisect_left
from collections import deque
from itertools import accumulate, repeat

import numpy as np
from tokenizers import Encoding, Tokenizer, models, normalizers, pre_tokenizers

from maskedlm.data import shards as fmt

_WORKER_ENCODER = None


def _worker_init(tok_json: str) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no threads on top
    _WORKER_ENCODER = _Encoder(Tokenizer.from_str(tok_json))


def _encode_in_worker(texts: list[str]):
    return _WORKER_ENCODER(texts)


def word_start_table(tok) -> np.ndarray | None:
    """Per id, whether the token starts a word, when that is a function of the id alone; else None.

    It is for WordPiece behind BERT's pre-tokenizer: each pre-token (a word) becomes a first piece without the
    continuing prefix ("##"), then pieces with it, or one [UNK]; added tokens are words of their own. A first piece
    can never start with the prefix, since BertPreTokenizer makes every punctuation char a word of one char and the
    prefix is two or more. So word_ids (which need the offset tracking that encode_batch_fast skips) are not needed.
    Any other model or pre-tokenizer (byte-level BPE and Unigram among them) gets None: encode_batch and word_ids.
    """
    if not isinstance(tok.model, models.WordPiece):
        return None
    if not isinstance(tok.pre_tokenizer, pre_tokenizers.BertPreTokenizer):
        return None
    prefix = tok.model.continuing_subword_prefix or ""
    if len(prefix) < 2 or not all(c in string.punctuation for c in prefix):
        return None
    added = tok.get_added_tokens_decoder()
    if any(t.content.startswith(prefix) for t in added.values()):
        return None  # a literal added "##x" is a word, the model's "##x" is not: the id cannot tell them apart
    vocab = tok.get_vocab(with_added_tokens=True)
    table = np.ones(max(vocab.values()) + 1, dtype=bool)
    for token, i in vocab.items():
        if token.startswith(prefix):
            table[i] = False
    return table


def _joiner(tok) -> tuple[str, int] | None:
    """(text, id) of a special token that can join documents into one text for the tokenizer; None if none can.

    Added tokens with normalized=False are cut out of the raw text before normalizing and pre-tokenizing, so the
    text between two of them is encoded exactly as it would be alone; a separator must not strip spaces or need word
    boundaries around it. _encode_joined checks that each separator came back as one token.
    """
    for i, t in sorted(tok.get_added_tokens_decoder().items()):
        if t.special and t.content and not (t.normalized or t.lstrip or t.rstrip or t.single_word):
            if t.content in ("[SEP]", "</s>"):
                return t.content, i
    return None


JOIN_TEXTS = 64  # texts per joined string: ~64 Encoding objects fewer each, still many strings for the threads


def _encode_joined(texts: list[str], tok, joiner: tuple[str, int], word_starts: bool = False):
    """(ids, lens per text) from encode_batch_fast on texts joined by a special token, or with `word_starts`
    (ids, word starts, lens) from encode_batch and its word ids; None when the check fails.

    For short texts (a line each, or a word each from the chunk cache) most of the tokenizer's time is per
    Encoding; this makes one per JOIN_TEXTS."""
    sep_text, sep_id = joiner
    joined = [sep_text.join(texts[i:i + JOIN_TEXTS]) + sep_text for i in range(0, len(texts), JOIN_TEXTS)]
    if sum(j.count(sep_text) for j in joined) != len(texts):
        return None  # the separator's text occurs in a text: encode one by one
    encode = tok.encode_batch if word_starts else tok.encode_batch_fast
    merged = Encoding.merge(encode(joined, add_special_tokens=False), growing_offsets=False)
    ids = np.asarray(merged.ids, dtype=np.uint32)
    is_sep = ids == sep_id
    ends = np.flatnonzero(is_sep)
    # Exactly one [SEP] id per text means every separator was matched on its own (an added token overlapping it
    # would swallow it, and one the model made itself would add one), so each text was encoded alone.
    if len(ends) != len(texts):
        return None
    lens = np.diff(ends, prepend=-1) - 1
    if not word_starts:
        return ids[~is_sep], lens
    start = _word_starts(merged.word_ids, ends[:-1] + 1)
    return ids[~is_sep], start[~is_sep], lens


def _word_starts(word_ids: list, firsts: np.ndarray) -> np.ndarray:
    """Word starts from merged word ids: a token whose word id differs from the previous token's, and every position
    in `firsts` (each text's first token, whatever its word id). None (an added token such as a literal "[MASK]" in
    the text) becomes NaN, which differs from everything: a word of its own."""
    w = np.asarray(word_ids, dtype=np.float64)
    start = np.ones(len(w), dtype=bool)
    start[1:] = w[1:] != w[:-1]
    start[firsts[firsts < len(w)]] = True
    return start


# Normalizers that never turn a char into whitespace (only compatibility forms, NFKC/NFKD, can: U+00A8 becomes a
# space and a combining mark), so the spaces the "space" cut relies on are the text's own; Metaspace does not care.
_NO_NEW_SPACE = {"NFC", "NFD", "Lowercase"}
_ANY_NORMALIZER = _NO_NEW_SPACE | {"NFKC", "NFKD"}


def _normalizer_types(spec) -> list[str] | None:
    """The normalizer steps' types from tokenizer.json's "normalizer" entry; None for one this cannot list."""
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        steps = [_normalizer_types(n) for n in spec.get("normalizers", [])]
        return None if any(t is None for t in steps) else [t for ts in steps for t in ts]
    return [spec.get("type")]


def chunk_cacheable(tok) -> str | None:
    """How a text may be cut into chunks that the tokenizer encodes independently, so that each distinct chunk need
    be tokenized once (_ChunkCache): "whitespace", "space", or None where no cut is known to give the tokenizer's own
    ids and word starts.

    "whitespace": chunks between ' ', '\\t', '\\n' and '\\r', for WordPiece behind BertPreTokenizer (word_start_table's
    condition) with BERT's normalizer or none. BertPreTokenizer cuts at every whitespace char, and the four are
    whitespace whether or not BERT's normalizer turns them into spaces first; every step of that normalizer (control
    chars dropped, CJK chars spaced, accents stripped, lowercase) maps each char by itself, and NFD's reordering of
    accents never crosses a space; WordPiece sees one pre-token at a time.

    "space": a cut before each ' ' that is followed by a non-whitespace char other than an added token's first
    char, the space going with the word after it, for BPE (no dropout) or Unigram behind byte-level (GPT-2's regex)
    or Metaspace pre-tokenizers. Such a space always starts a pre-token: GPT-2's regex takes " ?" before letters,
    digits and other symbols and its whitespace rule stops before it; Metaspace makes every space a "▁" that starts a
    piece. Before an added token the space ends the text the regex sees instead ("b  [SEP]": one pre-token of two
    spaces), hence the exception, which needs added tokens matched in the raw text (normalized=False). A chunk that
    starts with a space gets no prefix space or "▁" added. The normalizers allowed map chars one by one and, for
    byte-level, never make a space.

    Both need added tokens without whitespace in them (one could match across a cut) that strip no spaces and match
    anywhere, and no truncation.
    """
    if tok.truncation is not None:
        return None
    if any(t.lstrip or t.rstrip or t.single_word or any(c in t.content for c in " \t\n\r")
           for t in tok.get_added_tokens_decoder().values()):
        return None
    if word_start_table(tok) is not None:  # WordPiece behind BertPreTokenizer
        if tok.normalizer is None or isinstance(tok.normalizer, normalizers.BertNormalizer):
            return "whitespace"
        return None
    spec = json.loads(tok.to_str())
    model, pre, norm = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, _normalizer_types(spec.get("normalizer"))
    if model.get("type") not in ("BPE", "Unigram") or model.get("dropout") not in (None, 0, 0.0) or norm is None:
        return None
    if any(t.normalized for t in tok.get_added_tokens_decoder().values()):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and set(norm) <= _NO_NEW_SPACE:
        return "space"
    if pre.get("type") == "Metaspace" and pre.get("split", True) and set(norm) <= _ANY_NORMALIZER:
        return "space"
    return None


def _joins_alone(tok) -> bool:
    """Whether a text between two [SEP]s is pre-tokenized as it would be alone, for the "space" tokenizers: true of
    byte-level without a prefix space and of Metaspace's "always" (each section between added tokens gets its
    "▁"), not of "first" (only the text's first section does). tokenizer train makes the two that join."""
    pre = json.loads(tok.to_str()).get("pre_tokenizer") or {}
    return ((pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space"))
            or (pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "always"))


CACHE_WORDS = 1 << 17  # chunks remembered per process (~20 MB); the cache starts over when full
CACHE_WORD_CHARS = 48  # longer chunks are encoded each time they come: rare, and they would crowd the cache out
CACHE_POOL_IDS = 1 << 21  # ids kept for the cached chunks (10 MB with their word starts) before the cache starts over
# A cache value is (start in the pool << _LEN_BITS) + number of ids: one int per chunk. corpus.py cuts documents into
# pieces of at most CHUNK_CHARS (65,536) chars, and a normalizer turns a char into at most a few, so a chunk's ids stay
# far below 2^20; _learn checks it all the same.
_LEN_BITS = 20
# Where the "space" cut falls: before a space followed by a char that no regex engine takes for whitespace (Python's
# \s is Unicode's White_Space and more; U+180E, U+200B, U+2060 and U+FEFF were or are taken for it by some), and not
# before any added token's first char (chunk_cacheable).
_SPACE_CUT = r" (?=[^\s\u180e\u200b\u2060\ufeff])"


def _space_cut(added: list[str]) -> re.Pattern:
    """The "space" cut, never before the first char of any added token: one char class however many tokens there
    are (a cut lost before "[x" costs a longer chunk, never a wrong one)."""
    firsts = sorted({t[0] for t in added if t})
    return re.compile(_SPACE_CUT + (f"(?![{''.join(map(re.escape, firsts))}])" if firsts else ""))

_FIRST = "\n"  # "space" keys: a text's first chunk is _FIRST + chunk, any other chunk is itself without its space


# The chars BERT's normalizer puts spaces around (handle_chinese_chars: CJK ideographs), so each is a word of its own
# and a cut on both sides, which lets text without spaces (Chinese) use the cache. Read off tokenizers' BertNormalizer
# by normalize_str over every code point; _cjk_cut checks them at both ends of each range before relying on them.
_CJK_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF), (0x2A700, 0x2B81F),
               (0x2B920, 0x2CEAF), (0x2F800, 0x2FA1F))


def _cjk_cut(tok) -> re.Pattern | None:
    """A pattern capturing each char the tokenizer's BERT normalizer spaces, for the "whitespace" cut; None when it spaces
    none or not exactly _CJK_RANGES (another tokenizers release), where cutting there could split a word."""
    norm = tok.normalizer
    if not isinstance(norm, normalizers.BertNormalizer):
        return None

    def spaced(c: int) -> bool:  # " x " (x itself, or with accents stripped its canonical decomposition: U+F900)
        r = norm.normalize_str(chr(c))
        return len(r) >= 3 and r[0] == r[-1] == " " and " " not in r[1:-1]

    if not all(spaced(a) and spaced(b) and not spaced(a - 1) and not spaced(b + 1) for a, b in _CJK_RANGES):
        return None
    return re.compile("([" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in _CJK_RANGES) + "])")


class _ChunkCache:
    """Texts → (ids, word starts, lens per text) by looking each chunk (see chunk_cacheable) up in a dict, the
    tokenizer running only on chunks not seen yet. Natural text repeats its words (Zipf), so 10^5 entries answer
    most lookups, and a dict lookup costs a tenth of what the tokenizer spends on a word."""

    def __init__(self, mode: str, encode_chunks, added: list[str], cjk: re.Pattern | None = None):
        self.mode = mode
        self.encode_chunks = encode_chunks  # list of chunk texts -> (ids, word starts, lens)
        self.cut = _space_cut(added).split  # "space" mode: added tokens' texts, never cut before
        self.cjk = cjk  # "whitespace" mode: chars that are words of their own, cut on both sides
        self.pool = np.zeros(1 << 16, dtype=np.uint32)
        self.pool_start = np.zeros(1 << 16, dtype=bool)
        self.resets = -1  # times the cache started over (the first _reset is its start)
        self._reset()

    def _reset(self) -> None:
        self.cache: dict[str, int] = {}
        self.used = 0
        self.resets += 1

    def _keys(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        """Every text's chunks as cache keys, in order, and the number of keys per text (at least one each)."""
        if self.mode == "whitespace":
            joined = " ".join(texts)  # one split for the batch: the join's spaces end each text's last chunk
            if "\n" in joined or "\t" in joined or "\r" in joined:
                texts = [t.replace("\n", " ").replace("\t", " ").replace("\r", " ") for t in texts]
                joined = " ".join(texts)
            if self.cjk is not None and self.cjk.search(joined):
                # A space each side of every CJK char: split's captured chars joined back with spaces (re.sub's
                # template would run Python code per char).
                split = self.cjk.split
                texts = [" ".join(split(t)) for t in texts]
                joined = " ".join(texts)
            per_text = np.fromiter(map(str.count, texts, repeat(" ")), dtype=np.int64, count=len(texts)) + 1
            return joined.split(" "), per_text
        keys, per_text, cut = [], [], self.cut
        for t in texts:
            parts = cut(t)
            parts[0] = _FIRST + parts[0]
            keys += parts
            per_text.append(len(parts))
        return keys, np.asarray(per_text, dtype=np.int64)

    def _chunk_text(self, key: str) -> str:
        if self.mode == "whitespace":
            return key
        return key[1:] if key.startswith(_FIRST) else " " + key

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(self.cache) > CACHE_WORDS or self.used > CACHE_POOL_IDS:
            self._reset()  # between batches: this batch's codes point into the pool as it stands
        if not texts:
            return np.zeros(0, np.uint32), np.zeros(0, bool), np.zeros(0, np.int64)
        keys, per_text = self._keys(texts)
        code = np.fromiter(map(self.cache.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))
        miss = np.flatnonzero(code < 0)
        if len(miss):
            code[miss] = self._learn([keys[i] for i in miss.tolist()])
        n = code & ((1 << _LEN_BITS) - 1)
        ends = np.cumsum(n)
        at = np.repeat((code >> _LEN_BITS) - (ends - n), n) + np.arange(int(ends[-1]))
        return self.pool[at], self.pool_start[at], np.add.reduceat(n, np.cumsum(per_text) - per_text)

    def _learn(self, missed: list[str]) -> list[int]:
        """Encode the distinct chunks in `missed`, append them to the pool; returns a code per entry of missed."""
        new = list(dict.fromkeys(missed))
        ids, start, lens = self.encode_chunks([self._chunk_text(k) for k in new])
        if len(lens) and int(lens.max()) >> _LEN_BITS:
            raise RuntimeError(f"a chunk of {int(lens.max())} tokens does not fit the cache's {_LEN_BITS}-bit length")
        if self.used + len(ids) > len(self.pool):
            size = max(2 * len(self.pool), self.used + len(ids))
            self.pool, self.pool_start = np.resize(self.pool, size), np.resize(self.pool_start, size)
        self.pool[self.used:self.used + len(ids)] = ids
        self.pool_start[self.used:self.used + len(ids)] = start
        starts = self.used + np.cumsum(lens) - lens
        self.used += len(ids)
        codes = dict(zip(new, ((starts << _LEN_BITS) + lens).tolist()))
        self.cache.update((k, c) for k, c in codes.items() if len(k) <= CACHE_WORD_CHARS)
        return [codes[k] for k in missed]


class _Encoder:
    """Texts → (token ids, word-start flags, ids per text), no special tokens added: the chunk cache where
    chunk_cacheable says it gives the tokenizer's own result, else the tokenizer on texts joined by [SEP], else
    encode_batch_fast, else (no id → word-start table) encode_batch with word_ids. All write the same bytes."""

    def __init__(self, tok):
        self.tok = tok
        self.table = word_start_table(tok)
        mode = chunk_cacheable(tok)
        self.joiner = _joiner(tok) if self.table is not None or (mode == "space" and _joins_alone(tok)) else None
        added = [t.content for t in tok.get_added_tokens_decoder().values()]
        self.cache = None if mode is None else _ChunkCache(mode, self._fast if self.table is not None else self._word_ids,
                                                           added, _cjk_cut(tok) if mode == "whitespace" else None)

    def _fast(self, texts: list[str]):
        """(ids, word starts, lens per text) by encode_batch_fast (no offsets: ~25% less tokenizer time) and the
        word-start table, on texts joined by [SEP] where that gives the same."""
        res = _encode_joined(texts, self.tok, self.joiner) if self.joiner is not None else None
        if res is None:
            encs = self.tok.encode_batch_fast(texts, add_special_tokens=False)
            # One merge in Rust, then one list per batch: no Python loop over the (often ~10-token) encodings.
            ids = Encoding.merge(encs, growing_offsets=False).ids if encs else []
            res = np.asarray(ids, dtype=np.uint32), np.fromiter(map(len, encs), dtype=np.int64, count=len(encs))
        return res[0], self.table[res[0]], res[1]

    def _word_ids(self, texts: list[str]):
        """(ids, word starts, lens per text) by encode_batch and its word_ids: any tokenizer; joined by [SEP] where
        that gives the same (the chunk cache's chunks)."""
        res = _encode_joined(texts, self.tok, self.joiner, word_starts=True) if self.joiner is not None else None
        if res is not None:
            return res
        encs = self.tok.encode_batch(texts, add_special_tokens=False)
        lens = np.fromiter(map(len, encs), dtype=np.int64, count=len(encs))
        merged = Encoding.merge(encs, growing_offsets=False) if encs else None
        ids = np.asarray(merged.ids if encs else [], dtype=np.uint32)
        return ids, _word_starts(merged.word_ids if encs else [], np.cumsum(lens)[:-1]), lens

    def __call__(self, texts: list[str]):
        if self.cache is not None:
            ids, start, lens = self.cache.encode(texts)
        elif self.table is not None:
            ids, start, lens = self._fast(texts)
        else:
            ids, start, lens = self._word_ids(texts)
        bounds = np.cumsum(lens)[:-1]
        start[bounds[bounds < len(ids)]] = True  # each piece starts a word: pieces are cut at whitespace
        return ids, start.astype(np.uint8) * np.uint8(fmt.FLAG_WORD_START), lens


def _batches(lists, batch_chars: int):
    """Regroup (pieces, document keys) into batches of about batch_chars characters; keys come back as one array."""
    texts, starts, n = [], [], 0
    for t, st in lists:
        cum = list(accumulate(map(len, t)))
        i = 0
        while i < len(t):
            base = cum[i - 1] if i else 0
            j = min(bisect_left(cum, base + batch_chars - n, lo=i) + 1, len(t))  # up to the piece that fills it
            texts += t[i:j]
            starts.append(st[i:j])
            n += cum[j - 1] - base
            i = j
            if n >= batch_chars:
                yield texts, np.concatenate(starts)
                texts, starts, n = [], [], 0
    if texts:
        yield texts, np.concatenate(starts)


def encoded_batches(pieces, tok, workers: int, batch_chars: int):
    """(ids, word-start flags, lens, document keys) per batch, in order; at most 2 batches per worker in flight."""
    if workers <= 1:
        encode = _Encoder(tok)
        for texts, starts in _batches(pieces, batch_chars):
            yield (*encode(texts), starts)
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    # Said before forking, so tokenizers' fork guard stays quiet in the parent and parallelism stays off in workers.
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ctx.Pool(workers, initializer=_worker_init, initargs=(tok.to_str(),))
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    try:
        pending: deque = deque()
        for texts, starts in _batches(pieces, batch_chars):
            pending.append((pool.apply_async(_encode_in_worker, (texts,)), starts))
            while len(pending) >= 2 * workers:
                res, st = pending.popleft()
                yield (*res.get(), st)
        while pending:
            res, st = pending.popleft()
            yield (*res.get(), st)
        pool.close()
    finally:
        pool.terminate()
        pool.join()
