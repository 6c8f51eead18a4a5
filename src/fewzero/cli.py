"""Helpers shared by the command-line scripts (`scripts/benchmark_*.py`): argument types and
the device a benchmark names."""

from __future__ import annotations

import argparse
import platform
from typing import Any

import torch


def positive_int(text: str) -> int:
    """argparse type: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not above 0")
    return value


def device_name(trainer: Any | None = None) -> str:
    """The device a trainer ran on: the GPU's name, or the CPU and torch's thread count (also
    without a trainer)."""
    root = trainer.strategy.root_device if trainer is not None else None
    if root is not None and root.type == "cuda":
        return torch.cuda.get_device_name(root)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
