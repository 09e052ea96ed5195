"""``ece-plugin evaluate``: the pre-edit Table-1 row of a model on record files."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import common as c


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser("evaluate", help="the pre-edit Table-1 row of a model on record files")
    c.add_common(p, data=False)
    p.add_argument("--data", nargs="+", help="record files (default: bundled CounterFact and zsRE)")
    p.add_argument("--kind", default="auto", choices=["auto", "counterfact", "zsre", "plain"])
    p.add_argument("--limit", type=c.positive_int, default=2000)
    p.add_argument("--offset", type=c.non_negative_int, default=0)
    p.add_argument("--no-fluency", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ... import evaluation
    from ...evaluation.data import load_records
    from ..study.common import write_json

    c.check_outputs(args)
    model_dir = c.model_dir(args.model)
    paths = [Path(p) for p in (args.data or [str(c.DEFAULT_DATA), str(c.DEFAULT_ZSRE)])]
    out = c.out_dir(args, "evaluate")
    model, tok = c.load_model(args, model_dir)
    for path in paths:
        records = load_records(path, kind=args.kind, limit=args.limit, offset=args.offset)
        if not records:
            raise c.CLIError(f"--data: no records in {path}")
        cases = evaluation.evaluate_records(model, tok, records, progress=True, **c.eval_kwargs(args))
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
        c.say(table + "\n")
        stem = f"pre-edit-{path.stem}"
        write_json(out / f"{stem}.json",
                   {"config": c.run_config(args), "data": str(path), "summary": summary, "cases": cases})
        evaluation.write_csv(out / f"{stem}.csv", [result])
    c.say(f"results in {out}")
    return 0
