"""LightningDataModule for zero-shot learning: seen classes train, unseen classes only test.

Clip roles (folds as in the source; defaults val_fold=3, test_fold=4):

| role        | classes                              | folds                     |
| ----------- | ------------------------------------ | ------------------------- |
| train       | seen minus pseudo-unseen             | all but val and test fold |
| val seen    | seen minus pseudo-unseen             | val fold                  |
| val unseen  | pseudo-unseen (held-out seen classes)| all but test fold         |
| test seen   | seen (pseudo-unseen included)        | test fold                 |
| test unseen | unseen                               | every fold                |

Model selection and GZSL calibration see only the two validation roles, built from seen-class
data. `train_on="trainval"` (`for_trainval()`, the final fit of Xian et al.'s protocol, see
`fewzero.train.refit_on_trainval`) trains on every seen class, pseudo-unseen included, on every
fold but the test fold, and has no validation roles. No unseen clip and no test-fold clip ever
reaches a training or validation batch (checked in `setup` and again on every batch by
`assert_clean`); in the validation phase no pseudo-unseen or validation-fold clip reaches
training either (checked in `setup`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from fewzero.data.clips import ClipSource, check_fold, check_listed_once, check_split, check_split_shape
from fewzero.data.datamodule import (
    ClipExcerpts,
    StepResumedLoader,
    StreamPosition,
    excerpt_frames,
    process_share,
    processes,
)
from fewzero.data.episodes import crop_frames, excerpt_room, stream_seed
from fewzero.data.features import FeatureTable, MelFeatures, prepare_and_load, prepare_cache

log = logging.getLogger(__name__)


class BalancedExcerpts(Dataset):
    """Seeded random excerpts of training clips, classes drawn uniformly.

    Item `i` is drawn with its own generator seeded with `stream_seed(seed, first_item + i)` (a
    class, then a clip of that class, then a start frame in [0, max_start]), so the stream is the same
    whichever worker or resume produces it. Built from features (n_clips, n_mels, clip_frames)
    and labels (n_clips,) of every cached clip and the (n,) indices of the training clips.
    Items: {"x": (n_mels, length), "label": class id, "index": clip index}.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                 n_items: int, length: int, max_start: int, seed: int, first_item: int = 0):
        self.features, self.labels, self.length = features, labels, length
        self.n_items, self.max_start = n_items, max(0, max_start)
        self.seed, self.first_item = seed, first_item
        classes = labels[indices].unique()
        self.members = [indices[labels[indices] == c] for c in classes.tolist()]

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(stream_seed(self.seed, self.first_item + i))
        members = self.members[int(torch.randint(len(self.members), (1,), generator=generator))]
        index = members[torch.randint(len(members), (1,), generator=generator)]
        start = torch.randint(0, self.max_start + 1, (1,), generator=generator)
        x = crop_frames(self.features, index, start, self.length)[0]
        return {"x": x, "label": self.labels[index[0]], "index": index[0]}


def fit_classes(seen: Sequence[str], pseudo_unseen: Sequence[str] | None, train_on: str) -> list[str]:
    """The classes a fit trains against: every seen class in the "trainval" refit, the seen
    classes less the pseudo-unseen ones in the validation phase ("train")."""
    held_out = set(pseudo_unseen or ()) if train_on == "train" else set()
    return [name for name in seen if name not in held_out]


def one_sided_validation(pseudo_unseen: Sequence[str] | None, val_fold: int | None) -> str | None:
    """Why a zero-shot validation with these settings (`dataset.split.pseudo_unseen`,
    `dataset.val_fold`) scores one side only, and so chooses no GZSL calibration penalty: which
    setting leaves a side out. None when it scores both."""
    return ("dataset.split.pseudo_unseen is empty" if not pseudo_unseen
            else "dataset.val_fold is null" if val_fold is None else None)


class ZeroShotDataModule(StreamPosition, pl.LightningDataModule):
    """Batches of (excerpt, class id) for ZSL over cached log-mel features.

    Args:
        source: a `ClipSource` (rendered SOL, TinySOL, tones).
        features: log-mel settings (cached under `cache_dir`, shared with the few-shot datasets).
        split: {"seen": [...], "unseen": [...], "pseudo_unseen": [...]} instrument names;
            pseudo_unseen is a subset of seen held out of training for validation. Optional
            "pseudo_unseen_folds": [[...], ...], more such subsets for class cross-validation
            (`class_cv_folds`; the split's pseudo_unseen is fold 0).
        val_fold / test_fold: folds of seen classes held out for validation / test (val_fold
            null: no held-out seen clips; calibration then has no seen side and is skipped).
        batch_size, steps_per_epoch: training batches per epoch (validation runs after each).
        excerpt_seconds, eval_offset_seconds, train_max_offset_seconds: as `FewShotDataModule`.
        seed: training stream seed (evaluation sets are fixed, whole clips).
        train_on: "train" (validation phase: seen minus pseudo-unseen classes, minus the val fold)
            or "trainval" (every seen class on every fold but the test fold; no validation).
        refit_on_trainval: after validation, retrain from scratch in the "trainval" setting for
            the selected number of steps, keeping the calibration penalty, and test that model
            (Xian et al.'s protocol; done by `fewzero.train`).
    Class ids index `class_names` = seen + unseen, in the split's order.
    """

    refit_length = "steps"  # epochs are steps_per_epoch batches: a refit copies the step count

    def __init__(self, source: ClipSource, features: MelFeatures, split: Mapping[str, Sequence[str]],
                 cache_dir: str | Path, excerpt_seconds: float = 1.0, eval_offset_seconds: float = 0.0,
                 train_max_offset_seconds: float | None = None, val_fold: int | None = 3,
                 test_fold: int = 4, batch_size: int = 32, steps_per_epoch: int = 100, seed: int = 0,
                 num_workers: int = 0, eval_batch_size: int = 256, train_on: str = "train",
                 refit_on_trainval: bool = True):
        super().__init__()
        if train_on not in ("train", "trainval"):
            raise ValueError(f"dataset.train_on must be 'train' or 'trainval'; got {train_on!r}")
        self.train_on, self.refit_on_trainval = train_on, refit_on_trainval
        self.source, self.features = source, features
        check_split_shape(split, "zero-shot")
        self.seen, self.unseen = list(split["seen"]), list(split["unseen"])
        self.pseudo_unseen = list(split.get("pseudo_unseen") or [])
        self.pseudo_unseen_folds = [list(fold) for fold in split.get("pseudo_unseen_folds") or []]
        self._check_split()
        self.class_names = self.seen + self.unseen
        self.cache_dir = Path(cache_dir).expanduser()
        self.excerpt_frames, self.eval_offset, self.train_max_start = excerpt_frames(
            features, excerpt_seconds, eval_offset_seconds, train_max_offset_seconds)
        self.test_fold = check_fold(source, "dataset.test_fold", test_fold)
        self.val_fold = None if val_fold is None else check_fold(source, "dataset.val_fold", val_fold)
        if self.val_fold == self.test_fold:
            raise ValueError(f"dataset.val_fold and dataset.test_fold are both fold {test_fold}: "
                             "validation would choose the model on the seen classes' test clips. "
                             "Give them different folds (defaults: val_fold=3, test_fold=4), or "
                             "dataset.val_fold=null for no seen-class validation fold.")
        held_out = {self.test_fold} | ({self.val_fold} - {None} if train_on == "train" else set())
        n_folds = getattr(source, "n_folds", None)
        if n_folds is not None and n_folds <= len(held_out):
            raise ValueError(f"{source.name} has {n_folds} fold(s), and dataset.test_fold="
                             f"{self.test_fold}" + (f" and dataset.val_fold={self.val_fold}"
                                                     if len(held_out) > 1 else "")
                             + f" hold{'' if len(held_out) > 1 else 's'} them all out: no fold is "
                             "left to train on. Give the source "
                             f"more folds (dataset.source.n_folds={len(held_out) + 1} or more; "
                             "default 5).")
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.seed, self.num_workers, self.eval_batch_size = seed, num_workers, eval_batch_size
        self.table: FeatureTable | None = None

    def _check_split(self) -> None:
        folds = [(f"pseudo_unseen_folds[{k}]", fold) for k, fold in enumerate(self.pseudo_unseen_folds)]
        for key, names in [("seen", self.seen), ("unseen", self.unseen),
                           ("pseudo_unseen", self.pseudo_unseen), *folds]:
            check_listed_once(names, f"dataset.split.{key}")
        shared = sorted(set(self.seen) & set(self.unseen))
        if shared:
            raise ValueError(f"Instrument(s) {shared} are both seen and unseen: list each in one of "
                             "dataset.split.seen and dataset.split.unseen (overriding one list leaves "
                             "the other as the split file has it).")
        held_out = [("pseudo_unseen", self.pseudo_unseen), *folds]
        for key, pseudo in held_out:
            if not set(self.seen) - set(pseudo):
                raise ValueError(f"Every seen class is in dataset.split.{key}: nothing is left to "
                                 "train on.")
        outside = [(key, sorted(set(pseudo) - set(self.seen))) for key, pseudo in held_out]
        outside = [(key, names) for key, names in outside if names]
        if outside:
            named = sorted({name for _, names in outside for name in names})
            unseen = [name for name in named if name in self.unseen]
            unknown = [name for name in named if name not in self.unseen]
            fixes = []
            if unseen:
                fixes.append(f"{unseen} are unseen (dataset.split.unseen), so a split that changes the "
                             "seen or unseen classes names its pseudo-unseen ones too, among its seen "
                             "classes: dataset.split.pseudo_unseen=[...] and dataset.split."
                             "pseudo_unseen_folds=[[...], ...] (or [] for no further fold)")
            if unknown:
                fixes.append(f"check the spelling of {unknown} in both (names are case-sensitive, "
                             "e.g. 'Clarinet in Bb')")
            raise ValueError(" and ".join(f"dataset.split.{key} {names}" for key, names in outside)
                             + " must be seen classes (they are held out of training for validation), "
                             f"but dataset.split.seen is {self.seen}: " + "; ".join(fixes) + ".")
        if self.pseudo_unseen_folds and not self.pseudo_unseen:
            raise ValueError("dataset.split.pseudo_unseen_folds are extra folds of class "
                             "cross-validation besides dataset.split.pseudo_unseen (fold 0): set it too.")
        if any(not fold for fold in self.pseudo_unseen_folds):
            raise ValueError("dataset.split.pseudo_unseen_folds has an empty fold: every fold needs "
                             "at least one pseudo-unseen class.")
        keyed = list(zip(["dataset.split.pseudo_unseen"] + [f"dataset.split.{key}" for key, _ in folds],
                         [set(fold) for fold in self.class_cv_folds], strict=True))
        for i, (key, fold) in enumerate(keyed):
            same = [other for other, classes in keyed[i + 1:] if classes == fold]
            if same:
                raise ValueError(f"{key} and {same[0]} hold the same classes {sorted(fold)}: class "
                                 "cross-validation would train that fold twice and count it twice in "
                                 "its mean. Remove one of them, or give it other classes.")

    # ---- ids ---------------------------------------------------------------------------
    def ids(self, names: Sequence[str]) -> list[int]:
        return [self.class_names.index(n) for n in names]

    @property
    def train_classes(self) -> list[str]:
        """The classes training scores against: all seen ones in the "trainval" refit."""
        return fit_classes(self.seen, self.pseudo_unseen, self.train_on)

    @property
    def class_cv_folds(self) -> list[list[str]]:
        """The pseudo-unseen class sets of class cross-validation: the split's pseudo_unseen
        (fold 0), then its pseudo_unseen_folds."""
        return [list(self.pseudo_unseen)] + [list(fold) for fold in self.pseudo_unseen_folds]

    def check_trainable(self, class_cv: bool = False) -> None:
        """Raise, before any training, where a fit of this run would train on fewer than two
        classes (a zero-shot loss then tells no class from another: the fit learns nothing and
        validation chooses among noise), or where class cross-validation (`class_cv`) could score
        no fold: without pseudo-unseen classes or without a validation fold of seen clips. Without
        class cross-validation, warn there instead: validation then has one side only."""
        fits = [("The validation phase", "dataset.split.seen minus dataset.split.pseudo_unseen",
                 self.train_classes)]
        if class_cv:
            fits += [(f"Class cross-validation fold {k}", f"dataset.split.seen minus "
                      f"dataset.split.pseudo_unseen_folds[{k - 1}]", [n for n in self.seen if n not in fold])
                     for k, fold in enumerate(self.class_cv_folds[1:], start=1)]
        if self.refit_on_trainval:
            fits.append(("The refit on trainval", "dataset.split.seen", self.seen))
        for fit, what, classes in fits:
            if len(classes) < 2:
                raise ValueError(f"{fit} would train on one class, {classes} ({what}): a zero-shot "
                                 "model learns to tell its training classes apart, and with one its "
                                 "loss is constant. List more seen classes, or fewer pseudo-unseen ones.")
        missing = one_sided_validation(self.pseudo_unseen, self.val_fold)
        if missing and not class_cv:
            log.warning("%s, so validation scores one side only (%s): no GZSL calibration penalty is "
                        "chosen (it stays 0), the checkpoint is chosen by that side's top-1 alone, and a "
                        "pitch prior keeps its configured weights.", missing,
                        "seen clips of the validation fold" if self.val_fold is not None
                        else "pseudo-unseen clips")
        folds = self.class_cv_folds
        if class_cv and len(folds) > 1 and all(len(fold) == 1 for fold in folds):
            log.warning("Every fold of class cross-validation holds one pseudo-unseen class (%s): ZSL "
                        "among one candidate is always right, so no fold can tell the prior's weights "
                        "apart and the %d extra fits choose nothing (the configured weight stays). "
                        "Give folds of two classes or more (dataset.split.pseudo_unseen and "
                        "pseudo_unseen_folds), or set model.pitch_prior.class_cv=false.",
                        [name for fold in folds for name in fold], len(folds) - 1)
        if class_cv and missing:
            raise ValueError("Class cross-validation (model.pitch_prior.class_cv=true) scores the prior's "
                             "weights on each fold's pseudo-unseen classes beside the held-out seen "
                             f"fold, but {missing}, so no fold could be scored. Name pseudo-unseen "
                             "classes among the seen ones (dataset.split.pseudo_unseen=[...]) with "
                             "dataset.val_fold=3, or set model.pitch_prior.class_cv=false.")

    def pretraining_clips(self, class_cv: bool = False) -> dict[str, set[int]]:
        """{class: folds}: the clips an encoder that starts this run (`model.init_checkpoint`)
        may have been trained or selected on, which are those this run itself trains on: never
        a test clip, and in the validation phase never a validation-fold clip or a pseudo-unseen
        class (with `class_cv`, no class that a fold of class cross-validation holds out)."""
        folds = set(self.table.folds.unique().tolist()) - {self.test_fold}
        if self.train_on == "trainval":
            return {name: set(folds) for name in self.seen}
        folds -= {self.val_fold}
        held_out = {name for fold in self.class_cv_folds for name in fold} if class_cv else set()
        return {name: set(folds) for name in self.train_classes if name not in held_out}

    def for_pseudo_unseen(self, names: Sequence[str]) -> ZeroShotDataModule:
        """The same data (cached features shared) in the validation phase with `names` as the
        pseudo-unseen classes (one fold of class cross-validation)."""
        return self._with_roles(pseudo_unseen=list(names), pseudo_unseen_folds=[], train_on="train")

    def for_trainval(self) -> ZeroShotDataModule:
        """The same data (cached features shared) with every seen class on every fold but the
        test fold as training data, and no validation roles."""
        return self._with_roles(train_on="trainval", refit_on_trainval=False)

    def _with_roles(self, **changes: Any) -> ZeroShotDataModule:
        """A shallow copy (cached features shared) with `changes` to its attributes, its split
        checked and, once the data are loaded, its clip roles rebuilt and checked."""
        variant = copy.copy(self)
        variant.restart_stream()  # another fit, whose steps count from 0
        for name, value in changes.items():
            setattr(variant, name, value)
        variant._check_split()
        if self.table is not None:
            variant.indices = variant._role_indices()
            variant.assert_clean(variant.indices["train"], training=True)
        return variant

    def _check_classes(self, available: list[str]) -> None:
        """Raise when the split lists a class the source has no clips of (before any decoding)."""
        for role, names in (("seen", self.seen), ("unseen", self.unseen)):
            check_split(names, available, self.source, key=f"dataset.split.{role}")

    # ---- data preparation -------------------------------------------------------------
    def prepare_data(self) -> None:
        prepare_cache(self.source, self.features, self.cache_dir, self._check_classes)

    def setup(self, stage: str | None = None) -> None:
        if self.table is not None:
            return
        self.table = prepare_and_load(self.source, self.features, self.cache_dir,
                                      self._check_classes)
        name_to_id = {name: i for i, name in enumerate(self.class_names)}
        self.labels = torch.tensor([name_to_id.get(n, -1) for n in self.table.instruments])
        self.indices = self._role_indices()
        self.assert_clean(torch.cat([self.indices[r] for r in ("train", "val_seen", "val_unseen")]))
        self.assert_clean(self.indices["train"], training=True)
        room = excerpt_room(self.excerpt_frames, self.table.features.shape[-1])
        self.train_max_start = room if self.train_max_start is None else min(room, self.train_max_start)
        for role in ("train", "test_seen", "test_unseen"):
            if len(self.indices[role]) == 0:
                raise ValueError(f"No {role} clips: check dataset.split and the folds of the source.")
        self._warn_untested_classes()
        left_out = sorted(set(self.table.instruments) - set(self.class_names))
        if left_out:  # never a training, validation or test clip (their label is -1)
            log.info("%s instrument(s) %s are in neither dataset.split.seen nor dataset.split.unseen: "
                     "none of their clips is used.", self.source.name, left_out)
        log.info("ZSL clips: %s", {r: len(i) for r, i in self.indices.items()})

    def untested_classes(self) -> dict[str, list[str]]:
        """{"seen": [...], "unseen": [...]}: the split's classes without a test clip (a seen class
        with no clip in the test fold, as when only part of TinySOL is on disk). Each stays a
        candidate, but the per-class means of its side (seen top-1 and GZSL s, or the unseen
        figures) are over the other classes only."""
        return {role: [name for name, i in zip(names, self.ids(names), strict=True)
                       if not bool((self.labels[self.indices[f"test_{role}"]] == i).any())]
                for role, names in (("seen", self.seen), ("unseen", self.unseen))}

    def _warn_untested_classes(self) -> None:
        """Warn, naming them, about split classes with no test clip (`untested_classes`): the
        test's per-class means leave them out, which no figure of the summary shows; and about
        training classes with no clip in the validation fold, which the checkpoint choice and
        the calibration penalty's seen side never score (a class of few pitches under
        dataset.source.fold_by=pitch with many folds has clips in its first folds only)."""
        if self.train_on == "train" and self.val_fold is not None:
            in_val = self.labels[self.indices["val_seen"]]
            unvalidated = [name for name, i in zip(self.train_classes, self.ids(self.train_classes),
                                                   strict=True) if not bool((in_val == i).any())]
            if unvalidated:
                log.warning("Training class(es) %s have no clip in fold %d (dataset.val_fold) of %s: "
                            "validation's seen side (the checkpoint choice, the calibration penalty) "
                            "never scores them. Rendered SOL: give each a clip there (more pitches or "
                            "instances in its dataset.source.instruments entry, fewer "
                            "dataset.source.n_folds, or dataset.source.fold_by=note).",
                            unvalidated, self.val_fold, self.source.name)
        for role, names in self.untested_classes().items():
            if names:
                where = f"fold {self.test_fold} (dataset.test_fold)" if role == "seen" else "any fold"
                tested = [n for n in (self.seen if role == "seen" else self.unseen) if n not in names]
                log.warning("%s class(es) %s of dataset.split.%s have no test clip in %s of %s: they "
                            "stay candidates, but the %s figures are per-class means over %s only.",
                            role.capitalize(), names, role, where, self.source.name,
                            "seen top-1 and GZSL s" if role == "seen" else "ZSL and GZSL u", tested)

    def _role_indices(self) -> dict[str, torch.Tensor]:
        """(n_role,) clip indices of each role: train, val_seen, val_unseen, test_seen and
        test_unseen (the validation ones empty when training on trainval; val_seen also with
        val_fold null)."""
        folds = self.table.folds

        def where(names: Sequence[str], fold_mask: torch.Tensor) -> torch.Tensor:
            in_classes = torch.isin(self.labels, torch.tensor(self.ids(names), dtype=torch.long))
            return torch.nonzero(in_classes & fold_mask).flatten()

        test_fold = folds == self.test_fold
        if self.train_on == "trainval":
            empty = torch.zeros(0, dtype=torch.long)
            return {"train": where(self.seen, ~test_fold), "val_seen": empty, "val_unseen": empty,
                    "test_seen": where(self.seen, test_fold),
                    "test_unseen": where(self.unseen, torch.ones_like(test_fold))}
        val_fold = (folds == self.val_fold) if self.val_fold is not None else torch.zeros_like(test_fold)
        return {
            "train": where(self.train_classes, ~test_fold & ~val_fold),
            "val_seen": where(self.train_classes, val_fold),
            "val_unseen": where(self.pseudo_unseen, ~test_fold),
            "test_seen": where(self.seen, test_fold),
            "test_unseen": where(self.unseen, torch.ones_like(test_fold)),
        }

    def assert_clean(self, clip_indices: torch.Tensor, training: bool = False) -> None:
        """Raise when any clip is unseen-class or test-fold (call on train/val clip indices).

        training=True (training clips): in the validation phase ("train"), also raise on
        pseudo-unseen-class and validation-fold clips, which model selection must not have
        trained on.
        """
        clip_indices = clip_indices.cpu()
        labels = self.labels[clip_indices]
        folds = self.table.folds[clip_indices]
        unseen = torch.isin(labels, torch.tensor(self.ids(self.unseen), dtype=torch.long))
        test_fold = folds == self.test_fold
        unlisted = labels < 0  # an instrument in neither the seen nor the unseen list
        if bool(unseen.any()) or bool(test_fold.any()) or bool(unlisted.any()):
            raise AssertionError(f"Leak: {int(unseen.sum())} unseen-class, {int(test_fold.sum())} "
                                 f"test-fold and {int(unlisted.sum())} unlisted-class clips in "
                                 "training or validation data.")
        if training and self.train_on == "train":
            pseudo = torch.isin(labels, torch.tensor(self.ids(self.pseudo_unseen), dtype=torch.long))
            val_fold = folds == self.val_fold if self.val_fold is not None else torch.zeros_like(pseudo)
            if bool(pseudo.any()) or bool(val_fold.any()):
                raise AssertionError(f"Leak: {int(pseudo.sum())} pseudo-unseen-class and "
                                     f"{int(val_fold.sum())} validation-fold clips in training data "
                                     "of the validation phase.")

    # ---- loaders ----------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        dataset = BalancedExcerpts(self.table.features, self.labels, self.indices["train"],
                                   self.steps_per_epoch * self.items_per_step(), self.excerpt_frames,
                                   self.train_max_start, self.seed, first_item=self.stream_start())
        return StepResumedLoader(dataset, batch_size=self.batch_size, shuffle=False,
                                 sampler=process_share(dataset, self.trainer),
                                 num_workers=self.num_workers)

    def items_per_step(self) -> int:
        """Training excerpts per optimiser step: one batch per process (DDP)."""
        return self.batch_size * processes(self.trainer)

    def excerpts(self, roles: Sequence[str]) -> DataLoader:
        """Fixed excerpts of every clip of `roles` (whole evaluation sets, embedded once)."""
        indices = torch.cat([self.indices[r] for r in roles])
        dataset = ClipExcerpts(self.table.features, self.labels, indices, self.eval_offset,
                               self.excerpt_frames)
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.excerpts(("val_seen", "val_unseen"))

    def test_dataloader(self) -> DataLoader:
        return self.excerpts(("test_seen", "test_unseen"))
