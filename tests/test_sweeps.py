"""Experiment workflow: Optuna sweeps, the joblib launcher and SLURM through submitit."""

import json
import sys
from pathlib import Path

import cli_processes
import pytest
from conftest import CONFIG_DIR, SMALL_FEATURES
from hydra import compose, initialize_config_dir
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf

from fewzero.data.clips import TINYSOL_INSTRUMENTS
from fewzero.sweeps import optuna_seed, optuna_storage
from fewzero.train import optimized_metric


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_sweeps_may_only_optimise_a_validation_metric():
    assert optimized_metric(_compose([])) == "val/acc_best"
    assert optimized_metric(_compose(["experiment=zsl_word_audio"])) == "val/acc_best"
    with pytest.raises(ValueError, match="only optimise a validation metric"):
        optimized_metric(_compose(["optimized_metric=test/5way_5shot_acc"]))


@pytest.mark.parametrize(("search", "study_name"), [
    (["hparams_search=optuna"], "fsl_protonet"),
    *((["hparams_search=optuna_zsl", f"experiment=zsl_{e}_audio"], "zsl")
      for e in ("word", "image", "text", "attribute")),
])
def test_optuna_search_is_a_seeded_tpe_maximising_validation_with_a_study_under_outputs(
        tmp_path, search, study_name):
    cfg = _compose([*search, f"paths.root_dir={tmp_path}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
    assert sweeper.direction == "maximize" and cfg.optimized_metric.startswith("val/")
    assert cfg.test is False  # no trial's test figure to read while choosing
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    study = (tmp_path / "outputs" / "optuna" / f"{study_name}.db").resolve()
    assert sweeper.storage == f"sqlite:///{study}"  # fixed path: the next invocation resumes
    assert sweeper.sampler.seed == 1234  # + stored trials: none yet
    assert optuna_seed(1234, sweeper.storage, "other") == 1234
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, f"search parameter {key} is not in the config"


def test_a_resumed_study_moves_the_sampler_seed_on_by_its_own_stored_trials(tmp_path):
    import optuna

    storage = optuna_storage(str(tmp_path / "new" / "studies.db"), "val/acc_best")
    assert (tmp_path / "new").is_dir()  # sqlite does not create the folder
    for name, n_trials in (("other", 3), ("fsl", 2)):
        optuna.create_study(study_name=name, storage=storage).optimize(
            lambda trial: trial.suggest_float("x", 0, 1), n_trials=n_trials)
    assert optuna_seed(1234, storage, "fsl") == 1236
    assert optuna_seed(1234, storage, "absent") == 1234


def test_a_search_on_a_test_metric_is_refused_as_the_sweep_starts(tmp_path):
    cfg = _compose(["hparams_search=optuna", f"paths.root_dir={tmp_path}",
                    "optimized_metric=test/5way_5shot_acc"])
    with pytest.raises(SystemExit, match="^fewzero: optimized_metric=test/5way_5shot_acc: sweeps may "
                                         "only optimise a validation metric"):
        OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)  # as the sweeper starts
    assert not (tmp_path / "outputs" / "optuna").exists()  # no study written


def test_launcher_plugins_are_installed_and_the_slurm_config_follows_the_trainer():
    launchers = {p.__name__ for p in Plugins.instance().discover(Launcher)}
    assert {"JoblibLauncher", "SlurmLauncher", "LocalLauncher"} <= launchers
    assert "OptunaSweeper" in {p.__name__ for p in Plugins.instance().discover(Sweeper)}
    cfg = _compose(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 4 and launcher.tasks_per_node == 4
    assert launcher.timeout_min > 0 and launcher.cpus_per_task > 0 and launcher.mem_gb > 0
    assert launcher.submitit_folder.startswith(cfg.hydra.sweep.dir)
    joblib = _compose(["hydra/launcher=joblib"]).hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher")


def _tiny(tmp_path: Path) -> list[str]:
    names = ",".join(TINYSOL_INSTRUMENTS)
    return ["dataset/source=tones", f"dataset.source.instruments=[{names}]", "debug=fast",
            f"paths.root_dir={tmp_path}", "dataset.episodes.val.n_query=5", "test=false",
            "~callbacks.progress_bar", "+trainer.enable_progress_bar=false", *SMALL_FEATURES]


@pytest.mark.slow
def test_optuna_sweep_on_two_joblib_workers_stores_its_study_and_a_second_run_resumes_it(tmp_path):
    import optuna

    sweep = tmp_path / "sweep"
    first = [sys.executable, "-m", "fewzero.train", "hparams_search=optuna", *_tiny(tmp_path),
             "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "hydra/launcher=joblib",
             "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"]
    done = cli_processes.run(first, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    storage = f"sqlite:///{tmp_path / 'outputs' / 'optuna' / 'fsl_protonet.db'}"
    trials = optuna.load_study(study_name="fsl_protonet", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    # the objective is each trial's best validation accuracy (no test ran at all)
    reports = [json.loads(p.read_text())["metrics"] for p in sweep.glob("*/metrics.json")]
    assert sorted(t.value for t in trials) == sorted(r["val/acc_best"] for r in reports)
    assert not any(k.startswith("test/") for r in reports for k in r)
    printed = done.stdout + done.stderr
    assert "All 2 jobs finished" in printed  # SweepSummary
    assert "setup plugin alembic" not in printed  # Optuna's database layer kept quiet

    second = [a for a in first if not a.startswith(("hydra.sweeper.n_", "hydra/launcher", "hydra.launcher",
                                                    "hydra.sweep.dir"))]
    done = cli_processes.run(second + ["hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'more'}"],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = optuna.load_study(study_name="fsl_protonet", storage=storage).trials
    assert len(trials) == 3 and trials[2].state.name == "COMPLETE"
    # a resumed study is not a replay: the sampler's seed moved on by the stored trials
    assert trials[2].params not in (trials[0].params, trials[1].params)
