"""A TopK SAE on MiniLM activations harvested by `saejax harvest` (the README's main job).

d=384 (MiniLM's residual stream after block 3), 4096 latents, k=32; about two
minutes on 2 CPU cores.

  saejax harvest --store runs/minilm/acts
  saejax train --config minilm --config.data.path=runs/minilm/acts --workdir runs/minilm/sae
"""

from saejax.config import apply_variant, base_config


def get_config(arg=None):
    config = base_config()
    config.sae.d = 384
    config.sae.n = 4096
    config.sae.topk.k = 32
    config.sae.dead_tokens = 1_000_000
    config.sae.init_sample_rows = 16384
    config.data.source = "store"
    config.data.path = ""  # the --store of `saejax harvest`
    config.data.batch_size = 1024
    config.data.eval_fraction = 0.02
    config.optim.lr = 5e-4
    config.optim.warmup_steps = 50
    config.train.steps = 1500
    config.train.log_every = 50
    config.train.eval_batches = 4
    config.checkpoint.every_steps = 500
    return apply_variant(config, arg)
