"""``ece-plugin apply`` / ``ece-plugin revert``: put an edit file on a model, or take it off, bit-exact."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import common as c


def add_parsers(sub: Any) -> list[argparse.ArgumentParser]:
    parsers = []
    for name, func, text in (
        ("apply", run_apply, "put an edit file on a model (bit-exact) and save the result"),
        ("revert", run_revert, "take an edit file off an edited model (bit-exact) and save the result"),
    ):
        p: argparse.ArgumentParser = sub.add_parser(name, help=text)
        p.add_argument("--model", required=True, help="model folder")
        p.add_argument("--edits", required=True, help="edit file (.safetensors) from `ece-plugin edit --save-edits`")
        p.add_argument("--out", required=True, help="folder for the resulting model")
        p.add_argument(
            "--force", action="store_true",
            help="use a model whose weights differ from the file's fingerprint outside the edited neurons, and "
            "replace what is at --out (its files other than weights are kept)",
        )
        p.add_argument("--device", default="cpu")
        p.add_argument("--threads", type=c.positive_int, default=None)
        p.set_defaults(func=func)
        parsers.append(p)
    return parsers


def apply_or_revert(args: argparse.Namespace, forward: bool) -> int:
    from ...files.editfile import apply_edit_file, load_edit_file, revert_edit_file
    from ...files.modeldir import save_model_folder
    from ...files.outputs import Output

    c.check_outputs(args, Output("--out", Path(args.out), "folder"), run_folder=False)
    model_dir = c.model_dir(args.model)
    edit = load_edit_file(args.edits)
    args.device = args.device or "cpu"
    model, tok = c.load_model(args, model_dir)
    written = (apply_edit_file if forward else revert_edit_file)(model, edit, force=args.force)
    save_model_folder(model, tok, Path(args.out), force=args.force)
    verb = "applied" if forward else "reverted"
    c.say(f"{verb} {args.edits} on {len(written)} weight(s); model written to {args.out}")
    return 0


def run_apply(args: argparse.Namespace) -> int:
    return apply_or_revert(args, forward=True)


def run_revert(args: argparse.Namespace) -> int:
    return apply_or_revert(args, forward=False)
