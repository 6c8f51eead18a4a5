"""Audio zero-shot refit on trainval (Xian et al.'s last step): after validation selects the
training length and the calibration penalty, retrain on every seen class (pseudo-unseen
included) on every fold but the test fold, and test that model."""

import copy
import inspect
import json
from pathlib import Path

import hydra
import pytest
import torch
from conftest import compose_train_cfg, load_script
from omegaconf import open_dict

from fewzero.data.zsl_datamodule import ZeroShotDataModule
from fewzero.models.zsl_heads import EszslHead
from fewzero.train import train

WORD = ["experiment=zsl_attribute_audio"]  # word-audio split; attribute table needs no package
QUICK = ["~logger", "~callbacks.learning_rate_monitor", "model.plot_dir=null"]  # no figures
# val/acc_best never decreases, so mode=min keeps the first epoch's checkpoint: the selected
# length (one epoch = 2 steps) is then shorter than trainer.max_steps (4); batches of 16 draws,
# so that two of them reach a pseudo-unseen class
SELECT_FIRST_EPOCH = ["trainer.max_steps=4", "dataset.batch_size=16",
                      "callbacks.model_checkpoint.monitor=val/acc_best",
                      "callbacks.model_checkpoint.mode=min", *QUICK]


def _datamodule(tmp_path, overrides=()):
    dm = hydra.utils.instantiate(compose_train_cfg(tmp_path, WORD + list(overrides)).dataset)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _record_batch_checks(monkeypatch) -> list[tuple[str, torch.Tensor]]:
    """(train_on, clip indices) of every batch check: the module's `assert_clean` of each
    training batch, as training data (`training=True`)."""
    calls: list[tuple[str, torch.Tensor]] = []
    original = ZeroShotDataModule.assert_clean

    def recording(self, clip_indices, training=False):
        if inspect.stack()[1].function == "training_step":
            assert training
            calls.append((self.train_on, clip_indices.clone()))
        return original(self, clip_indices, training)

    monkeypatch.setattr(ZeroShotDataModule, "assert_clean", recording)
    return calls


def test_for_trainval_trains_on_every_seen_class_and_fold_but_never_unseen_or_test_fold(tmp_path):
    dm = _datamodule(tmp_path, ["dataset.steps_per_epoch=40", "dataset.batch_size=16"])
    final = dm.for_trainval()
    assert final.train_on == "trainval" and not final.refit_on_trainval
    assert dm.train_on == "train" and dm.train_classes == [n for n in dm.seen if n not in dm.pseudo_unseen]
    assert final.train_classes == dm.seen
    seen = torch.isin(dm.labels, torch.tensor(dm.ids(dm.seen)))
    expected = torch.nonzero(seen & (dm.table.folds != dm.test_fold)).flatten()
    assert torch.equal(final.indices["train"], expected)
    assert final.indices["val_seen"].numel() == final.indices["val_unseen"].numel() == 0
    for role in ("test_seen", "test_unseen"):
        assert torch.equal(final.indices[role], dm.indices[role])
    labels = torch.cat([b["label"] for b in final.train_dataloader()])
    indices = torch.cat([b["index"] for b in final.train_dataloader()])
    assert set(labels.tolist()) == set(dm.ids(dm.seen))  # pseudo-unseen classes train now
    folds = set(dm.table.folds[indices].tolist())
    assert dm.val_fold in folds and dm.test_fold not in folds
    final.assert_clean(indices, training=True)
    with pytest.raises(AssertionError, match="unseen-class"):
        final.assert_clean(dm.indices["test_unseen"][:1], training=True)
    with pytest.raises(AssertionError, match="test-fold"):
        final.assert_clean(dm.indices["test_seen"][:1], training=True)


def test_validation_phase_training_data_rejects_pseudo_unseen_and_validation_fold_clips(tmp_path):
    dm = _datamodule(tmp_path)
    dm.assert_clean(dm.indices["val_unseen"])  # fine for validation batches
    with pytest.raises(AssertionError, match="1 pseudo-unseen-class and 0 validation-fold"):
        dm.assert_clean(dm.indices["val_unseen"][:1], training=True)
    with pytest.raises(AssertionError, match="0 pseudo-unseen-class and 1 validation-fold"):
        dm.assert_clean(dm.indices["val_seen"][:1], training=True)
    with pytest.raises(Exception, match="train_on must be 'train' or 'trainval'"):
        hydra.utils.instantiate(compose_train_cfg(tmp_path, WORD + ["dataset.train_on=all"]).dataset)


def test_refit_trains_on_pseudo_unseen_classes_for_the_selected_steps_and_keeps_the_penalty(
        tmp_path, monkeypatch):
    calls = _record_batch_checks(monkeypatch)
    metrics, objects = train(compose_train_cfg(tmp_path, WORD + SELECT_FIRST_EPOCH))
    run = Path(objects["cfg"].paths.output_dir)
    report = json.loads((run / "metrics.json").read_text())
    refit = report["refit_on_trainval"]
    assert report["checkpoint"] == refit["checkpoint"] == str(run / "checkpoints" / "refit_trainval.ckpt")
    selected = torch.load(refit["selected_checkpoint"], weights_only=False)
    final = torch.load(refit["checkpoint"], weights_only=False)
    assert selected["global_step"] == 2  # the first epoch, not max_steps
    assert refit["unit"] == "steps" and refit["selected_steps"] == refit["steps"] == 2
    assert objects["trainer"].global_step == 2 and final["global_step"] == 2
    assert float(final["state_dict"]["calibration_gamma"]) == float(
        selected["state_dict"]["calibration_gamma"]) == report["zero_shot"]["calibration_gamma"]
    dm, model = objects["datamodule"], objects["model"]
    assert dm.train_on == "trainval" and model.ids["train"] == dm.ids(dm.seen)

    refit_clips = torch.cat([i for phase, i in calls if phase == "trainval"])
    assert len(refit_clips) == 2 * dm.batch_size  # two refit batches, each checked
    labels, folds = dm.labels[refit_clips], dm.table.folds[refit_clips]
    assert set(labels.tolist()) & set(dm.ids(dm.pseudo_unseen))
    assert not set(labels.tolist()) & set(dm.ids(dm.unseen))
    assert dm.test_fold not in set(folds.tolist())
    first_phase = torch.cat([i for phase, i in calls if phase == "train"])
    assert not set(dm.table.folds[first_phase].tolist()) & {dm.test_fold}
    assert metrics["test/checkpoint"] == refit["checkpoint"] and "val/acc_best" in metrics


def test_closed_form_head_refits_on_every_seen_class(tmp_path, monkeypatch):
    fits: list[tuple[int, set[int]]] = []
    original = EszslHead.fit

    def recording(self, audio, labels, side):
        fits.append((side.shape[0], set(labels.tolist())))
        return original(self, audio, labels, side)

    monkeypatch.setattr(EszslHead, "fit", recording)
    metrics, objects = train(compose_train_cfg(tmp_path, WORD + ["model=eszsl", "model.pitch_prior=null",
                                                                *SELECT_FIRST_EPOCH]))
    dm = objects["datamodule"]
    n_train, n_seen = len(dm.seen) - len(dm.pseudo_unseen), len(dm.seen)
    assert fits[0][0] == n_train  # validation phase: pseudo-unseen held out
    assert fits[-1][0] == n_seen  # refit: scored against every seen class's vector
    pseudo_targets = {dm.seen.index(n) for n in dm.pseudo_unseen}
    assert fits[-1][1] <= set(range(n_seen)) and fits[-1][1] & pseudo_targets
    assert objects["trainer"].global_step == 2
    assert 0.0 <= metrics["test/zsl_top1"] <= 1.0


def test_refit_can_be_switched_off(tmp_path):
    metrics, objects = train(compose_train_cfg(tmp_path, WORD + ["dataset.refit_on_trainval=false",
                                                                  "model.pitch_prior.class_cv=false",
                                                                  "trainer.max_steps=2", *QUICK]))
    report = json.loads(Path(objects["cfg"].paths.output_dir, "metrics.json").read_text())
    assert "refit_on_trainval" not in report
    assert objects["datamodule"].train_on == "train" and Path(report["checkpoint"]).name.startswith("step")


def test_with_no_checkpoint_kept_by_validation_the_refit_is_refused_and_the_test_says_last_weights(
        tmp_path, caplog):
    """With callbacks.model_checkpoint=null, Lightning's `trainer.checkpoint_callback` is
    `LastCheckpoint`, whose "best" is last.ckpt: neither the refit nor the test may take that
    for the checkpoint validation selected."""
    base = WORD + ["model.pitch_prior.class_cv=false", "trainer.max_steps=2",
                   "callbacks.model_checkpoint=null", *QUICK]
    with pytest.raises(RuntimeError, match="callbacks.model_checkpoint, which keeps it, is off"):
        train(compose_train_cfg(tmp_path / "refit", base))
    caplog.set_level("WARNING")
    metrics, _ = train(compose_train_cfg(tmp_path / "plain", [*base, "dataset.refit_on_trainval=false"]))
    assert metrics["test/checkpoint"] == ""
    assert "validation selects no checkpoint: testing the weights of the last training step" in caplog.text


@pytest.mark.parametrize(("every_n_epochs", "steps", "first"), [(1, 1, 3), (2, 4, 6)])
def test_a_run_that_stops_before_its_first_validation_says_how_long_to_train(tmp_path, every_n_epochs,
                                                                             steps, first):
    cfg = compose_train_cfg(tmp_path, WORD + [f"trainer.max_steps={steps}", "dataset.steps_per_epoch=3",
                                              f"trainer.check_val_every_n_epoch={every_n_epochs}",
                                              "model.pitch_prior.class_cv=false", *QUICK])
    with pytest.raises(RuntimeError, match=rf"no validation ran: training stopped after {steps} steps .*"
                                           rf"first validation at step {first}.*trainer.max_steps to "
                                           rf"at least {first}"):
        train(cfg)


def test_class_cv_folds_hold_out_other_seen_classes_and_nothing_else_changes(tmp_path):
    dm = _datamodule(tmp_path)
    assert dm.class_cv_folds == [["Oboe", "Trombone"], ["Cello", "Clarinet in Bb", "French Horn"],
                                 ["Accordion", "Contrabass", "Flute"]]
    fold = dm.for_pseudo_unseen(dm.class_cv_folds[1])
    assert dm.pseudo_unseen == ["Oboe", "Trombone"]  # the original is untouched
    assert fold.train_classes == [n for n in dm.seen if n not in ("Cello", "Clarinet in Bb", "French Horn")]
    held_out = torch.isin(dm.labels, torch.tensor(dm.ids(["Cello", "Clarinet in Bb", "French Horn"])))
    expected = torch.nonzero(held_out & (dm.table.folds != dm.test_fold)).flatten()
    assert torch.equal(fold.indices["val_unseen"], expected)
    assert not torch.isin(fold.indices["train"], torch.nonzero(held_out).flatten()).any()
    assert set(dm.labels[fold.indices["train"]].tolist()) == set(dm.ids(fold.train_classes))
    for role in ("test_seen", "test_unseen"):
        assert torch.equal(fold.indices[role], dm.indices[role])
    with pytest.raises(AssertionError, match="pseudo-unseen-class"):
        fold.assert_clean(expected[:1], training=True)


@pytest.mark.parametrize(("override", "message"), [
    ("dataset.split.pseudo_unseen_folds=[[Bassoon]]", r"pseudo_unseen_folds\[0\] \['Bassoon'\] must be seen"),
    ("dataset.split.seen=[French Horn,Violin,Flute,Contrabass,Trombone,Cello,Clarinet,Oboe,Accordion]",
     r"\['Clarinet in Bb'\] must be seen .*seen is \[.*'Clarinet',.*check the spelling"),
    ("dataset.split.pseudo_unseen_folds=[[]]", "has an empty fold"),
    ("dataset.split.pseudo_unseen=[]", "besides dataset.split.pseudo_unseen"),
    ("dataset.split.pseudo_unseen_folds=[[Trombone,Oboe],[Cello]]",
     r"dataset.split.pseudo_unseen and dataset.split.pseudo_unseen_folds\[0\] hold the same classes "
     r"\['Oboe', 'Trombone'\]"),
    ("dataset.split.pseudo_unseen_folds=[[Cello,Flute],[Flute,Cello]]",
     r"pseudo_unseen_folds\[0\] and dataset.split.pseudo_unseen_folds\[1\] hold the same classes"),
])
def test_bad_class_cv_folds_are_rejected(tmp_path, override, message):
    with pytest.raises(Exception, match=message):
        hydra.utils.instantiate(compose_train_cfg(tmp_path, WORD + [override]).dataset)


def test_class_cv_needs_the_refit_that_uses_its_choice(tmp_path):
    cfg = compose_train_cfg(tmp_path, WORD + ["model.pitch_prior.class_cv=true",
                                              "dataset.refit_on_trainval=false"])
    with pytest.raises(ValueError, match="set dataset.refit_on_trainval=true or class_cv=false"):
        train(cfg)


@pytest.mark.parametrize(("overrides", "message"), [
    (["dataset.split.seen=[Violin,Flute]", "dataset.split.pseudo_unseen=[Flute]",
      "dataset.split.pseudo_unseen_folds=[]"],
     r"The validation phase would train on one class, \['Violin'\]"),
    (["dataset.split.seen=[Violin,Flute,Oboe]", "dataset.split.pseudo_unseen=[Oboe]",
      "dataset.split.pseudo_unseen_folds=[[Flute,Violin]]"],
     r"Class cross-validation fold 1 would train on one class, \['Oboe'\] \(dataset.split.seen minus "
     r"dataset.split.pseudo_unseen_folds\[0\]\)"),
    (["dataset.split.pseudo_unseen=[]", "dataset.split.pseudo_unseen_folds=[]"],
     "dataset.split.pseudo_unseen is empty, so no fold could be scored"),
    (["dataset.val_fold=null"], "dataset.val_fold is null, so no fold could be scored"),
])
def test_a_split_leaving_a_fit_one_class_or_class_cv_nothing_to_score_is_refused_before_training(
        tmp_path, overrides, message):
    """Not a fit whose loss is constant (it learns nothing, and validation chooses among noise),
    nor a refusal after the whole validation phase has trained."""
    cfg = compose_train_cfg(tmp_path, WORD + overrides)
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_training_on_trainval_from_the_start_is_refused_since_no_validation_would_choose(tmp_path):
    cfg = compose_train_cfg(tmp_path, WORD + ["dataset.train_on=trainval", "dataset.refit_on_trainval=false",
                                              "model.pitch_prior=null"])
    with pytest.raises(ValueError, match="dataset.train_on=trainval trains with no validation data.*"
                                         "Keep dataset.train_on=train"):
        train(cfg)


def test_class_cv_chooses_the_zsl_weight_by_the_mean_over_folds_and_the_refit_keeps_it(tmp_path,
                                                                                      monkeypatch):
    import fewzero.train

    # the weights each fold fit starts from and ends with: a fold trained again when the others
    # are reused must train as it did (each fold is seeded anew)
    fold_weights: dict[str, list[tuple[float, float]]] = {}
    resumable_fit = fewzero.train.resumable_fit

    def recording(cfg, model, datamodule, output_dir, name, *args, **kwargs):
        start = sum(float(p.detach().double().sum()) for p in model.parameters())
        fit = resumable_fit(cfg, model, datamodule, output_dir, name, *args, **kwargs)
        end = sum(float(p.detach().double().sum()) for p in model.parameters())
        fold_weights.setdefault(name, []).append((start, end))
        # each fit keeps its progress as often as the main fit keeps last.ckpt
        keeper = next(c for c in fit.callbacks if type(c).__name__ == "LastCheckpoint")
        assert keeper._every_n_train_steps == cfg.callbacks.last_checkpoint.every_n_train_steps == 50
        return fit

    monkeypatch.setattr(fewzero.train, "resumable_fit", recording)
    candidates = [0.0, 0.5, 5.0]
    cfg = compose_train_cfg(tmp_path, WORD + [*SELECT_FIRST_EPOCH, "model.pitch_prior.class_cv=true",
                                              f"model.pitch_prior.weight_candidates={candidates}",
                                              "model.pitch_prior.zsl_score=top1",  # scores in [0, 1]
                                              "model.plot_dir=${paths.output_dir}/plots",
                                              "model.figures=true"])
    metrics, objects = train(cfg)
    run = Path(objects["cfg"].paths.output_dir)
    report = json.loads((run / "metrics.json").read_text())
    cv = report["class_cv"]
    selected = torch.load(report["refit_on_trainval"]["selected_checkpoint"], weights_only=False)
    final = torch.load(report["refit_on_trainval"]["checkpoint"], weights_only=False)
    assert cv["folds"] == objects["datamodule"].class_cv_folds and len(cv["folds"]) == 3
    assert cv["steps"] == selected["global_step"] == 2 and cv["score"] == "top1"
    # fold 0 is the selected checkpoint's own validation; the others were trained and saved
    assert cv["fold_scores"][0] == selected["state_dict"]["pitch_prior.validation_scores"][0].tolist()
    for k in (1, 2):
        saved = torch.load(run / "checkpoints" / f"class_cv_fold{k}.pt", weights_only=False)
        assert saved["pseudo_unseen"] == cv["folds"][k] and saved["steps"] == 2
        assert saved["scores"].tolist() == cv["fold_scores"][k]
        assert all(0.0 <= s <= 1.0 for s in cv["fold_scores"][k])
    mean = torch.tensor(cv["fold_scores"]).mean(dim=0)
    assert cv["mean_scores"] == pytest.approx(mean.tolist())
    best = min((w for w, v in zip(candidates, mean.tolist(), strict=True) if v == pytest.approx(max(mean))),
               key=lambda w: abs(w - 0.1))
    weights = final["state_dict"]["pitch_prior.weights"].tolist()
    assert weights[0] == best == metrics["test/prior_weight_zsl"] == cv["chosen"]["pitch_prior.weights"][0]
    assert cv["zsl_weight"] == best and cv["candidates"] == candidates
    assert (run / "plots" / "val_class_cv_prior_weight.png").stat().st_size > 0
    assert not list((run / "checkpoints").glob("*_progress.ckpt"))  # removed once each fit was done
    assert weights[1:] == selected["state_dict"]["pitch_prior.weights"][1:].tolist()  # seen, GZSL
    gammas = (final["state_dict"]["calibration_gamma"], selected["state_dict"]["calibration_gamma"])
    assert float(gammas[0]) == float(gammas[1])

    # a resumed run reuses the saved folds: doctored scores that favour the largest weight win
    for k in (1, 2):
        path = run / "checkpoints" / f"class_cv_fold{k}.pt"
        saved = torch.load(path, weights_only=False)
        assert saved["score"] == "top1"
        torch.save({**saved, "scores": torch.tensor([0.0, 0.0, 1.0])}, path)
    metrics, objects = train(cfg)
    report = json.loads((run / "metrics.json").read_text())
    assert report["class_cv"]["fold_scores"][1:] == [[0.0, 0.0, 1.0]] * 2
    assert metrics["test/prior_weight_zsl"] == 5.0
    # ... also after a resume that changes only what a resume may (RESUME_MAY_CHANGE)
    elsewhere = copy.deepcopy(cfg)
    with open_dict(elsewhere):
        elsewhere.trainer.log_every_n_steps = 7
    train(elsewhere)
    assert json.loads((run / "metrics.json").read_text())["class_cv"]["fold_scores"][1:] == [
        [0.0, 0.0, 1.0]] * 2
    # ... but not scores of another zsl_score: fold 1 is validated again (log-likelihoods, <= 0)
    path = run / "checkpoints" / "class_cv_fold1.pt"
    torch.save({**torch.load(path, weights_only=False), "score": "log_likelihood"}, path)
    train(cfg)
    report = json.loads((run / "metrics.json").read_text())
    assert report["class_cv"]["fold_scores"][1] == cv["fold_scores"][1]
    assert report["class_cv"]["fold_scores"][2] == [0.0, 0.0, 1.0]
    # ... nor a fold trained with another config (a resume with changed overrides): fold 2 again
    path = run / "checkpoints" / "class_cv_fold2.pt"
    torch.save({**torch.load(path, weights_only=False), "config": "another config's hash"}, path)
    train(cfg)
    report = json.loads((run / "metrics.json").read_text())
    assert report["class_cv"]["fold_scores"][2] == cv["fold_scores"][2]
    for name in ("class_cv_fold1_progress", "class_cv_fold2_progress"):  # each trained twice
        assert len(fold_weights[name]) == 2 and fold_weights[name][0] == fold_weights[name][1], name


def test_fast_dev_run_skips_class_cv_when_its_one_validation_batch_scored_no_weight(tmp_path, caplog):
    # one clip per evaluation batch: fast_dev_run's single validation batch holds one role only,
    # as its first 256 clips do on rendered SOL
    cfg = compose_train_cfg(tmp_path, WORD + [*QUICK, "+trainer.fast_dev_run=true",
                                              "dataset.eval_batch_size=1"])
    assert cfg.model.pitch_prior.class_cv
    with caplog.at_level("WARNING", logger="fewzero.train"):
        metrics, objects = train(cfg)
    assert "class cross-validation is skipped" in caplog.text
    report = json.loads((Path(objects["cfg"].paths.output_dir) / "metrics.json").read_text())
    assert "class_cv" not in report
    assert objects["model"].pitch_prior.weight_for("zsl") == pytest.approx(cfg.model.pitch_prior.weight)


def test_weight_criteria_script_chooses_on_the_other_folds_and_scores_top1_on_the_held_out_one(tmp_path,
                                                                                                capsys):
    criteria = load_script("zsl_weight_criteria")
    candidates = [0.0, 0.1, 1.0]
    top1 = [[0.5, 0.6, 1.0], [0.9, 0.7, 0.3], [0.4, 0.8, 0.6]]
    likelihood = [[-0.9, -0.5, -0.1], [-0.2, -0.4, -0.3], [-0.8, -0.6, -0.2]]
    # holding out fold 0, top-1's mean over folds 1-2 is best at 0.1, where fold 0 has 0.6;
    # the likelihood's at 1.0, where fold 0 has 1.0
    assert criteria.leave_one_fold_out(top1, top1, candidates, 0.1) == [(0.1, 0.6), (1.0, 0.3), (0.0, 0.4)]
    assert criteria.leave_one_fold_out(top1, likelihood, candidates, 0.1) == [(1.0, 1.0), (1.0, 0.3),
                                                                               (1.0, 0.6)]
    assert criteria.best_candidate(candidates, [0.5, 0.7, 0.7], 0.1) == 0.1  # a tie keeps the a-priori
    assert criteria.best_candidate(candidates, [0.7, 0.5, 0.7], 0.1) == 0.0  # equally near: the smaller

    def run(recipe, seed, scores, score, steps=700):
        path = tmp_path / recipe / f"seed{seed}"
        path.mkdir(parents=True)
        report = {"folds": [["A"], ["B"], ["C"]], "steps": steps, "candidates": candidates,
                  "score": score, "fold_scores": scores}
        (path / "metrics.json").write_text(json.dumps({"class_cv": report}))

    run("top1", 0, top1, "top1")
    run("likelihood", 0, likelihood, "log_likelihood")
    monkey_argv = ["zsl_weight_criteria.py", str(tmp_path / "top1"), str(tmp_path / "likelihood")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", monkey_argv)
        criteria.main()
        out = capsys.readouterr().out
        assert "mean leave-one-fold-out top-1, top1: 0.433" in out
        assert "mean leave-one-fold-out top-1, log_likelihood: 0.633" in out
        run("top1", 1, top1, "top1", steps=700)
        run("likelihood", 1, likelihood, "log_likelihood", steps=1500)  # other fold models
        with pytest.raises(SystemExit, match="differ in folds, selected steps or candidates"):
            criteria.main()
        # two top-1 recipes (or one folder twice): their rows and mean merged under "top1"
        mp.setattr("sys.argv", [*monkey_argv[:2], str(tmp_path / "top1")])
        with pytest.raises(SystemExit, match=r"top1/seed0 scored weights by top1 as well: the second"):
            criteria.main()


def test_class_cv_on_one_pseudo_unseen_class_says_the_configured_weight_stays(tmp_path):
    """One pseudo-unseen class scores every weight alike (ZSL among one candidate is always
    right), as on the image split: the report and the log say nothing was chosen."""
    cfg = compose_train_cfg(tmp_path, WORD + [*SELECT_FIRST_EPOCH, "model.pitch_prior.class_cv=true",
                                              "dataset.split.pseudo_unseen=[Oboe]",
                                              "dataset.split.pseudo_unseen_folds=[]",
                                              "model.pitch_prior.weight=0.05",
                                              "model.pitch_prior.weight_candidates=[0.0,0.05,0.5]"])
    metrics, objects = train(cfg)
    cv = json.loads((Path(objects["cfg"].paths.output_dir) / "metrics.json").read_text())["class_cv"]
    assert len(cv["folds"]) == 1 and len(set(cv["mean_scores"])) == 1
    assert cv["undecided"] is True and cv["zsl_weight"] == 0.05
    assert metrics["test/prior_weight_zsl"] == pytest.approx(0.05)


def test_a_setting_without_test_clips_draws_no_confusion_matrix(tmp_path):
    """fast_dev_run tests one batch; of one clip here, so one of ZSL (unseen clips only) and the
    GZSL setting may have none: an empty matrix is not drawn."""
    cfg = compose_train_cfg(tmp_path, WORD + ["~logger", "~callbacks.learning_rate_monitor",
                                              "+trainer.fast_dev_run=true", "dataset.eval_batch_size=1",
                                              "model.plot_dir=${paths.output_dir}/plots",
                                              "model.figures=true"])
    _, objects = train(cfg)
    confusions = objects["model"].results.confusions
    plots = Path(objects["cfg"].paths.output_dir) / "plots"
    drawn = {key: (plots / f"test_confusion_{key}.png").is_file() for key in ("zsl", "gzsl_cs")}
    assert drawn == {key: bool(confusions[key].any()) for key in drawn}
    assert drawn["gzsl_cs"] and not drawn["zsl"]  # the one test clip is a seen one


def test_a_class_cv_fold_whose_scores_could_not_be_saved_leaves_no_half_file_to_resume_from(
        tmp_path, monkeypatch):
    # a kill or a full disk while class_cv_fold1.pt was written left half of it, and the resume,
    # which reads it first, stopped on it ("PytorchStreamReader failed reading zip archive")
    save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if Path(str(f)).name.startswith("class_cv_fold1.pt"):
            Path(f).write_bytes(b"PK half a file")
            raise OSError(28, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    cfg = compose_train_cfg(tmp_path, WORD + [*SELECT_FIRST_EPOCH, "model.pitch_prior.class_cv=true"])
    with pytest.raises(OSError, match="No space"):
        train(cfg)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith("class_cv_fold1.pt")]
