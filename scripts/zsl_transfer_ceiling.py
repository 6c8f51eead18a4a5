"""How far can zero-shot transfer go on a frozen audio encoder, per side information?

Embeds every clip with the encoder of a checkpoint (a few-shot run, for example), fits a
multinomial logistic regression on the seen classes' training clips (folds 0-3, every seen class:
the refit protocol), and scores unseen clips with ConSE: the side vector of the seen class a clip
sounds most like (top-1), or the probability-weighted mix of all seen classes' vectors. When the
seen classifier is nearly perfect, what is left of the unseen error is the disagreement between
what an unseen instrument sounds like and what its side information is near; the table shows it
per unseen class (its acoustic neighbour among the seen classes against its side-information
neighbour). For the attribute table it also tries direct attribute prediction (DAP; Lampert et
al., 2009), which does not go through the seen classes: one logistic regression per attribute
column, and an unseen clip goes to the unseen class whose attributes are the most probable.
It also scores the pitch-range prior of `model/pitch_prior=range` (`fewzero.models.pitch_prior`)
on the same encoder: a pitch probe (logistic regression on the seen training clips' metadata
pitches), the classes' documented ranges alone, and ConSE T=all plus the range log-likelihood
(weight 0.1, the default), and the same two with the formant likelihood of
`model/pitch_prior=range_formant` (each clip's spectral peak against each class's documented main
formant, its scale fitted on the seen training clips). With `--remove-pitch K` every number
is computed on embeddings from which the K leading directions of a linear pitch probe (fitted
on the seen training clips) have been projected out: does the seen class an unseen instrument
sounds like change once register is taken away? Unseen clips are only ever scored; nothing is
fitted or chosen on them. The checkpoint's run must not have read fold 4, where the seen classes
are tested (`check_init_checkpoint` refuses it otherwise): train it with dataset.folds=[0,1,2,3].

    .venv/bin/python -m fewzero.train dataset.folds=[0,1,2,3] hydra.run.dir=outputs/fsl_folds0123
    .venv/bin/python scripts/zsl_transfer_ceiling.py outputs/fsl_folds0123/checkpoints/last.ckpt
    .venv/bin/python scripts/zsl_transfer_ceiling.py CKPT --experiments zsl_word_audio
    .venv/bin/python scripts/zsl_transfer_ceiling.py CKPT --remove-pitch 8
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import hydra
import torch

from fewzero.cli import run_script
from fewzero.models.pitch_prior import FormantLikelihood, PitchRangePrior
from fewzero.models.zeroshot_module import check_init_checkpoint, check_init_source
from fewzero.side_info.attributes import AttributeTable, encode_attribute_table
from fewzero.train import CONFIG_DIR, compose_train_config
from fewzero.zsl_evaluation import topk_accuracy


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float = 1e-3
                 ) -> torch.nn.Linear:
    """Multinomial logistic regression, L2-regularised, full-batch L-BFGS. x: (n, d), y: (n,)."""
    layer = torch.nn.Linear(x.shape[1], n_classes)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(x), y) + weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return layer


@torch.no_grad()
def embed(backbone: torch.nn.Module, features: torch.Tensor, start: int, frames: int) -> torch.Tensor:
    """(n_clips, n_mels, n_frames) log-mel -> (n_clips, audio_dim), the evaluation excerpt."""
    backbone.eval()
    return torch.cat([backbone(chunk[:, :, start:start + frames]) for chunk in features.split(256)])


def dap_log_likelihood(audio: torch.Tensor, labels: torch.Tensor, train: torch.Tensor,
                       seen: list[int], attributes: torch.Tensor) -> torch.Tensor:
    """Direct attribute prediction: for each binary attribute column that varies among the
    seen classes, a logistic regression on the seen training clips; a class's score is the sum
    of the log-probabilities of its own attribute values.

    Args:
        audio: (n_clips, d) standardised embeddings; labels: (n_clips,) class ids.
        train: indices of the seen training clips; seen: seen class ids.
        attributes: (n_classes, n_columns) 0/1 attribute matrix.
    Returns:
        (n_clips, n_classes) log-likelihood of every class's attributes.
    """
    scores = torch.zeros(len(audio), len(attributes))
    for column in attributes.long().T:  # (n_classes,)
        if column[seen].min() == column[seen].max():
            continue  # the seen classes cannot teach this column
        classifier = fit_logistic(audio[train], column[labels[train]], 2)
        with torch.no_grad():
            scores += classifier(audio).log_softmax(dim=1)[:, column]
    return scores


def fit_pitch_probe(audio: torch.Tensor, pitches: torch.Tensor, train: torch.Tensor,
                    prior: PitchRangePrior) -> torch.nn.Linear:
    """A logistic regression over the prior's pitch classes, fitted on the seen training clips
    whose metadata pitch lies in its span. audio: (n_clips, d); pitches: (n_clips,) MIDI."""
    known = train[(pitches[train] >= prior.low_pitch) & (pitches[train] <= prior.high_pitch)]
    return fit_logistic(audio[known], pitches[known] - prior.low_pitch, prior.pitch_head.out_features)


def remove_pitch_directions(audio: torch.Tensor, pitches: torch.Tensor, train: torch.Tensor,
                            k: int) -> torch.Tensor:
    """Project the k leading directions of a linear pitch probe out of the embeddings.

    Args:
        audio: (n_clips, d) standardised embeddings; pitches: (n_clips,) MIDI metadata pitches.
        train: seen training clip indices, the probe's only data.
    Returns:
        (n_clips, d) embeddings orthogonal to the probe's k strongest (centred) weight directions.
    """
    weights = fit_pitch_probe(audio, pitches, train, PitchRangePrior(audio.shape[1], {})).weight.detach()
    directions = torch.linalg.svd(weights - weights.mean(0), full_matrices=False).Vh[:k]  # (k, d)
    return audio - (audio @ directions.T) @ directions


def pitch_range_cells(audio: torch.Tensor, pitches: torch.Tensor, labels: torch.Tensor,
                      train: torch.Tensor, test_unseen: torch.Tensor, unseen: list[int],
                      table: dict, class_names: list[str], conse_scores: torch.Tensor,
                      formants: FormantLikelihood, peaks: torch.Tensor) -> list[str]:
    """The pitch-range prior on a frozen encoder: [share of unseen clips whose pitch the probe
    gets exactly, unseen top-1 from the ranges alone, unseen top-1 of ConSE + the prior, the same
    two with the formant likelihood].

    Args:
        audio: (n_clips, d) standardised embeddings; pitches, labels: (n_clips,).
        train: seen training clip indices (the probe's and the formant scale's only data);
            test_unseen: unseen clips.
        conse_scores: (n_clips, n_classes) ConSE T=all cosine scores.
        formants: an unfitted formant likelihood; peaks: (n_clips,) spectral peaks in Hz.
    """
    prior = PitchRangePrior(audio.shape[1], table, formants=formants)
    prior.pitch_head = fit_pitch_probe(audio, pitches, train, prior)
    formants.fit_scale(peaks[train], pitches[train], [class_names[int(c)] for c in labels[train]])
    ranges = prior.range_likelihoods(class_names)
    densities = prior.formant_log_densities(peaks, class_names)
    with torch.no_grad():
        exact = prior.predicted_pitches(audio[test_unseen]) == pitches[test_unseen]
        scored = [prior.log_likelihood(audio, ranges), prior.adjust(conse_scores, audio, ranges),
                  prior.log_likelihood(audio, ranges, densities),
                  prior.adjust(conse_scores, audio, ranges, densities)]
    y = labels[test_unseen]
    return [f"{exact.float().mean():.3f}",
            *(f"{topk_accuracy(scores[test_unseen], y, unseen):.3f}" for scores in scored)]


def ceiling(checkpoint: Path, experiment: str, overrides: list[str], remove_pitch: int = 0
            ) -> tuple[list[str], list[str]]:
    """One experiment's row and per-unseen-class lines (Markdown)."""
    cfg = compose_train_config([f"experiment={experiment}", "dataset.refit_on_trainval=false",
                                "dataset.train_on=trainval", f"model.init_checkpoint={checkpoint}",
                                *overrides], "outputs/ceiling")
    check_init_source(cfg)
    dm = hydra.utils.instantiate(cfg.dataset)
    dm.prepare_data()
    dm.setup("fit")
    check_init_checkpoint(checkpoint, dm)
    model = hydra.utils.instantiate(cfg.model, init_checkpoint=str(checkpoint))
    audio = embed(model.backbone, dm.table.features, dm.eval_offset, dm.excerpt_frames)
    seen, unseen = dm.ids(dm.seen), dm.ids(dm.unseen)
    train, test_seen, test_unseen = (dm.indices[r] for r in ("train", "test_seen", "test_unseen"))
    mean, std = audio[train].mean(0), audio[train].std(0) + 1e-6
    audio = (audio - mean) / std  # standardised on training clips only
    if remove_pitch:
        audio = remove_pitch_directions(audio, dm.table.pitches, train, remove_pitch)
    to_seen = {c: i for i, c in enumerate(seen)}
    y_train = torch.tensor([to_seen[int(c)] for c in dm.labels[train]])
    classifier = fit_logistic(audio[train], y_train, len(seen))
    side = torch.nn.functional.normalize(model.side_info.vectors(dm.class_names, fit_on=dm.seen).mean,
                                         dim=1)

    with torch.no_grad():
        probs = classifier(audio).softmax(dim=1)  # (n_clips, n_seen)
    seen_scores = torch.full((len(audio), len(dm.class_names)), -1.0)
    seen_scores[:, seen] = probs
    seen_top1 = topk_accuracy(seen_scores[test_seen], dm.labels[test_seen], seen)
    top1_vector = side[seen][probs.argmax(dim=1)]            # ConSE with T = 1
    mixed_vector = probs @ side[seen]                         # ConSE with T = every seen class
    dap, pitch_cells = "n/a", ["n/a"] * 5
    if isinstance(model.side_info, AttributeTable):
        table = model.side_info
        binary, _ = encode_attribute_table(table.table, table.categorical, ())
        scores = dap_log_likelihood(audio, dm.labels, train, seen,
                                    torch.stack([binary[name] for name in dm.class_names]))
        dap = f"{topk_accuracy(scores[test_unseen], dm.labels[test_unseen], unseen):.3f}"
        formants = FormantLikelihood(table.table, dm.features)
        window = slice(dm.eval_offset, dm.eval_offset + dm.excerpt_frames)
        peaks = formants.spectral_peaks(dm.table.features[:, :, window])
        pitch_cells = pitch_range_cells(audio, dm.table.pitches, dm.labels, train, test_unseen,
                                        unseen, table.table, dm.class_names, mixed_vector @ side.T,
                                        formants, peaks)
    rows = [f"| {experiment} | {seen_top1:.3f} | "
            + " | ".join(f"{topk_accuracy(v[test_unseen] @ side.T, dm.labels[test_unseen], unseen):.3f}"
                         for v in (top1_vector, mixed_vector)) + f" | {dap} | " + " | ".join(pitch_cells)
            + " |"]
    lines = []
    nearest_seen = (side[unseen] @ side[seen].T).argmax(dim=1)
    for i, c in enumerate(unseen):
        clips = test_unseen[dm.labels[test_unseen] == c]
        votes = Counter(int(k) for k in probs[clips].argmax(dim=1))
        acoustic, count = votes.most_common(1)[0]
        lines.append(f"| {experiment} | {dm.class_names[c]} | {dm.class_names[seen[acoustic]]} "
                     f"({count / len(clips):.0%}) | {dm.class_names[seen[int(nearest_seen[i])]]} |")
    return rows, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="fewzero checkpoint whose encoder is used")
    parser.add_argument("--experiments", nargs="+", metavar="EXPERIMENT",
                        default=["zsl_word_audio", "zsl_text_audio", "zsl_attribute_audio"],
                        choices=sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("zsl_*.yaml")),
                        help="zero-shot audio experiments (configs/experiment/zsl_*); Hydra "
                             "overrides go before it")
    parser.add_argument("--remove-pitch", type=int, default=0, metavar="K",
                        help="project the K leading pitch-probe directions out of the embeddings")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every experiment")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, lines = [], []
    for experiment in args.experiments:
        experiment_rows, experiment_lines = ceiling(args.checkpoint, experiment, args.overrides,
                                                      args.remove_pitch)
        rows += experiment_rows
        lines += experiment_lines
    print("| experiment | seen top-1 (logistic regression) | unseen top-1, ConSE T=1 | "
          "unseen top-1, ConSE T=all | unseen top-1, DAP | unseen pitch exact (probe) | "
          "unseen top-1, ranges alone | unseen top-1, ConSE T=all + pitch-range prior | "
          "unseen top-1, ranges + formants alone | unseen top-1, ConSE T=all + range and formant "
          "prior |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print("\n| experiment | unseen class | sounds most like (share of its clips) | "
          "nearest seen class by side information |\n| --- | --- | --- | --- |")
    print("\n".join(lines))


if __name__ == "__main__":
    run_script(main)
