"""Tests for flowmap.py: every gradient against central differences in float64, then the
pieces around them (Adam, data, metric, sampling, training, command line)."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import flowmap as fm

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = dict(hidden=8, depth=2, fourier=3, time_freqs=2)   # small enough to check every entry


# ---------------------------------------------------------------- helpers


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


def random_params(seed=0, **overrides):
    """float64 weights with random non-zero biases, so no check sits at a degenerate point."""
    cfg = fm.make_config("lsd", **dict(SMALL, **overrides))
    rng = np.random.default_rng(seed)
    params = fm.init_params(rng, cfg, dtype=np.float64)
    for k in fm.trainable(params):
        params[k] = params[k] * 1.5 + 0.3 * rng.standard_normal(params[k].shape)
    return params, cfg


def random_batch(method, seed=1, n=12):
    cfg = fm.make_config(method, diag_fraction=0.5)
    return fm.make_batch(np.random.default_rng(seed), n, method, cfg, dtype=np.float64)


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


# ---------------------------------------------------------------- every loss, every parameter


@pytest.mark.parametrize("method", fm.METHODS)
def test_loss_gradient_every_parameter(method):
    params, _ = random_params(seed=6)
    batch = random_batch(method)
    assert np.all(batch["s"] < batch["t"])                  # off the diagonal, not only s = t
    target = None
    if method in fm.TEACHERS:                                # the frozen teacher: a constant here
        pred, _ = fm.predict(params, batch, method)
        target = fm.TEACHERS[method](params, batch, pred)
    loss = lambda: sum(fm.loss_and_grads(params, batch, method, 2.0, target)[0][:1]) + \
        2.0 * fm.loss_and_grads(params, batch, method, 2.0, target)[0][1]
    (_, loss_off), grads = fm.loss_and_grads(params, batch, method, 2.0, target)
    assert (loss_off > 0) == (method != "fm")
    for k in fm.trainable(params):
        assert rel_error(grads[k], numeric_grad(loss, params[k])) < 1e-6, (method, k)


def test_teacher_is_frozen_inside_the_step():
    """Without a target passed in, the teacher uses the current weights, but no gradient
    flows through it: the gradient equals the one with that same target held fixed."""
    params, _ = random_params(seed=7)
    batch = random_batch("lsd")
    pred, _ = fm.predict(params, batch, "lsd")
    target = fm.lsd_target(params, batch, pred)
    g_inside = fm.loss_and_grads(params, batch, "lsd", 1.0)[1]
    g_fixed = fm.loss_and_grads(params, batch, "lsd", 1.0, target)[1]
    for k in g_inside:
        assert np.array_equal(g_inside[k], g_fixed[k])


def test_lsd_target_is_the_diagonal_velocity_at_the_jump():
    params, _ = random_params(seed=8)
    batch = random_batch("lsd")
    pred, _ = fm.predict(params, batch, "lsd")
    X = fm.flow_map(params, batch["x_off"], batch["s"], batch["t"])
    assert np.allclose(fm.lsd_target(params, batch, pred), fm.velocity(params, X, batch["t"]))


def test_psd_target_is_the_two_jump_composition():
    params, _ = random_params(seed=9)
    batch = random_batch("psd-uni")
    x, s, u, t = batch["x_off"], batch["s"], batch["u"], batch["t"]
    two = fm.flow_map(params, fm.flow_map(params, x, s, u), u, t)
    target = fm.psd_target(params, batch, None)
    assert np.allclose(x + (t - s)[:, None] * target, two)


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
    assert fm.jump(model, x1, 0.2, 0.7).shape == (1000, 2)


def test_sample_is_the_composition_of_jumps():
    model = fm.new_model(fm.make_config("lsd", **SMALL))
    x = fm.sample_base(500, np.random.default_rng(5), model["config"]["base_std"])
    for s, t in [(0, 0.5), (0.5, 1.0)]:
        x = fm.jump(model, x, s, t)
    assert np.allclose(fm.sample(model, 500, 2, seed=5), x, atol=1e-6)


# ---------------------------------------------------------------- training


def test_short_training_lowers_losses_and_kl():
    model = fm.train("lsd", log=lambda s: None, iters=600, batch=512, hidden=64, depth=2, seed=0)
    h = model["history"]
    assert h[-100:, 0].mean() < 0.8 * h[:20, 0].mean()       # diagonal
    assert h[-100:, 1].mean() < h[:20, 1].max()               # off-diagonal settles
    untrained = fm.new_model(model["config"])
    x_true = fm.sample_checkerboard(20_000, np.random.default_rng(0))
    kl = lambda m: fm.histogram_kl(x_true, fm.sample(m, 20_000, 2))
    assert kl(model) < 0.6 * kl(untrained)


def test_save_load_roundtrip(tmp_path):
    model = fm.train("psd-mid", log=lambda s: None, iters=5, batch=64, **SMALL)
    path = str(tmp_path / "m.npz")
    fm.save(model, path)
    back = fm.load(path)
    assert back["config"] == model["config"] and back["iter"] == 5
    assert np.array_equal(fm.sample(back, 300, 2), fm.sample(model, 300, 2))


# ---------------------------------------------------------------- command line


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "flowmap.py"), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, words", [
    (["--method", "xyz"], "invalid choice"),
    (["--iters", "0"], "must be positive"),
    (["--iters", "2.5"], "not an integer"),
    (["--lr", "abc"], "not a number"),
    (["--lr", "-1"], "must be positive"),
    (["--bogus"], "unrecognized"),
])
def test_cli_bad_input_is_one_clear_line(args, words):
    r = run_cli(*args)
    assert r.returncode == 2
    assert words in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


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
    good = fm.train("lsd", log=lambda s: None, iters=2, batch=32, **SMALL)
    fm.save(good, str(tmp_path / "good.npz"))
    (tmp_path / "text.npz").write_text("not a zip file")
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    other = fm.train("lsd", log=lambda s: None, iters=2, batch=32, **dict(SMALL, hidden=5))
    other["config"] = good["config"]                        # config says 8 wide, weights are 5
    fm.save(other, str(tmp_path / "shape.npz"))
    return {"not a model": tmp_path / "text.npz", "truncated": tmp_path / "cut.npz",
            "wrong shape": tmp_path / "shape.npz", "missing": tmp_path / "missing.npz"}


def test_load_rejects_bad_files_with_a_clear_error(tmp_path):
    for case, path in bad_model_files(tmp_path).items():
        with pytest.raises(ValueError) as e:
            fm.load(str(path))
        assert str(path) in str(e.value), case


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
    full = fm.train("lsd", log=quiet, **kw)
    path = str(tmp_path / "ck.npz")

    def log(line):                                          # Ctrl-C arrives during step 20
        if line.startswith("iter     20/"):
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        fm.train("lsd", log=log, checkpoint=path, **kw)
    part = fm.load(path)
    assert part["iter"] == 20
    resumed = fm.train(model=part, log=quiet)
    assert resumed["iter"] == 40
    for group in ("params", "ema"):
        for k in fm.trainable(full["params"]):
            assert np.array_equal(resumed[group][k], full[group][k]), (group, k)
    assert np.array_equal(resumed["history"], full["history"])


def test_periodic_checkpoints_are_written_atomically(tmp_path):
    path = tmp_path / "ck.npz"
    fm.train("lsd", log=quiet, checkpoint=str(path), save_every=3, iters=7, batch=32, **SMALL)
    assert fm.load(str(path))["iter"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["ck.npz"]   # no temporary file left behind


def test_divergence_stops_with_a_message_and_keeps_the_checkpoint_finite(tmp_path):
    path = str(tmp_path / "ck.npz")
    with pytest.raises(FloatingPointError) as e:
        fm.train("lsd", log=quiet, checkpoint=path, save_every=1, iters=200, batch=64,
                 lr=1e4, warmup=1, clip=1e30, **SMALL)
    assert "iteration" in str(e.value) and "lower --lr" in str(e.value)
    saved = fm.load(path)
    assert all(np.all(np.isfinite(a)) for a in saved["params"].values())


def test_same_seed_gives_bit_identical_samples():
    a = fm.train("psd-uni", log=quiet, iters=15, batch=64, seed=3, **SMALL)
    b = fm.train("psd-uni", log=quiet, iters=15, batch=64, seed=3, **SMALL)
    assert np.array_equal(fm.sample(a, 2000, 4), fm.sample(b, 2000, 4))


def test_cli_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path):
    ck = str(tmp_path / "ck.npz")
    args = [sys.executable, os.path.join(HERE, "flowmap.py"), "--iters", "100000", "--batch", "64",
            "--hidden", "16", "--depth", "2", "--save", ck, "--out", str(tmp_path / "plots"),
            "--eval-samples", "2000"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:                                # wait until training is under way
        if line.startswith("iter"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and f"--resume {ck}" in out + err
    done = fm.load(ck)["iter"]
    assert 0 < done < 100000
    r = run_cli("--resume", ck, "--iters", str(done + 10), "--out", str(tmp_path / "plots"),
                "--eval-samples", "2000")
    assert r.returncode == 0, r.stderr
    assert fm.load(ck)["iter"] == done + 10
