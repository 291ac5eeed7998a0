"""The network: encoder θ (embeddings + transformer blocks) and MLM head ω, in two families.

`bert` has exactly the tensors of Hugging Face BertForMaskedLM; `modern` those of ModernBertForMaskedLM (every layer
global unless set up like released ModernBERT checkpoints); hf.py holds the key maps. The head runs only at the
positions A(x) it is given (sparse prediction); the dense path is for inference. No loss, data or ranks; only torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskedlm.attention import attention
from maskedlm.errors import UserError


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Rows of the embedding/decoder matrices: the true vocabulary rounded up to `multiple` (matmul-friendly)."""
    return int(math.ceil(vocab_size / multiple) * multiple)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables in fp32, half-split layout (dims i and i + head_dim/2 rotate together), as ModernBERT uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))  # (D/2,)
    t = torch.arange(seq_len, device=device, dtype=torch.float32)  # (T,)
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()  # (T, D), (T, D)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by position; computed in fp32 (as the peer does) and cast back."""
    xf = x.float()  # (B, H, T, D)
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)  # (B, H, T, D)
    return (xf * cos + rotated * sin).to(x.dtype)  # (B, H, T, D)


def attention_bias(
    doc_starts: torch.Tensor | None, attention_mask: torch.Tensor | None, T: int, device
) -> torch.Tensor | None:
    """Boolean SDPA mask (B, 1, T, T), True = may attend; None when every token sees every token.

    Document-aware attention: a token attends only within its own document of the packed row. The row's leading
    [CLS] (and a document starting right after it) belong to the row's first segment, so [CLS] is never isolated.
    """
    allowed = None
    if doc_starts is not None:
        starts = doc_starts.to(torch.bool).clone()  # (B, T)
        starts[:, :2] = False  # [CLS] joins the first document of the row
        seg = torch.cumsum(starts.to(torch.int32), dim=1)  # (B, T)
        allowed = seg[:, :, None] == seg[:, None, :]  # (B, T, T)
    if attention_mask is not None:
        keys = attention_mask.to(torch.bool)[:, None, :]  # (B, 1, T)
        allowed = keys.expand(-1, T, -1) if allowed is None else allowed & keys  # (B, T, T)
    return None if allowed is None else allowed[:, None, :, :]  # (B, 1, T, T)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection (hf.py splits it for BERT's separate tensors)."""

    def __init__(self, hidden: int, heads: int, bias: bool, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=bias)  # rows: [q; k; v], each heads × head_dim
        self.proj = nn.Linear(hidden, hidden, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope: tuple | None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, C // self.heads)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, T, D)
        if rope is not None:
            q = apply_rope(q, *rope)  # (B, H, T, D)
            k = apply_rope(k, *rope)  # (B, H, T, D)
        y = attention(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)  # (B, T, C)


class BertBlock(nn.Module):
    """Post-LN block (BERT): x = LN(x + attn(x)); x = LN(x + fc2(gelu(fc1(x))))."""

    def __init__(self, cfg):
        super().__init__()
        self.attn = SelfAttention(cfg.hidden, cfg.heads, bias=True, dropout=cfg.attention_dropout)
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.hidden, cfg.intermediate)
        self.fc2 = nn.Linear(cfg.intermediate, cfg.hidden)
        self.mlp_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope=None) -> torch.Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, mask, None)))  # (B, T, C)
        h = F.gelu(self.fc1(x))  # (B, T, I)
        return self.mlp_norm(x + self.drop(self.fc2(h)))  # (B, T, C)


class ModernBlock(nn.Module):
    """Pre-LN block (ModernBERT), no biases, GeGLU MLP; the first block has no attention norm (the embeddings
    are already normalised), as in ModernBERT."""

    def __init__(self, cfg, first: bool):
        super().__init__()
        self.attn_norm = nn.Identity() if first else nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, bias=False)
        self.attn = SelfAttention(cfg.hidden, cfg.heads, bias=False, dropout=cfg.attention_dropout)
        self.mlp_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, bias=False)
        self.fc1 = nn.Linear(cfg.hidden, 2 * cfg.intermediate, bias=False)  # rows: [input; gate]
        self.fc2 = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope=None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), mask, rope))  # (B, T, C)
        inp, gate = self.fc1(self.mlp_norm(x)).chunk(2, dim=-1)  # (B, T, I), (B, T, I)
        return x + self.drop(self.fc2(F.gelu(inp) * gate))  # (B, T, C)


class Encoder(nn.Module):
    """θ: token embeddings (+ learned positions and segment embeddings for bert; RoPE for modern) and the blocks."""

    def __init__(self, cfg, padded_vocab: int):
        super().__init__()
        self.family = cfg.family
        self.heads = cfg.heads
        self.rope_theta = cfg.rope_theta
        self.max_positions = cfg.max_positions
        # modern: layer i is global when i % n == 0, else local (±local_attention_tokens/2, own RoPE base), as in
        # ModernBERT; n = 1 (our default) makes every layer global
        n = cfg.global_attn_every_n_layers if cfg.family == "modern" else 1
        self.is_global = [i % n == 0 for i in range(cfg.layers)]
        self.local_radius = cfg.local_attention_tokens // 2
        self.local_rope_theta = cfg.local_rope_theta
        self.tok_embeddings = nn.Embedding(padded_vocab, cfg.hidden)
        if cfg.family == "bert":
            self.pos_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden)
            self.type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
            self.emb_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
            self.blocks = nn.ModuleList(BertBlock(cfg) for _ in range(cfg.layers))
        else:
            self.emb_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, bias=False)
            self.blocks = nn.ModuleList(ModernBlock(cfg, first=(i == 0)) for i in range(cfg.layers))
            self.final_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        input_ids: torch.Tensor,
        doc_starts: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        if T > self.max_positions:
            raise ValueError(f"sequence length {T} exceeds model.max_positions {self.max_positions}")
        x = self.tok_embeddings(input_ids)  # (B, T, C)
        rope = local_rope = local_mask = None
        mask = attention_bias(doc_starts, attention_mask, T, x.device)  # (B, 1, T, T) | None
        if self.family == "bert":
            pos = torch.arange(T, device=input_ids.device)  # (T,)
            # MLM on packed rows has no sentence pairs: segment 0 everywhere; fine-tuning on text pairs passes
            # BERT's segment ids (1 for the second text), as transformers' tokenizers make them
            seg = self.type_embeddings.weight[0] if token_type_ids is None else self.type_embeddings(token_type_ids)
            x = x + seg + self.pos_embeddings(pos)  # (B, T, C)
        else:
            D = x.shape[-1] // self.heads
            rope = rope_cos_sin(T, D, self.rope_theta, x.device)  # (T, D), (T, D)
            if not all(self.is_global):
                local_rope = rope_cos_sin(T, D, self.local_rope_theta, x.device)  # (T, D), (T, D)
                pos = torch.arange(T, device=x.device)  # (T,)
                band = (pos[:, None] - pos[None, :]).abs() <= self.local_radius  # (T, T)
                local_mask = band[None, None] if mask is None else mask & band  # (B|1, 1, T, T)
        x = self.drop(self.emb_norm(x))  # (B, T, C)
        for block, is_global in zip(self.blocks, self.is_global):
            if is_global:
                x = block(x, mask, rope)  # (B, T, C)
            else:
                x = block(x, local_mask, local_rope)  # (B, T, C)
        if self.family == "modern":
            x = self.final_norm(x)  # (B, T, C)
        return x  # (B, T, C)


class MLMHead(nn.Module):
    """ω: transform (dense + GELU + LayerNorm) and the decoder bias; the decoder weight is the tied input embedding
    (passed in at call time, so it is stored once) unless model.tie_embeddings is false."""

    def __init__(self, cfg, padded_vocab: int):
        super().__init__()
        bias = cfg.family == "bert"  # ModernBERT: classifier_bias=False, norm_bias=False
        self.dense = nn.Linear(cfg.hidden, cfg.hidden, bias=bias)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, bias=bias)
        self.bias = nn.Parameter(torch.zeros(padded_vocab))  # decoder bias, both families
        self.decoder = None if cfg.tie_embeddings else nn.Parameter(torch.zeros(padded_vocab, cfg.hidden))

    def forward(self, h: torch.Tensor, tied_weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
        h = self.norm(F.gelu(self.dense(h)))  # (..., C)
        w = tied_weight if self.decoder is None else self.decoder  # (Vp, C)
        # padded rows are never predicted: slice them off before the matmul rather than after
        return F.linear(h, w[:vocab_size], self.bias[:vocab_size])  # (..., V)


class MaskedLM(nn.Module):
    """p_{θ,ω}(x_i | x̄): encoder θ, head ω; logits at the given positions only (sparse prediction)."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.family not in ("bert", "modern"):
            raise ValueError(f"model.family must be 'bert' or 'modern', got {cfg.family!r}")
        if int(cfg.vocab_size) <= 0:
            raise ValueError(f"model.vocab_size must be > 0 to build a model, got {cfg.vocab_size}")
        self.cfg = cfg
        self.vocab_size = int(cfg.vocab_size)
        self.padded_vocab_size = padded_vocab_size(self.vocab_size, cfg.pad_vocab_multiple)
        self.encoder = Encoder(cfg, self.padded_vocab_size)
        self.head = MLMHead(cfg, self.padded_vocab_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """BERT init: weights N(0, initializer_range), biases 0, norms 1; padded vocabulary rows 0 (never used,
        so they stay 0 and an export → import round trip is exact). Draws in a fixed order: deterministic."""
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
        self.head.bias.zero_()
        if self.head.decoder is not None:
            self.head.decoder.normal_(0.0, std, generator=generator)
            self.head.decoder[self.vocab_size :].zero_()
        self.encoder.tok_embeddings.weight[self.vocab_size :].zero_()

    def init_weights(self, seed: int) -> None:
        """Re-initialise from a private generator: same seed, same weights, global RNG untouched."""
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        device = self.encoder.tok_embeddings.weight.device
        if device.type != "cpu":  # draw on CPU for device-independent weights, then copy
            self.to("cpu")
            self.reset_parameters(g)
            self.to(device)
        else:
            self.reset_parameters(g)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_starts: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x̄ (B, T) → logits (B, K, V) at `positions` (B, K); positions None → dense (B, T, V), inference only."""
        if positions is None and self.training and torch.is_grad_enabled():
            # The loss is taken at A(x) only: training on dense logits would invite predicting every token.
            raise ValueError("MaskedLM.forward needs positions (A(x)) in training; dense logits are for inference")
        h = self.encoder(input_ids, doc_starts if self.cfg.doc_attention else None, attention_mask)  # (B, T, C)
        if positions is not None:
            idx = positions[:, :, None].expand(-1, -1, h.shape[-1])  # (B, K, C)
            h = torch.gather(h, 1, idx)  # (B, K, C)
        return self.head(h, self.encoder.tok_embeddings.weight, self.vocab_size)  # (B, K, V) or (B, T, V)

    def num_parameters(self) -> dict:
        """θ and ω counted separately, without the padded vocabulary rows; ω excludes the tied decoder weight."""
        pad = self.padded_vocab_size - self.vocab_size
        C = self.cfg.hidden
        theta = sum(p.numel() for p in self.encoder.parameters()) - pad * C
        omega = sum(p.numel() for p in self.head.parameters()) - pad * (1 + (C if self.head.decoder is not None else 0))
        padding = pad * (C + 1 + (C if self.head.decoder is not None else 0))
        return dict(theta=theta, omega=omega, padding=padding, padded_vocab_rows=pad)


def _meta_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of MaskedLM(cfg), built on the meta device: no memory is allocated."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in MaskedLM(cfg).state_dict().items()}


def parameter_count(cfg) -> int:
    """The model's parameter count from its config, without building it (two one- and two-layer meta models: a
    config of 100,000 layers would take minutes to build even on the meta device)."""
    one, two = (sum(math.prod(s) for s in _meta_shapes(replace(cfg, layers=n)).values()) for n in (1, 2))
    return one + (int(cfg.layers) - 1) * (two - one)


def plan_model(cfg, weights: dict | None = None, copies: int = 1, source: str = "") -> None:
    """UserError, before any memory is allocated, when the fp32 parameters (× `copies`: training adds gradients and
    two AdamW moments) cannot fit in this machine's memory, or when `weights` have other shapes than `cfg` gives."""
    need = 4 * copies * parameter_count(cfg)
    have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None
    if have and need > have:
        what = "its parameters" + (", gradients and optimizer state" if copies > 1 else "")
        raise UserError(f"{source or 'the model'}: hidden {cfg.hidden}, {cfg.layers} layers, vocabulary "
                        f"{cfg.vocab_size:,} needs about {need / 2**30:.1f} GiB for {what}; this machine has "
                        f"{have / 2**30:.1f} GiB; choose smaller model.* sizes")
    if weights is None:
        return
    for k, shape in _meta_shapes(cfg).items():
        if k in weights and tuple(weights[k].shape) != shape:
            raise UserError(f"{source or 'the model'}: the weights do not fit the config: {k} is "
                            f"{tuple(weights[k].shape)} in the weights, {shape} by the config")
