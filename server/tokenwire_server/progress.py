"""A small progress indicator for long start-up steps (loading, pulling)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


def progress(items: Iterable[T], total: int, label: str, stream=None) -> Iterator[T]:
    """Yield items while showing `label: n/total`: a bar on stderr when it is a terminal, else a few
    INFO log lines (so they take the configured log format, e.g. JSON)."""
    stream = stream or sys.stderr
    tty = stream.isatty()
    start, last = time.monotonic(), -1
    for i, item in enumerate(items, 1):
        yield item
        pct = 100 * i // max(total, 1)
        if tty:
            bar = "#" * (pct // 5)
            stream.write(f"\r{label}: [{bar:<20}] {i}/{total}")
        elif pct // 25 != last // 25:  # a handful of lines in logs, not one per item
            log.info("%s: %d/%d", label, i, total)
        last = pct
    if tty:
        stream.write(f"\r{label}: {total}/{total} in {time.monotonic() - start:.1f}s\n")
    stream.flush()
