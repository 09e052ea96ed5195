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
from .common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CLIError,
    Parser,
    UsageError,
    forget_created,
    given_options,
    remove_empty_created,
)

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


MAX_LINE = 299  # characters of an error line
MAX_WORD = 60  # characters of one word (a path) in a cut error line


def _one_line(exc: BaseException, prefix: str, suffix: str = "") -> str:
    """``prefix`` + the error's message + ``suffix`` on one line of at most :data:`MAX_LINE` characters (a long
    message keeps its start, which names the file, key or record, and its end)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    room = MAX_LINE - len(prefix) - len(suffix)
    if len(text) > room:  # long words after the first (repeated paths, prompts) keep their ends, then the middle
        words = text.split()
        first_long = next((i for i, w in enumerate(words) if len(w) > MAX_WORD), -1)
        text = " ".join(w if len(w) <= MAX_WORD or i == first_long else "..." + w[-(MAX_WORD - 3):]
                        for i, w in enumerate(words))
    if len(text) > room:
        tail = max(40, room // 4)
        text = text[: room - tail - 5] + " ... " + text[-tail:]
    return prefix + text + suffix


def _quiet_sigint_on_exit() -> None:
    """From here on a Ctrl-C ends the process as the signal does (status 130), without a traceback from whatever
    Python is running while it exits (a command line run only)."""
    import signal

    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    except ValueError:  # not the main thread
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one ``ece-plugin`` command; the exit status."""
    command = "?"
    forget_created()
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help (0) or a usage error argparse has printed (2)
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        logging.basicConfig(
            level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            force=True,
        )
        if not getattr(args, "command", None):
            parser.print_help()
            return EXIT_USAGE
        command = args.command
        args._given = given_options(parser, args.command, list(sys.argv[1:] if argv is None else argv))
        func: Callable[[argparse.Namespace], int] = args.func
        return int(func(args) or 0)
    except KeyboardInterrupt:
        remove_empty_created()
        sys.stderr.write("ece-plugin: interrupted\n")
        return EXIT_INTERRUPTED
    except UsageError as exc:
        remove_empty_created()
        sys.stderr.write(_one_line(exc, f"ece-plugin {command}: error: ", " (see --help)") + "\n")
        return EXIT_USAGE
    except _known_errors() as exc:
        remove_empty_created()
        logger.debug("error", exc_info=True)
        sys.stderr.write(_one_line(exc, f"ece-plugin {command}: error: {type(exc).__name__}: ") + "\n")
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - anything else: still one line; the traceback with DEBUG
        remove_empty_created()
        logger.debug("unexpected error", exc_info=True)
        sys.stderr.write(_one_line(exc, f"ece-plugin {command}: error: {type(exc).__name__}: ",
                                   " (unexpected; --log-level DEBUG shows the traceback)") + "\n")
        return EXIT_FAILURE
    finally:
        if argv is None:
            _quiet_sigint_on_exit()


__all__ = ["build_parser", "main"]
