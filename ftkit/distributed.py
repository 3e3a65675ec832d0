"""Several processes on torch.distributed, as launched by torchrun: who this process is, and the few collectives
ftkit needs.

A plain `ftkit train` is a world of one process whose collectives return their input, so the training loop has a
single code path. Every collective here carries Python scalars or small objects; the only large exchange in
ftkit is DistributedDataParallel's gradient all-reduce (first-order methods), which DDP does itself.

Sums are exact where it matters: `all_sum` adds float64 vectors in which each entry is set by one process only
(the others send 0.0, and x + 0.0 == x), so every process receives the very values one process would have
computed, and then adds them in a fixed order itself. That is what makes a run on N processes bit-identical to a
run on one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

# Set by `ftkit train --nproc N` for the processes it starts, so a run can name the command that continues it.
NPROC_ENV = "FTKIT_NPROC"

# torch is imported where a collective runs, so `main_process` and `launched_by_torchrun` cost nothing to import
# (the CLI asks them before it knows whether anything heavy will run).


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: object = "cpu"  # this process's torch.device
    backend: str = "gloo"  # NCCL when every process has a GPU of its own, else gloo (see init_world)
    # Payload bytes this process has sent through ftkit's own collectives (DDP's are counted by its comm hook).
    traffic: dict = field(default_factory=lambda: {"calls": 0, "bytes": 0})

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def collective_device(self):
        """Where the tensors of ftkit's collectives live: NCCL reduces on the GPU, gloo on the host."""
        return self.device if self.backend == "nccl" else "cpu"

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over processes, in float64."""
        if self.size == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.collective_device)
        self._count(tensor.numel() * tensor.element_size())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def all_max(self, value: int) -> int:
        if self.size == 1:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.int64, device=self.collective_device)
        self._count(8)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def all_gather(self, obj) -> list:
        """Every process's `obj`, in rank order."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        gathered = [None] * self.size
        dist.all_gather_object(gathered, obj)
        self._count(len(repr(obj)))  # pickled size is close; these are small evaluation results
        return gathered

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def owns(self, index: int) -> bool:
        """Work items (chunks of a batch, evaluation batches, queries) are dealt round robin."""
        return index % self.size == self.rank

    def _count(self, nbytes: int) -> None:
        self.traffic["calls"] += 1
        self.traffic["bytes"] += nbytes


SINGLE = World()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_world(device: str = "cpu") -> World:
    """This process's place: its device (`train.device`, resolved; under torchrun `cuda` is the GPU of the local
    rank) and, under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment), the process group it joins:
    NCCL when each process has a GPU of its own (`cuda`, `auto`), gloo between CPUs and between processes pinned to
    one GPU (`cuda:N`: NCCL refuses two ranks on the same GPU). A plain process is a world of one."""
    from ftkit.devices import resolve_device

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    placed = resolve_device(device, local_rank)
    if not launched_by_torchrun():
        return World(device=placed)
    import torch
    import torch.distributed as dist

    backend = "nccl" if placed.type == "cuda" and ":" not in device else "gloo"
    if placed.type == "cuda":
        torch.cuda.set_device(placed)  # NCCL and all_gather_object use the current device
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, device=placed,
                 backend=backend)


def close_world(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def main_process() -> bool:
    """True unless this is a torchrun worker other than rank 0 (usable before the process group exists)."""
    return os.environ.get("RANK", "0") == "0"
