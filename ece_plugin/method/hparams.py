"""ECE hyperparameters: a dataclass read from YAML, validated key by key.

:class:`ECEHyperParams` offers the API EasyEdit's ``BaseEditor`` uses of its ``HyperParams`` (``from_hparams``,
``from_json``, ``to_dict``, ``construct_float_from_scientific_notation``, and the attributes ``alg_name``,
``model_name``, ``device``, ``batch_size``, ``model_parallel``, ``max_length``); EasyEdit checks no base class, so the
method needs nothing from easyeditor.

The field names follow EasyEdit's MEMIT/AlphaEdit hparams wherever the concept is the same (``layers``,
``v_num_grad_steps``, ``mom2_update_weight``, the module templates, ...), so a researcher can move a MEMIT
YAML file to ECE by adding the ECE-specific keys (``attribution``, ``neuron_threshold``, clustering and the
two z phases).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from torch import device as torch_device

from .finite import is_finite_number

logger = logging.getLogger(__name__)

ATTRIBUTIONS = ("AS", "WI", "RS")
FACT_TOKENS = ("subject_last", "last", "subject_first", "subject_first_after_last")
MOM2_DTYPES = ("float32", "float64", "float16", "bfloat16")


class HParamsError(ValueError):
    """A hyperparameter file or value is wrong; the message names the key."""


@dataclass
class ECEHyperParams:
    """Hyperparameters of ECE (Explainable and Efficient Editing, Zhang et al., WWW 2025).

    Required keys have no default. ``p`` in the paper is ``neuron_threshold``; lambda is
    ``mom2_update_weight``.
    """

    # --- model and the layers to edit ---
    model_name: str
    layers: list[int]
    # --- attribution and neuron selection (ECE stage 1) ---
    attribution: str = "AS"  # AS | WI | RS
    neuron_threshold: float = 0.8  # p: smallest set of top neurons holding this share of the score
    # --- clustering of the edits (ECE stage 2) ---
    clustering: bool = True
    n_clusters: Optional[int] = None  # fixed number of clusters; None -> ceil(cluster_ratio * n_edits)
    cluster_ratio: float = 0.1
    # --- target values z (MEMIT's optimisation, in two phases) ---
    v_num_grad_steps: int = 25  # steps of every edit when clustering is off (MEMIT's z)
    shared_grad_steps: int = 20  # phase 1: steps on each cluster's anchor
    per_edit_grad_steps: int = 5  # phase 2: per-edit steps from the shared delta
    v_lr: float = 0.5
    v_loss_layer: int = -1  # -1: the last layer of the model
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    fact_token: str = "subject_last"
    # run each prompt's tokens before the fact token once per batch (exact, faster)
    z_prefix_cache: bool = True
    # layers no change can reach are not re-run (exact, replay.py): in the z steps (with the prefix cache) the
    # layers up to the z layer, in the key re-reads the layers below the last written one
    layer_replay: bool = True
    # z steps run the loss layer's MLP only at the positions the loss reads (exact, read_positions.py)
    z_loss_positions_only: bool = True
    # key reads run the MLP of the deepest layer they reach only at each row's fact token (exact, read_positions.py)
    key_positions_only: bool = True
    z_cache_mb: float = 2048.0  # memory for those cached keys/values; more edits run in blocks, one by one
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    # --- the least-squares update ---
    mom2_adjustment: bool = True
    mom2_update_weight: float = 15000.0  # lambda
    # the keys of earlier edits enter the update's covariance (Cprev, the paper's sequential form); false: MEMIT's
    carry_keys: bool = True
    mom2_dataset: str = "wikipedia"  # name of the statistics set in the cache path ({name}_stats)
    # text file or folder; None -> the set mom2_dataset names (wikitext-2-raw: bundled; else a cache file)
    mom2_corpus: Optional[str] = None
    # a corpus (bundled name or path) to compute C0 from, cached under ITS name, when mom2_dataset's cannot be had
    mom2_fallback_corpus: Optional[str] = None
    mom2_n_samples: int = 100000
    mom2_dtype: str = "float32"
    stats_dir: str = "./data/stats"
    # --- module templates ---
    rewrite_module_tmp: str = "model.layers.{}.mlp.down_proj"
    layer_module_tmp: str = "model.layers.{}"
    mlp_module_tmp: str = "model.layers.{}.mlp"
    attn_module_tmp: str = "model.layers.{}.self_attn"
    ln_f_module: str = "model.norm"
    lm_head_module: str = "lm_head"
    # --- running ---
    alg_name: str = "ECE"
    device: Union[int, str] = 0
    batch_size: int = 100
    max_length: int = 40
    model_parallel: bool = False
    state_device: str = "cpu"  # where the sequential state lives: 'cpu' or 'model' (each layer's device)
    seed: int = 0
    # --- departures from the paper (variants/; each off at its default, the paper's form) ---
    # variants/prompt_keys.py: mu K_P K_P^T joins the update's covariance and the carried keys, K_P the keys at the
    # other tokens of the plain rewrite prompts
    prompt_keys_weight: float = 0.0
    carry_prompt_keys: bool = True  # those keys also join the carried keys (later batches keep them too)
    # < 1: the carried prompt keys are kept in a moment of their own that each later batch multiplies by this
    # factor (P <- gamma P + mu K_P K_P^T), so their total weight stays below mu / (1 - gamma) batches; 1: they
    # join the edits' keys and never fade
    prompt_keys_decay: float = 1.0
    # variants/norm_anchor.py: > 0: before each batch every edited layer's drift from its unedited weight is pulled
    # back onto ||W - W0||_F <= norm_anchor_budget * ||W0||_F (bounded weight growth); 0: no budget
    norm_anchor_budget: float = 0.0
    # variants/norm_anchor.py: alpha > 0: each layer's update also minimises alpha ||W_new - W0||_F^2 at the batch's
    # neurons (a ridge anchored at the unedited weight, not at the current one); 0: none
    norm_anchor_ridge: float = 0.0
    # variants/balanced_lambda.py: beta > 0: the batch after n carried edits is written with lambda + beta * n
    # (C0 keeps pace with the carried keys); 0: lambda throughout
    mom2_update_weight_growth: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_hparams(cls, hparams_name_or_path: Union[str, Path]) -> ECEHyperParams:
        """Read a YAML (or JSON) file as EasyEdit's ``from_hparams`` does; ``.yaml`` may be omitted."""
        path = Path(hparams_name_or_path)
        if path.suffix not in (".yaml", ".yml", ".json"):
            path = path.with_name(path.name + ".yaml")
        if not path.is_file():
            raise FileNotFoundError(f"ECE hparams file not found: {path}")
        try:
            with open(path) as f:
                config = json.load(f) if path.suffix == ".json" else yaml.safe_load(f)
        except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            detail = " ".join(str(exc).split())
            raise HParamsError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {detail}") from exc
        if not isinstance(config, dict):
            raise HParamsError(f"{path}: an hparams file must hold a mapping of keys to values")
        return cls.from_dict(config, source=str(path))

    @classmethod
    def from_json(cls, fpath: str) -> ECEHyperParams:
        return cls.from_hparams(fpath)

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "<dict>") -> ECEHyperParams:
        """Build from a mapping, naming any missing, unknown or badly typed key."""
        config = dict(config)
        alg = config.get("alg_name", "ECE")
        if alg != "ECE":
            raise HParamsError(f"{source}: alg_name must be 'ECE', got {alg!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - set(fields))
        if unknown:
            raise HParamsError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in config]
        if missing:
            raise HParamsError(f"{source}: missing required key(s) {missing}")
        for name, value in list(config.items()):
            config[name] = _coerce(name, value, fields[name].type, source)
        try:
            return cls(**config)
        except HParamsError as exc:
            raise HParamsError(f"{source}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def construct_float_from_scientific_notation(config: dict[str, Any]) -> dict[str, Any]:
        """EasyEdit's helper of the same name: string values that read as numbers ('1e4') become floats, in place."""
        for key, value in config.items():
            if isinstance(value, str):
                try:
                    config[key] = float(value)
                except ValueError:
                    pass
        return config

    # --------------------------------------------------------------- validation
    def validate(self, n_layers: Optional[int] = None) -> None:
        """Check every value; with ``n_layers`` (the model's depth) also check layer indices."""
        if not isinstance(self.layers, list) or not self.layers:
            raise HParamsError("layers: must be a non-empty list of layer indices")
        if any(not isinstance(x, int) or x < 0 for x in self.layers):
            raise HParamsError(f"layers: layer indices must be non-negative integers, got {self.layers}")
        if len(set(self.layers)) != len(self.layers) or sorted(self.layers) != self.layers:
            raise HParamsError(f"layers: must be strictly increasing, got {self.layers}")
        if n_layers is not None:
            bad = [x for x in self.layers if x >= n_layers]
            if bad:
                raise HParamsError(f"layers: {bad} out of range for a model with {n_layers} layers")
            if self.v_loss_layer >= n_layers or self.v_loss_layer < -1:
                raise HParamsError(f"v_loss_layer: {self.v_loss_layer} out of range for {n_layers} layers")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise HParamsError(f"{f.name}: must be a number, got {value!r} ({type(value).__name__})")
            if not is_finite_number(value):
                raise HParamsError(f"{f.name}: must be a finite number, got {value}")
        if isinstance(self.device, bool) or (isinstance(self.device, int) and self.device < 0):
            raise HParamsError(f"device: must be a GPU index >= 0 or a device name, got {self.device!r}")
        if isinstance(self.device, str):
            try:
                torch_device(self.device)
            except RuntimeError as exc:
                raise HParamsError(f"device: unknown device {self.device!r}") from exc
        if self.attribution not in ATTRIBUTIONS:
            raise HParamsError(f"attribution: must be one of {ATTRIBUTIONS}, got {self.attribution!r}")
        if not (0.0 < self.neuron_threshold <= 1.0) or math.isnan(self.neuron_threshold):
            raise HParamsError(f"neuron_threshold: p must lie in (0, 1], got {self.neuron_threshold}")
        if self.n_clusters is not None and self.n_clusters < 1:
            raise HParamsError(f"n_clusters: must be >= 1 or null, got {self.n_clusters}")
        if not (0.0 < self.cluster_ratio <= 1.0):
            raise HParamsError(f"cluster_ratio: must lie in (0, 1], got {self.cluster_ratio}")
        for name in ("v_num_grad_steps", "shared_grad_steps", "per_edit_grad_steps"):
            if getattr(self, name) < 0:
                raise HParamsError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.clustering and self.shared_grad_steps + self.per_edit_grad_steps == 0:
            raise HParamsError("shared_grad_steps + per_edit_grad_steps: at least one z step is needed")
        if not self.clustering and self.v_num_grad_steps == 0:
            raise HParamsError("v_num_grad_steps: at least one z step is needed")
        for name in ("v_lr", "clamp_norm_factor"):
            if getattr(self, name) <= 0:
                raise HParamsError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("v_weight_decay", "kl_factor", "mom2_update_weight", "prompt_keys_weight",
                     "norm_anchor_budget", "norm_anchor_ridge", "mom2_update_weight_growth"):
            if getattr(self, name) < 0:
                raise HParamsError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if (self.norm_anchor_budget or self.norm_anchor_ridge) and not self.carry_keys:
            raise HParamsError("norm_anchor_budget / norm_anchor_ridge: need carry_keys: true (the carried state says where a sequence "
                               "starts, and so which weights are the unedited anchor)")
        if self.mom2_update_weight_growth and not (self.carry_keys and self.mom2_adjustment):
            raise HParamsError("mom2_update_weight_growth: needs carry_keys: true (it counts the carried edits) and "
                               "mom2_adjustment: true (it weighs C0)")
        if not (0.0 < self.prompt_keys_decay <= 1.0):
            raise HParamsError(f"prompt_keys_decay: must lie in (0, 1], got {self.prompt_keys_decay}")
        if not self.z_cache_mb > 0:
            raise HParamsError(f"z_cache_mb: must be > 0, got {self.z_cache_mb}")
        if self.fact_token not in FACT_TOKENS:
            raise HParamsError(f"fact_token: must be one of {FACT_TOKENS}, got {self.fact_token!r}")
        if self.mom2_dtype not in MOM2_DTYPES:
            raise HParamsError(f"mom2_dtype: must be one of {MOM2_DTYPES}, got {self.mom2_dtype!r}")
        if self.mom2_n_samples < 1:
            raise HParamsError(f"mom2_n_samples: must be >= 1, got {self.mom2_n_samples}")
        if self.batch_size < 1:
            raise HParamsError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.state_device not in ("cpu", "model"):
            raise HParamsError(f"state_device: must be 'cpu' or 'model', got {self.state_device!r}")
        for name in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp"):
            if "{}" not in getattr(self, name):
                raise HParamsError(f"{name}: the module template needs a '{{}}' for the layer index")
        for pair in self.context_template_length_params:
            if len(pair) != 2 or any(not isinstance(x, int) or x < 0 for x in pair):
                raise HParamsError(
                    "context_template_length_params: expected a list of [length, count] pairs, "
                    f"got {self.context_template_length_params}"
                )

    def n_clusters_for(self, n_edits: int) -> int:
        """How many clusters a batch of ``n_edits`` gets (1..n_edits)."""
        if n_edits < 1:
            raise ValueError("n_edits must be >= 1")
        k = self.n_clusters if self.n_clusters is not None else math.ceil(self.cluster_ratio * n_edits)
        return max(1, min(int(k), n_edits))


def _coerce(name: str, value: Any, annotation: Any, source: str) -> Any:
    """Coerce YAML scalars (``1e4`` read as a string by PyYAML) and check simple types, naming the key."""
    ann = str(annotation)
    try:
        if value is None:
            if "Optional" in ann or "None" in ann:
                return None
            raise HParamsError(f"{source}: {name} must not be null")
        if ann in ("float",) or ann.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, str):  # '1e-4' (PyYAML reads it as a string) or a quoted number: said, not silent
                logger.warning("%s: %s is the string %r; read as the number %s", source, name, value, float(value))
            return float(value)
        if ann in ("int",) or "Optional[int]" in ann:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, str):  # '1e5' (PyYAML reads scientific notation as a string)
                value = float(value)
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        if ann in ("bool",):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if ann == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
        if ann.startswith("list[int]"):
            if not isinstance(value, list):
                raise TypeError
            return [_exact_int(x) for x in value]
    except (TypeError, ValueError) as exc:
        raise HParamsError(f"{source}: {name} has a bad value {value!r} (expected {ann})") from exc
    return value


def _exact_int(value: Any) -> int:
    """An integer list item: an int, or a float with no fractional part; 1.9 or True is an error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError
    if isinstance(value, float) and not value.is_integer():
        raise ValueError
    return int(value)
