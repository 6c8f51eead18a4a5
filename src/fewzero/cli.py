"""Helpers shared by the command-line scripts (`scripts/*.py`): how they run (`run_script`),
argument types and the device a benchmark names."""

from __future__ import annotations

import argparse
import inspect
import platform
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from fewzero.console import command_refusal


def run_script(main: Callable[[], object]) -> None:
    """Run a script's `main()` as `fewzero.eval` runs its own: a refusal of bad input (a
    checkpoint whose run read the test fold, an unknown experiment, a missing file; see
    `fewzero.console.command_refusal`), raised by fewzero's code or by the script's own, prints
    its message alone after the script's name and exits with status 1. Anything else, a bug,
    keeps its traceback; HYDRA_FULL_ERROR=1 shows every traceback. Notes the script added to the
    error (`add_note`: which of its runs failed, say) follow the message, as they follow a
    traceback.

    A fit or test that SIGTERM or Ctrl-C stopped (`fewzero.callbacks.StopOnInterrupt`) ends the
    script with status 143, as `fewzero.train`'s: Lightning's SIGTERMException is a SystemExit
    without a code, which would exit 0 as if the script had finished. The message says so, and
    how to go on: the exception's `rerun`, where the script set one."""
    script = Path(inspect.getfile(main)).resolve()
    try:
        main()
    except SIGTERMException as stop:
        rerun = getattr(stop, "rerun", "Run the command again.")
        print(f"{script.name}: stopped by SIGTERM or Ctrl-C before it finished. {rerun}", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as error:
        message = command_refusal(error, own_code=[script.parent])
        if message is None:
            raise
        notes = "".join(f"\n{note}" for note in getattr(error, "__notes__", []))  # e.g. which run
        raise SystemExit(f"{script.name}: {message}{notes}") from None


@contextmanager
def naming_the_run(note: str) -> Iterator[None]:
    """Add `note` (which of a script's runs this is: its settings and folder) to an error raised
    inside, whose own message rarely says; `run_script` prints it after the message."""
    try:
        yield
    except Exception as error:
        error.add_note(note)
        raise


def whole_number(text: str) -> int:
    """argparse type: a whole number."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """argparse type: a whole number above 0."""
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not above 0")
    return value


def training_seed(text: str) -> int:
    """argparse type: a training seed, as `fewzero.train.check_seed` takes (0 to 2**32 - 1), which
    a benchmark would meet only at that seed's run, after the runs before it."""
    from fewzero.train import is_seed  # here: the scripts that need no training import this module fast

    value = whole_number(text)
    if not is_seed(value):
        raise argparse.ArgumentTypeError(f"{value} is not a seed: seeds go from 0 to {2**32 - 1}")
    return value


def output_folder(text: str) -> Path:
    """argparse type: a folder to write into, existing or not; not a file, nor inside one (the
    runs would fail as their first file is written, after the work before it)."""
    path = Path(text)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{existing} is a file, not a folder: pass a folder")
    return path


def table_in_the_way(out: Path, own: str | None = None) -> str | None:
    """The heading of the benchmark table (`benchmark.md`) in `out` that a benchmark writing its
    own there would overwrite: None when there is none, or when it starts with `own` (the table
    of the same benchmark's runs, which a rerun over the same --out is meant to rewrite)."""
    table = out / "benchmark.md"
    if not table.is_file():
        return None
    heading = next(iter(table.read_text().splitlines()), "")
    return None if own is not None and heading.startswith(own) else heading


def device_name(trainer: Any | None = None) -> str:
    """The device a trainer ran on: the GPU's name, or the CPU and torch's thread count (also
    without a trainer)."""
    root = trainer.strategy.root_device if trainer is not None else None
    if root is not None and root.type == "cuda":
        return torch.cuda.get_device_name(root)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
