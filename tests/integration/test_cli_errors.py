"""What ``modmoe train`` does with each kind of failure: the project's own errors (config,
data, checkpoint) are one line and exit 2; anything else is a bug, shown with its traceback."""

from __future__ import annotations

import subprocess
import sys

from runs import REPO, small_overrides


def _train(overrides: list[str], prelude: str = "", extra: list[str] = ()) -> subprocess.CompletedProcess:
    args = ["train", "configs/tiny.yaml", *sum((["--set", o] for o in overrides), []), *extra]
    code = f"{prelude}\nfrom modmoe.cli import main\nmain({args!r})"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env=None)


def test_a_bug_inside_training_keeps_its_traceback(small_data_dir, tmp_path):
    """A RuntimeError is injected into the backend's step, as a real bug would raise one."""
    prelude = (
        "import modmoe.train.backends.native as native\n"
        "def broken(self, batches, step):\n"
        "    raise RuntimeError('injected bug in the step')\n"
        "native.NativeBackend.forward_backward = broken"
    )
    proc = _train(small_overrides(small_data_dir, tmp_path, **{"logging.mlflow.enabled": False}), prelude)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert "RuntimeError: injected bug in the step" in proc.stderr
    assert "in broken" in proc.stderr  # the frame where it happened
    assert not (tmp_path / "COMPLETED").exists()


def _one_line_failure(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("modmoe: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_config_data_and_checkpoint_errors_stay_one_line(small_data_dir, tmp_path):
    base = small_overrides(small_data_dir, tmp_path, **{"logging.mlflow.enabled": False})
    assert "model.depth.capacity = 1.5" in _one_line_failure(_train([*base, "model.depth.capacity=1.5"]))
    line = _one_line_failure(_train([*base, "trainer.global_batch_size=12"]))
    assert "trainer.global_batch_size = 12" in line
    missing = tmp_path / "no-such-corpus" / "*.txt"
    line = _one_line_failure(
        _train([*base, "data.corpus=files", f"data.corpus_glob={missing}", f"data.prepared_dir={tmp_path / 'prep'}"])
    )
    assert "no-such-corpus" in line
    line = _one_line_failure(_train(base, extra=["--resume", str(tmp_path / "nope")]))
    assert "no checkpoint directory there" in line
