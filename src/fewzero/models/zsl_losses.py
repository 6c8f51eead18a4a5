"""Zero-shot losses on class scores: scores (batch, n_classes), targets (batch,) in 0..n-1."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


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
        self.margin = margin

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        positive = _positive(scores, targets)
        n_classes = scores.shape[1]
        offset = torch.randint(1, n_classes, targets.shape, device=targets.device)
        negative = scores.gather(1, ((targets + offset) % n_classes)[:, None])
        return F.relu(self.margin - positive + negative).mean()


class RankingLoss(nn.Module):
    """DeViSE's hinge rank loss: sum over every negative class of max(0, margin - s_pos + s_neg),
    averaged over the batch.
    """

    def __init__(self, margin: float = 0.1):
        super().__init__()
        self.margin = margin

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hinge = F.relu(self.margin - _positive(scores, targets) + scores)
        hinge = hinge.scatter(1, targets[:, None], 0.0)  # the positive is not its own negative
        return hinge.sum(dim=1).mean()


class InfoNCELoss(nn.Module):
    """Softmax cross-entropy over classes of temperature-scaled scores (InfoNCE with the class
    vectors as the candidates): CE(scores / temperature, targets).
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        self.temperature = temperature

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _positive(scores, targets)
        return F.cross_entropy(scores / self.temperature, targets)
