"""Progress bars for long work (quantizing a checkpoint, scoring perplexity windows)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], description: str, unit: str) -> Iterable[T]:
    """`items`, drawing a bar on stderr as they are consumed when stderr is a terminal; quiet otherwise,
    so pipes and log files get no carriage-return noise. The bar is erased when done (it counts up
    without a length for items that have none, a stream)."""
    return tqdm(items, desc=description, unit=f" {unit}", file=sys.stderr, disable=not sys.stderr.isatty(),
                leave=False, dynamic_ncols=True)
