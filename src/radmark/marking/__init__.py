"""Radioactive marking: the secret key, the marking network, the marking optimiser, the marked dataset."""

from radmark.marking.api import MarkingResult, mark, marked_dir_for
from radmark.marking.dataset import MarkedDataset
from radmark.marking.key import Key, load_key, make_key, save_key
from radmark.marking.module import MarkingModule, MarkingSettings, mark_batch
from radmark.marking.network import get_marking_network, load_marking_network
from radmark.marking.selection import select_marked

__all__ = [
    "Key",
    "MarkedDataset",
    "MarkingModule",
    "MarkingResult",
    "MarkingSettings",
    "get_marking_network",
    "load_key",
    "load_marking_network",
    "make_key",
    "mark",
    "mark_batch",
    "marked_dir_for",
    "save_key",
    "select_marked",
]
