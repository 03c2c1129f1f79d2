"""Tests for flowmap.py: every gradient against central differences in float64, then the
pieces around them (Adam, data, metric, sampling, training, command line)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import flowmap as fm

HERE = os.path.dirname(os.path.abspath(__file__))
CB = "checkerboard"
SMALL = dict(hidden=8, depth=2, fourier=3, time_freqs=2)   # small enough to check every entry


def OFF(cap=0.0, row_weight=None, row_c=None, weight=2.0, diag_row_weight=None):
    """The loss's settings (flowmap.loss_settings), plain squares unless a cap is given."""
    return dict(off_weight=weight, off_cap=cap, row_weight=row_weight, row_c=row_c,
                diag_row_weight=diag_row_weight)


# ---------------------------------------------------------------- helpers


def chunks(size):
    """The all-core sampler of appendix B with chunks of this size (sample's run)."""
    return lambda *args: fm.jumps_in_chunks(*args, chunk=size)


def rel_error(a, n):
    """max|a - n| / max(1e-8, max(|a| + |n|)): relative to the size of the gradient."""
    return float(np.max(np.abs(a - n)) / max(1e-8, np.max(np.abs(a) + np.abs(n))))


def numeric_grad(f, x, h=1e-5):
    """Central differences of the scalar f() with respect to every entry of x (changed in place)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm_ = f()
        x[i] = old
        g[i] = (fp - fm_) / (2 * h)
    return g


def random_params(seed=0, data="checkerboard", **overrides):
    """float64 weights with random non-zero biases, so no check sits at a degenerate point."""
    cfg = fm.make_config("lsd", data, **dict(SMALL, **overrides))
    rng = np.random.default_rng(seed)
    params = fm.init_params(rng, cfg, dtype=np.float64)
    for k in fm.trainable(params):
        params[k] = params[k] * 1.5 + 0.3 * rng.standard_normal(params[k].shape)
    return params, cfg


def random_batch(method, seed=1, n=12, data="checkerboard"):
    cfg = fm.make_config(method, data, diag_fraction=0.5)
    return fm.make_batch(np.random.default_rng(seed), n, method, cfg, fm.outside_velocity(cfg),
                         dtype=np.float64)


def outside_of(method, data="checkerboard"):
    return fm.outside_velocity(fm.make_config(method, data))


def frozen_target(params, batch, method, data="checkerboard"):
    """The method's off-diagonal target at these weights, as the constant a gradient check holds."""
    pred, _ = fm.predict(params, batch, method)
    return fm.off_diagonal_target(params, batch, pred, method, outside_of(method, data))


# ---------------------------------------------------------------- layers, each on its own


def dual_rows(rng, n, m, width):
    return rng.standard_normal((n + m, width))


@pytest.mark.parametrize("m", [0, 3])
def test_linear_backward(m):
    rng = np.random.default_rng(0)
    n = 5
    a, w, b = dual_rows(rng, n, m, 4), rng.standard_normal((4, 3)), rng.standard_normal(3)
    dz = rng.standard_normal((n + m, 3))                    # random upstream gradient
    loss = lambda: float(np.sum(fm.linear_forward(a, w, b, n)[0] * dz))
    _, cache = fm.linear_forward(a, w, b, n)
    da, dw, db = fm.linear_backward(dz, cache)
    for analytic, x in [(da, a), (dw, w), (db, b)]:
        assert rel_error(analytic, numeric_grad(loss, x)) < 1e-8


@pytest.mark.parametrize("m", [0, 3])
def test_silu_backward(m):
    rng = np.random.default_rng(1)
    n = 5
    z = 2.0 * dual_rows(rng, n, m, 4)
    dh = rng.standard_normal((n + m, 4))
    loss = lambda: float(np.sum(fm.silu_forward(z, n)[0] * dh))
    dz = fm.silu_backward(dh, fm.silu_forward(z, n)[1])
    assert rel_error(dz, numeric_grad(loss, z)) < 1e-8


def test_silu_tangent_is_the_derivative():
    z = np.linspace(-4, 4, 9)[:, None]
    z_dot = np.ones_like(z)
    h = fm.silu_forward(np.concatenate([z, z_dot]), len(z))[0]
    numeric = (fm.silu_forward(z + 1e-6, len(z))[0] - fm.silu_forward(z - 1e-6, len(z))[0]) / 2e-6
    assert rel_error(h[len(z):], numeric) < 1e-8


def test_mlp_backward_every_parameter():
    params, _ = random_params()
    rng = np.random.default_rng(2)
    n, m = 6, 4
    a = dual_rows(rng, n, m, params["W0"].shape[0])
    dout = rng.standard_normal((n + m, 2))
    loss = lambda: float(np.sum(fm.mlp_forward(params, a, n)[0] * dout))
    grads = fm.mlp_backward(dout, fm.mlp_forward(params, a, n)[1])
    assert sorted(grads) == sorted(fm.trainable(params))
    for k in grads:
        assert rel_error(grads[k], numeric_grad(loss, params[k])) < 1e-7, k


# ---------------------------------------------------------------- dual numbers: tangents of X


def test_flow_map_is_identity_on_the_diagonal():
    params, _ = random_params()
    x = np.random.default_rng(3).standard_normal((5, 2))
    assert np.array_equal(fm.flow_map(params, x, 0.4, 0.4), x)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_scalar_times_are_the_per_row_pass(dtype):
    """A sampler's jump (one s, t for every row, as np.linspace hands them out in float64) is the
    pass with s and t given per row, and float32 stays float32."""
    params, _ = random_params()
    params = {k: a.astype(dtype) for k, a in params.items()}
    x = np.random.default_rng(3).standard_normal((9, 2)).astype(dtype)
    s, t = np.float64(0.25), np.float64(0.8125)
    row = lambda a: np.full(len(x), a, dtype)
    for got, want in [(fm.flow_map(params, x, s, t), fm.flow_map_forward(params, x, row(s), row(t))[1]),
                      (fm.velocity(params, x, s), fm.flow_map_forward(params, x, row(s), row(s))[0])]:
        assert got.dtype == dtype and np.array_equal(got, want)


@pytest.mark.parametrize("direction", ["t", "s", "x"])
def test_tangent_of_X_matches_finite_difference(direction):
    params, _ = random_params()
    rng = np.random.default_rng(4)
    n = 6
    x = rng.standard_normal((n, 2))
    s, t = rng.uniform(0, 0.5, n), rng.uniform(0.5, 1, n)
    x_dot = rng.standard_normal((n, 2)) if direction == "x" else np.zeros((n, 2))
    s_dot = np.full(n, float(direction == "s"))
    t_dot = np.full(n, float(direction == "t"))
    X_dot = fm.flow_map_forward(params, x, s, t, tangent=(x_dot, s_dot, t_dot))[2]
    h = 1e-6
    X = lambda e: fm.flow_map(params, x + e * x_dot, s + e * s_dot, t + e * t_dot)
    assert rel_error(X_dot, (X(h) - X(-h)) / (2 * h)) < 1e-7


def test_tangent_rows_pair_with_the_last_primal_rows():
    """M < N tangent rows belong to the last M points, as every layer assumes."""
    params, _ = random_params()
    rng = np.random.default_rng(5)
    x, s, t = rng.standard_normal((7, 2)), rng.uniform(0, .5, 7), rng.uniform(.5, 1, 7)
    tan = (np.zeros((3, 2)), np.zeros(3), np.ones(3))
    part = fm.flow_map_forward(params, x, s, t, tan)[2]
    full = fm.flow_map_forward(params, x, s, t, (np.zeros((7, 2)), np.zeros(7), np.ones(7)))[2]
    assert np.allclose(part, full[4:])


# ---------------------------------------------------------------- every loss, every parameter, both data sets


@pytest.mark.parametrize("data", list(fm.DATASETS))
@pytest.mark.parametrize("cap", [0.0, fm.DEFAULTS["off_cap"]])
@pytest.mark.parametrize("method", list(fm.METHODS))
def test_loss_gradient_every_parameter(method, cap, data):
    """Plain squares and the default Huber cap, on a batch of each data set. Under the cap, each
    row's residual keeps its direction but is rescaled to a norm from 0.3 to 3 caps (the target
    is a constant in the check either way), so both branches of the Huber loss are checked."""
    params, _ = random_params(seed=6, data=data)
    batch = random_batch(method, data=data)
    assert np.all(batch["s"] < batch["t"])                  # off the diagonal, not only s = t
    target = None
    if fm.METHODS[method]["condition"]:                      # the frozen teacher: a constant here
        target = frozen_target(params, batch, method, data)
        if cap:
            q = fm.predict(params, batch, method)[0]["q"]
            r = q - target
            norms = cap * np.geomspace(0.3, 3.0, len(r))[:, None]
            target = q - r / np.linalg.norm(r, axis=1, keepdims=True) * norms
    frozen = batch
    if fm.tilts(method):     # the ITM target holds sg(v(I_t, t, t)): a constant in the check too
        v = fm.predict(params, batch, method)[0]["v_diag"]
        frozen = {k: a for k, a in batch.items() if k not in ("ref_diag", "dI_diag", "tilt_diag")}
        frozen["target_diag"] = fm.diagonal_target(batch, v)
        assert np.abs(frozen["target_diag"] - batch["ref_diag"]).max() > 0.1   # the tilt is not nothing
    total = lambda: (lambda r: r[0] + 2.0 * r[1])(
        fm.loss_and_grads(params, frozen, method, OFF(cap), target)[0])
    losses, grads = fm.loss_and_grads(params, batch, method, OFF(cap), target)
    assert (losses[1] > 0) == (method != "fm")
    assert losses == fm.loss_and_grads(params, frozen, method, OFF(cap), target)[0]
    for k in fm.trainable(params):
        assert rel_error(grads[k], numeric_grad(total, params[k])) < 1e-6, (method, k)


@pytest.mark.parametrize("method", ["sct", "scd"])
def test_loss_gradient_without_diagonal_rows(method):
    """sct and scd train no diagonal rows (diag_fraction 0): the diagonal loss is 0, and the
    off-diagonal loss, normalised as the record says, has the finite-difference gradient (the
    target and the row weights frozen)."""
    params, _ = random_params(seed=9)
    cfg = fm.make_config(method)
    batch = fm.make_batch(np.random.default_rng(2), 12, method, cfg, fm.outside_velocity(cfg),
                          dtype=np.float64)
    assert len(batch["t_diag"]) == 0
    target = frozen_target(params, batch, method)
    r = fm.predict(params, batch, method)[0]["q"] - target
    w = 1.0 / (np.linalg.norm(r, axis=1) + cfg["row_c"])          # frozen at these weights
    held = lambda: 2.0 * np.mean(w * ((fm.predict(params, batch, method)[0]["q"] - target) ** 2).sum(1))
    (loss_d, loss_off, _), grads = fm.loss_and_grads(params, batch, method, fm.loss_settings(cfg), target)
    assert loss_d == 0.0 and loss_off == pytest.approx(np.mean(w * (r * r).sum(1)), rel=1e-12)
    for k in fm.trainable(params):
        assert rel_error(grads[k], numeric_grad(held, params[k])) < 1e-6, k


def test_D_b_v_is_the_derivative_of_v_along_b_1_0():
    """One forward-mode pass along (x_dot, s_dot, t_dot) = (b, 1, 0) moves X by
    R = b - v + (t - s) D_b v: D_b v read off it matches central differences of v(x + h b, s + h, t)."""
    params, _ = random_params(seed=30)
    rng = np.random.default_rng(30)
    n = 7
    x, b = rng.standard_normal((n, 2)), rng.standard_normal((n, 2))
    s, t = rng.uniform(0, 0.5, n), rng.uniform(0.5, 1, n)
    v, _, R = fm.flow_map_forward(params, x, s, t, tangent=(b, np.ones(n), np.zeros(n)))[:3]
    D_b_v = (R - b + v) / (t - s)[:, None]
    h = 1e-6
    v_at = lambda e: fm.flow_map_forward(params, x + e * b, s + e, t)[0]
    assert rel_error(D_b_v, (v_at(h) - v_at(-h)) / (2 * h)) < 1e-7


@pytest.mark.parametrize("data", list(fm.DATASETS))
@pytest.mark.parametrize("tangent_method", ["lsd", "esd"])
def test_the_value_route_has_the_tangent_routes_value_and_a_gradient_through_v(tangent_method, data,
                                                                              monkeypatch):
    """The same condition on the value route: q is v itself, its residual v - sg(target) is the
    tangent route's residual on the same batch (Lagrangian: d/dt X - b; Eulerian: minus
    R = d/ds X + grad_x X . b), so the loss has the same value, and its off-diagonal gradient is
    2 (dv/dtheta)^T (v - target) / n_o: checked against central differences of
    theta -> (2 / n_o) sum v_theta . (v - target), the residual held fixed."""
    monkeypatch.setitem(fm.METHODS, "value", dict(fm.METHODS[tangent_method], route="value"))
    params, _ = random_params(seed=31, data=data)
    batch = random_batch("value", data=data)
    pred = fm.predict(params, batch, "value")[0]
    v_off = fm.flow_map_forward(params, batch["x_off"], batch["s"], batch["t"])[0]
    assert not pred["q_is_tangent"] and np.allclose(pred["q"], v_off, rtol=1e-12, atol=1e-12)
    residual = pred["q"] - fm.off_diagonal_target(params, batch, pred, "value")        # v - sg(target)
    tangent_pred = fm.predict(params, batch, tangent_method)[0]
    R = tangent_pred["q"] - fm.off_diagonal_target(params, batch, tangent_pred, tangent_method)
    assert rel_error(residual, R if tangent_method == "lsd" else -R) < 1e-10
    assert fm.loss_and_grads(params, batch, "value", OFF())[0][2] == pytest.approx(
        fm.loss_and_grads(params, batch, tangent_method, OFF())[0][2], rel=1e-10)
    with_off = fm.loss_and_grads(params, batch, "value", OFF(weight=1.0))[1]
    without = fm.loss_and_grads(params, batch, "value", OFF(weight=0.0))[1]
    n_o = len(batch["s"])
    off_part = lambda: (2.0 / n_o) * float(np.sum(fm.predict(params, batch, "value")[0]["q"] * residual))
    for k in fm.trainable(params):
        assert rel_error(with_off[k] - without[k], numeric_grad(off_part, params[k])) < 1e-6, k


def test_the_conditional_teacher_reads_the_rows_own_velocity():
    """meanflow and sct are taught by the row's own x1 - x0 (dI_off, of the same draw as its
    I_s): at s = t the Eulerian target v + R, R = b - v + (t - s) D_b v, is b = x1 - x0 itself,
    flow matching's target; at s < t it is not."""
    params, _ = random_params(seed=32)
    batch = random_batch("meanflow", n=24)
    pred = fm.predict(params, batch, "meanflow")[0]
    assert np.abs(fm.off_diagonal_target(params, batch, pred, "meanflow") - batch["dI_off"]).max() > 1e-3
    same = dict(batch, s=batch["t"].copy())
    same["x_off"] = batch["x_off"] + (batch["t"] - batch["s"])[:, None] * batch["dI_off"]   # I_t
    pred = fm.predict(params, same, "meanflow")[0]
    np.testing.assert_allclose(fm.off_diagonal_target(params, same, pred, "meanflow"),
                               batch["dI_off"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["ayf-emd", "ayf-lmd"])
def test_the_warm_up_scales_the_tangent_term(method):
    """The factor grows linearly from 0 at the first step to 1 at derivative_warmup, and train_step
    hands the step's factor to the loss; at 0 the value route's target is the teacher's velocity
    where the condition reads it (b(I_s, s) for the Eulerian, b(X, t) for the Lagrangian), and
    at 1/2 it is halfway to the full target."""
    cfg = fm.make_config(method)
    assert cfg["derivative_warmup"] == 2000
    assert [fm.derivative_factor(cfg, it) for it in (0, 500, 2000, 9000)] == [0.0, 0.25, 1.0, 1.0]
    assert fm.derivative_factor(fm.make_config("esd-value"), 0) == 1.0    # no warm-up: the whole term
    model = fm.new_model(fm.make_config(method, derivative_warmup=4, **SMALL))
    seen, outside = [], fm.outside_velocity(model["config"])
    spy = lambda *a, **k: seen.append(k["warm"]) or fm.loss_and_grads(*a, **k)
    for it in range(6):                          # train() counts the steps in model["iter"]
        model["iter"] = it
        fm.train_step(model, fm.make_batch(np.random.default_rng(0), 32, method, model["config"], outside),
                      1e-3, outside, grads_of=spy)
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    params, _ = random_params(seed=33)
    batch = random_batch(method, n=24)
    pred = fm.predict(params, batch, method)[0]
    outside = outside_of(method)
    target = lambda warm: fm.off_diagonal_target(params, batch, pred, method, outside, warm)
    s, t = batch["s"], batch["t"]
    b = outside(batch["x_off"], s) if method == "ayf-emd" else outside(pred["X_off"], t)
    np.testing.assert_allclose(target(0.0), b, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(target(0.5), (target(0.0) + target(1.0)) / 2, rtol=1e-10, atol=1e-10)
    assert np.abs(target(1.0) - b).max() > 1e-2


@pytest.mark.parametrize("weight", ["adaptive", "normalized"])
def test_weights_that_read_the_residual_are_held_fixed_in_the_gradient(weight):
    """MeanFlow's adaptive weight (a row pulls as 2 r / (|r|^2 + c), on the diagonal's rows too)
    and the tangent normalisation (2 r / (|r| + c), off the diagonal) read the residual r, yet
    are frozen like the other row weights: the gradient is that of the loss with each row's
    weight held at its value, and measurably not that of the weighted loss with the weight
    moving. The off-diagonal loss is the mean of w^2 |r|^2."""
    method = "meanflow"
    params, _ = random_params(seed=34)
    batch = random_batch(method, n=24)
    target = frozen_target(params, batch, method)
    pred = fm.predict(params, batch, method)[0]
    norm2 = lambda r: (r * r).sum(1)
    r_o, r_d = pred["q"] - target, pred["v_diag"] - batch["target_diag"]
    if weight == "adaptive":
        c = float(np.median(norm2(r_o)))
        pull = lambda r: 1.0 / (norm2(r) + c)
        pull_d = pull(r_d)
    else:
        c = float(np.median(np.sqrt(norm2(r_o))))
        pull = lambda r: 1.0 / (np.sqrt(norm2(r)) + c)
        pull_d = np.ones(len(r_d))
    w_o = pull(r_o)
    assert w_o.max() > 1.5 * w_o.min()                           # the weights differ between rows
    off = OFF(row_weight=weight, row_c=c, diag_row_weight="adaptive" if weight == "adaptive" else None)
    (loss_d, loss_off, raw_off), grads = fm.loss_and_grads(params, batch, method, off, target)
    assert loss_off == pytest.approx(np.mean(w_o * norm2(r_o)), rel=1e-12)
    assert loss_d == pytest.approx(np.mean(pull_d * norm2(r_d)), rel=1e-12)
    assert raw_off == pytest.approx(np.mean(norm2(r_o)), rel=1e-12)

    def held():                                   # the weights frozen at their values
        p = fm.predict(params, batch, method)[0]
        return (np.mean(pull_d * norm2(p["v_diag"] - batch["target_diag"]))
                + 2.0 * np.mean(w_o * norm2(p["q"] - target)))
    moving = lambda: (lambda r: r[0] + 2.0 * r[1])(fm.loss_and_grads(params, batch, method, off, target)[0])
    for k in ("W0", "b1", "W2"):
        assert rel_error(grads[k], numeric_grad(held, params[k])) < 1e-6, k
        assert rel_error(grads[k], numeric_grad(moving, params[k])) > 1e-3, k


def test_the_ema_teacher_builds_the_shortcut_target():
    """shortcut's target is built by the sampling (EMA) weights, lsd's by the current ones:
    train_step hands each method its record's weights, and the loss builds the target from
    them."""
    cfg = fm.make_config("shortcut", **SMALL)
    model = fm.new_model(cfg)
    for k in fm.trainable(model["ema"]):
        model["ema"][k] = model["ema"][k] + 0.1                 # the EMA apart from the weights
    batch = fm.make_batch(np.random.default_rng(0), 64, "shortcut", cfg)
    seen = []
    spy = lambda *a, **k: seen.append(k["target_weights"]) or fm.loss_and_grads(*a, **k)
    ema = model["ema"]
    fm.train_step(model, batch, 1e-3, grads_of=spy)
    assert seen[0] is ema
    lsd = fm.new_model(fm.make_config("lsd", **SMALL))
    fm.train_step(lsd, fm.make_batch(np.random.default_rng(0), 64, "lsd", lsd["config"]), 1e-3,
                  grads_of=spy)
    assert seen[1] is lsd["params"]
    params = model["params"]
    pred = fm.predict(params, batch, "shortcut")[0]
    by_ema = fm.off_diagonal_target(ema, batch, pred, "shortcut")
    assert np.abs(by_ema - fm.off_diagonal_target(params, batch, pred, "shortcut")).max() > 1e-3
    off = fm.loss_settings(cfg)
    assert (fm.loss_and_grads(params, batch, "shortcut", off, target_weights=ema)[0]
            == fm.loss_and_grads(params, batch, "shortcut", off, by_ema)[0])


@pytest.mark.parametrize("method", ["lsd", "psd-mid", "lmd"])
def test_huber_capped_loss_gradient(method):
    """With the cap at the median residual, half the rows are on the squared branch and half on
    the linear one; the gradient must be right on both. A cap above every residual is no cap."""
    params, _ = random_params(seed=13)
    batch = random_batch(method, n=24)
    pred, _ = fm.predict(params, batch, method)
    target = frozen_target(params, batch, method)
    norms = np.linalg.norm(pred["q"] - target, axis=1)
    cap = float(np.median(norms))
    assert (norms > cap * 1.01).sum() >= 3 and (norms < cap * 0.99).sum() >= 3
    total = lambda cap: (lambda r: r[0] + 2.0 * r[1])(
        fm.loss_and_grads(params, batch, method, OFF(cap), target)[0])
    grads = fm.loss_and_grads(params, batch, method, OFF(cap), target)[1]
    for k in fm.trainable(params):
        assert rel_error(grads[k], numeric_grad(lambda: total(cap), params[k])) < 1e-6, (method, k)
    plain = fm.loss_and_grads(params, batch, method, OFF(), target)
    loose = fm.loss_and_grads(params, batch, method, OFF(2 * norms.max()), target)
    assert plain[0] == loose[0]
    assert all(np.allclose(plain[1][k], loose[1][k], rtol=1e-12, atol=0) for k in plain[1])
    assert total(cap) < total(0.0)              # the cap only ever lowers a row's loss


@pytest.mark.parametrize("gap", [False, True])
@pytest.mark.parametrize("cap", [0.0, 0.3])
@pytest.mark.parametrize("method", ["esd", "emd", "lsd"])
def test_row_weighted_loss_gradient(method, cap, gap):
    """With row_weight "target" each row's residual is weighted by c / (c + |target|), with
    "gap" by c / (c + (t - s)|target|), the target frozen: the loss is the mean of
    rho(w |r|), and its gradient must be right with and without a cap."""
    params, _ = random_params(seed=21)
    batch = random_batch(method, n=24)
    pred, _ = fm.predict(params, batch, method)
    target = frozen_target(params, batch, method)
    steep = np.linalg.norm(target, axis=1) * ((batch["t"] - batch["s"]) if gap else 1.0)
    c = float(np.median(steep))                               # half the rows above c, half below
    off = OFF(cap, row_weight="gap" if gap else "speed", row_c=c)
    total = lambda: (lambda r: r[0] + 2.0 * r[1])(fm.loss_and_grads(params, batch, method, off, target)[0])
    (_, loss_off, raw_off), grads = fm.loss_and_grads(params, batch, method, off, target)
    for k in fm.trainable(params):
        assert rel_error(grads[k], numeric_grad(total, params[k])) < 1e-6, (method, k)
    w = c / (c + steep)
    assert w.min() < 0.4 and w.max() > 0.6                    # the weights differ between rows
    r = w * np.linalg.norm(pred["q"] - target, axis=1)
    rho = r ** 2 if not cap else np.where(r > cap, 2 * cap * r - cap ** 2, r ** 2)
    assert loss_off == pytest.approx(rho.mean(), rel=1e-12)
    plain = fm.loss_and_grads(params, batch, method, OFF(cap), target)[0][1]
    assert loss_off < plain                     # every weight is below 1
    raw = (np.linalg.norm(pred["q"] - target, axis=1) ** 2).mean()
    assert raw_off == pytest.approx(raw, rel=1e-12)                # no cap, no weight


def test_method_defaults_and_the_cap_flag():
    assert fm.make_config("lmd")["off_cap"] == 1.0
    assert fm.make_config("lsd")["off_cap"] == fm.DEFAULTS["off_cap"] > 0
    assert fm.make_config("lmd", off_cap=0.0)["off_cap"] == 0.0      # an override wins
    assert fm.make_config("esd")["row_weight"] == "gap" and fm.make_config("emd")["row_weight"] == "speed"
    assert fm.make_config("lmd", "ring")["off_cap"] == 1.0           # the method's beats the data's
    assert fm.make_config("lsd", "ring")["off_cap"] == fm.DATASETS["ring"]["recipe"]["off_cap"]
    for data, record in fm.DATASETS.items():                         # the base std is the data's
        cfg = fm.make_config("lsd", data)
        assert cfg["base_std"] == record["std"] and cfg["data"] == data
        assert all(cfg[k] == v for k, v in record["recipe"].items())
    assert fm.make_config("itm", "ring")["method"] == "itm-lsd"          # as --method itm
    with pytest.raises(ValueError, match="ref_file is for methods that read it"):
        fm.make_config("lmd", ref_file="fm.npz")                         # lmd's file is its teacher
    with pytest.raises(ValueError, match="teacher_file is for methods that read it"):
        fm.make_config("itm", teacher_file="fm.npz")
    with pytest.raises(ValueError, match="unknown data set"):
        fm.make_config("lsd", "spiral")
    with pytest.raises(ValueError, match="unknown setting"):
        fm.make_config("lsd", fourier_sclae=1.0)


def test_a_preset_sits_between_the_defaults_and_the_flags():
    for name, preset in fm.PRESETS.items():
        cfg = fm.make_config("lsd", preset=name)
        assert cfg["preset"] == name and all(cfg[k] == v for k, v in preset.items())
        assert fm.make_config("lsd", preset=name, iters=7)["iters"] == 7          # a flag wins
        assert fm.make_config("lmd", "ring", preset=name)["off_cap"] == 1.0      # so does a method
        assert fm.run_name(cfg) != fm.run_name(fm.make_config("lsd"))
    assert fm.make_config("lsd")["preset"] is None
    with pytest.raises(ValueError, match="unknown preset"):
        fm.make_config("lsd", preset="longer")


@pytest.mark.parametrize("method", ["lsd", "esd", "psd-mid"])
def test_teacher_is_frozen_inside_the_step(method):
    """Without a target passed in, the target is built from the current weights, yet no gradient
    flows through it: the step's gradient is the finite-difference gradient of the loss with the
    target held fixed, and measurably not the one with the target moving with the weights."""
    params, _ = random_params(seed=7)
    batch = random_batch(method)
    grads = fm.loss_and_grads(params, batch, method, OFF())[1]
    held = frozen_target(params, batch, method)
    total = lambda target: (lambda r: r[0] + 2.0 * r[1])(
        fm.loss_and_grads(params, batch, method, OFF(), target)[0])
    for k in ("W0", "b1"):
        fixed = numeric_grad(lambda: total(held), params[k])
        moving = numeric_grad(lambda: total(frozen_target(params, batch, method)), params[k])
        assert rel_error(grads[k], fixed) < 1e-6, k
        assert rel_error(grads[k], moving) > 1e-3, k            # the teacher's own slope is real


def test_lsd_target_is_the_diagonal_velocity_at_the_jump():
    params, _ = random_params(seed=8)
    batch = random_batch("lsd")
    X = fm.flow_map(params, batch["x_off"], batch["s"], batch["t"])
    assert np.allclose(frozen_target(params, batch, "lsd"), fm.velocity(params, X, batch["t"]))


@pytest.mark.parametrize("method", ["psd-uni", "ptd"])
def test_progressive_target_is_the_two_jump_composition(method):
    params, _ = random_params(seed=9)
    batch = random_batch(method)
    x, s, u, t = batch["x_off"], batch["s"], batch["u"], batch["t"]
    two = fm.flow_map(params, fm.flow_map(params, x, s, u), u, t)
    assert np.allclose(x + (t - s)[:, None] * frozen_target(params, batch, method), two)


@pytest.mark.parametrize("data", list(fm.DATASETS))
@pytest.mark.parametrize("method, velocity_of", [
    ("esd", lambda params, x, s, data: fm.velocity(params, x, s)),
    ("emd", lambda params, x, s, data: fm.exact_velocity(x, s, fm.DATASETS[data]["std"], data))])
def test_eulerian_target_is_minus_the_jacobian_along_the_teacher(method, velocity_of, data):
    params, _ = random_params(seed=11, data=data)
    batch = random_batch(method, data=data)
    x, s, t = batch["x_off"], batch["s"], batch["t"]
    b = velocity_of(params, x, s, data)
    h = 1e-6
    jvp = (fm.flow_map(params, x + h * b, s, t) - fm.flow_map(params, x - h * b, s, t)) / (2 * h)
    assert rel_error(frozen_target(params, batch, method, data), -jvp) < 1e-6


@pytest.mark.parametrize("data", list(fm.DATASETS))
def test_lmd_target_and_diagonal_are_the_exact_velocity(data):
    params, _ = random_params(seed=12, data=data)
    batch = random_batch("lmd", data=data)
    std = fm.DATASETS[data]["std"]
    X = fm.flow_map(params, batch["x_off"], batch["s"], batch["t"])
    assert np.allclose(frozen_target(params, batch, "lmd", data), fm.exact_velocity(X, batch["t"], std, data))
    assert np.allclose(batch["target_diag"], fm.exact_velocity(batch["x_diag"], batch["t_diag"], std, data))


@pytest.mark.parametrize("method", [m for m in fm.METHODS if fm.METHODS[m]["times"] == "triangle"])
def test_batch_layout(method):
    """Diagonal rows regress on x1 - x0 of the same draw (or on the exact velocity), off-diagonal
    rows have s < u < t (u the midpoint for the midpoint methods), and fm has no off rows. (The
    other time samplers: test_times_*.)"""
    cfg = fm.make_config(method)
    batch = fm.make_batch(np.random.default_rng(3), 400, method, cfg,
                          fm.outside_velocity(cfg), dtype=np.float64)
    n_o = len(batch["s"])
    assert n_o == (0 if method == "fm" else 100) and len(batch["t_diag"]) == 400 - n_o
    assert np.all((0 <= batch["t_diag"]) & (batch["t_diag"] < 1))
    if n_o:
        s, u, t = batch["s"], batch["u"], batch["t"]
        assert np.all((0 <= s) & (s < u) & (u < t) & (t < 1))
        if fm.METHODS[method]["u"] == "mid":
            np.testing.assert_allclose(u, (s + t) / 2, rtol=1e-15)
        else:
            assert np.abs(u - (s + t) / 2).max() > 0.05            # drawn, not the midpoint
    # replay the draw: the rows are I_t of the same x0, x1 that give the target x1 - x0
    rng = np.random.default_rng(3)
    x0, x1 = fm.sample_base(400, rng, cfg["base_std"]), fm.sample_checkerboard(400, rng)
    t_diag = rng.random(400 - n_o)
    n_d = 400 - n_o
    np.testing.assert_allclose(batch["x_diag"], fm.interpolant(x0[:n_d], x1[:n_d], t_diag), rtol=1e-12)
    if fm.METHODS[method]["diag"] == "x1 - x0":
        np.testing.assert_allclose(batch["target_diag"], (x1 - x0)[:n_d], rtol=1e-12)
    if fm.tilts(method):
        np.testing.assert_allclose(batch["dI_diag"], (x1 - x0)[:n_d], rtol=1e-12)
        np.testing.assert_allclose(batch["tilt_diag"], np.expm1(4.0 * fm.reward_bump(x1[:n_d], (2, 2))),
                                   rtol=1e-12)


def replay_draw(n, cfg, seed):
    """x0, x1 as make_batch draws them first."""
    rng = np.random.default_rng(seed)
    return fm.sample_base(n, rng, cfg["base_std"]), fm.sample_checkerboard(n, rng)


def test_times_to_the_data():
    """sct and scd: no diagonal rows; every row jumps to t = 1 from I_s of its own draw, with s
    from sCM's proposal, logit-normal around sigmoid(log 0.5 + 1) = 0.58."""
    cfg = fm.make_config("sct")
    batch = fm.make_batch(np.random.default_rng(3), 4000, "sct", cfg, dtype=np.float64)
    s = batch["s"]
    assert len(batch["t_diag"]) == 0 and np.all(batch["t"] == 1.0) and np.all((0 < s) & (s < 1))
    logit = np.log(s / (1 - s))
    assert abs(logit.mean() - (math.log(0.5) + 1.0)) < 0.1 and abs(logit.std() - 1.4) < 0.1
    x0, x1 = replay_draw(4000, cfg, 3)
    np.testing.assert_allclose(batch["x_off"], fm.interpolant(x0, x1, s), rtol=1e-12)
    np.testing.assert_allclose(batch["dI_off"], x1 - x0, rtol=1e-12)


def test_times_on_dyadic_gaps():
    """shortcut: gaps t - s = 2^-k for k = 0..6, each s on its gap's grid, u the midpoint, so both
    halves are jumps of the next level; the diagonal on the grid of 1/128; an eighth of the rows
    off the diagonal."""
    cfg = fm.make_config("shortcut")
    batch = fm.make_batch(np.random.default_rng(4), 1600, "shortcut", cfg, dtype=np.float64)
    s, u, t = batch["s"], batch["u"], batch["t"]
    assert len(s) == 200
    k = -np.log2(t - s)
    assert np.array_equal(k, np.round(k)) and set(k.astype(int)) == set(range(7))
    assert np.array_equal(s / (t - s), np.round(s / (t - s))) and np.all(t <= 1)
    assert np.array_equal(u, (s + t) / 2)
    grid = batch["t_diag"] * 128
    assert np.array_equal(grid, np.round(grid)) and grid.max() <= 127


def test_times_of_meanflow():
    """meanflow: 75% of the rows at s = t; off them a sorted pair of logit-normal(0.4, 1) times
    (MeanFlow's logit-normal(-0.4, 1) with time reversed); a diagonal row keeps the earlier time
    of its pair, whose logit has mean 0.4 - 1 / sqrt(pi)."""
    cfg = fm.make_config("meanflow")
    batch = fm.make_batch(np.random.default_rng(5), 8000, "meanflow", cfg, dtype=np.float64)
    logit = lambda x: np.log(x / (1 - x))
    assert len(batch["t_diag"]) == 6000 and np.all(batch["s"] < batch["t"])
    both = logit(np.concatenate([batch["s"], batch["t"]]))
    assert abs(both.mean() - 0.4) < 0.08 and abs(both.std() - 1.0) < 0.06
    assert abs(logit(batch["t_diag"]).mean() - (0.4 - 1 / math.sqrt(math.pi))) < 0.05
    x0, x1 = replay_draw(8000, cfg, 5)
    np.testing.assert_allclose(batch["x_diag"], fm.interpolant(x0[:6000], x1[:6000], batch["t_diag"]),
                               rtol=1e-12)
    np.testing.assert_allclose(batch["target_diag"], (x1 - x0)[:6000], rtol=1e-12)


# ---------------------------------------------------------------- Adam


def test_adam_matches_a_step_by_hand():
    rng = np.random.default_rng(10)
    p = {"W0": rng.standard_normal((3, 2))}
    g1, g2 = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    state = {"m": {"W0": np.zeros((3, 2))}, "v": {"W0": np.zeros((3, 2))}, "step": 0}
    p0 = p["W0"].copy()
    fm.adam_update(p, {"W0": g1}, state, lr=0.1)
    # first step: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps)
    assert np.allclose(p["W0"], p0 - 0.1 * g1 / (np.abs(g1) + 1e-8))
    p1 = p["W0"].copy()
    fm.adam_update(p, {"W0": g2}, state, lr=0.1)
    m = 0.9 * 0.1 * g1 + 0.1 * g2
    v = 0.999 * 0.001 * g1 ** 2 + 0.001 * g2 ** 2
    m_hat, v_hat = m / (1 - 0.9 ** 2), v / (1 - 0.999 ** 2)
    assert np.allclose(p["W0"], p1 - 0.1 * m_hat / (np.sqrt(v_hat) + 1e-8))
    assert state["step"] == 2


def test_clip_grads_scales_to_the_norm():
    g = {"a": np.full(4, 3.0), "b": np.full(5, 4.0)}
    norm = fm.clip_grads(g, 1.0)
    assert np.isclose(norm, np.sqrt(4 * 9 + 5 * 16))
    assert np.isclose(np.sqrt(sum((x ** 2).sum() for x in g.values())), 1.0)


def test_learning_rate_warms_up_then_decays_to_its_floor():
    cfg = fm.make_config("lsd", lr=1e-3, lr_final=0.1, warmup=10, iters=110)
    lr = np.array([fm.learning_rate(it, cfg) for it in range(110)])
    np.testing.assert_allclose(lr[:10], 1e-3 * np.arange(1, 11) / 10)        # linear warm-up
    assert lr[10] == pytest.approx(1e-3)                                     # the peak
    assert lr[60] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))                 # halfway down the cosine
    assert np.all(np.diff(lr[10:]) < 0) and lr[-1] > 1e-4                    # falls toward, not past, 10%
    assert fm.learning_rate(110, cfg) == pytest.approx(1e-4)


def test_ema_ramps_up_to_its_decay():
    assert fm.ema_decay(0.999, 1) == pytest.approx(2 / 11)     # the first steps follow the weights
    assert fm.ema_decay(0.999, 100) == pytest.approx(101 / 110)
    assert fm.ema_decay(0.999, 10_000) == 0.999
    ema, params = {"W0": np.zeros(3)}, {"W0": np.ones(3)}
    fm.ema_update(ema, params, 0.999, 1)
    np.testing.assert_allclose(ema["W0"], 1 - 2 / 11)
    fm.ema_update(ema, params, 0.5, 5000)                      # halfway to the weights
    np.testing.assert_allclose(ema["W0"], 1 - (2 / 11) * 0.5)


# ---------------------------------------------------------------- data and metric


def test_checkerboard_fills_only_the_filled_cells():
    x = fm.sample_checkerboard(200_000, np.random.default_rng(11))
    cell = np.floor(x + 2).astype(int)                      # (n, 2) cell index
    assert x.shape == (200_000, 2)
    assert np.all((cell >= 0) & (cell <= 3))
    assert np.all(cell.sum(axis=1) % 2 == 0)
    assert np.allclose(x.mean(axis=0), 0.0, atol=0.01)
    assert np.allclose(x.std(axis=0), np.sqrt(4 / 3), atol=0.01)


def test_histogram_kl_floor_shift_and_blur():
    rng = np.random.default_rng(12)
    a, b = fm.sample_checkerboard(100_000, rng), fm.sample_checkerboard(100_000, rng)
    floor = fm.histogram_kl(a, b)
    assert 0.005 < floor < 0.02                             # EVAL.md: about 0.012
    assert fm.histogram_kl(a, b + 0.25) > 10 * floor        # shifted
    assert fm.histogram_kl(a, b + 0.15 * rng.standard_normal(b.shape)) > 5 * floor  # blurred
    assert fm.histogram_kl(a, a) == 0.0


def test_histogram_kl_drops_points_outside_the_square():
    """EVAL.md normalizes each histogram to sum 1 over its bins, so points outside
    [-2.5, 2.5]^2 simply leave the histogram: the KL is that of the points inside."""
    rng = np.random.default_rng(13)
    a, b = fm.sample_checkerboard(50_000, rng), fm.sample_checkerboard(50_000, rng)
    b_out = b.copy()
    b_out[:10_000] = 10.0
    assert fm.histogram_kl(a, b_out) == fm.histogram_kl(a, b[10_000:])


# ---------------------------------------------------------------- sampling


def test_sample_shapes_and_determinism():
    model = fm.new_model(fm.make_config("lsd", **SMALL))
    x1, x2 = fm.sample(model, 1000, 4, seed=3), fm.sample(model, 1000, 4, seed=3)
    assert x1.shape == (1000, 2) and np.array_equal(x1, x2)
    assert not np.array_equal(x1, fm.sample(model, 1000, 4, seed=4))
    assert fm.flow_map(model["ema"], x1.astype(np.float32), 0.2, 0.7).shape == (1000, 2)


def test_sample_is_the_composition_of_jumps():
    model = fm.new_model(fm.make_config("lsd", **SMALL))
    x = fm.sample_base(500, np.random.default_rng(5), model["config"]["base_std"])
    for s, t in [(0, 0.5), (0.5, 1.0)]:
        x = fm.flow_map(model["ema"], x.astype(np.float32), s, t)
    assert np.allclose(fm.sample(model, 500, 2, seed=5), x, atol=1e-6)


def test_the_consistency_sampler_jumps_to_the_data_and_renoises():
    """sct and scd reach t = 1 only: at one step the sample is the jump X_{0,1}(x0); at N steps
    each later jump starts from the interpolant (1 - t_k) z_k + t_k x at the grid time t_k,
    with fresh noise z_k drawn after x0."""
    model = fm.new_model(fm.make_config("sct", **SMALL))
    ema = model["ema"]
    x0, noise = fm.sample_noise(500, 3, 5, model["config"]["base_std"], np.float32)
    assert noise.shape == (2, 500, 2) and not np.array_equal(noise[0], noise[1])
    np.testing.assert_array_equal(fm.sample(model, 500, 1, seed=5), fm.flow_map(ema, x0, 0.0, 1.0))
    x = fm.flow_map(ema, x0, 0.0, 1.0)
    for k, tk in [(1, 1 / 3), (2, 2 / 3)]:
        x = fm.flow_map(ema, ((1 - tk) * noise[k - 1] + tk * x).astype(np.float32), tk, 1.0)
    np.testing.assert_allclose(fm.sample(model, 500, 3, seed=5), x, atol=1e-5)
    np.testing.assert_allclose(fm.sample(model, 500, 3, seed=5, run=chunks(70)), x, atol=1e-5)


@pytest.mark.parametrize("method", ["lsd", "fm", "sct"])
def test_the_fast_sampler_gives_the_plain_samples(method):
    """Chunks on all cores (appendix B) against the plain sampler, which takes every point at
    once: the same points up to float32 rounding (a product of other shapes rounds
    differently), whatever the chunk size."""
    model = fm.new_model(fm.make_config(method, **SMALL))
    plain = fm.sample(model, 3000, 4, seed=2, run=fm.jumps)
    fast = fm.sample(model, 3000, 4, seed=2, run=chunks(700))
    assert np.abs(plain).max() > 0.5 and fast.dtype == np.float64
    np.testing.assert_allclose(fast, plain, atol=1e-5, rtol=0)
    np.testing.assert_allclose(fm.sample(model, 3000, 4, seed=2, run=chunks(3000)), fast, atol=1e-5, rtol=0)


class FakeBlas:
    """A stand-in for OpenBLAS's thread-count calls: (get, set), with every count it was set to."""

    def __init__(self, threads=2):
        self.threads, self.history = threads, []

    def handle(self):
        return (lambda: self.threads), self.set

    def set(self, n):
        self.threads = n
        self.history.append(n)


@pytest.fixture
def two_cores_and_blas(monkeypatch):
    """on_all_cores on two cores with a thread count to set, whatever this machine has."""
    blas = FakeBlas()
    monkeypatch.setattr(fm, "blas_thread_count", blas.handle)
    monkeypatch.setattr(fm, "core_count", lambda: 2)
    return blas


def test_on_all_cores_gives_the_serial_result(two_cores_and_blas):
    """The items run on worker threads, each with a one-thread BLAS, and come back in order; the
    exact flow (no matrix products, so no BLAS rounding) is bit for bit the serial one."""
    import threading
    seen = []

    def square(k):
        seen.append((threading.current_thread() is threading.main_thread(), two_cores_and_blas.threads))
        return k * k

    assert fm.on_all_cores(square, range(0, 50, 7)) == [k * k for k in range(0, 50, 7)]
    assert seen and all(not main and threads == 1 for main, threads in seen)
    assert two_cores_and_blas.history == [1, 2]                        # set to one, then restored
    x = 1.5 * np.random.default_rng(3).standard_normal((3000, 2))
    side_by_side = fm.exact_flow(x, 0.1, 1.0, 1.2, CB, chunk=500)
    serial = [fm.exact_flow(x[i:i + 500], 0.1, 1.0, 1.2, CB, chunk=500) for i in range(0, 3000, 500)]
    assert np.array_equal(side_by_side, np.concatenate(serial))


def test_on_all_cores_restores_the_blas_threads_and_passes_on_errors(two_cores_and_blas):
    def fail_at(k):
        if k == 20:
            raise ValueError("item 20")

    with pytest.raises(ValueError, match="item 20"):
        fm.on_all_cores(fail_at, range(0, 40, 10))
    assert two_cores_and_blas.history == [1, 2] and two_cores_and_blas.threads == 2


def test_a_comparison_run_trains_and_evaluates_on_one_blas_thread(tmp_path, monkeypatch):
    """OpenBLAS's AVX2 kernels round a product differently on one thread and on two, so a
    comparison run pins one thread for its training and evaluation, and gives the count back."""
    blas = FakeBlas()
    monkeypatch.setattr(fm, "blas_thread_count", blas.handle)
    seen = {}

    def noting_the_threads(name, real):
        def call(*args, **kwargs):
            seen[name] = blas.threads
            return real(*args, **kwargs)
        monkeypatch.setattr(fm, name, call)

    noting_the_threads("train", fm.train)
    noting_the_threads("evaluate", fm.evaluate)
    fm.run_one(fm.make_config("lsd", iters=3, batch=32, **SMALL), str(tmp_path), 500)
    assert seen == {"train": 1, "evaluate": 1} and blas.threads == 2


@pytest.mark.parametrize("method", ["fm", "lsd", "esd", "psd-uni", "lmd", "meanflow", "sct", "shortcut"])
@pytest.mark.parametrize("parts", [2, 3])
def test_a_batch_in_parts_gives_the_whole_batch_loss_and_gradient(method, parts):
    """Parts of unequal size (13 rows in 2 or 3) still add up: each part divides by the whole
    batch's row counts; so do a batch without diagonal rows (sct), a weighted diagonal
    (meanflow), a target half warmed up, and a target built by other weights (shortcut's EMA)."""
    params, _ = random_params(seed=7)
    ema = random_params(seed=8)[0]
    cfg = fm.make_config(method, diag_fraction=0.0 if method == "sct" else 0.5)
    batch = fm.make_batch(np.random.default_rng(1), 26, method, cfg, fm.outside_velocity(cfg),
                          dtype=np.float64)                   # 13 diagonal + 13 off-diagonal rows
    outside = outside_of(method)
    off = OFF(0.5, row_weight=cfg["row_weight"], row_c=cfg["row_c"] or 0.1)
    built = dict(outside=outside, warm=0.5, target_weights=ema if method == "shortcut" else None)
    losses, grads = fm.loss_and_grads(params, batch, method, off, **built)
    losses2, grads2 = fm.loss_and_grads_in_parts(params, batch, method, off, parts=parts, **built)
    for a, b in zip(losses, losses2):           # diagonal, off-diagonal as trained, raw
        assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300)
    for k in grads:
        assert rel_error(grads[k], grads2[k]) < 1e-12, k


def test_the_fast_paths_train_the_plain_weights_on_a_step_too_small_to_split():
    """The API's train() (a large step split over the cores) changes nothing at a step too small
    to split: the same weights, bit for bit, as the method part's plain loss_and_grads."""
    kw = dict(iters=4, batch=64, **SMALL)
    plain, fast = fm.train("lsd", **kw, grads_of=fm.loss_and_grads), fm.train("lsd", **kw)
    assert all(np.array_equal(plain["ema"][k], fast["ema"][k]) for k in plain["ema"])
    assert np.array_equal(plain["history"], fast["history"])


def test_only_big_steps_are_split(monkeypatch):
    """The default recipe's step is not split (the plain loss and gradients, bit for bit); the
    reference step of --bench is, in two parts."""
    split = []
    monkeypatch.setattr(fm, "on_all_cores", lambda work, items: split.append(list(items)) or
                        [work(item) for item in items])
    for cfg, parts in [(fm.make_config("lsd"), []), (fm.make_config("lsd", **fm.BENCH), [[0, 1]])]:
        split.clear()
        params = fm.init_params(np.random.default_rng(0), cfg)
        batch = fm.make_batch(np.random.default_rng(1), cfg["batch"], "lsd", cfg)
        losses, grads = fm.loss_and_grads_in_parts(params, batch, "lsd", fm.loss_settings(cfg))
        assert split == parts
        if not parts:
            plain = fm.loss_and_grads(params, batch, "lsd", fm.loss_settings(cfg))
            assert losses == plain[0] and all(np.array_equal(grads[k], plain[1][k]) for k in grads)


# ---------------------------------------------------------------- benchmark


def test_benchmark_counts_the_flops_of_the_reference_step():
    """On raw (x, s, t) inputs the reference LSD step is about 3.3 GFLOP, counted by hand:
    a forward pass over 2048 + 512 tangent + 512 teacher rows, and two products back per layer."""
    cfg = fm.make_config("lsd", **fm.BENCH, fourier=0, time_freqs=0)
    flop = sum(2.0 * m * k * n for m, k, n in fm.step_gemms(cfg, "lsd"))
    assert 3.2e9 < flop < 3.4e9
    model = fm.new_model(cfg)     # and the network built from that config has those shapes
    assert model["params"]["W0"].shape == (4, 256) and fm.num_hidden(model["params"]) == 4


@pytest.mark.parametrize("method", list(fm.METHODS))
def test_benchmark_counts_the_rows_a_step_runs(method, monkeypatch):
    """step_gemms' rows, from the method's record, against the rows a real step sends through
    the network: the first layer's forward product covers every pass (the student's, with its
    tangent rows, and the teacher's), and its weight gradient the student's pass alone."""
    rows = []
    real = fm.mlp_forward
    monkeypatch.setattr(fm, "mlp_forward", lambda params, a, n: rows.append(len(a)) or real(params, a, n))
    cfg = fm.make_config(method, batch=64, **SMALL)
    batch = fm.make_batch(np.random.default_rng(0), 64, method, cfg, fm.outside_velocity(cfg))
    params = fm.init_params(np.random.default_rng(0), cfg)
    fm.loss_and_grads(params, batch, method, OFF(), outside=fm.outside_velocity(cfg))
    gemms = fm.step_gemms(cfg, method)
    assert gemms[0][0] == sum(rows) and gemms[1][1] == rows[0], rows
    assert len(gemms) == 3 * (cfg["depth"] + 1) - 1          # forward, dW, and da but for the input


def test_the_benchmark_times_a_step_beside_its_products():
    lines = []
    out = fm.bench(methods=("fm",), steps=1, warmup=0, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("fm ") and "ms/step" in lines[0]
    assert set(out) == {"fm"} and out["fm"]["ms"] > 0 and out["fm"]["gemm_gflops"] > 0


def test_keep_freed_memory_asks_glibc_only():
    import platform
    assert fm.keep_freed_memory() == (platform.libc_ver()[0] == "glibc")


# ---------------------------------------------------------------- ground truth: erfc, erfcx

S = fm.DATASETS[CB]["std"]   # base std = data std
STEPS = fm.DATASETS[CB]["flow_steps"]
RAISE = dict(over="raise", invalid="raise", divide="raise")


def erfc(x):
    """erfc on the whole line, from flowmap's erfcx (y >= 0): e^(-x^2) erfcx(x) for x >= 0 and
    2 - erfc(-x) below, so the right tail is as accurate as the bulk until e^(-x^2) underflows."""
    x = np.asarray(x, dtype=np.float64)
    y = np.abs(x)
    with np.errstate(under="ignore"):
        right = np.exp(-y * y) * fm.erfcx(y)
    return np.where(x < 0, 2.0 - right, right)


def truncated_normal(z):
    """Log mass and mean of N(0, 1) restricted to each interval [z_k, z_k+1], from flowmap's
    scaled masses. z: (K+1, ...) -> log_mass (K, ...), g (K, ...)"""
    q = fm.tail_exponent(z)
    mass_q, g = fm.scaled_masses(z, q)
    return np.log(mass_q) - q, g


def test_erfc_matches_math_erfc():
    x = np.linspace(-6.0, 26.0, 320_001)
    ref = np.array([math.erfc(v) for v in x])
    ok = ref >= sys.float_info.min                       # normal numbers only
    rel = np.abs(erfc(x[ok]) - ref[ok]) / ref[ok]
    print(f"\nerfc vs math.erfc on [-6, 26]: max rel err {rel.max():.2e}")
    assert rel.max() < 1e-12                             # (the KL needs far less)


def test_erfcx_whole_half_line():
    y = np.linspace(0.0, 26.0, 50_001)
    ref = np.array([math.erfc(v) * math.exp(v * v) for v in y])   # exp(v^2): ~v^2 eps rounding
    rel_mid = np.max(np.abs(fm.erfcx(y) - ref) / ref)
    # far tail: asymptotic series 1/(y sqrt(pi)) sum_k (-1)^k (2k-1)!! / (2 y^2)^k, exact to 1e-16
    y = np.geomspace(26.0, 1e15, 2000)
    series = sum((-1) ** k * math.prod(range(1, 2 * k, 2)) / (2 * y * y) ** k for k in range(8))
    rel_far = np.max(np.abs(fm.erfcx(y) * y * math.sqrt(math.pi) / series - 1))
    print(f"\nerfcx max rel err: [0, 26] {rel_mid:.2e}, [26, 1e15] {rel_far:.2e}")
    assert rel_mid < 1e-12 and rel_far < 1e-13


# ---------------------------------------------------------------- truncated normal

GAUSS_LEGENDRE = np.polynomial.legendre.leggauss(400)


def one_sided_reference(a, w):
    """N(0,1) on [a, a + w], a >= 0, by Gauss-Legendre on s = z - a: (log mass, mean)."""
    L = min(w, 80.0 / (a + math.sqrt(a * a + 80.0)))      # beyond L: density < e^-40 phi(a)
    nodes, weights = GAUSS_LEGENDRE
    s = 0.5 * L * (nodes + 1.0)
    f = 0.5 * L * weights * np.exp(-a * s - 0.5 * s * s)  # phi(a + s) / phi(a)
    log_mass = -0.5 * a * a - 0.5 * math.log(2 * math.pi) + math.log(f.sum())
    return log_mass, a + np.sum(s * f) / f.sum()


def test_truncated_normal_against_quadrature():
    rows = []
    for a in [0.0, 0.3, 2.0, 9.0, 40.0, 1e3, 1e6, 1e11]:
        for w in [1e-3, 0.1, 1.0, 10.0, 1e4]:
            lm, g = one_sided_reference(a, w)
            rows.append((a, a + w, lm, g))
            rows.append((-a - w, -a, lm, -g))              # the mirror image
    lo, hi, lm_ref, g_ref = map(np.array, zip(*rows))
    lm, g = truncated_normal(np.stack([lo, hi]))
    lm, g = lm[0], g[0]
    err_lm = np.max(np.abs(lm - lm_ref) / np.maximum(1.0, np.abs(lm_ref)))
    err_g = np.max(np.abs(g - g_ref) / np.maximum(1.0, np.abs(g_ref)))
    print(f"\ntruncated normal, one-sided: log mass rel err {err_lm:.1e}, mean {err_g:.1e}")
    assert err_lm < 1e-12 and err_g < 1e-11
    # intervals around 0, against math.erfc
    z = np.array([[-1.0, 2.0], [-30.0, 0.5], [-1e6, 1e6], [-0.01, 0.02], [-3.0, 40.0]]).T
    Phi = lambda v: 0.5 * math.erfc(-v / math.sqrt(2))
    phi = lambda v: math.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)
    mass = np.array([Phi(b) - Phi(a) for a, b in z.T])
    lm, g = truncated_normal(z)
    np.testing.assert_allclose(lm[0], np.log(mass), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(g[0], [(phi(a) - phi(b)) / m for (a, b), m in zip(z.T, mass)],
                               rtol=1e-11, atol=1e-15)


# ---------------------------------------------------------------- exact velocity

POINTS = np.array([[0.5, 0.5],      # inside a filled cell
                   [-0.4, 0.3],     # inside an empty cell
                   [0.0, 0.0],      # a corner where filled cells touch
                   [-1.7, -1.2],    # filled, near an edge
                   [2.5, -0.3],     # off the board
                   [1.2, -1.9]])    # empty, near the board's edge


def mc_velocity(x, t, x1):
    """E[x1 - x0 | I_t = x] by weighting data samples x1 with the likelihood N(x; t x1, ...)."""
    logw = -np.sum((x - t * x1) ** 2, axis=1) / (2 * ((1 - t) * S) ** 2)
    w = np.exp(logw - logw.max())
    w /= w.sum()
    mean = w @ x1
    se = np.sqrt((w ** 2) @ (x1 - mean) ** 2)            # delta-method standard error
    return (mean - x) / (1 - t), se / (1 - t)


def test_velocity_matches_monte_carlo():
    rng = np.random.default_rng(0)
    x1 = fm.sample_checkerboard(500_000, rng)
    worst, rows = 0.0, []
    for t in [0.25, 0.5, 0.75, 0.9]:
        b = fm.exact_velocity(POINTS, t, S, CB)
        for x, bx in zip(POINTS, b):
            b_mc, se = mc_velocity(x, t, x1)
            zscore = np.max(np.abs(bx - b_mc) / se)
            worst = max(worst, zscore)
            rows.append(np.max(np.abs(bx - b_mc)))
    print(f"\nexact vs Monte Carlo velocity (5e5 weighted samples, 24 cases): "
          f"max |diff| {max(rows):.1e}, max |z| {worst:.2f}")
    assert worst < 5.0


def test_velocity_at_the_ends_of_time():
    rng = np.random.default_rng(2)
    x = np.concatenate([POINTS, rng.uniform(-4, 4, (200, 2)), [[1e3, -1e4], [0.5, -1.0]]])
    np.testing.assert_array_equal(fm.exact_velocity(x, 0.0, S, CB), -x)          # b_0 = E[x1] - x
    # the Taylor branch joins the closed form (|x| <= 8 covers the base to 1 - 4e-11)
    near = x[np.abs(x).max(axis=1) <= 8]
    lo, hi = fm.exact_velocity(near, fm.T_SMALL * (1 - 1e-9), S, CB), fm.exact_velocity(near, fm.T_SMALL, S, CB)
    assert np.max(np.abs(lo - hi) / np.maximum(1, np.abs(hi))) < 1e-8
    with np.errstate(**RAISE):
        for t in [1 - 1e-6, 1 - 1e-9, 1 - 1e-13, 1.0]:
            assert np.all(np.isfinite(fm.exact_velocity(x, t, S, CB)))
        t_mix = rng.choice([0.0, 1e-5, 0.5, 1.0], size=len(x))
        assert np.all(np.isfinite(fm.exact_velocity(x, t_mix, S, CB)))
    # t = 1: b_1(x) = x inside the filled cells; off the support b ~ (p - x) / (1 - t)
    inside = fm.FILLED[:5] - 2.0 + rng.uniform(0.05, 0.95, (5, 2))
    np.testing.assert_allclose(fm.exact_velocity(inside, 1.0, S, CB), inside, rtol=1e-10)
    t = 1 - 1e-9
    b = fm.exact_velocity(np.array([[-0.4, 0.3]]), t, S, CB)[0]                  # nearest p = (-0.4, 0)
    np.testing.assert_allclose(b * (1 - t), [0.0, -0.3], atol=1e-6)


# ---------------------------------------------------------------- exact flow

def test_exact_flow_reaches_the_checkerboard():
    rng = np.random.default_rng(3)
    x0 = S * rng.standard_normal((100_000, 2))
    start = time.perf_counter()
    x1 = fm.exact_flow(x0, 0.0, 1.0, S, CB)
    seconds = time.perf_counter() - start
    kl = fm.histogram_kl(fm.sample_checkerboard(100_000, rng), x1)
    floor = fm.histogram_kl(fm.sample_checkerboard(100_000, rng), fm.sample_checkerboard(100_000, rng))
    print(f"\nexact flow, {STEPS} RK4 steps, 100k points: {seconds:.1f} s; "
          f"KL {kl:.4f} (true vs true {floor:.4f})")
    assert kl < 0.02
    assert np.all(np.abs(x1) <= 2.0 + 1e-6)                # on the board


def test_exact_flow_step_halving():
    rng = np.random.default_rng(4)
    x0 = S * rng.standard_normal((10_000, 2))
    a = fm.exact_flow(x0, 0.0, 1.0, S, CB)
    b = fm.exact_flow(x0, 0.0, 1.0, S, CB, steps=2 * STEPS)
    d = np.linalg.norm(a - b, axis=1)
    print(f"\nstep halving {STEPS} -> {2 * STEPS}: change mean {d.mean():.1e}, "
          f"99% {np.quantile(d, 0.99):.1e}, max {d.max():.1e}")
    assert d.mean() < 1e-4


def test_exact_flow_composes_and_accepts_arrays():
    rng = np.random.default_rng(5)
    x = S * rng.standard_normal((3000, 2))
    np.testing.assert_array_equal(fm.exact_flow(x, 0.4, 0.4, S, CB), x)
    whole = fm.exact_flow(x, 0.0, 1.0, S, CB)
    halves = fm.exact_flow(fm.exact_flow(x, 0.0, 0.6, S, CB), 0.6, 1.0, S, CB)
    assert np.linalg.norm(whole - halves, axis=1).mean() < 1e-4
    np.testing.assert_array_equal(fm.exact_flow(x, np.zeros(3000), np.ones(3000), S, CB), whole)
    s = rng.uniform(0, 1, 3000)
    t = np.where(rng.random(3000) < 0.5, 1.0, s + (1 - s) * rng.random(3000))
    per_point = fm.exact_flow(x, s, t, S, CB)
    some = np.flatnonzero(t < 1)[:5]
    for i in some:                                           # each row as its own scalar jump
        alone = fm.exact_flow(x[i:i + 1], s[i], t[i], S, CB, steps=64)
        assert np.linalg.norm(per_point[i] - alone[0]) < 1e-3


# ---------------------------------------------------------------- ground-truth metrics

def test_velocity_error():
    rng = np.random.default_rng(6)
    exact = fm.velocity_error(lambda x, t: fm.exact_velocity(x, t, S, CB), S, CB, rng, n=20_000, bins=5)
    assert exact["mse"] == 0.0 and exact["mse_by_bin"].shape == (5,)
    shift = np.array([0.3, -0.4])                              # |shift|^2 = 0.25
    off = fm.velocity_error(lambda x, t: fm.exact_velocity(x, t, S, CB) + shift, S, CB, rng, n=20_000, bins=5)
    np.testing.assert_allclose(off["mse_by_bin"], 0.25, rtol=1e-9)
    np.testing.assert_allclose(off["t_edges"], np.linspace(0, 1, 6))


# ---------------------------------------------------------------- training


def test_ring_evaluation_reports_sw_modes_and_the_ground_truth():
    model = fm.train("lsd", iters=1000, batch=256, hidden=64, depth=2, data="ring")
    r = fm.evaluate(model, n=4000, steps=(1, 4))
    assert list(r["floor"]) == ["SW", "SW at 5,000"] and set(r["modes"]) == {1, 4}
    assert r["exact"]["SW"] < 0.25 and 0 < r["score"][4]["SW"] < 3.0
    untrained = fm.evaluate(fm.new_model(model["config"]), n=4000, steps=(1, 4))
    assert r["score"][4]["SW"] < 0.5 * untrained["score"][4]["SW"]
    assert r["velocity_error"]["mse"] < 0.5 * untrained["velocity_error"]["mse"]
    text = fm.format_results(r)
    assert "lsd on the ring" in text and "| SW |" in text and "largest mode share off 1/8" in text


def test_short_training_lowers_losses_and_kl():
    model = fm.train("lsd", iters=600, batch=512, hidden=64, depth=2, seed=0)
    h = model["history"]
    assert h[-100:, 0].mean() < 0.8 * h[:20, 0].mean()       # diagonal
    assert h[-100:, 1].mean() < h[:20, 1].max()               # off-diagonal settles
    untrained = fm.new_model(model["config"])
    x_true = fm.sample_checkerboard(20_000, np.random.default_rng(0))
    kl = lambda m: fm.histogram_kl(x_true, fm.sample(m, 20_000, 2))
    assert kl(model) < 0.6 * kl(untrained)
    # against the ground truth: the trained diagonal is nearer the exact velocity, and its jumps
    # nearer the exact flow map, than the untrained network's
    trained_r = fm.evaluate(model, n=5000, steps=(1, 4))
    untrained_r = fm.evaluate(untrained, n=5000, steps=(1, 4))
    assert trained_r["velocity_error"]["mse"] < 0.5 * untrained_r["velocity_error"]["mse"]
    for k in (1, 4):
        assert trained_r["map_error"][k] < 0.7 * untrained_r["map_error"][k]


@pytest.mark.parametrize("data", list(fm.DATASETS))
def test_save_load_roundtrip(tmp_path, data):
    model = fm.train("psd-mid", iters=5, batch=64, data=data, **SMALL)
    path = str(tmp_path / "m.npz")
    fm.save(model, path)
    back = fm.load(path)
    assert back["config"] == model["config"] and back["iter"] == 5 and back["config"]["data"] == data
    assert float(back["ema"]["x_scale"]) == pytest.approx(fm.DATASETS[data]["std"])   # describes itself
    assert np.array_equal(fm.sample(back, 300, 2), fm.sample(model, 300, 2))


def test_the_late_off_ratio_reads_the_raw_residual(tmp_path):
    """A row weight can hold the trained loss flat while the raw residual grows: the history
    records both, and the ratio follows the raw one."""
    n = 400
    trained = np.ones(n)
    raw = np.where(np.arange(n) < 3 * n // 4, 1.0, 2.0)            # doubles in the last quarter
    assert fm.late_off_ratio(np.stack([np.ones(n), trained, raw], axis=1)) == pytest.approx(2.0)
    assert fm.late_off_ratio(np.zeros((3, 3))) is None             # too short to have quarters
    model = fm.train("esd", iters=8, batch=64, **SMALL)
    assert model["history"].shape == (8, 3)
    assert np.all(model["history"][:, 1] < model["history"][:, 2])  # every weight is below 1
    fm.plot_losses(model["history"], str(tmp_path / "loss.png"))
    assert is_png(str(tmp_path / "loss.png"))


# ---------------------------------------------------------------- command line


# the command line as a user runs it: without PYTHONUNBUFFERED, so a progress line reaches a
# pipe only if it is flushed
CLI_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "flowmap.py"), *args],
                          capture_output=True, text=True, timeout=120, env=CLI_ENV)


@pytest.mark.parametrize("args, words", [
    (["--method", "xyz"], "unknown method xyz"),
    (["--method", "lsd,xyz"], "unknown method xyz"),
    (["--method", "lsd,lsd"], "names a method twice"),
    (["--method", "all", "--save", "m.npz"], "--save works on one run"),
    (["--workers", "2"], "--workers is for a comparison"),
    (["--seeds", "0"], "must be positive"),
    (["--preset", "longer"], "invalid choice"),
    (["--iters", "0"], "must be positive"),
    (["--iters", "2.5"], "not an integer"),
    (["--lr", "abc"], "not a number"),
    (["--lr", "-1"], "must be positive"),
    (["--off-cap", "-1"], "must be zero or positive"),
    (["--bogus"], "unrecognized"),
    (["--condition", "lagrangian"], "--condition is for --method itm"),
    (["--method", "lsd", "--beta", "2"], "--beta is for itm, not lsd"),
    (["--method", "itm", "--beta", "-1"], "must be zero or positive"),
    (["--method", "lsd", "--teacher", "x.npz"], "--teacher is for lmd, emd, ptd, scd, ayf-emd, ayf-lmd, not lsd"),
    (["--method", "lmd", "--ref", "x.npz"], "--ref is for itm, not lmd"),
    (["--method", "itm,lsd"], "compare it with tilted methods only"),
    (["--method", "itm,itm-lsd"], "a method twice"),
    (["--method", "lmd@fm"], "taught by the fm run of its seed in a comparison"),
    (["--method", "lsd@fm"], "unknown method lsd@fm"),
    (["--method", "lmd@ema"], "unknown method lmd@ema"),
])
def test_cli_bad_input_is_one_clear_line(args, words):
    r = run_cli(*args)
    assert r.returncode == 2
    assert words in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_named_group_compares_into_its_own_folder():
    """--method known and teachers write beside, not over, the main table of --method all."""
    out = lambda *args: fm.parse_args(list(args)).out
    assert out("--method", "all", "--seeds", "3") == "plots/compare_checkerboard"
    assert out("--method", "known", "--seeds", "3") == "plots/compare_checkerboard_known"
    assert out("--data", "ring", "--method", "teachers") == "plots/compare_ring_teachers"
    assert out("--method", "lsd,esd") == "plots/compare_checkerboard"
    assert out("--method", "known", "--out", "x") == "x"
    assert fm.parse_args(["--method", "known"]).method == list(fm.KNOWN_METHODS)


def test_cli_load_missing_file(tmp_path):
    r = run_cli("--load", str(tmp_path / "nope.npz"), "--out", str(tmp_path))
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_cli_out_is_an_existing_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    r = run_cli("--out", str(f))
    assert r.returncode == 2 and "existing file" in r.stderr and "Traceback" not in r.stderr


def bad_model_files(tmp_path):
    """A text file, a truncated model, and a model whose weights disagree with its config."""
    good = fm.train("lsd", iters=2, batch=32, **SMALL)
    fm.save(good, str(tmp_path / "good.npz"))
    (tmp_path / "text.npz").write_text("not a zip file")
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    other = fm.train("lsd", iters=2, batch=32, **dict(SMALL, hidden=5))
    other["config"] = good["config"]                        # config says 8 wide, weights are 5
    fm.save(other, str(tmp_path / "shape.npz"))
    older = dict(good, config={k: v for k, v in good["config"].items() if k != "diag_fraction"})
    fm.save(older, str(tmp_path / "older.npz"))             # a setting this version has is missing
    return {"not a model": tmp_path / "text.npz", "truncated": tmp_path / "cut.npz",
            "wrong shape": tmp_path / "shape.npz", "another version": tmp_path / "older.npz",
            "missing": tmp_path / "missing.npz"}


def test_load_rejects_bad_files_with_a_clear_error(tmp_path):
    for case, path in bad_model_files(tmp_path).items():
        with pytest.raises(ValueError) as e:
            fm.load(str(path))
        assert str(path) in str(e.value), case


def test_a_file_without_a_later_setting_that_is_off_by_default_loads(tmp_path):
    """A setting added to DEFAULTS later, None (off) by default, is off in a file written
    before it, as in a run's name (settings): the model loads, and a run name is unchanged."""
    good = fm.train("lsd", iters=2, batch=32, **SMALL)
    older = dict(good, config={k: v for k, v in good["config"].items() if k != "derivative_warmup"})
    fm.save(older, str(tmp_path / "older.npz"))
    loaded = fm.load(str(tmp_path / "older.npz"))
    assert loaded["config"] == good["config"] and loaded["config"]["derivative_warmup"] is None
    assert fm.run_name(older["config"]) == fm.run_name(good["config"])


def test_cli_load_rejects_bad_files_in_one_line(tmp_path):
    for case, path in bad_model_files(tmp_path).items():
        r = run_cli("--load", str(path), "--out", str(tmp_path / "plots"))
        assert r.returncode == 2, case
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, case


# ---------------------------------------------------------------- checkpoints, interrupts, divergence


def quiet(line):
    pass


def test_interrupt_saves_and_resume_matches_an_uninterrupted_run(tmp_path):
    kw = dict(iters=40, batch=64, **SMALL)
    full = fm.train("lsd", **kw)
    path = str(tmp_path / "ck.npz")

    def log(line):                                          # Ctrl-C arrives during step 20
        if line.startswith("iter     20/"):
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        fm.run_training(fm.new_model(fm.make_config("lsd", **kw)), log=log, checkpoint=path)
    part = fm.load(path)
    assert part["iter"] == 20
    resumed = fm.train(model=part)
    assert resumed["iter"] == 40
    for group in ("params", "ema"):
        for k in fm.trainable(full["params"]):
            assert np.array_equal(resumed[group][k], full[group][k]), (group, k)
    assert np.array_equal(resumed["history"], full["history"])


def test_periodic_checkpoints_are_written_atomically(tmp_path):
    path = tmp_path / "ck.npz"
    fm.run_training(fm.new_model(fm.make_config("lsd", iters=7, batch=32, **SMALL)), log=quiet,
                    checkpoint=str(path), save_every=3)
    assert fm.load(str(path))["iter"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["ck.npz"]   # no temporary file left behind


def test_divergence_stops_with_a_message_and_keeps_the_checkpoint_finite(tmp_path):
    path = str(tmp_path / "ck.npz")
    with pytest.raises(FloatingPointError) as e:
        fm.run_training(fm.new_model(fm.make_config("lsd", iters=200, batch=64, lr=1e4, warmup=1,
                                                    clip=1e30, **SMALL)),
                        log=quiet, checkpoint=path, save_every=1)
    assert "iteration" in str(e.value) and "lower --lr" in str(e.value)
    saved = fm.load(path)
    assert all(np.all(np.isfinite(a)) for a in saved["params"].values())


def test_a_blown_up_model_is_reported_without_numpy_warnings(tmp_path):
    model = fm.new_model(fm.make_config("lsd", **SMALL))
    for k in ("W0", "W1", "W2"):
        model["ema"][k] *= 1e20                                # activations overflow float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # any RuntimeWarning fails the test
        results = fm.evaluate(model, n=2000, steps=(1, 4))
        fm.plot_ground_truth(model, str(tmp_path / "gt.png"), n_paths=20, n_times=3)
    counted = {k: int(np.sum(~np.isfinite(x).all(axis=1))) for k, x in results["samples"].items()}
    assert results["non_finite"] == counted and min(counted.values()) > 1000
    assert "not finite" in fm.format_results(results)
    healthy = fm.evaluate(fm.new_model(fm.make_config("lsd", **SMALL)), n=2000, steps=(1,), exact=False)
    assert healthy["non_finite"] == {1: 0} and "not finite" not in fm.format_results(healthy)


def test_same_seed_gives_bit_identical_samples():
    a = fm.train("psd-uni", iters=15, batch=64, seed=3, **SMALL)
    b = fm.train("psd-uni", iters=15, batch=64, seed=3, **SMALL)
    assert np.array_equal(fm.sample(a, 2000, 4), fm.sample(b, 2000, 4))


def read_until(proc, words, seconds):
    """proc's standard output up to the first chunk that holds `words`; the test fails, and the
    process is killed, if that takes longer than `seconds`."""
    import select
    deadline, out = time.monotonic() + seconds, b""
    while words.encode() not in out:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            proc.kill()
            pytest.fail(f"no {words!r} within {seconds} s; it printed {out.decode()!r}")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            pytest.fail(f"it ended before printing {words!r}: {out.decode()!r}")
        out += chunk
    return out.decode()


def test_cli_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path):
    ck = str(tmp_path / "ck.npz")
    args = [sys.executable, os.path.join(HERE, "flowmap.py"), "--iters", "20000", "--batch", "64",
            "--hidden", "16", "--depth", "2", "--save", ck, "--out", str(tmp_path / "plots"),
            "--eval-samples", "2000"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CLI_ENV)
    try:
        first = read_until(proc, "\niter ", seconds=60)             # training is under way
        proc.send_signal(signal.SIGINT)
        out, err = (s.decode() for s in proc.communicate(timeout=60))
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and f"--resume {ck}" in first + out + err
    done = fm.load(ck)["iter"]
    assert 0 < done < 20000
    r = run_cli("--resume", ck, "--iters", str(done + 10), "--batch", "64",     # the saved batch
                "--out", str(tmp_path / "plots"), "--eval-samples", "2000")
    assert r.returncode == 0, r.stderr
    assert fm.load(ck)["iter"] == done + 10


TINY_CLI = ["--hidden", "16", "--depth", "2", "--batch", "64", "--iters", "20", "--eval-samples", "2000"]


def run_cli_side_by_side(*runs):
    """Several command lines at once (each is short, and mostly starting up). -> their results"""
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "flowmap.py"), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLI_ENV)
             for args in runs]
    try:
        return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            p.kill()


def test_cli_working_paths_end_to_end(tmp_path):
    """Each path a user takes, at a few steps: its exit status, its table, its figures, its file."""
    out = lambda name: str(tmp_path / name)
    fm_file = out("fm.npz")
    first = run_cli_side_by_side(["--method", "fm", "--save", fm_file, "--out", out("fm"), *TINY_CLI],
                                 ["--data", "ring", "--out", out("ring"), *TINY_CLI])
    second = run_cli_side_by_side(["--load", fm_file, "--out", out("load"), "--eval-samples", "2000"],
                                  ["--method", "lmd", "--teacher", fm_file, "--out", out("lmd"), *TINY_CLI],
                                  ["--method", "itm", "--ref", fm_file, "--out", out("itm"), *TINY_CLI])
    expected = [("fm", "checkerboard_fm", "ground_truth", "| KL |"),
                ("ring", "ring_lsd", "ground_truth", "| SW |"),
                ("load", "checkerboard_fm", "ground_truth", "| KL |"),
                ("lmd", "checkerboard_lmd@fm", "ground_truth", "| KL |"),
                ("itm", "checkerboard_itm-lsd+ref-fm", "tilt", "| mean reward |")]
    for r, (folder, name, figure, row) in zip(first + second, expected):
        assert r.returncode == 0, (r.args, r.stderr)
        assert "| steps | 1 | 2 | 4 | 8 | 16 |" in r.stdout and row in r.stdout, r.args
        for kind in ("samples", figure, "loss"):
            assert is_png(os.path.join(out(folder), f"{kind}_{name}.png")), (r.args, kind)
    saved = fm.load(fm_file)
    assert saved["config"]["method"] == "fm" and saved["iter"] == 20
    assert "loaded " + fm_file in second[0].stdout and "trained in" not in second[0].stdout


def test_cli_resume_keeps_the_saved_recipe(tmp_path):
    """--resume changes --iters only (a flag that names the saved value is accepted: the Ctrl-C
    test above); a flag that names another value is refused in one line that names it, and the
    file is left as it was. --load takes no recipe flag that differs from the saved one."""
    ck = str(tmp_path / "m.npz")
    fm.save(fm.train("lsd", iters=8, batch=64, **SMALL), ck)
    for flags, name in [(["--lr", "0.01"], "--lr 0.01"), (["--batch", "128"], "--batch 128"),
                        (["--method", "esd"], "--method esd"), (["--data", "ring"], "--data ring")]:
        r = run_cli("--resume", ck, "--iters", "12", *flags, "--out", str(tmp_path))
        assert r.returncode == 2 and name in r.stderr and "changes only --iters" in r.stderr, flags
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert fm.load(ck)["iter"] == 8
    r = run_cli("--load", ck, "--lr", "0.01", "--out", str(tmp_path))
    assert r.returncode == 2 and "--lr 0.01" in r.stderr and "as it was trained" in r.stderr


# ---------------------------------------------------------------- the ring and the sliced Wasserstein distance

RING_STD = fm.DATASETS["ring"]["std"]


def test_ring_sampler_mean_std_and_modes():
    x = fm.sample_ring(400_000, np.random.default_rng(21))
    assert x.shape == (400_000, 2)
    assert np.allclose(x.mean(axis=0), 0.0, atol=0.02)
    assert np.allclose(x.std(axis=0), RING_STD, atol=0.01) and RING_STD == pytest.approx(2.832, abs=1e-3)
    d = np.linalg.norm(x[:, None] - fm.RING_CENTRES[None], axis=2)        # (n, 8)
    share = np.bincount(d.argmin(1), minlength=8) / len(x)
    assert np.abs(share - 1 / 8).max() < 0.003
    near = d.min(1)                                                        # Rayleigh(0.15) radius
    assert np.median(near) == pytest.approx(0.15 * math.sqrt(2 * math.log(2)), rel=0.01)
    np.testing.assert_allclose(fm.RING_CENTRES[2], [0.0, 4.0], atol=1e-12)   # angles 2 pi k / 8


def test_sliced_wasserstein_of_a_shift_and_its_floor():
    """Two sets that differ by a constant shift d have SW = sqrt(mean over directions of
    (d . theta)^2): each sorted projection moves by d . theta."""
    rng = np.random.default_rng(22)
    a = fm.sample_ring(20_000, rng)
    d = np.array([0.3, -0.2])
    theta = np.random.default_rng(0).standard_normal((128, 2))
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    expected = math.sqrt(np.mean((theta @ d) ** 2))
    assert fm.sliced_wasserstein(a, a + d) == pytest.approx(expected, rel=1e-12)
    assert fm.sliced_wasserstein(a, a[::-1].copy()) == 0.0                 # order does not matter
    assert fm.sliced_wasserstein(a, np.concatenate([a, a + 5])) == 0.0     # first n points only
    other = np.random.default_rng(7).standard_normal((128, 2))             # another seed's directions
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    assert fm.sliced_wasserstein(a, a + d, seed=7) == pytest.approx(math.sqrt(np.mean((other @ d) ** 2)))
    floor = fm.sliced_wasserstein(fm.sample_ring(100_000, np.random.default_rng(10_000)),
                                  fm.sample_ring(100_000, np.random.default_rng(10_001)))
    assert 0.03 < floor < 0.15                                             # about 0.08


def test_mode_balance_counts_by_nearest_centre():
    c = fm.RING_CENTRES
    x = np.concatenate([np.repeat(c[:1] + 0.5, 30, 0),      # 30 near mode 0, 0.71 off it
                        np.repeat(c[1:], 10, 0)])            # 10 on each other mode
    worst, off = fm.mode_balance(x, c, 0.6)
    assert off == pytest.approx(30 / 100)
    assert worst == pytest.approx(30 / 100 - 1 / 8)


RING_POINTS = np.array([[4.0, 0.0],        # a mode's centre
                        [2.9, 2.7],        # between two modes
                        [0.0, 0.0],        # the centre of the ring
                        [0.3, -1.1],       # inside the ring
                        [9.0, 1.0],        # far outside
                        [-2.7, -2.9]])     # near a mode


def mc_ring_velocity(x, t, x1):
    logw = -np.sum((x - t * x1) ** 2, axis=1) / (2 * ((1 - t) * RING_STD) ** 2)
    w = np.exp(logw - logw.max())
    w /= w.sum()
    mean = w @ x1
    se = np.sqrt((w ** 2) @ (x1 - mean) ** 2)
    return (mean - x) / (1 - t), se / (1 - t)


def test_ring_velocity_matches_monte_carlo():
    """Near the data at every t, and off the ring up to t = 0.8: weighted data samples. (Far off
    the ring at t near 1 the weights degenerate onto one sample; quadrature covers that below.)"""
    x1 = fm.sample_ring(1_000_000, np.random.default_rng(23))
    near = RING_POINTS[[0, 1, 5]]
    worst = 0.0
    for t in [0.2, 0.5, 0.8, 0.95, 0.99]:
        for x, bx in zip(near, fm.ring_velocity(near, t, RING_STD)):
            b_mc, se = mc_ring_velocity(x, t, x1)
            worst = max(worst, np.max(np.abs(bx - b_mc) / se))
    for t in [0.2, 0.5, 0.8]:                                  # off the ring, where MC still holds
        for x, bx in zip(RING_POINTS[2:5], fm.ring_velocity(RING_POINTS[2:5], t, RING_STD)):
            b_mc, se = mc_ring_velocity(x, t, x1)
            worst = max(worst, np.max(np.abs(bx - b_mc) / se))
    print(f"\nring: exact vs Monte Carlo velocity (1e6 weighted samples, 24 cases): max |z| {worst:.2f}")
    assert worst < 5.0


def quadrature_ring_velocity(x, t, n=401):
    """E[x1 - x0 | I_t = x] by Bayes' rule summed on a fine grid of x1 around the posterior's peak:
    prior (the mixture's density) times likelihood N(x; t x1, (1 - t)^2 std^2 I). The grid zooms
    onto the peak, then spans 10 widths of the narrower factor each way."""
    def log_post(g):                                          # g: (m, 2) values of x1
        d2 = np.sum((g[:, None] - fm.RING_CENTRES[None]) ** 2, axis=2)
        log_prior = np.logaddexp.reduce(-d2 / (2 * 0.15 ** 2), axis=1)
        return log_prior - np.sum((x - t * g) ** 2, axis=1) / (2 * ((1 - t) * RING_STD) ** 2)
    grid = lambda centre, half: centre + np.stack(np.meshgrid(*[np.linspace(-half, half, n)] * 2),
                                                  -1).reshape(-1, 2)
    peak = np.zeros(2)
    for half in (12.0, 0.2, 0.004):                           # each zoom keeps the peak inside
        g = grid(peak, half)
        peak = g[np.argmax(log_post(g))]
    g = grid(peak, 10 * min(0.15, (1 - t) * RING_STD / t))
    lp = log_post(g)
    w = np.exp(lp - lp.max())
    return ((w @ g) / w.sum() - x) / (1 - t)                  # x0 = (x - t x1) / (1 - t)


def test_ring_velocity_far_off_the_ring_by_quadrature():
    for t in [0.95, 0.99, 0.999]:                              # one mode holds the posterior
        for x in RING_POINTS[3:5]:                             # inside and far outside the ring
            b = fm.ring_velocity(x[None], t, RING_STD)[0]
            ref = quadrature_ring_velocity(x, t)
            assert np.abs(b - ref).max() < 1e-3 * (1 + np.abs(ref).max()), (t, x, b, ref)
    centre = fm.ring_velocity(np.zeros((4, 2)), np.array([0.1, 0.5, 0.95, 0.999]), RING_STD)
    np.testing.assert_allclose(centre, 0.0, atol=1e-12)       # by symmetry


def test_ring_velocity_at_the_ends_of_time_and_far_away():
    rng = np.random.default_rng(24)
    x = np.concatenate([RING_POINTS, rng.uniform(-12, 12, (300, 2)), [[1e4, -3e4], [-200.0, 0.0]]])
    np.testing.assert_allclose(fm.ring_velocity(x, 0.0, RING_STD), -x, atol=1e-12)   # E[x1] - x
    np.testing.assert_allclose(fm.ring_velocity(x, 1.0, RING_STD), x, rtol=1e-12)    # b_1(x) = x
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        t_mix = rng.choice([0.0, 1e-9, 0.5, 1 - 1e-9, 1.0], size=len(x))
        assert np.all(np.isfinite(fm.ring_velocity(x, t_mix, RING_STD)))
    assert np.array_equal(fm.exact_velocity(x, 0.3, RING_STD, "ring"), fm.ring_velocity(x, 0.3, RING_STD))


def test_ring_exact_flow_lands_on_the_ring():
    rng = np.random.default_rng(25)
    x0 = fm.sample_base(100_000, rng, RING_STD)
    x1 = fm.exact_flow(x0, 0.0, 1.0, RING_STD, "ring")
    true = fm.sample_ring(100_000, np.random.default_rng(10_000))
    sw = fm.sliced_wasserstein(true, x1)
    floor = fm.sliced_wasserstein(true, fm.sample_ring(100_000, np.random.default_rng(10_001)))
    worst, off = fm.mode_balance(x1, fm.RING_CENTRES, 0.6)
    halved = fm.exact_flow(x0[:5000], 0.0, 1.0, RING_STD, "ring", steps=2 * fm.DATASETS["ring"]["flow_steps"])
    change = np.linalg.norm(halved - x1[:5000], axis=1).mean()
    print(f"\nring exact flow: SW {sw:.4f} (floor {floor:.4f}), worst share {worst:.4f}, "
          f"off {off:.4f}, step halving {change:.1e}")
    assert sw < 1.5 * floor + 0.02 and worst < 0.005 and off < 0.002 and change < 1e-4
    rel = lambda name: fm.velocity_error(lambda x, t: fm.exact_velocity(x, t, RING_STD, name),
                                         RING_STD, "ring", np.random.default_rng(1), n=5000)["mse"]
    assert rel("ring") == 0.0 and rel("checkerboard") > 1.0       # the ring's error is the ring's


def test_ring_batches_scale_features_and_noise_to_the_ring():
    cfg = fm.make_config("lsd", "ring")
    model = fm.new_model(cfg)
    assert float(model["params"]["x_scale"]) == pytest.approx(RING_STD)
    batch = fm.make_batch(np.random.default_rng(0), 20_000, "lsd", cfg, dtype=np.float64)
    x1 = batch["x_diag"] + (1 - batch["t_diag"])[:, None] * batch["target_diag"]   # I_t + (1 - t)(x1 - x0)
    r = np.linalg.norm(x1, axis=1)
    assert np.all(np.abs(r - 4.0) < 1.2)                            # every x1 is on the ring
    x0 = x1 - batch["target_diag"]
    assert x0.std() == pytest.approx(RING_STD, rel=0.02)            # noise at the data's scale


# ---------------------------------------------------------------- comparisons over seeds


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000


def test_the_comparison_writes_tables_figures_and_skips_finished_runs(tmp_path):
    out, lines, tiny = str(tmp_path / "cmp"), [], dict(iters=30, n_eval=2000, **SMALL)
    runs = fm.compare(["lsd", "fm"], seeds=[0, 1], out=out, workers=2, log=lines.append, **tiny)
    assert sorted((r["method"], r["seed"]) for r in runs) == [("fm", 0), ("fm", 1), ("lsd", 0), ("lsd", 1)]
    assert sum(line.startswith("[") for line in lines) == 4 and "left" in lines[-2]
    for name in ("compare_samples.png", "compare_kl.png", "compare_loss.png"):
        assert is_png(os.path.join(out, name)), name
    summary = json.load(open(os.path.join(out, "results.json")))
    assert len(summary["runs"]) == 4 and set(summary["methods"]) == {"lsd", "fm"}
    for r in summary["runs"]:                     # every number of every seed
        assert set(r["score"]) == {"1", "2", "4", "8", "16"}
        assert all(math.isfinite(r["score"][k]["KL"]) and r["map_error"][k] > 0 for k in r["score"])
    for k in ("1", "16"):                         # mean and sample sd over the two seeds
        kl = [r["score"][k]["KL"] for r in summary["runs"] if r["method"] == "lsd"]
        assert summary["methods"]["lsd"]["KL"][k] == pytest.approx([np.mean(kl), np.std(kl, ddof=1)])
    md = open(os.path.join(out, "results.md")).read()
    table = [line for line in md.split("## flow-map error")[0].splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table] == ["| method", "| lsd", "| fm", "| *noise floor*",
                                                        "| *exact flow*"]
    assert all(len(line.split(" | ")) == 8 for line in table[1:3])
    assert all(r["late_off_ratio"] > 0 for r in summary["runs"] if r["method"] == "lsd")
    for col in range(1, 6):                       # one best mark per column, on the lower mean
        cells = [line.split(" | ")[col] for line in table[1:3]]
        means = [float(c.strip("*").split(" ± ")[0]) for c in cells]
        assert [c.startswith("**") for c in cells] == [m == min(means) for m in means]

    old = os.path.join(out, "runs", summary["runs"][0]["name"] + ".json")   # a run made before a
    numbers = json.load(open(old))                # setting that is off by default was added
    del numbers["config"]["ref_file"]
    json.dump(numbers, open(old, "w"))
    again = []
    fm.compare(["lsd", "fm"], seeds=[0, 1], out=out, workers=2, log=again.append, **tiny)
    assert "4 of 4 runs already finished" in again[0]
    assert not any(line.startswith("[") for line in again)          # nothing trained again
    rerun = json.load(open(os.path.join(out, "results.json")))["runs"]
    assert [(r["name"], r["score"]) for r in rerun] == [(r["name"], r["score"]) for r in summary["runs"]]

    changed = []                                  # a changed recipe does not reuse the old runs
    fm.compare(["lsd"], seeds=[0], out=out, workers=1, log=changed.append, **dict(tiny, iters=31))
    assert any(line.startswith("[1/1] lsd seed 0") for line in changed)
    assert any("another recipe" in line for line in changed)


def test_a_comparison_of_the_known_methods_writes_well_formed_tables(tmp_path):
    """--method known: every known method trains to the end with finite numbers, and the table
    has one row per method, each with five scores and the late ratio."""
    out = str(tmp_path / "known")
    runs = fm.compare(list(fm.KNOWN_METHODS), out=out, workers=1, log=lambda line: None,
                      iters=20, batch=64, n_eval=1000, **SMALL)
    assert [r["method"] for r in runs] == list(fm.KNOWN_METHODS)
    assert all(r["stopped"] is None and r["non_finite"] == {k: 0 for k in r["non_finite"]} for r in runs)
    md = open(os.path.join(out, "results.md")).read()
    table = [line for line in md.split("## flow-map error")[0].splitlines() if line.startswith("| ")]
    known = len(fm.KNOWN_METHODS)
    assert [line.split(" | ")[0][2:] for line in table[1:known + 1]] == list(fm.KNOWN_METHODS)
    assert all(len(line.split(" | ")) == 8 for line in table[1:known + 1])
    ratios = [r["late_off_ratio"] for r in runs]
    assert all(x is not None and math.isfinite(x) and x > 0 for x in ratios)


def test_a_run_is_the_same_alone_beside_another_and_resumed(tmp_path):
    """A comparison run's numbers and weights do not depend on the runs beside it, on the
    process it ran in, or on an interruption (its checkpoint continued)."""
    tiny = dict(iters=30, warmup=5, n_eval=2000)    # past the warm-up: the schedule matters
    beside = fm.compare(["lsd", "psd-mid"], seeds=[0], out=str(tmp_path / "b"), workers=2,
                        log=lambda line: None, **tiny)[0]
    alone = fm.compare(["lsd"], seeds=[0], out=str(tmp_path / "a"), workers=1,
                       log=lambda line: None, **tiny)[0]
    cfg = fm.make_config("lsd", iters=30, warmup=5)    # Ctrl-C at step 12, then the same command
    folder = tmp_path / "r" / "runs"
    folder.mkdir(parents=True)
    ctrl_c = lambda line: line.startswith("iter     12/") and os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), fm.blas_threads(1):    # as a comparison trains a run
        fm.run_training(fm.new_model(cfg), log=ctrl_c,
                        checkpoint=str(folder / (fm.run_name(cfg) + ".partial.npz")))
    assert fm.load(str(folder / (fm.run_name(cfg) + ".partial.npz")))["iter"] == 12
    resumed = fm.compare(["lsd"], seeds=[0], out=str(tmp_path / "r"), workers=1,
                         log=lambda line: None, **tiny)[0]
    assert alone["name"] == beside["name"] == resumed["name"]
    log = open(folder / (alone["name"] + ".log")).read()
    assert "iter     13/30" in log and "iter     12/30" not in log      # it went on from step 12
    for key in ("score", "map_error", "velocity_mse"):
        assert alone[key] == beside[key] == resumed[key], key
    weights = [fm.load(str(tmp_path / d / "runs" / (alone["name"] + ".npz")))["ema"] for d in "abr"]
    for k in weights[0]:
        assert np.array_equal(weights[0][k], weights[1][k]) and np.array_equal(weights[0][k], weights[2][k])


# ---------------------------------------------------------------- learned teachers


def saved_model(tmp_path, method, data="checkerboard", iters=40, name=None):
    model = fm.train(method, iters=iters, batch=128, data=data, **SMALL)
    path = str(tmp_path / (name or f"{method}_{data}.npz"))
    fm.save(model, path)
    return model, path


@pytest.mark.parametrize("method", ["lmd", "emd", "ptd"])
def test_a_saved_teacher_gives_the_same_targets(tmp_path, method):
    """The learned teacher is the saved fm model's diagonal: the diagonal's regression target and
    the off-diagonal target are the same whether the velocity is read from the model in memory
    or from its file, and differ from the exact teacher's."""
    teacher_model, path = saved_model(tmp_path, "fm")
    in_memory = lambda x, t: fm.velocity(teacher_model["ema"], x.astype(np.float32),
                                         t.astype(np.float32)).astype(x.dtype)
    cfg = fm.make_config(method, teacher_file=path, **SMALL)
    learned = fm.outside_velocity(cfg, fm.saved_flow_model(cfg))
    batch = fm.make_batch(np.random.default_rng(4), 64, method, cfg, learned, dtype=np.float64)
    assert np.array_equal(batch["target_diag"], in_memory(batch["x_diag"], batch["t_diag"]))
    params, _ = random_params(seed=2)
    pred = fm.predict(params, batch, method)[0]
    target = fm.off_diagonal_target(params, batch, pred, method, learned)
    assert np.array_equal(target, fm.off_diagonal_target(params, batch, pred, method, in_memory))
    exact = fm.off_diagonal_target(params, batch, pred, method, outside_of(method))
    assert np.abs(target - exact).max() > 1e-3 or fm.METHODS[method]["condition"] == "progressive"
    assert fm.label(cfg) == f"{method}@fm" and fm.label(fm.make_config(method)) == method
    with pytest.raises(ValueError, match="pass its weights as flow_model"):
        fm.outside_velocity(cfg)                         # the file is named but not loaded


def test_a_wrong_teacher_is_refused_in_one_line(tmp_path):
    _, lsd_file = saved_model(tmp_path, "lsd", iters=2)
    _, ring_file = saved_model(tmp_path, "fm", data="ring", iters=2)
    (tmp_path / "text.npz").write_text("not a model")
    cases = [(["--method", "lmd", "--teacher", lsd_file], "holds a lsd model"),
             (["--method", "ptd", "--teacher", ring_file], "trained on the ring"),
             (["--method", "itm", "--ref", lsd_file], "holds a lsd model"),
             (["--method", "emd", "--teacher", str(tmp_path / "none.npz")], "no such file"),
             (["--method", "lmd", "--teacher", str(tmp_path / "text.npz")], "not a readable")]
    for args, words in cases:
        r = run_cli(*args, "--iters", "1", "--out", str(tmp_path / "plots"))
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, args
    assert not (tmp_path / "plots").exists()                 # refused before anything ran
    with pytest.raises(ValueError, match="trained on the ring"):
        fm.saved_flow_model(fm.make_config("lmd", teacher_file=ring_file))


def test_a_comparison_trains_the_fm_teacher_first_and_labels_its_students(tmp_path):
    out, lines = str(tmp_path / "cmp"), []
    runs = fm.compare(["lmd@fm", "lmd"], seeds=[0], out=out, workers=2, log=lines.append,
                      iters=20, n_eval=2000, **SMALL)
    assert [r["method"] for r in runs] == ["fm", "lmd@fm", "lmd"]        # fm added: the teacher
    order = [line.split()[1] for line in lines if line.startswith("[")]
    assert order[0] == "fm"
    fm_run, student, exact = runs
    assert student["config"]["teacher_file"] == os.path.join(out, "runs", fm_run["name"] + ".npz")
    assert exact["config"]["teacher_file"] is None and student["name"] != exact["name"]
    md = open(os.path.join(out, "results.md")).read()
    assert "| lmd@fm |" in md and "| lmd |" in md and "| fm |" in md
    assert "teacher_file=the fm run of the same seed" in md and fm_run["name"] not in md   # not seed 0's file


# ---------------------------------------------------------------- reward tilting


def test_tilted_samples_are_the_data_reweighted_by_the_reward():
    """Rejection keeps a point with probability e^{beta (r - 1)}: the tilted set's mean of any
    function matches the importance-weighted mean over a large untilted pool."""
    for data in fm.DATASETS:
        reward = fm.DATASETS[data]["reward"]
        x = fm.sample_tilted(200_000, np.random.default_rng(0), data, 4.0)
        pool = fm.DATASETS[data]["sample"](400_000, np.random.default_rng(1))
        w = np.exp(4.0 * reward(pool))
        for f in (reward, lambda z: z[:, 0], lambda z: z[:, 1] ** 2):
            expected = np.sum(w * f(pool)) / w.sum()
            sd = np.std(f(x)) / math.sqrt(len(x))
            assert abs(f(x).mean() - expected) < 5 * sd + 5 * np.std(f(pool)) * math.sqrt(np.sum(w ** 2)) / w.sum()
        again = lambda: fm.sample_tilted(1000, np.random.default_rng(3), data, 4.0)
        assert np.array_equal(again(), again())
    ring = fm.sample_tilted(100_000, np.random.default_rng(2), "ring", 4.0)
    assert fm.DATASETS["ring"]["reward"](ring).mean() == pytest.approx(0.825, abs=0.005)
    assert fm.DATASETS["ring"]["reward"](fm.sample_ring(100_000, np.random.default_rng(2))).mean() \
        == pytest.approx(0.266, abs=0.005)


@pytest.mark.parametrize("data", list(fm.DATASETS))
def test_the_itm_target_at_beta_zero_is_the_reference(data):
    """At beta = 0 every tilt weight is 1 and the ITM target is v_ref itself, whatever sg(v) is;
    with beta > 0 it is v_ref + (e^{beta r(x1)} - 1) ((x1 - x0) - sg(v)) row by row."""
    cfg = fm.make_config("itm-lsd", data, beta=0.0)
    batch = fm.make_batch(np.random.default_rng(5), 64, "itm-lsd", cfg, fm.outside_velocity(cfg),
                          dtype=np.float64)
    v = np.random.default_rng(6).standard_normal(batch["ref_diag"].shape)
    ref = fm.exact_velocity(batch["x_diag"], batch["t_diag"], cfg["base_std"], data)
    assert np.all(batch["tilt_diag"] == 0)
    assert np.array_equal(fm.diagonal_target(batch, v), batch["ref_diag"])
    np.testing.assert_allclose(batch["ref_diag"], ref, rtol=1e-12)
    cfg = fm.make_config("itm-lsd", data)
    tilted = fm.make_batch(np.random.default_rng(5), 64, "itm-lsd", cfg, fm.outside_velocity(cfg),
                           dtype=np.float64)
    rng = np.random.default_rng(5)                                    # replay the draw
    x0, x1 = fm.sample_base(64, rng, cfg["base_std"]), fm.DATASETS[data]["sample"](64, rng)
    n_d = len(tilted["t_diag"])
    w = np.exp(4.0 * fm.DATASETS[data]["reward"](x1[:n_d]))
    np.testing.assert_allclose(fm.diagonal_target(tilted, v),
                               ref + (w - 1)[:, None] * ((x1 - x0)[:n_d] - v), rtol=1e-10)


def test_a_short_tilted_run_raises_the_mean_reward():
    """The same budget with beta = 4 and beta = 0 (plain flow matching on the reference): the
    tilted map's samples earn more reward, at 1 and 4 steps."""
    runs = {beta: fm.train("itm-lsd", data="ring", iters=600, batch=256, hidden=64,
                           depth=2, beta=beta) for beta in (0.0, 4.0)}
    r = {beta: fm.evaluate(m, n=4000, steps=(1, 4)) for beta, m in runs.items()}
    assert r[0.0]["target_reward"] == pytest.approx(r[0.0]["untilted"]["reward"], abs=0.02)
    for k in (1, 4):
        assert r[4.0]["reward"][k] > r[0.0]["reward"][k] + 0.2, k
    text = fm.format_results(r[4.0])
    assert "| mean reward |" in text and "tilted by e^(4 r)" in text and "exact" not in text


def test_tilted_methods_compare_on_the_tilted_data(tmp_path):
    out = str(tmp_path / "cmp")
    fm.compare(["itm-lsd", "itm-psd-mid"], data="ring", seeds=[0], out=out, workers=1,
               log=lambda line: None, iters=20, n_eval=2000, **SMALL)
    md = open(os.path.join(out, "results.md")).read()
    assert "## mean reward" in md and "| *tilted data* |" in md and "| *untilted data* |" in md
    assert "flow-map error" not in md and "exact flow" not in md
    for name in ("compare_samples.png", "compare_kl.png", "compare_loss.png"):
        assert is_png(os.path.join(out, name)), name


def test_a_float32_tie_of_s_and_t_is_parted():
    """s < t drawn in float64 can round to one float32 number; the batch parts them, so the
    progressive target (divided by t - s) stays finite."""
    class Tie:
        def __init__(self):
            self.rng = np.random.default_rng(0)

        def random(self, size=None):
            a = self.rng.random(size)
            if np.shape(a)[-1:] == (2,):
                a[0] = (0.3, 0.3 + 1e-9)                              # one tie in float32
            return a

        def __getattr__(self, name):
            return getattr(self.rng, name)

    cfg = fm.make_config("psd-mid", **SMALL)
    batch = fm.make_batch(Tie(), 64, "psd-mid", cfg)
    assert np.all(batch["s"] < batch["t"]) and batch["t"][0] - batch["s"][0] < 1e-7
    params = fm.init_params(np.random.default_rng(0), cfg)
    pred = fm.predict(params, batch, "psd-mid")[0]
    assert np.all(np.isfinite(fm.off_diagonal_target(params, batch, pred, "psd-mid")))


def test_anchored_rows_start_at_zero_and_leave_the_rest_of_the_batch_alone():
    """s0_share = 0.25: the first quarter of the off-diagonal rows start at s = 0 (I_0 = x0, u
    between 0 and t), and every other number of the batch is the one drawn without it."""
    cfg = fm.make_config("itm-lsd", "ring")
    assert cfg["s0_share"] == 0.25 and fm.make_config("lsd")["s0_share"] is None
    plain = dict(cfg, s0_share=None)
    a = fm.make_batch(np.random.default_rng(8), 400, "itm-lsd", cfg, fm.outside_velocity(cfg), np.float64)
    b = fm.make_batch(np.random.default_rng(8), 400, "itm-lsd", plain, fm.outside_velocity(cfg), np.float64)
    k = len(a["s"]) // 4
    assert np.all(a["s"][:k] == 0) and np.all(b["s"][:k] > 0)
    assert np.array_equal(a["s"][k:], b["s"][k:]) and np.array_equal(a["t"], b["t"])
    rng = np.random.default_rng(8)
    x0 = fm.sample_base(400, rng, cfg["base_std"])
    np.testing.assert_allclose(a["x_off"][:k], x0[300:300 + k], rtol=1e-12)      # I_0 = x0
    for key in ("x_diag", "t_diag", "ref_diag", "dI_diag", "tilt_diag"):
        assert np.array_equal(a[key], b[key]), key
