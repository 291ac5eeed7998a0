"""Task heads with exactly the tensors of transformers' {Bert,ModernBert}For{Sequence,Token}Classification, built on
θ from a pretrained MaskedLM, and their conversion to those classes (config.json and state dict through hf.py's key map).

The head's shape comes from the Task (tasks/task.py); its loss too. No training here (finetune.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskedlm.hf import hf_config, to_hf_state_dict
from maskedlm.model import Encoder, MaskedLM, padded_vocab_size
from maskedlm.tasks.task import get_task


class _Transform(nn.Module):
    """ModernBertPredictionHead: dense (no bias) → GELU → LayerNorm (no bias), the same shape as the MLM head's."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden, eps=eps, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(h)))  # (..., C)


class TaskModel(nn.Module):
    """θ and a task head with exactly the tensors of transformers' classes: BertForSequenceClassification (pooler:
    dense + tanh at [CLS], dropout, classifier), BertForTokenClassification (dropout, classifier at every token),
    ModernBertFor{Sequence,Token}Classification ([CLS] or every token → dense, GELU, LayerNorm → dropout → classifier).
    """

    def __init__(self, mcfg, task, num_labels: int, dropout: float):
        super().__init__()
        task = get_task(task)  # a Task or its name
        mcfg = replace(mcfg, dropout=dropout, attention_dropout=dropout)
        self.cfg, self.task, self.num_labels, self.dropout = mcfg, task, num_labels, dropout
        self.sequence = task.sequence
        self.encoder = Encoder(mcfg, padded_vocab_size(mcfg.vocab_size, mcfg.pad_vocab_multiple))
        C = mcfg.hidden
        if mcfg.family == "bert":
            self.pooler = nn.Linear(C, C) if self.sequence else None
        else:
            self.head = _Transform(C, mcfg.layer_norm_eps)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(C, num_labels)

    @classmethod
    def from_mlm(cls, mlm: MaskedLM, task, num_labels: int, dropout: float, seed: int) -> "TaskModel":
        """θ from a pretrained MaskedLM; new tensors drawn as transformers draws them for the same class, from a
        private generator keyed by `seed`, biases 0: BERT's pooler and classifier N(0, initializer_range); ModernBERT's
        classifier a normal of std hidden^-0.5 truncated at 2 std (its "final_out" init with the config's default
        initializer_cutoff_factor 2: 0.0625 at hidden 256, three times BERT's 0.02, so the fresh head's logits start
        larger). ModernBERT's transform takes the MLM head's
        (same names, as transformers loads them)."""
        m = cls(mlm.cfg, task, num_labels, dropout)
        m.encoder.load_state_dict(mlm.encoder.state_dict())
        g = torch.Generator().manual_seed(int(seed))
        std = mlm.cfg.initializer_range
        with torch.no_grad():
            for lin in (m.classifier, getattr(m, "pooler", None)):
                if lin is not None:
                    lin.weight.normal_(0.0, std, generator=g)
                    lin.bias.zero_()
            if mlm.cfg.family == "modern":
                out_std = mlm.cfg.hidden ** -0.5
                nn.init.trunc_normal_(m.classifier.weight, 0.0, out_std, -2 * out_std, 2 * out_std, generator=g)
                m.head.dense.weight.copy_(mlm.head.dense.weight)
                m.head.norm.weight.copy_(mlm.head.norm.weight)
        return m.to(next(mlm.parameters()).device)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """(B, T) ids → logits (B, L) for sequence tasks, (B, T, L) for the tokens task."""
        types = token_type_ids if self.cfg.family == "bert" else None
        h = self.encoder(input_ids, attention_mask=attention_mask, token_type_ids=types)  # (B, T, C)
        if self.sequence:
            h = h[:, 0]  # (B, C) [CLS]: BERT's pooler input and ModernBERT's classifier_pooling="cls" (its default)
            h = torch.tanh(self.pooler(h)) if self.cfg.family == "bert" else self.head(h)  # (B, C)
        elif self.cfg.family == "modern":
            h = self.head(h)  # (B, T, C)
        return self.classifier(self.drop(h))  # (B, L) or (B, T, L)


def hf_task_config(model: TaskModel, names: list[str], special: dict) -> dict:
    """config.json for transformers' class of this task and family (labels in id2label / label2id)."""
    cfg = hf_config(model.cfg, special=special)
    kind = "SequenceClassification" if model.sequence else "TokenClassification"
    cfg["architectures"] = [("Bert" if model.cfg.family == "bert" else "ModernBert") + "For" + kind]
    shown = model.task.hf_labels(names)
    cfg["id2label"] = {str(i): n for i, n in enumerate(shown)}
    cfg["label2id"] = {n: i for i, n in enumerate(shown)}
    cfg["classifier_dropout"] = model.dropout
    if model.sequence:
        cfg["problem_type"] = model.task.problem_type
    if model.cfg.family == "modern":
        cfg["classifier_pooling"] = "cls"
    return cfg


def to_hf_task_state_dict(model: TaskModel) -> dict[str, torch.Tensor]:
    """Our TaskModel → the state dict of transformers' class: the encoder through hf.py's MLM key map, then the head."""
    mlm = MaskedLM(replace(model.cfg, dropout=0.0, attention_dropout=0.0))
    mlm.encoder.load_state_dict(model.encoder.state_dict())
    if model.cfg.family == "modern":
        mlm.head.dense.load_state_dict(model.head.dense.state_dict())
        mlm.head.norm.load_state_dict(model.head.norm.state_dict())
    keep = ("bert.",) if model.cfg.family == "bert" else ("model.", "head.")
    sd = {k: v for k, v in to_hf_state_dict(mlm).items() if k.startswith(keep)}
    if getattr(model, "pooler", None) is not None:
        sd["bert.pooler.dense.weight"] = model.pooler.weight
        sd["bert.pooler.dense.bias"] = model.pooler.bias
    sd["classifier.weight"], sd["classifier.bias"] = model.classifier.weight, model.classifier.bias
    return {k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}
