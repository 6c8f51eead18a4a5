"""What a LightningModule must carry in its checkpoints so that a killed run, resumed with
`ckpt_path=last`, ends exactly where the uninterrupted run would have."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric


class ResumableModule(pl.LightningModule):
    """Base of the few-shot and zero-shot modules.

    - `train_acc` (the epoch's running training accuracy) and `val_acc_best` (best validation
      score so far) are saved in every checkpoint, so a run resumed mid-epoch or after several
      validations reports the same values as an uninterrupted one.
    - The global RNG state is saved and restored too (the `StepSeed` callback reseeds it per
      step as well; this covers runs without that callback).

    Subclasses set `optimizer_factory` and `scheduler_factory` (partials from the config) and
    may narrow `optimised_parameters`; `configure_optimizers` is shared.
    """

    optimizer_factory: Callable[..., Any]
    scheduler_factory: Callable[..., Any] | None

    def __init__(self) -> None:
        super().__init__()
        # the fit's metrics saved in the checkpoint it resumed from (`fewzero.train.fit_metrics`)
        self.resumed_fit_metrics: dict[str, float] = {}
        self.train_acc = MeanMetric()
        self.train_acc.persistent(True)
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)

    def audio_encoder(self) -> nn.Module:
        """The network that embeds audio excerpts (the backbone)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n_mels, frames) log-mel excerpts -> (batch, dim) embeddings by the audio
        encoder. What Lightning's model summary runs on `example_input_array`, a zero excerpt of
        the datamodule's shape (`fewzero.train`), to give the encoder's FLOPs per excerpt. The
        excerpt is cast to the module's dtype: a float32 zero excerpt met float64 weights under
        `trainer.precision=64-true` (Lightning converts the module, not the example input)."""
        return self.audio_encoder()(x.to(self.dtype) if x.is_floating_point() else x)

    def optimised_parameters(self) -> list[nn.Parameter]:
        """What the optimizer is given: every parameter (frozen ones included, as they always
        were: an optimizer's saved state lists its parameters, so resumes depend on it)."""
        return list(self.parameters())

    def configure_optimizers(self) -> Any:
        """`optimizer_factory` on `optimised_parameters()`, with `scheduler_factory`'s scheduler
        stepped every optimiser step; None when there is nothing to optimise."""
        params = self.optimised_parameters()
        if not params:
            return None
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)  # its length: checked by
        # fewzero.train.check_optimisation_settings before anything was built
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # what fewzero.train reports of the fit, for a resume whose fit logs less than the
        # uninterrupted one: from a checkpoint at max_steps, nothing; after the last
        # validation, no val/ metric. Those of the checkpoint resumed from carry on.
        metrics = self.trainer.callback_metrics if self._trainer is not None else {}
        checkpoint["fit_metrics"] = {**self.resumed_fit_metrics, **{
            k: float(v) for k, v in metrics.items()
            if k.startswith(("train/", "val/")) and v.numel() == 1}}
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.resumed_fit_metrics = dict(checkpoint.get("fit_metrics", {}))
        # checkpoints from before the metric states were saved load with fresh ones
        for key, value in self.state_dict().items():
            if key.startswith(("train_acc.", "val_acc_best.")):
                checkpoint["state_dict"].setdefault(key, value)
        state = checkpoint.get("rng_state")
        if state is not None:
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:  # a new epoch; not after a mid-epoch resume (batch_idx continues)
            self.train_acc.reset()
