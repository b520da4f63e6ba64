"""The embedded procedural world: a small, downloadable-nothing image-text dataset.

Each scene holds 1-3 objects, each with a colour (8), a shape (6), a size (3) and a position
(left / right / top / bottom / center), on a tinted background with a soft gradient and a
little pixel noise. Captions come from a grammar with synonyms and several templates, so
one scene has many paraphrases ("a small red circle on the left", "there are two shapes,
...").

Splits mirror the real setting:
  * train: `num_pairs` noisy web-like pairs; a `misaligned` fraction carry the caption of
    another scene, a `duplicates` fraction are near-copies (position / colour jitter) of
    another scene, and every train caption has its words corrupted with `caption_noise`.
    `World.labels` says which row is which ("clean" / "misaligned" / "duplicate"); it is
    for evaluation only.
  * test: `num_test` scenes with 5 clean paraphrases each (the Karpathy test analogue).
  * clean: `num_clean` scenes with 5 clean paraphrases each (the COCO analogue, for
    captioner fine-tuning).

Images are rasterised with numpy from signed distance functions (anti-aliased edges); the
whole default world (6500 images at 64 px) renders in a couple of seconds. The same config
gives the same world, bit for bit.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from tldr_jax.data.records import Record, clean_caption
from tldr_jax.utils import dist, io

log = logging.getLogger(__name__)

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.12, 0.68, 0.22),
    "blue": (0.14, 0.26, 0.90),
    "yellow": (0.96, 0.86, 0.10),
    "purple": (0.56, 0.16, 0.72),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
    "black": (0.05, 0.05, 0.05),
}
SHAPES: dict[str, tuple[str, ...]] = {  # shape -> the words captions use for it
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
    "ring": ("ring", "donut"),
}
SIZES: dict[str, tuple[float, tuple[str, ...]]] = {  # size -> (radius / width, words)
    "small": (0.085, ("small", "little", "tiny")),
    "medium": (0.13, ("", "medium", "medium-sized")),
    "large": (0.19, ("large", "big")),
}
POSITIONS: dict[str, tuple[float, float, tuple[str, ...]]] = {  # -> (x, y, phrases)
    "left": (0.26, 0.5, ("on the left", "at the left", "on the left side", "to the left")),
    "right": (0.74, 0.5, ("on the right", "at the right", "on the right side", "to the right")),
    "top": (0.5, 0.26, ("at the top", "near the top", "in the upper part")),
    "bottom": (0.5, 0.74, ("at the bottom", "near the bottom", "in the lower part")),
    "center": (0.5, 0.5, ("in the middle", "in the center", "in the centre")),
}
_COLOUR_NAMES = tuple(COLOURS)
_SHAPE_NAMES = tuple(SHAPES)
_SIZE_NAMES = tuple(SIZES)
_POSITION_NAMES = tuple(POSITIONS)
_COLOUR_RGB = np.array(list(COLOURS.values()), np.float32)
_RADIUS = np.array([SIZES[s][0] for s in _SIZE_NAMES], np.float32)
_CENTRE = np.array([POSITIONS[p][:2] for p in _POSITION_NAMES], np.float32)
_MAX_OBJECTS = 3
_OBJECT_COUNT_P = (0.4, 0.35, 0.25)
_NUMBER_WORDS = {2: "two", 3: "three"}
# Words that caption noise substitutes in: plausible but usually wrong attributes.
_NOISE_WORDS = (
    _COLOUR_NAMES + _SHAPE_NAMES + ("small", "large", "left", "right", "top", "bottom", "middle")
)
_SINGLE_TEMPLATES = (
    "{o}",
    "there is {o}",
    "a picture of {o}",
    "an image with {o}",
    "a photo showing {o}",
    "{o} on a plain background",
)
_MULTI_TEMPLATES = (
    "{o}",
    "there are {n} shapes, {o}",
    "a picture of {o}",
    "{n} objects, {o}",
    "an image with {o}",
    "a scene with {n} shapes, {o}",
)
_CAPTIONS_PER_EVAL_IMAGE = 5
_JITTER_POS = 0.05  # position jitter of every object (fraction of the width)
_DUP_POS = 0.025  # extra jitter that makes a near-duplicate
_DUP_COLOUR = 0.05
LABELS = ("clean", "misaligned", "duplicate")


@dataclasses.dataclass
class Scenes:
    """N scenes, up to 3 object slots each (slot j is present when j < count)."""

    count: np.ndarray  # (N,) int
    colour: np.ndarray  # (N, 3) int index into COLOURS
    shape: np.ndarray  # (N, 3) int index into SHAPES
    size: np.ndarray  # (N, 3) int index into SIZES
    position: np.ndarray  # (N, 3) int index into POSITIONS
    centre: np.ndarray  # (N, 3, 2) float, jittered (x, y) in [0, 1]
    rgb: np.ndarray  # (N, 3, 3) float, jittered object colours
    background: np.ndarray  # (N, 3) float base colour
    gradient: np.ndarray  # (N, 2) float gradient vector

    def __len__(self) -> int:
        return len(self.count)

    def take(self, idx: np.ndarray) -> Scenes:
        return Scenes(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})


def sample_scenes(rng: np.random.Generator, n: int) -> Scenes:
    """Draws n random scenes (attributes and continuous render parameters)."""
    count = rng.choice(np.arange(1, _MAX_OBJECTS + 1), size=n, p=_OBJECT_COUNT_P)
    # Distinct positions per scene: the first 3 of a random permutation of the 5.
    position = np.argsort(rng.random((n, len(_POSITION_NAMES))), axis=1)[:, :_MAX_OBJECTS]
    colour = rng.integers(0, len(_COLOUR_NAMES), (n, _MAX_OBJECTS))
    shape = rng.integers(0, len(_SHAPE_NAMES), (n, _MAX_OBJECTS))
    size = rng.integers(0, len(_SIZE_NAMES), (n, _MAX_OBJECTS))
    centre = _CENTRE[position] + rng.uniform(-_JITTER_POS, _JITTER_POS, (n, _MAX_OBJECTS, 2))
    rgb = _COLOUR_RGB[colour] + rng.uniform(-0.04, 0.04, (n, _MAX_OBJECTS, 3))
    grey = rng.uniform(0.33, 0.67, (n, 1))
    background = grey + rng.uniform(-0.07, 0.07, (n, 3))
    angle = rng.uniform(0, 2 * np.pi, n)
    gradient = rng.uniform(0, 0.15, (n, 1)) * np.stack([np.cos(angle), np.sin(angle)], -1)
    return Scenes(count, colour, shape, size, position, centre, rgb, background, gradient)


def jitter_scenes(scenes: Scenes, rng: np.random.Generator) -> Scenes:
    """Near-duplicates: the same attributes, positions and colours moved a little."""
    n = len(scenes)
    return dataclasses.replace(
        scenes,
        centre=scenes.centre + rng.uniform(-_DUP_POS, _DUP_POS, (n, _MAX_OBJECTS, 2)),
        rgb=scenes.rgb + rng.uniform(-_DUP_COLOUR, _DUP_COLOUR, (n, _MAX_OBJECTS, 3)),
        background=scenes.background + rng.uniform(-0.03, 0.03, (n, 3)),
    )


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside) of a shape centred at the origin."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return np.maximum(ax, ay) - 0.85 * r
    if shape == "diamond":
        return (ax + ay - 1.2 * r) / np.sqrt(2.0)
    if shape == "triangle":  # apex up at (0, -r), base at y = 0.6 r, half-width 0.95 r
        norm = np.hypot(1.6, 0.95)
        slant = (1.6 * ax - 0.95 * (dy + r)) / norm
        return np.maximum(dy - 0.6 * r, slant)
    if shape == "cross":
        w = 0.34 * r
        return np.minimum(np.maximum(ax - r, ay - w), np.maximum(ax - w, ay - r))
    if shape == "ring":
        return np.abs(np.hypot(dx, dy) - 0.68 * r) - 0.32 * r
    raise ValueError(shape)


def render(scenes: Scenes, size: int, rng: np.random.Generator, chunk: int = 512) -> np.ndarray:
    """Rasterises scenes to uint8 (N, size, size, 3), vectorised over images."""
    n = len(scenes)
    out = np.empty((n, size, size, 3), np.uint8)
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    xx, yy = grid[None, None, :], grid[None, :, None]
    for start in range(0, n, chunk):
        s = scenes.take(np.arange(start, min(start + chunk, n)))
        m = len(s)
        gx = s.gradient[:, 0, None, None].astype(np.float32)
        gy = s.gradient[:, 1, None, None].astype(np.float32)
        noise = rng.standard_normal((m, size, size), np.float32) * 0.02
        canvas = (xx - 0.5) * gx + (yy - 0.5) * gy + noise
        canvas = canvas[..., None] + s.background[:, None, None, :].astype(np.float32)
        # Large objects first so small ones stay visible on top.
        present = np.arange(_MAX_OBJECTS) < s.count[:, None]
        order = np.argsort(-np.where(present, s.size, -1), axis=1, kind="stable")
        rows = np.arange(m)
        for slot in range(_MAX_OBJECTS):
            obj = order[:, slot]
            dist = np.full((m, size, size), np.inf, np.float32)
            for k, shape in enumerate(_SHAPE_NAMES):
                sel = rows[(slot < s.count) & (s.shape[rows, obj] == k)]
                if len(sel):
                    o = obj[sel]
                    cx = s.centre[sel, o, 0, None, None].astype(np.float32)
                    cy = s.centre[sel, o, 1, None, None].astype(np.float32)
                    r = _RADIUS[s.size[sel, o]][:, None, None]
                    dist[sel] = _signed_distance(shape, xx - cx, yy - cy, r)
            alpha = np.clip(0.5 - dist * size, 0.0, 1.0)[..., None]  # anti-aliased edge
            colour = s.rgb[rows, obj][:, None, None, :].astype(np.float32)
            canvas += alpha * (colour - canvas)
        out[start : start + m] = np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8)
    return out


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe(scenes: Scenes, i: int, rng: np.random.Generator) -> str:
    """One paraphrase of scene i from the caption grammar (objects in random order)."""
    parts = []
    for j in rng.permutation(int(scenes.count[i])):
        size_word = _pick(rng, SIZES[_SIZE_NAMES[scenes.size[i, j]]][1])
        shape_word = _pick(rng, SHAPES[_SHAPE_NAMES[scenes.shape[i, j]]])
        noun = " ".join(w for w in (size_word, _COLOUR_NAMES[scenes.colour[i, j]], shape_word) if w)
        where = _pick(rng, POSITIONS[_POSITION_NAMES[scenes.position[i, j]]][2])
        parts.append(f"{_article(noun)} {where}")
    n = len(parts)
    if n == 1:
        return _pick(rng, _SINGLE_TEMPLATES).format(o=parts[0])
    objects = ", ".join(parts[:-1]) + " and " + parts[-1]
    return _pick(rng, _MULTI_TEMPLATES).format(o=objects, n=_NUMBER_WORDS[n])


def corrupt(caption: str, p: float, rng: np.random.Generator) -> str:
    """Web-style noise: each word is, with probability p, dropped or swapped for a random
    attribute word (never leaving the caption empty)."""
    words = caption.split()
    out = []
    for w in words:
        u = rng.random()
        if u >= p:
            out.append(w)
        elif u < p / 2:
            out.append(_pick(rng, _NOISE_WORDS))
    return " ".join(out) or words[0]


@dataclasses.dataclass
class World:
    """The three splits as records with uint8 image arrays, plus per-train-row labels."""

    train: list[Record]
    test: list[Record]
    clean: list[Record]
    labels: list[str]  # per train row: "clean" | "misaligned" | "duplicate"
    image_size: int


def _eval_split(name: str, n: int, size: int, rng: np.random.Generator) -> list[Record]:
    scenes = sample_scenes(rng, n)
    images = render(scenes, size, rng)
    records = []
    for i in range(n):
        caps = []
        # Distinct paraphrases (the grammar has plenty for any scene).
        for _ in range(50):
            c = clean_caption(describe(scenes, i, rng))
            if c not in caps:
                caps.append(c)
            if len(caps) == _CAPTIONS_PER_EVAL_IMAGE:
                break
        sid = f"{name}-{i:06d}"
        records.append(Record(sid, images[i], tuple(caps), f"images/{name}/{sid}.png"))
    return records


def _train_split(cfg: Any, rng: np.random.Generator) -> tuple[list[Record], list[str]]:
    n = int(cfg.num_pairs)
    n_dup = int(round(cfg.duplicates * n))
    n_mis = int(round(cfg.misaligned * n))
    if n_dup + n_mis > n:
        raise ValueError(f"misaligned + duplicates = {cfg.misaligned + cfg.duplicates} > 1")
    n_base = n - n_dup
    base = sample_scenes(rng, n_base)
    source = rng.integers(0, n_base, n_dup)  # duplicate -> the base scene it copies
    scenes = base.take(np.concatenate([np.arange(n_base), source]))
    dups = jitter_scenes(scenes.take(np.arange(n_base, n)), rng)
    for f in ("centre", "rgb", "background"):
        getattr(scenes, f)[n_base:] = getattr(dups, f)
    labels = np.array(["clean"] * n_base + ["duplicate"] * n_dup, dtype=object)
    # Misaligned rows are base rows whose caption describes another base scene.
    described = np.arange(n)
    mis = rng.choice(n_base, n_mis, replace=False)
    other = (mis + rng.integers(1, max(n_base, 2), n_mis)) % max(n_base, 1)
    described[mis] = other
    labels[mis] = "misaligned"
    images = render(scenes, int(cfg.image_size), rng)
    captions = [
        clean_caption(corrupt(describe(scenes, int(j), rng), cfg.caption_noise, rng))
        for j in described
    ]
    # Spread the kinds of rows through the file as in real web data.
    order = rng.permutation(n)
    records = []
    for row, i in enumerate(order):
        sid = f"train-{row:06d}"
        records.append(Record(sid, images[i], (captions[i],), f"images/train/{sid}.png"))
    return records, [str(labels[i]) for i in order]


def make_world(world_cfg: ml_collections.ConfigDict | Any) -> World:
    """Builds the world for a `config_lib.world_config()` block; deterministic in its seed."""
    seed = int(world_cfg.seed)
    size = int(world_cfg.image_size)
    # Independent streams per split, so e.g. num_test does not change the train set.
    train, labels = _train_split(world_cfg, np.random.default_rng([seed, 0]))
    test = _eval_split("test", int(world_cfg.num_test), size, np.random.default_rng([seed, 1]))
    clean = _eval_split("clean", int(world_cfg.num_clean), size, np.random.default_rng([seed, 2]))
    return World(train, test, clean, labels, size)


def _write_png(path: Path, image: np.ndarray) -> None:
    with io.atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def world_paths(out_dir: str | Path) -> dict[str, str]:
    """Annotation files `write_world` writes under out_dir, by name."""
    names = ("train", "train_karpathy", "test", "clean", "labels")
    return {k: str(Path(out_dir) / f"{k}.json") for k in names}


def write_world(world: World, out_dir: str | Path, workers: int = 8) -> dict[str, str]:
    """Writes PNGs under out_dir/images/ and the annotation files; returns their paths.

    train.json (BLIP: image, caption, id), train_karpathy.json (the same rows as Karpathy
    train: image, caption, image_id), test.json and clean.json (Karpathy eval: image,
    caption list, id) and labels.json ({train sample id: label}). Image paths are relative
    to out_dir, so `data.image_root = out_dir` (or nothing: the files sit in out_dir).
    """
    out = Path(out_dir)
    io.remove_stale_temps(out)  # an earlier run's, killed while writing
    paths = world_paths(out)
    records = world.train + world.test + world.clean
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda r: _write_png(out / r.image_key, r.image), records))
    io.write_json(
        paths["train"],
        [{"image": r.image_key, "caption": r.captions[0], "id": r.sample_id} for r in world.train],
    )
    io.write_json(
        paths["train_karpathy"],
        [
            {"image": r.image_key, "caption": r.captions[0], "image_id": r.sample_id}
            for r in world.train
        ],
    )
    for name, split in (("test", world.test), ("clean", world.clean)):
        io.write_json(
            paths[name],
            [{"image": r.image_key, "caption": list(r.captions), "id": r.sample_id} for r in split],
        )
    labels = {r.sample_id: lab for r, lab in zip(world.train, world.labels, strict=True)}
    io.write_json(paths["labels"], labels)
    return paths


def run_stage(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`tldr-jax make-world`: writes config.data.world to workdir/world/."""
    world = make_world(config.data.world)
    out = Path(workdir).absolute() / "world"  # the summary's paths work from any folder
    if dist.is_main():
        write_world(world, out)
    dist.barrier("make-world")
    counts = collections.Counter(world.labels)
    log.info("world: %d train rows %s -> %s", len(world.train), dict(counts), out)
    return {
        "train_rows": len(world.train),
        "test_images": len(world.test),
        "clean_images": len(world.clean),
        "labels": {k: counts.get(k, 0) for k in LABELS},
        "image_size": world.image_size,
        "image_root": str(out),
        "paths": world_paths(out),
    }
