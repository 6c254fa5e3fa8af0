"""Local record of a run (metrics.jsonl) and what the user sees while it trains."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tqdm import tqdm


class MetricsLog:
    """Appends one JSON object per logged step; flushed each time so a crash keeps the record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    @staticmethod
    def truncate_after(path: Path, step: int) -> None:
        """Drops records of steps after ``step`` (redone after a resume), atomically. A line
        torn by a crash mid-write (not valid JSON) is dropped too."""
        if not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", step + 1) <= step:
                keep.append(line)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        tmp.replace(path)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ProgressReporter:
    """A tqdm bar on a terminal (or with MODMOE_PROGRESS=1); otherwise a plain line every
    tenth of the run, so logs of batch jobs stay readable."""

    def __init__(self, total: int, start: int, enabled: bool, log=print) -> None:
        self.total, self.log, self.enabled = total, log, enabled
        force = os.environ.get("MODMOE_PROGRESS") == "1"
        self.bar = (
            tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
            if enabled and (force or sys.stderr.isatty())
            else None
        )
        self.every = max(1, total // 10)

    def update(self, m: dict) -> None:
        if not self.enabled:
            return
        aux = m.get("aux_loss_total", 0.0)
        text = f"loss {m['loss']:.4f} aux {aux:.4f} {m['tokens_per_s']:,.0f} tok/s"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif m["step"] % self.every == 0 or m["step"] == self.total:
            self.log(f"step {m['step']}/{self.total}: {text}")

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        (self.bar.write if self.bar is not None else self.log)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
