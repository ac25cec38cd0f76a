"""One 16M-latent TopK SAE (n = 2^24, k = 32) on a d=4096 residual stream, split over 64 GPUs of 80 GB.

The dictionary is split over all 64 devices (262,144 latents each); the step
exchanges only B x k candidates per device for the top-k, never the (B, n)
pre-activations. Plan it on a laptop, then launch it as a one-point sweep on
8 nodes of 8 GPUs (the array has one task; its 8 processes join through
jax.distributed from SLURM's variables):

  saejax plan --config plan_16m --devices 64
  PARTITION=gpu NODES=8 GPUS_PER_NODE=8 launch/slurm.sh experiments/sae_16m.py $SCRATCH/sweeps/sae_16m \\
      --config.data.path=$SCRATCH/acts/llama_l16

The store is a `saejax harvest` of a d=4096 model (e.g. --config gpt2 with
model.name and hookpoint changed); data.path must point at it.
"""

from saejax.config import base_config


def get_config():
    config = base_config()
    config.sae.d = 4096
    config.sae.n = 2**24
    config.sae.topk.k = 32
    config.optim.warmup_steps = 1000
    config.data.source = "store"
    config.data.path = ""  # required: --config.data.path=YOUR_STORE
    config.data.batch_size = 4096
    config.train.steps = 100_000
    config.train.compute_dtype = "bfloat16"
    config.train.progress = False
    config.checkpoint.every_steps = 2000
    config.mesh.data = 1
    config.mesh.model = -1
    config.device_memory_gb = 80.0
    return config


def get_hyper(hyper):
    return hyper.product([hyper.fixed("sae.n", 2**24), hyper.fixed("sae.k", 32)])
