"""Tests of the TinySOL clip source, offline.

Checks, messages, fingerprints and the download flow run everywhere on a generated
mini-TinySOL (`tinysol_fixture`); only `test_real_samples_load` reads real TinySOL files, and
skips without ../shared/data (or $FEWZERO_SHARED_DATA).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tarfile
import urllib.error
from collections import Counter
from pathlib import Path

import pytest
import soundfile as sf
from conftest import SHARED_DATA
from tinysol_fixture import PRESENT_INSTRUMENTS, MiniTinySOL, link, make_mini_tinysol, tone

from fewzero.data.clips import Clip
from fewzero.data.datamodule import FewShotDataModule
from fewzero.data.features import MelFeatures, check_md5, prepare_and_load
from fewzero.data.tinysol import TinySOL, TinySOLDownloadError, _import_mirdata
from fewzero.data.zsl_datamodule import ZeroShotDataModule

SHARED = SHARED_DATA / "tinysol"
INDEX = SHARED / "tinysol_index_6.0.json"
METADATA = SHARED / "TinySOL_metadata.csv"
SAMPLES = SHARED / "real_samples"
OFFICIAL_INDEX_MD5 = "dba7aab99081f66d6a46f2bcfc1a3296"
EXPECTED_INSTRUMENTS = Counter({"Accordion": 4, "Bass Tuba": 1, "Bassoon": 2, "Contrabass": 1,
                                "Flute": 1, "Violin": 3})

needs_shared = pytest.mark.skipif(
    not (INDEX.is_file() and METADATA.is_file() and SAMPLES.is_dir()),
    reason=f"real TinySOL files not available at {SHARED}",
)


def _index_tracks() -> dict[str, dict]:
    return json.loads(INDEX.read_text(encoding="utf-8"))["tracks"]


def _build_home(root: Path) -> Path:
    """A mirdata layout in `root` with the 12 real wavs at the official index's paths."""
    tracks = _index_tracks()
    for wav in sorted(SAMPLES.glob("*.wav")):
        link(wav, root / tracks[wav.stem]["audio"][0])
    link(METADATA, root / "annotation" / "TinySOL_metadata.csv")
    return root


@pytest.fixture
def mini(tmp_path: Path) -> MiniTinySOL:
    """A generated mini-TinySOL (index, metadata, some tracks' wavs; see `tinysol_fixture`)."""
    return make_mini_tinysol(tmp_path / "mini")


@pytest.fixture
def no_network(no_network: list[str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """conftest's `no_network`, with mirdata's downloader refused too (recorded alike)."""

    def refuse(*args: object, **kwargs: object) -> None:
        no_network.append(repr(args[:2]))
        raise AssertionError(f"network access attempted: {args[:2]}")

    _, _, download_utils, _ = _import_mirdata()
    monkeypatch.setattr(download_utils, "downloader", refuse)
    monkeypatch.setattr(download_utils.urllib.request, "urlretrieve", refuse)
    return no_network


@pytest.fixture
def no_local_index(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point mirdata's own TinySOL index location at an empty folder (whatever is installed)."""
    _, _, _, mirdata_tinysol = _import_mirdata()
    official = mirdata_tinysol.INDEXES[mirdata_tinysol.INDEXES["default"]]
    folder = tmp_path / "mirdata_indexes"
    monkeypatch.setattr(official, "indexes_dir", str(folder))
    monkeypatch.setattr(official.remote, "destination_dir", str(folder))
    return folder


def test_requires_prepare() -> None:
    source = TinySOL("/nonexistent")
    with pytest.raises(RuntimeError, match="prepare"):
        source.clips()
    with pytest.raises(RuntimeError, match="prepare"):
        source.fingerprint()


@needs_shared
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # audioread, imported by librosa
def test_real_samples_load(tmp_path: Path, no_network: list[str],
                           caplog: pytest.LogCaptureFixture) -> None:
    home = _build_home(tmp_path / "tinysol")
    source = TinySOL(home, index_path=INDEX, allow_missing=True)
    with caplog.at_level(logging.WARNING, logger="fewzero.data.tinysol"):
        source.prepare()
    clips = source.clips()
    assert any("using the 12 present" in r.getMessage() for r in caplog.records)

    assert len(clips) == 12
    assert all(isinstance(c, Clip) for c in clips)
    assert Counter(c.instrument for c in clips) == EXPECTED_INSTRUMENTS
    assert [c.path.stem for c in clips] == sorted(c.path.stem for c in clips)
    assert source.n_missing == len(_index_tracks()) - 12
    assert not no_network
    for clip in clips:
        assert clip.path.is_absolute() and clip.path.is_file()
        assert clip.path.is_relative_to(home / "audio")
        assert clip.fold in range(5)
        assert 21 <= clip.pitch <= 108
        assert clip.dynamics in {"pp", "p", "mf", "f", "ff"}
        assert f"-{clip.dynamics}-" in clip.path.name
        info = sf.info(clip.path)
        assert info.samplerate == 44100 and info.channels == 1
        assert len(clip.md5) == 32  # the index's checksum, checked before features are computed
        check_md5(clip)
    by_name = {c.path.stem: c for c in clips}
    fl = by_name["Fl-ord-C4-mf-N-T14d"]
    assert (fl.instrument, fl.pitch, fl.dynamics) == ("Flute", 60, "mf")
    assert by_name["Acc-ord-C8-pp-alt1-N"].pitch == 108

    # mirdata's own view agrees: the 12 files and the metadata are valid, the rest missing.
    mirdata, _, _, _ = _import_mirdata()
    ds = mirdata.initialize("tinysol", data_home=str(home))
    ds.index_path = str(INDEX)
    missing, invalid = ds.validate(verbose=False)
    assert invalid == {"metadata": {}, "tracks": {}}
    assert missing["metadata"] == {}
    assert set(missing["tracks"]) == set(ds.track_ids) - set(by_name)
    for track_id, clip in by_name.items():
        track = ds.track(track_id)
        assert (track.instrument_full, track.split, track.pitch_id, track.dynamics) == (
            clip.instrument, clip.fold, clip.pitch, clip.dynamics)
    audio, sr = ds.track("Fl-ord-C4-mf-N-T14d").audio
    assert sr == 44100 and audio.ndim == 1 and len(audio) == sf.info(fl.path).frames


def test_some_missing_without_allow_missing(tmp_path: Path, mini: MiniTinySOL,
                                            no_network: list[str]) -> None:
    home = mini.build_home(tmp_path / "tinysol")
    n_total, n_present = len(mini.tracks()), len(mini.sample_files())
    assert 0 < n_present < n_total
    with pytest.raises(FileNotFoundError) as err:
        TinySOL(home, index_path=mini.index).prepare()
    message = str(err.value)
    assert f"{n_total - n_present} of {n_total}" in message
    assert f"({n_present} present)" in message
    assert "dataset.source.allow_missing=true" in message
    assert "dataset.source.download=true" in message
    assert f"{home}/audio/<Family>/<Instrument folder>/ordinario/<file>.wav" in message
    assert "3685367" in message and "TinySOL.tar.gz" in message
    assert not no_network


def test_a_partial_tinysol_is_reported_once_though_prepare_data_and_setup_both_prepare_it(
        tmp_path: Path, mini: MiniTinySOL, no_network: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """A run prepares its source in prepare_data and again in setup (and again for the refit's
    fit): the missing files and the unofficial index are said once; a changed count again."""
    home = mini.build_home(tmp_path / "tinysol")
    source = TinySOL(home, index_path=mini.index, allow_missing=True)
    module = ZeroShotDataModule(source, MelFeatures(clip_seconds=0.5),
                                {"seen": ["Violin", "Accordion"], "unseen": ["Bassoon"]},
                                tmp_path / "cache", excerpt_seconds=0.25)
    n_total, n_present = len(mini.tracks()), len(mini.sample_files())
    with caplog.at_level(logging.INFO, logger="fewzero.data.tinysol"):
        module.prepare_data()
        module.setup()
        module.for_trainval().prepare_data()
    said = Counter(r.getMessage().split(" under ")[0].split(" has md5 ")[0] for r in caplog.records
                   if r.name == "fewzero.data.tinysol")
    assert said == {f"TinySOL: {n_total - n_present} of {n_total} audio files missing": 1,
                    f"TinySOL index {mini.index}": 1, f"TinySOL: {n_present} clips from {home}": 1}
    caplog.clear()
    next(home.glob("audio/**/*.wav")).unlink()  # a file lost since: said again, with the count
    with caplog.at_level(logging.WARNING, logger="fewzero.data.tinysol"):
        source.prepare()
    assert [r.getMessage().split(" under ")[0] for r in caplog.records
            if r.name == "fewzero.data.tinysol"] == [
        f"TinySOL: {n_total - n_present + 1} of {n_total} audio files missing"]
    assert not no_network


def test_split_class_with_all_files_missing_is_not_called_unknown(tmp_path: Path,
                                                                  mini: MiniTinySOL,
                                                                  no_network: list[str]) -> None:
    """allow_missing=true: Cello (no file present) is named as missing, not as misspelt."""
    home = mini.build_home(tmp_path / "tinysol")
    assert "Cello" not in PRESENT_INSTRUMENTS
    source = TinySOL(home, index_path=mini.index, allow_missing=True)
    setting = {"n_way": 2, "n_shot": 1, "n_query": 1, "n_episodes": 1}
    episodes = {"train": setting, "val": setting, "test": [setting]}
    features = MelFeatures(clip_seconds=0.5)
    modules = [
        FewShotDataModule(source, features, {"train": ["Violin", "Cello"], "val": ["Accordion"],
                                             "test": ["Bassoon"]}, episodes, tmp_path / "cache",
                          excerpt_seconds=0.25),
        ZeroShotDataModule(source, features, {"seen": ["Violin", "Accordion"], "unseen": ["Cello"]},
                           tmp_path / "cache", excerpt_seconds=0.25),
    ]
    for module, key in zip(modules, ["dataset.split.train", "dataset.split.unseen"], strict=True):
        with pytest.raises(ValueError, match=rf"tinysol instrument\(s\) \['Cello'\] of {key} "
                                             "have no clips") as err:
            module.setup()
        message = str(err.value)
        assert "Unknown" not in message and "spelling" not in message
        assert "dataset.source.allow_missing=true skipped them" in message
        assert f"{home}/audio/Strings/Violoncello/ordinario (Cello)" in message
        assert f"or remove them from {key}." in message
    with pytest.raises(ValueError, match=r"Unknown tinysol instrument name\(s\) \['Cello '\]"):
        ZeroShotDataModule(source, features, {"seen": ["Violin"], "unseen": ["Cello "]}, tmp_path / "cache",
                           excerpt_seconds=0.25).setup()  # a misspelt name is still unknown
    assert not no_network


def test_a_misspelt_split_class_is_refused_before_any_audio_is_decoded(
        tmp_path: Path, mini: MiniTinySOL, no_network: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On the real TinySOL, decoding and caching every clip takes minutes: the split is checked
    first, by both datamodules."""
    from fewzero.data import features as features_module

    monkeypatch.setattr(features_module, "compute_features", lambda *a, **k: pytest.fail("decoded"))
    source = TinySOL(mini.build_home(tmp_path / "tinysol"), index_path=mini.index, allow_missing=True)
    setting = {"n_way": 2, "n_shot": 1, "n_query": 1, "n_episodes": 1}
    episodes = {"train": setting, "val": setting, "test": [setting]}
    features = MelFeatures(clip_seconds=0.5)
    modules = [  # with the config list that names it
        (FewShotDataModule(source, features, {"train": ["Violin"], "val": ["Accordion"],
                                              "test": ["violin "]}, episodes, tmp_path / "cache",
                           excerpt_seconds=0.25),
         "dataset.split.test"),
        (ZeroShotDataModule(source, features, {"seen": ["Violin", "Accordion"], "unseen": ["violin "]},
                            tmp_path / "cache", excerpt_seconds=0.25), "dataset.split.unseen"),
    ]
    for module, key in modules:
        for step in (module.prepare_data, module.setup):
            with pytest.raises(ValueError, match=r"Unknown tinysol instrument name\(s\) \['violin '\]"
                                                 rf".*Check the spelling in {key} "):
                step()
    assert not list((tmp_path / "cache").glob("*.pt"))
    assert not no_network


def test_unexpected_metadata_instrument_names_the_official_file(tmp_path: Path,
                                                                 mini: MiniTinySOL,
                                                                 no_network: list[str]) -> None:
    home = mini.build_home(tmp_path / "tinysol", metadata=False)
    original = mini.metadata.read_text(encoding="utf-8")
    edited = original.replace(",Vn,Violin,", ",Vn,Fiddle,")
    assert edited != original
    (home / "annotation" / "TinySOL_metadata.csv").parent.mkdir(parents=True)
    (home / "annotation" / "TinySOL_metadata.csv").write_text(edited, encoding="utf-8")
    with pytest.raises(ValueError, match=r"Unknown TinySOL instrument name\(s\) \['Fiddle'\]") as err:
        TinySOL(home, index_path=mini.index, allow_missing=True).prepare()
    assert "official TinySOL_metadata.csv" in str(err.value) and "spelling" not in str(err.value)
    assert not no_network


@pytest.mark.parametrize(("text", "problem"), [("{not json", "is not a valid mirdata TinySOL index"),
                                              ('{"version": "6.0", "tracks": {}}', "lists no tracks")])
def test_an_unreadable_index_names_the_official_one_and_how_to_use_it(tmp_path: Path, mini: MiniTinySOL,
                                                                       no_network: list[str], text: str,
                                                                       problem: str) -> None:
    index = tmp_path / "index.json"
    index.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=problem) as err:
        TinySOL(mini.build_home(tmp_path / "tinysol"), index_path=index).prepare()
    message = str(err.value)
    assert "Use the official mirdata index tinysol_index_" in message
    assert "pass it as dataset.source.index_path" in message and "download=true" in message
    assert not no_network


def test_a_track_without_a_metadata_row_names_the_official_files(tmp_path: Path, mini: MiniTinySOL,
                                                                  no_network: list[str]) -> None:
    home = mini.build_home(tmp_path / "tinysol", metadata=False)
    rows = mini.metadata.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [row for row in rows if ",Vn,Violin," not in row]
    assert len(kept) < len(rows)
    (home / "annotation").mkdir(parents=True)
    (home / "annotation" / "TinySOL_metadata.csv").write_text("".join(kept), encoding="utf-8")
    with pytest.raises(ValueError, match=r"has no row in the metadata csv \(index and metadata do not "
                                         r"match\). Use the official TinySOL_metadata.csv of zenodo "
                                         r"record 3685367"):
        TinySOL(home, index_path=mini.index, allow_missing=True).prepare()
    assert not no_network


@pytest.mark.parametrize(("key", "value"), [("allow_missing", "no"), ("download", "false"),
                                          ("allow_missing", 1)])
def test_download_and_allow_missing_take_only_true_or_false(key: str, value: object) -> None:
    """bool("no") is True: a string must not turn downloading or skipping files on."""
    with pytest.raises(ValueError, match=rf"dataset\.source\.{key}={value!r}: must be true or false"):
        TinySOL("/nonexistent", **{key: value})


def _home_with_metadata(root: Path, mini: MiniTinySOL, text: str) -> Path:
    """A mirdata layout in `root` with the present wavs and `text` as the metadata csv."""
    home = mini.build_home(root, metadata=False)
    (home / "annotation").mkdir(parents=True)
    (home / "annotation" / "TinySOL_metadata.csv").write_text(text, encoding="utf-8")
    return home


def test_a_fold_outside_0_to_4_names_the_file_and_line(tmp_path: Path, mini: MiniTinySOL,
                                                       no_network: list[str]) -> None:
    original = mini.metadata.read_text(encoding="utf-8")
    edited = original.replace(",2,Winds,Fl,Flute,", ",7,Winds,Fl,Flute,")
    assert edited != original
    home = _home_with_metadata(tmp_path / "tinysol", mini, edited)
    metadata = home / "annotation" / "TinySOL_metadata.csv"
    with pytest.raises(ValueError) as err:
        TinySOL(home, index_path=mini.index, allow_missing=True).prepare()
    assert str(err.value).startswith(
        f"TinySOL metadata {metadata}, line 10 (Winds/Flute/ordinario/Fl-ord-C4-mf-N-N.wav) has "
        "Fold '7'; TinySOL's folds are 0 to 4. Use the official TinySOL_metadata.csv of zenodo "
        f"record 3685367")
    assert f"or delete {metadata} and re-run with dataset.source.download=true." in str(err.value)
    assert not no_network


def test_metadata_with_other_columns_names_the_line_and_the_official_file(
        tmp_path: Path, mini: MiniTinySOL, no_network: list[str]) -> None:
    header, *rows = mini.metadata.read_text(encoding="utf-8").splitlines()
    cut = "\n".join([header] + [",".join(row.split(",")[:5]) for row in rows]) + "\n"
    home = _home_with_metadata(tmp_path / "tinysol", mini, cut)
    with pytest.raises(ValueError, match=r"TinySOL_metadata\.csv, line 2 has 5 columns, not 14\. "
                                         r"Use the official TinySOL_metadata\.csv of zenodo record "
                                         r"3685367 \(.*; 14 columns\), or delete .* and re-run with "
                                         r"dataset\.source\.download=true"):
        TinySOL(home, index_path=mini.index, allow_missing=True).prepare()
    assert not no_network


def test_an_index_track_without_audio_path_names_the_index_and_the_fix(
        tmp_path: Path, mini: MiniTinySOL, no_network: list[str]) -> None:
    index = json.loads(mini.index.read_text(encoding="utf-8"))
    index["tracks"]["Fl-ord-C4-mf-N-N"]["audio"] = [None, None]
    broken = tmp_path / "index.json"
    broken.write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{broken} is not a valid mirdata TinySOL index: 1 of its "
                                         r"tracks \(e\.g\. Fl-ord-C4-mf-N-N\) list no audio path\. "
                                         r"Use the official mirdata index tinysol_index_"):
        TinySOL(mini.build_home(tmp_path / "tinysol"), index_path=broken, allow_missing=True).prepare()
    assert not no_network


def test_an_index_path_that_is_a_directory_is_called_one(tmp_path: Path,
                                                         no_network: list[str]) -> None:
    with pytest.raises(IsADirectoryError, match=rf"index path {tmp_path} \(dataset\.source\."
                                                r"index_path\) is a directory: give the index file "
                                                rf"itself, e.g\. {tmp_path}/tinysol_index_6\.0\.json"):
        TinySOL(tmp_path / "home", index_path=tmp_path).prepare()


def test_empty_data_home(tmp_path: Path, mini: MiniTinySOL, no_network: list[str]) -> None:
    home = tmp_path / "empty"
    with pytest.raises(FileNotFoundError) as err:
        TinySOL(home, index_path=mini.index).prepare()
    message = str(err.value)
    assert "No TinySOL audio file" in message
    assert f"(0 of {len(mini.tracks())} tracks of the index {mini.index.name})" in message
    assert f"{home}/audio/<Family>/<Instrument folder>/ordinario/<file>.wav" in message
    # one path from the index (its first track, a Bass Tuba note) as an example
    assert f"{home}/audio/Brass/Bass_Tuba/ordinario/" in message
    assert f"{home}/annotation/TinySOL_metadata.csv" in message
    assert "zenodo" in message and "3685367" in message and "TinySOL.tar.gz" in message
    assert "dataset.source.download=true" in message
    assert not no_network
    assert not home.exists() or not any(home.iterdir())


def test_missing_metadata(tmp_path: Path, mini: MiniTinySOL, no_network: list[str]) -> None:
    home = mini.build_home(tmp_path / "tinysol", metadata=False)
    with pytest.raises(FileNotFoundError, match="TinySOL_metadata.csv") as err:
        TinySOL(home, index_path=mini.index, allow_missing=True).prepare()
    # fewzero's own message with the fix, not a bare error from reading the absent file
    assert str(err.value).startswith(
        f"TinySOL metadata not found: expected {home}/annotation/TinySOL_metadata.csv")
    assert "3685367" in str(err.value)
    assert not no_network


def test_fingerprint(tmp_path: Path, mini: MiniTinySOL, no_network: list[str],
                     caplog: pytest.LogCaptureFixture) -> None:
    def fingerprint(home: Path) -> str:
        source = TinySOL(home, index_path=mini.index, allow_missing=True)
        source.prepare()
        return source.fingerprint()

    samples = mini.sample_files()
    with caplog.at_level(logging.WARNING, logger="fewzero.data.tinysol"):
        first = fingerprint(mini.build_home(tmp_path / "a"))
    # the generated index is not mirdata's official one: accepted, with a warning
    assert any("not that of mirdata's official index" in m for m in caplog.messages)
    moved = fingerprint(mini.build_home(tmp_path / "elsewhere" / "b"))
    fewer = fingerprint(mini.build_home(tmp_path / "c", samples=samples[:-1]))
    assert first == moved
    assert fewer != first
    assert len(first) == 12

    # an index with other content (same tracks) changes it too
    subset_index = mini.subset_index(tmp_path / "subset_index.json", samples)
    source = TinySOL(tmp_path / "a", index_path=subset_index)  # complete for this index
    source.prepare()
    assert source.n_missing == 0 and len(source.clips()) == len(samples)
    assert source.fingerprint() != first
    assert not no_network


def test_clips_carry_the_index_md5_and_audio_changed_since_is_refused(tmp_path: Path,
                                                                      mini: MiniTinySOL,
                                                                      no_network: list[str]) -> None:
    source = TinySOL(mini.build_home(tmp_path / "tinysol"), index_path=mini.index, allow_missing=True)
    source.prepare()
    tracks, clips = mini.tracks(), source.clips()
    assert [c.md5 for c in clips] == [tracks[c.path.stem]["audio"][1] for c in clips]
    # other notes of the same length: they decode without complaint, only the md5 tells
    changed = clips[0]
    other = tone(changed.pitch + 5)
    assert len(other) == changed.path.stat().st_size
    changed.path.unlink()
    changed.path.write_bytes(other)
    with pytest.raises(RuntimeError, match=rf"{re.escape(str(changed.path))} has md5 "
                                           rf"{hashlib.md5(other).hexdigest()}, but its source "
                                           rf"lists {changed.md5}"):
        prepare_and_load(source, MelFeatures(clip_seconds=0.5), tmp_path / "cache")
    assert not no_network


def test_download_skipped_when_complete(tmp_path: Path, mini: MiniTinySOL,
                                        no_network: list[str]) -> None:
    """download=True with every file of the index present must not touch the network."""
    samples = mini.sample_files()
    subset_index = mini.subset_index(tmp_path / "subset_index.json", samples)
    source = TinySOL(mini.build_home(tmp_path / "a"), index_path=subset_index, download=True)
    source.prepare()
    assert len(source.clips()) == len(samples)
    assert not no_network


def test_no_index_no_download(tmp_path: Path, no_network: list[str],
                              no_local_index: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        TinySOL(tmp_path / "home").prepare()
    message = str(err.value)
    assert "dataset.source.index_path=/path/to/tinysol_index_6.0.json" in message
    assert "dataset.source.download=true" in message
    assert OFFICIAL_INDEX_MD5 in message
    assert not no_network
    assert not no_local_index.exists()


def test_missing_index_file(tmp_path: Path, no_network: list[str]) -> None:
    with pytest.raises(FileNotFoundError, match="index_path"):
        TinySOL(tmp_path, index_path=tmp_path / "nope.json").prepare()


def test_download_failure_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   no_local_index: Path) -> None:
    """download=True without network: mirdata's error becomes one clear error, no hang."""
    _, _, download_utils, mirdata_tinysol = _import_mirdata()
    remotes_before = dict(mirdata_tinysol.REMOTES)
    calls: list[str] = []

    def offline(url: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(download_utils.urllib.request, "urlretrieve", offline)
    with pytest.raises(TinySOLDownloadError) as err:
        TinySOL(tmp_path / "home", download=True).prepare()
    message = str(err.value)
    assert "no network in this test" in message
    assert "3685367" in message and "dataset.source.index_path" in message
    assert len(calls) == 1 and "tinysol_index" in calls[0]
    assert mirdata_tinysol.REMOTES == remotes_before


def test_download_audio_failure_is_clear(tmp_path: Path, mini: MiniTinySOL,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, download_utils, mirdata_tinysol = _import_mirdata()
    calls: list[str] = []

    def offline(url: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(download_utils.urllib.request, "urlretrieve", offline)
    home = mini.build_home(tmp_path / "home")  # metadata present, some audio files missing
    with pytest.raises(TinySOLDownloadError, match="TinySOL.tar.gz"):
        TinySOL(home, index_path=mini.index, download=True).prepare()
    assert len(calls) == 1 and "3685367" in calls[0] and "TinySOL.tar.gz" in calls[0]
    assert "index" not in mirdata_tinysol.REMOTES


def test_download_flow_offline(tmp_path: Path, mini: MiniTinySOL,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """download=True end to end, with mirdata's fetch served from local files (no network)."""
    _, _, download_utils, mirdata_tinysol = _import_mirdata()
    tracks = mini.tracks()
    archive = tmp_path / "served" / "TinySOL.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:  # TinySOL.tar.gz holds <Family>/... folders
        for wav in mini.sample_files():
            tar.add(wav, arcname=str(Path(tracks[wav.stem]["audio"][0]).relative_to("audio")))
    # mirdata checks each download against its remote's md5: give it those of the served files.
    for key, served in (("audio", archive), ("annotations", mini.metadata)):
        remote = mirdata_tinysol.REMOTES[key]
        monkeypatch.setitem(mirdata_tinysol.REMOTES, key, download_utils.RemoteFileMetadata(
            filename=remote.filename, url=remote.url, destination_dir=remote.destination_dir,
            checksum=hashlib.md5(served.read_bytes()).hexdigest()))
    calls: list[str] = []

    def serve(url: str, filename: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        source = archive if "TinySOL.tar.gz" in url else mini.metadata
        shutil.copyfile(source, filename)

    monkeypatch.setattr(download_utils.urllib.request, "urlretrieve", serve)
    home = tmp_path / "home"
    source = TinySOL(home, index_path=mini.index, download=True, allow_missing=True)
    source.prepare()
    assert len(calls) == 2
    assert Counter(c.instrument for c in source.clips()) == PRESENT_INSTRUMENTS
    assert (home / "annotation" / "TinySOL_metadata.csv").is_file()
    assert not (home / "audio" / "TinySOL.tar.gz").exists()  # cleaned up after extraction


def _serve_metadata(monkeypatch: pytest.MonkeyPatch, mini: MiniTinySOL, calls: list[str],
                    fail_once: bool = False) -> None:
    """Serve mirdata's metadata download from the mini csv (its md5 made the remote's); with
    `fail_once`, the first transfer writes a few bytes and then loses the connection."""
    _, _, download_utils, mirdata_tinysol = _import_mirdata()
    remote = mirdata_tinysol.REMOTES["annotations"]
    monkeypatch.setitem(mirdata_tinysol.REMOTES, "annotations", download_utils.RemoteFileMetadata(
        filename=remote.filename, url=remote.url, destination_dir=remote.destination_dir,
        checksum=hashlib.md5(mini.metadata.read_bytes()).hexdigest()))

    def serve(url: str, filename: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        if fail_once and len(calls) == 1:
            Path(filename).write_bytes(b"Path,Fold\nhalf")
            raise ConnectionResetError("connection reset mid-transfer (simulated)")
        shutil.copyfile(mini.metadata, filename)

    monkeypatch.setattr(download_utils.urllib.request, "urlretrieve", serve)


def test_an_interrupted_download_leaves_no_partial_file_so_a_retry_succeeds(
        tmp_path: Path, mini: MiniTinySOL, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _serve_metadata(monkeypatch, mini, calls, fail_once=True)
    samples = mini.sample_files()
    subset_index = mini.subset_index(tmp_path / "subset_index.json", samples)
    home = mini.build_home(tmp_path / "home", metadata=False)
    with pytest.raises(TinySOLDownloadError, match=r"(?s)connection reset mid-transfer.*Re-run to try "
                                                   r"again \(what was partly downloaded has been "
                                                   r"removed\)"):
        TinySOL(home, index_path=subset_index, download=True).prepare()
    assert not (home / "annotation" / "TinySOL_metadata.csv").exists()
    source = TinySOL(home, index_path=subset_index, download=True)
    source.prepare()  # the retry downloads the csv again instead of refusing the partial one
    assert len(calls) == 2 and len(source.clips()) == len(samples)


def test_a_metadata_csv_that_is_not_the_listed_one_is_fetched_again_or_named(
        tmp_path: Path, mini: MiniTinySOL, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    _serve_metadata(monkeypatch, mini, calls)
    samples = mini.sample_files()
    subset_index = mini.subset_index(tmp_path / "subset_index.json", samples)
    edited = mini.metadata.read_text(encoding="utf-8").replace(",2,Winds,Fl,", ",3,Winds,Fl,")
    home = _home_with_metadata(tmp_path / "home", mini, edited)
    metadata = home / "annotation" / "TinySOL_metadata.csv"
    with caplog.at_level(logging.WARNING, logger="fewzero.data.tinysol"):
        TinySOL(home, index_path=subset_index).prepare()
    assert not calls
    assert any(f"TinySOL metadata {metadata} has md5" in m and "delete it and re-run with "
               "dataset.source.download=true" in m for m in caplog.messages)
    TinySOL(home, index_path=subset_index, download=True).prepare()
    assert len(calls) == 1 and metadata.read_bytes() == mini.metadata.read_bytes()
    kept = metadata.with_name(f"TinySOL_metadata.csv.{hashlib.md5(edited.encode()).hexdigest()}")
    assert kept.read_text(encoding="utf-8") == edited  # set aside, not lost


def test_a_partial_default_index_is_named_or_downloaded_again_into_data_home(
        tmp_path: Path, mini: MiniTinySOL, monkeypatch: pytest.MonkeyPatch,
        no_local_index: Path) -> None:
    _, _, download_utils, mirdata_tinysol = _import_mirdata()
    official = mirdata_tinysol.INDEXES[mirdata_tinysol.INDEXES["default"]]
    served = mini.subset_index(tmp_path / "served_index.json", mini.sample_files())  # all present
    monkeypatch.setattr(official.remote, "checksum", hashlib.md5(served.read_bytes()).hexdigest())
    partial = no_local_index / official.filename  # where mirdata itself downloads it
    partial.parent.mkdir(parents=True)
    partial.write_text('{"version": "6.0", "tracks": {"Acc-ord', encoding="utf-8")
    home = mini.build_home(tmp_path / "home")
    with pytest.raises(ValueError, match=rf"The TinySOL index {partial} has md5 \w+, not that of the "
                                         r"official tinysol_index_6\.0\.json .*an interrupted "
                                         r"download\? Delete it and re-run with "
                                         r"dataset\.source\.download=true"):
        TinySOL(home).prepare()
    calls: list[str] = []

    def serve(url: str, filename: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        shutil.copyfile(served, filename)

    monkeypatch.setattr(download_utils.urllib.request, "urlretrieve", serve)
    source = TinySOL(home, download=True)
    source.prepare()
    assert len(calls) == 1 and "tinysol_index" in calls[0]
    assert not partial.exists()
    assert (home / official.filename).read_bytes() == served.read_bytes()  # not in site-packages
    assert Counter(c.instrument for c in source.clips()) == PRESENT_INSTRUMENTS


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # audioread, imported by librosa
def test_mini_tinysol_is_valid_for_mirdata(tmp_path: Path, mini: MiniTinySOL) -> None:
    """The generated index, metadata and wavs agree as mirdata checks them (md5s, columns)."""
    home = mini.build_home(tmp_path / "tinysol")
    mirdata, _, _, _ = _import_mirdata()
    ds = mirdata.initialize("tinysol", data_home=str(home))
    ds.index_path = str(mini.index)
    missing, invalid = ds.validate(verbose=False)
    present = {wav.stem for wav in mini.sample_files()}
    assert invalid == {"metadata": {}, "tracks": {}}
    assert missing["metadata"] == {}
    assert set(missing["tracks"]) == set(ds.track_ids) - present
    assert ds.track_ids[0] not in present  # as in the official index: the example is missing
    assert Counter(ds.track(tid).instrument_full for tid in present) == PRESENT_INSTRUMENTS
    flute = ds.track("Fl-ord-C4-mf-N-N")
    assert (flute.split, flute.pitch_id, flute.dynamics, flute.family) == (2, 60, "mf", "Winds")
    assert ds.track("Vn-ord-A#3-ff-4c-N").string_id == 4
    audio, sr = flute.audio
    assert sr == 44100 and audio.ndim == 1 and len(audio) == sf.info(mini.samples / (
        "Fl-ord-C4-mf-N-N.wav")).frames
