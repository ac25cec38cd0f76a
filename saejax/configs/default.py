"""The embedded default: a TopK SAE recovering a known sparse dictionary.

Synthetic activations (d=64) built from 512 true features with power-law
firing rates; the SAE has 1024 latents. Runs in about a minute on 2 CPU cores
and reports how well it recovered the true features.

  saejax train --workdir runs/default
  saejax train --config default:n=2048,k=16 --config.train.steps=3000 --workdir runs/wide
"""

from saejax.config import apply_variant, base_config


def get_config(arg=None):
    config = base_config()
    config.sae.d = 64
    config.sae.n = 1024
    config.sae.topk.k = 8
    config.sae.dead_tokens = 1_000_000
    config.data.source = "synthetic"
    config.data.batch_size = 1024
    config.data.synthetic.num_features = 512
    config.data.synthetic.avg_active = 6.0
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 50
    config.train.steps = 1500
    config.train.log_every = 50
    config.checkpoint.every_steps = 500
    return apply_variant(config, arg)
