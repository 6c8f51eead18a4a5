"""The one-screen summary printed at the end of a run: results and where everything is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fewzero.data.sol import fluidsynth_version
from fewzero.models.pitch_prior import SETTINGS, ZSL_SCORES


def class_cv_outcome(cv: dict[str, Any]) -> str:
    """What class cross-validation (metrics.json's `class_cv`) did with the ZSL weight: chose it,
    or, where every weight scored the same (`undecided`), kept the one nearest the configured."""
    folds = f"{len(cv['folds'])} fold{'' if len(cv['folds']) == 1 else 's'}"
    score = f"{ZSL_SCORES[cv.get('score', 'top1')]} {max(cv['mean_scores']):.4f}"
    if cv.get("undecided"):
        return (f"ZSL weight {cv['zsl_weight']:g}, nearest the configured weight: class "
                f"cross-validation over {folds} scored every weight the same ({score})")
    return f"ZSL weight {cv['zsl_weight']:g} by class cross-validation over {folds} (mean {score})"


def trivially_right(n_unseen: int | None) -> str:
    """A note for the ZSL figures that cannot be wrong with `n_unseen` candidates (top-3 among
    at most 3, top-1 among 1), or ""."""
    if n_unseen is None or n_unseen > 3:
        return ""
    if n_unseen == 1:
        return " (one unseen candidate: always right)"
    return f" (top-3 among {n_unseen} candidates: always right)"


def print_summary(output_dir: Path, report: dict[str, Any]) -> None:
    """Print test accuracies (mean +- 95% CI), the best validation score and the run's paths."""
    console = Console()
    if report.get("fast_dev_run"):  # before the figures it qualifies
        console.print(f"trainer.fast_dev_run: {report['fast_dev_run']}", style="bold yellow",
                      markup=False)
    table = Table(title=f"fewzero results ({report.get('dataset', '')})")
    table.add_column("protocol")
    table.add_column("accuracy", justify="right")
    table.add_column("95% CI", justify="right")
    table.add_column("episodes", justify="right")
    for name, result in report.get("test_episodes", {}).items():
        table.add_row(name, f"{result['mean_acc']:.4f}", f"+-{result['ci95']:.4f}",
                      str(result["n_episodes"]))
    if table.row_count:
        console.print(table)
    zero_shot = report.get("zero_shot")
    if zero_shot:
        def value(key: str) -> str:  # with its 95% interval from the test clips, where reported
            ci = zero_shot.get(f"{key}_ci95")
            return f"{zero_shot[key]:.4f}" + (f" +-{ci:.3f}" if ci is not None else "")

        # how many candidates each setting chose among (a split of one's own may have few: ZSL
        # among 3 unseen classes always has the right one in its top 3)
        n = {side: len(zero_shot[side]) for side in ("seen", "unseen") if side in zero_shot}
        n["all"] = sum(n.values()) if len(n) == 2 else None

        def among(side: str) -> str:
            return side if n.get(side) is None else f"{side} ({n[side]})"

        zsl = Table(title="zero-shot (per-class mean top-1; +- 95% interval over the test clips)")
        zsl.add_column("setting")
        zsl.add_column("candidates")
        zsl.add_column("result", justify="right")
        zsl.add_row("ZSL", among("unseen"), f"top-1 {value('zsl_top1')}, top-3 {value('zsl_top3')}"
                    + trivially_right(n.get("unseen")))
        zsl.add_row("seen", among("seen"), f"top-1 {value('seen_top1')}")
        for name, prefix in (("GZSL", "gzsl"), ("GZSL calibrated", "gzsl_cs")):
            zsl.add_row(name, among("all"), ", ".join(f"{label} {value(f'{prefix}_{label.lower()}')}"
                                                      for label in "usH"))
        # a training run whose validation had one side only (no pseudo-unseen classes or no
        # held-out seen fold) chose no penalty: it logged no calibrated validation H. A test
        # alone (fewzero.eval) logs no validation: it says why its checkpoint's run chose none
        validated = report.get("metrics", {})
        unchosen = report.get("penalty_not_chosen") or (
            "validation had no pseudo-unseen or no held-out seen clips"
            if "val/acc_best" in validated and "val/gzsl_cs_h" not in validated else None)
        zsl.add_row("", "", f"penalty {zero_shot['calibration_gamma']:.4f} "
                    + (f"(not chosen: {unchosen})" if unchosen else "(from validation)"))
        if "prior_weight_zsl" in zero_shot:
            zsl.add_row("", "", "prior weight: " + ", ".join(
                f"{s} {zero_shot[f'prior_weight_{s}']:.3g}" for s in SETTINGS))
        cv = report.get("class_cv")
        if cv:
            zsl.add_row("", "", class_cv_outcome(cv))
        console.print(zsl)
    best = report.get("metrics", {}).get("val/acc_best")
    if best is not None:
        # an accuracy for few-shot runs, but zero-shot runs select on the calibrated GZSL H (or
        # on a top-1 where validation has one side only): name the metric, not what it measures
        console.print(f"best validation score (val/acc_best): {best:.4f}")
    # Paths are printed as they are, to be copied: never broken at the console's width (rich
    # would insert newlines), and never read as markup (a run directory named after its
    # overrides may hold `tags=[bold]`, which rich would swallow as a style).
    data = report.get("data")
    if data:
        console.print(f"{'data':<14}: {data['dir']} (FluidSynth {fluidsynth_version(data)})",
                      markup=False, soft_wrap=True)
    plots = output_dir / "plots"  # none with model.plot_dir=null: no PNG was written
    for label, text in (("run directory", output_dir), ("metrics", output_dir / "metrics.json"),
                        ("plots", plots if plots.is_dir() else "-"),
                        ("checkpoint", report.get("checkpoint") or "-"),
                        # this run alone; a folder above it (outputs/) shows it beside the others
                        ("tensorboard", f"tensorboard --logdir {output_dir / 'tensorboard'}")):
        console.print(f"{label:<14}: {text}", markup=False, soft_wrap=True)
