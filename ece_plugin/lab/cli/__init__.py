"""``ece-plugin``: the command line. It parses, calls the library, prints the result and writes its files.

One module per command:

=================  ===================  ==============================================================
command            module               what it does
=================  ===================  ==============================================================
demo               ``demo.py``          sequential batched CounterFact editing, ECE against EasyEdit's
                                        ROME / MEMIT / AlphaEdit (Table 1)
edit               ``edit.py``          ECE edits; the edited model (``--save-model``) and/or a
                                        compact, reversible edit file (``--save-edits``)
apply, revert      ``apply.py``         put an edit file on a model, or take it off, bit-exact
bench              ``bench.py``         methods x number of edits x batch size, or ``--timing``
layer-sweep        ``layer_sweep.py``   single edits at every layer; the best layer
batch-study        ``batch_study.py``   batch against sequential-batched editing
lifelong           ``lifelong.py``      N sequential edits, checkpoints every K, ``--resume``
explain            ``explain.py``       neurons and clusters ECE would edit, without editing
evaluate           ``evaluate.py``      a model's pre-edit row on record files
stats              ``stats.py``         precompute the second-moment statistics C0
build-testbed,     ``testbed.py``       train a fact-world testbed; its subject-recall probe per layer;
probe-testbed,                          its statistics corpus
stats-corpus
=================  ===================  ==============================================================

``common.py`` holds the shared options, the bundled defaults and the steps every command takes first. Every
command writes machine-readable results (JSON, CSV for tables, PNG plots) into ``--out DIR`` (default
``runs/<command>-<timestamp>/``). Errors print one line to stderr and exit non-zero (2 for usage, 1 otherwise);
``--log-level DEBUG`` adds the traceback; Ctrl-C prints one line and exits 130.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Optional

from ... import resources
from . import apply, batch_study, bench, demo, edit, evaluate, explain, layer_sweep, lifelong, stats, testbed
from .common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, CLIError, Parser

logger = logging.getLogger("ece_plugin.lab.cli")

#: Where each command is wired in, in the order ``--help`` lists them.
_PARSER_ADDERS: tuple[Callable[[argparse._SubParsersAction], object], ...] = (
    demo.add_parser,
    edit.add_parser,
    apply.add_parsers,
    bench.add_parser,
    layer_sweep.add_parser,
    batch_study.add_parser,
    lifelong.add_parser,
    explain.add_parser,
    evaluate.add_parser,
    stats.add_parser,
    testbed.add_parsers,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``ece-plugin`` parser with every command."""
    parser: argparse.ArgumentParser = Parser(
        prog="ece-plugin",
        description="ECE (Explainable and Efficient Editing) for EasyEdit: demo, editing, benchmarks, studies.",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--version", action="version", version=f"%(prog)s {resources.version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _PARSER_ADDERS:
        add(sub)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    return (CLIError, FileNotFoundError, ValueError, KeyError, ImportError, OSError)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one ``ece-plugin`` command; the exit status."""
    command = "?"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        logging.basicConfig(
            level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            force=True,
        )
        if not getattr(args, "command", None):
            parser.print_help()
            return EXIT_USAGE
        command = args.command
        func: Callable[[argparse.Namespace], int] = args.func
        return int(func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("ece-plugin: interrupted\n")
        return EXIT_INTERRUPTED
    except _known_errors() as exc:
        logger.debug("error", exc_info=True)
        sys.stderr.write(f"ece-plugin {command}: error: {type(exc).__name__}: {_one_line(exc)}\n")
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - anything else: still one line; the traceback with DEBUG
        logger.debug("unexpected error", exc_info=True)
        sys.stderr.write(
            f"ece-plugin {command}: error: {type(exc).__name__}: {_one_line(exc)} "
            "(unexpected; --log-level DEBUG shows the traceback)\n"
        )
        return EXIT_FAILURE


__all__ = ["build_parser", "main"]
