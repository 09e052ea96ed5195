"""Sequential-editing variants of ECE on a validation sequence of the scale testbed (issue 15).

The validation sequence is 400 CounterFact facts the scale testbed trained on and no reported table uses:
counterfact-val.json records 0-199, then counterfact-edit.json records 2000-2199 (the reported runs edit records
0-1999). They are edited in 4 sequential batches of 100 and evaluated after all with ``ece-plugin lifelong``;
retention is scored on zsRE records 0-99 (known facts of another data set, never edited here).

    python benchmarks/lifelong_validation.py --set neuron_threshold=1.0 --out runs/val-p10
    python benchmarks/lifelong_validation.py --rewind-z --out runs/val-rewind

``--set key=value`` overrides a key of hparams/ECE/testbed-llama-scale.yaml (YAML value syntax). Two
prototypes of the NSE authors' sequential mechanisms (Jiang et al. 2024), not part of ece_plugin, patch the
editor for this process only:

* ``--rewind-z``: z is computed on the edit layers' unedited W_out ("weights rewinding"); the residual written
  is still z minus the current model's output;
* ``--write-passes N``: the batch's update is written N times, each pass on the residual the previous left
  (keys re-read), the journal merged so the carried state sees one write per layer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import ece_plugin.editor as editor  # noqa: E402
from ece_plugin.cli import main  # noqa: E402
from ece_plugin.hparams import ECEHyperParams  # noqa: E402

HPARAMS = REPO / "hparams" / "ECE" / "testbed-llama-scale.yaml"
MODEL = REPO / "testbed" / "testbed-llama-scale"


def validation_records() -> list[dict[str, Any]]:
    val = json.loads((REPO / "data" / "counterfact" / "counterfact-val.json").read_text())[:200]
    edit = json.loads((REPO / "data" / "counterfact" / "counterfact-edit.json").read_text())[2000:2200]
    return val + edit


def rewind_z() -> None:
    """Compute z with the edit layers' W_out as they were before the first edit of this process."""
    compute_z = editor.compute_z
    unedited: dict[int, dict[str, torch.Tensor]] = {}

    def patched(model: Any, tok: Any, requests: Any, templates: Any, hparams: Any, *a: Any, **k: Any) -> Any:
        names = [hparams.rewrite_module_tmp.format(layer) for layer in hparams.layers]
        mods = {name: model.get_submodule(name) for name in names}
        first = unedited.setdefault(id(model), {n: m.weight.detach().clone() for n, m in mods.items()})
        now = {n: m.weight.detach().clone() for n, m in mods.items()}
        with torch.no_grad():
            for n, m in mods.items():
                m.weight.copy_(first[n])
        try:
            return compute_z(model, tok, requests, templates, hparams, *a, **k)
        finally:
            with torch.no_grad():
                for n, m in mods.items():
                    m.weight.copy_(now[n])

    editor.compute_z = patched  # type: ignore[assignment]


def write_passes(passes: int) -> None:
    """Write each batch ``passes`` times (NSE's iterative editing, without its per-edit gate)."""
    write_layers = editor.write_layers

    def patched(
        w_outs: Any, sets: Any, z: Any, read: Any, c0: Any, cprev: Any, lam: float, journal: Any = None, ridge: float = 0.0
    ) -> Any:
        journal = [] if journal is None else journal
        write_layers(w_outs, sets, z, read, c0, cprev, lam, journal=journal, ridge=ridge)
        n = len(w_outs)

        def reread(i: int) -> Any:  # layer 0's keys are unchanged by any W_out write; its z-layer output is not
            return (read(0)[0], read(1)[1]) if i == 0 and n > 1 else read(i)

        for _ in range(passes - 1):
            write_layers(w_outs, sets, z, reread, c0, cprev, lam, journal=journal, ridge=ridge)
        journal[:] = [dataclasses.replace(a, post=b.post) for a, b in zip(journal[:n], journal[-n:])]
        return journal

    editor.write_layers = patched  # type: ignore[assignment]


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="hparams override")
    p.add_argument("--method", default="ECE-AS")
    p.add_argument("--rewind-z", action="store_true")
    p.add_argument("--write-passes", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    hparams = yaml.safe_load(HPARAMS.read_text())
    known = {f.name for f in dataclasses.fields(ECEHyperParams)}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in known:
            p.error(f"--set {item}: {key!r} is not an ECE hyperparameter")
        hparams[key] = yaml.safe_load(value)
    if args.rewind_z:
        rewind_z()
    if args.write_passes > 1:
        write_passes(args.write_passes)
    with tempfile.TemporaryDirectory() as tmp:
        data, hp = Path(tmp) / "validation.json", Path(tmp) / "hparams.yaml"
        data.write_text(json.dumps(validation_records()))
        hp.write_text(yaml.safe_dump(hparams))
        return main([
            "lifelong", "--model", str(MODEL), "--device", "cpu", "--threads", "1", "--data", str(data),
            "--n-edits", "400", "--batch-size", "100", "--retention-data",
            str(REPO / "data" / "zsre" / "zsre_mend_eval.json"), "--n-retention", "100", "--hparams", str(hp),
            "--methods", args.method, "--out", args.out,
        ])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
