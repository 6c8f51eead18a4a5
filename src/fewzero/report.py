"""Aggregate the runs of a multirun (or any folder of runs) into one table.

    python -m fewzero.report outputs/train/multiruns/<time> [--metric val/acc_best]
                             [--group-ignore seed] [--out DIR]

Every run directory holding `metrics.json` (and Hydra's `.hydra/overrides.yaml`; an evaluation's
holds its run's overrides with its own) is one row;
runs whose overrides differ only in ignored keys (default: `seed`; always `ckpt_path`, which a
resume adds, and what run directory names leave out: `paths.*` locations) form one
configuration, reported as mean +- std over its runs, with the count of runs where some lack a
value. Writes report.md, report.csv and report.png (the chosen metric per configuration with
std error bars), sorted best first, by default by the validation score:
a table sorted by a test metric is for reading, not for choosing. Runs without metrics.json
(failed or unfinished jobs), or whose last attempt failed after it was written, are listed by
name, so a crashed job never hides silently. Runs of the same overrides on other rendered data
(another render config's fingerprint, or audio another FluidSynth version rendered: runs gathered
from two hosts), or whose tests scored another kind of checkpoint (evaluations of last.ckpt beside
those of the selected one), are rows of their own, labelled with what differs; a checkpoint that
several evaluations of one row tested is named, as each counts as a run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from fewzero.data.sol import fluidsynth_version  # noqa: E402

# the sort key when none is given: the first of these that the runs have. The validation score
# first, so that the top row is never chosen by the test (runs re-tested alone have only tests)
DEFAULT_METRICS = ("val/acc_best", "test/5way_5shot_acc", "test/zsl_top1")
# overrides that never make another configuration: a resume adds ckpt_path to a run's own
ALWAYS_IGNORED = ("ckpt_path",)


@dataclass
class Configuration:
    """Runs that share every override but the ignored ones."""

    name: str
    # what tells it from configurations of the same overrides, where they differ: the rendered
    # data and the tested checkpoint (`what_was_tested`); "" where none does
    setting: str = ""
    runs: list[Path] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    # per run with rendered data (metrics.json's `data`): (render fingerprint, FluidSynth version)
    renders: dict[Path, tuple[str, str]] = field(default_factory=dict)
    # per run, the checkpoint its test scored (metrics.json's `checkpoint`), where it names one
    tested: dict[Path, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} [{self.setting}]" if self.setting else self.name

    def mean(self, key: str) -> float:
        values = self.metrics.get(key, [])
        return statistics.fmean(values) if values else math.nan

    def std(self, key: str) -> float:
        """Sample standard deviation over the runs; nan for a single run (undefined, not 0)."""
        values = self.metrics.get(key, [])
        return statistics.stdev(values) if len(values) > 1 else math.nan

    def cell(self, key: str) -> str:
        """"mean ± std", "x (1 run)" or "-"; "(n of N runs)" when some runs lack a finite value."""
        values = self.metrics.get(key, [])
        if not values:
            return "-"
        text = f"{values[0]:.4f}" if len(values) == 1 else f"{self.mean(key):.4f} ± {self.std(key):.4f}"
        if len(values) < len(self.runs):
            return f"{text} ({len(values)} of {len(self.runs)} runs)"
        return text + (" (1 run)" if len(values) == 1 else "")


def _overrides(run: Path) -> list[str]:
    """The run's command-line overrides, a deletion written `~key` whatever value followed it
    (Hydra writes `~key=null` back as `~key` when a run is resumed)."""
    path = run / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(path)] if path.is_file() else []
    return [o.split("=", 1)[0] if o.startswith("~") else o for o in overrides]


def override_key(override: str) -> str:
    """The key an override sets (`+`, `~` and the value left out): `dataset.split.test`."""
    return override.split("=", 1)[0].lstrip("+~")


def name_excluded(run: Path) -> tuple[str, ...]:
    """The keys the run's directory name leaves out (Hydra's `override_dirname.exclude_keys`:
    where it ran and read its data, the checkpoint it resumed), and `ALWAYS_IGNORED`: they make
    no other configuration either."""
    path = run / ".hydra" / "hydra.yaml"
    excluded = (OmegaConf.select(OmegaConf.load(path), "hydra.job.config.override_dirname.exclude_keys",
                                 default=None) if path.is_file() else None) or []
    return (*ALWAYS_IGNORED, *map(str, excluded))


def failed_since(run: Path) -> bool:
    """Whether the run's last attempt failed after its metrics.json was written: a finished run
    resumed (`ckpt_path=auto` after a test setting changed) that then failed keeps the old
    metrics.json, which are no figures of its present overrides."""
    traceback, metrics = run / "failed.txt", run / "metrics.json"
    return (traceback.is_file() and metrics.is_file()
            and traceback.stat().st_mtime >= metrics.stat().st_mtime)


def why_no_metrics(run: Path) -> str:
    """A run without metrics.json, or whose last attempt failed after it was written: failed
    (the last line of its failed.txt, the error) or unfinished."""
    traceback = run / "failed.txt"
    if traceback.is_file():
        last = next((line for line in reversed(traceback.read_text().splitlines()) if line.strip()), "")
        stale = " (its metrics.json is from an attempt before)" if (run / "metrics.json").is_file() else ""
        return f"failed: {last.strip()} (failed.txt){stale}"
    return "unfinished: still running, or killed (resume it with ckpt_path=last)"


def checkpoint_role(path: str | None) -> str:
    """What a run's test scored, by the checkpoint's file name: the refit, the validation-selected
    checkpoint (`step...`), last.ckpt, another file, or the weights as training left them."""
    if not path:
        return "the last weights"
    name = Path(path).name
    return "the validation-selected checkpoint" if name.startswith("step") else name


def what_was_tested(report: dict) -> str:
    """The rendered data (fingerprint, FluidSynth version) and the checkpoint role of a run's
    metrics.json: runs of one configuration must agree on them to be averaged."""
    data = report.get("data")
    render = f"data {data['fingerprint']}, FluidSynth {fluidsynth_version(data)}; " if data else ""
    return f"{render}tested {checkpoint_role(report.get('checkpoint'))}"


def collect(root: Path, ignore: tuple[str, ...] = ("seed",)) -> tuple[list[Configuration], list[Path]]:
    """Group every run under `root` into configurations; also return runs with no metrics.

    Runs of the same overrides on other rendered data, or whose tests scored checkpoints of
    another role (evaluations of last.ckpt beside those of the selected one), are configurations
    of their own, told apart by their `setting`."""
    entries: list[tuple[str, Path, dict, str]] = []  # (overrides' name, run, metrics.json, what was tested)
    failed: list[Path] = []
    for hydra_dir in sorted(root.rglob(".hydra")):
        run = hydra_dir.parent
        metrics_file = run / "metrics.json"
        if not metrics_file.is_file() or failed_since(run):
            failed.append(run)
            continue
        kept = [o for o in _overrides(run)
                if override_key(o) not in (*ignore, *name_excluded(run))]
        report = json.loads(metrics_file.read_text())
        entries.append((",".join(sorted(kept)) or "(defaults)", run, report, what_was_tested(report)))
    settings: dict[str, set[str]] = defaultdict(set)
    for name, _, _, tested in entries:
        settings[name].add(tested)
    groups: dict[tuple[str, str], Configuration] = {}
    for name, run, report, tested in entries:
        setting = tested if len(settings[name]) > 1 else ""
        group = groups.setdefault((name, setting), Configuration(name, setting))
        group.runs.append(run)
        for key, value in report.get("metrics", {}).items():
            if isinstance(value, int | float) and math.isfinite(value):
                group.metrics[key].append(float(value))
        data = report.get("data")
        if data:
            group.renders[run] = (data["fingerprint"], fluidsynth_version(data))
        if report.get("checkpoint"):
            group.tested[run] = str(report["checkpoint"])
    return list(groups.values()), failed


def tested_twice(configs: list[Configuration]) -> list[str]:
    """Report lines for each checkpoint that several runs of one configuration tested (one run
    evaluated twice alike): each counts as a run in its mean and spread."""
    lines = []
    for config in configs:
        by_checkpoint: dict[str, list[Path]] = defaultdict(list)
        for run, checkpoint in config.tested.items():
            by_checkpoint[checkpoint].append(run)
        for checkpoint, runs in sorted(by_checkpoint.items()):
            if len(runs) > 1:
                lines += ["", f"{checkpoint} was tested by {len(runs)} runs of {config.label}, "
                          "each counted in its mean and spread: " + ", ".join(map(str, sorted(runs)))]
    return lines


def mixed_renders(configs: list[Configuration]) -> list[str]:
    """Report lines for each rendered-data config whose runs' audio came from more than one
    FluidSynth version: the same config renders different audio under each."""
    runs_by_version: dict[str, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for config in configs:
        for run, (fingerprint, version) in config.renders.items():
            runs_by_version[fingerprint][version].append(run)
    lines = []
    for fingerprint, by_version in sorted(runs_by_version.items()):
        if len(by_version) > 1:
            lines += ["", f"Rendered data {fingerprint} came from {len(by_version)} FluidSynth "
                      "versions, which render different audio: figures across them differ by "
                      "the data too."]
            lines += [f"- FluidSynth {version}: " + ", ".join(str(run) for run in sorted(runs))
                      for version, runs in sorted(by_version.items())]
    return lines


def split_overrides(name: str) -> list[str]:
    """A configuration's name back into its overrides: split at the commas that join them, not at
    those inside a value's brackets, braces or quotes (`dataset.split.unseen=[Bassoon,Viola]`)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(name):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            parts.append(name[start:i])
            start = i + 1
    return [*parts, name[start:]]


def bar_labels(configs: list[Configuration], metric: str, width: int = 60) -> list[str]:
    """Each configuration's overrides without those every one shares (what tells them apart),
    cut in the middle to `width` characters; "(1 run)" where there is no spread to draw."""
    overrides = [split_overrides(c.name) if c.name != "(defaults)" else [] for c in configs]
    shared = set.intersection(*map(set, overrides)) if len(configs) > 1 else set()
    labels = []
    for config, names in zip(configs, overrides, strict=True):
        label = ",".join(o for o in names if o not in shared) or config.name
        label += f" [{config.setting}]" if config.setting else ""
        if len(label) > width:
            label = f"{label[:width // 2 - 1]}…{label[-(width - width // 2):]}"
        labels.append(label + (" (1 run)" if len(config.metrics[metric]) == 1 else ""))
    return labels


def write_report(configs: list[Configuration], failed: list[Path], metric: str,
                 out: Path) -> str:
    """Write report.md/.csv/.png into `out`; return the Markdown."""
    configs = sorted(configs, key=lambda c: -c.mean(metric) if math.isfinite(c.mean(metric))
                     else math.inf)
    keys = sorted({k for c in configs for k in c.metrics if k.startswith(("test/", "val/"))
                   and not k.endswith("_ci95")})
    keys = [metric] + [k for k in keys if k != metric]
    header = ["configuration", "runs", *keys]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    rows = []
    for c in configs:
        cells = [c.cell(k) for k in keys]
        lines.append("| " + " | ".join([c.label, str(len(c.runs)), *cells]) + " |")
        rows.append([c.label, len(c.runs)]
                    + [x for k in keys for x in (c.mean(k), c.std(k), len(c.metrics.get(k, [])))])
    if configs and math.isfinite(configs[0].mean(metric)):  # e.g. the trial to test, for a search
        caveat = (" (a test metric: for reading, not for choosing; choose by a val/ metric)"
                  if metric.startswith("test/") else "")
        lines += ["", f"First by {metric}{caveat}: {configs[0].label}, run(s) "
                  + ", ".join(str(run) for run in configs[0].runs)]
    lines += mixed_renders(configs)
    lines += tested_twice(configs)
    if failed:
        lines += ["", f"{len(failed)} run(s) without metrics.json (failed or unfinished):"]
        lines += [f"- {run}: {why_no_metrics(run)}" for run in failed]
    markdown = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown)
    with (out / "report.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["configuration", "runs"]
                        + [f"{k}_{s}" for k in keys for s in ("mean", "std", "n")])
        writer.writerows(rows)
    shown = [c for c in configs if c.metrics.get(metric)]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.5))
    ax.barh(range(len(shown)), [c.mean(metric) for c in shown],
            xerr=[c.std(metric) for c in shown],  # nan for one run: no bar, not a zero-width one
            color="tab:blue", alpha=0.8, capsize=3)
    ax.set_yticks(range(len(shown)), bar_labels(shown, metric), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} (mean ± std over runs)")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=120)
    plt.close(fig)
    return markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a multirun directory (or any folder of runs)")
    parser.add_argument("--metric", default=None,
                        help=f"sort key (default: the first of {', '.join(DEFAULT_METRICS)} the runs have)")
    parser.add_argument("--group-ignore", nargs="*", default=["seed"],
                        help="override keys that do not make a new configuration (replaces the "
                             "default, seed: name it too to keep pooling seeds)")
    parser.add_argument("--out", type=Path, default=None, help="default: <root>")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a directory")
    configs, failed = collect(args.root, tuple(args.group_ignore))
    if not configs and not failed:
        parser.error(f"no runs (folders with .hydra/) under {args.root}")
    reported = sorted({k for c in configs for k, v in c.metrics.items() if v})
    if args.metric is None:
        args.metric = next((m for m in DEFAULT_METRICS if m in reported), None)
    if configs and args.metric not in reported:
        wanted = args.metric or f"any of {', '.join(DEFAULT_METRICS)}"
        parser.error(f"no run under {args.root} has {wanted}; pass --metric with one they have: "
                     f"{', '.join(reported)}")
    print(write_report(configs, failed, args.metric or DEFAULT_METRICS[0], args.out or args.root))
    print(f"written: {(args.out or args.root) / 'report.md'}, report.csv, report.png")


if __name__ == "__main__":
    main()
