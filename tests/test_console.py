"""What a run prints: Lightning's noise is dropped, everything else is left alone."""

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import ZSL_OVERRIDES
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from fewzero.console import LIGHTNING_LOGGERS, follow_up_trainer, quiet_lightning
from fewzero.data.clips import TINYSOL_INSTRUMENTS


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
