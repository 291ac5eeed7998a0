"""Corpus → packed rows: the pieces data/corpus.py reads, tokenized by data/encode.py, split by document, packed and
sharded; parts of a corpus prepared apart (--shard I/N) and merged. Streaming with bounded memory: rows leave for
disk a shard at a time, into a temp dir beside --out renamed at the end (files.py), so a failure leaves nothing
half-written. The on-disk format is shards.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from maskedlm.data import shards as fmt
from maskedlm.data.corpus import check_options, iter_pieces, new_stats, report_input, resolve_inputs, warn
from maskedlm.data.encode import encoded_batches
from maskedlm.errors import UserError
from maskedlm.files import atomic_write_text, building, check_out, link_or_copy, replace_dir
from maskedlm.tokenizer import SpecialIds, load_tokenizer, special_ids, tokenizer_hash

SEQ_LEN_MIN, SEQ_LEN_MAX = 8, 8192
BATCH_CHARS = 1 << 17  # text per encoder call / worker task: ~30k tokens; 256 kB cost ~5 MB more peak for ~3% less CPU
# Corpora below this many tokens are held in memory until the end, so the split can guarantee a validation row.
BUFFER_TOKENS = 1 << 20
DOC_BITS = 40  # a document key is (file index << DOC_BITS) + document index in the file: 10^12 documents a file


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

def _is_prepared(p: Path) -> bool:
    return (p / "meta.json").exists() or (p / "train").exists() or (p / "val").exists()


def check_data_out(out: Path, overwrite: bool, inputs=()) -> None:
    """UserError unless `out` may become the data dir: new, empty, or prepared data with overwrite; never an input,
    inside one or around one (a second run would tokenize its own shards as text)."""
    check_out(out, inputs=inputs, overwrite=overwrite, ours=_is_prepared, what="prepared data")


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


@dataclass(frozen=True)
class _Job:
    """What one prepare run (or one part of it) reads and how; _prepare_into writes it into a temp dir."""

    files: list[Path]  # the whole input list: a document's key numbers its file in it, whichever part reads it
    file_index: list[int]  # the files this run reads: all of them, or part I of N
    tok: Tokenizer
    sp: SpecialIds
    seq_len: int
    val_fraction: float
    input_format: str | None
    text_field: str
    doc_per: str
    workers: int
    seed: int
    progress: bool | None
    buffer: bool  # hold a small corpus to guarantee each split a row (not in parts: their split is by hash alone)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


def _checked_numbers(seq_len, val_fraction, workers) -> tuple[int, float, int]:
    """seq_len, val_fraction and the worker count (0: automatic) checked and normalised; UserError naming the value."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or not SEQ_LEN_MIN <= seq_len <= SEQ_LEN_MAX:
        raise UserError(f"seq_len must be an integer in [{SEQ_LEN_MIN}, {SEQ_LEN_MAX}], got {seq_len}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if int(workers) < 0:
        raise UserError(f"workers must be >= 0 (0: one per core), got {workers}")
    workers = int(workers) or _auto_workers()
    if workers > MAX_WORKERS_PER_CORE * _cores():
        warn(f"--workers {workers} is more than {MAX_WORKERS_PER_CORE} per core; using {MAX_WORKERS_PER_CORE * _cores()}")
        workers = MAX_WORKERS_PER_CORE * _cores()
    return int(seq_len), float(val_fraction), workers


def _own_tokenizer(tokenizer) -> Tokenizer:
    """The tokenizer to encode with: loaded from a path, or a copy of a Tokenizer without padding and truncation (as
    load_tokenizer gives)."""
    if not isinstance(tokenizer, Tokenizer):
        return load_tokenizer(tokenizer)
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    return tok


def _part_files(files: list[Path], part: tuple[int, int] | None) -> list[int]:
    """Indices of the input files that part I of N reads (i % N == I); all of them without a part."""
    file_index = list(range(len(files)))
    if part is None:
        return file_index
    if not file_index[part[0]::part[1]]:
        raise UserError(f"--shard {part[0]}/{part[1]} gets no input file: the input has {len(files)} files; "
                        f"split it into at most {len(files)} parts")
    return file_index[part[0]::part[1]]


def prepare(inputs, tokenizer, seq_len, out, val_fraction=0.01, input_format=None, text_field="text",
            doc_per="blank-line", workers=0, seed=0, overwrite=False, *, shard=None,
            progress: bool | None = None) -> dict:
    """Tokenize a corpus into DATA_DIR (train/ and val/ shards, meta.json, tokenizer.json, token_counts.npy).

    `shard` ("I/N"): prepare only part I of N, the input files i with i % N == I, for `merge` to join later; a
    document's split is the one a single prepare would give it (on a corpus above BUFFER_TOKENS, where the split
    is by hash alone). Returns the meta dict. `progress`: None shows a bar on a terminal only; True/False force it.
    """
    # -- every check that needs no reading comes first, so bad options fail before any work
    seq_len, val_fraction, workers = _checked_numbers(seq_len, val_fraction, workers)
    check_options(input_format, doc_per)
    tok = _own_tokenizer(tokenizer)
    sp = special_ids(tok)
    part = parse_shard(shard)
    files = resolve_inputs(inputs)
    job = _Job(files, _part_files(files, part), tok, sp, seq_len, val_fraction, input_format, text_field, doc_per,
               workers, seed, progress, buffer=part is None)
    named = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    inputs_seen = [*named, *files, tokenizer if not isinstance(tokenizer, Tokenizer) else None]
    out = Path(out)
    check_data_out(out, overwrite, inputs_seen)

    with building(out, "prepare") as tmp:
        meta = _prepare_into(tmp, job)
        meta["sources"] = [str(x) for x in named]
        if part is not None:
            meta["part"] = {"index": part[0], "count": part[1], "inputs_hash": _inputs_hash(files)}
        _install(tmp, meta, out, overwrite, inputs_seen)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    print(f"prepared {out}: train {tr['rows']} rows ({tr['documents']} docs), val {va['rows']} rows "
          f"({va['documents']} docs) of {seq_len} tokens; dropped {meta['dropped_tail_tokens']} tail tokens",
          file=sys.stderr)
    return meta


def _prepare_into(tmp: Path, job: _Job) -> dict:
    """Write shards, token counts and tokenizer.json into `tmp` from the files `job` reads; returns the meta dict
    (sources still empty)."""
    files = [job.files[k] for k in job.file_index]
    stats = new_stats()
    stats["bytes_total"] = sum(f.stat().st_size for f in files)
    counts = np.zeros(job.vocab_size, dtype=np.int64)
    writers = {s: fmt.ShardWriter(tmp / s, job.seq_len, fmt.id_dtype(job.vocab_size)) for s in fmt.SPLITS}
    packers = {s: _Packer(writers[s], job.seq_len, job.sp.cls, job.sp.sep, counts if s == "train" else None)
               for s in fmt.SPLITS}
    bar = tqdm(total=stats["bytes_total"], unit="B", unit_scale=True, unit_divisor=1024, desc="prepare",
               disable=(not job.progress) if job.progress is not None else None, dynamic_ncols=True)
    pieces = _keyed_pieces(files, job.file_index, job.input_format, job.text_field, job.doc_per, stats)
    try:
        batches = encoded_batches(pieces, job.tok, job.workers, BATCH_CHARS)
        buffered = _route_stream(batches, packers, job.seed, job.val_fraction, stats, bar, job.buffer)
    finally:
        bar.close()
    report_input(stats, job.text_field, files)
    if buffered is not None:  # small corpus: choose val so that both splits get a row when val_fraction > 0
        _route_small_corpus(buffered, packers, job.seq_len, job.seed, job.val_fraction)

    dropped = {s: packers[s].finish() for s in fmt.SPLITS}
    if writers["train"].rows == 0:
        raise UserError(f"corpus too small: no train row of seq_len {job.seq_len}; add text, lower --seq-len or --val-fraction")
    if job.val_fraction > 0 and writers["val"].rows == 0:
        warn(f"the val split got no row (val_fraction {job.val_fraction}); raise --val-fraction for a validation set")
    np.save(tmp / "token_counts.npy", counts)
    atomic_write_text(tmp / "tokenizer.json", job.tok.to_str())
    splits = {s: {"rows": writers[s].rows, "tokens": writers[s].rows * job.seq_len, "documents": packers[s].documents,
                  "document_tokens": packers[s].document_tokens, "shards": writers[s].shards,
                  "dropped_tail_tokens": dropped[s]} for s in fmt.SPLITS}
    return _meta(job, splits, stats)


def _meta(job: _Job, splits: dict, stats: dict) -> dict:
    """meta.json's dict (sources still empty) from the run's settings, its splits and corpus.py's reading stats."""
    return {
        "format_version": fmt.FORMAT_VERSION,
        "vocab_size": job.vocab_size,
        "special_ids": job.sp.as_dict(),
        "seq_len": job.seq_len,
        "dtype": fmt.id_dtype(job.vocab_size).name,
        "tokenizer_hash": tokenizer_hash(job.tok),
        "splits": splits,
        "sources": [],
        "files": stats["files"],
        "input_bytes": stats["bytes_total"],
        "documents": stats["documents"],
        "skipped_empty_files": stats["empty_files"],
        "replaced_bytes": stats["replaced_bytes"],
        "jsonl_records": stats["records"],
        "jsonl_missing_text_field": stats["missing_field"],
        "empty_text_records": stats["empty_text"],
        "dropped_tail_tokens": int(sum(s["dropped_tail_tokens"] for s in splits.values())),
        "val_fraction": job.val_fraction,
        "seed": job.seed,
        "doc_per": job.doc_per,
        "input_format": job.input_format,
        "text_field": job.text_field,
        "flags": {"doc_start": fmt.FLAG_DOC_START, "word_start": fmt.FLAG_WORD_START},
    }


# ------------------------------------------------------------------------------------------------- merge

# Settings that decide what a part holds: parts joined into one data dir must agree on every one.
_MERGE_SAME = ("format_version", "tokenizer_hash", "vocab_size", "dtype", "seq_len", "special_ids", "val_fraction",
               "seed", "doc_per", "input_format", "text_field")
_MERGE_SUMMED = ("files", "input_bytes", "documents", "skipped_empty_files", "replaced_bytes", "jsonl_records",
                 "jsonl_missing_text_field", "empty_text_records", "dropped_tail_tokens")


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
