"""The `finetune` section: FinetuneConfig and its `finetune.key=value` overrides, parsed and refused by config.py's
own rules. Kept out of Config so pretraining configs, their hashes and resume checks are unchanged by it."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import get_type_hints

from maskedlm.config import DIM_LIMIT, SEED_LIMIT, _check, _check_seed, _coerce, _split_override, _unknown


@dataclass
class FinetuneConfig:
    epochs: int = 3  # BERT's GLUE recipe: 2-4 epochs (Devlin et al. 2019)
    max_steps: int = 0  # 0: the epochs decide; > 0: stop after this many optimizer steps
    # "auto": each rate of lr_grid is tried with the first seed and the best on --eval is kept (published GLUE results
    # are reported this way, e.g. ModernBERT, Cramming); a number skips the sweep.
    lr: float | str = "auto"
    lr_grid: tuple[float, ...] = (5e-5, 1e-4, 2e-4, 5e-4)  # BERT-base's 5e-5 up to what small models want
    batch_rows: int = 32  # examples per optimizer step, BERT's GLUE batch
    max_len: int = 128  # tokens per example, [CLS]/[SEP] included; longer texts are truncated and counted
    weight_decay: float = 0.01  # BERT's
    # Hidden, attention and classifier dropout during fine-tuning. "auto": the pretrained model's own (model.dropout),
    # which is what transformers fine-tunes with (from config.json): 0.1 for BERT checkpoints, 0 for the modern presets
    # here, pretrained without it (Cramming). 0 against 0.1 on a modern-mini: equal accuracy within seed noise, ~12%
    # less time per step on CPU (bench/RESULTS.md, "Speed at the same settings").
    dropout: float | str = "auto"
    warmup_fraction: float = 0.1  # share of the steps with a linear warmup, then linear decay to 0 (BERT's recipe)
    eval_every_steps: int = 0  # 0: evaluate after every epoch
    patience: int = 3  # evaluations without a better main metric before stopping early; 0 never stops early
    seed: int = 0  # the first seed; --seeds N runs seed, seed+1, ...
    # "auto": bf16 autocast on a CUDA device that has it and on a CPU that oneDNN runs bf16 on (as the presets pretrain;
    # 1.5x faster steps at equal accuracy here, bench/RESULTS.md), else fp32; or "bf16" / "fp32"
    precision: str = "auto"
    eval_batch_rows: int = 64  # examples per forward pass at evaluation and feature extraction

    def validate(self) -> "FinetuneConfig":
        for f in fields(self):  # as _check_finite does for the pretraining sections: before any work
            v = getattr(self, f.name)
            if isinstance(v, float):
                _check(math.isfinite(v), f"finetune.{f.name} must be a finite number, got {v}")
            elif isinstance(v, int) and not isinstance(v, bool):
                _check(-SEED_LIMIT <= v < SEED_LIMIT, f"finetune.{f.name} must be an integer within ±2^63, got {v}")
        _check_seed("finetune.seed", self.seed)
        _check(self.epochs >= 1 or self.max_steps > 0 and self.epochs == 0, f"finetune.epochs must be >= 1 (or 0 with "
               f"finetune.max_steps), got {self.epochs}")
        _check(self.max_steps >= 0, f"finetune.max_steps must be >= 0, got {self.max_steps}")
        # An AdamW step moves each weight by about lr: above 1 no fine-tuning converges (lr=1e30 ended in NaN weights
        # that only the final check against transformers caught); weight decay multiplies weights by 1 - lr·decay.
        _check(self.lr == "auto" or (not isinstance(self.lr, str) and 0 < self.lr <= 1),
               f"finetune.lr must be in (0, 1] or auto, got {self.lr!r}")
        _check(len(self.lr_grid) >= 1 and all(math.isfinite(x) and 0 < x <= 1 for x in self.lr_grid),
               f"finetune.lr_grid must be one or more numbers in (0, 1], got {list(self.lr_grid)}")
        _check(self.weight_decay <= 1, f"finetune.weight_decay must be <= 1, got {self.weight_decay}")
        _check(self.max_len <= DIM_LIMIT, f"finetune.max_len must be <= 2^31 - 1, got {self.max_len}")
        _check(self.batch_rows > 0, f"finetune.batch_rows must be > 0, got {self.batch_rows}")
        _check(self.max_len >= 3, f"finetune.max_len must be >= 3 ([CLS], a token, [SEP]), got {self.max_len}")
        _check(self.weight_decay >= 0, f"finetune.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.dropout == "auto" or (not isinstance(self.dropout, str) and 0.0 <= self.dropout < 1.0),
               f"finetune.dropout must be in [0, 1) or auto, got {self.dropout!r}")
        _check(0.0 <= self.warmup_fraction < 1.0, f"finetune.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        _check(self.eval_every_steps >= 0, f"finetune.eval_every_steps must be >= 0, got {self.eval_every_steps}")
        _check(self.patience >= 0, f"finetune.patience must be >= 0, got {self.patience}")
        _check(self.precision in ("auto", "bf16", "fp32"), f"finetune.precision must be auto, bf16 or fp32, got {self.precision!r}")
        _check(self.eval_batch_rows > 0, f"finetune.eval_batch_rows must be > 0, got {self.eval_batch_rows}")
        return self


    def dropout_for(self, mcfg) -> float:
        """The dropout fine-tuning uses with a model of config `mcfg`: finetune.dropout, or the model's own for auto."""
        return float(mcfg.dropout) if self.dropout == "auto" else float(self.dropout)


def load_finetune_config(overrides=()) -> FinetuneConfig:
    """FinetuneConfig from `finetune.key=value` overrides, coerced and refused like the other sections'."""
    cfg = FinetuneConfig()
    hints = get_type_hints(FinetuneConfig)
    known = [f"finetune.{f.name}" for f in fields(FinetuneConfig)]
    for item in overrides or ():
        key, value = _split_override(item, "finetune.key=value")
        section, _, name = key.partition(".")
        if section != "finetune" or name not in hints:
            raise _unknown(key, known)
        setattr(cfg, name, _coerce(key, value, hints[name]))
    return cfg.validate()
