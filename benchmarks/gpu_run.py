"""The run prepared for a GPU (one H100/H200, about 10 minutes): the CUDA-marked tests, then ECE against EasyEdit's
MEMIT and AlphaEdit on one batch of 100 CounterFact edits at Llama-3-8B's full shape (random weights, bf16):
seconds and peak GPU memory of each edit, with ``model_parallel`` over the devices present.

    .venv-main/bin/python benchmarks/gpu_run.py                 # on the GPU machine (EasyEdit main on the path)
    .venv-main/bin/python benchmarks/gpu_run.py --dry-run       # the same steps at tiny sizes on a CPU (CI)

Everything goes into ``--out`` (default ``results/gpu/<run>-<UTC time>/``) as it comes: ``run.json`` (rewritten
after every step, so a run cut short keeps what it finished), ``cuda-tests.txt`` and ``cuda-tests.xml``, and the
hparams each method ran with. A method that fails is recorded with its error and the run goes on.

The model. Llama-3-8B's configuration (hidden 4096, d_ff 14336, 32 layers, 32 heads, 8 key/value heads, vocabulary
128,256, rope theta 500,000) with random weights: no checkpoint is read, so nothing is downloaded. The tokenizer is
a word-level one built from the edit records and the statistics corpus (its ids use the first few thousand rows
of the embedding). The hparams are the shipped ``hparams/ECE/llama3-8b.yaml`` (AlphaEdit's values) for all three
methods; EasyEdit's MEMIT and AlphaEdit take the keys they share with it plus AlphaEdit's null-space settings.
Statistics: C0 from the bundled WikiText-2 (``mom2_dataset: wikitext-2-raw``, :data:`STATS_SAMPLES` samples)
for every method, computed once before the timed edits (and timed on their own) into a temporary folder, since
Wikipedia's cannot be fetched there. The numbers measure cost, not quality: on random weights no edit means anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ece_plugin.resources import resolve_hparams  # noqa: E402

logger = logging.getLogger("gpu_run")

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=224, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=4096, max_position_embeddings=256, rope_theta=500000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=False)
STATS_SAMPLES = 2000  # WikiText-2 chunks for C0 on the GPU (the dry run: 60)
METHODS = ("ECE", "MEMIT", "AlphaEdit")
#: AlphaEdit's null-space keys (EasyEdit's hparams/AlphaEdit/llama3-8b.yaml)
ALPHAEDIT_KEYS = {"nullspace_threshold": 2e-2, "L2": 1}
CUDA_TEST_TIMEOUT_S = 240


@dataclasses.dataclass
class Plan:
    """What one run does (the GPU run or its dry run)."""

    dry_run: bool
    n_edits: int
    methods: tuple[str, ...]
    out: Path
    stats_samples: int
    device: str

    @property
    def shape(self) -> dict[str, Any]:
        return TINY if self.dry_run else LLAMA3_8B

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.dry_run else torch.bfloat16


# ----------------------------------------------------------------------------------------------- report
class Report:
    """run.json, rewritten after every step."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {**header, "steps": {}}
        self.write()

    def step(self, name: str, value: Any) -> None:
        self.data["steps"][name] = value
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)


def environment() -> dict[str, Any]:
    import transformers

    from ece_plugin import easyedit
    from ece_plugin.resources import version

    cuda = torch.cuda.is_available()
    return {
        "ece_plugin": version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "easyeditor": easyedit.easyedit_version(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "python": sys.version.split()[0],
    }


# ------------------------------------------------------------------------------------------- CUDA tests
def cuda_test_files() -> list[str]:
    """The test files holding CUDA-marked tests."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "mark.cuda" in p.read_text(encoding="utf-8"))


def run_cuda_tests(plan: Plan) -> dict[str, Any]:
    """``pytest -m cuda`` on those files (the dry run only collects them: without CUDA they would skip)."""
    files = cuda_test_files()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rs",
           f"--junitxml={plan.out / 'cuda-tests.xml'}", *files]
    if plan.dry_run:
        cmd.insert(3, "--collect-only")
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=CUDA_TEST_TIMEOUT_S)
        rc, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, output = 124, f"timed out after {CUDA_TEST_TIMEOUT_S} s\n{exc.stdout or ''}"
    (plan.out / "cuda-tests.txt").write_text(output)
    last = [line for line in output.strip().splitlines() if line.strip()][-1:] or [""]
    return {"command": " ".join(cmd[1:]), "returncode": rc, "seconds": round(time.perf_counter() - started, 1),
            "files": files, "summary": last[0]}


# ----------------------------------------------------------------------------------------- model, data
def build_tokenizer(records_texts: list[str], corpus: list[str], vocab_size: int) -> Any:
    """A word-level tokenizer: every word of the edit records, then the corpus's most frequent words, up to
    ``vocab_size`` ids."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for text in records_texts:
        for word in text.split():
            vocab.setdefault("▁" + word, len(vocab))
    for word, _ in Counter(w for line in corpus for w in line.split()).most_common():
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault("▁" + word, len(vocab))
    if len(vocab) > vocab_size:
        raise SystemExit(f"gpu_run: the records need {len(vocab)} ids, more than the vocabulary's {vocab_size}")
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tk.decoder = decoders.Replace("▁", " ")
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def load_requests(n: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The first ``n`` bundled CounterFact records as edit requests, and every text in them."""
    from ece_plugin.evaluation.data import load_records
    from ece_plugin.resources import resolve_data

    records = load_records(resolve_data("counterfact-edit"), limit=n)
    requests = [r.to_request() for r in records]
    texts = [v for q in requests for v in q.values() if isinstance(v, str)]
    return requests, texts


def corpus_texts(limit_lines: int) -> list[str]:
    from ece_plugin.method.statistics import StatsSpec, iter_corpus_lines, local_corpus

    corpus = local_corpus(StatsSpec(ds_name="wikitext-2-raw"))
    assert corpus is not None
    lines = []
    for line in iter_corpus_lines(corpus.files):
        lines.append(line)
        if len(lines) >= limit_lines:
            break
    return lines


def build_model(plan: Plan, n_devices: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Llama at ``plan.shape`` with random weights in ``plan.dtype``, on the devices present."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**plan.shape)
    config._name_or_path = "llama3-8b-shape-random" if not plan.dry_run else "llama-tiny-random"
    torch.manual_seed(0)
    started = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(plan.dtype)
    try:
        if n_devices > 1:
            model = LlamaForCausalLM(config)  # on the CPU, then spread over the GPUs
        else:
            with torch.device(plan.device):
                model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    placement = {"devices": max(n_devices, 1), "model_parallel": n_devices > 1}
    if n_devices > 1:
        from accelerate import dispatch_model, infer_auto_device_map

        device_map = infer_auto_device_map(model, no_split_module_classes=["LlamaDecoderLayer"])
        model = dispatch_model(model, device_map=device_map)
        placement["device_map"] = {k: str(v) for k, v in device_map.items()}
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    placement.update(parameters=params, seconds_to_build=round(time.perf_counter() - started, 1),
                     dtype=str(plan.dtype).replace("torch.", ""))
    return model, placement


# ---------------------------------------------------------------------------------------------- hparams
def hparams_for(plan: Plan, n_devices: int, stats_dir: Path) -> dict[str, dict[str, Any]]:
    """The shipped llama3-8b ECE hparams (the dry run: its layers and loss layer scaled to the tiny model), and
    EasyEdit MEMIT / AlphaEdit hparams with the same shared keys."""
    ece = yaml.safe_load(resolve_hparams("llama3-8b").read_text())
    ece.update(device=0 if plan.device.startswith("cuda") else "cpu", model_parallel=n_devices > 1,
               mom2_dataset="wikitext-2-raw", mom2_n_samples=plan.stats_samples, stats_dir=str(stats_dir),
               model_name=str(plan.out / "llama3-8b-random-weights"))  # EasyEdit's AlphaEdit reads "llama" in it
    if plan.dry_run:
        ece.update(layers=[1, 2], v_loss_layer=plan.shape["num_hidden_layers"] - 1,
                   shared_grad_steps=4, per_edit_grad_steps=2, v_num_grad_steps=6, context_template_length_params=[])
    shared = {k: ece[k] for k in ("model_name", "stats_dir", "device", "layers", "fact_token", "v_lr", "v_loss_layer",
                                  "v_weight_decay", "clamp_norm_factor", "kl_factor", "mom2_adjustment",
                                  "mom2_update_weight", "mom2_dataset", "mom2_n_samples", "mom2_dtype",
                                  "rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp",
                                  "ln_f_module", "lm_head_module", "model_parallel")}
    steps = ece["shared_grad_steps"] + ece["per_edit_grad_steps"]  # the z steps each edit gets, as in ECE
    memit = {**shared, "alg_name": "MEMIT", "layer_selection": "all", "v_num_grad_steps": steps,
             "batch_size": plan.n_edits, "max_length": 40}
    alpha = {**memit, "alg_name": "AlphaEdit", **ALPHAEDIT_KEYS, "P_loc": str(plan.out / "P-absent.pt")}
    return {"ECE": ece, "MEMIT": memit, "AlphaEdit": alpha}


def make_method(name: str, path: Path) -> Any:
    from ece_plugin.lab.study.baselines import EasyEditMethod, ECEMethod
    from ece_plugin.method.hparams import ECEHyperParams

    if name == "ECE":
        return ECEMethod(ECEHyperParams.from_hparams(path), name="ECE")
    return EasyEditMethod(name, path, name=name)  # BaseEditor where EasyEdit main is there, as the studies run it


# ------------------------------------------------------------------------------------------------- timing
def peak_memory_mib() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20


def reset_peaks() -> None:
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)
            torch.cuda.reset_peak_memory_stats(i)


def run_method(name: str, path: Path, model: torch.nn.Module, tok: Any, requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics and preparation (timed on their own), then the one timed batch; the model is restored after."""
    method = make_method(name, path)
    available, why = method.availability(model)
    if not available:
        return {"available": False, "reason": why}
    names = method.edited_weight_names(model)
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in names}
    try:
        reset_peaks()
        t0 = time.perf_counter()
        method.prepare(model, tok)
        method.reset(model)
        prepare_s = time.perf_counter() - t0
        prepare_peak = peak_memory_mib()
        reset_peaks()
        t0 = time.perf_counter()
        outcome = method.edit_batch(model, tok, requests)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        finite = all(bool(torch.isfinite(params[n]).all()) for n in names)
        return {"available": True, "n_edits": len(requests), "edit_seconds": round(outcome.seconds, 2),
                "edit_wall_seconds": round(wall, 2), "edit_peak_gpu_mib": peak_memory_mib(),
                "prepare_seconds": round(prepare_s, 2), "prepare_peak_gpu_mib": prepare_peak,
                "via": outcome.via, "weights_finite": finite, "edited_weights": names}
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks every step, measures nothing")
    p.add_argument("--out", type=Path, help="results folder (default results/gpu/<run>-<UTC time>/)")
    p.add_argument("--n-edits", type=int, help="edits in the batch (default 100; the dry run: 4)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--stats-samples", type=int, help=f"WikiText-2 samples for C0 (default {STATS_SAMPLES}; dry: 60)")
    p.add_argument("--skip-cuda-tests", action="store_true")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPO / "results" / "gpu" / f"{'dry-run' if args.dry_run else 'run'}-{stamp}"
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_run: no CUDA device here; use --dry-run on a CPU")
    device = "cpu" if args.dry_run else "cuda:0"
    return Plan(dry_run=args.dry_run, n_edits=args.n_edits or (4 if args.dry_run else 100),
                methods=tuple(args.methods), out=out, device=device,
                stats_samples=args.stats_samples or (60 if args.dry_run else STATS_SAMPLES))


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    plan = make_plan(args)
    if plan.out.exists() and any(plan.out.iterdir()):
        raise SystemExit(f"gpu_run: {plan.out} exists and is not empty; give another --out")
    plan.out.mkdir(parents=True, exist_ok=True)
    n_devices = torch.cuda.device_count() if not plan.dry_run else 0
    report = Report(plan.out / "run.json", {"plan": {**dataclasses.asdict(plan), "shape": plan.shape},
                                            "environment": environment()})
    if not args.skip_cuda_tests:
        report.step("cuda_tests", run_cuda_tests(plan))
    requests, texts = load_requests(plan.n_edits)
    tok = build_tokenizer(texts, corpus_texts(4000 if plan.dry_run else 40000), plan.shape["vocab_size"])
    model, placement = build_model(plan, n_devices)
    if n_devices <= 1:
        placement["model_parallel_note"] = f"{max(n_devices, 1)} device: model_parallel not exercised"
    report.step("model", placement)
    stats_dir = Path(tempfile.mkdtemp(prefix="gpu-run-stats-"))  # C0 files: gigabytes, not results
    configs = hparams_for(plan, n_devices, stats_dir)
    failures = 0
    for name in plan.methods:
        path = plan.out / f"hparams-{name}.yaml"
        path.write_text(yaml.safe_dump(configs[name], sort_keys=False))
        logger.info("%s: one batch of %d edits", name, len(requests))
        try:
            result = run_method(name, path, model, tok, requests)
        except Exception as exc:  # noqa: BLE001 - recorded, and the other methods still run
            failures += 1
            result = {"available": True, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            logger.error("%s failed: %s", name, result["error"])
        report.step(name, result)
    shutil.rmtree(stats_dir, ignore_errors=True)
    logger.info("results: %s", plan.out / "run.json")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
