"""Zero-shot losses on class scores: scores (batch, n_classes), targets (batch,) in 0..n-1."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fewzero.models.settings import non_negative


def _positive(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(batch, 1) score of each sample's own class."""
    if scores.ndim != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(f"Expected scores (batch, n_classes) and targets (batch,); got "
                         f"{tuple(scores.shape)} and {tuple(targets.shape)}")
    return scores.gather(1, targets[:, None])


class TripletLoss(nn.Module):
    """The tutorial's loss: max(0, margin - s(a, positive) + s(a, negative)) with one random
    negative class per sample (uniform over the other classes; global torch RNG, seeded).
    On cosine scores the tutorial's margin is 0.5.
    """

    def __init__(self, margin: float = 0.5):
        super().__init__()
        # a negative margin would leave a negative class scoring above the positive unpenalised
        self.margin = non_negative(margin, "loss.margin", whole=False)

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """scores (batch, n_classes), targets (batch,) -> 0-d mean hinge over the batch."""
        positive = _positive(scores, targets)
        n_classes = scores.shape[1]
        offset = torch.randint(1, n_classes, targets.shape, device=targets.device)
        negative = scores.gather(1, ((targets + offset) % n_classes)[:, None])
        return F.relu(self.margin - positive + negative).mean()


class RankingLoss(nn.Module):
    """Hinge rank loss over the negative classes, h_c = max(0, margin - s_pos + s_c), reduced per
    sample by `reduction`:

    - "sum": DeViSE's (Frome et al., 2013), every negative class;
    - "max": SJE's structured hinge (Akata et al., 2015), the most violating class only;
    - "warp": ALE's rank weighting (Akata et al., 2016), the sum times H_r / r, where r is the
      number of violating classes and H_r = 1 + 1/2 + ... + 1/r;

    then averaged over the batch.
    """

    def __init__(self, margin: float = 0.1, reduction: str = "sum"):
        super().__init__()
        if reduction not in ("sum", "max", "warp"):
            raise ValueError(f"reduction must be 'sum' (DeViSE), 'max' (SJE) or 'warp' (ALE); got "
                             f"{reduction!r}")
        self.margin = non_negative(margin, "loss.margin", whole=False)  # as TripletLoss's
        self.reduction = reduction

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """scores (batch, n_classes), targets (batch,) -> 0-d mean of the per-sample losses."""
        hinge = F.relu(self.margin - _positive(scores, targets) + scores)
        hinge = hinge.scatter(1, targets[:, None], 0.0)  # the positive is not its own negative
        if self.reduction == "max":
            return hinge.amax(dim=1).mean()
        total = hinge.sum(dim=1)
        if self.reduction == "warp":
            rank = (hinge > 0).sum(dim=1).to(scores.dtype)
            harmonic = torch.special.digamma(rank + 1) + 0.5772156649015329  # H_r
            total = total * torch.where(rank > 0, harmonic / rank.clamp_min(1), 0.0)
        return total.mean()


class InfoNCELoss(nn.Module):
    """Softmax cross-entropy over classes of temperature-scaled scores (InfoNCE with the class
    vectors as the candidates): CE(scores / temperature, targets).
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if not 0 < temperature < float("inf"):  # nan too
            raise ValueError(f"loss.temperature={temperature}: the scores are divided by it, so it "
                             "must be a finite number > 0 (lower: a sharper softmax).")
        self.temperature = temperature

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """scores (batch, n_classes), targets (batch,) -> 0-d mean cross-entropy."""
        _positive(scores, targets)
        return F.cross_entropy(scores / self.temperature, targets)
