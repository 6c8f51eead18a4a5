"""Which class cross-validation score chooses the prior's ZSL weight better: validation only.

Two benchmark recipes that differ only in `model.pitch_prior.zsl_score` (`attribute_top1cv`:
pseudo-unseen top-1, `attribute_ours`: log-likelihood) train identical models for a seed (same
configs, seed and selected number of steps), so their metrics.json hold both scores of every
candidate weight on every pseudo-unseen fold ("class_cv" -> "fold_scores"). Leave one fold out:
choose the weight by a score's mean over the other folds (`best_candidate`, as the module
chooses), then read pseudo-unseen top-1 on the held-out fold at that weight. The better score
is the one whose choices carry over to classes it did not see. No test figure is read. Prints
one Markdown table.

    .venv/bin/python scripts/benchmark_zsl.py --threads 1 --max-steps 1500 \\
        --recipes attribute_top1cv attribute_ours --out outputs/benchmarks/zsl_x
    .venv/bin/python scripts/zsl_weight_criteria.py outputs/benchmarks/zsl_x/attribute_top1cv \\
        outputs/benchmarks/zsl_x/attribute_ours
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fewzero.cli import run_script
from fewzero.models.pitch_prior import best_candidate
from fewzero.train import compose_train_config


def class_cv_report(run: Path) -> dict:
    """The "class_cv" entry of one run's metrics.json; a clear error where it has none."""
    path = run / "metrics.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run scripts/benchmark_zsl.py for this recipe first.")
    report = json.loads(path.read_text()).get("class_cv")
    if not report:
        raise SystemExit(f"{path} has no class cross-validation (model.pitch_prior.class_cv=true).")
    return report


def mean_over(folds: list[list[float]]) -> list[float]:
    return [statistics.mean(column) for column in zip(*folds, strict=True)]


def leave_one_fold_out(top1: list[list[float]], score: list[list[float]], candidates: list[float],
                       a_priori: float) -> list[tuple[float, float]]:
    """For every fold k: (the weight `score` chooses on the other folds, top-1 on fold k at it)."""
    result = []
    for k in range(len(top1)):
        weight = best_candidate(candidates, mean_over(score[:k] + score[k + 1:]), a_priori)
        result.append((weight, top1[k][candidates.index(weight)]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("top1_recipe", type=Path, help="benchmark folder of the zsl_score=top1 recipe")
    parser.add_argument("other_recipe", type=Path, help="the same recipe, another zsl_score")
    parser.add_argument("--a-priori-weight", type=float, default=None,
                        help="model.pitch_prior.weight (default: experiment=zsl_attribute_audio's)")
    parser.add_argument("--candidates", type=float, nargs="+", default=None,
                        help="the weight candidates, for runs whose metrics.json does not list them "
                             "(before session 14; default: experiment=zsl_attribute_audio's)")
    args = parser.parse_args()
    if args.a_priori_weight is None or args.candidates is None:
        prior = compose_train_config(["experiment=zsl_attribute_audio"], ".").model.pitch_prior
        args.a_priori_weight = prior.weight if args.a_priori_weight is None else args.a_priori_weight
        args.candidates = list(prior.weight_candidates) if args.candidates is None else args.candidates

    seeds = sorted(p.name for p in args.top1_recipe.glob("seed*") if (args.other_recipe / p.name).is_dir())
    if not seeds:
        raise SystemExit(f"No seed folder is in both {args.top1_recipe} and {args.other_recipe}.")
    lines = ["| seed | steps | score | weight (all folds) | held-out fold: weight (top-1) | "
             "leave-one-fold-out top-1 |", "| --- | --- | --- | --- | --- | --- |"]
    totals: dict[str, list[float]] = {}
    for seed in seeds:
        top1, other = (class_cv_report(r / seed) for r in (args.top1_recipe, args.other_recipe))
        for report in (top1, other):
            report.setdefault("candidates", args.candidates)
        if top1.get("score", "top1") != "top1":
            raise SystemExit(f"{args.top1_recipe / seed} scored weights by {top1['score']}, not top1.")
        if other.get("score", "top1") == "top1":  # its rows and mean would merge with top1's
            raise SystemExit(f"{args.other_recipe / seed} scored weights by top1 as well: the second "
                             "recipe must score them another way (model.pitch_prior.zsl_score, e.g. "
                             "attribute_ours's log_likelihood).")
        if (top1["folds"], top1["steps"], top1["candidates"]) != (other["folds"], other["steps"],
                                                                  other["candidates"]):
            raise SystemExit(f"{seed}: the two runs differ in folds, selected steps or candidates, so "
                             "their fold models are not the same: compare runs of one recipe and seed.")
        candidates = top1["candidates"]
        for name, report in (("top1", top1), (other.get("score", "top1"), other)):
            scores = report["fold_scores"]
            held_out = leave_one_fold_out(top1["fold_scores"], scores, candidates, args.a_priori_weight)
            mean = statistics.mean(t for _, t in held_out)
            totals.setdefault(name, []).extend(t for _, t in held_out)
            lines.append(f"| {seed} | {top1['steps']} | {name} | "
                         f"{best_candidate(candidates, mean_over(scores), args.a_priori_weight):g} | "
                         + ", ".join(f"{w:g} ({t:.3f})" for w, t in held_out) + f" | {mean:.3f} |")
    lines.append("")
    lines += [f"mean leave-one-fold-out top-1, {name}: {statistics.mean(v):.3f} over {len(v)} held-out folds"
              for name, v in totals.items()]
    print("\n".join(lines))


if __name__ == "__main__":
    run_script(main)
