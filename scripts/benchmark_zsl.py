"""Zero-shot benchmark: the tutorial's recipe next to ours, and every side information.

Each recipe is trained and tested with several seeds on identical splits and evaluation clips
(rendered SOL by default); the table reports mean +- std over seeds of per-class top-1:
seen (seen test fold, seen candidates), unseen (ZSL, unseen candidates) and GZSL u, s, H (all
candidates; calibrated stacking with the penalty chosen on validation data, and H without it),
next to the validation score that selected the checkpoint (calibrated H on the held-out fold and
the pseudo-unseen classes), which is what may choose between recipes. With
`dataset.refit_on_trainval` (the default) the tested model is the refit on every seen class for
the selected number of steps. Prints one Markdown table and writes it (plus JSON, with each run's
wall time) to outputs/benchmarks/zsl_<time>/.

    .venv/bin/python scripts/benchmark_zsl.py                         # 3 seeds, every recipe
                                                  # (each at its experiment's own trainer.max_steps)
    .venv/bin/python scripts/benchmark_zsl.py --max-steps 300 --recipes word_tutorial word_ours
    .venv/bin/python scripts/benchmark_zsl.py --out outputs/benchmarks/zsl_x   # reuse its finished runs
                                                  # (and resume one a stop left unfinished)
    .venv/bin/python scripts/benchmark_zsl.py --recipes word_ours word_devise word_bilinear
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException

from fewzero.cli import (
    device_name,
    naming_the_run,
    output_folder,
    positive_int,
    run_script,
    table_in_the_way,
    training_seed,
)
from fewzero.train import compose_train_config, course_changes, save_run_overrides, train

ROOT = Path(__file__).resolve().parents[1]
# name -> (row label, overrides). "tutorial" = siamese network + triplet loss, as the tutorial.
RECIPES: dict[str, tuple[str, list[str]]] = {
    "word_tutorial": ("word-audio (GloVe 50-d), tutorial: siamese + triplet",
                      ["experiment=zsl_word_audio", "model=siamese", "loss=triplet"]),
    "word_ours": ("word-audio (GloVe 50-d), ours: DeViSE + InfoNCE + ConSE",
                  ["experiment=zsl_word_audio"]),
    "image_tutorial": ("image-audio (EfficientNet-Lite0), tutorial: siamese + triplet",
                       ["experiment=zsl_image_audio", "model=siamese", "loss=triplet",
                        "model.pitch_prior=null"]),
    "image_ours": ("image-audio (EfficientNet-Lite0), ours: DeViSE + InfoNCE + ConSE + the attribute "
                   "table's pitch-range and formant prior", ["experiment=zsl_image_audio"]),
    "text_ours": ("text-audio (MiniLM descriptions), ours: DeViSE + InfoNCE + ConSE",
                  ["experiment=zsl_text_audio"]),
    "attribute_ours": ("attribute-audio (attribute table), ours: DeViSE + InfoNCE + pitch-range and "
                       "formant prior, weight per setting chosen on validation, ZSL's by class "
                       "cross-validation", ["experiment=zsl_attribute_audio"]),
    "attribute_top1cv": ("attribute-audio (attribute table), as ours, class cross-validation scoring "
                         "the ZSL weight by pseudo-unseen top-1 (before session 15)",
                         ["experiment=zsl_attribute_audio", "model.pitch_prior.zsl_score=top1"]),
    "attribute_timbre": ("attribute-audio (attribute table without register and range), DeViSE + "
                         "InfoNCE + pitch-range and formant prior, as ours",
                         ["experiment=zsl_attribute_audio", "side_info=attributes_timbre"]),
    "attribute_poe": ("attribute-audio (attribute table), as ours, the head trained with the prior "
                      "added to its scores (product of experts)",
                      ["experiment=zsl_attribute_audio", "model.pitch_prior.in_training=true"]),
    "attribute_transpose6": ("attribute-audio (attribute table), as ours, trained on excerpts transposed "
                             "by up to 6 semitones", ["experiment=zsl_attribute_audio",
                                                      "model.transpose_semitones=6"]),
    "attribute_transpose12": ("attribute-audio (attribute table), as ours, trained on excerpts "
                              "transposed by up to 12 semitones", ["experiment=zsl_attribute_audio",
                                                                   "model.transpose_semitones=12"]),
    "attribute_conse": ("attribute-audio (attribute table), DeViSE + InfoNCE + ConSE inference (as the "
                        "word recipe) + pitch-range and formant prior, weighted as ours",
                        ["experiment=zsl_attribute_audio", "model=conse"]),
    # ALE-style bilinear scores are the cross-entropy's logits themselves (temperature 1, where
    # DeViSE's cosines have InfoNCE's 0.1), so the prior's Bayes weight and its grid are x10
    "attribute_bilinear": ("attribute-audio (attribute table), bilinear (ALE-style) + cross-entropy + "
                           "pitch-range and formant prior, weighted as ours on a x10 grid",
                           ["experiment=zsl_attribute_audio", "model=bilinear", "loss=cross_entropy",
                            "model.pitch_prior.weight=1.0",
                            "model.pitch_prior.weight_candidates=[0.0,0.25,0.5,1.0,2.0,4.0,8.0,16.0]"]),
    "attribute_onefold": ("attribute-audio (attribute table), DeViSE + InfoNCE + pitch-range and "
                          "formant prior, weight per setting chosen on one validation fold",
                          ["experiment=zsl_attribute_audio", "model.pitch_prior.class_cv=false"]),
    "attribute_fixed": ("attribute-audio (attribute table), DeViSE + InfoNCE + pitch-range and formant "
                        "prior, weight 0.1", ["experiment=zsl_attribute_audio",
                                              "model.pitch_prior.weight_candidates=null",
                                              "model.pitch_prior.class_cv=false"]),
    "attribute_pitch": ("attribute-audio (attribute table), DeViSE + InfoNCE + pitch-range prior, "
                        "weight 0.1", ["experiment=zsl_attribute_audio", "model/pitch_prior=range",
                                       "model.pitch_prior.weight_candidates=null",
                                       "model.pitch_prior.class_cv=false"]),
    "attribute_plain": ("attribute-audio (attribute table), DeViSE + InfoNCE, no prior",
                        ["experiment=zsl_attribute_audio", "model.pitch_prior=null"]),
    "word_prior": ("word-audio (GloVe 50-d), ours + the attribute table's pitch-range and formant "
                   "prior, weighted as attribute_ours",
                   ["experiment=zsl_word_audio", "model/pitch_prior=range_formant_attributes"]),
    "text_prior": ("text-audio (MiniLM descriptions), ours + the attribute table's pitch-range and "
                   "formant prior, weighted as attribute_ours",
                   ["experiment=zsl_text_audio", "model/pitch_prior=range_formant_attributes"]),
    # other image-audio recipes (images alone), candidates for "ours" (chosen by the val columns)
    "image_noprior": ("image-audio (EfficientNet-Lite0), DeViSE + InfoNCE + ConSE, images alone "
                      "(ours before session 16)", ["experiment=zsl_image_audio", "model.pitch_prior=null"]),
    "image_devise": ("image-audio (EfficientNet-Lite0), DeViSE + InfoNCE, images alone",
                     ["experiment=zsl_image_audio", "model=devise", "model.pitch_prior=null"]),
    # other word-audio recipes of ours, candidates for "ours" (choose by the val columns only)
    "word_devise": ("word-audio (GloVe 50-d), DeViSE + InfoNCE (no ConSE)",
                    ["experiment=zsl_word_audio", "model=devise"]),
    "word_bilinear": ("word-audio (GloVe 50-d), bilinear + cross-entropy",
                      ["experiment=zsl_word_audio", "model=bilinear", "loss=cross_entropy"]),
}
SELECTED_COLUMNS = {"seen (no refit)": "selected_seen_top1", "unseen (no refit)": "selected_zsl_top1",
                    "H (no refit)": "selected_gzsl_cs_h"}
DEFAULT_RECIPES = ["word_tutorial", "word_ours", "image_tutorial", "image_ours", "text_ours",
                   "attribute_ours"]
COLUMNS = {"val H": "val_gzsl_cs_h_best", "seen": "seen_top1", "unseen": "zsl_top1", "u": "gzsl_cs_u",
           "s": "gzsl_cs_s", "H": "gzsl_cs_h", "H (no cal.)": "gzsl_h"}


def labelled_settings(cfg: DictConfig) -> dict[str, Any]:
    """What a recipe's row label names, as `cfg` composes it: the side information (its class,
    size and image encoder), the head, the loss, the encoder's transposition, and the pitch prior
    (its class, formant term, whether validation chooses its weights, by class cross-validation,
    and whether the head trains with it). Settings the labels leave out (the prior's zsl_score,
    detach, the split, ...) are not here: an override of those is the user's to add."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    side_info, model, prior = raw.get("side_info") or {}, raw["model"], raw["model"].get("pitch_prior")
    settings = {"side_info": side_info.get("_target_"), "side_info.dim": side_info.get("dim"),
                "side_info.encoder": (side_info.get("encoder") or {}).get("_target_"),
                "model.head": (model.get("head") or {}).get("_target_"), "loss": raw["loss"].get("_target_"),
                "model.transpose_semitones": model.get("transpose_semitones"),
                "model.pitch_prior": prior and prior.get("_target_")}
    if prior:  # "weight 0.1", or "chosen on validation" (per setting, or by class cross-validation)
        chosen = prior.get("weight_candidates") is not None
        settings |= {"model.pitch_prior.formants": bool(prior.get("formants")),
                     "model.pitch_prior.weight": "chosen on validation" if chosen else prior.get("weight"),
                     "model.pitch_prior.class_cv": prior.get("class_cv"),
                     "model.pitch_prior.in_training": prior.get("in_training")}
    return settings


def relabelled(recipe: str, overrides: list[str], out: Path) -> dict[str, tuple[Any, Any]]:
    """{setting: (the recipe's, with `overrides`)} for each `labelled_settings` entry that
    `overrides` change, by whatever key (model=devise, side_info=attributes, model.pitch_prior=null
    or a key of the experiment file the recipe names): the row would keep a label that no longer
    describes its runs."""
    own = labelled_settings(compose_train_config(RECIPES[recipe][1], out))
    given = labelled_settings(compose_train_config([*RECIPES[recipe][1], *overrides], out))
    changed = {key: (own.get(key), given.get(key)) for key in own | given if own.get(key) != given.get(key)}
    if "model.pitch_prior" in changed:  # a prior added, removed or replaced: its settings go with it
        changed = {k: v for k, v in changed.items() if not k.startswith("model.pitch_prior.")}
    return changed


def run_once(overrides: list[str], run_dir: Path, also_selected: bool = False) -> dict[str, Any]:
    """Train + test one recipe and seed (reusing a finished run's metrics.json).

    Returns the test metrics ("zero_shot" of metrics.json) plus `val_gzsl_cs_h_best` (the
    validation score of the selected checkpoint), `val_zsl_top1_last` (pseudo-unseen top-1 at
    the last validation), `refit_steps`, `seconds` (wall time of train + refit + test: of a run
    resumed after a stop, the sum of its parts), `parts` (how many) and `device` (where it
    trained, its last part), and from the run's config `max_steps`, `batch_size`, `source`,
    `backbone` and `excerpt_seconds`.
    A run a stop left unfinished (a last.ckpt, no metrics.json) is resumed from its last.ckpt.
    also_selected: after a refit, also test the validation-selected checkpoint itself (in
    `<run_dir>/selected/`, no training) and add its metrics as `selected_<name>`.
    A run folder records its overrides; reusing it with other ones (another --max-steps, say) is
    an error, so that one table never mixes settings.
    """
    done, timing = run_dir / "metrics.json", run_dir / "benchmark_seconds.txt"
    device = run_dir / "benchmark_device.txt"
    check_same_overrides(overrides, run_dir)
    # a run a stop (SIGTERM, Ctrl-C) left unfinished goes on from its last.ckpt, as `fewzero.train
    # ckpt_path=last` would (its class cross-validation and refit from their own progress files)
    resumes = not done.exists() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    # a mistyped override stops here: nothing written
    cfg = compose_train_config([*overrides, *(["ckpt_path=last"] if resumes else [])], run_dir)
    if not done.exists():
        record_overrides(overrides, run_dir)
        save_run_overrides(overrides, run_dir)
        # wall time, one line per part: the stopped parts' (when resumed from them) and this one's
        parts = timing.read_text().split() if resumes and timing.exists() else []
        start = time.perf_counter()
        try:
            _, objects = train(cfg)
        finally:  # stopped or not: a resume adds its own part
            timing.write_text("".join(f"{p}\n" for p in [*parts, f"{time.perf_counter() - start:.1f}"]))
        device.write_text(device_name(objects["trainer"]) + "\n")
    else:
        cfg = finished_config(cfg, run_dir)
    report = json.loads(done.read_text())
    metrics, refit = report["metrics"], report.get("refit_on_trainval", {})
    return {**{k: v for k, v in report["zero_shot"].items() if isinstance(v, float)},
            "val_gzsl_cs_h_best": metrics.get("val/acc_best", float("nan")),
            "val_zsl_top1_last": metrics.get("val/zsl_top1", float("nan")),
            "refit_steps": refit.get("steps", 0),
            "max_steps": cfg.trainer.max_steps,
            "batch_size": cfg.dataset.batch_size,
            "source": cfg.dataset.source._target_.rsplit(".", 1)[-1],
            "backbone": cfg.model.backbone._target_.rsplit(".", 1)[-1],
            "excerpt_seconds": cfg.dataset.excerpt_seconds,
            "seconds": sum(map(float, timing.read_text().split())) if timing.exists() else float("nan"),
            "parts": len(timing.read_text().split()) if timing.exists() else 1,
            "device": device.read_text().strip() if device.exists() else "device not recorded",
            **(score_selected(overrides, run_dir, refit["selected_checkpoint"])
               if also_selected and refit else {})}


def finished_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The config a finished run in `run_dir` trained with (its `.hydra/config.yaml`; `cfg`, the
    one these overrides compose now, for runs from before it was saved). Exits where the two
    differ in a training setting: the same overrides compose another config once the
    experiment's defaults changed, and the row would average runs of both under one header."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        return cfg
    trained = OmegaConf.load(saved)
    changed = course_changes(trained, cfg)
    if changed:
        more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
        raise SystemExit(f"{run_dir} holds a finished run whose config the same overrides no longer "
                         f"compose ({'; '.join(changed[:8])}{more}): the configs' defaults changed "
                         "since. Pass another --out to measure them anew, or move that run aside.")
    return trained


def by_key(overrides: list[str]) -> dict[str, list[str]]:
    """Overrides as the settings they make: the same in any order, except the order of those of
    one key (the last wins)."""
    keyed: dict[str, list[str]] = {}
    for override in overrides:
        keyed.setdefault(override.lstrip("+~").split("=", 1)[0], []).append(override)
    return keyed


def check_same_overrides(overrides: list[str], run_dir: Path) -> None:
    """Exit if `run_dir` holds a run made with other overrides (`record_overrides`; in any
    order). Finished runs from before this record existed are accepted."""
    record = run_dir / "benchmark_overrides.json"
    if not record.exists():
        return
    then, now = by_key(json.loads(record.read_text())), by_key(overrides)
    changed = sorted(key for key in then.keys() | now.keys() if then.get(key) != now.get(key))
    if changed:
        differences = "; ".join(f"{' '.join(then.get(key, ['(not set)']))} in the run, "
                                f"{' '.join(now.get(key, ['(not set)']))} now" for key in changed)
        raise SystemExit(f"{run_dir} holds a run made with other overrides ({differences}). Pass "
                         "another --out, or the same settings to reuse it.")


def record_overrides(overrides: list[str], run_dir: Path) -> None:
    """Record a new run's overrides in `run_dir`, once its config has composed (a mistyped
    override leaves nothing to lock the folder). Finished runs from before this record existed
    are not given one."""
    record = run_dir / "benchmark_overrides.json"
    if record.exists() or (run_dir / "metrics.json").exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(overrides, indent=1) + "\n")


def score_selected(overrides: list[str], run_dir: Path, checkpoint: str) -> dict[str, float]:
    """Test metrics of the validation-selected checkpoint (no refit), keyed `selected_<name>`."""
    done = run_dir / "selected" / "metrics.json"
    if not done.exists():
        train(compose_train_config([*overrides, "train=false", f"ckpt_path={checkpoint}",
                                    "dataset.refit_on_trainval=false"], run_dir / "selected"))
    report = json.loads(done.read_text())["zero_shot"]
    return {f"selected_{k}": v for k, v in report.items() if isinstance(v, float)}


def values_of(results: dict[str, list[dict[str, Any]]], key: str) -> str:
    """The runs' values of one setting, e.g. "1500" or "200/1500" (max_steps)."""
    return "/".join(str(v) for v in sorted({r[key] for runs in results.values() for r in runs}))


def mean_std(values: list[float]) -> str:
    """"mean ± sample std" over seeds; one seed has no spread, and says so."""
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=training_seed, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="training steps of every run (default: each experiment's own, 1500)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="training batch of every run (default: the dataset's own, 32)")
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, choices=list(RECIPES))
    parser.add_argument("--out", type=output_folder, default=None,
                        help="output folder; its finished runs are reused, a stopped one goes on from "
                             "its last checkpoint")
    parser.add_argument("--also-selected", action="store_true",
                        help="also test each validation-selected checkpoint without the refit")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (1 is much faster on a CPU shared with another job)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (refused where they "
                        "change what a recipe's row label names; the table lists them)")
    args = parser.parse_args()
    repeated = sorted({seed for seed in args.seeds if args.seeds.count(seed) > 1})
    if repeated:  # one run folder per seed: a repeat would count the same run twice
        parser.error(f"--seeds lists {repeated} more than once: list each seed once.")
    given = by_key(args.overrides)
    for name in args.recipes:  # the row keeps the recipe's label: it must still be that recipe
        own = by_key(RECIPES[name][1])
        replaced = sorted(key for key in own.keys() & given.keys() if given[key][-1] != own[key][-1])
        if replaced:
            parser.error(f"recipe {name} sets {', '.join(own[key][-1] for key in replaced)} itself, which "
                         f"{', '.join(given[key][-1] for key in replaced)} would replace while its row "
                         "kept the recipe's label: leave the override out, or add a recipe of your own "
                         "to RECIPES.")
    for name in args.recipes if args.overrides else []:
        changed = relabelled(name, args.overrides, args.out or ROOT / "outputs" / "benchmarks")
        if changed:
            parser.error(f"the overrides change what recipe {name}'s row label names (" + "; ".join(
                f"{key}: {own} -> {given}" for key, (own, given) in changed.items()) + "), while the "
                "row kept its label: leave them out, pick the recipe that sets them, or add a recipe "
                "of your own to RECIPES.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = args.out or ROOT / "outputs" / "benchmarks" / f"zsl_{stamp}"
    table = table_in_the_way(out, own="### Zero-shot benchmark")
    if table:  # the few-shot benchmark's, say: its runs are not this one's to rewrite the table of
        parser.error(f"--out {out} holds another benchmark's table (benchmark.md: {table!r}), which "
                     "this one's would overwrite: pass another --out, or move that table away.")
    base = [*([f"trainer.max_steps={args.max_steps}"] if args.max_steps is not None else []),
            *([f"dataset.batch_size={args.batch_size}"] if args.batch_size is not None else []),
            "task_name=benchmark", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false",
            *args.overrides]
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        for name in args.recipes:
            _, overrides = RECIPES[name]
            results[name] = []
            for seed in args.seeds:
                run_dir = out / name / f"seed{seed}"
                with naming_the_run(f"(the run of recipe {name}, seed {seed}, in {run_dir}; the runs "
                                    f"finished before it are reused by a rerun with --out {out})"):
                    results[name].append(run_once([*overrides, *base, f"seed={seed}"], run_dir,
                                                  args.also_selected))
    except SIGTERMException as stop:  # fewzero.cli.run_script says it stopped, and this
        stop.rerun = (f"Run it again with --out {out}: its finished runs are reused, the stopped one "
                      "goes on from its last checkpoint.")
        raise

    columns = COLUMNS | (SELECTED_COLUMNS if args.also_selected else {})
    device = " and ".join(sorted({r["device"] for rs in results.values() for r in rs}))
    lines = [
        f"### Zero-shot benchmark, {values_of(results, 'source')}, {device}, {stamp}",
        "",
        f"{values_of(results, 'max_steps')} training steps of {values_of(results, 'batch_size')} "
        f"excerpts of {values_of(results, 'excerpt_seconds')} s, {values_of(results, 'backbone')} "
        f"encoder, seeds {args.seeds} (mean ± std); identical splits and test clips for every run. "
        "Per-class mean top-1: seen = seen test fold among seen classes; unseen = ZSL among unseen "
        "classes; u, s, H = GZSL among all classes with calibrated stacking (penalty chosen on "
        "validation); H (no cal.) = GZSL without the penalty. val H = calibrated H on the "
        "validation data (held-out fold + pseudo-unseen classes) of the selected checkpoint, the "
        "model-selection score. "
        + (f"Tested model: refit on every seen class for the selected number of steps "
           f"(mean {statistics.mean(r['refit_steps'] for rs in results.values() for r in rs):.0f})."
           if any(r["refit_steps"] for rs in results.values() for r in rs)
           else "Tested model: the validation-selected checkpoint (no refit).")
        + (" Columns marked (no refit): the validation-selected checkpoint itself, tested on the "
           "same clips." if args.also_selected else "")
        # what the labels leave out (the split, the prior's zsl_score, ...): the reader's to know
        + (f" Every run also had `{' '.join(args.overrides)}`." if args.overrides else ""),
        "",
        "| recipe | " + " | ".join(columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for name, runs in results.items():
        cells = [mean_std([r.get(key, float("nan")) for r in runs]) for key in columns.values()]
        lines.append(f"| {RECIPES[name][0]} | " + " | ".join(cells) + " |")
    seconds = [r["seconds"] for rs in results.values() for r in rs]
    resumed = sum(r["parts"] > 1 for rs in results.values() for r in rs)
    lines += ["", f"Wall time per run (train + refit + test): mean {statistics.mean(seconds):.0f} s, "
              f"total {sum(seconds) / 60:.1f} min over {len(seconds)} runs"
              + (f" ({resumed} resumed after a stop: the wall times of the parts summed, each part's "
                 "start included)." if resumed else ".")]
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(table + "\n")
    (out / "benchmark.json").write_text(json.dumps({"device": device, "args": vars(args) | {
        "out": str(out)}, "runs": results}, indent=2))
    print(f"\nwritten to {out}/benchmark.md")


if __name__ == "__main__":
    run_script(main)
