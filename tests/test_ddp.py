"""How DDP processes share the training streams, and resume on another number of them. The
two-process run started by the real command line is in test_resume.py."""

from types import SimpleNamespace

import hydra
import pytest
import torch
from conftest import compose_train_cfg
from pytorch_lightning.trainer.states import TrainerFn


def _process(rank: int, steps_done: int, world: int = 2) -> SimpleNamespace:
    """What the datamodules read of a fitting Lightning trainer, for process `rank` of `world`."""
    return SimpleNamespace(world_size=world, global_rank=rank, global_step=steps_done,
                           state=SimpleNamespace(fn=TrainerFn.FITTING))


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


@pytest.mark.parametrize("before, after", [(1, 2), (2, 1)])
def test_a_resume_on_another_number_of_processes_reads_on_where_the_checkpoint_stopped(
        tmp_path, caplog, before, after):
    dm = _datamodule(tmp_path, ["dataset.episodes.train.n_episodes=4"])
    single = _stream(dm, 0, world=1, epochs=4, per_epoch=4, key="query")  # episodes 0-15
    dm.trainer = _process(0, steps_done=3, world=before)
    saved = dm.state_dict()  # 3 steps of `before` processes: episodes 0 to 3 * before - 1
    assert saved["stream_items_read"] == 3 * before
    for rank in range(after):
        dm.restart_stream()
        dm.trainer = _process(rank, steps_done=3, world=after)
        with caplog.at_level("WARNING", logger="fewzero.data.datamodule"):
            dm.load_state_dict(saved)
        assert f"the checkpointed run {before}" in caplog.text
        read = [batch["query"] for batch in dm.train_dataloader()]
        for step, episode in enumerate(read):  # step k of rank r: episode 3b + k * a + r
            assert torch.equal(episode, single[3 * before + step * after + rank])
        dm.trainer = _process(rank, steps_done=3 + 2, world=after)  # the next checkpoint
        assert dm.state_dict()["stream_items_read"] == 3 * before + 2 * after


def test_a_zero_shot_refit_reads_its_stream_from_the_start_after_the_main_fit_resumed(tmp_path):
    dm = _datamodule(tmp_path, ["experiment=zsl_attribute_audio", "dataset.batch_size=3"])
    dm.trainer = _process(0, steps_done=5, world=1)  # checkpointed by 2 processes, resumed on 1
    dm.load_state_dict({"stream_items_read": 30, "global_step": 5, "items_per_step": 6})
    assert dm.stream_start() == 30
    refit = dm.for_trainval()
    refit.trainer = _process(0, steps_done=0, world=1)  # a new trainer, its steps from 0
    assert refit.stream_start() == 0 and dm.stream_start() == 30
