"""GPT-2-small residual stream (d=768), TopK at Gao et al.'s settings, cluster-sized.

Latents are split over every device (mesh.model=-1); 2^17 latents by default,
1B tokens at 4096 tokens per step, AuxK and the weight EMA on.

  saejax plan --config gpt2_small:n=1048576 --devices 8
  saejax harvest --config gpt2 --store /data/acts/gpt2_l6
  saejax train --config gpt2_small:path=/data/acts/gpt2_l6 --workdir $SCRATCH/runs/gpt2_n131k
"""

from saejax.config import apply_variant, base_config


def get_config(arg=None):
    config = base_config()
    config.sae.d = 768
    config.sae.n = 2**17
    config.sae.topk.k = 32
    config.sae.topk.multi_topk = False
    config.optim.ema_decay = 0.999
    config.optim.warmup_steps = 1000
    config.data.source = "store"
    config.data.path = "gpt2_l6_store"  # a store from `saejax harvest --config gpt2`; replace with yours
    config.data.batch_size = 4096
    config.train.steps = 1_000_000_000 // 4096
    config.train.log_every = 100
    config.train.compute_dtype = "bfloat16"
    config.checkpoint.every_steps = 5000
    config.checkpoint.keep_every = 50_000
    config.mesh.data = 1
    config.mesh.model = -1
    config.device_memory_gb = 80.0
    return apply_variant(config, arg)
