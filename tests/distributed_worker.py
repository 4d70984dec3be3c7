"""Run llmquant.quantize in a process group of ``world`` gloo processes on one machine (spawned by
tests/test_distributed.py): each rank quantizes the same tiny models on its share of the calibration samples,
and rank 0 saves, for each job, what the tests compare with one process (every rank its learned online rotations)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

import llmquant
from conftest import make_model
from llmquant.nn.online_rotation import input_rotation_of


@contextmanager
def process_group(rank: int, world: int, port: int) -> Iterator[None]:
    """This process as ``rank`` of a gloo group of ``world`` on this machine (one thread, the CPU), left at the end."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LLMQUANT_DEVICE="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def quantize_on_rank(rank: int, world: int, port: int, jobs: list[tuple[str, str, dict]], calib: torch.Tensor,
                     out: str) -> None:
    """``jobs``: (name, model family, recipe); rank 0 writes OUT/NAME.pt with the state dict and the manifest."""
    with process_group(rank, world, port):
        for name, family, recipe in jobs:
            model = llmquant.quantize(make_model(family), recipe, calib=calib, progress=False)
            learned = {n: r.dense for n, m in model.named_modules()
                       if (r := input_rotation_of(m)) is not None and r.dense is not None}
            if learned:  # every rank's learned rotations, which must be the same
                torch.save(learned, Path(out) / f"{name}.rotations.{rank}.pt")
            if rank == 0:
                state = {k: v.clone() for k, v in model.state_dict().items()}
                torch.save({"state": state, "manifest": model.llmquant_manifest.to_dict()}, Path(out) / f"{name}.pt")
