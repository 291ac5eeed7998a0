"""maskedlm finetune against transformers' Trainer recipe (run_glue.py's) on the same MODEL, data, budget and seed.

Both fine-tune a sequence classifier from the same weights: maskedlm directly from MODEL, transformers from MODEL's
export through AutoModelForSequenceClassification and its Trainer (AdamW, linear warmup over 10% then linear decay,
clipping at 1, dropout 0.1 everywhere, evaluation each epoch, the best epoch by accuracy kept). Both are scored on
the same test file by maskedlm.tasks.metrics. The default task is the demo's: comedy, history or tragedy of a
60-word passage, split by play. A benchmark, not a test; results in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def demo_task(work: Path, per_work: int) -> dict[str, Path]:
    from maskedlm.demo import _genre_task, corpus_dir

    return _genre_task(corpus_dir(), work / "task", per_work)


def ours(a, files, out: Path) -> tuple[dict, float]:
    from maskedlm.finetune import finetune

    over = [f"finetune.epochs={a.epochs}", f"finetune.lr={a.lr}", f"finetune.batch_rows={a.batch}",
            f"finetune.max_len={a.max_len}", f"finetune.seed={a.seed}", "finetune.patience=0",
            f"finetune.precision={a.precision}"]
    t0 = time.perf_counter()
    r = finetune(a.model, files["train"], files["eval"], out, test=files["test"], overrides=over)
    return r, time.perf_counter() - t0


def _rows(path: Path) -> tuple[list[str], list[str]]:
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["text"] for r in recs], [str(r["label"]) for r in recs]


# Long: transformers' recipe written out as run_glue.py sets it up, so every setting can be checked against ours.
def theirs(a, files, work: Path) -> tuple[dict, float]:
    import transformers

    from maskedlm.interop import export
    from maskedlm.tasks.metrics import classify_metrics

    hf_dir = work / "hf"
    export(a.model, hf_dir, overwrite=True, verify=False)
    texts = {s: _rows(files[s]) for s in ("train", "eval", "test")}
    names = sorted(set(texts["train"][1]))
    lookup = {n: i for i, n in enumerate(names)}
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    family = json.loads((hf_dir / "config.json").read_text())["model_type"]
    drop = (dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1) if family == "bert" else
            dict(attention_dropout=0.1, mlp_dropout=0.1, embedding_dropout=0.1))
    t0 = time.perf_counter()
    transformers.set_seed(a.seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(hf_dir), num_labels=len(names), id2label=dict(enumerate(names)), label2id=lookup, classifier_dropout=0.1,
        **drop)

    def dataset(split):
        x, y = texts[split]
        enc = tok(x, truncation=True, max_length=a.max_len)
        return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": lookup[y[i]]}
                for i in range(len(x))]

    def metrics(p):
        return classify_metrics(p.label_ids.tolist(), p.predictions.argmax(-1).tolist())

    args = transformers.TrainingArguments(
        output_dir=str(work / "trainer"), learning_rate=a.lr, num_train_epochs=a.epochs, per_device_train_batch_size=a.batch,
        per_device_eval_batch_size=64, weight_decay=0.01, warmup_steps=0.1, lr_scheduler_type="linear",
        max_grad_norm=1.0, eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
        metric_for_best_model="accuracy", save_total_limit=1, seed=a.seed, report_to=[], logging_strategy="no",
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), bf16=a.precision == "bf16")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset("train"), eval_dataset=dataset("eval"),
                                   data_collator=transformers.DataCollatorWithPadding(tok), compute_metrics=metrics)
    trainer.train()
    test = trainer.predict(dataset("test"))
    wall = time.perf_counter() - t0
    return {k.removeprefix("test_"): v for k, v in test.metrics.items() if k[5:] in ("accuracy", "macro_f1", "mcc")}, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="MODEL: a maskedlm run dir (e.g. a demo run) or checkpoint dir")
    p.add_argument("--train", help="labelled files (JSON Lines with text and label); default: the demo's genre task")
    p.add_argument("--eval")
    p.add_argument("--test")
    p.add_argument("--per-work", type=int, default=40, help="demo task: passages per play")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    # One-time imports before either timer (whoever runs first would pay them): torch's dynamo, which the first
    # AdamW imports, and transformers' modelling modules, which maskedlm's self-check loads.
    import transformers.models.bert.modeling_bert  # noqa: F401
    import transformers.models.modernbert.modeling_modernbert  # noqa: F401

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = ({"train": Path(a.train), "eval": Path(a.eval), "test": Path(a.test)} if a.train
                 else demo_task(work, a.per_work))
        rows = []
        for seed in a.seeds:
            a.seed = seed
            r, t_ours = ours(a, files, work / f"ours{seed}")
            m, t_theirs = theirs(a, files, work)
            rows.append({"seed": seed, "maskedlm": r["test"], "transformers": m, "wall_s": {"maskedlm": t_ours,
                         "transformers": t_theirs}, "wall_ratio": t_theirs / t_ours})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"runs": rows, "settings": {k: v for k, v in vars(a).items() if k != "seed"}}, indent=2))


if __name__ == "__main__":
    main()
