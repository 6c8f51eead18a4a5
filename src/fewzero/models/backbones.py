"""Audio encoders: (batch, n_mels, n_frames) log-mel -> (batch, embedding_dim) embeddings
(and `IdentityEncoder` for precomputed feature vectors).

Every backbone reads the cached natural-log mel power (`fewzero.data.features`) and exposes
`embedding_dim`, so heads are sized by interpolation in the configs, never by poking.
"""

from __future__ import annotations

import torch
from torch import nn

from fewzero.models.settings import dropout_probability, size, sizes


def _check_input(x: torch.Tensor, n_mels: int) -> None:
    if x.ndim != 3 or x.shape[1] != n_mels:
        raise ValueError(f"Expected log-mel of shape (batch, {n_mels}, frames); got {tuple(x.shape)}. "
                         "Check that model.backbone.n_mels matches dataset.features.n_mels.")


class ConvGroupNormBlock(nn.Module):
    """Conv2d -> GroupNorm -> ReLU -> MaxPool2d, as in the tutorial's `music_fsl` ConvBlock.

    Shapes: (batch, in_channels, F, T) -> (batch, out_channels, F // pool, T // pool) ("same"
    padding; the pool drops a remainder).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_groups: int,
                 pool: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, 1, "same")
        self.norm = nn.GroupNorm(num_groups, out_channels)
        self.pool = nn.MaxPool2d(pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.norm(self.conv(x))))


class MusicFslCNN(nn.Module):
    """Re-implementation of the ISMIR 2022 tutorial backbone (`music_fsl.backbone.Backbone`).

    Five conv blocks (32, 64, 128, 256, 512 channels; GroupNorm with 8, 16, 32, 64, 128 groups;
    3x3 kernels and 2x2 pooling, then a 1x1 conv with 4x4 pooling), mean over time, flattened:
    512-d for the tutorial's 64 mel bins, 512 * (n_mels // 64) in general (`output_dim`).
    Like the tutorial it reads linear mel *power* (no log compression): `input_scale="power"`
    undoes the cache's log. Needs at least 64 mel bins and 64 frames (4 pools of 2, one of 4).

    Shapes: (batch, n_mels, frames) -> (batch, output_dim(n_mels)).
    """

    @staticmethod
    def output_dim(n_mels: int) -> int:
        """Embedding size for `n_mels` bins: 512 channels times the frequency bins the pools leave."""
        return 512 * (int(n_mels) // 16 // 4)

    def __init__(self, n_mels: int = 64, input_scale: str = "power", embedding_dim: int | None = None):
        super().__init__()
        n_mels = size(n_mels, "model.backbone.n_mels")  # 128.0, as dataset.features takes it: 128
        if n_mels < 64:
            raise ValueError(f"music_fsl_cnn needs at least 64 mel bins; got n_mels={n_mels}")
        self.embedding_dim = self.output_dim(n_mels)
        if embedding_dim is not None and embedding_dim != self.embedding_dim:
            raise ValueError(f"music_fsl_cnn embeddings are {self.embedding_dim}-d for {n_mels} mel "
                             f"bins (the architecture fixes it); got embedding_dim={embedding_dim}. "
                             "Leave model.backbone.embedding_dim to its interpolation from "
                             "dataset.features.n_mels (configs/model/backbone/music_fsl_cnn.yaml), "
                             "or change n_mels.")
        if input_scale not in ("power", "log"):
            raise ValueError(f"input_scale must be 'power' (tutorial) or 'log'; got {input_scale!r}")
        self.n_mels, self.input_scale = n_mels, input_scale
        self.blocks = nn.Sequential(
            ConvGroupNormBlock(1, 32, 3, 8, 2),
            ConvGroupNormBlock(32, 64, 3, 16, 2),
            ConvGroupNormBlock(64, 128, 3, 32, 2),
            ConvGroupNormBlock(128, 256, 3, 64, 2),
            ConvGroupNormBlock(256, 512, 1, 128, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.n_mels)
        if x.shape[-1] < 64:
            raise ValueError(f"music_fsl_cnn needs excerpts of at least 64 frames, got {x.shape[-1]}: "
                             "raise dataset.excerpt_seconds or lower features.hop_length.")
        if self.input_scale == "power":
            x = x.exp()
        x = self.blocks(x.unsqueeze(1))  # (batch, 512, 1, t')
        return x.mean(dim=-1).flatten(1)


class ConvBNBlock(nn.Module):
    """Conv2d 3x3 -> BatchNorm -> ReLU, optionally followed by 2x2 max pooling.

    Pooling runs before the ReLU: the two commute (max of rectified = rectified max), and
    rectifying after the pool touches a quarter of the values.

    Shapes: (batch, in_channels, F, T) -> (batch, out_channels, F // 2, T // 2) with `pool`,
    (batch, out_channels, F, T) without.
    """

    def __init__(self, in_channels: int, out_channels: int, pool: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pool(self.norm(self.conv(x))))


class TimbreCNN(nn.Module):
    """fewzero's default backbone: a compact BatchNorm CNN on log-mel that keeps frequency layout.

    Differences from the tutorial's network, each aimed at instrument timbre from few examples:
    log compression plus a learned per-mel-bin input standardisation (BatchNorm1d over bins),
    BatchNorm conv blocks, and a head that pools over time only (mean and max) and keeps the
    frequency axis, so spectral-envelope position (register, formants) survives, then a linear
    projection to `embedding_dim`.

    Shapes: (batch, n_mels, frames) -> (batch, embedding_dim).
    """

    def __init__(self, n_mels: int = 64, channels: tuple[int, ...] = (32, 64, 128, 128),
                 embedding_dim: int = 256, dropout: float = 0.1, keep_frequency: bool = True):
        super().__init__()
        self.n_mels = n_mels = size(n_mels, "model.backbone.n_mels")  # 128.0: 128, as dataset.features
        self.embedding_dim = size(embedding_dim, "model.backbone.embedding_dim")
        dropout = dropout_probability(dropout, "model.backbone.dropout")
        self.keep_frequency = keep_frequency
        channels = sizes(channels, "model.backbone.channels")
        self.min_size = 2 ** (len(channels) - 1)  # each block but the last halves both axes
        if n_mels < self.min_size:
            raise ValueError(f"timbre_cnn's {len(channels) - 1} poolings need at least {self.min_size} "
                             f"mel bins; got n_mels={n_mels}. Raise dataset.features.n_mels.")
        self.input_norm = nn.BatchNorm1d(n_mels)
        blocks, in_channels = [], 1
        for i, out_channels in enumerate(channels):
            blocks.append(ConvBNBlock(in_channels, out_channels, pool=i < len(channels) - 1))
            in_channels = out_channels
        # Channels-last conv weights make oneDNN run every block in its faster layout (the
        # activations follow the weights): about 25% less time per training step on 2 CPU cores.
        self.blocks = nn.Sequential(*blocks).to(memory_format=torch.channels_last)
        freq_bins = n_mels // 2 ** (len(channels) - 1) if keep_frequency else 1
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(2 * in_channels * freq_bins, embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.n_mels)
        if x.shape[-1] < self.min_size:
            raise ValueError(f"timbre_cnn needs excerpts of at least {self.min_size} frames, got "
                             f"{x.shape[-1]}: raise dataset.excerpt_seconds or lower "
                             "dataset.features.hop_length.")
        x = self.blocks(self.input_norm(x).unsqueeze(1))  # (batch, C, F', T')
        if not self.keep_frequency:
            x = x.flatten(2)[:, :, None, :]  # (batch, C, 1, F' * T'): pool over both axes
        pooled = torch.cat([x.mean(dim=-1), x.amax(dim=-1)], dim=1)  # (batch, 2C, F')
        return self.head(pooled.flatten(1))


class IdentityEncoder(nn.Module):
    """Precomputed features used as they are (xlsa17's ResNet-101 vectors): the heads then learn
    the whole mapping. No parameters.

    Shapes: (batch, embedding_dim) -> (batch, embedding_dim).
    """

    def __init__(self, embedding_dim: int = 2048):
        super().__init__()
        self.embedding_dim = embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.embedding_dim:
            raise ValueError(f"Expected features of shape (batch, {self.embedding_dim}); got "
                             f"{tuple(x.shape)}. Check model.backbone.embedding_dim against "
                             "dataset.feature_dim.")
        return x
