"""Interop with SAELens, sparsify, OpenAI sparse_autoencoder and dictionary_learning, against their code.

SAELens and sparsify are installed (extra `interop`) and run here both ways. OpenAI's package is not
on PyPI and dictionary-learning cannot be installed beside our pins, so their import direction reads
fixtures written by their own classes and save code (tests/fixtures/interop/make_fixtures.py), and
their export direction runs only where their loaders import. Tolerances: float32, codes and
reconstructions within atol 1e-4 + rtol 1e-4 of each other (sums of 16-64 products).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from saejax.config import base_config, set_value
from saejax.export import LAYER_NORM, export_sae, load_sae
from saejax.interop import FORMATS, InteropError, evaluate, export_run, export_spec, import_sae, read_sae
from saejax.interop.common import fold_scale

torch = pytest.importorskip("torch")
D, N, K, SCALE = 16, 64, 6, 2.5
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "interop")
TOL = {"atol": 1e-4, "rtol": 1e-4}
HOOK = "resid_post.3"


def _family(name):
    from saejax.models import get_family

    config = base_config()
    set_value(config, "sae.family", name)
    set_value(config, "sae.d", D)
    set_value(config, "sae.n", N)
    if name in ("topk", "batchtopk", "matryoshka"):
        set_value(config, f"sae.{name}.k", K)
    if name == "topk":
        set_value(config, "sae.topk.k_aux", 8)
    config.lock()
    return get_family(config)


def _spec(name, scale=SCALE, seed=0):
    """A random saejax SAE of family `name` as (tensors, cfg), with every bias and threshold non-zero."""
    family = _family(name)
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, spec in family.inference_specs().items():
        value = rng.standard_normal(spec.shape).astype(np.float32) * (0.3 if len(spec.shape) == 2 else 0.2)
        if key == "threshold":
            value = np.abs(value) * 0.5 + 0.05
        tensors[key] = value.astype(np.float32)
    tensors, cfg = family.export(tensors)
    cfg["normalization"] = {"scale": scale, "method": "test"}
    cfg["data"] = {"hookpoint": HOOK, "model": {"name": "test-model"}}
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}, cfg


def _run(tmp_path, name, scale=SCALE):
    run = tmp_path / f"run-{name}"
    run.mkdir()
    export_sae(str(run), *_spec(name, scale))
    return str(run)


def _x(seed=1, rows=32):
    return (np.random.default_rng(seed).standard_normal((rows, D)) * 3 + 0.5).astype(np.float32)


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **TOL)


def _t(x):
    return torch.from_numpy(np.asarray(x, np.float32))


# ---------------------------------------------------------------------------- export: the library loads it


def _saelens_loaded(out, x):
    from sae_lens import SAE

    sae = SAE.load_from_disk(out)
    with torch.no_grad():
        codes = sae.encode(_t(x))
        return codes.numpy(), sae.decode(codes).numpy()


def _sparsify_loaded(out, x):
    from sparsify import SparseCoder

    sae = SparseCoder.load_from_disk(os.path.join(out, "layers.3"))
    with torch.no_grad():
        enc = sae.encode(_t(x))
        dense = torch.zeros(x.shape[0], sae.num_latents).scatter_(1, enc.top_indices, enc.top_acts)
        return dense.numpy(), sae.decode(enc.top_acts, enc.top_indices).numpy()


def _openai_loaded(out, x):
    model = pytest.importorskip("sparse_autoencoder.model")
    ae = model.Autoencoder.from_state_dict(torch.load(os.path.join(out, "ae.pt"), weights_only=False))
    with torch.no_grad():
        latents, info = ae.encode(_t(x))
        return latents.numpy(), ae.decode(latents, info).numpy()


def _dictionary_learning_loaded(out, x):
    pytest.importorskip("dictionary_learning")
    from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    with open(os.path.join(out, "config.json")) as f:
        name = json.load(f)["trainer"]["dict_class"]
    classes = (AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder, BatchTopKSAE, AutoEncoderTopK)
    cls = {c.__name__: c for c in classes}[name]
    ae = cls.from_pretrained(os.path.join(out, "ae.pt"))
    with torch.no_grad():
        codes = ae.encode(_t(x))
        return codes.numpy(), ae.decode(codes).numpy()


LOADERS = {"saelens": _saelens_loaded, "sparsify": _sparsify_loaded, "openai": _openai_loaded,
           "dictionary_learning": _dictionary_learning_loaded}
CASES = [(fmt, family) for fmt, adapter in FORMATS.items() for family in adapter.FAMILIES
         if not (fmt == "openai" and family == "topk")]  # OpenAI TopK means layer norm: tested below


@pytest.mark.parametrize("fmt,family", CASES)
def test_export_loads_in_the_library(tmp_path, fmt, family):
    run = _run(tmp_path, family)
    out = export_run(run, fmt, str(tmp_path / "out"))
    x = _x()
    codes, recon = LOADERS[fmt](out, x)
    sae = load_sae(run)
    _close(recon, sae.reconstruct(x))
    # the scale is folded into biases and thresholds: the library's codes are saejax's / scale
    expected = sae.dense_codes(x) / SCALE
    if fmt == "dictionary_learning" and family == "relu":  # from_pretrained rescales to unit decoder rows
        expected = expected * np.linalg.norm(sae.tensors["W_dec"], axis=1)
    _close(codes, expected)


def test_openai_topk_with_layer_norm_round_trips(tmp_path):
    """OpenAI TopK checkpoint -> saejax (layer norm in the spec) -> OpenAI again: same file contents."""
    run = import_sae(os.path.join(FIXTURES, "openai_topk", "ae.pt"), "openai", str(tmp_path / "run"))
    assert json.load(open(os.path.join(run, "cfg.json")))["normalization"]["method"] == LAYER_NORM
    out = export_run(run, "openai", str(tmp_path / "out"))
    a = torch.load(os.path.join(FIXTURES, "openai_topk", "ae.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "ae.pt"), weights_only=True)
    assert b["activation"] == "TopK" and b["activation_state_dict"] == {"k": K, "postact_fn": "ReLU"}
    for key in ("pre_bias", "encoder.weight", "latent_bias", "decoder.weight"):
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    # and SAELens, which has the same layer norm, reproduces OpenAI's reconstructions
    out = export_run(run, "saelens", str(tmp_path / "saelens"))
    batch = np.load(os.path.join(FIXTURES, "openai_topk", "batch.npz"))
    _close(_saelens_loaded(out, batch["x"])[1], batch["recon"])


def test_hookpoint_and_store_facts_follow_each_library(tmp_path, capsys):
    from saejax.cli import main

    tensors, cfg = _spec("topk")
    cfg["data"]["path"] = _store(tmp_path / "store")
    run = str(tmp_path / "run-topk")
    os.mkdir(run)
    export_sae(run, tensors, cfg)
    assert main(["export", run, "--format", "saelens", "--out", str(tmp_path / "saelens")]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["  cfg.json", "  sae_weights.safetensors"]
    out = str(tmp_path / "saelens")
    metadata = json.load(open(os.path.join(out, "cfg.json")))["metadata"]
    assert metadata["hook_name"] == "blocks.3.hook_resid_post" and metadata["model_name"] == "test-model"
    assert (metadata["context_size"], metadata["prepend_bos"], metadata["exclude_special_tokens"],
            metadata["dataset_path"]) == (8, True, True, "test-text")
    out = export_run(run, "sparsify", str(tmp_path / "sparsify"))
    assert os.listdir(out) == ["layers.3"]
    for fmt, src in (("saelens", tmp_path / "saelens"), ("sparsify", tmp_path / "sparsify")):
        assert read_sae(str(src), fmt)[1]["data"]["hookpoint"] == HOOK


# ---------------------------------------------------------------------------- scale folding


@pytest.mark.parametrize("family", ["jumprelu", "batchtopk", "gated", "topk"])
def test_folded_equals_unfolded(tmp_path, family):
    tensors, cfg = _spec(family)
    folded, folded_cfg = fold_scale(tensors, cfg)
    assert folded_cfg["normalization"]["scale"] == 1.0 and folded_cfg["normalization"]["folded_scale"] == SCALE
    input_bias = "b_dec" if "b_dec" in tensors else "b_pre"
    np.testing.assert_array_equal(folded[input_bias], tensors[input_bias] / np.float32(SCALE))
    np.testing.assert_array_equal(folded["W_enc"], tensors["W_enc"])
    if "threshold" in tensors:
        np.testing.assert_array_equal(folded["threshold"], tensors["threshold"] / np.float32(SCALE))
    for name, t in (("unfolded", tensors), ("folded", folded)):
        (tmp_path / name).mkdir()
        export_sae(str(tmp_path / name), t, cfg if name == "unfolded" else folded_cfg)
    unfolded, folded = load_sae(str(tmp_path / "unfolded")), load_sae(str(tmp_path / "folded"))
    x = _x()
    _close(folded.reconstruct(x), unfolded.reconstruct(x))
    _close(folded.dense_codes(x), unfolded.dense_codes(x) / SCALE)
    # folding into the weights and b_dec but not the threshold (the known bug) changes the codes
    if "threshold" in tensors:
        wrong = {**folded_cfg}
        bad = {**load_sae(str(tmp_path / "folded")).tensors, "threshold": tensors["threshold"]}
        (tmp_path / "wrong").mkdir()
        export_sae(str(tmp_path / "wrong"), bad, wrong)
        assert not np.allclose(load_sae(str(tmp_path / "wrong")).dense_codes(x), folded.dense_codes(x))


# ---------------------------------------------------------------------------- import: the library saved it


def _saelens_sae(architecture, seed, **cfg):
    from sae_lens.registry import get_sae_class
    from sae_lens.saes.sae import SAEMetadata

    sae_cls, cfg_cls = get_sae_class(architecture)
    config = cfg_cls(d_in=D, d_sae=N, metadata=SAEMetadata(hook_name="blocks.2.hook_resid_pre", model_name="m"),
                     **cfg)
    sae = sae_cls(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 2 else 0.2))
        if hasattr(sae, "threshold"):
            sae.threshold.abs_().add_(0.02)
    return sae


SAELENS_SAVED = [
    ("standard", {}), ("standard", {"apply_b_dec_to_input": False}), ("topk", {"k": K}),
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}), ("jumprelu", {}),
    ("jumprelu", {"apply_b_dec_to_input": False}), ("gated", {}), ("topk", {"k": K, "normalize_activations": "layer_norm"}),
]


@pytest.mark.parametrize("architecture,cfg", SAELENS_SAVED)
def test_import_saelens_saved(tmp_path, architecture, cfg):
    sae = _saelens_sae(architecture, 3, **cfg)
    sae.save_model(str(tmp_path / "saelens"))
    run = import_sae(str(tmp_path / "saelens"), "saelens", str(tmp_path / "run"))
    x = _x(2)
    with torch.no_grad():
        expected = sae.decode(sae.encode(_t(x))).numpy()
    imported = load_sae(run)
    assert imported.cfg["data"]["hookpoint"] == "resid_pre.2"
    _close(imported.reconstruct(x), expected)


def test_import_sparsify_saved(tmp_path):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(D, SparseCoderConfig(num_latents=N, k=K))
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
    sae.save_to_disk(str(tmp_path / "save" / "layers.4"))
    run = import_sae(str(tmp_path / "save"), "sparsify", str(tmp_path / "run"))
    x = _x(3)
    with torch.no_grad():
        enc = sae.encode(_t(x))
        expected = sae.decode(enc.top_acts, enc.top_indices).numpy()
    imported = load_sae(run)
    assert imported.cfg["data"]["hookpoint"] == "resid_post.4" and imported.cfg["k"] == K
    _close(imported.reconstruct(x), expected)


@pytest.mark.parametrize("name,fmt,family", [
    ("openai_topk", "openai", "topk"), ("openai_relu", "openai", "relu"),
    ("dl_relu", "dictionary_learning", "relu"), ("dl_topk", "dictionary_learning", "topk"),
    ("dl_batchtopk", "dictionary_learning", "batchtopk"), ("dl_jumprelu", "dictionary_learning", "jumprelu"),
    ("dl_gated", "dictionary_learning", "gated"),
])
def test_import_fixture_written_by_the_library(tmp_path, name, fmt, family):
    src = os.path.join(FIXTURES, name, "ae.pt" if fmt == "openai" else "")
    run = import_sae(src, fmt, str(tmp_path / "run"))
    batch = np.load(os.path.join(FIXTURES, name, "batch.npz"))
    sae = load_sae(run)
    assert sae.family.name == family
    _close(sae.reconstruct(batch["x"]), batch["recon"])
    if fmt == "dictionary_learning" or family == "relu":  # OpenAI TopK codes are of the normalised input
        _close(sae.dense_codes(batch["x"]), batch["codes"])
    else:
        _close(sae.dense_codes(sae.normalize(batch["x"])[0], normalized=True), batch["codes"])


# ---------------------------------------------------------------------------- import, then evaluate


def _store(path, rows=512):
    from saejax.store.layout import Geometry
    from saejax.store.writer import StoreWriter

    acts = _x(7, rows)
    tokens = np.stack([np.arange(rows), np.zeros(rows), np.arange(rows)], axis=1).astype(np.int32)
    writer = StoreWriter(str(path), {"model": {"name": "test-model"}, "hookpoint": HOOK},
                         Geometry(d=D, dtype="float32", chunk_rows=32, shard_rows=128), 7, 1)
    writer.add(0, acts, tokens)
    writer.finish({"hookpoint_convention": "test", "context_length": 8, "text": {"source": "test-text"},
                   "excluded_tokens": {"special_tokens_excluded": True, "template_prefix": [101]}})
    return str(path)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_import_then_evaluate_on_a_store(tmp_path, fmt, capsys):
    from saejax.cli import main
    from saejax.data import StoreSource

    store = _store(tmp_path / "store")
    family = "topk" if fmt != "openai" else "relu"
    exported = export_run(_run(tmp_path, family, scale=1.0), fmt, str(tmp_path / "exported"))
    assert main(["import", exported, "--format", fmt, "--out", str(tmp_path / "run")]) == 0
    assert "imported (" in capsys.readouterr().out
    metrics = evaluate(str(tmp_path / "run"), store, batches=2, batch_size=64)
    source = StoreSource(store, D, seed=0, eval_fraction=0.25)
    sae, nmse, l0 = load_sae(str(tmp_path / "run")), [], []
    for i in range(2):
        x = source.read(i, 64, "eval")
        recon, codes = sae.reconstruct(x), sae.dense_codes(x)
        nmse.append(np.sum((x - recon) ** 2) / np.sum((x - x.mean(0)) ** 2))
        l0.append(np.mean(np.sum(codes != 0, axis=1)))
    assert metrics["tokens"] == 128
    np.testing.assert_allclose(metrics["nmse"], np.mean(nmse), rtol=1e-4)
    np.testing.assert_allclose(metrics["l0"], np.mean(l0), rtol=1e-6)


# ---------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    sae = _saelens_sae("standard", 0)
    sae.save_model(str(tmp_path / "s"))
    os.remove(tmp_path / "s" / "sae_weights.safetensors")
    with pytest.raises(InteropError) as e:
        import_sae(str(tmp_path / "s"), "saelens", str(tmp_path / "run"))
    assert str(e.value) == (f"{tmp_path / 's' / 'sae_weights.safetensors'}: file not found; a SAELens SAE "
                            "directory holds cfg.json + sae_weights.safetensors (SAE.save_model)")
    assert not os.path.exists(tmp_path / "run")


def test_wrong_tensor_shape(tmp_path):
    from safetensors.numpy import load_file, save_file

    _saelens_sae("standard", 0).save_model(str(tmp_path / "s"))
    path = str(tmp_path / "s" / "sae_weights.safetensors")
    weights = load_file(path)
    save_file({**weights, "W_enc": np.ascontiguousarray(weights["W_enc"].T)}, path)
    with pytest.raises(InteropError) as e:
        import_sae(str(tmp_path / "s"), "saelens", str(tmp_path / "run"))
    assert str(e.value) == f"{path}: tensor 'W_enc' has shape (64, 16), expected (16, 64) (cfg.json has d_in=16, d_sae=64)"


def test_d_mismatch(tmp_path):
    src = tmp_path / "dl"
    shutil.copytree(os.path.join(FIXTURES, "dl_topk"), src)
    config = json.load(open(src / "config.json"))
    config["trainer"]["activation_dim"] = 32
    json.dump(config, open(src / "config.json", "w"))
    with pytest.raises(InteropError) as e:
        import_sae(str(src), "dictionary_learning", str(tmp_path / "run"))
    assert str(e.value) == (f"{src / 'ae.pt'}: the weights have activation_dim=16 but {src / 'config.json'} "
                            "records trainer.activation_dim=32; expected the config.json of this ae.pt")


def test_unknown_architecture_and_transcoder(tmp_path):
    _saelens_sae("standard", 0).save_model(str(tmp_path / "s"))
    cfg = json.load(open(tmp_path / "s" / "cfg.json"))
    json.dump({**cfg, "architecture": "transcoder"}, open(tmp_path / "s" / "cfg.json", "w"))
    with pytest.raises(InteropError) as e:
        import_sae(str(tmp_path / "s"), "saelens", str(tmp_path / "run"))
    assert str(e.value) == (
        f"{tmp_path / 's' / 'cfg.json'}: architecture 'transcoder' has no saejax family; saejax imports the "
        "SAELens architectures gated, jumprelu, standard, topk (transcoders, skip connections and matching "
        "pursuit have no saejax equivalent)")
    from sparsify import SparseCoder, SparseCoderConfig

    SparseCoder(D, SparseCoderConfig(num_latents=N, k=K, transcode=True)).save_to_disk(str(tmp_path / "t"))
    with pytest.raises(InteropError, match=r"cfg.json: transcode=true: a transcoder maps one hookpoint"):
        import_sae(str(tmp_path / "t"), "sparsify", str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_refusals_leave_nothing_behind(tmp_path, capsys):
    run = _run(tmp_path, "prolu")
    with pytest.raises(InteropError) as e:
        export_run(run, "saelens", str(tmp_path / "out"))
    assert str(e.value) == ("the saelens format cannot hold a prolu SAE; it holds relu, topk, jumprelu, batchtopk, "
                            "matryoshka, gated; formats that hold prolu: none")
    with pytest.raises(InteropError, match=r"layer-normalises every token of a TopK autoencoder"):
        export_run(_run(tmp_path, "topk"), "openai", str(tmp_path / "out"))
    tensors, cfg = _spec("batchtopk")
    with pytest.raises(InteropError, match=r"inference threshold was never estimated"):
        export_spec({**tensors, "threshold": np.float32(np.inf)}, cfg, "dictionary_learning", str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["run-prolu", "run-topk"]  # no output, no temp directory
    from saejax.cli import main

    assert main(["export", run, "--format", "sparsify", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("saejax export: error: the sparsify format cannot hold a prolu SAE; it "
                                       "holds topk; formats that hold prolu: none\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(InteropError, match=r"full already exists and is not an empty directory"):
        export_run(_run(tmp_path, "relu"), "saelens", str(tmp_path / "full"))
