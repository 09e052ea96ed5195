"""``ece-plugin batch-study``: batch against sequential-batched editing at several batch sizes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import common as c


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "batch-study", help="batch vs sequential-batched editing at several batch sizes"
    )
    c.add_common(p)
    c.add_hparams_args(p)
    p.add_argument("--methods", nargs="+", default=["MEMIT", "ECE"])
    p.add_argument("--batch-sizes", type=c.int_list, default=[4, 16, 64], help="e.g. '16 64 256 1024 4096'")
    p.add_argument("--total", type=c.positive_int, default=None, help="edits of the sequential setting (default: largest B)")
    p.add_argument("--settings", nargs="+", default=["batch", "sequential"], choices=["batch", "sequential"])
    c.add_protocol(p)
    p.add_argument("--no-fluency", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..study.batch_study import run_batch_study, write_batch_study

    c.check_outputs(args)
    model_dir = c.model_dir(args.model)
    ece_path = c.hparams_file(args.hparams, Path(args.hparams_dir), "ECE", model_dir)
    ece_hp = c.load_ece_hparams(ece_path, model_dir, args=args)
    total = args.total or max(args.batch_sizes)
    args.limit = max(total, max(args.batch_sizes))
    records = c.records(args)
    out = c.out_dir(args, "batch-study")
    model, tok = c.load_model(args, model_dir)
    study = run_batch_study(
        model, tok, records, ece_hp, c.baseline_paths(args, model_dir), methods=args.methods,
        batch_sizes=args.batch_sizes, total_edits=total, settings=args.settings, protocol=args.protocol,
        eval_kwargs=c.eval_kwargs(args),
    )
    files = write_batch_study(study, out, c.run_config(args))
    c.say(study.format())
    c.say(f"\nresults: {files['json']}  csv: {files['csv']}  plot: {files['png']}")
    return 0
