"""``ece-plugin bench``: methods x number of edits x batch size (Table 1), or ``--timing`` (speed)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import common as c

BENCH_METHODS = ("ECE-AS", "ECE-WI", "ECE-RS", "MEMIT-equivalent", "MEMIT", "AlphaEdit")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "bench", help="methods x number of edits x batch size (Table 1), or --timing (speed)"
    )
    c.add_common(p)
    c.add_hparams_args(p)
    p.add_argument("--methods", nargs="+", default=list(BENCH_METHODS))
    p.add_argument("--n-edits", type=c.int_list, default=None, help="e.g. '100 200' (default: --limit or 100)")
    p.add_argument("--batch-sizes", type=c.int_list, default=None, help="e.g. '50 100' (default 100; timing: 100)")
    c.add_protocol(p)
    p.add_argument("--timing", action="store_true", help="speed comparison: ECE vs EasyEdit MEMIT / AlphaEdit")
    p.add_argument("--tracemalloc", action="store_true", help="timing: also trace Python heap peaks (slower)")
    p.add_argument(
        "--warmup", type=c.non_negative_int, default=None,
        help="timing: records of one untimed ECE batch on a copy of the model first (default 10; 0: none)",
    )
    p.add_argument(
        "--repeats", type=c.positive_int, default=None,
        help="timing: rounds per method, s/batch is their median (default 3; rounds after the first only edit)",
    )
    p.add_argument("--no-fluency", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..study.bench import compare_methods, write_comparisons
    from ..study.methods import build_methods

    c.check_outputs(args)
    model_dir = c.model_dir(args.model)
    ece_path = c.hparams_file(args.hparams, Path(args.hparams_dir), "ECE", model_dir, sequential=True)
    ece_hp = c.load_ece_hparams(ece_path, model_dir, args=args)
    baselines = c.baseline_paths(args, model_dir)
    n_list = args.n_edits or [args.limit or 100]
    args.limit = max(n_list)
    records = c.records(args)
    if len(records) < max(n_list):
        raise c.CLIError(f"--n-edits {max(n_list)} needs that many records; {len(records)} loaded")
    out = c.out_dir(args, "bench")
    model, tok = c.load_model(args, model_dir)
    if args.timing:
        return _timing(args, model, tok, records[: max(n_list)], ece_hp, baselines, out)
    methods = build_methods(args.methods, ece_hp, baselines, ece_label_suffix=c.ece_label_suffix(args))
    comparisons = []
    for n in n_list:
        for b in args.batch_sizes or [min(100, n)]:
            comparison = compare_methods(
                methods, model, tok, records[:n], batch_size=b, protocol=args.protocol,
                eval_kwargs=c.eval_kwargs(args),
            )
            c.say(comparison.table + "\n")
            comparisons.append(comparison)
    files = write_comparisons(comparisons, out, "bench", c.run_config(args))
    c.say(f"results: {files['json']}  csv: {files['csv']}  tables: {files['md']}")
    return c.report_failures("bench", [run for comparison in comparisons for run in comparison.runs])


def _timing(args: argparse.Namespace, model: Any, tok: Any, records: list[Any], ece_hp: Any,
            baselines: dict[str, Path], out: Path) -> int:
    from ..study.bench import DEFAULT_REPEATS, DEFAULT_WARMUP, run_timing, write_timing

    report, runs = run_timing(
        model, tok, records, ece_hp, baselines, batch_size=(args.batch_sizes or [100])[0],
        eval_kwargs=c.eval_kwargs(args), trace_python_memory=args.tracemalloc,
        warmup=DEFAULT_WARMUP if args.warmup is None else args.warmup,
        repeats=DEFAULT_REPEATS if args.repeats is None else args.repeats,
    )
    files = write_timing(report, runs, out, c.run_config(args))
    c.say(report.table)
    c.say(f"\nresults: {files['json']}  csv: {files['csv']}  plot: {files['png']}")
    return c.report_failures("bench", runs)
