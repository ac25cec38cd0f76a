"""Downstream loss: the LM's next-token loss with the SAE's reconstruction spliced in.

On held-out contexts (the store's text after what it harvested), four runs
of the causal LM per batch of contexts, each changing only the hookpoint's
activation at the positions the store keeps:

  clean    nothing replaced                     -> ce_clean
  spliced  x replaced by the SAE's x_hat        -> ce_spliced, kl_spliced = KL(clean || spliced)
  zero     x replaced by 0                      -> ce_zero_ablated
  mean     x replaced by the store's mean x     -> ce_mean_ablated

x_hat is decode(encode(x * scale)) / scale: the SAE works in the run's
normalised units and the LM in raw ones. loss_recovered, the headline, uses
zero ablation, as Gao et al. and SAELens' `ce_loss_score` do:
(ce_zero_ablated - ce_spliced) / (ce_zero_ablated - ce_clean);
`loss_recovered_mean_ablation` is the same with mean ablation. All CE are
means over every next-token prediction of the contexts, in nats.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from saejax.evaluation.base import Evaluator
from saejax.evaluation.lm import kl_divergence, next_token_losses


def loss_recovered(ce_ablated: float, ce_sae: float, ce_clean: float) -> float:
    return (ce_ablated - ce_sae) / (ce_ablated - ce_clean)


class Downstream(Evaluator):
    name = "downstream"
    description = "LM loss with x_hat spliced in: clean/spliced/zero/mean-ablated CE, loss recovered, KL"
    needs_model = True
    needs_lm_head = True

    @classmethod
    def defaults(cls):
        return {"contexts": 0}  # 0: all of eval.contexts

    @classmethod
    def check(cls, options, config):
        return [] if options.contexts >= 0 else [f"eval.downstream.contexts={options.contexts} must be >= 0"]

    def run(self, inputs, options) -> dict[str, Any]:
        from tqdm.auto import tqdm

        held = inputs.contexts(int(inputs.config.eval.contexts))
        count = min(int(options.contexts) or held.num_contexts, held.num_contexts)
        lm, sae = inputs.lm, inputs.sae
        mean = inputs.data_mean
        sums = {key: 0.0 for key in ("clean", "spliced", "zero", "mean", "kl_spliced", "kl_zero")}
        err, total, predictions = 0.0, 0.0, 0
        batch = int(inputs.config.eval.batch_contexts)
        offsets = np.concatenate([[0], np.cumsum(held.keep.sum(axis=1))])
        for start in tqdm(range(0, count, batch), desc="eval: downstream", unit="batch",
                          disable=not inputs.progress, leave=False):
            stop = min(start + batch, count)
            ids, keep = held.ids[start:stop], held.keep[start:stop]
            x = held.rows[offsets[start]:offsets[stop]]
            x_hat = sae.reconstruct(x)
            clean = lm.forward(ids, keep)
            runs = {"spliced": x_hat, "zero": np.zeros_like(x), "mean": np.broadcast_to(mean, x.shape)}
            sums["clean"] += float(next_token_losses(clean, ids).sum())
            for name, replacement in runs.items():
                logits = lm.forward(ids, keep, replacement)
                sums[name] += float(next_token_losses(logits, ids).sum())
                if name in ("spliced", "zero"):
                    sums[f"kl_{name}"] += float(kl_divergence(clean, logits).sum())
            predictions += ids.shape[0] * (ids.shape[1] - 1)
            err += float(np.sum((x_hat.astype(np.float64) - x) ** 2))
            total += float(np.sum((x.astype(np.float64) - x.mean(axis=0)) ** 2))
        ce = {key: value / predictions for key, value in sums.items()}
        return {
            "contexts": count,
            "predictions": predictions,
            "ce_clean": ce["clean"],
            "ce_spliced": ce["spliced"],
            "ce_zero_ablated": ce["zero"],
            "ce_mean_ablated": ce["mean"],
            "ce_delta": ce["spliced"] - ce["clean"],
            "loss_recovered": loss_recovered(ce["zero"], ce["spliced"], ce["clean"]),
            "loss_recovered_mean_ablation": loss_recovered(ce["mean"], ce["spliced"], ce["clean"]),
            "kl_spliced": ce["kl_spliced"],
            "kl_zero_ablated": ce["kl_zero"],
            "spliced_nmse": err / total,
            "headline_ablation": "zero",
        }

    def headline(self, figures):
        keys = ("ce_clean", "ce_spliced", "ce_delta", "loss_recovered", "kl_spliced")
        return {k: figures[k] for k in keys}
