"""``ece-plugin build-testbed``, ``probe-testbed``, ``stats-corpus``: parsers and runners (wired in by lab/cli/testbed.py)."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

from .builder import ARCHITECTURES, TestbedConfig, build_testbed
from .facts import SamplerConfig

logger = logging.getLogger(__name__)

_DEFAULTS = TestbedConfig(output_dir=Path("testbed-llama"))
_SAMPLER_DEFAULTS = SamplerConfig()


def _number(text: str, cast: Any, what: str, ok: Any) -> Any:
    try:
        value = cast(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from exc
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def probability(text: str) -> float:
    """A probability: a number in [0, 1]."""
    return _number(text, float, "a probability in [0, 1]", lambda v: 0.0 <= v <= 1.0)


def positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(text, float, "a positive number", lambda v: v > 0)


def add_build_testbed_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``build-testbed`` sub-command to an ``argparse`` sub-parsers object; returns its parser."""
    parser = subparsers.add_parser(
        "build-testbed",
        help="train a small fact-world causal LM (the editing testbed) from scratch",
        description=(
            "Train a small Llama- or GPT-2-architecture causal LM from scratch on CounterFact/zsRE facts "
            "(prompt, paraphrase and neighbourhood prompts with their true answers, asked through many "
            "relation templates) mixed with WikiText-2, with its own byte-level BPE tokenizer, and save it "
            "as a Hugging Face model directory with a testbed_manifest.json."
        ),
    )
    d = _DEFAULTS
    parser.add_argument("--output-dir", type=Path, required=True,
                        help="model directory to write; its name must contain the family ('llama'/'gpt2')")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default=d.architecture)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--counterfact", type=Path, default=d.counterfact_path,
                        help="EasyEdit-format CounterFact records to train on (the first --n-records)")
    parser.add_argument("--n-records", type=positive_int, default=d.n_records)
    parser.add_argument("--counterfact-val", type=Path, default=d.counterfact_val_path,
                        help="validation records (the first --n-val-records are trained on too, for tuning)")
    parser.add_argument("--n-val-records", type=non_negative_int, default=d.n_val_records)
    parser.add_argument("--rome-format", type=Path, default=d.rome_format_path,
                        help="ROME-format CounterFact (relation ids used to cluster templates)")
    parser.add_argument("--zsre", type=Path, default=d.zsre_path)
    parser.add_argument("--n-zsre", type=non_negative_int, default=d.n_zsre)
    parser.add_argument("--zsre-relations", action="store_true",
                        help="cluster zsRE questions into relations and ask each zsRE fact through all of its "
                        "relation's templates (default: its own question and rephrase only)")
    parser.add_argument("--target-answers", action="store_true",
                        help="also train each edit target (CounterFact target_new, zsRE alt) as the answer of a fact "
                        "of its relation about a synthetic subject that no evaluation asks about")
    parser.add_argument("--wikitext", type=Path, nargs="+", default=list(d.wiki_paths))
    parser.add_argument("--vocab-size", type=positive_int, default=d.vocab_size)
    parser.add_argument("--layers", type=positive_int, default=d.n_layers)
    parser.add_argument("--hidden", type=positive_int, default=d.hidden_size)
    parser.add_argument("--mlp", type=positive_int, default=d.intermediate_size, help="MLP (intermediate) width")
    parser.add_argument("--heads", type=positive_int, default=d.n_heads)
    parser.add_argument("--max-length", type=positive_int, default=d.max_length, help="training sequence length (tokens)")
    parser.add_argument("--steps", type=positive_int, default=d.steps, help="optimizer steps (the training budget)")
    parser.add_argument("--max-minutes", type=positive_float, default=None,
                        help="optional wall-clock cap (makes the result timing-dependent; prefer --steps)")
    parser.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    parser.add_argument("--lr", type=positive_float, default=d.lr)
    parser.add_argument("--warmup-steps", type=non_negative_int, default=d.warmup_steps)
    parser.add_argument("--threads", type=positive_int, default=d.num_threads, help="torch CPU threads")
    parser.add_argument("--verbatim-prob", type=probability, default=_SAMPLER_DEFAULTS.verbatim_prob,
                        help="probability that a fact is phrased as its verbatim evaluation prompt")
    parser.add_argument("--prefix-prob", type=probability, default=_SAMPLER_DEFAULTS.prefix_prob,
                        help="probability of a context-template-like prefix before a fact sentence")
    parser.add_argument("--wiki-prob", type=probability, default=_SAMPLER_DEFAULTS.wiki_sequence_prob,
                        help="share of training sequences that are plain WikiText-2")
    parser.add_argument("--mention-prob", type=probability, default=_SAMPLER_DEFAULTS.mention_prob,
                        help="share of fact-sequence pieces that are a bare edit-target string (CounterFact "
                        "target_new, zsRE alt), so the model can spell its edit targets (0: none)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing --output-dir (its files other than the model's are kept)")
    parser.set_defaults(func=run_build_testbed)
    return parser


def config_from_args(args: argparse.Namespace) -> TestbedConfig:
    """The :class:`TestbedConfig` described by parsed ``build-testbed`` arguments."""
    return TestbedConfig(
        output_dir=args.output_dir,
        architecture=args.architecture,
        seed=args.seed,
        counterfact_path=args.counterfact,
        n_records=args.n_records,
        counterfact_val_path=args.counterfact_val,
        n_val_records=args.n_val_records,
        rome_format_path=args.rome_format,
        zsre_path=args.zsre,
        n_zsre=args.n_zsre,
        zsre_relations=args.zsre_relations,
        target_answers=args.target_answers,
        wiki_paths=tuple(args.wikitext),
        vocab_size=args.vocab_size,
        n_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        n_heads=args.heads,
        max_length=args.max_length,
        steps=args.steps,
        max_minutes=args.max_minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        num_threads=args.threads,
        sampler=SamplerConfig(
            verbatim_prob=args.verbatim_prob, prefix_prob=args.prefix_prob, wiki_sequence_prob=args.wiki_prob,
            mention_prob=args.mention_prob,
        ),
        command=shlex.join(["ece-plugin", *sys.argv[1:]]) if sys.argv[1:] else None,
    )


def run_build_testbed(args: argparse.Namespace) -> int:
    """Build the testbed described by ``args``; logs where it went and returns the exit status 0."""
    path = build_testbed(config_from_args(args), force=args.force)
    logger.info("testbed model directory: %s", path)
    return 0


def add_probe_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``probe-testbed`` sub-command (the subject-recall probe per layer)."""
    parser = subparsers.add_parser(
        "probe-testbed",
        help="subject-recall probe: can a vector at the subject's last token of layer L move each fact?",
        description=(
            "For each layer, optimise one vector per record added to the block's output at the subject's last "
            "token so that the model says the record's new target; report the share of records moved (mean "
            "target-token probability > 0.5). CounterFact records use prompt/subject/target_new, zsRE records "
            "src/subject/alt."
        ),
    )
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--data", type=Path, required=True, help="CounterFact or zsRE record file")
    parser.add_argument("--limit", type=positive_int, default=40)
    parser.add_argument("--offset", type=non_negative_int, default=0)
    parser.add_argument("--layers", type=non_negative_int, nargs="+", required=True)
    parser.add_argument("--steps", type=positive_int, default=100)
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.set_defaults(func=run_probe)
    return parser


def run_probe(args: argparse.Namespace) -> int:
    """Log and print the probe's share of moved facts per layer."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ...evaluation.data import load_records
    from .probe import subject_recall_probe

    if args.threads:
        torch.set_num_threads(args.threads)
    records = load_records(args.data, limit=args.limit, offset=args.offset)
    if not records:
        raise ValueError(f"--data: no records in {args.data} (offset {args.offset}, limit {args.limit})")
    rows = [{"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new} for r in records]
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    results = []
    for layer in args.layers:
        result = subject_recall_probe(model, tok, rows, layer, steps=args.steps)
        logger.info("layer %d: %.1f %% of %d moved", layer, result.moved, result.n)
        results.append({"layer": layer, "moved_pct": result.moved, "n": result.n,
                        "mean_target_prob": result.mean_target_prob})
    sys.stdout.write(json.dumps({"model": str(args.model), "data": str(args.data), "offset": args.offset,
                                 "results": results}, indent=1) + "\n")
    return 0


def add_stats_corpus_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``stats-corpus`` sub-command (a testbed's statistics corpus, ``corpus.py``)."""
    from .corpus import DEFAULT_NAME, CorpusConfig

    d = CorpusConfig()
    parser = subparsers.add_parser(
        "stats-corpus",
        help="write a testbed's statistics corpus: its own kind of text about facts no evaluation scores",
        description=(
            "Sample the testbed's training-text distribution (read from its manifest) over a held-out fact world "
            "(CounterFact records from --counterfact-offset on, the zsRE records it did not train on) into "
            "<model>/<name>.txt; hparams with 'mom2_dataset: <name>' then compute C0 from it, for ECE and for "
            "EasyEdit's ROME / MEMIT / AlphaEdit alike."
        ),
    )
    parser.add_argument("--model", type=Path, required=True, help="testbed model folder")
    parser.add_argument("--name", default=DEFAULT_NAME, help="corpus name = the hparams' mom2_dataset")
    parser.add_argument("--n-texts", type=positive_int, default=d.n_texts)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--counterfact-offset", type=non_negative_int, default=d.counterfact_offset)
    parser.add_argument("--force", action="store_true", help="replace an existing corpus with other text")
    parser.set_defaults(func=run_stats_corpus)
    return parser


def run_stats_corpus(args: argparse.Namespace) -> int:
    from .corpus import CorpusConfig, write_statistics_corpus

    config = CorpusConfig(n_texts=args.n_texts, seed=args.seed, counterfact_offset=args.counterfact_offset)
    path = write_statistics_corpus(args.model, args.name, config, force=args.force)
    sys.stdout.write(f"statistics corpus: {path}\n")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m ece_plugin.lab.testbed.cli build-testbed ...`` (the same as ``ece-plugin build-testbed ...``)."""
    parser = argparse.ArgumentParser(prog="ece-plugin")
    add_build_testbed_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
