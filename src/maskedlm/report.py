"""Run reports: one self-contained HTML page with the curves of one or more runs and the anatomy of the objective.

Reads run dirs (metrics.jsonl, config.json, command.txt, the latest checkpoint) and, for the anatomy, a data dir;
matplotlib draws every figure, inlined as SVG (the page opens offline: no script, font or image is fetched). Nothing
here trains or writes into a run dir.
"""

from __future__ import annotations

import html
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from maskedlm.checkpoint import read_latest_name
from maskedlm.config import flat_config, read_config_json
from maskedlm.data.shards import open_data_dir
from maskedlm.errors import UserError
from maskedlm.evaluate import score_positions
from maskedlm.files import atomic_write_text, building, check_out, check_out_file, replace_dir
from maskedlm.metrics import read_metrics
from maskedlm.models import check_compatible, load_any_model

CALIBRATION_BINS = 10  # equal-width confidence bins of the reliability diagram and the ECE (Guo et al. 2017 use 15)
POSITION_BINS = 8
TOP_CONFUSIONS = 15


@dataclass
class Run:
    path: Path
    label: str
    train: list[dict]  # metrics.jsonl training records, in step order
    evals: list[dict]  # its evaluation records
    config: dict  # config.json, flattened to dotted keys
    command: str = ""
    anatomy: dict = field(default_factory=dict)


def _warn(msg: str) -> None:
    print(f"maskedlm: warning: {msg}", file=sys.stderr)


def read_run(run_dir, label: str | None = None) -> Run:
    """A run dir's records and config; UserError (one line) when it is not a run dir."""
    p = Path(run_dir)
    if not (p / "metrics.jsonl").is_file() or not (p / "config.json").is_file():
        raise UserError(f"{p} is not a maskedlm run dir (no metrics.jsonl / config.json); give the --out of `maskedlm train`")
    cfg = read_config_json(p / "config.json")
    recs = read_metrics(p / "metrics.jsonl", warn=_warn)
    command = (p / "command.txt").read_text(errors="replace").strip() if (p / "command.txt").is_file() else ""
    return Run(path=p, label=label or p.name, train=[r for r in recs if r.get("kind", "train") == "train"],
               evals=[r for r in recs if r.get("kind") == "eval"], config=flat_config(cfg), command=command)


def smooth(values, window: int) -> np.ndarray:
    """Trailing moving average over `window` points (fewer at the start), so the curve never looks ahead."""
    x = np.asarray(values, dtype=np.float64)
    if window <= 1 or x.size == 0:
        return x
    c = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(1, x.size + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


# ------------------------------------------------------------------------------------------------ anatomy
def _latest_step(run_dir: Path) -> int | None:
    name = read_latest_name(run_dir / "checkpoints")
    return int(name.split("_")[-1]) if name else None


def _bucket_table(labels: list[str], which: np.ndarray, nll: np.ndarray, correct: np.ndarray) -> list[dict]:
    rows = []
    for i, name in enumerate(labels):
        sel = which == i
        n = int(sel.sum())
        if n:
            rows.append({"bucket": name, "positions": n, "loss": float(nll[sel].mean()),
                         "accuracy": float(correct[sel].mean())})
    return rows


def _frequency_buckets(gold: np.ndarray, counts: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Decades of the gold token's corpus count: 0, 1–9, 10–99, …"""
    c = counts[gold].astype(np.float64)
    which = np.where(c < 1, 0, np.floor(np.log10(np.maximum(c, 1))).astype(np.int64) + 1)
    top = int(which.max()) if which.size else 0
    labels = ["0"] + [f"{10 ** (d - 1):,}–{10 ** d - 1:,}" for d in range(1, top + 1)]
    return labels, which


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> tuple[list[dict], float]:
    """The reliability table (per confidence bin: mean confidence, accuracy, count) and the expected calibration
    error Σ_b (n_b / N) |accuracy_b − confidence_b|."""
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    table, ece, n = [], 0.0, max(len(confidence), 1)
    for b in range(bins):
        sel = which == b
        k = int(sel.sum())
        if k:
            acc, conf = float(correct[sel].mean()), float(confidence[sel].mean())
            table.append({"bin": f"{b / bins:.1f}–{(b + 1) / bins:.1f}", "positions": k, "confidence": conf, "accuracy": acc})
            ece += k / n * abs(acc - conf)
    return table, ece


def anatomy(run: Run, data, tokenizer_text=None) -> dict:
    """What the latest checkpoint of `run` gets right on `data`'s evaluation mask (its val split, else train): loss
    and accuracy by gold-token frequency, by position in the row, by word start vs sub-word; calibration; p(gold)."""
    d = open_data_dir(data)
    model, cfg, tok = load_any_model(run.path)
    check_compatible(cfg.model, tok, d)
    split = "val" if d.rows("val") > 0 else "train"
    store = d.open(split)
    s = score_positions(model, store, cfg.eval, d.special, d.vocab_size)  # its Σ −log p / n is `evaluate`'s loss
    nll = -np.log(np.maximum(s["p_gold"].astype(np.float64), np.finfo(np.float64).tiny))
    correct = (s["pred"] == s["gold"]).astype(np.float64)
    labels, which = _frequency_buckets(s["gold"], d.token_counts("the report's frequency anatomy"))
    edges = np.linspace(0, d.seq_len, POSITION_BINS + 1).astype(int)
    pos_labels = [f"{edges[i]}–{edges[i + 1] - 1}" for i in range(POSITION_BINS)]
    pos_which = np.searchsorted(edges, s["position"], side="right") - 1
    reliability, ece = calibration(s["confidence"].astype(np.float64), correct)
    wrong = s["pred"] != s["gold"]
    pairs, n_pairs = np.unique(np.stack([s["gold"][wrong], s["pred"][wrong]], axis=1), axis=0, return_counts=True) \
        if wrong.any() else (np.zeros((0, 2), np.int64), np.zeros(0, np.int64))
    order = np.argsort(-n_pairs, kind="stable")[:TOP_CONFUSIONS]
    text = (lambda i: tok.id_to_token(int(i)) or str(int(i))) if tok is not None else (lambda i: str(int(i)))
    return {
        "checkpoint_step": _latest_step(run.path), "data": str(d.path), "split": split, "positions": int(nll.size), "loss": float(nll.mean()),
        "accuracy": float(correct.mean()),
        "by_frequency": _bucket_table(labels, which, nll, correct),
        "by_position": _bucket_table(pos_labels, pos_which, nll, correct),
        "by_word_start": _bucket_table(["sub-word", "word start"], s["word_start"].astype(np.int64), nll, correct),
        "calibration": reliability, "ece": ece,
        "p_gold_histogram": np.histogram(s["p_gold"], bins=20, range=(0.0, 1.0))[0].tolist(),
        "confusions": [{"gold": text(pairs[i][0]), "predicted": text(pairs[i][1]), "count": int(n_pairs[i])} for i in order],
    }


# ------------------------------------------------------------------------------------------------ figures
def _plt():
    try:
        import matplotlib
    except ImportError:
        raise UserError("maskedlm report draws with matplotlib, a dependency of maskedlm that is missing here; "
                        "install it: pip install 'matplotlib>=3.7'") from None
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _curve(plt, runs: list[Run], key: str, x: str, title: str, ylabel: str, source: str = "train", raw: bool = False):
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    drawn = False
    for i, run in enumerate(runs):
        recs = [r for r in (run.train if source == "train" else run.evals) if key in r and x in r]
        if not recs:
            continue
        xs = np.array([r[x] for r in recs], dtype=np.float64)
        ys = np.array([r[key] if r[key] is not None else math.nan for r in recs], dtype=np.float64)
        color = f"C{i % 10}"
        if raw:  # the raw curve faint, the smoothed one on top
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
            ys = smooth(ys, max(1, len(ys) // 50))
        ax.plot(xs, ys, color=color, label=run.label, marker="o" if source == "eval" else None, markersize=3)
        skipped = [j for j, r in enumerate(recs) if r.get("skipped")]
        if skipped:
            ax.plot(xs[skipped], ys[skipped], "x", color="red", label=f"{run.label}: skipped steps")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_title(title)
    ax.set_xlabel({"tokens": "tokens", "elapsed_s": "wall time (s)", "step": "step"}[x])
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def curve_figures(plt, runs: list[Run]) -> list[tuple[str, str, object]]:
    """(id, caption, figure) of every curve that the runs' records have."""
    specs = [
        ("train-loss-tokens", "loss", "tokens", "training loss (raw faint, smoothed solid; red x: skipped steps)", "nats", "train", True),
        ("train-loss-time", "loss", "elapsed_s", "training loss against wall time", "nats", "train", True),
        ("eval-loss", "val_loss", "tokens", "evaluation loss at the fixed evaluation mask", "nats", "eval", False),
        ("eval-loss-time", "val_loss", "elapsed_s", "evaluation loss against wall time", "nats", "eval", False),
        ("eval-accuracy", "val_accuracy", "tokens", "evaluation top-1 accuracy at A(x)", "accuracy", "eval", False),
        ("lr", "lr", "tokens", "learning rate", "lr", "train", False),
        ("grad-norm", "grad_norm", "tokens", "gradient norm before clipping", "norm", "train", True),
        ("throughput", "tokens_per_s", "tokens", "throughput", "tokens/s", "train", True),
    ]
    out = []
    for fid, key, x, title, ylabel, source, raw in specs:
        fig = _curve(plt, runs, key, x, title, ylabel, source, raw)
        if fig is not None:
            out.append((fid, title, fig))
    return out


def _grouped(plt, runs: list[Run], table: str, title: str, xlabel: str):
    """Loss as bars (one per run in each bucket) and accuracy as points on a second axis, runs side by side."""
    names = []
    for r in runs:  # the union of the buckets the runs have, in order
        names += [row["bucket"] for row in r.anatomy[table] if row["bucket"] not in names]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax2 = ax.twinx()
    width = 0.8 / len(runs)
    x = np.arange(len(names))
    for i, r in enumerate(runs):
        rows = {row["bucket"]: row for row in r.anatomy[table]}
        off = x - 0.4 + width * (i + 0.5)
        ax.bar(off, [rows[n]["loss"] if n in rows else math.nan for n in names], width, color=f"C{i % 10}",
               alpha=0.6, label=f"{r.label}: loss")
        ax2.plot(off, [rows[n]["accuracy"] if n in rows else math.nan for n in names], "o", color=f"C{i % 10}",
                 markeredgecolor="black", label=f"{r.label}: accuracy")
    ax.set_xticks(x, names, fontsize=7)
    ax.set_ylabel("loss (nats), bars")
    ax2.set_ylabel("accuracy, points")
    ax2.set_ylim(0, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def anatomy_figures(plt, runs: list[Run]) -> list[tuple[str, str, object]]:
    """The anatomy of every run on shared axes: buckets, calibration, p(gold)."""
    out = [
        ("anatomy-frequency", "loss and accuracy by the gold token's corpus count",
         _grouped(plt, runs, "by_frequency", "by gold-token frequency", "corpus count of x_i")),
        ("anatomy-position", "loss and accuracy by position in the row",
         _grouped(plt, runs, "by_position", "by position", "position in the row")),
        ("anatomy-word-start", "loss and accuracy: word starts against sub-word pieces",
         _grouped(plt, runs, "by_word_start", "word start vs sub-word", "")),
    ]
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=0.8)
    for i, r in enumerate(runs):
        cal = r.anatomy["calibration"]
        ax.plot([c["confidence"] for c in cal], [c["accuracy"] for c in cal], "o-", color=f"C{i % 10}",
                label=f"{r.label} (ECE {r.anatomy['ece']:.3f})")
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(("anatomy-calibration", "calibration: top-1 confidence against accuracy", fig))
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    edges = np.linspace(0.0, 1.0, 21)
    for i, r in enumerate(runs):
        share = np.asarray(r.anatomy["p_gold_histogram"], dtype=np.float64) / max(r.anatomy["positions"], 1)
        ax.stairs(share, edges, color=f"C{i % 10}", linewidth=1.5, label=r.label)
    ax.set_xlabel("p(x_i | x̄)")
    ax.set_ylabel("share of positions")
    ax.set_title("histogram of p(gold)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(("anatomy-p-gold", "histogram of the probability given to the gold token", fig))
    return out


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: the SVG sits inside the HTML page


# ------------------------------------------------------------------------------------------------ the page
def _table(tid: str, rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return f'<table id="{tid}"><tr><td>(none)</td></tr></table>'
    columns = columns or list(dict.fromkeys(c for r in rows for c in r))  # every row's, in order: some lack some

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1e4 else f"{v:,.0f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, '–'))}</td>" for c in columns) + "</tr>" for r in rows)
    return f'<table id="{tid}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def final_numbers(run: Run) -> dict:
    """The last numbers of a run; what it never measured (no periodic evaluation, say) is left out, not NaN."""
    last = run.train[-1] if run.train else {}
    ev = run.evals[-1] if run.evals else {}
    got = {"train loss": last.get("loss"), "eval loss": ev.get("val_loss"), "eval accuracy": ev.get("val_accuracy"),
           "wall time (s)": last.get("elapsed_s")}
    return {"run": run.label, "step": last.get("step", 0), "tokens": last.get("tokens", 0),
            **{k: v for k, v in got.items() if v is not None},
            "skipped steps": sum(1 for r in run.train if r.get("skipped"))}


def config_differences(runs: list[Run]) -> list[dict]:
    keys = sorted({k for r in runs for k in r.config})
    if len(runs) > 1:
        keys = [k for k in keys if len({json.dumps(r.config.get(k)) for r in runs}) > 1]
    return [{"key": k, **{r.label: json.dumps(r.config.get(k)) for r in runs}} for k in keys]


PNG_MARKER = ".maskedlm-report-png"  # in a --png folder, so a later --png may replace it and nothing else
_TITLE = "<title>maskedlm report</title>"  # also how an existing file is recognised as a report that may be replaced
_STYLE = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}table{border-collapse:collapse;"
          "margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
          "figure{display:inline-block;margin:0.5em}figcaption{font-size:12px;color:#555}code{font-size:12px}")


def write_report(run_dirs, data=None, out="report.html", png=None) -> Path:
    """Write the report of `run_dirs` (with the anatomy on `data` when given) to `out`; PNGs into `png` if given."""
    if not run_dirs:
        raise UserError("report needs at least one RUN_DIR")
    inputs = [*run_dirs, data]
    # A page beside a run's files (the demo writes RUN_DIR/report.html) is fine: no reader lists a run dir's files.
    out = check_out_file(out, ours=_is_report, what="a maskedlm report")
    if png is not None:  # a folder of figures: the user's PNGs are never overwritten, nor a run dir written into
        png = check_out(png, inputs=[*inputs, out], overwrite=True, ours=lambda d: (d / PNG_MARKER).is_file(),
                        what="report figures")
    runs = [read_run(p) for p in run_dirs]
    if len({r.label for r in runs}) < len(runs):
        for r in runs:
            r.label = f"{r.path.parent.name}/{r.path.name}"
    plt = _plt()
    figures = curve_figures(plt, runs)
    parts = [f"<h1>maskedlm report</h1><p>{len(runs)} run(s): " + ", ".join(html.escape(str(r.path)) for r in runs) + "</p>",
             "<h2>Final numbers</h2>", _table("final", [final_numbers(r) for r in runs]),
             "<h2>Commands</h2>" + "".join(f"<p>{html.escape(r.label)}: <code>{html.escape(r.command or '(not recorded)')}</code></p>" for r in runs),
             "<h2>Config" + (" differences" if len(runs) > 1 else "") + "</h2>", _table("config", config_differences(runs)),
             "<h2>Curves</h2>"]
    parts += [_figure(fid, cap, fig) for fid, cap, fig in figures]
    anatomy_figs = []
    if data is not None:
        for i, run in enumerate(runs):
            run.anatomy = a = anatomy(run, data)
            parts.append(f"<h2>Anatomy of the objective: {html.escape(run.label)} (step {a['checkpoint_step']}, "
                         f"{a['positions']:,} positions of {html.escape(a['data'])} {a['split']})</h2>")
            parts.append(f"<p>loss {a['loss']:.4f} nats, accuracy {a['accuracy']:.4f}, ECE {a['ece']:.4f}</p>")
            for name in ("by_frequency", "by_position", "by_word_start", "calibration", "confusions"):
                parts.append(f"<h3>{name.replace('_', ' ')}</h3>" + _table(f"anatomy-{i}-{name}", a[name]))
        anatomy_figs = anatomy_figures(plt, runs)
        parts.append("<h2>Anatomy compared</h2>")
        parts += [_figure(fid, cap, fig) for fid, cap, fig in anatomy_figs]
    payload = {"runs": [{"path": str(r.path), "label": r.label, "final": final_numbers(r), "anatomy": r.anatomy} for r in runs],
               "figures": [fid for fid, _, _ in figures + anatomy_figs]}
    # Data for other tools, not code: a browser runs no script of type application/json. "<\/" keeps "</script>"
    # inside a string from closing the block (and is still valid JSON).
    parts.append('<script type="application/json" id="report-data">' + json.dumps(payload).replace("</", "<\\/") + "</script>")
    head = f'<meta charset="utf-8">{_TITLE}<style>{_STYLE}</style>'
    page = f'<!doctype html><html><head>{head}</head><body>{"".join(parts)}</body></html>\n'
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    if png is not None:
        with building(png, "png") as tmp:  # whole or not at all, as every other output
            (tmp / PNG_MARKER).write_text("figures of a maskedlm report; --png replaces this folder\n")
            for fid, _, fig in figures + anatomy_figs:
                fig.savefig(tmp / f"{fid}.png", dpi=150)
            replace_dir(tmp, png)
    for _, _, fig in figures + anatomy_figs:
        plt.close(fig)
    return out


def _is_report(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        return _TITLE in f.read(2000)


def _figure(fid: str, caption: str, fig) -> str:
    return f'<figure id="fig-{fid}">{_svg(fig)}<figcaption>{html.escape(caption)}</figcaption></figure>'
