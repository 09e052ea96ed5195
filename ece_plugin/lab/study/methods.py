"""The methods a study compares, built by name: ECE's variants, EasyEdit's baselines and their other ways of
running (GRACE with :class:`~.grace.GraceMethod`, which sets where its adapter reads; WISE with
:class:`~.wise.WiseMethod`, which routes each scored prompt alone and draws its loc prompts from the statistics
corpus of the ECE hparams)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from ...method.hparams import ECEHyperParams
from ...method.statistics import StatsSpec
from .baselines import (
    BASELINE_ALIASES,
    BASELINES,
    ECE_VARIANTS,
    EasyEditMethod,
    ECEMethod,
    ece_variant_hparams,
    variant_label,
)
from .common import StudyError
from .grace import GraceMethod
from .wise import WiseMethod


def build_methods(
    names: Sequence[str],
    ece_hparams: ECEHyperParams,
    baseline_hparams: dict[str, Path],
    ece_overrides: Optional[dict[str, Any]] = None,
    baseline_overrides: Optional[dict[str, Any]] = None,
    ece_label_suffix: str = "",
) -> list[Any]:
    """Methods by name: ECE variants (see :data:`ECE_VARIANTS`), EasyEdit baselines (:data:`BASELINES`) and
    their other ways of running (:data:`BASELINE_ALIASES`, e.g. ``SPHERE-batched``); ``ece_label_suffix`` is
    appended to the ECE variants' names (what a command line changed in their hparams)."""
    methods: list[Any] = []
    for name in names:
        if name in ECE_VARIANTS:
            hp = ece_variant_hparams(ece_hparams, name, **(ece_overrides or {}))
            methods.append(ECEMethod(hp, name=variant_label(name, hp) + ece_label_suffix))
        elif name in BASELINES or name in BASELINE_ALIASES:
            alg, via, label = BASELINE_ALIASES.get(name, (name, "auto", ""))
            if alg not in baseline_hparams:
                raise StudyError(f"no hparams file given for {alg}")
            path, overrides = baseline_hparams[alg], dict(baseline_overrides or {})
            if alg == "GRACE":
                methods.append(GraceMethod(alg, path, name=label, via=via, overrides=overrides))
            elif alg == "WISE":
                methods.append(WiseMethod(alg, path, name=label, via=via, overrides=overrides,
                                          loc_corpus=StatsSpec.from_hparams(ece_hparams)))
            else:
                methods.append(EasyEditMethod(alg, path, name=label, via=via, overrides=overrides))
        else:
            known = sorted(ECE_VARIANTS) + list(BASELINES) + list(BASELINE_ALIASES)
            raise StudyError(f"unknown method {name!r}; known: {known}")
    return methods
