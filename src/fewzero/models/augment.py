"""Training-time augmentation of log-mel excerpts (applied on the batch, on its device)."""

from __future__ import annotations

import math

import torch
from torch import nn


class LogMelAugment(nn.Module):
    """Random gain, mel-axis shift and SpecAugment-style masks for (batch, n_mels, frames).

    Args:
        gain_db: per-excerpt gain uniformly in +-gain_db (added in the natural-log power domain).
        max_shift_bins: per-excerpt shift of the mel axis by up to this many bins (zero-filled
            with the clip's minimum), a cheap stand-in for transposition.
        freq_mask_bins: width up to which one band of mel bins is set to the excerpt minimum.
        time_mask_frames: width up to which one span of frames is set to the excerpt minimum.
    Uses the global torch RNG (seeded by `seed_everything`), so runs are repeatable.
    """

    def __init__(self, gain_db: float = 0.0, max_shift_bins: int = 0, freq_mask_bins: int = 0,
                 time_mask_frames: int = 0):
        super().__init__()
        self.gain = gain_db * math.log(10) / 10
        self.max_shift_bins = max_shift_bins
        self.freq_mask_bins, self.time_mask_frames = freq_mask_bins, time_mask_frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        batch, n_mels, n_frames = x.shape
        floor = x.amin(dim=(1, 2), keepdim=True)
        if self.gain > 0:
            x = x + (torch.rand(batch, 1, 1, device=x.device) * 2 - 1) * self.gain
        if self.max_shift_bins > 0:
            shifts = torch.randint(-self.max_shift_bins, self.max_shift_bins + 1, (batch,),
                                   device=x.device)
            source = torch.arange(n_mels, device=x.device)[None, :] - shifts[:, None]  # (b, F)
            valid = (source >= 0) & (source < n_mels)
            gathered = x.gather(1, source.clamp(0, n_mels - 1)[:, :, None].expand(-1, -1, n_frames))
            x = torch.where(valid[:, :, None], gathered, floor)
        x = self._mask(x, floor, self.freq_mask_bins, dim=1)
        return self._mask(x, floor, self.time_mask_frames, dim=2)

    @staticmethod
    def _mask(x: torch.Tensor, floor: torch.Tensor, max_width: int, dim: int) -> torch.Tensor:
        if max_width <= 0:
            return x
        size = x.shape[dim]
        width = torch.randint(0, max_width + 1, (x.shape[0], 1), device=x.device)
        start = (torch.rand(x.shape[0], 1, device=x.device) * (size - width + 1)).long()
        position = torch.arange(size, device=x.device)[None, :]
        masked = (position >= start) & (position < start + width)  # (batch, size)
        masked = masked[:, :, None] if dim == 1 else masked[:, None, :]
        return torch.where(masked, floor, x)
