"""Config resolvers for Optuna sweeps (`hparams_search=optuna`), registered by `fewzero.train`.

- `${optuna_storage:<file>,<metric>}`: the study's sqlite URL, its folder created (sqlite will
  not), once `<metric>` (`optimized_metric`) is known to be a validation metric: resolved as the
  sweep starts, so a test metric is refused before any trial runs or is stored.
- `${optuna_seed:<seed>,<storage>,<study>}`: the sampler seed plus the number of trials the
  stored study already has, so a second invocation, which resumes the study, does not replay
  the random start-up trials of the first (a sampler restarted with the same seed would).

And `SweepSummary`, a Hydra callback (`configs/hydra/default.yaml`) that ends a multirun by
naming the jobs that failed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def check_validation_metric(name: str | None) -> str | None:
    """`name` if it is a validation metric (`val/...`) or None; else ValueError: a sweep that
    optimised a test metric would select hyperparameters on the test classes."""
    if name and not str(name).startswith("val/"):
        raise ValueError(f"optimized_metric={name}: sweeps may only optimise a validation metric "
                         "(val/acc_best, val/acc, ...); test metrics are for the final report only.")
    return name


def optuna_storage(path: str, metric: str | None = None) -> str:
    """`sqlite:////absolute/path.db` for `path` (relative to the working directory), after
    `check_validation_metric(metric)`, whose refusal ends the command with its message alone
    (SystemExit passes through OmegaConf and Hydra; a ValueError would arrive behind two chained
    tracebacks, some 200 lines)."""
    try:
        check_validation_metric(metric)
    except ValueError as error:
        raise SystemExit(f"fewzero: {error}") from None
    file = Path(path).resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


def stored_trials(storage: str, study_name: str) -> int:
    """Number of trials of `study_name` in `storage` (0 when the study or the file is new)."""
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        return 0
    import optuna

    try:
        summaries = optuna.study.get_all_study_summaries(storage=storage)
    except Exception as error:  # an unreadable file: let the sweeper report it
        log.warning("Could not read Optuna storage %s: %s", storage, error)
        return 0
    return next((s.n_trials for s in summaries if s.study_name == study_name), 0)


def optuna_seed(seed: int, storage: str, study_name: str) -> int:
    """Sampler seed for this invocation: `seed` + trials already stored."""
    return int(seed) + stored_trials(storage, study_name)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("optuna_storage", optuna_storage, replace=True)
    OmegaConf.register_new_resolver("optuna_seed", optuna_seed, replace=True)


class SweepSummary(Callback):
    """At the end of a multirun, say how many of its jobs failed and where their tracebacks are.

    A failed job writes `failed.txt` in its run directory and the sweep goes on (`fewzero.train`),
    so a failure early in a long sweep would otherwise scroll away. Once every job has ended, a
    multirun with a failed job exits with status 1 (`SystemExit`, which Hydra's callback runner
    passes on), so a script or a scheduler that chains on success sees it; the other jobs'
    results are kept, and `fewzero.report <sweep dir>` lists the failed runs too.
    Jobs are those of this invocation: run directories written since it started (a sweep
    directory reused by a second invocation keeps the first one's files).
    """

    def __init__(self) -> None:
        self.started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)

        def this_invocation(paths: Any) -> list[Path]:
            # 2 s of leeway for a shared file system's clock (SLURM jobs)
            return sorted(p for p in paths if p.stat().st_mtime >= self.started - 2)

        jobs = this_invocation(sweep.glob("*/.hydra/config.yaml"))
        failed = this_invocation(sweep.glob("*/failed.txt"))
        if not failed:
            log.info("All %d jobs finished: python -m fewzero.report %s", len(jobs), sweep)
            return
        log.error("%d of %d jobs failed; their tracebacks:\n%s\nThe other jobs' results are kept: "
                  "python -m fewzero.report %s\nExit status 1: the multirun had failed jobs.",
                  len(failed), len(jobs), "\n".join(f"  {path}" for path in failed), sweep)
        raise SystemExit(1)
