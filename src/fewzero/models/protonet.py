"""Prototypical networks (Snell et al., 2017) as a plain nn.Module, with the maths as functions."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fewzero.threads import one_thread


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


def _within_class_residuals(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Every row of `x` minus the mean of its class. Shapes: (n, dim), (n,) -> (n, dim)."""
    classes, label_index = torch.unique(labels, return_inverse=True)
    sums = x.new_zeros(len(classes), x.shape[1]).index_add_(0, label_index, x)
    return x - (sums / torch.bincount(label_index)[:, None].to(x))[label_index]


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

    `support_weight` > 0 adapts the whitening to each episode (`adapt`): the support set's own
    within-class covariance (new instruments vary in their own ways), rescaled to the training
    covariance's trace, is mixed in with that weight. It needs labelled support clips
    only, never queries, and changes nothing for one-shot supports (no within-class spread).
    The matrix is not part of the state dict (it is refitted before every evaluation), so
    checkpoints load with whitening on or off.

    Shapes: fit((n, dim), (n,)); forward (batch, dim) -> (batch, dim); adapt((n_support, dim),
    (n_support,)) -> a map (batch, dim) -> (batch, dim) (inputs in `adaptation_basis` coordinates).
    """

    def __init__(self, dim: int, shrinkage: float = 1.0, length_norm: bool = False,
                 support_weight: float = 0.0):
        super().__init__()
        self.length_norm = length_norm
        self.register_buffer("matrix", torch.eye(dim), persistent=False)
        self._eigen: tuple[torch.Tensor, torch.Tensor] | None = None  # (e, V) once fitted
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
            self.matrix.copy_((eigenvectors * (eigenvalues + self._ridge()).rsqrt()).to(self.matrix))

    @property
    def support_weight(self) -> float:
        return self._support_weight

    @support_weight.setter
    def support_weight(self, value: float) -> None:
        if not 0 <= value <= 1:
            raise ValueError(f"whitening support_weight must be in [0, 1]; got {value}")
        self._support_weight = float(value)

    def _ridge(self) -> torch.Tensor:
        """What shrinkage adds to every eigenvalue: shrinkage times their mean (0-d, float64)."""
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
        residuals = _within_class_residuals(embeddings.double(), labels)
        covariance = residuals.T @ residuals / (len(labels) - n_classes)
        with one_thread():  # a 256 x 256 eigh: many times slower on 2 threads (fewzero.threads)
            eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        self._eigen = (eigenvalues.clamp(min=0), eigenvectors)
        self.shrinkage = self._shrinkage  # computes the matrix

    def adapts(self, n_shot: int) -> bool:
        """Whether `adapt` changes anything for supports with up to `n_shot` clips per class."""
        return self._support_weight > 0 and n_shot > 1 and self._eigen is not None

    def _fitted_eigen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training within-class covariance's (eigenvalues (dim,), ascending, clamped at 0;
        eigenvectors (dim, dim), one per column), in float64; a RuntimeError before `fit`."""
        if self._eigen is None:
            raise RuntimeError("Fit the whitening (fit(embeddings, labels)) before adapting it.")
        return self._eigen

    def _basis_scales(self) -> torch.Tensor:
        """(dim,) eigenvalues of (1 - w) C_train + ridge I, in the eigenbasis of C_train."""
        return (1 - self._support_weight) * self._eigen[0] + self._ridge()

    def adaptation_basis(self) -> torch.Tensor:
        """(dim, dim) whitening of (1 - w) C_train + ridge I, the training part of the
        support-adapted covariance (`matrix` when w = 0). `adapt` works on embeddings already
        multiplied by it, so evaluation multiplies every clip once, not once per episode."""
        eigenvalues, eigenvectors = self._fitted_eigen()
        return (eigenvectors * self._basis_scales().rsqrt()).to(self.matrix)

    @torch.no_grad()
    def adapt(self, support: torch.Tensor, labels: torch.Tensor
              ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The support-adapted whitening of one episode, as a map of (batch, dim) embeddings in
        `adaptation_basis` coordinates to (batch, dim) whitened (and length-normalised)
        embeddings, built from the episode's (n_support, dim) support embeddings in the same
        coordinates and their (n_support,) labels (queries never enter).

        The support's within-class scatter S is rescaled to C_train's trace and added with
        weight w: the inner products of the result are those of ((1 - w) C_train + ridge I +
        w k S)^-1, k = trace(C_train) / trace(S). In basis coordinates that is a low-rank update
        of the identity, so the map is x + ((x Q) (f - 1)) Q^T with Q and singular values s of
        the centred support and f = (1 + w k s^2)^-1/2: O(dim * n_support) per clip."""
        eigenvalues, _ = self._fitted_eigen()
        residuals = _within_class_residuals(support.double(), labels)
        # trace of the scatter in the embeddings' own coordinates (the basis scaled eigen-axis j
        # by scales[j] ** -1/2)
        raw_trace = (residuals.square() * self._basis_scales()).sum().clamp(min=1e-30)
        weight = self._support_weight * eigenvalues.sum() / raw_trace
        # right singular vectors of the (n_support, dim) residuals from their small Gram matrix;
        # near-zero ones (at least one per class) carry no spread and are dropped
        gram_values, gram_vectors = torch.linalg.eigh(residuals @ residuals.T)
        keep = gram_values > gram_values.max().clamp(min=1e-300) * 1e-10
        squared_singular = gram_values[keep]
        directions = (gram_vectors[:, keep].T @ residuals) / squared_singular.sqrt()[:, None]
        factor_minus_one = (1 + weight * squared_singular).rsqrt() - 1  # (rank,)
        directions, factor_minus_one = directions.to(support.dtype), factor_minus_one.to(support.dtype)

        def whiten(x: torch.Tensor) -> torch.Tensor:
            """(batch, dim) embeddings in `adaptation_basis` coordinates -> (batch, dim) whitened."""
            return self._normalise(x + ((x @ directions.T) * factor_minus_one) @ directions)

        return whiten

    def _normalise(self, whitened: torch.Tensor) -> torch.Tensor:
        """(batch, dim) -> (batch, dim): every row scaled to unit length with `length_norm`."""
        return nn.functional.normalize(whitened, dim=-1) if self.length_norm else whitened

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Whiten (batch, dim) embeddings with the training classes' `matrix`."""
        return self._normalise(embeddings @ self.matrix.to(embeddings))


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
        # the support-adapted whitening of the current episode, if any: (batch, dim) -> (batch, dim)
        self._adapted: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _whitened(self, z: torch.Tensor) -> torch.Tensor:
        """(batch, dim) backbone embeddings -> (batch, dim): whitened by the episode's
        support-adapted map where there is one, else by `whitening`, else as they are."""
        whiten = self._adapted if self._adapted is not None else self.whitening
        return whiten(z) if whiten is not None else z

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, F, T) -> (batch, dim) embeddings as evaluation compares them."""
        return self._whitened(self.backbone(x))

    def process_support_set(self, support: torch.Tensor, labels: torch.Tensor) -> None:
        """Store the prototypes of a support set: support (n_support, F, T) log-mel, labels
        (n_support,) in 0..n_way-1, every class at least once, in any order -> prototypes
        (n_way, dim) (and the support-adapted whitening, where the whitening adapts)."""
        n_way = int(labels.max()) + 1
        z = self.backbone(support)
        self._adapted = None
        if self.whitening is not None and self.whitening.adapts(int(torch.bincount(labels).max())):
            basis = self.whitening.adaptation_basis()
            adapt = self.whitening.adapt(z @ basis, labels)
            self._adapted = lambda embeddings: adapt(embeddings @ basis)
        self.prototypes = class_prototypes(self._whitened(z), labels, n_way)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """query (n_query, F, T) -> logits (n_query, n_way) against the last support set."""
        if self.prototypes is None:
            raise RuntimeError("Call process_support_set(support, labels) before forward(query).")
        return self.distance(self.embed(query), self.prototypes)
