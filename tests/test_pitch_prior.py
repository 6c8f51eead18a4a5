"""The pitch-range prior: range likelihoods, its training loss, and its place in a zero-shot run."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_train_cfg, load_script, tone_overrides
from omegaconf import OmegaConf

from fewzero.data.features import MelFeatures, midi_to_hz
from fewzero.eval import evaluate
from fewzero.models.pitch_prior import FormantLikelihood, PitchRangePrior
from fewzero.train import train
from fewzero.zsl_evaluation import calibrate_stacking, topk_accuracy, true_class_log_likelihood

TABLE = {"low": {"range_low": 30, "range_high": 39}, "high": {"range_low": 40, "range_high": 49},
         "wide": {"range_low": 30, "range_high": 49}, "nameless": {"family": "brass"}}


def _prior(**kwargs) -> PitchRangePrior:
    return PitchRangePrior(audio_dim=2, table=TABLE, low_pitch=30, high_pitch=49, **kwargs)


def test_range_likelihood_is_uniform_inside_the_range_with_a_floor_outside():
    ranges = _prior(floor=0.01).range_likelihoods(["low", "wide"])
    assert ranges.shape == (2, 20)
    assert torch.allclose(ranges.sum(dim=1), torch.ones(2))
    low = ranges[0]
    assert torch.allclose(low[:10], torch.full((10,), 1.01 / 10.2))  # 10 pitches inside, 10 out
    assert torch.allclose(low[10:], torch.full((10,), 0.01 / 10.2))
    assert torch.allclose(ranges[1], torch.full((20,), 1 / 20))


def test_classes_without_a_range_or_outside_the_span_are_named():
    no_entry = r"The range table of model.pitch_prior has no entry for the class\(es\) \['nameless'\]"
    with pytest.raises(ValueError, match=no_entry) as err:
        _prior().range_likelihoods(["low", "nameless"])
    assert "Give each a row with range_low and range_high" in str(err.value)  # not a spelling hint
    assert "model.pitch_prior.table" in str(err.value) and "spelling" not in str(err.value)
    # beside GloVe, text or images the table is physical_facts.table, not side_info.table (which
    # those side informations do not have: a row put there broke their constructor)
    assert "physical_facts.table with model/pitch_prior=range_formant_attributes" in str(err.value)
    narrow = PitchRangePrior(audio_dim=2, table=TABLE, low_pitch=60, high_pitch=70)
    with pytest.raises(ValueError, match=r"\['low'\] lie outside pitch_prior's span 60..70"):
        narrow.range_likelihoods(["low"])
    with pytest.raises(ValueError, match="side_info=attributes"):
        PitchRangePrior(audio_dim=2, table=None)


def test_log_likelihood_of_a_certain_pitch_is_the_log_range_density():
    prior = _prior(floor=0.01, weight=0.5)
    with torch.no_grad():  # the head is sure of pitch 35 (index 5) for any input
        prior.pitch_head.weight.zero_()
        prior.pitch_head.bias.fill_(-50.0)
        prior.pitch_head.bias[5] = 50.0
    assert torch.equal(prior.predicted_pitches(torch.randn(4, 2)), torch.full((4,), 35))
    ranges = prior.range_likelihoods(["low", "high", "wide"])
    loglik = prior.log_likelihood(torch.randn(4, 2), ranges)
    expected = torch.tensor([math.log(1.01 / 10.2), math.log(0.01 / 10.2), math.log(1 / 20)])
    assert torch.allclose(loglik, expected.expand(4, 3), atol=1e-5)
    scores = torch.zeros(4, 3)
    assert torch.allclose(prior.adjust(scores, torch.randn(4, 2), ranges), 0.5 * expected.expand(4, 3),
                          atol=1e-5)


def test_pitch_loss_ignores_unknown_and_out_of_span_pitches():
    prior = _prior(loss_weight=2.0)
    audio = torch.randn(4, 2)
    known = prior.loss(audio[:2], torch.tensor([31, 45]))
    mixed = prior.loss(audio, torch.tensor([31, 45, -1, 90]))
    assert torch.allclose(mixed, known)
    expected = 2.0 * torch.nn.functional.cross_entropy(prior(audio[:2]), torch.tensor([1, 15]))
    assert torch.allclose(known, expected)
    assert float(prior.loss(audio, torch.full((4,), -1))) == 0.0


def test_detached_pitch_head_sends_no_gradient_to_the_encoder():
    audio = torch.randn(3, 2, requires_grad=True)
    _prior(detach=True).loss(audio, torch.tensor([30, 35, 40])).backward()
    assert audio.grad is None
    _prior(detach=False).loss(audio, torch.tensor([30, 35, 40])).backward()
    assert audio.grad is not None and float(audio.grad.abs().sum()) > 0


def _logged_scalars(run: Path, tag: str) -> list[float]:
    """Values of one TensorBoard scalar written anywhere under `run`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for folder in {p.parent for p in run.rglob("events.out.tfevents.*")}:
        events = EventAccumulator(str(folder))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values += [e.value for e in events.Scalars(tag)]
    return values


def _train_saving_config(tmp_path: Path, pitch_prior: str) -> tuple:
    """A zero-shot tones run (no refit) with `model/pitch_prior=<pitch_prior>` at the fixed weight
    0.1, its config saved where `fewzero.eval` looks. Returns (cfg, metrics, objects)."""
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio", f"model/pitch_prior={pitch_prior}",
                                       "model.pitch_prior.weight_candidates=null",
                                       "model.pitch_prior.class_cv=false", "dataset.refit_on_trainval=false"])
    (Path(cfg.paths.output_dir) / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, Path(cfg.paths.output_dir) / ".hydra" / "config.yaml")
    return cfg, *train(cfg)


def test_zsl_run_with_the_pitch_prior_trains_its_head_and_adds_it_to_every_score(tmp_path):
    cfg, metrics, objects = _train_saving_config(tmp_path, "range")
    model, dm = objects["model"], objects["datamodule"]
    assert isinstance(model.pitch_prior, PitchRangePrior)
    pitch_losses = _logged_scalars(Path(cfg.paths.output_dir), "train/pitch_loss")
    assert len(pitch_losses) >= 2 and all(0 < v < 20 for v in pitch_losses)  # every training step
    checkpoint = torch.load(metrics["test/checkpoint"], weights_only=False)
    assert "pitch_prior.pitch_head.weight" in checkpoint["state_dict"]
    # the test scores are the head's plus weight * the range log-likelihood
    model.eval()
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        audio = model.backbone(batch["x"])
        model._collected = [(audio, batch["label"], batch["index"], torch.zeros(len(audio)))]
        _, scores, _, _ = model._scores()
        plain = model.head(audio, model.side_matrix)
        ranges = model.pitch_prior.range_likelihoods(dm.class_names)
        expected = plain + 0.1 * model.pitch_prior.log_likelihood(audio, ranges)
    assert scores.keys() == {"zsl", "seen", "gzsl"}  # one weight, 0.1, in every setting
    assert all(torch.allclose(setting, expected, atol=1e-5) for setting in scores.values())
    assert not torch.allclose(scores["zsl"], plain, atol=1e-3)
    assert 0.0 <= metrics["test/zsl_top1"] <= 1.0
    # the pitch head's own test figure: exact pitches of the unseen clips, recomputed here
    unseen_clips = dm.indices["test_unseen"]
    with torch.no_grad():
        names = model.pitch_prior(model.backbone(
            dm.table.features[unseen_clips][:, :, dm.eval_offset:dm.eval_offset + dm.excerpt_frames]))
    exact = (names.argmax(dim=1) + model.pitch_prior.low_pitch == dm.table.pitches[unseen_clips]).float()
    assert metrics["test/pitch_exact_unseen"] == pytest.approx(float(exact.mean()), abs=1e-6)
    assert 0.0 <= metrics["test/pitch_exact_seen"] <= 1.0
    # fewzero.eval rebuilds the prior, loads its pitch head and scores other candidates with it
    _, evaluated = evaluate(Path(metrics["test/checkpoint"]), ["dataset.split.unseen=[Bassoon,Viola]"],
                            tmp_path / "eval")
    prior = evaluated["model"].pitch_prior
    assert torch.equal(prior.pitch_head.weight, model.pitch_prior.pitch_head.weight)
    assert evaluated["model"].range_likelihoods.shape == (9 + 2, prior.pitch_head.out_features)


def test_the_pitch_prior_needs_ranges_and_a_trained_head(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_word_audio", "model/pitch_prior=range"])
    with pytest.raises(Exception, match="side_info=attributes"):
        train(cfg)
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio", "model=eszsl",
                                       "model/pitch_prior=range"])
    with pytest.raises(Exception, match="needs a trained head"):
        train(cfg)


def test_another_side_information_borrows_the_attribute_tables_facts_for_its_prior(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_word_audio", "+trainer.fast_dev_run=true",
                                       "model/pitch_prior=range_formant_attributes"])
    assert cfg.side_info._target_.endswith("GloveVectors") and cfg.model.pitch_prior.class_cv
    (Path(cfg.paths.output_dir) / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, Path(cfg.paths.output_dir) / ".hydra" / "config.yaml")  # for fewzero.eval
    metrics, objects = train(cfg)
    model = objects["model"]
    attributes = OmegaConf.to_container(cfg.physical_facts.table)
    assert model.side_matrix.shape[1] == cfg.side_info.dim == 50  # the head learns GloVe vectors
    assert model.pitch_prior.ranges == {name: (row["range_low"], row["range_high"])
                                        for name, row in attributes.items()}
    assert model.pitch_prior.formants.bands["Bassoon"] == (440.0, 440.0)
    report = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert len(report["class_cv"]["folds"]) == 1  # fast_dev_run: fold 0 only
    assert report["zero_shot"]["prior_weight_zsl"] == pytest.approx(report["class_cv"]["zsl_weight"])
    # the saved config still finds the table (an interpolation into physical_facts)
    _, evaluated = evaluate(Path(metrics["test/checkpoint"]), ["dataset.split.unseen=[Bassoon,Viola]"],
                            tmp_path / "eval")
    assert evaluated["model"].pitch_prior.ranges == model.pitch_prior.ranges
    assert evaluated["model"].range_likelihoods.shape[0] == 9 + 2


# ---- the formant likelihood --------------------------------------------------------------
BANDS = {"narrow": {"formant_low": 440, "formant_high": 440},
         "low": {"formant_low": 230, "formant_high": 230},
         "band": {"formant_low": 220, "formant_high": 350}, "undocumented": {"family": "reeds"}}
MEL = MelFeatures(sample_rate=16000, n_fft=1024, hop_length=200, n_mels=128)


def test_formant_density_is_centred_on_the_harmonic_nearest_the_band():
    formants = FormantLikelihood(BANDS, MEL, scale=0.5)  # 2 * scale = 1: the log normaliser is 0
    # MIDI 57 = 220 Hz: its 2nd harmonic lies on the 440 Hz band (an interval of width 0)
    dens = formants.log_density(torch.tensor([440.0, 880.0, 220.0]), torch.tensor([57]), ["narrow"])
    assert dens.shape == (3, 1, 1)
    assert torch.allclose(dens[:, 0, 0], torch.tensor([0.0, -2 * math.log(2), -2 * math.log(2)],
                                                      dtype=torch.float64), atol=1e-6)
    # MIDI 69 = 440 Hz, above the 230 Hz band: the fundamental is expected, anywhere from the band
    # up to it is flat; below the band the tail falls off
    width = math.log(440 / 230)
    dens = formants.log_density(torch.tensor([440.0, 300.0, 200.0]), torch.tensor([69]), ["low"])[:, 0, 0]
    expected = torch.tensor([0.0, 0.0, -2 * math.log(230 / 200)], dtype=torch.float64) - math.log(1 + width)
    assert torch.allclose(dens, expected, atol=1e-6)
    # MIDI 45 = 110 Hz: harmonics 220 and 330 lie in the 220-350 band; flat over the band
    dens = formants.log_density(torch.tensor([300.0, 500.0]), torch.tensor([45]), ["band"])[:, 0, 0]
    width = math.log(350 / 220)
    assert torch.allclose(dens, torch.tensor([0.0, -2 * math.log(500 / 350)], dtype=torch.float64)
                          - math.log(1 + width), atol=1e-6)


def test_a_class_without_a_formant_gets_the_mean_density_of_the_training_classes_documented_ones():
    formants = FormantLikelihood(BANDS, MEL, scale=0.3)
    peaks, pitches = torch.tensor([150.0, 440.0, 1200.0]), torch.tensor([40, 57, 70])
    names = ["narrow", "low", "band", "undocumented"]
    with pytest.raises(RuntimeError, match=r"\['undocumented'\] have no documented formant.*call it"):
        formants.log_density(peaks, pitches, names)
    # "band" is no training class (an unseen one, say): its formant must not reach the mean
    formants.fit_scale(peaks, pitches, ["narrow", "low", "undocumented"])
    dens = formants.log_density(peaks, pitches, names)
    assert dens.shape == (3, 3, 4)
    mean = dens[..., :2].exp().mean(dim=-1).log()
    assert torch.allclose(dens[..., 3], mean)
    assert not torch.allclose(dens[..., 0], dens[..., 1])
    moved = FormantLikelihood({**BANDS, "band": {"formant_low": 900, "formant_high": 1500}}, MEL, scale=0.3)
    moved.fit_scale(peaks, pitches, ["narrow", "low", "undocumented"])
    assert torch.equal(moved.log_density(peaks, pitches, names)[..., 3], dens[..., 3])
    formants.fit_scale(peaks, pitches, ["undocumented"] * 3)  # no documented training class
    with pytest.raises(ValueError, match=r"no training class has one to stand for them"):
        formants.log_density(peaks, pitches, names)


def test_spectral_peak_is_the_centre_of_the_loudest_mel_band():
    log_mel = torch.full((2, 128, 5), -10.0)
    log_mel[0, 17] = 0.0
    log_mel[1, 90, :2] = 1.0  # loud in two frames only: still the highest mean power
    log_mel[1, 40] = -1.0
    centres = MEL.mel_centres_hz().float()
    assert torch.equal(FormantLikelihood(BANDS, MEL).spectral_peaks(log_mel), centres[[17, 90]])
    with pytest.raises(ValueError, match=r"\(batch, 128, frames\)"):
        FormantLikelihood(BANDS, MEL).spectral_peaks(torch.zeros(2, 64, 5))


def test_fitted_scale_is_the_maximum_likelihood_on_documented_clips_of_known_pitch():
    generator = torch.Generator().manual_seed(0)
    true_scale, n = 0.3, 4000
    noise = torch.distributions.Laplace(0.0, true_scale).sample((n,))
    peaks = 440.0 * noise.exp()  # MIDI 57: the 440 Hz band sits on its 2nd harmonic
    # clips the fit must ignore: an undocumented class and an unknown pitch, with wild peaks
    wild = 4000.0 * torch.rand(20, generator=generator) + 50
    formants = FormantLikelihood(BANDS, MEL)
    scale = formants.fit_scale(torch.cat([peaks, wild]), torch.cat([torch.full((n,), 57),
                                                                   torch.tensor([57] * 10 + [-1] * 10)]),
                               ["narrow"] * n + ["undocumented"] * 10 + ["narrow"] * 10)
    assert scale == pytest.approx(float(noise.abs().mean()), rel=0.07)  # the grid's resolution
    assert scale == pytest.approx(true_scale, rel=0.1)
    assert float(formants.scale) == scale
    fixed = FormantLikelihood(BANDS, MEL, scale=0.2)
    assert fixed.fit_scale(peaks, torch.full((n,), 57), ["narrow"] * n) == pytest.approx(0.2)


def test_formant_likelihood_errors_name_the_fix():
    with pytest.raises(ValueError, match="'bad' needs 0 < formant_low <= formant_high"):
        FormantLikelihood({"bad": {"formant_low": 500, "formant_high": 300}}, MEL)
    with pytest.raises(ValueError, match="none was found"):
        FormantLikelihood({"a": {"family": "brass"}}, MEL)
    with pytest.raises(RuntimeError, match="not fitted yet"):
        FormantLikelihood(BANDS, MEL).log_density(torch.tensor([300.0]), torch.tensor([50]), ["low"])
    with pytest.raises(ValueError, match="No training clip"):
        FormantLikelihood(BANDS, MEL).fit_scale(torch.tensor([300.0]), torch.tensor([50]), ["undocumented"])


def test_joint_log_likelihood_of_a_certain_pitch_adds_range_and_formant_densities():
    table = {name: {**TABLE.get(name, TABLE["wide"]), **row} for name, row in BANDS.items()}
    formants = FormantLikelihood(table, MEL, scale=0.4)
    formants.fit_scale(torch.tensor([440.0]), torch.tensor([57]), ["narrow"])  # names the training class
    prior = PitchRangePrior(audio_dim=2, table=table, low_pitch=30, high_pitch=49, formants=formants)
    with torch.no_grad():  # the head is sure of pitch 35 (index 5) for any input
        prior.pitch_head.weight.zero_()
        prior.pitch_head.bias.fill_(-50.0)
        prior.pitch_head.bias[5] = 50.0
    names = ["narrow", "low", "undocumented"]
    peaks = torch.tensor([180.0, 440.0])
    ranges = prior.range_likelihoods(names)
    densities = prior.formant_log_densities(peaks, names)
    assert densities.shape == (2, 20, 3)
    loglik = prior.log_likelihood(torch.randn(2, 2), ranges, densities)
    at_35 = formants.log_density(peaks, torch.tensor([35]), names)[:, 0]
    assert torch.allclose(loglik.double(), ranges[:, 5].double().log()[None] + at_35, atol=1e-4)
    assert midi_to_hz(torch.tensor([69, 57])).tolist() == pytest.approx([440.0, 220.0])


def test_zsl_run_with_the_formant_prior_fits_its_scale_on_training_clips_only(tmp_path):
    _, metrics, objects = _train_saving_config(tmp_path, "range_formant")
    model, dm = objects["model"], objects["datamodule"]
    formants = model.pitch_prior.formants
    assert isinstance(formants, FormantLikelihood) and 0 < float(formants.scale) < 4
    # the scale is what a fit on the training role's clips alone gives
    train_clips = dm.indices["train"]
    assert not torch.isin(dm.labels[train_clips], torch.tensor(dm.ids(dm.unseen))).any()
    window = slice(dm.eval_offset, dm.eval_offset + dm.excerpt_frames)
    refit = FormantLikelihood(model.side_info.table, dm.features)
    peaks = refit.spectral_peaks(dm.table.features[train_clips, :, window])
    assert refit.fit_scale(peaks, dm.table.pitches[train_clips],
                           [dm.table.instruments[i] for i in train_clips.tolist()]) == float(formants.scale)
    # test scores: head + 0.1 * log sum_p p(p | clip) p(p | class) p(peak | p, class)
    model.eval()
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        model._collect(batch)
        audio = model.backbone(batch["x"])
        _, scores, _, _ = model._scores()
        ranges = model.pitch_prior.range_likelihoods(dm.class_names)
        densities = formants.log_density(formants.spectral_peaks(batch["x"]),
                                         torch.arange(21, 109), dm.class_names)
        joint = (model.pitch_prior(audio).log_softmax(dim=1)[:, :, None].double()
                 + ranges.T.double().log()[None] + densities).logsumexp(dim=1)
        expected = model.head(audio, model.side_matrix) + 0.1 * joint.float()
        range_only = model.pitch_prior.adjust(model.head(audio, model.side_matrix), audio, ranges)
    assert all(torch.allclose(setting, expected, atol=1e-4) for setting in scores.values())
    assert not torch.allclose(scores["zsl"], range_only, atol=1e-3)
    assert 0.0 <= metrics["test/zsl_top1"] <= 1.0
    # fewzero.eval rebuilds the prior and fits the same scale again
    _, evaluated = evaluate(Path(metrics["test/checkpoint"]), [], tmp_path / "eval")
    assert float(evaluated["model"].pitch_prior.formants.scale) == float(formants.scale)


def test_prior_weight_of_each_setting_is_chosen_on_validation_and_kept_by_the_refit(tmp_path):
    candidates = [0.0, 0.5, 5.0]
    overrides = ["experiment=zsl_attribute_audio", f"model.pitch_prior.weight_candidates={candidates}",
                 "model.pitch_prior.class_cv=false"]  # one validation fold chooses (class CV: test_zsl_refit)
    metrics, objects = train(compose_train_cfg(tmp_path / "selected", [*overrides,
                                                                      "dataset.refit_on_trainval=false"]))
    model, dm = objects["model"], objects["datamodule"]  # the best checkpoint's state after testing
    model.eval()

    def head_and_prior(loader):
        with torch.no_grad():
            for batch in loader:
                model._collect(batch)
            _, head, prior, labels, _ = model._gathered_scores()
        return head, prior, labels

    # each setting's choice, recomputed from the validation clips' scores: the best, and among
    # equally good weights the one nearest the configured 0.1
    head, prior, labels = head_and_prior(dm.val_dataloader())
    train_ids, pseudo = model.ids["train"], model.ids["pseudo_unseen"]
    is_pseudo = torch.isin(labels, torch.tensor(pseudo))
    assert model.pitch_prior.zsl_score == "log_likelihood"  # the experiment's: ZSL by log-likelihood
    zsl = [true_class_log_likelihood((head + w * prior)[is_pseudo], labels[is_pseudo], pseudo)
           for w in candidates]
    seen = [topk_accuracy((head + w * prior)[~is_pseudo], labels[~is_pseudo], train_ids) for w in candidates]
    gzsl = [calibrate_stacking(head + w * prior, labels, train_ids, pseudo) for w in candidates]

    def best(values: list[float]) -> float:
        return min((w for w, v in zip(candidates, values, strict=True) if v == max(values)),
                   key=lambda w: abs(w - 0.1))

    expected = {"zsl": best(zsl), "seen": best(seen), "gzsl": best([g.h for g in gzsl])}
    for setting, weight in expected.items():
        assert model.pitch_prior.weight_for(setting) == weight == metrics[f"test/prior_weight_{setting}"]
    assert model.pitch_prior.validation_scores[0].tolist() == pytest.approx(zsl)
    assert all(v <= 0.0 for v in zsl)  # log-probabilities
    assert float(model.calibration_gamma) == pytest.approx(gzsl[candidates.index(expected["gzsl"])].gamma)
    assert not torch.allclose(head, head + 5.0 * prior)  # the candidates really score differently
    # the test's ZSL and seen figures use their own setting's weight
    head, prior, labels = head_and_prior(dm.test_dataloader())
    unseen_ids = model.ids["unseen"]
    is_unseen = torch.isin(labels, torch.tensor(unseen_ids))
    assert metrics["test/zsl_top1"] == pytest.approx(topk_accuracy(
        (head + expected["zsl"] * prior)[is_unseen], labels[is_unseen], unseen_ids))
    assert metrics["test/seen_top1"] == pytest.approx(topk_accuracy(
        (head + expected["seen"] * prior)[~is_unseen], labels[~is_unseen], model.ids["seen"]))

    # with the refit, the tested model keeps the selected checkpoint's weights and penalty
    metrics, objects = train(compose_train_cfg(tmp_path / "refit", overrides))
    report = json.loads((Path(objects["cfg"].paths.output_dir) / "metrics.json").read_text())
    selected = torch.load(report["refit_on_trainval"]["selected_checkpoint"], weights_only=False)
    final = torch.load(report["refit_on_trainval"]["checkpoint"], weights_only=False)
    for key in ("pitch_prior.weights", "calibration_gamma"):
        assert torch.equal(final["state_dict"][key], selected["state_dict"][key])
    chosen = selected["state_dict"]["pitch_prior.weights"].tolist()
    assert [report["zero_shot"][f"prior_weight_{s}"] for s in ("zsl", "seen", "gzsl")] == chosen
    assert set(chosen) <= set(candidates)


def test_choosing_a_weight_keeps_the_configured_one_where_validation_cannot_tell():
    prior = _prior(weight=0.1, weight_candidates=[0.0, 0.05, 0.2, 0.4])
    assert prior.choose_weight("zsl", lambda w: {0.0: 0.5, 0.05: 0.6, 0.2: 0.7, 0.4: 0.6}[w]) == 0.2
    assert prior.choose_weight("seen", lambda w: 1.0) == 0.05  # all tie: nearest 0.1, then the smaller
    assert prior.choose_weight("gzsl", lambda w: float(w >= 0.2)) == 0.2
    assert prior.validation_scores.tolist() == [[0.5, 0.6, 0.7, 0.6], [1.0] * 4, [0.0, 0.0, 1.0, 1.0]]
    assert prior.validation_scores.dtype == torch.float64  # ties are exact
    assert prior.choose_from_scores(torch.tensor([0.9, 0.2, 0.9, 0.95])) == 0.4
    assert prior.choose_from_scores(torch.tensor([0.2, 0.9, 0.9, 0.9])) == 0.05
    with pytest.raises(ValueError, match="one score per weight candidate"):
        prior.choose_from_scores(torch.tensor([0.9, 0.2]))
    with pytest.raises(ValueError, match="NaN"):
        prior.choose_from_scores(torch.tensor([0.9, float("nan"), 0.1, 0.2]))
    with pytest.raises(ValueError, match="class_cv chooses among weight_candidates"):
        _prior(class_cv=True)
    with pytest.raises(ValueError, match="weight_candidates is not set"):
        _prior().choose_weight("zsl", lambda w: 1.0)
    with pytest.raises(ValueError, match="weight_candidates is empty"):
        _prior(weight_candidates=[])
    with pytest.raises(ValueError, match=r"zsl_score must be one of \['top1', 'log_likelihood'\]"):
        _prior(zsl_score="accuracy")
    # were named pitch_prior.*, a key the config does not have; a nan weight was accepted
    for wrong in ({"weight": -1.0}, {"weight": float("nan")}, {"weight_candidates": [0.1, float("nan")]},
                  {"loss_weight": float("nan")}):
        with pytest.raises(ValueError, match=r"model.pitch_prior needs weight >= 0"):
            _prior(**wrong)


def test_a_checkpoint_from_before_the_weight_buffer_loads_with_the_configured_weight(tmp_path):
    cfg, metrics, _ = _train_saving_config(tmp_path, "range")
    checkpoint = torch.load(metrics["test/checkpoint"], weights_only=False)
    del checkpoint["state_dict"]["pitch_prior.weights"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    eval_metrics, evaluated = evaluate(old, [], tmp_path / "eval",
                                       run_config=Path(cfg.paths.output_dir) / ".hydra" / "config.yaml")
    assert evaluated["model"].pitch_prior.weights.tolist() == pytest.approx([0.1] * 3)
    assert eval_metrics["test/zsl_top1"] == pytest.approx(metrics["test/zsl_top1"])


def test_prior_in_training_adds_the_weighted_prior_to_the_training_scores_without_gradient(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio", "model.pitch_prior.in_training=true",
                                       "model.pitch_prior.class_cv=false", "model.pitch_prior.loss_weight=0",
                                       "dataset.refit_on_trainval=false", "test=false"])
    _, objects = train(cfg)
    model, dm = objects["model"], objects["datamodule"]
    batch = next(iter(dm.train_dataloader()))
    seen = {}  # what the loss scored and the encoder embedded in this training step

    def keep(name, value):  # a forward hook returning None leaves the output as it is
        seen[name] = value.detach()

    model.loss.register_forward_hook(lambda module, inputs, output: keep("scores", inputs[0]))
    model.backbone.register_forward_hook(lambda module, inputs, output: keep("audio", output))
    model.log = lambda *args, **kwargs: None  # no trainer loop to log into
    model.train()
    model.zero_grad()
    model.training_step(batch, 0).backward()
    train_ids = model.ids["train"]
    with torch.no_grad():
        audio = seen["audio"]
        formants = model.pitch_prior.formants
        densities = formants.log_density(formants.spectral_peaks(batch["x"]), torch.arange(21, 109),
                                         [dm.class_names[i] for i in train_ids])
        ranges = model.pitch_prior.range_likelihoods([dm.class_names[i] for i in train_ids])
        prior = model.pitch_prior.log_likelihood(audio, ranges, densities)
        expected = model.head(audio, model.train_side()) + 0.1 * prior
    torch.testing.assert_close(seen["scores"], expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(prior, prior.mean(dim=1, keepdim=True))  # the prior tells classes apart
    # with the pitch loss weighted 0, no gradient reaches the pitch head through the prior's term
    grad = model.pitch_prior.pitch_head.weight.grad
    assert grad is None or not grad.any()
    assert any(p.grad is not None and p.grad.any() for p in model.head.parameters())


def test_envelope_features_measure_a_known_attack_and_a_flat_sustain():
    folds_script = load_script("zsl_prior_folds")
    frames = torch.arange(81, dtype=torch.float64)
    power = ((frames + 1) / 20).clamp(max=1.0)          # linear power ramp over 20 frames, then flat
    log_mel = power.log()[None, None].expand(2, 16, 81).clone()
    log_mel[1] += torch.linspace(-2, 0, 16)[:, None]     # a tilted spectrum: not flat
    features = folds_script.envelope_features(log_mel, frames_per_second=80.0)
    assert features.shape == (2, 9)
    # 10% of the peak first exceeded at frame 2 (3/20), 90% at frame 18 (19/20), 50% at frame 10
    assert features[0, 0].item() == pytest.approx(16 / 80) and features[0, 1].item() == pytest.approx(8 / 80)
    assert abs(features[0, 2].item()) < 1e-9            # sustain slope
    assert features[0, 5].item() == pytest.approx(0.0, abs=1e-9)   # a flat spectrum's flatness
    assert features[1, 5].item() < -0.1


def test_attribute_expert_favours_the_clips_own_value_and_is_neutral_on_an_unknown_one():
    folds_script = load_script("zsl_prior_folds")
    values = np.array(["brass"] * 40 + ["strings"] * 40 + ["woodwinds"] * 20)
    features = np.random.default_rng(0).normal(size=(100, 2))
    features[:, 0] += np.where(values == "brass", 3.0, np.where(values == "strings", -3.0, 0.0))
    train = np.arange(100) % 2 == 0
    held = ~train & (values != "woodwinds")
    ratio = folds_script.expert_log_ratio(features, values, train & (values != "woodwinds"), held,
                                          ["brass", "strings", "woodwinds"])
    assert ratio.shape == (held.sum(), 3)
    truth = (values[held] == "strings").astype(int)
    assert (ratio[:, :2].argmax(axis=1) == truth).mean() > 0.9
    assert np.all(ratio[:, 2] == 0.0)  # no training clip has this value


def test_prior_folds_script_scores_the_prior_on_every_class_cv_fold_of_seen_clips(tmp_path):
    folds_script = load_script("zsl_prior_folds")
    overrides = [o for o in tone_overrides(tmp_path, zero_shot=True, clips_per_class=20)
                 if not o.startswith(("+trainer.enable_progress_bar", "~callbacks.progress_bar"))]
    rows, found = folds_script.fold_scores("zsl_attribute_audio", "family", [0.0, 1.0], overrides)
    assert list(rows)[:2] == ["range", "range + formant"]
    assert {"+ envelope family expert", "+ spectrum family expert", "+ both family expert"} <= set(rows)
    for name, per_weight in rows.items():
        assert len(per_weight) == (2 if "expert" in name else 1)
        assert all(len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores) for scores in per_weight)
    # at w = 0 an expert adds nothing: the prior alone
    assert rows["+ envelope family expert"][0] == rows["range + formant"][0]
    # every fold class whose family another seen class shares (the accordion's is its own)
    assert set(found["spectrum"]) == {"Oboe", "Trombone", "Cello", "Clarinet in Bb", "French Horn",
                                      "Contrabass", "Flute"}
    assert all(0.0 <= share <= 1.0 for share in found["envelope"].values())


def test_transposed_training_scales_each_excerpt_and_moves_its_pitch_label_as_much(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio", "model.transpose_semitones=5",
                                       "model.pitch_prior.class_cv=false", "dataset.refit_on_trainval=false",
                                       "test=false"])
    _, objects = train(cfg)
    model, dm = objects["model"], objects["datamodule"]
    batch = next(iter(dm.train_dataloader()))
    seen = {}  # what this training step transposed, encoded and gave the pitch loss
    transposed, pitch_loss = model._transposed, model.pitch_prior.loss

    def keep(name, value):  # returns None: a forward hook then leaves the output as it is
        seen[name] = value

    model._transposed = lambda x: seen.setdefault("transposed", transposed(x))
    model.backbone.register_forward_hook(lambda module, inputs, output: keep("input", inputs[0]))
    model.pitch_prior.loss = lambda audio, pitches: keep("pitches", pitches) or pitch_loss(audio, pitches)
    model.augment = torch.nn.Identity()
    model.log = lambda *args, **kwargs: None  # no trainer loop to log into
    model.train()
    model.training_step(batch, 0)
    x, semitones = seen["transposed"]
    assert semitones.abs().max() <= 5 and semitones.unique().numel() > 1
    torch.testing.assert_close(x, dm.features.scale_frequency(batch["x"], 2.0 ** (semitones.double() / 12)))
    assert torch.equal(seen["input"], x)  # the encoder sees the transposed excerpts
    metadata = dm.table.pitches[batch["index"]]
    assert (metadata >= 0).any()
    expected = torch.where(metadata >= 0, metadata + semitones, metadata)
    assert torch.equal(seen["pitches"], expected)
    for wrong in (-1, 1.5, True):  # 1.5 and True were taken as 1 semitone
        with pytest.raises(ValueError, match=rf"model.transpose_semitones={wrong}: must be a whole number"):
            type(model)(model.backbone, model.head, model.loss, model.side_info, model.optimizer_factory,
                        transpose_semitones=wrong)
