"""``ece-plugin edit``: sequential batched ECE edits; saves the edited model and/or a compact, reversible edit file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import common as c


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "edit", help="sequential batched ECE edits; save the edited model or a compact edit file"
    )
    c.add_common(p)
    p.add_argument("--hparams", required=True, help="ECE hparams YAML, or a bundled name (llama3-8b, testbed-llama)")
    p.add_argument("--ece-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an ECE hyperparameter (YAML value; repeatable)")
    p.add_argument("--batch-size", type=c.positive_int, default=100)
    c.add_protocol(p)
    p.add_argument("--save-model", help="write the edited model (save_pretrained + tokenizer) here")
    p.add_argument("--save-edits", help="write a compact, reversible edit file (.safetensors) here")
    p.add_argument("--no-eval", action="store_true", help="edit only (no evaluation table)")
    p.add_argument("--no-fluency", action="store_true")
    p.add_argument("--explain", action="store_true", help="write neuron/cluster reports (JSON + heatmap)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ... import evaluation
    from ...files.editfile import build_edit_file, save_edit_file, state_to_tensors
    from ...files.modeldir import save_model_folder
    from ...files.outputs import Output
    from ..study.baselines import ECEMethod
    from ..study.common import snapshot_weights, write_json
    from ..study.runner import MethodRun, batch_edit_fn

    if args.no_eval and not args.save_model and not args.save_edits:
        raise c.CLIError("--no-eval with nothing saved would leave nothing: give --save-model OUT or --save-edits FILE")
    c.check_outputs(
        args,
        Output("--save-model", Path(args.save_model), "folder") if args.save_model else None,
        Output("--save-edits", Path(args.save_edits), "file") if args.save_edits else None,
    )
    model_dir = c.model_dir(args.model)
    hp = c.load_ece_hparams(c.hparams_file(args.hparams, c.DEFAULT_HPARAMS_DIR, "ECE", model_dir), model_dir, args=args)
    records = c.records(args)
    out = c.out_dir(args, "edit")
    model, tok = c.load_model(args, model_dir)
    method = ECEMethod(hp, name=f"ECE-{hp.attribution}")
    original = snapshot_weights(model, method.edited_weight_names(model))
    method.reset(model)
    method.prepare(model, tok)
    run = MethodRun(name=method.name, available=True)
    edit_fn = batch_edit_fn(method, run)
    if args.no_eval:
        from tqdm.auto import tqdm

        batches = [records[i : i + args.batch_size] for i in range(0, len(records), args.batch_size)]
        for batch in tqdm(batches, desc=f"{method.name} editing", unit="batch"):
            edit_fn(model, tok, batch)
    else:
        run.result = evaluation.run_protocol(
            model, tok, records, edit_fn, method=method.name, batch_size=args.batch_size,
            protocol=args.protocol, pre=True, eval_kwargs=c.eval_kwargs(args),
        )
        c.say(evaluation.format_table([run.result]))
        evaluation.write_csv(out / "edit.csv", [run.result])
    write_json(out / "edit.json", {"config": c.run_config(args), "run": run.to_dict()})
    if args.explain:
        c.write_run_explanations([run], out)
    if args.save_edits:
        edit = build_edit_file(
            model, original, state=state_to_tensors(method.sequential_state(model), model),
            hparams=hp.to_dict(), records=[r.to_dict() for r in records],
            extra={"model_dir": str(model_dir), "batch_size": args.batch_size},
        )
        path = save_edit_file(edit, args.save_edits)
        n = sum(w.n_changed for w in edit.weights.values())
        c.say(f"edit file: {path} ({len(edit.weights)} weight(s), {n} neuron slice(s) changed)")
    if args.save_model:
        save_model_folder(model, tok, Path(args.save_model), force=args.force)
        c.say(f"edited model: {args.save_model}")
    c.say(f"results in {out}")
    return 0
