"""``ece-plugin explain``: which neurons ECE would edit for some records, and its clusters, without editing."""

from __future__ import annotations

import argparse
from typing import Any

from . import common as c


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "explain", help="neuron selection / cluster report for records, without editing"
    )
    c.add_common(p)
    p.add_argument("--hparams", required=True, help="ECE hparams YAML")
    p.set_defaults(limit=20)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..explain import explain_records, write_explanation

    c.check_outputs(args)
    model_dir = c.model_dir(args.model)
    hp = c.load_ece_hparams(c.hparams_file(args.hparams, c.DEFAULT_HPARAMS_DIR, "ECE", model_dir), model_dir, args=args)
    records = c.records(args)
    out = c.out_dir(args, "explain")
    model, tok = c.load_model(args, model_dir)
    explanation = explain_records(model, tok, [r.to_request() for r in records], hp)
    files = write_explanation(explanation, out)
    data = explanation.to_dict()
    for layer in data["layers"]:
        jaccard = layer["mean_pairwise_jaccard"]
        c.say(
            f"layer {layer['layer']}: {data['n_edits']} edits, mean set size {layer['set_size']['mean']:.1f} neurons, "
            f"union {layer['batch_neuron_count']}, mean pairwise Jaccard "
            f"{jaccard if jaccard is not None else float('nan'):.3f}"
        )
    if data.get("clusters"):
        c.say(f"{len(data['clusters'])} cluster(s); anchors: {[cl['anchor_edit'] for cl in data['clusters']]}")
    c.say(f"report: {files['json']}  heatmap: {files['png']}")
    return 0
