"""Lightning DDP on CPU: two gloo processes launched by the real command line."""

import json
import subprocess
import sys

import pytest

from fewzero.data.clips import TINYSOL_INSTRUMENTS


@pytest.mark.slow
def test_two_process_cpu_ddp_trains_and_tests(tmp_path):
    names = ",".join(TINYSOL_INSTRUMENTS)
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "fewzero.train", "dataset/source=tones",
        f"dataset.source.instruments=[{names}]",
        "debug=fast", f"paths.root_dir={tmp_path}",
        "dataset.episodes.val.n_query=5", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "~callbacks.progress_bar", f"hydra.run.dir={run}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Starting with 2 processes" in done.stdout + done.stderr
    report = json.loads((run / "metrics.json").read_text())
    assert report["test_episodes"]["5way_5shot"]["n_episodes"] == 5
    assert (run / "checkpoints" / "last.ckpt").is_file()
