"""Rendered SOL: a TinySOL-shaped dataset of single instrument notes rendered with FluidSynth.

Every (instrument, pitch, dynamic, instance) of a table of General-MIDI programs is played once
through FluidSynth (PyPI ``pyfluidsynth``, imported lazily) from one of several SoundFonts, with
seeded per-note variation (SoundFont, velocity, detune, onset, gain, background noise), so that
no two rows hold the same waveform. The result is cached on disk under its config hash::

    <root>/<fingerprint>/audio/<Instrument_name>/<Abbrev>-<pitch>-<dynamic>-<instance>.wav
    <root>/<fingerprint>/metadata.csv
    <root>/<fingerprint>/manifest.json   (written last: its presence marks a complete render)
"""

from __future__ import annotations

import csv
import ctypes
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import re
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import soundfile as sf

from fewzero.data.clips import (
    TINYSOL_INSTRUMENTS,
    Clip,
    check_listed_once,
    config_hash,
    file_digest,
    replace_atomically,
    write_error,
)
from fewzero.progress import progress_bar

log = logging.getLogger(__name__)

# Bump whenever the rendering code changes what is written: it is part of the fingerprint.
FORMAT_VERSION = 1
DEFAULT_DYNAMICS: dict[str, list[int]] = {"pp": [20, 45], "mf": [60, 85], "ff": [100, 127]}
DEFAULT_VARIATION: dict[str, Any] = {
    "detune_cents": 15.0, "max_onset_ms": 40.0, "gain_db": 4.0, "noise_snr_db": [35.0, 55.0],
}
METADATA_COLUMNS = ("path", "instrument", "pitch", "dynamics", "fold", "soundfont", "velocity",
                    "detune_cents", "md5")
# TinySOL's file-name abbreviations, in the order of TINYSOL_INSTRUMENTS.
TINYSOL_ABBREVIATIONS: dict[str, str] = dict(zip(
    TINYSOL_INSTRUMENTS,
    ("Acc", "ASax", "BTb", "Bn", "Vc", "ClBb", "Cb", "Fl", "Hn", "Ob", "Tbn", "TpC", "Va", "Vn"),
    strict=True,
))
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")

# FluidSynth output gain: the loudest notes of the GM SoundFonts peak near 0 dBFS, the softest
# (velocity 20) stay 6 dB or more above the -60 dBFS silence threshold.
_SYNTH_GAIN = 2.0
_PEAK_LIMIT = 0.98  # clips are scaled down to this peak when louder, so they never clip
_BLOCK = 64  # FluidSynth renders (and applies MIDI events) in blocks of 64 frames
_MAX_CHANNELS = 256  # FluidSynth's maximum number of MIDI channels
_BEND_PER_CENT = 8192 / 200  # default pitch-bend range is +-2 semitones over +-8192
_FOLD_STREAM = 1  # extra seed word that separates fold shuffles from per-note streams
_CHUNK_NOTES = 32  # notes per task sent to a worker process
_INSTRUMENT_KEYS = {"name", "program", "low", "high", "instances"}
_SETUP_ADVICE = ("install it with `bash scripts/setup.sh` (Debian/Ubuntu: apt-get install "
                 "musescore-general-soundfont fluid-soundfont-gm) or set "
                 "dataset.source.soundfonts=[/path/to/your.sf2]")
_LIBRARY_ADVICE = ("install it with `bash scripts/setup.sh` (Debian/Ubuntu: apt-get install "
                   "fluidsynth libfluidsynth3; macOS: brew install fluid-synth) and the binding "
                   "with `pip install pyfluidsynth`")


@dataclass(frozen=True)
class Instrument:
    """One row of the instrument table: a GM program played over a pitch range."""

    name: str
    program: int
    low: int
    high: int
    instances: int = 1


@dataclass(frozen=True)
class Note:
    """One note to render; `index` seeds its variation."""

    index: int
    instrument: str
    program: int
    pitch: int
    dynamics: str
    instance: int
    relpath: str


@dataclass(frozen=True)
class _RenderSpec:
    """Everything a worker needs to render notes (plain data, picklable for "spawn")."""

    dataset_dir: str
    soundfonts: tuple[str, ...]
    programs: tuple[int, ...]
    sample_rate: int
    clip_seconds: float
    note_seconds: float
    dynamics: dict[str, list[int]]
    variation: dict[str, Any]
    seed: int
    silence_threshold_db: float


@dataclass(frozen=True)
class _Variation:
    """The seeded random choices of one note."""

    soundfont: int
    velocity: int
    bend: int
    onset: int
    gain_db: float
    snr_db: float


@dataclass(frozen=True)
class _Result:
    """What rendering one note produced; `md5` is "" when the note was silent and dropped."""

    index: int
    soundfont: str
    velocity: int
    detune_cents: float
    md5: str


def _plain(obj: Any) -> Any:
    """Convert (possibly OmegaConf) mappings and sequences into plain dicts and lists."""
    if isinstance(obj, Mapping):
        return {str(key): _plain(value) for key, value in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, str | bytes):
        return [_plain(value) for value in obj]
    return obj


def safe_name(name: str) -> str:
    """File-system-safe form of a class name: runs of other characters become "_"."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def pitch_name(pitch: int) -> str:
    """Scientific pitch name with sharps, as in TinySOL file names (60 -> "C4")."""
    return f"{PITCH_CLASSES[pitch % 12]}{pitch // 12 - 1}"


def _parse_instrument(position: int, entry: Any) -> Instrument:
    """Validate one table entry, raising a ValueError that names the entry and the fix."""
    where = f"dataset.source.instruments[{position}] ({entry!r})"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a mapping like "
                         "{name: 'Bass Tuba', program: 58, low: 30, high: 65, instances: 1}.")
    entry = dict(entry)
    missing = sorted({"name", "program", "low", "high"} - entry.keys())
    unknown = sorted(entry.keys() - _INSTRUMENT_KEYS)
    if missing or unknown:
        raise ValueError(f"{where}: missing keys {missing}, unknown keys {unknown}. Each entry "
                         f"needs name, program, low, high and optionally instances (default 1).")
    try:
        instrument = Instrument(str(entry["name"]), int(entry["program"]), int(entry["low"]),
                                int(entry["high"]), int(entry.get("instances", 1)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: program, low, high and instances must be integers.") from exc
    if not safe_name(instrument.name):
        raise ValueError(f"{where}: the name needs at least one letter or digit.")
    if not 0 <= instrument.program <= 127:
        raise ValueError(f"{where}: program must be a 0-based GM program number in 0..127.")
    if not 0 <= instrument.low <= instrument.high <= 127:
        raise ValueError(f"{where}: need 0 <= low <= high <= 127 (MIDI pitches, inclusive); "
                         f"swap or fix low={instrument.low}, high={instrument.high}.")
    if instrument.instances < 1:
        raise ValueError(f"{where}: instances must be at least 1.")
    return instrument


def parse_instruments(entries: Iterable[Any]) -> list[Instrument]:
    """Validate the instrument table (dicts or OmegaConf DictConfigs); names must be unique."""
    instruments = [_parse_instrument(i, entry) for i, entry in enumerate(entries)]
    if not instruments:
        raise ValueError("dataset.source.instruments is empty: list at least one instrument.")
    folders = Counter(safe_name(instrument.name) for instrument in instruments)
    clashes = sorted(i.name for i in instruments if folders[safe_name(i.name)] > 1)
    if clashes:
        raise ValueError(f"Instrument names must be unique (also after replacing spaces and "
                         f"punctuation by '_'); rename the duplicates {clashes}.")
    return instruments


def _parse_dynamics(dynamics: Mapping[str, Any] | None) -> dict[str, list[int]]:
    """Validate {name: [min_velocity, max_velocity]}."""
    parsed = _plain(DEFAULT_DYNAMICS if dynamics is None else dynamics)
    if not parsed:
        raise ValueError("dataset.source.dynamics is empty: give e.g. {pp: [20, 45]}.")
    for name, bounds in parsed.items():
        if (not re.fullmatch(r"[A-Za-z0-9]+", name) or len(bounds) != 2
                or not 1 <= bounds[0] <= bounds[1] <= 127):
            raise ValueError(f"dataset.source.dynamics.{name}={bounds}: need an alphanumeric "
                             "name and [min_velocity, max_velocity] with 1 <= min <= max <= 127.")
    return {name: [int(bounds[0]), int(bounds[1])] for name, bounds in parsed.items()}


def _parse_variation(variation: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge user variation settings into the defaults and validate them."""
    given = _plain(variation or {})
    unknown = sorted(given.keys() - DEFAULT_VARIATION.keys())
    if unknown:
        raise ValueError(f"Unknown dataset.source.variation key(s) {unknown}; valid keys are "
                         f"{sorted(DEFAULT_VARIATION)}.")
    merged = {**DEFAULT_VARIATION, **given}
    snr = [float(value) for value in merged["noise_snr_db"]]
    scalars = {key: float(merged[key]) for key in ("detune_cents", "max_onset_ms", "gain_db")}
    if len(snr) != 2 or snr[0] > snr[1] or min(scalars.values()) < 0:
        raise ValueError(f"dataset.source.variation={merged}: need non-negative detune_cents, "
                         "max_onset_ms and gain_db, and noise_snr_db=[low_db, high_db].")
    return {**scalars, "noise_snr_db": snr}


def _check_soundfonts(soundfonts: Sequence[str | Path]) -> list[Path]:
    """Return the SoundFont paths, raising FileNotFoundError with install advice if missing, and
    a ValueError for one path given without brackets (its characters would be read as paths) or
    a SoundFont listed twice (drawn twice as often, a render unlike the one with it once)."""
    if isinstance(soundfonts, str | Path):
        raise ValueError(f"dataset.source.soundfonts={str(soundfonts)!r} must be a list of paths: "
                         f"dataset.source.soundfonts=[{soundfonts}].")
    paths = [Path(path).expanduser() for path in soundfonts]
    if not paths:
        raise ValueError(f"dataset.source.soundfonts is empty: {_SETUP_ADVICE}.")
    check_listed_once([str(path.resolve()) for path in paths], "dataset.source.soundfonts",
                      "SoundFont")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"SoundFont not found: {path}; {_SETUP_ADVICE}.")
    return paths


def _import_fluidsynth() -> ModuleType:
    """Import pyfluidsynth, turning a missing libfluidsynth into an ImportError with advice."""
    try:
        import fluidsynth
    except (ImportError, OSError) as exc:
        raise ImportError(f"Cannot load FluidSynth ({exc}), which renders the SOL dataset: "
                          f"{_LIBRARY_ADVICE}.") from exc
    return fluidsynth


def fluidsynth_version(provenance: Mapping[str, Any] | None) -> str:
    """The libfluidsynth version that `RenderedSOL.provenance()` (metrics.json's `data`) names;
    "unknown" where the render's manifest was gone."""
    return ((provenance or {}).get("fluidsynth") or {}).get("libfluidsynth", "unknown")


def installed_fluidsynth_version() -> str | None:
    """The libfluidsynth this machine would render with, or None where it cannot be loaded
    (a render copied from another host is still usable without it)."""
    try:
        return _fluidsynth_versions(_import_fluidsynth())["libfluidsynth"]
    except ImportError:
        return None


def _fluidsynth_versions(fluidsynth: ModuleType) -> dict[str, str]:
    """Versions of libfluidsynth and of the pyfluidsynth binding."""
    major, minor, micro = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    fluidsynth.fluid_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(micro))
    return {"libfluidsynth": f"{major.value}.{minor.value}.{micro.value}",
            "pyfluidsynth": importlib.metadata.version("pyfluidsynth")}


def _is_silent(audio: np.ndarray, threshold_db: float) -> bool:
    """Whether the peak of `audio` (float, full scale 1.0) lies below `threshold_db` dBFS."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    return peak <= 10.0 ** (threshold_db / 20.0)


def _blocks(frames: int) -> int:
    """`frames` rounded up to whole FluidSynth blocks."""
    return -(-frames // _BLOCK) * _BLOCK


class _Synth:
    """One FluidSynth instance with every SoundFont loaded, rendering one dry note at a time.

    Each (SoundFont, program) pair keeps its own MIDI channel, so with dynamic sample loading
    every preset is loaded once. Around each note all sounds are stopped, controllers and pitch
    bend reset and the stopped voices flushed, so nothing of a note leaks into the next.
    """

    def __init__(self, spec: _RenderSpec) -> None:
        fluidsynth = _import_fluidsynth()
        pairs = [(s, p) for s in range(len(spec.soundfonts)) for p in spec.programs]
        n_channels = min(_MAX_CHANNELS, -(-len(pairs) // 16) * 16)
        self._synth = fluidsynth.Synth(
            gain=_SYNTH_GAIN, samplerate=float(spec.sample_rate), channels=n_channels,
            **{"synth.reverb.active": 0, "synth.chorus.active": 0,
               "synth.dynamic-sample-loading": 1})
        rate = self._synth.get_setting("synth.sample-rate")
        if rate != spec.sample_rate:
            raise ValueError(f"FluidSynth refused sample_rate={spec.sample_rate} (it runs at "
                             f"{rate}); use a rate in 8000..96000 Hz.")
        self._write_float = fluidsynth.cfunc(
            "fluid_synth_write_float", ctypes.c_int, ("synth", ctypes.c_void_p, 1),
            ("len", ctypes.c_int, 1), ("lout", ctypes.c_void_p, 1), ("loff", ctypes.c_int, 1),
            ("lincr", ctypes.c_int, 1), ("rout", ctypes.c_void_p, 1), ("roff", ctypes.c_int, 1),
            ("rincr", ctypes.c_int, 1))
        self._sfids = [self._load(path) for path in spec.soundfonts]
        self._channel_of = {pair: i % n_channels for i, pair in enumerate(pairs)}
        self._selected: dict[int, tuple[int, int] | None] = {}

    def _load(self, path: str) -> int:
        """Load one SoundFont, returning its FluidSynth id."""
        sfid = self._synth.sfload(path)
        if sfid < 0:
            raise RuntimeError(f"FluidSynth could not load the SoundFont {path}: is it a valid "
                               f".sf2/.sf3 file? Replace it or {_SETUP_ADVICE}.")
        return sfid

    def _channel(self, soundfont: int, program: int) -> int | None:
        """The channel playing (soundfont, program), or None if the SoundFont lacks it."""
        channel = self._channel_of[(soundfont, program)]
        if self._selected.get(channel, ()) != (soundfont, program):
            ok = self._synth.program_select(channel, self._sfids[soundfont], 0, program) == 0
            self._selected[channel] = (soundfont, program) if ok else None
        return channel if self._selected[channel] else None

    def _render(self, frames: int) -> np.ndarray:
        """Render `frames` (a multiple of the block size) stereo frames, averaged to mono."""
        left = np.empty(frames, dtype=np.float32)
        right = np.empty(frames, dtype=np.float32)
        self._write_float(self._synth.synth, frames, left.ctypes.data, 0, 1,
                          right.ctypes.data, 0, 1)
        left += right
        left *= np.float32(0.5)
        return left

    def _start(self, channel: int, pitch: int, velocity: int, bend: int) -> None:
        """Reset the channel's controllers, set the pitch bend and press the key."""
        self._synth.cc(channel, 121, 0)  # reset all controllers
        self._synth.pitch_bend(channel, bend)
        self._synth.noteon(channel, pitch, velocity)

    def _stop(self, channel: int) -> None:
        """Silence the channel at once and render one block, which frees its voices."""
        self._synth.all_sounds_off(channel)
        self._synth.pitch_bend(channel, 0)
        self._render(_BLOCK)

    def play(self, soundfont: int, program: int, pitch: int, velocity: int, bend: int,
             on_frames: int, total_frames: int) -> np.ndarray:
        """Hold one note for `on_frames`, release it and render until `total_frames`.

        Returns the mono float signal, at least `total_frames` long (whole blocks); all zeros
        when the SoundFont has no such program.
        """
        channel = self._channel(soundfont, program)
        if channel is None:
            return np.zeros(_blocks(total_frames), dtype=np.float32)
        # FluidSynth ramps each voice's output gain during its first block from the value its
        # previous note left: a one-block pre-roll of the same note makes that ramp identical
        # whatever was played before (and on a fresh synth), so renders are reproducible.
        self._start(channel, pitch, velocity, bend)
        self._render(_BLOCK)
        self._stop(channel)
        self._start(channel, pitch, velocity, bend)
        held = self._render(_blocks(on_frames))
        self._synth.noteoff(channel, pitch)
        tail = self._render(_blocks(max(total_frames - held.size, 0)))
        self._stop(channel)
        return np.concatenate([held, tail])

    def close(self) -> None:
        """Free the FluidSynth instance."""
        self._synth.delete()


def _draw_variation(rng: np.random.Generator, note: Note, spec: _RenderSpec) -> _Variation:
    """Draw a note's SoundFont, velocity, detune, onset, gain and SNR (in this fixed order)."""
    low, high = spec.dynamics[note.dynamics]
    var = spec.variation
    soundfont = int(rng.integers(len(spec.soundfonts)))
    velocity = int(rng.integers(low, high + 1))
    cents = rng.uniform(-var["detune_cents"], var["detune_cents"])
    bend = int(np.clip(round(cents * _BEND_PER_CENT), -8192, 8191))
    onset = int(rng.integers(round(var["max_onset_ms"] * spec.sample_rate / 1000) + 1))
    gain_db = float(rng.uniform(-var["gain_db"], var["gain_db"]))
    snr_db = float(rng.uniform(*var["noise_snr_db"]))
    return _Variation(soundfont, velocity, bend, onset, gain_db, snr_db)


def _finish(raw: np.ndarray, var: _Variation, clip_frames: int,
            rng: np.random.Generator) -> np.ndarray:
    """Delay, scale, add noise at the drawn SNR and peak-limit a rendered note to one clip."""
    note = raw[:clip_frames - var.onset] * np.float32(10.0 ** (var.gain_db / 20.0))
    rms = float(np.sqrt(np.mean(np.square(note, dtype=np.float64))))
    audio = np.zeros(clip_frames, dtype=np.float32)
    audio[var.onset:var.onset + note.size] = note
    # White noise, uniform in [-sqrt(3), sqrt(3)] (unit variance; 5x faster than Gaussian).
    noise = rng.random(clip_frames, dtype=np.float32) - np.float32(0.5)
    audio += noise * np.float32(math.sqrt(12.0) * rms * 10.0 ** (-var.snr_db / 20.0))
    peak = float(np.max(np.abs(audio)))
    return audio * np.float32(_PEAK_LIMIT / peak) if peak > _PEAK_LIMIT else audio


def _wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """Encode a float signal in [-1, 1] as a 16-bit PCM mono WAV file."""
    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)
    buffer = io.BytesIO()
    sf.write(buffer, pcm, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _render_note(synth: _Synth, note: Note, spec: _RenderSpec) -> _Result:
    """Render, vary and write one note; silent notes are not written (md5 "")."""
    rng = np.random.default_rng([spec.seed, note.index])
    var = _draw_variation(rng, note, spec)
    clip_frames = round(spec.clip_seconds * spec.sample_rate)
    raw = synth.play(var.soundfont, note.program, note.pitch, var.velocity, var.bend,
                     round(spec.note_seconds * spec.sample_rate), clip_frames)
    md5 = ""
    if not _is_silent(raw[:clip_frames - var.onset], spec.silence_threshold_db):
        data = _wav_bytes(_finish(raw, var, clip_frames, rng), spec.sample_rate)
        path = Path(spec.dataset_dir) / note.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        md5 = hashlib.md5(data).hexdigest()
    return _Result(note.index, Path(spec.soundfonts[var.soundfont]).name, var.velocity,
                   round(var.bend / _BEND_PER_CENT, 2), md5)


# Per-process synth of a worker, created once by `_init_worker`.
_WORKER: tuple[_Synth, _RenderSpec] | None = None


def _init_worker(spec: _RenderSpec) -> None:
    """Worker-process initializer: load the SoundFonts once."""
    global _WORKER
    _WORKER = (_Synth(spec), spec)


def _render_chunk(notes: list[Note]) -> list[_Result]:
    """Render a chunk of notes in a worker process."""
    assert _WORKER is not None, "_init_worker did not run"
    synth, spec = _WORKER
    return [_render_note(synth, note, spec) for note in notes]


def assign_folds(instruments: Sequence[str], n_folds: int, seed: int,
                 groups: Sequence[Any] | None = None) -> list[int]:
    """Folds for rows labelled `instruments`: per class, shuffle with `seed`, deal round-robin.

    Every class gets (as nearly as possible) the same number of rows in each fold. With
    `groups` (one label per row, e.g. its pitch), a class's groups are shuffled and dealt
    instead, every row of a group into its group's fold: the same number of groups per fold.
    """
    folds = [0] * len(instruments)
    rows_of: dict[str, dict[Any, list[int]]] = {}
    for row, name in enumerate(instruments):
        group = groups[row] if groups is not None else row
        rows_of.setdefault(name, {}).setdefault(group, []).append(row)
    for name, by_group in rows_of.items():
        stream = [seed, _FOLD_STREAM, zlib.crc32(name.encode())]
        members = list(by_group.values())
        order = np.random.default_rng(stream).permutation(len(members))
        for position, k in enumerate(order):
            for row in members[k]:
                folds[row] = position % n_folds
    return folds


class RenderedSOL:
    """TinySOL-shaped single notes rendered with FluidSynth from General-MIDI SoundFonts.

    Implements the `ClipSource` protocol. The default table (14 TinySOL instruments, about 2900
    notes, like TinySOL's 2913) and SoundFonts are in `configs/dataset/source/sol.yaml`; each
    entry reads `{name: Bass Tuba, program: 58, low: 30, high: 65, instances: 1}`.

    Args:
        root: folder holding one sub-folder per rendered config (named by its fingerprint).
        instruments: table entries {name, program (0-based GM), low, high (MIDI, inclusive),
            instances (renders per pitch and dynamic, default 1)}; names must be unique.
        soundfonts: .sf2/.sf3 files; each note uses one of them, drawn uniformly.
        sample_rate: output (and FluidSynth) sample rate in Hz, 8000..96000.
        clip_seconds: length of every clip.
        note_seconds: time from onset to note-off; the release sounds until the clip ends.
        dynamics: name -> [min_velocity, max_velocity]; one note per dynamic and pitch.
        n_folds: number of cross-validation folds, balanced per class.
        fold_by: "note" (each rendered note dealt to a fold on its own, as TinySOL's official
            folds are: a class's folds share pitches, so its held-out folds hold other
            renderings of notes its training folds play) or "pitch" (every rendering of an
            instrument's pitch in one fold: held-out folds hold pitches training never heard).
        seed: seeds every per-note choice and the fold shuffles.
        variation: detune_cents (+-, by pitch bend), max_onset_ms (leading silence), gain_db
            (+-), noise_snr_db ([low, high] SNR of white noise against the note's RMS).
        silence_threshold_db: notes whose rendered peak stays below this (dBFS) are dropped.
        num_workers: rendering processes (<= 1 renders in this process). Workers are started
            with "spawn", so a script that calls `prepare()` needs the usual
            ``if __name__ == "__main__":`` guard.
    """

    name = "sol"
    # appended to the error for a class of the split that the table lacks (`check_split`): it may
    # be misspelt, or an instrument not rendered yet
    unknown_class_hint = ("To render another instrument, add an entry {name, program (0-based GM), "
                          "low, high} after the others in dataset.source.instruments (README, "
                          "\"Adding an instrument\").")

    def __init__(self, root: str | Path, instruments: list[dict], soundfonts: list[str],
                 sample_rate: int = 16000, clip_seconds: float = 2.0, note_seconds: float = 1.5,
                 dynamics: dict[str, list[int]] | None = None, n_folds: int = 5, seed: int = 0,
                 variation: dict | None = None, silence_threshold_db: float = -60.0,
                 num_workers: int = 2, fold_by: str = "note") -> None:
        self.root = Path(root).expanduser()
        self.instruments = parse_instruments(_plain(instruments))
        self.soundfonts = _check_soundfonts(_plain(soundfonts))
        self.sample_rate = int(sample_rate)
        self.clip_seconds = float(clip_seconds)
        self.note_seconds = float(note_seconds)
        self.dynamics = _parse_dynamics(dynamics)
        if isinstance(n_folds, bool) or not float(n_folds).is_integer() or n_folds < 1:
            raise ValueError(f"dataset.source.n_folds={n_folds!r}: the clips are dealt to a whole "
                             "number of folds, at least one (default 5).")  # 2.5 was read as 2
        self.n_folds = int(n_folds)
        if fold_by not in ("note", "pitch"):
            raise ValueError(f"dataset.source.fold_by={fold_by!r}: use note (each rendered note "
                             "on its own, as TinySOL) or pitch (all renderings of a pitch in one fold).")
        self.fold_by = fold_by
        self.seed = int(seed)
        self.variation = _parse_variation(variation)
        self.silence_threshold_db = float(silence_threshold_db)
        self.num_workers = int(num_workers)
        if not 8000 <= self.sample_rate <= 96000:
            raise ValueError(f"sample_rate={self.sample_rate}: FluidSynth renders at "
                             "8000..96000 Hz; pick a rate in that range (dataset.features.sample_rate, "
                             "which rendered SOL follows).")
        if not 0 < self.note_seconds <= self.clip_seconds:
            raise ValueError(f"Need 0 < dataset.source.note_seconds ({self.note_seconds}) <= "
                             f"dataset.source.clip_seconds ({self.clip_seconds}): the note is "
                             "released inside its clip; lower note_seconds with clip_seconds.")
        if self.variation["max_onset_ms"] / 1000 >= self.clip_seconds:
            raise ValueError(f"dataset.source.variation.max_onset_ms="
                             f"{self.variation['max_onset_ms']} must be shorter than "
                             f"dataset.source.clip_seconds={self.clip_seconds}.")
        self.silent_classes: list[str] = []  # classes of the table without an audible note
        self._origin_told = False  # prepare() runs per stage: say once where the audio is from

    def __repr__(self) -> str:
        return (f"RenderedSOL(root={str(self.root)!r}, {len(self.instruments)} instruments, "
                f"{len(self.notes())} notes, fingerprint={self.fingerprint()})")

    def config(self) -> dict[str, Any]:
        """The full render config: everything that determines the clips (not root/workers)."""
        return {
            "format": FORMAT_VERSION,
            "instruments": [asdict(instrument) for instrument in self.instruments],
            "soundfonts": [{"name": path.name, "size": path.stat().st_size, "md5": file_digest(path)}
                           for path in self.soundfonts],
            "sample_rate": self.sample_rate,
            "clip_seconds": self.clip_seconds,
            "note_seconds": self.note_seconds,
            "dynamics": self.dynamics,
            "variation": self.variation,
            "n_folds": self.n_folds,
            "fold_by": self.fold_by,
            "seed": self.seed,
            "silence_threshold_db": self.silence_threshold_db,
        }

    def fingerprint(self) -> str:
        """Hash of `config()`: a changed config renders into a new folder."""
        return config_hash(self.config())

    @property
    def dataset_dir(self) -> Path:
        """The folder of this config's render."""
        return self.root / self.fingerprint()

    def provenance(self) -> dict[str, Any]:
        """Which render a run's audio came from: its folder, fingerprint and the FluidSynth that
        rendered it (from manifest.json; None where the render is gone). FluidSynth versions
        render different audio from one config (2.2.5 and 2.3.x do), so runs on two hosts can
        differ by their data alone; a run's metrics.json records this to tell them apart."""
        manifest = self.dataset_dir / "manifest.json"
        rendered_with = (json.loads(manifest.read_text()).get("fluidsynth")
                         if manifest.is_file() else None)
        return {"dir": str(self.dataset_dir), "fingerprint": self.fingerprint(),
                "fluidsynth": rendered_with}

    def notes(self) -> list[Note]:
        """Every (instrument, pitch, dynamic, instance) in table order."""
        notes: list[Note] = []
        for instrument in self.instruments:
            folder = safe_name(instrument.name)
            stem = TINYSOL_ABBREVIATIONS.get(instrument.name, folder)
            for pitch in range(instrument.low, instrument.high + 1):
                for dynamic in self.dynamics:
                    for instance in range(1, instrument.instances + 1):
                        relpath = (f"audio/{folder}/{stem}-{pitch_name(pitch)}-{dynamic}-"
                                   f"{instance}.wav")
                        notes.append(Note(len(notes), instrument.name, instrument.program,
                                           pitch, dynamic, instance, relpath))
        return notes

    def _rows(self) -> list[dict[str, str]] | None:
        """metadata.csv rows of a complete render (manifest and every file present), else None."""
        directory = self.dataset_dir
        if not ((directory / "manifest.json").is_file()
                and (directory / "metadata.csv").is_file()):
            return None
        with open(directory / "metadata.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        return rows if all((directory / row["path"]).is_file() for row in rows) else None

    def prepare(self) -> None:
        """Render the dataset unless a complete render of this config already exists; note the
        table's classes whose notes were all silent (dropped) in `silent_classes`."""
        rows = self._rows()
        if rows is not None and not self._origin_told:
            rendered_with = fluidsynth_version(self.provenance())
            log.info("Reusing rendered SOL at %s (rendered with FluidSynth %s)", self.dataset_dir,
                     rendered_with)
            installed = installed_fluidsynth_version()
            if installed is not None and rendered_with not in ("unknown", installed):
                log.warning(
                    "Rendered SOL at %s was made by FluidSynth %s, but FluidSynth %s is "
                    "installed. Versions can render different audio from one config (2.2.5 and "
                    "2.3.x do), so this run's data are that render, not what a render here would "
                    "give. To render with FluidSynth %s, move that folder aside or set "
                    "dataset.source.root=<another folder>.",
                    self.dataset_dir, rendered_with, installed, installed)
        elif rows is None:
            self._render()  # says so
            rows = self._rows() or []
        self._origin_told = True
        kept = {row["instrument"] for row in rows}
        self.silent_classes = [i.name for i in self.instruments if i.name not in kept]

    def clips(self) -> list[Clip]:
        """All rendered clips in table order, with absolute paths. Call after `prepare()`."""
        rows = self._rows()
        if rows is None:
            raise RuntimeError(f"Rendered SOL is missing or incomplete at {self.dataset_dir}: "
                               "call prepare() first to render it.")
        return [Clip(path=(self.dataset_dir / row["path"]).resolve(),
                     instrument=row["instrument"], fold=int(row["fold"]),
                     pitch=int(row["pitch"]), dynamics=row["dynamics"], md5=row["md5"])
                for row in rows]

    def _spec(self) -> _RenderSpec:
        """The picklable render settings sent to workers."""
        return _RenderSpec(
            dataset_dir=str(self.dataset_dir), soundfonts=tuple(map(str, self.soundfonts)),
            programs=tuple(sorted({i.program for i in self.instruments})),
            sample_rate=self.sample_rate, clip_seconds=self.clip_seconds,
            note_seconds=self.note_seconds, dynamics=self.dynamics, variation=self.variation,
            seed=self.seed, silence_threshold_db=self.silence_threshold_db)

    def _render(self) -> None:
        """Render every note, then write metadata.csv and (last, atomically) manifest.json."""
        directory = self.dataset_dir
        unwritable = write_error(directory)
        if unwritable is not None:  # say so before rendering, not from a worker's first note
            raise RuntimeError(
                f"Rendered SOL of this dataset.source config is not at {directory}, and this "
                f"process cannot write there ({unwritable.strerror or unwritable}): a shared data "
                "folder made read-only? Render it into a folder of your own with "
                "dataset.source.root=<folder you can write>, or ask the folder's owner to run "
                "this config once.")
        fluidsynth = _import_fluidsynth()
        start = time.perf_counter()
        shutil.rmtree(directory / "audio", ignore_errors=True)
        notes = self.notes()
        results = _render_all(notes, self._spec(), self.num_workers)
        kept = [(note, result) for note, result in zip(notes, results, strict=True) if result.md5]
        pitches = [note.pitch for note, _ in kept] if self.fold_by == "pitch" else None
        folds = assign_folds([note.instrument for note, _ in kept], self.n_folds, self.seed, pitches)
        metadata = _metadata_csv(kept, folds)
        replace_atomically(directory / "metadata.csv", lambda tmp: tmp.write_text(metadata))
        dropped = Counter(note.instrument for note, result in zip(notes, results, strict=True)
                          if not result.md5)
        counts = Counter(note.instrument for note, _ in kept)
        self._log_dropped(dropped, counts)
        seconds = time.perf_counter() - start
        manifest = {
            "fingerprint": self.fingerprint(), "config": self.config(),
            "soundfont_paths": [str(path) for path in self.soundfonts],
            "counts": {i.name: counts[i.name] for i in self.instruments},
            "dropped": {i.name: dropped[i.name] for i in self.instruments if dropped[i.name]},
            "n_clips": len(kept), "n_dropped": sum(dropped.values()),
            "fluidsynth": _fluidsynth_versions(fluidsynth), "seconds": round(seconds, 2),
        }
        text = json.dumps(manifest, indent=2) + "\n"
        replace_atomically(directory / "manifest.json", lambda tmp: tmp.write_text(text))
        log.info("Rendered %d SOL clips in %.1f s into %s", len(kept), seconds, directory)

    def _log_dropped(self, dropped: Counter[str], counts: Counter[str]) -> None:
        """One log line for the silent notes that were dropped (a warning if a class is empty)."""
        if not dropped:
            return
        per_class = ", ".join(f"{i.name}: {dropped[i.name]}" for i in self.instruments
                              if dropped[i.name])
        empty = [i.name for i in self.instruments if not counts[i.name]]
        level = logging.WARNING if empty else logging.INFO
        log.log(level, "dropped %d silent notes (%s)%s", sum(dropped.values()), per_class,
                f"; no clips left for {empty}: check their program and pitch range"
                if empty else "")


def _render_all(notes: list[Note], spec: _RenderSpec, num_workers: int) -> list[_Result]:
    """Render `notes` (in-process or in worker processes) with a progress bar; results in order."""
    results: list[_Result] = []
    with progress_bar() as progress:
        task = progress.add_task("Rendering SOL notes", total=len(notes))
        if num_workers <= 1:
            synth = _Synth(spec)
            try:
                for note in notes:
                    results.append(_render_note(synth, note, spec))
                    progress.advance(task)
            finally:
                synth.close()
        else:
            # Load every SoundFont here first (cheap: samples load on demand), so that a bad one
            # raises its own error rather than a worker's BrokenProcessPool.
            _Synth(spec).close()
            size = max(1, min(_CHUNK_NOTES, math.ceil(len(notes) / (4 * num_workers))))
            chunks = [notes[i:i + size] for i in range(0, len(notes), size)]
            with ProcessPoolExecutor(max_workers=min(num_workers, len(chunks)),
                                     mp_context=get_context("spawn"), initializer=_init_worker,
                                     initargs=(spec,)) as pool:
                for future in as_completed([pool.submit(_render_chunk, c) for c in chunks]):
                    results.extend(future.result())
                    progress.advance(task, len(future.result()))
    return sorted(results, key=lambda result: result.index)


def _metadata_csv(kept: list[tuple[Note, _Result]], folds: list[int]) -> str:
    """The text of metadata.csv for the kept notes."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(METADATA_COLUMNS)
    for (note, result), fold in zip(kept, folds, strict=True):
        writer.writerow([note.relpath, note.instrument, note.pitch, note.dynamics, fold,
                         result.soundfont, result.velocity, result.detune_cents, result.md5])
    return buffer.getvalue()
