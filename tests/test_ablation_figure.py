"""benchmarks/ablation_figure.py: the ablation's rows as a figure."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import benchmark_module


def _rows(path: Path, settings: list[str]) -> Path:
    fields = ["setting", "sequence", "protocol", "perplexity"] + [
        f"{k}{s}" for k in ("efficacy", "generalization", "specificity") for s in ("", "_sem")]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for setting in settings:
            for protocol in ("after_all", "immediate"):
                writer.writerow({"setting": setting, "sequence": "300 / 15", "protocol": protocol, "perplexity": "250",
                                 "efficacy": "90", "efficacy_sem": "1", "generalization": "80",
                                 "generalization_sem": "1", "specificity": "85", "specificity_sem": "1"})
    return path


def test_the_figure_draws_the_settings_it_has_rows_for(tmp_path: Path) -> None:
    ab = benchmark_module("ablation_figure")
    rows = _rows(tmp_path / "rows.csv", ["paper", "recommended", "pre-edit"])
    assert set(ab.read(rows)) == {("300 / 15", s, p) for s in ("paper", "recommended")
                                  for p in ("after_all", "immediate")}  # the pre-edit row is no setting
    out = tmp_path / "ablation.png"
    assert ab.main(["--rows", str(rows), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_ablation_rows_is_an_error(tmp_path: Path) -> None:
    ab = benchmark_module("ablation_figure")
    with pytest.raises(SystemExit, match="no ablation rows"):
        ab.main(["--rows", str(_rows(tmp_path / "rows.csv", ["pre-edit"])), "--out", str(tmp_path / "x.png")])
