"""`maskedlm finetune MODEL --suite SUITE.toml --out DIR`: several labelled tasks fine-tuned in turn, one table.

Reads the suite file (each task's files, kind, metric, settings), runs `finetune` per task into DIR/<name>/, and writes
DIR/suite.json and DIR/suite.md: each task's median over seeds and the suite's average, as GLUE is reported. It does
no training of its own; `maskedlm report DIR` prints the table again.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from maskedlm.config import tomllib
from maskedlm.errors import UserError
from maskedlm.files import atomic_write_text, building, check_out, replace_dir
from maskedlm.finetune import finetune  # suite → finetune, never back: finetune.py knows nothing of suites

MARKER = "suite.json"  # how --overwrite and `report` recognise a suite's DIR
METRICS = {"classify": ("accuracy", "macro_f1", "mcc"), "regress": ("pearson", "spearman", "mse"),
           "tokens": ("token_accuracy", "entity_f1", "entity_precision", "entity_recall")}  # as tasks/metrics.py names them
_TASK_KEYS = {"name", "train", "eval", "test", "task", "metric", "text_field", "text_pair_field", "label_field",
              "seeds", "overrides"}


@dataclass
class SuiteTask:
    """One task of a suite: its files (resolved against the suite file's folder) and what finetune is told."""

    name: str
    train: Path
    eval: Path
    test: Path | None
    task: str = "classify"
    metric: str | None = None  # None: the task's main metric (accuracy, Spearman, entity F1)
    text_field: str | None = None
    text_pair_field: str | None = None
    label_field: str | None = None
    seeds: int | None = None
    overrides: list[str] = field(default_factory=list)


def _strings(v, where: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise UserError(f"{where}: overrides must be a list of strings like \"finetune.max_steps=300\", got {v!r}")
    return v


def _task(raw, where: str, base: Path, defaults: dict) -> SuiteTask:
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a table ([[task]])")
    unknown = sorted(set(raw) - _TASK_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_TASK_KEYS))})")
    for key in ("name", "train", "eval"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise UserError(f"{where} needs {key} = \"...\"")
    if "/" in raw["name"] or raw["name"].startswith("."):
        raise UserError(f"{where}: name {raw['name']!r} must be a plain folder name")
    seeds = raw.get("seeds", defaults.get("seeds"))
    if seeds is not None and (not isinstance(seeds, int) or seeds < 1):
        raise UserError(f"{where}: seeds must be an integer >= 1, got {seeds!r}")
    kind, metric = raw.get("task", "classify"), raw.get("metric")
    if kind not in METRICS:
        raise UserError(f"{where}: task must be one of {', '.join(METRICS)}, got {kind!r}")
    if metric is not None and metric not in METRICS[kind]:
        raise UserError(f"{where}: metric must be one of {', '.join(METRICS[kind])} for {kind}, got {metric!r}")
    files = {k: (base / raw[k] if isinstance(raw.get(k), str) else None) for k in ("train", "eval", "test")}
    return SuiteTask(raw["name"], files["train"], files["eval"], files["test"], kind, metric, raw.get("text_field"),
                     raw.get("text_pair_field"), raw.get("label_field"), seeds,
                     [*_strings(defaults.get("overrides", []), "the suite"), *_strings(raw.get("overrides", []), where)])


def read_suite(path) -> list[SuiteTask]:
    """The tasks of a suite file: `[[task]]` tables, and optional top-level `seeds` and `overrides` for all of them."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"suite file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read the suite {path}: {e}") from None
    unknown = sorted(set(doc) - {"task", "seeds", "overrides"})
    if unknown:
        raise UserError(f"{path}: unknown top-level key {unknown[0]!r} (known: task, seeds, overrides)")
    raw = doc.get("task")
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{path} has no tasks: add [[task]] tables with name, train and eval")
    tasks = [_task(t, f"{path}: task {i + 1}", path.parent, doc) for i, t in enumerate(raw)]
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{path}: task name {twice[0]!r} is used twice; each task writes DIR/<name>/")
    return tasks


def _row(t: SuiteTask, result: dict) -> dict:
    """A task's line of the table: the chosen metric's median over seeds on eval and (when scored) test."""
    metric = t.metric if t.metric in result["eval"] else result["metric"]  # entity F1 exists for BIO tags only
    test = result["test"][metric] if result.get("test") else None
    return {"name": t.name, "task": t.task, "metric": metric, "eval": result["eval"][metric], "test": test,
            "seeds": len(result["seeds"]), "lr": result.get("lr"), "dir": t.name}


def table(rows: list[dict]) -> dict:
    """The suite's table: its rows and the average of each column over the tasks (test only when every task has it)."""
    avg = {"eval": statistics.fmean(r["eval"] for r in rows)}
    avg["test"] = statistics.fmean(r["test"] for r in rows) if all(r["test"] is not None for r in rows) else None
    return {"tasks": rows, "average": avg}


def markdown(tab: dict) -> str:
    def cell(v):
        return "–" if v is None else f"{v:.4f}"

    lines = ["| task | metric | eval (median) | test (median) | seeds | lr |", "|---|---|---:|---:|---:|---:|"]
    for r in tab["tasks"]:
        lr = "–" if r["lr"] is None else f"{r['lr']:g}"
        lines.append(f"| {r['name']} | {r['metric']} | {cell(r['eval'])} | {cell(r['test'])} | {r['seeds']} | {lr} |")
    avg = tab["average"]
    lines.append(f"| **average** | | {cell(avg['eval'])} | {cell(avg['test'])} | | |")
    return "\n".join(lines) + "\n"


def run_suite(model, suite, out, seeds: int = 1, overrides=(), overwrite: bool = False, device=None, log=print) -> dict:
    """Each task of `suite` through `finetune` into DIR/<name>/, then DIR/suite.json and DIR/suite.md; DIR is built
    beside its place and renamed in when every task is done, so a failed suite leaves what was there before."""
    tasks = read_suite(suite)
    inputs = [model, suite, *(f for t in tasks for f in (t.train, t.eval, t.test) if f is not None)]
    ours = lambda d: (d / MARKER).is_file()  # noqa: E731
    out = check_out(out, inputs=inputs, overwrite=overwrite, ours=ours, what="a suite output")
    rows = []
    with building(out, "suite") as tmp:
        for k, t in enumerate(tasks, 1):
            log(f"suite: task {k} of {len(tasks)}: {t.name} ({t.task}, {t.train.name})")
            result = finetune(model, t.train, t.eval, tmp / t.name, task=t.task, test=t.test, text_field=t.text_field,
                              pair_field=t.text_pair_field, label_field=t.label_field, seeds=t.seeds or seeds,
                              overrides=[*t.overrides, *overrides], device=device)
            rows.append(_row(t, result))
        tab = {"model": str(model), "suite": str(suite), **table(rows)}
        atomic_write_text(tmp / "suite.md", markdown(tab))
        atomic_write_text(tmp / MARKER, json.dumps(tab, indent=2) + "\n")
        check_out(out, inputs=inputs, overwrite=overwrite, ours=ours, what="a suite output")
        replace_dir(tmp, out)
    return {**tab, "out": str(out)}


def is_suite_dir(path) -> bool:
    return (Path(path) / MARKER).is_file()


def show_suite(path) -> str:
    """The Markdown table of a suite's DIR, rebuilt from its suite.json."""
    try:
        tab = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {Path(path) / MARKER}: {e}") from None
    return f"suite {tab.get('suite', '')} on {tab.get('model', '')}\n\n" + markdown(tab)
