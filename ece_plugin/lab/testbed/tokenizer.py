"""A byte-level BPE tokenizer trained on the testbed's own text, adding its BOS token itself (as Llama-3's does).

The tokenizer is saved as a ``PreTrainedTokenizerFast`` (``tokenizer.json`` + config), so that
``AutoTokenizer.from_pretrained(dir)`` under transformers 4.x and 5.x returns a tokenizer whose ``tok(text)``
starts with BOS, pads on the right with a dedicated pad token and decodes back to the original text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ...method.atomic import write_text as atomic_write_text

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (no prefix space, like GPT-2/Llama-3) whose post-processor prepends BOS."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 bytes + specials + merges), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    logger.info("trained byte-level BPE tokenizer with %d tokens", tokenizer.get_vocab_size())
    return tokenizer


def to_hf_tokenizer(tokenizer: Tokenizer, model_max_length: int) -> Any:
    """Wrap as ``transformers.PreTrainedTokenizerFast`` with BOS/EOS/PAD set and right padding."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        padding_side="right",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    return hf_tok


def make_portable(folder: Path) -> None:
    """Make a saved tokenizer folder load under transformers 4.x as well as 5.x.

    transformers 5 saves ``tokenizer_class: TokenizersBackend`` (and ``backend``), which 4.x cannot resolve; 4.x
    saves ``PreTrainedTokenizerFast``, which 5.x still reads as the same ``tokenizer.json``. The config is
    rewritten to the 4.x form (atomically), and ``special_tokens_map.json`` is written where it is missing.
    """
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_text(config_path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    specials = folder / "special_tokens_map.json"
    if not specials.is_file():
        tokens = {k: config[k] for k in ("bos_token", "eos_token", "pad_token") if config.get(k)}
        atomic_write_text(specials, json.dumps(tokens, indent=2, ensure_ascii=False) + "\n")
