"""Prototypical networks (Snell et al., 2017) as a plain nn.Module, with the maths as functions."""

from __future__ import annotations

import torch
from torch import nn


def class_prototypes(embeddings: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Mean embedding per class by index_add, so unsorted or unbalanced supports work.

    Args:
        embeddings: (n_support, dim).
        labels: (n_support,) in 0..n_way-1; every class must appear at least once.
    Returns:
        (n_way, dim) prototypes.
    """
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} support embeddings but {labels.shape[0]} labels")
    counts = torch.bincount(labels, minlength=n_way)
    if counts.shape[0] != n_way or bool((counts == 0).any()):
        raise ValueError(f"Support labels must cover exactly classes 0..{n_way - 1}; "
                         f"got counts {counts.tolist()}")
    sums = embeddings.new_zeros(n_way, embeddings.shape[1]).index_add_(0, labels, embeddings)
    return sums / counts[:, None].to(embeddings.dtype)


class Distance(nn.Module):
    """Negative distance as logits: `sq_euclidean` (Snell et al.; the tutorial) or `cosine`.

    The cosine variant multiplies similarities by a learned scale (initial `scale`), which
    keeps the softmax from being too flat on the unit sphere.
    """

    def __init__(self, kind: str = "sq_euclidean", scale: float = 10.0, learn_scale: bool = True):
        super().__init__()
        if kind not in ("sq_euclidean", "cosine"):
            raise ValueError(f"distance must be 'sq_euclidean' or 'cosine'; got {kind!r}")
        self.kind = kind
        # the scale only exists for cosine; a trainable unused parameter would break DDP
        self.log_scale = nn.Parameter(torch.tensor(float(scale)).log(),
                                      requires_grad=learn_scale and kind == "cosine")

    def cpu_copy(self) -> Distance:
        """A detached CPU copy, for evaluation on embeddings gathered to the CPU."""
        copy = Distance(self.kind, learn_scale=False)
        copy.log_scale.data = self.log_scale.detach().cpu().clone()
        return copy

    def forward(self, queries: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """queries (n_query, dim), prototypes (n_way, dim) -> logits (n_query, n_way)."""
        if self.kind == "sq_euclidean":
            return -torch.cdist(queries, prototypes).pow(2)
        sims = nn.functional.normalize(queries, dim=-1) @ nn.functional.normalize(prototypes, dim=-1).T
        return self.log_scale.exp() * sims


class PrototypicalNetwork(nn.Module):
    """Backbone + prototypes + distance. Use in two steps (easyfsl style):

        net.process_support_set(support_x, support_y)   # (n_support, F, T), (n_support,)
        logits = net(query_x)                           # (n_query, F, T) -> (n_query, n_way)
    """

    def __init__(self, backbone: nn.Module, distance: Distance):
        super().__init__()
        self.backbone, self.distance = backbone, distance
        self.prototypes: torch.Tensor | None = None

    def process_support_set(self, support: torch.Tensor, labels: torch.Tensor) -> None:
        n_way = int(labels.max()) + 1
        self.prototypes = class_prototypes(self.backbone(support), labels, n_way)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        if self.prototypes is None:
            raise RuntimeError("Call process_support_set(support, labels) before forward(query).")
        return self.distance(self.backbone(query), self.prototypes)
