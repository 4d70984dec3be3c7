"""LAMBADA last-token accuracy, as Neural Compressor's SmoothQuant tables report it (seed 001).

For each text, the context is everything before the last word and the target is the last word's
tokens (with its leading space); an example counts as correct when greedy decoding of the target
positions (the argmax at each of them, teacher-forced) reproduces every target token.
Texts come from a local ``.jsonl`` file with a ``text`` field, or ``lambada_openai`` through
`datasets` when the hub is reachable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llmquant.device import device_of
from llmquant.errors import LlmquantError


def lambada_texts(source: str, limit: int | None = None) -> list[str]:
    """The texts of a local .jsonl file (``text`` field) or of the hub set ``lambada_openai``."""
    path = Path(source)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise LlmquantError(f"LAMBADA file {path} does not exist")
        try:
            texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise LlmquantError(f"{path}: every line must be a JSON object with a 'text' field ({err})") from None
    elif source == "lambada_openai":
        try:
            import datasets

            texts = list(datasets.load_dataset("EleutherAI/lambada_openai", "default", split="test")["text"])
        except Exception as err:
            raise LlmquantError(
                f"lambada_openai could not be loaded from the hub ({type(err).__name__}); "
                "pass a local .jsonl file with a 'text' field instead"
            ) from None
    else:
        raise LlmquantError(f"unknown LAMBADA source '{source}'; allowed: lambada_openai or a .jsonl file")
    if not texts:
        raise LlmquantError(f"{source} holds no texts")
    return texts[:limit] if limit else texts


def split_last_word(text: str) -> tuple[str, str]:
    """Context and target: the target is the last whitespace-separated word with its leading space."""
    stripped = text.rstrip()
    cut = stripped.rfind(" ")
    if cut <= 0:
        raise LlmquantError(f"a LAMBADA text needs at least two words: {stripped[:60]!r}")
    return stripped[:cut], stripped[cut:]


@torch.no_grad()
def lambada_accuracy(model: nn.Module, tokenizer: Any, texts: list[str], progress: bool = False) -> float:
    """The share of texts whose last word the model predicts exactly (teacher-forced greedy)."""
    model.eval()
    correct = 0
    for text in tqdm(texts, desc="lambada", unit="text", disable=not progress):
        context, target = split_last_word(text)
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context_ids + target_ids], device=device_of(model))
        logits = model(ids, use_cache=False).logits[0].cpu()
        start = len(context_ids) - 1
        predicted = logits[start : start + len(target_ids)].argmax(dim=-1)
        correct += int(predicted.tolist() == target_ids)
    return correct / len(texts)
