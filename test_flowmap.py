"""Tests for flowmap.py: every gradient against central differences in float64, then the
pieces around them (Adam, data, metric, sampling, training, command line)."""

import inspect
import json
import shlex
import math
import os
import re
import signal
import statistics
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


def OFF(cap=0.0, row_weight=None, row_c=None, weight=2.0, diag_row_weight=None, row_p=None):
    """The loss's settings (flowmap.loss_settings), plain squares unless a cap is given."""
    return dict(off_weight=weight, off_cap=cap, row_weight=row_weight, row_c=row_c,
                diag_row_weight=diag_row_weight, row_p=row_p)


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


@pytest.mark.parametrize("method", ["ayf-emd-hybrid", "ayf-lmd-hybrid"])
def test_the_warm_up_scales_the_tangent_term(method):
    """The factor grows linearly from 0 at the first step to the cap at derivative_warmup (AYF:
    0.99, so the full target is never reached; without a cap, 1), and each step trains on the
    target at its factor: the loss and gradient train_step gets are those of the target built at
    min(cap, it / 4) (derivative_warmup 4, counted here by hand), which differ from the full
    target's while the factor is below 1. At 0 the value route's target is the teacher's
    velocity where the condition reads it (b(I_s, s) for the Eulerian, b(X, t) for the
    Lagrangian), and at 1/2 it is halfway to the full target."""
    cfg = fm.make_config(method)
    assert cfg["derivative_warmup"] == 2000 and cfg["derivative_cap"] == 0.99
    assert ([fm.derivative_factor(cfg, it) for it in (0, 500, 1000, 1970, 1980, 1999, 2000, 9000)]
            == pytest.approx([0.0, 0.25, 0.5, 0.985, 0.99, 0.99, 0.99, 0.99], rel=1e-15, abs=0))
    uncapped = fm.make_config(method, derivative_cap=1.0)
    assert [fm.derivative_factor(uncapped, it) for it in (1980, 2000, 9000)] == [0.99, 1.0, 1.0]
    assert fm.derivative_factor(fm.make_config("esd-value"), 0) == 1.0    # no warm-up: the whole term
    for cap in (0.99, 1.0):
        model = fm.new_model(fm.make_config(method, derivative_warmup=4, derivative_cap=cap, **SMALL))
        outside, settings = fm.outside_velocity(model["config"]), fm.loss_settings(model["config"])
        for it in range(6):                      # train() counts the steps in model["iter"]
            model["iter"], seen = it, []

            def spy(params, batch, method_, off, **built):
                got = fm.loss_and_grads(params, batch, method_, off, **built)
                pred = fm.predict(params, batch, method)[0]
                at = lambda warm: fm.loss_and_grads(params, batch, method, settings, fm.off_diagonal_target(
                    params, batch, pred, method, outside, warm))
                seen.append((got, at(min(cap, it / 4)), at(1.0), built["warm"]))
                return got

            batch = fm.make_batch(np.random.default_rng(it), 32, method, model["config"], outside)
            fm.train_step(model, batch, 1e-3, outside, grads_of=spy)
            (got, want, full, warm), = seen
            assert warm == min(cap, it / 4), (cap, it)
            assert got[0] == want[0], (cap, it)
            assert all(np.array_equal(got[1][k], want[1][k]) for k in got[1]), (cap, it)
            reaches = cap == 1.0 and it >= 4
            assert (got[0][1] == full[0][1]) == reaches, (cap, it)   # the factor shows in the loss
    params, _ = random_params(seed=33)
    batch = random_batch(method, n=24)
    pred = fm.predict(params, batch, method)[0]
    outside = outside_of(method)
    target = lambda warm: fm.off_diagonal_target(params, batch, pred, method, outside, warm)
    s, t = batch["s"], batch["t"]
    b = outside(batch["x_off"], s) if method == "ayf-emd-hybrid" else outside(pred["X_off"], t)
    np.testing.assert_allclose(target(0.0), b, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(target(0.5), (target(0.0) + target(1.0)) / 2, rtol=1e-10, atol=1e-10)
    assert np.abs(target(1.0) - b).max() > 1e-2


@pytest.mark.parametrize("weight, p", [("adaptive", 1.0), ("adaptive", 0.75), ("normalized", None)])
def test_weights_that_read_the_residual_are_held_fixed_in_the_gradient(weight, p):
    """MeanFlow's adaptive weight (a row pulls as 2 r / (|r|^2 + c)^p, on the diagonal's rows
    too: p = 1 its ImageNet code's, 0.75 its CIFAR-10 code's) and the tangent normalisation
    (2 r / (|r| + c), off the diagonal) read the residual r, yet are frozen like the other row
    weights: the gradient is that of the loss with each row's weight held at its value, and
    measurably not that of the weighted loss with the weight moving. The off-diagonal loss is
    the mean of w^2 |r|^2."""
    method = "meanflow-imagenet"
    params, _ = random_params(seed=34)
    batch = random_batch(method, n=24)
    target = frozen_target(params, batch, method)
    pred = fm.predict(params, batch, method)[0]
    norm2 = lambda r: (r * r).sum(1)
    r_o, r_d = pred["q"] - target, pred["v_diag"] - batch["target_diag"]
    if weight == "adaptive":
        c = float(np.median(norm2(r_o)))
        pull = lambda r: (norm2(r) + c) ** -p
        pull_d = pull(r_d)
    else:
        c = float(np.median(np.sqrt(norm2(r_o))))
        pull = lambda r: 1.0 / (np.sqrt(norm2(r)) + c)
        pull_d = np.ones(len(r_d))
    w_o = pull(r_o)
    assert w_o.max() > 1.5 * w_o.min()                           # the weights differ between rows
    off = OFF(row_weight=weight, row_c=c, diag_row_weight="adaptive" if weight == "adaptive" else None,
              row_p=p)
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


def target_by_hand(params, batch, method):
    """The off-diagonal target of lsd, esd and psd-mid from the map alone: v at the jump's end
    X_{s,t}(I_s); minus grad_x X_{s,t} . v(I_s, s) by central differences; the displacement of
    the two half jumps through the midpoint u = (s + t) / 2, over t - s."""
    x, s, t = batch["x_off"], batch["s"], batch["t"]
    u = (s + t) / 2
    if method == "lsd":
        return fm.velocity(params, fm.flow_map(params, x, s, t), t)
    if method == "esd":
        b, h = fm.velocity(params, x, s), 1e-6
        return -(fm.flow_map(params, x + h * b, s, t) - fm.flow_map(params, x - h * b, s, t)) / (2 * h)
    return (fm.flow_map(params, fm.flow_map(params, x, s, u), u, t) - x) / (t - s)[:, None]


@pytest.mark.parametrize("method", ["lsd", "esd", "psd-mid"])
def test_teacher_is_frozen_inside_the_step(method):
    """Without a target passed in, the step builds its target from the current weights, yet no
    gradient flows through it: the step's gradient is the finite-difference gradient of the loss
    written here by hand, mean |v - (x1 - x0)|^2 + 2 mean |q - target|^2, with the target built
    by hand from the weights (target_by_hand) and held fixed; and measurably not the one with
    that target moving with the weights."""
    params, _ = random_params(seed=7)
    batch = random_batch(method)
    grads = fm.loss_and_grads(params, batch, method, OFF())[1]
    held = target_by_hand(params, batch, method)
    norm2 = lambda r: (r * r).sum(1)

    def by_hand(target):
        pred = fm.predict(params, batch, method)[0]
        return (np.mean(norm2(pred["v_diag"] - batch["target_diag"]))
                + 2.0 * np.mean(norm2(pred["q"] - target)))

    for k in ("W0", "b1"):
        fixed = numeric_grad(lambda: by_hand(held), params[k])
        moving = numeric_grad(lambda: by_hand(target_by_hand(params, batch, method)), params[k])
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


@pytest.mark.parametrize("method", [m for m in fm.METHODS if fm.make_config(m)["times"] == "triangle"])
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
    assert np.array_equal(batch["gap_diag"], np.zeros(400 - n_o))   # the diagonal rows at s = t
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


def test_shortcut_flow_matching_rows_are_jumps_of_the_finest_level():
    """shortcut's flow-matching rows are its code's finest level: v(I_t, t, t + 1/128) regressed
    on x1 - x0, t on the grid j / 128, j = 0..127, so every such jump ends at or below 1. 1/128 is
    half the smallest bootstrap gap (1/64), and the halves of a 1/64 jump are such jumps, on the
    same grid. predict reads v there, and the diagonal loss and its gradient are those of
    mean |v(I_t, t, t + 1/128) - (x1 - x0)|^2, computed here from flow_map_forward; with diag_gap
    0 the same draw reads v(I_t, t, t)."""
    cfg = fm.make_config("shortcut", **SMALL)
    batch = fm.make_batch(np.random.default_rng(40), 4096, "shortcut", cfg)     # float32, as trained
    td, gap = batch["t_diag"], batch["gap_diag"]
    assert len(td) == 3584 and gap.dtype == np.float32 and np.all(gap == 2.0 ** -7)
    j = td * 128
    assert np.array_equal(j, np.round(j)) and set(j.astype(int)) == set(range(128))
    assert np.all(td + gap <= 1.0) and np.max(td + gap) == 1.0
    s, u, t = batch["s"], batch["u"], batch["t"]
    assert (t - s).min() == 1 / 64 == 2 * gap[0]
    finest = (t - s) == 1 / 64
    assert finest.sum() > 10
    for a, b in [(s[finest], u[finest]), (u[finest], t[finest])]:   # the halves of a 1/64 jump
        assert np.all(b - a == 1 / 128) and np.array_equal(a * 128, np.round(a * 128)) and a.max() <= 127 / 128
    params, _ = random_params(seed=41)
    small = fm.make_batch(np.random.default_rng(42), 48, "shortcut", cfg, dtype=np.float64)   # 42 + 6
    x, td, dI = small["x_diag"], small["t_diag"], small["target_diag"]
    assert len(td) == 42
    x0, x1 = replay_draw(48, cfg, 42)
    np.testing.assert_allclose(dI, (x1 - x0)[:42], rtol=1e-12)
    v_at = lambda p, end: fm.flow_map_forward(p, x, td, end)[0]
    v_gap, v_flat = v_at(params, td + 1 / 128), v_at(params, td)
    assert np.abs(v_gap - v_flat).max() > 1e-3
    np.testing.assert_allclose(fm.predict(params, small, "shortcut")[0]["v_diag"], v_gap, rtol=1e-12, atol=1e-14)
    flat = fm.make_batch(np.random.default_rng(42), 48, "shortcut", dict(cfg, diag_gap=0.0), dtype=np.float64)
    np.testing.assert_allclose(fm.predict(params, flat, "shortcut")[0]["v_diag"], v_flat, rtol=1e-12, atol=1e-14)
    settings = dict(fm.loss_settings(cfg), off_weight=0.0)     # the diagonal's part alone
    target = frozen_target(params, small, "shortcut")
    (loss_d, _, _), grads = fm.loss_and_grads(params, small, "shortcut", settings, target)
    hand = lambda p: float(np.mean(((v_at(p, td + 1 / 128) - dI) ** 2).sum(1)))
    assert loss_d == pytest.approx(hand(params), rel=1e-12)
    assert loss_d != pytest.approx(float(np.mean(((v_flat - dI) ** 2).sum(1))), rel=1e-3)
    d = {k: np.random.default_rng(43).standard_normal(params[k].shape) for k in fm.trainable(params)}
    shift = lambda e: {k: params[k] + e * d[k] if k in d else params[k] for k in params}
    numeric = (hand(shift(1e-5)) - hand(shift(-1e-5))) / 2e-5
    assert sum(float((grads[k] * d[k]).sum()) for k in d) == pytest.approx(numeric, rel=1e-7)


def test_times_of_meanflow_imagenet():
    """meanflow-imagenet: 75% of the rows at s = t; off them a sorted pair of logit-normal(0.4, 1)
    times (MeanFlow's logit-normal(-0.4, 1) with time reversed); a diagonal row keeps the earlier
    time of its pair, whose logit has mean 0.4 - 1 / sqrt(pi)."""
    cfg = fm.make_config("meanflow-imagenet")
    batch = fm.make_batch(np.random.default_rng(5), 8000, "meanflow-imagenet", cfg, dtype=np.float64)
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


def test_sample_is_seeded_and_jumps_with_the_sampling_weights():
    """One step of sample() is the jump X_{0,1}(x0) through the EMA weights, not the trained
    ones, from x0 = sqrt(4/3) z (the checkerboard's std), z the seed's standard normals in
    float32: its values, and float64 (n, 2) out; the same seed gives the same samples."""
    model = fm.new_model(fm.make_config("lsd", **SMALL))
    for k in fm.trainable(model["params"]):
        model["params"][k] = model["params"][k] + 0.1             # the weights apart from the EMA
    x0 = (math.sqrt(4 / 3) * np.random.default_rng(3).standard_normal((1000, 2))).astype(np.float32)
    want = fm.flow_map(model["ema"], x0, 0.0, 1.0)
    got = fm.sample(model, 1000, 1, seed=3)
    assert got.shape == (1000, 2) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(got - fm.flow_map(model["params"], x0, 0.0, 1.0)).max() > 1e-2
    assert np.array_equal(got, fm.sample(model, 1000, 1, seed=3))
    assert np.abs(got - fm.sample(model, 1000, 1, seed=4)).max() > 0.5


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


# the sampler each method takes, by hand: fm steps with Euler's rule, sct and scd with the
# consistency sampler, every other method jumps with its map
SAMPLER_BY_HAND = {"fm": "euler", "sct": "consistency", "scd": "consistency"}


def samples_by_hand(params, kind, n, steps, seed, std):
    """The samplers written out: x0 and the fresh noise z_1 .. z_N-1 are std times the seed's
    standard normals, in that order; on the grid t_k = k / N, map: x <- X_{t_k,t_k+1}(x);
    euler: x <- x + (t_k+1 - t_k) v(x, t_k, t_k); consistency: x <- X_{t_k,1}((1 - t_k) z_k + t_k x)
    (x itself at k = 0)."""
    z = std * np.random.default_rng(seed).standard_normal((steps * n, 2))
    x, noise = z[:n].astype(np.float32), z[n:].reshape(steps - 1, n, 2).astype(np.float32)
    for k in range(steps):
        s, t = k / steps, (k + 1) / steps
        if kind == "map":
            x = fm.flow_map(params, x, s, t)
        elif kind == "euler":
            x = x + np.float32(t - s) * fm.velocity(params, x, s)
        else:
            start = x if k == 0 else ((1 - s) * noise[k - 1] + s * x).astype(np.float32)
            x = fm.flow_map(params, start, s, 1.0)
    return x.astype(np.float64)


@pytest.mark.parametrize("method", list(fm.METHODS))
def test_the_fast_sampler_gives_the_plain_samples(method):
    """The API's sampler (chunks on all cores, appendix B), the plain one (every point at once)
    and chunks of another size all give the samples of the method's sampler written out by hand
    (SAMPLER_BY_HAND), up to float32 rounding, and measurably not those of the other two."""
    model = fm.new_model(fm.make_config(method, **SMALL))
    n, steps, std = 1500, 4, model["config"]["base_std"]
    by_hand = {kind: samples_by_hand(model["ema"], kind, n, steps, 2, std)
               for kind in ("map", "euler", "consistency")}
    want = by_hand.pop(SAMPLER_BY_HAND.get(method, "map"))
    fast = fm.sample(model, n, steps, seed=2)
    assert np.abs(want).max() > 0.5 and fast.dtype == np.float64
    for run in (fm.jumps, chunks(400)):
        np.testing.assert_allclose(fm.sample(model, n, steps, seed=2, run=run), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(fast, want, atol=1e-5, rtol=0)
    assert all(np.abs(other - want).max() > 1e-3 for other in by_hand.values())


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
    off = OFF(0.5, row_weight=cfg["row_weight"], row_c=cfg["row_c"] or 0.1, row_p=cfg["row_p"])
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


# Rows through the network in one step of 64 rows, counted by hand: (the student's pass, every
# pass). 48 diagonal + 16 off rows (12.5% off for shortcut: 56 + 8; 75% off for meanflow-cifar:
# 16 + 48; none on the diagonal for sct, scd and the AYF hybrids: 64 off). The student's pass:
# 64 rows, plus a tangent row per off row on the derivative route. The target's passes: v at
# the jump's end X (lagrangian, own teacher); v at I_s (eulerian, own teacher) and a tangent
# pass of 2 rows per off row (eulerian; lagrangian on the value route); the two half jumps
# (progressive). An outside or conditional teacher is no pass.
ROWS_BY_HAND = {
    "fm": (64, 64),
    "lsd": (80, 80 + 16), "esd": (80, 80 + 16 + 32), "esd-value": (64, 64 + 16 + 32),
    "lsd-value": (64, 64 + 32 + 16), "psd-mid": (64, 64 + 32), "psd-uni": (64, 64 + 32),
    "lmd": (80, 80), "emd": (80, 80 + 32), "ptd": (64, 64 + 32),
    "itm-lsd": (80, 80 + 16), "itm-psd-mid": (64, 64 + 32),
    "meanflow": (64, 64 + 32),            # the search kept its 75% of rows at s = t
    "meanflow-imagenet": (64, 64 + 32), "meanflow-cifar": (64, 64 + 96),
    "sct": (64, 64 + 128), "scd": (64, 64 + 128), "shortcut": (64, 64 + 16),
    "ayf-emd-hybrid": (64, 64 + 128), "ayf-lmd-hybrid": (64, 64 + 128),
}


def test_rows_by_hand_name_every_method():
    assert sorted(ROWS_BY_HAND) == sorted(fm.METHODS)


@pytest.mark.parametrize("method", list(ROWS_BY_HAND))
def test_benchmark_counts_the_rows_a_step_runs(method, monkeypatch):
    """The rows a real step sends through the network, and step_gemms' count of them, against
    the count by hand (ROWS_BY_HAND): the first layer's forward product covers every pass, its
    weight gradient the student's pass alone."""
    student, every = ROWS_BY_HAND[method]
    rows = []
    real = fm.mlp_forward
    monkeypatch.setattr(fm, "mlp_forward", lambda params, a, n: rows.append(len(a)) or real(params, a, n))
    cfg = fm.make_config(method, batch=64, **SMALL)
    batch = fm.make_batch(np.random.default_rng(0), 64, method, cfg, fm.outside_velocity(cfg))
    params = fm.init_params(np.random.default_rng(0), cfg)
    fm.loss_and_grads(params, batch, method, OFF(), outside=fm.outside_velocity(cfg))
    assert (rows[0], sum(rows)) == (student, every), rows
    gemms = fm.step_gemms(cfg, method)
    assert (gemms[1][1], gemms[0][0]) == (student, every)
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
    with fm.blas_threads(1):                      # as a comparison trains: the same rounding anywhere
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
    """600 steps of lsd: the diagonal's loss falls, the samples' KL and the diagonal's velocity
    error fall well below the untrained network's, and the distillation does its part: the
    one-step jump is nearer the exact flow map (from the same x0) than that of the same run with
    the off-diagonal loss switched off (off_weight 0: the same batches, the diagonal alone
    trained), by a wide margin, as a run with a wrong off-diagonal target would not be. On one
    BLAS thread, as a comparison trains: the same rounding on every machine (and no wait on a
    second thread when the machine is busy)."""
    kw = dict(iters=600, batch=512, hidden=64, depth=2, seed=0)
    with fm.blas_threads(1):
        model, diagonal_only = fm.train("lsd", **kw), fm.train("lsd", off_weight=0.0, **kw)
    h = model["history"]
    assert h[-100:, 0].mean() < 0.8 * h[:20, 0].mean()       # diagonal
    untrained = fm.new_model(model["config"])
    x_true = fm.sample_checkerboard(20_000, np.random.default_rng(0))
    kl = lambda m: fm.histogram_kl(x_true, fm.sample(m, 20_000, 2))
    assert kl(model) < 0.6 * kl(untrained)
    v_error = lambda m: fm.velocity_error(lambda x, t: fm.velocity(m["ema"], x.astype(np.float32), t),
                                          S, CB, np.random.default_rng(1), n=5000)["mse"]
    assert v_error(model) < 0.5 * v_error(untrained)
    x0 = S * np.random.default_rng(0).standard_normal((5000, 2))        # as sample(seed=0) draws it
    x_exact = fm.exact_flow(x0, 0.0, 1.0, S, CB)
    map_error = lambda m, k: np.linalg.norm(fm.sample(m, 5000, k) - x_exact, axis=1).mean()
    assert map_error(model, 4) < 0.7 * map_error(untrained, 4)
    assert map_error(model, 1) < 0.6 * map_error(diagonal_only, 1)


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


def run_main(capsys, *args):
    """The command line in this process: fm.main(args). -> (exit status, stdout, stderr)"""
    capsys.readouterr()
    try:
        fm.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args):
    """The one line of a command line refused with status 2 (an exception other than the exit,
    a traceback on the command line, fails the test)."""
    code, out, err = run_main(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, (args, code, err)
    return err


@pytest.fixture
def nothing_runs(monkeypatch):
    """A command line that should be refused must not get as far as training or benchmarking."""
    def ran(*args, **kwargs):
        raise AssertionError("it ran instead of refusing")
    for name in ("run_training", "compare", "tune", "bench", "evaluate"):
        monkeypatch.setattr(fm, name, ran)


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
    (["--method", "lsd", "--teacher", "x.npz"],
     "--teacher is for lmd, emd, ptd, scd, ayf-emd-hybrid, ayf-lmd-hybrid, not lsd"),
    (["--method", "lmd", "--ref", "x.npz"], "--ref is for itm, not lmd"),
    (["--method", "itm,lsd"], "compare it with tilted methods only"),
    (["--method", "itm,itm-lsd"], "a method twice"),
    (["--method", "lmd@fm"], "taught by the fm run of its seed in a comparison"),
    (["--method", "lsd@fm"], "unknown method lsd@fm"),
    (["--method", "lmd@ema"], "unknown method lmd@ema"),
])
def test_cli_bad_input_is_one_clear_line(args, words, capsys, nothing_runs):
    assert words in refused(capsys, *args)


class Stop(Exception):
    """Ends a command line where a test has seen what it needs."""


def stop_with(seen, real):
    """A stand-in for flowmap's function `real` that notes its arguments by name and stops."""
    def stop(*args, **kwargs):
        seen.append(called_with(real, args, kwargs))
        raise Stop
    return stop


def called_with(real, args, kwargs):
    """The arguments of a call of `real`, by name, however they were passed."""
    return inspect.signature(real).bind(*args, **kwargs).arguments


def test_cli_recipe_flags_reach_the_loss_and_the_checkpoints(tmp_path, capsys, monkeypatch):
    """--off-weight, --off-cap, --seed and --preset reach the run's config (a flag beats the
    preset); the loss of each of the 6 steps is computed with the off-diagonal weight and cap
    given; the weights are those of the same run through the API (the seed draws them); and
    --save-every 2 writes the file after steps 2 and 4 and at the end."""
    settings, saved, evaluated = [], [], []
    real_loss, real_save = fm.loss_and_grads, fm.save
    monkeypatch.setattr(fm, "loss_and_grads", lambda *a, **k: settings.append(
        called_with(real_loss, a, k)["settings"]) or real_loss(*a, **k))
    monkeypatch.setattr(fm, "save", lambda model, path: saved.append((model["iter"], path))
                        or real_save(model, path))
    monkeypatch.setattr(fm, "evaluate", stop_with(evaluated, fm.evaluate))
    ck = str(tmp_path / "m.npz")
    with pytest.raises(Stop):
        fm.main(["--off-weight", "3.5", "--off-cap", "0.7", "--seed", "5", "--preset", "long",
                 "--iters", "6", "--save", ck, "--save-every", "2", "--out", str(tmp_path),
                 "--hidden", "8", "--depth", "2", "--batch", "32"])
    model = evaluated[0]["model"]
    cfg = model["config"]
    assert ((cfg["off_weight"], cfg["off_cap"], cfg["seed"], cfg["preset"], cfg["iters"])
            == (3.5, 0.7, 5, "long", 6))
    assert len(settings) == 6 and all((o["off_weight"], o["off_cap"]) == (3.5, 0.7) for o in settings)
    assert saved == [(2, ck), (4, ck), (6, ck)] and fm.load(ck)["iter"] == 6
    monkeypatch.setattr(fm, "loss_and_grads", real_loss)
    api = fm.train("lsd", off_weight=3.5, off_cap=0.7, seed=5, preset="long", iters=6, hidden=8,
                   depth=2, batch=32)
    seed0 = fm.train("lsd", off_weight=3.5, off_cap=0.7, preset="long", iters=6, hidden=8, depth=2, batch=32)
    for k in fm.trainable(api["params"]):
        assert np.array_equal(model["params"][k], api["params"][k]), k
    assert np.abs(model["params"]["W0"] - seed0["params"]["W0"]).max() > 1e-2


def test_cli_preset_seed_and_cap_reach_the_run_or_the_comparison(monkeypatch):
    """--preset long alone trains 400,000 steps (20,000 without it); in a comparison --seed S
    --seeds 2 trains seeds S and S + 1, and a cap of 0 (plain squares) is passed on, not dropped."""
    trained, compared = [], []
    monkeypatch.setattr(fm, "run_training", stop_with(trained, fm.run_training))
    monkeypatch.setattr(fm, "compare", stop_with(compared, fm.compare))
    for flags, iters, preset in [(["--preset", "long"], 400_000, "long"), ([], 20_000, None)]:
        with pytest.raises(Stop):
            fm.main(flags)
        cfg = trained.pop()["model"]["config"]
        assert (cfg["iters"], cfg["preset"], cfg["seed"]) == (iters, preset, 0)
    with pytest.raises(Stop):
        fm.main(["--method", "lsd,esd", "--seed", "3", "--seeds", "2", "--off-cap", "0",
                 "--off-weight", "3", "--preset", "long"])
    call = compared[0]
    assert call["methods"] == ["lsd", "esd"] and list(call["seeds"]) == [3, 4]
    assert {k: call["overrides"][k] for k in ("off_cap", "off_weight", "preset")} == {
        "off_cap": 0.0, "off_weight": 3.0, "preset": "long"}


def test_cli_bench_times_every_method_and_trains_nothing(capsys, monkeypatch):
    """--bench times one step of every method (here on a tiny reference step, one step each)
    and exits: a line per method, nothing trained or evaluated."""
    monkeypatch.setattr(fm, "BENCH", dict(hidden=8, depth=2, batch=64, diag_fraction=0.75))
    real, calls = fm.bench, []
    monkeypatch.setattr(fm, "bench", lambda *a, **k: calls.append(a)
                        or real(*a, **dict(k, steps=1, warmup=0)))
    for name in ("run_training", "compare", "evaluate"):
        monkeypatch.setattr(fm, name, stop_with([], getattr(fm, name)))
    code, out, err = run_main(capsys, "--bench")
    assert code == 0 and len(calls) == 1 and err == ""
    timed = [line.split()[0] for line in out.splitlines() if "ms/step" in line]
    assert timed == list(fm.METHODS)


def test_a_named_group_compares_into_its_own_folder():
    """--method known and teachers write beside, not over, the main table of --method all."""
    out = lambda *args: fm.parse_args(list(args)).out
    assert out("--method", "all", "--seeds", "3") == "plots/compare_checkerboard"
    assert out("--method", "known", "--seeds", "3") == "plots/compare_checkerboard_known"
    assert out("--data", "ring", "--method", "teachers") == "plots/compare_ring_teachers"
    assert out("--method", "lsd,esd") == "plots/compare_checkerboard"
    assert out("--method", "known", "--out", "x") == "x"
    assert fm.parse_args(["--method", "known"]).method == list(fm.KNOWN_METHODS)


def test_cli_load_missing_file(tmp_path, capsys, nothing_runs):
    assert "no such file" in refused(capsys, "--load", str(tmp_path / "nope.npz"), "--out", str(tmp_path))


def test_cli_out_is_an_existing_file(tmp_path, capsys, nothing_runs):
    f = tmp_path / "afile"
    f.write_text("x")
    assert "existing file" in refused(capsys, "--out", str(f))


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


def test_cli_load_rejects_bad_files_in_one_line(tmp_path, capsys, nothing_runs):
    for case, path in bad_model_files(tmp_path).items():
        assert str(path) in refused(capsys, "--load", str(path), "--out", str(tmp_path / "plots")), case


# ---------------------------------------------------------------- checkpoints, interrupts, divergence


def quiet(line):
    pass


@pytest.mark.parametrize("method, stop, iters, settings", [
    ("lsd", 20, 40, {}),
    ("shortcut", 5, 10, {}),                              # its target built by the EMA weights
    ("sct", 2, 10, dict(derivative_warmup=3))])           # stopped with the warm-up at 2/3
def test_interrupt_saves_and_resume_matches_an_uninterrupted_run(tmp_path, method, stop, iters, settings):
    """Ctrl-C during a step saves the model at that step's end; resumed from the file, the run
    ends with the weights, EMA, Adam state and losses of the run never interrupted, bit for bit."""
    kw = dict(iters=iters, batch=64, **settings, **SMALL)
    full = fm.train(method, **kw)
    path = str(tmp_path / "ck.npz")

    def log(line):                                          # Ctrl-C arrives during step `stop`
        if line.startswith(f"iter {stop:>6}/"):
            signal.raise_signal(signal.SIGINT)

    cfg = fm.make_config(method, **kw)
    with pytest.raises(KeyboardInterrupt):
        fm.run_training(fm.new_model(cfg), log=log, checkpoint=path)
    part = fm.load(path)
    assert part["iter"] == stop
    if settings:
        assert fm.derivative_factor(cfg, stop) == pytest.approx(2 / 3)
    resumed = fm.train(model=part)
    assert resumed["iter"] == iters
    for group in ("params", "ema"):
        for k in fm.trainable(full["params"]):
            assert np.array_equal(resumed[group][k], full[group][k]), (group, k)
    for moment in ("m", "v"):
        assert all(np.array_equal(resumed["adam"][moment][k], full["adam"][moment][k])
                   for k in full["adam"]["m"]), moment
    assert resumed["adam"]["step"] == full["adam"]["step"] == iters
    assert np.array_equal(resumed["history"], full["history"])


def test_periodic_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """7 steps with save_every 3: the file is written after steps 3 and 6 and at the end, each
    time a whole model at that step (read back as soon as it is written: the weights of a run
    of that many steps), with no temporary file left beside it."""
    path = tmp_path / "ck.npz"
    kw = dict(iters=7, batch=32, **SMALL)
    saved, real = [], fm.save

    def save(model, where):
        real(model, where)
        assert [p.name for p in tmp_path.iterdir()] == ["ck.npz"]   # no temporary file left behind
        saved.append(fm.load(where))

    monkeypatch.setattr(fm, "save", save)
    fm.run_training(fm.new_model(fm.make_config("lsd", **kw)), log=quiet, checkpoint=str(path),
                    save_every=3)
    assert [m["iter"] for m in saved] == [3, 6, 7]
    for m in saved:
        alone = fm.train("lsd", **dict(kw, iters=m["iter"]))
        for group in ("params", "ema"):
            assert all(np.array_equal(m[group][k], alone[group][k]) for k in alone[group]), (m["iter"], group)
        assert np.array_equal(m["history"], alone["history"])


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


def test_cli_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path, capsys):
    """Ctrl-C on the command line (a real process: the signal, the exit status 130) saves the
    run and says how to continue it; --resume (here in this process) trains it to the new --iters."""
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
    code, out, err = run_main(capsys, "--resume", ck, "--iters", str(done + 10), "--batch", "64",
                              "--out", str(tmp_path / "plots"), "--eval-samples", "2000")   # the saved batch
    assert code == 0, err
    assert fm.load(ck)["iter"] == done + 10 and f"saved {ck}" in out


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


def test_cli_resume_keeps_the_saved_recipe(tmp_path, capsys, nothing_runs):
    """--resume changes --iters only (a flag that names the saved value is accepted: the Ctrl-C
    test above); a flag that names another value is refused in one line that names it, and the
    file is left as it was. --load takes no recipe flag that differs from the saved one."""
    ck = str(tmp_path / "m.npz")
    fm.save(fm.train("lsd", iters=8, batch=64, **SMALL), ck)
    for flags, name in [(["--lr", "0.01"], "--lr 0.01"), (["--batch", "128"], "--batch 128"),
                        (["--method", "esd"], "--method esd"), (["--data", "ring"], "--data ring")]:
        err = refused(capsys, "--resume", ck, "--iters", "12", *flags, "--out", str(tmp_path))
        assert name in err and "changes only --iters" in err, flags
        assert fm.load(ck)["iter"] == 8
    err = refused(capsys, "--load", ck, "--lr", "0.01", "--out", str(tmp_path))
    assert "--lr 0.01" in err and "as it was trained" in err


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


@pytest.mark.parametrize("method, reads_it_off_the_diagonal", [("lmd", True), ("emd", True), ("ptd", False)])
def test_a_saved_teacher_gives_the_same_targets(tmp_path, method, reads_it_off_the_diagonal):
    """The learned teacher is the saved fm model's diagonal: the diagonal's regression target and
    the off-diagonal target are the same whether the velocity is read from the model in memory
    or from its file. Off the diagonal lmd and emd read it, so their target differs from the
    exact teacher's; ptd's progressive target reads no teacher, so it is the same."""
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
    if reads_it_off_the_diagonal:
        assert np.abs(target - exact).max() > 1e-3
    else:
        assert np.array_equal(target, exact)
    assert fm.label(cfg) == f"{method}@fm" and fm.label(fm.make_config(method)) == method
    with pytest.raises(ValueError, match="pass its weights as flow_model"):
        fm.outside_velocity(cfg)                         # the file is named but not loaded


def test_a_wrong_teacher_is_refused_in_one_line(tmp_path, capsys, nothing_runs):
    _, lsd_file = saved_model(tmp_path, "lsd", iters=2)
    _, ring_file = saved_model(tmp_path, "fm", data="ring", iters=2)
    (tmp_path / "text.npz").write_text("not a model")
    cases = [(["--method", "lmd", "--teacher", lsd_file], "holds a lsd model"),
             (["--method", "ptd", "--teacher", ring_file], "trained on the ring"),
             (["--method", "itm", "--ref", lsd_file], "holds a lsd model"),
             (["--method", "emd", "--teacher", str(tmp_path / "none.npz")], "no such file"),
             (["--method", "lmd", "--teacher", str(tmp_path / "text.npz")], "not a readable")]
    for args, words in cases:
        assert words in refused(capsys, *args, "--iters", "1", "--out", str(tmp_path / "plots")), args
    assert not (tmp_path / "plots").exists()                 # refused before anything ran
    with pytest.raises(ValueError, match="trained on the ring"):
        fm.saved_flow_model(fm.make_config("lmd", teacher_file=ring_file))


def test_a_comparison_trains_the_fm_teacher_first_and_labels_its_students(tmp_path):
    """NAME@fm: the fm teacher is trained first, the student reads its file, the table labels
    both; the same command again reuses all three runs, the student taught from outside (by the
    fm run, or by the exact velocity) too: nothing is trained, the numbers are the same."""
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
    again = []
    assert fm.compare(["lmd@fm", "lmd"], seeds=[0], out=out, workers=2, log=again.append,
                      iters=20, n_eval=2000, **SMALL) == runs
    assert "3 of 3 runs already finished" in again[0]
    assert not any(line.startswith(("[", "training")) for line in again)      # nothing trained again


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
    """Replaying the batch's draw (x0, x1, then the diagonal's 48 times of 64 rows): at beta = 0
    the ITM target is the exact velocity at the row's own I_t, whatever sg(v) is (two different
    v give it), so itm trains flow matching on the reference; with beta > 0 it is
    v_ref + (e^{beta r(x1)} - 1) ((x1 - x0) - sg(v)) row by row."""
    rng = np.random.default_rng(5)                                    # replay the draw
    std = math.sqrt(4 / 3) if data == "checkerboard" else math.sqrt(4 ** 2 / 2 + 0.15 ** 2)
    x0, x1 = std * rng.standard_normal((64, 2)), fm.DATASETS[data]["sample"](64, rng)
    t = rng.random(48)
    I_t = (1 - t)[:, None] * x0[:48] + t[:, None] * x1[:48]
    ref = fm.exact_velocity(I_t, t, std, data)
    v, other_v = np.random.default_rng(6).standard_normal((2, 48, 2))
    for beta in (0.0, 4.0):
        cfg = fm.make_config("itm-lsd", data, beta=beta)
        batch = fm.make_batch(np.random.default_rng(5), 64, "itm-lsd", cfg, fm.outside_velocity(cfg),
                              dtype=np.float64)
        w = np.exp(beta * fm.DATASETS[data]["reward"](x1[:48]))
        for sg_v in (v, other_v):
            np.testing.assert_allclose(fm.diagonal_target(batch, sg_v),
                                       ref + (w - 1)[:, None] * ((x1 - x0)[:48] - sg_v), rtol=1e-10,
                                       atol=1e-12)
        if beta == 0:
            np.testing.assert_allclose(fm.diagonal_target(batch, v), ref, rtol=1e-10, atol=1e-12)
        else:
            assert np.abs(fm.diagonal_target(batch, v) - fm.diagonal_target(batch, other_v)).max() > 0.1


def test_a_short_tilted_run_raises_the_mean_reward():
    """600 steps of itm-lsd (beta = 4) on the ring: at 1 and 4 steps the samples' mean reward
    moves from the untilted data's at least 85% of the way to the tilted data's, and overshoots
    that by at most 10% of the way (the data tilted with beta = 3 or 5 falls outside). Trained on
    one BLAS thread, as a comparison trains."""
    with fm.blas_threads(1):
        model = fm.train("itm-lsd", data="ring", iters=600, batch=256, hidden=64, depth=2)
    r = fm.evaluate(model, n=4000, steps=(1, 4))
    start, goal = r["untilted"]["reward"], r["target_reward"]
    assert goal - start > 0.4                                  # the tilt moves the data
    for k in (1, 4):
        assert start + 0.85 * (goal - start) < r["reward"][k] < goal + 0.1 * (goal - start), k
    text = fm.format_results(r)
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


# ---------------------------------------------------------------- the method table, record by record
# Every record of the method table pinned by what it does.
#
# REC_SPEC below restates each method as its sources describe it (the paper arXiv:2505.18825 and
# the papers of the known methods, as flowmap.py's comments above METHODS summarize them), in this
# file's own words and with every setting written out. Each test draws a batch, a loss, a target,
# a step or a sampler from the code and checks it against an independent computation from the
# SPEC: finite differences of the flow map for every derivative, a hand-written loss with its own
# row weights and Huber cap, closed-form distributions for the times, a hand-written sampler. No
# expected value is read from fm.METHODS, fm.TIMES, fm.ROW_WEIGHTS, fm.SAMPLERS, fm.ROUTES,
# fm.SCM_NORMALIZED, fm.MEANFLOW, fm.AYF or fm.DEFAULTS; METHODS and ALIASES are read for their
# sets of names, and a record's fields and config only as the values under test.

# ---------------------------------------------------------------- the SPEC
# The recipe's settings every method starts from (the DEFAULTS block's comments): the
# off-diagonal loss weighs 2, each off-diagonal residual is Huber-capped at 0.3, no row weights
# (so no c and no p), a quarter of the rows off the diagonal, the diagonal's rows at s = t (gap
# 0), the triangle times, no s = 0 anchors, no warm-up (and, with one, a factor that grows to 1),
# no tilt. The ring's recipe raises the cap to 0.75 unless a method names its own.
REC_RECIPE = dict(off_weight=2.0, off_cap=0.3, row_weight=None, diag_row_weight=None, row_c=None,
                  row_p=None, diag_fraction=0.75, diag_gap=0.0, times="triangle", s0_share=None,
                  derivative_warmup=None, derivative_cap=1.0, beta=None, lr=2e-3)
REC_RING_CAP = 0.75


def rec_spec(condition, teacher, route, *, u=None, diag="x1 - x0", target_weights="params",
             sampler="map", **settings):
    """A record: its fields, and its settings (its times among them) over the recipe's."""
    unknown = set(settings) - set(REC_RECIPE)
    assert not unknown, unknown
    return dict(condition=condition, teacher=teacher, route=route, u=u, diag=diag,
                target_weights=target_weights, sampler=sampler, settings=dict(REC_RECIPE, **settings),
                own=set(settings))


# sCM (Lu and Song 2024): its normalisation g / (|g| + c) with c = 0.1 on plain squares, and
# the derivative term warmed up over 2,000 steps (a tenth of this file's 20,000-step budget).
REC_SCM = dict(row_weight="normalized", row_c=0.1, off_cap=0.0, derivative_warmup=2000)

REC_SPEC = {
    # flow matching alone: every row on the diagonal, sampled by Euler steps of v(x, t, t)
    "fm": rec_spec(None, None, None, sampler="euler"),
    # the paper's three self-distillation conditions, the teacher being the model's own diagonal
    # (lr and off_weight of the searched methods: their winners in plots/tune; the route
    # ablations take their base's)
    "lsd": rec_spec("lagrangian", "self", "derivative", lr=4e-3),
    "esd": rec_spec("eulerian", "self", "derivative", row_weight="gap", row_c=0.1, off_cap=0.0,
                    lr=4e-3),
    "esd-value": rec_spec("eulerian", "self", "value", off_cap=0.0, lr=4e-3),
    "lsd-value": rec_spec("lagrangian", "self", "value", lr=4e-3),
    "psd-mid": rec_spec("progressive", "self", "value", u="mid", lr=4e-3),
    "psd-uni": rec_spec("progressive", "self", "value", u="uniform"),
    # distillation of the exact velocity, which the diagonal regresses on too
    "lmd": rec_spec("lagrangian", "outside", "derivative", diag="outside", off_cap=1.0),
    "emd": rec_spec("eulerian", "outside", "derivative", diag="outside", row_weight="speed",
                    row_c=0.25, off_cap=0.0),
    "ptd": rec_spec("progressive", "outside", "value", u="mid", diag="outside"),
    # implicit tilt matching on the diagonal (beta 4), self-distillation off it, off loss x10,
    # a quarter of the off rows anchored at s = 0
    "itm-lsd": rec_spec("lagrangian", "self", "derivative", diag="tilted", beta=4.0,
                        off_weight=10.0, s0_share=0.25),
    "itm-psd-mid": rec_spec("progressive", "self", "value", u="mid", diag="tilted", beta=4.0,
                            off_weight=10.0, s0_share=0.25),
    # MeanFlow: Eulerian on v with the row's own x1 - x0, the adaptive weight on all rows, plain
    # squares, one mean over the batch (off_weight n_o / n_d beside the diagonal's mean).
    # meanflow: the search's winner on its paper's knobs: the triangle times (its "uniform"),
    # p = 0 (plain squares), 75% of rows at s = t, lr 2e-3, off_weight 1/3
    "meanflow": rec_spec("eulerian", "conditional", "value", times="triangle",
                         row_weight="adaptive", diag_row_weight="adaptive", row_c=0.01, row_p=0.0,
                         diag_fraction=0.75, off_weight=1 / 3, off_cap=0.0),
    # its ImageNet code: sorted logit-normal(0.4, 1) pairs, 75% of the rows at s = t, p = 1,
    # c = 0.01; off rows 1/3 as many as the diagonal's
    "meanflow-imagenet": rec_spec("eulerian", "conditional", "value", times="logit-normal",
                                  row_weight="adaptive", diag_row_weight="adaptive", row_c=0.01,
                                  row_p=1.0, diag_fraction=0.75, off_weight=1 / 3, off_cap=0.0),
    # its CIFAR-10 code: s logit-normal(0.6, 1.6), t = max(s, logit-normal(4, 1.6)), 25% of the
    # rows at s = t, p = 0.75, c = 1e-3; off rows 3 times as many as the diagonal's
    "meanflow-cifar": rec_spec("eulerian", "conditional", "value", times="cifar",
                               row_weight="adaptive", diag_row_weight="adaptive", row_c=1e-3,
                               row_p=0.75, diag_fraction=0.25, off_weight=3.0, off_cap=0.0),
    # sCT / sCD: maps to the data, no diagonal rows, Eulerian on v, sCM's normalisation and
    # warm-up, the consistency sampler
    "sct": rec_spec("eulerian", "conditional", "value", times="to data", sampler="consistency",
                    diag_fraction=0.0, **dict(REC_SCM, row_c=1.0), lr=1e-3),
    "scd": rec_spec("eulerian", "outside", "value", times="to data", sampler="consistency",
                    diag_fraction=0.0, **REC_SCM, lr=1e-3),
    # shortcut models: midpoint on dyadic gaps, EMA target, 1 row in 8 off the diagonal, one
    # mean; its flow-matching rows are jumps of the finest level, t to t + 1/128 (half the
    # smallest bootstrap gap, 1/64)
    "shortcut": rec_spec("progressive", "self", "value", u="mid", times="dyadic",
                         target_weights="ema", diag_fraction=7 / 8, diag_gap=1 / 128,
                         off_weight=2.0, off_cap=0.0, lr=4e-3),
    # Align Your Flow, hybrids: the two distillation conditions on v, sCM's normalisation and
    # warm-up, the warm-up stopping at 0.99; a logit-normal(-0.6, 1.6) gap placed uniformly,
    # no flow-matching rows
    "ayf-emd-hybrid": rec_spec("eulerian", "outside", "value", diag="outside", times="gap",
                               diag_fraction=0.0, derivative_cap=0.99, **REC_SCM, lr=1e-3),
    "ayf-lmd-hybrid": rec_spec("lagrangian", "outside", "value", diag="outside", times="gap",
                               diag_fraction=0.0, derivative_cap=0.99, **dict(REC_SCM, row_c=1.0)),
}
REC_ALIASES = {"itm": "itm-lsd"}
REC_NAMES = sorted(REC_SPEC)
REC_OFF = [m for m in REC_NAMES if REC_SPEC[m]["condition"] is not None]

# ---------------------------------------------------------------- helpers (rec_*)
REC_SMALL = dict(hidden=8, depth=2, fourier=3, time_freqs=2)
REC_FILLED = {(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0}   # checkerboard cells


def rec_cfg(method, data="checkerboard", **overrides):
    return fm.make_config(method, data, **dict(REC_SMALL, **overrides))


def rec_params(seed, data="checkerboard"):
    """float64 weights, perturbed so that no bias is zero and nothing sits at a special point."""
    rng = np.random.default_rng(seed)
    params = fm.init_params(rng, rec_cfg("lsd", data), dtype=np.float64)
    for k in fm.trainable(params):
        params[k] = params[k] * 1.5 + 0.3 * rng.standard_normal(params[k].shape)
    return params


def rec_exact(data, base_std):
    """The data set's exact velocity b_t(x), the outside teacher."""
    return lambda x, t: fm.DATASETS[data]["velocity"](x, t, base_std)


def rec_zero_outside(x, t):
    return np.zeros_like(x)


def rec_base_std(data):
    return {"checkerboard": math.sqrt(4.0 / 3.0), "ring": math.sqrt(16.0 / 2 + 0.15 ** 2)}[data]


def rec_reward(x, data):
    """exp(-|x - c|^2 / (2 2.5^2)), c the top right cell (checkerboard) or the mode at angle 0."""
    c = np.array({"checkerboard": (2.0, 2.0), "ring": (4.0, 0.0)}[data])
    return np.exp(-((x - c) ** 2).sum(1) / (2 * 2.5 ** 2))


def rec_deriv(f, h=1e-3):
    """f'(0) by the fourth-order central difference."""
    return (-f(2 * h) + 8 * f(h) - 8 * f(-h) + f(-2 * h)) / (12 * h)


def rec_X(params, x, s, t):
    return fm.flow_map(params, x, s, t)


def rec_v(params, x, s, t):
    """v(x, s, t) read off the map: X_{s,t}(x) = x + (t - s) v."""
    return fm.flow_map_forward(params, x, s, t)[0]


def rec_teacher(spec, params, batch, outside):
    """teacher(x, t) as the SPEC names it."""
    if spec["teacher"] == "self":
        return lambda x, t: fm.velocity(params, x, t)
    if spec["teacher"] == "outside":
        return outside
    if spec["teacher"] == "conditional":
        return lambda x, t: batch["dI_off"]
    return None


def rec_q(spec, params, batch):
    """The quantity the off-diagonal rows train: v(I_s, s, t) on the value route; on the
    derivative route d/dt X (Lagrangian) or d/ds X (Eulerian), by finite differences."""
    x, s, t = batch["x_off"], batch["s"], batch["t"]
    if spec["route"] == "value":
        return rec_v(params, x, s, t)
    assert spec["route"] == "derivative"
    if spec["condition"] == "lagrangian":
        return rec_deriv(lambda h: rec_X(params, x, s, t + h))
    return rec_deriv(lambda h: rec_X(params, x, s + h, t))


def rec_target(spec, params, batch, outside, warm=1.0):
    """The off-diagonal target by the SPEC, with the weights `params` frozen."""
    x, s, u, t = batch["x_off"], batch["s"], batch["u"], batch["t"]
    teach = rec_teacher(spec, params, batch, outside)
    cond, route = spec["condition"], spec["route"]
    if cond == "progressive":        # one jump = two jumps: (X_{u,t}(X_{s,u}(I_s)) - I_s) / (t - s)
        return (rec_X(params, rec_X(params, x, s, u), u, t) - x) / (t - s)[:, None]
    X = rec_X(params, x, s, t)
    if cond == "lagrangian":
        T = teach(X, t)                                    # teacher at the jump's end
        if route == "derivative":
            return T
        dX_dt = rec_deriv(lambda h: rec_X(params, x, s, t + h))
        v = rec_v(params, x, s, t)
        full = v - (dX_dt - T)                             # v - R, R the Lagrangian residual
        return T + warm * (full - T)
    assert cond == "eulerian"
    T = teach(x, s)                                        # teacher at the start I_s
    if route == "derivative":                              # -grad_x X . T by differences in x
        return -rec_deriv(lambda h: rec_X(params, x + h * T, s, t))
    R = rec_deriv(lambda h: rec_X(params, x + h * T, s + h, t))   # d/ds X + grad_x X . T
    v = rec_v(params, x, s, t)
    return T + warm * (v + R - T)


def rec_weight(name, r, target, gap, c, p=None):
    """Row weights, written from the comment above TANGENT in flowmap.py."""
    if name is None:
        return np.ones(len(r))
    nr, nt = np.sqrt((r * r).sum(1)), np.sqrt((target * target).sum(1))
    if name == "speed":              # c / (c + |target|)
        return c / (c + nt)
    if name == "gap":                # c / (c + (t - s)|target|)
        return c / (c + gap * nt)
    if name == "adaptive":           # MeanFlow: the pull 2 w^2 r is 2 r / (|r|^2 + c)^p
        return (nr ** 2 + c) ** (-p / 2)
    if name == "normalized":         # sCM: the pull 2 w^2 r is 2 r / (|r| + c)
        return 1.0 / np.sqrt(nr + c)
    raise AssertionError(name)


def rec_rho(a, cap):
    """squares, or Huber beyond a positive cap: a^2 up to cap, 2 cap a - cap^2 beyond."""
    if not cap:
        return a * a
    return np.where(a <= cap, a * a, 2 * cap * a - cap * cap)


def rec_ks(sample, cdf):
    """The Kolmogorov-Smirnov distance of a sample to a CDF."""
    x = np.sort(np.asarray(sample, np.float64))
    n = len(x)
    f = cdf(x)
    return max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))


def rec_ks_ok(sample, cdf):
    """KS distance below 1.95 / sqrt(n) (p about 0.001 under the claimed law)."""
    d = rec_ks(sample, cdf)
    assert d < 1.95 / math.sqrt(len(sample)), d
    return d


def rec_Phi(z):
    return 0.5 * (1 + np.vectorize(math.erf)(np.asarray(z) / math.sqrt(2)))


def rec_logit(p):
    return np.log(p) - np.log1p(-p)


def rec_on_board(x1):
    """Whether every point lies in a filled cell of the checkerboard."""
    if np.abs(x1).max() > 2:
        return False
    cells = np.floor(x1 + 2).astype(int)
    return all(tuple(c) in REC_FILLED for c in cells)


def rec_batch(method, n, seed, data="checkerboard", outside=None, **overrides):
    cfg = rec_cfg(method, data, **overrides)
    batch = fm.make_batch(np.random.default_rng(seed), n, method, cfg,
                          rec_exact(data, cfg["base_std"]) if outside is None else outside,
                          dtype=np.float64)
    return cfg, batch


# ---------------------------------------------------------------- the names


def test_record_spec_names_every_method_and_alias():
    assert set(REC_SPEC) == set(fm.METHODS)
    assert set(REC_ALIASES) == set(fm.ALIASES)


@pytest.mark.parametrize("method", REC_NAMES)
def test_record_fields_and_settings_are_the_specs(method):
    """Each record's fields and its config's settings (its times among them: a setting, not a
    field of the record) are the SPEC's, on both data sets (the ring's cap unless the method
    names one); the tests below pin what each does."""
    spec = REC_SPEC[method]
    record = fm.METHODS[method]
    for field in ("condition", "teacher", "route", "u", "diag", "target_weights", "sampler"):
        assert record[field] == spec[field], field
    assert "times" not in record
    for data in ("checkerboard", "ring"):
        cfg = fm.make_config(method, data)
        want = dict(spec["settings"])
        if data == "ring" and "off_cap" not in spec["own"]:
            want["off_cap"] = REC_RING_CAP
        assert {k: cfg[k] for k in want} == want, data


@pytest.mark.parametrize("alias", sorted(REC_ALIASES))
def test_record_an_alias_is_its_method(alias):
    cfg = fm.make_config(alias)
    assert cfg == fm.make_config(REC_ALIASES[alias])
    assert cfg["method"] == REC_ALIASES[alias]


# ---------------------------------------------------------------- batches: rows, times, u, s0, tilt


@pytest.mark.parametrize("n", [100, 160])
@pytest.mark.parametrize("method", REC_NAMES)
def test_record_rows_on_and_off_the_diagonal(method, n):
    """n_d = round(n diag_fraction) diagonal rows (fm: all of them); the rest off it."""
    spec = REC_SPEC[method]
    _, batch = rec_batch(method, n, 0, outside=rec_zero_outside)
    n_d = n if spec["condition"] is None else int(round(n * spec["settings"]["diag_fraction"]))
    assert len(batch["t_diag"]) == len(batch["x_diag"]) == n_d
    assert np.array_equal(batch["gap_diag"], np.full(n_d, spec["settings"]["diag_gap"]))
    assert len(batch["s"]) == len(batch["t"]) == len(batch["u"]) == len(batch["x_off"]) == n - n_d


def rec_check_times(kind, batch, k0):
    """The times of a batch against the closed-form law of the SPEC's kind; k0 rows at the
    head of the off rows are s = 0 anchors and are left out of s's law."""
    td, s, t = batch["t_diag"], batch["s"][k0:], batch["t"][k0:]
    if len(s):
        assert np.all(s < t)
    if kind == "triangle":           # t_diag ~ U[0, 1]; (s, t) uniform on the triangle s < t
        if len(td):
            rec_ks_ok(td, lambda x: x)
            assert np.mean(td * 128 == np.round(td * 128)) < 0.01
        if len(s):
            rec_ks_ok(s, lambda x: 1 - (1 - x) ** 2)
            rec_ks_ok(t, lambda x: x ** 2)
            rec_ks_ok(t - s, lambda x: 1 - (1 - x) ** 2)   # the gap of two uniforms
    elif kind == "to data":          # t = 1; logit(s) = -log(sigma / 0.5), log sigma ~ N(-1, 1.4^2)
        assert np.all(t == 1.0)
        z = rec_logit(s)
        rec_ks_ok(z, lambda x: rec_Phi((x - (math.log(0.5) + 1.0)) / 1.4))
        assert abs(z.mean() - (1.0 + math.log(0.5))) < 5 * 1.4 / math.sqrt(len(z))
        assert abs(z.std() - 1.4) < 5 * 1.4 / math.sqrt(2 * len(z))
    elif kind == "dyadic":           # gap 2^-k, k uniform on 0..6, s on the gap's grid; diag on 1/128
        if len(td):
            j = td * 128
            assert np.all(j == np.round(j)) and j.min() >= 0 and j.max() <= 127
            counts = np.bincount(j.astype(int), minlength=128)
            assert len(counts) == 128 and counts.min() > 0
            e = len(td) / 128
            assert np.abs(counts - e).max() < 5 * math.sqrt(e)
        gap = t - s
        k = -np.log2(gap)
        assert np.all(k == np.round(k)) and k.min() == 0 and k.max() == 6
        k = k.astype(int)
        assert np.all(s / gap == np.round(s / gap)) and np.all(t <= 1) and np.all(s >= 0)
        n_o = len(s)
        for level in range(7):
            share = np.mean(k == level)
            assert abs(share - 1 / 7) < 5 * math.sqrt((1 / 7) * (6 / 7) / n_o), (level, share)
            sl = s[k == level]
            g = 0.5 ** level
            m = round(1 / g)          # s = j g, j uniform on 0..m - 1
            if m > 1:
                sd = g * math.sqrt((m * m - 1) / 12)
                assert abs(sl.mean() - g * (m - 1) / 2) < 5 * sd / math.sqrt(len(sl))
            else:
                assert np.all(sl == 0)
    elif kind == "logit-normal":     # sorted pairs of sigmoid(N(0.4, 1)); diag: the earlier time
        lo = lambda x: 1 - (1 - rec_Phi(x - 0.4)) ** 2
        hi = lambda x: rec_Phi(x - 0.4) ** 2
        if len(td):
            rec_ks_ok(rec_logit(td), lo)
        rec_ks_ok(rec_logit(s), lo)
        rec_ks_ok(rec_logit(t), hi)
        # one pair per row: logit t - logit s = |Z1 - Z2|, half-normal of scale sqrt 2
        rec_ks_ok(rec_logit(t) - rec_logit(s), lambda x: 2 * rec_Phi(x / math.sqrt(2)) - 1)
    elif kind == "cifar":            # logit s ~ N(0.6, 1.6^2) (the diagonal too); logit t the
        law_s = lambda x: rec_Phi((x - 0.6) / 1.6)   # max of it and an independent N(4, 1.6^2)
        if len(td):
            rec_ks_ok(rec_logit(td), law_s)
        rec_ks_ok(rec_logit(s), law_s)
        rec_ks_ok(rec_logit(t), lambda x: law_s(x) * rec_Phi((x - 4.0) / 1.6))
        # t = s where the second draw falls below s, P = Phi(-3.4 / (1.6 sqrt 2)); the batch
        # parts such a pair by one ulp
        p = float(rec_Phi(-3.4 / (1.6 * math.sqrt(2))))
        tie = t == np.nextafter(s, 1.0)
        assert abs(tie.mean() - p) < 5 * math.sqrt(p * (1 - p) / len(s)), (tie.mean(), p)
    elif kind == "gap":              # AYF: logit (t - s) ~ N(-0.6, 1.6^2), s uniform on [0, 1 - gap]
        if len(td):
            rec_ks_ok(td, lambda x: x)
        gap = t - s
        assert np.all(t <= 1) and np.all(s >= 0)
        rec_ks_ok(rec_logit(gap), lambda x: rec_Phi((x + 0.6) / 1.6))
        place = s / (1 - gap)        # uniform on [0, 1), whatever the gap
        small = gap < np.median(gap)
        for part in (place, place[small], place[~small]):
            rec_ks_ok(part, lambda x: x)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("method", REC_NAMES)
def test_record_times_follow_the_law_the_method_names(method):
    spec = REC_SPEC[method]
    share = spec["settings"]["s0_share"]
    n = 20000
    _, batch = rec_batch(method, n, 11, outside=rec_zero_outside)
    n_o = len(batch["s"])
    k0 = 0
    if share:                        # n_o a multiple of 20: share n_o is a whole number of rows
        assert n_o % 20 == 0
        k0 = int(share * n_o)
        assert np.all(batch["s"][:k0] == 0)
    times = spec["settings"]["times"]
    if times != "dyadic":            # continuous s: the anchors are the only rows at s = 0
        assert int(np.sum(batch["s"] == 0)) == k0
    else:                            # dyadic s is 0 with probability E[gap] = (2 - 1/64) / 7
        p = (2 - 1 / 64) / 7
        p0 = (share or 0) + (1 - (share or 0)) * p
        assert abs(np.mean(batch["s"] == 0) - p0) < 5 * math.sqrt(p0 * (1 - p0) / n_o)
    rec_check_times(times, batch, k0)


@pytest.mark.parametrize("method", ["sct", "scd"])
def test_record_to_data_diagonal_rows_when_asked_for(method):
    """With diagonal rows asked for, the to-data times still send every off row to t = 1."""
    _, batch = rec_batch(method, 4000, 12, outside=rec_zero_outside, diag_fraction=0.5)
    assert len(batch["t_diag"]) == 2000
    rec_check_times("to data", batch, 0)


@pytest.mark.parametrize("method", [m for m in REC_OFF if REC_SPEC[m]["condition"] == "progressive"])
def test_record_u_splits_the_jump_as_named(method):
    spec = REC_SPEC[method]
    _, batch = rec_batch(method, 8000, 13, outside=rec_zero_outside)
    s, u, t = batch["s"], batch["u"], batch["t"]
    if spec["u"] == "mid":
        assert np.array_equal(u, (s + t) / 2)
    else:
        assert spec["u"] == "uniform"
        rec_ks_ok((u - s) / (t - s), lambda x: x)


@pytest.mark.parametrize("method", REC_NAMES)
def test_record_the_diagonal_regresses_on_what_the_method_names(method):
    """x1 - x0: the row's own draw (x1 = I_t + (1 - t) target lands on the board's filled cells);
    outside: the exact velocity at (I_t, t); tilted: the exact reference, the row's x1 - x0 and
    its tilt e^{beta r(x1)} - 1. Off the diagonal, dI_off is the row's own x1 - x0 too."""
    spec = REC_SPEC[method]
    cfg, batch = rec_batch(method, 60, 14, diag_fraction=0.5)
    b = rec_exact("checkerboard", rec_base_std("checkerboard"))
    x, td = batch["x_diag"], batch["t_diag"]
    assert len(td) == (60 if spec["condition"] is None else 30)
    if spec["diag"] == "x1 - x0":
        assert "tilt_diag" not in batch
        assert rec_on_board(x + (1 - td)[:, None] * batch["target_diag"])
    elif spec["diag"] == "outside":
        assert "tilt_diag" not in batch
        np.testing.assert_allclose(batch["target_diag"], b(x, td), rtol=1e-12, atol=1e-12)
        assert not rec_on_board(x + (1 - td)[:, None] * batch["target_diag"])
    else:
        assert spec["diag"] == "tilted"
        assert "target_diag" not in batch
        np.testing.assert_allclose(batch["ref_diag"], b(x, td), rtol=1e-12, atol=1e-12)
        x1 = x + (1 - td)[:, None] * batch["dI_diag"]
        assert rec_on_board(x1)
        np.testing.assert_allclose(batch["tilt_diag"],
                                   np.expm1(spec["settings"]["beta"] * rec_reward(x1, "checkerboard")),
                                   rtol=1e-12)
    if len(batch["s"]):
        assert rec_on_board(batch["x_off"] + (1 - batch["s"])[:, None] * batch["dI_off"])


@pytest.mark.parametrize("method", REC_NAMES)
def test_record_reads_an_outside_velocity_only_when_named(method):
    """A method reads an outside velocity (and may take a saved model for it) exactly when its
    teacher or its diagonal is the outside velocity or its diagonal is tilted (the reference)."""
    spec = REC_SPEC[method]
    reads = spec["teacher"] == "outside" or spec["diag"] in ("outside", "tilted")
    cfg = rec_cfg(method)
    got = fm.outside_velocity(cfg)
    assert (got is not None) == reads
    if reads:
        x = np.random.default_rng(0).standard_normal((5, 2))
        t = np.linspace(0.1, 0.9, 5)
        np.testing.assert_allclose(got(x, t), rec_exact("checkerboard", cfg["base_std"])(x, t), rtol=1e-12)


# ---------------------------------------------------------------- the off-diagonal target and q


@pytest.mark.parametrize("method", REC_OFF)
def test_record_target_and_q_are_the_condition_on_its_route(method):
    """pred["q"] is v (value route) or the derivative the condition names (derivative route);
    the frozen target is the SPEC's, with the SPEC's teacher (only an outside teacher needs the
    outside velocity); on a value route the warm-up factor scales the derivative term (at 0 the
    target is the teacher's velocity alone, where the condition reads it)."""
    spec = REC_SPEC[method]
    params = rec_params(21)
    cfg, batch = rec_batch(method, 24, 22, diag_fraction=0.5)
    outside = rec_exact("checkerboard", cfg["base_std"])
    pred = fm.predict(params, batch, method)[0]
    q = rec_q(spec, params, batch)
    assert np.abs(pred["q"] - q).max() < 1e-7 * (1 + np.abs(q).max())
    passed = outside if spec["teacher"] == "outside" else None
    if spec["teacher"] == "outside":
        with pytest.raises(ValueError):
            fm.off_diagonal_target(params, batch, pred, method, None)
    warms = [1.0, 0.37, 0.0] if spec["route"] == "value" and spec["condition"] != "progressive" else [1.0]
    for warm in warms:
        want = rec_target(spec, params, batch, outside, warm)
        got = fm.off_diagonal_target(params, batch, pred, method, passed, warm)
        assert np.abs(got - want).max() < 1e-7 * (1 + np.abs(want).max()), warm


# ---------------------------------------------------------------- the loss and its gradient


def rec_loss(spec, params, batch, target_o, ref, data):
    """The SPEC's loss at `params`, every weight and the diagonal's sg(v) frozen at `ref` (the
    weights of the check). -> (loss_diag, loss_off, raw_off, total)"""
    st = spec["settings"]
    cap = st["off_cap"]
    if data == "ring" and "off_cap" not in spec["own"]:
        cap = REC_RING_CAP
    c, p = st["row_c"], st["row_p"]
    td = batch["t_diag"]
    end = td + st["diag_gap"]        # the diagonal's rows: v at (t, t + diag_gap)
    v_d = rec_v(params, batch["x_diag"], td, end)
    if spec["diag"] == "tilted":
        v_ref = rec_v(ref, batch["x_diag"], td, end)
        target_d = batch["ref_diag"] + batch["tilt_diag"][:, None] * (batch["dI_diag"] - v_ref)
    else:
        target_d = batch["target_diag"]
    r0_d = rec_v(ref, batch["x_diag"], td, end) - target_d
    w_d = rec_weight(st["diag_row_weight"], r0_d, target_d, 0.0, c, p)
    r_d = v_d - target_d
    loss_d = float(np.mean(w_d ** 2 * (r_d * r_d).sum(1))) if len(r_d) else 0.0
    if spec["condition"] is None:
        return loss_d, 0.0, 0.0, loss_d
    gap = batch["t"] - batch["s"]
    r0 = rec_q(spec, ref, batch) - target_o
    w = rec_weight(st["row_weight"], r0, target_o, gap, c, p)
    r = rec_q(spec, params, batch) - target_o
    a = w * np.sqrt((r * r).sum(1))
    loss_o = float(np.mean(rec_rho(a, cap)))
    raw = float(np.mean((r * r).sum(1)))
    return loss_d, loss_o, raw, loss_d + st["off_weight"] * loss_o


def rec_shift(params, d, eps):
    return {k: (params[k] + eps * d[k] if k in d else params[k]) for k in params}


def rec_check_loss(method, data, **overrides):
    """loss_and_grads with the method's settings (loss_settings of its config, with overrides),
    the target built inside at a warm-up factor: its three losses and its gradient along random
    directions against the SPEC's loss (weights, cap, off_weight, route, diagonal target), by
    central differences (fourth order, h = 1e-4: about 1e-8 relative error on this net)."""
    spec = REC_SPEC[method]
    spec = dict(spec, settings=dict(spec["settings"], **overrides))
    params = rec_params(31 if data == "checkerboard" else 35, data)
    cfg, batch = rec_batch(method, 24, 32, data, diag_fraction=0.5, **overrides)
    outside = rec_exact(data, cfg["base_std"])
    passed = outside if spec["teacher"] == "outside" else None
    warm = 0.37 if spec["route"] == "value" and spec["condition"] != "progressive" else 1.0
    (ld, lo, raw), grads = fm.loss_and_grads(params, batch, method, fm.loss_settings(cfg),
                                             outside=passed, warm=warm)
    target_o = rec_target(spec, params, batch, outside, warm) if spec["condition"] else None
    want = rec_loss(spec, params, batch, target_o, params, data)
    tol = 1e-7
    assert ld == pytest.approx(want[0], rel=tol, abs=1e-12)
    assert lo == pytest.approx(want[1], rel=tol, abs=1e-12)
    assert raw == pytest.approx(want[2], rel=tol, abs=1e-12)
    rng = np.random.default_rng(33)
    for _ in range(2):
        d = {k: rng.standard_normal(params[k].shape) for k in fm.trainable(params)}
        got = sum(float((grads[k] * d[k]).sum()) for k in d)
        f = lambda e: rec_loss(spec, rec_shift(params, d, e), batch, target_o, params, data)[3]
        numeric = rec_deriv(f, 1e-4)
        assert got == pytest.approx(numeric, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("data", ["checkerboard", "ring"])
@pytest.mark.parametrize("method", REC_NAMES)
def test_record_loss_and_gradient_are_the_methods(method, data):
    rec_check_loss(method, data)


@pytest.mark.parametrize("method", REC_NAMES)
def test_record_settings_behind_a_row_weight_show_when_it_is_overridden(method):
    """The record's own c serves a row weight asked for on top (none: such a weight is refused
    for want of a c); without its row weights, the record's cap and off weight still hold."""
    st = REC_SPEC[method]["settings"]
    if st["row_c"] is None:
        with pytest.raises(ValueError, match=rf"method '{method}': row_c is needed by a row weight"):
            rec_cfg(method, diag_row_weight="speed")
    else:
        rec_check_loss(method, "checkerboard", diag_row_weight="speed")
    if st["row_p"] is None:          # no p: the adaptive weight is refused, by name (no c: for c)
        why = "row_c is needed by a row weight" if st["row_c"] is None else \
            "row_p is needed by the adaptive row weight"
        for side in ("row_weight", "diag_row_weight"):
            with pytest.raises(ValueError, match=rf"method '{method}': {why}"):
                rec_cfg(method, **{side: "adaptive"})
    if st["row_weight"] or st["diag_row_weight"]:
        rec_check_loss(method, "checkerboard", row_weight=None, diag_row_weight=None)


def test_record_loss_check_sees_every_regime():
    """The loss check discriminates caps: on its batches, after the SPEC's row weights, some
    off-diagonal residuals lie beyond the caps 0.3 and 0.75 (MeanFlow's adaptive weight at p = 1
    keeps every w |r| below 1), and a capped method also has some on plain squares, within its
    cap."""
    for method in REC_OFF:
        spec = REC_SPEC[method]
        st = spec["settings"]
        seen = []
        for data in ("checkerboard", "ring"):
            params = rec_params(31 if data == "checkerboard" else 35, data)
            cfg, batch = rec_batch(method, 24, 32, data, diag_fraction=0.5)
            target = rec_target(spec, params, batch, rec_exact(data, cfg["base_std"]))
            r = rec_q(spec, params, batch) - target
            w = rec_weight(st["row_weight"], r, target, batch["t"] - batch["s"], st["row_c"],
                           st["row_p"])
            seen.append(w * np.sqrt((r * r).sum(1)))
        a = np.concatenate(seen)
        assert a.max() > 0.75 * 1.3, (method, a.max())
        if st["off_cap"]:
            assert a.min() < st["off_cap"], (method, a.min())


# ---------------------------------------------------------------- one training step


@pytest.mark.parametrize("method", REC_NAMES)
def test_record_train_step_builds_the_target_from_the_named_weights_and_warms_up(method):
    """train_step hands the loss the SPEC's target weights (params or their EMA, made to differ
    here) and the warm-up factor min(cap, it / warmup) of the step (1 without a warm-up)."""
    spec = REC_SPEC[method]
    cfg = rec_cfg(method)
    model = fm.new_model(cfg)
    rng = np.random.default_rng(41)
    for k in fm.trainable(model["ema"]):
        model["ema"][k] = model["ema"][k] + 0.1 * rng.standard_normal(model["ema"][k].shape).astype(np.float32)
    outside = rec_exact("checkerboard", cfg["base_std"])
    seen = []

    def spy(params, batch, name, settings, **kw):
        seen.append(dict(name=name, warm=kw["warm"],
                         weights={k: np.array(a) for k, a in kw["target_weights"].items()}))
        return (0.0, 0.0, 0.0), {k: np.zeros_like(params[k]) for k in fm.trainable(params)}

    iters = [0, 1, 700, 1970, 1999, 2000, 5000]
    for it in iters:
        model["iter"] = it
        want_w = {k: np.array(a) for k, a in model[spec["target_weights"]].items()}
        other = model["ema" if spec["target_weights"] == "params" else "params"]
        assert any(not np.array_equal(want_w[k], other[k]) for k in fm.trainable(other))
        batch = fm.make_batch(np.random.default_rng(it), 16, method, cfg, outside)
        fm.train_step(model, batch, 1e-3, outside, grads_of=spy)
        got = seen[-1]
        assert got["name"] == method
        assert all(np.array_equal(got["weights"][k], want_w[k]) for k in want_w)
    warmup, cap = spec["settings"]["derivative_warmup"], spec["settings"]["derivative_cap"]
    want = [min(cap, it / warmup) if warmup else 1.0 for it in iters]
    assert [s["warm"] for s in seen] == pytest.approx(want, rel=1e-12, abs=0)


# ---------------------------------------------------------------- sampling


def rec_sampler(spec, params, x0, noise, steps):
    grid = [k / steps for k in range(steps + 1)]
    x = x0
    for k in range(steps):
        a, b = grid[k], grid[k + 1]
        if spec["sampler"] == "map":
            x = rec_X(params, x, a, b)
        elif spec["sampler"] == "euler":
            x = x + (b - a) * fm.velocity(params, x, a)
        else:
            assert spec["sampler"] == "consistency"
            if k:                    # back on the interpolant at t_k with fresh noise z_k
                x = (1 - a) * noise[k - 1] + a * x
            x = rec_X(params, x, a, 1.0)
    return x


@pytest.mark.parametrize("method", REC_NAMES)
def test_record_samples_with_the_named_sampler(method):
    spec = REC_SPEC[method]
    cfg = rec_cfg(method)
    model = fm.new_model(cfg)
    model["ema"] = rec_params(51)
    n, steps, seed = 9, 3, 52
    got = fm.sample(model, n, steps, seed=seed)
    x0, noise = fm.sample_noise(n, steps, seed, cfg["base_std"], np.float64)
    want = rec_sampler(spec, model["ema"], x0, noise, steps)
    assert np.abs(got - want).max() < 1e-6 * (1 + np.abs(want).max())
    for other in {"map", "euler", "consistency"} - {spec["sampler"]}:   # the check can tell them apart
        alt = rec_sampler(dict(spec, sampler=other), model["ema"], x0, noise, steps)
        assert np.abs(alt - want).max() > 1e-2


# ---------------------------------------------------------------- the shared tables and constants
# The shared tables and constants of flowmap.py, each pinned by what it does, against an
# expected value derived here (by hand, a closed form, or a second implementation), never read
# from the table under test. Statistics use several standard errors as their tolerance.



TAB_SMALL = dict(hidden=8, depth=2, fourier=3, time_freqs=2)
TAB_FILLED = [(0, 0), (0, 2), (1, 1), (1, 3), (2, 0), (2, 2), (3, 1), (3, 3)]   # i + j even, by hand
TAB_CENTRES = 4.0 * np.array([[math.cos(2 * math.pi * k / 8), math.sin(2 * math.pi * k / 8)]
                              for k in range(8)])


# ---------------------------------------------------------------- helpers


def tab_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def tab_logit(p):
    return np.log(p / (1.0 - p))


def tab_near(value, expected, se, k=5.0):
    """|value - expected| within k standard errors."""
    return abs(value - expected) < k * se


def tab_params(seed=0, data="checkerboard"):
    """float64 weights of the small network with non-zero random biases."""
    cfg = fm.make_config("lsd", data, **TAB_SMALL)
    rng = np.random.default_rng(seed)
    params = fm.init_params(rng, cfg, dtype=np.float64)
    for k in list(params):
        if re.fullmatch(r"[Wb]\d+", k):
            params[k] = params[k] * 1.5 + 0.3 * rng.standard_normal(params[k].shape)
    return params, cfg


def tab_times(a, n):
    return np.broadcast_to(np.asarray(a, np.float64), (n,)).astype(np.float64)


def tab_v(params, x, s, t):
    """The network v(x, s, t) written out by hand: features [x / std, sin(x B), cos(x B), s, t,
    sin(s k), cos(s k), sin(t k), cos(t k)], SiLU layers, a linear read-out."""
    x = np.asarray(x, np.float64)
    n = len(x)
    s, t = tab_times(s, n)[:, None], tab_times(t, n)[:, None]
    B, k = params["fourier"].astype(np.float64), params["freqs"].astype(np.float64)
    xb = x @ B
    a = np.concatenate([x / float(params["x_scale"]), np.sin(xb), np.cos(xb), s, t,
                        np.sin(s * k), np.cos(s * k), np.sin(t * k), np.cos(t * k)], axis=1)
    depth = sum(1 for key in params if re.fullmatch(r"W\d+", key)) - 1
    for i in range(depth):
        z = a @ params[f"W{i}"] + params[f"b{i}"]
        a = z / (1.0 + np.exp(-z))
    return a @ params[f"W{depth}"] + params[f"b{depth}"]


def tab_X(params, x, s, t):
    """X_{s,t}(x) = x + (t - s) v(x, s, t)."""
    n = len(x)
    return x + (tab_times(t, n) - tab_times(s, n))[:, None] * tab_v(params, x, s, t)


def tab_kl(x_true, x_gen, bins=60, lim=2.5):
    """KL(p || q) of bins x bins histograms on [-lim, lim]^2, binned by hand: each normalized to
    sum 1, then 1e-8 added to every bin; points outside the square dropped."""
    def hist(x):
        inside = np.all((x >= -lim) & (x <= lim), axis=1)
        idx = np.minimum(np.floor((x[inside] + lim) / (2 * lim) * bins).astype(int), bins - 1)
        h = np.zeros((bins, bins))
        np.add.at(h, (idx[:, 0], idx[:, 1]), 1.0)
        return h / max(h.sum(), 1.0) + 1e-8
    p, q = hist(x_true), hist(x_gen)
    return float(np.sum(p * np.log(p / q)))


def tab_directions(n_proj=128, seed=0):
    d = np.random.default_rng(seed).standard_normal((n_proj, 2))
    return d / np.sqrt((d * d).sum(axis=1, keepdims=True))


def tab_sw(a, b, n_proj=128, seed=0):
    """Sliced Wasserstein, one direction at a time."""
    n = min(len(a), len(b))
    theta = tab_directions(n_proj, seed)
    pa = np.sort(np.einsum("nd,pd->pn", a[:n], theta), axis=1)     # (P, n) each row sorted
    pb = np.sort(np.einsum("nd,pd->pn", b[:n], theta), axis=1)
    return math.sqrt(float(np.sum((pa - pb) ** 2)) / (n * n_proj))


def tab_mode_balance(x, centres, off):
    d = np.sqrt(((x[:, None, :] - centres[None]) ** 2).sum(axis=2))
    share = np.array([np.mean(d.argmin(axis=1) == k) for k in range(len(centres))])
    return max(abs(share - 1.0 / len(centres))), float(np.mean(d.min(axis=1) > off))


def tab_add_method(monkeypatch, name, *args, **kwargs):
    monkeypatch.setitem(fm.METHODS, name, fm.method_record(*args, **kwargs))


def tab_batch(rng, n, s, t, u=None):
    """Off-diagonal rows at given times, and two diagonal rows."""
    return {"x_diag": 1.5 * rng.standard_normal((2, 2)), "t_diag": np.array([0.2, 0.7]),
            "gap_diag": np.zeros(2),
            "x_off": 1.5 * rng.standard_normal((n, 2)), "s": s, "t": t,
            "u": (s + t) / 2 if u is None else u, "dI_off": rng.standard_normal((n, 2))}


# ---------------------------------------------------------------- time samplers (TIMES)


def test_table_logit_normal():
    """sigmoid(mean + std z) with z the generator's standard normals."""
    z = np.random.default_rng(3).standard_normal(1000)
    np.testing.assert_allclose(fm.logit_normal(np.random.default_rng(3), 1000, 0.7, 1.3),
                               tab_sigmoid(0.7 + 1.3 * z), rtol=1e-14)


def test_table_times_triangle():
    """The diagonal t ~ U[0, 1]; (s, t) uniform on s < t: E s = 1/3, E t = 2/3, E (t - s) = 1/3,
    P(s < 1/2) = 3/4, P(t < 1/2) = 1/4."""
    n = 60_000
    t_diag, s, t = fm.TIMES["triangle"](np.random.default_rng(1), n, n)
    assert len(t_diag) == len(s) == len(t) == n and np.all((0 <= s) & (s < t) & (t < 1))
    se = 1 / math.sqrt(12 * n)
    assert tab_near(t_diag.mean(), 0.5, se) and tab_near(t_diag.var(), 1 / 12, 0.075 / math.sqrt(n))
    assert tab_near(np.mean(t_diag < 0.25), 0.25, math.sqrt(0.1875 / n))
    se = math.sqrt(1 / 18 / n)                    # each of s, t, t - s has variance 1/18
    assert tab_near(s.mean(), 1 / 3, se) and tab_near(t.mean(), 2 / 3, se)
    assert tab_near((t - s).mean(), 1 / 3, se)
    bern = math.sqrt(0.1875 / n)
    assert tab_near(np.mean(s < 0.5), 0.75, bern) and tab_near(np.mean(t < 0.5), 0.25, bern)
    rng = np.random.default_rng(1)                # the draw, digit for digit: t, then sorted pairs
    assert np.array_equal(t_diag, rng.random(n))
    pairs = rng.random((n, 2))
    assert np.array_equal(s, pairs.min(1)) and np.array_equal(t, pairs.max(1))


def test_table_times_to_data():
    """Consistency models: t = 1 off the diagonal, logit(s) ~ N(log 0.5 + 1, 1.4^2); the diagonal
    uniform."""
    n_d, n_o = 20_000, 100_000
    t_diag, s, t = fm.TIMES["to data"](np.random.default_rng(2), n_d, n_o)
    assert len(t_diag) == n_d and len(s) == n_o and np.all(t == 1.0) and np.all((0 < s) & (s < 1))
    z = tab_logit(s)
    mean = 1.0 + math.log(0.5)                    # 0.3069
    assert tab_near(z.mean(), mean, 1.4 / math.sqrt(n_o))
    assert tab_near(z.std(), 1.4, 1.4 / math.sqrt(2 * n_o))
    assert tab_near(np.mean(z < mean), 0.5, 0.5 / math.sqrt(n_o))     # symmetric about its mean
    assert tab_near(t_diag.mean(), 0.5, 1 / math.sqrt(12 * n_d))
    assert tab_near(t_diag.var(), 1 / 12, 0.075 / math.sqrt(n_d))
    rng = np.random.default_rng(2)                # the draw, digit for digit
    assert np.array_equal(t_diag, rng.random(n_d))
    np.testing.assert_allclose(s, tab_sigmoid(mean + 1.4 * rng.standard_normal(n_o)), rtol=1e-14)


def test_table_times_dyadic():
    """Shortcut: gaps 2^-k, k uniform in 0..6, s a multiple of its gap spread over its grid,
    t = s + gap <= 1; the diagonal uniform on the grid j / 128, j = 0..127."""
    n_d, n_o = 20_000, 70_000
    t_diag, s, t = fm.TIMES["dyadic"](np.random.default_rng(4), n_d, n_o)
    gap = t - s
    k = -np.log2(gap)
    assert np.array_equal(k, np.round(k)) and np.all(t <= 1.0) and np.all(s >= 0)
    k = k.astype(int)
    for level in range(7):
        share = np.mean(k == level)
        assert tab_near(share, 1 / 7, math.sqrt(6 / 49 / n_o)), (level, share)
        j = s[k == level] * 2 ** level            # the start's place on its grid
        assert np.array_equal(j, np.round(j))
        assert set(j.astype(int)) == set(range(2 ** level)), level
        sd = math.sqrt((4 ** level - 1) / 12)
        assert tab_near(j.mean(), (2 ** level - 1) / 2, sd / math.sqrt(len(j)) + 1e-12), level
    assert set(k) == set(range(7))
    j = t_diag * 128
    assert np.array_equal(j, np.round(j)) and set(j.astype(int)) == set(range(128))
    assert tab_near(j.mean(), 63.5, math.sqrt((128 ** 2 - 1) / 12 / n_d))
    rng = np.random.default_rng(4)                # the draw, digit for digit: k, then s, then the diagonal
    assert np.array_equal(k, rng.integers(0, 7, n_o))
    assert np.array_equal(s, np.floor(rng.random(n_o) * 2.0 ** k) / 2.0 ** k)
    assert np.array_equal(t_diag, rng.integers(0, 128, n_d) / 128)


def test_table_times_logit_normal():
    """MeanFlow: sorted pairs of sigmoid(N(0.4, 1)); a diagonal row keeps the earlier time, the
    minimum of two N(0.4, 1): mean 0.4 - 1/sqrt(pi), variance 1 - 1/pi."""
    n_d, n_o = 60_000, 20_000
    t_diag, s, t = fm.TIMES["logit-normal"](np.random.default_rng(5), n_d, n_o)
    assert len(t_diag) == n_d and len(s) == len(t) == n_o and np.all(s <= t)
    both = tab_logit(np.concatenate([s, t]))
    assert tab_near(both.mean(), 0.4, 1 / math.sqrt(2 * n_o))
    assert tab_near(both.std(), 1.0, 1 / math.sqrt(4 * n_o))
    lo_mean, lo_sd = 0.4 - 1 / math.sqrt(math.pi), math.sqrt(1 - 1 / math.pi)
    zd = tab_logit(t_diag)
    assert tab_near(zd.mean(), lo_mean, lo_sd / math.sqrt(n_d))
    assert tab_near(zd.std(), lo_sd, lo_sd / math.sqrt(n_d))
    assert tab_near(tab_logit(t).mean(), 0.4 + 1 / math.sqrt(math.pi), lo_sd / math.sqrt(n_o))
    # the draw itself: 2 (n_d + n_o) normals, paired in order, sorted, diagonal rows first
    z = np.random.default_rng(5).standard_normal(2 * (n_d + n_o)).reshape(-1, 2)
    pairs = np.sort(tab_sigmoid(0.4 + z), axis=1)
    np.testing.assert_allclose(t_diag, pairs[:n_d, 0], rtol=1e-14)
    np.testing.assert_allclose(s, pairs[n_d:, 0], rtol=1e-14)
    np.testing.assert_allclose(t, pairs[n_d:, 1], rtol=1e-14)


def tab_Phi(x):
    """The standard normal CDF, from math.erfc."""
    return 0.5 * np.vectorize(math.erfc)(-np.asarray(x, np.float64) / math.sqrt(2))


def test_table_times_cifar():
    """MeanFlow's CIFAR-10 code in this file's time (data at 1): s = sigmoid(N(0.6, 1.6^2)) (its
    t ~ logit-normal(-0.6, 1.6), data at 0), t = max(s, sigmoid(N(4, 1.6^2))) (its r ~
    logit-normal(-4, 1.6), r = min(t, r)); a diagonal row keeps s. t = s exactly where the second
    draw falls below the first: P = Phi(-3.4 / (1.6 sqrt 2)) = 0.067. E logit t is the mean of
    the larger of N(0.6, 1.6^2) and N(4, 1.6^2): mu_X Phi(a) + mu_Y Phi(-a) + theta phi(a),
    theta = 1.6 sqrt 2, a = (mu_X - mu_Y) / theta. The draw: n_d + n_o normals for s (the
    diagonal's first), then as many for the second time."""
    n_d, n_o = 20_000, 60_000
    t_diag, s, t = fm.TIMES["cifar"](np.random.default_rng(6), n_d, n_o)
    assert len(t_diag) == n_d and len(s) == len(t) == n_o
    assert np.all((0 < s) & (s <= t) & (t < 1))
    law_s = lambda x: tab_Phi((x - 0.6) / 1.6)
    rec_ks_ok(tab_logit(t_diag), law_s)
    rec_ks_ok(tab_logit(s), law_s)
    rec_ks_ok(tab_logit(t), lambda x: law_s(x) * tab_Phi((x - 4.0) / 1.6))
    z = tab_logit(s)
    assert tab_near(z.mean(), 0.6, 1.6 / math.sqrt(n_o)) and tab_near(z.std(), 1.6, 1.6 / math.sqrt(2 * n_o))
    theta = 1.6 * math.sqrt(2)
    a = (0.6 - 4.0) / theta
    mean_t = 0.6 * tab_Phi(a) + 4.0 * tab_Phi(-a) + theta * math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    assert tab_near(tab_logit(t).mean(), mean_t, 1.6 / math.sqrt(n_o))
    p = float(tab_Phi(-3.4 / theta))
    assert 0.066 < p < 0.067
    assert tab_near(np.mean(t == s), p, math.sqrt(p * (1 - p) / n_o))
    rng = np.random.default_rng(6)                # the draw, digit for digit
    first = tab_sigmoid(0.6 + 1.6 * rng.standard_normal(n_d + n_o))
    second = tab_sigmoid(4.0 + 1.6 * rng.standard_normal(n_d + n_o))
    np.testing.assert_allclose(t_diag, first[:n_d], rtol=1e-14)
    np.testing.assert_allclose(s, first[n_d:], rtol=1e-14)
    np.testing.assert_allclose(t, np.maximum(first, second)[n_d:], rtol=1e-14)
    assert np.array_equal(t == s, second[n_d:] <= first[n_d:])


def test_table_cifar_ties_are_parted_by_one_ulp_in_the_batch():
    """meanflow-cifar's batch, in float32 as it trains: a quarter of the rows on the diagonal at
    s = t (gap 0), and every off row s < t: the rows whose two times tie (about 6.7%, as above)
    are parted by one float32 step, so they are MeanFlow's r = t rows with a gap of one ulp."""
    cfg = fm.make_config("meanflow-cifar", **TAB_SMALL)
    batch = fm.make_batch(np.random.default_rng(7), 20_000, "meanflow-cifar", cfg)
    s, t = batch["s"], batch["t"]
    assert len(batch["t_diag"]) == 5000 and len(s) == 15_000 and s.dtype == np.float32
    assert np.array_equal(batch["gap_diag"], np.zeros(5000, np.float32))
    assert np.all(s < t)
    one_ulp = t == np.nextafter(s, np.float32(1))
    p = float(tab_Phi(-3.4 / (1.6 * math.sqrt(2))))
    assert tab_near(one_ulp.mean(), p, math.sqrt(p * (1 - p) / len(s)))


def test_table_times_gap():
    """Align Your Flow, as one third-party code reads it: the gap t - s = sigmoid(N(-0.6, 1.6^2)),
    s uniform on [0, 1 - gap] whatever the gap, so t = s + gap <= 1; diagonal rows (AYF's records
    have none) uniform. The draw: the gaps' normals, the places' uniforms, then the diagonal."""
    n_d, n_o = 20_000, 60_000
    t_diag, s, t = fm.TIMES["gap"](np.random.default_rng(8), n_d, n_o)
    assert len(t_diag) == n_d and len(s) == len(t) == n_o
    assert np.all((0 <= s) & (s < t) & (t <= 1))
    gap = t - s
    z = tab_logit(gap)
    rec_ks_ok(z, lambda x: tab_Phi((x + 0.6) / 1.6))
    assert tab_near(z.mean(), -0.6, 1.6 / math.sqrt(n_o)) and tab_near(z.std(), 1.6, 1.6 / math.sqrt(2 * n_o))
    place = s / (1 - gap)                         # uniform on [0, 1), independent of the gap
    small = gap < np.median(gap)
    for part in (place, place[small], place[~small]):
        rec_ks_ok(part, lambda x: x)
    assert tab_near(np.corrcoef(place, gap)[0, 1], 0.0, 1 / math.sqrt(n_o))
    rec_ks_ok(t_diag, lambda x: x)
    rng = np.random.default_rng(8)                # the draw, digit for digit
    g = tab_sigmoid(-0.6 + 1.6 * rng.standard_normal(n_o))
    u = rng.random(n_o)
    np.testing.assert_allclose(s, (1 - g) * u, rtol=1e-14)
    np.testing.assert_allclose(t, (1 - g) * u + g, rtol=1e-14)
    assert np.array_equal(t_diag, rng.random(n_d))


def test_table_times_is_a_setting_with_the_triangle_by_default(monkeypatch):
    """times is a setting, not a field of the record: a record that names none draws the
    triangle (DEFAULTS'), any method's times can be overridden like any setting, and make_batch
    draws by the config's times (replayed by hand after x0 and x1); an unknown name is refused."""
    tab_add_method(monkeypatch, "tab-plain", "lagrangian", "self")
    assert "times" not in fm.METHODS["tab-plain"]
    assert fm.make_config("tab-plain", **TAB_SMALL)["times"] == "triangle"
    n, n_d = 40, 20
    for method, times in [("tab-plain", None), ("tab-plain", "gap"), ("lsd", "cifar"),
                          ("meanflow-cifar", "triangle"), ("esd", "logit-normal")]:
        kw = {} if times is None else dict(times=times)
        cfg = fm.make_config(method, diag_fraction=0.5, **kw, **TAB_SMALL)
        batch = fm.make_batch(np.random.default_rng(9), n, method, cfg, dtype=np.float64)
        rng = np.random.default_rng(9)
        fm.sample_base(n, rng, cfg["base_std"]), fm.sample_checkerboard(n, rng)   # x0, x1 first
        if times in (None, "triangle"):
            td = rng.random(n_d)
            pairs = np.sort(rng.random((n - n_d, 2)), axis=1)
            s, t = pairs[:, 0], pairs[:, 1]
        elif times == "gap":
            g = tab_sigmoid(-0.6 + 1.6 * rng.standard_normal(n - n_d))
            s = (1 - g) * rng.random(n - n_d)
            t, td = s + g, rng.random(n_d)
        elif times == "cifar":
            first = tab_sigmoid(0.6 + 1.6 * rng.standard_normal(n))
            second = tab_sigmoid(4.0 + 1.6 * rng.standard_normal(n))
            td, s, t = first[:n_d], first[n_d:], np.maximum(first, second)[n_d:]
            t = np.where(t == s, np.nextafter(s, 1.0), t)
        else:
            pairs = np.sort(tab_sigmoid(0.4 + rng.standard_normal(2 * n)).reshape(-1, 2), axis=1)
            td, s, t = pairs[:n_d, 0], pairs[n_d:, 0], pairs[n_d:, 1]
        for key, want in [("t_diag", td), ("s", s), ("t", t)]:
            np.testing.assert_allclose(batch[key], want, rtol=1e-14, err_msg=f"{method} {times} {key}")
    with pytest.raises(ValueError, match=r"method 'lsd': times 'uniform' is not one of 'triangle'"):
        fm.make_config("lsd", times="uniform")


# ---------------------------------------------------------------- conditions, routes, teachers, targets


TAB_PAIRS = {("lagrangian", "derivative"), ("lagrangian", "value"), ("eulerian", "derivative"),
             ("eulerian", "value"), ("progressive", "value")}


def test_table_routes_targets_and_where_the_conditional_teacher_fits(monkeypatch):
    """The (condition, route) pairs that exist, each condition's own route, and the conditional
    teacher taken by the Eulerian condition alone (the one that reads its teacher at I_s)."""
    assert set(fm.TARGETS) == TAB_PAIRS
    own = {"lagrangian": "derivative", "eulerian": "derivative", "progressive": "value"}
    for condition, route in own.items():
        assert fm.method_record(condition, "self", u="mid")["route"] == route
    for condition, route in TAB_PAIRS:
        u = "mid" if condition == "progressive" else None
        tab_add_method(monkeypatch, "tab-ok", condition, "self", u=u, route=route)
        assert fm.make_config("tab-ok", **TAB_SMALL)["method"] == "tab-ok"
    for route in ("derivative", "value"):
        tab_add_method(monkeypatch, "tab-ok", "eulerian", "conditional", route=route)
        assert fm.make_config("tab-ok")["method"] == "tab-ok"
    for condition, route in [("lagrangian", "derivative"), ("lagrangian", "value"),
                             ("progressive", "value")]:
        tab_add_method(monkeypatch, "tab-bad", condition, "conditional", route=route,
                       u="mid" if condition == "progressive" else None)
        with pytest.raises(ValueError, match=r"'tab-bad'.*\bteacher\b"):
            fm.make_config("tab-bad")


TAB_BAD = [   # (condition, teacher, record fields, the field named)
    (("progressive", "self"), dict(u="mid", route="derivative"), "route"),
    (("lagrangian", "conditional"), {}, "teacher"),
    (("lagrangian", "oracle"), {}, "teacher"),
    (("lagrangian", "outside"), dict(diag="tilted", beta=1.0), "teacher"),
    (("hamiltonian", "self"), dict(route="value"), "condition"),
    (("lagrangian", "self"), dict(u="mid"), "u"),
    (("progressive", "self"), {}, "u"),
    (("lagrangian", "self"), dict(times="uniform"), "times"),
    (("lagrangian", "self"), dict(sampler="heun"), "sampler"),
    (("lagrangian", "self"), dict(target_weights="swa"), "target_weights"),
    (("lagrangian", "self"), dict(diag="exact"), "diag"),
    (("eulerian", "self"), dict(row_weight="huber", row_c=0.1), "row_weight"),
    (("eulerian", "self"), dict(diag_row_weight="huber", row_c=0.1), "diag_row_weight"),
    (("eulerian", "self"), dict(row_weight="gap"), "row_c"),
    (("eulerian", "self"), dict(row_weight="adaptive", row_c=0.1), "row_p"),
    (("eulerian", "self"), dict(diag_row_weight="adaptive", row_c=0.1), "row_p"),
    (("eulerian", "self"), dict(row_weight="adaptive", row_c=0.1, row_p=-0.5), "row_p"),
    (("lagrangian", "self"), dict(diag_gap=-1 / 128), "diag_gap"),
    (("lagrangian", "self"), dict(times="dyadic", diag_gap=1 / 128), "diag_gap"),
    (("eulerian", "self"), dict(times="dyadic", diag_gap=1 / 128), "diag_gap"),
    (("eulerian", "self"), dict(route="value", derivative_warmup=100, derivative_cap=1.5),
     "derivative_cap"),
    (("eulerian", "self"), dict(route="value", derivative_warmup=100, derivative_cap=-0.1),
     "derivative_cap"),
    (("lagrangian", "self"), dict(diag="tilted"), "beta"),
    (("lagrangian", "self"), dict(beta=1.0), "beta"),
    (("eulerian", "self"), dict(derivative_warmup=100), "derivative_warmup"),
    (("progressive", "self"), dict(u="mid", derivative_warmup=100), "derivative_warmup"),
    (("lagrangian", "self"), dict(hiden=64), "defaults"),
]


@pytest.mark.parametrize("args, fields, field", TAB_BAD, ids=[f"{a[0]}-{f}" for a, _, f in TAB_BAD])
def test_table_invalid_records_are_refused_naming_method_and_field(monkeypatch, args, fields, field):
    """A record the code cannot train is refused by make_config and train with a ValueError that
    names the record and the field; a record that goes bad under a model is refused by train."""
    tab_add_method(monkeypatch, "tab-bad", *args, **fields)
    named = re.compile(rf"'tab-bad'.*\b{field}\b|\b{field}\b.*'tab-bad'", re.S)
    for enter in (lambda: fm.make_config("tab-bad", **TAB_SMALL),
                  lambda: fm.train("tab-bad", iters=1, batch=8, **TAB_SMALL)):
        with pytest.raises(ValueError) as e:
            enter()
        assert named.search(str(e.value)), str(e.value)
    if not set(fields) & set(fm.DEFAULTS):       # the record's own fields: refused under a model
        model = fm.new_model(fm.make_config("lsd", iters=1, batch=8, **TAB_SMALL))
        model["config"]["method"] = "tab-bad"
        with pytest.raises(ValueError) as e:
            fm.train(model=model)
        assert named.search(str(e.value)) and model["iter"] == 0, str(e.value)


def test_table_targets_do_what_their_conditions_say():
    """Each (condition, route) target against finite differences of the hand-written map, with a
    teacher of our own that notes where it is read: the Lagrangian at (X_{s,t}(I_s), t), the
    Eulerian at (I_s, s), the progressive never; the derivative term scaled by warm."""
    params, _ = tab_params(seed=3)
    rng = np.random.default_rng(6)
    n = 7
    s = rng.uniform(0.0, 0.6, n)
    t = s + rng.uniform(0.05, 0.4, n)
    batch = tab_batch(rng, n, s, t, u=s + (t - s) * rng.uniform(0.2, 0.8, n))
    x, u = batch["x_off"], batch["u"]
    calls = []

    def teacher(y, time):
        calls.append((y.copy(), np.array(time, float).copy()))
        return np.stack([np.sin(y[:, 1]) + time, np.cos(y[:, 0]) * (1 + time)], axis=1)

    h = 1e-5
    X = tab_X(params, x, s, t)
    v = tab_v(params, x, s, t)
    b_s = teacher(x, s)
    dv_dt = (tab_v(params, x, s, t + h) - tab_v(params, x, s, t - h)) / (2 * h)
    Dv = (tab_v(params, x + h * b_s, s + h, t) - tab_v(params, x - h * b_s, s - h, t)) / (2 * h)
    jvp = (tab_X(params, x + h * b_s, s, t) - tab_X(params, x - h * b_s, s, t)) / (2 * h)
    two = tab_X(params, tab_X(params, x, s, u), u, t)
    gap = (t - s)[:, None]
    for warm in (1.0, 0.5):
        expected = {
            ("lagrangian", "derivative"): (teacher(X, t), "X"),
            ("eulerian", "derivative"): (-jvp, "I_s"),
            ("lagrangian", "value"): (teacher(X, t) - warm * gap * dv_dt, "X"),
            ("eulerian", "value"): (b_s + warm * gap * Dv, "I_s"),
            ("progressive", "value"): ((two - x) / gap, None)}
        assert set(expected) == set(fm.TARGETS)
        for key, (want, where) in expected.items():
            calls.clear()
            got = fm.TARGETS[key](params, batch, X.copy(), teacher, warm) if warm != 1.0 else \
                fm.TARGETS[key](params, batch, X.copy(), teacher)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=str((key, warm)))
            if where is None:
                assert calls == [], key
            else:
                y, time = calls[0]
                np.testing.assert_allclose(y, X if where == "X" else x, rtol=1e-12, err_msg=str(key))
                np.testing.assert_allclose(time, t if where == "X" else s, rtol=1e-12, err_msg=str(key))


def test_table_tangent_is_the_derivative_the_condition_names(monkeypatch):
    """On the derivative route the trained quantity q is d/dt X for the Lagrangian condition and
    d/ds X for the Eulerian one; on the value route q is v itself."""
    params, _ = tab_params(seed=4)
    rng = np.random.default_rng(7)
    s = np.array([0.1, 0.3, 0.5, 0.05])
    t = np.array([0.4, 0.9, 0.6, 0.95])
    batch = tab_batch(rng, 4, s, t)
    x, h = batch["x_off"], 1e-5
    d_dt = (tab_X(params, x, s, t + h) - tab_X(params, x, s, t - h)) / (2 * h)
    d_ds = (tab_X(params, x, s + h, t) - tab_X(params, x, s - h, t)) / (2 * h)
    for name, condition, route, want, tangent in [
            ("tab-l", "lagrangian", "derivative", d_dt, True),
            ("tab-e", "eulerian", "derivative", d_ds, True),
            ("tab-lv", "lagrangian", "value", tab_v(params, x, s, t), False)]:
        tab_add_method(monkeypatch, name, condition, "self", route=route)
        pred = fm.predict(params, batch, name)[0]
        assert pred["q_is_tangent"] is tangent
        np.testing.assert_allclose(pred["q"], want, rtol=1e-6, atol=1e-8, err_msg=name)
        np.testing.assert_allclose(pred["X_off"], tab_X(params, x, s, t), rtol=1e-12)
        np.testing.assert_allclose(pred["v_diag"], tab_v(params, batch["x_diag"], batch["t_diag"],
                                                         batch["t_diag"]), rtol=1e-12)


def test_table_teachers():
    """self: the model's own diagonal v(x, t, t) at the weights given; outside: the outside
    velocity; conditional: the row's own x1 - x0, wherever it is asked."""
    assert set(fm.TEACHERS) == {"self", "outside", "conditional"}
    params, _ = tab_params(seed=5)
    rng = np.random.default_rng(8)
    batch = tab_batch(rng, 5, np.full(5, 0.2), np.full(5, 0.6))
    x, t = rng.standard_normal((5, 2)), rng.random(5)
    outside = lambda y, time: 3.0 * y + time[:, None]
    np.testing.assert_allclose(fm.TEACHERS["self"](params, batch, outside)(x, t),
                               tab_v(params, x, t, t), rtol=1e-12)
    np.testing.assert_allclose(fm.TEACHERS["outside"](params, batch, outside)(x, t), 3.0 * x + t[:, None])
    np.testing.assert_array_equal(fm.TEACHERS["conditional"](params, batch, outside)(x, t), batch["dI_off"])


# ---------------------------------------------------------------- the loss: row weights, Huber, settings


def test_table_row_weights():
    """Each weight by hand, and the pulls two of them stand for (MeanFlow's r / (|r|^2 + c)^p at
    p = 1, sCM's r / (|r| + c)), through row_loss's gradient; only the adaptive weight reads p."""
    rng = np.random.default_rng(9)
    r, target = rng.standard_normal((9, 2)), 2 * rng.standard_normal((9, 2))
    gap, c = rng.random(9), 0.3
    norm = lambda a: np.sqrt(a[:, 0] ** 2 + a[:, 1] ** 2)
    hand = {"speed": c / (c + norm(target)),
            "gap": c / (c + gap * norm(target)),
            "adaptive": 1 / np.sqrt(norm(r) ** 2 + c),
            "normalized": 1 / np.sqrt(norm(r) + c)}
    assert set(fm.ROW_WEIGHTS) == set(hand)
    for name, w in hand.items():
        p = 1.0 if name == "adaptive" else None
        np.testing.assert_allclose(np.ravel(fm.ROW_WEIGHTS[name](r, target, gap, c, p)), w,
                                   rtol=1e-13, err_msg=name)
        loss, grad = fm.row_loss(r, target, gap, name, (c, p), 0.0, 2.0)
        assert loss == pytest.approx(np.sum(w ** 2 * norm(r) ** 2), rel=1e-13), name
        if name != "adaptive":       # p is not theirs: any p gives the same weight
            np.testing.assert_array_equal(fm.ROW_WEIGHTS[name](r, target, gap, c, 0.75),
                                          fm.ROW_WEIGHTS[name](r, target, gap, c, None))
    pull = lambda name, p=None: fm.row_loss(r, target, gap, name, (c, p), 0.0, 2.0)[1]
    np.testing.assert_allclose(pull("adaptive", 1.0), 2 * r / (norm(r) ** 2 + c)[:, None], rtol=1e-13)
    np.testing.assert_allclose(pull("normalized"), 2 * r / (norm(r) + c)[:, None], rtol=1e-13)


@pytest.mark.parametrize("p", [0.0, 0.5, 0.75, 1.0])
def test_table_the_adaptive_weight_is_meanflows_for_any_power(p):
    """MeanFlow's adaptive loss of a row, sg(1 / (|r|^2 + c)^p) |r|^2, written as |w r|^2 with
    w = (|r|^2 + c)^(-p/2): the weight, row_loss's sum, and its gradient (scale / 2 times the
    sum's gradient with the weight frozen: scale r / (|r|^2 + c)^p), against the same by hand
    and by central differences of the frozen-weight loss; p = 0 is plain squares. For p > 0 the
    gradient is measurably not that of the loss with its weight moving."""
    rng = np.random.default_rng(90)
    r = rng.standard_normal((7, 2)) * np.array([0.03, 0.1, 0.3, 1.0, 3.0, 0.5, 2.0])[:, None]
    target, gap, c, scale = rng.standard_normal((7, 2)), rng.random(7), 0.05, 0.8
    sq = r[:, 0] ** 2 + r[:, 1] ** 2
    frozen = (sq + c) ** -p                           # MeanFlow's sg(1 / (|r|^2 + c)^p)
    w = fm.ROW_WEIGHTS["adaptive"](r, target, gap, c, p)
    np.testing.assert_allclose(w, (sq + c) ** (-p / 2), rtol=1e-14)
    loss, grad = fm.row_loss(r, target, gap, "adaptive", (c, p), 0.0, scale)
    assert loss == pytest.approx(np.sum(frozen * sq), rel=1e-13)
    np.testing.assert_allclose(grad, scale * frozen[:, None] * r, rtol=1e-13)
    held = lambda q: np.sum(frozen * (q ** 2).sum(1))              # the weight held fixed
    moving = lambda q: np.sum((q ** 2).sum(1) / ((q ** 2).sum(1) + c) ** p)
    numeric = {f: np.zeros_like(r) for f in (held, moving)}
    for i in np.ndindex(r.shape):                     # held is quadratic: exact for any step
        e = np.zeros_like(r)
        e[i] = 1e-4
        for f in numeric:
            numeric[f][i] = (f(r + e) - f(r - e)) / 2e-4
    np.testing.assert_allclose(grad, scale / 2 * numeric[held], rtol=1e-7)
    if p:
        assert rel_error(grad, scale / 2 * numeric[moving]) > 1e-2
    else:                                             # p = 0: no weight at all
        plain = fm.row_loss(r, target, gap, None, (None, None), 0.0, scale)
        assert loss == pytest.approx(plain[0], rel=1e-15) and np.allclose(grad, plain[1], rtol=1e-15)


def test_table_row_loss_huber_cap_and_gradient():
    """rho(n) = n^2 up to the cap c, 2 c n - c^2 beyond; the gradient returned with scale s is
    s w^2 r min(1, c / (w |r|)), that is (s / 2) d(sum rho(w |r|))/dr with w frozen."""
    rng = np.random.default_rng(10)
    dirs = rng.standard_normal((8, 2))
    dirs /= np.sqrt((dirs ** 2).sum(1, keepdims=True))
    norms = np.array([0.05, 0.2, 0.29, 0.31, 0.5, 1.0, 3.0, 10.0])
    r, target, gap, cap = dirs * norms[:, None], rng.standard_normal((8, 2)), rng.random(8), 0.3
    rho = lambda n: np.where(n <= cap, n ** 2, 2 * cap * n - cap ** 2)
    for weight, w in [(None, np.ones(8)), ("speed", 0.5 / (0.5 + np.sqrt((target ** 2).sum(1))))]:
        loss, grad = fm.row_loss(r, target, gap, weight, (0.5, None), cap, 3.0)
        wn = w * norms
        assert loss == pytest.approx(rho(wn).sum(), rel=1e-13)
        np.testing.assert_allclose(grad, 3.0 * (w ** 2 * np.minimum(1, cap / wn))[:, None] * r,
                                   rtol=1e-13)
        eps, numeric = 1e-7, np.zeros_like(r)   # the same by central differences, w held fixed
        for i in np.ndindex(r.shape):
            dr = np.zeros_like(r)
            dr[i] = eps
            f = lambda rr: rho(w * np.sqrt((rr ** 2).sum(1))).sum()
            numeric[i] = (f(r + dr) - f(r - dr)) / (2 * eps)
        np.testing.assert_allclose(grad, 1.5 * numeric, rtol=1e-6)
    loss, grad = fm.row_loss(r, target, gap, None, (None, None), 0.0, 2.0)  # no cap: squares
    assert loss == pytest.approx(np.sum(norms ** 2), rel=1e-13)
    np.testing.assert_allclose(grad, 2.0 * r, rtol=1e-13)


@pytest.mark.parametrize("data, cap", [("checkerboard", 0.3), ("ring", 0.75)])
def test_table_default_loss_settings(data, cap):
    """The recipe's loss: the off-diagonal loss is the mean Huber loss at the cap (0.3; the
    ring's recipe 0.75) of the raw residuals, unweighted, and weighs 2 in the gradient beside the
    unweighted diagonal mean squares."""
    cfg = fm.make_config("lsd", data, **TAB_SMALL)
    settings = fm.loss_settings(cfg)
    assert set(settings) == {"off_weight", "off_cap", "row_weight", "diag_row_weight", "row_c", "row_p"}
    params = tab_params(seed=11, data=data)[0]
    batch = fm.make_batch(np.random.default_rng(12), 64, "lsd", cfg, dtype=np.float64)
    (loss_d, loss_o, raw), grads = fm.loss_and_grads(params, batch, "lsd", settings)
    pred = fm.predict(params, batch, "lsd")[0]
    n = np.sqrt(((pred["q"] - fm.off_diagonal_target(params, batch, pred, "lsd")) ** 2).sum(1))
    assert np.any(n > cap) and np.any(n < cap)
    assert loss_o == pytest.approx(np.mean(np.where(n <= cap, n ** 2, 2 * cap * n - cap ** 2)), rel=1e-12)
    assert raw == pytest.approx(np.mean(n ** 2), rel=1e-12)
    v = tab_v(params, batch["x_diag"], batch["t_diag"], batch["t_diag"])
    assert loss_d == pytest.approx(np.mean(((v - batch["target_diag"]) ** 2).sum(1)), rel=1e-10)
    g = lambda weight: fm.loss_and_grads(params, batch, "lsd", dict(
        off_weight=weight, off_cap=cap, row_weight=None, diag_row_weight=None, row_c=None,
        row_p=None))[1]
    g0, g1 = g(0.0), g(1.0)
    for k in grads:                               # the gradient is linear in the off weight
        np.testing.assert_allclose(grads[k], g0[k] + 2.0 * (g1[k] - g0[k]), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- samplers


def test_table_samplers():
    """One step of each sampler against the hand-written step on a small random model."""
    assert set(fm.SAMPLERS) == {"map", "euler", "consistency"}
    params, _ = tab_params(seed=13)
    rng = np.random.default_rng(14)
    x, noise = 1.2 * rng.standard_normal((50, 2)), 1.2 * rng.standard_normal((3, 50, 2))
    s, t = np.float64(0.25), np.float64(0.5)
    np.testing.assert_allclose(fm.SAMPLERS["map"](params, x, 1, s, t, noise),
                               x + 0.25 * tab_v(params, x, 0.25, 0.5), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(fm.SAMPLERS["euler"](params, x, 1, s, t, noise),
                               x + 0.25 * tab_v(params, x, 0.25, 0.25), rtol=1e-11, atol=1e-12)
    # consistency: the first step jumps x straight to t = 1; step k > 0 re-noises to
    # (1 - t_k) z_k-1 + t_k x first, then jumps to 1
    np.testing.assert_allclose(fm.SAMPLERS["consistency"](params, x, 0, np.float64(0.0), t, noise),
                               x + tab_v(params, x, 0.0, 1.0), rtol=1e-11, atol=1e-12)
    y = 0.5 * noise[1] + 0.5 * x
    np.testing.assert_allclose(fm.SAMPLERS["consistency"](params, x, 2, t, np.float64(0.75), noise),
                               y + 0.5 * tab_v(params, y, 0.5, 1.0), rtol=1e-11, atol=1e-12)


# ---------------------------------------------------------------- DEFAULTS and PRESETS


def test_table_default_learning_rate_schedule_and_the_long_preset():
    """lr 2e-3 (the recipe's: psd-uni sets none of its own) reached at the end of a 200-step
    linear warm-up, then a cosine over 20,000 steps to 2% of it; the long preset stretches the
    cosine to 400,000 steps."""
    cfg = fm.make_config("psd-uni")
    assert cfg["preset"] is None                  # no preset unless one is named
    lr = lambda it: fm.learning_rate(it, cfg)
    assert lr(0) == pytest.approx(2e-3 / 200, rel=1e-12)
    assert lr(99) == pytest.approx(1e-3, rel=1e-12)
    assert lr(199) == pytest.approx(2e-3, rel=1e-12) and lr(200) == pytest.approx(2e-3, rel=1e-12)
    assert lr(10_100) == pytest.approx(2e-3 * (0.02 + 0.98 / 2), rel=1e-12)    # halfway down
    last = 2e-3 * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * 19_799 / 19_800)))
    assert lr(19_999) == pytest.approx(last, rel=1e-12)
    assert lr(20_000) == pytest.approx(4e-5, rel=1e-12)
    long = fm.make_config("psd-uni", preset="long")
    assert fm.learning_rate(200_100, long) == pytest.approx(2e-3 * 0.51, rel=1e-12)
    assert fm.learning_rate(400_000, long) == pytest.approx(4e-5, rel=1e-12)
    ring = fm.make_config("lsd", "ring", preset="long")
    assert ring["iters"] == 400_000 and ring["off_cap"] == 0.75          # beside the data's recipe
    assert fm.make_config("lsd", preset="long", iters=7)["iters"] == 7   # a flag wins
    # any schedule: linear warm-up to lr, cosine to lr * lr_final
    cfg = fm.make_config("lsd", lr=0.1, warmup=7, iters=50, lr_final=0.3)
    for it in range(51):
        want = 0.1 * (it + 1) / 7 if it < 7 else \
            0.1 * (0.3 + 0.7 * 0.5 * (1 + math.cos(math.pi * (it - 7) / 43)))
        assert fm.learning_rate(it, cfg) == pytest.approx(want, rel=1e-12), it


def test_table_a_preset_sits_between_the_defaults_and_the_recipe(monkeypatch):
    monkeypatch.setitem(fm.PRESETS, "tab", dict(iters=5, off_cap=0.11, lr=0.5))
    cfg = fm.make_config("psd-uni", "ring", preset="tab")
    assert (cfg["iters"], cfg["off_cap"], cfg["lr"]) == (5, 0.75, 0.5)   # the data's recipe wins
    assert fm.make_config("lsd", preset="tab")["off_cap"] == 0.11        # over DEFAULTS
    assert fm.make_config("lsd", preset="tab")["lr"] == 4e-3             # a method's own wins
    assert fm.make_config("lsd", "ring", preset="tab", lr=0.2)["lr"] == 0.2


def test_table_train_runs_the_default_iters_on_the_schedule(monkeypatch):
    """train() with nothing named runs lsd for 20,000 steps, each at learning_rate(it), from
    lsd's own peak 4e-3 (the search's winner)."""
    lrs = []
    monkeypatch.setattr(fm, "make_batch", lambda *args, **kwargs: None)
    monkeypatch.setattr(fm, "train_step", lambda model, batch, lr, *args: lrs.append(lr) or (1.0, 2.0, 3.0))
    model = fm.train()
    assert model["iter"] == 20_000 and model["history"].shape == (20_000, 3) and len(lrs) == 20_000
    assert model["config"]["method"] == "lsd" and model["config"]["data"] == "checkerboard"
    assert lrs[0] == pytest.approx(2e-5) and lrs[199] == pytest.approx(4e-3)
    assert lrs[-1] == pytest.approx(4e-3 * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * 19_799 / 19_800))))


def test_table_train_step_clips_at_10_and_keeps_an_ema_at_0999(monkeypatch):
    """A step with a huge gradient hands Adam gradients of norm 10; late in training the EMA
    moves a thousandth of the way to the new weights; the feature constants never train."""
    cfg = fm.make_config("lsd", batch=32, **TAB_SMALL)
    model = fm.new_model(cfg)
    batch = fm.make_batch(np.random.default_rng(15), 32, "lsd", cfg)
    batch["target_diag"] = batch["target_diag"] * 1e4            # a huge diagonal gradient
    seen = {}
    real_adam = fm.adam_update
    monkeypatch.setattr(fm, "adam_update", lambda params, grads, state, lr: seen.update(
        norm=math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values())))
        or real_adam(params, grads, state, lr))
    model["adam"]["step"] = 50_000                                # past the EMA's ramp
    rng = np.random.default_rng(16)
    for k in model["ema"]:
        model["ema"][k] = (model["ema"][k] + 0.1 * rng.standard_normal(model["ema"][k].shape)).astype(np.float32)
    ema_before = {k: a.astype(np.float64) for k, a in model["ema"].items()}
    fixed = {k: model["params"][k].copy() for k in ("fourier", "freqs", "x_scale")}
    w0 = model["params"]["W0"].copy()
    fm.train_step(model, batch, 1e-3)
    assert seen["norm"] == pytest.approx(10.0, rel=1e-5)
    assert not np.array_equal(model["params"]["W0"], w0)
    for k in ("fourier", "freqs", "x_scale"):
        assert np.array_equal(model["params"][k], fixed[k]), k
    for k in model["ema"]:
        if re.fullmatch(r"[Wb]\d+", k):
            want = ema_before[k] + 0.001 * (model["params"][k] - ema_before[k])
            np.testing.assert_allclose(model["ema"][k], want, rtol=0, atol=2e-7, err_msg=k)


def test_table_default_batch_rows_network_and_seed():
    """1,024 rows, 768 on the diagonal and 256 off it; a 3 x 128 network on 2 + 64 features of x
    and 2 + 24 of the times (frequencies pi, 2 pi, ..., 6 pi); seed 0."""
    cfg = fm.make_config("lsd")
    batch = fm.make_batch(np.random.default_rng(17), cfg["batch"], "lsd", cfg)
    assert len(batch["t_diag"]) == 768 and len(batch["s"]) == 256
    assert np.all(batch["s"] > 0)                                  # no anchored rows (s0_share off)
    assert fm.derivative_factor(cfg, 0) == 1.0                     # no warm-up
    assert fm.num_features(cfg) == (66, 26)
    params = fm.new_model(cfg)["params"]
    shapes = {k: a.shape for k, a in params.items() if re.fullmatch(r"[Wb]\d+", k)}
    assert shapes == {"W0": (92, 128), "b0": (128,), "W1": (128, 128), "b1": (128,),
                      "W2": (128, 128), "b2": (128,), "W3": (128, 2), "b3": (2,)}
    assert params["fourier"].shape == (2, 32)
    np.testing.assert_allclose(params["freqs"], math.pi * np.arange(1, 7), rtol=1e-6)
    assert params["x_scale"] == pytest.approx(math.sqrt(4 / 3), rel=1e-6)
    assert params["W1"].std() == pytest.approx(1 / math.sqrt(128), rel=0.05)     # LeCun normal
    again = fm.init_params(np.random.default_rng(0), cfg)
    assert all(np.array_equal(params[k], again[k]) for k in params)
    assert not np.array_equal(fm.new_model(fm.make_config("lsd", seed=1))["params"]["W0"], params["W0"])


@pytest.mark.parametrize("data, scale", [("checkerboard", 0.25), ("ring", 0.06)])
def test_table_fourier_scale(data, scale):
    """The Fourier frequencies B of sin(2 pi B x): standard deviation 0.25 cycles per unit, the
    ring's recipe 0.06 (features of x, not of x / std)."""
    cfg = fm.make_config("lsd", data, hidden=2, depth=1, fourier=20_000)
    B = fm.init_params(np.random.default_rng(18), cfg, dtype=np.float64)["fourier"] / (2 * math.pi)
    assert tab_near(B.std(), scale, scale / math.sqrt(2 * B.size))
    assert tab_near(B.mean(), 0.0, scale / math.sqrt(B.size))


def test_table_command_line_defaults():
    args = fm.parse_args([])
    assert args.method == ["lsd"] and args.data == "checkerboard" and args.seed == 0
    assert fm.make_config("lsd")["base_std"] == pytest.approx(math.sqrt(4 / 3), rel=1e-15)
    assert fm.make_config("lsd", base_std=2.0)["base_std"] == 2.0


def test_table_defaults_of_the_diagonal_gap_the_power_and_the_warm_ups_cap():
    """The recipe: the diagonal's rows at s = t (diag_gap 0: the loss reads v(I_t, t, t)), the
    triangle times, no p (so no adaptive weight), and a warm-up, when there is one, that grows to
    1 (derivative_cap 1). A cap below 1 stops the factor there, and needs a warm-up to cap. The
    cap is a share in [0, 1]; p must not be negative; the settings that are numbers must be. A
    diagonal gap needs dyadic times and a teacher that is not the diagonal it moves."""
    cfg = fm.make_config("lsd", **TAB_SMALL)
    assert (cfg["diag_gap"], cfg["times"], cfg["row_p"], cfg["derivative_cap"]) == (0.0, "triangle", None, 1.0)
    params, _ = tab_params(seed=30)
    batch = fm.make_batch(np.random.default_rng(31), 16, "lsd", cfg, dtype=np.float64)
    assert np.array_equal(batch["gap_diag"], np.zeros(12))
    td = batch["t_diag"]
    np.testing.assert_allclose(fm.predict(params, batch, "lsd")[0]["v_diag"],
                               tab_v(params, batch["x_diag"], td, td), rtol=1e-12)
    with pytest.raises(ValueError, match="method 'lsd': row_p is needed by the adaptive row weight"):
        fm.make_config("lsd", row_weight="adaptive", row_c=0.1)
    assert fm.make_config("lsd", row_weight="adaptive", row_c=0.1, row_p=0.0)["row_p"] == 0.0
    factors = lambda cfg, its: [fm.derivative_factor(cfg, it) for it in its]
    assert factors(fm.make_config("esd-value", derivative_warmup=10), (0, 5, 10, 11, 1000)) == \
        [0.0, 0.5, 1.0, 1.0, 1.0]
    assert factors(fm.make_config("esd-value", derivative_warmup=10, derivative_cap=0.5),
                   (0, 4, 5, 10, 1000)) == [0.0, 0.4, 0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="method 'esd-value': derivative_cap caps a warm-up"):
        fm.make_config("esd-value", derivative_cap=0.5)      # no warm-up to cap
    for setting in ("derivative_cap", "diag_gap", "lr"):
        with pytest.raises(ValueError, match=f"method 'sct': {setting} None is not a number"):
            fm.make_config("sct", **{setting: None})
    # the flow-matching rows' gap: dyadic times alone, at most their finest level 1/128, so that
    # a row at t <= 127/128 ends at t + gap <= 1
    for method, gap in (("lsd", 1 / 128), ("shortcut", 1 / 64), ("shortcut", -1 / 128)):
        with pytest.raises(ValueError, match=f"method '{method}': diag_gap is for dyadic times"):
            fm.make_config(method, diag_gap=gap)
    assert fm.make_config("shortcut", diag_gap=1 / 256)["diag_gap"] == 1 / 256
    # a self-taught Lagrangian or Eulerian map reads its teacher on the diagonal v(x, t, t): the
    # gap would leave that untrained; the progressive condition reads no teacher, and an outside
    # or conditional teacher is not the diagonal
    for method in ("lsd", "esd"):
        with pytest.raises(ValueError, match=f"method '{method}': diag_gap would leave v.x, t, t. untrained"):
            fm.make_config(method, times="dyadic", diag_gap=1 / 128)
    for method in ("psd-mid", "lmd", "meanflow"):
        assert fm.make_config(method, times="dyadic", diag_gap=1 / 128)["diag_gap"] == 1 / 128
    for cap in (0.0, 1.0):
        assert fm.make_config("sct", derivative_cap=cap)["derivative_cap"] == cap
    for cap in (-0.01, 1.01):
        with pytest.raises(ValueError, match=r"method 'sct': derivative_cap is a share in \[0, 1\]"):
            fm.make_config("sct", derivative_cap=cap)
    assert fm.make_config("shortcut", diag_gap=0.0)["diag_gap"] == 0.0


# ---------------------------------------------------------------- Adam and the EMA


def test_table_adam_by_hand():
    """Three Adam steps with beta1 0.9, beta2 0.999, eps 1e-8, bias correction from step 1;
    gradients near eps so that eps shows."""
    rng = np.random.default_rng(19)
    p = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    state = {"m": {k: np.zeros_like(a) for k, a in p.items()},
             "v": {k: np.zeros_like(a) for k, a in p.items()}, "step": 0}
    hand = {k: a.copy() for k, a in p.items()}
    m = {k: np.zeros_like(a) for k, a in p.items()}
    v = {k: np.zeros_like(a) for k, a in p.items()}
    scales = np.array([1e-9, 3e-8, 1.0, 5.0])
    for step in range(1, 4):
        grads = {k: rng.standard_normal(a.shape) * np.resize(scales, a.shape) for k, a in p.items()}
        fm.adam_update(p, {k: g.copy() for k, g in grads.items()}, state, lr=0.01)
        for k, g in grads.items():
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.999 * v[k] + 0.001 * g * g
            m_hat, v_hat = m[k] / (1 - 0.9 ** step), v[k] / (1 - 0.999 ** step)
            hand[k] = hand[k] - 0.01 * m_hat / (np.sqrt(v_hat) + 1e-8)
            np.testing.assert_allclose(p[k], hand[k], rtol=1e-12, atol=1e-15, err_msg=f"{k} {step}")
            np.testing.assert_allclose(state["m"][k], m[k], rtol=1e-12)
            np.testing.assert_allclose(state["v"][k], v[k], rtol=1e-12)
    assert state["step"] == 3


def test_table_ema_decay_ramp():
    for decay in (0.999, 0.9):
        for step in [1, 2, 5, 10, 80, 89, 90, 91, 8990, 8991, 8992, 20_000]:
            assert fm.ema_decay(decay, step) == pytest.approx(min(decay, (1 + step) / (10 + step)), rel=1e-15)
    ema, params = {"W0": np.zeros(3), "fourier": np.zeros(2)}, {"W0": np.full(3, 2.0), "fourier": np.ones(2)}
    fm.ema_update(ema, params, 0.999, 3)                        # d = 4/13
    np.testing.assert_allclose(ema["W0"], 2.0 * 9 / 13, rtol=1e-15)
    assert np.all(ema["fourier"] == 0)                          # a constant is not averaged


# ---------------------------------------------------------------- data sets


def test_table_dataset_std_and_covariance_closed_forms():
    """Checkerboard: a coordinate is (cell index) + U[0, 1) - 2 over the filled cells, so
    Var = Var(index) + 1/12 = 5/4 + 1/12 = 4/3 and Cov = Cov(indices) = 1/4. Ring: 16 E cos^2
    + 0.15^2 = 8.0225. The base noise and the features' scale take the std."""
    cells = np.array(TAB_FILLED, float)
    cov = np.cov(cells.T, bias=True) + np.eye(2) / 12
    np.testing.assert_allclose(cov, [[4 / 3, 1 / 4], [1 / 4, 4 / 3]], rtol=1e-15)
    np.testing.assert_allclose(fm.DATA_COV, cov, rtol=1e-15)
    stds = {"checkerboard": math.sqrt(cov[0, 0]), "ring": math.sqrt(16 * 0.5 + 0.15 ** 2)}
    for data, std in stds.items():
        cfg = fm.make_config("lsd", data, **TAB_SMALL)
        assert fm.DATASETS[data]["std"] == pytest.approx(std, rel=1e-15)
        assert cfg["base_std"] == pytest.approx(std, rel=1e-15)
        assert float(fm.init_params(np.random.default_rng(0), cfg)["x_scale"]) == pytest.approx(std, rel=1e-7)
    # the small-t exact velocity reads the covariance: b = (C theta - x) / (1 - t),
    # theta = t x / ((1 - t) sigma)^2
    x = np.random.default_rng(20).standard_normal((6, 2)) * 2
    t, sigma = 2e-4, stds["checkerboard"]
    theta = t * x / ((1 - t) * sigma) ** 2
    np.testing.assert_allclose(fm.DATASETS["checkerboard"]["velocity"](x, t, sigma),
                               (theta @ cov - x) / (1 - t), rtol=1e-13)


def test_table_checkerboard_sampler():
    """Uniform on the 8 filled cells (i, j), i + j even, of the 4 x 4 board on [-2, 2]^2."""
    n = 80_000
    x = fm.DATASETS["checkerboard"]["sample"](n, np.random.default_rng(21))
    assert x.shape == (n, 2) and np.all((x >= -2) & (x < 2))
    cell = np.floor(x + 2).astype(int)
    counts = {c: int(np.sum((cell[:, 0] == c[0]) & (cell[:, 1] == c[1]))) for c in TAB_FILLED}
    assert sum(counts.values()) == n
    for c, k in counts.items():
        assert tab_near(k, n / 8, math.sqrt(n * 7 / 64)), (c, k)
    frac = x + 2 - cell                            # uniform in each cell
    assert tab_near(frac.mean(), 0.5, math.sqrt(1 / 12 / (2 * n)))
    assert tab_near(frac.var(), 1 / 12, 0.075 / math.sqrt(2 * n))
    assert tab_near(np.mean(frac < 0.25), 0.25, math.sqrt(0.1875 / (2 * n)))
    assert np.allclose(x.std(axis=0), math.sqrt(4 / 3), atol=0.01)
    np.testing.assert_array_equal(np.array(sorted(map(tuple, fm.FILLED))), np.array(TAB_FILLED))


def test_table_ring_sampler():
    """Eight equally likely modes at radius 4, angles 2 pi k / 8, each N(centre, 0.15^2 I)."""
    n = 80_000
    x = fm.DATASETS["ring"]["sample"](n, np.random.default_rng(22))
    d = np.sqrt(((x[:, None, :] - TAB_CENTRES[None]) ** 2).sum(2))
    k = d.argmin(1)
    for mode in range(8):
        assert tab_near(np.mean(k == mode), 1 / 8, math.sqrt(7 / 64 / n)), mode
    res = x - TAB_CENTRES[k]
    assert tab_near(res.mean(), 0.0, 0.15 / math.sqrt(2 * n))
    assert tab_near(res.std(), 0.15, 0.15 / math.sqrt(4 * n))
    np.testing.assert_allclose(fm.RING_CENTRES, TAB_CENTRES, atol=1e-14)
    np.testing.assert_allclose(fm.DATASETS["ring"]["centres"], TAB_CENTRES, atol=1e-14)
    assert fm.DATASETS["checkerboard"]["centres"] is None


def test_table_rewards():
    """exp(-|x - c|^2 / (2 2.5^2)), c the top right corner cell (2, 2) or the mode at angle 0."""
    x = 3 * np.random.default_rng(23).standard_normal((200, 2))
    for data, c in [("checkerboard", (2.0, 2.0)), ("ring", (4.0, 0.0))]:
        want = np.exp(-((x[:, 0] - c[0]) ** 2 + (x[:, 1] - c[1]) ** 2) / (2 * 6.25))
        np.testing.assert_allclose(fm.DATASETS[data]["reward"](x), want, rtol=1e-13, err_msg=data)
    np.testing.assert_allclose(fm.reward_bump(x, (1.0, -1.0)),
                               np.exp(-((x[:, 0] - 1) ** 2 + (x[:, 1] + 1) ** 2) / 12.5), rtol=1e-13)


def test_table_flow_steps():
    """The exact flow integrates 16 RK4 steps (checkerboard) and 32 (ring) unless told."""
    x = 1.3 * np.random.default_rng(24).standard_normal((20, 2))
    for data, steps in [("checkerboard", 16), ("ring", 32)]:
        std = fm.DATASETS[data]["std"]
        default = fm.exact_flow(x, 0.0, 1.0, std, data)
        assert np.array_equal(default, fm.exact_flow(x, 0.0, 1.0, std, data, steps=steps)), data
        assert not np.array_equal(default, fm.exact_flow(x, 0.0, 1.0, std, data, steps=steps + 1))


class TabFakePlot:
    """A stand-in for matplotlib that notes the 2D histograms' bins."""

    def __init__(self):
        self.bins = []

    def subplots(self, rows, cols, **kwargs):
        return self, [self] * cols

    def hist2d(self, x, y, bins=None, **kwargs):
        self.bins.append(bins)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("data, half", [("checkerboard", 2.5), ("ring", 5.5)])
def test_table_extent_is_the_plots_half_width(monkeypatch, data, half):
    fake = TabFakePlot()
    monkeypatch.setattr(fm, "pyplot", lambda: fake)
    x = np.zeros((10, 2))
    results = {"data": data, "floor": {"M": 0.0}, "score": {1: {"M": 0.0}}, "samples": {1: x}, "x_true": x}
    fm.plot_samples(results, "unused.png")
    assert len(fake.bins) == 2
    for edges_x, edges_y in fake.bins:
        assert edges_x[0] == -half and edges_x[-1] == half and edges_y[-1] == half


# ---------------------------------------------------------------- metrics


def test_table_histogram_kl_against_binning_by_hand():
    """60 x 60 bins on [-2.5, 2.5]^2, each histogram normalized, then 1e-8 added, KL(true || gen);
    sets small enough to leave empty bins, with points outside the square."""
    rng = np.random.default_rng(25)
    a = fm.sample_checkerboard(20_000, rng)
    b = 1.3 * fm.sample_checkerboard(3_000, rng) + 0.05 * rng.standard_normal((3_000, 2))
    assert np.any(np.abs(b) > 2.5)
    for p, q in [(a, b), (b, a), (a[:2000], a[5000:])]:
        assert fm.histogram_kl(p, q) == pytest.approx(tab_kl(p, q), rel=1e-10)
    assert fm.histogram_kl(a, b) != pytest.approx(fm.histogram_kl(b, a), rel=1e-3)


def test_table_sliced_wasserstein_against_a_second_implementation_and_a_shift():
    """128 unit directions from default_rng(0), the first min(n_a, n_b) points, RMS over
    directions and points of the sorted projections' differences. A shift by d moves each
    sorted projection by d . theta, so SW = |d| times the RMS over directions of the cosine
    between d and theta."""
    rng = np.random.default_rng(26)
    a, b = fm.sample_ring(3_000, rng), fm.sample_checkerboard(4_000, rng)
    assert fm.sliced_wasserstein(a, b) == pytest.approx(tab_sw(a, b), rel=1e-12)
    assert fm.sliced_wasserstein(b, a) == pytest.approx(tab_sw(b[:3000], a), rel=1e-12)
    d = np.array([0.6, -0.8])                                      # |d| = 1
    theta = tab_directions()
    cos = theta @ d                                                 # cosines, |d| = 1
    shifted = np.concatenate([a + d, 100 + rng.standard_normal((500, 2))])   # a tail that is not read
    assert fm.sliced_wasserstein(a, shifted) == pytest.approx(math.sqrt(np.mean(cos ** 2)), rel=1e-12)
    assert fm.sliced_wasserstein(a, a + 2 * d, seed=3) == pytest.approx(
        2 * math.sqrt(np.mean((tab_directions(seed=3) @ d) ** 2)), rel=1e-12)


def test_table_metrics_table():
    """KL and SW as defined; "SW at 5,000": SW on the first 5,000 true points."""
    rng = np.random.default_rng(27)
    a, b = fm.sample_checkerboard(6_000, rng), 1.1 * fm.sample_checkerboard(5_500, rng)
    assert fm.METRICS["KL"](a, b) == pytest.approx(tab_kl(a, b), rel=1e-10)
    assert fm.METRICS["SW"](a, b) == pytest.approx(tab_sw(a, b), rel=1e-12)
    assert fm.METRICS["SW at 5,000"](a, b) == pytest.approx(tab_sw(a[:5000], b[:5000]), rel=1e-12)
    assert fm.METRICS["SW at 5,000"](a, b[:3000]) == pytest.approx(tab_sw(a[:3000], b[:3000]), rel=1e-12)


def test_table_mode_balance_by_hand():
    c = TAB_CENTRES
    x = np.concatenate([np.repeat(c[:1] + 0.5, 30, 0), np.repeat(c[1:] + 0.1, 10, 0)])
    worst, off = fm.mode_balance(x, c, 0.6)
    assert off == pytest.approx(30 / 100) and worst == pytest.approx(30 / 100 - 1 / 8)
    y = 5 * np.random.default_rng(28).standard_normal((500, 2))
    assert fm.mode_balance(y, c, 0.6) == pytest.approx(tab_mode_balance(y, c, 0.6), rel=1e-12)


@pytest.mark.parametrize("data", ["checkerboard", "ring"])
def test_table_evaluation_steps_metrics_and_modes(data):
    """evaluate() scores 1, 2, 4, 8 and 16 steps with the data set's metrics, in order (KL then
    SW; SW then SW at 5,000), against the true set of default_rng(10_000) and a floor from
    default_rng(10_001); the ring's modes at the centres by hand, off beyond 0.6."""
    model = fm.new_model(fm.make_config("lsd", data, **TAB_SMALL))
    n = 5_200 if data == "ring" else 2_000         # the ring's above 5,000: "SW at 5,000" cuts
    if data == "checkerboard":                    # the default steps
        res = fm.evaluate(model, n=n, exact=False)
        assert list(res["score"]) == [1, 2, 4, 8, 16]
    else:                                         # the ring's sorts of 5,200 points are slow
        res = fm.evaluate(model, n=n, steps=(1, 4), exact=False)
    sample = fm.sample_checkerboard if data == "checkerboard" else fm.sample_ring
    x_true, x_other = sample(n, np.random.default_rng(10_000)), sample(n, np.random.default_rng(10_001))
    np.testing.assert_array_equal(res["x_true"], x_true)
    expect = {"checkerboard": {"KL": tab_kl, "SW": tab_sw},
              "ring": {"SW": tab_sw, "SW at 5,000": lambda a, b: tab_sw(a[:5000], b)}}[data]
    assert list(res["floor"]) == list(expect)
    for name, metric in expect.items():
        assert res["floor"][name] == pytest.approx(metric(x_true, x_other), rel=1e-9), name
        assert res["score"][4][name] == pytest.approx(metric(x_true, res["samples"][4]), rel=1e-9)
    if data == "ring":
        for k, x in res["samples"].items():
            assert res["modes"][k] == pytest.approx(tab_mode_balance(x, TAB_CENTRES, 0.6), abs=1e-12)
        assert 0 < res["modes"][1][1] < 1             # the off-ring share is not trivially 0 or 1
    else:
        assert "modes" not in res


def test_table_late_off_ratio():
    """The raw residual (history column 2): mean of the last quarter over that of the third."""
    rng = np.random.default_rng(29)
    for n in (403, 8, 17):
        h = np.stack([np.full(n, 5.0), rng.random(n) + 0.5, rng.random(n) + 0.5], axis=1)
        q = n // 4
        want = h[n - q:, 2].mean() / h[n - 2 * q:n - q, 2].mean()
        assert fm.late_off_ratio(h) == pytest.approx(want, rel=1e-12), n
    assert fm.late_off_ratio(np.ones((3, 3))) is None


# ---------------------------------------------------------------- groups, benchmark, split


def test_table_method_groups_on_the_command_line():
    groups = {
        "all": ["lsd", "esd", "psd-mid", "psd-uni", "fm"],
        "teachers": ["fm", "lmd@fm", "emd@fm", "ptd@fm", "lmd", "emd", "ptd", "lsd", "esd", "psd-mid"],
        "known": ["lsd", "lsd-value", "esd", "esd-value", "psd-mid", "meanflow", "sct", "scd",
                  "shortcut", "ayf-emd-hybrid", "ayf-lmd-hybrid"]}
    assert set(fm.METHOD_GROUPS) == set(groups)
    for group, names in groups.items():
        args = fm.parse_args(["--method", group])
        assert args.method == names and args.compare, group
        assert args.out == "plots/compare_checkerboard" + ("" if group == "all" else f"_{group}")
    assert fm.parse_args(["--method", "itm"]).method == ["itm-lsd"]


def test_table_bench_reference_step_flops():
    """The reference LSD step (4 x 256, batch 2048, 3/4 on the diagonal), counted by hand: 92
    input features; the student pass over 2048 + 512 tangent rows and the teacher's pass over
    the 512 jumps' ends forward; dW over the student's 2560 rows and da below all but the input."""
    cfg = fm.make_config("lsd", **fm.BENCH)
    layers = [(92, 256), (256, 256), (256, 256), (256, 256), (256, 2)]
    flop = sum(2 * fin * fout * (3072 + 2560 + (2560 if i else 0)) for i, (fin, fout) in enumerate(layers))
    assert flop == 2 * 92 * 256 * 5632 + 3 * 2 * 256 * 256 * 8192 + 2 * 256 * 2 * 8192
    assert sum(2 * m * k * n for m, k, n in fm.step_gemms(cfg, "lsd")) == flop
    assert cfg["batch"] == 2048 and len(fm.make_batch(np.random.default_rng(0), 2048, "lsd", cfg)["s"]) == 512


def test_table_split_above_2_to_the_26(monkeypatch):
    """A step is split in two exactly when batch * hidden^2 passes 2^26: 1,024 rows of width 256
    are not, 1,025 are."""
    items = []
    monkeypatch.setattr(fm, "on_all_cores", lambda work, its: items.append(list(its)) or [work(i) for i in its])
    cfg = fm.make_config("fm", hidden=256, depth=1, fourier=1, time_freqs=1)
    params = fm.init_params(np.random.default_rng(0), cfg)
    for batch_size, parts in [(1024, []), (1025, [[0, 1]])]:
        items.clear()
        batch = fm.make_batch(np.random.default_rng(1), batch_size, "fm", cfg)
        fm.loss_and_grads_in_parts(params, batch, "fm", fm.loss_settings(cfg))
        assert items == parts, batch_size


# ---------------------------------------------------------------- records refused, the API's fast paths, the README's table




def test_the_readme_method_table_lists_every_record_and_nothing_else():
    """README's method table has one row per record of METHODS, and its groups and alias are
    the command line's."""
    text = open(os.path.join(HERE, "README.md")).read()
    section = text[text.index("## The methods"):text.index("## One search for every method")]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", section, re.M)
    assert sorted(rows) == sorted(fm.METHODS) and len(rows) == len(set(rows))
    for group, names in fm.METHOD_GROUPS.items():
        listed = re.sub(r"\([^)]*\)", "", section.split(f"`{group}` = ", 1)[1])
        listed = re.split(r";|\. ", listed, 1)[0]
        assert re.findall(r"`([^`]+)`", listed) == list(names), group
    for alias, method in fm.ALIASES.items():
        assert f"The alias `{alias}` is `{method}`" in section


def test_train_refuses_a_model_whose_record_it_cannot_train(monkeypatch):
    """A record enters at train() too (a model made or loaded before the table changed): the
    progressive condition on the derivative route is refused by name, before any step."""
    model = fm.new_model(fm.make_config("psd-mid", iters=2, hidden=8, depth=1, fourier=2, time_freqs=1))
    monkeypatch.setitem(fm.METHODS, "psd-mid", dict(fm.METHODS["psd-mid"], route="derivative"))
    with pytest.raises(ValueError, match=r"method 'psd-mid': route 'derivative'"):
        fm.train(model=model)
    assert model["iter"] == 0


def test_the_api_runs_the_command_lines_fast_paths(monkeypatch):
    """import flowmap; train() splits a step above SPLIT_ABOVE over the cores and sample() runs
    its jumps in chunks on all cores, as the command line does; the plain paths stay a keyword
    away and give the same numbers (training bit for bit below the split)."""
    calls = []
    real = fm.on_all_cores
    monkeypatch.setattr(fm, "on_all_cores", lambda work, items: calls.append(list(items)) or real(work, items))
    small = dict(hidden=128, depth=1, fourier=2, time_freqs=1, iters=1)
    assert 4097 * 128 ** 2 > fm.SPLIT_ABOVE >= 4096 * 128 ** 2
    fm.train("lsd", batch=4097, **small)
    assert calls == [[0, 1]]                                   # the step, in two parts
    calls.clear()
    model = fm.train("lsd", batch=4096, **small)
    assert calls == []                                         # too small to split
    x = fm.sample(model, 5000, 2, seed=1)
    assert calls == [[0, 2048, 4096]]                          # chunks of 2048 points
    np.testing.assert_allclose(x, fm.sample(model, 5000, 2, seed=1, run=fm.jumps), atol=1e-5, rtol=0)


@pytest.mark.parametrize("setting", ["off_weight", "off_cap", "row_c", "row_p",
                                     "derivative_warmup", "lr", "clip"])
def test_a_negative_setting_is_refused_where_the_api_takes_it(setting):
    """The command line refuses a negative number; make_config refuses it too, by name (a
    negative cap would turn the Huber loss's slope around and train uphill)."""
    with pytest.raises(ValueError, match=rf"method 'meanflow': {setting} -0.5 must not be negative"):
        fm.make_config("meanflow", **{setting: -0.5})


def test_train_checks_overrides_before_a_model_takes_them():
    """train(model=m, **overrides) refuses an unknown setting or an untrainable one, and leaves
    the model as it was, so the next call with good settings trains on."""
    model = fm.new_model(fm.make_config("lsd", iters=2, hidden=8, depth=1, fourier=2, time_freqs=1))
    before = dict(model["config"])
    for bad, words in [(dict(itres=3), r"settings \['itres'\]"),
                       (dict(row_weight="nope"), "row_weight 'nope'")]:
        with pytest.raises(ValueError, match=words):
            fm.train(model=model, **bad)
        assert model["config"] == before and model["iter"] == 0
    fm.train(model=model, iters=3)
    assert model["iter"] == 3 and model["config"]["iters"] == 3


@pytest.mark.parametrize("argv, methods, error", [
    (["--method", "itm", "--condition", "progressive"], ["itm-psd-mid"], None),
    (["--method", "itm"], ["itm-lsd"], None),
    (["--method", "itm-psd-mid", "--condition", "progressive"], ["itm-psd-mid"], None),
    (["--method", "itm-psd-mid", "--condition", "lagrangian"], None, "--condition lagrangian is itm-lsd"),
    (["--method", "itm,itm-psd-mid", "--condition", "lagrangian"], None, "--method names itm-psd-mid"),
    (["--method", "lsd", "--condition", "lagrangian"], None, "--condition is for --method itm"),
])
def test_condition_picks_what_the_alias_itm_stands_for(argv, methods, error, capsys):
    """--condition C resolves the alias itm to the tilted method with condition C; it never
    silently replaces a tilted method the user named."""
    if error is None:
        assert fm.parse_args(argv).method == methods
        return
    with pytest.raises(SystemExit) as e:
        fm.parse_args(argv)
    assert e.value.code == 2 and error in capsys.readouterr().err


# ---------------------------------------------------------------- the search (appendix E)
# The search of every known method's settings, pinned against the axes written out by hand from
# its description (flowmap.py, appendix E): each method's source settings first, the knobs its
# source ablates, then the learning rate, then the off-diagonal weight for a method with
# diagonal rows; the scores and walks computed here from fake runs, then one real search run
# one process per run and pooled.

TUNE_TUNED = ("lsd", "esd", "psd-mid", "meanflow", "sct", "scd", "shortcut", "ayf-emd-hybrid",
              "ayf-lmd-hybrid")            # --method known but the route ablations
TUNE_REPORTED_SEEDS = (0, 1, 2)            # the seeds of the README's tables
TUNE_LRS = ("lr", (2e-3, 1e-3, 4e-3))      # the recipe's first
TUNE_C = ("row_c", (0.1, 1.0))             # the source's c (esd's, sCM's) first
TUNE_AXES_BY_HAND = {
    "lsd": [TUNE_LRS, ("off_weight", (2.0, 2 / 3))],
    "esd": [TUNE_C, TUNE_LRS, ("off_weight", (2.0, 2 / 3))],
    "psd-mid": [TUNE_LRS, ("off_weight", (2.0, 2 / 3))],
    # the knobs MeanFlow's paper ablates: p, the times, the share of s = t rows; its weight is
    # one mean over the batch (1/3 beside 75% diagonal rows)
    "meanflow": [("row_p", (1.0, 0.0)), ("times", ("logit-normal", "triangle")),
                 ("diag_fraction", (0.75, 0.25)), TUNE_LRS, ("off_weight", (1 / 3, 2 / 3, 2.0))],
    "sct": [TUNE_C, TUNE_LRS],             # no diagonal rows: the weight only scales the loss
    "scd": [TUNE_C, TUNE_LRS],
    "shortcut": [TUNE_LRS, ("off_weight", (1 / 7, 2 / 3, 2.0))],
    "ayf-emd-hybrid": [TUNE_C, TUNE_LRS],
    "ayf-lmd-hybrid": [TUNE_C, TUNE_LRS],
}
# where a record now holds the search's winner, the source's own setting the search started from
TUNE_SOURCES_BY_HAND = {"shortcut": dict(off_weight=1 / 7), "sct": dict(row_c=0.1),
                        "ayf-lmd-hybrid": dict(row_c=0.1)}
TUNE_RUNS_BY_HAND = {"lsd": 4, "esd": 5, "psd-mid": 4, "meanflow": 8, "sct": 4, "scd": 4,
                     "shortcut": 5, "ayf-emd-hybrid": 4, "ayf-lmd-hybrid": 4}


def tune_numbers(score):
    """A run's numbers whose KL is e^score at every number of steps: its score is `score`."""
    return {"score": {str(k): {"KL": math.exp(score)} for k in (1, 2, 4, 8, 16)}}


def tune_key(point):
    return json.dumps(point, sort_keys=True)


def test_tune_names_its_methods_seed_and_budget():
    """The search covers --method known but the route ablations lsd-value and esd-value (they
    take their base method's settings), on seed 100, no seed of the reported tables, with at
    most 8 runs a method, which MeanFlow's search takes."""
    assert fm.TUNED == TUNE_TUNED
    assert set(fm.KNOWN_METHODS) - set(fm.TUNED) == {"lsd-value", "esd-value"}
    assert set(fm.TUNED) <= set(fm.KNOWN_METHODS)
    assert fm.TUNE_SEED == 100 and fm.TUNE_SEED not in TUNE_REPORTED_SEEDS
    assert fm.TUNE_MAX == 8 == max(TUNE_RUNS_BY_HAND.values())


@pytest.mark.parametrize("method", TUNE_TUNED)
def test_tune_axes_start_at_the_sources_settings(method):
    """Each searched method's axes, in order, against those written by hand; the first value of
    each is the source's setting (the SPEC's, meanflow's its ImageNet code's; the recipe's lr
    2e-3), so the first run is the source's settings; each axis adds len(values) - 1 runs to the
    first: at most TUNE_MAX."""
    axes = [(k, tuple(values)) for k, values in fm.tune_axes(method)]
    assert axes == TUNE_AXES_BY_HAND[method]
    source = {"meanflow": "meanflow-imagenet"}.get(method, method)    # meanflow: the winner
    own = dict(REC_SPEC[source]["settings"], lr=2e-3, **TUNE_SOURCES_BY_HAND.get(method, {}))
    for k, values in axes:
        assert values[0] == own[k], k
        assert len(set(values)) == len(values), k
    assert 1 + sum(len(values) - 1 for _, values in axes) == TUNE_RUNS_BY_HAND[method] <= 8


def test_tune_score_is_the_mean_log_kl_over_the_steps():
    """The mean over 1, 2, 4, 8 and 16 steps of log KL; inf when any KL is not finite."""
    kl = {"1": 0.5, "2": 0.2, "4": 0.1, "8": 0.08, "16": 0.3}
    numbers = {"score": {k: {"KL": v, "SW": 1.0} for k, v in kl.items()}}
    want = (math.log(0.5) + math.log(0.2) + math.log(0.1) + math.log(0.08) + math.log(0.3)) / 5
    assert fm.tune_score(numbers) == pytest.approx(want, rel=1e-14)
    for bad in (math.nan, math.inf):
        numbers["score"]["8"]["KL"] = bad
        assert fm.tune_score(numbers) == math.inf
    assert fm.tune_score(tune_numbers(-1.25)) == pytest.approx(-1.25, rel=1e-14)


# meanflow's walk with the scores below (hand-picked so that each stage moves or not): the
# points in the order tried, each with its score; the best is the last
TUNE_MF = dict(row_p=1.0, times="logit-normal", diag_fraction=0.75, lr=2e-3, off_weight=1 / 3)
TUNE_MF_WALK = [
    (TUNE_MF, 1.0),
    (dict(TUNE_MF, row_p=0.0), 1.2),                                         # p stays 1
    (dict(TUNE_MF, times="triangle"), 0.9),                                  # the triangle wins
    (dict(TUNE_MF, times="triangle", diag_fraction=0.25), 0.95),             # 75% stays
    (dict(TUNE_MF, times="triangle", lr=1e-3), 0.93),
    (dict(TUNE_MF, times="triangle", lr=4e-3), 0.6),                         # 4e-3 wins
    (dict(TUNE_MF, times="triangle", lr=4e-3, off_weight=2 / 3), 0.58),
    (dict(TUNE_MF, times="triangle", lr=4e-3, off_weight=2.0), 0.53),        # the winner
]
TUNE_SCT = dict(row_c=0.1, lr=2e-3)
TUNE_SCT_WALK = [(TUNE_SCT, 1.0), (dict(TUNE_SCT, row_c=1.0), 0.8),      # the winner: the second
                 (dict(TUNE_SCT, row_c=1.0, lr=1e-3), 0.83), (dict(TUNE_SCT, row_c=1.0, lr=4e-3), 0.9)]


def test_tune_walk_stops_at_the_first_stage_that_waits_and_keeps_the_best():
    """tune_walk with a fake `finished` (scores of the runs done so far): nothing done, it waits
    for the start and the first axis's other values; with the first k runs done, it has tried
    those k (the finished ones of the stage under way too), and waits for the rest of the
    stage's points, each at the best point of the stages before; all done, it has tried every
    point once, in order, and picks the best. A tie keeps the earlier point; a run with no
    finite score never wins."""
    points = [p for p, _ in TUNE_MF_WALK]
    stages = [0, 2, 3, 4, 6, 8]                   # the runs done when each stage starts
    for k in range(len(points) + 1):
        done = {tune_key(p): tune_numbers(score) for p, score in TUNE_MF_WALK[:k]}
        tried, waiting, best = fm.tune_walk("meanflow", lambda p: done.get(tune_key(p)))
        stage = max(i for i, start in enumerate(stages) if start <= k)
        assert tried == points[:k], k
        if stage == len(stages) - 1:
            assert waiting == [] and best == points[-1]
        else:
            assert best is None
            stage_points = points[stages[stage]:stages[stage + 1]]
            assert [tune_key(p) for p in waiting] == [tune_key(p) for p in stage_points
                                                      if tune_key(p) not in done], k
    done = {tune_key(p): tune_numbers(score) for p, score in TUNE_SCT_WALK}
    assert fm.tune_walk("sct", lambda p: done.get(tune_key(p))) == (
        [p for p, _ in TUNE_SCT_WALK], [], TUNE_SCT_WALK[1][0])
    same = lambda p: tune_numbers(0.5)            # every run alike: the source's settings stay
    tried, waiting, best = fm.tune_walk("meanflow", same)
    assert len(tried) == 8 and len({tune_key(p) for p in tried}) == 8 and best == TUNE_MF
    nan = {"score": {k: {"KL": math.nan} for k in ("1", "2", "4", "8", "16")}}
    diverged = lambda p: nan if p == TUNE_SCT else tune_numbers(3.0)
    assert fm.tune_walk("sct", diverged)[2] == dict(TUNE_SCT, row_c=1.0)


def test_tune_trains_stage_by_stage_and_writes_its_table(tmp_path, monkeypatch, capsys):
    """tune() with a fake run (its score by hand, TUNE_*_WALK): each round trains the waiting runs
    of every method (meanflow and sct: 4, 3, 1, 2, 2), each on the checkerboard, seed 100, with
    the overrides given; then tune.json holds each method's runs in the order tried with their
    scores, its winner, nothing waiting, and tune.md the overrides, each run's row, the winner's
    in bold. Called
    again it trains nothing; with print_runs it trains nothing and prints one command a run."""
    scores = {tune_key(dict(p, method="meanflow")): v for p, v in TUNE_MF_WALK}
    scores.update({tune_key(dict(p, method="sct")): v for p, v in TUNE_SCT_WALK})
    axes = {"meanflow": list(TUNE_MF), "sct": list(TUNE_SCT)}
    trained = []

    def fake_run(cfg, folder, n_eval):
        point = {k: cfg[k] for k in axes[cfg["method"]]}
        numbers = dict(tune_numbers(scores[tune_key(dict(point, method=cfg["method"]))]),
                       name=fm.run_name(cfg), method=cfg["method"], config=cfg, n=n_eval)
        with open(os.path.join(folder, numbers["name"] + ".json"), "w") as f:
            json.dump(numbers, f)
        trained.append(cfg)
        return numbers

    monkeypatch.setattr(fm, "run_one", fake_run)
    out, lines = str(tmp_path / "tune"), []
    search = fm.tune(["meanflow", "sct"], out, n_eval=123, workers=1, log=lines.append, iters=30)
    rounds = [int(re.match(r"training (\d+) runs", line).group(1))
              for line in lines if line.startswith("training")]
    assert rounds == [4, 3, 1, 2, 2] and len(trained) == 12
    assert all((c["seed"], c["data"], c["iters"]) == (100, "checkerboard", 30) for c in trained)
    saved = json.load(open(os.path.join(out, "tune.json")))
    for method, walk in [("meanflow", TUNE_MF_WALK), ("sct", TUNE_SCT_WALK)]:
        runs = saved[method]["runs"]
        assert [r["settings"] for r in runs] == [p for p, _ in walk], method
        assert [r["score"] for r in runs] == pytest.approx([v for _, v in walk], rel=1e-12)
        assert saved[method]["waiting"] == [] and search[method]["waiting"] == []
        assert saved[method]["best"] == search[method]["best"] == min(walk, key=lambda pv: pv[1])[0]
    md = open(os.path.join(out, "tune.md")).read()
    assert "seed 100" in md and "123 samples per score" in md
    assert md.splitlines()[2] == "Every run overrides the recipe: iters=30."   # named, not hidden
    rows = [line for line in md.splitlines() if line.startswith(("| meanflow", "| sct", "| **"))]
    assert len(rows) == 12
    bold = [line for line in rows if line.startswith("| **")]
    assert bold == ["| **meanflow** | **row_p=1 times=triangle diag_fraction=0.75 lr=0.004 off_weight=2** | "
                    + " | ".join(["**1.6989**"] * 5) + " | **0.530** |",
                    "| **sct** | **row_c=1 lr=0.002** | " + " | ".join(["**2.2255**"] * 5) + " | **0.800** |"]
    lines.clear()
    assert fm.tune(["meanflow", "sct"], out, n_eval=123, workers=1, log=lines.append, iters=30) == search
    assert len(trained) == 12 and lines == [f"wrote {out}/tune.md and tune.json"]
    fresh = str(tmp_path / "fresh")
    capsys.readouterr()
    fm.tune(["sct"], fresh, n_eval=123, print_runs=True, command=["--tune", "--x"], log=lines.append,
            iters=30)
    printed = capsys.readouterr().out.splitlines()
    names = [fm.run_name(fm.make_config("sct", seed=100, iters=30, **p)) for p, _ in TUNE_SCT_WALK[:2]]
    assert printed == [f"python flowmap.py --tune --x --run {name}" for name in names]
    assert lines[-1].startswith("2 runs wait") and len(trained) == 12
    assert "(2 runs waiting)" in open(os.path.join(fresh, "tune.md")).read()


def test_tune_refuses_an_override_of_what_it_searches(tmp_path):
    """tune() from Python: the data, the seed and each searched method's axes are the search's
    (the command line refuses their flags); an override of one is refused before any folder."""
    for methods, key, value in ((["lsd"], "seed", 1), (["lsd"], "data", "ring"), (["lsd"], "lr", 1e-2),
                                (["lsd"], "off_weight", 1.0), (["sct"], "row_c", 0.5)):
        with pytest.raises(ValueError, match=f"the search sets {key} itself: drop it"):
            fm.tune(methods, str(tmp_path / "t"), **{key: value})
    assert not os.path.exists(tmp_path / "t")


@pytest.mark.parametrize("flags, flag", [
    (["--data", "ring"], "--data"), (["--seed", "3"], "--seed"), (["--seeds", "2"], "--seeds"),
    (["--lr", "0.01"], "--lr"), (["--off-weight", "1"], "--off-weight"),
    (["--save", "m.npz"], "--save"), (["--resume", "m.npz"], "--resume"),
    (["--load", "m.npz"], "--load"), (["--teacher", "m.npz"], "--teacher"),
    (["--ref", "m.npz"], "--ref"), (["--beta", "1"], "--beta"),
    (["--condition", "lagrangian"], "--condition")])
def test_cli_tune_refuses_what_it_sets_itself(flags, flag, capsys, nothing_runs):
    err = refused(capsys, "--tune", *flags)
    assert f"--tune sets {flag} itself (the checkerboard, seed 100," in err and "drop it" in err


def test_cli_the_search_flags_are_for_tune(tmp_path, capsys, nothing_runs):
    """--run and --print-runs are refused without --tune; --tune takes --method (every searched
    method by default) and writes to plots/tune unless told; --run names a run the search waits
    for, or is refused in one line, before any training."""
    assert "--run is for --tune" in refused(capsys, "--run", "lsd_seed100_x")
    assert "--print-runs is for --tune" in refused(capsys, "--print-runs")
    args = fm.parse_args(["--tune"])
    assert args.method == list(TUNE_TUNED) and args.out == "plots/tune"
    assert fm.parse_args(["--tune", "--method", "esd,sct", "--out", "x"]).method == ["esd", "sct"]


def test_cli_run_names_a_waiting_run_or_is_refused(tmp_path, capsys, monkeypatch):
    """--run of a name the search does not wait for is refused in one line, before any training."""
    monkeypatch.setattr(fm, "run_training", lambda *a, **k: pytest.fail("it trained"))
    err = refused(capsys, "--tune", "--method", "lsd", "--iters", "30", "--out", str(tmp_path),
                  "--run", "lsd_seed100_x")
    assert "lsd_seed100_x is not a run the search waits for now: --print-runs lists those (3)" in err


def test_cli_help_names_the_search_and_the_records(capsys, monkeypatch):
    """--help shows the search's flags (seed 100) and the records, their own off-diagonal weights
    among them (meanflow-imagenet 1/3, meanflow-cifar 3, shortcut 2: the search's)."""
    monkeypatch.setenv("COLUMNS", "2000")         # no line breaks inside a name
    code, out, err = run_main(capsys, "--help")
    assert code == 0 and err == ""
    for words in ["--tune ", "seed 100", "--print-runs ", "--run NAME ", "train that waiting run alone",
                  "meanflow-imagenet 0.333", "meanflow-cifar 3,", "shortcut 2", "ayf-emd-hybrid",
                  "ayf-lmd-hybrid"]:
        assert words in out, words


def test_tune_one_process_per_run_gives_the_pooled_search(tmp_path, capsys):
    """The search run as a job array would run it: --print-runs prints one command per waiting
    run (the same flags, --run NAME), each run as its own process, all of a round side by side,
    until nothing waits (lsd: 3 runs of the learning rate, then 1 of the weight); the table and
    its numbers are those of the same search trained in one process (workers 1), byte for byte.
    A finished run's name is then refused. The numbers by hand: each run's score from its KL, the
    fourth run at the best learning rate, the winner the lowest score, the seed 100."""
    flags = ["--tune", "--method", "lsd", "--iters", "30", "--hidden", "8", "--batch", "64",
             "--eval-samples", "2000"]
    split, pooled = str(tmp_path / "split"), str(tmp_path / "pooled")
    rounds = []
    while len(rounds) < 4:
        printed = subprocess.run([sys.executable, "flowmap.py", *flags, "--out", split, "--print-runs"],
                                 cwd=HERE, capture_output=True, text=True, env=CLI_ENV, timeout=120)
        assert printed.returncode == 0 and printed.stderr == "", printed.stderr
        commands = [line.split() for line in printed.stdout.splitlines() if line.startswith("python ")]
        assert f"{len(commands)} runs wait" in printed.stdout
        if not commands:
            break
        for command in commands:
            assert command[:-1] == ["python", "flowmap.py", *flags, "--out", split, "--run"]
        rounds.append(len(commands))
        done = run_in_processes([[sys.executable, *command[1:]] for command in commands])
        assert all(r.returncode == 0 and r.stderr == "" for r in done), [r.stderr for r in done]
    assert rounds == [3, 1]
    code, out, err = run_main(capsys, *flags, "--out", pooled, "--workers", "1")
    assert code == 0, err
    for name in ("tune.md", "tune.json"):
        assert open(os.path.join(split, name)).read() == open(os.path.join(pooled, name)).read(), name
    search = json.load(open(os.path.join(pooled, "tune.json")))["lsd"]
    runs = search["runs"]
    for run in runs:
        assert run["name"].startswith("lsd_seed100_")
        numbers = json.load(open(os.path.join(split, "runs", run["name"] + ".json")))
        kl = [numbers["score"][k]["KL"] for k in ("1", "2", "4", "8", "16")]
        assert run["KL"] == dict(zip(("1", "2", "4", "8", "16"), kl))
        assert run["score"] == pytest.approx(sum(map(math.log, kl)) / 5, rel=1e-12)
    first = [r["score"] for r in runs[:3]]
    best_lr = (2e-3, 1e-3, 4e-3)[first.index(min(first))]
    assert [r["settings"] for r in runs] == [
        dict(lr=2e-3, off_weight=2.0), dict(lr=1e-3, off_weight=2.0), dict(lr=4e-3, off_weight=2.0),
        dict(lr=best_lr, off_weight=2 / 3)]
    assert search["best"] == min(runs, key=lambda r: r["score"])["settings"] and search["waiting"] == []
    err = refused(capsys, *flags, "--out", split, "--run", runs[0]["name"])
    assert f"{runs[0]['name']} is not a run the search waits for now: --print-runs lists those (0)" in err


def run_in_processes(commands):
    """Several commands side by side, from the repository. -> their results"""
    procs = [subprocess.Popen(c, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=CLI_ENV) for c in commands]
    try:
        return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            p.kill()


@pytest.mark.parametrize("methods, named", [("itm", "itm"), ("fm", "fm"),
                                            ("known", "lsd-value, esd-value"),
                                            ("lsd,meanflow-imagenet", "meanflow-imagenet")])
def test_cli_tune_searches_the_searched_methods_alone(methods, named, capsys, nothing_runs):
    """--tune --method takes the searched methods alone: an alias, a flow model (no off-diagonal
    weight to search), the route ablations (they take their base's winner) and a source's own
    record are refused by name, before anything runs."""
    err = refused(capsys, "--tune", "--method", methods)
    assert "--tune searches lsd, esd, psd-mid, meanflow, sct, scd, shortcut" in err
    assert err.rstrip().endswith(f"not {named} (see --help)")


def test_cli_printed_runs_keep_the_workers_flag_which_run_accepts(tmp_path, capsys):
    """A printed command is the command itself with --run NAME: --workers, harmless for one
    run, stays and is accepted."""
    out = str(tmp_path / "t")
    fm.main(["--tune", "--method", "lsd", "--iters", "5", "--hidden", "8", "--batch", "16",
             "--eval-samples", "500", "--workers", "2", "--out", out, "--print-runs"])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python")]
    assert len(printed) == 3 and all("--workers 2" in line for line in printed)
    assert fm.parse_args(shlex.split(printed[0])[2:]).run.startswith("lsd_seed100_")


def test_the_records_take_the_searchs_winners():
    """Each searched method's defaults are its winner in the committed search (plots/tune), on
    every setting the search moved; the route ablations take their base method's learning rate
    and off-diagonal weight, so that the route stays their one change; the sources' settings
    stay as records of their own (meanflow-imagenet: the search's first meanflow row)."""
    with open(os.path.join(HERE, "plots", "tune", "tune.json")) as f:
        search = json.load(f)
    assert list(search) == list(fm.TUNED)
    for method, walk in search.items():
        assert walk["waiting"] == [] and walk["best"] is not None, method
        cfg = fm.make_config(method)
        for setting, value in walk["best"].items():
            assert cfg[setting] == pytest.approx(value, rel=1e-12) if isinstance(value, float) \
                else cfg[setting] == value, (method, setting)
        scores = [run["score"] for run in walk["runs"]]
        assert min(scores) == next(r["score"] for r in walk["runs"] if r["settings"] == walk["best"])
    for ablation, base in (("lsd-value", "lsd"), ("esd-value", "esd")):
        for setting in ("lr", "off_weight"):
            assert fm.make_config(ablation)[setting] == fm.make_config(base)[setting]
    source = fm.make_config("meanflow-imagenet")
    assert all(source[k] == pytest.approx(v) if isinstance(v, float) else source[k] == v
               for k, v in search["meanflow"]["runs"][0]["settings"].items())


def test_the_readmes_search_table_is_the_committed_searchs():
    """Each row of the README's search table (runs, the source's score, the winner's changes,
    its score and KL at 1 and 16 steps) is read off plots/tune/tune.json."""
    text = open(os.path.join(HERE, "README.md")).read()
    section = text[text.index("## One search for every method"):text.index("## Results on the checkerboard")]
    rows = {m: cells for m, *cells in (re.findall(r"[^|]+", line)
                                       for line in section.splitlines() if line.startswith("| `"))}
    with open(os.path.join(HERE, "plots", "tune", "tune.json")) as f:
        search = json.load(f)
    assert [m.strip(" `") for m in rows] == list(search)
    for (label, cells), (method, walk) in zip(rows.items(), search.items()):
        first = walk["runs"][0]
        best = next(r for r in walk["runs"] if r["settings"] == walk["best"])
        changed = [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                   for k, v in walk["best"].items() if first["settings"][k] != v]
        want = [str(len(walk["runs"])), f"{first['score']:.2f}", ", ".join(changed) or "none",
                f"{best['score']:.2f}", f"{best['KL']['1']:.3f} / {best['KL']['16']:.3f}"]
        assert [c.strip() for c in cells] == want, method


def test_the_readmes_known_tables_are_the_committed_results():
    """Each row of command B in the README's results on both data sets is read off the runs of
    plots/compare_DATA_known/results.json: the mean and sample sd over seeds 0, 1, 2 at each step
    count, the largest late ratio (two decimals below 100, else two digits: 1.5e+11), and the
    mean at 1 and 16 steps of the same record before the search (B0,
    plots/compare_DATA_known_as_published, its methods in the same order)."""
    text = open(os.path.join(HERE, "README.md")).read()
    sections = {"checkerboard": ("## Results on the checkerboard", "## Results on the ring"),
                "ring": ("## Results on the ring", "## Tests")}
    steps = ("1", "2", "4", "8", "16")
    for data, (start, end) in sections.items():
        section = text[text.index(start):text.index(end)]
        rows = [[c.strip() for c in re.findall(r"[^|]+", line)] for line in section.splitlines()
                if line.startswith("| `")]
        rows = [r for r in rows if r[1] == "B"]
        tables = {}
        for kind in ("known", "known_as_published"):
            with open(os.path.join(HERE, "plots", f"compare_{data}_{kind}", "results.json")) as f:
                saved = json.load(f)
            runs = {}
            for run in saved["runs"]:
                runs.setdefault(run["method"], []).append(run)
            tables[kind] = (saved["metric"], runs)
        metric, runs = tables["known"]
        old_metric, old_runs = tables["known_as_published"]
        assert [m.removesuffix("-hybrid") for m in runs] == list(old_runs)     # B0's names for AYF
        assert [r[0].strip("`") for r in rows] == list(runs) == list(fm.KNOWN_METHODS), data
        assert metric == old_metric == ("KL" if data == "checkerboard" else "SW")
        for row, (method, seeds), old in zip(rows, runs.items(), old_runs.values()):
            assert sorted(r["seed"] for r in seeds) == sorted(r["seed"] for r in old) == [0, 1, 2]
            at = lambda rs, k: [r["score"][k][metric] for r in rs]
            want = [f"{statistics.mean(at(seeds, k)):.4f} ± {statistics.stdev(at(seeds, k)):.4f}"
                    for k in steps]
            late = max(r["late_off_ratio"] for r in seeds)
            want.append(f"{late:.2f}" if late < 100 else f"{late:.1e}")
            want.append(f"{statistics.mean(at(old, '1')):.4f} / {statistics.mean(at(old, '16')):.4f}")
            assert row[2:] == want, (data, method)


def test_tune_axes_refuse_a_search_above_its_budget(monkeypatch):
    """TUNE_MAX is a limit, not a coincidence: axes that would take more runs are refused by name."""
    monkeypatch.setattr(fm, "TUNE_MAX", 7)
    with pytest.raises(ValueError, match="the search of meanflow would take 8 runs, above TUNE_MAX = 7"):
        fm.tune_axes("meanflow")
    assert len(fm.tune_axes("lsd")) == 2
