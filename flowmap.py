"""Flow-map self-distillation in one NumPy file.

A flow map X_{s,t}(x) jumps a point along the probability flow from time s to time t, so a
sampler needs 1 to 16 network calls instead of hundreds of ODE steps. Following Boffi, Albergo
and Vanden-Eijnden, "How to build a consistency model: learning flow maps via self-distillation"
(arXiv:2505.18825), we parameterize

    X_{s,t}(x) = x + (t - s) v(x, s, t),

train the diagonal v(x, t, t) by ordinary flow matching on the interpolant
I_t = (1 - t) x0 + t x1 (x0 noise at t = 0, x1 data at t = 1), and let the model distil itself
off the diagonal (s < t) with one of three conditions, the teacher being the model's own
weights frozen for the step (sg = stop-gradient):

    LSD (Lagrangian)   | d/dt X_{s,t}(I_s) - sg( v( sg(X_{s,t}(I_s)), t, t ) ) |^2
    ESD (Eulerian)     | d/ds X_{s,t}(I_s) + sg( grad_x X_{s,t}(I_s) . v(I_s, s, s) ) |^2
    PSD (progressive)  | v(I_s, s, t) - sg( X_{u,t}(X_{s,u}(I_s)) - I_s ) / (t - s) |^2,
                       u = (s + t) / 2 (psd-mid) or u ~ U[s, t] (psd-uni)

Everything is written by hand: an MLP with paired forward/backward passes, forward-mode dual
numbers for the time (and space) derivatives, the backward pass through those tangents, Adam,
the checkerboard data, multi-step sampling and the histogram KL of EVAL.md.

Run it:
    pip install -r requirements.txt
    python flowmap.py --method lsd          # train, print KL at 1..16 steps, write plots/
    python flowmap.py --help                # every flag
    python -m pytest -q                     # gradient checks and the rest

Left out on purpose: GPUs, autodiff frameworks, images (the method is shown in 2D, where the
target density is known exactly), and the 125,000-step recipe of the official code.

Shapes: B = batch rows, N = primal rows, M = tangent rows (paired with the LAST M primal rows),
F = input features, H = hidden width, D = 2 (the data dimension).
"""

import argparse
import json
import math
import os
import signal
import sys
import threading
import time

import numpy as np

# ---------------------------------------------------------------- configuration

DATA_STD = math.sqrt(4.0 / 3.0)  # per-axis std of the checkerboard (EVAL.md)
METHODS = ("fm", "lsd", "esd", "psd-mid", "psd-uni")
EVAL_STEPS = (1, 2, 4, 8, 16)

DEFAULTS = dict(
    method="lsd",         # fm (flow matching only) | lsd | esd | psd-mid | psd-uni
    iters=6000,           # optimizer steps
    batch=1024,           # rows per step, split diagonal / off-diagonal
    diag_fraction=0.75,   # share of each batch on the diagonal s = t
    off_weight=4.0,       # weight of the off-diagonal (distillation) loss
    hidden=128,           # hidden width H
    depth=3,              # hidden layers
    fourier=32,           # random Fourier features of x (sin and cos each)
    fourier_scale=1.0,    # std of their frequencies, in cycles per unit of x
    time_freqs=6,         # sin/cos features of s and t at pi * (1..K)
    lr=2e-3,              # peak Adam learning rate
    lr_final=0.02,        # final learning rate as a fraction of the peak (cosine decay)
    warmup=200,           # linear learning-rate warm-up steps
    clip=10.0,            # global gradient-norm clip
    ema=0.999,            # EMA decay of the sampling weights
    base_std=DATA_STD,    # std of the base Gaussian: scaled to the data
    seed=0,
)

# ---------------------------------------------------------------- MLP layers (dual rows)
# Every layer works on a stacked array: N primal rows, then M tangent rows that carry the
# forward-mode derivative (`_dot`) of the last M primal rows. Rows that share weights share one
# matrix multiply, and the backward pass is the adjoint of both the value and its tangent.


def linear_forward(a, w, b, n):
    """z = a w + b on the n primal rows, z_dot = a_dot w on the tangent rows.

    a: (N+M, I), w: (I, O), b: (O,) -> z: (N+M, O)
    """
    z = a @ w                    # (N+M, O) primal and tangent rows in one product
    z[:n] += b                   # a tangent has no bias: d/dt of a constant is 0
    return z, (a, w, n)


def linear_backward(dz, cache, need_da=True):
    """dz: (N+M, O) -> da: (N+M, I) or None, dw: (I, O), db: (O,)."""
    a, w, n = cache
    dw = a.T @ dz                # both row kinds flow into the weight gradient
    db = dz[:n].sum(axis=0)      # only primal rows carried the bias
    da = dz @ w.T if need_da else None
    return da, dw, db


def silu_forward(z, n):
    """h = z sigmoid(z) on primal rows; h_dot = silu'(z) z_dot on tangent rows.

    z: (N+M, H) -> h: (N+M, H)
    """
    m = len(z) - n
    zp = z[:n]
    sig = 1.0 / (1.0 + np.exp(-zp))                     # (N, H)
    d1 = sig * (1.0 + zp * (1.0 - sig))                 # (N, H) silu'(z)
    h = np.empty_like(z)
    np.multiply(zp, sig, out=h[:n])
    np.multiply(d1[n - m:], z[n:], out=h[n:])           # chain rule for the tangent
    return h, (z, sig, d1, n)


def silu_backward(dh, cache):
    """dh: (N+M, H) -> dz: (N+M, H).

    h = silu(z) gives dz = dh silu'(z); h_dot = silu'(z) z_dot adds
    dz += dh_dot silu''(z) z_dot to the paired primal rows and dz_dot = dh_dot silu'(z).
    """
    z, sig, d1, n = cache
    m = len(z) - n
    dz = np.empty_like(dh)
    np.multiply(dh[:n], d1, out=dz[:n])
    if m:
        zp, sp = z[n - m:n], sig[n - m:]
        d2 = sp * (1.0 - sp) * (2.0 + zp * (1.0 - 2.0 * sp))   # (M, H) silu''(z)
        dz[n - m:n] += dh[n:] * d2 * z[n:]
        np.multiply(dh[n:], d1[n - m:], out=dz[n:])
    return dz


def mlp_forward(params, a, n):
    """The network: `depth` (linear, SiLU) pairs, then a linear read-out.

    a: (N+M, F) features and their tangents -> out: (N+M, D)
    """
    depth = num_hidden(params)
    caches = []
    h = a
    for i in range(depth):
        z, lin = linear_forward(h, params[f"W{i}"], params[f"b{i}"], n)
        h, act = silu_forward(z, n)
        caches.append((lin, act))
    out, lin = linear_forward(h, params[f"W{depth}"], params[f"b{depth}"], n)
    caches.append((lin, None))
    return out, caches


def mlp_backward(dout, caches):
    """dout: (N+M, D) -> grads, a dict like params (input features need no gradient)."""
    grads = {}
    depth = len(caches) - 1
    dh, grads[f"W{depth}"], grads[f"b{depth}"] = linear_backward(dout, caches[depth][0])
    for i in reversed(range(depth)):
        lin, act = caches[i]
        dz = silu_backward(dh, act)
        dh, grads[f"W{i}"], grads[f"b{i}"] = linear_backward(dz, lin, need_da=i > 0)
    return grads


def num_hidden(params):
    return sum(1 for k in params if k.startswith("W")) - 1


def init_params(rng, cfg, dtype=np.float32):
    """LeCun-normal weights, zero biases, and the fixed (untrained) Fourier frequencies."""
    n_in = 2 + 2 * cfg["fourier"] + 2 + 4 * cfg["time_freqs"]
    sizes = [n_in] + [cfg["hidden"]] * cfg["depth"] + [2]
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"W{i}"] = (rng.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in)).astype(dtype)
        params[f"b{i}"] = np.zeros(fan_out, dtype)
    # two constants, not weights: 2 pi B with B's entries in cycles per unit of x, and pi (1..K)
    params["fourier"] = (2 * math.pi * cfg["fourier_scale"]
                         * rng.standard_normal((2, cfg["fourier"]))).astype(dtype)
    params["freqs"] = (math.pi * np.arange(1, cfg["time_freqs"] + 1)).astype(dtype)
    return params


FIXED = ("fourier", "freqs")  # entries of params that are never trained


def trainable(params):
    return [k for k in params if k not in FIXED]


# ---------------------------------------------------------------- input features
# The cells of the checkerboard have sharp edges that a small MLP on raw x draws as blurry
# ramps; random Fourier features sin(2 pi B x), cos(2 pi B x) give it sharp building blocks.
# Time enters as s, t and sin/cos(pi k s), sin/cos(pi k t), so that the map can change quickly
# near t = 1 where the flow is fastest. All features are fixed functions, so only their
# forward-mode tangents are needed, never a gradient.


def features_forward(x, s, t, params, tangent=None):
    """Features of (x, s, t) and, for the last M rows, their tangent along (x_dot, s_dot, t_dot).

    x: (N, D), s, t: (N,); tangent: None or (x_dot (M, D), s_dot (M,), t_dot (M,))
    -> a: (N, F) without a tangent, (N+M, F) with one
    """
    n = len(x)
    fourier, freqs = params["fourier"], params["freqs"]                # (D, Kx), (Kt,)
    xb = x @ fourier                                                   # (N, Kx)
    ws, wt = s[:, None] * freqs, t[:, None] * freqs                    # (N, Kt)
    sin_x, cos_x = np.sin(xb), np.cos(xb)
    sin_s, cos_s, sin_t, cos_t = np.sin(ws), np.cos(ws), np.sin(wt), np.cos(wt)
    a = np.concatenate([x / DATA_STD, sin_x, cos_x, s[:, None], t[:, None],
                        sin_s, cos_s, sin_t, cos_t], axis=1)           # (N, F)
    if tangent is None:
        return a
    x_dot, s_dot, t_dot = tangent
    m = len(x_dot)
    tail = slice(n - m, n)                                             # rows that have a tangent
    xb_dot = x_dot @ fourier                                           # (M, Kx)
    sd, td = s_dot[:, None] * freqs, t_dot[:, None] * freqs            # (M, Kt)
    a_dot = np.concatenate([x_dot / DATA_STD, cos_x[tail] * xb_dot, -sin_x[tail] * xb_dot,
                            s_dot[:, None], t_dot[:, None],
                            cos_s[tail] * sd, -sin_s[tail] * sd,
                            cos_t[tail] * td, -sin_t[tail] * td], axis=1)   # (M, F)
    return np.concatenate([a, a_dot], axis=0)                          # (N+M, F)


# ---------------------------------------------------------------- the flow map
# X_{s,t}(x) = x + (t - s) v(x, s, t) is the identity at s = t whatever the weights, and its
# derivative in t at s = t is v(x, t, t): the diagonal of v is the flow's velocity.


def flow_map_forward(params, x, s, t, tangent=None):
    """X_{s,t}(x) and, for the last M rows, its tangent X_dot = x_dot + (t_dot - s_dot) v + (t - s) v_dot.

    x: (N, D), s, t: (N,); tangent: None or (x_dot (M, D), s_dot (M,), t_dot (M,))
    -> v: (N, D), X: (N, D), X_dot: (M, D) or None, cache
    """
    n = len(x)
    a = features_forward(x, s, t, params, tangent)                     # (N+M, F)
    out, caches = mlp_forward(params, a, n)                            # (N+M, D)
    v, v_dot = out[:n], out[n:]
    gap = (t - s)[:, None]                                             # (N, 1)
    X = x + gap * v                                                    # (N, D)
    X_dot = None
    if tangent is not None:
        x_dot, s_dot, t_dot = tangent
        m = len(x_dot)
        X_dot = x_dot + (t_dot - s_dot)[:, None] * v[n - m:] + gap[n - m:] * v_dot   # (M, D)
    return v, X, X_dot, (caches, gap, tangent, n)


def flow_map_backward(dv, dX_dot, cache):
    """Gradients of a loss that reads v on all N rows and X_dot on the M tangent rows.

    dv: (N, D), dX_dot: (M, D) or None -> grads (dict like params, trainable entries only)
    """
    caches, gap, tangent, n = cache
    if dX_dot is None:
        return mlp_backward(dv, caches)
    x_dot, s_dot, t_dot = tangent
    m = len(dX_dot)
    dout = np.empty((n + m, dv.shape[1]), dv.dtype)                    # (N+M, D)
    dout[:n] = dv
    dout[n - m:n] += (t_dot - s_dot)[:, None] * dX_dot                 # X_dot reads v ...
    dout[n:] = gap[n - m:] * dX_dot                                    # ... and v_dot
    return mlp_backward(dout, caches)


def flow_map(params, x, s, t):
    """X_{s,t}(x) without gradients. x: (N, D); s, t: scalars or (N,) -> (N, D)."""
    s, t = as_times(s, x), as_times(t, x)
    return flow_map_forward(params, x, s, t)[1]


def velocity(params, x, t):
    """The diagonal v(x, t, t), the flow-matching velocity. x: (N, D), t: scalar or (N,) -> (N, D)."""
    t = as_times(t, x)
    return flow_map_forward(params, x, t, t)[0]


def as_times(t, x):
    return np.broadcast_to(np.asarray(t, x.dtype), (len(x),))


# ---------------------------------------------------------------- losses
# A batch stacks n_d diagonal rows (s = t) and then n_o off-diagonal rows (s < t), so one network
# pass serves both. Each method names the off-diagonal quantity q it trains and a teacher that
# builds q's target with the weights frozen (plain arrays: nothing flows back through them):
#
#     L = mean_diag |v(I_t, t, t) - (x1 - x0)|^2 + off_weight * mean_off |q - target|^2
#
#     method   q                          target (all under stop-gradient)
#     lsd      d/dt X_{s,t}(I_s)          v(X, t, t) at X = X_{s,t}(I_s)
#     esd      d/ds X_{s,t}(I_s)          -grad_x X_{s,t}(I_s) . v(I_s, s, s)
#     psd-*    v(I_s, s, t)               ((u - s) v(I_s, s, u) + (t - u) v(X_{s,u}(I_s), u, t)) / (t - s)
#
# The psd target is X_{u,t}(X_{s,u}(I_s)) - I_s divided by t - s, written as the convex mix of
# the two half-jump velocities so that no small difference is divided by a small gap.

TANGENT = {"lsd": (0.0, 1.0), "esd": (1.0, 0.0)}  # (s_dot, t_dot): d/dt for lsd, d/ds for esd


def predict(params, batch, method):
    """One pass over the stacked rows. -> pred {v_diag (n_d, D), X_off (n_o, D), q (n_o, D)}, cache"""
    n_d = len(batch["t_diag"])
    x = np.concatenate([batch["x_diag"], batch["x_off"]])              # (B, D)
    s = np.concatenate([batch["t_diag"], batch["s"]])                  # (B,)
    t = np.concatenate([batch["t_diag"], batch["t"]])                  # (B,)
    tangent = None
    if method in TANGENT:
        s_dot, t_dot = TANGENT[method]
        n_o = len(batch["s"])
        tangent = (np.zeros_like(batch["x_off"]),
                   np.full(n_o, s_dot, x.dtype), np.full(n_o, t_dot, x.dtype))
    v, X, X_dot, cache = flow_map_forward(params, x, s, t, tangent)
    q = X_dot if tangent is not None else v[n_d:]
    return {"v_diag": v[:n_d], "X_off": X[n_d:], "q": q}, cache


def lsd_target(params, batch, pred):
    """Lagrangian: the jump's endpoint must move with the diagonal velocity found there."""
    X = pred["X_off"].copy()                      # sg: the student's own jump, frozen
    return velocity(params, X, batch["t"])        # (n_o, D)


def esd_target(params, batch, pred):
    """Eulerian: moving the start along the flow must not move the end, so d/ds X = -grad_x X . v."""
    x, s, t = batch["x_off"], batch["s"], batch["t"]
    b = velocity(params, x, s)                    # (n_o, D) the diagonal velocity at I_s, frozen
    zero = np.zeros_like(s)
    jvp = flow_map_forward(params, x, s, t, tangent=(b, zero, zero))[2]   # grad_x X . b, forward mode
    return -jvp                                   # (n_o, D)


def psd_target(params, batch, pred):
    """Progressive: one jump s -> t must equal two jumps s -> u -> t."""
    x, s, u, t = batch["x_off"], batch["s"], batch["u"], batch["t"]
    v_su, X_su = flow_map_forward(params, x, s, u)[:2]                   # (n_o, D) each
    v_ut = flow_map_forward(params, X_su, u, t)[0]                       # (n_o, D)
    return ((u - s)[:, None] * v_su + (t - u)[:, None] * v_ut) / (t - s)[:, None]


TEACHERS = {"lsd": lsd_target, "esd": esd_target, "psd-mid": psd_target, "psd-uni": psd_target}


def loss_backward(pred, target, batch, cache, off_weight):
    """L and dL/dparams from a forward pass and a frozen target. -> (loss_diag, loss_off), grads"""
    r_d = pred["v_diag"] - batch["v_diag"]        # flow matching: v(I_t, t, t) - (x1 - x0)
    n_d, n_o = len(r_d), len(pred["q"])
    dv = np.zeros((n_d + n_o, r_d.shape[1]), r_d.dtype)   # (B, D)
    dv[:n_d] = (2.0 / n_d) * r_d
    loss_diag, loss_off, dX_dot = float((r_d * r_d).sum(1).mean()), 0.0, None
    if n_o:
        r_o = pred["q"] - target                  # (n_o, D) distillation residual
        loss_off = float((r_o * r_o).sum(1).mean())
        dq = (2.0 * off_weight / n_o) * r_o
        if cache[2] is None:
            dv[n_d:] = dq                         # psd: q is v itself
        else:
            dX_dot = dq                           # lsd, esd: q is a tangent of X
    return (loss_diag, loss_off), flow_map_backward(dv, dX_dot, cache)


def loss_and_grads(params, batch, method, off_weight, target=None):
    """The whole loss of a method. A target passed in is held fixed (as in a gradient check);
    otherwise the teacher builds it from the current weights, after the student's pass."""
    pred, cache = predict(params, batch, method)
    if target is None and method in TEACHERS:
        target = TEACHERS[method](params, batch, pred)
    return loss_backward(pred, target, batch, cache, off_weight)


# ---------------------------------------------------------------- optimizer: Adam, clipping, EMA


def adam_init(params):
    return {"m": {k: np.zeros_like(params[k]) for k in trainable(params)},
            "v": {k: np.zeros_like(params[k]) for k in trainable(params)},
            "step": 0}


def adam_update(params, grads, state, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """One Adam step in place: moments m, v; bias correction with the step count from 1."""
    state["step"] += 1
    k = state["step"]
    c1, c2 = 1.0 - beta1 ** k, 1.0 - beta2 ** k
    for name, g in grads.items():
        m, v = state["m"][name], state["v"][name]
        m *= beta1
        m += (1.0 - beta1) * g                    # first moment: mean of g
        v *= beta2
        v += (1.0 - beta2) * g * g                # second moment: mean of g^2
        params[name] -= (lr / c1) * m / (np.sqrt(v / c2) + eps)


def clip_grads(grads, max_norm):
    """Scale all gradients by one factor so their global norm is at most max_norm. -> the norm"""
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    if norm > max_norm:
        for g in grads.values():
            g *= max_norm / norm
    return norm


def learning_rate(it, cfg):
    """Linear warm-up, then cosine decay from lr to lr * lr_final."""
    if it < cfg["warmup"]:
        return cfg["lr"] * (it + 1) / cfg["warmup"]
    frac = (it - cfg["warmup"]) / max(1, cfg["iters"] - cfg["warmup"])
    return cfg["lr"] * (cfg["lr_final"] + (1 - cfg["lr_final"]) * 0.5 * (1 + math.cos(math.pi * frac)))


def ema_update(ema, params, decay, step):
    """ema <- d ema + (1 - d) params, with d ramped up so early steps are not all initialization."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    for k in trainable(params):
        ema[k] += (1.0 - d) * (params[k] - ema[k])


# ---------------------------------------------------------------- data


FILLED = np.array([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0])  # (8, 2) cells


def sample_checkerboard(n, rng):
    """n points uniform on the filled cells of the 4 x 4 board on [-2, 2]^2. -> (n, 2) float64"""
    cells = FILLED[rng.integers(0, len(FILLED), size=n)]               # (n, 2)
    return cells + rng.random((n, 2)) - 2.0


def sample_base(n, rng, base_std):
    """x0 ~ N(0, base_std^2 I). -> (n, 2) float64"""
    return base_std * rng.standard_normal((n, 2))


def make_batch(rng, n, method, cfg, dtype=np.float32):
    """A training batch: diagonal rows (I_t, t, x1 - x0), off-diagonal rows (I_s, s < u < t)."""
    n_d = n if method == "fm" else int(round(n * cfg["diag_fraction"]))
    n_o = n - n_d
    x0, x1 = sample_base(n, rng, cfg["base_std"]), sample_checkerboard(n, rng)   # (n, D) each
    t_diag = rng.random(n_d)                                           # (n_d,)
    st = np.sort(rng.random((n_o, 2)), axis=1)                         # (n_o, 2): s < t
    s, t = st[:, 0], st[:, 1]
    u = (s + t) / 2 if method == "psd-mid" else s + (t - s) * rng.random(n_o)
    interp = lambda x0, x1, t: (1 - t)[:, None] * x0 + t[:, None] * x1   # I_t
    batch = {"x_diag": interp(x0[:n_d], x1[:n_d], t_diag), "t_diag": t_diag,
             "v_diag": x1[:n_d] - x0[:n_d],
             "x_off": interp(x0[n_d:], x1[n_d:], s), "s": s, "t": t, "u": u}
    return {k: a.astype(dtype) for k, a in batch.items()}


# ---------------------------------------------------------------- sampling and metrics


def jump(model, x, s, t):
    """X_{s,t}(x) with the sampling (EMA) weights. x: (n, 2), s, t: scalars -> (n, 2)"""
    params = model["ema"]
    return flow_map(params, np.asarray(x, params["W0"].dtype), s, t)


def sample(model, n, steps, seed=0, chunk=50_000):
    """n samples from `steps` jumps on the uniform grid 0 = t_0 < ... < t_N = 1 (for fm: `steps`
    Euler steps of the diagonal velocity, the plain flow model at the same cost). -> (n, 2)"""
    params, cfg = model["ema"], model["config"]
    rng = np.random.default_rng(seed)
    x = sample_base(n, rng, cfg["base_std"]).astype(params["W0"].dtype)   # (n, 2)
    grid = np.linspace(0.0, 1.0, steps + 1)
    for lo in range(0, n, chunk):                  # chunks bound the memory of a pass
        xc = x[lo:lo + chunk]
        for s, t in zip(grid[:-1], grid[1:]):
            if cfg["method"] == "fm":
                xc = xc + (t - s) * velocity(params, xc, s)
            else:
                xc = flow_map(params, xc, s, t)
        x[lo:lo + chunk] = xc
    return x.astype(np.float64)


def histogram_kl(x_true, x_gen, bins=60, lim=2.5):
    """KL(p || q) of 2D histograms on [-lim, lim]^2 (EVAL.md): each normalized to sum 1, then
    1e-8 added to every bin. Points outside the square are dropped, which costs q mass."""
    edges = np.linspace(-lim, lim, bins + 1)
    p = np.histogram2d(x_true[:, 0], x_true[:, 1], bins=(edges, edges))[0]
    q = np.histogram2d(x_gen[:, 0], x_gen[:, 1], bins=(edges, edges))[0]
    p = p / max(p.sum(), 1) + 1e-8
    q = q / max(q.sum(), 1) + 1e-8
    return float(np.sum(p * np.log(p / q)))


def evaluate(model, n=100_000, steps=EVAL_STEPS, seed=0):
    """KL at each number of steps against a fixed true set, and the noise floor. -> dict"""
    x_true = sample_checkerboard(n, np.random.default_rng(10_000))
    floor = histogram_kl(x_true, sample_checkerboard(n, np.random.default_rng(10_001)))
    samples = {k: sample(model, n, k, seed=seed) for k in steps}
    kl = {k: histogram_kl(x_true, x) for k, x in samples.items()}
    return {"kl": kl, "floor": floor, "n": n, "x_true": x_true, "samples": samples}


def format_results(results, method):
    steps = list(results["kl"])
    head = "| method | " + " | ".join(str(k) for k in steps) + " |"
    rule = "|---|" + "---|" * len(steps)
    row = f"| {method} | " + " | ".join(f"{results['kl'][k]:.4f}" for k in steps) + " |"
    return "\n".join([f"KL at 1..16 steps, {results['n']:,} samples "
                      f"(noise floor {results['floor']:.4f})", head, rule, row])


# ---------------------------------------------------------------- plots


def plot_samples(results, path, title=""):
    """Target and generated samples at each number of steps, as 2D histograms side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("target", results["x_true"])] + [
        (f"{k} step{'s' * (k > 1)}: KL {results['kl'][k]:.3f}", results["samples"][k])
        for k in results["kl"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9))
    edges = np.linspace(-2.5, 2.5, 121)
    for ax, (name, x) in zip(axes, panels):
        ax.hist2d(x[:, 0], x[:, 1], bins=(edges, edges), cmap="magma")
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(history, path, title=""):
    """Diagonal and off-diagonal losses per step, smoothed over a window."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.4))
    h = np.asarray(history)
    w = max(1, len(h) // 100)
    for col, name in enumerate(["diagonal (flow matching)", "off-diagonal (distillation)"]):
        y = h[:, col]
        if not np.any(y):
            continue
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(len(smooth)) + w, smooth, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- training loop


def make_config(method="lsd", **overrides):
    """DEFAULTS with the method and any overrides; unknown names are an error."""
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return dict(DEFAULTS, **overrides, method=method)


def new_model(cfg):
    rng = np.random.default_rng(cfg["seed"])
    params = init_params(rng, cfg)
    return {"config": cfg, "params": params, "ema": {k: a.copy() for k, a in params.items()},
            "adam": adam_init(params), "iter": 0, "rng": rng.bit_generator.state,
            "history": np.zeros((0, 2), np.float32)}


def train_step(model, batch, lr):
    """One optimizer step: student pass, frozen teacher, backward, clip, Adam, EMA. -> losses"""
    cfg, params = model["config"], model["params"]
    with np.errstate(over="ignore", invalid="ignore"):   # a blow-up is caught just below
        (loss_diag, loss_off), grads = loss_and_grads(params, batch, cfg["method"], cfg["off_weight"])
        norm = clip_grads(grads, cfg["clip"])
    for name, value in [("diagonal loss", loss_diag), ("off-diagonal loss", loss_off),
                        ("gradient norm", norm)]:
        if not math.isfinite(value):             # stop before the bad step touches the weights
            raise FloatingPointError(f"the {name} became {value} at iteration {model['iter'] + 1}; "
                                     f"try a lower --lr than {cfg['lr']:g}")
    adam_update(params, grads, model["adam"], lr)
    ema_update(model["ema"], params, cfg["ema"], model["adam"]["step"])
    return loss_diag, loss_off


def train(method="lsd", log=print, model=None, checkpoint=None, save_every=0, **overrides):
    """Train a flow map, or continue `model` to its config's iters, and return the model dict.

    model = {config, params, ema (the sampling weights), adam, iter, rng, history (iters, 2)}
    checkpoint: a path that save() writes every `save_every` steps, at the end, and on Ctrl-C.
    A first Ctrl-C ends the current step, saves, and raises KeyboardInterrupt; a second quits.
    """
    if model is None:
        model = new_model(make_config(method, **overrides))
    elif overrides:
        model["config"] = dict(model["config"], **overrides)
    cfg = model["config"]
    rng = np.random.default_rng()
    rng.bit_generator.state = model["rng"]       # resuming draws the batches it would have drawn
    iters, start = cfg["iters"], model["iter"]
    history = np.zeros((max(iters, start), 2), np.float32)
    history[:start] = model["history"][:start]
    every = max(1, iters // 20)
    interrupted = []

    def on_sigint(signum, frame):
        if interrupted:
            log("second Ctrl-C: quitting now")
            os._exit(130)
        interrupted.append(True)
        log("Ctrl-C: stopping after this step (press again to quit at once)")

    handler = signal.signal(signal.SIGINT, on_sigint) if is_main_thread() else None
    t0 = time.perf_counter()
    try:
        for it in range(start, iters):
            batch = make_batch(rng, cfg["batch"], cfg["method"], cfg)
            history[it] = train_step(model, batch, learning_rate(it, cfg))
            model["iter"], model["rng"] = it + 1, rng.bit_generator.state
            model["history"] = history[:it + 1]
            if (it + 1) % every == 0 or it + 1 == iters:
                done = it + 1 - start
                rate = done / (time.perf_counter() - t0)
                left = (iters - it - 1) / rate
                recent = history[max(start, it + 1 - every):it + 1].mean(axis=0)
                log(f"iter {it + 1:>6}/{iters}  diag {recent[0]:.4f}  off {recent[1]:.4f}  "
                    f"{rate:6.1f} it/s  left {int(left) // 60}:{int(left) % 60:02d}")
            if checkpoint and save_every and (it + 1) % save_every == 0 and it + 1 < iters:
                save(model, checkpoint)
            if interrupted:
                if checkpoint:
                    save(model, checkpoint)
                    log(f"saved {checkpoint} at iteration {it + 1}; continue with --resume {checkpoint}")
                raise KeyboardInterrupt(f"interrupted at iteration {it + 1}")
        model["history"] = history[:model["iter"]]
        if checkpoint:
            save(model, checkpoint)
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)
    return model


def is_main_thread():
    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------- saving and loading


def save(model, path):
    """Write the model to an .npz atomically: a temporary file in the same folder, then a rename."""
    arrays = {"config": np.array(json.dumps(model["config"])),
              "rng": np.array(json.dumps(model["rng"])),
              "iter": np.array(model["iter"]), "adam_step": np.array(model["adam"]["step"]),
              "history": np.asarray(model["history"])}
    for group, d in [("params", model["params"]), ("ema", model["ema"]),
                     ("adam_m", model["adam"]["m"]), ("adam_v", model["adam"]["v"])]:
        arrays.update({f"{group}/{k}": a for k, a in d.items()})
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path):
    """Read a model written by save(). Raises ValueError naming the problem for a bad file."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        cfg, rng_state = json.loads(str(d["config"])), json.loads(str(d["rng"]))
        group = lambda g: {k.split("/", 1)[1]: a for k, a in d.items() if k.startswith(g + "/")}
        model = {"config": cfg, "params": group("params"), "ema": group("ema"),
                 "adam": {"m": group("adam_m"), "v": group("adam_v"), "step": int(d["adam_step"])},
                 "iter": int(d["iter"]), "rng": rng_state, "history": d["history"]}
    except Exception as e:  # a zip error, a missing key, bad JSON: all mean "not our file"
        raise ValueError(f"{path}: not a readable flowmap model ({type(e).__name__}: {e})") from None
    expected = init_params(np.random.default_rng(0), make_config(cfg["method"], **{
        k: v for k, v in cfg.items() if k != "method"}))
    for name in ("params", "ema"):
        shapes = {k: a.shape for k, a in model[name].items()}
        if shapes != {k: a.shape for k, a in expected.items()}:
            raise ValueError(f"{path}: its {name} do not match the network its config describes")
    return model


# ---------------------------------------------------------------- benchmark
# Speed is judged against the machine itself: the matrix multiplies of a step, timed alone at
# the step's own shapes, bound what any implementation of the same arithmetic can reach.

BENCH = dict(hidden=256, depth=4, batch=2048, diag_fraction=0.75)   # the reference step


def step_gemms(cfg, method):
    """The matrix multiplies of one training step as (rows, inner, cols) triples."""
    n = cfg["batch"]
    n_d = n if method == "fm" else int(round(n * cfg["diag_fraction"]))
    n_o = n - n_d
    n_in = 2 + 2 * cfg["fourier"] + 2 + 4 * cfg["time_freqs"]
    layers = list(zip([n_in] + [cfg["hidden"]] * cfg["depth"], [cfg["hidden"]] * cfg["depth"] + [2]))
    main_rows = n + (n_o if method in TANGENT else 0)      # student pass: primal + tangent rows
    teacher_rows = {"fm": 0, "lsd": n_o, "esd": 3 * n_o, "psd-mid": 2 * n_o, "psd-uni": 2 * n_o}
    gemms = []
    for i, (fin, fout) in enumerate(layers):
        gemms.append((main_rows + teacher_rows[method], fin, fout))   # forward passes
        gemms.append((fin, main_rows, fout))                          # dW = a^T dz
        if i > 0:
            gemms.append((main_rows, fout, fin))                      # da = dz W^T
    return gemms


def gemm_seconds(gemms, repeats=15):
    """Median time of the multiplies alone, each on fresh float32 operands."""
    rng = np.random.default_rng(0)
    total = 0.0
    for m, k, n in gemms:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        total += float(np.median(times))
    return total


def bench(methods=("lsd", "esd", "psd-mid", "fm"), steps=30, warmup=5, log=print):
    """Median ms per training step of the reference configuration, its GFLOP/s, and the GFLOP/s
    of the same multiplies timed alone. -> {method: dict}"""
    out = {}
    for method in methods:
        cfg = make_config(method, **BENCH)
        model = new_model(cfg)
        rng = np.random.default_rng(0)
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            train_step(model, make_batch(rng, cfg["batch"], method, cfg), cfg["lr"])
            times.append(time.perf_counter() - t0)
        step = float(np.median(times[warmup:]))
        gemms = step_gemms(cfg, method)
        flop = sum(2.0 * m * k * n for m, k, n in gemms)
        gemm = gemm_seconds(gemms)
        out[method] = {"ms": 1e3 * step, "gflops": flop / step / 1e9,
                       "gemm_gflops": flop / gemm / 1e9, "fraction": gemm / step}
        r = out[method]
        log(f"{method:8s} {r['ms']:7.1f} ms/step  {flop / 1e9:5.2f} GFLOP  {r['gflops']:6.1f} GFLOP/s  "
            f"matmul alone {r['gemm_gflops']:6.1f} GFLOP/s  fraction {r['fraction']:.0%}")
    return out


# ---------------------------------------------------------------- command line


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line naming the problem, exit status 2, no usage dump and no traceback."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def parse_args(argv):
    p = ArgumentParser(prog="flowmap.py", description="Train a flow map on the checkerboard by "
                       "self-distillation, then report KL at 1, 2, 4, 8, 16 steps and plot.")
    d = DEFAULTS
    p.add_argument("--method", default=d["method"], choices=METHODS,
                   help="fm: flow matching only; lsd / esd / psd-mid / psd-uni: self-distillation "
                        "(default %(default)s)")
    p.add_argument("--iters", type=positive(int), help=f"training steps ({d['iters']})")
    p.add_argument("--batch", type=positive(int), default=d["batch"], help="rows per step (%(default)s)")
    p.add_argument("--hidden", type=positive(int), default=d["hidden"], help="hidden width (%(default)s)")
    p.add_argument("--depth", type=positive(int), default=d["depth"], help="hidden layers (%(default)s)")
    p.add_argument("--lr", type=positive(float), default=d["lr"], help="peak learning rate (%(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed (%(default)s)")
    p.add_argument("--out", default="plots", help="folder for the figures (%(default)s)")
    p.add_argument("--save", metavar="FILE", help="write the model (and checkpoints) to this .npz")
    p.add_argument("--save-every", type=positive(int), metavar="K",
                   help="with --save: also write a checkpoint every K steps")
    p.add_argument("--resume", metavar="FILE", help="continue the run saved in FILE to --iters")
    p.add_argument("--load", metavar="FILE", help="skip training: sample and evaluate a saved model")
    p.add_argument("--bench", action="store_true",
                   help="time one training step of the reference 4 x 256 network per method and exit")
    p.add_argument("--eval-samples", type=positive(int), default=100_000,
                   help="samples per KL estimate (%(default)s, as EVAL.md fixes)")
    args = p.parse_args(argv)
    if args.load and args.resume:
        p.error("--load and --resume exclude each other: --load evaluates, --resume trains on")
    if args.save_every and not (args.save or args.resume):
        p.error("--save-every needs --save FILE to know where to write")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is an existing file; give a folder")
    for flag in ("save",):
        path = getattr(args, flag)
        if path and os.path.isdir(path):
            p.error(f"--{flag} {path} is a folder; give a file name such as model.npz")
    return args


def fail(message, status=2):
    print(f"flowmap.py: error: {message}", file=sys.stderr)
    sys.exit(status)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.bench:
        print(f"reference step: {BENCH}, float32, {os.cpu_count()} cores; median of 30 steps")
        bench()
        return
    model = None
    if args.load or args.resume:
        try:
            model = load(args.load or args.resume)
        except ValueError as e:
            fail(f"--{'load' if args.load else 'resume'} {e}")
        print(f"loaded {args.load or args.resume}: {model['config']['method']}, "
              f"{model['iter']} of {model['config']['iters']} steps")
    if not args.load:
        if model is None:
            model = new_model(make_config(args.method, iters=args.iters or DEFAULTS["iters"],
                                          batch=args.batch, hidden=args.hidden, depth=args.depth,
                                          lr=args.lr, seed=args.seed))
        elif args.iters:
            model["config"]["iters"] = args.iters
        print("config: " + " ".join(f"{k}={v}" for k, v in model["config"].items()))
        checkpoint = args.save or args.resume
        t0 = time.perf_counter()
        try:
            model = train(model=model, checkpoint=checkpoint, save_every=args.save_every or 0)
        except FloatingPointError as e:
            fail(f"training diverged: {e}", status=1)
        except KeyboardInterrupt as e:
            fail(f"{e}" + ("" if checkpoint else " (nothing saved: use --save FILE)"), status=130)
        print(f"trained in {time.perf_counter() - t0:.0f} s on {os.cpu_count()} cores")
        if checkpoint:
            print(f"saved {checkpoint}")
    method = model["config"]["method"]
    t0 = time.perf_counter()
    results = evaluate(model, n=args.eval_samples)
    print(format_results(results, method))
    print(f"(evaluated in {time.perf_counter() - t0:.1f} s)")
    os.makedirs(args.out, exist_ok=True)
    plot_samples(results, os.path.join(args.out, f"samples_{method}.png"), title=f"{method}")
    if len(model["history"]):
        plot_losses(model["history"], os.path.join(args.out, f"loss_{method}.png"), title=method)
    print(f"figures in {args.out}/")


if __name__ == "__main__":
    main()
