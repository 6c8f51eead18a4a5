"""LightningModule around a PrototypicalNetwork: episodic training, embed-once evaluation."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from torch import nn

from fewzero.data.datamodule import EpisodeSettings
from fewzero.evaluation import EpisodeResults, evaluate_episodes
from fewzero.models.protonet import (
    Distance,
    PrototypicalNetwork,
    WithinClassWhitening,
    class_prototypes,
)
from fewzero.models.resumable import ResumableModule
from fewzero.models.settings import count, flag
from fewzero.plots import confusion_figure, episode_embedding_figure, save_figure


class FewShotModule(ResumableModule):
    """Trains `net` on N-way K-shot episodes; validates and tests on seeded episodes.

    Args:
        backbone: audio encoder, (batch, n_mels, frames) -> (batch, dim).
        distance: logits from query embeddings and prototypes.
        loss: criterion on (n_query, n_way) logits and (n_query,) labels.
        optimizer: partial optimizer (`_partial_: true`), called with the parameters.
        scheduler: optional partial LR scheduler, stepped every optimiser step.
        augment: optional training-only augmentation of the episode's log-mel excerpts.
        whitening: optional within-class whitening of embeddings for validation and test,
            refitted before every evaluation on the training instruments' clips
            (`datamodule.reference_dataloader()`), never on validation or test clips.
        test_shrinkages: optional candidate values of the whitening shrinkage for the test.
            Each test setting uses the candidate that scores best on `selection_episodes`
            validation episodes with the test's shot count (the best value falls as shots grow;
            docs/benchmarks.md). Validation during training keeps `whitening.shrinkage`.
        test_support_weights: optional candidate values of `whitening.support_weight` (how much
            each test episode's support set adapts the whitening), chosen jointly with the
            shrinkage in the same way; validation during training keeps
            `whitening.support_weight`. A list left empty keeps the whitening's own value.
        selection_episodes: validation episodes per candidate pair and shot count.
        plot_dir: where test figures are written as PNG (also sent to TensorBoard).
        plot_episodes: how many test episodes the embedding figure shows (the first ones, at
            most the setting's n_episodes).
        figures: False draws no test figure (confusion matrices, embeddings) at all, for runs
            whose numbers alone matter (a confusion matrix costs 0.2-0.6 CPU-s:
            scripts/benchmark_figures.py); the metrics and the TensorBoard projector's
            embeddings are the same either way.

    After a test, `whitening_choice_seconds` is the wall time the test spent choosing the
    whitening on validation episodes (embedding the validation clips included; 0 without a
    choice), part of the test's time (`StageTimer`'s test_seconds).
    """

    def __init__(self, backbone: nn.Module, distance: Distance, loss: nn.Module,
                 optimizer: Callable[..., Any],
                 scheduler: Callable[..., Any] | None = None, augment: nn.Module | None = None,
                 whitening: WithinClassWhitening | None = None,
                 test_shrinkages: Sequence[float] | None = None,
                 test_support_weights: Sequence[float] | None = None, selection_episodes: int = 500,
                 plot_dir: str | None = None, plot_episodes: int = 3, figures: bool = True):
        super().__init__()
        self.net, self.loss = PrototypicalNetwork(backbone, distance, whitening), loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.augment = augment if augment is not None else nn.Identity()
        self.test_shrinkages = [float(s) for s in test_shrinkages or []]
        if any(s <= 0 for s in self.test_shrinkages):
            raise ValueError(f"test_shrinkages must be positive; got {self.test_shrinkages}")
        self.test_support_weights = [float(w) for w in test_support_weights or []]
        if any(not 0 <= w <= 1 for w in self.test_support_weights):
            raise ValueError("test_support_weights must lie in [0, 1]; got "
                             f"{self.test_support_weights}")
        self.selection_episodes = count(
            selection_episodes, "model.selection_episodes",
            "Each whitening candidate is scored on that many validation episodes: with none, every "
            "score would be NaN and the first candidate would pass for validation's choice.")
        self.plot_dir = Path(plot_dir) if plot_dir else None
        self.plot_episodes = plot_episodes
        self.figures = flag(figures, "model.figures")
        self._embeddings: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []
        self.test_results: dict[str, EpisodeResults] = {}
        self.whitening_choice_seconds = 0.0

    # ---- training ---------------------------------------------------------------------
    def audio_encoder(self) -> nn.Module:
        return self.net.backbone

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One episode per step, as `EpisodeDataset` yields it (no batch axis): support
        (n_way * n_shot, n_mels, frames), support_labels (n_way * n_shot,) in 0..n_way-1, query
        (n_way * n_query, n_mels, frames), query_labels (n_way * n_query,), classes (n_way,).
        Returns the 0-d loss on the (n_way * n_query, n_way) query logits."""
        support, query = batch["support"], batch["query"]
        x = self.augment(torch.cat([support, query]))  # one backbone pass for the whole episode
        embeddings = self.net.backbone(x)
        n_way = batch["classes"].shape[0]
        prototypes = class_prototypes(embeddings[: support.shape[0]], batch["support_labels"], n_way)
        logits = self.net.distance(embeddings[support.shape[0] :], prototypes)
        loss = self.loss(logits, batch["query_labels"])
        self.train_acc((logits.argmax(dim=1) == batch["query_labels"]).float().mean())
        self.log("train/loss", loss, prog_bar=True, batch_size=1)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=1)
        return loss

    # ---- evaluation: embed every clip once, then run episodes on the embeddings -------
    def _collect(self, batch: dict[str, torch.Tensor]) -> None:
        """Keep the (batch, dim) backbone embeddings of batch["x"] and their batch["index"]."""
        self._embeddings.append(self.net.backbone(batch["x"]).detach())
        self._indices.append(batch["index"])

    def _all_embeddings(self) -> torch.Tensor:
        """(n_clips_total, dim) backbone embeddings of the collected clips on CPU (not whitened);
        rows of clips outside the stage stay zero."""
        embeddings, indices = torch.cat(self._embeddings), torch.cat(self._indices)
        self._embeddings, self._indices = [], []
        if self.trainer.world_size > 1:
            embeddings = self.all_gather(embeddings).flatten(0, 1)
            indices = self.all_gather(indices).flatten(0, 1)
        n_clips = len(self.trainer.datamodule.labels)
        full = torch.zeros(n_clips, embeddings.shape[1])
        full[indices.cpu()] = embeddings.float().cpu()
        return full

    @torch.no_grad()
    def _embed_loader(self, loader: Iterable[dict[str, torch.Tensor]]
                      ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """(n, dim) CPU backbone embeddings of every batch of `loader`, and the batches. Outside
        Lightning's loops, so every DDP rank embeds the same clips; in the trainer's precision, as
        those loops embed the validation and test clips (`trainer.precision=bf16-mixed`: under
        autocast; `64-true`: float64 excerpts for the float64 weights)."""
        batches, precision = list(loader), self.trainer.precision_plugin
        with precision.forward_context():
            return torch.cat([self.net.backbone(precision.convert_input(b["x"].to(self.device))).float().cpu()
                              for b in batches]), batches

    def _fit_whitening(self) -> None:
        """Refit the whitening on the training instruments' clips with the current backbone
        (in eval mode, as evaluation runs)."""
        reference, batches = self._embed_loader(self.trainer.datamodule.reference_dataloader())
        self.net.whitening.fit(reference, torch.cat([b["label"] for b in batches]))

    def _val_embeddings(self) -> torch.Tensor:
        """(n_clips_total, dim) backbone embeddings of the validation clips; other rows zero."""
        dm = self.trainer.datamodule
        embeddings, batches = self._embed_loader(dm.val_dataloader())
        full = torch.zeros(len(dm.labels), embeddings.shape[1])
        full[torch.cat([b["index"] for b in batches])] = embeddings
        return full

    def _selects_whitening(self) -> bool:
        """Whether the test chooses the whitening's shrinkage or support weight on validation."""
        return self.net.whitening is not None and bool(self.test_shrinkages or self.test_support_weights)

    def _whitening_probe(self, settings: EpisodeSettings) -> EpisodeSettings:
        """The validation episodes that choose the test whitening of `settings`: its shots,
        validation's queries, n_way capped at the number of validation instruments."""
        dm = self.trainer.datamodule
        return EpisodeSettings(min(settings.n_way, len(dm.split["val"])), settings.n_shot,
                               dm.val_settings.n_query, self.selection_episodes)

    def setup(self, stage: str) -> None:
        """Refuse, before training or testing, test settings whose whitening choice cannot draw
        its validation episodes (more shots than a validation class has clips, less its
        validation queries): that choice runs at the test, after the whole training."""
        if not self._selects_whitening():
            return
        dm = self.trainer.datamodule
        for settings in dm.test_settings:
            probe = self._whitening_probe(settings)
            try:
                dm.sampler("val", probe, dm.eval_seed)
            except ValueError as error:
                raise ValueError(
                    f"The test whitening of {settings.name} (model.test_shrinkages, "
                    f"model.test_support_weights) is chosen on {probe.n_way}-way validation "
                    f"episodes with its {probe.n_shot} shots and the {probe.n_query} queries of "
                    f"dataset.episodes.val, and {error} Or keep the whitening's own values: "
                    "model.test_shrinkages=null model.test_support_weights=null.") from None

    def _select_whitening(self, settings: EpisodeSettings, val_embeddings: torch.Tensor
                          ) -> tuple[float, float]:
        """The (shrinkage, support_weight) candidate pair with the best mean accuracy on
        validation episodes with the shot count of `settings` (n_way capped at the number of
        validation instruments); ties go to the earlier pair, support weights varying slowest.
        One-shot supports only try the first support weight (the others give the same scores).
        The whitening must be fitted; `val_embeddings` are not whitened (`_val_embeddings`)."""
        dm, whitening = self.trainer.datamodule, self.net.whitening
        probe = self._whitening_probe(settings)
        sampler, distance = dm.sampler("val", probe, dm.eval_seed), self.net.distance.cpu_copy()
        weights = self.test_support_weights or [whitening.support_weight]
        shrinkages = self.test_shrinkages or [whitening.shrinkage]
        episodes = [sampler.episode(i) for i in range(probe.n_episodes)]  # the same for every pair
        scores = {}
        for weight in weights[:1] if settings.n_shot == 1 else weights:
            for shrinkage in shrinkages:
                whitening.shrinkage, whitening.support_weight = shrinkage, weight
                scores[shrinkage, weight] = evaluate_episodes(
                    val_embeddings, sampler, probe.n_episodes, distance, len(dm.class_names),
                    whitening, episodes).mean
        return max(scores, key=scores.__getitem__)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Embed a batch of `ClipExcerpts`: x (batch, n_mels, frames) fixed excerpts, label
        (batch,) class ids, index (batch,) clip indices. Episodes are scored at the epoch's end."""
        self._collect(batch)

    def on_validation_epoch_end(self) -> None:
        embeddings = self._all_embeddings()
        if self.trainer.sanity_checking:  # only a few batches were embedded
            return
        if self.net.whitening is not None:
            self._fit_whitening()
        dm = self.trainer.datamodule
        settings = dm.val_settings
        results = evaluate_episodes(embeddings, dm.sampler("val", settings, dm.eval_seed),
                                    settings.n_episodes, self.net.distance.cpu_copy(),
                                    len(dm.class_names), self.net.whitening)
        self.val_acc_best(results.mean)
        # Every rank scores the same gathered embeddings, so these are equal across ranks;
        # sync_dist makes DDP agree on them explicitly (and Lightning expects it for epoch values).
        self.log("val/acc", results.mean, prog_bar=True, sync_dist=True)
        self.log("val/acc_ci95", results.ci95, sync_dist=True)
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """As `validation_step`, on the test clips: x (batch, n_mels, frames), index (batch,)."""
        self._collect(batch)

    def on_test_epoch_end(self) -> None:
        raw = self._all_embeddings()
        dm = self.trainer.datamodule
        distance = self.net.distance.cpu_copy()
        whitening = self.net.whitening
        selects = self._selects_whitening()
        if whitening is not None:
            self._fit_whitening()
            defaults = whitening.shrinkage, whitening.support_weight
        start = time.perf_counter()
        val_embeddings = self._val_embeddings() if selects else None
        self.whitening_choice_seconds = time.perf_counter() - start
        by_setting = {}  # for the pictures: whitened with the training classes' matrix
        unadapted: dict[str, float] = {}  # settings whose scoring adapted it to each support set
        for settings in dm.test_settings:
            if selects:
                start = time.perf_counter()
                whitening.shrinkage, whitening.support_weight = self._select_whitening(
                    settings, val_embeddings)
                self.whitening_choice_seconds += time.perf_counter() - start
                self.log(f"test/{settings.name}_whitening_shrinkage", whitening.shrinkage,
                         sync_dist=True)
                self.log(f"test/{settings.name}_whitening_support_weight",
                         whitening.support_weight, sync_dist=True)
            by_setting[settings.name] = whitening(raw) if whitening is not None else raw
            if whitening is not None and whitening.adapts(settings.n_shot):
                unadapted[settings.name] = whitening.support_weight
            sampler = dm.sampler("test", settings, dm.eval_seed)
            results = evaluate_episodes(raw, sampler, settings.n_episodes, distance,
                                        len(dm.class_names), whitening)
            self.test_results[settings.name] = results
            self.log(f"test/{settings.name}_acc", results.mean, sync_dist=True)
            self.log(f"test/{settings.name}_ci95", results.ci95, sync_dist=True)
            if self.trainer.is_global_zero and self.figures:
                title = f"{settings.name}, {settings.n_episodes} test episodes"
                self._save_figure(confusion_figure(results.confusion, dm.class_names, title),
                                  f"test/confusion_{settings.name}")
        if whitening is not None:
            whitening.shrinkage, whitening.support_weight = defaults
        # pictures show the embeddings of the setting with the most shots, whitened as it scored
        # them apart from the per-episode support adaptation (one picture, one transform)
        settings = max(dm.test_settings, key=lambda s: s.n_shot)
        embeddings = by_setting[settings.name]
        if self.trainer.is_global_zero and self.figures and self.plot_episodes > 0:
            sampler = dm.sampler("test", settings, dm.eval_seed)
            title = f"Test episodes ({settings.name}), PCA of embeddings"
            if settings.name in unadapted:  # its stars are not quite the prototypes it scored with
                title += (f"\nwhitened without the per-episode support adaptation (support weight "
                          f"{unadapted[settings.name]:g}) that scoring used")
            # episodes the test scored only: a setting of fewer episodes than plot_episodes
            shown = list(range(min(self.plot_episodes, settings.n_episodes)))
            figure = episode_embedding_figure(embeddings, sampler, dm.class_names, shown, title)
            self._save_figure(figure, f"test/embeddings_{settings.name}")
        if self.trainer.is_global_zero:
            self._add_projector_embeddings(embeddings, dm)

    def _add_projector_embeddings(self, embeddings: torch.Tensor, dm: Any) -> None:
        """Test-clip embeddings with their instrument names for TensorBoard's PROJECTOR tab;
        `embeddings` (n_clips_total, dim) holds a row per clip of `dm` (the test clips' are read)."""
        index = dm.stage_indices("test")
        names = [dm.class_names[int(label)] for label in dm.labels[index]]
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_embedding"):
                experiment.add_embedding(embeddings[index], metadata=names, tag="test_embeddings",
                                         global_step=self.global_step)

    def _save_figure(self, figure: plt.Figure, tag: str) -> None:
        """Write `figure` as PNG under plot_dir and to every TensorBoard logger."""
        save_figure(figure, tag, self.plot_dir, self.loggers, self.global_step)
