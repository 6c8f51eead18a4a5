"""End-to-end: the real configs, composed and run on synthetic tones."""

import io
import json
import sys
from pathlib import Path

import hydra
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import CONFIG_DIR, compose_train_cfg, load_script, skip_without_side_info_files, tone_overrides
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fewzero import plots
from fewzero.data.datamodule import EpisodeSettings, FewShotDataModule
from fewzero.evaluation import evaluate_episodes
from fewzero.train import (
    check_optimisation_settings,
    check_trainer_settings,
    compose_train_config,
    keep_freed_memory,
    train,
    warn_of_a_learning_rate_of_zero,
)

# Audio experiments; the xlsa17_* ones run on precomputed features (tests/test_xlsa17.py).
EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml")
                     if not p.stem.startswith("xlsa17"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_runs_a_fast_dev_run_step(tmp_path, experiment):
    cfg = compose_train_cfg(tmp_path, [f"experiment={experiment}", "dataset/source=tones",
                                       "+trainer.fast_dev_run=true"])
    skip_without_side_info_files(cfg)
    given = OmegaConf.to_container(cfg)
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    # unchanged, for a notebook that passes it again (a zero-shot run resolved its
    # side_info.cache_dir in place, and ckpt_path=auto then tested a finished run again)
    assert OmegaConf.to_container(cfg) == given
    key = "test/zsl_top1" if experiment.startswith("zsl") else "test/5way_5shot_acc"
    assert 0.0 <= metrics[key] <= 1.0


def test_a_run_on_rendered_data_records_and_prints_which_render_it_used(tmp_path, monkeypatch, capsys):
    """metrics.json's `data` is the source's provenance (RenderedSOL: folder, fingerprint,
    FluidSynth version), which fewzero.report compares across runs; the summary prints it."""
    from fewzero.data.tones import SyntheticTones

    render = {"dir": str(tmp_path / "render"), "fingerprint": "f00d",
              "fluidsynth": {"libfluidsynth": "2.3.1", "pyfluidsynth": "1.3.4"}}
    monkeypatch.setattr(SyntheticTones, "provenance", lambda self: render, raising=False)
    cfg = compose_train_cfg(tmp_path, ["+trainer.fast_dev_run=true"])
    train(cfg)
    assert json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["data"] == render
    assert f"data          : {tmp_path / 'render'} (FluidSynth 2.3.1)" in capsys.readouterr().out

    monkeypatch.delattr(SyntheticTones, "provenance")  # a source without renders: no `data`
    cfg = compose_train_cfg(tmp_path / "plain", ["+trainer.fast_dev_run=true"])
    train(cfg)
    assert "data" not in json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def test_a_fast_dev_run_says_its_figures_are_no_results(tmp_path, capsys):
    # was: one batch of test clips scored, printed and saved as the run's results
    cfg = compose_train_cfg(tmp_path, ["+trainer.fast_dev_run=true"])
    train(cfg)
    report = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert "validation and test scored only the clips of their first batch" in report["fast_dev_run"]
    assert "trainer.fast_dev_run: one batch per stage" in capsys.readouterr().out


def test_a_callback_set_to_null_is_switched_off(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["+trainer.fast_dev_run=true", "callbacks.last_checkpoint=null"])
    _, objects = train(cfg)
    trainer = objects["trainer"]
    assert not any(type(c).__name__ == "LastCheckpoint" for c in trainer.callbacks)
    assert trainer.global_step == 1


@pytest.mark.parametrize("backbone", ["timbre_cnn", "music_fsl_cnn"])
def test_training_writes_metrics_plots_checkpoints_and_hparams(tmp_path, backbone):
    # the tutorial's backbone needs 64 mel bins and 64 frames (0.8 s) at least
    least = ["dataset.features.n_mels=64", "dataset.excerpt_seconds=0.8"] * (backbone == "music_fsl_cnn")
    cfg = compose_train_cfg(tmp_path, [f"model/backbone={backbone}", *least, "model.figures=true"])
    metrics, objects = train(cfg)
    run = Path(cfg.paths.output_dir)
    report = json.loads((run / "metrics.json").read_text())
    for name in ("5way_1shot", "5way_5shot"):
        result = report["test_episodes"][name]
        assert result["n_episodes"] == 6 and 0.0 <= result["mean_acc"] <= 1.0
        assert result["ci95"] >= 0.0
        assert report["metrics"][f"test/{name}_acc"] == pytest.approx(result["mean_acc"])
    assert "val/acc_best" in metrics
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert Path(report["checkpoint"]).is_file()
    pngs = {p.name for p in (run / "plots").glob("*.png")}
    assert {"test_embeddings_5way_5shot.png", "test_confusion_5way_1shot.png"} <= pngs
    assert (run / "tensorboard" / "projector_config.pbtxt").is_file()  # PROJECTOR tab
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and any(b"hparams" in e.read_bytes() for e in events)
    assert report["tags"] == list(cfg.tags) and "fsl" in report["tags"]
    # the fit's training metrics too; only numbers (the tested checkpoint's path is its own key)
    assert {"train/loss", "train/acc"} <= set(report["metrics"])
    assert all(isinstance(v, int | float) for v in report["metrics"].values())
    assert any(b"tags" in e.read_bytes() for e in events)
    scalars = EventAccumulator(str(run / "tensorboard"))
    scalars.Reload()
    validated = [e.step for e in scalars.Scalars("val/acc")]
    assert validated == sorted(validated) and 0 not in validated  # no final value at step 0
    # each figure is in TensorBoard as the very picture written to plots/
    confusion = scalars.Images("test/confusion_5way_1shot")[-1]
    png = (run / "plots" / "test_confusion_5way_1shot.png").read_bytes()
    assert confusion.encoded_image_string == png
    with PIL.Image.open(io.BytesIO(png)) as image:
        assert (confusion.width, confusion.height) == image.size and image.mode == "RGBA"
    assert "seed: " in (run / "tensorboard" / "hparams.yaml").read_text()  # not {}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_debug_fast_shortens_every_experiment_in_its_datasets_own_terms(tmp_path, experiment):
    cfg = compose_train_config([f"experiment={experiment}", "debug=fast", f"paths.root_dir={tmp_path}"],
                               tmp_path / "run")
    dm = hydra.utils.instantiate(cfg.dataset)  # a zero-shot one refused debug=fast's episodes before
    assert cfg.trainer.max_steps == 6
    # logged every step: Lightning warned that 3-batch epochs were shorter than the interval
    assert cfg.trainer.log_every_n_steps == 1
    if experiment.startswith("zsl"):
        assert dm.steps_per_epoch == 3
    else:
        assert cfg.dataset.episodes.train.n_episodes == 3 and cfg.dataset.episodes.val.n_episodes == 5


def test_only_the_first_ddp_process_logs_info_lines(tmp_path, monkeypatch, caplog):
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    cfg = compose_train_cfg(tmp_path, ["dataset.split.val=[Oboe,Viola]"])  # stops after the log
    caplog.set_level("INFO")
    for rank in (0, 1):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        caplog.clear()
        with pytest.raises(Exception, match="both the val and test splits"):
            train(cfg)
        assert ("Building datamodule" in caplog.text) == (rank == 0)


def test_missing_checkpoint_says_how_to_resume(tmp_path):
    cfg = compose_train_cfg(tmp_path, [f"ckpt_path={tmp_path / 'nope.ckpt'}"])
    with pytest.raises(FileNotFoundError, match="hydra.run.dir"):
        train(cfg)


def test_a_run_that_ends_before_its_first_validation_says_why_no_checkpoint_was_chosen(tmp_path, caplog):
    """trainer.max_steps shorter than one epoch: no validation ran, so the test uses the last
    weights. The warning as the fit starts names the epoch length and max_steps (the fix); the
    test's own warning refers to it rather than giving the account a second time."""
    cfg = compose_train_cfg(tmp_path, ["trainer.max_steps=1", "dataset.episodes.train.n_episodes=3"])
    caplog.set_level("WARNING")
    metrics, _ = train(cfg)
    assert "val/acc_best" not in metrics and metrics["test/checkpoint"] == ""
    # as the fit started, before the time was spent
    assert ("trainer.max_steps=1 ends 1 step(s) into an epoch of 3, and validation follows each "
            "epoch: no step is ever validated, and the test takes the last weights" in caplog.text)
    said = [r.getMessage() for r in caplog.records if "valid" in r.getMessage()]
    assert len(said) == 2 and sum("dataset.episodes.train.n_episodes" in m for m in said) == 1
    assert said[1] == ("No best checkpoint found: no step was validated (see the warning on "
                       "trainer.max_steps as the fit started). Testing the current weights.")


def test_a_run_whose_start_could_not_tell_it_ends_unvalidated_says_why_at_its_test(tmp_path, caplog):
    """With trainer.max_epochs set the fit's start does not warn: the test's warning then gives
    the whole account, with the fix."""
    cfg = compose_train_cfg(tmp_path, ["trainer.max_steps=1", "trainer.max_epochs=1",
                                       "dataset.episodes.train.n_episodes=3"])
    caplog.set_level("WARNING")
    metrics, _ = train(cfg)
    assert metrics["test/checkpoint"] == ""
    said = [r.getMessage() for r in caplog.records if "valid" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("No best checkpoint found: no validation ran")
    assert "trainer.max_steps=1" in said[0] and "dataset.episodes.train.n_episodes" in said[0]


def test_a_run_whose_last_steps_fall_between_validations_says_so_as_it_starts(tmp_path, caplog):
    """Epochs of 4 steps, each followed by validation: 5 or 7 steps leave the end unvalidated."""
    caplog.set_level("WARNING")
    said = {5: "step 5 is never validated", 7: "steps 5-7 are never validated", 8: None}
    for max_steps, expected in said.items():
        caplog.clear()
        train(compose_train_cfg(tmp_path / str(max_steps), [
            f"trainer.max_steps={max_steps}", "dataset.episodes.train.n_episodes=4", "test=false"]))
        warned = [r.getMessage() for r in caplog.records if "never validated" in r.getMessage()]
        if expected is None:  # two whole epochs: the last step is validated
            assert warned == []
        else:
            assert len(warned) == 1 and f"{expected}, and the test takes the best validated step" in warned[0]
            assert "make trainer.max_steps a multiple of 4" in warned[0]


def test_training_episodes_never_contain_validation_or_test_classes(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["dataset.episodes.train.n_episodes=40"])
    dm = hydra.utils.instantiate(cfg.dataset)
    dm.prepare_data()
    dm.setup("fit")
    train_ids = set(dm.class_ids["train"])
    loader = dm.train_dataloader()
    for episode in loader:
        assert set(episode["classes"].tolist()) <= train_ids
    sampler = loader.dataset.sampler  # the clips drawn, not only the classes they are said to be
    for i in range(len(loader.dataset)):
        ep = sampler.episode(loader.dataset.first_episode + i)
        clips = torch.cat([ep.support, ep.query], dim=1)
        assert torch.equal(dm.train_labels[clips], sampler.class_ids[ep.classes][:, None].expand_as(clips))
    for stage in ("val", "test"):
        labels = {int(b["label"]) for b in dm._excerpts(stage).dataset}
        assert labels == set(dm.class_ids[stage])
    assert not set(dm.class_ids["val"]) & set(dm.class_ids["test"])


# a split of one's own: classes moved between the shipped split's stages (Oboe trains, Bassoon
# validates, Cello tests), one test class fewer, and Accordion in no list
OWN_SPLIT = ["dataset.split.train=[Oboe,Clarinet in Bb,Contrabass,Flute,French Horn]",
             "dataset.split.val=[Trombone,Violin,Bassoon]",
             "dataset.split.test=[Cello,Viola,Trumpet in C,Bass Tuba]",
             "dataset.episodes.test=[{n_way: 4, n_shot: 1, n_query: 5, n_episodes: 6},"
             "{n_way: 3, n_shot: 5, n_query: 5, n_episodes: 6}]"]


def test_with_a_split_of_ones_own_no_test_or_unlisted_clip_trains_validates_or_fits_the_whitening(
        tmp_path):
    """Training episodes, validation clips, the whitening's reference clips and the episodes that
    choose the test whitening (validation, at each test shot count) hold clips of their own
    stage's classes only: never a test clip, nor one of a class in no list."""
    cfg = compose_train_cfg(tmp_path, ["dataset.episodes.train.n_episodes=30", *OWN_SPLIT])
    dm = hydra.utils.instantiate(cfg.dataset)
    dm.prepare_data()
    dm.setup("fit")
    names = {stage: {dm.class_names[i] for i in ids} for stage, ids in dm.class_ids.items()}
    assert names["test"] == {"Cello", "Viola", "Trumpet in C", "Bass Tuba"}
    held_out = set(dm.class_ids["test"]) | {dm.class_names.index("Accordion")}
    loader = dm.train_dataloader()
    for i in range(len(loader.dataset)):
        ep = loader.dataset.sampler.episode(loader.dataset.first_episode + i)
        clips = torch.cat([ep.support, ep.query], dim=1).flatten()
        assert set(dm.train_labels[clips].tolist()) <= set(dm.class_ids["train"])
    for stage, loader in (("train", dm.reference_dataloader()), ("val", dm.val_dataloader())):
        labels = {int(label) for batch in loader for label in batch["label"]}
        assert labels == set(dm.class_ids[stage]) and not labels & held_out
    for settings in dm.test_settings:  # as FewShotModule._select_whitening draws them
        probe = EpisodeSettings(min(settings.n_way, len(dm.split["val"])), settings.n_shot,
                                dm.val_settings.n_query, 20)
        sampler = dm.sampler("val", probe, dm.eval_seed)
        for i in range(probe.n_episodes):
            ep = sampler.episode(i)
            clips = torch.cat([ep.support, ep.query], dim=1).flatten()
            assert set(dm.labels[clips].tolist()) <= set(dm.class_ids["val"])


def test_instruments_in_no_list_of_a_few_shot_split_are_named_in_the_log(tmp_path, caplog):
    cfg = compose_train_cfg(tmp_path, OWN_SPLIT)
    dm = hydra.utils.instantiate(cfg.dataset)
    dm.prepare_data()
    with caplog.at_level("INFO", logger="fewzero.data.datamodule"):
        dm.setup("fit")
    assert ("tones instrument(s) ['Accordion', 'Alto Saxophone'] are in none of dataset.split.train, "
            "val and test: none of their clips is used.") in caplog.text


def test_side_info_that_nothing_reads_is_refused(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["side_info=attributes"])  # a few-shot run
    with pytest.raises(ValueError, match="nothing in this run reads it: .*FewShotModule learns from audio"):
        train(cfg)


def test_unknown_instrument_name_is_a_clear_error(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["dataset.split.test=[Bassoon,Kazoo]"])
    dm = hydra.utils.instantiate(cfg.dataset)
    for step in (dm.prepare_data, lambda: dm.setup("fit")):  # before any clip is decoded
        with pytest.raises(ValueError, match=r"Unknown tones instrument name\(s\) \['Kazoo'\]"):
            step()


def test_overlapping_splits_are_rejected(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["dataset.split.val=[Oboe,Viola]"])
    with pytest.raises(Exception, match="both the val and test splits"):
        hydra.utils.instantiate(cfg.dataset)


def test_n_way_larger_than_the_split_names_the_fix(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["dataset.episodes.val.n_way=4"])
    dm = hydra.utils.instantiate(cfg.dataset)
    dm.prepare_data()
    with pytest.raises(ValueError, match="n_way=4 is larger than the 3 val classes"):
        dm.setup("fit")


def test_two_test_settings_of_one_name_are_refused_naming_both(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["dataset.episodes.test=[{n_way: 5, n_shot: 5, n_query: 15, "
                                       "n_episodes: 5}, {n_way: 5, n_shot: 5, n_query: 5, n_episodes: 50}]"])
    with pytest.raises(Exception, match=r"5way_5shot: \{n_query: 15, n_episodes: 5\}, "
                                         r"\{n_query: 5, n_episodes: 50\}.*fewzero.eval"):
        hydra.utils.instantiate(cfg.dataset)


@pytest.mark.parametrize(("override", "refused"), [
    # one class to choose from: every query right, accuracy 1.0 whatever the model (was reported)
    ("dataset.episodes.test=[{n_way: 1, n_shot: 1, n_query: 5, n_episodes: 6}]",
     r"dataset.episodes.test\[0\] has n_way=1: .*accuracy 1.0 whatever the model"),
    ("dataset.episodes.val.n_way=1", r"dataset.episodes.val has n_way=1"),  # chose no checkpoint
    ("dataset.episodes.val.n_episodes=0", r"dataset.episodes.val has n_episodes=0"),  # val/acc nan
    ("dataset.episodes.train.n_episodes=0", r"dataset.episodes.train has n_episodes=0"),  # no step
    ("dataset.episodes.test=[{n_way: 5, n_shot: 1, n_query: 5, n_episodes: 6},"
     "{n_way: 3, n_shot: 1, n_query: 5, n_episodes: 0}]",
     r"dataset.episodes.test\[1\] has n_episodes=0"),  # reported nan
    ("dataset.episodes.test=[{n_way: 4.5, n_shot: 1, n_query: 5, n_episodes: 6}]",
     r"dataset.episodes.test\[0\].n_way must be a whole number; got 4.5"),  # was tested 4-way
    ("dataset.episodes.test=[{n_way: 5, n_shot: 1, n_querry: 5, n_episodes: 6}]",
     r"test\[0\] lacks \['n_query'\] and has \['n_querry'\], which nothing reads"),
    ("dataset.episodes.test=[]", r"dataset.episodes.test is empty"),  # failed after training
])
def test_an_episode_setting_that_measures_nothing_or_is_misspelt_is_refused_naming_its_key(
        tmp_path, override, refused):
    cfg = compose_train_cfg(tmp_path, [override])
    with pytest.raises(Exception, match=refused):  # before any audio is read
        hydra.utils.instantiate(cfg.dataset)


def test_a_test_setting_given_alone_instead_of_in_a_list_names_the_list_form(tmp_path):
    cfg = compose_train_cfg(tmp_path)
    with open_dict(cfg):  # a config file or ~key +key= can give a mapping where a list belongs
        cfg.dataset.episodes.test = {"n_way": 5, "n_shot": 1, "n_query": 5, "n_episodes": 6}
    with pytest.raises(Exception, match=r"dataset.episodes.test must be a list of episode settings"
                                        r".*'dataset.episodes.test=\[\{n_way"):
        hydra.utils.instantiate(cfg.dataset)


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp"])
def test_trainer_configs_compose(trainer):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"trainer={trainer}"])
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    assert cfg.trainer.accelerator == {"cpu": "cpu", "gpu": "gpu", "ddp": "auto"}[trainer]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_runs_on_gpu(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["trainer=gpu"])
    with open_dict(cfg):
        cfg.trainer.accelerator = "gpu"
    metrics, objects = train(cfg)
    assert objects["trainer"].strategy.root_device.type == "cuda"
    assert all(p.is_cuda for p in objects["model"].parameters())
    assert "val/acc_best" in metrics and 0.0 <= metrics["test/5way_5shot_acc"] <= 1.0


def test_deterministic_runs_with_the_same_seed_give_identical_results(tmp_path):
    results = []
    for name in ("a", "b"):
        cfg = compose_train_cfg(tmp_path / name, ["trainer.deterministic=true", "seed=3"])
        metrics, objects = train(cfg)
        weights = next(objects["model"].net.backbone.parameters()).detach().clone()
        results.append((metrics["test/5way_5shot_acc"], metrics["val/acc_best"], weights))
    assert results[0][0] == results[1][0] and results[0][1] == results[1][1]
    assert torch.equal(results[0][2], results[1][2])


def test_a_data_folder_given_with_a_tilde_is_the_home_folder_for_every_source_and_cache(
        tmp_path, monkeypatch):
    """FEWZERO_DATA="~/lab data" (quoted, so no shell expands it): rendered SOL (which expanded
    "~" itself) went to the home folder, and tones and every feature cache to a folder named "~"
    under the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FEWZERO_DATA", "~/lab data")
    for source in ("tones", "sol"):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[f"dataset/source={source}"])
        assert cfg.dataset.cache_dir == str(tmp_path / "lab data" / "cache")
        assert cfg.dataset.source.root.startswith(str(tmp_path / "lab data") + "/")


def test_a_cache_folder_given_with_a_tilde_is_under_the_home_folder(tmp_path, monkeypatch):
    """'paths.cache_dir="~/cache"' (Hydra takes no unquoted "~"): the feature cache went to a
    folder named "~" under the working directory, as did tones' dataset.source.root (rendered
    SOL's and TinySOL's folders expanded "~")."""
    from fewzero.side_info.base import SideInformation

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = compose_train_cfg(tmp_path, ["paths.cache_dir='~/my cache'", "dataset.source.root='~/tones'"])
    datamodule = hydra.utils.instantiate(cfg.dataset)
    assert datamodule.cache_dir == tmp_path / "my cache"
    assert datamodule.source.root == tmp_path / "tones"
    assert SideInformation(dim=4, cache_dir="~/my cache").cache_dir == tmp_path / "my cache"
    zero_shot = compose_train_cfg(tmp_path, ["experiment=zsl_word_audio", "paths.cache_dir='~/my cache'"])
    assert hydra.utils.instantiate(zero_shot.dataset).cache_dir == tmp_path / "my cache"


def test_a_data_folder_variable_set_empty_counts_as_unset(monkeypatch):
    """FEWZERO_DATA= (`export FEWZERO_DATA=$DATA` with DATA unset) put the data at the
    file-system root: /cache, /tones, /rendered_sol."""
    monkeypatch.setenv("FEWZERO_DATA", "")
    monkeypatch.setenv("FEWZERO_ROOT", "")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["dataset/source=tones"])
    assert (cfg.paths.data_dir, cfg.dataset.cache_dir) == ("./data", "./data/cache")


def test_every_data_and_log_location_is_left_out_of_run_names_and_report_groups():
    """paths.cache_dir (what a read-only shared data folder asks for) named the run directory and
    made fewzero.report count runs of one setting as two configurations; like paths.data_dir, it
    says where the data are, not what the run is."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert {f"paths.{key}" for key in cfg.paths if key != "output_dir"} <= excluded


def test_run_suffix_is_path_safe_and_short():
    from fewzero.train import MAX_RUN_SUFFIX, run_suffix

    assert run_suffix("") == ""
    assert run_suffix("model/backbone=music_fsl_cnn,seed=1") == "_model.backbone=music_fsl_cnn,seed=1"
    long = run_suffix("x=" + "a" * 300)
    assert len(long) == MAX_RUN_SUFFIX + 1 and "/" not in long
    assert run_suffix("x=" + "a" * 300) != run_suffix("x=" + "a" * 299 + "b")
    # the limit itself: a name of MAX_RUN_SUFFIX characters is kept, one more is shortened
    assert run_suffix("x" * MAX_RUN_SUFFIX) == "_" + "x" * MAX_RUN_SUFFIX
    assert "~" in run_suffix("x" * (MAX_RUN_SUFFIX + 1)) and len(run_suffix("x" * 200)) == MAX_RUN_SUFFIX + 1


def test_run_directory_names_the_experiment_among_the_overrides():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=zsl_word_audio", "debug=fast"],
                      return_hydra_config=True)
    # TensorBoard names a run by its directory: four zero-shot experiments were all "debug=fast"
    assert cfg.hydra.run.dir.endswith("_debug=fast,experiment=zsl_word_audio")


def test_frequency_scaled_training_classes_stay_in_training(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["dataset.episodes.train.n_episodes=20",
                                       "dataset.train_frequency_scales=[0.75,1.3333]"])
    dm = hydra.utils.instantiate(cfg.dataset)
    dm.prepare_data()
    dm.setup("fit")
    real = dm.class_ids["train"]
    assert len(dm.train_class_ids) == 3 * len(real)
    assert dm.train_class_names[len(real)] == f"{cfg.dataset.split.train[0]} x0.75"
    assert min(dm.train_class_ids[len(real):]) == len(dm.class_names)  # new ids, after the real
    assert len(set(dm.train_class_ids)) == len(dm.train_class_ids)  # one class per factor
    assert len(dm.train_features) == len(dm.table.features) + 2 * len(dm.stage_indices("train"))
    drawn = {int(c) for episode in dm.train_dataloader() for c in episode["classes"]}
    assert drawn <= set(dm.train_class_ids) and drawn - set(real)
    for stage in ("val", "test"):  # evaluation sees the real clips of its own classes only
        labels = {int(b["label"]) for b in dm._excerpts(stage).dataset}
        assert labels == set(dm.class_ids[stage])


def test_few_shot_folds_option_keeps_every_other_fold_out_of_every_stage(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["dataset.folds=[0,1,2]", "dataset.train_frequency_scales=[0.75]"],
                            clips_per_class=20)
    dm = hydra.utils.instantiate(cfg.dataset)
    dm.prepare_data()
    dm.setup("fit")
    kept = torch.isin(dm.table.folds, torch.tensor([0, 1, 2]))
    assert not kept.all() and bool((dm.labels[~kept] == -1).all()) and bool((dm.labels[kept] >= 0).all())
    n_clips = len(dm.labels)
    for stage in ("train", "val", "test"):
        clips = dm.stage_indices(stage)
        assert len(clips) and set(dm.table.folds[clips].tolist()) == {0, 1, 2}
        members = dm.sampler(stage, dm.val_settings, 0).members
        real = members[(members >= 0) & (members < n_clips)]
        assert set(dm.table.folds[real].tolist()) == {0, 1, 2}
    assert len(dm.train_features) == n_clips + len(dm.stage_indices("train"))  # one scaled copy
    reference = torch.cat([b["index"] for b in dm.reference_dataloader()])
    assert set(dm.table.folds[reference].tolist()) == {0, 1, 2}


@pytest.mark.parametrize(("folds", "message"), [
    ("[0,7]", r"dataset.folds: 7 is no fold of tones; give one of its folds 0..4"),
    ("[-1]", r"dataset.folds: -1 is no fold of tones"),
    ("[]", r"dataset.folds=\[\] reads no clip")])
def test_few_shot_folds_must_exist_in_the_source_before_any_clip_is_made(tmp_path, folds, message):
    with pytest.raises(Exception, match=message):
        hydra.utils.instantiate(compose_train_cfg(tmp_path, [f"dataset.folds={folds}"]).dataset)
    assert not list(tmp_path.rglob("*.wav"))


@pytest.mark.parametrize("scale", ["1.0", "0.0", "nan", "inf"])
def test_frequency_scale_of_one_is_rejected(tmp_path, scale):
    cfg = compose_train_cfg(tmp_path, [f"dataset.train_frequency_scales=[{scale}]"])
    with pytest.raises(Exception, match="train_frequency_scales must be positive and not 1.0"):
        hydra.utils.instantiate(cfg.dataset)


def test_a_frequency_scale_listed_twice_is_refused(tmp_path):
    # was: accepted, and each training instrument became two classes of the same scaled clips
    # ("Cello x0.75" twice), so an episode could ask to tell a class from its own copy
    cfg = compose_train_cfg(tmp_path, ["dataset.train_frequency_scales=[0.75,1.5,0.75]"])
    with pytest.raises(Exception, match=r"dataset.train_frequency_scales lists \[0.75\] more than once: "
                                         r"list each factor once"):
        hydra.utils.instantiate(cfg.dataset)


@pytest.mark.parametrize("flush", [True, False])
def test_flush_denormal_option_decides_whether_denormal_floats_survive(tmp_path, flush):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormal floats")
    try:
        train(compose_train_cfg(tmp_path, [f"flush_denormal={flush}", "train=false", "test=false"]))
        denormal = torch.tensor([1e-39]) * 1.0  # below float32's smallest normal, 1.18e-38
        assert (denormal.item() == 0.0) == flush
    finally:
        torch.set_flush_denormal(False)


def test_class_cross_validation_folds_partition_the_non_test_instruments():
    splits = []
    for name in ("fsl_tutorial", "fsl_cv1", "fsl_cv2"):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            splits.append(compose("train", overrides=[f"dataset/split={name}"]).dataset.split)
    tests = {tuple(s.test) for s in splits}
    assert len(tests) == 1
    non_test = set(splits[0].train) | set(splits[0].val)
    assert len(non_test) == 9 and not non_test & set(splits[0].test)
    vals = [set(s.val) for s in splits]
    assert set().union(*vals) == non_test and sum(len(v) for v in vals) == 9  # disjoint, covering
    for split, val in zip(splits, vals, strict=True):
        assert set(split.train) == non_test - val


def test_whitening_is_fitted_on_training_instruments_only(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["dataset.episodes.train.n_episodes=2"])
    metrics, objects = train(cfg)
    dm, net = objects["datamodule"], objects["model"].net
    batches = list(dm.reference_dataloader())
    x, labels = torch.cat([b["x"] for b in batches]), torch.cat([b["label"] for b in batches])
    assert set(labels.tolist()) == set(dm.class_ids["train"])
    assert x.shape == (len(dm.stage_indices("train")), cfg.dataset.features.n_mels, dm.excerpt_frames)
    assert not torch.allclose(net.whitening.matrix, torch.eye(net.whitening.matrix.shape[0]))
    # refitting on the same clips with the tested weights reproduces the matrix used in testing
    fitted = net.whitening.matrix.clone()
    objects["model"].eval()
    with torch.no_grad():
        net.whitening.fit(net.backbone(x), labels)
    assert torch.allclose(net.whitening.matrix, fitted, atol=1e-5)


def test_test_whitening_is_chosen_per_shot_count_on_validation_episodes(tmp_path):
    shrinkages, weights = [0.0625, 1.0, 16.0], [0.0, 0.5]
    # seed=1: test episodes come from dataset.eval_seed (0), whatever the training seed
    cfg = compose_train_cfg(tmp_path, [f"model.test_shrinkages={shrinkages}",
                                       f"model.test_support_weights={weights}", "seed=1"])
    metrics, objects = train(cfg)
    dm, module = objects["datamodule"], objects["model"]
    net, distance = module.net, module.net.distance.cpu_copy()
    # restored after the test
    assert net.whitening.shrinkage == cfg.model.whitening.shrinkage
    assert net.whitening.support_weight == cfg.model.whitening.support_weight == 0.0
    module.eval()
    with torch.no_grad():  # what the test saw: the whitening refitted on the training clips
        reference = list(dm.reference_dataloader())
        net.whitening.fit(net.backbone(torch.cat([b["x"] for b in reference])),
                          torch.cat([b["label"] for b in reference]))
        embeddings = torch.zeros(len(dm.labels), net.whitening.matrix.shape[0])
        for batch in [*dm.val_dataloader(), *dm.test_dataloader()]:
            embeddings[batch["index"]] = net.backbone(batch["x"])
    for settings in dm.test_settings:
        probe = EpisodeSettings(min(settings.n_way, len(dm.split["val"])), settings.n_shot,
                                dm.val_settings.n_query, 20)

        def accuracy(stage, episodes, shrinkage, weight):
            net.whitening.shrinkage, net.whitening.support_weight = shrinkage, weight
            sampler = dm.sampler(stage, episodes, dm.eval_seed)
            return evaluate_episodes(embeddings, sampler, episodes.n_episodes, distance,
                                     len(dm.class_names), net.whitening).mean

        tried = weights[:1] if settings.n_shot == 1 else weights
        pairs = [(s, w) for w in tried for s in shrinkages]
        on_val = [accuracy("val", probe, s, w) for s, w in pairs]
        assert len(set(on_val)) > 1  # the candidates differ, so the choice means something
        chosen = (metrics[f"test/{settings.name}_whitening_shrinkage"],
                  metrics[f"test/{settings.name}_whitening_support_weight"])
        assert chosen == pairs[on_val.index(max(on_val))]
        assert metrics[f"test/{settings.name}_acc"] == pytest.approx(
            accuracy("test", settings, *chosen), abs=1e-6)


def test_evaluation_episodes_use_the_eval_seed_and_the_choice_probes_each_test_shot_count(tmp_path,
                                                                                        monkeypatch):
    calls = []
    original = FewShotDataModule.sampler
    monkeypatch.setattr(FewShotDataModule, "sampler", lambda self, stage, settings, seed:
                        calls.append((stage, settings, seed)) or original(self, stage, settings, seed))
    cfg = compose_train_cfg(tmp_path, ["seed=1", "dataset.eval_seed=0"])
    train(cfg)
    assert {seed for stage, _, seed in calls if stage == "train"} == {1}
    assert {seed for stage, _, seed in calls if stage != "train"} == {0}
    assert {stage for stage, _, _ in calls} == {"train", "val", "test"}
    # the whitening choice scores validation episodes with each test setting's shot count
    probes = {s.n_shot for stage, s, _ in calls
              if stage == "val" and s.n_episodes == cfg.model.selection_episodes}
    assert probes == {int(t.n_shot) for t in cfg.dataset.episodes.test} == {1, 5}


def test_test_settings_whose_whitening_choice_lacks_validation_clips_are_refused_before_training(
        tmp_path):
    """8 shots + 2 queries fit the 12 clips of each test class, but the whitening is chosen on
    validation episodes of 8 shots and validation's 5 queries: 13 clips, more than a validation
    class has. That choice runs at the test; it failed only after the whole training."""
    setting = "dataset.episodes.test=[{n_way: 3, n_shot: 8, n_query: 2, n_episodes: 4}]"
    cfg = compose_train_cfg(tmp_path, [setting])
    with pytest.raises(ValueError, match=r"The test whitening of 3way_8shot .* 3-way validation episodes "
                                         r"with its 8 shots and the 5 queries of dataset.episodes.val, and "
                                         r"val classes with fewer than n_shot \+ n_query = 8 \+ 5 = 13 "
                                         r"clips: .*model.test_shrinkages=null"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()  # not one training step
    metrics, _ = train(compose_train_cfg(tmp_path / "kept", [
        setting, "model.test_shrinkages=null", "model.test_support_weights=null"]))
    assert 0.0 <= metrics["test/3way_8shot_acc"] <= 1.0


def test_the_embedding_figure_shows_only_episodes_the_test_scored(tmp_path, monkeypatch):
    from fewzero.models import fewshot_module

    shown = []

    def figure(embeddings, sampler, class_names, episode_ids, title):
        shown.append(list(episode_ids))
        return plots.episode_embedding_figure(embeddings, sampler, class_names, episode_ids, title)

    monkeypatch.setattr(fewshot_module, "episode_embedding_figure", figure)
    train(compose_train_cfg(tmp_path, ["model.figures=true", "model.plot_episodes=3",
                                       "dataset.episodes.test=["
                                       "{n_way: 5, n_shot: 1, n_query: 5, n_episodes: 6},"
                                       "{n_way: 3, n_shot: 2, n_query: 5, n_episodes: 2}]"]))
    assert shown == [[0, 1]]  # the setting with the most shots, of 2 episodes: not a third


def test_the_embedding_figures_draw_one_dimensional_embeddings():
    # was: TypeError "Axes.scatter() missing 1 required positional argument: 'y'" at the test of
    # a run with model.backbone.embedding_dim=1, after its whole training (PCA gave one column)
    from fewzero.data.episodes import EpisodeSampler

    labels = torch.arange(3).repeat_interleave(4)
    sampler = EpisodeSampler(labels, [0, 1, 2], ["a", "b", "c"], 3, 2, 2, 0, split="test")
    embeddings = torch.randn(len(labels), 1)
    figure = plots.episode_embedding_figure(embeddings, sampler, ["a", "b", "c"], [0, 1], "t")
    assert len(figure.axes) == 2
    plots.plt.close(figure)
    figure = plots.zsl_embedding_figure(embeddings, labels, torch.randn(3, 1), ["a", "b", "c"], [2], "t")
    plots.plt.close(figure)


def test_a_figure_reaches_tensorboard_as_its_png_and_other_writers_as_its_pixels(tmp_path):
    """torch's SummaryWriter gets the PNG's bytes, which TensorBoard reads back; a writer with
    an add_image only (another logger's) gets the picture decoded, (height, width, 3) uint8."""
    from torch.utils.tensorboard import SummaryWriter

    class Logger:
        def __init__(self, experiment):
            self.experiment = experiment

    class PixelsOnly:
        def __init__(self):
            self.added = []

        def add_image(self, tag, pixels, global_step, dataformats):
            self.added.append((tag, pixels, global_step, dataformats))

    board, other = SummaryWriter(str(tmp_path / "tb")), PixelsOnly()
    figure = plots.plt.figure(figsize=(2, 1))
    figure.gca().plot([0, 1], [1, 0])
    plots.save_figure(figure, "test/line", tmp_path / "plots", [Logger(board), Logger(other)], step=7)
    board.close()
    png = (tmp_path / "plots" / "test_line.png").read_bytes()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    (image,) = events.Images("test/line")
    assert image.step == 7 and image.encoded_image_string == png and (image.width, image.height) == (240, 120)
    ((tag, pixels, step, dataformats),) = other.added
    assert (tag, step, dataformats) == ("test/line", 7, "HWC")
    assert pixels.shape == (120, 240, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB")))


def test_the_figure_benchmark_prints_a_row_per_confusion_size_and_refuses_no_repeats(monkeypatch, capsys):
    benchmark = load_script("benchmark_figures")
    monkeypatch.setattr("sys.argv", ["benchmark_figures.py", "--repeats", "1"])
    benchmark.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line[:4] in ("| 5 ", "| 9 ", "| 14")]
    assert len(rows) == 3 and all(row.endswith(" kB |") for row in rows)
    monkeypatch.setattr("sys.argv", ["benchmark_figures.py", "--repeats", "0"])
    with pytest.raises(SystemExit):
        benchmark.main()
    assert "argument --repeats: 0 is not a count" in capsys.readouterr().err


def test_the_support_weight_alone_is_chosen_when_no_shrinkage_candidates_are_given(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["model.test_shrinkages=null", "model.test_support_weights=[0.0,0.5]"])
    metrics, objects = train(cfg)
    for name in ("5way_1shot", "5way_5shot"):
        assert metrics[f"test/{name}_whitening_shrinkage"] == cfg.model.whitening.shrinkage
        assert metrics[f"test/{name}_whitening_support_weight"] in (0.0, 0.5)
    # the choice embeds the validation clips, and no others
    dm, module = objects["datamodule"], objects["model"].eval()
    embeddings = module._val_embeddings()
    assert bool(embeddings[dm.stage_indices("val")].abs().sum(dim=1).gt(0).all())
    assert not embeddings[dm.stage_indices("test")].any()


@pytest.mark.parametrize("key, values, message", [
    ("test_shrinkages", "[0.0,1.0]", "test_shrinkages must be positive"),
    ("test_support_weights", "[0.5,1.5]", r"test_support_weights must lie in \[0, 1\]"),
    ("figures", "'no'", "model.figures='no': must be true or false"),  # bool("no") is True
    # no episode: NaN scores, and the first candidate would pass for validation's choice
    ("selection_episodes", "0", r"model.selection_episodes=0: must be a whole number >= 1"),
    ("selection_episodes", "2.5", r"model.selection_episodes=2.5: must be a whole number >= 1"),
])
def test_test_candidates_outside_their_range_are_refused(tmp_path, key, values, message):
    cfg = compose_train_cfg(tmp_path, [f"model.{key}={values}"])
    with pytest.raises(Exception, match=message):
        hydra.utils.instantiate(cfg.model)


def test_a_zero_shot_figures_switch_that_is_no_boolean_is_refused(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_word_audio", "model.figures=1"])
    with pytest.raises(Exception, match="model.figures=1: must be true or false"):
        hydra.utils.instantiate(cfg.model, side_info=hydra.utils.instantiate(cfg.side_info))


def test_the_projector_lists_the_test_clips_with_their_instruments(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["dataset.episodes.train.n_episodes=2"])
    _, objects = train(cfg)
    dm = objects["datamodule"]
    [metadata] = Path(cfg.paths.output_dir, "tensorboard").rglob("metadata.tsv")
    names = metadata.read_text().splitlines()
    assert len(names) == len(dm.stage_indices("test"))
    assert sorted(names) == sorted(dm.class_names[int(c)] for c in dm.labels[dm.stage_indices("test")])
    assert set(names) == set(cfg.dataset.split.test)
    # model.figures=false (the tests' setting) draws no figure, and keeps the projector's
    assert not cfg.model.figures and not Path(cfg.paths.output_dir, "plots").exists()
    events = EventAccumulator(str(Path(cfg.paths.output_dir, "tensorboard")))
    events.Reload()
    assert events.Tags()["images"] == [] and "test/5way_5shot_acc" in events.Tags()["scalars"]


def test_the_sanity_check_embeds_but_scores_no_validation_episode():
    from types import SimpleNamespace

    from fewzero.models.fewshot_module import FewShotModule

    logged, embedded = [], []
    module = SimpleNamespace(_all_embeddings=lambda: embedded.append(1) or torch.zeros(3, 2),
                             trainer=SimpleNamespace(sanity_checking=True, datamodule=None),
                             net=SimpleNamespace(whitening=None), log=lambda *a, **k: logged.append(a))
    FewShotModule.on_validation_epoch_end(module)  # a few batches only: no val/acc, no best
    assert embedded == [1] and not logged


def test_training_episodes_pass_through_the_augmentation_once(tmp_path):
    cfg = compose_train_cfg(tmp_path, [])
    module = hydra.utils.instantiate(cfg.model)
    seen = []

    class Recording(torch.nn.Module):
        def forward(self, x):
            seen.append(x.shape)
            return x

    module.augment, module.log = Recording(), lambda *args, **kwargs: None
    n_mels = cfg.dataset.features.n_mels
    batch = {"support": torch.randn(2, n_mels, 50), "query": torch.randn(4, n_mels, 50),
             "support_labels": torch.tensor([0, 1]), "query_labels": torch.tensor([0, 0, 1, 1]),
             "classes": torch.tensor([3, 7])}
    module.training_step(batch, 0).backward()
    assert seen == [(6, n_mels, 50)]  # support and query together, in one pass


def test_whitening_can_be_switched_off(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["model.whitening=null"])
    metrics, objects = train(cfg)
    assert objects["model"].net.whitening is None
    assert 0.0 <= metrics["test/5way_5shot_acc"] <= 1.0


def test_few_shot_benchmark_describes_its_own_test_episodes_and_keeps_its_runs_re_evaluable(
        tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    benchmark = load_script("benchmark_fsl")
    own = ("+trainer.enable_progress_bar", "~callbacks.progress_bar", "trainer.max_steps=")
    tones = [o for o in tone_overrides(tmp_path) if not o.startswith(own)]
    out = tmp_path / "bench"
    monkeypatch.setattr("sys.argv", ["benchmark_fsl.py", "--max-steps", "9", "--data-episodes", "3",
                                     "--tutorial-episodes", "1", "--out", str(out), *tones,
                                     "trainer.max_steps=2", "seed=3", "--backbones", "timbre_cnn"])
    benchmark.main()
    table = (out / "benchmark.md").read_text()
    # the overrides win over --max-steps and --seed, and the table says what the run was given
    assert "Training budget: 2 steps of 5-way 5-shot 2-query episodes, seed 3;" in table
    assert "6 episodes of 5-way 1-shot (5 queries per class); 6 episodes of 5-way 5-shot" in table
    # the whitening's choice on validation episodes is timed apart from the test episodes
    run_row = json.loads((out / "benchmark.json").read_text())["runs"]["timbre_cnn"]
    assert run_row["whitening_choice_s"] > 0 and run_row["eval_s_per_episode"] > 0
    assert "| timbre_cnn: evaluation s/episode (embedding included, whitening choice excluded) |" in table
    assert "| timbre_cnn: whitening choice on validation episodes, once per test (s) |" in table
    assert "one training run's, +- its 95% interval over the test episodes" in table
    assert "| timbre_cnn: 5way 5shot accuracy |" in table
    assert "| timbre_cnn, same checkpoint without whitening: 5way 1shot accuracy |" in table
    run = out / "timbre_cnn"
    assert OmegaConf.load(run / ".hydra" / "config.yaml").model.backbone._target_.endswith("TimbreCNN")
    assert "model/backbone=timbre_cnn" in OmegaConf.load(run / ".hydra" / "overrides.yaml")
    monkeypatch.setattr("sys.argv", ["benchmark_fsl.py", "--backbones", "timbre_cnn", "trainer=gpu"])
    with pytest.raises(SystemExit):  # an override after --backbones is not taken for a backbone
        benchmark.main()
    assert "invalid choice: 'trainer=gpu'" in capsys.readouterr().err


def test_few_shot_benchmark_refuses_a_bad_seed_or_a_repeated_backbone_before_any_work(
        tmp_path, monkeypatch, capsys):
    benchmark = load_script("benchmark_fsl")
    # was Lightning's traceback as the first backbone started training, after the data pipeline
    monkeypatch.setattr("sys.argv", ["benchmark_fsl.py", "--seed", "-1", "--out", str(tmp_path / "b"),
                                     *tone_overrides(tmp_path), "--backbones"])
    with pytest.raises(SystemExit):
        benchmark.main()
    assert "argument --seed: -1 is not a seed: seeds go from 0 to 4294967295" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    # a backbone listed twice trained twice into one folder, then failed at the second's
    # unwhitened test (its folder held the first's metrics.json)
    monkeypatch.setattr("sys.argv", ["benchmark_fsl.py", "--out", str(tmp_path / "b"),
                                     *tone_overrides(tmp_path),
                                     "--backbones", "timbre_cnn", "music_fsl_cnn", "timbre_cnn"])
    with pytest.raises(SystemExit):
        benchmark.main()
    assert "--backbones lists timbre_cnn more than once" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("option", ["--max-steps", "--data-episodes", "--tutorial-episodes"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_few_shot_benchmark_refuses_counts_below_one_before_any_work(option, value, tmp_path,
                                                                    monkeypatch, capsys):
    benchmark = load_script("benchmark_fsl")
    # --max-steps -1 trained without limit; 0 episodes divided by zero, or printed nonsense
    tones = [o for o in tone_overrides(tmp_path) if not o.startswith("trainer.max_steps=")]
    monkeypatch.setattr("sys.argv", ["benchmark_fsl.py", option, value, "--out", str(tmp_path / "b"),
                                     *tones, "--backbones"])
    with pytest.raises(SystemExit):
        benchmark.main()
    assert f"argument {option}: {value} is not above 0" in capsys.readouterr().err


def test_few_shot_benchmark_refuses_an_out_folder_with_finished_runs_before_training(
        tmp_path, monkeypatch, capsys):
    benchmark = load_script("benchmark_fsl")
    finished = tmp_path / "bench" / "timbre_cnn_unwhitened" / "metrics.json"
    finished.parent.mkdir(parents=True)
    finished.write_text("{}")  # fewzero.eval would refuse to test over it, after the training
    own = ("+trainer.enable_progress_bar", "~callbacks.progress_bar", "trainer.max_steps=")
    tones = [o for o in tone_overrides(tmp_path) if not o.startswith(own)]
    monkeypatch.setattr("sys.argv", ["benchmark_fsl.py", "--max-steps", "1", "--data-episodes", "1",
                                     "--tutorial-episodes", "1", "--out", str(tmp_path / "bench"),
                                     *tones, "--backbones", "timbre_cnn"])
    with pytest.raises(SystemExit):
        benchmark.main()
    assert "holds finished runs" in capsys.readouterr().err and finished.read_text() == "{}"


def test_few_shot_benchmark_refusal_names_the_run_it_stopped_at(tmp_path, monkeypatch):
    from fewzero.cli import run_script

    benchmark = load_script("benchmark_fsl")
    own = ("+trainer.enable_progress_bar", "~callbacks.progress_bar", "trainer.max_steps=")
    tones = [o for o in tone_overrides(tmp_path) if not o.startswith(own)]
    out = tmp_path / "bench"
    # composes for the data pipeline, then refused as the backbone's run starts
    monkeypatch.setattr("sys.argv", ["benchmark_fsl.py", "--max-steps", "1", "--data-episodes", "1",
                                     "--tutorial-episodes", "1", "--out", str(out), *tones,
                                     "model.backbone.dropout=1.0", "--backbones", "timbre_cnn"])
    with pytest.raises(SystemExit) as refused:
        run_script(benchmark.main)
    message = str(refused.value.code)
    assert message.startswith("benchmark_fsl.py: model.backbone.dropout=1.0: a dropout probability")
    # which backbone, seed and folder: the refusal alone did not say
    assert message.endswith(f"\n(the run of backbone timbre_cnn, seed 0, in {out / 'timbre_cnn'})")


@pytest.mark.parametrize("script", ["benchmark_fsl", "benchmark_zsl"])
def test_benchmarks_refuse_an_out_that_is_a_file_before_any_work(script, tmp_path, monkeypatch, capsys):
    benchmark = load_script(script)
    tones = [o for o in tone_overrides(tmp_path, zero_shot=script == "benchmark_zsl")
             if not o.startswith(("+trainer.enable_progress_bar", "~callbacks.progress_bar"))]
    taken = tmp_path / "results.md"
    taken.write_text("mine\n")
    for out in (taken, taken / "runs"):  # was NotADirectoryError's traceback, as a run wrote
        monkeypatch.setattr("sys.argv", [f"{script}.py", "--out", str(out), *tones])
        with pytest.raises(SystemExit):
            benchmark.main()
        assert f"argument --out: {taken} is a file, not a folder" in capsys.readouterr().err
    assert taken.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]


def test_few_shot_benchmark_stopped_by_sigterm_says_a_rerun_starts_over_in_another_out(
        tmp_path, monkeypatch, capsys):
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from fewzero.cli import run_script

    benchmark = load_script("benchmark_fsl")

    def stopped(cfg):  # stands in for a fit that SIGTERM or Ctrl-C stopped
        raise SIGTERMException

    monkeypatch.setattr(benchmark, "train", stopped)
    own = ("+trainer.enable_progress_bar", "~callbacks.progress_bar", "trainer.max_steps=")
    tones = [o for o in tone_overrides(tmp_path) if not o.startswith(own)]
    out = tmp_path / "bench"
    monkeypatch.setattr("sys.argv", ["benchmark_fsl.py", "--max-steps", "1", "--data-episodes", "1",
                                     "--tutorial-episodes", "1", "--out", str(out), *tones,
                                     "--backbones", "timbre_cnn"])
    with pytest.raises(SystemExit) as stop:
        run_script(benchmark.main)
    assert stop.value.code == 143
    # was "Run the command again.", which the same --out refuses once a backbone has finished
    assert ("benchmark_fsl.py: stopped by SIGTERM or Ctrl-C before it finished. Run it again with "
            f"another --out: the runs start over, as this benchmark neither reuses nor resumes those "
            f"in {out}.") in capsys.readouterr().err


@pytest.mark.parametrize("script, other", [("benchmark_fsl", "### Zero-shot benchmark, RenderedSOL"),
                                           ("benchmark_fsl", "### Few-shot benchmark, RenderedSOL"),
                                           ("benchmark_zsl", "### Few-shot benchmark, RenderedSOL")])
def test_benchmarks_refuse_an_out_holding_a_table_theirs_would_overwrite(script, other, tmp_path,
                                                                         monkeypatch, capsys):
    benchmark = load_script(script)
    monkeypatch.setattr(benchmark, "train", lambda *a: pytest.fail("stop before training"))
    tones = [o for o in tone_overrides(tmp_path, zero_shot=script == "benchmark_zsl")
             if not o.startswith(("+trainer.enable_progress_bar", "~callbacks.progress_bar"))]
    out = tmp_path / "bench"
    out.mkdir()
    # both write <out>/benchmark.md: the second benchmark given one --out replaced the first's table
    (out / "benchmark.md").write_text(f"{other}, CPU, 2026-12-06\n\n| a | b |\n")
    monkeypatch.setattr("sys.argv", [f"{script}.py", "--out", str(out), *tones])
    with pytest.raises(SystemExit):
        benchmark.main()
    assert f"--out {out} holds " in capsys.readouterr().err
    assert (out / "benchmark.md").read_text().startswith(other) and len(list(out.iterdir())) == 1


def test_zsl_benchmark_rerun_over_its_own_out_may_rewrite_its_own_table(tmp_path, monkeypatch):
    benchmark = load_script("benchmark_zsl")
    monkeypatch.setattr(benchmark, "run_once", lambda *a: pytest.fail("reached the runs"))
    out = tmp_path / "bench"
    out.mkdir()
    (out / "benchmark.md").write_text("### Zero-shot benchmark, RenderedSOL, CPU, 2026-12-06\n")
    monkeypatch.setattr("sys.argv", ["benchmark_zsl.py", "--seeds", "0", "--recipes", "attribute_plain",
                                     "--out", str(out), *tone_overrides(tmp_path, zero_shot=True)])
    with pytest.raises(pytest.fail.Exception, match="reached the runs"):  # its finished runs are reused
        benchmark.main()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_is_set_on_linux():
    assert keep_freed_memory()  # mallopt accepted both settings


def test_stage_timer_bills_training_steps_but_not_the_validation_between_them(monkeypatch):
    from types import SimpleNamespace

    from fewzero.callbacks import StageTimer

    clock = iter([0.0, 1.0, 1.5, 11.5, 13.0, 20.0, 24.0])  # 10 s of validation after step 1
    monkeypatch.setattr("fewzero.callbacks.time.perf_counter", lambda: next(clock))
    logged: list[dict] = []
    trainer = SimpleNamespace(global_step=2, loggers=[SimpleNamespace(
        log_metrics=lambda metrics, step: logged.append(metrics))])
    timer = StageTimer()
    timer.on_train_epoch_start(trainer, None)
    timer.on_train_batch_end(trainer, None, None, None, 0)
    timer.on_validation_start(trainer, None)
    timer.on_validation_end(trainer, None)
    timer.on_train_batch_end(trainer, None, None, None, 1)
    timer.on_train_end(trainer, None)
    assert timer.results["train_seconds"] == pytest.approx(1.0 + 2.0)
    assert timer.results["train_steps"] == 2
    timer.on_test_start(trainer, None)
    timer.on_test_end(trainer, None)
    assert timer.results["test_seconds"] == pytest.approx(4.0)
    assert logged == [{"time/train_steps_per_s": pytest.approx(2 / 3)},
                      {"time/test_seconds": pytest.approx(4.0)}]


def test_the_progress_bar_names_the_last_epoch_of_a_run_measured_in_steps(tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import RichProgressBar
    from pytorch_lightning.demos.boring_classes import BoringModel

    from fewzero.callbacks import EpochProgressBar

    def description(bar, **length):
        trainer = pl.Trainer(callbacks=[bar], limit_train_batches=4, limit_val_batches=0,
                             logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                             enable_model_summary=False, **length)
        trainer.fit(BoringModel())
        return bar._get_train_description(1).strip()

    # 10 steps of 4 a epoch end in epoch 2 (0-based), where Lightning's own bar says -2
    assert description(RichProgressBar(), max_steps=10, max_epochs=-1) == "Epoch 1/-2"
    assert description(EpochProgressBar(), max_steps=10, max_epochs=-1) == "Epoch 1/2"
    assert description(EpochProgressBar(), max_steps=8, max_epochs=-1) == "Epoch 1/1"
    assert description(EpochProgressBar(), max_steps=-1, max_epochs=3) == "Epoch 1/2"
    assert description(EpochProgressBar(), max_steps=40, max_epochs=2) == "Epoch 1/1"  # the first bound


def test_a_gpu_trainer_on_a_machine_without_a_gpu_names_the_fix(tmp_path, monkeypatch):
    from pytorch_lightning.accelerators import CUDAAccelerator, MPSAccelerator

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(MPSAccelerator, "is_available", staticmethod(lambda: False))
    for trainer in ("trainer.accelerator=gpu", "trainer.accelerator=cuda"):  # trainer=gpu: gpu
        with pytest.raises(ValueError, match="needs a GPU, and torch sees none on this machine") as err:
            train(compose_train_cfg(tmp_path, [trainer]))
        assert "trainer=cpu" in str(err.value) and "trainer.accelerator=auto" in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything ran


def test_the_model_summary_counts_the_audio_encoders_flops_per_excerpt(tmp_path):
    from pytorch_lightning.callbacks import ModelSummary as SummaryCallback
    from pytorch_lightning.utilities.model_summary import ModelSummary

    from fewzero.callbacks import EncoderModelSummary, EncoderSummary

    for experiment, encoder in (([], "net.backbone"), (["experiment=zsl_attribute_audio"], "backbone")):
        _, objects = train(compose_train_cfg(tmp_path / str(len(experiment)), [*experiment, "test=false"]))
        model, datamodule, trainer = objects["model"], objects["datamodule"], objects["trainer"]
        example = [1, datamodule.features.n_mels, datamodule.excerpt_frames]
        assert list(model.example_input_array.shape) == example
        assert ModelSummary(model).total_flops > 0  # was 0: the summary had no input to run
        if not experiment:  # the main fit's trainer (a zero-shot run's is the refit's, which has none)
            assert [type(c) for c in trainer.callbacks if isinstance(c, SummaryCallback)] == [
                EncoderModelSummary]
        # the summary printed as the fit starts (Lightning's default gave the few-shot `net` row
        # 0 FLOPs and "?" sizes: the example runs through net.backbone alone, which had no row)
        summary = EncoderSummary(model)
        row = summary.layer_names.index(encoder)
        assert sum(summary.flop_counts[encoder].values()) == summary.total_flops > 0
        assert summary.in_sizes[row] == example and summary.out_sizes[row][0] == 1
        # that row alone is added, after its parent's: no other submodule is listed
        nested = [name for name in summary.layer_names if "." in name]
        assert nested == ([encoder] if "." in encoder else [])
        assert summary.layer_names[row - 1] == encoder.split(".")[0] or "." not in encoder


class _MelMean(torch.nn.Module):
    """A researcher's own backbone that names its output size `out_dim`: the time-averaged
    log-mel, projected. (batch, n_mels, frames) -> (batch, out_dim).

    `embedding_dim` is what its config claims the output size is; the class ignores it.
    """

    def __init__(self, n_mels: int, out_dim: int = 8, embedding_dim: int | None = None):
        super().__init__()
        self.projection = torch.nn.Linear(n_mels, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x.mean(dim=-1))


class _Unflattened(_MelMean):
    """The mistake of returning (batch, out_dim, 1) instead of (batch, out_dim)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[:, :, None]


def _own_backbone(target: str, **settings: int) -> list[str]:
    """Overrides that replace model.backbone with `target` (a Hydra dict override would merge the
    default backbone's keys into it)."""
    extra = "".join(f", {key}: {value}" for key, value in settings.items())
    return ["~model.backbone",
            f"+model.backbone={{_target_: {target}, n_mels: ${{dataset.features.n_mels}}{extra}}}"]


def test_a_backbone_config_without_embedding_dim_names_its_readers_and_the_fix(tmp_path):
    own = _own_backbone("test_train._MelMean", out_dim=8)
    with pytest.raises(ValueError, match=r"model.backbone \(test_train._MelMean\) has no embedding_dim"
                                         r".*\['model.whitening.dim'\] read as "
                                         r"\$\{model.backbone.embedding_dim\}"
                                         r".*'model.whitening.dim=\$\{model.backbone.out_dim\}'"):
        train(compose_train_cfg(tmp_path / "refused", own))  # was OmegaConf's InterpolationKeyError
    # the fix the message names trains
    fixed = [*own, "model.whitening.dim=${model.backbone.out_dim}"]
    metrics, objects = train(compose_train_cfg(tmp_path / "fixed", fixed))
    assert objects["model"].net.whitening.matrix.shape == (8, 8)
    assert 0.0 <= metrics["test/5way_5shot_acc"] <= 1.0


@pytest.mark.parametrize(("target", "settings", "message"), [
    ("test_train._Unflattened", {"out_dim": 8, "embedding_dim": 8},
     r"must return one tensor of \(batch, embedding_dim\) embeddings; for one excerpt of shape "
     r"\(1, \d+, \d+\) it returned \(1, 8, 1\)"),
    ("test_train._MelMean", {"out_dim": 8, "embedding_dim": 16},
     r"returns 8-d embeddings, but its config says embedding_dim=16, which sizes "
     r"\['model.whitening.dim'\]. Set model.backbone.embedding_dim=8"),
])
def test_a_backbone_that_returns_another_shape_than_its_config_says_is_refused_before_training(
        tmp_path, target, settings, message):
    # was: a whole training epoch, then a shape error at validation (or a whitening refusal
    # that named no fix)
    with pytest.raises(ValueError, match=message):
        train(compose_train_cfg(tmp_path, _own_backbone(target, **settings)))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(("key", "target", "problem"), [
    ("model.backbone", "test_train._MelMeen", r"test_train has no '_MelMeen' \(close: _MelMean"),
    ("model.backbone", "my_absent_plugins.MelMean",
     r"no module named 'my_absent_plugins' is on the Python path"),
    # not "cannot be built with its settings" of the optimisation check, which builds them
    ("model.optimizer", "my_absent_plugins.Lion", r"no module named 'my_absent_plugins'"),
    ("model.scheduler", "torch.optim.lr_scheduler.CosineAnealingLR",
     r"torch.optim.lr_scheduler has no 'CosineAnealingLR' \(close: CosineAnnealingLR"),
])
def test_a_target_that_does_not_import_names_why_and_pythonpath_before_anything_is_built(
        tmp_path, key, target, problem):
    # was Hydra's "Error locating target ..., set env var HYDRA_FULL_ERROR=1", after the datamodule
    cfg = compose_train_cfg(tmp_path, [f"{key}._target_={target}"])
    with pytest.raises(ValueError, match=rf"{key}._target_={target} cannot be imported: "
                                         rf"{problem}.*PYTHONPATH=/path/to/folder"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("precision", ["bf16-mixed", "64-true"])
def test_a_few_shot_run_trains_validates_and_tests_in_mixed_or_double_precision(tmp_path, precision):
    # 64-true was a dtype error in the model summary's float32 example excerpt, then in the
    # whitening's reference embeddings (embedded outside Lightning's loops) and its choice
    cfg = compose_train_cfg(tmp_path, [f"trainer.precision={precision}"])
    metrics, objects = train(cfg)
    assert objects["trainer"].precision == precision
    assert 0.0 < metrics["val/acc_best"] <= 1.0
    assert all(0.0 <= metrics[f"test/{name}_acc"] <= 1.0 for name in ("5way_1shot", "5way_5shot"))
    if precision == "64-true":
        assert next(objects["model"].parameters()).dtype == torch.float64


def test_the_whitening_is_fitted_on_clips_embedded_as_the_evaluated_ones_are(tmp_path, monkeypatch):
    """Under bf16-mixed Lightning embeds the validation and test clips under autocast; the
    reference clips of the whitening (embedded outside its loops) were embedded in float32."""
    from fewzero.models.fewshot_module import FewShotModule

    dtypes = []
    embed = FewShotModule._embed_loader

    def recording(self, loader):
        hook = self.net.backbone.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
        try:
            return embed(self, loader)
        finally:
            hook.remove()

    monkeypatch.setattr(FewShotModule, "_embed_loader", recording)
    train(compose_train_cfg(tmp_path, ["trainer.precision=bf16-mixed", "test=false"]))
    assert dtypes and set(dtypes) == {torch.bfloat16}


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_precisions_with_16_bit_weights_are_refused_naming_the_mixed_ones(tmp_path, precision):
    # was: NotImplementedError ("cdist" not implemented for 'BFloat16') in the first training step
    with pytest.raises(ValueError, match=rf"trainer.precision={precision} keeps every weight and "
                                         r"buffer in 16 bits.*trainer.precision=bf16-mixed"):
        train(compose_train_cfg(tmp_path, [f"trainer.precision={precision}"]))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_gradient_accumulation_is_refused_naming_what_gives_more_examples_per_step(tmp_path):
    # was: accepted, and each epoch started the seeded episode stream at the step count, so
    # half of every epoch's episodes were those the epoch before had read
    with pytest.raises(ValueError, match=r"trainer.accumulate_grad_batches=2: .*read again .*"
                                         r"dataset.episodes.train.n_way or n_query"):
        train(compose_train_cfg(tmp_path, ["+trainer.accumulate_grad_batches=2"]))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("stage", ["val", "test"])
def test_a_limit_that_would_leave_evaluation_clips_unembedded_is_refused_before_training(tmp_path,
                                                                                        stage):
    # was: the clips past the limit stayed zero vectors in the episodes (a 5-shot test of 0.58
    # where all clips gave 0.72), reported as the full test
    with pytest.raises(ValueError, match=rf"trainer.limit_{stage}_batches=1 would embed only part "
                                         rf".*dataset.episodes.{stage}"):
        train(compose_train_cfg(tmp_path, [f"+trainer.limit_{stage}_batches=1"]))
    assert not (tmp_path / "run" / "checkpoints").exists()
    for whole in ("1.0", "0"):  # every clip, or none (no validation, no test): accepted
        check_trainer_settings(compose_train_cfg(tmp_path, [f"+trainer.limit_{stage}_batches={whole}"]))


@pytest.mark.parametrize(("setting", "message"), [
    ("+trainer.overfit_batches=1", r"trainer.overfit_batches=1: .*never repeats one.*debug=fast"),
    ("+trainer.enable_checkpointing=false",
     r"trainer.enable_checkpointing=false: .*callbacks.last_checkpoint=null"),
])
def test_trainer_settings_that_fewzeros_checkpoints_or_stream_cannot_honour_name_the_fix(
        tmp_path, setting, message):
    # overfit_batches trained on new episodes every epoch and validated on 1 batch of clips;
    # enable_checkpointing=false was Lightning's "found `ModelCheckpoint` in callbacks list"
    with pytest.raises(ValueError, match=message):
        train(compose_train_cfg(tmp_path, [setting]))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_cosine_schedule_without_a_length_is_refused_when_training_by_epochs(tmp_path):
    # was: T_max=${trainer.max_steps}=-1, and the learning rate was 0 on every other step
    by_epochs = ["trainer.max_steps=-1", "trainer.max_epochs=2"]
    with pytest.raises(ValueError, match=r"model.scheduler.T_max=-1: .*model.scheduler=null"):
        train(compose_train_cfg(tmp_path, by_epochs))
    # was accepted: the learning rate climbed back after step 3 (checked as the fit starts,
    # where the epochs' length is known)
    with pytest.raises(ValueError, match=r"model.scheduler.T_max=3 is shorter than the run \(trainer."
                                         r"max_epochs=2 epochs of 2 steps\).*T_max=4 or more"):
        train(compose_train_cfg(tmp_path / "short", [*by_epochs, "model.scheduler.T_max=3"]))
    _, objects = train(compose_train_cfg(tmp_path / "fixed", [*by_epochs, "model.scheduler.T_max=4"]))
    assert objects["trainer"].global_step == 4  # two epochs of two episodes


@pytest.mark.parametrize("seed", ["null", "abc", "-1", "4294967296", "1.5", "true"])
def test_a_seed_that_is_not_a_whole_number_in_numpys_range_is_refused_before_anything_is_built(
        tmp_path, seed):
    # were, with a traceback: null a TypeError in the episode sampler, abc and 4294967296 in
    # Lightning's seed_everything, -1 in numpy's SeedSequence at the first training step
    with pytest.raises(ValueError, match=r"seed=.*: every run is seeded .* from 0 to 4294967295"):
        train(compose_train_cfg(tmp_path, [f"seed={seed}"]))
    assert not (tmp_path / "run" / "checkpoints").exists()


STEP_LR = ["model.scheduler._target_=torch.optim.lr_scheduler.StepLR", "~model.scheduler.T_max"]
ONE_CYCLE = ["model.scheduler._target_=torch.optim.lr_scheduler.OneCycleLR", "~model.scheduler.T_max",
             "+model.scheduler.max_lr=0.01"]


@pytest.mark.parametrize(("overrides", "message"), [
    # were torch's errors behind a traceback once the fit had started, naming no key
    (["model.optimizer.lr=-0.001"], r"model.optimizer \(torch.optim.AdamW\) cannot be built with its "
                                    r"settings: Invalid learning rate: -0.001\. Set the model.optimizer"),
    (["model.optimizer.weight_decay=-0.1"], r"model.optimizer .*Invalid weight_decay value: -0.1"),
    (["model.optimizer._target_=torch.optim.SGD", "+model.optimizer.betas=[0.9,0.99]"],
     r"model.optimizer \(torch.optim.SGD\) .*unexpected keyword argument 'betas'"),
    (["~model.optimizer._partial_"], r"model.optimizer .* needs _partial_: true.*"
                                     r"\+model.optimizer._partial_=true"),
    (STEP_LR, r"model.scheduler \(torch.optim.lr_scheduler.StepLR\) .*'step_size'"),
    # was Lightning's "The lr scheduler dict must include a monitor"
    (["model.scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau", "~model.scheduler.T_max"],
     r"ReduceLROnPlateau\) waits on a metric.*model.scheduler=null"),
    # was accepted: after step 3 the learning rate climbed back to the full rate
    (["model.scheduler.T_max=3"], r"model.scheduler.T_max=3 is shorter than the run \(trainer.max_steps=4\)"
                                  r".*climbs back up.*model.scheduler.T_max=4"),
    # was torch's "Tried to step 4 times. The specified number of total steps is 3", in training
    ([*ONE_CYCLE, "+model.scheduler.total_steps=3"],
     r"model.scheduler.total_steps=3 is shorter than the run.*torch stops the run"),
])
def test_optimisers_and_schedules_the_run_cannot_follow_are_refused_before_anything_is_built(
        tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(compose_train_cfg(tmp_path, overrides))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("overrides", [
    ["model.optimizer._target_=torch.optim.SGD", "~model.optimizer.weight_decay",
     "+model.optimizer.momentum=0.9"],
    ["model.scheduler=null"],
    ["model.scheduler.T_max=10"],  # longer than the run: the schedule is cut short, as asked
    [*STEP_LR, "+model.scheduler.step_size=2"],
    [*ONE_CYCLE, "+model.scheduler.total_steps=4"],
    ["model=eszsl", "experiment=zsl_word_audio"],
])
def test_optimisers_and_schedules_the_run_can_follow_pass_the_check(tmp_path, overrides):
    check_optimisation_settings(compose_train_cfg(tmp_path, overrides))


@pytest.mark.parametrize("experiment", ["fsl_protonet", "zsl_attribute_audio"])
def test_switching_the_trainers_progress_bar_off_leaves_the_runs_own_bar_out(tmp_path, experiment):
    # was Lightning's MisconfigurationException ("found `EpochProgressBar` in callbacks list")
    overrides = [o for o in tone_overrides(tmp_path, experiment.startswith("zsl"))
                 if "progress_bar" not in o]
    cfg = compose_train_config([*overrides, f"experiment={experiment}", "+trainer.fast_dev_run=true",
                                "+trainer.enable_progress_bar=false"], tmp_path / "run")
    assert cfg.callbacks.progress_bar is not None
    _, objects = train(cfg)
    assert objects["trainer"].progress_bar_callback is None


@pytest.mark.parametrize("experiment", ["fsl_protonet", "zsl_attribute_audio"])
@pytest.mark.parametrize(("setting", "message"), [
    ("model.augment.freq_mask_bins=32", r"model.augment.freq_mask_bins=32 would blank whole "
                                        r"excerpts: they have 32 mel bins"),
    ("model.augment.time_mask_frames=41", r"model.augment.time_mask_frames=41 would blank whole "
                                          r"excerpts: they have 41 frames per excerpt"),
])
def test_an_augmentation_wider_than_the_excerpts_is_refused_before_the_data_are_prepared(
        tmp_path, monkeypatch, experiment, setting, message):
    # was refused at the first training batch, after the clips were rendered and cached
    from fewzero.data.zsl_datamodule import ZeroShotDataModule

    for module in (FewShotDataModule, ZeroShotDataModule):
        monkeypatch.setattr(module, "prepare_data", lambda self: pytest.fail("data prepared"))
    with pytest.raises(ValueError, match=message):
        train(compose_train_cfg(tmp_path, [f"experiment={experiment}", setting]))


LR_ZERO = "model.optimizer.lr=0"


def test_a_learning_rate_of_zero_is_warned_of_once_naming_the_key(tmp_path, caplog):
    # was silent: the run scored its initial weights as if trained (debug=fast on rendered SOL:
    # the same code path as a trained run, no message)
    caplog.set_level("WARNING")
    train(compose_train_cfg(tmp_path, [LR_ZERO, "test=false"]))
    said = [r.getMessage() for r in caplog.records if "the learning rate is 0" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("model.optimizer.lr=0: ")


@pytest.mark.parametrize("overrides", [
    [],  # the default learning rate
    [*ONE_CYCLE, "+model.scheduler.total_steps=4", LR_ZERO],  # OneCycleLR sets its own rates
    [LR_ZERO, "+model.scheduler.eta_min=0.0001"],  # the cosine schedule climbs to eta_min
    ["experiment=zsl_attribute_audio", "model=eszsl", "model.pitch_prior=null", LR_ZERO],  # unused
])
def test_a_learning_rate_that_trains_or_goes_unused_is_not_warned_of(tmp_path, caplog, overrides):
    cfg = compose_train_cfg(tmp_path, overrides)
    caplog.set_level("WARNING")
    warn_of_a_learning_rate_of_zero(hydra.utils.instantiate(cfg.model), cfg)
    assert "the learning rate is 0" not in caplog.text


def test_a_full_disk_while_metrics_json_is_written_leaves_none_half_written(tmp_path, monkeypatch):
    # a sweep that reaches its disk quota: a truncated metrics.json stopped fewzero.report on the
    # whole sweep (JSONDecodeError); none at all lists the run as unfinished, to resume
    write_text = Path.write_text

    def disk_full(self, data, *args, **kwargs):
        if self.name.startswith("metrics.json"):
            write_text(self, data[:100], *args, **kwargs)
            raise OSError(28, "No space left on device")
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space"):
        train(compose_train_cfg(tmp_path, ["trainer.max_steps=2", "model.plot_episodes=0"]))
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("metrics.json")]


def test_a_run_stopped_in_python_raises_with_where_its_progress_is_and_how_to_resume(tmp_path, monkeypatch):
    """From a notebook or script, Ctrl-C or SIGTERM ended `train` with Lightning's bare
    SIGTERMException: IPython showed "SystemExit", a script exited 0 as if it had finished, and
    nothing said that last.ckpt held the step or how to resume from Python."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    import fewzero.train as train_module

    cfg = compose_train_cfg(tmp_path)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"

    def stopped(cfg, overrides, report_extra):  # stands in for a fit that Ctrl-C stopped at step 3
        last.parent.mkdir(parents=True)
        torch.save({"global_step": 3}, last)
        raise SIGTERMException

    monkeypatch.setattr(train_module, "_train", stopped)
    with pytest.raises(SIGTERMException) as stop:
        train(cfg)
    message = str(stop.value)
    assert stop.value.code == message  # an uncaught one: a script prints it and exits 1, not 0
    assert message.startswith(f"Stopped by SIGTERM or Ctrl-C: {last} holds step 3. Resume it from "
                              'Python by calling train again with the same settings, output directory '
                              'and ckpt_path=last (cfg.ckpt_path = "last"; train(cfg);')
    assert f"ckpt_path=last hydra.run.dir={last.parent.parent}" in message


def test_a_run_stopped_at_once_by_a_second_ctrl_c_in_python_says_what_last_ckpt_holds(tmp_path,
                                                                                      monkeypatch):
    """Lightning ends a fit that a KeyboardInterrupt reaches (a second Ctrl-C) with exit(1): a
    notebook showed "SystemExit: 1" alone. Its code stays 1 (a command exits 1, silently)."""
    import fewzero.train as train_module

    cfg = compose_train_cfg(tmp_path)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"

    def stopped(cfg, overrides, report_extra):  # Lightning's _call_and_handle_interrupt
        last.parent.mkdir(parents=True)
        torch.save({"global_step": 50}, last)
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)

    monkeypatch.setattr(train_module, "_train", stopped)
    with pytest.raises(SystemExit) as stop:
        train(cfg)
    assert stop.value.code == 1
    assert str(stop.value).startswith(f"Stopped at once by Ctrl-C: {last} holds step 50. Resume it "
                                      "from Python")


def test_a_refusal_met_while_hydra_builds_a_part_reaches_a_python_caller_as_itself(tmp_path):
    """The datamodule's split check raised inside Hydra's InstantiationException: a notebook's
    `except ValueError` missed it and its message came as a repr."""
    cfg = compose_train_cfg(tmp_path, ["dataset.split.val=[Oboe,Viola]"])
    with pytest.raises(ValueError) as refusal:
        train(cfg)
    assert type(refusal.value) is ValueError
    assert str(refusal.value) == ("Instrument(s) ['Viola'] are in both the val and test splits. "
                                  "Few-shot splits must be class-disjoint: edit dataset.split.")


def test_train_called_as_a_spawned_worker_imports_a_script_names_the_main_guard(tmp_path, monkeypatch):
    """A script calling train() without `if __name__ == "__main__":` hung: rendered SOL's
    "spawn" workers ran the script again, and each waited forever ("Another process is preparing
    source 'sol'") for the data its parent was preparing."""
    import multiprocessing

    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(RuntimeError, match='under if __name__ == "__main__": '):
        train(compose_train_cfg(tmp_path))
