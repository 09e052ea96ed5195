"""Reliability, second round: no command destroys what a user had, an edit file is checked before it is written,
failure is loud, nonsense is refused where it is parsed.

Every case asserts the message and that the files (bytes) and tensors involved are as they were.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from test_cli_world import World, make_world

from ece_plugin.files.editfile import (
    EditFileError,
    apply_edit_file,
    build_edit_file,
    load_edit_file,
    revert_edit_file,
    save_edit_file,
)
from ece_plugin.files.outputs import Output, OutputError, check_outputs
from ece_plugin.lab.cli import main
from ece_plugin.lab.study.common import load_model_and_tokenizer
from ece_plugin.method import atomic

WEIGHT = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return make_world(tmp_path_factory.mktemp("files-world"))


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["--log-level", "WARNING", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err and len(lines[0]) < 300
    return lines[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusals come before any work: loading the model would fail the test."""
    def refuse(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the model was loaded although the command should have been refused first")

    monkeypatch.setattr("ece_plugin.lab.study.common.load_model_and_tokenizer", refuse)


def _edit_argv(world: World, tmp_path: Path, *extra: str) -> list[str]:
    return ["edit", "--model", str(world.model_dir), "--hparams", str(world.hparams), "--data", str(world.data),
            "--limit", "2", "--batch-size", "2", "--no-eval", "--device", "cpu", *extra]


# ---------------------------------------------------------------------------------- 1. outputs
def test_build_testbed_refuses_an_existing_folder_and_keeps_its_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "d-llama"
    target.mkdir()
    (target / "notes.txt").write_text("x")
    argv = ["build-testbed", "--output-dir", str(target), "--layers", "1", "--hidden", "32", "--mlp", "64",
            "--heads", "2", "--vocab-size", "300", "--steps", "1", "--n-records", "50", "--n-val-records", "0",
            "--n-zsre", "0", "--batch-size", "2"]
    rc, _, err = _run(capsys, *argv)
    assert rc == 1 and f"--output-dir {target}: exists and is not empty" in _line(err) and "--force" in err
    assert _files(target) == {"notes.txt": b"x"} and _tree(tmp_path) == ["d-llama", "d-llama/notes.txt"]
    file_target = tmp_path / "f-llama"
    file_target.write_text("mine")
    rc, _, err = _run(capsys, *[str(file_target) if a == str(target) else a for a in argv], "--force")
    assert rc == 1 and f"--output-dir {file_target}: is a file; give a folder path" in _line(err)
    assert file_target.read_text() == "mine" and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize(("option", "kind"), [("--save-edits", "file"), ("--out", "run"), ("--save-model", "folder")])
def test_outputs_inside_a_model_folder_are_refused(
    world: World, tmp_path: Path, option: str, kind: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = world.model_dir / ("model.safetensors" if kind == "file" else "sub") if kind != "run" else world.model_dir
    before = _files(world.model_dir)
    _no_model_load(monkeypatch)
    extra = [option, str(target)] + ([] if option == "--save-edits" else ["--save-edits", str(tmp_path / "e.st")])
    rc, _, err = _run(capsys, *_edit_argv(world, tmp_path, *extra, *([] if option == "--out" else
                                                                      ["--out", str(tmp_path / "run")])))
    line = _line(err)
    assert rc == 1 and "OutputError" in line and f"{option} {target}" in line and "model folder" in line
    assert _files(world.model_dir) == before and not (tmp_path / "run").exists()


def test_existing_edit_file_needs_force_and_a_folder_is_never_an_edit_file(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"precious")
    _no_model_load(monkeypatch)
    rc, _, err = _run(capsys, *_edit_argv(world, tmp_path, "--save-edits", str(mine), "--out", str(tmp_path / "r")))
    assert rc == 1 and f"--save-edits {mine}: exists; choose a new file, or pass --force" in _line(err)
    folder = tmp_path / "folder"
    folder.mkdir()
    rc, _, err = _run(capsys, *_edit_argv(world, tmp_path, "--save-edits", str(folder), "--force"))
    assert rc == 1 and f"--save-edits {folder}: is a folder; give a file path" in _line(err)
    assert mine.read_bytes() == b"precious" and _tree(folder) == [] and not (tmp_path / "r").exists()


def test_out_pointing_at_a_file_or_a_full_folder(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a_file = tmp_path / "results.txt"
    a_file.write_text("mine")
    _no_model_load(monkeypatch)
    for command in (["evaluate", "--model", str(world.model_dir)], ["stats", "--model", str(world.model_dir),
                                                                    "--hparams", str(world.hparams)]):
        rc, _, err = _run(capsys, *command, "--out", str(a_file), "--force")
        assert rc == 1 and f"--out {a_file}: is a file; give a folder path" in _line(err)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.json").write_text("{}")
    rc, _, err = _run(capsys, "evaluate", "--model", str(world.model_dir), "--out", str(full))
    assert rc == 1 and f"--out {full}: exists and is not empty" in _line(err)
    assert a_file.read_text() == "mine" and _files(full) == {"keep.json": b"{}"}


def test_read_only_or_file_parent_is_refused_before_any_work(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr("ece_plugin.files.outputs.os.access",
                        lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    _no_model_load(monkeypatch)
    rc, _, err = _run(capsys, *_edit_argv(world, tmp_path, "--save-model", str(locked / "m")))
    assert rc == 1 and f"--save-model {locked / 'm'}: cannot write in {locked} (permission denied)" in _line(err)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    rc, _, err = _run(capsys, *_edit_argv(world, tmp_path, "--save-edits", str(blocker / "e.safetensors")))
    assert rc == 1 and f"{blocker} is a file, not a folder" in _line(err)
    assert _tree(locked) == [] and blocker.read_text() == "x"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_really_read_only_folder_is_refused(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        rc, _, err = _run(capsys, *_edit_argv(world, tmp_path, "--save-edits", str(locked / "e.safetensors")))
    finally:
        locked.chmod(0o755)
    assert rc == 1 and "permission denied" in _line(err) and _tree(locked) == []


def test_an_output_inside_another_replaced_output_is_refused() -> None:
    with pytest.raises(OutputError, match="--save-edits m/e.safetensors: is inside --save-model m"):
        check_outputs([Output("--save-model", Path("m"), "folder"), Output("--save-edits", Path("m/e.safetensors"),
                                                                            "file")])


def test_a_failed_command_leaves_no_empty_run_folder(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_a: Any, **_k: Any) -> Any:
        raise OSError("disk gone")

    monkeypatch.setattr("ece_plugin.lab.study.common.load_model_and_tokenizer", boom)
    out = tmp_path / "a" / "b" / "run"
    rc, _, err = _run(capsys, "evaluate", "--model", str(world.model_dir), "--data", str(world.data), "--out", str(out))
    assert rc == 1 and "disk gone" in _line(err)
    assert _tree(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_what_a_killed_writer_left_is_cleared_at_the_next_write(tmp_path: Path) -> None:
    pid = _dead_pid()
    target = tmp_path / "edits.safetensors"
    stale_file = tmp_path / f".edits.safetensors.tmp-{pid}-abc.tmp"
    stale_file.write_bytes(b"half")
    live = tmp_path / f".edits.safetensors.tmp-{os.getpid()}-live.tmp"  # a writer still running: left alone
    live.write_bytes(b"busy")
    atomic.write_text(target, "new")
    assert target.read_text() == "new" and not stale_file.exists() and live.exists()
    live.unlink()
    # a folder swap killed between its two renames: the old folder is put back, the new one removed
    folder = tmp_path / "ckpt"
    old = tmp_path / f".ckpt.old-{pid}-x"
    old.mkdir()
    (old / "weights").write_text("old")
    new = tmp_path / f".ckpt.new-{pid}-y"
    new.mkdir()
    (new / "weights").write_text("new")
    assert sorted(p.name for p in atomic.clean_stale(folder)) == sorted([old.name, new.name])
    assert (folder / "weights").read_text() == "old" and _tree(tmp_path) == ["ckpt", "ckpt/weights", target.name]
    # killed after the swap, before the old folder was removed: the old one goes
    old.mkdir()
    (old / "weights").write_text("older")
    with atomic.atomic_folder(folder) as tmp:
        (tmp / "weights").write_text("newest")
    assert (folder / "weights").read_text() == "newest" and _tree(tmp_path) == ["ckpt", "ckpt/weights", target.name]


# ---------------------------------------------------------------------------------- 3. edit files
@pytest.fixture()
def edited(world: World, tmp_path: Path) -> tuple[Any, dict[str, torch.Tensor], Path]:
    """(model, its original weight, an edit file of columns 3 and 7 of WEIGHT)."""
    model, _ = load_model_and_tokenizer(world.model_dir, device="cpu")
    original = {WEIGHT: model.get_parameter(WEIGHT).detach().clone()}
    with torch.no_grad():
        model.get_parameter(WEIGHT)[:, [3, 7]] += 0.25
    path = save_edit_file(build_edit_file(model, original), tmp_path / "e.safetensors")
    with torch.no_grad():
        model.get_parameter(WEIGHT).copy_(original[WEIGHT])
    return model, original, path


def _state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: Any, snapshot: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def _rewrite(path: Path, change: Any) -> None:
    """Change the file's tensors (``change(tensors)``), keeping its metadata (digests) as they were."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("bad", [float("nan"), 1e30])
def test_a_changed_edited_tensor_is_refused_by_its_digest(edited: Any, bad: float) -> None:
    model, _, path = edited
    _rewrite(path, lambda t: t[f"{WEIGHT}/edited"].__setitem__((0, 0), bad))
    before = _state(model)
    with pytest.raises(EditFileError, match=r"tensor 'edited' does not match the file's digest"):
        apply_edit_file(model, path)
    assert _same(model, before)


def test_non_finite_values_are_refused_even_with_matching_digests(edited: Any) -> None:
    model, _, path = edited
    edit = load_edit_file(path)
    edit.weights[WEIGHT].edited[1, 2] = float("nan")
    save_edit_file(edit, path)  # digests written for the NaN: only the finiteness check can refuse it
    before = _state(model)
    with pytest.raises(EditFileError, match=r"edited values hold 1 non-finite value\(s\); nothing written"):
        apply_edit_file(model, load_edit_file(path))
    assert _same(model, before)


@pytest.mark.parametrize(("indices", "message"), [([-1, 7], "neuron index -1 outside 0..63"),
                                                  ([3, 64], "neuron index 64 outside 0..63"),
                                                  ([3, 3], "neuron indices repeat")])
def test_bad_indices_are_refused_before_anything_is_written(edited: Any, indices: list[int], message: str) -> None:
    model, _, path = edited
    edit = load_edit_file(path)
    edit.weights[WEIGHT].indices = torch.tensor(indices)
    save_edit_file(edit, path)
    before = _state(model)
    with pytest.raises(EditFileError, match=message):
        load_edit_file(path)
    assert _same(model, before)


def test_after_writing_the_promised_fingerprint_is_checked_and_a_mismatch_put_back(edited: Any) -> None:
    model, _, path = edited
    edit = load_edit_file(path)
    edit.fingerprint["edited_tensors"][WEIGHT] = "0" * 16
    before = _state(model)
    with pytest.raises(EditFileError, match="after writing, the weight does not match the file's fingerprint"):
        apply_edit_file(model, edit)
    assert _same(model, before)
    assert apply_edit_file(model, path) == [WEIGHT] and revert_edit_file(model, path) == [WEIGHT]
    assert _same(model, before)


APPLY_STAGES = ["load", "write", "fingerprint", "save_pretrained", "swap"]


@pytest.mark.parametrize("stage", APPLY_STAGES)
@pytest.mark.parametrize("command", ["apply", "revert"])
def test_an_interrupt_at_every_stage_of_apply_and_revert_changes_nothing(
    world: World, edited: Any, tmp_path: Path, stage: str, command: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    import ece_plugin.files.editfile as editfile

    _, _, path = edited
    source = world.model_dir
    if command == "revert":  # revert from an applied copy
        source = tmp_path / "applied-llama"
        assert _run(capsys, "apply", "--model", str(world.model_dir), "--edits", str(path), "--out", str(source))[0] == 0
    out = tmp_path / "out-llama"
    shutil.copytree(source, out)
    (out / "notes.txt").write_text("mine")
    before, model_before, edits_before = _files(out), _files(source), path.read_bytes()

    def interrupt(*_a: Any, **_k: Any) -> Any:
        raise KeyboardInterrupt

    if stage == "load":
        monkeypatch.setattr(editfile, "_check_weight_edit", interrupt)
    elif stage == "write":
        monkeypatch.setattr(editfile, "_put_slices", interrupt)
    elif stage == "fingerprint":
        monkeypatch.setattr(editfile, "_check_promised", interrupt)
    elif stage == "save_pretrained":
        monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", interrupt)
    else:
        real = os.replace

        def replace(src: Any, dst: Any) -> None:
            if Path(dst) == out.absolute() and ".new-" in str(src):
                raise KeyboardInterrupt
            real(src, dst)

        monkeypatch.setattr(atomic.os, "replace", replace)
    rc, _, err = _run(capsys, command, "--model", str(source), "--edits", str(path), "--out", str(out), "--force")
    assert rc == 130 and _line(err) == "ece-plugin: interrupted"
    assert _files(out) == before and _files(source) == model_before and path.read_bytes() == edits_before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------- 4. failure is loud
def test_demo_with_every_method_failing_exits_1_with_one_line_each(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ece_plugin.lab.study.baselines import ECEMethod

    def fail(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("the solve broke")

    monkeypatch.setattr(ECEMethod, "edit_batch", fail)
    rc, out, err = _run(capsys, "demo", "--model", str(world.model_dir), "--hparams-dir", str(world.root / "hparams"),
                        "--data", str(world.data), "--limit", "2", "--batch-size", "2", "--methods", "ECE-AS",
                        "MEMIT-equivalent", "--out", str(tmp_path / "demo"), "--no-fluency", "--device", "cpu")
    failures = [line for line in err.splitlines() if line.startswith("ece-plugin demo:")]
    assert rc == 1 and len(failures) == 2 and "Traceback" not in err
    assert failures[0] == "ece-plugin demo: ECE-AS failed: RuntimeError: the solve broke"
    assert "MEMIT-equivalent" in failures[1] and (tmp_path / "demo" / "demo.json").is_file()


@pytest.mark.parametrize("command", ["bench", "lifelong"])
def test_bench_and_lifelong_with_a_failing_method_exit_1_with_one_line(
    world: World, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ece_plugin.lab.study.baselines import ECEMethod

    def fail(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("the solve broke")

    monkeypatch.setattr(ECEMethod, "edit_batch", fail)
    common = ["--model", str(world.model_dir), "--hparams-dir", str(world.root / "hparams"), "--data", str(world.data),
              "--methods", "ECE-AS", "--out", str(tmp_path / "run"), "--device", "cpu"]
    extra = (["--n-edits", "2", "--batch-sizes", "2", "--no-fluency"] if command == "bench" else
             ["--n-edits", "2", "--batch-size", "2", "--n-retention", "2", "--ppl-text", str(world.corpus),
              "--ppl-tokens", "64", "--n-fluency-prompts", "0"])
    rc, _, err = _run(capsys, command, *common, *extra)
    lines = [line for line in err.splitlines() if line.startswith(f"ece-plugin {command}")]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err
    expected = {"bench": "ece-plugin bench: ECE-AS failed: RuntimeError: the solve broke",
                "lifelong": "ece-plugin lifelong: error: RuntimeError: the solve broke"}[command]
    assert lines[0].startswith(expected)


@pytest.mark.parametrize("where", ["parse", "command"])
def test_ctrl_c_anywhere_is_one_line_and_130(
    world: World, where: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(*_a: Any, **_k: Any) -> Any:
        raise KeyboardInterrupt

    target = "ece_plugin.lab.cli.build_parser" if where == "parse" else "ece_plugin.lab.cli.common.model_dir"
    monkeypatch.setattr(target, interrupt)
    rc, _, err = _run(capsys, "evaluate", "--model", str(world.model_dir))
    assert rc == 130 and _line(err) == "ece-plugin: interrupted"


def test_a_gpu_index_without_cuda_warns_naming_the_cpu(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    from ece_plugin.lab.cli import common

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = yaml.safe_load(world.hparams.read_text())
    config["device"] = 0
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(config))
    args = argparse.Namespace(device="auto", ece_set=[])
    with caplog.at_level("WARNING"):
        common.load_ece_hparams(path, world.model_dir, args=args)
    assert args.device == "cpu"
    assert f"{path}: device: 0 is a GPU index, but CUDA is not available here: loading and editing the model on " \
           "the CPU instead" in caplog.text


@pytest.mark.parametrize("argv", [
    ["build-testbed", "--output-dir", "x-llama", "--wiki-prob", "2"],
    ["build-testbed", "--output-dir", "x-llama", "--verbatim-prob", "-1"],
    ["build-testbed", "--output-dir", "x-llama", "--warmup-steps", "-5"],
    ["probe-testbed", "--model", "m", "--data", "d", "--layers", "0", "--steps", "0"],
    ["edit", "--hparams", "h", "--limit", "0"],
    ["lifelong", "--offset", "-1"],
])
def test_nonsense_options_are_refused_where_they_are_parsed(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = _run(capsys, *argv)
    option = next(a for a in reversed(argv) if a.startswith("--"))
    assert rc == 2 and f"argument {option}: expected" in _line(err)
    assert not (tmp_path / "x-llama").exists()


def test_lifelong_limit_is_refused_for_n_edits(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "lifelong", "--limit", "40")
    assert rc == 2 and "argument --limit: lifelong edits --n-edits records" in _line(err)


def test_a_5000_character_prompt_gives_a_short_line(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = json.loads(world.data.read_text())[:2]
    records[0]["prompt"] = "word " * 1000
    data = tmp_path / "long.json"
    data.write_text(json.dumps(records))
    rc, _, err = _run(capsys, "edit", "--model", str(world.model_dir), "--hparams", str(world.hparams), "--data",
                      str(data), "--no-eval", "--device", "cpu", "--save-edits", str(tmp_path / "e.safetensors"),
                      "--out", str(tmp_path / "run"))
    line = _line(err)  # under 300 characters, naming the file
    assert rc == 1 and f"InvalidRecordError: {data}" in line and " ... " in line
    assert not (tmp_path / "e.safetensors").exists() and not (tmp_path / "run").exists()
    from ece_plugin.method.requests import RequestError, normalise_request

    with pytest.raises(RequestError) as exc:  # the library's message names the request and cuts the prompt
        normalise_request({**records[0], "prompt": "word " * 1000}, 0)
    assert "request 0 (case_id=0): subject 'Paris' does not occur in prompt" in str(exc.value)
    assert "(5000 chars)" in str(exc.value) and len(str(exc.value)) < 300


def test_a_subject_twice_or_inside_a_word_is_warned_naming_the_occurrence(caplog: pytest.LogCaptureFixture) -> None:
    from ece_plugin.method.requests import normalise_request

    with caplog.at_level("WARNING"):
        request = normalise_request({"prompt": "Darrieuxville lies near Darrieux, in", "subject": "Darrieux",
                                     "target_new": "Paris"})
    assert request.template == "{}ville lies near Darrieux, in"
    assert "subject 'Darrieux' occurs 2 times in prompt" in caplog.text and "the first (at character 0)" in caplog.text
    assert "inside the longer word 'Darrieuxville'; that occurrence (at character 0) is edited" in caplog.text


def test_a_float_hyperparameter_given_as_a_string_is_said_or_refused(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses

    from ece_plugin.method.hparams import ECEHyperParams, HParamsError

    path = tmp_path / "s.yaml"
    path.write_text(world.hparams.read_text().replace("cluster_ratio: 0.5", "cluster_ratio: '0.1'"))
    with caplog.at_level("WARNING"):
        hp = ECEHyperParams.from_hparams(path)  # a YAML string ('1e-4' too) is read as the number, with a word
    assert hp.cluster_ratio == 0.1 and f"{path}: cluster_ratio is the string '0.1'; read as the number 0.1" in caplog.text
    with pytest.raises(HParamsError, match=r"cluster_ratio: must be a number, got '0.1' \(str\)"):
        dataclasses.replace(hp, cluster_ratio="0.1").validate()  # --ece-set, or a dict built in Python


def test_a_removed_folder_is_whole_or_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "weights").write_text("w")
    real_rmtree, calls = atomic.shutil.rmtree, {"n": 0}

    def interrupted_once(path: Any, ignore_errors: bool = False) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # Ctrl-C while the folder goes: it finishes going, then the interrupt
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(atomic.shutil, "rmtree", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        atomic.remove_folder(folder)
    assert _tree(tmp_path) == []
    # killed while it went: the folder aside is cleared at the next write, never put back
    aside = tmp_path / f".ckpt.del-{_dead_pid()}-z"
    aside.mkdir()
    (aside / "half").write_text("h")
    assert atomic.clean_stale(folder) == [aside] and _tree(tmp_path) == []
