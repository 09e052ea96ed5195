"""Sequential editing against the edited neurons per edit: the testbed's runs beside the paper's capacity (issue 15).

A sequence of n edits into the W_out of L layers of d_ff neurons leaves ``L * d_ff / n`` edited neurons per edit.
The paper's 2,000 edits have 16 of them on GPT-2 XL (layers 13-17 of 6,400) and 35.8 on Llama-3-8B (layers 4-8 of
14,336); the scale testbed's 2,000 edits have 5.1 (layers 0-3 of 2,560). Shrinking both the sequence and its batches
by the ratio of neurons (2,000 in batches of 100 -> 300 in batches of 15 for Llama-3-8B's ratio, 640 in batches of
32 for GPT-2 XL's) runs the paper's protocol at the paper's capacity on the testbed: the same 20 sequential writes,
the same share of a layer's neurons per batch.

This script reads ``lifelong`` run folders and places every checkpoint of every method at its neurons per edit,
against issue 15's targets (ES >= 95, PS >= 85, NS >= pre-edit - 5, perplexity <= 1.1 x pre-edit, each against the
run's own pre-edit row). Output: ``capacity.json``, ``capacity.csv``, ``capacity.md`` and ``capacity.png`` in ``--out``.

    python benchmarks/capacity.py --model testbed/testbed-llama-scale2 \
        --run "2,000 / 100=runs/lifelong-scale2-2000" --run "300 / 15=runs/cap300-b15" --out docs/capacity-scale2
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ece_plugin.lab.study.common import legend_entries, savefig, series_color, write_csv, write_json  # noqa: E402
from ece_plugin.lab.study.lifelong import flat_row  # noqa: E402
from ece_plugin.method import atomic  # noqa: E402

logger = logging.getLogger("capacity")

# The paper's models: d_ff of their MLPs (architecture constants) and ECE's edited layers (the shipped hparams).
PAPER_MODELS = {"GPT-2 XL": ("gpt2-xl.yaml", 6400), "GPT-J": ("gpt-j-6B.yaml", 16384), "Llama-3-8B": ("llama3-8b.yaml", 14336)}
PAPER_EDITS = 2000

X_TICKS = [5, 10, 20, 40, 80]
ES_MIN, PS_MIN, NS_DROP, PPL_RATIO = 0.95, 0.85, 0.05, 1.10  # issue 15, point 1


@dataclass
class Point:
    """One checkpoint of one method of one run."""

    run: str
    method: str
    batch_size: int
    n_edits: int
    neurons_per_edit: float
    efficacy: float
    efficacy_sem: float
    generalization: float
    generalization_sem: float
    specificity: float
    specificity_sem: float
    pre_specificity: float
    perplexity: Optional[float]
    pre_perplexity: Optional[float]

    def targets(self) -> dict[str, Optional[bool]]:
        """Issue 15's four targets at this checkpoint (None: perplexity not measured)."""
        ppl_ok = None
        if self.perplexity is not None and self.pre_perplexity is not None:
            ppl_ok = self.perplexity <= PPL_RATIO * self.pre_perplexity
        return {
            "ES": self.efficacy >= ES_MIN,
            "PS": self.generalization >= PS_MIN,
            "NS": self.specificity >= self.pre_specificity - NS_DROP,
            "PPL": ppl_ok,
        }


def edited_neurons(hparams_path: Path, d_ff: int) -> int:
    """Layers edited by the hparams file times ``d_ff``."""
    layers = yaml.safe_load(hparams_path.read_text())["layers"]
    return len(layers) * d_ff


def paper_ratios(hparams_dir: Path) -> dict[str, float]:
    """Edited neurons per edit of the paper's 2,000-edit runs, from the shipped hparams of each model."""
    return {
        name: edited_neurons(hparams_dir / "ECE" / fname, d_ff) / PAPER_EDITS
        for name, (fname, d_ff) in PAPER_MODELS.items()
        if (hparams_dir / "ECE" / fname).exists()
    }


def testbed_neurons(model: Path, hparams_dir: Path) -> int:
    """Edited neurons of a testbed folder: its config's ``intermediate_size`` (``n_inner`` for GPT-2) times the
    layers of its ECE hparams (every method edits the same layers on the testbeds)."""
    config = json.loads((model / "config.json").read_text())
    d_ff = config.get("intermediate_size") or config.get("n_inner") or 4 * config["n_embd"]
    hparams = hparams_dir / "ECE" / f"{model.name}.yaml"
    if not hparams.exists():
        raise SystemExit(f"no ECE hparams for {model.name} in {hparams_dir / 'ECE'}")
    return edited_neurons(hparams, int(d_ff))


def _perplexity(flat: dict[str, Any]) -> Optional[float]:
    """The first held-out perplexity of a ``flat_row`` (None when none was measured)."""
    return next((v for k, v in flat.items() if k.startswith("perplexity_") and v is not None), None)


def run_points(label: str, folder: Path, neurons: int) -> list[Point]:
    """Every checkpoint of every method in the ``lifelong.json`` of ``folder``."""
    path = folder / "lifelong.json"
    if not path.exists():
        raise SystemExit(f"--run {label}={folder}: no lifelong.json")
    data = json.loads(path.read_text())
    if data.get("kind") != "counterfact":
        raise SystemExit(f"--run {label}={folder}: a {data.get('kind')} run; the targets are CounterFact's")
    pre = flat_row("Pre-edited", data["pre_edit"], "counterfact")
    points = []
    for method in data["methods"]:
        for row in method["rows"]:
            f = flat_row(method["method"], row, "counterfact")
            n = int(f["n_edits"])
            points.append(
                Point(label, f["method"], int(data["config"]["batch_size"]), n, neurons / n,
                      f["efficacy"], f["efficacy_sem"] or 0.0, f["generalization"], f["generalization_sem"] or 0.0,
                      f["specificity"], f["specificity_sem"] or 0.0, pre["specificity"],
                      _perplexity(f), _perplexity(pre))
            )
    return points


def table(points: list[Point], ratios: dict[str, float]) -> str:
    refs = ", ".join(f"{name} {r:.1f}" for name, r in ratios.items())
    lines = [
        f"Edited neurons per edit and issue 15's targets (ES >= 95, PS >= 85, NS >= pre-edit - 5, perplexity <= 1.1 x "
        f"pre-edit; metrics in %, mean ± standard error). The paper's 2,000 edits: {refs} neurons per edit.",
        "",
        "| Run | Method | Batch | Edits | Neurons per edit | ES | PS | NS (pre-edit) | PPL (pre-edit) | Targets met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        met = p.targets()
        known = [k for k, v in met.items() if v is not None]
        passed = [k for k in known if met[k]]
        ppl = "n/a" if p.perplexity is None else f"{p.perplexity:.1f} ({p.pre_perplexity:.1f})"
        lines.append(
            f"| {p.run} | {p.method} | {p.batch_size} | {p.n_edits} | {p.neurons_per_edit:.1f} | {100 * p.efficacy:.1f} ± "
            f"{100 * p.efficacy_sem:.1f} | {100 * p.generalization:.1f} ± {100 * p.generalization_sem:.1f} | "
            f"{100 * p.specificity:.1f} ± {100 * p.specificity_sem:.1f} ({100 * p.pre_specificity:.1f}) | {ppl} | "
            f"{len(passed)} of {len(known)}" + (f": {', '.join(passed)}" if passed else "") + " |"
        )
    return "\n".join(lines) + "\n"


PANELS = [
    ("efficacy", "efficacy (%)", lambda p: 100 * p.efficacy, lambda p: 100 * ES_MIN),
    ("generalization", "generalization (%)", lambda p: 100 * p.generalization, lambda p: 100 * PS_MIN),
    ("specificity", "specificity minus pre-edit (points)", lambda p: 100 * (p.specificity - p.pre_specificity),
     lambda p: -100 * NS_DROP),
    ("perplexity", "perplexity / pre-edit", lambda p: p.perplexity / p.pre_perplexity if p.perplexity else math.nan,
     lambda p: PPL_RATIO),
]


def series_label(point: Point, points: list[Point]) -> str:
    """The run's label, with the method's name where the run holds more than one method."""
    methods = {p.method for p in points if p.run == point.run}
    return point.run if len(methods) == 1 else f"{point.run}: {point.method}"


def plot(points: list[Point], ratios: dict[str, float], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[Point]] = {}
    for p in points:
        series.setdefault(series_label(p, points), []).append(p)
    fig, axes = plt.subplots(2, 2, figsize=(10.0, 7.4), squeeze=False)
    for ax, (_key, label, value, target) in zip(axes.flat, PANELS):
        for i, (name, pts) in enumerate(series.items()):
            pts = sorted(pts, key=lambda p: p.neurons_per_edit)
            ax.plot([p.neurons_per_edit for p in pts], [value(p) for p in pts], marker="o", ms=4,
                    color=series_color(i), label=name)
        ax.axhline(target(points[0]), color="k", ls="--", lw=0.8, label="issue 15's target")
        for j, (name, r) in enumerate(ratios.items()):
            ax.axvline(r, color="0.5", ls=":", lw=0.8)
            ax.text(r, 0.02 + 0.1 * j, f" {name}", transform=ax.get_xaxis_transform(), fontsize=7, color="0.3")
        ax.set_xscale("log")
        ax.set_xticks(X_TICKS, [str(t) for t in X_TICKS])
        ax.minorticks_off()
        ax.set_xlabel("edited neurons per edit")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = legend_entries(list(axes.flat))
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.02 + 0.022 * math.ceil(len(labels) / 2), 1, 0.96))
    return savefig(fig, path)


def parse_run(text: str) -> tuple[str, Path]:
    label, sep, folder = text.rpartition("=")
    if not sep or not label or not folder:
        raise SystemExit(f"--run {text!r}: expected LABEL=FOLDER")
    return label, Path(folder)


def main(argv: Optional[list[str]] = None) -> dict[str, Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="the testbed folder the runs edited")
    ap.add_argument("--hparams-dir", type=Path, default=REPO / "hparams")
    ap.add_argument("--run", action="append", required=True, help="LABEL=FOLDER of a lifelong run (repeatable)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runs = [parse_run(r) for r in args.run]
    neurons = testbed_neurons(args.model, args.hparams_dir)
    points = [p for label, folder in runs for p in run_points(label, folder, neurons)]
    ratios = paper_ratios(args.hparams_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    md = table(points, ratios)
    out = {
        "json": write_json(args.out / "capacity.json", {
            "model": str(args.model), "edited_neurons": neurons, "paper_neurons_per_edit": ratios,
            "points": [dict(asdict(p), targets=p.targets()) for p in points],
        }),
        "csv": write_csv(args.out / "capacity.csv", [asdict(p) for p in points]),
        "md": args.out / "capacity.md",
        "png": plot(points, ratios, args.out / "capacity.png",
                    f"{args.model.name}: {neurons} edited neurons; sequential CounterFact edits by neurons per edit"),
    }
    atomic.write_text(out["md"], md)
    logger.info("\n%s", md)
    return out


if __name__ == "__main__":
    main()
