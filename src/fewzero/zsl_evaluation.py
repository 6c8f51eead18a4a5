"""Zero-shot and generalized zero-shot metrics on class scores (higher score = more likely).

Every accuracy is per-class averaged (the mean over classes of each class's accuracy), so big
classes do not dominate. GZSL follows Xian et al. (2018): u and s are per-class top-1 on unseen
and seen test samples with all classes as candidates, H = 2us / (u + s); calibrated stacking
(Chao et al., 2016) subtracts a penalty gamma from seen-class scores, gamma chosen on validation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch


def _class_means(values: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's mean value and sample count: values (..., n), labels (n,) non-empty ->
    ((..., n_classes), (n_classes,)), classes in sorted id order, in `dtype`."""
    classes, inverse = labels.unique(return_inverse=True)
    sums = torch.zeros(*values.shape[:-1], len(classes), dtype=dtype)
    sums.index_add_(-1, inverse, values.to(dtype))
    counts = torch.bincount(inverse, minlength=len(classes)).to(dtype)
    return sums / counts, counts


def per_class_mean(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the classes present in `labels` of each class's mean value.

    Args:
        values: (..., n) one value per sample, one row per setting (e.g. per penalty value).
        labels: (n,) class ids.
    Returns:
        (...) in `values`' float dtype (float32 for bool); nan when `labels` is empty.
    """
    dtype = values.dtype if values.is_floating_point() else torch.float32
    if labels.numel() == 0:
        return torch.full(values.shape[:-1], float("nan"), dtype=dtype)
    return _class_means(values, labels, dtype)[0].mean(dim=-1)


def per_class_accuracy(correct: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-class mean accuracy: correct (..., n) bool, labels (n,) -> (...) (`per_class_mean`)."""
    return per_class_mean(correct, labels)


def per_class_accuracy_ci95(correct: torch.Tensor, labels: torch.Tensor) -> float:
    """Half-width of the 95% interval of `per_class_accuracy` from the sampling of the clips.

    Each class's clips are taken as a binomial sample of its accuracy p_c (n_c clips), so the
    per-class mean over C classes has standard error sqrt(sum_c p_c (1 - p_c) / n_c) / C; the
    half-width is 1.96 times that (normal approximation: 0 when every class is all right or all
    wrong). It covers which clips were drawn, not which classes or which training seed.
    correct (n,) bool, labels (n,) class ids; nan when there is no sample.
    """
    if labels.numel() == 0:
        return float("nan")
    accuracy, counts = _class_means(correct, labels, torch.float64)
    variance = (accuracy * (1 - accuracy) / counts).sum() / len(counts) ** 2
    return float(1.96 * variance.sqrt())


def harmonic_mean_ci95(u: float, u_ci95: float, s: float, s_ci95: float) -> float:
    """Half-width of the 95% interval of H = 2us / (u + s) from those of u and s, taken as
    independent (different clips), by the delta method: dH/du = 2s^2 / (u + s)^2 and
    dH/ds = 2u^2 / (u + s)^2. 0 when u + s = 0."""
    if u + s == 0:
        return 0.0
    return float(math.hypot(2 * s**2 * u_ci95, 2 * u**2 * s_ci95) / (u + s) ** 2)


def predict(scores: torch.Tensor, candidates: Sequence[int], k: int = 1) -> torch.Tensor:
    """Top-k class ids among `candidates`: scores (n, n_classes) -> (n, k), best first; tied
    scores in the order of `candidates`, so that top-1 is the first best, as GZSL's `max` takes
    it (`topk` orders ties as it likes, and not alike on every device)."""
    ids = torch.as_tensor(list(candidates), dtype=torch.long)
    top = scores[:, ids].sort(dim=1, descending=True, stable=True).indices[:, :k]
    return ids[top]


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, candidates: Sequence[int],
                  k: int = 1) -> float:
    """Per-class mean top-k accuracy among `candidates`: scores (n, n_classes), labels (n,)
    true class ids."""
    if not len(candidates):
        raise ValueError("topk_accuracy needs at least one candidate class.")
    hits = (predict(scores, candidates, k) == labels[:, None]).any(dim=1)
    return float(per_class_accuracy(hits, labels))


# 20 per decade over [0.001, 1000]: the best temperature stays inside the grid for scores on a
# cosine's scale and for the same scores stretched up to a few hundred times (a pitch prior's
# log-likelihood at a large weight); [0.003, 3] made stretched scores look worse (session 20).
TEMPERATURES = torch.logspace(-3.0, 3.0, 121, dtype=torch.float64)


def true_class_log_likelihood(scores: torch.Tensor, labels: torch.Tensor, candidates: Sequence[int],
                              temperatures: torch.Tensor = TEMPERATURES) -> float:
    """Per-class mean log-probability of each sample's class under softmax(scores / T) over
    `candidates`, at the temperature T of `temperatures` that maximises it.

    A proper scoring rule for class scores, where top-1 counts only the winner. Taking the best
    temperature makes it independent of the scores' scale, so scores on any scale (cosines,
    logits, with a prior added) compare by how much probability they can give the right class.
    scores (n, n_classes); labels (n,), each one of `candidates`. nan when there is no sample.
    """
    ids = torch.as_tensor(list(candidates), dtype=torch.long)
    if not bool(torch.isin(labels, ids).all()):
        raise ValueError("true_class_log_likelihood: every label must be one of the candidates.")
    column = (labels[:, None] == ids[None]).long().argmax(dim=1)  # each label's place in ids
    logits = scores[:, ids].double()[None] / temperatures.double()[:, None, None]  # (n_T, n, n_cand)
    log_p = logits.log_softmax(dim=2).gather(2, column[None, :, None].expand(len(temperatures), -1, 1))
    return float(per_class_mean(log_p[:, :, 0], labels).max())


def harmonic_mean(u: float | torch.Tensor, s: float | torch.Tensor) -> float | torch.Tensor:
    """H = 2us / (u + s). Floats: 0 when both are 0. Tensors (u and s of the same shape, e.g.
    one per penalty): elementwise in their dtype, 0 where u + s is not positive."""
    if isinstance(u, torch.Tensor):
        return torch.where(u + s > 0, 2 * u * s / (u + s).clamp_min(1e-12), torch.zeros_like(u))
    return 0.0 if u + s == 0 else 2 * u * s / (u + s)


@dataclass(frozen=True)
class GzslScore:
    """u, s (per-class top-1 on unseen / seen samples, all candidates), H, and the penalty."""

    u: float
    s: float
    h: float
    gamma: float = 0.0


def _stacking_margins(scores: torch.Tensor, seen: Sequence[int], unseen: Sequence[int]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best seen id, best unseen id and margin (best seen score - best unseen score), each (n,)."""
    seen_ids = torch.as_tensor(list(seen), dtype=torch.long)
    unseen_ids = torch.as_tensor(list(unseen), dtype=torch.long)
    best_seen, seen_arg = scores[:, seen_ids].max(dim=1)
    best_unseen, unseen_arg = scores[:, unseen_ids].max(dim=1)
    return seen_ids[seen_arg], unseen_ids[unseen_arg], best_seen - best_unseen


def stacking_predictions(scores: torch.Tensor, seen: Sequence[int], unseen: Sequence[int],
                         gamma: float) -> torch.Tensor:
    """GZSL predictions with seen scores lowered by `gamma`: (n, n_classes) -> (n,) class ids.
    A sample goes to its best unseen class where gamma > its margin (best seen - best unseen
    score), else to its best seen class: the rule `gzsl_score` counts, ties included."""
    seen_pred, unseen_pred, margin = _stacking_margins(scores, seen, unseen)
    return torch.where(gamma > margin, unseen_pred, seen_pred)


def _gzsl_for(gammas: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
              seen: Sequence[int], unseen: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """u and s for every penalty in `gammas` (G,): returns two (G,) tensors.

    A sample is predicted as its best unseen class where gamma > its margin, else as its best
    seen class. Per class, with its samples sorted by margin, the hits at gamma are the seen-side
    hits plus the cumulative gain (unseen-side hit - seen-side hit) of the samples whose margin is
    below gamma: O(n log n + G * n_classes) instead of a (G, n) matrix (tens of thousands of
    validation samples and penalties on xlsa17).
    """
    seen_pred, unseen_pred, margin = _stacking_margins(scores, seen, unseen)
    seen_hit = (seen_pred == labels).double()
    gain = (unseen_pred == labels).double() - seen_hit
    is_unseen = torch.isin(labels, torch.as_tensor(list(unseen), dtype=torch.long))

    def mean_over_classes(mask: torch.Tensor) -> torch.Tensor:
        """(G,) per-class mean accuracy at each penalty over the classes of the samples that `mask`
        (n,) selects; NaN where it selects none."""
        classes = labels[mask].unique()
        if len(classes) == 0:
            return torch.full(gammas.shape, float("nan"))
        total = torch.zeros(gammas.shape, dtype=torch.float64)
        for c in classes:
            members = mask & (labels == c)
            margins, order = margin[members].sort()
            cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), gain[members][order].cumsum(0)])
            below = torch.searchsorted(margins.contiguous(), gammas.to(margins.dtype), side="left")
            total += (seen_hit[members].sum() + cumulative[below]) / int(members.sum())
        return (total / len(classes)).float()

    return mean_over_classes(is_unseen), mean_over_classes(~is_unseen)


def check_gzsl_classes(labels: torch.Tensor, seen: Sequence[int], unseen: Sequence[int]) -> None:
    """Raise a ValueError naming the fault where GZSL metrics would mean nothing: an empty seen
    or unseen class list, a class in both, or a label (n,) in neither (it would count as seen)."""
    if not len(seen) or not len(unseen):
        raise ValueError(f"GZSL needs seen and unseen classes; got seen={list(seen)}, unseen={list(unseen)}.")
    both = sorted(set(seen) & set(unseen))
    if both:
        raise ValueError(f"Class ids {both} are both seen and unseen: give each class one side.")
    stray = labels[~torch.isin(labels, torch.as_tensor([*seen, *unseen], dtype=labels.dtype))]
    if len(stray):
        raise ValueError(f"Labels {sorted(set(stray.tolist()))} are neither seen {list(seen)} nor unseen "
                         f"{list(unseen)}: score samples of those classes only.")


def gzsl_score(scores: torch.Tensor, labels: torch.Tensor, seen: Sequence[int],
               unseen: Sequence[int], gamma: float = 0.0) -> GzslScore:
    """GZSL u, s, H with all of seen + unseen as candidates and seen scores lowered by gamma.

    Args:
        scores: (n, n_classes) for samples of seen and unseen classes.
        labels: (n,) true class ids, each in seen or unseen.
    """
    check_gzsl_classes(labels, seen, unseen)
    return _gzsl_scores(scores, labels, seen, unseen, [gamma])[0]


def _gzsl_scores(scores: torch.Tensor, labels: torch.Tensor, seen: Sequence[int],
                 unseen: Sequence[int], gammas: Sequence[float]) -> list[GzslScore]:
    """`gzsl_score` at each penalty of `gammas`, in one pass, for classes already checked."""
    us, ss = _gzsl_for(torch.tensor([float(g) for g in gammas], dtype=torch.float64), scores, labels,
                       seen, unseen)
    return [GzslScore(float(u), float(s), harmonic_mean(float(u), float(s)), float(g))
            for u, s, g in zip(us, ss, gammas, strict=True)]


def calibrate_stacking(scores: torch.Tensor, labels: torch.Tensor, seen: Sequence[int],
                       unseen: Sequence[int]) -> GzslScore:
    """The seen-class penalty gamma that maximises H on these (validation) samples.

    H only changes where gamma crosses a sample's margin (best seen - best unseen score), so
    the search is exact: every midpoint between sorted margins, both ends and 0; ties go to the
    smallest |gamma|.

    Args:
        scores: (n, n_classes) for samples of seen and unseen classes.
        labels: (n,) true class ids, each in seen or unseen.
    Returns:
        the best penalty with its u, s and H (computed in float32).
    """
    check_gzsl_classes(labels, seen, unseen)
    _, _, margin = _stacking_margins(scores, seen, unseen)
    points = margin.sort().values
    gammas = torch.cat([torch.zeros(1), (points[1:] + points[:-1]) / 2,
                        points[:1] - 1e-3, points[-1:] + 1e-3])
    gammas = gammas[gammas.abs().argsort()]
    u, s = _gzsl_for(gammas, scores, labels, seen, unseen)
    h = harmonic_mean(u, s)
    best = int(h.nan_to_num(-1.0).argmax())  # argmax returns the first maximum: smallest |gamma|
    return GzslScore(float(u[best]), float(s[best]), float(h[best]), float(gammas[best]))


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, n_classes) counts, rows = true id, columns = predicted id."""
    matrix = torch.zeros(n_classes, n_classes, dtype=torch.long)
    return matrix.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)


@dataclass
class ZslResults:
    """Everything the test stage reports; metric names as logged (`test/<name>`)."""

    metrics: dict[str, float] = field(default_factory=dict)
    confusions: dict[str, torch.Tensor] = field(default_factory=dict)


def evaluate_zsl(scores: torch.Tensor, labels: torch.Tensor, seen: Sequence[int],
                 unseen: Sequence[int], gamma: float, n_classes: int,
                 setting_scores: Mapping[str, torch.Tensor] | None = None) -> ZslResults:
    """ZSL, seen and GZSL metrics (with and without the calibrated penalty `gamma`).

    Args:
        scores: (n, n_classes) of test samples of seen (test fold) and unseen classes.
        labels: (n,) class ids.
        gamma: seen-class penalty chosen on validation data.
        setting_scores: optional scores of the same shape for the "zsl" (unseen candidates) and
            "seen" (seen candidates) settings, where a model scores them differently (a prior
            weighted per setting); `scores` serves the settings not given and GZSL.
    Returns metrics zsl_top1, zsl_top3 (unseen samples, unseen candidates), seen_top1 (seen
    samples, seen candidates), gzsl_u/s/h, gzsl_cs_u/s/h and calibration_gamma; the 95% interval
    half-width of each accuracy and H from the sampling of the test clips
    (`per_class_accuracy_ci95`, `harmonic_mean_ci95`) as <name>_ci95; and confusion matrices
    "zsl" and "gzsl_cs".
    """
    check_gzsl_classes(labels, seen, unseen)
    setting_scores = setting_scores or {}
    is_unseen = torch.isin(labels, torch.as_tensor(list(unseen), dtype=torch.long))
    u_scores, u_labels = setting_scores.get("zsl", scores)[is_unseen], labels[is_unseen]
    s_scores, s_labels = setting_scores.get("seen", scores)[~is_unseen], labels[~is_unseen]
    zsl_predicted = predict(u_scores, unseen)[:, 0]
    # each accuracy and its interval from the same hits: (labels, correct) per metric
    hits = {"zsl_top1": (u_labels, zsl_predicted == u_labels),
            "zsl_top3": (u_labels, (predict(u_scores, unseen, 3) == u_labels[:, None]).any(dim=1)),
            "seen_top1": (s_labels, predict(s_scores, seen)[:, 0] == s_labels)}
    plain, calibrated = _gzsl_scores(scores, labels, seen, unseen, [0.0, gamma])  # checked above
    metrics = {
        **{name: float(per_class_accuracy(correct, truth)) for name, (truth, correct) in hits.items()},
        "gzsl_u": plain.u, "gzsl_s": plain.s, "gzsl_h": plain.h,
        "gzsl_cs_u": calibrated.u, "gzsl_cs_s": calibrated.s, "gzsl_cs_h": calibrated.h,
        "calibration_gamma": float(gamma),
    }
    metrics.update({f"{name}_ci95": per_class_accuracy_ci95(correct, truth)
                    for name, (truth, correct) in hits.items()})
    gzsl_predicted = {}
    for prefix, penalty in (("gzsl", 0.0), ("gzsl_cs", gamma)):
        gzsl_predicted[prefix] = stacking_predictions(scores, seen, unseen, penalty)
        correct = gzsl_predicted[prefix] == labels
        u_ci95 = per_class_accuracy_ci95(correct[is_unseen], u_labels)
        s_ci95 = per_class_accuracy_ci95(correct[~is_unseen], s_labels)
        metrics.update({f"{prefix}_u_ci95": u_ci95, f"{prefix}_s_ci95": s_ci95,
                        f"{prefix}_h_ci95": harmonic_mean_ci95(metrics[f"{prefix}_u"], u_ci95,
                                                               metrics[f"{prefix}_s"], s_ci95)})
    confusions = {
        "zsl": confusion_matrix(zsl_predicted, u_labels, n_classes),
        "gzsl_cs": confusion_matrix(gzsl_predicted["gzsl_cs"], labels, n_classes),
    }
    return ZslResults(metrics, confusions)
