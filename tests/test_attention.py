"""The CPU fast path against references no one here wrote: torch's own SDPA, in fp32 and in bf16.

The explicit attention (fp32 scores and softmax, bf16 p·v) replaces SDPA only for speed on CPU under bf16; it must
give SDPA's values, honour boolean masks, be no less precise than SDPA's own bf16 kernel, and keep bf16 training at
bf16 distance from fp32.
"""

import pytest
import torch
import torch.nn.functional as F

from maskedlm.attention import attention_explicit
from maskedlm.config import ModelConfig
from maskedlm.model import MaskedLM
from maskedlm.objective import masked_cross_entropy


def qkv(dtype=torch.float32, B=2, H=3, T=17, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("with_mask", [False, True])
def test_explicit_attention_equals_sdpa_fp32(with_mask):
    q, k, v = qkv()
    mask = None
    if with_mask:  # block-diagonal (document-aware) plus a padded key; every query keeps at least itself
        seg = torch.tensor([0] * 6 + [1] * 11)
        mask = (seg[:, None] == seg[None, :])[None, None].expand(2, 1, 17, 17).clone()
        mask[1, :, :, 16] = False
        mask[1, :, 16, 16] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = attention_explicit(q, k, v, mask, 0.0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_mask", [False, True])
def test_explicit_attention_gradients_equal_sdpa_fp32(with_mask):
    """Autograd through the explicit form against autograd through torch's SDPA, fp32, with and without a mask."""
    q, k, v = (x.requires_grad_() for x in qkv(T=19, D=8, seed=2))
    mask = None
    if with_mask:
        seg = torch.tensor([0] * 7 + [1] * 12)
        mask = (seg[:, None] == seg[None, :])[None, None].expand(2, 1, 19, 19).clone()
        mask[0, :, :, 18] = False
        mask[0, :, 18, 18] = True
    dy = torch.randn(2, 3, 19, 8, generator=torch.Generator().manual_seed(3))
    ref = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v), dy)
    got = torch.autograd.grad(attention_explicit(q, k, v, mask, 0.0), (q, k, v), dy)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 64, 32), (4, 4, 128, 64)])
def test_explicit_attention_bf16_about_as_precise_as_sdpa_bf16(shape):
    B, H, T, D = shape
    q, k, v = qkv(torch.bfloat16, B, H, T, D, seed=T)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    err_sdpa = (F.scaled_dot_product_attention(q, k, v).float() - exact).abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in training: the scores must still be fp32
        err_ours = (attention_explicit(q, k, v, None, 0.0).float() - exact).abs().max()
    assert err_ours <= 2 * err_sdpa, (err_ours, err_sdpa)


@pytest.mark.parametrize("with_mask", [False, True])
def test_explicit_attention_bf16_gradients_about_as_precise_as_sdpa_bf16(with_mask):
    """The bf16 scores' backward runs bf16 matmuls (the scores' gradient rounded once, as flash attention does): q, k
    and v gradients must stay as close to fp32 autograd through SDPA as SDPA's own bf16 backward is."""
    B, H, T, D = 4, 4, 128, 64
    q, k, v = qkv(torch.bfloat16, B, H, T, D, seed=5)
    q, k = q * 1.5, k * 1.5  # sharper softmax, larger score gradients
    dy = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    mask = None
    if with_mask:
        seg = (torch.arange(T) >= 50).long()
        mask = (seg[:, None] == seg[None, :])[None, None].expand(B, 1, T, T)

    def grads(fn, dtype):
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        return torch.autograd.grad(fn(*xs), xs, dy.to(dtype))

    exact = grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), torch.float32)
    sdpa = grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = grads(lambda a, b, c: attention_explicit(a, b, c, mask, 0.0), torch.bfloat16)
    for name, o, s_, e in zip("qkv", ours, sdpa, exact):
        assert o.dtype == torch.bfloat16
        err_ours = ((o.float() - e).norm() / e.norm()).item()
        err_sdpa = ((s_.float() - e).norm() / e.norm()).item()
        assert err_ours <= 2 * err_sdpa, (name, err_ours, err_sdpa)
        assert err_ours < 1e-2, (name, err_ours)


def test_explicit_attention_without_onednn_precision_control_uses_fp32_scores(monkeypatch):
    """torch < 2.9 has no torch.backends.mkldnn.matmul.fp32_precision: the scores then come from the plain fp32
    matmul of the upcast values, which for bf16 inputs is the same product."""
    import maskedlm.attention as mm

    q, k, v = qkv(torch.bfloat16, 2, 3, 32, 16, seed=9)
    dy = torch.randn(2, 3, 32, 16, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)

    def run():
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = mm.attention_explicit(*xs, None, 0.0)
        return (y, *torch.autograd.grad(y, xs, dy))

    with_control = run()
    monkeypatch.setattr(mm, "_ONEDNN_FP32_PRECISION", False)
    calls = []
    monkeypatch.setattr(mm._Bf16Scores, "apply", lambda *a: calls.append(1))
    without = run()
    assert not calls
    torch.testing.assert_close(without[0], with_control[0])  # the forward: the same products, fp32 accumulation
    for a, b in zip(without[1:], with_control[1:]):  # gradients: one bf16 rounding of dS apart
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2


@pytest.mark.parametrize("family", ["bert", "modern"])
def test_bf16_cpu_train_step_matches_fp32(family, monkeypatch):
    """Under CPU bf16 autocast the model takes the explicit path; loss and gradients stay at bf16 distance of fp32."""
    import maskedlm.attention as mm

    calls = []
    real = mm.attention_explicit
    monkeypatch.setattr(mm, "attention_explicit", lambda *a: calls.append(1) or real(*a))
    cfg = ModelConfig(family=family, vocab_size=99, hidden=32, layers=2, heads=4, intermediate=48, max_positions=64,
                      doc_attention=True)
    torch.manual_seed(0)
    model = MaskedLM(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(5, 99, (3, 24), generator=g)
    doc = torch.zeros(3, 24, dtype=torch.bool)
    doc[:, 10] = True
    pos = torch.stack([torch.randperm(24, generator=g)[:5] for _ in range(3)])
    tgt = torch.randint(5, 99, (3, 5), generator=g)

    def loss_and_grads(bf16):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x, positions=pos, doc_starts=doc)
        loss = masked_cross_entropy(logits, tgt, reduction="mean")
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    l32, g32 = loss_and_grads(False)
    assert not calls  # fp32 stays on SDPA
    l16, g16 = loss_and_grads(True)
    assert len(calls) == cfg.layers
    assert abs(l16 - l32) < 2e-2 * abs(l32)
    assert F.cosine_similarity(g16, g32, dim=0) > 0.99
