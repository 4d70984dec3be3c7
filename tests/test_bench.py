"""`llmquant bench`: prefill/decode throughput and memory of a checkpoint against its float model."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import llmquant
from conftest import load_script, make_model
from llmquant.cli import main
from llmquant.evaluation.bench import disk_bytes, model_bytes, round_ratios, time_generation
from llmquant.nn.int8_gemv import avx2_gemv_refusal, gemv_refusal
from llmquant.nn.int8_linear import int_mm_refusal
from llmquant.nn.kv_cache import KVCacheQuantizer
from llmquant.nn.quant_linear import QuantLinear
from llmquant.quant.scheme import KV_CACHE
from llmquant.testing.tiny_checkpoint import tiny_tokenizer, write_tiny_checkpoint

FAST = ["--batch", "1", "2", "--prompt", "16", "--decode", "2", "--repeats", "1"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny float checkpoint and its W8A8 (per-channel weights, per-token dynamic inputs) quantization."""
    root = tmp_path_factory.mktemp("bench")
    float_dir = write_tiny_checkpoint(root / "float")
    model, tokenizer = llmquant.load(float_dir)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    llmquant.quantize(model, "w_int8_per_channel_a_int8_per_token_dynamic", calib=ids, progress=False)
    return float_dir, llmquant.save(model, tokenizer, root / "w8a8")


def _last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_json_has_every_figure_and_w8a8_is_smaller(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    float_dir, w8a8 = dirs
    assert main(["bench", "--model", str(w8a8), "--baseline", str(float_dir), *FAST, "--json"]) == 0
    found = _last_json(capsys)
    assert found["config"] == {"batches": [1, 2], "prompt": 16, "decode": 2, "repeats": 1, "seed": 0}
    assert found["runtime"] == "int8" and found["threads"] >= 1
    for side in ("quantized", "float32"):
        assert set(found[side]["prefill_tokens_per_s"]) == set(found[side]["decode_tokens_per_s"]) == {"1", "2"}
    ratios = found["ratios"]
    values = [*ratios["prefill"].values(), *ratios["decode"].values(), ratios["memory"], ratios["disk"],
              ratios["memory_with_runtime_cache"]]
    assert all(math.isfinite(v) and v > 0 for v in values)
    # int8 codes instead of float32 weights (embeddings stay float): a real saving, in memory and on disk
    assert found["quantized"]["memory_bytes"] < 0.7 * found["float32"]["memory_bytes"]
    assert found["quantized"]["disk_bytes"] < 0.7 * found["float32"]["disk_bytes"]
    assert ratios["memory"] == pytest.approx(found["quantized"]["memory_bytes"] / found["float32"]["memory_bytes"])
    # one round: its paired ratio is the medians' ratio
    for part in ("prefill", "decode"):
        assert {b: r for b, (r,) in ratios["rounds"][part].items()} == pytest.approx(ratios[part])
    # below 128 rows the int8 runtime multiplies the stored codes (a transposed view): nothing kept besides the state
    # dict (oneDNN's prepacked copy, for longer prompts, is a runtime cache: tests/test_int8_linear.py) but, where the
    # decode op runs (decode steps), each weight's int32 row sums, and on a CPU without VNNI or AMX the codes packed in
    # the AVX2 op's panels of 16 outputs with their float32 scales, or where that op does not run the codes as float32
    linears = [m for m in llmquant.load(w8a8)[0].modules() if isinstance(m, QuantLinear)]
    cpu = torch.device("cpu")
    row_sums = 0 if gemv_refusal(cpu) is not None else 4 * sum(m.out_features for m in linears)
    panels = 0 if avx2_gemv_refusal(cpu) is not None else sum(
        -(-m.out_features // 16) * 16 * (m.in_features + 4) for m in linears)
    float_codes = 0 if int_mm_refusal(cpu) is None or panels else 4 * sum(m.out_features * m.in_features
                                                                          for m in linears)
    assert found["quantized"]["runtime_cache_bytes"] == row_sums + panels + float_codes
    assert found["float32"]["runtime_cache_bytes"] == 0


def test_bench_prints_a_markdown_table(dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    float_dir, w8a8 = dirs
    assert main(["bench", "--model", str(w8a8), "--baseline", str(float_dir), *FAST, "--runtime", "fake"]) == 0
    out, err = capsys.readouterr()
    assert "bench: 100%" in err and "4/4" in err  # the progress: 1 round x 2 batches x 2 models
    assert "| figure | float32 | quantized | quantized / float | rounds |" in out
    assert "| prefill tokens/s, batch 2 |" in out and "| decode tokens/s, batch 1 |" in out
    speed_rows = [line for line in out.splitlines() if "tokens/s" in line]
    assert len(speed_rows) == 4 and all(line.count(" .. ") == 1 for line in speed_rows)  # the rounds' spread
    assert not out.strip().splitlines()[-1].startswith("{")  # no JSON without --json


def test_round_ratios_pair_each_round_float_over_quantized() -> None:
    """Seconds (prefill, decode) per round by batch: each round's float seconds over its quantized seconds."""
    quantized = {1: [(1.0, 2.0), (2.0, 2.0)], 8: [(4.0, 1.0)]}
    reference = {1: [(2.5, 3.0), (4.0, 5.0)], 8: [(8.0, 1.5)]}
    assert round_ratios(quantized, reference) == {"prefill": {"1": [2.5, 2.0], "8": [2.0]},
                                                  "decode": {"1": [1.5, 2.5], "8": [1.5]}}
    with pytest.raises(ValueError):  # a round missing on one side is an error, not a shorter list
        round_ratios({1: [(1.0, 1.0)]}, {1: [(1.0, 1.0), (2.0, 2.0)]})


def test_model_bytes_counts_tied_weights_once() -> None:
    model = make_model("llama")  # tied embeddings and head
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())}
    assert model_bytes(model) == sum(tensors.values())  # the weights and the rotary buffers
    assert model_bytes(model) < sum(p.numel() * 4 for _, p in model.named_parameters(remove_duplicate=False))


def test_disk_bytes_of_a_directory_a_file_and_nothing(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 5)
    assert disk_bytes(tmp_path) == 15 and disk_bytes(tmp_path / "a") == 10 and disk_bytes(None) is None


def test_decode_runs_one_forward_per_new_token() -> None:
    model = make_model("llama")
    calls: list[int] = []

    def count(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1])

    model.register_forward_pre_hook(count, with_kwargs=True)
    prefill, decode = time_generation(model, torch.zeros(2, 8, dtype=torch.long), steps=3)
    assert calls == [8, 1, 1, 1] and prefill > 0 and decode > 0  # prompt once, then one token per step


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--batch", "0"], "--batch must be at least 1, got 0"),
        (["--prompt", "0"], "--prompt must be at least 1, got 0"),
        (["--decode", "0"], "--decode must be at least 1, got 0"),
        (["--repeats", "0"], "--repeats must be at least 1, got 0"),
        (["--prompt", "250", "--decode", "10"], "--prompt 250 + --decode 10 exceeds the model's max_position"),
        (["--runtime", "int4"], "argument --runtime: invalid choice: 'int4'"),
        (["--batch", "x"], "argument --batch: invalid int value: 'x'"),
    ],
)
def test_bad_arguments_are_one_line(
    dirs: tuple[Path, Path], extra: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    float_dir, w8a8 = dirs
    args = ["bench", "--model", str(w8a8), "--baseline", str(float_dir), "--repeats", "1", *extra]
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_missing_model_and_foreign_baseline_are_one_line(
    dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, w8a8 = dirs
    assert main(["bench", "--model", "/nonexistent/ckpt", "--baseline", str(w8a8), *FAST]) == 2
    assert "model path /nonexistent/ckpt does not exist" in capsys.readouterr().err
    other = tmp_path / "other"
    make_model("llama").save_pretrained(other)  # a vocabulary of 128 tokens, not the tiny checkpoint's 320
    tiny_tokenizer().save_pretrained(other)
    assert main(["bench", "--model", str(w8a8), "--baseline", str(other), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the baseline's vocabulary (128 tokens) differs from the model's" in err[0]


def test_speed_table_leaves_out_a_run_cut_off_before_its_figures(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """scripts/speed_table.py renders the finished runs of a bench_speed.sh directory and names, on stderr, a file
    an interrupted run left empty, instead of failing on it."""
    script = load_script("speed_table")
    ratios = {"prefill": {"1": 2.5, "8": 2.0}, "decode": {"1": 1.5, "8": 1.25}, "memory": 0.41,
              "memory_with_runtime_cache": 0.61}
    (tmp_path / "speed_w8a8_token.json").write_text(json.dumps({"threads": 1, "ratios": ratios}))
    (tmp_path / "speed_w4_g64_t2.json").write_text("")
    assert [path for path, _ in script.finished(sorted(tmp_path.glob("speed_*.json")))] == [
        tmp_path / "speed_w8a8_token.json"]
    assert "speed_w4_g64_t2.json: not a finished run's figures" in capsys.readouterr().err
    assert script.row(tmp_path / "speed_w8a8_token.json", {"threads": 1, "ratios": ratios}) == (
        "| w8a8_token | 1 | 2.50 | 2.00 | 1.50 | 1.25 | 0.41 (0.61) |")


def test_the_machine_table_reads_every_file_it_names_and_each_checkpoint_once_per_thread_count() -> None:
    """scripts/machine_table.py (BENCHMARKS.md "Speed by machine", the README's speed table) names its figures file
    by file: each one is in the repository and holds a finished run's ratios, every machine has rows, and none lists
    a checkpoint twice at one thread count."""
    script = load_script("machine_table")
    seen = set()
    for entry in script.ENTRIES:
        assert entry.machine in script.MACHINES
        threads, cells = script.cells(entry)
        assert len(cells) == 6 and all(float(cell) > 0 for cell in cells[:4])
        key = (entry.machine, entry.checkpoint, threads)
        assert key not in seen, key
        seen.add(key)
    assert {machine for machine, _, _ in seen} == set(script.MACHINES)


@pytest.mark.parametrize(("document", "arguments"), [
    ("BENCHMARKS.md", []),
    ("README.md", ["--one-table", "--checkpoints", "W8A8 per token", "W4 g64"]),
])
def test_the_speed_tables_of_the_documents_are_what_the_machine_table_prints(
        document: str, arguments: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    script = load_script("machine_table")
    monkeypatch.setattr("sys.argv", ["machine_table.py", *arguments])
    script.main()
    printed = capsys.readouterr().out.strip()
    assert printed and printed in (Path(__file__).resolve().parents[1] / document).read_text()


def test_lowbit_parts_leaves_one_side_of_the_kv_cache_float_and_puts_it_back() -> None:
    """scripts/lowbit_parts.py's ``kv_keys`` / ``kv_values`` parts: the cache returns those states as given and the
    other side quantized as before; restoring gives the quantizer its own method again."""
    script = load_script("lowbit_parts")
    model = nn.ModuleDict({"cache": KVCacheQuantizer(KV_CACHE["int4_per_token_asym"])})
    key, value = torch.randn(2, 1, 2, 7, 16, generator=torch.Generator().manual_seed(0))
    quantized_key, quantized_value = model["cache"](key, value)
    assert not torch.equal(quantized_key, key) and not torch.equal(quantized_value, value)
    for part, expected in (("kv_keys", (key, quantized_value)), ("kv_values", (quantized_key, value))):
        kept = script.change(model, part)
        assert all(torch.equal(got, wanted) for got, wanted in zip(model["cache"](key, value), expected, strict=True))
        script.restore(model, kept)
        assert "_quantized" not in vars(model["cache"])
        assert all(torch.equal(got, wanted) for got, wanted in zip(model["cache"](key, value),
                                                                   (quantized_key, quantized_value), strict=True))
    with pytest.raises(SystemExit, match="applies to the whole cache"):
        script.change(model, "kv_keys=0.9")


def test_median_seconds_times_the_calls_after_the_warm_ups(monkeypatch: pytest.MonkeyPatch) -> None:
    """`median_seconds` (the scripts' timing loop): ``warmups`` untimed calls, then the median of ``repeats`` timed
    ones."""
    from llmquant.evaluation.bench import median_seconds

    calls: list[int] = []
    assert median_seconds(lambda: calls.append(1), 5, warmups=2) >= 0.0 and len(calls) == 7
    clock = [0.0]  # (a clock each call moves on by its duration: no real time measured)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    slow = iter([0.0, 0.0, 0.03, 0.0, 0.0])  # (one slow call of three timed: the median is a fast one)
    assert median_seconds(lambda: clock.__setitem__(0, clock[0] + next(slow)), 3, warmups=2) < 0.03
