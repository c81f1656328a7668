"""The suspect: a classifier trained on partially marked data (scratch, fine-tune, linear probe, distill)."""

from radmark.victim.module import DistillModule, LinearProbeModule, replace_classifier
from radmark.victim.train import MODES, VictimResult, build_victim, train_victim

__all__ = [
    "MODES",
    "DistillModule",
    "LinearProbeModule",
    "VictimResult",
    "build_victim",
    "replace_classifier",
    "train_victim",
]
