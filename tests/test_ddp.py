"""Lightning DDP on CPU: two gloo processes launched by the real command line."""

import json
import subprocess
import sys
from types import SimpleNamespace

import hydra
import pytest
import torch
from conftest import compose_train_cfg

from fewzero.data.clips import TINYSOL_INSTRUMENTS


def _process(rank: int, steps_done: int, world: int = 2) -> SimpleNamespace:
    """What the datamodules read of a Lightning trainer, for process `rank` of `world`."""
    return SimpleNamespace(world_size=world, global_rank=rank, global_step=steps_done)


def _datamodule(tmp_path, overrides):
    dm = hydra.utils.instantiate(compose_train_cfg(tmp_path, overrides).dataset)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _stream(dm, rank: int, world: int, epochs: int, per_epoch: int, key: str) -> list[torch.Tensor]:
    """`key` of every training item process `rank` reads over `epochs` epochs of `per_epoch`
    steps, each epoch starting where the steps before it left the stream (as in training)."""
    items = []
    for epoch in range(epochs):
        dm.trainer = _process(rank, steps_done=per_epoch * epoch, world=world)
        loader = dm.train_dataloader()
        assert len(loader) == per_epoch  # an epoch is as many optimiser steps in any case
        items += [batch[key] for batch in loader]
    return items


def test_ddp_processes_share_each_epochs_training_episodes_without_repeats(tmp_path):
    dm = _datamodule(tmp_path, ["dataset.episodes.train.n_episodes=4"])
    single = _stream(dm, 0, world=1, epochs=4, per_epoch=4, key="query")  # episodes 0-15
    for rank in (0, 1):  # step k of rank r: episode 2k + r of the one stream
        shares = _stream(dm, rank, world=2, epochs=2, per_epoch=4, key="query")
        assert len(shares) == 8
        for step, episode in enumerate(shares):
            assert torch.equal(episode, single[2 * step + rank])


def test_ddp_processes_share_each_epochs_zero_shot_batches_without_repeats(tmp_path):
    dm = _datamodule(tmp_path, ["experiment=zsl_attribute_audio", "dataset.batch_size=3",
                                "dataset.steps_per_epoch=2"])
    single = torch.cat(_stream(dm, 0, world=1, epochs=4, per_epoch=2, key="x"))  # items 0-23
    for rank in (0, 1):  # rank r reads items r, r + 2, ... of the one stream
        shares = torch.cat(_stream(dm, rank, world=2, epochs=2, per_epoch=2, key="x"))
        assert torch.equal(shares, single[rank::2])


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
    # re-evaluated with the run's two processes, into the one directory the command chose
    evaluated = subprocess.run([sys.executable, "-m", "fewzero.eval",
                                f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"],
                               capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    outputs = list((tmp_path / "outputs" / "eval" / "runs").iterdir())
    assert len(outputs) == 1 and (outputs[0] / "metrics.json").is_file()
