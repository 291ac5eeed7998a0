"""One fine-tuning step, maskedlm's TaskModel against transformers' ModernBertForSequenceClassification on identical
weights and batches: ms per step (forward, backward, AdamW), interleaved rounds. A benchmark, not a test.

    python bench/finetune_step.py RUN_DIR [--threads 2] [--batch 32] [--max-len 128]
"""

from __future__ import annotations

import argparse
import time

import torch


def batches(n: int, batch: int, max_len: int, vocab: int) -> list[tuple]:
    """Random ids with random lengths in [20, max_len): the padding a fine-tuning batch has."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        lens = torch.randint(20, max_len, (batch,), generator=g)
        mask = (torch.arange(int(lens.max()))[None] < lens[:, None]).long()
        ids = torch.randint(5, vocab, mask.shape, generator=g) * mask
        out.append((ids, mask, torch.randint(0, 3, (batch,), generator=g)))
    return out


def timed(step, data, autocast) -> float:
    t = time.perf_counter()
    for ids, mask, y in data:
        with autocast():
            logits = step(ids, mask)
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
        step.opt.step()
        step.opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t) / len(data) * 1000


def main() -> None:
    import contextlib

    import transformers

    from maskedlm.models import load_any_model
    from maskedlm.tasks.heads import TaskModel, hf_task_config, to_hf_task_state_dict

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a maskedlm run dir of a modern model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    net, cfg, _ = load_any_model(a.model)
    ours = TaskModel.from_mlm(net, "classify", 3, 0.0, 0).train()
    hcfg = {k: v for k, v in hf_task_config(ours, ["a", "b", "c"], {}).items() if k != "architectures"}
    peer = transformers.ModernBertForSequenceClassification(transformers.ModernBertConfig(**hcfg)).train()
    peer.load_state_dict(to_hf_task_state_dict(ours))
    data = batches(12, a.batch, a.max_len, cfg.model.vocab_size)
    with torch.no_grad():
        ids, mask, _ = data[0]
        diff = (ours.eval()(ids, mask) - peer.eval()(input_ids=ids, attention_mask=mask).logits).abs().max()
        ours.train(), peer.train()
    print(f"max |logits difference| {diff.item():.2e}")

    def ours_step(ids, mask):
        return ours(ids, mask)

    def peer_step(ids, mask):
        return peer(input_ids=ids, attention_mask=mask).logits

    ours_step.opt = torch.optim.AdamW(ours.parameters(), lr=1e-5)
    peer_step.opt = torch.optim.AdamW(peer.parameters(), lr=1e-5)
    fp32 = contextlib.nullcontext

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    for r in range(a.rounds):
        row = {name: timed(step, data, ac) for name, step, ac in (
            ("maskedlm fp32", ours_step, fp32), ("transformers fp32", peer_step, fp32), ("maskedlm bf16", ours_step, bf16))}
        print(f"round {r}: " + ", ".join(f"{k} {v:.0f} ms/step" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
