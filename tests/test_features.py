import hashlib
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fewzero.data import features as features_module
from fewzero.data.clips import Clip, config_hash, replace_atomically
from fewzero.data.features import MelFeatures, prepare_and_load, read_audio
from fewzero.data.tones import harmonic_tone


class ListSource:
    """A minimal ClipSource over files a test wrote."""

    name = "list"

    def __init__(self, clips: list[Clip], tag: str = "a"):
        self._clips, self.tag = clips, tag

    def prepare(self) -> None:
        pass

    def clips(self) -> list[Clip]:
        return self._clips

    def fingerprint(self) -> str:
        return config_hash([self.tag, [str(c.path) for c in self._clips]])


def _write_tone(path: Path, freq: float, sr: int = 16000, seconds: float = 0.6) -> Path:
    t = np.arange(int(sr * seconds)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)
    return path


@pytest.fixture
def source(tmp_path):
    clips = [Clip(_write_tone(tmp_path / f"{i}.wav", 200 + 100 * i), f"c{i % 2}", i % 5)
             for i in range(4)]
    return ListSource(clips)


def test_features_are_cached_and_reused_without_recomputing(tmp_path, source, monkeypatch):
    feats = MelFeatures(clip_seconds=0.5, n_mels=32)
    first = prepare_and_load(source, feats, tmp_path / "cache")
    assert first.features.shape == (4, 32, feats.frames(0.5))
    assert first.instruments == ["c0", "c1", "c0", "c1"]

    def fail(*args, **kwargs):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(features_module, "compute_features", fail)
    second = prepare_and_load(source, feats, tmp_path / "cache")
    assert second.key == first.key
    assert torch.allclose(second.features, first.features, atol=2e-2)  # float16 on disk


def test_changed_feature_config_or_source_invalidates_the_cache(tmp_path, source):
    base = prepare_and_load(source, MelFeatures(clip_seconds=0.5, n_mels=32), tmp_path)
    other_feats = prepare_and_load(source, MelFeatures(clip_seconds=0.5, n_mels=40), tmp_path)
    other_source = prepare_and_load(ListSource(source.clips(), tag="b"),
                                    MelFeatures(clip_seconds=0.5, n_mels=32), tmp_path)
    assert len({base.key, other_feats.key, other_source.key}) == 3
    assert other_feats.features.shape[1] == 40
    assert len(list(tmp_path.glob("list-*.pt"))) == 3


def test_audio_rendered_again_under_the_same_fingerprint_is_not_read_from_the_old_cache(tmp_path):
    """Rendered SOL's fingerprint is its render config: another FluidSynth renders that config
    into other audio, listed with other md5s. The cache must follow the audio, not the config."""
    paths = [_write_tone(tmp_path / f"{i}.wav", 300 + 100 * i) for i in range(2)]

    def listed() -> ListSource:
        return ListSource([Clip(path, f"c{i}", 0, md5=hashlib.md5(path.read_bytes()).hexdigest())
                           for i, path in enumerate(paths)])

    feats = MelFeatures(clip_seconds=0.5, n_mels=32)
    old = prepare_and_load(listed(), feats, tmp_path / "cache")
    _write_tone(paths[0], 1200)  # the same file name, other audio
    new = prepare_and_load(listed(), feats, tmp_path / "cache")
    assert new.key != old.key
    assert not torch.allclose(new.features[0], old.features[0], atol=0.5)
    assert torch.allclose(new.features[1], old.features[1], atol=2e-2)


def test_an_atomic_write_that_fails_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "cache.pt"
    replace_atomically(path, lambda tmp: tmp.write_text("old"))

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["cache.pt"]


def test_a_source_without_clips_says_which_settings_to_check(tmp_path):
    with pytest.raises(RuntimeError, match="Source 'list' has no clips: nothing to compute. Check the "
                                           "dataset.source settings"):
        prepare_and_load(ListSource([]), MelFeatures(clip_seconds=0.5), tmp_path)


def test_louder_band_shows_in_the_right_mel_bins(tmp_path):
    low = _write_tone(tmp_path / "low.wav", 150)
    high = _write_tone(tmp_path / "high.wav", 3000)
    table = prepare_and_load(ListSource([Clip(low, "a", 0), Clip(high, "b", 0)]),
                             MelFeatures(clip_seconds=0.5, n_mels=32), tmp_path)
    peak_bins = table.features.mean(dim=2).argmax(dim=1)
    assert peak_bins[0] < peak_bins[1]


def test_audio_at_another_rate_is_resampled(tmp_path):
    path = _write_tone(tmp_path / "44k.wav", 440, sr=44100, seconds=1.0)
    assert read_audio(path, 16000).shape[0] == 16000


def test_corrupt_audio_names_the_file_and_the_fix(tmp_path, source):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    broken = ListSource(source.clips() + [Clip(bad, "c0", 0)], tag="broken")
    with pytest.raises(RuntimeError, match=r"(?s)1 of 5 audio files failed.*broken\.wav.*Replace it"
                                           r".*re-run with dataset\.source\.download=true.*"
                                           r"dataset\.source\.allow_missing=true") as err:
        prepare_and_load(broken, MelFeatures(clip_seconds=0.5), tmp_path)
    assert ".." not in str(err.value) and "truncated" not in str(err.value)  # its md5 may match
    assert not list(tmp_path.glob("list-*.pt"))  # nothing half-written


def _write_float_wav(path: Path, audio: np.ndarray, sr: int = 16000) -> Path:
    sf.write(path, audio.astype(np.float32), sr, subtype="FLOAT")  # float wavs keep any value
    return path


def test_audio_with_nan_samples_is_refused_naming_the_file(tmp_path, source):
    audio = 0.3 * np.sin(np.linspace(0, 500, 8000))
    audio[100] = np.nan
    nan_clip = Clip(_write_float_wav(tmp_path / "nan.wav", audio), "c0", 0)
    with pytest.raises(RuntimeError, match=r"(?s)1 of 5 audio files.*nan\.wav holds NaN or "
                                           r"infinite samples.*Replace it"):
        prepare_and_load(ListSource(source.clips() + [nan_clip], tag="nan"),
                         MelFeatures(clip_seconds=0.5), tmp_path)
    assert not list(tmp_path.glob("list-*.pt"))


def test_features_that_are_not_finite_are_never_cached(tmp_path, source):
    """Finite samples far beyond full scale overflow float32 mel power: refused, not cached."""
    loud = Clip(_write_float_wav(tmp_path / "loud.wav", 1e30 * np.sin(np.linspace(0, 500, 8000))),
                "c0", 0)
    with pytest.raises(RuntimeError, match=r"(?s)log-mel features of 1 of 5 audio files are NaN or "
                                           r"infinite.*nothing is cached:\n  \S*loud\.wav\n"):
        prepare_and_load(ListSource(source.clips() + [loud], tag="loud"),
                         MelFeatures(clip_seconds=0.5), tmp_path)
    assert not list(tmp_path.glob("list-*.pt"))


def test_a_silent_file_is_kept_with_a_warning_naming_it(tmp_path, source, caplog):
    silent = Clip(_write_float_wav(tmp_path / "silent.wav", np.zeros(8000)), "c0", 0)
    with caplog.at_level("WARNING", logger="fewzero.data.features"):
        table = prepare_and_load(ListSource(source.clips() + [silent], tag="silent"),
                                 MelFeatures(clip_seconds=0.5), tmp_path)
    assert len(table) == 5
    assert any("1 of 5 audio files are silent" in m and str(silent.path) in m
               for m in caplog.messages)


def test_truncated_audio_is_caught_by_its_listed_md5(tmp_path, source):
    path = _write_tone(tmp_path / "cut.wav", 300)
    listed = hashlib.md5(path.read_bytes()).hexdigest()
    clip = Clip(path, "c0", 0, md5=listed)
    prepare_and_load(ListSource(source.clips() + [clip], tag="whole"), MelFeatures(clip_seconds=0.5),
                     tmp_path)  # the listed md5 matches: no error
    os.truncate(path, 1000)  # still a WAV that decodes, 478 samples long
    assert read_audio(path, 16000).shape[0] < 1000
    truncated = ListSource(source.clips() + [clip], tag="truncated")
    with pytest.raises(RuntimeError, match=rf"(?s)1 of 5 audio files.*cut\.wav has md5 .*lists {listed}"
                                           r".*truncated or changed\. Replace it.*re-run with "
                                           r"dataset\.source\.download=true"):
        prepare_and_load(truncated, MelFeatures(clip_seconds=0.5), tmp_path)


def _harmonic_log_mel(features: MelFeatures, f0: float) -> torch.Tensor:
    """(1, n_mels, frames) log-mel of one second of a 5-harmonic tone at f0."""
    t = torch.arange(features.sample_rate) / features.sample_rate
    wave = sum(torch.sin(2 * torch.pi * f0 * k * t) / k for k in range(1, 6))
    return torch.log(features.transform()(wave) + 1e-6)[None]


def test_frequency_scaling_moves_a_tone_like_transposing_it():
    features = MelFeatures(n_mels=64, hop_length=200)
    low, high = _harmonic_log_mel(features, 300.0), _harmonic_log_mel(features, 450.0)
    scaled = features.scale_frequency(low, 1.5)
    spectrum = lambda x: x.mean(dim=2).flatten()  # noqa: E731
    similarity = lambda a, b: torch.corrcoef(torch.stack([spectrum(a), spectrum(b)]))[0, 1]  # noqa: E731
    assert similarity(scaled, high) > 0.9 > similarity(low, high) + 0.3
    assert torch.equal(features.scale_frequency(low, 1.0), low)
    # scaling down reads from above the top filter for the top bins: they get the clip minimum
    down = features.scale_frequency(low, 0.5)
    assert torch.all(down[0, -5:] == low.amin())
    with pytest.raises(ValueError, match="positive"):
        features.scale_frequency(low, 0.0)


def test_frequency_scaling_with_one_factor_per_clip_scales_each_clip_by_its_own():
    features = MelFeatures(n_mels=64, hop_length=200)
    clips = torch.cat([_harmonic_log_mel(features, f0) for f0 in (200.0, 300.0, 450.0)])
    factors = torch.tensor([0.5, 1.0, 2 ** (7 / 12)])
    scaled = features.scale_frequency(clips, factors)
    for clip, factor, result in zip(clips, factors, scaled, strict=True):
        torch.testing.assert_close(result[None], features.scale_frequency(clip[None], float(factor)))
    assert torch.equal(scaled[1], clips[1])
    with pytest.raises(ValueError, match="one per clip"):
        features.scale_frequency(clips, torch.tensor([0.5, 2.0]))


def _prepare_tones_in_child(root: str, done) -> None:
    """Child process of the lock test: prepares the same tones the parent is preparing."""
    from fewzero.data.tones import SyntheticTones

    table = features_module.prepare_and_load(SyntheticTones(f"{root}/tones", ["a", "b"], 5),
                                             MelFeatures(clip_seconds=0.5, n_mels=32), f"{root}/cache")
    done.put(float(table.features.sum()))


def test_a_second_process_waits_while_another_prepares_the_same_source(tmp_path):
    """Parallel sweep jobs share one data directory: the second must not rewrite the clips
    the first is decoding, it waits for them and then reuses them."""
    import multiprocessing

    from fewzero.data.tones import SyntheticTones

    source = SyntheticTones(tmp_path / "tones", ["a", "b"], 5)
    feats = MelFeatures(clip_seconds=0.5, n_mels=32)
    context = multiprocessing.get_context("spawn")
    done = context.Queue()
    child = context.Process(target=_prepare_tones_in_child, args=(str(tmp_path), done))
    with features_module.preparing(source, tmp_path / "cache"):
        child.start()
        child.join(timeout=8)  # long enough to import fewzero and reach the lock
        assert child.is_alive(), "the child did not wait for the lock"
        assert not source.folder.exists(), "the child wrote clips while the parent held the lock"
        source.prepare()
        features_module.ensure_cached(source, feats, tmp_path / "cache")
    child.join(timeout=120)
    assert child.exitcode == 0
    ours = prepare_and_load(source, feats, tmp_path / "cache")
    assert done.get(timeout=5) == float(ours.features.sum())
    assert len(list((tmp_path / "cache").glob("tones-*.pt"))) == 1


def test_preparing_a_source_removes_what_a_killed_cache_write_left_and_nothing_else(tmp_path, source):
    cache = tmp_path / "cache"
    cache.mkdir()
    # a kill during `replace_atomically(<cache>.pt)` leaves its temporary file, as large as the cache
    killed = cache / f"{source.name}-0123456789ab.pt.4242.tmp"
    others = [cache / f"tiny{source.name}-0123456789ab.pt.4242.tmp",  # another source's: its own lock
              cache / f"{source.name}-0123456789ab.pt"]
    for path in [killed, *others]:
        path.write_bytes(b"x" * 100)
    prepare_and_load(source, MelFeatures(clip_seconds=0.5, n_mels=32), cache)
    assert not killed.exists() and all(path.exists() for path in others)


def test_mel_centres_are_the_peaks_of_the_filterbank_the_features_use():
    import torchaudio

    features = MelFeatures(n_mels=64)
    n_freqs = features.n_fft // 2 + 1
    bank = torchaudio.functional.melscale_fbanks(n_freqs, features.f_min, features.sample_rate / 2,
                                                 features.n_mels, features.sample_rate)
    peaks = torch.linspace(0, features.sample_rate / 2, n_freqs)[bank.argmax(dim=0)].double()
    bin_hz = features.sample_rate / features.n_fft
    assert (features.mel_centres_hz() - peaks).abs().max() <= bin_hz


def test_a_clip_longer_than_clip_seconds_keeps_its_start(tmp_path):
    sr = 16000
    t = np.arange(sr) / sr
    wave = np.where(t < 0.3, 0.3 * np.sin(2 * np.pi * 440 * t), 0.0).astype(np.float32)  # note, then silence
    sf.write(tmp_path / "long.wav", wave, sr)
    table = features_module.compute_features([Clip(tmp_path / "long.wav", "c", 0)],
                                             MelFeatures(clip_seconds=0.5, n_mels=32))
    assert table[0, :, :10].max() > np.log(features_module.LOG_FLOOR) + 10  # the note is there


def test_stereo_audio_is_averaged_to_mono(tmp_path):
    t = np.arange(8000) / 16000
    tone = (0.4 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    sf.write(tmp_path / "right.wav", np.stack([np.zeros_like(tone), tone], axis=1), 16000)
    torch.testing.assert_close(read_audio(tmp_path / "right.wav", 16000),
                               torch.from_numpy(tone) / 2, atol=1e-4, rtol=0)


def test_features_do_not_depend_on_the_batch_size(source):
    feats = MelFeatures(clip_seconds=0.5, n_mels=32)
    in_one = features_module.compute_features(source.clips(), feats, batch_size=64)
    in_batches = features_module.compute_features(source.clips(), feats, batch_size=3)  # 3 + 1
    assert in_batches.shape == in_one.shape == (4, 32, feats.frames(0.5))
    torch.testing.assert_close(in_batches, in_one)


@pytest.mark.parametrize(("settings", "message"), [
    ({"n_fft": 512, "n_mels": 256}, r"25 of the n_mels=256 mel filters .* hold no bin: their bands would "
                                    r"be constant\. Lower dataset\.features\.n_mels \(126 has no empty "
                                    r"filter\), raise dataset\.features\.n_fft \(2048 has none\) or widen"),
    ({"f_min": 100.0, "f_max": 101.0, "n_mels": 1},
     r"1 of the n_mels=1 mel filters .* Raise dataset\.features\.n_fft \(16384 has none\) or widen f_min"),
    ({"f_max": 10000.0}, r"dataset\.features\.f_max=10000\.0 is above the Nyquist frequency \(8000 Hz\) "
                         r"of sample_rate=16000.*at most 8000, or null"),
    ({"sample_rate": 8000, "f_max": 8000.0}, r"f_max=8000\.0 is above the Nyquist frequency \(4000 Hz\)"),
    ({"f_min": 8000.0, "f_max": 4000.0}, r"dataset\.features\.f_min=8000\.0 must be at least 0 and below "
                                         r"f_max \(4000 Hz\)"),
    ({"f_min": 500.0, "f_max": 500.0}, r"f_min=500\.0 must be at least 0 and below f_max"),
    ({"hop_length": 0}, r"dataset\.features\.hop_length must be a positive whole number; got 0"),
    ({"hop_length": 2048}, r"dataset\.features\.hop_length=2048 is longer than the FFT window "
                           r"\(n_fft=1024\): the audio between windows would never be analysed\. Set "
                           r"hop_length at most 1024"),
    ({"n_mels": 64.5}, r"dataset\.features\.n_mels must be a positive whole number; got 64\.5"),
    ({"clip_seconds": 0.0}, r"dataset\.features\.clip_seconds must be positive"),
    ({"clip_seconds": 0.03}, r"dataset\.features\.clip_seconds=0\.03 is 480 samples at sample_rate=16000, "
                             r"too short for the FFT window \(n_fft=1024\): a clip needs more than 512\. "
                             r"Set clip_seconds at least 0\.0321, or lower n_fft"),
])
def test_feature_settings_that_make_empty_or_no_mel_bands_are_refused_naming_the_fix(settings, message):
    with pytest.raises(ValueError, match=message):
        MelFeatures(**settings)


@pytest.mark.parametrize("settings", [{}, {"n_mels": 40}, {"n_mels": 256, "n_fft": 2048},
                                      {"sample_rate": 8000}, {"sample_rate": 22050}, {"f_max": 8000.0},
                                      {"hop_length": 512, "n_fft": 2048}])
def test_feature_settings_whose_every_mel_band_holds_bins_are_accepted(settings):
    MelFeatures(**settings)  # torchaudio's filterbank of these has no all-zero filter


def test_the_shortest_clip_accepted_makes_a_spectrogram():
    features = MelFeatures(clip_seconds=0.0321)  # 514 samples, past the STFT's 512 of padding
    samples = round(features.clip_seconds * features.sample_rate)
    assert features.transform()(torch.zeros(samples)).shape == (64, 3)


@pytest.mark.parametrize("key", ["sample_rate", "n_fft", "hop_length", "n_mels"])
def test_a_whole_number_written_as_a_float_is_taken_as_that_int_with_the_same_cache_key(key):
    """hop_length=200.0 was accepted, then failed in torch's STFT (a TypeError) once the clips were
    rendered; n_fft=1024.0 and n_mels=128.0 in the filterbank check's; sample_rate=16000.0 made
    a cache of its own for the same features."""
    as_int = MelFeatures(hop_length=200, n_mels=128)
    as_float = MelFeatures(**{"hop_length": 200, "n_mels": 128, key: float(getattr(as_int, key))})
    assert as_float == as_int and type(getattr(as_float, key)) is int
    assert config_hash(asdict(as_float)) == config_hash(asdict(as_int))
    assert as_float.frames(1.0) == 81 and as_float.transform()(torch.zeros(16000)).shape == (128, 81)


@pytest.mark.parametrize("value", ["200", float("inf"), float("nan"), None])
def test_a_spectrogram_size_that_is_no_number_is_refused_naming_the_key(value):
    with pytest.raises(ValueError, match=r"dataset\.features\.hop_length must be a positive whole number"):
        MelFeatures(hop_length=value)


def test_clips_shorter_than_clip_seconds_are_named_with_a_warning(tmp_path, source, caplog):
    """Raising clip_seconds past the audio (3 s of 2 s renders) padded every clip with silence
    that excerpts read, without a word; clips that fill clip_seconds are not named."""
    with caplog.at_level("WARNING", logger="fewzero.data.features"):
        prepare_and_load(source, MelFeatures(clip_seconds=0.5, n_mels=32), tmp_path)
        assert not caplog.messages
        prepare_and_load(source, MelFeatures(clip_seconds=1.0, n_mels=32), tmp_path)
    assert caplog.messages == [
        "4 of 4 audio files are shorter than dataset.features.clip_seconds=1 (the shortest 0.60 s): "
        "their cached features end in silence (the log floor), which excerpts reaching past their end "
        "read as if it were sound. Lower dataset.features.clip_seconds to the clips' length, or "
        "for rendered SOL raise dataset.source.clip_seconds to it."]


def test_a_cache_folder_that_cannot_be_written_is_read_and_a_missing_cache_refused_first(
        tmp_path, source, monkeypatch):
    """A lab's data folder made read-only once prepared: a run that needs nothing new reads it
    (before: the preparation lock's file could not be created, an OSError), and one that needs a
    new cache is refused before decoding, naming the folder and paths.cache_dir (before: an
    OSError, after minutes of computing when the lock file was there)."""
    import errno

    feats = MelFeatures(clip_seconds=0.5, n_mels=32)
    cache = tmp_path / "cache"
    first = prepare_and_load(source, feats, cache)
    (cache / "list.prepare.lock").unlink()
    monkeypatch.setattr(features_module, "write_error",
                        lambda folder: PermissionError(errno.EACCES, "Permission denied", str(folder)))

    def fail(*args, **kwargs):
        raise AssertionError("features were computed for a cache that cannot be written")

    monkeypatch.setattr(features_module, "compute_features", fail)
    assert torch.equal(prepare_and_load(source, feats, cache).features, first.features)
    assert not (cache / "list.prepare.lock").exists()
    with pytest.raises(RuntimeError, match=rf"cannot write the cache folder {cache} \(Permission "
                                           r"denied\).*paths\.cache_dir=<folder you can write>"):
        prepare_and_load(source, MelFeatures(clip_seconds=0.5, n_mels=16), cache)
    monkeypatch.undo()
    (tmp_path / "file").write_text("not a folder")  # fails for root too, unlike a chmod
    monkeypatch.setattr(features_module, "compute_features", fail)
    with pytest.raises(RuntimeError, match=r"cannot write the cache folder .*file/cache "
                                           r"\(Not a directory\).*paths\.cache_dir="):
        prepare_and_load(source, feats, tmp_path / "file" / "cache")


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_a_truncated_feature_cache_is_refused_naming_it_and_the_fix(tmp_path, source, keep):
    """A copy of the data folder cut short leaves a truncated cache (a killed run cannot: caches
    are written in one step). Before: torch.load's "Ran out of input" or "failed finding central
    directory", or pickle's "invalid load key"."""
    feats = MelFeatures(clip_seconds=0.5, n_mels=32)
    prepare_and_load(source, feats, tmp_path / "cache")
    (path,) = (tmp_path / "cache").glob("list-*.pt")
    data = path.read_bytes()
    path.write_bytes(data[:int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(RuntimeError, match=rf"The feature cache {path} cannot be read \(.+\): it is "
                                           r"truncated or damaged .*Delete it: the next run computes"):
        prepare_and_load(source, feats, tmp_path / "cache")


def test_the_preparation_lock_is_writable_for_every_user_of_a_shared_data_folder(
        tmp_path, source, monkeypatch):
    """With a umask of 022 the first user's lock was theirs alone: every other user's run, even
    one that only read, then failed with a PermissionError from the lock. Locks made before
    are refused naming the file and the chmod that fixes them."""
    import errno

    old = os.umask(0o022)
    try:
        prepare_and_load(source, MelFeatures(clip_seconds=0.5, n_mels=32), tmp_path / "cache")
    finally:
        os.umask(old)
    assert (tmp_path / "cache" / "list.prepare.lock").stat().st_mode & 0o777 == 0o666

    class TheirLock(features_module.FileLock):
        def acquire(self, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", self.lock_file)

    monkeypatch.setattr(features_module, "FileLock", TheirLock)
    lock = tmp_path / "cache" / "list.prepare.lock"
    with pytest.raises(RuntimeError, match=rf"cannot open the preparation lock {lock} \(Permission "
                                           rf"denied\).*chmod a\+w '{lock}'.*paths\.cache_dir="):
        prepare_and_load(source, MelFeatures(clip_seconds=0.5, n_mels=32), tmp_path / "cache")


@pytest.mark.parametrize("f0, sample_rate", [(220.0, 16000), (700.0, 8000)])
def test_a_synthetic_tone_is_the_sum_of_its_harmonics_below_nyquist(f0, sample_rate):
    """harmonic_tone sums sines through powers of one complex exponential: the same tone as a
    sine per harmonic, the harmonics above Nyquist left out (7 of 12 at 700 Hz and 8 kHz)."""
    t = np.arange(sample_rate) / sample_rate
    amplitudes = np.linspace(1.0, 0.1, 12)
    tone = harmonic_tone(f0, amplitudes, np.random.default_rng(3), t, sample_rate)
    phases = np.random.default_rng(3).uniform(0, 6.28, size=12)
    sines = sum(a * np.sin(2 * np.pi * f0 * (k + 1) * t + phase)
                for k, (a, phase) in enumerate(zip(amplitudes, phases, strict=True))
                if f0 * (k + 1) < sample_rate / 2)
    np.testing.assert_allclose(tone, sines, rtol=0, atol=1e-10)


def test_tones_refuse_a_sample_rate_below_twice_their_highest_fundamental(tmp_path):
    """The highest tone (MIDI 74, 587 Hz) needs a Nyquist frequency above it; a harmonic_tone
    with no harmonic below Nyquist is silence, not an error."""
    from fewzero.data.tones import SyntheticTones

    with pytest.raises(ValueError, match=r"sample_rate=1000 Hz cannot hold the tones' fundamentals "
                                         r"\(up to 587 Hz.*above 1175 Hz \(the default is 16000\)"):
        SyntheticTones(tmp_path, ["a"], 2, sample_rate=1000)
    SyntheticTones(tmp_path, ["a"], 2, sample_rate=1200)  # above 1175 Hz: accepted
    t = np.arange(100) / 1000
    silent = harmonic_tone(600.0, np.ones(12), np.random.default_rng(0), t, 1000)
    assert silent.shape == (100,) and not silent.any()
