"""Two edges of 'failure is loud': Ctrl-C while the ``ece-plugin`` command is still importing torch and EasyEdit
gives one line and exit 130; ``device: N`` in the hparams without CUDA warns that the CPU is used."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from conftest import FACTS, fake_session, make_hparams, make_llama

from ece_plugin import apply_ece_to_model
from ece_plugin import easyedit as ee

# A finder that raises KeyboardInterrupt the moment the package's resources module is imported: the same as a
# Ctrl-C that lands while `import ece_plugin` runs, at a fixed point instead of a timed signal.
_INTERRUPT_AT_IMPORT = textwrap.dedent(
    """
    import sys
    class Interrupt:
        def find_spec(self, name, path=None, target=None):
            if name == "ece_plugin.resources":
                raise KeyboardInterrupt
            return None
    sys.meta_path.insert(0, Interrupt())
    sys.argv = [ARGV0]
    import ece_plugin
    """
)


def _run(argv0: str) -> subprocess.CompletedProcess[str]:
    code = _INTERRUPT_AT_IMPORT.replace("ARGV0", repr(argv0))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_ctrl_c_while_the_command_imports_is_one_line_and_exit_130() -> None:
    done = _run("/usr/local/bin/ece-plugin")
    assert done.returncode == 130
    assert done.stderr.strip().splitlines() == ["ece-plugin: interrupted"]


def test_ctrl_c_while_a_library_imports_propagates() -> None:
    done = _run("my_script.py")
    assert done.returncode != 130
    assert "KeyboardInterrupt" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback; this machine has CUDA")
def test_gpu_index_without_cuda_warns_naming_the_cpu(tok: Any, caplog: pytest.LogCaptureFixture) -> None:
    model = make_llama(len(tok))
    hp = make_hparams("llama", device=0, context_template_length_params=[[5, 5]])
    session = fake_session(model, hp)
    ee._DEVICE_WARNED.discard(("gpu-index", "cpu"))
    with caplog.at_level(logging.WARNING, logger="ece_plugin.easyedit"):
        apply_ece_to_model(model, tok, FACTS[:2], hp, session=session)
    lines = [r.getMessage() for r in caplog.records if r.name == "ece_plugin.easyedit"]
    assert lines == ["hparams device 0 names a GPU, but CUDA is not available: ECE edits on the CPU"]
    assert all(p.device.type == "cpu" for p in model.parameters())
