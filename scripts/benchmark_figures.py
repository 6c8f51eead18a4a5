"""What one test figure costs: a confusion matrix drawn, written to plots/ and to TensorBoard.

Times `fewzero.plots.save_figure` (the figure's creation excluded) on confusion matrices of 5,
9 and 14 classes, the sizes of the zero-shot tests' (unseen, seen, GZSL), with a real
TensorBoard SummaryWriter, as a run does. Prints one Markdown table: CPU seconds per figure
(median over --repeats) and the PNG's size.

    .venv/bin/python scripts/benchmark_figures.py
    .venv/bin/python scripts/benchmark_figures.py --repeats 9
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from fewzero.cli import run_script
from fewzero.plots import confusion_figure, save_figure


class _Logger:
    """What save_figure reads of a Lightning TensorBoardLogger."""

    def __init__(self, experiment: SummaryWriter):
        self.experiment = experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="figures per size (the median is shown)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"argument --repeats: {args.repeats} is not a count: give 1 or more")
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        writer = SummaryWriter(str(Path(folder) / "tensorboard"))
        for n_classes in (5, 9, 14):
            seed = torch.Generator().manual_seed(0)
            confusion = torch.randint(0, 10, (n_classes, n_classes), generator=seed)
            names = [f"Instrument {i}" for i in range(n_classes)]
            seconds = []
            for _ in range(args.repeats):
                figure = confusion_figure(confusion, names, f"{n_classes} classes")
                start = time.process_time()
                save_figure(figure, "test/confusion", Path(folder) / "plots", [_Logger(writer)], step=0)
                seconds.append(time.process_time() - start)
            size = (Path(folder) / "plots" / "test_confusion.png").stat().st_size
            rows.append(f"| {n_classes} | {statistics.median(seconds):.3f} | {size / 1000:.0f} kB |")
        writer.close()
    print(f"### save_figure on confusion matrices, CPU ({platform.machine()}, 1 thread), "
          f"median of {args.repeats}\n")
    print("| classes | CPU-s per figure | PNG |")
    print("| --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    run_script(main)
