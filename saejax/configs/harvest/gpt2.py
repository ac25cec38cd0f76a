"""GPT-2 small's residual stream after block 6 on OpenWebText, for a cluster with Hub access.

  saejax harvest --config gpt2 --store /data/acts/gpt2_l6
  saejax harvest --config gpt2:hookpoint=resid_post.8,tokens=1e9 --config.store.dtype=bfloat16 --store ...

Needs `pip install datasets` and network access to the Hugging Face Hub. Train
on it with `saejax train --config gpt2_small --config.data.path=/data/acts/gpt2_l6`.
"""

from saejax.harvest.config import harvest_config, harvest_variant


def get_config(arg=None):
    config = harvest_config()
    config.model.name = "openai-community/gpt2"
    config.model.kind = "causal_lm"
    config.hookpoint = "resid_post.6"
    config.text.source = "hf:Skylion007/openwebtext"
    config.context_length = 1024
    config.max_tokens = 400_000_000
    config.batch_size = 16
    config.store.shard_mb = 256.0
    config.store.shuffle_buffer_mb = 4096.0
    return harvest_variant(config, arg)
