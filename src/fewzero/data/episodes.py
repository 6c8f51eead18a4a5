"""Seeded N-way K-shot episodes as index arithmetic on an in-memory feature tensor.

Episode `i` is drawn with its own generator seeded with `stream_seed(seed, i)`, so an episode is
the same whichever worker, process or resume produces it, and the global RNGs are never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

# Knuth's multiplicative hash constant, 2**32 divided by the golden ratio (odd, so a bijection on
# 32 bits); see stream_seed
_SEED_SPREAD = 0x9E3779B9
# where the excerpt-crop stream of a seed starts, apart from its episode stream
CROP_STREAM = 7_919_000_000


def stream_seed(seed: int, index: int, offset: int = 0) -> int:
    """The generator seed of item `index` of run seed `seed`'s stream (`offset` apart from the
    seed's other streams).

    torch's CPU generator keeps a seed's low 32 bits, and `seed + index` would make item i of seed
    1 item i + 1 of seed 0: neighbouring seeds would train on the same data, shifted by one item,
    and a spread over seeds would leave out the draw of the data. So each seed's streams start at
    Knuth's multiplicative hash of the seed: those of seeds 0-999 start at least 1.9 M items apart
    (0-9999: 0.28 M), more than a run draws. Seed 0 maps to 0, so its streams are `index` (and
    `offset + index`), the ones every earlier seed-0 figure was measured on.
    """
    return (seed * _SEED_SPREAD + offset + index) % 2**32


def check_episode_feasible(class_counts: dict[str, int], n_way: int, n_shot: int, n_query: int,
                           split: str) -> None:
    """Raise a ValueError that names the fix when episodes cannot be drawn from these classes."""
    if min(n_way, n_shot, n_query) < 1:
        raise ValueError(f"{split} episodes need n_way, n_shot and n_query >= 1; got n_way={n_way}, "
                         f"n_shot={n_shot}, n_query={n_query}.")
    if n_way > len(class_counts):
        # an episode of one class measures nothing: below two classes, only more classes help
        fix = (f"Lower n_way for the {split} split or add classes to it (dataset.split.{split})."
               if len(class_counts) >= 2 else
               f"List at least {n_way} classes in dataset.split.{split}"
               + (" (validation episodes choose the checkpoint and the test whitening)."
                  if split == "val" else "."))
        raise ValueError(f"n_way={n_way} is larger than the {len(class_counts)} {split} classes "
                         f"{sorted(class_counts)}. {fix}")
    need = n_shot + n_query
    short = {name: count for name, count in class_counts.items() if count < need}
    if short:
        raise ValueError(
            f"{split} classes with fewer than n_shot + n_query = {n_shot} + {n_query} = {need} clips: "
            f"{short}. Lower n_shot/n_query, or use more folds/clips for these classes "
            f"(or remove them from dataset.split.{split})."
        )


@dataclass(frozen=True)
class EpisodeIndices:
    """Which clips make up one episode.

    Attributes:
        classes: (n_way,) positions in the sampler's class list.
        support: (n_way, n_shot) clip indices; row k belongs to classes[k].
        query: (n_way, n_query) clip indices.
    """

    classes: torch.Tensor
    support: torch.Tensor
    query: torch.Tensor


class EpisodeSampler:
    """Draws episode indices from a labelled clip set.

    Args:
        labels: (n_clips,) class id of every clip.
        class_ids: the class ids this split may use (others are never drawn).
        class_names: name of each id in `class_ids` (for error messages).
    """

    def __init__(self, labels: torch.Tensor, class_ids: Sequence[int], class_names: Sequence[str],
                 n_way: int, n_shot: int, n_query: int, seed: int, split: str = "train"):
        self.n_way, self.n_shot, self.n_query, self.seed = n_way, n_shot, n_query, seed
        self.class_ids = torch.as_tensor(list(class_ids), dtype=torch.long)
        members = [torch.nonzero(labels == c).flatten() for c in self.class_ids.tolist()]
        counts = {name: len(m) for name, m in zip(class_names, members, strict=True)}
        check_episode_feasible(counts, n_way, n_shot, n_query, split)
        self.counts = torch.tensor([len(m) for m in members])
        # (n_classes, max_count) clip indices, padded with -1: sampling becomes one argsort.
        self.members = torch.full((len(members), int(self.counts.max())), -1, dtype=torch.long)
        for row, m in enumerate(members):
            self.members[row, : len(m)] = m

    def episode(self, index: int) -> EpisodeIndices:
        generator = torch.Generator().manual_seed(stream_seed(self.seed, index))
        classes = torch.randperm(len(self.class_ids), generator=generator)[: self.n_way]
        counts = self.counts[classes]
        keys = torch.rand(self.n_way, self.members.shape[1], generator=generator)
        keys[torch.arange(self.members.shape[1]) >= counts[:, None]] = 2.0  # padding sorts last
        order = keys.argsort(dim=1)[:, : self.n_shot + self.n_query]
        picked = self.members[classes[:, None], order]
        return EpisodeIndices(classes, picked[:, : self.n_shot], picked[:, self.n_shot :])


def excerpt_room(excerpt_frames: int, clip_frames: int) -> int:
    """The latest frame an excerpt may start at, `clip_frames - excerpt_frames`; raise a
    ValueError naming the fix when the excerpt is longer than the cached clips."""
    room = clip_frames - excerpt_frames
    if room < 0:
        raise ValueError(f"Excerpts of {excerpt_frames} frames are longer than the cached clips "
                         f"({clip_frames} frames): lower dataset.excerpt_seconds or raise "
                         "dataset.features.clip_seconds.")
    return room


def crop_frames(features: torch.Tensor, index: torch.Tensor, starts: torch.Tensor,
                length: int) -> torch.Tensor:
    """Gather excerpts: features (n_clips, F, T), index (n,), starts (n,) -> (n, F, length)."""
    frames = starts[:, None] + torch.arange(length)  # (n, length)
    clips = features[index]
    return clips.gather(2, frames[:, None, :].expand(-1, clips.shape[1], -1))


class EpisodeDataset(Dataset):
    """Map-style dataset whose item `i` is episode `first_episode + i`, cut from `features`
    (n_clips, F, clip_frames), the rows the sampler's clip indices point to.

    Each item is a dict:
        support: (n_way * n_shot, F, excerpt_frames), class-major order.
        support_labels: (n_way * n_shot,) episode-local labels 0..n_way-1.
        query: (n_way * n_query, F, excerpt_frames).
        query_labels: (n_way * n_query,).
        classes: (n_way,) global class ids of the episode's classes.
    Excerpts start at a random frame (seeded per episode) in [0, max_start] when `random_crop`
    (max_start None: anywhere in the clip), else at frame 0.
    """

    def __init__(self, features: torch.Tensor, sampler: EpisodeSampler, n_episodes: int,
                 excerpt_frames: int, random_crop: bool = True, first_episode: int = 0,
                 max_start: int | None = None):
        self.max_start = excerpt_room(excerpt_frames, features.shape[-1])
        self.features, self.sampler = features, sampler
        self.n_episodes, self.excerpt_frames = n_episodes, excerpt_frames
        self.random_crop, self.first_episode = random_crop, first_episode
        if max_start is not None:
            self.max_start = min(self.max_start, max_start)

    def __len__(self) -> int:
        return self.n_episodes

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        index = self.first_episode + i
        ep = self.sampler.episode(index)
        n_way, n_shot, n_query = ep.support.shape[0], ep.support.shape[1], ep.query.shape[1]
        clip_index = torch.cat([ep.support.flatten(), ep.query.flatten()])
        if self.random_crop and self.max_start > 0:
            # a second stream, so crop draws never shift which clips an episode picks
            generator = torch.Generator().manual_seed(stream_seed(self.sampler.seed, index, CROP_STREAM))
            starts = torch.randint(0, self.max_start + 1, (len(clip_index),), generator=generator)
        else:
            starts = torch.zeros(len(clip_index), dtype=torch.long)
        x = crop_frames(self.features, clip_index, starts, self.excerpt_frames)
        n_support = n_way * n_shot
        return {
            "support": x[:n_support],
            "support_labels": torch.arange(n_way).repeat_interleave(n_shot),
            "query": x[n_support:],
            "query_labels": torch.arange(n_way).repeat_interleave(n_query),
            "classes": self.sampler.class_ids[ep.classes],
        }
