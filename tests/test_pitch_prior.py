"""The pitch-range prior: range likelihoods, its training loss, and its place in a zero-shot run."""

import math
from pathlib import Path

import pytest
import torch
from conftest import compose_train_cfg
from omegaconf import OmegaConf

from fewzero.eval import evaluate
from fewzero.models.pitch_prior import PitchRangePrior
from fewzero.train import train

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
    with pytest.raises(ValueError, match=r"Unknown pitch_prior.table class with a range.*'nameless'"):
        _prior().range_likelihoods(["low", "nameless"])
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


def test_zsl_run_with_the_pitch_prior_trains_its_head_and_adds_it_to_every_score(tmp_path):
    cfg = compose_train_cfg(tmp_path, ["experiment=zsl_attribute_audio", "model/pitch_prior=range",
                                       "dataset.refit_on_trainval=false"])
    (Path(cfg.paths.output_dir) / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, Path(cfg.paths.output_dir) / ".hydra" / "config.yaml")
    metrics, objects = train(cfg)
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
        model._collected = [(audio, batch["label"], batch["index"])]
        _, scores, _, _ = model._scores()
        plain = model.head(audio, model.side_matrix)
        ranges = model.pitch_prior.range_likelihoods(dm.class_names)
        expected = plain + 0.1 * model.pitch_prior.log_likelihood(audio, ranges)
    assert torch.allclose(scores, expected, atol=1e-5)
    assert not torch.allclose(scores, plain, atol=1e-3)
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
