"""docs/own-model.md's runnable blocks, run as written on the bundled testbed from an empty folder.

A block preceded by ``<!-- own-model: run -->`` runs as it stands (bash blocks line by line, python blocks as a
script); ``<!-- own-model: run (EasyEdit main) -->`` marks one that needs EasyEdit main (BaseEditor on a CPU).
The memory table's C0 sizes are checked against d_ff^2 x 4 bytes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ece_plugin import easyedit as ee

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "own-model.md"
MARK = re.compile(r"<!-- own-model: run( \(EasyEdit main\))? -->\n```(bash|python)\n(.*?)```", re.S)


def blocks() -> list[tuple[str, str, bool]]:
    """(language, code, needs EasyEdit main) of every marked block."""
    return [(m.group(2), m.group(3), bool(m.group(1))) for m in MARK.finditer(PAGE.read_text(encoding="utf-8"))]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    bin_dir = str(Path(sys.executable).parent)  # this environment's python and ece-plugin come first
    env.update(OMP_NUM_THREADS="1", PATH=f"{bin_dir}:{env.get('PATH', '')}")
    if ee.easyedit_version() == ee.EASYEDIT_MAIN:  # EasyEdit main is importable here: keep it so in the child
        import easyeditor

        env["PYTHONPATH"] = str(Path(easyeditor.__file__).resolve().parent.parent)
    return env


def test_the_page_marks_the_steps_it_runs() -> None:
    kinds = [(lang, main) for lang, _, main in blocks()]
    assert kinds == [("bash", False), ("python", True), ("bash", False)]
    text = PAGE.read_text(encoding="utf-8")
    for d_ff in (6400, 14336, 16384):  # GPT-2 XL, Llama-3-8B, GPT-J-6B
        c0 = d_ff * d_ff * 4  # float32
        size = f"{c0 / 1e6:.0f} MB" if c0 < 1e9 else f"{c0 / 1e9:.2f} GB"
        worst = f"{2 * c0 / 1e6:.0f} MB" if 2 * c0 < 1e9 else f"{2 * c0 / 1e9:.2f} GB"
        assert f"| {d_ff:,} | {size} | {worst} |" in text, (d_ff, size, worst)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(3))
def test_runnable_block(index: int, tmp_path: Path) -> None:
    lang, code, needs_main = blocks()[index]
    if needs_main and ee.easyedit_version() != ee.EASYEDIT_MAIN:
        pytest.skip(f"needs EasyEdit main (BaseEditor on a CPU); easyeditor here: {ee.easyedit_version() or 'none'}")
    if lang == "python":
        run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        return
    for line in (ln for ln in code.splitlines() if ln.strip()):
        run = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, f"{line}\n{run.stderr[-3000:]}"
    if "ece-plugin edit" in code:
        assert (tmp_path / "edits" / "first4.safetensors").is_file()
        assert (tmp_path / "runs" / "lifelong").is_dir()
