"""The preparation's progress: a tqdm bar (input MB/s and tokens/s) on a terminal, a log line
every ``every_s`` seconds elsewhere (Slurm logs)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class PrepareProgress:
    def __init__(self, total_bytes: int, log: Callable[[str], None], bar: bool | None = None, every_s: float = 30.0):
        self.total, self.log, self.every_s = total_bytes, log, every_s
        self.bytes = self.tokens = 0
        self.t0 = self._last_log = time.perf_counter()
        use_bar = sys.stderr.isatty() if bar is None else bar
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="prepare", smoothing=0.1
            )

    def rates(self) -> tuple[float, float]:
        """(input MB/s, tokens/s) since the start."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return self.bytes / dt / 1e6, self.tokens / dt

    def update(self, nbytes: int, tokens: int) -> None:
        self.bytes += nbytes
        self.tokens += tokens
        mb_s, tok_s = self.rates()
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix_str(f"{tok_s / 1e3:,.0f}k tokens/s, {self.tokens:,} tokens", refresh=False)
        elif time.perf_counter() - self._last_log >= self.every_s:
            self._last_log = time.perf_counter()
            share = self.bytes / self.total if self.total else 1.0
            self.log(f"prepare: {share:6.1%} of {self.total / 1e6:,.1f} MB, {mb_s:.2f} MB/s, {tok_s:,.0f} tokens/s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
