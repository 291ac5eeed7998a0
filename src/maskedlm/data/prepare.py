"""Corpus → packed rows: tokenize the pieces data/corpus.py reads (in a worker pool), split by document, pack, shard.

Streaming with bounded memory: rows leave for disk a shard at a time. Output goes to a temp dir beside --out and is
renamed at the end (files.py), so a failure leaves nothing half-written. Reading inputs is corpus.py's job and the
on-disk format is shards.py's.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import string
import sys
from bisect import bisect_left
from collections import deque
from itertools import accumulate
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer, models, pre_tokenizers
from tqdm import tqdm

from maskedlm.data import shards as fmt
from maskedlm.data.corpus import check_options, iter_pieces, new_stats, report_input, resolve_inputs, warn
from maskedlm.errors import UserError
from maskedlm.files import atomic_write_text, replace_dir, temp_dir_beside
from maskedlm.tokenizer import load_tokenizer, special_ids, tokenizer_hash

SEQ_LEN_MIN, SEQ_LEN_MAX = 8, 8192
BATCH_CHARS = 1 << 18  # text per tokenizer call / worker task: ~100k tokens, a few MB of Python lists
# Corpora below this many tokens are held in memory until the end, so the split can guarantee a validation row.
BUFFER_TOKENS = 1 << 20


# ------------------------------------------------------------------------------------------------- tokenizing

_WORKER_TOK = None
_WORKER_STARTS = None


def _worker_init(tok_json: str) -> None:
    global _WORKER_TOK, _WORKER_STARTS
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no threads on top
    _WORKER_TOK = Tokenizer.from_str(tok_json)
    _WORKER_STARTS = word_start_table(_WORKER_TOK), _joiner(_WORKER_TOK)


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


def _encode_joined(texts: list[str], tok, starts_table: np.ndarray, joiner: tuple[str, int]):
    """_encode's result from encode_batch_fast on texts joined by a special token; None when the check fails.

    For short documents (a line each) most of the tokenizer's time is per Encoding; this makes one per JOIN_TEXTS."""
    sep_text, sep_id = joiner
    joined = [sep_text.join(texts[i:i + JOIN_TEXTS]) + sep_text for i in range(0, len(texts), JOIN_TEXTS)]
    if sum(j.count(sep_text) for j in joined) != len(texts):
        return None  # the separator's text occurs in a document: encode one by one
    ids = np.asarray(Encoding.merge(tok.encode_batch_fast(joined, add_special_tokens=False), growing_offsets=False).ids,
                     dtype=np.uint32)
    is_sep = ids == sep_id
    ends = np.flatnonzero(is_sep)
    # Exactly one [SEP] id per text means every separator was matched on its own (an added token overlapping it
    # would swallow it, and the model cannot produce the special id), so each text was encoded alone.
    if len(ends) != len(texts):
        return None
    lens = np.diff(ends, prepend=-1) - 1
    ids = ids[~is_sep]
    start = starts_table[ids]
    bounds = np.cumsum(lens)[:-1]
    start[bounds[bounds < len(ids)]] = True  # each piece starts a word: pieces are cut at whitespace
    return ids, start.astype(np.uint8) * np.uint8(fmt.FLAG_WORD_START), lens


def _encode(texts: list[str], tok=None, starts_table: np.ndarray | None = None, joiner: tuple[str, int] | None = None):
    """Token ids, word-start flags and per-text lengths of a batch of texts (no special tokens added)."""
    if tok is None:
        tok, (starts_table, joiner) = _WORKER_TOK, _WORKER_STARTS
    if starts_table is not None and joiner is not None:
        res = _encode_joined(texts, tok, starts_table, joiner)
        if res is not None:
            return res
    # One merge in Rust, then one list per batch: no Python loop over the (often ~10-token) encodings.
    if starts_table is not None:
        encs = tok.encode_batch_fast(texts, add_special_tokens=False)  # no offsets: ~25% less tokenizer time
    else:
        encs = tok.encode_batch(texts, add_special_tokens=False)
    lens = np.fromiter(map(len, encs), dtype=np.int64, count=len(encs))
    if not len(encs):
        return np.zeros(0, np.uint32), np.zeros(0, np.uint8), lens
    merged = Encoding.merge(encs, growing_offsets=False)
    ids = np.asarray(merged.ids, dtype=np.uint32)
    if starts_table is not None:
        start = starts_table[ids]
    else:
        # A token starts a word when its word id differs from the previous token's; None (an added token such as
        # a literal "[MASK]" in the text) becomes NaN, which differs from everything, so it is a word of its own.
        w = np.asarray(merged.word_ids, dtype=np.float64)
        start = np.ones(len(w), dtype=bool)
        if len(w) > 1:
            start[1:] = w[1:] != w[:-1]
    bounds = np.cumsum(lens)[:-1]
    start[bounds[bounds < len(ids)]] = True  # each piece starts a word: pieces are cut at whitespace
    return ids, start.astype(np.uint8) * np.uint8(fmt.FLAG_WORD_START), lens


def _batches(lists, batch_chars: int):
    """Regroup lists of (pieces, starts) into batches of about batch_chars characters."""
    texts, starts, n = [], [], 0
    for t, st in lists:
        cum = list(accumulate(map(len, t)))
        i = 0
        while i < len(t):
            base = cum[i - 1] if i else 0
            j = min(bisect_left(cum, base + batch_chars - n, lo=i) + 1, len(t))  # up to the piece that fills it
            texts += t[i:j]
            starts += st[i:j]
            n += cum[j - 1] - base
            i = j
            if n >= batch_chars:
                yield texts, starts
                texts, starts, n = [], [], 0
    if texts:
        yield texts, starts


def _encoded_batches(pieces, tok, workers: int, batch_chars: int):
    """(ids, word-start flags, lens, starts) per batch, in order; at most 2 batches per worker in flight."""
    if workers <= 1:
        table, joiner = word_start_table(tok), _joiner(tok)
        for texts, starts in _batches(pieces, batch_chars):
            yield (*_encode(texts, tok, table, joiner), starts)
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
            pending.append((pool.apply_async(_encode, (texts,)), starts))
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
        self.documents = 0

    def add(self, ids: np.ndarray, flags: np.ndarray) -> None:
        """Tokens of this split in order; a token with the doc-start flag begins a document."""
        if not len(ids):
            return
        doc_pos = np.flatnonzero(flags & fmt.FLAG_DOC_START)
        self.documents += len(doc_pos)
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


def _route_stream(batches, packers, seed: int, val_fraction: float, stats: dict, bar) -> list | None:
    """Number documents, flag their first tokens and send each batch to its split's packer.

    Returns the batches still held back, (ids, flags, doc) each, when the corpus stayed under BUFFER_TOKENS (their
    split is chosen at the end); None when it was streamed."""
    buffered: list | None = []  # (ids, flags, doc) per batch while the corpus is small; None once streaming
    buffered_tokens = 0
    next_doc = 0  # index of the next document; documents are numbered in reading order
    last_doc = -1  # document of the last token seen
    for ids, flags, lens, starts in batches:
        piece_doc = next_doc - 1 + np.cumsum(np.asarray(starts, dtype=np.int64))  # a piece's document index
        next_doc = int(piece_doc[-1]) + 1 if len(piece_doc) else next_doc
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

def _is_prepared(p: Path) -> bool:
    return (p / "meta.json").exists() or (p / "train").exists() or (p / "val").exists()


def _check_out(out: Path, overwrite: bool) -> None:
    """UserError unless `out` may become the data dir: new, empty, or prepared data with overwrite.

    A non-empty dir without prepared data is refused even with overwrite: it is someone's files, not ours to delete."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose a new DATA_DIR")
    if out.is_dir():
        if _is_prepared(out):
            if not overwrite:
                raise UserError(f"{out} already holds prepared data; pass --overwrite to replace it, or choose a new --out")
        elif any(out.iterdir()):
            raise UserError(f"{out} exists, is not empty and holds no prepared data; refusing to replace it; choose a new --out")


def _auto_workers() -> int:
    """Worker processes for --workers 0: one per core but one for the reader; on 1-2 cores none, since the
    tokenizer's own threads in this process did better there than processes that contend with the reader."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if cores <= 2 else cores - 1


def prepare(inputs, tokenizer, seq_len, out, val_fraction=0.01, input_format=None, text_field="text",
            doc_per="blank-line", workers=0, seed=0, overwrite=False, *, progress: bool | None = None) -> dict:
    """Tokenize a corpus into DATA_DIR (train/ and val/ shards, meta.json, tokenizer.json, token_counts.npy).

    Returns the meta dict. `progress`: None shows a bar on a terminal only; True/False force it.
    """
    # -- every check that needs no reading comes first, so bad options fail before any work
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or not SEQ_LEN_MIN <= seq_len <= SEQ_LEN_MAX:
        raise UserError(f"seq_len must be an integer in [{SEQ_LEN_MIN}, {SEQ_LEN_MAX}], got {seq_len}")
    seq_len = int(seq_len)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    val_fraction = float(val_fraction)
    if int(workers) < 0:
        raise UserError(f"workers must be >= 0 (0: one per core), got {workers}")
    workers = int(workers) or _auto_workers()
    check_options(input_format, doc_per)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    sp = special_ids(tok)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = fmt.id_dtype(vocab_size)
    files = resolve_inputs(inputs)
    out = Path(out)
    _check_out(out, overwrite)

    tmp = temp_dir_beside(out, "prepare")
    try:
        meta = _prepare_into(tmp, files, tok, sp, vocab_size, dtype, seq_len, val_fraction, input_format, text_field,
                             doc_per, workers, seed, progress, tokenizer_hash(tok))
        meta["sources"] = [str(x) for x in (inputs if not isinstance(inputs, (str, os.PathLike)) else [inputs])]
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
        _check_out(out, overwrite)  # again: --out may have changed while the corpus was read
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    print(f"prepared {out}: train {tr['rows']} rows ({tr['documents']} docs), val {va['rows']} rows "
          f"({va['documents']} docs) of {seq_len} tokens; dropped {meta['dropped_tail_tokens']} tail tokens",
          file=sys.stderr)
    return meta


def _prepare_into(tmp, files, tok, sp, vocab_size, dtype, seq_len, val_fraction, input_format, text_field, doc_per,
                  workers, seed, progress, tok_hash) -> dict:
    """Write shards, token counts and tokenizer.json into `tmp`; returns the meta dict (sources still empty)."""
    stats = new_stats()
    stats["bytes_total"] = sum(f.stat().st_size for f in files)
    counts = np.zeros(vocab_size, dtype=np.int64)
    writers = {s: fmt.ShardWriter(tmp / s, seq_len, dtype) for s in fmt.SPLITS}
    packers = {s: _Packer(writers[s], seq_len, sp.cls, sp.sep, counts if s == "train" else None) for s in fmt.SPLITS}
    bar = tqdm(total=stats["bytes_total"], unit="B", unit_scale=True, unit_divisor=1024, desc="prepare",
               disable=(not progress) if progress is not None else None, dynamic_ncols=True)
    pieces = iter_pieces(files, input_format, text_field, doc_per, stats)
    try:
        buffered = _route_stream(_encoded_batches(pieces, tok, workers, BATCH_CHARS), packers, seed, val_fraction, stats, bar)
    finally:
        bar.close()
    report_input(stats, text_field, files)
    if buffered is not None:  # small corpus: choose val so that both splits get a row when val_fraction > 0
        _route_small_corpus(buffered, packers, seq_len, seed, val_fraction)

    dropped = {s: packers[s].finish() for s in fmt.SPLITS}
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
                "shards": writers[s].shards, "dropped_tail_tokens": dropped[s]}
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
