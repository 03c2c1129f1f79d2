"""Flow-map self-distillation in one NumPy file.

A flow map X_{s,t}(x) jumps a point along the probability flow from time s to time t, so a
sampler needs 1 to 16 network calls instead of hundreds of ODE steps. Following Boffi, Albergo
and Vanden-Eijnden, "How to build a consistency model: learning flow maps via self-distillation"
(arXiv:2505.18825), we parameterize X_{s,t}(x) = x + (t - s) v(x, s, t), train the diagonal
v(x, t, t) by flow matching on the interpolant I_t = (1 - t) x0 + t x1 (x0 noise at t = 0, x1
data at t = 1), and let the model distil itself off the diagonal (s < t) with one of three
conditions, the teacher being its own weights frozen for the step (sg = stop-gradient):

    LSD (Lagrangian)   | d/dt X_{s,t}(I_s) - sg( v( sg(X_{s,t}(I_s)), t, t ) ) |^2
    ESD (Eulerian)     | d/ds X_{s,t}(I_s) + sg( grad_x X_{s,t}(I_s) . v(I_s, s, s) ) |^2
    PSD (progressive)  | v(I_s, s, t) - sg( X_{u,t}(X_{s,u}(I_s)) - I_s ) / (t - s) |^2,
                       u = (s + t) / 2 (psd-mid) or u ~ U[s, t] (psd-uni)

An outside teacher (the exact velocity, or a saved flow model) gives the distillation methods
lmd, emd and ptd; the itm methods learn a flow map of the data tilted toward a reward; and the
known ways to train a consistency model (MeanFlow, sCT and sCD, shortcut models, Align Your
Flow) are records of the same method table. Two 2D data sets with closed-form velocities, so
that every learned map is measured against the exact one: the paper's checkerboard and the
8-mode ring of the "Flow Map 101" notebook. All by hand: an MLP with paired forward/backward
passes, forward-mode dual numbers and the backward pass through them, Adam, sampling, metrics.

    pip install -r requirements.txt
    python flowmap.py --method lsd               # train, print KL at 1..16 steps, write plots/
    python flowmap.py --method known --seeds 3   # the known methods beside LSD: tables, figures
    python flowmap.py --help                     # every flag
    python -m pytest -q                          # gradient checks and the rest

How to read it: the method comes first, in the order it is learned: the problem and its data,
the recipe and the method table, the network, the flow map, the velocities that teach, batches,
the loss, the optimizer, training and sampling. It needs NumPy alone and, as written, calls
nothing below it but the exact velocities each data set names. The appendices support it: A the
ground truth, B speed (it makes its fast paths train()'s and sample()'s defaults), C saving and
checkpoints, D evaluation and figures, E comparisons over seeds and one search of every
method's settings, F the command line. Left out: GPUs, autodiff frameworks, images, and the
paper's GPU recipe (batches of 100,000, 125,000 steps).

Shapes: B = batch rows, N = primal rows, M = tangent rows (paired with the LAST M primal rows),
F = input features, H = hidden width, D = 2 (the data dimension).
"""

import math

import numpy as np

# ---------------------------------------------------------------- the problem: noise, data, reward
# Noise x0 ~ N(0, base_std^2 I) at t = 0, data x1 at t = 1, joined by the interpolant I_t, whose
# velocity x1 - x0 flow matching regresses on. A data set is one record (DATASETS) that all
# downstream reads, so a new data set is one new record.


def interpolant(x0, x1, t):
    """I_t = (1 - t) x0 + t x1. x0, x1: (n, D), t: (n,) -> (n, D)"""
    return (1 - t)[:, None] * x0 + t[:, None] * x1


def sample_base(n, rng, base_std):
    """x0 ~ N(0, base_std^2 I). -> (n, 2) float64"""
    return base_std * rng.standard_normal((n, 2))


FILLED = np.array([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0])  # (8, 2) cells


def sample_checkerboard(n, rng):
    """n points uniform on the filled cells of the 4 x 4 board on [-2, 2]^2: the cells (i, j)
    with i + j even, each [i - 2, i - 1] x [j - 2, j - 1]. -> (n, 2) float64"""
    cells = FILLED[rng.integers(0, len(FILLED), size=n)]               # (n, 2)
    return cells + rng.random((n, 2)) - 2.0


RING_RADIUS, RING_MODE_STD = 4.0, 0.15
RING_CENTRES = RING_RADIUS * np.stack([np.cos(2 * np.pi * np.arange(8) / 8),
                                       np.sin(2 * np.pi * np.arange(8) / 8)], axis=1)   # (8, 2)


def sample_ring(n, rng):
    """n points from eight equally likely Gaussian modes of std 0.15 at radius 4, angles 2 pi k / 8.
    -> (n, 2) float64"""
    modes = RING_CENTRES[rng.integers(0, len(RING_CENTRES), size=n)]   # (n, 2)
    return modes + RING_MODE_STD * rng.standard_normal((n, 2))


REWARD_SCALE = 2.5


def reward_bump(x, centre, scale=REWARD_SCALE):
    """The reward a tilted method favours: r(x) = exp(-|x - c|^2 / (2 scale^2)), in (0, 1].
    x: (n, 2) -> (n,)"""
    d = np.asarray(x, np.float64) - np.asarray(centre, np.float64)
    return np.exp(-0.5 * np.sum(d * d, axis=1) / scale ** 2)


# name: std (per axis; the base noise and x's features read it), sample(n, rng), the exact
# velocity b_t(x) and the RK4 steps of the exact flow (appendix A), the metrics, the plots'
# half-width, the modes whose balance is reported and the distance beyond which a point is off
# them, the reward r(x) in [0, 1] of the tilted methods, and the recipe.
DATASETS = {
    "checkerboard": dict(
        std=math.sqrt(4.0 / 3.0),                 # 1/12 within a cell + 5/4 between the columns
        sample=sample_checkerboard,
        velocity=lambda x, t, base_std: checkerboard_velocity(x, t, base_std),
        metrics=("KL", "SW"), extent=2.5, centres=None, off_ring=None, flow_steps=16,
        reward=lambda x: reward_bump(x, centre=(2.0, 2.0)),   # the top right corner cell
        recipe={}),
    "ring": dict(
        std=math.sqrt(RING_RADIUS ** 2 / 2 + RING_MODE_STD ** 2),   # about 2.83
        sample=sample_ring,
        velocity=lambda x, t, base_std: ring_velocity(x, t, base_std),
        metrics=("SW", "SW at 5,000"), extent=5.5, centres=RING_CENTRES, off_ring=0.6,   # 4 mode stds
        flow_steps=32,
        reward=lambda x: reward_bump(x, centre=(4.0, 0.0)),   # the mode at angle 0
        recipe=dict(fourier_scale=0.06, off_cap=0.75)),   # smooth modes: lower frequencies, a cap
                                                          # scaled with the data's std
}

# ---------------------------------------------------------------- the recipe and the method table

DEFAULTS = dict(
    data="checkerboard",  # checkerboard | ring (DATASETS)
    method="lsd",         # a name in METHODS (or ALIASES)
    iters=20000,          # optimizer steps
    batch=1024,           # rows per step, split diagonal / off-diagonal
    diag_fraction=0.75,   # share of each batch on the diagonal s = t
    diag_gap=0.0,         # its rows' gap t - s: 0, or shortcut's finest level (its code's)
    times="triangle",     # how the times are drawn, a name in TIMES
    off_weight=2.0,       # weight of the off-diagonal (distillation) loss
    off_cap=0.3,          # Huber cap on each off-diagonal residual's norm (0: plain squares)
    row_weight=None,      # off-diagonal rows' weight, a name in ROW_WEIGHTS (None: 1)
    diag_row_weight=None, # the diagonal rows' weight, a name in ROW_WEIGHTS (None: 1)
    row_c=None,           # the c of the row weights (ROW_WEIGHTS)
    row_p=None,           # the power p of the adaptive row weight (ROW_WEIGHTS)
    s0_share=None,        # share of the off-diagonal rows that start at s = 0; None: s is drawn
    derivative_warmup=None,  # steps over which the value target's derivative term grows 0 -> 1
    derivative_cap=1.0,   # where that growth stops (AYF: below 1)
    hidden=128,           # hidden width H
    depth=3,              # hidden layers
    fourier=32,           # random Fourier features of x (sin and cos each)
    fourier_scale=0.25,   # std of their frequencies, in cycles per unit of x
    time_freqs=6,         # sin/cos features of s and t at pi * (1..K)
    lr=2e-3,              # peak Adam learning rate
    lr_final=0.02,        # final learning rate as a fraction of the peak (cosine decay)
    warmup=200,           # linear learning-rate warm-up steps
    clip=10.0,            # global gradient-norm clip
    ema=0.999,            # EMA decay of the sampling weights
    base_std=None,        # std of the base Gaussian; None: the data's std
    preset=None,          # None (the recipe above) or a name in PRESETS
    teacher_file=None,    # a saved fm model whose velocity teaches from outside (None: the exact)
    ref_file=None,        # a saved fm model whose velocity is itm's reference (None: the exact)
    beta=None,            # strength of the reward tilt, for the tilted methods (itm-*)
    seed=0,
)

# A preset scales the budget: it sits between DEFAULTS and the data set's recipe (make_config),
# so a method's own defaults and the flags still win over it.
PRESETS = {"long": dict(iters=400_000)}


def method_record(condition, teacher, u=None, diag="x1 - x0", route=None,
                  target_weights="params", sampler="map", **defaults):
    """A method: its condition off the diagonal (TARGETS), whose velocity teaches it (TEACHERS),
    how u splits [s, t] ("mid" or "uniform"), what the diagonal regresses on (DIAGONALS), which
    way the gradient flows (the loss: "derivative" or "value"; None: the condition's, ROUTES),
    which weights build the target ("params", the step's, or "ema"), how it samples (SAMPLERS),
    and its own settings (its times among them). check_method says what combines."""
    route = route or ROUTES.get(condition)
    return dict(condition=condition, teacher=teacher, u=u, diag=diag, route=route,
                target_weights=target_weights, sampler=sampler, defaults=defaults)


# condition: its route unless a record names another (the progressive target is a velocity)
ROUTES = {"lagrangian": "derivative", "eulerian": "derivative", "progressive": "value"}

# sCM's normalisation on plain squares, its correction pulling as g / (|g| + 0.1), and the
# derivative term warmed up over 2,000 steps (sCM: 10,000 steps; here a tenth of this budget)
SCM_NORMALIZED = dict(row_weight="normalized", row_c=0.1, derivative_warmup=2000, off_cap=0.0)
MEANFLOW = dict(route="value", row_weight="adaptive", diag_row_weight="adaptive", off_cap=0.0)
AYF = dict(diag="outside", route="value", times="gap", diag_fraction=0.0, derivative_cap=0.99,
           **SCM_NORMALIZED)

# Self-distillation and distillation differ in the teacher only; fm trains the diagonal alone:
# a plain flow model; the itm methods tilt the data toward a reward (the velocities that teach).
# The known methods' learning rates and weights, and meanflow's knobs, are the winners of one
# search for all (appendix E, plots/tune); the route ablations take their base method's.
METHODS = {
    "fm":      method_record(None,          None, sampler="euler"),
    "lsd":     method_record("lagrangian",  "self", lr=4e-3),
    # esd and emd weight each row on plain squares: else their off-diagonal loss grows (the loss)
    "esd":     method_record("eulerian",    "self",  row_weight="gap", row_c=0.1, off_cap=0.0,
                             lr=4e-3),
    # the paper's ESD on the value route (its appendix's semigradient form), on plain squares
    "esd-value": method_record("eulerian",  "self",  route="value", off_cap=0.0, lr=4e-3),
    # lsd with the route alone changed
    "lsd-value": method_record("lagrangian", "self", route="value", lr=4e-3),
    "psd-mid": method_record("progressive", "self",  u="mid", lr=4e-3),
    "psd-uni": method_record("progressive", "self",  u="uniform"),
    # lmd reads the exact velocity at the student's jumps X, which near t = 1 pulls a point off
    # the data back at about (its distance) / (1 - t): a larger cap bounds those rows' pull
    "lmd":     method_record("lagrangian",  "outside", diag="outside", off_cap=1.0),
    "emd":     method_record("eulerian",    "outside", diag="outside", row_weight="speed",
                             row_c=0.25, off_cap=0.0),
    "ptd":     method_record("progressive", "outside", u="mid", diag="outside"),
    # the ITM diagonal's residuals are tens of times flow matching's (its weights reach e^beta):
    # the off-diagonal loss weighs 10; a quarter of its rows start at s = 0, as a one-step jump
    "itm-lsd":     method_record("lagrangian",  "self", diag="tilted", beta=4.0, off_weight=10.0,
                                 s0_share=0.25),
    "itm-psd-mid": method_record("progressive", "self", u="mid", diag="tilted",
                                 beta=4.0, off_weight=10.0, s0_share=0.25),
    # The known methods, as their papers and code train them, in this file's time (theirs runs
    # from data at 0 to noise at 1), with this recipe's network, batch, budget and Adam.
    # MeanFlow (Geng et al. 2025, arXiv:2505.13447): the Eulerian condition on the value route,
    # with the conditional teacher and the adaptive weight on every row, one mean over the batch
    # (off_weight n_o / n_d beside the diagonal's mean). Its ImageNet code (Gsunshine/meanflow):
    # logit-normal times, 75% of the rows at s = t, p = 1, c = 0.01. Its CIFAR-10 code
    # (py-meanflow, the default script): other times, 25% of the rows at s = t, p = 0.75, c = 1e-3.
    # meanflow: the knobs its paper ablates (times, share of s = t rows, p) chosen here by the
    # search of appendix E, from the ImageNet code's settings
    "meanflow": method_record("eulerian", "conditional", **MEANFLOW, row_c=0.01, row_p=0.0,
                              off_weight=1 / 3),      # the triangle times; p = 0: plain squares
    "meanflow-imagenet": method_record("eulerian", "conditional", **MEANFLOW, times="logit-normal",
                                       row_c=0.01, row_p=1.0, off_weight=1 / 3),
    "meanflow-cifar": method_record("eulerian", "conditional", **MEANFLOW, times="cifar",
                                    row_c=1e-3, row_p=0.75, diag_fraction=0.25, off_weight=3.0),
    # continuous-time consistency training and distillation, sCT and sCD (Lu and Song 2024,
    # arXiv:2410.11081): maps to the data only, no s = t rows, the Eulerian condition on the value
    # route, sCM's normalisation and warm-up; the teacher is the row's own velocity (sCT) or the
    # outside one (sCD). Left out: sCM's learned time weighting.
    "sct": method_record("eulerian", "conditional", route="value", times="to data",
                         sampler="consistency", diag_fraction=0.0, **dict(SCM_NORMALIZED, row_c=1.0),
                         lr=1e-3),
    "scd": method_record("eulerian", "outside", route="value", times="to data",
                         sampler="consistency", diag_fraction=0.0, **SCM_NORMALIZED, lr=1e-3),
    # shortcut models (Frans et al. 2024, arXiv:2410.12557; code: kvfrans/shortcut-models): the
    # progressive condition at the midpoint on dyadic gaps, the target built by the EMA weights,
    # an eighth of the rows off the diagonal (its code's bootstrap_every = 8; its one mean over
    # the batch would be off_weight 1/7); its flow-matching rows are jumps of the finest level,
    # 1/128, where the halves of 1/64 land.
    # Left out: its clip of the target to [-4, 4] (for images).
    "shortcut": method_record("progressive", "self", u="mid", times="dyadic",
                              target_weights="ema", diag_fraction=7 / 8, diag_gap=1 / 128,
                              off_weight=2.0, off_cap=0.0, lr=4e-3),
    # Align Your Flow (Sabour et al. 2025, arXiv:2506.14603), hybrids: its Eulerian and
    # Lagrangian conditions distilling an outside teacher on the value route, with sCM's
    # normalisation and its warm-up capped at 0.99; its times and its lack of flow-matching rows
    # as one third-party code reads the paper, whose appendix we could not read. No autoguidance.
    "ayf-emd-hybrid": method_record("eulerian", "outside", **AYF, lr=1e-3),
    "ayf-lmd-hybrid": method_record("lagrangian", "outside", **dict(AYF, row_c=1.0)),
}

ALIASES = {"itm": "itm-lsd"}      # the tilted map, LSD off the diagonal (--condition: the other)


def make_config(method="lsd", data="checkerboard", **overrides):
    """DEFAULTS, then the preset's settings, the data set's recipe, the method's (or alias's)
    defaults and the overrides; an unknown name is an error, and so is a method the code cannot
    train (check_method). The base std, unless given, is the data's."""
    method = ALIASES.get(method, method)
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    preset = overrides.get("preset")
    for kind, name, table in [("method", method, METHODS), ("data set", data, DATASETS),
                              ("preset", preset or next(iter(PRESETS)), PRESETS)]:
        if name not in table:
            names = list(table) + (list(ALIASES) if table is METHODS else [])
            raise ValueError(f"unknown {kind} {name!r}; choose one of {', '.join(names)}")
    cfg = dict(DEFAULTS)
    for layer in (PRESETS.get(preset, {}), DATASETS[data]["recipe"], METHODS[method]["defaults"],
                  overrides):
        cfg.update(layer)                         # a later layer wins
    cfg.update(method=method, data=data)
    if cfg["base_std"] is None:
        cfg["base_std"] = DATASETS[data]["std"]
    return check_method(cfg)


# ---------------------------------------------------------------- network: input features
# Random Fourier features sin(2 pi B x), cos(2 pi B x) give the MLP sharp building blocks for
# the cells' edges; time enters as s, t, sin/cos(pi k s) and sin/cos(pi k t), so the map can
# change fast near t = 1. Fixed functions: only their forward-mode tangents are needed. x is
# divided by the data's std, kept in the model as params["x_scale"].


def num_features(cfg):
    """Input features: of x [x / std (2), sin and cos of the Fourier projections], of the times
    [s, t, sin and cos of pi k s and of pi k t]. -> (F_x, F_t)"""
    return 2 + 2 * cfg["fourier"], 2 + 4 * cfg["time_freqs"]


def x_features(x, params):
    """x: (N, D) -> [x / std, sin(2 pi B x), cos(2 pi B x)]: (N, D), (N, Kx), (N, Kx)"""
    xb = x @ params["fourier"]                                         # (N, Kx)
    return [x / params["x_scale"], np.sin(xb), np.cos(xb)]


def time_features(s, t, params):
    """s, t: (N,) -> [s, t, sin(pi k s), cos(pi k s), sin(pi k t), cos(pi k t)]:
    (N, 1) twice, then (N, Kt) four times"""
    ws, wt = s[:, None] * params["freqs"], t[:, None] * params["freqs"]   # (N, Kt)
    return [s[:, None], t[:, None], np.sin(ws), np.cos(ws), np.sin(wt), np.cos(wt)]


def features_forward(x, s, t, params, tangent=None):
    """Features of (x, s, t) and, for the last M rows, their tangent along (x_dot, s_dot, t_dot).
    x: (N, D), s, t: (N,); tangent: None or (x_dot (M, D), s_dot (M,), t_dot (M,))
    -> a: (N, F) without a tangent, (N+M, F) with one (the dual rows of the next section)"""
    x_part, t_part = x_features(x, params), time_features(s, t, params)
    a = np.concatenate(x_part + t_part, axis=1)                        # (N, F)
    if tangent is None:
        return a
    (_, sin_x, cos_x), (_, _, sin_s, cos_s, sin_t, cos_t) = x_part, t_part
    x_dot, s_dot, t_dot = tangent
    n, m = len(x), len(x_dot)
    tail = slice(n - m, n)                                             # rows that have a tangent
    xb_dot = x_dot @ params["fourier"]                                 # (M, Kx)
    sd, td = s_dot[:, None] * params["freqs"], t_dot[:, None] * params["freqs"]   # (M, Kt)
    a_dot = np.concatenate([x_dot / params["x_scale"], cos_x[tail] * xb_dot, -sin_x[tail] * xb_dot,
                            s_dot[:, None], t_dot[:, None],
                            cos_s[tail] * sd, -sin_s[tail] * sd,
                            cos_t[tail] * td, -sin_t[tail] * td], axis=1)   # (M, F)
    return np.concatenate([a, a_dot], axis=0)                          # (N+M, F)


# ---------------------------------------------------------------- network: layer pairs on dual rows
# Every layer works on a stacked array: N primal rows, then M tangent rows that carry the
# forward-mode derivative (`_dot`) of the last M primal rows, in one matrix multiply; the
# backward pass is the adjoint of both the value and its tangent.


def linear_forward(a, w, bias, n):
    """z = a w + bias on the n primal rows, z_dot = a_dot w on the tangent rows.
    a: (N+M, I), w: (I, O), bias: (O,) -> z: (N+M, O)"""
    z = a @ w                    # (N+M, O) primal and tangent rows in one product
    z[:n] += bias                # a tangent has no bias: d/dt of a constant is 0
    return z, (a, w, n)


def linear_backward(dz, cache, need_da=True):
    """dz: (N+M, O) -> da: (N+M, I) or None, dw: (I, O), dbias: (O,)."""
    a, w, n = cache
    dw = a.T @ dz                # both row kinds flow into the weight gradient
    dbias = dz[:n].sum(axis=0)   # only primal rows carried the bias
    da = dz @ w.T if need_da else None
    return da, dw, dbias


def silu_forward(z, n):
    """h = z sigmoid(z) on primal rows; h_dot = silu'(z) z_dot on tangent rows.
    z: (N+M, H) -> h: (N+M, H). silu' of the primal rows waits for the backward pass, so a pass
    that is never differentiated (a teacher, a sampler) does not pay for it."""
    m = len(z) - n
    zp = z[:n]
    sig = np.negative(zp)                               # (N, H), then in place:
    with np.errstate(over="ignore"):                    # exp(-z) = inf far left: sigmoid 0, right
        np.exp(sig, out=sig)
    sig += 1.0
    np.reciprocal(sig, out=sig)                         # sigmoid(z)
    h = np.empty_like(z)
    np.multiply(zp, sig, out=h[:n])
    if m:
        h[n:] = silu_slope(zp[n - m:], sig[n - m:])
        h[n:] *= z[n:]                                  # chain rule for the tangent
    return h, (z, sig, n)


def silu_slope(z, sig):
    """silu'(z) = sig (1 + z (1 - sig)), from z and sig = sigmoid(z)."""
    d1 = 1.0 - sig
    d1 *= z
    d1 += 1.0
    d1 *= sig
    return d1


def silu_backward(dh, cache):
    """dh: (N+M, H) -> dz: (N+M, H).
    h = silu(z) gives dz = dh silu'(z); h_dot = silu'(z) z_dot adds
    dz += dh_dot silu''(z) z_dot to the paired primal rows and dz_dot = dh_dot silu'(z)."""
    z, sig, n = cache
    m = len(z) - n
    d1 = silu_slope(z[:n], sig)                         # (N, H)
    dz = np.empty_like(dh)
    np.multiply(dh[:n], d1, out=dz[:n])
    if m:
        zp, sp = z[n - m:n], sig[n - m:]
        d2 = sp * (1.0 - sp) * (2.0 + zp * (1.0 - 2.0 * sp))   # (M, H) silu''(z)
        dz[n - m:n] += dh[n:] * d2 * z[n:]
        np.multiply(dh[n:], d1[n - m:], out=dz[n:])
    return dz


# ---------------------------------------------------------------- network: the MLP


def mlp_forward(params, a, n):
    """The network: `depth` (linear, SiLU) pairs, then a linear read-out.
    a: (N+M, F) features and their tangents -> out: (N+M, D)"""
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
    """LeCun-normal weights, zero biases, and the fixed (untrained) feature constants."""
    sizes = [sum(num_features(cfg))] + [cfg["hidden"]] * cfg["depth"] + [2]
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"W{i}"] = (rng.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in)).astype(dtype)
        params[f"b{i}"] = np.zeros(fan_out, dtype)
    # constants, not weights: 2 pi B with B's entries in cycles per unit of x, pi (1..K), and
    # the data's std, so that a saved model describes its own inputs
    params["fourier"] = (2 * math.pi * cfg["fourier_scale"]
                         * rng.standard_normal((2, cfg["fourier"]))).astype(dtype)
    params["freqs"] = (math.pi * np.arange(1, cfg["time_freqs"] + 1)).astype(dtype)
    params["x_scale"] = np.array(DATASETS[cfg["data"]]["std"], dtype)
    return params


FIXED = ("fourier", "freqs", "x_scale")  # entries of params that are never trained


def trainable(params):
    return [k for k in params if k not in FIXED]


# ---------------------------------------------------------------- the flow map and its tangents
# X_{s,t}(x) = x + (t - s) v(x, s, t) is the identity at s = t, and its derivative in t there is
# v(x, t, t): the diagonal of v is the flow's velocity. A tangent (x_dot, s_dot, t_dot) gives
# X's derivative along it: d/dt X for (0, 0, 1), d/ds X for (0, 1, 0), grad_x X . w for (w, 0, 0).


def flow_map_forward(params, x, s, t, tangent=None):
    """X_{s,t}(x) and, for the last M rows, its tangent X_dot = x_dot + (t_dot - s_dot) v + (t - s) v_dot.
    x: (N, D), s, t: (N,); tangent: None or (x_dot (M, D), s_dot (M,), t_dot (M,))
    -> v: (N, D), X: (N, D), X_dot: (M, D) or None, cache"""
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
    dv: (N, D), dX_dot: (M, D) or None -> grads (dict like params, trainable entries only)"""
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
    """X_{s,t}(x) without gradients. x: (N, D); s, t: scalars or (N,) -> (N, D)"""
    return flow_map_forward(params, x, as_times(s, x), as_times(t, x))[1]


def velocity(params, x, t):
    """The diagonal v(x, t, t), the flow-matching velocity. x: (N, D), t: scalar or (N,) -> (N, D)"""
    t = as_times(t, x)
    return flow_map_forward(params, x, t, t)[0]


def as_times(t, x):
    return np.broadcast_to(np.asarray(t, x.dtype), (len(x),))


# ---------------------------------------------------------------- the velocities that teach
# Off the diagonal the map is taught by a velocity teacher(x, t): for self-distillation (lsd,
# esd, psd) the model's own diagonal v(x, t, t), frozen, at the weights that build the target;
# for distillation (lmd, emd, ptd) an outside velocity, the data set's exact b_t(x) (appendix A)
# or a saved flow model's diagonal (teacher_file), which their diagonal regresses on too.
#
# A tilted method (itm-*) learns the flow map of p_data(x) e^{beta r(x)} / Z, the data tilted
# toward the reward r. Its velocity is E[w (x1 - x0) | I_t = x] / E[w | I_t = x], w = e^{beta r(x1)},
# and implicit tilt matching (ITM) reaches it without reweighting batches: the diagonal regresses
# on v_ref(I_t, t) + (w - 1) ((x1 - x0) - sg(v(I_t, t, t))), with v_ref the untilted velocity
# (outside too: exact, or ref_file). Its fixed point solves E[w | x] v = E[w (x1 - x0) | x] when
# v_ref = E[x1 - x0 | x]: the tilted velocity. Off the diagonal its teacher is its own diagonal.


def outside_setting(record):
    """The one place that decides which outside velocity a method reads, as the setting that
    may name a saved fm model for it: "ref_file" (a tilted method's reference), "teacher_file"
    (an outside teacher, off the diagonal or on it) or None."""
    if record["diag"] == "tilted":
        return "ref_file"
    return "teacher_file" if "outside" in (record["teacher"], record["diag"]) else None


def outside_velocity(cfg, flow_model=None):
    """The outside velocity a method reads, (x (n, D), t (n,)) -> (n, D), or None: the data
    set's exact velocity (in float64), or the diagonal of the saved fm model's weights
    `flow_model` when the config names one (outside_setting); in the caller's dtype."""
    setting = outside_setting(METHODS[cfg["method"]])
    if setting and cfg[setting]:
        if flow_model is None:
            raise ValueError(f"{cfg['method']} reads the saved model {cfg[setting]}: pass its "
                             f"weights as flow_model")
        dtype = flow_model["W0"].dtype
        return lambda x, t: velocity(flow_model, x.astype(dtype), t.astype(dtype)).astype(x.dtype)
    exact = DATASETS[cfg["data"]]["velocity"]
    return setting and (lambda x, t: exact(x.astype(np.float64), t.astype(np.float64),
                                           cfg["base_std"]).astype(x.dtype))


# name: teacher(x, t) for a batch, from the target's weights and the outside velocity. The
# conditional teacher is the row's own x1 - x0: its pair's velocity, at its I_s alone.
TEACHERS = {
    "self": lambda params, batch, outside: lambda x, t: velocity(params, x, t),
    "outside": lambda params, batch, outside: outside,
    "conditional": lambda params, batch, outside: lambda x, t: batch["dI_off"],
}
READS_TEACHER_AT = {"lagrangian": "X_{s,t}(I_s)", "eulerian": "I_s", "progressive": None}


def diagonal_target(batch, v):
    """What the diagonal v = v(I_t, t, t) regresses on: the batch's target_diag (x1 - x0, or the
    outside teacher), or for a tilted method the ITM target built on its reference,
    ref_diag + (e^{beta r(x1)} - 1) ((x1 - x0) - sg(v))."""
    if "tilt_diag" not in batch:
        return batch["target_diag"]
    return batch["ref_diag"] + batch["tilt_diag"][:, None] * (batch["dI_diag"] - v.copy())   # sg: a copy


# ---------------------------------------------------------------- batches
# A batch stacks n_d diagonal rows (s = t) and then n_o off-diagonal rows (s < t), so that one
# network pass serves both. A method's times say where its rows fall.


def logit_normal(rng, n, mean, std):
    """sigmoid(z), z ~ N(mean, std^2): times in (0, 1) that crowd around sigmoid(mean). -> (n,)"""
    return 1.0 / (1.0 + np.exp(-(mean + std * rng.standard_normal(n))))


def triangle_times(rng, n_d, n_o):
    """t uniform on the diagonal; (s, t) uniform on the triangle s < t off it."""
    t_diag = rng.random(n_d)
    st = np.sort(rng.random((n_o, 2)), axis=1)
    return t_diag, st[:, 0], st[:, 1]


def to_data_times(rng, n_d, n_o):
    """Consistency models map to the data only: t = 1, and s from sCM's proposal, log sigma ~
    N(-1.0, 1.4^2) with sigma_d = 0.5, read as noise over signal (1 - s) / s = sigma / sigma_d."""
    return rng.random(n_d), logit_normal(rng, n_o, math.log(0.5) + 1.0, 1.4), np.ones(n_o)


DYADIC_LEVELS = 7          # shortcut's gaps 1 .. 1/64 and, for the flow-matching rows, 1/128


def dyadic_times(rng, n_d, n_o, levels=DYADIC_LEVELS):
    """Shortcut models: gaps t - s = 2^-k, k uniform in 0..levels - 1, each s on its gap's grid
    (s = j 2^-k), so that both halves of a jump are jumps of the next level; the diagonal on the
    finest grid of 2^levels points."""
    gap = 0.5 ** rng.integers(0, levels, n_o)
    s = np.floor(rng.random(n_o) / gap) * gap
    return rng.integers(0, 2 ** levels, n_d) / 2 ** levels, s, s + gap


def logit_normal_times(rng, n_d, n_o):
    """MeanFlow's ImageNet code: two logit-normal times, sorted (its N(-0.4, 1) in its time, data
    at 0, is N(0.4, 1) here); a diagonal row keeps the pair's earlier time."""
    pairs = np.sort(logit_normal(rng, 2 * (n_d + n_o), 0.4, 1.0).reshape(-1, 2), axis=1)
    return pairs[:n_d, 0], pairs[n_d:, 0], pairs[n_d:, 1]


def cifar_times(rng, n_d, n_o):
    """MeanFlow's CIFAR-10 code: its t ~ N(-0.6, 1.6) and r ~ N(-4, 1.6) logit-normal, r = min(t, r),
    here s ~ N(0.6, 1.6) and t = max(s, t'), t' ~ N(4, 1.6); a diagonal row keeps s."""
    s, t = logit_normal(rng, n_d + n_o, 0.6, 1.6), logit_normal(rng, n_d + n_o, 4.0, 1.6)
    return s[:n_d], s[n_d:], np.maximum(s, t)[n_d:]


def gap_times(rng, n_d, n_o):
    """Align Your Flow, as one third-party code reads its paper: the gap t - s logit-normal,
    N(-0.6, 1.6), and s uniform on [0, 1 - gap]."""
    gap = logit_normal(rng, n_o, -0.6, 1.6)
    s = (1 - gap) * rng.random(n_o)
    return rng.random(n_d), s, s + gap


TIMES = {"triangle": triangle_times, "to data": to_data_times, "dyadic": dyadic_times,
         "logit-normal": logit_normal_times, "cifar": cifar_times, "gap": gap_times}


def make_batch(rng, n, method, cfg, outside=None, dtype=np.float32):
    """A training batch: diagonal rows (I_t, t, target velocity), off-diagonal rows (I_s, s < u < t);
    outside: the outside velocity, when the diagonal reads it (outside_velocity).
    -> {x_diag (n_d, D), t_diag (n_d,), target_diag (n_d, D), x_off (n_o, D), s, u, t (n_o,),
    dI_off = x1 - x0 (n_o, D)}; a tilted method's holds instead of target_diag its reference
    ref_diag = v_ref(I_t, t), dI_diag = x1 - x0 and tilt_diag = e^{beta r(x1)} - 1 (n_d,)"""
    record = METHODS[method]
    n_d = n if record["condition"] is None else int(round(n * cfg["diag_fraction"]))
    n_o = n - n_d
    x0, x1 = sample_base(n, rng, cfg["base_std"]), DATASETS[cfg["data"]]["sample"](n, rng)  # (n, D)
    t_diag, s, t = TIMES[cfg["times"]](rng, n_d, n_o)                  # (n_d,), (n_o,), (n_o,)
    if cfg["s0_share"]:            # every sampler's first jump starts at s = 0: anchor rows there
        s[:int(cfg["s0_share"] * n_o)] = 0.0
    u = (s + t) / 2 if record["u"] == "mid" else s + (t - s) * rng.random(n_o)   # drawn unless mid
    x_diag = interpolant(x0[:n_d], x1[:n_d], t_diag)                   # (n_d, D) I_t
    if record["diag"] == "x1 - x0":
        target = x1[:n_d] - x0[:n_d]                                   # (n_d, D) dI_t/dt
    else:
        target = outside(x_diag, t_diag)                               # (n_d, D) b_t(I_t)
    batch = {"x_diag": x_diag, "t_diag": t_diag, "gap_diag": np.full(n_d, cfg["diag_gap"]),
             "target_diag": target,
             "x_off": interpolant(x0[n_d:], x1[n_d:], s), "s": s, "t": t, "u": u,
             "dI_off": x1[n_d:] - x0[n_d:]}
    if record["diag"] == "tilted":                                     # the ITM target's parts
        batch["ref_diag"] = batch.pop("target_diag")                   # v_ref(I_t, t)
        batch["dI_diag"] = x1[:n_d] - x0[:n_d]
        batch["tilt_diag"] = np.expm1(cfg["beta"] * DATASETS[cfg["data"]]["reward"](x1[:n_d]))
    batch = {k: a.astype(dtype) for k, a in batch.items()}
    tie = batch["t"] <= batch["s"]      # s < t rounded to one float32: part them by one ulp
    batch["t"][tie] = np.nextafter(batch["s"][tie], dtype(1))
    return batch


# ---------------------------------------------------------------- the loss: targets under stop-gradient
# Each method names the off-diagonal quantity q it trains, and a target for q built with the
# weights frozen (plain arrays: nothing flows back through them):
#
#     L = mean_diag rho(w_d |v(I_t, t, t) - diagonal target|) + off_weight * mean_off rho(w |q - target|)
#
# with rho(r) = r^2, or off the diagonal with a cap c > 0 (off_cap) the Huber loss, 2 c r - c^2
# beyond c: a row far out pulls with a bounded force. The row weights w (ROW_WEIGHTS; row_weight
# off the diagonal, diag_row_weight on it) are 1 or frozen, read as a row's pull 2 w^2 (q - target).
# On the derivative route q is the derivative of the map that the condition names:
#
#     lagrangian    q = d/dt X_{s,t}(I_s)   target teacher(X, t) at X = X_{s,t}(I_s)
#     eulerian      q = d/ds X_{s,t}(I_s)   target -grad_x X_{s,t}(I_s) . teacher(I_s, s)
#
# On the value route q is v(I_s, s, t), and the target is what the condition asks v to be, its
# derivative term frozen; as d/dt X = v + (t - s) d/dt v and d/ds X = -v + (t - s) d/ds v:
#
#     lagrangian    v = teacher(X, t) - (t - s) d/dt v
#     eulerian      v = teacher(I_s, s) + (t - s) D v,  D v = d/ds v + grad_x v . teacher(I_s, s)
#     progressive   v = ((u - s) v(I_s, s, u) + (t - u) v(X_{s,u}(I_s), u, t)) / (t - s)
#
# (MeanFlow's u_tgt = v - (t - r) du/dt, in its time). The first two hold the derivative route's
# residual R = q - target, as v - R and v + R: the value |R|^2, the gradient through v alone.
# Their derivative term can be warmed up from 0 to 1 over derivative_warmup steps (sCM, AYF).
# The progressive target, (X_{u,t}(X_{s,u}(I_s)) - I_s) / (t - s) as the convex mix of the two
# half-jump velocities (no small difference over a small gap), is a velocity: it trains v alone
# and reads no teacher. The Eulerian target holds the model's own Jacobian: refreshing it turns
# an error of spatial frequency k into one (t - s) |k . teacher| / 2 times as large, which grows
# where the map is sharp; esd's "gap" weight takes the pull off those rows (NOTES.md).

TANGENT = {"lagrangian": (0.0, 1.0), "eulerian": (1.0, 0.0)}  # (s_dot, t_dot): d/dt X or d/ds X
LOSS_SETTINGS = ("off_weight", "off_cap", "row_weight", "diag_row_weight", "row_c", "row_p")
ROW_WEIGHTS = {   # name: w of each row, from its residual r = q - target, target, gap t - s, c, p
    "speed": lambda r, target, gap, c, p: c / (c + np.linalg.norm(target, axis=1)),
    "gap": lambda r, target, gap, c, p: c / (c + gap * np.linalg.norm(target, axis=1)),
    # MeanFlow's adaptive weight: sg(1 / (|r|^2 + c)^p) |r|^2 is |w r|^2 at w = (|r|^2 + c)^(-p/2)
    "adaptive": lambda r, target, gap, c, p: ((r * r).sum(1) + c) ** (-p / 2),
    "normalized": lambda r, target, gap, c, p: (np.linalg.norm(r, axis=1) + c) ** -0.5,
}


def loss_settings(cfg):
    return {k: cfg[k] for k in LOSS_SETTINGS}    # the loss's settings, as one group


def derivative_factor(cfg, it):
    """The warm-up factor of the target's derivative term at step it (from 0), 0 up to its cap."""
    warmup = cfg["derivative_warmup"]
    return min(cfg["derivative_cap"], it / warmup) if warmup else 1.0


def predict(params, batch, method):
    """One pass over the stacked rows.
    -> pred {v_diag (n_d, D), X_off (n_o, D), q (n_o, D), q_is_tangent}, cache"""
    n_d = len(batch["t_diag"])
    x = np.concatenate([batch["x_diag"], batch["x_off"]])              # (B, D)
    s = np.concatenate([batch["t_diag"], batch["s"]])                  # (B,)
    t = np.concatenate([batch["t_diag"] + batch["gap_diag"], batch["t"]])   # (B,)
    tangent, record, n_o = None, METHODS[method], len(batch["s"])
    if record["route"] == "derivative":           # q: the tangent of X along the condition's time
        s_dot, t_dot = TANGENT[record["condition"]]
        tangent = (np.zeros_like(batch["x_off"]), np.full(n_o, s_dot, x.dtype), np.full(n_o, t_dot, x.dtype))
    v, X, X_dot, cache = flow_map_forward(params, x, s, t, tangent)
    q = X_dot if tangent is not None else v[n_d:]
    return {"v_diag": v[:n_d], "X_off": X[n_d:], "q": q, "q_is_tangent": tangent is not None}, cache


def lagrangian_target(params, batch, X, teacher, warm=1.0):
    """The jump's endpoint must move with the teacher's velocity found there."""
    return teacher(X.copy(), batch["t"])          # sg: the student's own jump X, frozen


def eulerian_target(params, batch, X, teacher, warm=1.0):
    """Moving the start along the flow must not move the end."""
    x, s, t = batch["x_off"], batch["s"], batch["t"]
    zero = np.zeros_like(s)
    jvp = flow_map_forward(params, x, s, t, tangent=(teacher(x, s), zero, zero))[2]   # forward mode
    return -jvp                                   # (n_o, D)


def progressive_target(params, batch, X, teacher, warm=1.0):
    """One jump s -> t must equal two jumps s -> u -> t."""
    x, s, u, t = batch["x_off"], batch["s"], batch["u"], batch["t"]
    v_su, X_su = flow_map_forward(params, x, s, u)[:2]                   # (n_o, D) each
    v_ut = flow_map_forward(params, X_su, u, t)[0]                       # (n_o, D)
    return ((u - s)[:, None] * v_su + (t - u)[:, None] * v_ut) / (t - s)[:, None]


def warmed(R, R0, warm):
    """The residual R with its derivative term R - R0 scaled by the warm-up factor (R at 1)."""
    return R if warm == 1 else R0 + warm * (R - R0)


def lagrangian_value_target(params, batch, X, teacher, warm=1.0):
    """v = teacher(X, t) - (t - s) d/dt v, as v - R: one forward-mode pass along (0, 0, 1) gives
    d/dt X = v + (t - s) d/dt v and so R = d/dt X - teacher(X, t)."""
    x, s, t = batch["x_off"], batch["s"], batch["t"]
    zero = np.zeros_like(s)
    v, X, dX_dt = flow_map_forward(params, x, s, t, tangent=(np.zeros_like(x), zero, zero + 1))[:3]
    teacher_X = teacher(X, t)
    R = warmed(dX_dt - teacher_X, v - teacher_X, warm)   # its derivative term: dX_dt - v
    return v - R                                  # (n_o, D), every part frozen


def eulerian_value_target(params, batch, X, teacher, warm=1.0):
    """v = teacher(I_s, s) + (t - s) D v, as v + R: along the tangent (teacher(I_s, s), 1, 0)
    X moves by R = teacher - v + (t - s) D v, the Eulerian residual d/ds X + grad_x X . teacher."""
    x, s, t = batch["x_off"], batch["s"], batch["t"]
    teacher_s = teacher(x, s)                     # (n_o, D) the teacher's velocity at I_s
    zero = np.zeros_like(s)
    v, _, R = flow_map_forward(params, x, s, t, tangent=(teacher_s, zero + 1, zero))[:3]
    R = warmed(R, teacher_s - v, warm)            # its derivative term: R - (teacher_s - v)
    return v + R                                  # (n_o, D), every part frozen


TARGETS = {   # (condition, route): the target's function
    ("lagrangian", "derivative"): lagrangian_target, ("lagrangian", "value"): lagrangian_value_target,
    ("eulerian", "derivative"): eulerian_target, ("eulerian", "value"): eulerian_value_target,
    ("progressive", "value"): progressive_target}


def off_diagonal_target(params, batch, pred, method, outside=None, warm=1.0):
    """The frozen target of q for a method, built with the weights `params`: its condition's
    target on its route, with its teacher (TEACHERS) and the derivative term's warm-up factor."""
    record = METHODS[method]
    if record["teacher"] == "outside" and outside is None:
        raise ValueError(f"{method} distils an outside velocity: pass outside=outside_velocity(cfg)")
    teacher = TEACHERS[record["teacher"]](params, batch, outside)
    return TARGETS[record["condition"], record["route"]](params, batch, pred["X_off"], teacher, warm)


def row_loss(r, target, gap, weight, cp, cap, scale):
    """One kind of rows' loss, from their residuals r = q - target (n, D): the sum of rho(w |r|)
    (w = ROW_WEIGHTS[weight] with cp = (c, p), frozen, or 1 with no weight; rho: squares, Huber
    beyond a cap > 0) and the gradient of scale / 2 times that sum with respect to q.
    -> (sum, gradient (n, D))"""
    w = 1.0
    if weight:                                    # frozen: nothing flows back through w
        w = ROW_WEIGHTS[weight](r, target, gap, *cp)[:, None]             # (n, 1)
        r = w * r
    sq = (r * r).sum(1)                           # (n,) squared norms
    if cap:                                       # Huber: rho'(r) = 2 r min(1, c / r)
        norm = np.sqrt(sq)
        sq = np.where(norm > cap, 2.0 * cap * norm - cap ** 2, sq)
        r = r * np.minimum(1.0, cap / np.maximum(norm, cap))[:, None]
    return sq.sum(), scale * w * r


def loss_backward(pred, target, batch, cache, settings, rows=None):
    """L and dL/dparams from a forward pass and a frozen target (settings: loss_settings).
    -> (loss_diag, loss_off as trained, raw_off = the plain mean |q - target|^2), grads
    raw_off shows a residual's growth that a weight would hide. rows: (n_d, n_o) of the whole
    batch when `batch` is a part of it, whose means are then over the whole batch."""
    target_d = diagonal_target(batch, pred["v_diag"])
    r_d = pred["v_diag"] - target_d               # (n_d, D) v(I_t, t, t) - its target
    n_d, n_o = len(r_d), len(pred["q"])
    all_d, all_o = rows or (n_d, n_o)
    all_d = max(all_d, 1)                         # no diagonal rows (diag_fraction 0): a zero mean
    cp = settings["row_c"], settings["row_p"]     # the row weights' c and p
    loss_d, dv_d = row_loss(r_d, target_d, np.zeros(n_d, r_d.dtype), settings["diag_row_weight"],
                            cp, 0.0, 2.0 / all_d)
    dv = np.zeros((n_d + n_o, r_d.shape[1]), r_d.dtype)   # (B, D)
    dv[:n_d] = dv_d
    loss_diag, loss_off, raw_off, dX_dot = float(loss_d / all_d), 0.0, 0.0, None
    if n_o:
        r_o = pred["q"] - target                  # (n_o, D) distillation residual
        raw_off = float((r_o * r_o).sum(1).sum() / all_o)
        loss_o, dq = row_loss(r_o, target, batch["t"] - batch["s"], settings["row_weight"], cp,
                              settings["off_cap"], 2.0 * settings["off_weight"] / all_o)
        loss_off = float(loss_o / all_o)
        if pred["q_is_tangent"]:
            dX_dot = dq                           # the derivative route: q is a tangent of X
        else:
            dv[n_d:] = dq                         # the value route: q is v itself
    return (loss_diag, loss_off, raw_off), flow_map_backward(dv, dX_dot, cache)


def loss_and_grads(params, batch, method, settings, target=None, outside=None, rows=None,
                   target_weights=None, warm=1.0):
    """The whole loss of a method and its gradients. A target passed in is held fixed (as in a
    gradient check); otherwise it is built after the student's pass from target_weights (the
    method's: the current weights params, or their EMA; None: params), its derivative term
    scaled by warm (derivative_factor)."""
    pred, cache = predict(params, batch, method)
    if target is None and METHODS[method]["condition"] is not None:
        target = off_diagonal_target(target_weights or params, batch, pred, method, outside, warm)
    return loss_backward(pred, target, batch, cache, settings, rows)


# ---------------------------------------------------------------- optimizer: Adam, clipping, schedule, EMA


def adam_init(params):
    zeros = lambda: {k: np.zeros_like(params[k]) for k in trainable(params)}
    return {"m": zeros(), "v": zeros(), "step": 0}


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
    """Linear warm-up, then cosine decay from lr to lr * lr_final (it counts from 0)."""
    if it < cfg["warmup"]:
        return cfg["lr"] * (it + 1) / cfg["warmup"]
    frac = (it - cfg["warmup"]) / max(1, cfg["iters"] - cfg["warmup"])
    return cfg["lr"] * (cfg["lr_final"] + (1 - cfg["lr_final"]) * 0.5 * (1 + math.cos(math.pi * frac)))


def ema_decay(decay, step):
    """The EMA's decay at a step (from 1), ramped up so early steps are not all initialization."""
    return min(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema, params, decay, step):
    """ema <- d ema + (1 - d) params, d = ema_decay(decay, step)."""
    d = ema_decay(decay, step)
    for k in trainable(params):
        ema[k] += (1.0 - d) * (params[k] - ema[k])


# ---------------------------------------------------------------- training


def new_model(cfg):
    rng = np.random.default_rng(cfg["seed"])
    params = init_params(rng, cfg)
    return {"config": cfg, "params": params, "ema": {k: a.copy() for k, a in params.items()},
            "adam": adam_init(params), "iter": 0, "rng": rng.bit_generator.state,
            "history": np.zeros((0, 3), np.float32)}


def train_step(model, batch, lr, outside=None, grads_of=loss_and_grads):
    """One optimizer step: student pass, frozen target, backward, clip, Adam, EMA; grads_of
    computes the loss and gradients. -> (diagonal loss, off-diagonal loss, raw off residual)"""
    cfg, params = model["config"], model["params"]
    target_weights = model[METHODS[cfg["method"]]["target_weights"]]   # params or ema
    with np.errstate(over="ignore", invalid="ignore"):   # a blow-up is caught just below
        losses, grads = grads_of(params, batch, cfg["method"], loss_settings(cfg), outside=outside,
                                 target_weights=target_weights,
                                 warm=derivative_factor(cfg, model["iter"]))
        norm = clip_grads(grads, cfg["clip"])
    for name, value in [("diagonal loss", losses[0]), ("off-diagonal loss", losses[1]),
                        ("gradient norm", norm)]:
        if not math.isfinite(value):             # stop before the bad step touches the weights
            raise FloatingPointError(f"the {name} became {value} at iteration {model['iter'] + 1}; "
                                     f"try a lower --lr than {cfg['lr']:g}")
    adam_update(params, grads, model["adam"], lr)
    ema_update(model["ema"], params, cfg["ema"], model["adam"]["step"])
    return losses


def train(method="lsd", data="checkerboard", *, model=None, flow_model=None, after_step=None,
          grads_of=loss_and_grads, **overrides):
    """Train a flow map, or continue `model` to its config's iters. -> the model
    model = {config, params, ema (the sampling weights), adam, iter, rng, history (iters, 3)};
    flow_model: the saved fm model's weights (outside_velocity); after_step(model) runs after
    every step (appendix C); grads_of: appendix B makes its batch in parts the default."""
    if model is None:
        model = new_model(make_config(method, data, **overrides))
    elif overrides:                              # checked before the model takes them
        model["config"] = check_method(dict(model["config"], **overrides))
    cfg = check_method(model["config"])
    outside = outside_velocity(cfg, flow_model)
    rng = np.random.default_rng()
    rng.bit_generator.state = model["rng"]       # resuming draws the batches it would have drawn
    iters, start = cfg["iters"], model["iter"]
    history = np.zeros((max(iters, start), 3), np.float32)
    history[:start] = model["history"][:start]
    for it in range(start, iters):
        batch = make_batch(rng, cfg["batch"], cfg["method"], cfg, outside)
        history[it] = train_step(model, batch, learning_rate(it, cfg), outside, grads_of)
        model["iter"], model["rng"] = it + 1, rng.bit_generator.state
        model["history"] = history[:it + 1]
        if after_step:
            after_step(model)
    return model


# ---------------------------------------------------------------- sampling


# name: step k of a sampler on the uniform grid 0 = t_0 < ... < t_N = 1, one network call each
#     map          x <- X_{t_k, t_k+1}(x) = x + (t_k+1 - t_k) v(x, t_k, t_k+1)
#     euler        x <- x + (t_k+1 - t_k) v(x, t_k, t_k): a plain flow model (fm), at the same cost
#     consistency  x <- X_{t_k, 1}((1 - t_k) z_k + t_k x) (x itself at k = 0): a map that reaches
#                  t = 1 only is put back on the interpolant with fresh noise z_k, and jumps again
SAMPLERS = {
    "map": lambda params, x, k, s, t, noise: flow_map(params, x, s, t),
    "euler": lambda params, x, k, s, t, noise: x + np.asarray(t - s, x.dtype) * velocity(params, x, s),
    "consistency": lambda params, x, k, s, t, noise: flow_map(
        params, interpolant(noise[k - 1], x, as_times(s, x)) if k else x, s, 1.0),
}


def jumps(params, method, x, steps, noise=None):
    """x carried from t = 0 to 1 in `steps` network calls by the method's sampler (SAMPLERS).
    x: (n, D); noise: (steps - 1, n, D) base draws, read by the consistency sampler. -> x"""
    step = SAMPLERS[METHODS[method]["sampler"]]
    grid = np.linspace(0.0, 1.0, steps + 1)
    for k, (s, t) in enumerate(zip(grid[:-1], grid[1:])):
        x = step(params, x, k, s, t, noise)
    return x


def sample_noise(n, steps, seed, base_std, dtype):
    """A sampler's draws: x0 (n, D), then the consistency sampler's fresh noise (steps - 1, n, D)."""
    rng = np.random.default_rng(seed)
    x0 = sample_base(n, rng, base_std).astype(dtype)
    return x0, sample_base((steps - 1) * n, rng, base_std).reshape(steps - 1, n, 2).astype(dtype)


def sample(model, n, steps, seed=0, *, run=jumps):
    """n samples from `steps` network calls with the sampling (EMA) weights; run(params, method,
    x0, steps, noise) carries the draws (appendix B makes chunks on all cores the default)."""
    params, cfg = model["ema"], model["config"]
    x0, noise = sample_noise(n, steps, seed, cfg["base_std"], params["W0"].dtype)
    return run(params, cfg["method"], x0, steps, noise).astype(np.float64)


# ---------------------------------------------------------------- what a record may combine
DIAGONALS = ("x1 - x0", "outside", "tilted")      # what the diagonal regresses on (make_batch)
WHY = {"route": "the progressive target is a velocity (ROUTES)", "u": "u splits a progressive jump"}


def check_method(cfg):
    """The config, if the code can train its method; else a ValueError naming method and field."""
    name = cfg["method"]
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    record = METHODS[name]
    condition, route, teacher, diag = (record[k] for k in ("condition", "route", "teacher", "diag"))
    choices = {"condition": (None, *ROUTES), "teacher": (None,) if condition is None else tuple(TEACHERS),
               "route": [r for c, r in TARGETS if c == condition] or [None],
               "u": ("mid", "uniform") if condition == "progressive" else (None,), "diag": DIAGONALS,
               "times": tuple(TIMES), "target_weights": ("params", "ema"), "sampler": tuple(SAMPLERS),
               "row_weight": (None, *ROW_WEIGHTS), "diag_row_weight": (None, *ROW_WEIGHTS)}
    value = lambda field: cfg[field] if field in cfg else record[field]
    for field in ("diag_fraction", "diag_gap", "derivative_cap", "off_weight", "off_cap", "lr", "clip"):
        if not isinstance(cfg.get(field), (int, float)):
            raise ValueError(f"method {name!r}: {field} {cfg.get(field)!r} is not a number")
    unknown = [sorted(set(keys) - set(DEFAULTS)) for keys in (record["defaults"], cfg)]
    wrongs = [(field, value(field) not in allowed, f"{value(field)!r} is not one of "
               f"{', '.join(map(repr, allowed))}" + (f": {WHY[field]}" if field in WHY else ""))
              for field, allowed in choices.items()] + [
        ("defaults", unknown[0], f"name unknown settings {unknown[0]}"),
        ("settings", unknown[1], f"{unknown[1]} are not settings of DEFAULTS"),
        ("teacher", teacher == "conditional" and READS_TEACHER_AT.get(condition) != "I_s",
         f"'conditional' is the velocity at the row's own I_s; the {condition} condition reads "
         f"its teacher at {READS_TEACHER_AT.get(condition) or 'no point'}"),
        ("teacher", diag == "tilted" and teacher == "outside",
         "'outside' cannot teach a tilted method: its outside velocity is its reference"),
        ("row_c", (cfg["row_weight"] or cfg["diag_row_weight"]) and cfg["row_c"] is None,
         "is needed by a row weight"),
        ("row_p", "adaptive" in (cfg["row_weight"], cfg["diag_row_weight"]) and cfg["row_p"] is None,
         "is needed by the adaptive row weight"),
        ("derivative_warmup", cfg["derivative_warmup"] and TARGETS.get((condition, route))
         not in (lagrangian_value_target, eulerian_value_target),
         f"scales a value-route target's derivative term; the {condition} condition on the "
         f"{route} route has none"),
        ("beta", (cfg["beta"] is None) == (diag == "tilted"),
         "is the tilt's strength: set for the tilted methods (diag 'tilted') alone")] + [
        ("diag_gap", cfg["diag_gap"] != 0 and (cfg["times"] != "dyadic" or not 0 < cfg["diag_gap"]
                                               <= 0.5 ** DYADIC_LEVELS),
         f"is for dyadic times, up to their finest level 2^-{DYADIC_LEVELS}: the rows end at t + gap <= 1"),
        ("diag_gap", cfg["diag_gap"] != 0 and teacher == "self" and READS_TEACHER_AT.get(condition),
         f"would leave v(x, t, t) untrained, which a self-taught {condition} map reads as its "
         f"teacher: keep diag_gap 0, or take an outside teacher"),
        ("derivative_cap", cfg["derivative_cap"] != 1 and not cfg["derivative_warmup"],
         "caps a warm-up: set derivative_warmup too")] + [
        (field, cfg[field] is not None and not 0 <= cfg[field] <= 1, "is a share in [0, 1]")
        for field in ("diag_fraction", "s0_share", "derivative_cap")] + [
        (field, cfg[field] is not None and cfg[field] < 0, f"{cfg[field]} must not be negative")
        for field in ("off_weight", "off_cap", "row_c", "row_p", "diag_gap", "derivative_warmup",
                      "lr", "clip")] + [
        (field, cfg[field] and field != outside_setting(record),
         f"is for methods that read it (outside_setting); {name} does not")
        for field in ("teacher_file", "ref_file")]
    for field, wrong, why in wrongs:
        if wrong:
            raise ValueError(f"method {name!r}: {field} {why}")
    return cfg


# ================================================================ appendices
# The method is complete above. What follows supports it: A the ground truth that lets us
# measure a learned map against the exact one, B speed, C saving, loading and checkpoints,
# D evaluation, tables and figures, E comparisons over seeds, F the command line. Their own
# imports come here: the method needs NumPy alone.

import argparse
import contextlib
import ctypes
import functools
import hashlib
import json
import multiprocessing
import os
import shlex
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed

# ---------------------------------------------------------------- appendix A: ground truth, the checkerboard's exact velocity
# For both data sets the velocity b_t(x) = E[x1 - x0 | I_t = x] has a closed form. Write
# sigma for base_std. For the checkerboard: on I_t = x, x0 = (x - t x1) / (1 - t), so
# b_t(x) = (E[x1 | I_t = x] - x) / (1 - t). By Bayes the posterior of x1 is the data prior times
# the likelihood N(x; t x1, (1 - t)^2 sigma^2 I), i.e. N(x1; m, tau^2 I) with m = x / t,
# tau = (1 - t) sigma / t, restricted to the filled cells. A cell is a rectangle, so its
# posterior mass and mean factor into 1D truncated normals per axis, and the cells mix with
# weights proportional to their masses. Writing E[x1 | x] = m + tau g (g = the posterior mean
# shift in units of tau) gives the form we use, which never divides by 1 - t:
#     b_t(x) = (E[x1 | x] - x) / (1 - t) = (x + sigma g) / t.                               (GT1)
# In standardized units z = (edge - m) / tau = (edge t - x) / ((1 - t) sigma), which stays
# finite as t -> 0 (where m and tau blow up) and only grows like 1 / (1 - t) as t -> 1.

EDGES = np.arange(-2.0, 3.0)             # (5,) cell edges on each axis; column k is [k-2, k-1]
DATA_COV = np.array([[4 / 3, 1 / 4],     # Cov(x1): 1/12 in a cell + 5/4 between the columns on
                     [1 / 4, 4 / 3]])    # the diagonal; the parity rule correlates the axes by 1/4
T_SMALL = 3e-4                           # below: b_t from its Taylor series in t (GT3)
T_LAST = 1.0 - 1e-12                     # b_t is evaluated at min(t, T_LAST) (GT4)

# erfcx(y) = exp(y^2) erfc(y) for y >= 0 as P(u) / (1 + y/4) with u = (y - 4) / (y + 4): the map
# sends [0, inf) onto [-1, 1), and (1 + y/4) erfcx(y) -> 1 / (4 sqrt(pi)) smoothly as u -> 1, so a
# polynomial fits it. P is the degree-20 Chebyshev interpolant (80 nodes, 50-digit arithmetic),
# written in powers of u; its relative error is below 1e-14 (the tests check it against math.erfc).
ERFCX_K = 4.0
ERFCX_POLY = np.array([  # coefficients of u^0, u^1, ..., u^20
    2.7399891525012293e-01, -2.4413718227022194e-01, 1.9330217556627284e-01,
    -1.3521345782820194e-01, 8.2712896970972214e-02, -4.3502734312328259e-02,
    1.9095378704192953e-02, -6.5925133114439191e-03, 1.5280141009745902e-03,
    -7.0239847508722533e-05, -1.1376405434486261e-04, 4.4203641696912913e-05,
    -9.0619042826591092e-07, -4.7161304635201963e-06, 1.1686862055810617e-06,
    3.5722372960290945e-07, -2.0562117558492706e-07, -1.9776141918670279e-08,
    2.6689349445113606e-08, 5.5435317562436725e-10, -2.1586724432926099e-09,
])


def erfcx(y):
    """Scaled complementary error function exp(y^2) erfc(y), elementwise, for y >= 0.

    y: array (...) -> (...). It never underflows: erfcx(y) ~ 1 / (y sqrt(pi)) for large y.
    """
    y = np.asarray(y, dtype=np.float64)
    u = (y - ERFCX_K) / (y + ERFCX_K)
    p = np.full_like(u, ERFCX_POLY[-1])
    for c in ERFCX_POLY[-2::-1]:         # Horner, in place
        p *= u
        p += c
    p /= 1.0 + y / ERFCX_K
    return p


def tail_exponent(z):
    """Log-scale q of the N(0, 1) mass between consecutive edges z_k < z_k+1: 0 if the interval
    holds 0, else min(z_k^2, z_k+1^2) / 2, so that mass = e^-q times a factor in (0, 1].

    z: (K+1, ...) increasing along axis 0 -> q: (K, ...).
    """
    lo, hi = z[:-1], z[1:]
    return np.where((lo > 0) | (hi < 0), 0.5 * np.minimum(lo * lo, hi * hi), 0.0)


def scaled_masses(z, q):
    """N(0, 1) restricted to each interval [z_k, z_k+1]: its mass scaled by e^q, and its mean g.

    z: (K+1, ...) increasing along axis 0, finite; q: (K, ...) log-scales, 0 on an interval that
    holds 0 and at most tail_exponent(z) on the others -> mass_q (K, ...), g (K, ...) with
        mass_q = e^q (Phi(z_k+1) - Phi(z_k)),
        g      = (phi(z_k) - phi(z_k+1)) / (Phi(z_k+1) - Phi(z_k)).
    For N(m, tau^2) on [a, b] pass z = ([a, b] - m) / tau: the restricted mean is m + tau g.

    Accurate however far in a tail the interval lies: on one side of 0 it is the difference of
    two upper tails Q(|z|) = 1 - Phi(|z|) = e^(-z^2/2) erfcx(|z| / sqrt 2) / 2, never of two CDFs
    near 1, and every e^(-z^2/2) is computed as e^(q - z^2/2), which is O(1) at the near edge
    even where e^(-z^2/2) itself underflows (|z| > 38.6). The scale e^q cancels from g.
    """
    ez = erfcx(np.abs(z) / math.sqrt(2.0))                 # (K+1, ...) scaled tail beyond |z|
    lo, hi = z[:-1], z[1:]                                 # (K, ...)
    with np.errstate(under="ignore"):
        p_lo = np.exp(q - 0.5 * lo * lo)                   # (K, ...) e^q sqrt(2 pi) phi(z_k)
        p_hi = np.exp(q - 0.5 * hi * hi)                   # (K, ...) e^q sqrt(2 pi) phi(z_k+1)
    Q_lo, Q_hi = 0.5 * p_lo * ez[:-1], 0.5 * p_hi * ez[1:]  # (K, ...) e^q Q(|z|) at each edge
    one_side = (lo > 0) | (hi < 0)
    mass_q = np.where(one_side, np.abs(Q_lo - Q_hi), 1.0 - Q_lo - Q_hi)   # (q = 0 around 0)
    # an interval whose scaled mass underflows to 0 carries no weight; give it g = 0, not 0/0
    g = (p_lo - p_hi) / (math.sqrt(2.0 * math.pi) * np.maximum(mass_q, np.finfo(float).tiny))
    return mass_q, g


def checkerboard_velocity(x, t, base_std):
    """Exact velocity b_t(x) = E[x1 - x0 | I_t = x] of the checkerboard.

    x: (n, 2); t: scalar or (n,) in [0, 1]; base_std: std of the base N(0, base_std^2 I) -> (n, 2).
    Finite for every t in [0, 1]. For |x| <= 10 the error is below 1e-8 max(1, |b|), and below
    1e-12 max(1, |b|) for t > 0.03 (tested against the same formula in 60-digit arithmetic).
      * t = 0: b_0(x) = E[x1] - x = -x (the board is centred); t < T_SMALL: Taylor series (GT3),
        since (GT1) divides a cancelling sum by t.
      * t -> 1: tau -> 0 and the posterior collapses. Inside a filled cell E[x1 | x] -> x
        exponentially fast and b_t(x) -> x (indeed b_1(x) = E[x1 - x0 | x1 = x] = x); off the
        support it piles onto the nearest filled point p and b_t(x) ~ (p - x) / (1 - t) -> inf.
        There is no finite b_1 to return there, so t is clamped to T_LAST = 1 - 1e-12 (GT4):
        b is x to 1e-12 inside the cells and about (p - x) 1e12 outside, never inf or nan.
    """
    x = np.asarray(x, dtype=np.float64)
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), (len(x),))
    tc = np.clip(t, T_SMALL, T_LAST)                                    # (n,)
    z = (EDGES[:, None, None] * tc - x.T) / ((1.0 - tc) * base_std)    # (5, 2, n) edge, axis, point
    # (GT2) The filled cells (i, j) are the pairs of equal parity, so the posterior is a mixture
    # of two classes, (even, even) and (odd, odd), and within a class it factorizes over the
    # axes. Column k of an axis is in class k % 2; each class is scaled by its largest column
    # (e^-c) so that a class mass can't underflow, however far the point is from the support.
    q = tail_exponent(z)                                                # (4, 2, n)
    c = np.minimum(q[:2], q[2:])                                        # (2, 2, n) class, axis, n
    mass_c, g = scaled_masses(z, np.concatenate([c, c]))                # (4, 2, n) e^c * mass
    S = mass_c[:2] + mass_c[2:]                                         # (2, 2, n) class mass * e^c
    G = (mass_c[:2] * g[:2] + mass_c[2:] * g[2:]) / S                   # (2, 2, n) class mean shift
    # log-odds of the (odd, odd) cells against the (even, even) cells, then their probability
    log_odds = np.log(S[1, 0] * S[1, 1] / (S[0, 0] * S[0, 1])) - (c[1].sum(0) - c[0].sum(0))  # (n,)
    with np.errstate(over="ignore"):
        p_odd = 1.0 / (1.0 + np.exp(-log_odds))                         # (n,)
    g_mean = (1.0 - p_odd) * G[0] + p_odd * G[1]                        # (2, n) posterior shift
    b = ((x.T + base_std * g_mean) / tc).T                              # (n, 2) (GT1)
    small = t < T_SMALL
    if np.any(small):
        # (GT3) For small t the posterior is the prior tilted by exp(theta . x1 + O(t^2 |x1|^2)),
        # theta = t x / ((1 - t) sigma)^2; the data are symmetric about 0, so
        # E[x1 | x] = Cov(x1) theta + O(t^3 |x|^3), below 4e-9 here for |x| <= 10.
        ts = t[small, None]                                             # (n_small, 1)
        theta = ts * x[small] / ((1.0 - ts) * base_std) ** 2           # (n_small, 2)
        b[small] = (theta @ DATA_COV - x[small]) / (1.0 - ts)          # DATA_COV is symmetric
    return b

# ---------------------------------------------------------------- appendix A: the ring's exact velocity
# The ring is a Gaussian mixture: mode k has centre mu_k, std rho = 0.15, weight 1/8. Given the
# mode, I_t = (1 - t) x0 + t x1 is N(t mu_k, v_t I) with v_t = t^2 rho^2 + (1 - t)^2 sigma^2,
# and x0, x1 given I_t = x are Gaussian too (linear regression on x - t mu_k):
#     E[x1 | x, k] = mu_k + t rho^2 / v_t (x - t mu_k),  E[x0 | x, k] = (1 - t) sigma^2 / v_t (x - t mu_k)
# so E[x1 - x0 | x, k] = mu_k + g_t (x - t mu_k) with the gain g_t = (t rho^2 - (1 - t) sigma^2) / v_t,
# and the modes mix with posterior weights w_k(x) = softmax_k(-|x - t mu_k|^2 / (2 v_t)). Nothing
# divides by t or 1 - t and v_t >= rho^2 sigma^2 / (rho^2 + sigma^2) > 0, so b is finite for every
# t in [0, 1]: b_0(x) = mean(mu) - x = -x and b_1(x) = x.


def ring_velocity(x, t, base_std):
    """Exact velocity b_t(x) of the ring. x: (n, 2); t: scalar or (n,) in [0, 1] -> (n, 2)."""
    x = np.asarray(x, dtype=np.float64)
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), (len(x),))[:, None]   # (n, 1)
    var = t * t * RING_MODE_STD ** 2 + (1 - t) ** 2 * base_std ** 2           # (n, 1) v_t
    d = x[:, None, :] - t[:, :, None] * RING_CENTRES                          # (n, K, 2) x - t mu_k
    logits = -np.sum(d * d, axis=2) / (2 * var)                                # (n, K)
    logits -= logits.max(axis=1, keepdims=True)                               # log-sum-exp form
    w = np.exp(logits)
    w /= w.sum(axis=1, keepdims=True)                                          # (n, K) posterior
    gain = (t * RING_MODE_STD ** 2 - (1 - t) * base_std ** 2) / var           # (n, 1) g_t
    return (1 - gain * t) * (w @ RING_CENTRES) + gain * x                      # sum_k w_k (mu_k + g_t (x - t mu_k))


# ---------------------------------------------------------------- appendix A: the exact flow map and the velocity error


def exact_velocity(x, t, base_std, data):
    """b_t(x) = E[x1 - x0 | I_t = x] of a data set. x: (n, 2); t: scalar or (n,) -> (n, 2)"""
    return DATASETS[data]["velocity"](x, t, base_std)


FLOW_WARP = 3.0     # RK4 grid uniform in r, t = 1 - (1 - r)^3: steps shrink toward t = 1


def exact_flow(x, s, t, base_std, data, steps=None, warp=FLOW_WARP, chunk=8192):
    """Exact flow map X_{s,t}(x): integrate dx/dt = b_t(x) from s to t with classical RK4.

    x: (n, 2); s, t: scalars or (n,), 0 <= s <= t <= 1; steps: RK4 steps from 0 to 1 (None:
    the data set's flow_steps) -> (n, 2).
    The velocity gets stiff near t = 1: for the checkerboard, off the support b ~ (p - x) / (1 - t)
    draws a point onto its nearest filled point p at the rate 1 / (1 - t); for the ring, the
    posterior sharpens onto one mode. So the grid is uniform in the clock
    r = 1 - (1 - t)^(1/warp), i.e. t = 1 - (1 - r)^warp, and its steps in t shrink like
    (1 - t)^(2/3) for warp = 3. A jump [s, t] takes ceil(steps (r_t - r_s)) steps: the grid of
    [0, 1] or finer. A step that ends at t = 1 is the Euler step
        x + (1 - t_k) b_tk(x) = E[x1 | I_tk = x]         (the posterior mean)
    since b_1 is infinite off the support; its error is O((1 - t_k)^2), 1 - t_k = steps^-warp.
    Rows are integrated `chunk` at a time on all cores (on_all_cores), in cache.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    steps = steps or DATASETS[data]["flow_steps"]
    s = np.broadcast_to(np.asarray(s, dtype=np.float64), (n,))
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), (n,))
    assert np.all((0.0 <= s) & (s <= t) & (t <= 1.0)), "need 0 <= s <= t <= 1"
    r_s, r_t = 1.0 - (1.0 - s) ** (1.0 / warp), 1.0 - (1.0 - t) ** (1.0 / warp)   # (n,) clocks
    n_steps = math.ceil(steps * np.max(r_t - r_s, initial=0.0) - 1e-9)
    h = (r_t - r_s) / max(n_steps, 1)                                   # (n,) step in r
    time_of = lambda r: 1.0 - (1.0 - r) ** warp                         # t(r)
    dt_dr = lambda r: (warp * (1.0 - r) ** (warp - 1.0))[:, None]       # (c, 1)
    out = np.empty_like(x)

    def run(i):                                                         # one chunk, all steps
        rows = slice(i, i + chunk)
        y, r, to_one = x[rows].copy(), r_s[rows], t[rows] == 1.0        # (c, 2), (c,), (c,)
        dr = h[rows]                                                    # (c,) step in the clock
        b = lambda r, y: exact_velocity(y, time_of(r), base_std, data)        # (c, 2)
        f = lambda r, y: dt_dr(r) * b(r, y)                                     # dx/dr, (c, 2)
        for k in range(n_steps):
            b0 = b(r, y)                                                # (c, 2) b at the step start
            last = k == n_steps - 1 and to_one.any()                    # a step that lands on t = 1
            if last:
                jump = y + (1.0 - time_of(r))[:, None] * b0             # Euler: E[x1 | I_tk = y]
                if to_one.all():
                    y = jump
                    break
            k1 = dt_dr(r) * b0                                          # (c, 2) RK4 stages in r
            k2 = f(r + dr / 2, y + (dr / 2)[:, None] * k1)
            k3 = f(r + dr / 2, y + (dr / 2)[:, None] * k2)
            k4 = f(r + dr, y + dr[:, None] * k3)
            y = y + (dr / 6)[:, None] * (k1 + 2 * k2 + 2 * k3 + k4)
            r = r + dr
            if last:
                y = np.where(to_one[:, None], jump, y)
        out[rows] = y

    on_all_cores(run, range(0, n, chunk))
    return out


def velocity_error(v_fn, base_std, data, rng, n=100_000, bins=10):
    """Squared error of a velocity against the exact one along the interpolant.

    v_fn(x, t): x (n, 2), t (n,) -> (n, 2). Draws x0 ~ N(0, base_std^2 I), x1 ~ data, t ~ U[0, 1),
    x = I_t, and returns {"t_edges": (bins+1,), "mse_by_bin": (bins,), "mse": float}, where the
    error of a point is |v_fn(x, t) - b_t(x)|^2 (summed over the two coordinates, like the
    flow-matching loss) and a bin averages the points whose t falls in it.
    """
    x0 = sample_base(n, rng, base_std)                                  # (n, 2)
    x1 = DATASETS[data]["sample"](n, rng)                               # (n, 2)
    t = rng.random(n)                                                   # (n,)
    x = interpolant(x0, x1, t)                                          # (n, 2) I_t
    err = np.sum((v_fn(x, t) - exact_velocity(x, t, base_std, data)) ** 2, axis=1)   # (n,)
    k = np.minimum((t * bins).astype(int), bins - 1)                    # (n,) bin of each t
    count = np.bincount(k, minlength=bins)                              # (bins,)
    by_bin = np.bincount(k, weights=err, minlength=bins) / np.maximum(count, 1)
    return {"t_edges": np.linspace(0.0, 1.0, bins + 1), "mse_by_bin": by_bin,
            "mse": float(err.mean())}


# ---------------------------------------------------------------- appendix B: speed, memory and the cores
# Two things about the machine, not the method, cost more time than arithmetic: how freed
# memory is returned, and how the cores are shared between small matrix products (OpenBLAS
# spreads each over every core, then waits) and NumPy's element-wise passes (one core). The
# fast paths below change only the rounding, and the API takes them (the end of this appendix).


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of returning it to the system.

    A step makes and frees dozens of multi-megabyte temporaries. By default glibc hands memory
    of that size back to the kernel when it is freed, and every new temporary then page-faults
    in fresh zeroed pages. Elsewhere (macOS, musl) this does nothing. The arithmetic, and so
    every result, is unchanged.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


@functools.lru_cache(maxsize=None)
def blas_thread_count():
    """(get, set) for the number of threads of NumPy's OpenBLAS, or None for another BLAS."""
    try:
        with open("/proc/self/maps") as maps:                  # the libraries this process loaded
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:
        return None
    for path in sorted(paths):
        lib = ctypes.CDLL(path)
        for prefix, suffix in [("openblas_", ""), ("scipy_openblas_", "64_"), ("openblas_", "64_")]:
            get = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
            set_ = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
            if get and set_:
                return get, set_
    return None


def on_all_cores(work, items):
    """[work(item) for item in items], the items run side by side on all cores.

    Each thread takes whole items with a one-thread OpenBLAS, so products and element-wise
    passes both run on every core. An item's arithmetic does not depend on the thread that runs
    it, so the result is the same on every call and every machine with the same BLAS. Without
    OpenBLAS, or on one core, the items run one after another.
    """
    items = list(items)
    workers = min(core_count(), len(items))
    if blas_thread_count() is None or workers < 2:
        return [work(item) for item in items]
    errors = np.geterr()                              # threads do not inherit np.errstate

    def run(item):
        with np.errstate(**errors):
            return work(item)

    with blas_threads(1):
        futures = [worker_pool(workers).submit(run, item) for item in items]
        try:
            return [future.result() for future in futures]   # re-raises a worker's exception
        finally:
            for future in futures:                    # on an error or Ctrl-C: drop the rest
                future.cancel()


@contextlib.contextmanager
def blas_threads(n):
    """OpenBLAS on n threads inside the block, as before after it (without OpenBLAS: nothing).

    The thread count is part of a result: OpenBLAS's AVX2 kernels (Haswell, Zen) round a matrix
    product differently on one thread and on two, so a run is reproducible bit for bit only on
    the same count.
    """
    threads = blas_thread_count()
    if threads is None:
        yield
        return
    get, set_ = threads
    before = get()
    set_(n)
    try:
        yield
    finally:
        set_(before)


def core_count():
    """The cores this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


@functools.lru_cache(maxsize=None)
def worker_pool(workers):
    """One pool of threads for the whole run, rather than fresh threads at every step."""
    return ThreadPoolExecutor(workers)


# A large training step is split into two parts of the batch, one per core, whose losses and
# gradients add up to the whole batch's (loss_backward's `rows`). Splitting pays only when each
# part's products are big (on small ones the threads wait on each other and on Python's lock).
# The recipe alone decides, not the machine, so a run gives the same result on any number of
# cores.
SPLIT_ABOVE = 2 ** 26     # batch * hidden^2 above which a step is split in two


def split_batch(batch, k, parts):
    """The k-th of `parts` slices of a batch, with its share of both the diagonal and the
    off-diagonal rows."""
    n_d, n_o = len(batch["t_diag"]), len(batch["s"])
    out = {}
    for key, a in batch.items():
        n = n_d if key.endswith("_diag") else n_o if np.ndim(a) else 0
        out[key] = a[k * n // parts:(k + 1) * n // parts] if n else a
    return out


def loss_and_grads_in_parts(params, batch, method, settings, outside=None, parts=None,
                            target_weights=None, warm=1.0):
    """loss_and_grads of the whole batch; for a large step (or with `parts` given) computed as
    that many parts on all cores."""
    rows = (len(batch["t_diag"]), len(batch["s"]))
    parts = parts or (2 if sum(rows) * params["W0"].shape[1] ** 2 > SPLIT_ABOVE else 1)
    built = dict(outside=outside, target_weights=target_weights, warm=warm)   # how the target is built
    if parts == 1:
        return loss_and_grads(params, batch, method, settings, **built)
    results = on_all_cores(lambda k: loss_and_grads(params, split_batch(batch, k, parts), method,
                                                     settings, rows=rows, **built), range(parts))
    losses, grads = results[0]
    for part_losses, g in results[1:]:
        losses = tuple(a + b for a, b in zip(losses, part_losses))
        for name in grads:
            grads[name] += g[name]
    return losses, grads


# ---------------------------------------------------------------- appendix B: sampling on all cores


def jumps_in_chunks(params, method, x, steps, noise, chunk=2048):
    """jumps(), chunk by chunk on all cores, each chunk through all its jumps at once: a small
    chunk's activations stay in the cache, and both cores work on the element-wise passes too.
    x: (n, D) -> x, as jumps() gives it up to float32 rounding"""
    x = x.copy()

    def run(lo):                                        # one chunk through all the steps
        x[lo:lo + chunk] = jumps(params, method, x[lo:lo + chunk], steps, noise[:, lo:lo + chunk])

    on_all_cores(run, range(0, len(x), chunk))
    return x


# ---------------------------------------------------------------- appendix B: the API runs the fast paths
# What `import flowmap` gives runs as the command line does: glibc keeps freed memory (for the
# whole process), train() splits a large step over the cores, and sample() runs its jumps in
# chunks on all cores. The method part's own defaults are the plain paths, which a caller can
# still ask for (grads_of=loss_and_grads, run=jumps); the tests check each fast path against
# its plain one. A step too small to split trains the same weights bit for bit.
keep_freed_memory()
train.__kwdefaults__["grads_of"] = loss_and_grads_in_parts
sample.__kwdefaults__["run"] = jumps_in_chunks


# ---------------------------------------------------------------- appendix B: the benchmark
# Speed is judged against the machine itself: the matrix multiplies of a step, timed alone at
# the step's own shapes, bound what any implementation of the same arithmetic can reach.

BENCH = dict(hidden=256, depth=4, batch=2048, diag_fraction=0.75)   # the reference step


def step_gemms(cfg, method):
    """The matrix multiplies of one training step as (rows, inner, cols) triples."""
    record = METHODS[method]
    n = cfg["batch"]
    n_d = n if record["condition"] is None else int(round(n * cfg["diag_fraction"]))
    n_o = n - n_d
    n_in = sum(num_features(cfg))
    layers = list(zip([n_in] + [cfg["hidden"]] * cfg["depth"], [cfg["hidden"]] * cfg["depth"] + [2]))
    tangent = record["route"] == "derivative"
    main_rows = n + n_o * tangent                    # student pass: primal (+ tangent) rows
    own = record["teacher"] == "self"                # else the teacher's velocity is no network pass
    teacher_rows = {None: 0,
                    "lagrangian": n_o * own + 2 * n_o * (not tangent),   # v at the jump's end (+ d/dt X)
                    "eulerian": n_o * own + 2 * n_o,                # v at I_s, then a tangent pass
                    "progressive": 2 * n_o}[record["condition"]]    # two half jumps
    gemms = []
    for i, (fin, fout) in enumerate(layers):
        gemms.append((main_rows + teacher_rows, fin, fout))           # forward passes
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


def bench(methods=tuple(METHODS), steps=30, warmup=10, log=print):
    """Median ms per training step of the reference configuration, its GFLOP/s, and the GFLOP/s
    of the same multiplies timed alone. -> {method: dict}"""
    out = {}
    for method in methods:
        cfg = make_config(method, **BENCH)
        model = new_model(cfg)
        outside = outside_velocity(cfg)
        rng = np.random.default_rng(0)
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            batch = make_batch(rng, cfg["batch"], method, cfg, outside)
            train_step(model, batch, cfg["lr"], outside, grads_of=loss_and_grads_in_parts)
            times.append(time.perf_counter() - t0)
        step = float(np.median(times[warmup:]))
        gemms = step_gemms(cfg, method)
        flop = sum(2.0 * m * k * n for m, k, n in gemms)
        gemm = gemm_seconds(gemms)
        out[method] = {"ms": 1e3 * step, "gflops": flop / step / 1e9,
                       "gemm_gflops": flop / gemm / 1e9, "fraction": gemm / step}
        r = out[method]
        log(f"{method:11s} {r['ms']:7.1f} ms/step  {flop / 1e9:5.2f} GFLOP  {r['gflops']:6.1f} GFLOP/s  "
            f"matmul alone {r['gemm_gflops']:6.1f} GFLOP/s  fraction {r['fraction']:.0%}")
    return out


# ---------------------------------------------------------------- appendix C: saving, loading and checkpoints


def save(model, path):
    """Write the model to an .npz atomically: a temporary file in the same folder, then a rename."""
    arrays = {"config": np.array(json.dumps(model["config"])),
              "rng": np.array(json.dumps(model["rng"])),
              "iter": np.array(model["iter"]), "adam_step": np.array(model["adam"]["step"]),
              "history": np.asarray(model["history"])}
    for group, d in [("params", model["params"]), ("ema", model["ema"]),
                     ("adam_m", model["adam"]["m"]), ("adam_v", model["adam"]["v"])]:
        arrays.update({f"{group}/{k}": a for k, a in d.items()})
    write_atomically(path, lambda f: np.savez(f, **arrays), mode="wb")


def write_atomically(path, write, mode="w"):
    """write(f) into a temporary file in the same folder, then rename it to path: a reader
    never sees a half-written file, and a failure leaves no temporary behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
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
        group = lambda g: {k.split("/", 1)[1]: a for k, a in d.items() if k.startswith(g + "/")}
        model = {"config": json.loads(str(d["config"])), "params": group("params"), "ema": group("ema"),
                 "adam": {"m": group("adam_m"), "v": group("adam_v"), "step": int(d["adam_step"])},
                 "iter": int(d["iter"]), "rng": json.loads(str(d["rng"])), "history": d["history"]}
        # a setting added later, off (None) by default, is off in a file written before it,
        # as a run's name (named_settings) already takes it
        model["config"] = dict({k: None for k, v in DEFAULTS.items() if v is None}, **model["config"])
        if set(model["config"]) != set(DEFAULTS):
            raise ValueError(f"its settings are not this version's: it lacks "
                             f"{sorted(set(DEFAULTS) - set(model['config']))}")
        expected = init_params(np.random.default_rng(0), model["config"])
    except Exception as e:  # a zip error, a missing key, bad JSON, an unknown setting: not our file
        raise ValueError(f"{path}: not a readable flowmap model ({type(e).__name__}: {e})") from None
    for name in ("params", "ema"):
        shapes = {k: a.shape for k, a in model[name].items()}
        if shapes != {k: a.shape for k, a in expected.items()}:
            raise ValueError(f"{path}: its {name} do not match the network its config describes")
    return model


def saved_flow_model(cfg):
    """The sampling weights of the saved fm model that the config's method reads instead of the
    exact velocity (outside_setting), or None if it reads none."""
    path = cfg.get(outside_setting(METHODS[cfg["method"]]))
    return path and load_flow_model(path, cfg["data"])


def load_flow_model(path, data):
    """The sampling weights of a flow model saved by --method fm --save FILE and trained on
    `data`. Raises ValueError naming what is wrong with the file."""
    model = load(path)
    method, trained_on = model["config"]["method"], model["config"]["data"]
    if METHODS.get(method, {}).get("condition", "") is not None:   # a flow model: no condition
        raise ValueError(f"{path} holds a {method} model; a teacher or reference is a flow model "
                         f"saved by --method fm --save FILE")
    if trained_on != data:
        raise ValueError(f"{path} was trained on the {trained_on}; this run is on the {data}")
    return model["ema"]


def run_training(model, log=None, checkpoint=None, save_every=0):
    """train() as the command line and comparisons run it, on the fast paths: a progress line
    twenty times a run; with a checkpoint path, a save every `save_every` steps, at the end and
    on Ctrl-C (a first ends the step, saves and raises KeyboardInterrupt; a second quits)."""
    log = log or (lambda line: print(line, flush=True))   # flushed, so a log file keeps up
    cfg = model["config"]
    iters, start, t0 = cfg["iters"], model["iter"], time.perf_counter()
    every = max(1, iters // 20)
    interrupted = []

    def on_sigint(signum, frame):     # only notes it: a print here could cut into a print
        if interrupted:
            os.write(2, b"second Ctrl-C: quitting now\n")
            os._exit(130)
        interrupted.append(True)

    def after_step(model):
        done = model["iter"]
        if done % every == 0 or done == iters:
            rate = (done - start) / (time.perf_counter() - t0)
            left = (iters - done) / rate
            recent = model["history"][max(start, done - every):done].mean(axis=0)
            raw = f"  raw {recent[2]:.4f}" if cfg["row_weight"] else ""   # weighted: show both
            log(f"iter {done:>6}/{iters}  diag {recent[0]:.4f}  off {recent[1]:.4f}{raw}  "
                f"{rate:6.1f} it/s  left {int(left) // 60}:{int(left) % 60:02d}")
        if checkpoint and save_every and done % save_every == 0 and done < iters:
            save(model, checkpoint)
        if interrupted:
            log(f"Ctrl-C: stopped after iteration {done} (press again to quit at once)")
            if checkpoint:
                save(model, checkpoint)
                log(f"saved {checkpoint} at iteration {done}; continue with --resume {checkpoint}")
            raise KeyboardInterrupt(f"interrupted at iteration {done}")

    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    try:
        model = train(model=model, flow_model=saved_flow_model(cfg), after_step=after_step)
        if checkpoint:
            save(model, checkpoint)
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)
    return model


# ---------------------------------------------------------------- appendix D: evaluation, tables and figures
# Every score is measured against a fixed true set, beside its noise floor (a second true set)
# and, where the exact flow is known, beside the exact flow's own score.

EVAL_STEPS = (1, 2, 4, 8, 16)


def histogram_kl(x_true, x_gen, bins=60, lim=2.5):
    """KL(p || q) of 2D histograms with bins x bins cells on [-lim, lim]^2, each normalized to
    sum 1, then 1e-8 added to every bin. Points outside the square are dropped, which costs q mass."""
    edges = np.linspace(-lim, lim, bins + 1)
    p = np.histogram2d(x_true[:, 0], x_true[:, 1], bins=(edges, edges))[0]
    q = np.histogram2d(x_gen[:, 0], x_gen[:, 1], bins=(edges, edges))[0]
    p = p / max(p.sum(), 1) + 1e-8
    q = q / max(q.sum(), 1) + 1e-8
    return float(np.sum(p * np.log(p / q)))


def sliced_wasserstein(a, b, n_proj=128, seed=0):
    """Sliced Wasserstein distance: n_proj unit directions (standard normals from
    default_rng(seed), normalized), the first n = min(len(a), len(b)) points of each set
    projected on each, each projection sorted, and the root mean square of the differences of
    the sorted values over directions and points. a: (n_a, 2), b: (n_b, 2) -> float"""
    dirs = np.random.default_rng(seed).standard_normal((n_proj, 2))   # (P, 2)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    n = min(len(a), len(b))
    pa = np.sort(a[:n] @ dirs.T, axis=0)                              # (n, P) sorted projections
    pb = np.sort(b[:n] @ dirs.T, axis=0)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


def mode_balance(x, centres, off_radius):
    """Each point goes to its nearest centre. -> (largest |share - 1/K| over the K centres,
    share of points farther than off_radius from every centre)"""
    d = np.linalg.norm(x[:, None, :] - centres[None], axis=2)          # (n, K)
    share = np.bincount(d.argmin(axis=1), minlength=len(centres)) / len(x)   # (K,)
    return float(np.max(np.abs(share - 1 / len(centres)))), float(np.mean(d.min(axis=1) > off_radius))


METRICS = {   # name in a table: function of (true set, generated set); lower is better
    "KL": histogram_kl,
    "SW": sliced_wasserstein,
    "SW at 5,000": lambda a, b: sliced_wasserstein(a[:5000], b),   # the notebook's sample size
}



def label(cfg):
    """A run's name in tables, figures and file names: its method, @fm when a saved fm model
    teaches it, +ref-fm when a saved fm model is its reference."""
    return cfg["method"] + ("@fm" if cfg["teacher_file"] else "") + ("+ref-fm" if cfg["ref_file"] else "")


def tilts(method):
    return METHODS[method]["diag"] == "tilted"


def sample_tilted(n, rng, data, beta):
    """n exact samples of p_data(x) e^{beta r(x)} / Z by rejection: a data point is kept with
    probability e^{beta (r(x) - 1)} <= 1, so the kept ones are the pool reweighted by e^{beta r}.
    -> (n, 2) float64"""
    record, kept, total = DATASETS[data], [], 0
    while total < n:
        x = record["sample"](max(n, 10_000), rng)
        x = x[rng.random(len(x)) < np.exp(beta * (record["reward"](x) - 1.0))]
        kept.append(x)
        total += len(x)
    return np.concatenate(kept)[:n]



@np.errstate(all="ignore")    # a blown-up model overflows: its non-finite samples are counted
def evaluate(model, n=100_000, steps=EVAL_STEPS, seed=0, exact=True):
    """The data set's metrics at each number of steps against a fixed true set, beside their
    noise floor (a second true set), and the modes' balance. With `exact`, the ground truth too:
    the flow-map error (each sample's distance from the exact flow of the same x0), the exact
    flow's own scores and the diagonal's velocity error. A tilted method is scored against the
    tilted data, with the mean rewards; its exact flow is not known. -> dict"""
    cfg = model["config"]
    data, base_std = DATASETS[cfg["data"]], cfg["base_std"]
    if tilts(cfg["method"]):
        target = lambda rng: sample_tilted(n, rng, cfg["data"], cfg["beta"])
        exact = False
    else:
        target = lambda rng: data["sample"](n, rng)
    x_true, x_other = target(np.random.default_rng(10_000)), target(np.random.default_rng(10_001))
    samples = {k: sample(model, n, k, seed=seed) for k in steps}
    score = lambda x: {m: METRICS[m](x_true, x) for m in data["metrics"]}
    out = {"data": cfg["data"], "method": label(cfg), "n": n, "x_true": x_true,
           "samples": samples, "floor": score(x_other),
           "score": {k: score(x) for k, x in samples.items()},
           "non_finite": {k: int(np.sum(~np.isfinite(x).all(axis=1))) for k, x in samples.items()}}
    if tilts(cfg["method"]):
        untilted = data["sample"](n, np.random.default_rng(10_000))
        out["reward"] = {k: float(np.mean(data["reward"](x))) for k, x in samples.items()}
        out["target_reward"] = float(np.mean(data["reward"](x_true)))
        out["untilted"] = dict(score(untilted), reward=float(np.mean(data["reward"](untilted))))
        out["beta"], out["x_untilted"] = cfg["beta"], untilted
    if data["centres"] is not None:
        out["modes"] = {k: mode_balance(x, data["centres"], data["off_ring"]) for k, x in samples.items()}
    if exact:
        x0 = sample_base(n, np.random.default_rng(seed), base_std)   # the x0 that sample() drew
        x_exact = exact_flow(x0, 0.0, 1.0, base_std, cfg["data"])     # (n, 2)
        out["map_error"] = {k: float(np.linalg.norm(x - x_exact, axis=1).mean())
                            for k, x in samples.items()}
        out["exact"] = score(x_exact)
        params = model["ema"]
        v_fn = lambda x, t: velocity(params, x.astype(params["W0"].dtype), t).astype(np.float64)
        out["velocity_error"] = velocity_error(v_fn, base_std, cfg["data"],
                                               np.random.default_rng(seed + 1), n=n)
    return out


def format_results(results):
    """The results as a markdown table and a few lines, as the command line prints them."""
    steps = list(results["score"])
    cells = lambda values: " | ".join(f"{v:.4f}" for v in values)
    row = lambda name, values: f"| {name} | {cells(values)} |"
    metrics = list(results["floor"])
    scores = lambda where: ", ".join(f"{m} {where[m]:.4f}" for m in metrics)
    lines = [f"{results['method']} on the {results['data']}: {results['n']:,} samples; "
             f"noise floor (a second true set): {scores(results['floor'])}"
             + (f"; the exact flow: {scores(results['exact'])}" if "exact" in results else ""),
             "| steps | " + " | ".join(str(k) for k in steps) + " |",
             "|---|" + "---|" * len(steps)]
    lines += [row(m, [results["score"][k][m] for k in steps]) for m in metrics]
    if "reward" in results:
        untilted = results["untilted"]
        lines.insert(1, f"scored against the data tilted by e^({results['beta']:g} r): its mean "
                        f"reward {results['target_reward']:.4f}; the untilted data: mean reward "
                        f"{untilted['reward']:.4f}, " + scores(untilted))
        lines.append(row("mean reward", [results["reward"][k] for k in steps]))
    if "modes" in results:
        lines += [row("largest mode share off 1/8", [results["modes"][k][0] for k in steps]),
                  row("share off the modes", [results["modes"][k][1] for k in steps])]
    if "map_error" in results:
        ve = results["velocity_error"]
        lines += [row("flow-map error", [results["map_error"][k] for k in steps]),
                  f"velocity error |v(x,t,t) - b_t(x)|^2: {ve['mse']:.4f} overall; by t in tenths: "
                  + " ".join(f"{e:.3f}" for e in ve["mse_by_bin"])]
    bad = {k: c for k, c in results.get("non_finite", {}).items() if c}
    if bad:
        lines.append("warning: samples that are not finite numbers (the KL drops them): "
                     + ", ".join(f"{c:,} at {k} step{'s' * (k > 1)}" for k, c in bad.items())
                     + "; the model's weights have blown up")
    return "\n".join(lines)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_samples(results, path, title=""):
    """Target and generated samples at each number of steps, as 2D histograms side by side."""
    plt = pyplot()
    first = list(results["floor"])[0]                  # the data set's main metric
    panels = [("target", results["x_true"])] + [
        (f"{k} step{'s' * (k > 1)}: {first} {results['score'][k][first]:.3f}", results["samples"][k])
        for k in results["score"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9))
    lim = DATASETS[results["data"]]["extent"]
    edges = np.linspace(-lim, lim, 121)
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


def smoothed(losses):
    """A loss curve's moving average over a hundredth of its length. -> (steps, values)"""
    w = max(1, len(losses) // 100)
    values = np.convolve(losses, np.ones(w) / w, mode="valid")
    return np.arange(len(values)) + w, values


def plot_losses(history, path, title=""):
    """Diagonal and off-diagonal losses per step, each on its own axis, smoothed over a window.
    The diagonal loss keeps the variance of x1 - x0: only its drop is learned. Where a cap or a
    row weight makes the trained off-diagonal loss differ from the raw residual, both are drawn."""
    plt = pyplot()
    h = np.asarray(history, float)
    names = ["diagonal (flow matching)", "off-diagonal (distillation)"]
    cols = [c for c in range(2) if np.any(h[:, c])]
    fig, axes = plt.subplots(1, len(cols), figsize=(5 * len(cols), 3.2), squeeze=False)
    for ax, col in zip(axes[0], cols):
        steps, smooth = smoothed(h[:, col])
        ax.plot(steps, smooth, color=f"C{col}", label="as trained")
        lo, hi = np.quantile(smooth, [0.0, 0.98])
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        if col == 1:
            if not np.allclose(h[:, 2], h[:, 1], rtol=1e-3):
                raw_smooth = smoothed(h[:, 2])[1]
                ax.plot(steps, raw_smooth, color="0.4", ls="--", lw=1, label="raw |q - target|^2")
                ax.legend(fontsize=8)
                lo, hi = min(lo, raw_smooth.min()), max(hi, np.quantile(raw_smooth, 0.98))
            ax.set_yscale("log")
            ax.set_ylim(lo * 0.9, hi * 1.1)
        ax.set_xlabel("step")
        ax.set_title(names[col], fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@np.errstate(all="ignore")    # a blown-up model: the figure shows it, without warnings
def plot_ground_truth(model, path, n_paths=300, n_times=33, seed=0):
    """Left: learned against exact trajectories from noise to data (the learned X_{0,t}(x0), one
    jump per time; the exact flow integrated from time to time). Right: |X_{0,1}(x0) - exact|
    over the plane of starting points x0, out to 3 base stds."""
    plt = pyplot()
    cfg = model["config"]
    base_std, data = cfg["base_std"], cfg["data"]
    x0 = sample_base(n_paths, np.random.default_rng(seed), base_std)   # (P, 2)
    params = model["ema"]
    jump = lambda x, t: flow_map(params, x.astype(params["W0"].dtype), 0.0, t).astype(np.float64)
    times = np.linspace(0.0, 1.0, n_times)
    exact, learned = [x0], [x0]
    for s, t in zip(times[:-1], times[1:]):
        exact.append(exact_flow(exact[-1], s, t, base_std, data))
        learned.append(jump(x0, t))
    exact, learned = np.stack(exact), np.stack(learned)                # (T, P, 2)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 5))
    ax1.plot(exact[:, :, 0], exact[:, :, 1], color="0.6", lw=0.6)
    ax1.plot(learned[:, :, 0], learned[:, :, 1], color="tab:orange", lw=0.6, alpha=0.8)
    ax1.scatter(exact[-1, :, 0], exact[-1, :, 1], s=4, color="0.3", zorder=3, label="exact X_{0,1}")
    ax1.scatter(learned[-1, :, 0], learned[-1, :, 1], s=4, color="tab:red", zorder=3,
                label="learned X_{0,1}")
    ax1.plot([], [], color="0.6", label="exact flow")
    ax1.plot([], [], color="tab:orange", label="learned X_{0,t}, one jump each")
    ax1.set_aspect("equal")
    ax1.legend(fontsize=7, loc="upper right")
    ax1.set_title("trajectories from noise (t = 0) to data (t = 1)", fontsize=10)
    g = np.linspace(-3 * base_std, 3 * base_std, 141)
    grid = np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)         # (G, 2)
    err = np.linalg.norm(jump(grid, 1.0) - exact_flow(grid, 0.0, 1.0, base_std, data),
                         axis=1)
    im = ax2.imshow(err.reshape(len(g), len(g)), origin="lower", extent=(g[0], g[-1], g[0], g[-1]),
                    cmap="viridis", vmax=np.quantile(err, 0.99))
    circle = plt.Circle((0, 0), 2 * base_std, fill=False, color="w", ls="--", lw=0.8)
    ax2.add_patch(circle)
    fig.colorbar(im, ax=ax2, shrink=0.8, label="|X_{0,1}(x0) - exact|")
    ax2.set_title("one-jump error by starting point (dashed: 2 std of the base)", fontsize=10)
    fig.suptitle(f"{cfg['method']} on the {data}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tilt(results, path):
    """The reward r(x), the untilted data, the tilted target and the tilted map's samples at 1
    and 16 steps, side by side, each titled with its mean reward."""
    plt = pyplot()
    from matplotlib import colors
    data = DATASETS[results["data"]]
    lim = data["extent"]
    edges = np.linspace(-lim, lim, 121)
    untilted = results["x_untilted"]
    first, last = min(results["samples"]), max(results["samples"])
    panels = [("untilted data", untilted, results["untilted"]["reward"]),
              ("tilted target", results["x_true"], results["target_reward"])] + [
              (f"{results['method']}, {k} step{'s' * (k > 1)}", results["samples"][k], results["reward"][k])
              for k in (first, last)]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(2.8 * (1 + len(panels)), 3.1))
    g = np.linspace(-lim, lim, 201)
    grid = np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)
    im = axes[0].imshow(data["reward"](grid).reshape(len(g), len(g)), origin="lower", cmap="viridis",
                        extent=(-lim, lim, -lim, lim), vmin=0, vmax=1)
    axes[0].scatter(untilted[:1500, 0], untilted[:1500, 1], s=0.5, color="w", alpha=0.5)
    axes[0].set_title(f"reward r(x); tilt e^({results['beta']:g} r)", fontsize=9)
    fig.colorbar(im, ax=axes[0], shrink=0.75)
    for ax, (name, x, r) in zip(axes[1:], panels):       # a power scale shows the small modes
        ax.hist2d(x[:, 0], x[:, 1], bins=(edges, edges), cmap="magma", norm=colors.PowerNorm(0.4))
        ax.set_title(f"{name}\nmean reward {r:.3f}", fontsize=9)
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- appendix E: comparing methods over seeds
# The paper's table in one command: every method with the same recipe, over seeds. Each run
# trains on one BLAS thread, in its own process when several run side by side, so its result
# is the same whether it ran alone or beside others, on any number of cores. A run is named by
# a hash of its whole config: it is saved when it finishes and skipped by a rerun of the same
# command, and a changed recipe gives new names, never a silent reuse of old runs.

ALL_METHODS = ("lsd", "esd", "psd-mid", "psd-uni", "fm")   # --method all: the paper's table and fm
# --method teachers: the fm teacher, the distillation methods taught by it (NAME@fm: by the fm
# run of the same seed) and by the exact velocity, and self-distillation
TEACHER_METHODS = ("fm", "lmd@fm", "emd@fm", "ptd@fm", "lmd", "emd", "ptd", "lsd", "esd", "psd-mid")
# --method known: the paper's three self-distillation methods, LSD and ESD on the value route,
# and the known ways to train a consistency model or flow map, each a record of METHODS
KNOWN_METHODS = ("lsd", "lsd-value", "esd", "esd-value", "psd-mid", "meanflow", "sct", "scd",
                 "shortcut", "ayf-emd-hybrid", "ayf-lmd-hybrid")
METHOD_GROUPS = {"all": ALL_METHODS, "teachers": TEACHER_METHODS, "known": KNOWN_METHODS}


def split_label(name):
    """A label back into its method and teacher: "lmd@fm" -> ("lmd", "fm"), "lsd" -> ("lsd", "")."""
    method, _, teacher = name.partition("@")
    return method, teacher


def comparison_config(name, data, seed, folder, overrides):
    """The config of one run of a comparison; NAME@fm is NAME taught by the comparison's own fm
    run of the same seed, which is trained first (compare)."""
    method, teacher = split_label(name)
    if teacher:
        teacher_run = run_name(make_config(teacher, data, seed=seed, **overrides))
        overrides = dict(overrides, teacher_file=os.path.join(folder, teacher_run + ".npz"))
    return make_config(method, data, seed=seed, **overrides)


def named_settings(cfg):
    """A config without the settings left at None (switched off): a setting added to DEFAULTS
    later, off by default, does not make old runs look different."""
    return {k: v for k, v in cfg.items() if v is not None}


def run_name(cfg):
    """A run's file name: method, seed and a hash of its settings."""
    digest = hashlib.sha1(json.dumps(named_settings(cfg), sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg['method']}_seed{cfg['seed']}_{digest}"


def run_one(cfg, folder, n_eval):
    """Train one run of a comparison (or continue its checkpoint), evaluate it, save both.

    Writes folder/NAME.npz (the model), NAME.json (its numbers) and NAME.log (its progress);
    while training, NAME.partial.npz holds a checkpoint. -> the numbers, as in NAME.json
    """
    name = run_name(cfg)
    path = os.path.join(folder, name)
    with blas_threads(1):
        if STOPPED:
            raise KeyboardInterrupt("Ctrl-C before this run started")
        with open(path + ".log", "a") as log_file:
            log = lambda line: print(line, file=log_file, flush=True)
            partial = path + ".partial.npz"
            for earlier in (path + ".npz", partial):     # trained before, or stopped half-way
                if os.path.exists(earlier):
                    model = load(earlier)
                    break
            else:
                model = new_model(cfg)
            t0, stopped = time.perf_counter(), None
            try:
                model = run_training(model, log=log, checkpoint=partial,
                                     save_every=max(1, cfg["iters"] // 10))
            except FloatingPointError as e:     # the weights before the bad step are kept
                stopped = str(e)
                log(f"training diverged: {e}")
                save(model, partial)
            except KeyboardInterrupt:
                STOPPED.append(True)             # and start no other run in this process
                raise
            seconds = time.perf_counter() - t0
            try:                                     # evaluated again: keep the training's time
                with open(path + ".json") as f:
                    seconds += json.load(f)["train_seconds"]
            except (OSError, ValueError, KeyError):
                pass
            results = evaluate(model, n=n_eval)
            log(format_results(results))
        late = late_off_ratio(model["history"])
        numbers = {k: results[k] for k in ("floor", "score", "non_finite", "modes", "map_error", "exact",
                                           "reward", "target_reward", "untilted") if k in results}
        numbers.update(name=name, method=label(cfg), seed=cfg["seed"], config=cfg, n=n_eval,
                       train_seconds=seconds, stopped=stopped,
                       velocity_mse=results["velocity_error"]["mse"] if "velocity_error" in results else None,
                       late_off_ratio=late)
        numbers = json.loads(json.dumps(numbers))       # int step keys become strings, as read back
        os.replace(partial, path + ".npz")
        write_atomically(path + ".json", lambda f: json.dump(numbers, f, indent=1))
        return numbers


def read_run(folder, cfg, n_eval):
    """The numbers of a finished run with this config, or None."""
    try:
        with open(os.path.join(folder, run_name(cfg) + ".json")) as f:
            numbers = json.load(f)
    except (OSError, ValueError):
        return None
    same = numbers.get("n") == n_eval and named_settings(numbers.get("config", {})) == named_settings(cfg)
    return numbers if same else None


STOPPED = []     # in a comparison's worker process: Ctrl-C came, so start no further run


def stop_on_sigint():
    """An idle worker notes a Ctrl-C; a training one is stopped by train() at the step's end."""
    signal.signal(signal.SIGINT, lambda signum, frame: STOPPED.append(True))


def compare(methods, data="checkerboard", seeds=(0,), out="plots/compare", n_eval=100_000,
            workers=None, log=print, **overrides):
    """Train every method on every seed (runs side by side, one BLAS thread each), then write
    out/results.md, results.json and the comparison figures. Finished runs are kept in
    out/runs and skipped when the same command runs again. -> the list of each run's numbers"""
    folder = os.path.join(out, "runs")
    os.makedirs(folder, exist_ok=True)
    STOPPED.clear()
    teachers = {split_label(m)[1] for m in methods} - {"", *methods}
    methods = sorted(teachers) + list(methods)        # the teachers are runs of the comparison
    configs = [comparison_config(m, data, seed, folder, overrides) for seed in seeds for m in methods]
    numbers = {run_name(cfg): read_run(folder, cfg, n_eval) for cfg in configs}
    todo = [cfg for cfg in configs if numbers[run_name(cfg)] is None]
    names = {run_name(cfg) for cfg in configs}
    others = {f.split(".")[0] for f in os.listdir(folder) if f.endswith(".json")} - names
    if len(todo) < len(configs):
        log(f"{len(configs) - len(todo)} of {len(configs)} runs already finished in {folder}: skipped")
    if others:
        log(f"{len(others)} runs in {folder} have another recipe or seed and are not used")
    workers = max(1, min(workers or core_count(), len(todo)))
    t0, done = time.perf_counter(), 0

    def finished(result):
        nonlocal done
        done += 1
        numbers[result["name"]] = result
        elapsed = time.perf_counter() - t0
        left = elapsed / done * (len(todo) - done)      # runs so far, as many at a time as now
        first = DATASETS[data]["metrics"][0]
        scores = result["score"]
        log(f"[{done}/{len(todo)}] {result['method']} seed {result['seed']}: trained in "
            f"{result['train_seconds']:.0f} s; {first} {scores['1'][first]:.4f} at 1 step, "
            f"{scores[str(EVAL_STEPS[-1])][first]:.4f} at {EVAL_STEPS[-1]}; "
            f"about {int(left) // 60} min {int(left) % 60:02d} s left")

    if todo:
        log(f"training {len(todo)} runs, {workers} at a time, one BLAS thread each; "
            f"progress of each in {folder}/*.log")
    teacher_files = {cfg["teacher_file"] for cfg in configs if cfg["teacher_file"]}
    first = [cfg for cfg in todo if os.path.join(folder, run_name(cfg) + ".npz") in teacher_files]
    waves = [first, [cfg for cfg in todo if cfg not in first]]   # teachers before their students
    try:
        for wave in waves:
            run_side_by_side(wave, folder, n_eval, workers, finished)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted: {done} of {len(todo)} runs finished; the others "
                                f"saved checkpoints in {folder}; the same command continues them")
    runs = [numbers[run_name(cfg)] for cfg in configs]
    summary = summarize(runs, data, methods, wall=time.perf_counter() - t0, workers=workers,
                        trained=len(todo))
    write_atomically(os.path.join(out, "results.json"), lambda f: json.dump(summary, f, indent=1))
    write_atomically(os.path.join(out, "results.md"), lambda f: f.write(format_comparison(summary)))
    plot_comparison(summary, folder, out)
    log(f"wrote {out}/results.md, results.json, compare_samples.png, compare_kl.png, compare_loss.png")
    return runs


def run_side_by_side(configs, folder, n_eval, workers, finished):
    """run_one for each config, `workers` at a time in processes of their own (one at a time:
    here); finished(numbers) as each ends. Ctrl-C drops the queued runs, and the running ones
    save a checkpoint first."""
    if workers == 1 or len(configs) < 2:
        for cfg in configs:
            finished(run_one(cfg, folder, n_eval))
        return
    with ProcessPoolExecutor(min(workers, len(configs)), initializer=stop_on_sigint,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_one, cfg, folder, n_eval) for cfg in configs]
        try:
            for future in as_completed(futures):
                finished(future.result())
        except KeyboardInterrupt:
            for future in futures:
                future.cancel()
            raise


def machine_name():
    """The processor's name, its widest vector instructions, and the core count."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        info = ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    name = names[0] if names else "unknown processor"
    vector = "AVX-512" if "avx512f" in info else "AVX2" if "avx2" in info else ""
    return f"{name}{', ' + vector if vector else ''}, {os.cpu_count()} cores"


def mean_sd(values):
    """(mean, sample standard deviation or None for one value) of the finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
    if not len(v):
        return float("nan"), None
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None


def late_off_ratio(history):
    """The raw off-diagonal residual (no cap, no row weight) over the last quarter of training
    divided by that over the third (above 1: growing). -> ratio, or None for too short a run"""
    off = np.asarray(history, float)[:, 2]
    quarter = len(off) // 4
    third = off[-2 * quarter:-quarter].mean() if quarter else 0.0
    return float(off[-quarter:].mean() / third) if third > 0 else None


def summarize(runs, data, methods, wall, workers, trained):
    """Every run's numbers, grouped by method, with means and standard deviations over seeds."""
    first = DATASETS[data]["metrics"][0]
    steps = [str(k) for k in EVAL_STEPS]
    tables = {first: lambda r, k: r["score"][k][first]}
    if "reward" in runs[0]:
        tables["mean reward"] = lambda r, k: r["reward"][k]
    if "map_error" in runs[0]:
        tables["flow-map error"] = lambda r, k: r["map_error"][k]
    if DATASETS[data]["centres"] is not None:
        tables["share off the modes"] = lambda r, k: r["modes"][k][1]
    by_method = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        by_method[m] = {"seeds": [r["seed"] for r in rs],
                        "train_seconds": [r["train_seconds"] for r in rs],
                        "late_off_ratio": [r["late_off_ratio"] for r in rs],
                        "stopped": [r["stopped"] for r in rs],
                        **{name: {k: mean_sd([get(r, k) for r in rs]) for k in steps}
                           for name, get in tables.items()}}
    cfgs = [named_settings(r["config"]) for r in runs]
    shared = [k for k in cfgs[0] if k not in ("method", "seed") and all(c.get(k) == cfgs[0][k] for c in cfgs)]
    recipe = {k: cfgs[0][k] for k in shared}
    own = {m: {k: v for k, v in named_settings(next(r for r in runs if r["method"] == m)["config"]).items()
               if k not in shared and k not in ("method", "seed")} for m in methods}
    for m in methods:                             # each seed's teacher is that seed's fm run
        if split_label(m)[1]:
            own[m]["teacher_file"] = "the fm run of the same seed"
    return {"data": data, "metric": first, "steps": steps, "tables": list(tables),
            "floor": runs[0]["floor"], "exact": runs[0].get("exact"), "n": runs[0]["n"],
            "target_reward": runs[0].get("target_reward"), "untilted": runs[0].get("untilted"),
            "command": "python flowmap.py " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("flowmap.py") else None,
            "machine": machine_name(), "workers": workers, "wall_seconds": wall,
            "trained": trained, "recipe": recipe, "own": {m: d for m, d in own.items() if d},
            "methods": by_method, "runs": runs}


def format_comparison(summary):
    """results.md: a table per quantity, a row per method, mean +- sd over seeds; the best mean
    of each column in bold, the noise floor and the exact flow beside them."""
    steps, methods = summary["steps"], summary["methods"]
    seeds = sorted({s for m in methods.values() for s in m["seeds"]})
    lines = [f"# {summary['data']}: {len(methods)} method{'s' * (len(methods) > 1)} x {len(seeds)} "
             f"seed{'s' * (len(seeds) > 1)} "
             f"({', '.join(map(str, seeds))})", ""]
    if summary["command"]:
        lines += [f"`{summary['command']}`", ""]
    tilted = summary["target_reward"] is not None
    lines += [f"{summary['n']:,} samples per score; mean ± sample standard deviation over seeds; "
              f"lower is better" + (" (the mean reward: closer to the tilted data's)" if tilted else "")
              + "; **bold**: the best method in its column."
              + (" Scored against the data tilted toward the reward." if tilted else ""), ""]
    for name in summary["tables"]:
        main = name == summary["metric"]             # the main table also gives time and stability
        lines += [f"## {name} at 1, 2, 4, 8, 16 steps", "",
                  "| method | " + " | ".join(steps) + (" | train s | late ratio |" if main else " |"),
                  "|---|" + "---|" * (len(steps) + 2 * main)]
        off = (lambda mean: abs(mean - summary["target_reward"])) if name == "mean reward" else (lambda mean: mean)
        best = {k: min(off(m[name][k][0]) for m in methods.values()) for k in steps}
        for method, m in methods.items():
            cells = []
            for k in steps:
                mean, sd = m[name][k]
                text = f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")
                cells.append(f"**{text}**" if off(mean) == best[k] and len(methods) > 1 else text)
            ratios = [r for r in m["late_off_ratio"] if r is not None]
            late = f"{max(ratios):.2f}" if ratios else "-"
            flag = " (diverged)" if any(m["stopped"]) else ""
            lines.append(f"| {method}{flag} | " + " | ".join(cells)
                         + (f" | {np.mean(m['train_seconds']):.0f} | {late} |" if main else " |"))
        beside = {summary["metric"]: [("noise floor", summary["floor"]), ("exact flow", summary["exact"]),
                                      ("untilted data", summary["untilted"])],
                  "mean reward": [("tilted data", {name: summary["target_reward"]}),
                                  ("untilted data", {name: (summary["untilted"] or {}).get("reward")})]}
        for row, where in beside.get(name, []):
            if where is not None and where.get(name) is not None:
                lines.append(f"| *{row}* | " + " | ".join([f"{where[name]:.4f}"] * len(steps))
                             + (" | | |" if main else " |"))
        lines.append("")
    recipe = " ".join(f"{k}={v}" for k, v in summary["recipe"].items())
    own = "; ".join(f"{m}: " + " ".join(f"{k}={v}" for k, v in d.items()) for m, d in summary["own"].items())
    total = sum(r["train_seconds"] for r in summary["runs"])
    lines += ["*train s*: mean training time of a run, on one BLAS thread. *late ratio*: the "
              "raw off-diagonal residual |q - target|^2 (no cap, no row weight) over the last quarter "
              "of training divided by that over the third quarter, the largest over seeds (above 1: "
              "growing). *noise floor*: the score of a "
              "second true set" + ("; *exact flow*: of the exact flow's own samples" if summary["exact"] else "")
              + ("; *untilted data*: of the data before tilting." if tilted else "."), "",
              f"Recipe: {recipe}." + (f" Methods' own settings: {own}." if own else ""), "",
              f"Machine: {summary['machine']}. Training took {total / 60:.1f} min summed over the "
              f"runs; " + (f"this command trained {summary['trained']} of them, {summary['workers']} "
                           f"at a time, in {summary['wall_seconds'] / 60:.1f} min of wall time "
                           f"(evaluation included)." if summary["trained"] else
                           "this command reused them all from earlier ones."), ""]
    return "\n".join(lines)


def plot_comparison(summary, folder, out):
    """compare_samples.png (seed 0 of each method at each step count, one base noise, the
    target once; as many points as a score, up to 30,000), compare_kl.png (the metric against
    steps, error bars over seeds, the floor) and compare_loss.png (both losses of each method's
    first seed)."""
    plt = pyplot()
    data, metric, methods = summary["data"], summary["metric"], summary["methods"]
    n = min(summary["n"], 30_000)
    steps = [int(k) for k in summary["steps"]]
    first = {m: next(r for r in summary["runs"] if r["method"] == m)["name"] for m in methods}
    models = {m: load(os.path.join(folder, name + ".npz")) for m, name in first.items()}

    lim = DATASETS[data]["extent"]
    edges = np.linspace(-lim, lim, 101)
    hist = lambda ax, x: ax.hist2d(x[:, 0], x[:, 1], bins=(edges, edges), cmap="magma")
    fig, axes = plt.subplots(len(methods), len(steps) + 1, squeeze=False,
                             figsize=(1.9 * (len(steps) + 1), 1.9 * len(methods)))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    cfg = next(iter(models.values()))["config"]
    rng = np.random.default_rng(10_000)
    hist(axes[0, 0], sample_tilted(n, rng, data, cfg["beta"]) if tilts(cfg["method"])
         else DATASETS[data]["sample"](n, rng))
    axes[0, 0].set_title("tilted target" if tilts(cfg["method"]) else "target", fontsize=9)
    for ax in axes[1:, 0]:
        ax.axis("off")
    for i, (m, model) in enumerate(models.items()):
        for j, k in enumerate(steps):
            with np.errstate(all="ignore"):
                hist(axes[i, j + 1], np.nan_to_num(sample(model, n, k, seed=0), nan=99.0))
            if i == 0:
                axes[i, j + 1].set_title(f"{k} step{'s' * (k > 1)}", fontsize=9)
        axes[i, 1].set_ylabel(m, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare_samples.png"), dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (m, row) in enumerate(methods.items()):
        mean = [row[metric][str(k)][0] for k in steps]
        sd = [row[metric][str(k)][1] or 0.0 for k in steps]
        ax.errorbar(steps, mean, yerr=sd, marker="o", ms=4, capsize=3, label=m, color=f"C{i}")
    ax.axhline(summary["floor"][metric], color="k", lw=1, ls="--", label="noise floor")
    if summary["exact"]:
        ax.axhline(summary["exact"][metric], color="0.5", lw=1, ls=":", label="exact flow")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(steps, [str(k) for k in steps])
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(f"{metric} (mean over seeds, bars: sd)")
    ax.set_title(f"{data}: {len(summary['runs']) // len(methods)} seed(s) per method", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare_kl.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (m, model) in enumerate(models.items()):
        h = np.asarray(model["history"], float)
        for col, ax in enumerate(axes):
            if col == 1 and not np.any(h[:, 1]):
                continue                                  # fm has no off-diagonal loss
            ax.plot(*smoothed(h[:, col]), color=f"C{i}", lw=1, label=m)
    axes[0].set_ylim(*np.quantile(np.concatenate([l.get_ydata() for l in axes[0].lines]), [0.0, 0.99]))
    axes[1].set_yscale("log")
    for ax, name in zip(axes, ["diagonal (flow matching)", "off-diagonal (distillation)"]):
        ax.set_xlabel("step")
        ax.set_title(f"{name}, seed {summary['runs'][0]['seed']}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare_loss.png"), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- appendix E: one search for every known method
# Every searched method gets the same declared search, on the checkerboard with the recipe's
# budget and on a seed no table reports (TUNE_SEED). It starts from the method's source settings
# (each axis's first value) and walks its axes in order: the knobs its source ablates
# (TUNE_KNOBS), the learning rate, then the off-diagonal weight (not for a method without
# diagonal rows, whose loss it only scales). Every value of an axis is tried at the best
# settings so far, and the best run so far is kept: at most TUNE_MAX runs a method. The score,
# fixed before any run: the mean over 1, 2, 4, 8 and 16 steps of log KL; lower is better. The
# route ablations (lsd-value, esd-value) are not searched: they take their base method's
# learning rate and weight, so that the route stays their one change.

TUNED = ("lsd", "esd", "psd-mid", "meanflow", "sct", "scd", "shortcut", "ayf-emd-hybrid",
         "ayf-lmd-hybrid")
TUNE_SEED = 100
TUNE_MAX = 8
TUNE_LR = (2e-3, 1e-3, 4e-3)            # the recipe's first
TUNE_OFF_WEIGHT = (2 / 3, 2.0)          # after the source's own weight (TUNE_FROM; else 2)
TUNE_FROM = {"meanflow": 1 / 3, "shortcut": 1 / 7}    # one mean over the batch, as their code
C_KNOB = ("row_c", (0.1, 1.0))          # the c of a row weight, where the source has one
TUNE_KNOBS = {   # method: (setting, its values with the source's first), knob by knob
    "meanflow": (("row_p", (1.0, 0.0)), ("times", ("logit-normal", "triangle")),
                 ("diag_fraction", (0.75, 0.25))),
    "esd": (C_KNOB,), "sct": (C_KNOB,), "scd": (C_KNOB,), "ayf-emd-hybrid": (C_KNOB,),
    "ayf-lmd-hybrid": (C_KNOB,)}


def tune_axes(method):
    """The search's axes for a method, in order: [(setting, values, the start first)]."""
    axes = [*TUNE_KNOBS.get(method, ()), ("lr", TUNE_LR)]
    if make_config(method)["diag_fraction"] > 0:        # both kinds of rows
        weights = (TUNE_FROM.get(method, DEFAULTS["off_weight"]), *TUNE_OFF_WEIGHT)
        axes.append(("off_weight", tuple(dict.fromkeys(weights))))
    runs = 1 + sum(len(values) - 1 for _, values in axes)
    if runs > TUNE_MAX:
        raise ValueError(f"the search of {method} would take {runs} runs, above TUNE_MAX = {TUNE_MAX}")
    return axes


def tune_score(numbers):
    """The mean of log KL over EVAL_STEPS (inf for a run that made no finite sample)."""
    kl = [numbers["score"][str(k)]["KL"] for k in EVAL_STEPS]
    return float(np.mean(np.log(kl))) if all(map(math.isfinite, kl)) else math.inf


def tune_walk(method, finished):
    """The search of one method as far as the finished runs take it; finished(point) gives a
    run's numbers or None. -> (the points tried, in order; the points it waits for; the best)"""
    axes = tune_axes(method)
    best, tried = {k: values[0] for k, values in axes}, []
    for k, values in axes:
        points = [dict(best, **{k: v}) for v in values]
        waiting = [p for p in points if finished(p) is None]
        if waiting:
            return tried + [p for p in points if p not in waiting + tried], waiting, None
        tried += [p for p in points if p not in tried]
        best = min(tried, key=lambda p: tune_score(finished(p)))
    return tried, [], best


def tune(methods=TUNED, out="plots/tune", n_eval=100_000, workers=None, run=None,
         print_runs=False, command=("--tune",), log=print, **overrides):
    """The search (above) for each method: train the runs it waits for, stage by stage, and
    write out/tune.md and tune.json (so far). Runs are kept in out/runs and reused. print_runs:
    train nothing, print each waiting run as one command instead (`command` plus --run NAME,
    for a job array or GNU parallel over a shared folder); run: train that waiting run alone.
    -> {method: {"runs": [(point, numbers)], "waiting": points, "best": point or None}}"""
    searched = {"data", "seed"} | {k for m in methods for k, _ in tune_axes(m)}
    if searched & set(overrides):
        raise ValueError(f"the search sets {', '.join(sorted(searched & set(overrides)))} itself: drop it")
    folder = os.path.join(out, "runs")
    os.makedirs(folder, exist_ok=True)
    config = lambda m, p: make_config(m, "checkerboard", seed=TUNE_SEED, **dict(overrides, **p))
    def so_far():                                # the search as the finished runs take it
        walks = {m: tune_walk(m, lambda p, m=m: read_run(folder, config(m, p), n_eval)) for m in methods}
        search = {m: {"runs": [(p, read_run(folder, config(m, p), n_eval)) for p in tried],
                      "waiting": waiting, "best": best} for m, (tried, waiting, best) in walks.items()}
        write_tune_table(search, out, n_eval, overrides)
        return search

    def finished(numbers):
        log(f"{numbers['method']}: score {tune_score(numbers):.3f}  ({numbers['name']})")
        so_far()

    while True:
        search = so_far()
        waiting = {run_name(cfg): cfg for m in methods for cfg in
                   (config(m, p) for p in search[m]["waiting"])}
        if run == "done":                        # the run below is finished and in the table
            return search
        if run is not None:
            if run not in waiting:
                raise ValueError(f"{run} is not a run the search waits for now: --print-runs "
                                 f"lists those ({len(waiting)})")
            run_one(waiting[run], folder, n_eval)
            run = "done"
            continue
        if print_runs:
            for name in waiting:
                print(shlex.join(["python", "flowmap.py", *command, "--run", name]))
            log(f"{len(waiting)} runs wait; when they are done, --print-runs lists the next")
            return search
        if not waiting:
            log(f"wrote {out}/tune.md and tune.json")
            return search
        log(f"training {len(waiting)} runs of the search; progress of each in {folder}/*.log")
        run_side_by_side(list(waiting.values()), folder, n_eval, workers or core_count(), finished)


def write_tune_table(search, out, n_eval, overrides=None):
    """out/tune.md: every finished run of the search with its KL and score, the winner of each
    finished search in bold, and the settings every run overrides; out/tune.json: the numbers."""
    steps = [str(k) for k in EVAL_STEPS]
    changed = ", ".join(f"{k}={v}" for k, v in sorted((overrides or {}).items()))
    lines = [f"# The search, on the checkerboard, seed {TUNE_SEED}", "",
             *([f"Every run overrides the recipe: {changed}.", ""] if changed else []),
             f"{n_eval:,} samples per score. Score: the mean of log KL over 1, 2, 4, 8 and 16 "
             "steps, lower is better. A method's first row is its source's settings; each later "
             "row changes one setting of the best row before it; **bold**: the method's winner.",
             "", "| method | settings | KL " + " | ".join(steps) + " | score |",
             "|---|---|" + "---|" * (len(steps) + 1)]
    for m, walk in search.items():
        for point, numbers in walk["runs"]:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in point.items())
            row = [m, text] + [f"{numbers['score'][k]['KL']:.4f}" for k in steps] + \
                  [f"{tune_score(numbers):.3f}"]
            if point == walk["best"]:
                row = [f"**{cell}**" for cell in row]
            lines.append("| " + " | ".join(row) + " |")
        if walk["waiting"]:
            lines.append(f"| {m} | ({len(walk['waiting'])} runs waiting) |" + " |" * (len(steps) + 1))
    numbers = {m: {"runs": [{"settings": p, "score": tune_score(n), "name": n["name"],
                             "KL": {k: n["score"][k]["KL"] for k in steps}} for p, n in w["runs"]],
                   "waiting": w["waiting"], "best": w["best"]} for m, w in search.items()}
    write_atomically(os.path.join(out, "tune.md"), lambda f: f.write("\n".join(lines) + "\n"))
    write_atomically(os.path.join(out, "tune.json"), lambda f: json.dump(numbers, f, indent=1))


# ---------------------------------------------------------------- appendix F: the command line


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line naming the problem, exit status 2, no usage dump and no traceback."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive(kind, zero_ok=False):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not (value >= 0 if zero_ok else value > 0) or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'zero or ' * zero_ok}positive")
        return value
    parse.__name__ = f"{'non-negative' if zero_ok else 'positive'} {kind.__name__}"
    return parse


def flow_models():
    """The methods that train the diagonal alone (no condition): plain flow models, which can
    teach a method with an outside teacher (--teacher FILE, or NAME@fm in a comparison)."""
    return [m for m in METHODS if METHODS[m]["condition"] is None]


def taught_from_outside():
    return [m for m in METHODS if outside_setting(METHODS[m]) == "teacher_file"]


def method_list(text):
    """--method: a name, a comma-separated list of names, or a group (METHOD_GROUPS). An alias
    (ALIASES) stands for its method; NAME@fm is a method with an outside teacher taught by the
    fm run of the same seed in a comparison."""
    names = list(METHOD_GROUPS[text]) if text in METHOD_GROUPS else [m.strip() for m in text.split(",") if m.strip()]
    def known(name):
        method, teacher = split_label(ALIASES.get(name, name))
        return method in METHODS and (not teacher or teacher in flow_models()
                                      and method in taught_from_outside())
    unknown = [m for m in names if not known(m)]
    if unknown or not names:
        students = [f"{m}@{t}" for t in flow_models() for m in taught_from_outside()]
        raise argparse.ArgumentTypeError(
            f"unknown method {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(list(METHODS) + list(ALIASES) + students)}, a comma-separated list, or "
            f"{', '.join(METHOD_GROUPS)}")
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names a method twice")
    return names


# the recipe's flags: each overrides the config only when given, so that a data set's recipe
# and a method's defaults stay in force otherwise (make_config)
RECIPE_FLAGS = ("preset", "iters", "batch", "hidden", "depth", "lr", "off_weight", "off_cap", "beta")
FILE_FLAGS = {"teacher_file": "teacher", "ref_file": "ref"}      # setting: its flag


def tilted_by_condition():
    """--condition C: the tilted method whose off-diagonal condition is C."""
    return {METHODS[m]["condition"]: m for m in METHODS if tilts(m)}


def parse_args(argv):
    p = ArgumentParser(prog="flowmap.py", description="Train a flow map by self-distillation on "
                       "a 2D data set, then report its scores at 1, 2, 4, 8, 16 steps and plot. "
                       "With several methods or seeds: train them all and compare.")
    d = DEFAULTS
    own = lambda k: ", ".join(f"{m} {METHODS[m]['defaults'][k]:.3g}" for m in METHODS
                              if k in METHODS[m]["defaults"])      # the methods' own values
    p.add_argument("--data", choices=DATASETS,
                   help="checkerboard (scored by histogram KL and SW) or ring (eight Gaussian "
                        f"modes, scored by SW and mode balance) (default {d['data']})")
    groups = "; ".join(f"{g}: {', '.join(names)}" for g, names in METHOD_GROUPS.items())
    aliases = ", ".join(f"{a} ({m})" for a, m in ALIASES.items())
    p.add_argument("--method", type=method_list, metavar="NAME[,NAME...]",
                   help=f"one of {', '.join(METHODS)}, or an alias: {aliases} (README: the method "
                        f"table); a comma-separated list, or a group to compare ({groups}); in a "
                        f"comparison NAME@fm is NAME taught by the fm run of its seed (default "
                        f"{d['method']})")
    p.add_argument("--teacher", metavar="FILE",
                   help=f"a method with an outside teacher ({', '.join(taught_from_outside())}): "
                        f"distil this saved fm model (--method fm --save FILE) instead of the "
                        f"exact velocity")
    itm = ALIASES["itm"]
    p.add_argument("--ref", metavar="FILE",
                   help="itm: the untilted velocity is this saved fm model's, not the exact one")
    p.add_argument("--beta", type=positive(float, zero_ok=True),
                   help=f"itm: the tilt's strength; the target is the data times e^(beta r(x)) "
                        f"({METHODS[itm]['defaults']['beta']:g})")
    p.add_argument("--condition", choices=tilted_by_condition(),
                   help=f"itm: the self-distillation condition off the diagonal "
                        f"({METHODS[itm]['condition']})")
    p.add_argument("--seeds", type=positive(int), default=1, metavar="K",
                   help="train seeds --seed .. --seed + K - 1 of each method and compare (1)")
    p.add_argument("--workers", type=positive(int), metavar="N",
                   help="comparison runs side by side (default: one per core)")
    p.add_argument("--preset", choices=PRESETS,
                   help=f"long: the recipe with {PRESETS['long']['iters']:,} steps instead of "
                        f"{d['iters']:,} (PRESETS); the flags still win")
    p.add_argument("--iters", type=positive(int), help=f"training steps ({d['iters']})")
    p.add_argument("--batch", type=positive(int), help=f"rows per step ({d['batch']})")
    p.add_argument("--hidden", type=positive(int), help=f"hidden width ({d['hidden']})")
    p.add_argument("--depth", type=positive(int), help=f"hidden layers ({d['depth']})")
    p.add_argument("--lr", type=positive(float), help=f"peak learning rate ({d['lr']})")
    p.add_argument("--off-weight", type=positive(float),
                   help=f"weight of the off-diagonal loss ({d['off_weight']}; " + own("off_weight") + ")")
    p.add_argument("--off-cap", type=positive(float, zero_ok=True), metavar="C",
                   help=f"Huber cap on each off-diagonal residual's norm; 0 for plain squares "
                        f"({d['off_cap']}; {DATASETS['ring']['recipe']['off_cap']} on the ring; "
                        + own("off_cap") + ")")
    p.add_argument("--seed", type=positive(int, zero_ok=True), help=f"random seed ({d['seed']})")
    p.add_argument("--out", help="folder for the figures (plots); for a comparison, also its "
                                 "tables and runs (plots/compare_DATA, or plots/compare_DATA_GROUP "
                                 "for --method teachers or known)")
    p.add_argument("--save", metavar="FILE", help="write the model (and checkpoints) to this .npz")
    p.add_argument("--save-every", type=positive(int), metavar="K",
                   help="with --save: also write a checkpoint every K steps")
    p.add_argument("--resume", metavar="FILE", help="continue the run saved in FILE to --iters")
    p.add_argument("--load", metavar="FILE", help="skip training: sample and evaluate a saved model")
    p.add_argument("--bench", action="store_true",
                   help="time a training step of the reference 4 x 256 network for every method, "
                        "beside its matrix products alone, and exit")
    p.add_argument("--eval-samples", type=positive(int), default=100_000,
                   help="samples per score (%(default)s)")
    p.add_argument("--tune", action="store_true",
                   help=f"the search of every known method's settings (appendix E) on the "
                        f"checkerboard, seed {TUNE_SEED}: trains the runs it waits for, stage by "
                        f"stage, and writes its table to --out (plots/tune); --method picks methods")
    p.add_argument("--print-runs", action="store_true",
                   help="with --tune: print each run the search waits for as one command, and "
                        "train nothing (for a job array or GNU parallel over a shared folder)")
    p.add_argument("--run", metavar="NAME", help="with --tune: train that waiting run alone")
    args = p.parse_args(argv)
    if args.tune:
        wrong = [f"--{k.replace('_', '-')}" for k in ("data", "seed", "lr", "off_weight", "save",
                 "resume", "load", "teacher", "ref", "beta", "condition")
                 if getattr(args, k) is not None] + ["--seeds"] * (args.seeds > 1)
        if wrong:
            p.error(f"--tune sets {wrong[0]} itself (the checkerboard, seed {TUNE_SEED}, the "
                    f"settings it searches); drop it")
        args.method = args.method or list(TUNED)
        other = [m for m in args.method if m not in TUNED]
        if other:
            p.error(f"--tune searches {', '.join(TUNED)}; not {', '.join(other)}")
        args.out = args.out or "plots/tune"
        return args
    if args.print_runs or args.run:
        p.error(f"--{'print-runs' if args.print_runs else 'run'} is for --tune")
    # what was named, for a saved run to check against (main); then the defaults
    args.named = {k: getattr(args, k) for k in ("method", "data", "seed") if getattr(args, k) is not None}
    args.data = args.data or d["data"]
    args.seed = d["seed"] if args.seed is None else args.seed
    args.method = args.method or [d["method"]]
    if args.condition:                 # it picks what the alias itm stands for
        chosen = tilted_by_condition()[args.condition]
        if not all(tilts(ALIASES.get(m, m)) for m in args.method):
            p.error("--condition is for --method itm")
        named = [m for m in args.method if m not in ALIASES and m != chosen]
        if named:
            p.error(f"--condition {args.condition} is {chosen}; --method names {', '.join(named)}")
        args.method = [chosen if m in ALIASES else m for m in args.method]
    args.method = [ALIASES.get(m, m) for m in args.method]
    if len(set(args.method)) < len(args.method):
        p.error(f"--method names {', '.join(args.method)}: a method twice")
    tilted = lambda m: tilts(split_label(m)[0])
    if any(map(tilted, args.method)) and not all(map(tilted, args.method)):
        p.error("a tilted method (itm) is scored against the tilted data: compare it with tilted "
                "methods only")
    taught = lambda m: m in taught_from_outside()    # not NAME@fm: its own teacher
    for flag, fits, who in [("teacher", taught, ", ".join(taught_from_outside())), ("ref", tilted, "itm"),
                            ("beta", tilted, "itm")]:
        if getattr(args, flag) is not None and not all(map(fits, args.method)):
            p.error(f"--{flag} is for {who}, not {', '.join(m for m in args.method if not fits(m))}")
    if "method" in args.named:
        args.named["method"] = args.method[0]      # as resolved: itm is itm-lsd
    args.compare = len(args.method) > 1 or args.seeds > 1
    if not args.compare and split_label(args.method[0])[1]:
        p.error(f"{args.method[0]} is taught by the fm run of its seed in a comparison; for one run "
                f"use --method {split_label(args.method[0])[0]} --teacher FILE")
    if args.compare:
        single = [f"--{k}" for k in ("save", "resume", "load", "save_every") if getattr(args, k)]
        if single:
            p.error(f"{single[0].replace('_', '-')} works on one run; a comparison keeps each of its "
                    f"runs under --out/runs")
    elif args.workers:
        p.error("--workers is for a comparison (several methods or --seeds K)")
    group = next((g for g, names in METHOD_GROUPS.items() if g != "all" and args.method == list(names)), None)
    folder = f"plots/compare_{args.data}" + (f"_{group}" if group else "")   # beside --method all's
    args.out = args.out or (folder if args.compare else "plots")
    if args.load and args.resume:
        p.error("--load and --resume exclude each other: --load evaluates, --resume trains on")
    if args.save_every and not (args.save or args.resume):
        p.error("--save-every needs --save FILE to know where to write")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is an existing file; give a folder")
    if args.save and os.path.isdir(args.save):
        p.error(f"--save {args.save} is a folder; give a file name such as model.npz")
    return args


def fail(message, status=2):
    print(f"flowmap.py: error: {message}", file=sys.stderr)
    sys.exit(status)


def check_saved_recipe(args, given, cfg):
    """--resume continues the saved recipe, with --iters the one setting it may change; --load
    evaluates the saved model as it is. A flag that names another value is refused."""
    named = dict(given, **args.named)
    if args.resume:
        named.pop("iters", None)
    for k, value in named.items():
        if cfg.get(k) != value:
            flag = FILE_FLAGS.get(k, k).replace("_", "-")
            fail(f"--{flag} {value} differs from the saved run's {k}={cfg.get(k)}: " +
                 ("--resume continues the saved recipe and changes only --iters" if args.resume
                  else "--load evaluates the saved model as it was trained")
                 + "; drop the flag, or train a new run")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.bench:
        print(f"reference step: {BENCH}, float32, {os.cpu_count()} cores; median of 30 steps")
        bench()
        return
    given = {k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k) is not None}
    given.update({k: getattr(args, flag) for k, flag in FILE_FLAGS.items() if getattr(args, flag)})
    for flag, path in [("teacher", args.teacher), ("ref", args.ref)]:
        if path and not args.load:               # refused before anything runs
            try:
                load_flow_model(path, args.data)
            except ValueError as e:
                fail(f"--{flag} {e}")
    if args.tune:
        command = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--print-runs"]
        try:
            tune(args.method, args.out, n_eval=args.eval_samples, workers=args.workers,
                 run=args.run, print_runs=args.print_runs, command=command, **given)
        except ValueError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted: finished runs are kept, the running ones saved checkpoints; the "
                 "same command continues", status=130)
        return
    if args.compare:
        try:
            compare(args.method, args.data, range(args.seed, args.seed + args.seeds), args.out,
                    n_eval=args.eval_samples, workers=args.workers, **given)
        except KeyboardInterrupt as e:
            fail(str(e), status=130)
        return
    model = None
    if args.load or args.resume:
        try:
            model = load(args.load or args.resume)
        except ValueError as e:
            fail(f"--{'load' if args.load else 'resume'} {e}")
        check_saved_recipe(args, given, model["config"])
        print(f"loaded {args.load or args.resume}: {model['config']['method']} on the "
              f"{model['config']['data']}, {model['iter']} of {model['config']['iters']} steps")
    if not args.load:
        if model is None:
            model = new_model(make_config(args.method[0], args.data, seed=args.seed, **given))
        elif args.iters:
            model["config"]["iters"] = args.iters
        print("config: " + " ".join(f"{k}={v}" for k, v in model["config"].items()))
        checkpoint = args.save or args.resume
        t0 = time.perf_counter()
        try:
            model = run_training(model, checkpoint=checkpoint, save_every=args.save_every or 0)
        except FloatingPointError as e:
            fail(f"training diverged: {e}", status=1)
        except KeyboardInterrupt as e:
            fail(f"{e}" + ("" if checkpoint else " (nothing saved: use --save FILE)"), status=130)
        print(f"trained in {time.perf_counter() - t0:.0f} s on a {os.cpu_count()}-core machine")
        if checkpoint:
            print(f"saved {checkpoint}")
    cfg = model["config"]
    t0 = time.perf_counter()
    results = evaluate(model, n=args.eval_samples)
    print(format_results(results))
    print(f"(evaluated in {time.perf_counter() - t0:.1f} s)")
    os.makedirs(args.out, exist_ok=True)
    name = f"{cfg['data']}_{label(cfg)}"
    plot_samples(results, os.path.join(args.out, f"samples_{name}.png"),
                 title=f"{label(cfg)} on the {cfg['data']}")
    if "reward" in results:
        plot_tilt(results, os.path.join(args.out, f"tilt_{name}.png"))
    else:
        plot_ground_truth(model, os.path.join(args.out, f"ground_truth_{name}.png"))
    if len(model["history"]):
        plot_losses(model["history"], os.path.join(args.out, f"loss_{name}.png"), title=name)
    print(f"figures in {args.out}/")


if __name__ == "__main__":
    main()
