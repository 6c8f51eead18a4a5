"""Synthetic harmonic tones: a tiny, instant clip source for tests and install checks.

Each class gets its own harmonic amplitude profile (a crude "timbre"); clips vary in pitch,
loudness and noise, so few-shot episodes on them are learnable but not trivial.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from fewzero.data.clips import Clip, config_hash
from fewzero.data.features import midi_to_hz

LOWEST_PITCH, N_PITCHES = 45, 30  # clips' MIDI pitches: 45 (A2, 110 Hz) to 74 (D5, 587 Hz)


def harmonic_tone(f0: float, amplitudes: np.ndarray, rng: np.random.Generator, t: np.ndarray,
                  sample_rate: int) -> np.ndarray:
    """(samples,) sum of the harmonics k f0 (k = 1, 2, ...) below Nyquist, harmonic k with
    amplitude `amplitudes[k - 1]` and a phase drawn from `rng` (one per harmonic, in order), at
    the (samples,) times `t` in seconds.

    Harmonic k is the imaginary part of exp(i phase) z^k, z = exp(i 2 pi f0 t): one complex
    exponential per clip instead of a sine per harmonic (which made generating the tests' tones
    a large share of the test suite's time); the sum differs from the sines' by rounding only.
    """
    n_harmonics = sum(1 for k in range(len(amplitudes)) if f0 * (k + 1) < sample_rate / 2)
    phases = rng.uniform(0, 6.28, size=n_harmonics)
    if n_harmonics == 0:  # f0 at or above Nyquist: the empty sum
        return np.zeros(len(t))
    powers = np.empty((n_harmonics, len(t)), dtype=np.complex128)  # z^1 .. z^K
    powers[0] = np.exp(1j * (2 * np.pi * f0) * t)
    for k in range(1, n_harmonics):
        np.multiply(powers[k - 1], powers[0], out=powers[k])
    return ((amplitudes[:n_harmonics] * np.exp(1j * phases)) @ powers).imag


class SyntheticTones:
    """Writes `clips_per_class` WAV files per class name under `root/<fingerprint>/`."""

    name = "tones"

    def __init__(self, root: str | Path, instruments: list[str], clips_per_class: int = 20,
                 sample_rate: int = 16000, seconds: float = 1.5, n_folds: int = 5, seed: int = 0):
        self.root = Path(root).expanduser()
        self.instruments = list(instruments)
        self.clips_per_class, self.sample_rate, self.seconds = clips_per_class, sample_rate, seconds
        self.n_folds, self.seed = n_folds, seed
        highest = float(midi_to_hz(torch.tensor(LOWEST_PITCH + N_PITCHES - 1)))
        if sample_rate <= 2 * highest:
            raise ValueError(
                f"SyntheticTones: sample_rate={sample_rate} Hz cannot hold the tones' fundamentals "
                f"(up to {highest:.0f} Hz, MIDI {LOWEST_PITCH + N_PITCHES - 1}): their Nyquist "
                f"frequency must lie above it. Use a sample_rate above {2 * highest:.0f} Hz "
                "(the default is 16000).")

    def fingerprint(self) -> str:
        return config_hash({"instruments": self.instruments, "n": self.clips_per_class,
                            "sr": self.sample_rate, "s": self.seconds, "folds": self.n_folds,
                            "seed": self.seed})

    @property
    def folder(self) -> Path:
        return self.root / self.fingerprint()

    def _rows(self) -> list[tuple[str, int, int, Path]]:
        rows = []
        for c, name in enumerate(self.instruments):
            for i in range(self.clips_per_class):
                pitch = LOWEST_PITCH + (7 * i + 5 * c) % N_PITCHES
                path = self.folder / f"{c:02d}_{i:03d}.wav"
                rows.append((name, i % self.n_folds, pitch, path))
        return rows

    def prepare(self) -> None:
        done = self.folder / "done"
        if done.exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        t = np.arange(int(self.seconds * self.sample_rate)) / self.sample_rate
        rows = self._rows()
        for c, name in enumerate(self.instruments):
            profile = np.random.default_rng([self.seed, c]).uniform(0.05, 1.0, size=12)
            for row_name, _, pitch, path in rows:
                if row_name != name:
                    continue
                rng = np.random.default_rng([self.seed, c, pitch, zlib.crc32(path.name.encode())])
                f0 = float(midi_to_hz(torch.tensor(pitch)))
                tone = harmonic_tone(f0, profile, rng, t, self.sample_rate)
                envelope = np.minimum(1.0, t / 0.02) * np.exp(-t * rng.uniform(0.5, 2.0))
                audio = tone * envelope
                audio = 0.5 * audio / np.abs(audio).max() * rng.uniform(0.3, 1.0)
                audio += rng.normal(0, 0.003, size=audio.shape)
                sf.write(path, audio.astype(np.float32), self.sample_rate, subtype="PCM_16")
        done.write_text("ok")

    def clips(self) -> list[Clip]:
        if not (self.folder / "done").exists():
            raise RuntimeError("Call prepare() before clips().")
        return [Clip(path=path, instrument=name, fold=fold, pitch=pitch, dynamics="mf")
                for name, fold, pitch, path in self._rows()]
