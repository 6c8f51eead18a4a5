"""A generated mini-TinySOL: a mirdata index, the metadata csv and short synthetic recordings.

It has the shape of the real TinySOL (zenodo record 3685367) as mirdata 1.0 reads it, so the
TinySOL clip source's checks, messages, fingerprint and download flow can be tested offline
without ``../shared``:

- ``tinysol_index_mini.json``: mirdata's tinysol index format (``version``, ``tracks.<id>.audio
  = [audio/<Family>/<Instrument folder>/ordinario/<id>.wav, md5]``, ``metadata``). It is not the
  official index (its md5 differs), which `fewzero.data.tinysol.TinySOL` accepts with a warning.
- ``TinySOL_metadata.csv``: the official columns, one row per track.
- ``samples/<id>.wav``: 44.1 kHz 16-bit mono sine tones at each track's pitch, for the tracks
  marked present; the index lists the others (and their md5) but they have no file, as when
  only part of TinySOL is on disk.

Like the official index, the first track (a Bass Tuba note) is one without a file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

METADATA_COLUMNS = ("Path", "Fold", "Family", "Instrument (abbr.)", "Instrument (in full)",
                    "Technique (abbr.)", "Technique (in full)", "Pitch", "Pitch ID", "Dynamics",
                    "Dynamics ID", "Instance ID", "String ID (if applicable)",
                    "Needed digital retuning")
# "Instrument (in full)" -> (Family, folder, abbreviation), as in the official metadata.
INSTRUMENTS = {
    "Bass Tuba": ("Brass", "Bass_Tuba", "BTb"),
    "Accordion": ("Keyboards", "Accordion", "Acc"),
    "Cello": ("Strings", "Violoncello", "Vc"),
    "Violin": ("Strings", "Violin", "Vn"),
    "Bassoon": ("Winds", "Bassoon", "Bn"),
    "Flute": ("Winds", "Flute", "Fl"),
}
DYNAMICS_ID = {"pp": 0, "p": 1, "mf": 2, "f": 3, "ff": 4}
# (instrument, pitch name, MIDI pitch, dynamics, string id or 0, fold, file present)
TRACKS = (
    ("Bass Tuba", "F#1", 30, "pp", 0, 2, False),
    ("Bass Tuba", "A#1", 34, "ff", 0, 0, True),
    ("Accordion", "C2", 36, "mf", 0, 1, True),
    ("Accordion", "C8", 108, "pp", 0, 3, True),
    ("Bassoon", "C2", 36, "mf", 0, 4, True),
    ("Bassoon", "C5", 72, "pp", 0, 0, True),
    ("Cello", "C2", 36, "pp", 4, 3, False),
    ("Cello", "A3", 57, "ff", 1, 1, False),
    ("Flute", "C4", 60, "mf", 0, 2, True),
    ("Violin", "A#3", 58, "ff", 4, 1, True),
    ("Violin", "C5", 72, "ff", 3, 4, True),
    ("Violin", "G3", 55, "pp", 4, 2, False),
)
SAMPLE_RATE = 44100
SECONDS = 0.25
# The instruments of the tracks with a file, with their counts.
PRESENT_INSTRUMENTS = Counter(name for name, *_, present in TRACKS if present)


def track_id(abbr: str, pitch: str, dynamics: str, string: int) -> str:
    """A TinySOL-like file stem, e.g. ``Vn-ord-A#3-ff-4c-N``."""
    return f"{abbr}-ord-{pitch}-{dynamics}-{f'{string}c' if string else 'N'}-N"


def tone(midi: int, seconds: float = SECONDS, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A faded sine at `midi`'s frequency as 16-bit mono WAV bytes (deterministic)."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    audio = 0.5 * np.sin(2 * np.pi * 440.0 * 2 ** ((midi - 69) / 12) * t)
    audio *= np.minimum(1.0, np.minimum(t, seconds - t) / 0.01)  # 10 ms fades
    buffer = io.BytesIO()
    sf.write(buffer, audio, sample_rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def link(src: Path, dst: Path) -> None:
    """Symlink src to dst (copy where symlinks are not allowed)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.symlink_to(src)
    except OSError:
        shutil.copyfile(src, dst)


@dataclass(frozen=True)
class MiniTinySOL:
    """The generated files (see the module docstring) under `root`."""

    root: Path

    @property
    def index(self) -> Path:
        return self.root / "tinysol_index_mini.json"

    @property
    def metadata(self) -> Path:
        return self.root / "TinySOL_metadata.csv"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def tracks(self) -> dict[str, dict]:
        """The index's ``tracks``: id -> {"audio": [relative path, md5]}."""
        return json.loads(self.index.read_text(encoding="utf-8"))["tracks"]

    def sample_files(self) -> list[Path]:
        """The present tracks' wavs, sorted."""
        return sorted(self.samples.glob("*.wav"))

    def build_home(self, home: Path, samples: list[Path] | None = None,
                   metadata: bool = True) -> Path:
        """A mirdata layout in `home` with `samples` (all present ones by default) at the
        index's paths and, unless `metadata` is False, the metadata csv."""
        tracks = self.tracks()
        for wav in self.sample_files() if samples is None else samples:
            link(wav, home / tracks[wav.stem]["audio"][0])
        if metadata:
            link(self.metadata, home / "annotation" / "TinySOL_metadata.csv")
        home.mkdir(parents=True, exist_ok=True)
        return home

    def subset_index(self, path: Path, samples: list[Path]) -> Path:
        """A copy of the index that lists only the tracks of `samples`, written to `path`."""
        subset = json.loads(self.index.read_text(encoding="utf-8"))
        subset["tracks"] = {s.stem: subset["tracks"][s.stem] for s in samples}
        path.write_text(json.dumps(subset), encoding="utf-8")
        return path


def make_mini_tinysol(root: Path) -> MiniTinySOL:
    """Write the mini-TinySOL into `root` (created) and return it."""
    mini = MiniTinySOL(root)
    mini.samples.mkdir(parents=True, exist_ok=True)
    rows, tracks = [], {}
    for name, pitch, midi, dynamics, string, fold, present in TRACKS:
        family, folder, abbr = INSTRUMENTS[name]
        stem = track_id(abbr, pitch, dynamics, string)
        relpath = f"{family}/{folder}/ordinario/{stem}.wav"
        wav = tone(midi)
        if present:
            (mini.samples / f"{stem}.wav").write_bytes(wav)
        tracks[stem] = {"audio": [f"audio/{relpath}", hashlib.md5(wav).hexdigest()]}
        rows.append([relpath, fold, family, abbr, name, "ord", "ordinario", pitch, midi, dynamics,
                     DYNAMICS_ID[dynamics], max(0, string - 1), f"{string}.0" if string else "",
                     "FALSE"])
    with open(mini.metadata, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(METADATA_COLUMNS)
        writer.writerows(rows)
    mini.index.write_text(json.dumps({
        "version": "mini",
        "tracks": tracks,
        "metadata": {"TinySOL_metadata": ["annotation/TinySOL_metadata.csv",
                                          hashlib.md5(mini.metadata.read_bytes()).hexdigest()]},
    }, indent=1), encoding="utf-8")
    return mini
