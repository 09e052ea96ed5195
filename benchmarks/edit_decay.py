"""Why earlier edits stop holding over a sequence: where the first batch's edits are lost.

ECE edits a sequence of batches; after every ``--every`` batches it reads, for the first batch's edits (the
tracked edits), at the fact token of each rewrite prompt:

* the z layer's output ``h`` (what the edit wrote is ``h_ref - h_0``: after the first batch minus before it) and how
  far it has moved since, ``||h - h_ref|| / ||h_ref - h_0||``, split exactly into three parts:

  - **leak**: ``sum_l (W_l - W_l,ref) k_l,ref``, what later writes changed at the keys the edit was written at
    (what the carried keys' covariance is meant to prevent);
  - **key drift**: ``sum_l W_l (k_l - k_l,ref)``, the edit's own keys moved by writes into the layers below;
  - **attention**: the rest (``h - h_ref`` minus the two), what the attention blocks now add at that token;

* the share of tracked edits that still hold (rewrite prompt: P(new) > P(true), CounterFact's efficacy), and the
  same with the z layer's output at the fact token put back to ``h_ref`` (a forward hook): when that restores them,
  the edit is lost below the z layer (leak, key drift, attention); when it does not, after it (the later layers
  and the other tokens, which the edited layers also changed).

Right after the first batch the patched and plain figures agree by construction (the check that the hook hits the
fact token). Output: ``decay.json``, ``decay.csv``, ``decay.md`` and ``decay.png`` in ``--out``.

    python benchmarks/edit_decay.py --model testbed/testbed-llama-scale2 --n-edits 2000 --every 5 --out runs/decay
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ece_plugin import apply_ece_to_model  # noqa: E402
from ece_plugin.evaluation.data import EditRecord, load_records  # noqa: E402
from ece_plugin.evaluation.scoring import score_continuations  # noqa: E402
from ece_plugin.lab.study.common import (  # noqa: E402
    load_model_and_tokenizer,
    save_curve_grid,
    set_threads,
    write_csv,
    write_json,
)
from ece_plugin.method.architecture import input_device, w_out  # noqa: E402
from ece_plugin.method.hparams import ECEHyperParams  # noqa: E402
from ece_plugin.method.keys import build_key_rows, lookup_indices, read_keys  # noqa: E402
from ece_plugin.method.requests import fill, normalise_requests  # noqa: E402

logger = logging.getLogger("edit_decay")

PANELS = [
    ("holds", "tracked edits that hold (%)", 100.0),
    ("holds_patched", "... with h at the z layer put back (%)", 100.0),
    ("moved", "||h - h_ref|| / ||h_ref - h_0||", 1.0),
    ("leak", "leak part (same scale)", 1.0),
    ("key_drift", "key drift part (same scale)", 1.0),
    ("attention", "attention part (same scale)", 1.0),
]


class Probe:
    """Reads the tracked edits' keys and z-layer outputs, and scores them with and without the patch."""

    def __init__(self, model: torch.nn.Module, tok: Any, records: list[EditRecord], hp: ECEHyperParams) -> None:
        self.model, self.tok, self.records, self.hp = model, tok, records, hp
        self.requests = normalise_requests([r.to_request() for r in records])
        self.names = [hp.rewrite_module_tmp.format(layer) for layer in hp.layers]
        self.z_name = hp.layer_module_tmp.format(hp.layers[-1])
        self.rows = build_key_rows(tok, self.requests, [["{}"]], hp.fact_token, input_device(model))
        self.positions = lookup_indices(tok, [r.template for r in self.requests], [r.subject for r in self.requests],
                                        hp.fact_token)
        self.prompts = [fill(r.template, r.subject) for r in self.requests]

    @torch.no_grad()
    def read(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Keys ``name -> [n, d_ff]`` and z-layer outputs ``[n, d_model]`` (float64)."""
        keys, h = read_keys(self.model, self.rows, self.names, self.z_name, stop_at=self.z_name)
        assert h is not None
        return {n: k.double() for n, k in keys.items()}, h.double()

    def holds(self, patch: Optional[torch.Tensor] = None) -> list[bool]:
        """P(new) > P(true) on each rewrite prompt; with ``patch`` ``[n, d_model]`` the z layer's output at the
        fact token is replaced by its row."""
        module = self.model.get_submodule(self.z_name)
        out = []
        for i, (prompt, rec) in enumerate(zip(self.prompts, self.records)):
            handle = None
            if patch is not None:
                handle = module.register_forward_hook(_replace_at(self.positions[i], patch[i]))
            try:
                new, true = score_continuations(self.model, self.tok, [prompt, prompt],
                                                [rec.target_new, str(rec.target_true)], batch_size=2)
            finally:
                if handle is not None:
                    handle.remove()
            out.append(new.nll < true.nll)
        return out


def _replace_at(position: int, value: torch.Tensor) -> Any:
    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, position] = value.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def weights(model: torch.nn.Module, names: list[str], layers: list[int], tmp: str) -> dict[str, torch.Tensor]:
    """Each edited W_out as ``[d_model, d_ff]`` float64 (a copy)."""
    return {name: w_out(model, tmp, layer).neuron_view().detach().double().clone() for name, layer in zip(names, layers)}


def measure(probe: Probe, ref: dict[str, Any], n_done: int) -> dict[str, Any]:
    keys, h = probe.read()
    w_now = weights(probe.model, probe.names, probe.hp.layers, probe.hp.rewrite_module_tmp)
    leak = sum((w_now[n] - ref["w"][n]) @ ref["keys"][n].T for n in probe.names).T
    drift = sum(w_now[n] @ (keys[n] - ref["keys"][n]).T for n in probe.names).T
    moved = h - ref["h"]
    scale = (ref["h"] - ref["h0"]).norm(dim=1).mean()
    holds, patched = probe.holds(), probe.holds(ref["h"].float())
    return {
        "n_edits": n_done,
        "holds": sum(holds) / len(holds),
        "holds_patched": sum(patched) / len(patched),
        "moved": float(moved.norm(dim=1).mean() / scale),
        "leak": float(leak.norm(dim=1).mean() / scale),
        "key_drift": float(drift.norm(dim=1).mean() / scale),
        "attention": float((moved - leak - drift).norm(dim=1).mean() / scale),
        "key_drift_by_layer": {
            n: float(((keys[n] - ref["keys"][n]).norm(dim=1) / ref["keys"][n].norm(dim=1)).mean()) for n in probe.names
        },
    }


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "testbed" / "testbed-llama-scale2"))
    p.add_argument("--hparams", help="ECE hparams YAML (default: hparams/ECE/<model folder name>.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="hparams override (YAML value)")
    p.add_argument("--data", default=str(REPO / "data" / "counterfact" / "counterfact-edit.json"))
    p.add_argument("--n-edits", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--every", type=int, default=5, help="measure after every N batches")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_threads(args.threads)
    import yaml

    hp_path = Path(args.hparams or REPO / "hparams" / "ECE" / f"{Path(args.model).name}.yaml")
    hp = ECEHyperParams.from_hparams(hp_path)
    for item in args.set:
        key, _, value = item.partition("=")
        setattr(hp, key, yaml.safe_load(value))
    hp.validate()
    model, tok = load_model_and_tokenizer(args.model, device="cpu")
    records = load_records(args.data, limit=args.n_edits)
    batches = [records[i : i + args.batch_size] for i in range(0, len(records), args.batch_size)]
    probe = Probe(model, tok, batches[0], hp)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    keys0, h0 = probe.read()
    del keys0
    rows: list[dict[str, Any]] = []
    ref: dict[str, Any] = {}
    for b, batch in enumerate(tqdm(batches, desc="batches"), start=1):
        apply_ece_to_model(model, tok, [r.to_request() for r in batch], hp)
        if b == 1:
            keys, h = probe.read()
            ref = {"keys": keys, "h": h, "h0": h0,
                   "w": weights(model, probe.names, hp.layers, hp.rewrite_module_tmp)}
        if b == 1 or b % args.every == 0 or b == len(batches):
            rows.append(measure(probe, ref, b * args.batch_size))
            logger.info("after %d edits: %s", b * args.batch_size,
                        {k: round(v, 3) for k, v in rows[-1].items() if isinstance(v, float)})
            write_json(out / "decay.json", {"model": args.model, "hparams": str(hp_path), "set": args.set,
                                            "data": args.data, "batch_size": args.batch_size, "rows": rows})
    flat = [{k: v for k, v in r.items() if k != "key_drift_by_layer"} |
            {f"key_drift_{n}": v for n, v in r["key_drift_by_layer"].items()} for r in rows]
    write_csv(out / "decay.csv", flat)
    lines = ["| edits | holds | holds, h put back | moved | leak | key drift | attention |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n_edits']} | {100 * r['holds']:.0f} | {100 * r['holds_patched']:.0f} | {r['moved']:.2f} | "
              f"{r['leak']:.2f} | {r['key_drift']:.2f} | {r['attention']:.2f} |" for r in rows]
    (out / "decay.md").write_text("\n".join(lines) + "\n")

    def draw(ax: Any, key: str, scale: float) -> None:
        ax.plot([r["n_edits"] for r in rows], [r[key] * scale for r in rows], marker="o", markersize=3,
                label="first batch's edits")

    save_curve_grid(PANELS, draw, f"Where the first batch's edits are lost ({Path(args.model).name})",
                    out / "decay.png")
    logger.info("where the first batch's edits are lost:\n%s", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
