"""Campaign cases for the commands that read a MODEL or a run: eval, report, fill, explain, score, finetune (classify,
regress, tokens, probe), export, import, demo, and the command line itself."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

from hostile_cases import FT, Case, W, cp, edit_json, fifo, latest, mine, mount, no_text, text
from hostile_cases_data import LONG, _metrics_line, _run_config, _state_files


def eval_cases() -> list[Case]:
    C = Case
    ev = lambda c, model, *a: ["eval", model, "--data", W(c, "data"), *a]  # noqa: E731
    return [
        C("eval ok", lambda c: ev(c, W(c, "run")), "ok"),
        C("eval ok hf dir", lambda c: ev(c, W(c, "hf")), "ok"),
        C("eval ok two sources", lambda c: [*ev(c, W(c, "run")), "--data", W(c, "data2")], "ok"),
        C("eval model missing", lambda c: ev(c, c.dir / "nope")),
        C("eval model is a user folder", lambda c: ev(c, mine(c))),
        C("eval model is a data dir", lambda c: ev(c, W(c, "data"))),
        C("eval model is ft", lambda c: ev(c, W(c, "ft"))),
        C("eval state.json malformed file record", lambda c: ev(c, _state_files(c, lambda s: s.update(
            files={"model.safetensors": 7}))), "any"),
        C("eval state.json record of wrong types", lambda c: ev(c, _state_files(c, lambda s: s["files"].update(
            {"model.safetensors": {"bytes": "x", "sha256": 1}}))), "any"),
        C("eval state.json files a list", lambda c: ev(c, _state_files(c, lambda s: s.update(files=[1]))), "any"),
        C("eval run config.json null", lambda c: ev(c, _run_config(c, "null")), "any"),
        C("eval run config.json a string", lambda c: ev(c, _run_config(c, '"modern-mini"')), "any",
          bad="neither a TOML"),
        C("eval run config.json []", lambda c: ev(c, _run_config(c, "[]")), "any", bad="neither a TOML"),
        C("eval checkpoint dir with config.json garbage", lambda c: ev(c, _ck_config(c, "{")), "any"),
        C("eval data of another tokenizer", lambda c: ["eval", W(c, "run"), "--data", _other_data(c)], "any"),
        C("eval eval.mask_rate=2", lambda c: ev(c, W(c, "run"), "eval.mask_rate=2")),
        C("eval eval.seed=-1", lambda c: ev(c, W(c, "run"), "eval.seed=-1")),
        C("eval eval.micro_batch_rows=0", lambda c: ev(c, W(c, "run"), "eval.micro_batch_rows=0")),
        C("eval train key override", lambda c: ev(c, W(c, "run"), "train.seed=3"), "any"),
        C("eval split all", lambda c: ev(c, W(c, "run"), "--split", "all"), "ok"),
    ]


def _ck_config(c, body: str) -> Path:
    run = cp(c, "run")
    ck = latest(run)
    (ck / "config.json").write_text(body)
    return ck


def _other_data(c) -> Path:
    d = cp(c, "data")
    edit_json(d / "meta.json", lambda m: m.update(vocab_size=m["vocab_size"] + 50))
    return d


def _pngs(c) -> Path:
    d = mine(c, "pngs", files=("loss.png", "lr.png", "eval_loss.png", "throughput.png", "grad_norm.png", "notes.txt"))
    return d


def report_cases() -> list[Case]:
    C = Case
    rp = lambda c, *a, out="report.html": ["report", *a, "--out", c.dir / out if isinstance(out, str) else out]  # noqa: E731
    return [
        C("report ok", lambda c: rp(c, W(c, "run_eval")), "ok"),
        C("report ok two runs", lambda c: rp(c, W(c, "run_eval"), W(c, "run")), "ok"),
        C("report ok with --data", lambda c: rp(c, W(c, "run"), "--data", W(c, "data")), "ok"),
        C("report ok --png new dir", lambda c: rp(c, W(c, "run_eval"), "--png", c.dir / "pngs"), "ok"),
        C("report of a run without evaluation shows no nan", lambda c: rp(c, W(c, "run")), "ok",
          check=no_text(">nan<", "report.html")),
        C("report --png into a user folder of PNGs", lambda c: rp(c, W(c, "run_eval"), "--png", _pngs(c))),
        C("report --png the run dir", lambda c: rp(c, cp(c, "run_eval"), "--png", c.dir / "run_eval")),
        C("report --png inside the run dir", lambda c: rp(c, cp(c, "run_eval"), "--png", c.dir / "run_eval" / "figs")),
        C("report --png is a file", lambda c: rp(c, W(c, "run_eval"), "--png", text(c, "f", "x"))),
        C("report --png on a full disk", lambda c: rp(c, W(c, "run_eval"), "--png", mount(c, "full") / "p"),
          msg="(?i)no space"),
        C("report --out a fifo", lambda c: rp(c, W(c, "run_eval"), out=fifo(c)), timeout=LONG),
        C("report --out a directory", lambda c: rp(c, W(c, "run_eval"), out=mine(c))),
        C("report --out the run dir", lambda c: rp(c, cp(c, "run_eval"), out="run_eval")),
        C("report --out inside the run dir", lambda c: rp(c, cp(c, "run_eval"), out="run_eval/report.html"), "ok",
          mutable=["run_eval/report.html"]),
        C("report --out the run's metrics.jsonl", lambda c: rp(c, cp(c, "run_eval"), out="run_eval/metrics.jsonl")),
        C("report --out under a file", lambda c: rp(c, W(c, "run_eval"), out=text(c, "f", "x") / "r.html")),
        C("report --out on a full disk", lambda c: rp(c, W(c, "run_eval"), out=mount(c, "full") / "r.html"),
          msg="(?i)no space"),
        C("report --out on a read-only disk", lambda c: rp(c, W(c, "run_eval"), out=mount(c, "ro", ro=True) / "r.html")),
        C("report run missing", lambda c: rp(c, c.dir / "nope")),
        C("report run is a user folder", lambda c: rp(c, mine(c))),
        C("report run is an export", lambda c: rp(c, W(c, "hf"))),
        C("report metrics.jsonl garbage line", lambda c: rp(c, _metrics_line(c, "{not json")), "any"),
        C("report metrics.jsonl wrongly typed line", lambda c: rp(c, _metrics_line(c, '{"step": "x", "loss": []}')), "any"),
        C("report metrics.jsonl a list line", lambda c: rp(c, _metrics_line(c, "[1, 2]")), "any"),
        C("report metrics.jsonl a number line", lambda c: rp(c, _metrics_line(c, "7")), "any"),
        C("report metrics.jsonl loss nan/inf", lambda c: rp(c, _metrics_line(c, '{"step": 9, "tokens": 1, "loss": NaN}')),
          "any"),
        C("report config.json a bare string", lambda c: rp(c, _run_config(c, '"tiny"')),
          why="a report of some preset's config"),
        C("report config.json null", lambda c: rp(c, _run_config(c, "null")), why="a report of some preset's config"),
        C("report config.json []", lambda c: rp(c, _run_config(c, "[]")), bad="neither a TOML"),
        C("report config.json garbage", lambda c: rp(c, _run_config(c, "{")), "any"),
        C("report --data of another tokenizer", lambda c: rp(c, W(c, "run"), "--data", _other_data(c)), "any"),
        C("report --data missing", lambda c: rp(c, W(c, "run"), "--data", c.dir / "no")),
        C("report same run twice", lambda c: rp(c, W(c, "run"), W(c, "run")), "any"),
    ]


def inference_cases() -> list[Case]:
    C = Case
    r = lambda c: W(c, "run")  # noqa: E731
    cases = [
        C("fill ok", lambda c: ["fill", r(c), "golf golf [MASK] golf"], "ok"),
        C("fill ok hf", lambda c: ["fill", W(c, "hf"), "golf golf [MASK] golf", "--json"], "ok"),
        C("fill ok stdin", lambda c: ["fill", r(c), "-"], "ok", stdin="golf [MASK] golf"),
        C("fill no [MASK]", lambda c: ["fill", r(c), "golf golf"]),
        C("fill empty text", lambda c: ["fill", r(c), ""]),
        C("fill empty stdin", lambda c: ["fill", r(c), "-"], stdin=""),
        C("fill 1000 masks", lambda c: ["fill", r(c), " ".join(["[MASK]"] * 1000)], "any"),
        C("fill text longer than the model", lambda c: ["fill", r(c), "golf " * 2000 + "[MASK]"], "any"),
        C("fill --top-k 0", lambda c: ["fill", r(c), "golf [MASK]", "--top-k", "0"]),
        C("fill --top-k -1", lambda c: ["fill", r(c), "golf [MASK]", "--top-k", "-1"]),
        C("fill --top-k 1e9", lambda c: ["fill", r(c), "golf [MASK]", "--top-k", "1000000000"], "any"),
        C("fill model is ft", lambda c: ["fill", W(c, "ft"), "golf [MASK]"]),
        C("fill model is ft/best", lambda c: ["fill", W(c, "ft") / "best", "golf [MASK]"]),
        C("fill after import of ft/best", lambda c: [["import", W(c, "ft") / "best", "--out", c.dir / "imp"],
                                                     ["fill", c.dir / "imp", "golf [MASK]"]],
          why="import of a fine-tuned model, then fill from a made-up MLM head"),
        C("fill model is a tokenizer dir", lambda c: ["fill", W(c, "tok"), "golf [MASK]"]),
        C("fill model is a file", lambda c: ["fill", W(c, "c.jsonl"), "golf [MASK]"]),
        C("fill model is a fifo", lambda c: ["fill", fifo(c), "golf [MASK]"], timeout=LONG),
        C("fill checkpoint weights truncated", lambda c: ["fill", _trunc(c), "golf [MASK]"], "any"),
        C("fill state.json malformed", lambda c: ["fill", _state_files(c, lambda s: s.update(files={"x": [1]})),
                                                  "golf [MASK]"], "any"),
        C("explain ok", lambda c: ["explain", r(c), "golf golf golf", "--mask", "golf"], "ok"),
        C("explain --mask a word not there", lambda c: ["explain", r(c), "golf golf", "--mask", "zulu"]),
        C("explain --mask index -1", lambda c: ["explain", r(c), "golf golf", "--mask", "-1"]),
        C("explain --mask index 1000", lambda c: ["explain", r(c), "golf golf", "--mask", "1000"]),
        C("explain --mask index 0 ([CLS])", lambda c: ["explain", r(c), "golf golf", "--mask", "0"], "any"),
        C("explain --seed -1", lambda c: ["explain", r(c), "golf golf", "--mask", "golf", "--seed", "-1"]),
        C("explain --seed 2^64", lambda c: ["explain", r(c), "golf golf", "--mask", "golf", "--seed",
                                            "18446744073709551616"]),
        C("explain empty text", lambda c: ["explain", r(c), "", "--mask", "golf"]),
        C("explain model is ft", lambda c: ["explain", W(c, "ft"), "golf golf", "--mask", "golf"]),
        C("score ok", lambda c: ["score", r(c), "golf golf golf"], "ok"),
        C("score empty text", lambda c: ["score", r(c), ""]),
        C("score only spaces", lambda c: ["score", r(c), "   "]),
        C("score text longer than the model", lambda c: ["score", r(c), "golf " * 3000], "any", timeout=240),
        C("score model is ft", lambda c: ["score", W(c, "ft"), "golf golf"]),
        C("score model is data", lambda c: ["score", W(c, "data"), "golf golf"]),
    ]
    return cases


def _trunc(c) -> Path:
    run = cp(c, "run")
    p = latest(run) / "model.safetensors"
    p.write_bytes(p.read_bytes()[:500])
    return run


def ft(c, *a, train="cls_train.csv", ev="cls_eval.csv", out="ft2", model=None, task=None):
    train = W(c, train) if isinstance(train, str) else train
    ev = W(c, ev) if isinstance(ev, str) else ev
    return ["finetune", model or W(c, "run"), "--train", train, "--eval", ev, "--out",
            c.dir / out if isinstance(out, str) else out, *(["--task", task] if task else []), *FT, *a]


def _rows(c, name, header, rows) -> Path:
    return text(c, name, header + "\n" + "".join(r + "\n" for r in rows))


def finetune_cases() -> list[Case]:
    C = Case
    two = ["alpha alpha,a", "bravo bravo,b"] * 10
    big = "x" * (200 * 1024)
    tok_ok = json.dumps({"tokens": ["alpha", "bravo"], "tags": ["B-A", "O"]})
    cases = [
        C("ft ok classify", lambda c: ft(c), "ok"),
        C("ft ok regress", lambda c: ft(c, train="reg_train.csv", ev="reg_eval.csv", task="regress"), "ok"),
        C("ft ok tokens", lambda c: ft(c, train="tok_train.jsonl", ev="tok_eval.jsonl", task="tokens"), "ok"),
        C("ft ok probe", lambda c: ft(c, "--probe"), "ok"),
        C("ft ok probe regress", lambda c: ft(c, "--probe", train="reg_train.csv", ev="reg_eval.csv", task="regress"), "ok"),
        C("ft ok from ft", lambda c: ft(c, model=W(c, "ft")), "ok"),
        C("ft ok test without labels", lambda c: ft(c, "--test", _rows(c, "t.csv", "text", ["alpha", "bravo"])), "ok"),
        C("ft --seeds 0", lambda c: ft(c, "--seeds", "0")),
        C("ft --seeds -1", lambda c: ft(c, "--seeds", "-1")),
        C("ft --seeds 1000", lambda c: ft(c, "--seeds", "1000"), why="1000 seeds accepted"),
        C("ft finetune.seed=-1", lambda c: ft(c, "finetune.seed=-1"), why="a negative seed accepted"),
        C("ft finetune.seed 20 digits", lambda c: ft(c, "finetune.seed=99999999999999999999")),
        C("ft finetune.lr=inf", lambda c: ft(c, "finetune.lr=inf")),
        C("ft finetune.lr=nan", lambda c: ft(c, "finetune.lr=nan")),
        C("ft finetune.lr=1e30", lambda c: ft(c, "finetune.lr=1e30")),
        C("ft finetune.weight_decay=inf", lambda c: ft(c, "finetune.weight_decay=inf")),
        C("ft finetune.dropout=1", lambda c: ft(c, "finetune.dropout=1")),
        C("ft finetune.max_len=2", lambda c: ft(c, "finetune.max_len=2")),
        C("ft finetune.max_len=1e9", lambda c: ft(c, "finetune.max_len=1000000000"), "any"),
        C("ft finetune.precision=fp8", lambda c: ft(c, "finetune.precision=fp8")),
        C("ft finetune.nope=1", lambda c: ft(c, "finetune.nope=1"), msg="nope"),
        C("ft train missing", lambda c: ft(c, train=c.dir / "no.csv"), msg="does not exist"),
        C("ft train is a directory", lambda c: ft(c, train=mine(c)), bad="does not exist"),
        C("ft train is a fifo", lambda c: ft(c, train=fifo(c, "p.csv")), bad="does not exist", timeout=LONG),
        C("ft train empty", lambda c: ft(c, train=text(c, "e.csv", ""))),
        C("ft train header only", lambda c: ft(c, train=text(c, "h.csv", "text,label\n"))),
        C("ft train one class", lambda c: ft(c, train=_rows(c, "o.csv", "text,label", ["alpha,a"] * 9))),
        C("ft eval label train never has", lambda c: ft(c, ev=_rows(c, "e.csv", "text,label", ["alpha,zzz"]))),
        C("ft CSV duplicate column names (two classes in each)", lambda c: ft(c, train=_rows(
            c, "d.csv", "text,label,label", ["alpha alpha,a,b", "bravo bravo,b,a"] * 10)),
          why="two columns of one name: trained on the last"),
        C("ft CSV cell over 128 KiB", lambda c: ft(c, train=_rows(c, "b.csv", "text,label", [big + ",a", *two])), "ok"),
        C("ft CSV ragged row", lambda c: ft(c, train=_rows(c, "r.csv", "text,label", ["alpha,a,extra", *two])), "any"),
        C("ft TSV with quotes", lambda c: ft(c, train=_rows(c, "q.tsv", "text\tlabel", ['"al\tpha"\ta', "b\tb"] * 5)),
          "any"),
        C("ft jsonl null label", lambda c: ft(c, train=text(c, "n.jsonl", '{"text": "a", "label": null}\n' +
                                                            '{"text": "b", "label": "y"}\n' * 5)),
          bad="has no column"),
        C("ft jsonl null text", lambda c: ft(c, train=text(c, "n.jsonl", '{"text": null, "label": "x"}\n' +
                                                           '{"text": "b", "label": "y"}\n' * 5)), bad="has no column"),
        C("ft jsonl texts are objects (labels a and b)", lambda c: ft(c, train=text(
            c, "o.jsonl", '{"text": {"w": "alpha"}, "label": "a"}\n{"text": {"w": "bravo"}, "label": "b"}\n' * 5)),
          why="a JSON object used as its Python repr"),
        C("ft jsonl a label is a list (labels a and b)", lambda c: ft(c, train=text(
            c, "l.jsonl", '{"text": "alpha", "label": ["a"]}\n{"text": "alpha", "label": "a"}\n'
            '{"text": "bravo", "label": "b"}\n' * 5)), why="a JSON list used as its Python repr"),
        C("ft jsonl nested 100k deep", lambda c: ft(c, train=text(c, "d.jsonl", '{"text": "a", "label": "x"}\n' +
                                                                  "[" * 100000 + "]" * 100000 + "\n"))),
        C("ft jsonl lines not objects", lambda c: ft(c, train=text(c, "n.jsonl", "[1]\n[2]\n"))),
        C("ft regress targets ±1e300", lambda c: ft(c, train=_rows(c, "r.csv", "text,label", [
            "alpha,1e300", "bravo,-1e300"] * 5), ev="reg_eval.csv", task="regress")),
        C("ft regress target nan", lambda c: ft(c, train=_rows(c, "r.csv", "text,label", ["alpha,nan", "bravo,1"] * 5),
                                                ev="reg_eval.csv", task="regress")),
        C("ft regress target inf", lambda c: ft(c, train=_rows(c, "r.csv", "text,label", ["alpha,inf", "bravo,1"] * 5),
                                                ev="reg_eval.csv", task="regress")),
        C("ft regress target text", lambda c: ft(c, train=_rows(c, "r.csv", "text,label", ["alpha,x", "bravo,1"] * 5),
                                                 ev="reg_eval.csv", task="regress")),
        C("ft tokens empty tag lists", lambda c: ft(c, train=text(c, "t.jsonl", tok_ok + "\n" + json.dumps(
            {"tokens": [], "tags": []}) + "\n"), ev="tok_eval.jsonl", task="tokens"), "any"),
        C("ft tokens an empty example among good ones", lambda c: ft(c, train=text(c, "t.jsonl", W(
            c, "tok_train.jsonl").read_text() + json.dumps({"tokens": [], "tags": []}) + "\n"), ev="tok_eval.jsonl",
            task="tokens"), "any"),
        C("ft tokens only empty eval sentences", lambda c: ft(c, train="tok_train.jsonl", ev=text(c, "e.jsonl", json.dumps(
            {"tokens": [], "tags": []}) + "\n"), task="tokens")),
        C("ft tokens tags shorter than tokens", lambda c: ft(c, train=text(c, "t.jsonl", json.dumps(
            {"tokens": ["a", "b"], "tags": ["O"]}) + "\n" + tok_ok + "\n"), ev="tok_eval.jsonl", task="tokens")),
        C("ft tokens tags not strings", lambda c: ft(c, train=text(c, "t.jsonl", json.dumps(
            {"tokens": ["a", "b"], "tags": [1, {"x": 2}]}) + "\n" + tok_ok + "\n"), ev="tok_eval.jsonl", task="tokens")),
        C("ft tokens CSV", lambda c: ft(c, task="tokens"), "any"),
        C("ft out is a user folder", lambda c: ft(c, out=mine(c))),
        C("ft out is a user folder --overwrite", lambda c: ft(c, "--overwrite", out=mine(c))),
        C("ft out is the model", lambda c: ft(c, "--overwrite", model=cp(c, "run"), out="run")),
        C("ft out holds ft", lambda c: ft(c, out=cp(c, "ft")), msg="--overwrite"),
        C("ft out holds ft --overwrite", lambda c: ft(c, "--overwrite", out=cp(c, "ft")), "ok", mutable=["ft"]),
        C("ft out is a file", lambda c: ft(c, out=text(c, "f", "x"))),
        C("ft out on a read-only disk", lambda c: ft(c, out=mount(c, "ro", ro=True) / "ft")),
        C("ft out on a full disk", lambda c: ft(c, out=mount(c, "full", 64) / "ft"), msg="(?i)no space"),
        C("ft probe out on a full disk", lambda c: ft(c, "--probe", out=mount(c, "full") / "ft"), msg="(?i)no space"),
        C("ft model is a user folder", lambda c: ft(c, model=mine(c))),
        C("ft model is data", lambda c: ft(c, model=W(c, "data"))),
    ]
    have = {c.name for c in cases}
    return cases + [c for c in _finetune_numeric() if c.name not in have]


def _finetune_numeric() -> list[Case]:
    from maskedlm.tasks.config import FinetuneConfig

    hints = get_type_hints(FinetuneConfig)
    cases = []
    for f in fields(FinetuneConfig):
        typ = hints[f.name]
        if typ not in (int, float):
            continue
        values = ["-1", "nan", "1e308"] if typ is float else ["-1", "99999999999999999999"]
        if f.name in ("max_steps", "epochs", "seed"):
            values = ["-1"]
        for v in values:
            cases.append(Case(f"ft finetune.{f.name}={v}", lambda c, k=f.name, v=v: ft(c, f"finetune.{k}={v}"), "any",
                              timeout=240))
    return cases


def export_import_cases() -> list[Case]:
    C = Case
    ex = lambda c, model, out="hf2", *a: ["export", model, "--out", c.dir / out if isinstance(out, str) else out, *a]  # noqa: E731
    im = lambda c, src, out="imp", *a: ["import", src, "--out", c.dir / out if isinstance(out, str) else out, *a]  # noqa: E731
    return [
        C("export ok", lambda c: ex(c, W(c, "run")), "ok"),
        C("export ok hf", lambda c: ex(c, W(c, "hf")), "any"),
        C("export over an export --overwrite", lambda c: ex(c, W(c, "run"), cp(c, "hf"), "--overwrite"), "ok",
          mutable=["hf"]),
        C("export over a user folder --overwrite", lambda c: ex(c, W(c, "run"), mine(c), "--overwrite")),
        C("export out is the model", lambda c: ex(c, cp(c, "run"), "run", "--overwrite")),
        C("export ft", lambda c: ex(c, W(c, "ft"))),
        C("export data dir", lambda c: ex(c, W(c, "data"))),
        C("export truncated weights", lambda c: ex(c, _trunc(c)), "any"),
        C("export out on a full disk", lambda c: ex(c, W(c, "run"), mount(c, "full", 64) / "hf"), msg="(?i)no space"),
        C("export out on a read-only disk", lambda c: ex(c, W(c, "run"), mount(c, "ro", ro=True) / "hf")),
        C("export out is a fifo", lambda c: ex(c, W(c, "run"), fifo(c)), timeout=LONG),
        C("import ok", lambda c: im(c, W(c, "hf")), "ok"),
        C("import ft dir", lambda c: im(c, W(c, "ft")), "any"),
        C("import over a user folder --overwrite", lambda c: im(c, W(c, "hf"), mine(c), "--overwrite")),
        C("import config without hidden_size", lambda c: im(c, _hf(c, lambda d: d.pop("hidden_size")))),
        C("import config hidden_size 'big'", lambda c: im(c, _hf(c, lambda d: d.update(hidden_size="big")))),
        C("import config hidden_size -64", lambda c: im(c, _hf(c, lambda d: d.update(hidden_size=-64)))),
        C("import config hidden_size 64.5", lambda c: im(c, _hf(c, lambda d: d.update(hidden_size=64.5)))),
        C("import config num_hidden_layers null", lambda c: im(c, _hf(c, lambda d: d.update(num_hidden_layers=None)))),
        C("import config vocab_size 1e12", lambda c: im(c, _hf(c, lambda d: d.update(vocab_size=10**12)))),
        C("import config layer_norm_eps 'x'", lambda c: im(c, _hf(c, lambda d: d.update(layer_norm_eps="x")))),
        C("import config model_type gpt2", lambda c: im(c, _hf(c, lambda d: d.update(model_type="gpt2")))),
        C("import config.json a list", lambda c: im(c, _hf(c, lambda d: [1]))),
        C("import config.json missing", lambda c: im(c, _hf_rm(c, "config.json"))),
        C("import weights missing", lambda c: im(c, _hf_rm(c, "model.safetensors"))),
        C("import weights truncated", lambda c: im(c, _hf_trunc(c))),
        C("import tokenizer missing", lambda c: im(c, _hf_rm(c, "tokenizer.json", "vocab.txt", "tokenizer_config.json",
                                                          "special_tokens_map.json")), "any"),
        C("import pytorch_model.bin only", lambda c: im(c, _hf_bin(c)), msg="pytorch_model.bin|pickle"),
        C("import out on a full disk", lambda c: im(c, W(c, "hf"), mount(c, "full", 64) / "imp"), msg="(?i)no space"),
        C("import a user folder", lambda c: im(c, mine(c))),
    ]


def _hf(c, change) -> Path:
    d = cp(c, "hf")
    edit_json(d / "config.json", change)
    return d


def _hf_rm(c, *names) -> Path:
    d = cp(c, "hf")
    for n in names:
        if (d / n).exists():
            (d / n).unlink()
    return d


def _hf_trunc(c) -> Path:
    d = cp(c, "hf")
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:700])
    return d


def _hf_bin(c) -> Path:
    d = _hf_rm(c, "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a real pickle")
    return d


def demo_cli_cases() -> list[Case]:
    C = Case
    cases = [C(f"demo --minutes {v}", lambda c, v=v: ["demo", "--minutes", v, "--out", c.dir / "d"])
             for v in ["-1", "0", "nan", "inf", "1e308", "x"]]
    cases += [
        C("demo --out a user folder", lambda c: ["demo", "--quick", "--out", mine(c)]),
        C("demo --out a file", lambda c: ["demo", "--quick", "--out", text(c, "f", "x")]),
        C("demo --out under a file", lambda c: ["demo", "--quick", "--out", text(c, "f", "x") / "d"]),
        C("no command", lambda c: []),
        C("unknown command", lambda c: ["frobnicate"]),
        C("--help", lambda c: ["--help"], "ok"),
        C("train --help", lambda c: ["train", "--help"], "ok"),
        C("tokenizer without action", lambda c: ["tokenizer"]),
        C("prepare without anything", lambda c: ["prepare"]),
    ]
    return cases
