"""Hugging Face interop: tensor-name maps between MaskedLM and BertForMaskedLM / ModernBertForMaskedLM, configs.

HF's `vocab_size` is our TRUE vocabulary size: our padded embedding/decoder rows (never used, kept at zero) are cut
on export and re-added as zeros on import, so a round trip gives identical tensors and HF logits have the same
last dimension as ours. transformers is not imported by the maps; export/import use it only to verify.
"""

from __future__ import annotations

import torch

from maskedlm.config import ModelConfig
from maskedlm.errors import UserError

# ---------------------------------------------------------------------------------------------------------------
# Key maps. Each entry: (our key, HF key suffix). The q/k/v split (BERT) and vocabulary padding are handled apart.


def _bert_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    pairs = [
        ("encoder.pos_embeddings.weight", "bert.embeddings.position_embeddings.weight"),
        ("encoder.type_embeddings.weight", "bert.embeddings.token_type_embeddings.weight"),
        ("encoder.emb_norm.weight", "bert.embeddings.LayerNorm.weight"),
        ("encoder.emb_norm.bias", "bert.embeddings.LayerNorm.bias"),
        ("head.dense.weight", "cls.predictions.transform.dense.weight"),
        ("head.dense.bias", "cls.predictions.transform.dense.bias"),
        ("head.norm.weight", "cls.predictions.transform.LayerNorm.weight"),
        ("head.norm.bias", "cls.predictions.transform.LayerNorm.bias"),
    ]
    for i in range(cfg.layers):
        ours, hf = f"encoder.blocks.{i}", f"bert.encoder.layer.{i}"
        for wb in ("weight", "bias"):
            pairs += [
                (f"{ours}.attn.proj.{wb}", f"{hf}.attention.output.dense.{wb}"),
                (f"{ours}.attn_norm.{wb}", f"{hf}.attention.output.LayerNorm.{wb}"),
                (f"{ours}.fc1.{wb}", f"{hf}.intermediate.dense.{wb}"),
                (f"{ours}.fc2.{wb}", f"{hf}.output.dense.{wb}"),
                (f"{ours}.mlp_norm.{wb}", f"{hf}.output.LayerNorm.{wb}"),
            ]
    return pairs


def _modern_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    pairs = [
        ("encoder.emb_norm.weight", "model.embeddings.norm.weight"),
        ("encoder.final_norm.weight", "model.final_norm.weight"),
        ("head.dense.weight", "head.dense.weight"),
        ("head.norm.weight", "head.norm.weight"),
    ]
    for i in range(cfg.layers):
        ours, hf = f"encoder.blocks.{i}", f"model.layers.{i}"
        if i > 0:  # ModernBERT's first layer has no attention norm (Identity)
            pairs.append((f"{ours}.attn_norm.weight", f"{hf}.attn_norm.weight"))
        pairs += [
            (f"{ours}.attn.qkv.weight", f"{hf}.attn.Wqkv.weight"),  # same [q; k; v] row order
            (f"{ours}.attn.proj.weight", f"{hf}.attn.Wo.weight"),
            (f"{ours}.mlp_norm.weight", f"{hf}.mlp_norm.weight"),
            (f"{ours}.fc1.weight", f"{hf}.mlp.Wi.weight"),  # same [input; gate] row order
            (f"{ours}.fc2.weight", f"{hf}.mlp.Wo.weight"),
        ]
    return pairs


def _vocab_keys(family: str) -> dict[str, str]:
    if family == "bert":
        return dict(
            embed="bert.embeddings.word_embeddings.weight",
            decoder="cls.predictions.decoder.weight",
            bias="cls.predictions.bias",
            bias_alias="cls.predictions.decoder.bias",
        )
    return dict(embed="model.embeddings.tok_embeddings.weight", decoder="decoder.weight", bias="decoder.bias")


def _pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    return _bert_pairs(cfg) if cfg.family == "bert" else _modern_pairs(cfg)


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our MaskedLM → the state dict of BertForMaskedLM / ModernBertForMaskedLM (true vocabulary rows only).

    Every tensor is a fresh contiguous copy (safetensors refuses shared storage); tied entries are copies too.
    """
    cfg, V = model.cfg, model.vocab_size
    sd = model.state_dict()
    out = {hf: sd[ours] for ours, hf in _pairs(cfg)}
    if cfg.family == "bert":
        for i in range(cfg.layers):
            for wb in ("weight", "bias"):
                q, k, v = sd[f"encoder.blocks.{i}.attn.qkv.{wb}"].chunk(3, dim=0)
                pre = f"bert.encoder.layer.{i}.attention.self"
                out.update({f"{pre}.query.{wb}": q, f"{pre}.key.{wb}": k, f"{pre}.value.{wb}": v})
    keys = _vocab_keys(cfg.family)
    out[keys["embed"]] = sd["encoder.tok_embeddings.weight"][:V]
    out[keys["decoder"]] = (sd["head.decoder"] if "head.decoder" in sd else sd["encoder.tok_embeddings.weight"])[:V]
    out[keys["bias"]] = sd["head.bias"][:V]
    if "bias_alias" in keys:
        out[keys["bias_alias"]] = sd["head.bias"][:V]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def tied_hf_keys(cfg: ModelConfig) -> set[str]:
    """HF keys that transformers re-ties on load, so an export need not store them twice."""
    keys = _vocab_keys(cfg.family)
    tied = {keys["bias_alias"]} if "bias_alias" in keys else set()
    if cfg.tie_embeddings:
        tied.add(keys["decoder"])
    return tied


def _normalise_hf_keys(sd: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Accept BertModel / BertForPreTraining / sentence-transformers / ModernBertModel prefixes and old TF names."""
    out = {}
    for k, v in sd.items():
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if family == "bert":
            for pre in ("0.auto_model.", "auto_model.", "model."):  # sentence-transformers wrappers
                if k.startswith(pre):
                    k = k[len(pre):]
            if k.startswith(("embeddings.", "encoder.", "pooler.")):  # BertModel: no "bert." prefix
                k = "bert." + k
        else:
            if k.startswith(("embeddings.", "layers.", "final_norm.")):  # ModernBertModel: no "model." prefix
                k = "model." + k
        out[k] = v
    return out


def from_hf_state_dict(
    sd: dict[str, torch.Tensor], cfg: ModelConfig, allow_missing_head: bool = False
) -> dict[str, torch.Tensor]:
    """HF tensors → our MaskedLM state dict (vocabulary rows padded with zeros).

    Missing encoder tensors raise UserError naming them. With allow_missing_head, head tensors that are absent
    (BertModel, sentence-transformers, ModernBertModel) are left out of the result: the caller keeps its freshly
    initialised ones (see `missing_head_keys`). Unused HF tensors (pooler, NSP head) are ignored.
    """
    from maskedlm.model import padded_vocab_size

    sd = _normalise_hf_keys(sd, cfg.family)
    V = int(cfg.vocab_size)
    Vp = padded_vocab_size(V, cfg.pad_vocab_multiple)
    keys = _vocab_keys(cfg.family)
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []

    def take(hf_key: str, ours: str, head: bool) -> None:
        if hf_key in sd:
            out[ours] = sd[hf_key]
        elif not (head and allow_missing_head):
            missing.append(hf_key)

    for ours, hf in _pairs(cfg):
        take(hf, ours, head=ours.startswith("head."))
    if cfg.family == "bert":
        for i in range(cfg.layers):
            pre = f"bert.encoder.layer.{i}.attention.self"
            for wb in ("weight", "bias"):
                parts = [f"{pre}.{n}.{wb}" for n in ("query", "key", "value")]
                if all(p in sd for p in parts):
                    out[f"encoder.blocks.{i}.attn.qkv.{wb}"] = torch.cat([sd[p] for p in parts], dim=0)
                else:
                    missing += [p for p in parts if p not in sd]

    def pad_rows(t: torch.Tensor, name: str) -> torch.Tensor:
        if t.shape[0] != V:
            raise UserError(f"{name} has {t.shape[0]} rows but the config's vocab_size is {V}: the weights and "
                            "config.json disagree")
        return torch.cat([t, t.new_zeros((Vp - V,) + tuple(t.shape[1:]))], dim=0)

    if keys["embed"] in sd:
        out["encoder.tok_embeddings.weight"] = pad_rows(sd[keys["embed"]], keys["embed"])
    else:
        missing.append(keys["embed"])
    bias = sd.get(keys["bias"], sd.get(keys.get("bias_alias", ""), None))
    if bias is not None:
        out["head.bias"] = pad_rows(bias, keys["bias"])
    elif not allow_missing_head:
        missing.append(keys["bias"])
    if not cfg.tie_embeddings:
        if keys["decoder"] in sd:
            out["head.decoder"] = pad_rows(sd[keys["decoder"]], keys["decoder"])
        elif not allow_missing_head:
            missing.append(keys["decoder"])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"the checkpoint lacks tensors a {cfg.family} model with {cfg.layers} layers needs: {shown}")
    for ours, t in out.items():
        out[ours] = t.detach().clone().contiguous()
    return out


def missing_head_keys(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> list[str]:
    """HF names of the MLM-head tensors absent from a checkpoint (to initialise fresh and report by name)."""
    sd = _normalise_hf_keys(hf_sd, cfg.family)
    keys = _vocab_keys(cfg.family)
    want = [hf for ours, hf in _pairs(cfg) if ours.startswith("head.")]
    missing = [k for k in want if k not in sd]
    if keys["bias"] not in sd and keys.get("bias_alias") not in sd:
        missing.append(keys["bias"])
    if not cfg.tie_embeddings and keys["decoder"] not in sd:
        missing.append(keys["decoder"])
    return missing


# ---------------------------------------------------------------------------------------------------------------
# Configs


def hf_config(cfg: ModelConfig, special: dict | None = None) -> dict:
    """config.json content (also the kwargs of BertConfig / ModernBertConfig) for our ModelConfig.

    special: optional {"pad", "cls", "sep", "mask", ...} token ids, written as HF's *_token_id fields.
    The modern config states "all layers global" both ways transformers has spelled it: layer_types (v5) and
    global_attn_every_n_layers=1 with global_rope_theta (v4.48+).
    """
    special = dict(special or {})
    common = dict(
        vocab_size=int(cfg.vocab_size),
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate,
        max_position_embeddings=cfg.max_positions,
        initializer_range=cfg.initializer_range,
        tie_word_embeddings=bool(cfg.tie_embeddings),
        pad_token_id=special.get("pad", 0 if cfg.family == "bert" else None),
    )
    if cfg.family == "bert":
        return dict(
            architectures=["BertForMaskedLM"],
            model_type="bert",
            **common,
            hidden_act="gelu",
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.attention_dropout,
            type_vocab_size=cfg.type_vocab_size,
            layer_norm_eps=cfg.layer_norm_eps,
            position_embedding_type="absolute",
        )
    return dict(
        architectures=["ModernBertForMaskedLM"],
        model_type="modernbert",
        **common,
        bos_token_id=special.get("cls"),
        cls_token_id=special.get("cls"),
        eos_token_id=special.get("sep"),
        sep_token_id=special.get("sep"),
        hidden_activation="gelu",
        classifier_activation="gelu",
        norm_eps=cfg.layer_norm_eps,
        norm_bias=False,
        attention_bias=False,
        mlp_bias=False,
        classifier_bias=False,
        decoder_bias=True,
        attention_dropout=cfg.attention_dropout,
        embedding_dropout=cfg.dropout,
        mlp_dropout=cfg.dropout,
        layer_types=["full_attention"] * cfg.layers,
        global_attn_every_n_layers=1,
        global_rope_theta=cfg.rope_theta,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},  # unused: no sliding layers
        },
        sparse_prediction=False,
    )


def _expect(d: dict, key: str, allowed, default) -> None:
    value = d.get(key, default)
    if value not in allowed:
        raise UserError(f"unsupported Hugging Face config: {key}={value!r} (maskedlm supports {allowed!r})")


def model_config_from_hf(d: dict) -> ModelConfig:
    """config.json of a BERT or ModernBERT checkpoint → ModelConfig; UserError for what we cannot represent."""
    model_type = d.get("model_type")
    if model_type == "bert":
        _expect(d, "hidden_act", ["gelu"], "gelu")
        _expect(d, "position_embedding_type", ["absolute"], "absolute")
        cfg = ModelConfig(
            family="bert",
            vocab_size=int(d["vocab_size"]),
            hidden=int(d.get("hidden_size", 768)),
            layers=int(d.get("num_hidden_layers", 12)),
            heads=int(d.get("num_attention_heads", 12)),
            intermediate=int(d.get("intermediate_size", 3072)),
            max_positions=int(d.get("max_position_embeddings", 512)),
            type_vocab_size=int(d.get("type_vocab_size", 2)),
            dropout=float(d.get("hidden_dropout_prob", 0.1)),
            attention_dropout=float(d.get("attention_probs_dropout_prob", 0.1)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        )
    elif model_type == "modernbert":
        for key, value, default in (
            ("hidden_activation", "gelu", "gelu"), ("classifier_activation", "gelu", "gelu"),
            ("norm_bias", False, False), ("attention_bias", False, False), ("mlp_bias", False, False),
            ("classifier_bias", False, False), ("decoder_bias", True, True),
        ):
            _expect(d, key, [value], default)
        L = int(d.get("num_hidden_layers", 22))
        layer_types = d.get("layer_types")
        if layer_types is None:
            layer_types = ["full_attention" if i % int(d.get("global_attn_every_n_layers", 3)) == 0
                           else "sliding_attention" for i in range(L)]
        if any(t != "full_attention" for t in layer_types):
            raise UserError(
                "this ModernBERT checkpoint has sliding-window (local) attention layers; maskedlm's modern family "
                "has every layer global (layer_types all 'full_attention', global_attn_every_n_layers=1)")
        rope = (d.get("rope_parameters") or {}).get("full_attention") or {}
        theta = rope.get("rope_theta", d.get("global_rope_theta", 160000.0))
        if rope.get("rope_type", "default") != "default":
            raise UserError(f"unsupported Hugging Face config: rope_type={rope.get('rope_type')!r} (only 'default')")
        cfg = ModelConfig(
            family="modern",
            vocab_size=int(d["vocab_size"]),
            hidden=int(d.get("hidden_size", 768)),
            layers=L,
            heads=int(d.get("num_attention_heads", 12)),
            intermediate=int(d.get("intermediate_size", 1152)),
            max_positions=int(d.get("max_position_embeddings", 8192)),
            dropout=float(d.get("mlp_dropout", 0.0)),
            attention_dropout=float(d.get("attention_dropout", 0.0)),
            layer_norm_eps=float(d.get("norm_eps", 1e-5)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            rope_theta=float(theta),
            tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        )
    else:
        raise UserError(f"unsupported Hugging Face model_type {model_type!r}: maskedlm imports 'bert' and 'modernbert'")
    cfg.validate()
    return cfg
