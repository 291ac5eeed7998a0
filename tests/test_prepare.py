"""prepare and the shard format, checked against the tokenizer's own encodings of a corpus this file generates.

Reading (formats, .gz, globs, long documents) is checked through prepare; bad input through the CLI, which must leave
an existing data dir as it was."""

from __future__ import annotations

import gzip
import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from maskedlm.cli import main
from maskedlm.data import corpus as reader
from maskedlm.data import encode as encoding
from maskedlm.data import prepare as prep
from maskedlm.data import shards
from maskedlm.data.shards import FLAG_DOC_START, FLAG_WORD_START, load_meta, open_split
from maskedlm.errors import UserError
from maskedlm.tokenizer import load_tokenizer, special_ids, tokenizer_hash, train_tokenizer

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "zé", "qu", "ba", "do", "fe", "gi", "pé"]
PUNCT = [".", ",", "!", "?", ";", "'s", "-"]


def make_docs(n: int, seed: int, min_words=3, max_words=60, tag=False) -> list[str]:
    """Documents of pseudo-words, some capitalised, with punctuation, digits and runs of spaces."""
    rng = random.Random(seed)
    docs = []
    for d in range(n):
        words = [f"{d:04d}"] if tag else []  # 4 digits: random numbers below have at most 3
        for _ in range(rng.randint(min_words, max_words)):
            w = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
            r = rng.random()
            if r < 0.1:
                w = w.capitalize()
            elif r < 0.15:
                w = str(rng.randint(0, 999))
            if rng.random() < 0.15:
                w += rng.choice(PUNCT)
            words.append(w)
        text = ""
        for i, w in enumerate(words):
            text += ("" if i == 0 else ("  " if rng.random() < 0.05 else " ")) + w
            if rng.random() < 0.05 and i < len(words) - 1:
                text += "\n"  # a single newline inside a blank-line document
        docs.append(text)
    return docs


def write_blank_line(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


KINDS = ["wordpiece", "bpe", "unigram"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs(120, seed=1)
    return write_blank_line(d / "corpus.txt", docs), docs


@pytest.fixture(scope="module")
def toks(tmp_path_factory, corpus) -> dict:
    d = tmp_path_factory.mktemp("toks")
    out = {}
    for kind, vocab in (("wordpiece", 300), ("bpe", 400), ("unigram", 200)):
        out[kind] = train_tokenizer([str(corpus[0])], vocab, kind, d / kind, lowercase=(kind == "wordpiece")).parent
    return out


def reference_stream(tok, docs: list[str]):
    """Ids and flags of the packed stream, from the tokenizer's own encodings: docs joined by [SEP]."""
    sp = special_ids(tok)
    ids, flags = [], []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        if not enc.ids:
            continue
        if ids:
            ids.append(sp.sep)
            flags.append(FLAG_WORD_START)
        prev = object()
        for j, w in enumerate(enc.word_ids):
            f = FLAG_WORD_START if (w is None or w != prev) else 0
            if j == 0:
                f |= FLAG_DOC_START
            flags.append(f)
            prev = w
        ids += enc.ids
    return np.array(ids, dtype=np.int64), np.array(flags, dtype=np.uint8)


def all_rows(data_dir, split="train"):
    store = open_split(data_dir, split)
    return store.rows(np.arange(len(store), dtype=np.int64))


def squash(s: str) -> str:
    return "".join(s.split())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seq_len", [8, 45])
def test_rows_are_the_tokenizers_stream(tmp_path, corpus, toks, kind, seq_len):
    path, docs = corpus
    tok = load_tokenizer(toks[kind])
    sp = special_ids(tok)
    meta = prep.prepare([str(path)], toks[kind], seq_len, tmp_path / "data", val_fraction=0.0, workers=1)
    ids, flags = all_rows(tmp_path / "data")
    ref_ids, ref_flags = reference_stream(tok, docs)
    body = seq_len - 1
    # Row count predicted from an independent token count; the remainder is the dropped tail.
    assert meta["splits"]["train"]["rows"] == len(ref_ids) // body == len(ids)
    assert meta["dropped_tail_tokens"] == len(ref_ids) % body
    assert ids.shape == (len(ref_ids) // body, seq_len)
    assert (ids[:, 0] == sp.cls).all() and (flags[:, 0] == FLAG_WORD_START).all()
    assert not (ids == sp.pad).any()
    n = ids.shape[0] * body
    np.testing.assert_array_equal(ids[:, 1:].reshape(-1), ref_ids[:n])
    # Word starts agree with the tokenizer's word_ids; doc starts sit on each document's first token.
    np.testing.assert_array_equal(flags[:, 1:].reshape(-1), ref_flags[:n])
    assert meta["splits"]["train"]["documents"] == len(docs)
    # Decoding gives back the text (modulo the tokenizer's normalization and spacing).
    content = ids[:, 1:].reshape(-1)
    pieces = np.split(content, np.flatnonzero(content == sp.sep))
    decoded = [tok.decode(p[p != sp.sep].tolist()) for p in pieces]
    norm = tok.normalizer.normalize_str if tok.normalizer else (lambda s: s)
    for i, text in enumerate(decoded[:-1]):  # the last one may be cut by the dropped tail
        assert squash(text) == squash(norm(docs[i])), (i, text, docs[i])
    assert squash(norm(docs[len(decoded) - 1])).startswith(squash(decoded[-1]))


@pytest.mark.parametrize("kind", KINDS)
def test_long_documents_are_chunked_without_changing_tokens(tmp_path, monkeypatch, toks, kind):
    # Tiny read blocks and chunks: separators straddle blocks and every document is tokenized in many pieces.
    monkeypatch.setattr(reader, "READ_BYTES", 37)
    monkeypatch.setattr(reader, "CHUNK_CHARS", 50)
    monkeypatch.setattr(prep, "BATCH_CHARS", 300)
    docs = make_docs(12, seed=7, min_words=40, max_words=120)
    path = write_blank_line(tmp_path / "long.txt", docs)
    tok = load_tokenizer(toks[kind])
    prep.prepare([str(path)], toks[kind], 16, tmp_path / "data", val_fraction=0.0, workers=1)
    ids, flags = all_rows(tmp_path / "data")
    ref_ids, ref_flags = reference_stream(tok, docs)
    n = ids.shape[0] * 15
    assert len(ref_ids) // 15 == ids.shape[0]
    np.testing.assert_array_equal(ids[:, 1:].reshape(-1), ref_ids[:n])
    np.testing.assert_array_equal(flags[:, 1:].reshape(-1), ref_flags[:n])


def test_fast_wordpiece_path_gives_identical_shards(tmp_path, monkeypatch, toks):
    """The chunk cache, and encode_batch_fast + the id → word-start table (joined or one text each), write what
    encode_batch + word_ids do."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = load_tokenizer(toks["wordpiece"])
    assert encoding.word_start_table(tok) is not None
    for kind in ("bpe", "unigram"):  # no id → word-start rule there: they keep word_ids
        assert encoding.word_start_table(load_tokenizer(toks[kind])) is None
    ws = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##a": 2}, unk_token="[UNK]"))
    ws.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # a word may start with "##" here: no table
    assert encoding.word_start_table(ws) is None
    # Words the model cannot spell ([UNK]), literal special tokens and "##" in the text, CJK, accents, a word over
    # WordPiece's 100-char limit, control characters, and a document that tokenizes to nothing.
    odd = ["x ##ing #a ## [MASK] b[SEP]c 漢字 ☃☃ Zéro\x07 " + "ka" * 80, "\x07\x08", "naïve ##  #  ☃", "[CLS]"]
    docs = make_docs(60, seed=11) + odd + make_docs(40, seed=12)
    path = write_blank_line(tmp_path / "odd.txt", docs)
    monkeypatch.setattr(prep, "BATCH_CHARS", 500)
    joined = []  # _encode_joined's outcomes in this process: encoded, or refused (a literal "[SEP]" in the batch)
    encode_joined = encoding._encode_joined
    monkeypatch.setattr(encoding, "_encode_joined", lambda *a: joined.append(encode_joined(*a)) or joined[-1])
    out = {}
    cacheable = encoding.chunk_cacheable
    for name, table, joiner, cache in (("cache", encoding.word_start_table, encoding._joiner, cacheable),
                                       ("joined", encoding.word_start_table, encoding._joiner, None),
                                       ("fast", encoding.word_start_table, None, None), ("word_ids", None, None, None)):
        monkeypatch.setattr(encoding, "word_start_table", table or (lambda t: None))
        monkeypatch.setattr(encoding, "_joiner", joiner or (lambda t: None))
        monkeypatch.setattr(encoding, "chunk_cacheable", cache or (lambda t: None))
        for workers in (1, 2):
            d = tmp_path / f"{name}{workers}"
            prep.prepare([str(path)], toks["wordpiece"], 16, d, val_fraction=0.1, workers=workers)
            out[name, workers] = {f.relative_to(d): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}
    assert len(out[("cache", 1)]) > 5 and all(o == out["cache", 1] for o in out.values())
    assert any(r is None for r in joined) and any(r is not None for r in joined)
    ids, flags = all_rows(tmp_path / "fast1")
    assert (ids == special_ids(tok).unk).any() and (ids == special_ids(tok).mask).any()
    # And the fast path agrees with the tokenizer's own word_ids on these documents (the reference stream).
    monkeypatch.undo()
    prep.prepare([str(path)], toks["wordpiece"], 16, tmp_path / "all", val_fraction=0.0, workers=1)
    ids, flags = all_rows(tmp_path / "all")
    ref_ids, ref_flags = reference_stream(tok, docs)
    assert ((ref_flags & FLAG_WORD_START) == 0).any()  # some continuation pieces, so the table is exercised
    n = ids.shape[0] * 15
    np.testing.assert_array_equal(ids[:, 1:].reshape(-1), ref_ids[:n])
    np.testing.assert_array_equal(flags[:, 1:].reshape(-1), ref_flags[:n])


def test_doc_per_line_and_file(tmp_path, toks):
    tok = load_tokenizer(toks["wordpiece"])
    docs = [d.replace("\n", " ") for d in make_docs(30, seed=3)]
    (tmp_path / "lines.txt").write_text("\n".join(docs[:20]) + "\n\n\n", encoding="utf-8")
    (tmp_path / "d").mkdir()
    for i, d in enumerate(docs[20:]):
        (tmp_path / "d" / f"f{i}.txt").write_text(d.replace(" ", "\n\n", 1), encoding="utf-8")  # blank lines inside
    prep.prepare([str(tmp_path / "lines.txt")], toks["wordpiece"], 16, tmp_path / "a", val_fraction=0, doc_per="line", workers=1)
    prep.prepare([str(tmp_path / "d")], toks["wordpiece"], 16, tmp_path / "b", val_fraction=0, doc_per="file", workers=1)
    for out, ds in (("a", docs[:20]), ("b", [d.replace(" ", "\n\n", 1) for d in docs[20:]])):
        ids, _ = all_rows(tmp_path / out)
        ref, _ = reference_stream(tok, ds)
        assert load_meta(tmp_path / out)["documents"] == len(ds)
        np.testing.assert_array_equal(ids[:, 1:].reshape(-1), ref[: ids.shape[0] * 15])


def test_jsonl_gz_globs_and_dirs(tmp_path, toks):
    tok = load_tokenizer(toks["unigram"])
    docs = make_docs(40, seed=5)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    recs = [json.dumps({"body": d, "id": i}) for i, d in enumerate(docs[:20])]
    recs.insert(3, json.dumps({"id": "no text"}))
    with gzip.open(tmp_path / "in" / "sub" / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(recs) + "\n")
    (tmp_path / "in" / "b.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[20:30]), encoding="utf-8")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"body": d}) + "\n" for d in docs[30:]))
    meta = prep.prepare([str(tmp_path / "in"), str(tmp_path / "c*.gz")], toks["unigram"], 16, tmp_path / "data",
                        val_fraction=0.0, text_field="body", workers=1)
    assert meta["jsonl_missing_text_field"] == 1 and meta["jsonl_records"] == 41 and meta["files"] == 3
    # Files of a directory come sorted by path: in/b.jsonl before in/sub/a.jsonl.gz, then the glob's.
    expected = docs[20:30] + docs[:20] + docs[30:]
    ids, _ = all_rows(tmp_path / "data")
    ref, _ = reference_stream(tok, expected)
    np.testing.assert_array_equal(ids[:, 1:].reshape(-1), ref[: ids.shape[0] * 15])


def test_val_holds_whole_documents_and_split_is_deterministic(tmp_path, monkeypatch, toks):
    tok = load_tokenizer(toks["wordpiece"])
    special_ids(tok)
    docs = make_docs(200, seed=11, tag=True, max_words=20)
    path = write_blank_line(tmp_path / "c.txt", docs)
    by_tag = {f"{i:04d}": i for i in range(len(docs))}

    def split_docs(out):
        found = {}
        for split in ("train", "val"):
            ids, flags = all_rows(out, split)
            content = ids[:, 1:].reshape(-1)
            text = tok.decode(content.tolist())
            found[split] = [by_tag[t] for t in text.split() if t in by_tag]
            # Each split's stream is its own documents, whole and in order, joined by [SEP].
            ref, ref_flags = reference_stream(tok, [docs[i] for i in found[split]])
            if split == "val" and found[split] and content[0] != ref[0]:
                pytest.fail("val does not start at a document start")
            np.testing.assert_array_equal(content, ref[: len(content)])
            np.testing.assert_array_equal(flags[:, 1:].reshape(-1), ref_flags[: len(content)])
        return found

    prep.prepare([str(path)], toks["wordpiece"], 24, tmp_path / "a", val_fraction=0.2, seed=3, workers=1)
    a = split_docs(tmp_path / "a")
    assert not set(a["train"]) & set(a["val"])
    assert 20 <= len(a["val"]) <= 60  # 0.2 of 200 documents, give or take the tail
    meta = load_meta(tmp_path / "a")
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 200
    monkeypatch.setattr(prep, "BUFFER_TOKENS", 50)  # streaming from the first batches on
    monkeypatch.setattr(prep, "BATCH_CHARS", 500)
    prep.prepare([str(path)], toks["wordpiece"], 24, tmp_path / "b", val_fraction=0.2, seed=3, workers=2)
    for split in ("train", "val"):  # worker processes and streaming change nothing
        for x, y in zip(all_rows(tmp_path / "a", split), all_rows(tmp_path / "b", split)):
            np.testing.assert_array_equal(x, y)
    prep.prepare([str(path)], toks["wordpiece"], 24, tmp_path / "c", val_fraction=0.2, seed=4, workers=1)
    assert set(split_docs(tmp_path / "c")["val"]) != set(a["val"])


def test_tiny_corpus_still_gets_a_val_row(tmp_path, toks):
    docs = make_docs(4, seed=2, min_words=20, max_words=30)
    path = write_blank_line(tmp_path / "c.txt", docs)
    meta = prep.prepare([str(path)], toks["wordpiece"], 16, tmp_path / "data", val_fraction=0.01, workers=1)
    assert meta["splits"]["val"]["rows"] >= 1 and meta["splits"]["train"]["rows"] >= 1
    assert meta["splits"]["val"]["documents"] >= 1
    with pytest.raises(UserError, match="too small to hold out validation"):
        prep.prepare([str(path)], toks["wordpiece"], 128, tmp_path / "x", val_fraction=0.5, workers=1)  # 1 row in all
    assert not (tmp_path / "x").exists()
    one = write_blank_line(tmp_path / "one.txt", docs[:1])  # one document cannot be split
    with pytest.raises(UserError, match="too small to hold out validation"):
        prep.prepare([str(one)], toks["wordpiece"], 16, tmp_path / "x", val_fraction=0.1, workers=1)
    meta = prep.prepare([str(one)], toks["wordpiece"], 16, tmp_path / "x", val_fraction=0.0, workers=1)
    assert meta["splits"]["val"]["rows"] == 0 and meta["splits"]["train"]["rows"] >= 1


def test_shards_memmap_counts_and_meta(tmp_path, monkeypatch, corpus, toks):
    monkeypatch.setattr(shards, "SHARD_BYTES", 16 * 10 * 2)  # 10 rows of 16 uint16 per shard
    path, docs = corpus
    tok = load_tokenizer(toks["bpe"])
    meta = prep.prepare([str(path)], toks["bpe"], 16, tmp_path / "data", val_fraction=0.1, workers=1)
    d = tmp_path / "data"
    tr = meta["splits"]["train"]
    assert len(tr["shards"]) == -(-tr["rows"] // 10) > 2
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.get_vocab_size()
    assert meta["tokenizer_hash"] == tokenizer_hash(load_tokenizer(d)) == tokenizer_hash(tok)
    assert meta["special_ids"] == special_ids(tok).as_dict()
    arr = np.load(d / "train" / "shard_00000.ids.npy", mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint16 and arr.shape == (10, 16)
    store = open_split(d, "train")
    assert len(store) == tr["rows"] and store.seq_len == 16
    full = np.concatenate([np.load(d / "train" / f"{s}.ids.npy") for s in tr["shards"]]).astype(np.int64)
    idx = np.array([5, 0, len(store) - 1, 17, 5], dtype=np.int64)
    ids, flags = store.rows(idx)
    assert ids.dtype == np.int64 and flags.dtype == np.uint8
    np.testing.assert_array_equal(ids, full[idx])
    counts = np.load(d / "token_counts.npy")
    np.testing.assert_array_equal(counts, np.bincount(full.reshape(-1), minlength=meta["vocab_size"]))
    with pytest.raises(IndexError):
        store.rows(np.array([len(store)]))


def test_invalid_utf8_and_empty_files_are_counted(tmp_path, capsys, toks):
    docs = make_docs(30, seed=9)
    raw = ("\n\n".join(docs)).encode("utf-8")
    raw = raw[:100] + b"\xff\xfe" + raw[100:200] + b"\xc3" + raw[200:]  # 3 invalid bytes
    (tmp_path / "bad.txt").write_bytes(raw)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n \n\t\n")
    main(["prepare", "--input", str(tmp_path / "bad.txt"), str(tmp_path / "empty.txt"), str(tmp_path / "blank.txt"),
          "--tokenizer", str(toks["wordpiece"]), "--seq-len", "16", "--out", str(tmp_path / "data"), "--workers", "1"])
    meta = load_meta(tmp_path / "data")
    assert meta["replaced_bytes"] == 3 and meta["skipped_empty_files"] == 2
    err = capsys.readouterr().err
    assert "replaced 3 invalid UTF-8 bytes" in err and "skipped 2 empty input files" in err


def test_huge_single_line_streams(tmp_path, monkeypatch, toks):
    # A 3 MB line with no newline: read, chunked and tokenized piecewise, never held whole with its tokens.
    monkeypatch.setattr(prep, "BUFFER_TOKENS", 1000)
    words = make_docs(1, seed=13, min_words=4000, max_words=4000)[0].replace("\n", " ")
    line = (words + " ") * (3_000_000 // (len(words) + 1))
    (tmp_path / "big.txt").write_text(line, encoding="utf-8")
    tracemalloc.start()
    meta = prep.prepare([str(tmp_path / "big.txt")], toks["wordpiece"], 128, tmp_path / "data", val_fraction=0,
                        doc_per="line", workers=1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert meta["documents"] == 1
    tok = load_tokenizer(toks["wordpiece"])
    assert meta["splits"]["train"]["rows"] == len(tok.encode(line, add_special_tokens=False).ids) // 127
    # Python-side memory stays well under the line plus its tokens as Python lists (~ 3 MB + 1M ints).
    assert peak < 30e6, peak


# ------------------------------------------------------------------------------------------- bad input via the CLI

@pytest.fixture()
def existing(tmp_path, corpus, toks):
    """A prepared data dir with a snapshot of every file's bytes, to check that failures leave it untouched."""
    out = tmp_path / "data"
    prep.prepare([str(corpus[0])], toks["wordpiece"], 16, out, val_fraction=0.1, workers=1)
    snap = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    return out, snap


def run_cli(args, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("maskedlm: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    return errors[0]


def no_mask_tokenizer(tmp_path, toks) -> Path:
    spec = json.loads((toks["wordpiece"] / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "[MASK]"]
    spec["model"]["vocab"] = {k: v for k, v in spec["model"]["vocab"].items() if k != "[MASK]"}
    p = tmp_path / "nomask.json"
    p.write_text(json.dumps(spec))
    return p


BAD = {
    "missing path": (lambda t, c, k: ["--input", str(t / "nope.txt")], "input path does not exist"),
    "no glob match": (lambda t, c, k: ["--input", str(t / "*.nothing")], "matches no files"),
    "all empty": (lambda t, c, k: ["--input", str(_touch(t / "e1.txt")), str(_touch(t / "e2.txt"))], "all 2 input files are empty"),
    "too small": (lambda t, c, k: ["--input", str(_write(t / "s.txt", "ka lo mi"))], "corpus too small"),
    "seq_len low": (lambda t, c, k: ["--input", str(c), "--seq-len", "4"], "seq_len must be an integer in [8, 8192], got 4"),
    "seq_len high": (lambda t, c, k: ["--input", str(c), "--seq-len", "9000"], "got 9000"),
    "no [MASK]": (lambda t, c, k: ["--input", str(c), "--tokenizer", str(no_mask_tokenizer(t, k))], "no [MASK] token"),
    "no text field": (lambda t, c, k: ["--input", str(_write(t / "r.jsonl", '{"txt": "ka lo"}\n{"txt": "mi"}\n'))],
                      "none of the 2 JSON Lines records has a string field 'text' (fields seen: txt)"),
    "bad json": (lambda t, c, k: ["--input", str(_write(t / "r.jsonl", '{"text": "ka"}\n{"text": \n'))], "r.jsonl:2: not valid JSON"),
    "bad gzip": (lambda t, c, k: ["--input", str(_write(t / "x.txt.gz", "not gzip"))], "cannot read"),
    "no tokenizer": (lambda t, c, k: ["--input", str(c), "--tokenizer", str(t / "none")], "tokenizer not found"),
    "val fraction": (lambda t, c, k: ["--input", str(c), "--val-fraction", "1.5"], "val_fraction must be in [0, 1), got 1.5"),
}


def _touch(p: Path) -> Path:
    p.write_bytes(b"")
    return p


def _write(p: Path, s: str) -> Path:
    p.write_text(s)
    return p


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_touches_nothing(tmp_path, capsys, corpus, toks, existing, case):
    out, snap = existing
    make_args, message = BAD[case]
    args = make_args(tmp_path, corpus[0], toks)
    if "--tokenizer" not in args:
        args += ["--tokenizer", str(toks["wordpiece"])]
    line = run_cli(["prepare", *args, "--seq-len", "16", "--out", str(out), "--overwrite", "--workers", "1"]
                   if "--seq-len" not in args else ["prepare", *args, "--out", str(out), "--overwrite", "--workers", "1"],
                   capsys)
    assert message in line, line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snap
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dir left behind


def test_refuses_prepared_out_without_overwrite(tmp_path, capsys, corpus, toks, existing):
    out, snap = existing
    line = run_cli(["prepare", "--input", str(corpus[0]), "--tokenizer", str(toks["bpe"]), "--seq-len", "16",
                    "--out", str(out)], capsys)
    assert "already holds prepared data; pass --overwrite" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snap
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    line = run_cli(["prepare", "--input", str(corpus[0]), "--tokenizer", str(toks["bpe"]), "--seq-len", "16",
                    "--out", str(other), "--overwrite"], capsys)
    assert "holds no prepared data; refusing" in line and (other / "notes.txt").read_text() == "mine"
    # With --overwrite the old data is replaced as a whole.
    main(["prepare", "--input", str(corpus[0]), "--tokenizer", str(toks["bpe"]), "--seq-len", "16", "--out", str(out),
          "--overwrite", "--workers", "1"])
    assert load_meta(out)["tokenizer_hash"] == tokenizer_hash(load_tokenizer(toks["bpe"]))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_50mb_line_peak_memory(tmp_path, toks):
    """The case that streaming is for: one 50 MB line. Peak RSS of a fresh process stays flat (far under 2 GB)."""
    import subprocess
    import sys

    words = make_docs(1, seed=13, min_words=4000, max_words=4000)[0].replace("\n", " ")
    with open(tmp_path / "big.txt", "w") as f:
        for _ in range(50_000_000 // (len(words) + 1)):
            f.write(words + " ")
    # Not os.wait4's ru_maxrss: at exec Linux keeps the old address space's high-water mark, which for a child of
    # pytest is pytest's own peak (1.11 GB measured after test_hf's slow test), so that number is max(pytest, child).
    # VmHWM belongs to the address space made at exec; a pool worker forks from this one, so RUSAGE_CHILDREN is
    # clean too. Measured here: 99 MB with workers=1 (2 cores), 69 MB + workers 76 MB with 3 workers.
    code = ("import json, resource\n"
            "from maskedlm.data.prepare import prepare\n"
            f"prepare([{str(tmp_path / 'big.txt')!r}], {str(toks['wordpiece'])!r}, 128, {str(tmp_path / 'data')!r}, "
            f"val_fraction=0.001, doc_per='line')\n"
            "hwm = [int(s.split()[1]) for s in open('/proc/self/status') if s.startswith('VmHWM:')][0]\n"
            "print(json.dumps([hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))\n")
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True)
    meta = load_meta(tmp_path / "data")
    assert meta["documents"] == 1 and meta["splits"]["train"]["rows"] > 100_000
    own, workers = json.loads(proc.stdout.strip().splitlines()[-1])  # kB: this process, and its largest pool worker
    assert max(own, workers) < 500_000, f"peak RSS {own} kB (pool workers: {workers} kB)"


# Text that probes every assumption behind the chunk cache: the four whitespace chars it cuts at, and next to
# them the Unicode spaces and separators it must not cut at (NBSP, ideographic space, NEL, U+001C-U+001F, which
# Python's str.split() would cut at and BERT's normalizer drops or keeps), combining accents right after a cut,
# final sigma, CJK without spaces, control chars, literal special tokens, a chunk past CACHE_WORD_CHARS and one
# past WordPiece's 100-char limit, runs of cuts, and text that tokenizes to nothing.
HOSTILE = ["a\tb\nc\rd  e", "x\u00a0y z\u3000w", "p\u0085q r\x1cs\x1dt\x1eu\x1fv", " \u0301e e\u0301 \u0308",
           "ΟΔΟΣ Σ σς", "漢字漢字漢字 かな", "\x07\x08 \x00z\ufffd", "[MASK]x y[SEP]z [CLS] [SEP][SEP]",
           "ka" * 30, "lo" * 60, "   ", "", "\n\n\t", "Zéro NAÏVE Ǆemal ﬁne", "##a ## #", "İstanbul ǅ",
           # CJK ideographs, cut on both sides where BERT's normalizer spaces them, at the ends of its ranges and
           # just outside them (U+4DC0, U+33FF, U+2B820), beside Latin, punctuation, kana and control chars
           "ab漢cd漢字，漢字。x", "\u3400\u4dbf\u4dc0\u33ff\u4e00\u9fff\ua000", "\uf900\uf901z \U0002b820\U0002b920\U0002ceaf",
           "漢\x07字 かな漢字カナ ka漢lo", "a\U0002b820b x\u4dc0y"]


def _bert_like(vocab: dict, **norm) -> "Tokenizer":  # noqa: F821 (tokenizers' type, imported where used)
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(**norm) if norm else None
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    return tok


@pytest.mark.parametrize("norm", [dict(lowercase=True), dict(lowercase=False), dict(lowercase=True, strip_accents=False),
                                  dict(lowercase=False, strip_accents=True, handle_chinese_chars=False),
                                  dict(clean_text=False), {}])
def test_chunk_cache_gives_the_tokenizers_own_ids(monkeypatch, toks, norm):
    """The cached path's ids and lengths equal tokenizers' encode() of each whole text, for every BERT normalizer
    setting, with the cache starting over mid-corpus and chunks that are too long to keep."""
    vocab = load_tokenizer(toks["wordpiece"]).get_vocab()
    tok = _bert_like(vocab, **norm)
    tok.add_tokens(["zzyzx", "ka-lo"])  # normalized added tokens, matched inside chunks
    assert encoding.chunk_cacheable(tok) == "whitespace"
    monkeypatch.setattr(encoding, "CACHE_WORDS", 50)  # starts over many times below
    texts = HOSTILE + make_docs(200, seed=5) + HOSTILE + [d + " zzyzx ka-lo kazzyzx" for d in make_docs(50, seed=6)]
    enc = encoding._Encoder(tok)
    assert enc.cache is not None
    assert (enc.cache.cjk is not None) == (norm.get("handle_chinese_chars", True) and bool(norm))
    for i in range(0, len(texts), 37):
        batch = texts[i:i + 37]
        ids, flags, lens = enc(batch)
        ref = [e.ids for e in tok.encode_batch(batch, add_special_tokens=False)]
        assert lens.tolist() == [len(r) for r in ref]
        assert ids.tolist() == [t for r in ref for t in r]
    assert enc.cache.resets > 3


def test_chunk_cache_refuses_tokenizers_it_cannot_reproduce(toks):
    from tokenizers import AddedToken, Tokenizer, normalizers

    vocab = load_tokenizer(toks["wordpiece"]).get_vocab()
    assert encoding.chunk_cacheable(load_tokenizer(toks["wordpiece"])) == "whitespace"
    for kind in ("bpe", "unigram"):
        assert encoding.chunk_cacheable(load_tokenizer(toks[kind])) == "space"
    spaced = _bert_like(vocab, lowercase=True)
    spaced.add_tokens(["new york"])  # would match across a cut
    stripping = _bert_like(vocab, lowercase=True)
    stripping.add_special_tokens([AddedToken("<mask>", lstrip=True)])  # takes the space before it
    other_norm = _bert_like(vocab)
    other_norm.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    truncating = _bert_like(vocab, lowercase=True)
    truncating.enable_truncation(8)
    for tok in (spaced, stripping, other_norm, truncating):
        assert encoding.chunk_cacheable(tok) is None
    # Byte-level BPE: no cut without GPT-2's regex, with a normalizer that can make spaces (NFKC), or with dropout.
    for change in ({"pre_tokenizer": {"use_regex": False}}, {"normalizer": {"type": "NFKC"}}, {"model": {"dropout": 0.1}}):
        spec = json.loads(load_tokenizer(toks["bpe"]).to_str())
        for key, val in change.items():
            spec[key] = val if key == "normalizer" else {**spec[key], **val}
        assert encoding.chunk_cacheable(Tokenizer.from_str(json.dumps(spec))) is None, change
    # ... nor with an added token matched after normalizing (the cut looks for added tokens in the raw text).
    for kind in ("bpe", "unigram"):
        tok = load_tokenizer(toks[kind])
        tok.add_tokens(["zzyzx"])
        assert encoding.chunk_cacheable(tok) is None
    # And where it refuses, the encoder still gives the tokenizer's own ids (by the uncached path).
    text = ["new york is not new  york <mask>x ka " * 3]
    for tok in (spaced, stripping, other_norm):
        ids, _, lens = encoding._Encoder(tok)(text)
        assert ids.tolist() == tok.encode(text[0], add_special_tokens=False).ids


def test_tokenizer_object_with_padding_and_truncation_packs_the_raw_stream(tmp_path, toks):
    """A Tokenizer object that pads and truncates (as a sentence-transformers tokenizer.json does) is used without
    either, as a tokenizer dir would be: the same shards, and the caller's object is left as it was."""
    docs = make_docs(80, seed=21)
    path = write_blank_line(tmp_path / "c.txt", docs)
    tok = load_tokenizer(toks["wordpiece"])
    tok.enable_padding(length=32)
    tok.enable_truncation(4)
    prep.prepare([str(path)], tok, 16, tmp_path / "obj", val_fraction=0.0, workers=1)
    prep.prepare([str(path)], toks["wordpiece"], 16, tmp_path / "dir", val_fraction=0.0, workers=1)
    files = lambda d: {f.relative_to(d): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}  # noqa: E731
    a, b = files(tmp_path / "obj"), files(tmp_path / "dir")
    a.pop(Path("meta.json")), b.pop(Path("meta.json"))  # names the tokenizer source, which differs
    assert a == b and len(a) > 3
    assert tok.padding is not None and tok.truncation is not None


# Runs of spaces and other whitespace in every arrangement GPT-2's regex treats differently, chars that NFKC turns into
# a space plus a mark (U+00A8) or a space (NBSP), and chars some regex engines take for whitespace.
SPACE_HOSTILE = ["a   b", "a \t b", "a\t b", "a ¨b", "a  ¨b", "x\u00a0 y", " leading", "trailing  ", "\u180e b",
                 "a \u200bb", "a \ufeffb c\u2060 d", "[SEP] b", "a [MASK]b  [CLS]", "b \t [SEP]x", "it's 'll 's", "12 345 6.7",
                 "  ", " ", "a\n b\n\n c", "\u3000a \u3000 b", "über straße ǅ ΟΔΟΣ", "漢字 漢 字", "ka" * 40]


def _word_starts(enc) -> list[bool]:
    """Word starts from tokenizers' own word ids: a new word id, or none (an added token), starts a word."""
    w = enc.word_ids
    return [i == 0 or w[i] is None or w[i] != w[i - 1] for i in range(len(w))]


@pytest.mark.parametrize("variant", ["bpe", "bpe-prefix-space", "bpe-no-normalizer", "unigram", "unigram-first",
                                     "unigram-never", "unigram-nfkd"])
def test_space_chunk_cache_gives_the_tokenizers_own_ids_and_word_starts(monkeypatch, toks, variant):
    """Byte-level BPE and Metaspace Unigram through the cache: ids and word starts equal encode()'s and its word
    ids' on each whole text, with the cache starting over mid-corpus."""
    from tokenizers import AddedToken, Tokenizer

    kind = variant.split("-")[0]
    spec = json.loads(load_tokenizer(toks[kind]).to_str())
    if variant == "bpe-prefix-space":
        spec["pre_tokenizer"]["add_prefix_space"] = True
    elif variant == "bpe-no-normalizer":
        spec["normalizer"] = None
    elif variant in ("unigram-first", "unigram-never"):
        spec["pre_tokenizer"]["prepend_scheme"] = variant.split("-")[1]
    elif variant == "unigram-nfkd":
        spec["normalizer"] = {"type": "NFKD"}
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_tokens([AddedToken("zzyzx", normalized=False), AddedToken("#(", normalized=False)])
    assert encoding.chunk_cacheable(tok) == "space"
    monkeypatch.setattr(encoding, "CACHE_WORDS", 40)
    texts = (SPACE_HOSTILE + HOSTILE + make_docs(150, seed=8) + SPACE_HOSTILE
             + [d + "  zzyzx kazzyzx \t #( x  #(" for d in make_docs(30, seed=9)])
    enc = encoding._Encoder(tok)
    assert enc.cache is not None and enc.cache.mode == "space"
    for i in range(0, len(texts), 29):
        batch = texts[i:i + 29]
        ids, flags, lens = enc(batch)
        ref = tok.encode_batch(batch, add_special_tokens=False)
        assert lens.tolist() == [len(r) for r in ref]
        assert ids.tolist() == [t for r in ref for t in r.ids]
        assert ((flags & FLAG_WORD_START) > 0).tolist() == [x for r in ref for x in _word_starts(r)]
    assert enc.cache.resets > 3


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_space_chunk_cache_writes_the_same_data_dir(tmp_path, monkeypatch, toks, kind):
    """End to end, in-process and with worker processes: the cached path writes byte for byte the data dir of the
    text-by-text path (ids, word starts, splits, counts), on documents with the hostile texts inside them."""
    docs = make_docs(40, seed=13) + [" ".join(SPACE_HOSTILE[i:i + 4]) for i in range(0, len(SPACE_HOSTILE), 4)]
    docs += make_docs(40, seed=14)
    path = write_blank_line(tmp_path / "c.txt", docs)
    monkeypatch.setattr(encoding, "CACHE_WORDS", 64)
    monkeypatch.setattr(prep, "BATCH_CHARS", 700)
    out = {}
    for name, cacheable in (("cache", encoding.chunk_cacheable), ("plain", lambda t: None)):
        monkeypatch.setattr(encoding, "chunk_cacheable", cacheable)
        for workers in (1, 2):
            d = tmp_path / f"{name}{workers}"
            prep.prepare([str(path)], toks[kind], 16, d, val_fraction=0.1, workers=workers)
            out[name, workers] = {f.relative_to(d): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}
    assert len(out["plain", 1]) > 5 and all(o == out["plain", 1] for o in out.values())
    ids, flags = all_rows(tmp_path / "cache1")
    assert ((flags & FLAG_WORD_START) == 0).any()  # pieces that continue a word, so word starts are exercised
