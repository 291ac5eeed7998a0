"""Tokenizers: train WordPiece / byte-level BPE / Unigram with Hugging Face `tokenizers`, or load an existing one.

Every tokenizer we write has the special tokens [PAD] [UNK] [CLS] [SEP] [MASK] and a tokenizer.json that transformers'
PreTrainedTokenizerFast loads. Loading also accepts a Hugging Face tokenizer dir (tokenizer.json, or only a BERT
vocab.txt). Reading corpora is data/corpus.py's job; this module only turns text into a vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import astuple, dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from maskedlm.data.corpus import iter_corpus_texts, resolve_inputs
from maskedlm.errors import UserError
from maskedlm.files import atomic_write_text, building, check_out, replace_dir

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
KINDS = ("wordpiece", "bpe", "unigram")
# 4× the largest vocabularies in use (Gemma's 256k); beyond it the trainer's pair tables need tens of GB and die
# in Rust without a message.
MAX_VOCAB_SIZE = 1 << 20
# Alternative spellings accepted when loading someone else's tokenizer (RoBERTa / ModernBERT-style first).
_SPELLINGS = {
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "cls": ("[CLS]", "<s>", "<cls>"),
    "sep": ("[SEP]", "</s>", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
}


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    def all(self) -> tuple[int, ...]:
        return astuple(self)

    def as_dict(self) -> dict[str, int]:
        return {"pad": self.pad, "unk": self.unk, "cls": self.cls, "sep": self.sep, "mask": self.mask}


def special_ids(tok: Tokenizer) -> SpecialIds:
    """The ids of the five special tokens; UserError naming the ones the tokenizer lacks."""
    found, missing = {}, []
    for role, spellings in _SPELLINGS.items():
        ids = [tok.token_to_id(s) for s in spellings]
        ids = [i for i in ids if i is not None]
        if ids:
            found[role] = ids[0]
        else:
            missing.append(spellings[0])
    if missing:
        raise UserError(
            f"tokenizer has no {', '.join(missing)} token (MLM needs [PAD] [UNK] [CLS] [SEP] [MASK]); "
            "train one with `maskedlm tokenizer train` or add the tokens"
        )
    return SpecialIds(**found)


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON (sorted keys, no whitespace), so equal tokenizers hash equal."""
    canon = json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def _build(kind: str, lowercase: bool, vocab_size: int) -> tuple[Tokenizer, object]:
    special = list(SPECIAL_TOKENS)
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        # BERT's own normalizer: accents stripped only with lowercasing, as in bert-base-uncased vs -cased.
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special, continuing_subword_prefix="##")
    elif kind == "bpe":
        # Byte-level BPE (GPT-2 / RoBERTa): no unknown characters, so [UNK] is never produced but kept for the format.
        tok = Tokenizer(models.BPE(unk_token=None))
        seq = [normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else [])
        tok.normalizer = normalizers.Sequence(seq)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        seq = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
        tok.normalizer = normalizers.Sequence(seq)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special, unk_token="[UNK]")
    else:
        raise UserError(f"tokenizer kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return tok, trainer


def _post_processor(tok: Tokenizer) -> processors.TemplateProcessing:
    # BERT's "[CLS] A [SEP]" / "[CLS] A [SEP] B [SEP]" so transformers' tokenizer(text) matches what models saw.
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    return processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )


def save_tokenizer(tok: Tokenizer, out: str | Path, lowercase: bool | None = None) -> Path:
    """Write tokenizer.json, special_ids.json and the small transformers side files into `out` (each atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sp = special_ids(tok)
    names = {role: tok.id_to_token(i) for role, i in sp.as_dict().items()}
    atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=True))
    atomic_write_text(out / "special_ids.json", json.dumps(sp.as_dict(), indent=2) + "\n")
    # So PreTrainedTokenizerFast.from_pretrained(out) knows which token is the mask, pad, ... without arguments.
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(1e30)}  # transformers' "no limit"
    cfg.update({f"{role}_token": name for role, name in names.items()})
    if lowercase is not None:
        cfg["do_lower_case"] = lowercase
    atomic_write_text(out / "tokenizer_config.json", json.dumps(cfg, indent=2) + "\n")
    atomic_write_text(out / "special_tokens_map.json", json.dumps({f"{r}_token": n for r, n in names.items()}, indent=2) + "\n")
    return out / "tokenizer.json"


def train_tokenizer(
    inputs, vocab_size: int, kind: str, out, lowercase: bool = False, input_format: str | None = None,
    text_field: str = "text", overwrite: bool = False,
) -> Path:
    """Train a `kind` tokenizer of `vocab_size` tokens on the documents of `inputs`; returns out/tokenizer.json.
    An existing tokenizer in `out` is replaced only with `overwrite`; any other non-empty `out` is refused."""
    kind = str(kind).lower()
    if int(vocab_size) > MAX_VOCAB_SIZE:
        raise UserError(f"vocab_size {vocab_size} is larger than maskedlm trains ({MAX_VOCAB_SIZE:,}); the tokenizer "
                        "trainer would need tens of GB; choose a smaller --vocab-size")
    if int(vocab_size) < len(SPECIAL_TOKENS) + 1:
        raise UserError(f"vocab_size must be > {len(SPECIAL_TOKENS)} (the special tokens), got {vocab_size}")
    if kind == "bpe" and int(vocab_size) < 256 + len(SPECIAL_TOKENS) + 1:
        raise UserError(f"vocab_size for byte-level bpe must be > {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens), got {vocab_size}")
    named = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    check_out(out, inputs=[*named, *resolve_inputs(named)], overwrite=overwrite, ours=is_tokenizer_dir,
              what="a tokenizer")
    tok, trainer = _build(kind, lowercase, int(vocab_size))
    trainer.show_progress = sys.stderr.isatty()  # no bar noise in logs and tests
    stats: dict = {}
    texts = iter_corpus_texts(inputs, input_format=input_format, text_field=text_field, stats=stats)
    tok.train_from_iterator(texts, trainer=trainer)
    if stats.get("documents", 0) == 0:
        raise UserError(f"no text found in {', '.join(map(str, inputs))}; nothing to train a tokenizer on")
    if tok.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise UserError("the tokenizer learned no tokens beyond the special ones; give it more text")
    tok.post_processor = _post_processor(tok)
    with building(out, "tokenizer") as tmp:  # whole or not at all: a full disk leaves the old tokenizer, or nothing
        save_tokenizer(tok, tmp, lowercase=lowercase)
        replace_dir(tmp, out)
    return Path(out) / "tokenizer.json"


def is_tokenizer_dir(d: Path) -> bool:
    """A directory `save_tokenizer` wrote (special_ids.json is ours alone)."""
    return (Path(d) / "tokenizer.json").is_file() and (Path(d) / "special_ids.json").is_file()


def _from_vocab_txt(vocab: Path, lowercase: bool) -> Tokenizer:
    try:
        model = models.WordPiece.from_file(str(vocab), unk_token="[UNK]")
    except Exception as e:  # the Rust error says which line is bad
        raise UserError(f"cannot read WordPiece vocabulary {vocab}: {e}") from None
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    present = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None]
    tok.add_special_tokens(present)
    if "[CLS]" in present and "[SEP]" in present:
        tok.post_processor = _post_processor(tok)
    return tok


def load_tokenizer(path) -> Tokenizer:
    """A tokenizer from a dir holding tokenizer.json (ours or Hugging Face's) or vocab.txt (BERT), or the file itself."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"tokenizer not found: {path} (give a dir with tokenizer.json or vocab.txt, or a tokenizer.json)")
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        elif (p / "vocab.txt").is_file():
            lowercase = True  # BERT's default (bert-base-uncased) when tokenizer_config.json does not say
            cfg_path = p / "tokenizer_config.json"
            if cfg_path.is_file():
                try:
                    lowercase = bool(json.loads(cfg_path.read_text(encoding="utf-8")).get("do_lower_case", True))
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                    raise UserError(f"{cfg_path} is not valid JSON") from None
            return _from_vocab_txt(p / "vocab.txt", lowercase)
        else:
            raise UserError(f"{path} has neither tokenizer.json nor vocab.txt; give a tokenizer dir or file")
    if p.name.endswith(".txt"):
        return _from_vocab_txt(p, lowercase=True)
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load tokenizer {p}: {first}") from None
    # A Hugging Face tokenizer.json may carry padding/truncation to a fixed length (sentence-transformers ships
    # 128): packing needs the raw token stream, so both are switched off here, for every caller.
    tok.no_padding()
    tok.no_truncation()
    return tok
