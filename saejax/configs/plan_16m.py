"""A 16M-latent TopK SAE (d=4096, n=2^24, k=32) split over 64 devices of 80 GB.

Planned on a laptop with simulated devices:

  saejax plan --config plan_16m --devices 64

The dictionary is split over all 64 devices (262,144 latents each); the step
never gathers the (B, n) pre-activations, only B x k x 64 top-k candidates.
"""

from saejax.config import apply_variant, base_config


def get_config(arg=None):
    config = base_config()
    config.sae.d = 4096
    config.sae.n = 2**24
    config.sae.topk.k = 32
    config.optim.warmup_steps = 1000
    config.data.source = "npy"
    config.data.path = "llm_resid_d4096.npy"  # activations you harvested; replace with yours
    config.data.batch_size = 4096
    config.train.steps = 100_000
    config.train.compute_dtype = "bfloat16"
    config.checkpoint.every_steps = 2000
    config.mesh.data = 1
    config.mesh.model = -1
    config.device_memory_gb = 80.0
    return apply_variant(config, arg)
