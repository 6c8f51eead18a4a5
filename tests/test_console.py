"""What a run prints: Lightning's noise is dropped, everything else is left alone.

Commands run forked (tests/cli_processes.py), with the fewzero modules imported already, except
the one whose test checks a whole run for library noise, import-time warnings included."""

import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import cli_processes
import pytest
import torch
from conftest import FSL_OVERRIDES, ZSL_OVERRIDES, compose_train_cfg
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from fewzero.console import (
    LIGHTNING_LOGGERS,
    follow_up_trainer,
    quiet_lightning,
    refusal_message,
    stopped_by_another_process,
    without_optimiser_notes,
)
from fewzero.data.clips import TINYSOL_INSTRUMENTS
from fewzero.models.zeroshot_module import ZeroShotModule
from fewzero.train import train


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lightning_lines():
    handler = _Lines()
    logger = logging.getLogger(LIGHTNING_LOGGERS[0])
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_follow_up_trainers_drop_device_lines_and_the_checkpoint_folder_warning_only(lightning_lines):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with follow_up_trainer():
            rank_zero_info("GPU available: False, used: False")
            rank_zero_info("Restoring states from the checkpoint path at x.ckpt")
            warnings.warn("Checkpoint directory /run/checkpoints exists and is not empty.", stacklevel=1)
            warnings.warn("something else", stacklevel=1)
        # after the follow-up trainer, both come through again
        rank_zero_info("GPU available: True (cuda), used: True")
        warnings.warn("Checkpoint directory /other exists and is not empty.", stacklevel=1)

    assert lightning_lines == ["Restoring states from the checkpoint path at x.ckpt",
                               "GPU available: True (cuda), used: True"]
    assert [str(w.message) for w in caught] == ["something else",
                                                "Checkpoint directory /other exists and is not empty."]


TRAINING_STEP_NOTE = "`training_step` returned `None`. If this was on purpose, ignore this warning..."
OPTIMIZER_NOTE = "`LightningModule.configure_optimizers` returned `None`, this fit will run with no optimizer"


def test_the_notes_of_a_fit_without_optimiser_are_dropped_for_a_model_that_optimises_nothing_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for optimises_nothing in (True, False):
            with without_optimiser_notes(optimises_nothing):
                warnings.warn(TRAINING_STEP_NOTE, stacklevel=1)
                warnings.warn(OPTIMIZER_NOTE, stacklevel=1)
                warnings.warn("something else", stacklevel=1)
        warnings.warn(TRAINING_STEP_NOTE, stacklevel=1)  # after the fit: through again
    assert [str(w.message) for w in caught] == ["something else", TRAINING_STEP_NOTE, OPTIMIZER_NOTE,
                                                "something else", TRAINING_STEP_NOTE]


def test_a_closed_form_run_warns_of_no_none_it_returns_by_design_and_of_everything_else(tmp_path,
                                                                                        monkeypatch):
    """ESZSL and SAE embed their training batches and take no gradient step: Lightning warned at
    every fit (the main one and the refit) that training_step and configure_optimizers returned
    None."""
    monkeypatch.setattr(ZeroShotModule, "on_train_start",
                        lambda self: warnings.warn("a warning of the model's own", stacklevel=1),
                        raising=False)
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio", "model=eszsl",
                                       "model.pitch_prior=null"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    said = [str(w.message) for w in caught]
    assert said.count("a warning of the model's own") == 2  # the main fit and the refit
    assert not [m for m in said if "returned `None`" in m]


def test_quiet_lightning_drops_the_cloud_logger_advertisement_once_added(lightning_lines):
    quiet_lightning()
    quiet_lightning()  # idempotent: one filter
    rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
    rank_zero_info("Seed set to 0")
    assert lightning_lines == ["Seed set to 0"]
    assert sum(f.__class__.__name__ == "DropMessages"
               for f in logging.getLogger(LIGHTNING_LOGGERS[0]).filters) == 1


@pytest.mark.slow
def test_a_zero_shot_run_with_class_cv_and_refit_prints_its_device_once_and_no_library_noise(tmp_path):
    """Five trainers (the main fit, two class-CV folds and their checks, the refit) once printed
    the device lines five times, Lightning's advertisement five times, and "Checkpoint directory
    ... exists and is not empty" for the run's own folder."""
    names = ",".join(f"'{n}'" for n in TINYSOL_INSTRUMENTS)
    command = [sys.executable, "-m", "fewzero.train", "experiment=zsl_attribute_audio",
               "dataset/source=tones", f"dataset.source.instruments=[{names}]",
               "dataset.source.clips_per_class=12", f"paths.root_dir={tmp_path}",
               f"paths.output_dir={tmp_path / 'run'}", "trainer.accelerator=cpu", "trainer.max_steps=4",
               "~callbacks.progress_bar", *ZSL_OVERRIDES]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert "Class cross-validation fold 2" in printed  # the follow-up trainers did run
    assert (tmp_path / "run" / "checkpoints" / "refit_trainval.ckpt").is_file()
    assert printed.count("GPU available") == 1
    assert printed.count("Total params") == 1  # the model's summary: by the main fit only
    assert "exists and is not empty" not in printed
    assert "litlogger" not in printed
    assert "LeafSpec" not in printed
    assert "`weights_only` was not set" not in printed


@pytest.mark.slow
def test_a_run_that_validates_no_step_says_so_once_with_the_fix(tmp_path):
    """trainer.max_steps within the first epoch: the warning as the fit starts gives the account
    and the fix; the test's "no best checkpoint" refers to it. Lightning's "could not find the
    monitored key ... Did you call `log('val/acc', value)`?" (as if the model forgot to log it)
    and "optimized_metric ... was not logged" once followed it, four accounts of one thing."""
    command = [sys.executable, "-m", "fewzero.train", "dataset/source=tones",
               f"dataset.source.instruments=[{','.join(TINYSOL_INSTRUMENTS)}]",
               "dataset.source.clips_per_class=12", f"paths.root_dir={tmp_path}",
               f"hydra.run.dir={tmp_path / 'run'}", "trainer.accelerator=cpu", "~callbacks.progress_bar",
               "trainer.max_steps=1", "dataset.episodes.train.n_episodes=3", *FSL_OVERRIDES[1:]]
    result = cli_processes.run(command, capture_output=True, text=True, timeout=600,
                               cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert printed.count("no step is ever validated") == 1
    assert printed.count("dataset.episodes.train.n_episodes") == 1  # the fix, said once
    assert ("No best checkpoint found: no step was validated (see the warning on trainer.max_steps "
            "as the fit started). Testing the current weights." in printed)
    assert "could not find the monitored key" not in printed
    assert "was not logged" not in printed


def _raised(function, *args):
    try:
        function(*args)
    except Exception as error:  # noqa: BLE001 - the exception is what is tested
        return error
    raise AssertionError("did not raise")


def test_only_a_refusal_raised_on_purpose_by_fewzero_loses_its_traceback(monkeypatch):
    from fewzero.data.clips import check_instruments, config_hash

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    refused = _raised(lambda: check_instruments(["Violaa"], ["Viola"], hint="Check it."))
    assert refusal_message(refused) == str(refused) and "['Violaa']" in str(refused)
    # met, not raised, by a fewzero line (json cannot encode a circular dict): a bug's traceback
    circular: dict = {}
    circular["self"] = circular
    assert isinstance(_raised(config_hash, circular), ValueError)
    assert refusal_message(_raised(config_hash, circular)) is None
    assert refusal_message(_raised(int, "x")) is None  # not from fewzero at all
    assert refusal_message(_raised(lambda: [][0])) is None  # not a refusal's kind
    # met by OmegaConf in a config resolver (xlsa17's attribute count): the wrapped refusal
    from omegaconf import OmegaConf

    from fewzero.side_info.xlsa17 import attribute_dim

    OmegaConf.register_new_resolver("test_dim", attribute_dim, replace=True)
    wrapped = _raised(lambda: OmegaConf.create({"dims": {}, "dim": "${test_dim:TOY,${dims}}"}).dim)
    assert type(wrapped).__module__ == "omegaconf.errors"
    assert refusal_message(wrapped).startswith("dataset.name=TOY is none of xlsa17's datasets")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # every traceback, as Hydra's own errors
    assert refusal_message(refused) is None


def test_a_method_a_plugin_left_unimplemented_keeps_its_traceback(monkeypatch):
    """A CompatibilityHead subclass without embed_audio reaches the base's `raise
    NotImplementedError` in fewzero's code: not a refusal (it printed an empty message alone)."""
    from fewzero.models.zsl_heads import CompatibilityHead

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    head = CompatibilityHead(audio_dim=4, side_dim=3)
    unimplemented = _raised(head.embed_audio, torch.zeros(2, 4))
    assert isinstance(unimplemented, NotImplementedError)
    assert refusal_message(unimplemented) is None


def test_a_script_prints_a_refusal_alone_and_keeps_a_bugs_traceback(monkeypatch):
    """`run_script`, which every script of scripts/ runs its main() with: fewzero's refusals,
    the script's own (a `raise` in its folder, here this test file's), a missing file and Hydra's
    refusal of a config print their message after the script's name; a bug is raised as it was."""
    from hydra.errors import MissingConfigException

    from fewzero.cli import run_script
    from fewzero.data.clips import check_instruments

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def own_refusal():
        raise ValueError("experiment=x has no pitch prior: add the override model/pitch_prior=range.")

    def missing_experiment():
        raise MissingConfigException("In 'train': Could not find 'experiment/nope'")

    refusals = {lambda: check_instruments(["Violaa"], ["Viola"], hint="Check it."): "['Violaa']",
                own_refusal: "has no pitch prior", missing_experiment: "Could not find 'experiment/nope'",
                lambda: open("/nonexistent/file.csv"): "No such file or directory: '/nonexistent/file.csv'"}
    for main, message in refusals.items():
        with pytest.raises(SystemExit, match=rf"^test_console.py: .*{re.escape(message)}"):
            run_script(main)

    def unimplemented():
        raise NotImplementedError

    for bug, kind in [(unimplemented, NotImplementedError), (lambda: int("x"), ValueError),
                      (lambda: [][0], IndexError)]:
        with pytest.raises(kind):
            run_script(bug)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # every traceback, as for fewzero.train
    with pytest.raises(ValueError, match="has no pitch prior"):
        run_script(own_refusal)


def test_a_script_run_from_the_shell_prints_its_refusal_without_a_traceback():
    """zsl_prior_folds.py refuses an experiment without a pitch prior (its own ValueError), and
    Hydra an experiment that does not exist: once with a traceback of the script's frames."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "zsl_prior_folds.py"
    for experiment, message in [("zsl_word_audio", "experiment=zsl_word_audio has no pitch prior: "
                                                   "add the override"),
                                ("zsl_nope", "In 'train': Could not find 'experiment/zsl_nope'")]:
        result = cli_processes.run([sys.executable, str(script), "--experiment", experiment],
                                   capture_output=True, text=True, timeout=300)
        assert result.returncode == 1
        assert f"\nzsl_prior_folds.py: {message}" in "\n" + result.stderr
        assert "Traceback" not in result.stdout + result.stderr


def test_only_a_later_ddp_process_that_lost_its_peer_is_said_to_be_stopped_by_another():
    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:547] Connection closed by peer [127.0.0.1]:3993")
    assert stopped_by_another_process(gone, rank=1)
    assert not stopped_by_another_process(gone, rank=0)  # the first process: its own traceback
    assert not stopped_by_another_process(RuntimeError("CUDA out of memory"), rank=1)


@pytest.mark.slow
@pytest.mark.parametrize("ddp", [[], ["trainer=ddp", "trainer.devices=2"]], ids=["one", "ddp"])
def test_a_refused_run_prints_its_message_without_a_traceback(tmp_path, ddp):
    command = [sys.executable, "-m", "fewzero.train", "dataset/source=tones",
               f"dataset.source.instruments=[{','.join(TINYSOL_INSTRUMENTS)}]",
               "dataset.source.clips_per_class=12", f"paths.root_dir={tmp_path}",
               f"hydra.run.dir={tmp_path / 'run'}", "trainer.accelerator=cpu",
               "dataset.split.test=[Bassoon,Violaa,'Trumpet in C','Bass Tuba','Alto Saxophone']", *ddp]
    result = cli_processes.run(command, capture_output=True, text=True, timeout=600,
                               cwd=Path(__file__).resolve().parents[1])
    printed = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Unknown tones instrument name(s) ['Violaa']" in printed
    assert "HYDRA_FULL_ERROR=1 shows where it was raised" in printed
    assert "Traceback" not in printed  # under DDP neither the first process's nor the second's
    if ddp:
        assert "The process of rank 1 stopped: another process ended first" in printed
