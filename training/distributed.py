"""The process group: one code path for a laptop and a cluster. A single `python training/run.py` gets a
one-rank gloo (CPU) or NCCL (GPU) group, a `deepspeed` launch gets the launcher's; on CPUs each rank
takes its share of the cores.
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass

import torch

from zoo.host import usable_cpus


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> Dist:
    """Join the launcher's process group, or make a one-rank group when run with plain `python`."""
    single = "RANK" not in os.environ
    if single:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not cuda:
        set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1))))
    import deepspeed

    # init_distributed JIT-compiles a shared-memory op (20 s cold) used only by inference all-reduce.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"]), device)


def set_cpu_threads(local_world: int) -> None:
    """An explicit OMP_NUM_THREADS wins (torch read it at start-up); else the cores this process may
    use split between the ranks on this node."""
    if "OMP_NUM_THREADS" not in os.environ:
        # The launcher does not split the cores between ranks; oversubscription halves throughput.
        torch.set_num_threads(max(1, usable_cpus() // local_world))
