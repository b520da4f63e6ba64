"""Reusing a workdir with other settings or other data: `compress` (and its stages) and
`pretrain` stop with one line and exit status 2 naming what changed; the same settings skip
or resume as before; keys that may change on a rerun (log / checkpoint cadence, the mesh)
do not count; a workdir from before signatures keeps working."""

import json
import shutil
import types
from pathlib import Path

import pytest
from cli_run import run_cli

from configs import tldr as tldr_config
from tldr_jax.compress import common
from tldr_jax.config_check import ConfigError
from tldr_jax.data.world import make_world, write_world
from tldr_jax.utils import signature

STAGE_FILES = ("train-captioner", "extract", "select", "score", "caption", "write")


def _error_line(r, stage: str) -> str:
    """The run's one error line (and no traceback)."""
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith(f"tldr-jax {stage}: error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def _mtimes(w: Path) -> dict[str, int]:
    return {s: (w / f"{s}.json").stat().st_mtime_ns for s in STAGE_FILES}


def test_compress_rerun_checks_settings_and_data(tmp_path):
    world_dir = tmp_path / "world"
    write_world(make_world(tldr_config.get_config("tiny").data.world), world_dir)
    w = tmp_path / "run"
    data = [f"--config.data.image_root={world_dir}", "--config.retrieval_eval.enabled=False"]
    args = ["--config", "configs/tldr.py:tiny", "--workdir", str(w), *data]

    def compress(*extra: str, train: Path = world_dir / "train.json"):
        return run_cli("compress", *args, f"--config.data.train={train}", *extra)

    r = compress()
    assert r.returncode == 0, r.stderr[-3000:]
    for s in STAGE_FILES:
        assert (w / common.FOLDERS[s] / "signature.json").exists(), s
    assert json.loads((w / "compress.json").read_text())["retrieval"] is None  # comparison off
    before = _mtimes(w)

    # The same settings: every stage is skipped, as before; so are keys free to change on a
    # rerun (cadence, mesh, decode threads) and the same pairs under another path.
    moved = world_dir / "train_moved.json"
    shutil.copy(world_dir / "train.json", moved)
    extra = ("--config.captioner.train.log_every=7", "--config.mesh.data=1")
    for r in (compress(), compress(*extra, "--config.data.decode_workers=2", train=moved)):
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stderr.count("already finished, skipping") == 6, r.stderr[-3000:]
    assert _mtimes(w) == before

    # A changed option of one stage: refused before anything runs, naming the key and the
    # folders of that stage and the ones made from it.
    line = _error_line(compress("--config.select.target=0.25"), "compress")
    assert "select.target: 0.5 -> 0.25" in line
    for s in ("select", "score", "caption", "compress"):
        assert str(w / s) in line
    assert str(w / "extract") not in line and "new --workdir, or delete" in line
    line = _error_line(compress("--config.write.mode=replace"), "compress")
    assert "write.mode: 'append' -> 'replace'" in line and str(w / "compress") in line
    assert str(w / "caption") not in line

    # Other data under the same file name: refused (it used to return the old output, or
    # crash in a later stage on ids it did not know).
    rows = json.loads((world_dir / "train.json").read_text())
    original = (world_dir / "train.json").read_bytes()
    rows[3]["caption"] = "a caption this workdir has never seen"
    (world_dir / "train.json").write_text(json.dumps(rows))
    try:
        line = _error_line(compress(), "compress")
    finally:
        (world_dir / "train.json").write_bytes(original)
    assert "training data changed (192 pairs, sha256 " in line
    assert str(w / "train-captioner") in line
    # A stage run alone checks too.
    train_arg = f"--config.data.train={world_dir / 'train.json'}"
    line = _error_line(
        run_cli("score", *args, train_arg, "--config.score.keep_fraction=0.6"), "score"
    )
    assert "score.keep_fraction: 0.5 -> 0.6" in line and str(w / "score") in line
    assert _mtimes(w) == before

    # `write` alone redoes itself with a changed mode (as it always did) and records it ...
    r = run_cli("write", *args, train_arg, "--config.write.mode=replace")
    assert r.returncode == 0, r.stderr[-3000:]
    replaced = json.loads((w / "compress" / "manifest.json").read_text())
    assert replaced["mode"] == "replace" and any(m["generated"] for m in replaced["rows"])
    out = json.loads((w / "compress" / "train.json").read_text())
    for e, m in zip(out, replaced["rows"], strict=True):  # the generated caption alone
        assert e["caption"] == (m["generated"] or m["original"]), m
    # ... saying that compress.json was made from the file it replaced
    assert "write.mode: 'append' -> 'replace'" in r.stderr and "no longer match" in r.stderr
    assert str(w / "compress.json") in r.stderr, r.stderr[-3000:]
    r = compress("--config.write.mode=replace")
    assert r.returncode == 0 and r.stderr.count("already finished, skipping") == 6, r.stderr
    # `generated` writes generated captions only: a kept row without one is left out (it was
    # the same file as `replace`)
    gen_path = w / "caption" / "generated.json"
    generated = json.loads(gen_path.read_text())
    kept = json.loads((w / "compress" / "manifest.json").read_text())["rows"]
    blank = kept[0]["id"]
    gen_path.write_text(json.dumps({**generated, blank: ""}))
    r = run_cli("write", *args, train_arg, "--config.write.mode=generated")
    gen_path.write_text(json.dumps(generated))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((w / "write.json").read_text())
    rows = json.loads((w / "compress" / "manifest.json").read_text())["rows"]
    out = json.loads((w / "compress" / "train.json").read_text())
    assert summary["left_out_without_generated_caption"] >= 1 and blank not in {
        m["id"] for m in rows
    }
    assert (
        len(out)
        == len(rows)
        == summary["kept_rows"]
        == len(kept) - summary["left_out_without_generated_caption"]
    )
    assert all(e["caption"] == m["generated"] for e, m in zip(out, rows, strict=True))
    assert summary["kept_images"] == len({e["image"] for e in out})  # the images written
    r = compress("--config.write.mode=replace")  # compress/ now says generated
    assert "write.mode: 'generated' -> 'replace'" in r.stderr
    r = run_cli("write", *args, train_arg, "--config.write.mode=replace")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("write", *args, train_arg)
    assert r.returncode == 0, r.stderr[-3000:]

    # A workdir made before signatures: it keeps working (one warning), and gets them.
    for s in STAGE_FILES:
        (w / common.FOLDERS[s] / "signature.json").unlink()
    r = compress()
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("before signatures were recorded") == 1, r.stderr[-3000:]
    assert all((w / common.FOLDERS[s] / "signature.json").exists() for s in STAGE_FILES)
    assert _error_line(compress("--config.select.target=0.25"), "compress")
    # `select` alone redoes itself too, naming every output made from its earlier selection
    r = run_cli("select", *args, train_arg, "--config.select.target=0.25")
    assert r.returncode == 0, r.stderr[-3000:]
    warning = next(line for line in r.stderr.splitlines() if "no longer match" in line)
    assert "select.target: 0.5 -> 0.25" in warning
    for stale in ("score", "caption", "compress", "compress.json"):
        assert str(w / stale) in warning, stale
    assert common.downstream("score") == ["caption", "write", "eval"]


def test_pretrain_rerun_checks_model_and_data(tmp_path):
    w = tmp_path / "pt"
    args = ["--config", "configs/pretrain.py:tiny", "--workdir", str(w), "--config.train.epochs=1"]
    r = run_cli("pretrain", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (w / "pretrain.signature.json").exists()

    # Logging / checkpoint cadence and the mesh may change: it resumes.
    r = run_cli("pretrain", *args, "--config.train.log_every=3", "--config.mesh.data=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 8" in r.stderr

    # Another model: one line instead of Orbax's shape-mismatch tracebacks.
    line = _error_line(run_cli("pretrain", *args, "--config.model.embed_dim=64"), "pretrain")
    assert "model.embed_dim: 32 -> 64" in line and str(w / "checkpoints") in line
    line = _error_line(run_cli("evaluate", *args, "--config.model.embed_dim=64"), "evaluate")
    assert "model.embed_dim: 32 -> 64" in line

    # Other training data: refused (it used to resume and report the new source).
    line = _error_line(
        run_cli("pretrain", *args, "--config.data.world.caption_noise=0.2"), "pretrain"
    )
    assert "training data changed (256 pairs, sha256 " in line
    assert "data.world.caption_noise: 0.1 -> 0.2" in line

    # A workdir from before signatures resumes, with a warning, and gets one.
    (w / "pretrain.signature.json").unlink()
    r = run_cli("pretrain", *args)
    assert r.returncode == 0 and "before signatures were recorded" in r.stderr, r.stderr
    assert (w / "pretrain.signature.json").exists()


def test_signature_keys_and_messages():
    config = tldr_config.get_config("tiny")
    fp = {"pairs": 3, "sha256": "ab" * 32}
    sig = common.stage_signature(config, "score", fp)
    # Upstream settings and the data are part of it; cadence, mesh, paths are not.
    assert sig["select.target"] == 0.5 and sig["captioner.num_codes"] == 16
    assert sig["train_data.pairs"] == 3 and sig["data.test"] == ""
    for key in sig:
        assert not signature.matches(key, signature.RERUN_FREE), key
    assert not any(k.startswith(("mesh", "write.", "caption.")) for k in sig)
    assert "data.test" not in common.stage_signature(config, "caption", fp)  # score's own
    # An encoder's image_kwargs count as the encoder takes them.
    config.model.image = "vit"
    config.model.image_kwargs.preset = "tiny"
    assert "model.image_kwargs.norm" not in common.stage_signature(config, "score", fp)

    other = dict(sig, **{"train_data.sha256": "cd" * 32, "select.target": 0.25})
    diff = signature.differences(sig, other)
    assert signature.describe(diff) == (
        "training data changed (3 pairs, sha256 abababababab -> 3 pairs, sha256 cdcdcdcdcdcd); "
        "select.target: 0.5 -> 0.25"
    )
    # The distillation stages' fingerprint (W/buffer's, and nested in W/distill's) is said
    # the same way, pair count included when only the hash changed.
    buf = {"buffer.train_pairs": 239, "buffer.train_sha256": "ab" * 32, "distill.num_pairs": 8}
    diff = signature.differences(buf, dict(buf, **{"buffer.train_sha256": "cd" * 32}))
    assert signature.describe(diff) == (
        "training data changed (239 pairs, sha256 abababababab -> 239 pairs, sha256 cdcdcdcdcdcd)"
    )
    diff = signature.differences(
        {"train_pairs": 2, "train_sha256": "ab" * 32, "image_size": 32},
        {"train_pairs": 3, "train_sha256": "cd" * 32, "image_size": 16},
    )
    assert signature.describe(diff) == (
        "training data changed (2 pairs, sha256 abababababab -> 3 pairs, sha256 cdcdcdcdcdcd); "
        "image_size: 32 -> 16"
    )
    # A key that only ends like one is no fingerprint without its partner.
    diff = signature.differences({"x.train_pairs": 3}, {"x.train_pairs": 4})
    assert signature.describe(diff) == "x.train_pairs: 3 -> 4"
    # A key only one side knows (added by a newer version) is no change.
    assert signature.differences({**sig, "select.new_key": 1}, sig, known_only=True) == {}
    # ... unless its new value changes the output: a score stage recorded before
    # score.filter_over existed kept the top fraction of select's rows ("selected").
    old = {k: v for k, v in sig.items() if k != "score.filter_over"}
    assert sig["score.filter_over"] == "selected"
    assert signature.differences(old, sig, known_only=True) == {}
    all_rows = dict(sig, **{"score.filter_over": "all"})
    assert signature.differences(old, all_rows, known_only=True) == {
        "score.filter_over": ("selected", "all")
    }
    # A cosine schedule without warm-up starts at lr since 2026-12-05 (at 0 before): a run
    # recorded before is not resumed on the other schedule.
    config.train.update(schedule="cosine", warmup_steps=0)
    now = common.stage_signature(config, "score", fp)
    assert now["train.cosine_no_warmup_starts_at_lr"] is True
    before = {k: v for k, v in now.items() if k != "train.cosine_no_warmup_starts_at_lr"}
    assert signature.describe(signature.differences(before, now, known_only=True)) == (
        "train.cosine_no_warmup_starts_at_lr: False -> True"
    )
    config.train.warmup_steps = 3
    assert "train.cosine_no_warmup_starts_at_lr" not in common.stage_signature(config, "score", fp)
    err = signature.refusal([Path("W/select")], diff)
    assert isinstance(err, ConfigError) and "\n" not in str(err)
    assert str(err).endswith("delete W/select to redo that stage with these settings.")


def test_generic_check_is_the_distillation_one(tmp_path):
    """The distillation stages' check is utils/signature.check_signature: a refusal names
    each changed key."""
    from tldr_jax.distill import expert_trajectories as et

    assert et.check_signature is signature.check_signature
    sig = {"train_pairs": 4, "buffer": {"epochs": 8, "lr": 0.01}}
    path = tmp_path / "a" / "signature.json"
    et.check_signature(path, sig, create=True, redo="train again")
    assert json.loads(path.read_text()) == {"train_pairs": 4, "buffer.epochs": 8, "buffer.lr": 0.01}
    et.check_signature(path, sig, create=True, redo="train again")  # the same: fine
    other = {"train_pairs": 4, "buffer": {"epochs": 10, "lr": 0.01}}
    with pytest.raises(ConfigError, match="buffer.epochs: 8 -> 10") as e:
        et.check_signature(path, other, create=True, redo="train again")
    assert str(e.value).endswith(f"delete {path.parent} to train again.")


def test_a_damaged_signature_is_refused_not_taken_as_absent(tmp_path):
    """A signature that is there but cannot be read (truncated, not JSON) stops the run
    naming it: taken as absent, a rerun with other settings overwrote it with its own and
    resumed the outputs made with the old ones (a truncated W/distill/signature.json let
    `distill` resume with a changed distill.lr_images, silently). Absent is still None."""
    path = tmp_path / "distill" / "signature.json"
    assert signature.read(path) is None
    sig = {"distill": {"lr_images": 1000.0}}
    signature.check_signature(path, sig, create=True, redo="distill again")
    good = path.read_text()
    for damaged in (good[: len(good) // 2], "", "[1, 2]"):
        path.write_text(damaged)
        with pytest.raises(ConfigError, match="signature.json is not") as err:
            signature.read(path)
        assert str(err.value).startswith(str(path)) and f"delete {path.parent}" in str(err.value)
        other = {"distill": {"lr_images": 77.0}}
        with pytest.raises(ConfigError, match="signature.json is not"):
            signature.check_signature(path, other, create=True, redo="distill again")
        assert path.read_text() == damaged  # not overwritten with the rerun's settings


def test_image_root_binds_and_retired_keys_do_not(tmp_path, monkeypatch):
    """The images are not hashed, so where they are read from binds a workdir (compress and
    pretrain left `data.image_root` out: a rerun on other images resumed). A key an older
    version recorded and no longer binds (the buffer's training-file path) is no change."""
    from configs import pretrain as pretrain_config
    from tldr_jax.train import pretrain

    monkeypatch.chdir(tmp_path)
    config = tldr_config.get_config("tiny")
    config.data.image_root = "imgs"
    fp = {"pairs": 3, "sha256": "ab" * 32}
    for stage in STAGE_FILES:
        sig = common.stage_signature(config, stage, fp)
        assert sig["data.image_root"] == str(tmp_path / "imgs"), stage
    other = config.copy_and_resolve_references()
    other.data.image_root = "other"
    diff = signature.differences(
        common.stage_signature(config, "score", fp), common.stage_signature(other, "score", fp)
    )
    assert list(diff) == ["data.image_root"]
    pconfig = pretrain_config.get_config("tiny")
    pconfig.data.image_root = "imgs"
    train = types.SimpleNamespace(ids=["a"], captions=[["a cat"]])  # what the signature reads
    assert pretrain.pretrain_signature(pconfig, train)["data.image_root"] == str(tmp_path / "imgs")

    path = tmp_path / "buffer" / "signature.json"
    want = {"train_pairs": 4, "image_root": ""}
    signature.write(path, {**want, "train": "/old/path/train.json"})
    with pytest.raises(ConfigError, match="train: '/old/path/train.json' -> unset"):
        signature.check_signature(path, want, create=True, redo="x")
    signature.check_signature(path, want, create=True, redo="x", retired=("train",))


def test_a_stage_that_stopped_at_its_start_does_not_bind_the_workdir(tmp_path):
    """A stage that stopped at its start (a batch larger than the set, an image size its
    encoder cannot take) leaves its signature and files it makes again, and nothing else: a
    rerun with the fix runs instead of being refused. Output made binds as before."""
    config = tldr_config.get_config("tiny")
    w = tmp_path / "w"
    folder = w / "train-captioner"
    common.check_stage(config, w, "train-captioner")
    (folder / "vocab.json").write_text("[1, 2]")  # built from this run's captions
    fixed = config.copy_and_resolve_references()
    fixed.captioner.train.batch_size = 16
    common.check_stage(fixed, w, "train-captioner")
    assert signature.read(folder / "signature.json")["captioner.train.batch_size"] == 16
    assert not (folder / "vocab.json").exists()  # made with the other settings: made again
    assert common.check_pipeline(config, w, ("train-captioner", "extract")) == set()
    (w / "caption").mkdir()  # the caption stage builds its vocabulary first too
    (w / "caption" / "vocab.json").write_text("[1]")
    assert not common._has_output(w, "caption")
    (folder / "checkpoints" / "8").mkdir(parents=True)
    (folder / "checkpoints" / "8" / "state").write_text("")
    with pytest.raises(ConfigError, match="captioner.train.batch_size: 16 -> 32"):
        common.check_stage(config, w, "train-captioner")
    with pytest.raises(ConfigError, match="captioner.train.batch_size: 16 -> 32"):
        common.check_pipeline(config, w, ("train-captioner", "extract"))


def test_input_paths_in_signatures_name_files_not_strings(tmp_path, monkeypatch):
    """The same command from another working folder, or a relative path written absolute,
    is the same run; a signature recorded with a relative path still matches from there."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "test.json").write_text("[]")
    monkeypatch.chdir(tmp_path)
    config = tldr_config.get_config("tiny")
    config.data.test = "sub/test.json"
    config.caption.data = "sub/test.json:test"
    fp = {"pairs": 3, "sha256": "ab" * 32}
    sig = common.stage_signature(config, "score", fp)
    assert sig["data.test"] == str(tmp_path / "sub" / "test.json")
    old = dict(sig, **{"data.test": "sub/test.json"})  # as an older version recorded it
    assert signature.differences(old, sig) == {}
    config.data.test = str(tmp_path / "sub" / "test.json")
    assert signature.differences(sig, common.stage_signature(config, "score", fp)) == {}
    caption = common.stage_signature(config, "caption", fp)["caption.data"]
    assert caption == f"{tmp_path}/sub/test.json:test"
    monkeypatch.chdir(tmp_path / "sub")
    config.data.test = "test.json"
    assert signature.differences(sig, common.stage_signature(config, "score", fp)) == {}
    config.data.test = "other.json"
    assert "data.test" in signature.differences(sig, common.stage_signature(config, "score", fp))
    # the distillation buffer records its text encoder folder the same way
    assert signature.normal_path("text.model_dir", "bert") == str(tmp_path / "sub" / "bert")


def test_a_refusal_names_each_folders_recorded_value():
    """`write` run alone with another mode leaves compress/ and eval/ disagreeing: the
    refusal named the last folder's value as if both held it."""
    err = common._refuse(
        Path("W"),
        [
            ("eval", {"write.mode": ("append", "replace"), "seed": (0, 1)}),
            ("write", {"write.mode": ("generated", "replace"), "seed": (0, 1)}),
        ],
    )
    assert "write.mode: 'append' in eval / 'generated' in compress -> 'replace'" in str(err)
    assert "seed: 0 -> 1" in str(err)


def test_distill_refusals_name_config_keys(tmp_path):
    """W/distill's signature holds the buffer's under "buffer.": a refusal names the config
    keys (`buffer.lr`, `model.*`, `data.image_size`), not the nesting (`buffer.buffer.lr`)."""
    from tldr_jax.distill import expert_trajectories as et

    assert et.distill_key("buffer.buffer.lr") == "buffer.lr"
    assert et.distill_key("buffer.model.image") == "model.image"
    assert et.distill_key("buffer.image_size") == "data.image_size"
    assert et.distill_key("distill.syn_steps") == "distill.syn_steps"
    assert et.buffer_key("image_root") == "data.image_root"
    path = tmp_path / "distill" / "signature.json"
    sig = {"buffer": {"buffer": {"lr": 0.3}, "image_size": 16}, "distill": {"syn_steps": 2}}
    et.check_signature(path, sig, create=True, redo="distill again", names=et.distill_key)
    other = {"buffer": {"buffer": {"lr": 0.2}, "image_size": 20}, "distill": {"syn_steps": 2}}
    with pytest.raises(ConfigError) as err:
        et.check_signature(path, other, create=False, redo="distill again", names=et.distill_key)
    assert "(buffer.lr: 0.3 -> 0.2; data.image_size: 16 -> 20)" in str(err.value)


def test_select_seed_minus_one_is_the_global_seed():
    """select.seed -1 follows the global seed; the signature records the seed it resolves
    to, so -1 and that seed written out are the same run. The default stays 0 whatever the
    global seed (workdirs made with --config.seed=1 keep their selection)."""
    from tldr_jax import config_lib

    config = tldr_config.get_config("tiny")
    config.seed = 3
    fp = {"pairs": 1, "sha256": "x"}
    sig = common.stage_signature(config, "select", fp)
    assert config.select.seed == 0 and sig["select.seed"] == 0
    follow = config.copy_and_resolve_references()
    follow.select.seed = -1
    assert config_lib.stage_seed(follow, "select") == 3
    following = common.stage_signature(follow, "select", fp)
    assert signature.differences(sig, following) == {"select.seed": (0, 3)}
    spelled = config.copy_and_resolve_references()
    spelled.select.seed = 3
    assert signature.differences(following, common.stage_signature(spelled, "select", fp)) == {}


def test_a_value_not_recorded_is_said_unset():
    assert signature.describe({"distill.seed": (None, 1)}) == "distill.seed: unset -> 1"


def test_a_recorded_value_of_an_added_key_is_compared_as_recorded():
    """`ADDED_KEYS` stand in only where a signature has no value: a workdir recorded with
    score.filter_over='all' is reused with 'all' and refused with 'selected'."""
    recorded = {"score.filter_over": "all", "score.keep_fraction": 0.5}
    assert signature.differences(recorded, dict(recorded), known_only=True) == {}
    now = dict(recorded, **{"score.filter_over": "selected"})
    assert signature.differences(recorded, now, known_only=True) == {
        "score.filter_over": ("all", "selected")
    }


def test_a_fingerprint_only_one_side_has_is_a_change():
    """A signature recorded without the training-data fingerprint does not match one with
    it, even where only the keys both name are compared: the data it was made from is
    unknown."""
    have = {"select.target": 0.5}
    want = {"select.target": 0.5, "train_data.pairs": 3, "train_data.sha256": "ab" * 32}
    diff = signature.differences(have, want, known_only=True)
    assert diff == {
        "train_data.pairs": (None, 3),
        "train_data.sha256": (None, "ab" * 32),
    }
    assert signature.describe(diff) == (
        "training data changed (none recorded -> 3 pairs, sha256 abababababab)"
    )


def test_check_stage_waits_for_every_process_before_recording_the_signature(tmp_path, monkeypatch):
    """Multi-process: every process has read the stage's folder before the main process
    writes the signature in it (a barrier first). Without it a process still reading found
    the signature's temporary file (`_has_output`) but no signature yet, and warned "made
    before signatures were recorded" on a fresh workdir."""
    config = tldr_config.get_config("tiny")
    w = tmp_path / "w"
    events = []
    write = signature.write
    monkeypatch.setattr(
        signature, "write", lambda path, sig: (events.append("write"), write(path, sig))
    )
    monkeypatch.setattr(common.dist, "barrier", lambda name: events.append(name))
    common.check_stage(config, w, "train-captioner")
    assert events == ["check-stage-train-captioner", "write"]
    events.clear()
    common.check_stage(config, w, "train-captioner")  # recorded already: nothing written
    assert events == ["check-stage-train-captioner"]


def test_a_signature_below_a_file_is_absent():
    """No signature where its folder is a file (not a folder): None, as for a missing one,
    not a refusal saying it cannot be read."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "distill").write_text("")
        assert signature.read(Path(d) / "distill" / "signature.json") is None
