import pytest
import torch
from torch import nn

from fewzero.data.episodes import EpisodeSampler
from fewzero.evaluation import EpisodeResults, evaluate_episodes
from fewzero.models.protonet import Distance, PrototypicalNetwork, class_prototypes


def test_prototypes_match_a_naive_loop_for_unsorted_unbalanced_support():
    torch.manual_seed(0)
    labels = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 1, 2])
    emb = torch.randn(10, 7)
    expected = torch.stack([emb[labels == k].mean(dim=0) for k in range(3)])
    assert torch.allclose(class_prototypes(emb, labels, 3), expected, atol=1e-6)


def test_prototypes_reject_a_missing_class():
    with pytest.raises(ValueError, match="cover exactly"):
        class_prototypes(torch.randn(4, 3), torch.tensor([0, 0, 2, 2]), 3)


class Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)


@pytest.mark.parametrize("kind", ["sq_euclidean", "cosine"])
def test_identity_backbone_with_query_equal_to_support_is_perfect(kind):
    torch.manual_seed(1)
    support = torch.randn(5, 4, 6)  # 5-way 1-shot: each prototype is its support clip
    order = torch.tensor([3, 0, 4, 1, 2])  # unsorted labels
    net = PrototypicalNetwork(Flatten(), Distance(kind))
    net.process_support_set(support[order], order)  # clip support[k] has label k
    logits = net(support)  # queries == support clips
    assert logits.shape == (5, 5)
    assert torch.equal(logits.argmax(dim=1), torch.arange(5))


def test_forward_before_support_raises():
    with pytest.raises(RuntimeError, match="process_support_set"):
        PrototypicalNetwork(Flatten(), Distance())(torch.randn(2, 3, 4))


def test_cosine_scale_multiplies_similarity():
    d = Distance("cosine", scale=5.0)
    q, p = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(d(q, p), torch.tensor([[5.0, 0.0]]), atol=1e-5)


def test_confidence_interval_matches_hand_computation():
    acc = torch.tensor([0.6, 0.8, 1.0, 0.6])
    r = EpisodeResults(acc, torch.zeros(1, 1))
    # std (unbiased) of [.6,.8,1,.6] = 0.19149; 1.96 * 0.19149 / 2 = 0.18766
    assert r.mean == pytest.approx(0.75)
    assert r.ci95 == pytest.approx(0.187661, abs=1e-5)


def test_embed_once_evaluation_equals_per_episode_forward():
    torch.manual_seed(2)
    labels = torch.arange(4).repeat_interleave(6)
    clips = torch.randn(24, 3, 5) + labels[:, None, None] * 0.5
    backbone = nn.Sequential(Flatten(), nn.Linear(15, 8), nn.BatchNorm1d(8)).eval()
    sampler = EpisodeSampler(labels, range(4), list("abcd"), 3, 2, 3, seed=4)
    net = PrototypicalNetwork(backbone, Distance())
    with torch.no_grad():
        results = evaluate_episodes(backbone(clips), sampler, 20, net.distance, 4)
        for i in range(20):
            ep = sampler.episode(i)
            net.process_support_set(clips[ep.support.flatten()],
                                    torch.arange(3).repeat_interleave(2))
            pred = net(clips[ep.query.flatten()]).argmax(dim=1)
            acc = (pred == torch.arange(3).repeat_interleave(3)).float().mean()
            assert results.accuracies[i] == pytest.approx(float(acc))
    assert results.confusion.sum() == 20 * 9
