"""A TopK SAE on activations saved as a .npy file of shape (tokens, d).

  saejax train --config npy:path=acts.npy,d=768,n=16384,k=32 --workdir runs/npy
"""

from saejax.config import apply_variant, base_config


def get_config(arg=None):
    config = base_config()
    config.data.source = "npy"
    config.data.batch_size = 4096
    config.sae.d = 768
    config.sae.n = 16384
    config.sae.topk.k = 32
    config.train.steps = 10_000
    config.train.log_every = 50
    config.checkpoint.every_steps = 1000
    return apply_variant(config, arg)
