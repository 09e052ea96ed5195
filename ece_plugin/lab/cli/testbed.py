"""``ece-plugin build-testbed``, ``probe-testbed`` and ``stats-corpus``: the fact-world testbed's commands (their
options and runners live with the builder, in :mod:`ece_plugin.lab.testbed.cli`)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(sub: Any) -> list[argparse.ArgumentParser]:
    from ..testbed.cli import add_build_testbed_parser, add_probe_parser, add_stats_corpus_parser

    return [add_build_testbed_parser(sub), add_probe_parser(sub), add_stats_corpus_parser(sub)]
