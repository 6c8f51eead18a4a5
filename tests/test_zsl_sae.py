"""Heads and losses for feature-based zero-shot benchmarks: SAE, SJE/ALE ranking, identity encoder."""

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import compose_train_cfg
from torch.nn import functional as F

from fewzero.models.backbones import IdentityEncoder
from fewzero.models.zsl_heads import SaeHead, solve_symmetric_sylvester
from fewzero.models.zsl_losses import RankingLoss
from fewzero.train import train


def test_sae_solves_its_sylvester_equation_like_scipy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64)
    labels = torch.arange(4).repeat(10)
    side = torch.randn(4, 3, generator=g, dtype=torch.float64)
    head = SaeHead(8, 3, lam=0.5).double()
    head.fit(x, labels, side)
    xn, s = F.normalize(x, dim=-1).T.numpy(), side[labels].T.numpy()
    a, b, c = s @ s.T, 0.5 * xn @ xn.T, 1.5 * s @ xn.T
    np.testing.assert_allclose(head.weight.numpy(), scipy.linalg.solve_sylvester(a, b, c), atol=1e-10)
    w = solve_symmetric_sylvester(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c))
    np.testing.assert_allclose((a @ w.numpy() + w.numpy() @ b), c, atol=1e-10)


@pytest.mark.parametrize("direction", ["f2s", "s2f"])
def test_sae_recognises_unseen_classes_when_features_are_a_linear_map_of_attributes(direction):
    g = torch.Generator().manual_seed(1)
    side = F.normalize(torch.randn(8, 5, generator=g), dim=1)
    mapping = torch.randn(5, 20, generator=g)
    labels = torch.arange(8).repeat(15)
    audio = side[labels] @ mapping + 0.01 * torch.randn(120, 20, generator=g)
    head = SaeHead(20, 5, lam=1.0, direction=direction)
    train = labels < 5
    head.fit(audio[train], labels[train], side[:5])
    predicted = head(audio[~train], side[5:]).argmax(dim=1) + 5
    assert (predicted == labels[~train]).float().mean() == 1.0


def test_ranking_loss_reductions_sum_max_and_rank_weighted():
    scores = torch.tensor([[0.5, 0.45, 0.2, 0.6], [0.9, 0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 0])  # row 0 violates by 0.05 and 0.2; row 1 by nothing
    for reduction, expected in (("sum", 0.25 / 2), ("max", 0.2 / 2), ("warp", 0.25 * 1.5 / 2 / 2)):
        loss = RankingLoss(0.1, reduction)(scores, targets)
        torch.testing.assert_close(loss, torch.tensor(expected))
    with pytest.raises(ValueError, match="reduction"):
        RankingLoss(reduction="mean")


def test_identity_encoder_checks_the_feature_size():
    x = torch.randn(3, 16)
    assert IdentityEncoder(16)(x) is x
    with pytest.raises(ValueError, match="dataset.feature_dim"):
        IdentityEncoder(2048)(x)


def test_sae_stays_finite_when_both_gram_matrices_are_singular():
    head = SaeHead(20, 3, lam=1.0)  # 5 samples of 2 classes: rank-deficient on both sides
    head.fit(torch.randn(5, 20), torch.tensor([0, 1, 0, 1, 0]), torch.randn(2, 3))
    assert torch.isfinite(head.weight).all() and head.weight.abs().sum() > 0


def test_sae_scores_every_class_and_checks_sizes():
    head = SaeHead(8, 3, direction="s2f")
    assert head(torch.randn(5, 8), torch.randn(6, 3)).shape == (5, 6)
    with pytest.raises(ValueError, match="side_info.dim"):
        head(torch.randn(5, 8), torch.randn(6, 4))
    with pytest.raises(ValueError, match="direction"):
        SaeHead(8, 3, direction="both")


def test_sae_is_a_model_choice_for_the_audio_experiments_too(tmp_path):
    metrics, objects = train(compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio", "model=sae",
                                                          "model.pitch_prior=null"]))
    assert float(objects["model"].head.weight.abs().sum()) > 0
    assert not any(p.requires_grad for p in objects["model"].backbone.parameters())
    assert 0.0 <= metrics["test/zsl_top1"] <= 1.0


def test_a_frozen_encoder_left_at_its_random_weights_is_warned_about(tmp_path, caplog):
    import hydra

    from fewzero.train import compose_train_config

    overrides = ["experiment=zsl_attribute_audio", "model=eszsl", "model.pitch_prior=null"]
    hydra.utils.instantiate(compose_train_cfg(tmp_path, overrides).model)
    assert "model.init_checkpoint is null" in caplog.text and "random initial weights" in caplog.text
    caplog.clear()
    hydra.utils.instantiate(compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio"]).model)
    assert "random initial weights" not in caplog.text  # an encoder that trains: nothing to say
    hydra.utils.instantiate(compose_train_config(["experiment=xlsa17_sae"], tmp_path / "run").model)
    assert "random initial weights" not in caplog.text  # xlsa17's identity encoder has no weights
