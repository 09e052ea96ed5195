"""``ece-plugin stats``: precompute the second-moment statistics C0 (EasyEdit's cache layout)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from . import common as c


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "stats", help="precompute the second-moment statistics (EasyEdit's cache layout)"
    )
    c.add_common(p, data=False)
    c.add_hparams_args(p)
    p.add_argument("--layers", type=c.layer_list, default=None, help="layers (default: those of the hparams)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..study.baselines import ensure_statistics
    from ..study.common import write_json

    c.check_outputs(args)
    model_dir = c.model_dir(args.model)
    hp = c.load_ece_hparams(c.hparams_file(args.hparams, Path(args.hparams_dir), "ECE", model_dir), model_dir, args=args)
    if args.layers:
        hp = dataclasses.replace(hp, layers=sorted(set(args.layers)))
    out = c.out_dir(args, "stats")
    model, tok = c.load_model(args, model_dir)
    computed = ensure_statistics(model, tok, hp)
    write_json(out / "stats.json", {"config": c.run_config(args), "computed": computed, "stats_dir": hp.stats_dir})
    c.say(f"statistics for layers {hp.layers} in {hp.stats_dir} (computed now: {computed or 'none, all cached'})")
    return 0
