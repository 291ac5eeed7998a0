"""prepare --shard I/N + --merge, and the same under torchrun, against a one-shot prepare of the same input files.

Rows differ at the seams between parts (each part packs its own stream and drops its own tail), so the reference
comparison is by document: the same documents in each split, the same document and token counts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_prepare import make_docs, write_blank_line

from maskedlm.cli import main
from maskedlm.data import prepare as prep
from maskedlm.data.shards import FLAG_DOC_START, load_meta, open_split
from maskedlm.tokenizer import load_tokenizer, train_tokenizer

SEQ_LEN = 32
N_FILES = 7


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("parts")
    # Every document is longer than a row, so a dropped tail (under one row) holds at most one document start.
    docs = make_docs(280, seed=31, min_words=40, max_words=70, tag=True)
    (d / "in").mkdir()
    for f in range(N_FILES):
        write_blank_line(d / "in" / f"f{f}.txt", docs[f::N_FILES])
    tok = train_tokenizer([str(d / "in")], 400, "wordpiece", d / "tok", lowercase=True).parent
    bpe = train_tokenizer([str(d / "in")], 400, "bpe", d / "bpe").parent
    return d, docs, tok, bpe


def _streams(data_dir: Path, split: str, rows_per_stream: list[int]):
    """Each stream's documents as token tuples; a stream is the rows one prepare packed in one go."""
    store = open_split(data_dir, split)
    ids, flags = store.rows(np.arange(len(store)))
    docs, start = [], 0
    for n in rows_per_stream:
        body, fl = ids[start:start + n, 1:].reshape(-1), flags[start:start + n, 1:].reshape(-1)
        cuts = np.flatnonzero(fl & FLAG_DOC_START)
        docs.append([tuple(body[a:b]) for a, b in zip(cuts, list(cuts[1:]) + [len(body)])])
        start += n
    assert start == len(store)
    return docs


def _tags(tok, docs) -> set[str]:
    return {tok.decode([int(t) for t in d]).split()[0] for stream in docs for d in stream}


def _check_same_split(one: Path, merged: Path, parts: list[Path], tok) -> None:
    m1, m2 = load_meta(one), load_meta(merged)
    for split in ("train", "val"):
        for k in ("documents", "document_tokens"):
            assert m1["splits"][split][k] == m2["splits"][split][k], (split, k)
        assert m2["splits"][split]["rows"] == sum(load_meta(p)["splits"][split]["rows"] for p in parts)
    assert m1["splits"]["val"]["documents"] > 20  # the comparison below has something to compare
    for k in ("documents", "files", "jsonl_records"):
        assert m1[k] == m2[k]
    counts = np.load(merged / "token_counts.npy")
    ids, _ = open_split(merged, "train").rows(np.arange(m2["splits"]["train"]["rows"]))
    np.testing.assert_array_equal(counts, np.bincount(ids.reshape(-1), minlength=len(counts)))
    tags = {}
    for split in ("train", "val"):
        s1 = _streams(one, split, [m1["splits"][split]["rows"]])
        s2 = _streams(merged, split, [load_meta(p)["splits"][split]["rows"] for p in parts])
        # Whole documents (all but each stream's last, which its tail may cut) are the same multiset...
        whole1 = sorted(d for s in s1 for d in s[:-1])
        whole2 = sorted(d for s in s2 for d in s[:-1])
        extra = set(whole2) - set(whole1)
        assert len(extra) <= 1 and len(set(whole1) - set(whole2)) <= len(parts)  # ...but for the seams and tails
        assert len(whole1) == len(set(whole1))  # documents are distinct (tagged), so multisets are sets here
        tags[split] = (_tags(tok, s1), _tags(tok, s2))
    # ...and no document changed sides.
    assert not tags["train"][0] & tags["val"][1] and not tags["val"][0] & tags["train"][1]


def test_shards_and_merge_give_the_one_shot_split(tmp_path, monkeypatch, corpus, capsys):
    d, docs, tok_dir, bpe = corpus
    monkeypatch.setattr(prep, "BUFFER_TOKENS", 0)  # the split by hash alone, as on any corpus above 1M tokens
    tok = load_tokenizer(tok_dir)
    args = ["--input", str(d / "in"), "--tokenizer", str(tok_dir), "--seq-len", str(SEQ_LEN), "--val-fraction", "0.2",
            "--workers", "1"]
    main(["prepare", *args, "--out", str(tmp_path / "one")])
    parts = [tmp_path / f"part{i}" for i in range(3)]
    for i, p in enumerate(parts):
        main(["prepare", *args, "--out", str(p), "--shard", f"{i}/3"])
    assert load_meta(parts[1])["files"] == 2  # files 1 and 4 of 0..6
    main(["prepare", "--merge", str(tmp_path / "merged"), *map(str, reversed(parts))])
    _check_same_split(tmp_path / "one", tmp_path / "merged", parts, tok)
    # The token data was linked, not copied.
    part_shard = parts[2] / "train" / "shard_00000.ids.npy"
    merged_shard = tmp_path / "merged" / "train" / "shard_p00002_00000.ids.npy"
    assert os.path.samefile(part_shard, merged_shard)

    # Refused, with one line and nothing written: a part with another tokenizer, a missing part, a part twice.
    bad = tmp_path / "bad"
    main(["prepare", *args[:2], "--tokenizer", str(bpe), *args[4:], "--out", str(bad), "--shard", "1/3"])
    capsys.readouterr()
    for given, msg in (([parts[0], bad, parts[2]], "different tokenizer"), ([parts[0], parts[2]], "missing part(s) 1"),
                       ([parts[0], parts[1], parts[1], parts[2]], "part 1 given twice")):
        with pytest.raises(SystemExit) as e:
            main(["prepare", "--merge", str(tmp_path / "x"), *map(str, given)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
        assert not (tmp_path / "x").exists()


def test_bad_shard_is_refused(tmp_path, corpus, capsys):
    d, _, tok_dir, _ = corpus
    for shard, msg in (("3/3", "0 <= I < N"), ("a/b", "must be I/N"), ("7/8", "gets no input file")):
        with pytest.raises(SystemExit):
            main(["prepare", "--input", str(d / "in"), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o"),
                  "--shard", shard])
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_torchrun_prepare_gives_the_one_shot_split(tmp_path, corpus):
    d, _, tok_dir, _ = corpus
    # BUFFER_TOKENS cannot be patched in another process: the one-shot reference streams above it, so make the
    # corpus large enough by repeating the files (each copy is a file of its own, with its own document keys).
    (tmp_path / "in").mkdir()
    for k in range(40):
        for f in sorted((d / "in").iterdir()):
            (tmp_path / "in" / f"{k:02d}_{f.name}").write_bytes(f.read_bytes())
    args = ["--input", str(tmp_path / "in"), "--tokenizer", str(tok_dir), "--seq-len", str(SEQ_LEN),
            "--val-fraction", "0.2", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "maskedlm", "prepare", *args, "--out", str(tmp_path / "one")], env=env,
                   check=True, timeout=600)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "maskedlm",
                    "prepare", *args, "--out", str(tmp_path / "two")], env=env, check=True, timeout=600)
    meta = load_meta(tmp_path / "two")
    assert [p["index"] for p in meta["merged_from"]] == [0, 1]
    assert not (tmp_path / ".two.parts").exists()
    m1 = load_meta(tmp_path / "one")
    for split in ("train", "val"):
        for k in ("documents", "document_tokens"):
            assert m1["splits"][split][k] == meta["splits"][split][k], (split, k)
