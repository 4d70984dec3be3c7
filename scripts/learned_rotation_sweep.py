"""How the learned rotations' step and loss settle: on the default model, the quantized network's cross-entropy on
4 held-out calibration windows (seed 123) before and after learning R1 and the R2s with each setting, on the
Hadamard-rotated network the engine learns on (activations quantized, weights float: the GPTQ setting).

    .venv/bin/python scripts/learned_rotation_sweep.py SCHEME '[{"iterations": 16, "lr": 0.1}, ...]'

Each setting starts again from the Hadamards; one JSON line per setting (held-out loss, the first and last
training losses, seconds, and the Frobenius norm of R1's momentum every 4 steps).
"""

from __future__ import annotations

import json
import sys
import time

import torch

import llmquant
import llmquant.algorithms.spinquant as spinquant
from llmquant import data
from llmquant.algorithms.quarot import QuaRotConfig
from llmquant.model.model_map import detect_model_map
from llmquant.pipeline.learned_rotation import network_map
from llmquant.pipeline.rotation import rotate_whole_model

NORMS: list[float] = []
_cayley = spinquant.cayley_step


def traced_step(x: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor, lr: float, beta: float):
    out = _cayley(x, grad, momentum, lr, beta)
    if x.shape[0] > 64:  # R1
        NORMS.append(round(torch.linalg.matrix_norm(out[1]).item(), 3))
    return out


def main() -> None:
    scheme, settings = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(2)
    spinquant.cayley_step = traced_step
    model, tokenizer = llmquant.load(None)
    tokens = data.tokenize(tokenizer, data.corpus("pydoc", "calib"))
    calib = data.calibration_samples(tokens, 32, 512, 0)
    held_out = data.calibration_samples(tokens, 4, 512, 123)
    model_map = detect_model_map(model)
    rotated, _ = rotate_whole_model(model, model_map, QuaRotConfig(), calib[:1, :128])
    plan = llmquant.Recipe.build(scheme=scheme).resolve(model, model_map)
    network = spinquant.RotatedNetwork(model, network_map(model_map, rotated, plan, weights=False),
                                       hidden=rotated.plan.rotation("R1").n, head_dim=rotated.plan.rotation("R2").n)

    def held_out_loss() -> float:
        with torch.no_grad():
            return sum(network.loss(held_out[i : i + 1]).item() for i in range(held_out.shape[0])) / 4

    base = held_out_loss()
    for setting in settings:
        with torch.no_grad():
            for _, u in network.named_rotations():
                u.copy_(torch.eye(u.shape[0]))
        start = time.perf_counter()
        result = spinquant.learn(network, calib, spinquant.SpinQuantConfig(**setting), progress=False)
        print(json.dumps({"setting": setting, "held_out_loss": held_out_loss(), "hadamard_loss": base,
                          "train_first": result.losses[:3], "train_last": result.losses[-3:],
                          "seconds": round(time.perf_counter() - start), "r1_momentum_norm": NORMS[::4]}), flush=True)
        NORMS.clear()


if __name__ == "__main__":
    main()
