"""The straggler metric: the spread of the ranks' own-work times of a step."""

from __future__ import annotations

import pytest
import torch

from modmoe.train.straggler import spread, straggler_line, straggler_metrics


def test_spread_names_the_slowest_rank() -> None:
    m = spread([0.10, 0.12, 0.50, 0.11])
    assert m["straggler/slowest_rank"] == 2.0
    assert m["straggler/local_max_s"] == 0.50
    assert m["straggler/local_median_s"] == 0.11  # the lower middle of four
    assert m["straggler/max_over_median"] == pytest.approx(0.50 / 0.11)


def test_even_ranks_and_zero_times() -> None:
    assert spread([0.2, 0.2])["straggler/max_over_median"] == 1.0
    assert spread([0.0, 0.0])["straggler/max_over_median"] == 1.0


def test_one_process_logs_nothing() -> None:
    lines: list[str] = []
    m = straggler_metrics(7, 3.0, torch.device("cpu"), factor=2.0, min_gap_s=0.1, log=lines.append)
    assert m["straggler/slowest_rank"] == 0.0 and m["straggler/max_over_median"] == 1.0 and not lines


def test_line_only_for_a_clear_straggler() -> None:
    assert straggler_line(12, [0.05, 3.05], factor=2.0, min_gap_s=0.5) == (
        "straggler: step 12: rank 1 took 3.05 s for its own work of the step, 61.0 x the median 0.050 s over 2 ranks"
    )
    assert straggler_line(12, [0.05, 0.05, 3.05], factor=2.0, min_gap_s=0.5).startswith(
        "straggler: step 12: rank 2 took 3.05 s"
    )
    assert straggler_line(12, [0.05, 0.05, 0.3], factor=2.0, min_gap_s=0.5) is None  # ratio without the margin: jitter
    assert straggler_line(12, [1.0, 1.0, 1.9], factor=2.0, min_gap_s=0.5) is None  # margin without the ratio
    assert straggler_line(12, [9.0], factor=2.0, min_gap_s=0.5) is None
