"""GPT-2 small's residual stream (d=768, after block 6): n = 2^15..2^20 x k = 8..128, 1B tokens each.

Thirty runs at Gao et al.'s settings (AuxK, weight EMA, bf16 matmuls, lr
2e-4/sqrt(n/2^14)), latents split over every device of a run. Harvest once,
then launch one array task per grid point:

  saejax harvest --config gpt2 --store $SCRATCH/acts/gpt2_l6
  PARTITION=gpu NODES=1 GPUS_PER_NODE=8 launch/slurm.sh experiments/gpt2_small.py $SCRATCH/sweeps/gpt2 \\
      --config.data.path=$SCRATCH/acts/gpt2_l6
  saejax fit $SCRATCH/sweeps/gpt2

Without --config.data.path the sweep harvests the store itself into
WORKDIR/acts (one task harvests, the others wait for it). Check a grid point's
memory first: saejax plan --config gpt2_small:n=1048576 --devices 8.
"""

from saejax.config import base_config

TOKENS = 1_000_000_000
BATCH = 4096


def get_config():
    config = base_config()
    config.sae.d = 768
    config.sae.n = 2**17  # swept
    config.sae.topk.k = 32  # swept
    config.optim.ema_decay = 0.999
    config.optim.warmup_steps = 1000
    config.data.source = "store"
    config.data.path = ""  # your `saejax harvest --config gpt2` store, or empty for WORKDIR/acts
    config.data.batch_size = BATCH
    config.train.steps = TOKENS // BATCH
    config.train.log_every = 100
    config.train.eval_batches = 16
    config.train.compute_dtype = "bfloat16"
    config.train.progress = False
    config.checkpoint.every_steps = 5000
    config.mesh.data = 1
    config.mesh.model = -1
    config.device_memory_gb = 80.0
    return config


def get_hyper(hyper):
    return hyper.product([
        hyper.sweep("sae.k", [8, 16, 32, 64, 128]),
        hyper.sweep("sae.n", [2**15, 2**16, 2**17, 2**18, 2**19, 2**20]),
    ])


def get_harvest():
    return {"config": "gpt2", "overrides": {"progress": False}}
