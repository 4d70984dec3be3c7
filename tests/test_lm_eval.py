"""The lm-eval-harness adapter: a local multiple-choice task (built from the pydoc corpus, no download)
through `llmquant eval --tasks` and through lm-eval's own command line, scores equal to a direct
computation from the model's logits (float and quantized models), greedy generation, and the one-line
install hint when lm-eval is missing."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmquant
from llmquant.cli import main
from llmquant.data import pydoc_text

TASK = "pydoc_next_word"
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed (pip install -e .[eval])"
)




@pytest.fixture(scope="module")
def quantized_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = llmquant.load(tiny_dir)
    calib = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    llmquant.quantize(model, "w_int8_per_channel_a_int8_per_token_dynamic", calib=calib, progress=False)
    return llmquant.save(model, tokenizer, tmp_path_factory.mktemp("q") / "w8a8")


def next_word_rows(count: int = 24, seed: int = 0) -> list[dict]:
    """Eight words of the pydoc corpus, then the true next word among three words from elsewhere."""
    words = pydoc_text().split()
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        start = rng.randrange(len(words) - 9)
        choices = [words[start + 8], *(rng.choice(words) for _ in range(3))]
        order = rng.sample(range(4), 4)
        rows.append({"context": " ".join(words[start : start + 8]), "choices": [choices[i] for i in order],
                     "label": order.index(0)})
    return rows


@pytest.fixture(scope="module")
def task_yaml(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """An lm-eval task: dataset_path json over a local .jsonl file (works with HF_DATASETS_OFFLINE=1)."""
    folder = tmp_path_factory.mktemp("task")
    rows = next_word_rows()
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'rows.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder / f"{TASK}.yaml", rows


def direct_loglikelihood(model: torch.nn.Module, tokenizer: object, context: str, continuation: str) -> float:
    """log p(continuation | context) from one forward over the whole text's tokens."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([whole]), use_cache=False).logits[0], dim=-1)
    return sum(float(log_probs[i - 1, whole[i]]) for i in range(len(context_ids), len(whole)))


def instance(request_type: str, arguments: tuple) -> object:
    from lm_eval.api.instance import Instance

    return Instance(request_type=request_type, doc={}, arguments=arguments, idx=0)


@needs_lm_eval
def test_eval_tasks_gives_the_accuracy_computed_from_the_logits(
    tiny_dir: Path, task_yaml: tuple[Path, list[dict]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, rows = task_yaml
    assert main(["eval", "--model", str(tiny_dir), "--tasks", str(path), "--limit", "12", "--json", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    acc = printed["tasks"][TASK]["acc"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    assert printed["ppl"] == {} and printed["seconds"] > 0  # --tasks alone measures no perplexity

    model, tokenizer = llmquant.load(tiny_dir)
    correct = 0
    for row in rows[:12]:  # lm-eval scores " " + choice after the context and picks the most likely
        scores = [direct_loglikelihood(model, tokenizer, row["context"], " " + c) for c in row["choices"]]
        correct += scores.index(max(scores)) == row["label"]
    assert acc == pytest.approx(correct / 12)


@needs_lm_eval
@pytest.mark.parametrize("which", ["float", "quantized"])
def test_loglikelihood_equals_the_direct_computation(tiny_dir: Path, quantized_dir: Path, which: str) -> None:
    from llmquant.evaluation.lm_eval_adapter import LlmquantLM

    adapter = LlmquantLM(pretrained=str(tiny_dir if which == "float" else quantized_dir))
    context, continuation = "The import statement", " is executed in two steps"
    [(logprob, is_greedy)] = adapter.loglikelihood([instance("loglikelihood", (context, continuation))])
    expected = direct_loglikelihood(adapter.model, adapter.tokenizer, context, continuation)
    assert logprob == pytest.approx(expected, abs=1e-4) and logprob < 0
    assert is_greedy is False  # a random tiny model does not predict five words of the manual

    text = "Exceptions can be raised"  # rolling: every token scored once, the first after the prefix token
    [rolling] = adapter.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
    ids = [adapter.prefix_token_id, *adapter.tok_encode(text)]
    with torch.no_grad():
        log_probs = torch.log_softmax(adapter.model(torch.tensor([ids]), use_cache=False).logits[0], dim=-1)
    assert rolling == pytest.approx(sum(float(log_probs[i - 1, ids[i]]) for i in range(1, len(ids))), abs=1e-4)


@needs_lm_eval
def test_generate_until_is_greedy_and_stops_at_the_stop_string(tiny_dir: Path) -> None:
    from llmquant.evaluation.lm_eval_adapter import LlmquantLM

    adapter = LlmquantLM(pretrained=str(tiny_dir))
    context = "def f(x):"
    ids = adapter.tok_encode(context)
    for _ in range(8):  # greedy by hand
        with torch.no_grad():
            ids.append(int(adapter.model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    greedy_text = adapter.tok_decode(ids[-8:])
    request = instance("generate_until", (context, {"until": [], "max_gen_toks": 8}))
    assert adapter.generate_until([request]) == [greedy_text]

    # a stop string: a whole character first seen after the start (a random model emits partial UTF-8 too)
    stop = next(ch for ch in greedy_text if ch != "\ufffd" and greedy_text.index(ch) > 0)
    request = instance("generate_until", (context, {"until": [stop], "max_gen_toks": 8}))
    assert adapter.generate_until([request]) == [greedy_text[: greedy_text.index(stop)]]


@needs_lm_eval
def test_lm_eval_command_line_sees_the_llmquant_model(tiny_dir: Path, task_yaml: tuple[Path, list[dict]]) -> None:
    command = [sys.executable, "-m", "llmquant.evaluation.lm_eval_adapter", "--model", "llmquant",
               "--model_args", f"pretrained={tiny_dir}", "--tasks", str(task_yaml[0]), "--limit", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert any(line.startswith(f"|{TASK}") and "|acc" in line for line in result.stdout.splitlines())


@needs_lm_eval
def test_missing_task_file_is_one_line(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", str(tiny_dir), "--tasks", "/no/such/task.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "llmquant: error: task file /no/such/task.yaml does not exist"


def test_tasks_without_lm_eval_is_one_line_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    monkeypatch.delitem(sys.modules, "llmquant.evaluation.lm_eval_adapter", raising=False)
    assert main(["eval", "--model", "/no/such/model", "--tasks", "arc_easy"]) == 2  # fails before loading
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e .[eval]" in err[0]
