"""Tokenizers through the `tokenizers` library: load tokenizer.json, encode/decode, train a BPE."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

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
            bos_id = _config_bos(Path(folder))
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

    def save(self, folder: str | Path) -> None:
        self.tok.save(str(Path(folder) / "tokenizer.json"))


def _config_bos(folder: Path) -> int | None:
    try:
        bos = json.loads((folder / "config.json").read_text()).get("bos_token_id")
    except (OSError, ValueError, AttributeError):
        return None
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
