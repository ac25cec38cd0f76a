"""PAM-SGD (train.algorithm=pam_sgd): config checks, the matrix-free CG decoder solve against a
dense direct solve, sharded == unsharded, the memory plan at n = 2^20, and bit-exact resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import REPO, run_cli, small_config, train_steps
from saejax.algorithms import ALGORITHMS, get_algorithm
from saejax.algorithms.pam_sgd import PamSGD
from saejax.config import active_tree, validate
from saejax.errors import ConfigError, TrainingDivergedError
from saejax.models import FAMILIES, get_family
from saejax.models.topk import TopK
from saejax.sharding import make_mesh
from saejax.trainer import train_and_evaluate

MESHES = [(1, 1), (1, 8), (2, 4), (8, 1)]


def pam_config(**overrides):
    base = {"train.algorithm": "pam_sgd", "train.pam_sgd.block_tokens": 128, "train.pam_sgd.encoder_steps": 2,
            "sae.topk.auxk_coef": 0.0, "train.steps": 6,
            # Solved tightly, so that meshes (whose float32 sums differ in order) agree closely.
            "train.pam_sgd.cg_tol": 1e-6, "train.pam_sgd.cg_max_iters": 500,
            # A block of 128 tokens for 256 latents is underdetermined: a ridge that conditions it.
            "train.pam_sgd.rho": 1e-2}
    return small_config(**{**base, **overrides})


# ---------------------------------------------------------------------------- config


class Curved(TopK):
    """A test family that does not declare a decoder linear in its codes."""

    name = "curved"
    decoder_linear_in_codes = False


def test_a_family_whose_decoder_is_not_linear_is_refused(monkeypatch):
    monkeypatch.setitem(FAMILIES, "curved", Curved)
    config = small_config(**{"sae.family": "curved", "train.algorithm": "pam_sgd",
                             "train.pam_sgd.block_tokens": 128})
    linear = ", ".join(sorted(n for n, f in FAMILIES.items() if f.decoder_linear_in_codes))
    message = ("train.algorithm='pam_sgd' solves the decoder in closed form, which needs a family whose "
               "decoder is linear in its codes (x_hat = z @ W_dec + bias); sae.family='curved' is not. "
               f"Use one of: {linear}, or train.algorithm=adam")
    with pytest.raises(ConfigError) as error:
        validate(config, 1)
    assert str(error.value) == message


@pytest.mark.parametrize("overrides, message", [
    ({"train.pam_sgd.block_tokens": 32}, "train.pam_sgd.block_tokens=32 is smaller than one batch "
     "(data.batch_size=64); set it to a multiple of data.batch_size"),
    ({"train.pam_sgd.block_tokens": 96}, "train.pam_sgd.block_tokens=96 is not a multiple of data.batch_size=64"),
    ({"train.pam_sgd.rho": 0.0}, "train.pam_sgd.rho=0.0 must be > 0 (the ridge keeps the decoder's normal "
     "equations positive definite)"),
    ({"train.pam_sgd.rho": -1e-3}, "train.pam_sgd.rho=-0.001 must be > 0 (the ridge keeps the decoder's "
     "normal equations positive definite)"),
    ({"train.pam_sgd.cg_max_iters": 0}, "train.pam_sgd.cg_max_iters=0 must be >= 1"),
])
def test_bad_pam_values_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(pam_config(**overrides), 1)
    assert str(error.value) == message


def test_algorithm_groups_are_owned_and_only_the_chosen_one_counts():
    config = small_config(**{"train.pam_sgd.rho": 0.5})  # an Adam run setting a PAM key
    with pytest.raises(ConfigError) as error:
        validate(config, 1)
    assert str(error.value) == ("config key 'train.pam_sgd.rho' is set (0.5) but belongs to algorithm 'pam_sgd', "
                                "and train.algorithm='adam'; set train.algorithm=pam_sgd or remove the key")
    # An Adam run's identity does not see the new group (existing hashes unchanged); a PAM run's does.
    assert "pam_sgd" not in active_tree(small_config())["train"]
    assert active_tree(pam_config())["train"]["pam_sgd"]["block_tokens"] == 128


# ---------------------------------------------------------------------------- the decoder solve

N, D, M, BATCH, BLOCK = 64, 8, 4, 32, 4  # latents, d, codes per token, batch, batches per block
RHO, MU = 1e-2, 0.1
UNUSED = 5  # a latent no code of the block touches


def _block_problem(seed=0):
    rng = np.random.default_rng(seed)
    choices = np.array([i for i in range(N) if i != UNUSED])
    indices = np.stack([np.stack([rng.choice(choices, M, replace=False) for _ in range(BATCH)])
                        for _ in range(BLOCK)]).astype(np.int32)
    values = rng.normal(size=(BLOCK, BATCH, M)).astype(np.float32)
    x = rng.normal(size=(BLOCK, BATCH, D)).astype(np.float32) + 0.5
    w_prev = rng.normal(size=(N, D)).astype(np.float32)
    return values, indices, x, w_prev


def _dense_solution(values, indices, x, w_prev):
    """argmin (1/T)||X - Z W - 1 b^T||^2 + rho ||W||^2 + mu ||W - W_prev||^2, by numpy's dense solve."""
    tokens = BLOCK * BATCH
    z = np.zeros((tokens, N))
    rows = np.repeat(np.arange(tokens), M)
    np.add.at(z, (rows, indices.reshape(-1)), values.reshape(-1).astype(np.float64))
    a = np.hstack([z, np.ones((tokens, 1))])  # [Z, 1]: W and b jointly
    ridge = np.diag(np.r_[np.full(N, RHO + MU), 0.0])  # no penalty on b
    lhs = a.T @ a / tokens + ridge
    rhs = a.T @ x.reshape(tokens, D).astype(np.float64) / tokens + np.vstack([MU * w_prev, np.zeros((1, D))])
    solution = np.linalg.solve(lhs, rhs)
    w, b = solution[:N], solution[N]
    w[UNUSED] = w_prev[UNUSED]  # saejax keeps rows the block never used (decoupled from the rest)
    return w, b


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_cg_decoder_step_equals_the_dense_direct_solve(mesh_shape):
    config = pam_config(**{"sae.n": N, "sae.d": D, "data.batch_size": BATCH, "sae.topk.k": M,
                           "train.pam_sgd.block_tokens": BLOCK * BATCH, "train.pam_sgd.rho": RHO,
                           "train.pam_sgd.mu_dec": MU, "train.pam_sgd.cg_tol": 1e-6,
                           "train.pam_sgd.cg_max_iters": 500,
                           "mesh.data": mesh_shape[0], "mesh.model": mesh_shape[1]})
    mesh = make_mesh(*mesh_shape)
    algorithm = get_algorithm(get_family(config), config, mesh)
    values, indices, x, w_prev = _block_problem()

    @jax.jit
    def solve(values, indices, x, w_prev):
        acc = algorithm._zero_acc()
        for j in range(BLOCK):  # one accumulation per streamed batch, as the train step does
            acc = algorithm._accumulate(acc, values[j], indices[j], x[j])
        return algorithm.solve_decoder(acc, values, indices, w_prev)

    w, b, iterations, residual = jax.device_get(solve(values, indices, x, w_prev))
    w_ref, b_ref = _dense_solution(values, indices, x, w_prev)
    assert float(residual) <= 1e-6 and 0 < int(iterations) < 500
    # float32 CG to a relative residual of 1e-6 on a system whose preconditioned condition number is
    # ~10 (rho + mu = 0.11 against code variances ~1): the error is ~1e-5 relative; 1e-4 leaves room
    # for float32 rounding in the accumulated Z^T X, Z^T 1 on 8 devices.
    scale = np.abs(w_ref).max()
    np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(b, b_ref, rtol=0, atol=1e-4 * scale)
    np.testing.assert_array_equal(w[UNUSED], w_prev[UNUSED])


def test_cg_that_does_not_converge_stops_the_run_with_its_residual(tmp_path):
    config = pam_config(**{"train.pam_sgd.cg_max_iters": 1, "train.pam_sgd.cg_tol": 1e-9, "train.steps": 3})
    with pytest.raises(TrainingDivergedError,
                       match=r"pam_sgd: the decoder's conjugate-gradient solve before step 2 did not converge: "
                             r"relative residual \S+ > train\.pam_sgd\.cg_tol=1e-09 after "
                             r"train\.pam_sgd\.cg_max_iters=1 iterations\. Raise cg_max_iters"):
        train_and_evaluate(config, str(tmp_path / "run"))


# ---------------------------------------------------------------------------- every algorithm


def test_pam_sgd_trains_sharded_like_unsharded():
    """Adam's sharded == unsharded is tests/test_families.py's; here a full PAM cycle on 2 x 4."""
    config = pam_config()
    _, single = train_steps(config, (1, 1), 6)
    _, sharded = train_steps(config, (2, 4), 6)
    # Each mesh's CG stops at a relative residual of 1e-6 after its own number of iterations, so the
    # decoders differ by ~1e-6 relative and the steps after agree to float32 rounding (1e-4).
    for step, (a, b) in enumerate(zip(single, sharded)):
        for key in ("loss", "nmse", "l0"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=f"{key} at step {step}")
    # A full cycle: 2 accumulate steps (the 2nd solves), 2 encoder steps, then the next block.
    assert [int(m["phase"]) for m in single] == [0, 1, 2, 2, 0, 1]
    assert single[1]["cg_iterations"] > 0 and single[1]["cg_converged"] == 1.0
    assert single[2]["nmse"] < single[0]["nmse"], "the closed-form decoder improves the fit"


def _state(workdir, step):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta")) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(restored["state"])[0]}


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "elapsed_s")} for r in rows]


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_resumes_bit_identically_inside_a_block(name, tmp_path):
    overrides = {"train.steps": 6, "checkpoint.every_steps": 1, "checkpoint.keep_last": 10, "mesh.model": 2}
    config = pam_config(**overrides) if name == "pam_sgd" else small_config(**overrides)
    reference = str(tmp_path / "reference")
    train_and_evaluate(config, reference)
    workdir = str(tmp_path / "resumed")
    shutil.copytree(reference, workdir)
    for leftover in ("results.json", "cfg.json", "sae.safetensors"):
        os.remove(os.path.join(workdir, leftover))
    for step in range(2, 7):  # as if killed after the save at step 1: inside the first block
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    train_and_evaluate(config, workdir)
    ref_state, state = _state(reference, 6), _state(workdir, 6)
    assert sorted(state) == sorted(ref_state)
    for key in ref_state:
        np.testing.assert_array_equal(state[key], ref_state[key], err_msg=key)
    assert _rows(workdir) == _rows(reference)


# ---------------------------------------------------------------------------- kill during the solve

KILL_ARGS = ["--config", "default", "--config.sae.n=256", "--config.data.batch_size=64",
             "--config.train.steps=12", "--config.train.algorithm=pam_sgd",
             "--config.train.pam_sgd.block_tokens=256", "--config.train.pam_sgd.encoder_steps=2",
             "--config.train.pam_sgd.rho=1e-2",
             "--config.train.log_every=1", "--config.train.eval_batches=1", "--config.eval.at_end=false",
             "--config.checkpoint.every_steps=1", "--config.checkpoint.keep_last=20",
             "--config.checkpoint.async_save=false", "--config.mesh.model=1", "--config.train.progress=false"]
SOLVE_STEP = 9  # cycle of 6 steps (4 accumulate, the 4th solves, 2 encoder): the second block's solve

# Runs `saejax train` with the compiled step wrapped: when the solve step has been dispatched (its CG
# running asynchronously), it writes a marker and waits to be killed. The program itself is unchanged.
KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import saejax.trainer as trainer
    from saejax.cli import run
    real = trainer.compile_train_step
    class Step:  # the compiled step, called as is; the plan still reads its memory analysis
        def __init__(self, compiled):
            self.compiled, self.calls = compiled, 0
        def __getattr__(self, name):
            return getattr(self.compiled, name)
        def __call__(self, state, batch):
            out = self.compiled(state, batch)
            if self.calls == {solve}:
                open({marker!r}, "w").close()
                time.sleep(600)
            self.calls += 1
            return out
    def compile_train_step(*args, **kwargs):
        return Step(real(*args, **kwargs))
    trainer.compile_train_step = compile_train_step
    sys.argv = ["saejax", "train", *{args!r}]
    run()
""")


@pytest.mark.slow
def test_sigkill_during_the_cg_solve_then_resume_is_bit_identical(tmp_path):
    reference = tmp_path / "reference"
    result = run_cli("train", *KILL_ARGS, "--workdir", str(reference))
    assert result.returncode == 0, result.stderr[-3000:]

    workdir, marker = tmp_path / "killed", tmp_path / "in_solve"
    script = KILL_SCRIPT.format(solve=SOLVE_STEP, marker=str(marker),
                                args=[*KILL_ARGS, "--workdir", str(workdir)])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marker.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "the run never reached the solve"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert max(saved) == SOLVE_STEP, "killed with the solve step dispatched, before its save"

    resumed = run_cli("train", *KILL_ARGS, "--workdir", str(workdir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'}/{SOLVE_STEP}" in resumed.stdout
    ref_state, state = _state(str(reference), 12), _state(str(workdir), 12)
    for key in ref_state:
        np.testing.assert_array_equal(state[key], ref_state[key], err_msg=key)
    assert _rows(str(workdir)) == _rows(str(reference))


# ---------------------------------------------------------------------------- the plan at n = 2^20

PLAN_SCRIPT = textwrap.dedent("""
    import json, re, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 64)
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, "tests")
    from helpers import small_config
    from saejax.algorithms import get_algorithm
    from saejax.models import get_family
    from saejax.sharding import make_mesh, named
    B, D, N, K, BLOCK = 8192, 4096, 2**20, 32, 8
    config = small_config(**{"sae.d": D, "sae.n": N, "sae.topk.k": K, "sae.topk.k_aux": 2048,
                             "data.batch_size": B, "train.algorithm": "pam_sgd",
                             "train.pam_sgd.block_tokens": BLOCK * B, "mesh.model": 64, "sae.init_sample_rows": 8})
    mesh = make_mesh(1, 64)
    algorithm = get_algorithm(get_family(config), config, mesh)
    abstract = algorithm.abstract_state(8)
    acc, codes = abstract["acc"], abstract["codes"]
    w = abstract["params"]["W_dec"]
    solve = jax.jit(algorithm.solve_decoder).lower(acc, codes["values"], codes["indices"], w).compile()
    memory = solve.memory_analysis()
    shapes = [tuple(int(x) for x in dims.split(",") if x)
              for dims in re.findall(r"[a-z]+[0-9]*\\[([0-9,]*)\\]", solve.as_text())]
    print(json.dumps({"temp": memory.temp_size_in_bytes, "args": memory.argument_size_in_bytes,
                      "out": memory.output_size_in_bytes, "shapes": sorted(set(shapes))}))
""")


@pytest.mark.slow
def test_decoder_solve_plan_at_a_million_latents_on_64_devices():
    env = {**os.environ}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", PLAN_SCRIPT], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    b, d, n, k, block, devices = 8192, 4096, 2**20, 32, 8, 64
    n_local = n // devices
    dictionary = n_local * d * 4  # one (n/S, d) float32 shard: 256 MiB
    codes = block * b * k * 8  # the block's values and indices (one data group)
    # Inputs: Z^T X, W_prev and the codes; the CG keeps a handful of (n/S, d) iterates.
    assert plan["args"] <= 2 * dictionary + codes + 4 * n_local * 4 + 4 * d
    assert plan["temp"] <= 10 * dictionary + codes, plan["temp"] / dictionary
    big = [s for s in plan["shapes"] if any(x >= n_local for x in s)]
    assert big, "the dictionary shard appears in the program"
    for shape in big:  # nothing latent-sized is paired with tokens or latents: no n x n, no tokens x n
        others = sorted(shape)[:-1]
        assert all(x <= d for x in others), shape


# ---------------------------------------------------------------------------- TopK as the reference's


def _reference_abs_topk_loss(params, x, k):
    """Signed values of the k largest |x @ W_enc + b_enc| (no pre-bias), decoded plus b_pre: by hand."""
    pre = x @ params["W_enc"] + params["b_enc"]
    order = jnp.argsort(-jnp.abs(pre), axis=1)[:, :k]
    rows = jnp.arange(x.shape[0])[:, None]
    z = jnp.zeros_like(pre).at[rows, order].set(pre[rows, order])
    recon = z @ params["W_dec"] + params["b_pre"]
    return jnp.sum((x - recon) ** 2) / jnp.sum((x - x.mean(0)) ** 2), z


@pytest.mark.parametrize("mesh_shape", [(1, 1), (2, 4)])
def test_topk_abs_select_without_pre_bias_equals_the_plain_computation(mesh_shape):
    from saejax.data import make_source
    from saejax.models.base import LossContext

    config = small_config(**{"sae.topk.abs_select": True, "sae.topk.pre_bias": False, "sae.topk.auxk_coef": 0.0,
                             "mesh.data": mesh_shape[0], "mesh.model": mesh_shape[1]})
    validate(config, 8)
    mesh = make_mesh(*mesh_shape)
    family = get_family(config)
    x = jnp.asarray(make_source(config).read(0, 64))
    params = family.init_params(jax.random.PRNGKey(0), x)
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    params = {**params, "b_enc": 0.1 * jax.random.normal(keys[0], (256,)),
              "b_pre": 0.3 * jax.random.normal(keys[1], (16,))}
    ctx = LossContext(step=jnp.zeros((), jnp.int32), dead=jnp.zeros((256,), bool), mesh=mesh)
    (loss, out), grads = jax.jit(jax.value_and_grad(lambda p: family.loss(p, {}, x, ctx), has_aux=True))(params)
    (ref_loss, z), ref_grads = jax.value_and_grad(lambda p: _reference_abs_topk_loss(p, x, 8), has_aux=True)(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for name in params:  # b_pre gets gradient from the output only: it is not subtracted before encoding
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert float(jnp.min(z)) < 0, "signed codes are kept"
    np.testing.assert_array_equal(out.fire_counts, np.sum(np.asarray(z) != 0, axis=0))
    codes = jax.jit(lambda p, b: family.encode(p, b, mesh))(params, x)
    dense = np.zeros((64, 256), np.float32)
    np.put_along_axis(dense, np.asarray(codes.indices), np.asarray(codes.values), axis=1)
    np.testing.assert_allclose(dense, z, rtol=1e-5, atol=1e-6)


def test_topk_reference_options_keep_defaults_and_refuse_auxk():
    assert active_tree(small_config()) == active_tree(small_config(**{"sae.topk.pre_bias": True}))
    assert active_tree(small_config(**{"sae.topk.abs_select": True}))["sae"]["abs_select"] is True
    with pytest.raises(ConfigError) as error:
        validate(small_config(**{"sae.topk.abs_select": True}), 1)
    assert str(error.value) == ("sae.topk.abs_select=true has no AuxK (dead latents have no sign to select by); "
                                "set sae.topk.auxk_coef=0")
