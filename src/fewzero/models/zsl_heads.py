"""Compatibility heads for zero-shot learning: audio embeddings x class vectors -> scores.

Every head maps audio embeddings (batch, audio_dim) and class side information
(n_classes, side_dim) into one shared space (`embed_audio`, `embed_classes`) and scores every
pair there (`forward`: (batch, n_classes), higher = more compatible). Prediction is the
best-scoring class among the candidates of the evaluation setting.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fewzero.models.settings import dropout_probability, size


def _check_dims(audio: torch.Tensor, side: torch.Tensor, audio_dim: int, side_dim: int) -> None:
    if audio.ndim != 2 or audio.shape[1] != audio_dim or side.ndim != 2 or side.shape[1] != side_dim:
        raise ValueError(f"Expected audio (batch, {audio_dim}) and class vectors (n_classes, "
                         f"{side_dim}); got {tuple(audio.shape)} and {tuple(side.shape)}. Check "
                         "model.head sizes against the backbone and ${side_info.dim}.")


class CompatibilityHead(nn.Module):
    """Base: `forward(audio, side)` = `score(embed_audio(audio), embed_classes(side))`."""

    closed_form = False  # True: fitted in closed form on frozen embeddings, not by gradients

    def __init__(self, audio_dim: int, side_dim: int):
        super().__init__()
        self.audio_dim, self.side_dim = audio_dim, side_dim

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """(batch, audio_dim) audio embeddings -> (batch, d) in the shared space; d is the
        head's own (see each head's overrides)."""
        raise NotImplementedError

    def embed_classes(self, side: torch.Tensor) -> torch.Tensor:
        """(n_classes, side_dim) class vectors -> (n_classes, d) in the same shared space."""
        raise NotImplementedError

    def score(self, audio: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Dot product in the shared space: (batch, d), (n_classes, d) -> (batch, n_classes)."""
        return audio @ classes.T

    def forward(self, audio: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """audio (batch, audio_dim), side (n_classes, side_dim) -> scores (batch, n_classes)."""
        _check_dims(audio, side, self.audio_dim, self.side_dim)
        return self.score(self.embed_audio(audio), self.embed_classes(side))


class SiameseHead(CompatibilityHead):
    """The tutorial's siamese network head (`WordAudioSiameseNetwork`): one linear projection per
    branch into a common `embed_dim`-d space, each followed by a sigmoid; scores are cosine
    similarities (what its triplet loss compares).
    """

    def __init__(self, audio_dim: int, side_dim: int, embed_dim: int = 128,
                 activation: str = "sigmoid"):
        super().__init__(audio_dim, side_dim)
        if activation not in ("sigmoid", "none"):
            raise ValueError(f"activation must be 'sigmoid' (tutorial) or 'none'; got {activation!r}")
        self.activation = torch.sigmoid if activation == "sigmoid" else nn.Identity()
        embed_dim = size(embed_dim, "model.head.embed_dim")
        self.audio_projection = nn.Linear(audio_dim, embed_dim)
        self.side_projection = nn.Linear(side_dim, embed_dim)

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """(batch, audio_dim) -> (batch, embed_dim), unit length."""
        return F.normalize(self.activation(self.audio_projection(audio)), dim=-1)

    def embed_classes(self, side: torch.Tensor) -> torch.Tensor:
        """(n_classes, side_dim) -> (n_classes, embed_dim), unit length."""
        return F.normalize(self.activation(self.side_projection(side)), dim=-1)


class DeviseHead(CompatibilityHead):
    """DeViSE (Frome et al., 2013): a linear map of audio into the side-information space, scored
    by cosine similarity with the (fixed) class vectors.
    """

    def __init__(self, audio_dim: int, side_dim: int):
        super().__init__(audio_dim, side_dim)
        self.projection = nn.Linear(audio_dim, side_dim, bias=False)

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """(batch, audio_dim) -> (batch, side_dim), unit length."""
        return F.normalize(self.projection(audio), dim=-1)

    def embed_classes(self, side: torch.Tensor) -> torch.Tensor:
        """(n_classes, side_dim) -> (n_classes, side_dim), unit length."""
        return F.normalize(side, dim=-1)


class BilinearHead(CompatibilityHead):
    """ALE-style bilinear compatibility (Akata et al., 2016): score = a^T W s, unnormalised, so
    the scores can serve directly as logits (`loss=cross_entropy`). The shared space is the side
    space: embed_audio(a) = W^T a.
    """

    def __init__(self, audio_dim: int, side_dim: int, dropout: float = 0.0):
        super().__init__(audio_dim, side_dim)
        self.dropout = nn.Dropout(dropout_probability(dropout, "model.head.dropout"))
        self.projection = nn.Linear(audio_dim, side_dim, bias=False)

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """(batch, audio_dim) -> (batch, side_dim), unnormalised."""
        return self.projection(self.dropout(audio))

    def embed_classes(self, side: torch.Tensor) -> torch.Tensor:
        """(n_classes, side_dim), unchanged."""
        return side


class EszslHead(CompatibilityHead):
    """ESZSL (Romera-Paredes & Torr, 2015), fitted in closed form on frozen audio embeddings:

        V = (X^T X + gamma I)^-1 X^T Y S (S^T S + lambda I)^-1,   score = x^T V s

    with X (n, audio_dim) L2-normalised embeddings, Y (n, n_classes) in {-1, +1}, S
    (n_classes, side_dim) the training classes' vectors.

    X holds every training batch embedded so far (every epoch's), so gamma weighs against the
    number of embedded examples: k epochs of the same features act as gamma / k. Validation and
    the refit train for the same length, so the gamma validation chose is the one the refit uses.
    """

    closed_form = True

    def __init__(self, audio_dim: int, side_dim: int, gamma: float = 1.0, lam: float = 1.0):
        super().__init__(audio_dim, side_dim)
        self.gamma, self.lam = gamma, lam
        self.register_buffer("weight", torch.zeros(audio_dim, side_dim))

    @torch.no_grad()
    def fit(self, audio: torch.Tensor, labels: torch.Tensor, side: torch.Tensor) -> None:
        """audio (n, audio_dim), labels (n,) in 0..n_classes-1, side (n_classes, side_dim)."""
        _check_dims(audio, side, self.audio_dim, self.side_dim)
        x = F.normalize(audio.double(), dim=-1)
        s = side.double()
        y = -torch.ones(len(labels), len(s), dtype=torch.float64, device=x.device)
        y[torch.arange(len(labels)), labels] = 1.0
        eye_a = torch.eye(self.audio_dim, dtype=torch.float64, device=x.device)
        eye_s = torch.eye(self.side_dim, dtype=torch.float64, device=x.device)
        left = torch.linalg.solve(x.T @ x + self.gamma * eye_a, x.T @ y @ s)  # (audio_dim, side_dim)
        weight = torch.linalg.solve(s.T @ s + self.lam * eye_s, left.T).T
        self.weight.copy_(weight.to(self.weight.dtype))

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """(batch, audio_dim) -> (batch, side_dim): the L2-normalised audio times V."""
        return F.normalize(audio, dim=-1) @ self.weight

    def embed_classes(self, side: torch.Tensor) -> torch.Tensor:
        """(n_classes, side_dim), unchanged."""
        return side


def solve_symmetric_sylvester(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """W with a W + W b = c for symmetric positive semi-definite a (k, k) and b (d, d), c (k, d).

    With a = U diag(p) U^T and b = V diag(q) V^T: W = U [(U^T c V) / (p_i + q_j)] V^T (the
    Bartels-Stewart solution, in eigenvectors since both matrices are symmetric). Where
    p_i + q_j vanishes (both singular, e.g. fewer samples than dimensions) the component is set
    to 0: the minimum-norm solution.
    """
    p, u = torch.linalg.eigh(a)
    q, v = torch.linalg.eigh(b)
    denominator = p[:, None] + q[None, :]
    solvable = denominator > 1e-10 * denominator.abs().max()
    ratio = torch.where(solvable, (u.T @ c @ v) / denominator.where(solvable, 1.0), 0.0)
    return u @ ratio @ v.T


class SaeHead(CompatibilityHead):
    """Semantic autoencoder (Kodirov, Xiang & Gong, CVPR 2017), fitted in closed form on frozen
    embeddings. The encoder W (side_dim, audio_dim) maps a sample to its class vector and its
    transpose maps back:

        min_W ||X - W^T S||^2 + lam ||W X - S||^2
        =>  S S^T W + W (lam X X^T) = (1 + lam) S X^T   (a Sylvester equation)

    with X (audio_dim, n) L2-normalised embeddings and S (side_dim, n) each sample's class vector.
    `direction="f2s"` scores cos(W x, s) in the side space; "s2f" scores cos(x, W^T s) in the
    embedding space (the paper reports both).
    """

    closed_form = True

    def __init__(self, audio_dim: int, side_dim: int, lam: float = 0.2, direction: str = "f2s"):
        super().__init__(audio_dim, side_dim)
        if direction not in ("f2s", "s2f"):
            raise ValueError(f"direction must be 'f2s' (features to side space) or 's2f'; got {direction!r}")
        self.lam, self.direction = lam, direction
        self.register_buffer("weight", torch.zeros(side_dim, audio_dim))

    @torch.no_grad()
    def fit(self, audio: torch.Tensor, labels: torch.Tensor, side: torch.Tensor) -> None:
        """audio (n, audio_dim), labels (n,) in 0..n_classes-1, side (n_classes, side_dim)."""
        _check_dims(audio, side, self.audio_dim, self.side_dim)
        x = F.normalize(audio.double(), dim=-1).T  # (audio_dim, n)
        s = side.double()[labels].T  # (side_dim, n)
        weight = solve_symmetric_sylvester(s @ s.T, self.lam * x @ x.T, (1 + self.lam) * s @ x.T)
        self.weight.copy_(weight.to(self.weight.dtype))

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """(batch, audio_dim) -> unit-length (batch, side_dim) for "f2s" (W x), (batch,
        audio_dim) for "s2f" (x itself)."""
        audio = F.normalize(audio, dim=-1)
        return F.normalize(audio @ self.weight.T, dim=-1) if self.direction == "f2s" else audio

    def embed_classes(self, side: torch.Tensor) -> torch.Tensor:
        """(n_classes, side_dim) -> unit-length (n_classes, side_dim) for "f2s" (s itself),
        (n_classes, audio_dim) for "s2f" (W^T s)."""
        return F.normalize(side if self.direction == "f2s" else side @ self.weight, dim=-1)


class ConseHead(DeviseHead):
    """DeViSE training with ConSE inference (Norouzi et al., 2014).

    Training is DeViSE's (cosine scores of the mapped audio against the training classes). At
    evaluation the mapped audio is replaced by the convex combination of the training classes'
    vectors weighted by the softmax of those scores over the `top_t` best training classes, and
    every candidate is scored by cosine against it: a clip is placed among the classes it sounds
    like, not at a point of the side space that no training class anchored.

    `set_anchors(side)` (called by the module in `setup`) stores the training classes' vectors.
    """

    def __init__(self, audio_dim: int, side_dim: int, top_t: int = 3, temperature: float = 0.1):
        super().__init__(audio_dim, side_dim)
        self.top_t, self.temperature = top_t, temperature
        self.register_buffer("anchors", torch.zeros(0, side_dim), persistent=False)

    def set_anchors(self, side: torch.Tensor) -> None:
        """side: (n_train_classes, side_dim) vectors of the training classes."""
        self.anchors = F.normalize(side.detach(), dim=-1)

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """(batch, audio_dim) -> (batch, side_dim), unit length: DeViSE's mapping in training
        (or before `set_anchors`), the softmax-weighted mix of the `top_t` nearest training
        classes' vectors at evaluation."""
        mapped = super().embed_audio(audio)
        if self.training or len(self.anchors) == 0:
            return mapped
        weights = (mapped @ self.anchors.T / self.temperature).softmax(dim=-1)  # (batch, n_train)
        top = weights.topk(min(self.top_t, weights.shape[1]), dim=-1)
        kept = torch.zeros_like(weights).scatter(-1, top.indices, top.values)
        return F.normalize(kept @ self.anchors, dim=-1)
