"""Curves of an experiment's checkpoints, read from ``results/<experiment>/checkpoints.csv``: ES / PS / NS (after
all solid, immediate dashed where the run scored it), held-out perplexity, retention and the largest weight growth
||W - W0|| / ||W0|| of the edited weights, against the number of edits, one line per run.

    python benchmarks/checkpoint_curves.py --experiment lifelong-10k --out curve-all.png

A run is the rows sharing ``--by`` (default ``label``); ``--where KEY=V1,V2`` keeps the rows whose KEY is one of
the values (repeatable). A panel whose quantity no run recorded says so instead of drawing an empty frame. Rows
without a ``protocol`` column are read as scored after all (the older experiments' form).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ece_plugin.lab.study.common import savefig  # noqa: E402

PANELS = [("efficacy", "ES (%)"), ("generalization", "PS (%)"), ("specificity", "NS (%)"),
          ("perplexity", "held-out perplexity"), ("retention_accuracy", "retention (%)"),
          ("weight_growth_max", "largest ||W - W0|| / ||W0||")]
PROTOCOLS = {"after_all": ("-", "after all"), "immediate": ("--", "immediate")}

Series = dict[tuple[str, str], list[tuple[int, dict[str, str]]]]


def read(path: Path, by: str, where: dict[str, set[str]]) -> Series:
    """(run, protocol) -> [(n_edits, row)] sorted by n_edits, for the rows that ``where`` keeps."""
    series: Series = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if any(row.get(key, "") not in values for key, values in where.items()):
                continue
            if row.get("method") == "Pre-edited" or not row.get("n_edits"):
                continue
            series[(row[by], row.get("protocol") or "after_all")].append((int(row["n_edits"]), row))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in series.items()}


def _value(row: dict[str, str], key: str) -> float | None:
    text = row.get(key, "")
    return float(text) if text not in ("", "None", "nan") else None


def draw(series: Series, out: Path, title: str, pre_edit_ppl: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(run for run, _ in series))
    colors = {run: f"C{i % 10}" for i, run in enumerate(runs)}
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for ax, (key, ylabel) in zip(axes.flat, PANELS):
        drawn = 0
        for (run, protocol), points in series.items():
            xy = [(n, v) for n, row in points if (v := _value(row, key)) is not None]
            if not xy:
                continue
            style, name = PROTOCOLS.get(protocol, (":", protocol))
            ax.plot([n for n, _ in xy], [v for _, v in xy], style, marker="o", ms=3, color=colors[run],
                    label=f"{run} ({name})" if key == "efficacy" else None)
            drawn += 1
        if key == "perplexity":
            ax.set_yscale("log")
            if pre_edit_ppl:
                ax.axhline(pre_edit_ppl, color="black", lw=0.8, ls=":", label="before editing")
                ax.legend(fontsize=7)
        if not drawn:
            ax.text(0.5, 0.5, "not recorded by these runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("edits")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.025 * ((len(labels) + 1) // 2), 1, 0.96))
    return savefig(fig, out)


def parse_where(pairs: list[str]) -> dict[str, set[str]]:
    where: dict[str, set[str]] = {}
    for pair in pairs:
        key, sep, values = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--where {pair!r}: expected KEY=V1,V2")
        where[key] = set(values.split(","))
    return where


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="folder under results/")
    p.add_argument("--out", required=True, help="figure file name, written into the experiment's folder")
    p.add_argument("--by", default="label", help="column naming a run (default label)")
    p.add_argument("--where", action="append", default=[], metavar="KEY=V1,V2")
    p.add_argument("--title", default="")
    p.add_argument("--pre-edit-ppl", type=float, default=None, help="draw the unedited model's perplexity")
    p.add_argument("--results", type=Path, default=REPO / "results")
    args = p.parse_args(argv)
    folder = args.results / args.experiment
    source = folder / "checkpoints.csv"
    if not source.is_file():
        raise SystemExit(f"{source}: no such file")
    series = read(source, args.by, parse_where(args.where))
    if not series:
        raise SystemExit(f"{source}: no checkpoint rows left after --where")
    out: Any = draw(series, folder / args.out, args.title or f"results/{args.experiment}", args.pre_edit_ppl)
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
