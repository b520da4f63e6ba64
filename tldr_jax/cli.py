"""The one command line: `tldr-jax <stage> --config configs/X.py[:arg] --workdir DIR`.

Every stage is a function `run(config, workdir) -> dict`; the dict is written atomically
to `DIR/<stage>.json` by the main process.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import re
import signal
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

# stage name -> "module:function"; imported lazily so `--help` is instant.
STAGES: dict[str, str] = {
    "make-world": "tldr_jax.data.world:run_stage",
    "pretrain": "tldr_jax.train.pretrain:run",
    "evaluate": "tldr_jax.train.pretrain:run_evaluate",
    "train-captioner": "tldr_jax.compress.captioner_stage:run",
    "extract": "tldr_jax.compress.extract:run",
    "select": "tldr_jax.compress.select_stage:run",
    "score": "tldr_jax.compress.score:run",
    "caption": "tldr_jax.compress.caption_stage:run",
    "write": "tldr_jax.compress.write:run",
    "compress": "tldr_jax.compress.pipeline:run",
    "buffer": "tldr_jax.distill.expert_trajectories:run",
    "distill": "tldr_jax.distill.distill_stage:run",
    "eval-distilled": "tldr_jax.distill.eval_distilled:run",
}

USAGE = """usage: tldr-jax <stage> --config configs/X.py[:arg] --workdir DIR [--config.a.b=v ...]

stages:
  make-world       write the embedded procedural world to disk (BLIP + Karpathy formats)
  pretrain         train a dual encoder and evaluate retrieval       (configs/pretrain.py)
  evaluate         restore the latest checkpoint and evaluate         (configs/pretrain.py)
  train-captioner  codebook (VQ) captioner                            (configs/tldr.py)
  extract          per-sample code indices keyed by sample id         (configs/tldr.py)
  select           PCA + k-means + per-cluster selection              (configs/tldr.py)
  score            image-text alignment scores and top-fraction filter (configs/tldr.py)
  caption          captioner trained on clean captions + generation (configs/tldr.py)
  write            new BLIP-format training file + manifest           (configs/tldr.py)
  compress         the six stages above, then the retrieval comparison (configs/tldr.py)
  buffer           expert trajectories for distillation              (configs/distill.py)
  distill          trajectory-matching dataset distillation           (configs/distill.py)
  eval-distilled   train fresh models on distilled set and coresets   (configs/distill.py)
"""


def resolve_stage(name: str) -> Callable[[Any, str], dict]:
    module, fn = STAGES[name].split(":")
    return getattr(importlib.import_module(module), fn)


def _busy(name: str, workdir: str, holder: str) -> Exception:
    from tldr_jax.config_check import ConfigError

    error = ConfigError(
        f"another `tldr-jax {name}` (pid {holder}) is running on {workdir}: wait for it to "
        "finish or use another --workdir"
    )
    error.holder = holder  # type: ignore[attr-defined]  # told to the other processes
    return error


def _acquire_lock(path: Path, name: str, workdir: str) -> Any:
    """The open, flock-ed lock file, or None where the filesystem has no locks; a
    ConfigError naming the holder's pid where another run holds it."""
    import fcntl

    while True:
        f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open for the lock's lifetime)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise _busy(name, workdir, holder) from None
        except OSError:  # no locks on this filesystem
            f.close()
            return None
        # The holder removes the file before unlocking: a file locked after that removal is
        # no longer the lock file; open the current one again.
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return f
        f.close()


def _agree_on_lock(error: Exception | None, main_process: bool, name: str, workdir: str) -> None:
    """Every process of a multi-process run learns whether the main process got the lock
    (one collective): where it did not, each stops with the same line, at once (the others
    went on into the stage and failed in its first collective with a traceback)."""
    import jax

    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    import numpy as np
    from jax.experimental import multihost_utils

    holder = -1  # the main process got the lock (or the filesystem has none)
    if main_process and error is not None:
        pid = str(getattr(error, "holder", ""))
        holder = int(pid) if pid.isdigit() else 0
    holder = int(multihost_utils.broadcast_one_to_all(np.int64(holder)))
    if error is not None:
        raise error
    if holder >= 0:
        raise _busy(name, workdir, str(holder or "?"))


@contextlib.contextmanager
def stage_lock(workdir: str, name: str, main_process: bool = True) -> Iterator[None]:
    """Refuses a second run of the same stage on the same workdir while one is running (both
    would write the same checkpoints): an exclusive `flock` on `W/.<stage>.lock`, held while
    the stage runs and released by the kernel however the process ends; the file is removed
    when the stage returns or raises. Other stages may run beside it (distill beside a buffer
    still training). The main process of a multi-process run locks and tells the others
    whether it could; where the filesystem has no locks (some network mounts) nothing is
    locked."""
    path = Path(workdir) / f".{name}.lock"
    f, error = None, None
    if main_process:
        try:
            f = _acquire_lock(path, name, workdir)
        except Exception as e:  # a ConfigError naming the holder
            error = e
    _agree_on_lock(error, main_process, name, workdir)
    if f is None:
        yield
        return
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        f.close()  # releases the flock


# What a stage's sweep covers where it is not its own folder and `<stage>.*` outputs:
# (folders, other outputs in the workdir). `compress` runs each of its stages through
# run_stage (each sweeps its own) and writes `W/eval`, `report.md` and `recall.png` itself;
# `W/compress` is `write`'s.
SWEEPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "compress": (("eval",), ("report.md", "recall.png")),
    "write": (("write", "compress"), ()),
}
WORKDIR_REQUIRED = "--workdir DIR is required: the folder the stage reads and writes"


def workdir_path(workdir: str) -> str:
    """`--workdir` as a path: `~` and `file://` URLs as for input paths; empty is an error
    (it ran the stage in the current folder)."""
    from tldr_jax import config_check

    if not str(workdir).strip():
        raise config_check.ConfigError(WORKDIR_REQUIRED)
    path = config_check.local_path(str(workdir))
    if not os.path.isabs(path) and cwd_gone():
        raise config_check.ConfigError(f"--workdir {path}: {CWD_GONE}")
    if re.search("[\ud800-\udfff]", path):
        # Bytes not decodable in the locale's encoding (a non-UTF-8 name, or any non-ASCII
        # one under LC_ALL=C with PYTHONUTF8=0): the checkpoint writer (tensorstore) took
        # them for a traceback ("Unable to cast Python instance of type <class 'str'>").
        raise config_check.ConfigError(
            f"--workdir {path}: the folder's name is not text in this process's file name "
            f"encoding ({sys.getfilesystemencoding()}), which the checkpoint writer needs: "
            "run in a UTF-8 locale (LC_ALL=C.UTF-8, or PYTHONUTF8=1) or use another folder"
        )
    return path


# How far below the workdir outputs reach, with room to spare: an orbax checkpoint's temporary
# folders are ~130 bytes (`train-captioner/checkpoints/12.orbax-checkpoint-tmp/state.orbax-
# checkpoint-tmp/ocdbt.process_0/d/<32 hex digits>`).
OUTPUT_DEPTH_BYTES = 256


def check_workdir_length(workdir: str) -> None:
    """A ConfigError where the workdir's path is so long that outputs below it would pass the
    system's limit on a path's length (PATH_MAX, 4096 bytes on Linux): that failed at the first
    checkpoint, with hundreds of lines of tracebacks from the checkpoint writer's threads."""
    from tldr_jax.config_check import ConfigError

    try:
        limit = os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 4096
    size = len(os.fsencode(os.path.abspath(workdir)))
    if size + OUTPUT_DEPTH_BYTES > limit:
        raise ConfigError(
            f"--workdir is {size} bytes long: outputs up to {OUTPUT_DEPTH_BYTES} bytes below it "
            f"would pass this system's limit of {limit} bytes on a path; use a shorter one"
        )


CWD_GONE = (
    "a relative path, and the current folder no longer exists (removed after the shell "
    "entered it): cd to a folder that exists, or give an absolute path"
)


def cwd_gone() -> bool:
    """Whether the current folder was removed (relative paths then name nothing)."""
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


def run_stage(name: str, config: Any, workdir: str) -> dict:
    """Runs one stage and writes `workdir/<name>.json` (main process only)."""
    import jax

    from tldr_jax import config_check
    from tldr_jax.utils import dist, hostenv, io, mesh

    config_check.expand_home(config)  # `--config.data.train=~/x`: the shell leaves the ~
    workdir = workdir_path(workdir)
    config_check.check(config, name)  # before any data is read or any directory is made
    mesh.check_setup(config, name)  # the mesh and sharded batches fit the devices
    if Path(workdir).exists() and not Path(workdir).is_dir():
        raise config_check.ConfigError(f"--workdir {workdir} exists and is not a directory")
    check_workdir_length(workdir)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with stage_lock(workdir, name, dist.is_main()):
        if dist.is_main():  # what a killed run of this stage left half-written
            folders, files = SWEEPS.get(name, ((name,), ()))
            io.remove_stage_temps(workdir, name, folders, files)
        summary = resolve_stage(name)(config, workdir)
    summary = dict(summary or {})
    summary.setdefault("stage", name)
    if "seed" in config:  # the global seed (a stage's own, where it has one, is its summary's)
        summary.setdefault("seed", int(config.seed))
    summary["wall_s"] = round(time.time() - t0, 3)
    summary.setdefault("num_processes", jax.process_count())
    summary.setdefault("num_devices", jax.device_count())
    summary.setdefault("malloc_hugepages", hostenv.malloc_hugepages_active())
    summary.setdefault("xla_flags", os.environ.get("XLA_FLAGS", ""))
    if dist.is_main():
        # The whole config the summary came from (defaults, the config word and overrides).
        io.write_json(Path(workdir) / f"{name}.config.json", config.to_dict())
        io.write_json(Path(workdir) / f"{name}.json", summary)
    dist.barrier(f"stage-{name}-done")
    return summary


def sigint_handler(signum: int, frame: Any) -> None:
    """Python's Ctrl-C (KeyboardInterrupt), except inside a garbage-collector callback:
    CPython prints and drops an exception raised there, and JAX's `_xla_gc_callback` runs
    at every collection, so a Ctrl-C while JAX was importing was often lost and the stage
    ran on. There the signal is sent again a moment later, from another thread."""
    if frame is not None and frame.f_code.co_name == "_xla_gc_callback":
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
        return
    raise KeyboardInterrupt


def exit_at_once(code: int) -> NoReturn:
    """Leaves without the interpreter's shutdown, after flushing the log handlers and the
    standard streams: a signal can land while XLA (or JAX's import) runs work on threads of
    its own, and tearing Python down under them crashed the process (exit 139, not 143 / 130)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    """`tldr-jax <stage> --config ... --workdir ...`. Ctrl-C while the program is still
    starting (importing JAX, parsing flags) is one line and exit 130 too, not a traceback."""
    if argv is None:
        from tldr_jax.utils import streams

        # Closed or vanishing stdout / stderr and encodings that cannot write a path: the
        # stage runs to its end all the same (utils/streams.py).
        streams.guard()
    if argv is None and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, sigint_handler)
    try:
        _main_impl(argv)
    except KeyboardInterrupt:
        stage = (sys.argv if argv is None else argv)[1:2] or [""]
        print(f"tldr-jax {stage[0]}: interrupted while starting", file=sys.stderr)
        exit_at_once(130)  # JAX may be half-imported, with threads of its own


def _main_impl(argv: list[str] | None) -> None:
    as_process = argv is None
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        asked = len(argv) >= 2  # the usage asked for goes to stdout; as an error, to stderr
        print(USAGE, file=sys.stdout if asked else sys.stderr)
        sys.exit(0 if asked else 2)
    stage = argv[1]
    if stage not in STAGES:
        import difflib

        close = difflib.get_close_matches(stage, STAGES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        print(
            f"tldr-jax: unknown stage {stage!r}: {hint}`tldr-jax --help` lists the stages",
            file=sys.stderr,
        )
        sys.exit(2)
    from tldr_jax.config_check import ConfigError  # ml_collections only: --help stays instant

    if any(a in ("-h", "--help", "--helpshort") for a in argv[2:]):
        try:
            print(stage_help(stage, argv[2:]))
        except ConfigError as e:
            _usage_error(stage, str(e))
        sys.exit(0)
    if as_process:
        # Before JAX loads: restart under glibc's huge-page malloc where it pays off on this
        # host (utils/hostenv.py; TLDR_JAX_MALLOC_HUGEPAGES=0 to keep the environment as is).
        from tldr_jax.utils import hostenv

        hostenv.reexec_with_malloc_hugepages()
        # Before JAX initialises a backend (XLA_FLAGS are read then): XLA:GPU's Triton GEMM
        # fusion off (utils/hostenv.py; TLDR_JAX_TRITON_GEMM=1 keeps it).
        if (xla_flags := hostenv.xla_flags_with_gpu_defaults(os.environ)) is not None:
            os.environ["XLA_FLAGS"] = xla_flags

    from absl import app, flags
    from ml_collections import config_flags

    spec = config_spec(argv[2:])
    if spec is not None and not spec.strip():
        from tldr_jax.config_check import STAGE_BLOCKS

        example = STAGE_BLOCKS.get(stage, ((), ""))[1]
        example = example if example.startswith("configs/") else "configs/tldr.py"
        _usage_error(stage, f"--config is empty: give a config file, e.g. {example}:small")
    if spec and re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", spec) and spec[:5].lower() != "file:":
        _usage_error(stage, f"--config {spec}: a config file on this machine (or a file:// URL)")
    if spec:
        config_file, arg = config_file_of(spec)
        if os.path.isdir(config_file):
            _usage_error(stage, f"config file {config_file} is a folder (e.g. configs/tldr.py)")
        if not os.path.isfile(config_file):
            if not os.path.isabs(config_file) and cwd_gone():
                _usage_error(stage, f"config file {config_file}: {CWD_GONE}")
            _usage_error(stage, f"config file {config_file} does not exist")
        _allow_sibling_imports(config_file)
        try:
            problem = config_file_problem(config_file, arg)
        except ConfigError as e:  # an unknown `file.py:word`
            _usage_error(stage, str(e))
        if problem:
            _usage_error(stage, f"config file {config_file}: {problem}")
        local = f"{config_file}:{arg}" if arg else config_file
        if local != spec:  # a file:// URL or ~: what ml_collections reads is the path
            argv = [
                local if a == spec else f"--config={local}" if a == f"--config={spec}" else a
                for a in argv
            ]

    config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Output directory for checkpoints and summaries.")
    flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port.")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
    flags.DEFINE_integer("process_id", None, "This process's id (multi-host).")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(_: list[str]) -> None:
        from absl import logging as absl_logging

        from tldr_jax.data.records import InputError
        from tldr_jax.utils import dist, preemption
        from tldr_jax.utils.io import DamagedFileError

        # Orbax and grain log every checkpoint file at INFO through absl; keep ours at INFO.
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("tldr_jax").setLevel(logging.INFO)
        dist.initialize(
            flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id
        )
        preemption.install_handlers()
        try:
            summary = run_stage(stage, flags.FLAGS.config, flags.FLAGS.workdir)
        except preemption.Preempted as e:
            print(f"tldr-jax {stage}: {e}", file=sys.stderr)
            _exit_now(preemption.EXIT_CODE)
        except KeyboardInterrupt:
            # Ctrl-C stops at once (no checkpoint of its own; SIGTERM finishes the step and
            # checkpoints). Outputs are written atomically, so a rerun resumes from the last one.
            print(
                f"tldr-jax {stage}: interrupted; rerun the same command to resume from the "
                "last checkpoint",
                file=sys.stderr,
            )
            _exit_now(130)
        except (InputError, FileNotFoundError, ConfigError, DamagedFileError) as e:
            # The input's or the config's fault (or an earlier output damaged since), and the
            # message says where: no traceback.
            print(f"tldr-jax {stage}: error: {e}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:
            if not file_system_error(e):
                raise
            # A path the stage cannot read or write (permissions, a file where a folder
            # should be, a full or read-only disk): the message names it, no traceback.
            print(f"tldr-jax {stage}: error: {e}", file=sys.stderr)
            sys.exit(2)
        keys = [k for k in ("tr_r1", "ir_r1", "kept_rows", "fraction") if k in summary]
        short = " ".join(f"{k}={summary[k]:.4g}" for k in keys)
        wrote = Path(workdir_path(flags.FLAGS.workdir)) / (stage + ".json")
        if dist.is_main():  # the process that wrote it
            print(f"tldr-jax {stage}: wrote {wrote}" + (f" ({short})" if short else ""))

    def _exit_now(code: int) -> NoReturn:
        """Exits after a signal stopped the stage (its `finally` blocks have run): a single
        process at once (`exit_at_once`); several through `sys.exit`, whose exit handlers
        disconnect from JAX's coordination service (every process is at the same agreed
        step then)."""
        import jax

        if jax.process_count() > 1:
            sys.exit(code)
        exit_at_once(code)

    def _parse_flags(args: list[str]) -> list[str]:
        try:
            with warnings.catch_warnings():
                # ml_collections reads the config file with importlib's deprecated
                # `load_module()`: not ours to change, and `python -W error` must still run.
                warnings.filterwarnings(
                    "ignore", r"the load_module\(\) method is deprecated", DeprecationWarning
                )
                rest = flags.FLAGS(args)
            if len(rest) > 1:  # `--config.data.strict maybe`: a boolean flag, then a word
                words = " ".join(repr(w) for w in rest[1:])
                _usage_error(stage, f"unexpected argument {words}: write flags as --name=value")
            return rest
        except flags.Error as e:
            # ml_collections wraps what get_config raised, traceback text included: keep ours.
            text = str(e)
            mark = text.rfind("ConfigError: ")
            if mark >= 0:
                _usage_error(stage, text[mark + len("ConfigError: ") :].strip())
            _usage_error(stage, flag_error_message(text))
        except ConfigError as e:  # an unknown `file.py:word`
            _usage_error(stage, str(e))
        except (AttributeError, KeyError) as e:  # `--config.a.b=v` naming no key of the config
            _usage_error(stage, unknown_override_message(args, e))

    app.run(_main, argv=[argv[0]] + argv[2:], flags_parser=_parse_flags)


# What a file system answers about a path (not a fault of the program): one line, exit 2.
FILE_SYSTEM_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EFBIG,
        errno.EROFS,
        errno.ENAMETOOLONG,
        errno.ELOOP,
    }
)


def file_system_error(e: OSError) -> bool:
    """Whether `e` is a file system's refusal of a path, told as one line by the CLI."""
    return e.errno in FILE_SYSTEM_ERRNOS


def flag_error_message(text: str) -> str:
    """absl's flag errors in plain words: a missing --workdir, a value that is not a
    boolean (absl says `('Non-boolean argument to boolean flag', 'maybe')`)."""
    if text.startswith("flag --workdir=None"):
        return WORKDIR_REQUIRED
    if text.startswith("flag --config=None"):
        return "--config FILE[:arg] is required, e.g. --config configs/tldr.py:small"
    m = re.match(r"flag (--\S+?)=(.*?): \('Non-boolean argument to boolean flag', .*\)$", text)
    if m:
        return f"{m[1]}={m[2]}: not a boolean (True or False)"
    m = re.match(r"flag (--\S+?)=(.*?): invalid literal for int\(\) with base 10: ", text)
    if m:
        return f"{m[1]}={m[2]}: not an integer (the key takes a whole number)"
    m = re.match(r"flag (--\S+?)=(.*?): could not convert string to float: ", text)
    if m:
        return f"{m[1]}={m[2]}: not a number"
    return text


def stage_help(stage: str, args: list[str]) -> str:
    """`tldr-jax STAGE --help`: what the stage does, its flags, and, given `--config`, every
    key of that config with its value (what `--config.a.b=v` can override)."""
    from tldr_jax.config_check import STAGE_BLOCKS

    what = next(
        line.split(None, 1)[1] for line in USAGE.splitlines() if line.split()[:1] == [stage]
    )
    what = re.sub(r"\s*\(configs/\w+\.py\)$", "", what)
    blocks, source = STAGE_BLOCKS[stage]
    lines = [
        f"usage: tldr-jax {stage} --config configs/X.py[:arg] --workdir DIR [--config.a.b=v ...]",
        "",
        f"{stage}: {' '.join(what.split())}",
        *textwrap.wrap(f"config: {source} (needs the config blocks {', '.join(blocks)})", 92),
        "",
        "flags:",
        "  --config FILE[:arg]    config file; :small / :tiny etc. as its docstring lists",
        "  --workdir DIR          outputs, checkpoints and DIR/<stage>.json",
        "  --config.a.b=v         override one key (checked: unknown keys and bad values stop)",
        "  --coordinator_address, --num_processes, --process_id",
        "                         multi-host runs through jax.distributed (README)",
    ]
    spec = config_spec(args)
    if spec:
        path, arg = config_file_of(spec)
        if Path(path).is_file():
            _allow_sibling_imports(path)  # before loading it: configs import their siblings
            problem = config_file_problem(path, arg)  # ConfigError: an unknown `:word`
        else:
            problem = "a folder" if Path(path).is_dir() else "no such file"
        if problem:
            lines += ["", f"(cannot read config file {path}: {problem})"]
        else:
            config = load_config(f"{path}:{arg}" if arg else path)
            lines += ["", f"{spec} defaults (each key can be overridden: --config.KEY=VALUE):"]
            lines += config_lines(config.to_dict())
    else:
        lines += ["", "Add --config FILE[:arg] to --help to list every key of that config."]
    return "\n".join(lines)


def config_lines(tree: Mapping[str, Any], indent: int = 2) -> list[str]:
    """A config as nested `key: value` lines in key order, each value written as the Python
    literal `--config.KEY=VALUE` takes (`()`, `(100, 1000)`, `''`, `False`)."""
    lines = []
    for key in sorted(tree):
        value = tree[key]
        if isinstance(value, Mapping):
            lines += [" " * indent + f"{key}:", *config_lines(value, indent + 2)]
        else:
            lines.append(" " * indent + f"{key}: {value!r}")
    return lines


def load_config(spec: str, overrides: Sequence[str] = ()) -> Any:
    """The config of `FILE[:arg]` (what `--config` reads), with `a.b=v` overrides applied and
    the result checked (`config_check.problems`): for scripts (benchmarks/) that take a
    config as the CLI does. A value is parsed as a Python literal when it is one
    (`3`, `0.5`, `True`, `(100, 1000)`), else kept as a string."""
    import ast
    import importlib.util

    from tldr_jax.config_check import ConfigError, expand_home, problems

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_tldr_config", path)
    if module_spec is None or module_spec.loader is None or not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    _allow_sibling_imports(path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for item in overrides:
        key, sep, text = item.removeprefix("--config.").partition("=")
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node.get(name) if hasattr(node, "get") else None
        if not sep or node is None or not hasattr(node, "get") or leaf not in node:
            raise ConfigError(f"{item}: not a KEY=VALUE override of a key of {spec}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            node[leaf] = value
        except TypeError as e:
            raise ConfigError(f"{item}: {e}") from None
    expand_home(config)
    found = problems(config)
    if found:
        raise ConfigError("; ".join(found))
    return config


def config_file_of(spec: str) -> tuple[str, str]:
    """`FILE[:arg]` (the `--config` value) -> (the file's local path, arg): `~` is home and a
    `file://` URL is the path it names (`file:///x/tldr.py:small`)."""
    from tldr_jax.config_check import local_path

    if spec[:5].lower() == "file:":  # the arg follows the URL's own `file:`
        head, _, arg = spec[5:].partition(":")
        return local_path("file:" + head), arg
    path, _, arg = spec.partition(":")
    return local_path(path), arg


def config_file_problem(path: str, arg: str) -> str:
    """Why the config file at `path` cannot give a config for `arg` ("" = it can): not Python
    (the line of the syntax error), an import or other error while loading it, no
    `get_config`, or `get_config(arg)` failing. A ConfigError it raises (an unknown `:word`)
    is raised as it is. Loaded here so each is one line, not a traceback from absl (the file
    and its get_config then run once more when ml_collections reads it: a config file has no
    side effects)."""
    import types

    from tldr_jax.config_check import ConfigError

    try:
        code = compile(Path(path).read_bytes(), path, "exec")
    except SyntaxError as e:
        return f"a Python syntax error at line {e.lineno}: {e.msg}"
    except (OSError, ValueError) as e:
        return f"cannot be read as Python: {e}"
    module = types.ModuleType("_tldr_config_check")
    module.__file__ = path
    try:
        exec(code, module.__dict__)
    except (Exception, SystemExit) as e:
        return f"{type(e).__name__} while loading it: {e}"
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        return "it defines no get_config(arg) function"
    try:
        config = get_config(arg) if arg else get_config()
    except ConfigError:
        raise
    except (Exception, SystemExit) as e:
        call = f"get_config({arg!r})" if arg else "get_config()"
        return f"{call} raised {type(e).__name__}: {e}"
    if not hasattr(config, "to_dict"):
        return f"get_config returned a {type(config).__name__}, not an ml_collections ConfigDict"
    return ""


def config_spec(args: list[str]) -> str | None:
    """The `--config FILE[:arg]` / `--config=FILE[:arg]` value among the arguments, if any
    (the last one, as absl takes the last of a repeated flag)."""
    spec = None
    for i, a in enumerate(args):
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(args):
            spec = args[i + 1]
    return spec


def _allow_sibling_imports(config_file: str) -> None:
    """Config files may import their siblings: `from configs import pretrain` (the folder
    above theirs first on the path) or `import helper` (their own folder, last, so a config
    file's name never hides a module). `config_file`: the file's local path, without `:arg`."""
    folder = Path(config_file).resolve().parent
    sys.path.insert(0, str(folder.parent))
    if str(folder) not in sys.path:
        sys.path.append(str(folder))


def _usage_error(stage: str, message: str) -> NoReturn:
    print(f"tldr-jax {stage}: error: {message}", file=sys.stderr)
    sys.exit(2)


def unknown_override_message(args: list[str], error: BaseException) -> str:
    """Names the `--config.a.b` flag whose key the config lacks (ml_collections' own error only
    quotes the last part, with a did-you-mean when a key is close)."""
    text = str(error).replace("\\'", "'").replace("\\n", "\n")
    found = re.search(r"[A-Za-z_][A-Za-z0-9_]*", text)
    key = found.group(0) if found else text
    mean = re.search(r'Did you mean "[^"]+" instead of "[^"]+"\?', text)
    hint = mean.group(0) if mean else ""
    flags_given = [a.split("=", 1)[0] for a in args if a.startswith("--config.")]
    named = [f for f in flags_given if key in f[len("--config.") :].split(".")] or flags_given
    where = named[0] if named else "--config.*"
    return f"{where}: the config has no key {key!r}" + (f" ({hint})" if hint else "")


if __name__ == "__main__":
    main()
