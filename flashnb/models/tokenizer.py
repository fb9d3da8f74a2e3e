"""Tokenizers through the `tokenizers` library: load tokenizer.json, encode/decode, train a BPE, and save
them so that transformers' `AutoTokenizer` encodes exactly as flashnb does."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from flashnb.errors import FlashnbError

# OPT's special tokens and ids: <s>=0, <pad>=1, </s>=2 (OPT's BOS and EOS), <unk>=3.
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]


class Tokenizer:
    """A tokenizer.json with the model's BOS id; `encode` prepends BOS like OPT's tokenizer does."""

    def __init__(self, tok: _HFTokenizer, bos_id: int | None):
        self.tok, self.bos_id = tok, bos_id

    @classmethod
    def from_folder(cls, folder: str | Path, bos_id: int | None = None) -> "Tokenizer":
        """The folder's tokenizer.json; the start token is `bos_id`, else the folder's config.json
        `bos_token_id` (OPT: 2), else none."""
        f = Path(folder) / "tokenizer.json"
        if bos_id is None:
            bos_id = config_bos(Path(folder))
        if not f.is_file():
            raise FlashnbError(f"{f} is missing: flashnb needs the model's tokenizer.json "
                               "(save it with tokenizer.save_pretrained(folder))")
        try:
            return cls(_HFTokenizer.from_file(str(f)), bos_id)
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise FlashnbError(f"{f} cannot be read as a tokenizers file ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def pieces(self, ids: list[int]) -> list[str]:
        """The text of each token on its own, special tokens by name ("</s>"): for drawing tokens one by one."""
        return [self.tok.decode([i], skip_special_tokens=False) for i in ids]

    def save(self, folder: str | Path) -> None:
        """Write `folder`/tokenizer.json and, for transformers' `AutoTokenizer`, tokenizer_config.json and
        special_tokens_map.json: the same ids as `encode` (the start token added by tokenizer.json's post
        processor), OPT's special tokens, padding on the left (for batched generation). The model's
        config.json, when already in `folder`, gives the context length."""
        folder = Path(folder)
        special = {name: t for name, t in (("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", "<pad>"))
                   if self.tok.token_to_id(t) is not None}
        if self.bos_id is not None:
            bos = self.tok.id_to_token(self.bos_id)
            special = {"bos_token": bos, **special}
            self.tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, self.bos_id)])
        self.tok.save(str(folder / "tokenizer.json"))
        context = _config(folder).get("max_position_embeddings")
        hf = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "padding_side": "left",
              "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"]}
        if isinstance(context, int) and not isinstance(context, bool):
            hf["model_max_length"] = context
        (folder / "tokenizer_config.json").write_text(json.dumps(hf, indent=2) + "\n")
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _config(folder: Path) -> dict:
    """The folder's config.json as a dict; {} when it is missing or unreadable."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def config_bos(folder: Path) -> int | None:
    bos = _config(folder).get("bos_token_id")
    return bos if isinstance(bos, int) and not isinstance(bos, bool) and bos >= 0 else None


def train_bpe(texts: list[str], vocab_size: int, bos_id: int = 2) -> Tokenizer:
    """A byte-level BPE tokenizer of `vocab_size` entries (OPT's special tokens first) fitted on texts."""
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, bos_id)
