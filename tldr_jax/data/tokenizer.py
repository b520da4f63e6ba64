"""WordPiece tokenizer of the local BERT / MiniLM folder (HF `tokenizers`, no transformers)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from tldr_jax.models.pretrained import text_model_dir


class Tokenizer:
    """`[CLS] tokens [SEP] [PAD]...` encoding to fixed-length int32 arrays."""

    def __init__(self, tok: _HFTokenizer, source: str | Path):
        """tok: the HF tokenizer (`hf_tokenizer`); source: its folder, for messages."""
        self._tok = tok
        # tokenizer.json ships padding/truncation to 128; we pad and truncate ourselves so
        # the shared object stays stateless across threads and max_len values.
        self._tok.no_padding()
        self._tok.no_truncation()
        ids = {name: self._tok.token_to_id(name) for name in ("[CLS]", "[SEP]", "[PAD]")}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"{source}: tokenizer has no {missing} token")
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


def wordpiece_from_vocab(folder: Path) -> _HFTokenizer:
    """BERT's WordPiece tokenizer built from `vocab.txt` and `tokenizer_config.json` (what
    transformers' BertTokenizer reads), for BERT folders saved without a tokenizer.json."""
    settings = {}
    if (folder / "tokenizer_config.json").exists():
        settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    lowercase = bool(settings.get("do_lower_case", True))
    special = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    # A token is a string, or (newer transformers) an AddedToken dict with its "content".
    names = []
    for k in special:
        value = settings.get(k, f"[{k.removesuffix('_token').upper()}]")
        names.append(str(value.get("content", "")) if isinstance(value, dict) else str(value))
    tok = _HFTokenizer(models.WordPiece.from_file(str(folder / "vocab.txt"), unk_token=names[0]))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(settings.get("tokenize_chinese_chars", True)),
        strip_accents=settings.get("strip_accents"),  # None: follows lowercase, as BERT's
        lowercase=lowercase,
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([n for n in names if tok.token_to_id(n) is not None])
    cls, sep = names[3], names[1]
    if tok.token_to_id(cls) is not None and tok.token_to_id(sep) is not None:
        tok.post_processor = processors.BertProcessing(
            (sep, tok.token_to_id(sep)), (cls, tok.token_to_id(cls))
        )
    return tok


def hf_tokenizer(model_dir: str | Path = "") -> _HFTokenizer:
    """The `tokenizers.Tokenizer` of a BERT folder ("" = the bundled all-MiniLM-L6-v2): its
    tokenizer.json, or, where the folder has none, BERT's WordPiece over its vocab.txt."""
    folder = text_model_dir(str(model_dir))
    if (folder / "tokenizer.json").exists():
        return _HFTokenizer.from_file(str(folder / "tokenizer.json"))
    if (folder / "vocab.txt").exists():
        return wordpiece_from_vocab(folder)
    raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {folder}")


def load_tokenizer(model_dir: str = "") -> Tokenizer:
    """The tokenizer of `model_dir` ("" = the bundled all-MiniLM-L6-v2), see `hf_tokenizer`."""
    return Tokenizer(hf_tokenizer(model_dir), text_model_dir(model_dir))
