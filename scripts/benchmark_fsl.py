"""Few-shot benchmark: data pipeline, training and evaluation speed, and accuracy.

Prints one Markdown table and writes it (plus JSON) to outputs/benchmarks/. Both backbones are
trained with the same budget and seed and tested on identical episodes (dataset.eval_seed).
When the model whitens embeddings (the default, `model.whitening`), the same best checkpoint is
tested a second time with whitening off, so the table shows what the whitening adds. The
evaluation time per episode leaves out the whitening's choice on validation episodes (once per
test), which has a row of its own. Overrides win over --max-steps and --seed, and the table
says what the runs were given.

    .venv/bin/python scripts/benchmark_fsl.py                     # defaults: 1500 steps each
    .venv/bin/python scripts/benchmark_fsl.py --max-steps 300 trainer=gpu   # any Hydra override
"""

from __future__ import annotations

import argparse
import json
import random
import time
from datetime import datetime
from pathlib import Path

import hydra
import librosa
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from fewzero.callbacks import StageTimer
from fewzero.cli import (
    device_name,
    naming_the_run,
    output_folder,
    positive_int,
    run_script,
    table_in_the_way,
    training_seed,
)
from fewzero.data.episodes import EpisodeDataset
from fewzero.eval import evaluate
from fewzero.train import compose_train_config, save_run_overrides, train

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ("timbre_cnn", "music_fsl_cnn")


def cached_episodes_per_second(datamodule, n_episodes: int) -> float:
    """Iterate the training DataLoader exactly as training does (random crops included)."""
    dataset = EpisodeDataset(datamodule.train_features,
                             datamodule.sampler("train", datamodule.train_settings, 0),
                             n_episodes, datamodule.excerpt_frames)
    loader = DataLoader(dataset, batch_size=None, num_workers=datamodule.num_workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    return n_episodes / (time.perf_counter() - start)


def tutorial_episodes_per_second(datamodule, n_episodes: int) -> float:
    """The tutorial's data path: per item, get the file duration, decode a random 1 s excerpt
    with librosa at 16 kHz, then compute the mel spectrogram (its backbone does that on every
    forward pass). Same episode composition as ours."""
    features = datamodule.features
    mel = features.transform()
    sampler = datamodule.sampler("train", datamodule.train_settings, 0)
    paths = datamodule.table.paths
    rng = random.Random(0)
    start = time.perf_counter()
    for i in range(n_episodes):
        ep = sampler.episode(i)
        items = []
        for index in torch.cat([ep.support.flatten(), ep.query.flatten()]).tolist():
            duration = librosa.get_duration(path=paths[index])
            offset = rng.uniform(0, max(0.0, duration - datamodule.excerpt_seconds))
            audio, _ = librosa.load(paths[index], sr=features.sample_rate, offset=offset,
                                    duration=datamodule.excerpt_seconds, mono=True)
            items.append(torch.from_numpy(audio))
        length = min(len(a) for a in items)
        mel(torch.stack([a[:length] for a in items]))
    return n_episodes / (time.perf_counter() - start)


def backbone_configs() -> list[str]:
    """The backbone configs a run can name (configs/model/backbone/*.yaml)."""
    return sorted(p.stem for p in (ROOT / "configs" / "model" / "backbone").glob("*.yaml"))


def accuracy_fields(results: dict) -> dict[str, float]:
    """{"<setting>_acc": mean, "<setting>_ci95": ci95} for each test setting's EpisodeResults."""
    return {**{f"{name}_acc": r.mean for name, r in results.items()},
            **{f"{name}_ci95": r.ci95 for name, r in results.items()}}


def unwhitened_results(metrics: dict, run_dir: Path) -> dict[str, float]:
    """Test accuracies of the run's tested checkpoint with `model.whitening=null`, same episodes
    (last.ckpt when the run was too short to validate and tested its final weights)."""
    ckpt = metrics["test/checkpoint"] or run_dir / "checkpoints" / "last.ckpt"
    # the run's own config: fewzero.train saved it as <run>/.hydra/config.yaml
    _, objects = evaluate(ckpt, ["model.whitening=null"], run_dir.with_name(run_dir.name + "_unwhitened"))
    return accuracy_fields(objects["model"].test_results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=positive_int, default=1500)
    parser.add_argument("--seed", type=training_seed, default=0)
    parser.add_argument("--data-episodes", type=positive_int, default=500)
    parser.add_argument("--tutorial-episodes", type=positive_int, default=10)
    parser.add_argument("--backbones", nargs="*", default=list(BACKBONES), choices=backbone_configs(),
                        metavar="BACKBONE", help="backbones (configs/model/backbone) to train and test; "
                        "none (just --backbones): data pipeline only. Hydra overrides go before it.")
    parser.add_argument("--out", type=output_folder, default=None,
                        help="output folder (default: outputs/benchmarks/fsl_<date>_<time>)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    repeated = sorted({b for b in args.backbones if args.backbones.count(b) > 1})
    if repeated:  # one run folder per backbone: a repeat would train into it again, then stop
        parser.error(f"--backbones lists {', '.join(repeated)} more than once: list each backbone once.")

    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = args.out or ROOT / "outputs" / "benchmarks" / f"fsl_{stamp}"
    finished = [str(p) for b in args.backbones
                for p in (out / b / "metrics.json", out / f"{b}_unwhitened" / "metrics.json") if p.exists()]
    if finished:  # fewzero.eval would refuse to write the unwhitened test over one, after training
        parser.error(f"--out {out} holds finished runs ({', '.join(finished)}): pass another --out.")
    table = table_in_the_way(out)
    if table:  # from another benchmark, or this one's of other backbones: it would be lost
        parser.error(f"--out {out} holds a benchmark table (benchmark.md: {table!r}), which this one's "
                     "would overwrite: pass another --out.")
    base = [f"trainer.max_steps={args.max_steps}", f"seed={args.seed}", "task_name=benchmark",
            *args.overrides]

    cfg = compose_train_config(base, out / "data")
    datamodule = hydra.utils.instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")
    # best of 3: a short loop of tiny tensor ops is easily slowed by whatever else runs
    ours = max(cached_episodes_per_second(datamodule, args.data_episodes) for _ in range(3))
    tutorial = tutorial_episodes_per_second(datamodule, args.tutorial_episodes)

    rows, device = {}, device_name()  # the last trainer's, once a backbone has trained
    try:
        for backbone in args.backbones:
            with naming_the_run(f"(the run of backbone {backbone}, seed {cfg.seed}, in {out / backbone})"):
                run_overrides = [*base, f"model/backbone={backbone}"]
                run_cfg = compose_train_config(run_overrides, out / backbone)
                save_run_overrides(run_overrides, out / backbone)
                metrics, objects = train(run_cfg)
            timer = next(c for c in objects["trainer"].callbacks if isinstance(c, StageTimer))
            test_episodes = sum(s.n_episodes for s in objects["datamodule"].test_settings)
            results = objects["model"].test_results
            choice = objects["model"].whitening_choice_seconds  # on validation episodes, before the test's
            rows[backbone] = {
                "train_steps_per_s": timer.results["train_steps"] / timer.results["train_seconds"],
                "eval_s_per_episode": (timer.results["test_seconds"] - choice) / test_episodes,
                "whitening_choice_s": choice,
                "val_acc_best": metrics.get("val/acc_best"),
                "settings": list(results),  # test settings' names, e.g. 5way_1shot
                **accuracy_fields(results),
            }
            if run_cfg.model.get("whitening") is not None:
                with naming_the_run(f"(the test without whitening of backbone {backbone}'s run, seed "
                                    f"{cfg.seed}, in {out / f'{backbone}_unwhitened'})"):
                    rows[backbone]["unwhitened"] = unwhitened_results(metrics, out / backbone)
            device = device_name(objects["trainer"])
    except SIGTERMException as stop:  # fewzero.cli.run_script says it stopped, and this
        stop.rerun = ("Run it again" + (" with another --out" if args.out else "") + f": the runs start "
                      f"over, as this benchmark neither reuses nor resumes those in {out}.")
        raise
    episodes = cfg.dataset.episodes
    train_setting = episodes.train
    tests = "; ".join(f"{t.n_episodes} episodes of {t.n_way}-way {t.n_shot}-shot ({t.n_query} "
                      "queries per class)" for t in episodes.test)
    lines = [
        f"### Few-shot benchmark, {cfg.dataset.source._target_.rsplit('.', 1)[-1]}, {device}, {stamp}",
        "",
        f"Training budget: {cfg.trainer.max_steps} steps of {train_setting.n_way}-way "
        f"{train_setting.n_shot}-shot {train_setting.n_query}-query episodes, seed {cfg.seed}; "
        f"test: {tests}, on identical "
        "episodes for every backbone. Each accuracy is one training run's, +- its 95% interval "
        "over the test episodes; another seed or host trains another model, whose accuracy can "
        "differ by more (over seeds: `python -m fewzero.train -m seed=0,1,2,3,4`, then "
        "`python -m fewzero.report <its multirun folder>`).",
        "",
        "| measurement | value |",
        "| --- | --- |",
        f"| data pipeline, cached features (episodes/s, best of 3) | {ours:,.0f} |",
        f"| data pipeline, tutorial per-item decoding (episodes/s) | {tutorial:.2f} |",
        f"| data pipeline speed-up | {ours / tutorial:,.0f}x |",
    ]
    for backbone, r in rows.items():
        lines += [
            f"| {backbone}: training steps/s | {r['train_steps_per_s']:.2f} |",
            f"| {backbone}: evaluation s/episode (embedding included, whitening choice excluded) | "
            f"{r['eval_s_per_episode']:.5f} |",
            *([f"| {backbone}: whitening choice on validation episodes, once per test (s) | "
               f"{r['whitening_choice_s']:.1f} |"] if r["whitening_choice_s"] else []),
            *(f"| {backbone}: {name.replace('_', ' ')} accuracy | "
              f"{r[f'{name}_acc']:.4f} +- {r[f'{name}_ci95']:.4f} |" for name in r["settings"]),
            *(f"| {backbone}, same checkpoint without whitening: {name.replace('_', ' ')} "
              f"accuracy | {r['unwhitened'][f'{name}_acc']:.4f} +- "
              f"{r['unwhitened'][f'{name}_ci95']:.4f} |"
              for name in r["settings"] if "unwhitened" in r),
        ]
    if len(rows) == 2:
        (a, ra), (b, rb) = rows.items()
        for name in ra["settings"]:
            gap = ra[f"{name}_acc"] - rb[f"{name}_acc"]
            cis = ra[f"{name}_ci95"] + rb[f"{name}_ci95"]
            lines.append(f"| {a} - {b}, {name} (sum of CIs) | {gap:+.4f} ({cis:.4f}) |")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(table + "\n")
    (out / "benchmark.json").write_text(json.dumps(
        {"device": device, "data_episodes_per_s": {"cached": ours, "tutorial": tutorial},
         "runs": rows, "max_steps": cfg.trainer.max_steps, "seed": cfg.seed, "args": vars(args)},
        indent=2, default=str))
    print(f"\nwritten to {out}/benchmark.md")


if __name__ == "__main__":
    run_script(main)
