"""Progress of long loops: a tqdm bar on a terminal, a periodic log line otherwise."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    """Counts rows; shows rows/s and the last loss.

    On a TTY it draws a tqdm bar; elsewhere (logs, CI, ``ray job logs``) it
    prints one ``[mtrec] ...`` line every ``interval_s`` seconds to stderr.
    """

    def __init__(
        self, desc: str, total: int | None = None, enabled: bool = True, interval_s: float = 10.0
    ) -> None:
        self.desc = desc
        self.enabled = enabled
        self.interval_s = interval_s
        self.rows = 0
        self.loss = float("nan")
        self.start = self._last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(desc=desc, total=total, unit="row", unit_scale=True, leave=False)

    @property
    def rows_per_s(self) -> float:
        return self.rows / max(time.perf_counter() - self.start, 1e-9)

    def update(self, rows: int, loss: float | None = None) -> None:
        self.rows += rows
        if loss is not None:
            self.loss = loss
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(rows)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", rows_per_s=f"{self.rows_per_s:,.0f}")
            return
        now = time.perf_counter()
        if now - self._last >= self.interval_s:
            self._last = now
            print(
                f"[mtrec] {self.desc}: {self.rows:,} rows, {self.rows_per_s:,.0f} rows/s, "
                f"loss {self.loss:.4f}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
