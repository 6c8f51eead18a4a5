"""Re-evaluate a checkpoint with other test settings, without training.

    python -m fewzero.eval ckpt_path=outputs/train/runs/<run>/checkpoints/<file>.ckpt \
        'dataset.episodes.test=[{n_way: 5, n_shot: 5, n_query: 15, n_episodes: 5000}]'

    python -m fewzero.eval ckpt_path=<zero-shot run>/checkpoints/<file>.ckpt \
        dataset/source=tinysol dataset.source.index_path=/path/to/tinysol_index_6.0.json

The model is rebuilt from the run's saved config (`<run>/.hydra/config.yaml`, or the one the
checkpoint records when it was moved out of its run), the overrides
(`key=value`, values in YAML; a key the run's config lacks is refused unless written
`+key=value`; of the config groups, `dataset/source=<name>` and `dataset/split=<name>`, which
replace that part of the run's config first) are applied on top, and the same metrics.json, figures and
TensorBoard logs as in training are written to a new directory under outputs/eval/runs/, or to
`hydra.run.dir=<dir>` as for `fewzero.train` (the one Hydra setting it reads: it is not a Hydra
application), which may be neither the checkpoint's run directory nor one holding a metrics.json.
A refused evaluation prints why and leaves no new directory behind.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import shutil
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError
from pytorch_lightning.utilities.exceptions import SIGTERMException

from fewzero.callbacks import RunRecord
from fewzero.console import command_refusal
from fewzero.data.clips import refolds
from fewzero.data.features import feature_changes
from fewzero.data.zsl_datamodule import fit_classes, one_sided_validation
from fewzero.report import name_excluded, override_key
from fewzero.side_info.attributes import TRAIN_CLASSES, new_values
from fewzero.train import (
    CONFIG_DIR,
    run_overrides,
    run_suffix,
    save_run_overrides,
    train,
    trained_on_trainval,
)

log = logging.getLogger(__name__)
USAGE = ("usage: python -m fewzero.eval ckpt_path=<file.ckpt> [run_config=<config.yaml>] "
         "[hydra.run.dir=<output dir>] [key=value ...]")
OPTIONS = ("ckpt_path", "run_config", "hydra.run.dir")  # read by main(), not config overrides
EVAL_DIR_VARIABLE = "FEWZERO_EVAL_DIR"  # the output directory main() chose, for DDP's processes


def load_run_config(ckpt_path: Path, run_config: Path | None = None) -> DictConfig:
    """The config a checkpoint was trained with: `run_config` if given, else
    `<run>/.hydra/config.yaml`, else the config recorded in the checkpoint itself (`RunRecord`;
    checkpoints written since 2026-12-05), e.g. for a checkpoint moved out of its run."""
    if run_config is not None:
        if not run_config.is_file():
            raise FileNotFoundError(
                f"run_config={run_config} does not exist. Pass the run's saved config "
                "(<run>/.hydra/config.yaml), or leave run_config out to use the one beside the "
                "checkpoint or recorded in it.")
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


# test settings that belong to one kind of run: its config key -> the settings the other kind has
KIND_SETTINGS = {
    "few-shot": (("dataset.episodes", "dataset.split.train", "dataset.split.val",
                  "dataset.split.test"), "dataset.episodes.test=[...] and dataset.split.test"),
    "zero-shot audio": (("dataset.split.seen", "dataset.split.unseen", "dataset.split.pseudo_unseen",
                   "dataset.test_fold"), "dataset.split.unseen, dataset.split.seen and dataset.test_fold"),
}


def run_kind(cfg: DictConfig) -> str:
    """"few-shot", "zero-shot audio" (a seen/unseen split) or "xlsa17", from a run's config."""
    split = cfg.get("dataset", {}).get("split") or {}
    return "zero-shot audio" if "seen" in split else "few-shot" if "train" in split else "xlsa17"


def check_settings_fit_the_run(cfg: DictConfig, overrides: list[str]) -> None:
    """Refuse a few-shot test setting on a zero-shot checkpoint and the reverse, naming both."""
    kind = run_kind(cfg)
    for other, (prefixes, _) in KIND_SETTINGS.items():
        wrong = [o for o in overrides if other != kind
                 and override_key(o).startswith(prefixes)]
        if wrong:
            own = KIND_SETTINGS.get(kind, ((), "dataset.* keys of the run's .hydra/config.yaml"))[1]
            raise ValueError(f"{wrong} set {other} test settings, but the checkpoint comes from a "
                             f"run of the {kind} kind. Its test is set with {own}.")


# config groups fewzero.eval takes as `group=option`: the data a checkpoint is tested on. Any
# other group (dataset=..., model/backbone=...) would rebuild another model or dataset than the
# checkpoint's run had
EVAL_GROUPS = ("dataset/source", "dataset/split")


def _options(group: str) -> list[str]:
    """The options of a config group (the names of configs/<group>/*.yaml)."""
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))


def _group_config(group: str, option: str) -> DictConfig:
    """configs/<group>/<option>.yaml (one of EVAL_GROUPS), which holds a plain config node."""
    path = CONFIG_DIR / group / f"{option}.yaml"
    if not path.is_file():
        raise ValueError(f"{group}={option}: there is no {path}. The options of {group} are "
                         f"{_options(group)} (fewzero.eval reads no --config-dir: give one of your "
                         f"own key by key, e.g. '{group.replace('/', '.')}.<key>=[...]').")
    node = OmegaConf.load(path)
    if not isinstance(node, DictConfig) or "defaults" in node:
        raise ValueError(f"{group}={option}: {path} is not a plain {group} config (it composes "
                         "others), which fewzero.eval cannot apply. Set its keys with "
                         f"{group.replace('/', '.')}.<key>=<value> instead.")
    return node


def _section_refusal(key: str, value: str) -> str:
    """Why `key=value` (a string for a whole section of the run's config, e.g. dataset=tinysol_zsl
    or dataset.source=tinysol) is refused, and what to write instead."""
    group = key.replace(".", "/")
    head = (f"{key}={value} would replace the run's whole {key} section with a string, but "
            "fewzero.eval rebuilds the checkpoint's own run and changes it only through key=value "
            f"overrides and the config groups {', '.join(EVAL_GROUPS)} (the data it is tested on). ")
    if group in EVAL_GROUPS:
        return head + f"To use configs/{group}/{value}.yaml write {group}={value}."
    composed = CONFIG_DIR / group / f"{value}.yaml"
    source = OmegaConf.load(composed).get("defaults") if composed.is_file() else None
    choice = next((entry["source"] for entry in source or [] if isinstance(entry, DictConfig)
                   and "source" in entry), None)
    if group == "dataset" and choice is not None:
        return head + (f"To test on the audio of {key}={value} write dataset/source={choice}, "
                       "with its dataset.source.* settings (the run's features, split and "
                       "episodes or folds stay as the checkpoint was trained with; change them "
                       "with dataset.* overrides).")
    return head + f"Set its keys instead ({key}.<key>=<value>)."


def _is_scalar(value: str) -> bool:
    """Whether an override's value (YAML) is a string, number or boolean: not null (which
    switches a section off, e.g. model.whitening=null), a mapping or a list."""
    try:
        parsed = OmegaConf.from_dotlist([f"value={value}"])["value"]
    except Exception:  # left to apply_overrides, which names what it cannot read
        return False
    return parsed is not None and not isinstance(parsed, DictConfig | ListConfig)


def apply_group_choices(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, list[str]]:
    """`cfg` with each config group override of EVAL_GROUPS (`dataset/source=tinysol`) applied as
    Hydra composes it: its node (`dataset.source`) replaced by configs/<group>/<option>.yaml,
    before any key=value override (which may then set its keys); and the other overrides.

    Refused, with what to write instead: another config group (`model/backbone=...`), and a string
    for a whole section of the run's config (`dataset=tinysol_zsl`, `dataset.source=tinysol`),
    which OmegaConf would otherwise put in place of the section.
    """
    rest = []
    for override in overrides:
        key, _, value = override.partition("=")
        bare = key.lstrip("+~")
        if "/" in bare:
            if bare not in EVAL_GROUPS or key != bare:
                raise ValueError(
                    f"{override}: fewzero.eval rebuilds the checkpoint's own run and takes the "
                    f"config groups {', '.join(EVAL_GROUPS)} only (the data it is tested on); "
                    "any other setting is changed with key=value overrides.")
            node = bare.replace("/", ".")
            if OmegaConf.select(cfg, node) is None:
                raise ValueError(f"{override}: the run's config has no {node} to replace.")
            cfg = copy.deepcopy(cfg)
            OmegaConf.update(cfg, node, _group_config(bare, value), merge=False, force_add=True)
            continue
        current = (OmegaConf.select(cfg, bare, throw_on_resolution_failure=False)
                   if key == bare else None)
        if isinstance(current, DictConfig) and _is_scalar(value):
            raise ValueError(_section_refusal(bare, value))
        rest.append(override)
    return cfg, rest


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """`cfg` with `key=value` overrides (values in YAML) applied; a key the config lacks is an
    error, as in `fewzero.train` (a misspelt key would otherwise be added and read by nothing),
    unless written `+key=value`, which adds it. Config group overrides of EVAL_GROUPS
    (`dataset/source=tinysol`) replace their node first (`apply_group_choices`). A setting of the
    other kind of run (few-shot episodes or split on a zero-shot checkpoint, say) is an error
    either way."""
    check_settings_fit_the_run(cfg, overrides)
    kind = run_kind(cfg)
    cfg, overrides = apply_group_choices(cfg, overrides)
    if run_kind(cfg) != kind:
        raise ValueError(f"The overrides make the run's dataset.split a split of the {run_kind(cfg)} "
                         f"kind, but the checkpoint comes from a run of the {kind} kind. Its test "
                         f"is set with {KIND_SETTINGS.get(kind, ((), 'dataset.* keys'))[1]}.")
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


def check_tested_clips_unheard(trained: DictConfig, tested: DictConfig) -> None:
    """Refuse overrides under which the test would score clips that trained or selected the
    checkpoint. `trained`: the run's config; `tested`: it with the eval overrides. A zero-shot run
    (`dataset.split.seen`) trained and validated its seen classes on every fold but its
    `test_fold`; a few-shot run its `split.train` and `split.val` instruments, which are no test
    class of it on any folds or source. Checked on class names and folds; another
    `dataset.source` of the same kind with other fold settings counts as other folds, and one of
    another kind (another `_target_`, e.g. real TinySOL for a run on rendered SOL) as other
    recordings, whose every fold is new to the seen classes (a class the run trained is still no
    unseen or few-shot test class)."""
    kind, before, after = run_kind(trained), trained.dataset, tested.dataset
    split, new_split = before.get("split") or {}, after.get("split") or {}
    source, new_source = before.get("source") or {}, after.get("source") or {}
    refolded = refolds(source, new_source)
    problems = []
    if kind == "zero-shot audio":
        seen = list(split["seen"])
        heard = [name for name in new_split.get("unseen", []) if name in seen]
        if heard:
            problems.append(f"dataset.split.unseen names {heard}, seen classes of the run (it "
                            f"trained or validated on them); its unseen classes were "
                            f"{list(split.get('unseen', []))}")
        # another kind of source (dataset/source=tinysol for a run on rendered SOL) holds other
        # recordings: none of its folds was heard, so any may be the seen classes' test fold
        other_source = source.get("_target_") != new_source.get("_target_")
        moved = (after.get("test_fold") != before.get("test_fold") and not other_source) or refolded
        heard = [name for name in new_split.get("seen", []) if name in seen]
        if moved and heard:
            problems.append(f"the seen classes' test fold is now fold {after.get('test_fold')}"
                            + (" of another fold dealing (dataset.source)" if refolded else "")
                            + f", but the run trained {heard} on every fold except its fold "
                            f"{before.get('test_fold')}; keep dataset.test_fold="
                            f"{before.get('test_fold')} and the run's dataset.source"
                            + (" (a new instrument goes after the run's dataset.source.instruments, "
                               "which stay as they were)" if refolded and source.get("instruments")
                               != new_source.get("instruments") else ""))
    elif kind == "few-shot":
        # a few-shot test class is new to the model: one it trained or validated on is refused on
        # any folds and source (the embedding learned to tell it apart, whichever clips it heard)
        learned = [*split.get("train", []), *split.get("val", [])]
        heard = [name for name in new_split.get("test", []) if name in learned]
        if heard:
            problems.append(f"dataset.split.test names {heard}, which the run trained or validated "
                            f"on (dataset.split.train {list(split.get('train', []))}, val "
                            f"{list(split.get('val', []))}): a few-shot test class must be new to "
                            "the model, whatever the folds or source it is tested on")
    if problems:
        raise ValueError("These overrides would test the checkpoint on classes or clips it learned "
                         "from, not on new ones: " + "; ".join(problems) + ". Test other classes, or train "
                         "a run whose split keeps them out.")


def check_whitening_chosen_on_new_classes(trained: DictConfig, tested: DictConfig) -> None:
    """Refuse a few-shot test whose validation instruments, on which the test-time whitening's
    shrinkage and support weight are chosen, include ones the run trained on: the embedding
    learned to separate those, so their episodes would choose for classes it already knows, not
    for the new test classes. `trained`: the run's config; `tested`: it with the eval overrides."""
    if run_kind(trained) != "few-shot" or (tested.get("model") or {}).get("whitening") is None:
        return
    train = list((trained.dataset.get("split") or {}).get("train", []))
    known = [name for name in (tested.dataset.get("split") or {}).get("val", []) if name in train]
    if known:
        raise ValueError(f"dataset.split.val names {known}, which the run trained on (its "
                         f"dataset.split.train was {train}): the test-time whitening would be chosen "
                         "on episodes of classes the embedding learned to separate, not on classes "
                         "as new to it as the test ones. List validation instruments the run never "
                         "trained on (its own dataset.split.val, say), or test without the "
                         "whitening: model.whitening=null.")


def check_features_kept(trained: DictConfig, tested: DictConfig) -> None:
    """Refuse log-mel settings other than the run's: the checkpoint learned its own front end, and
    other settings would either fail to load it (another n_mels: other weight shapes) or score it,
    without a word, on spectrograms it never saw (another hop, FFT, sample rate or band). Only
    `clip_seconds`, how much of each clip is cached, may change. `trained`: the run's config;
    `tested`: it with the eval overrides."""
    before, after = trained.dataset.get("features"), tested.dataset.get("features")
    if before is None or after is None:
        return
    changed = feature_changes(before, after)
    if changed:
        raise ValueError(f"{', '.join(changed)}: the checkpoint learned log-mel features of the run's "
                         "settings and would be tested on others it never saw. Leave dataset.features "
                         "as the run had it (only clip_seconds may change), or train a run with "
                         "these settings.")


def check_seen_classes_trained(trained: DictConfig, tested: DictConfig) -> None:
    """Refuse a zero-shot test whose `dataset.split.seen` names a class the run never trained on:
    its seen top-1 and GZSL s would then be figures of a class the model never heard, reported as
    seen, and GZSL would lower its scores by the penalty meant for trained classes. `trained`: the
    run's config; `tested`: it with the eval overrides."""
    if run_kind(trained) != "zero-shot audio":
        return
    seen = list(trained.dataset.split.seen)
    untrained = [name for name in (tested.dataset.get("split") or {}).get("seen", []) if name not in seen]
    if untrained:
        raise ValueError(f"dataset.split.seen names {untrained}, which the run never trained on (its "
                         f"seen classes were {seen}): the test would report seen top-1 and GZSL s over "
                         "classes the model never heard, and lower their scores by the calibration "
                         "penalty meant for trained ones. A class the run never trained on is unseen "
                         "to it: list it in dataset.split.unseen, and dataset.split.seen among the "
                         "run's seen classes.")


def check_attribute_columns_kept(trained: DictConfig, tested: DictConfig) -> None:
    """Refuse attribute values the run's table never used (in rows added for new classes, say):
    each adds a column to the attribute vectors, for which the checkpoint's head has no weights,
    so no side_info.dim can make the checkpoint load. `trained`: the run's config; `tested`: it
    with the eval overrides."""
    side_info, before = tested.get("side_info") or {}, trained.get("side_info") or {}
    if (side_info.get("_target_") != "fewzero.side_info.attributes.AttributeTable"
            or before.get("_target_") != side_info.get("_target_")):
        return
    unused = new_values(side_info.table, before.table, list(side_info.categorical))
    if unused:
        raise ValueError(
            f"{unused} are attribute values the run's side_info.table never used: each would add a "
            f"column to the attribute vectors, and the checkpoint's head reads the run's "
            f"side_info.dim={before.get('dim')} columns only. Describe the class with values the "
            "run's table has, or train a run whose side_info.table has the row (its class left "
            "out of dataset.split until the test).")


def fitted_classes(trained: DictConfig, tested: DictConfig, ckpt: Path) -> tuple[list[str], list[str]]:
    """(the classes the checkpoint's fit trained against, those the tested split's training role
    names) of a zero-shot audio run: every seen class for the refit's checkpoint, the seen
    classes less the pseudo-unseen ones for the validation phase's."""
    train_on = "trainval" if trained_on_trainval(ckpt) else "train"
    rows, now = (fit_classes(cfg.dataset.split.seen, cfg.dataset.split.get("pseudo_unseen"), train_on)
                 for cfg in (trained, tested))
    return rows, now


def keep_training_classes(trained: DictConfig, tested: DictConfig, ckpt: Path) -> None:
    """When the tested split's training role names other classes than the checkpoint's fit
    trained against (seen classes left out to test on a partial dataset, say), set
    `model.trained_classes` in `tested` to the fit's: the model then takes from them what
    depends on them (ConSE's anchors, centred side information), and is the model that was
    trained, not one rebuilt around the tested split."""
    if run_kind(trained) != "zero-shot audio":
        return
    rows, now = fitted_classes(trained, tested, ckpt)
    if now != rows:
        with open_dict(tested):
            tested.model.trained_classes = rows
        log.info("The checkpoint's fit trained against %s; the tested split's training role would "
                 "be %s: the model keeps what it took from the classes it trained against.", rows, now)


def keep_attribute_scaling(trained: DictConfig, tested: DictConfig, overrides: list[str],
                           ckpt: Path) -> None:
    """Standardise an attribute table's numeric columns over the rows the checkpoint's fit
    standardised them on when the eval overrides would change them: rows added for new classes
    to test, or another `dataset.split`, would move every class's vector, the trained classes'
    too, away from those the checkpoint trained with. The run's rows: its fit's training classes
    (`standardize_on: train_classes`, the config's: the seen classes for the refit, less the
    pseudo-unseen ones for the validation phase's checkpoint), or the rows its config named
    (runs of sessions 36-39: `${dataset.split.seen}`), or every row of its table (runs from before).
    `trained`: the run's config; `tested`: it with the `overrides`, changed in place
    (`side_info.standardize_on`, unless the overrides set it)."""
    side_info = tested.get("side_info") or {}
    if (side_info.get("_target_") != "fewzero.side_info.attributes.AttributeTable"
            or not side_info.get("numeric")
            or any(override_key(o) == "side_info.standardize_on" for o in overrides)):
        return
    before = trained.get("side_info") or {}
    table = side_info.get("table") or {}
    if before.get("standardize_on") == TRAIN_CLASSES:
        rows, now = fitted_classes(trained, tested, ckpt)
    else:
        rows = list(before.get("standardize_on") or before.get("table") or {})
        now = list(side_info.get("standardize_on") or table)
    if rows and now != rows and all(name in table for name in rows):
        with open_dict(tested):
            tested.side_info.standardize_on = rows
        log.info("The numeric columns %s of side_info.table are standardised over the run's rows %s, "
                 "as in training (the overrides would standardise them over %s).",
                 list(side_info.numeric), rows, now)


def check_output_dir(ckpt: Path, output_dir: Path, setting: str = "output_dir") -> None:
    """Refuse an output directory that is the checkpoint's own run directory or already holds a
    metrics.json: the evaluation would overwrite that run's metrics.json, .hydra/config.yaml
    (which `fewzero.eval` rebuilds the model from), figures and TensorBoard logs. `setting`:
    what the caller named the directory with (`evaluate`'s output_dir; the command line's
    hydra.run.dir, which may also be left out)."""
    own_run = output_dir.resolve() == ckpt.resolve().parent.parent
    if own_run or (output_dir / "metrics.json").exists():
        raise ValueError(
            f"{setting}={output_dir} is "
            + ("the run directory of the checkpoint" if own_run else "a run directory that holds a "
               "metrics.json already")
            + f": the evaluation would overwrite its metrics.json, config, figures and TensorBoard "
            f"logs. Choose another {setting}"
            + (", or leave it out (a new directory under outputs/eval/runs/)."
               if setting == "hydra.run.dir" else " (a new folder)."))


def evaluation_overrides(ckpt: Path, overrides: list[str]) -> list[str]:
    """What makes an evaluation what it is, for `fewzero.report` to group evaluations by (over
    seeds, like training runs): the overrides of the checkpoint's run (its
    `.hydra/overrides.yaml`, else those its checkpoint records; none if neither says), with
    those of a key the evaluation sets replaced by the evaluation's `overrides`. Without them
    every evaluation read as "(defaults)", and evaluations of other test classes or of runs
    trained otherwise were averaged as one configuration."""
    run_dir = ckpt.resolve().parent.parent
    run = run_overrides(run_dir)
    if run is None:
        try:
            run = (RunRecord.read(ckpt) or {}).get("overrides") or []
        except (EOFError, RuntimeError, pickle.UnpicklingError):
            run = []
    # nor what the run's directory name left out (paths.log_dir, ...): no other configuration
    left_out = {override_key(o) for o in overrides} | set(name_excluded(run_dir))
    return [o for o in run if override_key(o) not in left_out] + list(overrides)


def evaluate(ckpt_path: str | Path, overrides: list[str], output_dir: str | Path,
             run_config: str | Path | None = None, *, output_dir_setting: str = "output_dir"
             ) -> tuple[dict[str, float], dict[str, Any]]:
    """Test `ckpt_path` with the run's config plus `overrides`; results go to `output_dir`.

    What `python -m fewzero.eval` runs, callable from Python (a notebook): `overrides` as the
    command line's (`key=value`, `+key=value`, `dataset/source=<name>`), `output_dir` a new
    folder (the command line's hydra.run.dir; neither the checkpoint's run directory nor one
    holding a metrics.json). Settings that would test what the checkpoint trained or validated
    on raise ValueError naming them. Returns `train`'s (metrics, objects): test metrics by key
    (`test/5way_5shot_acc`, ...), also in `<output_dir>/metrics.json`. `output_dir_setting`: the
    name refusals give the output directory (`main` passes "hydra.run.dir")."""
    ckpt = Path(ckpt_path)
    if not ckpt.is_file():
        found = sorted(p.name for p in ckpt.parent.glob("*.ckpt")) if ckpt.parent.is_dir() else []
        raise FileNotFoundError(
            f"Checkpoint {ckpt} does not exist. Pass ckpt_path=<run>/checkpoints/<file>.ckpt"
            + (f"; {ckpt.parent} has {found}." if found else
               " (a run's checkpoints are in its checkpoints/ folder)."))
    check_output_dir(ckpt, Path(output_dir), output_dir_setting)
    trained = load_run_config(ckpt, Path(run_config) if run_config else None)
    cfg = apply_overrides(trained, overrides)
    check_tested_clips_unheard(trained, cfg)
    check_whitening_chosen_on_new_classes(trained, cfg)
    check_features_kept(trained, cfg)
    check_seen_classes_trained(trained, cfg)
    check_attribute_columns_kept(trained, cfg)
    keep_attribute_scaling(trained, cfg, overrides, ckpt)
    keep_training_classes(trained, cfg, ckpt)
    with open_dict(cfg):
        cfg.train, cfg.test, cfg.ckpt_path = False, True, str(ckpt.resolve())
        cfg.paths.output_dir = str(output_dir)
    Path(output_dir, ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(output_dir, ".hydra", "config.yaml"))
    save_run_overrides(evaluation_overrides(ckpt, overrides), output_dir)
    return train(cfg, report_extra={k: v for k, v in
                                    {"penalty_not_chosen": penalty_not_chosen(trained)}.items() if v})


def penalty_not_chosen(trained: DictConfig) -> str | None:
    """Why the GZSL calibration penalty of a checkpoint was not chosen on validation: its
    zero-shot run's validation scored one side only (no pseudo-unseen classes, or no held-out
    seen fold), so the penalty stayed 0 (`one_sided_validation`); None otherwise (chosen, or a
    run of another kind). `trained`: the run's config."""
    dataset = trained.dataset
    if not str(dataset.get("_target_", "")).endswith(".ZeroShotDataModule"):
        return None
    missing = one_sided_validation(dataset.split.get("pseudo_unseen"), dataset.get("val_fold"))
    return missing and f"its run's validation scored one side only, as {missing}"


def remove_unfinished_output_dir(output_dir: Path) -> bool:
    """Remove `output_dir`, a directory the command created and did not finish (refused, or
    stopped), when it holds only what `evaluate` writes before the test's results: its config
    (`.hydra/`) and TensorBoard's files (event files, Lightning's hparams.yaml). Left, it would
    stand among the runs as one that never finished (`fewzero.report`). Anything else in it is
    kept, with the directory. Returns whether it was removed."""
    written = [p for p in output_dir.rglob("*") if p.is_symlink() or not p.is_dir()]
    if not all(p.relative_to(output_dir).parts[0] == ".hydra"
               or p.name.startswith("events.out.tfevents.") or p.name == "hparams.yaml" for p in written):
        return False
    shutil.rmtree(output_dir)
    return True


def unquoted(value: str) -> str:
    """`value` without the pair of quotes around it that Hydra's override syntax takes
    (`"..."` or `'...'`), as fewzero.train reads a quoted path; other values unchanged."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("--config-dir", "-cd") or a.startswith("--config-dir=") for a in args):
        raise SystemExit("fewzero.eval takes no --config-dir: it rebuilds the checkpoint's run from the "
                         "config that run saved, which holds what its --config-dir gave it (components "
                         "and split of your own). To test on a split of your own, give its lists: "
                         "'dataset.split.test=[...]' for a few-shot checkpoint, "
                         "'dataset.split.seen=[...]' 'dataset.split.unseen=[...]' for a zero-shot one.")
    asked = any(a in ("-h", "--help") for a in args)
    if asked or not args or any("=" not in a for a in args):
        print(USAGE + "\n\n" + __doc__)
        raise SystemExit(0 if asked else 2)  # usage asked for, or a command line it cannot read
    # quoted as fewzero.train's paths are ('ckpt_path="<run>/checkpoints/last.ckpt"', run directory
    # names holding '=' and ','), or not: read the same
    options = {key: unquoted(value) for key, value in (a.split("=", 1) for a in args)
               if key in OPTIONS}
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
        # DDP's other processes run this command again: they find the first one's directory here
        output_dir = Path(os.environ.setdefault(EVAL_DIR_VARIABLE, str(Path(
            "outputs", "eval", "runs", stamp + run_suffix(",".join(sorted(overrides)))))))
    # a directory of its own (not a user's, or the first DDP process's for the others)
    created = not output_dir.exists()
    try:
        evaluate(options["ckpt_path"], overrides, output_dir, options.get("run_config"),
                 output_dir_setting="hydra.run.dir")
    except SIGTERMException:  # Lightning stopped the test after a batch: a SystemExit with no
        # code, which would exit 0 as if the evaluation had finished
        kept = not (created and output_dir.is_dir() and remove_unfinished_output_dir(output_dir))
        print("fewzero.eval: stopped by SIGTERM before the test finished, so it has no "
              "results" + (f" ({output_dir} holds no metrics.json)" if kept and output_dir.is_dir()
                           else "") + ". Run the same command again.", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as error:  # a refusal (settings that would test clips it learned from), or
        # a missing checkpoint, run config or data file: the message says what to do
        message = command_refusal(error)
        if message is None:
            raise  # a bug: its traceback, and the directory as it was left
        if created and output_dir.is_dir():
            remove_unfinished_output_dir(output_dir)
        raise SystemExit(f"fewzero.eval: {message}") from None
    finally:
        os.environ.pop(EVAL_DIR_VARIABLE, None)


if __name__ == "__main__":
    main()
