"""Would another expert help the pitch prior? A validation-only check on the class-CV folds.

The prior of `model/pitch_prior=range_formant` transfers to unseen instruments because it
compares what a clip measurably is (its pitch, where its spectrum peaks) with documented facts
of each class. This script scores that prior alone on each pseudo-unseen fold of a ZSL
experiment's split (`datamodule.class_cv_folds`), every clip at its metadata pitch, and with one
candidate expert more: a logistic regression that predicts an attribute column (the instrument
family, by default) from features of the clip, fitted on the other seen classes, whose
likelihood ratio p(value | clip) / p(value) is added with weight w:

    score(clip, class) = log p(pitch | range) + log p(peak | pitch, formant)
                         + w * log [p(attribute of class | clip) / p(attribute of class)]

A fold class whose attribute value no training class has gets 0 from the expert. Three feature
sets: `envelope` (how the note starts and is sustained: attack times, sustain slope and
roughness, spectral flatness and centroid at the onset against the sustain), `spectrum` (the
time-averaged log-mel spectrum), and both. Only seen classes' clips outside the test fold are
read: no unseen or test clip. Per fold: per-class mean top-1 among the fold's classes; then, per
fold class, how often the expert alone gives the clip's own attribute value its highest
likelihood ratio.

    .venv/bin/python scripts/zsl_prior_folds.py
    .venv/bin/python scripts/zsl_prior_folds.py --attribute excitation --weights 0 0.5 1
"""

from __future__ import annotations

import argparse
import math

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fewzero.cli import run_script
from fewzero.models.pitch_prior import FormantLikelihood, PitchRangePrior
from fewzero.train import compose_train_config
from fewzero.zsl_evaluation import topk_accuracy


def first_frame_above(relative_db: torch.Tensor, level: float) -> torch.Tensor:
    """(n, frames) log power relative to each clip's peak -> (n,) first frame above `level`."""
    frames = torch.arange(relative_db.shape[1]).expand_as(relative_db)
    return torch.where(relative_db > level, frames, relative_db.shape[1]).min(dim=1).values


def envelope_features(log_mel: torch.Tensor, frames_per_second: float) -> torch.Tensor:
    """How each note starts and is sustained, from its excerpt's log-mel power.

    Args:
        log_mel: (n, n_mels, frames) natural-log mel power; frames_per_second: its frame rate.
    Returns:
        (n, 9): attack 10-90% and 10-50% of the peak frame power (s), sustain slope (nepers/s)
        and its residual std, onset and sustain spectral flatness and their difference, onset
        minus sustain spectral centroid (mel bands), sustain centroid std.
    """
    log_mel = log_mel.double()
    energy = log_mel.logsumexp(dim=1)                                   # (n, frames)
    relative = energy - energy.max(dim=1, keepdim=True).values
    a10, a50, a90 = (first_frame_above(relative, math.log(level)) for level in (0.1, 0.5, 0.9))
    power = log_mel.exp()
    flatness = log_mel.mean(dim=1) - power.mean(dim=1).log()            # (n, frames), <= 0
    bands = torch.arange(log_mel.shape[1], dtype=log_mel.dtype)
    centroid = (power * bands[:, None]).sum(dim=1) / power.sum(dim=1)   # (n, frames)
    rows = []
    for i in range(len(log_mel)):
        onset = slice(int(a10[i]), int(a90[i]) + 1)
        sustain = slice(min(int(a90[i]) + 5, log_mel.shape[2] - 3), log_mel.shape[2])
        t = torch.arange(log_mel.shape[2], dtype=log_mel.dtype)[sustain] / frames_per_second
        design = torch.stack([torch.ones_like(t), t], dim=1)
        coef = torch.linalg.lstsq(design, relative[i, sustain, None]).solution[:, 0]
        residual = relative[i, sustain] - design @ coef
        rows.append([float(a90[i] - a10[i]) / frames_per_second, float(a50[i] - a10[i]) / frames_per_second,
                     float(coef[1]), float(residual.std()), float(flatness[i, onset].mean()),
                     float(flatness[i, sustain].mean()),
                     float(flatness[i, onset].mean() - flatness[i, sustain].mean()),
                     float(centroid[i, onset].mean() - centroid[i, sustain].mean()),
                     float(centroid[i, sustain].std())])
    return torch.tensor(rows)


def expert_log_ratio(features: np.ndarray, values: np.ndarray, train: np.ndarray, held: np.ndarray,
                     class_values: list[str]) -> np.ndarray:
    """log p(value | clip) / p(value) of each candidate class's attribute value.

    Args:
        features: (n, k) per-clip features; values: (n,) each clip's attribute value.
        train, held: boolean masks (n,) of the clips to fit on and to score.
        class_values: the attribute value of each candidate class.
    Returns:
        (held.sum(), len(class_values)); 0 for a value no training clip has.
    """
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
    model.fit(features[train], values[train])
    known = list(model.classes_)
    probability = model.predict_proba(features[held])
    frequency = np.array([np.mean(values[train] == v) for v in known])
    columns = [np.log(probability[:, known.index(v)] / frequency[known.index(v)]) if v in known
               else np.zeros(int(held.sum())) for v in class_values]
    return np.stack(columns, axis=1)


def per_class_top1(scores: np.ndarray, labels: np.ndarray) -> float:
    """Per-class mean top-1 (`topk_accuracy`): scores (n, n_classes), labels (n,) in 0..n_classes-1."""
    return topk_accuracy(torch.from_numpy(scores), torch.from_numpy(labels), range(scores.shape[1]))


def fold_scores(experiment: str, attribute: str, weights: list[float], overrides: list[str]
                ) -> tuple[dict[str, list[list[float]]], dict[str, dict[str, float]]]:
    """({row name: [[fold 0 top-1, fold 1, ...] per weight]} for the prior alone and with each
    feature set's expert (rows `range`, `range + formant`, `+ <features> <attribute> expert`),
    {feature set: {fold class: share of its clips whose own value has the expert's highest
    likelihood ratio among the training classes' values}} for the fold classes whose value
    those have)."""
    cfg = compose_train_config([f"experiment={experiment}", *overrides], "outputs/prior_folds")
    if cfg.model.get("pitch_prior") is None:
        raise ValueError(f"experiment={experiment} has no pitch prior: add the override "
                         "model/pitch_prior=range_formant_attributes (or use zsl_attribute_audio).")
    dm = hydra.utils.instantiate(cfg.dataset)
    dm.prepare_data()
    dm = dm.for_trainval()  # every seen class, every fold but the test fold
    dm.setup("fit")
    clips = dm.indices["train"]
    dm.assert_clean(clips, training=True)  # no unseen-class or test-fold clip
    window = slice(dm.eval_offset, dm.eval_offset + dm.excerpt_frames)
    log_mel = dm.table.features[clips][:, :, window].float()
    names = np.array([dm.table.instruments[i] for i in clips.tolist()])
    pitches = dm.table.pitches[clips]
    table = OmegaConf.to_container(cfg.model.pitch_prior.table, resolve=True)
    missing = sorted({str(v) for v in names} - set(table))
    if missing or any(attribute not in table[n] for n in set(names)):
        raise ValueError(f"The pitch prior's table needs a row with {attribute!r} for every seen class "
                         f"(missing rows: {missing}); use a ZSL experiment with the prior.")
    formants = FormantLikelihood(table, dm.features)
    prior = PitchRangePrior(1, table, formants=formants)
    peaks = formants.spectral_peaks(log_mel)
    known_pitch = (pitches >= prior.low_pitch) & (pitches <= prior.high_pitch)
    features = {"envelope": envelope_features(log_mel, dm.features.frames_per_second).numpy(),
                "spectrum": log_mel.exp().mean(dim=2).clamp_min(1e-6).log().numpy()}
    features["both"] = np.hstack([features["envelope"], features["spectrum"]])
    values = np.array([str(table[n][attribute]) for n in names])
    rows: dict[str, list[list[float]]] = {}
    found: dict[str, dict[str, float]] = {kind: {} for kind in features}
    for fold in dm.class_cv_folds:
        train = ~np.isin(names, fold) & known_pitch.numpy()
        held = np.isin(names, fold) & known_pitch.numpy()
        formants.scale.fill_(float("nan"))
        formants.fit_scale(peaks[train], pitches[train], list(names[train]))
        at = (pitches[held] - prior.low_pitch).long()
        ranges = prior.range_likelihoods(fold).double().log().T[at]                 # (m, classes)
        peak = formants.log_density(peaks[held], prior.pitches, fold)[torch.arange(len(at)), at]
        labels = np.array([fold.index(n) for n in names[held]])
        base = (ranges + peak).numpy()
        rows.setdefault("range", []).append([per_class_top1(ranges.numpy(), labels)])
        rows.setdefault("range + formant", []).append([per_class_top1(base, labels)])
        class_values = [str(table[n][attribute]) for n in fold]
        known = sorted(set(values[train]))
        for kind, x in features.items():
            # one fit: the fold classes' values, then every training value (for `found`)
            ratios = expert_log_ratio(x, values, train, held, class_values + known)
            ratio = ratios[:, :len(fold)]
            rows.setdefault(f"+ {kind} {attribute} expert", []).append(
                [per_class_top1(base + w * ratio, labels) for w in weights])
            likeliest = np.array(known)[ratios[:, len(fold):].argmax(axis=1)]
            for name in fold:
                own = names[held] == name
                if class_values[fold.index(name)] in known:
                    found[kind][name] = float(np.mean(likeliest[own] == values[held][own]))
    return ({name: [list(col) for col in zip(*per_fold, strict=True)] for name, per_fold in rows.items()},
            found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="zsl_attribute_audio")
    parser.add_argument("--attribute", default="family", help="attribute column the expert predicts")
    parser.add_argument("--weights", nargs="+", type=float, default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_args()
    rows, found = fold_scores(args.experiment, args.attribute, args.weights, args.overrides)
    n_folds = len(rows["range"][0])
    print(f"| {args.experiment}, prior alone at the metadata pitch | w | "
          + " | ".join(f"fold {k}" for k in range(n_folds)) + " | mean |")
    print("| --- " * (n_folds + 3) + "|")
    for name, per_weight in rows.items():
        for w, scores in zip(args.weights if "expert" in name else ["-"], per_weight, strict=False):
            print(f"| {name} | {w} | " + " | ".join(f"{s:.3f}" for s in scores)
                  + f" | {np.mean(scores):.3f} |")
    classes = list(next(iter(found.values())))
    print(f"\n| clips whose own {args.attribute} the expert rates highest | " + " | ".join(classes) + " |")
    print("| --- " * (len(classes) + 1) + "|")
    for kind, shares in found.items():
        print(f"| {kind} | " + " | ".join(f"{shares[c]:.2f}" for c in classes) + " |")


if __name__ == "__main__":
    run_script(main)
