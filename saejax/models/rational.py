"""Rational SAE (Yin & Yu 2026, "Rational Sparse Autoencoders"): a trained SAE's gate made rational.

A wrapper over a teacher family with a scalar gate (relu, jumprelu, topk, batchtopk). The teacher's
parameters, selection and sparsity objective stay; the value of every kept latent becomes

    phi(t) = C_out * P(t / C_in) / Q(t / C_in),   Q(u) = 1 + |sum_{j=1..q} b_j u^j|,

a pole-free ("safe Pade") rational of type (p, q), with t the pre-activation. a (p+1), b (q), C_in,
C_out are four replicated parameters: a handful of scalars per SAE, not per latent.

Choices the paper leaves open (see the README):
* The teacher's ReLU support stays: a latent is on where the teacher keeps it (pre > 0 for ReLU,
  pre > theta for JumpReLU, the top-k / batch top-k for TopK / BatchTopK) and its pre > 0; there it
  takes phi(pre). So the L0 is the teacher's (or lower, where phi is 0), never dense.
* The fitted gate is u * 1[u >= tau / C_in] with tau = sae.rational.threshold (0: the ReLU; a TopK
  teacher must be given one, a BatchTopK one may use its inference threshold).
* Stage 1 runs inside `init_params` (so the trainer, checkpoints and resume are the ordinary ones):
  copy the teacher (sae.rational.init_from, a run or an imported SAE; else the teacher's own init),
  C_in = C_out = the largest kept pre-activation of the first rows of the init sample, a, b the
  minimax fit on [-1, 1] (saejax.models.rational_fit), then `calibration_steps` of Adam on
  (a, b, log C_in, log C_out) for the l2 error of phi against the teacher's gate on those rows'
  kept pre-activations (kept only if it lowers that error).
* Inside the teacher the rational enters through SAEFamily.gate (and JumpReLU.jump for its
  straight-through threshold gradient); TopK's AuxK revival keeps its ReLU.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict

from saejax.errors import ConfigError
from saejax.models.base import ParamSpec, SAEFamily, require
from saejax.models.jumprelu import heaviside
from saejax.models import rational_fit

PREFIX = "sae.rational"
TEACHERS = ("relu", "jumprelu", "topk", "batchtopk")
DEFAULT_DEGREES = {"relu": (3, 2), "jumprelu": (9, 8), "topk": (9, 8), "batchtopk": (9, 8)}
MAX_DEGREE = 16
REFUSED = {
    "prolu": "its gate ReLU(pre) * H(pre - b) has a per-latent bias inside the gate, not one scalar function",
    "gated": "its magnitude and gate paths are two encoders; there is no single scalar gate to replace",
    "matryoshka": "its nested prefix losses are not one of the upgradable objectives (use batchtopk)",
    "rational": "it already has a rational gate",
}
NUM, DEN, C_IN, C_OUT = "rational_a", "rational_b", "rational_c_in", "rational_c_out"
SCALARS = (NUM, DEN, C_IN, C_OUT)
CALIBRATION_ROWS = 256  # rows of the init sample whose pre-activations calibrate the scalars
CALIBRATION_ENTRIES = 2**16  # at most this many (row, latent) entries of them


def _horner(coefficients: jax.Array, u: jax.Array) -> jax.Array:
    acc = jnp.zeros_like(u)
    for i in range(coefficients.shape[0] - 1, -1, -1):
        acc = acc * u + coefficients[i]
    return acc


def rational(t: jax.Array, a: jax.Array, b: jax.Array, c_in: jax.Array, c_out: jax.Array) -> jax.Array:
    """phi(t) = c_out * P(t / c_in) / (1 + |B(t / c_in)|), elementwise."""
    u = t / c_in
    bu = _horner(b, u) * u if b.shape[0] else jnp.zeros_like(u)
    return c_out * _horner(a, u) / (1.0 + jnp.abs(bu))


def rational_gate(params, values: jax.Array) -> jax.Array:
    """The RSAE's value of kept latents: phi(pre) where pre > 0, else 0."""
    phi = rational(values, params[NUM], params[DEN], params[C_IN], params[C_OUT])
    return jnp.where(values > 0, phi, 0.0)


def resolve_degrees(options) -> tuple[int, int]:
    p, q = DEFAULT_DEGREES.get(options.teacher, (3, 2))
    return (p if options.p is None else int(options.p)), (q if options.q is None else int(options.q))


class Rational(SAEFamily):
    name = "rational"
    sparsity_key = "teacher"  # the instance's is the teacher's

    @classmethod
    def defaults(cls):
        g = ml_collections.ConfigDict()
        g.teacher = "jumprelu"  # the family whose gate is replaced: relu, jumprelu, topk, batchtopk
        g.p = config_dict.placeholder(int)  # numerator degree; unset: 3 for relu, 9 otherwise
        g.q = config_dict.placeholder(int)  # denominator degree; unset: 2 for relu, 8 otherwise
        g.threshold = config_dict.placeholder(float)  # tau of the fitted gate t * 1[t >= tau]
        g.init_from = ""  # teacher run directory (sae.safetensors + cfg.json); empty: teacher's init
        g.init_rescale = 1.0  # teacher's normalisation scale / this run's (folded into the weights)
        g.calibration_steps = 200  # Adam steps of the l2 calibration of a, b, C_in, C_out
        g.calibration_lr = 0.01
        return g

    @classmethod
    def check(cls, options, config):
        from saejax.models import FAMILIES

        o = options
        if o.teacher in REFUSED:
            raise ConfigError(f"{PREFIX}.teacher={o.teacher!r} cannot be upgraded: {REFUSED[o.teacher]}; "
                              f"the teachers are: {', '.join(TEACHERS)}")
        require(o.teacher in TEACHERS, f"{PREFIX}.teacher={o.teacher!r} is not a family with a scalar gate; "
                f"the teachers are: {', '.join(TEACHERS)}")
        p, q = resolve_degrees(o)
        require(1 <= p <= MAX_DEGREE, f"{PREFIX}.p={p} must be between 1 and {MAX_DEGREE} (numerator degree)")
        require(0 <= q <= MAX_DEGREE, f"{PREFIX}.q={q} must be between 0 and {MAX_DEGREE} (denominator degree)")
        if o.threshold is not None:
            require(o.threshold >= 0 and math.isfinite(o.threshold),
                    f"{PREFIX}.threshold={o.threshold} must be a finite number >= 0")
        elif o.teacher == "topk":
            raise ConfigError(f"{PREFIX}.threshold is unset and a topk teacher has no threshold of its own: "
                              f"set {PREFIX}.threshold=TAU, the separating threshold of the fitted gate "
                              "t * 1[t >= TAU] on the selected values (0 keeps the teacher's ReLU)")
        elif o.teacher == "batchtopk" and not o.init_from:
            raise ConfigError(f"{PREFIX}.threshold is unset and a batchtopk teacher initialised afresh has no "
                              f"threshold yet: set {PREFIX}.threshold=TAU, or {PREFIX}.init_from=RUN_DIR "
                              "(a trained teacher, whose inference threshold is used)")
        require(o.init_rescale > 0 and math.isfinite(o.init_rescale),
                f"{PREFIX}.init_rescale={o.init_rescale} must be a finite number > 0")
        require(o.calibration_steps >= 0, f"{PREFIX}.calibration_steps={o.calibration_steps} must be >= 0")
        require(o.calibration_lr > 0, f"{PREFIX}.calibration_lr={o.calibration_lr} must be > 0")
        require(not (o.teacher == "topk" and config.sae.topk.abs_select),
                f"{PREFIX}.teacher=topk with sae.topk.abs_select=true keeps signed codes, which a gate "
                "t * 1[t >= tau] cannot reproduce; upgrade a teacher with sae.topk.abs_select=false")
        FAMILIES[o.teacher].check(config.sae[o.teacher], config)

    @classmethod
    def inner_families(cls, options):
        return (options["teacher"],)

    def __init__(self, config):
        from saejax.models import FAMILIES

        super().__init__(config)
        o = self.options
        teacher_config = config.copy_and_resolve_references()
        with teacher_config.unlocked():
            teacher_config.sae.family = o.teacher
        self.teacher = FAMILIES[o.teacher](teacher_config)
        self.sparsity_key, self.has_k = self.teacher.sparsity_key, self.teacher.has_k
        self.p, self.q = resolve_degrees(o)
        self.threshold = None if o.threshold is None else float(o.threshold)
        self.init_from = str(o.init_from)
        self.init_rescale = float(o.init_rescale)
        self.calibration_steps, self.calibration_lr = int(o.calibration_steps), float(o.calibration_lr)
        self.bias = "b_dec" if o.teacher == "jumprelu" else "b_pre"

    def sparsity_control(self):
        return self.teacher.sparsity_control()

    def describe(self):
        return f"rational ({self.p}, {self.q}) over {self.teacher.describe()}"

    def default_learning_rate(self):
        return self.teacher.default_learning_rate()

    # ------------------------------------------------------------------ parameters and state

    def _scalar_specs(self):
        return {
            NUM: ParamSpec((self.p + 1,), (None,), "numerator coefficients a_0..a_p"),
            DEN: ParamSpec((self.q,), (None,), "denominator coefficients b_1..b_q"),
            C_IN: ParamSpec((), (), "input scale: u = pre / C_in"),
            C_OUT: ParamSpec((), (), "output scale: phi = C_out * P(u) / Q(u)"),
        }

    def param_specs(self):
        return {**self.teacher.param_specs(), **self._scalar_specs()}

    def state_specs(self):
        return self.teacher.state_specs()

    def init_params(self, rng, sample):
        if self.init_from:
            params, state = self._loaded_teacher()
            params = {name: jnp.asarray(value) for name, value in params.items()}
            state = {name: jnp.asarray(value) for name, value in state.items()}
        else:
            params = self.teacher.init_params(rng, sample)
            state = self.teacher.init_state(params, sample)
        return {**params, **self.stage_one(params, state, sample)}

    def init_state(self, params, sample):
        state = self.teacher.init_state(params, sample)
        if self.init_from:
            state = {**state, **{k: jnp.asarray(v) for k, v in self._loaded_teacher()[1].items()}}
        return state

    @functools.cached_property
    def _teacher_files(self):
        """(tensors, cfg) of the teacher export in init_from, checked against this config."""
        from safetensors.numpy import load_file

        from saejax.export import CONFIG_FILE, WEIGHTS_FILE

        directory = self.init_from
        paths = [os.path.join(directory, name) for name in (CONFIG_FILE, WEIGHTS_FILE)]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise ConfigError(f"{PREFIX}.init_from={directory}: no exported SAE there (missing "
                              f"{', '.join(os.path.basename(p) for p in missing)}); give a finished run or "
                              "an imported SAE (`saejax import`)")
        with open(paths[0]) as f:
            cfg = json.load(f)
        teacher = self.teacher.name
        if cfg.get("family") != teacher:
            raise ConfigError(f"{PREFIX}.init_from={directory} holds a {cfg.get('family')!r} SAE, but "
                              f"{PREFIX}.teacher={teacher!r}")
        if (int(cfg["d"]), int(cfg["n"])) != (self.d, self.n):
            raise ConfigError(f"{PREFIX}.init_from={directory} has d={cfg['d']} n={cfg['n']}, but sae.d={self.d} "
                              f"sae.n={self.n}")
        return load_file(paths[1]), cfg

    def _loaded_teacher(self):
        """The teacher's parameters and state from its export (numpy), in this run's units."""
        tensors, _ = self._teacher_files
        tensors = dict(tensors)
        state = {}
        if self.teacher.name == "jumprelu" and "threshold" in tensors:
            threshold = tensors.pop("threshold").astype(np.float32)
            if not np.all(threshold > 0):
                raise ConfigError(f"{PREFIX}.init_from={self.init_from}: the jumprelu thresholds must be > 0 "
                                  "(they are trained as log_threshold)")
            tensors["log_threshold"] = np.log(threshold)
        for name in self.teacher.state_specs():
            if name in tensors:
                state[name] = tensors.pop(name)
        specs = self.teacher.param_specs()
        missing = sorted(set(specs) - set(tensors))
        if missing:
            raise ConfigError(f"{PREFIX}.init_from={self.init_from}: sae.safetensors lacks {', '.join(missing)} "
                              f"of a {self.teacher.name} SAE")
        params = {name: np.asarray(tensors[name], np.float32) for name in specs}
        for name, spec in specs.items():
            if params[name].shape != spec.shape:
                raise ConfigError(f"{PREFIX}.init_from={self.init_from}: {name} has shape {params[name].shape}, "
                                  f"expected {spec.shape}")
        # x_teacher = r * x_here: fold r into the encoder and the centre; 1/r goes into C_out.
        r = np.float32(self.init_rescale)
        params["W_enc"] = params["W_enc"] * r
        params[self.bias] = params[self.bias] / r
        return params, state

    # ------------------------------------------------------------------ stage 1

    def _kept(self, params, state, pre):
        """(R, n) bool: the latents the teacher keeps on these rows (its own selection)."""
        name = self.teacher.name
        if name == "relu":
            return pre > 0
        if name == "jumprelu":
            return pre > jnp.exp(params["log_threshold"])
        if name == "topk":
            return pre >= jax.lax.top_k(pre, self.teacher.k)[0][:, -1:]
        threshold = state["threshold"]  # batchtopk: the inference threshold once estimated
        batch_tau = jnp.sort(pre.reshape(-1))[-min(pre.size, self.teacher.k * pre.shape[0])]
        return jnp.where(jnp.all(jnp.isfinite(threshold)), pre > threshold, pre >= batch_tau)

    def gate_threshold(self, state) -> float:
        """tau of the fitted gate: sae.rational.threshold, else a BatchTopK teacher's own."""
        if self.threshold is not None:
            return self.threshold
        if self.teacher.name == "batchtopk" and self.init_from:
            threshold = np.asarray(self._loaded_teacher()[1].get("threshold", np.inf))
            finite = threshold[np.isfinite(threshold)]
            if finite.size:
                return float(np.median(finite))
            raise ConfigError(f"{PREFIX}.init_from={self.init_from}: the batchtopk teacher's threshold was never "
                              f"estimated (it is inf); set {PREFIX}.threshold=TAU")
        return 0.0

    def stage_one(self, params, state, sample):
        """a, b, C_in, C_out for these teacher parameters (traceable: runs under the trainer's jit)."""
        tau = self.gate_threshold(state)
        x = sample[:CALIBRATION_ROWS]
        pre = (x - params[self.bias]) @ params["W_enc"] + params["b_enc"]
        kept = self._kept(params, state, pre)
        stride = max(1, pre.size // CALIBRATION_ENTRIES)
        t, w = pre.reshape(-1)[::stride], kept.reshape(-1)[::stride].astype(jnp.float32)
        target = jnp.where(t >= tau, jax.nn.relu(t), 0.0)
        c_in = jnp.maximum(jnp.max(jnp.where(w > 0, jnp.abs(t), 0.0)), 1e-6)
        a, b = self._fitted(tau, c_in)

        def l2(theta):
            a, b, log_in, log_out = theta
            phi = rational_gate({NUM: a, DEN: b, C_IN: jnp.exp(log_in), C_OUT: jnp.exp(log_out)}, t)
            return jnp.sum(w * jnp.square(phi - target)) / jnp.maximum(jnp.sum(w), 1.0)

        theta0 = (a, b, jnp.log(c_in), jnp.log(c_in))
        theta = adam(l2, theta0, self.calibration_steps, self.calibration_lr)
        theta = jax.tree.map(lambda new, old: jnp.where(l2(theta) < l2(theta0), new, old), theta, theta0)
        a, b, log_in, log_out = theta
        return {NUM: a, DEN: b, C_IN: jnp.exp(log_in),
                C_OUT: jnp.exp(log_out) / jnp.float32(self.init_rescale if self.init_from else 1.0)}

    def _fitted(self, tau: float, c_in: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The minimax fit of u * 1[u >= tau / C_in]: constants when tau = 0, else a host callback."""
        p, q = self.p, self.q

        def host(tau_u):
            fit = rational_fit.fit_gate(p, q, round(float(tau_u), 4))
            return fit.a.astype(np.float32), fit.b.astype(np.float32)

        if tau == 0:
            a, b = host(0.0)
            return jnp.asarray(a), jnp.asarray(b)
        shapes = (jax.ShapeDtypeStruct((p + 1,), jnp.float32), jax.ShapeDtypeStruct((q,), jnp.float32))
        return jax.pure_callback(host, shapes, jnp.minimum(tau / c_in, 1.0))

    # ------------------------------------------------------------------ training

    def _gated(self, params):
        """The teacher with the rational gate of these parameters (a shallow copy; no state kept)."""
        teacher = copy.copy(self.teacher)
        teacher.gate = functools.partial(rational_gate, params)
        if teacher.name == "jumprelu":
            bandwidth = teacher.bandwidth
            teacher.jump = lambda pre, threshold: teacher.gate(pre) * heaviside(pre, threshold, bandwidth)
        return teacher

    def loss(self, params, state, batch, ctx):
        return self._gated(params).loss(params, state, batch, ctx)

    def project_gradients(self, grads, params):
        return self.teacher.project_gradients(grads, params)

    def apply_constraints(self, params):
        return self.teacher.apply_constraints(params)

    def flops_per_step(self, batch_size):
        gated = self.teacher.k if self.has_k else self.n  # entries the rational is evaluated on
        return self.teacher.flops_per_step(batch_size) + float(batch_size * gated * 6 * (self.p + self.q + 3))

    # ------------------------------------------------------------------ inference and export

    def inference_params(self, params, state):
        return {**self.teacher.inference_params(params, state), **{k: params[k] for k in SCALARS}}

    def inference_specs(self):
        return {**self.teacher.inference_specs(), **self._scalar_specs()}

    def encode(self, params, x, mesh):
        # Jitted: concrete scalars closed over by the teacher's shard_map must be traced values.
        return self._jitted_encode(params, x, mesh)

    @functools.cached_property
    def _jitted_encode(self):
        return jax.jit(lambda params, x, mesh: self._gated(params).encode(params, x, mesh), static_argnums=2)

    def decode(self, params, codes, mesh):
        return self.teacher.decode(params, codes, mesh)

    def dictionary(self, params):
        return self.teacher.dictionary(params)

    def activation(self):
        return {"kind": "rational", "p": self.p, "q": self.q, "teacher": self.teacher.activation(),
                "encode": f"z = {C_OUT} * P(pre / {C_IN}) / (1 + |B(pre / {C_IN})|) on the teacher's kept "
                          f"latents with pre > 0, else 0; P = sum {NUM}[i] u^i, B = sum {DEN}[j-1] u^j"}

    def export(self, params):
        tensors, cfg = super().export(params)
        cfg["options_of"] = {self.teacher.name: self.teacher.options.to_dict()}
        return tensors, cfg


def adam(loss, theta, steps: int, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """`steps` Adam steps on a pytree (plain, traceable; the calibration's optimiser)."""
    if steps == 0:
        return theta
    grad = jax.grad(loss)
    zeros = jax.tree.map(jnp.zeros_like, theta)

    def body(i, carry):
        theta, m, v = carry
        g = grad(theta)
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        t = (i + 1).astype(jnp.float32)
        step = lambda m, v: lr * (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps)  # noqa: E731
        return jax.tree.map(lambda p, m, v: p - step(m, v), theta, m, v), m, v

    theta, _, _ = jax.lax.fori_loop(0, steps, body, (theta, zeros, zeros))
    return theta
