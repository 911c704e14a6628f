"""Data-parallel training across processes started by torchrun, one process per device.

torchrun puts RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR / MASTER_PORT) in each process's
environment; `init_distributed` reads them and joins the process group: NCCL on GPUs, gloo on CPUs.
Without them a process is a world of one and torch.distributed is never touched, so every
collective below is then the identity.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# The other ranks wait in a collective while rank 0 fits the tokenizer and tokenizes the corpus
# (tens of minutes on WMT) and while it validates; NCCL's default timeout is 10 minutes.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def local_device(local_rank: int = 0) -> torch.device:
    """The GPU of this local rank where there are GPUs, else the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes, and the device it computes on."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=local_device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all processes (float64, so token counts stay exact)."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every process."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on rank 0 first and then on the others, e.g. to fill a cache they read."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """The World torchrun describes in `env` (default: os.environ); a world of one without it."""
    env = os.environ if env is None else env
    try:
        size, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise ValueError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers: {e}") from None
    if not 0 <= rank < size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={size}")
    return World(rank=rank, local_rank=local_rank, size=size, device=local_device(local_rank))


def init_distributed() -> World:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs); a no-op for one process."""
    world = world_from_env()
    if world.size > 1 and not dist.is_initialized():
        if world.device.type == "cuda":
            torch.cuda.set_device(world.device)
            dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=world.device)
        else:
            dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return world


def local_launch_command(nproc: int, train_args: list[str]) -> list[str]:
    """The command running `nmt-train TRAIN_ARGS` in `nproc` processes on this machine under
    torchrun, with this interpreter; the package must be importable (installed, or on PYTHONPATH)."""
    entry = "import sys; from training.cli import train_main; sys.exit(train_main())"
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "--no-python", sys.executable, "-c", entry, *train_args,
    ]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
