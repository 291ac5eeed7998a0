"""Campaign cases for the commands that read corpora and data dirs: tokenizer train, prepare (shards, merge), masks,
train (mixtures, probe tasks, resume from damaged run dirs, every numeric setting out of range)."""

from __future__ import annotations

import gzip
import json
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import numpy as np
from hostile_cases import TRAIN, WORDS, Case, W, cp, edit_json, fifo, latest, loop_dir, mine, mount, text, zst

LONG = 60  # seconds for a case that might hang: long enough for a slow start on a loaded machine
CUT = "truncat|damaged|corrupt|incomplete|ended before"  # what a refusal of a cut-off compressed file must say


def _corpus(c) -> bytes:
    return W(c, "corpus", "a.txt").read_bytes() + W(c, "corpus", "b.txt").read_bytes()


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def tok(c, *inputs, out="t", extra=()):
    return ["tokenizer", "train", "--input", *inputs, "--vocab-size", "100", "--out", c.dir / out if isinstance(out, str)
            else out, *extra]


def tokenizer_cases() -> list[Case]:
    C = Case
    cases = [
        C("tok ok wordpiece", lambda c: tok(c, W(c, "corpus")), "ok"),
        C("tok ok bpe", lambda c: [*tok(c, W(c, "corpus"), extra=["--kind", "bpe"]), "--vocab-size", "300"], "ok"),
        C("tok ok unigram", lambda c: tok(c, W(c, "corpus"), extra=["--kind", "unigram"]), "ok"),
        C("tok ok jsonl.gz", lambda c: tok(c, W(c, "c.jsonl.gz")), "ok"),
        C("tok ok zst", lambda c: tok(c, W(c, "c.txt.zst")), "ok"),
        C("tok ok parquet", lambda c: tok(c, W(c, "c.parquet")), "ok"),
        C("tok ok arrow dir", lambda c: tok(c, W(c, "arrow")), "ok"),
        C("tok ok glob", lambda c: tok(c, f"{W(c, 'corpus')}/*.txt"), "ok"),
        C("tok input missing", lambda c: tok(c, c.dir / "nope"), msg="does not exist"),
        C("tok input empty dir", lambda c: tok(c, mine(c, "empty", files=()))),
        C("tok input empty file", lambda c: tok(c, text(c, "e.txt", ""))),
        C("tok input fifo", lambda c: tok(c, fifo(c)), msg="not a regular file", timeout=LONG),
        C("tok input /dev/zero", lambda c: tok(c, "/dev/zero"), timeout=LONG),
        C("tok input glob matches nothing", lambda c: tok(c, f"{c.dir}/*.nothing")),
        C("tok recursive glob over a symlink loop", lambda c: tok(c, f"{loop_dir(c)}/**"), "any", timeout=LONG),
        C("tok dir with a symlink loop", lambda c: tok(c, loop_dir(c)), "any", timeout=LONG),
        C("tok binary garbage as text", lambda c: tok(c, text(c, "g.txt", bytes(range(256)) * 50)), "any"),
        C("tok truncated gz", lambda c: tok(c, text(c, "t.txt.gz", _half(gzip.compress(_corpus(c))))), msg=CUT),
        C("tok truncated zst", lambda c: tok(c, text(c, "t.txt.zst", _half(zst(_corpus(c))))), msg=CUT,
          why="a truncated .zst was read as complete"),
        C("tok garbage zst", lambda c: tok(c, text(c, "g.txt.zst", b"\x28\xb5\x2f\xfd" + b"garbage" * 100))),
        C("tok garbage gz", lambda c: tok(c, text(c, "g.txt.gz", b"\x1f\x8b" + b"garbage" * 100))),
        C("tok garbage parquet", lambda c: tok(c, text(c, "g.parquet", b"PAR1garbagePAR1"))),
        C("tok jsonl bad line", lambda c: tok(c, text(c, "b.jsonl", '{"text": "a b"}\n{"text": \n'))),
        C("tok jsonl text is an object", lambda c: tok(c, text(c, "o.jsonl", '{"text": {"a": "alpha"}}\n' * 50)),
          why="a JSON object used as its Python repr"),
        C("tok jsonl text is a list", lambda c: tok(c, text(c, "l.jsonl", '{"text": ["alpha", "bravo"]}\n' * 50)),
          why="a JSON list used as its Python repr"),
        C("tok jsonl lines are not objects", lambda c: tok(c, text(c, "n.jsonl", '[1, 2]\n"alpha"\n'))),
        C("tok --text-field missing", lambda c: tok(c, W(c, "c.jsonl"), extra=["--text-field", "body"])),
        C("tok --format jsonl on plain text", lambda c: tok(c, W(c, "corpus"), extra=["--format", "jsonl"])),
        C("tok out is a file", lambda c: tok(c, W(c, "corpus"), out=text(c, "f", "x"))),
        C("tok out is a fifo", lambda c: tok(c, W(c, "corpus"), out=fifo(c)), timeout=LONG),
        C("tok out is the input", lambda c: tok(c, cp(c, "corpus"), out="corpus", extra=["--overwrite"])),
        C("tok out inside the input", lambda c: tok(c, cp(c, "corpus"), out="corpus/t")),
        C("tok out is a user folder", lambda c: tok(c, W(c, "corpus"), out=mine(c))),
        C("tok out is a user folder --overwrite", lambda c: tok(c, W(c, "corpus"), out=mine(c), extra=["--overwrite"])),
        C("tok out holds a tokenizer", lambda c: tok(c, W(c, "corpus"), out=cp(c, "tok")), msg="--overwrite"),
        C("tok out holds a tokenizer --overwrite", lambda c: tok(c, W(c, "corpus"), out=cp(c, "tok"), extra=["--overwrite"]),
          "ok", mutable=["tok"]),
        C("tok out on a full disk", lambda c: tok(c, W(c, "corpus"), out=mount(c, "full") / "t"), msg="(?i)no space"),
        C("tok out on a read-only disk", lambda c: tok(c, W(c, "corpus"), out=mount(c, "ro", ro=True) / "t")),
    ]
    for v in ["0", "-1", "1", "5", "1000000000", "abc", "1e3"]:
        cases.append(C(f"tok --vocab-size {v}", lambda c, v=v: [*tok(c, W(c, "corpus"))[:-4], "--vocab-size", v, "--out",
                                                                c.dir / "t"]))
    return cases


def prep(c, *inputs, out="d", extra=()):
    out = c.dir / out if isinstance(out, str) else out
    return ["prepare", "--input", *inputs, "--tokenizer", W(c, "tok"), "--seq-len", "32", "--doc-per", "line",
            "--workers", "1", "--out", out, *extra]


def _part(c, name, change):
    d = cp(c, name)
    change(d)
    return d


def _meta(d: Path, change):
    edit_json(d / "meta.json", change)
    return d


def _shard_names(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*.npy"))


def prepare_cases() -> list[Case]:
    C = Case
    cases = [
        C("prep ok", lambda c: prep(c, W(c, "corpus")), "ok"),
        C("prep ok jsonl.gz", lambda c: prep(c, W(c, "c.jsonl.gz")), "ok"),
        C("prep ok zst", lambda c: prep(c, W(c, "c.txt.zst")), "ok"),
        C("prep ok parquet", lambda c: prep(c, W(c, "c.parquet")), "ok"),
        C("prep ok arrow", lambda c: prep(c, W(c, "arrow")), "ok"),
        C("prep ok glob", lambda c: prep(c, f"{W(c, 'corpus')}/*.txt"), "ok"),
        C("prep ok shard 1/3", lambda c: prep(c, W(c, "corpus"), extra=["--shard", "1/3"]), "any"),
        C("prep ok hf tokenizer dir", lambda c: [*prep(c, W(c, "corpus"))[:4], W(c, "hf"), *prep(c, W(c, "corpus"))[5:]],
          "ok"),
        C("prep ok merge", lambda c: ["prepare", "--merge", c.dir / "m", W(c, "part0"), W(c, "part1")], "ok"),
        C("prep out is a user folder with train/ --overwrite",
          lambda c: prep(c, W(c, "corpus"), out=mine(c, subdirs=["train"]), extra=["--overwrite"])),
        C("prep out is a user folder with val/ --overwrite",
          lambda c: prep(c, W(c, "corpus"), out=mine(c, subdirs=["val"]), extra=["--overwrite"])),
        C("prep out is a user folder", lambda c: prep(c, W(c, "corpus"), out=mine(c))),
        C("prep out holds data", lambda c: prep(c, W(c, "corpus"), out=cp(c, "data")), msg="--overwrite"),
        C("prep out holds data --overwrite", lambda c: prep(c, W(c, "corpus"), out=cp(c, "data"), extra=["--overwrite"]),
          "ok", mutable=["data"]),
        C("prep out is the input", lambda c: prep(c, cp(c, "corpus"), out="corpus", extra=["--overwrite"])),
        C("prep out is a file", lambda c: prep(c, W(c, "corpus"), out=text(c, "f", "x"))),
        C("prep out is a fifo", lambda c: prep(c, W(c, "corpus"), out=fifo(c)), timeout=LONG),
        C("prep out on a full disk", lambda c: prep(c, W(c, "corpus"), out=mount(c, "full", 16) / "d"), msg="(?i)no space"),
        C("prep out on a read-only disk", lambda c: prep(c, W(c, "corpus"), out=mount(c, "ro", ro=True) / "d")),
        C("prep tokenizer missing", lambda c: [*prep(c, W(c, "corpus"))[:4], c.dir / "no", *prep(c, W(c, "corpus"))[5:]]),
        C("prep tokenizer garbage json", lambda c: [*prep(c, W(c, "corpus"))[:4], text(c, "tokenizer.json", "{]"),
                                                    *prep(c, W(c, "corpus"))[5:]]),
        C("prep tokenizer json is a list", lambda c: [*prep(c, W(c, "corpus"))[:4], text(c, "tokenizer.json", "[]"),
                                                      *prep(c, W(c, "corpus"))[5:]]),
        C("prep truncated zst", lambda c: prep(c, text(c, "t.txt.zst", _half(zst(_corpus(c))))), msg=CUT,
          why="a truncated .zst was read as complete"),
        C("prep zst cut mid-frame header", lambda c: prep(c, text(c, "t.txt.zst", zst(b"alpha " * 999)[:6]))),
        C("prep garbage zst", lambda c: prep(c, text(c, "g.txt.zst", b"\x28\xb5\x2f\xfd" + b"\x00garbage" * 100))),
        C("prep empty zst", lambda c: prep(c, text(c, "e.txt.zst", b""))),
        C("prep truncated gz", lambda c: prep(c, text(c, "t.txt.gz", _half(gzip.compress(_corpus(c))))), msg=CUT),
        C("prep jsonl text is an object", lambda c: prep(c, text(c, "o.jsonl", '{"text": {"a": "alpha"}}\n' * 99)),
          why="a JSON object used as its Python repr"),
        C("prep jsonl text is a number", lambda c: prep(c, text(c, "n.jsonl", '{"text": 12}\n' * 99)), "any"),
        C("prep jsonl nested 100k deep", lambda c: prep(c, text(c, "d.jsonl", '{"text": "a"}\n' + "[" * 100000 +
                                                                "]" * 100000 + "\n"))),
        C("prep parquet text column of ints", lambda c: prep(c, _parquet(c, {"text": list(range(50))}))),
        C("prep parquet without the column", lambda c: prep(c, _parquet(c, {"body": ["alpha bravo"] * 50}))),
        C("prep parquet text column of lists", lambda c: prep(c, _parquet(c, {"text": [["alpha"]] * 50}))),
        C("prep arrow state.json odd types", lambda c: prep(c, _arrow(c, lambda s: s.update(_data_files=[{"filename": 7}])))),
        C("prep arrow state.json a list", lambda c: prep(c, _arrow(c, lambda s: [1]))),
        C("prep arrow state.json escaping", lambda c: prep(c, _arrow(c, lambda s: s.update(
            _data_files=[{"filename": "../../world/c.parquet"}])))),
        C("prep arrow data file missing", lambda c: prep(c, _arrow(c, None, drop=True))),
        C("prep recursive glob over a symlink loop", lambda c: prep(c, f"{loop_dir(c)}/**"), "any", timeout=LONG),
        C("prep only whitespace", lambda c: prep(c, text(c, "w.txt", " \n\t\n" * 100))),
        C("prep corpus shorter than a row", lambda c: prep(c, text(c, "s.txt", "alpha bravo\n"))),
        C("prep --text-field ''", lambda c: prep(c, W(c, "c.jsonl"), extra=["--text-field", ""])),
        C("prep --format jsonl on text", lambda c: prep(c, W(c, "corpus"), extra=["--format", "jsonl"])),
        C("prep --merge without parts", lambda c: ["prepare", "--merge", c.dir / "m"]),
        C("prep --merge part missing", lambda c: ["prepare", "--merge", c.dir / "m", W(c, "part0"), c.dir / "nope"]),
        C("prep --merge part twice", lambda c: ["prepare", "--merge", c.dir / "m", W(c, "part0"), W(c, "part0")]),
        C("prep --merge into a part", lambda c: ["prepare", "--merge", cp(c, "part0"), c.dir / "part0", W(c, "part1"),
                                                 "--overwrite"]),
        C("prep --merge into a user folder with train/ --overwrite",
          lambda c: ["prepare", "--merge", mine(c, subdirs=["train", "val"]), W(c, "part0"), W(c, "part1"), "--overwrite"]),
        C("prep --merge a part without a shard", lambda c: ["prepare", "--merge", c.dir / "m", W(c, "part0"),
                                                            _part(c, "part1", lambda d: _rm_first_shard(d))]),
        C("prep --merge a part without its tokenizer", lambda c: ["prepare", "--merge", c.dir / "m", W(c, "part0"),
                                                                  _part(c, "part1", lambda d: _rm_tokenizer(d))]),
        C("prep --merge a part whose shard name escapes with ../", lambda c: ["prepare", "--merge", c.dir / "m", W(c, "part0"),
                                                                  _part(c, "part1", _escape_shard)]),
        C("prep --merge a part with a wrongly typed meta field", lambda c: ["prepare", "--merge", c.dir / "m", W(c, "part0"),
                                                                            _part(c, "part1", _meta_lots)]),
        C("prep --merge a part whose meta.json is a list", lambda c: ["prepare", "--merge", c.dir / "m", W(c, "part0"),
                                                                      _part(c, "part1", lambda d: text(c, "part1/meta.json", "[]"))]),
        C("prep --merge a plain data dir with a part", lambda c: ["prepare", "--merge", c.dir / "m", W(c, "data"),
                                                                  W(c, "part1")]),
        C("prep --merge on a full disk", lambda c: ["prepare", "--merge", mount(c, "full", 8) / "m", W(c, "part0"),
                                                    _part(c, "part1", lambda d: _copy_shards(d))],
          msg="(?i)no space", bad="part1"),
        C("prep --merge with --input", lambda c: ["prepare", "--merge", c.dir / "m", W(c, "part0"), "--input", W(c, "corpus")]),
    ]
    bad = {"--seq-len": ["0", "-1", "2", "1000000000", "x"], "--val-fraction": ["-0.1", "1", "1.5", "nan", "inf"],
           "--workers": ["-1", "-1000"], "--seed": ["-1", "99999999999999999999"],
           "--shard": ["0/0", "2/2", "a/b", "-1/2", "0/2/3", "1/0"]}
    for opt, values in bad.items():
        for v in values:
            cases.append(C(f"prep {opt} {v}", lambda c, o=opt, v=v: prep(c, W(c, "corpus"), extra=[o, v])))
    return cases


def _parquet(c, columns) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), c.dir / "t.parquet")
    return c.dir / "t.parquet"


def _arrow(c, change, drop=False) -> Path:
    d = cp(c, "arrow")
    if change is not None:
        edit_json(d / "state.json", change)
    if drop:
        for p in d.glob("*.arrow"):
            p.unlink()
    return d


def _rm_first_shard(d: Path):
    next(iter(sorted((d / "train").glob("*.ids.npy")))).unlink()


def _rm_tokenizer(d: Path):
    for p in d.glob("tokenizer*"):
        p.unlink()


def _escape_shard(d: Path):
    edit_json(d / "meta.json", lambda m: m["splits"]["train"]["shards"].__setitem__(0, "../../../part0/train/shard_00000"))


def _meta_lots(d: Path):
    edit_json(d / "meta.json", lambda m: m.update(seq_len="lots"))


def _copy_shards(d: Path):
    pass  # the part as it is: its shards are linked or copied onto the full disk


def masks_cases() -> list[Case]:
    C = Case
    m = lambda c, *a: ["masks", W(c, "data"), *a]  # noqa: E731
    cases = [
        C("masks ok", lambda c: m(c), "ok"),
        C("masks ok word unit", lambda c: m(c, "masking.unit=word"), "ok"),
        C("masks ok json", lambda c: m(c, "--json", "--split", "val"), "ok"),
        C("masks data missing", lambda c: ["masks", c.dir / "nope"]),
        C("masks data is a user folder", lambda c: ["masks", mine(c)]),
        C("masks meta.json garbage", lambda c: ["masks", _meta_text(c, "{nope")]),
        C("masks meta.json null", lambda c: ["masks", _meta_text(c, "null")]),
        C("masks meta seq_len lots", lambda c: ["masks", _meta(cp(c, "data"), lambda d: d.update(seq_len="lots"))]),
        C("masks meta splits a list", lambda c: ["masks", _meta(cp(c, "data"), lambda d: d.update(splits=[]))]),
        C("masks shard missing", lambda c: ["masks", _part(c, "data", _rm_first_shard)]),
        C("masks shard truncated", lambda c: ["masks", _part(c, "data", _truncate_shard)]),
        C("masks token_counts garbage", lambda c: ["masks", _part(c, "data", lambda d: text(c, "data/token_counts.npy",
                                                                                           b"garbage")),
                                                   "masking.random_token_dist=unigram"]),
        C("masks token_counts pickled", lambda c: ["masks", _part(c, "data", _pickled_counts),
                                                   "masking.random_token_dist=unigram"]),
        C("masks --config missing file", lambda c: m(c, "--config", c.dir / "no.toml")),
        C("masks --config garbage toml", lambda c: m(c, "--config", text(c, "g.toml", "[masking\nrate=="))),
        C("masks --config base loop", lambda c: m(c, "--config", text(c, "a.toml", 'base = "a.toml"\n'))),
        C("masks --config unknown preset", lambda c: m(c, "--config", "nope-preset")),
        C("masks model section override", lambda c: m(c, "model.hidden=12"), "any"),
        C("masks unknown key", lambda c: m(c, "masking.nope=1"), msg="nope"),
        C("masks bad unit", lambda c: m(c, "masking.unit=sentence")),
        C("masks --split val on data without val", lambda c: ["masks", _part(c, "data", _no_val), "--split", "val"]),
    ]
    for opt, v in [("--rows", "-1"), ("--rows", "100000000"), ("--step", "-1"), ("--epoch", "-1"), ("--max-rows", "-1"),
                   ("--epoch", "99999999999999999999"), ("--step", "99999999999999999999")]:
        cases.append(C(f"masks {opt} {v}", lambda c, o=opt, v=v: m(c, o, v), "refuse" if v.startswith("-") else "any"))
    return cases


def _meta_text(c, body: str) -> Path:
    d = cp(c, "data")
    (d / "meta.json").write_text(body)
    return d


def _truncate_shard(d: Path):
    p = next(iter(sorted((d / "train").glob("*.ids.npy"))))
    p.write_bytes(p.read_bytes()[:200])


def _pickled_counts(d: Path):
    np.save(d / "token_counts.npy", np.array([{"a": 1}, 2], dtype=object), allow_pickle=True)


def _no_val(d: Path):
    edit_json(d / "meta.json", lambda m: m["splits"].pop("val", None))


def tr(c, *a, data=None, out="r"):
    return ["train", "--data", data or W(c, "data"), "--out", c.dir / out if isinstance(out, str) else out, *TRAIN, *a]


def _metrics_line(c, line: str) -> Path:
    run = cp(c, "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(line + "\n")
    return run


def _state_files(c, change) -> Path:
    run = cp(c, "run")
    edit_json(latest(run) / "state.json", lambda s: change(s))
    return run


def _probe(c, files: dict) -> str:
    """The override naming a probe task dir made of `files`."""
    d = c.dir / "task"
    d.mkdir()
    for k, v in files.items():
        (d / k).write_text(v)
    return f'eval.probe_tasks=["{d}"]'


def train_cases() -> list[Case]:
    C = Case
    rs = lambda c, run, *a: ["train", "--data", W(c, "data"), "--out", run, "--resume", *TRAIN, "train.max_steps=3", *a]  # noqa: E731
    ok_tokens = json.dumps({"tokens": ["alpha", "bravo"], "tags": ["B-A", "O"]})
    cases = [
        C("train ok", lambda c: tr(c), "ok"),
        C("train ok mixture", lambda c: ["train", "--data", W(c, "data"), "--data", W(c, "data2"), "--out", c.dir / "r",
                                         *TRAIN, "data.weights=[0.7,0.3]"], "ok"),
        C("train ok probe task", lambda c: tr(c, 'eval.probe_tasks=["%s"]' % W(c, "task"), "eval.every_steps=1"), "ok"),
        C("train ok resume", lambda c: rs(c, cp(c, "run")), "ok", mutable=["run"]),
        C("train out is a user folder", lambda c: tr(c, out=mine(c))),
        C("train out is a user folder with metrics.jsonl and command.txt",
          lambda c: tr(c, out=mine(c, files=("metrics.jsonl", "command.txt", "notes.txt")))),
        C("train out is a user folder --resume", lambda c: rs(c, mine(c, files=("metrics.jsonl", "command.txt")))),
        C("train out is the data", lambda c: tr(c, data=cp(c, "data"), out="data")),
        C("train out is a file", lambda c: tr(c, out=text(c, "f", "x"))),
        C("train out is a fifo", lambda c: tr(c, out=fifo(c)), timeout=LONG),
        C("train out on a full disk", lambda c: tr(c, out=mount(c, "full", 64) / "r"), msg="(?i)no space"),
        C("train out on a read-only disk", lambda c: tr(c, out=mount(c, "ro", ro=True) / "r")),
        C("train --resume without a run", lambda c: rs(c, c.dir / "nope"), "any"),  # resume-or-start, for requeued jobs
        C("train --resume metrics.jsonl garbage line", lambda c: rs(c, _metrics_line(c, "{not json")), "any",
          mutable=["run"]),
        C("train --resume metrics.jsonl wrongly typed line", lambda c: rs(c, _metrics_line(c, '{"step": "x", "loss": []}')),
          "any", mutable=["run"]),
        C("train --resume metrics.jsonl a list line", lambda c: rs(c, _metrics_line(c, "[1, 2]")), "any", mutable=["run"]),
        C("train --resume state.json malformed file record",
          lambda c: rs(c, _state_files(c, lambda s: s.update(files={"model.safetensors": 7}))), "any", mutable=["run"]),
        C("train --resume state.json record of wrong types", lambda c: rs(c, _state_files(c, lambda s: s["files"].update(
            {"model.safetensors": {"bytes": "x", "sha256": 1}}))), "any", mutable=["run"]),
        C("train --resume state.json files a list", lambda c: rs(c, _state_files(c, lambda s: s.update(files=[1]))), "any",
          mutable=["run"]),
        C("train --resume state.json record escapes", lambda c: rs(c, _state_files(
            c, lambda s: s["files"].update({"../../../escape": s["files"].get("model.safetensors")}))), "any",
          mutable=["run"]),
        C("train --resume latest names a missing checkpoint", lambda c: rs(c, _latest(c, "step_9999999")), "any",
          mutable=["run"]),
        C("train --resume latest escapes", lambda c: rs(c, _latest(c, "../../../../etc")), "any", mutable=["run"]),
        C("train --resume truncated weights", lambda c: rs(c, _trunc_weights(c)), "any", mutable=["run"]),
        C("train --resume config.json null", lambda c: rs(c, _run_config(c, "null")), "any", mutable=["run"]),
        C("train --config missing file", lambda c: [*tr(c)[:4], "--config", c.dir / "no.toml", *TRAIN[2:]]),
        C("train --config garbage toml", lambda c: [*tr(c)[:4], "--config", text(c, "g.toml", "[model\n"), *TRAIN[2:]]),
        C("train --config toml with a list section", lambda c: [*tr(c)[:4], "--config", text(c, "g.toml", "model = [1]\n"),
                                                               *TRAIN[2:]]),
        C("train --init-from a user folder", lambda c: tr(c, "--init-from", mine(c))),
        C("train --init-from ft", lambda c: tr(c, "--init-from", W(c, "ft")), "ok"),
        C("train data meta seq_len lots", lambda c: tr(c, data=_meta(cp(c, "data"), lambda d: d.update(seq_len="lots")))),
        C("train data meta vocab_size -5", lambda c: tr(c, data=_meta(cp(c, "data"), lambda d: d.update(vocab_size=-5)))),
        C("train data shard missing", lambda c: tr(c, data=_part(c, "data", _rm_first_shard))),
        C("train data shard truncated", lambda c: tr(c, data=_part(c, "data", _truncate_shard))),
        C("train data token_counts garbage", lambda c: tr(c, "masking.random_token_dist=unigram", data=_part(
            c, "data", lambda d: text(c, "data/token_counts.npy", b"\x93NUMPY garbage")))),
        C("train data token_counts pickled", lambda c: tr(c, "masking.random_token_dist=unigram",
                                                          data=_part(c, "data", _pickled_counts))),
        C("train data.weights [1e308,1e308]", lambda c: ["train", "--data", W(c, "data"), "--data", W(c, "data2"), "--out",
                                                          c.dir / "r", *TRAIN, "data.weights=[1e308,1e308]"],
          "any", bad=r"\[0\.0, 0\.0\]"),
        C("train data.weights [-1,1]", lambda c: ["train", "--data", W(c, "data"), "--data", W(c, "data2"), "--out",
                                                  c.dir / "r", *TRAIN, "data.weights=[-1,1]"]),
        C("train data.weights 3 for 2 sources", lambda c: ["train", "--data", W(c, "data"), "--data", W(c, "data2"), "--out",
                                                           c.dir / "r", *TRAIN, "data.weights=[1,1,1]"]),
        C("train data.weights one [nan]", lambda c: tr(c, "data.weights=[nan]")),
        C("train probe task missing", lambda c: tr(c, 'eval.probe_tasks=["%s"]' % (c.dir / "no"), "eval.every_steps=1")),
        C("train probe tokens task with empty tags", lambda c: tr(c, _probe(c, {
            "train.jsonl": ok_tokens + "\n" + json.dumps({"tokens": [], "tags": []}) + "\n",
            "eval.jsonl": ok_tokens + "\n", "task.json": '{"task": "tokens"}'}), "eval.every_steps=1"), "any"),
        C("train probe tokens task with only empty eval sentences", lambda c: tr(c, _probe(c, {
            "train.jsonl": ok_tokens + "\n", "eval.jsonl": json.dumps({"tokens": [], "tags": []}) + "\n",
            "task.json": '{"task": "tokens"}'}), "eval.every_steps=1")),
        C("train probe task.json a list", lambda c: tr(c, _probe(c, {
            "train.csv": "text,label\na,x\nb,y\n", "eval.csv": "text,label\na,x\n", "task.json": "[]"}))),
        C("train probe task.json bad task", lambda c: tr(c, _probe(c, {
            "train.csv": "text,label\na,x\nb,y\n", "eval.csv": "text,label\na,x\n", "task.json": '{"task": 7}'}))),
        C("train probe task with a null label", lambda c: tr(c, _probe(c, {
            "train.jsonl": '{"text": "a", "label": null}\n{"text": "b", "label": "y"}\n',
            "eval.jsonl": '{"text": "a", "label": "y"}\n'})), bad="has no column"),
        C("train unknown key", lambda c: tr(c, "optim.nope=1"), msg="nope"),
        C("train override without =", lambda c: tr(c, "optim.lr")),
        C("train two --out", lambda c: [*tr(c), "--out", c.dir / "r2"], "any"),
    ]
    cases += numeric_cases()
    return cases


def _latest(c, name: str) -> Path:
    run = cp(c, "run")
    (run / "checkpoints" / "latest").write_text(name + "\n")
    return run


def _trunc_weights(c) -> Path:
    run = cp(c, "run")
    p = latest(run) / "model.safetensors"
    p.write_bytes(p.read_bytes()[:1000])
    return run


def _run_config(c, body: str) -> Path:
    run = cp(c, "run")
    (run / "config.json").write_text(body)
    return run


SKIP_BIG = {"train.max_steps", "train.max_tokens", "train.max_minutes", "train.dist_timeout_minutes"}


def numeric_cases() -> list[Case]:
    """Every int and float setting of every section, out of range: refused before anything is written, or run."""
    from maskedlm.config import Config

    cases = []
    sections = get_type_hints(Config)
    for section in fields(Config):
        hints = get_type_hints(sections[section.name])
        for f in fields(sections[section.name]):
            typ = hints[f.name]
            if typ not in (int, float):
                continue
            key = f"{section.name}.{f.name}"
            values = ["-1", "nan"] if typ is float else ["-1", "99999999999999999999"]
            if typ is float and key not in SKIP_BIG:
                values.append("1e308")
            if typ is int and key in SKIP_BIG:
                values.remove("99999999999999999999")
            for v in values:
                cases.append(Case(f"train {key}={v}", lambda c, k=key, v=v: tr(c, f"{k}={v}"), "any", timeout=240))
    return cases


_ = WORDS
