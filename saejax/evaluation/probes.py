"""Probe loss (Gao et al. 2024, sec. 4.2): how well the best single latent predicts a binary task.

Tasks are built from what a held-out context records (its token ids and
positions, and through the tokenizer the token strings): digit, capitalised,
Python keyword, punctuation, word start, early position, after a full stop,
inside parentheses, repeated token, line start. For each task a 1-D logistic
probe `sigmoid(a * z_j + b)` is fitted to every latent j on the tokens of
the even contexts (ridge `l2` on a), the latent with the lowest fitted
cross-entropy is chosen, and its probe is scored on the odd contexts: that
held-out cross-entropy (nats) is the task's probe loss; `probe_loss` is the
mean over tasks. A task is left out (with a note) when either half has fewer
than `min_positives` positives or negatives. `prior_loss` is the held-out
cross-entropy of predicting the fit half's base rate, for scale.

The fit is exact for every latent at once and sparse: a latent's code is 0
on most tokens, and those tokens enter the Newton steps only through their
counts, so the cost is O(non-zero codes), not O(tokens x latents).
"""

from __future__ import annotations

import keyword
import string
from typing import Any, Callable

import numpy as np

from saejax.evaluation.base import Evaluator

_PUNCTUATION = set(string.punctuation)
_KEYWORDS = set(keyword.kwlist)


def token_texts(tokenizer, ids: np.ndarray) -> dict[int, tuple[str, str]]:
    """{id: (vocabulary piece, decoded text)} for the distinct ids."""
    unique = [int(i) for i in np.unique(ids)]
    pieces = tokenizer.convert_ids_to_tokens(unique)
    return {i: (str(piece), tokenizer.decode([i])) for i, piece in zip(unique, pieces, strict=True)}


def starts_word(piece: str, text: str, wordpiece: bool) -> bool:
    """Whether a token begins a word: WordPiece marks continuations (##), BPE/SentencePiece starts."""
    if wordpiece:
        return not piece.startswith("##")
    return piece.startswith(("Ġ", "▁", "Ċ")) or text[:1].isspace()


def context_labels(ids: np.ndarray, texts: dict[int, tuple[str, str]]) -> dict[str, np.ndarray]:
    """Per-position labels of every context (contexts, positions) that need the tokens before it."""
    contexts, length = ids.shape
    after_stop = np.zeros(ids.shape, bool)
    in_parens = np.zeros(ids.shape, bool)
    repeated = np.zeros(ids.shape, bool)
    line_start = np.zeros(ids.shape, bool)
    for c in range(contexts):
        depth, seen = 0, set()
        for p in range(length):
            token = int(ids[c, p])
            if p:
                previous = texts[int(ids[c, p - 1])][1]
                after_stop[c, p] = previous.strip().endswith(".")
                line_start[c, p] = "\n" in previous
            in_parens[c, p] = depth > 0
            repeated[c, p] = token in seen
            seen.add(token)
            text = texts[token][1]
            depth = max(0, depth + text.count("(") - text.count(")"))
    return {"after_full_stop": after_stop, "inside_parentheses": in_parens, "repeated_token": repeated,
            "line_start": line_start}


TOKEN_TASKS: dict[str, Callable[[str, str], bool]] = {
    "digit": lambda piece, text: text.strip().isdigit(),
    "capitalised": lambda piece, text: text.strip()[:1].isupper(),
    "python_keyword": lambda piece, text: text.strip() in _KEYWORDS,
    "punctuation": lambda piece, text: bool(text.strip()) and set(text.strip()) <= _PUNCTUATION,
}
EARLY_POSITION = 8


def task_labels(held, tokenizer) -> dict[str, np.ndarray]:
    """bool (tokens,) per task, over the held-out contexts' kept tokens."""
    texts = token_texts(tokenizer, held.ids)
    labels = {name: np.asarray([rule(*texts[int(t)]) for t in held.token_ids], bool)
              for name, rule in TOKEN_TASKS.items()}
    wordpiece = any(piece.startswith("##") for piece, _ in texts.values())
    labels["word_start"] = np.asarray([starts_word(*texts[int(t)], wordpiece) for t in held.token_ids], bool)
    labels["early_position"] = held.positions < EARLY_POSITION
    for name, grid in context_labels(held.ids, texts).items():
        labels[name] = grid[held.context_rows, held.positions]
    return labels


# --------------------------------------------------------------------------- the probe fit


def _log_loss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def _sigmoid(t):
    return 0.5 * (1.0 + np.tanh(0.5 * t))


def fit_probes(token: np.ndarray, latent: np.ndarray, value: np.ndarray, y: np.ndarray, n: int,
               l2: float = 1e-4, iterations: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every latent's 1-D logistic probe on sparse codes, exactly, by Newton's method.

    Codes are the non-zeros (token, latent, value); every other code is 0.
    Minimises mean_t CE(sigmoid(a_j z_tj + b_j), y_t) + l2/2 a_j^2 for each
    j; returns (a, b, loss) of shape (n,).
    """
    y = np.asarray(y, np.float64)
    tokens = y.shape[0]
    value = np.asarray(value, np.float64)
    label = y[token]
    nonzero = np.bincount(latent, minlength=n).astype(np.float64)
    positives_nonzero = np.bincount(latent, weights=label, minlength=n)
    zero_pos = y.sum() - positives_nonzero  # positives among the tokens where latent j is 0
    zero_all = tokens - nonzero
    scale = np.maximum(np.bincount(latent, weights=np.abs(value), minlength=n) / np.maximum(nonzero, 1), 1e-12)
    v = value / scale[latent]  # conditioned: a_j is fitted on z / mean|z|, then scaled back
    prior = np.clip(y.mean(), 1e-12, 1 - 1e-12)
    a, b = np.zeros(n), np.full(n, np.log(prior / (1 - prior)))
    ridge = l2 * tokens / scale**2  # l2/2 a^2 on the unscaled a, in summed (not mean) units

    def loss_of(a, b):
        p_nz = _sigmoid(a[latent] * v + b[latent])
        nz = np.bincount(latent, weights=_log_loss(p_nz, label), minlength=n)
        p0 = _sigmoid(b)
        zero = zero_pos * -np.log(np.clip(p0, 1e-12, None)) + (zero_all - zero_pos) * -np.log(np.clip(1 - p0, 1e-12, None))
        return (nz + zero + 0.5 * ridge * a**2) / tokens

    loss = loss_of(a, b)
    for _ in range(iterations):
        p_nz = _sigmoid(a[latent] * v + b[latent])
        r, w = p_nz - label, p_nz * (1 - p_nz)
        p0 = _sigmoid(b)
        g_a = np.bincount(latent, weights=r * v, minlength=n) + ridge * a
        g_b = np.bincount(latent, weights=r, minlength=n) + p0 * zero_all - zero_pos
        h_aa = np.bincount(latent, weights=w * v * v, minlength=n) + ridge + 1e-12
        h_ab = np.bincount(latent, weights=w * v, minlength=n)
        h_bb = np.bincount(latent, weights=w, minlength=n) + p0 * (1 - p0) * zero_all + 1e-12
        det = h_aa * h_bb - h_ab**2
        det = np.where(det > 1e-18, det, 1e-18)
        step_a = (h_bb * g_a - h_ab * g_b) / det
        step_b = (h_aa * g_b - h_ab * g_a) / det
        t = np.ones(n)  # backtracking per latent: a Newton step that does not lower the loss is halved
        for _ in range(20):
            trial = loss_of(a - t * step_a, b - t * step_b)
            worse = trial > loss + 1e-15
            if not worse.any():
                break
            t = np.where(worse, t * 0.5, t)
        trial = loss_of(a - t * step_a, b - t * step_b)
        better = trial <= loss
        a, b = np.where(better, a - t * step_a, a), np.where(better, b - t * step_b, b)
        change = np.max(loss - np.where(better, trial, loss))
        loss = np.where(better, trial, loss)
        if change < 1e-12:
            break
    fitted = loss - 0.5 * ridge * a**2 / tokens
    return a / scale, b, fitted


def sparse_codes(sae, rows: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-zero codes of raw rows through the SAE's encode: (token, latent, value) arrays."""
    from saejax.models.base import DenseCodes

    tokens, latents, values = [], [], []
    for start in range(0, rows.shape[0], batch):
        codes = sae.encode(rows[start:start + batch])
        vals = np.asarray(codes.values)
        if isinstance(codes, DenseCodes):
            t, j = np.nonzero(vals)
            v = vals[t, j]
        else:
            t, slot = np.nonzero(vals)
            j, v = np.asarray(codes.indices)[t, slot], vals[t, slot]
        tokens.append(t + start)
        latents.append(j)
        values.append(v)
    return np.concatenate(tokens), np.concatenate(latents).astype(np.int64), np.concatenate(values)


def probe_task(codes, y: np.ndarray, fit: np.ndarray, n: int, l2: float) -> dict[str, Any]:
    """Fit on tokens where `fit`, choose the best latent, score it on the others."""
    token, latent, value = codes
    index = np.cumsum(fit) - 1
    on_fit = fit[token]
    a, b, fitted = fit_probes(index[token[on_fit]], latent[on_fit], value[on_fit], y[fit], n, l2)
    best = int(np.argmin(fitted))
    held = ~fit
    z = np.zeros(held.size)
    chosen = (latent == best)
    z[token[chosen]] = value[chosen]
    p = _sigmoid(a[best] * z[held] + b[best])
    prior = np.clip(y[fit].mean(), 1e-12, 1 - 1e-12)
    return {"latent": best, "probe_loss": float(_log_loss(p, y[held]).mean()), "fit_loss": float(fitted[best]),
            "prior_loss": float(_log_loss(np.full(held.sum(), prior), y[held]).mean()),
            "positives": int(y.sum()), "coefficients": [float(a[best]), float(b[best])]}


class Probes(Evaluator):
    name = "probes"
    description = "best single latent's 1-D logistic probe cross-entropy on binary token tasks"
    needs_model = True

    @classmethod
    def defaults(cls):
        return {"min_positives": 8, "l2": 1e-4}

    @classmethod
    def check(cls, options, config):
        problems = []
        if options.min_positives < 1:
            problems.append(f"eval.probes.min_positives={options.min_positives} must be >= 1")
        if options.l2 < 0:
            problems.append(f"eval.probes.l2={options.l2} must be >= 0")
        return problems

    def run(self, inputs, options) -> dict[str, Any]:
        held = inputs.contexts(int(inputs.config.eval.contexts))
        labels = task_labels(held, inputs.tokenizer)
        codes = sparse_codes(inputs.sae, held.rows)
        fit = held.split()
        tasks, skipped = {}, {}
        for name, y in labels.items():
            counts = [int(y[fit].sum()), int((~y[fit]).sum()), int(y[~fit].sum()), int((~y[~fit]).sum())]
            if min(counts) < int(options.min_positives):
                skipped[name] = (f"too few examples (fit half: {counts[0]} positive / {counts[1]} negative, "
                                 f"held-out half: {counts[2]} / {counts[3]}; need {options.min_positives})")
                continue
            tasks[name] = probe_task(codes, y.astype(np.float64), fit, inputs.sae.n, float(options.l2))
        if not tasks:
            return {"tasks": {}, "skipped_tasks": skipped, "probe_loss": None}
        return {"tasks": tasks, "skipped_tasks": skipped,
                "probe_loss": float(np.mean([t["probe_loss"] for t in tasks.values()])),
                "prior_loss": float(np.mean([t["prior_loss"] for t in tasks.values()])),
                "tokens": int(held.token_ids.size)}

    def headline(self, figures):
        return {"probe_loss": figures["probe_loss"]}
