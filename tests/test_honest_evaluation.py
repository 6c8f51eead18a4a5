"""Metamorphic checks of honest evaluation: a run whose test data are replaced by something else
(noise for every test clip's audio, other metadata pitches, other side information for the
unseen classes) decides everything that comes before its test exactly as the run on the real
data does: trained weights, validation metrics, the chosen checkpoint and its step, the
calibration penalty, the pitch prior's weights, class cross-validation, the refit. Only the
test's own figures may change."""

import json
import re
import shutil
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import compose_train_cfg
from omegaconf import DictConfig, open_dict

from fewzero.data.tones import SyntheticTones
from fewzero.train import train

QUICK = ["~logger", "~callbacks.learning_rate_monitor", "model.plot_dir=null",  # no figures
         "dataset.features.n_mels=32", "dataset.source.clips_per_class=10",
         "+dataset.source.seconds=1.25", "dataset.features.clip_seconds=1.25"]
# the test chooses its whitening on validation episodes: a few candidates, few episodes
FSL = [*QUICK, "model.selection_episodes=4", "model.test_shrinkages=[0.5,1.0]",
       "model.test_support_weights=[0.0,0.2]", "dataset.episodes.val.n_episodes=2"]
# two epochs of two steps; mode=min keeps the first epoch's checkpoint, so the refit's length is
# the selected step count (2), not the run's (4)
ZSL = ["experiment=zsl_attribute_audio", "trainer.max_steps=4", "dataset.batch_size=16",
       "callbacks.model_checkpoint.monitor=val/acc_best", "callbacks.model_checkpoint.mode=min",
       *QUICK]

# other side information for every unseen class: other playing ranges (the pitch prior's and the
# attribute vectors' numeric columns, which the seen classes' vectors once moved with), other
# main formants (which the seen Accordion, undocumented, once averaged over in class
# cross-validation), and other categorical attributes, among values other rows have (the vectors
# keep their columns)
OTHER_UNSEEN_SIDE_INFO = {
    "Bassoon": {"range_low": 22, "range_high": 90, "size": "small", "register": "soprano",
                "formant_low": 600, "formant_high": 700},
    "Viola": {"range_low": 40, "material": "metal", "register": ["tenor", "bass"], "formant_high": 500},
    "Trumpet in C": {"range_high": 100, "material": "wood", "bore": "conical", "formant_low": 900},
    "Bass Tuba": {"range_low": 24, "range_high": 80, "size": "medium", "pitch_control": "keys",
                  "formant_low": 150, "formant_high": 300},
    "Alto Saxophone": {"range_low": 44, "range_high": 88, "bore": "cylindrical",
                       "formant_low": 500, "formant_high": 500},
}


def other_unseen_side_info(cfg: DictConfig) -> None:
    """Give every unseen class of `cfg` the rows of OTHER_UNSEEN_SIDE_INFO."""
    for name, row in OTHER_UNSEEN_SIDE_INFO.items():
        assert name in cfg.dataset.split.unseen
        cfg.side_info.table[name].update(row)


def swap_held_out_clips(monkeypatch: pytest.MonkeyPatch, held_out: Callable[[str, int], bool],
                        data_dir: Path) -> None:
    """Make every tone clip under `data_dir` for which `held_out(instrument, fold)` holds noise,
    with a metadata pitch 7 semitones off, from the moment its audio is written: the feature
    cache, and every statistic drawn from it, sees the replaced clips only."""
    prepare, clips = SyntheticTones.prepare, SyntheticTones.clips

    def swapped_prepare(self: SyntheticTones) -> None:
        assert self.root.is_relative_to(data_dir), f"{self.root}: tones of another test's data folder"
        prepare(self)
        marker = self.folder / "swapped"
        if marker.exists():
            return
        for name, fold, _, path in self._rows():
            if held_out(name, fold):
                rng = np.random.default_rng(zlib.crc32(path.name.encode()))
                noise = rng.normal(0, 0.1, int(self.seconds * self.sample_rate))
                sf.write(path, noise.astype(np.float32), self.sample_rate, subtype="PCM_16")
        marker.write_text("ok")

    def swapped_clips(self: SyntheticTones) -> list:
        return [replace(c, pitch=c.pitch + 7) if held_out(c.instrument, c.fold) else c
                for c in clips(self)]

    monkeypatch.setattr(SyntheticTones, "prepare", swapped_prepare)
    monkeypatch.setattr(SyntheticTones, "clips", swapped_clips)


# what a checkpoint holds that is no decision: wall times; and the hash of the run's settings
# that tells a resume whether a saved fit is its own ("config": the two runs' data folders
# differ, and resolved paths enter it)
TIMING = ("seconds", "time", "timer")
SETTINGS_HASH = "config"


def differences(a: Any, b: Any, roots: tuple[str, str], where: str = "") -> list[str]:
    """The places (key paths) where two saved objects differ: tensors by torch.equal (dtype and
    every bit), numbers and strings by ==, with run folder `roots[0]` read as `roots[1]`."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for k in a if not any(t in str(k).lower() for t in TIMING)
                and not (k == SETTINGS_HASH and isinstance(a[k], str))
                for d in differences(a[k], b[k], roots, f"{where}.{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, roots, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                              and torch.equal(a.nan_to_num(), b.nan_to_num())) else [where]
    if isinstance(a, str) and isinstance(b, str):
        return [] if a.replace(roots[0], roots[1]) == b else [where]
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return []  # NaN on both sides
    if type(a) is not type(b) or not isinstance(a, int | float | bool | type(None)):
        return [] if str(a).replace(roots[0], roots[1]) == str(b) else [where]
    return [] if a == b else [where]


def decided(run: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Everything a finished run decided before its test: its train/ and val/ metrics, every
    file under checkpoints/ (weights, optimiser, callbacks' state: the chosen checkpoint and
    step; class cross-validation's fold scores) and metrics.json's refit and class_cv entries."""
    report = json.loads((run / "metrics.json").read_text())
    files = {p.name: torch.load(p, map_location="cpu", weights_only=False)
             for p in sorted((run / "checkpoints").iterdir())}
    return {"fit": {k: v for k, v in metrics.items() if k.startswith(("train/", "val/"))},
            "checkpoints": files, "tested": metrics.get("test/checkpoint"),
            **{k: report.get(k) for k in ("refit_on_trainval", "class_cv")}}


def run_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: list[str],
              held_out: Callable[[str, int], bool], edit: Callable[[DictConfig], None] | None = None
              ) -> tuple[dict[str, Any], dict[str, Any], dict[str, float], dict[str, float]]:
    """Train and test `overrides` on tones in `tmp_path/real`, then with the clips `held_out`
    names replaced (`swap_held_out_clips`) and the config changed by `edit` in `tmp_path/swapped`.
    Returns both runs' `decided` and both runs' test metrics."""
    # each its own data folder (FEWZERO_DATA, where set, would share tones and feature caches)
    real_cfg = compose_train_cfg(tmp_path / "real", [*overrides, f"paths.data_dir={tmp_path / 'real'}"])
    real_metrics, _ = train(real_cfg)
    # the same rendered tones (not their feature cache), for the swap to overwrite
    shutil.copytree(tmp_path / "real" / "tones", tmp_path / "swapped" / "tones")
    with monkeypatch.context() as patch:
        swap_held_out_clips(patch, held_out, tmp_path / "swapped")
        swapped_cfg = compose_train_cfg(tmp_path / "swapped", [
            *overrides, f"paths.data_dir={tmp_path / 'swapped'}"])
        if edit is not None:
            with open_dict(swapped_cfg):
                edit(swapped_cfg)
        swapped_metrics, _ = train(swapped_cfg)
    real = decided(Path(real_cfg.paths.output_dir), real_metrics)
    swapped = decided(Path(swapped_cfg.paths.output_dir), swapped_metrics)
    tests = [{k: v for k, v in m.items() if k.startswith("test/") and isinstance(v, float)}
             for m in (real_metrics, swapped_metrics)]
    return real, swapped, *tests


def assert_same_decisions(real: dict[str, Any], swapped: dict[str, Any], tmp_path: Path) -> None:
    """Both runs' `decided` are equal, but the copy of the side-information table that each
    checkpoint's record of its run's config holds (`RunRecord`: the table as given)."""
    roots = (str(tmp_path / "real"), str(tmp_path / "swapped"))
    assert real["checkpoints"], "no checkpoint to compare"
    recorded = re.compile(r"\.checkpoints\..+\.ckpt\.fewzero_run\.config\.side_info\.table\.")
    assert [d for d in differences(real, swapped, roots) if not recorded.match(d)] == []


def assert_zero_shot_decisions_unmoved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       overrides: list[str]) -> dict[str, Any]:
    """`run_twice` a zero-shot run with its unseen classes' and seen test fold's clips swapped and
    OTHER_UNSEEN_SIDE_INFO: the same decisions, other test figures. Returns the real run's
    `decided`."""
    cfg = compose_train_cfg(tmp_path / "real", overrides)
    unseen, test_fold = set(cfg.dataset.split.unseen), cfg.dataset.test_fold
    real, swapped, real_test, swapped_test = run_twice(
        tmp_path, monkeypatch, overrides, lambda name, fold: name in unseen or fold == test_fold,
        other_unseen_side_info)
    assert_same_decisions(real, swapped, tmp_path)
    assert real_test.keys() == swapped_test.keys() and real_test != swapped_test  # the swap was tested
    return real


@pytest.mark.slow  # 5.5 s alone on one core (15 s at load 3): two runs of four steps, each caching
# its features
def test_few_shot_decisions_never_depend_on_the_test_instruments_clips(tmp_path, monkeypatch):
    cfg = compose_train_cfg(tmp_path / "real")
    test_classes = set(cfg.dataset.split.test)
    real, swapped, real_test, swapped_test = run_twice(
        tmp_path, monkeypatch, FSL, lambda name, fold: name in test_classes)
    assert_same_decisions(real, swapped, tmp_path)
    assert Path(real["tested"]).name in real["checkpoints"]  # the validation-chosen one
    # the whitening each test setting uses was chosen on validation episodes
    chosen = [k for k in real_test if "whitening" in k]
    assert len(chosen) == 4 and [real_test[k] for k in chosen] == [swapped_test[k] for k in chosen]
    # the swap reached the test: its accuracies changed
    assert real_test.keys() == swapped_test.keys() and real_test != swapped_test


@pytest.mark.slow  # 9 s alone on one core (37 s at load 3): two runs, each of four fits (validation phase,
# two class-CV folds, the refit) and a test
def test_zero_shot_decisions_never_depend_on_unseen_or_test_fold_clips_nor_unseen_side_info(
        tmp_path, monkeypatch):
    """experiment=zsl_attribute_audio: the range and formant prior (its formant scale fitted on
    training clips), its weights chosen on validation, class cross-validation over three folds
    and the refit on trainval; the unseen classes' attribute vectors, ranges and formants too."""
    real = assert_zero_shot_decisions_unmoved(tmp_path, monkeypatch, ZSL)
    assert len(real["class_cv"]["folds"]) == 3 and real["refit_on_trainval"]["steps"] == 2
    assert {"class_cv_fold1.pt", "class_cv_fold2.pt", "refit_trainval.ckpt"} <= set(real["checkpoints"])
    selected = real["checkpoints"][Path(real["refit_on_trainval"]["selected_checkpoint"]).name]
    assert {"calibration_gamma", "pitch_prior.weights", "pitch_prior.validation_scores",
            "pitch_prior.formants.scale"} <= selected["state_dict"].keys()


@pytest.mark.slow
def test_centred_side_information_is_centred_on_the_training_classes_alone(tmp_path, monkeypatch):
    """side_info.center=true subtracted the mean over every class, the unseen ones included,
    from the vectors the model trains on."""
    assert_zero_shot_decisions_unmoved(tmp_path, monkeypatch, [*ZSL, "side_info.center=true"])


@pytest.mark.slow  # 6.4 s alone on one core (12 s at load 3): two runs of a fit, a refit and a test
def test_the_closed_form_eszsl_head_never_depends_on_unseen_or_test_fold_clips(tmp_path, monkeypatch):
    real = assert_zero_shot_decisions_unmoved(tmp_path, monkeypatch, [*ZSL, "model=eszsl",
                                                                      "model.pitch_prior=null"])
    assert "closed_form_data" in real["checkpoints"]["refit_trainval.ckpt"]


