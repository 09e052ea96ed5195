"""E[k k^T] statistics: correctness against a direct computation, EasyEdit cache layout, refusal, atomicity."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ece_plugin.method import statistics as st
from ece_plugin.method.statistics import (
    StatisticsCache,
    StatisticsError,
    StatisticsMismatchError,
    StatsSpec,
    compute_statistics,
    easyedit_stats_paths,
)

WORDS = (
    "the city of paris is the capital of france and lies on the river seine where many people live "
    "and work in old buildings near a large park with trees music art history science football club"
).split()


def _corpus_lines(n: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        length = rng.choice([6, 12, 30, 90])  # some lines exceed the 64-token context: they are cut
        lines.append(" ".join(rng.choice(WORDS) for _ in range(length)))
        if i % 10 == 0:
            lines.append(" = Some Heading = ")  # WikiText heading: skipped
            lines.append("short")  # under MIN_LINE_CHARS: skipped
    return lines


def make_tokenizer(lines: list[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )


def make_llama(vocab: int, seed: int = 0, intermediate: int = 48, name: str = "tiny/llama-test") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    model.config._name_or_path = name
    return model


def make_gpt2(vocab: int, seed: int = 0, name: str = "tiny/gpt2-test") -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = GPT2LMHeadModel(config).eval()
    model.config._name_or_path = name
    return model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(_corpus_lines()) + "\n")
    return path


@pytest.fixture(scope="module")
def tok(corpus: Path) -> PreTrainedTokenizerFast:
    return make_tokenizer(corpus.read_text().splitlines())


def _spec(tmp_path: Path, corpus: Path, n: int = 30, **kw: object) -> StatsSpec:
    return StatsSpec(n_samples=n, ds_name="tinytext", stats_dir=str(tmp_path / "stats"), corpus=str(corpus), **kw)


def _direct_llama(model: LlamaForCausalLM, chunks: list[list[int]], layer: int) -> torch.Tensor:
    """Keys computed independently: act(gate(x)) * up(x) from the MLP input, one chunk at a time."""
    mlp = model.model.layers[layer].mlp
    seen: list[torch.Tensor] = []
    handle = mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        for chunk in chunks:
            model(input_ids=torch.tensor([chunk]))
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    k = torch.nn.functional.silu(x @ mlp.gate_proj.weight.double().T) * (x @ mlp.up_proj.weight.double().T)
    return (k.T @ k) / k.shape[0]


def test_second_moment_equals_direct_computation_llama(tmp_path: Path, corpus: Path, tok) -> None:
    model = make_llama(len(tok))
    spec = _spec(tmp_path, corpus, n=40)
    _, chunks = st.collect_chunks(tok, spec, st.model_max_length(model))
    assert max(len(c) for c in chunks) == 64  # long lines were cut at the context length
    assert len(chunks) == spec.n_samples
    result = compute_statistics(model, tok, ["model.layers.1.mlp.down_proj"], spec, write=False, progress=False)
    stats = result["model.layers.1.mlp.down_proj"]
    assert stats.count == sum(len(c) for c in chunks)
    assert stats.n_chunks == len(chunks)
    direct = _direct_llama(model, chunks, 1)
    assert stats.moment().shape == (48, 48)
    torch.testing.assert_close(stats.moment().double(), direct, rtol=1e-5, atol=1e-7)


def test_one_pass_for_several_layers_matches_single_layer(tmp_path: Path, corpus: Path, tok) -> None:
    model = make_llama(len(tok))
    spec = _spec(tmp_path, corpus, n=7)  # a sample limit below the corpus size
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    both = compute_statistics(model, tok, names, spec, write=False, progress=False)
    single = compute_statistics(model, tok, names[:1], spec, write=False, progress=False)
    assert both[names[0]].n_chunks == 7
    torch.testing.assert_close(both[names[0]].mom2_sum, single[names[0]].mom2_sum)
    assert not torch.allclose(both[names[0]].mom2_sum, both[names[1]].mom2_sum)


def test_statistics_that_overflow_in_one_layer_write_no_layer(tmp_path: Path, corpus: Path, tok) -> None:
    model = make_llama(len(tok))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")  # layer 1's keys overflow, layer 0's do not
    spec = _spec(tmp_path, corpus, n=7)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(StatisticsError, match=r"model\.layers\.1\.mlp\.down_proj: the statistics .* are not finite"):
        compute_statistics(model, tok, names, spec, progress=False)
    assert not (tmp_path / "stats").exists() or not any(p.is_file() for p in (tmp_path / "stats").rglob("*"))


def test_gpt2_conv1d_input_is_the_dff_dim(tmp_path: Path, corpus: Path, tok) -> None:
    model = make_gpt2(len(tok))
    spec = _spec(tmp_path, corpus)
    _, chunks = st.collect_chunks(tok, spec, 64)
    stats = compute_statistics(model, tok, ["transformer.h.0.mlp.c_proj"], spec, write=False, progress=False)
    moment = stats["transformer.h.0.mlp.c_proj"].moment()
    assert moment.shape == (128, 128)  # d_ff = 4 * n_embd, the input of c_proj
    mlp = model.transformer.h[0].mlp
    seen: list[torch.Tensor] = []
    handle = mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        for chunk in chunks:
            model(input_ids=torch.tensor([chunk]))
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    k = mlp.act(x @ mlp.c_fc.weight.double() + mlp.c_fc.bias.double())
    torch.testing.assert_close(moment.double(), (k.T @ k) / k.shape[0], rtol=1e-4, atol=1e-6)


def test_cache_written_in_easyedit_layout_and_reused(tmp_path: Path, corpus: Path, tok) -> None:
    model = make_llama(len(tok))
    spec = _spec(tmp_path, corpus, n=25)
    layer = "model.layers.0.mlp.down_proj"
    cache = StatisticsCache()
    c0 = cache.second_moment(model, tok, layer, spec)
    paths = easyedit_stats_paths(spec.stats_dir, "tiny/llama-test", "tinytext", layer, "float32", 25)
    assert paths.main == tmp_path / "stats" / "llama-test" / "tinytext_stats" / f"{layer}_float32_mom2_25.npz"
    assert paths.pypi == tmp_path / "stats" / "tiny_llama-test" / "tinytext_stats" / f"{layer}_float32_mom2_25.npz"
    assert paths.main.is_file() and paths.pypi.is_file()
    with np.load(paths.main) as data:
        assert {"mom2.constructor", "mom2.count", "mom2.mom2", "sample_size"} <= set(data.files)
        assert int(data["sample_size"]) == 25
        assert data["mom2.mom2"].dtype == np.float32
        torch.testing.assert_close(torch.from_numpy(data["mom2.mom2"]).double() / int(data["mom2.count"]),
                                   c0.double(), rtol=1e-5, atol=1e-7)
        meta = json.loads(str(data[st.METADATA_KEY]))
    assert meta["layer_name"] == layer and meta["d_ff"] == 48 and meta["n_samples"] == meta["n_chunks"] == 25
    assert (meta["stats_set"], meta["corpus"], meta["fallback"]) == ("tinytext", str(corpus.resolve()), False)
    assert meta["n_tokens"] == int(np.load(paths.main)["mom2.count"]) > 25
    # a fresh cache object reads the file instead of recomputing
    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("recomputed although the cache file exists")

    fresh = StatisticsCache()
    orig = st.compute_statistics
    st.compute_statistics = boom  # type: ignore[assignment]
    try:
        again = fresh.second_moment(model, tok, layer, spec)
    finally:
        st.compute_statistics = orig
    torch.testing.assert_close(again, c0)
    # masked block, kept for the last idx
    idx = torch.tensor([3, 7, 11])
    block = fresh.masked(model, tok, layer, spec, idx, "cpu")
    assert block.dtype == torch.float64 and block.shape == (3, 3)
    torch.testing.assert_close(block, c0.double()[idx][:, idx])
    assert fresh.masked(model, tok, layer, spec, idx.clone(), "cpu") is block


@pytest.mark.easyeditor
def test_cache_loadable_by_easyedit_layer_stats(tmp_path: Path, corpus: Path, tok) -> None:
    pytest.importorskip("easyeditor")
    from ece_plugin.easyedit import import_easyedit

    layer_stats = import_easyedit("easyeditor.models.rome.layer_stats").layer_stats
    model = make_llama(len(tok))
    spec = _spec(tmp_path, corpus, n=35)
    layer = "model.layers.1.mlp.down_proj"
    c0 = StatisticsCache().second_moment(model, tok, layer, spec)

    class HP:  # what EasyEdit's get_cov passes along
        device = "cpu"
        stats_dir = spec.stats_dir

    stat = layer_stats(model, tok, layer, spec.stats_dir, "tinytext", to_collect=["mom2"], sample_size=35,
                       precision="float32", hparams=HP())
    torch.testing.assert_close(stat.mom2.moment().float(), c0, rtol=1e-5, atol=1e-7)


def test_mismatching_cache_is_refused(tmp_path: Path, corpus: Path, tok) -> None:
    layer0, layer1 = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"
    spec = _spec(tmp_path, corpus, n=50)
    model = make_llama(len(tok))
    StatisticsCache().second_moment(model, tok, layer0, spec)
    # another shape (d_ff 64) under the same model name
    other = make_llama(len(tok), intermediate=64)
    with pytest.raises(StatisticsMismatchError, match=r"shape \(48, 48\) != \(64, 64\)") as info:
        StatisticsCache().second_moment(other, tok, layer0, spec)
    assert "llama-test" in str(info.value) and "Delete the file" in str(info.value)
    # another checkpoint of the same architecture
    with pytest.raises(StatisticsMismatchError, match="input embeddings differ"):
        StatisticsCache().second_moment(make_llama(len(tok), seed=1), tok, layer0, spec)
    # a file copied to another layer's name
    p0 = st.stats_paths_for(model, layer0, spec).main
    p1 = st.stats_paths_for(model, layer1, spec)
    p1.main.parent.mkdir(parents=True, exist_ok=True)
    p1.main.write_bytes(p0.read_bytes())
    with pytest.raises(StatisticsMismatchError, match="layer 'model.layers.0.mlp.down_proj'"):
        StatisticsCache().second_moment(model, tok, layer1, spec)
    # a file whose sample_size disagrees with its name
    with np.load(p0) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["sample_size"] = np.array(7)
    with open(p0, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(StatisticsMismatchError, match="sample_size 7 != mom2_n_samples 50"):
        StatisticsCache().second_moment(model, tok, layer0, spec)
    # another corpus under the same statistics name
    other_corpus = tmp_path / "other.txt"
    other_corpus.write_text("\n".join(_corpus_lines(seed=3)))
    for path in st.stats_paths_for(model, layer0, spec).all():
        path.unlink()
    StatisticsCache().second_moment(model, tok, layer0, spec)
    with pytest.raises(StatisticsMismatchError, match="corpus"):
        StatisticsCache().second_moment(model, tok, layer0, _spec(tmp_path, other_corpus, n=50))


def test_easyedit_written_file_without_metadata_is_accepted(tmp_path: Path, corpus: Path, tok) -> None:
    model = make_llama(len(tok))
    spec = _spec(tmp_path, corpus, n=20)
    layer = "model.layers.0.mlp.down_proj"
    path = st.stats_paths_for(model, layer, spec).main
    path.parent.mkdir(parents=True)
    mom2 = np.eye(48, dtype=np.float32) * 6.0
    with open(path, "wb") as f:
        np.savez(f, **{"mom2.constructor": np.array("x"), "mom2.count": np.array(3), "mom2.mom2": mom2,
                       "sample_size": np.array(20)})
    c0 = StatisticsCache().second_moment(model, tok, layer, spec)
    torch.testing.assert_close(c0, torch.eye(48) * 2.0)


def test_atomic_write_leaves_no_partial_file(tmp_path: Path, corpus: Path, tok, monkeypatch) -> None:
    model = make_llama(len(tok))
    spec = _spec(tmp_path, corpus, n=30)
    layer = "model.layers.0.mlp.down_proj"
    paths = st.stats_paths_for(model, layer, spec)

    def failing_savez(f, **arrays):  # writes some bytes, then dies like a full disk
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(st.np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        StatisticsCache().second_moment(model, tok, layer, spec)
    assert not paths.main.exists() and not paths.pypi.exists()
    assert os.listdir(paths.main.parent) == []  # the temporary file was removed too
    monkeypatch.undo()
    good = StatisticsCache().second_moment(model, tok, layer, spec)
    before = paths.main.read_bytes()
    monkeypatch.setattr(st.np, "savez", failing_savez)
    with pytest.raises(OSError):
        compute_statistics(model, tok, [layer], spec, progress=False)
    assert paths.main.read_bytes() == before  # a failed rewrite keeps the old file intact
    assert good.shape == (48, 48)


def test_corpus_errors_and_folder(tmp_path: Path, corpus: Path, tok) -> None:
    model = make_llama(len(tok))
    with pytest.raises(StatisticsError, match="neither a file nor a folder"):
        compute_statistics(model, tok, ["model.layers.0.mlp.down_proj"], _spec(tmp_path, tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StatisticsError, match="no .txt or .raw files"):
        compute_statistics(model, tok, ["model.layers.0.mlp.down_proj"], _spec(tmp_path, empty))
    with pytest.raises(StatisticsError, match="not found"):
        compute_statistics(model, tok, ["model.layers.9.mlp.down_proj"], _spec(tmp_path, corpus))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text(corpus.read_text())
    from_folder = compute_statistics(model, tok, ["model.layers.0.mlp.down_proj"], _spec(tmp_path, folder),
                                     write=False, progress=False)
    from_file = compute_statistics(model, tok, ["model.layers.0.mlp.down_proj"], _spec(tmp_path, corpus),
                                   write=False, progress=False)
    torch.testing.assert_close(from_folder["model.layers.0.mlp.down_proj"].mom2_sum,
                               from_file["model.layers.0.mlp.down_proj"].mom2_sum)


def test_spec_from_hparams_and_bundled_corpus() -> None:
    from ece_plugin.method.hparams import ECEHyperParams

    hp = ECEHyperParams(model_name="m", layers=[0], mom2_n_samples=123, mom2_dataset="wikitext", stats_dir="s")
    spec = StatsSpec.from_hparams(hp)
    assert (spec.n_samples, spec.ds_name, spec.stats_dir, spec.corpus) == (123, "wikitext", "s", None)
    label, files = st.corpus_files(None)
    assert label == st.BUNDLED_CORPUS_LABEL and [f.name for f in files] == ["wiki.valid.raw", "wiki.test.raw"]
    first = next(st.iter_corpus_lines(files))
    assert len(first) >= st.MIN_LINE_CHARS and not first.startswith("=")
    with pytest.raises(StatisticsError, match="mom2_n_samples"):
        StatsSpec(n_samples=0)



def test_model_folder_corpus_is_used_for_its_dataset_name(tmp_path: Path, corpus: Path, tok) -> None:
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    model = make_llama(len(tok), name=str(folder))
    spec = StatsSpec(n_samples=20, ds_name="factworld", stats_dir=str(tmp_path / "stats"))
    # no <model>/factworld.txt: nothing stands in for it unasked
    with pytest.raises(st.StatisticsUnavailableError, match="'factworld'"):
        st.resolve_corpus(spec, model)
    lines = _corpus_lines()[:40]
    (folder / "factworld.txt").write_text("\n".join(lines) + "\n")
    label, files = st.resolve_corpus(spec, model)
    assert files == [folder / "factworld.txt"] and label.startswith("model:tiny-llama/factworld.txt@sha256:")
    layer = "model.layers.0.mlp.down_proj"
    own = compute_statistics(model, tok, [layer], spec, write=True, progress=False)[layer]
    given = compute_statistics(
        model, tok, [layer], dataclasses.replace(spec, corpus=str(folder / "factworld.txt")), write=False, progress=False
    )[layer]
    torch.testing.assert_close(own.mom2_sum, given.mom2_sum)  # the same text as naming the file
    assert own.metadata["corpus"] == label
    # 'wikipedia' never reads a model-folder file; an explicit mom2_corpus wins over it
    (folder / "wikipedia.txt").write_text("x" * 200 + "\n")
    with pytest.raises(st.StatisticsUnavailableError, match="cannot compute 'wikipedia' itself"):
        st.resolve_corpus(dataclasses.replace(spec, ds_name="wikipedia"), model)
    assert st.resolve_corpus(dataclasses.replace(spec, corpus=str(corpus)), model)[1] == [corpus]
    # the cache is bound to the corpus text: other text in the file is refused, not silently reused
    (folder / "factworld.txt").write_text("\n".join(lines[::-1]) + "\n")
    with pytest.raises(StatisticsMismatchError, match="corpus"):
        StatisticsCache().second_moment(model, tok, layer, spec)
    # EasyEdit's baselines read the cache with no check: ensure_statistics checks the header before they run
    from types import SimpleNamespace

    from ece_plugin.lab.study.baselines import ensure_statistics

    hp = SimpleNamespace(mom2_n_samples=20, mom2_dataset="factworld", stats_dir=str(tmp_path / "stats"),
                         mom2_dtype="float32", rewrite_module_tmp="model.layers.{}.mlp.down_proj", layers=[0])
    with pytest.raises(StatisticsMismatchError, match=r"corpus 'model:tiny-llama/factworld.txt@sha256:"):
        ensure_statistics(model, tok, hp, progress=False)
    (folder / "factworld.txt").write_text("\n".join(lines) + "\n")  # the text the cache was made from
    assert ensure_statistics(model, tok, hp, progress=False) == []  # accepted, nothing recomputed


# ------------------------------------------------------------------ honest names: what a file is computed from
def _wiki_spec(tmp_path: Path, **kw: object) -> StatsSpec:
    return StatsSpec(n_samples=100000, ds_name="wikipedia", stats_dir=str(tmp_path / "stats"), **kw)  # type: ignore[arg-type]


def test_a_set_that_cannot_be_had_is_an_error_naming_how_to_supply_it(tmp_path: Path, tok) -> None:
    model = make_llama(len(tok))
    layer = "model.layers.0.mlp.down_proj"
    with pytest.raises(st.StatisticsUnavailableError) as info:
        StatisticsCache().second_moment(model, tok, layer, _wiki_spec(tmp_path))
    text = str(info.value)
    where = tmp_path / "stats" / "llama-test" / "wikipedia_stats" / f"{layer}_float32_mom2_100000.npz"
    assert str(where) in text and "mom2_n_samples 100000" in text
    assert "precomputed" in text and "mom2_corpus" in text and "mom2_fallback_corpus: wikitext-2-raw" in text
    assert not (tmp_path / "stats").exists()  # nothing written



def test_a_local_corpus_is_never_filed_under_easyedits_names(tmp_path: Path, corpus: Path, tok) -> None:
    """mom2_dataset 'wikipedia' (the default) with mom2_corpus tiny.txt: filed as 'tiny', read back from there."""
    model = make_llama(len(tok))
    layer = "model.layers.0.mlp.down_proj"
    spec = StatsSpec(n_samples=20, ds_name="wikipedia", stats_dir=str(tmp_path / "stats"), corpus=str(corpus))
    c0 = StatisticsCache().second_moment(model, tok, layer, spec)
    model_dir = tmp_path / "stats" / "llama-test"
    assert sorted(p.name for p in model_dir.iterdir()) == ["tiny_stats"]
    again = StatisticsCache().second_moment(model, tok, layer, spec)
    torch.testing.assert_close(again, c0)
    assert len(list((model_dir / "tiny_stats").iterdir())) == 1


def test_a_short_corpus_is_an_error_unless_fallback_is_asked_for(tmp_path: Path, corpus: Path, tok) -> None:
    model = make_llama(len(tok))
    layer = "model.layers.0.mlp.down_proj"
    _, every = st.collect_chunks(tok, _spec(tmp_path, corpus, n=10**6, fallback="x"), 64)
    with pytest.raises(st.StatisticsUnavailableError, match=rf"holds {len(every)} samples .* fewer than mom2_n_samples 1000000"):
        compute_statistics(model, tok, [layer], _spec(tmp_path, corpus, n=10**6), progress=False)
    # asked for: every chunk is used and the file is named after the count used
    spec = _spec(tmp_path, corpus, n=10**6, fallback=str(corpus))
    stats = compute_statistics(model, tok, [layer], spec, progress=False)[layer]
    assert stats.n_chunks == len(every) and stats.metadata["n_samples"] == len(every)
    assert stats.metadata["requested_n_samples"] == 10**6 and stats.metadata["fallback"] is True
    names = sorted(p.name for p in (tmp_path / "stats" / "llama-test" / "tinytext_stats").iterdir())
    assert names == [f"{layer}_float32_mom2_{len(every)}.npz"]


def test_fallback_is_filed_under_its_own_name_and_reused(tmp_path: Path, corpus: Path, tok, monkeypatch) -> None:
    model = make_llama(len(tok))
    layer = "model.layers.0.mlp.down_proj"
    standin = tmp_path / "standin.txt"
    standin.write_text(corpus.read_text())
    spec = _wiki_spec(tmp_path, fallback=str(standin))
    c0 = StatisticsCache().second_moment(model, tok, layer, spec)
    model_dir = tmp_path / "stats" / "llama-test"
    assert not (model_dir / "wikipedia_stats").exists()  # never under the name asked for
    (written,) = (model_dir / "standin_stats").iterdir()
    with np.load(written) as data:
        meta = json.loads(str(data[st.METADATA_KEY]))
        n = int(data["sample_size"])
    assert written.name == f"{layer}_float32_mom2_{n}.npz" and n == meta["n_chunks"] < 100000
    assert (meta["stats_set"], meta["requested_ds_name"], meta["requested_n_samples"]) == ("standin", "wikipedia", 100000)
    assert meta["corpus"] == str(standin.resolve()) and meta["n_tokens"] > n
    # a later session finds the stand-in without recomputing
    monkeypatch.setattr(st, "compute_statistics", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    torch.testing.assert_close(StatisticsCache().second_moment(model, tok, layer, spec), c0)
    monkeypatch.undo()
    # without the fallback key the request is still refused: the stand-in is never taken for Wikipedia
    with pytest.raises(st.StatisticsUnavailableError):
        StatisticsCache().second_moment(model, tok, layer, dataclasses.replace(spec, fallback=None))


def test_bundled_corpus_by_its_own_name(tmp_path: Path) -> None:
    corpus = st.local_corpus(StatsSpec(ds_name="wikitext-2-raw"))
    assert corpus is not None and corpus.label == st.BUNDLED_CORPUS_LABEL
    assert [p.name for p in corpus.files] == ["wiki.valid.raw", "wiki.test.raw"]
    assert st.fallback_corpus("wikitext-2-raw").name == "wikitext-2-raw"
    with pytest.raises(StatisticsError, match="neither a bundled corpus"):
        st.fallback_corpus(str(tmp_path / "absent"))


def test_a_mislabelled_file_of_an_earlier_version_is_refused(tmp_path: Path, corpus: Path, tok) -> None:
    """wikipedia_stats/..._mom2_100000.npz computed from WikiText-2 (format 1): ECE and the baselines' check refuse
    it, so EasyEdit's MEMIT and AlphaEdit never read it as Wikipedia."""
    model = make_llama(len(tok))
    layer = "model.layers.0.mlp.down_proj"
    made = compute_statistics(model, tok, [layer], _spec(tmp_path, corpus, n=20), progress=False)[layer]
    legacy = {k: v for k, v in made.metadata.items() if k not in ("stats_set", "requested_ds_name",
                                                                  "requested_n_samples", "fallback")}
    legacy.update(format="ece-plugin-mom2/1", corpus=st.BUNDLED_CORPUS_LABEL, ds_name="wikipedia", n_samples=100000)
    spec = _wiki_spec(tmp_path)
    path = st.stats_paths_for(model, layer, spec).main
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        np.savez(f, **{"mom2.constructor": np.array("x"), "mom2.count": np.array(made.count),
                       "mom2.mom2": made.mom2_sum.numpy(), "sample_size": np.array(100000),
                       st.METADATA_KEY: np.array(json.dumps(legacy))})
    with pytest.raises(StatisticsMismatchError, match="not from 'wikipedia'.*computed from 20 samples, not the 100000"):
        StatisticsCache().second_moment(model, tok, layer, spec)
    from types import SimpleNamespace

    from ece_plugin.lab.study.baselines import ensure_statistics

    hp = SimpleNamespace(mom2_n_samples=100000, mom2_dataset="wikipedia", stats_dir=spec.stats_dir,
                         mom2_dtype="float32", rewrite_module_tmp="model.layers.{}.mlp.down_proj", layers=[0])
    with pytest.raises(StatisticsMismatchError, match="earlier ece-plugin"):
        ensure_statistics(model, tok, hp, progress=False)
