"""Target values z (ECE stage 3): MEMIT's ``compute_z`` objective, batched, in two phases.

For edit i, z_i is the output of the last edited layer (``z_layer``) at the subject's last token that makes the
model predict ``target_new``: ``z_i = h_i + delta_i`` where h_i is the unedited output and delta_i minimises

    NLL(target_new | each context-templated prompt, delta_i added at the fact token)   (mean over templates)
  + kl_factor * KL(p(. | "{subject} is a", delta_i) || p_unedited)
  + v_weight_decay * ||delta_i|| / ||h_i||^2            (MEMIT's code: the norm, not its square)

with Adam (``v_lr``), ``||delta_i|| <= clamp_norm_factor * ||h_i||`` after every step, and an early stop once
the edit's loss is below 5e-2 (MEMIT's criterion: the edit's z has converged). As in MEMIT the loss is read
through ``ln_f`` and the LM head from the output of ``max(v_loss_layer, z_layer)``.

ECE's two phases: (1) one shared delta U_c per cluster, optimised on the cluster's anchor request for
``shared_grad_steps`` steps; (2) per edit d_i from zero with U_c fixed, ``delta_i = U_c + d_i``, for
``per_edit_grad_steps`` steps (clamp and weight decay on U_c + d_i). With clustering off every edit runs
``v_num_grad_steps`` steps from zero (MEMIT's z). Step counting follows MEMIT: a phase of n steps runs n
forwards; the last forward of the final phase only evaluates (MEMIT's last iteration takes no step), so
shared + per-edit steps = MEMIT's step count in forwards and in updates.

Batched: all edits of a phase share every forward/backward (chunks of at most ``chunk_rows`` prompt rows of
similar token width, whose gradients accumulate); each row adds its own edit's delta. Adam is per coordinate, so
the batched run equals independent runs. An edit whose z has converged leaves the batched optimisation at the
forward that finds it converged, as MEMIT's loop breaks before its backward: its loss takes no part in that
backward, later chunks are re-formed from the remaining edits only (no forward, loss or gradient of it is
computed again) and its delta is frozen. The steps each edit took and whether it converged are in
:meth:`ZResult.to_dict`.

Exact savings over MEMIT's recomputation (the same losses to float rounding): each row's tokens before its fact
token run once per batch into a key/value cache and a step runs only the rest (prefix_cache.py; blocks of edits
keep the cache within ``z_cache_mb``), and with ``layer_replay`` the layers up to the z layer, which never see
the delta, hand back outputs computed once per batch, so a step runs only the layers after it; the KL row is
not run when ``kl_factor`` is 0.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .architecture import (
    ArchitectureError,
    StopForward,
    get_module,
    hidden_state,
    input_device,
    num_layers,
    replace_hidden_state,
)
from .keys import ContextTemplates, EncodedRows, encode_rows
from .requests import EditRequest, RequestError
from .speed.prefix_cache import FullRows, PrefixCache, RowBatch, edit_blocks, key_value_bytes_per_token
from .speed.read_positions import mlp_at_positions
from .speed.replay import LayerReplay, decoder_layers

logger = logging.getLogger(__name__)

EARLY_STOP_LOSS = 5e-2  # MEMIT's threshold
KL_TEMPLATE = "{} is a"  # MEMIT's KL prompt
DEFAULT_Z_CHUNK_ROWS = 128



@dataclass
class ZProblem:
    """All prompt rows of a batch for the z optimisation (request-major: rewriting rows, then the KL row)."""

    rows: EncodedRows
    row_edit: torch.Tensor  # [R] edit of each row
    row_is_kl: torch.Tensor  # [R] bool
    edit_rows: list[torch.Tensor]  # rows of each edit
    plain_row: torch.Tensor  # [n] the '{}' rewriting row of each edit
    kl_row: torch.Tensor  # [n]
    target_ids: list[torch.Tensor]  # per edit
    n_rewrite: int  # rewriting rows per edit

    @property
    def n_edits(self) -> int:
        return len(self.target_ids)

    def optimised_rows(self, edit: int, with_kl: bool) -> torch.Tensor:
        """Rows of ``edit`` that a z step runs: all, or the rewriting rows only when the KL term is off."""
        rows = self.edit_rows[edit]
        return rows if with_kl else rows[rows != int(self.kl_row[edit])]

    def target_positions(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions whose next-token distribution must give the target, and the target ids (MEMIT's layout)."""
        edit = int(self.row_edit[row])
        tgt = self.target_ids[edit]
        length = int(self.rows.attention_mask[row].sum())
        pos = torch.arange(length - len(tgt), length, device=tgt.device)
        return pos, tgt


def target_token_ids(tok: Any, request: EditRequest) -> torch.Tensor:
    """Token ids of ``target_new`` without special tokens (a leading BOS/UNK is dropped, as MEMIT)."""
    ids = list(tok(request.target_new, add_special_tokens=False)["input_ids"])
    if ids and ids[0] in (getattr(tok, "bos_token_id", None), getattr(tok, "unk_token_id", None)):
        ids = ids[1:]
    if not ids:
        raise RequestError(f"request {request.index}: target_new {request.target_new!r} tokenizes to nothing")
    return torch.tensor(ids, dtype=torch.long)


def build_z_problem(
    tok: Any,
    requests: Sequence[EditRequest],
    templates: ContextTemplates,
    fact_token: str,
    device: torch.device,
) -> ZProblem:
    flat = [t for group in templates for t in group]
    targets = [target_token_ids(tok, r) for r in requests]
    row_templates: list[str] = []
    subjects: list[str] = []
    row_edit: list[int] = []
    is_kl: list[bool] = []
    for i, (req, tgt) in enumerate(zip(requests, targets)):
        suffix = tok.decode(tgt[:-1].tolist()) if len(tgt) > 1 else ""
        for ctx in flat:
            row_templates.append(ctx.replace("{}", req.template) + suffix)
            subjects.append(req.subject)
            row_edit.append(i)
            is_kl.append(False)
        row_templates.append(KL_TEMPLATE)
        subjects.append(req.subject)
        row_edit.append(i)
        is_kl.append(True)
    rows = encode_rows(tok, row_templates, subjects, fact_token, device)
    per = len(flat) + 1
    n = len(requests)
    return ZProblem(
        rows=rows,
        row_edit=torch.tensor(row_edit, dtype=torch.long),
        row_is_kl=torch.tensor(is_kl, dtype=torch.bool),
        edit_rows=[torch.arange(i * per, (i + 1) * per) for i in range(n)],
        plain_row=torch.arange(n) * per,
        kl_row=torch.arange(n) * per + per - 1,
        target_ids=[t.to(device) for t in targets],
        n_rewrite=len(flat),
    )


@dataclass
class ZModules:
    """The modules the z optimisation touches."""

    z_name: str
    loss_name: str
    ln_f: nn.Module
    lm_weight: torch.Tensor  # [vocab, d_model]
    lm_bias: Optional[torch.Tensor]
    z_device: torch.device
    loss_mlp: Optional[nn.Module] = None  # run at the read positions only (read_positions.py); None: everywhere

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        ln_param = next(self.ln_f.parameters(), None)
        x = self.ln_f(hidden if ln_param is None else hidden.to(ln_param.device))
        out = x.to(self.lm_weight.device) @ self.lm_weight.t()
        if self.lm_bias is not None:
            out = out + self.lm_bias
        return out.float()


def z_modules(model: nn.Module, hparams: Any) -> ZModules:
    z_layer = hparams.layers[-1]
    n_layers = num_layers(model)
    loss_layer = hparams.v_loss_layer if hparams.v_loss_layer >= 0 else n_layers - 1
    loss_layer = max(loss_layer, z_layer)
    z_name = hparams.layer_module_tmp.format(z_layer)
    lm = get_module(model, hparams.lm_head_module)
    bias = getattr(lm, "bias", None)
    z_mod = get_module(model, z_name)
    z_device = next(z_mod.parameters()).device
    loss_mlp = None
    if hparams.z_loss_positions_only and loss_layer > z_layer:
        try:
            loss_mlp = get_module(model, hparams.mlp_module_tmp.format(loss_layer))
        except ArchitectureError as exc:
            logger.warning("z: the loss layer's MLP runs at every position (%s)", exc)
    return ZModules(
        z_name=z_name,
        loss_name=hparams.layer_module_tmp.format(loss_layer),
        ln_f=get_module(model, hparams.ln_f_module),
        lm_weight=lm.weight,  # type: ignore[arg-type]
        lm_bias=bias if isinstance(bias, torch.Tensor) else None,
        z_device=z_device,
        loss_mlp=loss_mlp,
    )


def _forward(
    model: nn.Module,
    mods: ZModules,
    batch: RowBatch,
    disp: Optional[torch.Tensor],
    read: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of ``batch`` adding ``disp[r]`` to row r's z-layer output at its fact token.

    Returns (z-layer output at the fact tokens before the addition ``[R, d]``, loss-layer hidden ``[R, T, d]``
    along the batch's tokens). The forward stops at the loss layer. With ``read`` (rows, positions) and
    ``mods.loss_mlp``, the loss layer's hidden states are valid at those positions only.
    """
    store: dict[str, torch.Tensor] = {}

    def z_hook(module: nn.Module, args: tuple, output: Any) -> Any:
        hs = hidden_state(output)
        ar = torch.arange(hs.shape[0], device=hs.device)
        lookup = batch.fact_pos.to(hs.device)
        store["h"] = hs[ar, lookup].detach()
        if disp is not None:
            hs = hs.index_put((ar, lookup), disp.to(device=hs.device, dtype=hs.dtype), accumulate=True)
            output = replace_hidden_state(output, hs)
        if mods.loss_name == mods.z_name:
            store["loss"] = hs
            raise StopForward
        return output

    def loss_hook(module: nn.Module, args: tuple, output: Any) -> None:
        store["loss"] = hidden_state(output)
        raise StopForward

    sparse = (
        mlp_at_positions(mods.loss_mlp, *read) if read is not None and mods.loss_mlp is not None else nullcontext()
    )
    with batch.replayed(model), sparse:  # layers up to z hand back cached outputs, if the batch has them
        handles = [get_module(model, mods.z_name).register_forward_hook(z_hook)]
        if mods.loss_name != mods.z_name:
            handles.append(get_module(model, mods.loss_name).register_forward_hook(loss_hook))
        try:
            model(**batch.forward_kwargs())
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
    if "loss" not in store:
        raise RuntimeError(f"layer {mods.loss_name!r} did not run in the forward pass")
    return store["h"], store["loss"]


@dataclass
class _ChunkPlan:
    """One chunk of a z step: its edits, its rows' forward inputs and the fixed gather indices of its loss."""

    edits: list[int]  # global edit ids
    loc: torch.Tensor  # their positions in the phase's deltas
    rows_per_edit: int
    batch: RowBatch
    r_idx: torch.Tensor  # per target token: local row, position in the batch's tokens, target id, local edit
    p_idx: torch.Tensor
    t_idx: torch.Tensor
    owner: torch.Tensor
    plain: torch.Tensor  # bool: the token belongs to the edit's '{}' row
    row_owner: torch.Tensor  # [R] local edit of each rewriting row, -1 for the KL row
    tgt_len: torch.Tensor  # [m]
    kl_r: torch.Tensor  # local KL rows and the position of their fact token
    kl_p: torch.Tensor
    read: tuple[torch.Tensor, torch.Tensor]  # (row, position) of every loss-layer output the chunk's loss reads


def _plan_chunk(
    problem: ZProblem,
    chunk: list[int],
    loc: torch.Tensor,
    rows: torch.Tensor,
    batch: RowBatch,
    zdev: torch.device,
) -> _ChunkPlan:
    local = {e: j for j, e in enumerate(chunk)}
    r_idx, p_idx, t_idx, owner, plain_mask, kl_r, kl_p = [], [], [], [], [], [], []
    offset = batch.offset.tolist()
    for j, row in enumerate(rows.tolist()):
        edit = local[int(problem.row_edit[row])]
        if bool(problem.row_is_kl[row]):
            kl_r.append(j)
            kl_p.append(int(batch.fact_pos[j]))
            continue
        pos, tgt = problem.target_positions(row)
        r_idx.append(torch.full_like(pos, j))
        p_idx.append(pos - offset[j])
        t_idx.append(tgt)
        owner.append(torch.full_like(pos, edit))
        plain_mask.append(torch.full_like(pos, int(row == int(problem.plain_row[chunk[edit]]))))
    ri, own, pi = torch.cat(r_idx), torch.cat(owner), torch.cat(p_idx)
    kl_rows, kl_pos = torch.tensor(kl_r, dtype=torch.long), torch.tensor(kl_p, dtype=torch.long)
    row_owner = torch.full((len(rows),), -1, dtype=torch.long)
    row_owner[ri.cpu()] = own.cpu()
    return _ChunkPlan(
        edits=chunk,
        loc=loc,
        rows_per_edit=len(rows) // len(chunk),
        batch=batch,
        r_idx=ri,
        p_idx=pi,
        t_idx=torch.cat(t_idx),
        owner=own.to(zdev),
        plain=torch.cat(plain_mask).bool().to(zdev),
        row_owner=row_owner.to(zdev),
        tgt_len=torch.tensor([len(problem.target_ids[e]) for e in chunk], device=zdev, dtype=torch.float32),
        kl_r=kl_rows,
        kl_p=kl_pos,
        read=(torch.cat([ri.cpu(), kl_rows]), torch.cat([pi.cpu(), kl_pos])),
    )


@dataclass
class _Eval:
    """Per-edit quantities of one forward."""

    loss: torch.Tensor  # [m] (graph attached when grad is on)
    nll: torch.Tensor
    target_prob: torch.Tensor  # mean over rewriting rows of exp(-nll_row)
    reached: torch.Tensor  # bool: the plain row predicts every target token greedily


def _evaluate(
    plan: _ChunkPlan,
    problem: ZProblem,
    mods: ZModules,
    hidden: torch.Tensor,
    kl_init: torch.Tensor,
    total_disp: torch.Tensor,
    h_norm: torch.Tensor,
    hparams: Any,
) -> _Eval:
    """Losses of the chunk's edits from the loss-layer ``hidden`` of its rows."""
    m = len(plan.edits)
    dev, zdev = hidden.device, mods.z_device
    logits = mods.logits(hidden[plan.r_idx.to(dev), plan.p_idx.to(dev)])
    log_probs = torch.log_softmax(logits, -1)
    ti = plan.t_idx.to(log_probs.device)
    tok_lp = log_probs.gather(1, ti.unsqueeze(1)).squeeze(1).to(zdev)
    # per rewriting row: -(sum of target log-probs) / len(target)
    row_sum = torch.zeros(len(plan.row_owner), device=zdev, dtype=tok_lp.dtype).index_add(
        0, plan.r_idx.to(zdev), tok_lp
    )
    rew = plan.row_owner >= 0
    owners = plan.row_owner[rew]
    nll_row = -row_sum[rew] / plan.tgt_len[owners]
    nll = torch.zeros(m, device=zdev, dtype=tok_lp.dtype).index_add(0, owners, nll_row) / problem.n_rewrite
    prob = (
        torch.zeros(m, device=zdev, dtype=tok_lp.dtype).index_add(0, owners, torch.exp(-nll_row.detach()))
        / problem.n_rewrite
    )
    greedy_ok = (log_probs.argmax(-1) == ti).to(zdev)
    misses = torch.zeros(m, device=zdev).index_add(
        0, plan.owner[plan.plain], (~greedy_ok[plan.plain]).float()
    )
    loss = nll + hparams.v_weight_decay * total_disp.norm(dim=1) / h_norm**2
    if len(plan.kl_r):
        # KL row: sum p_cur (log p_cur - log p_init), one row per edit (MEMIT's batchmean over one row)
        kl_logits = mods.logits(hidden[plan.kl_r.to(dev), plan.kl_p.to(dev)])
        kl_lp = torch.log_softmax(kl_logits, -1)
        kl = (kl_lp.exp() * (kl_lp - kl_init.to(kl_lp.device))).sum(-1).to(zdev)
        loss = loss + hparams.kl_factor * kl
    return _Eval(loss=loss, nll=nll.detach(), target_prob=prob, reached=misses == 0)


MIN_CHUNK_SHARE = 2  # a chunk closes at a change of token width once it holds half its maximum rows


def _chunks(
    edits: Sequence[int], width: dict[int, int], rows_per_edit: int, chunk_rows: int
) -> list[list[int]]:
    """Chunks of at most ``chunk_rows`` rows. Edits are sorted by token width and a chunk closes where the width
    changes once it is half full: less padding, at the price of a few more (fixed-cost) forwards."""
    size = max(1, chunk_rows // rows_per_edit)
    chunks: list[list[int]] = []
    current: list[int] = []
    for e in sorted(edits, key=lambda e: (width[e], e)):
        full = len(current) >= size
        new_width = (
            bool(current) and width[e] != width[current[-1]] and len(current) * MIN_CHUNK_SHARE >= size
        )
        if full or new_width:
            chunks.append(current)
            current = []
        current.append(e)
    return chunks + [current] if current else chunks


@dataclass
class PhaseStats:
    steps: list[int]  # forwards each edit took (MEMIT's step count)
    loss: list[float]
    target_prob: list[float]
    reached: list[bool]
    converged: list[bool]  # loss < EARLY_STOP_LOSS: the edit left the optimisation

    @classmethod
    def empty(cls, n: int) -> PhaseStats:
        return cls([0] * n, [float("nan")] * n, [0.0] * n, [False] * n, [False] * n)

    def put(self, positions: Sequence[int], part: PhaseStats) -> None:
        """Copy ``part`` (stats of the edits at ``positions``) into place."""
        for k, j in enumerate(positions):
            self.steps[j], self.loss[j] = part.steps[k], part.loss[k]
            self.target_prob[j], self.reached[j] = part.target_prob[k], part.reached[k]
            self.converged[j] = part.converged[k]


@dataclass
class _Phase:
    """One z phase: one delta per edit in ``edits``, added to the fixed ``base``, for ``n_forwards`` forwards
    (the last one only evaluates when ``last_is_eval``). ``base``, ``h`` and ``kl_init`` follow ``edits``."""

    edits: list[int]
    base: torch.Tensor
    h: torch.Tensor
    kl_init: torch.Tensor
    n_forwards: int
    last_is_eval: bool
    desc: str

    def block(self, positions: Sequence[int], desc: str) -> _Phase:
        idx = torch.tensor(list(positions), device=self.base.device)
        edits = [self.edits[j] for j in positions]
        return _Phase(
            edits, self.base[idx], self.h[idx], self.kl_init[idx], self.n_forwards, self.last_is_eval, desc
        )


RowSource = Union[FullRows, PrefixCache]


def _optimise(
    model: nn.Module,
    problem: ZProblem,
    mods: ZModules,
    phase: _Phase,
    hparams: Any,
    chunk_rows: int,
    source: RowSource,
) -> tuple[torch.Tensor, PhaseStats]:
    """Adam on the deltas of ``phase``; returns the deltas and stats."""
    edits, base, h, kl_init = phase.edits, phase.base, phase.h, phase.kl_init
    n_forwards, last_is_eval = phase.n_forwards, phase.last_is_eval
    m = len(edits)
    dev = mods.z_device
    delta = torch.zeros_like(base, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    active = torch.ones(m, dtype=torch.bool)
    stats = PhaseStats.empty(m)
    h_norm = h.norm(dim=1)
    max_norm = hparams.clamp_norm_factor * h_norm
    position = {e: j for j, e in enumerate(edits)}
    with_kl = hparams.kl_factor > 0
    rows_of = {e: problem.optimised_rows(e, with_kl) for e in edits}
    rows_per_edit = len(rows_of[edits[0]])
    width = {e: int(source.step_tokens(rows_of[e]).max()) for e in edits}
    plans: dict[tuple[int, ...], _ChunkPlan] = {}
    for it in tqdm(range(n_forwards), desc=phase.desc, leave=False, disable=None):
        live = [edits[j] for j in torch.nonzero(active).flatten().tolist()]
        if not live:
            break
        eval_only = last_is_eval and it == n_forwards - 1
        opt.zero_grad()
        step_plans = []
        for chunk in _chunks(live, width, rows_per_edit, chunk_rows):
            key = tuple(chunk)
            if key not in plans:
                rows = torch.cat([rows_of[e] for e in chunk])
                loc = torch.tensor([position[e] for e in chunk], device=dev)
                plans[key] = _plan_chunk(problem, chunk, loc, rows, source.batch(rows), dev)
            step_plans.append(plans[key])
        plans = {tuple(p.edits): p for p in step_plans}  # drop plans of chunks that no longer occur
        for plan in step_plans:
            with torch.set_grad_enabled(not eval_only):
                total = base[plan.loc] + delta[plan.loc]
                per_row = total.repeat_interleave(plan.rows_per_edit, dim=0)
                _, hidden = _forward(model, mods, plan.batch, per_row, plan.read)
                ev = _evaluate(
                    plan, problem, mods, hidden, kl_init[plan.loc], total, h_norm[plan.loc], hparams
                )
                going = ev.loss.detach() >= EARLY_STOP_LOSS  # a converged edit leaves before the backward
                if not eval_only and bool(going.any()):
                    ev.loss[going.to(ev.loss.device)].sum().backward()
            for j, e in enumerate(plan.edits):
                k = position[e]
                stats.steps[k] = it + 1
                stats.loss[k] = float(ev.loss[j].detach())
                stats.target_prob[k] = float(ev.target_prob[j])
                stats.reached[k] = bool(ev.reached[j])
                stats.converged[k] = not bool(going[j])
                if stats.converged[k]:
                    active[k] = False
        if eval_only:
            break
        if not bool(active.any()):
            break
        frozen = (~active).to(dev)
        saved = delta.detach()[frozen].clone()
        opt.step()
        with torch.no_grad():
            delta[frozen] = saved
            total = base + delta
            norms = total.norm(dim=1)
            scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-30), torch.ones_like(norms))
            delta.copy_(total * scale.unsqueeze(1) - base)
    return delta.detach(), stats


def _row_source(
    model: nn.Module, problem: ZProblem, rows: torch.Tensor, hparams: Any, chunk_rows: int, mods: ZModules
) -> RowSource:
    """The prefix cache of ``rows`` (``z_prefix_cache``; with the z layer's outputs when ``layer_replay``), or
    whole prompts where the model's cache is unusable."""
    if not hparams.z_prefix_cache:
        return FullRows(problem.rows)
    if hparams.layer_replay:
        try:
            return PrefixCache(model, problem.rows, rows, chunk_rows, _z_replay(hparams), mods.loss_mlp)
        except ArchitectureError as exc:
            logger.warning("z: layer replay unavailable (%s); every step runs every layer", exc)
    try:
        return PrefixCache(model, problem.rows, rows, chunk_rows, unread_mlp=mods.loss_mlp)
    except ArchitectureError as exc:
        logger.warning("z: prefix cache unavailable (%s); every step runs whole prompts", exc)
        return FullRows(problem.rows)


def _z_replay(hparams: Any) -> LayerReplay:
    """The decoder layers up to the z layer, which no delta reaches (replay.py)."""
    return LayerReplay(decoder_layers(hparams.layer_module_tmp, hparams.layers[-1]))


def _cache_blocks(model: nn.Module, problem: ZProblem, items: list[int], hparams: Any) -> list[list[int]]:
    """``items`` (one per edit) in blocks whose cached prefixes fit ``z_cache_mb``; every edit has as many rows."""
    return edit_blocks(
        items,
        len(problem.optimised_rows(0, hparams.kl_factor > 0)),
        float(problem.rows.lookup.max()),
        key_value_bytes_per_token(model),
        hparams.z_cache_mb,
    )


def _run_phase(
    model: nn.Module,
    problem: ZProblem,
    mods: ZModules,
    phase: _Phase,
    hparams: Any,
    chunk_rows: int,
    cache: Optional[PrefixCache] = None,
) -> tuple[torch.Tensor, PhaseStats]:
    """``_optimise`` over blocks of edits whose cached prefixes fit ``z_cache_mb``, one block after another;
    with ``cache`` (built by :func:`prepare_z` for every edit), in one block on it.

    Edits never interact (per-edit losses, per-coordinate Adam), so blocks give the same deltas as one run.
    """
    if cache is not None:
        return _optimise(model, problem, mods, phase, hparams, chunk_rows, cache)
    with_kl = hparams.kl_factor > 0
    positions = list(range(len(phase.edits)))
    blocks = _cache_blocks(model, problem, positions, hparams) if hparams.z_prefix_cache else [positions]
    deltas, stats = torch.zeros_like(phase.base), PhaseStats.empty(len(positions))
    for b, block in enumerate(blocks):
        part = phase.block(
            block, phase.desc if len(blocks) == 1 else f"{phase.desc} (block {b + 1}/{len(blocks)})"
        )
        rows = torch.cat([problem.optimised_rows(e, with_kl) for e in part.edits])
        d, st = _optimise(
            model,
            problem,
            mods,
            part,
            hparams,
            chunk_rows,
            _row_source(model, problem, rows, hparams, chunk_rows, mods),
        )
        deltas[torch.tensor(block, device=deltas.device)] = d
        stats.put(block, st)
    return deltas, stats


@dataclass
class ZSetup:
    """What the z optimisation of a batch builds before the neurons are chosen: its prompt rows, the modules it
    touches and, when one block of edits holds every edit (``z_cache_mb``), the prefix cache of every row, whose
    suffix pass also read the inputs of ``inputs_at_fact`` at each row's fact token on the unedited model."""

    problem: ZProblem
    mods: ZModules
    source: Optional[PrefixCache] = None  # every optimised row of every edit; None: each phase builds its own

    def rewriting_inputs(self, name: str) -> Optional[torch.Tensor]:
        """The input of ``name`` at the fact token of every rewriting row (request-major, one row per edit and
        context template: the rows of the keys), ``[rows, dim]``; None when the suffix pass did not read it."""
        if self.source is None or name not in self.source.at_fact:
            return None
        rewriting = torch.nonzero(~self.problem.row_is_kl).flatten()
        return self.source.at_fact[name][self.source.local(rewriting)]

    def unedited_outputs(self) -> Optional[torch.Tensor]:
        """The z layer's output at each edit's plain rewriting row ``[n, d_model]`` (None without the cache)."""
        if self.source is None or self.source.hidden is None:
            return None
        hidden = self.source.hidden
        return hidden[self.source.local(self.problem.plain_row).to(hidden.device), 0].float()


def prepare_z(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest],
    templates: ContextTemplates,
    hparams: Any,
    inputs_at_fact: Sequence[str] = (),
    chunk_rows: int = DEFAULT_Z_CHUNK_ROWS,
) -> ZSetup:
    """The rows and modules of the batch's z optimisation; with ``inputs_at_fact`` (modules at or below the z
    layer), the prefix cache of every edit is built now, reading their inputs at the fact tokens, when the
    prefix cache and the layer replay are on and one block holds every edit (else no cache is built here)."""
    mods = z_modules(model, hparams)
    problem = build_z_problem(tok, requests, templates, hparams.fact_token, input_device(model))
    setup = ZSetup(problem, mods)
    if not (inputs_at_fact and hparams.z_prefix_cache and hparams.layer_replay):
        return setup
    edits = list(range(problem.n_edits))
    if len(_cache_blocks(model, problem, edits, hparams)) > 1:
        return setup
    rows = torch.cat([problem.optimised_rows(e, hparams.kl_factor > 0) for e in edits])
    try:
        setup.source = PrefixCache(
            model, problem.rows, rows, chunk_rows, _z_replay(hparams), mods.loss_mlp, inputs_at_fact
        )
    except ArchitectureError as exc:
        logger.warning("z: layer replay unavailable (%s); every step runs every layer", exc)
    return setup


@dataclass
class ZResult:
    """Targets of a batch and how they were reached."""

    z: torch.Tensor  # [n, d_model] float32, z_layer output targets
    h: torch.Tensor  # [n, d_model] unedited outputs
    shared: torch.Tensor  # [n_clusters, d_model] phase-1 deltas (zeros when clustering is off)
    cluster_of: list[int]
    steps_shared: list[int]
    steps_per_edit: list[int]
    final_loss: list[float]
    target_prob: list[float]
    initial_target_prob: list[float]
    reached: list[bool]
    seconds: dict[str, float] = field(default_factory=dict)
    converged: list[bool] = field(default_factory=list)  # final phase: loss < EARLY_STOP_LOSS (left early)
    step_budget: int = 0  # forwards an edit may take: shared + per-edit phase, or v_num_grad_steps

    @property
    def steps(self) -> list[int]:
        """z steps (forwards) each edit took over both phases."""
        return [a + b for a, b in zip(self.steps_shared, self.steps_per_edit)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "step_budget": self.step_budget,
            "converged": self.converged,
            "steps_shared": self.steps_shared,
            "steps_per_edit": self.steps_per_edit,
            "final_loss": self.final_loss,
            "target_prob": self.target_prob,
            "initial_target_prob": self.initial_target_prob,
            "reached_target": self.reached,
            "delta_norm": (self.z - self.h).norm(dim=1).tolist(),
            "h_norm": self.h.norm(dim=1).tolist(),
            "cluster_of": self.cluster_of,
            "shared_delta_norm": self.shared.norm(dim=1).tolist(),
        }


def _reference(
    model: nn.Module, problem: ZProblem, mods: ZModules, hparams: Any, chunk_rows: int
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Unedited h_i (z-layer output at the plain prompt), KL reference log-probs (``[n, 0]`` when the KL term is
    off: the KL rows are not run) and initial P(target)."""
    with_kl = hparams.kl_factor > 0
    per = 2 if with_kl else 1  # rows per edit: the plain row, then its KL row
    rows = torch.stack([problem.plain_row, problem.kl_row], 1).flatten() if with_kl else problem.plain_row
    hs, kls, probs = [], [], []
    with torch.no_grad():
        step = max(per, chunk_rows // per * per)  # the rows of an edit stay together
        for start in range(0, len(rows), step):
            part = rows[start : start + step]
            plain_local = torch.arange(0, len(part), per)
            targets = [problem.target_positions(row) for row in part[0::per].tolist()]
            kl_local = torch.arange(1, len(part), 2) if with_kl else torch.zeros(0, dtype=torch.long)
            kl_pos = problem.rows.lookup[part[1::2]] if with_kl else torch.zeros(0, dtype=torch.long)
            read = (
                torch.cat([torch.full_like(pos, j) for j, (pos, _) in zip(plain_local.tolist(), targets)] + [kl_local]),
                torch.cat([pos for pos, _ in targets] + [kl_pos]),
            )
            h_rows, hidden = _forward(model, mods, RowBatch.full(problem.rows.select(part)), None, read)
            hs.append(h_rows[plain_local.to(h_rows.device)].float().to(mods.z_device))
            if with_kl:
                kls.append(
                    torch.log_softmax(
                        mods.logits(hidden[kl_local.to(hidden.device), kl_pos.to(hidden.device)]), -1
                    )
                )
            for j, (pos, tgt) in zip(plain_local.tolist(), targets):
                lp = torch.log_softmax(mods.logits(hidden[j, pos.to(hidden.device)]), -1)
                nll = -lp.gather(1, tgt.to(lp.device).unsqueeze(1)).sum() / len(tgt)
                probs.append(float(torch.exp(-nll)))
    h = torch.cat(hs, 0)
    kl = torch.cat(kls, 0) if with_kl else h.new_zeros((len(h), 0))
    return h, kl, probs


def compute_z(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest],
    templates: ContextTemplates,
    hparams: Any,
    cluster_of: Sequence[int],
    anchors: Sequence[int],
    clustering: bool,
    chunk_rows: int = DEFAULT_Z_CHUNK_ROWS,
    setup: Optional[ZSetup] = None,
) -> ZResult:
    """Targets z for ``requests``: two phases when ``clustering`` (clusters given by ``cluster_of`` and their
    ``anchors``), else MEMIT's per-edit optimisation with ``v_num_grad_steps``. ``setup``: the batch's
    :func:`prepare_z` (for these requests and hparams), built here when not given."""
    t0 = time.perf_counter()
    if setup is None:
        setup = prepare_z(model, tok, requests, templates, hparams, chunk_rows=chunk_rows)
    mods, problem, cache = setup.mods, setup.problem, setup.source
    n = problem.n_edits
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        h, kl_init, init_prob = _reference(model, problem, mods, hparams, chunk_rows)
        kl_init = kl_init.to(mods.z_device)
        d_model = h.shape[1]
        n_clusters = len(anchors)
        shared = torch.zeros(n_clusters, d_model, device=mods.z_device)
        steps_shared = [0] * n
        if clustering and hparams.shared_grad_steps > 0:
            anchor_list = list(anchors)
            loc = torch.tensor(anchor_list, device=mods.z_device)
            zeros = torch.zeros(n_clusters, d_model, device=mods.z_device)
            shared_phase = _Phase(
                anchor_list, zeros, h[loc], kl_init[loc], hparams.shared_grad_steps, False, "z shared"
            )
            shared, s1 = _run_phase(model, problem, mods, shared_phase, hparams, chunk_rows, cache)
            steps_shared = [s1.steps[c] for c in cluster_of]
        if clustering:
            base = shared[torch.tensor(list(cluster_of), device=mods.z_device)]
            n_fw, desc = max(hparams.per_edit_grad_steps, 1), "z per-edit"
        else:
            base = torch.zeros(n, d_model, device=mods.z_device)
            n_fw, desc = hparams.v_num_grad_steps, "z"
        d, s2 = _run_phase(
            model,
            problem,
            mods,
            _Phase(list(range(n)), base, h, kl_init, n_fw, True, desc),
            hparams,
            chunk_rows,
            cache,
        )
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    z = h + base + d
    result = ZResult(
        z=z,
        h=h,
        shared=shared,
        cluster_of=list(cluster_of),
        steps_shared=steps_shared,
        steps_per_edit=s2.steps,
        final_loss=s2.loss,
        target_prob=s2.target_prob,
        initial_target_prob=init_prob,
        reached=s2.reached,
        seconds={"z": time.perf_counter() - t0},
        converged=s2.converged,
        step_budget=(hparams.shared_grad_steps if clustering else 0) + n_fw,
    )
    logger.info(
        "z: %d edits, mean final loss %.4f, %d/%d reach the target, %d/%d converged, mean %.1f of %d steps",
        n,
        sum(s2.loss) / max(n, 1),
        sum(s2.reached),
        n,
        sum(s2.converged),
        n,
        sum(result.steps) / max(n, 1),
        result.step_budget,
    )
    return result
