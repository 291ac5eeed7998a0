"""Corpus → packed rows: tokenize the pieces data/corpus.py reads (in a worker pool), split by document, pack, shard.

Streaming with bounded memory: rows leave for disk a shard at a time. Output goes to a temp dir beside --out and is
renamed at the end (files.py), so a failure leaves nothing half-written. Reading inputs is corpus.py's job and the
on-disk format is shards.py's.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import string
import sys
from bisect import bisect_left
from collections import deque
from itertools import accumulate, repeat
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer, models, normalizers, pre_tokenizers
from tqdm import tqdm

from maskedlm.data import shards as fmt
from maskedlm.data.corpus import check_options, iter_pieces, new_stats, report_input, resolve_inputs, warn
from maskedlm.errors import UserError
from maskedlm.files import atomic_write_text, building, check_out, link_or_copy, replace_dir
from maskedlm.tokenizer import load_tokenizer, special_ids, tokenizer_hash

SEQ_LEN_MIN, SEQ_LEN_MAX = 8, 8192
BATCH_CHARS = 1 << 17  # text per encoder call / worker task: ~30k tokens; 256 kB cost ~5 MB more peak for ~3% less CPU
# Corpora below this many tokens are held in memory until the end, so the split can guarantee a validation row.
BUFFER_TOKENS = 1 << 20
DOC_BITS = 40  # a document key is (file index << DOC_BITS) + document index in the file: 10^12 documents a file


# ------------------------------------------------------------------------------------------------- tokenizing

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


def _encoded_batches(pieces, tok, workers: int, batch_chars: int):
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


# -------------------------------------------------------------------------------------------- split and pack

def _uniform(seed: int, doc: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) number per document index, from SplitMix64 of (seed, index): the split needs no RNG state."""
    with np.errstate(over="ignore"):
        z = (np.uint64(seed & (2**64 - 1)) * np.uint64(0x9E3779B97F4A7C15)) ^ doc.astype(np.uint64)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


class _Packer:
    """One split's token stream → rows of [CLS] + seq_len-1 tokens, documents joined by [SEP]."""

    def __init__(self, writer: fmt.ShardWriter, seq_len: int, cls: int, sep: int, counts: np.ndarray | None):
        self.writer, self.seq_len, self.cls, self.sep, self.counts = writer, seq_len, cls, sep, counts
        self.ids: list[np.ndarray] = []
        self.flags: list[np.ndarray] = []
        self.pending = 0
        self.tokens_in = 0  # content tokens, [SEP]s included, before cutting into rows
        self.document_tokens = 0  # the documents' own tokens: the same however the corpus is split into parts
        self.documents = 0

    def add(self, ids: np.ndarray, flags: np.ndarray) -> None:
        """Tokens of this split in order; a token with the doc-start flag begins a document."""
        if not len(ids):
            return
        doc_pos = np.flatnonzero(flags & fmt.FLAG_DOC_START)
        self.documents += len(doc_pos)
        self.document_tokens += len(ids)
        if len(doc_pos) and doc_pos[0] == 0 and self.tokens_in == 0:
            doc_pos = doc_pos[1:]  # [SEP] goes between documents, not before the first
        if len(doc_pos):
            ids = np.insert(ids, doc_pos, self.sep)
            flags = np.insert(flags, doc_pos, np.uint8(fmt.FLAG_WORD_START))
        self.tokens_in += len(ids)
        self.ids.append(ids)
        self.flags.append(flags)
        self.pending += len(ids)
        body = self.seq_len - 1
        if self.pending < body:
            return
        ids, flags = np.concatenate(self.ids), np.concatenate(self.flags)
        k = len(ids) // body
        rows_ids = np.empty((k, self.seq_len), self.writer.dtype)
        rows_flags = np.empty((k, self.seq_len), np.uint8)
        rows_ids[:, 0] = self.cls
        rows_flags[:, 0] = fmt.FLAG_WORD_START
        rows_ids[:, 1:] = ids[: k * body].reshape(k, body)
        rows_flags[:, 1:] = flags[: k * body].reshape(k, body)
        if self.counts is not None:
            self.counts += np.bincount(rows_ids.reshape(-1), minlength=len(self.counts))[: len(self.counts)]
        self.writer.add(rows_ids, rows_flags)
        self.ids, self.flags = [ids[k * body:]], [flags[k * body:]]
        self.pending = len(self.ids[0])

    def finish(self) -> int:
        """Close the shards; returns the tokens of the final partial row, which are dropped."""
        self.writer.close()
        return self.pending


def _route(ids, flags, doc, is_val, packers) -> None:
    """Send each token to its document's split (is_val per token); order within a split is kept."""
    if not is_val.any():
        packers["train"].add(ids, flags)
    elif is_val.all():
        packers["val"].add(ids, flags)
    else:
        packers["train"].add(ids[~is_val], flags[~is_val])
        packers["val"].add(ids[is_val], flags[is_val])


def _choose_val(doc_ids: np.ndarray, doc_tokens: np.ndarray, u: np.ndarray, val_fraction: float, seq_len: int) -> np.ndarray:
    """Val documents for a corpus held in memory: those with u < val_fraction, unless that leaves a split without a
    row; then the fewest changes (taking documents in order of u) that give each split at least one row."""
    body = seq_len - 1
    order = np.argsort(u, kind="stable")
    tok_sorted = doc_tokens[order]
    csum = np.concatenate([[0], np.cumsum(tok_sorted)])  # tokens of the k most val-like documents
    total, n = int(csum[-1]), len(doc_ids)
    k = np.arange(n + 1)
    val_tok = csum + np.maximum(k - 1, 0)  # + [SEP]s between documents
    train_tok = (total - csum) + np.maximum(n - k - 1, 0)
    k0 = int((u < val_fraction).sum())
    if val_tok[k0] >= body and train_tok[k0] >= body:
        chosen = k0
    else:
        ok = np.flatnonzero((val_tok >= body) & (train_tok >= body) & (k >= 1) & (k <= n - 1))
        if not len(ok):
            rows = (total + n - 1) // body
            raise UserError(
                f"corpus too small to hold out validation: {total} tokens in {n} documents make {rows} row(s) of "
                f"seq_len {seq_len}, and no split by document gives both train and val a row; add text, lower "
                "--seq-len, or pass --val-fraction 0"
            )
        chosen = int(ok[np.argmin(np.abs(ok - k0))])
    return np.sort(doc_ids[order[:chosen]])


def _keyed_pieces(files: list[Path], file_index: list[int], input_format, text_field, doc_per, stats):
    """corpus.iter_pieces with each piece's flag replaced by its document's key (-1 for a piece that continues one).

    The key is (index of its file in the whole input list, index of the document in its file), so a document gets
    the same key, and the same split, whether one process reads every file or each of N parts reads its own."""
    for f, k in zip(files, file_index):
        n = 0
        for texts, starts in iter_pieces([f], input_format, text_field, doc_per, stats):
            st = np.fromiter(starts, dtype=bool, count=len(starts))
            docs = np.cumsum(st)
            yield texts, np.where(st, (k << DOC_BITS) + n + docs - 1, -1)
            n += int(docs[-1]) if len(docs) else 0


def _route_stream(batches, packers, seed: int, val_fraction: float, stats: dict, bar, buffer: bool = True) -> list | None:
    """Flag documents' first tokens and send each batch to its split's packer (by its document key's hash).

    Returns the batches still held back, (ids, flags, doc key) each, when `buffer` and the corpus stayed under
    BUFFER_TOKENS (their split is chosen at the end); None when it was streamed."""
    buffered: list | None = [] if buffer else None  # (ids, flags, doc) per batch while the corpus is small
    buffered_tokens = 0
    last_key = -1  # key of the document being read
    last_doc = -1  # document of the last token seen
    for ids, flags, lens, starts in batches:
        keys = np.asarray(starts, dtype=np.int64)
        if len(keys) and keys[0] < 0:
            keys[0] = last_key  # a batch may begin inside a document
        piece_doc = np.maximum.accumulate(keys) if len(keys) else keys  # keys grow in reading order: a forward fill
        last_key = int(piece_doc[-1]) if len(piece_doc) else last_key
        doc = np.repeat(piece_doc, lens)
        if len(ids):  # the doc-start bit goes on a document's first token, which may sit in an earlier batch
            first = np.empty(len(doc), dtype=bool)
            first[0] = doc[0] != last_doc
            first[1:] = doc[1:] != doc[:-1]
            flags[first] |= np.uint8(fmt.FLAG_DOC_START)
            last_doc = int(doc[-1])
        if buffered is not None:
            buffered.append((ids, flags, doc))
            buffered_tokens += len(ids)
            if buffered_tokens > BUFFER_TOKENS:  # big corpus: split by hash alone and stream from here on
                for b in buffered:
                    _route(*b[:2], b[2], _uniform(seed, b[2]) < val_fraction, packers)
                buffered = None
        else:  # the split is drawn per document (per piece here), then spread over its tokens
            _route(ids, flags, doc, np.repeat(_uniform(seed, piece_doc) < val_fraction, lens), packers)
        bar.update(stats["bytes_done"] - bar.n)
        bar.set_postfix(docs=stats["documents"], refresh=False)
    return buffered


def _route_small_corpus(buffered: list, packers, seq_len: int, seed: int, val_fraction: float) -> None:
    """Split a corpus held in memory by document so that both splits get a row when val_fraction > 0, and route it."""
    ids = np.concatenate([b[0] for b in buffered]) if buffered else np.zeros(0, np.uint32)
    flags = np.concatenate([b[1] for b in buffered]) if buffered else np.zeros(0, np.uint8)
    doc = np.concatenate([b[2] for b in buffered]) if buffered else np.zeros(0, np.int64)
    doc_ids, doc_tokens = np.unique(doc, return_counts=True)
    total_rows = (len(ids) + max(len(doc_ids) - 1, 0)) // (seq_len - 1)
    if total_rows == 0:
        raise UserError(
            f"corpus too small: {len(ids)} tokens in {len(doc_ids)} documents make no row of seq_len {seq_len} "
            f"(a row holds [CLS] + {seq_len - 1} tokens); add text or lower --seq-len"
        )
    if val_fraction > 0:
        val_docs = _choose_val(doc_ids, doc_tokens, _uniform(seed, doc_ids), val_fraction, seq_len)
        is_val = np.isin(doc, val_docs)
    else:
        is_val = np.zeros(len(doc), dtype=bool)
    _route(ids, flags, doc, is_val, packers)


# ------------------------------------------------------------------------------------------------- prepare

def check_data_out(out: Path, overwrite: bool, inputs=()) -> None:
    """UserError unless `out` may become the data dir: new, empty, or prepared data with overwrite; never an input,
    inside one or around one (a second run would tokenize its own shards as text)."""
    check_out(out, inputs=inputs, overwrite=overwrite, ours=fmt.is_data_dir, what="prepared data")


def _install(tmp: Path, meta: dict, out: Path, overwrite: bool, inputs) -> None:
    """meta.json last (a data dir without it is not one), then the finished `tmp` renamed to `out`, checked again
    just before: --out may have changed while the corpus was read."""
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
    check_data_out(out, overwrite, inputs)
    replace_dir(tmp, out)


MAX_WORKERS_PER_CORE = 4  # tokenizing is CPU-bound: more processes only add memory and fork time


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _auto_workers() -> int:
    """Worker processes for --workers 0: one per core but one for the reader; on 1-2 cores none, since the
    tokenizer's own threads in this process did better there than processes that contend with the reader."""
    cores = _cores()
    return 1 if cores <= 2 else cores - 1


def parse_shard(shard) -> tuple[int, int] | None:
    """(I, N) from "I/N" (or a pair); None for None. UserError unless 0 <= I < N."""
    if shard is None:
        return None
    try:
        i, n = (int(x) for x in (shard.split("/") if isinstance(shard, str) else shard))
    except (ValueError, TypeError):
        raise UserError(f"--shard must be I/N with integers, e.g. 0/4, got {shard!r}") from None
    if not 0 <= i < n:
        raise UserError(f"--shard I/N needs 0 <= I < N, got {shard!r}")
    return i, n


def _inputs_hash(files: list[Path]) -> str:
    """What identifies the input file list of a run split into parts: every part must have seen the same list."""
    return hashlib.sha256("\n".join(map(str, files)).encode()).hexdigest()[:16]


def prepare(inputs, tokenizer, seq_len, out, val_fraction=0.01, input_format=None, text_field="text",
            doc_per="blank-line", workers=0, seed=0, overwrite=False, *, shard=None,
            progress: bool | None = None) -> dict:
    """Tokenize a corpus into DATA_DIR (train/ and val/ shards, meta.json, tokenizer.json, token_counts.npy).

    `shard` ("I/N"): prepare only part I of N, the input files i with i % N == I, for `merge` to join later; a
    document's split is the one a single prepare would give it (on a corpus above BUFFER_TOKENS, where the split
    is by hash alone). Returns the meta dict. `progress`: None shows a bar on a terminal only; True/False force it.
    """
    # -- every check that needs no reading comes first, so bad options fail before any work
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or not SEQ_LEN_MIN <= seq_len <= SEQ_LEN_MAX:
        raise UserError(f"seq_len must be an integer in [{SEQ_LEN_MIN}, {SEQ_LEN_MAX}], got {seq_len}")
    seq_len = int(seq_len)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    val_fraction = float(val_fraction)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise UserError(f"seed must be an integer in [0, 2^63), got {seed}")  # the split hash takes it as 64 bits
    if int(workers) < 0:
        raise UserError(f"workers must be >= 0 (0: one per core), got {workers}")
    workers = int(workers) or _auto_workers()
    if workers > MAX_WORKERS_PER_CORE * _cores():
        warn(f"--workers {workers} is more than {MAX_WORKERS_PER_CORE} per core; using {MAX_WORKERS_PER_CORE * _cores()}")
        workers = MAX_WORKERS_PER_CORE * _cores()
    check_options(input_format, doc_per)
    if isinstance(tokenizer, Tokenizer):  # a copy without padding and truncation, as load_tokenizer gives
        tok = Tokenizer.from_str(tokenizer.to_str())
        tok.no_padding()
        tok.no_truncation()
    else:
        tok = load_tokenizer(tokenizer)
    sp = special_ids(tok)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = fmt.id_dtype(vocab_size)
    part = parse_shard(shard)
    files = resolve_inputs(inputs)
    file_index = list(range(len(files)))
    if part is not None:
        file_index = file_index[part[0]::part[1]]
        if not file_index:
            raise UserError(f"--shard {part[0]}/{part[1]} gets no input file: the input has {len(files)} files; "
                            f"split it into at most {len(files)} parts")
    named = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    inputs_seen = [*named, *files, tokenizer if not isinstance(tokenizer, Tokenizer) else None]
    out = Path(out)
    check_data_out(out, overwrite, inputs_seen)

    with building(out, "prepare") as tmp:
        meta = _prepare_into(tmp, files, file_index, tok, sp, vocab_size, dtype, seq_len, val_fraction, input_format,
                             text_field, doc_per, workers, seed, progress, tokenizer_hash(tok), buffer=part is None)
        meta["sources"] = [str(x) for x in (inputs if not isinstance(inputs, (str, os.PathLike)) else [inputs])]
        if part is not None:
            meta["part"] = {"index": part[0], "count": part[1], "inputs_hash": _inputs_hash(files)}
        _install(tmp, meta, out, overwrite, inputs_seen)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    print(f"prepared {out}: train {tr['rows']} rows ({tr['documents']} docs), val {va['rows']} rows "
          f"({va['documents']} docs) of {seq_len} tokens; dropped {meta['dropped_tail_tokens']} tail tokens",
          file=sys.stderr)
    return meta


def _prepare_into(tmp, all_files, file_index, tok, sp, vocab_size, dtype, seq_len, val_fraction, input_format,
                  text_field, doc_per, workers, seed, progress, tok_hash, buffer: bool) -> dict:
    """Write shards, token counts and tokenizer.json into `tmp` from the files `file_index` of `all_files`; returns
    the meta dict (sources still empty). `buffer`: a small corpus is held to guarantee each split a row."""
    files = [all_files[k] for k in file_index]
    stats = new_stats()
    stats["bytes_total"] = sum(f.stat().st_size for f in files)
    counts = np.zeros(vocab_size, dtype=np.int64)
    writers = {s: fmt.ShardWriter(tmp / s, seq_len, dtype) for s in fmt.SPLITS}
    packers = {s: _Packer(writers[s], seq_len, sp.cls, sp.sep, counts if s == "train" else None) for s in fmt.SPLITS}
    bar = tqdm(total=stats["bytes_total"], unit="B", unit_scale=True, unit_divisor=1024, desc="prepare",
               disable=(not progress) if progress is not None else None, dynamic_ncols=True)
    pieces = _keyed_pieces(files, file_index, input_format, text_field, doc_per, stats)
    try:
        buffered = _route_stream(_encoded_batches(pieces, tok, workers, BATCH_CHARS), packers, seed, val_fraction,
                                 stats, bar, buffer)
        bar.close()
        report_input(stats, text_field, files)
        if buffered is not None:  # small corpus: choose val so that both splits get a row when val_fraction > 0
            _route_small_corpus(buffered, packers, seq_len, seed, val_fraction)
        dropped = {s: packers[s].finish() for s in fmt.SPLITS}
    except BaseException:
        bar.close()
        for w in writers.values():  # no shard left open: a full disk must be free again once `tmp` is removed
            w.abort()
        raise
    if writers["train"].rows == 0:
        raise UserError(f"corpus too small: no train row of seq_len {seq_len}; add text, lower --seq-len or --val-fraction")
    if val_fraction > 0 and writers["val"].rows == 0:
        warn(f"the val split got no row (val_fraction {val_fraction}); raise --val-fraction for a validation set")
    np.save(tmp / "token_counts.npy", counts)
    atomic_write_text(tmp / "tokenizer.json", tok.to_str())
    return {
        "format_version": fmt.FORMAT_VERSION,
        "vocab_size": vocab_size,
        "special_ids": sp.as_dict(),
        "seq_len": seq_len,
        "dtype": dtype.name,
        "tokenizer_hash": tok_hash,
        "splits": {
            s: {"rows": writers[s].rows, "tokens": writers[s].rows * seq_len, "documents": packers[s].documents,
                "document_tokens": packers[s].document_tokens, "shards": writers[s].shards,
                "dropped_tail_tokens": dropped[s]}
            for s in fmt.SPLITS
        },
        "sources": [],
        "files": stats["files"],
        "input_bytes": stats["bytes_total"],
        "documents": stats["documents"],
        "skipped_empty_files": stats["empty_files"],
        "replaced_bytes": stats["replaced_bytes"],
        "jsonl_records": stats["records"],
        "jsonl_missing_text_field": stats["missing_field"],
        "empty_text_records": stats["empty_text"],
        "dropped_tail_tokens": int(sum(dropped.values())),
        "val_fraction": val_fraction,
        "seed": seed,
        "doc_per": doc_per,
        "input_format": input_format,
        "text_field": text_field,
        "flags": {"doc_start": fmt.FLAG_DOC_START, "word_start": fmt.FLAG_WORD_START},
    }


# ------------------------------------------------------------------------------------------------- merge

# Settings that decide what a part holds: parts joined into one data dir must agree on every one.
_MERGE_SAME = ("format_version", "tokenizer_hash", "vocab_size", "dtype", "seq_len", "special_ids", "val_fraction",
               "seed", "doc_per", "input_format", "text_field")
_MERGE_SUMMED = ("files", "input_bytes", "documents", "skipped_empty_files", "replaced_bytes", "jsonl_records",
                 "jsonl_missing_text_field", "empty_text_records", "dropped_tail_tokens")


def _check_part_files(p: Path, meta: dict) -> None:
    """UserError unless part `p` is whole: typed meta.json fields, every listed shard a plain name whose files exist,
    its tokenizer.json, and integer token counts (read without pickle). Merge links these; a hole would fail mid-way."""
    fmt.DataDir(p, meta)  # the typed fields, checked
    part = meta["part"]
    if not (isinstance(part, dict) and all(isinstance(part.get(k), int) for k in ("index", "count"))
            and isinstance(part.get("inputs_hash"), str)):
        raise UserError(f"{p / 'meta.json'} has a malformed 'part' record; prepare that part again")
    for split in fmt.SPLITS:
        info = meta["splits"].get(split) or {}
        names = info.get("shards", []) if isinstance(info, dict) else None
        if not isinstance(names, list):
            raise UserError(f"{p / 'meta.json'}: splits.{split} has no list of shards; prepare that part again")
        for name in names:
            if not (isinstance(name, str) and name and Path(name).name == name and name not in (".", "..")):
                raise UserError(f"{p / 'meta.json'} lists {name!r} as a {split} shard, not a shard name; prepare that "
                                "part again")
            for kind in ("ids", "flags"):
                if not (p / split / f"{name}.{kind}.npy").is_file():
                    raise UserError(f"part {p} lacks {split}/{name}.{kind}.npy, listed in its meta.json; prepare "
                                    "that part again")
    if not (p / "tokenizer.json").is_file():
        raise UserError(f"part {p} lacks tokenizer.json; prepare that part again")
    fmt.DataDir(p, meta).token_counts("merge")


def _check_parts(parts: list[Path], metas: list[dict]) -> None:
    """UserError unless the parts were made by one split run: same settings, same inputs, each part once, all there."""
    for p, m in zip(parts[1:], metas[1:]):
        for key in _MERGE_SAME:
            if m.get(key) != metas[0].get(key):
                what = "tokenizer" if key == "tokenizer_hash" else key
                raise UserError(f"cannot merge {p} with {parts[0]}: they were prepared with a different {what} "
                                f"({m.get(key)!r} vs {metas[0].get(key)!r}); prepare every part with the same settings")
    shards = [m.get("part") for m in metas]
    if any(s is None for s in shards):
        raise UserError(f"{parts[shards.index(None)]} is not a part (prepared without --shard I/N); merge joins parts")
    for p, m in zip(parts, metas):
        _check_part_files(p, m)
    if len({(s["count"], s["inputs_hash"]) for s in shards}) > 1:
        raise UserError("the parts come from different splits (another N in --shard I/N, or other --input files); "
                        "merge the parts of one run")
    have, count = sorted(s["index"] for s in shards), shards[0]["count"]
    if have != list(range(count)):
        dup = sorted({i for i in have if have.count(i) > 1})
        missing = sorted(set(range(count)) - set(have))
        raise UserError(f"parts of --shard I/{count}: " + (f"part {dup[0]} given twice" if dup else
                                                          f"missing part(s) {', '.join(map(str, missing))}"))


def merge(parts, out, overwrite: bool = False) -> dict:
    """Join the parts that `prepare(..., shard="I/N")` wrote into one data dir at `out`, without copying token
    data: each part's shards are hard-linked in (copied only where the filesystem cannot link). Rows come part by
    part in part order; the split of every document is the one each part gave it. Returns the meta dict."""
    parts = [Path(p) for p in parts]
    if not parts:
        raise UserError("merge needs at least one PART_DIR")
    metas = [fmt.load_meta(p) for p in parts]
    _check_parts(parts, metas)
    order = sorted(range(len(parts)), key=lambda i: metas[i]["part"]["index"])
    parts, metas = [parts[i] for i in order], [metas[i] for i in order]
    out = Path(out)
    check_data_out(out, overwrite, parts)  # never over, inside or around a part: its shards are linked from there
    with building(out, "merge") as tmp:
        meta = _merge_into(tmp, parts, metas)
        _install(tmp, meta, out, overwrite, parts)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    print(f"merged {len(parts)} parts into {out}: train {tr['rows']} rows ({tr['documents']} docs), val {va['rows']} "
          f"rows ({va['documents']} docs)", file=sys.stderr)
    return meta


def _merge_into(tmp: Path, parts: list[Path], metas: list[dict]) -> dict:
    """Link every part's shards into `tmp` (named shard_pIIIII_SSSSS, so path order is row order), sum the token
    counts, copy one tokenizer.json; returns the merged meta dict."""
    meta = {k: v for k, v in metas[0].items() if k != "part"}
    copied = 0
    for split in fmt.SPLITS:
        (tmp / split).mkdir()
        names, total = [], {"rows": 0, "tokens": 0, "documents": 0, "document_tokens": 0, "dropped_tail_tokens": 0}
        for p, m in zip(parts, metas):
            info = m["splits"][split]
            for name in info.get("shards", []):
                new = f"shard_p{m['part']['index']:05d}_{name.removeprefix('shard_')}"
                for kind in ("ids", "flags"):
                    copied += not link_or_copy(p / split / f"{name}.{kind}.npy", tmp / split / f"{new}.{kind}.npy")
                names.append(new)
            for k in total:
                total[k] += int(info.get(k, 0))
        meta["splits"][split] = {**total, "shards": names}
    if copied:
        warn(f"copied {copied} shard files: the parts are on another filesystem than the output (no hard links)")
    counts = sum(np.load(p / "token_counts.npy", allow_pickle=False).astype(np.int64) for p in parts)
    np.save(tmp / "token_counts.npy", counts)
    atomic_write_text(tmp / "tokenizer.json", (parts[0] / "tokenizer.json").read_text(encoding="utf-8"))
    for k in _MERGE_SUMMED:
        meta[k] = sum(int(m.get(k, 0)) for m in metas)
    meta["sources"] = list(dict.fromkeys(x for m in metas for x in m.get("sources", [])))
    meta["merged_from"] = [{"dir": str(p), **m["part"]} for p, m in zip(parts, metas)]
    return meta
