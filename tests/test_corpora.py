"""Parquet, zstd and saved-Arrow (datasets save_to_disk) inputs against the same documents given as JSON Lines.

The reference is the JSON Lines path prepare already had: the other formats must give byte-identical shards, token
counts and tokenizer copies, and the same counts of skipped records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskedlm.data import prepare as prep
from maskedlm.tokenizer import train_tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

from test_prepare import make_docs  # noqa: E402

# Records the readers must skip and count: null, empty and whitespace-only text (JSON also: a missing key).
BAD = [None, "", "   \n "]


def _records(docs):
    recs = list(docs)
    for i, b in enumerate(BAD):
        recs.insert(7 + 11 * i, b)
    return recs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpora")
    docs = make_docs(300, seed=21, max_words=80)
    tok = train_tokenizer([str(_jsonl(d / "train.jsonl", docs))], 300, "wordpiece", d / "tok", lowercase=True).parent
    return d, docs, tok


def _jsonl(path: Path, recs) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": r}) + "\n" for i, r in enumerate(recs)), encoding="utf-8")
    return path


def _zst(path: Path, data: bytes) -> Path:
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    return path


def _check_same_data_dir(a: Path, b: Path) -> None:
    for f in sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "meta.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert sorted(p.relative_to(a) for p in a.rglob("*")) == sorted(p.relative_to(b) for p in b.rglob("*"))
    ma, mb = (json.loads((x / "meta.json").read_text()) for x in (a, b))
    for m in (ma, mb):  # what names or measures the input files themselves, not the data
        for k in ("sources", "input_bytes"):
            m.pop(k)
    assert ma == mb


def _prepare(inputs, tok, out, **kw):
    return prep.prepare([str(x) for x in inputs], tok, 32, out, val_fraction=0.1, workers=1, **kw)


def test_parquet_zstd_and_arrow_match_jsonl(tmp_path, setup):
    d, docs, tok = setup
    recs = _records(docs)
    ref_meta = _prepare([_jsonl(tmp_path / "c.jsonl", recs)], tok, tmp_path / "ref")
    assert ref_meta["jsonl_missing_text_field"] == 1 and ref_meta["empty_text_records"] == 2
    assert ref_meta["documents"] == len(docs)

    # Parquet: small row groups, so streaming crosses many of them; a second column the reader must not need.
    table = pa.table({"id": list(range(len(recs))), "text": pa.array(recs, pa.string())})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=37)
    meta = _prepare([tmp_path / "c.parquet"], tok, tmp_path / "pq")
    _check_same_data_dir(tmp_path / "ref", tmp_path / "pq")
    assert meta["jsonl_records"] == len(recs) and meta["jsonl_missing_text_field"] == 1
    assert meta["empty_text_records"] == 2

    # An Arrow file in the random-access format (pyarrow's own), record batches of 50 rows.
    with pa.ipc.new_file(str(tmp_path / "c.arrow"), table.schema) as w:
        for b in table.to_batches(max_chunksize=50):
            w.write_batch(b)
    _prepare([tmp_path / "c.arrow"], tok, tmp_path / "ipc")
    _check_same_data_dir(tmp_path / "ref", tmp_path / "ipc")

    # zstd JSON Lines, read as a stream.
    raw = (tmp_path / "c.jsonl").read_bytes()
    _prepare([_zst(tmp_path / "c.jsonl.zst", raw)], tok, tmp_path / "zst")
    _check_same_data_dir(tmp_path / "ref", tmp_path / "zst")

    # A datasets save_to_disk directory, two Arrow files, read without importing datasets.
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": recs, "id": list(range(len(recs)))}).save_to_disk(
        str(tmp_path / "saved"), num_shards=2)
    arrows = sorted((tmp_path / "saved").glob("*.arrow"))
    assert len(arrows) == 2
    # Each file is a unit of the split's document keys, so the reference is the same records in two JSON Lines files.
    first = pa.ipc.open_stream(pa.memory_map(str(arrows[0]))).read_all().num_rows
    (tmp_path / "two").mkdir()
    _jsonl(tmp_path / "two" / "a.jsonl", recs[:first])
    _jsonl(tmp_path / "two" / "b.jsonl", recs[first:])
    _prepare([tmp_path / "two"], tok, tmp_path / "ref2")
    _prepare([tmp_path / "saved"], tok, tmp_path / "arrow")
    _check_same_data_dir(tmp_path / "ref2", tmp_path / "arrow")

    # A saved DatasetDict (a dir per split, dataset_dict.json on top): the splits' Arrow files, no metadata as text.
    datasets.DatasetDict({"a": datasets.Dataset.from_dict({"text": recs[:first]}),
                          "b": datasets.Dataset.from_dict({"text": recs[first:]})}).save_to_disk(str(tmp_path / "dd"))
    _prepare([tmp_path / "dd"], tok, tmp_path / "dd_data")
    _check_same_data_dir(tmp_path / "ref2", tmp_path / "dd_data")


def test_zstd_text_matches_plain_text(tmp_path, setup):
    _, docs, tok = setup
    text = ("\n\n".join(docs) + "\n").encode()
    (tmp_path / "c.txt").write_bytes(text)
    _prepare([tmp_path / "c.txt"], tok, tmp_path / "ref")
    _prepare([_zst(tmp_path / "c.txt.zst", text)], tok, tmp_path / "zst")
    _check_same_data_dir(tmp_path / "ref", tmp_path / "zst")


def test_table_without_the_text_column_is_refused(tmp_path, setup, capsys):
    from maskedlm.cli import main

    _, docs, tok = setup
    pq.write_table(pa.table({"body": docs[:5]}), tmp_path / "c.parquet")
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--input", str(tmp_path / "c.parquet"), "--tokenizer", str(tok), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["maskedlm: error: none of the 5 records has a string field 'text' (fields seen: body); "
                   "pass --text-field NAME"]
    assert not (tmp_path / "o").exists()


def test_parquet_reader_imports_lean_and_uses_jemalloc(tmp_path):
    """In a fresh process: libarrow's own allocations on the chosen pool, the variable that chose it gone again, and
    no pyarrow.fs (pyarrow.parquet's import of it costs 8 MB of RSS)."""
    import os
    import subprocess
    import sys

    from maskedlm.data import corpus

    pq.write_table(pa.table({"text": ["a b", " ", "c"]}), tmp_path / "c.parquet")
    code = ("import os, sys\n"
            "from pathlib import Path\n"
            "from maskedlm.data.corpus import iter_pieces\n"
            f"print(list(iter_pieces([Path({str(tmp_path / 'c.parquet')!r})])))\n"
            "import pyarrow\n"
            f"print(pyarrow.default_memory_pool().backend_name, {corpus.ARROW_POOL_ENV!r} in os.environ, "
            "'pyarrow.fs' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != corpus.ARROW_POOL_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == "[(['a b', 'c'], [True, True])]"
    backend, env_left, fs = out[1].split()
    assert (env_left, fs) == ("False", "False")
    if corpus.ARROW_POOL:
        assert backend == corpus.ARROW_POOL


def test_parquet_reader_falls_back_to_the_public_module(tmp_path):
    """Without pyarrow's private reader class, the public ParquetFile's reader reads the same batches."""
    import types

    from maskedlm.data import corpus

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(300)], "n": list(range(300))}), path, row_group_size=64)
    public = corpus._parquet_reader(types.SimpleNamespace(), path)  # a pyarrow without _parquet
    private = corpus._parquet_reader(pa, path)
    assert type(public) is type(private) and public.metadata.num_row_groups == 5
    got = [list(r.iter_batches(50, range(5), [0], use_threads=False)) for r in (public, private)]
    assert [b.column(0).to_pylist() for b in got[0]] == [b.column(0).to_pylist() for b in got[1]]
    assert sum(b.num_rows for b in got[0]) == 300


@pytest.mark.slow
def test_500mb_parquet_peak_memory(tmp_path, setup):
    """A ~500 MB corpus in Parquet (row groups of 2,000 documents) prepared with a peak RSS under 200 MB: the text
    column is streamed, never a whole file or row group of it."""
    import subprocess
    import sys

    from maskedlm.data.shards import load_meta

    _, docs, tok = setup
    schema = pa.schema([("text", pa.string()), ("id", pa.int64())])
    size, i = 0, 0
    with pq.ParquetWriter(tmp_path / "big.parquet", schema) as w:
        while size < 500_000_000:
            block = [" ".join(docs[(i + k) % len(docs)] for k in range(20)) for i in range(i, i + 2000)]
            size += sum(map(len, block))
            w.write_table(pa.table({"text": block, "id": list(range(i, i + 2000))}, schema=schema))
            i += 2000
    # VmHWM of the child's own address space, as in test_prepare.py's 50 MB line test (ru_maxrss would carry
    # pytest's peak over the exec).
    code = ("import json\n"
            "from maskedlm.data.prepare import prepare\n"
            f"prepare([{str(tmp_path / 'big.parquet')!r}], {str(tok)!r}, 128, {str(tmp_path / 'data')!r}, "
            "val_fraction=0.001, workers=1)\n"
            "print([int(s.split()[1]) for s in open('/proc/self/status') if s.startswith('VmHWM:')][0])\n")
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True)
    assert load_meta(tmp_path / "data")["documents"] == i
    peak_kb = int(proc.stdout.strip().splitlines()[-1])
    print(f"peak RSS {peak_kb} kB")
    assert peak_kb < 200_000, f"peak RSS {peak_kb} kB"
