"""Linear probing: the encoder frozen, its features computed once, a linear head fitted on them in seconds.

Features are the mean of the last hidden states over an example's tokens (an MLM-trained [CLS] is trained for
nothing in particular) or, for the tokens task, each word's first sub-token. The head is multinomial logistic
regression (classify, tokens) or least squares (regress), L2 chosen on the eval split. Nothing here trains θ.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from maskedlm.errors import UserError
from maskedlm.tasks import TaskData, get_task, load_task
from maskedlm.tasks.encode import collate
from maskedlm.tokenizer import load_tokenizer, special_ids

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # per-example L2 strengths tried; the eval split picks one
LBFGS_ITERATIONS = 300  # full-batch L-BFGS on a convex loss converges well within this on probe-sized problems


@torch.no_grad()
def features(net, data: TaskData, split: str, batch_rows: int, device) -> torch.Tensor:
    """(N, C) features of a split's items as the task pools them (Task.features): per example, or per word for the
    tokens task (words cut off by max_len get zeros), in fp32."""
    enc, family = data.encoded[split], net.cfg.family
    was = net.training
    net.eval()
    out = []
    for start in range(0, len(enc.ids), batch_rows):
        index = list(range(start, min(len(enc.ids), start + batch_rows)))
        ids, mask, types = (t.to(device) for t in collate(enc, index, 0))
        h = net.encoder(ids, attention_mask=mask, token_type_ids=types if family == "bert" else None).float()  # (B, T, C)
        out.append(data.task.features(h, mask, index, enc))  # (B, C) or (words, C)
    net.train(was)
    return torch.cat(out).cpu()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> torch.Tensor:
    """(C + 1, K) weights (last row: bias) minimising mean cross-entropy + l2/2 · |W|² (bias not decayed)."""
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # (N, C+1)
    w = torch.zeros(x1.shape[1], classes, dtype=x.dtype, requires_grad=True)  # (C+1, K)
    opt = torch.optim.LBFGS([w], max_iter=LBFGS_ITERATIONS, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x1 @ w, y) + 0.5 * l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


def fit_least_squares(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """(C + 1,) ridge weights (last: bias) for mean squared error + l2 · |w|², in closed form on centred data."""
    mx, my = x.mean(0), y.mean()
    xc = x - mx  # (N, C)
    a = xc.T @ xc / len(x) + l2 * torch.eye(x.shape[1], dtype=x.dtype)  # (C, C)
    w = torch.linalg.solve(a, xc.T @ (y - my) / len(x))  # (C,)
    return torch.cat([w, (my - mx @ w).reshape(1)])


def fit(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> torch.Tensor:
    """The linear head for the task's item targets: least squares for numbers, logistic regression for class ids."""
    return fit_logistic(x, y, classes, l2) if not y.is_floating_point() else fit_least_squares(x, y, l2)


def _predict(data: TaskData, split: str, x: torch.Tensor, w: torch.Tensor) -> list:
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # (N, C+1)
    scores = (x1 @ w).reshape(len(x), -1)  # (N, K); (N, 1) for least squares
    return data.task.decode(scores, data.names, data.encoded[split].first)


def run_probe(net, data: TaskData, batch_rows: int, device, log=lambda rec: None) -> dict:
    """Fit the linear head on train features for each L2 in L2_GRID, keep the best on eval, score test with it.
    Returns {eval, test (when test has labels), l2, test_predictions (when there is a test split)}."""
    feats = {s: features(net, data, s, batch_rows, device).double() for s in data.encoded}
    mu, sd = feats["train"].mean(0), feats["train"].std(0).clamp(min=1e-6)  # standardised: one L2 grid fits all
    feats = {s: (f - mu) / sd for s, f in feats.items()}
    task, y = data.task, data.task.item_targets(data.examples["train"].labels, data.names)
    best = None
    for l2 in L2_GRID:
        w = fit(feats["train"], y, len(data.names), l2)
        metrics = task.score(data.names, data.examples["eval"].labels, _predict(data, "eval", feats["eval"], w))
        log({"split": "eval", "l2": l2, **metrics})
        main = task.main_metric(metrics)
        if best is None or metrics[main] > best["eval"][main]:
            best = {"eval": metrics, "l2": l2, "w": w}
    result = {"eval": best["eval"], "l2": best["l2"]}
    if "test" in data.examples:
        pred = _predict(data, "test", feats["test"], best["w"])
        result["test_predictions"] = pred
        if data.examples["test"].labels is not None:
            result["test"] = task.score(data.names, data.examples["test"].labels, pred)
            log({"split": "test", "l2": best["l2"], **result["test"]})
    return result


# ------------------------------------------------------------------------------------------------ during pretraining
def _split_file(d: Path, split: str) -> Path:
    found = sorted(p for p in d.iterdir() if p.is_file() and p.name.split(".")[0] == split)
    if not found:
        raise UserError(f"probe task {d} has no {split} file (e.g. {split}.jsonl, {split}.csv, {split}.tsv)")
    return found[0]


def load_probe_task(spec, tok, max_len: int) -> tuple[str, TaskData]:
    """(name, task) from a task directory: train.* and eval.* labelled files and an optional task.json
    {"task", "name", "text_field", "text_pair_field", "label_field"}; the name defaults to the directory's.
    A bad one is a UserError that starts with eval.probe_tasks, the key that named it."""
    try:
        return _load_probe_task(spec, tok, max_len)
    except UserError as e:
        raise UserError(f"eval.probe_tasks: {e}") from None


def _load_probe_task(spec, tok, max_len: int) -> tuple[str, TaskData]:
    d = Path(spec)
    if not d.is_dir():
        raise UserError(f"{str(spec)!r} is not a directory (it holds train.* and eval.* labelled files)")
    meta = {}
    if (d / "task.json").is_file():
        try:
            meta = json.loads((d / "task.json").read_text())
        except ValueError as e:
            raise UserError(f"{d / 'task.json'} is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise UserError(f"{d / 'task.json'} is not a JSON object")
    # load_task names its own arguments after finetune's options; here they are task.json's keys
    task = get_task(meta.get("task", "classify"), f"{d / 'task.json'}: task")
    if meta.get("text_pair_field") and not task.pairs:
        raise UserError(f"{d / 'task.json'}: text_pair_field does not apply to the {task.name} task")
    data = load_task(tok, special_ids(tok), task,
                        {"train": _split_file(d, "train"), "eval": _split_file(d, "eval")}, meta.get("text_field"),
                        meta.get("text_pair_field"), meta.get("label_field"), max_len, warn=lambda m: None)
    return str(meta.get("name", d.name)), data


def probe_record(net, tasks: list[tuple[str, TaskData]], device, batch_rows: int = 64) -> dict:
    """{"probe/<task>/<metric>": value} for each task: the probe's eval-split metrics with today's weights."""
    out = {}
    for name, data in tasks:
        out.update({f"probe/{name}/{k}": v for k, v in run_probe(net, data, batch_rows, device)["eval"].items()})
    return out


def load_probe_tasks(cfg, data) -> list:
    """eval.probe_tasks read, checked and tokenized with the data's tokenizer: all a probe needs but the model."""
    if not cfg.eval.probe_tasks:
        return []
    if data.tokenizer_file is None:
        raise UserError(f"eval.probe_tasks needs the tokenizer.json of {data.path}; prepare the data again")
    tok = load_tokenizer(data.tokenizer_file)
    return [load_probe_task(t, tok, min(data.seq_len, cfg.model.max_positions)) for t in cfg.eval.probe_tasks]
