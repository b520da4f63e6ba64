"""The embedded world: determinism, label fractions, captions vs scenes, disk round trip."""

from __future__ import annotations

import collections
import json

import ml_collections
import numpy as np
import pytest

from tldr_jax.config_lib import data_config, world_config
from tldr_jax.data import world as world_lib
from tldr_jax.data.dataset import load_set
from tldr_jax.data.records import clean_caption

SMALL = dict(num_pairs=60, num_test=6, num_clean=5, image_size=24)


def test_same_seed_same_world_other_seed_other_world():
    a = world_lib.make_world(world_config(**SMALL))
    b = world_lib.make_world(world_config(**SMALL))
    c = world_lib.make_world(world_config(**SMALL, seed=1))
    for split in ("train", "test", "clean"):
        ra, rb = getattr(a, split), getattr(b, split)
        assert [r.captions for r in ra] == [r.captions for r in rb]
        np.testing.assert_array_equal(
            np.stack([r.image for r in ra]), np.stack([r.image for r in rb])
        )
    assert a.labels == b.labels
    assert [r.captions for r in a.train] != [r.captions for r in c.train]
    # Splits use separate streams: changing the test size leaves train untouched.
    d = world_lib.make_world(world_config(**{**SMALL, "num_test": 3}))
    assert [r.captions for r in d.train] == [r.captions for r in a.train]


def test_test_and_clean_splits_are_scenes_of_their_own():
    # Equal sizes, so a split drawn from the other's stream would repeat it image for image.
    w = world_lib.make_world(world_config(**{**SMALL, "num_test": 5, "num_clean": 5}))
    for t in w.test:
        assert not any(np.array_equal(t.image, c.image) for c in w.clean)
    test_caps = {c for r in w.test for c in r.captions}
    assert not test_caps & {c for r in w.clean for c in r.captions}


def test_caption_noise_swaps_or_drops_words_but_never_empties_a_caption():
    rng = np.random.default_rng(0)
    caption = "a red circle"
    assert world_lib.corrupt(caption, 0.0, rng) == caption
    for _ in range(200):  # p = 1: every word dropped or swapped; all dropped: the first word
        noisy = world_lib.corrupt(caption, 1.0, rng).split()
        assert noisy == ["a"] or (noisy and set(noisy) <= set(world_lib._NOISE_WORDS))


def test_shapes_ids_and_label_fractions():
    w = world_lib.make_world(world_config(**SMALL, misaligned=0.25, duplicates=0.2))
    assert len(w.train) == 60 and len(w.test) == 6 and len(w.clean) == 5
    assert collections.Counter(w.labels) == {"clean": 33, "misaligned": 15, "duplicate": 12}
    assert w.train[0].image.shape == (24, 24, 3) and w.train[0].image.dtype == np.uint8
    ids = [r.sample_id for r in w.train + w.test + w.clean]
    assert len(set(ids)) == len(ids)
    assert all(len(r.captions) == 5 and len(set(r.captions)) == 5 for r in w.test + w.clean)
    assert all(r.captions == tuple(map(clean_caption, r.captions)) for r in w.train + w.test)
    # Labels are spread through the file, not grouped by kind.
    first_half = collections.Counter(w.labels[:30])
    assert all(first_half[k] > 0 for k in world_lib.LABELS)
    with pytest.raises(ValueError):
        world_lib.make_world(world_config(**SMALL, misaligned=0.6, duplicates=0.6))


def test_duplicates_are_near_copies():
    w = world_lib.make_world(world_config(**SMALL, caption_noise=0.0))
    x = np.stack([r.image for r in w.train]).reshape(60, -1).astype(np.float32)
    dist = np.abs(x[:, None] - x[None]).mean(-1)
    np.fill_diagonal(dist, np.inf)
    nearest = dist.min(1)
    dup = np.array([lab == "duplicate" for lab in w.labels])
    # Every near-copy has a partner far closer than typical scene pairs are.
    assert nearest[dup].max() < np.median(dist[np.isfinite(dist)]) / 3


def test_captions_describe_their_scene():
    rng = np.random.default_rng(0)
    scenes = world_lib.sample_scenes(rng, 50)
    colours = list(world_lib.COLOURS)
    for i in range(50):
        caption = world_lib.describe(scenes, i, rng)
        for j in range(scenes.count[i]):
            assert colours[scenes.colour[i, j]] in caption
            shape = list(world_lib.SHAPES)[scenes.shape[i, j]]
            assert any(word in caption for word in world_lib.SHAPES[shape])
            where = list(world_lib.POSITIONS)[scenes.position[i, j]]
            assert any(p in caption for p in world_lib.POSITIONS[where][2])


def test_render_draws_objects_in_their_colour_and_place():
    rng = np.random.default_rng(0)
    scenes = world_lib.sample_scenes(rng, 20)
    scenes.count[:] = 1
    scenes.size[:] = 2  # large
    images = world_lib.render(scenes, 32, rng).astype(np.float32) / 255
    for i in range(20):
        x, y = (scenes.centre[i, 0] * 32).astype(int)
        shape = list(world_lib.SHAPES)[scenes.shape[i, 0]]
        if shape == "ring":  # hollow: the centre shows the background
            continue
        np.testing.assert_allclose(images[i, y, x], scenes.rgb[i, 0].clip(0, 1), atol=0.12)


def test_write_world_round_trip(tmp_path):
    w = world_lib.make_world(world_config(**SMALL))
    paths = world_lib.write_world(w, tmp_path)
    cfg = data_config(image_size=24, image_root=str(tmp_path), decode_workers=2)
    for name in ("train", "train_karpathy"):
        ds = load_set(paths[name], cfg, "train")
        assert ds.ids == [r.sample_id for r in w.train]
        assert ds.captions == [list(r.captions) for r in w.train]
        np.testing.assert_array_equal(ds.images, np.stack([r.image for r in w.train]))
        assert ds.image_keys == [r.image_key for r in w.train]
    for name in ("test", "clean"):
        ds = load_set(paths[name], cfg, "test")
        split = getattr(w, name)
        assert ds.ids == [r.sample_id for r in split]
        assert ds.captions == [list(r.captions) for r in split]
        np.testing.assert_array_equal(ds.images, np.stack([r.image for r in split]))
    labels = json.loads((tmp_path / "labels.json").read_text())
    assert labels == {r.sample_id: lab for r, lab in zip(w.train, w.labels, strict=True)}


def test_load_set_embedded_world_matches_make_world():
    cfg = data_config(image_size=24, world=world_config(**SMALL), max_rows=10)
    w = world_lib.make_world(cfg.world)
    for role in ("train", "test", "clean"):
        ds = load_set("", cfg, role)
        split = getattr(w, role)[:10]
        assert ds.source == f"world:{role}" and ds.ids == [r.sample_id for r in split]
        np.testing.assert_array_equal(ds.images, np.stack([r.image for r in split]))
    resized = load_set("", data_config(image_size=16, world=world_config(**SMALL)), "test")
    assert resized.images.shape == (6, 16, 16, 3)


def test_run_stage(tmp_path):
    config = ml_collections.ConfigDict({"data": data_config(world=world_config(**SMALL))})
    summary = world_lib.run_stage(config, str(tmp_path))
    assert summary["train_rows"] == 60 and summary["test_images"] == 6
    assert sum(summary["labels"].values()) == 60
    assert len(json.loads((tmp_path / "world" / "train.json").read_text())) == 60
    assert len(list((tmp_path / "world" / "images" / "train").glob("*.png"))) == 60
