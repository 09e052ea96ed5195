"""The ablation as a figure: ES / PS / NS (after all, with standard errors; immediate as a hollow marker) and
perplexity of every setting at each sequence, read from ``results/ablation/rows.csv``.

    python benchmarks/ablation_figure.py            # writes results/ablation/ablation.png

It draws what the rows hold; a setting without a row at a sequence is left out of that panel.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ece_plugin.lab.study.common import savefig  # noqa: E402

ORDER = ["paper", "p1", "nocluster", "nocarry", "pk", "smallz", "recommended"]
SHORT = {"paper": "paper's form", "p1": "p 1", "nocluster": "no clusters", "nocarry": "no carried keys",
         "pk": "+ prompt keys", "smallz": "+ smaller z step", "recommended": "recommended"}
METRICS = [("efficacy", "ES"), ("generalization", "PS"), ("specificity", "NS")]
SEQUENCES = [("300 / 15", "counterfact", "300 CounterFact edits / 15 (0.03 of the edited neurons)"),
             ("2,000 / 100", "counterfact", "2,000 CounterFact edits / 100 (0.20)")]


def read(path: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    """(sequence, setting, protocol) -> row, for the ECE settings of the ablation."""
    with open(path, newline="") as f:
        return {(r["sequence"], r["setting"], r["protocol"]): r for r in csv.DictReader(f) if r["setting"] in ORDER}


def draw(rows: dict[tuple[str, str, str], dict[str, str]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(SEQUENCES), figsize=(6.5 * len(SEQUENCES), 7.5), squeeze=False)
    colors = {"efficacy": "#1f77b4", "generalization": "#ff7f0e", "specificity": "#2ca02c"}
    for col, (sequence, _, title) in enumerate(SEQUENCES):
        settings = [s for s in ORDER if (sequence, s, "after_all") in rows]
        xs = range(len(settings))
        ax = axes[0][col]
        for i, (key, name) in enumerate(METRICS):
            offset = (i - 1) * 0.25
            after = [rows[(sequence, s, "after_all")] for s in settings]
            ax.errorbar([x + offset for x in xs], [float(r[key]) for r in after],
                        yerr=[float(r[f"{key}_sem"] or 0) for r in after], fmt="o", color=colors[key],
                        label=f"{name} after all", capsize=2)
            now = [rows.get((sequence, s, "immediate")) for s in settings]
            ax.plot([x + offset for x, r in zip(xs, now) if r], [float(r[key]) for r in now if r], "o",
                    mfc="none", color=colors[key], label=f"{name} immediate")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(list(xs), [SHORT[s] for s in settings], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
        bx = axes[1][col]
        bx.bar(list(xs), [float(rows[(sequence, s, "after_all")]["perplexity"]) for s in settings], color="#7f7f7f")
        bx.set_xticks(list(xs), [SHORT[s] for s in settings], rotation=30, ha="right", fontsize=8)
        bx.set_ylabel("held-out perplexity after the sequence")
        bx.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle("One change at a time from ECE's paper's form (testbed-llama-scale2; after all: filled, immediate: "
                 "hollow)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return savefig(fig, out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=Path, default=REPO / "results" / "ablation" / "rows.csv")
    p.add_argument("--out", type=Path, default=REPO / "results" / "ablation" / "ablation.png")
    args = p.parse_args(argv)
    rows = read(args.rows)
    if not rows:
        raise SystemExit(f"{args.rows}: no ablation rows")
    out: Any = draw(rows, args.out)
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
