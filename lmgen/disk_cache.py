"""What lmgen keeps on disk between runs, under ``$LMGEN_CACHE`` (default ``~/.cache/lmgen``): its CPU
kernels built for this machine (``kernels/``, lmgen/kernels) and weights prepared for memory mapping
(``weights/``, lmgen/loader/mapped.py). ``lmgen cache`` lists them and clears them.

Both are rebuilt on demand, so clearing loses nothing but the time to make them again: a kernel build
(about 30 s) or a prepared model's first load. A process that has a file open keeps it until it ends.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

#: the kinds of entries, each a folder of the cache
KINDS = ("kernels", "weights")


def directory(kind: str) -> Path:
    """The folder of one kind of entry (not created here)."""
    return Path(os.environ.get("LMGEN_CACHE", Path.home() / ".cache" / "lmgen")) / kind


@dataclass(frozen=True)
class Entry:
    kind: str
    path: Path
    size: int  # bytes on disk
    modified: float  # seconds since the epoch: when it was made


def entries(kinds: tuple[str, ...] = KINDS) -> list[Entry]:
    """The cache's files of `kinds`, largest first (builds and preparations in progress left out)."""
    found = []
    for kind in kinds:
        folder = directory(kind)
        for path in folder.iterdir() if folder.is_dir() else ():
            if path.is_file():
                stat = path.stat()
                found.append(Entry(kind, path, stat.st_blocks * 512, stat.st_mtime))
    return sorted(found, key=lambda entry: -entry.size)


def clear(kinds: tuple[str, ...] = KINDS) -> list[Entry]:
    """Remove the cache's entries of `kinds` (their folders too, with anything left half-made); the removed."""
    removed = entries(kinds)
    for kind in kinds:
        shutil.rmtree(directory(kind), ignore_errors=True)
    return removed


def describe(entry: Entry) -> str:
    """One line for `entry`: its size, kind, age and name."""
    days = (time.time() - entry.modified) / 86400
    age = "today" if days < 1 else f"{days:.0f} days ago"
    return f"{format_size(entry.size):>10}  {entry.kind:<8} {age:<12} {entry.path.name}"


def format_size(num_bytes: int) -> str:
    """Bytes as GiB (2 decimals) from 1 GiB on, else as MiB (1 decimal)."""
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"
