"""Train and test an experiment: `python -m fewzero.train [overrides]`.

`train(cfg)` does the work and is what tests call; `main()` is the thin Hydra entry point that
returns the optimised metric to sweepers.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import difflib
import hashlib
import importlib
import json
import logging
import math
import multiprocessing
import os
import re
import shlex
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.tensorboard.summary import hparams as tensorboard_hparams

from fewzero.callbacks import (
    EncoderModelSummary,
    FitKey,
    LastCheckpoint,
    RngAtFirstBatch,
    RunRecord,
    StageTimer,
    requeue,
    steps_per_epoch,
    write_checkpoints_atomically,
)
from fewzero.console import (
    follow_up_trainer,
    quiet_lightning,
    refusal_message,
    stopped_by_another_process,
    unwrapped,
    without_optimiser_notes,
)
from fewzero.data.clips import config_hash, replace_atomically
from fewzero.models.backbones import MusicFslCNN
from fewzero.models.pitch_prior import ZSL_SCORES, all_tied
from fewzero.models.resumable import ResumableModule
from fewzero.models.zeroshot_module import check_init_source
from fewzero.side_info.xlsa17 import attribute_dim
from fewzero.summary import class_cv_outcome, print_summary
from fewzero.sweeps import check_validation_metric, register_resolvers

log = logging.getLogger(__name__)
MAX_RUN_SUFFIX = 120
# What a training run's course depends on: a resume must keep these, and a class-CV fold is
# reused only when they are unchanged. Where it trains may change on resume (RESUME_MAY_CHANGE).
# physical_facts: the attribute table beside other side information, which lends the pitch
# prior its ranges and formants (model/pitch_prior=range_formant_attributes).
TRAINING_KEYS = ("model", "dataset", "loss", "side_info", "physical_facts", "trainer", "seed",
                 "flush_denormal")
# the callbacks that shape what trains and what is selected: per-step seeds, the best checkpoint
TRAINING_CALLBACKS = ("step_seed", "model_checkpoint")
RESUME_MAY_CHANGE = ("trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
                     "trainer.sync_batchnorm", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
                     "dataset.num_workers",
                     "model.figures",  # draws or not; no number depends on it (nor on its absence
                                       # from the configs of runs older than it)
                     # where the data are, moved since: a render's folder (rendered SOL, tones)
                     # and every cache are named by what they hold, so another place holds the
                     # same data or none (not so TinySOL's or xlsa17's folders)
                     "dataset.source.root", "dataset.source.num_workers", "dataset.cache_dir",
                     "side_info.cache_dir",
                     # no run's course depends on it, and runs recorded before it lack it
                     "callbacks.model_checkpoint.enable_version_counter")
# metrics.json's and the summary's word on a trainer.fast_dev_run (Lightning's limits: one batch
# of every stage)
FAST_DEV_RUN_NOTE = ("one batch per stage: validation and test scored only the clips of their "
                     "first batch (dataset.eval_batch_size), so these figures check that the run "
                     "works and are no results")


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (Linux; a no-op elsewhere). Returns whether it did.

    By default glibc serves large blocks (the first conv block's 33 MB training activations and
    their gradients; 170 MB ones at evaluation's batch of 256) with mmap, returns them to the
    OS when freed, and trims the heap top as soon as a few such blocks are free: every training
    step and evaluation batch then faults its activations in afresh (10,000-18,000 zero-filled
    page faults a training step). Serving every block from the heap (no mmap) and trimming only
    above 1 GiB free lets steps reuse the same pages. Only where memory comes from changes, never
    what is computed (PyTorch aligns every tensor to 64 bytes either way); peak memory rises a
    little (freed blocks stay with the process)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_trim_threshold, 1 << 30)) and bool(mallopt(m_mmap_max, 0))


def log_from_the_first_process_only() -> None:
    """Under DDP, let the other processes log warnings and errors only: their INFO lines (the
    datamodule's, class cross-validation's) repeated the first process's on the console."""
    if rank_zero_only.rank > 0:
        logging.getLogger().setLevel(logging.WARNING)


def run_suffix(override_dirname: str) -> str:
    """`_<overrides>` for run directory names: '/' and spaces made path-safe, long ones shortened.

    Empty when there are no overrides, so the directory is just the timestamp.
    """
    if not override_dirname:
        return ""
    name = override_dirname.replace("\\", "").replace("/", ".").replace(" ", "")
    if len(name) > MAX_RUN_SUFFIX:
        name = f"{name[: MAX_RUN_SUFFIX - 9]}~{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return f"_{name}"


OmegaConf.register_new_resolver("run_suffix", run_suffix, replace=True)


def env_path(name: str, default: str) -> str:
    """paths.root_dir and paths.data_dir: the folder the environment variable `name` gives, else
    `default`, also where it is set but empty, as the shell's ${name:-default} (FEWZERO_DATA=
    put the data at the file-system root: /cache, /rendered_sol); a leading "~" is the home
    folder (FEWZERO_DATA="~/data", quoted or set outside a shell, put rendered SOL there, as its
    source expands "~", and the feature caches in a folder named "~" under the working one)."""
    return os.path.expanduser(os.environ.get(name) or default)


OmegaConf.register_new_resolver("env_path", env_path, replace=True)
OmegaConf.register_new_resolver("music_fsl_dim", MusicFslCNN.output_dim, replace=True)
OmegaConf.register_new_resolver("xlsa17_dim", attribute_dim, replace=True)
register_resolvers()  # ${optuna_storage:...}, ${optuna_seed:...} (hparams_search=optuna)


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIG_NAME = "train"  # the primary config of `python -m fewzero.train` (`main`)


def compose_train_config(overrides: list[str], output_dir: str | Path) -> DictConfig:
    """Compose `configs/train.yaml` with overrides outside a Hydra run (scripts, notebooks).

    `paths.output_dir` (normally Hydra's run directory) is set to `output_dir`.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(CONFIG_NAME, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def save_run_overrides(overrides: list[str], output_dir: str | Path) -> None:
    """Record a script-composed run's overrides as Hydra does (`<output_dir>/.hydra/overrides.yaml`),
    so that `fewzero.report` groups its runs by their settings (over seeds)."""
    path = Path(output_dir) / ".hydra" / "overrides.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(list(overrides)), path)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """`last` means <output_dir>/checkpoints/last.ckpt; `auto` the same when it exists, else
    None (start afresh: for jobs a cluster may requeue); anything else must be an existing file."""
    if ckpt_path is None:
        return None
    last = output_dir / "checkpoints" / "last.ckpt"
    if ckpt_path == "auto":
        return str(last) if last.is_file() else None
    path = last if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint {path} does not exist. Pass ckpt_path=/path/to/run/checkpoints/last.ckpt, "
            "or ckpt_path=last together with hydra.run.dir=<the run directory to resume>."
        )
    return str(path)


def finished_report(cfg: DictConfig, last: str | Path, output_dir: Path) -> dict[str, Any] | None:
    """The metrics.json of the run in `output_dir` if that run finished with `cfg`'s settings:
    written after `last` (its last.ckpt), which records this very config (`ckpt_path` aside: a
    sweep's first command may lack the `auto` of the command that finishes it). None otherwise,
    e.g. after a kill mid-fit, or when any setting differs (test settings included)."""
    path = output_dir / "metrics.json"
    if not path.is_file() or path.stat().st_mtime < Path(last).stat().st_mtime:
        return None
    try:
        record = RunRecord.read(last)
    except Exception:  # a file cut short by a kill: the resume says so
        return None
    if record is None:
        return None

    def settings(config: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in config.items() if key != "ckpt_path"}

    if settings(record["config"]) != settings(OmegaConf.to_container(cfg)):
        return None
    return json.loads(path.read_text())


def flatten_config(node: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """A config container's leaves as {"a.b.c": value}: dicts are walked (an empty one has no
    leaves), lists and scalars are leaves."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten_config(value, f"{prefix}{sep}{key}" if prefix else str(key), sep))
    return flat


def training_settings(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The TRAINING_KEYS entries of a config and its TRAINING_CALLBACKS (under "callbacks"), as
    plain containers (interpolations unresolved)."""
    container = OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else cfg
    settings = {key: container[key] for key in TRAINING_KEYS if key in container}
    callbacks = container.get("callbacks") or {}
    kept = {name: callbacks[name] for name in TRAINING_CALLBACKS if name in callbacks}
    return {**settings, "callbacks": kept} if kept else settings


def course_settings(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The flattened `training_settings` that set a run's course: those a resume may change
    (RESUME_MAY_CHANGE: where it trains, how it shows progress) left out. What a resume must
    keep, and what a finished class-CV fold or refit is reused under."""
    return {key: value for key, value in flatten_config(training_settings(cfg)).items()
            if not key.startswith(RESUME_MAY_CHANGE)}


def course_changes(then: DictConfig | dict[str, Any], now: DictConfig | dict[str, Any]) -> list[str]:
    """"<key>: <value in the run> in the run, <value now> now" for each `course_settings` key on
    which the run's config `then` and the config `now` differ, sorted by key."""
    before, after = course_settings(then), course_settings(now)
    return [f"{key}: {before.get(key, '(not set)')!r} in the run, {after.get(key, '(not set)')!r} now"
            for key in sorted(before.keys() | after.keys())
            if before.get(key, "(not set)") != after.get(key, "(not set)")]


def run_overrides(output_dir: Path, overrides: list[str] | None = None) -> list[str] | None:
    """A run's command-line overrides without `ckpt_path`: `overrides` (Hydra's, passed by
    `main`), else those a script saved (`save_run_overrides`), else None (unknown)."""
    if overrides is None:
        path = output_dir / ".hydra" / "overrides.yaml"
        if not path.is_file():
            return None
        overrides = list(OmegaConf.load(path))
    return [o for o in overrides if not o.lstrip("+~").startswith("ckpt_path=")]


def hydra_quoted(value: str) -> str:
    """`value` for a Hydra override, double-quoted unless it is a plain path: run directories
    hold '=' and ',' (they are named after the overrides), which Hydra would otherwise parse.
    Hydra escapes quotes, and the backslashes just before one."""
    if re.fullmatch(r"[\w./-]+", value):
        return value
    return '"' + re.sub(r'(\\+)(?="|$)', r"\1\1", value).replace('"', '\\"') + '"'


def interpreter() -> str:
    """This Python as a user would type it: relative to the working directory when inside it
    (`.venv/bin/python`), else its full path. A bare `python` may be another environment's."""
    executable = Path(sys.executable)
    try:
        return str(executable.relative_to(Path.cwd()))
    except ValueError:
        return str(executable)


def restore_run_files(output_dir: Path) -> None:
    """Put back the config and overrides that the run in `output_dir` records in its own
    checkpoints (last.ckpt first, else the newest), for a command naming that directory that
    failed before training: Hydra had already rewritten `.hydra/config.yaml` and
    `overrides.yaml`, and `fewzero.eval` rebuilds the run's model from them."""
    checkpoints = sorted((output_dir / "checkpoints").glob("*.ckpt"),
                         key=lambda p: (p.name != "last.ckpt", -p.stat().st_mtime))
    for path in checkpoints:
        try:
            record = RunRecord.read(path)
        except Exception:  # a truncated or foreign file: try the next
            continue
        if record is None:
            continue
        OmegaConf.save(OmegaConf.create(record["config"]), output_dir / ".hydra" / "config.yaml")
        if record["overrides"] is not None:
            save_run_overrides(record["overrides"], output_dir)
        log.info("Put back the run's own .hydra/config.yaml and overrides.yaml (recorded in %s).", path)
        return


def composing_options(hydra_cfg: DictConfig | None) -> list[str]:
    """What of a run's command line, besides its overrides, its config was composed with, as
    words of a command: `--config-path` (another primary config folder), `--config-name`
    (another primary config than train.yaml), `--config-dir` (a folder of config groups of the
    user's own, README "Components of your own") and `hydra.searchpath=...`. A resume without
    them would not compose. `hydra_cfg`: the run's Hydra config (`HydraConfig.get()`, or the
    `hydra` node of a sweep's multirun.yaml); None (a run composed by a script) gives none."""
    if hydra_cfg is None:
        return []
    words = []
    for source in OmegaConf.select(hydra_cfg, "runtime.config_sources", default=None) or []:
        file = source.schema == "file"
        where = source.path if file else f"{source.schema}://{source.path}"
        if source.provider == "main" and not (file and Path(source.path).resolve() == CONFIG_DIR):
            words += ["--config-path", where]
        elif source.provider == "command-line":  # Hydra's own name for the --config-dir folder
            words += ["--config-dir", where]
    name = OmegaConf.select(hydra_cfg, "job.config_name", default=None)
    if name is not None and name != CONFIG_NAME:
        words += ["--config-name", str(name)]
    return words + [str(o) for o in OmegaConf.select(hydra_cfg, "overrides.hydra", default=None) or []
                    if str(o).lstrip("+~").startswith("hydra.searchpath=")]


def pythonpath_hint() -> str:
    """A line to give with a resume command when this process imported a module from a folder
    of `PYTHONPATH` (classes of a user's own that the config names by `_target_`): the resume
    must find them again. "" otherwise."""
    value = os.environ.get("PYTHONPATH", "")
    folders = [Path(p).resolve() for p in value.split(os.pathsep) if p]
    if not folders:
        return ""
    found = sorted({name.partition(".")[0] for name, module in list(sys.modules.items())
                    if isinstance(getattr(module, "__file__", None), str)
                    and any(Path(module.__file__).resolve().is_relative_to(f) for f in folders)})
    if not found:
        return ""
    return (f"\n(with PYTHONPATH={shlex.quote(value)} set again: this run imported "
            f"{', '.join(found)} from there)")


def data_folder_hint() -> str:
    """A line to give with a resume command when the environment placed this run's data
    (`FEWZERO_DATA`, or `FEWZERO_ROOT`, configs/paths/default.yaml): a resume in a shell without
    it reads them elsewhere, rendering rendered SOL anew under ./data (with whatever FluidSynth
    is there) or failing to find TinySOL. "" otherwise."""
    given = [f"{name}={shlex.quote(os.environ[name])}" for name in ("FEWZERO_DATA", "FEWZERO_ROOT")
             if os.environ.get(name)]
    return (f"\n(with {' '.join(given)} set again: this run found its data through "
            f"{'it' if len(given) == 1 else 'them'})" if given else "")


# the folders a run's data are read from, which its saved config leaves unresolved
# (configs/paths/default.yaml): they follow FEWZERO_DATA, FEWZERO_ROOT and the working directory
DATA_FOLDER_KEYS = ("paths.data_dir", "paths.cache_dir")


def data_folders(cfg: DictConfig) -> dict[str, str]:
    """DATA_FOLDER_KEYS resolved as this process resolves them, as absolute paths (`RunRecord`
    records a run's in its checkpoints)."""
    values = {key: OmegaConf.select(cfg, key, default=None) for key in DATA_FOLDER_KEYS}
    return {key: os.path.abspath(os.path.expanduser(str(value)))
            for key, value in values.items() if value is not None}


def warn_of_other_data_folders(cfg: DictConfig, ckpt_path: str, recorded: dict[str, Any] | None) -> None:
    """Warn when this command (a resume, or a test of a checkpoint: `fewzero.eval`) reads its
    data from other folders than the run of `ckpt_path` read, as its `RunRecord`, `recorded`,
    says (nothing to compare for a checkpoint written before 2026-12-06): a shell without the
    run's FEWZERO_DATA, or another working directory. Not refused: the data are found by what
    they hold (a render's folder and every cache are named by their settings), so a folder they
    were moved to holds the same; any other is rendered or cached anew, or lacks them."""
    then = (recorded or {}).get("data_folders") or {}
    now = data_folders(cfg)
    moved = [key for key in now if key in then and Path(then[key]).resolve() != Path(now[key]).resolve()]
    if not moved:
        return
    unresolved = OmegaConf.to_container(cfg.paths).get("data_dir") if "paths" in cfg else None
    by_variable = "paths.data_dir" in moved and "env_path:FEWZERO_DATA" in str(unresolved)
    log.warning(
        "The run of %s read its data from other folders than this command reads:\n%s\n"
        "They are found by what they hold, so a folder they were moved to gives the same "
        "figures; any other has them rendered or cached anew (rendered SOL: by this machine's "
        "FluidSynth, whose audio may differ from the run's render) or lacks them (TinySOL). To "
        "read the run's own folders, %s.", ckpt_path,
        "\n".join(f"  {key}: {then[key]} in the run, {now[key]} now" for key in moved),
        (f"set FEWZERO_DATA={shlex.quote(then['paths.data_dir'])}, or add " if by_variable
         else "add ") + " ".join(shlex.quote(f"{key}={hydra_quoted(then[key])}") for key in moved))


def resume_command(overrides: list[str] | None, output_dir: Path, ckpt_path: str = "last",
                   options: Sequence[str] = ()) -> str:
    """The shell command that resumes the run in `output_dir` from `ckpt_path`: its overrides
    without `hparams_search` (which would start a new sweep, and changes no training setting),
    after `options`, those its config was composed with besides (`composing_options`)."""
    given = ([o for o in overrides if not o.lstrip("+~").startswith("hparams_search=")]
             if overrides is not None else None)
    words = [shlex.quote(interpreter()), "-m", "fewzero.train", *map(shlex.quote, options),
             *(shlex.quote(o) for o in given or []),
             shlex.quote(f"ckpt_path={hydra_quoted(ckpt_path)}"),
             shlex.quote(f"hydra.run.dir={hydra_quoted(str(output_dir))}")]
    if given is None:
        words.insert(3 + len(options), "<the run's overrides>")
    return " ".join(words)


def sweep_resume_command(sweep_dir: Path) -> str | None:
    """The shell command that finishes the multirun in `sweep_dir` (from its multirun.yaml): its
    command-line overrides (the launcher's included) and the options its config was composed
    with (`composing_options`), with `ckpt_path=auto` in the same sweep
    directory, so each job finds its own run directory: stopped jobs resume from last.ckpt,
    finished ones keep their results (`finished_report`), the others start. None for a sweep
    other than Hydra's basic one (an Optuna study is resumed by its own command) or without
    multirun.yaml."""
    recorded = sweep_dir / "multirun.yaml"
    if not recorded.is_file():
        return None
    hydra_cfg = OmegaConf.load(recorded).hydra
    if not str(OmegaConf.select(hydra_cfg, "sweeper._target_", default="")).endswith("BasicSweeper"):
        return None
    # Hydra records -m as hydra.mode=MULTIRUN; the sweep directory and ckpt_path are set anew
    # (and hydra.searchpath comes with the options)
    replaced = ("hydra.mode=", "hydra.sweep.dir=", "ckpt_path=", "hydra.searchpath=")
    given = [str(o) for o in [*hydra_cfg.overrides.hydra, *hydra_cfg.overrides.task]
             if not str(o).lstrip("+~").startswith(replaced)]
    words = [shlex.quote(interpreter()), "-m", "fewzero.train", "-m",
             *map(shlex.quote, [*composing_options(hydra_cfg), *given]),
             "ckpt_path=auto", shlex.quote(f"hydra.sweep.dir={hydra_quoted(str(sweep_dir))}")]
    return " ".join(words)


def check_resume(cfg: DictConfig, ckpt_path: str, output_dir: Path) -> dict[str, Any] | None:
    """Refuse to resume `ckpt_path` with training settings (TRAINING_KEYS) other than those it
    was trained with, as recorded in it by `fewzero.callbacks.RunRecord`. (`train` then puts
    the run's own config and overrides back: `restore_run_files`.) Returns that record (None
    for a checkpoint written before fewzero recorded it), so that it is read once."""
    record = RunRecord.read(ckpt_path)
    if record is None:
        log.warning("%s records no config (written before fewzero recorded it): resuming without "
                    "checking that these are the run's own settings.", ckpt_path)
        return None
    options = composing_options(HydraConfig.get() if HydraConfig.initialized() else None)
    changed = course_changes(record["config"], cfg)
    if not changed:
        return record
    differences = "\n".join(f"  {change}" for change in changed)
    raise ValueError(
        f"ckpt_path={ckpt_path} was trained with other settings than this command gives:\n"
        f"{differences}\nA resume continues the same run, so it needs the run's own settings:\n"
        f"  {resume_command(record['overrides'], output_dir, str(cfg.ckpt_path), options)}\n"
        "To train with other settings, start a new run.")


# trainer.precision values that keep every weight and buffer in 16 bits (Lightning's "true" half
# precisions); "16-mixed" and "bf16-mixed" train under autocast with float32 weights
HALF_WEIGHT_PRECISIONS = ("16-true", "bf16-true", "transformer-engine", "transformer-engine-float16")


def check_trainer_settings(cfg: DictConfig) -> None:
    """Refuse, before anything is built, Lightning trainer settings that fewzero's training and
    evaluation cannot honour, naming the settings that do what was asked:

    - a `trainer.precision` with 16-bit weights: the few-shot distance (torch.cdist) has no
      16-bit CPU kernel, the calibration penalty and prior weights that validation chose are
      rounded in 16-bit buffers before the test, and 16-true trains into NaN without a gradient
      scaler. (bf16-mixed and 16-mixed work: autocast with float32 weights.)
    - `limit_val_batches`, `limit_test_batches` other than all or none: every evaluation score
      is over all of the stage's clips (few-shot episodes read unembedded clips as zeros).
    - `trainer.overfit_batches`: the training stream never repeats a batch, and validation
      would be limited.
    - `trainer.enable_checkpointing=false`: the validation-selected checkpoint is what the test
      scores and the zero-shot refit starts from.
    - `trainer.accumulate_grad_batches` above 1: the seeded training stream, the epochs, exact
      resumes and the refit's length count one episode or batch per process per optimiser step;
      with k batches a step every epoch replayed (k - 1) / k of the episodes the one before read.
    """
    trainer = cfg.get("trainer") or {}
    precision = str(trainer.get("precision", "32-true"))
    if precision in HALF_WEIGHT_PRECISIONS:
        raise ValueError(
            f"trainer.precision={precision} keeps every weight and buffer in 16 bits: the few-shot "
            "distance (torch.cdist) has no 16-bit kernel on the CPU, the calibration penalty and "
            "the pitch prior's weights that validation chose would be rounded before the test, and "
            "16-true training overflows into NaN without a gradient scaler. Use "
            "trainer.precision=bf16-mixed (autocast with float32 weights; 16-mixed on a GPU), or "
            "32-true (the default) or 64-true.")
    for stage, clips in (("val", "validation"), ("test", "test")):
        limit = trainer.get(f"limit_{stage}_batches")
        if limit is None or limit == 0 or isinstance(limit, float) and limit == 1.0:
            continue
        raise ValueError(
            f"trainer.limit_{stage}_batches={limit} would embed only part of the {clips} clips, and "
            f"every {clips} score is over all of them: few-shot episodes draw from every clip (the "
            "ones left out would count as zero vectors), and zero-shot figures would cover the first "
            "batches' classes only while metrics.json gave the full clip counts. Each clip is embedded "
            f"once, so a limit saves little: leave trainer.limit_{stage}_batches unset (or 1.0; 0 skips "
            f"the {'validation' if stage == 'val' else 'test'}), and for a shorter few-shot "
            f"evaluation lower dataset.episodes.{stage}"
            + (".n_episodes." if stage == "val" else "[*].n_episodes (or run with test=false)."))
    overfit = trainer.get("overfit_batches", 0)
    if overfit:
        raise ValueError(
            f"trainer.overfit_batches={overfit}: Lightning repeats the first training batches every "
            "epoch for it, and fewzero's seeded training stream never repeats one (each epoch reads "
            "on where the last stopped), while the limit it puts on validation would leave most "
            "validation clips unembedded. Leave it unset; for a quick check of a config or an "
            "install run with debug=fast.")
    if trainer.get("enable_checkpointing", True) is False:
        raise ValueError(
            "trainer.enable_checkpointing=false: fewzero's checkpoints choose the model the test "
            "scores (callbacks.model_checkpoint keeps the validation-selected one, which the "
            "zero-shot refit also needs) and let a stopped run resume (callbacks.last_checkpoint). "
            "Leave trainer.enable_checkpointing unset; to write no resume checkpoint, set "
            "callbacks.last_checkpoint=null.")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if accumulate != 1:
        raise ValueError(
            f"trainer.accumulate_grad_batches={accumulate}: fewzero trains on one episode (few-shot) "
            "or one batch (zero-shot) per process per optimiser step; its seeded training stream, "
            "its epochs, exact resumes and the zero-shot refit's length count on that, and with "
            f"{accumulate} batches a step every epoch would read again {accumulate - 1} in "
            f"{accumulate} of the episodes the one before read. Leave it at 1; for more examples "
            "per step raise dataset.episodes.train.n_way or n_query (few-shot) or "
            "dataset.batch_size (zero-shot), or train on more processes (trainer=ddp "
            "trainer.devices=<n>).")


def is_seed(value: object) -> bool:
    """Whether `value` is a seed every generator of a run takes: a whole number in [0, 2**32 - 1]
    (Lightning's and numpy's range)."""
    return not isinstance(value, bool) and isinstance(value, int) and 0 <= value < 2**32


def check_seed(cfg: DictConfig) -> None:
    """Refuse, before anything is built, a `seed` that is not a whole number in [0, 2**32 - 1]:
    the training episodes or batches, excerpt offsets and every step's random draws are drawn
    from it (null failed in the episode sampler, "abc" and -1 in Lightning's or numpy's seeding,
    each with a traceback)."""
    seed = cfg.get("seed")
    if not is_seed(seed):
        raise ValueError(
            f"seed={seed!r}: every run is seeded (its training episodes or batches, excerpt offsets "
            "and each step's dropout and augmentation draws come from the seed, so that a run "
            "repeats and resumes exactly), and it must be a whole number from 0 to 4294967295. Set "
            "seed=<such a number>; for runs over several seeds, -m seed=0,1,2.")


def _built(node: Any, key: str, **arguments: Any) -> Any:
    """The partial at config key `key` (`model.optimizer`, `model.scheduler`) called with
    `arguments`; a ValueError naming the key and the class for what the class refuses."""
    if not node.get("_partial_", False):
        raise ValueError(f"{key} ({node.get('_target_')}) needs _partial_: true: fewzero builds it "
                         f"itself, given the {' and '.join(arguments)}. Add +{key}._partial_=true.")
    try:
        return hydra.utils.instantiate(node)(**arguments)
    except Exception as error:  # what the class said of its settings (torch: "Invalid ...")
        while type(error).__module__.startswith(("omegaconf.", "hydra.")) and error.__cause__:
            error = error.__cause__  # type: ignore[assignment]
        raise ValueError(
            f"{key} ({node.get('_target_')}) cannot be built with its settings: {error}. Set the "
            f"{key}.* key it names to a value the class takes (a learning rate or weight decay "
            f"below 0 is refused by torch; {key}.<key> for a key the config has, +{key}.<key> "
            "for one it lacks, ~ to remove one).") from error


def optimises_nothing(model: pl.LightningModule) -> bool:
    """Whether `model` gives its optimizer no parameter (`ResumableModule.optimised_parameters`: a
    closed-form head on a frozen encoder, ESZSL or SAE), so that its fits take no gradient step."""
    return isinstance(model, ResumableModule) and not model.optimised_parameters()


def _stand_in_optimisation(cfg: DictConfig) -> tuple[torch.optim.Optimizer, Any]:
    """`model.optimizer` built on one stand-in parameter, and `model.scheduler` on it (None
    without one): what the run's would do, step by step."""
    model = cfg.model
    optimizer = _built(model.optimizer, "model.optimizer", params=[torch.nn.Parameter(torch.zeros(1))])
    if not model.get("scheduler"):
        return optimizer, None
    return optimizer, _built(model.scheduler, "model.scheduler", optimizer=optimizer)


def warn_of_a_learning_rate_of_zero(model: pl.LightningModule, cfg: DictConfig) -> None:
    """Warn (once, as the run's model is built) when the model has parameters to optimise and the
    learning rate is 0 from the first step on (`model.optimizer.lr=0`, with no schedule that
    raises it): nothing learns, and the run's figures are those of its initial weights (BatchNorm
    statistics and fitted whitening aside), reported as if trained. Not refused: an untrained
    encoder is a baseline a study may want. Closed-form heads on a frozen encoder (ESZSL, SAE)
    optimise nothing, so their optimizer settings go unused and unchecked."""
    if (not cfg.get("train", True) or not (cfg.get("model") or {}).get("optimizer")
            or not isinstance(model, ResumableModule) or optimises_nothing(model)):
        return
    optimizer, scheduler = _stand_in_optimisation(cfg)
    rates = [group["lr"] for group in optimizer.param_groups] + [getattr(scheduler, "eta_min", 0)]
    if not any(rates):
        log.warning("model.optimizer.lr=%s: the learning rate is 0, so training changes no weight "
                    "(BatchNorm statistics aside) and validation and test score the initial, random "
                    "ones. Set model.optimizer.lr above 0 (the configs' 0.001), unless an untrained "
                    "model is what this run is for.", cfg.model.optimizer.get("lr"))


def check_optimisation_settings(cfg: DictConfig, steps: int | None = None, counted: str = "") -> None:
    """Refuse, before anything is built, an optimizer or learning-rate schedule the training
    cannot run as asked, by building both on one stand-in parameter:

    - settings their class refuses (a negative learning rate, a key it does not take, a missing
      one): torch's own error came with a traceback once the fit had started, not naming the key;
    - `ReduceLROnPlateau`: the schedule is stepped every optimiser step, and no metric exists
      at every step (validation scores come once an epoch);
    - a schedule whose length in steps (`T_max`, `total_steps`) is not positive, or shorter
      than the run: than `trainer.max_steps`, or `steps` where given (the most optimiser steps
      one of the run's fits takes, `counted` saying how: `ScheduleLengthCheck` gives them once
      the epochs' length is known, for fits counted in epochs). The cosine schedule climbs back
      to the full learning rate after `T_max` steps (a restart nobody asked for), and OneCycleLR
      stops the run with an error at its step `total_steps` + 1.

    Only for a run that trains (`train=true`); models without `optimizer` go unchecked."""
    model = cfg.get("model") or {}
    if not cfg.get("train", True) or not model.get("optimizer"):
        return
    _, scheduler = _stand_in_optimisation(cfg)
    if scheduler is None:
        return
    name = model.scheduler.get("_target_")
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError(
            f"model.scheduler ({name}) waits on a metric, and fewzero steps the schedule after every "
            "optimiser step, where no validation score exists (validation follows each epoch). Use a "
            "schedule by steps (torch.optim.lr_scheduler.StepLR with +model.scheduler.step_size="
            "<steps>, CosineAnnealingLR, the default, LinearLR, ...), or model.scheduler=null for a "
            "constant learning rate.")
    max_steps = cfg.trainer.get("max_steps", -1)
    if steps is None and max_steps is not None and max_steps > 0:
        steps, counted = max_steps, f"trainer.max_steps={max_steps}"
    for key in ("T_max", "total_steps"):
        length = getattr(scheduler, key, None)  # the schedule's length in optimiser steps
        if length is None:
            continue
        if length <= 0:
            raise ValueError(
                f"model.scheduler.{key}={length}: the learning-rate schedule needs its length in "
                "optimiser steps, which the configs take from trainer.max_steps, and a run that trains "
                "by epochs (trainer.max_steps=-1 trainer.max_epochs=N) leaves it without one (with "
                "T_max=-1 the learning rate would be 0 on every other step). Set "
                f"model.scheduler.{key}=<the run's steps: max_epochs x the epoch's steps, "
                "dataset.episodes.train.n_episodes for few-shot, dataset.steps_per_epoch for "
                "zero-shot>, or model.scheduler=null for a constant learning rate, or train by "
                "steps with trainer.max_steps.")
        if steps is not None and length < steps:
            then = ("climbs back up towards the full learning rate (a warm restart, which "
                    "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts gives on purpose)"
                    if key == "T_max" else "has no learning rate: torch stops the run with an error")
            fix = (f" (the configs' {key}: ${{trainer.max_steps}}) or more" if steps == max_steps
                   else " or more, or model.scheduler=null for a constant learning rate")
            raise ValueError(
                f"model.scheduler.{key}={length} is shorter than the run ({counted}), and after step "
                f"{length} the schedule ({name}) {then}. Set model.scheduler.{key}={steps}{fix}.")


def epoch_counted_steps(trainer: pl.Trainer) -> tuple[int, str] | None:
    """The most optimiser steps one fit of the run takes, and how they are counted, where epochs
    count them: the fit's own (trainer.max_steps=-1, max_epochs=N) and a refit on trainval that
    repeats the selected number of epochs on more data (xlsa17: `refit_length` "epochs"), up to
    as many epochs as this fit has. None where trainer.max_steps bounds every fit (checked before
    anything was built), in a fast_dev_run, or where the epoch's length is unknown."""
    epoch, datamodule = steps_per_epoch(trainer), trainer.datamodule
    refits_by_epochs = (getattr(datamodule, "refit_on_trainval", False)
                        and hasattr(datamodule, "for_trainval")
                        and getattr(datamodule, "refit_length", "epochs") == "epochs")
    if not epoch or trainer.fast_dev_run or trainer.max_steps > 0 and not refits_by_epochs:
        return None
    bounds = []
    if trainer.max_steps > 0:
        bounds.append((trainer.max_steps, f"trainer.max_steps={trainer.max_steps}"))
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        bounds.append((trainer.max_epochs * epoch,
                       f"trainer.max_epochs={trainer.max_epochs} epochs of {epoch} steps"))
    if not bounds:
        return None
    steps, counted = min(bounds)
    if refits_by_epochs:
        epochs, refit_epoch = math.ceil(steps / epoch), len(datamodule.for_trainval().train_dataloader())
        if epochs * refit_epoch > steps:
            steps, counted = epochs * refit_epoch, (f"{counted}, and the refit on trainval, which repeats "
                                                    f"up to {epochs} epochs of {refit_epoch} steps")
    return steps, counted


class ScheduleLengthCheck(pl.Callback):
    """As the run's fit starts (its epochs' length known, no step taken), refuse a learning-rate
    schedule shorter than fits counted in epochs (`epoch_counted_steps`), as
    `check_optimisation_settings` refuses one shorter than trainer.max_steps before anything is
    built: with xlsa17's epochs, a cosine schedule climbed back to the full rate in the fit or
    in the longer refit on trainval."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counted = epoch_counted_steps(trainer)
        if counted is not None:
            check_optimisation_settings(self.cfg, *counted)


def check_accelerator(cfg: DictConfig) -> None:
    """Refuse a GPU trainer (`trainer=gpu`) where torch sees no GPU, naming the fix: Lightning's
    own error ("No supported gpu backend found!") names none."""
    from pytorch_lightning.accelerators import CUDAAccelerator, MPSAccelerator

    # (imported here: a submitit launcher pickles this module's functions, and a reference to
    # torch.backends, which is not a plain module, cannot be pickled)
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    found = {"cuda": CUDAAccelerator.is_available(), "mps": MPSAccelerator.is_available()}
    if accelerator in found and not found[accelerator] or accelerator == "gpu" and not any(found.values()):
        raise ValueError(
            f"trainer.accelerator={accelerator} needs a GPU, and torch sees none on this machine "
            "(torch.cuda.is_available() is False: no NVIDIA GPU, or no driver for it; nvidia-smi "
            "tells which). Run on the CPU with trainer=cpu, or with the default trainer "
            "(trainer.accelerator=auto takes a GPU where there is one). To re-evaluate a GPU "
            "run's checkpoint here, add trainer.accelerator=cpu.")


def give_example_input(model: pl.LightningModule, datamodule: Any) -> None:
    """A zero excerpt of the datamodule's shape as the model's `example_input_array`, (1, n_mels,
    frames), for modules whose forward embeds audio: Lightning's model summary then counts the
    audio encoder's FLOPs per excerpt ("Total FLOPs: 0" without it) and its in/out sizes."""
    features, frames = getattr(datamodule, "features", None), getattr(datamodule, "excerpt_frames", None)
    if isinstance(model, ResumableModule) and hasattr(features, "n_mels") and frames:
        model.example_input_array = torch.zeros(1, features.n_mels, frames)


def check_augment_fits(model: pl.LightningModule, cfg: DictConfig) -> None:
    """Refuse, before any data are rendered or cached, a `model.augment` shift or mask width that
    is not below its axis in the datamodule's excerpts (the example excerpt of
    `give_example_input`): the augmentation's own check (`LogMelAugment.check_fits`) came at the
    first training batch, after the data were prepared. Only for a run that trains."""
    augment, example = getattr(model, "augment", None), getattr(model, "example_input_array", None)
    if cfg.get("train", True) and hasattr(augment, "check_fits") and isinstance(example, torch.Tensor):
        augment.check_fits(*example.shape[1:])


def import_problem(target: str) -> str | None:
    """Why the dotted path `target` (a `_target_`) cannot be imported, or None when it can. A
    module that is found but fails to import (a package it imports is missing, a bug in it)
    raises its own error, with its traceback."""
    parts = target.split(".")
    found, name = None, ""
    for part in parts:
        if found is not None and hasattr(found, part):
            found, name = getattr(found, part), f"{name}.{part}"
            continue
        module = f"{name}.{part}" if name else part
        try:
            found, name = importlib.import_module(module), module
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
            if found is None:
                return f"no module named {part!r} is on the Python path"
            close = difflib.get_close_matches(part, [n for n in dir(found) if not n.startswith("__")])
            return f"{name} has no {part!r}" + (f" (close: {', '.join(close)})" if close else "")
    return None


def check_targets_import(cfg: DictConfig) -> None:
    """Refuse, before anything is built, a `_target_` that cannot be imported (a class of the
    user's own whose folder is not on PYTHONPATH, a misspelt module or class): Hydra's "Error
    locating target" said neither why nor what to do."""
    config = OmegaConf.to_container(cfg, resolve=False)
    for key, value in flatten_config(config).items():
        if not (key == "_target_" or key.endswith("._target_")) or not isinstance(value, str) \
                or "${" in value:
            continue
        problem = import_problem(value)
        if problem is not None:
            raise ValueError(
                f"{key}={value} cannot be imported: {problem}. Check the spelling of the module and "
                "the class; a module of your own is found through PYTHONPATH: run with the folder "
                "that holds it there (PYTHONPATH=/path/to/folder .venv/bin/python -m fewzero.train "
                "..., and the same for fewzero.eval and resumes).")


BACKBONE_SIZE = "${model.backbone.embedding_dim}"


def backbone_size_readers(cfg: DictConfig) -> list[str]:
    """The model settings sized by the backbone's `embedding_dim` (`${model.backbone.embedding_dim}`
    in their value: the whitening, a zero-shot head, the pitch prior), by full key."""
    model = OmegaConf.to_container(cfg.get("model") or DictConfig({}), resolve=False)
    return [key for key, value in flatten_config(model, "model").items()
            if isinstance(value, str) and BACKBONE_SIZE in value]


def check_backbone_declares_its_size(cfg: DictConfig) -> None:
    """Refuse, before anything is built, a `model.backbone` config without `embedding_dim` (the
    size of the embeddings it returns) when other model settings read it: OmegaConf's
    "Interpolation key 'model.backbone.embedding_dim' not found" named neither reader nor fix."""
    backbone = (cfg.get("model") or {}).get("backbone")
    if not backbone or "embedding_dim" in backbone:
        return
    readers = backbone_size_readers(cfg)
    if readers:
        raise ValueError(
            f"model.backbone ({backbone.get('_target_')}) has no embedding_dim, the size of the "
            f"(batch, embedding_dim) embeddings it returns, which {readers} read as "
            f"{BACKBONE_SIZE}. Add embedding_dim: <its output size> to the backbone's config and "
            "take it as an argument of its class, as fewzero's backbones do; or, where the class "
            "names the size otherwise (out_dim, say), set those keys to it: "
            + " ".join(f"'{key}=${{model.backbone.out_dim}}'" for key in readers) + ".")


def check_audio_encoder_output(model: pl.LightningModule, cfg: DictConfig) -> None:
    """Run the audio encoder once on the example excerpt (`give_example_input`) and refuse an
    output that is not (1, embedding_dim), before any training: a backbone of a user's own that
    returned (batch, dim, 1), or another size than its config's `embedding_dim`, trained a whole
    epoch and then failed in a shape error. In eval mode and without gradient (as Lightning's
    model summary runs it): no statistic, weight or random number changes."""
    example = getattr(model, "example_input_array", None)
    if not isinstance(model, ResumableModule) or not isinstance(example, torch.Tensor):
        return
    encoder = model.audio_encoder()
    training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            output = encoder(example)
    finally:
        encoder.train(training)
    backbone = (cfg.get("model") or {}).get("backbone") or {}
    name = backbone.get("_target_", type(encoder).__name__)
    size = backbone.get("embedding_dim", getattr(encoder, "embedding_dim", None))
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if not isinstance(output, torch.Tensor) or output.ndim != 2 or len(output) != 1:
        raise ValueError(
            f"model.backbone ({name}) must return one tensor of (batch, embedding_dim) embeddings; "
            f"for one excerpt of shape {tuple(example.shape)} it returned {shape}. End its forward "
            "with a (batch, embedding_dim) tensor (e.g. x.flatten(1) for (batch, dim, 1)).")
    if size is not None and output.shape[1] != size:
        readers = backbone_size_readers(cfg)
        raise ValueError(
            f"model.backbone ({name}) returns {output.shape[1]}-d embeddings, but its config says "
            f"embedding_dim={size}" + (f", which sizes {readers}" if readers else "")
            + f". Set model.backbone.embedding_dim={output.shape[1]} (in its config), or make the "
            f"backbone return {size} values per excerpt.")


def check_side_info_is_read(cfg: DictConfig) -> None:
    """Refuse a side_info that no other part of the config interpolates (a few-shot model
    learns from audio alone): changing it would silently change nothing."""
    side_info = cfg.get("side_info")
    if not side_info or "_target_" not in side_info:
        return
    rest = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "side_info"}
    if "${side_info" not in json.dumps(rest):
        raise ValueError(
            f"side_info ({side_info._target_}) is composed, but nothing in this run reads it: "
            f"{cfg.model._target_} learns from audio alone. Remove side_info=... from the command, "
            "or run a zero-shot experiment (experiment=zsl_word_audio, zsl_text_audio, "
            "zsl_attribute_audio or zsl_image_audio).")


# per-class settings (the source's instrument list, the attribute table, descriptions, image
# files): one entry each in the HPARAMS tab, "<n> entries", not one per class and field
PER_CLASS_KEYS = ("instruments", "table", "words", "descriptions", "files", "folders")


def _summarised(node: Any, path: str, seen: dict[str, str]) -> Any:
    """`node` for the HPARAMS tab: a PER_CLASS_KEYS entry as its number of entries, and a
    subtree equal to one met before (`seen`: its JSON -> path) as "same as <that path>": the
    model's ${loss} and ${side_info}, the formant likelihood's ${dataset.features}."""
    if path.rsplit("/", 1)[-1] in PER_CLASS_KEYS and isinstance(node, dict | list):
        return f"{len(node)} entries"
    if not isinstance(node, dict) or not node:
        return node
    key = json.dumps(node, sort_keys=True, default=str)
    if key in seen:
        return f"same as {seen[key]}"
    seen[key] = path
    return {name: _summarised(value, f"{path}/{name}", seen) for name, value in node.items()}


def _flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """Config flattened to `a/b/c: value` scalars for TensorBoard's HPARAMS tab (per-class
    settings and repeated subtrees summarised: `_summarised`)."""
    flat: dict[str, Any] = {}
    container = OmegaConf.to_container(cfg, resolve=True)
    seen: dict[str, str] = {}
    for group in ("dataset", "trainer", "loss", "side_info", "model"):  # the model's copies last
        node = _summarised(container.get(group, {}), group, seen)
        for key, value in flatten_config(node, group, sep="/").items():
            flat[key] = "null" if value is None else value if isinstance(value, bool | int | float | str) \
                else str(value)
    flat["seed"] = cfg.get("seed")
    flat["tags"] = ",".join(str(t) for t in cfg.get("tags") or [])
    return flat


def log_final_hparams(pl_logger: Any, flat: dict[str, Any], metrics: dict[str, float]) -> None:
    """The run's config and final metrics for TensorBoard's HPARAMS tab, and hparams.yaml.

    Lightning's `log_hyperparams(params, metrics)` also writes every final metric as a scalar at
    step 0: a false first point, at the final value, on every validation and test curve. The
    HPARAMS tab shows each metric's last logged scalar, which the run has logged already, so for
    TensorBoard only the tab's summaries are written. Other loggers get Lightning's call."""
    if not isinstance(pl_logger, TensorBoardLogger):
        pl_logger.log_hyperparams(flat, metrics=metrics)
        pl_logger.save()
        return
    experiment, start, end = tensorboard_hparams(flat, metrics)
    writer = pl_logger.experiment._get_file_writer()
    for summary in (experiment, start, end):
        writer.add_summary(summary)
    pl_logger.hparams.update(flat)
    save_hparams_to_yaml(Path(pl_logger.log_dir) / TensorBoardLogger.NAME_HPARAMS_FILE, pl_logger.hparams)
    pl_logger.save()


def _dataset_name(cfg: DictConfig, datamodule: Any) -> str:
    """The audio source's class name, or the datamodule's own name (e.g. "xlsa17 AWA2")."""
    if "source" in cfg.dataset:
        return cfg.dataset.source._target_.rsplit(".", 1)[-1]
    return getattr(datamodule, "dataset_name", cfg.dataset._target_.rsplit(".", 1)[-1])


def _metric(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def shows_progress_bar(cfg: DictConfig) -> bool:
    """False with `trainer.enable_progress_bar=false`, which switches `callbacks.progress_bar` off
    too: Lightning refused the two together ("found `EpochProgressBar` in callbacks list")."""
    return (cfg.get("trainer") or {}).get("enable_progress_bar", True) is not False


def selecting_callback(trainer: pl.Trainer) -> pl.callbacks.ModelCheckpoint | None:
    """The callback that keeps the validation-selected checkpoint: the first `ModelCheckpoint`
    that monitors a metric (`callbacks.model_checkpoint`), or None. Lightning's
    `trainer.checkpoint_callback` is the first of any kind: with callbacks.model_checkpoint=null
    that is `LastCheckpoint`, which monitors nothing and calls last.ckpt its best."""
    return next((c for c in trainer.checkpoint_callbacks if c.monitor is not None), None)


def selected_checkpoint_path(trainer: pl.Trainer) -> str:
    """Path of the validation-selected checkpoint, "" when none was kept."""
    selector = selecting_callback(trainer)
    return selector.best_model_path if selector is not None else ""


def _selected_checkpoint(trainer: pl.Trainer) -> tuple[str, int, int, dict[str, torch.Tensor]]:
    """(path, epochs, steps, state dict) of the validation-selected checkpoint. A `fast_dev_run`
    saves none: its current weights stand in for the selected ones (path "")."""
    selected_path = selected_checkpoint_path(trainer)
    if selected_path:
        selected = torch.load(selected_path, map_location="cpu", weights_only=False)
        return selected_path, int(selected["epoch"]) + 1, int(selected["global_step"]), selected["state_dict"]
    if trainer.fast_dev_run:
        return "", max(1, trainer.current_epoch), trainer.global_step, trainer.lightning_module.state_dict()
    first_validation = trainer.num_training_batches * (trainer.check_val_every_n_epoch or 1)
    if selecting_callback(trainer) is not None and trainer.global_step < first_validation:
        raise RuntimeError(
            f"Refitting on trainval needs the validation-selected checkpoint, and no validation "
            f"ran: training stopped after {trainer.global_step} steps (trainer.max_steps="
            f"{trainer.max_steps}), before the first validation at step {first_validation} (the "
            f"end of an epoch of {trainer.num_training_batches} batches). Set trainer.max_steps to "
            f"at least {first_validation}, or validate sooner with a shorter epoch "
            "(dataset.steps_per_epoch for zero-shot datasets).")
    if selecting_callback(trainer) is None:
        raise RuntimeError("Refitting on trainval needs the validation-selected checkpoint, and "
                           "callbacks.model_checkpoint, which keeps it, is off. Leave it on, or set "
                           "dataset.refit_on_trainval=false to test the trained weights themselves.")
    raise RuntimeError("Refitting on trainval needs the validation-selected checkpoint; none was "
                       "saved.")


def resumable_fit(cfg: DictConfig, model: pl.LightningModule, datamodule: Any, output_dir: Path,
                  name: str, key: dict[str, Any], callbacks: Sequence[pl.Callback] = (),
                  done: Path | None = None, **trainer_settings: Any) -> pl.Trainer:
    """Fit `model` with the run's trainer config (no logger, no validation-selected checkpoint)
    for the fits that follow the main one: class cross-validation's folds and the refit.

    Like the main fit, it keeps `checkpoints/<name>.ckpt` (every
    `callbacks.last_checkpoint.every_n_train_steps` steps, at every epoch's end and on SIGTERM
    or Ctrl-C, with `callbacks.stop_on_interrupt`), and a later attempt with the same `key`
    (what the fit depends on) resumes from it, or from `done` (the finished fit's own checkpoint,
    when it exists with that key), ending where the uninterrupted fit would have: these fits
    are seeded once, so `RngAtFirstBatch` carries the RNG across a mid-epoch resume. A checkpoint
    left by another key is ignored and overwritten.
    """
    checkpoints = output_dir / "checkpoints"
    progress = checkpoints / f"{name}.ckpt"
    resume = None
    for path in (done, progress):
        if path is not None and path.is_file():
            try:
                saved = FitKey.read(path)
            except Exception:  # a file cut short by a kill: train afresh
                saved = None
            if saved is not None and config_hash(saved) == config_hash(key):  # NaN == NaN here
                resume = str(path)
                break
    if resume:
        log.info("%s: resuming from %s", name, resume)
    nodes = cfg.get("callbacks") or {}
    every = (nodes.get("last_checkpoint") or {}).get("every_n_train_steps", 0)
    own = [FitKey(key), RngAtFirstBatch()]
    keeps_progress = not (cfg.trainer.get("fast_dev_run") or trainer_settings.get("fast_dev_run"))
    if keeps_progress:
        own.append(LastCheckpoint(dirpath=str(checkpoints), every_n_train_steps=every, filename=name))
    if nodes.get("stop_on_interrupt"):  # Ctrl-C stops as SIGTERM does; main prints the command
        own.append(hydra.utils.instantiate(nodes.stop_on_interrupt))
    if nodes.get("progress_bar") and shows_progress_bar(cfg):
        own.append(hydra.utils.instantiate(nodes.progress_bar))  # else Lightning adds its own
    # the model's summary was printed by the main fit: the same network, trained again
    trainer_settings.setdefault("enable_model_summary", False)
    with follow_up_trainer():
        # without a checkpoint callback of ours, Lightning would add its own
        trainer = write_checkpoints_atomically(hydra.utils.instantiate(
            cfg.trainer, callbacks=[*callbacks, *own], logger=False,
            enable_checkpointing=keeps_progress, **trainer_settings))
        with without_optimiser_notes(optimises_nothing(model)):
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
    return trainer


def class_cross_validation(cfg: DictConfig, datamodule: Any, trainer: pl.Trainer, output_dir: Path,
                           selected: tuple[str, int, int, dict[str, torch.Tensor]]
                           ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Choose what the model cross-validates over classes (`model.class_cv`: the pitch prior's
    ZSL weight) on every pseudo-unseen fold of the split (`datamodule.class_cv_folds`).

    Fold 0 is the validation the selected checkpoint already had. For each further fold a model
    is trained from scratch like the validation-phase one (same configs and seed, that fold's
    pseudo-unseen classes held out) for as many steps as the selected checkpoint had, then
    validated once. The choice is the candidate with the best score averaged over the folds
    (`model.class_cv_choice`). Each fold's result is saved as `checkpoints/class_cv_fold<k>.pt`
    and reused when the run is resumed with the same folds, steps and `zsl_score`. A
    `fast_dev_run` skips the extra folds, and skips class cross-validation altogether (returning
    two empty dicts) when its single validation batch scored nothing.

    `selected` is `_selected_checkpoint(trainer)`. Returns (`calibration_state` entries for the
    refit to keep instead of the selected checkpoint's, a report for metrics.json).
    """
    _, _, steps, chosen = selected
    module = trainer.lightning_module
    folds = datamodule.class_cv_folds
    if len(folds) == 1:
        log.warning("Class cross-validation: dataset.split has no pseudo_unseen_folds, so fold 0 "
                    "(pseudo_unseen %s) alone chooses.", folds[0])
    if trainer.fast_dev_run:
        folds = folds[:1]
        if not module.has_class_cv_scores(chosen):  # its one validation batch lacks a role
            log.warning("fast_dev_run: its one validation batch did not score the prior's weights "
                        "(no pseudo-unseen or no held-out seen clip in it), so class cross-validation "
                        "is skipped and the ZSL weight stays as configured.")
            return {}, {}
        log.info("fast_dev_run: class cross-validation uses fold 0 only.")
    fold_scores = [module.class_cv_scores(chosen)]
    # what a fold's training depends on: a fold file of another config in the same run
    # directory (a resume with changed overrides) is trained again, not reused
    trained_by = config_hash(course_settings(cfg))
    for k, names in enumerate(folds[1:], start=1):
        path = output_dir / "checkpoints" / f"class_cv_fold{k}.pt"
        saved = torch.load(path, weights_only=False) if path.exists() else None
        if (saved is not None and saved["pseudo_unseen"] == names and saved["steps"] == steps
                and saved.get("score", "top1") == module.pitch_prior.zsl_score
                and saved.get("config") == trained_by):
            log.info("Class cross-validation fold %d (pseudo-unseen %s): reusing %s", k, names, path)
            fold_scores.append(saved["scores"])
            continue
        log.info("Class cross-validation fold %d (folds 1-%d are trained here; fold 0 is the run's own "
                 "validation): pseudo-unseen %s, %d steps", k, len(folds) - 1, names, steps)
        if cfg.get("seed") is not None:
            pl.seed_everything(cfg.seed, workers=True)
        fold_dm = datamodule.for_pseudo_unseen(names)
        model = hydra.utils.instantiate(cfg.model)
        fit = resumable_fit(cfg, model, fold_dm, output_dir, f"class_cv_fold{k}_progress",
                            {"pseudo_unseen": names, "steps": steps, "config": trained_by},
                            limit_val_batches=0, num_sanity_val_steps=0, max_epochs=-1, max_steps=steps)
        with follow_up_trainer():
            hydra.utils.instantiate(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False
                                    ).validate(model, datamodule=fold_dm, verbose=False)
        scores = model.class_cv_scores(model.state_dict()).cpu()
        if fit.is_global_zero:  # scores are gathered: equal on every rank
            path.parent.mkdir(parents=True, exist_ok=True)
            fold = {"pseudo_unseen": names, "steps": steps, "score": module.pitch_prior.zsl_score,
                    "config": trained_by, "scores": scores}
            # in one step: half a file (a kill, a full disk) would stop the resume that reads it
            replace_atomically(path, lambda tmp, fold=fold: torch.save(fold, tmp))
            (path.parent / f"class_cv_fold{k}_progress.ckpt").unlink(missing_ok=True)  # done
        fold_scores.append(scores)
    all_scores = torch.stack(fold_scores)  # (n_folds, n_candidates)
    weight, state = module.class_cv_choice(chosen, all_scores)
    report = {"folds": folds, "steps": steps, "candidates": module.pitch_prior.weight_candidates,
              "score": module.pitch_prior.zsl_score,
              "fold_scores": all_scores.tolist(), "mean_scores": all_scores.mean(dim=0).tolist(),
              "zsl_weight": weight, "chosen": {k: v.tolist() for k, v in state.items()}}
    report["undecided"] = all_tied(report["mean_scores"])  # nothing chosen: the a-priori weight stays
    if trainer.is_global_zero:
        module.plot_class_cv(all_scores, folds, weight, trainer.loggers, steps)
    log.info("Class cross-validation: mean %s %s for weights %s; %s", ZSL_SCORES[report["score"]],
             [round(v, 3) for v in report["mean_scores"]], report["candidates"], class_cv_outcome(report))
    return state, report


def refit_on_trainval(cfg: DictConfig, datamodule: Any, trainer: pl.Trainer, output_dir: Path,
                      selected: tuple[str, int, int, dict[str, torch.Tensor]],
                      chosen_elsewhere: dict[str, torch.Tensor] | None = None,
                      record: RunRecord | None = None
                      ) -> tuple[Any, pl.LightningModule, pl.Trainer, dict[str, Any]]:
    """Retrain from scratch on all training data (training + validation classes) for as long as
    the validation-selected checkpoint had trained, keeping its calibration penalty: the last
    step of Xian et al.'s protocol, for datamodules with `refit_on_trainval` and `for_trainval()`.
    Everything validation chose besides the weights (the model's `calibration_state`: the
    penalty, and the pitch prior's weight where validation chooses it) is kept the same way,
    except entries of `chosen_elsewhere` (class cross-validation's choice), which replace them.

    The length is counted in the datamodule's `refit_length` unit: "epochs" (default; an epoch is
    every training item once, so more data means more steps, as in the paper) or "steps" (epochs
    of a fixed number of batches: the refit takes as many optimiser steps). The trainer and model
    configs are unchanged, so a learning-rate schedule follows the same course as in the run that
    chose the checkpoint, step by step (in epochs of more data, for more steps: `ScheduleLengthCheck`
    refused a schedule shorter than those as the run's fit started).

    Returns (datamodule, model, trainer, info); the refitted model is saved as
    `<output_dir>/checkpoints/refit_trainval.ckpt` (info["checkpoint"]) and is what gets tested.
    `selected` is `_selected_checkpoint(trainer)` (a `fast_dev_run`'s current weights stand in
    for the selected ones). `record` (the run's `RunRecord`) goes into the refit's checkpoint, so
    that `fewzero.eval` can rebuild the model from the checkpoint alone.
    """
    selected_path, epochs, steps, chosen = selected
    unit = getattr(datamodule, "refit_length", "epochs")
    if unit not in ("epochs", "steps"):
        raise ValueError(f"{type(datamodule).__name__}.refit_length must be 'epochs' or 'steps'; "
                         f"got {unit!r}")
    length = {"max_epochs": epochs, "max_steps": -1} if unit == "epochs" else {
        "max_epochs": -1, "max_steps": steps}
    if trainer.fast_dev_run:  # its batch limits, except the one validation batch it would force
        length = {"fast_dev_run": False, "max_epochs": -1, "max_steps": steps,
                  "limit_train_batches": trainer.limit_train_batches,
                  "limit_test_batches": trainer.limit_test_batches}
    final_dm = datamodule.for_trainval()
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    model = hydra.utils.instantiate(cfg.model)
    give_example_input(model, final_dm)
    model.keep_calibration({**chosen, **(chosen_elsewhere or {})})
    log.info("Refitting on all training data for %d %s (selected: %s)",
             epochs if unit == "epochs" else steps, unit, selected_path)
    path = output_dir / "checkpoints" / "refit_trainval.ckpt"
    key = {"selected": selected_path, "epochs": epochs, "steps": steps, "unit": unit,
           "config": config_hash(course_settings(cfg)),
           "chosen_elsewhere": {k: v.tolist() for k, v in (chosen_elsewhere or {}).items()}}
    refit = resumable_fit(cfg, model, final_dm, output_dir, "refit_progress", key,
                          callbacks=[record] if record else [], done=path,
                          limit_val_batches=0, num_sanity_val_steps=0, **length)
    if hasattr(model, "fit_closed_form"):  # a no-op unless a resume skipped the fit's end
        model.fit_closed_form()
    refit.save_checkpoint(path, weights_only=False)  # all of it: a resume reads its loops
    if refit.is_global_zero:
        (path.parent / "refit_progress.ckpt").unlink(missing_ok=True)
    refit.loggers = trainer.loggers  # test metrics and figures go where the first fit's went
    # and the test is timed as the first fit would have (time/test_seconds)
    refit.callbacks.extend(c for c in trainer.callbacks if isinstance(c, StageTimer))
    info = {"checkpoint": str(path), "selected_checkpoint": selected_path, "unit": unit,
            "epochs": epochs, "selected_steps": steps, "steps": refit.global_step}
    return final_dm, model, refit, info


def build_model(cfg: DictConfig, output_dir: Path) -> pl.LightningModule:
    """`cfg.model` built. For a test alone (`train=false`, as `fewzero.eval` runs it) of a
    checkpoint that records the `model.init_checkpoint` its run started from (zero-shot runs),
    from that record (`ZeroShotModule`'s `init_record`): the checkpoint's weights replace those
    the init file holds, which may have moved since, and the check that refuses an init
    checkpoint whose run heard a tested clip reads what the record says that run read."""
    tested = None if cfg.get("train", True) else resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    record = (torch.load(tested, map_location="cpu", weights_only=False).get("init_checkpoint")
              if tested else None)
    if record is None:
        return hydra.utils.instantiate(cfg.model)
    log.info("%s records its run's model.init_checkpoint (%s): the model is built without reading "
             "that file, whose weights the checkpoint's replace.", tested, record["path"])
    return hydra.utils.instantiate(cfg.model, init_record=record)


def fit_metrics(trainer: pl.Trainer, resumed: str | None) -> dict[str, float]:
    """The fit's train/ and val/ metrics as logged, over those saved in the resumed checkpoint
    (`ResumableModule.resumed_fit_metrics`, read when the fit restored it): a resumed fit logs
    only what it ran. From a checkpoint at the end (a run killed during class cross-validation
    or the refit) it logs nothing; after the fit's last validation, no val/ metric."""
    logged = {k: _metric(v) for k, v in trainer.callback_metrics.items()
              if k.startswith(("train/", "val/"))}
    if resumed is None:
        return logged
    return {**getattr(trainer.lightning_module, "resumed_fit_metrics", {}), **logged}


def trained_on_trainval(ckpt_path: str | Path) -> bool:
    """Whether a zero-shot checkpoint's model was trained on every seen class (the refit on
    trainval) rather than in the validation phase. Checkpoints written before the role was saved
    are told by the refit's file name."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    default = "trainval" if Path(ckpt_path).name == "refit_trainval.ckpt" else "train"
    return checkpoint.get("datamodule_train_on", default) == "trainval"


def as_trained(datamodule: Any, ckpt_path: str) -> Any:
    """The datamodule in the role the checkpoint's model was trained in: a zero-shot refit
    (`refit_on_trainval`) was trained against every seen class, and heads that score relative
    to the training classes (ConSE) must see the same ones when it is tested again."""
    if not ckpt_path or not hasattr(datamodule, "for_trainval") or datamodule.train_on == "trainval":
        return datamodule
    if not trained_on_trainval(ckpt_path):
        return datamodule
    log.info("%s was trained on every seen class (the refit on trainval): testing it in that role.",
             ckpt_path)
    return datamodule.for_trainval()


def stopped_message(cfg: DictConfig, overrides: list[str] | None, during: str | None,
                    how: str = "by SIGTERM or Ctrl-C") -> str:
    """What `train` tells its Python caller (a notebook, a script) when SIGTERM or Ctrl-C stopped
    it: where the progress is and how to resume, from Python and from the command line. (`main`
    logs the command-line form itself: `say_how_to_resume`.) `during`: the phase after the main
    fit it stopped in (class cross-validation, the refit), if any; `how`: what stopped it."""
    output_dir = Path(cfg.paths.output_dir)
    if not cfg.get("train", True):
        return (f"Stopped {how} before the test of {cfg.get('ckpt_path')} finished, so it has no "
                "results: run the same evaluation again.")
    last = output_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return f"Stopped {how} before any checkpoint was written to {last.parent}: start the run again."
    try:
        held = f" holds step {torch.load(last, map_location='cpu', weights_only=False)['global_step']}"
    except Exception:  # unreadable: the resume says why; the stop must still be told
        held = " holds the progress"
    return (f"Stopped {how}{f' during {during}' if during else ''}: {last}{held}. "
            "Resume it from Python by calling train again with the same settings, output directory "
            "and ckpt_path=last (cfg.ckpt_path = \"last\"; train(cfg); or \"ckpt_path=last\" among "
            "compose_train_config's overrides); from the command line with:\n  "
            + resume_command(run_overrides(output_dir, overrides), output_dir)
            + pythonpath_hint() + data_folder_hint())


def train(cfg: DictConfig, overrides: list[str] | None = None, report_extra: dict[str, Any] | None = None
          ) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit (optionally resuming), test the best checkpoint, write metrics.json and hparams: what
    `python -m fewzero.train` runs, callable from Python (a notebook, a script) with a config
    from `compose_train_config`.

    `overrides`: the command line's (`main` passes Hydra's); None reads those a script saved
    with `save_run_overrides`. They are recorded in the checkpoints and named by the message
    that refuses a resume with other settings (`check_resume`).
    `report_extra`: entries added to metrics.json, which the summary reads (`fewzero.eval`'s
    `penalty_not_chosen`: what the tested checkpoint's run did not choose on validation).

    With `ckpt_path=auto`, a run directory whose run already finished with these settings
    (`finished_report`) is left as it is: its metrics.json is read back, nothing is built.

    Bad settings raise the exception that names the problem and the fix (mostly ValueError,
    also where Hydra met it building a part; the command line prints its message alone).
    SIGTERM or Ctrl-C (a notebook's "interrupt kernel") stops after the current step, saved to
    `checkpoints/last.ckpt`, and raises Lightning's SIGTERMException (a SystemExit) whose
    message says how to resume (`stopped_message`): the process stays usable. A second Ctrl-C
    stops at once: Lightning's SystemExit(1), its message saying what `last.ckpt` holds (the
    last periodic save).

    `cfg` itself is left as it was given, so that it can be changed and passed again.

    Returns:
        (metrics, objects): final metrics by key (`val/acc_best`, `test/5way_5shot_acc`, ...)
        and the built cfg (a copy of `cfg`), datamodule, model, trainer (the cfg alone for a
        finished run).
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # as multiprocessing checks
        raise RuntimeError(
            "train() was called while a worker process imported your script: rendered SOL renders in "
            "worker processes started with \"spawn\", which import the script that started them, so "
            "its calls run again in each worker, which would wait there forever for the data the "
            "first process is preparing. Put the script's calls under if __name__ == \"__main__\": (a "
            "notebook needs nothing).")
    # a copy: building the parts resolved some of its interpolations in place (a zero-shot run's
    # side_info.cache_dir), so the caller's config, reused in a notebook for a resume
    # (ckpt_path=auto) or another run, no longer read as the run's own settings
    cfg = copy.deepcopy(cfg)
    try:
        return _train(cfg, overrides, report_extra)
    except SIGTERMException as stop:
        # Lightning's has no message, so a Python caller read a bare "SystemExit" and a script
        # exited with status 0 as if it had finished; main and fewzero.eval print their own
        message = stopped_message(cfg, overrides, getattr(stop, "stopped_during", None))
        stop.args, stop.code = (message,), message
        raise
    except SystemExit as stop:
        if isinstance(stop.__context__, KeyboardInterrupt):
            # Lightning's exit(1) after a Ctrl-C it did not stop gracefully (a second one): a
            # Python caller read "SystemExit: 1". The code stays: a command still exits 1, silently
            stop.args = (stopped_message(cfg, overrides, None, "at once by Ctrl-C"),)
        raise
    except Exception as error:
        refusal = unwrapped(error)
        if refusal is not error and refusal_message(refusal) is not None:
            # met while Hydra built a part (the datamodule's check of its split): a Python caller
            # got Hydra's InstantiationException, the message as a repr (escaped quotes and
            # newlines), and `except ValueError` missed it. The command line prints the same.
            raise refusal from None
        raise


def _train(cfg: DictConfig, overrides: list[str] | None, report_extra: dict[str, Any] | None
           ) -> tuple[dict[str, float], dict[str, Any]]:
    """`train`'s work."""
    log_from_the_first_process_only()
    quiet_lightning()
    output_dir = Path(cfg.paths.output_dir)
    # as composed: instantiating a node resolves interpolations it reads in place (${side_info})
    record = RunRecord(OmegaConf.to_container(cfg), run_overrides(output_dir, overrides),
                       data_folders(cfg))
    try:
        resumed = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir) if cfg.get("train", True) else None
        finished = (finished_report(cfg, resumed, output_dir)
                    if resumed and cfg.get("ckpt_path") == "auto" else None)
        # the resumed checkpoint's RunRecord, read once: for this check and the data folders'
        recorded = check_resume(cfg, resumed, output_dir) if resumed and finished is None else None
        check_accelerator(cfg)
        check_trainer_settings(cfg)
        check_seed(cfg)
        check_side_info_is_read(cfg)
        check_targets_import(cfg)
        check_optimisation_settings(cfg)  # after the import check, which names a missing class
        check_backbone_declares_its_size(cfg)
        check_init_source(cfg)
    except Exception:  # e.g. a mistyped resume of an existing run: leave its files as they were
        restore_run_files(output_dir)
        raise
    # a resume, or a test alone of a run's checkpoint (fewzero.eval): before any data are read
    tested = None if cfg.get("train", True) else resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    if tested and rank_zero_only.rank == 0:
        try:
            recorded = RunRecord.read(tested)
        except Exception:  # a file cut short: loading the checkpoint for the test says so
            recorded = None
    continued = resumed or tested
    if continued and finished is None and rank_zero_only.rank == 0:
        warn_of_other_data_folders(cfg, continued, recorded)
    if finished is not None:  # e.g. a job of a sweep that a stop interrupted, finished before
        log.info("%s finished with these settings already: its results stand, neither trained nor "
                 "tested again (to test it again: ckpt_path=last, or remove its metrics.json).",
                 output_dir)
        if rank_zero_only.rank == 0:
            print_summary(output_dir, finished)
        results = dict(finished.get("metrics", {}))
        if finished.get("checkpoint") is not None:
            results["test/checkpoint"] = finished["checkpoint"]
        return results, {"cfg": cfg}
    saved_config = output_dir / ".hydra" / "config.yaml"
    if cfg.get("train", True) and not saved_config.exists():
        # Hydra writes it for `python -m fewzero.train`; a run composed by a script (the
        # benchmarks) needs it too: fewzero.eval and model.init_checkpoint's check read it
        saved_config.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, saved_config)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    # Denormal floats (|x| < 1.2e-38) cost x86 CPUs tens of cycles per operation; a saturated
    # episode loss fills the backward pass with them. Flushing rounds only those to zero: same
    # validation at step 250, final test figures within seed noise (docs/benchmarks.md).
    torch.set_flush_denormal(bool(cfg.get("flush_denormal", True)))
    if cfg.get("keep_freed_memory", True):
        keep_freed_memory()

    log.info("Building datamodule <%s>", cfg.dataset._target_)
    datamodule = hydra.utils.instantiate(cfg.dataset)
    log.info("Building model <%s>", cfg.model._target_)
    model = build_model(cfg, output_dir)
    give_example_input(model, datamodule)
    check_augment_fits(model, cfg)
    warn_of_a_learning_rate_of_zero(model, cfg)
    check_audio_encoder_output(model, cfg)
    # an entry set to null (callbacks.progress_bar=null) is switched off, like one removed with ~
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not shows_progress_bar(cfg):  # Lightning refuses a progress bar callback beside it
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ProgressBar)]
    if not cfg.get("train", True):
        # a test alone writes no checkpoint, and the one it tests must not restore a run's
        # checkpoint choice (BestCheckpoint would copy, or look for, the training run's files)
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ModelCheckpoint)]
    if (cfg.trainer.get("enable_model_summary") is not False and not cfg.trainer.get("barebones")
            and not any(isinstance(c, pl.callbacks.ModelSummary) for c in callbacks)):
        callbacks.append(EncoderModelSummary())  # Lightning's default one, with the encoder's row
    callbacks.append(record)
    if cfg.get("train", True) and (cfg.get("model") or {}).get("scheduler"):
        callbacks.append(ScheduleLengthCheck(cfg))
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    trainer: pl.Trainer = write_checkpoints_atomically(
        hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers))

    metrics: dict[str, float] = {}
    refit: dict[str, Any] = {}
    class_cv: dict[str, Any] = {}
    if cfg.get("train", True) and getattr(datamodule, "train_on", "train") == "trainval":
        raise ValueError("dataset.train_on=trainval trains with no validation data, so nothing would choose "
                         "the checkpoint, the GZSL calibration penalty or the prior's weights, and the "
                         "test would report defaults as if validation had chosen them. Keep "
                         "dataset.train_on=train: with dataset.refit_on_trainval=true (the default) the "
                         "run then also trains on every seen clip outside the test fold, for as many "
                         "steps as validation chose.")
    refits = getattr(datamodule, "refit_on_trainval", False)
    if getattr(model, "class_cv", False) and cfg.get("train", True) and not refits:
        raise ValueError("Class cross-validation (model.pitch_prior.class_cv=true) hands its choice to "
                         "the refit on trainval: set dataset.refit_on_trainval=true or class_cv=false.")
    if cfg.get("train", True) and hasattr(datamodule, "check_trainable"):  # a zero-shot split
        datamodule.check_trainable(getattr(model, "class_cv", False))
    if cfg.get("train", True):
        with without_optimiser_notes(optimises_nothing(model)):
            trainer.fit(model, datamodule=datamodule, ckpt_path=resumed)
        metrics.update(fit_metrics(trainer, resumed))
        if refits:
            selected, chosen_by_cv = _selected_checkpoint(trainer), None  # loaded once for both
            phase = "class cross-validation"
            try:
                if getattr(model, "class_cv", False):
                    chosen_by_cv, class_cv = class_cross_validation(cfg, datamodule, trainer,
                                                                    output_dir, selected)
                phase = "the refit on every seen class"
                datamodule, model, trainer, refit = refit_on_trainval(
                    cfg, datamodule, trainer, output_dir, selected, chosen_by_cv, record)
            except SIGTERMException as stop:  # for main's message: what a resume runs again
                stop.stopped_during = phase  # type: ignore[attr-defined]
                raise
    if cfg.get("test", True):
        best = refit.get("checkpoint") or selected_checkpoint_path(trainer)
        if not cfg.get("train", True):
            best = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir) or ""
            datamodule = as_trained(datamodule, best)
        if not best:
            selector = selecting_callback(trainer)
            monitor = getattr(selector, "monitor", None)
            unvalidated = cfg.get("train", True) and monitor and monitor not in trainer.callback_metrics
            if cfg.get("train", True) and selector is None:
                log.warning("callbacks.model_checkpoint is off, so validation selects no "
                            "checkpoint: testing the weights of the last training step.")
            elif unvalidated and getattr(selector, "no_step_validated", False):
                # said, with the fix, as the fit started (BestCheckpoint): not again here
                log.warning("No best checkpoint found: no step was validated (see the warning on "
                            "trainer.max_steps as the fit started). Testing the current weights.")
            elif unvalidated:
                # e.g. trainer.max_steps=200 with the default 250-step few-shot epoch, where the
                # fit's start could not tell (trainer.max_epochs set)
                log.warning("No best checkpoint found: no validation ran (it follows each training "
                            "epoch, and trainer.max_steps=%s ended training within the first: "
                            "dataset.episodes.train.n_episodes steps for few-shot, "
                            "dataset.steps_per_epoch for zero-shot). Testing the current weights; "
                            "to select a checkpoint on validation, shorten the epoch or raise "
                            "trainer.max_steps.", cfg.trainer.get("max_steps"))
            else:
                log.warning("No best checkpoint found: testing the current weights.")
        with warnings.catch_warnings():  # test alone: the checkpoint callbacks left out above
            warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`")
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: _metric(v) for k, v in trainer.callback_metrics.items()
                        if k.startswith("test/")})
        metrics["test/checkpoint"] = best  # type: ignore[assignment]

    if trainer.is_global_zero:
        report = {
            "metrics": {k: v for k, v in metrics.items() if not isinstance(v, str)},
            "test_episodes": {
                name: {"mean_acc": r.mean, "ci95": r.ci95, "n_episodes": r.accuracies.numel()}
                for name, r in getattr(model, "test_results", {}).items()
            },
            "checkpoint": metrics.get("test/checkpoint"),
            "dataset": _dataset_name(cfg, datamodule),
            "tags": [str(t) for t in cfg.get("tags") or []],
        }
        provenance = getattr(getattr(datamodule, "source", None), "provenance", None)
        if provenance is not None:  # rendered data: which render (fewzero.report compares them)
            report["data"] = provenance()
        if cfg.trainer.get("fast_dev_run"):
            report["fast_dev_run"] = FAST_DEV_RUN_NOTE
        if refit:
            report["refit_on_trainval"] = refit
        if class_cv:
            report["class_cv"] = class_cv
        if hasattr(model, "test_report"):  # e.g. zero-shot: {"zero_shot": {...}}
            report.update(model.test_report())
        report.update(report_extra or {})
        output_dir.mkdir(parents=True, exist_ok=True)
        # in one step: a kill or a full disk (a sweep at its quota) leaves no half a file, which
        # fewzero.report and ckpt_path=auto would fail to read, but the run unfinished
        text = json.dumps(report, indent=2)
        replace_atomically(output_dir / "metrics.json", lambda tmp: tmp.write_text(text))
        numeric = {k: v for k, v in metrics.items()
                   if isinstance(v, float) and math.isfinite(v) and not k.startswith("train/")}
        for pl_logger in trainer.loggers:
            log_final_hparams(pl_logger, _flat_hparams(cfg), numeric)
        print_summary(output_dir, report)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}


def optimized_metric(cfg: DictConfig) -> str | None:
    """The metric `main()` returns to sweepers (`optimized_metric`, e.g. `val/acc_best`).

    Raises ValueError unless it is a validation metric (`val/...`): a sweep that optimised a
    test metric would select hyperparameters on the test classes.
    """
    return check_validation_metric(cfg.get("optimized_metric"))


@rank_zero_only  # DDP: the first process says it once
def say_how_to_resume(output_dir: Path, overrides: list[str], during: str | None,
                      sweep_dir: Path | None = None, requeued: bool = False,
                      options: Sequence[str] = ()) -> None:
    """Log where a stopped run's progress is and the command that resumes it; `during`: the
    phase after the main fit it stopped in (class cross-validation, the refit), if any; a job of
    a multirun in `sweep_dir` also gets the command that finishes the whole sweep. `requeued`:
    a submitit job that its launcher requeues, which resumes by itself with ckpt_path=auto.
    `options`: those the run's config was composed with besides its overrides
    (`composing_options`). Each command comes with the PYTHONPATH it needs (`pythonpath_hint`)
    and the data folder it read (`data_folder_hint`)."""
    last = output_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        log.warning("Stopped before any checkpoint was written to %s: start the run again.",
                    last.parent)
    else:
        step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
        if during:
            log.warning("Stopped during %s, whose progress is saved in %s as well: the resume "
                        "goes on from there (finished class cross-validation folds are reused).",
                        during, last.parent)
        if requeued and "ckpt_path=auto" in overrides:
            log.warning("Preempted. %s holds step %d; submitit requeues the job, which resumes "
                        "from there (ckpt_path=auto).", last, step)
            return
        log.warning("%s. %s holds step %d; resume with:\n  %s%s", "Preempted, and the requeued "
                    "job starts afresh without ckpt_path=auto in the sweep's command" if requeued
                    else "Stopped", last, step,
                    resume_command(run_overrides(output_dir, overrides), output_dir, options=options),
                    pythonpath_hint() + data_folder_hint())
    whole_sweep = sweep_resume_command(sweep_dir) if sweep_dir is not None and not requeued else None
    if whole_sweep:
        log.warning("The multirun stops here. Finish it (stopped jobs resume, finished ones keep "
                    "their results, the rest start) with:\n  %s%s", whole_sweep,
                    pythonpath_hint() + data_folder_hint())


@hydra.main(version_base="1.3", config_path="../../configs", config_name=CONFIG_NAME)
def main(cfg: DictConfig) -> float | None:
    objective = optimized_metric(cfg)
    overrides = list(HydraConfig.get().overrides.task)
    try:
        metrics, _ = train(cfg, overrides)
    except SIGTERMException as stop:
        # Lightning stopped after the current batch; callbacks.last_checkpoint saved it, where
        # there is one (not in a fast_dev_run); during class CV or the refit, their own did.
        sweep_dir = (Path(HydraConfig.get().sweep.dir)
                     if HydraConfig.get().mode == RunMode.MULTIRUN else None)
        say_how_to_resume(Path(cfg.paths.output_dir), overrides, getattr(stop, "stopped_during", None),
                          sweep_dir, requeued=getattr(stop, "preemption", None) is not None,
                          options=composing_options(HydraConfig.get()))
        requeue(stop)  # a submitit job's preemption: submitit requeues it and ends this process
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as error:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            message = refusal_message(error)
            if message is None and stopped_by_another_process(error, rank_zero_only.rank):
                raise SystemExit(f"(The process of rank {rank_zero_only.rank} stopped: another "
                                 "process ended first, and its message says why.)") from None
            if message is None:
                raise
            log.error("%s\n(The run was refused: its message names the fix. HYDRA_FULL_ERROR=1 "
                      "shows where it was raised.)", message)
            raise SystemExit(1) from None
        # One failed job must not end a sweep: record it and let the launcher go on.
        failure = Path(cfg.paths.output_dir) / "failed.txt"
        failure.parent.mkdir(parents=True, exist_ok=True)
        failure.write_text(traceback.format_exc())
        message = refusal_message(error)
        if message is None:
            log.exception("This job failed (traceback in %s); the multirun continues.", failure)
        else:  # on the console as a single run gives it; the traceback is in the file all the same
            log.error("This job was refused: %s\n(traceback in %s; the multirun continues.)",
                      message, failure)
        return None
    if objective is None:
        return None
    if objective not in metrics:
        validated = sorted(k for k in metrics if k.startswith("val/"))
        # a single run that validated nothing has said so (as its fit started, and at its test),
        # and nothing reads what it returns
        if validated or HydraConfig.get().mode == RunMode.MULTIRUN:
            log.warning("optimized_metric=%s was not logged (validation metrics: %s); returning "
                        "None.", objective, validated)
        return None
    return float(metrics[objective])


if __name__ == "__main__":
    main()
