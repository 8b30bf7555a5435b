"""Progress with an ETA in the log: one class for tokens scored, requests answered and steps trained."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("ftcore.progress")


class Progress:
    """Log `label: done/total unit, rate, ETA` at most every `every` seconds (and at the end).

    `done` starts where the work starts (a resumed arm: its checkpoint's step); the rate counts only
    what this run did.
    """

    def __init__(self, label: str, total: int, unit: str = "steps", every: float = 15.0, done: int = 0):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.done = self.first = done
        self.start = self.last = time.monotonic()

    @property
    def rate(self) -> float:
        """Units per second since this run started."""
        return (self.done - self.first) / max(time.monotonic() - self.start, 1e-9)

    @property
    def eta(self) -> float:
        """Seconds left at the current rate (inf before any progress)."""
        return max(self.total - self.done, 0) / self.rate if self.rate else float("inf")

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            log.info("%s: %d/%d %s, %.3g %s/s, ETA %.0fs", self.label, self.done, self.total, self.unit, self.rate,
                     self.unit, self.eta)
