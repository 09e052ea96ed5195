"""One ECE batch (``edit_model`` / ``execute_ece``); EasyEdit's ``apply_ece_to_model`` wraps it in
:mod:`ece_plugin.easyedit`.

:func:`_run` is the paper's batch, in its order. Before it: the statistics C0 of every edited layer (read or
computed first, so that a bad file fails the call before any work), the context templates (cached in the
session), the requests' checks, the rows of the z optimisation with their prefix cache (values.py), and the keys
of every edited W_out at the subject's last token for all requests x templates: read in the pass that built that
cache when it holds every edit (:func:`unedited_keys`), else in one hooked forward (keys.py). Then

1. the attribution score of every neuron of each edited layer for each edit (attribution.py);
2. the neuron sets: the smallest set of top neurons holding a share p of the score, per edit and for the batch;
3. k-medoids clustering of the edits by the Jaccard distance of their sets (clustering.py);
4. the target values z in two phases (values.py);
5. the masked least-squares update, layer by layer (update.py), with C0 from the session's statistics and
   Cprev from its sequential state.

After it, the keys of the batch on the edited model are staged into the sequential state (state.py), which
commits them at the next call only if EasyEdit kept the edit, and the trace (trace.py) goes to
``session.last_trace``. Departures from the paper are variants (``variants/``): the core calls their hooks and
never reads their hparams; with none active the batch is the paper's.

All or nothing: on any exception (``KeyboardInterrupt`` included) every weight written so far is put back
(update.py's journal) and the sequential state returns to its checkpoint from before the call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .architecture import ArchitectureError, WOut, get_module, input_device, max_positions, num_layers, w_out
from .attribution import LayerAttribution, attribute_layer
from .clustering import Clusters, cluster_edits, membership_masks
from .keys import (
    ContextTemplates,
    KeyReads,
    KeyRows,
    build_key_rows,
    check_row_lengths,
    editing_tokenizer,
    generate_context_templates,
    same_up_to_fact,
)
from .requests import EditRequest, check_conflicts, normalise_requests
from .speed.replay import decoder_layers
from .state import EditSession, get_session
from .trace import ECETrace, LayerTrace, ScoreSummary
from .update import LayerWrite, undo, write_layers
from .values import ZResult, ZSetup, compute_z, prepare_z
from .variants import EditVariant, active_variants

logger = logging.getLogger(__name__)


@dataclass
class _TemplateCache:
    key: tuple
    templates: ContextTemplates


def context_templates(model: nn.Module, tok: Any, hparams: Any, session: EditSession) -> ContextTemplates:
    """The session's context templates, generated (seeded) on first use or when their hparams change."""
    key = (
        tuple(tuple(int(x) for x in pair) for pair in hparams.context_template_length_params),
        int(hparams.seed),
    )
    cached = getattr(session, "context_templates", None)
    if isinstance(cached, _TemplateCache) and cached.key == key:
        return cached.templates
    templates = generate_context_templates(model, tok, hparams.context_template_length_params, hparams.seed)
    setattr(session, "context_templates", _TemplateCache(key, templates))  # noqa: B010 - typed Any there
    return templates


def edit_model(
    model: nn.Module,
    tok: Any,
    requests: Sequence[dict[str, Any]],
    hparams: Any,
    session: Optional[EditSession] = None,
) -> ECETrace:
    """Edit ``model`` in place with one ECE batch of ``requests``; returns the trace (also ``session.last_trace``).

    The requests are checked (:func:`~ece_plugin.method.requests.normalise_requests`, conflicting targets) and the
    hparams validated against the model before any work. ``session`` defaults to the model's own
    (:func:`~ece_plugin.method.state.get_session`).
    """
    if session is None:
        session = get_session(model, hparams)
    edit_requests = check_conflicts(normalise_requests(requests))
    hparams.validate(num_layers(model))
    trace = execute_ece(model, tok, edit_requests, hparams, session, edited_w_outs(model, hparams))
    session.last_trace = trace
    return trace


def edited_w_outs(model: nn.Module, hparams: Any) -> list[WOut]:
    """The W_out of every edited layer, in the order of ``hparams.layers``."""
    return [w_out(model, hparams.rewrite_module_tmp, layer) for layer in hparams.layers]


def execute_ece(
    model: nn.Module,
    tok: Any,
    requests: list[EditRequest],
    hparams: Any,
    session: EditSession,
    w_outs: Optional[list[WOut]] = None,
) -> ECETrace:
    """Run one ECE batch on ``model`` in place; returns the trace."""
    if w_outs is None:
        w_outs = edited_w_outs(model, hparams)
    clock = _Clock(time.perf_counter())
    was_training = model.training
    checkpoint = session.state.checkpoint()
    model.eval()
    try:
        with editing_tokenizer(tok):
            session.state.reconcile(model)
            return _run(model, tok, requests, hparams, session, w_outs, clock)
    except BaseException:
        # all or nothing: _run has put back every weight it wrote; the state goes back to before the call
        session.state.rollback(checkpoint)
        raise
    finally:
        model.train(was_training)


class _Clock:
    """Seconds per stage of one batch (the trace's ``timings``)."""

    def __init__(self, start: float) -> None:
        self.start, self.t = start, time.perf_counter()
        self.timings: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.add(name, now - self.t)
        self.t = now

    def add_writes(self, writes: list[LayerWrite]) -> None:
        for w in writes:
            for stage in ("keys", "statistics", "solve"):
                self.add(stage, w.seconds[stage])
        self.t = time.perf_counter()

    def total(self) -> dict[str, float]:
        self.timings["total"] = time.perf_counter() - self.start
        return dict(self.timings)


def _run(
    model: nn.Module,
    tok: Any,
    requests: list[EditRequest],
    hparams: Any,
    session: EditSession,
    w_outs: list[WOut],
    clock: _Clock,
) -> ECETrace:
    """The paper's steps for one batch; the active variants' hooks run at the points ``variants/`` names."""
    variants = active_variants(hparams)
    if hparams.mom2_adjustment:
        load_statistics(model, tok, hparams, session, w_outs)
        clock.lap("statistics")
    templates = context_templates(model, tok, hparams, session)
    check_row_lengths(tok, requests, templates, max_positions(model))
    clock.lap("context_templates")

    lam = float(hparams.mom2_update_weight)  # lambda, the weight of C0 in step 5
    for variant in variants:
        variant.start(model, session.state.n_edits)
        lam = variant.mom2_update_weight(lam)
    key_rows = build_key_rows(tok, requests, templates, hparams.fact_token, input_device(model))
    z_setup = prepare_z(model, tok, requests, templates, hparams, [wo.name for wo in w_outs])
    clock.lap("z")
    layer_keys = LayerKeys(model, key_rows, hparams, w_outs, variants, unedited_keys(z_setup, key_rows, w_outs))
    for variant in variants:
        variant.begin(model, key_rows)
    clock.lap("keys")

    attributions = [  # steps 1-2: attribution scores and neuron sets
        attribute_layer(wo.layer, hparams.attribution, layer_keys.first[wo.name], wo.neuron_norms(),
                        hparams.neuron_threshold)
        for wo in w_outs
    ]
    clock.lap("attribution")
    clusters = cluster_batch(attributions, w_outs, hparams, len(requests))  # step 3: clustering
    clock.lap("clustering")
    zres = compute_z(model, tok, requests, templates, hparams, clusters.labels, clusters.anchors,  # step 4: z
                     hparams.clustering, setup=z_setup)
    clock.lap("z")

    blocks = Covariances(model, tok, hparams, session, variants)
    writes: list[LayerWrite] = []  # journal: a layer enters it before it is written
    try:
        write_layers(w_outs, [att.batch_set for att in attributions], zres.z, layer_keys.read,  # step 5: update
                     blocks.c0, blocks.cprev, lam, journal=writes, rhs_block=blocks.rhs)
        clock.add_writes(writes)
        if hparams.carry_keys:  # else MEMIT's sequential form: nothing is carried and the state stays empty
            stage_batch(session, layer_keys.written(), writes, w_outs, variants, len(requests))
        clock.lap("state")
        return _trace(requests, hparams, templates, w_outs, attributions, clusters, zres, writes, clock.total())
    except BaseException:
        undo(w_outs, writes)
        raise


def load_statistics(model: nn.Module, tok: Any, hparams: Any, session: EditSession, w_outs: list[WOut]) -> None:
    """C0 of every edited layer, read (or computed) before any work: a bad statistics file fails the call
    first, and statistics computed from the corpus describe the unedited model."""
    for wo in w_outs:
        session.statistics.second_moment(model, tok, wo.name, hparams)


def cluster_batch(attributions: list[LayerAttribution], w_outs: list[WOut], hparams: Any, n: int) -> Clusters:
    """k-medoids clusters of the batch's edits by the Jaccard distance of their neuron sets over all layers."""
    masks = membership_masks(
        [[att.cluster_sets[i] for att in attributions] for i in range(n)], [wo.d_ff for wo in w_outs]
    )
    return cluster_edits(masks, hparams.n_clusters_for(n), enabled=hparams.clustering, seed=hparams.seed)


def unedited_keys(
    z_setup: ZSetup, key_rows: KeyRows, w_outs: list[WOut]
) -> Optional[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Every edited layer's keys ``[n, d_ff]`` and the z layer's outputs ``[n, d_model]`` on the unedited model,
    from the pass that built the z prefix cache (values.py): its rewriting rows hold the key rows' tokens up to
    the fact token, so their states there are the keys. None (read 0 runs) when that pass read nothing or a
    row's tokens differ (a target that merges with the prompt's last token)."""
    raw = {wo.name: z_setup.rewriting_inputs(wo.name) for wo in w_outs}
    cur = z_setup.unedited_outputs()
    if cur is None or any(t is None for t in raw.values()):
        return None
    rewriting = torch.nonzero(~z_setup.problem.row_is_kl).flatten()
    if not same_up_to_fact(key_rows.rows, z_setup.problem.rows.select(rewriting)):
        logger.debug("keys: the z rows' tokens differ from the key rows' before the fact token; reading them")
        return None
    return {name: key_rows.average(t) for name, t in raw.items() if t is not None}, cur


class LayerKeys:
    """The keys of one batch in MEMIT's order (:class:`~ece_plugin.method.keys.KeyReads`): :attr:`first` on the
    unedited model (``first`` when already read: :func:`unedited_keys`; else read 0); :meth:`read` for the
    update, layer i's keys after the layers before i were written.

    Writing W_out of layer i or of a later layer never changes layer i's input, so the keys :meth:`read` gives are
    also the keys of the fully edited model, which the sequential state carries (:meth:`written`)."""

    def __init__(
        self,
        model: nn.Module,
        key_rows: KeyRows,
        hparams: Any,
        w_outs: list[WOut],
        variants: list[EditVariant],
        first: Optional[tuple[dict[str, torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        self.model, self.variants = model, variants
        self.names = [wo.name for wo in w_outs]
        z_name = hparams.layer_module_tmp.format(hparams.layers[-1])
        below = [decoder_layers(hparams.layer_module_tmp, wo.layer - 1) for wo in w_outs]
        mlps = fact_token_mlps(model, hparams, w_outs) if hparams.key_positions_only else None
        self.reads = KeyReads(model, key_rows, self.names, z_name, below if hparams.layer_replay else None,
                              mlps=mlps)
        self.first, self.first_z = first if first is not None else self.reads.read(0)
        self._written: dict[str, torch.Tensor] = {}

    def read(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys ``[n, d_ff]``, z-layer outputs ``[n, d_model]``) of layer i on the model as it is now."""
        keys, cur = (self.first, self.first_z) if i == 0 else self.reads.read(i)
        assert cur is not None
        name = self.names[i]
        self._written[name] = keys[name]
        for variant in self.variants:
            variant.before_write(self.model, name)
        return keys[name], cur

    def written(self) -> dict[str, torch.Tensor]:
        """Every layer's keys ``[n, d_ff]`` as the update read them."""
        if set(self._written) != set(self.names):
            raise RuntimeError(f"keys of layers {sorted(set(self.names) - set(self._written))} were never read")
        return self._written


def fact_token_mlps(model: nn.Module, hparams: Any, w_outs: list[WOut]) -> Optional[list[nn.Module]]:
    """The MLP of each edited layer (``mlp_module_tmp``), for key reads that run the deepest one at the fact
    tokens only; None (every position, with a warning) when a template names no module or W_out is not in it."""
    mlps = []
    for wo in w_outs:
        try:
            mlp = get_module(model, hparams.mlp_module_tmp.format(wo.layer))
        except ArchitectureError as exc:
            logger.warning("keys: the MLPs run at every position (%s)", exc)
            return None
        if not any(m is wo.module for m in mlp.modules()):
            logger.warning("keys: the MLPs run at every position (%s is not inside %s)", wo.name,
                           hparams.mlp_module_tmp.format(wo.layer))
            return None
        mlps.append(mlp)
    return mlps


class Covariances:
    """The blocks of the update's Gram matrix at a layer's neurons S: C0_SS (weighted by lambda in the update) from
    the session's statistics, and Cprev_SS from its sequential state plus the active variants' terms."""

    def __init__(self, model: nn.Module, tok: Any, hparams: Any, session: EditSession,
                 variants: list[EditVariant]) -> None:
        self.model, self.tok, self.hparams, self.session, self.variants = model, tok, hparams, session, variants

    def c0(self, name: str, idx: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        if not self.hparams.mom2_adjustment:
            return None
        return self.session.statistics.masked(self.model, self.tok, name, self.hparams, idx, device, torch.float64)

    def rhs(self, name: str, idx: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        """The active variants' terms ``[d_model, |S|]`` of the update's right-hand side (None: none)."""
        total = None
        for variant in self.variants:
            term = variant.rhs_term(name, idx, device)
            if term is not None:
                total = term if total is None else total + term
        return total

    def cprev(self, name: str, idx: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        block = None
        if self.hparams.carry_keys:  # else MEMIT's sequential form: earlier edits are protected by C0 alone
            block = self.session.state.cprev_masked(name, idx, device, torch.float64)
        for variant in self.variants:
            term = variant.gram_term(name, idx, device)
            if term is not None:
                block = term if block is None else block + term
        return block


def stage_batch(
    session: EditSession,
    keys: dict[str, torch.Tensor],
    writes: list[LayerWrite],
    w_outs: list[WOut],
    variants: list[EditVariant],
    n_edits: int,
) -> None:
    """Stage the batch's keys (with the variants' carried keys) and the neurons it wrote into the sequential
    state, which commits them at the next call only if the weights still hold this write."""
    carried: dict[str, torch.Tensor] = {}
    fading: dict[str, torch.Tensor] = {}
    decays: set[float] = set()
    for name, k in keys.items():
        rows = [k]  # one key per row, [n, d_ff]; the state holds keys as columns
        for variant in variants:
            extra = variant.carried_keys(name)
            if extra is None:
                continue
            if extra.decay < 1.0:
                fading[name] = extra.keys if name not in fading else torch.cat([fading[name], extra.keys], 1)
                decays.add(extra.decay)
            else:
                rows.append(extra.keys.t().to(k.device))
        carried[name] = torch.cat(rows, 0).t() if len(rows) > 1 else k.t()
    if len(decays) > 1:
        raise RuntimeError(f"the active variants fade carried keys at different rates {sorted(decays)}; the state "
                           "holds one fading moment")
    written = {w.name + ".weight": (w.idx, w.post, wo.axis, w.pre) for w, wo in zip(writes, w_outs)}
    session.state.stage(carried, written, n_edits, protected=fading or None, decay=decays.pop() if decays else 1.0)


def _trace(
    requests: list[EditRequest],
    hparams: Any,
    templates: ContextTemplates,
    w_outs: list[WOut],
    attributions: list[LayerAttribution],
    clusters: Clusters,
    zres: ZResult,
    writes: list[LayerWrite],
    timings: dict[str, float],
) -> ECETrace:
    layers = []
    for wo, att, wr in zip(w_outs, attributions, writes):
        layers.append(
            LayerTrace(
                layer=wo.layer,
                module=wo.name,
                d_ff=wo.d_ff,
                edit_sets=[s.tolist() for s in att.edit_sets],
                edit_set_sizes=[int(s.numel()) for s in att.edit_sets],
                edit_shares=att.edit_shares,
                batch_set=att.batch_set.tolist(),
                batch_set_size=int(att.batch_set.numel()),
                batch_share=att.batch_share,
                scores=ScoreSummary.of(att.batch_score),
                residual_norm=wr.residual_norm,
                update_norm=wr.update_norm,
            )
        )
    cluster_info = clusters.to_dict()
    cluster_info.update(enabled=bool(hparams.clustering), n_clusters=clusters.n_clusters)
    return ECETrace(
        attribution=hparams.attribution,
        neuron_threshold=hparams.neuron_threshold,
        n_edits=len(requests),
        requests=[
            {"prompt": r.text, "subject": r.subject, "target_new": r.target_new, "case_id": r.case_id}
            for r in requests
        ],
        context_templates=templates,
        layers=layers,
        clusters=cluster_info,
        z=zres.to_dict(),
        timings=dict(timings),
    )


def export_context_templates(session: EditSession) -> Optional[dict[str, Any]]:
    """The session's cached context templates as JSON-safe data (None when none are cached), so that a
    sequence of edits resumed in another process uses the templates its first batch sampled."""
    cached = getattr(session, "context_templates", None)
    if not isinstance(cached, _TemplateCache):
        return None
    return {"key": [list(part) if isinstance(part, tuple) else part for part in cached.key],
            "templates": cached.templates}


def import_context_templates(session: EditSession, data: Optional[dict[str, Any]]) -> None:
    """Cache templates exported by :func:`export_context_templates` in ``session`` (None: forget them)."""
    if data is None:
        setattr(session, "context_templates", None)  # noqa: B010 - typed Any there
        return
    length_params, seed = data["key"]
    key = (tuple(tuple(int(x) for x in pair) for pair in length_params), int(seed))
    setattr(session, "context_templates", _TemplateCache(key, [list(group) for group in data["templates"]]))  # noqa: B010
