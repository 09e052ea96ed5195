"""An EasyEdit baseline on the scale testbed's validation sequence, with an hparams file of one's choice.

The sequence is ``benchmarks/lifelong_validation.py``'s: counterfact-val.json records 0-199, then
counterfact-edit.json records 2000-2199 (no reported table edits them), in sequential batches of 100, scored by
``ece-plugin lifelong`` both ways (immediate and after all); retention on zsRE records 0-99. The baseline's
hyperparameters come from ``--hparams`` (e.g. a copy of hparams/ULTRAEDIT/testbed-llama-scale2.yaml with another
``lr``), so values can be compared on validation records only.

    python benchmarks/baselines_validation.py --method ULTRAEDIT --hparams my-ultraedit.yaml --out runs/val-ultra
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import lifelong_validation  # noqa: E402

from ece_plugin.lab.cli import main as cli_main  # noqa: E402
from ece_plugin.lab.study.baselines import BASELINE_ALIASES, BASELINES  # noqa: E402


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help=f"one of {', '.join([*BASELINES, *BASELINE_ALIASES])}")
    p.add_argument("--hparams", required=True, metavar="YAML", help="the baseline's EasyEdit hparams file")
    p.add_argument("--n-validation", type=int, default=400, metavar="N", help="the first N of the 400 records")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    alg = BASELINE_ALIASES[args.method][0] if args.method in BASELINE_ALIASES else args.method
    if alg not in BASELINES:
        p.error(f"--method {args.method!r}: one of {', '.join([*BASELINES, *BASELINE_ALIASES])}")
    if not Path(args.hparams).is_file():
        p.error(f"--hparams {args.hparams}: no such file")
    if not 1 <= args.n_validation <= 400:
        p.error(f"--n-validation must be 1-400, got {args.n_validation}")
    records = lifelong_validation.validation_records()[: args.n_validation]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "sequence.json"
        data.write_text(json.dumps(records))
        return cli_main([
            "lifelong", "--model", str(REPO / "testbed" / "testbed-llama-scale2"), "--device", "cpu", "--threads", "1",
            "--data", str(data), "--n-edits", str(len(records)), "--batch-size", str(args.batch_size),
            "--retention-data", str(REPO / "data" / "zsre" / "zsre_mend_eval.json"), "--n-retention", "100",
            "--methods", args.method, f"--{alg.lower()}-hparams", args.hparams, "--out", args.out,
        ])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
