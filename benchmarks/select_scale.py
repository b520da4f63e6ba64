"""`tldr-jax select` at data-set scale: 2.8M x 256 codes, K = 1000, 20 iterations.

    python benchmarks/select_scale.py --workdir /tmp/select_scale [--n 2800000] [--regen]
        [-- extra --config.select.* flags for the stage]

Writes a fake `extract` output (W/extract/codes-NNNNN.npz chunks with `ids` and int32 `codes`
of shape (n, 256) drawn around 4096 random code patterns, W/extract/ids.json and
W/extract.json), then runs the stage as a subprocess and reports its wall time, its peak
resident memory (the child's ru_maxrss) and its summary.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tldr_jax.utils import io
from tldr_jax.utils.argtypes import positive_int


def write_fake_extract(
    workdir: Path, n: int, t: int = 256, vocab: int = 1024, chunk: int = 100_000, seed: int = 0
) -> None:
    """Clustered integer codes: each row copies one of 4096 patterns and resamples ~1/8 of it."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, vocab, (4096, t), dtype=np.int32)
    ex = workdir / "extract"
    ids_all = []
    for c, s in enumerate(range(0, n, chunk)):
        m = min(chunk, n - s)
        codes = patterns[rng.integers(0, len(patterns), m)]
        noise = rng.random((m, t)) < 0.125
        codes[noise] = rng.integers(0, vocab, int(noise.sum()), dtype=np.int32)
        ids = np.char.add("img-", np.arange(s, s + m).astype(str))
        io.write_npz(ex / f"codes-{c:05d}.npz", ids=ids, codes=codes)
        ids_all.append(ids)
    io.write_json(ex / "ids.json", np.concatenate(ids_all).tolist())
    io.write_json(workdir / "extract.json", {"codebook_size": vocab})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/select_scale")
    ap.add_argument("--n", type=positive_int, default=2_800_000)
    ap.add_argument("--regen", action="store_true", help="rewrite the fake extract output")
    ap.add_argument("extra", nargs="*", help="more flags for `tldr-jax select`")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    if args.regen or not (workdir / "extract.json").exists():
        t0 = time.time()
        write_fake_extract(workdir, args.n)
        print(f"wrote {args.n} fake extract rows in {time.time() - t0:.1f} s")
    cmd = [
        sys.executable, "-m", "tldr_jax.cli", "select",
        "--config", "configs/tldr.py", "--workdir", str(workdir),
        "--config.select.feature=sequence", "--config.select.num_clusters=1000",
        "--config.select.iterations=20", *args.extra,
    ]  # fmt: skip
    print(f"load average before: {os.getloadavg()}")
    print(" ".join(cmd))
    t0 = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    summary = json.loads((workdir / "select.json").read_text(encoding="utf-8"))
    print(f"load average after: {os.getloadavg()}")
    print(f"select: {wall:.1f} s wall, peak RSS {peak_gb:.2f} GB")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
