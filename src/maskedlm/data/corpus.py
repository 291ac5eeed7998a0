"""Reading corpora: files, directories and globs of plain text or JSON Lines (.gz, .zst too), Parquet files and
`datasets` save_to_disk directories (Arrow), cut into documents and pieces; pyarrow and zstandard, optional extras,
are imported in the functions that read such files only. Streams with bounded memory: files are read in blocks
(tables in record batches) and huge documents are cut at whitespace into pieces. It counts what it read and warns
about what it skipped; it does not tokenize, pack or write.
"""

from __future__ import annotations

import codecs
import glob as globlib
import gzip
import json
import os
import re
import sys
import zlib
from itertools import chain
from pathlib import Path

from maskedlm.errors import UserError

DOC_PER = ("line", "file", "blank-line")
FORMATS = ("text", "jsonl")
TABLE_FORMATS = ("parquet", "arrow")  # chosen by file name only: a table file is never read as text
READ_BYTES = 1 << 20  # file read block
# Rows per record batch read from an Arrow file (datasets writes batches of 1,000 rows).
TABLE_BATCH_ROWS = 1024
# Text per record batch read from Parquet, as rows = this / the column's mean uncompressed bytes per row (16 to 4096).
# Small batches of long rows bound memory (6 kB rows: 64 a batch, where 1024 rows had cost 20 MB more peak RSS); rows
# of 100 bytes keep large batches, where small ones cost ~5% in speed.
TABLE_BATCH_BYTES = 1 << 19
# The files of a `datasets` save_to_disk directory besides its Arrow files: metadata, not corpus text.
_SAVED_DATASET_META = ("state.json", "dataset_info.json", "dataset_dict.json")
# Documents longer than this are tokenized in pieces cut at whitespace: bounded memory for a 50 MB line, and
# pieces of one document still spread over workers.
CHUNK_CHARS = 1 << 16

_GLOB_CHARS = re.compile(r"[*?\[]")
_CUT = re.compile(r"\s(?=\S)")  # a cut before the last whitespace char of a run keeps byte-level BPE's " word" intact
_SEPARATORS = {"line": re.compile(r"\n"), "blank-line": re.compile(r"\n[^\S\n]*\n"), "file": None}


def warn(msg: str) -> None:
    """Print a one-line maskedlm warning on stderr."""
    print(f"maskedlm: warning: {msg}", file=sys.stderr)


def resolve_inputs(inputs) -> list[Path]:
    """Files named by `inputs` (files, dirs walked recursively, globs), sorted within each input, without repeats."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs or [])
    if not inputs:
        raise UserError("no input given; pass --input PATH (files, directories or globs)")
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            found = [p]
        elif p.is_dir():
            found = _dir_files(p)
            if not found:
                raise UserError(f"input directory has no files: {item}")
        elif _GLOB_CHARS.search(str(item)):
            found = []
            for m in sorted(globlib.glob(str(item), recursive=True)):
                mp = Path(m)
                found += [mp] if mp.is_file() else sorted(q for q in mp.rglob("*") if q.is_file())
            if not found:
                raise UserError(f"input pattern matches no files: {item}")
        elif p.exists():  # a FIFO, socket or device: no size, and reading it twice (tokenizer, prepare) cannot work
            raise UserError(f"input {item} is not a regular file or directory; copy it into a file first")
        else:
            raise UserError(f"input path does not exist: {item}")
        files += found
    seen, out = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _saved_dataset_files(d: Path) -> list[Path] | None:
    """The Arrow files of a `datasets` save_to_disk directory in its own order (state.json's _data_files), or None
    when `d` is not one."""
    state = d / "state.json"
    if not (state.is_file() and (d / "dataset_info.json").is_file()):
        return None
    try:
        names = [f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{state} is not a datasets save_to_disk state file (no _data_files list)") from None
    return [d / n for n in names]


def _dir_files(p: Path) -> list[Path]:
    """The files under directory `p` sorted by path, hidden ones left out; a saved dataset inside gives its Arrow
    files (datasets names them data-XXXXX-of-YYYYY, so path order is its order) without its metadata files."""
    out = []
    for d, subdirs, names in os.walk(p):
        subdirs[:] = [x for x in subdirs if not x.startswith(".")]
        saved = _saved_dataset_files(Path(d))
        if saved is not None:
            missing = [q for q in saved if not q.is_file()]
            if missing:
                raise UserError(f"saved dataset {d} lacks {missing[0].name}, listed in its state.json")
            names = [n for n in names if n not in _SAVED_DATASET_META]
        elif "dataset_dict.json" in names:  # a saved DatasetDict: its splits are saved datasets in the subdirs
            names = [n for n in names if n != "dataset_dict.json"]
        out += [Path(d) / n for n in names if not n.startswith(".") and (Path(d) / n).is_file()]
    return sorted(out)


def _format_of(path: Path, input_format: str | None) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    if input_format is not None:
        return input_format
    for ext in (".gz", ".zst"):
        name = name.removesuffix(ext)
    return "jsonl" if name.endswith((".jsonl", ".ndjson")) else "text"


class _Counter:
    """A codec error handler that replaces invalid UTF-8 with U+FFFD and counts the bytes it replaced."""

    def __init__(self):
        self.replaced = 0

    def __call__(self, err):
        self.replaced += err.end - err.start
        return "\ufffd", err.end


_REPLACED = _Counter()
codecs.register_error("maskedlm-count", _REPLACED)


def _read_blocks(path: Path, stats: dict):
    """Decoded text of one file in blocks; stats["bytes_done"] follows the bytes read from disk."""
    raw = open(path, "rb")
    try:
        name = path.name.lower()
        stream = raw
        if name.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        elif name.endswith(".zst"):
            stream = _zstd_reader(raw, path)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="maskedlm-count")
        first, last_pos = True, 0
        while True:
            try:
                block = stream.read(READ_BYTES)
            except (OSError, EOFError, zlib.error, ValueError) as e:  # zstandard raises ZstdError, a ValueError
                raise UserError(f"cannot read {path}: {e}") from None
            pos = raw.tell()
            stats["bytes_done"] += pos - last_pos
            last_pos = pos
            final = not block
            text = decoder.decode(block, final=final)
            if first and text.startswith("\ufeff"):  # a UTF-8 byte-order mark is not text
                text = text[1:]
            first = False
            if text:
                yield text
            if final:
                return
    finally:
        raw.close()


def _zstd_reader(raw, path: Path):
    try:
        import zstandard  # optional: only .zst inputs need it
    except ImportError:
        raise UserError(f"{path} is zstd-compressed; install zstandard (pip install zstandard) to read it") from None
    return zstandard.ZstdDecompressor().stream_reader(raw, read_size=READ_BYTES)


# The allocator of libarrow's C++ code (the Parquet reader's pages and decompression buffers), read from this variable
# once, as pyarrow is imported; pa.set_memory_pool moves only what pyarrow's Python API allocates. Peak RSS of
# prepare on 20 MB of Parquet lines (bench/prepare.py): 129 MB with the default, mimalloc (it keeps what it freed),
# 129 with "system", 112 with jemalloc. Only where pyarrow's wheels are built with jemalloc: naming a pool a build
# lacks makes Arrow warn.
ARROW_POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"
ARROW_POOL = "jemalloc" if sys.platform == "linux" and os.uname().machine == "x86_64" else None


def _pyarrow(path: Path):
    # Too late once pyarrow is imported; a user's own choice stands.
    choose = ARROW_POOL and "pyarrow" not in sys.modules and ARROW_POOL_ENV not in os.environ
    if choose:
        os.environ[ARROW_POOL_ENV] = ARROW_POOL
    try:
        import pyarrow  # optional: only Parquet and Arrow inputs need it
        import pyarrow.ipc  # noqa: F401
    except ImportError:
        raise UserError(f"{path} is a Parquet/Arrow table; install pyarrow (pip install pyarrow) to read it") from None
    finally:
        if choose:
            del os.environ[ARROW_POOL_ENV]  # read already: child processes get the user's environment
    try:
        import pyarrow._parquet  # noqa: F401  (see _parquet_reader)
    except ImportError:
        pass  # a pyarrow that moved it: _parquet_reader takes the public module
    return pyarrow


def _parquet_batch_rows(md, j: int | None) -> int:
    """Rows per batch so that a batch holds about TABLE_BATCH_BYTES of column `j`, the text (from the file's
    metadata)."""
    if j is None or md.num_rows == 0:
        return TABLE_BATCH_ROWS
    size = sum(md.row_group(g).column(j).total_uncompressed_size for g in range(md.num_row_groups))
    return int(min(4096, max(16, TABLE_BATCH_BYTES * md.num_rows // max(size, 1))))


def _parquet_reader(pa, path: Path):
    """An open pyarrow._parquet.ParquetReader: pyarrow.parquet.ParquetFile's own reader, taken from the private
    module because pyarrow.parquet imports pyarrow.fs (the S3, GCS, Azure and HDFS bindings: 8 MB of RSS). Should a
    pyarrow release move it, ParquetFile's `reader` (the same object) is used. pre_buffer would read whole column
    chunks (a row group) ahead; buffered reads of 1 MB hold a page or two."""
    try:
        reader = pa._parquet.ParquetReader()
    except AttributeError:
        import pyarrow.parquet as pq

        return pq.ParquetFile(str(path), pre_buffer=False, buffer_size=READ_BYTES).reader
    reader.open(str(path), pre_buffer=False, buffer_size=READ_BYTES)
    return reader


def _table_batches(path: Path, kind: str, text_field: str, stats: dict):
    """(text column as a list or None when the table lacks it, row count, schema names) per record batch of a
    Parquet file or an Arrow file; stats["bytes_done"] follows the share of rows read."""
    pa = _pyarrow(path)
    size = path.stat().st_size
    source = None
    try:
        if kind == "parquet":
            source = _parquet_reader(pa, path)
            names, md = source.schema_arrow.names, source.metadata
            total = md.num_rows
            # Row group by row group, only the text column (a flat one: a nested column is no text either way),
            # about TABLE_BATCH_BYTES of it at a time: memory stays bounded whatever the rows' length. No threads:
            # they only read columns in parallel.
            paths = [md.schema.column(i).path for i in range(md.num_columns)]
            j = paths.index(text_field) if text_field in names and text_field in paths else None
            batches = source.iter_batches(_parquet_batch_rows(md, j), range(md.num_row_groups),
                                          [] if j is None else [j], use_threads=False)
        else:
            # Read, not memory-mapped: a mapped file counts toward RSS as it is read. datasets writes the IPC stream
            # format (batches of 1,000 rows); the random-access file format is read too.
            source = pa.OSFile(str(path))
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                whole = pa.ipc.open_file(source)
                reader = (whole.get_batch(i) for i in range(whole.num_record_batches))
            names = reader.schema.names if hasattr(reader, "schema") else None
            batches, total = reader, None
        done = 0
        for batch in batches:
            names = names or batch.schema.names
            n = batch.num_rows
            col = batch.column(text_field) if text_field in batch.schema.names else None
            texts = None
            if col is not None and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                texts = col.to_pylist()
            done += n
            stats["bytes_done"] += (size * done // total if total else 0) - (size * (done - n) // total if total else 0)
            yield texts, n, names
        if not total:
            stats["bytes_done"] += size
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    finally:
        if source is not None:
            source.close()


def _table_pieces(path: Path, kind: str, text_field: str, chunk_chars: int, stats: dict):
    """Lists (pieces, starts) from the text column of a Parquet/Arrow file; a row is a document, and rows whose
    text is missing, null or not a string are skipped and counted as for JSON Lines."""
    for texts, n, names in _table_batches(path, kind, text_field, stats):
        stats["records"] += n
        stats["table_records"] += n
        if texts is None:
            stats["missing_field"] += n
            if len(stats["fields_seen"]) < 20:
                stats["fields_seen"].update(names)
            continue
        out, starts = [], []
        for text in texts:
            if not isinstance(text, str):
                stats["missing_field"] += 1
                continue
            _add_document(text, chunk_chars, out, starts, stats)
        if out:
            yield out, starts


def _cut(s: str, limit: int) -> int:
    """Where to cut a long document: before a whitespace char that precedes a word, in s[limit//2:limit]."""
    cut = None
    for m in _CUT.finditer(s, limit // 2, limit):
        cut = m.start()
    # No whitespace in half a chunk (one enormous "word"): cut hard; only this cut may split a word.
    return cut if cut else limit


def _pieces_of(text: str, first: bool, chunk_chars: int, texts: list, starts: list) -> None:
    """Append one whole document to (texts, starts), cut into pieces of at most chunk_chars."""
    while len(text) > chunk_chars:
        c = _cut(text, chunk_chars)
        texts.append(text[:c])
        starts.append(first)
        first = False
        text = text[c:]
    if text:
        texts.append(text)
        starts.append(first)



def _add_document(text: str, chunk_chars: int, texts: list, starts: list, stats: dict) -> None:
    """One record's text as a document (cut into pieces), or counted as empty when only white space is left."""
    text = text.strip()
    if text:
        stats["documents"] += 1
        _pieces_of(text, True, chunk_chars, texts, starts)
    else:
        stats["empty_text"] += 1

def _text_pieces(blocks, doc_per: str, chunk_chars: int, stats: dict):
    """Lists (pieces, starts_document) for a text file; a document is a line, a blank-line block or the whole file.

    Lists rather than single pieces: a block's documents go on together, keeping Python work per document small."""
    sep = _SEPARATORS[doc_per]
    buf, started = "", False  # started: the current document already has pieces out
    for block in blocks:
        buf += block
        texts, starts = [], []
        if sep is not None:
            parts = sep.split(buf)
            buf = parts.pop()
            if parts and started:  # the end of a long document whose head went out already
                _pieces_of(parts[0].rstrip(), False, chunk_chars, texts, starts)
                parts, started = parts[1:], False
            docs = [d for d in map(str.strip, parts) if d]
            stats["documents"] += len(docs)
            if docs and max(map(len, docs)) <= chunk_chars:
                texts += docs
                starts += [True] * len(docs)
            else:
                for d in docs:
                    _pieces_of(d, True, chunk_chars, texts, starts)
        if not started:
            buf = buf.lstrip()
        while len(buf) > 2 * chunk_chars:  # the document so far is long: send its head on
            c = _cut(buf, chunk_chars)
            if not started:
                stats["documents"] += 1
            texts.append(buf[:c])
            starts.append(not started)
            started, buf = True, buf[c:]
        if texts:
            yield texts, starts
    buf = buf.rstrip() if started else buf.strip()
    if buf:
        if not started:
            stats["documents"] += 1
        texts, starts = [], []
        _pieces_of(buf, not started, chunk_chars, texts, starts)
        yield texts, starts


def _jsonl_pieces(blocks, path: Path, text_field: str, chunk_chars: int, stats: dict):
    buf, line_no = "", 0
    for block in chain(blocks, ["\n"]):  # a last line without its newline still counts
        buf += block
        lines = buf.split("\n")
        buf = lines.pop()
        texts, starts = [], []
        for line in lines:
            line_no += 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg}); fix the line or use --format text") from None
            except RecursionError:  # json's parser recurses once per nesting level
                raise UserError(f"{path}:{line_no}: a JSON document nested too deep to read; fix the line or use "
                                "--format text") from None
            stats["records"] += 1
            text = rec.get(text_field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                stats["missing_field"] += 1
                if isinstance(rec, dict) and len(stats["fields_seen"]) < 20:
                    stats["fields_seen"].update(k for k in rec if isinstance(k, str))
                continue
            _add_document(text, chunk_chars, texts, starts, stats)
        if texts:
            yield texts, starts


def new_stats() -> dict:
    """Fresh counters for iter_pieces: files, documents, JSON Lines records, bytes read and bytes replaced."""
    return {"files": 0, "empty_files": 0, "documents": 0, "records": 0, "table_records": 0, "missing_field": 0, "empty_text": 0,
            "fields_seen": set(),
            "bytes_total": 0, "bytes_done": 0, "replaced_bytes": 0, "replaced_files": 0}


def iter_pieces(files: list[Path], input_format=None, text_field="text", doc_per="blank-line", stats=None,
                chunk_chars: int | None = None):
    """Lists (text pieces, starts_document flags) over all files in order; counts into `stats` (see new_stats)."""
    stats = new_stats() if stats is None else stats
    chunk_chars = chunk_chars or CHUNK_CHARS
    for path in files:
        stats["files"] += 1
        docs_before, replaced_before = stats["documents"], _REPLACED.replaced
        kind = _format_of(path, input_format)
        if kind in TABLE_FORMATS:
            yield from _table_pieces(path, kind, text_field, chunk_chars, stats)
        elif kind == "jsonl":
            yield from _jsonl_pieces(_read_blocks(path, stats), path, text_field, chunk_chars, stats)
        else:
            yield from _text_pieces(_read_blocks(path, stats), doc_per, chunk_chars, stats)
        if stats["documents"] == docs_before:
            stats["empty_files"] += 1
        if _REPLACED.replaced > replaced_before:
            stats["replaced_files"] += 1
            stats["replaced_bytes"] += _REPLACED.replaced - replaced_before


def check_options(input_format, doc_per) -> None:
    """UserError for an unknown input format or document unit, before any file is read."""
    if input_format not in (None, *FORMATS):
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {input_format!r}")
    if doc_per not in DOC_PER:
        raise UserError(f"doc_per must be one of {', '.join(DOC_PER)}, got {doc_per!r}")


def report_input(stats: dict, text_field: str, files: list[Path]) -> None:
    """Warnings for skipped/replaced input; UserError when nothing usable was found."""
    kind = "records" if stats.get("table_records") else "JSON Lines records"
    if stats["records"] and stats["missing_field"] == stats["records"]:
        seen = ", ".join(sorted(stats["fields_seen"])[:10]) or "none"
        raise UserError(
            f"none of the {stats['records']} {kind} has a string field {text_field!r} "
            f"(fields seen: {seen}); pass --text-field NAME"
        )
    if stats["documents"] == 0:
        raise UserError(f"no text found: all {stats['files']} input files are empty ({', '.join(map(str, files[:3]))}"
                        f"{', ...' if len(files) > 3 else ''})")
    if stats["missing_field"]:
        warn(f"skipped {stats['missing_field']} of {stats['records']} {kind} without a string field {text_field!r}")
    if stats["empty_text"]:
        warn(f"skipped {stats['empty_text']} of {stats['records']} {kind} whose {text_field!r} is empty")
    if stats["empty_files"]:
        warn(f"skipped {stats['empty_files']} empty input files")
    if stats["replaced_bytes"]:
        warn(f"replaced {stats['replaced_bytes']} invalid UTF-8 bytes with U+FFFD in {stats['replaced_files']} files")


def iter_corpus_texts(inputs, input_format=None, text_field="text", stats=None, doc_per="blank-line"):
    """Text pieces of a corpus (for tokenizer training); errors and warnings as prepare's, raised at the end."""
    check_options(input_format, doc_per)
    files = resolve_inputs(inputs)
    stats = new_stats() if stats is None else stats
    stats.update({k: v for k, v in new_stats().items() if k not in stats})
    for texts, _ in iter_pieces(files, input_format, text_field, doc_per, stats):
        yield from texts
    report_input(stats, text_field, files)
