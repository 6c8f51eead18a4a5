import math

import pytest
import torch
from torch import nn

from fewzero.data.episodes import EpisodeSampler
from fewzero.evaluation import EpisodeResults, evaluate_episodes
from fewzero.models.protonet import (
    Distance,
    PrototypicalNetwork,
    WithinClassWhitening,
    class_prototypes,
)


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
    # std (unbiased) of [.6,.8,1,.6] = 0.19149; Student's t(3) 0.975-quantile 3.18245 (tables);
    # 3.18245 * 0.19149 / 2 = 0.30470
    assert r.mean == pytest.approx(0.75)
    assert r.ci95 == pytest.approx(0.304701, abs=1e-5)
    many = EpisodeResults(torch.tensor([0.0, 1.0] * 500), torch.zeros(1, 1))  # t(999) 1.96234
    assert many.ci95 == pytest.approx(1.96234 * 0.5002502 / math.sqrt(1000), abs=1e-6)


@pytest.mark.parametrize("support_weight", [None, 0.0, 0.5])  # None: no whitening
def test_embed_once_evaluation_equals_per_episode_forward(support_weight):
    torch.manual_seed(2)
    labels = torch.arange(4).repeat_interleave(6)
    clips = torch.randn(24, 3, 5) + labels[:, None, None] * 0.5
    backbone = nn.Sequential(Flatten(), nn.Linear(15, 8), nn.BatchNorm1d(8)).eval()
    sampler = EpisodeSampler(labels, range(4), list("abcd"), 3, 2, 3, seed=4)
    whitening = None
    if support_weight is not None:
        whitening = WithinClassWhitening(8, shrinkage=0.1, length_norm=True,
                                         support_weight=support_weight)
        with torch.no_grad():
            whitening.fit(backbone(torch.randn(40, 3, 5)), torch.arange(40) % 4)
    net = PrototypicalNetwork(backbone, Distance(), whitening)
    with torch.no_grad():
        results = evaluate_episodes(backbone(clips), sampler, 20, net.distance, 4, whitening)
        for i in range(20):
            ep = sampler.episode(i)
            net.process_support_set(clips[ep.support.flatten()],
                                    torch.arange(3).repeat_interleave(2))
            pred = net(clips[ep.query.flatten()]).argmax(dim=1)
            acc = (pred == torch.arange(3).repeat_interleave(3)).float().mean()
            assert results.accuracies[i] == pytest.approx(float(acc))
    assert results.confusion.sum() == 20 * 9
    threads = torch.get_num_threads()
    drawn = [sampler.episode(i) for i in range(20)]  # as the whitening choice passes them
    again = evaluate_episodes(backbone(clips).detach(), sampler, 20, net.distance, 4, whitening, drawn)
    assert torch.equal(again.accuracies, results.accuracies)
    assert torch.equal(again.confusion, results.confusion)
    assert torch.get_num_threads() == threads  # scoring's single thread is given back


def test_episode_confusion_rows_are_true_classes_and_columns_predicted_ones():
    # ids 1 and 2 of 3; class 2's second clip lies on class 1's clips, so a class-2 query is called
    # 1 whenever the other clip is the support; a class-1 query is never called 2
    labels = torch.tensor([0, 1, 1, 2, 2])
    embeddings = torch.tensor([[50.0], [0.0], [0.0], [10.0], [0.1]])
    sampler = EpisodeSampler(labels, [1, 2], ["b", "c"], 2, 1, 1, seed=0)
    results = evaluate_episodes(embeddings, sampler, 20, Distance(), 3)
    confusion = results.confusion
    wrong = int(confusion[2, 1])
    assert 0 < wrong < 20  # both supports of class 2 were drawn
    assert confusion.tolist() == [[0, 0, 0], [0, 20, 0], [0, wrong, 20 - wrong]]
    assert results.mean == pytest.approx(1 - wrong / 40)


def _nuisance_data(class_axis: int, seed: int, n_per_class: int = 200):
    """Two classes 1 apart along `class_axis`; axis 1 carries a shared nuisance of std 20, as
    pitch spreads every instrument's embeddings the same way. The same rotation for every call.
    Returns (2 * n_per_class, 3) points and their labels (class-major)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(2).repeat_interleave(n_per_class)
    x = torch.randn(2 * n_per_class, 3, generator=g) * 0.2
    x[:, 1] += 20 * torch.randn(2 * n_per_class, generator=g)
    x[:, class_axis] += labels.float()
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(7)))[0]
    return x @ rotation, labels


def test_whitening_makes_the_within_class_covariance_the_identity():
    x, labels = _nuisance_data(class_axis=0, seed=0)
    whitening = WithinClassWhitening(dim=3, shrinkage=1e-9)
    assert torch.equal(whitening(x), x)  # identity until fitted
    whitening.fit(x, labels)
    z = whitening(x)
    centred = torch.cat([z[labels == c] - z[labels == c].mean(0) for c in (0, 1)])
    covariance = centred.T @ centred / (len(z) - 2)
    assert torch.allclose(covariance, torch.eye(3), atol=1e-3)


def test_whitening_fitted_on_training_classes_helps_new_classes_with_the_same_nuisance():
    train_x, train_labels = _nuisance_data(class_axis=0, seed=0)
    test_x, test_labels = _nuisance_data(class_axis=2, seed=1)  # new classes, other axis
    whitening = WithinClassWhitening(dim=3, shrinkage=0.01)
    whitening.fit(train_x, train_labels + 5)  # class ids do not matter
    prototypes = torch.stack([test_x[test_labels == c][:5].mean(0) for c in (0, 1)])  # 5-shot

    def accuracy(transform):
        logits = Distance()(transform(test_x), transform(prototypes))
        return float((logits.argmax(1) == test_labels).float().mean())

    assert accuracy(lambda z: z) < 0.75 < 0.95 < accuracy(whitening)


def test_whitening_with_length_norm_gives_unit_vectors_in_the_same_directions():
    x, labels = _nuisance_data(class_axis=0, seed=0)
    plain = WithinClassWhitening(dim=3, shrinkage=0.5)
    normed = WithinClassWhitening(dim=3, shrinkage=0.5, length_norm=True)
    plain.fit(x, labels)
    normed.fit(x, labels)
    z, z_plain = normed(x), plain(x)
    assert torch.allclose(z.norm(dim=1), torch.ones(len(x)), atol=1e-5)
    assert torch.allclose(z * z_plain.norm(dim=1, keepdim=True), z_plain, atol=1e-4)
    assert torch.equal(normed(torch.zeros(2, 3)), torch.zeros(2, 3))  # unused rows stay zero


def test_changing_the_shrinkage_after_fit_equals_fitting_with_it():
    x, labels = _nuisance_data(class_axis=0, seed=0)
    refitted, changed = WithinClassWhitening(dim=3, shrinkage=4.0), WithinClassWhitening(dim=3)
    refitted.fit(x, labels)
    changed.fit(x, labels)
    assert not torch.allclose(changed.matrix, refitted.matrix)
    changed.shrinkage = 4.0
    assert torch.allclose(changed.matrix, refitted.matrix)
    with pytest.raises(ValueError, match="must be positive"):
        changed.shrinkage = 0.0


def test_whitening_rejects_a_single_class_and_a_wrong_size():
    whitening = WithinClassWhitening(dim=3)
    with pytest.raises(ValueError, match="at least two training classes"):
        whitening.fit(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Expected \(n, 3\)"):
        whitening.fit(torch.randn(10, 4), torch.arange(10) % 2)


def _new_nuisance_classes(seed: int, n_per_class: int = 100):
    """Two new classes 1 apart along axis 2 that spread (std 5) along axis 0, a direction in
    which the training classes of `_nuisance_data(class_axis=0)` hardly vary; same rotation.
    Returns (2 * n_per_class, 3) points and labels (class-major)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(2).repeat_interleave(n_per_class)
    x = torch.randn(2 * n_per_class, 3, generator=g) * 0.2
    x[:, 0] += 5 * torch.randn(2 * n_per_class, generator=g)
    x[:, 2] += labels.float()
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(7)))[0]
    return x @ rotation, labels


def test_support_adapted_whitening_learns_a_new_nuisance_from_the_support_set():
    train_x, train_labels = _nuisance_data(class_axis=0, seed=0)
    test_x, test_labels = _new_nuisance_classes(seed=1)
    whitening = WithinClassWhitening(dim=3, shrinkage=0.01)
    whitening.fit(train_x, train_labels)
    sampler = EpisodeSampler(test_labels, [0, 1], ["a", "b"], n_way=2, n_shot=5, n_query=20,
                             seed=0, split="test")

    def accuracy(weight):
        whitening.support_weight = weight
        return evaluate_episodes(test_x, sampler, 50, Distance(), 2, whitening).mean

    assert accuracy(0.0) < 0.6 < 0.9 < accuracy(0.5)
    assert whitening.adapts(5) and not whitening.adapts(1)
    with pytest.raises(ValueError, match="support_weight must be in"):
        whitening.support_weight = 1.5


def test_support_adapted_whitening_matches_the_mixed_covariance_it_stands_for():
    x, labels = _nuisance_data(class_axis=0, seed=0)
    x, labels = x.double(), labels
    whitening = WithinClassWhitening(dim=3, shrinkage=0.5, support_weight=0.3)
    whitening.fit(x, labels)
    support, support_labels = _new_nuisance_classes(seed=3, n_per_class=4)
    support = support.double()
    basis = whitening.adaptation_basis().double()
    adapted = whitening.adapt(support @ basis, support_labels)(x[:50] @ basis)
    # naive: whiten with ((1 - w) C + w k S + ridge I)^-1, written out
    residuals = torch.cat([x[labels == c] - x[labels == c].mean(0) for c in (0, 1)])
    train = residuals.T @ residuals / (len(x) - 2)
    spread = torch.cat([support[support_labels == c] - support[support_labels == c].mean(0)
                        for c in (0, 1)])
    scatter = spread.T @ spread
    mixed = (0.7 * train + 0.3 * scatter * train.trace() / scatter.trace()
             + 0.5 * train.trace() / 3 * torch.eye(3, dtype=x.dtype))
    expected = x[:50] @ torch.linalg.inv(mixed) @ x[:50].T
    assert torch.allclose(adapted @ adapted.T, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(adapted, whitening(x[:50]), atol=1e-2)  # it did adapt


def test_support_adapted_whitening_only_adapts_with_weight_and_several_shots():
    x, labels = _nuisance_data(class_axis=0, seed=0)
    whitening = WithinClassWhitening(dim=3, shrinkage=0.5, length_norm=True)
    assert not whitening.adapts(5)  # not fitted
    with pytest.raises(RuntimeError, match="Fit the whitening"):
        whitening.adaptation_basis()
    whitening.fit(x, labels)
    assert not whitening.adapts(5)  # weight 0
    assert torch.equal(whitening.adaptation_basis(), whitening.matrix)
    whitening.support_weight = 0.3
    assert whitening.adapts(2) and not whitening.adapts(1)
    # a vanishing weight leaves the fitted whitening
    whitening.support_weight = 1e-9
    basis = whitening.adaptation_basis()
    support, support_labels = x[[0, 1, 200, 201]], torch.tensor([0, 0, 1, 1])
    adapted = whitening.adapt(support @ basis, support_labels)(x[:50] @ basis)
    assert torch.allclose(adapted, whitening(x[:50]), atol=1e-5)
    assert torch.allclose(adapted.norm(dim=1), torch.ones(50), atol=1e-5)


def test_prototypes_reject_labels_that_do_not_match_the_support():
    with pytest.raises(ValueError, match="5 support embeddings but 4 labels"):
        class_prototypes(torch.randn(5, 3), torch.tensor([0, 1, 2, 0]), 3)
    with pytest.raises(ValueError, match="cover exactly"):  # a label beyond n_way
        class_prototypes(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), 3)


def test_sq_euclidean_logits_are_negative_squared_distances():
    g = torch.Generator().manual_seed(0)
    queries, prototypes = torch.randn(6, 4, generator=g), torch.randn(3, 4, generator=g)
    expected = -(queries[:, None] - prototypes[None]).square().sum(dim=-1)
    torch.testing.assert_close(Distance()(queries, prototypes), expected)


def test_cosine_logits_are_scaled_cosine_similarities_whatever_the_norms():
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(6, 4, generator=g) * torch.rand(6, 1, generator=g) * 10
    prototypes = torch.randn(3, 4, generator=g) * torch.tensor([[0.1], [1.0], [7.0]])
    distance = Distance("cosine", scale=5.0)
    expected = 5.0 * nn.functional.cosine_similarity(queries[:, None], prototypes[None], dim=-1)
    torch.testing.assert_close(distance(queries, prototypes), expected)


def test_only_a_learned_cosine_scale_is_a_trainable_parameter():
    """A trainable parameter that no loss reaches breaks DDP."""
    assert Distance("cosine").log_scale.requires_grad
    assert not Distance("cosine", learn_scale=False).log_scale.requires_grad
    assert not Distance("sq_euclidean").log_scale.requires_grad


def test_whitening_rejects_one_clip_per_class():
    with pytest.raises(ValueError, match="several clips of at least two training classes"):
        WithinClassWhitening(dim=3).fit(torch.randn(4, 3), torch.arange(4))


def test_a_one_shot_support_after_an_adapted_episode_is_not_adapted_to_the_old_support():
    x, labels = _nuisance_data(class_axis=0, seed=0)
    whitening = WithinClassWhitening(dim=3, shrinkage=0.1, support_weight=0.5)
    whitening.fit(x, labels)
    support, support_labels = _new_nuisance_classes(seed=1, n_per_class=3)
    queries = support + 0.1
    used = PrototypicalNetwork(nn.Identity(), Distance(), whitening)
    used.process_support_set(support, support_labels)  # 3-shot: adapted to this support
    one_shot, one_shot_labels = support[[0, 3]], torch.tensor([0, 1])
    used.process_support_set(one_shot, one_shot_labels)
    fresh = PrototypicalNetwork(nn.Identity(), Distance(), whitening)
    fresh.process_support_set(one_shot, one_shot_labels)
    torch.testing.assert_close(used(queries), fresh(queries))


def test_episode_scoring_gives_back_the_callers_thread_count():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        labels = torch.arange(2).repeat_interleave(3)
        sampler = EpisodeSampler(labels, [0, 1], ["a", "b"], 2, 1, 1, seed=0)
        evaluate_episodes(torch.randn(6, 4), sampler, 3, Distance(), 2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_the_whitening_fit_gives_back_the_callers_thread_count():
    """The eigen-decomposition runs on one thread (fewzero.threads.one_thread); the caller's
    count comes back, and the fit is the one a caller on one thread gets."""
    embeddings, labels = torch.randn(40, 16, dtype=torch.float64), torch.arange(4).repeat_interleave(10)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = WithinClassWhitening(16)
        alone.fit(embeddings, labels)
        torch.set_num_threads(2)
        whitening = WithinClassWhitening(16)
        whitening.fit(embeddings, labels)
        assert torch.get_num_threads() == 2
        assert torch.equal(whitening.matrix, alone.matrix)
    finally:
        torch.set_num_threads(threads)
