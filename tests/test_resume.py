"""Faults: a run stopped (SIGTERM) or killed (SIGKILL) mid-training and resumed with
`ckpt_path=last` ends with exactly the metrics of an uninterrupted run."""

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import cli_processes
import pytest
import pytorch_lightning as pl
import torch
from conftest import FSL_OVERRIDES, compose_train_cfg
from omegaconf import OmegaConf, open_dict
from pytorch_lightning.utilities.exceptions import SIGTERMException

from fewzero.callbacks import AtomicCheckpointIO, LastCheckpoint, RngAtFirstBatch, StopOnInterrupt
from fewzero.data.clips import TINYSOL_INSTRUMENTS
from fewzero.models.resumable import ResumableModule
from fewzero.train import interpreter, train

# 3 epochs of 4 steps; last.ckpt every 3 steps and after each epoch's validation
SHORT_EPOCHS = ["trainer.deterministic=true", "seed=5", "trainer.max_steps=12",
                "dataset.episodes.train.n_episodes=4", "callbacks.last_checkpoint.every_n_train_steps=3",
                "model.plot_episodes=0"]


def _report(run: Path) -> dict:
    report = json.loads((run / "metrics.json").read_text())
    return {"metrics": report["metrics"], "test_episodes": report["test_episodes"]}


class _Sigterm(pl.Callback):
    """Sends this process a real SIGTERM before optimiser step `at_step` + 1."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGTERM)  # LastCheckpoint's handler takes it


class _SigtermInValidation(pl.Callback):
    """Sends this process a real SIGTERM as the validation after optimiser step `at_step` starts."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and not trainer.sanity_checking and trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGTERM)


class _SigtermInLastValidation(pl.Callback):
    """Sends the process of rank `rank` a real SIGTERM as the fit's last validation starts."""

    def __init__(self, rank: int):
        self.rank = rank

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if (trainer.global_rank == self.rank and batch_idx == 0 and not trainer.sanity_checking
                and trainer.global_step == trainer.max_steps):
            os.kill(os.getpid(), signal.SIGTERM)


class _PreemptOnce(pl.Callback):
    """Sends this process the cluster's preemption signal (submitit's USR2) before optimiser step
    `at_step` + 1, once per `marker` file: the requeued job is not preempted again."""

    def __init__(self, at_step: int, marker: str):
        self.at_step, self.marker = at_step, Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGUSR2)


class _Saves(LastCheckpoint):
    """LastCheckpoint that records (global step, validations run so far) at every write."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saves: list[tuple[int, int]] = []

    def _save_checkpoint(self, trainer, filepath):
        self.saves.append((trainer.global_step, trainer.fit_loop.epoch_loop.val_loop.batch_progress
                           .total.completed))
        super()._save_checkpoint(trainer, filepath)


def test_last_checkpoint_every_n_steps_and_after_each_epochs_validation(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["trainer.max_steps=7", "dataset.episodes.train.n_episodes=3",
                                       "test=false"])
    with open_dict(cfg):
        cfg.callbacks.last_checkpoint._target_ = "test_resume._Saves"
        cfg.callbacks.last_checkpoint.every_n_train_steps = 2
    _, objects = train(cfg)
    saves = next(c for c in objects["trainer"].callbacks if isinstance(c, _Saves)).saves
    # 2, 4: every 2 steps; 3, 6: epoch ends (6, a multiple of 2 too, is written after the
    # epoch's validation, not before it); 7: the end of training
    assert [step for step, _ in saves] == [2, 3, 4, 6, 7]
    validations = dict(saves)
    assert validations[6] > validations[4]  # epoch 2's validation is in the step-6 checkpoint
    assert objects["trainer"].global_step == 7


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_that_step_and_the_resumed_run_matches(tmp_path):
    # 2 epochs; the lower validation score chooses, so that the first epoch's checkpoint is the best
    short = SHORT_EPOCHS + ["trainer.max_steps=8", "callbacks.model_checkpoint.mode=min"]
    full = compose_train_cfg(tmp_path / "full", short)
    train(full)
    uninterrupted = Path(full.paths.output_dir)
    best = Path(json.loads((uninterrupted / "metrics.json").read_text())["checkpoint"])
    assert best.name.startswith("step000004-")  # chosen before the stop: what a resume must keep
    stopped = compose_train_cfg(tmp_path / "stopped", short)
    with open_dict(stopped):
        stopped.callbacks.sigterm = {"_target_": "test_resume._Sigterm", "at_step": 4}
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException
        train(stopped)
    run = Path(stopped.paths.output_dir)
    # step 5 is no multiple of 3 nor an epoch end: written because of the SIGTERM
    assert _step(run / "checkpoints" / "last.ckpt") == 5
    # from that checkpoint into a new run directory: the best so far (step 4) comes along
    elsewhere = compose_train_cfg(tmp_path / "elsewhere", short + [f"ckpt_path={run}/checkpoints/last.ckpt"])
    train(elsewhere)
    resumed = compose_train_cfg(tmp_path / "stopped", short + ["ckpt_path=last"])
    train(resumed)
    assert _report(run) == _report(uninterrupted)
    assert _report(Path(elsewhere.paths.output_dir)) == _report(uninterrupted)
    tested = Path(json.loads((Path(elsewhere.paths.output_dir) / "metrics.json").read_text())["checkpoint"])
    assert tested.parent == Path(elsewhere.paths.output_dir) / "checkpoints"
    assert tested.name == best.name


class _SnapshotCheckpoints(pl.Callback):
    """Copies the run's checkpoints folder to `to` before optimiser step `at_step` + 1: a run
    killed there, as its disk would have it."""

    def __init__(self, source: str, to: str, at_step: int):
        self.source, self.to, self.at_step = source, to, at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            shutil.copytree(self.source, self.to)


def _stopped_at_step_5_and_resumed(tmp_path: Path, overrides: list[str], callback: str) -> Path:
    """Train `overrides` in `tmp_path/stopped` with this module's `callback` sending SIGTERM at
    step 4; check that the stop saved step 5, resume from it, and return the run directory."""
    stopped = compose_train_cfg(tmp_path / "stopped", overrides)
    with open_dict(stopped):
        stopped.callbacks.sigterm = {"_target_": f"test_resume.{callback}", "at_step": 4}
    with pytest.raises(SystemExit):
        train(stopped)
    run = Path(stopped.paths.output_dir)
    assert _step(run / "checkpoints" / "last.ckpt") == 5
    train(compose_train_cfg(tmp_path / "stopped", [*overrides, "ckpt_path=last"]))
    return run


def test_a_sigterm_during_a_validation_of_several_batches_lets_it_end_before_the_run_stops(tmp_path):
    """Lightning's handler raised within the validation after step 4 (of 8-clip batches), and
    the epoch-end save that followed held step 4 without that validation: the resumed run never
    validated step 4, and tested another checkpoint."""
    short = [*SHORT_EPOCHS, "trainer.max_steps=8", "callbacks.model_checkpoint.mode=min",
             "dataset.eval_batch_size=8"]
    full = compose_train_cfg(tmp_path / "full", short)
    train(full)
    # the stop waits for the validation to end, then for step 5
    run = _stopped_at_step_5_and_resumed(tmp_path, short, "_SigtermInValidation")
    reports = [json.loads((path / "metrics.json").read_text()) for path in (Path(full.paths.output_dir), run)]
    assert Path(reports[1]["checkpoint"]).name == Path(reports[0]["checkpoint"]).name
    assert Path(reports[0]["checkpoint"]).name.startswith("step000004")  # mode=min: the first
    assert reports[1]["metrics"] == reports[0]["metrics"]
    assert _logged_steps(run, "val/acc") == _logged_steps(Path(full.paths.output_dir), "val/acc") == [3, 7]


def test_a_kill_between_a_new_best_and_last_ckpt_tests_that_best_under_its_own_name(tmp_path):
    """Killed after the step-4 best was saved but before last.ckpt was rewritten: the resume
    (from step 3) saves that best again. Lightning's version counter made it a "-v1" copy,
    which the test then named, with the first file left behind."""
    short = [*SHORT_EPOCHS, "trainer.max_steps=8", "callbacks.model_checkpoint.mode=min"]
    full = compose_train_cfg(tmp_path / "full", short)
    killed = tmp_path / "killed" / "run" / "checkpoints"
    with open_dict(full):
        full.callbacks.snapshot = {"_target_": "test_resume._SnapshotCheckpoints", "at_step": 3,
                                   "source": f"{full.paths.output_dir}/checkpoints", "to": str(killed)}
    train(full)
    best = Path(json.loads((tmp_path / "full" / "run" / "metrics.json").read_text())["checkpoint"])
    assert best.name.startswith("step000004")  # mode=min keeps the first epoch's
    shutil.copy2(best, killed)
    train(compose_train_cfg(tmp_path / "killed", short + ["ckpt_path=last"]))
    assert json.loads((killed.parent / "metrics.json").read_text())["checkpoint"] == str(killed / best.name)
    assert sorted(p.name for p in killed.glob("step*.ckpt")) == [best.name]


def _logged_steps(run: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return sorted({e.step for e in events.Scalars(tag)})


@pytest.mark.slow
def test_resumed_from_an_epoch_end_checkpoint_logs_at_the_uninterrupted_runs_steps(tmp_path):
    """Lightning would count the logging step once more after a resume from a checkpoint written
    at an epoch's end: TensorBoard's curves would go on one step to the right."""
    full = compose_train_cfg(tmp_path / "full", SHORT_EPOCHS + ["test=false"])
    with open_dict(full):  # last.ckpt holds step 4, the first epoch's end, when step 5 starts
        full.callbacks.snapshot = {"_target_": "test_resume._SnapshotCheckpoints", "at_step": 5,
                                   "source": f"{full.paths.output_dir}/checkpoints",
                                   "to": str(tmp_path / "killed" / "run" / "checkpoints")}
    train(full)
    killed = compose_train_cfg(tmp_path / "killed", SHORT_EPOCHS + ["test=false", "ckpt_path=last"])
    assert _step(Path(killed.paths.output_dir) / "checkpoints" / "last.ckpt") == 4
    train(killed)
    for tag in ("val/acc", "train/loss"):
        uninterrupted = _logged_steps(Path(full.paths.output_dir), tag)
        resumed = [step for step in _logged_steps(Path(killed.paths.output_dir), tag) if step > 0]
        assert resumed == [step for step in uninterrupted if step >= 4], tag  # from step 4 on


def _command(root: Path, run: Path) -> list[str]:
    names = ",".join(TINYSOL_INSTRUMENTS)
    return [sys.executable, "-m", "fewzero.train", "dataset/source=tones",
            f"dataset.source.instruments=[{names}]", "dataset.source.clips_per_class=12",
            f"paths.root_dir={root}", f"hydra.run.dir={run}", "+trainer.enable_progress_bar=false",
            "~callbacks.progress_bar", "model.figures=false", *FSL_OVERRIDES, *SHORT_EPOCHS]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run directory of `_command`'s run, uninterrupted: what each single-process run of
    it that was stopped and resumed must end as (trained once per test process)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cli_processes.run(_command(root, root / "full"), check=True, capture_output=True, timeout=600)
    return root / "full"


def _wait_for_new(path: Path, process: cli_processes.Process, old: tuple | None, timeout: float = 300):
    """Wait until `path` is (re)written, i.e. its (inode, mtime) differs from `old`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists():
            stat = path.stat()
            if (stat.st_ino, stat.st_mtime_ns) != old:
                return
        time.sleep(0.01)
    raise AssertionError(f"{path} was not written before the run ended (rc {process.poll()})")


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def _stop_once_saved(process: cli_processes.Process, last: Path, signum: int) -> int:
    """Send `signum` once `process` has written `last`; it must stop as SIGTERM does (status
    143) between steps 0 and 12 of the 12-step run. Returns the step it saved."""
    _wait_for_new(last, process, None)
    process.send_signal(signum)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM
    stopped_at = _step(last)
    assert 0 < stopped_at < 12
    return stopped_at


@pytest.mark.slow
def test_run_stopped_by_sigterm_then_killed_resumes_to_the_uninterrupted_metrics(tmp_path, uninterrupted):
    run = tmp_path / "interrupted"
    last = run / "checkpoints" / "last.ckpt"
    log = (tmp_path / "interrupted.log").open("w")

    # SIGTERM as soon as a checkpoint exists: Lightning finishes the batch, last.ckpt gets it
    stopped_at = _stop_once_saved(cli_processes.start(_command(tmp_path, run), stdout=log, stderr=log),
                                  last, signal.SIGTERM)

    # resume, then SIGKILL (no clean-up at all) once the resumed run has written a checkpoint
    stat = last.stat()
    second = cli_processes.start(_command(tmp_path, run) + ["ckpt_path=last"], stdout=log, stderr=log)
    _wait_for_new(last, second, (stat.st_ino, stat.st_mtime_ns))
    second.kill()
    assert second.wait(timeout=60) == -signal.SIGKILL
    killed_at = _step(last)
    assert stopped_at < killed_at < 12

    cli_processes.run(_command(tmp_path, run) + ["ckpt_path=last"], check=True, capture_output=True,
                      timeout=600)
    assert _report(run) == _report(uninterrupted)


@contextlib.contextmanager
def _process_group(command: list[str], log: IO[str]) -> Iterator[cli_processes.Process]:
    """`command` started in a process group of its own (a DDP run's processes), which is
    killed on the way out: a test that fails on a hung run leaves no processes behind."""
    process = cli_processes.start(command, stdout=log, stderr=log, start_new_session=True)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


def _rank_process(main: cli_processes.Process, rank: int, timeout: float = 120) -> int:
    """The pid of DDP process `rank` (> 0), which Lightning starts as a child of `main`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and main.poll() is None:
        children = Path(f"/proc/{main.pid}/task/{main.pid}/children").read_text().split()
        for pid in children:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:  # gone already
                continue
            if f"LOCAL_RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no process of rank {rank} under {main.pid}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the DDP processes in /proc")
def test_a_ddp_run_trains_tests_re_evaluates_and_resumes_from_each_stop_to_the_uninterrupted_metrics(
        tmp_path):
    """Two gloo processes started by the real command line, each training on its share of the
    episodes. One test, as each DDP start spends 11-14 s importing in its second process:
    1. uninterrupted: it trains and tests, and `fewzero.eval` re-evaluates its checkpoint with
       the run's two processes into the one directory the command chose;
    2. SIGTERM to the second process alone (as when a node's tasks are signalled one by one):
       both stop after the same step and save it together;
    3. resumed, then killed outright (SIGKILL to both);
    4. resumed and signalled during the fit's last validation: the stop is agreed as the fit
       ends, so the run does not go on to its test as if no signal had come;
    5. resumed: it trains no more, tests, and ends as the uninterrupted run does."""
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    full = tmp_path / "full"
    done = cli_processes.run(_command(tmp_path, full) + ddp, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Starting with 2 processes" in done.stdout + done.stderr
    assert (done.stdout + done.stderr).count("Building datamodule") == 1  # the first process's
    assert _report(full)["test_episodes"]["5way_5shot"]["n_episodes"] == 6
    evaluated = cli_processes.run([sys.executable, "-m", "fewzero.eval",
                                   f"ckpt_path={full / 'checkpoints' / 'last.ckpt'}"],
                                  capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    outputs = list((tmp_path / "outputs" / "eval" / "runs").iterdir())
    assert len(outputs) == 1 and (outputs[0] / "metrics.json").is_file()

    run = tmp_path / "interrupted"
    last = run / "checkpoints" / "last.ckpt"
    log_file = tmp_path / "interrupted.log"
    with log_file.open("w") as log, _process_group(_command(tmp_path, run) + ddp, log) as first:
        second_rank = _rank_process(first, rank=1)
        _wait_for_new(last, first, None)
        os.kill(second_rank, signal.SIGTERM)
        assert first.wait(timeout=300) == 128 + signal.SIGTERM
    printed = log_file.read_text()
    stopped_at = _step(last)
    assert 0 < stopped_at < 12
    # (on an epoch's last step: "... after step 4 and its epoch's validation.")
    assert f"A stop signal reached another process: every process stops after step {stopped_at}" in printed
    assert f"last.ckpt holds step {stopped_at}; resume with" in printed
    assert "Traceback" not in printed  # the first process did not lose its peer mid-step

    stat = last.stat()
    with (log_file.open("a") as log,
          _process_group(_command(tmp_path, run) + ddp + ["ckpt_path=last"], log) as second):
        _wait_for_new(last, second, (stat.st_ino, stat.st_mtime_ns))
    # killed outright on the way out of the block (SIGKILL to both processes)
    assert stopped_at < _step(last) < 12

    signal_it = ["+callbacks.sigterm_in_validation._target_=test_resume._SigtermInLastValidation",
                 "+callbacks.sigterm_in_validation.rank=1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    stopped = cli_processes.run(_command(tmp_path, run) + ddp + ["ckpt_path=last"] + signal_it,
                                capture_output=True, text=True, timeout=600, env=env)
    printed = stopped.stdout + stopped.stderr
    assert stopped.returncode == 128 + signal.SIGTERM, printed[-3000:]
    assert ("A stop signal reached another process: every process stops after step 12, the end "
            "of the fit." in printed)
    assert "last.ckpt holds step 12; resume with" in printed and "Traceback" not in printed
    assert not (run / "metrics.json").exists()  # not tested
    assert _step(last) == 12

    cli_processes.run(_command(tmp_path, run) + ddp + ["ckpt_path=last"], check=True,
                      capture_output=True, timeout=600)
    assert _report(run) == _report(full)
    # no validation skipped: a stop on an epoch's last step waits for that epoch's validation
    assert _logged_steps(run, "val/acc") == _logged_steps(full, "val/acc")


def test_a_run_resumed_after_its_last_validation_reports_that_validation(tmp_path):
    """Validations at steps 4 and 8 of 10 (a max_steps run ends mid-epoch, unvalidated); stopped
    at step 9 and resumed, the run validates no more, yet val/acc_best, val/acc and what a
    sweeper optimises (`main`'s return) must be the uninterrupted run's, in metrics.json and in
    the checkpoints a later resume reads."""
    settings = [*SHORT_EPOCHS, "trainer.max_steps=10"]
    full, _ = train(compose_train_cfg(tmp_path / "full", settings), overrides=settings)
    assert {"val/acc_best", "val/acc"} <= set(full)
    stopped = compose_train_cfg(tmp_path / "stopped", settings)
    with open_dict(stopped):
        stopped.callbacks.sigterm = {"_target_": "test_resume._Sigterm", "at_step": 8}
    with pytest.raises(SystemExit):
        train(stopped, overrides=settings)
    run = Path(stopped.paths.output_dir)
    assert _step(run / "checkpoints" / "last.ckpt") == 9
    resumed, _ = train(compose_train_cfg(tmp_path / "stopped", [*settings, "ckpt_path=last"]))
    assert _report(run) == _report(tmp_path / "full" / "run")
    paths = {"test/checkpoint"}  # each run's own
    assert {k: v for k, v in resumed.items() if k not in paths} == {
        k: v for k, v in full.items() if k not in paths}
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["fit_metrics"]
    assert saved["val/acc_best"] == full["val/acc_best"]


def test_resume_from_last_checkpoint_continues_the_step_count_and_the_stream(tmp_path, caplog):
    settings = ["trainer.max_steps=6", "test=false"]
    first = compose_train_cfg(tmp_path, settings)
    with open_dict(first):
        first.callbacks.sigterm = {"_target_": "test_resume._Sigterm", "at_step": 3}
    with pytest.raises(SystemExit):
        train(first, overrides=settings)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 4
    assert "val_acc_best.max_value" in saved["state_dict"] and "rng_state" in saved
    assert saved["fewzero_run"]["overrides"] == settings
    assert saved["fewzero_run"]["config"]["trainer"]["max_steps"] == 6
    assert saved["FewShotDataModule"] == {"stream_items_read": 4, "global_step": 4, "items_per_step": 1}
    # as if two processes had read 50 episodes by step 4: the resume reads on from episode 50
    saved["FewShotDataModule"].update(stream_items_read=50, items_per_step=2)
    del saved["fewzero_run"]["config"]["model"]["figures"]  # as in a run older than that setting
    torch.save(saved, last)
    # where it trains and whether it draws may change: trainer.accelerator was "auto"
    with caplog.at_level(logging.WARNING, logger="fewzero.data.datamodule"):
        _, objects = train(compose_train_cfg(tmp_path, [*settings, "trainer.accelerator=cpu",
                                                        "model.figures=true", "ckpt_path=last"]))
    assert objects["trainer"].global_step == 6
    assert objects["trainer"].train_dataloader.dataset.first_episode == 50
    assert "the checkpointed run 2" in caplog.text and "from stream item 50" in caplog.text


def test_a_checkpoint_restores_the_global_random_state_it_was_saved_with():
    # the StepSeed callback reseeds every step, which hides this in whole runs
    module = ResumableModule()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    drawn = torch.rand(4)
    module.on_load_checkpoint(checkpoint)
    assert torch.equal(torch.rand(4), drawn)


def test_the_epoch_training_accuracy_averages_every_step_and_goes_on_after_a_mid_epoch_restore():
    module = ResumableModule()
    for batch_idx, accuracy in enumerate([1.0, 0.0, 0.0]):
        module.on_train_batch_start(None, batch_idx)
        module.train_acc(torch.tensor(accuracy))
    assert float(module.train_acc.compute()) == pytest.approx(1 / 3)
    resumed = ResumableModule()
    resumed.load_state_dict(module.state_dict())  # the checkpoint carries the running mean
    resumed.on_train_batch_start(None, 3)  # a resume goes on mid-epoch: batch_idx continues
    resumed.train_acc(torch.tensor(1.0))
    assert float(resumed.train_acc.compute()) == pytest.approx(2 / 4)
    resumed.on_train_batch_start(None, 0)  # the next epoch starts afresh
    resumed.train_acc(torch.tensor(0.0))
    assert float(resumed.train_acc.compute()) == 0.0


def test_resume_with_other_training_settings_is_refused_and_the_runs_config_kept(tmp_path):
    settings = ["trainer.max_steps=4", "test=false", "model.optimizer.lr=0.002"]
    first = compose_train_cfg(tmp_path, settings)
    train(first, overrides=settings)
    run = Path(first.paths.output_dir)
    # what Hydra writes into the run directory before fewzero.train sees the resume's config
    again = ["trainer.max_steps=6", "test=false", "ckpt_path=last"]
    resumed = compose_train_cfg(tmp_path, again)
    OmegaConf.save(resumed, run / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(again), run / ".hydra" / "overrides.yaml")
    with pytest.raises(ValueError) as refused:
        train(resumed, overrides=again)
    message = str(refused.value)
    assert "trainer.max_steps: 4 in the run, 6 now" in message
    assert "model.optimizer.lr: 0.002 in the run, 0.001 now" in message
    assert (f"{interpreter()} -m fewzero.train trainer.max_steps=4 test=false model.optimizer.lr=0.002 "
            f"ckpt_path=last hydra.run.dir={run}") in message
    assert OmegaConf.load(run / ".hydra" / "config.yaml").trainer.max_steps == 4
    assert list(OmegaConf.load(run / ".hydra" / "overrides.yaml")) == settings
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4

    # a resume that fails for another reason (no such checkpoint) keeps the run's files too
    mistyped = ["trainer.max_steps=6", "test=false", "ckpt_path=best"]
    OmegaConf.save(compose_train_cfg(tmp_path, mistyped), run / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(mistyped), run / ".hydra" / "overrides.yaml")
    with pytest.raises(FileNotFoundError, match="Checkpoint best does not exist"):
        train(compose_train_cfg(tmp_path, mistyped), overrides=mistyped)
    assert OmegaConf.load(run / ".hydra" / "config.yaml").trainer.max_steps == 4
    assert list(OmegaConf.load(run / ".hydra" / "overrides.yaml")) == settings


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_and_prints_the_command_that_resumes(tmp_path):
    """A run with a config group of the user's own (--config-dir) and a class of theirs on
    PYTHONPATH: the printed command keeps the folder, says which PYTHONPATH, and resumes."""
    run = tmp_path / "interrupted"
    last = run / "checkpoints" / "last.ckpt"
    log_path = tmp_path / "interrupted.log"
    (tmp_path / "myconf" / "local").mkdir(parents=True)
    (tmp_path / "myconf" / "local" / "mine.yaml").write_text("# @package _global_\ntags: [mine]\n")
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "myplugin.py").write_text(
        "import pytorch_lightning as pl\n\n\nclass Nothing(pl.Callback):\n    pass\n")
    pythonpath = os.pathsep.join([str(tmp_path / "plugins"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    started = [*_command(tmp_path, run)[:3], "--config-dir", str(tmp_path / "myconf"), "local=mine",
               "+callbacks.mine._target_=myplugin.Nothing", *_command(tmp_path, run)[3:]]
    with log_path.open("w") as log:
        # as from a terminal; the child must not inherit a SIGINT the test runner ignores
        _stop_once_saved(cli_processes.start(started, stdout=log, stderr=log, env=env,
                                             default_sigint=True),
                         last, signal.SIGINT)
    output = log_path.read_text()
    assert "Ctrl-C: saving this step" in output and "Traceback" not in output
    assert f"last.ckpt holds step {_step(last)}; resume with:" in output
    printed = output.split("resume with:\n", 1)[1].splitlines()
    command = shlex.split(printed[0])
    assert command[:5] == [interpreter(), "-m", "fewzero.train", "--config-dir", str(tmp_path / "myconf")]
    assert "local=mine" in command and f"hydra.run.dir={run}" in command
    assert printed[1].startswith(f"(with PYTHONPATH={shlex.quote(pythonpath)} set again: this run "
                                 "imported ") and "myplugin" in printed[1]
    cli_processes.run(command, check=True, capture_output=True, timeout=600, env=env)
    assert _step(last) == 12 and (run / "metrics.json").is_file()


@pytest.mark.slow
def test_a_multirun_stopped_by_sigterm_prints_the_command_that_finishes_the_sweep(tmp_path):
    """Job 1 of seeds 0,1,2 stopped mid-fit: the printed command finishes the sweep in its own
    directory (job 0 kept as it finished, job 1 resumed from its last.ckpt, job 2 started)."""
    sweep = tmp_path / "sweep"
    command = [a for a in _command(tmp_path, tmp_path / "unused") if not a.startswith("hydra.run.dir")]
    command[3:3] = ["-m"]
    command += ["seed=0,1,2", f"hydra.sweep.dir={sweep}", "test=false"]  # a job's end is its fit's
    log_path = tmp_path / "stopped.log"
    with log_path.open("w") as log, _process_group(command, log) as first:
        deadline = time.monotonic() + 300
        while not list(sweep.glob("1_*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 128 + signal.SIGTERM
    output = log_path.read_text()
    assert not list(sweep.glob("2_*")), "the stop ends the multirun"
    finish = shlex.split(output.split("Finish it (stopped jobs resume, finished ones keep their results, "
                                      "the rest start) with:\n", 1)[1].splitlines()[0])
    assert finish[:4] == [interpreter(), "-m", "fewzero.train", "-m"]
    assert "seed=0,1,2" in finish and "ckpt_path=auto" in finish and f"hydra.sweep.dir={sweep}" in finish
    stopped = _step(next(sweep.glob("1_*/checkpoints/last.ckpt")))
    finished = next(sweep.glob("0_*/metrics.json"))
    written = finished.stat().st_mtime_ns
    done = cli_processes.run(finish, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "All 3 jobs finished" in done.stdout + done.stderr
    jobs = sorted(sweep.glob("[0-9]_*"))
    assert len(jobs) == 3 and all((job / "metrics.json").is_file() for job in jobs)
    assert f"Restoring states from the checkpoint path at {jobs[1] / 'checkpoints' / 'last.ckpt'}" in (
        done.stdout + done.stderr)
    assert 0 < stopped < 12
    assert _step(jobs[1] / "checkpoints" / "last.ckpt") == 12  # trained to its end
    assert finished.stat().st_mtime_ns == written  # job 0: neither trained nor tested again
    assert f"{jobs[0]} finished with these settings already" in done.stdout + done.stderr


@pytest.mark.slow
def test_a_submitit_job_preempted_mid_fit_is_requeued_and_ends_as_the_uninterrupted_run(tmp_path,
                                                                                       uninterrupted):
    """The SLURM path run on this machine (hydra/launcher=submitit_local): the preemption signal
    (USR2, also what comes before a time limit) mid-epoch, between periodic writes. The step it
    came at is saved, then submitit requeues the job, which resumes from that step with
    ckpt_path=auto and ends with the uninterrupted run's metrics."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    command = [a for a in _command(tmp_path, tmp_path / "unused") if not a.startswith("hydra.run.dir")]
    command[3:3] = ["-m"]
    command += ["hydra/launcher=submitit_local", "ckpt_path=auto", f"hydra.sweep.dir={sweep}",
                "+callbacks.preempt._target_=test_resume._PreemptOnce", "+callbacks.preempt.at_step=6",
                f"+callbacks.preempt.marker={tmp_path / 'preempted'}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = cli_processes.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (job,) = sweep.glob("0_*")
    log = "".join(path.read_text() for path in sweep.glob(".submitit/*/*_log.*"))
    assert (tmp_path / "preempted").exists() and "Caught signal SIGUSR2" in log
    assert "Requeued job" in log and "Restoring states from the checkpoint path at" in log
    # step 7: after the periodic write at 6, before the epoch's end at 8
    assert "last.ckpt holds step 7; submitit requeues the job, which resumes from there" in log
    assert "The multirun stops here" not in log  # it does not: the job comes back
    assert _report(job) == _report(uninterrupted)


def test_the_whole_sweep_command_is_given_for_hydras_basic_sweeper_only(tmp_path):
    from fewzero.train import sweep_resume_command

    assert sweep_resume_command(tmp_path) is None  # no multirun.yaml
    for sweeper, expected in (("hydra._internal.core_plugins.basic_sweeper.BasicSweeper", True),
                              ("hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", False)):
        overrides = {"hydra": ["hydra.sweep.dir=old", "hydra.mode=MULTIRUN", "hydra/launcher=joblib"],
                     "task": ["seed=0,1", "ckpt_path=last", "model.x='a b'"]}
        OmegaConf.save({"hydra": {**_hydra_node("/x/configs", "/my conf"),
                                  "sweeper": {"_target_": sweeper}, "overrides": overrides}},
                       tmp_path / "multirun.yaml")
        command = sweep_resume_command(tmp_path)
        if not expected:  # an Optuna study resumes with its own command
            assert command is None
            continue
        words = shlex.split(command)
        # the launcher comes along (a SLURM sweep must not go on locally); the directory is this one
        # and the options its config was composed with: a folder of the user's own config groups
        assert words == [interpreter(), "-m", "fewzero.train", "-m", "--config-path", "/x/configs",
                         "--config-dir", "/my conf", "hydra/launcher=joblib", "seed=0,1",
                         "model.x='a b'", "ckpt_path=auto", f"hydra.sweep.dir={tmp_path}"]


def _hydra_node(main: str, config_dir: str | None = None, config_name: str = "train",
                hydra_overrides: tuple[str, ...] = ()) -> dict:
    """The parts of a run's Hydra config (HydraConfig.get(), multirun.yaml) that say how its
    config was composed, as Hydra writes them for `--config-path main --config-dir config_dir`."""
    sources = [{"path": "hydra.conf", "schema": "pkg", "provider": "hydra"},
               {"path": main, "schema": "file", "provider": "main"},
               {"path": "", "schema": "structured", "provider": "schema"}]
    if config_dir is not None:
        sources.insert(2, {"path": config_dir, "schema": "file", "provider": "command-line"})
    return {"runtime": {"config_sources": sources}, "job": {"config_name": config_name},
            "overrides": {"hydra": ["hydra.mode=RUN", *hydra_overrides], "task": []}}


def test_the_options_a_run_was_composed_with_come_back_in_its_resume_command(tmp_path):
    from fewzero.train import CONFIG_DIR, composing_options

    assert composing_options(None) == []  # composed by a script
    assert composing_options(OmegaConf.create(_hydra_node(str(CONFIG_DIR)))) == []  # the defaults
    node = _hydra_node("/my/configs", "/my conf", "mine", ("hydra.searchpath=[file:///extra]",))
    assert composing_options(OmegaConf.create(node)) == [
        "--config-path", "/my/configs", "--config-dir", "/my conf", "--config-name", "mine",
        "hydra.searchpath=[file:///extra]"]


def test_a_resume_command_names_the_pythonpath_a_class_of_the_users_own_came_from(tmp_path, monkeypatch):
    import importlib

    from fewzero.train import pythonpath_hint

    plugins = tmp_path / "my plugins"
    plugins.mkdir()
    (plugins / "leftover_plugin.py").write_text("class Head:\n    pass\n")
    monkeypatch.setenv("PYTHONPATH", str(plugins))
    assert pythonpath_hint() == ""  # nothing imported from there
    monkeypatch.syspath_prepend(str(plugins))
    try:
        importlib.import_module("leftover_plugin")
        assert pythonpath_hint() == (f"\n(with PYTHONPATH='{plugins}' set again: this run imported "
                                     "leftover_plugin from there)")
        monkeypatch.delenv("PYTHONPATH")
        assert pythonpath_hint() == ""
    finally:
        sys.modules.pop("leftover_plugin", None)


def test_the_resume_command_parses_back_to_the_run_in_hydra(tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fewzero.train import resume_command

    run = tmp_path / "runs" / "2026-12-05_seed=1,model.x=a  b"  # named after its overrides
    overrides = ["seed=1", "model.x='a  b'", "hparams_search=optuna"]
    words = shlex.split(resume_command(overrides, run, options=["--config-dir", "/my conf"]))
    assert words[:5] == [interpreter(), "-m", "fewzero.train", "--config-dir", "/my conf"]
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(words[5:])}
    # hparams_search would start a new sweep instead of resuming this job
    assert parsed == {"seed": 1, "model.x": "a  b", "ckpt_path": "last", "hydra.run.dir": str(run)}


def test_a_resume_may_read_its_data_where_they_moved_but_not_other_data(tmp_path):
    """A run given its data folder (dataset.source.root=/lab/...) could not be resumed once the
    folder moved: the new place was refused as another training setting."""
    from fewzero.train import check_resume

    ckpt = tmp_path / "last.ckpt"
    where = ["dataset.source.root=/lab/tones", "dataset.cache_dir=/lab/cache"]
    run = compose_train_cfg(tmp_path, where)
    torch.save({"fewzero_run": {"config": OmegaConf.to_container(run), "overrides": where}}, ckpt)
    check_resume(compose_train_cfg(tmp_path, ["dataset.source.root=/moved/tones",
                                              "dataset.cache_dir=/moved/cache"]), str(ckpt), tmp_path)
    with pytest.raises(ValueError, match="dataset.source.clips_per_class: 12 in the run, 13 now"):
        check_resume(compose_train_cfg(tmp_path, where, clips_per_class=13), str(ckpt), tmp_path)


def test_where_a_run_trains_may_change_on_resume_but_not_what_it_trains(tmp_path):
    from fewzero.train import check_resume

    run = compose_train_cfg(tmp_path, [])
    ckpt = tmp_path / "last.ckpt"
    torch.save({"fewzero_run": {"config": OmegaConf.to_container(run), "overrides": []}}, ckpt)
    check_resume(compose_train_cfg(tmp_path, ["trainer=ddp", "trainer.devices=2", "dataset.num_workers=2"]),
                 str(ckpt), tmp_path)  # the data loaders' workers change no item read
    with pytest.raises(ValueError, match="trainer.precision: '32-true' in the run, 'bf16-mixed' now"):
        check_resume(compose_train_cfg(tmp_path, ["trainer.precision=bf16-mixed"]), str(ckpt), tmp_path)
    # the table that lends another side information's prior its ranges is a training setting too
    borrowed = ["experiment=zsl_word_audio", "model/pitch_prior=range_formant_attributes"]
    run = compose_train_cfg(tmp_path, borrowed)
    torch.save({"fewzero_run": {"config": OmegaConf.to_container(run), "overrides": borrowed}}, ckpt)
    with pytest.raises(ValueError, match="physical_facts.table.Cello.range_low: 36 in the run, 20 now"):
        check_resume(compose_train_cfg(tmp_path, [*borrowed, "physical_facts.table.Cello.range_low=20"]),
                     str(ckpt), tmp_path)


@pytest.mark.parametrize(("override", "refused"), [
    ("flush_denormal=false", "flush_denormal: True in the run, False now"),  # other numbers
    ("callbacks.model_checkpoint.mode=min", "callbacks.model_checkpoint.mode: 'max' in the run, 'min'"),
    ("callbacks.step_seed=null", "callbacks.step_seed._target_: 'fewzero.callbacks.StepSeed' in the run"),
    ("callbacks.stage_timer=null", None),  # times the stages otherwise, trains the same
])
def test_a_resume_may_not_change_the_numbers_nor_how_the_best_checkpoint_is_kept(tmp_path, override,
                                                                                refused):
    """A changed monitor or mode would also make Lightning forget the best so far: its state is
    keyed by them."""
    from fewzero.train import check_resume

    ckpt = tmp_path / "last.ckpt"
    run = OmegaConf.to_container(compose_train_cfg(tmp_path, []))
    del run["callbacks"]["model_checkpoint"]["enable_version_counter"]  # as in runs before it
    torch.save({"fewzero_run": {"config": run, "overrides": []}}, ckpt)
    check_resume(compose_train_cfg(tmp_path, []), str(ckpt), tmp_path)
    if refused is None:
        check_resume(compose_train_cfg(tmp_path, [override]), str(ckpt), tmp_path)
    else:
        with pytest.raises(ValueError, match=re.escape(refused)):
            check_resume(compose_train_cfg(tmp_path, [override]), str(ckpt), tmp_path)


def test_a_training_setting_added_on_resume_is_refused_as_not_set_in_the_run(tmp_path):
    from fewzero.train import check_resume

    ckpt = tmp_path / "last.ckpt"
    run = OmegaConf.to_container(compose_train_cfg(tmp_path, []))
    torch.save({"fewzero_run": {"config": run, "overrides": []}}, ckpt)
    with pytest.raises(ValueError, match=r"model.extra: '\(not set\)' in the run, 3 now"):
        check_resume(compose_train_cfg(tmp_path, ["+model.extra=3"]), str(ckpt), tmp_path)


def test_ckpt_path_auto_resumes_when_there_is_a_last_checkpoint_and_starts_afresh_otherwise(tmp_path):
    from fewzero.train import resolve_ckpt_path

    assert resolve_ckpt_path("auto", tmp_path) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    assert resolve_ckpt_path("auto", tmp_path) == str(last) == resolve_ckpt_path("last", tmp_path)


def test_ckpt_path_auto_leaves_a_run_that_finished_with_the_same_settings_as_it_was(tmp_path, caplog):
    """A sweep's finishing command (ckpt_path=auto) neither trains nor tests a finished job again:
    its metrics.json is read back. Any other setting, or a later last.ckpt (a kill mid-fit of a
    new attempt), makes it a run to resume as before."""
    from fewzero.train import finished_report

    settings = ["trainer.max_steps=4", "dataset.episodes.train.n_episodes=2", "ckpt_path=auto"]
    first, _ = train(compose_train_cfg(tmp_path, settings), overrides=settings)
    run = tmp_path / "run"
    written = (run / "metrics.json").stat().st_mtime_ns
    report = json.loads((run / "metrics.json").read_text())
    with caplog.at_level(logging.INFO, logger="fewzero.train"):
        again, objects = train(compose_train_cfg(tmp_path, settings), overrides=settings)
    assert "finished with these settings already" in caplog.text
    assert again == first and set(objects) == {"cfg"}
    assert (run / "metrics.json").stat().st_mtime_ns == written

    last = run / "checkpoints" / "last.ckpt"
    # ckpt_path is not a setting: the sweep's first command may not have had ckpt_path=auto
    assert finished_report(compose_train_cfg(tmp_path, settings[:-1]), last, run) == report
    other_test = [*settings, "dataset.episodes.test=[{n_way: 5, n_shot: 1, n_query: 5, n_episodes: 3}]"]
    assert finished_report(compose_train_cfg(tmp_path, other_test), last, run) is None
    os.utime(last, ns=(written + 10**9, written + 10**9))  # saved after the results were written
    assert finished_report(compose_train_cfg(tmp_path, settings), last, run) is None
    os.utime(last, ns=(written, written))
    tagged = [*settings, "tags=[again]"]  # a setting a resume may change: tested again
    retested, _ = train(compose_train_cfg(tmp_path, tagged), overrides=tagged)
    assert json.loads((run / "metrics.json").read_text())["tags"] == ["again"]
    assert retested == first  # resumed at its end and tested again, not retrained


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory) -> Callable[[list[str]], Path]:
    """The run directory of an uninterrupted in-process run with these overrides, trained once
    per test process: what the stopped and resumed runs of several tests must end as."""
    runs: dict[tuple[str, ...], Path] = {}

    def run(overrides: list[str]) -> Path:
        if tuple(overrides) not in runs:
            cfg = compose_train_cfg(tmp_path_factory.mktemp("full"), overrides)
            train(cfg)
            runs[tuple(overrides)] = Path(cfg.paths.output_dir)
        return runs[tuple(overrides)]

    return run


ZSL_SHORT = ["trainer.deterministic=true", "seed=5", "trainer.max_steps=8", "dataset.steps_per_epoch=4",
             "callbacks.last_checkpoint.every_n_train_steps=3"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["devise", "eszsl"])  # devise: with the experiment's pitch prior
def test_zero_shot_run_stopped_mid_epoch_resumes_to_the_uninterrupted_metrics(tmp_path, model,
                                                                              trained_once):
    closed_form = ["model=eszsl", "model.pitch_prior=null"] if model == "eszsl" else []  # else the
    short = ["experiment=zsl_attribute_audio", *closed_form, *ZSL_SHORT]  # experiment's devise
    full = trained_once(short)
    run = _stopped_at_step_5_and_resumed(tmp_path, short, "_Sigterm")  # mid-epoch (epochs of 4 steps)

    def zero_shot_report(path: Path) -> dict:
        report = json.loads((path / "metrics.json").read_text())
        return {"metrics": report["metrics"], "zero_shot": report["zero_shot"]}

    resumed, uninterrupted = zero_shot_report(run), zero_shot_report(full)
    assert resumed == uninterrupted
    assert "val/acc_best" in resumed["metrics"] and "test/gzsl_cs_h" in resumed["metrics"]


class _CtrlCIn(StopOnInterrupt):
    """The run's Ctrl-C handling, pressing Ctrl-C (SIGINT to this process) before step `at_step`
    (None: the last step) of the fit that saves to `<fit>.ckpt` (none: never), and counting the
    steps each fit trains."""

    steps: dict[str, int] = {}

    def __init__(self, fit: str | None = None, at_step: int | None = 2):
        self.fit, self.at_step = fit, at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _CtrlCIn.steps[self.saves_to] = _CtrlCIn.steps.get(self.saves_to, 0) + 1
        at_step = trainer.max_steps - 1 if self.at_step is None else self.at_step
        if self.saves_to == f"{self.fit}.ckpt" and trainer.global_step == at_step:
            signal.raise_signal(signal.SIGINT)


@pytest.mark.slow
@pytest.mark.parametrize(("fit", "phase"), [("refit_progress", "the refit on every seen class"),
                                            ("class_cv_fold1_progress", "class cross-validation")])
def test_zero_shot_run_stopped_after_its_main_fit_goes_on_to_the_uninterrupted_metrics(
        tmp_path, fit, phase, trained_once):
    """Ctrl-C during a class-CV fold or the refit stops it as SIGTERM does, saving that fit's
    step to its own checkpoint and naming the phase. The resume starts from a last.ckpt at
    max_steps, whose fit logs nothing; the stopped fit goes on from its step, not from 0, and
    metrics.json ends as the uninterrupted run's, the fit's val/ and train/ keys included."""
    short = ["experiment=zsl_attribute_audio", *ZSL_SHORT]
    full = trained_once(short)
    before = json.loads((full / "metrics.json").read_text())
    steps = before["refit_on_trainval"]["selected_steps"]  # class CV's and the refit's length

    stopped = compose_train_cfg(tmp_path / "stopped", short)
    with open_dict(stopped):
        stopped.callbacks.stop_on_interrupt = {"_target_": "test_resume._CtrlCIn", "fit": fit}
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with pytest.raises(SIGTERMException) as stop:
            train(stopped)
    finally:
        signal.signal(signal.SIGINT, previous)
    checkpoints = Path(stopped.paths.output_dir) / "checkpoints"
    assert stop.value.stopped_during == phase
    assert _step(checkpoints / f"{fit}.ckpt") == 3 and _step(checkpoints / "last.ckpt") == 8
    assert not (checkpoints / "refit_trainval.ckpt").exists()

    resumed = compose_train_cfg(tmp_path / "stopped", short + ["ckpt_path=last"])
    with open_dict(resumed):
        resumed.callbacks.stop_on_interrupt = {"_target_": "test_resume._CtrlCIn"}
    _CtrlCIn.steps.clear()
    metrics, _ = train(resumed)
    after = json.loads((checkpoints.parent / "metrics.json").read_text())
    assert _CtrlCIn.steps[f"{fit}.ckpt"] == steps - 3  # went on from step 3
    assert _CtrlCIn.steps.get("class_cv_fold1_progress.ckpt", 0) == (steps - 3 if "fold" in fit else 0)
    assert not list(checkpoints.glob("*_progress.ckpt"))  # removed once each fit was done
    assert "val/acc_best" in metrics and "val/prior_weight_zsl" in after["metrics"]
    assert after["metrics"] == before["metrics"] and after["zero_shot"] == before["zero_shot"]
    refitted = [torch.load(run / "checkpoints" / "refit_trainval.ckpt", weights_only=False)["state_dict"]
                for run in (full, checkpoints.parent)]
    torch.testing.assert_close(refitted[1], refitted[0], rtol=0, atol=0, equal_nan=True)  # every bit
    for fold in ("class_cv_fold1.pt", "class_cv_fold2.pt"):
        scores = [torch.load(run / "checkpoints" / fold, weights_only=False)["scores"]
                  for run in (full, checkpoints.parent)]
        assert torch.equal(*scores), fold
    if fit == "refit_progress":  # killed during the test: the finished refit is not trained again
        again = compose_train_cfg(tmp_path / "stopped", short + ["ckpt_path=last"])
        with open_dict(again):
            again.callbacks.stop_on_interrupt = {"_target_": "test_resume._CtrlCIn"}
        _CtrlCIn.steps.clear()
        train(again)
        assert _CtrlCIn.steps.get("refit_progress.ckpt", 0) == 0
        report = json.loads((checkpoints.parent / "metrics.json").read_text())
        assert report["zero_shot"] == before["zero_shot"]


@pytest.mark.slow
def test_a_closed_form_refit_stopped_in_its_last_step_fits_its_head_on_resume(tmp_path, trained_once):
    """The stop saves every batch of the refit at its last step, before `on_train_end` fits the
    head on them; the resumed fit has nothing left to train and ends at once. The head was then
    tested all zeros (GZSL H 0)."""
    short = ["experiment=zsl_attribute_audio", "model=eszsl", "model.pitch_prior=null", *ZSL_SHORT]
    full = trained_once(short)
    stopped = compose_train_cfg(tmp_path / "stopped", short)
    with open_dict(stopped):
        stopped.callbacks.stop_on_interrupt = {"_target_": "test_resume._CtrlCIn",
                                               "fit": "refit_progress", "at_step": None}
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with pytest.raises(SIGTERMException):
            train(stopped)
    finally:
        signal.signal(signal.SIGINT, previous)
    checkpoints = Path(stopped.paths.output_dir) / "checkpoints"
    progress = torch.load(checkpoints / "refit_progress.ckpt", weights_only=False)
    steps = json.loads((full / "metrics.json").read_text())["refit_on_trainval"]["steps"]
    assert progress["global_step"] == steps  # saved at the refit's last step
    assert not progress["state_dict"]["head.weight"].any()  # not fitted yet
    train(compose_train_cfg(tmp_path / "stopped", short + ["ckpt_path=last"]))
    heads = [torch.load(run / "checkpoints" / "refit_trainval.ckpt", weights_only=False)["state_dict"]
             ["head.weight"] for run in (full, checkpoints.parent)]
    assert heads[0].any()
    torch.testing.assert_close(heads[1], heads[0], rtol=0, atol=0)
    reports = [json.loads((run / "metrics.json").read_text()) for run in (full, checkpoints.parent)]
    assert reports[1]["metrics"] == reports[0]["metrics"]


def test_the_recorded_overrides_leave_out_ckpt_path_whether_given_or_saved_by_a_script(tmp_path):
    from fewzero.train import run_overrides, save_run_overrides

    assert run_overrides(tmp_path) is None  # neither given nor saved: unknown
    given = ["seed=1", "ckpt_path=last", "+ckpt_path=x.ckpt", "model.optimizer.lr=0.002"]
    assert run_overrides(tmp_path, given) == ["seed=1", "model.optimizer.lr=0.002"]
    save_run_overrides(given, tmp_path)
    assert run_overrides(tmp_path) == ["seed=1", "model.optimizer.lr=0.002"]


def test_a_refused_resume_puts_back_the_config_its_last_checkpoint_records(tmp_path):
    from fewzero.train import restore_run_files

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (tmp_path / ".hydra").mkdir()  # Hydra's, rewritten by the refused command
    # an older selected checkpoint, then last.ckpt of a resume that moved to two devices
    for name, devices in (("step=2.ckpt", 1), ("last.ckpt", 2), ("step=4.ckpt", 1)):
        torch.save({"fewzero_run": {"config": {"trainer": {"devices": devices}},
                                    "overrides": [f"trainer.devices={devices}"]}}, checkpoints / name)
        time.sleep(0.01)  # distinct modification times
    restore_run_files(tmp_path)
    assert OmegaConf.load(tmp_path / ".hydra" / "config.yaml").trainer.devices == 2
    assert list(OmegaConf.load(tmp_path / ".hydra" / "overrides.yaml")) == ["trainer.devices=2"]
    (checkpoints / "last.ckpt").write_bytes(b"cut short")  # unreadable: the newest other one
    torch.save({"fewzero_run": {"config": {"trainer": {"devices": 3}}, "overrides": None}},
               checkpoints / "step=6.ckpt")
    restore_run_files(tmp_path)
    assert OmegaConf.load(tmp_path / ".hydra" / "config.yaml").trainer.devices == 3
    assert list(OmegaConf.load(tmp_path / ".hydra" / "overrides.yaml")) == ["trainer.devices=2"]


def test_a_resumed_run_does_not_write_its_checkpoints_step_again(tmp_path):
    # stopped at the end of the first epoch (step 3), whose last.ckpt holds that step already
    settings = ["trainer.max_steps=7", "dataset.episodes.train.n_episodes=3", "test=false"]

    def run(extra: list[str], sigterm_at: int | None = None) -> list[int]:
        cfg = compose_train_cfg(tmp_path, settings + extra)
        with open_dict(cfg):
            cfg.callbacks.last_checkpoint._target_ = "test_resume._Saves"
            cfg.callbacks.last_checkpoint.every_n_train_steps = 2
            if sigterm_at is not None:
                cfg.callbacks.sigterm = {"_target_": "test_resume._Sigterm", "at_step": sigterm_at}
        _, objects = train(cfg)
        return [step for step, _ in next(c for c in objects["trainer"].callbacks
                                         if isinstance(c, _Saves)).saves]

    with pytest.raises(SIGTERMException):
        run([], sigterm_at=2)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3
    assert run(["ckpt_path=last"]) == [4, 6, 7]  # Lightning replays step 3's epoch end: not saved


def test_checkpoints_are_written_beside_themselves_not_in_the_system_temporary_folder(
        tmp_path, monkeypatch):
    # A cluster node's /tmp on another disk than the outputs made Lightning's move of its temporary
    # file a copy into last.ckpt itself (a kill then truncates it); a full or missing one failed
    # every save. Here it is missing: the main fit's checkpoints and the zero-shot refit's are saved.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no_such_folder"))
    train(compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio", "model.pitch_prior.class_cv=false",
                                       "trainer.max_steps=2", "test=false", "~logger",
                                       "~callbacks.learning_rate_monitor", "model.plot_dir=null"]))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert {"last.ckpt", "refit_trainval.ckpt"} <= {p.name for p in checkpoints.iterdir()}
    assert not list(checkpoints.glob("*.tmp")) and not (tmp_path / "no_such_folder").exists()


def test_a_checkpoint_write_replaces_the_file_and_a_failed_one_keeps_the_previous(tmp_path, monkeypatch):
    path, io = tmp_path / "checkpoints" / "last.ckpt", AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)
    before = path.stat().st_ino
    io.save_checkpoint({"global_step": 2}, path)
    assert path.stat().st_ino != before  # a new file moved into place, never rewritten in place

    def cut_short(obj, f):
        Path(f).write_bytes(b"PK half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"global_step": 3}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"global_step": 2}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_a_fit_removes_the_temporary_files_of_checkpoint_writes_a_kill_cut_short(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    left = [checkpoints / "last.ckpt.4242.tmp", checkpoints / "step000002-val_acc0.5000.ckpt.4242.tmp"]
    for path in left:
        path.write_bytes(b"PK half a checkpoint")
    train(compose_train_cfg(tmp_path, ["test=false", "trainer.max_steps=2"]))
    assert not any(path.exists() for path in left) and (checkpoints / "last.ckpt").is_file()


def test_a_checkpoint_that_records_no_config_is_resumed_with_a_warning(tmp_path, caplog):
    from fewzero.train import check_resume

    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, ckpt)  # written before checkpoints recorded their run
    with caplog.at_level(logging.WARNING, logger="fewzero.train"):
        check_resume(compose_train_cfg(tmp_path, ["model.optimizer.lr=0.5"]), str(ckpt), tmp_path)
    assert "records no config" in caplog.text and "without checking" in caplog.text


def test_a_ddp_stop_comes_after_the_agreed_step_or_after_the_epoch_it_ends(tmp_path):
    """Mid-epoch: every process raises after the step where the stop was agreed. On an epoch's
    last step: after that epoch (its validation and saves), as the next one starts. On the fit's
    last step or during its last validation: as the fit ends."""
    from types import SimpleNamespace

    module = SimpleNamespace(device=torch.device("cpu"))
    # another process noted a signal: the all-reduced sum is 1 whatever this one noted
    strategy = SimpleNamespace(reduce=lambda noted, reduce_op: noted + 1)
    trainer = SimpleNamespace(world_size=2, num_training_batches=4, is_global_zero=True,
                              global_step=6, strategy=strategy)
    keeper = LastCheckpoint(dirpath=str(tmp_path))
    with pytest.raises(SIGTERMException) as stop:
        keeper.on_train_batch_end(trainer, module, None, None, batch_idx=1)
    assert stop.value.all_processes  # on_exception may save: every process is there

    keeper = LastCheckpoint(dirpath=str(tmp_path))
    keeper.on_train_batch_end(trainer, module, None, None, batch_idx=3)  # the epoch's last step
    with pytest.raises(SIGTERMException) as stop:
        keeper.on_train_epoch_start(trainer, module)
    assert stop.value.all_processes

    alone = SimpleNamespace(reduce=lambda noted, reduce_op: noted)  # nobody was signalled
    unsignalled = SimpleNamespace(**{**vars(trainer), "strategy": alone})
    keeper = LastCheckpoint(dirpath=str(tmp_path))
    keeper.on_train_batch_end(unsignalled, module, None, None, batch_idx=3)
    keeper.on_train_epoch_start(trainer, module)  # goes on
    keeper.on_train_end(unsignalled, module)  # the fit ends: what follows it runs

    # the fit's last step, or a signal during its last validation: stop as the fit ends, not
    # in the test, class cross-validation or refit that would follow
    for last_step in (True, False):
        keeper = LastCheckpoint(dirpath=str(tmp_path))
        if last_step:
            keeper.on_train_batch_end(trainer, module, None, None, batch_idx=3)
        with pytest.raises(SIGTERMException) as stop:
            keeper.on_train_end(trainer, module)
        assert stop.value.all_processes


def test_ctrl_c_names_the_progress_file_of_the_fit_it_stops(tmp_path):
    from types import SimpleNamespace

    def fit(callbacks, world_size):
        return SimpleNamespace(callbacks=callbacks, world_size=world_size, is_global_zero=True)

    before = signal.signal(signal.SIGTERM, lambda *_: None)  # as Lightning's, during a fit
    # Python's own Ctrl-C handling, whatever the test was started with (a shell's background job
    # without job control inherits SIGINT ignored, which StopOnInterrupt rightly leaves alone)
    before_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for name in ("last", "refit_progress", "class_cv_fold1_progress"):
            keeper = LastCheckpoint(dirpath=str(tmp_path / "checkpoints"), filename=name)
            stop = StopOnInterrupt()
            stop.on_train_start(fit([StopOnInterrupt(), keeper], world_size=2), None)
            assert stop.saves_to == f"{name}.ckpt"
            # several processes with a LastCheckpoint, whose SIGTERM handler stops them together
            assert signal.getsignal(signal.SIGINT) == stop._stop_after_this_step
            signal.signal(signal.SIGINT, signal.default_int_handler)
        stop.on_train_start(fit([], world_size=2), None)  # fast_dev_run: none
        assert stop.saves_to is None
        # several processes that keep no checkpoint: Lightning's Ctrl-C handling is left alone
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, before)
        signal.signal(signal.SIGINT, before_int)


def test_the_rng_state_of_a_checkpoint_is_set_again_only_before_a_mid_epoch_first_batch():
    """After an epoch-end checkpoint the new epoch's data-loader iterator draws from the restored
    state, as in the uninterrupted fit, so batch 0 must keep what it drew; mid-epoch the state
    is set again before the first batch."""
    saved = torch.get_rng_state()
    checkpoint = {"rng_state": {"torch": saved}}
    for first_batch, expected_reset in ((0, False), (3, True)):
        callback = RngAtFirstBatch()
        callback.on_load_checkpoint(None, None, checkpoint)
        torch.rand(5)  # the iterator's draw after loading
        drawn = torch.get_rng_state()
        callback.on_train_batch_start(None, None, None, first_batch)
        assert torch.equal(torch.get_rng_state(), saved if expected_reset else drawn)
        torch.rand(5)
        callback.on_train_batch_start(None, None, None, first_batch + 1)  # only the first batch
        assert not torch.equal(torch.get_rng_state(), saved)


def test_a_preempted_submitit_job_is_told_whether_its_requeue_resumes(tmp_path, caplog):
    from fewzero.train import say_how_to_resume

    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 7}, tmp_path / "checkpoints" / "last.ckpt")
    with caplog.at_level(logging.WARNING, logger="fewzero.train"):
        say_how_to_resume(tmp_path, ["seed=1", "ckpt_path=auto"], None, requeued=True)
        assert "holds step 7; submitit requeues the job, which resumes from there" in caplog.text
        caplog.clear()
        say_how_to_resume(tmp_path, ["seed=1"], None, requeued=True)  # would train from step 0
    assert ("Preempted, and the requeued job starts afresh without ckpt_path=auto in the sweep's "
            "command." in caplog.text and "holds step 7; resume with:" in caplog.text)


def test_a_resume_command_names_the_data_folder_the_environment_gave_the_run(tmp_path, caplog,
                                                                            monkeypatch):
    """Before, the command left FEWZERO_DATA out: resumed in another shell (a requeued job), the
    run read its data from ./data, rendering rendered SOL anew there with whatever FluidSynth
    that host has."""
    from fewzero.train import say_how_to_resume

    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 7}, tmp_path / "checkpoints" / "last.ckpt")
    monkeypatch.delenv("FEWZERO_ROOT", raising=False)
    monkeypatch.setenv("FEWZERO_DATA", "/lab/fewzero data")
    with caplog.at_level(logging.WARNING, logger="fewzero.train"):
        say_how_to_resume(tmp_path, ["seed=1"], None)
    assert ("ckpt_path=last " in caplog.text and "\n(with FEWZERO_DATA='/lab/fewzero "
            "data' set again: this run found its data through it)" in caplog.text)
    caplog.clear()
    monkeypatch.delenv("FEWZERO_DATA")
    with caplog.at_level(logging.WARNING, logger="fewzero.train"):
        say_how_to_resume(tmp_path, ["seed=1"], None)
    assert "holds step 7; resume with:" in caplog.text and "FEWZERO_DATA" not in caplog.text
