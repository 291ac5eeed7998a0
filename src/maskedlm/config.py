"""Configuration: one dataclass per section, TOML presets, dotted overrides, validation.

Every field carries its unit in its name and a comment on why its default is what it is. Validation raises
UserError naming the key and the value. Loading presets and overrides lives here too; nothing else parses config.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Union, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from maskedlm.errors import UserError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


SEED_LIMIT = 2**63  # seeds go through torch and the counter-based hash as int64; larger ones would wrap silently


def _check_seed(key: str, seed) -> None:
    _check(isinstance(seed, int) and 0 <= seed < SEED_LIMIT, f"{key} must be an integer in [0, 2^63), got {seed!r}")


DIM_LIMIT = 2**31 - 1  # a tensor dimension; a model that large is refused later by its memory need anyway


def _check_finite(cfg) -> None:
    """Every float of every section (tuples included) is a finite number, every integer fits in 64 bits (torch,
    numpy and the counter-based hash take them so; a larger one would overflow deep inside, or wrap)."""
    for section in fields(cfg):
        table = getattr(cfg, section.name)
        for f in fields(table):
            value = getattr(table, f.name)
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, float):
                    _check(math.isfinite(v), f"{section.name}.{f.name} must be a finite number, got {value}")
                elif isinstance(v, int) and not isinstance(v, bool) and not f.name.endswith("seed"):  # seeds: own check
                    _check(-SEED_LIMIT <= v < SEED_LIMIT, f"{section.name}.{f.name} must be an integer within "
                           f"±2^63, got {v}")


@dataclass
class ModelConfig:
    family: str = "bert"  # "bert" (HF BertForMaskedLM tensors) or "modern" (HF ModernBertForMaskedLM, all layers global by default)
    vocab_size: int = 0  # 0: taken from the data's meta.json at train time
    hidden: int = 256  # bert-mini width (Turc et al. 2019, "Well-Read Students Learn Better")
    layers: int = 4
    heads: int = 4
    intermediate: int = 1024  # 4 × hidden, as in BERT; for `modern` the GeGLU width (Wi has 2 × intermediate rows)
    max_positions: int = 512  # learned positions in the bert family; RoPE (modern) has no table but we still bound seq_len
    type_vocab_size: int = 2  # BERT's segment embeddings; kept so weights load into BertForMaskedLM unchanged
    dropout: float = 0.0  # hidden dropout; 0 for short pretraining runs (Cramming, Geiping & Goldstein 2022)
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-12  # BERT's value; modern presets use 1e-5 as ModernBERT does
    initializer_range: float = 0.02  # BERT's truncated-normal std
    rope_theta: float = 160000.0  # ModernBERT's global-attention RoPE base
    pad_vocab_multiple: int = 64  # pad the embedding/decoder rows to a multiple of 64 for matmul efficiency
    doc_attention: bool = False  # block-diagonal attention from document starts (packed rows)
    # Decoder weight = input embeddings (BERT, ModernBERT): saves V×C parameters and is what HF checkpoints expect.
    tie_embeddings: bool = True
    # modern only. 1 = every layer global: on the 128-token rows `maskedlm prepare` makes by default a 128-token local
    # window would save almost no compute, and all layers then share one attention path. Released ModernBERT
    # checkpoints use 3: layers 0, 3, 6, ... are global, the others see only a local window; importing them sets these
    # three fields so their numerics hold.
    global_attn_every_n_layers: int = 1
    local_attention_tokens: int = 128  # ModernBERT's local window: a local layer's token sees ±64 tokens
    local_rope_theta: float = 10000.0  # ModernBERT's RoPE base for local layers

    def validate(self) -> None:
        _check(self.family in ("bert", "modern"), f"model.family must be 'bert' or 'modern', got {self.family!r}")
        for k in ("hidden", "layers", "heads", "intermediate", "max_positions", "type_vocab_size"):
            _check(int(getattr(self, k)) > 0, f"model.{k} must be > 0, got {getattr(self, k)}")
        for k in ("hidden", "layers", "heads", "intermediate", "max_positions", "type_vocab_size", "vocab_size",
                  "pad_vocab_multiple", "local_attention_tokens"):  # tensor dimensions: torch takes them as int64
            _check(getattr(self, k) <= DIM_LIMIT, f"model.{k} must be <= 2^31 - 1, got {getattr(self, k)}")
        _check(self.hidden % self.heads == 0, f"model.hidden ({self.hidden}) must be divisible by model.heads ({self.heads})")
        _check(self.vocab_size >= 0, f"model.vocab_size must be >= 0, got {self.vocab_size}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _check(0.0 <= self.attention_dropout < 1.0, f"model.attention_dropout must be in [0, 1), got {self.attention_dropout}")
        _check(self.pad_vocab_multiple >= 1, f"model.pad_vocab_multiple must be >= 1, got {self.pad_vocab_multiple}")
        _check(self.global_attn_every_n_layers >= 1, f"model.global_attn_every_n_layers must be >= 1, got {self.global_attn_every_n_layers}")
        _check(self.family == "modern" or self.global_attn_every_n_layers == 1,
               f"model.global_attn_every_n_layers is for the modern family (bert layers are all global), got {self.global_attn_every_n_layers}")
        for k in ("layer_norm_eps", "initializer_range", "rope_theta", "local_rope_theta"):
            _check(getattr(self, k) > 0, f"model.{k} must be > 0, got {getattr(self, k)}")
        _check(self.local_attention_tokens >= 2, f"model.local_attention_tokens must be >= 2, got {self.local_attention_tokens}")


@dataclass
class MaskingConfig:
    mask_rate: float = 0.15  # BERT (Devlin et al. 2019); Wettig et al. 2022 find higher rates can help larger models
    mask_token_prob: float = 0.8  # of selected positions: [MASK] 80%, random 10%, unchanged 10% (BERT)
    random_token_prob: float = 0.1
    seed: int = 0
    # What one masking decision covers: token (BERT), word (whole-word masking, BERT's later release), span (SpanBERT,
    # Joshi et al. 2020) or ngram (ERNIE / Megatron-LM). Token is the default because it is the published BERT objective.
    unit: str = "token"
    # Wettig et al. 2022 separate the share of tokens predicted from the share corrupted. 0 means "= mask_rate" (the
    # standard objective, where the two are the same positions).
    predict_rate: float = 0.0
    corrupt_rate: float = 0.0
    # Rate by training step: constant (mask_rate throughout), or linear / cosine from rate_start to rate_end over
    # rate_schedule_steps steps, then rate_end (e.g. 0.3 → 0.15). Keyed by step so a resumed run masks identically.
    rate_schedule: str = "constant"
    rate_start: float = 0.0  # 0: mask_rate
    rate_end: float = 0.0  # 0: mask_rate
    # Length of a linear/cosine schedule. 0: the run's total steps (train.max_steps, or the steps train.max_tokens
    # makes), filled in by train and saved in the run's config.json; a time budget alone needs it set.
    rate_schedule_steps: int = 0
    # Random replacements drawn uniformly from non-special tokens (BERT) or by corpus frequency from the data dir's
    # token_counts.npy (fairseq's freq_weighted_replacement).
    random_token_dist: str = "uniform"
    span_geometric_p: float = 0.2  # SpanBERT's span length in words ~ Geometric(0.2) ...
    span_max_words: int = 10  # ... truncated at 10 words: mean 3.8 words, as published (Joshi et al. 2020)
    max_ngram: int = 3  # n-grams of 1..3 whole words with P(n) ∝ 1/n (Megatron-LM's BERT dataset default)

    def validate(self) -> None:
        _check(0.0 < self.mask_rate < 1.0, f"masking.mask_rate must be in (0, 1), got {self.mask_rate}")
        _check(0.0 <= self.mask_token_prob <= 1.0, f"masking.mask_token_prob must be in [0, 1], got {self.mask_token_prob}")
        _check(0.0 <= self.random_token_prob <= 1.0, f"masking.random_token_prob must be in [0, 1], got {self.random_token_prob}")
        _check(
            self.mask_token_prob + self.random_token_prob <= 1.0 + 1e-9,
            f"masking.mask_token_prob + masking.random_token_prob must be <= 1, got {self.mask_token_prob + self.random_token_prob:g}",
        )
        _check_seed("masking.seed", self.seed)
        units = ("token", "word", "span", "ngram")
        _check(self.unit in units, f"masking.unit must be one of {', '.join(units)}, got {self.unit!r}")
        for k in ("predict_rate", "corrupt_rate", "rate_start", "rate_end"):
            v = getattr(self, k)
            _check(0.0 <= v < 1.0, f"masking.{k} must be in (0, 1) (or 0 for mask_rate), got {v}")
        schedules = ("constant", "linear", "cosine")
        _check(self.rate_schedule in schedules, f"masking.rate_schedule must be one of {', '.join(schedules)}, got {self.rate_schedule!r}")
        _check(self.rate_schedule_steps >= 0, f"masking.rate_schedule_steps must be >= 0, got {self.rate_schedule_steps}")
        if self.rate_schedule != "constant":
            # rate_schedule_steps 0 is allowed here: train fills it from the run's step budget (train.max_steps or
            # train.max_tokens); masking.rate_at refuses a schedule still without a length.
            _check(
                self.predict_rate == 0.0 and self.corrupt_rate == 0.0,
                f"masking.rate_schedule={self.rate_schedule!r} schedules one rate; leave masking.predict_rate and "
                f"masking.corrupt_rate at 0, got {self.predict_rate} and {self.corrupt_rate}",
            )
        dists = ("uniform", "unigram")
        _check(self.random_token_dist in dists, f"masking.random_token_dist must be uniform or unigram, got {self.random_token_dist!r}")
        _check(0.0 < self.span_geometric_p <= 1.0, f"masking.span_geometric_p must be in (0, 1], got {self.span_geometric_p}")
        _check(self.span_max_words >= 1, f"masking.span_max_words must be >= 1, got {self.span_max_words}")
        _check(self.max_ngram >= 1, f"masking.max_ngram must be >= 1, got {self.max_ngram}")


@dataclass
class OptimConfig:
    # adamw: torch's AdamW. stable_adamw: AdamW with per-tensor update clipping (Wortsman et al. 2023), as ModernBERT
    # trains; adamw stays the default until a measurement here says otherwise (bench/RESULTS.md).
    name: str = "adamw"
    lr: float = 1e-3  # peak LR; small encoders tolerate 1e-3 (Cramming); bert-base presets use 5e-4
    weight_decay: float = 0.01  # BERT's value, applied to matrices only (not biases, norms, embeddings)
    decay_embeddings: bool = False  # set true to also decay embedding matrices
    betas: tuple[float, float] = (0.9, 0.98)  # RoBERTa's beta2=0.98 is steadier than 0.999 at large batch
    eps: float = 1e-6  # RoBERTa/ModernBERT value
    schedule: str = "linear"  # warmup then: linear | cosine | constant | wsd (constant then decay)
    warmup_steps: int = 100
    decay_fraction: float = 0.1  # wsd: share of the run spent decaying at the end
    # wsd: shape of that decay: linear (MiniCPM's), cosine, or 1-sqrt (Hägele et al. 2024; ModernBERT's final decay).
    # linear by default: what every wsd run here was measured with.
    decay_shape: str = "linear"
    min_lr_ratio: float = 0.0  # final LR as a share of peak
    clip_grad_norm: float = 1.0  # 0 turns clipping off

    def validate(self) -> None:
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        _check(self.name in ("adamw", "stable_adamw", "muon"), f"optim.name must be adamw, stable_adamw or muon, got {self.name!r}")
        _check(self.schedule in ("linear", "cosine", "constant", "wsd"), f"optim.schedule must be linear, cosine, constant or wsd, got {self.schedule!r}")
        _check(self.decay_shape in ("linear", "cosine", "1-sqrt"), f"optim.decay_shape must be linear, cosine or 1-sqrt, got {self.decay_shape!r}")
        _check(self.decay_shape == "linear" or self.schedule == "wsd",
               f"optim.decay_shape shapes the decay phase of optim.schedule=wsd, got decay_shape={self.decay_shape!r} with schedule={self.schedule!r}")
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
    device: str = "auto"  # "auto": this rank's CUDA device when there is one, else "cpu"
    prefetch: bool = True  # read and mask the next steps on a background thread (masks are identical either way)
    reuse_host_memory: bool = True  # glibc: keep freed step buffers instead of re-mmapping them (1.2-1.45x per CPU step, bench/RESULTS.md)
    # Multi-process wrapping under torchrun: "ddp" replicates the weights (fastest when they fit); "fsdp2" shards
    # weights, gradients and optimizer state across ranks (torch.distributed.fsdp.fully_shard) for larger models.
    parallel: str = "ddp"
    dist_timeout_minutes: float = 10.0  # a collective waiting this long (a dead peer) fails instead of hanging
    # Batch-size warmup (ModernBERT's): the global batch grows linearly in tokens seen, from batch_warmup_start_rows
    # to global_batch_rows over the first batch_warmup_tokens, in multiples of the start. 0: off, every step full.
    batch_warmup_tokens: int = 0
    batch_warmup_start_rows: int = 0  # must divide global_batch_rows and be split evenly across ranks
    # Sequence-length phases, e.g. "64:0.3,128": rows of 64 tokens until 30% of the run's tokens, then 128. Each
    # prepared row is cut into exact shorter rows, each starting with [CLS] (no re-prepare). Empty: the prepared length.
    seq_len_phases: str = ""
    # Loss-spike guard: a step whose loss exceeds the median of the last spike_window_steps by spike_guard_nats rolls
    # back to the last checkpoint and skips the data read since. 0: off (a short run has no checkpoint to go back to).
    spike_guard_nats: float = 0.0
    spike_window_steps: int = 50
    # Choose model shape, rows per step and LR for the budget on this machine at start (autoshape.py; `--config auto`).
    auto_shape: bool = False

    def validate(self) -> None:
        _check(self.max_steps >= 0, f"train.max_steps must be >= 0, got {self.max_steps}")
        _check_seed("train.seed", self.seed)
        _check(self.max_tokens >= 0, f"train.max_tokens must be >= 0, got {self.max_tokens}")
        _check(self.max_minutes >= 0, f"train.max_minutes must be >= 0, got {self.max_minutes}")
        _check(self.global_batch_rows > 0, f"train.global_batch_rows must be > 0, got {self.global_batch_rows}")
        _check(self.micro_batch_rows > 0, f"train.micro_batch_rows must be > 0, got {self.micro_batch_rows}")
        _check(self.precision in ("bf16", "fp32"), f"train.precision must be 'bf16' or 'fp32', got {self.precision!r}")
        _check(self.log_every_steps > 0, f"train.log_every_steps must be > 0, got {self.log_every_steps}")
        _check(self.max_bad_steps > 0, f"train.max_bad_steps must be > 0, got {self.max_bad_steps}")
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"train.device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}",
        )
        _check(self.dist_timeout_minutes > 0, f"train.dist_timeout_minutes must be > 0, got {self.dist_timeout_minutes}")
        _check(self.parallel in ("ddp", "fsdp2"), f"train.parallel must be 'ddp' or 'fsdp2', got {self.parallel!r}")
        _check(self.batch_warmup_tokens >= 0, f"train.batch_warmup_tokens must be >= 0, got {self.batch_warmup_tokens}")
        if self.batch_warmup_tokens:
            g, s = self.global_batch_rows, self.batch_warmup_start_rows
            _check(0 < s < g and g % s == 0, f"train.batch_warmup_start_rows must be a divisor of train.global_batch_rows "
                                             f"({g}) below it, got {s}")
        seq_len_phases(self.seq_len_phases)  # refuses a malformed value
        _check(self.spike_guard_nats >= 0, f"train.spike_guard_nats must be >= 0, got {self.spike_guard_nats}")
        _check(self.spike_window_steps >= 3, f"train.spike_window_steps must be >= 3, got {self.spike_window_steps}")


def seq_len_phases(text: str) -> list[tuple[int, float]]:
    """train.seq_len_phases as [(row length, fraction of the run's tokens where its phase ends)], the last ending at
    1.0; [] when empty. "64:0.3,128" → [(64, 0.3), (128, 1.0)]."""
    if not text.strip():
        return []
    bad = f"train.seq_len_phases must look like '64:0.3,128' (lengths >= 8, increasing fractions in (0, 1), the last without one), got {text!r}"
    out = []
    parts = [p.strip() for p in text.split(",")]
    for i, part in enumerate(parts):
        length, colon, until = part.partition(":")
        try:
            n, f = int(length), (float(until) if colon else 1.0)
        except ValueError:
            raise UserError(bad) from None
        last = i == len(parts) - 1
        _check(n >= 8 and bool(colon) != last and (last or 0 < f < 1) and (not out or f > out[-1][1]), bad)
        out.append((n, f))
    return out


@dataclass
class EvalConfig:
    every_steps: int = 200  # 0 turns periodic evaluation off
    mask_rate: float = 0.15  # fixed evaluation mask, independent of the training mask, so runs compare
    seed: int = 1234  # the evaluation mask's own seed
    max_rows: int = 0  # 0: the whole split
    micro_batch_rows: int = 64
    # The evaluation mask's unit, apart from masking.unit: token-level by default whatever a run trains with, so runs
    # with different masking strategies are scored on the same positions. word/span/ngram score how well a
    # model fills whole units instead (then compare only runs evaluated with the same eval.* settings).
    unit: str = "token"
    # The shape of eval.unit=span / ngram units, the evaluation's own (masking.* may be ablated); published defaults as
    # in masking.*: SpanBERT's Geometric(0.2) truncated at 10 words (Joshi et al. 2020), n ≤ 3 (Megatron-LM).
    span_geometric_p: float = 0.2
    span_max_words: int = 10
    max_ngram: int = 3
    # Downstream probes at every evaluation: task directories (train.* and eval.* labelled files, an optional
    # task.json naming the task and fields), each logged as probe/<task>/<metric>. None by default: a probe costs a
    # pass over the task's examples per evaluation.
    probe_tasks: tuple[str, ...] = ()

    def validate(self) -> None:
        _check(self.every_steps >= 0, f"eval.every_steps must be >= 0, got {self.every_steps}")
        _check(all(isinstance(t, str) and t for t in self.probe_tasks),
               f"eval.probe_tasks must be a list of task directories, got {self.probe_tasks!r}")
        _check(0.0 < self.mask_rate < 1.0, f"eval.mask_rate must be in (0, 1), got {self.mask_rate}")
        _check_seed("eval.seed", self.seed)
        _check(self.max_rows >= 0, f"eval.max_rows must be >= 0, got {self.max_rows}")
        _check(self.micro_batch_rows > 0, f"eval.micro_batch_rows must be > 0, got {self.micro_batch_rows}")
        units = ("token", "word", "span", "ngram")
        _check(self.unit in units, f"eval.unit must be one of {', '.join(units)}, got {self.unit!r}")
        _check(0.0 < self.span_geometric_p <= 1.0, f"eval.span_geometric_p must be in (0, 1], got {self.span_geometric_p}")
        _check(self.span_max_words >= 1, f"eval.span_max_words must be >= 1, got {self.span_max_words}")
        _check(self.max_ngram >= 1, f"eval.max_ngram must be >= 1, got {self.max_ngram}")

    def masking(self) -> MaskingConfig:
        """The evaluation mask as a MaskingConfig: eval's rate, seed and unit; a constant rate; BERT's 80/10/10
        corruption with uniform random tokens (nothing of the run's masking.* section)."""
        return MaskingConfig(mask_rate=self.mask_rate, seed=self.seed, unit=self.unit,
                             span_geometric_p=self.span_geometric_p, span_max_words=self.span_max_words,
                             max_ngram=self.max_ngram)


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 2  # last K checkpoints kept

    def validate(self) -> None:
        _check(self.every_steps >= 0, f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        _check(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass
class DataConfig:
    # Shares of a mixture of several --data sources, by tokens, in --data order. Empty: each source's share of the
    # train tokens of all of them (a plain concatenation's proportions), so no source is up- or down-weighted unasked.
    weights: tuple[float, ...] = ()

    def validate(self) -> None:
        _check(all(w > 0 and math.isfinite(w) for w in self.weights),
               f"data.weights must be positive numbers, got {list(self.weights)}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> "Config":
        _check_finite(self)  # first: NaN passes every `a <= x <= b` test below by comparing False both ways
        for f in fields(self):
            getattr(self, f.name).validate()
        _check(not self.train.spike_guard_nats or self.checkpoint.every_steps > 0,
               "train.spike_guard_nats rolls back to the last checkpoint: it needs checkpoint.every_steps > 0, got 0")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Loading: presets, TOML files, dotted overrides. Values are coerced to each field's type (an override arrives as a
# string) and anything that cannot be coerced, or a key that does not exist, is rejected naming the key.

PRESETS_DIR = Path(__file__).parent / "configs"
AUTO_BASE = "modern-mini"  # what `--config auto` starts from before autoshape.py sets its shape

# Keys that may change between a run and its --resume: they decide when to log, evaluate and save, or how the same
# computation is spread over devices (train.parallel: DDP and FSDP2 compute the same step), never what it is.
RESUME_FREE_KEYS = frozenset({
    "train.log_every_steps", "train.prefetch", "train.reuse_host_memory", "train.device", "train.dist_timeout_minutes", "train.parallel",
    "eval.every_steps", "eval.max_rows", "eval.micro_batch_rows", "eval.probe_tasks",
    "checkpoint.every_steps", "checkpoint.keep",
})


# Keys a --resume may change with a printed note: the optimizer's schedule (peak LR, warmup, where and how it ends).
# Lowering optim.lr and resuming from the last good checkpoint is the standard recovery from a divergence, and a
# longer budget continues a finished run.
RESUME_NOTED_KEYS = frozenset({"optim.lr", "optim.warmup_steps", "optim.min_lr_ratio", "optim.decay_fraction", "optim.decay_shape",
                               "train.max_steps", "train.max_tokens", "train.max_minutes"})


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def _section_types() -> dict[str, type]:
    return {f.name: get_type_hints(Config)[f.name] for f in fields(Config)}


def _parse_scalar(text: str):
    """An override's value as TOML would read it (numbers, booleans, arrays), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(key: str, value, typ):
    origin = get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise UserError(f"{key} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e6 steps
            return int(value)
        raise UserError(f"{key} must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{key} must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{key} must be a string, got {value!r}")
    if origin in (Union, UnionType):  # a number or a word (finetune.lr = 2e-4 or auto): the first type that takes it
        for t in get_args(typ):
            try:
                return _coerce(key, value, t)
            except UserError:
                continue
        raise UserError(f"{key} must be one of {', '.join(t.__name__ for t in get_args(typ))}, got {value!r}")
    if origin is tuple and get_args(typ)[1:] == (Ellipsis,):  # any number of values: "0.7,0.3", [0.7, 0.3], a path
        if isinstance(value, str):
            value = [_parse_scalar(v.strip()) for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(key, v, get_args(typ)[0]) for v in value)
    if origin is tuple:
        args = get_args(typ)
        if isinstance(value, str):  # "0.9,0.98"
            value = [_parse_scalar(v.strip()) for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(key, v, t) for v, t in zip(value, args))
    raise UserError(f"{key}: unsupported field type {typ!r}")  # a programming error, surfaced plainly


def _unknown(key: str, known: list[str]) -> UserError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(known)}"
    return UserError(f"unknown config key {key!r}{hint}")


def all_keys() -> list[str]:
    out = []
    for section, cls in _section_types().items():
        out += [f"{section}.{f.name}" for f in fields(cls)]
    return out


def _set(cfg: Config, key: str, value) -> None:
    parts = key.split(".")
    sections = _section_types()
    if len(parts) != 2 or parts[0] not in sections:
        close = difflib.get_close_matches(key, all_keys(), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"keys look like section.key, sections: {', '.join(sections)}"
        raise UserError(f"unknown config key {key!r} ({hint})")
    section, name = parts
    hints = get_type_hints(sections[section])
    if name not in hints or name not in {f.name for f in fields(sections[section])}:
        raise _unknown(key, all_keys())
    setattr(getattr(cfg, section), name, _coerce(key, value, hints[name]))


def _apply_dict(cfg: Config, data: dict, source: str) -> None:
    for section, table in data.items():
        if not isinstance(table, dict):
            raise UserError(f"{source}: top-level key {section!r} must be a [section] table (sections: {', '.join(_section_types())})")
        if section not in _section_types():
            raise _unknown(section, list(_section_types()))
        for name, value in table.items():
            _set(cfg, f"{section}.{name}", value)


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> Config:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read config {str(path)!r}: {e}") from None
    cfg = Config()
    base = data.pop("base", None)  # `base = "bert-mini"`: start from a preset or another file, then change a few keys
    if base is not None:
        base_path = _resolve(str(base), relative_to=path.parent)
        if base_path in seen:
            raise UserError(f"{path}: `base` makes a cycle through {base_path}")
        cfg = _read_toml(base_path, seen + (path,))
    _apply_dict(cfg, data, str(path))
    return cfg


def _resolve(name: str, relative_to: Path | None = None) -> Path:
    p = Path(name)
    if relative_to is not None and not p.is_absolute() and (relative_to / p).is_file():
        return (relative_to / p).resolve()
    if p.is_file():
        return p.resolve()
    preset = PRESETS_DIR / f"{name}.toml"
    if preset.is_file() and "/" not in name:
        return preset
    raise UserError(f"config {name!r} is neither a TOML file nor a preset (presets: {', '.join(preset_names())})")


def load_config(config: "str | Path | Config | dict | None" = None, overrides=()) -> Config:
    """A preset name, a TOML file, a Config or a dict (e.g. a run's config.json), then `section.key=value` overrides."""
    if config is None:
        cfg = Config()
    elif isinstance(config, Config):
        cfg = copy.deepcopy(config)
    elif isinstance(config, dict):
        cfg = Config()
        _apply_dict(cfg, config, "config")
    elif str(config) == "auto":  # the default preset, its shape chosen at train time (autoshape.py)
        cfg = _read_toml(_resolve(AUTO_BASE))
        cfg.train.auto_shape = True
    else:
        cfg = _read_toml(_resolve(str(config)))
    for item in overrides or ():
        _set(cfg, *_split_override(item))
    return cfg.validate()


def _split_override(item, form: str = "section.key=value") -> tuple[str, object]:
    """The one override parser: `key=value` → (key, the value as TOML reads a scalar); UserError naming `form`."""
    key, eq, text = str(item).partition("=")
    if not eq or not key.strip():
        raise UserError(f"override {item!r} must look like {form}")
    return key.strip(), _parse_scalar(text.strip())


def config_from_dict(data: dict, source: str = "the saved config") -> Config:
    """The Config saved as config.json (a run dir or a checkpoint dir), validated. Anything but an object of sections
    is refused: a string there would otherwise be read as a preset name, and its config reported as the run's."""
    if not isinstance(data, dict):
        raise UserError(f"{source} is not a maskedlm config (an object of sections), got {json.dumps(data)[:40]}; "
                        "it is damaged: restore it from the checkpoint's own config.json")
    return load_config(data)


def read_config_json(path) -> Config:
    """The Config in a run's or checkpoint's config.json: one line naming the file when it is unreadable or damaged."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return config_from_dict(data, str(path))


def flat_config(cfg: Config) -> dict:
    return {f"{s}.{k}": v for s, table in cfg.to_dict().items() for k, v in table.items()}


def config_diff(a: Config, b: Config, ignore=RESUME_FREE_KEYS) -> list[str]:
    """Dotted keys whose values differ (tuples and lists compare equal, as JSON round-trips them)."""
    fa, fb = flat_config(a), flat_config(b)
    norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # noqa: E731
    return sorted(k for k in fa.keys() | fb.keys() if k not in ignore and norm(fa.get(k)) != norm(fb.get(k)))


def check_resume_config(stored: Config, cfg: Config, run_dir) -> str | None:
    """--resume takes the stored run's config: UserError for a change outside RESUME_FREE_KEYS and RESUME_NOTED_KEYS;
    a note naming the changed RESUME_NOTED_KEYS (a changed optimizer schedule), or None."""
    diff = config_diff(stored, cfg, ignore=RESUME_FREE_KEYS | RESUME_NOTED_KEYS)
    fs, fc = flat_config(stored), flat_config(cfg)
    if diff:
        shown = ", ".join(f"{k}: {fs.get(k)!r} → {fc.get(k)!r}" for k in diff)
        raise UserError(f"--resume with a different config than the run in {run_dir} ({shown}); resume with the same "
                        "config or start a new --out")
    noted = [k for k in config_diff(stored, cfg) if k in RESUME_NOTED_KEYS]
    if not noted:
        return None
    return "note: --resume with a changed optimizer schedule: " + ", ".join(f"{k}: {fs.get(k)!r} → {fc.get(k)!r}" for k in noted)

def config_hash(cfg: Config, ignore=RESUME_FREE_KEYS) -> str:
    """sha256 of the canonical JSON of the keys that decide the weights (RESUME_FREE_KEYS left out)."""
    flat = {k: v for k, v in flat_config(cfg).items() if k not in ignore}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=list).encode()).hexdigest()
