import json

import pytest

from fewzero.report import collect, main


def _run(root, name, overrides, metrics):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps({"metrics": metrics}))


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
    assert rows[0].startswith("| model/backbone=b | 1 | 0.9000")  # best first
    assert "0.7000 ± 0.1414" in rows[1]
    assert "1 run(s) without metrics.json" in markdown
    assert (tmp_path / "report.csv").read_text().count("\n") == 3
    assert (tmp_path / "report.png").stat().st_size > 0
    assert "written:" in capsys.readouterr().out


@pytest.mark.slow
def test_a_failing_multirun_job_is_reported_and_the_others_finish(tmp_path):
    import subprocess
    import sys

    from fewzero.data.clips import TINYSOL_INSTRUMENTS

    sweep = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "fewzero.train", "-m", "dataset/source=tones",
        f"dataset.source.instruments=[{','.join(TINYSOL_INSTRUMENTS)}]", "debug=fast",
        f"paths.root_dir={tmp_path}", "dataset.episodes.val.n_query=5", "~callbacks.progress_bar",
        "dataset.episodes.val.n_way=3,9",  # 9 > the 3 validation classes: the second job fails
        f"hydra.sweep.dir={sweep}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    configs, failed = collect(sweep)
    assert len(configs) == 1 and len(failed) == 1
    assert "n_way=9 is larger than the 3 val classes" in (failed[0] / "failed.txt").read_text()
