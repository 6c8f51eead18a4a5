"""Re-evaluate a checkpoint with other test settings, without training.

    python -m fewzero.eval ckpt_path=outputs/train/runs/<run>/checkpoints/<file>.ckpt \
        'dataset.episodes.test=[{n_way: 5, n_shot: 5, n_query: 15, n_episodes: 5000}]'

The model is rebuilt from the run's saved config (`<run>/.hydra/config.yaml`, or the one the
checkpoint records when it was moved out of its run), the overrides
(`key=value`, values in YAML; a key the run's config lacks is refused unless written
`+key=value`) are applied on top, and the same metrics.json, figures and
TensorBoard logs as in training are written to a new directory under outputs/eval/runs/, or to
`hydra.run.dir=<dir>` as for `fewzero.train` (the one Hydra setting it reads: it is not a Hydra
application).
"""

from __future__ import annotations

import copy
import logging
import pickle
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError

from fewzero.callbacks import RunRecord
from fewzero.train import run_suffix, train

log = logging.getLogger(__name__)
USAGE = ("usage: python -m fewzero.eval ckpt_path=<file.ckpt> [run_config=<config.yaml>] "
         "[hydra.run.dir=<output dir>] [key=value ...]")
OPTIONS = ("ckpt_path", "run_config", "hydra.run.dir")  # read by main(), not config overrides


def load_run_config(ckpt_path: Path, run_config: Path | None = None) -> DictConfig:
    """The config a checkpoint was trained with: `run_config` if given, else
    `<run>/.hydra/config.yaml`, else the config recorded in the checkpoint itself (`RunRecord`;
    checkpoints written since 2026-12-05), e.g. for a checkpoint moved out of its run."""
    if run_config is not None:
        if not run_config.is_file():
            raise FileNotFoundError(f"run_config={run_config} does not exist.")
        return OmegaConf.load(run_config)
    path = ckpt_path.resolve().parent.parent / ".hydra" / "config.yaml"
    if path.is_file():
        return OmegaConf.load(path)
    try:
        record = RunRecord.read(ckpt_path)
    except (EOFError, RuntimeError, pickle.UnpicklingError) as err:
        raise ValueError(f"{ckpt_path} cannot be read as a checkpoint ({err}): it is truncated or "
                         "not a .ckpt file. Pass another ckpt_path.") from None
    if record is not None:
        log.info("No %s: using the run config recorded in %s.", path, ckpt_path)
        return OmegaConf.create(record["config"])
    raise FileNotFoundError(
        f"No saved run config at {path}, and the checkpoint records none (written before "
        "2026-12-05). fewzero.eval rebuilds the model from the config of the run that wrote the "
        "checkpoint (<run>/.hydra/config.yaml); pass run_config=/path/to/config.yaml if the "
        "checkpoint was moved."
    )


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """`cfg` with `key=value` overrides (values in YAML) applied; a key the config lacks is an
    error, as in `fewzero.train` (a misspelt key would otherwise be added and read by nothing),
    unless written `+key=value`, which adds it."""
    added = [o[1:] for o in overrides if o.startswith("+")]
    changed = [o for o in overrides if not o.startswith("+")]
    cfg = copy.deepcopy(cfg)  # the struct flag set below stays off the caller's config
    OmegaConf.set_struct(cfg, True)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(changed))
    except ConfigKeyError as error:
        raise ValueError(f"The run's config has no key {error.full_key!r} to override. Check its "
                         "spelling against the run's .hydra/config.yaml, or write +key=value to "
                         "add a key.") from None
    with open_dict(cfg):
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(added))
    OmegaConf.set_struct(cfg, False)
    return cfg


def evaluate(ckpt_path: str | Path, overrides: list[str], output_dir: str | Path,
             run_config: str | Path | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Test `ckpt_path` with the run's config plus `overrides`; results go to `output_dir`."""
    ckpt = Path(ckpt_path)
    if not ckpt.is_file():
        found = sorted(p.name for p in ckpt.parent.glob("*.ckpt")) if ckpt.parent.is_dir() else []
        raise FileNotFoundError(
            f"Checkpoint {ckpt} does not exist. Pass ckpt_path=<run>/checkpoints/<file>.ckpt"
            + (f"; {ckpt.parent} has {found}." if found else
               " (a run's checkpoints are in its checkpoints/ folder)."))
    cfg = apply_overrides(load_run_config(ckpt, Path(run_config) if run_config else None), overrides)
    with open_dict(cfg):
        cfg.train, cfg.test, cfg.ckpt_path = False, True, str(ckpt.resolve())
        cfg.paths.output_dir = str(output_dir)
    Path(output_dir, ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(output_dir, ".hydra", "config.yaml"))
    return train(cfg)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or any(a in ("-h", "--help") for a in args) or any("=" not in a for a in args):
        print(USAGE + "\n\n" + __doc__)
        raise SystemExit(0 if args and "=" in " ".join(args) else 2)
    options = dict(a.split("=", 1) for a in args if a.split("=", 1)[0] in OPTIONS)
    overrides = [a for a in args if a.split("=", 1)[0] not in OPTIONS]
    if "ckpt_path" not in options:
        raise SystemExit(USAGE)
    ignored = [a for a in overrides if a.lstrip("+~").startswith(("hydra.", "paths.output_dir="))]
    if ignored:
        raise SystemExit(f"fewzero.eval takes its output directory from hydra.run.dir=<dir> and reads "
                         f"no other hydra.* setting, so {ignored} would do nothing: leave them out. "
                         "The run's config is changed with key=value overrides.")
    if "hydra.run.dir" in options:
        output_dir = Path(options["hydra.run.dir"])
    else:
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
        output_dir = Path("outputs", "eval", "runs", stamp + run_suffix(",".join(sorted(overrides))))
    try:
        evaluate(options["ckpt_path"], overrides, output_dir, options.get("run_config"))
    except FileNotFoundError as error:  # a checkpoint, run config or data file: the message says what
        raise SystemExit(f"fewzero.eval: {error}") from None


if __name__ == "__main__":
    main()
