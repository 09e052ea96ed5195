"""What every ``ece-plugin`` command shares: the bundled defaults, the shared options, and the steps each command
takes before its own work (find the model, read the hparams and records, load the model, make the output folder).

Heavy modules (torch, transformers, EasyEdit) are imported inside the functions that need them, so that parsing the
command line stays quick and a Ctrl-C at any moment reaches :func:`ece_plugin.lab.cli.main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, Optional

from ...resources import REPO_ROOT, ResourceNotFoundError, resolve_data, resolve_hparams, resolve_model

logger = logging.getLogger("ece_plugin.lab.cli")

DEFAULT_HPARAMS_DIR = REPO_ROOT / "hparams"
DEFAULT_DATA = REPO_ROOT / "data" / "counterfact" / "counterfact-edit.json"
DEFAULT_ZSRE = REPO_ROOT / "data" / "zsre" / "zsre_mend_eval.json"
EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
PROTOCOLS = ("after_all", "after_batch")


class CLIError(ValueError):
    """A command-line input is wrong (message printed as one line)."""


class UsageError(CLIError):
    """Options that make no sense together (exit 2, as argparse's own errors)."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``ece-plugin edit: error: argument --batch-size: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def given_options(parser: argparse.ArgumentParser, command: str, argv: list[str]) -> set[str]:
    """The option names (``dest``) given on the command line of ``command`` (not left at their defaults)."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None or command not in sub.choices or command not in argv:
        return set()
    command_parser = sub.choices[command]
    rest = argv[argv.index(command) + 1:]
    saved = [(action, action.default) for action in command_parser._actions]
    saved_defaults = command_parser._defaults
    try:
        command_parser._defaults = {}
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given, _ = command_parser.parse_known_args(rest)
    finally:
        command_parser._defaults = saved_defaults
        for action, default in saved:
            action.default = default
    return set(vars(given))


# ----------------------------------------------------------------------------- option types
def parse_ints(text: str, minimum: int, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(",", " ").split()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from exc
    if not values or any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values


def positive_int(text: str) -> int:
    """A count or size: an integer >= 1."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An offset or a count that may be zero: an integer >= 0."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """Counts and sizes: positive integers."""
    return parse_ints(text, 1, "positive integers")


def layer_list(text: str) -> list[int]:
    """Layer indices: integers >= 0 (the model check names a layer it does not have)."""
    return parse_ints(text, 0, "layer indices (integers >= 0)")


# ----------------------------------------------------------------------------- shared options
def add_common(p: argparse.ArgumentParser, *, model: bool = True, data: bool = True, out: bool = True) -> None:
    """--model/--device/--dtype/--threads, --data/--kind/--limit/--offset and --out."""
    if model:
        p.add_argument("--model", help="model folder (default: the bundled testbed under testbed/)")
        p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
        p.add_argument("--dtype", default=None, help="load the model in this torch dtype (e.g. float16)")
        p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    if data:
        p.add_argument("--data", help=f"record file (default {DEFAULT_DATA.relative_to(REPO_ROOT)})")
        p.add_argument("--kind", default="auto", choices=["auto", "counterfact", "zsre", "plain"])
        p.add_argument("--limit", type=positive_int, default=None, help="use at most N records")
        p.add_argument("--offset", type=non_negative_int, default=0, help="skip the first N records")
    if out:
        p.add_argument("--out", help="output folder (default runs/<command>-<timestamp>/)")
        p.add_argument("--force", action="store_true",
                       help="write into an existing, non-empty output folder or over an existing output file "
                       "(what else is there stays)")


def add_hparams_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--hparams, --hparams-dir, --ece-set and the EasyEdit baselines' hparams files."""
    p.add_argument("--hparams", required=required,
                   help="ECE hparams YAML or a bundled name (default: hparams/ECE/<model folder name>.yaml; lifelong "
                   "and bench take <model folder name>-sequential.yaml first, the recommended sequential setting)")
    p.add_argument("--hparams-dir", default=str(DEFAULT_HPARAMS_DIR), help="folder with {ECE,ROME,MEMIT,AlphaEdit}/*.yaml")
    p.add_argument("--ece-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an ECE hyperparameter (YAML value; repeatable); ECE's table names show it")
    from ...easyedit import BASELINES

    for alg in BASELINES:
        p.add_argument(f"--{alg.lower()}-hparams", help=f"EasyEdit {alg} hparams YAML (default: from --hparams-dir)")


def add_protocol(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", default="after_all", choices=list(PROTOCOLS))


# ----------------------------------------------------------------------------- the steps before the work
def default_testbed_dir() -> Optional[Path]:
    """The bundled testbed model folder (``testbed/*llama*`` with a config.json), if present."""
    root = REPO_ROOT / "testbed"
    if not root.is_dir():
        return None
    found = sorted(p for p in root.iterdir() if p.is_dir() and "llama" in p.name and (p / "config.json").is_file())
    return found[0] if found else None


def model_dir(value: Optional[str]) -> Path:
    """``--model`` (or the bundled testbed), checked to be a model folder."""
    if value:
        try:
            path = resolve_model(value)  # a folder, or a bundled testbed's name (testbed-llama)
        except ResourceNotFoundError as exc:
            raise CLIError(f"--model: {exc}") from exc
    else:
        found = default_testbed_dir()
        if found is None:
            raise CLIError(
                f"no --model given and no bundled testbed under {REPO_ROOT / 'testbed'} "
                "(build one with `ece-plugin build-testbed --output-dir testbed/testbed-llama`)"
            )
        path = found
    if not (path / "config.json").is_file():
        raise CLIError(f"--model: {path} is not a model folder (no config.json)")
    return path


SEQUENTIAL_SUFFIX = "-sequential"  # hparams/ECE/<model>-sequential.yaml: the recommended sequential setting


def hparams_file(explicit: Optional[str], hparams_dir: Path, alg: str, model: Path, sequential: bool = False) -> Path:
    """``explicit`` (must exist), else ``hparams_dir/<alg>/<model name>.yaml``; with ``sequential`` (the commands
    that edit in sequence: ``lifelong``, ``bench``) ECE's ``<model name>-sequential.yaml`` first, the recommended
    sequential setting, where the model has one."""
    from ..study.baselines import default_baseline_hparams

    if explicit:
        try:
            return resolve_hparams(explicit, alg)  # a file, or a bundled name (llama3-8b, testbed-llama)
        except ResourceNotFoundError as exc:
            raise CLIError(f"--hparams: {exc}") from exc
    recommended = hparams_dir / alg / f"{model.name}{SEQUENTIAL_SUFFIX}.yaml"
    if alg == "ECE" and sequential and recommended.is_file():
        logger.info("ECE hparams: %s, the recommended sequential setting (--hparams %s for the paper's form)",
                    recommended, model.name)
        return recommended
    path = default_baseline_hparams(hparams_dir, alg, model)
    if alg == "ECE" and not path.is_file():
        raise CLIError(f"no ECE hparams for {model.name} in {hparams_dir / 'ECE'}; pass --hparams")
    return path


def load_ece_hparams(
    path: Path, model: Path, overrides: Optional[dict[str, Any]] = None, args: Optional[argparse.Namespace] = None
) -> Any:
    """The ECE hparams; with ``args``, a device the hparams name (``device: cuda``) is where the model is loaded
    unless ``--device`` names one (ECE edits the model where it lies)."""
    from ...easyedit import explicit_device
    from ...method.hparams import ECEHyperParams

    hp = ECEHyperParams.from_hparams(path)
    overrides = {**(overrides or {}), **(ece_set(args) if args is not None else {})}
    if overrides:
        hp = dataclasses.replace(hp, **overrides)
        hp.validate()
    if args is not None and not _cuda_or_cpu_fallback(hp, path, args):
        return hp
    wanted = explicit_device(hp)
    if args is not None and wanted is not None and getattr(args, "device", None) in (None, "auto"):
        logger.info("loading the model on %s (device of %s)", wanted, path)
        args.device = str(wanted)
    return hp


def _cuda_or_cpu_fallback(hp: Any, path: Path, args: argparse.Namespace) -> bool:
    """Without CUDA, an hparams ``device`` that is EasyEdit's GPU index (``device: 0``) gives a warning that the
    model is loaded and edited on the CPU instead (False: the CPU it is). A device named by string
    (``device: cuda``) is honoured, and fails to load without CUDA."""
    import torch

    value = getattr(hp, "device", None)
    if torch.cuda.is_available() or not isinstance(value, int) or isinstance(value, bool):
        return True
    if str(getattr(args, "device", None) or "auto") == "auto":
        logger.warning("%s: device: %s is a GPU index, but CUDA is not available here: loading and editing the "
                       "model on the CPU instead", path, value)
        args.device = "cpu"
        return False
    return True


def ece_set(args: argparse.Namespace) -> dict[str, Any]:
    """``--ece-set KEY=VALUE`` items (YAML values) as hparams overrides; a key that is not an ECE hyperparameter
    is refused."""
    import yaml

    from ...method.hparams import ECEHyperParams

    known = {f.name for f in dataclasses.fields(ECEHyperParams)}
    overrides: dict[str, Any] = {}
    for item in getattr(args, "ece_set", None) or []:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise CLIError(f"--ece-set {item!r}: expected KEY=VALUE with KEY an ECE hyperparameter")
        overrides[key] = yaml.safe_load(value)
    return overrides


def ece_label_suffix(args: argparse.Namespace) -> str:
    """What ``--ece-set`` changed, for the ECE methods' names in tables (`` [prompt_keys_weight=1.0]``)."""
    changed = ece_set(args)
    return " [" + ", ".join(f"{k}={v}" for k, v in changed.items()) + "]" if changed else ""


def baseline_paths(args: argparse.Namespace, model: Path) -> dict[str, Path]:
    """The EasyEdit baselines' hparams files (``--<alg>-hparams`` or ``--hparams-dir``)."""
    from ...easyedit import BASELINES

    hdir = Path(args.hparams_dir)
    return {alg: hparams_file(getattr(args, f"{alg.lower()}_hparams", None), hdir, alg, model)
            for alg in BASELINES}


def records(args: argparse.Namespace, default: Path = DEFAULT_DATA) -> list[Any]:
    """The records of ``--data`` (``--kind``, ``--limit``, ``--offset``); none is an error."""
    from ...evaluation.data import load_records

    try:
        path = resolve_data(args.data) if getattr(args, "data", None) else default  # or a bundled file's name
    except ResourceNotFoundError as exc:
        raise CLIError(f"--data: {exc}") from exc
    loaded = load_records(path, kind=args.kind, limit=args.limit, offset=args.offset)
    if not loaded:
        raise CLIError(f"--data: no records in {path} (offset {args.offset}, limit {args.limit})")
    logger.info("loaded %d records from %s", len(loaded), path)
    return loaded


def eval_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if getattr(args, "no_fluency", False):
        kwargs["generation"] = False
    return kwargs


def load_model(args: argparse.Namespace, model: Path) -> tuple[Any, Any]:
    from ..study.common import load_model_and_tokenizer, set_threads

    set_threads(getattr(args, "threads", None))
    logger.info("loading %s", model)
    return load_model_and_tokenizer(model, device=args.device, dtype=getattr(args, "dtype", None))


def check_outputs(args: argparse.Namespace, *outputs: Optional[Any], run_folder: bool = True) -> None:
    """The one check of the command's output paths, before any work (:mod:`ece_plugin.files.outputs`): ``--out``
    as a run folder (when ``run_folder``) and ``outputs``."""
    from ...files.outputs import Output
    from ...files.outputs import check_outputs as check

    given = list(outputs)
    if run_folder and getattr(args, "out", None):
        given.append(Output("--out", Path(args.out), "run"))
    check(given, force=bool(getattr(args, "force", False)))


_CREATED: list[Path] = []  # folders this command created, newest last (removed again if still empty on failure)


def make_folder(path: Path) -> Path:
    """Create ``path`` and its missing parents, remembering which ones this command created."""
    missing = [p for p in [path, *path.parents] if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    _CREATED.extend(reversed(missing))
    return path


def forget_created() -> None:
    _CREATED.clear()


def remove_empty_created() -> None:
    """After a failure: remove the folders this command created that are still empty (no litter)."""
    while _CREATED:
        path = _CREATED.pop()
        try:
            path.rmdir()
        except OSError:
            pass  # not empty (it holds results), or already gone


def out_dir(args: argparse.Namespace, command: str) -> Path:
    """``--out`` (created) or a new ``runs/<command>-<timestamp>/``."""
    import time

    if args.out:
        return make_folder(Path(args.out))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = Path("runs") / f"{command}-{stamp}", 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{command}-{stamp}-{n}"
    return make_folder(path)


def say(text: str) -> None:
    """One result line on stdout (logging is for progress; results are what the command prints)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def report_failures(command: str, runs: Sequence[Any]) -> int:
    """One stderr line per method run that failed (raised) and the exit status: 1 when any failed, else 0. A
    method that could not run here (``n/a``, e.g. EasyEdit missing) is named in the table, not counted."""
    failed = [r for r in runs if not r.available and str(r.reason).startswith("failed")]
    for run in failed:
        sys.stderr.write(f"ece-plugin {command}: {run.name} {' '.join(str(run.reason).split())[:240]}\n")
    return EXIT_FAILURE if failed else 0


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options, JSON-ready, for the result files."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k != "func" and not k.startswith("_")}


def write_run_explanations(runs: Sequence[Any], out: Path) -> None:
    """Neuron / cluster reports of each traced batch of ``runs``."""
    from ..explain import explanation_from_trace, write_explanation

    for run in runs:
        for i, trace in enumerate(run.traces):
            stem = f"explain-{run.name}-batch{i}".replace(" ", "_").replace("(", "").replace(")", "")
            write_explanation(explanation_from_trace(trace), out, stem=stem)
