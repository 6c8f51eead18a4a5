"""The real TinySOL dataset (Cella et al., zenodo record 3685367), loaded through `mirdata`.

TinySOL holds 2913 single-note recordings of 14 instruments played "ordinario", with an
official 5-fold split. This module exposes it as a `ClipSource`: class names are TinySOL's
"Instrument (in full)", folds the official folds, pitch the MIDI number, dynamics as in the
metadata.

mirdata's layout under ``data_home``::

    <data_home>/annotation/TinySOL_metadata.csv
    <data_home>/audio/<Family>/<Instrument folder>/ordinario/<file>.wav

mirdata 1.0 does not ship the TinySOL index (the list of files with their md5): with
``download=True`` it is downloaded into ``data_home``. Offline, pass the official index file as
``index_path``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import socket
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from fewzero.data.clips import TINYSOL_INSTRUMENTS, Clip, check_instruments, config_hash, file_md5
from fewzero.models.settings import flag

log = logging.getLogger(__name__)

ZENODO_RECORD = "3685367"
ZENODO_URL = f"https://zenodo.org/records/{ZENODO_RECORD}"
METADATA_RELPATH = Path("annotation") / "TinySOL_metadata.csv"
METADATA_N_COLUMNS = 14  # Path, Fold, Family, ..., Needed digital retuning
FOLDS = ("0", "1", "2", "3", "4")  # TinySOL's official folds
# Seconds a download may wait on a silent socket before failing (only set when none is set).
DOWNLOAD_SOCKET_TIMEOUT = 60.0


class TinySOLDownloadError(RuntimeError):
    """Downloading TinySOL (index, audio or metadata) through mirdata failed."""


def _import_mirdata() -> tuple[ModuleType, ModuleType, ModuleType, ModuleType]:
    """Import mirdata lazily, undoing the root-logger setup its import performs.

    ``mirdata.download_utils`` calls ``logging.basicConfig(level=INFO)`` at import time, which
    would make every library's INFO messages appear; the root logger is restored afterwards.

    Returns:
        The modules ``mirdata``, ``mirdata.core``, ``mirdata.download_utils`` and
        ``mirdata.datasets.tinysol``.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import mirdata
        from mirdata import core, download_utils
        from mirdata.datasets import tinysol as mirdata_tinysol
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    return mirdata, core, download_utils, mirdata_tinysol


def _listed_md5(index: dict[str, Any], track_id: str) -> str:
    """The md5 a mirdata index lists for a track's audio (`tracks.<id>.audio = [path, md5]`),
    or "" when it lists none."""
    entry = (index.get("tracks") or {}).get(track_id, {}).get("audio") or []
    return str(entry[1]) if len(entry) > 1 and entry[1] else ""


def _metadata_fix(metadata_file: Path) -> str:
    """How to get a good metadata csv, for errors about `metadata_file`."""
    return (f"Use the official TinySOL_metadata.csv of zenodo record {ZENODO_RECORD} ({ZENODO_URL}; "
            f"{METADATA_N_COLUMNS} columns), or delete {metadata_file} and re-run with "
            "dataset.source.download=true.")


def _check_metadata_rows(metadata_file: Path) -> None:
    """Raise a ValueError naming the line of the metadata csv that lacks the official columns or
    has a Fold outside 0-4 (mirdata fails on the first with a bare IndexError, accepts the other)."""
    try:
        with open(metadata_file, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            for row in reader:
                where = f"TinySOL metadata {metadata_file}, line {reader.line_num}"
                if len(row) != METADATA_N_COLUMNS:
                    raise ValueError(f"{where} has {len(row)} columns, not {METADATA_N_COLUMNS}. "
                                     + _metadata_fix(metadata_file))
                if reader.line_num > 1 and row[1] not in FOLDS:
                    raise ValueError(f"{where} ({row[0]}) has Fold {row[1]!r}; TinySOL's folds are "
                                     "0 to 4. " + _metadata_fix(metadata_file))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"Cannot read the TinySOL metadata {metadata_file}: {exc}. "
                         + _metadata_fix(metadata_file)) from exc


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Give sockets a default timeout while downloading, so a blocked network cannot hang."""
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


class TinySOL:
    """TinySOL as a clip source, through mirdata's ``tinysol`` loader.

    Args:
        data_home: folder holding (or receiving) the dataset in mirdata's layout.
        index_path: the mirdata index file (``tinysol_index_6.0.json``, md5
            dba7aab99081f66d6a46f2bcfc1a3296). None uses the official index in ``data_home``
            (downloaded there with ``download=True``), or mirdata's own copy if it has one.
        download: let mirdata download what is missing (index, TinySOL.tar.gz, metadata).
        allow_missing: use only the audio files present instead of failing when some are missing.

    Call `prepare()` before `clips()` and `fingerprint()`.
    """

    name = "tinysol"
    n_folds = len(FOLDS)  # clips carry their official fold, 0..4

    def __init__(self, data_home: str | Path, index_path: str | Path | None = None,
                 download: bool = False, allow_missing: bool = False) -> None:
        self.data_home = Path(data_home).expanduser().absolute()
        self.index_path = None if index_path is None else Path(index_path).expanduser().absolute()
        self.download = flag(download, "dataset.source.download")
        self.allow_missing = flag(allow_missing, "dataset.source.allow_missing")
        self._clips: list[Clip] | None = None
        self._identity: dict[str, Any] | None = None
        self._track_ids: list[str] = []
        self.n_missing = 0
        self.missing_classes: dict[str, Path] = {}  # class -> folder, when none of its files exist
        self._told: set[str] = set()  # what `_tell` has logged

    def _tell(self, level: int, message: str, *args: Any) -> None:
        """Log what `prepare()` found (files missing, an unofficial index or metadata, the clips
        used) the first time this source finds it: a run prepares its source in `prepare_data`
        and again in `setup` (and again for each later fit), which found the same. Changed
        findings (another number of files missing, say) are logged again."""
        text = message % args
        if text not in self._told:
            self._told.add(text)
            log.log(level, text)

    def __repr__(self) -> str:
        return (f"TinySOL(data_home={str(self.data_home)!r}, index_path="
                f"{None if self.index_path is None else str(self.index_path)!r}, "
                f"download={self.download}, allow_missing={self.allow_missing})")

    # ------------------------------------------------------------------ prepare

    def prepare(self) -> None:
        """Find the index, optionally download, and check which audio files exist.

        Here only existence is checked; each file's md5 from the index is checked when its
        features are computed (`fewzero.data.features.compute_features`).

        Raises:
            FileNotFoundError: the index, the metadata or (some of) the audio files are missing;
                the message says where they must go and where to get them.
            TinySOLDownloadError: ``download=True`` and the download failed.
            ValueError: the index or the metadata is unreadable or inconsistent.
        """
        self._clips, self._identity, self._track_ids = None, None, []
        self.missing_classes = {}
        mirdata, core, download_utils, mirdata_tinysol = _import_mirdata()
        ds = mirdata.initialize("tinysol", data_home=str(self.data_home))
        index_file = self._resolve_index(ds, core, mirdata_tinysol, download_utils)
        ds.index_path = str(index_file)  # read lazily by mirdata, so set before any access

        index_bytes = index_file.read_bytes()
        try:
            index = json.loads(index_bytes)
            index_version = str(index.get("version", ds.version))
            track_ids = list(ds.track_ids)
            tracks = {tid: ds.track(tid) for tid in track_ids}
            pathless = [tid for tid, track in tracks.items() if not track.audio_path]
            if pathless:
                raise ValueError(f"{len(pathless)} of its tracks (e.g. {pathless[0]}) list no "
                                 "audio path")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index_file} is not a valid mirdata TinySOL index: {exc}. "
                             + self._index_advice(mirdata_tinysol.INDEXES[ds.version])) from exc
        if not track_ids:
            raise ValueError(f"The TinySOL index {index_file} lists no tracks. "
                             + self._index_advice(mirdata_tinysol.INDEXES[ds.version]))
        example = tracks[track_ids[0]].audio_path
        metadata_file = self.data_home / METADATA_RELPATH
        if self.download and (mismatch := self._metadata_mismatch(metadata_file, index)):
            # e.g. a partial download: set it aside, fetch it again
            kept = metadata_file.with_name(f"{metadata_file.name}.{file_md5(metadata_file)}")
            log.warning("%s: moving it to %s and downloading the official one.", mismatch, kept)
            metadata_file.replace(kept)

        present = self._present(tracks)
        if self.download and (len(present) < len(tracks) or not metadata_file.is_file()):
            needed = []
            if len(present) < len(tracks):
                needed.append("audio")
            if not metadata_file.is_file():
                needed.append("annotations")
            remotes = {key: mirdata_tinysol.REMOTES[key] for key in needed}
            # An Index without url: only these remotes are fetched, the index is already here.
            self._run_download(download_utils, remotes, core.Index(filename=index_file.name),
                               cleanup=True)
            present = self._present(tracks)

        n_total = len(tracks)
        self.n_missing = n_total - len(present)
        if not present:
            raise FileNotFoundError(
                f"No TinySOL audio file found under {self.data_home} (0 of {n_total} tracks "
                f"of the index {index_file.name}).\n" + self._advice(example)
            )
        if self.n_missing and not self.allow_missing:
            raise FileNotFoundError(
                f"{self.n_missing} of {n_total} TinySOL audio files are missing under "
                f"{self.data_home} ({len(present)} present).\n" + self._advice(example)
                + "\nOr set dataset.source.allow_missing=true to use only the files present."
            )
        if not metadata_file.is_file():
            raise FileNotFoundError(
                f"TinySOL metadata not found: expected {metadata_file}.\n" + self._advice(example)
            )
        mismatch = self._metadata_mismatch(metadata_file, index)
        if mismatch:
            self._tell(logging.WARNING, "%s; using it anyway. To use the official one, delete "
                       "it and re-run with dataset.source.download=true.", mismatch)
        _check_metadata_rows(metadata_file)

        try:
            clips = [self._clip(tid, tracks[tid], _listed_md5(index, tid)) for tid in sorted(present)]
        except (IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"Cannot read the TinySOL metadata {metadata_file}: {exc}. "
                             + _metadata_fix(metadata_file)) from exc
        try:
            check_instruments(sorted({c.instrument for c in clips}), TINYSOL_INSTRUMENTS,
                              what="TinySOL instrument",
                              hint=f"Use the official TinySOL_metadata.csv ({ZENODO_URL}).")
        except ValueError as exc:
            raise ValueError(f"Unexpected instrument names in {metadata_file}: {exc}") from exc

        if self.n_missing:
            self._tell(logging.WARNING, "TinySOL: %d of %d audio files missing under %s; using "
                       "the %d present (allow_missing=true).", self.n_missing, n_total,
                       self.data_home, len(clips))
        self._tell(logging.INFO, "TinySOL: %d clips from %s", len(clips), self.data_home)
        self._identity = {
            "index_md5": hashlib.md5(index_bytes).hexdigest(),
            "index_version": index_version,
            "metadata_md5": file_md5(metadata_file),
        }
        self._track_ids = sorted(present)
        self._clips = clips
        # Classes whose files are all missing (allow_missing), for `check_split` to name.
        kept, absent = {clip.instrument for clip in clips}, set(tracks) - set(present)
        self.missing_classes = {str(tracks[tid].instrument_full): Path(tracks[tid].audio_path).parent
                                for tid in sorted(absent)
                                if tracks[tid].instrument_full not in kept | {None}}

    def _resolve_index(self, ds: Any, core: ModuleType, mirdata_tinysol: ModuleType,
                       download_utils: ModuleType) -> Path:
        """The index file to use: `index_path`, else the official index in data_home or mirdata's
        own copy; downloads it into data_home only when allowed."""
        official = mirdata_tinysol.INDEXES[ds.version]
        if self.index_path is not None:
            if self.index_path.is_dir():
                raise IsADirectoryError(
                    f"TinySOL index path {self.index_path} (dataset.source.index_path) is a "
                    f"directory: give the index file itself, e.g. "
                    f"{self.index_path / official.filename}."
                )
            if not self.index_path.is_file():
                raise FileNotFoundError(
                    f"TinySOL index file not found: {self.index_path} "
                    "(dataset.source.index_path). The official mirdata index "
                    f"{official.filename} (md5 {official.remote.checksum}) is at "
                    f"{official.remote.url}"
                )
            checksum = file_md5(self.index_path)
            if checksum != official.remote.checksum:
                self._tell(logging.WARNING, "TinySOL index %s has md5 %s, not that of mirdata's "
                           "official index %s (%s); using it anyway.", self.index_path, checksum,
                           official.filename, official.remote.checksum)
            return self.index_path

        downloaded = self.data_home / official.filename
        for default in (downloaded, Path(ds.index_path)):
            if default.is_file() and self._is_whole(default, official):
                return default
        if not self.download:
            raise FileNotFoundError(
                f"The TinySOL index {official.filename} is not available locally (expected at "
                f"{downloaded}, or mirdata's copy at {ds.index_path}) and downloading is "
                f"disabled.\nPass dataset.source.index_path=/path/to/{official.filename} (the "
                f"official index, md5 {official.remote.checksum}, from {official.remote.url}), "
                "or set dataset.source.download=true where there is network access."
            )
        # Into data_home (destination_dir None), not mirdata's package folder, as a plain remote
        # (mirdata's key "index" would log its package folder); the Index without url only names it.
        remote = download_utils.RemoteFileMetadata(filename=official.filename,
                                                   url=official.remote.url,
                                                   checksum=official.remote.checksum)
        self._run_download(download_utils, {"tinysol_index": remote},
                           core.Index(filename=official.filename), cleanup=False)
        if not downloaded.is_file():
            raise TinySOLDownloadError(f"mirdata did not produce the TinySOL index at {downloaded}.")
        return downloaded

    def _is_whole(self, index_file: Path, official: Any) -> bool:
        """Whether a downloaded copy of the official index has its md5 (when mirdata lists one).
        One that has not (an interrupted download) is deleted with download=true, to be fetched
        again, else named in a ValueError."""
        checksum = file_md5(index_file)
        if official.remote is None or checksum == official.remote.checksum:
            return True
        problem = (f"The TinySOL index {index_file} has md5 {checksum}, not that of the official "
                   f"{official.filename} ({official.remote.checksum}): an interrupted download?")
        if not self.download:
            raise ValueError(f"{problem} Delete it and re-run with dataset.source.download=true, or "
                             f"pass dataset.source.index_path=/path/to/{official.filename}.")
        log.warning("%s Deleting it and downloading it again.", problem)
        index_file.unlink()
        return False

    def _index_advice(self, official: Any) -> str:
        """How to get a good index, for errors about an unreadable one."""
        return (f"Use the official mirdata index {official.filename} (md5 {official.remote.checksum}, "
                f"from {official.remote.url}): pass it as dataset.source.index_path, or set "
                "dataset.source.index_path=null and dataset.source.download=true to let mirdata fetch "
                "it where there is network access.")

    def _run_download(self, download_utils: ModuleType, remotes: dict[str, Any], index: Any,
                      cleanup: bool) -> None:
        """Call mirdata's downloader, turning network and archive errors into one clear error.

        A download that fails, or is interrupted, leaves no partial file behind: mirdata would keep
        it and refuse it on every retry.
        """
        what = " and ".join(remote.filename for remote in remotes.values())
        log.info("TinySOL: downloading %s into %s", what, self.data_home)
        try:
            with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT):
                download_utils.downloader(str(self.data_home), remotes=remotes, index=index,
                                          cleanup=cleanup)
        except BaseException as exc:
            self._remove_partial_downloads(remotes)
            if not isinstance(exc, OSError | EOFError | tarfile.TarError | zipfile.BadZipFile):
                raise
            raise TinySOLDownloadError(
                f"Downloading TinySOL ({what}) through mirdata failed: "
                f"{type(exc).__name__}: {exc}\n"
                "Re-run to try again (what was partly downloaded has been removed) once the network "
                "allows, or fetch the files by hand: TinySOL.tar.gz and "
                f"TinySOL_metadata.csv from zenodo record {ZENODO_RECORD} ({ZENODO_URL}), "
                "the index from "
                "https://zenodo.org/records/13993273 (pass it as dataset.source.index_path), "
                "then run with dataset.source.download=false.\n" + self._layout()
            ) from exc

    def _remove_partial_downloads(self, remotes: dict[str, Any]) -> None:
        """Delete each file of `remotes` that a failed download left unfinished (md5 not the
        remote's)."""
        for remote in remotes.values():
            path = self.data_home / (remote.destination_dir or "") / remote.filename
            if path.is_file() and file_md5(path) != remote.checksum:
                log.warning("TinySOL: removing the partly downloaded %s", path)
                path.unlink()

    @staticmethod
    def _present(tracks: dict[str, Any]) -> list[str]:
        """Ids of the tracks whose audio file exists."""
        return [tid for tid, track in tracks.items() if os.path.isfile(track.audio_path)]

    def _layout(self) -> str:
        """The expected on-disk layout, for error messages."""
        return (
            "Expected layout (mirdata):\n"
            f"  {self.data_home}/audio/<Family>/<Instrument folder>/ordinario/<file>.wav\n"
            f"  {self.data_home / METADATA_RELPATH}"
        )

    def _advice(self, example: str) -> str:
        """Where the files must go and where to get them."""
        return (
            f"{self._layout()}\n"
            f"  e.g. {example}\n"
            f"Get TinySOL.tar.gz and TinySOL_metadata.csv from zenodo record {ZENODO_RECORD} "
            f"({ZENODO_URL}); extract TinySOL.tar.gz into {self.data_home}/audio/ (it holds the "
            f"<Family>/ folders) and put TinySOL_metadata.csv in {self.data_home}/annotation/.\n"
            "Or set dataset.source.download=true to let mirdata download them where the network "
            "allows."
        )

    @staticmethod
    def _metadata_mismatch(metadata_file: Path, index: dict[str, Any]) -> str:
        """What is wrong when the metadata csv is not the one the index lists, else "" (also
        when the file or the index's md5 is missing)."""
        entry = (index.get("metadata") or {}).get("TinySOL_metadata")
        if metadata_file.is_file() and entry and len(entry) > 1 and entry[1]:
            checksum = file_md5(metadata_file)
            if checksum != entry[1]:
                return f"TinySOL metadata {metadata_file} has md5 {checksum}, the index expects {entry[1]}"
        return ""

    @staticmethod
    def _clip(track_id: str, track: Any, md5: str = "") -> Clip:
        """One mirdata track as a Clip (`md5`: its audio file's checksum in the index)."""
        instrument = track.instrument_full
        if instrument is None:
            raise ValueError(f"TinySOL track {track_id} has no row in the metadata csv (index and "
                             "metadata do not match)")
        return Clip(path=Path(track.audio_path), instrument=str(instrument),
                    fold=int(track.split), pitch=int(track.pitch_id),
                    dynamics=str(track.dynamics or ""), md5=md5)

    # ------------------------------------------------------------------ ClipSource

    def clips(self) -> list[Clip]:
        """The present tracks as clips, sorted by track id.

        Raises:
            RuntimeError: `prepare()` was not called.
        """
        if self._clips is None:
            raise RuntimeError("TinySOL.clips() called before prepare().")
        return list(self._clips)

    def fingerprint(self) -> str:
        """Hash of the index and metadata contents and the track ids used (not of data_home).

        Raises:
            RuntimeError: `prepare()` was not called.
        """
        if self._clips is None or self._identity is None:
            raise RuntimeError("TinySOL.fingerprint() called before prepare().")
        return config_hash({"source": self.name, **self._identity, "tracks": self._track_ids})
