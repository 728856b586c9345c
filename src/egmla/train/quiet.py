"""Two notices every training run printed that ask nothing of the user, filtered by their exact text: Lightning's
tip to install litlogger (a cloud logging service), and torch's FutureWarning about LeafSpec, raised inside
Lightning's own code (lightning 2.6 with torch 2.10+). Every other warning and message is kept."""

from __future__ import annotations

import logging
import warnings

LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
LITLOGGER_TIP = "try installing [litlogger]"


class _DropLitloggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return LITLOGGER_TIP not in record.getMessage()


_FILTER = _DropLitloggerTip()


def quiet_lightning() -> None:
    """Install both filters in this process (idempotent)."""
    warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_FILTER)
