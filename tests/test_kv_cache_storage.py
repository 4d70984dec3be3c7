"""INT8 KV-cache storage on the int8 runtime: the cache holds int8 codes and gives the simulation's tokens and
logits (tiny random Llama, 2 layers, hidden 64, 2 KV heads of head_dim 16)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, MistralConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

import llmquant
from conftest import AVX2_OP_REFUSAL, VOCAB, feign_no_int8_instructions, make_model
from llmquant.nn import int8_gemv
from llmquant.nn.int8_gemv import gemv_refusal
from llmquant.nn.kv_cache import STORED_FLAG, KVCacheQuantizer
from llmquant.nn.kv_storage import (
    FloatCacheLayer,
    Int8CacheLayer,
    cache_argument,
    int8_kv_cache,
    returned_cache,
    set_kv_cache_runtime,
)
from llmquant.nn.quant_linear import set_runtime
from llmquant.quant.primitives import MIN_SCALE

TOKEN = "w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token_dynamic"
STATIC = "w_int8_per_channel_a_int8_per_tensor_kv_cache_int8_per_tensor_static"
TENSOR_DYNAMIC = "w_int8_per_channel_a_int8_per_tensor_kv_cache_int8_per_tensor_dynamic"
QUAROT = [{"name": "quarot"}]  # R1-R4: R3 rotates queries and keys before the KV cache is quantized
NEW_TOKENS = 8
HEAD_DIM = 16


def quantized(scheme: str, calib_ids: torch.Tensor, pre_opts: list | None = None,
              model: torch.nn.Module | None = None) -> torch.nn.Module:
    model = model if model is not None else make_model("llama")
    return llmquant.quantize(model, {"scheme": scheme, "pre_opts": pre_opts or []}, calib=calib_ids, progress=False)


def generate(model: torch.nn.Module, prompt: torch.Tensor, **options: object):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, **options)


def step_logits(output) -> torch.Tensor:
    return torch.stack(output.logits)  # [new tokens, batch, vocab]


def test_the_cache_of_a_kv_quantized_model_holds_int8_on_the_int8_runtime(calib_ids: torch.Tensor) -> None:
    model = quantized(TOKEN, calib_ids)
    assert set_runtime(model, "int8") == 7 * 2 + 2  # seven Linears and one KV-cache quantizer per layer
    output = generate(model, calib_ids[:2, :12])
    for layer in returned_cache(output).layers:
        assert isinstance(layer, Int8CacheLayer)
        positions = 12 + NEW_TOKENS - 1  # the last token is sampled, not yet stored
        assert layer.keys.dtype == layer.values.dtype == torch.int8
        assert layer.keys.shape == layer.values.shape == (2, 2, positions, HEAD_DIM)
        assert layer.key_scales.dtype == torch.float32 and layer.key_scales.shape == (2, 2, positions, 1)
        codes = layer.keys.nbytes + layer.values.nbytes
        scales = layer.key_scales.nbytes + layer.value_scales.nbytes
        float32 = 4 * layer.keys.numel() * 2
        assert codes * 4 == float32  # one byte per element ...
        assert (codes + scales) / float32 == pytest.approx((1 + 4 / HEAD_DIM) / 4)  # ... plus a float per head_dim


def test_a_cache_made_by_hand_is_filled_lazily_with_int8_layers(calib_ids: torch.Tensor) -> None:
    model = quantized(STATIC, calib_ids)
    set_runtime(model, "int8")
    cache = DynamicCache()  # no config: transformers appends its layers on the first update
    with torch.no_grad():
        model(calib_ids[:1, :10], **{cache_argument(model): cache}, use_cache=True)
    assert [type(layer) for layer in cache.layers] == [Int8CacheLayer, Int8CacheLayer]
    assert cache.get_seq_length() == 10 and cache.layers[0].key_scales.shape == (1, 1, 10, 1)  # per tensor


@pytest.mark.parametrize(("scheme", "pre_opts"), [(TOKEN, None), (STATIC, None), (STATIC, QUAROT), (TOKEN, QUAROT)],
                         ids=["token", "static", "static+quarot", "token+quarot"])
def test_greedy_generation_from_int8_storage_matches_the_simulation(
    scheme: str, pre_opts: list | None, calib_ids: torch.Tensor
) -> None:
    model = quantized(scheme, calib_ids, pre_opts)
    prompt = calib_ids[:2, :12]
    set_runtime(model, "int8")
    stored = generate(model, prompt)
    assert all(isinstance(layer, Int8CacheLayer) for layer in returned_cache(stored).layers)
    # the same int8 Linears with the KV cache simulated: the keys and values attention reads are the same
    # numbers (the stored codes times their scales), so the logits agree to float32 rounding (here: exactly)
    set_kv_cache_runtime(model, "fake")
    simulated_kv = generate(model, prompt)
    assert all(type(layer) is DynamicLayer for layer in returned_cache(simulated_kv).layers)
    assert torch.equal(stored.sequences, simulated_kv.sequences)
    torch.testing.assert_close(step_logits(stored), step_logits(simulated_kv), rtol=0, atol=1e-6)
    # the whole fake runtime (fake-quantized Linears too): float rounding of the GEMMs only
    set_runtime(model, "fake")
    simulated = generate(model, prompt)
    assert torch.equal(stored.sequences, simulated.sequences)
    torch.testing.assert_close(step_logits(stored), step_logits(simulated), rtol=0, atol=1e-4)


def test_dynamic_per_tensor_storage_scales_each_chunk(calib_ids: torch.Tensor) -> None:
    """The prefill is identical; then each new token gets its own scale where the simulation rescales the
    whole sequence, so decoding differs slightly."""
    model = quantized(TENSOR_DYNAMIC, calib_ids)
    prompt = calib_ids[:1, :12]
    set_runtime(model, "int8")
    stored = generate(model, prompt)
    set_kv_cache_runtime(model, "fake")
    simulated = generate(model, prompt)
    logits_stored, logits_simulated = step_logits(stored), step_logits(simulated)
    assert torch.equal(logits_stored[0], logits_simulated[0])  # the prefill: one chunk, one scale in both
    assert (logits_stored[1:] - logits_simulated[1:]).abs().max() < 0.05


def test_without_a_cache_the_storage_path_is_not_used(calib_ids: torch.Tensor, eval_ids: torch.Tensor) -> None:
    model = quantized(STATIC, calib_ids, QUAROT)
    set_runtime(model, "int8")
    with torch.no_grad():
        stored = model(eval_ids, use_cache=False).logits
    attentions = [layer.self_attn for layer in model.model.layers]
    assert not any(getattr(a, STORED_FLAG) for a in attentions)
    set_kv_cache_runtime(model, "fake")
    with torch.no_grad():
        simulated = model(eval_ids, use_cache=False).logits
    assert torch.equal(stored, simulated)


def test_fake_runtime_keeps_the_float_cache(calib_ids: torch.Tensor) -> None:
    model = quantized(TOKEN, calib_ids)
    set_runtime(model, "int8")
    set_runtime(model, "fake")
    output = generate(model, calib_ids[:1, :12])
    assert all(type(layer) is DynamicLayer and layer.keys.dtype == torch.float32
               for layer in returned_cache(output).layers)


def test_beam_search_reorders_codes_and_scales_together(calib_ids: torch.Tensor) -> None:
    model = quantized(TOKEN, calib_ids)
    prompt = calib_ids[:1, :12]
    set_runtime(model, "int8")
    stored = generate(model, prompt, num_beams=3)
    assert isinstance(returned_cache(stored).layers[0], Int8CacheLayer)
    set_kv_cache_runtime(model, "fake")
    assert torch.equal(stored.sequences, generate(model, prompt, num_beams=3).sequences)


def prefilled(calib_ids: torch.Tensor, tokens: int = 10) -> tuple[torch.nn.Module, DynamicCache]:
    """A per-token INT8 KV model on the int8 runtime and its cache after a prefill of ``tokens`` tokens."""
    model = quantized(TOKEN, calib_ids)
    set_runtime(model, "int8")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(calib_ids[:1, :tokens], **{cache_argument(model): cache}, use_cache=True)
    return model, cache


def test_crop_and_reset_keep_codes_and_scales_aligned(calib_ids: torch.Tensor) -> None:
    model, cache = prefilled(calib_ids)
    layer = cache.layers[0]
    cache.crop(-3)  # remove the last three positions
    assert layer.keys.shape[-2] == layer.key_scales.shape[-2] == layer.value_scales.shape[-2] == 7
    cache.reset()
    assert cache.get_seq_length() == 0 and layer.key_scales is None
    with torch.no_grad():
        model(calib_ids[:1, :5], **{cache_argument(model): cache}, use_cache=True)
    assert cache.get_seq_length() == 5 and layer.keys.dtype == torch.int8


def test_sliding_window_layers_keep_the_simulation(calib_ids: torch.Tensor) -> None:
    config = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           sliding_window=16)
    torch.manual_seed(0)
    model = quantized(TOKEN, calib_ids, model=AutoModelForCausalLM.from_config(config).eval())
    set_runtime(model, "int8")
    output = generate(model, calib_ids[:1, :12])
    assert all(type(layer) is DynamicSlidingWindowLayer for layer in returned_cache(output).layers)


def test_a_loaded_checkpoint_stores_int8_on_the_int8_runtime(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    model = quantized(STATIC, calib_ids, QUAROT)
    llmquant.save(model, None, tmp_path / "ckpt")
    prompt = calib_ids[:1, :12]
    loaded, _ = llmquant.load(tmp_path / "ckpt", runtime="int8")
    stored = generate(loaded, prompt)
    assert all(isinstance(layer, Int8CacheLayer) and layer.keys.dtype == torch.int8
               for layer in returned_cache(stored).layers)
    simulated_model, _ = llmquant.load(tmp_path / "ckpt", runtime="fake")  # the cache holds floats
    simulated = generate(simulated_model, prompt)
    assert all(type(layer) is DynamicLayer for layer in returned_cache(simulated).layers)
    assert torch.equal(stored.sequences, simulated.sequences)
    torch.testing.assert_close(step_logits(stored), step_logits(simulated), rtol=0, atol=1e-4)


def test_a_cache_built_up_front_stores_int8_where_the_model_quantizes_its_kv(calib_ids: torch.Tensor) -> None:
    """`int8_kv_cache` gives generate (or a forward) a cache whose layers are already int8 ones."""
    model = quantized(TOKEN, calib_ids)
    set_runtime(model, "int8")
    cache = int8_kv_cache(model)
    assert [type(layer) for layer in cache.layers] == [Int8CacheLayer, Int8CacheLayer]
    prompt = calib_ids[:1, :12]
    given = generate(model, prompt, **{cache_argument(model): cache})
    assert returned_cache(given) is cache and cache.layers[0].keys.dtype == torch.int8
    assert torch.equal(given.sequences, generate(model, prompt).sequences)
    set_runtime(model, "fake")
    assert all(type(layer) is DynamicLayer for layer in int8_kv_cache(model).layers)  # the simulation keeps floats


def test_a_4bit_kv_cache_takes_16_levels_per_token_and_head_and_loads_back(calib_ids: torch.Tensor,
                                                                          eval_ids: torch.Tensor,
                                                                          tmp_path: Path) -> None:
    from conftest import logits, relative_error
    from llmquant.quant import fake_quantize
    from llmquant.quant.scheme import KV_CACHE

    states = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0))  # [batch, heads, tokens, head_dim]
    quantized = fake_quantize(states, KV_CACHE["int4_per_token_asym"])
    assert max(len(row.unique()) for row in quantized.reshape(-1, 16)) <= 16  # per token and head: 4 bits
    reference = logits(make_model("llama"), eval_ids)
    errors = {}
    for kv in ("int8_per_token", "int4_per_token_asym"):
        model = llmquant.quantize(make_model("llama"), {"scheme": "none", "kv_cache": kv}, calib=calib_ids,
                                  progress=False)
        errors[kv] = relative_error(reference, logits(model, eval_ids))
    assert errors["int8_per_token"] < errors["int4_per_token_asym"] < 0.2, errors
    llmquant.save(model, None, tmp_path / "ckpt")
    loaded, _ = llmquant.load(tmp_path / "ckpt", device="cpu")
    assert torch.equal(logits(model, eval_ids), logits(loaded, eval_ids))


@pytest.mark.parametrize("scheme", [TOKEN, STATIC])
@pytest.mark.parametrize("decode_op", ["1", "0"])
def test_stores_grow_in_place_and_give_the_simulations_tokens(scheme: str, decode_op: str, calib_ids: torch.Tensor,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores that grow by 3 positions (every other decode step reallocates), with keys and values in one store
    (dynamic per token) or each on its own (static): the same tokens as the simulation, with the decode op's
    quantization and attention over the codes (`llmquant.nn.int8_gemv`, where it runs; logits within float32
    roundings) and with torch's (the same logits)."""
    from llmquant.nn import kv_storage

    monkeypatch.setenv("LLMQUANT_GEMV", decode_op)
    monkeypatch.setattr(kv_storage, "GROWTH", 3)
    model = quantized(scheme, calib_ids)
    prompt = calib_ids[:2, :12]
    simulated = generate(model, prompt)
    set_runtime(model, "int8")
    stored = generate(model, prompt)
    layer = returned_cache(stored).layers[0]
    assert isinstance(layer, Int8CacheLayer)
    assert set(layer._stores) == ({"codes", "scales"} if scheme == TOKEN else
                                  {"keys", "values", "key_scales", "value_scales"})
    assert torch.equal(stored.sequences, simulated.sequences)
    if decode_op == "1" and int8_gemv.kv_kernel(torch.empty(0)) is not None:
        torch.testing.assert_close(step_logits(stored), step_logits(simulated), rtol=0, atol=1e-5)
    else:
        assert torch.equal(step_logits(stored), step_logits(simulated))


def test_a_decode_step_writes_one_position_into_the_store(calib_ids: torch.Tensor) -> None:
    model, cache = prefilled(calib_ids)
    layer = cache.layers[0]
    store = layer._stores["codes"].tensor
    before = layer.keys.clone()
    with torch.no_grad():
        model(calib_ids[:1, 10:11], **{cache_argument(model): cache}, use_cache=True)
    assert layer._stores["codes"].tensor is store  # room was left: no copy of the cache
    assert layer.keys.shape[-2] == 11 and torch.equal(layer.keys[..., :10, :], before)
    assert layer.keys.data_ptr() == store.data_ptr() and layer.values.data_ptr() == store[1].data_ptr()


def test_decoding_after_a_crop_continues_from_the_kept_positions(calib_ids: torch.Tensor) -> None:
    model = quantized(TOKEN, calib_ids)
    set_runtime(model, "int8")
    ids = calib_ids[:1, :10]
    cropped, whole = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{cache_argument(model): cropped}, use_cache=True)
        cropped.crop(-3)
        again = model(ids[:, 7:], **{cache_argument(model): cropped}, use_cache=True).logits
        reference = model(ids, **{cache_argument(model): whole}, use_cache=True).logits[:, 7:]
    torch.testing.assert_close(again, reference, rtol=1e-5, atol=1e-5)  # (other GEMM shapes: not bit for bit)
    assert torch.equal(cropped.layers[0].keys, whole.layers[0].keys)  # the re-fed positions get the same codes


W8A8 = "w_int8_per_channel_a_int8_per_token_dynamic"  # no KV-cache quantizer: a float cache


@pytest.mark.parametrize("num_beams", [1, 3])
def test_the_int8_runtimes_float_cache_grows_in_place_with_transformers_logits(
        num_beams: int, calib_ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a KV-cache quantizer the int8 runtime's cache layers are `FloatCacheLayer`s, whose stores grow by 3
    positions here (every other decode step reallocates): the logits of transformers' own layers bit for bit (the
    same values), greedy and with beam search (which reorders the cache); the fake runtime keeps transformers'
    layers."""
    from llmquant.nn import kv_storage

    monkeypatch.setattr(kv_storage, "GROWTH", 3)
    model = quantized(W8A8, calib_ids)
    prompt = calib_ids[:2, :12]
    set_runtime(model, "int8")
    stored = generate(model, prompt, num_beams=num_beams)
    layers = returned_cache(stored).layers
    assert all(type(layer) is FloatCacheLayer and layer.keys.dtype == torch.float32 for layer in layers)
    # keys and values side by side in one store (a beam search's last reorder releases it: the next step copies)
    assert set(layers[0]._stores) == ({"states"} if num_beams == 1 else set())
    set_kv_cache_runtime(model, "fake")  # the same int8 Linears, transformers' cache layers
    plain = generate(model, prompt, num_beams=num_beams)
    assert all(type(layer) is DynamicLayer for layer in returned_cache(plain).layers)
    assert torch.equal(stored.sequences, plain.sequences)
    assert torch.equal(step_logits(stored), step_logits(plain))


def test_the_float_cache_keeps_a_prefill_writes_decode_steps_in_place_and_crops() -> None:
    """A prefill is kept as it comes (no copy); the first decode step copies it into a store with room, the next
    writes its position there (no copy of the cache); a crop keeps the first positions, and decoding continues from
    them with the logits of a cache that never held the rest (a float model: `set_kv_cache_runtime` alone puts the
    layers in place)."""
    model = make_model("llama")
    set_kv_cache_runtime(model, "int8")
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :9], **{cache_argument(model): cache}, use_cache=True)
        layer = cache.layers[0]
        assert type(layer) is FloatCacheLayer and not layer._stores and layer.keys.shape[-2] == 9
        model(ids[:, 9:10], **{cache_argument(model): cache}, use_cache=True)
        store, before = layer._stores["states"].tensor, layer.keys.clone()
        model(ids[:, 10:], **{cache_argument(model): cache}, use_cache=True)
        assert layer._stores["states"].tensor is store
        assert layer.keys.shape[-2] == 11 and torch.equal(layer.keys[..., :10, :], before)
        assert layer.keys.data_ptr() == store.data_ptr() and layer.values.data_ptr() == store[1].data_ptr()
        cache.crop(-3)
        assert cache.get_seq_length() == 8 and layer.values.shape[-2] == 8
        again = model(ids[:, 8:], **{cache_argument(model): cache}, use_cache=True).logits
        plain = DynamicCache(config=model.config)
        set_kv_cache_runtime(model, "fake")
        model(ids[:, :8], **{cache_argument(model): plain}, use_cache=True)
        reference = model(ids[:, 8:], **{cache_argument(model): plain}, use_cache=True).logits
    assert type(plain.layers[0]) is DynamicLayer
    torch.testing.assert_close(again, reference, rtol=1e-5, atol=1e-5)  # (other GEMM shapes: not bit for bit)


def test_the_workspace_is_reused_across_layers_and_grows() -> None:
    from llmquant.nn.kv_storage import dequantize_states

    codes = torch.randint(-127, 128, (2, 1, 2, 5, 4), dtype=torch.int8)
    scales = torch.rand(2, 1, 2, 5, 1)
    first = dequantize_states(codes, scales, torch.float32, "test")
    assert torch.equal(first, codes.float() * scales)
    second = dequantize_states(codes[..., :3, :], scales[..., :3, :], torch.float32, "test")
    assert second.data_ptr() == first.data_ptr()  # the same buffer: valid until the next call
    longer = dequantize_states(codes.repeat(1, 1, 1, 4, 1), scales.repeat(1, 1, 1, 4, 1), torch.bfloat16, "test")
    assert longer.dtype == torch.bfloat16 and torch.equal(longer, (codes.float() * scales).repeat(1, 1, 1, 4, 1)
                                                          .bfloat16())


VNNI_OP = pytest.mark.skipif(gemv_refusal(torch.device("cpu")) is not None, reason="the decode op does not run here")
OPS = [pytest.param("vnni", marks=VNNI_OP),
       pytest.param("avx2", marks=pytest.mark.skipif(AVX2_OP_REFUSAL is not None,
                                                     reason=f"the AVX2 op cannot run here: {AVX2_OP_REFUSAL}"))]


@pytest.fixture(params=OPS)
def kv_op(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The op that serves the INT8 cache's decode steps (`llmquant.nn.int8_gemv.kv_kernel`): the VNNI op, or the AVX2
    op with VNNI and AMX feigned absent."""
    if request.param == "avx2":
        feign_no_int8_instructions(monkeypatch)
    kernel = int8_gemv.kv_kernel(torch.empty(0))
    assert kernel is not None and kernel is (int8_gemv.gemv_kernel() if request.param == "vnni"
                                             else int8_gemv.avx2_kernel(torch.empty(0)))
    return kernel


ATTENDS = pytest.mark.usefixtures("kv_op")  # each case once per op that runs here (the op attends over the codes)


@pytest.mark.parametrize("op", OPS)
def test_the_decode_ops_kv_codes_and_values_are_torchs(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-token and static per-tensor codes of a decode step's keys and values (some clamped) and the
    dequantization of views of a larger store: the decode op (or the AVX2 op's per-token codes, VNNI and AMX
    feigned absent) gives torch's bits."""
    from llmquant.nn.kv_storage import dequantize_states, quantize_states
    from llmquant.quant.scheme import scheme_from_name

    if op == "avx2":
        feign_no_int8_instructions(monkeypatch)
        assert int8_gemv.avx2_kernel(torch.empty(0)) is not None

    spec, static_spec = scheme_from_name(TOKEN).kv_cache, scheme_from_name(STATIC).kv_cache
    assert spec is not None and static_spec is not None
    static_scale = torch.full((1,), 0.03)
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(2, 2, 3, 1, 64, generator=generator) * 4
    store = torch.randint(-128, 128, (2, 2, 3, 40, 64), dtype=torch.int8, generator=generator)
    scales = torch.rand(2, 2, 3, 40, 1, generator=generator)
    codes, values = store.narrow(-2, 0, 33), scales.narrow(-2, 0, 33)  # (the filled positions of a store)
    found = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LLMQUANT_GEMV", flag)
        found[flag] = (*quantize_states(states, spec, None), dequantize_states(codes, values, torch.float32).clone(),
                       *quantize_states(states, static_spec, static_scale))
    for op, torch_ in zip(found["1"], found["0"], strict=True):
        assert op.dtype == torch_.dtype and torch.equal(op, torch_)
    assert torch.equal(found["1"][2], codes.float() * values)


def test_the_ops_write_a_steps_per_token_codes_into_the_stores_with_torchs_bits(
        kv_op: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """`store_token_codes` writes the per-token codes and scales of keys and values (transposed views, as attention
    modules give them; a row of zeros, a row with a NaN, large values) at their positions of the cache's stores with
    `quantize_states`' bits (torch's: LLMQUANT_GEMV=0), and nothing elsewhere."""
    from llmquant.nn.int8_gemv import store_token_codes
    from llmquant.nn.kv_storage import quantize_states
    from llmquant.quant.scheme import scheme_from_name

    spec = scheme_from_name(TOKEN).kv_cache
    assert spec is not None
    generator = torch.Generator().manual_seed(3)
    keys, values = (torch.randn(2, 2, 3, 64, generator=generator).transpose(1, 2) * 50 for _ in range(2))  # [2,3,2,64]
    keys[0, 1, 0] = 0.0
    values[1, 2, 1, 7] = float("nan")
    codes = torch.full((2, 2, 3, 40, 64), 7, dtype=torch.int8)
    scales = torch.full((2, 2, 3, 40, 1), -1.0)
    store_token_codes(kv_op, [keys, values], codes, scales, 33, int(spec.qmax), int(spec.qmin), spec.clip_ratio)
    monkeypatch.setenv("LLMQUANT_GEMV", "0")
    expected_codes, expected_scales = quantize_states(torch.stack((keys, values)), spec, None)
    assert torch.equal(codes[..., 33:35, :], expected_codes)
    torch.testing.assert_close(scales[..., 33:35, :], expected_scales, rtol=0, atol=0, equal_nan=True)
    assert scales[1, 1, 2, 34, 0].isnan() and scales[0, 0, 1, 33, 0] == MIN_SCALE
    assert (codes[..., :33, :] == 7).all() and (codes[..., 35:, :] == 7).all()
    assert (scales[..., :33, :] == -1).all() and (scales[..., 35:, :] == -1).all()


def test_the_ops_store_refuses_stores_that_do_not_fit(kv_op: ModuleType) -> None:
    from llmquant.nn.int8_gemv import store_token_codes

    states = [torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)]
    codes, scales = torch.zeros(2, 1, 2, 8, 16, dtype=torch.int8), torch.zeros(2, 1, 2, 8, 1)
    with pytest.raises(RuntimeError, match=r"store_token_codes: stores \[p, b, h, capacity >= length \+ n"):
        store_token_codes(kv_op, states, codes, scales, 8, 127, -128)
    with pytest.raises(RuntimeError, match="store_token_codes: int8 codes"):
        store_token_codes(kv_op, states, codes.float(), scales, 0, 127, -128)
    with pytest.raises(RuntimeError, match="store_token_codes: float32 states"):
        store_token_codes(kv_op, [states[0], states[1][..., :8]], codes, scales, 0, 127, -128)


@pytest.mark.parametrize(("kv_cache", "store", "calls_a_step"), [
    ("int8_per_token", "store_token_codes", 1), ("int8_per_tensor", "store_static_codes", 2),
    ("fp8_per_tensor", "store_static_codes", 2)])
def test_decode_steps_store_codes_in_place_where_the_op_runs(
        kv_cache: str, store: str, calls_a_step: int, kv_op: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache layer's decode steps write their codes and scales straight into the stores (counted: keys and values
    together per token, one call each under static scales) while they have room, and append (growing the stores) when
    full: the same codes and scales as the layer without the op, some of the static ones clamped."""
    from llmquant.nn import kv_storage

    monkeypatch.setattr(kv_storage, "GROWTH", 3)
    calls: list[int] = []
    original = getattr(kv_storage, store)
    monkeypatch.setattr(kv_storage, store, lambda *args: (calls.append(1), original(*args)))
    layers = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LLMQUANT_GEMV", flag)
        layer, key, value = decode_ready_layer(True, kv_cache)
        for step in range(8):
            layer.update(key * (step + 1), value - step)
        layers[flag] = layer
    assert len(calls) == 6 * calls_a_step  # (8 steps; the two that found the store full grew it)
    for name in ("keys", "values", "key_scales", "value_scales"):
        found, expected = getattr(layers["1"], name), getattr(layers["0"], name)
        assert found.dtype == expected.dtype and torch.equal(found.view(torch.uint8), expected.view(torch.uint8))
    if kv_cache == "int8_per_tensor":
        assert (layers["1"].keys[..., 6:, :].abs() >= 127).any()  # some clamped codes among the decode steps'


def test_the_ops_static_codes_in_the_stores_are_torchs(kv_op: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """`store_static_codes` under static scales: int8 codes (clamped, ties rounded to even) and E4M3 codes (every
    midpoint between neighbouring E4M3 values, beyond +-448, zeros of both signs, NaN) at their positions of a store,
    the scale at every one of them, nothing elsewhere: `quantize_states`' bits with torch's operations."""
    from llmquant.nn.int8_gemv import store_static_codes
    from llmquant.nn.kv_storage import quantize_states
    from llmquant.quant.scheme import KV_CACHE

    finite = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = finite[~finite.isnan()].unique()
    midpoints = (finite[1:] + finite[:-1]) / 2
    specials = torch.tensor([0.0, -0.0, 500.0, -1e6, float("nan"), 2.5, 3.5, -0.5])
    values = torch.cat([midpoints, finite, specials, torch.randn(2 * 3 * 2 * 64 * 3, generator=torch.Generator()
                                                                 .manual_seed(4)) * 300])
    for name, scale in (("int8_per_tensor", 1.0), ("int8_per_tensor", 0.37), ("fp8_per_tensor", 1.0),
                        ("fp8_per_tensor", 3.1)):
        spec = KV_CACHE[name]
        states = values[: 2 * 3 * 4 * 64].reshape(2, 3, 4, 64)  # [b, h, n, d]: 4 new positions
        if spec.type == "int":
            states = torch.nan_to_num(states)  # (NaN has no int8 code)
        static = torch.full((1,), scale)
        store = torch.full((1, 2, 3, 12, 64), 5, dtype=torch.uint8)  # the codes' bytes
        scales = torch.full((1, 2, 1, 12, 1), -1.0)
        store_static_codes(kv_op, states, store.view(spec.code_dtype), scales, 7, static, spec.qmin, spec.qmax)
        monkeypatch.setenv("LLMQUANT_GEMV", "0")
        expected, expected_scales = quantize_states(states, spec, static)
        monkeypatch.delenv("LLMQUANT_GEMV")
        assert torch.equal(store[0, :, :, 7:11], expected.view(torch.uint8)), (name, scale)
        assert torch.equal(scales[0, :, :, 7:11], expected_scales) and (scales[0, :, :, 7:11] == scale).all()
        assert (store[0, :, :, :7] == 5).all() and (store[0, :, :, 11:] == 5).all()
        assert (scales[0, :, :, :7] == -1).all() and (scales[0, :, :, 11:] == -1).all()


def attention_reference(query, keys, values, key_scales, value_scales, mask, scaling) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v in float64 over the dequantized codes, ``[b, 1, H, dv]``."""
    group = query.shape[1] // keys.shape[1]
    k = (keys.double() * key_scales.double()).repeat_interleave(group, 1)
    v = (values.double() * value_scales.double()).repeat_interleave(group, 1)
    scores = query.double() @ k.transpose(-1, -2) * scaling
    if mask is not None:
        scores = scores + (torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
                           if mask.dtype == torch.bool else mask.double())
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "positions", "dk", "dv", "mask", "per_head_scales"), [
    (1, 9, 3, 513, 64, 64, None, True),  # the default model's shapes; a tail of 1 position
    (2, 8, 2, 37, 80, 48, "bool", True),  # keys and values of other widths (a multiple of 16 and not)
    (3, 4, 4, 5, 7, 9, "float", False),  # fewer positions than a block of 8; per tensor scales; a mask per head
    (1, 2, 1, 1, 64, 64, None, False),  # one position
    (2, 12, 1, 19, 128, 128, "bool", True),  # twelve query heads on one KV head (two blocks of 8)
])
def test_decode_attention_over_int8_codes_is_float_attention_within_float32_roundings(
        batch, heads, kv_heads, positions, dk, dv, mask, per_head_scales, kv_op: ModuleType) -> None:
    """`decode_attention` reads views of larger stores (the cache's layout) and agrees with float64 attention over
    the dequantized codes as closely as torch's sdpa in float32 does (both about 1e-7 of the output's size)."""
    from llmquant.nn.int8_gemv import decode_attention

    generator = torch.Generator().manual_seed(positions)
    query = torch.randn(batch, heads, 1, dk, generator=generator)
    keys = torch.randint(-128, 128, (batch, kv_heads, positions + 7, dk), dtype=torch.int8, generator=generator)
    values = torch.randint(-128, 128, (batch, kv_heads, positions + 7, dv), dtype=torch.int8, generator=generator)
    keys, values = keys[:, :, :positions], values[:, :, :positions]
    scale_heads = kv_heads if per_head_scales else 1
    key_scales = torch.rand(batch, scale_heads, positions + 7, 1, generator=generator)[:, :, :positions] * 0.02
    value_scales = torch.rand(batch, scale_heads, positions + 7, 1, generator=generator)[:, :, :positions] * 0.02
    masks = None
    if mask is not None:
        allowed = torch.rand(batch, 1 if mask == "bool" else heads, 1, positions, generator=generator) > 0.3
        allowed[..., 0] = True
        masks = allowed if mask == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    scaling = dk ** -0.5
    out = decode_attention(kv_op, query, keys, values, key_scales, value_scales, masks, scaling)
    reference = attention_reference(query, keys, values, key_scales, value_scales, masks, scaling)
    assert out.shape == (batch, 1, heads, dv) and out.dtype == torch.float32
    group = heads // kv_heads
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        query, (keys.float() * key_scales).repeat_interleave(group, 1),
        (values.float() * value_scales).repeat_interleave(group, 1), attn_mask=masks, scale=scaling).transpose(1, 2)
    bound = 4 * max((sdpa.double() - reference).abs().max().item(), 1e-7 * reference.abs().max().item())
    assert (out.double() - reference).abs().max().item() <= bound


def counting_attention(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls of the op's attention from the INT8 cache layers."""
    from llmquant.nn import kv_storage

    calls: list[int] = []
    original = kv_storage.decode_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(kv_storage, "decode_attention", counted)
    return calls


@ATTENDS
@pytest.mark.parametrize(("scheme", "pre_opts"), [(TOKEN, None), (STATIC, None), (TOKEN, QUAROT)],
                         ids=["token", "static", "token+quarot"])
def test_decode_steps_attend_over_the_int8_codes_and_give_the_exact_paths_tokens(
        scheme: str, pre_opts: list | None, calib_ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy generation of a left-padded batch (a bool mask at every decode step): after the first decode step
    (which checks that the attention hands its cache's keys and values over untouched), every decode step of every
    layer attends over the codes, with the tokens of the dequantizing path (LLMQUANT_GEMV=0) and its logits within
    float32 roundings."""
    model = quantized(scheme, calib_ids, pre_opts)
    set_runtime(model, "int8")
    prompt = calib_ids[:2, :12]
    padding = torch.ones_like(prompt)
    padding[1, :4] = 0  # the second prompt is 8 tokens long, padded on the left
    calls = counting_attention(monkeypatch)
    read = generate(model, prompt, attention_mask=padding, pad_token_id=0)
    quantizers = [module for module in model.modules() if isinstance(module, KVCacheQuantizer)]
    assert all(q.passes_cache_untouched is True for q in quantizers)
    assert len(calls) == len(quantizers) * (NEW_TOKENS - 2)  # every decode step but the first (the check)
    monkeypatch.setenv("LLMQUANT_GEMV", "0")
    exact = generate(model, prompt, attention_mask=padding, pad_token_id=0)
    assert len(calls) == len(quantizers) * (NEW_TOKENS - 2)
    assert torch.equal(read.sequences, exact.sequences)
    torch.testing.assert_close(step_logits(read), step_logits(exact), rtol=0, atol=1e-5)


def decode_ready_layer(passes_untouched: bool | None, kv_cache: str = "int8_per_token"
                       ) -> tuple[Int8CacheLayer, torch.Tensor, torch.Tensor]:
    """An INT8 (or FP8) cache layer, per token by default (static ones with scales of 0.05 and 0.03), after a prefill
    of 6 positions, and a decode step's new key and value."""
    from llmquant.quant.scheme import KV_CACHE

    quantizer = KVCacheQuantizer(KV_CACHE[kv_cache])
    quantizer.passes_cache_untouched = passes_untouched
    if not quantizer.spec.dynamic:
        quantizer.k_scale.fill_(0.05)
        quantizer.v_scale.fill_(0.03)
    layer = Int8CacheLayer(quantizer)
    generator = torch.Generator().manual_seed(1)
    layer.update(torch.randn(1, 2, 6, 32, generator=generator), torch.randn(1, 2, 6, 32, generator=generator))
    return layer, torch.randn(1, 2, 1, 32, generator=generator), torch.randn(1, 2, 1, 32, generator=generator)


@ATTENDS
def test_an_attention_that_changes_its_keys_keeps_the_dequantized_cache() -> None:
    """The first decode step dequantizes and records whether the attention function got the layer's own tensors;
    where it got others (a model that transforms keys after the cache update), later steps keep dequantizing."""
    layer, key, value = decode_ready_layer(None)
    query = torch.randn(1, 4, 1, 32)
    returned = layer.update(key, value)
    assert torch.equal(returned[0], layer.keys.float() * layer.key_scales)  # dequantized: nothing known yet
    assert layer.attend(query, returned[0] * 1.0, returned[1], None, "sdpa", {}) is None
    assert layer.quantizer.passes_cache_untouched is False
    again = layer.update(key, value)
    assert torch.equal(again[0], layer.keys.float() * layer.key_scales)
    assert layer.attend(query, *again, None, "sdpa", {}) is None and layer.readable(*again) == again


@ATTENDS
@pytest.mark.parametrize(("base", "options", "mask"), [
    ("eager", {}, None), ("sdpa", {"dropout": 0.1}, None), ("sdpa", {"softcap": 30.0}, None),
    ("sdpa", {"position_bias": torch.zeros(1, 4, 1, 7)}, None), ("sdpa", {}, torch.zeros(1, 1, 3, 7))])
def test_calls_sdpa_would_compute_otherwise_get_the_dequantized_cache(base: str, options: dict,
                                                                      mask: torch.Tensor | None) -> None:
    """After a decode step that returned stand-ins, calls the op does not compute as sdpa would (eager attention,
    dropout, soft-capping, a position bias, a mask of several rows) are declined, and `readable` gives the
    dequantized keys and values in their place."""
    layer, key, value = decode_ready_layer(True)
    stand_ins = layer.update(key, value)
    assert stand_ins[0].stride() == (0, 0, 0, 0)  # nothing dequantized
    query = torch.randn(1, 4, 1, 32)
    assert layer.attend(query, *stand_ins, mask, base, options) is None
    keys, values = layer.readable(*stand_ins)
    assert torch.equal(keys, layer.keys.float() * layer.key_scales)
    assert torch.equal(values, layer.values.float() * layer.value_scales)
    output = layer.attend(query, *stand_ins, None, "sdpa", {"scaling": 0.2})  # the plain call: the op
    reference = attention_reference(query, layer.keys, layer.values, layer.key_scales, layer.value_scales, None, 0.2)
    torch.testing.assert_close(output.double(), reference, rtol=0, atol=1e-6)


@ATTENDS
def test_stand_ins_given_back_changed_are_an_error() -> None:
    layer, key, value = decode_ready_layer(True)
    stand_ins = layer.update(key, value)
    with pytest.raises(llmquant.LlmquantError, match="LLMQUANT_GEMV=0"):
        layer.attend(torch.randn(1, 4, 1, 32), stand_ins[0][..., :5, :], stand_ins[1], None, "sdpa", {})


@ATTENDS
@pytest.mark.parametrize(("family", "reads_codes"), [
    ("qwen2", True), ("phi3", True), ("qwen3_moe", True), ("jamba", True),
    ("deepseek_v3", False),  # (MLA: the cache holds compressed latents, which the attention expands into K and V)
])
def test_families_attend_over_the_codes_where_their_attention_hands_the_cache_over_untouched(
        family: str, reads_codes: bool, calib_ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per family (tiny random models): the first decode step's check decides, the op's attention runs at the later
    steps where it passed, and greedy generation gives the dequantizing path's tokens (LLMQUANT_GEMV=0) either way,
    logits within float32 roundings."""
    model = quantized(TOKEN, calib_ids, model=make_model(family))
    set_runtime(model, "int8")
    prompt = calib_ids[:2, :12]
    calls = counting_attention(monkeypatch)
    read = generate(model, prompt, pad_token_id=0)
    flags = {q.passes_cache_untouched for q in model.modules() if isinstance(q, KVCacheQuantizer)}
    assert flags == {reads_codes}
    assert (len(calls) > 0) == reads_codes
    monkeypatch.setenv("LLMQUANT_GEMV", "0")
    exact = generate(model, prompt, pad_token_id=0)
    assert torch.equal(read.sequences, exact.sequences)
    torch.testing.assert_close(step_logits(read), step_logits(exact), rtol=0, atol=1e-5)


def test_decode_attention_reads_every_finite_e4m3_code_exactly(kv_op: ModuleType) -> None:
    """An FP8 (E4M3) cache's codes are read by the op as their exact values: one position of value codes, weight 1,
    gives each of the 254 finite codes (subnormals, zeros of both signs, +-448) as torch converts it."""
    from llmquant.nn.int8_gemv import decode_attention

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    exact = codes.float()
    finite = ~exact.isnan()
    values = codes[finite].reshape(1, 1, 1, -1)
    keys = torch.zeros(1, 1, 1, 16, dtype=torch.float8_e4m3fn)
    unit = torch.ones(1, 1, 1, 1)
    out = decode_attention(kv_op, torch.zeros(1, 1, 1, 16), keys, values, unit, unit, None, 1.0)
    assert torch.equal(out.flatten(), exact[finite])


@VNNI_OP
def test_the_ops_static_fp8_codes_are_torchs() -> None:
    """A static FP8 KV cache's codes made by the op are `quantize`'s bits: clamp(x / s, -448, 448) converted as torch
    converts to float8_e4m3fn, at every midpoint between neighbouring E4M3 values (ties to even), in the subnormal
    range, beyond +-448, for zeros of both signs and NaN, under several scales."""
    from llmquant.nn.int8_gemv import gemv_kernel, static_fp8_codes
    from llmquant.quant import quantize
    from llmquant.quant.scheme import KV_CACHE

    spec = KV_CACHE["fp8_per_tensor"]
    finite = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = finite[~finite.isnan()].unique()  # sorted, -448 .. 448
    midpoints = (finite[1:] + finite[:-1]) / 2  # (exact in float32)
    generator = torch.Generator().manual_seed(0)
    specials = torch.tensor([0.0, -0.0, 500.0, -1e6, float("nan"), 2.0 ** -10, 3 * 2.0 ** -11, 1e-30])
    values = torch.cat([midpoints, finite, specials, torch.randn(4096, generator=generator) * 50,
                        torch.randn(1024, generator=generator) * 0.01])
    rows = values[: values.numel() // 16 * 16].reshape(-1, 16)
    for scale in (1.0, 0.37, 3.1):
        static = torch.full((1, 1), scale)
        codes = static_fp8_codes(gemv_kernel(), rows, static, spec.qmax)
        expected = quantize(rows, static, torch.zeros(1, 1), spec)
        assert codes.dtype == torch.float8_e4m3fn and torch.equal(codes.view(torch.uint8), expected.view(torch.uint8))


@ATTENDS
def test_an_fp8_kv_cache_attends_over_its_codes_too(calib_ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """W8A8 with an FP8 per-tensor KV cache on the int8 runtime: the cache stores E4M3 codes, the decode steps after
    the first attend over them (counted), with the dequantizing path's tokens and logits within float32 roundings."""
    recipe = {"scheme": "w_int8_per_channel_a_int8_per_token_dynamic", "kv_cache": "fp8_per_tensor"}
    model = llmquant.quantize(make_model("llama"), recipe, calib=calib_ids, progress=False)
    set_runtime(model, "int8")
    prompt = calib_ids[:2, :12]
    calls = counting_attention(monkeypatch)
    read = generate(model, prompt)
    layer = returned_cache(read).layers[0]
    assert isinstance(layer, Int8CacheLayer) and layer.keys.dtype == torch.float8_e4m3fn
    assert len(calls) == 2 * (NEW_TOKENS - 2)
    monkeypatch.setenv("LLMQUANT_GEMV", "0")
    exact = generate(model, prompt)
    assert torch.equal(read.sequences, exact.sequences)
    torch.testing.assert_close(step_logits(read), step_logits(exact), rtol=0, atol=1e-5)
