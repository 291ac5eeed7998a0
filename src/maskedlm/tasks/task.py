"""What a task is: classify (one class per text or pair), regress (one number) or tokens (one tag per word).

A Task object carries everything that differs between them: checking a record's text and label, the label set,
encoding, targets and loss, turning scores into predictions, metrics and the main metric. Code that handles any
task calls these methods instead of testing the task's name. No files (tasks/read.py) and no model (tasks/heads.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from maskedlm.errors import UserError
from maskedlm.tasks.encode import IGNORE, Encoded, encode_texts, encode_words, gather_words
from maskedlm.tasks.metrics import classify_metrics, regress_metrics, token_metrics


def _label_name(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))  # 1.0 in one file and 1 in another are the same class
    return str(v).strip()


def _name_order(s: str):
    try:
        return (0, int(s), "")
    except ValueError:
        return (1, 0, s)


class Task:
    """A task over texts (or text pairs) with one label per example; subclasses say how labels read and score."""

    name = ""
    sequence = True  # one prediction per example (the head reads [CLS]); False: one per word
    pairs = True  # a second text may follow the first ([CLS] a [SEP] b [SEP])
    text_field, label_field = "text", "label"  # the columns read when no option names them
    fallback_kind = None  # the file format assumed when a file's name tells none (None: refused)
    problem_type = "single_label_classification"  # transformers' config.problem_type for the sequence head

    # ---------------------------------------------------------------------------------------- reading
    def text(self, v, at: str, field: str):
        """The example's text from its record (`at` names the file and line for a refusal)."""
        return v if isinstance(v, str) else str(v)

    def label(self, v, text, at: str, field: str):
        raise NotImplementedError

    def classes(self, labels: list) -> set[str]:
        """The class names a list of labels uses."""
        return set(labels)

    def label_names(self, ex) -> list[str]:
        """The label set, from the train file: sorted (numerically when every name is an integer)."""
        names = self.classes(ex.labels)
        if len(names) < 2:
            raise UserError(f"{ex.path} has one class only ({next(iter(names))!r}); a classifier needs at least two")
        return sorted(names, key=_name_order)

    def check_labels(self, ex, names: list[str], train_path: str) -> None:
        """Refuse a file whose labels include one the train file never has."""
        if ex.labels is None:
            return
        unseen = sorted(self.classes(ex.labels) - set(names))
        if unseen:
            raise UserError(f"{ex.path} has labels that {train_path} never has: {', '.join(map(repr, unseen[:5]))}; "
                            "the label set comes from the train file")

    def outputs(self, names: list[str]) -> int:
        """The head's number of outputs."""
        return len(names)

    def hf_labels(self, names: list[str]) -> list[str]:
        """The names written to transformers' id2label / label2id."""
        return names

    # ---------------------------------------------------------------------------------------- encoding and loss
    def encode(self, tok, ex, max_len: int, special) -> Encoded:
        return encode_texts(tok, ex.texts, ex.pairs, max_len, special)

    def targets(self, labels: list, index, names: list[str], enc: Encoded, T: int) -> torch.Tensor:
        """The head's targets for the examples `index` of a batch padded to T: here (B,) class ids."""
        lookup = {n: k for k, n in enumerate(names)}
        return torch.tensor([lookup[labels[i]] for i in index], dtype=torch.long)  # (B,)

    def count(self, targets: torch.Tensor) -> int:
        """The labelled items among a batch's targets (the loss's denominator), known before the forward."""
        return int((targets != IGNORE).sum())

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ loss over the labelled items, their count) in fp32: cross-entropy at labelled positions only.
        Σ / count is transformers' loss for the same batch."""
        flat = logits.float().reshape(-1, logits.shape[-1])  # (N, L)
        target = targets.reshape(-1)  # (N,)
        return F.cross_entropy(flat, target, ignore_index=IGNORE, reduction="sum"), (target != IGNORE).sum()

    # ---------------------------------------------------------------------------------------- predictions
    def item_scores(self, x: torch.Tensor, index, enc: Encoded) -> torch.Tensor:
        """A head's output for a batch → one row per predicted item: (B, L) as it is for sequence tasks."""
        return x

    def features(self, h: torch.Tensor, mask: torch.Tensor, index, enc: Encoded) -> torch.Tensor:
        """The probe's features from last hidden states (B, T, C): the mean over each example's tokens (an
        MLM-trained [CLS] is trained for nothing in particular), (B, C)."""
        m = mask[:, :, None].float()  # (B, T, 1)
        return (h * m).sum(1) / m.sum(1)  # (B, C)

    def item_targets(self, labels: list, names: list[str]) -> torch.Tensor:
        """One target per predicted item, as the probe fits them: (N,) class ids."""
        lookup = {n: k for k, n in enumerate(names)}
        return torch.tensor([lookup[t] for t in labels], dtype=torch.long)  # (N,)

    def decode(self, scores: torch.Tensor, names: list[str], firsts=None) -> list:
        """Predictions spelled as the files spell labels, from (items, L) scores; firsts: the examples' word
        positions (Encoded.first), for word-level tasks."""
        return [names[k] for k in scores.argmax(-1).tolist()]

    def score(self, names: list[str], gold: list, pred: list) -> dict:
        """The task's metrics from gold labels and predictions as the files spell them."""
        lookup = {n: k for k, n in enumerate(names)}
        return classify_metrics([lookup[g] for g in gold], [lookup[p] for p in pred])

    def main_metric(self, metrics: dict) -> str:
        """The metric that picks the best checkpoint."""
        return "accuracy"


class Classify(Task):
    name = "classify"

    def label(self, v, text, at, field):
        if _label_name(v) == "":
            raise UserError(f"{at} has an empty label in column {field!r}")
        return _label_name(v)


class Regress(Task):
    name = "regress"
    problem_type = "regression"

    def label(self, v, text, at, field):
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise UserError(f"{at}: the label {v!r} in column {field!r} is not a number") from None
        if not math.isfinite(x):
            raise UserError(f"{at}: the label {v!r} is not a finite number")
        return x

    def classes(self, labels):
        return set()  # numbers, not classes: no label can be unseen

    def label_names(self, ex):
        if len(set(ex.labels)) < 2:
            raise UserError(f"{ex.path}: every label is {ex.labels[0]!r}; regression needs labels that vary")
        return ["score"]

    def outputs(self, names):
        return 1

    def hf_labels(self, names):
        return ["LABEL_0"]

    def targets(self, labels, index, names, enc, T):
        return torch.tensor([labels[i] for i in index], dtype=torch.float32)  # (B,)

    def count(self, targets):
        return targets.numel()  # every example is labelled; no IGNORE among numbers

    def loss_sum(self, logits, targets):
        """(Σ squared error, count) in fp32; Σ / count is transformers' MSE loss for the batch."""
        err = (logits.float().squeeze(-1) - targets.float()) ** 2  # (B,)
        return err.sum(), torch.tensor(err.numel(), device=err.device)

    def item_targets(self, labels, names):
        return torch.tensor(labels, dtype=torch.float64)  # (N,)

    def decode(self, scores, names, firsts=None):
        return scores[:, 0].tolist()

    def score(self, names, gold, pred):
        return regress_metrics(gold, pred)

    def main_metric(self, metrics):
        return "spearman"  # STS-B's headline


class Tokens(Task):
    name = "tokens"
    sequence = pairs = False
    text_field, label_field = "tokens", "tags"
    fallback_kind = "conll"  # CoNLL-2003 and UD files carry no telling suffix
    problem_type = None

    def text(self, v, at, field):
        if not isinstance(v, list) or not all(isinstance(w, str) for w in v):
            raise UserError(f"{at}: {field!r} must be a list of words, got {str(v)[:60]!r}")
        return v

    def label(self, v, text, at, field):
        if not isinstance(v, list) or len(v) != len(text):
            raise UserError(f"{at}: {field!r} must be a list of one tag per word ({len(text)} words), got {str(v)[:60]!r}")
        return [_label_name(t) for t in v]

    def classes(self, labels):
        return {t for tags in labels for t in tags}

    def encode(self, tok, ex, max_len, special):
        return encode_words(tok, ex.texts, max_len, special)

    def targets(self, labels, index, names, enc, T):
        """(B, T) tag ids at words' first sub-tokens, IGNORE elsewhere."""
        lookup = {n: k for k, n in enumerate(names)}
        out = torch.full((len(index), T), IGNORE, dtype=torch.long)  # (B, T)
        for j, i in enumerate(index):
            for p, tag in zip(enc.first[i], labels[i]):
                if p >= 0:
                    out[j, p] = lookup[tag]
        return out

    def item_scores(self, x, index, enc):
        return gather_words(x, index, enc)  # (W, L)

    def features(self, h, mask, index, enc):
        return gather_words(h, index, enc)  # (W, C): each word's first sub-token; zeros for words cut off

    def item_targets(self, labels, names):
        return super().item_targets([t for tags in labels for t in tags], names)

    def decode(self, scores, names, firsts=None):
        """One tag list per example; a word cut off by max_len gets the fallback tag (it is scored, not dropped)."""
        best, out, i = scores.argmax(-1).tolist(), [], 0
        fallback = "O" if "O" in names else names[0]
        for first in firsts:
            out.append([names[best[i + j]] if p >= 0 else fallback for j, p in enumerate(first)])
            i += len(first)
        return out

    def score(self, names, gold, pred):
        return token_metrics(gold, pred)

    def main_metric(self, metrics):
        return "entity_f1" if "entity_f1" in metrics else "token_accuracy"  # CoNLL-2003's for BIO tags, else POS's


TASKS = {t.name: t for t in (Classify(), Regress(), Tokens())}


def get_task(task, key: str = "task") -> Task:
    """The Task named `task` (a Task passes through); `key` names the option or field in the refusal."""
    if isinstance(task, Task):
        return task
    if not isinstance(task, str) or task not in TASKS:
        raise UserError(f"{key} must be one of {', '.join(TASKS)}, got {task!r}")
    return TASKS[task]
