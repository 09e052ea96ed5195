"""``ece-plugin layer-sweep``: single edits at every layer with ROME, MEMIT and ECE; the best layer."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import common as c


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "layer-sweep", help="single edits at every layer with ROME, MEMIT and ECE; best layer"
    )
    c.add_common(p)
    c.add_hparams_args(p)
    p.set_defaults(limit=20)
    p.add_argument("--methods", nargs="+", default=["ROME", "MEMIT", "ECE"], choices=["ROME", "MEMIT", "ECE"])
    p.add_argument("--layers", type=c.layer_list, default=None, help="layers to sweep (default: all)")
    p.add_argument("--no-fluency", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..study.layer_sweep import run_layer_sweep, write_layer_sweep

    c.check_outputs(args)
    model_dir = c.model_dir(args.model)
    ece_path = c.hparams_file(args.hparams, Path(args.hparams_dir), "ECE", model_dir)
    ece_hp = c.load_ece_hparams(ece_path, model_dir, args=args)
    records = c.records(args)
    out = c.out_dir(args, "layer-sweep")
    model, tok = c.load_model(args, model_dir)
    sweep = run_layer_sweep(
        model, tok, records, ece_hp, c.baseline_paths(args, model_dir), methods=args.methods,
        layers=args.layers, eval_kwargs=c.eval_kwargs(args),
    )
    files = write_layer_sweep(sweep, out, c.run_config(args))
    c.say(sweep.format())
    c.say(f"\nresults: {files['json']}  csv: {files['csv']}  plot: {files['png']}")
    return 0
