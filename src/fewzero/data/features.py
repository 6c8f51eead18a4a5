"""Log-mel features computed once per (source, feature config), cached on disk, kept in memory.

Decoding and resampling happen here and nowhere else: episodes are later built by index
arithmetic on the cached tensor (see `fewzero.data.episodes`).
"""

from __future__ import annotations

import logging
import math
import numbers
import pickle
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio
from filelock import FileLock, Timeout

from fewzero.data.clips import Clip, ClipSource, config_hash, file_md5, replace_atomically, write_error
from fewzero.progress import progress_bar

log = logging.getLogger(__name__)

LOG_FLOOR = 1e-6  # added to mel power before the log: about -60 dB below a full-scale tone


def midi_to_hz(pitches: torch.Tensor) -> torch.Tensor:
    """MIDI note numbers -> fundamental frequency in Hz (A4 = 69 = 440 Hz), any shape."""
    return 440.0 * 2.0 ** ((pitches.double() - 69) / 12)


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)  # HTK


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@dataclass(frozen=True)
class MelFeatures:
    """Log-mel spectrogram settings; `clip_seconds` of every clip (from its start) are cached.

    The cache stores natural-log mel power, `log(mel + 1e-6)`; backbones that want linear power
    (the tutorial's) take `exp` of it.
    """

    sample_rate: int = 16000
    clip_seconds: float = 2.0
    n_fft: int = 1024
    hop_length: int = 256
    n_mels: int = 64
    f_min: float = 20.0
    f_max: float | None = None

    def __post_init__(self) -> None:
        """Refuse, before any audio is decoded, settings that make no spectrogram or one with
        mel bands that hold nothing (constant rows every backbone and prior would read). A whole
        number written as a float (hop_length=200.0) is taken as that int: torch's STFT and
        filterbank take ints only, and the cache key is the same as for 200."""
        for key in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            value = getattr(self, key)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                    or value != int(value) or value <= 0):
                raise ValueError(f"dataset.features.{key} must be a positive whole number; got {value!r}.")
            object.__setattr__(self, key, int(value))  # frozen: set once, here
        if self.hop_length > self.n_fft:
            raise ValueError(f"dataset.features.hop_length={self.hop_length} is longer than the FFT window "
                             f"(n_fft={self.n_fft}): the audio between windows would never be analysed. "
                             f"Set hop_length at most {self.n_fft} (a quarter of it is usual), or raise "
                             "n_fft.")
        if not self.clip_seconds > 0:
            raise ValueError(f"dataset.features.clip_seconds must be positive; got {self.clip_seconds!r}.")
        samples = int(round(self.clip_seconds * self.sample_rate))
        if samples <= self.n_fft // 2:  # the centred STFT pads n_fft // 2 by reflection
            raise ValueError(f"dataset.features.clip_seconds={self.clip_seconds} is {samples} samples at "
                             f"sample_rate={self.sample_rate}, too short for the FFT window (n_fft="
                             f"{self.n_fft}): a clip needs more than {self.n_fft // 2}. Set clip_seconds "
                             f"at least {(self.n_fft // 2 + 1) / self.sample_rate:.3g}, or lower n_fft.")
        nyquist = self.sample_rate / 2
        f_max = nyquist if self.f_max is None else self.f_max
        if f_max > nyquist:
            raise ValueError(f"dataset.features.f_max={self.f_max} is above the Nyquist frequency "
                             f"({nyquist:g} Hz) of sample_rate={self.sample_rate}: the bands above it "
                             f"would hold nothing. Set f_max at most {nyquist:g}, or null (Nyquist).")
        if not 0 <= self.f_min < f_max:
            raise ValueError(f"dataset.features.f_min={self.f_min} must be at least 0 and below f_max "
                             f"({f_max:g} Hz); the default is 20.0.")
        empty = self._empty_filters(self.n_fft, self.n_mels)
        if empty:
            fits = next((n for n in range(self.n_mels - 1, 0, -1)
                         if not self._empty_filters(self.n_fft, n)), None)
            n_fft = next((2 ** k for k in range(int(self.n_fft).bit_length(), 24)
                          if not self._empty_filters(2 ** k, self.n_mels)), None)
            fixes = ([f"lower dataset.features.n_mels ({fits} has no empty filter)"] if fits else []) + (
                [f"raise dataset.features.n_fft ({n_fft} has none)"] if n_fft else [])
            fixes = ", ".join(fixes) + (" or " if fixes else "") + "widen f_min..f_max"
            raise ValueError(f"{empty} of the n_mels={self.n_mels} mel filters between f_min={self.f_min:g} "
                             f"and {f_max:g} Hz are narrower than the FFT bins of n_fft={self.n_fft} "
                             f"({self.sample_rate / self.n_fft:g} Hz apart) and hold no bin: their bands "
                             f"would be constant. {fixes[0].upper()}{fixes[1:]}.")

    def _empty_filters(self, n_fft: int, n_mels: int) -> int:
        """How many of the mel filters for `n_fft` and `n_mels` (this object's other settings)
        cover no FFT bin: all zero in torchaudio's filterbank (whose warning about them the
        caller's message replaces)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            bank = torchaudio.functional.melscale_fbanks(
                n_fft // 2 + 1, self.f_min, self.f_max if self.f_max is not None else self.sample_rate / 2,
                n_mels, self.sample_rate)
        return int((bank.amax(dim=0) == 0).sum())

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    def start_frame(self, seconds: float) -> int:
        """Index of the frame nearest to `seconds` from the start of a clip."""
        return int(round(seconds * self.frames_per_second))

    def frames(self, seconds: float) -> int:
        """Number of STFT frames (centred) covering `seconds` of audio."""
        return int(round(seconds * self.sample_rate)) // self.hop_length + 1

    def mel_centres_hz(self) -> torch.Tensor:
        """(n_mels,) peak frequency of each mel filter (HTK scale, MelSpectrogram's default)."""
        f_max = self.f_max if self.f_max is not None else self.sample_rate / 2
        low, high = _hz_to_mel(torch.tensor([self.f_min, f_max], dtype=torch.float64))
        return _mel_to_hz(torch.linspace(float(low), float(high), self.n_mels + 2, dtype=torch.float64)[1:-1])

    def scale_frequency(self, log_mel: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
        """Log-mel of the same sounds with every frequency multiplied by `factor`: pitch and
        formants move together, as when audio is resampled (a smaller instrument for factor > 1,
        a larger one for factor < 1); the duration does not change. Bins whose source frequency
        lies outside the filterbank get the clip's minimum.

        Shapes: log_mel (n_clips, n_mels, frames); factor a number or (n_clips,), one per clip
        -> (n_clips, n_mels, frames).
        """
        factors = torch.as_tensor(factor, dtype=torch.float64).flatten().cpu()
        if bool((factors <= 0).any()):
            raise ValueError(f"Frequency scale factors must be positive; got {factor}.")
        if len(factors) not in (1, len(log_mel)):
            raise ValueError(f"Give one frequency scale factor, or one per clip ({len(log_mel)}); "
                             f"got {len(factors)}.")
        centres_hz = self.mel_centres_hz()
        centres_mel = _hz_to_mel(centres_hz)  # evenly spaced
        # fractional bin each output bin reads from: (n_factors, n_mels)
        source = ((_hz_to_mel(centres_hz[None, :] / factors[:, None]) - centres_mel[0])
                  / (centres_mel[1] - centres_mel[0]))
        inside = ((source > -1e-6) & (source < self.n_mels - 1 + 1e-6)).to(log_mel.device)
        source = source.clamp(0, self.n_mels - 1).to(log_mel.device)
        below = source.floor().long()
        above = (below + 1).clamp(max=self.n_mels - 1)
        weight = (source - below).to(log_mel)[:, :, None]
        clips = torch.arange(len(log_mel), device=log_mel.device)[:, None]  # pairs with (n, n_mels) bins
        n_bins = (len(log_mel), self.n_mels)
        scaled = (log_mel[clips, below.expand(n_bins)] * (1 - weight)
                  + log_mel[clips, above.expand(n_bins)] * weight)
        floor = log_mel.amin(dim=(1, 2), keepdim=True)
        return torch.where(inside[:, :, None], scaled, floor)

    def transform(self) -> torchaudio.transforms.MelSpectrogram:
        return torchaudio.transforms.MelSpectrogram(
            sample_rate=self.sample_rate,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            n_mels=self.n_mels,
            f_min=self.f_min,
            f_max=self.f_max,
            power=2.0,
        )


def feature_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """"key=after (before)" for each log-mel setting two feature configs differ on, but
    `clip_seconds` (how much of each clip is cached, not what an encoder hears): an encoder
    trained on `before` would read other spectrograms under `after`."""
    return [f"dataset.features.{key}={after.get(key)} (the checkpoint's run: {before.get(key)})"
            for key in sorted(set(before) | set(after))
            if key not in ("clip_seconds", "_target_") and before.get(key) != after.get(key)]


@dataclass
class FeatureTable:
    """All clips of a source as one in-memory tensor plus their labels.

    Attributes:
        features: (n_clips, n_mels, n_frames) float32 log-mel.
        instruments: class name of each clip, length n_clips.
        folds: (n_clips,) int64.
        pitches: (n_clips,) int64 MIDI pitch, -1 when unknown.
        paths: audio path of each clip (as given by the source).
        key: cache key (source fingerprint + feature config).
    """

    features: torch.Tensor
    instruments: list[str]
    folds: torch.Tensor
    pitches: torch.Tensor
    paths: list[str]
    key: str

    def __len__(self) -> int:
        return self.features.shape[0]


# How to fix a bad audio file, for the errors that name one.
_REPLACE_ADVICE = ("Replace it. Rendered SOL: delete it (or the folder's manifest.json) and the "
                   "folder is rendered again. TinySOL: delete it and re-run with "
                   "dataset.source.download=true to fetch TinySOL again (zenodo record 3685367), or "
                   "with dataset.source.allow_missing=true to do without it.")


def read_audio(path: Path, sample_rate: int) -> torch.Tensor:
    """Decode `path` to mono float32 at `sample_rate`. Returns (n_samples,).

    Raises a RuntimeError naming the file when it cannot be decoded, is empty or holds NaN or
    infinite samples.
    """
    try:
        audio, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise RuntimeError(
            f"Could not decode audio file {path}: {str(err).rstrip('.')}. The file is missing or "
            f"is not audio that soundfile can read. {_REPLACE_ADVICE}"
        ) from err
    if audio.shape[0] == 0:
        raise RuntimeError(f"Audio file {path} is empty (0 samples). {_REPLACE_ADVICE}")
    if not np.isfinite(audio).all():
        raise RuntimeError(f"Audio file {path} holds NaN or infinite samples, which would make "
                           f"every loss NaN. {_REPLACE_ADVICE}")
    mono = torch.from_numpy(np.ascontiguousarray(audio.mean(axis=1)))
    if file_rate != sample_rate:
        mono = torchaudio.functional.resample(mono, file_rate, sample_rate)
    return mono


def check_md5(clip: Clip) -> None:
    """Raise a RuntimeError naming the file when its md5 differs from the one its source lists
    (a truncated file decodes without error, as a shorter clip); no check without a listed md5."""
    if not clip.md5:
        return
    found = file_md5(clip.path)
    if found != clip.md5:
        raise RuntimeError(
            f"Audio file {clip.path} has md5 {found}, but its source lists {clip.md5}: the file is "
            f"truncated or changed. {_REPLACE_ADVICE}"
        )


def _first_ten(lines: list[str]) -> str:
    """`lines` as an indented list for a message, cut after ten ("... and n more")."""
    more = f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else ""
    return "\n  " + "\n  ".join(lines[:10]) + more


def _fit_length(audio: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Truncate or zero-pad (n,) audio to exactly n_samples."""
    if audio.shape[0] >= n_samples:
        return audio[:n_samples]
    return torch.nn.functional.pad(audio, (0, n_samples - audio.shape[0]))


def compute_features(clips: list[Clip], features: MelFeatures, batch_size: int = 64,
                     description: str = "Computing log-mel features") -> torch.Tensor:
    """Decode every clip once and return (n_clips, n_mels, n_frames) float32 log-mel.

    Every undecodable file is collected, then one error names them all; so are the clips whose
    features are not finite (they are never cached). Silent files (every sample 0) are kept,
    with one warning naming them.
    """
    n_samples = int(round(features.clip_seconds * features.sample_rate))
    mel = features.transform()
    out: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []
    failures: list[str] = []
    silent: list[str] = []
    short: list[float] = []  # seconds of each clip that ends more than a hop before clip_seconds
    with progress_bar() as progress:
        task = progress.add_task(description, total=len(clips))
        for clip in clips:
            try:
                check_md5(clip)
                audio = read_audio(clip.path, features.sample_rate)
                if not audio.any():
                    silent.append(str(clip.path))
                if audio.shape[0] < n_samples - features.hop_length:
                    short.append(audio.shape[0] / features.sample_rate)
                batch.append(_fit_length(audio, n_samples))
            except RuntimeError as err:
                failures.append(str(err))
                batch.append(torch.zeros(n_samples))
            if len(batch) == batch_size:
                out.append(torch.log(mel(torch.stack(batch)) + LOG_FLOOR))
                batch = []
            progress.advance(task)
        if batch:
            out.append(torch.log(mel(torch.stack(batch)) + LOG_FLOOR))
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(clips)} audio files failed to decode or to "
                           f"match their md5:{_first_ten(failures)}")
    if short:
        log.warning("%d of %d audio files are shorter than dataset.features.clip_seconds=%g (the "
                    "shortest %.2f s): their cached features end in silence (the log floor), which "
                    "excerpts reaching past their end read as if it were sound. Lower "
                    "dataset.features.clip_seconds to the clips' length, or for rendered SOL "
                    "raise dataset.source.clip_seconds to it.", len(short),
                    len(clips), features.clip_seconds, min(short))
    if silent:
        log.warning("%d of %d audio files are silent (every sample 0); their features are kept. "
                    "Replace those that should hold a note:%s", len(silent), len(clips),
                    _first_ten(silent))
    table = torch.cat(out) if out else torch.empty(0, features.n_mels, features.frames(
        features.clip_seconds))
    not_finite = [str(clip.path) for clip, finite
                  in zip(clips, table.flatten(1).isfinite().all(dim=1).tolist(), strict=True)
                  if not finite]
    if not_finite:
        raise RuntimeError(f"The log-mel features of {len(not_finite)} of {len(clips)} audio files "
                           "are NaN or infinite (samples far beyond full scale?), so nothing is "
                           f"cached:{_first_ten(not_finite)}\nFor each file: {_REPLACE_ADVICE}")
    return table


def ensure_cached(source: ClipSource, features: MelFeatures, cache_dir: str | Path,
                  unwritable: OSError | None = None, clips: list[Clip] | None = None
                  ) -> tuple[Path, str]:
    """Compute and write the source's features unless the cache already holds them.

    The cache key combines the source's fingerprint, what its clips list (class, fold, pitch,
    dynamics and the md5 their source gives) and the feature settings, so a changed dataset or
    feature config gets a new file; an unchanged one is never recomputed. The clip list counts
    because a fingerprint need not name the audio: rendered SOL's is its render config, which
    another FluidSynth renders into other files (other md5s) in another folder, with the cache
    folder shared.
    `unwritable`: the error that showed `cache_dir` cannot be written (`preparing`); features
    not cached there are then refused before any audio is decoded, not after. `clips`: the
    source's `clips()` where the caller has them already (listing rendered SOL's takes most of
    a second).

    Returns:
        (path of the cache file, cache key).
    """
    clips = source.clips() if clips is None else clips
    listed = [[clip.instrument, clip.fold, clip.pitch, clip.dynamics, clip.md5] for clip in clips]
    key = config_hash({"source": source.name, "fingerprint": source.fingerprint(),
                       "clips": listed, "features": asdict(features), "version": 1})
    path = Path(cache_dir) / f"{source.name}-{key}.pt"
    if path.exists():
        return path, key
    if not clips:
        raise RuntimeError(f"Source '{source.name}' has no clips: nothing to compute. Check the "
                           "dataset.source settings: its data folder, and the instruments or classes "
                           "it is given.")
    if unwritable is not None:
        raise RuntimeError(
            f"The features of these {source.name} clips under this run's dataset.features settings "
            f"are not cached yet ({path.name}), and this process cannot write the cache folder "
            f"{Path(cache_dir)} ({unwritable.strerror or unwritable}): a shared data folder made "
            "read-only? Cache them in a folder of your own with paths.cache_dir=<folder you can "
            "write> (the audio is still read from where it is), or ask the folder's owner to run "
            "this config once.")
    feats = compute_features(clips, features)
    blob = {
        "features": feats.half(),  # log-mel fits float16 comfortably; halves disk and load time
        "instruments": [c.instrument for c in clips],
        "folds": torch.tensor([c.fold for c in clips], dtype=torch.long),
        "pitches": torch.tensor([c.pitch for c in clips], dtype=torch.long),
        "paths": [str(c.path) for c in clips],
        "config": asdict(features),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda tmp: torch.save(blob, tmp))  # never a half-written cache
    log.info("Cached features of %d clips to %s", len(clips), path)
    return path, key


def load_cache(path: Path, what: str, weights_only: bool = True) -> Any:
    """The object a cache file holds, raising a RuntimeError that names the file and the fix when
    it cannot be read. Every cache is written in one step (`replace_atomically`), so a killed run
    leaves none half-written, but a copy of the data folder can: interrupted, or onto a full
    disk. Without this, torch.load's "failed finding central directory", "Ran out of input" or
    "[Errno 22] Invalid argument"."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (PermissionError, FileNotFoundError):
        raise  # no damage: the file is not this user's to read, or gone; the error says so
    except (EOFError, OSError, RuntimeError, pickle.UnpicklingError) as err:
        reason = str(err).split(". ")[0].rstrip(".") or type(err).__name__
        raise RuntimeError(f"The {what} cache {path} cannot be read ({reason}): it is truncated or "
                           "damaged (a copy of the data folder that was interrupted or ran out of "
                           "disk?). Delete it: the next run computes it again.") from None


def _load_table(path: Path, key: str) -> FeatureTable:
    """The FeatureTable stored in the cache file `path` (written by `ensure_cached`)."""
    blob = load_cache(path, "feature", weights_only=False)
    log.info("Loaded cached features %s (%d clips)", path, len(blob["instruments"]))
    return FeatureTable(features=blob["features"].float(), instruments=list(blob["instruments"]),
                        folds=blob["folds"], pitches=blob["pitches"], paths=list(blob["paths"]),
                        key=key)


@contextmanager
def preparing(source: ClipSource, cache_dir: str | Path) -> Iterator[OSError | None]:
    """Hold the source's preparation lock (a file next to its feature cache).

    Parallel jobs of a sweep (the joblib launcher, SLURM arrays on a shared disk) prepare the
    same source at the same moment; without the lock one of them rewrites or deletes clips
    another is decoding. With it the first renders and caches while the others wait, then find
    everything done. Holding it, it removes the temporary files of this source's caches that
    a process killed while writing one left behind.

    Yields None, or the error that shows this process cannot write `cache_dir` (a lab's data
    folder made read-only once everything was prepared): it then holds no lock, as reading what
    is there needs none (a cache file or a render's manifest.json appears in one step, complete),
    and `ensure_cached` refuses to compute what is missing.
    """
    unwritable = write_error(cache_dir)
    if unwritable is not None:
        log.debug("Cannot write the feature cache folder %s (%s): reading source '%s' without "
                  "its preparation lock", cache_dir, unwritable, source.name)
        yield unwritable
        return
    # writable for every user of a shared data folder, not only its creator (as a umask of 022
    # would leave it): the others open it to wait their turn, even when they only read
    lock = FileLock(Path(cache_dir) / f"{source.name}.prepare.lock", mode=0o666)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("Another process is preparing source '%s' (lock %s); waiting for it",
                 source.name, lock.lock_file)
        lock.acquire()
    except PermissionError as err:
        raise RuntimeError(
            f"This process cannot open the preparation lock {lock.lock_file} ({err.strerror}): "
            "another user of this data folder made it, before fewzero made it writable for "
            f"everyone. Ask them or the folder's owner to run `chmod a+w '{lock.lock_file}'` "
            "(the file is empty: it only makes jobs that prepare the source wait for each "
            "other), or use a cache folder of your own, paths.cache_dir=<folder you can write>."
        ) from None
    try:
        # every write of this source's caches holds this lock, so a temporary file of one still
        # here (`replace_atomically`'s) is a killed writer's, as large as the cache it was writing
        for stale in Path(cache_dir).glob(f"{source.name}-*.pt.*.tmp"):
            log.info("Removing %s, left by a process killed while it wrote a feature cache", stale)
            stale.unlink(missing_ok=True)
        yield None
    finally:
        lock.release()


def prepare_cache(source: ClipSource, features: MelFeatures, cache_dir: str | Path,
                  check_classes: Callable[[list[str]], None] | None = None) -> tuple[Path, str]:
    """Make the source's clips available and their features cached, without loading them:
    what every datamodule's `prepare_data` does (rank 0 only under DDP).

    `check_classes` gets the sorted class names of the source's clips once they are available,
    before any audio is decoded, to refuse a config that names a class without clips (a
    misspelt split) in seconds rather than after caching.

    Returns:
        (path of the cache file, cache key), as `ensure_cached`.
    """
    with preparing(source, cache_dir) as unwritable:
        source.prepare()
        clips = source.clips()
        if check_classes is not None:
            check_classes(sorted({clip.instrument for clip in clips}))
        return ensure_cached(source, features, cache_dir, unwritable, clips)


def prepare_and_load(source: ClipSource, features: MelFeatures, cache_dir: str | Path,
                     check_classes: Callable[[list[str]], None] | None = None) -> FeatureTable:
    """Make the source's clips available (render, download or check; cheap when done) and return
    their cached features: what every datamodule's `setup` does. `check_classes`: as
    `prepare_cache`."""
    return _load_table(*prepare_cache(source, features, cache_dir, check_classes))
