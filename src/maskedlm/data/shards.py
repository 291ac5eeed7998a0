"""The prepared-data format on disk: meta.json, and per split shards of packed rows (ids + per-token flags).

Shards are plain .npy files ([rows, seq_len] ids as uint16/uint32, and uint8 flags) that numpy memory-maps, so any
row is read in O(1) without loading a shard. This module writes and reads that format; it does not tokenize.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from maskedlm.errors import UserError
from maskedlm.tokenizer import SpecialIds

FORMAT_VERSION = 1
FLAG_DOC_START = 1  # bit 0: the first real token of a document
FLAG_WORD_START = 2  # bit 1: a token that starts a word (special tokens are words of their own)
SPLITS = ("train", "val")
# Ids of one shard stay under this many bytes: files of a size that is easy to copy, list and check.
SHARD_BYTES = 256 * 2**20


def _not_prepared(data_dir, why: str) -> UserError:
    return UserError(f"{data_dir} is not a prepared data dir ({why}); run `maskedlm prepare` first")


def load_meta(data_dir) -> dict:
    """meta.json of a prepared data dir, checked for the fields readers rely on."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise _not_prepared(data_dir, "no meta.json")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _not_prepared(data_dir, "meta.json is not valid JSON") from None
    if not isinstance(meta, dict):
        raise _not_prepared(data_dir, "meta.json is not an object")
    for key in ("format_version", "vocab_size", "special_ids", "seq_len", "dtype", "splits"):
        if key not in meta:
            raise _not_prepared(data_dir, f"meta.json lacks {key!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise UserError(
            f"{data_dir} has data format_version {meta['format_version']}, this maskedlm reads {FORMAT_VERSION}; "
            "prepare the data again"
        )
    return meta


def is_data_dir(path) -> bool:
    """`path` holds prepared data as prepare writes it: a meta.json object of this format. Folders that merely have
    train/ or val/ subfolders are someone else's, never ours to replace."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format_version" in meta and isinstance(meta.get("splits"), dict)


class DataDir:
    """A prepared data dir, read once: its numbers typed and checked, so no reader indexes meta.json by hand.

    Made by `open_data_dir`. `meta` keeps the raw dict for the few places that copy it verbatim (checkpoint state,
    reports); everything else reads the typed fields.
    """

    def __init__(self, path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        try:
            self.vocab_size = int(meta["vocab_size"])
            self.seq_len = int(meta["seq_len"])
            self.special = SpecialIds(**{k: int(meta["special_ids"][k]) for k in ("pad", "unk", "cls", "sep", "mask")})
            if not isinstance(meta["splits"], dict):
                raise TypeError("'splits' is not an object")
            self.splits = {name: dict(meta["splits"].get(name) or {}) for name in SPLITS}
            for name, info in self.splits.items():
                for k in ("rows", "tokens", "documents"):
                    if not isinstance(info.get(k, 0), int) or isinstance(info.get(k), bool) or info.get(k, 0) < 0:
                        raise TypeError(f"splits.{name}.{k} is {info[k]!r}, not a count")
        except (KeyError, TypeError, ValueError) as e:
            raise _not_prepared(self.path, f"meta.json has a missing or malformed field: {e}") from None
        self.tokenizer_hash: str | None = meta.get("tokenizer_hash")

    def rows(self, split: str) -> int:
        """Rows in `split` (0 for a split the data does not have)."""
        return int(self.splits.get(split, {}).get("rows", 0))

    def tokens(self, split: str) -> int:
        return int(self.splits.get(split, {}).get("tokens", 0))

    def shard_names(self, split: str) -> list[str] | None:
        """The shard names meta.json lists for `split`, or None where it lists none (then the files on disk count)."""
        names = self.splits.get(split, {}).get("shards")
        if names is not None and not (isinstance(names, list) and all(
                isinstance(n, str) and n and Path(n).name == n and n not in (".", "..") for n in names)):
            raise _not_prepared(self.path, f"meta.json's splits.{split}.shards is not a list of names")
        return names

    @property
    def tokenizer_file(self) -> Path | None:
        """The tokenizer.json prepare copied into the data dir, or None for data prepared without one."""
        p = self.path / "tokenizer.json"
        return p if p.is_file() else None

    def token_counts(self, required_by: str) -> np.ndarray:
        """The corpus count of every token id (token_counts.npy), for the features that weight by frequency."""
        p = self.path / "token_counts.npy"
        if not p.is_file():
            raise UserError(f"{required_by} needs {p}; prepare the data again")
        try:
            counts = np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise UserError(f"cannot read {p} ({e}); prepare the data again") from None
        if counts.ndim != 1 or counts.dtype.kind not in "iu":
            raise UserError(f"{p} holds {counts.dtype} of shape {counts.shape}, expected integer counts; prepare the data again")
        return counts

    def open(self, split: str) -> "RowStore":
        return open_split(self.path, split)


def open_data_dir(data_dir) -> DataDir:
    """The prepared data dir at `data_dir`, with meta.json checked; UserError (one line) when it is not one."""
    return DataDir(data_dir, load_meta(data_dir))


def open_sources(paths) -> list[DataDir]:
    """Several prepared data dirs that one run mixes: refused (one line) unless they share one tokenizer, and with
    it the vocabulary and special ids, and one row length (a batch holds rows of every source)."""
    dirs = [open_data_dir(p) for p in ([paths] if isinstance(paths, (str, Path)) else list(paths))]
    if not dirs:
        raise UserError("no data dir given; pass --data DATA_DIR")
    first = dirs[0]
    for d in dirs[1:]:
        for what, a, b in (("tokenizer", first.tokenizer_hash, d.tokenizer_hash), ("vocab_size", first.vocab_size,
                           d.vocab_size), ("special ids", first.special, d.special), ("seq_len", first.seq_len, d.seq_len)):
            if a != b:
                raise UserError(f"the --data sources {first.path} and {d.path} differ in {what} ({a} vs {b}); a mixture's "
                                "sources must be prepared with one tokenizer and one --seq-len")
    return dirs


def mixture_weights(weights, sources: list[DataDir]) -> list[float]:
    """A mixture's shares (data.weights) normalised, or each source's share of the train tokens when none are given."""
    w = [float(x) for x in weights] or [float(d.tokens("train")) for d in sources]
    if len(w) != len(sources):
        raise UserError(f"data.weights has {len(w)} values for {len(sources)} --data sources; give one per source")
    top = max(w, default=0.0)
    if not top > 0:
        raise UserError(f"a mixture needs a weight > 0 for some source; got {w}")
    w = [x / top for x in w]  # first: a sum of weights near the float limit (1e308 each) would be inf, shares 0
    return [x / sum(w) for x in w]


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    """A .npy (version 1.0) header of a fixed 128 bytes, so a shard's row count can be filled in after its rows."""
    d = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (np.lib.format.dtype_to_descr(dtype), tuple(shape))
    body = d.ljust(128 - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


def _close_quietly(f) -> None:
    try:
        f.close()
    except OSError:
        pass  # a full disk fails the flush too; the file is being abandoned either way


class ShardWriter:
    """Streams rows of one split into shards of at most `rows_per_shard` rows; nothing is held in memory."""

    def __init__(self, split_dir, seq_len: int, dtype, rows_per_shard: int | None = None):
        self.dir = Path(split_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.seq_len = int(seq_len)
        self.dtype = np.dtype(dtype)
        if rows_per_shard is None:
            rows_per_shard = max(1, SHARD_BYTES // (self.seq_len * self.dtype.itemsize))
        self.rows_per_shard = int(rows_per_shard)
        self._files = None  # (ids file, flags file) of the open shard
        self._n = 0  # rows in the open shard
        self.rows = 0
        self.shards: list[str] = []

    def _open(self) -> None:
        name = shard_name(len(self.shards))
        self.shards.append(name)
        self._files = (open(self.dir / f"{name}.ids.npy", "wb"), open(self.dir / f"{name}.flags.npy", "wb"))
        for f in self._files:
            f.write(b"\0" * 128)  # the header goes here once the row count is known
        self._n = 0

    def _close_shard(self) -> None:
        files, self._files = self._files, None
        try:
            for f, dt in zip(files, (self.dtype, np.dtype(np.uint8))):
                f.seek(0)
                f.write(_npy_header(dt, (self._n, self.seq_len)))
                f.close()
        finally:
            for f in files:
                _close_quietly(f)

    def abort(self) -> None:
        """Close what is open without finishing it (a failed prepare: the caller removes the files). Until closed, a
        deleted file still holds its disk space, and a full disk would stay full."""
        files, self._files = self._files, None
        for f in files or ():
            _close_quietly(f)

    def add(self, ids: np.ndarray, flags: np.ndarray) -> None:
        """Append rows ([n, seq_len] each)."""
        i = 0
        while i < len(ids):
            if self._files is None:
                self._open()
            take = min(len(ids) - i, self.rows_per_shard - self._n)
            self._files[0].write(np.ascontiguousarray(ids[i:i + take], dtype=self.dtype).tobytes())
            self._files[1].write(np.ascontiguousarray(flags[i:i + take], dtype=np.uint8).tobytes())
            self._n += take
            self.rows += take
            i += take
            if self._n == self.rows_per_shard:
                self._close_shard()

    def close(self) -> list[str]:
        if self._files is not None:
            self._close_shard()
        return self.shards


class RowStore:
    """Rows of one split, memory-mapped from its shards; `rows(indices)` copies only the rows asked for."""

    def __init__(self, split_dir):
        self.dir = Path(split_dir)
        if not self.dir.is_dir():
            raise _not_prepared(self.dir.parent, f"no {self.dir.name}/ split")
        names = seq_len = vocab = None
        try:  # meta.json names the shards; fall back to what is on disk for a bare split dir
            data = open_data_dir(self.dir.parent)
            names, seq_len, vocab = data.shard_names(self.dir.name), data.seq_len, data.vocab_size
        except UserError:
            pass
        if names is None:
            names = sorted(p.name[: -len(".ids.npy")] for p in self.dir.glob("shard_*.ids.npy"))
        self._ids, self._flags = [], []
        for name in names:
            try:
                ids = np.load(self.dir / f"{name}.ids.npy", mmap_mode="r")
                flags = np.load(self.dir / f"{name}.flags.npy", mmap_mode="r")
            except (OSError, ValueError, EOFError) as e:
                raise UserError(f"cannot read shard {self.dir / name}: {e}; prepare the data again") from None
            if ids.ndim != 2 or ids.shape != flags.shape or ids.dtype.kind not in "iu" or flags.dtype != np.uint8:
                raise UserError(f"shard {self.dir / name} has ids {ids.dtype}{list(ids.shape)} and flags "
                                f"{flags.dtype}{list(flags.shape)}, not integer rows; prepare the data again")
            # Once per open (one pass over the file): an id past the vocabulary would index outside the embeddings.
            if vocab is not None and ids.size and _max_id(self.dir / f"{name}.ids.npy", ids) >= vocab:
                raise UserError(f"shard {self.dir / name} holds token id {_max_id(self.dir / f'{name}.ids.npy', ids)}, beyond the vocabulary of "
                                f"{vocab} in meta.json; prepare the data again")
            self._ids.append(ids)
            self._flags.append(flags)
        if seq_len is None:
            seq_len = self._ids[0].shape[1] if self._ids else 0
        self.seq_len = seq_len
        for ids in self._ids:
            if ids.shape[1] != seq_len:
                raise UserError(f"a shard in {self.dir} has rows of {ids.shape[1]} tokens, expected {seq_len}")
        counts = np.array([len(a) for a in self._ids], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # row offset of each shard
        self.num_shards = len(self._ids)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def rows(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n, seq_len], flags uint8 [n, seq_len]) for the global row `indices` of this split."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows in {self.dir}")
        out_ids = np.empty((idx.size, self.seq_len), np.int64)
        out_flags = np.empty((idx.size, self.seq_len), np.uint8)
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            local = idx[sel] - self._starts[s]
            out_ids[sel] = self._ids[s][local]
            out_flags[sel] = self._flags[s][local]
        return out_ids, out_flags


_MAX_IDS: dict[tuple, int] = {}  # (path, size, mtime): the shard's largest id, so a file is scanned once per process


def _max_id(path: Path, ids: np.ndarray) -> int:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MAX_IDS:
        _MAX_IDS[key] = int(ids.max())
    return _MAX_IDS[key]


def open_split(data_dir, split: str) -> RowStore:
    """The RowStore of `split` ("train" or "val") in a prepared data dir."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    load_meta(data_dir)
    return RowStore(Path(data_dir) / split)
