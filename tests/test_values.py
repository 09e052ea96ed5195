"""Two-phase z: MEMIT's objective, batched; shared phase then per-edit phase."""

from __future__ import annotations

from typing import Any

import torch
from conftest import FACTS, make_gpt2, make_hparams, make_llama

from ece_plugin.method.requests import normalise_requests
from ece_plugin.method.values import build_z_problem, compute_z

PLAIN = [["{}"]]


def test_clustering_off_runs_every_edit_for_all_steps(tok: Any) -> None:
    model = make_llama(len(tok))
    hp = make_hparams("llama", clustering=False, v_num_grad_steps=3)
    r = compute_z(model, tok, normalise_requests(FACTS), PLAIN, hp, [0, 1, 2, 3], [0, 1, 2, 3], False)
    assert r.steps_per_edit == [3, 3, 3, 3] and r.steps_shared == [0, 0, 0, 0]
    assert torch.all(r.shared == 0)
    assert all(loss > 5e-2 for loss in r.final_loss)
    assert torch.all((r.z - r.h).norm(dim=1) > 0)


def test_batched_equals_one_edit_at_a_time(tok: Any) -> None:
    model = make_gpt2(len(tok))
    hp = make_hparams("gpt2", clustering=False, v_num_grad_steps=4)
    reqs = normalise_requests(FACTS)
    batched = compute_z(model, tok, reqs, PLAIN, hp, [0, 1, 2, 3], [0, 1, 2, 3], False)
    chunked = compute_z(model, tok, reqs, PLAIN, hp, [0, 1, 2, 3], [0, 1, 2, 3], False, chunk_rows=2)
    for i, req in enumerate(reqs):
        single = compute_z(model, tok, [req], PLAIN, hp, [0], [0], False)
        torch.testing.assert_close(batched.z[i], single.z[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(chunked.z[i], single.z[0], rtol=1e-4, atol=1e-4)


def test_per_edit_phase_starts_from_the_shared_delta(tok: Any) -> None:
    model = make_llama(len(tok))
    reqs = normalise_requests(FACTS)
    cluster_of, anchors = [0, 1, 0, 1], [0, 3]
    # per_edit_grad_steps = 1: the per-edit phase only evaluates, so z = h + U_c exactly
    hp = make_hparams("llama", shared_grad_steps=5, per_edit_grad_steps=1)
    r = compute_z(model, tok, reqs, PLAIN, hp, cluster_of, anchors, True)
    assert r.steps_shared == [5, 5, 5, 5] and r.steps_per_edit == [1, 1, 1, 1]
    for i, c in enumerate(cluster_of):
        torch.testing.assert_close(r.z[i] - r.h[i], r.shared[c], rtol=0, atol=1e-6)
    assert r.shared.norm(dim=1).min() > 0
    # the anchor's shared delta is its own MEMIT-style optimisation (without a final evaluation step)
    solo = compute_z(
        model,
        tok,
        [reqs[3]],
        PLAIN,
        make_hparams("llama", clustering=False, v_num_grad_steps=6),
        [0],
        [0],
        False,
    )
    torch.testing.assert_close(r.shared[1], solo.z[0] - solo.h[0], rtol=1e-4, atol=1e-4)
    # with per-edit steps, each edit moves away from its cluster's delta
    hp2 = make_hparams("llama", shared_grad_steps=5, per_edit_grad_steps=4)
    r2 = compute_z(model, tok, reqs, PLAIN, hp2, cluster_of, anchors, True)
    torch.testing.assert_close(r2.shared, r.shared)
    for i, c in enumerate(cluster_of):
        assert (r2.z[i] - r2.h[i] - r2.shared[c]).norm() > 1e-3


def test_clamp_bounds_the_total_delta(tok: Any) -> None:
    model = make_llama(len(tok))
    hp = make_hparams(
        "llama", clustering=True, shared_grad_steps=8, per_edit_grad_steps=5, clamp_norm_factor=0.1, v_lr=5.0
    )
    r = compute_z(model, tok, normalise_requests(FACTS), PLAIN, hp, [0, 0, 1, 1], [0, 2], True)
    ratio = (r.z - r.h).norm(dim=1) / r.h.norm(dim=1)
    assert torch.all(ratio <= 0.1 + 1e-5)


def test_z_reaches_the_target(tok: Any) -> None:
    model = make_gpt2(len(tok))
    hp = make_hparams("gpt2", clustering=False, v_num_grad_steps=25, v_lr=0.5)
    r = compute_z(model, tok, normalise_requests(FACTS[2:3]), PLAIN, hp, [0], [0], False)
    assert r.reached == [True]
    assert r.target_prob[0] > 0.5 > r.initial_target_prob[0]
    assert r.to_dict()["reached_target"] == [True]


def test_early_stop_freezes_an_edit(tok: Any) -> None:
    model = make_gpt2(len(tok))
    hp = make_hparams(
        "gpt2",
        clustering=False,
        v_num_grad_steps=60,
        v_lr=1.0,
        kl_factor=0.0,
        v_weight_decay=0.0,
        clamp_norm_factor=20.0,
    )
    r = compute_z(model, tok, normalise_requests(FACTS[2:3]), PLAIN, hp, [0], [0], False)
    assert r.steps_per_edit[0] < 60 and r.final_loss[0] < 5e-2


def test_converged_edits_leave_the_batch_and_the_rest_is_unchanged(tok: Any, monkeypatch: Any) -> None:
    """Edits converge at different steps; each converged edit is evaluated no more and takes no part in a backward,
    and every edit's z and step count equal its run alone (the batch it leaves does not move the others)."""
    import ece_plugin.method.values as values

    model = make_gpt2(len(tok))
    hp = make_hparams("gpt2", clustering=False, v_num_grad_steps=60, v_lr=1.0, kl_factor=0.0, v_weight_decay=0.0,
                      clamp_norm_factor=20.0)
    reqs = normalise_requests(FACTS)
    evaluated: list[list[int]] = []
    evaluate = values._evaluate

    def counting(plan: Any, *args: Any) -> Any:
        evaluated.append(list(plan.edits))
        return evaluate(plan, *args)

    monkeypatch.setattr(values, "_evaluate", counting)
    batched = compute_z(model, tok, reqs, PLAIN, hp, [0, 1, 2, 3], [0, 1, 2, 3], False)
    assert any(batched.converged) and len(set(batched.steps_per_edit)) > 1  # they leave at different steps
    for i in range(len(reqs)):
        assert sum(i in edits for edits in evaluated) == batched.steps_per_edit[i]  # no forward after leaving
    for i, req in enumerate(reqs):
        single = compute_z(model, tok, [req], PLAIN, hp, [0], [0], False)
        assert single.steps_per_edit == [batched.steps_per_edit[i]] and single.converged == [batched.converged[i]]
        torch.testing.assert_close(batched.z[i], single.z[0], rtol=1e-4, atol=1e-4)
    trace = batched.to_dict()
    assert trace["steps"] == batched.steps_per_edit and trace["step_budget"] == 60
    assert trace["converged"] == [loss < 5e-2 for loss in batched.final_loss]


def test_a_converged_edit_takes_no_part_in_the_backward(tok: Any, monkeypatch: Any) -> None:
    """The forward that finds an edit converged backpropagates the other edits' losses only."""
    import ece_plugin.method.values as values

    model = make_gpt2(len(tok))
    hp = make_hparams("gpt2", clustering=False, v_num_grad_steps=60, v_lr=1.0, kl_factor=0.0, v_weight_decay=0.0,
                      clamp_norm_factor=20.0)
    backed: list[int] = []
    evaluate = values._evaluate

    def watching(plan: Any, *args: Any) -> Any:
        ev = evaluate(plan, *args)
        if ev.loss.requires_grad:
            ev.loss.register_hook(lambda g: backed.append(int((g != 0).sum())))
        return ev

    monkeypatch.setattr(values, "_evaluate", watching)
    r = compute_z(model, tok, normalise_requests(FACTS[2:3]), PLAIN, hp, [0], [0], False)
    assert r.converged == [True] and r.steps_per_edit[0] < 60
    assert len(backed) == r.steps_per_edit[0] - 1  # the converging forward runs no backward


def test_problem_layout_follows_memit(tok: Any) -> None:
    reqs = normalise_requests(FACTS[:1])
    p = build_z_problem(tok, reqs, [["{}"], ["I know. {}"]], "subject_last", torch.device("cpu"))
    assert p.n_rewrite == 2 and p.kl_row.tolist() == [2] and p.plain_row.tolist() == [0]
    texts = tok.batch_decode(p.rows.input_ids, skip_special_tokens=True)
    assert texts[0].strip() == "The capital of France"
    assert texts[2].strip() == "France is a"
    pos, tgt = p.target_positions(0)
    assert pos.tolist() == [4] and tok.decode(tgt) == " Rome"
