"""Notices every training run printed that ask nothing of the user, filtered by their exact text: Lightning's tip
to install litlogger (a cloud logging service), its GPU / TPU availability lines and CUDA_VISIBLE_DEVICES line
(the run's devices are in environment.json and results.json), and torch's FutureWarning about LeafSpec, raised
inside Lightning's own code (lightning 2.6 with torch 2.10+). Every other warning and message is kept."""

from __future__ import annotations

import logging
import warnings

LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
LITLOGGER_TIP = "try installing [litlogger]"
DROPPED = {  # logger -> texts whose messages are dropped
    "lightning.pytorch.utilities.rank_zero": (LITLOGGER_TIP, "GPU available: ", "TPU available: "),
    "lightning.pytorch.accelerators.cuda": ("LOCAL_RANK: ",),
}


class _Drop(logging.Filter):
    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


_FILTERS = {name: _Drop(texts) for name, texts in DROPPED.items()}


def quiet_lightning() -> None:
    """Install the filters in this process (idempotent)."""
    warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
    for name, drop in _FILTERS.items():
        logging.getLogger(name).addFilter(drop)
