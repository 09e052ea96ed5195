"""``ece-plugin lifelong``: N sequential edits with a checkpoint every K edits; the curve, forgetting, retention and
perplexity per method; ``--resume`` continues an interrupted run from its last checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Optional

from . import common as c

logger = logging.getLogger("ece_plugin.lab.cli")

LIFELONG_METHODS = ("ECE-AS", "MEMIT", "AlphaEdit")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "lifelong", help="N sequential edits with a checkpoint every K: the curve, forgetting, retention, perplexity"
    )
    c.add_common(p)
    c.add_hparams_args(p)
    p.add_argument("--n-edits", type=c.positive_int, default=1000, help="number of sequential edits (records)")
    p.add_argument("--batch-size", type=c.positive_int, default=100)
    p.add_argument("--checkpoint-every", type=c.positive_int, default=None,
                   help="measure and checkpoint every K edits (a multiple of --batch-size; default: only at the end)")
    p.add_argument("--methods", nargs="+", default=list(LIFELONG_METHODS),
                   help="ECE variants (ECE-AS, ECE-WI, ECE-RS, MEMIT-equivalent, ...) and EasyEdit's ROME, MEMIT, AlphaEdit")
    p.add_argument("--n-retention", type=int, default=100,
                   help="known facts never edited, scored at every checkpoint (default: the records after the edits)")
    p.add_argument("--retention-data", help="record file for the retention facts (default: --data after the edits)")
    p.add_argument("--ppl-text", nargs="+", help="text files for perplexity (default: bundled WikiText-2 the model did not train on)")
    p.add_argument("--ppl-tokens", type=c.positive_int, default=16384, help="tokens of each text used for perplexity")
    p.add_argument("--n-fluency-prompts", type=int, default=20, help="prompts whose greedy continuations give fluency")
    p.add_argument("--seed", type=int, default=0, help="batch i runs with torch seeded by seed + i")
    p.add_argument("--resume", help="continue the interrupted run in this folder from its last checkpoint")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoint folders after a finished run")
    p.set_defaults(func=run)
    return p


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


def ppl_texts(args: argparse.Namespace, model_dir: Path) -> dict[str, str]:
    """Texts for perplexity: ``--ppl-text`` files, else the bundled WikiText-2 file the model did not train on."""
    from ...evaluation.general import read_text
    from ...resources import REPO_ROOT

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


def _resumed_args(args: argparse.Namespace) -> argparse.Namespace:
    """The options saved in the run folder of ``--resume``."""
    from ..study.lifelong import CONFIG_FILE

    run_dir = Path(args.resume)
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        raise c.CLIError(f"--resume: {run_dir} holds no {CONFIG_FILE} (not a lifelong run folder)")
    stored = json.loads(saved.read_text(encoding="utf-8"))
    log_level = args.log_level
    resumed = argparse.Namespace(**stored)
    resumed.resume, resumed.out, resumed.log_level = str(run_dir), str(run_dir), log_level
    logger.info("resuming %s with its saved options", run_dir)
    return resumed


def run(args: argparse.Namespace) -> int:
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
        args = _resumed_args(args)
    config = LifelongConfig(
        n_edits=args.n_edits, batch_size=args.batch_size, checkpoint_every=args.checkpoint_every or args.n_edits,
        seed=args.seed, n_fluency_prompts=args.n_fluency_prompts, ppl_max_tokens=args.ppl_tokens,
    )
    config.validate()
    model_dir = c.model_dir(args.model)
    ece_hp = c.load_ece_hparams(c.hparams_file(args.hparams, Path(args.hparams_dir), "ECE", model_dir), model_dir,
                                args=args)
    methods = build_methods(args.methods, ece_hp, c.baseline_paths(args, model_dir),
                            ece_label_suffix=c.ece_label_suffix(args))
    args.limit = args.n_edits
    records = c.records(args)
    if len(records) < args.n_edits:
        raise c.CLIError(f"--n-edits {args.n_edits}: only {len(records)} records from offset {args.offset}")
    path = Path(args.data) if args.data else c.DEFAULT_DATA
    if args.retention_data:
        retention = load_records(args.retention_data, kind=args.kind, limit=args.n_retention)
    else:
        retention = load_records(path, kind=args.kind, limit=args.n_retention, offset=args.offset + args.n_edits)
    texts = ppl_texts(args, model_dir)
    out = c.out_dir(args, "lifelong")
    if not args.resume:
        stored = {k: v for k, v in vars(args).items() if k != "func"}
        write_json(out / CONFIG_FILE, stored)
    model, tok = c.load_model(args, model_dir)
    probes = Probes(records=records, retention_records=retention, texts=texts)
    result = run_lifelong(methods, model, tok, probes, config, out,
                          meta={"model": str(model_dir), "data": str(path), "command": "lifelong"})
    if not args.keep_checkpoints and all(p.finished(config) for p in result.methods):
        discard_checkpoints(out)
    c.say(final_table(result))
    c.say(f"results: {out / 'lifelong.json'}  csv: {out / 'lifelong.csv'}  curves: {out / 'lifelong.png'}")
    return 0
