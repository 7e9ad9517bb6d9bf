"""Several training processes (``torchrun``): each rank takes its share of each step's cases; gradients are
summed with one ``all_reduce`` per optimizer step (what DDP's reducer does, written out because the optional
decoder and accumulation would need DDP's unused-parameter and no_sync bookkeeping); rank 0 alone writes."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def all_sum_grads(self, params) -> None:
        """Sum the gradients of ``params`` over the processes, in one flat all-reduce (nothing with one process)."""
        if self.world == 1:
            return
        flat = self.all_sum(torch.cat([p.grad.reshape(-1) for p in params]))
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed() -> Dist:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("ANYMC3D_DIST_BACKEND") != "gloo" else "gloo"
        torch.distributed.init_process_group(backend)
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())
