"""Does the carried state slow later batches? ECE's edit time over a whole sequence against its first batch's.

ECE edits ``--n-edits`` records in sequential batches of ``--batch-size`` on one model, nothing scored in between,
and each batch's wall time, its stage times (the trace's ``timings``) and the z steps its edits took are recorded.
It prints, over the whole sequence of k batches with total edit time T and first-batch time t1:

* ``T / (k t1)``: the check of issue 33 (at most 1.3 over 2,000 edits in batches of 100);
* the same with t1 less the first batch's one-off costs (reading the statistics, generating the context
  templates), which later batches do not pay: the stricter reading;
* ``seconds per z step`` of the last batches over the first: how much of any rise is harder z (more steps, which
  the edits' targets ask for) rather than the carried state itself.

    python benchmarks/sequence_time.py --model testbed/testbed-llama-scale2 --n-edits 2000 --batch-size 100 \\
        --out results/sequence-time

The hparams default to the model's ``hparams/ECE/<model>-sequential.yaml`` (the recommended setting) where it
exists. Run it alone on an idle core (``--threads 1``): a process sharing its core measures its neighbours too.
Writes ``sequence_time.json``, ``sequence_time.csv`` (one row per batch), ``sequence_time.png`` and ``rows.csv`` (the
summary as one row, for a results table) into ``--out`` (refused when they exist, unless ``--force``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tqdm import tqdm  # noqa: E402

from ece_plugin.evaluation.data import load_records  # noqa: E402
from ece_plugin.lab.cli.common import hparams_file  # noqa: E402
from ece_plugin.lab.study.common import (  # noqa: E402
    load_model_and_tokenizer,
    savefig,
    set_threads,
    write_csv,
    write_json,
)
from ece_plugin.lab.study.diagnostics import z_steps  # noqa: E402
from ece_plugin.method.editor import edit_model  # noqa: E402
from ece_plugin.method.hparams import ECEHyperParams  # noqa: E402
from ece_plugin.method.state import get_session  # noqa: E402

logger = logging.getLogger("sequence_time")

ONE_OFF = ("statistics", "context_templates")  # stages the first batch pays for the whole session
OUTPUTS = ("sequence_time.json", "sequence_time.csv", "sequence_time.png", "rows.csv")


def run(model: Any, tok: Any, requests: list[dict[str, Any]], hp: ECEHyperParams, batch_size: int,
        progress: bool = True) -> list[dict[str, Any]]:
    """Edit ``requests`` in sequential batches; one row per batch: seconds, stage seconds, z steps."""
    session = get_session(model, hp)
    rows: list[dict[str, Any]] = []
    starts = range(0, len(requests), batch_size)
    for b, start in enumerate(tqdm(starts, desc="ECE sequence", unit="batch", disable=not progress)):
        t0 = time.perf_counter()
        trace = edit_model(model, tok, requests[start : start + batch_size], hp, session)
        seconds = time.perf_counter() - t0
        steps = z_steps([trace.z])
        rows.append({"batch": b + 1, "edits_done": start + len(requests[start : start + batch_size]),
                     "seconds": seconds, "z_steps_mean": steps["z_steps_mean"],
                     **{f"stage_{k}": v for k, v in trace.timings.items() if k != "total"}})
    return rows


def summarize(rows: list[dict[str, Any]], tail: int = 5) -> dict[str, Optional[float]]:
    """The ratios this benchmark prints (see the module docstring); ``tail``: batches compared with the first."""
    k = len(rows)
    total = sum(r["seconds"] for r in rows)
    t1 = rows[0]["seconds"]
    one_off = sum(float(rows[0].get(f"stage_{s}") or 0.0) for s in ONE_OFF)
    last = rows[-min(tail, k):]

    def per_step(rs: list[dict[str, Any]]) -> Optional[float]:
        steps = [r["z_steps_mean"] for r in rs]
        if any(s in (None, 0) for s in steps):
            return None
        return sum(float(r.get("stage_z") or 0.0) for r in rs) / sum(float(s) for s in steps)

    first_step, last_step = per_step(rows[:1]), per_step(last)
    return {
        "batches": float(k),
        "total_seconds": total,
        "first_batch_seconds": t1,
        "first_batch_one_off_seconds": one_off,
        "time_vs_first": total / (k * t1),
        "time_vs_first_without_one_off": total / (k * (t1 - one_off)) if t1 > one_off else None,
        "last_batches_vs_first": sum(r["seconds"] for r in last) / (len(last) * t1),
        "z_steps_first": rows[0]["z_steps_mean"],
        "z_steps_last_batches": (sum(float(r["z_steps_mean"]) for r in last) / len(last)
                                 if all(r["z_steps_mean"] is not None for r in last) else None),
        "z_seconds_per_step_last_vs_first": last_step / first_step if first_step and last_step else None,
    }


def draw(rows: list[dict[str, Any]], summary: dict[str, Optional[float]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["edits_done"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax.plot(xs, [r["seconds"] for r in rows], "o-", ms=3, label="edit time of the batch")
    ax.plot(xs, [float(r.get("stage_z") or 0.0) for r in rows], "s-", ms=3, label="of which z")
    ax.axhline(rows[0]["seconds"], color="gray", ls=":", label="first batch")
    ax.axhline(1.3 * rows[0]["seconds"], color="red", ls=":", label="1.3 x first batch")
    ax.set_xlabel("edits")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    running = [sum(r["seconds"] for r in rows[: i + 1]) / ((i + 1) * rows[0]["seconds"]) for i in range(len(rows))]
    bx.plot(xs, running, "o-", ms=3, label="T / (k t1) so far")
    bx.plot(xs, [float(r["z_steps_mean"] or 0.0) / float(rows[0]["z_steps_mean"] or 1.0) for r in rows], "s-",
            ms=3, label="z steps per edit / first batch's")
    bx.axhline(1.3, color="red", ls=":", label="1.3")
    bx.set_xlabel("edits")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    fig.suptitle(f"{title}: T / (k t1) = {summary['time_vs_first']:.2f}", fontsize=10)
    fig.tight_layout()
    return savefig(fig, out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=REPO / "testbed" / "testbed-llama-scale2")
    p.add_argument("--hparams", help="ECE hparams file (default: the model's -sequential.yaml, else its own)")
    p.add_argument("--data", type=Path, default=REPO / "data" / "counterfact" / "counterfact-edit.json")
    p.add_argument("--n-edits", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--force", action="store_true", help="write over this benchmark's files in --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.n_edits < 1 or args.batch_size < 1:
        raise SystemExit("--n-edits and --batch-size must be positive")
    taken = [name for name in OUTPUTS if (args.out / name).exists()]
    if taken and not args.force:
        raise SystemExit(f"{args.out}: already holds {', '.join(taken)}; --force writes over them")
    path = hparams_file(args.hparams, REPO / "hparams", "ECE", args.model, sequential=True)
    hp = ECEHyperParams.from_hparams(str(path))
    hp.device = args.device
    records = load_records(args.data, limit=args.n_edits)
    if len(records) < args.n_edits:
        raise SystemExit(f"{args.data}: {len(records)} records, fewer than --n-edits {args.n_edits}")
    set_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.model, device=args.device)
    rows = run(model, tok, [r.to_request() for r in records], hp, args.batch_size, not args.no_progress)
    summary = summarize(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/sequence_time.py " + " ".join(argv)
    write_json(args.out / OUTPUTS[0], {"command": command, "hparams": str(path), "threads": args.threads,
                                       "summary": summary, "batches": rows})
    write_csv(args.out / OUTPUTS[1], rows)
    draw(rows, summary, args.out / OUTPUTS[2], f"{args.model.name}, {args.n_edits} edits / {args.batch_size}")
    write_csv(args.out / OUTPUTS[3], [{"model": args.model.name, "hparams": path.name, "n_edits": args.n_edits,
                                       "batch_size": args.batch_size, "threads": args.threads,
                                       **{k: "" if v is None else round(v, 3) for k, v in summary.items()}}])
    for key, value in summary.items():
        logger.info("%-36s %s", key, "n/a" if value is None else f"{value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
