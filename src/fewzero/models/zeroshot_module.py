"""LightningModule for zero-shot learning: audio encoder + compatibility head + side information.

Training scores each excerpt against the vectors of the datamodule's `train_classes` (seen minus
pseudo-unseen in the validation phase, every seen class in a refit on trainval). Validation
embeds the held-out seen fold and the pseudo-unseen classes (both carved from seen data) and
chooses the calibrated-stacking penalty there; testing embeds the seen test fold and every unseen clip once
and reports ZSL, seen and GZSL metrics (see `fewzero.zsl_evaluation`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from fewzero.data.clips import refolding_keys
from fewzero.data.features import MelFeatures, feature_changes
from fewzero.models.pitch_prior import SETTINGS, ZSL_SCORES, PitchRangePrior
from fewzero.models.resumable import ResumableModule
from fewzero.models.settings import flag, non_negative
from fewzero.models.zsl_heads import CompatibilityHead
from fewzero.plots import confusion_figure, save_figure, weight_choice_figure, zsl_embedding_figure
from fewzero.side_info.base import ClassVectors, SideInformation
from fewzero.zsl_evaluation import (
    ZslResults,
    calibrate_stacking,
    evaluate_zsl,
    topk_accuracy,
    true_class_log_likelihood,
)

log = logging.getLogger(__name__)


def checkpoint_backbone(path: str | Path) -> str:
    """"; its run's model.backbone was ..." for a message: the backbone config of the run that
    wrote checkpoint `path` (and its model/backbone option, from the run's .hydra/hydra.yaml),
    or "" when the run's config cannot be found."""
    from fewzero.eval import load_run_config  # here: fewzero.eval imports the training entry point

    try:
        backbone = load_run_config(Path(path)).get("model", {}).get("backbone")
    except (FileNotFoundError, ValueError):
        return ""
    if backbone is None:
        return ""
    hydra_file = Path(path).resolve().parent.parent / ".hydra" / "hydra.yaml"
    choice = (OmegaConf.load(hydra_file).hydra.runtime.choices.get("model/backbone")
              if hydra_file.is_file() else None)
    return ("; its run's model.backbone was "
            + (f"model/backbone={choice}: " if choice else "")
            + str(OmegaConf.to_container(backbone)))


def check_init_checkpoint_exists(path: str | Path) -> None:
    """Refuse a `model.init_checkpoint` that is no file, naming it (torch.load's error named
    neither the setting nor the fix, behind a traceback)."""
    if not Path(path).is_file():
        what = "is a folder, not a checkpoint" if Path(path).is_dir() else "does not exist"
        raise FileNotFoundError(f"model.init_checkpoint={path} {what}. Set it to a fewzero "
                                "run's checkpoint (<run>/checkpoints/<file>.ckpt), or leave it null.")


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Initialise `backbone` from a fewzero checkpoint (few-shot `net.backbone.*` or zero-shot
    `backbone.*` weights)."""
    check_init_checkpoint_exists(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    for prefix in ("net.backbone.", "backbone."):
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if weights:
            own = backbone.state_dict()
            shapes = [k for k in weights.keys() & own.keys() if weights[k].shape != own[k].shape]
            if own.keys() != weights.keys() or shapes:
                raise ValueError(
                    f"model.init_checkpoint={path} holds the weights of another audio encoder than "
                    f"this run's model.backbone ({type(backbone).__module__}."
                    f"{type(backbone).__qualname__}): {len(own.keys() - weights.keys())} of its "
                    f"weights are missing, {len(weights.keys() - own.keys())} are unknown to it and "
                    f"{len(shapes)} have other shapes{checkpoint_backbone(path)}. Build "
                    "model.backbone as the checkpoint's run did (the same model/backbone option and "
                    "settings, e.g. its n_mels), or leave model.init_checkpoint=null.")
            backbone.load_state_dict(weights)
            log.info("Initialised the audio encoder from %s (%s*)", path, prefix)
            return
    raise ValueError(f"{path} has no backbone weights (keys net.backbone.* or backbone.*): it is "
                     "not a fewzero checkpoint. Set model.init_checkpoint to a checkpoint of a "
                     "fewzero few-shot or zero-shot run, or leave it null.")


def checkpoint_reading(path: str | Path) -> dict[str, Any] | None:
    """What the run that wrote fewzero checkpoint `path` read, from its saved config
    (`<run>/.hydra/config.yaml`, else the one the checkpoint records): its `dataset.split`,
    `dataset.folds` and `dataset.test_fold` (those it has), as plain containers, for
    `clips_heard`, and its `dataset.features`, for `check_init_reading`. None when neither config
    can be found."""
    from fewzero.eval import load_run_config  # here: fewzero.eval imports the training entry point

    try:
        config = load_run_config(Path(path))
    except FileNotFoundError:
        return None
    dataset = config.get("dataset", {})
    return {key: OmegaConf.to_container(dataset[key], resolve=True)
            if OmegaConf.is_config(dataset[key]) else dataset[key]
            for key in ("split", "folds", "test_fold", "features", "source") if key in dataset}


def check_init_source(cfg: Any) -> None:
    """Refuse, before any data are made, a `model.init_checkpoint` whose run read this run's
    `dataset.source` with its clips dealt to folds otherwise (another n_folds, fold_by or seed:
    `fewzero.data.clips.refolding_keys`). The fold check (`check_init_reading`) compares fold numbers, which
    then name other clips: rendered SOL renders each note alike under any fold setting, so a
    few-shot run on folds [0, 1, 2] of fold_by=note has trained on most of the clips that fold 4
    of fold_by=pitch tests. A run of another kind of source (other recordings) is not refused."""
    path = (cfg.get("model") or {}).get("init_checkpoint")
    if not path or not Path(path).is_file():
        return  # none, or a missing file, which the encoder's loading names
    theirs = (checkpoint_reading(path) or {}).get("source")
    if theirs is None:
        return
    ours = OmegaConf.to_container(cfg.dataset.source, resolve=True)
    # instruments appended to either table change nothing of the others' folds: a key counts
    # when it refolds both ways
    changed = set(refolding_keys(theirs, ours)) & set(refolding_keys(ours, theirs))
    if changed:
        raise ValueError(
            f"model.init_checkpoint={path} comes from a run that dealt this source's clips to folds "
            f"otherwise ({', '.join(f'dataset.source.{key}' for key in sorted(changed))} differ): the folds "
            "it trained on are not this run's, and its encoder may have heard this run's test or "
            "validation clips. Set dataset.source as its run had it (either table may have more "
            "instruments after the other's), start from a run on this run's dataset.source, or leave "
            "model.init_checkpoint=null.")


def clips_heard(dataset: dict[str, Any], all_folds: set[int]) -> dict[str, set[int]]:
    """{class: folds} whose clips trained or selected a checkpoint whose run read `dataset`
    (`checkpoint_reading`): a few-shot run's train and validation instruments on its
    `dataset.folds` (every fold of `all_folds` when null), a zero-shot run's seen classes on
    every fold but its test fold."""
    split = dataset.get("split") or {}
    if "seen" in split:
        return {name: all_folds - {dataset.get("test_fold", 4)} for name in split["seen"]}
    folds = all_folds if dataset.get("folds") is None else set(dataset["folds"])
    return {name: set(folds) for name in [*split.get("train", []), *split.get("val", [])]}


def check_init_checkpoint(path: str | Path, dm: Any, class_cv: bool = False) -> None:
    """Refuse an encoder initialisation that has heard a clip this zero-shot run keeps for test
    or validation: an unseen class, the seen classes' test fold, a pseudo-unseen class (with
    `class_cv`, any class a fold of class cross-validation holds out) or the validation fold.
    `dm`: the run's set-up `ZeroShotDataModule`; what is allowed is its `pretraining_clips`."""
    if Path(path).is_dir():  # a run's folder, say: torch.load's IsADirectoryError otherwise
        check_init_checkpoint_exists(path)
    reading = checkpoint_reading(path)
    if reading is None:  # no run config beside it: refuse a missing file rather than "cannot check"
        check_init_checkpoint_exists(path)
    check_init_reading(reading, path, dm, class_cv)


def check_init_reading(reading: dict[str, Any] | None, path: str | Path, dm: Any,
                       class_cv: bool = False) -> None:
    """`check_init_checkpoint` on what the run of init checkpoint `path` read (`reading`, from
    `checkpoint_reading`; None: unknown, which is warned about), e.g. as a run recorded it in its
    own checkpoints: `path` may have moved since."""
    theirs = (reading or {}).get("features")
    if theirs is not None and isinstance(getattr(dm, "features", None), MelFeatures):
        # another n_mels is refused by the weight shapes; another hop, FFT, sample rate or band
        # would load and start the encoder on spectrograms it never saw
        changed = feature_changes(theirs, asdict(dm.features))
        if changed:
            raise ValueError(f"model.init_checkpoint={path} holds an encoder trained on log-mel "
                             f"features of other settings: {', '.join(changed)}. Set "
                             "dataset.features as its run had them (the few-shot and zero-shot "
                             "datasets then share one cache), or leave model.init_checkpoint=null.")
    all_folds = set(dm.table.folds.unique().tolist())
    heard = None if reading is None else clips_heard(reading, all_folds)
    if heard is None:
        log.warning("model.init_checkpoint=%s: no .hydra/config.yaml in its run directory, so "
                    "fewzero cannot check that its training never used this run's test or "
                    "validation clips (unseen classes %s, fold %s of the seen ones).",
                    path, dm.unseen, dm.test_fold)
        return
    allowed = dm.pretraining_clips(class_cv)
    leaks: dict[str, list[str]] = {}
    for name, folds in heard.items():
        extra = folds - allowed.get(name, set())
        if name not in dm.class_names or not extra:
            continue
        if name in dm.unseen:
            reason = "unseen classes (test only)"
        elif dm.test_fold in extra:
            reason = f"fold {dm.test_fold} (the seen classes' test fold) of"
        elif name not in allowed:
            reason = ("pseudo-unseen classes (validation"
                      + (", held out by a fold of class cross-validation)" if class_cv else ")"))
        else:
            reason = f"fold {dm.val_fold} (the validation fold) of"
        leaks.setdefault(reason, []).append(name)
    if leaks:
        classes = sorted(allowed)
        folds = sorted(set().union(*allowed.values())) if allowed else []
        raise ValueError(
            f"model.init_checkpoint={path} comes from a run that trained or selected on clips this "
            f"zero-shot run keeps for test or validation: "
            + "; ".join(f"{reason} {names}" for reason, names in leaks.items())
            + ". Its encoder would carry them into the model before they are scored. Start from a "
            f"run that read only {classes} on folds {folds} (for a few-shot run: dataset.split.train "
            f"and dataset.split.val among those classes, dataset.folds={folds})"
            + (", or set model.pitch_prior.class_cv=false, which holds out fewer classes"
               if class_cv else "")
            + ", or leave model.init_checkpoint=null.")


def is_closed_form(head: nn.Module) -> bool:
    """Whether `head` is fitted in closed form on frozen embeddings (`CompatibilityHead.closed_form`;
    False for a head of another kind)."""
    return bool(getattr(head, "closed_form", False))


def has_shared_space(head: nn.Module) -> bool:
    """Whether `head` maps audio and class vectors into one space (`embed_audio`, `embed_classes`
    of its own), which the test's embedding figure draws. A head that scores pairs otherwise (its
    own `forward`, say an MLP on each (audio, class) pair) has none."""
    return all(callable(getattr(head, name, None))
               and getattr(type(head), name, None) is not getattr(CompatibilityHead, name)
               for name in ("embed_audio", "embed_classes"))


def check_head_signature(head: nn.Module) -> None:
    """Refuse a head whose forward cannot be called as head(audio, side), before any training."""
    try:
        inspect.signature(head.forward).bind(None, None)
    except TypeError:
        name = f"{type(head).__module__}.{type(head).__qualname__}"
        raise ValueError(
            f"model.head ({name}) is called as head(audio, side): audio (batch, audio_dim) "
            "embeddings and side (n_classes, side_dim) class vectors, returning scores (batch, "
            f"n_classes); its forward{inspect.signature(head.forward)} cannot take them. Give its "
            "forward those two arguments, or subclass fewzero.models.zsl_heads.CompatibilityHead "
            "and write its embed_audio and embed_classes.") from None


def first_occurrences(indices: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each value of (n,) `indices`, in their order."""
    unique, inverse = torch.unique(indices, return_inverse=True)
    positions = torch.arange(len(indices), device=indices.device)
    first = torch.full((len(unique),), len(indices), dtype=torch.long, device=indices.device)
    return first.scatter_reduce(0, inverse, positions, reduce="amin").sort().values


def _with_prior(head_scores: torch.Tensor, prior: torch.Tensor | None, weight: float) -> torch.Tensor:
    """(n, n_classes) head scores + weight * the pitch prior's log-likelihood (same shape), or
    the head scores alone when there is no prior."""
    return head_scores if prior is None else head_scores + weight * prior


class ZeroShotModule(ResumableModule):
    """Audio encoder + compatibility head trained on seen classes, evaluated on unseen ones.

    Args:
        backbone: audio encoder, (batch, n_mels, frames) -> (batch, audio_dim).
        head: a `CompatibilityHead` sized (audio_dim, ${side_info.dim}), or any module called as
            head(audio (batch, audio_dim), side (n_classes, side_dim)) -> scores (batch,
            n_classes). The test's embedding figure needs its `embed_audio` and `embed_classes`
            (a shared space; `has_shared_space`) and is left out without them.
        loss: criterion on (batch, n_train_classes) scores and (batch,) targets.
        side_info: a `SideInformation` source; its vectors of the datamodule's classes are built
            in `setup` (cached on disk).
        optimizer, scheduler: partials, as in `FewShotModule` (unused by closed-form heads).
        augment: optional training-only augmentation of the log-mel excerpts.
        init_checkpoint: optional fewzero checkpoint (few-shot or zero-shot) to start the
            encoder from. What its run read (`checkpoint_reading`) is recorded with the path in
            every checkpoint of this run (`checkpoint["init_checkpoint"]`).
        init_record: such a record, given when a checkpoint is tested alone (`fewzero.eval`,
            through `fewzero.train.build_model`): it stands for `init_checkpoint`, whose file is
            not read then (it may have moved since): the tested checkpoint's weights replace
            those it would load, and `setup` checks the recorded reading against the test's data.
        freeze_backbone: keep the encoder fixed (eval mode). None: fixed for closed-form heads
            (which fit on a frozen encoder, so False is refused for them), trained otherwise.
        plot_dir: where test figures are written as PNG (also sent to TensorBoard).
        figures: False draws no figure (test confusion matrices and embeddings, class
            cross-validation's sweep) at all, for runs whose numbers alone matter (a confusion
            matrix costs 0.2-0.6 CPU-s: scripts/benchmark_figures.py); the metrics are the same
            either way.
        pitch_prior: optional `PitchRangePrior`: a pitch head trained alongside (on the seen
            training clips' pitches) whose range log-likelihood (with its formant likelihood,
            when it has one: scale fitted on the training clips in `setup`) is added to every
            evaluation score, validation included. With `weight_candidates`, each evaluation
            setting's weight is chosen at every validation by that setting's own score: ZSL by
            the prior's `zsl_score` on the pseudo-unseen classes (top-1 or log-likelihood),
            seen by top-1 on the held-out fold, GZSL with the calibration penalty by calibrated H.
        transpose_semitones: 0, or train on every excerpt transposed by a random whole number of
            semitones in [-this, this]: its log-mel scaled in frequency (pitch and formants
            together, as a smaller or larger instrument of the same kind sounds), its class kept,
            its pitch label (for the pitch prior) moved by as much. The head then learns what is
            left of an instrument's sound when its size changes; the prior judges the register.
        trained_classes: set by `fewzero.eval` when a checkpoint is tested on another split than
            its run's: the classes its fit trained against. What depends on them is taken from
            them, not from the tested split's training role: the side information's statistics
            over classes (centring, the attribute table's standardisation), ConSE's anchors and
            the formant likelihood's stand-in for undocumented classes. None: the datamodule's
            training classes; refused in a fit, which trains against those.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, loss: nn.Module,
                 side_info: SideInformation, optimizer: Callable[..., Any],
                 scheduler: Callable[..., Any] | None = None, augment: nn.Module | None = None,
                 init_checkpoint: str | None = None, freeze_backbone: bool | None = None,
                 plot_dir: str | None = None, pitch_prior: PitchRangePrior | None = None,
                 transpose_semitones: int = 0, init_record: dict[str, Any] | None = None,
                 figures: bool = True, trained_classes: Sequence[str] | None = None):
        super().__init__()
        # a whole number of semitones: 1.5 was taken as 1
        self.transpose_semitones = int(non_negative(transpose_semitones, "model.transpose_semitones",
                                                    whole=True))
        check_head_signature(head)
        self.backbone, self.head, self.loss, self.side_info = backbone, head, loss, side_info
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.augment = augment if augment is not None else nn.Identity()
        # what the init checkpoint's run read (None: unknown), for the check in `setup`
        self.init_reading: dict[str, Any] | None = None
        if init_record is not None:
            record = OmegaConf.to_container(init_record) if OmegaConf.is_config(init_record) else init_record
            init_checkpoint, self.init_reading = record["path"], record["reading"]
        elif init_checkpoint:
            load_backbone_weights(self.backbone, init_checkpoint)
            self.init_reading = checkpoint_reading(init_checkpoint)
        self.init_checkpoint = init_checkpoint
        if is_closed_form(head) and freeze_backbone is False:
            raise ValueError(f"model.freeze_backbone=false: {type(head).__name__} is a closed-form "
                             "head, fitted on the embeddings of a frozen encoder, so the encoder "
                             "cannot train with it. Set model.freeze_backbone=true, or fine-tune with "
                             "a trained head (model=devise, bilinear, conse or siamese).")
        self.frozen = is_closed_form(head) if freeze_backbone is None else bool(freeze_backbone)
        if self.frozen:
            self.backbone.requires_grad_(False)
            if not init_checkpoint and any(True for _ in self.backbone.parameters()):
                log.warning("model.init_checkpoint is null: the frozen encoder (%s) keeps its random "
                            "initial weights, so %s fits on embeddings no training shaped. Set "
                            "model.init_checkpoint to a fewzero run's checkpoint to start from a "
                            "trained encoder.", type(self.backbone).__name__, type(head).__name__)
        self.plot_dir = Path(plot_dir) if plot_dir else None
        self.figures = flag(figures, "model.figures")
        self.pitch_prior = pitch_prior
        if pitch_prior is not None and is_closed_form(head):
            raise ValueError("model.pitch_prior needs a trained head (siamese, devise, bilinear, "
                             "conse): a closed-form head on a frozen encoder has no training loss "
                             "to add the pitch head's to. Set model.pitch_prior=null (experiments "
                             "zsl_attribute_audio and zsl_image_audio turn the prior on).")
        self.register_buffer("calibration_gamma", torch.zeros(()))  # saved with each checkpoint
        self._collected: list[tuple[torch.Tensor, ...]] = []
        self._closed_form_data: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._closed_form_fitted_on = 0  # batches the closed-form head was last fitted on
        self.vectors: ClassVectors | None = None
        self.results: ZslResults | None = None
        self.trained_classes = list(trained_classes) if trained_classes is not None else None

    # ---- class side information -------------------------------------------------------
    def audio_encoder(self) -> nn.Module:
        return self.backbone

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if self.init_checkpoint:
            check_init_reading(self.init_reading, self.init_checkpoint, dm, self.class_cv)
        if self.transpose_semitones and not isinstance(getattr(dm, "features", None), MelFeatures):
            raise ValueError("model.transpose_semitones scales log-mel excerpts in frequency, and "
                             f"{type(dm).__name__} gives no log-mel features: set "
                             "model.transpose_semitones=0 for this dataset.")
        if self.trained_classes is not None and stage == "fit":
            raise ValueError("model.trained_classes is set by fewzero.eval for a checkpoint tested "
                             "on another split; a fit trains against dataset.split's classes: "
                             "remove model.trained_classes.")
        fit_on = self.trained_classes if self.trained_classes is not None else list(dm.train_classes)
        # the tested classes, then any trained class the tested split leaves out (for its anchor)
        named = list(dict.fromkeys([*dm.class_names, *fit_on]))
        vectors = self.side_info.vectors(named, fit_on=fit_on)
        self.vectors = ClassVectors(vectors.names[:len(dm.class_names)],
                                    vectors.members[:len(dm.class_names)], vectors.normalized)
        self.ids = {"seen": dm.ids(dm.seen), "unseen": dm.ids(dm.unseen),
                    "train": dm.ids(dm.train_classes), "pseudo_unseen": dm.ids(dm.pseudo_unseen)}
        to_train = torch.full((len(dm.class_names),), -1, dtype=torch.long)
        to_train[self.ids["train"]] = torch.arange(len(self.ids["train"]))
        self.register_buffer("to_train", to_train, persistent=False)
        self.register_buffer("side_matrix", self.vectors.mean, persistent=False)
        self.class_names = list(dm.class_names)
        if self.pitch_prior is not None:
            self.register_buffer("range_likelihoods",
                                 self.pitch_prior.range_likelihoods(dm.class_names), persistent=False)
            if self.pitch_prior.formants is not None:
                self._fit_formant_scale(dm)
                if self.trained_classes is not None:
                    formants = self.pitch_prior.formants
                    formants.fallback = sorted(set(self.trained_classes) & formants.bands.keys())
        if hasattr(self.head, "set_anchors"):  # heads that score relative to the training classes
            self.head.set_anchors(vectors.mean[[named.index(name) for name in fit_on]])

    def _fit_formant_scale(self, dm: Any) -> None:
        """Fit the formant likelihood's scale on the training clips' evaluation excerpts and
        metadata pitches (the datamodule's training role: never an unseen or test-fold clip)."""
        train = dm.indices["train"]
        dm.assert_clean(train, training=True)
        window = slice(dm.eval_offset, dm.eval_offset + dm.excerpt_frames)
        formants = self.pitch_prior.formants
        device = formants.mel_centres_hz.device
        peaks = torch.cat([formants.spectral_peaks(dm.table.features[chunk, :, window].to(device)).cpu()
                           for chunk in train.split(512)])
        scale = formants.fit_scale(peaks, dm.table.pitches[train],
                                   [dm.table.instruments[i] for i in train.tolist()])
        log.info("Formant likelihood: Laplace scale %.3f (natural-log frequency) on %d training clips",
                 scale, len(train))

    def calibration_state(self) -> dict[str, torch.Tensor]:
        """What validation chose besides the weights, by state-dict key: the calibration penalty
        and, with a pitch prior, its weight per setting (chosen when it has `weight_candidates`)."""
        state = {"calibration_gamma": self.calibration_gamma}
        if self.pitch_prior is not None:
            state["pitch_prior.weights"] = self.pitch_prior.weights
        return state

    def keep_calibration(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy `calibration_state` from another model's state dict (the refit keeps what the
        validation-selected checkpoint chose). Raises a KeyError naming a missing entry."""
        for key, buffer in self.calibration_state().items():
            if key not in state_dict:
                raise KeyError(f"The selected checkpoint has no {key!r}: it was trained with another "
                               "model config than the refit's. Run the refit with the model "
                               "settings of the run that wrote that checkpoint (its "
                               ".hydra/config.yaml; model.pitch_prior above all), or train "
                               "again with this config.")
            buffer.copy_(state_dict[key])

    # ---- class cross-validation of the prior's ZSL weight (run by `fewzero.train`) -----
    @property
    def class_cv(self) -> bool:
        """Whether `fewzero.train` should choose the ZSL weight by class cross-validation."""
        return self.pitch_prior is not None and self.pitch_prior.class_cv

    def has_class_cv_scores(self, state_dict: dict[str, torch.Tensor]) -> bool:
        """Whether validation scored every candidate weight of the ZSL setting in `state_dict`."""
        scores = state_dict["pitch_prior.validation_scores"][SETTINGS.index("zsl")]
        return scores.numel() > 0 and not bool(scores.isnan().any())

    def class_cv_scores(self, state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        """(n_candidates,) the ZSL validation score (the prior's `zsl_score`) of every candidate
        weight, from a validated model's state dict. Raises a ValueError where validation could
        not score them (no pseudo-unseen or no held-out seen clips)."""
        if not self.has_class_cv_scores(state_dict):
            raise ValueError("Validation scored no weight of the pitch prior: class cross-validation "
                             "needs pseudo-unseen and held-out seen clips in every fold (check "
                             "dataset.split.pseudo_unseen_folds and dataset.val_fold).")
        return state_dict["pitch_prior.validation_scores"][SETTINGS.index("zsl")].double()

    def class_cv_choice(self, state_dict: dict[str, torch.Tensor], fold_scores: torch.Tensor
                        ) -> tuple[float, dict[str, torch.Tensor]]:
        """(the ZSL weight: the candidate with the best mean score over the folds, fold_scores
        (n_folds, n_candidates); the `calibration_state` entries to replace in `state_dict`'s)."""
        weight = self.pitch_prior.choose_from_scores(fold_scores.mean(dim=0))
        weights = state_dict["pitch_prior.weights"].clone()
        weights[SETTINGS.index("zsl")] = weight
        return weight, {"pitch_prior.weights": weights}

    def plot_class_cv(self, fold_scores: torch.Tensor, folds: list[list[str]], chosen: float,
                      loggers: list[Any], step: int) -> None:
        """Draw class cross-validation's sweep (fold_scores (n_folds, n_candidates)) as
        `val/class_cv_prior_weight` (PNG and TensorBoard), unless figures are off."""
        if not self.figures:
            return
        figure = weight_choice_figure(self.pitch_prior.weight_candidates, fold_scores,
                                      [f"fold {k}: " + ", ".join(names) for k, names in enumerate(folds)],
                                      chosen, "ZSL weight of the prior, by class cross-validation",
                                      ZSL_SCORES[self.pitch_prior.zsl_score],
                                      accuracy=self.pitch_prior.zsl_score == "top1")
        save_figure(figure, "val/class_cv_prior_weight", self.plot_dir, loggers, step)

    # ---- checkpoints: a closed-form head is refitted on every batch embedded so far ----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # which classes the head was trained against ("trainval": the refit, every seen class);
        # re-evaluation rebuilds the datamodule in that role (`fewzero.train.as_trained`)
        checkpoint["datamodule_train_on"] = self.trainer.datamodule.train_on
        if self.init_checkpoint:  # so that a test of this checkpoint needs not that file
            checkpoint["init_checkpoint"] = {"path": str(self.init_checkpoint),
                                             "reading": self.init_reading}
        if self._closed_form_data:
            audio, targets = zip(*self._closed_form_data, strict=True)
            checkpoint["closed_form_data"] = {"audio": torch.cat(audio).cpu(),
                                              "targets": torch.cat(targets).cpu(),
                                              "batch_sizes": [len(t) for t in targets],
                                              "fitted_on": self._closed_form_fitted_on}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.pitch_prior is not None:  # checkpoints from before the weights were a buffer
            for key in ("weights", "validation_scores"):
                checkpoint["state_dict"].setdefault(f"pitch_prior.{key}",
                                                    getattr(self.pitch_prior, key).clone())
        data = checkpoint.get("closed_form_data")
        if data is not None:  # batch by batch, as collected; the head's fit is in the state dict
            self._closed_form_data = list(zip(data["audio"].split(data["batch_sizes"]),
                                              data["targets"].split(data["batch_sizes"]), strict=True))
            # on how many of them the saved head was fitted: a stop in a refit's last step saves
            # all its batches before on_train_end fits the head on them (0 where not recorded:
            # fitted again, on the same data, at the next chance)
            self._closed_form_fitted_on = int(data.get("fitted_on", 0))

    def train_side(self) -> torch.Tensor:
        """(n_train_classes, side_dim): the class means, or one drawn member per class."""
        side = (self.vectors.draw().to(self.device) if self.side_info.sample_per_step
                else self.side_matrix)
        return side[self.ids["train"]]

    # ---- training ---------------------------------------------------------------------
    def train(self, mode: bool = True) -> ZeroShotModule:
        """A frozen encoder stays in eval mode (BatchNorm statistics stay as loaded) whenever
        Lightning switches the module to training: at every epoch start, after every
        validation, and when a run resumes mid-epoch (no epoch start then)."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        """A batch of `BalancedExcerpts`: x (batch, n_mels, frames) log-mel excerpts, label (batch,)
        class ids, index (batch,) clip indices (xlsa17's `FeatureBatches`: x (batch, feature_dim)
        features, index image indices). Returns the 0-d loss on (batch, n_train_classes) scores,
        or None for a closed-form head, which only keeps the (batch, audio_dim) embeddings here."""
        self.trainer.datamodule.assert_clean(batch["index"], training=True)
        targets = self.to_train[batch["label"]]
        x, semitones = self._transposed(batch["x"])
        with torch.set_grad_enabled(not self.frozen):
            audio = self.backbone(self.augment(x))
        if is_closed_form(self.head):
            self._closed_form_data.append((audio.detach(), targets))
            return None
        scores = self.head(audio, self.train_side())
        if self.pitch_prior is not None and self.pitch_prior.in_training:
            peaks = self.pitch_prior.formants.spectral_peaks(x) if self._uses_formants else None
            with torch.no_grad():  # the prior's term is a fixed offset: no gradient through it
                prior = self._prior_log_likelihood(audio, peaks, self.ids["train"])
            scores = scores + self.pitch_prior.weight * prior
        loss = self.loss(scores, targets)
        if self.pitch_prior is not None:
            pitches = self.trainer.datamodule.table.pitches[batch["index"].cpu()].to(self.device)
            pitches = torch.where(pitches >= 0, pitches + semitones, pitches)  # -1: unknown
            pitch_loss = self.pitch_prior.loss(audio, pitches)
            self.log("train/pitch_loss", pitch_loss)
            loss = loss + pitch_loss
        self.train_acc((scores.argmax(dim=1) == targets).float().mean())
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _transposed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, n_mels, frames) training excerpts -> (the same transposed, (batch,) semitones
        each was moved by; all zero when `transpose_semitones` is 0)."""
        semitones = torch.zeros(len(x), dtype=torch.long, device=x.device)
        if self.transpose_semitones == 0:
            return x, semitones
        semitones = torch.randint(-self.transpose_semitones, self.transpose_semitones + 1, (len(x),),
                                  device=x.device)
        factors = 2.0 ** (semitones.double() / 12)
        return self.trainer.datamodule.features.scale_frequency(x, factors), semitones

    def fit_closed_form(self) -> None:
        """Fit a closed-form head on every training batch embedded so far (once per new data).
        Also called after a refit: resumed from a stop in its last step, the fit ends at once,
        without the `on_train_end` that would fit the head."""
        if is_closed_form(self.head) and len(self._closed_form_data) > self._closed_form_fitted_on:
            audio, targets = (torch.cat(t) for t in zip(*self._closed_form_data, strict=True))
            self.head.fit(audio, targets, self.side_matrix[self.ids["train"]])
            self._closed_form_fitted_on = len(self._closed_form_data)

    def on_train_end(self) -> None:
        self.fit_closed_form()  # runs without validation too (e.g. a refit on all training data)

    def optimised_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters only: none for a closed-form head on a frozen encoder (then
        `configure_optimizers` returns None)."""
        return [p for p in self.parameters() if p.requires_grad]

    # ---- evaluation: embed every clip once --------------------------------------------
    @property
    def _uses_formants(self) -> bool:
        return self.pitch_prior is not None and self.pitch_prior.formants is not None

    def _collect(self, batch: dict[str, torch.Tensor]) -> None:
        """Embed an evaluation batch (as `validation_step` takes it): keep the (batch, audio_dim)
        embeddings, labels, clip indices and (batch,) spectral peaks in Hz (zeros without a
        formant likelihood)."""
        x = batch["x"]
        peaks = self.pitch_prior.formants.spectral_peaks(x) if self._uses_formants else x.new_zeros(len(x))
        self._collected.append((self.backbone(x).detach(), batch["label"], batch["index"], peaks))

    def _gathered_scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor,
                                        torch.Tensor]:
        """Gathered (audio (n, audio_dim), head scores (n, n_classes), the pitch prior's
        log-likelihood (n, n_classes) or None, labels (n,), clip indices (n,)) on the CPU."""
        audio, labels, indices, peaks = (torch.cat(t) for t in zip(*self._collected, strict=True))
        self._collected = []
        if self.trainer.world_size > 1:
            audio, labels, indices, peaks = (self.all_gather(t).flatten(0, 1)
                                             for t in (audio, labels, indices, peaks))
            # the distributed sampler pads each rank's share with repeated clips: count each once
            once = first_occurrences(indices)
            audio, labels, indices, peaks = (t[once] for t in (audio, labels, indices, peaks))
        # embedded under autocast with trainer.precision=bf16-mixed (bfloat16); the head, the
        # prior and the calibration score them in the module's own dtype (autocast is off here)
        audio = audio.to(self.dtype)
        scores = self.head(audio, self.side_matrix)
        prior = None
        if self.pitch_prior is not None:
            prior = self._prior_log_likelihood(audio, peaks).float().cpu()
        return audio.float().cpu(), scores.float().cpu(), prior, labels.cpu(), indices.cpu()

    def _prior_log_likelihood(self, audio: torch.Tensor, peaks: torch.Tensor | None,
                              class_ids: list[int] | None = None) -> torch.Tensor:
        """The pitch prior's log p(clip | class): (batch, n_classes), or (batch, len(class_ids))
        for those classes only. audio (batch, audio_dim); peaks (batch,) spectral peaks in Hz
        (used with a formant likelihood)."""
        ids = list(range(len(self.class_names))) if class_ids is None else list(class_ids)
        formant_densities = (self.pitch_prior.formant_log_densities(peaks, [self.class_names[i] for i in ids])
                             if self._uses_formants else None)
        return self.pitch_prior.log_likelihood(audio, self.range_likelihoods[ids], formant_densities)

    def _scores(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Gathered (audio (n, audio_dim), {setting: scores (n, n_classes)} for every setting of
        `SETTINGS`, labels (n,), clip indices (n,)) on the CPU; a setting's scores are the head's
        plus that setting's weight of the pitch prior times its log-likelihood."""
        audio, head_scores, prior, labels, indices = self._gathered_scores()
        scores = {setting: _with_prior(head_scores, prior, self.pitch_prior.weight_for(setting)
                                       if prior is not None else 0.0) for setting in SETTINGS}
        return audio, scores, labels, indices

    def on_validation_epoch_start(self) -> None:
        self.fit_closed_form()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """A batch of `ClipExcerpts`: x (batch, n_mels, frames) fixed excerpts, label (batch,) class
        ids, index (batch,) clip indices (xlsa17's `FeatureBatches`: x (batch, feature_dim), index
        image indices); embedded here, scored at the epoch's end."""
        self.trainer.datamodule.assert_clean(batch["index"])
        self._collect(batch)

    def on_validation_epoch_end(self) -> None:
        _, head_scores, prior, labels, _ = self._gathered_scores()
        if self.trainer.sanity_checking:
            return
        train, pseudo = self.ids["train"], self.ids["pseudo_unseen"]
        is_pseudo = torch.isin(labels, torch.tensor(pseudo, dtype=torch.long))
        both_sides = bool(is_pseudo.any() and (~is_pseudo).any())
        metrics = {}

        def combined(weight: float) -> torch.Tensor:
            return _with_prior(head_scores, prior, weight)

        def seen_top1(weight: float) -> float:
            return topk_accuracy(combined(weight)[~is_pseudo], labels[~is_pseudo], train)

        def zsl_top1(weight: float) -> float:
            return topk_accuracy(combined(weight)[is_pseudo], labels[is_pseudo], pseudo)

        def zsl_log_likelihood(weight: float) -> float:
            return true_class_log_likelihood(combined(weight)[is_pseudo], labels[is_pseudo], pseudo)

        chosen = {s: self.pitch_prior.weight_for(s) if prior is not None else 0.0 for s in SETTINGS}
        candidates = self.pitch_prior.weight_candidates if prior is not None else None
        if candidates and both_sides:  # each setting's weight by its own validation score
            choose = self.pitch_prior.choose_weight
            zsl_score = zsl_log_likelihood if self.pitch_prior.zsl_score == "log_likelihood" else zsl_top1
            chosen = {"zsl": choose("zsl", zsl_score), "seen": choose("seen", seen_top1),
                      "gzsl": choose("gzsl", lambda w: calibrate_stacking(combined(w), labels, train,
                                                                          pseudo).h)}
        if prior is not None:
            for i, setting in enumerate(SETTINGS):
                self.pitch_prior.weights[i] = chosen[setting]
                metrics[f"val/prior_weight_{setting}"] = chosen[setting]
        if (~is_pseudo).any():
            metrics["val/seen_top1"] = seen_top1(chosen["seen"])
        if is_pseudo.any():
            metrics["val/zsl_top1"] = zsl_top1(chosen["zsl"])
        if both_sides:
            calibrated = calibrate_stacking(combined(chosen["gzsl"]), labels, train, pseudo)
            self.calibration_gamma.fill_(calibrated.gamma)
            metrics.update({"val/gzsl_cs_h": calibrated.h, "val/calibration_gamma": calibrated.gamma})
            metrics["val/acc"] = calibrated.h
        else:
            metrics["val/acc"] = metrics.get("val/zsl_top1", metrics.get("val/seen_top1", 0.0))
        self.val_acc_best(metrics["val/acc"])
        metrics["val/acc_best"] = float(self.val_acc_best.compute())
        self.log_dict(metrics, prog_bar=False, sync_dist=True)  # equal on every rank (gathered scores)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """As `validation_step`, on the test clips: x (batch, n_mels, frames), index (batch,)."""
        self._collect(batch)

    def on_test_epoch_end(self) -> None:
        audio, scores, labels, indices = self._scores()
        dm = self.trainer.datamodule
        gamma = float(self.calibration_gamma)
        self.results = evaluate_zsl(scores["gzsl"], labels, self.ids["seen"], self.ids["unseen"],
                                    gamma, len(dm.class_names), setting_scores=scores)
        if self.pitch_prior is not None:
            self.results.metrics.update({f"prior_weight_{s}": self.pitch_prior.weight_for(s)
                                         for s in SETTINGS})
            self.results.metrics.update(self._pitch_accuracy(audio, labels, dm.table.pitches[indices]))
        self.log_dict({f"test/{k}": v for k, v in self.results.metrics.items()}, sync_dist=True)
        if self.trainer.is_global_zero and self.figures:
            self._test_figures(audio, labels)

    def _pitch_accuracy(self, audio: torch.Tensor, labels: torch.Tensor, pitches: torch.Tensor
                        ) -> dict[str, float]:
        """Share of test clips whose pitch the prior's head names exactly, seen and unseen
        (clips of unknown pitch left out): how well the pitch head transfers. A test figure only.

        Args: audio (n, audio_dim), labels (n,), pitches (n,) metadata MIDI numbers (-1 unknown).
        """
        with torch.no_grad():
            predicted = self.pitch_prior.predicted_pitches(audio.to(self.device, self.dtype)).cpu()
        metrics = {}
        for setting in ("seen", "unseen"):
            clips = torch.isin(labels, torch.tensor(self.ids[setting], dtype=torch.long)) & (pitches >= 0)
            if clips.any():
                metrics[f"pitch_exact_{setting}"] = float((predicted[clips] == pitches[clips]).float().mean())
        return metrics

    def _test_figures(self, audio: torch.Tensor, labels: torch.Tensor) -> None:
        """The test's confusion matrices and, for a head with a shared space, its embedding figure,
        from audio (n, audio_dim) test embeddings and labels (n,) class ids."""
        names, metrics = self.trainer.datamodule.class_names, self.results.metrics
        titles = {"zsl": f"ZSL, unseen candidates (per-class top-1 {metrics['zsl_top1']:.3f})",
                  "gzsl_cs": f"GZSL, all candidates, calibrated (H {metrics['gzsl_cs_h']:.3f})"}
        for key, title in titles.items():
            if not self.results.confusions[key].any():  # no test clip in this setting (fast_dev_run)
                log.info("No %s test clips: no confusion matrix drawn for it.", key.upper())
                continue
            figure = confusion_figure(self.results.confusions[key], names, title)
            save_figure(figure, f"test/confusion_{key}", self.plot_dir, self.loggers, self.global_step)
        if not has_shared_space(self.head):
            log.info("%s has no shared space of audio and class vectors (embed_audio, "
                     "embed_classes): no test embedding figure is drawn.", type(self.head).__name__)
            return
        with torch.no_grad():
            audio_points = self.head.embed_audio(audio.to(self.device, self.dtype)).cpu()
            class_points = self.head.embed_classes(self.side_matrix).cpu()
        figure = zsl_embedding_figure(audio_points, labels, class_points, names, self.ids["unseen"],
                                      "Test audio and class vectors in the shared space (PCA)")
        save_figure(figure, "test/embeddings", self.plot_dir, self.loggers, self.global_step)

    def test_report(self) -> dict[str, Any]:
        """What `fewzero.train` writes into metrics.json under "zero_shot"."""
        if self.results is None:
            return {}
        dm = self.trainer.datamodule
        return {"zero_shot": {**self.results.metrics, "seen": dm.seen, "unseen": dm.unseen,
                              "pseudo_unseen": dm.pseudo_unseen,
                              "n_test_clips": {r: len(dm.indices[r])
                                               for r in ("test_seen", "test_unseen")}}}
