"""Which of EasyEdit main's sequential editors run on a CPU through EasyEdit's own BaseEditor, and how fast.

Each method is built from ``hparams/<ALG>/<testbed>.yaml`` with EasyEdit's own hparams class and edits the scale
testbed through ``BaseEditor`` -- ``batch_edit(..., sequential_edit=True)`` for the methods EasyEdit lists as
batchable, ``edit(..., sequential_edit=True)`` (one request per call) for the others -- for ``--batches``
sequential batches of ``--n`` validation records (counterfact-val.json, which no reported table edits). Written
per method: whether it ran, the seconds of EasyEdit's apply function per batch (BaseEditor's own evaluation before
and after left out) and that time scaled to a batch of 100, BaseEditor's own rewrite accuracy before and after
each batch, the parameters that changed, and, where it failed, the exception and the EasyEdit file:line it was
raised at. Every method runs in its own process (EasyEdit keeps state in module globals).

    python benchmarks/baselines_probe.py --methods ULTRAEDIT SPHERE EMMET PMET WISE GRACE --out results/baselines-probe

WISE needs ``loc_prompts`` (inputs its router must leave to the main memory); they are the batch's neighbourhood
prompts with their answers here, as WISE's own scripts pass zsRE's locality questions.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

logger = logging.getLogger("baselines_probe")
FIELDS = ("method", "call", "runs_on_cpu", "n_per_batch", "batches", "apply_seconds", "seconds_per_100",
          "rewrite_acc_pre", "rewrite_acc_post", "changed_parameters", "error", "raised_at")


def _raised_at(exc: BaseException) -> str:
    """The innermost frame of ``exc``'s traceback inside easyeditor (file relative to the package, line)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "easyeditor" in f.filename]
    if not frames:
        return ""
    frame = frames[-1]
    return f"{frame.filename.split('easyeditor/', 1)[-1]}:{frame.lineno}"


def _acc(value: Any) -> float:
    return float(value[0] if isinstance(value, list) else value)


def _kwargs(alg: str, requests: list[dict[str, Any]]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "prompts": [r["prompt"] for r in requests], "target_new": [r["target_new"] for r in requests],
        "ground_truth": [r.get("ground_truth") for r in requests], "subject": [r["subject"] for r in requests],
        "rephrase_prompts": [r.get("rephrase_prompt") for r in requests],
    }
    if alg == "WISE":
        kwargs["loc_prompts"] = [f"{r['locality_prompt']} {r['locality_ground_truth']}" for r in requests]
    return kwargs


def probe(alg: str, testbed: str, n: int, batches: int, workdir: Path) -> dict[str, Any]:
    """Run ``alg`` through BaseEditor in this process; the row of the table."""
    import torch

    from ece_plugin import easyedit
    from ece_plugin.evaluation.data import load_records
    from ece_plugin.lab.study.baselines import EasyEditMethod, ensure_statistics
    from ece_plugin.lab.study.common import load_model_and_tokenizer

    row: dict[str, Any] = {"method": alg, "n_per_batch": n, "batches": 0, "runs_on_cpu": False, "error": "",
                           "raised_at": "", "call": ""}
    model, tok = load_model_and_tokenizer(REPO / "testbed" / testbed, device="cpu")
    requests = [r.to_request() for r in load_records(REPO / "data" / "counterfact" / "counterfact-val.json",
                                                     limit=n * batches)]
    method = EasyEditMethod(alg, REPO / "hparams" / alg / f"{testbed}.yaml", via="BaseEditor")
    hparams = method.load(model)
    if hasattr(hparams, "stats_dir"):
        hparams.stats_dir = str(REPO / "data" / "stats")
    if getattr(hparams, "mom2_adjustment", False) or alg in easyedit.NULL_SPACE_BASELINES:
        ensure_statistics(model, tok, hparams, progress=False)
    if alg in easyedit.NULL_SPACE_BASELINES:
        method._prepare_alphaedit_projection(model, tok, hparams)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    os.chdir(workdir)  # BaseEditor writes logs/ (and, unasked, other files) into the working directory
    editor = easyedit.base_editor(hparams, model, tok)
    apply, seconds = editor.apply_algo, []

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = apply(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return out

    editor.apply_algo = timed
    batchable = easyedit.baseline_batchable(alg)
    row["call"] = "BaseEditor.batch_edit" if batchable else "BaseEditor.edit"
    pre, post, per_batch = [], [], []
    try:
        for b in range(batches):
            chunk = requests[b * n : (b + 1) * n]
            done = len(seconds)
            if batchable:
                editor.hparams.batch_size = len(chunk)
                if alg == "ULTRAEDIT":
                    method._fit_ultraedit_sub_batch(editor.hparams, len(chunk))
                metrics, _, _ = editor.batch_edit(**_kwargs(alg, chunk), sequential_edit=True, verbose=False)
            else:
                if hasattr(editor.hparams, "batch_size"):
                    editor.hparams.batch_size = 1
                metrics, _, _ = editor.edit(**_kwargs(alg, chunk), sequential_edit=True, verbose=False)
            per_batch.append(sum(seconds[done:]))
            pre += [_acc(m["pre"]["rewrite_acc"]) for m in metrics]
            post += [_acc(m["post"]["rewrite_acc"]) for m in metrics]
            row["batches"] = b + 1
        row["runs_on_cpu"] = True
    except Exception as exc:  # noqa: BLE001 - the row records why the method did not run
        row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        row["raised_at"] = _raised_at(exc)
    row["apply_seconds"] = [round(s, 2) for s in per_batch]
    row["seconds_per_100"] = round(100 * sum(per_batch) / (n * len(per_batch)), 1) if per_batch else None
    row["rewrite_acc_pre"] = round(sum(pre) / len(pre), 3) if pre else None
    row["rewrite_acc_post"] = round(sum(post) / len(post), 3) if post else None
    state = model.state_dict()
    row["changed_parameters"] = sorted(k for k, v in state.items() if k not in before or not torch.equal(v, before[k]))
    return row


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["ULTRAEDIT", "SPHERE", "EMMET", "PMET", "WISE", "GRACE"])
    p.add_argument("--testbed", default="testbed-llama-scale2")
    p.add_argument("--n", type=int, default=10, help="requests per batch (default %(default)s)")
    p.add_argument("--batches", type=int, default=2, help="sequential batches (default %(default)s)")
    p.add_argument("--out", required=True)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: probe this method here and print its row
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            row = probe(args.one, args.testbed, args.n, args.batches, Path(tmp))
        sys.stdout.write("ROW " + json.dumps(row) + "\n")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for alg in args.methods:
        logger.info("probing %s", alg)
        cmd = [sys.executable, __file__, "--one", alg, "--testbed", args.testbed, "--n", str(args.n),
               "--batches", str(args.batches), "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        found = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if found:
            rows.append(json.loads(found[-1]))
        else:
            tail = " ".join(done.stderr.split()[-40:])
            rows.append({"method": alg, "runs_on_cpu": False, "error": f"process failed (rc {done.returncode}): {tail}"})
        logger.info("%s: %s", alg, rows[-1])
    (out / "probe.json").write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]),
                                                "testbed": args.testbed, "rows": rows}, indent=1) + "\n")
    with open(out / "probe.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in row.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
