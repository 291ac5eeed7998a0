"""`maskedlm export` and `maskedlm import`: a MODEL → a Hugging Face dir (verified with transformers when it is
installed), a Hugging Face dir → a run dir. The key maps and configs they use are hf.py's; what a MODEL is and how
it loads, models.py's. transformers is imported only to verify an export, so it stays an optional package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

import maskedlm
from maskedlm.checkpoint import WEIGHTS, save_checkpoint
from maskedlm.errors import UserError
from maskedlm.files import atomic_write_text, building, check_out, replace_dir
from maskedlm.hf import hf_config, load_hf_dir, tied_hf_keys, to_hf_state_dict
from maskedlm.models import EXPORT_MARKER, is_export_dir, is_run_dir, load_any_model
from maskedlm.tokenizer import save_tokenizer, special_ids

_PROBE_TOLERANCE = 1e-4  # export self-check: fp32 logits of the same weights agree to ~1e-6; 1e-4 flags a wrong map


def _check_out(out, overwrite: bool, tag: str, inputs, ours) -> Path:
    """files.check_out for export and import: not an input, and an existing directory only with overwrite and only
    when `ours` recognises it."""
    paths = [p for p in inputs if isinstance(p, (str, os.PathLike))]
    return check_out(out, inputs=paths, overwrite=overwrite, ours=ours, what="an export" if tag == "export" else "a run")


def _readable(d: Path) -> None:
    """Temp-file writers create 0600 files; an export or import is meant to be shared like any saved model."""
    umask = os.umask(0)
    os.umask(umask)
    for f in d.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


def _probe_ids(tok, vocab_size: int, max_positions: int) -> torch.Tensor:
    """Two probe rows: a sentence through the tokenizer and random ids, both framed by [CLS] ... [SEP]."""
    sp = special_ids(tok)
    T = min(24, max_positions)
    text_ids = tok.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False).ids[: T - 2]
    row0 = [sp.cls] + text_ids + [sp.sep]
    row0 += [sp.pad] * (T - len(row0))
    g = torch.Generator().manual_seed(0)
    row1 = [sp.cls] + torch.randint(0, vocab_size, (T - 2,), generator=g).tolist() + [sp.sep]
    return torch.tensor([row0, row1], dtype=torch.long)  # (2, T)


def verify_export(out, model, tok) -> float:
    """Load `out` with transformers (offline) and compare logits with ours on a probe batch; returns the max
    absolute difference. RuntimeError above 1e-4 or when transformers' tokenizer disagrees with ours."""
    import transformers

    bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a check, not a download: no "Loading weights" bar
    try:
        # SDPA, transformers' default, is what a user of the export gets. Its eager attention sums in another order:
        # on the tests' random ModernBERT it is 1.0e-5 away from both SDPA and us (1.5e-6 of the logits' scale).
        hm = transformers.AutoModelForMaskedLM.from_pretrained(str(out), local_files_only=True, attn_implementation="sdpa")
    finally:
        if bar:
            transformers.utils.logging.enable_progress_bar()
    hm.eval()
    ids = _probe_ids(tok, model.vocab_size, model.cfg.max_positions)  # (2, T)
    device = next(model.parameters()).device
    with torch.no_grad():
        ours = model.eval()(ids.to(device)).float().cpu()  # (2, T, V)
        theirs = hm(input_ids=ids).logits.float()  # (2, T, V)
    if ours.shape != theirs.shape:
        raise RuntimeError(f"export check failed: transformers gives logits {tuple(theirs.shape)}, ours {tuple(ours.shape)}")
    diff = (ours - theirs).abs().max().item()
    if not diff <= _PROBE_TOLERANCE:
        raise RuntimeError(f"export check failed: logits differ from transformers' by {diff:.3g} (> {_PROBE_TOLERANCE})")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = "The quick brown fox jumps over the lazy dog."
    if hf_tok(text)["input_ids"] != tok.encode(text).ids:
        raise RuntimeError("export check failed: transformers' tokenizer encodes the probe text differently from ours")
    return diff


def export(model, out, overwrite: bool = False, verify: bool = True) -> dict:
    """MODEL (run dir, checkpoint dir or HF dir) → a Hugging Face dir: config.json, model.safetensors (HF names),
    tokenizer.json + tokenizer_config.json + special_tokens_map.json. Written to a temporary dir, verified with
    transformers when it is installed, then renamed into place."""

    net, cfg, tok = load_any_model(model)
    if tok is None:
        raise UserError(f"{model} has no tokenizer.json; an export needs the tokenizer the model was trained with")
    mcfg = cfg.model if hasattr(cfg, "model") else cfg
    sp = special_ids(tok)
    if tok.get_vocab_size() > net.vocab_size:
        raise UserError(f"{model}: the tokenizer has {tok.get_vocab_size()} tokens but the model {net.vocab_size} rows")
    out = _check_out(out, overwrite, "export", [model], is_export_dir)
    with building(out, "export") as tmp:
        hf_cfg = hf_config(mcfg, special=sp.as_dict())
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        sd = {k: v.cpu() for k, v in to_hf_state_dict(net).items() if k not in tied_hf_keys(mcfg)}
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
        save_tokenizer(tok, tmp)
        tcfg_path = tmp / "tokenizer_config.json"
        tcfg = json.loads(tcfg_path.read_text())
        tcfg["model_max_length"] = int(mcfg.max_positions)  # so pipelines truncate to what the model can see
        tcfg_path.write_text(json.dumps(tcfg, indent=2) + "\n")
        (tmp / "special_ids.json").unlink(missing_ok=True)  # ours, not transformers'
        atomic_write_text(tmp / EXPORT_MARKER, json.dumps({"maskedlm": maskedlm.__version__}) + "\n")
        _readable(tmp)
        diff = None
        if verify:
            try:
                import transformers  # noqa: F401
            except ImportError:
                transformers = None
            if transformers is not None:
                diff = verify_export(tmp, net, tok)
        replace_dir(tmp, out)
    arch = hf_cfg["architectures"][0]
    check = f"verified with transformers (max |Δlogit| {diff:.2g})" if diff is not None else "not verified (transformers not installed)"
    report = f"exported {arch} ({mcfg.layers} layers, hidden {mcfg.hidden}, vocabulary {net.vocab_size}) to {out}; {check}"
    if getattr(mcfg, "doc_attention", False):
        report += ("\nnote: the model was trained with model.doc_attention (attention within each document of a packed "
                   "row); transformers attends across the whole input, which gives the same outputs on one-document inputs")
    return dict(out=str(out), architecture=arch, max_abs_diff=diff, report=report)


def import_checkpoint(hf_dir, out, overwrite: bool = False) -> dict:
    """A local HF BERT / ModernBERT dir → a maskedlm run dir (checkpoints/step_0000000, loadable as MODEL and by
    `train --init-from`). Head tensors the checkpoint lacks are initialised and named in the report."""

    check_out(out, inputs=[hf_dir], overwrite=overwrite, ours=is_run_dir, what="a run")  # before reading weights
    model, cfg, tok, info = load_hf_dir(hf_dir)
    out = _check_out(out, overwrite, "import", [hf_dir, info["weights_dir"]], is_run_dir)
    with building(out, "import") as tmp:
        tok_file = tmp / "tokenizer.source.json"
        tok_file.write_text(tok.to_str())
        state = dict(imported_from=info["source"], architectures=info["architectures"],
                     initialised_fresh=info["initialised"])
        save_checkpoint(tmp, 0, model, None, cfg.to_dict(), tok_file, state, keep=1)
        tok_file.unlink()
        atomic_write_text(tmp / "config.json", json.dumps(cfg.to_dict(), indent=2))
        _readable(tmp)
        replace_dir(tmp, out)
    n = model.num_parameters()
    fresh = (f"; initialised fresh (not in the checkpoint): {', '.join(info['initialised'])}"
             if info["initialised"] else "; MLM head taken from the checkpoint")
    report = (f"imported {cfg.model.family} ({cfg.model.layers} layers, hidden {cfg.model.hidden}, vocabulary "
              f"{cfg.model.vocab_size}; θ {n['theta']:,} ω {n['omega']:,} parameters) from {hf_dir} to {out}{fresh}")
    return dict(out=str(out), initialised=info["initialised"], report=report)
