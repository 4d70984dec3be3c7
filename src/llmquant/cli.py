"""The command line (CONTRACT.md). It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from llmquant.errors import LlmquantError
from llmquant.heap import retain_freed_memory
from llmquant.model.validation import check_model_source

log = logging.getLogger("llmquant")
DEFAULT_WINDOWS = 40
CALIB_HELP = ("calibration corpus: pydoc, stdlib, wikitext2, pileval, c4, a file, or corpora joined by + "
              "(pydoc+stdlib: as many windows from each)")  # (quantize and sweep)
LAUNCHER = "LLMQUANT_LAUNCHER"  # set by `quantize --nproc` for the processes it starts


def _recipe_from_args(args: argparse.Namespace) -> Any:
    from llmquant.api import as_recipe
    from llmquant.recipe import set_fields

    recipe = as_recipe(args.config) if args.config else as_recipe(None)
    fields = recipe.model_dump()
    for flag, key in (("scheme", "scheme"), ("algo", "algorithm"), ("group_size", "group_size"),
                      ("kv_cache", "kv_cache"), ("moe_calibrate", "moe_calibrate"),
                      ("activation_clip", "activation_clip"), ("kv_cache_clip", "kv_cache_clip"),
                      ("activation_clip_grid", "activation_clip_grid"), ("kv_cache_clip_grid", "kv_cache_clip_grid")):
        if getattr(args, flag, None) is not None:  # (sweep has no --moe-calibrate nor clips)
            fields[key] = getattr(args, flag)
    if getattr(args, "ignore", None) is not None:
        fields["ignore"] = args.ignore
    if getattr(args, "layer_map", None) is not None:
        layer_map = _read_layer_map(args.layer_map)
        if layer_map.get("name") == "quarot":  # seed 003's QuaRot map: a quarot pre-optimization as it is
            fields["pre_opts"] = [p for p in fields["pre_opts"] if p["name"] != "quarot"] + [layer_map]
        elif layer_map.get("smooth_groups") is not None:
            fields["smooth_groups"] = layer_map["smooth_groups"]
    if getattr(args, "pre_opt", None):
        alpha = _alpha(args.alpha) if args.alpha is not None else 0.5
        fields["pre_opts"] = [{"name": name} if name == "quarot" else {"name": name, "alpha": alpha}
                              for name in args.pre_opt]
    elif getattr(args, "alpha", None) is not None:
        fields["pre_opts"] = [p if p["name"] == "quarot" else {**p, "alpha": _alpha(args.alpha)}
                              for p in fields["pre_opts"]]
    if getattr(args, "rotations", None) is not None:
        quarot = [p for p in fields["pre_opts"] if p["name"] == "quarot"]
        if not quarot:
            raise LlmquantError("--rotations needs --pre-opt quarot (or a quarot pre_opt in the recipe)")
        quarot[0]["rotations"] = [r.strip().upper() for r in args.rotations.split(",") if r.strip()]
    for flag, key in (("learn_rotations", "learn"), ("learn_online", "learn_online")):
        if getattr(args, flag, None) is not None:
            quarot = [p for p in fields["pre_opts"] if p["name"] == "quarot"]
            if not quarot:
                raise LlmquantError(f"--{flag.replace('_', '-')} needs --pre-opt quarot (or a quarot pre_opt in the "
                                    "recipe)")
            quarot[0][key] = {**(quarot[0].get(key) or {}), "iterations": getattr(args, flag)}
    if getattr(args, "kv_cache_center_keys", False):
        fields["kv_cache_center_keys"] = True
    if getattr(args, "kv_cache_keep_first", None) is not None:
        fields["kv_cache_keep_first"] = args.kv_cache_keep_first
    if getattr(args, "clip_search", False):
        fields["clip_search"] = fields.get("clip_search") or {}
    if getattr(args, "train_blocks", None) is not None:
        fields["block_training"] = {**(fields.get("block_training") or {}), "epochs": args.train_blocks}
    if getattr(args, "train_scales", None) is not None:
        fields["scale_training"] = {**(fields.get("scale_training") or {}), "epochs": args.train_scales}
    if getattr(args, "train_samples", None) is not None:
        if not fields.get("scale_training"):
            raise LlmquantError("--train-samples sets how many windows scale training sees; it needs --train-scales "
                                "(or scale_training in the recipe)")
        fields["scale_training"] = {**fields["scale_training"], "samples": args.train_samples}
    for flag, key in (("calib", "dataset"), ("calib_samples", "samples"), ("seqlen", "seqlen")):
        if getattr(args, flag, None) is not None:
            fields["calib"][key] = getattr(args, flag)
    return as_recipe(set_fields(fields, getattr(args, "set", None) or []))


# printed by detect, not read back
DETECT_ONLY = ("norms", "not_smoothed", "rotation_plan", "left_float_by_default", "moe_layers", "recipe", "plan")


def _read_layer_map(path: str) -> dict[str, Any]:
    """A JSON in the shape `llmquant detect` prints: {"model_map": {...}, "smooth_groups": [...]}."""
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LlmquantError(f"cannot read layer map {path}: {err}") from None
    if isinstance(found, dict) and found.get("name") == "quarot":
        return found  # validated as a quarot pre-optimization by the recipe
    known = {"model_map", "smooth_groups", *DETECT_ONLY}
    unknown = set(found) - known if isinstance(found, dict) else {"<not an object>"}
    if unknown:
        raise LlmquantError(f"layer map {path}: unknown keys {sorted(unknown)}; allowed: {', '.join(sorted(known))} "
                            "or seed 003's quarot map")
    return found


def _alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise LlmquantError(f"--alpha must be a number in [0, 1] or 'auto', got '{text}'") from None


def _float_ppl(model: Any, windows: Any, source: str | None, corpus: str, seqlen: int) -> float:
    """Float perplexity of ``model`` (loaded from ``source``) on ``windows`` of ``corpus``, cached on disk for the
    default model (``source`` None: it never changes)."""
    from llmquant.evaluation.perplexity import perplexity
    from llmquant.model.loading import cache_dir

    key = f"default|{corpus}|{seqlen}|{len(windows)}" if source is None else None
    cache = cache_dir() / "float_ppl.json"
    known = json.loads(cache.read_text()) if (key and cache.exists()) else {}
    if key and key in known:
        return float(known[key])
    ppl = perplexity(model, windows, progress=True)
    if key:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({**known, key: ppl}, indent=2))
    return ppl


def cmd_quantize(args: argparse.Namespace) -> int:

    import llmquant
    from llmquant import data, parallel
    from llmquant.api import calibration_ids, model_source
    from llmquant.device import DevicePolicy
    from llmquant.evaluation.perplexity import perplexity
    from llmquant.export.targets import check_target, check_target_model, smoke_check
    from llmquant.nn.quant_linear import set_runtime
    from llmquant.pipeline.memory import model_for_quantization, parse_size
    from llmquant.pipeline.run_dir import RunDir, fingerprint

    if args.nproc > 1 and not parallel.launched_by_torchrun():
        return _launch(args.nproc, args.argv, args.output, " (--resume continues from the last finished layer)")
    output = Path(args.output)
    _check_output(output, args.overwrite)  # before any work: never delete what llmquant did not write
    recipe = _recipe_from_args(args)
    check_target(args.target, recipe)  # what the serving target cannot run fails before any model work
    cap = parse_size(args.max_memory)
    policy = DevicePolicy.resolve(args.device, args.dtype, args.offload,
                                  parse_size(args.max_gpu_memory, "--max-gpu-memory"))
    ranks = parallel.init(policy.device.type)  # the process group torchrun started, or this process alone
    check_model_source(args.model, needed_for="calibration")  # a bad model file or directory: one line, now
    start = time.perf_counter()
    calib_texts = data.corpus_parts(recipe.calib.dataset, "calib")  # a bad corpus fails before any model work
    # (even where none is drawn: `Recipe.calibration_samples`)
    model, tokenizer, source, files = model_for_quantization(args.model, cap, policy.dtype)
    check_target_model(args.target, model, recipe)  # (a mixture of experts transformers cannot load back, ...)
    ids = calibration_ids(recipe, tokenizer, calib_texts)
    run_dir = RunDir.open(output.with_name(f".{output.name}.run"),
                          fingerprint(model, recipe.model_dump(mode="json"), ids, files), resume=args.resume,
                          ranks=ranks)
    windows = None
    figures: dict[str, Any] = {}
    if args.eval and source is not None:
        log.warning("a model streamed from disk is not evaluated here; run `llmquant eval --model %s`", output)
    elif args.eval and ranks.writes:  # (in several processes, rank 0 evaluates)
        windows = data.corpus_windows(tokenizer, args.eval_corpus, recipe.calib.seqlen, args.max_windows)
        with _on_device(model, policy):
            figures["float_ppl"] = _float_ppl(model, windows, args.model, args.eval_corpus, recipe.calib.seqlen)
    t_quant = time.perf_counter()
    model_map = None
    if args.layer_map is not None and "model_map" in _read_layer_map(args.layer_map):
        from llmquant.model.model_map import ModelMap

        model_map = ModelMap.from_dict(_read_layer_map(args.layer_map)["model_map"])
    llmquant.quantize(model, recipe, tokenizer, calib=ids, model_map=model_map,
                      progress=not args.quiet and ranks.writes,
                      run_dir=run_dir, source=source, activations=args.activations, max_memory=cap,
                      device=policy.device, dtype=policy.dtype, offload=policy.offload,
                      max_gpu_memory=policy.max_gpu_memory)
    figures["quantize_seconds"] = time.perf_counter() - t_quant
    manifest = model.llmquant_manifest
    if windows is not None:
        with _on_device(model, policy):
            set_runtime(model, "int8")  # measured as `llmquant.load(DIR)` runs it: int8 kernels where a layer has them
            figures["quantized_ppl"] = perplexity(model, windows, progress=not args.quiet)
        figures["ppl_ratio"] = figures["quantized_ppl"] / figures["float_ppl"]
        figures["eval"] = {"corpus": args.eval_corpus, "seqlen": recipe.calib.seqlen, "windows": len(windows),
                           "runtime": "int8"}
    manifest.results.update(figures, quantized_from=model_source(args.model))
    if cap is not None:
        manifest.results["max_memory_mb"] = cap / 2**20
        if manifest.results["peak_rss_mb"] > cap / 2**20:  # said, not hidden: the cap is a target, not a limit
            log.warning("peak memory %.0f MiB exceeded --max-memory %.0f MiB (one layer's working set and the "
                        "interpreter come on top of the streamed weights)", manifest.results["peak_rss_mb"],
                        cap / 2**20)
    manifest.seconds["wall"] = time.perf_counter() - start
    if ranks.writes:  # one writer
        llmquant.save(model, tokenizer, output, overwrite=args.overwrite)
        run_dir.remove()
        _print_summary(recipe.scheme, figures, output, manifest.results)
        smoke = smoke_check(args.target, output)  # loaded back as the target would, a few tokens generated
        if smoke is not None:
            print(smoke.line())
    ranks.barrier()  # (the others wait for the checkpoint, so a failed write fails the whole group)
    return 0


def cmd_train_scales(args: argparse.Namespace) -> int:
    """``llmquant train-scales CHECKPOINT --output DIR``: a checkpoint's scales trained end to end (the recipe step
    ``scale_training`` run on a saved checkpoint: `llmquant.api.train_checkpoint_scales`), evaluated, written."""
    import llmquant
    from llmquant import parallel
    from llmquant.api import train_checkpoint_scales
    from llmquant.device import resolve_device
    from llmquant.recipe import set_fields

    if args.nproc > 1 and not parallel.launched_by_torchrun():
        return _launch(args.nproc, args.argv, args.output)
    output = Path(args.output)
    _check_output(output, args.overwrite)
    options = {key: value for key, value in (("epochs", args.epochs), ("samples", args.samples)) if value is not None}
    options = set_fields({"scale_training": options},
                         [f"scale_training.{setting}" for setting in args.set or []])["scale_training"]
    check_model_source(args.model, needed_for="the float model's targets")
    ranks = parallel.init(resolve_device(args.device).type)  # the process group torchrun started, or this one
    start = time.perf_counter()
    model, tokenizer = train_checkpoint_scales(args.checkpoint, args.model, options, args.device,
                                               progress=not args.quiet and ranks.writes, ranks=ranks)
    if not ranks.writes:  # (rank 0 evaluates and writes; the others wait for it)
        ranks.barrier()
        return 0
    manifest = model.llmquant_manifest
    source = manifest.results["quantized_from"]  # (--model, else the checkpoint's own)
    figures, alike = _trained_figures(args, source, model, tokenizer, manifest.recipe["calib"]["seqlen"],
                                      manifest.results)
    if alike:  # (the checkpoint evaluated alike: its figure before training beside the one after)
        manifest.results["scale_training"]["untrained_ppl"] = manifest.results.get("quantized_ppl")
    manifest.results.update(figures)
    manifest.seconds["wall_scale_training"] = time.perf_counter() - start
    llmquant.save(model, tokenizer, output, overwrite=args.overwrite)
    trained = manifest.results["scale_training"]
    if "quantized_ppl" in figures:
        before = trained.get("untrained_ppl")
        _print_ppl_table(figures, "float", [*([(args.checkpoint, before)] if before is not None else []),
                                            ("scales trained", figures["quantized_ppl"])])
    verdict = "kept" if trained["kept"] else "turned back: the held-out loss did not fall"
    print(f"scale training: {trained['steps']} steps on {trained['samples']} windows in {trained['seconds']:.1f} s, "
          f"held-out {trained['loss']} {trained['held_out_loss_before']} -> {trained['held_out_loss_after']} "
          f"({verdict}); checkpoint and llmquant.json in {output}")
    ranks.barrier()
    return 0


def _trained_figures(args: argparse.Namespace, source: str | None, model: Any, tokenizer: Any, seqlen: int,
                     results: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The trained model's perplexity on ``--eval-corpus`` against the float model's (the checkpoint's own float
    figure where it was evaluated alike), and whether it was (its ``results``' figures then compare with these)."""
    if not args.eval:
        return {}, False
    import llmquant
    from llmquant import data
    from llmquant.evaluation.perplexity import perplexity
    from llmquant.nn.quant_linear import set_runtime

    windows = data.corpus_windows(tokenizer, args.eval_corpus, seqlen, args.max_windows)
    setting = {"corpus": args.eval_corpus, "seqlen": seqlen, "windows": len(windows), "runtime": "int8"}
    alike = results.get("eval") == setting
    if alike and results.get("float_ppl") is not None:
        float_ppl = results["float_ppl"]
    else:
        float_model, _ = llmquant.load(source, device=args.device)
        float_ppl = _float_ppl(float_model, windows, source, args.eval_corpus, seqlen)
        del float_model
    set_runtime(model, "int8")  # measured as `llmquant.load(DIR)` runs it
    quantized_ppl = perplexity(model, windows, progress=not args.quiet)
    return {"float_ppl": float_ppl, "quantized_ppl": quantized_ppl, "ppl_ratio": quantized_ppl / float_ppl,
            "eval": setting}, alike


def _launch(nproc: int, argv: list[str], output: str, hint: str = "") -> int:
    """``llmquant quantize --nproc N`` (or ``train-scales``): the same command in N processes started by torchrun
    (one machine), returning the group's exit code. Each process prints its own errors (rank 0 one line for the
    group); a process stopped from outside (a signal, a crash) is said here in one line, without torchrun's report,
    ``hint`` after it."""
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # torchrun's agent: no log lines of its own
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for name in list(logging.root.manager.loggerDict):  # (each of its modules set its logger's level on import)
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)

    rest, skip = [], False
    for arg in argv:  # the command again, without --nproc
        if skip or arg == "--nproc" or arg.startswith("--nproc="):
            skip = arg == "--nproc" and not skip
            continue
        rest.append(arg)
    config = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "llmquant", *rest])
    os.environ[LAUNCHER] = "1"  # (the processes leave a lost process of the group to this one to say)
    try:
        run(config)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode in (2, 130):  # an llmquant error or an interruption: rank 0 said it
            return failure.exitcode
        how = f"signal {-failure.exitcode}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(f"llmquant: error: process {rank} of {nproc} stopped ({how}), and torchrun stopped the others; "
              f"nothing was written to {output}{hint}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SignalException):
        _exit_interrupted()  # (each process was interrupted too; rank 0 said so)
    return 0


def _exit_interrupted() -> NoReturn:
    """Exit 130 at once, skipping the interpreter's teardown: after Ctrl-C the threads of torch.distributed (the
    rendezvous store, the backend's) may still be running, and destroying them at exit printed "terminate called
    without an active exception" under the one line now and then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def _check_output(output: Path, overwrite: bool) -> None:
    """``--output`` and the run directory beside it (``.NAME.run``, which a run starts afresh) may be written:
    one line when either holds what llmquant did not write."""
    from llmquant.export.checkpoint import check_output
    from llmquant.pipeline.run_dir import FINGERPRINT

    if check_output(output, overwrite):
        log.warning("--overwrite: the llmquant checkpoint in %s is replaced when this run ends (files llmquant did "
                    "not write stay)", output)
    run = output.with_name(f".{output.name}.run")
    if run.exists() and (not run.is_dir() or (any(run.iterdir()) and not (run / FINGERPRINT).is_file())):
        raise LlmquantError(f"{run} exists and is not an llmquant run directory (no {FINGERPRINT}); quantize keeps "
                            "its work there and would replace it: move it away or choose another --output")


@contextlib.contextmanager
def _on_device(model: Any, policy: Any) -> Iterator[None]:
    """The model on the policy's device for an evaluation, then back where it rests (the CPU, unless the policy
    keeps the whole model on the device)."""
    from llmquant.device import device_of

    resting = device_of(model)
    model.to(policy.device)
    try:
        yield
    finally:
        if policy.offload != "none":
            model.to(resting)


def _print_ppl_table(figures: dict[str, Any], float_name: str, rows: list[tuple[str, float]]) -> None:
    """The evaluation of ``figures`` as a markdown table: the float model, then each named perplexity and its ratio.
    The quantized model ran its own attention (as it was calibrated), which `llmquant eval` runs only when asked:
    its default, llmquant's causal blocks, is the same function up to float32 rounding, which moved an FP8 KV-cache
    checkpoint's figure by 0.5% and `make run`'s by 0.03% (BENCHMARKS.md, "An FP8 KV cache's perplexity moves with
    float rounding")."""
    e = figures["eval"]
    print(f"perplexity on {e['corpus']} (seqlen {e['seqlen']}, {e['windows']} windows; the model's own attention, "
          "as `llmquant eval --attention model` runs it):")
    print("| model | ppl | ratio |\n|---|---|---|")
    print(f"| {float_name} | {figures['float_ppl']:.3f} | 1.000 |")
    for name, ppl in rows:
        print(f"| {name} | {ppl:.3f} | {ppl / figures['float_ppl']:.4f} |")


def _print_summary(scheme: str, figures: dict[str, Any], output: Path, results: dict[str, Any]) -> None:
    print(f"\nscheme: {scheme}")
    if "quantized_ppl" in figures:
        _print_ppl_table(figures, "float32", [(scheme, figures["quantized_ppl"])])
    print(_untouched_line(results))
    memory = f", peak memory {results['peak_rss_mb']:.0f} MiB" if results.get("peak_rss_mb") else ""
    if results.get("peak_gpu_mb"):
        memory += f", peak GPU memory {results['peak_gpu_mb']:.0f} MiB"
    print(f"quantization took {figures['quantize_seconds']:.1f} s{memory}; checkpoint and llmquant.json in {output}")


def _untouched_line(results: dict[str, Any]) -> str:
    """What the run left as it was, from its manifest: Linears left float, Linears not smoothed, rotations off."""
    parts = [f"left float: {', '.join(results.get('left_float') or []) or 'nothing'}"]
    if results.get("not_quantizable"):
        parts.append(f"not quantizable, float: {', '.join(results['not_quantizable'])}")
    if results.get("not_smoothed"):
        parts.append(f"not smoothed: {', '.join(results['not_smoothed'])} of each layer")
    off = [step["rotation"] for step in results.get("rotation", {}).get("plan", []) if not step["applies"]]
    if off:
        parts.append(f"rotations off: {', '.join(off)}")
    return "; ".join(parts) + " (reasons in llmquant.json)"


def cmd_eval(args: argparse.Namespace) -> int:
    import llmquant
    from llmquant import data
    from llmquant.evaluation.perplexity import perplexity

    start = time.perf_counter()
    retain_freed_memory()
    tasks = _task_names(args.tasks)  # a missing lm-eval fails before the model loads
    check_model_source(args.model, needed_for="evaluation")
    model, tokenizer = llmquant.load(args.model, runtime=args.runtime, device=args.device, dtype=args.dtype,
                                     attention=args.attention)
    if tokenizer is None:
        raise LlmquantError(f"{args.model} has no tokenizer files; evaluation needs one")
    result: dict[str, Any] = {"ppl": {}}
    if tasks:
        from llmquant.evaluation.lm_eval_adapter import evaluate_tasks

        result["tasks"] = evaluate_tasks(model, tokenizer, tasks, args.limit)
        for task, metrics in result["tasks"].items():
            print(f"lm-eval {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.lambada:
        from llmquant.evaluation.lambada import lambada_accuracy, lambada_texts

        texts = lambada_texts(args.lambada, args.lambada_limit)
        accuracy = lambada_accuracy(model, tokenizer, texts, progress=not args.quiet)
        result["lambada"] = {args.lambada: accuracy}
        print(f"lambada {args.lambada}: last-token accuracy {accuracy:.4f} ({len(texts)} texts)")
    for corpus_name in args.ppl if args.ppl is not None else ([] if args.lambada or tasks else ["pydoc"]):
        windows = data.corpus_windows(tokenizer, corpus_name, args.seqlen, args.max_windows)
        result["ppl"][corpus_name] = perplexity(model, windows, progress=not args.quiet)
        print(f"perplexity {corpus_name}: {result['ppl'][corpus_name]:.4f} ({len(windows)} windows of {args.seqlen})")
    result["seconds"] = time.perf_counter() - start
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from llmquant.evaluation.bench import BenchConfig, markdown_table, run_bench

    retain_freed_memory()  # (both models of the comparison run in this process, under the same setting)
    config = BenchConfig(batches=tuple(args.batch), prompt=args.prompt, decode=args.decode, repeats=args.repeats)
    result = run_bench(args.model, args.baseline, args.runtime, config, args.device, args.dtype, args.attention,
                       progress=not args.quiet, baseline_attention=args.baseline_attention)
    print(markdown_table(result))
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from llmquant.sweep import resolve_methods, run_sweep

    methods = resolve_methods(args.methods)
    check_model_source(args.model, needed_for="the sweep")
    try:
        summary = run_sweep(args.model, _recipe_from_args(args), Path(args.output), args.schemes, methods,
                            args.eval_corpus, args.max_windows, progress=not args.quiet, device=args.device,
                            dtype=args.dtype)
    except KeyboardInterrupt:
        print(f"llmquant: interrupted; finished cells are kept in {args.output}: run the same command to "
              "resume", file=sys.stderr)
        return 130
    print(summary.line())
    return 0


def _task_names(text: str | None) -> list[str]:
    """``--tasks a,b``: the names, after checking that lm-eval is installed (one line if not)."""
    if text is None:
        return []
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise LlmquantError("--tasks needs at least one lm-eval task name (comma separated) or task .yaml file")
    import llmquant.evaluation.lm_eval_adapter  # noqa: F401 - raises the install hint when lm-eval is missing

    return names


def cmd_detect(args: argparse.Namespace) -> int:
    import torch

    import llmquant
    from llmquant.algorithms.quarot import QuaRotConfig
    from llmquant.model.model_map import detect_model_map, not_quantizable
    from llmquant.model.moe import unfuse_experts
    from llmquant.model.patterns import describe_norms, split_foldable
    from llmquant.pipeline import capture_layer_inputs, find_smooth_groups
    from llmquant.pipeline.layer_io import never_called, uncalled_linears
    from llmquant.pipeline.rotation import plan_rotations
    from llmquant.recipe import Recipe

    check_model_source(args.model)
    model, _ = llmquant.load(args.model, device="cpu")
    unfuse_experts(model)
    model_map = detect_model_map(model)
    sample = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    groups = find_smooth_groups(model, model_map, capture_layer_inputs(model, model_map, sample))
    rotations = plan_rotations(model, model_map, QuaRotConfig(), sample)
    first = model_map.layers(model)[0]
    kept, unsmoothed = split_foldable(first, groups, list(model_map.linears))
    found = {"model_map": model_map.to_dict(), "norms": describe_norms(first),
             "smooth_groups": [g.to_dict() for g in kept], "not_smoothed": unsmoothed,
             "rotation_plan": rotations.describe(),
             "left_float_by_default": Recipe().resolve(model, model_map).left_float(model_map.decoder_layers)}
    if args.config is not None or args.set:  # what a recipe would do to this model, before any weight is touched
        recipe = _recipe_from_args(args)
        found["recipe"] = recipe.model_dump(mode="json", exclude_defaults=True)
        found["plan"] = recipe.resolve(model, model_map).summary(model_map.decoder_layers)
    unquantizable = not_quantizable(model, model_map.decoder_layers)
    unquantizable.update(never_called(first, model_map, uncalled_linears(
        first, capture_layer_inputs(model, model_map, sample), model_map.layer_name(0),
        [name for name, _ in first.named_modules() if name in model_map.linears])))
    if unquantizable:  # (of the first layer's kind; a layer made otherwise is probed when quantized)
        found["not_quantizable"] = unquantizable
    if model_map.moe:  # which layers hold the MoE blocks of the map (model_map.moe: router, experts, shared, gates)
        found["moe_layers"] = [i for i, layer in enumerate(model_map.layers(model)) if model_map.moe_blocks(layer)]
    print(json.dumps(found, indent=2))
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end in one line on stderr, like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"llmquant: error: {message} (see {self.prog} --help)\n")


ATTENTIONS = ["auto", "model", "blocks", "bfloat16"]  # (`llmquant.nn.attention_choice.ATTENTIONS`, tested)


def _set_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=None, metavar="FIELD=VALUE",
                        help="set one recipe field after the file and the other flags (repeatable): a dotted field, "
                             "a pre_opts entry by name, a YAML value, e.g. --set gptq.asymmetric=0.35 "
                             "--set pre_opts.smoothquant.alpha=0.8")


def _attention_flag(parser: argparse.ArgumentParser, whose: str = "", flag: str = "--attention",
                    default: str = "auto") -> None:
    parser.add_argument(flag, default=default, choices=ATTENTIONS,
                        help=f"how the attention{whose} runs (default {default}): auto (blocks where it is sdpa, else "
                             "model), model (as transformers runs it), blocks (a causal prefill on the CPU in blocks "
                             "of query rows that read only the keys they see: the same function, faster below 768 "
                             "positions) or bfloat16 (a float32 model's attention in bfloat16: faster on the AMX CPU "
                             "it was measured on, and a different function); BENCHMARKS.md")


def _placement_flags(parser: argparse.ArgumentParser, quantize: bool = False) -> None:
    """--device and --dtype (and, for quantize, --offload and --max-gpu-memory): `llmquant.device`."""
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                        help="where the model computes (default auto: the GPU when there is one)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="the model's dtype (default auto: the checkpoint's own; float32 for the default model)")
    if quantize:
        parser.add_argument("--offload", default="layers", choices=["layers", "none"],
                            help="layers (default): the model rests in CPU memory and each decoder layer comes "
                                 "onto the device in turn; none: the whole model stays on the device")
        parser.add_argument("--max-gpu-memory", default=None, metavar="SIZE",
                            help="what the calibration activations may take on the GPU (e.g. 20GB; default: its "
                                 "free memory less 10%%); beyond it they wait in pinned CPU memory; a layer's "
                                 "GPTQ Hessians and sweeps take what is left under it (experts a few at a time)")


def _group_and_evaluation_flags(parser: argparse.ArgumentParser, command: str, share: str) -> None:
    """--nproc (``command`` in N processes, ``share`` saying how they split the work), --no-eval, --eval-corpus,
    --max-windows and --quiet, of the commands that write a checkpoint."""
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help=f"run in N processes started by torchrun ({share}; one GPU each on a GPU machine); the "
                             f"same as torchrun --nproc-per-node N -m llmquant {command}")
    parser.add_argument("--no-eval", dest="eval", action="store_false", help="skip the perplexity comparison")
    parser.add_argument("--eval-corpus", default="pydoc")
    parser.add_argument("--max-windows", type=int, default=DEFAULT_WINDOWS)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from llmquant.export.targets import TARGETS
    from llmquant.pipeline.memory import ACTIVATION_SHARE
    from llmquant.quant.scheme import KV_CACHE, scheme_names

    parser = _Parser(prog="llmquant", description="Post-training quantization of LLMs.")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and write a checkpoint")
    q.add_argument("--model", default=None, help="hub id, local directory or .gguf file (default: SmolLM2-135M)")
    q.add_argument("--scheme", default=None, help=f"a preset: {', '.join(scheme_names())}")
    q.add_argument("--algo", default=None, help="how weights are rounded: rtn (default), awq or gptq")
    q.add_argument("--group-size", type=int, default=None,
                   help="group size of grouped schemes: weights, W4A4 inputs per group, or both (-1: per channel "
                        "or token)")
    q.add_argument("--kv-cache", default=None, help=f"quantize the KV cache: {', '.join(KV_CACHE)}")
    q.add_argument("--pre-opt", action="append", default=None,
                   help="smoothquant | smooth_fc_fc | quarot (repeatable; quarot runs first)")
    q.add_argument("--rotations", default=None, help="QuaRot rotations, comma separated (default R1,R2,R3,R4)")
    q.add_argument("--learn-rotations", type=int, default=None, metavar="STEPS",
                   help="learn R1 and R2 (SpinQuant, Cayley SGD) in STEPS steps on the calibration samples")
    q.add_argument("--learn-online", type=int, default=None, metavar="STEPS",
                   help="learn each layer's online rotations before Linears (R4, R5, R6) in STEPS steps a layer")
    q.add_argument("--train-blocks", type=float, default=None, metavar="EPOCHS",
                   help="train each layer's scales and codes against its float output once quantized (EfficientQAT's "
                        "Block-AP) for EPOCHS passes over its calibration samples, 8 of them held out to keep the "
                        "result only where it helps")
    q.add_argument("--train-scales", type=float, default=None, metavar="EPOCHS",
                   help="then train every weight's scales end to end (EfficientQAT's E2E-QP) for EPOCHS passes over "
                        "the calibration samples (or --train-samples), 8 of them held out to keep the result only "
                        "where it helps")
    q.add_argument("--train-samples", type=int, default=None, metavar="N",
                   help="train the scales on N windows: the calibration samples and more drawn after them the same "
                        "way (default: the calibration samples)")
    q.add_argument("--alpha", default=None, help="smoothing strength in [0, 1], or auto (searched per group)")
    q.add_argument("--clip-search", action="store_true",
                   help="search the clip ratios of dynamic activations and KV cache on 4 held-out calibration samples")
    q.add_argument("--activation-clip", type=float, default=None, metavar="R",
                   help="shrink every input quantizer's range by R in (0, 1] from the start (QuaRot: 0.9 for 4 bits)")
    q.add_argument("--activation-clip-grid", type=float, nargs="+", default=None, metavar="R",
                   help="or choose each dynamic input's clip ratio per token at run time from these (least squared "
                        "error), e.g. 0.9 0.85 0.8 0.75 0.7")
    q.add_argument("--kv-cache-clip", type=float, default=None, metavar="R",
                   help="the same for the KV cache (QuaRot: 0.95 for 4 bits)")
    q.add_argument("--kv-cache-clip-grid", type=float, nargs="+", default=None, metavar="R",
                   help="or choose each token's (per KV head) clip ratio of a dynamic integer KV cache from these when "
                        "it is quantized (least squared error), e.g. 1 0.95 0.9 0.85")
    q.add_argument("--kv-cache-center-keys", action="store_true",
                   help="quantize the keys minus their calibrated mean (a dynamic KV cache; softmax unchanged)")
    q.add_argument("--kv-cache-keep-first", type=int, default=None, metavar="N",
                   help="keep the first N positions of the KV cache float (the attention sink; IntactKV)")
    q.add_argument("--calib", default=None, help=CALIB_HELP)
    q.add_argument("--calib-samples", type=int, default=None,
                   help="calibration samples (default: 32 where the recipe learns from them, none where it does not: "
                        "round to nearest with dynamic activations and KV cache, no rotation); 0: no calibration pass "
                        "and no output-error figures; N for such a recipe: one sample a process measures them")
    q.add_argument("--seqlen", type=int, default=None)
    q.add_argument("--ignore", nargs="*", default=None, help="targets left float (default: lm_head)")
    q.add_argument("--moe-calibrate", default=None, choices=["all", "routed"],
                   help="MoE models: every calibration token through every expert (all, the default) or only through "
                        "the experts the router chose (routed)")
    q.add_argument("--layer-map", default=None, help="JSON as `llmquant detect` prints it, or seed 003's quarot map")
    q.add_argument("--config", default=None, help="recipe file (.json or .yaml); flags override its fields")
    _set_flag(q)
    q.add_argument("--output", required=True,
                   help="directory for the checkpoint: new or empty, or an llmquant checkpoint to replace with "
                        "--overwrite (other files there stay)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace the llmquant checkpoint in --output (only its own files; refused without it)")
    q.add_argument("--target", default=None, choices=TARGETS,
                   help="check that the scheme runs there before calibrating, and load the checkpoint back there "
                        "after writing it: vllm, transformers or fake (llmquant's loader); default: no check")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same model, recipe and calibration from its last layer")
    q.add_argument("--max-memory", default=None,
                   help="stream decoder layers from disk, one in memory at a time (e.g. 2GB); a layer's GPTQ "
                        "Hessians and sweeps take what is left under it (experts a few at a time); skips the "
                        "evaluation")
    _placement_flags(q, quantize=True)
    q.add_argument("--activations", default="auto", choices=["auto", "memory", "disk"],
                   help="where the calibration activations wait between passes: memory (on the GPU while they fit "
                        "under --max-gpu-memory, else pinned CPU memory), or disk (the run directory beside "
                        "--output; one batch in memory at a time); auto (default): memory, or disk under "
                        f"--max-memory when CPU memory would hold them and they take more than "
                        f"{ACTIVATION_SHARE:.0%}% of it")  # %% for argparse
    _group_and_evaluation_flags(q, "quantize", "each calibrates on its share of the samples")
    q.set_defaults(func=cmd_quantize)

    t = sub.add_parser("train-scales", help="train a checkpoint's scales end to end (the recipe step scale_training "
                                            "on a saved checkpoint) and write the result")
    t.add_argument("checkpoint", help="a checkpoint llmquant quantize wrote without scale_training")
    t.add_argument("--model", default=None,
                   help="the float model it was quantized from (default: the one its manifest names, quantized_from, "
                        "else SmolLM2-135M): its tokenizer draws the recipe's windows, its next-token distribution is "
                        "what the kl loss aims at")
    t.add_argument("--epochs", type=float, default=None, help="passes over the training windows (default 1)")
    t.add_argument("--samples", type=int, default=None, metavar="N",
                   help="train on N windows: the recipe's calibration ones and more drawn after them (default: the "
                        "calibration ones)")
    t.add_argument("--set", action="append", default=None, metavar="FIELD=VALUE",
                   help="set one scale_training field (repeatable), e.g. --set lr=0.002 --set holdout=8")
    t.add_argument("--output", required=True,
                   help="directory for the trained checkpoint: new or empty, or an llmquant checkpoint to replace "
                        "with --overwrite")
    t.add_argument("--overwrite", action="store_true", help="replace the llmquant checkpoint in --output")
    t.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                   help="where the model trains (default auto: the GPU when there is one)")
    _group_and_evaluation_flags(t, "train-scales", "each step's samples shared among them")
    t.set_defaults(func=cmd_train_scales)

    e = sub.add_parser("eval", help="evaluate a model or checkpoint")
    e.add_argument("--model", default=None)
    e.add_argument("--ppl", nargs="+", default=None, help="corpora: pydoc, stdlib, wikitext2, pileval, c4 or files")
    e.add_argument("--lambada", default=None, help="LAMBADA last-token accuracy: lambada_openai or a .jsonl file")
    e.add_argument("--lambada-limit", type=int, default=None, help="evaluate the first N texts only")
    e.add_argument("--tasks", default=None,
                   help="lm-eval-harness tasks, comma separated (names or task .yaml files); needs .[eval]")
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N examples of each task only")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--max-windows", type=int, default=DEFAULT_WINDOWS)
    e.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    e.add_argument("--runtime", default="int8", choices=["int8", "fake"],
                   help="int8 (default: int8 GEMMs for W8A8/W4A8 Linears, the CPU int4 kernel in bfloat16 for "
                        "W4, W3 and W2 weight-only ones, int8 KV cache storage) or fake (simulated in float32)")
    e.add_argument("--quiet", action="store_true")
    _attention_flag(e)
    _placement_flags(e)
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sweep", help="quantize with every scheme x pre-optimization method and tabulate perplexity")
    s.add_argument("--model", default=None, help="hub id, local directory or .gguf file (default: SmolLM2-135M)")
    s.add_argument("--schemes", nargs="+", default=None, help="presets (default: the eight W8A8 schemes)")
    s.add_argument("--methods", nargs="+", default=None,
                   help="smooth_0.85, smooth_0.5, smooth_fc_fc_0.5+rotation (the default three), none, "
                        "smooth_auto, rotation+smooth_auto, or a .json/.yaml file mapping method names to pre_opts "
                        "lists")
    s.add_argument("--algo", default=None, help="how weights are rounded: rtn (default), awq or gptq")
    s.add_argument("--group-size", type=int, default=None,
                   help="group size of grouped schemes: weights, W4A4 inputs per group, or both (-1: per channel "
                        "or token)")
    s.add_argument("--calib", default=None, help=CALIB_HELP)
    s.add_argument("--calib-samples", type=int, default=None)
    s.add_argument("--seqlen", type=int, default=None, help="calibration and evaluation window length")
    s.add_argument("--config", default=None, help="base recipe file; its scheme and pre_opts are replaced per cell")
    _set_flag(s)
    s.add_argument("--eval-corpus", default="pydoc")
    s.add_argument("--max-windows", type=int, default=DEFAULT_WINDOWS)
    s.add_argument("--output", metavar="DIR", required=True,
                   help="directory for the table, chart and cells (rerun to resume)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    _placement_flags(s)
    s.set_defaults(func=cmd_sweep)  # (the recipe flags it lacks read as unset: `_recipe_from_args`)

    b = sub.add_parser("bench", help="prefill and decode speed and memory of a model against its float baseline")
    b.add_argument("--model", default=None, help="checkpoint directory, hub id or .gguf (default: SmolLM2-135M)")
    b.add_argument("--baseline", default=None, help="the float model it came from (default: the default model)")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    b.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence")
    b.add_argument("--decode", type=int, default=64, help="greedy decode steps after the prompt")
    b.add_argument("--repeats", type=int, default=5, help="rounds; the median is reported")
    b.add_argument("--runtime", default="int8", choices=["int8", "fake"],
                   help="int8 (int8 GEMMs for W8A8/W4A8 Linears, the CPU int4 kernel in bfloat16 for W4, "
                        "W3 and W2 weight-only ones) or fake (simulated in float32)")
    b.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    _attention_flag(b, " of the model")
    _attention_flag(b, " of the baseline", flag="--baseline-attention", default="model")
    _placement_flags(b)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("detect", help="print what llmquant finds in a model: its layer map, norms, smoothing groups, "
                                      "rotations, and what stays float")
    d.add_argument("--model", default=None)
    d.add_argument("--config", default=None,
                   help="also print this recipe as it would run (with --set) and its plan: each Linear's weights "
                        "and input, once for all decoder layers")
    _set_flag(d)
    d.set_defaults(func=cmd_detect)  # (the recipe flags it lacks read as unset: `_recipe_from_args`)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    speaks = int(os.environ.get("RANK", "0")) == 0  # in several processes, rank 0 speaks for the group
    logging.basicConfig(level=args.log_level if speaks else "ERROR", format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(max(logging.ERROR, logging.getLogger(noisy).level))
    try:
        return args.func(args)
    except LlmquantError as err:
        lost = type(err).__name__ == "LostProcessError"  # said by the --nproc launcher, when there is one
        if speaks and not (lost and os.environ.get(LAUNCHER)):
            print(f"llmquant: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        output = getattr(args, "output", None)
        where = f"; nothing was written to {output} (--resume continues from the last finished layer)" if output else ""
        if speaks:
            print(f"llmquant: interrupted{where}", file=sys.stderr)
        from llmquant import parallel

        if parallel.launched_by_torchrun():  # (one of several processes: their threads as the launcher's)
            _exit_interrupted()
        return 130


if __name__ == "__main__":
    sys.exit(main())
