"""``ece-plugin demo``: sequential batched CounterFact editing, ECE against EasyEdit's baselines (Table 1)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import common as c

DEMO_METHODS = ("ECE-AS", "ECE-WI", "ECE-RS", "ROME", "MEMIT", "AlphaEdit")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo", help="sequential batched CounterFact editing: ECE vs EasyEdit baselines, Table 1"
    )
    c.add_common(p)
    c.add_hparams_args(p)
    p.set_defaults(limit=200)
    p.add_argument("--batch-size", type=c.positive_int, default=50)
    p.add_argument("--methods", nargs="+", default=list(DEMO_METHODS))
    c.add_protocol(p)
    p.add_argument("--no-fluency", action="store_true", help="skip generation (fluency) in the evaluation")
    p.add_argument("--explain", action="store_true", help="also write neuron/cluster reports of the ECE runs")
    p.add_argument("--rome-limit", type=c.non_negative_int, default=50,
                   help="EasyEdit's ROME edits one fact per call (about 1.5 s each on 2 CPU cores): it edits only the first "
                   "N records, said under the table (default 50; 0: all)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..study.bench import compare_methods, write_comparisons
    from ..study.methods import build_methods

    c.check_outputs(args)
    model_dir = c.model_dir(args.model)
    ece_path = c.hparams_file(args.hparams, Path(args.hparams_dir), "ECE", model_dir)
    ece_hp = c.load_ece_hparams(ece_path, model_dir, args=args)
    records = c.records(args)
    out = c.out_dir(args, "demo")
    model, tok = c.load_model(args, model_dir)
    methods = build_methods(args.methods, ece_hp, c.baseline_paths(args, model_dir),
                            ece_label_suffix=c.ece_label_suffix(args))
    comparison = compare_methods(
        methods, model, tok, records, batch_size=args.batch_size, protocol=args.protocol,
        eval_kwargs=c.eval_kwargs(args), record_limits={"ROME": args.rome_limit} if args.rome_limit else None,
    )
    files = write_comparisons([comparison], out, "demo", c.run_config(args))
    if args.explain:
        c.write_run_explanations(comparison.runs, out)
    c.say(comparison.table)
    c.say(f"\nresults: {files['json']}  table: {files['md']}  csv: {files['csv']}  plot: {files['png0']}")
    return c.report_failures("demo", comparison.runs)
