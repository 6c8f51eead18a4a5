"""The one interface every audio source implements: a list of labelled clips on disk."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# TinySOL's 14 instrument names ("Instrument (in full)"), the class names of every source.
TINYSOL_INSTRUMENTS: tuple[str, ...] = (
    "Accordion",
    "Alto Saxophone",
    "Bass Tuba",
    "Bassoon",
    "Cello",
    "Clarinet in Bb",
    "Contrabass",
    "Flute",
    "French Horn",
    "Oboe",
    "Trombone",
    "Trumpet in C",
    "Viola",
    "Violin",
)


@dataclass(frozen=True)
class Clip:
    """One labelled recording of a single note.

    Attributes:
        path: absolute path of the audio file.
        instrument: class name (TinySOL spelling, e.g. "Clarinet in Bb").
        fold: cross-validation fold, 0-4 (TinySOL's official folds, or ours for rendered SOL).
        pitch: MIDI note number, or -1 when unknown.
        dynamics: "pp", "p", "mf", "ff", ... or "" when unknown.
        md5: the file's md5 as its source lists it (checked before its features are computed),
            or "" when the source lists none.
    """

    path: Path
    instrument: str
    fold: int
    pitch: int = -1
    dynamics: str = ""
    md5: str = ""


class ClipSource(Protocol):
    """An audio source: knows its clips and a fingerprint that changes whenever they change."""

    name: str

    def prepare(self) -> None:
        """Make the clips available on disk (render, download or check), with progress shown."""

    def clips(self) -> list[Clip]:
        """All clips of the source, in a stable order. Call after `prepare()`."""

    def fingerprint(self) -> str:
        """A short hash of everything that determines the clips (config and file list)."""


def file_md5(path: str | Path) -> str:
    """md5 hex digest of a file, read in chunks (audio files of a few hundred kB, SoundFonts of
    a few hundred MB)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


@functools.lru_cache(maxsize=256)
def _content_md5(path: str, size: int, mtime_ns: int) -> str:
    return file_md5(path)  # size and mtime_ns only key the cache


def file_digest(path: str | Path) -> str:
    """md5 hex digest of a file's contents, for cache keys that must change when a file is
    edited in place (a SoundFont, a vectors file, an image): computed once per process for each
    (path, size, modification time), so a large file is read once."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _content_md5(str(resolved), stat.st_size, stat.st_mtime_ns)


def replace_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """Write `path` through `write(tmp)` on a temporary file beside it, then move that file onto
    `path` in one step (`os.replace`): a killed run never leaves a half-written file, and readers
    see the old file or the new one. The temporary name holds the process id, so processes that
    write the same file at once do not write into each other's; it is removed if `write` fails."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_error(directory: str | Path) -> OSError | None:
    """The error that keeps this process from writing files in `directory`, which it creates if
    needed (a lab's shared data folder made read-only, another user's folder), or None when it
    can: to refuse work whose result could not be saved before doing it, not after."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        return err
    return None


def config_hash(obj: object, length: int = 12) -> str:
    """Stable short hash of a JSON-serialisable object (dict keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:length]


def check_instruments(requested: list[str] | tuple[str, ...], available: list[str] | tuple[str, ...],
                      what: str = "instrument", *, hint: str) -> None:
    """Raise a ValueError naming every unknown class, the valid names and `hint` (the fix)."""
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise ValueError(
            f"Unknown {what} name(s) {unknown}. Valid names are: {sorted(available)}. {hint}"
        )


def check_covered(class_names: Sequence[str], entries: Sequence[str], what: str, *, hint: str) -> None:
    """Raise a ValueError naming every class (of the split) that the config table `what` has no
    entry for, the classes it covers and `hint` (the fix). The class name is valid; the table
    lacks it."""
    missing = [name for name in class_names if name not in entries]
    if missing:
        raise ValueError(f"{what} has no entry for the class(es) {missing} of the split; it has "
                         f"entries for {sorted(entries)}. {hint}")


# (required, optional) keys of dataset.split, and the shipped splits, by kind of dataset
SPLIT_KEYS = {"few-shot": (("train", "val", "test"), ()),
              "zero-shot": (("seen", "unseen"), ("pseudo_unseen", "pseudo_unseen_folds"))}
SHIPPED_SPLITS = {"few-shot": ("fsl_tutorial", "fsl_cv1", "fsl_cv2"),
                  "zero-shot": ("word_audio", "image_audio")}


# dataset.source settings that only say where the files are or how to read them: any other change
# (seed, n_folds, fold_by, ...) may deal the same recordings to other folds
SOURCE_LOCATION_KEYS = {"root", "num_workers", "data_home", "index_path", "download", "allow_missing"}


def refolding_keys(source: Mapping[str, Any], new_source: Mapping[str, Any]) -> list[str]:
    """The `dataset.source` keys under which `new_source` may deal the clips of `source`'s classes
    to other folds (or render them otherwise), sorted; [] when it deals them alike. Only another
    source of the same kind (`_target_`) refolds, and only by a setting beyond where its files
    are. Instruments appended to the end of the `instruments` table (a new class to test) change
    nothing of the others: rendered SOL seeds each note by its place in the table and deals each
    class's notes to folds by the class's name, as the synthetic tones do by place."""
    if source.get("_target_") != new_source.get("_target_"):
        return []
    old, new = source.get("instruments"), new_source.get("instruments")
    appended = (old is not None and new is not None and len(new) >= len(old)
                and list(new)[:len(old)] == list(old))
    return sorted(key for key in set(source) | set(new_source)
                  if key not in SOURCE_LOCATION_KEYS and not (key == "instruments" and appended)
                  and source.get(key) != new_source.get(key))


def refolds(source: Mapping[str, Any], new_source: Mapping[str, Any]) -> bool:
    """Whether `new_source` may deal the clips of `source`'s classes to other folds
    (`refolding_keys`)."""
    return bool(refolding_keys(source, new_source))


def key_problems(keys: Sequence[str], required: Sequence[str], optional: Sequence[str] = ()) -> list[str]:
    """What is wrong with a config mapping's `keys` against those it must have (`required`) and
    may have (`optional`), for a message: ["lacks [...]", "has [...], which nothing reads
    (misspelt?)"], or [] when nothing is."""
    missing = [k for k in required if k not in keys]
    unknown = [k for k in keys if k not in (*required, *optional)]
    return ([f"lacks {missing}"] if missing else []) + (
        [f"has {unknown}, which nothing reads (misspelt?)"] if unknown else [])


def check_split_shape(split: Mapping[str, Any], kind: str) -> None:
    """Raise a ValueError when `split` (the config's dataset.split) lacks a key the `kind` of
    dataset ("few-shot" or "zero-shot", `SPLIT_KEYS`) needs or has one it does not read: a split
    of the other kind (`dataset/split=fsl_tutorial` in a zero-shot run), or a misspelt key
    (`pseudo_unseen_fold`), which would otherwise be ignored; or when a key does not hold a list
    of class names (`pseudo_unseen_folds`: a list of such lists), as `dataset.split.unseen=Bassoon`
    does, whose letters would be read as classes; or, zero-shot, when seen or unseen is empty."""
    if not isinstance(split, Mapping):
        raise ValueError(f"dataset.split must be a mapping of class lists (as in "
                         f"configs/dataset/split/{SHIPPED_SPLITS[kind][0]}.yaml); got {split!r}.")
    required, optional = SPLIT_KEYS[kind]
    keys = list(split)
    problems = key_problems(keys, required, optional)
    other = next(o for o in SPLIT_KEYS if o != kind)
    wanted = f"a {kind} dataset reads {list(required)}" + (f" (and optionally {list(optional)})"
                                                             if optional else "")
    if problems and set(SPLIT_KEYS[other][0]) <= set(keys):
        raise ValueError(f"dataset.split has the keys {keys}, a {other} split, but {wanted}. Choose "
                         f"a {kind} split: dataset/split={' or '.join(SHIPPED_SPLITS[kind])} "
                         "(configs/dataset/split), or one of your own with those keys.")
    if problems:
        raise ValueError(f"dataset.split {' and '.join(problems)}: {wanted}. Fix its keys (as in "
                         f"configs/dataset/split/{SHIPPED_SPLITS[kind][0]}.yaml).")

    def is_list(value: Any) -> bool:
        return isinstance(value, Sequence) and not isinstance(value, str)

    def names(value: Any) -> bool:
        return is_list(value) and all(isinstance(name, str) for name in value)

    for key, value in split.items():
        if key == "pseudo_unseen_folds":
            if value is not None and not (is_list(value) and all(names(fold) for fold in value)):
                raise ValueError(f"dataset.split.pseudo_unseen_folds must be a list of folds, each a "
                                 f"list of class names, e.g. [[Cello,Flute],[Accordion]]; got {value!r}.")
        elif not (names(value) or (value is None and key == "pseudo_unseen")):
            raise ValueError(f"dataset.split.{key} must be a list of class names, e.g. "
                             f"'dataset.split.{key}=[Violin,\"Clarinet in Bb\"]'; got {value!r}.")
        elif kind == "zero-shot" and key in required and not value:
            raise ValueError(f"dataset.split.{key} is empty: a zero-shot split needs at least one "
                             f"{key} class{' to train on' if key == 'seen' else ' to test'}.")


def check_fold(source: ClipSource, key: str, fold: Any) -> int:
    """Return the fold number `fold` that the config key `key` names, raising a ValueError naming
    the key and the source's folds when it is not one of them (no integer, negative, or past the
    source's `n_folds` where the source has one): such a fold holds no clip, so the role it
    gives (a test or validation fold, a fold read) would be silently empty."""
    n_folds = getattr(source, "n_folds", None)
    valid = (f"one of its folds 0..{n_folds - 1}" + (
        " (TinySOL's official folds)" if source.name == "tinysol"
        else f", or more folds with dataset.source.n_folds (now {n_folds})")
             if n_folds is not None else "a fold number (0, 1, ...)")
    if isinstance(fold, bool) or not isinstance(fold, int) or fold < 0 or (
            n_folds is not None and fold >= n_folds):
        shown = "null" if fold is None else repr(fold)
        raise ValueError(f"{key}: {shown} is no fold of {source.name}; give {valid}.")
    return fold


def check_listed_once(names: Sequence[Any], key: str, what: str = "class") -> None:
    """Raise a ValueError naming every `what` (a class, by default) that the config list `key`
    repeats (a repeat would give the class two ids, or two places in an episode)."""
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(f"{key} lists {repeated} more than once: list each {what} once.")


def check_split(names: list[str] | tuple[str, ...], available: list[str] | tuple[str, ...],
                source: ClipSource, key: str = "dataset.split") -> None:
    """Raise a ValueError naming every class of the config list `key` (e.g.
    "dataset.split.val") listed twice or without clips in `available`.

    A class the source knows but found no audio file of (its `missing_classes`, {class: folder
    of its files}, e.g. TinySOL with allow_missing=true) is named as such, and so is one whose
    every note rendered silent (its `silent_classes`, rendered SOL); others are unknown, and
    their error ends with the source's `unknown_class_hint` where it has one (how rendered SOL
    renders a new instrument).
    """
    check_listed_once(names, key)
    silent = [name for name in names
              if name not in available and name in getattr(source, "silent_classes", ())]
    if silent:
        raise ValueError(
            f"{source.name} instrument(s) {silent} of {key} have no clips: they rendered no "
            f"audible note (every note was silent and dropped). Fix their program, low and high "
            f"in dataset.source.instruments (a GM program and a pitch range the SoundFonts play), "
            f"or remove them from {key}."
        )
    missing = getattr(source, "missing_classes", {})
    empty = [name for name in names if name not in available and name in missing]
    if empty:
        places = ", ".join(f"{missing[name]} ({name})" for name in empty)
        raise ValueError(
            f"{source.name} instrument(s) {empty} of {key} have no clips: their audio "
            f"files are missing (dataset.source.allow_missing=true skipped them). Place them "
            f"under {places}, or remove them from {key}."
        )
    check_instruments(names, available, what=f"{source.name} instrument",
                      hint=f"Check the spelling in {key} (names are case-sensitive, e.g. "
                           "'Clarinet in Bb', 'Trumpet in C')."
                           + (f" {source.unknown_class_hint}"
                              if getattr(source, "unknown_class_hint", "") else ""))
