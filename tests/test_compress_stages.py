"""Compress stages train-captioner, extract and caption on a tiny embedded world."""

import hashlib
import json
from types import SimpleNamespace

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import tldr as tldr_config
from tldr_jax.cli import run_stage
from tldr_jax.compress import caption_stage, captioner_stage, extract, pipeline
from tldr_jax.compress.common import load_train
from tldr_jax.config_check import ConfigError
from tldr_jax.data.images import normalize
from tldr_jax.data.tokenizer import load_tokenizer
from tldr_jax.utils import io, preemption
from tldr_jax.utils.mesh import make_mesh

TINY_VIT = dict(patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32)
TINY_DECODER = dict(width=16, depth=1, heads=2, mlp_dim=32)


def tiny_config():
    config = tldr_config.get_config("small")
    config.data.image_size = 16
    config.data.world.update(image_size=16, num_pairs=96, num_test=8, num_clean=24)
    c = config.captioner
    c.update(image_kwargs=TINY_VIT, decoder=TINY_DECODER, num_codes=16, code_dim=8, max_len=12)
    c.vq_loss = "ema"  # the EMA codebook must survive the generic train step and checkpoints
    c.train.update(batch_size=32, epochs=1, warmup_steps=1, log_every=1, ckpt_every=2)
    config.extract.update(chunk_size=40, batch_size=16)
    cap = config.caption
    cap.update(image_kwargs=TINY_VIT, decoder=TINY_DECODER, max_len=6, batch_size=8, beam_size=2)
    cap.train.update(batch_size=8, epochs=1, warmup_steps=1, log_every=1, ckpt_every=100)
    return config


def _restored(config, workdir):
    return captioner_stage.restore_codebook_captioner(config, workdir, make_mesh())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted train-captioner run (3 steps) in its own workdir."""
    workdir = tmp_path_factory.mktemp("full")
    config = tiny_config()
    summary = run_stage("train-captioner", config, str(workdir))
    return config, workdir, summary


def test_train_captioner_summary_and_ema_state(trained):
    config, workdir, summary = trained
    on_disk = io.read_json(workdir / "train-captioner.json")
    assert on_disk["steps"] == summary["steps"] == 3  # 96 rows // batch 32, one epoch
    assert summary["tokens_per_image"] == 1 + (16 // 8) ** 2
    assert summary["num_codes"] == 16
    assert 0.0 < summary["code_usage"] <= 1.0 and summary["perplexity"] >= 1.0
    assert np.isclose(
        summary["final_loss"], summary["final_lm_loss"] + summary["final_vq_loss"], rtol=1e-5
    )
    _, state, step = _restored(config, workdir)
    assert step == 3
    # The EMA counts start at 1 and move every step: they must have been carried through.
    assert not np.allclose(np.asarray(state["rest"]["quantizer"]["ema_count"][...]), 1.0)
    rows = (workdir / "metrics" / "train-captioner.csv").read_text().splitlines()[1:]
    assert sorted({int(r.split(",")[0]) for r in rows}) == [1, 2, 3]


def test_train_captioner_resumes_at_saved_step(trained, tmp_path, monkeypatch):
    config, full_dir, _ = trained
    monkeypatch.setattr(preemption, "agreed", lambda: True)
    with pytest.raises(preemption.Preempted, match="step 1"):
        captioner_stage.run(config, str(tmp_path))
    monkeypatch.setattr(preemption, "agreed", lambda: False)
    summary = captioner_stage.run(config, str(tmp_path))
    assert summary["resumed_from"] == 1 and summary["steps"] == 3
    # Same data stream, same per-step RNG: identical to the uninterrupted run.
    _, resumed, _ = _restored(config, tmp_path)
    _, full, _ = _restored(config, full_dir)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    rows = (tmp_path / "metrics" / "train-captioner.csv").read_text().splitlines()[1:]
    steps = [int(r.split(",")[0]) for r in rows if r.split(",")[1] == "loss"]
    assert steps == [1, 2, 3]


def test_a_resumed_run_summarises_its_log_window_as_an_uninterrupted_one(
    trained, tmp_path, monkeypatch
):
    """The summary's `final_*` metrics are means over the last log window: a run stopped
    inside the window and resumed gives the same means (the checkpoint keeps the window)."""
    config, full_dir, _ = trained
    config = config.copy_and_resolve_references()
    config.captioner.train.log_every = 3  # one window: all three steps
    config.captioner.train.update(ckpt_every=1, keep=1)  # only the latest checkpoint stays
    monkeypatch.setattr(preemption, "agreed", lambda: True)
    with pytest.raises(preemption.Preempted, match="step 1"):
        captioner_stage.run(config, str(tmp_path))
    monkeypatch.setattr(preemption, "agreed", lambda: False)
    summary = captioner_stage.run(config, str(tmp_path))
    assert summary["resumed_from"] == 1
    # The uninterrupted run logged every step: the mean of its three losses.
    rows = (full_dir / "metrics" / "train-captioner.csv").read_text().splitlines()[1:]
    per_step = {int(r.split(",")[0]): float(r.split(",")[2]) for r in rows if ",loss," in r}
    assert summary["final_loss"] == pytest.approx(np.mean([per_step[s] for s in (1, 2, 3)]))
    ckpts = tmp_path / "train-captioner" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["3"]


def test_chunk_plan_partitions_rows():
    for n, size, procs in [(96, 40, 1), (96, 40, 2), (100, 7, 3), (5, 10, 4)]:
        rows = []
        for p in range(procs):
            plan = extract.chunk_plan(n, size, p, procs)
            assert all(c % procs == p for c, _, _ in plan)
            rows += [r for _, a, b in plan for r in range(a, b)]
        assert sorted(rows) == list(range(n))


def _chunks(out):
    return {f.name: (np.load(f)["ids"].tolist(), np.load(f)["codes"]) for f in out.glob("*.npz")}


def test_extract_keys_codes_by_id_and_resumes(trained):
    config, workdir, _ = trained
    summary = run_stage("extract", config, str(workdir))
    out = workdir / "extract"
    train = load_train(config)
    assert summary["rows"] == 96 and summary["chunks"] == 3 and summary["codebook_size"] == 16
    assert summary["tokens_per_image"] == 5
    assert io.read_json(out / "ids.json") == train.ids

    # Brute force: the restored model's codes for every training image, looked up by id.
    model_def, state, _ = _restored(config, workdir)
    model = model_def.merge(state["params"], state["rest"])
    want = np.asarray(nnx.jit(lambda m, x: m.codes(x))(model, normalize(train.images)))
    row_of = {sid: i for i, sid in enumerate(train.ids)}
    first = _chunks(out)
    assert sorted(first) == ["codes-00000.npz", "codes-00001.npz", "codes-00002.npz"]
    seen = []
    for ids, codes in first.values():
        assert codes.dtype == np.int32 and codes.shape == (len(ids), 5)
        np.testing.assert_array_equal(codes, want[[row_of[i] for i in ids]])
        seen += ids
    assert sorted(seen) == sorted(train.ids)
    assert summary["codes_used"] == len(np.unique(want))

    # Resume: a missing chunk is recomputed, the others are left alone; same result.
    (out / "codes-00001.npz").unlink()
    mtime = (out / "codes-00000.npz").stat().st_mtime_ns
    again = extract.run(config, str(workdir))
    assert again["chunks_written"] == 1
    assert (out / "codes-00000.npz").stat().st_mtime_ns == mtime
    second = _chunks(out)
    for name, (ids, codes) in first.items():
        assert second[name][0] == ids
        np.testing.assert_array_equal(second[name][1], codes)

    # Two "processes", the second first: chunk ownership c % 2, nothing lost or duplicated.
    split_dir = workdir / "extract-2proc"
    split_dir.mkdir()
    kw = dict(chunk_size=40, batch_size=16, process_count=2)
    assert extract.extract_chunks(model, train, split_dir, process_index=1, **kw) == 1
    assert extract.extract_chunks(model, train, split_dir, process_index=0, **kw) == 2
    ids, codes = extract.read_chunks(split_dir)
    assert sorted(ids.tolist()) == sorted(train.ids)
    np.testing.assert_array_equal(codes, want[[row_of[i] for i in ids]])


def test_prompt_tokens_are_a_prefix_of_prompted_captions():
    tok = load_tokenizer()
    ids = caption_stage.prompt_token_ids(tok, "a picture of ")
    assert tok.decode(ids) == "a picture of"
    full, mask = tok.encode_batch(["a picture of " + "a red ball on grass"], 16)
    np.testing.assert_array_equal(full[0, 1 : 1 + len(ids)], ids)
    assert caption_stage.add_prompt("a red ball", "a picture of ") == "a picture of a red ball"
    assert caption_stage.add_prompt("a picture of a cat", "a picture of ") == "a picture of a cat"
    text = tok.decode(tok.encode_batch(["a medium-sized dog's toy"], 16)[0][0])
    assert caption_stage.detokenize(text) == "a medium-sized dog's toy"


def test_caption_generates_for_every_kept_id(trained, monkeypatch):
    config, workdir, _ = trained
    train = load_train(config)
    rng = np.random.default_rng(0)
    kept = np.array(train.ids)[rng.choice(len(train), 11, replace=False)]  # any order
    io.write_npz(workdir / "score" / "kept.npz", ids=kept, scores=np.zeros(len(kept)))
    summary = run_stage("caption", config, str(workdir))
    generated = json.loads((workdir / "caption" / "generated.json").read_text())
    assert set(generated) == set(kept.tolist())
    assert not (workdir / "caption" / "parts").exists()  # merged: no second copy kept
    assert all(isinstance(v, str) for v in generated.values())
    assert summary["rows_captioned"] == 11 and summary["steps"] == 3  # 24 clean images // 8
    assert summary["empty_generations"] == sum(1 for v in generated.values() if not v)
    assert (workdir / "caption" / "samples.png").stat().st_size > 0
    assert [e["generated"] for e in summary["examples"]] == [
        generated[e["id"]] for e in summary["examples"]
    ]

    # Rerun: training resumes at its last step, and the complete file is not regenerated.
    def fail(*args, **kwargs):
        raise AssertionError("generation should have been skipped")

    monkeypatch.setattr(caption_stage, "generate_texts", fail)
    again = caption_stage.run(config, str(workdir))
    assert again["resumed_from"] == 3 and again["rows_captioned"] == 11
    # A finished model's rerun summarises the training it restored, not an empty window.
    assert summary["final_loss"] is not None
    assert again["final_loss"] == summary["final_loss"]

    # Each kept id gets the caption generated from its own image (ids in any order).
    def image_name(images):
        return [hashlib.sha1(im.tobytes()).hexdigest()[:12] for im in images]

    monkeypatch.setattr(
        caption_stage, "generate_texts", lambda m, images, *a, **k: image_name(images)
    )
    (workdir / "caption" / "generated.json").unlink()
    caption_stage.run(config, str(workdir))
    generated = json.loads((workdir / "caption" / "generated.json").read_text())
    row = {sid: i for i, sid in enumerate(train.ids)}
    assert generated == {i: image_name(train.images[[row[i]]])[0] for i in kept.tolist()}

    # A generated.json that misses some kept ids is not taken as done: all are generated.
    io.write_json(workdir / "caption" / "generated.json", {kept[0]: "stale"})
    caption_stage.run(config, str(workdir))
    again = json.loads((workdir / "caption" / "generated.json").read_text())
    assert again == generated
    # One that holds ids beyond the kept ones is reused; only the kept ids are counted.
    io.write_json(workdir / "caption" / "generated.json", {**generated, "not-kept": "x"})
    monkeypatch.setattr(caption_stage, "generate_texts", fail)
    assert caption_stage.run(config, str(workdir))["rows_captioned"] == 11
    reused = json.loads((workdir / "caption" / "generated.json").read_text())
    assert reused == {**generated, "not-kept": "x"}


def test_caption_refuses_more_beams_than_its_vocabulary_before_training(
    trained, tmp_path, monkeypatch
):
    """caption.method='beam' with 2 x beam_size above the caption vocabulary (known once the
    caption set is read) is a ConfigError before the captioner trains; it used to be the
    decoder's ValueError traceback after training. Greedy and nucleus ignore beam_size."""
    import shutil

    config, workdir, _ = trained
    work = tmp_path / "w"
    shutil.copytree(workdir, work, ignore=shutil.ignore_patterns("caption", "caption.json"))
    train = load_train(config)
    io.write_npz(work / "score" / "kept.npz", ids=np.array(train.ids[:3]), scores=np.zeros(3))

    def no_training(*args, **kwargs):
        raise AssertionError("refused only after training")

    monkeypatch.setattr(caption_stage, "train_model", no_training)
    config = ml_collections.ConfigDict(config.to_dict())
    config.caption.update(method="beam", beam_size=1000)
    with pytest.raises(ConfigError, match="caption.beam_size=1000 with caption.method='beam'"):
        caption_stage.run(config, str(work))
    assert not (work / "caption" / "checkpoints").exists()
    cap = ml_collections.ConfigDict(dict(method="beam", beam_size=2))
    for method, beams, ok in [("beam", 33, True), ("beam", 34, False), ("greedy", 1000, True)]:
        cap.update(method=method, beam_size=beams)
        if ok:
            caption_stage.check_beam_fits(cap, 67)
        else:
            with pytest.raises(ConfigError, match="at most 33"):
                caption_stage.check_beam_fits(cap, 67)


def _fake_generation(
    method: str, decode_batch
) -> tuple[SimpleNamespace, ml_collections.ConfigDict]:
    """A stand-in tokenizer ([CLS] 1, [SEP] 2, pad 0, `decode_batch`) and caption settings
    of batch 8 for `generate_texts` with its model stubbed."""
    tokenizer = SimpleNamespace(cls_id=1, sep_id=2, pad_id=0, decode_batch=decode_batch)
    cap = ml_collections.ConfigDict(
        dict(batch_size=8, method=method, max_len=2, beam_size=1, top_p=0.9, temperature=1.0)
    )
    return tokenizer, cap


def test_generate_texts_returns_each_images_caption_in_order(monkeypatch):
    """Batches of 8 over 8 devices, the last one padded: caption i is image i's."""
    from tldr_jax.data.images import MEAN, STD

    def fake_generate(model, x, prompt_ids, rng=None, **kwargs):
        value = np.rint((np.asarray(x)[:, 0, 0, 0] * STD[0] + MEAN[0]) * 255).astype(int)
        return np.stack([value, np.full_like(value, 2)], axis=1)

    monkeypatch.setattr(caption_stage, "generate_captions", fake_generate)
    tokenizer, cap = _fake_generation("greedy", lambda t: [f"img{int(r[0])}" for r in t])
    images = np.repeat(np.arange(21, dtype=np.uint8), 4 * 4 * 3).reshape(21, 4, 4, 3)
    texts = caption_stage.generate_texts(None, images, np.array([5]), tokenizer, cap, seed=0)
    assert texts == [f"img{i}" for i in range(21)]


def test_compact_vocab_round_trip():
    tok = load_tokenizer()
    texts = ["a red ball on grass", "two blue squares", "a picture of a red square"]
    vocab = captioner_stage.CompactVocab.from_texts(tok, texts, 16)
    full, full_mask = tok.encode_batch(texts, 16)
    ids, mask = vocab.encode_batch(texts, 16)
    np.testing.assert_array_equal(mask, full_mask)
    assert vocab.vocab_size == len(np.unique(np.concatenate([full[full_mask > 0], [0]])))
    assert ids.max() < vocab.vocab_size and (vocab.cls_id, vocab.sep_id) == (ids[0, 0], ids[0, 6])
    np.testing.assert_array_equal(vocab.full_ids[ids], full)  # same tokens, compact numbering
    assert vocab.decode_batch(ids) == tok.decode_batch(full)
    with pytest.raises(ValueError, match="outside the compact vocabulary"):
        vocab.encode_batch(["a green ball"], 16)


def test_compact_vocab_cache_refuses_another_caption_set(tmp_path):
    tok = load_tokenizer()
    path = tmp_path / "vocab.json"
    first = captioner_stage.CompactVocab.cached(tok, ["a red ball", "two squares"], 8, path)
    again = captioner_stage.CompactVocab.cached(tok, ["a red ball", "two squares"], 8, path)
    np.testing.assert_array_equal(first.full_ids, again.full_ids)
    with pytest.raises(ValueError, match="built from other captions.*new workdir"):
        captioner_stage.CompactVocab.cached(tok, ["a green ball"], 8, path)


def test_small_kept_subsets_train_with_a_smaller_batch():
    config = tldr_config.get_config("tiny")
    same, batch = pipeline.subset_batch_config(config, 100)
    assert same is config and batch == 32
    small, batch = pipeline.subset_batch_config(config, 25)
    assert batch == 25 // jax.device_count() * jax.device_count() and batch <= 25
    assert small.train.batch_size == batch and config.train.batch_size == 32
    with pytest.raises(ValueError, match="need a batch of at least 2 pairs"):
        pipeline.subset_batch_config(config, jax.device_count() - 1 or 0)
    with pytest.raises(ValueError, match="has 1 pair:"):  # one pair: a zero contrastive loss
        pipeline.subset_batch_config(config, 1)


@pytest.mark.parametrize("stage", ["extract", "select", "score", "caption", "write"])
def test_stage_without_its_inputs_says_what_to_run(tmp_path, stage):
    """Before any work (score and caption used to train a model first, then fail)."""
    from tldr_jax.compress.common import INPUTS

    first, writer = INPUTS[stage][0]
    with pytest.raises(FileNotFoundError, match=f"{first} not found: run `tldr-jax {writer}`"):
        run_stage(stage, tldr_config.get_config("tiny"), str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_comparison_trains_on_train_json_captions_as_a_reader_sees_them(tmp_path):
    """The TL;DR arm of the retrieval comparison takes compress/train.json's captions cleaned,
    as a pre-training run reading that file gets them (the "; " joint and the 30-word cap)."""
    long = " ".join(f"w{i}" for i in range(40))
    rows = [
        {"image": "a.jpg", "caption": "a red circle; a picture of a red circle"},
        {"image": "b.jpg", "caption": f"Two Squares!; {long}"},
    ]
    io.write_json(tmp_path / "compress" / "train.json", rows)
    caps = pipeline.written_captions(str(tmp_path))
    assert caps[0] == ["a red circle a picture of a red circle"]
    assert caps[1][0].split() == ["two", "squares", *[f"w{i}" for i in range(28)]]


def test_a_diverged_captioner_stops_the_stage(tmp_path):
    config = tiny_config()
    config.captioner.train.update(lr=1e6, grad_clip=0.0, warmup_steps=0, schedule="constant")
    with pytest.raises(ConfigError, match=r"diverged at step \d+ .* at captioner.train.lr=1e\+06"):
        run_stage("train-captioner", config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "train-captioner.json").exists()


def test_an_arm_trained_before_loss_at_chance_was_recorded_is_judged_from_its_loss():
    """compress.json's arms: a cached W/eval/<arm>.json from before the key existed is worked
    out from its final loss and batch (it said false for dead arms), None where unknown."""
    from tldr_jax.compress.pipeline import _at_chance

    assert _at_chance({"loss_at_chance": True}) is True
    assert _at_chance({"final_loss": float(np.log(32)), "batch_size": 32}) is True
    assert _at_chance({"final_loss": 3.7, "batch_size": 32}) is False  # above: untrained
    assert _at_chance({"final_loss": 1.2, "batch_size": 32}) is False
    assert _at_chance({}) is None


def test_recall_plot_draws_each_arms_own_recalls(tmp_path, monkeypatch):
    import matplotlib.axes

    from tldr_jax.eval.retrieval import RECALL_KEYS

    drawn = []
    real_bar = matplotlib.axes.Axes.bar

    def bar(self, x, heights, width, **kwargs):
        drawn.append((kwargs["label"], list(heights)))
        return real_bar(self, x, heights, width, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    retrieval = {
        name: {**{k: base + i for i, k in enumerate(RECALL_KEYS)}, "pairs": pairs}
        for name, base, pairs in (("full", 50.0, 192), ("tldr", 30.0, 48), ("random", 10.0, 48))
    }
    pipeline.plot_recalls(tmp_path / "recall.png", retrieval)
    assert drawn == [
        (f"{name} ({r['pairs']} pairs)", [r[k] for k in RECALL_KEYS])
        for name, r in retrieval.items()
    ]
    assert (tmp_path / "recall.png").stat().st_size > 1000


def _write_inputs(workdir, config):
    """select/score/caption outputs for `write` on the tiny world: 6 kept rows in score's
    order; generated captions for 4 of them, one empty and one missing."""
    from tldr_jax.compress import write

    train = load_train(config)
    kept = [train.ids[i] for i in (7, 2, 11, 5, 30, 19)]
    io.write_npz(
        workdir / "select" / "clusters.npz",
        ids=np.array(train.ids),
        assignments=np.arange(len(train)) % 5,
    )
    io.write_npz(
        workdir / "score" / "kept.npz", ids=np.array(kept), scores=np.linspace(0.9, 0.4, 6)
    )
    generated = {sid: f"a picture of row {sid}" for sid in kept[:4]}
    generated[kept[1]] = ""  # an empty generation
    io.write_json(workdir / "caption" / "generated.json", generated)
    return write, train, kept, generated


def test_write_manifest_keeps_originals_and_clusters_by_id(tmp_path):
    """append: original + "; " + generated; a kept row whose generation is empty or missing
    keeps its original caption alone. The manifest says each row's cluster (looked up by
    id), score, original and generated caption; the summary counts the rows without one."""
    config = tldr_config.get_config("tiny")
    write, train, kept, generated = _write_inputs(tmp_path, config)
    summary = write.run(config, str(tmp_path))
    row = {sid: i for i, sid in enumerate(train.ids)}
    original = {sid: train.captions[row[sid]][0] for sid in kept}
    entries = io.read_json(tmp_path / "compress" / "train.json")
    manifest = io.read_json(tmp_path / "compress" / "manifest.json")
    want = [
        f"{original[sid]}; {generated[sid]}" if generated.get(sid) else original[sid]
        for sid in kept
    ]
    assert [e["caption"] for e in entries] == want
    assert [e["image"] for e in entries] == [train.image_keys[row[sid]] for sid in kept]
    assert manifest["mode"] == "append"
    assert [m["id"] for m in manifest["rows"]] == kept
    assert [m["cluster"] for m in manifest["rows"]] == [row[sid] % 5 for sid in kept]
    assert [m["original"] for m in manifest["rows"]] == [original[sid] for sid in kept]
    assert [m["generated"] for m in manifest["rows"]] == [generated.get(sid) for sid in kept]
    assert summary["kept_rows"] == 6 and summary["kept_without_generated_caption"] == 3
    assert summary["left_out_without_generated_caption"] == 0

    # replace: the generated caption alone, the original where there is none
    config.write.mode = "replace"
    write.run(config, str(tmp_path))
    entries = io.read_json(tmp_path / "compress" / "train.json")
    assert [e["caption"] for e in entries] == [generated.get(sid) or original[sid] for sid in kept]


def test_write_generated_mode_counts_only_rows_written(tmp_path):
    """generated: rows without a generated caption are left out and every count of the
    summary (rows, fraction, images) is of the rows written."""
    config = tldr_config.get_config("tiny")
    config.write.mode = "generated"
    write, train, kept, generated = _write_inputs(tmp_path, config)
    summary = write.run(config, str(tmp_path))
    entries = io.read_json(tmp_path / "compress" / "train.json")
    have = [sid for sid in kept if generated.get(sid)]
    assert [e["caption"] for e in entries] == [generated[sid] for sid in have]
    assert summary["left_out_without_generated_caption"] == 3
    assert summary["kept_rows"] == len(entries) == 3
    assert summary["fraction"] == pytest.approx(3 / len(train))
    assert summary["kept_images"] == len({e["image"] for e in entries})
    assert summary["kept_without_generated_caption"] == 0


def test_compress_cache_is_the_users_cache_dir_or_the_workdirs(tmp_path):
    from tldr_jax.compress.common import shared_cache

    config = tldr_config.get_config("tiny")
    assert shared_cache(config, tmp_path).cache_dir == str(tmp_path / "cache")
    config.cache_dir = str(tmp_path / "mine")
    assert shared_cache(config, tmp_path / "w").cache_dir == str(tmp_path / "mine")


def test_caption_set_is_read_from_caption_image_root():
    """caption.data's relative image paths resolve against caption.image_root, not the
    training set's data.image_root (which the config itself keeps)."""
    config = tldr_config.get_config("tiny")
    config.data.image_root = "/train-images"
    assert caption_stage.caption_data_config(config).image_root == "/train-images"  # world
    config.caption.data = "/coco/karpathy.json"
    config.caption.image_root = "/coco-images"
    assert caption_stage.caption_data_config(config).image_root == "/coco-images"
    assert config.data.image_root == "/train-images"


def test_nucleus_draws_depend_on_the_global_row_not_the_process(monkeypatch):
    """The sampling key of a batch is folded with its first global row: the second
    process's slice (row_offset 8) draws what a single process draws for those rows."""
    keys = []

    def fake_generate(model, x, prompt_ids, rng=None, **kwargs):
        keys.append(np.asarray(jax.random.key_data(rng)).tolist())
        return np.zeros((x.shape[0], 2), np.int32)

    monkeypatch.setattr(caption_stage, "generate_captions", fake_generate)
    tokenizer, cap = _fake_generation("nucleus", lambda t: [""] * len(t))
    images = np.zeros((16, 4, 4, 3), np.uint8)
    caption_stage.generate_texts(None, images, np.array([5]), tokenizer, cap, seed=3)
    whole = list(keys)
    keys.clear()
    caption_stage.generate_texts(
        None, images[8:], np.array([5]), tokenizer, cap, seed=3, row_offset=8
    )
    assert len(whole) == 2 and whole[0] != whole[1]
    assert keys == [whole[1]]


def _run_score(tmp_path, monkeypatch, selected_rows, keep_fraction, over):
    """`score` on the tiny world with its scorer stubbed: row i's image-text score is
    `value[i]` (a fixed permutation, so every order is known). -> (summary, values,
    the histogram's inputs, the training set)."""
    from tldr_jax.compress import score

    config = tiny_config()
    config.score.update(keep_fraction=keep_fraction, filter_over=over)
    config.text.batch_size = 7  # the captions are embedded in text.batch_size batches
    train = load_train(config)
    value = np.random.default_rng(0).permutation(len(train)).astype(np.float32) / len(train)
    n_caps = sum(len(c) for c in train.captions)
    stub = {"loss_at_chance": False, "steps": 3, "resumed_from": 0, "tr_r1": 1.0, "ir_r1": 2.0}
    monkeypatch.setattr(score, "make_text_encoder", lambda cfg: None)
    monkeypatch.setattr(score, "train_and_evaluate", lambda *a, **k: (stub, None))
    batch_sizes = []

    def embed_captions(encoder, caps, cache_dir, batch_size):
        batch_sizes.append(batch_size)
        return np.ones((n_caps, 1))

    monkeypatch.setattr(score, "embed_captions", embed_captions)
    monkeypatch.setattr(score, "embed_texts", lambda model, emb: np.asarray(emb, np.float32))
    monkeypatch.setattr(score, "embed_images", lambda model, ds: value[:, None])
    drawn = []
    monkeypatch.setattr(score, "plot_score_histogram", lambda *a: drawn.append(a[1:]))
    io.write_npz(tmp_path / "select" / "selected.npz", ids=np.array(train.ids)[selected_rows])
    summary = score.run(config, str(tmp_path))
    assert batch_sizes == [7]
    return summary, value, drawn, train


def test_score_keeps_the_best_fraction_of_the_selected_rows_and_reports_them(tmp_path, monkeypatch):
    """filter_over=selected: the best round(0.3 x 25) = 8 of select's 25 rows (listed in any
    order), kept.npz holds their ids and scores; the summary's means and the histogram's
    three inputs are all rows', the selected rows' and the kept rows'."""
    selected = np.random.default_rng(1).choice(96, 25, replace=False)
    summary, value, drawn, train = _run_score(tmp_path, monkeypatch, selected, 0.3, "selected")
    want = np.sort(selected[np.argsort(-value[selected])[:8]])
    kept = np.load(tmp_path / "score" / "kept.npz")
    np.testing.assert_array_equal(kept["ids"], np.array(train.ids)[want])
    np.testing.assert_allclose(kept["scores"], value[want], rtol=1e-6)
    scores = np.load(tmp_path / "score" / "scores.npz")
    np.testing.assert_allclose(scores["scores"], value, rtol=1e-6)
    assert (summary["input_rows"], summary["selected_rows"], summary["kept_rows"]) == (96, 25, 8)
    assert summary["filter_over"] == "selected" and summary["keep_fraction"] == 0.3
    assert summary["score_mean_all"] == pytest.approx(value.mean(), rel=1e-5)
    assert summary["score_mean_selected"] == pytest.approx(value[selected].mean(), rel=1e-5)
    assert summary["score_mean_kept"] == pytest.approx(value[want].mean(), rel=1e-5)
    assert summary["scorer_retrieval"] == {"tr_r1": 1.0, "ir_r1": 2.0}
    ((all_rows, sel_scores, kept_scores),) = drawn
    np.testing.assert_allclose(all_rows, value, rtol=1e-6)
    np.testing.assert_allclose(np.sort(sel_scores), np.sort(value[selected]), rtol=1e-6)
    np.testing.assert_allclose(np.sort(kept_scores), np.sort(value[want]), rtol=1e-6)


def test_score_over_all_rows_keeps_the_selected_rows_among_the_best_of_all(tmp_path, monkeypatch):
    """filter_over=all: select's rows that are in the best round(0.5 x 96) = 48 of all rows."""
    selected = np.arange(0, 96, 3)
    summary, value, _, train = _run_score(tmp_path, monkeypatch, selected, 0.5, "all")
    best = np.argsort(-value)[:48]
    want = np.intersect1d(selected, best)
    kept = np.load(tmp_path / "score" / "kept.npz")
    np.testing.assert_array_equal(kept["ids"], np.array(train.ids)[want])
    assert summary["kept_rows"] == len(want) and summary["filter_over"] == "all"
