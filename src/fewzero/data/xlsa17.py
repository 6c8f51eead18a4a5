"""Zero-shot benchmarks in the xlsa17 format: precomputed image features instead of audio.

Xian, Lampert, Schiele & Akata, "Zero-Shot Learning - A Comprehensive Evaluation of the Good,
the Bad and the Ugly" (TPAMI 2018) publish, per dataset (AWA1, AWA2, CUB, SUN, APY),

    <root>/<name>/res101.mat       features (2048, n_images) ResNet-101, labels (n_images, 1) 1-based
    <root>/<name>/att_splits.mat   att (n_attributes, n_classes), allclasses_names, trainval_loc,
                                   test_seen_loc, test_unseen_loc (1-based image indices)
    <root>/<name>/trainclassesK.txt, valclassesK.txt   class-disjoint validation splits, K = 1..3

in https://datasets.d2.mpi-inf.mpg.de/xian/xlsa17.zip ("proposed splits"). Label k, column k-1 of
`att` and entry k-1 of `allclasses_names` are the same class. Some copies of att_splits.mat also
carry train_loc / val_loc, which overlap test_seen_loc: they are never read here.

Image roles (`train_on="train"`, the validation phase; class ids = label - 1):

| role        | images                                                                 |
| ----------- | ---------------------------------------------------------------------- |
| train       | trainval_loc images of trainclassesK, minus the held-out val-seen part |
| val seen    | a seeded `val_seen_fraction` of each trainclassesK class's trainval_loc |
| val unseen  | trainval_loc images of valclassesK (pseudo-unseen classes)             |
| test seen   | test_seen_loc                                                          |
| test unseen | test_unseen_loc                                                        |

`train_on="trainval"` (the paper's final fit, see `fewzero.train.refit_on_trainval`) trains on
every trainval_loc image and has no validation roles. No test_seen_loc / test_unseen_loc image ever
reaches a training or validation batch (checked in `setup` and on every batch by `assert_clean`).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import scipy.io
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from fewzero.data.datamodule import StepResumedLoader
from fewzero.data.episodes import stream_seed

log = logging.getLogger(__name__)

XLSA17_URL = "https://datasets.d2.mpi-inf.mpg.de/xian/xlsa17.zip"
DATASETS = ("AWA1", "AWA2", "CUB", "SUN", "APY")
SPLIT_FILE = "att_splits.mat"
FEATURE_FILE = "res101.mat"


def _missing(path: Path, name: str, root: Path, feature_file: str = FEATURE_FILE) -> FileNotFoundError:
    """The error for a missing file; for a name that is none of `DATASETS` it also says so (a
    misspelt dataset.name), while still allowing a folder of one's own in the same format.
    `feature_file`: dataset.feature_file, named as the features expected (the archive's is
    `FEATURE_FILE`; another is a file of one's own)."""
    unknown = "" if name in DATASETS else (
        f" Note that dataset.name={name} is none of xlsa17's datasets {list(DATASETS)} (names are "
        f"case-sensitive): fix the spelling, or keep it for a folder of your own in the same "
        f"format at {root / name}.")
    own = "" if feature_file == FEATURE_FILE else (
        f" dataset.feature_file={feature_file} is not in the archive (its features are "
        f"{FEATURE_FILE}): put your own file there, in the same format, or leave the setting out.")
    return FileNotFoundError(
        f"xlsa17 {name}: {path} does not exist. Download {XLSA17_URL} (the 'proposed splits' of "
        f"Xian et al., TPAMI 2018), unzip it and put its data/{name}/ folder at {root / name}, so "
        f"that {root / name / feature_file} and {root / name / SPLIT_FILE} (and the class lists "
        f"trainclassesK.txt / valclassesK.txt) exist; or pass dataset.root=/path/to/xlsa17/data."
        f"{own}{unknown}")


def _refetch(name: str) -> str:
    """The fix for files that are malformed or do not belong together."""
    return f"Re-download {XLSA17_URL} and re-extract its data/{name}/ folder."


def _malformed(path: Path, name: str, problem: str) -> str:
    return f"xlsa17 {name}: {path} is malformed: {problem}. {_refetch(name)}"


def _loadmat(path: Path, name: str, **kwargs) -> dict:
    """`scipy.io.loadmat(path)`, or a ValueError naming the file and the fix when scipy cannot
    read it (a download cut short, an error page saved under the file's name)."""
    try:
        return scipy.io.loadmat(str(path), **kwargs)
    except (OSError, ValueError, NotImplementedError, scipy.io.matlab.MatReadError) as error:
        raise ValueError(_malformed(path, name, f"scipy.io.loadmat cannot read it ({type(error).__name__}: "
                                                f"{error})")) from error


def _require(mat: dict, path: Path, name: str, keys: tuple[str, ...]) -> None:
    """Raise on a key of `keys` that `mat` (loaded from `path`) lacks, listing the file's keys."""
    missing = [k for k in keys if k not in mat]
    if missing:
        found = sorted(k for k, _, _ in scipy.io.whosmat(str(path)))
        raise KeyError(_malformed(path, name, f"it has no {missing} (keys: {found})"))


def _finite(values: np.ndarray, path: Path, name: str, key: str) -> np.ndarray:
    bad = np.count_nonzero(~np.isfinite(values))
    if bad:
        raise ValueError(_malformed(path, name, f"'{key}' holds {bad} non-finite (NaN/inf) entries"))
    return values


def _first(values: np.ndarray) -> str:
    return f"{values[:5].tolist()}{' ...' if len(values) > 5 else ''} ({len(values)} in all)"


def _one_based(mat: dict, path: Path, name: str, key: str) -> np.ndarray:
    """0-based int64 indices from the 1-based whole numbers of `mat[key]` (labels or a `*_loc`)."""
    values = np.asarray(mat[key], dtype=np.float64).ravel()
    fractional = values[~np.isfinite(values) | (values != np.round(values))]
    if fractional.size:
        raise ValueError(_malformed(path, name, f"'{key}' holds entries that are not whole numbers: "
                                                f"{_first(fractional)}"))
    if values.size and values.min() < 1:
        raise ValueError(_malformed(path, name, f"'{key}' holds entries below 1: "
                                                f"{_first(values[values < 1])}; expected 1-based"))
    return values.astype(np.int64) - 1


def _locs(mat: dict, path: Path, name: str, key: str) -> torch.Tensor:
    """0-based image indices from a 1-based `*_loc` array of att_splits.mat."""
    locs = _one_based(mat, path, name, key)
    values, counts = np.unique(locs, return_counts=True)
    if (counts > 1).any():
        raise ValueError(_malformed(path, name, f"'{key}' lists images more than once: "
                                                f"{_first(values[counts > 1] + 1)}"))
    return torch.from_numpy(locs)


def _strings(cells: np.ndarray) -> list[str]:
    """A MATLAB cell array of strings (as loadmat returns it) as a list of str."""
    return [str(np.asarray(c).ravel()[0]).strip() for c in np.asarray(cells).ravel()]


def read_class_list(path: Path) -> list[str]:
    """One class name per line (xlsa17's trainvalclasses.txt, valclasses1.txt, ...)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Xlsa17Splits:
    """att_splits.mat plus the class lists of one validation split.

    Attributes:
        class_names: (n_classes) `allclasses_names`; class id = label - 1.
        attributes: (n_classes, n_attributes) per-class vectors (`att` transposed).
        trainval, test_seen, test_unseen: 0-based image indices (from the 1-based *_loc).
        train_classes, val_classes: trainclassesK.txt / valclassesK.txt.
    """

    name: str
    class_names: list[str]
    attributes: torch.Tensor
    trainval: torch.Tensor
    test_seen: torch.Tensor
    test_unseen: torch.Tensor
    train_classes: list[str]
    val_classes: list[str]

    def ids(self, names: list[str]) -> list[int]:
        index = {n: i for i, n in enumerate(self.class_names)}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise ValueError(f"xlsa17 {self.name}: class name(s) {unknown[:5]} are not in "
                             f"allclasses_names of {SPLIT_FILE}: the class lists trainclassesK.txt / "
                             f"valclassesK.txt must spell them as it does. Fix the lists, or "
                             f"re-download {XLSA17_URL} and re-extract its data/{self.name}/ folder.")
        return [index[n] for n in names]


def load_splits(root: str | Path, name: str, val_split: int | None = 1,
                attribute_key: str = "att") -> Xlsa17Splits:
    """Read `<root>/<name>/att_splits.mat` and the class lists of validation split `val_split`
    (None: no class lists, e.g. for the attributes alone).

    Only trainval_loc, test_seen_loc and test_unseen_loc are read (never train_loc / val_loc).
    """
    root, folder = Path(root), Path(root) / name
    path = folder / SPLIT_FILE
    if not path.is_file():
        raise _missing(path, name, root)
    mat = _loadmat(path, name)
    locs = ("trainval_loc", "test_seen_loc", "test_unseen_loc")
    _require(mat, path, name, ("allclasses_names", attribute_key, *locs))
    class_names = _strings(mat["allclasses_names"])
    attributes = _finite(np.asarray(mat[attribute_key], dtype=np.float32), path, name, attribute_key)
    attributes = torch.from_numpy(attributes.T.copy())
    if attributes.shape[0] != len(class_names):
        raise ValueError(_malformed(path, name, f"'{attribute_key}' is {tuple(attributes.T.shape)} but "
                                                f"there are {len(class_names)} classes; expected "
                                                f"(n_attributes, n_classes)"))
    lists: dict[str, list[str]] = {"train": [], "val": []}
    for kind in ("train", "val") if val_split is not None else ():
        list_path = folder / f"{kind}classes{val_split}.txt"
        if not list_path.is_file():
            raise FileNotFoundError(f"xlsa17 {name}: {list_path} is missing (dataset.val_split="
                                    f"{val_split}): put {list_path.name} from the data/{name}/ folder "
                                    f"of {XLSA17_URL} at {folder}, or choose another dataset.val_split "
                                    "(the archive has K = 1, 2, 3).")
        lists[kind] = read_class_list(list_path)
    return Xlsa17Splits(name, class_names, attributes, *(_locs(mat, path, name, k) for k in locs),
                        lists["train"], lists["val"])


def load_features(root: str | Path, name: str, feature_file: str = FEATURE_FILE
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`<root>/<name>/res101.mat` as (features (n_images, dim) float32, labels (n_images,) 0-based)."""
    root = Path(root)
    path = root / name / feature_file
    if not path.is_file():
        raise _missing(path, name, root, feature_file)
    mat = _loadmat(path, name, variable_names=["features", "labels"])
    _require(mat, path, name, ("features", "labels"))
    features = _finite(np.asarray(mat["features"], dtype=np.float32), path, name, "features")
    features = torch.from_numpy(np.ascontiguousarray(features.T))
    labels = torch.from_numpy(_one_based(mat, path, name, "labels"))
    if len(labels) != len(features):
        raise ValueError(f"xlsa17 {name}: {path} has {len(features)} feature columns but "
                         f"{len(labels)} labels (features must be (dim, n_images)).")
    return features, labels


class FeatureBatches(Dataset):
    """Indexed by a batch of image indices (use with a `BatchSampler`): one whole batch per item,
    {"x": (batch, dim), "label": (batch,), "index": (batch,)}, from features (n_images, dim) and
    labels (n_images,) of every image."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return {"x": self.features[index], "label": self.labels[index], "index": index}


class Xlsa17DataModule(pl.LightningDataModule):
    """Batches of (precomputed feature, class id) for ZSL on an xlsa17 dataset.

    Args:
        root: folder holding `<name>/res101.mat` and `<name>/att_splits.mat`.
        name: AWA1, AWA2, CUB, SUN or APY (any folder in the same format works).
        feature_dim: expected feature size (2048 for res101.mat; checked, models are sized by it).
        val_split: K of trainclassesK.txt / valclassesK.txt (validation classes = pseudo-unseen).
        val_seen_fraction: share of each training class's trainval images held out for
            validation (the seen side of the GZSL calibration); fixed by `split_seed`.
        train_on: "train" (validation phase, see the module docstring) or "trainval".
        refit_on_trainval: after validation, retrain on all of trainval for the selected number of
            epochs before testing (Xian et al.'s protocol; done by `fewzero.train`).
        batch_size, seed: training batches, reshuffled every epoch with `stream_seed(seed, epoch)`.
    Class ids index `class_names` = allclasses_names (id = label - 1).
    """

    def __init__(self, root: str | Path, name: str = "AWA2", feature_dim: int = 2048,
                 val_split: int = 1, val_seen_fraction: float = 0.2, split_seed: int = 0,
                 train_on: str = "train", refit_on_trainval: bool = True,
                 feature_file: str = FEATURE_FILE, batch_size: int = 64, eval_batch_size: int = 1024,
                 seed: int = 0, num_workers: int = 0):
        super().__init__()
        if train_on not in ("train", "trainval"):
            raise ValueError(f"dataset.train_on must be 'train' or 'trainval'; got {train_on!r}")
        if not 0.0 < val_seen_fraction < 1.0:
            raise ValueError(f"dataset.val_seen_fraction must be in (0, 1); got {val_seen_fraction}")
        self.root, self.name, self.feature_dim = Path(root), name, int(feature_dim)
        self.val_split, self.val_seen_fraction, self.split_seed = val_split, val_seen_fraction, split_seed
        self.train_on, self.refit_on_trainval = train_on, refit_on_trainval
        self.feature_file = feature_file
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.num_workers = seed, num_workers
        self.splits: Xlsa17Splits | None = None

    @property
    def dataset_name(self) -> str:
        return f"xlsa17 {self.name}"

    # ---- ids ---------------------------------------------------------------------------
    def ids(self, names: list[str]) -> list[int]:
        return self.splits.ids(list(names))

    @property
    def train_classes(self) -> list[str]:
        return self.seen if self.train_on == "trainval" else [
            n for n in self.seen if n not in self.pseudo_unseen]

    # ---- data preparation -------------------------------------------------------------
    def prepare_data(self) -> None:
        for file in (self.feature_file, SPLIT_FILE):
            if not (self.root / self.name / file).is_file():
                raise _missing(self.root / self.name / file, self.name, self.root, self.feature_file)

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        self.splits = load_splits(self.root, self.name, self.val_split)
        self.features, self.labels = load_features(self.root, self.name, self.feature_file)
        self._check()
        self.indices = self._role_indices()
        self.assert_clean(torch.cat([self.indices[r] for r in ("train", "val_seen", "val_unseen")]))
        self.assert_clean(self.indices["train"], training=True)
        log.info("xlsa17 %s images: %s", self.name, {r: len(i) for r, i in self.indices.items()})

    def for_trainval(self) -> Xlsa17DataModule:
        """The same data (arrays shared) with every trainval_loc image as training data and no
        validation roles."""
        final = copy.copy(self)
        final.train_on, final.refit_on_trainval = "trainval", False
        if self.splits is not None:
            final.indices = final._role_indices()
        return final

    def _check(self) -> None:
        """Shapes, index ranges and the class lists against the labels of each split."""
        s, n = self.splits, len(self.labels)
        if self.features.shape[1] != self.feature_dim:
            raise ValueError(f"xlsa17 {self.name}: features are {self.features.shape[1]}-d but "
                             f"dataset.feature_dim={self.feature_dim}: set dataset.feature_dim="
                             f"{self.features.shape[1]} (models are sized from it).")
        for key in ("trainval", "test_seen", "test_unseen"):
            locs = getattr(s, key)
            if len(locs) and int(locs.max()) >= n:
                raise ValueError(f"xlsa17 {self.name}: {key}_loc reaches image {int(locs.max()) + 1} "
                                 f"but {self.feature_file} has {n}: the two files do not belong together. "
                                 f"{_refetch(self.name)}")
        if int(self.labels.max()) >= len(s.class_names):
            raise ValueError(f"xlsa17 {self.name}: {self.feature_file} has labels up to "
                             f"{int(self.labels.max()) + 1} but {SPLIT_FILE} names "
                             f"{len(s.class_names)} classes: the two files do not belong together. "
                             f"{_refetch(self.name)}")
        self.is_test = torch.zeros(n, dtype=torch.bool)
        self.is_test[s.test_seen] = True
        self.is_test[s.test_unseen] = True
        shared = int(self.is_test[s.trainval].sum())
        if shared:
            raise ValueError(f"xlsa17 {self.name}: trainval_loc shares {shared} images with "
                             f"test_seen_loc / test_unseen_loc, so training would see test images. "
                             f"Use the att_splits.mat of the 'proposed splits': {_refetch(self.name)}")

        def classes(locs: torch.Tensor) -> list[str]:
            return [s.class_names[i] for i in self.labels[locs].unique().tolist()]

        self.class_names = s.class_names
        self.seen, self.unseen = classes(s.trainval), classes(s.test_unseen)
        self.pseudo_unseen = [n for n in self.seen if n in set(s.val_classes)]
        problems = []
        if set(self.seen) & set(self.unseen):
            problems.append("test_unseen_loc holds images of trainval classes")
        if not set(classes(s.test_seen)) <= set(self.seen):
            problems.append("test_seen_loc holds images of classes absent from trainval_loc")
        if set(s.train_classes) & set(s.val_classes):
            problems.append(f"trainclasses{self.val_split}.txt and valclasses{self.val_split}.txt overlap")
        if set(s.train_classes) | set(s.val_classes) != set(self.seen):
            problems.append(f"trainclasses{self.val_split}.txt + valclasses{self.val_split}.txt are not "
                            "the classes of trainval_loc")
        s.ids(s.train_classes + s.val_classes)  # names must exist
        if problems:
            raise ValueError(f"xlsa17 {self.name}: inconsistent files: " + "; ".join(problems)
                             + f". {_refetch(self.name)} (A folder of your own must keep these "
                             "files consistent.)")

    def _role_indices(self) -> dict[str, torch.Tensor]:
        """(n_role,) image indices of each role: train, val_seen, val_unseen, test_seen and
        test_unseen (the validation ones empty when training on trainval)."""
        s = self.splits
        trainval = s.trainval
        empty = trainval[:0]
        if self.train_on == "trainval":
            return {"train": trainval, "val_seen": empty, "val_unseen": empty,
                    "test_seen": s.test_seen, "test_unseen": s.test_unseen}
        labels = self.labels[trainval]
        in_val = torch.isin(labels, torch.tensor(self.ids(self.pseudo_unseen), dtype=torch.long))
        generator = torch.Generator().manual_seed(self.split_seed)
        held_out = torch.zeros(len(trainval), dtype=torch.bool)
        for c in labels[~in_val].unique().tolist():
            members = torch.nonzero((labels == c) & ~in_val).flatten()
            n_held = min(len(members) - 1, math.ceil(self.val_seen_fraction * len(members)))
            held_out[members[torch.randperm(len(members), generator=generator)[:n_held]]] = True
        return {"train": trainval[~in_val & ~held_out], "val_seen": trainval[held_out],
                "val_unseen": trainval[in_val], "test_seen": s.test_seen, "test_unseen": s.test_unseen}

    def assert_clean(self, indices: torch.Tensor, training: bool = False) -> None:
        """Raise when any image is a test image or of an unseen class (call on train/val images).

        training=True (training images): in the validation phase ("train"), also raise on
        pseudo-unseen-class and held-out validation-seen images, which model selection must not
        have trained on.
        """
        indices = indices.cpu()
        test = self.is_test[indices]
        unseen = torch.isin(self.labels[indices], torch.tensor(self.ids(self.unseen), dtype=torch.long))
        if bool(test.any()) or bool(unseen.any()):
            raise AssertionError(f"Leak: {int(test.sum())} test-location and {int(unseen.sum())} "
                                 "unseen-class images in training or validation data.")
        if training and self.train_on == "train":
            pseudo = torch.isin(self.labels[indices],
                                torch.tensor(self.ids(self.pseudo_unseen), dtype=torch.long))
            val_seen = torch.isin(indices, self.indices["val_seen"].cpu())
            if bool(pseudo.any()) or bool(val_seen.any()):
                raise AssertionError(f"Leak: {int(pseudo.sum())} pseudo-unseen-class and "
                                     f"{int(val_seen.sum())} validation-seen images in training data "
                                     "of the validation phase.")

    # ---- loaders ----------------------------------------------------------------------
    def _loader(self, indices: torch.Tensor, batch_size: int, first_batch: int = 0) -> DataLoader:
        """Batches of `indices` in order; from batch `first_batch` on, those before it after them
        (as many batches as ever: Lightning counts an epoch's batches by the loader's length)."""
        batches = list(BatchSampler(indices.tolist(), batch_size, drop_last=False))
        return StepResumedLoader(FeatureBatches(self.features, self.labels),
                                 sampler=batches[first_batch:] + batches[:first_batch],
                                 batch_size=None, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Every training image once per epoch, shuffled with `stream_seed(seed, epoch)`. Resumed
        from a checkpoint in the middle of an epoch, it starts at the epoch's next batch, which
        Lightning counts on from (it reads a loader from its start)."""
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        train = self.indices["train"]
        generator = torch.Generator().manual_seed(stream_seed(self.seed, epoch))
        order = torch.randperm(len(train), generator=generator)
        per_epoch = math.ceil(len(train) / self.batch_size)
        done = self.trainer.global_step - epoch * per_epoch if self.trainer is not None else 0
        return self._loader(train[order], self.batch_size, first_batch=done if 0 < done < per_epoch else 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(torch.cat([self.indices["val_seen"], self.indices["val_unseen"]]),
                            self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(torch.cat([self.indices["test_seen"], self.indices["test_unseen"]]),
                            self.eval_batch_size)
