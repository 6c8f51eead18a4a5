"""Tests of the TinySOL clip source on real TinySOL files (offline; skipped without ../shared)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
import tarfile
import urllib.error
from collections import Counter
from pathlib import Path

import pytest
import soundfile as sf

from fewzero.data.clips import Clip
from fewzero.data.datamodule import FewShotDataModule
from fewzero.data.features import MelFeatures, check_md5
from fewzero.data.tinysol import TinySOL, TinySOLDownloadError, _import_mirdata
from fewzero.data.zsl_datamodule import ZeroShotDataModule

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinysol"
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


def _link(src: Path, dst: Path) -> None:
    """Symlink src to dst (copy where symlinks are not allowed)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.symlink_to(src)
    except OSError:
        shutil.copyfile(src, dst)


def _index_tracks() -> dict[str, dict]:
    return json.loads(INDEX.read_text(encoding="utf-8"))["tracks"]


def _build_home(root: Path, samples: list[Path] | None = None, metadata: bool = True) -> Path:
    """A mirdata layout in `root` with the real wavs (all 12 by default) at the index's paths."""
    tracks = _index_tracks()
    for wav in sorted(SAMPLES.glob("*.wav")) if samples is None else samples:
        _link(wav, root / tracks[wav.stem]["audio"][0])
    if metadata:
        _link(METADATA, root / "annotation" / "TinySOL_metadata.csv")
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every network access (and mirdata's downloader) fail loudly; records attempts."""
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args[:2]))
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    _, _, download_utils, _ = _import_mirdata()
    monkeypatch.setattr(download_utils, "downloader", refuse)
    monkeypatch.setattr(download_utils.urllib.request, "urlretrieve", refuse)
    return attempts


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


@needs_shared
def test_some_missing_without_allow_missing(tmp_path: Path, no_network: list[str]) -> None:
    home = _build_home(tmp_path / "tinysol")
    with pytest.raises(FileNotFoundError) as err:
        TinySOL(home, index_path=INDEX).prepare()
    message = str(err.value)
    n_total = len(_index_tracks())
    assert f"{n_total - 12} of {n_total}" in message
    assert "dataset.source.allow_missing=true" in message
    assert "dataset.source.download=true" in message
    assert f"{home}/audio/<Family>/<Instrument folder>/ordinario/<file>.wav" in message
    assert "3685367" in message and "TinySOL.tar.gz" in message
    assert not no_network


@needs_shared
def test_split_class_with_all_files_missing_is_not_called_unknown(tmp_path: Path,
                                                                  no_network: list[str]) -> None:
    """allow_missing=true: Cello (no file present) is named as missing, not as misspelt."""
    home = _build_home(tmp_path / "tinysol")
    source = TinySOL(home, index_path=INDEX, allow_missing=True)
    episodes = {"train": {"n_way": 2, "n_shot": 1, "n_query": 1, "n_episodes": 1}, "val": {
        "n_way": 1, "n_shot": 1, "n_query": 1, "n_episodes": 1}, "test": []}
    features = MelFeatures(clip_seconds=0.5)
    modules = [
        FewShotDataModule(source, features, {"train": ["Violin", "Cello"], "val": ["Accordion"],
                                             "test": ["Bassoon"]}, episodes, tmp_path / "cache"),
        ZeroShotDataModule(source, features, {"seen": ["Violin", "Accordion"], "unseen": ["Cello"]},
                           tmp_path / "cache"),
    ]
    for module in modules:
        with pytest.raises(ValueError, match=r"tinysol instrument\(s\) \['Cello'\] of dataset.split "
                                             "have no clips") as err:
            module.setup()
        message = str(err.value)
        assert "Unknown" not in message and "spelling" not in message
        assert "dataset.source.allow_missing=true skipped them" in message
        assert f"{home}/audio/Strings/Violoncello/ordinario (Cello)" in message
        assert "or remove them from dataset.split" in message
    with pytest.raises(ValueError, match=r"Unknown tinysol instrument name\(s\) \['Cello '\]"):
        ZeroShotDataModule(source, features, {"seen": ["Violin"], "unseen": ["Cello "]},
                           tmp_path / "cache").setup()  # a misspelt name is still unknown
    assert not no_network


@needs_shared
def test_unexpected_metadata_instrument_names_the_official_file(tmp_path: Path,
                                                                 no_network: list[str]) -> None:
    home = _build_home(tmp_path / "tinysol", metadata=False)
    edited = METADATA.read_text(encoding="utf-8").replace(",Vn,Violin,", ",Vn,Fiddle,")
    (home / "annotation" / "TinySOL_metadata.csv").parent.mkdir(parents=True)
    (home / "annotation" / "TinySOL_metadata.csv").write_text(edited, encoding="utf-8")
    with pytest.raises(ValueError, match=r"Unknown TinySOL instrument name\(s\) \['Fiddle'\]") as err:
        TinySOL(home, index_path=INDEX, allow_missing=True).prepare()
    assert "official TinySOL_metadata.csv" in str(err.value) and "spelling" not in str(err.value)


@needs_shared
def test_empty_data_home(tmp_path: Path, no_network: list[str]) -> None:
    home = tmp_path / "empty"
    with pytest.raises(FileNotFoundError) as err:
        TinySOL(home, index_path=INDEX).prepare()
    message = str(err.value)
    assert "No TinySOL audio file" in message
    assert f"{home}/audio/<Family>/<Instrument folder>/ordinario/<file>.wav" in message
    # one real path from the index as an example
    assert f"{home}/audio/Brass/Bass_Tuba/ordinario/" in message
    assert f"{home}/annotation/TinySOL_metadata.csv" in message
    assert "zenodo" in message and "3685367" in message and "TinySOL.tar.gz" in message
    assert "dataset.source.download=true" in message
    assert not no_network
    assert not home.exists() or not any(home.iterdir())


@needs_shared
def test_missing_metadata(tmp_path: Path, no_network: list[str]) -> None:
    home = _build_home(tmp_path / "tinysol", metadata=False)
    with pytest.raises(FileNotFoundError, match="TinySOL_metadata.csv"):
        TinySOL(home, index_path=INDEX, allow_missing=True).prepare()


@needs_shared
def test_fingerprint(tmp_path: Path, no_network: list[str]) -> None:
    def fingerprint(home: Path) -> str:
        source = TinySOL(home, index_path=INDEX, allow_missing=True)
        source.prepare()
        return source.fingerprint()

    samples = sorted(SAMPLES.glob("*.wav"))
    first = fingerprint(_build_home(tmp_path / "a"))
    moved = fingerprint(_build_home(tmp_path / "elsewhere" / "b"))
    fewer = fingerprint(_build_home(tmp_path / "c", samples=samples[:-1]))
    assert first == moved
    assert fewer != first
    assert len(first) == 12

    # an index with other content (same tracks) changes it too
    subset = json.loads(INDEX.read_text(encoding="utf-8"))
    subset["tracks"] = {s.stem: subset["tracks"][s.stem] for s in samples}
    subset_index = tmp_path / "subset_index.json"
    subset_index.write_text(json.dumps(subset), encoding="utf-8")
    source = TinySOL(tmp_path / "a", index_path=subset_index)  # complete for this index
    source.prepare()
    assert source.n_missing == 0 and len(source.clips()) == 12
    assert source.fingerprint() != first


@needs_shared
def test_download_skipped_when_complete(tmp_path: Path, no_network: list[str]) -> None:
    """download=True with every file of the index present must not touch the network."""
    samples = sorted(SAMPLES.glob("*.wav"))
    subset = json.loads(INDEX.read_text(encoding="utf-8"))
    subset["tracks"] = {s.stem: subset["tracks"][s.stem] for s in samples}
    subset_index = tmp_path / "subset_index.json"
    subset_index.write_text(json.dumps(subset), encoding="utf-8")
    source = TinySOL(_build_home(tmp_path / "a"), index_path=subset_index, download=True)
    source.prepare()
    assert len(source.clips()) == 12
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


@needs_shared
def test_download_audio_failure_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, download_utils, mirdata_tinysol = _import_mirdata()
    calls: list[str] = []

    def offline(url: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(download_utils.urllib.request, "urlretrieve", offline)
    home = _build_home(tmp_path / "home")
    with pytest.raises(TinySOLDownloadError, match="TinySOL.tar.gz"):
        TinySOL(home, index_path=INDEX, download=True).prepare()
    assert len(calls) == 1 and "3685367" in calls[0] and "TinySOL.tar.gz" in calls[0]
    assert "index" not in mirdata_tinysol.REMOTES


@needs_shared
def test_download_flow_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """download=True end to end, with mirdata's fetch served from local files (no network)."""
    _, _, download_utils, mirdata_tinysol = _import_mirdata()
    tracks = _index_tracks()
    archive = tmp_path / "served" / "TinySOL.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:  # TinySOL.tar.gz holds <Family>/... folders
        for wav in sorted(SAMPLES.glob("*.wav")):
            tar.add(wav, arcname=str(Path(tracks[wav.stem]["audio"][0]).relative_to("audio")))
    audio = mirdata_tinysol.REMOTES["audio"]
    monkeypatch.setitem(mirdata_tinysol.REMOTES, "audio", download_utils.RemoteFileMetadata(
        filename=audio.filename, url=audio.url, destination_dir=audio.destination_dir,
        checksum=hashlib.md5(archive.read_bytes()).hexdigest()))
    calls: list[str] = []

    def serve(url: str, filename: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        source = archive if "TinySOL.tar.gz" in url else METADATA
        shutil.copyfile(source, filename)

    monkeypatch.setattr(download_utils.urllib.request, "urlretrieve", serve)
    home = tmp_path / "home"
    source = TinySOL(home, index_path=INDEX, download=True, allow_missing=True)
    source.prepare()
    assert len(calls) == 2
    assert Counter(c.instrument for c in source.clips()) == EXPECTED_INSTRUMENTS
    assert (home / "annotation" / "TinySOL_metadata.csv").is_file()
    assert not (home / "audio" / "TinySOL.tar.gz").exists()  # cleaned up after extraction
