"""The installable package: bundled names resolve, the wheel carries its files, and an installed wheel runs the
demo from a folder that is not the clone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from ece_plugin import resources
from ece_plugin.resources import ResourceNotFoundError, resolve_data, resolve_hparams, resolve_model

REPO = Path(__file__).resolve().parent.parent


def test_bundled_names_resolve_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resources.REPO_ROOT == REPO  # a clone's own files are preferred
    assert resolve_hparams("llama3-8b") == REPO / "hparams" / "ECE" / "llama3-8b.yaml"
    assert resolve_hparams("testbed-llama", "MEMIT") == REPO / "hparams" / "MEMIT" / "testbed-llama.yaml"
    assert resolve_model("testbed-llama") == REPO / "testbed" / "testbed-llama"
    assert resolve_data("counterfact-edit") == REPO / "data" / "counterfact" / "counterfact-edit.json"
    # a repository-relative path as the bundled hparams write it (model_name: ./testbed/testbed-llama)
    assert resolve_model("./testbed/testbed-llama") == REPO / "testbed" / "testbed-llama"
    # a path that exists wins over a bundled name
    (tmp_path / "llama3-8b.yaml").write_text("alg_name: ECE\n")
    assert resolve_hparams("llama3-8b") == Path("llama3-8b.yaml")
    assert resolve_model("meta-llama/Meta-Llama-3-8B") == Path("meta-llama/Meta-Llama-3-8B")  # a hub id
    with pytest.raises(ResourceNotFoundError, match=r"no bundled ECE hparams .*llama3-8b"):
        resolve_hparams("llama-9b")
    with pytest.raises(ResourceNotFoundError, match="no bundled testbed.*testbed-llama"):
        resolve_model("testbed-none")
    with pytest.raises(ResourceNotFoundError, match="no bundled record file"):
        resolve_data("nothing-here")


def test_version_is_the_distributions() -> None:
    out = subprocess.run([sys.executable, "-m", "ece_plugin.lab.cli", "--version"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert out.strip() == f"ece-plugin {resources.version()}" and resources.version()[0].isdigit()


def _build_wheel(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest),
                    str(REPO)], check=True, cwd=dest)
    (wheel,) = dest.glob("ece_plugin-*.whl")
    return wheel


def _scratch_env(root: Path, wheel: Path) -> Path:
    """A venv holding only the wheel; the running environment's packages (torch, transformers, easyeditor) are
    visible through a .pth line, which adds their folder to sys.path without running its .pth files, so the
    clone's editable install of ece_plugin is not there to shadow the wheel."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "running-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True)
    return venv


@pytest.mark.slow
def test_wheel_installs_and_runs_the_demo_outside_the_clone(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    bundled = "ece_plugin/_bundled/"
    for needed in ("hparams/ECE/llama3-8b.yaml", "hparams/ECE/gpt-j-6B.yaml", "hparams/ECE/testbed-llama.yaml",
                   "hparams/MEMIT/testbed-llama.yaml", "testbed/testbed-llama/model.safetensors",
                   "testbed/testbed-llama/tokenizer.json", "data/counterfact/counterfact-edit.json",
                   "data/wikitext-2-raw/wiki.valid.raw", "LICENSE", "CITATION.cff"):
        assert bundled + needed in names, needed
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    venv = _scratch_env(tmp_path, wheel)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    probe = ("import json, ece_plugin, ece_plugin.resources as r; print(json.dumps([ece_plugin.__file__, "
             "str(r.REPO_ROOT), str(r.resolve_hparams('llama3-8b')), str(r.resolve_model('testbed-llama'))]))")
    where = json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=work, env=env,
                                      capture_output=True, text=True, check=True).stdout)
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the wheel's files, not the clone's
    assert Path(where[1]).name == "_bundled"

    cli = str(venv / "bin" / "ece-plugin")
    version = subprocess.run([cli, "--version"], cwd=work, env=env, capture_output=True, text=True, check=True)
    assert version.stdout.startswith("ece-plugin ")
    run = subprocess.run([cli, "demo", "--limit", "2", "--methods", "ECE-AS", "--no-fluency", "--device", "cpu",
                          "--out", "out"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((work / "out" / "demo.json").read_text())
    assert "ECE-AS" in json.dumps(result) and "| ECE-AS" in run.stdout
    # the statistics were computed from the bundled WikiText-2 and filed under its name, in the working folder
    stats = sorted(p.relative_to(work).as_posix() for p in (work / "data" / "stats").rglob("*.npz"))
    assert stats and all("/wikitext-2-raw_stats/" in p for p in stats), stats
