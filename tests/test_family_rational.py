"""The rational family over a BatchTopK teacher (its selection inside shard_map), and refused teachers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import small_config
from saejax.config import validate
from saejax.data import make_source
from saejax.errors import ConfigError
from saejax.models import get_family
from saejax.models.base import LossContext
from saejax.sharding import make_mesh


# (JumpReLU teachers train in the contract's defaults test; TopK's is the contract's reference.)
@pytest.mark.parametrize("teacher, options", [("batchtopk", {"sae.rational.threshold": 0.0, "sae.batchtopk.k": 8})])
def test_stage_one_loss_is_the_teachers_and_the_scalars_get_gradients(teacher, options):
    overrides = {"sae.rational.teacher": teacher, "sae.rational.p": 3, "sae.rational.q": 2, **options}
    config = small_config(**{"sae.family": "rational", **overrides})
    validate(config, 1)
    family = get_family(config)
    x = jnp.asarray(make_source(config).read(0, 64))
    params = family.init_params(jax.random.PRNGKey(0), x)
    state = family.init_state(params, x)
    ctx = LossContext(step=jnp.asarray(3, jnp.int32), dead=jnp.zeros((family.n,), bool), mesh=make_mesh(1, 1))
    (value, out), grads = jax.jit(jax.value_and_grad(
        lambda p: family.loss(p, state, x, ctx), has_aux=True))(params)
    teacher_params = {k: v for k, v in params.items() if not k.startswith("rational_")}
    reference, reference_out = jax.jit(lambda p: family.teacher.loss(p, state, x, ctx))(teacher_params)
    # phi fits the teacher's gate on its kept pre-activations: the loss starts where the teacher's is.
    np.testing.assert_allclose(value, reference, rtol=0.02)
    np.testing.assert_allclose(out.metrics["l0"], reference_out.metrics["l0"], rtol=0.02)
    for name in ("rational_a", "rational_b", "rational_c_in", "rational_c_out"):
        assert np.all(np.isfinite(grads[name])) and np.any(grads[name] != 0), name


def test_teachers_without_a_scalar_gate_are_refused():
    config = small_config(**{"sae.family": "rational", "sae.rational.teacher": "prolu"})
    with pytest.raises(ConfigError) as e:
        validate(config, 1)
    assert str(e.value) == ("sae.rational.teacher='prolu' cannot be upgraded: its gate ReLU(pre) * H(pre - b) has a "
                            "per-latent bias inside the gate, not one scalar function; the teachers are: relu, "
                            "jumprelu, topk, batchtopk")
    config = small_config(**{"sae.family": "rational", "sae.rational.teacher": "batchtopk"})
    with pytest.raises(ConfigError) as e:
        validate(config, 1)
    assert str(e.value) == ("sae.rational.threshold is unset and a batchtopk teacher initialised afresh has no "
                            "threshold yet: set sae.rational.threshold=TAU, or sae.rational.init_from=RUN_DIR (a "
                            "trained teacher, whose inference threshold is used)")


def test_a_signed_topk_teacher_is_refused():
    config = small_config(**{"sae.family": "rational", "sae.rational.teacher": "topk",
                             "sae.rational.threshold": 0.0, "sae.topk.abs_select": True,
                             "sae.topk.auxk_coef": 0.0})
    with pytest.raises(ConfigError) as e:
        validate(config, 1)
    assert str(e.value) == ("sae.rational.teacher=topk with sae.topk.abs_select=true keeps signed codes, which a "
                            "gate t * 1[t >= tau] cannot reproduce; upgrade a teacher with "
                            "sae.topk.abs_select=false")
