"""maskedlm finetune against transformers on the same MODEL, labelled files, steps, seeds and learning rates.

The peer fine-tunes MODEL's export through AutoModelForSequenceClassification, either in a plain loop (`--peer loop`:
AdamW, linear warmup then linear decay, clipping at 1, batches padded to their longest example, evaluation at the
same steps as maskedlm's and the best state kept) or with Trainer as run_glue.py sets it up (`--peer trainer`). Each
learning rate of `--lrs` is run on both sides; both are scored on the same test file by maskedlm's metrics. `--set`
passes finetune.key=value to maskedlm only (one change at a time, to find where a gap comes from). A benchmark, not
a test; results in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def demo_task(work: Path, per_work: int) -> dict[str, Path]:
    from maskedlm.demo import _genre_task, corpus_dir

    return _genre_task(corpus_dir(), work / "task", per_work)


def ours(a, files, out: Path, lr, seed: int) -> tuple[dict, float]:
    """maskedlm finetune at `lr` (a number, or "auto" where finetune has it); returns its result and wall time."""
    from maskedlm.finetune import finetune

    over = [f"finetune.lr={lr}", f"finetune.batch_rows={a.batch}", f"finetune.max_len={a.max_len}",
            f"finetune.seed={seed}", f"finetune.precision={a.precision}", *a.set]
    over += [f"finetune.max_steps={a.steps}"] if a.steps else [f"finetune.epochs={a.epochs}", "finetune.patience=0"]
    t0 = time.perf_counter()
    r = finetune(a.model, files["train"], files["eval"], out, test=files["test"], overrides=over, overwrite=True)
    return r, time.perf_counter() - t0


def _rows(path: Path) -> tuple[list[str], list[str]]:
    from maskedlm.tasks import get_task
    from maskedlm.tasks.read import read_examples

    ex = read_examples(path, get_task("classify"), "text", None, "label")
    return ex.texts, ex.labels


def _dropout(family: str, p: float | None) -> dict:
    """The dropout arguments of transformers' config for `family`; None keeps the exported config's values."""
    if p is None:
        return {}
    if family == "bert":
        return dict(hidden_dropout_prob=p, attention_probs_dropout_prob=p, classifier_dropout=p)
    return dict(attention_dropout=p, mlp_dropout=p, embedding_dropout=p, classifier_dropout=p)


def _peer_setup(a, files, hf_dir: Path, seed: int):
    import transformers

    texts = {s: _rows(files[s]) for s in ("train", "eval", "test")}
    names = sorted(set(texts["train"][1]))
    lookup = {n: i for i, n in enumerate(names)}
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    family = json.loads((hf_dir / "config.json").read_text())["model_type"]
    transformers.set_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(hf_dir), num_labels=len(names), id2label=dict(enumerate(names)), label2id=lookup,
        **_dropout(family, a.peer_dropout))
    enc = {s: tok(texts[s][0], truncation=True, max_length=a.max_len)["input_ids"] for s in texts}
    gold = {s: [lookup[y] for y in texts[s][1]] for s in texts}
    return model, tok, enc, gold


@torch.no_grad()
def _peer_score(model, tok, ids: list, gold: list) -> dict:
    from maskedlm.tasks.metrics import classify_metrics

    model.eval()
    pred = []
    for s in range(0, len(ids), 64):
        b = tok.pad({"input_ids": ids[s:s + 64]}, return_tensors="pt")
        pred += model(**b).logits.argmax(-1).tolist()
    model.train()
    return classify_metrics(gold, pred)


# Long: the loop a user would write, in one piece so each setting can be checked against maskedlm's.
def loop(a, files, hf_dir: Path, lr: float, seed: int) -> tuple[dict, float]:
    """A plain transformers fine-tuning loop: AdamW (weight decay 0.01 off biases and norms), warmup over
    `warmup_fraction` of the steps then linear decay, clipping at 1; evaluation at maskedlm's steps, the best kept."""
    import transformers

    t0 = time.perf_counter()
    model, tok, enc, gold = _peer_setup(a, files, hf_dir, seed)
    n = len(enc["train"])
    per_epoch = -(-n // a.batch)
    total = a.steps or per_epoch * a.epochs
    every = a.eval_every or per_epoch
    decay = [p for k, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in k]
    rest = [p for k, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in k)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    sched = transformers.get_linear_schedule_with_warmup(opt, int(a.warmup_fraction * total), total)
    g = torch.Generator().manual_seed(seed)
    best, best_state, best_step, step = None, None, 0, 0
    model.train()
    while step < total:
        perm = torch.randperm(n, generator=g).tolist()
        for s in range(0, n, a.batch):
            idx = perm[s:s + a.batch]
            b = tok.pad({"input_ids": [enc["train"][i] for i in idx]}, return_tensors="pt")
            loss = model(**b, labels=torch.tensor([gold["train"][i] for i in idx])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % every == 0 or step == total:
                m = _peer_score(model, tok, enc["eval"], gold["eval"])
                if best is None or m["accuracy"] > best["accuracy"]:
                    best, best_step = m, step
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if step >= total:
                break
    model.load_state_dict(best_state)
    test = _peer_score(model, tok, enc["test"], gold["test"])
    return {"eval": best, "test": test, "best_step": best_step}, time.perf_counter() - t0


def trainer(a, files, hf_dir: Path, lr: float, seed: int) -> tuple[dict, float]:
    """transformers' Trainer with TrainingArguments as run_glue.py sets them (evaluation at maskedlm's steps)."""
    import transformers

    from maskedlm.tasks.metrics import classify_metrics

    t0 = time.perf_counter()
    model, tok, enc, gold = _peer_setup(a, files, hf_dir, seed)
    per_epoch = -(-len(enc["train"]) // a.batch)

    def dataset(split):
        return [{"input_ids": x, "labels": y} for x, y in zip(enc[split], gold[split])]

    def metrics(p):
        return classify_metrics(p.label_ids.tolist(), p.predictions.argmax(-1).tolist())

    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(
            output_dir=tmp, learning_rate=lr, max_steps=a.steps or per_epoch * a.epochs,
            per_device_train_batch_size=a.batch, per_device_eval_batch_size=64, weight_decay=0.01,
            warmup_steps=a.warmup_fraction, lr_scheduler_type="linear", max_grad_norm=1.0, eval_strategy="steps",
            eval_steps=a.eval_every or per_epoch, save_strategy="steps", save_steps=a.eval_every or per_epoch,
            load_best_model_at_end=True, metric_for_best_model="accuracy", save_total_limit=1, seed=seed,
            report_to=[], logging_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
            bf16=a.precision == "bf16")
        t = transformers.Trainer(model=model, args=args, train_dataset=dataset("train"), eval_dataset=dataset("eval"),
                                 data_collator=transformers.DataCollatorWithPadding(tok), compute_metrics=metrics)
        t.train()
        ev = t.evaluate()
        test = t.predict(dataset("test")).metrics
    pick = ("accuracy", "macro_f1", "mcc")
    return ({"eval": {k: ev[f"eval_{k}"] for k in pick}, "test": {k: test[f"test_{k}"] for k in pick},
             "best_step": None}, time.perf_counter() - t0)


def _median(rows: list[dict], split: str) -> float:
    return statistics.median(r[split]["accuracy"] for r in rows)


def summary(rows: list[dict]) -> dict:
    """Per side and learning rate the medians over seeds; per side the rate a user would pick (best eval median)."""
    out = {}
    for side in sorted({r["side"] for r in rows}):
        points = {}
        for lr in dict.fromkeys(r["lr"] for r in rows if r["side"] == side):
            at = [r for r in rows if r["side"] == side and r["lr"] == lr]
            points[str(lr)] = {"eval": _median(at, "eval"), "test": _median(at, "test"),
                               "wall_s": statistics.median(r["wall_s"] for r in at), "seeds": len(at)}
        pick = max(points, key=lambda k: points[k]["eval"])
        out[side] = {"grid": points, "picked_lr": pick, "test_at_picked": points[pick]["test"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="MODEL: a maskedlm run dir, checkpoint dir or Hugging Face dir")
    p.add_argument("--train", help="labelled files (CSV or JSON Lines, text and label); default: the demo's genre task")
    p.add_argument("--eval")
    p.add_argument("--test")
    p.add_argument("--per-work", type=int, default=40, help="demo task: passages per play")
    p.add_argument("--peer", choices=["loop", "trainer", "none"], default="loop")
    p.add_argument("--only-peer", action="store_true", help="run the peer alone")
    p.add_argument("--lrs", nargs="+", default=["5e-5"], help="learning rates, each run on both sides ('auto': "
                   "maskedlm's own choice, where finetune has it; the peer skips it)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (0: --epochs decide)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=0, help="peer's evaluation interval (0: each epoch, as ours)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--warmup-fraction", type=float, default=0.1)
    p.add_argument("--peer-dropout", type=float, default=None, help="peer's dropout (default: the export's config)")
    p.add_argument("--set", nargs="*", default=[], help="finetune.key=value for maskedlm only")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="also write the rows and summary to this file")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    # One-time imports before either timer (whoever runs first would pay them): torch's dynamo, which the first
    # AdamW imports, and transformers' modelling modules, which maskedlm's self-check loads.
    import transformers.models.bert.modeling_bert  # noqa: F401
    import transformers.models.modernbert.modeling_modernbert  # noqa: F401

    from maskedlm.interop import export

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    peer = {"loop": loop, "trainer": trainer, "none": None}[a.peer]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = ({"train": Path(a.train), "eval": Path(a.eval), "test": Path(a.test)} if a.train
                 else demo_task(work, a.per_work))
        if peer is not None:
            export(a.model, work / "hf", overwrite=True, verify=False)
        for lr in a.lrs:
            for seed in a.seeds:
                if not a.only_peer:
                    r, wall = ours(a, files, work / "ours", lr, seed)
                    rows.append({"side": "maskedlm", "lr": lr, "seed": seed, "eval": r["eval"], "test": r["test"],
                                 "best_step": r["best_step"], "wall_s": wall, "lr_used": r.get("lr", lr)})
                    print(json.dumps(rows[-1]), flush=True)
                if peer is not None and lr != "auto":
                    r, wall = peer(a, files, work / "hf", float(lr), seed)
                    rows.append({"side": a.peer, "lr": lr, "seed": seed, **r, "wall_s": wall})
                    print(json.dumps(rows[-1]), flush=True)
    result = {"rows": rows, "summary": summary(rows), "settings": vars(a)}
    print(json.dumps(result["summary"], indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
