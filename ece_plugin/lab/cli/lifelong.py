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
                   help="ECE variants (ECE-AS, ECE-WI, ECE-RS, MEMIT-equivalent, ...) and EasyEdit's ROME, MEMIT, "
                   "AlphaEdit; with EasyEdit main also ULTRAEDIT, SPHERE (SPHERE-batched: whole batches through its "
                   "apply function), EMMET, PMET")
    p.add_argument("--n-retention", type=c.non_negative_int, default=100,
                   help="known facts never edited, scored at every checkpoint (default: the records after the edits)")
    p.add_argument("--retention-data", help="record file for the retention facts (default: --data after the edits)")
    p.add_argument("--ppl-text", nargs="+", help="text files for perplexity (default: bundled WikiText-2 the model did not train on)")
    p.add_argument("--ppl-tokens", type=c.positive_int, default=16384, help="tokens of each text used for perplexity")
    p.add_argument("--n-fluency-prompts", type=c.non_negative_int, default=20, help="prompts whose greedy continuations give fluency")
    p.add_argument("--seed", type=int, default=0, help="batch i runs with torch seeded by seed + i")
    p.add_argument("--measure-only", metavar="JSON",
                   help="a JSON file holding a list of positions (0-based) of the edit sequence: every measurement, "
                   "both protocols, reads those records only (a validation sequence among load edits)")
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


def measured_positions(path: str, n_edits: int, checkpoint_every: int) -> list[int]:
    """``--measure-only``: the positions of the sequence every measurement reads, checked before anything runs."""
    from ..study.lifelong import measured_problem

    try:
        positions = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise c.CLIError(f"--measure-only {path}: cannot read it ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise c.CLIError(f"--measure-only {path}: not JSON ({' '.join(str(exc).split())[:80]})") from exc
    if not isinstance(positions, list) or not positions or not all(type(p) is int for p in positions):
        raise c.CLIError(f"--measure-only {path}: expected a non-empty JSON list of integer positions")
    problem = measured_problem(positions, n_edits, checkpoint_every)
    if problem:
        raise c.CLIError(f"--measure-only {path}: {problem} (--n-edits {n_edits})")
    return positions


#: Options added after runs were first saved, with the value an older run folder ran with.
ADDED_OPTIONS: dict[str, Any] = {"measure_only": None}
#: Options a resumed run takes from the command line; every other option comes from the run folder.
NOW_OPTIONS = frozenset({"resume", "out", "log_level", "force", "command"})
#: Options that may differ on resume without --force (they do not change the results); the run's unless given.
FREE_OPTIONS = frozenset({"keep_checkpoints", "threads"})
RUNTIME_OPTIONS = NOW_OPTIONS | FREE_OPTIONS
HPARAMS_KEY = "_hparams_sha256"
CHANGES_KEY = "_changes"


def _json_value(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _read_config(path: Path) -> dict[str, Any]:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise c.CLIError(f"--resume: {path}: unreadable JSON ({' '.join(str(exc).split())[:80]})") from exc
    if not isinstance(stored, dict):
        raise c.CLIError(f"--resume: {path}: expected a JSON object of the run's options")
    return stored


def _resumed_args(args: argparse.Namespace) -> argparse.Namespace:
    """The options saved in the run folder of ``--resume``. An option given beside ``--resume`` that differs from
    the saved one is refused unless ``--force``; forced, it is used and recorded in the folder's config."""
    from ..study.lifelong import CONFIG_FILE

    run_dir = Path(args.resume)
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        raise c.CLIError(f"--resume: {run_dir} holds no {CONFIG_FILE} (not a lifelong run folder)")
    stored = {**ADDED_OPTIONS, **_read_config(saved)}
    current = c.run_config(args)
    missing = sorted(k for k in current if k not in stored and k not in RUNTIME_OPTIONS)
    if missing:
        raise c.CLIError(f"--resume: {saved}: lacks the option(s) {', '.join(missing)[:120]}; not a config this "
                         "version wrote (start the run again)")
    given = set(getattr(args, "_given", set())) - RUNTIME_OPTIONS
    changed = {k: (stored[k], _json_value(current[k])) for k in sorted(given)
               if k in current and _json_value(current[k]) != stored[k]}
    if changed and not args.force:
        first, (was, now) = next(iter(changed.items()))
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise c.CLIError(f"--resume {run_dir}: --{first.replace('_', '-')} {now} differs from the run's {was}{more}; "
                         "resume without it, or pass --force to go on with the new value (recorded in the run)")
    resumed = argparse.Namespace(**{k: v for k, v in stored.items() if not k.startswith("_")})
    for key in NOW_OPTIONS | (FREE_OPTIONS & set(getattr(args, "_given", set()))) | set(changed):
        if key in current:
            setattr(resumed, key, getattr(args, key))
    resumed.resume, resumed.out = str(run_dir), str(run_dir)
    resumed._stored, resumed._config_path = stored, saved
    resumed._changes = {k: {"run": was, "now": now} for k, (was, now) in changed.items()}
    if changed:
        logger.warning("--resume --force: going on with changed option(s) %s", ", ".join(changed))
    logger.info("resuming %s with its saved options", run_dir)
    return resumed


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hparams_digests(paths: list[Path]) -> dict[str, str]:
    return {str(p): _sha256(p) for p in paths if p.is_file()}


def _check_hparams(args: argparse.Namespace, digests: dict[str, str]) -> None:
    """On resume: the hparams files must be as the run started with them, unless ``--force`` (then recorded)."""
    before = getattr(args, "_stored", {}).get(HPARAMS_KEY)
    if before is None:
        return
    changed = sorted(p for p in set(before) | set(digests) if before.get(p) != digests.get(p))
    if not changed:
        return
    if not args.force:
        raise c.CLIError(f"--resume {args.resume}: hparams file {changed[0]} changed since the run started"
                         f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}; restore it, or pass "
                         "--force to go on with it (recorded in the run)")
    logger.warning("--resume --force: going on with changed hparams file(s) %s", ", ".join(changed))
    args._changes.update({f"hparams {p}": {"run": before.get(p), "now": digests.get(p)} for p in changed})


def _write_config(args: argparse.Namespace, out: Path, digests: dict[str, str], config_file: str) -> None:
    """The run's options and hparams digests (a new run), or the changes a forced resume made (recorded)."""
    from ...method import atomic

    if not args.resume:
        stored = {k: v for k, v in c.run_config(args).items() if k not in ("resume",)}
        stored[HPARAMS_KEY] = digests
        atomic.write_text(out / config_file, json.dumps(stored, indent=2) + "\n")
        return
    if args._changes:
        import time

        stored = dict(args._stored)
        stored.update({k: v["now"] for k, v in args._changes.items() if not k.startswith("hparams ")})
        stored[HPARAMS_KEY] = digests
        stored.setdefault(CHANGES_KEY, []).append({"resumed": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                   "changed": args._changes})
        atomic.write_text(args._config_path, json.dumps(stored, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    from ...evaluation.data import load_records
    from ..study.lifelong import (
        CONFIG_FILE,
        LifelongConfig,
        Probes,
        discard_checkpoints,
        final_table,
        run_lifelong,
    )
    from ..study.methods import build_methods

    if "limit" in getattr(args, "_given", set()):
        raise c.UsageError("argument --limit: lifelong edits --n-edits records (from --offset); give --n-edits "
                           "instead")
    if args.resume:
        args = _resumed_args(args)
    else:
        c.check_outputs(args)
        if args.out and (Path(args.out) / CONFIG_FILE).is_file():  # --force must not mix two runs in one folder
            raise c.CLIError(f"--out {args.out}: holds a lifelong run; continue it with --resume {args.out}, or "
                             "choose a new folder")
    config = LifelongConfig(
        n_edits=args.n_edits, batch_size=args.batch_size, checkpoint_every=args.checkpoint_every or args.n_edits,
        seed=args.seed, n_fluency_prompts=args.n_fluency_prompts, ppl_max_tokens=args.ppl_tokens,
    )
    config.validate()
    model_dir = c.model_dir(args.model)
    ece_path = c.hparams_file(args.hparams, Path(args.hparams_dir), "ECE", model_dir, sequential=True)
    baselines = c.baseline_paths(args, model_dir)
    digests = _hparams_digests([ece_path, *baselines.values()])
    if args.resume:
        _check_hparams(args, digests)
    ece_hp = c.load_ece_hparams(ece_path, model_dir, args=args)
    methods = build_methods(args.methods, ece_hp, baselines, ece_label_suffix=c.ece_label_suffix(args))
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
    measured = measured_positions(args.measure_only, args.n_edits, config.checkpoint_every) if args.measure_only else None
    out = c.out_dir(args, "lifelong")
    _write_config(args, out, digests, CONFIG_FILE)
    model, tok = c.load_model(args, model_dir)
    probes = Probes(records=records, retention_records=retention, texts=texts, measured=measured)
    result = run_lifelong(methods, model, tok, probes, config, out,
                          meta={"model": str(model_dir), "data": str(path), "command": "lifelong"})
    if not args.keep_checkpoints and all(p.finished(config) for p in result.methods):
        discard_checkpoints(out)
    c.say(final_table(result))
    c.say(f"results: {out / 'lifelong.json'}  csv: {out / 'lifelong.csv'}  curves: {out / 'lifelong.png'}")
    return c.report_failures("lifelong", [argparse.Namespace(name=p.method, available=p.available, reason=p.reason)
                                          for p in result.methods])
