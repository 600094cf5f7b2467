"""Byte-level BPE tokenizer (HF `tokenizers`) with fixed special-token ids and tensor batching."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from imagen.errors import DataError

# Order fixes the ids: [PAD]=0 ... [EOS]=6; other code relies on pad_id == 0.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]")


def _build_backend() -> HFTokenizer:
    tok = HFTokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # No prefix space: decode(encode(x)) then returns x itself, not " x".
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """Byte-level BPE tokenizer: encodes any text to `[CLS] tokens [SEP]` id tensors."""

    def __init__(self, backend: HFTokenizer):
        self._tok = backend
        for i, t in enumerate(SPECIAL_TOKENS):
            if backend.token_to_id(t) != i:
                raise DataError(f"tokenizer has {t} at id {backend.token_to_id(t)}, expected {i}; "
                                "retrain it with imagen's Tokenizer.train")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 1) -> "Tokenizer":
        """Train a new byte-level BPE vocabulary on texts (any language encodes: all 256 bytes are tokens)."""
        tok = _build_backend()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator((t for t in texts if t), trainer=trainer)
        return cls(tok)

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json (a folder path gets tokenizer.json inside it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a tokenizer.json (or a folder holding one); DataError if missing or corrupt."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}; train one or point to a run folder with tokenizer.json")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a plain Exception on malformed JSON
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"cannot read tokenizer {path} ({reason}); the file is corrupt, retrain or re-copy it") from None

    # -- encoding -------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Token ids for one text, without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode(self, texts: Sequence[str] | str, max_length: int, add_special_tokens: bool = True,
               pad_to_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-encode to (input_ids LongTensor (B,T), attention_mask BoolTensor (B,T)), right-padded with 0."""
        if isinstance(texts, str):
            texts = [texts]
        extra = 2 if add_special_tokens else 0
        if max_length < extra + 1:
            raise DataError(f"max_length must be at least {extra + 1}, got {max_length}")
        rows = []
        for enc in self._tok.encode_batch([t or "" for t in texts], add_special_tokens=False):
            ids = enc.ids[: max_length - extra]  # truncate content so [SEP] always stays last
            rows.append([self.cls_id, *ids, self.sep_id] if add_special_tokens else ids)
        width = max_length if pad_to_max else max((len(r) for r in rows), default=0)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return input_ids, mask

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Ids (list or 1-D tensor) back to text; padding and special tokens dropped by default."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, ids, skip_special_tokens: bool = True) -> list[str]:
        """Decode each row of a (B,T) tensor or list of lists."""
        return [self.decode(row, skip_special_tokens) for row in ids]

    # -- vocabulary -----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None."""
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        """Token string of an id, or None."""
        return self._tok.id_to_token(i)

    pad_id = property(lambda self: 0, doc="Id of [PAD].")
    unk_id = property(lambda self: 1, doc="Id of [UNK].")
    cls_id = property(lambda self: 2, doc="Id of [CLS].")
    sep_id = property(lambda self: 3, doc="Id of [SEP].")
    mask_id = property(lambda self: 4, doc="Id of [MASK].")
    bos_id = property(lambda self: 5, doc="Id of [BOS].")
    eos_id = property(lambda self: 6, doc="Id of [EOS].")
