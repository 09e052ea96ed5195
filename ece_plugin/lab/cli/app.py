"""``ece-plugin``: the command line (thin: parse, call the library, print, write files).

Commands: demo, edit, apply, revert, bench, layer-sweep, batch-study, explain, evaluate, stats,
build-testbed. Every command writes machine-readable results (JSON, CSV for tables, PNG plots) into
``--out DIR`` (default ``runs/<command>-<timestamp>/``); errors print one line to stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, Optional

logger = logging.getLogger("ece_plugin.lab.cli.app")

from ...resources import REPO_ROOT

DEFAULT_HPARAMS_DIR = REPO_ROOT / "hparams"
DEFAULT_DATA = REPO_ROOT / "data" / "counterfact" / "counterfact-edit.json"
DEFAULT_ZSRE = REPO_ROOT / "data" / "zsre" / "zsre_mend_eval.json"
DEMO_METHODS = ("ECE-AS", "ECE-WI", "ECE-RS", "ROME", "MEMIT", "AlphaEdit")
EXIT_USAGE = 2
EXIT_FAILURE = 1


class CLIError(ValueError):
    """A command-line input is wrong (message printed as one line)."""


# ----------------------------------------------------------------------------- helpers
def default_testbed_dir() -> Optional[Path]:
    """The bundled testbed model folder (``testbed/*llama*`` with a config.json), if present."""
    root = REPO_ROOT / "testbed"
    if not root.is_dir():
        return None
    found = sorted(p for p in root.iterdir() if p.is_dir() and "llama" in p.name and (p / "config.json").is_file())
    return found[0] if found else None


def _model_dir(value: Optional[str]) -> Path:
    if value:
        path = Path(value)
    else:
        found = default_testbed_dir()
        if found is None:
            raise CLIError(
                f"no --model given and no bundled testbed under {REPO_ROOT / 'testbed'} "
                "(build one with `ece-plugin build-testbed --output-dir testbed/testbed-llama`)"
            )
        path = found
    if not (path / "config.json").is_file():
        raise CLIError(f"--model: {path} is not a model folder (no config.json)")
    return path


def _hparams_file(explicit: Optional[str], hparams_dir: Path, alg: str, model_dir: Path) -> Path:
    from ..study.baselines import default_baseline_hparams

    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise CLIError(f"--hparams: file not found: {path}")
        return path
    path = default_baseline_hparams(hparams_dir, alg, model_dir)
    if alg == "ECE" and not path.is_file():
        raise CLIError(f"no ECE hparams for {model_dir.name} in {hparams_dir / 'ECE'}; pass --hparams")
    return path


def _load_ece_hparams(
    path: Path, model_dir: Path, overrides: Optional[dict[str, Any]] = None, args: Optional[argparse.Namespace] = None
) -> Any:
    """The ECE hparams; with ``args``, a device the hparams name (``device: cuda``) is where the model is loaded
    unless ``--device`` names one (ECE edits the model where it lies)."""
    from ...easyedit import explicit_device
    from ...method.hparams import ECEHyperParams

    hp = ECEHyperParams.from_hparams(path)
    overrides = {**(overrides or {}), **(_ece_set(args) if args is not None else {})}
    if overrides:
        hp = dataclasses.replace(hp, **overrides)
        hp.validate()
    wanted = explicit_device(hp)
    if args is not None and wanted is not None and getattr(args, "device", None) in (None, "auto"):
        logger.info("loading the model on %s (device of %s)", wanted, path)
        args.device = str(wanted)
    return hp


def _ece_set(args: argparse.Namespace) -> dict[str, Any]:
    """``--ece-set KEY=VALUE`` items (YAML values) as hparams overrides; a key that is not an ECE hyperparameter
    is refused."""
    import yaml

    from ...method.hparams import ECEHyperParams

    known = {f.name for f in dataclasses.fields(ECEHyperParams)}
    overrides: dict[str, Any] = {}
    for item in getattr(args, "ece_set", None) or []:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise CLIError(f"--ece-set {item!r}: expected KEY=VALUE with KEY an ECE hyperparameter")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _ece_label_suffix(args: argparse.Namespace) -> str:
    """What ``--ece-set`` changed, for the ECE methods' names in tables (`` [prompt_keys_weight=1.0]``)."""
    changed = _ece_set(args)
    return " [" + ", ".join(f"{k}={v}" for k, v in changed.items()) + "]" if changed else ""


def _baseline_paths(args: argparse.Namespace, model_dir: Path) -> dict[str, Path]:
    hdir = Path(args.hparams_dir)
    return {alg: _hparams_file(getattr(args, f"{alg.lower()}_hparams", None), hdir, alg, model_dir)
            for alg in ("ROME", "MEMIT", "AlphaEdit")}


def _records(args: argparse.Namespace, default: Path = DEFAULT_DATA) -> list[Any]:
    from ...evaluation.data import load_records

    path = Path(args.data) if getattr(args, "data", None) else default
    records = load_records(path, kind=args.kind, limit=args.limit, offset=args.offset)
    if not records:
        raise CLIError(f"--data: no records in {path} (offset {args.offset}, limit {args.limit})")
    logger.info("loaded %d records from %s", len(records), path)
    return records


def _eval_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if getattr(args, "no_fluency", False):
        kwargs["generation"] = False
    return kwargs


def _load_model(args: argparse.Namespace, model_dir: Path) -> tuple[Any, Any]:
    from ..study.common import load_model_and_tokenizer, set_threads

    set_threads(getattr(args, "threads", None))
    logger.info("loading %s", model_dir)
    return load_model_and_tokenizer(model_dir, device=args.device, dtype=getattr(args, "dtype", None))


def _out(args: argparse.Namespace, command: str) -> Path:
    from ..study.common import make_out_dir

    return make_out_dir(args.out, command)


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}


def _parse_ints(text: str, minimum: int, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(",", " ").split()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from exc
    if not values or any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    """A count or size: an integer >= 1."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    """Counts and sizes: positive integers."""
    return _parse_ints(text, 1, "positive integers")


def _layer_list(text: str) -> list[int]:
    """Layer indices: integers >= 0 (the model check names a layer it does not have)."""
    return _parse_ints(text, 0, "layer indices (integers >= 0)")


# ----------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    from ..study.baselines import build_methods
    from ..study.bench import compare_methods, write_comparisons

    model_dir = _model_dir(args.model)
    ece_path = _hparams_file(args.hparams, Path(args.hparams_dir), "ECE", model_dir)
    ece_hp = _load_ece_hparams(ece_path, model_dir, args=args)
    records = _records(args)
    out = _out(args, "demo")
    model, tok = _load_model(args, model_dir)
    methods = build_methods(args.methods, ece_hp, _baseline_paths(args, model_dir),
                            ece_label_suffix=_ece_label_suffix(args))
    comparison = compare_methods(
        methods, model, tok, records, batch_size=args.batch_size, protocol=args.protocol, eval_kwargs=_eval_kwargs(args),
        record_limits={"ROME": args.rome_limit} if args.rome_limit else None,
    )
    files = write_comparisons([comparison], out, "demo", _config(args))
    if args.explain:
        _write_run_explanations(comparison.runs, out)
    _print(comparison.table)
    _print(f"\nresults: {files['json']}  table: {files['md']}  csv: {files['csv']}  plot: {files['png0']}")
    return 0


def _write_run_explanations(runs: Sequence[Any], out: Path) -> None:
    from ..explain import explanation_from_trace, write_explanation

    for run in runs:
        for i, trace in enumerate(run.traces):
            stem = f"explain-{run.name}-batch{i}".replace(" ", "_").replace("(", "").replace(")", "")
            write_explanation(explanation_from_trace(trace), out, stem=stem)


def cmd_edit(args: argparse.Namespace) -> int:
    from ... import evaluation
    from ...files.editfile import build_edit_file, save_edit_file, state_to_tensors
    from ...files.modeldir import check_target
    from ..study.baselines import ECEMethod
    from ..study.common import snapshot_weights, write_json
    from ..study.runner import MethodRun, _edit_fn

    if not args.save_model and not args.save_edits:
        raise CLIError("give --save-model OUT or --save-edits FILE.safetensors")
    model_dir = _model_dir(args.model)
    if args.save_model:
        check_target(args.save_model, force=args.force)
    hp = _load_ece_hparams(Path(args.hparams), model_dir, args=args)
    records = _records(args)
    out = _out(args, "edit")
    model, tok = _load_model(args, model_dir)
    method = ECEMethod(hp, name=f"ECE-{hp.attribution}")
    original = snapshot_weights(model, method.edited_weight_names(model))
    method.reset(model)
    method.prepare(model, tok)
    run = MethodRun(name=method.name, available=True)
    edit_fn = _edit_fn(method, run)
    if args.no_eval:
        from tqdm.auto import tqdm

        batches = [records[i : i + args.batch_size] for i in range(0, len(records), args.batch_size)]
        for batch in tqdm(batches, desc=f"{method.name} editing", unit="batch"):
            edit_fn(model, tok, batch)
    else:
        run.result = evaluation.run_protocol(
            model, tok, records, edit_fn, method=method.name, batch_size=args.batch_size,
            protocol=args.protocol, pre=True, eval_kwargs=_eval_kwargs(args),
        )
        _print(evaluation.format_table([run.result]))
        evaluation.write_csv(out / "edit.csv", [run.result])
    write_json(out / "edit.json", {"config": _config(args), "run": run.to_dict()})
    if args.explain:
        _write_run_explanations([run], out)
    if args.save_edits:
        edit = build_edit_file(
            model, original, state=state_to_tensors(method.sequential_state(model), model),
            hparams=hp.to_dict(), records=[r.to_dict() for r in records],
            extra={"model_dir": str(model_dir), "batch_size": args.batch_size},
        )
        path = save_edit_file(edit, args.save_edits)
        n = sum(w.n_changed for w in edit.weights.values())
        _print(f"edit file: {path} ({len(edit.weights)} weight(s), {n} neuron slice(s) changed)")
    if args.save_model:
        _save_model(model, tok, Path(args.save_model), force=args.force)
        _print(f"edited model: {args.save_model}")
    _print(f"results in {out}")
    return 0


def _save_model(model: Any, tok: Any, path: Path, force: bool = False) -> None:
    """save_pretrained + tokenizer into ``path``: written beside it, swapped in, the old folder removed last
    (modeldir.py)."""
    from ...files.modeldir import save_model_folder

    save_model_folder(model, tok, path, force=force)


def _apply_or_revert(args: argparse.Namespace, forward: bool) -> int:
    from ...files.editfile import apply_edit_file, load_edit_file, revert_edit_file
    from ...files.modeldir import check_target

    model_dir = _model_dir(args.model)
    check_target(args.out, force=args.force)
    edit = load_edit_file(args.edits)
    args.device = args.device or "cpu"
    model, tok = _load_model(args, model_dir)
    written = (apply_edit_file if forward else revert_edit_file)(model, edit, force=args.force)
    _save_model(model, tok, Path(args.out), force=args.force)
    verb = "applied" if forward else "reverted"
    _print(f"{verb} {args.edits} on {len(written)} weight(s); model written to {args.out}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    return _apply_or_revert(args, forward=True)


def cmd_revert(args: argparse.Namespace) -> int:
    return _apply_or_revert(args, forward=False)


def cmd_bench(args: argparse.Namespace) -> int:
    from ..study.baselines import build_methods
    from ..study.bench import (
        DEFAULT_REPEATS,
        DEFAULT_WARMUP,
        compare_methods,
        run_timing,
        write_comparisons,
        write_timing,
    )

    model_dir = _model_dir(args.model)
    ece_path = _hparams_file(args.hparams, Path(args.hparams_dir), "ECE", model_dir)
    ece_hp = _load_ece_hparams(ece_path, model_dir, args=args)
    baselines = _baseline_paths(args, model_dir)
    n_list = args.n_edits or [args.limit or 100]
    args.limit = max(n_list)
    records = _records(args)
    if len(records) < max(n_list):
        raise CLIError(f"--n-edits {max(n_list)} needs that many records; {len(records)} loaded")
    out = _out(args, "bench")
    model, tok = _load_model(args, model_dir)
    if args.timing:
        batch = (args.batch_sizes or [100])[0]
        report, runs = run_timing(
            model, tok, records[: max(n_list)], ece_hp, baselines, batch_size=batch,
            eval_kwargs=_eval_kwargs(args), trace_python_memory=args.tracemalloc,
            warmup=DEFAULT_WARMUP if args.warmup is None else args.warmup,
            repeats=DEFAULT_REPEATS if args.repeats is None else args.repeats,
        )
        files = write_timing(report, runs, out, _config(args))
        _print(report.table)
        _print(f"\nresults: {files['json']}  csv: {files['csv']}  plot: {files['png']}")
        return 0
    methods = build_methods(args.methods, ece_hp, baselines, ece_label_suffix=_ece_label_suffix(args))
    comparisons = []
    for n in n_list:
        for b in args.batch_sizes or [min(100, n)]:
            comparison = compare_methods(
                methods, model, tok, records[:n], batch_size=b, protocol=args.protocol, eval_kwargs=_eval_kwargs(args)
            )
            _print(comparison.table + "\n")
            comparisons.append(comparison)
    files = write_comparisons(comparisons, out, "bench", _config(args))
    _print(f"results: {files['json']}  csv: {files['csv']}  tables: {files['md']}")
    return 0


def cmd_layer_sweep(args: argparse.Namespace) -> int:
    from ..study.layer_sweep import run_layer_sweep, write_layer_sweep

    model_dir = _model_dir(args.model)
    ece_path = _hparams_file(args.hparams, Path(args.hparams_dir), "ECE", model_dir)
    ece_hp = _load_ece_hparams(ece_path, model_dir, args=args)
    records = _records(args)
    out = _out(args, "layer-sweep")
    model, tok = _load_model(args, model_dir)
    sweep = run_layer_sweep(
        model, tok, records, ece_hp, _baseline_paths(args, model_dir), methods=args.methods,
        layers=args.layers, eval_kwargs=_eval_kwargs(args),
    )
    files = write_layer_sweep(sweep, out, _config(args))
    _print(sweep.format())
    _print(f"\nresults: {files['json']}  csv: {files['csv']}  plot: {files['png']}")
    return 0


def cmd_batch_study(args: argparse.Namespace) -> int:
    from ..study.batch_study import run_batch_study, write_batch_study

    model_dir = _model_dir(args.model)
    ece_path = _hparams_file(args.hparams, Path(args.hparams_dir), "ECE", model_dir)
    ece_hp = _load_ece_hparams(ece_path, model_dir, args=args)
    total = args.total or max(args.batch_sizes)
    args.limit = max(total, max(args.batch_sizes))
    records = _records(args)
    out = _out(args, "batch-study")
    model, tok = _load_model(args, model_dir)
    study = run_batch_study(
        model, tok, records, ece_hp, _baseline_paths(args, model_dir), methods=args.methods,
        batch_sizes=args.batch_sizes, total_edits=total, settings=args.settings, protocol=args.protocol,
        eval_kwargs=_eval_kwargs(args),
    )
    files = write_batch_study(study, out, _config(args))
    _print(study.format())
    _print(f"\nresults: {files['json']}  csv: {files['csv']}  plot: {files['png']}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from ..explain import explain_records, write_explanation

    model_dir = _model_dir(args.model)
    hp = _load_ece_hparams(Path(args.hparams), model_dir, args=args)
    records = _records(args)
    out = _out(args, "explain")
    model, tok = _load_model(args, model_dir)
    explanation = explain_records(model, tok, [r.to_request() for r in records], hp)
    files = write_explanation(explanation, out)
    data = explanation.to_dict()
    for layer in data["layers"]:
        _print(
            f"layer {layer['layer']}: {data['n_edits']} edits, mean set size {layer['set_size']['mean']:.1f} neurons, "
            f"union {layer['batch_neuron_count']}, mean pairwise Jaccard "
            f"{layer['mean_pairwise_jaccard'] if layer['mean_pairwise_jaccard'] is not None else float('nan'):.3f}"
        )
    if data.get("clusters"):
        _print(f"{len(data['clusters'])} cluster(s); anchors: {[c['anchor_edit'] for c in data['clusters']]}")
    _print(f"report: {files['json']}  heatmap: {files['png']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ... import evaluation
    from ...evaluation.data import load_records
    from ..study.common import write_json

    model_dir = _model_dir(args.model)
    paths = [Path(p) for p in (args.data or [str(DEFAULT_DATA), str(DEFAULT_ZSRE)])]
    out = _out(args, "evaluate")
    model, tok = _load_model(args, model_dir)
    results = []
    for path in paths:
        records = load_records(path, kind=args.kind, limit=args.limit, offset=args.offset)
        if not records:
            raise CLIError(f"--data: no records in {path}")
        cases = evaluation.evaluate_records(model, tok, records, progress=True, **_eval_kwargs(args))
        kind = evaluation.metric_kind(records)
        summary = evaluation.summarize(cases, kind=kind)
        result = evaluation.RunResult(
            method=model_dir.name, protocol="pre-edit", kind=kind, n_edits=len(records), batch_size=0,
            pre_cases=cases, pre_summary=summary, meta={"data": str(path)},
        )
        table = evaluation.format_table(
            [result], title=f"{path.name}: pre-edit evaluation of {model_dir.name} on {len(records)} records; "
            "metrics in %, mean ± standard error",
        )
        # Only the pre-edit row is meaningful here.
        table = "\n".join(line for line in table.splitlines() if not line.startswith(f"| {model_dir.name} "))
        _print(table + "\n")
        stem = f"pre-edit-{path.stem}"
        write_json(out / f"{stem}.json", {"config": _config(args), "data": str(path), "summary": summary, "cases": cases})
        evaluation.write_csv(out / f"{stem}.csv", [result])
        results.append(result)
    _print(f"results in {out}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from ..study.baselines import ensure_statistics
    from ..study.common import write_json

    model_dir = _model_dir(args.model)
    hp = _load_ece_hparams(_hparams_file(args.hparams, Path(args.hparams_dir), "ECE", model_dir), model_dir, args=args)
    if args.layers:
        hp = dataclasses.replace(hp, layers=sorted(set(args.layers)))
    out = _out(args, "stats")
    model, tok = _load_model(args, model_dir)
    computed = ensure_statistics(model, tok, hp)
    write_json(out / "stats.json", {"config": _config(args), "computed": computed, "stats_dir": hp.stats_dir})
    _print(f"statistics for layers {hp.layers} in {hp.stats_dir} (computed now: {computed or 'none, all cached'})")
    return 0


def _manifest_wiki(model_dir: Path) -> Optional[set[str]]:
    """Names of the WikiText files a testbed model was trained on (None: not a testbed, unknown)."""
    manifest = model_dir / "testbed_manifest.json"
    if not manifest.is_file():
        return None
    try:
        paths = json.loads(manifest.read_text(encoding="utf-8"))["config"]["wiki_paths"]
    except (ValueError, KeyError, TypeError):
        return None
    return {Path(p).name for p in paths}


def _ppl_texts(args: argparse.Namespace, model_dir: Path) -> dict[str, str]:
    """Texts for perplexity: ``--ppl-text`` files, else the bundled WikiText-2 file the model did not train on."""
    from ...evaluation.general import read_text

    trained = _manifest_wiki(model_dir)
    if args.ppl_text:
        paths = [Path(p) for p in args.ppl_text]
    else:
        wiki = REPO_ROOT / "data" / "wikitext-2-raw"
        held_out = [p for p in (wiki / "wiki.test.raw", wiki / "wiki.valid.raw") if trained is None or p.name not in trained]
        paths = held_out[:1] or [wiki / "wiki.test.raw"]
    texts: dict[str, str] = {}
    for path in paths:
        name = path.stem
        if trained is not None and path.name in trained:
            logger.warning("%s was in %s's training text: its perplexity is not held-out", path, model_dir.name)
            name += " (trained on)"
        texts[name] = read_text(path)
    return texts


def cmd_lifelong(args: argparse.Namespace) -> int:
    from ...evaluation.data import load_records
    from ..study.baselines import build_methods
    from ..study.common import write_json
    from ..study.lifelong import (
        CONFIG_FILE,
        LifelongConfig,
        Probes,
        discard_checkpoints,
        final_table,
        run_lifelong,
    )

    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / CONFIG_FILE
        if not saved.is_file():
            raise CLIError(f"--resume: {run_dir} holds no {CONFIG_FILE} (not a lifelong run folder)")
        stored = json.loads(saved.read_text(encoding="utf-8"))
        log_level = args.log_level
        args = argparse.Namespace(**stored)
        args.resume, args.out, args.log_level = str(run_dir), str(run_dir), log_level
        logger.info("resuming %s with its saved options", run_dir)
    config = LifelongConfig(
        n_edits=args.n_edits, batch_size=args.batch_size, checkpoint_every=args.checkpoint_every or args.n_edits,
        seed=args.seed, n_fluency_prompts=args.n_fluency_prompts, ppl_max_tokens=args.ppl_tokens,
    )
    config.validate()
    model_dir = _model_dir(args.model)
    ece_hp = _load_ece_hparams(_hparams_file(args.hparams, Path(args.hparams_dir), "ECE", model_dir), model_dir, args=args)
    methods = build_methods(args.methods, ece_hp, _baseline_paths(args, model_dir),
                            ece_label_suffix=_ece_label_suffix(args))
    args.limit = args.n_edits
    records = _records(args)
    if len(records) < args.n_edits:
        raise CLIError(f"--n-edits {args.n_edits}: only {len(records)} records from offset {args.offset}")
    path = Path(args.data) if args.data else DEFAULT_DATA
    if args.retention_data:
        retention = load_records(args.retention_data, kind=args.kind, limit=args.n_retention)
    else:
        retention = load_records(path, kind=args.kind, limit=args.n_retention, offset=args.offset + args.n_edits)
    texts = _ppl_texts(args, model_dir)
    out = _out(args, "lifelong")
    if not args.resume:
        stored = {k: v for k, v in vars(args).items() if k != "func"}
        write_json(out / CONFIG_FILE, stored)
    model, tok = _load_model(args, model_dir)
    probes = Probes(records=records, retention_records=retention, texts=texts)
    result = run_lifelong(methods, model, tok, probes, config, out,
                          meta={"model": str(model_dir), "data": str(path), "command": "lifelong"})
    if not args.keep_checkpoints and all(p.finished(config) for p in result.methods):
        discard_checkpoints(out)
    _print(final_table(result))
    _print(f"results: {out / 'lifelong.json'}  csv: {out / 'lifelong.csv'}  curves: {out / 'lifelong.png'}")
    return 0


# ----------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, *, model: bool = True, data: bool = True, out: bool = True) -> None:
    if model:
        p.add_argument("--model", help="model folder (default: the bundled testbed under testbed/)")
        p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
        p.add_argument("--dtype", default=None, help="load the model in this torch dtype (e.g. float16)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    if data:
        p.add_argument("--data", help=f"record file (default {DEFAULT_DATA.relative_to(REPO_ROOT)})")
        p.add_argument("--kind", default="auto", choices=["auto", "counterfact", "zsre", "plain"])
        p.add_argument("--limit", type=int, default=None, help="use at most N records")
        p.add_argument("--offset", type=int, default=0, help="skip the first N records")
    if out:
        p.add_argument("--out", help="output folder (default runs/<command>-<timestamp>/)")


def _hparams_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--hparams", required=required, help="ECE hparams YAML")
    p.add_argument("--hparams-dir", default=str(DEFAULT_HPARAMS_DIR), help="folder with {ECE,ROME,MEMIT,AlphaEdit}/*.yaml")
    p.add_argument("--ece-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an ECE hyperparameter (YAML value; repeatable); ECE's table names show it")
    for alg in ("ROME", "MEMIT", "AlphaEdit"):
        p.add_argument(f"--{alg.lower()}-hparams", help=f"EasyEdit {alg} hparams YAML (default: from --hparams-dir)")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``ece-plugin edit: error: argument --batch-size: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(
        prog="ece-plugin",
        description="ECE (Explainable and Efficient Editing) for EasyEdit: demo, editing, benchmarks, studies.",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="sequential batched CounterFact editing: ECE vs EasyEdit baselines, Table 1")
    _common(p)
    _hparams_args(p)
    p.set_defaults(limit=200)
    p.add_argument("--batch-size", type=_positive_int, default=50)
    p.add_argument("--methods", nargs="+", default=list(DEMO_METHODS))
    p.add_argument("--protocol", default="after_all", choices=["after_all", "after_batch"])
    p.add_argument("--no-fluency", action="store_true", help="skip generation (fluency) in the evaluation")
    p.add_argument("--explain", action="store_true", help="also write neuron/cluster reports of the ECE runs")
    p.add_argument("--rome-limit", type=int, default=50,
                   help="EasyEdit's ROME edits one fact per call (about 1.5 s each on 2 CPU cores): it edits only the first "
                   "N records, said under the table (default 50; 0: all)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("edit", help="sequential batched ECE edits; save the edited model or a compact edit file")
    _common(p)
    p.add_argument("--hparams", required=True, help="ECE hparams YAML")
    p.add_argument("--batch-size", type=_positive_int, default=100)
    p.add_argument("--protocol", default="after_all", choices=["after_all", "after_batch"])
    p.add_argument("--save-model", help="write the edited model (save_pretrained + tokenizer) here")
    p.add_argument("--save-edits", help="write a compact, reversible edit file (.safetensors) here")
    p.add_argument("--force", action="store_true", help="--save-model may replace a non-empty folder that is not a model")
    p.add_argument("--no-eval", action="store_true", help="edit only (no evaluation table)")
    p.add_argument("--no-fluency", action="store_true")
    p.add_argument("--explain", action="store_true", help="write neuron/cluster reports (JSON + heatmap)")
    p.set_defaults(func=cmd_edit)

    for name, func, text in (
        ("apply", cmd_apply, "put an edit file on a model (bit-exact) and save the result"),
        ("revert", cmd_revert, "take an edit file off an edited model (bit-exact) and save the result"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--model", required=True, help="model folder")
        p.add_argument("--edits", required=True, help="edit file (.safetensors) from `ece-plugin edit --save-edits`")
        p.add_argument("--out", required=True, help="folder for the resulting model")
        p.add_argument(
            "--force", action="store_true",
            help="use a model whose weights differ from the file's fingerprint outside the edited neurons, and "
            "replace a non-empty --out folder that is not a model",
        )
        p.add_argument("--device", default="cpu")
        p.add_argument("--threads", type=int, default=None)
        p.set_defaults(func=func)

    p = sub.add_parser("bench", help="methods x number of edits x batch size (Table 1), or --timing (speed)")
    _common(p)
    _hparams_args(p)
    p.add_argument("--methods", nargs="+", default=["ECE-AS", "ECE-WI", "ECE-RS", "MEMIT-equivalent", "MEMIT", "AlphaEdit"])
    p.add_argument("--n-edits", type=_int_list, default=None, help="e.g. '100 200' (default: --limit or 100)")
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="e.g. '50 100' (default 100; timing: 100)")
    p.add_argument("--protocol", default="after_all", choices=["after_all", "after_batch"])
    p.add_argument("--timing", action="store_true", help="speed comparison: ECE vs EasyEdit MEMIT / AlphaEdit")
    p.add_argument("--tracemalloc", action="store_true", help="timing: also trace Python heap peaks (slower)")
    p.add_argument(
        "--warmup", type=int, default=None,
        help="timing: records of one untimed ECE batch on a copy of the model first (default 10; 0: none)",
    )
    p.add_argument(
        "--repeats", type=int, default=None,
        help="timing: rounds per method, s/batch is their median (default 3; rounds after the first only edit)",
    )
    p.add_argument("--no-fluency", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("layer-sweep", help="single edits at every layer with ROME, MEMIT and ECE; best layer")
    _common(p)
    _hparams_args(p)
    p.set_defaults(limit=20)
    p.add_argument("--methods", nargs="+", default=["ROME", "MEMIT", "ECE"], choices=["ROME", "MEMIT", "ECE"])
    p.add_argument("--layers", type=_layer_list, default=None, help="layers to sweep (default: all)")
    p.add_argument("--no-fluency", action="store_true")
    p.set_defaults(func=cmd_layer_sweep)

    p = sub.add_parser("batch-study", help="batch vs sequential-batched editing at several batch sizes")
    _common(p)
    _hparams_args(p)
    p.add_argument("--methods", nargs="+", default=["MEMIT", "ECE"])
    p.add_argument("--batch-sizes", type=_int_list, default=[4, 16, 64], help="e.g. '16 64 256 1024 4096'")
    p.add_argument("--total", type=int, default=None, help="edits of the sequential setting (default: largest B)")
    p.add_argument("--settings", nargs="+", default=["batch", "sequential"], choices=["batch", "sequential"])
    p.add_argument("--protocol", default="after_all", choices=["after_all", "after_batch"])
    p.add_argument("--no-fluency", action="store_true")
    p.set_defaults(func=cmd_batch_study)

    p = sub.add_parser(
        "lifelong", help="N sequential edits with a checkpoint every K: the curve, forgetting, retention, perplexity"
    )
    _common(p)
    _hparams_args(p)
    p.add_argument("--n-edits", type=_positive_int, default=1000, help="number of sequential edits (records)")
    p.add_argument("--batch-size", type=_positive_int, default=100)
    p.add_argument("--checkpoint-every", type=_positive_int, default=None,
                   help="measure and checkpoint every K edits (a multiple of --batch-size; default: only at the end)")
    p.add_argument("--methods", nargs="+", default=["ECE-AS", "MEMIT", "AlphaEdit"],
                   help="ECE variants (ECE-AS, ECE-WI, ECE-RS, MEMIT-equivalent, ...) and EasyEdit's ROME, MEMIT, AlphaEdit")
    p.add_argument("--n-retention", type=int, default=100,
                   help="known facts never edited, scored at every checkpoint (default: the records after the edits)")
    p.add_argument("--retention-data", help="record file for the retention facts (default: --data after the edits)")
    p.add_argument("--ppl-text", nargs="+", help="text files for perplexity (default: bundled WikiText-2 the model did not train on)")
    p.add_argument("--ppl-tokens", type=_positive_int, default=16384, help="tokens of each text used for perplexity")
    p.add_argument("--n-fluency-prompts", type=int, default=20, help="prompts whose greedy continuations give fluency")
    p.add_argument("--seed", type=int, default=0, help="batch i runs with torch seeded by seed + i")
    p.add_argument("--resume", help="continue the interrupted run in this folder from its last checkpoint")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoint folders after a finished run")
    p.set_defaults(func=cmd_lifelong)

    p = sub.add_parser("explain", help="neuron selection / cluster report for records, without editing")
    _common(p)
    p.add_argument("--hparams", required=True, help="ECE hparams YAML")
    p.set_defaults(limit=20)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("evaluate", help="the pre-edit Table-1 row of a model on record files")
    _common(p, data=False)
    p.add_argument("--data", nargs="+", help="record files (default: bundled CounterFact and zsRE)")
    p.add_argument("--kind", default="auto", choices=["auto", "counterfact", "zsre", "plain"])
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--no-fluency", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("stats", help="precompute the second-moment statistics (EasyEdit's cache layout)")
    _common(p, data=False)
    _hparams_args(p)
    p.add_argument("--layers", type=_layer_list, default=None, help="layers (default: those of the hparams)")
    p.set_defaults(func=cmd_stats)

    try:
        from ..testbed.cli import (
            add_build_testbed_parser,
            add_probe_parser,
            add_stats_corpus_parser,
            run_build_testbed,
        )

        p = add_build_testbed_parser(sub)
        p.set_defaults(func=run_build_testbed)
        add_probe_parser(sub)
        add_stats_corpus_parser(sub)
    except ImportError as exc:  # pragma: no cover - the testbed package ships with ece_plugin
        logger.debug("build-testbed unavailable: %s", exc)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [CLIError, FileNotFoundError, ValueError, KeyError, ImportError, OSError]
    return tuple(errors)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("ece-plugin: interrupted\n")
        return 130
    except _known_errors() as exc:
        logger.debug("error", exc_info=True)
        sys.stderr.write(f"ece-plugin {args.command}: error: {type(exc).__name__}: {_one_line(exc)}\n")
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - anything else: still one line; the traceback with DEBUG
        logger.debug("unexpected error", exc_info=True)
        sys.stderr.write(
            f"ece-plugin {args.command}: error: {type(exc).__name__}: {_one_line(exc)} "
            "(unexpected; --log-level DEBUG shows the traceback)\n"
        )
        return EXIT_FAILURE


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["build_parser", "main", "json"]
