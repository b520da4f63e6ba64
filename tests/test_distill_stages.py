"""Stages buffer -> distill -> eval-distilled on a tiny embedded world: outputs and resumption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import distill as distill_config
from tldr_jax.cli import run_stage
from tldr_jax.data.images import normalize
from tldr_jax.distill import expert_trajectories as et
from tldr_jax.distill.distill_stage import initial_pairs

EXPERTS, EPOCHS = 2, 2


def tiny_config(cache_dir: Path):
    c = distill_config.get_config("small")
    c.data.image_size = 16
    c.data.world.update(image_size=16, num_pairs=200, num_test=40, num_clean=10)
    c.model.image_kwargs.update(depth=2, width=8)
    c.buffer.update(num_experts=EXPERTS, epochs=EPOCHS, batch_size=64)
    c.distill.update(num_pairs=8, syn_steps=2, iterations=3, ckpt_every=2, log_every=1)
    c.eval.update(num_models=1, epochs=2, budgets=())
    c.cache_dir = str(cache_dir)
    return c


@pytest.fixture(scope="module")
def buffered(tmp_path_factory):
    root = tmp_path_factory.mktemp("vld")
    config = tiny_config(root / "cache")
    summary = run_stage("buffer", config, str(root / "w"))
    return config, root, summary


def _trajectories(config, workdir: Path, num_params, n):
    return [
        et.load_expert(workdir, e, EPOCHS, num_params, n) for e in range(config.buffer.num_experts)
    ]


def test_buffer_snapshots_every_epoch_and_resumes(buffered):
    config, root, summary = buffered
    workdir = root / "w"
    assert summary["trained_epochs_this_run"] == EXPERTS * EPOCHS
    assert (workdir / "buffer.json").exists()
    assert summary["experts_at_chance"] == []  # the embedded world's pairs are told apart
    assert et.loss_at_chance(float(np.log(64)), 64) and not et.loss_at_chance(3.5, 64)
    # A rerun of the finished buffer checks the experts' recorded losses too.
    rerun_dir = root / "chance"
    shutil.copytree(workdir, rerun_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(et, "loss_at_chance", lambda loss, batch: True)
        rerun = run_stage("buffer", config, str(rerun_dir))
    assert rerun["trained_epochs_this_run"] == 0
    assert rerun["experts_at_chance"] == list(range(EXPERTS))
    n = summary["train_pairs"]
    num_params = (summary["num_params"]["img"], summary["num_params"]["txt"])
    # Reading experts never sweeps their folders: a buffer may be saving into one (its
    # `<step>.orbax-checkpoint-tmp`), with distill / eval-distilled reading beside it.
    in_progress = workdir / "buffer" / "expert_000" / "9.orbax-checkpoint-tmp"
    in_progress.mkdir()
    trajs = _trajectories(config, workdir, num_params, n)
    assert in_progress.exists()
    in_progress.rmdir()
    for e, (traj, extra, done) in enumerate(trajs):
        assert done == EPOCHS
        assert traj["img"].shape == (EPOCHS + 1, num_params[0])
        assert traj["txt"].shape == (EPOCHS + 1, num_params[1])
        # Epoch 0 is the expert's initialisation; every epoch moves both modalities.
        init = et.init_params(config, 384, int(config.seed) * 1000 + e)
        np.testing.assert_array_equal(traj["img"][0], np.asarray(init[0]))
        np.testing.assert_array_equal(traj["txt"][0], np.asarray(init[1]))
        assert np.all(np.linalg.norm(np.diff(traj["img"], axis=0), axis=1) > 0)
        assert np.all(np.linalg.norm(np.diff(traj["txt"], axis=0), axis=1) > 0)
        assert not traj["correct"][0].any() and traj["correct"][1:].any()
        assert len(extra["recall"]) == EPOCHS + 1
        assert 0 < extra["loss"] < np.log(config.buffer.batch_size)  # the last epoch's
    assert not np.array_equal(trajs[0][0]["img"][0], trajs[1][0]["img"][0])

    # Lose the last expert (as if preempted before it finished): the rerun trains only it
    # and writes the same vectors.
    again = root / "again"
    shutil.copytree(workdir, again)
    shutil.rmtree(et.expert_dir(again, EXPERTS - 1))
    rerun = run_stage("buffer", config, str(again))
    assert rerun["trained_epochs_this_run"] == EPOCHS
    for (a, _, _), (b, _, _) in zip(
        trajs, _trajectories(config, again, num_params, n), strict=True
    ):
        for key in ("img", "txt", "correct"):
            np.testing.assert_array_equal(a[key], b[key])


def _copy_of_buffer(root: Path, config: Any, name: str) -> tuple[Path, Any]:
    """A copy of the shared buffer's workdir (`root / "w"`) at `root / name`, and a copy of
    its config for the test to change."""
    workdir = root / name
    shutil.copytree(root / "w", workdir)
    return workdir, config.copy_and_resolve_references()


def test_distill_outputs_resume_and_eval(buffered, monkeypatch):
    config, root, _ = buffered
    workdir = root / "d"
    shutil.copytree(root / "w", workdir)
    first = run_stage("distill", config, str(workdir))
    assert first["resumed_from"] == 0 and first["skipped"] == 0
    assert first["scan_unroll"] is False and first["malloc_hugepages"] in (True, False)
    # A tiny student's per-step parameters fit any budget: remat would not nest.
    assert first["remat_chunk"] == (1 if config.distill.grad_mode == "remat" else None)
    out = workdir / "distill"
    assert (out / "distilled.png").stat().st_size > 0
    with np.load(out / "distilled.npz") as f:
        images, texts = f["images"], f["texts"]
        assert images.shape == (8, 16, 16, 3) and texts.shape == (8, 384)
        assert np.isfinite(f["lr_img"]) and np.isfinite(f["lr_txt"])
        assert f["nearest_caption_index"].shape == (8,)
        assert "similarity" not in f.files and "sim_left" not in f.files  # LoRS is off
    assert first["lors"] is False and "lors_similarity" not in first
    csv = (workdir / "metrics" / "distill.csv").read_text()
    assert "meta_loss" in csv and "skipped" in csv

    # Resume: three more iterations continue from the checkpoint at iteration 3.
    config5 = config.copy_and_resolve_references()
    config5.distill.iterations = 5
    config5.distill.grad_mode = "remat"  # rerun-free: the same exact gradient
    second = run_stage("distill", config5, str(workdir))
    assert second["resumed_from"] == 3 and second["iterations"] == 5
    assert second["grad_mode_history"] == [
        {"from_iteration": 0, "grad_mode": "unroll", "scan_unroll": False, "remat_chunk": None},
        {"from_iteration": 3, "grad_mode": "remat", "scan_unroll": False, "remat_chunk": 1},
    ]
    with np.load(out / "distilled.npz") as f:
        assert not np.array_equal(f["images"], images)
    # The meta-loss history travels in the checkpoints: a rerun of the finished stage (or a
    # resumed one) reports the whole run's figures.
    again = run_stage("distill", config5, str(workdir))
    assert again["resumed_from"] == 5 and first["meta_loss_first10"] is not None
    for key in ("meta_loss_first10", "meta_loss_last10"):
        assert again[key] == pytest.approx(second[key]) and second[key] is not None
    # Fewer iterations asked of a set learned for more: kept as it is, reported as it is.
    config2 = config.copy_and_resolve_references()
    config2.distill.iterations = 2
    config2.distill.scan_unroll = True  # runs nothing: the summary says what made the set
    fewer = run_stage("distill", config2, str(workdir))
    assert fewer["iterations"] == 5 and fewer["iterations_asked"] == 2
    assert (fewer["grad_mode"], fewer["scan_unroll"], fewer["remat_chunk"]) == ("remat", False, 1)
    with np.load(out / "distilled.npz") as f:
        assert int(f["iterations"]) == 5
    # eval-distilled refuses a set short of distill.iterations (a longer distill run that
    # stopped before its end leaves the previous run's set on disk).
    config7 = config.copy_and_resolve_references()
    config7.distill.iterations = 7
    with pytest.raises(ValueError, match=r"iterations=7: distill has not run that far"):
        run_stage("eval-distilled", config7, str(workdir))
    # Settings that define the synthetic set cannot change under a finished one.
    noise = config5.copy_and_resolve_references()
    noise.distill.init = "noise"
    with pytest.raises(
        ValueError, match=r"other settings than this run's \(distill.init: 'real' -> 'noise'\)"
    ):
        run_stage("distill", noise, str(workdir))
    # Image-tower slices that do not divide the student batch: one line before anything is
    # read or compiled (a traceback from inside the meta-gradient's tracing before).
    sliced = config5.copy_and_resolve_references()
    sliced.distill.micro_batches = 3
    with pytest.raises(
        ValueError, match=r"distill.micro_batches=3: must divide the student batch 8"
    ):
        run_stage("distill", sliced, str(workdir))

    # eval-distilled: the five methods, each with mean/std of the six recall keys.
    result = run_stage("eval-distilled", config, str(workdir))
    for method in ("distilled", "random", "herding", "kcenter", "forgetting"):
        for key in et.RECALL_KEYS:
            stats = result[method][key]
            assert set(stats) >= {"mean", "std"} and 0.0 <= stats["mean"] <= 100.0
        assert result[method]["num_pairs"] == 8
    assert result["distilled"]["iterations"] == 5
    assert "| distilled |" in (workdir / "eval-distilled.md").read_text()
    assert (workdir / "eval-distilled.json").exists()
    assert result["protocol"]["coreset_pairs"] == 8
    # SPEC B.4: every parameter at the learned image step size (eval.text_head_lr=image)
    d = result["distilled"]
    assert d["lr_text_head"] == d["lr_img"] != d["lr_txt"]
    assert result["protocol"]["text_head_lr"] == "image"
    assert result["protocol"]["max_steps"] == config.eval.max_steps
    # Each baseline's own picks: budget-many distinct training pairs, not one shared subset.
    picks = json.loads(Path(result["coreset_ids"]).read_text())
    train_ids = set(et.load_pairs(config, str(workdir)).train_pair_ids)
    assert set(picks) == {"8"} and set(picks["8"]) == {"random", "herding", "kcenter", "forgetting"}
    for method, ids in picks["8"].items():
        assert len(ids) == len(set(ids)) == 8 and set(ids) <= train_ids, method
    assert len({tuple(sorted(ids)) for ids in picks["8"].values()}) == 4, picks

    # A coreset budget above the training set takes all of it (and says so).
    big = config.copy_and_resolve_references()
    big.eval.coreset_pairs = 10**6
    big.eval.text_head_lr = "text"  # the text head at the learned text step size
    n = result["train_pairs"]
    result = run_stage("eval-distilled", big, str(workdir))
    assert result["distilled"]["lr_text_head"] == result["distilled"]["lr_txt"]
    assert result["protocol"]["coreset_pairs"] == n
    assert result["protocol"]["coreset_pairs_asked"] == 10**6
    assert result["random"]["num_pairs"] == n and set(result["budgets"]) == {"8", str(n)}
    assert (workdir / "eval-distilled.png").stat().st_size > 1000  # recall vs pairs

    # Models that diverge (a blown-up learned step size, a coreset lr far too high) score 0,
    # are counted and marked; NaN scores once ranked first and reported recall 100.
    with np.load(out / "distilled.npz") as f:
        patched = {k: f[k] for k in f.files}
    patched.update(lr_img=np.float32(1e30), lr_txt=np.float32(-1e30))
    np.savez(out / "distilled.npz", **patched)
    hot = config.copy_and_resolve_references()
    hot.eval.coreset_lr = 1e30
    result = run_stage("eval-distilled", hot, str(workdir))
    for method in ("distilled", "random", "herding", "kcenter", "forgetting"):
        assert result[method]["diverged_models"] == 1
        assert {result[method][k]["mean"] for k in et.RECALL_KEYS} == {0.0}
    table = (workdir / "eval-distilled.md").read_text()
    assert (
        "| 8 | distilled (1 diverged) (learned step sizes 1e+30 / -1e+30) |" in table
        and "| 8 | k-center (1 diverged) |" in table
    )
    assert table.startswith("| pairs | method | TR@1 | TR@5 | TR@10 | IR@1 |")
    assert not (workdir / "eval-distilled.png").exists()  # one budget now: no stale curve
    # A model with some non-finite parameters whose test embeddings still come out finite
    # (the coresets at a sane lr here) also scores 0, not what those embeddings give.
    from tldr_jax.distill import eval_distilled

    monkeypatch.setattr(eval_distilled, "all_finite", lambda tree: False)
    every = config.copy_and_resolve_references()
    every.eval.budgets = (n, n + 1)  # all the training pairs: kept; one more: left out
    result = run_stage("eval-distilled", every, str(workdir))
    assert set(result["budgets"]) == {"8", str(n)}
    for method in ("random", "herding", "kcenter", "forgetting"):
        assert result[method]["diverged_models"] == 1
        assert {result[method][k]["mean"] for k in et.RECALL_KEYS} == {0.0}


def test_distill_beside_an_unfinished_buffer_records_the_experts_it_matched(buffered, caplog):
    """distill run while the buffer still trains (one of two experts finished): the summary
    says how many experts the set was matched against, a rerun of the finished stage warns
    that more are finished now, and more iterations go on with all of them."""
    config, root, _ = buffered
    workdir = root / "partial"
    shutil.copytree(root / "w", workdir)
    parked = root / "parked_expert_001"
    shutil.move(str(workdir / "buffer" / "expert_001"), parked)
    first = run_stage("distill", config, str(workdir))
    assert first["num_experts_used"] == 1 and first["num_experts_finished"] == 1
    assert first["experts_history"] == [{"from_iteration": 0, "num_experts": 1}]
    # (reading the buffer opened an empty checkpoint folder for the expert not there)
    shutil.rmtree(workdir / "buffer" / "expert_001", ignore_errors=True)
    shutil.move(str(parked), workdir / "buffer" / "expert_001")
    with caplog.at_level("WARNING"):
        again = run_stage("distill", config, str(workdir))
    assert again["resumed_from"] == 3 and again["num_experts_used"] == 1
    assert again["num_experts_finished"] == 2
    assert any("learned matching 1 experts; 2 are finished" in r.message for r in caplog.records)
    more = config.copy_and_resolve_references()
    more.distill.iterations = 5
    last = run_stage("distill", more, str(workdir))
    assert last["num_experts_used"] == 2
    assert last["experts_history"] == [
        {"from_iteration": 0, "num_experts": 1},
        {"from_iteration": 3, "num_experts": 2},
    ]


def test_distill_seed_varies_the_set_on_one_buffer(buffered):
    """distill.seed: -1 is the global seed (same set and signature as before the key
    existed); another seed on the same buffer learns another set, in its own workdir."""
    config, root, _ = buffered
    sets = {}
    for name, seed in (("seed_default", -1), ("seed_global", int(config.seed)), ("seed_7", 7)):
        workdir, c = _copy_of_buffer(root, config, name)
        c.distill.seed = seed
        summary = run_stage("distill", c, str(workdir))
        assert summary["seed"] == (7 if seed == 7 else int(config.seed))
        with np.load(workdir / "distill" / "distilled.npz") as f:
            sets[name] = (f["images"], f["init_index"])
    np.testing.assert_array_equal(sets["seed_default"][0], sets["seed_global"][0])
    assert not np.array_equal(sets["seed_default"][0], sets["seed_7"][0])
    assert not np.array_equal(sets["seed_default"][1], sets["seed_7"][1])  # other real pairs drawn
    # The signature names the seed only where it is not the global one ...
    sig = (root / "seed_default" / "distill" / "signature.json").read_text()
    assert sig == (root / "seed_global" / "distill" / "signature.json").read_text()
    assert "distill.seed" not in sig and "buffer.seed" in sig
    # ... so a finished set refuses another distill seed, and eval-distilled reads it as is.
    other = config.copy_and_resolve_references()
    other.distill.seed = 8
    with pytest.raises(ValueError, match=r"\(distill.seed: 7 -> 8\)"):
        run_stage("distill", other, str(root / "seed_7"))
    seven = config.copy_and_resolve_references()
    seven.distill.seed = 7
    result = run_stage("eval-distilled", seven, str(root / "seed_7"))
    assert result["distilled"]["num_pairs"] == 8


def test_buffer_resumes_inside_an_expert_and_writes_the_same_vectors(buffered):
    """The last expert stopped after epoch 1 of 2 (its checkpoint at step 1, as a preempted
    buffer leaves it): the rerun trains only its last epoch, from the epoch-1 snapshot, and
    writes the uninterrupted run's vectors and per-pair rows; the summary counts the expert
    epochs done before it, summed over the experts."""
    from tldr_jax.train.checkpoint import Checkpointer

    config, root, summary = buffered
    n = summary["train_pairs"]
    num_params = (summary["num_params"]["img"], summary["num_params"]["txt"])
    full = _trajectories(config, root / "w", num_params, n)
    workdir = root / "mid_expert"
    shutil.copytree(root / "w", workdir)
    last = EXPERTS - 1
    traj, extra, _ = full[last]
    cut = {k: v.copy() for k, v in traj.items()}
    for v in cut.values():
        v[2:] = 0  # rows past the step are still zero
    shutil.rmtree(et.expert_dir(workdir, last))
    ckpt = Checkpointer(et.expert_dir(workdir, last), max_to_keep=1)
    ckpt.save(1, cut, extra={"recall": extra["recall"][:2], "loss": 1.0})
    ckpt.close()
    rerun = run_stage("buffer", config, str(workdir))
    assert rerun["trained_epochs_this_run"] == 1
    assert rerun["resumed_from"] == EXPERTS * EPOCHS - 1
    resumed = _trajectories(config, workdir, num_params, n)
    for (a, _, _), (b, extra_b, done) in zip(full, resumed, strict=True):
        assert done == EPOCHS and len(extra_b["recall"]) == EPOCHS + 1
        for key in ("img", "txt", "correct"):
            np.testing.assert_array_equal(a[key], b[key])


def test_buffer_pairs_left_out_of_an_epoch_keep_their_correct_value(buffered, monkeypatch):
    """200 pairs at batch 64: each epoch trains 3 batches and leaves 8 pairs out; their
    "correct" row keeps the previous epoch's value (the forgetting coreset reads it). Here
    every fed pair is reported retrieved, so row k + 1 is row k with the fed pairs set."""
    config, root, _ = buffered
    real = et.make_trainer

    def always_retrieved(*args, **kwargs):
        train = real(*args, **kwargs)

        def run(*a, **k):
            theta, state, loss, correct = train(*a, **k)
            return theta, state, loss, np.ones_like(correct)

        return run

    monkeypatch.setattr(et, "make_trainer", always_retrieved)
    c = config.copy_and_resolve_references()
    c.buffer.num_experts = 1
    summary = run_stage("buffer", c, str(root / "carry"))
    n, batch = summary["train_pairs"], summary["batch_size"]
    num_params = (summary["num_params"]["img"], summary["num_params"]["txt"])
    traj, _, done = et.load_expert(root / "carry", 0, EPOCHS, num_params, n)
    assert done == EPOCHS and not traj["correct"][0].any()
    for epoch in range(EPOCHS):
        fed = et.epoch_batches(n, batch, int(c.seed), 0, epoch).ravel()
        assert n - len(fed) == 8
        want = traj["correct"][epoch].copy()
        want[fed] = True
        np.testing.assert_array_equal(traj["correct"][epoch + 1], want)
    # (the last epoch's left-out pairs were fed the epoch before: True carried over)
    assert traj["correct"][EPOCHS][np.setdiff1d(np.arange(n), fed)].any()


def _student_and_random_pairs(tmp_path: Path, dim: int, n: int):
    """The tiny config's student over `dim`-wide texts and n random 16 px pairs (seed 0):
    (config, student, rng, images, texts)."""
    config = tiny_config(tmp_path)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, 16, 16, 3)).astype(np.float32)
    texts = rng.normal(size=(n, dim)).astype(np.float32)
    return config, et.build_student(config, dim), rng, images, texts


def test_trainer_marks_pairs_retrieved_at_rank_1_both_ways_in_their_minibatch(tmp_path):
    """make_trainer's per-pair flag: image -> text AND text -> image argmax inside the fed
    minibatch, one column per row of batch_idx in its order (lr 0: the model stays put)."""
    import optax

    from tldr_jax.train.losses import l2_normalize
    from tldr_jax.utils.mesh import make_mesh

    dim, n, batch, steps = 12, 32, 8, 6
    config, student, rng, images, texts = _student_and_random_pairs(tmp_path, dim, n)
    idx = np.stack([rng.permutation(n)[:batch] for _ in range(steps)]).astype(np.int32)
    keys = jax.random.split(jax.random.key(0), steps)
    tx = optax.sgd(0.0)
    trainer = et.make_trainer(student, make_mesh(), batch, tx, tx, dropout=False)
    theta = et.init_params(config, dim, 5)
    state = (tx.init(theta[0]), tx.init(theta[1]))
    _, _, _, correct = trainer(theta, state, images, texts, idx, keys)
    img, txt = student.apply(theta[0], theta[1], images, texts)
    img, txt = np.asarray(l2_normalize(img)), np.asarray(l2_normalize(txt))
    i2t, t2i = [], []
    for rows in idx:
        sim = img[rows] @ txt[rows].T
        i2t.append(sim.argmax(1) == np.arange(batch))
        t2i.append(sim.argmax(0) == np.arange(batch))
    i2t, t2i = np.array(i2t), np.array(t2i)
    assert correct.shape == (steps, batch) and correct.dtype == bool
    np.testing.assert_array_equal(correct, i2t & t2i)
    # Pairs retrieved one way only exist here, so "either way" would show.
    assert (i2t ^ t2i).any() and (i2t & t2i).any()


def test_changed_data_or_recipe_is_refused(buffered):
    config, root, _ = buffered
    workdir = root / "w"
    more = config.copy_and_resolve_references()
    more.buffer.epochs = EPOCHS + 1
    with pytest.raises(
        ValueError, match=r"buffer was made with other settings.*\(buffer.epochs: 2 -> 3\)"
    ):
        run_stage("buffer", more, str(workdir))
    bigger = config.copy_and_resolve_references()
    bigger.data.image_size = 20
    with pytest.raises(ValueError, match=r"\(data.image_size: 16 -> 20\)"):
        run_stage("distill", bigger, str(workdir))
    other = config.copy_and_resolve_references()
    other.data.world.num_pairs = 150
    changed = r"training data changed \(200 pairs, sha256 \w+ -> 150 pairs"
    with pytest.raises(ValueError, match=changed):
        run_stage("distill", other, str(workdir))
    # The expert recipe binds as a whole: another batch size trains other experts.
    smaller = config.copy_and_resolve_references()
    smaller.buffer.batch_size = 32
    with pytest.raises(ValueError, match=r"\(buffer.batch_size: 64 -> 32\)"):
        run_stage("buffer", smaller, str(workdir))


def test_a_diverging_expert_stops_the_buffer_with_a_clear_error(tmp_path):
    config = tiny_config(tmp_path / "cache")
    config.buffer.lr = 1e30
    with pytest.raises(
        ValueError,
        match=r"buffer: expert 0 diverged in epoch 1 .* Lower buffer.lr and use a new --workdir",
    ):
        run_stage("buffer", config, str(tmp_path / "w"))


def test_an_expert_blown_up_but_finite_is_named_with_buffer_lr(tmp_path, caplog):
    """buffer.lr far too high but not NaN: the scale-invariant encoders' weights blow up and
    freeze at chance; the warning names buffer.lr, not the data."""
    config = tiny_config(tmp_path / "cache")
    config.buffer.update(lr=1e6, num_experts=1, epochs=1)
    config.distill.expert_epochs = 1
    summary = run_stage("buffer", config, str(tmp_path / "w"))
    assert summary["experts_at_chance"] == [0] and summary["resumed_from"] == 0
    assert "from their start and froze there: buffer.lr=1e+06 is far too high" in caplog.text


def test_too_few_pairs_for_the_synthetic_set_is_a_clear_error():
    images, texts = np.zeros((5, 4, 4, 3), np.float32), np.zeros((5, 3), np.float32)
    for init in ("real", "kmeans"):
        with pytest.raises(ValueError, match="distill.num_pairs=8 > 5 training pairs"):
            initial_pairs(init, 8, 0, images, texts, texts)
    imgs, _, idx = initial_pairs("noise", 8, 0, images, texts)
    assert imgs.shape == (8, 4, 4, 3) and (idx == -1).all()


def test_a_distill_stopped_at_its_start_leaves_no_record_that_refuses_the_fix(buffered):
    config, root, summary = buffered
    workdir, too_many = _copy_of_buffer(root, config, "start")
    too_many.distill.num_pairs = summary["train_pairs"] + 1
    with pytest.raises(ValueError, match=r"distill.num_pairs=\d+ > \d+ training pairs"):
        run_stage("distill", too_many, str(workdir))
    assert not (workdir / "distill" / "signature.json").exists()
    fixed = config.copy_and_resolve_references()
    fixed.distill.iterations = 1
    assert run_stage("distill", fixed, str(workdir))["iterations"] == 1


def test_runaway_synthetic_sets_are_warned_about(caplog):
    from tldr_jax.distill.distill_stage import warn_if_diverged

    assert warn_if_diverged([1.0] * 10, [1.0] * 5 + [0.6] * 10, (0.01, 0.01), 0.01) == []
    found = warn_if_diverged([1.0] * 10, [1.0] * 10 + [200.0] * 10, (0.0, 1e-11), 0.01)
    assert found == [
        "the meta-loss grew from 1 (first 10 iterations) to 200 (last 10)",
        "the learned lr_img and lr_txt collapsed (< 1e-6 of step_size_init)",
    ]
    assert "buffer.json's experts_at_chance" in caplog.text
    # A short run compares windows that do not overlap.
    short = [1.0, 1.0, 1.0, 50.0, 60.0, 70.0]
    assert warn_if_diverged(short, short, (0.01, 0.01), 0.01) == [
        "the meta-loss grew from 1 (first 3 iterations) to 60 (last 3)"
    ]
    # Synthetic data far outside the real data's range (finite: scale-invariant encoders).
    flat = [1.0] * 20
    assert warn_if_diverged(flat, flat, (0.01, 0.01), 0.01, growth={"images": 9.6}) == []
    assert warn_if_diverged(
        flat, flat, (0.01, 0.01), 0.01, growth={"images": 2.0, "texts": 3e4}
    ) == ["the synthetic texts blew up (largest entry 3e+04x that of the real ones)"]
    # LoRS: a similarity that blew up or is not finite; the warning names lors_lr.
    assert warn_if_diverged(flat, flat, (0.01, 0.01), 0.01, similarity=np.eye(4) * 2.5) == []
    caplog.clear()
    assert warn_if_diverged(flat, flat, (0.01, 0.01), 0.01, similarity=np.eye(4) * 3e5) == [
        "the learned LoRS similarity blew up (max |entry| 3e+05; it starts at the identity)"
    ]
    assert "lr_step_size / lors_lr" in caplog.text
    assert warn_if_diverged(flat, flat, (0.01, 0.01), 0.01, similarity=np.full((2, 2), np.nan)) == [
        "the learned LoRS similarity is not finite"
    ]


def test_distill_nan_guard_counts_skipped_updates(buffered):
    config, root, _ = buffered
    workdir, config = _copy_of_buffer(root, config, "nan")
    # A step size of 1e30 makes the student diverge: every meta loss is non-finite.
    config.distill.update(step_size_init=1e30, iterations=2, grad_mode="tesla")
    summary = run_stage("distill", config, str(workdir))
    assert summary["skipped"] == 2
    # The skipped iterations' non-finite losses are not reported as the run's meta-loss.
    assert summary["meta_loss_first10"] is None and summary["meta_loss_last10"] is None
    assert summary["lr_img"] == pytest.approx(1e30, rel=1e-6)
    with np.load(workdir / "distill" / "distilled.npz") as f:
        from tldr_jax.data.dataset import load_set

        assert int(f["skipped"]) == 2 == int(f["iterations"])  # eval-distilled says so

        train = load_set("", config.data, "train")
        # Untouched: still the initial real pairs.
        np.testing.assert_allclose(f["images"], normalize(train.images[f["init_index"]]))


def test_kill9_mid_distill_then_rerun_matches_uninterrupted(tmp_path):
    """A `tldr-jax distill` subprocess killed with SIGKILL after a checkpoint resumes on rerun
    and ends with the distilled set of an uninterrupted run (within float tolerance)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    args = ["--config", "configs/distill.py:tiny", "--config.cache_dir", str(tmp_path / "c")]

    def cli(stage, workdir, wait=True):
        p = subprocess.Popen(
            [sys.executable, "-m", "tldr_jax.cli", stage, *args, "--workdir", str(workdir)],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if wait:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
        return p

    cli("buffer", tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    cli("distill", tmp_path / "a")
    proc = cli("distill", tmp_path / "b", wait=False)
    ckpts = tmp_path / "b" / "distill" / "checkpoints"
    t0 = time.time()
    while not (ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < 600
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "b" / "distill.json").exists()
    cli("distill", tmp_path / "b")
    # It resumed at the checkpoint (a restart from scratch would also end on the same set).
    assert json.loads((tmp_path / "b" / "distill.json").read_text())["resumed_from"] > 0
    a = np.load(tmp_path / "a" / "distill" / "distilled.npz")
    b = np.load(tmp_path / "b" / "distill" / "distilled.npz")
    for k in ("images", "texts", "lr_img", "lr_txt"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)


def _record_eval_training(monkeypatch) -> list[dict]:
    """Every call eval-distilled makes to a trainer, in order, as {"kind": "train"} with the
    trainer's `batch`, `lr_img`, `lr_txt` and image optimiser `tx_img`, and the call's block
    `shape`, `opt_state`, parameters before and after (`theta_in`, `theta_out`) and
    `targets` (LoRS; None for hard pairs). Returned as the list it fills."""
    from tldr_jax.distill import eval_distilled

    events: list[dict] = []
    make = eval_distilled.Evaluator._trainer

    def spy(self, batch, lr_img, lr_txt):
        trainer, tx_img, tx_txt = make(self, batch, lr_img, lr_txt)

        def run(theta, opt_state, x, t, idx, keys, targets=None):
            call = dict(
                kind="train",
                batch=batch,
                lr_img=lr_img,
                lr_txt=lr_txt,
                tx_img=tx_img,
                shape=np.asarray(idx).shape,
                opt_state=opt_state,
                theta_in=[np.asarray(p).copy() for p in theta],
                targets=None if targets is None else np.asarray(targets),
            )
            out = trainer(theta, opt_state, x, t, idx, keys, targets)
            events.append({**call, "theta_out": [np.asarray(p).copy() for p in out[0]]})
            return out

        return run, tx_img, tx_txt

    monkeypatch.setattr(eval_distilled.Evaluator, "_trainer", spy)
    return events


def test_distill_lors_saves_similarity_resumes_and_evals(buffered, monkeypatch):
    """`distill.lors=True`: the learned soft similarity is checkpointed (resume), saved in the
    npz with its factors, reported in distill.json and used by eval-distilled."""
    import json

    config, root, _ = buffered
    workdir, config = _copy_of_buffer(root, config, "lors")
    config.distill.update(lors=True, lors_rank=4, lors_alpha=0.1, lors_lr=100.0, iterations=2)
    first = run_stage("distill", config, str(workdir))
    assert first["lors"] is True and first["skipped"] == 0
    config.distill.iterations = 3
    second = run_stage("distill", config, str(workdir))
    assert second["resumed_from"] == 2 and second["skipped"] == 0
    report = json.loads((workdir / "distill.json").read_text())
    assert report["lors"] is True
    with np.load(workdir / "distill" / "distilled.npz") as f:
        assert {"sim_diag", "sim_left", "sim_right", "similarity"} <= set(f.files)
        a, left, right, sim = f["sim_diag"], f["sim_left"], f["sim_right"], f["similarity"]
    assert left.shape == right.shape == (8, 4) and sim.shape == (8, 8)
    np.testing.assert_allclose(sim, np.diag(a) + 0.1 / 4 * left @ right.T, rtol=1e-5, atol=1e-7)
    # Learned: R left zero, so S moved off the identity; the summary reports that motion.
    assert np.abs(right).max() > 0 and np.isfinite(sim).all()
    off = np.abs(sim[~np.eye(8, dtype=bool)])
    stats = report["lors_similarity"]
    assert stats["rank"] == 4
    assert stats["offdiag_abs_mean"] == pytest.approx(float(off.mean()), rel=1e-5)
    assert stats["diag_mean"] == pytest.approx(float(np.diag(sim).mean()), rel=1e-5)
    assert "lors_offdiag" in (workdir / "metrics" / "distill.csv").read_text()

    # eval-distilled trains the distilled set on the learned similarity, the coresets on
    # their hard pairs.
    fed = _record_eval_training(monkeypatch)
    result = run_stage("eval-distilled", config, str(workdir))
    assert result["distilled"]["soft_targets"] is True
    soft = [call["targets"] for call in fed if call["targets"] is not None]
    assert soft and len(soft) < len(fed)  # the coresets' calls have none
    for targets in soft:
        np.testing.assert_array_equal(targets, sim)
    for key in et.RECALL_KEYS:
        assert 0.0 <= result["distilled"][key]["mean"] <= 100.0


def test_trainer_soft_targets_follow_the_fed_rows(tmp_path):
    """make_trainer with (N, N) targets: one SGD step equals a direct step on the soft loss
    with targets[idx][:, idx] (batch sharded over the 8 host devices); identity == default."""
    import jax
    import optax

    from tldr_jax.distill.matching import LOGIT_SCALE, contrastive_loss
    from tldr_jax.utils.mesh import make_mesh

    dim, n, batch, lr = 12, 16, 8, 0.5
    config, student, rng, images, texts = _student_and_random_pairs(tmp_path, dim, n)
    targets = (np.eye(n) + 0.2 * rng.normal(size=(n, n))).astype(np.float32)
    idx = np.array([[9, 2, 14, 0, 5, 11, 7, 3]], np.int32)
    keys = jax.random.split(jax.random.key(0), 1)
    tx = optax.sgd(lr)
    trainer = et.make_trainer(student, make_mesh(), batch, tx, tx, dropout=False)
    theta0 = et.init_params(config, dim, 5)

    def run(tgt):
        state = (tx.init(theta0[0]), tx.init(theta0[1]))
        theta, _, loss, _ = trainer(theta0, state, images, texts, idx, keys, tgt)
        return jax.device_get(theta), float(loss)

    def direct(tgt):
        def loss_fn(th):
            img, txt = student.apply(th[0], th[1], images[idx[0]], texts[idx[0]])
            return contrastive_loss(img, txt, LOGIT_SCALE, tgt)

        loss, g = jax.value_and_grad(loss_fn)(theta0)
        return (theta0[0] - lr * g[0], theta0[1] - lr * g[1]), float(loss)

    (soft, soft_loss), (want, want_loss) = run(targets), direct(targets[idx[0]][:, idx[0]])
    assert soft_loss == pytest.approx(want_loss, rel=1e-5)
    for a, b, t0 in zip(soft, want, theta0, strict=True):
        np.testing.assert_allclose(a - t0, b - t0, rtol=1e-4, atol=1e-6 * np.abs(b - t0).max())
    (hard, hard_loss), (ident, ident_loss) = run(None), run(np.eye(n, dtype=np.float32))
    assert ident_loss == pytest.approx(hard_loss, rel=1e-6) and soft_loss != hard_loss
    for a, b in zip(ident, hard, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_stages_read_a_karpathy_set_from_disk(tmp_path):
    # The three stages on a Karpathy-format set on disk through data.* (the embedded world
    # written out as PNGs + Karpathy JSON), with one unusable row: skipped and counted.
    import json

    from tldr_jax.data import world as world_lib

    config = tiny_config(tmp_path / "cache")
    w = world_lib.make_world(config.data.world)
    paths = world_lib.write_world(w, tmp_path / "set")
    rows = json.loads(Path(paths["train_karpathy"]).read_text())
    rows.append({**rows[0], "image": "images/not_there.png", "image_id": "gone"})
    train_json = tmp_path / "set" / "karpathy_train_with_a_bad_row.json"
    train_json.write_text(json.dumps(rows))
    test_rows = json.loads(Path(paths["test"]).read_text())
    test_rows.append({**test_rows[0], "image": "images/not_there_either.png"})
    test_json = tmp_path / "set" / "karpathy_test_with_a_bad_row.json"
    test_json.write_text(json.dumps(test_rows))
    config.data.update(train=str(train_json), test=str(test_json), image_root=str(tmp_path / "set"))
    config.buffer.update(num_experts=1, epochs=2)
    config.distill.update(iterations=2, max_start_epoch=1, expert_epochs=1)
    workdir = str(tmp_path / "w")

    def nonzero(counts):
        return {k: v for k, v in counts.items() if v}

    buffer = run_stage("buffer", config, workdir)
    assert buffer["train_source"] == str(train_json)
    assert nonzero(buffer["skipped"]) == {"missing_image": 1} and buffer["rows_read"] == len(rows)
    assert buffer["input_records"] == len(rows) - 1  # rows_read = records + skipped: train's
    assert nonzero(buffer["skipped_test"]) == {"missing_image": 1}
    assert buffer["test_rows_read"] == len(test_rows)
    assert buffer["train_pairs"] == len(w.train) and buffer["test_images"] == len(w.test)
    distill = run_stage("distill", config, workdir)
    assert distill["iterations"] == 2 and nonzero(distill["data"]["skipped"]) == {
        "missing_image": 1
    }
    result = run_stage("eval-distilled", config, workdir)
    assert nonzero(result["skipped_train"]) == {"missing_image": 1}
    assert nonzero(result["skipped"]) == {"missing_image": 1}
    assert nonzero(result["skipped_test"]) == {"missing_image": 1}
    # the test set scored: the same images and captions in every stage's summary
    for key in ("test_images", "test_captions"):
        assert result[key] == buffer[key] == distill["data"][key], key
    for method in ("distilled", "random", "herding", "kcenter", "forgetting"):
        assert 0.0 <= result[method]["tr_r1"]["mean"] <= 100.0

    # The same pairs under another file path are the same data (as for compress and
    # pretrain); images read from another folder are not.
    moved = tmp_path / "moved.json"
    shutil.copy(train_json, moved)
    config.data.train = str(moved)
    assert run_stage("distill", config, workdir)["iterations"] == 2
    shutil.copytree(tmp_path / "set", tmp_path / "set2")  # these may differ: not hashed
    config.data.image_root = str(tmp_path / "set2")
    with pytest.raises(ValueError, match=r"buffer was made with other settings.*image_root: "):
        run_stage("distill", config, workdir)


def test_a_distill_without_experts_records_nothing(buffered, tmp_path):
    """A distill stopped at "no finished expert" left its signature: the rerun with other
    settings after `buffer` was refused."""
    config, _, _ = buffered
    workdir = tmp_path / "w"
    with pytest.raises(FileNotFoundError, match="no finished expert"):
        run_stage("distill", config, str(workdir))
    assert not (workdir / "distill" / "signature.json").exists()


def test_stages_read_karpathys_split_file_one_pair_per_caption(tmp_path):
    # Karpathy's original `dataset_*.json` (an 'images' list, several captions per image, the
    # split per image): buffer and distill read its train split by role, and every caption
    # of a train image is a pair of its own (the reference's one-row-per-caption files).
    import json

    from tldr_jax.data import world as world_lib

    config = tiny_config(tmp_path / "cache")
    w = world_lib.make_world(config.data.world)
    world_lib.write_world(w, tmp_path / "set")
    images = []
    for i in range(0, len(w.train) - 1, 2):  # image i with its caption and its neighbour's
        caps = [w.train[i].captions[0], w.train[i + 1].captions[0]]
        entry = {"filename": w.train[i].image_key, "split": "train" if i % 4 else "restval"}
        images.append({**entry, "sentences": [{"raw": c} for c in caps], "imgid": i})
    for r in w.test:
        images.append(
            {
                "filename": r.image_key,
                "split": "test",
                "sentences": [{"raw": c} for c in r.captions],
            }
        )
    split_file = tmp_path / "set" / "dataset_world.json"
    split_file.write_text(json.dumps({"images": images, "dataset": "world"}))
    config.data.update(train=str(split_file), test=str(split_file), image_root="")
    config.buffer.update(num_experts=1, epochs=2)
    config.distill.update(iterations=1, max_start_epoch=1, expert_epochs=1)

    data = et.load_pairs(config, tmp_path / "w")
    n_images = len(w.train) // 2
    assert len(data.train) == n_images and data.num_pairs == 2 * n_images
    np.testing.assert_array_equal(data.pair_record, np.repeat(np.arange(n_images), 2))
    np.testing.assert_array_equal(data.train_images[2 * 3 + 1], normalize(w.train[6].image))
    assert data.train_captions[:2] == [w.train[0].captions[0], w.train[1].captions[0]]
    assert len(data.test) == len(w.test) and len(data.txt2img) == sum(
        len(r.captions) for r in w.test
    )

    workdir = str(tmp_path / "w")
    buffer = run_stage("buffer", config, workdir)
    assert buffer["train_pairs"] == 2 * n_images and buffer["train_records"] == n_images
    assert buffer["rows_read"] == n_images and buffer["test_rows_read"] == len(w.test)
    distill = run_stage("distill", config, workdir)
    assert distill["iterations"] == 1
    assert (Path(workdir) / "distill" / "distilled.npz").exists()


def test_tesla_vs_exact_benchmark_on_a_buffer(buffered):
    """benchmarks/tesla_vs_exact.py on a stage workdir: one student step has no cross-step
    terms (TESLA is exact there), several steps report a finite, same-direction difference."""
    import importlib.util

    config, root, _ = buffered
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "tesla_vs_exact.py"
    spec = importlib.util.spec_from_file_location("tesla_vs_exact", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure(config, str(root / "w"), [1, 3], draws=2)
    assert list(result) == ["init (real)"]  # no distilled set in this workdir yet
    one, three = result["init (real)"]["1"], result["init (real)"]["3"]
    for field in bench.FIELDS:
        assert one[field]["rel_err"]["max"] < 1e-4, field
        assert one[field]["cosine"]["min"] > 0.9999, field
        assert np.isfinite(three[field]["rel_err"]["max"]), field
    assert three["images"]["cosine"]["min"] > 0.5 and three["images"]["rel_err"]["mean"] > 0
    assert "| init (real) | 3 | images |" in bench.table(result)


def test_student_batch_split_over_devices_learns_the_same_set(buffered):
    """distill.shard_student_batch (default): each student step's batch is split over the
    devices (8 fake ones here, batch 8: one pair each); the same set as every device running
    the whole step, up to summation order. A batch no device count divides beyond 1 (7 on
    8) is not split."""
    config, root, _ = buffered
    sets, summaries = {}, {}
    for name, split in (("split", True), ("whole", False)):
        workdir, c = _copy_of_buffer(root, config, f"batch_{name}")
        c.distill.shard_student_batch = split
        summaries[name] = run_stage("distill", c, str(workdir))
        with np.load(workdir / "distill" / "distilled.npz") as f:
            sets[name] = (f["images"], f["texts"])
    assert summaries["split"]["student_batch_devices"] == jax.device_count() == 8
    assert summaries["whole"]["student_batch_devices"] == 1
    for a, b in zip(sets["split"], sets["whole"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    from tldr_jax.utils.mesh import make_mesh, split_batch_sharding

    assert split_batch_sharding(make_mesh(), 7) is None
    assert split_batch_sharding(make_mesh(), 100).mesh.shape == {"batch": 4, "replica": 2}


def test_the_at_chance_check_reads_the_last_epochs_batches():
    from tldr_jax.distill.eval_distilled import last_epoch_losses

    # 8 pairs at batch 3: each epoch a block of 2 full batches and one of the rest (2)
    losses = [(2.0, 2, 3), (1.5, 1, 2), (1.1, 2, 3), (0.7, 1, 2)]
    assert last_epoch_losses(losses, 3) == [(0.7, 2), (1.1, 3)]
    # 7 pairs at batch 3: the rest is one pair (its loss is always 0), left out
    assert last_epoch_losses([(2.0, 2, 3), (0.0, 1, 1)], 3) == [(2.0, 3)]
    assert last_epoch_losses([(1.0, 4, 8)], 1) == [(1.0, 8)]  # a max_steps cut inside
    assert last_epoch_losses([], 3) == []


def test_eval_table_marks_a_set_that_is_its_initialisation_or_cannot_train():
    from tldr_jax.distill.eval_distilled import markdown_table

    stats = {k: {"mean": 1.0, "std": 0.0} for k in et.RECALL_KEYS}
    table = markdown_table(
        {
            8: {
                "distilled": {**stats, "iterations": 0, "lr_img": 0.0, "lr_txt": 0.1},
                "kcenter": {**stats, "diverged_models": 0},
            }
        },
        None,
    )
    assert "| 8 | distilled (its initialisation: 0 iterations) (learned step sizes 0 / 0.1) |" in (
        table
    )
    assert "| 8 | k-center | 1.0 ± 0.0 |" in table
    # Iterations the NaN guard skipped are said; the experts' row prints its own std.
    distilled = {**stats, "iterations": 5, "skipped_iterations": 2, "lr_img": 0.1, "lr_txt": 0.1}
    experts = {k: {"mean": 30.0, "std": 2.5} for k in et.RECALL_KEYS}
    table = markdown_table({8: {"distilled": distilled}}, experts)
    assert "| 8 | distilled (2 of 5 iterations skipped) | 1.0 ± 0.0 |" in table
    assert table.endswith(
        "| all | experts (full data) | " + " | ".join(["30.0 ± 2.5"] * 6) + " |\n"
    )


def test_eval_trains_whole_epochs_at_the_learned_image_step_size(buffered, monkeypatch, caplog):
    """What eval-distilled's models are trained with, not what it records: the distilled set
    at (learned image lr, learned image lr) (SPEC B.4), whole epochs of batches of
    eval.batch_size plus the smaller rest (8 pairs at 3: 3 + 3 + 2), the optimiser state
    carried from each call to the next."""
    from tldr_jax.distill import eval_distilled

    config, root, _ = buffered
    workdir, c = _copy_of_buffer(root, config, "eval_spy")
    c.eval.update(batch_size=3, epochs=2, budgets=(), max_steps=0, num_models=2)
    run_stage("distill", c, str(workdir))
    events = _record_eval_training(monkeypatch)  # trainer calls, and (below) embeddings
    real_embed_fn = et.embed_fn

    def embed_fn_spy(student):
        embed = real_embed_fn(student)

        def spied(theta, images, texts):
            events.append({"kind": "embed", "theta": [np.asarray(p).copy() for p in theta]})
            return embed(theta, images, texts)

        return spied

    monkeypatch.setattr(et, "embed_fn", embed_fn_spy)
    # (and a model whose last epoch stayed at chance is warned about)
    monkeypatch.setattr(eval_distilled, "loss_at_chance", lambda loss, batch: True)
    result = run_stage("eval-distilled", c, str(workdir))
    assert "model 0's last-epoch training loss is at chance" in caplog.text
    lr = result["distilled"]["lr_img"]
    calls = [e for e in events if e["kind"] == "train"]
    distilled = [k for k in calls if k["lr_img"] == lr]  # coresets train at eval.coreset_lr
    assert distilled and all(k["lr_txt"] == lr for k in distilled)
    # per model: 2 epochs of (2 x 3) + (1 x 2)
    assert [k["shape"] for k in distilled] == [(2, 3), (1, 2)] * 2 * int(c.eval.num_models)
    # the second call of a model continues from the first's optimiser state (momentum)
    first_momentum = jax.tree.leaves(distilled[1]["opt_state"])
    assert any(float(np.abs(np.asarray(m)).max()) > 0 for m in first_momentum)
    # SGD with momentum 0.9 and weight decay 5e-4 (SPEC B.4): two updates with the same
    # gradient g at parameters p are -lr (g + wd p) and then -lr (1 + 0.9) (g + wd p).
    tx = distilled[0]["tx_img"]
    p, g = jnp.linspace(1.0, 2.0, 5), jnp.linspace(-1.0, 1.0, 5)
    u1, state = tx.update(g, tx.init(p), p)
    u2, _ = tx.update(g, state, p)
    step = g + c.eval.weight_decay * p
    np.testing.assert_allclose(u1, -lr * step, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(u2, -lr * (1 + c.eval.momentum) * step, rtol=1e-5, atol=1e-9)
    # Each model is scored with the parameters (both towers) its training ended on.
    scored = [
        i
        for i, e in enumerate(events)
        if e["kind"] == "embed" and i and events[i - 1]["kind"] == "train"
    ]
    assert len(scored) == 2 * 5  # 2 models x (distilled + 4 coresets)
    for i in scored:
        for got, trained in zip(events[i]["theta"], events[i - 1]["theta_out"], strict=True):
            np.testing.assert_array_equal(got, trained)
    start = distilled[0]["theta_in"][0]
    assert not np.allclose(events[scored[0]]["theta"][0], start)  # not its start
    # Two fresh models, from different initialisations; the summary's mean and std are over
    # the models it lists.
    assert not np.allclose(start, distilled[4]["theta_in"][0])
    for method in ("distilled", "random", "herding", "kcenter", "forgetting"):
        models = result[method]["models"]
        assert len(models) == 2 and not any(m["diverged"] for m in models), method
        for key in et.RECALL_KEYS:
            values = [m[key] for m in models]
            assert result[method][key]["mean"] == pytest.approx(np.mean(values)), method
            assert result[method][key]["std"] == pytest.approx(np.std(values)), method


def test_distill_builds_the_outer_optimiser_from_its_settings(buffered, monkeypatch):
    """distill.lr_images / lr_texts / lr_step_size / momentum / step_size_param /
    max_grad_norm each reach the outer optimiser (SPEC B.3: one learning rate per field)."""
    import inspect

    from tldr_jax.distill import matching

    config, root, _ = buffered
    workdir, c = _copy_of_buffer(root, config, "outer_opt")
    c.distill.update(
        lr_images=300.0,
        lr_texts=70.0,
        lr_step_size=0.03,
        momentum=0.25,
        step_size_param="raw",
        max_grad_norm=5.0,
    )
    real = matching.make_outer_optimizer
    built = []

    class Built(Exception):
        pass

    def spy(*args, **kwargs):
        bound = inspect.signature(real).bind(*args, **kwargs)
        bound.apply_defaults()
        built.append(dict(bound.arguments))
        raise Built  # what the settings reach is all this test needs: stop the stage

    monkeypatch.setattr(matching, "make_outer_optimizer", spy)
    with pytest.raises(Built):
        run_stage("distill", c, str(workdir))
    want = {
        "lr_images": 300.0,
        "lr_texts": 70.0,
        "lr_step_size": 0.03,
        "momentum": 0.25,
        "step_size_param": "raw",
        "max_grad_norm": 5.0,
        "lr_lors": None,
    }
    assert len(built) == 1 and {k: built[0][k] for k in want} == want


def test_distill_student_steps_take_batch_syn_pairs(buffered, monkeypatch):
    """Each student step trains on distill.batch_syn of the M synthetic pairs, not all M."""
    from tldr_jax.distill import matching

    config, root, _ = buffered
    workdir, c = _copy_of_buffer(root, config, "batch_syn")
    c.distill.update(batch_syn=4, iterations=1)
    real = matching.sample_minibatches
    drawn = []

    def spy(key, num_syn, syn_steps, batch_syn):
        idx = real(key, num_syn, syn_steps, batch_syn)
        drawn.append((num_syn, idx.shape))
        return idx

    monkeypatch.setattr(matching, "sample_minibatches", spy)
    run_stage("distill", c, str(workdir))
    assert drawn and set(drawn) == {(8, (2, 4))}  # M = 8 pairs: syn_steps 2 of batch 4


def test_kmeans_init_takes_the_real_pair_nearest_each_prototype_once():
    """Four tight, well-separated clusters of 10 pairs: k-means with M=4 finds them, and each
    prototype gets a distinct real pair from its own cluster (its nearest)."""
    from tldr_jax.distill.distill_stage import nearest_distinct

    rng = np.random.default_rng(0)
    centres = np.eye(4, 6, dtype=np.float32) * 5
    feats = np.repeat(centres, 10, axis=0) + 0.05 * rng.normal(size=(40, 6)).astype(np.float32)
    images = rng.normal(size=(40, 4, 4, 3)).astype(np.float32)
    imgs, txts, idx = initial_pairs("kmeans", 4, 0, images, feats, feats)
    assert sorted(i // 10 for i in idx) == [0, 1, 2, 3]  # one pair per cluster
    np.testing.assert_array_equal(imgs, images[idx])
    np.testing.assert_array_equal(txts, feats[idx])
    # Each pick is its prototype's nearest real row (cosine), the cluster's mean here.
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    for i in idx:
        members = unit[(i // 10) * 10 : (i // 10 + 1) * 10]
        proto = members.mean(0) / np.linalg.norm(members.mean(0))
        assert int(np.argmax(unit @ proto)) == i
    # Two prototypes nearest the same row: the second takes its next nearest, never a repeat.
    rows = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], np.float32)
    protos = np.array([[1.0, 0.0], [1.0, 0.01]], np.float32)
    assert nearest_distinct(rows, protos).tolist() == [0, 1]


def test_expert_epochs_are_reshuffled_per_epoch_and_expert():
    base = et.epoch_batches(64, 8, 0, 0, 0)
    assert base.shape == (8, 8) and sorted(base.ravel().tolist()) == list(range(64))
    assert et.epoch_batches(70, 8, 0, 0, 0).shape == (8, 8)  # the remainder dropped
    np.testing.assert_array_equal(base, et.epoch_batches(64, 8, 0, 0, 0))  # seeded
    for other in ((0, 0, 1), (0, 1, 0), (1, 0, 0)):  # another epoch, expert, seed
        assert not np.array_equal(base, et.epoch_batches(64, 8, *other)), other


def test_each_iteration_matches_a_drawn_expert_segment():
    """The draw covers every expert and start epoch s < max_start; the stage then matches
    epoch s to epoch s + expert_epochs of that expert (checked on the loop's arrays)."""
    from tldr_jax.distill.distill_stage import draw_segment, expert_segment

    draws = [draw_segment(0, it, 3, 4) for it in range(200)]
    assert {e for e, _ in draws} == {0, 1, 2} and {s for _, s in draws} == {0, 1, 2, 3}
    assert draws == [draw_segment(0, it, 3, 4) for it in range(200)]  # (seed, it) only
    assert draws != [draw_segment(1, it, 3, 4) for it in range(200)]
    # Parameters that say where they come from: expert e's epoch k holds e * 100 + k.
    img = np.arange(3)[:, None, None] * 100 + np.arange(7)[None, :, None] + np.zeros((1, 1, 2))
    txt = img + 0.5
    for it, (e, s) in enumerate(draws[:20]):
        start, target = expert_segment((img, txt), 0, it, 4, expert_epochs=3)
        assert [float(p[0]) for p in start] == [e * 100 + s, e * 100 + s + 0.5]
        assert [float(p[0]) for p in target] == [e * 100 + s + 3, e * 100 + s + 3.5]


def test_noise_init_matches_the_real_texts_per_dimension_and_unit_pixels():
    rng = np.random.default_rng(0)
    texts = (5.0 + 0.1 * rng.normal(size=(500, 3)) * np.array([1, 2, 4])).astype(np.float32)
    images = np.zeros((500, 4, 4, 3), np.float32)
    imgs, txts, idx = initial_pairs("noise", 4000, 0, images, texts)
    assert (idx == -1).all() and imgs.shape == (4000, 4, 4, 3)
    np.testing.assert_allclose(txts.mean(0), texts.mean(0), atol=0.02)
    np.testing.assert_allclose(txts.std(0), texts.std(0), rtol=0.1)
    assert abs(imgs.mean()) < 0.02 and abs(imgs.std() - 1.0) < 0.02  # normalised pixel space


def test_nearest_captions_finds_each_texts_own_caption():
    from tldr_jax.distill.distill_stage import nearest_captions

    real = np.random.default_rng(1).normal(size=(12, 8)).astype(np.float32)
    # cosine: a scaled copy is its own row's nearest; a slightly moved one too
    assert nearest_captions(real[[3, 0, 7]] * 2.0, real).tolist() == [3, 0, 7]
    moved = real[[11, 5]] + 0.01
    assert nearest_captions(moved, real).tolist() == [11, 5]


def test_spec_defaults_with_the_reference_quirks_behind_flags():
    """SPEC B: the student's inner logit scale 1/0.07 and no dropout by default (the
    reference's 2.66 and dropout only when asked); SPEC B.4's evaluation protocol."""
    from tldr_jax.distill import matching
    from tldr_jax.distill.distill_stage import inner_loop

    for arg in ("", "small"):
        c = distill_config.get_config(arg)
        loop = inner_loop(c)
        assert loop.logit_scale == pytest.approx(14.2857, rel=1e-4) and not loop.train_dropout
        e = c.eval
        assert (e.batch_size, e.momentum, e.weight_decay, e.text_head_lr) == (
            64,
            0.9,
            5e-4,
            "image",
        )
    assert distill_config.get_config("").eval.epochs == 50
    c.distill.update(quirk_logit_scale=True, quirk_dropout=True)
    loop = inner_loop(c)
    assert loop.logit_scale == matching.QUIRK_LOGIT_SCALE == pytest.approx(2.659, abs=1e-3)
    assert loop.train_dropout


def test_start_epochs_are_capped_so_the_target_epoch_exists(caplog):
    from tldr_jax.config_check import ConfigError
    from tldr_jax.distill.distill_stage import start_epochs

    c = distill_config.get_config("tiny")
    c.buffer.epochs, c.distill.expert_epochs = 4, 2
    c.distill.max_start_epoch = 9
    assert start_epochs(c) == 3  # s in {0, 1, 2}: s + 2 <= 4
    assert "max_start_epoch=9 capped at 3" in caplog.text
    c.distill.max_start_epoch = 2
    assert start_epochs(c) == 2
    c.distill.expert_epochs = 5
    with pytest.raises(ConfigError, match="distill.expert_epochs=5 > buffer.epochs=4"):
        start_epochs(c)


def test_eval_models_compile_no_key_slice_per_epoch(monkeypatch):
    """eval-distilled's training loop hands each block of steps its dropout keys without a new
    compile per epoch: slicing keys[:k] / keys[k:] off a shrinking array compiled two slices
    per block (the length left changes every block). The keys each block gets are still the
    consecutive slices of one split of `steps` keys, in order."""
    import types

    import optax
    from jax_logs import compile_log

    from tldr_jax.distill import eval_distilled

    fed: list[jax.Array] = []

    def fake_trainer(self, batch, lr_img, lr_txt):
        def run(theta, opt_state, x, t, idx, keys, targets=None):
            fed.append(keys)
            return theta, opt_state, jnp.float32(1.0), None

        return run, optax.identity(), optax.identity()

    monkeypatch.setattr(eval_distilled.Evaluator, "_trainer", fake_trainer)
    monkeypatch.setattr(et, "init_params", lambda config, d, seed: (np.ones(3), np.ones(2)))
    monkeypatch.setattr(eval_distilled, "retrieval_metrics", lambda *a: {})
    monkeypatch.setattr(eval_distilled, "last_epoch_losses", lambda *a: [])

    def compiles(epochs: int) -> int:
        c = distill_config.get_config("tiny")
        c.eval.update(num_models=1, epochs=epochs, batch_size=3, max_steps=0)
        ev = object.__new__(eval_distilled.Evaluator)
        ev.config = c
        ev.data = types.SimpleNamespace(test_images=None, test_txt=None, txt2img=None)
        ev.embed = lambda theta, i, t: (np.zeros((2, 2), np.float32),) * 2
        ev._trainers = {}
        fed.clear()
        with compile_log() as records:
            ev.train_and_eval(np.zeros((8, 2), np.float32), np.zeros((8, 2)), 0.1, 0.1, tag=0)
        # 8 pairs at batch 3: blocks of 2 and 1 steps per epoch; their keys are one split of
        # all the steps' keys, cut in order
        steps = 3 * epochs
        key = jax.random.fold_in(jax.random.key(1_000_003 + int(c.seed) * 1000), 0)
        want = jax.random.split(jax.random.split(key)[1], steps)
        got = jnp.concatenate(fed)
        np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
        assert [len(k) for k in fed] == [2, 1] * epochs
        return sum(m.startswith("Compiling") for m in records)

    compiles(2)  # warm-up: what compiles once whatever the number of steps
    assert compiles(2) == 0
    # a new number of steps compiles its split and one slice per block size, however many
    # epochs (before: two slices per block, 2 x 2 x epochs)
    assert compiles(4) == compiles(12) <= 4
