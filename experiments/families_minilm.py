"""Every SAE family on one nmse-L0 frontier: MiniLM's residual stream, n = 1024, L0 about 8..64.

The families of saejax.models trained on the activations of the embedded default model
(all-MiniLM-L6-v2 after block 3, d=384, 262k tokens of Python's own documentation),
harvested once into WORKDIR/acts, at comparable sparsities:

  TopK                                    k = 8, 16, 32, 64
  BatchTopK, Matryoshka BatchTopK         k = 8, 32 (their step costs 6x TopK's on this CPU)
  JumpReLU                                target_l0 = 8, 16, 32, 64 (the penalty adapts toward it)
  ReLU + L1, ProLU, Gated                 an L1 coefficient swept over a factor of 5-8, chosen
                                          with short pilot runs to span about the same L0 range

Every run trains 800 steps of 1024 tokens (about three passes over the store) with Adam at a
constant 1e-3 after warm-up, the same for every family, and is evaluated on the same 5120
held-out tokens through its family's inference (BatchTopK and Matryoshka with their learned
threshold). On 2 CPU cores the study takes about 25 minutes:

  saejax sweep experiments/families_minilm.py --workdir runs/families --one-pass --group-size 4 \\
      --config.data.path=runs/minilm/acts
  saejax frontier runs/families

(drop --config.data.path to harvest the store into the study's own directory first).
"""

from saejax.config import base_config

KS = [8, 16, 32, 64]
BATCH_KS = [8, 32]
L1_COEFS = {  # pilots (n=1024, 1000 steps): relu 8 -> L0 7.4; gated 24 -> L0 21
    "relu": [1.5, 3.0, 5.0, 8.0],
    "prolu": [1.5, 3.0, 5.0, 8.0],
    "gated": [10.0, 20.0, 40.0, 80.0],
}


def get_config():
    config = base_config()
    config.sae.d = 384
    config.sae.n = 1024
    config.sae.dead_tokens = 250_000  # about one pass over the store
    config.sae.init_sample_rows = 16384
    config.data.source = "store"
    config.data.path = ""  # empty: the study's own store, WORKDIR/acts (see get_harvest)
    config.data.batch_size = 1024
    config.data.eval_fraction = 0.02
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 50
    config.train.steps = 800
    config.train.log_every = 50
    config.train.eval_batches = 5  # all 5120 held-out tokens
    config.train.progress = False
    config.checkpoint.every_steps = 500
    config.checkpoint.keep_last = 1
    config.mesh.model = 1
    return config


def get_hyper(hyper):
    def family(name, key, values):
        return hyper.product([hyper.fixed("sae.family", name), hyper.sweep(f"sae.{name}.{key}", values)])

    return hyper.chainit([
        family("topk", "k", KS),
        family("batchtopk", "k", BATCH_KS),
        family("matryoshka", "k", BATCH_KS),
        family("jumprelu", "target_l0", [float(k) for k in KS]),
        *[family(name, "l1_coef", coefs) for name, coefs in L1_COEFS.items()],
    ])


def get_harvest():
    """The store the study trains on when data.path is empty: the built-in MiniLM harvest."""
    return {"config": "minilm", "overrides": {}}
