"""How much of a seen class's held-out folds replays notes its training folds play.

Reads a rendered SOL `metadata.csv` (columns instrument, fold, pitch, dynamics, soundfont) and a
zero-shot split, and counts, for the clips each zero-shot role holds out of training, how many
share their instrument and pitch (and also their dynamic, and also their SoundFont) with a clip
the model trains on:

- validation phase: `val_seen` (fold 3 of the training classes) against folds 0-2;
- refit: `test_seen` (fold 4 of every seen class) against folds 0-3.

    python scripts/fold_overlap.py data/rendered_sol/<fingerprint>/metadata.csv [--split word_audio]

With `dataset.source.fold_by=note` (the default, as TinySOL's official folds) nearly every
held-out clip replays a trained pitch; with `fold_by=pitch` none does. Unseen classes are not
affected either way: every unseen clip is test-only.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from omegaconf import OmegaConf

from fewzero.cli import run_script

SPLITS = Path(__file__).resolve().parents[1] / "configs" / "dataset" / "split"
COLUMNS = ("instrument", "fold", "pitch", "dynamics", "soundfont")


def overlap(rows: list[dict], classes: list[str], held_out: set[int], trained: set[int]) -> dict:
    """Counts of held-out clips with a trained clip of the same instrument and pitch (then also
    the same dynamic, then also the same SoundFont)."""
    train = [r for r in rows if r["instrument"] in classes and int(r["fold"]) in trained]
    keys = [("instrument", "pitch"), ("instrument", "pitch", "dynamics"),
            ("instrument", "pitch", "dynamics", "soundfont")]
    known = [{tuple(r.get(k, "") for k in key) for r in train} for key in keys]
    test = [r for r in rows if r["instrument"] in classes and int(r["fold"]) in held_out]
    counts = [sum(tuple(r.get(k, "") for k in key) in seen for r in test)
              for key, seen in zip(keys, known, strict=True)]
    return {"clips": len(test), "pitch": counts[0], "dynamic": counts[1], "soundfont": counts[2]}


def read_metadata(path: Path) -> list[dict]:
    """The rows of a render's metadata.csv (`path`, or the one in folder `path`), which must have
    the COLUMNS `overlap` compares: a missing one read as "" everywhere would count every clip
    as sharing it."""
    if path.is_dir():  # a render's folder
        path = path / "metadata.csv"
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} has no column {', '.join(missing)} (its columns: "
                             f"{', '.join(reader.fieldnames or [])}): pass a render's metadata.csv, "
                             "data/rendered_sol/<fingerprint>/metadata.csv.")
        return list(reader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metadata", type=Path, help="a render's metadata.csv (or its folder)")
    parser.add_argument("--split", default="word_audio", help=f"a zero-shot split in {SPLITS}",
                        choices=sorted(p.stem for p in SPLITS.glob("*.yaml") if "seen" in OmegaConf.load(p)))
    args = parser.parse_args()
    rows = read_metadata(args.metadata)
    split = OmegaConf.load(SPLITS / f"{args.split}.yaml")
    seen = list(split.seen)
    training = [c for c in seen if c not in set(split.get("pseudo_unseen") or [])]
    print("| held-out clips | clips | same instrument+pitch in training | ...and dynamic "
          "| ...and SoundFont |")
    print("| --- | --- | --- | --- | --- |")
    for name, classes, held_out, trained in (("val_seen: fold 3 vs folds 0-2", training, {3}, {0, 1, 2}),
                                             ("test_seen: fold 4 vs folds 0-3", seen, {4}, {0, 1, 2, 3})):
        c = overlap(rows, classes, held_out, trained)
        cells = [f"{c[k]} ({c[k] / max(c['clips'], 1):.1%})" for k in ("pitch", "dynamic", "soundfont")]
        print(f"| {name} | {c['clips']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    run_script(main)
