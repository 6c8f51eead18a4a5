"""Training-time augmentation of log-mel excerpts (applied on the batch, on its device)."""

from __future__ import annotations

import math

import torch
from torch import nn

from fewzero.models.settings import non_negative


class LogMelAugment(nn.Module):
    """Random gain, mel-axis shift and SpecAugment-style masks for (batch, n_mels, frames).

    Args:
        gain_db: per-excerpt gain uniformly in +-gain_db (added in the natural-log power domain).
        max_shift_bins: per-excerpt shift of the mel axis by up to this many bins (the bins
            shifted in get the excerpt's minimum), a cheap stand-in for transposition.
        freq_mask_bins: width up to which one band of mel bins is set to the excerpt minimum.
        time_mask_frames: width up to which one span of frames is set to the excerpt minimum.
    The excerpt minimum is taken after the gain. Shifts and mask widths must be smaller than
    their axis, else whole excerpts could be blanked (`check_fits`: fewzero.train runs it on the
    datamodule's excerpt shape before any data are prepared, and each training batch again).
    Uses the global torch RNG (seeded by `seed_everything`), so runs are repeatable.
    """

    def __init__(self, gain_db: float = 0.0, max_shift_bins: int = 0, freq_mask_bins: int = 0,
                 time_mask_frames: int = 0):
        super().__init__()
        self.gain = non_negative(gain_db, "model.augment.gain_db", whole=False) * math.log(10) / 10
        self.max_shift_bins = int(non_negative(max_shift_bins, "model.augment.max_shift_bins", whole=True))
        self.freq_mask_bins = int(non_negative(freq_mask_bins, "model.augment.freq_mask_bins", whole=True))
        self.time_mask_frames = int(non_negative(time_mask_frames, "model.augment.time_mask_frames",
                                                 whole=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) natural-log mel excerpts -> the same shape, augmented; in eval
        mode `x` itself."""
        if not self.training:
            return x
        batch, n_mels, n_frames = x.shape
        self.check_fits(n_mels, n_frames)
        if self.gain > 0:
            x = x + (torch.rand(batch, 1, 1, device=x.device) * 2 - 1) * self.gain
        floor = x.amin(dim=(1, 2), keepdim=True)
        if self.max_shift_bins > 0:
            shifts = torch.randint(-self.max_shift_bins, self.max_shift_bins + 1, (batch,),
                                   device=x.device)
            source = torch.arange(n_mels, device=x.device)[None, :] - shifts[:, None]  # (b, F)
            valid = (source >= 0) & (source < n_mels)
            gathered = x.gather(1, source.clamp(0, n_mels - 1)[:, :, None].expand(-1, -1, n_frames))
            x = torch.where(valid[:, :, None], gathered, floor)
        x = self._mask(x, floor, self.freq_mask_bins, dim=1)
        return self._mask(x, floor, self.time_mask_frames, dim=2)

    def check_fits(self, n_mels: int, n_frames: int) -> None:
        """Raise a ValueError naming the model.augment key whose shift or mask width is not below
        its axis in excerpts of (n_mels, n_frames): it would blank whole excerpts."""
        for name, size, axis in (("max_shift_bins", n_mels, "mel bins"),
                                 ("freq_mask_bins", n_mels, "mel bins"),
                                 ("time_mask_frames", n_frames, "frames per excerpt")):
            value = getattr(self, name)
            if value >= size:
                raise ValueError(f"model.augment.{name}={value} would blank whole excerpts: they "
                                 f"have {size} {axis}. Set it below {size} (0 turns it off).")

    @staticmethod
    def _mask(x: torch.Tensor, floor: torch.Tensor, max_width: int, dim: int) -> torch.Tensor:
        """x (batch, n_mels, frames) with, in each excerpt, one span of 0..max_width positions of
        axis `dim` (1: mel bins, 2: frames) set to the excerpt's floor ((batch, 1, 1) minima)."""
        if max_width <= 0:
            return x
        size = x.shape[dim]
        width = torch.randint(0, max_width + 1, (x.shape[0], 1), device=x.device)
        start = (torch.rand(x.shape[0], 1, device=x.device) * (size - width + 1)).long()
        position = torch.arange(size, device=x.device)[None, :]
        masked = (position >= start) & (position < start + width)  # (batch, size)
        masked = masked[:, :, None] if dim == 1 else masked[:, None, :]
        return torch.where(masked, floor, x)
