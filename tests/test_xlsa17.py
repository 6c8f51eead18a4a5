"""xlsa17 benchmarks: real AWA2/CUB splits and attributes with generated features, SAE, runs.

The real att_splits.mat files come from ../shared/data/xlsa17 or $FEWZERO_SHARED_DATA/xlsa17
(tests skip without them); no res101.mat is available, so features are generated: a fixed random
linear map of each image's class attributes plus noise, i.e. features that carry the class
structure the splits describe.
"""

import json
from pathlib import Path

import hydra
import numpy as np
import pytest
import scipy.io
import scipy.linalg
import torch
from conftest import CONFIG_DIR, SHARED_DATA
from omegaconf import open_dict

from fewzero.data.xlsa17 import XLSA17_URL, Xlsa17DataModule, load_features, load_splits
from fewzero.models.zeroshot_module import ZeroShotModule
from fewzero.plots import confusion_figure
from fewzero.report import collect
from fewzero.side_info.xlsa17 import Xlsa17Attributes
from fewzero.train import compose_train_config, save_run_overrides, train

XLSA17 = SHARED_DATA / "xlsa17"
PAPER_SIZES = {"AWA2": (23527, 5882, 7913), "CUB": (7057, 1764, 2967)}
CLASS_FILES = ("trainvalclasses.txt", "testclasses.txt", "trainclasses1.txt", "valclasses1.txt")


def _cells(strings: list[str]) -> np.ndarray:
    """A MATLAB cell column of strings, as in allclasses_names / image_files."""
    cells = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        cells[i, 0] = np.array([s])
    return cells


def _features(attributes: np.ndarray, labels: np.ndarray, dim: int, noise: float,
              rng: np.random.Generator) -> np.ndarray:
    """(dim, n_images) column-major features: a random linear map of each image's class attributes
    (attributes (n_attributes, n_classes), labels 1-based) plus Gaussian noise."""
    mapping = rng.normal(size=(dim, attributes.shape[0]))
    return mapping @ attributes[:, labels - 1] + noise * rng.normal(size=(dim, len(labels)))


def write_res101(folder: Path, features: np.ndarray, labels: np.ndarray) -> None:
    scipy.io.savemat(folder / "res101.mat", {
        "features": features, "labels": labels[:, None].astype(np.float64),
        "image_files": _cells([f"img{i:05d}.jpg" for i in range(1, len(labels) + 1)])})


def real_split_with_generated_features(root: Path, name: str, dim: int = 32, noise: float = 0.05,
                                       seed: int = 0) -> dict:
    """`root/name/` with the real att_splits.mat and class lists (linked) and a generated res101.mat.

    Labels agree with the splits: each test_unseen_loc image gets a testclasses.txt class and each
    trainval/test_seen image a trainvalclasses.txt class (consecutive images share a class, as
    in the real files). Returns the written arrays (labels 1-based, features (dim, n)).
    """
    source = XLSA17 / name
    if not (source / "att_splits.mat").is_file():
        pytest.skip(f"{source}/att_splits.mat absent (set FEWZERO_SHARED_DATA to another data folder)")
    folder = root / name
    folder.mkdir(parents=True)
    for file in ("att_splits.mat", *CLASS_FILES):
        (folder / file).symlink_to(source / file)
    mat = scipy.io.loadmat(str(source / "att_splits.mat"))
    names = [str(c[0][0]) for c in mat["allclasses_names"]]
    locs = {k: mat[k].ravel().astype(np.int64) for k in ("trainval_loc", "test_seen_loc", "test_unseen_loc")}
    labels = np.zeros(max(int(v.max()) for v in locs.values()), dtype=np.int64)
    seen_images = np.union1d(locs["trainval_loc"], locs["test_seen_loc"])
    for images, class_file in ((seen_images, "trainvalclasses.txt"),
                               (np.sort(locs["test_unseen_loc"]), "testclasses.txt")):
        classes = [names.index(n) + 1 for n in (source / class_file).read_text().split()]
        for c, chunk in zip(classes, np.array_split(images, len(classes)), strict=True):
            labels[chunk - 1] = c
    assert (labels > 0).all()
    features = _features(mat["att"], labels, dim, noise, np.random.default_rng(seed))
    write_res101(folder, features, labels)
    return {"labels": labels, "features": features, "locs": locs, "names": names}


def write_toy(root: Path, name: str = "TOY", n_classes: int = 12, n_unseen: int = 3, n_val: int = 3,
              per_class: int = 30, n_attributes: int = 6, dim: int = 16, noise: float = 0.02,
              seed: int = 0) -> Path:
    """A small xlsa17-format dataset: shuffled image order, 1-based uint16 locs, and train_loc /
    val_loc that are the test_seen images (as the overlapping copies of att_splits.mat)."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True)
    attributes = rng.normal(size=(n_attributes, n_classes))
    attributes /= np.linalg.norm(attributes, axis=0)
    names = [f"class{c:02d}" for c in range(n_classes)]
    labels = rng.permutation(np.repeat(np.arange(1, n_classes + 1), per_class))
    images = np.arange(1, len(labels) + 1)
    unseen = labels > n_classes - n_unseen
    test_seen = np.sort(rng.choice(images[~unseen], size=int(0.2 * (~unseen).sum()), replace=False))
    trainval = np.setdiff1d(images[~unseen], test_seen)
    scipy.io.savemat(folder / "att_splits.mat", {
        "att": attributes, "original_att": 10 * attributes, "allclasses_names": _cells(names),
        "trainval_loc": trainval[:, None].astype(np.uint16),
        "test_seen_loc": test_seen[:, None].astype(np.uint16),
        "test_unseen_loc": images[unseen][:, None].astype(np.uint16),
        "train_loc": test_seen[:, None].astype(np.uint16), "val_loc": test_seen[:, None].astype(np.uint16)})
    write_res101(folder, _features(attributes, labels, dim, noise, rng), labels)
    seen = names[: n_classes - n_unseen]
    for file, classes in (("trainclasses1.txt", seen[:-n_val]), ("valclasses1.txt", seen[-n_val:]),
                          ("trainvalclasses.txt", seen), ("testclasses.txt", names[-n_unseen:])):
        (folder / file).write_text("\n".join(classes) + "\n")
    return folder


def _datamodule(root: Path, name: str, dim: int, **kwargs) -> Xlsa17DataModule:
    dm = Xlsa17DataModule(root, name, feature_dim=dim, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


TOY = ("dataset.name=TOY", "dataset.feature_dim=16", "side_info.dim=6")
NO_LOGGER = ["~logger", "~callbacks.learning_rate_monitor"]


def _toy_cfg(root: Path, overrides: list[str], dataset: tuple[str, ...] = TOY):
    """The real train.yaml on an xlsa17-format dataset under `root`, quiet and on the CPU."""
    base = [f"dataset.root={root}", *dataset, f"paths.root_dir={root}", "trainer.accelerator=cpu",
            "trainer.log_every_n_steps=1", "+trainer.enable_progress_bar=false", "~callbacks.progress_bar"]
    return compose_train_config(base + overrides, root / "run")


# ---- the real splits --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["AWA2", "CUB"])
def test_real_splits_have_the_papers_sizes_and_no_test_image_reaches_training(tmp_path, name):
    generated = real_split_with_generated_features(tmp_path, name)
    dm = _datamodule(tmp_path, name, 32)
    trainval, test_seen, test_unseen = PAPER_SIZES[name]
    assert (len(dm.splits.trainval), len(dm.indices["test_seen"]), len(dm.indices["test_unseen"])) \
        == (trainval, test_seen, test_unseen)
    fit_roles = [set(dm.indices[r].tolist()) for r in ("train", "val_seen", "val_unseen")]
    test = set(dm.indices["test_seen"].tolist()) | set(dm.indices["test_unseen"].tolist())
    assert len(test) == test_seen + test_unseen
    assert sum(len(r) for r in fit_roles) == trainval  # train, val seen, val unseen: disjoint
    assert set.union(*fit_roles) == set(dm.splits.trainval.tolist())
    assert not set.union(*fit_roles) & test  # no test location in training or validation
    folder = XLSA17 / name
    assert set(dm.seen) == set(folder.joinpath("trainvalclasses.txt").read_text().split())
    assert set(dm.unseen) == set(folder.joinpath("testclasses.txt").read_text().split())
    assert set(dm.pseudo_unseen) == set(folder.joinpath("valclasses1.txt").read_text().split())
    assert set(dm.train_classes) == set(folder.joinpath("trainclasses1.txt").read_text().split())
    assert {dm.class_names[i] for i in dm.labels[dm.indices["val_unseen"]].tolist()} == set(dm.pseudo_unseen)
    # 1-based locs and column-major features: image loc k is row k - 1, labels shift by one
    k = int(generated["locs"]["test_unseen_loc"][0])
    torch.testing.assert_close(dm.features[k - 1], torch.from_numpy(generated["features"][:, k - 1]).float())
    assert int(dm.labels[k - 1]) == generated["labels"][k - 1] - 1
    assert int(dm.indices["test_unseen"][0]) == k - 1


def test_real_awa2_attributes_are_served_by_class_name_with_the_configured_dim(tmp_path):
    real_split_with_generated_features(tmp_path, "AWA2")
    cfg = compose_train_config(["experiment=xlsa17_eszsl", f"dataset.root={tmp_path}"], tmp_path / "run")
    assert cfg.side_info.dim == 85
    source = hydra.utils.instantiate(cfg.side_info)
    vectors = source.vectors(["sheep", "antelope"]).mean
    att = scipy.io.loadmat(str(XLSA17 / "AWA2" / "att_splits.mat"))["att"]
    torch.testing.assert_close(vectors[1], torch.from_numpy(att[:, 0]).float())  # antelope: class 1
    assert vectors.shape == (2, 85)
    with pytest.raises(ValueError, match="zebra-ish"):
        source.vectors(["zebra-ish"])


@pytest.mark.slow
def test_sae_on_the_real_awa2_split_recognises_unseen_classes_of_generated_features(tmp_path):
    real_split_with_generated_features(tmp_path, "AWA2", dim=64, noise=0.05)
    cfg = _toy_cfg(tmp_path, ["experiment=xlsa17_sae", "dataset.batch_size=1024"],
                   dataset=("dataset.name=AWA2", "dataset.feature_dim=64"))
    metrics, objects = train(cfg)
    # features are a linear map of the 85 attributes: a known case, not the paper's setting
    assert metrics["test/zsl_top1"] > 0.99 and metrics["test/seen_top1"] > 0.99
    assert 0.5 < metrics["test/gzsl_cs_h"] <= 1.0
    assert objects["datamodule"].indices["train"].numel() == 23527  # the refit trained on trainval


# ---- loader and datamodule on a small dataset of our own --------------------------------
def test_train_loc_and_val_loc_are_never_used(tmp_path):
    folder = write_toy(tmp_path)
    dm = _datamodule(tmp_path, "TOY", 16)
    train_loc = scipy.io.loadmat(str(folder / "att_splits.mat"))["train_loc"].ravel().astype(int) - 1
    for role in ("train", "val_seen", "val_unseen"):
        assert not set(dm.indices[role].tolist()) & set(train_loc.tolist())
    assert set(dm.indices["test_seen"].tolist()) == set(train_loc.tolist())


def test_batches_carry_features_labels_and_indices_and_never_a_test_image(tmp_path):
    write_toy(tmp_path)
    dm = _datamodule(tmp_path, "TOY", 16, batch_size=7)
    seen = []
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for batch in loader:
            assert batch["x"].shape[1:] == (16,) and batch["x"].dtype == torch.float32
            torch.testing.assert_close(batch["x"], dm.features[batch["index"]])
            assert torch.equal(batch["label"], dm.labels[batch["index"]])
            dm.assert_clean(batch["index"])
            seen += batch["index"].tolist()
    assert sorted(seen) == sorted(dm.splits.trainval.tolist())  # every trainval image once
    test = torch.cat([b["index"] for b in dm.test_dataloader()])
    assert torch.equal(test, torch.cat([dm.splits.test_seen, dm.splits.test_unseen]))
    with pytest.raises(AssertionError, match="1 test-location"):
        dm.assert_clean(dm.splits.test_seen[:1])
    dm.assert_clean(dm.indices["train"], training=True)
    with pytest.raises(AssertionError, match="1 pseudo-unseen-class and 0 validation-seen"):
        dm.assert_clean(dm.indices["val_unseen"][:1], training=True)
    with pytest.raises(AssertionError, match="0 pseudo-unseen-class and 1 validation-seen"):
        dm.assert_clean(dm.indices["val_seen"][:1], training=True)
    dm.for_trainval().assert_clean(dm.indices["val_seen"][:1], training=True)  # refit trains on it


def test_validation_holds_out_part_of_each_training_class_and_all_validation_classes(tmp_path):
    write_toy(tmp_path)
    dm = _datamodule(tmp_path, "TOY", 16, val_seen_fraction=0.25)
    train_ids = set(dm.ids(dm.train_classes))
    assert set(dm.labels[dm.indices["val_seen"]].tolist()) == train_ids
    assert set(dm.labels[dm.indices["train"]].tolist()) == train_ids
    assert set(dm.labels[dm.indices["val_unseen"]].tolist()) == set(dm.ids(dm.pseudo_unseen))
    final = dm.for_trainval()
    assert torch.equal(final.indices["train"], dm.splits.trainval)
    assert final.indices["val_seen"].numel() == final.indices["val_unseen"].numel() == 0
    assert final.train_classes == dm.seen


def test_every_training_class_keeps_a_training_image_whatever_the_held_out_fraction(tmp_path):
    write_toy(tmp_path)
    dm = _datamodule(tmp_path, "TOY", 16, val_seen_fraction=0.99)
    assert set(dm.labels[dm.indices["train"]].tolist()) == set(dm.ids(dm.train_classes))


def test_training_batches_are_reshuffled_every_epoch_and_repeatable(tmp_path):
    from types import SimpleNamespace

    write_toy(tmp_path)
    dm = _datamodule(tmp_path, "TOY", 16, batch_size=1000)

    def order(epoch):
        dm.trainer = SimpleNamespace(current_epoch=epoch, global_step=epoch)  # one batch an epoch
        return torch.cat([b["index"] for b in dm.train_dataloader()])

    first, second = order(0), order(1)
    assert not torch.equal(first, second) and torch.equal(first.sort().values, second.sort().values)
    assert torch.equal(order(0), first)
    # another seed shuffles anew, not as this seed's next epoch
    dm.seed = 1
    assert not torch.equal(order(0), second)


def test_missing_files_name_the_archive_and_the_expected_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        Xlsa17DataModule(tmp_path, "AWA2").prepare_data()
    message = str(error.value)
    assert XLSA17_URL in message and str(tmp_path / "AWA2" / "res101.mat") in message
    assert str(tmp_path / "AWA2" / "att_splits.mat") in message
    with pytest.raises(FileNotFoundError, match="att_splits.mat"):
        load_splits(tmp_path, "CUB")


def test_a_missing_folder_whose_name_is_no_xlsa17_dataset_is_told_so_but_custom_folders_work(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset.name=Awa2 is none of xlsa17's datasets "
                                                r"\['AWA1', 'AWA2', 'CUB', 'SUN', 'APY'\]"):
        Xlsa17DataModule(tmp_path, "Awa2").prepare_data()
    with pytest.raises(FileNotFoundError) as error:
        Xlsa17DataModule(tmp_path, "AWA2").prepare_data()
    assert "none of xlsa17's datasets" not in str(error.value)
    write_toy(tmp_path)  # a folder of one's own in the same format
    Xlsa17DataModule(tmp_path, "TOY").prepare_data()


def test_features_that_do_not_match_the_splits_are_rejected(tmp_path):
    folder = write_toy(tmp_path)
    features, labels = load_features(tmp_path, "TOY")
    write_res101(folder, features[:100].numpy().T.astype(np.float64), labels[:100].numpy() + 1)
    with pytest.raises(ValueError, match="do not belong together"):
        _datamodule(tmp_path, "TOY", 16)
    write_toy(tmp_path / "other")
    with pytest.raises(ValueError, match="dataset.feature_dim=16"):
        _datamodule(tmp_path / "other", "TOY", 2048)


def test_validation_classes_must_be_trainval_classes(tmp_path):
    folder = write_toy(tmp_path)
    (folder / "valclasses1.txt").write_text("class06\nclass07\nclass11\n")  # class11 is a test class
    with pytest.raises(ValueError, match="valclasses1.txt are not the classes of trainval_loc"):
        _datamodule(tmp_path, "TOY", 16)


def test_overlapping_train_and_validation_class_lists_are_rejected(tmp_path):
    folder = write_toy(tmp_path)
    (folder / "valclasses1.txt").write_text("class05\nclass06\nclass07\nclass08\n")  # class05 trains
    with pytest.raises(ValueError, match="trainclasses1.txt and valclasses1.txt overlap"):
        _datamodule(tmp_path, "TOY", 16)


def test_features_one_image_short_of_the_splits_are_rejected(tmp_path):
    folder = write_toy(tmp_path)
    features, labels = load_features(tmp_path, "TOY")
    write_res101(folder, features[:-1].numpy().T.astype(np.float64), labels[:-1].numpy() + 1)
    with pytest.raises(ValueError, match="do not belong together"):
        _datamodule(tmp_path, "TOY", 16)


def _rewrite(path: Path, **changes) -> None:
    """Save the .mat file at `path` again with `changes` applied (None deletes a key)."""
    mat = {k: v for k, v in scipy.io.loadmat(str(path)).items() if not k.startswith("__")}
    mat.update(changes)
    scipy.io.savemat(path, {k: v for k, v in mat.items() if v is not None})


@pytest.mark.parametrize(("file", "key"), [("res101.mat", "features"), ("att_splits.mat", "att")])
def test_non_finite_features_or_attributes_are_rejected_with_the_file_key_and_count(tmp_path, file, key):
    folder = write_toy(tmp_path)
    values = scipy.io.loadmat(str(folder / file))[key]
    values[0, :3] = [np.nan, np.inf, -np.inf]
    _rewrite(folder / file, **{key: values})
    with pytest.raises(ValueError) as error:
        _datamodule(tmp_path, "TOY", 16)
    assert f"{folder / file} is malformed: '{key}' holds 3 non-finite" in str(error.value)
    assert XLSA17_URL in str(error.value)


@pytest.mark.parametrize(("file", "key", "kept"), [("att_splits.mat", "allclasses_names", "trainval_loc"),
                                                   ("att_splits.mat", "test_unseen_loc", "att"),
                                                   ("res101.mat", "features", "image_files"),
                                                   ("res101.mat", "labels", "image_files")])
def test_a_missing_key_names_the_file_and_the_keys_it_has(tmp_path, file, key, kept):
    folder = write_toy(tmp_path)
    _rewrite(folder / file, **{key: None})
    with pytest.raises(KeyError) as error:
        _datamodule(tmp_path, "TOY", 16)
    message = str(error.value)
    assert f"{folder / file} is malformed: it has no ['{key}']" in message
    assert f"'{kept}'" in message and XLSA17_URL in message  # the keys found, read past variable_names


def test_files_that_contradict_each_other_say_so_and_how_to_get_consistent_ones(tmp_path):
    folder = write_toy(tmp_path)
    splits = scipy.io.loadmat(str(folder / "att_splits.mat"))
    test_image = splits["test_seen_loc"][:1]
    _rewrite(folder / "att_splits.mat", trainval_loc=np.vstack([splits["trainval_loc"], test_image]))
    with pytest.raises(ValueError, match=r"trainval_loc shares 1 images with test_seen_loc / "
                                         r"test_unseen_loc, so training would see test images") as error:
        _datamodule(tmp_path, "TOY", 16)
    assert "re-extract its data/TOY/ folder" in str(error.value)
    folder = write_toy(tmp_path / "labels")
    labels = scipy.io.loadmat(str(folder / "res101.mat"))["labels"]
    labels[0, 0] = 13  # 12 classes
    _rewrite(folder / "res101.mat", labels=labels)
    with pytest.raises(ValueError, match=r"res101.mat has labels up to 13 but att_splits.mat names 12 "
                                         r"classes: the two files do not belong together. Re-download"):
        _datamodule(tmp_path / "labels", "TOY", 16)


def _malformed_cases(folder: Path) -> dict[str, tuple[str, dict, str]]:
    """Broken index arrays of a toy dataset: {case: (file, {key: array}, expected message part)}."""
    splits = scipy.io.loadmat(str(folder / "att_splits.mat"))
    trainval, unseen = splits["trainval_loc"].astype(np.float64), splits["test_unseen_loc"].astype(np.float64)
    first = int(trainval[0, 0])
    labels = scipy.io.loadmat(str(folder / "res101.mat"))["labels"]
    labels[4, 0] = np.nan
    return {
        "fraction": ("att_splits.mat", {"trainval_loc": np.vstack([trainval[1:], [[first + 0.5]]])},
                     f"'trainval_loc' holds entries that are not whole numbers: [{first + 0.5}] (1 in all)"),
        "trainval twice": ("att_splits.mat", {"trainval_loc": np.vstack([trainval, trainval[:1]])},
                           f"'trainval_loc' lists images more than once: [{first}] (1 in all)"),
        "unseen twice": ("att_splits.mat", {"test_unseen_loc": np.vstack([unseen, unseen[:2]])},
                         "'test_unseen_loc' lists images more than once: "
                         f"{sorted(unseen[:2, 0].astype(int).tolist())} (2 in all)"),
        "nan label": ("res101.mat", {"labels": labels},
                      "'labels' holds entries that are not whole numbers: [nan] (1 in all)"),
    }


@pytest.mark.parametrize("case", ["fraction", "trainval twice", "unseen twice", "nan label"])
def test_malformed_locations_and_labels_name_the_file_key_and_entries(tmp_path, case):
    folder = write_toy(tmp_path)
    file, changes, expected = _malformed_cases(folder)[case]
    _rewrite(folder / file, **changes)
    with pytest.raises(ValueError) as error:
        _datamodule(tmp_path, "TOY", 16)
    assert f"{folder / file} is malformed: {expected}" in str(error.value)
    assert XLSA17_URL in str(error.value)


def test_confusion_figures_of_hundreds_of_classes_stay_small():
    confusion = torch.eye(200, dtype=torch.long) * 3
    figure = confusion_figure(confusion, [f"c{i}" for i in range(200)], "200 classes")
    assert max(figure.get_size_inches()) <= 12


# ---- end to end: train(cfg) with the real configs -----------------------------------------


@pytest.mark.parametrize("model", ["eszsl", "sae"])
def test_closed_form_models_select_on_validation_refit_on_trainval_and_test(tmp_path, model):
    write_toy(tmp_path)
    metrics, objects = train(_toy_cfg(tmp_path, [f"experiment=xlsa17_{model}"]))
    run = Path(objects["cfg"].paths.output_dir)
    report = json.loads((run / "metrics.json").read_text())
    refit = report["refit_on_trainval"]
    assert report["checkpoint"] == refit["checkpoint"] == str(run / "checkpoints" / "refit_trainval.ckpt")
    selected = torch.load(refit["selected_checkpoint"], weights_only=False)["state_dict"]
    final = torch.load(refit["checkpoint"], weights_only=False)["state_dict"]
    assert float(final["calibration_gamma"]) == float(selected["calibration_gamma"])
    assert not torch.equal(final["head.weight"], selected["head.weight"])  # refitted on more data
    assert report["dataset"] == "xlsa17 TOY" and refit["epochs"] == 1
    assert objects["datamodule"].train_on == "trainval"
    assert report["zero_shot"]["n_test_clips"] == {"test_seen": 54, "test_unseen": 90}
    assert metrics["test/zsl_top1"] == 1.0  # features are a linear map of the attributes
    for key in ("val/zsl_top1", "val/seen_top1", "val/gzsl_cs_h", "test/gzsl_cs_h", "test/gzsl_h"):
        assert 0.0 <= metrics[key] <= 1.0


XLSA17_EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("xlsa17_*.yaml")
                            if p.stem != "xlsa17_common")


# what each experiment is: its head, and its loss with the settings that tell the papers apart
# (ALE and SJE are the same bilinear head and ranking hinge but for how negatives are weighted)
XLSA17_RECIPES = {
    "xlsa17_ale": ("BilinearHead", "RankingLoss", {"reduction": "warp", "margin": 1.0}),
    "xlsa17_bilinear": ("BilinearHead", "CrossEntropyLoss", {}),
    "xlsa17_conse": ("ConseHead", "InfoNCELoss", {}),
    "xlsa17_devise": ("DeviseHead", "RankingLoss", {"reduction": "sum"}),
    "xlsa17_eszsl": ("EszslHead", None, {}),  # closed form: no loss
    "xlsa17_sae": ("SaeHead", None, {}),
    "xlsa17_siamese": ("SiameseHead", "TripletLoss", {}),
    "xlsa17_sje": ("BilinearHead", "RankingLoss", {"reduction": "max", "margin": 1.0}),
}


def test_every_xlsa17_experiment_has_its_recipe():
    assert sorted(XLSA17_RECIPES) == XLSA17_EXPERIMENTS


@pytest.mark.parametrize("experiment", XLSA17_EXPERIMENTS)
def test_every_xlsa17_experiment_trains_selects_refits_and_tests_for_one_epoch(tmp_path, experiment):
    write_toy(tmp_path)
    metrics, objects = train(_toy_cfg(tmp_path, [f"experiment={experiment}", "trainer.max_epochs=1",
                                                 *NO_LOGGER]))
    report = json.loads(Path(objects["cfg"].paths.output_dir, "metrics.json").read_text())
    head, loss, settings = XLSA17_RECIPES[experiment]
    model = objects["model"]
    assert type(model.head).__name__ == head
    if loss is not None:
        assert type(model.loss).__name__ == loss
        assert {k: getattr(model.loss, k) for k in settings} == settings
    assert report["refit_on_trainval"]["epochs"] == 1
    assert 0.0 <= metrics["test/zsl_top1"] <= 1.0 and 0.0 <= metrics["test/gzsl_cs_h"] <= 1.0


def test_debug_fast_trains_two_short_epochs_then_refits_and_tests(tmp_path):
    write_toy(tmp_path)
    metrics, objects = train(_toy_cfg(tmp_path, ["experiment=xlsa17_devise", "debug=fast", *NO_LOGGER]))
    trainer = objects["cfg"].trainer
    assert (trainer.max_steps, trainer.max_epochs, trainer.limit_train_batches) == (-1, 2, 3)
    report = json.loads(Path(objects["cfg"].paths.output_dir, "metrics.json").read_text())
    assert report["refit_on_trainval"]["epochs"] in (1, 2) and 0.0 <= metrics["test/zsl_top1"] <= 1.0


def test_a_gradient_model_refits_for_the_selected_number_of_epochs(tmp_path):
    write_toy(tmp_path)
    metrics, objects = train(_toy_cfg(tmp_path, ["experiment=xlsa17_devise", "trainer.max_epochs=3",
                                                 "dataset.batch_size=32", "model.optimizer.lr=0.01"]))
    report = json.loads(Path(objects["cfg"].paths.output_dir, "metrics.json").read_text())
    selected = torch.load(report["refit_on_trainval"]["selected_checkpoint"], weights_only=False)
    epochs = selected["epoch"] + 1
    assert report["refit_on_trainval"]["epochs"] == epochs
    assert objects["trainer"].current_epoch == epochs  # the refit trainer ran exactly that long
    assert report["refit_on_trainval"]["steps"] == epochs * 7  # 216 trainval images / 32
    assert "test/zsl_top1" in metrics and "val/acc_best" in metrics


def test_transposition_on_precomputed_image_features_is_refused_with_the_fix(tmp_path):
    write_toy(tmp_path)
    with pytest.raises(ValueError, match="model.transpose_semitones=0"):
        train(_toy_cfg(tmp_path, ["experiment=xlsa17_devise", "model.transpose_semitones=3"]))


def test_runs_aggregate_with_the_report_tool(tmp_path):
    write_toy(tmp_path)
    for model in ("eszsl", "sae"):
        cfg = _toy_cfg(tmp_path, [f"experiment=xlsa17_{model}", *NO_LOGGER])
        cfg.paths.output_dir = str(tmp_path / "sweep" / model)
        train(cfg)
        save_run_overrides([f"experiment=xlsa17_{model}"], tmp_path / "sweep" / model)
    configs, failed = collect(tmp_path / "sweep")
    assert not failed
    assert sorted(c.name for c in configs) == ["experiment=xlsa17_eszsl", "experiment=xlsa17_sae"]
    assert all(c.mean("test/zsl_top1") == 1.0 for c in configs)


def test_cached_attributes_are_computed_again_when_att_splits_is_replaced(tmp_path):
    write_toy(tmp_path)
    path = tmp_path / "TOY" / "att_splits.mat"

    def vectors():
        source = Xlsa17Attributes(tmp_path, "TOY", dim=6, cache_dir=tmp_path / "cache")
        return source.vectors(["class03"]).mean

    before = vectors()
    mat = scipy.io.loadmat(str(path))
    kept = {key: value for key, value in mat.items() if not key.startswith("__")}
    scipy.io.savemat(path, {**kept, "att": mat["att"][::-1]})  # the same file, other values
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 1
    assert not torch.equal(vectors(), before)


def test_attributes_of_a_toy_dataset_come_from_att(tmp_path):
    write_toy(tmp_path)
    source = Xlsa17Attributes(tmp_path, "TOY", dim=6)
    att = scipy.io.loadmat(str(tmp_path / "TOY" / "att_splits.mat"))["att"]
    torch.testing.assert_close(source.vectors(["class03"]).mean[0], torch.from_numpy(att[:, 3]).float())


@pytest.mark.parametrize(("file", "content"), [("res101.mat", "truncated"), ("att_splits.mat", "truncated"),
                                               ("res101.mat", "html")])
def test_an_unreadable_mat_file_names_the_file_and_the_fix(tmp_path, file, content):
    folder = write_toy(tmp_path)
    data = (folder / file).read_bytes()
    # a download cut short, or an error page saved under the file's name
    (folder / file).write_bytes(data[: len(data) // 2] if content == "truncated" else b"<html>404</html>")
    with pytest.raises(ValueError) as error:
        _datamodule(tmp_path, "TOY", 16)
    message = str(error.value)
    assert f"{folder / file} is malformed: scipy.io.loadmat cannot read it" in message
    assert XLSA17_URL in message and "re-extract its data/TOY/ folder" in message


def test_a_missing_class_list_says_what_to_put_where(tmp_path):
    folder = write_toy(tmp_path)
    (folder / "valclasses1.txt").unlink()
    with pytest.raises(FileNotFoundError) as error:
        _datamodule(tmp_path, "TOY", 16)
    message = str(error.value)
    assert f"{folder / 'valclasses1.txt'} is missing" in message
    assert f"put valclasses1.txt from the data/TOY/ folder of {XLSA17_URL} at {folder}" in message


def test_attributes_of_the_wrong_shape_name_the_file_and_the_fix(tmp_path):
    folder = write_toy(tmp_path)
    att = scipy.io.loadmat(str(folder / "att_splits.mat"))["att"]
    _rewrite(folder / "att_splits.mat", att=att[:, :-1])  # 11 columns, 12 classes
    with pytest.raises(ValueError) as error:
        _datamodule(tmp_path, "TOY", 16)
    message = str(error.value)
    assert f"{folder / 'att_splits.mat'} is malformed: 'att' is (6, 11) but there are 12 classes" in message
    assert XLSA17_URL in message


@pytest.mark.parametrize("name", ["Awa2", "TOY"])
def test_a_dataset_name_without_a_known_attribute_count_says_to_fix_it_or_set_side_info_dim(tmp_path, name):
    # a misspelt name (no folder) and a folder of one's own in the same format (no side_info.dim)
    write_toy(tmp_path)
    cfg = _toy_cfg(tmp_path, ["experiment=xlsa17_eszsl", *NO_LOGGER], dataset=(f"dataset.name={name}",
                                                                            "dataset.feature_dim=16"))
    with pytest.raises(Exception, match=rf"dataset.name={name} is none of xlsa17's datasets "
                                        r"\['AWA1', 'AWA2', 'CUB', 'SUN', 'APY'\]") as error:
        train(cfg)
    assert "side_info.dim=<" in str(error.value)
    cfg = _toy_cfg(tmp_path, ["experiment=xlsa17_eszsl", *NO_LOGGER], dataset=(f"dataset.name={name}",
                                                                            "dataset.feature_dim=16",
                                                                            "side_info.dim=6"))
    if name == "TOY":  # with the size given, the folder of one's own trains
        assert 0.0 <= train(cfg)[0]["test/zsl_top1"] <= 1.0
    else:  # and the misspelt name comes to the message that names the expected files
        with pytest.raises(FileNotFoundError, match="dataset.name=Awa2 is none of xlsa17's datasets"):
            train(cfg)


def test_original_att_is_raw_only_without_normalisation_and_the_default_says_so(tmp_path, caplog):
    write_toy(tmp_path)  # original_att = 10 * att, att of unit length per class
    att = torch.from_numpy(scipy.io.loadmat(str(tmp_path / "TOY" / "att_splits.mat"))["att"][:, 3]).float()
    raw = Xlsa17Attributes(tmp_path, "TOY", attribute_key="original_att", dim=6, normalize=False)
    torch.testing.assert_close(raw.vectors(["class03"]).mean[0], 10 * att)
    assert "side_info.normalize=false" not in caplog.text
    normalised = Xlsa17Attributes(tmp_path, "TOY", attribute_key="original_att", dim=6)
    torch.testing.assert_close(normalised.vectors(["class03"]).mean[0], att)  # att again
    assert "side_info.attribute_key=original_att" in caplog.text
    assert "add side_info.normalize=false for the raw values" in caplog.text


def test_a_missing_feature_file_of_another_name_is_the_one_the_message_asks_for(tmp_path):
    write_toy(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        Xlsa17DataModule(tmp_path, "TOY", feature_file="vgg19.mat").prepare_data()
    message = str(error.value)
    assert f"{tmp_path / 'TOY' / 'vgg19.mat'} does not exist" in message
    assert f"so that {tmp_path / 'TOY' / 'vgg19.mat'} and" in message
    assert str(tmp_path / "TOY" / "res101.mat") not in message  # not the archive's file: not asked for
    assert "dataset.feature_file=vgg19.mat is not in the archive" in message


def test_training_on_trainval_from_the_start_is_refused_since_no_validation_would_choose(tmp_path):
    write_toy(tmp_path)
    cfg = _toy_cfg(tmp_path, ["experiment=xlsa17_eszsl", "dataset.train_on=trainval",
                              "dataset.refit_on_trainval=false", *NO_LOGGER])
    with pytest.raises(ValueError, match="dataset.train_on=trainval trains with no validation data"):
        train(cfg)


COSINE = "model.scheduler={_target_: torch.optim.lr_scheduler.CosineAnnealingLR, _partial_: true, T_max: %d}"


@pytest.mark.parametrize(("t_max", "refused"), [
    # the fit's own 3 epochs of 4 batches: its learning rate climbed back from step 6 on
    (5, r"model.scheduler.T_max=5 is shorter than the run \(trainer.max_epochs=3 epochs of 4 steps, "
        r"and the refit on trainval, which repeats up to 3 epochs of 7 steps\).*climbs back up.*"
        r"model.scheduler.T_max=21 or more, or model.scheduler=null"),
    # the fit's length: the refit (2 selected epochs of 7 batches) climbed back from step 13 on
    (12, r"model.scheduler.T_max=12 is shorter than the run .*Set model.scheduler.T_max=21 "),
    (21, None),
])
def test_a_schedule_shorter_than_the_epochs_of_the_fit_or_its_refit_is_refused_as_the_fit_starts(
        tmp_path, monkeypatch, t_max, refused):
    """xlsa17's fits are counted in epochs (trainer.max_steps=-1), so the check by max_steps
    before anything is built let any T_max through."""
    write_toy(tmp_path)
    rates = []
    monkeypatch.setattr(ZeroShotModule, "on_train_batch_start", lambda self, batch, i: rates.append(
        self.trainer.optimizers[0].param_groups[0]["lr"]), raising=False)
    cfg = _toy_cfg(tmp_path, ["experiment=xlsa17_devise", "trainer.max_epochs=3", "dataset.batch_size=32",
                              "model.optimizer.lr=0.01", COSINE % t_max, *NO_LOGGER])
    if refused is not None:
        with pytest.raises(ValueError, match=refused):
            train(cfg)
        assert rates == []  # before any step
        return
    _, objects = train(cfg)
    fit, refit = rates[:12], rates[12:]
    assert len(refit) == objects["trainer"].global_step > 12  # the refit's epochs are longer
    assert all(part == sorted(part, reverse=True) for part in (fit, refit))  # never climbs back


@pytest.mark.slow
def test_a_run_stopped_mid_epoch_resumes_on_the_epochs_next_batch_to_the_uninterrupted_metrics(tmp_path):
    """Lightning reads a resumed epoch's loader from its start while counting batches on: the
    shuffled epoch started over, and the resumed run trained its first batches twice."""
    settings = ["experiment=xlsa17_devise", "trainer.max_epochs=3", "dataset.batch_size=32",
                "model.optimizer.lr=0.01", "seed=3", "trainer.deterministic=true",
                "callbacks.last_checkpoint.every_n_train_steps=100", *NO_LOGGER]
    for name in ("full", "stopped"):
        write_toy(tmp_path / name)
    uninterrupted, objects = train(_toy_cfg(tmp_path / "full", settings))
    assert objects["trainer"].num_training_batches == 7  # step 3 is in the middle of epoch 0
    stopped = _toy_cfg(tmp_path / "stopped", settings)
    with open_dict(stopped):
        stopped.callbacks.sigterm = {"_target_": "test_resume._Sigterm", "at_step": 2}
    with pytest.raises(SystemExit):
        train(stopped)
    last = tmp_path / "stopped" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3
    resumed, _ = train(_toy_cfg(tmp_path / "stopped", [*settings, "ckpt_path=last"]))
    assert {k: v for k, v in resumed.items() if k != "test/checkpoint"} == {
        k: v for k, v in uninterrupted.items() if k != "test/checkpoint"}
