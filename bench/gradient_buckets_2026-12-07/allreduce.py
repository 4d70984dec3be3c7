"""Seconds a step of averaging the default model's scale gradients over two gloo processes on this machine: one
collective a tensor (llmquant before 2026-12-07) against `Ranks.average_gradients`' buckets. The gradients of scale
training's per-channel scales (30 layers x 7 Linears, one scale an output row) and, with ``--codes``, of the codes'
offsets too (one a weight). Run: .venv/bin/python bench/gradient_buckets_2026-12-07/allreduce.py [--codes]"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmquant.parallel import Ranks

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down


def per_tensor(ranks: Ranks, tensors: list[torch.Tensor]) -> None:
    for tensor in tensors:  # (the code before buckets)
        tensor.grad = ranks.sum(tensor.grad).div_(ranks.world)


def run(rank: int, codes: bool, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ranks = Ranks.current()
    tensors = [torch.zeros(out) for _ in range(30) for out, _ in SHAPES]
    tensors += [torch.zeros(shape) for _ in range(30) for shape in SHAPES] if codes else []
    times: dict[str, list[float]] = {"one collective a tensor": [], "buckets": []}
    for _ in range(steps):
        for name, average in (("one collective a tensor", per_tensor), ("buckets", Ranks.average_gradients)):
            for tensor in tensors:
                tensor.grad = torch.ones_like(tensor)
            dist.barrier()
            start = time.perf_counter()
            average(ranks, tensors)
            times[name].append(time.perf_counter() - start)
    if rank == 0:
        print(f"{len(tensors)} tensors, {sum(t.numel() for t in tensors) * 4 / 2**20:.1f} MiB of gradients, "
              f"median of {steps} steps, one thread a process:")
        for name, found in times.items():
            print(f"  {name}: {statistics.median(found) * 1e3:.2f} ms a step")
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--codes", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    mp.spawn(run, args=(args.codes, args.steps), nprocs=2)
