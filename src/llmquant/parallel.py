"""Many processes: torch.distributed, launched by torchrun (``torchrun --nproc-per-node N -m llmquant ...`` or
``llmquant quantize --nproc N``, which starts torchrun).

`Ranks` is this process's place among them and the collectives the algorithms state: sums, maxima and minima
of their statistics, and the broadcast of what one owner rank computed. In one process (no process group) every
collective returns its input, so the engine and the algorithms run the same code alone or in N processes:

- data parallel calibration: rank r takes the r-th of N contiguous blocks of the calibration samples
  (`Ranks.share`); the blocks' union is the one-process set, without duplicates;
- statistics are reduced: minima and maxima of static ranges, channel maxima and sums, Hessians as sums of
  X^T X with their token counts, the error sums of searches;
- solves are partitioned: a solve whose rows are independent (GPTQ's sweep, given H^-1) is split by rows, each
  rank solving its share and `Ranks.all_rows` gathering them; other independent solves go whole to owner ranks
  (`Ranks.owners`, a balanced partition of their cost) and each result is broadcast from its owner;
- training is data parallel: each rank's gradients and losses are averaged (`Ranks.average_gradients`, in buckets
  as DDP's; `Ranks.mean`);
- rank 0 writes.

The backend follows the device: NCCL for CUDA, gloo for the CPU; a tensor on the other kind of device is moved
for the collective and back. ``waited`` counts the seconds spent inside collectives (the manifest reports it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from llmquant.errors import LlmquantError

GRADIENT_BUCKET_BYTES = 25 * 2**20  # the most gradient bytes one collective carries (DDP's default bucket)


class LostProcessError(LlmquantError):
    """Another process of the group stopped (killed, crashed): the collective this one waited in failed."""


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (its environment says so)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device_type: str = "cpu") -> Ranks:
    """Join the process group torchrun describes (NCCL for ``cuda``, else gloo), once; a single process gets the
    trivial `Ranks`."""
    if not launched_by_torchrun():
        return Ranks()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend)
    return Ranks.current()


@dataclass
class Ranks:
    """``rank`` of ``world`` processes and their collectives (identities when ``world`` is 1)."""

    rank: int = 0
    world: int = 1
    waited: float = field(default=0.0, compare=False)

    @classmethod
    def current(cls) -> Ranks:
        """The process group this process belongs to (one process: rank 0 of 1)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def writes(self) -> bool:
        """Whether this rank writes the checkpoint, the manifest and the run directory's shared files."""
        return self.rank == 0

    def share(self, count: int) -> slice:
        """This rank's block of ``count`` samples: contiguous, sizes differing by at most one (none of none)."""
        if 0 < count < self.world:
            raise LlmquantError(f"{count} calibration samples cannot be shared by {self.world} processes: give each "
                                "at least one (--calib-samples) or start fewer")
        return slice(self.rank * count // self.world, (self.rank + 1) * count // self.world)

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The rank that solves each of ``costs``' jobs: longest first, each to the least loaded rank (ties to the
        lowest rank), the same answer on every rank."""
        loads = [0.0] * self.world
        owners = [0] * len(costs)
        for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
            rank = min(range(self.world), key=lambda r: (loads[r], r))
            owners[job] = rank
            loads[rank] += costs[job]
        return owners

    # --- collectives ---------------------------------------------------------------------------------------
    def _collective(self, run: Any, *args: Any, **kwargs: Any) -> None:
        """Run one collective, counting the time spent in it; a process of the group that stopped (killed,
        crashed) ends this one with one line instead of the backend's error."""
        start = time.perf_counter()
        try:
            run(*args, **kwargs)
        except RuntimeError as err:  # (the backends' errors, DistBackendError among them)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise LostProcessError(f"lost another process of the group ({first[:160]}); it stopped first") from None
        finally:
            self.waited += time.perf_counter() - start

    def _in_place(self, run: Any, tensor: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """A collective that changes ``tensor`` in place (on a copy where the backend wants another device)."""
        if self.world == 1:
            return tensor
        moved = self._for_backend(tensor)
        self._collective(run, moved, **kwargs)
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def _reduce(self, tensor: torch.Tensor, op: Any) -> torch.Tensor:
        return self._in_place(dist.all_reduce, tensor, op=op)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place (and returned)."""
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum over ranks, in place (and returned)."""
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def min(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise minimum over ranks, in place (and returned)."""
        return self._reduce(tensor, dist.ReduceOp.MIN)

    def total(self, value: float) -> float:
        """A number summed over ranks."""
        if self.world == 1:
            return value
        return float(self.sum(torch.tensor([value], dtype=torch.float64)))

    def mean(self, values: Sequence[float]) -> list[float]:
        """Each of ``values`` (this process's; as many on every one) averaged over the ranks, in one collective."""
        if self.world == 1 or not values:
            return list(values)
        return (self.sum(torch.tensor(list(values), dtype=torch.float64)) / self.world).tolist()

    def average_gradients(self, tensors: Sequence[torch.Tensor]) -> None:
        """Each tensor's gradient averaged over the ranks, the same on every one (data parallel: each computed it on
        its own samples); a tensor without a gradient on a rank (an expert no token reached there) counts zeros, to
        meet the others. Small gradients travel together, as DDP's buckets do (`_buckets`): one collective a step
        for the scales of a whole model instead of one a tensor, and at most a bucket's bytes copied beside them."""
        if self.world == 1:
            return
        for bucket in _buckets(tensors):
            grads = [tensor.grad if tensor.grad is not None else torch.zeros_like(tensor) for tensor in bucket]
            flat = grads[0].reshape(-1) if len(grads) == 1 else torch.cat([grad.reshape(-1) for grad in grads])
            self.sum(flat).div_(self.world)
            for tensor, part in zip(bucket, flat.split([grad.numel() for grad in grads]), strict=True):
                grad = part.view(tensor.shape)
                tensor.grad = grad if grad.stride() == tensor.stride() else torch.empty_like(tensor).copy_(grad)

    def least(self, value: int | None) -> int | None:
        """The least of every process's ``value`` (None where one of them has none): a budget every process plans
        by alike, such as the memory its working tensors may take."""
        if self.world == 1:
            return value
        least = float(self.min(torch.tensor([-1.0 if value is None else float(value)], dtype=torch.float64)))
        return None if least < 0 else int(least)

    def broadcast(self, tensor: torch.Tensor, owner: int) -> torch.Tensor:
        """``owner``'s ``tensor`` on every rank, in place (and returned)."""
        return self._in_place(dist.broadcast, tensor, src=owner)

    def all_rows(self, part: torch.Tensor, count: int) -> torch.Tensor:
        """A ``[count, ...]`` tensor split over the ranks by `share` (``part``: this rank's rows), whole, on every
        rank (each part padded to the largest share for the gather, then cut back)."""
        if self.world == 1:
            return part
        size = -(-count // self.world)
        padded = part.new_zeros((size, *part.shape[1:]))
        padded[: part.shape[0]] = part
        moved = self._for_backend(padded)
        pieces = [torch.empty_like(moved) for _ in range(self.world)]
        self._collective(dist.all_gather, pieces, moved)
        shares = [Ranks(rank, self.world).share(count) for rank in range(self.world)]
        return torch.cat([piece[: s.stop - s.start] for piece, s in zip(pieces, shares, strict=True)]).to(part.device)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        found: list[Any] = [None] * self.world
        self._collective(dist.all_gather_object, found, value)
        return found

    def barrier(self) -> None:
        if self.world > 1:
            self._collective(dist.barrier)

    def _for_backend(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` where the backend reduces it (NCCL: a CUDA device, gloo: the CPU), contiguous."""
        wanted = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        if wanted is None and tensor.device.type != "cpu":
            return tensor.cpu()
        if wanted is not None and tensor.device != wanted:
            return tensor.to(wanted)
        return tensor if tensor.is_contiguous() else tensor.contiguous()


def _buckets(tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """``tensors`` in runs of one dtype and device whose sizes add up to at most `GRADIENT_BUCKET_BYTES` (a larger
    tensor alone)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and (size + nbytes > GRADIENT_BUCKET_BYTES
                       or (tensor.dtype, tensor.device) != (bucket[0].dtype, bucket[0].device)):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += nbytes
    if bucket:
        yield bucket


SINGLE = Ranks()  # the ranks of one process: every collective is the identity

__all__ = ["SINGLE", "LostProcessError", "Ranks", "init", "launched_by_torchrun", "local_rank"]
