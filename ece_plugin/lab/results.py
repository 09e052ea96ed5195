"""Render every results table of README.md, testbed/README.md and docs/*.md from the data under results/.

Each reported experiment is a folder ``results/<name>/`` holding ``experiment.json`` (what was run: title,
testbed, data, protocol, commands, hparams, and the tables it gives), its data as CSV (one row per method,
setting and checkpoint; metrics in %, as the tables show them) and its figures. A document asks for a table
between two markers::

    <!-- results:NAME -->
    ...rendered here...
    <!-- /results:NAME -->

``python -m ece_plugin.lab.results`` rewrites what sits between the markers; ``--check`` writes nothing and exits
1 when a document differs from what it would render. Every table states its protocol: *scored after all* (every
edit evaluated after the last batch, as AlphaEdit, NSE and NAS report), *scored immediately* (each batch right
after its own edit, as the ECE paper's script and EasyEdit's ``batch_edit`` report) or one batch (the two agree).

A table in ``experiment.json``::

    "tables": {"NAME": {"file": "rows.csv", "caption": "...", "where": {"column": ["value", ...]},
                        "order": {"column": ["value", ...]},
                        "columns": [["Eff.", "{efficacy} ± {efficacy_sem}"], ...], "figure": "curve.png",
                        "join": {"experiment": "other", "file": "rows.csv", "on": "setting", "prefix": "bench_"}}}

A column is a header and one or more templates of the row's fields (``str.format`` syntax, numbers as numbers,
so ``{n_edits:,}`` gives 2,000): a cell shows the first template whose fields are all filled in that row (a
template without fields, such as ``"-"``, always is), else nothing. ``"include": [{"experiment": NAME, "where": {...}}]`` adds rows of another experiment
(run once, shown in several tables). ``"wide": {"by": "protocol", "key": ["setting"]}`` puts each key's
rows side by side: the after-all row's fields by their names, the immediate row's as ``immediate_<field>``.
``"figures": {"curve.png": {"file": "checkpoints.csv", "series": "{label}", "panels": [["efficacy", "ES (%)"],
["perplexity", "PPL", "log"], ...], "reference": {"setting": ["pre-edit"]}, "title": "..."}}`` (with ``include``,
``where`` and ``order`` as a table's) draws a figure from the data: one colour per series, after all solid,
immediate dashed, the reference rows (the unedited model) as a dotted line; ``<stem>.data.json`` beside it holds
exactly what is drawn, and ``--check`` compares that with the data (a figure is redrawn only when it differs).
``protocol`` (``after_all``, ``immediate``, ``both``, ``one_batch`` or ``unscored``) may be set per table;
otherwise the experiment's applies. ``--add-lifelong RUN --experiment NAME`` adds a ``lifelong`` run's checkpoints
(its ``lifelong.csv``, both protocols) to ``results/NAME/`` as rows in %; ``--add-timing RUN --experiment NAME`` adds
a ``bench --timing`` run's methods (its ``timing.json``: s/batch, ratio to ECE, z steps taken) to ``rows.csv``. The table ``hparams`` is not from results/: it lists the fields of
``ECEHyperParams`` with the descriptions below, and fails when a field has none.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import re
import string
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..method.atomic import write_text
from ..resources import REPO_ROOT

logger = logging.getLogger(__name__)

PROTOCOLS = {
    "after_all": "scored after all (every edit evaluated after the last batch, as AlphaEdit, NSE and NAS report)",
    "immediate": "scored immediately (each batch evaluated right after its own edit, as the ECE paper's script "
                 "and EasyEdit's batch_edit report)",
    "both": "both protocols, each labelled: scored after all (every edit after the last batch) and scored "
            "immediately (each batch right after its own edit)",
    "one_batch": "one batch, scored right after its edit (with one batch, immediate and after all are the same)",
    "unscored": "edit times only, nothing scored",
}
MARKER = re.compile(r"<!-- results:(?P<name>[A-Za-z0-9_.-]+) -->\n(?P<body>.*?)<!-- /results:(?P=name) -->",
                    re.DOTALL)
OPEN_MARKER = re.compile(r"<!-- results:([A-Za-z0-9_.-]+) -->")
HPARAMS_TABLE = "hparams"

# One line per ECEHyperParams field: what it does, with the paper's symbol where it has one. A field without an
# entry stops the render; an entry for a field that no longer exists fails tests/test_results.py.
HPARAM_DOC: dict[str, str] = {
    "model_name": "Hugging Face name or folder of the model to edit",
    "layers": "the MLP layers whose output weights W_out are edited (MEMIT's critical layers)",
    "attribution": "neuron attribution of step 1: `AS` activation score, `WI` weight importance, `RS` residual "
                   "sensitivity",
    "neuron_threshold": "p: keep the smallest set of top neurons holding this share of the attribution score; "
                        "1.0 edits every neuron (no selection)",
    "clustering": "step 3: cluster the edits by the Jaccard distance of their neuron sets (false: every edit is "
                  "its own cluster, z as MEMIT's)",
    "n_clusters": "fixed number of clusters; empty: ceil(cluster_ratio x edits in the batch)",
    "cluster_ratio": "clusters per edit when n_clusters is empty",
    "v_num_grad_steps": "z steps per edit when clustering is off (MEMIT's z budget)",
    "shared_grad_steps": "step 4, phase 1: z steps on each cluster's anchor",
    "per_edit_grad_steps": "step 4, phase 2: per-edit z steps from the cluster's shared delta",
    "v_lr": "learning rate of the z steps",
    "v_loss_layer": "layer whose output the z loss reads; -1: the model's last layer",
    "v_weight_decay": "weight decay on the z delta (MEMIT's form, ||delta|| / ||h||^2)",
    "clamp_norm_factor": "the z delta is clamped to this multiple of ||h||",
    "kl_factor": "weight of the KL term that keeps the subject's other predictions (0 skips its prompt)",
    "fact_token": "where the key is read: `subject_last`, `last`, `subject_first`, `subject_first_after_last`",
    "z_prefix_cache": "run each prompt's tokens before the fact token once per batch (exact, faster)",
    "layer_replay": "do not re-run layers no change can reach, in z steps and key re-reads (exact, faster)",
    "z_loss_positions_only": "run the loss layer's MLP only at the positions the z loss reads (exact, faster)",
    "key_positions_only": "in the key reads, run the MLP of the deepest layer read only at the fact tokens (exact, "
    "faster)",
    "z_cache_mb": "memory bound of the prefix cache in MiB; more edits run in blocks, with the same result",
    "context_template_length_params": "MEMIT's context templates: [[length, count], ...]",
    "mom2_adjustment": "use the key covariance C0 in the update (MEMIT's mom2 adjustment)",
    "mom2_update_weight": "lambda: weight of C0 in the update's Gram matrix",
    "carry_keys": "carry the keys of earlier edits into later updates (Cprev, the paper's sequential form); false "
                  "gives MEMIT's update, which carries nothing",
    "prompt_keys_weight": "departure, 0 in the paper's form: mu, the weight of the keys at the other tokens of the "
                          "rewrite prompts in the update's covariance (docs/departures.md)",
    "carry_prompt_keys": "those prompt keys also join the carried keys",
    "prompt_keys_decay": "gamma: with < 1 the carried prompt keys fade by this factor per batch; 1: they never fade",
    "norm_anchor_budget": "departure, 0: rho > 0 pulls each edited layer's drift back onto ||W - W0|| <= rho ||W0|| "
                          "before every batch (bounded weight growth; variants/norm_anchor.py)",
    "norm_anchor_ridge": "departure, 0: alpha > 0 adds alpha ||W_new - W0||^2 at the batch's neurons to each layer's "
                         "update (a ridge anchored at the unedited weight; variants/norm_anchor.py)",
    "mom2_update_weight_growth": "departure, 0: beta > 0 writes the batch after n carried edits with lambda + "
                                 "beta n, so that C0 keeps pace with the carried keys (variants/balanced_lambda.py)",
    "mom2_dataset": "name of the statistics set (the cache path's `{name}_stats`); `wikitext-2-raw` is bundled, a "
                    "model folder's `<name>.txt` is read for it, any other name needs its cache file",
    "mom2_corpus": "text file or folder to compute C0 from; empty: the set mom2_dataset names",
    "mom2_fallback_corpus": "a corpus (bundled name or path) to compute C0 from, cached under its own name, when "
                            "mom2_dataset's statistics cannot be had; empty: no fallback, a clear error",
    "mom2_n_samples": "chunks of the corpus for C0 (as EasyEdit's layer_stats counts texts)",
    "mom2_dtype": "dtype of the statistics pass",
    "stats_dir": "cache folder of the statistics (EasyEdit's layout)",
    "rewrite_module_tmp": "module name template of W_out (`{}` = layer)",
    "layer_module_tmp": "module name template of a decoder layer",
    "mlp_module_tmp": "module name template of a layer's MLP",
    "attn_module_tmp": "module name template of a layer's attention",
    "ln_f_module": "name of the final norm",
    "lm_head_module": "name of the output head",
    "alg_name": "always `ECE` (EasyEdit's method key)",
    "device": "device index or name (`cpu`, `cuda:0`)",
    "batch_size": "EasyEdit's batch size for batch_edit",
    "max_length": "EasyEdit's maximum generation length in its evaluation",
    "model_parallel": "EasyEdit's model-parallel flag",
    "state_device": "where the sequential state lives: `cpu` or `model` (each layer's device)",
    "seed": "seed of the context templates and clustering ties",
}


class ResultsError(ValueError):
    """results/ or a document is malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class Table:
    """One table of an experiment, as ``experiment.json`` declares it."""

    name: str
    experiment: str
    spec: dict[str, Any]
    meta: dict[str, Any]


def _number(text: str) -> Union[int, float, str]:
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def read_rows(path: Path) -> list[dict[str, str]]:
    """A CSV's rows as strings (empty cells are empty strings)."""
    if not path.is_file():
        raise ResultsError(f"{path}: no such data file")
    with open(path, newline="") as f:
        return [dict(row) for row in csv.DictReader(f)]


def load_tables(root: Path) -> dict[str, Table]:
    """Every table of every ``results/<name>/experiment.json``; a name declared twice is an error."""
    tables: dict[str, Table] = {}
    for meta_path in sorted(root.glob("*/experiment.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise ResultsError(f"{meta_path}: not valid JSON: {exc}") from exc
        for key in ("title", "protocol", "commands", "tables"):
            if key not in meta:
                raise ResultsError(f"{meta_path}: missing {key!r}")
        for name, spec in meta["tables"].items():
            if name in tables or name == HPARAMS_TABLE:
                raise ResultsError(f"{meta_path}: table {name!r} is declared twice")
            protocol = spec.get("protocol", meta["protocol"])
            if protocol not in PROTOCOLS:
                raise ResultsError(f"{meta_path}: table {name!r}: protocol {protocol!r} is not one of {list(PROTOCOLS)}")
            tables[name] = Table(name, meta_path.parent.name, spec, meta)
    return tables


def _fields(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def _cell(templates: Sequence[str], row: dict[str, str], where: str) -> str:
    for template in templates:
        fields = _fields(template)
        absent = [f for f in fields if f not in row]
        if absent:
            raise ResultsError(f"{where}: no column {absent} in the data (columns: {sorted(row)})")
        if all(row[f] != "" for f in fields):
            try:
                return template.format(**{f: _number(row[f]) for f in fields})
            except ValueError as exc:
                raise ResultsError(f"{where}: template {template!r} on {[row[f] for f in fields]}: {exc}") from exc
    return ""


def _table_rows(root: Path, table: Table) -> list[dict[str, str]]:
    """The table's own rows (``file``, default rows.csv; ``"file": null`` for none) and those of each ``include``
    entry, ``{"experiment": NAME, "file": "rows.csv", "where": {...}}``: rows of another experiment that this
    table shows beside its own (a baseline run once, shown in several tables)."""
    spec = table.spec
    own = spec.get("file", "rows.csv")
    rows = read_rows(root / table.experiment / own) if own else []
    for entry in spec.get("include", []):
        source = f"results/{table.experiment}/experiment.json, table {table.name!r}, include {entry.get('experiment')!r}"
        if "experiment" not in entry:
            raise ResultsError(f"results/{table.experiment}/experiment.json, table {table.name!r}: an include "
                               "entry names no experiment")
        other = read_rows(root / entry["experiment"] / entry.get("file", "rows.csv"))
        rows += _selected(other, entry.get("where", {}), source)
    columns = list(dict.fromkeys(c for r in rows for c in r))  # the union: every row has every column
    return [{c: r.get(c, "") for c in columns} for r in rows]


def _joined(root: Path, table: Table, rows: list[dict[str, str]]) -> list[dict[str, str]]:
    join = table.spec.get("join")
    if not join:
        return rows
    other = read_rows(root / join["experiment"] / join["file"])
    key, prefix = join["on"], join.get("prefix", "")
    by_key = {r[key]: r for r in other}
    names = [c for c in (other[0] if other else {}) if c != key]
    out = []
    for row in rows:
        match = by_key.get(row.get(key, ""), {})
        out.append({**row, **{prefix + c: match.get(c, "") for c in names}})
    return out


def _selected(rows: list[dict[str, str]], where: dict[str, Any], source: str) -> list[dict[str, str]]:
    for column, wanted in where.items():
        values = {str(v) for v in (wanted if isinstance(wanted, list) else [wanted])}
        if rows and column not in rows[0]:
            raise ResultsError(f"{source}: 'where' names column {column!r}, which the data lacks")
        rows = [r for r in rows if r[column] in values]
    return rows


def _ordered(rows: list[dict[str, str]], order: dict[str, list[Any]], source: str) -> list[dict[str, str]]:
    """Rows sorted by the position of their value in each ``order`` list (stable; unlisted values last)."""
    for column, values in reversed(list(order.items())):
        if rows and column not in rows[0]:
            raise ResultsError(f"{source}: 'order' names column {column!r}, which the data lacks")
        rank = {str(v): i for i, v in enumerate(values)}
        rows = sorted(rows, key=lambda r: rank.get(r[column], len(rank)))
    return rows


def _widened(rows: list[dict[str, str]], wide: Optional[dict[str, Any]], source: str) -> list[dict[str, str]]:
    """With ``"wide": {"by": "protocol", "key": ["setting", ...]}``: one row per key. The row whose ``by`` column
    holds ``first`` (default ``after_all``) keeps its field names, each other row's fields become
    ``<value>_<field>`` (so an immediate row's efficacy is ``immediate_efficacy`` beside the after-all row's
    ``efficacy``). A key without a ``first`` row has its key columns and its prefixed values only."""
    if not wide:
        return rows
    by, key = wide["by"], list(wide["key"])
    for column in (by, *key):
        if rows and column not in rows[0]:
            raise ResultsError(f"{source}: 'wide' names column {column!r}, which the data lacks")
    first = str(wide.get("first", "after_all"))
    groups: dict[tuple[str, ...], dict[str, str]] = {}
    for row in rows:
        merged = groups.setdefault(tuple(row[k] for k in key), {c: "" for c in row})
        if row[by] == first:
            merged.update({c: v for c, v in row.items() if v != "" or c not in merged})
        else:
            merged.update({f"{row[by]}_{c}": v for c, v in row.items()})
            for c, v in row.items():  # the key's own columns, for a key with no row of the first value
                if c in key:
                    merged[c] = v
    columns = sorted({c for m in groups.values() for c in m})
    return [{c: m.get(c, "") for c in columns} for m in groups.values()]


def _relative(target: Path, doc: Path) -> str:
    return Path(os.path.relpath(target, doc.parent)).as_posix()


def render_table(root: Path, table: Table, doc: Path, drawn: frozenset[Path] | set[Path] = frozenset()) -> str:
    """The Markdown of one table (caption with its protocol, the table, its figure), links relative to ``doc``."""
    spec, where = table.spec, f"results/{table.experiment}/experiment.json, table {table.name!r}"
    folder = root / table.experiment
    rows = _selected(_joined(root, table, _table_rows(root, table)), spec.get("where", {}), where)
    rows = _ordered(_widened(rows, spec.get("wide"), where), spec.get("order", {}), where)
    if not rows:
        raise ResultsError(f"{where}: no rows selected")
    columns = spec["columns"]
    protocol = PROTOCOLS[spec.get("protocol", table.meta["protocol"])]
    caption = spec.get("caption", table.meta["title"]).rstrip(".")
    lines = [f"{caption}. Protocol: {protocol}. Data: [`results/{table.experiment}/`]({_relative(folder, doc)}/).", "",
             "| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(c[1:], row, where) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    figure = spec.get("figure")
    if figure:
        if not (folder / figure).is_file() and folder / figure not in drawn:
            raise ResultsError(f"{where}: figure {figure!r} is not in results/{table.experiment}/")
        lines += ["", f"![{spec.get('figure_alt', caption)}]({_relative(folder / figure, doc)})"]
    return "\n".join(lines) + "\n"


# ----- figures drawn from the data ------------------------------------------------------------------------

PROTOCOL_METRICS = ("efficacy", "generalization", "specificity", "score")  # differ between the two protocols
PROTOCOL_STYLES = {"after_all": "-", "immediate": "--"}


@dataclass(frozen=True)
class Figure:
    """One figure of an experiment, as ``experiment.json`` declares it under ``"figures"``."""

    name: str
    experiment: str
    spec: dict[str, Any]

    @property
    def source(self) -> str:
        return f"results/{self.experiment}/experiment.json, figure {self.name!r}"

    def paths(self, root: Path) -> tuple[Path, Path]:
        """The PNG and its data file (``<stem>.data.json``: exactly what is drawn, for ``--check``)."""
        png = root / self.experiment / self.name
        return png, png.with_name(png.stem + ".data.json")


def load_figures(root: Path) -> list[Figure]:
    """Every figure of every ``results/<name>/experiment.json``; each must be a ``.png`` name."""
    figures = []
    for meta_path in sorted(root.glob("*/experiment.json")):
        for name, spec in json.loads(meta_path.read_text()).get("figures", {}).items():
            if not name.endswith(".png") or "/" in name:
                raise ResultsError(f"{meta_path}: figure {name!r} is not a PNG file name")
            for key in ("series", "panels", "title"):
                if key not in spec:
                    raise ResultsError(f"{meta_path}: figure {name!r} has no {key!r}")
            figures.append(Figure(name, meta_path.parent.name, spec))
    return figures


def _float(value: str, source: str, column: str) -> Optional[float]:
    if value in ("", "None", "nan", "-"):
        return None
    try:
        return float(value.replace(",", ""))
    except ValueError as exc:
        raise ResultsError(f"{source}: column {column!r} holds {value!r}, not a number") from exc


def figure_data(root: Path, figure: Figure) -> dict[str, Any]:
    """What ``figure`` draws, read from the data: per series (``"series"``, a template such as ``"{label}"``) and
    protocol the points (``x``, default ``n_edits``) of every panel's column. The columns of
    :data:`PROTOCOL_METRICS` are drawn per protocol (after all solid, immediate dashed), the others once (they do
    not depend on the protocol). Rows matching ``"reference"`` (the unedited model) give each panel a grey line."""
    spec, source = figure.spec, figure.source
    table = Table(figure.name, figure.experiment, spec, {})
    rows = _ordered(_selected(_table_rows(root, table), spec.get("where", {}), source), spec.get("order", {}), source)
    x_column = spec.get("x", "n_edits")
    panels = [list(p) for p in spec["panels"]]
    for column in [x_column, *(p[0] for p in panels)]:
        if rows and column not in rows[0]:
            raise ResultsError(f"{source}: no column {column!r} in the data")
    reference_where = spec.get("reference", {})
    reference = _selected(rows, reference_where, source) if reference_where else []
    drawn = [r for r in rows if r not in reference]
    if not drawn:
        raise ResultsError(f"{source}: no rows selected")
    series: dict[str, dict[str, dict[str, list[list[float]]]]] = {}
    for row in drawn:
        label = _cell([spec["series"]], row, source)
        protocol = row.get("protocol") or "after_all"
        x = _float(row[x_column], source, x_column)
        if x is None:
            continue
        by_protocol = series.setdefault(label, {})
        for column, *_ in panels:
            if column not in PROTOCOL_METRICS and protocol != "after_all" and "after_all" in by_protocol:
                continue  # drawn once, from the after-all row
            y = _float(row[column], source, column)
            if y is None:
                continue
            points = by_protocol.setdefault(protocol if column in PROTOCOL_METRICS else "after_all", {})
            line = points.setdefault(column, [])
            line[:] = [p for p in line if p[0] != x] + [[x, y]]
    for by_protocol in series.values():
        for points in by_protocol.values():
            for line in points.values():
                line.sort()
    ref = {}
    for column, *_ in panels:
        values = [v for v in (_float(r[column], source, column) for r in reference) if v is not None]
        if values:
            ref[column] = values[0]
    return {"title": spec["title"], "x": x_column, "panels": panels,
            "series": [{"label": label, "protocols": by_protocol} for label, by_protocol in series.items()],
            "reference": ref}


def draw_figure(data: dict[str, Any], path: Path) -> Path:
    """Draw ``figure_data``'s result: one panel per column, one colour per series, solid after all, dashed
    immediate, the unedited model as a grey dotted line; written atomically."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .study.common import legend_entries, savefig

    cols = min(3, len(data["panels"]))
    nrows = math.ceil(len(data["panels"]) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.1 * nrows), squeeze=False)
    for ax, (column, title, *scale) in zip(axes.flat, data["panels"]):
        if not any(one["protocols"].get(p, {}).get(column) for one in data["series"] for p in one["protocols"]):
            ax.text(0.5, 0.5, "not recorded by these runs", ha="center", va="center", transform=ax.transAxes)
        for i, one in enumerate(data["series"]):
            for protocol, points in one["protocols"].items():
                line = points.get(column)
                if line:
                    ax.plot([p[0] for p in line], [p[1] for p in line], PROTOCOL_STYLES.get(protocol, ":"),
                            marker="o", markersize=3, color=f"C{i % 10}", label=one["label"])
        if column in data["reference"]:
            ax.axhline(data["reference"][column], color="black", alpha=0.6, linestyle=":", label="before editing")
        if scale and scale[0] == "log":
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("number of edits" if data["x"] == "n_edits" else data["x"])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(data["panels"]):]:
        ax.axis("off")
    handles, labels = legend_entries(list(axes.flat))
    ncol = min(len(labels), 3) or 1
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.suptitle(data["title"], fontsize=10)
    legend_rows = math.ceil(len(labels) / ncol)
    fig.tight_layout(rect=(0, min(0.35, 0.02 + 0.22 * legend_rows / (3.1 * nrows)), 1, 0.97))  # ~0.22 in a row
    return savefig(fig, path)


def stale_figures(root: Path) -> list[tuple[Figure, dict[str, Any]]]:
    """Every declared figure whose data file differs from what the data gives, or whose PNG is missing, with the
    data to draw it from (computed, not drawn: a bad figure stops the render before anything is written)."""
    stale = []
    for figure in load_figures(root):
        data = figure_data(root, figure)
        png, data_path = figure.paths(root)
        if not (png.is_file() and data_path.is_file() and data_path.read_text() == _figure_text(data)):
            stale.append((figure, data))
    return stale


def _figure_text(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def write_figure(root: Path, figure: Figure, data: dict[str, Any]) -> Path:
    """Draw ``figure`` from ``data`` and write its data file beside it."""
    png, data_path = figure.paths(root)
    draw_figure(data, png)
    write_text(data_path, _figure_text(data))
    logger.info("drew %s", png)
    return png


def render_hparams() -> str:
    """The reference table of ECEHyperParams: every field, its type, default and description."""
    from ..method.hparams import ECEHyperParams

    lines = ["| Key | Type | Default | What it does |", "|---|---|---|---|"]
    missing = []
    for f in dataclasses.fields(ECEHyperParams):
        if f.name not in HPARAM_DOC:
            missing.append(f.name)
            continue
        if f.default is not dataclasses.MISSING:
            default = f"`{f.default!r}`"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"`{f.default_factory()!r}`"
        else:
            default = "required"
        kind = str(f.type).replace("|", "or")
        lines.append(f"| `{f.name}` | `{kind}` | {default} | {HPARAM_DOC[f.name]} |")
    if missing:
        raise ResultsError(f"ECEHyperParams field(s) {missing} have no description in HPARAM_DOC "
                           f"(ece_plugin/lab/results.py)")
    return "\n".join(lines) + "\n"


def render_document(text: str, doc: Path, renderers: dict[str, Callable[[Path], str]]) -> str:
    """``text`` with every marked block re-rendered; an unknown or unclosed marker is an error naming it."""
    opened = OPEN_MARKER.findall(text)
    closed = [m.group("name") for m in MARKER.finditer(text)]
    if sorted(opened) != sorted(closed):
        unclosed = sorted(set(opened) - set(closed)) or opened
        raise ResultsError(f"{doc}: marker(s) {unclosed} without their <!-- /results:NAME --> close")

    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in renderers:
            raise ResultsError(f"{doc}: no table {name!r} in results/ (known: {sorted(renderers)})")
        return f"<!-- results:{name} -->\n{renderers[name](doc)}<!-- /results:{name} -->"

    return MARKER.sub(replace, text)


def documents(repo: Path) -> list[Path]:
    """README.md, testbed/README.md and every Markdown file under docs/."""
    pages = [repo / "README.md", repo / "testbed" / "README.md", *sorted((repo / "docs").rglob("*.md"))]
    return [p for p in pages if p.is_file()]


def renderers_for(root: Path, drawn: frozenset[Path] | set[Path] = frozenset()) -> dict[str, Callable[[Path], str]]:
    """The renderer of every table name: those of results/ and the hparams reference. ``drawn``: figures about to
    be drawn, which a table may show before they exist."""

    def one(table: Table) -> Callable[[Path], str]:
        return lambda doc: render_table(root, table, doc, drawn)

    out = {name: one(table) for name, table in load_tables(root).items()}
    out[HPARAMS_TABLE] = lambda doc: render_hparams()
    return out


def render_all(repo: Path, root: Optional[Path] = None, write: bool = True,
               docs: Optional[Sequence[Path]] = None) -> list[Path]:
    """Render every document; return those whose text differs from what was rendered (written when ``write``)."""
    root = root or repo / "results"
    figures = stale_figures(root)
    renderers = renderers_for(root, drawn={root / f.experiment / f.name for f, _ in figures})
    pages = []
    for doc in docs if docs is not None else documents(repo):
        text = doc.read_text()
        new = render_document(text, doc, renderers)
        if new != text:
            pages.append((doc, new))
    if write:  # everything rendered without error: only now is anything written
        for figure, data in figures:
            write_figure(root, figure, data)
        for doc, new in pages:
            write_text(doc, new)
            logger.info("rendered %s", doc)
    return [root / f.experiment / f.name for f, _ in figures] + [doc for doc, _ in pages]


# ----- adding a lifelong run to results/ ------------------------------------------------------------------

LIFELONG_METRICS = ("efficacy", "generalization", "specificity", "score")
PROTOCOL_LABELS = {"after_all": "scored after all", "immediate": "scored immediately"}
LABEL = re.compile(r"^(?P<method>[^\[\s]+)(?: \[(?P<overrides>[^\]]*)\])?")


def method_and_overrides(label: str) -> tuple[str, dict[str, str]]:
    """``"ECE-AS [neuron_threshold=1.0, clustering=False]"`` -> ``("ECE-AS", {"neuron_threshold": "1.0", ...})``."""
    match = LABEL.match(label.strip())
    if not match:
        raise ResultsError(f"method label {label!r}: expected 'METHOD' or 'METHOD [key=value, ...]'")
    overrides = {}
    for pair in filter(None, (match.group("overrides") or "").split(", ")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise ResultsError(f"method label {label!r}: {pair!r} is not key=value")
        overrides[key] = value
    return match.group("method"), overrides


def _percent(value: str, digits: int = 1) -> str:
    return "" if value in ("", "None", "nan") else f"{float(value) * 100:.{digits}f}"


def _plain(value: str, digits: int) -> str:
    return "" if value in ("", "None", "nan") else f"{float(value):.{digits}f}"


PRE_EDITED = "Pre-edited"
PRE_EDIT_FIELDS = {"setting": "pre-edit", "label": PRE_EDITED, "bench_key": ""}  # instead of a run's


def edit_time_vs_first(run: Path) -> dict[tuple[str, int], float]:
    """``(method label, n_edits) -> T / (k x t_1)`` for every whole batch count k of each method in ``run``'s
    ``lifelong.json``: T the edit time of its first k batches, t_1 the first batch's. A flat line (1.0) means the
    carried state does not slow later batches; {} where the run recorded no batch times."""
    path = run / "lifelong.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    size = int((data.get("config") or {}).get("batch_size") or 0)
    out: dict[tuple[str, int], float] = {}
    for entry in data.get("methods") or []:
        seconds = [float(s) for s in entry.get("batch_seconds") or []]
        if size <= 0 or not seconds or seconds[0] <= 0:
            continue
        for k in range(1, len(seconds) + 1):
            out[(str(entry.get("method")), k * size)] = sum(seconds[:k]) / (k * seconds[0])
    return out


def lifelong_rows(flat: dict[str, str], fields: dict[str, str],
                  time_vs_first: Optional[dict[tuple[str, int], float]] = None) -> list[dict[str, str]]:
    """One ``lifelong.csv`` row (fractions) as results rows in %: after all, and immediate where it was scored;
    ``time_vs_first`` (:func:`edit_time_vs_first`) adds ``edit_time_vs_first`` where it has the row."""
    method, overrides = method_and_overrides(flat["method"])
    ratio = (time_vs_first or {}).get((flat["method"], int(flat["n_edits"])))
    if method == PRE_EDITED:  # the unedited model is no setting of a method: one row for every run of the sequence
        fields = {**fields, **{k: v for k, v in PRE_EDIT_FIELDS.items() if k in fields}}
    ppl = [k for k in flat if k.startswith("perplexity_")]
    common = {**fields, "method": method, **overrides, "n_edits": flat["n_edits"], "dataset": flat.get("dataset", ""),
              "first_batch_efficacy": _percent(flat.get("first_batch_efficacy", "")),
              "retention_accuracy": _percent(flat.get("retention_accuracy", "")),
              "perplexity": _plain(flat[ppl[0]], 2) if ppl else "", "fluency": _percent(flat.get("fluency", "")),  # n-gram entropy x 100, as every table shows it
              "seconds_per_batch": _plain(flat.get("seconds_per_batch", ""), 2),
              "state_mib": _plain(flat.get("state_mib", ""), 2),
              "weight_growth_max": _plain(flat.get("weight_growth_max", ""), 2),
              "edit_time_vs_first": "" if ratio is None else f"{ratio:.2f}"}
    out = []
    for protocol, prefix in (("after_all", ""), ("immediate", "immediate_")):
        metrics = {}
        for key in LIFELONG_METRICS:
            metrics[key] = _percent(flat.get(f"{prefix}{key}", ""))
            metrics[f"{key}_sem"] = _percent(flat.get(f"{prefix}{key}_sem", ""))
        if protocol == "after_all" or metrics["efficacy"]:
            out.append({**common, "protocol": protocol, "protocol_label": PROTOCOL_LABELS[protocol], **metrics})
    return out


def _merged_csv(path: Path, new: list[dict[str, str]], key: Sequence[str], force: bool) -> str:
    """The text of the CSV at ``path`` with ``new`` appended (the union of columns); a row with the same key is
    refused unless ``force``, which replaces it. A pre-edit row equal to the one held on every column the held
    one fills is kept once (runs of one sequence share it; columns added since, absent or left empty in the held
    row, do not make it another row)."""
    old = read_rows(path) if path.is_file() else []
    held = {tuple(r.get(k, "") for k in key): r for r in old}

    def held_already(row: dict[str, str]) -> bool:
        same = held.get(tuple(row.get(k, "") for k in key))
        return (row.get("method") == PRE_EDITED and same is not None
                and all(same.get(c, "") in ("", v) for c, v in row.items()))

    new = [r for r in new if not held_already(r)]
    keys = {tuple(r.get(k, "") for k in key) for r in new}
    clash = [r for r in old if tuple(r.get(k, "") for k in key) in keys]
    if clash and not force:
        raise ResultsError(f"{path}: already holds {len(clash)} of these rows (same {', '.join(key)}); "
                           f"--force replaces them")
    rows = [r for r in old if tuple(r.get(k, "") for k in key) not in keys] + new
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    return _csv_text([columns] + [[row.get(c, "") for c in columns] for row in rows])


def _csv_text(lines: list[list[str]]) -> str:
    import io

    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(lines)
    return out.getvalue()


def add_lifelong(run: Path, folder: Path, fields: dict[str, str], force: bool = False) -> tuple[int, int]:
    """Add the checkpoints of ``run/lifelong.csv`` to ``folder/checkpoints.csv`` and each method's last checkpoint
    (with the pre-edit row) to ``folder/rows.csv``; return how many rows each got. Nothing is written when a
    row is already there (unless ``force``) or the run is not a lifelong run."""
    source = run / "lifelong.csv"
    flat = read_rows(source)
    if not flat or "n_edits" not in flat[0] or "method" not in flat[0]:
        raise ResultsError(f"{source}: not a lifelong.csv (no method / n_edits columns)")
    if not (folder / "experiment.json").is_file():
        raise ResultsError(f"{folder}: no experiment.json; write what was run there first")
    ratios = edit_time_vs_first(run)
    every = [row for f in flat for row in lifelong_rows(f, fields, ratios)]
    last: dict[str, dict[str, str]] = {}
    for f in flat:
        if f["method"] not in last or int(f["n_edits"]) >= int(last[f["method"]]["n_edits"]):
            last[f["method"]] = f
    final = [row for f in last.values() for row in lifelong_rows(f, fields, ratios)]
    overrides = sorted({k for f in flat for k in method_and_overrides(f["method"])[1]})
    key = list(dict.fromkeys([*fields, "method", *overrides, "n_edits", "protocol"]))
    texts = {name: _merged_csv(folder / name, rows, key, force)  # both checked before either is written
             for name, rows in (("checkpoints.csv", every), ("rows.csv", final))}
    for name, text in texts.items():
        write_text(folder / name, text)
    return len(every), len(final)


#: A timing run's method -> (setting, label, implementation) for the baselines; ECE's come from ``--field``.
TIMING_BASELINES = {
    "MEMIT": ("MEMIT", "MEMIT (EasyEdit main)", "EasyEdit main, BaseEditor"),
    "AlphaEdit": ("AlphaEdit", "AlphaEdit (EasyEdit main)", "EasyEdit main, BaseEditor"),
}
_VARIANT = re.compile(r"^(?P<method>[^(]+?)(?: \((?P<variant>[^)]*)\))?$")


def _round_seconds(times: Sequence[float]) -> float:
    """Seconds per batch of one round: its batches' mean (a round of ``bench --timing`` lists each batch's)."""
    return sum(float(t) for t in times) / len(times)


def timing_rows(report: dict[str, Any], fields: dict[str, str]) -> list[dict[str, str]]:
    """One results row per method of a ``bench --timing`` report (``timing.json``'s ``report``): s/batch (the median
    of rounds), its ratio to ECE's, the rounds, quality in %, peak RSS and the z steps taken (mean, largest, share
    converged; each edit's own are in ``timing.json``). ECE's rows
    take ``setting`` and ``label`` from ``fields``; a baseline's are its own (:data:`TIMING_BASELINES`)."""
    z_budget = str(report.get("z_steps_per_edit", ""))
    ece_setting = fields.get("setting", "ECE")
    out = []
    for m in report.get("methods") or []:
        if not m.get("available") or m.get("median_seconds_per_batch") is None:
            continue
        match = _VARIANT.match(str(m["method"]))
        method, variant = (match.group("method"), match.group("variant") or "") if match else (m["method"], "")
        if method in TIMING_BASELINES:
            setting, label, implementation = TIMING_BASELINES[method]
        else:
            setting, label, implementation = ece_setting, fields.get("label", method), "this project"
        quality = m.get("quality") or {}
        steps = m.get("z_steps") or {}
        memory = m.get("peak_memory") or {}
        rss = memory.get("process_max_rss_mib")
        key = "-".join([setting, z_budget] + ([variant.replace(" ", "-")] if variant else []))
        out.append({
            **fields, "bench_key": key, "setting": setting, "method": method, "variant": variant,
            "z_steps": z_budget, "implementation": implementation, "label": label,
            "seconds_per_batch": _plain(str(m["median_seconds_per_batch"]), 2),
            "rounds": ", ".join(f"{_round_seconds(t):.2f}" for t in m.get("seconds_per_batch_by_round") or []),
            "times_ece": _plain(str(m.get("ratio_to_ece")), 2),
            **{k: _percent(str(quality.get(k, "")), 2) for k in LIFELONG_METRICS},
            "peak_rss_mib": "" if rss is None else f"{float(rss):.0f}",
            "z_steps_mean": _plain(str(steps.get("z_steps_mean")), 1),
            "z_steps_max": _plain(str(steps.get("z_steps_max")), 0),
            "z_converged": _percent(str(steps.get("z_converged")), 1),
        })
    return out


def add_timing(run: Path, folder: Path, fields: dict[str, str], force: bool = False) -> int:
    """Add the methods of ``run/timing.json`` (``bench --timing``) to ``folder/rows.csv``; return how many.
    Nothing is written when a row is already there (same ``run`` and ``bench_key``) unless ``force``."""
    source = run / "timing.json"
    try:
        report = json.loads(source.read_text())["report"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResultsError(f"{source}: not a bench --timing result ({' '.join(str(exc).split())[:80]})") from exc
    if not (folder / "experiment.json").is_file():
        raise ResultsError(f"{folder}: no experiment.json; write what was run there first")
    rows = timing_rows(report, fields)
    if not rows:
        raise ResultsError(f"{source}: no method with a time")
    key = list(dict.fromkeys([*fields, "bench_key"]))
    write_text(folder / "rows.csv", _merged_csv(folder / "rows.csv", rows, key, force))
    return len(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ece_plugin.lab.results", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a document is out of date")
    parser.add_argument("--repo", type=Path, default=REPO_ROOT, help="repository root (default %(default)s)")
    parser.add_argument("--add-lifelong", type=Path, metavar="RUN",
                        help="add this lifelong run's checkpoints to results/EXPERIMENT/ (then render)")
    parser.add_argument("--add-timing", type=Path, metavar="RUN",
                        help="add this bench --timing run's methods to results/EXPERIMENT/rows.csv (then render)")
    parser.add_argument("--experiment", help="with --add-lifelong / --add-timing: the folder under results/")
    parser.add_argument("--field", action="append", default=[], metavar="KEY=VALUE",
                        help="with --add-lifelong / --add-timing: a column given to every added row, e.g. setting=sequential")
    parser.add_argument("--force", action="store_true", help="with --add-lifelong / --add-timing: replace rows already there")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # over easyeditor's format
    if (args.add_lifelong or args.add_timing) and not args.experiment:
        parser.error(f"--add-{'lifelong' if args.add_lifelong else 'timing'} needs --experiment NAME")
    if args.add_lifelong and args.add_timing:
        parser.error("--add-lifelong and --add-timing: one at a time")
    bad = [pair for pair in args.field if "=" not in pair]
    if bad:
        parser.error(f"--field {bad[0]!r}: expected KEY=VALUE")
    fields = dict(pair.partition("=")[::2] for pair in args.field)
    try:
        if args.add_lifelong:
            n_all, n_final = add_lifelong(args.add_lifelong, args.repo / "results" / args.experiment, fields,
                                          args.force)
            logger.info("results/%s: %d checkpoint rows, %d final rows added", args.experiment, n_all, n_final)
        if args.add_timing:
            n_rows = add_timing(args.add_timing, args.repo / "results" / args.experiment, fields, args.force)
            logger.info("results/%s: %d timing rows added", args.experiment, n_rows)
        changed = render_all(args.repo, write=not args.check)
    except ResultsError as exc:
        logger.error("error: %s", exc)
        return 2
    if args.check and changed:
        logger.error("out of date (run python -m ece_plugin.lab.results): %s",
                     ", ".join(str(p.relative_to(args.repo)) for p in changed))
        return 1
    logger.info("%s: %d document(s) or figure(s) %s", "check" if args.check else "render", len(changed),
                "differ" if args.check else "rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
