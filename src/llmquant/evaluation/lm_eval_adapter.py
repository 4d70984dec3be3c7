"""lm-evaluation-harness adapter: any model `llmquant.load` returns, as lm-eval's model ``llmquant``.

Two ways in (both need ``pip install -e .[eval]``):

- ``llmquant eval --model DIR --tasks arc_easy,hellaswag [--limit N] [--json]`` (`evaluate_tasks`);
  a task may also be a path to a task ``.yaml`` file (custom and offline tasks).
- lm-eval's own command line with this model registered:
  ``python -m llmquant.evaluation.lm_eval_adapter --model llmquant --model_args pretrained=DIR --tasks ...``
  (or ``llmquant-lm-eval ...``, the same). lm-eval 0.4 discovers no plugins, so a bare ``lm_eval --model
  llmquant`` cannot see the registration; these forms import it first and then run lm-eval's CLI as is.
  model_args: ``pretrained`` (what `llmquant.load` takes; none: the default model), ``runtime`` (fake|int8),
  ``max_length``, ``max_gen_toks``, ``device`` and ``dtype`` (as `llmquant.load` takes them). In Python:
  ``import llmquant.evaluation.lm_eval_adapter``, then
  ``lm_eval.simple_evaluate(model="llmquant", model_args={"pretrained": DIR}, tasks=[...])``.

Every request runs alone through ``model(ids, use_cache=False)``, exactly the forward the perplexity
uses: no padding and no KV cache, so dynamic per-tensor activation scales see the same tensor they see
in a plain forward. Generation is greedy. Inputs longer than the model's context keep their last tokens.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llmquant.device import device_of
from llmquant.errors import LlmquantError

try:
    import lm_eval.models  # noqa: F401 - registers lm-eval's own models before ours
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences
except ImportError:
    raise LlmquantError("lm-eval tasks need the lm-eval package: pip install -e .[eval]") from None

MODEL_NAME = "llmquant"
DEFAULT_MAX_GEN_TOKENS = 256
# what lm-eval passes to every model; llmquant runs one request at a time on the CPU, so they change nothing
IGNORED_OPTIONS = {"batch_size", "max_batch_size", "trust_remote_code"}
log = logging.getLogger(__name__)
TokenRequest = tuple[Any, list[int], list[int]]  # (the request's strings, context ids, continuation ids)


@register_model(MODEL_NAME)
class LlmquantLM(TemplateLM):
    """lm-eval's view of an llmquant model: ``pretrained`` is what `llmquant.load` takes (a quantized
    checkpoint, a float directory or hub id, a .gguf file, or None for the default model), or pass an
    already loaded ``model`` and ``tokenizer``. ``runtime`` is `llmquant.load`'s (``fake`` or ``int8``)."""

    def __init__(
        self,
        pretrained: str | None = None,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        runtime: str = "fake",
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKENS,
        device: str | None = None,
        dtype: str | None = None,
        **lm_eval_options: Any,
    ) -> None:
        """``device``/``dtype``: where and in which dtype a model loaded from ``pretrained`` runs (`llmquant.load`:
        auto by default); a model given as ``model`` runs where it is."""
        super().__init__()
        unknown = sorted(set(lm_eval_options) - IGNORED_OPTIONS)
        if unknown:  # a misspelt pretrained= must not silently evaluate the default model
            raise LlmquantError(f"unknown model_args {unknown}; allowed: pretrained, runtime, max_length, "
                                "max_gen_toks, device, dtype")
        if model is None:
            import llmquant

            model, tokenizer = llmquant.load(pretrained, runtime=runtime, device=_usable(device), dtype=dtype)
        if tokenizer is None:
            raise LlmquantError(f"{pretrained or 'the model'} has no tokenizer; lm-eval tasks need one")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length or _context_length(model))
        self.max_gen_toks = int(max_gen_toks)

    # --- what TemplateLM needs ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "llmquant")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"])

    def tok_decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=False))

    # --- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def next_token_log_probs(self, ids: list[int]) -> torch.Tensor:
        """log p(. | ids[:i+1]) for every position i: ``[len(ids), vocab]`` (the last max_length ids)."""
        window = torch.tensor([ids[-self.max_length :]], dtype=torch.long, device=device_of(self.model))
        return torch.log_softmax(self.model(window, use_cache=False).logits[0].float(), dim=-1).cpu()

    def score_continuation(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of log p(continuation | context) and whether greedy decoding would produce it."""
        if not continuation:
            return 0.0, True
        ids = (context + continuation)[-(self.max_length + 1) :][:-1]
        log_probs = self.next_token_log_probs(ids)[-len(continuation) :]
        target = torch.tensor(continuation, dtype=torch.long)
        logprob = float(log_probs.gather(1, target.unsqueeze(1)).sum())
        if not math.isfinite(logprob):
            raise LlmquantError("the model produced NaN or inf logits: the lm-eval scores would be meaningless")
        return logprob, bool((log_probs.argmax(dim=-1) == target).all())

    def _loglikelihood_tokens(
        self, requests: list[TokenRequest], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        results = []
        for strings, context, continuation in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            answer = self.score_continuation(context, continuation)
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
            results.append(answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's full log-likelihood, in disjoint windows of at most max_length tokens."""
        results = []
        for (text,) in tqdm([r.args for r in requests], desc="loglikelihood_rolling", disable=disable_tqdm):
            windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )
            pairs = [(None, *lm_utils.make_disjoint_window(w)) for w in windows]
            total = sum(logprob for logprob, _ in self._loglikelihood_tokens(pairs, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    # --- generation -----------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context until a stop string, the end token or max_gen_toks."""
        results = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="generate_until", disable=disable_tqdm):
            kwargs = dict(gen_kwargs or {})
            until = handle_stop_sequences(kwargs.get("until"), eos=self.tok_decode([self.eot_token_id]))
            text = self.greedy(context, until, int(kwargs.get("max_gen_toks", self.max_gen_toks)))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            results.append(text)
        return results

    @torch.no_grad()
    def greedy(self, context: str, until: list[str], max_new_tokens: int) -> str:
        """The greedy continuation of ``context``, cut before the first stop string of ``until``."""
        ids = self.tok_encode(context) or [self.prefix_token_id]
        generated: list[int] = []
        text = ""
        for _ in range(max_new_tokens):
            token = int(self.next_token_log_probs(ids + generated)[-1].argmax())
            if token == self.eot_token_id:
                break
            generated.append(token)
            text = self.tok_decode(generated)
            if any(stop in text for stop in until):
                break
        return _cut_at_stop(text, until)


def _usable(device: str | None) -> str | None:
    """lm-eval's command line passes ``device=cuda:0`` unless told otherwise, GPU or not: on a machine without
    one that means the CPU (as lm-eval's own models do, said in the log)."""
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("lm-eval asked for device %s, but this machine has no CUDA GPU: the model runs on the CPU", device)
        return "cpu"
    return device


def _cut_at_stop(text: str, until: list[str]) -> str:
    cuts = [text.index(stop) for stop in until if stop and stop in text]
    return text[: min(cuts)] if cuts else text


def _context_length(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


# --- `llmquant eval --tasks` ------------------------------------------------------------------------
def _task_manager_and_configs(names: list[str]) -> tuple[Any, list[Any]]:
    """Task names resolved as lm-eval's CLI does: a name (built-in task or group) or a task .yaml file."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    files = [name for name in names if name.endswith((".yaml", ".yml"))]
    missing = [name for name in files if not Path(name).is_file()]
    if missing:
        raise LlmquantError(f"task file {missing[0]} does not exist")
    manager = TaskManager(include_defaults=len(files) < len(names))  # indexing the built-ins takes ~10 s
    unknown = [name for name in names if name not in files and not manager.match_tasks([name])]
    if unknown:
        raise LlmquantError(f"unknown lm-eval task '{unknown[0]}'; allowed: a task or group that "
                            "`lm_eval ls tasks` lists, or a task .yaml file")
    return manager, [load_yaml(name, resolve_func=True) if name in files else name for name in names]


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` section as {task: {metric: value}}. lm-eval keys a metric ``metric,filter``:
    the filter ``none`` is dropped, another one is kept (``exact_match,strict-match``); entries that are
    not metrics (``alias``, ``sample_len``) and non-numbers (a stderr of ``N/A``) are left out."""
    return {
        task: {
            key.removesuffix(",none"): float(value)
            for key, value in entries.items()
            if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for task, entries in results.items()
    }


def evaluate_tasks(
    model: nn.Module, tokenizer: Any, tasks: list[str], limit: int | None = None
) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` on an already loaded model: {task: {metric: value}}."""
    import lm_eval

    if not tasks:
        raise LlmquantError("--tasks needs at least one task name")
    if limit is not None and limit < 1:
        raise LlmquantError(f"--limit must be >= 1, got {limit}")
    manager, resolved = _task_manager_and_configs(tasks)
    adapter = LlmquantLM(model=model, tokenizer=tokenizer)
    output = lm_eval.simple_evaluate(
        model=adapter, tasks=resolved, task_manager=manager, limit=limit, log_samples=False,
        bootstrap_iters=1000,
    )
    if output is None:  # only on a non-zero rank of a distributed run
        raise LlmquantError("lm-eval returned no results")
    return task_metrics(output["results"])


def main() -> None:
    """lm-eval's command line with the ``llmquant`` model registered (this module was imported)."""
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except LlmquantError as err:
        print(f"llmquant: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
