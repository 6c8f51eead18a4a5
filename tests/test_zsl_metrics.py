"""ZSL/GZSL metrics, losses and heads against hand-computed cases."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fewzero.models.zsl_heads import BilinearHead, ConseHead, DeviseHead, EszslHead, SiameseHead
from fewzero.models.zsl_losses import InfoNCELoss, RankingLoss, TripletLoss
from fewzero.zsl_evaluation import (
    _gzsl_for,
    calibrate_stacking,
    evaluate_zsl,
    gzsl_score,
    harmonic_mean,
    harmonic_mean_ci95,
    per_class_accuracy,
    per_class_accuracy_ci95,
    predict,
    stacking_predictions,
    topk_accuracy,
    true_class_log_likelihood,
)

SEEN, UNSEEN = [0, 1], [2, 3]
# Seen-minus-unseen margins of the four samples: 0.4, 0.1, 0.2, 0.05.
SCORES = torch.tensor([[0.9, 0.1, 0.5, 0.0],    # seen class 0
                       [0.2, 0.8, 0.7, 0.0],    # seen class 1
                       [0.6, 0.0, 0.4, 0.1],    # unseen class 2
                       [0.0, 0.3, 0.0, 0.25]])  # unseen class 3
LABELS = torch.tensor([0, 1, 2, 3])


def test_accuracy_is_averaged_per_class_not_per_sample():
    correct = torch.tensor([True, True, False, False])
    labels = torch.tensor([0, 0, 0, 1])
    assert float(per_class_accuracy(correct, labels)) == pytest.approx((2 / 3 + 0) / 2)


def test_true_class_log_likelihood_by_hand_per_class_and_at_the_best_temperature():
    scores = torch.tensor([[2.0, 0.0, 9.0], [0.0, 1.0, 9.0], [1.0, 1.0, 9.0]])  # column 2 not a candidate
    labels = torch.tensor([0, 0, 1])
    p = [math.log(math.exp(2) / (math.exp(2) + 1)), math.log(1 / (1 + math.e)), math.log(0.5)]
    expected = ((p[0] + p[1]) / 2 + p[2]) / 2  # class 0's two clips averaged first
    one = torch.tensor([1.0])
    assert true_class_log_likelihood(scores, labels, [0, 1], one) == pytest.approx(expected)
    # the best of several temperatures; T = 2 halves every score
    halved = ((math.log(math.e / (math.e + 1)) + math.log(1 / (1 + math.exp(0.5)))) / 2 + math.log(0.5)) / 2
    assert true_class_log_likelihood(scores, labels, [0, 1], torch.tensor([2.0, 1.0])) == pytest.approx(
        max(expected, halved))
    # with the default temperatures the score does not depend on the scores' scale (where the
    # best temperature lies inside the grid: mostly right, one clip wrong)
    mostly = torch.tensor([[0.2, 0.0], [0.3, 0.0], [0.0, 0.1], [0.0, 0.4]])
    two = torch.tensor([0, 0, 0, 1])
    for stretch in (10, 100, 300):  # e.g. a pitch prior's log-likelihood at a large weight
        assert true_class_log_likelihood(stretch * mostly, two, [0, 1]) == pytest.approx(
            true_class_log_likelihood(mostly, two, [0, 1]), abs=1e-3), stretch
    assert true_class_log_likelihood(mostly, two, [0, 1]) > math.log(0.5)  # better than a coin
    with pytest.raises(ValueError, match="every label must be one of the candidates"):
        true_class_log_likelihood(scores, torch.tensor([0, 0, 2]), [0, 1])


def test_topk_only_considers_the_candidate_classes():
    scores = torch.tensor([[9.0, 0, 1, 0], [0, 9, 5, 1]])
    labels = torch.tensor([2, 3])
    assert topk_accuracy(scores, labels, [2, 3], k=1) == pytest.approx(0.5)
    assert topk_accuracy(scores, labels, [2, 3], k=2) == pytest.approx(1.0)
    assert topk_accuracy(scores, labels, [0, 1, 2, 3], k=1) == pytest.approx(0.0)


def test_tied_scores_go_to_the_first_candidate_alike_in_zsl_top_k_and_gzsl():
    """`topk` orders ties as it likes (index 6 of 8 equal scores on CPU); every prediction takes
    the first best in candidate order, as GZSL's `max` does."""
    scores = torch.zeros(2, 20)
    scores[1, [4, 9]] = 1.0
    assert predict(scores, range(20), k=3).tolist() == [[0, 1, 2], [4, 9, 0]]
    assert predict(scores, [9, 4, 7], k=2).tolist() == [[9, 4], [9, 4]]
    assert stacking_predictions(scores, [5, 6], [3, 2], gamma=0.5).tolist() == [3, 3]
    assert stacking_predictions(scores, [5, 6], [3, 2], gamma=-0.5).tolist() == [5, 5]
    assert predict(scores[:, :8], range(8)).flatten().tolist() == [0, 4]


def test_per_class_accuracy_interval_by_hand():
    # class 0: 3 of 4 right (p 0.75, n 4); class 1: 1 of 2 (p 0.5, n 2)
    correct = torch.tensor([True, True, True, False, True, False])
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    expected = 1.96 * math.sqrt(0.75 * 0.25 / 4 + 0.5 * 0.5 / 2) / 2
    assert per_class_accuracy_ci95(correct, labels) == pytest.approx(expected)
    assert per_class_accuracy_ci95(torch.ones(5, dtype=torch.bool), torch.tensor([0, 0, 1, 1, 1])) == 0.0
    no_clip = torch.zeros(0, dtype=torch.long)
    assert math.isnan(per_class_accuracy_ci95(no_clip.bool(), no_clip))


def test_per_class_accuracy_interval_covers_the_true_accuracy_about_95_percent_of_the_time():
    generator = torch.Generator().manual_seed(0)
    truth = torch.tensor([0.3, 0.6, 0.9])  # per-class accuracies of an imagined classifier
    labels = torch.arange(3).repeat_interleave(torch.tensor([80, 150, 60]))
    covered = 0
    for _ in range(2000):
        correct = torch.rand(len(labels), generator=generator) < truth[labels]
        estimate = float(per_class_accuracy(correct, labels))
        covered += abs(estimate - float(truth.mean())) <= per_class_accuracy_ci95(correct, labels)
    assert 0.93 <= covered / 2000 <= 0.97


def test_harmonic_mean_interval_by_the_delta_method():
    u, s, du, ds = 0.4, 0.8, 0.05, 0.02
    expected = math.sqrt((2 * s**2 / (u + s) ** 2 * du) ** 2 + (2 * u**2 / (u + s) ** 2 * ds) ** 2)
    assert harmonic_mean_ci95(u, du, s, ds) == pytest.approx(expected)
    # numerically: the change of H for a small change of u
    step = 1e-6
    slope = (harmonic_mean(u + step, s) - harmonic_mean(u, s)) / step
    assert harmonic_mean_ci95(u, du, s, 0.0) == pytest.approx(slope * du, rel=1e-4)
    assert harmonic_mean_ci95(0.0, 0.1, 0.0, 0.1) == 0.0


def test_harmonic_mean():
    assert harmonic_mean(0.5, 1.0) == pytest.approx(2 / 3)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_harmonic_mean_of_tensors_is_elementwise_in_their_dtype():
    u, s = torch.tensor([0.5, 0.0, 0.2]), torch.tensor([1.0, 0.0, 0.0])
    h = harmonic_mean(u, s)
    assert h.dtype == torch.float32
    assert h.tolist() == [pytest.approx(2 / 3), 0.0, 0.0]


def test_gzsl_without_penalty_predicts_seen_for_everything_here():
    score = gzsl_score(SCORES, LABELS, SEEN, UNSEEN)
    assert (score.u, score.s, score.h) == (0.0, 1.0, 0.0)


def test_gzsl_with_a_penalty_between_margins():
    score = gzsl_score(SCORES, LABELS, SEEN, UNSEEN, gamma=0.15)
    # 0.15 flips the samples with margins 0.1 (seen 1 -> wrong) and 0.05 (unseen 3 -> right)
    assert (score.u, score.s, score.h) == pytest.approx((0.5, 0.5, 0.5))


def test_calibration_finds_the_best_h_and_prefers_the_smallest_penalty():
    best = calibrate_stacking(SCORES, LABELS, SEEN, UNSEEN)
    # H = 2/3 on (0.05, 0.1) and on (0.2, 0.4); the midpoint closest to 0 wins
    assert best.gamma == pytest.approx(0.075)
    assert (best.u, best.s, best.h) == pytest.approx((0.5, 1.0, 2 / 3))
    grid = [gzsl_score(SCORES, LABELS, SEEN, UNSEEN, g).h for g in np.linspace(-1, 1, 201)]
    assert best.h == pytest.approx(max(grid))


def test_calibration_tie_between_negative_penalties_goes_to_the_smallest_magnitude():
    # SEEN and UNSEEN swapped: the margins become -0.4, -0.1, -0.2, -0.05 and H(gamma) the mirror
    # image of the test above; H = 2/3 on (-0.1, -0.05) and on (-0.4, -0.2): -0.075, not -0.3
    best = calibrate_stacking(SCORES, LABELS, UNSEEN, SEEN)
    assert best.gamma == pytest.approx(-0.075)
    assert (best.u, best.s, best.h) == pytest.approx((1.0, 0.5, 2 / 3))
    assert gzsl_score(SCORES, LABELS, UNSEEN, SEEN, -0.3).h == pytest.approx(2 / 3)  # the tie


def test_gzsl_score_at_the_calibrated_penalty_repeats_calibration_on_double_precision_scores():
    # margins 0.1 (an unseen clip) and 0.1 + 1e-9 (a seen clip): the chosen penalty lies between,
    # which float32 rounds to 0.1, where the seen clip went to the unseen class
    scores = torch.tensor([[0.1, -5, 0.0], [0.1 + 1e-9, -5, 0.0]], dtype=torch.float64)
    labels = torch.tensor([2, 0])
    chosen = calibrate_stacking(scores, labels, [0, 1], [2])
    assert chosen.h == 1.0
    assert gzsl_score(scores, labels, [0, 1], [2], chosen.gamma) == chosen


@pytest.mark.parametrize(("labels", "seen", "unseen", "message"), [
    ([0, 1, 2, 3], [0, 1], [2], r"Labels \[3\] are neither seen \[0, 1\] nor unseen \[2\]"),
    ([0, 1, 2], [0, 1, 2], [2], r"Class ids \[2\] are both seen and unseen"),
    ([0, 1], [0, 1], [], r"GZSL needs seen and unseen classes; got seen=\[0, 1\], unseen=\[\]"),
])
def test_gzsl_metrics_refuse_class_lists_that_would_miscount(labels, seen, unseen, message):
    scores, labels = torch.eye(4)[: len(labels)], torch.tensor(labels)
    for metric in (lambda: gzsl_score(scores, labels, seen, unseen),
                   lambda: calibrate_stacking(scores, labels, seen, unseen),
                   lambda: evaluate_zsl(scores, labels, seen, unseen, 0.0, 4)):
        with pytest.raises(ValueError, match=message):
            metric()
    with pytest.raises(ValueError, match="at least one candidate"):
        topk_accuracy(scores, labels, [])


def test_seen_top1_ranks_seen_clips_among_the_seen_classes_only():
    scores = torch.tensor([[0.5, 0.0, 0.9, 0.0],    # seen class 0: above seen 1, below unseen 2
                           [0.0, 0.0, 0.9, 0.1]])   # unseen class 2
    m = evaluate_zsl(scores, torch.tensor([0, 2]), SEEN, UNSEEN, gamma=0.0, n_classes=4).metrics
    assert m["seen_top1"] == 1.0
    assert m["gzsl_s"] == 0.0  # among every class it loses to unseen 2


def test_zsl_top3_ranks_unseen_clips_among_the_unseen_classes_only():
    # unseen class 5 is 3rd of the unseen classes 3, 4, 5 but 6th of all six
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.3, 0.2, 0.1]])
    m = evaluate_zsl(scores, torch.tensor([5]), [0, 1, 2], [3, 4, 5], gamma=0.0, n_classes=6).metrics
    assert m["zsl_top1"] == 0.0 and m["zsl_top3"] == 1.0


def test_evaluate_zsl_reports_every_setting_with_the_given_penalty():
    results = evaluate_zsl(SCORES, LABELS, SEEN, UNSEEN, gamma=0.075, n_classes=4)
    m = results.metrics
    assert m["zsl_top1"] == 1.0 and m["zsl_top3"] == 1.0 and m["seen_top1"] == 1.0
    assert (m["gzsl_u"], m["gzsl_s"], m["gzsl_h"]) == (0.0, 1.0, 0.0)
    assert (m["gzsl_cs_u"], m["gzsl_cs_s"]) == pytest.approx((0.5, 1.0))
    assert m["calibration_gamma"] == 0.075
    assert m["zsl_top1_ci95"] == 0.0 and m["seen_top1_ci95"] == 0.0  # every class all right
    # one clip per class: each class's accuracy is 0 or 1, so clip sampling leaves no spread
    assert m["gzsl_cs_u_ci95"] == 0.0 and m["gzsl_cs_h_ci95"] == 0.0
    assert results.confusions["zsl"].diagonal().tolist() == [0, 0, 1, 1]
    assert results.confusions["gzsl_cs"][2].tolist() == [1, 0, 0, 0]  # unseen 2 still goes to 0


def test_gzsl_confusion_counts_a_tie_with_the_penalty_as_the_metric_does():
    scores = torch.rand(40, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40) % 4
    margins = scores[:, SEEN].max(dim=1).values - scores[:, UNSEEN].max(dim=1).values
    for gamma in margins.tolist():  # a sample's margin exactly: a tie, and float rounding
        results = evaluate_zsl(scores, labels, SEEN, UNSEEN, gamma=gamma, n_classes=4)
        confusion = results.confusions["gzsl_cs"].double()
        per_class = confusion.diagonal() / confusion.sum(dim=1)
        assert (float(per_class[UNSEEN].mean()), float(per_class[SEEN].mean())) == pytest.approx(
            (results.metrics["gzsl_cs_u"], results.metrics["gzsl_cs_s"])), gamma


def test_evaluate_zsl_intervals_come_from_each_settings_own_clips():
    extra = torch.tensor([[0.0, 0.0, 0.1, 0.4]])  # a second clip of unseen class 2, named 3
    scores, labels = torch.cat([SCORES, extra]), torch.cat([LABELS, torch.tensor([2])])
    m = evaluate_zsl(scores, labels, SEEN, UNSEEN, gamma=0.075, n_classes=4).metrics
    assert m["zsl_top1"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["zsl_top1_ci95"] == pytest.approx(1.96 * math.sqrt(0.5 * 0.5 / 2) / 2)
    assert m["seen_top1_ci95"] == 0.0
    # GZSL with the penalty: class 2's clips both wrong (to 0, then to 3), class 3's right
    assert m["gzsl_cs_u"] == pytest.approx(0.5) and m["gzsl_cs_u_ci95"] == 0.0
    # top-3 among the two unseen classes: every clip right, so no spread
    assert m["zsl_top3"] == 1.0 and m["zsl_top3_ci95"] == 0.0


def test_evaluate_zsl_intervals_of_gzsl_without_the_penalty():
    # unseen class 2: 3 clips, the first two go to unseen 2 (right), the last to seen 0 (wrong);
    # seen class 0: 2 clips, one right, one lost to unseen 3; seen class 1 and unseen 3: one clip
    scores = torch.tensor([[0.1, 0.0, 0.9, 0.0], [0.1, 0.0, 0.8, 0.0], [0.9, 0.0, 0.1, 0.0],
                           [0.9, 0.0, 0.0, 0.1], [0.1, 0.0, 0.0, 0.9], [0.0, 0.9, 0.0, 0.1],
                           [0.0, 0.0, 0.1, 0.9]])
    labels = torch.tensor([2, 2, 2, 0, 0, 1, 3])
    m = evaluate_zsl(scores, labels, SEEN, UNSEEN, gamma=0.0, n_classes=4).metrics
    u, s = (2 / 3 + 1) / 2, (1 / 2 + 1) / 2
    assert (m["gzsl_u"], m["gzsl_s"]) == pytest.approx((u, s))
    u_ci95 = 1.96 * math.sqrt((2 / 3) * (1 / 3) / 3) / 2
    s_ci95 = 1.96 * math.sqrt(0.5 * 0.5 / 2) / 2
    assert (m["gzsl_u_ci95"], m["gzsl_s_ci95"]) == pytest.approx((u_ci95, s_ci95))
    assert m["gzsl_h_ci95"] == pytest.approx(harmonic_mean_ci95(u, u_ci95, s, s_ci95))
    # at gamma 0 the calibrated figures are the plain ones, intervals included
    assert all(m[f"gzsl_cs_{k}_ci95"] == pytest.approx(m[f"gzsl_{k}_ci95"]) for k in "ush")
    # top-3 among the two unseen classes always holds the right one
    assert m["zsl_top3_ci95"] == 0.0


def test_evaluate_zsl_scores_zsl_and_seen_with_their_own_scores_when_given():
    swapped = SCORES[:, [1, 0, 3, 2]]  # every sample's best seen and best unseen class change
    results = evaluate_zsl(SCORES, LABELS, SEEN, UNSEEN, gamma=0.075, n_classes=4,
                           setting_scores={"zsl": swapped, "seen": swapped})
    m = results.metrics
    assert m["zsl_top1"] == 0.0 and m["seen_top1"] == 0.0  # from the swapped scores
    assert (m["gzsl_cs_u"], m["gzsl_cs_s"]) == pytest.approx((0.5, 1.0))  # GZSL: the main scores
    assert results.confusions["zsl"][2].tolist() == [0, 0, 0, 1]
    only_zsl = evaluate_zsl(SCORES, LABELS, SEEN, UNSEEN, 0.075, 4, setting_scores={"zsl": swapped})
    assert only_zsl.metrics["zsl_top1"] == 0.0 and only_zsl.metrics["seen_top1"] == 1.0


def test_triplet_loss_uses_the_one_other_class_as_negative():
    loss = TripletLoss(margin=0.5)(torch.tensor([[0.9, 0.6]]), torch.tensor([0]))
    assert float(loss) == pytest.approx(0.2)


def test_triplet_loss_is_zero_when_every_other_class_is_beaten_by_the_margin():
    torch.manual_seed(0)
    scores = torch.full((3000, 3), -10.0)
    targets = torch.arange(3).repeat(1000)
    scores[torch.arange(3000), targets] = 0.0  # the positive never serves as its own negative
    assert float(TripletLoss(margin=0.5)(scores, targets)) == 0.0


@pytest.mark.parametrize(("build", "message"), [
    # were accepted: a negative margin left a negative class scoring above the positive unpenalised
    (lambda: TripletLoss(margin=-0.5), r"loss.margin=-0.5: must be a finite number >= 0"),
    (lambda: RankingLoss(margin=-0.1), r"loss.margin=-0.1: must be a finite number >= 0"),
    # was accepted, and every loss was nan (0 was refused, naming no key: see the test below)
    (lambda: InfoNCELoss(temperature=float("nan")), r"loss.temperature=nan: .*finite number > 0"),
])
def test_loss_settings_that_would_train_on_a_wrong_objective_are_refused_naming_the_key(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_ranking_loss_sums_hinges_over_all_negatives():
    loss = RankingLoss(margin=0.1)(torch.tensor([[0.5, 0.45, 0.2]]), torch.tensor([0]))
    assert float(loss) == pytest.approx(0.05)


def test_infonce_is_cross_entropy_of_temperature_scaled_scores():
    scores, targets = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    expected = F.cross_entropy(scores / 0.2, targets)
    torch.testing.assert_close(InfoNCELoss(0.2)(scores, targets), expected)
    with pytest.raises(ValueError, match="targets"):
        InfoNCELoss()(scores, targets[:3])
    with pytest.raises(ValueError, match=r"loss.temperature=0.0: .*must be a finite number > 0"):
        InfoNCELoss(0.0)


@pytest.mark.parametrize("head", [SiameseHead(8, 3, embed_dim=4), DeviseHead(8, 3),
                                  BilinearHead(8, 3), EszslHead(8, 3), ConseHead(8, 3)])
def test_heads_score_every_class_and_check_sizes(head):
    scores = head(torch.randn(5, 8), torch.randn(6, 3))
    assert scores.shape == (5, 6)
    assert head.embed_audio(torch.randn(5, 8)).shape[0] == 5
    with pytest.raises(ValueError, match="side_info.dim"):
        head(torch.randn(5, 8), torch.randn(6, 4))


def test_eszsl_closed_form_fits_a_separable_problem():
    torch.manual_seed(0)
    side = torch.eye(3)
    labels = torch.arange(3).repeat(20)
    audio = F.one_hot(labels, 8).float() + 0.05 * torch.randn(60, 8)
    head = EszslHead(8, 3, gamma=0.1, lam=0.1)
    head.fit(audio, labels, side)
    assert (head(audio, side).argmax(dim=1) == labels).all()


def test_devise_scores_are_cosines_of_the_mapped_audio_and_the_class_vectors():
    torch.manual_seed(0)
    head, audio, side = DeviseHead(8, 3), torch.randn(5, 8), torch.randn(4, 3)
    mapped = audio @ head.projection.weight.T
    expected = F.cosine_similarity(mapped[:, None], side[None], dim=-1)
    torch.testing.assert_close(head(audio, side), expected)
    torch.testing.assert_close(head(audio, side * torch.tensor([[0.1], [1], [3], [9]])), expected)


@pytest.mark.parametrize("activation", ["sigmoid", "none"])
def test_siamese_scores_are_cosines_of_the_two_activated_projections(activation):
    torch.manual_seed(0)
    head = SiameseHead(8, 3, embed_dim=4, activation=activation)
    audio, side = torch.randn(5, 8), torch.randn(4, 3)
    act = torch.sigmoid if activation == "sigmoid" else (lambda v: v)
    a, s = act(head.audio_projection(audio)), act(head.side_projection(side))
    expected = F.cosine_similarity(a[:, None], s[None], dim=-1)
    torch.testing.assert_close(head(audio, side), expected)
    if activation == "sigmoid":
        assert (expected > 0).all()  # sigmoid outputs share the positive orthant


def test_eszsl_fit_is_the_papers_closed_form_and_scores_normalised_audio():
    g = torch.Generator().manual_seed(0)
    audio, side = torch.randn(30, 6, generator=g).double() * 3, torch.randn(4, 5, generator=g).double()
    labels = torch.arange(4).repeat(8)[:30]
    gamma, lam = 0.3, 2.0
    head = EszslHead(6, 5, gamma=gamma, lam=lam).double()
    head.fit(audio, labels, side)
    x = F.normalize(audio, dim=-1)
    y = 2 * F.one_hot(labels, 4).double() - 1  # {-1, +1}
    expected = (torch.linalg.inv(x.T @ x + gamma * torch.eye(6, dtype=x.dtype)) @ x.T @ y @ side
                @ torch.linalg.inv(side.T @ side + lam * torch.eye(5, dtype=x.dtype)))
    torch.testing.assert_close(head.weight, expected)
    torch.testing.assert_close(head(audio, side), x @ expected @ side.T)


def test_conse_places_a_clip_among_the_training_classes_it_resembles():
    head = ConseHead(3, 3, top_t=2, temperature=0.1)
    with torch.no_grad():
        head.projection.weight.copy_(torch.eye(3))
    head.set_anchors(torch.eye(3)[:2])  # training classes along x and y
    audio = torch.tensor([[1.0, 0.9, 0.0]])
    candidates = F.normalize(torch.tensor([[1.0, 1.0, 0.0], [0.6, 0.0, 0.8]]), dim=1)
    head.train()
    torch.testing.assert_close(head.embed_audio(audio), F.normalize(audio, dim=1))
    head.eval()
    mixed = head.embed_audio(audio)
    assert mixed[0, 2] == 0 and 0 < mixed[0, 1] < mixed[0, 0]  # convex mix of the two anchors
    assert head(audio, candidates).argmax() == 0


def test_conse_mixes_only_the_top_t_training_classes():
    head = ConseHead(3, 3, top_t=1, temperature=1.0).eval()
    with torch.no_grad():
        head.projection.weight.copy_(torch.eye(3))
    head.set_anchors(torch.eye(3))
    torch.testing.assert_close(head.embed_audio(torch.tensor([[1.0, 0.8, 0.6]])),
                               torch.tensor([[1.0, 0.0, 0.0]]))  # the nearest anchor alone


def test_penalty_search_matches_scoring_every_penalty_on_every_sample():
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(400, 12, generator=g), torch.randint(0, 12, (400,), generator=g)
    scores[torch.arange(400), labels] += 1.0
    seen, unseen = list(range(8)), list(range(8, 12))
    gammas = torch.linspace(-3, 3, 61)
    is_unseen = labels >= 8
    for gamma, u, s in zip(gammas, *_gzsl_for(gammas, scores, labels, seen, unseen), strict=True):
        penalised = scores - gamma * (torch.arange(12) < 8)
        correct = penalised.argmax(dim=1) == labels  # one penalty, every sample, all candidates
        assert float(u) == pytest.approx(float(per_class_accuracy(correct[is_unseen], labels[is_unseen])))
        assert float(s) == pytest.approx(float(per_class_accuracy(correct[~is_unseen], labels[~is_unseen])))


def test_confusion_picture_keeps_the_column_of_a_predicted_class_without_clips():
    from fewzero.plots import confusion_figure

    # seen 0 and 1 (1 has no test clips), unseen 2 and 3; one of class 2's clips goes to class 1
    confusion = torch.tensor([[3, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 2]])
    figure = confusion_figure(confusion, ["a", "b", "c", "d"], "gzsl")
    matrix = figure.axes[0].images[0].get_array()
    assert matrix.shape == (3, 4)  # rows: classes with clips; columns: also the predicted "b"
    np.testing.assert_allclose(matrix[1], [0.0, 0.5, 0.5, 0.0])  # class c's row sums to 1
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["a", "c", "d"]


def test_class_cv_figure_scales_y_by_the_score_kind_and_says_when_a_tie_kept_the_weight():
    import matplotlib.pyplot as plt

    from fewzero.plots import weight_choice_figure

    candidates, name = [0.0, 0.1, 0.4], "pseudo-unseen per-class log-likelihood"
    # one pseudo-unseen class: every weight gives its clips log-likelihood 0
    tied = weight_choice_figure(candidates, torch.zeros(1, 3), ["fold 0: Flute"], 0.1, "cv", name,
                                accuracy=False)
    ax = tied.axes[0]
    assert ax.get_ylim() != (-0.02, 1.02)  # not drawn as an accuracy of 0
    assert any("validation cannot choose" in t.get_text() and "0.1, was kept" in t.get_text()
               for t in ax.texts)
    assert "kept 0.1 (a tie)" in [t.get_text() for t in ax.get_legend().get_texts()]
    scores = torch.tensor([[-1.0, -0.5, -0.7], [-0.9, -0.6, -0.8]])  # a choice: no such note
    chosen = weight_choice_figure(candidates, scores, ["a", "b"], 0.1, "cv", name, accuracy=False)
    assert not chosen.axes[0].texts and chosen.axes[0].get_ylim()[1] < 0
    assert "chosen 0.1" in [t.get_text() for t in chosen.axes[0].get_legend().get_texts()]
    top1 = weight_choice_figure(candidates, torch.tensor([[0.2, 0.4, 0.3]]), ["a"], 0.1, "cv")
    assert top1.axes[0].get_ylim() == (-0.02, 1.02)  # an accuracy: all of [0, 1]
    plt.close("all")


def test_zsl_embedding_figure_gives_classes_distinct_hues_or_markers_and_a_legend_of_both_marks():
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from fewzero.plots import zsl_embedding_figure

    names = [f"class {k}" for k in range(14)]  # rendered SOL's 14 instruments
    labels = torch.arange(14).repeat_interleave(3)
    class_points = torch.randn(14, 8, generator=torch.Generator().manual_seed(0))
    figure = zsl_embedding_figure(class_points[labels] + 0.1, labels, class_points, names, [9, 10], "t")
    ax = figure.axes[0]
    tab10 = {tuple(round(v, 4) for v in colour) for colour in matplotlib.colormaps["tab10"].colors}
    vectors = ax.collections[1::2]  # each class: its audio clips, then its class vector
    drawn = set()
    for vector in vectors:
        colour = tuple(round(float(v), 4) for v in vector.get_facecolor()[0][:3])
        assert colour in tab10  # ten distinct hues, never two shades of one (tab20: Cello, Oboe)
        drawn.add((colour, vector.get_paths()[0].vertices.tobytes()))
    assert len(vectors) == len(drawn) == 14  # classes of one hue differ in marker
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()][9:11] == ["class 9 (unseen)", "class 10 (unseen)"]
    marks = [(line.get_marker(), line.get_markersize()) for line in legend.findobj(Line2D)]
    assert marks[:4] == [("o", 4.0), ("*", 11.0), ("o", 4.0), ("*", 11.0)]  # audio, class vector
    assert len(marks) == 28 and marks[20:22] == [("s", 4.0), ("P", 11.0)]  # classes 10-13
    plt.close(figure)


def test_clips_repeated_by_a_distributed_sampler_are_counted_once():
    from fewzero.models.zeroshot_module import first_occurrences

    gathered = torch.tensor([3, 1, 3, 2, 1, 5])  # rank 0: 3, 1, 3; rank 1: 2, 1 (padding), 5
    assert first_occurrences(gathered).tolist() == [0, 1, 3, 5]
    assert gathered[first_occurrences(gathered)].tolist() == [3, 1, 2, 5]


def test_a_saved_figure_is_written_as_png_and_closed(tmp_path):
    import matplotlib.pyplot as plt

    from fewzero.plots import save_figure

    figure = plt.figure()
    save_figure(figure, "test/confusion_x", tmp_path / "plots", [], 0)
    assert (tmp_path / "plots" / "test_confusion_x.png").is_file()
    assert figure.number not in plt.get_fignums()  # many runs in one process keep no figures
