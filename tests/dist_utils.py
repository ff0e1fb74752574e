"""Running a test's body in several processes of a gloo (CPU) or NCCL group, spawned by the test."""
from __future__ import annotations

import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago (the rendezvous of the spawned group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank, world_size, port, backend, fn, args):
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        # every rank has its group's connections before any runs the body, and none tears the group down while
        # another still talks to it (a peer aborted once in CI, "terminate called without an active exception",
        # in test_triton_cp_equals_single_process)
        dist.barrier()
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args, backend: str = "gloo") -> None:
    """Runs fn(rank, world_size, *args) in world_size fresh processes joined in one process group; a failure
    (an assertion included) in any of them is raised here. fn must be a module-level function."""
    mp.spawn(_run, args=(world_size, free_port(), backend, fn, args), nprocs=world_size, join=True)
