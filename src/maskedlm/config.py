"""Configuration: one dataclass per section, TOML presets, dotted overrides, validation.

Every field carries its unit in its name and a comment on why its default is what it is. Validation raises
UserError naming the key and the value. Loading presets and overrides lives here too; nothing else parses config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from maskedlm.errors import UserError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


@dataclass
class ModelConfig:
    family: str = "bert"  # "bert" (HF BertForMaskedLM tensors) or "modern" (HF ModernBertForMaskedLM, all layers global)
    vocab_size: int = 0  # 0: taken from the data's meta.json at train time
    hidden: int = 256  # bert-mini width (Turc et al. 2019, "Well-Read Students Learn Better")
    layers: int = 4
    heads: int = 4
    intermediate: int = 1024  # 4 × hidden, as in BERT
    max_positions: int = 512  # learned positions in the bert family; RoPE (modern) has no table but we still bound seq_len
    type_vocab_size: int = 2  # BERT's segment embeddings; kept so weights load into BertForMaskedLM unchanged
    dropout: float = 0.0  # hidden dropout; 0 for short pretraining runs (Cramming, Geiping & Goldstein 2022)
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-12  # BERT's value; modern presets use 1e-5 as ModernBERT does
    initializer_range: float = 0.02  # BERT's truncated-normal std
    rope_theta: float = 160000.0  # ModernBERT's global-attention RoPE base
    pad_vocab_multiple: int = 64  # pad the embedding/decoder rows to a multiple of 64 for matmul efficiency
    doc_attention: bool = False  # block-diagonal attention from document starts (packed rows)

    def validate(self) -> None:
        _check(self.family in ("bert", "modern"), f"model.family must be 'bert' or 'modern', got {self.family!r}")
        for k in ("hidden", "layers", "heads", "intermediate", "max_positions"):
            _check(int(getattr(self, k)) > 0, f"model.{k} must be > 0, got {getattr(self, k)}")
        _check(self.hidden % self.heads == 0, f"model.hidden ({self.hidden}) must be divisible by model.heads ({self.heads})")
        _check(self.vocab_size >= 0, f"model.vocab_size must be >= 0, got {self.vocab_size}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _check(0.0 <= self.attention_dropout < 1.0, f"model.attention_dropout must be in [0, 1), got {self.attention_dropout}")
        _check(self.pad_vocab_multiple >= 1, f"model.pad_vocab_multiple must be >= 1, got {self.pad_vocab_multiple}")


@dataclass
class MaskingConfig:
    mask_rate: float = 0.15  # BERT (Devlin et al. 2019); Wettig et al. 2022 find higher rates can help larger models
    mask_token_prob: float = 0.8  # of selected positions: [MASK] 80%, random 10%, unchanged 10% (BERT)
    random_token_prob: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        _check(0.0 < self.mask_rate < 1.0, f"masking.mask_rate must be in (0, 1), got {self.mask_rate}")
        _check(0.0 <= self.mask_token_prob <= 1.0, f"masking.mask_token_prob must be in [0, 1], got {self.mask_token_prob}")
        _check(0.0 <= self.random_token_prob <= 1.0, f"masking.random_token_prob must be in [0, 1], got {self.random_token_prob}")
        _check(
            self.mask_token_prob + self.random_token_prob <= 1.0 + 1e-9,
            f"masking.mask_token_prob + masking.random_token_prob must be <= 1, got {self.mask_token_prob + self.random_token_prob}",
        )


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak LR; small encoders tolerate 1e-3 (Cramming); bert-base presets use 5e-4
    weight_decay: float = 0.01  # BERT's value, applied to matrices only (not biases, norms, embeddings)
    decay_embeddings: bool = False  # set true to also decay embedding matrices
    betas: tuple[float, float] = (0.9, 0.98)  # RoBERTa's beta2=0.98 is steadier than 0.999 at large batch
    eps: float = 1e-6  # RoBERTa/ModernBERT value
    schedule: str = "linear"  # warmup then: linear | cosine | constant | wsd (constant then decay)
    warmup_steps: int = 100
    decay_fraction: float = 0.1  # wsd: share of the run spent decaying at the end
    min_lr_ratio: float = 0.0  # final LR as a share of peak
    clip_grad_norm: float = 1.0  # 0 turns clipping off

    def validate(self) -> None:
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        _check(self.schedule in ("linear", "cosine", "constant", "wsd"), f"optim.schedule must be linear, cosine, constant or wsd, got {self.schedule!r}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.decay_fraction <= 1, f"optim.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.clip_grad_norm >= 0, f"optim.clip_grad_norm must be >= 0, got {self.clip_grad_norm}")


@dataclass
class TrainConfig:
    max_steps: int = 0  # budgets: the first of steps, tokens, minutes that is set (> 0) ends the run
    max_tokens: int = 0
    max_minutes: float = 0.0
    global_batch_rows: int = 32  # rows per optimizer step, across accumulation and ranks
    micro_batch_rows: int = 32  # rows per forward/backward on one rank
    precision: str = "bf16"  # bf16 autocast with fp32 master weights; "fp32" for exactness checks
    compile: bool = False
    seed: int = 0  # model initialisation and loader order
    log_every_steps: int = 10
    max_bad_steps: int = 5  # non-finite losses in a row before the run stops with a checkpoint

    def validate(self) -> None:
        _check(self.max_steps >= 0, f"train.max_steps must be >= 0, got {self.max_steps}")
        _check(self.max_tokens >= 0, f"train.max_tokens must be >= 0, got {self.max_tokens}")
        _check(self.max_minutes >= 0, f"train.max_minutes must be >= 0, got {self.max_minutes}")
        _check(self.global_batch_rows > 0, f"train.global_batch_rows must be > 0, got {self.global_batch_rows}")
        _check(self.micro_batch_rows > 0, f"train.micro_batch_rows must be > 0, got {self.micro_batch_rows}")
        _check(self.precision in ("bf16", "fp32"), f"train.precision must be 'bf16' or 'fp32', got {self.precision!r}")
        _check(self.log_every_steps > 0, f"train.log_every_steps must be > 0, got {self.log_every_steps}")
        _check(self.max_bad_steps > 0, f"train.max_bad_steps must be > 0, got {self.max_bad_steps}")


@dataclass
class EvalConfig:
    every_steps: int = 200  # 0 turns periodic evaluation off
    mask_rate: float = 0.15  # fixed evaluation mask, independent of the training mask, so runs compare
    seed: int = 1234  # the evaluation mask's own seed
    max_rows: int = 0  # 0: the whole split
    micro_batch_rows: int = 64

    def validate(self) -> None:
        _check(self.every_steps >= 0, f"eval.every_steps must be >= 0, got {self.every_steps}")
        _check(0.0 < self.mask_rate < 1.0, f"eval.mask_rate must be in (0, 1), got {self.mask_rate}")
        _check(self.max_rows >= 0, f"eval.max_rows must be >= 0, got {self.max_rows}")
        _check(self.micro_batch_rows > 0, f"eval.micro_batch_rows must be > 0, got {self.micro_batch_rows}")


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 2  # last K checkpoints kept

    def validate(self) -> None:
        _check(self.every_steps >= 0, f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        _check(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> "Config":
        for f in fields(self):
            getattr(self, f.name).validate()
        return self

    def to_dict(self) -> dict:
        return asdict(self)
