"""benchmarks/sequence_time.py: per-batch edit times of a sequence and the ratios it prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import FACTS, benchmark_module, fake_session, make_hparams, make_llama


def _requests() -> list[dict[str, Any]]:
    return [{"prompt": f["prompt"], "subject": f["subject"],
             "target_new": f["target_new"]["str"] if isinstance(f["target_new"], dict) else f["target_new"]}
            for f in FACTS]


def test_a_sequence_records_every_batch_its_time_stages_and_z_steps(tok: Any) -> None:
    st = benchmark_module("sequence_time")
    model = make_llama(len(tok))
    hp = make_hparams("llama", clustering=False, v_num_grad_steps=3)
    fake_session(model, hp)
    requests = _requests()
    rows = st.run(model, tok, requests, hp, batch_size=2, progress=False)
    assert [r["batch"] for r in rows] == list(range(1, (len(requests) + 1) // 2 + 1))
    assert rows[-1]["edits_done"] == len(requests)
    assert all(r["seconds"] > 0 and r["stage_z"] > 0 and 1 <= r["z_steps_mean"] <= 3 for r in rows)
    summary = st.summarize(rows)
    assert summary["batches"] == len(rows)
    assert summary["time_vs_first"] == pytest.approx(sum(r["seconds"] for r in rows) / (len(rows) * rows[0]["seconds"]))


def test_the_ratios_follow_their_definitions() -> None:
    st = benchmark_module("sequence_time")
    rows = [{"seconds": 10.0, "stage_statistics": 1.5, "stage_context_templates": 0.5, "stage_z": 6.0,
             "z_steps_mean": 30.0},
            {"seconds": 12.0, "stage_z": 8.0, "z_steps_mean": 40.0},
            {"seconds": 14.0, "stage_z": 8.0, "z_steps_mean": 40.0}]
    s = st.summarize(rows, tail=2)
    assert s["time_vs_first"] == pytest.approx(36 / 30)
    assert s["time_vs_first_without_one_off"] == pytest.approx(36 / 24)  # t1 less statistics and templates
    assert s["last_batches_vs_first"] == pytest.approx(13 / 10)
    assert s["z_steps_last_batches"] == 40.0
    assert s["z_seconds_per_step_last_vs_first"] == pytest.approx((16 / 80) / (6 / 30))  # the same per step


def test_existing_outputs_are_kept_without_force(tmp_path: Path) -> None:
    st = benchmark_module("sequence_time")
    (tmp_path / "sequence_time.csv").write_text("mine\n")
    with pytest.raises(SystemExit, match="--force"):
        st.main(["--out", str(tmp_path), "--n-edits", "2"])
    assert (tmp_path / "sequence_time.csv").read_text() == "mine\n"


def test_a_bad_sequence_size_is_refused(tmp_path: Path) -> None:
    st = benchmark_module("sequence_time")
    with pytest.raises(SystemExit, match="must be positive"):
        st.main(["--out", str(tmp_path), "--n-edits", "0"])
