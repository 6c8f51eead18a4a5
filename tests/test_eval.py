import json
import os
import shutil
from pathlib import Path

import hydra
import pytest
import torch
from conftest import compose_train_cfg
from omegaconf import OmegaConf
from tinysol_fixture import make_mini_tinysol

from fewzero import eval as eval_module
from fewzero.data.clips import TINYSOL_INSTRUMENTS
from fewzero.eval import (
    apply_overrides,
    check_output_dir,
    check_tested_clips_unheard,
    check_whitening_chosen_on_new_classes,
    evaluate,
    main,
)
from fewzero.report import collect
from fewzero.train import save_run_overrides, train


def test_checkpoint_is_re_evaluated_with_other_episode_settings(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["test=false", "model.figures=true"])
    run = Path(cfg.paths.output_dir)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # what Hydra writes for a real run
    train(cfg)
    ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval"
    main([f"ckpt_path={ckpt}", f"hydra.run.dir={out}",  # the command line, output dir as in training
          "dataset.episodes.test=[{n_way: 3, n_shot: 2, n_query: 4, n_episodes: 7}]"])
    report = json.loads((out / "metrics.json").read_text())
    assert report["test_episodes"]["3way_2shot"]["n_episodes"] == 7
    assert 0.0 <= report["metrics"]["test/3way_2shot_acc"] <= 1.0
    assert "hydra" not in OmegaConf.load(out / ".hydra" / "config.yaml")  # not taken as an override
    assert (out / "plots" / "test_embeddings_3way_2shot.png").is_file()
    assert report["checkpoint"] == str(ckpt.resolve())


def test_cli_reads_paths_quoted_as_fewzero_train_takes_them(tmp_path):
    # README quotes a run's paths for fewzero.train ('ckpt_path="<run>/checkpoints/last.ckpt"', as
    # run directory names hold '=' and ','): the same words given to fewzero.eval were refused as a
    # checkpoint named with its quotes that "does not exist"
    cfg = compose_train_cfg(tmp_path, ["test=false", "trainer.max_steps=2"])
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval" / "0_seed=1,lr=0.1"
    main([f'ckpt_path="{ckpt}"', f"hydra.run.dir='{out}'"])
    assert json.loads((out / "metrics.json").read_text())["checkpoint"] == str(ckpt.resolve())


def test_evaluations_of_other_test_classes_or_runs_are_reported_as_other_configurations(tmp_path):
    """Each evaluation records the run's overrides with its own (those of one key replaced), so
    fewzero.report pools evaluations over seeds as it pools runs, and never averages evaluations
    of other test classes, or of runs trained otherwise, as one configuration."""
    cfg = compose_train_cfg(tmp_path, ["trainer.max_steps=2", "test=false"])
    run = Path(cfg.paths.output_dir)
    run_settings = ["seed=0", "paths.log_dir=/elsewhere",
                    "dataset.episodes.test=[{n_way: 5, n_shot: 1, n_query: 5, n_episodes: 6}]"]
    save_run_overrides(run_settings, run)  # as Hydra writes them for a run, and what its name leaves out
    OmegaConf.save({"hydra": {"job": {"config": {"override_dirname": {"exclude_keys": ["paths.log_dir"]}}}}},
                   run / ".hydra" / "hydra.yaml")
    train(cfg)
    ckpt = run / "checkpoints" / "last.ckpt"
    setting = "dataset.episodes.test=[{n_way: 2, n_shot: 1, n_query: 3, n_episodes: 4}]"
    tests = {"brass": "dataset.split.test=[Trumpet in C,Bass Tuba]",
             "reeds": "dataset.split.test=[Bassoon,Alto Saxophone]"}
    for name, classes in tests.items():
        evaluate(ckpt, [classes, setting], tmp_path / "evals" / name)
    assert list(OmegaConf.load(tmp_path / "evals" / "brass" / ".hydra" / "overrides.yaml")) == [
        "seed=0", tests["brass"], setting]
    configs, _ = collect(tmp_path / "evals")
    assert sorted(c.name for c in configs) == sorted(  # over seeds, as for runs
        ",".join(sorted([classes, setting])) for classes in tests.values())
    moved = tmp_path / "moved.ckpt"  # out of its run: the overrides its checkpoint records
    shutil.copy(ckpt, moved)
    evaluate(moved, [setting], tmp_path / "moved_eval")
    assert list(OmegaConf.load(tmp_path / "moved_eval" / ".hydra" / "overrides.yaml")) == [
        *run_settings[:2], setting]


def test_eval_refuses_to_write_into_the_run_it_tests_or_over_another_runs_metrics(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["trainer.max_steps=2"])
    train(cfg)  # composed by a script: train saves the run's .hydra/config.yaml itself
    run = Path(cfg.paths.output_dir)
    ckpt = run / "checkpoints" / "last.ckpt"
    before = {p: p.read_bytes() for p in (run / "metrics.json", run / ".hydra" / "config.yaml")}
    for out in (run, tmp_path / "other"):
        if out != run:  # another run's folder, or an earlier evaluation's
            out.mkdir()
            (out / "metrics.json").write_text("{}")
        # the command line prints the refusal alone, without a traceback
        with pytest.raises(SystemExit, match=r"^fewzero.eval: .*would overwrite its metrics.json.*"
                                             r"Choose another hydra.run.dir, or leave it out"):
            main([f"ckpt_path={ckpt}", f"hydra.run.dir={out}", "model.whitening=null"])
    assert {p: p.read_bytes() for p in before} == before
    assert (tmp_path / "other" / "metrics.json").read_text() == "{}"


def test_eval_refuses_the_checkpoints_own_run_directory_even_without_a_metrics_json(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"  # a run stopped before its test
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match="is the run directory of the checkpoint"):
        check_output_dir(ckpt, tmp_path / "run" / "checkpoints" / "..")
    check_output_dir(ckpt, tmp_path / "eval")  # a new directory
    # from Python the folder is evaluate's output_dir, which cannot be left out
    with pytest.raises(ValueError, match=r"^output_dir=.* is the run directory of the checkpoint: .*"
                                         r"Choose another output_dir \(a new folder\)\.$"):
        evaluate(ckpt, [], tmp_path / "run")


def test_overrides_must_name_keys_of_the_run_config_unless_added_with_a_plus():
    cfg = OmegaConf.create({"model": {"whitening": {"shrinkage": 1.0}, "plot_dir": "plots"}})
    changed = apply_overrides(cfg, ["model.whitening=null", "+model.extra=[1,2]"])
    assert changed.model.whitening is None and list(changed.model.extra) == [1, 2]
    with pytest.raises(ValueError, match=r"model\.whitenning.*\+key=value"):
        apply_overrides(cfg, ["model.whitenning=null"])  # misspelt: would be read by nothing
    assert cfg.model.whitening.shrinkage == 1.0  # the loaded config itself is left as it was


def test_missing_run_config_says_what_to_pass(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "x.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {}}, ckpt)  # as written before checkpoints recorded their config
    with pytest.raises(FileNotFoundError, match="run_config="):
        evaluate(ckpt, [], tmp_path / "out")


def test_a_missing_run_config_or_an_unreadable_checkpoint_is_named(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "x.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")  # truncated to nothing
    # the missing file itself, not the checkpoint, is named first
    with pytest.raises(FileNotFoundError, match=r"^run_config=.*typo.yaml does not exist\. Pass "):
        evaluate(ckpt, [], tmp_path / "out", tmp_path / "typo.yaml")
    with pytest.raises(ValueError, match="cannot be read as a checkpoint"):
        evaluate(ckpt, [], tmp_path / "out")


def test_a_checkpoint_moved_out_of_its_run_is_rebuilt_from_the_config_it_records(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["trainer.max_steps=2", "test=false"])
    train(cfg)
    moved = tmp_path / "elsewhere" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", moved)
    metrics, objects = evaluate(moved, [], tmp_path / "eval")
    assert objects["cfg"].trainer.max_steps == 2 and objects["trainer"].global_step == 0
    assert 0.0 <= metrics["test/5way_5shot_acc"] <= 1.0


def test_a_run_directory_moved_elsewhere_is_evaluated_from_its_new_place(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["trainer.max_steps=2", "test=false"])
    run = Path(cfg.paths.output_dir)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    train(cfg)
    moved = tmp_path / "archive" / "run"
    moved.parent.mkdir()
    shutil.move(run, moved)  # the original place is gone
    best = next(p for p in (moved / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    metrics, _ = evaluate(best, [], tmp_path / "eval")
    assert 0.0 <= metrics["test/5way_5shot_acc"] <= 1.0
    assert not (tmp_path / "eval" / "checkpoints").exists()  # a test alone copies no checkpoint


ZSL_RUN = {"dataset": {"split": {"seen": ["A", "B", "C"], "unseen": ["D", "E"]}, "test_fold": 4,
                       "source": {"_target_": "Rendered", "seed": 0, "fold_by": "note", "root": "x"}}}
FSL_RUN = {"dataset": {"split": {"train": ["A", "B"], "val": ["C"], "test": ["D", "E"]},
                       "folds": [0, 1, 2], "source": {"_target_": "Rendered", "seed": 0}}}


@pytest.mark.parametrize("run, overrides, refused", [
    (ZSL_RUN, ["dataset.split.unseen=[D]"], None),
    (ZSL_RUN, ["dataset.source.root=y"], None),  # the same files elsewhere
    (ZSL_RUN, ["dataset.split.unseen=[D,C]"], r"unseen names \['C'\], seen classes of the run"),
    (ZSL_RUN, ["dataset.test_fold=0"], r"test fold is now fold 0, but the run trained \['A', 'B', 'C'\]"),
    (ZSL_RUN, ["dataset.source.fold_by=pitch"], "of another fold dealing"),
    (ZSL_RUN, ["dataset.test_fold=0", "dataset.split.seen=[D]", "dataset.split.unseen=[E]"], None),
    (FSL_RUN, ["dataset.split.test=[C,D]"], r"test names \['C'\].*must be new to the model"),
    # clips of folds the run never read, of a class it trained on: no new class to the model
    (FSL_RUN, ["dataset.split.test=[A,D]", "dataset.folds=[3,4]"], r"test names \['A'\]"),
    (FSL_RUN, ["dataset.split.train=[B]", "dataset.split.test=[A,D]", "dataset.folds=[3,4]"],
     r"test names \['A'\]"),
    (FSL_RUN, ["dataset.split.test=[A,D]", "dataset.folds=[3,4]", "dataset.source.seed=1"],
     r"test names \['A'\]"),  # another dealing of the same recordings to folds
    (FSL_RUN, ["dataset.split.test=[D]", "dataset.folds=[3,4]"], None),  # its own test class
    (FSL_RUN, ["dataset.split.test=[A,D]", "dataset.folds=null"], r"test names \['A'\]"),
    # another kind of source (real TinySOL for a run on rendered SOL): other recordings, so any
    # fold may be the seen classes' test fold; a class the run trained is still no test class
    (ZSL_RUN, ["dataset/source=tinysol", "dataset.test_fold=0"], None),
    (ZSL_RUN, ["dataset/source=tinysol", "dataset.split.unseen=[D,C]"], r"unseen names \['C'\]"),
    (FSL_RUN, ["dataset/source=tinysol", "dataset.split.test=[A,D]"], r"test names \['A'\]"),
])
def test_eval_refuses_to_test_on_clips_the_checkpoint_learned_from(run, overrides, refused):
    trained = OmegaConf.create(run)
    passes_or_refuses(check_tested_clips_unheard, trained, apply_overrides(trained, overrides),
                      refused and f"learned from, not on new ones: .*{refused}")


def passes_or_refuses(check, trained, tested, refused: str | None) -> None:
    """`check(trained, tested)` passes when `refused` is None, else raises a ValueError matching it."""
    if refused is None:
        check(trained, tested)
    else:
        with pytest.raises(ValueError, match=refused):
            check(trained, tested)


@pytest.mark.parametrize("overrides, refused", [
    (["dataset.split.val=[B]", "dataset.split.train=[A,C]"], r"val names \['B'\], which the run trained"),
    (["dataset.split.val=[B]", "model.whitening=null"], None),  # nothing is chosen on them
    (["dataset.split.val=[E]", "dataset.split.test=[D]"], None),  # new to the run, as the test
    ([], None),
])
def test_eval_refuses_to_choose_the_test_whitening_on_classes_the_run_trained_on(overrides, refused):
    trained = OmegaConf.create({**FSL_RUN, "model": {"whitening": {"_target_": "W"}}})
    passes_or_refuses(check_whitening_chosen_on_new_classes, trained, apply_overrides(trained, overrides),
                      refused and f"{refused}.*model.whitening=null")


ZSL_TABLE_RUN = {"dataset": {"split": {"seen": ["A", "B"], "unseen": ["C"]}, "test_fold": 4, "source": {
    "_target_": "Rendered", "seed": 0,
    "instruments": [{"name": "A", "program": 1}, {"name": "B", "program": 2}, {"name": "C", "program": 3}]}}}


@pytest.mark.parametrize("instruments, refused", [
    # appended: rendered SOL renders and deals the run's instruments as before
    ("[{name: A, program: 1}, {name: B, program: 2}, {name: C, program: 3}, {name: D, program: 4}]", None),
    ("[{name: D, program: 4}, {name: A, program: 1}, {name: B, program: 2}, {name: C, program: 3}]",
     "of another fold dealing.*a new instrument goes after the run's dataset.source.instruments"),
    ("[{name: A, program: 5}, {name: B, program: 2}, {name: C, program: 3}, {name: D, program: 4}]",
     "of another fold dealing"),
])
def test_an_instrument_appended_to_the_source_is_tested_as_a_new_unseen_class(instruments, refused):
    trained = OmegaConf.create(ZSL_TABLE_RUN)
    tested = apply_overrides(trained, [f"dataset.source.instruments={instruments}",
                                       "dataset.split.unseen=[C,D]"])
    if refused is None:
        check_tested_clips_unheard(trained, tested)
    else:
        with pytest.raises(ValueError, match=f"learned from, not on new ones: .*{refused}"):
            check_tested_clips_unheard(trained, tested)


@pytest.mark.parametrize("run, override, kind", [
    (ZSL_RUN, "dataset.episodes.test=[{n_way: 2}]", "few-shot test settings.*zero-shot audio kind"),
    (ZSL_RUN, "+dataset.episodes.test=[{n_way: 2}]", "few-shot test settings.*zero-shot audio kind"),
    (FSL_RUN, "dataset.split.unseen=[D]", "zero-shot audio test settings.*few-shot kind.*episodes"),
    ({"dataset": {"name": "AWA2"}}, "dataset.split.test=[D]", "few-shot test settings.*xlsa17"),
])
def test_a_test_setting_of_the_other_kind_of_run_is_named_as_such(run, override, kind):
    with pytest.raises(ValueError, match=kind):
        apply_overrides(OmegaConf.create(run), [override])


def test_a_dataset_source_group_replaces_the_runs_source_and_its_keys_apply_on_top():
    run = {"paths": {"data_dir": "/data"}, **ZSL_RUN}
    # given after the keys it sets: a group is applied first, as Hydra composes
    tested = apply_overrides(OmegaConf.create(run), ["dataset.source.allow_missing=true",
                                                     "dataset/source=tinysol"])
    source = tested.dataset.source
    assert source._target_ == "fewzero.data.tinysol.TinySOL"
    assert "root" not in source and "fold_by" not in source  # rendered SOL's keys are gone
    assert source.allow_missing is True and source.data_home == "/data/tinysol"
    assert tested.dataset.split == run["dataset"]["split"]  # the rest stays the run's
    # a section switched off with null is still a key=value override
    assert apply_overrides(OmegaConf.create({"model": {"whitening": {"shrinkage": 1.0}}}),
                           ["model.whitening=null"]).model.whitening is None


@pytest.mark.parametrize("run, override, refused", [
    (ZSL_RUN, "dataset=tinysol_zsl", r"dataset=tinysol_zsl would replace the run's whole dataset "
                                     r"section.*write dataset/source=tinysol"),
    (ZSL_RUN, "dataset.source=tinysol", r"whole dataset.source section.*To use "
                                        r"configs/dataset/source/tinysol.yaml write dataset/source=tinysol"),
    (ZSL_RUN, "dataset/source=TinySOL", r"no .*TinySOL.yaml. The options of dataset/source are "
                                        r"\['sol', 'tinysol', 'tones'\]"),
    (ZSL_RUN, "dataset/split=brass_unseen", r"no .*brass_unseen.yaml.*fewzero.eval reads no --config-dir: "
                                            r"give one of your own key by key, e.g. 'dataset.split.<key>"),
    (ZSL_RUN, "model/backbone=music_fsl_cnn", "takes the config groups dataset/source, dataset/split only"),
    (ZSL_RUN, "dataset/split=fsl_cv1", "a split of the few-shot kind.*zero-shot audio kind"),
    (FSL_RUN, "dataset/split=word_audio", "a split of the zero-shot audio kind.*few-shot kind"),
])
def test_a_config_group_eval_cannot_apply_is_named_with_what_to_write(run, override, refused):
    with pytest.raises(ValueError, match=refused):
        apply_overrides(OmegaConf.create(run), [override])


@pytest.mark.parametrize("args", [["--config-dir", "/my/conf"], ["--config-dir=/my/conf"],
                                  ["-cd", "/my/conf"]])
def test_cli_refuses_a_config_dir_and_says_how_to_give_a_split_of_ones_own(args):
    """Not the usage text alone: the run's saved config holds what its --config-dir gave it."""
    with pytest.raises(SystemExit, match=r"takes no --config-dir: it rebuilds the checkpoint's run from "
                                         r"the config that run saved.*'dataset.split.test=\[...\]' for a "
                                         r"few-shot checkpoint.*'dataset.split.unseen=\[...\]'"):
        main(["ckpt_path=missing.ckpt", *args, "dataset/split=mine"])


@pytest.mark.parametrize("setting", ["hydra.job.chdir=true", "paths.output_dir=/tmp/x", "+hydra.job.name=x"])
def test_cli_refuses_hydra_settings_it_would_ignore(setting):
    with pytest.raises(SystemExit, match=r"hydra.run.dir=<dir>.*would do nothing"):
        main(["ckpt_path=missing.ckpt", setting])


def test_cli_names_the_checkpoints_there_are_when_the_one_given_is_missing(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"missing.ckpt does not exist.*has \['last.ckpt'\]"):
        main([f"ckpt_path={checkpoints / 'missing.ckpt'}", f"hydra.run.dir={tmp_path / 'out'}"])


def test_cli_reads_a_checkpoint_path_that_holds_equals_signs(tmp_path):
    # run directories are named after their overrides: the path is split at its first '=' only
    missing = tmp_path / "runs" / "2026-12-05_seed=1,model.x=a" / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit, match=r"_seed=1,model\.x=a/checkpoints/last\.ckpt does not exist"):
        main([f"ckpt_path={missing}", f"hydra.run.dir={tmp_path / 'out'}"])


def test_cli_without_arguments_prints_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "ckpt_path=" in capsys.readouterr().out


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["-h"], 0), (["ckpt_path=x.ckpt", "--help"], 0),
                                        (["x.ckpt"], 2), (["ckpt_path=x.ckpt", "x.ckpt"], 2)])
def test_cli_help_exits_0_and_an_argument_without_equals_sign_exits_2(args, code, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == code
    assert "ckpt_path=" in capsys.readouterr().out


def test_zero_shot_checkpoint_is_re_evaluated_on_other_candidate_sets(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio", "test=false"])
    run = Path(cfg.paths.output_dir)
    train(cfg)  # composed by a script, not by Hydra: train itself saves the config
    assert OmegaConf.load(run / ".hydra" / "config.yaml") == cfg
    ckpt = run / "checkpoints" / "last.ckpt"
    fewer_unseen = ["Bassoon", "Viola"]
    metrics, objects = evaluate(ckpt, [f"dataset.split.unseen=[{','.join(fewer_unseen)}]"],
                                tmp_path / "eval")
    assert objects["trainer"].global_step == 0  # no training (and no refit) happened
    assert objects["datamodule"].unseen == fewer_unseen
    confusions = objects["model"].results.confusions
    assert {tuple(c.shape) for c in confusions.values()} >= {(9 + len(fewer_unseen),) * 2}
    for key in ("test/zsl_top1", "test/seen_top1", "test/gzsl_cs_h"):
        assert 0.0 <= metrics[key] <= 1.0
    assert (tmp_path / "eval" / "metrics.json").is_file()
    with pytest.raises(ValueError, match=r"unseen names \['Oboe'\], seen classes of the run"):
        evaluate(ckpt, ["dataset.split.unseen=[Oboe,Viola]"], tmp_path / "eval_seen")


@pytest.mark.parametrize(("validation", "said"), [
    ([], "penalty 0.0500 (from validation)"),
    (["dataset.split.pseudo_unseen=[]", "dataset.split.pseudo_unseen_folds=[]"],
     "penalty 0.0000 (not chosen: its run's validation scored one side only, as "
     "dataset.split.pseudo_unseen is empty)"),
    (["dataset.val_fold=null"], "penalty 0.0000 (not chosen: its run's validation scored one side only, "
                                "as dataset.val_fold is null)"),
])
def test_zero_shot_evaluation_says_whether_its_runs_validation_chose_the_penalty(
        tmp_path, capsys, monkeypatch, validation, said):
    """A test alone logs no validation: the summary said "(from validation)" for a checkpoint
    whose run validated one side only, where the penalty stayed 0."""
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_word_audio", "test=false",
                                       "dataset.refit_on_trainval=false", *validation])
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if not validation:  # a chosen penalty of its own, so that "0.0000" could not pass for it
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        state["state_dict"]["calibration_gamma"].fill_(0.05)
        torch.save(state, ckpt)
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    capsys.readouterr()
    evaluate(ckpt, [], tmp_path / "eval")
    assert said in capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert ("penalty_not_chosen" in report) == bool(validation)


def test_zero_shot_checkpoint_is_re_evaluated_with_an_instrument_the_run_never_had(tmp_path):
    """The zero-shot journey: a class added to the source after training is tested as unseen."""
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_word_audio", "test=false"])
    train(cfg)
    names = [*cfg.dataset.source.instruments, "Piccolo"]
    unseen = [*cfg.dataset.split.unseen, "Piccolo"]
    metrics, objects = evaluate(
        Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt",
        [f"dataset.source.instruments=[{','.join(repr(n) for n in names)}]",
         f"dataset.split.unseen=[{','.join(repr(n) for n in unseen)}]",
         "+side_info.words.Piccolo=[piccolo]"], tmp_path / "eval")
    assert objects["datamodule"].unseen == unseen
    assert objects["datamodule"].indices["test_unseen"].numel() == 12 * len(unseen)
    assert 0.0 <= metrics["test/zsl_top1"] <= 1.0


def test_an_attribute_row_added_for_a_new_class_leaves_the_seen_vectors_the_run_trained_with(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio", "test=false"])
    train(cfg)
    seen = list(cfg.dataset.split.seen)
    trained_vectors = hydra.utils.instantiate(cfg.side_info).vectors(seen).mean  # (n_seen, dim)
    names = [*cfg.dataset.source.instruments, "Piccolo"]
    unseen = [*cfg.dataset.split.unseen, "Piccolo"]
    row = ("{family: woodwinds, hornbostel_sachs: aerophone_edge, excitation: edge_tone, reed: none, "
           "pitch_control: keys, bore: conical, material: metal, register: soprano, size: small, "
           "range_low: 74, range_high: 108}")
    metrics, objects = evaluate(
        Path(cfg.paths.output_dir) / "checkpoints" / "refit_trainval.ckpt",
        [f"dataset.source.instruments=[{','.join(repr(n) for n in names)}]",
         f"dataset.split.unseen=[{','.join(repr(n) for n in unseen)}]",
         f"+side_info.table={{Piccolo: {row}}}"], tmp_path / "eval")
    assert objects["datamodule"].seen == seen and objects["datamodule"].unseen == unseen
    # the range_low/range_high columns are standardised over the run's 14 rows, as in training
    torch.testing.assert_close(objects["model"].side_matrix[:len(seen)], trained_vectors)
    assert 0.0 <= metrics["test/zsl_top1"] <= 1.0


def test_zero_shot_checkpoint_is_tested_on_real_tinysol_through_dataset_source(tmp_path, caplog):
    """The cross-dataset journey: a run trained on one source (tones here, rendered SOL for a
    user) tested on a partial TinySOL (the generated mini one): the run's features, the other
    source's folds all new to it, and the seen classes without a test-fold clip named."""
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_word_audio", "test=false"])
    train(cfg)
    mini = make_mini_tinysol(tmp_path / "mini")
    home = mini.build_home(tmp_path / "tinysol")
    overrides = ["dataset/source=tinysol", f"dataset.source.data_home={home}",
                 f"dataset.source.index_path={mini.index}", "dataset.source.allow_missing=true",
                 # classes with clips on disk; of the seen ones, Flute has none in fold 1
                 "dataset.split.seen=[Accordion,Violin,Flute]", "dataset.split.unseen=[Bassoon,Bass Tuba]",
                 "dataset.split.pseudo_unseen=[Flute]", "dataset.split.pseudo_unseen_folds=[]",
                 "dataset.test_fold=1"]  # every TinySOL fold is new to the run
    with caplog.at_level("WARNING", logger="fewzero.data.zsl_datamodule"):
        metrics, objects = evaluate(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt",
                                    overrides, tmp_path / "eval")
    dm = objects["datamodule"]
    assert type(dm.source).__name__ == "TinySOL" and dm.features == hydra.utils.instantiate(
        cfg.dataset.features)  # the run's log-mel settings, not another dataset config's
    assert dm.untested_classes() == {"seen": ["Flute"], "unseen": []}
    assert ("Seen class(es) ['Flute'] of dataset.split.seen have no test clip in fold 1 "
            "(dataset.test_fold) of tinysol" in caplog.text
            and "over ['Accordion', 'Violin'] only" in caplog.text)
    assert 0.0 <= metrics["test/zsl_top1"] <= 1.0 and 0.0 <= metrics["test/seen_top1"] <= 1.0


def test_refit_conse_checkpoint_is_re_evaluated_against_the_classes_it_was_trained_on(tmp_path):
    """ConSE scores relative to its training classes: a refit checkpoint (every seen class) must
    get the same figures again, although the run's config says the validation phase's role."""
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio", "model=conse",
                                       "model.pitch_prior=null"])
    run = Path(cfg.paths.output_dir)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    trained, _ = train(cfg)
    ckpt = run / "checkpoints" / "refit_trainval.ckpt"
    assert trained["test/checkpoint"] == str(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["datamodule_train_on"] == "trainval"
    del saved["datamodule_train_on"]  # as written before the role was saved: told by its name
    old = tmp_path / "old" / "refit_trainval.ckpt"
    old.parent.mkdir()
    torch.save(saved, old)
    moved = tmp_path / "moved" / "model.ckpt"  # out of its run: rebuilt from the config it records
    moved.parent.mkdir()
    shutil.copy(ckpt, moved)
    keys = ("test/zsl_top1", "test/seen_top1", "test/gzsl_cs_h", "test/gzsl_u", "test/gzsl_s")
    config = run / ".hydra" / "config.yaml"
    for path, name, run_config in ((ckpt, "eval", config), (old, "eval_old", config),
                                   (moved, "eval_moved", None)):
        metrics, objects = evaluate(path, [], tmp_path / name, run_config)
        assert objects["datamodule"].train_on == "trainval"
        assert len(objects["model"].head.anchors) == len(objects["datamodule"].seen)  # all 9
        for key in keys:
            assert metrics[key] == pytest.approx(trained[key], abs=1e-6), (name, key)


def test_a_checkpoint_tested_on_fewer_seen_classes_keeps_what_it_took_from_those_it_trained_on(tmp_path):
    """Seen classes left out of the test (a partial dataset on disk) must not rebuild the model
    around the rest: ConSE's anchors and centred side information come from the classes the fit
    trained against, so the unseen classes' ZSL figures stay the run's own."""
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_word_audio", "side_info.center=true"])
    trained, objects = train(cfg)
    model = objects["model"]
    assert len(model.head.anchors) == 9
    seen, unseen = list(cfg.dataset.split.seen), list(cfg.dataset.split.unseen)
    tested = seen[:4]
    metrics, tested_objects = evaluate(
        Path(trained["test/checkpoint"]),
        [f"dataset.split.seen=[{','.join(tested)}]", "dataset.split.pseudo_unseen=[]",
         "dataset.split.pseudo_unseen_folds=[]"], tmp_path / "eval")
    again = tested_objects["model"]
    assert again.trained_classes == seen and tested_objects["datamodule"].seen == tested
    torch.testing.assert_close(again.head.anchors, model.head.anchors, rtol=0, atol=0)
    rows = {name: row for name, row in zip(model.class_names, model.side_matrix, strict=True)}
    torch.testing.assert_close(again.side_matrix, torch.stack([rows[n] for n in again.class_names]),
                               rtol=0, atol=0)
    for key in ("test/zsl_top1", "test/zsl_top3"):
        assert metrics[key] == pytest.approx(trained[key], abs=1e-6), key
    assert set(again.class_names) == {*tested, *unseen}


def test_zero_shot_run_started_from_a_few_shot_checkpoint_is_re_evaluated_without_that_file(tmp_path):
    """The run's checkpoint holds the encoder's weights, so fewzero.eval needs not the init file
    again; what the init checkpoint's run read is recorded in it, so a test on clips that run
    heard (a class it trained, added as unseen) is refused all the same."""
    names = [*TINYSOL_INSTRUMENTS, "Piccolo"]
    fsl = compose_train_cfg(tmp_path / "fsl", [
        "trainer.max_steps=1", "test=false", "dataset.folds=[0,1,2]", "dataset.episodes.val.n_way=2",
        f"dataset.source.instruments=[{','.join(repr(n) for n in names)}]",
        "dataset.split.train=[Accordion,Cello,Clarinet in Bb,Contrabass,Flute,Piccolo]",
        "dataset.split.val=[French Horn,Violin]"], clips_per_class=20)
    train(fsl)
    init = Path(fsl.paths.output_dir) / "checkpoints" / "last.ckpt"
    cfg = compose_train_cfg(tmp_path / "zsl", [
        "experiment=zsl_word_audio", "model=eszsl", "model.pitch_prior=null",
        f"model.init_checkpoint={init}", f"dataset.features.n_mels={fsl.dataset.features.n_mels}"],
        clips_per_class=20)  # the few-shot run's source (less its appended Piccolo)
    trained, _ = train(cfg)
    shutil.move(init.parent.parent, tmp_path / "fsl_moved")  # the few-shot run is gone from there
    metrics, _ = evaluate(trained["test/checkpoint"], [], tmp_path / "eval")
    for key in ("test/zsl_top1", "test/seen_top1", "test/gzsl_cs_h"):
        assert metrics[key] == pytest.approx(trained[key], abs=1e-6), key
    unseen = [*cfg.dataset.split.unseen, "Piccolo"]
    with pytest.raises(ValueError, match=r"init_checkpoint=.*unseen classes \(test only\) \['Piccolo'\]"):
        evaluate(trained["test/checkpoint"], [
            f"dataset.source.instruments=[{','.join(repr(n) for n in names)}]",
            f"dataset.split.unseen=[{','.join(repr(n) for n in unseen)}]",
            "+side_info.words.Piccolo=[piccolo]"], tmp_path / "eval_piccolo")


def test_checkpoint_is_re_evaluated_with_whitening_switched_off_and_on(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["test=false"])
    run = Path(cfg.paths.output_dir)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    train(cfg)
    ckpt = run / "checkpoints" / "last.ckpt"
    # the whitening matrix is refitted, not saved: the checkpoint loads strictly either way
    metrics_on, objects_on = evaluate(ckpt, [], tmp_path / "on")
    metrics_off, objects_off = evaluate(ckpt, ["model.whitening=null"], tmp_path / "off")
    assert objects_off["model"].net.whitening is None
    assert objects_on["model"].net.whitening is not None
    for name in ("5way_1shot", "5way_5shot"):
        assert 0.0 <= metrics_off[f"test/{name}_acc"] <= 1.0
    assert any(metrics_on[k] != metrics_off[k] for k in metrics_on if k.endswith("_acc"))


def test_eval_refuses_another_seen_class_test_fold_for_a_zero_shot_checkpoint(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio"])
    config = tmp_path / "config.yaml"
    OmegaConf.save(cfg, config)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")  # refused before it is read
    with pytest.raises(ValueError, match=r"test fold is now fold 0, but the run trained \["):
        evaluate(ckpt, ["dataset.test_fold=0"], tmp_path / "eval", config)


@pytest.mark.parametrize("seen", ["[Violin,Flute,Bassoon]", "[Violin,Flute,Bass Tuba]"])
def test_eval_refuses_a_seen_class_the_zero_shot_run_never_trained_on(tmp_path, seen):
    """An unseen class of the run (Bassoon) or one it never listed (Bass Tuba, left out of its
    split) is no seen class: seen top-1 and GZSL s would be over a class the model never heard."""
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio",
                                       "dataset.split.unseen=[Bassoon,Viola,Trumpet in C]"])
    config = tmp_path / "config.yaml"
    OmegaConf.save(cfg, config)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")  # refused before it is read
    with pytest.raises(ValueError, match=rf"dataset.split.seen names \['{seen[14:-1]}'\], which the run "
                                         r"never trained on .*list it in dataset.split.unseen"):
        evaluate(ckpt, [f"dataset.split.seen={seen}", "dataset.split.unseen=[Viola]",
                        "dataset.split.pseudo_unseen=[]", "dataset.split.pseudo_unseen_folds=[]"],
                 tmp_path / "eval", config)


@pytest.mark.parametrize("dim", [None, 40])
def test_eval_refuses_an_attribute_value_the_runs_table_never_used(tmp_path, dim):
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio"])
    config = tmp_path / "config.yaml"
    OmegaConf.save(cfg, config)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")  # refused before it is read
    overrides = ["+side_info.table={Piccolo: {family: woodwinds, hornbostel_sachs: aerophone_edge, "
                 "excitation: edge_tone, reed: none, pitch_control: keys, bore: conical, material: "
                 "metal, register: soprano, size: very_small, range_low: 74, range_high: 108}}"]
    # the dim error's 'Set side_info.dim=40' cannot help: the checkpoint's head has 39 columns
    with pytest.raises(ValueError, match=r"\['side_info.table.Piccolo.size=very_small'\] are attribute "
                                         r"values the run's side_info.table never used.*"
                                         r"side_info.dim=39 columns only"):
        evaluate(ckpt, overrides + ([f"side_info.dim={dim}"] if dim else []), tmp_path / "eval", config)


def test_eval_standardises_attribute_numbers_over_the_rows_the_run_standardised_on(tmp_path):
    """The config standardises over each fit's training classes: an evaluation on fewer seen
    classes keeps the rows the checkpoint's fit trained on (the refit's seen classes, or the
    validation phase's, less the pseudo-unseen ones); so do runs whose config named the seen
    classes, or nothing (every row), with a row added; an evaluation that sets
    side_info.standardize_on itself keeps its own."""
    from fewzero.eval import keep_attribute_scaling

    trained = compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio"])
    seen, pseudo_unseen = list(trained.dataset.split.seen), list(trained.dataset.split.pseudo_unseen)
    refit, selected = tmp_path / "refit_trainval.ckpt", tmp_path / "step000700-val_acc0.8.ckpt"
    torch.save({"datamodule_train_on": "trainval"}, refit)
    torch.save({"datamodule_train_on": "train"}, selected)
    fewer = [f"dataset.split.seen=[{seen[0]},{seen[1]}]"]
    for ckpt, rows in ((refit, seen), (selected, [n for n in seen if n not in pseudo_unseen])):
        tested = apply_overrides(trained, fewer)
        assert tested.side_info.standardize_on == "train_classes"
        keep_attribute_scaling(trained, tested, fewer, ckpt)
        assert list(tested.side_info.standardize_on) == rows
    unchanged = apply_overrides(trained, [])
    keep_attribute_scaling(trained, unchanged, [], refit)  # the same classes: nothing to keep
    assert unchanged.side_info.standardize_on == "train_classes"
    own = [*fewer, f"side_info.standardize_on=[{seen[0]},{seen[1]}]"]
    tested = apply_overrides(trained, own)
    keep_attribute_scaling(trained, tested, own, refit)
    assert list(tested.side_info.standardize_on) == seen[:2]
    sessions_36_to_39 = apply_overrides(trained, ["side_info.standardize_on=${dataset.split.seen}"])
    tested = apply_overrides(sessions_36_to_39, fewer)
    assert list(tested.side_info.standardize_on) == seen[:2]  # the interpolation follows the split
    keep_attribute_scaling(sessions_36_to_39, tested, fewer, refit)
    assert list(tested.side_info.standardize_on) == seen
    older = apply_overrides(trained, ["side_info.standardize_on=null"])
    added = ["+side_info.table={Piccolo: {range_low: 74}}"]
    tested = apply_overrides(older, added)
    keep_attribute_scaling(older, tested, added, refit)
    assert list(tested.side_info.standardize_on) == list(older.side_info.table)


def test_cli_evaluates_an_older_checkpoint_into_a_new_directory_named_after_the_overrides_each_time(
        tmp_path, monkeypatch):
    from fewzero.eval import EVAL_DIR_VARIABLE

    cfg = compose_train_cfg(tmp_path, ["trainer.max_steps=2", "test=false"])
    train(cfg)  # saves the run's .hydra/config.yaml
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    del saved["fewzero_run"]  # written before checkpoints recorded their config
    torch.save(saved, ckpt)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(EVAL_DIR_VARIABLE, raising=False)
    for _ in range(2):  # e.g. from a notebook: the second must not reuse the first's directory
        main([f"ckpt_path={ckpt}", "model.whitening=null"])
        assert EVAL_DIR_VARIABLE not in os.environ
    runs = sorted((tmp_path / "outputs" / "eval" / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.endswith("_model.whitening=null") for r in runs)
    assert all((r / "metrics.json").is_file() for r in runs)


def test_a_refused_eval_leaves_no_directory_of_its_own_behind(tmp_path, monkeypatch):
    """Refused after it made its directory (a refusal of train's checks, or as the test starts):
    the directory it made, holding only its config and TensorBoard's first events, would stand
    as an unfinished run in outputs/ and fewzero.report. A directory it did not make stays."""
    from fewzero.eval import EVAL_DIR_VARIABLE

    cfg = compose_train_cfg(tmp_path, ["trainer.max_steps=2", "test=false"])
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(EVAL_DIR_VARIABLE, raising=False)
    with pytest.raises(SystemExit, match=r"^fewzero.eval: model.backbone._target_=nope.Nope cannot "
                                         "be imported"):
        main([f"ckpt_path={ckpt}", "model.backbone._target_=nope.Nope"])
    assert list((tmp_path / "outputs" / "eval" / "runs").iterdir()) == []
    out = tmp_path / "eval"
    with pytest.raises(SystemExit, match=r"^fewzero.eval: n_way=50 is larger than the 5 test classes"):
        main([f"ckpt_path={ckpt}", f"hydra.run.dir={out}",
              "dataset.episodes.test=[{n_way: 50, n_shot: 1, n_query: 1, n_episodes: 1}]"])
    assert not out.exists()
    mine = tmp_path / "mine"  # the user's own directory, given as hydra.run.dir
    mine.mkdir()
    with pytest.raises(SystemExit, match="cannot be imported"):
        main([f"ckpt_path={ckpt}", f"hydra.run.dir={mine}", "model.backbone._target_=nope.Nope"])
    assert (mine / ".hydra" / "config.yaml").is_file()


def test_an_eval_stopped_by_sigterm_exits_143_and_leaves_no_directory_of_its_own(tmp_path, monkeypatch,
                                                                                   capsys):
    """Lightning stops the test after a batch with a SIGTERMException, a SystemExit without a
    code: fewzero.eval exited 0, as if it had finished, and left a directory without results."""
    import signal

    from fewzero.eval import EVAL_DIR_VARIABLE
    from fewzero.models.fewshot_module import FewShotModule

    cfg = compose_train_cfg(tmp_path, ["trainer.max_steps=2", "test=false"])
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    test_step = FewShotModule.test_step

    def stopped(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler takes it, stops after the batch
        return test_step(self, *args, **kwargs)

    monkeypatch.setattr(FewShotModule, "test_step", stopped)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(EVAL_DIR_VARIABLE, raising=False)
    with pytest.raises(SystemExit) as stop:
        main([f"ckpt_path={ckpt}", "dataset.eval_batch_size=4"])  # Lightning stops before a last batch
    assert stop.value.code == 128 + signal.SIGTERM
    assert "fewzero.eval: stopped by SIGTERM before the test finished" in capsys.readouterr().err
    assert list((tmp_path / "outputs" / "eval" / "runs").iterdir()) == []


@pytest.mark.parametrize(("override", "refused"), [
    ("dataset.features.hop_length=160", r"dataset\.features\.hop_length=160 \(the checkpoint's run: 200\)"),
    ("dataset.features.n_mels=64", r"dataset\.features\.n_mels=64 \(the checkpoint's run: 32\)"),
    ("dataset.features.sample_rate=22050", r"sample_rate=22050 \(the checkpoint's run: 16000\)"),
    ("dataset.features.clip_seconds=1.5", None),  # how much is cached, not what the model hears
    ("dataset.eval_offset_seconds=0.5", None),
])
def test_eval_refuses_log_mel_settings_other_than_the_runs_before_building_anything(
        tmp_path, monkeypatch, override, refused):
    """Another hop length scored the checkpoint silently on spectrograms it never saw; another
    n_mels failed in load_state_dict after caching new features."""
    cfg = compose_train_cfg(tmp_path, ["test=false"])
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "x.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")  # never read: the run's config is beside it
    (ckpt.parent.parent / ".hydra").mkdir()
    OmegaConf.save(cfg, ckpt.parent.parent / ".hydra" / "config.yaml")
    monkeypatch.setattr(eval_module, "train", lambda cfg, **_: ({}, {"cfg": cfg}))
    if refused is None:
        _, objects = evaluate(ckpt, [override], tmp_path / "eval")
        assert objects["cfg"].dataset.features.n_mels == cfg.dataset.features.n_mels
    else:
        with pytest.raises(ValueError, match=refused + r": the checkpoint learned log-mel features of "
                                                       r"the run's settings.*only clip_seconds may change"):
            evaluate(ckpt, [override], tmp_path / "eval")


def test_an_eval_or_resume_reading_other_data_folders_than_the_run_says_so_once(
        tmp_path, monkeypatch, caplog):
    """Before, a run trained with FEWZERO_DATA=<folder> and tested or resumed in a shell without
    it read (and for rendered SOL rendered anew) its data under ./data without a word: its saved
    config leaves paths.data_dir unresolved. Its checkpoints now record the folders it read."""
    import logging

    monkeypatch.delenv("FEWZERO_ROOT", raising=False)
    monkeypatch.setenv("FEWZERO_DATA", str(tmp_path / "dataA"))
    cfg = compose_train_cfg(tmp_path, ["trainer.max_steps=2", "test=false"])
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    said = "read its data from other folders than this command reads"
    with caplog.at_level(logging.WARNING, logger="fewzero.train"):
        evaluate(ckpt, [], tmp_path / "eval_same")  # the run's folder: nothing to say
        assert said not in caplog.text
        monkeypatch.delenv("FEWZERO_DATA")
        evaluate(ckpt, [], tmp_path / "eval_unset")
    assert caplog.text.count(said) == 1
    assert (f"paths.data_dir: {tmp_path / 'dataA'} in the run, {tmp_path / 'data'} now" in caplog.text
            and f"set FEWZERO_DATA={tmp_path / 'dataA'}, or add paths.data_dir={tmp_path / 'dataA'} "
                f"paths.cache_dir={tmp_path / 'dataA' / 'cache'}." in caplog.text)
    caplog.clear()
    monkeypatch.setenv("FEWZERO_DATA", str(tmp_path / "dataB"))  # a resume in another shell
    with caplog.at_level(logging.WARNING, logger="fewzero.train"):
        train(compose_train_cfg(tmp_path, ["trainer.max_steps=2", "test=false", "ckpt_path=last"]))
    assert caplog.text.count(said) == 1 and f"{tmp_path / 'dataB'} now" in caplog.text
    caplog.clear()
    saved = torch.load(ckpt, weights_only=False)
    del saved["fewzero_run"]["data_folders"]  # written before checkpoints recorded them
    torch.save(saved, ckpt)
    with caplog.at_level(logging.WARNING, logger="fewzero.train"):
        metrics, _ = evaluate(ckpt, [], tmp_path / "eval_old")
    assert said not in caplog.text and 0.0 <= metrics["test/5way_5shot_acc"] <= 1.0
