"""Zero-shot benchmark: the tutorial's recipe next to ours, and every side information.

Each recipe is trained and tested with several seeds on identical splits and evaluation clips
(rendered SOL by default); the table reports mean +- std over seeds of per-class top-1:
seen (seen test fold, seen candidates), unseen (ZSL, unseen candidates) and GZSL u, s, H (all
candidates; calibrated stacking with the penalty chosen on validation data, and H without it).
Prints one Markdown table and writes it (plus JSON) to outputs/benchmarks/zsl_<time>/.

    .venv/bin/python scripts/benchmark_zsl.py                         # 3 seeds, every recipe
    .venv/bin/python scripts/benchmark_zsl.py --max-steps 300 --recipes word_tutorial word_ours
    .venv/bin/python scripts/benchmark_zsl.py --out outputs/benchmarks/zsl_x   # resume a run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from datetime import datetime
from pathlib import Path

import torch

from fewzero.train import compose_train_config, train

ROOT = Path(__file__).resolve().parents[1]
# name -> (row label, overrides). "tutorial" = siamese network + triplet loss, as the tutorial.
RECIPES: dict[str, tuple[str, list[str]]] = {
    "word_tutorial": ("word-audio (GloVe 50-d), tutorial: siamese + triplet",
                      ["experiment=zsl_word_audio", "model=siamese", "loss=triplet"]),
    "word_ours": ("word-audio (GloVe 50-d), ours: DeViSE + InfoNCE + ConSE",
                  ["experiment=zsl_word_audio"]),
    "image_tutorial": ("image-audio (EfficientNet-Lite0), tutorial: siamese + triplet",
                       ["experiment=zsl_image_audio", "model=siamese", "loss=triplet"]),
    "image_ours": ("image-audio (EfficientNet-Lite0), ours: DeViSE + InfoNCE + ConSE",
                   ["experiment=zsl_image_audio"]),
    "text_ours": ("text-audio (MiniLM descriptions), ours: DeViSE + InfoNCE + ConSE",
                  ["experiment=zsl_text_audio"]),
    "attribute_ours": ("attribute-audio (attribute table), ours: DeViSE + InfoNCE",
                       ["experiment=zsl_attribute_audio"]),
}
COLUMNS = {"seen": "seen_top1", "unseen": "zsl_top1", "u": "gzsl_cs_u", "s": "gzsl_cs_s",
           "H": "gzsl_cs_h", "H (no cal.)": "gzsl_h"}


def run_once(overrides: list[str], run_dir: Path) -> dict[str, float]:
    """Train + test one recipe and seed (reusing a finished run's metrics.json)."""
    done = run_dir / "metrics.json"
    if not done.exists():
        train(compose_train_config(overrides, run_dir))
    return json.loads(done.read_text())["zero_shot"]


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", type=Path, default=None, help="output folder (resumes runs)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()

    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = args.out or ROOT / "outputs" / "benchmarks" / f"zsl_{stamp}"
    base = [f"trainer.max_steps={args.max_steps}", f"dataset.batch_size={args.batch_size}",
            "task_name=benchmark", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false",
            *args.overrides]
    results: dict[str, list[dict[str, float]]] = {}
    for name in args.recipes:
        _, overrides = RECIPES[name]
        results[name] = [run_once([*overrides, *base, f"seed={seed}"], out / name / f"seed{seed}")
                         for seed in args.seeds]

    device = (torch.cuda.get_device_name(0) if "gpu" in " ".join(args.overrides)
              else f"CPU ({platform.processor() or platform.machine()})")
    lines = [
        f"### Zero-shot benchmark, rendered SOL, {device}, {stamp}",
        "",
        f"{args.max_steps} training steps of {args.batch_size} one-second excerpts, timbre_cnn "
        f"encoder, seeds {args.seeds} (mean ± std); identical splits and test clips for every run. "
        "Per-class mean top-1: seen = seen test fold among seen classes; unseen = ZSL among unseen "
        "classes; u, s, H = GZSL among all classes with calibrated stacking (penalty chosen on "
        "validation); H (no cal.) = GZSL without the penalty.",
        "",
        "| recipe | " + " | ".join(COLUMNS) + " |",
        "| --- |" + " --- |" * len(COLUMNS),
    ]
    for name, runs in results.items():
        cells = [mean_std([r[key] for r in runs]) for key in COLUMNS.values()]
        lines.append(f"| {RECIPES[name][0]} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(table + "\n")
    (out / "benchmark.json").write_text(json.dumps({"device": device, "args": vars(args) | {
        "out": str(out)}, "runs": results}, indent=2))
    print(f"\nwritten to {out}/benchmark.md")


if __name__ == "__main__":
    main()
