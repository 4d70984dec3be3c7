"""Text corpora, calibration samples and evaluation windows.

``pydoc`` (the offline default) is Python's own reference-manual topics, present in every install:
``"\\n\\n".join(topics[k] for k in sorted(topics))``; calibration is the first half of its characters,
evaluation the second half. ``stdlib`` (a second offline corpus, of code rather than prose) is the source of
22 modules of Python's standard library (`STDLIB_MODULES`, in that order, about 1.3 M characters), split the same
way. Hub sets (``wikitext2``, ``pileval``, ``c4``) load through `datasets` when
the hub is reachable; a local ``.txt`` file (its whole text) or ``.jsonl`` file (its ``text`` fields,
joined by blank lines) serves both splits. A mixture names corpora joined by ``+`` (``pydoc+stdlib``): calibration
draws its windows from the parts in turn, as many from each (`mixed_calibration_samples`), whatever their lengths;
its evaluation text is the parts' joined by a blank line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from llmquant.errors import LlmquantError

Split = Literal["calib", "eval"]
HUB_SETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", {"calib": "train", "eval": "test"}, "text"),
    "pileval": ("mit-han-lab/pile-val-backup", None, {"calib": "validation", "eval": "validation"}, "text"),
    "c4": ("allenai/c4", "en", {"calib": "train", "eval": "validation"}, "text"),
}


STDLIB_MODULES = ("argparse", "dataclasses", "difflib", "enum", "functools", "inspect", "pathlib", "pickle", "random",
                  "shutil", "statistics", "string", "subprocess", "textwrap", "threading", "typing", "json/decoder",
                  "logging/__init__", "collections/__init__", "email/message", "unittest/case", "tarfile")
OFFLINE = ("pydoc", "stdlib")
MIXTURE = "+"


def stdlib_text() -> str:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((root / f"{name}.py").read_text(encoding="utf-8") for name in STDLIB_MODULES)


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _local_text(path: Path) -> str:
    if path.suffix == ".jsonl":
        import json

        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            return "\n\n".join(row["text"] for row in rows)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise LlmquantError(f"{path}: every line must be a JSON object with a 'text' field ({err})") from None
    return path.read_text()


def _hub_text(name: str, split: Split) -> str:
    repo, config, splits, field = HUB_SETS[name]
    try:
        import datasets

        data = datasets.load_dataset(repo, config, split=splits[split])
    except Exception as err:
        raise LlmquantError(
            f"dataset '{name}' could not be loaded from the hub ({type(err).__name__}); "
            "without network use the offline default 'pydoc' or a local .txt/.jsonl file"
        ) from None
    return "\n\n".join(t for t in data[field] if t)


def mixture_parts(name: str) -> list[str]:
    """The corpus names of a mixture ``a+b+...`` (one name for a corpus that is not a mixture, or a file that
    exists whatever its name)."""
    if MIXTURE not in name or Path(name).is_file():
        return [name]
    parts = name.split(MIXTURE)
    if any(not part for part in parts) or len(set(parts)) != len(parts):
        raise LlmquantError(f"corpus mixture '{name}' has an empty or repeated part; allowed: distinct corpora joined "
                            f"by '{MIXTURE}', e.g. pydoc{MIXTURE}stdlib")
    return parts


def corpus_parts(name: str = "pydoc", split: Split = "calib") -> list[str]:
    """The texts of the parts of corpus ``name`` for ``split`` (one text unless ``name`` is a mixture)."""
    return [corpus(part, split) for part in mixture_parts(name)]


def corpus(name: str = "pydoc", split: Split = "calib") -> str:
    """The text of corpus ``name`` (``pydoc``, a hub set, a local file, or a mixture of them: its parts' texts
    joined by a blank line) for ``split``."""
    if split not in ("calib", "eval"):
        raise LlmquantError(f"unknown split '{split}'; allowed: calib, eval")
    if len(parts := mixture_parts(name)) > 1:
        return "\n\n".join(corpus(part, split) for part in parts)
    if name in OFFLINE:
        text = pydoc_text() if name == "pydoc" else stdlib_text()
        half = len(text) // 2
        return text[:half] if split == "calib" else text[half:]
    if name in HUB_SETS:
        return _hub_text(name, split)
    path = Path(name)
    if path.suffix in (".txt", ".jsonl"):
        if not path.is_file():
            raise LlmquantError(f"corpus file {path} does not exist")
        return _local_text(path)
    raise LlmquantError(f"unknown corpus '{name}'; allowed: {', '.join(OFFLINE + tuple(HUB_SETS))}, a .txt/.jsonl "
                        f"file, or corpora joined by '{MIXTURE}'")


def tokenize(tokenizer: object, text: str) -> torch.Tensor:
    """All token ids of ``text`` as one 1-D tensor (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # type: ignore[operator]
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(tokens: torch.Tensor, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` random windows of ``seqlen`` tokens, ``[n_samples, seqlen]``, seeded: the draw of n windows
    starts with the draw of fewer (the calibration windows among scale training's, `Recipe.drawn_samples`)."""
    if n_samples < 1:
        raise LlmquantError(f"the calibration set is empty: calib samples must be >= 1, got {n_samples}")
    if seqlen < 2:
        raise LlmquantError(f"seqlen must be >= 2, got {seqlen}")
    if tokens.numel() < seqlen + 1:
        raise LlmquantError(
            f"the calibration text has {tokens.numel()} tokens, too short for windows of seqlen {seqlen}; "
            "use a longer text or a smaller --seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (n_samples,), generator=generator)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def mixed_calibration_samples(parts: list[torch.Tensor], n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` windows drawn from the token ids of each part in turn: window k is part ``k % len(parts)``'s
    window ``k // len(parts)`` of its own seeded draw (`calibration_samples`), so a mixture gives each part as many
    windows whatever its length, and the draw of n windows still starts with the draw of fewer. One part: exactly
    `calibration_samples`."""
    if n_samples < 1:  # (the error of one corpus)
        return calibration_samples(parts[0], n_samples, seqlen, seed)
    step = len(parts)
    short = [i + 1 for i, tokens in enumerate(parts) if tokens.numel() < seqlen + 1]
    if step > 1 and short:
        raise LlmquantError(f"part {short[0]} of the calibration mixture has {parts[short[0] - 1].numel()} tokens, too "
                            f"short for windows of seqlen {seqlen}; use a longer text or a smaller --seqlen")
    drawn = [calibration_samples(parts[i], len(range(i, n_samples, step)), seqlen, seed)
             for i in range(min(step, n_samples))]  # (a part with no window to give is not drawn)
    return torch.stack([drawn[k % step][k // step] for k in range(n_samples)])


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seqlen`` tokens from the start, ``[n, seqlen]``."""
    n = tokens.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise LlmquantError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return tokens[: n * seqlen].reshape(n, seqlen)


def corpus_windows(tokenizer: object, name: str = "pydoc", seqlen: int = 512,
                   max_windows: int | None = None) -> torch.Tensor:
    """The evaluation windows of corpus ``name`` (DESIGN.md's perplexity protocol): its eval split,
    tokenized, cut by `eval_windows`."""
    return eval_windows(tokenize(tokenizer, corpus(name, "eval")), seqlen, max_windows)

