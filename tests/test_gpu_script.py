"""benchmarks/gpu_run.py's dry run: every step of the GPU run, at tiny sizes on the CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from ece_plugin import easyedit as ee

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_run.py"


def _script() -> object:
    spec = importlib.util.spec_from_file_location("gpu_run", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_run"] = module
    spec.loader.exec_module(module)
    return module


def test_the_gpu_plan_is_llama3_8b_at_full_shape_with_the_shipped_hparams(tmp_path: Path) -> None:
    gpu_run = _script()
    plan = gpu_run.Plan(dry_run=False, n_edits=100, methods=gpu_run.METHODS, out=tmp_path, stats_samples=2000,
                        device="cuda:0")
    shape = plan.shape
    assert (shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]) == (4096, 14336, 32)
    assert (shape["num_key_value_heads"], shape["vocab_size"]) == (8, 128256) and plan.n_edits == 100
    assert str(plan.dtype) == "torch.bfloat16"
    configs = gpu_run.hparams_for(plan, n_devices=2, stats_dir=tmp_path / "stats")
    shipped = yaml.safe_load((REPO / "hparams" / "ECE" / "llama3-8b.yaml").read_text())
    for key in ("layers", "v_lr", "clamp_norm_factor", "v_weight_decay", "kl_factor", "mom2_update_weight"):
        assert configs["ECE"][key] == configs["MEMIT"][key] == configs["AlphaEdit"][key] == shipped[key], key
    assert configs["MEMIT"]["v_num_grad_steps"] == shipped["shared_grad_steps"] + shipped["per_edit_grad_steps"]
    assert all(c["model_parallel"] is True for c in configs.values())  # two devices: spread over them
    assert "tests/test_editor.py" in gpu_run.cuda_test_files()


@pytest.mark.slow
@pytest.mark.easyeditor
def test_dry_run_writes_every_step(tmp_path: Path) -> None:
    gpu_run = _script()
    out = tmp_path / "gpu"
    main_line = ee.easyedit_version() == ee.EASYEDIT_MAIN
    methods = ["ECE", "MEMIT", "AlphaEdit"] if main_line else ["ECE"]  # the PyPI easyeditor cannot run on a CPU
    rc = gpu_run.main(["--dry-run", "--out", str(out), "--methods", *methods])
    data = json.loads((out / "run.json").read_text())
    steps = data["steps"]
    assert rc == 0, json.dumps(steps)[-2000:]
    assert steps["cuda_tests"]["returncode"] == 0 and "collected" in steps["cuda_tests"]["summary"]
    assert (out / "cuda-tests.txt").is_file() and (out / "cuda-tests.xml").is_file()
    assert steps["model"]["model_parallel_note"].endswith("model_parallel not exercised")
    for name in methods:
        result = steps[name]
        assert result["available"] and result["weights_finite"] and result["n_edits"] == 4, result
        assert result["edit_seconds"] > 0 and result["edit_peak_gpu_mib"] is None  # no GPU: nothing to measure
        assert (out / f"hparams-{name}.yaml").is_file()
    assert not list(out.rglob("*.npz"))  # the statistics stay out of the results
    with pytest.raises(SystemExit, match="not empty"):
        gpu_run.main(["--dry-run", "--out", str(out)])
