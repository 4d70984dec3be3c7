"""Which families' decode steps attend over the INT8 KV cache's codes (`llmquant.nn.kv_storage`), and with what
agreement: each tiny random family of `llmquant.testing.tiny_models` quantized with the per-token INT8 KV scheme
(round to nearest), greedy generation of 6 tokens from a batch of 2 prompts with the decode op and with
``LLMQUANT_GEMV=0`` (the dequantized cache), on the int8 runtime.

    .venv/bin/python scripts/kv_attention_families.py

One line per family: the op's attention calls, the first decode step's verdict on each attention
(`KVCacheQuantizer.passes_cache_untouched`; None: its cache layer is not an int8 one, or the call never comes),
whether the tokens agree, and the largest logit difference.
"""

from __future__ import annotations

import os

import torch

import llmquant
from llmquant.errors import LlmquantError
from llmquant.nn import kv_storage
from llmquant.nn.kv_cache import KVCacheQuantizer
from llmquant.nn.quant_linear import set_runtime
from llmquant.testing.tiny_models import FAMILIES, VOCAB, make_model

SCHEME = "w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token_dynamic"


def main() -> None:
    calls: list[int] = []
    attend = kv_storage.decode_attention
    kv_storage.decode_attention = lambda *args: calls.append(1) or attend(*args)
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    prompt = calib[:2, :12]
    for family in FAMILIES:
        try:
            model = llmquant.quantize(make_model(family), {"scheme": SCHEME}, calib=calib, progress=False)
        except LlmquantError as err:
            print(f"{family}: not quantized ({str(err)[:120]})")
            continue
        set_runtime(model, "int8")
        outputs = {}
        for flag in ("1", "0"):
            os.environ["LLMQUANT_GEMV"] = flag
            calls.clear()
            with torch.no_grad():
                outputs[flag] = (model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                                output_logits=True, return_dict_in_generate=True, pad_token_id=0),
                                 len(calls))
        os.environ.pop("LLMQUANT_GEMV")
        (read, count), (exact, _) = outputs["1"], outputs["0"]
        verdicts = sorted({str(m.passes_cache_untouched) for m in model.modules() if isinstance(m, KVCacheQuantizer)})
        difference = (torch.stack(read.logits) - torch.stack(exact.logits)).abs().max().item()
        print(f"{family}: op attention calls {count}, untouched {'/'.join(verdicts)}, tokens equal "
              f"{torch.equal(read.sequences, exact.sequences)}, largest logit difference {difference:.2e}")


if __name__ == "__main__":
    main()
