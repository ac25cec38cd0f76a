"""What evaluators share, loaded once and on first use.

- the SAE as exported into the run directory (`saejax.export.load_sae`): every
  evaluator goes through its inference `encode`/`decode`, so every family is
  evaluated the way it infers;
- held-out activations of the run's data source (its eval split);
- for runs on a harvested store: the model the store was harvested from (with
  its LM head where it has one), checked against the store (weights hash,
  tokenizer hash, d), and held-out contexts: contexts of the store's own text
  *after* the ones it harvested, which no SAE has seen, with their clean
  hookpoint activations.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import Any

import numpy as np

from saejax.errors import ConfigError, DataError

RUN_FILES_HINT = "train it to the end first (`saejax train ... --workdir RUN_DIR`), or import one (`saejax import`)"


class HeldOutContexts:
    """Contexts (ids, kept positions) and the clean activations at their kept positions.

    Token-level arrays follow the kept positions in row-major order: `rows`
    (tokens, d) raw activations, `token_ids`, `context_rows` (which context),
    `positions` (within it).
    """

    def __init__(self, ids: np.ndarray, keep: np.ndarray, rows: np.ndarray, first_index: int):
        self.ids, self.keep, self.rows, self.first_index = ids, keep, rows, first_index
        self.context_rows, self.positions = np.nonzero(keep)
        self.token_ids = ids[self.context_rows, self.positions]

    @property
    def num_contexts(self) -> int:
        return int(self.ids.shape[0])

    def split(self) -> np.ndarray:
        """bool (tokens,): True for tokens of even contexts (fit), False for odd ones (held-out score)."""
        return self.context_rows % 2 == 0


class EvalInputs:
    def __init__(self, run_dir: str, config, progress: bool = True):
        from saejax.export import CONFIG_FILE, WEIGHTS_FILE, load_sae

        self.run_dir, self.config, self.progress = run_dir, config, progress
        missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if not os.path.exists(os.path.join(run_dir, f))]
        if missing:
            raise ConfigError(f"{run_dir} holds no exported SAE ({' and '.join(missing)} missing); {RUN_FILES_HINT}")
        self.sae = load_sae(run_dir)
        if self.sae.d != int(config.sae.d):
            raise ConfigError(f"{run_dir}: the exported SAE has d={self.sae.d} but the run's config says "
                              f"sae.d={config.sae.d}; the run directory is inconsistent")
        self.notes: list[str] = []
        self._model_error: str | None = None

    # ----------------------------------------------------------------- data

    @functools.cached_property
    def source(self):
        from saejax.data import make_source

        return make_source(self.config)

    @property
    def ledger(self) -> dict[str, Any] | None:
        return getattr(self.source, "ledger", None)

    def heldout_rows(self, num_tokens: int, batch_size: int = 4096):
        """Raw (unnormalised) batches of the eval split, at most `num_tokens` rows in all."""
        split = self.source.split_rows() if hasattr(self.source, "split_rows") else None
        available = (split or {}).get("eval")
        if available is not None:
            num_tokens = min(num_tokens, int(available))
        if num_tokens <= 0:
            raise DataError("the run holds out no evaluation tokens (data.eval_fraction=0); "
                            "set data.eval_fraction > 0, or skip with --config.eval.reconstruction.enabled=false")
        size = min(batch_size, num_tokens)
        for step in range(num_tokens // size):
            yield self.source.rows(step, size, "eval", 0, size)

    @functools.cached_property
    def data_mean(self) -> np.ndarray:
        """Mean raw activation over the source's fixed training sample (for mean ablation)."""
        sample = self.source.sample(min(int(self.config.sae.init_sample_rows), 8192))
        return np.asarray(sample, np.float64).mean(axis=0).astype(np.float32)

    # ----------------------------------------------------------------- model

    def harvest_config(self):
        """The store's harvest config, with eval.model in place of its model if given."""
        from saejax.config import flatten
        from saejax.harvest.config import harvest_config

        config = harvest_config()
        identity = dict(self.ledger["identity"])
        config.update_from_flattened_dict({k: v for k, v in flatten(identity).items() if _has(config, k)})
        if self.config.eval.model:
            config.model.name = self.config.eval.model
        config.model.device = self.config.eval.device
        return config

    def model_problem(self, needs_head: bool) -> str | None:
        """Why the model-based evaluators cannot run (a note), or None."""
        if self.ledger is None:
            return f"data.source={self.config.data.source}: no language model behind these activations"
        if not (self.ledger.get("hookpoint") and (self.ledger.get("identity") or {}).get("model")):
            return f"the store {self.source.path} records no model and hookpoint (not written by `saejax harvest`)"
        if needs_head and self.lm is None:  # loading (or failing to: a clear error) happens here
            return self._model_error
        return None

    @functools.cached_property
    def lm(self):
        """The LanguageModel, or None when the model has no LM head (then `model_forward` runs it bare)."""
        from saejax.evaluation.lm import LanguageModel
        from saejax.harvest.contexts import tokenizer_hash
        from saejax.harvest.model import NoLanguageModelHead

        config = self.harvest_config()
        try:
            lm = LanguageModel.load(config, self.ledger["hookpoint"])
        except NoLanguageModelHead as e:
            self._model_error = f"{e}, which the downstream metrics need"
            self._bare = _BareModel.load(config, self.ledger["hookpoint"])
            self._check_model(self._bare.facts, self._bare.tokenizer)
            return None
        self._check_model(lm.facts, lm.tokenizer)
        return lm

    def _check_model(self, facts, tokenizer) -> None:
        from saejax.harvest.contexts import tokenizer_hash

        stored = self.ledger.get("model") or {}
        name = facts["name"]
        if stored.get("weights_sha256") and stored["weights_sha256"] != facts["weights_sha256"]:
            raise ConfigError(f"model {name} is not the one the store {self.source.path} was harvested from: weights "
                              f"sha256 {facts['weights_sha256'][:12]}... vs the store's {stored['weights_sha256'][:12]}...; "
                              "set eval.model to the store's model")
        wanted = (self.ledger.get("hashes") or {}).get("tokenizer_sha256")
        if wanted and tokenizer_hash(tokenizer) != wanted:
            raise ConfigError(f"the tokenizer of {name} is not the one the store {self.source.path} was harvested "
                              "with (tokenizer sha256 differs); set eval.model to the store's model")

    def capture(self, ids, keep) -> np.ndarray:
        """Clean hookpoint rows of the evaluation model at the kept positions."""
        return (self.lm if self.lm is not None else self._bare).capture(ids, keep)

    @property
    def tokenizer(self):
        return self.lm.tokenizer if self.lm is not None else self._bare.tokenizer

    def contexts(self, count: int) -> HeldOutContexts:
        """`count` held-out contexts (fewer if the text runs out, with a note), with clean activations."""
        return self._contexts(int(count))

    @functools.lru_cache(maxsize=2)
    def _contexts(self, count: int) -> HeldOutContexts:
        from tqdm.auto import tqdm

        from saejax.harvest.contexts import ContextPacker
        from saejax.harvest.text import TextSource

        config = self.harvest_config()
        harvested = int(self.ledger.get("contexts") or 0)
        text = TextSource(config.text.source, config.text.field, config.text.dataset_config,
                          config.text.dataset_split)
        packer = ContextPacker(self.tokenizer, config.context_length, config.exclude_special_tokens)
        chosen = list(itertools.islice(packer.contexts(text.documents()), harvested, harvested + count))
        if not chosen:
            raise DataError(f"the store's text ({text.describe()}) holds no contexts beyond the {harvested} it "
                            "harvested, and evaluation needs unseen text: harvest the store with a smaller "
                            "max_tokens, or evaluate on another store")
        if len(chosen) < count:
            self.notes.append(f"the store's text holds only {len(chosen)} unseen contexts, not eval.contexts={count}")
        ids = np.stack([c.ids for c in chosen])
        keep = np.stack([c.keep for c in chosen])
        d = int(self.ledger["d"])
        rows = []
        batch = int(self.config.eval.batch_contexts)
        for start in tqdm(range(0, len(chosen), batch), desc="eval: contexts", unit="batch",
                          disable=not self.progress, leave=False):
            rows.append(self.capture(ids[start:start + batch], keep[start:start + batch]))
        rows = np.concatenate(rows)
        if rows.shape[1] != d:
            raise ConfigError(f"model {config.model.name} gives d={rows.shape[1]} at {self.ledger['hookpoint']} but the "
                              f"store holds d={d}: it is not the store's model; set eval.model to the store's model")
        return HeldOutContexts(ids, keep, rows, harvested)


class _BareModel:
    """The store's model without an LM head: only the hookpoint activations (probes, explanations)."""

    def __init__(self, model, tokenizer, hook, device, facts):
        self.model, self.tokenizer, self.hook, self.device, self.facts = model, tokenizer, hook, device, facts

    @classmethod
    def load(cls, config, hookpoint: str) -> "_BareModel":
        from saejax.harvest import hookpoints
        from saejax.harvest import model as model_io

        model, tokenizer, facts = model_io.load(config)
        return cls(model, tokenizer, hookpoints.resolve(model, hookpoint), facts["device"], facts)

    def capture(self, ids, keep) -> np.ndarray:
        import torch

        ids_t = torch.from_numpy(np.asarray(ids, np.int64)).to(self.device)
        value = self.hook.capture(self.model, input_ids=ids_t, attention_mask=torch.ones_like(ids_t))
        return value.detach().to(torch.float32).cpu().numpy()[np.asarray(keep, bool)]


def _has(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if part not in node:
            return False
        node = node[part]
    return True
