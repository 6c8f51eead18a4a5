"""Callbacks of our own (Lightning's cover checkpoints, LR and progress)."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl


class StageTimer(pl.Callback):
    """Wall-clock time of optimiser steps (data + forward + backward + update) and of testing.

    Results (also logged to the loggers as `time/*` when training/testing ends):
        train_seconds: summed time of training batches (validation excluded).
        train_steps: number of training batches timed.
        test_seconds: time from test start to end (embedding + all test episodes).
    """

    def __init__(self) -> None:
        self.results: dict[str, float] = {"train_seconds": 0.0, "train_steps": 0, "test_seconds": 0.0}
        self._batch_start = self._fetch_start = self._test_start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fetch_start = time.perf_counter()  # the first batch's fetch counts too

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self.results["train_seconds"] += now - self._fetch_start
        self.results["train_steps"] += 1
        self._fetch_start = now

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # validation runs between two training batches: do not bill it to the next step
        self._fetch_start += time.perf_counter() - self._validation_start

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        steps = self.results["train_steps"]
        if steps:
            self._log(trainer, {"time/train_steps_per_s": steps / self.results["train_seconds"]})

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._test_start = time.perf_counter()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.results["test_seconds"] = time.perf_counter() - self._test_start
        self._log(trainer, {"time/test_seconds": self.results["test_seconds"]})

    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
