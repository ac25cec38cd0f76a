"""CPU scaling study: TopK SAEs on MiniLM's residual stream, n = 2^6..2^11 x k = 8, 16, 32, 64.

Twenty-four runs on the activations of the embedded default model (all-MiniLM-L6-v2,
after block 3, d=384, 262k tokens of Python's own documentation), harvested
once into WORKDIR/acts. Each run trains 1500 steps of 1024 tokens (about six
passes over the store) at a constant learning rate of 1e-3 after warm-up:
with this few tokens, Gao et al.'s 2e-4/sqrt(n/2^14) leaves the larger
dictionaries undertrained and bends L(n) upwards. On 2 CPU cores the whole
study, harvest and fits included, takes well under 30 minutes:

  saejax sweep experiments/minilm_cpu.py --workdir runs/minilm_sweep --one-pass --fit

Reuse the README quick start's store instead of harvesting again with
--config.data.path=runs/minilm/acts.
"""

from saejax.config import base_config


def get_config():
    config = base_config()
    config.sae.d = 384
    config.sae.n = 4096  # swept
    config.sae.topk.k = 32  # swept
    config.sae.dead_tokens = 250_000  # about one pass over the store
    config.sae.init_sample_rows = 16384
    config.data.source = "store"
    config.data.path = ""  # empty: the study's own store, WORKDIR/acts (see get_harvest)
    config.data.batch_size = 1024
    config.data.eval_fraction = 0.02
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 50
    config.train.steps = 1500
    config.train.log_every = 50
    config.train.eval_batches = 5  # all 5120 held-out tokens
    config.train.progress = False
    config.checkpoint.every_steps = 500
    config.checkpoint.keep_last = 1
    config.mesh.model = 1
    return config


def get_hyper(hyper):
    return hyper.product([
        hyper.sweep("sae.k", [8, 16, 32, 64]),
        hyper.sweep("sae.n", [2**6, 2**7, 2**8, 2**9, 2**10, 2**11]),
    ])


def get_harvest():
    """The store the study trains on when data.path is empty: the built-in MiniLM harvest."""
    return {"config": "minilm", "overrides": {}}
