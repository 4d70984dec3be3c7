"""The attention choices (`llmquant.nn.attention_choice`).

Attention in bfloat16 inside a float32 model: close to the float32 function but not equal (one rounding of q, k, v
and p), float32 for one query position (a decode step), undone exactly by "model", composed with the INT8 KV cache of
the int8 runtime (in either order), chosen by `llmquant.load`, ``llmquant eval`` and ``llmquant bench``.

The causal blocks (`llmquant.nn.causal_blocks`), by the C++ op and by one sdpa call per block: sdpa's causal function
to float32's rounding at every length, with grouped heads, batches, a given scale, a query laid out as transformers
passes it, scores far apart; a NaN reaches the rows that see it and no other; without the op (switched off, a failed
build) the sdpa calls, with their limit; transformers' own sdpa, bit for bit, wherever the blocks do not apply; the
default ("auto") where the attention is sdpa, the model's own elsewhere; under the INT8 KV cache, whose decode steps
still read the int8 codes. Bad choices get one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llmquant
from conftest import AVX2_OP_REFUSAL, VOCAB, logits, make_model, relative_error
from llmquant.cli import main
from llmquant.errors import LlmquantError
from llmquant.nn import causal_blocks, int8_gemv
from llmquant.nn.attention_choice import ATTENTIONS, attention_configs, attention_in_use, set_attention
from llmquant.nn.kv_cache import enable_kv_quantization
from llmquant.testing.tiny_checkpoint import write_tiny_checkpoint


def test_bfloat16_attention_is_close_to_float32_and_model_restores_it(eval_ids: torch.Tensor) -> None:
    model = make_model("llama")
    reference = logits(model, eval_ids)
    set_attention(model, "bfloat16")
    assert {c._attn_implementation for c in attention_configs(model)} == {"sdpa+bfloat16"}
    rounded = logits(model, eval_ids)
    assert not torch.equal(rounded, reference)
    assert relative_error(reference, rounded) < 1e-2  # bfloat16 keeps 8 significant bits
    one_position = logits(model, eval_ids[:, :1])  # a decode step's shape: float32 attention
    set_attention(model, "model")
    assert torch.equal(logits(model, eval_ids), reference)
    assert torch.equal(logits(model, eval_ids[:, :1]), one_position)


def test_bfloat16_attention_composes_with_the_int8_kv_cache(calib_ids: torch.Tensor, eval_ids: torch.Tensor,
                                                             tmp_path: Path) -> None:
    scheme = "w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token_dynamic"
    model = llmquant.quantize(make_model("llama"), scheme, calib=calib_ids, progress=False)
    directory = llmquant.save(model, None, tmp_path / "kv8")
    int8, _ = llmquant.load(directory, attention="model")
    rounded, _ = llmquant.load(directory, attention="bfloat16")
    assert {c._attn_implementation for c in attention_configs(rounded)} == {"llmquant_sdpa+bfloat16"}
    assert relative_error(logits(int8, eval_ids), logits(rounded, eval_ids)) < 1e-2
    prompt = eval_ids[:1, :8]
    with torch.no_grad():  # decoding reads the int8 cache through the bfloat16 attention
        tokens = rounded.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert tokens.shape == (1, 12)


def test_kv_quantization_enabled_after_the_switch_keeps_bfloat16_attention(eval_ids: torch.Tensor) -> None:
    model = make_model("llama")
    set_attention(model, "bfloat16")
    rounded = logits(model, eval_ids)
    enable_kv_quantization(model)  # (no quantizer on the attentions: the same function through llmquant's wrapper)
    assert {c._attn_implementation for c in attention_configs(model)} == {"llmquant_sdpa+bfloat16"}
    assert torch.equal(logits(model, eval_ids), rounded)
    set_attention(model, "model")
    assert {c._attn_implementation for c in attention_configs(model)} == {"llmquant_sdpa"}


def test_bad_attention_choices_get_one_clear_error() -> None:
    with pytest.raises(LlmquantError, match="unknown attention 'float8'; allowed: auto, model, blocks, bfloat16"):
        llmquant.load(None, attention="float8")
    model = make_model("llama")
    configs = attention_configs(model)
    configs[0]._attn_implementation = "eager"
    before = [config._attn_implementation for config in configs]
    for choice in ("bfloat16", "blocks"):
        with pytest.raises(LlmquantError, match=f"attention '{choice}' wraps sdpa attention; this model uses 'eager'"):
            set_attention(model, choice)
        assert [config._attn_implementation for config in configs] == before  # nothing half-switched
    assert set_attention(model, "auto") == "model"  # the default takes what it can, without an error
    assert [config._attn_implementation for config in configs] == before


def test_the_command_line_chooses_the_attention(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    float_dir = write_tiny_checkpoint(tmp_path / "float")
    model, tokenizer = llmquant.load(float_dir)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    llmquant.quantize(model, "w_int8_per_channel_a_int8_per_token_dynamic", calib=ids, progress=False)
    w8a8 = llmquant.save(model, tokenizer, tmp_path / "w8a8")
    fast = ["--batch", "1", "--prompt", "16", "--decode", "2", "--repeats", "1", "--json"]
    assert main(["bench", "--model", str(w8a8), "--baseline", str(float_dir), "--attention", "bfloat16", *fast]) == 0
    out = capsys.readouterr().out
    assert "attention bfloat16 (baseline model)" in out
    assert json.loads(out.strip().splitlines()[-1])["attention"] == "bfloat16"
    assert main(["bench", "--model", str(w8a8), "--baseline", str(float_dir), "--baseline-attention", "blocks",
                 *fast]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (figures["attention"], figures["baseline_attention"]) == ("blocks", "blocks")
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(w8a8), "--attention", "half"])
    assert "invalid choice: 'half'" in capsys.readouterr().err


def _sdpa_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
    """sdpa's causal attention, the query rows the last positions of the keys (a cache before them: a mask)."""
    positions, kv_positions = query.shape[2], key.shape[2]
    mask = torch.ones(positions, kv_positions, dtype=torch.bool).tril(kv_positions - positions)
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=None if positions == kv_positions else mask, is_causal=positions == kv_positions,
        scale=scale, enable_gqa=key.shape[1] != query.shape[1]).transpose(1, 2)


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "positions", "earlier", "scale"),
                         [(1, 9, 3, 512, 0, None), (2, 4, 4, 200, 0, 0.3), (1, 2, 1, 64, 0, None),
                          (3, 6, 2, 129, 0, 0.125), (1, 9, 3, 1, 519, None), (2, 6, 2, 1, 128, 0.3),
                          (3, 4, 4, 100, 37, None)])
def test_causal_blocks_compute_sdpas_causal_attention(batch: int, heads: int, kv_heads: int, positions: int,
                                                      earlier: int, scale: float | None) -> None:
    """Causal attention in blocks, the keys and values also holding ``earlier`` positions before the query rows (a
    cache: a decode step of one row, or a chunk of a prefill), as views of larger stores (a cache's capacity)."""
    generator = torch.Generator().manual_seed(positions + earlier)
    query = torch.randn(batch, heads, positions, 64, generator=generator)
    key, value = torch.randn(2, batch, kv_heads, earlier + positions + 7, 64, generator=generator)[
        :, :, :, :earlier + positions]
    exact = _sdpa_causal(query.double(), key.double(), value.double(), scale)
    sdpas_error = (_sdpa_causal(query, key, value, scale) - exact).abs().max()  # float32 sdpa's own rounding
    for way in (causal_blocks.causal_block_attention, causal_blocks.sdpa_blocks):  # (the op where it runs)
        for block in (causal_blocks.BLOCK, 16):
            blocked = way(query, key, value, scale, block)
            assert blocked.shape == exact.shape == (batch, positions, heads, 64), (way, block)
            # the same function, the sums in another order: as far from float64's as float32 sdpa, to 1.5x + 1e-7
            assert (blocked - exact).abs().max() <= 1.5 * sdpas_error + 1e-7, (way, block)
    mask = causal_blocks._visible(16, 48, torch.float32, torch.device("cpu"))  # rows 48..63 over keys 0..63
    seen = torch.ones(16, 64, dtype=torch.bool).tril(48)
    assert torch.equal(mask == 0, seen) and bool((mask[~seen] == float("-inf")).all())


needs_the_op = pytest.mark.skipif(AVX2_OP_REFUSAL is not None, reason=f"the attention op cannot run here: "
                                                                          f"{AVX2_OP_REFUSAL}")


@needs_the_op
def test_the_attention_op_computes_sdpas_causal_attention_from_transformers_layout() -> None:
    """The query as transformers passes it (a transposed view of [batch, positions, heads, dim]), 129 positions (a
    last block of one row), scores far apart (softmax near one-hot: the exponential's underflow to 0)."""
    generator = torch.Generator().manual_seed(7)
    query = torch.randn(2, 129, 6, 64, generator=generator).transpose(1, 2)
    key, value = (torch.randn(2, 2, 129, 64, generator=generator) for _ in range(2))
    assert causal_blocks.attention_op(query) is not None and not query.is_contiguous()
    for scale in (None, 4.0):
        reference = _sdpa_causal(query, key, value, scale)
        computed = causal_blocks.causal_block_attention(query, key, value, scale)
        assert (computed - reference).abs().max() < 2e-6 * reference.abs().max()
    assert causal_blocks.max_positions(query) == causal_blocks.OP_MAX_POSITIONS


@needs_the_op
def test_a_nan_reaches_the_rows_that_see_it_and_no_other() -> None:
    """A NaN in query row 70 makes that row NaN; a NaN in key 100 makes the rows from 100 on NaN (each sees it),
    those before it finite, as sdpa."""
    generator = torch.Generator().manual_seed(8)
    query = torch.randn(1, 2, 200, 64, generator=generator)
    key, value = (torch.randn(1, 1, 200, 64, generator=generator) for _ in range(2))

    def rows_with_nan(attention: object) -> torch.Tensor:  # [positions, heads]
        return attention(query, key, value, None).isnan().any(-1)[0]

    query[0, 1, 70, 5] = float("nan")
    found = rows_with_nan(causal_blocks.causal_block_attention)
    assert found[70, 1] and int(found.sum()) == 1 and torch.equal(found, rows_with_nan(_sdpa_causal))
    query[0, 1, 70, 5] = 0.0
    key[0, 0, 100, 3] = float("nan")
    found = rows_with_nan(causal_blocks.causal_block_attention)
    assert bool(found[100:].all()) and not found[:100].any() and torch.equal(found, rows_with_nan(_sdpa_causal))


def test_without_the_op_the_blocks_are_sdpa_calls_with_their_limit(monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Switched off (``LLMQUANT_GEMV=0``) or failing to build (logged, kept as the reason): one sdpa call per block,
    up to `MAX_POSITIONS`."""
    generator = torch.Generator().manual_seed(9)
    query = torch.randn(1, 4, 160, 32, generator=generator)
    key, value = (torch.randn(1, 2, 160, 32, generator=generator) for _ in range(2))
    by_sdpa = causal_blocks.sdpa_blocks(query, key, value)
    monkeypatch.setenv("LLMQUANT_GEMV", "0")
    assert causal_blocks.attention_op_refusal(query) == "off (LLMQUANT_GEMV=0)"
    assert causal_blocks.max_positions(query) == causal_blocks.MAX_POSITIONS
    assert torch.equal(causal_blocks.causal_block_attention(query, key, value), by_sdpa)
    assert causal_blocks.attention_op_refusal(query.bfloat16()) == "off (LLMQUANT_GEMV=0)"  # (the switch first)
    monkeypatch.setenv("LLMQUANT_GEMV", "1")
    assert causal_blocks.attention_op_refusal(query.double()) == "torch.float64 states (the op takes float32)"

    def failing(**_kwargs: object) -> object:
        raise RuntimeError("Error building extension 'llmquant_causal_attention'")

    from torch.utils import cpp_extension
    monkeypatch.setattr(causal_blocks, "_op", None)
    monkeypatch.setattr(causal_blocks, "_build_error", None)
    monkeypatch.setattr(int8_gemv, "tool_refusal", lambda: None)
    monkeypatch.setattr(int8_gemv, "cpu_features", lambda: type("Features", (), {"avx2": True})())
    monkeypatch.setattr(cpp_extension, "load", failing)
    assert causal_blocks.attention_op(query) is None
    assert causal_blocks.attention_op_refusal(query) == ("building causal_attention.cpp failed (RuntimeError: Error "
                                                         "building extension 'llmquant_causal_attention')")
    assert "one sdpa call per block runs instead" in caplog.text
    assert torch.equal(causal_blocks.causal_block_attention(query, key, value), by_sdpa)
    assert causal_blocks.max_positions(query) == causal_blocks.MAX_POSITIONS


def test_the_blocks_additive_masks_give_the_bits_of_boolean_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """`causal_block_attention` keeps additive masks (0, -inf) made once, where sdpa would turn boolean ones into
    them at every call: the same bits."""
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(2, 6, 200, 64, generator=generator)
    key, value = (torch.randn(2, 2, 200, 64, generator=generator) for _ in range(2))
    additive = causal_blocks.sdpa_blocks(query, key, value)
    monkeypatch.setattr(causal_blocks, "_visible", lambda rows, start, dtype, device: torch.ones(
        rows, start + rows, dtype=torch.bool, device=device).tril(start))
    assert torch.equal(causal_blocks.sdpa_blocks(query, key, value), additive)


def _counted_blocks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The calls of `causal_block_attention` from here on, one entry each."""
    calls: list[int] = []
    blocked = causal_blocks.causal_block_attention
    monkeypatch.setattr(causal_blocks, "causal_block_attention", lambda *a, **k: calls.append(1) or blocked(*a, **k))
    return calls


def test_the_blocked_attention_is_sdpa_itself_where_the_blocks_do_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = _counted_blocks(monkeypatch)
    model = make_model("llama")
    module = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, dim = model.config.num_attention_heads, model.config.num_key_value_heads, module.head_dim

    def states(positions: int, kv_positions: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(2, heads, positions, dim, generator=generator),
                *(torch.randn(2, kv_heads, kv_positions, dim, generator=generator) for _ in range(2)))

    long, limit = causal_blocks.MIN_POSITIONS, causal_blocks.max_positions(torch.empty(0))
    mask = torch.ones(2, 1, long, long, dtype=torch.bool).tril()
    mask[0, ..., :3] = False  # padding
    decode_mask = mask[:, :, -1:]
    cases = {  # name: (q, k, v, mask, options)
        "a mask": (*states(long, long), mask, {}),
        "a decode step with a mask": (*states(1, long), decode_mask, {}),
        "a decode step past the op's limit": (*states(1, causal_blocks.OP_MAX_POSITIONS + 1), None, {}),
        "short": (*states(long - 1, long - 1), None, {}),
        "earlier positions in the cache": (*states(long, long + 5), None, {}),
        "not causal": (*states(long, long), None, {"is_causal": False}),
        "longer than the limit": (*states(limit + 1, limit + 1), None, {}),
    }
    for name, (query, key, value, attention_mask, options) in cases.items():
        blocked, _ = causal_blocks.blocked_sdpa_attention(module, query, key, value, attention_mask, **options)
        stock, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **options)
        assert torch.equal(blocked, stock), name
    assert not calls
    query, key, value = states(long, long)
    blocked, _ = causal_blocks.blocked_sdpa_attention(module, query, key, value, None, scaling=module.scaling)
    stock, _ = sdpa_attention_forward(module, query, key, value, None, scaling=module.scaling)
    assert len(calls) == 1 and (blocked - stock).abs().max() < 2e-6  # this one in blocks
    # a decode step (one query row, the keys of the cache): by the op where it runs, else sdpa itself
    query, key, value = states(1, long + 5)
    blocked, _ = causal_blocks.blocked_sdpa_attention(module, query, key, value, None, scaling=module.scaling)
    stock, _ = sdpa_attention_forward(module, query, key, value, None, scaling=module.scaling)
    op_runs = causal_blocks.attention_op(query) is not None
    assert len(calls) == 1 + op_runs and (blocked - stock).abs().max() < 2e-6
    assert op_runs or torch.equal(blocked, stock)
    monkeypatch.setenv("LLMQUANT_GEMV", "0")  # (switched off: sdpa itself)
    blocked, _ = causal_blocks.blocked_sdpa_attention(module, query, key, value, None, scaling=module.scaling)
    assert len(calls) == 1 + op_runs and torch.equal(blocked, stock)


def test_blocks_are_the_default_for_sdpa_and_keep_the_models_function(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = torch.randint(0, VOCAB, (2, causal_blocks.MIN_POSITIONS + 40), generator=torch.Generator().manual_seed(3))
    model = make_model("llama")
    reference = logits(model, ids)
    assert attention_in_use(model) == "model"
    assert set_attention(model, "auto") == "blocks" == attention_in_use(model)
    assert {c._attn_implementation for c in attention_configs(model)} == {"sdpa+blocks"}
    calls = _counted_blocks(monkeypatch)
    assert relative_error(reference, logits(model, ids)) < 1e-5
    assert len(calls) == model.config.num_hidden_layers
    set_attention(model, "model")
    assert torch.equal(logits(model, ids), reference)


def test_decode_steps_in_blocks_give_the_models_tokens_and_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float KV cache's decode steps (one query row over the cache) run on the op where it runs: the same greedy
    tokens as the model's sdpa, the scores to float32's rounding."""
    model = make_model("llama")
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(6))
    steps = 6

    def generated() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0, output_scores=True,
                                 return_dict_in_generate=True)
        return out.sequences, torch.stack(out.scores)

    tokens, scores = generated()
    set_attention(model, "blocks")
    calls = _counted_blocks(monkeypatch)
    blocked_tokens, blocked_scores = generated()
    assert torch.equal(blocked_tokens, tokens) and relative_error(scores, blocked_scores) < 1e-5
    op_runs = causal_blocks.attention_op(ids.float()) is not None  # (the prompt is too short for the blocks)
    assert len(calls) == (steps - 1) * model.config.num_hidden_layers * op_runs


def test_blocks_under_the_int8_kv_cache_quantize_once_and_decode_from_the_codes(
        calib_ids: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmquant.nn import int8_gemv, kv_storage

    scheme = "w_int8_per_channel_a_int8_per_token_kv_cache_int8_per_token_dynamic"
    model = llmquant.quantize(make_model("llama"), scheme, calib=calib_ids, progress=False)
    directory = llmquant.save(model, None, tmp_path / "kv8")
    plain, _ = llmquant.load(directory, attention="model")
    blocked, _ = llmquant.load(directory)  # auto
    assert {c._attn_implementation for c in attention_configs(blocked)} == {"llmquant_sdpa+blocks"}
    ids = torch.randint(0, VOCAB, (1, causal_blocks.MIN_POSITIONS + 8), generator=torch.Generator().manual_seed(4))
    assert relative_error(logits(plain, ids), logits(blocked, ids)) < 1e-5
    reads: list[str] = []  # the decode steps' attention over the int8 codes, by model
    decode_attention = kv_storage.decode_attention
    monkeypatch.setattr(kv_storage, "decode_attention", lambda *a, **k: reads.append(name) or decode_attention(*a, **k))
    tokens = {}
    with torch.no_grad():
        for name, net in (("plain", plain), ("blocked", blocked)):
            tokens[name] = net.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens["plain"], tokens["blocked"])
    assert reads.count("blocked") == reads.count("plain")
    if int8_gemv.kv_kernel(torch.empty(0)) is not None:  # (where the op is built: both read the codes)
        assert reads.count("blocked") > 0


def test_the_command_lines_choices_are_the_librarys() -> None:
    from llmquant import cli

    assert list(ATTENTIONS) == cli.ATTENTIONS
