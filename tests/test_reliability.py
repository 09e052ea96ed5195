"""Reliability (issue 12): nothing non-finite reaches the weights, no half edit, no lost folder, one-line errors.

Every case asserts the error text and that the model (every tensor of its state dict, bit for bit), the
sequential state and the files are as they were before the failing call.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import FACTS, fake_session, make_hparams, make_llama
from test_cli_world import World, make_world

from ece_plugin import apply_ece_to_model
from ece_plugin.files.editfile import EditFileError, apply_edit_file, build_edit_file, revert_edit_file
from ece_plugin.files.modeldir import ModelFolderError, save_model_folder
from ece_plugin.lab.cli import main
from ece_plugin.lab.study.common import load_model_and_tokenizer
from ece_plugin.method import statistics
from ece_plugin.method.architecture import WOut
from ece_plugin.method.finite import NonFiniteUpdateError
from ece_plugin.method.hparams import ECEHyperParams, HParamsError
from ece_plugin.method.requests import RequestError
from ece_plugin.method.state import SequentialState, StateError, get_session
from ece_plugin.method.statistics import StatisticsCache, StatisticsError

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return make_world(tmp_path_factory.mktemp("reliability-world"))


def _fast(**changes: Any) -> ECEHyperParams:
    """The tiny Llama's hparams with few z steps (these tests are about failures, not edit quality)."""
    values: dict[str, Any] = dict(layers=[0, 1], context_template_length_params=[], shared_grad_steps=2,
                                  per_edit_grad_steps=2, v_num_grad_steps=4)
    values.update(changes)
    return make_hparams("llama", **values)


def _load(world: World) -> tuple[Any, Any]:
    return load_model_and_tokenizer(world.model_dir, device="cpu")


def _hparams(world: World, tmp_path: Path, **changes: Any) -> tuple[Path, ECEHyperParams]:
    """The world's ECE hparams with ``changes`` (own stats_dir under tmp_path), as a YAML file and object."""
    config = yaml.safe_load(world.hparams.read_text())
    config["stats_dir"] = str(tmp_path / "stats")
    config.update(changes)
    path = tmp_path / "ece.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, ECEHyperParams.from_hparams(path)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.dtype.is_floating_point else t


def assert_same_model(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert set(now) == set(snapshot)
    changed = [k for k in snapshot if not torch.equal(_bits(now[k]), _bits(snapshot[k]))]
    assert not changed, f"tensors changed: {changed}"


def _state_dump(state: SequentialState) -> dict[str, Any]:
    layers = {
        name: (None if m.keys is None else m.keys.clone(), None if m.dense is None else m.dense.clone())
        for name, m in state._layers.items()
    }
    return {"n_edits": state.n_edits, "fingerprint": copy.deepcopy(state.fingerprint), "pending": state._pending,
            "layers": layers}


def assert_same_state(state: SequentialState, dump: dict[str, Any]) -> None:
    now = _state_dump(state)
    assert now["n_edits"] == dump["n_edits"] and now["fingerprint"] == dump["fingerprint"]
    assert now["pending"] is dump["pending"]
    assert set(now["layers"]) == set(dump["layers"])
    for name, (keys, dense) in dump["layers"].items():
        for a, b in zip(now["layers"][name], (keys, dense)):
            assert (a is None and b is None) or torch.equal(a, b), name


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["--log-level", "WARNING", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str) -> str:
    # progress bars (tqdm, carriage returns) may come first; the error is one line and no traceback
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _stats_path(model: Any, hp: ECEHyperParams, layer: int) -> Path:
    """Where the statistics of the world's local corpus are filed (under the corpus file's name, not EasyEdit's)."""
    spec = statistics.StatsSpec.from_hparams(hp)
    if hp.mom2_corpus and spec.ds_name in statistics.EASYEDIT_DATASETS:
        spec = dataclasses.replace(spec, ds_name=Path(hp.mom2_corpus).stem)
    return statistics.stats_paths_for(model, hp.rewrite_module_tmp.format(layer), spec).main


def _write_stats(world: World, tmp_path: Path) -> tuple[Path, ECEHyperParams, Path]:
    """Statistics for the world's layers 0 and 1 under tmp_path; returns (hparams file, hparams, layer-0 file)."""
    path, hp = _hparams(world, tmp_path)
    model, tok = _load(world)
    for layer in hp.layers:
        StatisticsCache().second_moment(model, tok, hp.rewrite_module_tmp.format(layer), hp)
    return path, hp, _stats_path(model, hp, 0)


def _rewrite_npz(path: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]


def _records(world: World, n: int) -> list[dict[str, Any]]:
    from ece_plugin.evaluation.data import load_records

    return [r.to_request() for r in load_records(world.data, limit=n)]


# ------------------------------------------------------------------------- 1. non-finite values
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_statistics_are_refused_before_any_weight_changes(
    world: World, tmp_path: Path, bad: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, hp, file0 = _write_stats(world, tmp_path)

    def poison(arrays: dict[str, np.ndarray]) -> None:
        arrays["mom2.mom2"][3, 5] = bad

    _rewrite_npz(file0, poison)
    model, tok = _load(world)
    before = _snapshot(model)
    monkeypatch.setattr("ece_plugin.method.editor.compute_z", _must_not_run("z"))
    with pytest.raises(StatisticsError, match=r"mom2\.mom2 is not finite: 1 of \d+ values are non-finite") as exc:
        apply_ece_to_model(model, tok, _records(world, 2), hp)
    assert str(file0) in str(exc.value)
    assert_same_model(model, before)


def _must_not_run(stage: str) -> Callable[..., Any]:
    def fail(*_a: Any, **_k: Any) -> Any:
        raise AssertionError(f"the {stage} stage ran although the statistics are bad")

    return fail


def test_non_finite_statistics_through_the_cli_give_one_line(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _, file0 = _write_stats(world, tmp_path)
    _rewrite_npz(file0, lambda a: a["mom2.mom2"].__setitem__((0, 0), np.nan))
    out_dir = tmp_path / "edited"
    rc, _, err = _run(capsys, "edit", "--model", str(world.model_dir), "--hparams", str(path), "--data",
                      str(world.data), "--limit", "2", "--no-eval", "--save-model", str(out_dir),
                      "--out", str(tmp_path / "run"), "--device", "cpu")
    line = _one_error_line(err)
    assert rc == 1 and "StatisticsError" in line and str(file0) in line and "not finite" in line
    assert not out_dir.exists()


def test_state_file_holding_nan_is_refused(tmp_path: Path) -> None:
    from ece_plugin.method.state import _LayerMoment

    state = SequentialState()
    keys = torch.randn(64, 3)
    keys[2, 1] = float("nan")
    state._layers["model.layers.0.mlp.down_proj"] = _LayerMoment(d_ff=64, keys=keys)
    state.n_edits = 3
    path = tmp_path / "state.safetensors"
    state.save(path)
    with pytest.raises(StateError, match=r"layer 'model\.layers\.0\.mlp\.down_proj' \(keys\): 1 of 192 values are "
                                         r"non-finite \(1 NaN, 0 Inf\)") as exc:
        SequentialState.load(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize(("key", "text"), [("mom2_update_weight", ".nan"), ("v_lr", ".inf"),
                                           ("neuron_threshold", ".nan"), ("kl_factor", "-.inf")])
def test_non_finite_hparams_are_refused_naming_the_key(world: World, tmp_path: Path, key: str, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(world.hparams.read_text() + f"{key}: {text}\n")
    with pytest.raises(HParamsError, match=rf"{path}: {key}: must be a finite number"):
        ECEHyperParams.from_hparams(path)


def test_non_finite_update_is_rolled_back_naming_the_layer(tok: Any) -> None:
    model = make_llama(len(tok))
    hp = _fast()
    session = fake_session(model, hp)
    apply_ece_to_model(model, tok, FACTS[:2], hp)  # a first batch, staged in the state
    before, state_before = _snapshot(model), _state_dump(session.state)
    real_masked = session.statistics.masked

    def poisoned(model_: Any, tok_: Any, name: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        block = real_masked(model_, tok_, name, *args, **kwargs)
        return block * float("nan") if name.endswith("layers.1.mlp.down_proj") else block

    session.statistics.masked = poisoned  # type: ignore[method-assign]
    with pytest.raises(NonFiniteUpdateError, match=r"layer 1 \(model\.layers\.1\.mlp\.down_proj\): the update would "
                                                   r"make weights non-finite .*cause: non-finite C0 block.*rolled back"):
        apply_ece_to_model(model, tok, FACTS[2:], hp)
    assert_same_model(model, before)  # layer 0 was written first: it is back too
    assert_same_state(session.state, state_before)


# --------------------------------------------------------------- 2. corrupt statistics files
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _bad_crc(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("mom2.mom2.npy")
    data = bytearray(path.read_bytes())
    spot = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
    data[spot] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [_truncate, _empty, _bad_crc], ids=["truncated", "empty", "bad-crc"])
def test_corrupt_statistics_file_is_named_before_z_runs(
    world: World, tmp_path: Path, corrupt: Callable[[Path], None], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, hp, file0 = _write_stats(world, tmp_path)
    corrupt(file0)
    model, tok = _load(world)
    before = _snapshot(model)
    with monkeypatch.context() as m:
        m.setattr("ece_plugin.method.editor.compute_z", _must_not_run("z"))
        with pytest.raises(StatisticsError, match="unreadable statistics file") as exc:
            apply_ece_to_model(model, tok, _records(world, 2), hp)
    assert str(file0) in str(exc.value)
    assert_same_model(model, before)
    rc, _, err = _run(capsys, "edit", "--model", str(world.model_dir), "--hparams", str(path), "--data",
                      str(world.data), "--limit", "2", "--no-eval", "--save-edits", str(tmp_path / "e.safetensors"),
                      "--out", str(tmp_path / "run"), "--device", "cpu")
    line = _one_error_line(err)
    assert rc == 1 and str(file0) in line and "unreadable statistics file" in line
    assert not (tmp_path / "e.safetensors").exists()


# ------------------------------------------------------------------------- 3. one-line CLI errors
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "evaluate", "--model", str(world.model_dir), "--data", str(world.data), "--limit", "1",
                      "--device", "cuda", "--out", str(tmp_path / "ev"), "--no-fluency")
    line = _one_error_line(err)
    assert rc == 1 and "CUDA is not available" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_in_hparams_is_honoured(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _hparams(world, tmp_path, device="cuda")
    rc, _, err = _run(capsys, "edit", "--model", str(world.model_dir), "--hparams", str(path), "--data",
                      str(world.data), "--limit", "2", "--no-eval", "--save-edits", str(tmp_path / "e.safetensors"),
                      "--out", str(tmp_path / "run"))
    line = _one_error_line(err)
    assert rc == 1 and "device 'cuda': CUDA is not available" in line


def test_device_in_hparams_other_than_the_models_is_warned(tok: Any, caplog: pytest.LogCaptureFixture) -> None:
    from ece_plugin import easyedit

    easyedit._DEVICE_WARNED.clear()
    model = make_llama(len(tok))
    hp = _fast(layers=[0], device="cuda")
    fake_session(model, hp)
    with caplog.at_level("WARNING"):
        apply_ece_to_model(model, tok, FACTS[:1], hp)
    assert "hparams device 'cuda' is not used: ECE edits the model on cpu" in caplog.text


def test_yaml_syntax_error_is_one_line(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: [0, 1\nv_lr: 0.5\n")
    rc, _, err = _run(capsys, "edit", "--model", str(world.model_dir), "--hparams", str(bad), "--data",
                      str(world.data), "--save-edits", str(tmp_path / "e.safetensors"), "--out", str(tmp_path / "r"))
    line = _one_error_line(err)
    assert rc == 1 and "HParamsError" in line and f"{bad}: not valid YAML" in line


@pytest.mark.parametrize("command", ["edit", "demo"])
def test_batch_size_zero_is_one_line(world: World, tmp_path: Path, command: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    argv = [command, "--model", str(world.model_dir), "--hparams", str(world.hparams), "--data", str(world.data),
            "--batch-size", "0", "--out", str(tmp_path / "r")]
    rc = main(argv + (["--save-edits", str(tmp_path / "e.safetensors")] if command == "edit" else []))
    assert rc == 2  # argparse's usage error, returned as the exit status
    line = _one_error_line(capsys.readouterr().err)
    assert f"ece-plugin {command}: error: argument --batch-size: expected a positive integer, got '0'" in line


def _state_with_meta(tmp_path: Path, meta: str) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / "state.safetensors"
    save_file({"model.layers.0.mlp.down_proj::keys": torch.zeros(64, 2)}, str(path), metadata={"ece_state": meta})
    return path


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ("{not json", "corrupt 'ece_state' metadata (not JSON"),
        (json.dumps({"format": "ece-sequential-state", "version": 1, "n_edits": 2,
                     "layers": {"model.layers.0.mlp.down_proj": {"d_ff": 64, "n": 2}}}),
         "metadata of layer 'model.layers.0.mlp.down_proj' lacks key 'kind'"),
        (json.dumps({"format": "ece-sequential-state", "version": 1, "n_edits": "two", "layers": {}}),
         "metadata key 'n_edits' must be an integer"),
    ],
    ids=["json", "kind", "n_edits"],
)
def test_state_file_with_bad_metadata_names_file_and_key(tmp_path: Path, meta: str, message: str) -> None:
    path = _state_with_meta(tmp_path, meta)
    with pytest.raises(StateError) as exc:
        SequentialState.load(path)
    assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value)


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr("ece_plugin.lab.study.common.load_model_and_tokenizer", boom)
    argv = ["evaluate", "--model", str(world.model_dir), "--data", str(world.data), "--out", str(tmp_path / "e")]
    rc, _, err = _run(capsys, *argv)
    line = _one_error_line(err)
    assert rc == 1 and "RuntimeError: something broke" in line and "--log-level DEBUG" in line
    rc = main(["--log-level", "DEBUG", *argv])
    assert rc == 1 and "Traceback" in capsys.readouterr().err


# ---------------------------------------------------------------------------- 4. all or nothing
STAGES = ["statistics", "templates", "z cache", "keys", "read 0", "attribution", "clustering", "z", "keys of layer 1",
          "solve of layer 1", "write of layer 0", "write of layer 1", "state", "trace"]


def _inject(stage: str, monkeypatch: pytest.MonkeyPatch, session: Any) -> None:
    """Make ``stage`` raise KeyboardInterrupt (the writes and the state: right after they happened)."""
    import ece_plugin.method.editor as editor
    import ece_plugin.method.update as update

    def interrupt(*_a: Any, **_k: Any) -> Any:
        raise KeyboardInterrupt(stage)

    def nth_call(real: Callable[..., Any], n: int, after: bool = False) -> Callable[..., Any]:
        calls = [0]

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == n and not after:
                raise KeyboardInterrupt(stage)
            result = real(*args, **kwargs)
            if calls[0] == n:
                raise KeyboardInterrupt(stage)
            return result

        return wrapper

    simple = {"templates": "context_templates", "attribution": "attribute_layer", "clustering": "cluster_edits",
              "z": "compute_z", "trace": "_trace"}
    if stage in simple:
        monkeypatch.setattr(editor, simple[stage], interrupt)
    elif stage == "statistics":
        monkeypatch.setattr(session.statistics, "second_moment", interrupt)
    elif stage == "z cache":  # the z rows' prefix cache, whose pass reads the unedited keys
        monkeypatch.setattr(editor, "prepare_z", interrupt)
    elif stage == "keys":  # the unedited keys taken from that pass
        monkeypatch.setattr(editor, "unedited_keys", interrupt)
    elif stage.startswith("read ") or stage == "keys of layer 1":  # read 0: when the z cache's pass gives no keys
        layer = 0 if stage == "read 0" else 1
        if layer == 0:
            monkeypatch.setattr(editor, "unedited_keys", lambda *a: None)
        real_read = editor.KeyReads.read

        def read(self: Any, i: int) -> Any:
            if i == layer:
                raise KeyboardInterrupt(stage)
            return real_read(self, i)

        monkeypatch.setattr(editor.KeyReads, "read", read)
    elif stage == "solve of layer 1":
        monkeypatch.setattr(update, "masked_update", nth_call(update.masked_update, 2))
    elif stage.startswith("write of layer"):
        monkeypatch.setattr(WOut, "add_to_neurons", nth_call(WOut.add_to_neurons, int(stage[-1]) + 1, after=True))
    elif stage == "state":
        monkeypatch.setattr(SequentialState, "stage", nth_call(SequentialState.stage, 1, after=True))
    else:  # pragma: no cover
        raise AssertionError(stage)


@pytest.mark.parametrize("stage", STAGES)
def test_an_interrupt_at_any_stage_leaves_model_and_state_as_they_were(
    stage: str, tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_llama(len(tok))
    hp = _fast(context_template_length_params=[[3, 2]])
    session = fake_session(model, hp)
    apply_ece_to_model(model, tok, FACTS[:2], hp)  # staged: the next call commits it
    before, state_before = _snapshot(model), _state_dump(session.state)
    reference = copy.deepcopy(model)  # the same model and session, to run the same batch uninterrupted

    with monkeypatch.context() as m:
        _inject(stage, m, session)
        with pytest.raises(KeyboardInterrupt, match=stage):
            apply_ece_to_model(model, tok, FACTS[2:], hp)
    assert_same_model(model, before)
    assert_same_state(session.state, state_before)

    # the session goes on as if nothing had happened: the same batch gives the same weights as without the fault
    apply_ece_to_model(model, tok, FACTS[2:], hp)
    apply_ece_to_model(reference, tok, FACTS[2:], hp, session=get_session(reference))
    assert_same_model(model, _snapshot(reference))
    assert session.state.n_edits == get_session(reference).state.n_edits == 2


# -------------------------------------------------------------------------------- 5. safe saving
def _model_folder(world: World, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(world.model_dir, folder)
    (folder / "testbed_manifest.json").write_text('{"kept": true}')
    (folder / "notes").mkdir()
    (folder / "notes" / "README.txt").write_text("mine")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_saving_over_the_model_folder_keeps_its_other_files_and_normal_permissions(world: World, tmp_path: Path) -> None:
    folder = _model_folder(world, tmp_path)
    model, tok = load_model_and_tokenizer(folder, device="cpu")
    with torch.no_grad():
        model.get_parameter("model.layers.0.mlp.down_proj.weight")[0, 0] += 1.0
    old_mask = os.umask(0o022)
    try:
        save_model_folder(model, tok, folder)
    finally:
        os.umask(old_mask)
    assert (folder / "testbed_manifest.json").read_text() == '{"kept": true}'
    assert (folder / "notes" / "README.txt").read_text() == "mine"
    reloaded, _ = load_model_and_tokenizer(folder, device="cpu")
    assert_same_model(reloaded, _snapshot(model))
    assert oct(folder.stat().st_mode & 0o777) == oct(0o755)
    assert oct((folder / "notes").stat().st_mode & 0o777) == oct(0o755)
    assert {oct(p.stat().st_mode & 0o777) for p in folder.rglob("*") if p.is_file()} == {oct(0o644)}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("fail_at", ["save_pretrained", "swap", "interrupt"])
def test_a_failed_save_leaves_the_folder_that_was_there(
    world: World, tmp_path: Path, fail_at: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _model_folder(world, tmp_path)
    before = _files(folder)
    model, tok = _load(world)
    if fail_at == "save_pretrained":
        monkeypatch.setattr(model, "save_pretrained", lambda *_a, **_k: (_ for _ in ()).throw(OSError("disk full")))
        error: type[BaseException] = OSError
    else:
        import ece_plugin.method.atomic as atomic

        real_replace = os.replace
        error = OSError if fail_at == "swap" else KeyboardInterrupt

        def replace(src: Any, dst: Any) -> None:
            if Path(dst) == folder.absolute() and ".new-" in str(src):
                raise error("swap failed")
            real_replace(src, dst)

        monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(error):
        save_model_folder(model, tok, folder)
    assert _files(folder) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_non_empty_folder_that_is_not_a_model_is_refused_unless_forced(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    rc, _, err = _run(capsys, "edit", "--model", str(world.model_dir), "--hparams", str(world.hparams), "--data",
                      str(world.data), "--limit", "2", "--no-eval", "--save-model", str(mine), "--out",
                      str(tmp_path / "run"), "--device", "cpu")
    line = _one_error_line(err)
    assert rc == 1 and "OutputError" in line and f"--save-model {mine}: exists and is not empty" in line
    assert "--force" in line and _files(mine) == {"thesis.tex": b"precious"}
    assert not (tmp_path / "run").exists()  # refused before any work
    model, tok = _load(world)
    with pytest.raises(ModelFolderError):
        save_model_folder(model, tok, mine)
    save_model_folder(model, tok, mine, force=True)  # forced: the model is written, the user's file kept
    assert (mine / "config.json").is_file() and (mine / "thesis.tex").read_text() == "precious"


def test_apply_with_out_equal_to_model_needs_force_and_keeps_the_manifest(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ece_plugin.files.editfile import save_edit_file

    folder = _model_folder(world, tmp_path)
    model, _ = load_model_and_tokenizer(folder, device="cpu")
    name = "model.layers.1.mlp.down_proj.weight"
    original = {name: model.get_parameter(name).detach().clone()}
    with torch.no_grad():
        model.get_parameter(name)[:, 3] += 0.5
    edits = save_edit_file(build_edit_file(model, original), tmp_path / "e.safetensors")
    before = _files(folder)
    rc, _, err = _run(capsys, "apply", "--model", str(folder), "--edits", str(edits), "--out", str(folder))
    line = _one_error_line(err)
    assert rc == 1 and f"--out {folder}: exists and is not empty" in line and _files(folder) == before
    rc, _, err = _run(capsys, "apply", "--model", str(folder), "--edits", str(edits), "--out", str(folder), "--force")
    assert rc == 0, err
    assert (folder / "testbed_manifest.json").read_text() == '{"kept": true}'
    applied, _ = load_model_and_tokenizer(folder, device="cpu")
    assert_same_model(applied, _snapshot(model))


# ------------------------------------------------------------------------ 6. silent coercions
@pytest.mark.parametrize("layers", ["[1.9]", "[true]", "['1']"])
def test_layers_must_be_integers(world: World, tmp_path: Path, layers: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(world.hparams.read_text().replace("layers:\n- 0\n- 1\n", f"layers: {layers}\n"))
    assert f"layers: {layers}" in path.read_text()
    with pytest.raises(HParamsError, match=rf"{path}: layers has a bad value"):
        ECEHyperParams.from_hparams(path)


def test_a_prompt_longer_than_the_model_positions_is_refused(tok: Any) -> None:
    model = make_llama(len(tok))  # 64 positions
    hp = _fast(layers=[0])
    session = fake_session(model, hp)
    long_prompt = " ".join(["the"] * 70) + " city of {}"
    request = {"prompt": long_prompt, "subject": "Paris", "target_new": "Rome", "case_id": 7}
    before, state_before = _snapshot(model), _state_dump(session.state)
    with pytest.raises(RequestError, match=r"request 1 \(case_id=7\) .*: 7\d tokens with its context template and "
                                           r"target, more than the model's 64 positions"):
        apply_ece_to_model(model, tok, [FACTS[0], request], hp)
    assert_same_model(model, before)
    assert_same_state(session.state, state_before)


def test_same_prompt_and_subject_with_different_targets_is_refused(tok: Any) -> None:
    model = make_llama(len(tok))
    hp = _fast(layers=[0])
    fake_session(model, hp)
    other = dict(FACTS[0], target_new="London", case_id=9)
    before = _snapshot(model)
    with pytest.raises(RequestError, match=r"requests 0 and 2 edit the same prompt 'The capital of France' \(subject "
                                           r"'France'\) to different targets 'Rome' and 'London'"):
        apply_ece_to_model(model, tok, [FACTS[0], FACTS[1], other], hp)
    assert_same_model(model, before)


def _edited_pair(world: World) -> tuple[Any, Any, Any]:
    """(original model, edited model, edit file) with one neuron of layer 0 changed."""
    model, _ = _load(world)
    name = "model.layers.0.mlp.down_proj.weight"
    original = {name: model.get_parameter(name).detach().clone()}
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.get_parameter(name)[:, 5] += 0.25
    return model, edited, build_edit_file(edited, original)


def test_apply_refuses_a_model_that_differs_outside_the_edited_neurons(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    model, edited, edit = _edited_pair(world)
    with torch.no_grad():
        model.get_parameter("model.embed_tokens.weight")[1, 1] += 1e-3
    before = _snapshot(model)
    with pytest.raises(EditFileError, match=r"made for another model: 1 tensor\(s\) differ: model\.embed_tokens\.weight"
                                            r" \(--force applies it anyway\)"):
        apply_edit_file(model, edit)
    assert_same_model(model, before)
    with caplog.at_level("WARNING"):
        apply_edit_file(model, edit, force=True)
    assert "--force: going on" in caplog.text
    revert_edit_file(model, edit, force=True)
    assert_same_model(model, before)


def test_apply_and_revert_check_the_whole_model_and_old_files_still_load(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    model, edited, edit = _edited_pair(world)
    before = _snapshot(model)
    apply_edit_file(model, edit)
    assert_same_model(model, _snapshot(edited))
    revert_edit_file(model, edit)
    assert_same_model(model, before)
    old = copy.copy(edit)
    old.fingerprint = {k: v for k, v in edit.fingerprint.items() if k not in ("tensors", "edited_tensors")}
    with caplog.at_level("WARNING"):
        apply_edit_file(model, old)
    assert "no whole-model fingerprint" in caplog.text
    assert_same_model(model, _snapshot(edited))


# ------------------------------------------------------------------- 7. reproducibility, no litter
def test_statistics_just_computed_and_read_back_give_bit_identical_edits(world: World, tmp_path: Path) -> None:
    _, hp = _hparams(world, tmp_path)
    requests = _records(world, 3)
    first, tok = _load(world)
    apply_ece_to_model(first, tok, requests, hp)  # computes and writes the statistics on the way
    assert _stats_path(first, hp, 0).is_file() and _stats_path(first, hp, 1).is_file()
    second, _ = _load(world)
    apply_ece_to_model(second, tok, requests, hp)  # reads them back from the files
    assert_same_model(second, _snapshot(first))


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs the git checkout")
def test_generated_statistics_are_ignored_by_git_and_the_bundled_file_is_not() -> None:
    generated = [
        "data/stats/._testbed_testbed-llama/wikitext-2-raw_stats/model.layers.1.mlp.down_proj_float32_mom2_1000.npz",
        "data/stats/testbed-llama/wikitext-2-raw_stats/model.layers.1.mlp.down_proj_float32_mom2_1000.npz",
        "data/stats/testbed-llama/wikitext-2-raw_stats/model.layers.0.mlp.down_proj_float32_mom2_100.npz",
        "data/stats/other-model/wikitext-2-raw_stats/model.layers.0.mlp.down_proj_float32_mom2_1000.npz",
    ]
    bundled = "data/stats/testbed-llama/wikitext-2-raw_stats/model.layers.0.mlp.down_proj_float32_mom2_1000.npz"

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO).returncode == 0

    assert [p for p in generated if not ignored(p)] == []
    assert not ignored(bundled)
