"""``ece-plugin lifelong``: N sequential edits in batches of B, with a checkpoint every K edits.

Two protocols are scored in the same run, side by side in every table, CSV and curve:

* **immediate**: each batch's records right after its own edit, as the ECE paper's script and EasyEdit's
  ``batch_edit`` score them (row key ``immediate``: the mean over every batch edited so far);
* **after all**: every record edited so far, at each checkpoint, as AlphaEdit, NSE and NAS score them (row key
  ``edits``).

At every checkpoint (and before the first edit) the model is measured on

* every record edited so far (the after-all protocol: ES / PS / NS or zsRE's token-level efficacy /
  generalization / specificity), and on the first batch's records alone (forgetting);
* retention: known facts that are never edited, scored as before the first edit
  (:func:`ece_plugin.evaluation.general.retention`);
* general ability: perplexity on held-out text and fluency of greedy generations;

together with the seconds per batch so far, the size of what the method carries between batches and how far the
edited weights have moved, ``||W - W0|| / ||W0||`` per weight (``weight_growth``). For ECE
methods every batch also leaves diagnostics read from its trace (:mod:`ece_plugin.lab.study.diagnostics`: how many z
reached their target or sit at the clamp, how much of the batch's neuron set earlier batches wrote, residual and
update norms), written to ``lifelong_diagnostics.csv`` / ``.png``. Each
checkpoint also saves the edited weights and the method's carried state
(:mod:`ece_plugin.lab.study.checkpoint`), which records how many edits it holds, the digests of its files and the
rows measured so far, so an interrupted run resumes from its last checkpoint (``--resume``; the checkpoint, not
the progress file written after it, says where the run stands) with the same results as a run that was never
interrupted: before batch i
the random generators are seeded with ``seed + i``, whatever ran before in the process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ...evaluation import general
from ...evaluation.data import EditRecord
from ...evaluation.dispatch import evaluate_records, metric_kind
from ...evaluation.report import summarize
from ...evaluation.scoring import PromptEndHook, pad_token_id
from ...method import atomic
from .baselines import EditMethod, prompt_end_hook
from .checkpoint import (
    forget_process_state,
    load_method_checkpoint,
    read_checkpoint,
    save_method_checkpoint,
    state_nbytes,
)
from .common import (
    StudyError,
    restore_weights,
    save_curve_grid,
    savefig,
    series_color,
    snapshot_weights,
    style_curve_axis,
    write_csv,
    write_json,
)
from .diagnostics import batch_diagnostics, flat_diagnostics, plot_diagnostics, weight_growth

logger = logging.getLogger(__name__)

PROTOCOL = "after_all"
IMMEDIATE = "immediate"
PROTOCOLS = {PROTOCOL: "edits", IMMEDIATE: IMMEDIATE}  # protocol -> the checkpoint row's key holding its summary
PROTOCOL_LABELS = {PROTOCOL: "after all", IMMEDIATE: "immediate"}
CONFIG_FILE = "lifelong_config.json"
PROGRESS_FILE = "progress.json"
EDIT_METRICS = {
    "counterfact": ("efficacy", "generalization", "specificity", "score"),
    "zsre": ("efficacy", "generalization", "specificity"),
}


@dataclass
class LifelongConfig:
    """What one lifelong run does (saved in the run folder; ``--resume`` reads it back)."""

    n_edits: int
    batch_size: int
    checkpoint_every: int
    seed: int = 0
    n_fluency_prompts: int = 20
    fluency_tokens: int = 50
    ppl_window: int = 128
    ppl_max_tokens: int = 16384
    eval_batch_size: int = 32

    def validate(self) -> None:
        for name in ("n_edits", "batch_size", "checkpoint_every", "ppl_window", "ppl_max_tokens",
                     "eval_batch_size", "fluency_tokens"):
            if int(getattr(self, name)) < 1:
                raise StudyError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.n_fluency_prompts < 0:
            raise StudyError(f"--n-fluency-prompts must be >= 0, got {self.n_fluency_prompts}")
        if self.checkpoint_every % self.batch_size:
            raise StudyError(
                f"--checkpoint-every ({self.checkpoint_every}) must be a multiple of --batch-size "
                f"({self.batch_size}): checkpoints fall between batches"
            )

    def checkpoints(self) -> list[int]:
        """Numbers of edits after which the model is measured (every K edits, and the end)."""
        points = list(range(self.checkpoint_every, self.n_edits, self.checkpoint_every))
        return points + [self.n_edits]


def measured_problem(measured: Optional[list[int]], n_edits: int, checkpoint_every: int) -> Optional[str]:
    """What is wrong with the positions a run measures (None: nothing, or no positions given)."""
    if measured is None:
        return None
    wrong = [p for p in measured if type(p) is not int or not 0 <= p < n_edits]
    if wrong or not measured or sorted(set(measured)) != list(measured):
        return (f"measured positions must be increasing, distinct and within 0-{n_edits - 1}"
                f"{f'; {wrong[:3]} are not' if wrong else ''}")
    if measured[0] >= checkpoint_every:
        return (f"the first measured position, {measured[0]}, is edited after the first checkpoint "
                f"({checkpoint_every} edits), which would measure nothing")
    return None


@dataclass
class Probes:
    """The fixed measuring sticks of a run: records edited, retention facts, texts, fluency prompts."""

    records: list[EditRecord]
    retention_records: list[EditRecord]
    texts: dict[str, str]  # name -> text for perplexity
    kind: str = ""
    windows: dict[str, list[list[int]]] = field(default_factory=dict)
    fluency_prompts: list[str] = field(default_factory=list)
    # positions of the sequence whose records every measurement reads, both protocols (None: every record); a
    # validation sequence measures its validation edits among load edits that are edited but never scored
    measured: Optional[list[int]] = None

    def positions(self, stop: int, start: int = 0) -> list[int]:
        """The measured positions ``start`` .. ``stop - 1`` of the sequence."""
        if self.measured is None:
            return list(range(start, min(stop, len(self.records))))
        return [p for p in self.measured if start <= p < stop]

    def prepare(self, tok: Any, config: LifelongConfig) -> None:
        if len(self.records) < config.n_edits:
            raise StudyError(f"{config.n_edits} edits asked for, {len(self.records)} records given")
        self.records = self.records[: config.n_edits]
        problem = measured_problem(self.measured, config.n_edits, config.checkpoint_every)
        if problem:
            raise StudyError(problem)
        ids = {(r.kind, r.case_id) for r in self.records}  # case_ids number the facts of one data set
        overlap = [r.case_id for r in self.retention_records if (r.kind, r.case_id) in ids]
        if overlap:
            raise StudyError(f"retention records must never be edited; case_ids {overlap[:5]} are in the edits")
        self.kind = metric_kind(self.records)
        self.windows = {
            name: general.text_windows(tok, text, config.ppl_window, config.ppl_max_tokens)
            for name, text in self.texts.items()
        }
        source = self.retention_records or self.records
        self.fluency_prompts = [r.prompt for r in source[: config.n_fluency_prompts]]


def measure(
    model: torch.nn.Module,
    tok: Any,
    probes: Probes,
    config: LifelongConfig,
    n_done: int,
    pre_cases: Optional[list[dict[str, Any]]],
    prompt_end_hook: Optional[PromptEndHook] = None,
) -> dict[str, Any]:
    """One checkpoint's measurements (see the module docstring); ``n_done == 0`` measures every record to be
    edited (the pre-edit row). ``prompt_end_hook``: the edited model's, where its forward reads the position at
    which a prompt ends (:func:`~.baselines.prompt_end_hook`)."""
    edited = [probes.records[p] for p in probes.positions(n_done or len(probes.records))]
    first = edited[: min(config.batch_size, len(edited))]
    reference = None
    if probes.kind == "zsre" and pre_cases is not None:
        reference = pre_cases[: len(edited)]
    cases = evaluate_records(model, tok, edited, kind=probes.kind, generation=False, details=False,
                             reference=reference, batch_size=config.eval_batch_size,
                             prompt_end_hook=prompt_end_hook)
    first_ids = {r.case_id for r in first}
    row: dict[str, Any] = {
        "n_edits": n_done,
        "edits": summarize(cases, kind=probes.kind),
        "first_batch": summarize([c for c in cases if c["case_id"] in first_ids], kind=probes.kind),
    }
    if probes.retention_records:
        row["retention"] = general.retention(
            model, tok, general.retention_pairs(probes.retention_records), batch_size=config.eval_batch_size,
            prompt_end_hook=prompt_end_hook,
        )
    pad = pad_token_id(tok)
    row["perplexity"] = {name: general.perplexity(model, w, pad=pad, batch_size=config.eval_batch_size)
                         for name, w in probes.windows.items()}
    if probes.fluency_prompts:
        from ...evaluation.fluency import GenerationConfig

        row["fluency"] = general.generation_fluency(
            model, tok, probes.fluency_prompts, GenerationConfig(max_new_tokens=config.fluency_tokens)
        )
    return row if n_done else {**row, "cases": cases}


def measure_immediate(
    model: torch.nn.Module,
    tok: Any,
    probes: Probes,
    config: LifelongConfig,
    start: int,
    n_batch: int,
    pre_cases: Optional[list[dict[str, Any]]],
    prompt_end_hook: Optional[PromptEndHook] = None,
) -> list[dict[str, Any]]:
    """The immediate protocol: the cases of the batch of records ``start`` .. ``start + n_batch`` of the sequence,
    scored right after that batch's edit (no generation, as :func:`measure`)."""
    positions = probes.positions(start + n_batch, start)
    if not positions:  # a batch of load edits: nothing of it is measured
        return []
    batch = [probes.records[p] for p in positions]
    reference = None
    if probes.kind == "zsre" and pre_cases is not None:  # pre_cases: the measured records' pre-edit cases, in order
        before = len(probes.positions(start))
        reference = pre_cases[before : before + len(positions)]
    return evaluate_records(model, tok, batch, kind=probes.kind, generation=False, details=False,
                            reference=reference, batch_size=config.eval_batch_size,
                            prompt_end_hook=prompt_end_hook)


# ------------------------------------------------------------------------------------------------ progress
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "method"


@dataclass
class MethodProgress:
    """Where one method's sequence stands; written after its checkpoint folder (the commit point)."""

    method: str
    n_done: int = 0
    batch_seconds: list[float] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    available: bool = True
    reason: str = ""
    diagnostics: list[dict[str, Any]] = field(default_factory=list)  # per batch, ECE methods only
    written_neurons: dict[str, list[int]] = field(default_factory=dict)  # module -> neurons written so far
    immediate_cases: list[dict[str, Any]] = field(default_factory=list)  # each batch's cases after its own edit

    def finished(self, config: LifelongConfig) -> bool:
        return not self.available or self.n_done >= config.n_edits


class RunFolder:
    """The run's folder: config, per-method progress and checkpoints."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def checkpoint_dir(self, method: str) -> Path:
        return self.path / "checkpoints" / _slug(method)

    def progress_path(self, method: str) -> Path:
        return self.checkpoint_dir(method).with_suffix(".progress.json")

    def load_progress(self, method: str) -> MethodProgress:
        path = self.progress_path(method)
        if not path.is_file():
            return MethodProgress(method=method)
        try:
            return MethodProgress(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as exc:
            raise StudyError(f"{path}: unreadable progress file ({exc})") from exc

    def save_progress(self, progress: MethodProgress) -> None:
        atomic.write_text(self.progress_path(progress.method), json.dumps(dataclasses.asdict(progress)) + "\n")

    def resume_point(self, method: str, n_edits: int) -> MethodProgress:
        """Where ``method``'s sequence stands, from its checkpoint when there is one (the checkpoint records how
        many edits it holds and the rows measured up to it; the progress file may lag behind it by one checkpoint
        after an interrupt), else from the progress file of a finished or unavailable method, else the start.
        What an interrupted write left beside the checkpoint is cleared first (an interrupted swap is undone)."""
        checkpoint, path = self.checkpoint_dir(method), self.progress_path(method)
        atomic.clean_stale(checkpoint)
        atomic.clean_stale(path)
        if checkpoint.is_dir():
            manifest = read_checkpoint(checkpoint)
            try:
                progress = MethodProgress(**manifest["progress"])
            except TypeError as exc:
                raise StudyError(f"{checkpoint}: its progress does not fit this version ({exc})") from exc
            logger.info("%s: the checkpoint holds %d edits", method, progress.n_done)
            return progress
        saved = self.load_progress(method)
        if saved.available and 0 < saved.n_done < n_edits:
            raise StudyError(f"{path}: says {saved.n_done} edits were done, but the checkpoint {checkpoint} is "
                             "missing; start the run again in a new folder")
        return saved


# ------------------------------------------------------------------------------------------------ the run
def _seed(config: LifelongConfig, batch_index: int) -> None:
    """Each batch's random draws from the run's seed and its index, so that a resumed run draws what the whole run
    did: torch's and numpy's (WISE draws its gradient masks from numpy's)."""
    torch.manual_seed(config.seed + batch_index)
    np.random.seed(config.seed + batch_index)


@dataclass
class LifelongRun:
    """What every method of one run shares: the model, the measuring sticks, the options and the folder."""

    model: torch.nn.Module
    tok: Any
    probes: Probes
    config: LifelongConfig
    folder: RunFolder
    pre_cases: Optional[list[dict[str, Any]]]
    progress_bar: bool = True

    def run_method(self, method: EditMethod) -> MethodProgress:
        """Run (or resume) one method's sequence; the model's edited weights are restored afterwards."""
        model, folder = self.model, self.folder
        progress = folder.resume_point(method.name, self.config.n_edits)
        if progress.finished(self.config):
            logger.info("%s: already finished in %s", method.name, folder.path)
            return progress
        ok, reason = method.availability(model)
        if not ok:
            logger.warning("%s cannot run: %s", method.name, reason)
            progress.available, progress.reason = False, reason
            folder.save_progress(progress)
            return progress
        pristine = snapshot_weights(model, method.edited_weight_names(model))
        try:
            method.reset(model)
            forget_process_state(method, model)
            method.prepare(model, self.tok)
            if progress.n_done:
                logger.info("%s: resuming after %d edits", method.name, progress.n_done)
                load_method_checkpoint(method, model, folder.checkpoint_dir(method.name))
            self._run_batches(method, progress, pristine)
        finally:
            restore_weights(model, pristine)
            method.reset(model)
        return progress

    def _run_batches(self, method: EditMethod, progress: MethodProgress, pristine: dict[str, torch.Tensor]) -> None:
        config, model, tok = self.config, self.model, self.tok
        checkpoints = set(config.checkpoints())
        starts = list(range(progress.n_done, config.n_edits, config.batch_size))
        bar = tqdm(starts, desc=f"{method.name} lifelong", unit="batch", disable=not self.progress_bar)
        hook = prompt_end_hook(method)
        for start in bar:
            batch = self.probes.records[start : start + config.batch_size]
            _seed(config, start // config.batch_size)
            outcome = method.edit_batch(model, tok, [r.to_request() for r in batch])
            progress.batch_seconds.append(outcome.seconds)
            if outcome.trace is not None:
                self._diagnose(method, progress, outcome.trace)
            progress.immediate_cases += measure_immediate(model, tok, self.probes, config, start, len(batch),
                                                          self.pre_cases, hook)
            n_done = start + len(batch)
            if n_done in checkpoints:
                row = measure(model, tok, self.probes, config, n_done, self.pre_cases, hook)
                if progress.immediate_cases:
                    row[IMMEDIATE] = summarize(progress.immediate_cases, kind=self.probes.kind)
                row["seconds_per_batch"] = sum(progress.batch_seconds) / len(progress.batch_seconds)
                row["state_bytes"] = state_nbytes(method, model)
                row["weight_growth"] = weight_growth(model, pristine)
                progress.rows.append(row)
                progress.n_done = n_done
                save_method_checkpoint(method, model, self.folder.checkpoint_dir(method.name), n_done,
                                       dataclasses.asdict(progress))
                self.folder.save_progress(progress)
                bar.set_postfix(ES=f"{100 * row['edits']['efficacy']['mean']:.1f}", n=n_done)
                logger.info("%s: %d edits: %s", method.name, n_done, _brief(row))

    @staticmethod
    def _diagnose(method: EditMethod, progress: MethodProgress, trace: dict[str, Any]) -> None:
        """Append the batch's :func:`~ece_plugin.lab.study.diagnostics.batch_diagnostics` to ``progress``."""
        written = {name: set(idx) for name, idx in progress.written_neurons.items()}
        clamp = getattr(getattr(method, "hparams", None), "clamp_norm_factor", None)
        found = batch_diagnostics(trace, written, clamp)
        progress.diagnostics.append(found)
        progress.written_neurons = {name: sorted(idx) for name, idx in written.items()}
        logger.info(
            "%s batch %d: z reached %s, at the clamp %s, neurons written before %s",
            method.name, len(progress.diagnostics), _pct(found["z_reached"]), _pct(found["z_clamped"]),
            _pct(found["overlap"]),
        )


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


def _brief(row: dict[str, Any]) -> str:
    parts = [f"{k} {100 * v['mean']:.1f}" for k, v in row["edits"].items() if k in
             ("efficacy", "generalization", "specificity")]
    for name, ppl in row.get("perplexity", {}).items():
        parts.append(f"ppl[{name}] {ppl['perplexity']:.2f}")
    if row.get("weight_growth"):
        parts.append(f"||W - W0|| / ||W0|| up to {max(row['weight_growth'].values()):.2f}")
    return ", ".join(parts)


@dataclass
class LifelongResult:
    """Everything a run measured: the pre-edit row and each method's checkpoint rows."""

    config: LifelongConfig
    kind: str
    pre: dict[str, Any]
    methods: list[MethodProgress]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL,
            "protocols": PROTOCOLS,
            "kind": self.kind,
            "config": dataclasses.asdict(self.config),
            "meta": self.meta,
            "pre_edit": {k: v for k, v in self.pre.items() if k != "cases"},
            "methods": [
                {k: v for k, v in dataclasses.asdict(m).items() if k not in ("written_neurons", "immediate_cases")}
                for m in self.methods
            ],
        }


def run_lifelong(
    methods: Sequence[EditMethod],
    model: torch.nn.Module,
    tok: Any,
    probes: Probes,
    config: LifelongConfig,
    out_dir: Path,
    meta: Optional[dict[str, Any]] = None,
    progress_bar: bool = True,
) -> LifelongResult:
    """Run (or resume) every method in ``out_dir``; writes the outputs after each method."""
    config.validate()
    probes.prepare(tok, config)
    folder = RunFolder(out_dir)
    pre_path = out_dir / "pre_edit.json"
    if pre_path.is_file():
        try:
            pre = json.loads(pre_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise StudyError(f"{pre_path}: unreadable JSON ({' '.join(str(exc).split())[:100]}); delete it to "
                             "measure the unedited model again") from exc
    else:
        logger.info("measuring the unedited model")
        pre = measure(model, tok, probes, config, 0, None)
        write_json(pre_path, pre)
    result = LifelongResult(config=config, kind=probes.kind, pre=pre, methods=[], meta=dict(meta or {}))
    run = LifelongRun(model, tok, probes, config, folder, pre.get("cases"), progress_bar)
    for method in methods:
        result.methods.append(run.run_method(method))
        write_outputs(result, out_dir)
    return result


def discard_checkpoints(out_dir: Path) -> None:
    """Remove the checkpoint folders of a finished run (the progress files, which hold the rows, stay)."""
    for child in (Path(out_dir) / "checkpoints").glob("*"):
        if child.is_dir() and not child.name.startswith("."):
            atomic.remove_folder(child)  # renamed aside first: a checkpoint is whole or gone


# ------------------------------------------------------------------------------------------------ outputs
def _mean(summary: Optional[dict[str, Any]], key: str) -> Optional[float]:
    cell = (summary or {}).get(key)
    return float(cell["mean"]) if isinstance(cell, dict) and cell.get("mean") is not None else None


def _sem(summary: Optional[dict[str, Any]], key: str) -> Optional[float]:
    cell = (summary or {}).get(key)
    return float(cell["sem"]) if isinstance(cell, dict) and cell.get("sem") is not None else None


def flat_row(method: str, row: dict[str, Any], kind: str) -> dict[str, Any]:
    """One CSV row (fractions, not percent) of a checkpoint: the after-all protocol's metrics unprefixed (as
    ``protocol`` says), the immediate protocol's beside them as ``immediate_<metric>`` (None for the pre-edit
    row, where nothing was edited yet)."""
    out: dict[str, Any] = {"method": method, "n_edits": row["n_edits"], "protocol": PROTOCOL, "dataset": kind}
    for key in EDIT_METRICS[kind]:
        out[key] = _mean(row["edits"], key)
        out[f"{key}_sem"] = _sem(row["edits"], key)
    for key in EDIT_METRICS[kind]:
        out[f"{IMMEDIATE}_{key}"] = _mean(row.get(IMMEDIATE), key)
        out[f"{IMMEDIATE}_{key}_sem"] = _sem(row.get(IMMEDIATE), key)
    for key in EDIT_METRICS[kind]:
        out[f"first_batch_{key}"] = _mean(row["first_batch"], key)
    retention = row.get("retention") or {}
    out["retention_accuracy"] = retention.get("retention_accuracy")
    out["retention_preference"] = retention.get("retention_preference")
    for name, ppl in (row.get("perplexity") or {}).items():
        out[f"perplexity_{name}"] = ppl["perplexity"]
    out["fluency"] = row.get("fluency")
    out["seconds_per_batch"] = row.get("seconds_per_batch")
    out["state_mib"] = None if row.get("state_bytes") is None else row["state_bytes"] / 2**20
    growth = row.get("weight_growth")
    out["weight_growth_max"] = max(growth.values()) if growth else None
    for name, value in (growth or {}).items():  # every edited weight: weight_growth_<module>
        out[f"{GROWTH_PREFIX}{name.removesuffix('.weight')}"] = value
    return out


def flat_rows(result: LifelongResult) -> list[dict[str, Any]]:
    rows = [flat_row("Pre-edited", result.pre, result.kind)]
    for progress in result.methods:
        rows.extend(flat_row(progress.method, row, result.kind) for row in progress.rows)
    return rows


def _cell(value: Optional[float], sem: Optional[float] = None, scale: float = 100.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    text = f"{value * scale:.{digits}f}"
    return text + (f" ± {sem * scale:.{digits}f}" if sem is not None else "")


def _table_cells(flat: dict[str, Any], kind: str, prefix: str) -> list[str]:
    cells = [_cell(flat[f"{prefix}{k}"], flat[f"{prefix}{k}_sem"]) for k in ("efficacy", "generalization",
                                                                             "specificity")]
    return cells + ([_cell(flat[f"{prefix}score"])] if kind == "counterfact" else [])


def final_table(result: LifelongResult) -> str:
    """Markdown: each method's last checkpoint in the Table-1 layout under both protocols (one row each, labelled),
    plus retention, perplexity, time (the model's state at that checkpoint: on the after-all row)."""
    cfg = result.config
    dataset = {"counterfact": "CounterFact", "zsre": "zsRE"}[result.kind]
    ppl_names = list(result.pre.get("perplexity", {}))
    head = ["Method", "Edits", "Protocol", "Eff.", "Gen.", "Spe."] + (["Score"] if result.kind == "counterfact" else [])
    head += ["First batch Eff.", "Retention acc.", *[f"PPL {n}" for n in ppl_names], "Flu.", "s/batch",
             "State (MiB)"]
    lines = [
        f"{dataset}: {cfg.n_edits} sequential edits in batches of {cfg.batch_size}, two protocols: "
        f"*{PROTOCOL_LABELS[PROTOCOL]}* (every record edited so far, evaluated after the last batch) and "
        f"*{PROTOCOL_LABELS[IMMEDIATE]}* (each batch evaluated right after its own edit, the mean over all "
        f"batches); metrics in %, mean ± standard error; fluency = n-gram entropy x 100; the columns after the "
        f"edit metrics measure the model after the last batch (on the after-all row)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    n_rest = len(head) - 3 - len(_table_cells(flat_row("", result.pre, result.kind), result.kind, ""))
    for name, row in [("Pre-edited", result.pre)] + [(p.method, p.rows[-1]) for p in result.methods if p.rows]:
        flat = flat_row(name, row, result.kind)
        pre = name == "Pre-edited" and row is result.pre
        cells = [name, str(row["n_edits"]), "unedited" if pre else PROTOCOL_LABELS[PROTOCOL]]
        cells += _table_cells(flat, result.kind, "")
        cells += [_cell(flat["first_batch_efficacy"]), _cell(flat["retention_accuracy"])]
        cells += [_cell(flat.get(f"perplexity_{n}"), scale=1.0, digits=2) for n in ppl_names]
        cells += [_cell(flat["fluency"]), _cell(flat["seconds_per_batch"], scale=1.0, digits=2),
                  _cell(flat["state_mib"], scale=1.0, digits=2)]
        lines.append("| " + " | ".join(cells) + " |")
        if not pre:
            cells = [name, str(row["n_edits"]), PROTOCOL_LABELS[IMMEDIATE],
                     *_table_cells(flat, result.kind, f"{IMMEDIATE}_"), *["·"] * n_rest]
            lines.append("| " + " | ".join(cells) + " |")
    for progress in result.methods:
        if not progress.available:
            lines.append(f"\n{progress.method}: n/a: {progress.reason}")
    return "\n".join(lines) + "\n"


PLOT_METRICS: list[tuple[str, str, float]] = [
    ("efficacy", "Efficacy (%): after all (solid), immediate (dashed)", 100.0),
    ("generalization", "Generalization (%): after all (solid), immediate (dashed)", 100.0),
    ("specificity", "Specificity (%): after all (solid), immediate (dashed)", 100.0),
    ("first_batch_efficacy", "Efficacy, first batch only (%)", 100.0),
    ("retention_accuracy", "Retention: true-answer token accuracy (%)", 100.0),
    ("fluency", "Fluency (n-gram entropy x 100)", 100.0),
    ("seconds_per_batch", "Seconds per batch (mean so far)", 1.0),
    ("state_mib", "Carried state (MiB)", 1.0),
    ("weight_growth_max", "Edited weights: ||W - W0|| / ||W0|| (largest)", 1.0),
    ("weight_growth_layers", "||W - W0|| / ||W0|| of every edited weight", 1.0),
]
GROWTH_PREFIX = "weight_growth_"  # + the module name: one column per edited weight


GROWTH_MARKERS = ("o", "s", "^", "v", "D", "x", "P", "*")


def _weight_label(column: str) -> str:
    """``weight_growth_model.layers.3.mlp.down_proj`` -> ``layer 3`` (the module name where it has no number)."""
    found = re.search(r"\.(\d+)\.", column)
    return f"layer {found.group(1)}" if found else column[len(GROWTH_PREFIX):]


def plot_curves(result: LifelongResult, out_dir: Path) -> list[Path]:
    """One PNG per metric (against the number of edits, one line per method, pre-edit dashed) and one grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = flat_rows(result)
    pre = rows[0]
    metrics = list(PLOT_METRICS)
    metrics[6:6] = [(k, f"Perplexity, {k[len('perplexity_'):]} (log scale)", 1.0) for k in pre
                    if k.startswith("perplexity_")]
    growth_columns = sorted({k for r in rows for k in r if k.startswith(GROWTH_PREFIX)} - {"weight_growth_max"})
    metrics = [m for m in metrics if any(r.get(m[0]) is not None for r in rows)
               or (m[0] == "weight_growth_layers" and growth_columns)]
    methods = [p.method for p in result.methods if p.rows]

    both = {"efficacy", "generalization", "specificity", "score"}  # metrics with an immediate series beside

    def draw(ax: Any, key: str, scale: float) -> None:
        for i, name in enumerate(methods):
            series = [(key, name)]
            if key == "weight_growth_layers":  # one line per edited weight, the method's colour, a marker per layer
                series = [(c, f"{name}, {_weight_label(c)}") for c in growth_columns]
            elif key in both:
                series = [(key, f"{name}, {PROTOCOL_LABELS[PROTOCOL]}"),
                          (f"{IMMEDIATE}_{key}", f"{name}, {PROTOCOL_LABELS[IMMEDIATE]}")]
            for column, label in series:
                points = [(r["n_edits"], r[column] * scale) for r in rows
                          if r["method"] == name and r.get(column) is not None]
                if points:
                    style = "--" if column.startswith(IMMEDIATE) else "-"
                    marker = GROWTH_MARKERS[growth_columns.index(column) % len(GROWTH_MARKERS)] if (
                        column in growth_columns) else "o"
                    ax.plot(*zip(*points), style, marker=marker, markersize=3, label=label, color=series_color(i))
        if pre.get(key) is not None:
            ax.axhline(pre[key] * scale, linestyle="--", color="grey", label="pre-edit")
        if key.startswith("perplexity_"):
            ax.set_yscale("log")  # a collapsing method's perplexity grows by orders of magnitude

    paths: list[Path] = []
    for key, label, scale in metrics:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        draw(ax, key, scale)
        style_curve_axis(ax, label)
        ax.legend(fontsize=7)
        paths.append(savefig(fig, out_dir / f"lifelong_{_slug(key)}.png"))
    cfg = result.config
    title = (f"{result.kind}: sequential edits in batches of {cfg.batch_size} "
             f"({PROTOCOL_LABELS[PROTOCOL]} solid, {PROTOCOL_LABELS[IMMEDIATE]} dashed)")
    paths.append(save_curve_grid(metrics, draw, title, out_dir / "lifelong.png"))
    return paths


def write_outputs(result: LifelongResult, out_dir: Path) -> dict[str, Path]:
    """``lifelong.json`` (every checkpoint), ``lifelong.csv``, ``lifelong.md`` (final rows), PNG curves."""
    paths = {
        "json": write_json(out_dir / "lifelong.json", result.to_dict()),
        "csv": write_csv(out_dir / "lifelong.csv", flat_rows(result)),
        "md": atomic.write_text(out_dir / "lifelong.md", final_table(result)),
    }
    if any(p.rows for p in result.methods):
        paths["png"] = plot_curves(result, out_dir)[-1]
    diagnosed = {p.method: p.diagnostics for p in result.methods if p.diagnostics}
    if diagnosed:
        rows = [row for method, d in diagnosed.items() for row in flat_diagnostics(method, d)]
        paths["diagnostics_csv"] = write_csv(out_dir / "lifelong_diagnostics.csv", rows)
        title = f"{result.kind}: where each batch's edit stands ({result.config.batch_size} edits per batch)"
        png = plot_diagnostics(diagnosed, out_dir / "lifelong_diagnostics.png", title)
        if png is not None:
            paths["diagnostics_png"] = png
    return paths
