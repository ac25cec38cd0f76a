"""Dense single-device references, one module per SAE family (tests/test_families.py uses them).

Each module `<family>.py` defines

  OVERRIDES        dotted config keys on top of helpers.small_config for this family
  RECOVERY         the least feature recovery (mean max cosine) expected from the defaults
  L0_RANGE         optional (low, high) of the held-out L0 trained from the defaults (default 1..128;
                   a family without a sparsity target, like the binary one, declares its own)
  perturb(params, state, rng) -> (params, state)
                   optional: move parameters off their init so every term of the loss is exercised
  reference(family, params, state, x, step, dead) -> {"loss", "state", "fire_counts"}
                   the loss written the obvious way: dense codes, plain jnp, one device

A new family without a module here fails `test_every_family_has_a_reference`.
"""
