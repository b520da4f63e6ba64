"""Dual-encoder training: sharded == single device, resume == uninterrupted, CLI on disk."""

import json
import warnings

import jax
import numpy as np
import pytest
from cli_run import run_cli
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import pretrain as pretrain_config
from tldr_jax.data.world import make_world, write_world
from tldr_jax.eval.retrieval import RECALL_KEYS
from tldr_jax.train import pretrain
from tldr_jax.train import state as train_state
from tldr_jax.utils import preemption


def tiny_config():
    config = pretrain_config.get_config("small")
    config.data.image_size = 16
    config.data.world.update(image_size=16, num_pairs=256, num_test=48, num_clean=16)
    config.model.image_kwargs.update(depth=2, width=8)
    config.model.embed_dim = 32
    config.train.update(batch_size=32, epochs=1, warmup_steps=2, log_every=2, ckpt_every=3)
    return config


def _mesh(n: int) -> jax.sharding.Mesh:
    return jax.make_mesh(
        (n, 1), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:n]
    )


def _random_batches(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    """`n` batches of 16 random 16 px images and 24-dim text embeddings."""
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
            "text_emb": rng.normal(size=(16, 24)).astype(np.float32),
        }
        for _ in range(n)
    ]


def _run_steps(config, mesh, batches, fsdp: bool = False):
    model = pretrain.build_model(config, batches[0]["text_emb"].shape[1], 0)
    model_def, params, rest = train_state.split_model(model)
    tx = train_state.make_optimizer(config.train, 10)
    state = train_state.init_state(params, rest, tx)
    shardings = train_state.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    step = jax.jit(
        train_state.make_train_step(model_def, tx, pretrain.contrastive_loss, 0),
        in_shardings=(shardings, NamedSharding(mesh, P(("data", "fsdp")))),
        out_shardings=(shardings, NamedSharding(mesh, P())),
    )
    losses = []
    for b in batches:
        state, metrics = step(state, b)
        losses.append(float(metrics["loss"]))
    return jax.device_get(state["params"]), losses


def test_train_step_reaches_no_library_warning():
    """A train step traces without any warning, library-internal ones included: optax warns
    about a deprecated call (e.g. `optax.global_norm`) from its own module, which the
    `tldr_jax` module filters in pyproject.toml do not see."""
    config = tiny_config()
    batch = _random_batches(0, 1)[0]
    model = pretrain.build_model(config, batch["text_emb"].shape[1], 0)
    model_def, params, rest = train_state.split_model(model)
    tx = train_state.make_optimizer(config.train, 10)
    state = train_state.init_state(params, rest, tx)
    step = train_state.make_train_step(model_def, tx, pretrain.contrastive_loss, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, metrics = jax.jit(step)(state, batch)
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0


def test_sharded_equals_single_device():
    assert jax.device_count() == 8
    config = tiny_config()
    # SGD: Adam divides by sqrt(v), which turns float-noise gradients (e.g. of a conv bias
    # that instance norm cancels) into full-size updates whose sign is noise.
    config.train.update(optimizer="sgd", momentum=0.9, lr=0.05, weight_decay=0.0)
    batches = _random_batches(0, 3)
    p1, l1 = _run_steps(config, _mesh(1), batches)
    p8, l8 = _run_steps(config, _mesh(8), batches)
    np.testing.assert_allclose(l1, l8, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    # FSDP over 4 devices x data 2 gives the same numbers too.
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    p_fsdp, l_fsdp = _run_steps(config, mesh, batches)
    np.testing.assert_allclose(l1, l_fsdp, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p_fsdp), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_temperature_is_trained_only_when_learn_temperature_is_set():
    batches = _random_batches(1, 2)
    start = np.log(1 / 0.07)
    for learn in (True, False):
        config = tiny_config()
        config.model.update(learn_temperature=learn, temperature=0.07)
        config.train.update(optimizer="sgd", momentum=0.0, lr=0.5, weight_decay=0.0)
        params, _ = _run_steps(config, _mesh(1), batches)
        if learn:  # a parameter, moved by the loss
            assert abs(float(params["log_scale"][...]) - start) > 1e-4
        else:  # not a parameter: nothing trains it (the model keeps 1 / temperature)
            assert "log_scale" not in params
            model = pretrain.build_model(config, 24, 0)
            assert float(model.logit_scale()) == pytest.approx(1 / 0.07, rel=1e-6)


@pytest.fixture(scope="module")
def tiny_sets():
    from tldr_jax.data.dataset import load_set

    config = tiny_config()
    return config, load_set("", config.data, "train"), load_set("", config.data, "test")


@pytest.fixture(scope="module")
def text_encoder():
    return pretrain.make_text_encoder(tiny_config())


def test_training_learns_the_world(tmp_path, tiny_sets, text_encoder):
    """48 steps on the tiny world: the loss falls well below chance (log batch) and test
    recall@10 beats chance (10 of 48 images) both ways, so a training loop that silently
    stops learning (updates dropped, pairs mismatched) fails here."""
    config, train, test = tiny_sets
    config = config.copy_and_resolve_references()
    config.cache_dir = str(tmp_path / "cache")
    summary, _ = pretrain.train_and_evaluate(
        config, tmp_path / "w", train, test, text_encoder, num_steps=48
    )
    assert summary["final_loss"] < np.log(config.train.batch_size) - 0.5, summary["final_loss"]
    chance = 100 * 10 / len(test)
    assert 0.5 * (summary["tr_r10"] + summary["ir_r10"]) > 1.4 * chance, summary


def test_each_step_trains_on_the_caption_drawn_for_its_row(tmp_path, tiny_sets, text_encoder):
    """Rows with several captions (the test split's five, as COCO / Flickr30K): every step's
    text embedding is the one of the caption the iterator drew for the row, not the row's
    first caption, and the draws use every caption."""
    config, _, test = tiny_sets
    config = config.copy_and_resolve_references()
    config.cache_dir = str(tmp_path / "cache")
    config.train.batch_size = 16
    seen, fed = [], []

    class Spy:
        def __init__(self, it):
            self.it = it

        def __next__(self):
            batch = next(self.it)
            seen.append((np.asarray(batch["index"]), np.asarray(batch["caption_index"])))
            return batch

        def get_state(self):
            return self.it.get_state()

        def set_state(self, state):
            self.it.set_state(state)

    real_iterator, real_shard = pretrain.train_iterator, pretrain.shard_batch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain, "train_iterator", lambda *a, **k: Spy(real_iterator(*a, **k)))
        mp.setattr(
            pretrain,
            "shard_batch",
            lambda batch, mesh: (
                fed.append(np.asarray(batch["text_emb"])) or real_shard(batch, mesh)
            ),
        )
        pretrain.train_and_evaluate(config, tmp_path / "w", test, test, text_encoder, num_steps=6)
    caps, offsets = pretrain.flat_captions(test)
    table = pretrain.embed_captions(text_encoder, caps, tmp_path / "cache", 64)
    assert len(seen) == len(fed) == 6
    for (rows, which), emb in zip(seen, fed, strict=True):
        np.testing.assert_array_equal(emb, table[offsets[rows] + which])
    drawn = np.concatenate([w for _, w in seen])
    assert set(drawn.tolist()) == {0, 1, 2, 3, 4}


def test_resume_after_preemption_matches_uninterrupted(
    tmp_path, tiny_sets, text_encoder, monkeypatch
):
    config, train, test = tiny_sets
    config.cache_dir = str(tmp_path / "cache")
    full, _ = pretrain.train_and_evaluate(
        config, tmp_path / "a", train, test, text_encoder, num_steps=6
    )
    calls = {"n": 0}

    def preempt_at_4():
        calls["n"] += 1
        return calls["n"] == 4

    monkeypatch.setattr(preemption, "agreed", preempt_at_4)
    with pytest.raises(preemption.Preempted, match="step 4"):
        pretrain.train_and_evaluate(config, tmp_path / "b", train, test, text_encoder, num_steps=6)
    monkeypatch.setattr(preemption, "agreed", lambda: False)
    resumed, _ = pretrain.train_and_evaluate(
        config, tmp_path / "b", train, test, text_encoder, num_steps=6
    )
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], rel=1e-5)
    for k in ("tr_r1", "tr_r5", "ir_r1", "ir_r5"):
        assert resumed[k] == pytest.approx(full[k], abs=1e-6)
    # Running the finished run again trains nothing and still reports its last loss.
    again, _ = pretrain.train_and_evaluate(
        config, tmp_path / "b", train, test, text_encoder, num_steps=6
    )
    assert again["final_loss"] == pytest.approx(full["final_loss"], rel=1e-5)
    # Where each run started; a resumed run's at-chance verdict is the uninterrupted one's.
    assert (full["resumed_from"], resumed["resumed_from"], again["resumed_from"]) == (0, 4, 6)
    assert resumed["loss_at_chance"] is again["loss_at_chance"] is full["loss_at_chance"]
    # The metric CSV holds each step once even though the run was interrupted.
    rows = (tmp_path / "b" / "metrics" / "pretrain.csv").read_text().splitlines()[1:]
    steps = [int(r.split(",")[0]) for r in rows if ",loss," in r]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_cli_pretrain_and_evaluate_on_files_from_disk(tmp_path, tiny_sets):
    config, _, _ = tiny_sets
    world_dir = tmp_path / "world"
    write_world(make_world(config.data.world), world_dir)
    work = tmp_path / "run"
    overrides = [
        "--config.data.image_size=16",
        "--config.model.image_kwargs.depth=2",
        "--config.model.image_kwargs.width=8",
        "--config.model.embed_dim=32",
        "--config.train.batch_size=32",
        "--config.train.epochs=1",
        f"--config.data.train={world_dir / 'train.json'}",
        f"--config.data.test={world_dir / 'test.json'}",
        f"--config.data.image_root={world_dir}",
    ]
    # Trained with another optimizer than the config's default: `evaluate` restores only the
    # model (it failed on the optimizer state's tree before).
    # (8 steps, checkpoints at 2, 4, 6, 8 of which the last 3 are kept: evaluate takes 8)
    sgd = [
        "--config.train.optimizer=sgd",
        "--config.train.grad_clip=0",
        "--config.train.ckpt_every=2",
        "--config.train.keep=3",
    ]

    def stage(name: str, *extra: str):
        return run_cli(
            name, "--config", "configs/pretrain.py:small", "--workdir", str(work), *extra
        )

    r = stage("pretrain", *overrides, *sgd)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((work / "pretrain.json").read_text())
    for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "skipped", "rows_read"):
        assert k in summary
    assert summary["rows_read"] == 256 and summary["test_images"] == 48
    assert (work / "metrics" / "pretrain.png").exists()
    r = stage("evaluate", *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((work / "evaluate.json").read_text())
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == [4, 6, 8]
    assert ev["checkpoint_step"] == summary["steps"] == 8  # the latest of those kept
    for k in ("tr_r1", "ir_r1", "ir_r10"):
        assert ev[k] == pytest.approx(summary[k], abs=1e-6)
    assert ev["test_source"] == str(world_dir / "test.json") and ev["captions_dropped"] == 0
    assert ev["training_finished"] is True and "has not finished" not in r.stderr
    # a rerun of the finished run that stops before training (here on a test set with no
    # usable row) leaves its summary: the run is still the finished one
    bad_test = work / "bad_test.json"
    bad_test.write_text("[]")
    r = stage("pretrain", *overrides[:-2], f"--config.data.test={bad_test}", overrides[-1], *sgd)
    assert r.returncode == 2 and "no usable rows" in r.stderr, r.stderr[-2000:]
    assert (work / "pretrain.json").exists()
    # a checkpoint of a run stopped on the way (no pretrain.json yet) is evaluated, and said so
    (work / "pretrain.json").unlink()
    r = stage("evaluate", *overrides)
    assert r.returncode == 0 and "of a training run that has not finished" in r.stderr
    assert json.loads((work / "evaluate.json").read_text())["training_finished"] is False


def test_cli_rejects_unknown_stage():
    r = run_cli("no-such-stage", "--config", "configs/pretrain.py", "--workdir", "/tmp/x")
    assert r.returncode == 2 and "unknown stage" in r.stderr
    r = run_cli("pretrian", "--config", "configs/pretrain.py", "--workdir", "/tmp/x")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "tldr-jax: unknown stage 'pretrian': did you mean 'pretrain'? `tldr-jax --help` lists "
        "the stages"
    ]


def test_config_arguments_are_checked():
    tiny = pretrain_config.get_config("tiny")
    assert tiny.data.image_size == 16 and tiny.train.epochs == 2
    with pytest.raises(ValueError, match="unknown config argument 'smal'.*small, tiny"):
        pretrain_config.get_config("smal")
    # name=value: a boolean's words, both ways; a word that is neither is an error
    full = pretrain_config.get_config("")
    for off in ("tiny=false", "tiny=0", "tiny=No", "tiny=off"):
        assert pretrain_config.get_config(off) == full, off
    for on in ("tiny=true", "tiny=1", "tiny=YES", "tiny=on"):
        assert pretrain_config.get_config(on) == tiny, on
    with pytest.raises(ValueError, match=r"tiny='ture' in 'tiny=ture': expected one of 1, true"):
        pretrain_config.get_config("tiny=ture")
    from tldr_jax.config_lib import parse_arg

    assert parse_arg("n=7,name=x", n=3, name="a").to_dict() == {"n": 7, "name": "x"}
    with pytest.raises(ValueError, match=r"n='seven' in 'n=seven': expected int"):
        parse_arg("n=seven", n=3)
    # A bare word is a boolean flag only: `n` alone must not read as n=True (1)
    assert parse_arg("tiny", tiny=False, n=3).to_dict() == {"tiny": True, "n": 3}
    for arg, kind in (("n", "int"), ("name", "str")):
        with pytest.raises(
            ValueError, match=rf"argument '{arg}' in '{arg}' takes a value: {arg}=<{kind}>"
        ):
            parse_arg(arg, n=3, name="a")


def test_epoch_decay_schedule_has_no_drop_after_a_long_warmup():
    """SPEC A.1's schedule: linear warm-up to lr, then x0.9 per epoch (floor min_lr). A
    warm-up longer than an epoch reaches lr and decays from the next epoch boundary on (it
    used to fall to lr x 0.9^(warm-up epochs) the step after the warm-up ended)."""
    import jax.numpy as jnp
    import ml_collections

    from tldr_jax.train.state import make_schedule

    cfg = ml_collections.ConfigDict(
        dict(lr=3e-4, warmup_steps=3000, schedule="epoch_decay", decay_per_epoch=0.9, min_lr=1e-6)
    )
    lr = make_schedule(cfg, 100_000, steps_per_epoch=1000)
    at = lambda s: float(lr(jnp.asarray(s)))  # noqa: E731
    assert np.isclose(at(0), 3e-4 / 3000) and np.isclose(at(1499), 1.5e-4)
    assert np.isclose(at(2999), 3e-4) and np.isclose(at(3000), 3e-4) and np.isclose(at(3999), 3e-4)
    assert np.isclose(at(4000), 2.7e-4) and np.isclose(at(5500), 3e-4 * 0.81)
    assert np.isclose(at(99_999), 1e-6)  # floored
    # a warm-up inside the first epoch: decay at every epoch boundary from step 0
    cfg.warmup_steps = 30
    lr = make_schedule(cfg, 1000, steps_per_epoch=46)
    assert np.isclose(at(29), 3e-4) and np.isclose(at(45), 3e-4) and np.isclose(at(46), 2.7e-4)


def test_a_diverged_run_stops_with_one_line_before_it_is_saved_or_evaluated(tmp_path):
    """A non-finite training loss (here lr 1e6) stops the run with a ConfigError naming the
    step and the lr key: no checkpoint of the diverged state, no NaN summary."""
    from tldr_jax.cli import run_stage
    from tldr_jax.config_check import ConfigError

    config = tiny_config()
    config.train.update(lr=1e6, grad_clip=0.0, warmup_steps=0, schedule="constant")
    workdir = tmp_path / "w"
    with pytest.raises(ConfigError, match=r"pretrain: training diverged at step \d+ \(loss nan\)"):
        run_stage("pretrain", config, str(workdir))
    assert not (workdir / "pretrain.json").exists()
    ckpts = workdir / "checkpoints"
    assert not ckpts.exists() or not any(p.name.isdigit() for p in ckpts.iterdir())


def test_evaluate_without_a_checkpoint_says_so_and_makes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `tldr-jax pretrain` on this workdir first"):
        pretrain.run_evaluate(tiny_config(), str(tmp_path / "w"))
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_check_finite_catches_blown_up_parameters_behind_a_finite_loss():
    """An update can make the parameters non-finite while the loss it was computed with is
    finite: the state is checked before it is saved or evaluated."""
    import jax.numpy as jnp
    import ml_collections

    from tldr_jax.config_check import ConfigError

    tc = ml_collections.ConfigDict({"lr": 0.1, "grad_clip": 1.0})
    ok = {"w": jnp.ones(3), "b": {"c": jnp.zeros(2)}}
    train_state.check_finite("run", 3, "train", tc, "do X", loss=1.0, params=ok)
    bad = {"w": jnp.ones(3), "b": {"c": jnp.array([0.0, jnp.inf])}}
    with pytest.raises(
        ConfigError,
        match=r"^run: training diverged at step 3 \(non-finite parameters\) at train.lr=0.1\. "
        r"Lower train.lr and do X$",
    ):
        train_state.check_finite("run", 3, "train", tc, "do X", loss=1.0, params=bad)
    tc.grad_clip = 0.0
    with pytest.raises(ConfigError, match=r"\(loss nan\) .* \(or set train.grad_clip\)"):
        train_state.check_finite("run", 3, "train", tc, "do X", loss=float("nan"))


def test_sgd_weight_decay_and_grad_clip_are_applied():
    """`train.optimizer=sgd` takes weight_decay (decoupled, as adamw's) and grad_clip."""
    import jax.numpy as jnp
    import ml_collections

    cfg = ml_collections.ConfigDict(
        dict(optimizer="sgd", lr=0.1, schedule="constant", warmup_steps=0, weight_decay=0.5)
    )
    params = {"w": jnp.ones(3)}
    tx = train_state.make_optimizer(cfg, 10)
    updates, _ = tx.update({"w": jnp.zeros(3)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones(3), rtol=1e-6)
    cfg.update(weight_decay=0.0, grad_clip=1.0)
    tx = train_state.make_optimizer(cfg, 10)
    updates, _ = tx.update({"w": jnp.full(3, 10.0)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * np.ones(3) / np.sqrt(3), rtol=1e-5)


def test_fsdp_shards_the_largest_axis_it_divides():
    spec = train_state.param_spec
    assert spec(np.zeros((64, 256)), 4) == P(None, "fsdp")
    assert spec(np.zeros((256, 64)), 4) == P("fsdp", None)
    assert spec(np.zeros((1030, 512)), 4) == P(None, "fsdp")  # 1030 is not a multiple of 4
    assert spec(np.zeros((3, 5, 1031)), 4) == P()  # no axis divides
    assert spec(np.zeros((16, 16)), 4) == P()  # small: replicated
    assert spec(np.zeros((64, 256)), 1) == P()


def test_cosine_without_warmup_starts_at_lr_and_a_whole_run_warmup_is_warned(caplog):
    """Cosine with warmup_steps=0 runs its first step at lr (it ran at 0) and a one-step run
    builds (it raised on a zero-length decay); a warm-up covering the whole run is said."""
    import jax.numpy as jnp
    import ml_collections

    from tldr_jax.train.state import make_optimizer, make_schedule

    cfg = ml_collections.ConfigDict(dict(lr=0.1, warmup_steps=0, schedule="cosine", min_lr=0.01))
    lr = make_schedule(cfg, 10, block="train")
    assert np.isclose(float(lr(jnp.asarray(0))), 0.1)
    assert np.isclose(float(lr(jnp.asarray(10))), 0.01)
    assert np.isclose(float(make_schedule(cfg, 1)(jnp.asarray(0))), 0.1)
    make_optimizer(cfg, 1)  # the restore target of `extract` is built so
    assert "warm-up" not in caplog.text and "warmup" not in caplog.text
    cfg.warmup_steps = 5
    assert np.isclose(float(make_schedule(cfg, 10)(jnp.asarray(5))), 0.1)
    make_schedule(cfg, 5, block="train")  # lr only at step 5: a 5-step run never gets there
    assert "train.warmup_steps=5 covers all 5 steps" in caplog.text
    make_schedule(cfg, 4, block="caption.train")
    assert (
        "caption.train.warmup_steps=5 covers all 4 steps of this run: the learning rate never "
        "reaches caption.train.lr=0.1 (its first step runs at lr 0)" in caplog.text
    )
    # epoch_decay's warm-up reaches lr at its last step (step warmup - 1): 5 of 5 is fine
    caplog.clear()
    cfg.schedule = "epoch_decay"
    assert np.isclose(float(make_schedule(cfg, 5, block="train")(jnp.asarray(4))), 0.1)
    assert "warmup_steps" not in caplog.text
    make_schedule(cfg, 4, block="train")
    assert "train.warmup_steps=5 covers all 4 steps" in caplog.text


def test_a_run_that_ends_at_chance_is_warned_about_and_recorded(tmp_path, caplog):
    """Finite but dead (an lr far too high blows the scale-invariant encoders up and freezes
    them at chance): the summary says `loss_at_chance`, with a warning naming train.lr."""
    from tldr_jax.cli import run_stage
    from tldr_jax.train import losses

    assert losses.loss_at_chance(float(np.log(32)), 32) and not losses.loss_at_chance(3.0, 32)
    config = tiny_config()
    config.train.lr = 10.0  # adamw at lr 10: blown up, frozen at log(batch)
    summary = run_stage("pretrain", config, str(tmp_path / "dead"))
    assert summary["loss_at_chance"] is True
    assert "is at chance (log 32 = 3.4657)" in caplog.text and "Lower train.lr" in caplog.text
    # An untrained model starts above chance (not "at" it): not flagged.
    assert not losses.loss_at_chance(3.7, 32, above=False) and losses.loss_at_chance(3.7, 32)


def test_logit_scale_is_clipped_at_100():
    """CLIP's clip: a temperature below 0.01 (fixed or learned) gives logit scale 100."""
    for learn in (True, False):
        config = tiny_config()
        config.model.update(learn_temperature=learn, temperature=0.001)
        model = pretrain.build_model(config, 24, 0)
        assert float(model.logit_scale()) == pytest.approx(100.0)
        assert float(model.log_scale[...]) == pytest.approx(np.log(1000.0), rel=1e-6)
    config.model.temperature = 0.02
    assert float(pretrain.build_model(config, 24, 0).logit_scale()) == pytest.approx(50.0)


def test_evaluate_scores_the_checkpoint_on_the_test_split(tmp_path):
    """`evaluate` restores pretrain's checkpoint and scores the test split (16 images with
    5 captions each), as pretrain's own evaluation did, not the training pairs."""
    config = tiny_config()
    config.data.world.update(num_pairs=64, num_test=16)
    workdir = str(tmp_path / "w")
    trained = pretrain.run(config, workdir)
    ev = pretrain.run_evaluate(config, workdir)
    assert ev["test_source"] == trained["test_source"] == "world:test"
    assert ev["test_images"] == trained["test_images"] == 16
    assert ev["test_captions"] == trained["test_captions"] == 80
    assert ev["checkpoint_step"] == trained["steps"] == 2
    for k in RECALL_KEYS:
        assert ev[k] == pytest.approx(trained[k], abs=1e-6), k


def test_embeddings_compile_once_per_model_structure_and_shape():
    """Evaluation embeds every batch, and every later evaluation of a model of the same
    structure in the process (the retrieval comparison's runs, score), with one compile per
    input shape: a jit made per call compiled on every call, and the nnx.jit's write-back
    of the model's rng state changed its sharding after the first batch (a second compile)."""
    from flax import nnx
    from jax_logs import compile_log

    from tldr_jax.data.dataset import ImageTextSet

    config = tiny_config()
    mesh = _mesh(1)
    rng = np.random.default_rng(0)
    n = 20  # 3 batches of 8, the last padded
    ds = ImageTextSet(
        ids=[str(i) for i in range(n)],
        images=rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8),
        captions=[["a"]] * n,
        image_keys=[""] * n,
        rows_read=n,
        skipped={},
        source="test",
    )
    text = rng.normal(size=(24, 24)).astype(np.float32)  # 3 whole batches of 8
    embeddings = []
    with compile_log() as records:
        for seed in (0, 1, 1):
            # as training leaves it: parameters on the mesh, the rng state not
            model = pretrain.build_model(config, 24, seed)
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            params = jax.device_put(params, NamedSharding(mesh, P()))
            model = nnx.merge(graphdef, params, rest)
            compiled = len(records)
            img = pretrain.embed_images(model, ds, batch_size=8)
            txt = pretrain.embed_texts(model, text, batch_size=8)
            new = [m for m in records[compiled:] if m.startswith("Compiling")]
            embeddings.append((img, txt, new))
    enc = [[m for m in new if "_encode_" in m or "lambda" in m] for _, _, new in embeddings]
    assert len(enc[0]) == 2 and enc[1] == enc[2] == []  # images (the last batch padded), texts
    # the same model, the same embeddings; unit rows
    np.testing.assert_array_equal(embeddings[1][0], embeddings[2][0])
    np.testing.assert_allclose(np.linalg.norm(embeddings[0][0], axis=1), 1.0, rtol=1e-5)
    assert embeddings[0][1].shape == (24, int(config.model.embed_dim))
