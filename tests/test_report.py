import json
import math
import re

import pytest

from fewzero.report import collect, main


def _run(root, name, overrides, metrics, data=None):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        report = {"metrics": metrics, **({"data": data} if data else {})}
        (run / "metrics.json").write_text(json.dumps(report))


def test_runs_are_grouped_over_seeds_sorted_and_failures_listed(tmp_path, capsys):
    _run(tmp_path, "0", ["model/backbone=a", "seed=0"], {"test/acc": 0.6, "val/acc": 0.7})
    _run(tmp_path, "1", ["model/backbone=a", "seed=1"], {"test/acc": 0.8, "val/acc": 0.9})
    _run(tmp_path, "2", ["model/backbone=b", "seed=0"], {"test/acc": 0.9, "val/acc": 0.5})
    _run(tmp_path, "3", ["model/backbone=b", "seed=1"], None)  # crashed job
    configs, failed = collect(tmp_path)
    by_name = {c.name: c for c in configs}
    assert by_name["model/backbone=a"].mean("test/acc") == pytest.approx(0.7)
    assert by_name["model/backbone=a"].std("test/acc") == pytest.approx(0.141421, abs=1e-5)
    assert [p.name for p in failed] == ["3"]
    main([str(tmp_path), "--metric", "test/acc"])
    markdown = (tmp_path / "report.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| model")]
    assert rows[0].startswith("| model/backbone=b | 1 | 0.9000 (1 run) |")  # best first; no spread
    assert math.isnan(by_name["model/backbone=b"].std("test/acc"))
    assert "0.7000 ± 0.1414" in rows[1]
    assert "1 run(s) without metrics.json" in markdown
    assert f"- {tmp_path / '3'}: unfinished: still running, or killed" in markdown
    assert (tmp_path / "report.csv").read_text().count("\n") == 3
    assert (tmp_path / "report.png").stat().st_size > 0
    assert "written:" in capsys.readouterr().out


def test_a_run_that_failed_after_its_metrics_were_written_is_reported_failed(tmp_path):
    """A finished run resumed under other overrides (ckpt_path=auto), which then failed, keeps
    the old metrics.json: not figures of the overrides Hydra now records for it."""
    import os

    _run(tmp_path, "0", ["seed=0"], {"val/acc": 0.7})
    _run(tmp_path, "1", ["seed=1"], {"val/acc": 0.9})
    for name, offset in (("0", 10), ("1", -10)):  # run 0 failed after; run 1 failed before
        (tmp_path / name / "failed.txt").write_text("Traceback ...\nValueError: bad override\n")
        written = (tmp_path / name / "metrics.json").stat().st_mtime
        os.utime(tmp_path / name / "failed.txt", (written + offset, written + offset))
    configs, failed = collect(tmp_path)
    assert [p.name for p in failed] == ["0"] and configs[0].runs == [tmp_path / "1"]
    main([str(tmp_path), "--metric", "val/acc"])
    assert (f"- {tmp_path / '0'}: failed: ValueError: bad override (failed.txt) (its metrics.json "
            "is from an attempt before)") in (tmp_path / "report.md").read_text()


def test_the_sort_metric_is_one_the_runs_have_the_validation_score_first(tmp_path, capsys):
    _run(tmp_path, "0", ["seed=0"], {"test/zsl_top1": 0.4, "val/acc_best": 0.8})
    _run(tmp_path, "1", ["model=conse", "seed=0"], {"test/zsl_top1": 0.6, "val/acc_best": 0.7})
    main([str(tmp_path)])  # by validation, though the other configuration tests higher
    markdown = (tmp_path / "report.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| configuration | runs | val/acc_best |")
    assert rows[2].startswith("| (defaults) | 1 | 0.8000")
    assert f"First by val/acc_best: (defaults), run(s) {tmp_path / '0'}" in markdown
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--metric", "test/5way_5shot_acc"])
    assert "pass --metric with one they have: test/zsl_top1, val/acc_best" in capsys.readouterr().err
    (tmp_path / "1" / "metrics.json").unlink()
    (tmp_path / "0" / "metrics.json").write_text(json.dumps({"metrics": {"test/zsl_top1": 0.4}}))
    main([str(tmp_path)])  # runs re-tested alone have no validation score: by the test's
    assert "| (defaults) | 1 | 0.4000 (1 run) |" in (tmp_path / "report.md").read_text()


def test_a_resumed_run_stays_in_its_configuration_and_missing_values_are_counted(tmp_path):
    _run(tmp_path, "0", ["~callbacks.progress_bar=null", "seed=0"], {"val/acc_best": 0.8})
    _run(tmp_path, "1", ["~callbacks.progress_bar=null", "seed=1"], {"val/acc_best": float("nan")})
    # Hydra's record of the same run after a resume (ckpt_path=last)
    _run(tmp_path, "2", ["~callbacks.progress_bar", "seed=2", "ckpt_path=last"], {"val/acc_best": 0.6})
    configs, _ = collect(tmp_path)
    assert [(c.name, len(c.runs)) for c in configs] == [("~callbacks.progress_bar", 3)]
    assert configs[0].cell("val/acc_best") == "0.7000 ± 0.1414 (2 of 3 runs)"
    main([str(tmp_path)])
    header, row = (tmp_path / "report.csv").read_text().splitlines()
    assert header.endswith("val/acc_best_mean,val/acc_best_std,val/acc_best_n") and row.endswith(",2")


def test_runs_with_the_same_overrides_in_another_order_are_one_configuration(tmp_path):
    _run(tmp_path, "0", ["model=conse", "dataset.batch_size=8", "seed=0"], {"val/acc_best": 0.8})
    _run(tmp_path, "1", ["seed=1", "dataset.batch_size=8", "model=conse"], {"val/acc_best": 0.6})
    configs, _ = collect(tmp_path)
    assert [(c.name, len(c.runs)) for c in configs] == [("dataset.batch_size=8,model=conse", 2)]


@pytest.mark.slow
def test_a_failing_multirun_job_is_reported_and_the_others_finish(tmp_path):
    import sys

    import cli_processes
    from conftest import SMALL_FEATURES

    from fewzero.data.clips import TINYSOL_INSTRUMENTS

    sweep = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "fewzero.train", "-m", "dataset/source=tones",
        f"dataset.source.instruments=[{','.join(TINYSOL_INSTRUMENTS)}]", "debug=fast",
        f"paths.root_dir={tmp_path}", "dataset.episodes.val.n_query=5", "~callbacks.progress_bar",
        "dataset.episodes.val.n_way=3,9",  # 9 > the 3 validation classes: the second job fails
        f"hydra.sweep.dir={sweep}", *SMALL_FEATURES,
    ]
    done = cli_processes.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]  # both jobs ran; one failed
    configs, failed = collect(sweep)
    assert len(configs) == 1 and len(failed) == 1
    assert "n_way=9 is larger than the 3 val classes" in (failed[0] / "failed.txt").read_text()
    # the report names the error
    main([str(sweep)])
    assert (f"- {failed[0]}: failed: ValueError: n_way=9 is larger than the 3 val classes"
            in (sweep / "report.md").read_text())
    # the multirun ends by naming it (SweepSummary)
    assert f"1 of 2 jobs failed; their tracebacks:\n  {failed[0] / 'failed.txt'}" in done.stdout + done.stderr
    # a refusal: its message on the console, the traceback in failed.txt only
    assert "This job was refused: n_way=9 is larger than the 3 val classes" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "Traceback" in (failed[0] / "failed.txt").read_text()


def test_the_sweep_summary_counts_only_this_invocations_jobs(tmp_path, caplog):
    """A sweep directory reused by a second invocation keeps the first one's runs: their
    failures are not this multirun's."""
    import os
    from pathlib import Path

    from omegaconf import OmegaConf

    from fewzero.sweeps import SweepSummary

    def job(name: str, fails: bool, age: float = 0.0) -> Path:
        run = tmp_path / name
        (run / ".hydra").mkdir(parents=True)
        files = [run / ".hydra" / "config.yaml"] + ([run / "failed.txt"] if fails else [])
        for file in files:
            file.write_text("x")
            if age:
                os.utime(file, (file.stat().st_mtime - age,) * 2)
        return run

    job("0_old", fails=True, age=3600)  # an earlier invocation's
    summary = SweepSummary()
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    summary.on_multirun_start(config)
    job("0_new", fails=False)
    failed = job("1_new", fails=True)
    with caplog.at_level("INFO", logger="fewzero.sweeps"), pytest.raises(SystemExit) as exit_:
        summary.on_multirun_end(config)
    assert exit_.value.code == 1
    assert caplog.messages == [f"1 of 2 jobs failed; their tracebacks:\n  {failed / 'failed.txt'}\n"
                               f"The other jobs' results are kept: python -m fewzero.report {tmp_path}\n"
                               "Exit status 1: the multirun had failed jobs."]

    caplog.clear()
    for file in tmp_path.rglob("*"):  # an hour later
        if file.is_file():
            os.utime(file, (file.stat().st_mtime - 3600,) * 2)
    summary.on_multirun_start(config)
    with caplog.at_level("INFO", logger="fewzero.sweeps"):
        summary.on_multirun_end(config)  # nothing ran this time
    assert caplog.messages == [f"All 0 jobs finished: python -m fewzero.report {tmp_path}"]


def test_run_summary_prints_zero_shot_figures_with_their_intervals(tmp_path, capsys, monkeypatch):
    from fewzero.summary import print_summary

    monkeypatch.setenv("COLUMNS", "200")  # one table row per line

    zero_shot = {"zsl_top1": 0.4551, "zsl_top1_ci95": 0.0283, "zsl_top3": 0.8, "seen_top1": 0.97,
                 "seen_top1_ci95": 0.012, "calibration_gamma": 0.05,
                 **{f"{p}_{k}": v for p in ("gzsl", "gzsl_cs")
                    for k, v in zip("ush", (0.2, 0.7, 0.311), strict=True)},
                 **{f"gzsl_cs_{k}_ci95": v for k, v in zip("ush", (0.021, 0.033, 0.024), strict=True)}}
    print_summary(tmp_path, {"zero_shot": zero_shot, "metrics": {"val/acc_best": 0.8}})
    out = capsys.readouterr().out
    assert "top-1 0.4551 +-0.028" in out and "top-1 0.9700 +-0.012" in out
    assert "u 0.2000 +-0.021, s 0.7000 +-0.033, H 0.3110 +-0.024" in out  # calibrated
    assert "u 0.2000, s 0.7000, H 0.3110 " in out  # uncalibrated: no interval reported
    # a zero-shot run's val/acc_best is its calibrated H, not an accuracy
    assert "best validation score (val/acc_best): 0.8000" in out and "validation accuracy" not in out
    assert f"tensorboard --logdir {tmp_path / 'tensorboard'}" in out  # the run's own, wherever it is


@pytest.mark.parametrize(("unseen", "note"), [
    (["D", "E", "F", "G", "H"], None),
    (["D", "E", "F"], "(top-3 among 3 candidates: always right)"),
    (["D"], "(one unseen candidate: always right)"),
])
def test_run_summary_counts_each_settings_candidates_and_names_a_zsl_figure_that_cannot_be_wrong(
        tmp_path, capsys, monkeypatch, unseen, note):
    """A split of one's own with 3 unseen classes reports ZSL top-3 1.0 +-0.000 whatever the
    model: the summary says so, and how many classes each setting chose among."""
    from fewzero.summary import print_summary

    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    zero_shot = {"zsl_top1": 0.5, "zsl_top3": 1.0, "seen_top1": 0.9, "calibration_gamma": 0.0,
                 **{f"{p}_{k}": 0.5 for p in ("gzsl", "gzsl_cs") for k in "ush"},
                 "seen": ["A", "B", "C"], "unseen": unseen}
    print_summary(tmp_path, {"zero_shot": zero_shot})
    out = capsys.readouterr().out
    assert re.search(rf"ZSL +│ unseen \({len(unseen)}\) +│", out)
    assert re.search(r"seen +│ seen \(3\) +│", out)
    assert re.search(rf"GZSL +│ all \({3 + len(unseen)}\) +│", out)
    assert (note is None and "always right" not in out) or (note is not None and note in out)


@pytest.mark.parametrize(("metrics", "said"), [
    ({"val/acc_best": 0.8, "val/gzsl_cs_h": 0.8}, "penalty 0.0500 (from validation)"),
    ({}, "penalty 0.0500 (from validation)"),  # a test alone (fewzero.eval): its run's validation
    ({"val/acc_best": 0.8, "val/seen_top1": 0.8}, "penalty 0.0500 (not chosen: validation had no "
                                                  "pseudo-unseen or no held-out seen clips)"),
])
def test_run_summary_says_when_validation_chose_no_calibration_penalty(tmp_path, capsys, monkeypatch,
                                                                       metrics, said):
    """A split with dataset.split.pseudo_unseen=[] validates on seen clips alone: the penalty
    is the default, not a validation choice."""
    from fewzero.summary import print_summary

    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    zero_shot = {"zsl_top1": 0.5, "zsl_top3": 1.0, "seen_top1": 0.9, "calibration_gamma": 0.05,
                 **{f"{p}_{k}": 0.5 for p in ("gzsl", "gzsl_cs") for k in "ush"}}
    print_summary(tmp_path, {"zero_shot": zero_shot, "metrics": metrics})
    assert said in capsys.readouterr().out


def test_run_summary_prints_few_shot_results_and_the_class_cv_choice(tmp_path, capsys, monkeypatch):
    import re

    from fewzero.summary import print_summary

    monkeypatch.setenv("COLUMNS", "200")
    zero_shot = {"zsl_top1": 0.5, "zsl_top3": 0.8, "seen_top1": 0.9, "calibration_gamma": 0.05,
                 **{f"{p}_{k}": 0.3 for p in ("gzsl", "gzsl_cs") for k in "ush"}}
    class_cv = {"mean_scores": [0.5, 0.7, 0.6], "zsl_weight": 0.25, "folds": [[1], [2]], "score": "top1"}
    print_summary(tmp_path, {"test_episodes": {"5way_1shot": {"mean_acc": 0.6123, "ci95": 0.0101,
                                                              "n_episodes": 600}},
                             "zero_shot": zero_shot, "class_cv": class_cv})
    out = capsys.readouterr().out
    assert re.search(r"5way_1shot\s*│\s*0\.6123\s*│\s*\+-0\.0101\s*│\s*600\s*│", out)
    assert "ZSL weight 0.25 by class cross-validation over 2 folds (mean pseudo-unseen per-class top-1 " \
           "0.7000)" in out  # the best mean score, that of the chosen weight

    # one fold of one pseudo-unseen class scores every weight alike: nothing was chosen
    undecided = {"mean_scores": [0.0, 0.0, 0.0], "zsl_weight": 0.1, "folds": [["Flute"]],
                 "score": "log_likelihood", "undecided": True}
    print_summary(tmp_path, {"zero_shot": zero_shot, "class_cv": undecided})
    out = capsys.readouterr().out
    assert "ZSL weight 0.1, nearest the configured weight: class cross-validation over 1 fold scored " \
           "every weight the same (pseudo-unseen per-class log-likelihood 0.0000)" in out
    assert "by class cross-validation" not in out


def test_bar_labels_keep_what_tells_configurations_apart():
    from fewzero.report import Configuration, bar_labels

    six = Configuration("debug=fast,paths.log_dir=/a/long/shared/folder/of/logs,trainer.max_steps=6")
    nine = Configuration("debug=fast,paths.log_dir=/a/long/shared/folder/of/logs,trainer.max_steps=9")
    six.metrics["m"], nine.metrics["m"] = [0.1], [0.2, 0.3]
    assert bar_labels([six, nine], "m") == ["trainer.max_steps=6 (1 run)", "trainer.max_steps=9"]
    alone = Configuration("experiment=xlsa17_devise,dataset.root=/path/to/xlsa17/data/" + "x" * 60)
    alone.metrics["m"] = [0.5, 0.6]
    label = bar_labels([alone], "m")[0]
    assert len(label) == 60 and label.startswith("experiment=xlsa17_devise") and "…" in label


def test_bar_labels_keep_list_valued_overrides_whole():
    from fewzero.report import Configuration, bar_labels

    half = Configuration("dataset.split.unseen=[Bassoon,Viola],model.test_shrinkages=[0.5,1.0]")
    other = Configuration("dataset.split.unseen=[Bassoon,Cello],model.test_shrinkages=[0.5,1.0]")
    half.metrics["m"], other.metrics["m"] = [0.1, 0.2], [0.3, 0.4]
    # not "Viola]" and "Cello]": the commas inside a list do not separate overrides
    assert bar_labels([half, other], "m") == ["dataset.split.unseen=[Bassoon,Viola]",
                                              "dataset.split.unseen=[Bassoon,Cello]"]


def test_a_table_sorted_by_a_test_metric_says_its_first_row_is_not_a_choice(tmp_path):
    _run(tmp_path, "0", ["model.head.lam=1", "seed=0"], {"test/zsl_top1": 0.4, "val/zsl_top1": 0.8})
    _run(tmp_path, "1", ["model.head.lam=5", "seed=0"], {"test/zsl_top1": 0.6, "val/zsl_top1": 0.7})
    main([str(tmp_path), "--metric", "test/zsl_top1"])
    markdown = (tmp_path / "report.md").read_text()
    assert ("First by test/zsl_top1 (a test metric: for reading, not for choosing; choose by a val/ "
            "metric): model.head.lam=5, run(s)") in markdown
    main([str(tmp_path), "--metric", "val/zsl_top1"])
    assert "First by val/zsl_top1: model.head.lam=1, run(s)" in (tmp_path / "report.md").read_text()


def test_run_summary_prints_paths_whole_and_as_they_are(tmp_path, capsys, monkeypatch):
    """Paths longer than the console and run directories whose overrides look like markup
    (`tags=[bold]`) are printed so that they can be copied: one line each, every character kept."""
    from fewzero.summary import print_summary

    monkeypatch.setenv("COLUMNS", "40")
    run = tmp_path / ("2026-12-06_04-44-40_791866_dataset.split.unseen=[Bassoon,Viola],tags=[bold],"
                      "model.pitch_prior.class_cv=true")
    checkpoint = run / "checkpoints" / "step001250-val_acc0.9422.ckpt"
    print_summary(run, {"checkpoint": str(checkpoint)})
    lines = capsys.readouterr().out.splitlines()
    assert f"run directory : {run}" in lines
    assert f"metrics       : {run / 'metrics.json'}" in lines
    assert f"checkpoint    : {checkpoint}" in lines
    assert f"tensorboard   : tensorboard --logdir {run / 'tensorboard'}" in lines
    assert "plots         : -" in lines  # no plots folder (model.plot_dir=null): none is named
    (run / "plots").mkdir(parents=True)
    print_summary(run, {"checkpoint": str(checkpoint)})
    assert f"plots         : {run / 'plots'}" in capsys.readouterr().out.splitlines()


def test_runs_whose_rendered_data_came_from_two_fluidsynth_versions_are_named(tmp_path):
    """Runs gathered from two hosts: one render config, audio from FluidSynth 2.2.5 and 2.3.1."""
    def rendered(fingerprint, version):
        return {"dir": f"/data/{fingerprint}", "fingerprint": fingerprint,
                "fluidsynth": {"libfluidsynth": version, "pyfluidsynth": "1.3.4"}}

    _run(tmp_path, "0", ["seed=0"], {"val/acc_best": 0.7}, rendered("abc", "2.3.1"))
    _run(tmp_path, "1", ["seed=1"], {"val/acc_best": 0.8}, rendered("abc", "2.2.5"))
    _run(tmp_path, "2", ["seed=2"], {"val/acc_best": 0.8}, rendered("abc", "2.3.1"))
    # another render config, one version: nothing to say about it
    _run(tmp_path, "3", ["dataset.source.seed=1"], {"val/acc_best": 0.6}, rendered("def", "2.3.1"))
    _run(tmp_path, "4", ["seed=4"], {"val/acc_best": 0.6})  # no rendered data (e.g. TinySOL)
    main([str(tmp_path)])
    markdown = (tmp_path / "report.md").read_text()
    assert ("Rendered data abc came from 2 FluidSynth versions, which render different audio"
            in markdown)
    assert f"- FluidSynth 2.2.5: {tmp_path / '1'}\n" in markdown
    assert f"- FluidSynth 2.3.1: {tmp_path / '0'}, {tmp_path / '2'}\n" in markdown
    assert "def" not in markdown.split("Rendered data", 1)[1]
    # nor are they averaged: a row per render, and one for the run without rendered data
    assert "| (defaults) [data abc, FluidSynth 2.3.1; tested the last weights] | 2 | 0.7500" in markdown
    assert "| (defaults) [data abc, FluidSynth 2.2.5; tested the last weights] | 1 | 0.8000" in markdown
    assert "| (defaults) [tested the last weights] | 1 | 0.6000" in markdown

    (tmp_path / "1" / "metrics.json").write_text(json.dumps(  # all from one version: no note
        {"metrics": {"val/acc_best": 0.8}, "data": rendered("abc", "2.3.1")}))
    (tmp_path / "4" / "metrics.json").unlink()
    main([str(tmp_path), "--metric", "val/acc_best"])
    markdown = (tmp_path / "report.md").read_text()
    assert "FluidSynth" not in markdown and "| (defaults) | 3 | 0.7667 ± 0.0577 |" in markdown


def test_runs_of_one_configuration_on_other_renders_or_checkpoints_are_not_averaged(tmp_path):
    """Same overrides, another render config (a SoundFont of another package version), or
    evaluations of last.ckpt beside those of the selected checkpoint: rows of their own. One
    checkpoint evaluated twice alike counts twice: said."""
    data = {"fingerprint": "aaa", "fluidsynth": {"libfluidsynth": "2.3.1"}}
    _run(tmp_path, "0", ["seed=0"], {"val/acc_best": 0.6}, data)
    _run(tmp_path, "1", ["seed=1"], {"val/acc_best": 0.8}, {**data, "fingerprint": "bbb"})
    configs, _ = collect(tmp_path)
    assert sorted(c.label for c in configs) == [
        "(defaults) [data aaa, FluidSynth 2.3.1; tested the last weights]",
        "(defaults) [data bbb, FluidSynth 2.3.1; tested the last weights]"]

    evaluations = tmp_path / "evals"
    for name, checkpoint in (("a", "/r/seed0/checkpoints/last.ckpt"),
                             ("b", "/r/seed0/checkpoints/step000250-val_acc0.8000.ckpt"),
                             ("c", "/r/seed1/checkpoints/step000500-val_acc0.7000.ckpt"),
                             ("d", "/r/seed1/checkpoints/step000500-val_acc0.7000.ckpt")):
        _run(evaluations, name, ["dataset.split.test=[X]"], {"test/acc": 0.5})
        report = json.loads((evaluations / name / "metrics.json").read_text())
        (evaluations / name / "metrics.json").write_text(json.dumps({**report, "checkpoint": checkpoint}))
    configs, _ = collect(evaluations)
    runs = {c.label: [run.name for run in c.runs] for c in configs}
    assert runs == {"dataset.split.test=[X] [tested last.ckpt]": ["a"],
                    "dataset.split.test=[X] [tested the validation-selected checkpoint]": ["b", "c", "d"]}
    main([str(evaluations), "--metric", "test/acc"])
    assert (f"/r/seed1/checkpoints/step000500-val_acc0.7000.ckpt was tested by 2 runs of "
            "dataset.split.test=[X] [tested the validation-selected checkpoint], each counted in its "
            f"mean and spread: {evaluations / 'c'}, {evaluations / 'd'}"
            ) in (evaluations / "report.md").read_text()


def test_keys_a_run_directory_name_leaves_out_make_no_other_configuration(tmp_path):
    """Two runs of one setting, with their data and logs elsewhere: one configuration, as their
    directory names say. A run a script made (no hydra.yaml) keeps every key but ckpt_path."""
    for name, where in (("0", "/a"), ("1", "/b")):
        _run(tmp_path, name, ["model/backbone=a", f"paths.data_dir={where}", f"seed={name}"],
             {"val/acc": 0.5})
        (tmp_path / name / ".hydra" / "hydra.yaml").write_text(
            "hydra:\n  job:\n    config:\n      override_dirname:\n"
            "        exclude_keys: [ckpt_path, paths.data_dir, paths.log_dir]\n")
    _run(tmp_path, "2", ["model/backbone=a", "paths.data_dir=/c", "ckpt_path=last"], {"val/acc": 0.5})
    configs, _ = collect(tmp_path)
    assert sorted((c.name, len(c.runs)) for c in configs) == [
        ("model/backbone=a", 2), ("model/backbone=a,paths.data_dir=/c", 1)]
