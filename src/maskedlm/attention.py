"""Attention kernels: softmax(q kᵀ / √D) v for (B, H, T, D) tensors, by SDPA or, for bf16 on CPU, an explicit form
that SDPA's CPU kernel is slower than. model.py calls `attention`; masks are built there (attention_bias). Only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# SDPA's CPU flash kernel is slow in bf16: at BERT lengths an explicit form is faster with the same precision
# (fp32 scores and softmax, as SDPA keeps them; bf16 probabilities × v, as flash attention does). bench/RESULTS.md:
# attention forward + backward 60 → 32 ms at B 32, H 4, T 128, D 64 (→ 20 ms with _Bf16Scores).
# It materialises the (B, H, T, T) scores, so it is used only while they stay small (2^25 scores: 192 MB of fp32 +
# bf16 probabilities per layer); beyond that, and on GPUs, SDPA's fused kernels.
CPU_EXPLICIT_ATTENTION_MAX_SCORES = 1 << 25


# torch ≥ 2.9 sets oneDNN's fp32 matmul precision per backend; on older torch the scores take the plain fp32 matmul.
_ONEDNN_FP32_PRECISION = hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision")


class _Bf16Scores(torch.autograd.Function):
    """scale · q kᵀ as fp32 scores for bf16 q, k (B, H, T, D) on CPU. Forward: oneDNN multiplies the bf16 values with
    fp32 accumulation and fp32 output (mkldnn fp32_precision "bf16": lossless here, the inputs are bf16 already) at
    about twice the speed of an fp32 matmul of the upcast values. Backward: bf16 matmuls with the scores' gradient
    rounded to bf16 once, as flash attention does; q and k take bf16 gradients in any case. bench/RESULTS.md:
    attention forward + backward 36 → 20 ms at B 32, H 4, T 128, D 64; tests/test_attention.py: gradients as close to
    fp32 as SDPA's own bf16 kernel gets."""

    @staticmethod
    def forward(ctx, q, k, scale: float):
        ctx.save_for_backward(q, k)
        ctx.scale = scale
        before = torch.backends.mkldnn.matmul.fp32_precision
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        try:
            s = torch.matmul(q.float(), k.float().transpose(-2, -1))  # (B, H, T, T) fp32
        finally:
            torch.backends.mkldnn.matmul.fp32_precision = before
        return s.mul_(scale)  # (B, H, T, T)

    @staticmethod
    def backward(ctx, grad_s):
        q, k = ctx.saved_tensors
        g = (grad_s * ctx.scale).to(q.dtype)  # (B, H, T, T)
        return torch.matmul(g, k), torch.matmul(g.transpose(-2, -1), q), None  # (B, H, T, D) × 2


def attention_explicit(q, k, v, mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """softmax(q kᵀ / √D) v for q, k, v (B, H, T, D): scores and softmax in fp32, then p·v in v's dtype.
    mask: bool, True = may attend (SDPA's convention)."""
    with torch.autocast(q.device.type, enabled=False):  # autocast would take the fp32 scores matmul back to bf16
        if q.dtype == torch.bfloat16 and k.dtype == torch.bfloat16 and q.device.type == "cpu" and _ONEDNN_FP32_PRECISION:
            s = _Bf16Scores.apply(q, k, q.shape[-1] ** -0.5)  # (B, H, T, T) fp32
        else:
            s = torch.matmul(q.float(), k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, T)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))  # (B, H, T, T)
    a = torch.softmax(s, dim=-1).to(v.dtype)  # (B, H, T, T)
    if dropout_p > 0:
        a = F.dropout(a, dropout_p)  # (B, H, T, T)
    return torch.matmul(a, v)  # (B, H, T, D)


def attention(q, k, v, mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """Self-attention of q, k, v (B, H, T, D); mask: bool (B or 1, 1, T, T), True = may attend (SDPA's convention).
    The explicit form for bf16 on CPU while its scores stay under CPU_EXPLICIT_ATTENTION_MAX_SCORES, else SDPA."""
    B, H, T, _ = q.shape
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and B * H * T * T <= CPU_EXPLICIT_ATTENTION_MAX_SCORES:
        return attention_explicit(q, k, v, mask, dropout_p)  # (B, H, T, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, H, T, D)
