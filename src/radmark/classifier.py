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
    """Cross-entropy training of ``model``; logs ``{prefix}/train_loss``, ``{prefix}/train_acc`` and
    ``{prefix}/test_acc`` (top-1 on whatever the test/val loader serves)."""

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
        self.save_hyperparameters(ignore=["model"])
        self.prefix = prefix
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def training_loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.training_loss(logits, y, x)
        self.train_acc(logits.detach(), y)
        self.log(f"{self.prefix}/train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log(f"{self.prefix}/train_acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: Any) -> None:
        x, y = batch[0], batch[1]
        self.test_acc(self(x), y)
        self.log(f"{self.prefix}/test_acc", self.test_acc, prog_bar=True, on_step=False, on_epoch=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.trainable_parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
        if hp.schedule == "cosine":
            scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, hp.epochs))
        else:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.step_every, gamma=hp.step_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
