"""Input pipelines over an in-memory `ImageTextSet`.

Training: a grain `MapDataset` over global steps; step s maps to a slice of a per-epoch
permutation of the rows (seeded by (seed, epoch); the remainder of an epoch is dropped with
`drop_remainder`), each process keeps its contiguous slice of that global batch and only
fetches those rows. The global batch (rows, images, caption draws) is a function of
(seed, step) alone, so it is the same for any process count, and grain's
`get_state()` / `set_state()` (the next step) resume it exactly.

Evaluation: plain ordered numpy batches, padded to a fixed size with a `valid` mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np

from tldr_jax.data.dataset import ImageTextSet
from tldr_jax.data.images import normalize

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def process_slice(batch_len: int, process_index: int, process_count: int) -> slice:
    """Rows of a global batch owned by one process: contiguous, in process order.

    For batch_len divisible by process_count each process gets batch_len // process_count
    rows; otherwise (a short last batch without drop_remainder) the first processes get
    one row more.
    """
    per, extra = divmod(batch_len, process_count)
    start = process_index * per + min(process_index, extra)
    return slice(start, start + per + (process_index < extra))


def _hash(seed: int, positions: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, position): a counter-based random stream, so the draw for a
    stream position never depends on which process computes it or when."""
    with np.errstate(over="ignore"):
        z = positions.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


class _Batch:
    """Global step -> this process's slice of that step's global batch, as features.

    Step s of epoch e = s // steps_per_epoch takes the rows at positions
    [b * batch_size, (b + 1) * batch_size) of a permutation seeded by (seed, e). Computing a
    whole batch at once keeps the per-step cost to a few numpy calls.
    """

    def __init__(
        self,
        ds: ImageTextSet,
        batch_size: int,
        seed: int,
        tokenizer: Any,
        max_len: int,
        drop_remainder: bool,
    ):
        self.ds = ds
        self.batch_size = batch_size
        self.seed = seed
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.num_captions = np.array([len(c) for c in ds.captions], np.uint64)
        n = len(ds)
        self.steps_per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
        self._permutation: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))
        self.process_index = jax.process_index()
        self.process_count = jax.process_count()

    def permutation(self, epoch: int) -> np.ndarray:
        cached_epoch, perm = self._permutation  # one epoch cached; a tuple swap is atomic
        if cached_epoch != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.ds))
            self._permutation = (epoch, perm)
        return perm

    def __call__(self, step: int, _: Any) -> dict[str, np.ndarray]:
        n = len(self.ds)
        epoch, b = divmod(step, self.steps_per_epoch)
        start = b * self.batch_size
        stop = min(start + self.batch_size, n)
        rows = process_slice(stop - start, self.process_index, self.process_count)
        offsets = np.arange(start, stop)[rows]
        indices = self.permutation(epoch)[offsets]
        # The caption draw is keyed by the stream position, whichever process reads the row.
        caption_index = _hash(self.seed, epoch * n + offsets) % self.num_captions[indices]
        out = {
            "image": normalize(self.ds.images[indices]),
            "index": indices.astype(np.int32),
            "caption_index": caption_index.astype(np.int32),
        }
        if self.tokenizer is not None:
            texts = [self.ds.captions[i][c] for i, c in zip(indices, caption_index, strict=True)]
            out["input_ids"], out["attention_mask"] = self.tokenizer.encode_batch(
                texts, self.max_len
            )
        return out


def train_iterator(
    ds: ImageTextSet,
    batch_size: int,
    seed: int,
    *,
    tokenizer: Any = None,
    max_len: int = 32,
    drop_remainder: bool = True,
    num_epochs: int | None = None,
) -> grain.DatasetIterator:
    """Checkpointable iterator of training batches (`num_epochs` None = forever).

    Yields {"image": f32 (b, H, W, 3) normalised, "index": i32 (b,) rows of `ds`,
    "caption_index": i32 (b,) which of the row's captions was drawn} plus, with a
    tokenizer, "input_ids" / "attention_mask" i32 (b, max_len) of that caption, where
    b = batch_size // jax.process_count() is this process's slice of the global batch.
    Every epoch is a fresh seeded permutation; with drop_remainder its last
    len(ds) % batch_size rows are skipped (different rows each epoch).
    """
    n = len(ds)
    if batch_size <= 0 or batch_size % jax.process_count():
        raise ValueError(
            f"batch_size {batch_size} must be a positive multiple of the "
            f"{jax.process_count()} processes"
        )
    if n == 0 or (drop_remainder and n < batch_size):
        raise ValueError(f"{n} examples cannot fill a batch of {batch_size}")
    if any(len(c) == 0 for c in ds.captions):
        raise ValueError("every image needs at least one caption")
    make_batch = _Batch(ds, batch_size, seed, tokenizer, max_len, drop_remainder)
    # An index dataset over steps: grain's iterator state is the next step, so
    # get_state()/set_state() resume the stream exactly.
    dataset = (
        grain.MapDataset.range(make_batch.steps_per_epoch)
        .repeat(num_epochs)
        .map_with_index(make_batch)
    )
    # A few batches of read-ahead in a thread: enough to overlap with a train step
    # without holding many image batches in memory.
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
    return iter(dataset.to_iter_dataset(options))


def eval_batches(ds: ImageTextSet, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Ordered batches {"image": f32 (B, H, W, 3), "index": i32 (B,), "valid": bool (B,)}.

    The last batch is padded to batch_size by repeating its last row with valid=False, so
    every batch has one shape (one jit compilation).
    """
    n = len(ds)
    for start in range(0, n, batch_size):
        index = np.arange(start, min(start + batch_size, n), dtype=np.int32)
        valid = np.ones(batch_size, bool)
        valid[len(index) :] = False
        index = np.pad(index, (0, batch_size - len(index)), mode="edge")
        yield {"image": normalize(ds.images[index]), "index": index, "valid": valid}
