"""Sequential-editing settings of ECE on a validation sequence of the scale testbed.

The validation sequence is 400 CounterFact facts the scale testbed trained on and no reported table uses:
counterfact-val.json records 0-199, then counterfact-edit.json records 2000-2199 (the reported runs edit records
0-1999). They are edited in 4 sequential batches of 100 and evaluated after all with ``ece-plugin lifelong``;
retention is scored on zsRE records 0-99 (known facts of another data set, never edited here).

    python benchmarks/lifelong_validation.py --set neuron_threshold=1.0 --out runs/val-p10

``--load N`` lengthens the sequence towards the reported 2,000 edits without touching a reported record: N
"load" edits of CounterFact facts the testbed never trained (counterfact-edit.json records 2200 on; disjoint from
the pre-edit checks' 5000-5199 and the statistics corpus' 7000-9199) are interleaved with the 400 validation
edits (the validation batches evenly spaced among the load batches), and every measurement reads the 400
validation edits only. ``--load 600`` is a 1,000-edit sequence. The load edits are drawn in a fixed order (see
``never_trained_pool``), so a shorter sequence is the start of a longer one.

``--reported`` measures the reported records instead (counterfact-edit.json records 0-1999, the 2,000-edit
tables' records; retention on records 2000-2199 as there): with ``--load 8000`` it is the 10,000-edit sequence
of issue 15, 2,000 known facts among 8,000 never-trained ones, a measurement only (nothing is tuned on it).

``--merge LABEL=RUN_FOLDER ... --out DIR`` writes one table and one set of curves of runs of the same sequence,
each method named by its label (a run stopped before its end: up to its last checkpoint).

The sequence runs on the scale testbed ``testbed-llama-scale2`` with its hparams; ``--set key=value`` overrides a
key of hparams/ECE/testbed-llama-scale2.yaml (YAML value syntax), the variants' keys included (e.g.
``--set prompt_keys_weight=1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import ece_plugin.lab.study.lifelong as lifelong  # noqa: E402
from ece_plugin.lab.cli import main  # noqa: E402
from ece_plugin.lab.study.baselines import default_baseline_hparams  # noqa: E402
from ece_plugin.method.hparams import ECEHyperParams  # noqa: E402

TESTBEDS = ("testbed-llama-scale2",)  # the scale testbeds: each trained the CounterFact and zsRE records used here


def testbed_paths(name: str) -> tuple[Path, Path]:
    """The model folder of a scale testbed and the ECE hparams ``lifelong --model`` picks for it."""
    if name not in TESTBEDS:
        raise SystemExit(f"--testbed {name!r}: one of {', '.join(TESTBEDS)}")
    model = REPO / "testbed" / name
    return model, default_baseline_hparams(REPO / "hparams", "ECE", model)


LOAD_START = 2200  # counterfact-edit.json records from here on were never trained
PRE_EDIT_CHECKS = range(5000, 5200)  # counterfact-edit.json records the pre-edit checks read: never edited here
CORPUS = range(7000, 9200)  # counterfact-edit.json records the statistics corpus describes: drawn last
N_REPORTED = 2000  # counterfact-edit.json records 0-1999: the reported 2,000-edit tables
BATCH = 100


def counterfact(split: str) -> list[dict[str, Any]]:
    """The bundled ``counterfact-<split>.json`` (``edit`` or ``val``)."""
    return json.loads((REPO / "data" / "counterfact" / f"counterfact-{split}.json").read_text())


def validation_records() -> list[dict[str, Any]]:
    return counterfact("val")[:200] + counterfact("edit")[N_REPORTED:LOAD_START]


def reported_records() -> list[dict[str, Any]]:
    return counterfact("edit")[:N_REPORTED]


def never_trained_pool() -> list[dict[str, Any]]:
    """Every CounterFact record the scale testbeds never trained, in the order load edits draw them:
    counterfact-edit.json records 2200 on (skipping the pre-edit checks' 5000-5199 and, until the end, the
    corpus' 7000-9199), counterfact-val.json records 200 on, then counterfact-edit.json 7000-9199. 9,319 records;
    the first 2,800 are records 2200-4999, the sequences measured before this order existed."""
    edit, val = counterfact("edit"), counterfact("val")
    first = [r for i, r in enumerate(edit) if i >= LOAD_START and i not in PRE_EDIT_CHECKS and i not in CORPUS]
    return first + val[200:] + [edit[i] for i in CORPUS]


def load_records(n_load: int) -> list[dict[str, Any]]:
    """The first ``n_load`` never-trained records, skipping one whose rewrite prompt (with its subject) is already in
    its batch of 100: counterfact-edit.json holds a few such pairs with different targets (records 2581, 2805, 3044,
    3558 repeat earlier ones), which ECE refuses in one batch. Pairs in different batches are kept, so the
    sequence up to ``--load 800`` is records 2200 on, unchanged."""
    records = never_trained_pool()
    kept: list[dict[str, Any]] = []
    in_batch: set[tuple[str, str]] = set()
    for r in records:
        if len(kept) == n_load:
            break
        if len(kept) % BATCH == 0:
            in_batch = set()
        key = (r["prompt"], r["subject"])
        if key not in in_batch:
            in_batch.add(key)
            kept.append(r)
    return kept


def interleaved(val: list[dict[str, Any]], n_load: int) -> tuple[list[dict[str, Any]], set[int]]:
    """The validation batches spread evenly among ``n_load`` load edits; returns the sequence and the positions
    in it of the validation records."""
    if n_load % BATCH:
        raise SystemExit(f"--load must be a multiple of {BATCH}, got {n_load}")
    load = load_records(n_load)
    if len(load) < n_load:
        raise SystemExit(f"--load {n_load}: only {len(load)} never-trained records")
    n_val, n_batches = len(val) // BATCH, (len(val) + n_load) // BATCH
    val_at = {round(i * (n_batches - 1) / max(n_val - 1, 1)) for i in range(n_val)}
    seq: list[dict[str, Any]] = []
    positions: set[int] = set()
    v = w = 0
    for b in range(n_batches):
        if b in val_at:
            positions.update(range(len(seq), len(seq) + BATCH))
            seq += val[v : v + BATCH]
            v += BATCH
        else:
            seq += load[w : w + BATCH]
            w += BATCH
    return seq, positions


PRE_EDIT_KEYS = ("edits", "retention")  # the unedited model's scores: equal exactly for the same sequence


def _run_doc(label: str, folder: Path) -> dict[str, Any]:
    """A run's ``lifelong.json``; for a run stopped before its end, its pre-edit row and its one method's rows up to
    the last checkpoint (``config`` None)."""
    path = folder / "lifelong.json"
    if path.is_file():
        doc = json.loads(path.read_text())
        if len(doc["methods"]) != 1:
            raise SystemExit(f"--merge {label}={folder}: {len(doc['methods'])} methods, expected 1")
        return doc
    progress = sorted((folder / "checkpoints").glob("*.progress.json"))
    if not (folder / "pre_edit.json").is_file() or len(progress) != 1:
        raise SystemExit(f"--merge {label}={folder}: no lifelong.json, nor the pre-edit row and one method's progress")
    method = json.loads(progress[0].read_text())
    return {"config": None, "pre_edit": json.loads((folder / "pre_edit.json").read_text()), "methods": [method]}


def merge(out: Path, runs: list[tuple[str, Path]]) -> dict[str, Path]:
    """One table and one set of curves (``lifelong.md`` / ``.json`` / ``.png`` in ``out``) from runs of the same
    sequence, one method each, named by its label: this script's runs all name their method alike (``--set``
    changes the hparams, not the name). The first run must be finished; a later one may have been stopped before
    its end (its rows up to its last checkpoint; ``meta.stopped_at``). Runs measured at other checkpoints merge;
    each curve has its own points."""
    docs = [_run_doc(label, folder) for label, folder in runs]
    first = docs[0]
    if first["config"] is None:
        raise SystemExit(f"--merge: the first run ({runs[0][1]}) must be a finished one")
    def sequence(config: Any) -> Any:  # what makes two runs one sequence: not where they were measured
        return None if config is None else {k: v for k, v in config.items() if k != "checkpoint_every"}

    for (label, folder), doc in zip(runs, docs):
        same = sequence(doc["config"]) in (None, sequence(first["config"])) and all(
            doc["pre_edit"].get(k) == first["pre_edit"].get(k) for k in PRE_EDIT_KEYS
        )
        if not same:
            raise SystemExit(f"--merge {label}={folder}: another sequence than {runs[0][1]} (config or pre-edit differ)")
    methods = [
        dataclasses.replace(lifelong.MethodProgress(**doc["methods"][0]), method=label)
        for (label, _), doc in zip(runs, docs)
    ]
    stopped = {label: doc["methods"][0]["n_done"] for (label, _), doc in zip(runs, docs) if doc["config"] is None}
    meta = {**first["meta"], "merged_from": {label: str(folder) for label, folder in runs}, "stopped_at": stopped}
    result = lifelong.LifelongResult(
        config=lifelong.LifelongConfig(**first["config"]), kind=first["kind"],
        pre={k: v for k, v in first["pre_edit"].items() if k != "cases"}, methods=methods, meta=meta,
    )
    out.mkdir(parents=True, exist_ok=True)
    return lifelong.write_outputs(result, out)


def _label_dir(item: str) -> tuple[str, Path]:
    label, sep, folder = item.rpartition("=")  # a label may hold "=" (an hparams override), a folder rarely
    if not sep or not label or not folder:
        raise SystemExit(f"--merge {item!r}: expected LABEL=RUN_FOLDER")
    return label, Path(folder)


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="hparams override")
    p.add_argument("--method", default="ECE-AS")
    p.add_argument("--load", type=int, default=0, metavar="N", help="never-trained load edits interleaved")
    p.add_argument("--testbed", default=TESTBEDS[0], help=f"one of {', '.join(TESTBEDS)} (default %(default)s)")
    p.add_argument("--reported", action="store_true", help="measure the reported records 0-1999 among the load edits")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="K", help="measure every K edits")
    p.add_argument("--n-validation", type=int, default=400, metavar="N",
                   help="the first N of the 400 validation records (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=BATCH,
                   help=f"edits per batch (default %(default)s; {BATCH} with --load)")
    p.add_argument("--hparams", default=None, metavar="YAML",
                   help="ECE hparams file instead of the testbed's (e.g. its -sequential.yaml); --set applies on top")
    p.add_argument("--out", required=True)
    p.add_argument("--merge", action="append", default=[], metavar="LABEL=RUN_FOLDER",
                   help="write one table and curve of runs of one sequence to --out (runs nothing)")
    args = p.parse_args(argv)
    if args.reported and not args.load and not args.merge:
        p.error("--reported needs --load N (without load edits it is `ece-plugin lifelong` on the reported records)")
    if args.merge:
        paths = merge(Path(args.out), [_label_dir(item) for item in args.merge])
        sys.stdout.write(paths["md"].read_text())
        return 0
    if not 1 <= args.n_validation <= 400:
        p.error(f"--n-validation must be 1-400, got {args.n_validation}")
    if args.batch_size < 1 or (args.load and args.batch_size != BATCH):
        p.error(f"--batch-size must be >= 1 ({BATCH} with --load), got {args.batch_size}")
    model, hparams_path = testbed_paths(args.testbed)
    if args.hparams:
        hparams_path = Path(args.hparams)
        if not hparams_path.is_file():
            p.error(f"--hparams {args.hparams}: no such file")
    hparams = yaml.safe_load(hparams_path.read_text())
    known = {f.name for f in dataclasses.fields(ECEHyperParams)}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in known:
            p.error(f"--set {item}: {key!r} is not an ECE hyperparameter")
        hparams[key] = yaml.safe_load(value)
    records = reported_records() if args.reported else validation_records()[: args.n_validation]
    positions: set[int] = set()
    if args.load:
        records, positions = interleaved(records, args.load)
    with tempfile.TemporaryDirectory() as tmp:
        data, hp, kept = Path(tmp) / "sequence.json", Path(tmp) / "hparams.yaml", Path(tmp) / "retention.json"
        data.write_text(json.dumps(records))
        only: list[str] = []
        if positions:  # the validation (or reported) edits among the load edits
            measured = Path(tmp) / "measured.json"
            measured.write_text(json.dumps(sorted(positions)))
            only = ["--measure-only", str(measured)]
        hp.write_text(yaml.safe_dump(hparams))
        if args.reported:  # as the 2,000-edit tables: the 200 known records after the reported ones
            kept.write_text(json.dumps(counterfact("edit")[N_REPORTED:LOAD_START]))
            retention = ["--retention-data", str(kept), "--n-retention", "200"]
        else:
            retention = ["--retention-data", str(REPO / "data" / "zsre" / "zsre_mend_eval.json"), "--n-retention", "100"]
        every = ["--checkpoint-every", str(args.checkpoint_every)] if args.checkpoint_every else []
        return main([
            "lifelong", "--model", str(model), "--device", "cpu", "--threads", "1", "--data", str(data),
            "--n-edits", str(len(records)), "--batch-size", str(args.batch_size), *retention, "--hparams", str(hp),
            "--methods", args.method, "--out", args.out, *every, *only,
        ])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
