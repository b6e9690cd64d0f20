"""Fetching official zoo checkpoints (implemented in the inference issue)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atssdet.zoo import ZooEntry


def fetch_pretrained(entry: ZooEntry) -> Path:
    raise RuntimeError(
        f"downloading {entry.url} is not available in this version; download it yourself and pass "
        "weights=PATH"
    )
