"""A pitch-range prior for zero-shot scores: what note a clip plays, against each class's range.

Pitch is a property of the note, not of the instrument, so a pitch classifier learnt on the seen
classes' training clips (their metadata pitch) transfers to unseen instruments, unlike a class
posterior. Each class's documented playing range (the attribute table's `range_low` /
`range_high`, organology facts written before any audio was seen) then gives a likelihood of the
clip under that class: uniform over its range, a small floor outside it. The model's class
scores get `weight * log p(clip's pitch | class)` added at evaluation: with `weight` = the
InfoNCE temperature this is the Bayes combination of the trained softmax posterior and the range
likelihood (the two taken as independent evidence); no test data sets it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewzero.data.clips import check_instruments


class PitchRangePrior(nn.Module):
    """Pitch head on the audio embedding + per-class playing ranges.

    Args:
        audio_dim: size of the audio embedding the pitch head reads.
        table: class name -> a row with `range_low` and `range_high` (MIDI numbers, sounding
            pitch), e.g. `${side_info.table}` of the attribute table.
        low_pitch, high_pitch: MIDI span of the pitch head's classes; training pitches outside
            it, and unknown ones (-1), are ignored.
        loss_weight: weight of the pitch cross-entropy added to the training loss.
        weight: scale of the log-likelihood added to the head's scores at evaluation.
        floor: likelihood mass a class gives to a pitch outside its range (relative to one
            in-range pitch), so a slightly out-of-range or mis-estimated note is not ruled out.
        detach: train the pitch head on a detached embedding (a probe; the encoder learns only
            from the zero-shot loss).
    """

    def __init__(self, audio_dim: int, table: Mapping[str, Mapping[str, Any]] | None, low_pitch: int = 21,
                 high_pitch: int = 108, loss_weight: float = 1.0, weight: float = 0.1,
                 floor: float = 0.01, detach: bool = False):
        super().__init__()
        if not low_pitch < high_pitch:
            raise ValueError(f"pitch_prior.low_pitch ({low_pitch}) must be below high_pitch ({high_pitch}).")
        if weight < 0 or loss_weight < 0 or not 0 < floor < 1:
            raise ValueError("pitch_prior needs weight >= 0, loss_weight >= 0 and 0 < floor < 1; got "
                             f"weight={weight}, loss_weight={loss_weight}, floor={floor}.")
        if table is None:
            raise ValueError("model.pitch_prior needs each class's playing range: use "
                             "side_info=attributes (its table has range_low/range_high) or set "
                             "model.pitch_prior.table to {class name: {range_low: MIDI, range_high: "
                             "MIDI}}.")
        self.ranges = {name: (int(row["range_low"]), int(row["range_high"]))
                       for name, row in dict(table).items()
                       if "range_low" in row and "range_high" in row}
        self.low_pitch, self.high_pitch = int(low_pitch), int(high_pitch)
        self.loss_weight, self.weight, self.floor, self.detach = loss_weight, weight, floor, detach
        self.pitch_head = nn.Linear(audio_dim, self.high_pitch - self.low_pitch + 1)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """(batch, audio_dim) -> (batch, n_pitches) pitch logits (low_pitch .. high_pitch)."""
        return self.pitch_head(audio.detach() if self.detach else audio)

    def predicted_pitches(self, audio: torch.Tensor) -> torch.Tensor:
        """(batch, audio_dim) -> (batch,) the most probable MIDI pitch of every clip."""
        return self(audio).argmax(dim=1) + self.low_pitch

    def loss(self, audio: torch.Tensor, pitches: torch.Tensor) -> torch.Tensor:
        """Weighted cross-entropy of the pitch head. pitches: (batch,) MIDI numbers, -1 unknown."""
        targets = pitches - self.low_pitch
        targets = targets.masked_fill((pitches < self.low_pitch) | (pitches > self.high_pitch), -100)
        if bool((targets < 0).all()):
            return audio.new_zeros(())  # no known pitch in this batch
        return self.loss_weight * F.cross_entropy(self(audio), targets, ignore_index=-100)

    def range_likelihoods(self, class_names: Sequence[str]) -> torch.Tensor:
        """(n_classes, n_pitches): p(pitch | class), uniform over the class's range plus the floor.

        Raises a ValueError naming the classes that have no range in the table.
        """
        check_instruments(class_names, list(self.ranges), what="pitch_prior.table class with a range")
        pitches = torch.arange(self.low_pitch, self.high_pitch + 1)
        inside = torch.stack([(pitches >= self.ranges[n][0]) & (pitches <= self.ranges[n][1])
                              for n in class_names]).float()
        if bool((inside.sum(dim=1) == 0).any()):
            empty = [n for n, row in zip(class_names, inside, strict=True) if not row.any()]
            raise ValueError(f"The ranges of {empty} lie outside pitch_prior's span "
                             f"{self.low_pitch}..{self.high_pitch}: widen low_pitch/high_pitch.")
        likelihood = inside + self.floor
        return likelihood / likelihood.sum(dim=1, keepdim=True)

    def log_likelihood(self, audio: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
        """log p(clip | class) through its pitch: log sum_p p(p | clip) p(p | class).

        Args:
            audio: (batch, audio_dim) embeddings; ranges: (n_classes, n_pitches) from
                `range_likelihoods`.
        Returns:
            (batch, n_classes).
        """
        return (self(audio).softmax(dim=1) @ ranges.T).clamp_min(1e-12).log()

    def adjust(self, scores: torch.Tensor, audio: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
        """(batch, n_classes) head scores + weight * range log-likelihood."""
        return scores + self.weight * self.log_likelihood(audio, ranges)
