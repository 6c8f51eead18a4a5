"""Shared test helpers: compose the real Hydra configs on tiny generated data."""

from __future__ import annotations

import gc
import importlib.util
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from omegaconf import DictConfig

from fewzero.data.clips import TINYSOL_INSTRUMENTS

# torch and fewzero.train (11-14 s of imports: pytorch_lightning) are imported where used, not
# here: pytest-xdist's controller loads this file too, before it starts the workers, and runs no
# test.

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
# Real data for the tests that read it (TinySOL samples, xlsa17 splits; they skip without it):
# ../shared/data next to the repository, or the folder FEWZERO_SHARED_DATA names (for a checkout
# elsewhere, such as a git worktree).
SHARED_DATA = Path(os.environ.get("FEWZERO_SHARED_DATA")
                   or Path(__file__).resolve().parents[2] / "shared" / "data")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Keep what the collected test modules imported (torch, pytorch_lightning, fewzero: half a
    million objects) out of every later garbage collection. A full collection walks every live
    object, so without this a Hydra compose took 0.32 s instead of 0.25 s (one process, the
    zero-shot word-audio config), and the whole suite 7% more CPU time."""
    gc.collect()
    gc.freeze()


def tone_overrides(tmp_path: Path, zero_shot: bool = False, clips_per_class: int = 12) -> list[str]:
    """Overrides that put `train.yaml` on synthetic tones in `tmp_path`, small enough for a CPU
    test: ZSL_OVERRIDES for zero-shot experiments, FSL_OVERRIDES otherwise."""
    names = ",".join(f"'{n}'" for n in TINYSOL_INSTRUMENTS)
    return [
        "dataset/source=tones",
        f"dataset.source.instruments=[{names}]",
        f"dataset.source.clips_per_class={clips_per_class}",
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'run'}",
        "trainer.accelerator=cpu",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        "+trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        # no figures: drawing them was a fifth of a test run's time; the tests of figures and
        # of what a run writes turn them on
        "model.figures=false",
    ] + (ZSL_OVERRIDES if zero_shot else FSL_OVERRIDES)


def compose_train_cfg(tmp_path: Path, overrides: list[str] | None = None,
                      clips_per_class: int = 12) -> DictConfig:
    """The real `train.yaml`, on synthetic tones in `tmp_path` (see `tone_overrides`).

    Zero-shot experiments (`experiment=zsl_*` in `overrides`) get ZSL_OVERRIDES instead of the
    few-shot episode settings.
    """
    from fewzero.train import compose_train_config

    zero_shot = any(o.startswith("experiment=zsl") for o in overrides or [])
    base = tone_overrides(tmp_path, zero_shot, clips_per_class)
    return compose_train_config(base + (overrides or []), tmp_path / "run")


# Coarser, shorter log-mels than the defaults' (128 mel bins, 1 s excerpts of 2 s clips): the
# same code paths at an eighth of the backbone's work, which was most of a few-shot test run's.
SMALL_FEATURES = ["dataset.features.n_mels=32", "dataset.features.clip_seconds=1.0",
                  "dataset.excerpt_seconds=0.5"]
FSL_OVERRIDES = [
    "dataset.episodes.train.n_episodes=2",
    "dataset.episodes.train.n_query=2",
    "dataset.episodes.val.n_episodes=4",
    "dataset.episodes.val.n_query=5",
    "dataset.episodes.test=[{n_way: 5, n_shot: 1, n_query: 5, n_episodes: 6},"
    "{n_way: 5, n_shot: 5, n_query: 5, n_episodes: 6}]",
    "model.plot_episodes=1",
    "model.selection_episodes=20",
    # 6 (shrinkage, support weight) pairs to choose from, not the config's 32: the same choice
    # on an eighth of the validation episodes
    "model.test_shrinkages=[0.5,1.0,2.0]",
    "model.test_support_weights=[0.0,0.2]",
    *SMALL_FEATURES,
]
ZSL_OVERRIDES = ["dataset.batch_size=8", "dataset.steps_per_epoch=2", "dataset.eval_batch_size=32",
                 *SMALL_FEATURES]


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (scripts are not a package)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def skip_without_side_info_files(cfg: DictConfig) -> None:
    """Skip when the config's side information lists files (images from Debian packages) that
    this machine does not have."""
    files = [f for fs in (cfg.side_info.get("files") or {}).values() for f in fs]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        pytest.skip(f"side-information files absent ({missing[0]}, ...): run scripts/setup.sh")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every socket connection fail loudly; returns the attempts (assert it is empty at the
    end: a caller may catch the error)."""
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args[:2]))
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture(scope="session", autouse=True)
def _one_data_folder_per_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """FEWZERO_DATA for the whole session: one folder per pytest-xdist worker, shared by its
    tests and the processes they start, so that tests on the same tones reuse their clips and
    feature caches instead of writing them again (a third less CPU time for the tests that train
    in-process). Per worker, not per run: no test waits on, or prints about, another worker's
    preparation. Every test passes with its data already prepared as with none prepared.

    A test that changes its data, or must see it prepared, gives `paths.data_dir` or sets
    FEWZERO_DATA itself (monkeypatch), which wins. The tests never write to the user's own
    FEWZERO_DATA.
    """
    folder = tmp_path_factory.mktemp("data", numbered=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEWZERO_DATA", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def _few_threads():
    """Two torch threads per test, or each pytest-xdist worker's share of the cores (not
    more threads than cores: oversubscribed BLAS threads only wait for each other)."""
    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))
    yield
