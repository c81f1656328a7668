"""Victim-specific Lightning systems: linear probe on a frozen network, and distillation from a teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radmark.classifier import ClassifierModule
from radmark.models import get_classifier


def replace_classifier(model: nn.Module, name: str, num_classes: int) -> nn.Linear:
    """Put a freshly initialised ``nn.Linear(d, num_classes)`` in place of the layer ``name``; return it."""
    old = get_classifier(model, name)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    setattr(parent, child, new)
    return new


class LinearProbeModule(ClassifierModule):
    """Trains only the layer ``classifier`` of ``model``; the rest is frozen: no gradient, and kept in eval
    mode so BatchNorm running statistics never move and dropout is off (the features are a fixed map)."""

    def __init__(self, model: nn.Module, num_classes: int, classifier: str, **kwargs) -> None:
        head = get_classifier(model, classifier)
        model.requires_grad_(False)
        head.requires_grad_(True)
        super().__init__(model, num_classes, **kwargs)
        self.classifier_name = classifier

    def frozen_modules(self) -> list[nn.Module]:
        # The whole network: the head is an nn.Linear, which behaves the same in both modes.
        model = getattr(self, "model", None)
        return [model] if model is not None else []


class DistillModule(ClassifierModule):
    """Student ``model`` trained on the soft outputs of ``teacher`` at ``temperature`` T: loss
    ``KL(softmax(t/T) || softmax(s/T)) * T^2`` (Hinton et al.; T^2 keeps gradient scale independent of T).

    The teacher is in eval mode, gets no gradient and is never changed.
    """

    hparams_ignore = ("model", "teacher")

    def __init__(
        self, model: nn.Module, num_classes: int, teacher: nn.Module, temperature: float = 4.0, **kwargs
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"victim.temperature must be > 0, got {temperature}")
        super().__init__(model, num_classes, **kwargs)
        teacher.eval()
        teacher.requires_grad_(False)
        self.teacher = teacher
        self.temperature = float(temperature)

    def frozen_modules(self) -> list[nn.Module]:
        teacher = getattr(self, "teacher", None)
        return [teacher] if teacher is not None else []

    def training_loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        t = self.temperature
        return (
            F.kl_div(
                F.log_softmax(logits / t, dim=1),
                F.log_softmax(teacher_logits.float() / t, dim=1),
                reduction="batchmean",
                log_target=True,
            )
            * t
            * t
        )
