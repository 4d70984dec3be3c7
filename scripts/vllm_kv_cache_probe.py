"""How vLLM's CPU build rounds its FP8 KV cache: keys and values of known scales go through its own cache writer
(`vllm._custom_ops.cpu_attn_reshape_and_cache`, the op its CPU attention calls), and the E4M3 codes it stored are
compared with x / s rounded to nearest (what llmquant's simulation, compressed-tensors and a CUDA cast compute) and
with x / s rounded toward zero (the mantissa truncated).

    /tmp/vllm-env/bin/python scripts/vllm_kv_cache_probe.py [--json FILE]     # the environment of scripts/vllm_env.sh

The cache's layout is the kernel's own, so the codes are compared as sorted lists (every stored code against every
expected one); "toward_zero: true" means the multiset of stored codes is exactly that of the truncated ones.
"""

from __future__ import annotations

import argparse
import json

import torch

TOKENS, KV_HEADS, HEAD_DIM, BLOCK = 32, 3, 64, 32  # SmolLM2-135M's KV heads and head size; one cache block
SCALES = {"key": 0.05, "value": 0.02}


def e4m3_toward_zero(x: torch.Tensor) -> torch.Tensor:
    """The E4M3 value next to ``x`` (within +-448) on the side of zero."""
    nearest = x.to(torch.float8_e4m3fn)
    past = nearest.float().abs() > x.abs()
    codes = nearest.view(torch.uint8).to(torch.int16) - past.to(torch.int16)
    return codes.to(torch.uint8).view(torch.float8_e4m3fn).float()


def stored_codes(key: torch.Tensor, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The E4M3 values vLLM's CPU writer stores for ``key`` and ``value`` with `SCALES`, sorted."""
    import vllm._custom_ops as ops

    cache = torch.zeros(1, KV_HEADS, 2 * BLOCK, HEAD_DIM, dtype=torch.uint8)
    key_cache, value_cache = cache.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, torch.arange(TOKENS), "vec",
                                   k_scale=SCALES["key"], v_scale=SCALES["value"], kv_cache_dtype="fp8_e4m3")
    return {name: c.reshape(-1).view(torch.float8_e4m3fn).float().sort().values
            for name, c in (("key", key_cache), ("value", value_cache))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    import vllm

    torch.manual_seed(0)
    tensors = {"key": torch.randn(TOKENS, KV_HEADS, HEAD_DIM) * 3, "value": torch.randn(TOKENS, KV_HEADS, HEAD_DIM) * 2}
    stored = stored_codes(tensors["key"], tensors["value"])
    result: dict = {"vllm": vllm.__version__, "torch": torch.__version__, "scales": SCALES}
    for name, x in tensors.items():
        scaled = (x / SCALES[name]).clamp(-448, 448).reshape(-1)
        nearest = scaled.to(torch.float8_e4m3fn).float().sort().values
        toward_zero = e4m3_toward_zero(scaled).sort().values
        result[name] = {
            "nearest": bool(torch.equal(stored[name], nearest)),
            "toward_zero": bool(torch.equal(stored[name], toward_zero)),
            "mean_abs_stored_over_nearest": round((stored[name].abs().mean() / nearest.abs().mean()).item(), 4),
        }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
