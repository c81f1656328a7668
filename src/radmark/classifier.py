"""The classifier system shared by the marking network's training and the victim's: a LightningModule that
receives a plain ``nn.Module`` and trains it with SGD + momentum and a cosine or step schedule."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of ``model``; logs ``{prefix}/train_loss_step`` (every log_every_n_steps),
    ``{prefix}/train_loss_epoch`` and ``{prefix}/train_acc`` (epoch means), and ``{prefix}/test_acc`` (top-1 on
    whatever the test/val loader serves).

    Subclasses change the loss (:meth:`training_loss`), which parameters train (``requires_grad``) and which
    sub-networks stay in eval mode while training (:meth:`frozen_modules`).
    """

    # Init arguments kept out of ``hparams`` (and so out of Lightning checkpoints' pickled hyper-parameters):
    # modules are large and are not settings. Subclasses that take more modules extend this.
    hparams_ignore: tuple[str, ...] = ("model",)

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        epochs: int = 10,
        schedule: str = "cosine",
        step_every: int = 30,
        step_gamma: float = 0.1,
        prefix: str = "victim",
    ) -> None:
        super().__init__()
        if schedule not in ("cosine", "step"):
            raise ValueError(f"schedule={schedule!r}: choose cosine or step (victim.schedule)")
        self.model = model
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        self.prefix = prefix
        # No input validation while training: it costs a host-device sync per step, and cross-entropy
        # already rejects labels out of range.
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ------------------------------------------------------------------ frozen parts

    def frozen_modules(self) -> list[nn.Module]:
        """Sub-networks kept in eval mode during training (BatchNorm statistics frozen, no dropout)."""
        return []

    def train(self, mode: bool = True) -> ClassifierModule:
        # Whoever calls .train() (Lightning, the caller, an evaluation loop restoring modes), frozen parts
        # stay in eval mode: a frozen body whose BatchNorm still updates its running stats is not frozen.
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def on_train_start(self) -> None:
        # Lightning >= 2.2 no longer switches the module to train mode itself; a model loaded from a
        # checkpoint arrives in eval mode and would otherwise train with frozen BatchNorm statistics.
        self.train()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ steps

    def training_loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def on_train_epoch_start(self) -> None:
        # Epoch sums kept as device tensors: adding to them never waits for the device.
        self._loss_sum = torch.zeros((), device=self.device)
        self._seen = 0

    def _should_log_step(self) -> bool:
        # Every self.log() call costs Lightning ~0.3 ms of Python (it re-moves and deep-copies the result's
        # metadata), a real share of a GPU step; the step loss is only written every log_every_n_steps
        # anyway, so it is logged only then. Falls back to every step if Lightning's internals move.
        try:
            return bool(self.trainer._logger_connector.should_update_logs)
        except (AttributeError, RuntimeError):
            return True

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.training_loss(logits, y, x)
        # update(), not __call__: the metric's forward also computes a per-batch value (state copies and
        # resets every step) that nobody reads; the epoch value is computed once, in on_train_epoch_end.
        self.train_acc.update(logits.detach(), y)
        self._loss_sum += loss.detach() * len(y)
        self._seen += len(y)
        if self._should_log_step():
            self.log(f"{self.prefix}/train_loss_step", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_end(self) -> None:
        seen = max(1, self._seen)
        self.log(f"{self.prefix}/train_loss_epoch", self._loss_sum / seen, on_epoch=True, sync_dist=True)
        self.log(f"{self.prefix}/train_acc", self.train_acc.compute(), prog_bar=True, on_epoch=True)
        self.train_acc.reset()

    def _eval_step(self, batch: Any) -> None:
        x, y = batch[0], batch[1]
        self.test_acc(self(x), y)
        self.log(f"{self.prefix}/test_acc", self.test_acc, prog_bar=True, on_step=False, on_epoch=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams
        params = self.trainable_parameters()
        if not params:
            raise ValueError("nothing to train: every parameter of the model has requires_grad=False")
        optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if hp.schedule == "cosine":
            scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, hp.epochs))
        else:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.step_every, gamma=hp.step_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
