"""Matryoshka BatchTopK: prefix reconstructions by global latent index on every mesh, configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import small_config
from references import matryoshka as ref
from saejax.config import validate
from saejax.data import make_source
from saejax.errors import ConfigError
from saejax.models import get_family
from saejax.models.base import LossContext
from saejax.sharding import make_mesh, named


def config(**overrides):
    return small_config(**{**ref.OVERRIDES, **overrides})


@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4)])
def test_each_prefix_reconstructs_from_its_own_latents(mesh_shape):
    cfg = config(**{"sae.matryoshka.auxk_coef": 0.0})
    mesh, family = make_mesh(*mesh_shape), get_family(cfg)
    x = jnp.asarray(make_source(cfg).read(0, cfg.data.batch_size))
    params = family.init_params(jax.random.PRNGKey(0), x)
    placed = {name: jax.device_put(params[name], named(mesh, s.axes))
              for name, s in family.param_specs().items()}
    ctx = LossContext(step=jnp.asarray(0, jnp.int32), dead=jnp.zeros(family.n, bool), mesh=mesh)
    _, out = jax.jit(lambda p: family.loss(p, family.init_state(p, x), x, ctx))(placed)
    pre = (x - params["b_pre"]) @ params["W_enc"] + params["b_enc"]
    z = ref.batch_codes(pre, family.k)
    for m in family.prefixes:
        recon = z[:, :m] @ params["W_dec"][:m] + params["b_pre"]
        expected = jnp.sum((x - recon) ** 2) / jnp.sum((x - x.mean(0)) ** 2)
        np.testing.assert_allclose(out.metrics[f"nmse_prefix_{m}"], expected, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["nmse"], out.metrics["nmse_prefix_256"])


def test_default_prefixes_are_derived_from_n():
    assert get_family(config(**{"sae.matryoshka.prefixes": ""})).prefixes == (4, 16, 64, 256)
    wide = get_family(config(**{"sae.n": 1024, "sae.matryoshka.prefixes": ""}))
    assert wide.prefixes == (16, 64, 256, 1024)


def test_inference_and_export_are_batchtopk_s():
    family = get_family(config())
    activation = family.activation()
    assert activation["kind"] == "jumprelu" and activation["trained_as"] == "matryoshka"
    assert family.sparsity_control() == {"name": "k", "value": 8, "is_k": True}
    assert "threshold" in family.inference_specs()


@pytest.mark.parametrize("prefixes,message", [
    ("10,50,100", r"Matryoshka prefixes that do not end at n: sae.matryoshka.prefixes='10,50,100' "
                  r"must end at sae.n=256"),
    ("10,300,256", r"sae.matryoshka.prefixes='10,300,256' must be strictly increasing"),
    ("50,50,256", r"sae.matryoshka.prefixes='50,50,256' must be strictly increasing"),
    ("0,64,256", r"sae.matryoshka.prefixes='0,64,256' must be positive"),
    ("-4,64,256", r"sae.matryoshka.prefixes='-4,64,256' must be positive"),
    ("64,all", r"sae.matryoshka.prefixes='64,all' must be comma-separated integers"),
])
def test_bad_prefixes_are_refused_with_a_clear_message(prefixes, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        validate(config(**{"sae.matryoshka.prefixes": prefixes}), 1)


def test_batchtopk_checks_apply():
    with pytest.raises(ConfigError, match=r"^sae.matryoshka.k=0 must be between 1 and sae.n=256$"):
        validate(config(**{"sae.matryoshka.k": 0}), 1)
