"""What a MODEL path is, and loading any of them: the on-disk layouts of a run dir, a checkpoint dir, a finetune
DIR and an export, each defined once here; `load_any_model`, which every command that takes a MODEL uses; and
`check_compatible`, whether a model can read a data dir.

Reading the checkpoint format is checkpoint.py's; reading a Hugging Face dir (key maps) is hf.py's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from maskedlm.checkpoint import CONFIG, STATE, TOKENIZER, CheckpointError, checkpoint_candidates, read_checkpoint, read_latest_name, step_dirs
from maskedlm.config import config_from_dict
from maskedlm.data.shards import DataDir
from maskedlm.errors import UserError
from maskedlm.hf import load_hf_dir
from maskedlm.model import MaskedLM, plan_model
from maskedlm.tokenizer import load_tokenizer, tokenizer_hash

CHECKPOINTS = "checkpoints"  # RUN_DIR/checkpoints/step_N: what train and import write, what a run dir is known by
FINETUNE_MARKER = ".maskedlm-finetune"  # in every `maskedlm finetune` DIR; its model is DIR/best/ (none with --probe)
EXPORT_MARKER = ".maskedlm-export"  # written into every export, so --overwrite knows the directory is one of ours


def is_run_config(path: str | Path) -> bool:
    """`path` is a config.json as `train` writes it into RUN_DIR (Config's sections), not a Hugging Face one."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(d, dict) and "model_type" not in d and isinstance(d.get("model"), dict)
            and "family" in d["model"] and "train" in d)


def is_checkpoint_dir(path: str | Path) -> bool:
    """RUN_DIR/checkpoints/step_N (or an import's): weights, config, tokenizer and its state.json."""
    return (Path(path) / STATE).is_file()


def is_run_dir(path: str | Path) -> bool:
    """A RUN_DIR: `train` (or `import`) writes config.json (Config's sections) at start, checkpoints/ at the first
    save; a run killed before then leaves only config.json, command.txt and its logs."""
    path = Path(path)
    return (path / CHECKPOINTS).is_dir() or is_run_config(path / CONFIG)


def is_run_without_checkpoint(path: str | Path) -> bool:
    """A run dir whose run has not saved yet."""
    path = Path(path)
    if is_checkpoint_dir(path) or not is_run_dir(path):
        return False
    return not (path / CHECKPOINTS).is_dir() or not step_dirs(path / CHECKPOINTS)


def is_finetune_dir(path: str | Path) -> bool:
    """A `maskedlm finetune` DIR: its model is DIR/best/ (none with --probe)."""
    return (Path(path) / FINETUNE_MARKER).is_file()


def is_export_dir(path: str | Path) -> bool:
    """A `maskedlm export` OUT: a Hugging Face dir that export wrote, so --overwrite may replace it."""
    return (Path(path) / EXPORT_MARKER).is_file()


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A run dir (→ its latest checkpoint) or a checkpoint dir."""
    path = Path(path)
    if is_checkpoint_dir(path):
        return path
    if is_run_without_checkpoint(path):
        raise UserError(f"run dir {path} has no checkpoint yet (it has not reached its first save, or was stopped "
                        "before it); wait for the first save, or pass a checkpoint dir or a run dir that has one")
    ck_root = path / CHECKPOINTS
    if ck_root.is_dir():
        latest = read_latest_name(ck_root)
        if latest and (ck_root / latest).is_dir():
            return ck_root / latest
        return step_dirs(ck_root)[-1][1]
    if not path.exists():
        raise UserError(f"model {path} does not exist")
    raise UserError(f"{path} is neither a run dir nor a checkpoint dir (no {STATE}, no checkpoints/)")


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu"):
    """(MaskedLM in eval mode, Config, tokenizers.Tokenizer or None) from a run dir (its latest checkpoint) or a
    checkpoint dir: maskedlm's own format only; load_any_model takes any MODEL path and calls this for ours.

    A damaged latest checkpoint is an error that names the previous, loadable one, rather than a silent fallback:
    inference should not quietly use older weights.
    """
    ck_dir = resolve_checkpoint_dir(path)
    try:
        ck = read_checkpoint(ck_dir, load_optimizer=False)
    except CheckpointError as e:
        others = [p for p in checkpoint_candidates(ck_dir.parent.parent) if p != ck_dir] if ck_dir.parent.name == CHECKPOINTS else []
        for p in others:
            try:
                read_checkpoint(p, load_optimizer=False)
            except CheckpointError:
                continue
            raise CheckpointError(f"{e}; the previous checkpoint {p} loads: pass it as MODEL") from None
        raise
    cfg = config_from_dict(ck.config)
    plan_model(cfg.model, weights=ck.model_state, source=str(ck_dir))
    model = MaskedLM(cfg.model)
    missing, unexpected = model.load_state_dict(ck.model_state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ck_dir}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.to(device).eval()
    tokenizer = load_tokenizer(ck_dir / TOKENIZER) if (ck_dir / TOKENIZER).is_file() else None
    return model, cfg, tokenizer


# transformers' task classes: an encoder and a task head, no MLM head (a fine-tuned DIR/best/ is one of the first two)
TASK_CLASSES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice")


def load_any_model(path, device="cpu", report=None, mlm_head: bool = True):
    """(MaskedLM in eval mode, Config, tokenizers.Tokenizer) from any MODEL path: a maskedlm run dir (its latest
    checkpoint) or checkpoint dir, a `maskedlm finetune` DIR (its best/) or a local Hugging Face BERT / ModernBERT dir
    (BertModel, BertForMaskedLM, BertForPreTraining, sentence-transformers, ModernBertForMaskedLM/Model, and the
    task classes such as finetune's best/). Every command that takes a MODEL uses it.

    MLM-head tensors a Hugging Face checkpoint lacks are initialised (BERT init, seed 0) and reported by name through
    `report` (stderr by default). mlm_head: the caller uses the MLM head ω (eval, fill, explain, score, export), so a
    fine-tuned task model, whose MLM head was dropped for a task head, is refused; False: the encoder θ is what counts
    (finetune, train --init-from) and any head is made fresh.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"model {str(path)!r} does not exist; pass a run dir, a checkpoint dir or a local Hugging Face dir (for a "
            f"Hub name, download it first, e.g. `huggingface-cli download {path} --local-dir DIR`, and pass DIR)")
    if is_finetune_dir(p):
        if not (p / "best").is_dir():
            raise UserError(f"{path} is the output of `maskedlm finetune --probe`, which keeps no model; pass the "
                            "MODEL that was probed")
        p = p / "best"
    if is_checkpoint_dir(p) or is_run_dir(p):
        return load_checkpoint_model(p, device=device)  # a run dir with no checkpoint yet is refused there, by name
    model, cfg, tok, info = load_hf_dir(p, device=device)
    task = [a for a in info["architectures"] or [] if isinstance(a, str) and a.endswith(TASK_CLASSES)]
    if mlm_head and task and info["initialised"]:
        # Its MLM head would be made up (fresh weights): the numbers, fills or export would look real and mean nothing.
        raise UserError(f"{p} is a fine-tuned {task[0]}: it has no MLM head, which this command needs; pass the model "
                        "it was fine-tuned from (finetune and train --init-from take a fine-tuned model's encoder, and "
                        "transformers loads it as it is)")
    if info["initialised"]:
        say = report or (lambda m: print(m, file=sys.stderr))
        say(f"note: {p} has no MLM head weights for {', '.join(info['initialised'])}; initialised them fresh")
    return model, cfg, tok


def check_compatible(model_cfg, tokenizer, data: DataDir) -> None:
    """Refuse data that the model cannot read: another vocabulary, another tokenizer, or rows longer than its positions."""
    if data.vocab_size != int(model_cfg.vocab_size):
        raise UserError(
            f"data {data.path} has vocab_size {data.vocab_size} but the model has {model_cfg.vocab_size}; "
            "prepare the data with the model's tokenizer"
        )
    want = data.tokenizer_hash
    if want and tokenizer is not None and tokenizer_hash(tokenizer) != want:
        raise UserError(
            f"data {data.path} was prepared with a different tokenizer than the model's (tokenizer_hash {want[:12]}… vs "
            f"{tokenizer_hash(tokenizer)[:12]}…); prepare the data with the model's tokenizer"
        )
    if data.seq_len > int(model_cfg.max_positions):
        raise UserError(
            f"data {data.path} has seq_len {data.seq_len} but the model takes at most {model_cfg.max_positions} positions; "
            "prepare the data with a smaller --seq-len"
        )
