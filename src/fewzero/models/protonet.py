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


def _within_class_scatter(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Pooled within-class scatter of (n, dim) `x` around each class mean, and its degrees of
    freedom (n minus the number of classes). Shapes: (n, dim), (n,) -> (dim, dim), int."""
    classes, label_index = torch.unique(labels, return_inverse=True)
    sums = x.new_zeros(len(classes), x.shape[1]).index_add_(0, label_index, x)
    centred = x - (sums / torch.bincount(label_index)[:, None].to(x))[label_index]
    return centred.T @ centred, len(x) - len(classes)


class WithinClassWhitening(nn.Module):
    """Within-class covariance normalisation of embeddings (WCCN; Hatch et al., 2006, as in
    speaker recognition with unseen speakers), fitted on the *training* classes' clips.

    Embeddings of one instrument spread along directions that every instrument shares (pitch,
    dynamics, recording); whitening the pooled within-class covariance shrinks those directions
    before prototypes and distances are computed. The covariance is shrunk towards a multiple of
    the identity: `matrix = V diag(1 / sqrt(e + shrinkage * mean(e)))`, with (e, V) the
    eigen-decomposition of the within-class covariance; shrinkage -> inf approaches the identity
    (up to scale). `shrinkage` can be changed after `fit` (the decomposition is kept), which is
    how evaluation tries several values. `length_norm` then scales every whitened embedding to
    unit length (as speaker recognition does after WCCN; Garcia-Romero & Espy-Wilson, 2011), so
    every clip weighs the same in a prototype and only directions are compared. Until `fit` is
    called the matrix is the identity.

    `support_weight` > 0 adapts the whitening to each episode (`episode_matrix`): the support
    set's own within-class covariance (new instruments vary in their own ways), rescaled to the
    training covariance's trace, is mixed in with that weight. It needs labelled support clips
    only, never queries, and changes nothing for one-shot supports (no within-class spread).
    The matrix is not part of the state dict (it is refitted before every evaluation), so
    checkpoints load with whitening on or off.

    Shapes: fit((n, dim), (n,)); episode_matrix((n_support, dim), (n_support,)) -> (dim, dim);
    forward (batch, dim) [, (dim, dim)] -> (batch, dim).
    """

    def __init__(self, dim: int, shrinkage: float = 1.0, length_norm: bool = False,
                 support_weight: float = 0.0):
        super().__init__()
        self.length_norm = length_norm
        self.register_buffer("matrix", torch.eye(dim), persistent=False)
        self._eigen: tuple[torch.Tensor, torch.Tensor] | None = None  # (e, V) once fitted
        self._covariance: torch.Tensor | None = None  # (dim, dim) float64 once fitted
        self.shrinkage = shrinkage
        self.support_weight = support_weight

    @property
    def shrinkage(self) -> float:
        return self._shrinkage

    @shrinkage.setter
    def shrinkage(self, value: float) -> None:
        if value <= 0:
            raise ValueError(f"whitening shrinkage must be positive; got {value}")
        self._shrinkage = float(value)
        if self._eigen is not None:
            eigenvalues, eigenvectors = self._eigen
            scale = (eigenvalues + self._ridge()).rsqrt()
            self.matrix.copy_((eigenvectors * scale).to(self.matrix))

    @property
    def support_weight(self) -> float:
        return self._support_weight

    @support_weight.setter
    def support_weight(self, value: float) -> None:
        if not 0 <= value <= 1:
            raise ValueError(f"whitening support_weight must be in [0, 1]; got {value}")
        self._support_weight = float(value)

    def _ridge(self) -> torch.Tensor:
        """What shrinkage adds to every eigenvalue: shrinkage times their mean."""
        return self._shrinkage * self._eigen[0].mean()

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Estimate the transform from (n, dim) embeddings of labelled clips (training classes)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.matrix.shape[0]:
            raise ValueError(f"Expected (n, {self.matrix.shape[0]}) embeddings; got "
                             f"{tuple(embeddings.shape)}")
        n_classes = len(torch.unique(labels))
        if n_classes < 2 or n_classes == len(labels):
            raise ValueError("Whitening needs several clips of at least two training classes; got "
                             f"{len(labels)} clips of {n_classes} classes.")
        scatter, dof = _within_class_scatter(embeddings.double(), labels)
        self._covariance = scatter / dof
        eigenvalues, eigenvectors = torch.linalg.eigh(self._covariance)
        self._eigen = (eigenvalues.clamp(min=0), eigenvectors)
        self.shrinkage = self._shrinkage  # computes the matrix

    def adapts(self, n_shot: int) -> bool:
        """Whether `episode_matrix` differs from `matrix` for supports of `n_shot` clips per class."""
        return self._support_weight > 0 and n_shot > 1 and self._covariance is not None

    @torch.no_grad()
    def episode_matrix(self, support: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(dim, dim) whitening for one episode from its (n_support, dim) un-whitened support
        embeddings and (n_support,) labels: `matrix` when nothing adapts, otherwise L^-T with
        L L^T = (1 - w) C_train + w C_support + ridge I. That is `matrix` up to a rotation
        when w = 0, which leaves lengths and distances unchanged."""
        scatter, dof = _within_class_scatter(support.double(), labels)
        if not self._support_weight > 0 or self._covariance is None or dof == 0:
            return self.matrix
        train, dim = self._covariance, self._covariance.shape[0]
        support_covariance = scatter * (train.trace() / scatter.trace().clamp(min=1e-30))
        eye = torch.eye(dim, dtype=train.dtype, device=train.device)
        mixed = ((1 - self._support_weight) * train + self._support_weight * support_covariance
                 + self._ridge() * eye)
        inverse_factor = torch.linalg.solve_triangular(torch.linalg.cholesky(mixed), eye,
                                                       upper=False)
        return inverse_factor.T.to(self.matrix)

    def forward(self, embeddings: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """Whiten with `matrix` (default: the training classes' one)."""
        matrix = self.matrix if matrix is None else matrix
        whitened = embeddings @ matrix.to(embeddings)
        return nn.functional.normalize(whitened, dim=-1) if self.length_norm else whitened


class PrototypicalNetwork(nn.Module):
    """Backbone (+ optional whitening) + prototypes + distance. Use in two steps (easyfsl style):

        net.process_support_set(support_x, support_y)   # (n_support, F, T), (n_support,)
        logits = net(query_x)                           # (n_query, F, T) -> (n_query, n_way)

    `whitening` (a fitted `WithinClassWhitening`) is applied to every embedding at evaluation,
    adapted to the support set when its `support_weight` is set; episodic training optimises
    the backbone's own embeddings.
    """

    def __init__(self, backbone: nn.Module, distance: Distance,
                 whitening: WithinClassWhitening | None = None):
        super().__init__()
        self.backbone, self.distance, self.whitening = backbone, distance, whitening
        self.prototypes: torch.Tensor | None = None
        self.episode_matrix: torch.Tensor | None = None  # the whitening of the current support

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, F, T) -> (batch, dim) embeddings as evaluation compares them."""
        z = self.backbone(x)
        return self.whitening(z, self.episode_matrix) if self.whitening is not None else z

    def process_support_set(self, support: torch.Tensor, labels: torch.Tensor) -> None:
        n_way = int(labels.max()) + 1
        z = self.backbone(support)
        if self.whitening is not None:
            self.episode_matrix = self.whitening.episode_matrix(z, labels)
            z = self.whitening(z, self.episode_matrix)
        self.prototypes = class_prototypes(z, labels, n_way)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        if self.prototypes is None:
            raise RuntimeError("Call process_support_set(support, labels) before forward(query).")
        return self.distance(self.embed(query), self.prototypes)
