"""Export saejax SAEs to, and import them from, other SAE libraries' files.

One adapter module per format, registered below in one line each. An adapter
has NAME, FAMILIES (the saejax families its files can hold), `write(tensors,
cfg, out_dir) -> files` taking a spec in raw activation units, and
`read(src) -> (tensors, cfg)` returning one. Generic code here folds the
normalisation scale, checks the family, and writes every output atomically.

    export_run("runs/topk", "saelens", "exports/topk-saelens")
    import_sae("downloads/layer_8.pt", "openai", "runs/openai-l8")   # a run dir load_sae reads
"""

from __future__ import annotations

import os
from typing import Any

from saejax.interop import dictionary_learning, openai, saelens, sparsify
from saejax.interop.common import InteropError, fold_scale, read_run, write_directory, write_run

FORMATS = {
    saelens.NAME: saelens,
    sparsify.NAME: sparsify,
    openai.NAME: openai,
    dictionary_learning.NAME: dictionary_learning,
}


def get_format(name: str):
    if name not in FORMATS:
        raise InteropError(f"unknown format {name!r}; the formats are: {', '.join(FORMATS)}")
    return FORMATS[name]


def export_spec(tensors, cfg: dict[str, Any], fmt: str, out: str) -> str:
    """Write a spec (tensors + cfg.json dict) in format `fmt` into the new directory `out`."""
    adapter = get_format(fmt)
    family = cfg["family"]
    if family not in adapter.FAMILIES:
        raise InteropError(f"the {fmt} format cannot hold a {family} SAE; it holds {', '.join(adapter.FAMILIES)}"
                           f"; formats that hold {family}: "
                           f"{', '.join(n for n, a in FORMATS.items() if family in a.FAMILIES) or 'none'}")
    tensors, cfg = fold_scale(tensors, cfg)
    return write_directory(out, lambda tmp: adapter.write(tensors, cfg, tmp))


def export_run(run_dir: str, fmt: str, out: str) -> str:
    """Export the SAE of a saejax run directory (sae.safetensors + cfg.json) into `out`."""
    tensors, cfg = read_run(run_dir)
    return export_spec(tensors, cfg, fmt, out)


def read_sae(src: str, fmt: str):
    """(tensors, cfg) of an SAE in format `fmt`, as saejax's inference spec."""
    if not os.path.exists(src):
        raise InteropError(f"{src}: no such file or directory")
    return get_format(fmt).read(src)


def import_sae(src: str, fmt: str, out: str) -> str:
    """Convert `src` into a saejax run directory `out` (sae.safetensors + cfg.json); returns its path."""
    tensors, cfg = read_sae(src, fmt)
    return write_run(out, tensors, cfg)


def evaluate(run_dir: str, store: str, batches: int = 4, batch_size: int = 256,
             dense_threshold: float = 0.1) -> dict[str, float]:
    """Held-out metrics of any run dir's SAE (trained or imported) on an activation store.

    Rows of the store's eval split are normalised the way the SAE's cfg.json
    says (scale or per-token layer norm) and measured with
    `inference.reconstruction_metrics`, the trainer's own evaluation.
    """
    import jax.numpy as jnp

    from saejax.data import StoreSource
    from saejax.export import load_sae
    from saejax.inference import reconstruction_metrics

    sae = load_sae(run_dir)
    source = StoreSource(store, sae.d, seed=0, eval_fraction=0.25)
    stream = (jnp.asarray(sae.normalize(source.read(i, batch_size, "eval"))[0]) for i in range(batches))
    return reconstruction_metrics(sae.family, sae.params, stream, sae.mesh, dense_threshold)


__all__ = ["FORMATS", "InteropError", "evaluate", "export_run", "export_spec", "get_format", "import_sae",
           "read_sae"]
