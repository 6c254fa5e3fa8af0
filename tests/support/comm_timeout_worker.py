"""torchrun worker for tests/integration/test_comm_failure.py: two ranks in a gloo group made
after ``init_distributed`` (as the checkpoint group and the mesh groups are); rank 1 then hangs
(``hang``: sleeps far past the timeout) or dies (``die``: SIGKILL) while rank 0 is blocked in an
all-reduce with it. Rank 0 must leave through ``exit_on_comm_failure`` with status 75. Before
that, in ``hang`` mode, rank 0 works for twice the timeout before the set-up barrier, which
rank 1 must outwait (it has ``parallel.setup_timeout_s``).

    python -m torch.distributed.run --nproc-per-node 2 comm_timeout_worker.py MODE TIMEOUT_S
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from modmoe.parallel.config import ParallelConfig
from modmoe.parallel.distributed import init_distributed
from modmoe.parallel.failures import exit_on_comm_failure

mode, timeout_s = sys.argv[1], float(sys.argv[2])
env = init_distributed(ParallelConfig(timeout_s=timeout_s, setup_timeout_s=60), "cpu")
if mode == "hang":
    if env.rank == 0:
        time.sleep(2 * timeout_s)  # preparing the data
    with exit_on_comm_failure():
        env.setup_barrier()
    print(f"rank {env.rank} set up", flush=True)
group = dist.new_group(backend="gloo")  # no timeout given: it must still be timeout_s
t = torch.ones(4)
dist.all_reduce(t, group=group)  # both ranks are there
if env.rank == 1:
    if mode == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10 * timeout_s + 30)
    sys.exit(0)
blocked = time.monotonic()
with exit_on_comm_failure(log=lambda line: print(f"{line} [after {time.monotonic() - blocked:.2f} s]", flush=True)):
    dist.all_reduce(t, group=group)
print("the all-reduce returned without its peer", flush=True)
sys.exit(1)
