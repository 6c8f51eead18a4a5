"""Tests of rendered SOL (FluidSynth renders of tiny instrument tables, offline).

Rendering tests are skipped when libfluidsynth or the Debian GM SoundFonts are missing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fewzero.data import sol
from fewzero.data.sol import RenderedSOL, pitch_name

SOUNDFONTS = [Path("/usr/share/sounds/sf3/MuseScore_General.sf3"),
              Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")]
# A 2-instrument slice of the default table, cut to 3 pitches each.
TABLE = [{"name": "Flute", "program": 73, "low": 69, "high": 71, "instances": 1},
         {"name": "Violin", "program": 40, "low": 60, "high": 62, "instances": 2}]
TINY = {"clip_seconds": 0.5, "note_seconds": 0.3, "n_folds": 3, "num_workers": 1,
        "dynamics": {"pp": [20, 45], "ff": [100, 127]}}


def _fluidsynth_missing() -> str:
    """Why rendering cannot run here ("" when it can)."""
    missing = [str(path) for path in SOUNDFONTS if not path.is_file()]
    if missing:
        return f"SoundFont(s) {missing} not installed (bash scripts/setup.sh)"
    try:
        import fluidsynth  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"libfluidsynth/pyfluidsynth not loadable: {exc}"
    return ""


needs_fluidsynth = pytest.mark.skipif(bool(_fluidsynth_missing()), reason=_fluidsynth_missing())


def _source(root: Path, instruments: list[dict] | None = None, **overrides) -> RenderedSOL:
    """A RenderedSOL over the tiny table with the installed SoundFonts."""
    kwargs = {**TINY, **overrides}
    return RenderedSOL(root, TABLE if instruments is None else instruments,
                       [str(path) for path in SOUNDFONTS], **kwargs)


def _rows(source: RenderedSOL) -> list[dict[str, str]]:
    with open(source.dataset_dir / "metadata.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> RenderedSOL:
    """The tiny table rendered once (in-process) for the whole module."""
    source = _source(tmp_path_factory.mktemp("sol"))
    source.prepare()
    return source


@needs_fluidsynth
def test_metadata_matches_table(rendered: RenderedSOL) -> None:
    rows = _rows(rendered)
    assert list(rows[0]) == list(sol.METADATA_COLUMNS)
    assert Counter(row["instrument"] for row in rows) == {"Flute": 6, "Violin": 12}
    expected = {("Flute", p, d, 1) for p in (69, 70, 71) for d in ("pp", "ff")}
    expected |= {("Violin", p, d, i) for p in (60, 61, 62) for d in ("pp", "ff") for i in (1, 2)}
    got = {(r["instrument"], int(r["pitch"]), r["dynamics"], int(r["path"][-5])) for r in rows}
    assert got == expected
    assert "audio/Flute/Fl-A4-pp-1.wav" in {row["path"] for row in rows}
    assert "audio/Violin/Vn-C#4-ff-2.wav" in {row["path"] for row in rows}
    for name, per_fold in (("Flute", 2), ("Violin", 4)):
        folds = Counter(int(r["fold"]) for r in rows if r["instrument"] == name)
        assert folds == {0: per_fold, 1: per_fold, 2: per_fold}
    for row in rows:
        low, high = TINY["dynamics"][row["dynamics"]]
        assert low <= int(row["velocity"]) <= high
        assert abs(float(row["detune_cents"])) <= 15.0
        assert row["soundfont"] in {path.name for path in SOUNDFONTS}
    assert len({row["soundfont"] for row in rows}) == 2, "both SoundFonts should be drawn"


@needs_fluidsynth
def test_clips_are_absolute_and_in_metadata_order(rendered: RenderedSOL) -> None:
    clips, rows = rendered.clips(), _rows(rendered)
    assert [c.path for c in clips] == [(rendered.dataset_dir / r["path"]).resolve() for r in rows]
    assert all(c.path.is_absolute() and c.path.is_file() for c in clips)
    assert [(c.instrument, c.pitch, c.dynamics, c.fold) for c in clips] == [
        (r["instrument"], int(r["pitch"]), r["dynamics"], int(r["fold"])) for r in rows]
    on_disk = sorted(rendered.dataset_dir.glob("audio/*/*.wav"))
    assert on_disk == sorted(c.path for c in clips)


@needs_fluidsynth
def test_audio_is_16bit_mono_right_length_and_audible(rendered: RenderedSOL) -> None:
    for clip in rendered.clips():
        info = sf.info(str(clip.path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert info.frames == 8000  # clip_seconds 0.5
        audio, _ = sf.read(str(clip.path), dtype="float32")
        peak = float(np.max(np.abs(audio)))
        assert 10 ** (-50 / 20) < peak < 1.0, f"{clip.path.name}: peak {peak}"


@needs_fluidsynth
def test_no_two_clips_identical_and_md5_recorded(rendered: RenderedSOL) -> None:
    rows = _rows(rendered)
    md5s = [hashlib.md5((rendered.dataset_dir / r["path"]).read_bytes()).hexdigest()
            for r in rows]
    assert md5s == [row["md5"] for row in rows]
    assert len(set(md5s)) == len(md5s)
    assert [clip.md5 for clip in rendered.clips()] == md5s  # checked before features are computed


@needs_fluidsynth
def test_flute_sounds_at_its_pitch(rendered: RenderedSOL) -> None:
    """The synth runs at the file's sample rate and applies the detune (FFT peak check)."""
    for row in (r for r in _rows(rendered) if r["instrument"] == "Flute"):
        audio, rate = sf.read(str(rendered.dataset_dir / row["path"]))
        segment = audio[1600:1600 + 4096] * np.hanning(4096)
        spectrum = np.abs(np.fft.rfft(segment, 65536))
        peak_hz = np.fft.rfftfreq(65536, 1 / rate)[np.argmax(spectrum)]
        f0 = 440 * 2 ** ((int(row["pitch"]) - 69 + float(row["detune_cents"]) / 100) / 12)
        harmonic = max(1, round(peak_hz / f0))
        assert abs(1200 * np.log2(peak_hz / (harmonic * f0))) < 35, row["path"]


@needs_fluidsynth
def test_manifest_records_config_and_counts(rendered: RenderedSOL) -> None:
    manifest = json.loads((rendered.dataset_dir / "manifest.json").read_text())
    assert manifest["fingerprint"] == rendered.fingerprint() == rendered.dataset_dir.name
    assert manifest["config"] == json.loads(json.dumps(rendered.config()))
    assert manifest["counts"] == {"Flute": 6, "Violin": 12}
    assert manifest["n_clips"] == 18 and manifest["n_dropped"] == 0
    assert manifest["fluidsynth"]["libfluidsynth"].count(".") == 2
    assert manifest["seconds"] > 0


@needs_fluidsynth
def test_second_prepare_reuses_without_rendering(rendered: RenderedSOL,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    files = sorted(rendered.dataset_dir.rglob("*"))
    mtimes = [path.stat().st_mtime_ns for path in files]

    def fail(*args: object) -> None:
        raise AssertionError("prepare() rendered again")

    monkeypatch.setattr(sol, "_render_all", fail)
    again = _source(rendered.root, num_workers=4)  # num_workers is not part of the config
    assert again.fingerprint() == rendered.fingerprint()
    again.prepare()
    assert sorted(rendered.dataset_dir.rglob("*")) == files
    assert [path.stat().st_mtime_ns for path in files] == mtimes


@needs_fluidsynth
def test_provenance_names_the_render_and_the_fluidsynth_that_made_it(
        rendered: RenderedSOL, caplog: pytest.LogCaptureFixture) -> None:
    manifest = json.loads((rendered.dataset_dir / "manifest.json").read_text())
    provenance = rendered.provenance()
    assert provenance == {"dir": str(rendered.dataset_dir), "fingerprint": rendered.fingerprint(),
                          "fluidsynth": manifest["fluidsynth"]}
    with caplog.at_level("INFO", logger=sol.__name__):
        again = _source(rendered.root)
        for _ in range(3):  # as a datamodule's prepare_data and setup per stage do
            again.prepare()  # reused: the log says which FluidSynth rendered it, once
    assert caplog.text.count("Reusing rendered SOL") == 1
    version = manifest["fluidsynth"]["libfluidsynth"]
    assert (f"Reusing rendered SOL at {rendered.dataset_dir} (rendered with FluidSynth {version})"
            in caplog.text)
    gone = _source(rendered.root, seed=7)  # never rendered
    assert gone.provenance()["fluidsynth"] is None


@needs_fluidsynth
def test_reusing_a_render_made_by_another_fluidsynth_warns_and_names_the_fix(
        rendered: RenderedSOL, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    made_by = rendered.provenance()["fluidsynth"]["libfluidsynth"]
    for installed, warns in ((made_by, False), (None, False), ("9.9.9", True)):
        monkeypatch.setattr(sol, "installed_fluidsynth_version", lambda v=installed: v)
        caplog.clear()
        with caplog.at_level("INFO", logger=sol.__name__):
            _source(rendered.root).prepare()
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == warns, (installed, warnings)
    assert (f"Rendered SOL at {rendered.dataset_dir} was made by FluidSynth {made_by}, but "
            "FluidSynth 9.9.9 is installed" in warnings[0])
    assert "dataset.source.root=<another folder>" in warnings[0]


@needs_fluidsynth
def test_changed_config_renders_into_new_folder(rendered: RenderedSOL,
                                               caplog: pytest.LogCaptureFixture) -> None:
    changed = _source(rendered.root, seed=1)
    assert changed.fingerprint() != rendered.fingerprint()
    with caplog.at_level("INFO", logger=sol.__name__):
        changed.prepare()
        changed.prepare()  # the next stage: the render it just made is not announced as reused
    assert "Rendered" in caplog.text and "Reusing" not in caplog.text
    assert changed.dataset_dir != rendered.dataset_dir
    assert (changed.dataset_dir / "manifest.json").is_file()
    assert (rendered.dataset_dir / "manifest.json").is_file()
    old = {row["md5"] for row in _rows(rendered)}
    assert old.isdisjoint(row["md5"] for row in _rows(changed))


@needs_fluidsynth
def test_incomplete_render_is_redone_identically(tmp_path: Path) -> None:
    source = _source(tmp_path, instruments=TABLE[:1])
    with pytest.raises(RuntimeError, match=r"call prepare\(\)"):
        source.clips()
    source.prepare()
    first = _rows(source)
    (source.dataset_dir / "manifest.json").unlink()  # as if the render had been killed
    with pytest.raises(RuntimeError, match=r"call prepare\(\)"):
        source.clips()
    source.prepare()
    assert _rows(source) == first
    Path(source.clips()[0].path).unlink()  # a missing file also makes the folder incomplete
    with pytest.raises(RuntimeError, match="incomplete"):
        source.clips()


@needs_fluidsynth
def test_worker_processes_render_the_same_files(rendered: RenderedSOL, tmp_path: Path) -> None:
    parallel = _source(tmp_path, num_workers=2)
    parallel.prepare()
    assert [row["md5"] for row in _rows(parallel)] == [row["md5"] for row in _rows(rendered)]


@needs_fluidsynth
def test_no_state_leaks_between_notes(rendered: RenderedSOL) -> None:
    """A note renders bit-identically on a fresh synth and after other (stereo) notes."""
    spec = rendered._spec()
    first = sol._Synth(spec)
    fresh = first.play(0, 73, 70, 80, 300, 4800, 8000)
    first.close()
    synth = sol._Synth(spec)
    for soundfont, program, pitch in ((1, 40, 62), (1, 73, 69), (0, 40, 61)):
        synth.play(soundfont, program, pitch, 127, -500, 4800, 8000)
        assert np.array_equal(synth.play(0, 73, 70, 80, 300, 4800, 8000), fresh)
    synth.close()


@needs_fluidsynth
def test_silent_notes_are_dropped_and_counted(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    # GM accordion sample zones end at MIDI 108 in both SoundFonts: 109 renders pure silence.
    table = [{"name": "Accordion (high)", "program": 21, "low": 108, "high": 109}]
    source = _source(tmp_path, instruments=table, n_folds=2)
    with caplog.at_level(logging.INFO, logger="fewzero.data.sol"):
        source.prepare()
    rows = _rows(source)
    assert [(r["path"], r["pitch"]) for r in rows] == [
        ("audio/Accordion_high/Accordion_high-C8-pp-1.wav", "108"),
        ("audio/Accordion_high/Accordion_high-C8-ff-1.wav", "108")]
    assert sorted(int(r["fold"]) for r in rows) == [0, 1]
    assert not list(source.dataset_dir.glob("audio/*/*C#8*"))
    manifest = json.loads((source.dataset_dir / "manifest.json").read_text())
    assert manifest["dropped"] == {"Accordion (high)": 2} and manifest["n_dropped"] == 2
    assert "dropped 2 silent notes (Accordion (high): 2)" in caplog.messages


@needs_fluidsynth
def test_a_split_class_that_rendered_no_audible_note_is_named_so_before_decoding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fewzero.data import features as features_module
    from fewzero.data.datamodule import FewShotDataModule
    from fewzero.data.features import MelFeatures

    table = [TABLE[0], {"name": "Accordion (high)", "program": 21, "low": 109, "high": 109}]
    source = _source(tmp_path / "sol", instruments=table, n_folds=2)
    setting = {"n_way": 2, "n_shot": 1, "n_query": 1, "n_episodes": 1}
    episodes = {"train": setting, "val": setting, "test": [setting]}
    module = FewShotDataModule(source, MelFeatures(clip_seconds=0.5),
                               {"train": ["Flute"], "val": [], "test": ["Accordion (high)"]},
                               episodes, tmp_path / "cache", excerpt_seconds=0.25)
    monkeypatch.setattr(features_module, "compute_features", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(ValueError) as err:
        module.prepare_data()
    assert source.silent_classes == ["Accordion (high)"]
    message = str(err.value)
    assert message.startswith("sol instrument(s) ['Accordion (high)'] of dataset.split.test have no "
                              "clips: they rendered no audible note")
    assert "program, low and high in dataset.source.instruments" in message
    assert "Unknown" not in message and "spelling" not in message


def test_a_split_class_missing_from_the_table_is_named_with_how_to_render_it(
        tmp_path: Path, soundfont_file: Path) -> None:
    from fewzero.data.clips import check_split

    source = RenderedSOL(tmp_path, TABLE, [str(soundfont_file)])
    with pytest.raises(ValueError) as err:
        check_split(["Flute", "Piccolo"], ["Flute", "Violin"], source, key="dataset.split.unseen")
    message = str(err.value)
    assert message.startswith("Unknown sol instrument name(s) ['Piccolo']")
    assert "Check the spelling in dataset.split.unseen" in message  # a misspelt name
    # or the instrument the user means to study, which the table does not render yet
    assert "add an entry {name, program (0-based GM), low, high} after the others in " \
           "dataset.source.instruments" in message


def test_is_silent_uses_the_peak_in_dbfs() -> None:
    tone = np.sin(np.linspace(0, 200, 1000)).astype(np.float32)
    assert sol._is_silent(np.zeros(1000, dtype=np.float32), -60.0)
    assert sol._is_silent(tone * 10 ** (-70 / 20), -60.0)
    assert not sol._is_silent(tone * 10 ** (-50 / 20), -60.0)
    assert sol._is_silent(tone * 10 ** (-50 / 20), -40.0)


def test_assign_folds_is_balanced_per_class_and_seeded() -> None:
    labels = ["a"] * 7 + ["b"] * 10
    folds = sol.assign_folds(labels, 5, seed=3)
    assert Counter(f for f, name in zip(folds, labels, strict=True) if name == "a") == {
        0: 2, 1: 2, 2: 1, 3: 1, 4: 1}
    assert Counter(f for f, name in zip(folds, labels, strict=True) if name == "b") == {
        k: 2 for k in range(5)}
    assert folds == sol.assign_folds(labels, 5, seed=3)
    assert folds != sol.assign_folds(labels, 5, seed=4)


def test_assign_folds_by_pitch_keeps_every_rendering_of_a_pitch_in_one_fold() -> None:
    labels = ["a"] * 30 + ["b"] * 12
    pitches = [60 + i // 3 for i in range(30)] + [40 + i // 2 for i in range(12)]  # 3 and 2 per pitch
    folds = sol.assign_folds(labels, 5, seed=3, groups=pitches)
    fold_of = {}
    for fold, name, pitch in zip(folds, labels, pitches, strict=True):
        assert fold_of.setdefault((name, pitch), fold) == fold  # one fold per pitch
    assert Counter(f for (name, _), f in fold_of.items() if name == "a") == {k: 2 for k in range(5)}
    assert sorted(Counter(f for (name, _), f in fold_of.items() if name == "b").values()) == [1, 1, 1, 1, 2]
    assert folds == sol.assign_folds(labels, 5, seed=3, groups=pitches)
    by_note = sol.assign_folds(labels, 5, seed=3)
    assert any(len({f for f, n, p in zip(by_note, labels, pitches, strict=True) if (n, p) == key}) > 1
               for key in fold_of)  # dealt note by note, a pitch's renderings spread over folds


@needs_fluidsynth
def test_a_source_folded_by_pitch_deals_every_rendering_of_a_pitch_to_one_fold(tmp_path: Path) -> None:
    source = _source(tmp_path, instruments=TABLE[1:], fold_by="pitch")  # Violin: 4 per pitch
    source.prepare()
    folds_of = {}
    for row in _rows(source):
        folds_of.setdefault(row["pitch"], set()).add(int(row["fold"]))
    assert sorted(map(len, folds_of.values())) == [1, 1, 1]  # by note they spread over folds
    assert set().union(*folds_of.values()) == {0, 1, 2}


def test_pitch_names_follow_tinysol() -> None:
    assert [pitch_name(p) for p in (21, 60, 61, 70, 108)] == ["A0", "C4", "C#4", "A#4", "C8"]


def test_missing_soundfont_names_path_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "GM.sf2"
    with pytest.raises(FileNotFoundError) as info:
        RenderedSOL(tmp_path, TABLE, [str(missing)])
    assert str(missing) in str(info.value)
    assert "bash scripts/setup.sh" in str(info.value)
    assert "dataset.source.soundfonts" in str(info.value)


@pytest.fixture
def soundfont_file(tmp_path: Path) -> Path:
    """A stand-in named like the first SoundFont, for tests that render nothing: the
    constructor only checks that each SoundFont exists and the fingerprint reads only its name
    and size, so they need no installed SoundFont."""
    path = tmp_path / "soundfonts" / SOUNDFONTS[0].name
    path.parent.mkdir()
    path.write_bytes(b"not a SoundFont: nothing is rendered from it")
    return path


def test_soundfonts_given_as_one_string_or_listing_one_twice_are_refused(
        tmp_path: Path, soundfont_file: Path) -> None:
    # Before: a path without brackets was read character by character ("SoundFont not found:
    # /"), and a SoundFont listed twice rendered silently with it drawn for 2 notes in 3.
    with pytest.raises(ValueError, match=r"must be a list of paths: dataset\.source\.soundfonts=\["):
        RenderedSOL(tmp_path, TABLE, str(soundfont_file))
    with pytest.raises(ValueError, match=r"dataset\.source\.soundfonts lists .* more than once"):
        RenderedSOL(tmp_path, TABLE, [str(soundfont_file), str(soundfont_file.parent / ".." /
                                                                 "soundfonts" / soundfont_file.name)])


def test_a_render_into_a_folder_that_cannot_be_written_is_refused_naming_the_fix(
        tmp_path: Path, soundfont_file: Path) -> None:
    # Before: an OSError from mkdir, or with the folder there, a worker's error on its first note
    (tmp_path / "data").write_text("a file where the folder should be")  # unwritable for root too
    source = RenderedSOL(tmp_path / "data" / "rendered_sol", TABLE, [str(soundfont_file)], **TINY)
    with pytest.raises(RuntimeError, match=r"not at .*data/rendered_sol/\w+, and this process cannot "
                                           r"write there \(Not a directory\).*dataset\.source\.root="):
        source.prepare()


@pytest.mark.parametrize(("entry", "match"), [
    ({"name": "Oboe", "program": 68, "low": 58}, r"instruments\[1\].*missing keys \['high'\]"),
    ({"name": "Oboe", "program": 68, "low": 93, "high": 58}, r"instruments\[1\].*low <= high"),
    ({"name": "Oboe", "program": 128, "low": 58, "high": 93}, r"instruments\[1\].*program"),
    ({"name": "Oboe", "program": "oboe", "low": 58, "high": 93}, r"instruments\[1\].*integers"),
    ({"name": "Oboe", "program": 68, "low": 58, "high": 93, "instance": 2},
     r"instruments\[1\].*unknown keys \['instance'\]"),
    ({"name": "Flute", "program": 68, "low": 58, "high": 93}, r"unique.*\['Flute', 'Flute'\]"),
])
def test_bad_table_entry_raises_value_error(tmp_path: Path, soundfont_file: Path, entry: dict,
                                            match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RenderedSOL(tmp_path, [TABLE[0], entry], [str(soundfont_file)])


@pytest.mark.parametrize(("overrides", "match"), [
    ({"sample_rate": 4000}, r"^sample_rate=4000: FluidSynth renders at 8000\.\.96000 Hz; pick a rate in "
                            r"that range \(dataset\.features\.sample_rate, which rendered SOL follows\)"),
    ({"note_seconds": 3.0}, r"^Need 0 < dataset\.source\.note_seconds \(3\.0\) <= "
                            r"dataset\.source\.clip_seconds \(2\.0\).*lower note_seconds with"),
    ({"clip_seconds": 1.0}, r"^Need 0 < dataset\.source\.note_seconds \(1\.5\) <= "
                            r"dataset\.source\.clip_seconds \(1\.0\)"),
    ({"dynamics": {"pp": [50, 20]}},
     r"^dataset\.source\.dynamics\.pp=\[50, 20\]: .*1 <= min <= max <= 127"),
    ({"variation": {"detune": 10}}, r"^Unknown dataset\.source\.variation key\(s\) \['detune'\]"),
    ({"n_folds": 0}, r"^dataset\.source\.n_folds=0: the clips are dealt to a whole number of folds, "
                     r"at least one"),
    ({"n_folds": 2.5}, r"^dataset\.source\.n_folds=2\.5: the clips"),  # was read as 2
    ({"fold_by": "dynamic"}, r"^dataset\.source\.fold_by='dynamic': use note"),
    ({"variation": {"noise_snr_db": [55, 35]}},
     r"^dataset\.source\.variation=.*noise_snr_db=\[low_db, high_db\]"),
    ({"variation": {"gain_db": -1}}, r"^dataset\.source\.variation=.*need non-negative"),
    ({"variation": {"max_onset_ms": 2000}},
     r"^dataset\.source\.variation\.max_onset_ms=2000\.0 must be shorter than "
     r"dataset\.source\.clip_seconds"),
])
def test_bad_settings_raise_value_error(tmp_path: Path, soundfont_file: Path, overrides: dict,
                                        match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RenderedSOL(tmp_path, TABLE, [str(soundfont_file)], **overrides)


def test_a_soundfont_edited_in_place_gets_a_new_fingerprint(tmp_path: Path, soundfont_file: Path) -> None:
    before = RenderedSOL(tmp_path, TABLE, [str(soundfont_file)]).fingerprint()
    edited = soundfont_file.read_bytes().replace(b"not", b"NOT")  # same name, same size
    soundfont_file.write_bytes(edited)
    assert RenderedSOL(tmp_path, TABLE, [str(soundfont_file)]).fingerprint() != before


@pytest.mark.parametrize("experiment", [[], ["experiment=zsl_attribute_audio"]])
def test_rendered_sol_is_rendered_at_the_feature_sample_rate(tmp_path: Path, experiment: list[str]) -> None:
    """At 16 kHz, upsampled to dataset.features.sample_rate=22050, the 13 of 128 mel bands above
    8 kHz held nothing; the renderer now plays the notes at the features' rate."""
    from fewzero.train import compose_train_config

    assert compose_train_config(experiment, tmp_path).dataset.source.sample_rate == 16000
    cfg = compose_train_config([*experiment, "dataset.features.sample_rate=22050"], tmp_path)
    assert cfg.dataset.source.sample_rate == 22050


def test_omegaconf_config_gives_the_same_fingerprint(tmp_path: Path,
                                                     soundfont_file: Path) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    soundfonts = [str(soundfont_file)]
    cfg = omegaconf.OmegaConf.create({"instruments": TABLE, "soundfonts": soundfonts,
                                      "dynamics": {"pp": [20, 45]},
                                      "variation": {"noise_snr_db": [40, 50]}})
    plain = RenderedSOL(tmp_path, TABLE, soundfonts, dynamics={"pp": [20, 45]},
                        variation={"noise_snr_db": [40, 50]})
    hydra = RenderedSOL(tmp_path, cfg.instruments, cfg.soundfonts, dynamics=cfg.dynamics,
                        variation=cfg.variation)
    assert hydra.fingerprint() == plain.fingerprint()
    assert plain.fingerprint() != RenderedSOL(tmp_path, TABLE, soundfonts,
                                              dynamics={"pp": [20, 46]}).fingerprint()


def test_corrupt_soundfont_names_file_and_fix_with_worker_processes(tmp_path: Path) -> None:
    """The SoundFonts are loaded before the workers start: no bare BrokenProcessPool."""
    try:
        sol._import_fluidsynth()
    except ImportError as exc:
        pytest.skip(str(exc))
    garbage = tmp_path / "garbage.sf2"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    source = RenderedSOL(tmp_path, TABLE, [str(garbage)], **{**TINY, "num_workers": 2})
    with pytest.raises(RuntimeError, match="could not load the SoundFont") as info:
        source.prepare()
    assert str(garbage) in str(info.value)
    assert "dataset.source.soundfonts" in str(info.value)


def test_missing_libfluidsynth_gives_install_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fluidsynth", None)  # makes `import fluidsynth` fail
    with pytest.raises(ImportError, match="apt-get install fluidsynth") as info:
        sol._import_fluidsynth()
    assert "brew install fluid-synth" in str(info.value)


def test_fold_overlap_counts_held_out_clips_that_replay_a_trained_note() -> None:
    from conftest import load_script

    overlap = load_script("fold_overlap").overlap
    row = lambda fold, pitch, dyn, sf: {"instrument": "Oboe", "fold": str(fold), "pitch": str(pitch),  # noqa: E731
                                        "dynamics": dyn, "soundfont": sf}
    rows = [row(0, 60, "pp", "a"), row(1, 62, "ff", "b"),  # trained
            row(4, 60, "pp", "a"), row(4, 60, "ff", "a"), row(4, 62, "ff", "a"), row(4, 70, "pp", "a")]
    counts = overlap(rows, ["Oboe"], {4}, {0, 1, 2, 3})
    assert counts == {"clips": 4, "pitch": 3, "dynamic": 2, "soundfont": 1}
    assert overlap(rows, ["Flute"], {4}, {0, 1, 2, 3})["clips"] == 0


def test_fold_overlap_reads_a_render_folder_and_refuses_metadata_without_its_columns(
        tmp_path, monkeypatch, capsys) -> None:
    from conftest import load_script

    script = load_script("fold_overlap")
    header = "path,instrument,pitch,dynamics,fold,soundfont"
    rows = ["a.wav,Oboe,60,pp,0,x.sf2", "b.wav,Oboe,60,pp,4,y.sf2", "c.wav,Oboe,62,ff,3,x.sf2"]
    (tmp_path / "metadata.csv").write_text("\n".join([header, *rows]) + "\n")
    monkeypatch.setattr("sys.argv", ["fold_overlap.py", str(tmp_path)])  # the render's folder
    script.main()  # was IsADirectoryError's traceback
    table = capsys.readouterr().out
    assert "| test_seen: fold 4 vs folds 0-3 | 1 | 1 (100.0%) | 1 (100.0%) | 0 (0.0%) |" in table
    # without a soundfont column every clip "shared" the trained clips' (empty) SoundFont: 100%
    (tmp_path / "metadata.csv").write_text("\n".join(line.rsplit(",", 1)[0] for line in [header, *rows]))
    with pytest.raises(ValueError, match=r"metadata.csv has no column soundfont \(its columns: path, "
                                         r"instrument, pitch, dynamics, fold\): pass a render's"):
        script.main()
    # a few-shot split (train / val / test) stopped with OmegaConf's "Missing key seen" traceback
    monkeypatch.setattr("sys.argv", ["fold_overlap.py", str(tmp_path), "--split", "fsl_tutorial"])
    with pytest.raises(SystemExit):
        script.main()
    assert "argument --split: invalid choice: 'fsl_tutorial' (choose from 'image_audio', 'word_audio')" \
        in capsys.readouterr().err


def _spec(**overrides) -> sol._RenderSpec:
    """Render settings for the per-note functions (nothing is rendered)."""
    settings = {"dataset_dir": "", "soundfonts": ("a.sf2", "b.sf2"), "programs": (0,),
                "sample_rate": 16000, "clip_seconds": 0.5, "note_seconds": 0.3,
                "dynamics": {"pp": [20, 21]}, "variation": sol._parse_variation(None), "seed": 0,
                "silence_threshold_db": -60.0, **overrides}
    return sol._RenderSpec(**settings)


def test_note_variation_draws_span_their_whole_ranges() -> None:
    spec = _spec()
    draws = [sol._draw_variation(np.random.default_rng([0, i]), sol.Note(i, "Flute", 73, 69, "pp", 1, ""),
                                 spec) for i in range(300)]
    assert {d.velocity for d in draws} == {20, 21}  # both ends of the dynamic's velocity range
    assert {d.soundfont for d in draws} == {0, 1}
    cents = np.array([d.bend / sol._BEND_PER_CENT for d in draws])
    assert cents.min() < -10 and cents.max() > 10 and np.abs(cents).max() <= 15.0 + 0.1
    onsets = [d.onset for d in draws]  # max_onset_ms 40: up to 640 samples
    assert min(onsets) < 100 and 540 < max(onsets) <= 640
    gains = [d.gain_db for d in draws]
    assert min(gains) < -3 and max(gains) > 3


def test_finish_delays_the_note_by_its_onset_and_limits_its_peak() -> None:
    raw = np.sin(np.linspace(0, 400, 9000)).astype(np.float32)
    quiet = sol._Variation(0, 64, 0, onset=800, gain_db=0.0, snr_db=300.0)  # no audible noise
    audio = sol._finish(raw * 0.5, quiet, 8000, np.random.default_rng(0))
    assert audio.shape == (8000,) and np.abs(audio[:800]).max() < 1e-6
    np.testing.assert_allclose(audio[800:], raw[:7200] * 0.5, atol=1e-6)
    loud = sol._finish(raw * 4, quiet, 8000, np.random.default_rng(0))
    assert np.abs(loud).max() == pytest.approx(0.98)
