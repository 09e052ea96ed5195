"""A tiny editing world for the CLI / study tests: a 2-layer Llama saved to disk with a word-level tokenizer,
a handful of CounterFact-style records, a small corpus for the statistics and ECE hparams for it.

Imported by test_cli*.py / test_study*.py / test_explain*.py / test_editfile*.py; the one test here checks
the world itself loads.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SUBJECTS = ["Paris", "Berlin", "Rome", "Madrid", "Lisbon", "Vienna", "Prague", "Oslo"]
COUNTRIES = ["France", "Germany", "Italy", "Spain", "Portugal", "Austria", "Czechia", "Norway"]
FILLER = "the city of is capital in located country people live and work near a river park old new music art".split()


@dataclass
class World:
    root: Path
    model_dir: Path
    data: Path
    zsre: Path
    corpus: Path
    hparams: Path
    stats_dir: Path


def _records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        s, true = SUBJECTS[i % len(SUBJECTS)], COUNTRIES[i % len(COUNTRIES)]
        new = COUNTRIES[(i + 3) % len(COUNTRIES)]
        out.append(
            {
                "case_id": i,
                "prompt": f"{s} is located in the country of",
                "subject": s,
                "target_new": new,
                "ground_truth": true,
                "rephrase_prompt": f"The city {s} is in",
                "locality_prompt": f"{SUBJECTS[(i + 1) % len(SUBJECTS)]} is located in the country of",
                "locality_ground_truth": COUNTRIES[(i + 1) % len(COUNTRIES)],
            }
        )
    return out


def _zsre(n: int) -> list[dict]:
    out = []
    for i in range(n):
        s, true = SUBJECTS[i % len(SUBJECTS)], COUNTRIES[i % len(COUNTRIES)]
        out.append(
            {
                "subject": s,
                "src": f"Which country is {s} in?",
                "pred": true,
                "rephrase": f"In which country is {s}?",
                "alt": COUNTRIES[(i + 2) % len(COUNTRIES)],
                "answers": [true],
                "loc": f"nq question: where is {SUBJECTS[(i + 1) % len(SUBJECTS)]}",
                "loc_ans": COUNTRIES[(i + 1) % len(COUNTRIES)],
                "cond": "",
                "portability": {},
            }
        )
    return out


def make_world(root: Path, n_records: int = 8, layers: tuple[int, ...] = (0, 1), seed: int = 0) -> World:
    """Write the tiny world under ``root`` (model folder name contains 'llama', as EasyEdit needs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = _records(n_records)
    lines = [" ".join(rng.choice(FILLER + SUBJECTS + COUNTRIES) for _ in range(rng.choice([8, 16, 30]))) for _ in range(60)]
    texts = lines + [r["prompt"] + " " + r["target_new"] for r in records] + [
        " ".join(z.values()) for z in (dict((k, v) for k, v in r.items() if isinstance(v, str)) for r in _zsre(n_records))
    ] + ["nq question: where which in ? . ,"]
    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model_dir = root / "tiny-llama"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = root / "records.json"
    data.write_text(json.dumps(records))
    zsre = root / "zsre.json"
    zsre.write_text(json.dumps(_zsre(n_records)))
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    stats_dir = root / "stats"
    hp = {
        "alg_name": "ECE",
        "model_name": str(model_dir),
        "layers": list(layers),
        "attribution": "AS",
        "neuron_threshold": 0.8,
        "clustering": True,
        "cluster_ratio": 0.5,
        "v_num_grad_steps": 4,
        "shared_grad_steps": 3,
        "per_edit_grad_steps": 1,
        "v_lr": 0.5,
        "context_template_length_params": [[4, 2]],
        "mom2_adjustment": True,
        "mom2_update_weight": 100.0,
        "mom2_corpus": str(corpus),
        "mom2_n_samples": 50,  # the tiny corpus holds 60 samples
        "stats_dir": str(stats_dir),
        "device": "cpu",
        "batch_size": 4,
        "max_length": 20,
    }
    hparams = root / "ece.yaml"
    hparams.write_text(yaml.safe_dump(hp))
    write_baseline_hparams(root / "hparams", model_dir, corpus, stats_dir, list(layers))
    (root / "hparams" / "ECE").mkdir(parents=True, exist_ok=True)
    (root / "hparams" / "ECE" / "tiny-llama.yaml").write_text(yaml.safe_dump(hp))
    return World(root, model_dir, data, zsre, corpus, hparams, stats_dir)


def write_baseline_hparams(folder: Path, model_dir: Path, corpus: Path, stats_dir: Path, layers: list[int]) -> None:
    """EasyEdit ROME / MEMIT / AlphaEdit hparams for the tiny model under ``folder/<ALG>/tiny-llama.yaml``."""
    common = {
        "model_name": str(model_dir),
        "stats_dir": str(stats_dir),
        "device": "cpu",
        "fact_token": "subject_last",
        "v_num_grad_steps": 4,
        "v_lr": 0.5,
        "v_loss_layer": 1,
        "v_weight_decay": 0.5,
        "clamp_norm_factor": 0.75,
        "kl_factor": 0.0625,
        "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
        "layer_module_tmp": "model.layers.{}",
        "mlp_module_tmp": "model.layers.{}.mlp",
        "attn_module_tmp": "model.layers.{}.self_attn",
        "ln_f_module": "model.norm",
        "lm_head_module": "lm_head",
        "mom2_dataset": "wikitext-2-raw",
        "mom2_n_samples": 200,
        "mom2_dtype": "float32",
        "model_parallel": False,
    }
    configs = {
        "ROME": {**common, "alg_name": "ROME", "layers": [layers[-1]], "mom2_adjustment": False,
                 "context_template_length_params": [[4, 5]]},
        "MEMIT": {**common, "alg_name": "MEMIT", "layers": layers, "layer_selection": "all",
                  "mom2_adjustment": True, "mom2_update_weight": 100},
        "AlphaEdit": {**common, "alg_name": "AlphaEdit", "layers": layers, "layer_selection": "all",
                      "mom2_adjustment": True, "mom2_update_weight": 100, "P_loc": str(folder / "P-absent.pt"),
                      "nullspace_threshold": 2e-2, "L2": 1},
    }
    for alg, config in configs.items():
        (folder / alg).mkdir(parents=True, exist_ok=True)
        (folder / alg / "tiny-llama.yaml").write_text(yaml.safe_dump(config))


def test_world_loads(tmp_path: Path) -> None:
    from ece_plugin.evaluation.data import load_records
    from ece_plugin.method.hparams import ECEHyperParams

    world = make_world(tmp_path)
    hp = ECEHyperParams.from_hparams(world.hparams)
    assert hp.layers == [0, 1]
    records = load_records(world.data)
    assert len(records) == 8 and records[0].target_new == "Spain"
    assert len(load_records(world.zsre)) == 8
    assert (world.model_dir / "config.json").is_file()
