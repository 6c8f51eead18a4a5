"""Does validation rank zero-shot recipes as the test does? Rank correlations over finished runs.

Each argument is one recipe's benchmark folder (`<out>/<recipe>`, holding `seed*/metrics.json`
from `scripts/benchmark_zsl.py`). For every recipe the script prints the mean over seeds of
- the class cross-validation score at the chosen ZSL weight (the score that chose the weight;
  needs `model.pitch_prior.class_cv=true`) and val H (the score that chose the checkpoint),
- unseen per-class top-1 and calibrated H on the test,
then Spearman's rank correlation of class CV with unseen top-1 and of val H with H, over the
recipes and over single runs. A protocol whose validation predicts the test gives correlations
near +1.

A second table asks whether validation agrees with itself: each pseudo-unseen fold's score (at
the chosen weight, mean over seeds) ranks the recipes, and the rank correlation of every pair
of folds, and of each fold with the mean of the others, shows whether a recipe's rank holds
from one set of held-out classes to another. Where it does not, no set of classes, the test's
five included, can be expected to rank the recipes as another does.

This reads test figures. Use it after the decisions, to judge the validation protocol, never to
choose a recipe.

    .venv/bin/python scripts/zsl_validation_vs_test.py outputs/benchmarks/zsl_all_s16_1500/attribute_ours \\
        outputs/benchmarks/zsl_heads_s19_1500/attribute_conse ...
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fewzero.cli import run_script
from fewzero.report import collect


def recipe_runs(folder: Path) -> list[dict[str, float]]:
    """One dict per seed of a recipe folder: class_cv, val_h, unseen, h, and fold<k> (the class-CV
    score of each pseudo-unseen fold at the chosen weight)."""
    runs = []
    for path in sorted(folder.glob("seed*/metrics.json")):
        report = json.loads(path.read_text())
        cv = report.get("class_cv")
        if not cv:
            raise SystemExit(f"{path} has no class cross-validation: its recipe needs "
                             "model.pitch_prior.class_cv=true.")
        chosen = cv["candidates"].index(cv["zsl_weight"])
        runs.append({"class_cv": cv["mean_scores"][chosen], "val_h": report["metrics"]["val/acc_best"],
                     "unseen": report["zero_shot"]["zsl_top1"], "h": report["zero_shot"]["gzsl_cs_h"],
                     **{f"fold{k}": scores[chosen] for k, scores in enumerate(cv["fold_scores"])}})
    if not runs:
        raise SystemExit(f"No seed*/metrics.json under {folder}: run scripts/benchmark_zsl.py first.")
    configs, unfinished = collect(folder)
    if unfinished:  # a correlation over the seeds that finished would pass for one over all
        raise SystemExit(f"Runs in {folder} have no results of their present settings (failed, or "
                         f"unfinished): {', '.join(map(str, unfinished))}. Finish them (run "
                         "scripts/benchmark_zsl.py again with the same --out) or move them out.")
    settings = [c.label for c in configs]  # the runs' overrides but the seed (and data, checkpoint)
    if len(settings) > 1:  # e.g. seeds added to an --out later, with another --max-steps
        raise SystemExit(f"The runs in {folder} differ in more than the seed ({' | '.join(settings)}): "
                         "a recipe's mean is over seeds of one setting; pass folders whose runs share it.")
    return runs


def check_same_folds(folders: list[Path]) -> None:
    """Exit unless every run's class cross-validation held out the same classes in each fold
    (metrics.json's "class_cv" -> "folds"), so that fold k is one set of classes for every
    recipe: recipes of one split."""
    first: dict[str, Path] = {}
    for path in (p for folder in folders for p in sorted(folder.glob("seed*/metrics.json"))):
        first.setdefault(json.dumps(json.loads(path.read_text())["class_cv"]["folds"]), path)
    if len(first) > 1:
        held_out = "; ".join(f"{json.loads(folds)} in {path}" for folds, path in first.items())
        raise SystemExit(f"The runs' class cross-validations hold out other classes ({held_out}): "
                         "compare recipes of one split.")


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in order[start:end + 1]:
            result[position] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (Pearson's on the ranks); needs 3 or more pairs. nan where
    one side is constant (a fold on which every recipe scores alike ranks nothing)."""
    if len(x) != len(y) or len(x) < 3:
        raise SystemExit(f"A rank correlation needs 3 or more pairs; got {len(x)}: pass more recipes.")
    if len(set(x)) == 1 or len(set(y)) == 1:
        return float("nan")
    return statistics.correlation(ranks(x), ranks(y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", type=Path, help="benchmark folders <out>/<recipe>")
    args = parser.parse_args()
    runs = {folder: recipe_runs(folder) for folder in args.recipes}
    check_same_folds(args.recipes)
    means = {folder: {key: statistics.mean(run[key] for run in rs) for key in rs[0]}
             for folder, rs in runs.items()}
    lines = ["| recipe | seeds | class-CV score | val H | unseen top-1 (test) | H (test) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for folder, m in means.items():
        lines.append(f"| {folder.parent.name}/{folder.name} | {len(runs[folder])} | {m['class_cv']:.3f} | "
                     f"{m['val_h']:.3f} | {m['unseen']:.3f} | {m['h']:.3f} |")
    every = [run for rs in runs.values() for run in rs]
    lines += ["", "| Spearman rank correlation | over recipes | over runs |", "| --- | --- | --- |"]
    for label, validation, test in (("class-CV score ~ unseen top-1", "class_cv", "unseen"),
                                     ("val H ~ H", "val_h", "h")):
        by_recipe = spearman([m[validation] for m in means.values()], [m[test] for m in means.values()])
        by_run = spearman([r[validation] for r in every], [r[test] for r in every])
        lines.append(f"| {label} | {by_recipe:+.2f} ({len(means)}) | {by_run:+.2f} ({len(every)}) |")
    lines += ["", *fold_agreement(list(runs.values()))]
    print("\n".join(lines))


def fold_agreement(runs: list[list[dict[str, float]]]) -> list[str]:
    """Table lines (validation figures only; `runs`: each recipe's runs from `recipe_runs`, whose
    folds `check_same_folds` has found alike):
    Spearman's rank correlation over recipes between every pair of class-CV folds' mean scores,
    and between each fold and the mean of the others; then, per fold (and for unseen top-1), the
    spread of the recipes' means beside the seed noise of a mean, sqrt(mean seed variance / n
    seeds): where the two are alike, that fold's ranking is mostly noise."""
    folds = sorted((key for key in runs[0][0] if key.startswith("fold")), key=lambda k: int(k[4:]))
    column = {key: [statistics.mean(run[key] for run in recipe) for recipe in runs]
              for key in [*folds, "unseen"]}
    lines = ["| class-CV folds (validation only) | Spearman over recipes |", "| --- | --- |"]
    for i, a in enumerate(folds):
        for b in folds[i + 1:]:
            lines.append(f"| {a} ~ {b} | {spearman(column[a], column[b]):+.2f} |")
    for fold in folds:
        rest = [statistics.mean(column[f][r] for f in folds if f != fold) for r in range(len(runs))]
        lines.append(f"| {fold} ~ mean of the others | {spearman(column[fold], rest):+.2f} |")
    lines += ["", "| score | sd of the recipes' means | seed sd of a recipe's mean |", "| --- | --- | --- |"]
    for key in column:
        noise = statistics.mean(statistics.variance([run[key] for run in recipe]) / len(recipe)
                                for recipe in runs) if all(len(r) > 1 for r in runs) else float("nan")
        label = "unseen top-1 (test)" if key == "unseen" else key
        lines.append(f"| {label} | {statistics.stdev(column[key]):.3f} | {noise ** 0.5:.3f} |")
    return lines


if __name__ == "__main__":
    run_script(main)
