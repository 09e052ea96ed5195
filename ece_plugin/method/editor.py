"""One ECE batch (``edit_model`` / ``execute_ece``); EasyEdit's ``apply_ece_to_model`` wraps it in
:mod:`ece_plugin.easyedit`.

One batch = one call:

0. the statistics C0 of every edited layer (read or computed first, so that a bad file fails the call before any
   work), and the requests' checks (conflicting targets, rows longer than the model's positions);
1. context templates (cached in the session), then the keys of every edited W_out at the subject's last token
   for all requests x templates in one hooked forward (keys.py);
2. attribution and neuron sets per edit and for the batch (attribution.py);
3. k-medoids clustering of the edits by the Jaccard distance of their sets (clustering.py);
4. two-phase z (values.py);
5. the masked least-squares update, layer by layer (update.py), with C0 from the session's statistics and
   Cprev from its sequential state;
6. the keys of the batch on the edited model are staged into the sequential state (state.py), which commits
   them at the next call only if EasyEdit kept the edit;
7. the trace (trace.py) goes to ``session.last_trace``.

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

from .architecture import WOut, input_device, max_positions, num_layers, w_out
from .attribution import LayerAttribution, attribute_layer
from .clustering import Clusters, cluster_edits, membership_masks
from .keys import (
    ContextTemplates,
    KeyReads,
    build_key_rows,
    check_row_lengths,
    editing_tokenizer,
    generate_context_templates,
)
from .variants.prompt_keys import prompt_keys
from .speed.replay import decoder_layers
from .requests import EditRequest, check_conflicts, normalise_requests
from .state import EditSession, get_session
from .trace import ECETrace, LayerTrace, ScoreSummary
from .update import LayerWrite, undo, write_layers
from .values import ZResult, compute_z

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
    timings: dict[str, float] = {}
    start = time.perf_counter()
    was_training = model.training
    checkpoint = session.state.checkpoint()
    model.eval()
    try:
        with editing_tokenizer(tok):
            session.state.reconcile(model)
            return _run(model, tok, requests, hparams, session, w_outs, timings, start)
    except BaseException:
        # all or nothing: _run has put back every weight it wrote; the state goes back to before the call
        session.state.rollback(checkpoint)
        raise
    finally:
        model.train(was_training)


def _tick(timings: dict[str, float], name: str, t0: float) -> float:
    now = time.perf_counter()
    timings[name] = timings.get(name, 0.0) + now - t0
    return now


def _run(
    model: nn.Module,
    tok: Any,
    requests: list[EditRequest],
    hparams: Any,
    session: EditSession,
    w_outs: list[WOut],
    timings: dict[str, float],
    start: float,
) -> ECETrace:
    n = len(requests)
    names = [wo.name for wo in w_outs]
    z_name = hparams.layer_module_tmp.format(hparams.layers[-1])

    t = time.perf_counter()
    if hparams.mom2_adjustment:
        # C0 of every layer is read (or computed) first: a bad statistics file fails the call before any work,
        # and statistics computed from the corpus describe the unedited model.
        for wo in w_outs:
            session.statistics.second_moment(model, tok, wo.name, hparams)
        t = _tick(timings, "statistics", t)

    templates = context_templates(model, tok, hparams, session)
    check_row_lengths(tok, requests, templates, max_positions(model))
    t = _tick(timings, "context_templates", t)

    key_rows = build_key_rows(tok, requests, templates, hparams.fact_token, input_device(model))
    below = [decoder_layers(hparams.layer_module_tmp, wo.layer - 1) for wo in w_outs]
    reads = KeyReads(model, key_rows, names, z_name, below if hparams.layer_replay else None)
    keys0, zout0 = reads.read(0)
    t = _tick(timings, "keys", t)

    attributions = [
        attribute_layer(
            wo.layer, hparams.attribution, keys0[wo.name], wo.neuron_norms(), hparams.neuron_threshold
        )
        for wo in w_outs
    ]
    t = _tick(timings, "attribution", t)

    masks = membership_masks(
        [[att.cluster_sets[i] for att in attributions] for i in range(n)], [wo.d_ff for wo in w_outs]
    )
    clusters = cluster_edits(masks, hparams.n_clusters_for(n), enabled=hparams.clustering, seed=hparams.seed)
    t = _tick(timings, "clustering", t)

    zres = compute_z(
        model, tok, requests, templates, hparams, clusters.labels, clusters.anchors, hparams.clustering
    )
    t = _tick(timings, "z", t)

    # Layer i's keys are read after layers < i are written. Writing W_out of layer i or of a later layer never
    # changes layer i's input, so these are also the keys of the fully edited model that the state carries.
    written_keys: dict[str, torch.Tensor] = {}
    mu = hparams.prompt_keys_weight
    plain_rows = key_rows.rows.select(key_rows.plain_rows.to(key_rows.rows.input_ids.device)) if mu else None
    protected: dict[str, torch.Tensor] = {}  # keys at the prompts' other tokens, scaled by sqrt(mu): [m, d_ff]

    def read(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, cur = (keys0, zout0) if i == 0 else reads.read(i)
        assert cur is not None
        written_keys[names[i]] = keys[names[i]]
        if plain_rows is not None:  # as the model is now: the layers before i are written
            protected[names[i]] = prompt_keys(model, plain_rows, names[i]) * mu**0.5
        return keys[names[i]], cur

    def c0_block(name: str, idx: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        if not hparams.mom2_adjustment:
            return None
        return session.statistics.masked(model, tok, name, hparams, idx, device, torch.float64)

    def cprev_block(name: str, idx: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        block = None
        if hparams.carry_keys:  # else MEMIT's sequential form: earlier edits are protected by C0 alone
            block = session.state.cprev_masked(name, idx, device, torch.float64)
        if name in protected:
            kp = protected[name].to(device).index_select(1, idx.to(device)).double()
            block = kp.t() @ kp if block is None else block + kp.t() @ kp
        return block

    by_name = {wo.name: wo for wo in w_outs}

    def drift_block(name: str, idx: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        weight = by_name[name].neuron_view()  # as it is now: the layers before it in this batch are written
        session.state.start_values(name, weight)
        return session.state.drift_masked(name, idx, weight, device)

    writes: list[LayerWrite] = []  # journal: a layer enters it before it is written
    try:
        write_layers(
            w_outs,
            [att.batch_set for att in attributions],
            zres.z,
            read,
            c0_block,
            cprev_block,
            hparams.mom2_update_weight,
            journal=writes,
            ridge=hparams.update_ridge,
            drift_block=drift_block if hparams.carry_values else None,
        )
        for w in writes:
            for stage in ("keys", "statistics", "solve"):
                timings[stage] = timings.get(stage, 0.0) + w.seconds[stage]
        t = time.perf_counter()
        if set(written_keys) != set(names):
            raise RuntimeError(f"keys of layers {sorted(set(names) - set(written_keys))} were never read")
        if hparams.carry_keys:  # otherwise nothing is carried and the state stays empty
            fading = hparams.carry_prompt_keys and hparams.prompt_keys_decay < 1.0
            carried = {
                name: torch.cat([written_keys[name], protected[name].to(written_keys[name].device)], 0).t()
                if name in protected and hparams.carry_prompt_keys and not fading else written_keys[name].t()
                for name in names
            }
            values = None
            if hparams.carry_values:  # what each layer now gives at the carried keys: V = W K
                values = {name: by_name[name].neuron_view().detach().double() @ carried[name].double() for name in names}
            session.state.stage(
                carried,
                {w.name + ".weight": (w.idx, w.post, wo.axis, w.pre) for w, wo in zip(writes, w_outs)},
                n,
                values=values,
                protected={name: kp.t() for name, kp in protected.items()} if fading else None,
                decay=hparams.prompt_keys_decay if fading else 1.0,
            )
        t = _tick(timings, "state", t)
        timings["total"] = time.perf_counter() - start
        return _trace(requests, hparams, templates, w_outs, attributions, clusters, zres, writes, timings)
    except BaseException:
        undo(w_outs, writes)
        raise


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
                drift_norm=wr.drift_norm,
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
