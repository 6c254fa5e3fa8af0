"""Telling a failed collective (lost or hung peer) from any other error."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from modmoe.parallel.failures import comm_failure, exit_on_comm_failure

# Messages torch 2.13 raised in tests/integration/test_comm_failure.py and the node-loss test.
GLOO_TIMEOUT = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] "
    "Timed out waiting 3000ms for recv operation to complete"
)
GLOO_RESET = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
    "[127.0.0.1]:413: Connection reset by peer. This is typically caused by a remote worker hanging"
)


def test_gloo_timeout_is_a_silent_peer() -> None:
    line = comm_failure(RuntimeError(GLOO_TIMEOUT))
    assert line.startswith("a peer rank did not answer within parallel.timeout_s") and "3000ms" in line


def test_reset_connection_is_a_lost_peer() -> None:
    assert comm_failure(RuntimeError(GLOO_RESET)).startswith("the connection to a peer rank was lost")


def test_torch_distributed_errors_and_chained_ones_count() -> None:
    assert comm_failure(dist.DistBackendError("NCCL communicator was aborted on rank 3")).startswith(
        "the connection to a peer rank was lost"
    )
    try:
        try:
            raise RuntimeError(GLOO_TIMEOUT)
        except RuntimeError as inner:
            raise ValueError("while saving a checkpoint") from inner
    except ValueError as outer:
        assert "did not answer" in comm_failure(outer)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("config error"),
        RuntimeError("CUDA out of memory"),
        RuntimeError("read timed out from mlflow"),
        KeyError("x"),
    ],
)
def test_other_errors_are_not_comm_failures(exc: BaseException) -> None:
    assert comm_failure(exc) is None


def test_other_errors_propagate_with_their_traceback() -> None:
    with pytest.raises(ZeroDivisionError), exit_on_comm_failure():
        1 / 0  # noqa: B018


def test_long_messages_are_cut_to_one_line() -> None:
    line = comm_failure(RuntimeError(GLOO_TIMEOUT + " " + "x" * 1000 + "\nsecond line"))
    assert "\n" not in line and len(line) < 400
