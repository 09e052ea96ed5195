"""``ece-plugin lifelong --resume``: a checkpoint knows what it holds, every interrupt point resumes to the same
rows and bit-identical weights, and a resume refuses changed options or hparams unless ``--force``.

Runs on the tiny world of test_cli_world (4 edits in batches of 2, a checkpoint after each batch).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli_world import World, make_world

import ece_plugin.lab.study.checkpoint as checkpoint
from ece_plugin.lab.cli import main
from ece_plugin.lab.study.lifelong import CONFIG_FILE, RunFolder
from ece_plugin.method import atomic


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return make_world(tmp_path_factory.mktemp("resume-world"))


def _argv(world: World, out: Path, hparams: Path | None = None) -> list[str]:
    return ["--log-level", "WARNING", "lifelong", "--model", str(world.model_dir), "--hparams",
            str(hparams or world.hparams), "--hparams-dir", str(world.root / "hparams"), "--data", str(world.data),
            "--device", "cpu", "--n-edits", "4", "--batch-size", "2", "--checkpoint-every", "2", "--methods", "ECE-AS",
            "--n-retention", "2", "--ppl-text", str(world.corpus), "--ppl-tokens", "64", "--n-fluency-prompts", "1",
            "--out", str(out), "--keep-checkpoints"]


def _resume(out: Path, *extra: str) -> int:
    return main(["--log-level", "WARNING", "lifelong", "--resume", str(out), *extra])


def _rows(out: Path) -> list[dict[str, Any]]:
    data = json.loads((out / "lifelong.json").read_text())
    rows = [row for m in data["methods"] for row in m["rows"]]
    for row in rows:
        row.pop("seconds_per_batch")
    return rows


def _checkpoint_tensors(out: Path) -> dict[str, torch.Tensor]:
    folder = RunFolder(out).checkpoint_dir("ECE-AS")
    tensors = dict(load_file(str(folder / checkpoint.WEIGHTS)))
    tensors.update({f"state/{k}": v for k, v in load_file(str(folder / checkpoint.STATE)).items()})
    return tensors


def _litter(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def whole(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(_argv(world, out)) == 0
    manifest = json.loads((RunFolder(out).checkpoint_dir("ECE-AS") / checkpoint.MANIFEST).read_text())
    assert manifest["n_edits"] == 4 and manifest["progress"]["n_done"] == 4
    assert set(manifest["files"]) == {checkpoint.WEIGHTS, checkpoint.STATE, checkpoint.TEMPLATES}
    return out


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _on_second(real: Any, then: Any) -> Any:
    """A stand-in that calls ``real`` the first time and ``then`` (with the same arguments) the second."""
    calls = {"n": 0}

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return real(*args, **kwargs) if calls["n"] != 2 else then(*args, **kwargs)

    return wrapped


def _interrupt(*_a: Any, **_k: Any) -> Any:
    raise KeyboardInterrupt


INTERRUPTS = ["in a batch", "writing the checkpoint", "swap, in the process", "swap, killed between the renames",
              "after the swap, before the old folder went", "after the checkpoint, before the progress file"]


@pytest.mark.parametrize("point", INTERRUPTS)
def test_every_interrupt_point_resumes_to_the_same_rows_and_weights(
    world: World, whole: Path, tmp_path: Path, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ece_plugin.lab.study.baselines import ECEMethod

    cut = tmp_path / "cut"
    ckpt = RunFolder(cut).checkpoint_dir("ECE-AS")
    dead = _dead_pid()
    with monkeypatch.context() as m:
        if point == "in a batch":
            m.setattr(ECEMethod, "edit_batch", _on_second(ECEMethod.edit_batch, _interrupt))
        elif point == "writing the checkpoint":
            m.setattr(checkpoint, "_write_method_files", _on_second(checkpoint._write_method_files, _interrupt))
        elif point == "swap, in the process":
            real_replace, swaps = os.replace, {"n": 0}

            def replace(src: Any, dst: Any) -> None:
                if Path(dst) == ckpt.absolute() and ".new-" in str(src):
                    swaps["n"] += 1
                    if swaps["n"] == 2:  # the second checkpoint's swap: the first is already aside
                        raise KeyboardInterrupt
                real_replace(src, dst)

            m.setattr(atomic.os, "replace", replace)
        elif point == "swap, killed between the renames":
            def killed(new: Path, target: Path) -> None:  # the old folder aside, the new one not yet in place
                os.replace(target, target.parent / f".{target.name}.old-{dead}-k")
                os.replace(new, target.parent / f".{target.name}.new-{dead}-k")
                raise KeyboardInterrupt

            m.setattr(atomic, "swap_in", _on_second(atomic.swap_in, killed))
        elif point == "after the swap, before the old folder went":
            real_swap = atomic.swap_in

            def swapped_then_killed(new: Path, target: Path) -> None:
                real_swap(new, target)
                _leave_old(target, dead)
                raise KeyboardInterrupt

            m.setattr(atomic, "swap_in", _on_second(real_swap, swapped_then_killed))
        else:
            m.setattr(RunFolder, "save_progress", _on_second(RunFolder.save_progress, _interrupt))
        assert main(_argv(world, cut)) == 130
    if point == "after the checkpoint, before the progress file":
        progress = json.loads(RunFolder(cut).progress_path("ECE-AS").read_text())
        assert progress["n_done"] == 2  # the progress file lags: the checkpoint says 4
    if point == "swap, killed between the renames":
        assert not ckpt.exists() and len(_litter(cut)) == 2
    assert _resume(cut) == 0
    assert _rows(cut) == _rows(whole)
    a, b = _checkpoint_tensors(whole), _checkpoint_tensors(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _litter(cut) == []
    state = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    assert state["n_edits"] == 4


def _leave_old(target: Path, dead: int) -> None:
    """What a kill right after the swap leaves: the old folder, still beside the new one."""
    old = target.parent / f".{target.name}.old-{dead}-k"
    old.mkdir()
    (old / "weights.safetensors").write_bytes(b"old")


def _copy(whole: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    return run


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change", [["--n-edits", "6"], ["--methods", "MEMIT"], ["--seed", "3"]])
def test_resume_refuses_changed_options_unless_forced(
    whole: Path, tmp_path: Path, change: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(whole, tmp_path)
    before = _snapshot(run)
    assert _resume(run, *change) == 1
    err = capsys.readouterr().err
    assert f"--resume {run}: {change[0]} {change[1] if change[0] != '--methods' else [change[1]]} differs from the " \
           "run's" in err and "--force" in err and len(err.strip()) < 300
    assert _snapshot(run) == before


def test_resume_with_force_records_the_change(whole: Path, tmp_path: Path) -> None:
    run = _copy(whole, tmp_path)
    assert _resume(run, "--n-fluency-prompts", "0", "--force") == 0
    config = json.loads((run / CONFIG_FILE).read_text())
    assert config["n_fluency_prompts"] == 0
    assert config["_changes"][-1]["changed"] == {"n_fluency_prompts": {"run": 1, "now": 0}}


def test_resume_refuses_a_changed_hparams_file_unless_forced(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hparams = tmp_path / "ece.yaml"
    shutil.copy(world.hparams, hparams)
    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as m:
        from ece_plugin.lab.study.baselines import ECEMethod

        m.setattr(ECEMethod, "edit_batch", _on_second(ECEMethod.edit_batch, _interrupt))
        assert main(_argv(world, run, hparams)) == 130
    hparams.write_text(hparams.read_text().replace("v_lr: 0.5", "v_lr: 0.25"))
    before = _snapshot(run)
    assert _resume(run) == 1
    err = capsys.readouterr().err
    assert f"hparams file {hparams} changed since the run started" in err and "--force" in err
    assert _snapshot(run) == before
    assert _resume(run, "--force") == 0
    changes = json.loads((run / CONFIG_FILE).read_text())["_changes"][-1]["changed"]
    assert list(changes) == [f"hparams {hparams}"]


@pytest.mark.parametrize("damage", ["config not JSON", "config lacks a key", "pre_edit not JSON"])
def test_damaged_run_files_are_named(whole: Path, tmp_path: Path, damage: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(whole, tmp_path)
    config = run / CONFIG_FILE
    if damage == "config not JSON":
        config.write_text("{not json")
        expected = f"--resume: {config}: unreadable JSON"
    elif damage == "config lacks a key":
        data = json.loads(config.read_text())
        del data["batch_size"]
        config.write_text(json.dumps(data))
        expected = f"{config}: lacks the option(s) batch_size"
    else:
        (run / "pre_edit.json").write_text("[1, 2")
        expected = f"{run / 'pre_edit.json'}: unreadable JSON"
    before = _snapshot(run)
    assert _resume(run) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ece-plugin")]  # progress bars aside
    assert len(lines) == 1 and expected in lines[0] and len(lines[0]) < 300 and "Traceback" not in err
    assert _snapshot(run) == before


@pytest.mark.parametrize("damage", ["changed bytes", "NaN with a matching digest"])
def test_a_damaged_checkpoint_is_named_before_anything_runs(
    whole: Path, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(whole, tmp_path)
    folder = RunFolder(run).checkpoint_dir("ECE-AS")
    weights = folder / checkpoint.WEIGHTS
    tensors = dict(load_file(str(weights)))
    name = next(iter(tensors))
    tensors[name][0, 0] = float("nan") if damage.startswith("NaN") else tensors[name][0, 0] + 1
    save_file(tensors, str(weights))
    if damage.startswith("NaN"):
        manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
        manifest["files"][checkpoint.WEIGHTS] = checkpoint._sha256(weights)
        manifest["n_edits"] = manifest["progress"]["n_done"] = 2  # unfinished, so that resume loads it
        (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest))
        expected = f"{weights}: {name} holds 1 non-finite value(s)"
    else:
        manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
        manifest["n_edits"] = manifest["progress"]["n_done"] = 2
        (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest))
        expected = f"{weights}: changed since the checkpoint was written"
    before = _snapshot(run)
    assert _resume(run) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ece-plugin")]
    assert len(lines) == 1 and expected in lines[0] and len(lines[0]) < 300
    assert _snapshot(run) == before


def test_a_new_run_never_goes_on_in_an_old_run_folder(
    world: World, whole: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(whole, tmp_path)
    before = _snapshot(run)
    assert main([*_argv(world, run), "--force"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ece-plugin")]
    assert len(lines) == 1 and f"--out {run}: holds a lifelong run; continue it with --resume" in lines[0]
    assert _snapshot(run) == before


def test_a_run_folder_written_before_measure_only_existed_still_resumes(whole: Path, tmp_path: Path) -> None:
    run = _copy(whole, tmp_path)
    config = json.loads((run / CONFIG_FILE).read_text())
    assert config.pop("measure_only") is None
    (run / CONFIG_FILE).write_text(json.dumps(config))
    assert _resume(run) == 0


@pytest.mark.parametrize(("content", "message"), [
    ("[1, 0]", "increasing, distinct and within 0-3"),
    ("[4]", "within 0-3"),
    ("[2, 3]", "edited after the first checkpoint (2 edits)"),
    ("[]", "non-empty JSON list"),
    ('{"a": 1}', "non-empty JSON list"),
    ("[1,", "not JSON"),
])
def test_measure_only_positions_are_checked_before_anything_runs(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    positions = tmp_path / "measured.json"
    positions.write_text(content)
    out = tmp_path / "run"
    assert main(_argv(world, out) + ["--measure-only", str(positions)]) == 1
    err = capsys.readouterr().err.strip()
    assert f"--measure-only {positions}: " in err and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_measure_only_scores_the_named_positions(world: World, tmp_path: Path) -> None:
    positions = tmp_path / "measured.json"
    positions.write_text("[1, 3]")
    out = tmp_path / "run"
    assert main(_argv(world, out) + ["--measure-only", str(positions)]) == 0
    data = json.loads((out / "lifelong.json").read_text())
    rows = {row["n_edits"]: row for row in data["methods"][0]["rows"]}
    assert [rows[n]["edits"]["efficacy"]["n"] for n in (2, 4)] == [1, 2]  # the measured records edited so far
    assert [rows[n]["immediate"]["efficacy"]["n"] for n in (2, 4)] == [1, 2]
    assert data["pre_edit"]["edits"]["efficacy"]["n"] == 2
