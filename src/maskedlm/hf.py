"""Hugging Face layouts: key maps and configs for BertForMaskedLM / ModernBertForMaskedLM, and reading an HF dir.

HF's `vocab_size` is our TRUE vocabulary size: padded embedding/decoder rows (never used, kept at zero) are cut on
export and re-added as zeros on import, so a round trip gives identical tensors and logits of the same width.
Offline and safetensors only; transformers is never needed to load or convert. Export and import: interop.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from maskedlm.config import Config, ModelConfig
from maskedlm.errors import UserError
from maskedlm.model import MaskedLM, padded_vocab_size, plan_model
from maskedlm.tokenizer import load_tokenizer, special_ids

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


# Long: one pass over every tensor family (mapped pairs, split q/k/v, padded vocabulary rows), each naming what is missing.
def from_hf_state_dict(
    sd: dict[str, torch.Tensor], cfg: ModelConfig, allow_missing_head: bool = False
) -> dict[str, torch.Tensor]:
    """HF tensors → our MaskedLM state dict (vocabulary rows padded with zeros).

    Missing encoder tensors raise UserError naming them. With allow_missing_head, head tensors that are absent
    (BertModel, sentence-transformers, ModernBertModel) are left out of the result: the caller keeps its freshly
    initialised ones (see `missing_head_keys`). Unused HF tensors (pooler, NSP head) are ignored.
    """
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
    # no copies beyond the q/k/v concatenation and vocabulary padding: load_state_dict copies into the model anyway,
    # and a bert-base checkpoint held three times over is memory a laptop may not have
    return {k: t.detach().contiguous() for k, t in out.items()}


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
    """config.json content (also the kwargs of BertConfig / ModernBertConfig) for our ModelConfig: one keyword per
    field of transformers' config, listed flat so each is easy to check.

    special: optional {"pad", "cls", "sep", "mask", ...} token ids, written as HF's *_token_id fields.
    The modern config states which layers are global (all, by default) both ways transformers has spelled it:
    layer_types (v5) and global_attn_every_n_layers with global/local_rope_theta (v4.48+).
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
        return dict(architectures=["BertForMaskedLM"], model_type="bert", **common, **_bert_fields(cfg))
    return dict(architectures=["ModernBertForMaskedLM"], model_type="modernbert", **common, **_modern_fields(cfg, special))


def _bert_fields(cfg: ModelConfig) -> dict:
    return dict(
        hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps,
        position_embedding_type="absolute",
    )


def _modern_fields(cfg: ModelConfig, special: dict) -> dict:
    n = cfg.global_attn_every_n_layers
    return dict(
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
        layer_types=[_layer_type(i, n) for i in range(cfg.layers)],
        global_attn_every_n_layers=n,
        local_attention=cfg.local_attention_tokens,
        global_rope_theta=cfg.rope_theta,
        local_rope_theta=cfg.local_rope_theta,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta},
        },
        sparse_prediction=False,
    )


def _layer_type(i: int, every_n: int) -> str:
    return "full_attention" if i % every_n == 0 else "sliding_attention"


def _expect(d: dict, key: str, allowed, default) -> None:
    value = d.get(key, default)
    if value not in allowed:
        raise UserError(f"unsupported Hugging Face config: {key}={value!r} (maskedlm supports {allowed!r})")


# Long: the inverse of hf_config, field by field for both architectures, refusing what ModelConfig cannot express.
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
        if layer_types is None:  # transformers < 5 spelled the pattern with one number
            layer_types = [_layer_type(i, int(d.get("global_attn_every_n_layers", 3))) for i in range(L)]
        globals_ = [i for i, t in enumerate(layer_types) if t == "full_attention"]
        every_n = globals_[1] if len(globals_) > 1 else L
        if len(layer_types) != L or any(t != _layer_type(i, every_n) for i, t in enumerate(layer_types)):
            raise UserError(
                f"unsupported ModernBERT layer_types {layer_types!r}: maskedlm reads the pattern where every n-th "
                "layer (0, n, 2n, ...) is 'full_attention' and the others 'sliding_attention'")
        ropes = d.get("rope_parameters") or {}
        rope, local_rope = ropes.get("full_attention") or {}, ropes.get("sliding_attention") or {}
        theta = rope.get("rope_theta", d.get("global_rope_theta", 160000.0))
        local_theta = local_rope.get("rope_theta", d.get("local_rope_theta", 10000.0))
        for r in (rope, local_rope):
            if r.get("rope_type", "default") != "default":
                raise UserError(f"unsupported Hugging Face config: rope_type={r.get('rope_type')!r} (only 'default')")
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
            global_attn_every_n_layers=every_n,
            local_attention_tokens=int(d.get("local_attention", 128)),
            local_rope_theta=float(local_theta),
        )
    else:
        raise UserError(f"unsupported Hugging Face model_type {model_type!r}: maskedlm imports 'bert' and 'modernbert'")
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Loading a Hugging Face directory (import, --init-from, inference on HF dirs). Offline only; safetensors only.

_WEIGHTS = "model.safetensors"
_WEIGHTS_INDEX = "model.safetensors.index.json"


def _resolve_hf_dir(hf_dir) -> Path:
    """The directory holding config.json + weights: HF_DIR itself, or a sentence-transformers folder's Transformer
    module (modules.json names its path, "" or "0_Transformer")."""
    p = Path(hf_dir)
    if not p.exists():
        raise UserError(
            f"{hf_dir} is not a local directory; maskedlm reads checkpoints offline from local directories only. "
            f"If it is a Hugging Face Hub name, download it first (e.g. `huggingface-cli download {hf_dir} "
            "--local-dir DIR`) and pass DIR")
    if not p.is_dir():
        raise UserError(f"{hf_dir} is a file; pass the Hugging Face checkpoint directory that holds config.json")
    modules = p / "modules.json"
    if modules.is_file() and not (p / "config.json").is_file():
        try:
            entries = json.loads(modules.read_text())
            sub = next(e.get("path", "") for e in entries if str(e.get("type", "")).endswith("models.Transformer"))
        except (ValueError, StopIteration, AttributeError, TypeError):
            raise UserError(f"{modules} names no sentence_transformers Transformer module") from None
        p = p / sub
    if not (p / "config.json").is_file():
        raise UserError(f"{hf_dir} is not a Hugging Face BERT or ModernBERT checkpoint dir: it has no config.json")
    return p


def _read_hf_weights(d) -> dict[str, torch.Tensor]:
    def load(path):
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types on a bad header or short file
            raise UserError(f"cannot read weights {path}: {e}") from None

    if (d / _WEIGHTS).is_file():
        return load(d / _WEIGHTS)
    if (d / _WEIGHTS_INDEX).is_file():
        try:
            shards = sorted(set(json.loads((d / _WEIGHTS_INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{d / _WEIGHTS_INDEX} is not a valid safetensors index") from None
        sd = {}
        for s in shards:
            if not (d / s).is_file():
                raise UserError(f"{d} lacks the weight shard {s} named in {_WEIGHTS_INDEX}")
            sd.update(load(d / s))
        return sd
    if any((d / n).is_file() for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")):
        raise UserError(
            f"{d} has weights only as a pickle/TF/Flax file; maskedlm reads safetensors only (it never unpickles "
            "downloaded files). Convert once with transformers: AutoModel.from_pretrained(DIR)"
            ".save_pretrained(NEW_DIR, safe_serialization=True), then pass NEW_DIR")
    raise UserError(f"{d} has no {_WEIGHTS}: not a complete Hugging Face checkpoint")


def load_hf_dir(hf_dir, device="cpu"):
    """(model, Config, tokenizer, info) where info names the source and the head tensors initialised fresh."""
    root = _resolve_hf_dir(hf_dir)
    try:
        hf_cfg = json.loads((root / "config.json").read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"{root / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(hf_cfg, dict):
        raise UserError(f"{root / 'config.json'} is not a JSON object")
    mcfg = model_config_from_hf(hf_cfg)
    hf_sd = _read_hf_weights(root)
    missing_head = missing_head_keys(hf_sd, mcfg)
    ours = from_hf_state_dict(hf_sd, mcfg, allow_missing_head=True)

    plan_model(mcfg, weights=ours, source=str(root))  # sizes and shapes checked before anything is allocated
    model = MaskedLM(mcfg)
    model.init_weights(0)  # fresh head tensors (when absent) are the same on every import
    try:
        result = model.load_state_dict(ours, strict=False)
    except RuntimeError as e:  # shape mismatch: config.json and the weights disagree
        raise UserError(f"{root}: the weights do not fit its config.json ({str(e).splitlines()[-1].strip()})") from None
    unexpected_missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if unexpected_missing or result.unexpected_keys:
        raise UserError(f"{root}: weights do not fit (missing {unexpected_missing[:5]}, unexpected {result.unexpected_keys[:5]})")

    tok_dir = root if any((root / n).is_file() for n in ("tokenizer.json", "vocab.txt")) else Path(hf_dir)
    if not any((tok_dir / n).is_file() for n in ("tokenizer.json", "vocab.txt")):
        raise UserError(f"{hf_dir} has no tokenizer (tokenizer.json or vocab.txt); copy the model's tokenizer files into it")
    tok = load_tokenizer(tok_dir)  # with padding/truncation switched off, as packing needs
    special_ids(tok)  # UserError if [MASK]/[CLS]/[SEP] are missing
    if tok.get_vocab_size() > mcfg.vocab_size:
        raise UserError(
            f"the tokenizer in {tok_dir} has {tok.get_vocab_size()} tokens but the weights have {mcfg.vocab_size} "
            "vocabulary rows: they do not belong together")
    info = dict(source=str(Path(hf_dir)), weights_dir=str(root), architectures=hf_cfg.get("architectures"),
                initialised=missing_head)
    return model.to(device).eval(), Config(model=mcfg), tok, info
