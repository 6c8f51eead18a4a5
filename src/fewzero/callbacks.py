"""Callbacks of our own: stage timing, per-step seeding, the resume checkpoint (last.ckpt), the
best checkpoint carried across run directories, the run's config in every checkpoint, and
Ctrl-C as a clean stop."""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, RichModelSummary, RichProgressBar
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.model_summary.model_summary import LayerSummary
from pytorch_lightning.utilities.model_summary.model_summary import ModelSummary as Summary

from fewzero.data.clips import replace_atomically
from fewzero.models.resumable import ResumableModule

log = logging.getLogger(__name__)


class StageTimer(pl.Callback):
    """Wall-clock time of optimiser steps (data + forward + backward + update) and of testing.

    Results (also logged to the loggers as `time/*` when training/testing ends):
        train_seconds: summed time of training batches (validation excluded).
        train_steps: number of training batches timed.
        test_seconds: time from test start to end (embedding, all test episodes, and what the
            model chooses at test time: the few-shot whitening on validation episodes, whose
            share is `FewShotModule.whitening_choice_seconds`).
    """

    def __init__(self) -> None:
        self.results: dict[str, float] = {"train_seconds": 0.0, "train_steps": 0, "test_seconds": 0.0}
        self._fetch_start = self._test_start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fetch_start = time.perf_counter()  # the first batch's fetch counts too

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


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Seed of the global RNG for optimiser step `step` on process `rank`: a hash of the three,
    so neighbouring steps, seeds and ranks get unrelated streams."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


class StepSeed(pl.Callback):
    """Reseeds torch's global RNG (CPU and CUDA) before every training step with
    `step_seed(seed, global_step, rank)`, so dropout and augmentation draws depend only on the
    step, never on how the run got there.

    This is what makes a run resumed from any checkpoint (`ckpt_path=last`) repeat the
    uninterrupted run exactly: restoring the RNG state saved in the checkpoint is not enough,
    because between a save and the next step Lightning draws from the global RNG a different
    number of times in a fresh process (the sanity-check validation, data-loader iterator seeds).
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.seed is not None:
            torch.manual_seed(step_seed(self.seed, trainer.global_step, trainer.global_rank))


class EncoderSummary(Summary):
    """Lightning's model summary, plus a row for the audio encoder of a `ResumableModule` where
    it is nested deeper than the rows listed (a few-shot model's `net.backbone`, under `net`
    with the default `max_depth=1`), after its parent's. The example input runs through the
    encoder alone (the module's `forward`), so that row is where the summary measures FLOPs and
    in/out sizes; the parent's own forward never runs (0 FLOPs, "?" sizes). A zero-shot model's
    encoder (`backbone`) is a row already: nothing is added, no other submodule listed."""

    def summarize(self) -> dict[str, LayerSummary]:
        nested = self._nested_encoder()
        if nested is None:
            return super().summarize()
        row = LayerSummary(nested[1])  # its hook sees the example input's forward run there
        summary = super().summarize()
        row.detach_hook()
        rows = list(summary.items())
        parent = nested[0].split(".")[0]
        at = next((i + 1 for i, (name, _) in enumerate(rows) if name == parent), len(rows))
        return dict([*rows[:at], (nested[0], row), *rows[at:]])

    def _nested_encoder(self) -> tuple[str, torch.nn.Module] | None:
        """(name, module) of the model's audio encoder when the listed rows leave it out."""
        if not isinstance(self._model, ResumableModule) or self._max_depth < 1:
            return None
        encoder = self._model.audio_encoder()
        name = next((n for n, m in self._model.named_modules() if m is encoder and n), None)
        return (name, encoder) if name is not None and name.count(".") >= self._max_depth else None


class EncoderModelSummary(RichModelSummary):
    """Lightning's default model summary as a fit starts (rich's table), by `EncoderSummary`:
    `fewzero.train` gives it in place of Lightning's own (`trainer.enable_model_summary`)."""

    def _summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        from pytorch_lightning.strategies.deepspeed import DeepSpeedStrategy

        if isinstance(trainer.strategy, DeepSpeedStrategy):  # its own summary (ZeRO stage 3)
            return super()._summary(trainer, pl_module)
        return EncoderSummary(pl_module, max_depth=self._max_depth)


class EpochProgressBar(RichProgressBar):
    """Lightning's rich progress bar, whose training line names the last epoch of a run whose
    length is `trainer.max_steps`: "Epoch 1/3", where Lightning's reads "Epoch 1/-2" (it prints
    max_epochs - 1, and max_epochs is -1 here)."""

    def _get_train_description(self, current_epoch: int) -> str:
        last = last_epoch(self.trainer)
        text = f"Epoch {current_epoch}" + (f"/{last}" if last is not None else "")
        # as Lightning pads it: "Epoch N" and "Validation" in one column, without flicker
        return f"{text:{len(self.validation_description)}}"


def steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """Optimiser steps in one of the fit's epochs; None when its length is unknown (infinite)."""
    batches = trainer.num_training_batches
    return math.ceil(batches / trainer.accumulate_grad_batches) if 0 < batches < math.inf else None


def last_epoch(trainer: pl.Trainer) -> int | None:
    """The 0-based epoch in which the fit ends: by max_epochs, or the epoch in which max_steps
    falls (max_epochs -1 or None); None when neither bounds it or the epoch length is unknown."""
    ends = []
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        ends.append(trainer.max_epochs - 1)
    epoch = steps_per_epoch(trainer)
    if trainer.max_steps > 0 and epoch:
        ends.append(math.ceil(trainer.max_steps / epoch) - 1)
    return min(ends) if ends else None


class LastCheckpoint(ModelCheckpoint):
    """`<dirpath>/last.ckpt` for resuming (`ckpt_path=last`), written every `every_n_train_steps`
    optimiser steps and at the end of every epoch, after its validation.

    Lightning's ModelCheckpoint does one or the other; with `every_n_train_steps` alone, a save
    that falls on an epoch's last batch comes before that epoch's validation, which the resumed
    run then skips (its score never counts towards `val/acc_best` or the best checkpoint). So
    that batch is left to the epoch-end save. Writes are atomic (temporary file, then moved).

    SIGTERM (a cluster's preemption or time limit, `kill`; Ctrl-C with `StopOnInterrupt`) saves
    the step it arrived at. Lightning's own handling raises where the signal finds a process: in
    a validation, whose epoch-end save then comes before that validation ended (the resumed run
    skips it); under DDP on each process at another step, so the save cannot be made together
    (Lightning issue #20806). Here the signal is only noted; after every optimiser step the
    processes agree (under DDP, a one-element all-reduce) and, where any was signalled, all stop
    after that same step and save it together. On an epoch's last step they stop once
    the epoch has ended instead (its validation, its saves), when the next epoch would start: a
    checkpoint before that validation would have the resumed run skip it. A signal during a
    validation is acted on after the next step, or, after the fit's last validation, when the
    fit ends (before the test, class cross-validation or the refit that would follow).

    As a fit starts, the temporary files that a process killed while writing a checkpoint of
    `dirpath` left there are removed.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 0, filename: str = "last"):
        super().__init__(dirpath=dirpath, filename=filename, monitor=None, save_top_k=1,
                         enable_version_counter=False,
                         every_n_train_steps=every_n_train_steps or None)
        self._resumed = False
        self._stop_noted = False
        self._stop_after_epoch = False
        self._preemption: tuple[int, Any] | None = None  # (signal, submitit's handler of it)
        self._preempted = False
        self._notes_sigterm = False  # SIGTERM's handler is ours during the fit

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.is_global_zero:  # no save is under way: these are a killed write's leftovers
            for stale in Path(self.dirpath).glob("*.ckpt.*.tmp"):  # (`AtomicCheckpointIO`'s)
                log.info("Removing %s, left by a process killed while it wrote a checkpoint", stale)
                stale.unlink(missing_ok=True)
        # A resumed run starts at its checkpoint's step: do not write that step again (Lightning
        # replays the end of an epoch that was checkpointed there).
        self._last_global_step_saved = trainer.global_step
        self._resumed = trainer.ckpt_path is not None
        self._stop_noted = self._stop_after_epoch = False
        # Lightning put its SIGTERM handler in place for this fit, and puts back the one before
        # it when the fit ends; ours replaces it for the same span
        self._notes_sigterm = (threading.current_thread() is threading.main_thread()
                               and callable(signal.getsignal(signal.SIGTERM)))  # not on Windows
        if self._notes_sigterm:
            signal.signal(signal.SIGTERM, self._note_stop)
        # A submitit job (hydra/launcher=slurm): submitit's handler of the preemption and
        # time-limit signal requeues the job and ends it at once, losing the steps since the
        # last write. Here the signal is noted as SIGTERM is, the step saved, and then the
        # handler called (`requeue`).
        self._preempted = False
        self._preemption = submitit_preemption()
        if self._preemption is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self._preemption[0], self._note_preemption)
        else:
            self._preemption = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._preemption is not None:  # submitit's handler again, outside the fit
            signal.signal(*self._preemption)

    def _note_stop(self, signum: int, frame: Any) -> None:
        self._stop_noted = True

    def _note_preemption(self, signum: int, frame: Any) -> None:
        self._stop_noted = self._preempted = True

    def _agrees_on_stops(self, trainer: pl.Trainer) -> bool:
        """Whether the stop signals noted here decide when this fit stops: under DDP, where the
        handler of SIGTERM is ours (always but off the main thread or on Windows), and for
        submitit's preemption signal. Lightning's own handling would stop a single process within a
        validation too, and the epoch-end save would then come before that validation ended,
        which the resumed run would skip."""
        return trainer.world_size > 1 or self._notes_sigterm or self._preemption is not None

    def _stop_agreed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether any process noted a stop signal (under DDP every process calls this at each
        step, and they exchange it)."""
        if trainer.world_size == 1:  # no exchange, and no wait for the device
            return self._stop_noted
        noted = torch.tensor([float(self._stop_noted)], device=pl_module.device)
        return bool(trainer.strategy.reduce(noted, reduce_op="sum").item() > 0)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self._resumed:
            self._resumed = False
            # Lightning counts the logging step once more when it resumes from a checkpoint
            # written at an epoch's end (it expects saves before the count): TensorBoard's x-axis
            # would go on one step ahead of the uninterrupted run's. Without gradient
            # accumulation the logging step is the number of batches completed.
            loop = trainer.fit_loop.epoch_loop
            if trainer.accumulate_grad_batches == 1:
                loop._batches_that_stepped = loop.batch_progress.total.completed

    def _stop_together(self, trainer: pl.Trainer, after: str) -> None:
        """Raise SIGTERMException on this process (every process calls this at the same point);
        `on_exception` then saves the step together."""
        if trainer.is_global_zero:
            log.warning("A stop signal reached %s: every process stops after %s.",
                        "the first process" if self._stop_noted else "another process", after)
        stop = SIGTERMException()
        stop.all_processes = True  # type: ignore[attr-defined]
        # the saved run then calls submitit's handler, which requeues the job (`requeue`)
        stop.preemption = self._preemption if self._preempted else None  # type: ignore[attr-defined]
        raise stop

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        if (self._agrees_on_stops(trainer) and not self._stop_after_epoch
                and self._stop_agreed(trainer, pl_module)):
            if not last_of_epoch:
                self._stop_together(trainer, f"step {trainer.global_step}")
            self._stop_after_epoch = True  # see on_train_epoch_start
        if not last_of_epoch:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a stop agreed on the last step of the epoch before, which has been validated and saved
        if self._stop_after_epoch:
            self._stop_together(trainer, f"step {trainer.global_step} and its epoch's validation")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # a stop agreed on the fit's last step, or noted during its last validation (after the
        # last agreement): stop here, together, rather than go on to what follows the fit (its
        # test; class cross-validation and the refit) as if no signal had come
        if self._agrees_on_stops(trainer) and (self._stop_after_epoch
                                               or self._stop_agreed(trainer, pl_module)):
            self._stop_together(trainer, f"step {trainer.global_step}, the end of the fit")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        # SIGTERM (a cluster's preemption or time limit): Lightning stops after the current
        # batch; save it, so nothing is lost. Under DDP only when every process stopped at this
        # step (the stop agreed above): a save is a collective step.
        together = trainer.world_size == 1 or getattr(exception, "all_processes", False)
        if (isinstance(exception, SIGTERMException) and together
                and not self._should_skip_saving_checkpoint(trainer)):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with its temporary file beside the checkpoint
    (`replace_atomically`), not in the system's temporary folder.

    Lightning writes into `tempfile.mkstemp()` and moves that onto the checkpoint. Where the
    temporary folder is on another file system than the run directory (a cluster node's local
    /tmp, outputs on a shared disk) the move is a copy into the checkpoint itself, so a kill
    during it truncates last.ckpt, the file the run resumes from; a full or missing temporary
    folder fails every save; and a kill mid-write leaves an anonymous `tmp*` file there. Here a
    kill leaves `<checkpoint>.<pid>.tmp` at worst, and the checkpoint is always whole.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's way
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, lambda tmp: torch.save(checkpoint, tmp))


def write_checkpoints_atomically(trainer: pl.Trainer) -> pl.Trainer:
    """`trainer` with `AtomicCheckpointIO` as its checkpoint writer, unless its config chose
    another writer than Lightning's default (`trainer.plugins`)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    return trainer


def submitit_preemption() -> tuple[int, Any] | None:
    """(signal, handler) where submitit handles its preemption signal in this process (a job of
    a submitit launcher: SUBMITIT_PREEMPT_SIGNAL, USR2 by default), else None."""
    signum = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    if signum is None:  # not on Windows
        return None
    handler = signal.getsignal(signum)
    owner = type(getattr(handler, "__self__", None)).__module__
    return (signum, handler) if owner.startswith("submitit.") else None


def requeue(stop: BaseException) -> None:
    """After a stop by submitit's preemption signal has been saved: call submitit's handler,
    which requeues the job (from the first process) and ends this one."""
    preemption = getattr(stop, "preemption", None)
    if preemption is not None:
        signum, handler = preemption
        handler(signum, None)


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (the validation-selected checkpoint), whose best so far also
    survives a resume into another run directory (`ckpt_path=<other run>/checkpoints/last.ckpt`).

    Lightning keeps only the best path then and forgets its score, so the next validation would
    become the best whatever it scored, and the run would test (and refit for as long as) another
    checkpoint than the uninterrupted run. Here the best files so far are copied into this run's
    `dirpath` with their scores, so the choice goes on as if never interrupted, and the other
    run's files are never deleted when a better checkpoint replaces them.

    Validation follows each training epoch, so a `trainer.max_steps` that ends within an epoch
    leaves its last steps unvalidated: it says so as the fit starts, before the time is spent.
    `no_step_validated` then says whether that warning was that no step is ever validated (the
    test's own "no best checkpoint" warning refers to it instead of explaining it again).
    """

    no_step_validated = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.no_step_validated = False
        epoch = steps_per_epoch(trainer)
        if trainer.max_steps <= 0 or not epoch:
            return
        tail = trainer.max_steps % epoch
        if tail and (trainer.max_epochs is None or trainer.max_epochs < 0):
            first = trainer.max_steps - tail + 1
            self.no_step_validated = first == 1  # on every process: each tests
            if not trainer.is_global_zero:
                return
            unvalidated = (f"step {first} is" if tail == 1 else f"steps {first}-{trainer.max_steps} are")
            outcome = (f"{unvalidated} never validated, and the test takes the best validated step"
                       if first > 1 else "no step is ever validated, and the test takes the last weights")
            log.warning("trainer.max_steps=%d ends %d step(s) into an epoch of %d, and validation "
                        "follows each epoch: %s. To validate the end, make trainer.max_steps a "
                        "multiple of %d or change the epoch's length "
                        "(dataset.episodes.train.n_episodes for few-shot, dataset.steps_per_epoch "
                        "for zero-shot).", trainer.max_steps, tail, epoch, outcome, epoch)

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self.no_step_validated and self.monitor not in monitor_candidates:
            # nothing to rank, as said when the fit started: Lightning would add "could not find
            # the monitored key ... Did you call `log(...)`?", as if the model failed to log it
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        before = state_dict.get("dirpath", self.dirpath)
        if before == self.dirpath or state_dict.get("best_model_score") is None:
            super().load_state_dict(state_dict)
            return
        best_k = state_dict.get("best_k_models", {})
        moved = {old: str(Path(self.dirpath) / Path(old).name) for old in best_k}
        # a run directory that was itself moved or copied already holds them
        missing = [old for old, new in moved.items() if not Path(old).is_file() and not Path(new).is_file()]
        if missing:
            raise FileNotFoundError(
                f"Resuming into {self.dirpath} from a checkpoint of the run in {before}, whose "
                f"validation-selected checkpoint(s) {missing} are in neither directory: the "
                "resumed run could not test the checkpoint validation chose. Put them back, or "
                "resume from that run's own last.ckpt.")
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        for old, new in moved.items():
            if Path(new).is_file():
                continue
            # atomic, so no DDP rank loads (and no crash leaves) a half-copied checkpoint; copy2
            # streams the file (checkpoints can be large) and keeps its times
            replace_atomically(new, lambda tmp, old=old: shutil.copy2(old, tmp))
        self.best_k_models = {moved[p]: score for p, score in best_k.items()}
        self.best_model_path = moved.get(state_dict["best_model_path"], state_dict["best_model_path"])
        self.best_model_score = state_dict["best_model_score"]
        self.kth_best_model_path = moved.get(state_dict.get("kth_best_model_path", ""), "")
        self.kth_value = state_dict.get("kth_value", self.kth_value)
        log.info("Resumed from the run in %s: its validation-selected checkpoint(s) copied to %s",
                 before, sorted(moved.values()))


class FitKey(pl.Callback):
    """Writes what a fit depends on (`key`: plain, comparable values) into its checkpoints
    (`checkpoint["fewzero_fit"]`), so that a later attempt resumes from them only when it would
    train the same thing (`fewzero.train.resumable_fit`)."""

    def __init__(self, key: dict[str, Any]) -> None:
        self.key = key

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint["fewzero_fit"] = self.key

    @staticmethod
    def read(ckpt_path: str | Path) -> dict[str, Any] | None:
        """The key recorded in a checkpoint; None for one without."""
        return torch.load(ckpt_path, map_location="cpu", weights_only=False).get("fewzero_fit")


class RngAtFirstBatch(pl.Callback):
    """For fits without `StepSeed` (class-CV folds, the refit: seeded once, so that they train as
    they always have): a resume from a checkpoint written mid-epoch goes on with the global RNG
    state saved in it, as the uninterrupted fit would. `ResumableModule` restores that state as
    the checkpoint loads, but a fresh process then creates the data-loader iterator, which draws
    from it; after an epoch-end checkpoint the uninterrupted fit draws there too, mid-epoch it
    does not. So the state is set again before the first batch of a mid-epoch resume."""

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._state = checkpoint.get("rng_state")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        state, self._state = self._state, None
        if state is not None and batch_idx > 0:
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])


class RunRecord(pl.Callback):
    """Writes the run's config and command-line overrides into every checkpoint it saves
    (`checkpoint["fewzero_run"]`), so that a resume can check that it continues the same run
    (`fewzero.train.check_resume`), and the data folders it read, so that a resume or
    `fewzero.eval` reading others says so (`fewzero.train.warn_of_other_data_folders`).

    Args:
        config: the composed config as a plain container, interpolations unresolved.
        overrides: the command line's overrides without `ckpt_path`; None when unknown.
        data_folders: `fewzero.train.data_folders` of the run: its config's folders resolved,
            which the unresolved config cannot tell (they follow FEWZERO_DATA and the working
            directory).
    """

    def __init__(self, config: dict[str, Any], overrides: list[str] | None,
                 data_folders: dict[str, str] | None = None) -> None:
        self.config = config
        self.overrides = overrides
        self.data_folders = data_folders

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint["fewzero_run"] = {"config": self.config, "overrides": self.overrides,
                                     "data_folders": self.data_folders}

    @staticmethod
    def read(ckpt_path: str | Path) -> dict[str, Any] | None:
        """{"config", "overrides", "data_folders"} recorded in a checkpoint (no "data_folders"
        before 2026-12-06); None for one written before 2026-12-05."""
        return torch.load(ckpt_path, map_location="cpu", weights_only=False).get("fewzero_run")


class StopOnInterrupt(pl.Callback):
    """Ctrl-C during training stops the run as SIGTERM does: Lightning finishes the current step,
    `LastCheckpoint` saves it, and `fewzero.train` prints the command that resumes. A second
    Ctrl-C stops at once (Lightning's own handling: up to `every_n_train_steps` steps lost).
    Under DDP (Ctrl-C reaches every process of the terminal's group) only with a
    `LastCheckpoint`, whose handler makes the processes stop together. Installed when training
    starts, after Lightning has noted the handlers to restore when the fit ends, so it is gone
    after the fit."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the main fit's last.ckpt, class-CV folds' and the refit's own progress files
        self.saves_to = next((f"{c.filename}.ckpt" for c in trainer.callbacks
                              if isinstance(c, LastCheckpoint)), None)
        self.says = trainer.is_global_zero  # the message once, not once per process
        if ((trainer.world_size == 1 or self.saves_to is not None)
                and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler
                and callable(signal.getsignal(signal.SIGTERM))):  # Lightning's or LastCheckpoint's
            signal.signal(signal.SIGINT, self._stop_after_this_step)

    def _stop_after_this_step(self, signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.says:
            log.warning("Ctrl-C: %s, then stopping (Ctrl-C again stops at once).",
                        f"saving this step to {self.saves_to}" if self.saves_to else "finishing this step")
        signal.raise_signal(signal.SIGTERM)  # the SIGTERM handler: stop after this batch
