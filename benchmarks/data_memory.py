"""Host memory and time of loading a Karpathy-style train set (several caption rows per image).

Writes N JPEG images with `--captions` rows each (a Karpathy train file, as Flickr30K's and
COCO's are: one row per caption), then loads it in fresh processes, one per mode, and prints
peak RSS above the process's RSS after imports, and wall time:

  per-row copies   what the loaders did before: one uint8 copy per row and a float32 copy
                   of every pair (`normalize(pairs.images)`, as the distillation stages held)
  store            `load_set` now: one uint8 copy per image file, rows and pairs are views,
                   the float32 view normalises only the rows a batch asks for
  cache cold       `data.cache_dir` set, first load: decodes into a memory-mapped file
  cache warm       the same command again: maps the file, decodes nothing

Every mode then reads one epoch of normalised batches of 256 pairs, as a trainer does.

With `--webdataset` the same images are written as img2dataset shards (one sample per
caption, 1000 samples per uncompressed .tar, as a Flickr30K or COCO exported to webdataset
is) and loaded with `data.cache_dir` set (cold: a fresh cache per mode), as a set too large
for memory would be:

  wds bytes held   what the reader did before: every sample's image bytes kept in memory
                   from reading the shards until the set is decoded
  wds indexed      the reader now: an image is its shard, offset, size and SHA-1, read
                   again when it is decoded

  python benchmarks/data_memory.py --images 4000 --captions 5 --size 64
  python benchmarks/data_memory.py --images 4000 --captions 5 --size 64 --webdataset
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from tldr_jax.utils.argtypes import positive_int

MODES = ("per-row copies", "store", "cache cold", "cache warm")
WDS_MODES = ("wds bytes held", "wds indexed")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> None:
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
    except OSError:
        pass


def write_set(root: str, images: int, captions: int, seed: int = 0) -> str:
    """`images` smooth random JPEGs (256 x 192) and a Karpathy train file with `captions`
    rows per image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rows = []
    for i in range(images):
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((256, 192), Image.BICUBIC)
        img.save(os.path.join(root, "img", f"{i}.jpg"), quality=90)
        rows += [
            {"image": f"img/{i}.jpg", "caption": f"picture {i} caption {k}", "image_id": i}
            for k in range(captions)
        ]
    path = os.path.join(root, "train.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f)
    return path


def write_shards(root: str, train_json: str, per_shard: int = 1000) -> str:
    """The rows of `train_json` as img2dataset shards (KEY.jpg + KEY.txt), in order."""
    import io
    import tarfile

    with open(train_json, encoding="utf-8") as f:
        rows = json.load(f)
    folder = os.path.join(root, "wds")
    os.makedirs(folder, exist_ok=True)
    for start in range(0, len(rows), per_shard):
        shard = os.path.join(folder, f"{start // per_shard:05d}.tar")
        with tarfile.open(shard, "w") as tar:
            for n, row in enumerate(rows[start : start + per_shard], start=start):
                with open(os.path.join(root, row["image"]), "rb") as f:
                    image = f.read()
                for ext, data in (("jpg", image), ("txt", row["caption"].encode())):
                    info = tarfile.TarInfo(f"{n:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def child(mode: str, path: str, size: int, cache: str) -> dict:
    import jax  # noqa: F401  (load_set imports it; count it in the baseline)

    from tldr_jax.config_lib import data_config
    from tldr_jax.data import readers
    from tldr_jax.data.dataset import load_set
    from tldr_jax.data.images import normalize
    from tldr_jax.data.imagestore import NormalizedRows

    readers.LAZY_SHARD_IMAGES = mode != "wds bytes held"
    base = _rss_kib("VmRSS")
    _reset_peak()
    if mode.startswith("wds"):
        cache = os.path.join(cache, mode.replace(" ", "_"))  # cold: one cache per mode
    use_cache = mode.startswith(("cache", "wds"))
    cfg = data_config(image_size=size, cache_dir=cache if use_cache else "")
    t0 = time.perf_counter()
    pairs, _ = load_set(path, cfg, "train").pairs()
    if mode == "per-row copies":
        images = normalize(np.asarray(pairs.images))
    else:
        images = NormalizedRows(pairs.images)
    load_s = time.perf_counter() - t0
    order = np.random.default_rng(0).permutation(len(pairs))
    checksum = 0.0
    for s in range(0, len(order), 256):
        checksum += float(images[order[s : s + 256]][:, 0, 0, 0].sum())
    return {
        "mode": mode,
        "pairs": len(pairs),
        "load_s": round(load_s, 2),
        "epoch_s": round(time.perf_counter() - t0 - load_s, 2),
        "peak_mib": round((_rss_kib("VmHWM") - base) / 1024, 1),
        "checksum": round(checksum, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=positive_int, default=4000)
    p.add_argument("--captions", type=positive_int, default=5)
    p.add_argument("--size", type=positive_int, default=64)
    p.add_argument("--workdir", default="")
    p.add_argument("--json", default="")
    p.add_argument("--webdataset", action="store_true", help="compare the shard loaders")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--path", default="", help=argparse.SUPPRESS)
    p.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.size, args.cache)))
        return
    root = args.workdir or tempfile.mkdtemp(prefix="data_memory_")
    try:
        path = write_set(root, args.images, args.captions)
        if args.webdataset:
            path = write_shards(root, path)
        cache = os.path.join(root, "cache")
        results = []
        for mode in WDS_MODES if args.webdataset else MODES:
            cmd = [sys.executable, __file__, "--child", mode, "--path", path]
            cmd += ["--size", str(args.size), "--cache", cache]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
        if len({r["checksum"] for r in results}) != 1:
            raise SystemExit(f"modes disagree on the data: {results}")
        ref = results[0]
        kind = ", webdataset" if args.webdataset else ""
        print(f"{args.images} images x {args.captions} captions at {args.size} px{kind}")
        first = "bytes held" if args.webdataset else "per-row"
        print(f"| mode | pairs | peak MiB above imports | load s | epoch s | peak / {first} |")
        print("|---|---|---|---|---|---|")
        for r in results:
            ratio = r["peak_mib"] / max(ref["peak_mib"], 1e-9)
            print(
                f"| {r['mode']} | {r['pairs']} | {r['peak_mib']} | {r['load_s']} | "
                f"{r['epoch_s']} | {ratio:.3f} |"
            )
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=2)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
