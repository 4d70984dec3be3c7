"""LAMBADA last-token accuracy: the protocol on an oracle and a wrong model, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmquant.cli import main
from llmquant.data import corpus
from llmquant.errors import LlmquantError
from llmquant.evaluation.lambada import lambada_accuracy, lambada_texts, split_last_word
from llmquant.testing.tiny_checkpoint import tiny_tokenizer, write_tiny_checkpoint


def write_fixture(path: Path, count: int = 300) -> Path:
    """A few hundred LAMBADA-style lines made from the pydoc corpus: sentences of 8 words or more."""
    sentences = [" ".join(s.split()) for s in corpus("pydoc", "eval").split(". ")]
    texts = [s for s in sentences if len(s.split()) >= 8][:count]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


class _Oracle(torch.nn.Module):
    """Predicts, at each position, the token that follows it in the input (or a fixed wrong token)."""

    def __init__(self, vocab: int, wrong: bool = False) -> None:
        super().__init__()
        self.vocab, self.wrong = vocab, wrong

    def forward(self, ids: torch.Tensor, use_cache: bool = False) -> object:
        following = torch.roll(ids, -1, dims=1)
        target = torch.full_like(ids, self.vocab - 1) if self.wrong else following
        return type("Out", (), {"logits": torch.nn.functional.one_hot(target, self.vocab).float()})()


def test_the_protocol_counts_exact_last_word_predictions(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    texts = lambada_texts(str(write_fixture(tmp_path / "lambada.jsonl")))
    assert len(texts) == 300
    assert lambada_accuracy(_Oracle(len(tokenizer)), tokenizer, texts) == 1.0
    assert lambada_accuracy(_Oracle(len(tokenizer), wrong=True), tokenizer, texts) == 0.0


def test_split_and_bad_inputs(tmp_path: Path) -> None:
    assert split_last_word("the cat sat on the mat ") == ("the cat sat on the", " mat")
    with pytest.raises(LlmquantError, match="at least two words"):
        split_last_word("alone")
    with pytest.raises(LlmquantError, match="does not exist"):
        lambada_texts(str(tmp_path / "none.jsonl"))
    with pytest.raises(LlmquantError, match="unknown LAMBADA source 'x'"):
        lambada_texts("x")


def test_eval_lambada_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_tiny_checkpoint(tmp_path / "model")
    fixture = write_fixture(tmp_path / "lambada.jsonl", 50)
    assert main(["eval", "--model", str(model), "--lambada", str(fixture), "--quiet", "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= last["lambada"][str(fixture)] <= 1.0 and last["ppl"] == {}
