"""Train a small causal LM from scratch on real facts (CounterFact, zsRE) mixed with WikiText-2.

``build_testbed(TestbedConfig(...))`` trains the tokenizer and the model, and writes a Hugging Face model
directory (model + tokenizer via ``save_pretrained``, float32 safetensors) with a ``testbed_manifest.json``
recording the data files, the records trained on, the seed, the configuration, the training time and the
final loss. The directory name must contain the family (``llama`` / ``gpt2``) because EasyEdit chooses code
paths by substrings of the model name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from ...method import atomic
from ...resources import REPO_ROOT
from .facts import FactWorld, SamplerConfig, SequenceSampler, build_fact_world
from .tokenizer import make_portable, to_hf_tokenizer, train_bpe_tokenizer

logger = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "gpt2")
MANIFEST_NAME = "testbed_manifest.json"

DATA_DIR = REPO_ROOT / "data"


class TestbedConfigError(ValueError):
    """A testbed build option is invalid; the message names the option."""

    __test__ = False  # not a pytest test class


@dataclass
class TestbedConfig:
    """Everything that determines a testbed model (same config + same seed -> same weights)."""

    __test__ = False  # not a pytest test class

    output_dir: Path
    architecture: str = "llama"
    seed: int = 0
    # data
    counterfact_path: Path = DATA_DIR / "counterfact" / "counterfact-edit.json"
    n_records: int = 2000
    counterfact_val_path: Optional[Path] = DATA_DIR / "counterfact" / "counterfact-val.json"
    n_val_records: int = 300
    rome_format_path: Optional[Path] = DATA_DIR / "counterfact" / "counterfact-rome-format.json"
    zsre_path: Optional[Path] = DATA_DIR / "zsre" / "zsre_mend_eval.json"
    n_zsre: int = 300
    zsre_relations: bool = False
    target_answers: bool = False
    wiki_paths: tuple[Path, ...] = (
        DATA_DIR / "wikitext-2-raw" / "wiki.valid.raw",
        DATA_DIR / "wikitext-2-raw" / "wiki.test.raw",
    )
    # model size
    vocab_size: int = 8000
    n_layers: int = 6
    hidden_size: int = 192
    intermediate_size: int = 1536
    n_heads: int = 6
    max_length: int = 64
    # training
    steps: int = 1500
    max_minutes: Optional[float] = None
    batch_size: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    num_threads: Optional[int] = 2
    log_every: int = 25
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    command: Optional[str] = None

    def validate(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise TestbedConfigError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.architecture not in Path(self.output_dir).name.lower():
            raise TestbedConfigError(
                f"output_dir name {Path(self.output_dir).name!r} must contain {self.architecture!r}: EasyEdit "
                "selects model-family code paths by substrings of the model name"
            )
        for name in ("n_records", "n_layers", "hidden_size", "intermediate_size", "n_heads", "max_length",
                     "steps", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise TestbedConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.n_heads:
            raise TestbedConfigError(f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")
        if not self.lr > 0:
            raise TestbedConfigError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.sampler.mention_prob < 1.0:
            raise TestbedConfigError(f"mention_prob must be in [0, 1), got {self.sampler.mention_prob}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise TestbedConfigError(f"max_minutes must be positive, got {self.max_minutes}")

    def to_json(self) -> dict[str, Any]:
        def convert(value: Any) -> Any:
            if isinstance(value, Path):
                return _display_path(value)
            if isinstance(value, (list, tuple)):
                return [convert(v) for v in value]
            if isinstance(value, dict):
                return {k: convert(v) for k, v in value.items()}
            return value

        return {k: convert(v) for k, v in dataclasses.asdict(self).items()}


def _display_path(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_model(config: TestbedConfig, vocab_size: int, special_ids: dict[str, int]) -> Any:
    """A freshly initialised Llama or GPT-2 causal LM of the configured size (seeded by the caller)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if config.architecture == "llama":
        llama_config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.n_layers,
            num_attention_heads=config.n_heads,
            num_key_value_heads=config.n_heads,
            max_position_embeddings=max(256, 2 * config.max_length),
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=special_ids["bos"],
            eos_token_id=special_ids["eos"],
            pad_token_id=special_ids["pad"],
        )
        return LlamaForCausalLM(llama_config)
    gpt2_config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=max(256, 2 * config.max_length),
        n_embd=config.hidden_size,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_inner=config.intermediate_size,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=special_ids["bos"],
        eos_token_id=special_ids["eos"],
        pad_token_id=special_ids["pad"],
    )
    return GPT2LMHeadModel(gpt2_config)


def _tokenizer_corpus(world: FactWorld, sampler: SequenceSampler, n_texts: int) -> list[str]:
    texts = list(world.wiki_lines)
    for fact in world.facts:
        texts.extend(f"{prompt} {fact.answer}." for prompt in fact.prompts)
    if sampler.config.mention_prob > 0:
        texts.extend(f"{mention}." for mention in world.mentions)
    texts.extend(sampler.texts(n_texts, 200))
    return texts


def _lr_at(step: int, config: TestbedConfig, total: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    losses: list[float]


def train_model(
    model: torch.nn.Module, hf_tok: Any, sampler: SequenceSampler, config: TestbedConfig
) -> TrainResult:
    """Plain next-token training on sampled fact/wiki sequences; AdamW with warmup + cosine decay."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name or "ln_" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    approx_chars = config.max_length * 5
    losses: list[float] = []
    start = time.monotonic()
    model.train()
    progress = tqdm(range(config.steps), desc="testbed training", unit="step", disable=None)
    step = 0
    for step in progress:
        if config.max_minutes is not None and time.monotonic() - start > 60 * config.max_minutes:
            logger.info("time budget of %.1f min reached after %d steps", config.max_minutes, step)
            break
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config, config.steps)
        batch = hf_tok(
            list(sampler.texts(config.batch_size, approx_chars)),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=config.max_length,
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(float(out.loss.detach()))
        if step % config.log_every == 0 or step == config.steps - 1:
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
            logger.info("step %d loss %.4f lr %.2e", step, losses[-1], optimizer.param_groups[0]["lr"])
    else:
        step = config.steps
    model.eval()
    tail = losses[-20:] or [float("nan")]
    return TrainResult(steps=len(losses), seconds=time.monotonic() - start, final_loss=sum(tail) / len(tail),
                       losses=losses)


def _write_dir_atomically(target: Path, write: Any) -> None:
    """Write a directory through ``write(tmp_dir)`` beside ``target``, then swap it into place (the one
    write-beside-and-swap path, :func:`ece_plugin.method.atomic.atomic_folder`); files of an existing ``target``
    other than the model's own are carried over."""
    from ...files.modeldir import carry_over

    with atomic.atomic_folder(target) as tmp:
        write(tmp)
        if target.is_dir():
            carry_over(target, tmp)


def build_testbed(config: TestbedConfig, force: bool = False) -> Path:
    """Build the testbed model directory described by ``config``; returns its path. An existing
    ``output_dir`` (or one inside a model folder, or not writable) is refused before any work unless ``force``
    (:func:`ece_plugin.files.outputs.check_outputs`)."""
    from ...files.outputs import Output, check_outputs

    config.validate()
    output_dir = Path(config.output_dir)
    check_outputs([Output("--output-dir", output_dir, "folder")], force=force)
    threads_before = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        torch.manual_seed(config.seed)
        world = build_fact_world(
            counterfact_path=Path(config.counterfact_path),
            n_records=config.n_records,
            counterfact_val_path=Path(config.counterfact_val_path) if config.counterfact_val_path else None,
            n_val_records=config.n_val_records,
            rome_format_path=Path(config.rome_format_path) if config.rome_format_path else None,
            zsre_path=Path(config.zsre_path) if config.zsre_path else None,
            n_zsre=config.n_zsre,
            wiki_paths=[Path(p) for p in config.wiki_paths],
            zsre_relations=config.zsre_relations,
            target_answers=config.target_answers,
        )
        corpus_sampler = SequenceSampler(world, config.sampler, seed=config.seed + 1)
        tokenizer = train_bpe_tokenizer(_tokenizer_corpus(world, corpus_sampler, 4000), config.vocab_size)
        hf_tok = to_hf_tokenizer(tokenizer, model_max_length=max(256, 2 * config.max_length))
        special_ids = {
            "bos": hf_tok.bos_token_id,
            "eos": hf_tok.eos_token_id,
            "pad": hf_tok.pad_token_id,
        }
        torch.manual_seed(config.seed)
        model = make_model(config, len(hf_tok), special_ids)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("training %s testbed with %.2f M parameters", config.architecture, n_params / 1e6)
        sampler = SequenceSampler(world, config.sampler, seed=config.seed)
        result = train_model(model, hf_tok, sampler, config)
        manifest = _manifest(config, world, result, n_params)

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            hf_tok.save_pretrained(tmp)
            make_portable(tmp)
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")

        _write_dir_atomically(output_dir, write)
    finally:
        torch.set_num_threads(threads_before)
    logger.info("testbed written to %s (final loss %.4f, %.1f s)", output_dir, result.final_loss, result.seconds)
    return output_dir


def _manifest(config: TestbedConfig, world: FactWorld, result: TrainResult, n_params: int) -> dict[str, Any]:
    import tokenizers
    import transformers

    files = [Path(config.counterfact_path), *[Path(p) for p in config.wiki_paths]]
    for optional in (config.counterfact_val_path, config.rome_format_path, config.zsre_path):
        if optional is not None:
            files.append(Path(optional))
    return {
        "format": "ece-plugin testbed manifest v1",
        "architecture": config.architecture,
        "n_parameters": n_params,
        "seed": config.seed,
        "command": config.command or "ece_plugin.lab.testbed.build_testbed(TestbedConfig(...)) (Python API)",
        "config": config.to_json(),
        "data_files": [{"path": _display_path(p), "sha256": _sha256(p)} for p in files],
        "counterfact_case_ids": world.counterfact_case_ids,
        "counterfact_val_case_ids": world.counterfact_val_case_ids,
        "zsre_indices": world.zsre_indices,
        "n_facts": len(world.facts),
        "n_target_mentions": len(world.mentions) if config.sampler.mention_prob > 0 else 0,
        "relations": {name: templates for name, templates in world.relations.items()},
        "training": {
            "steps": result.steps,
            "seconds": round(result.seconds, 1),
            "final_loss": round(result.final_loss, 4),
            "loss_every_25_steps": [round(x, 4) for x in result.losses[::25]],
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
