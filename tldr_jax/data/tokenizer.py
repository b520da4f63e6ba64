"""WordPiece tokenizer of the local BERT / MiniLM folder (HF `tokenizers`, no transformers)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from tldr_jax.models.pretrained import text_model_dir


class Tokenizer:
    """`[CLS] tokens [SEP] [PAD]...` encoding to fixed-length int32 arrays."""

    def __init__(self, path: str | Path):
        self._tok = _HFTokenizer.from_file(str(path))
        # tokenizer.json ships padding/truncation to 128; we pad and truncate ourselves so
        # the shared object stays stateless across threads and max_len values.
        self._tok.no_padding()
        self._tok.no_truncation()
        ids = {name: self._tok.token_to_id(name) for name in ("[CLS]", "[SEP]", "[PAD]")}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"{path}: tokenizer has no {missing} token")
        self.cls_id: int = ids["[CLS]"]
        self.sep_id: int = ids["[SEP]"]
        self.pad_id: int = ids["[PAD]"]
        self.vocab_size: int = self._tok.get_vocab_size()

    def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids, mask), int32 (N, max_len); long texts keep their first max_len-2 tokens."""
        if max_len < 2:
            raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {max_len}")
        ids = np.full((len(texts), max_len), self.pad_id, np.int32)
        mask = np.zeros((len(texts), max_len), np.int32)
        for i, enc in enumerate(self._tok.encode_batch(list(texts), add_special_tokens=False)):
            row = [self.cls_id, *enc.ids[: max_len - 2], self.sep_id]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of one id sequence; special and padding tokens are dropped."""
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def decode_batch(self, ids: np.ndarray) -> list[str]:
        return self._tok.decode_batch([[int(i) for i in row] for row in np.asarray(ids)])


def load_tokenizer(model_dir: str = "") -> Tokenizer:
    """The tokenizer.json of `model_dir` ("" = the bundled all-MiniLM-L6-v2)."""
    path = text_model_dir(model_dir) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer.json in {path.parent}")
    return Tokenizer(path)
