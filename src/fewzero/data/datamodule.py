"""LightningDataModule for episodic few-shot learning on class-disjoint instrument splits."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fewzero.data.clips import (
    ClipSource,
    check_fold,
    check_listed_once,
    check_split,
    check_split_shape,
    key_problems,
)
from fewzero.data.episodes import EpisodeDataset, EpisodeSampler, excerpt_room
from fewzero.data.features import FeatureTable, MelFeatures, prepare_and_load, prepare_cache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpisodeSettings:
    """One episode protocol. `name` (e.g. "5way_1shot") prefixes its metric keys."""

    n_way: int
    n_shot: int
    n_query: int
    n_episodes: int

    @property
    def name(self) -> str:
        return f"{self.n_way}way_{self.n_shot}shot"


EPISODE_KEYS = ("n_way", "n_shot", "n_query", "n_episodes")
EPISODE_EXAMPLE = "{n_way: 5, n_shot: 1, n_query: 15, n_episodes: 1000}"
# the least of each count an episode protocol can measure anything with
EPISODE_MINIMA = {"n_way": 2, "n_shot": 1, "n_query": 1, "n_episodes": 1}


def _settings(value: Any, key: str) -> EpisodeSettings:
    """The episode protocol at config key `key` (e.g. "dataset.episodes.test[1]"), or a ValueError
    naming the key and the fix: a mapping of the four whole counts of EPISODE_KEYS, each at least
    its EPISODE_MINIMA (a 1-way episode has one class to choose from: every query is right, so
    its accuracy is 1.0 whatever the model, and its training loss 0; no episodes score nothing)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{key} must be a mapping of {', '.join(EPISODE_KEYS)}, e.g. "
                         f"{EPISODE_EXAMPLE}; got {value!r}.")
    problems = key_problems(list(value), EPISODE_KEYS)
    if problems:
        raise ValueError(f"{key} {' and '.join(problems)}: an episode setting has exactly the keys "
                         f"{list(EPISODE_KEYS)}, e.g. {EPISODE_EXAMPLE}.")
    counts = {}
    for name in EPISODE_KEYS:
        number = value[name]
        whole = (isinstance(number, int) and not isinstance(number, bool)) or (
            isinstance(number, float) and number.is_integer())
        if not whole:
            raise ValueError(f"{key}.{name} must be a whole number; got {number!r}.")
        counts[name] = int(number)
    low = {name: n for name, n in counts.items() if n < EPISODE_MINIMA[name]}
    if low:
        why = (" A 1-way episode has one class to choose from: every query is right (accuracy 1.0 "
               "whatever the model) and the training loss is 0." if counts["n_way"] < 2 else "")
        raise ValueError(f"{key} has {', '.join(f'{n}={v}' for n, v in low.items())}: an episode "
                         f"setting needs n_way >= 2, n_shot, n_query and n_episodes >= 1.{why} "
                         f"Set them, e.g. {EPISODE_EXAMPLE}.")
    return EpisodeSettings(**counts)


def _test_settings(value: Any) -> list[EpisodeSettings]:
    """dataset.episodes.test: a non-empty list of episode settings (`_settings`)."""
    if isinstance(value, Mapping) or isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"dataset.episodes.test must be a list of episode settings, one per test "
                         f"protocol, e.g. 'dataset.episodes.test=[{EPISODE_EXAMPLE}]'; got {value!r}.")
    if not value:
        raise ValueError("dataset.episodes.test is empty: list at least one episode setting, e.g. "
                         f"'dataset.episodes.test=[{EPISODE_EXAMPLE}]' (test=false runs check them too).")
    return [_settings(s, f"dataset.episodes.test[{i}]") for i, s in enumerate(value)]


class ClipExcerpts(Dataset):
    """Fixed excerpts (frames [offset, offset + length)) of selected clips, for embedding once.

    Built from features (n_clips, n_mels, clip_frames) and labels (n_clips,) of every cached clip
    and the (n,) indices of the clips it serves, in that order.
    Items: {"x": (n_mels, length), "label": class id, "index": clip index}.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                 offset: int, length: int):
        self.features, self.labels, self.indices = features, labels, indices
        self.offset, self.length = offset, length

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        index = int(self.indices[i])
        x = self.features[index, :, self.offset : self.offset + self.length]
        return {"x": x, "label": self.labels[index], "index": torch.tensor(index)}


def excerpt_frames(features: MelFeatures, excerpt_seconds: float, eval_offset_seconds: float,
                   train_max_offset_seconds: float | None) -> tuple[int, int, int | None]:
    """The dataset's excerpt settings in frames of `features`: (excerpt length, evaluation start,
    latest training start or None: anywhere). Raise a ValueError naming the key and the fix, before
    any audio is decoded, when an excerpt is empty or longer than the cached clips, or when
    evaluation excerpts would run past the clip's end (cut short: shorter than training's) or
    start before it."""
    if not excerpt_seconds > 0:
        raise ValueError(f"dataset.excerpt_seconds must be positive; got {excerpt_seconds!r}.")
    length = features.frames(excerpt_seconds)
    room = excerpt_room(length, features.frames(features.clip_seconds))
    eval_offset = features.start_frame(eval_offset_seconds)
    if not 0 <= eval_offset <= room:
        raise ValueError(
            f"dataset.eval_offset_seconds={eval_offset_seconds} puts validation and test excerpts of "
            f"dataset.excerpt_seconds={excerpt_seconds} outside the cached "
            f"dataset.features.clip_seconds={features.clip_seconds} (they would be cut short, unlike "
            f"training's): set it between 0 and {room / features.frames_per_second:g}.")
    if train_max_offset_seconds is not None and train_max_offset_seconds < 0:
        raise ValueError(f"dataset.train_max_offset_seconds={train_max_offset_seconds} must be at "
                         "least 0 (0: every training excerpt starts at the clip's start), or null "
                         "(anywhere in the clip).")
    train_max_start = (None if train_max_offset_seconds is None
                       else features.start_frame(train_max_offset_seconds))
    return length, eval_offset, train_max_start


def processes(trainer: pl.Trainer | None) -> int:
    """The number of training processes (DDP's world size; 1 without a trainer)."""
    return trainer.world_size if trainer is not None else 1


def process_share(dataset: Dataset, trainer: pl.Trainer | None) -> DistributedSampler | None:
    """This process's share of a seeded training stream under DDP (w processes): rank r reads
    items r, r + w, r + 2w, ... in order, so one optimiser step consumes w consecutive items
    (episodes or excerpts) and no item is read twice. The stream starts where the steps taken
    left it (`StreamPosition`). (Lightning keeps a DistributedSampler it is given; its own
    would shuffle, and every epoch would restart at the step count, replaying half the last
    epoch.) None in one process."""
    if processes(trainer) == 1:
        return None
    return DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                              shuffle=False)


class StepResumedLoader(DataLoader):
    """A training loader that resumes exactly from a mid-epoch checkpoint by construction: the
    datamodule's `train_dataloader()` starts its seeded stream where the steps already taken left
    it (`StreamPosition.stream_start`, restored with the checkpoint by then).
    `state_dict`/`load_state_dict` tell Lightning so (else it warns that the loader is not
    resumable); the state is only where this loader's stream started (the dataset's
    `first_episode` or `first_item`), for reading.
    """

    def state_dict(self) -> dict[str, int]:
        first = getattr(self.dataset, "first_episode", getattr(self.dataset, "first_item", 0))
        return {"first": int(first)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        pass  # the position comes from the datamodule's restored state


class StreamPosition:
    """Where a datamodule's seeded training stream stands, saved in checkpoints (Lightning calls
    a datamodule's `state_dict` when it saves and `load_state_dict` when it resumes).

    Each optimiser step reads `items_per_step()` items of the stream (episodes, or excerpts), a
    number that grows with the processes. The stream position is kept as an anchor, (items read,
    global step) when this fit started, plus the steps taken since at the current rate, so a run
    resumed on another number of processes reads on from the item where the checkpoint stopped
    (no item read twice or skipped), and a resume on the same number reads what the uninterrupted
    run reads. A copy made for another fit (`_with_roles`) must call `restart_stream()`.
    """

    _stream_anchor: tuple[int, int] = (0, 0)  # (items read, global step) when this fit started

    def items_per_step(self) -> int:
        raise NotImplementedError

    def _global_step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def stream_start(self) -> int:
        """The stream item that the next optimiser step reads first."""
        items, step = self._stream_anchor
        return items + (self._global_step() - step) * self.items_per_step()

    def restart_stream(self) -> None:
        self._stream_anchor = (0, 0)

    def state_dict(self) -> dict[str, int]:
        return {"stream_items_read": self.stream_start(), "global_step": self._global_step(),
                "items_per_step": self.items_per_step()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if "stream_items_read" not in state_dict:
            return  # a checkpoint from before the position was saved: steps x this rate
        self._stream_anchor = (int(state_dict["stream_items_read"]), int(state_dict["global_step"]))
        fitting = self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if fitting and int(state_dict["items_per_step"]) != self.items_per_step():
            log.warning("This resume reads %d training item(s) per optimiser step, the checkpointed "
                        "run %d (another number of processes): training reads on from stream item "
                        "%d, where the checkpoint stopped, so no item is read twice or skipped, but "
                        "the items of each step differ from an uninterrupted run's.",
                        self.items_per_step(), int(state_dict["items_per_step"]),
                        self._stream_anchor[0])


class FewShotDataModule(StreamPosition, pl.LightningDataModule):
    """Episodes over cached log-mel features, with train/val/test instrument lists disjoint.

    Args:
        source: a `ClipSource` (rendered SOL, TinySOL, ...).
        features: log-mel settings; features are cached under `cache_dir`.
        split: {"train": [...], "val": [...], "test": [...]} instrument names.
        episodes: {"train": {n_way, n_shot, n_query, n_episodes}, "val": {...},
                   "test": [{...}, ...]}, the test settings one per n_way/n_shot pair (their
            name). Training's n_episodes is the optimiser steps per epoch, each of one episode
            per process (under DDP, w processes read w episodes).
        excerpt_seconds: length of the excerpt the backbone sees. Training excerpts start at a
            random (seeded) time in [0, train_max_offset_seconds] (null: anywhere in the cached
            clip); validation and test excerpts start at `eval_offset_seconds`.
        seed: training-episode seed. Validation and test episodes use `eval_seed`, which does not
            change with the training seed, so every run is scored on identical episodes.
        train_frequency_scales: extra training classes: every training instrument again with its
            log-mel scaled in frequency by each factor (`MelFeatures.scale_frequency`: pitch and
            formants together, a smaller or larger instrument of the same kind), each a class of
            its own, as Snell et al. added rotated Omniglot characters as new classes. Empty:
            none. Validation and test never see them.
        folds: the folds whose clips this run reads, in every stage (None: every fold). A run
            meant to initialise a zero-shot encoder (`model.init_checkpoint`) must leave out the
            zero-shot split's test fold and validation fold: `[0, 1, 2]` for the defaults.
    """

    def __init__(self, source: ClipSource, features: MelFeatures, split: Mapping[str, Sequence[str]],
                 episodes: Mapping[str, Any], cache_dir: str | Path, excerpt_seconds: float = 1.0,
                 eval_offset_seconds: float = 0.0, train_max_offset_seconds: float | None = None,
                 seed: int = 0, eval_seed: int = 0,
                 num_workers: int = 0, eval_batch_size: int = 256,
                 train_frequency_scales: Sequence[float] = (), folds: Sequence[int] | None = None):
        super().__init__()
        self.source, self.features = source, features
        if folds is not None and not list(folds):
            raise ValueError("dataset.folds=[] reads no clip: list the folds to read, e.g. [0,1,2], "
                             "or null for every fold.")
        self.folds = None if folds is None else sorted(
            {check_fold(source, "dataset.folds", f) for f in folds})
        check_split_shape(split, "few-shot")
        self.split = {stage: list(split[stage]) for stage in ("train", "val", "test")}
        self.train_settings = _settings(episodes["train"], "dataset.episodes.train")
        self.val_settings = _settings(episodes["val"], "dataset.episodes.val")
        self.test_settings = _test_settings(episodes["test"])
        self.cache_dir = Path(cache_dir).expanduser()
        self.excerpt_seconds = excerpt_seconds
        self.excerpt_frames, self.eval_offset, self.train_max_start = excerpt_frames(
            features, excerpt_seconds, eval_offset_seconds, train_max_offset_seconds)
        self.seed, self.eval_seed = seed, eval_seed
        self.num_workers, self.eval_batch_size = num_workers, eval_batch_size
        self.train_frequency_scales = [float(f) for f in train_frequency_scales]
        if any(not 0 < f < float("inf") or f == 1.0 for f in self.train_frequency_scales):
            raise ValueError(f"dataset.train_frequency_scales must be positive and not 1.0 (the "
                             f"instruments themselves); got {self.train_frequency_scales}.")
        # a factor twice would make two training classes of the same clips, under two labels
        check_listed_once(self.train_frequency_scales, "dataset.train_frequency_scales", "factor")
        self.table: FeatureTable | None = None
        self._check_split()
        self._check_test_names()

    def _check_test_names(self) -> None:
        """Fail at construction on two test settings of one name (n_way and n_shot): their
        metrics (`test/<name>_acc`), results and figures would be one, belonging to neither."""
        by_name: dict[str, list[EpisodeSettings]] = {}
        for settings in self.test_settings:
            by_name.setdefault(settings.name, []).append(settings)
        shared = {name: group for name, group in by_name.items() if len(group) > 1}
        if shared:
            listed = "; ".join(f"{name}: " + ", ".join(
                f"{{n_query: {s.n_query}, n_episodes: {s.n_episodes}}}" for s in group)
                for name, group in shared.items())
            raise ValueError(f"dataset.episodes.test has several settings of the same n_way and "
                             f"n_shot ({listed}): their metrics, results and figures are named by "
                             "n_way and n_shot alone and would be mixed. Keep one setting per "
                             "n_way/n_shot pair (more queries or episodes in that one), and test "
                             "the other with python -m fewzero.eval.")

    def _check_split(self) -> None:
        """Fail at construction, before any audio is rendered: each stage lists a class once,
        and no class is in two stages."""
        for stage, names in self.split.items():
            check_listed_once(names, f"dataset.split.{stage}")
        stages = list(self.split)
        for i, a in enumerate(stages):
            for b in stages[i + 1 :]:
                shared = sorted(set(self.split[a]) & set(self.split[b]))
                if shared:
                    raise ValueError(f"Instrument(s) {shared} are in both the {a} and {b} splits. "
                                     "Few-shot splits must be class-disjoint: edit dataset.split.")

    def _check_classes(self, available: list[str]) -> None:
        """Raise when a split lists a class the source has no clips of (before any decoding)."""
        for stage, names in self.split.items():
            check_split(names, available, self.source, key=f"dataset.split.{stage}")

    # ---- data preparation -------------------------------------------------------------
    def prepare_data(self) -> None:
        """Render/check the audio, check the split and build the feature cache (rank 0 only
        under DDP)."""
        prepare_cache(self.source, self.features, self.cache_dir, self._check_classes)

    def setup(self, stage: str | None = None) -> None:
        if self.table is not None:
            return
        self.table = prepare_and_load(self.source, self.features, self.cache_dir,
                                      self._check_classes)
        self.class_names = sorted(set(self.table.instruments))
        name_to_id = {name: i for i, name in enumerate(self.class_names)}
        self.labels = torch.tensor([name_to_id[n] for n in self.table.instruments])
        if self.folds is not None:
            self._keep_folds()
        self.class_ids = {s: [name_to_id[n] for n in names] for s, names in self.split.items()}
        listed = {name for names in self.split.values() for name in names}
        left_out = [name for name in self.class_names if name not in listed]
        if left_out:  # no stage's classes: never a training, validation, reference or test clip
            log.info("%s instrument(s) %s are in none of dataset.split.train, val and test: none of "
                     "their clips is used.", self.source.name, left_out)
        self._build_training_pool()
        # Fail now, with the fix, rather than at the first validation or test epoch.
        self.sampler("train", self.train_settings, self.seed)
        self.sampler("val", self.val_settings, self.eval_seed)
        for settings in self.test_settings:
            self.sampler("test", settings, self.eval_seed)

    def _keep_folds(self) -> None:
        """Label the clips outside `folds` -1, so that no stage, episode or reference set
        ever reads them."""
        present = sorted(set(self.table.folds.tolist()))
        unknown = sorted(set(self.folds) - set(present))
        if unknown or not self.folds:
            raise ValueError(f"dataset.folds={self.folds} must be a non-empty subset of the folds of "
                             f"{self.source.name}, {present}.")
        outside = ~torch.isin(self.table.folds, torch.tensor(self.folds, dtype=torch.long))
        self.labels[outside] = -1
        log.info("Reading folds %s only: %d of %d clips", self.folds, int((~outside).sum()),
                 len(self.labels))

    def _build_training_pool(self) -> None:
        """Clips and classes training episodes draw from: the training instruments, plus one
        frequency-scaled copy of their clips per `train_frequency_scales` factor, labelled
        with new class ids after the real ones (`train_class_names` names them all)."""
        self.train_features, self.train_labels = self.table.features, self.labels
        self.train_class_ids, self.train_class_names = self.class_ids["train"], self.split["train"]
        if not self.train_frequency_scales:
            return
        clips = self.stage_indices("train")
        features, labels = [self.table.features], [self.labels]
        ids, names = list(self.train_class_ids), list(self.train_class_names)
        next_id = len(self.class_names)
        for factor in self.train_frequency_scales:
            features.append(self.features.scale_frequency(self.table.features[clips], factor))
            new_ids = {c: next_id + k for k, c in enumerate(self.class_ids["train"])}
            labels.append(torch.tensor([new_ids[int(c)] for c in self.labels[clips]]))
            ids += list(new_ids.values())
            names += [f"{n} x{factor:g}" for n in self.split["train"]]
            next_id += len(new_ids)
        self.train_features, self.train_labels = torch.cat(features), torch.cat(labels)
        self.train_class_ids, self.train_class_names = ids, names
        log.info("Training on %d classes: %s", len(names), ", ".join(names))

    def sampler(self, stage: str, settings: EpisodeSettings, seed: int) -> EpisodeSampler:
        """Episode sampler restricted to the classes of `stage` (for "train", the training pool)."""
        if stage == "train":
            labels, ids, names = self.train_labels, self.train_class_ids, self.train_class_names
        else:
            labels, ids, names = self.labels, self.class_ids[stage], self.split[stage]
        return EpisodeSampler(labels, ids, names, settings.n_way, settings.n_shot,
                              settings.n_query, seed, split=stage)

    def items_per_step(self) -> int:
        """Training episodes per optimiser step: one per process."""
        return processes(self.trainer)

    def stage_indices(self, stage: str) -> torch.Tensor:
        """(n,) indices of every clip whose class belongs to `stage`."""
        return torch.nonzero(torch.isin(self.labels, torch.tensor(self.class_ids[stage]))).flatten()

    # ---- loaders ----------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        # Continue the episode stream where the last optimiser step left it, also after a resume.
        # An epoch is n_episodes optimiser steps, of one episode per process.
        dataset = EpisodeDataset(self.train_features, self.sampler("train", self.train_settings,
                                                                   self.seed),
                                 self.train_settings.n_episodes * self.items_per_step(),
                                 self.excerpt_frames, random_crop=True,
                                 first_episode=self.stream_start(),
                                 max_start=self.train_max_start)
        return StepResumedLoader(dataset, batch_size=None, shuffle=False,
                                 sampler=process_share(dataset, self.trainer),
                                 num_workers=self.num_workers, persistent_workers=False)

    def _excerpts(self, stage: str) -> DataLoader:
        dataset = ClipExcerpts(self.table.features, self.labels, self.stage_indices(stage),
                               self.eval_offset, self.excerpt_frames)
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers)

    def reference_dataloader(self) -> DataLoader:
        """Evaluation excerpts of every training-instrument clip (the real instruments, not
        frequency-scaled copies), batched like validation: what evaluation-time statistics such
        as embedding whitening are fitted on, so that they never see a validation or test clip."""
        return self._excerpts("train")

    def val_dataloader(self) -> DataLoader:
        return self._excerpts("val")

    def test_dataloader(self) -> DataLoader:
        return self._excerpts("test")
