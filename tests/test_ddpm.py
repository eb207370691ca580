"""patchflow.flow.ddpm: schedule, closed forms, sampling with a Gaussian's exact predictor, learned-variance terms."""
import math

import numpy as np
import pytest
import torch

from patchflow.flow.ddpm import GaussianDiffusion

MU, S = 0.3, 0.5  # toy data x0 ~ N(MU, S^2 I)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors on 2 shared cores: intra-op threading makes these loops ~100x slower under contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base() -> GaussianDiffusion:
    return GaussianDiffusion.linear()


def exact_eps(acp: np.ndarray, seen: list | None = None):
    """E[eps | x_t] for x0 ~ N(MU, S^2 I); the model sees ORIGINAL timesteps, so `acp` is the original schedule's."""
    acp_t = torch.tensor(acp)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype.is_floating_point and t.shape == x.shape[:1]
        if seen is not None:
            seen.append(float(t[0]))
        a = acp_t[t.long()].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S * S + 1 - a)

    return fn


# 1. schedule


def test_linear_schedule(base):
    assert base.num_timesteps == 1000
    assert base.betas[0] == pytest.approx(1e-4, rel=1e-12) and base.betas[-1] == pytest.approx(0.02, rel=1e-12)
    short = GaussianDiffusion.linear(250)
    assert short.betas[0] == pytest.approx(4e-4, rel=1e-12) and short.betas[-1] == pytest.approx(0.08, rel=1e-12)
    acp = base.alphas_cumprod
    assert acp.dtype == np.float64 and np.all(np.diff(acp) < 0) and 0 < acp[-1] < 1e-4 and acp[0] == 1 - 1e-4
    np.testing.assert_allclose(acp, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-12)


def test_respace(base):
    same = base.respace(1000)
    np.testing.assert_allclose(same.betas, base.betas, rtol=1e-9)
    np.testing.assert_array_equal(same.timestep_map, np.arange(1000))

    r = base.respace(250)
    m = r.timestep_map
    assert r.num_timesteps == 250 and m[0] == 0 and m[-1] == 999
    assert list(m[:5]) == [0, 4, 8, 12, 16] and set(np.diff(m)) == {4, 5}  # DiT's 250 of 1000
    np.testing.assert_array_equal(m, np.round(np.arange(250) * 999 / 249))  # no ties: 333k/83 is never k + 1/2
    np.testing.assert_allclose(r.alphas_cumprod, base.alphas_cumprod[m], rtol=1e-12)
    np.testing.assert_array_equal(base.respace("250").timestep_map, m)

    ddim = base.respace("ddim50")
    np.testing.assert_array_equal(ddim.timestep_map, np.arange(0, 1000, 20))
    np.testing.assert_allclose(ddim.alphas_cumprod, base.alphas_cumprod[::20], rtol=1e-12)

    twice = r.respace(50)  # composes: the map still points into the original schedule
    assert set(twice.timestep_map) <= set(m)
    np.testing.assert_allclose(twice.alphas_cumprod, base.alphas_cumprod[twice.timestep_map], rtol=1e-12)


def test_immutable(base):
    with pytest.raises(AttributeError):
        base.num_timesteps = 3
    with pytest.raises(ValueError):
        base.betas[0] = 0.5
    assert base.betas[0] == pytest.approx(1e-4)


# 2. forward process


def test_q_sample_moments(base):
    g = torch.Generator().manual_seed(0)
    n, x0 = 20000, 0.7
    for step in (0, 10, 500, 999):
        t = torch.full((n,), step)
        noise = torch.randn(n, 1, generator=g, dtype=torch.float64)
        xt = base.q_sample(torch.full((n, 1), x0, dtype=torch.float64), t, noise)
        a = base.alphas_cumprod[step]
        se = math.sqrt((1 - a) / n)
        assert abs(xt.mean().item() - math.sqrt(a) * x0) < 4 * se
        assert xt.var().item() == pytest.approx(1 - a, rel=0.05)


# 3. posterior


def test_q_posterior_is_bayes(base):
    g = torch.Generator().manual_seed(1)
    steps = torch.tensor([1, 5, 100, 500, 999])
    x0 = torch.rand(5, 1, generator=g, dtype=torch.float64) * 2 - 1
    xt = torch.randn(5, 1, generator=g, dtype=torch.float64)
    mean, var, log_var = base.q_posterior_mean_variance(x0, xt, steps)
    for i, step in enumerate(steps.tolist()):
        beta = float(np.linspace(1e-4, 0.02, 1000)[step])
        acp_prev = float(np.prod(1 - np.linspace(1e-4, 0.02, 1000)[:step]))
        # prior q(x_{t-1}|x0) = N(sqrt(acp_prev) x0, 1 - acp_prev); q(x_t|x_{t-1}) = N(sqrt(1-beta) x_{t-1}, beta)
        prec = 1 / (1 - acp_prev) + (1 - beta) / beta
        from_x0 = math.sqrt(acp_prev) * x0[i, 0].item() / (1 - acp_prev)
        want_mean = (from_x0 + math.sqrt(1 - beta) * xt[i, 0].item() / beta) / prec
        assert mean[i, 0].item() == pytest.approx(want_mean, rel=1e-9, abs=1e-12)
        assert var[i, 0].item() == pytest.approx(1 / prec, rel=1e-9)
        assert log_var[i, 0].item() == pytest.approx(math.log(1 / prec), rel=1e-9)
    # t = 0: the posterior is the point x0; its log variance is clipped to t = 1's
    t0 = torch.zeros(5, dtype=torch.long)
    mean0, var0, log_var0 = base.q_posterior_mean_variance(x0, xt, t0)
    torch.testing.assert_close(mean0, x0)
    assert torch.all(var0 == 0)
    torch.testing.assert_close(log_var0, torch.full_like(x0, math.log(base.posterior_variance[1])))


def test_clip_denoised_keeps_eps_consistent(base):
    xt, t = torch.tensor([[3.0], [-3.0]], dtype=torch.float64), torch.tensor([10, 10])
    out = base.p_mean_variance(torch.zeros_like(xt), xt, t, clip_denoised=True)
    torch.testing.assert_close(out["pred_x0"], torch.tensor([[1.0], [-1.0]], dtype=torch.float64))
    a = base.alphas_cumprod[10]
    torch.testing.assert_close(math.sqrt(a) * out["pred_x0"] + math.sqrt(1 - a) * out["eps"], xt)


# 4. the exact predictor of a Gaussian data set


def test_mse_equals_irreducible_error(base):
    g = torch.Generator().manual_seed(2)
    n = 20000
    x0 = MU + S * torch.randn(n, 8, generator=g, dtype=torch.float64)
    t = base.sample_timesteps(n, generator=g)
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999 and len(t.unique()) > 900
    losses = base.training_losses(exact_eps(base.alphas_cumprod), x0, t)
    assert set(losses) == {"loss", "mse"} and losses["mse"].shape == (n,)
    a = torch.tensor(base.alphas_cumprod)[t]
    irreducible = a * S * S / (a * S * S + 1 - a)  # Var(eps | x_t) per dim
    assert losses["mse"].mean().item() == pytest.approx(irreducible.mean().item(), rel=0.03)
    torch.testing.assert_close(losses["loss"], losses["mse"])


def sampler_moments(base: GaussianDiffusion, d: GaussianDiffusion, ddim: bool, eta: float) -> tuple[float, float]:
    """Mean and variance the discrete sampler gives for the Gaussian data: every step is affine in x plus noise."""
    m, v = 0.0, 1.0
    for i in reversed(range(d.num_timesteps)):
        a = base.alphas_cumprod[d.timestep_map[i]]
        ap = base.alphas_cumprod[d.timestep_map[i - 1]] if i > 0 else 1.0
        k = math.sqrt(1 - a) / (a * S * S + 1 - a)  # eps = k (x - sqrt(a) MU)
        p, q = (1 - math.sqrt(1 - a) * k) / math.sqrt(a), math.sqrt(1 - a) * k * MU  # x0_hat = p x + q
        if ddim:
            sig = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
            c = math.sqrt(1 - ap - sig * sig)
            gain, shift, noise_var = math.sqrt(ap) * p + c * k, math.sqrt(ap) * q - c * k * math.sqrt(a) * MU, sig * sig
        else:
            beta = 1 - a / ap
            c1, c2 = math.sqrt(ap) * beta / (1 - a), math.sqrt(1 - beta) * (1 - ap) / (1 - a)
            gain, shift, noise_var = c1 * p + c2, c1 * q, beta  # DiT's fixed-large variance
        m, v = gain * m + shift, gain * gain * v + (noise_var if i > 0 else 0.0)
    return m, v


@pytest.mark.parametrize("steps, ddim, eta", [(250, False, 0.0), ("ddim50", True, 0.0), ("ddim50", True, 1.0)])
def test_sampling_recovers_gaussian(base, steps, ddim, eta):
    d = base.respace(steps)
    seen: list[float] = []
    model = exact_eps(base.alphas_cumprod, seen)
    g = torch.Generator().manual_seed(3)
    n = 8000
    if ddim:
        x = d.ddim_sample_loop(model, (n, 2), eta=eta, generator=g)
    else:
        x = d.p_sample_loop(model, (n, 2), generator=g)
    assert x.shape == (n, 2)
    assert seen == [float(s) for s in d.timestep_map[::-1]]  # model called with the original timesteps, T-1 down to 0
    want_m, want_v = sampler_moments(base, d, ddim, eta)
    got_m, got_v = x.mean().item(), x.var().item()
    assert abs(got_m - want_m) < 4 * math.sqrt(want_v / (2 * n))
    assert got_v == pytest.approx(want_v, rel=4 * math.sqrt(2 / (2 * n)))
    # and the sampler is close to the data (DDIM at 50 steps underestimates variance by ~10-20% here)
    assert abs(got_m - MU) < 0.02
    assert got_v == pytest.approx(S * S, rel=0.25 if ddim else 0.05)


def test_ddim_eta0_is_deterministic(base):
    d = base.respace("ddim50")
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(4))
    model = exact_eps(base.alphas_cumprod)
    x1 = d.ddim_sample_loop(model, (16, 2), noise=noise, generator=torch.Generator().manual_seed(5))
    x2 = d.ddim_sample_loop(model, (16, 2), noise=noise, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(x1, x2, rtol=0, atol=0)


def test_last_step_adds_no_noise(base):
    d = base.respace(1)  # a single step, t = 0: the sample is the mean, whatever the generator
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    model = exact_eps(base.alphas_cumprod)
    x1 = d.p_sample_loop(model, (16, 2), noise=noise, generator=torch.Generator().manual_seed(11))
    x2 = d.p_sample_loop(model, (16, 2), noise=noise, generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(x1, x2, rtol=0, atol=0)
    a = 1 - 1e-4
    torch.testing.assert_close(x1, (noise - math.sqrt(1 - a) * model(noise, torch.zeros(16))) / math.sqrt(a))


# 5. learned variance


def learned(eps: torch.Tensor, v: torch.Tensor):
    return lambda x, t: torch.cat([eps, v], dim=1)


def test_vb_zero_at_true_posterior_and_kl_otherwise():
    d = GaussianDiffusion.linear(learn_sigma=True)
    g = torch.Generator().manual_seed(7)
    shape = (6, 3, 4, 4)
    x0 = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 300, 700, 999])
    # exact eps -> exact posterior mean; v = -1 -> log var = the posterior's (clipped) log variance
    at_posterior = d.training_losses(learned(noise, -torch.ones_like(noise)), x0, t, noise)
    assert set(at_posterior) == {"loss", "mse", "vb"}
    torch.testing.assert_close(at_posterior["vb"], torch.zeros(6, dtype=torch.float64), atol=1e-9, rtol=0)
    assert at_posterior["mse"].abs().max() < 1e-20
    # v = +1 -> variance beta_t: KL between two Gaussians with the same mean, in bits
    at_beta = d.training_losses(learned(noise, torch.ones_like(noise)), x0, t, noise)
    post_std = torch.tensor(np.sqrt(d.posterior_variance[t.numpy()]))
    beta_std = torch.tensor(np.sqrt(d.betas[t.numpy()]))
    Normal = torch.distributions.Normal
    want = torch.distributions.kl_divergence(Normal(0.0, post_std), Normal(0.0, beta_std))
    torch.testing.assert_close(at_beta["vb"], want / math.log(2), rtol=1e-6, atol=1e-12)
    assert torch.all(at_beta["vb"][:3] > 1e-3)  # small t: beta_t is ~2x the posterior variance
    torch.testing.assert_close(at_beta["loss"], at_beta["mse"] + at_beta["vb"])
    # anything else: still a KL, so >= 0
    eps, v = torch.randn(shape, generator=g, dtype=torch.float64), torch.rand(shape, generator=g, dtype=torch.float64)
    rand = d.training_losses(learned(eps, v * 2 - 1), x0, t, noise)
    assert torch.all(rand["vb"] > 0) and torch.all(rand["vb"] > at_posterior["vb"])


def test_vb_trains_only_the_variance():
    d = GaussianDiffusion.linear(learn_sigma=True)
    g = torch.Generator().manual_seed(8)
    shape = (4, 2, 3)
    x0 = torch.rand(shape, generator=g) * 2 - 1
    eps = torch.randn(shape, generator=g).requires_grad_()
    v = torch.zeros(shape).requires_grad_()
    losses = d.training_losses(learned(eps, v), x0, torch.tensor([0, 1, 50, 900]))
    g_eps, g_v = torch.autograd.grad(losses["vb"].sum(), [eps, v], allow_unused=True)
    assert g_eps is None or torch.all(g_eps == 0)
    assert g_v is not None and torch.all(g_v.abs().sum(dim=(1, 2)) > 0)  # every sample, t = 0 included
    g_eps, g_v = torch.autograd.grad(losses["mse"].sum(), [eps, v], allow_unused=True)
    assert g_eps is not None and g_eps.abs().sum() > 0
    assert g_v is None or torch.all(g_v == 0)


# 6. decoder at t = 0


def test_decoder_nll_at_t0():
    d = GaussianDiffusion.linear(learn_sigma=True)
    levels = torch.tensor([0, 1, 100, 128, 254, 255], dtype=torch.float64)
    x0 = (levels / 127.5 - 1).reshape(6, 1, 1)  # the 256 levels of 8-bit data in [-1, 1], both ends included
    noise = torch.randn(6, 1, 1, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    delta = torch.tensor([0.5, -0.3, 0.0, 0.4, 0.2, -0.6], dtype=torch.float64).reshape(6, 1, 1)
    t = torch.zeros(6, dtype=torch.long)
    a0 = 1 - 1e-4
    mean = x0 - math.sqrt((1 - a0) / a0) * delta  # at t = 0 the mean is the predicted x0
    betas = np.linspace(1e-4, 0.02, 1000)
    var_by_v = {-1.0: betas[1] * (1 - a0) / (1 - a0 * (1 - betas[1])), 1.0: betas[0]}  # posterior var at t=1, beta_0
    for v, var in var_by_v.items():
        vb = d.training_losses(learned(noise + delta, torch.full_like(x0, v)), x0, t, noise)["vb"]
        normal = torch.distributions.Normal(mean, math.sqrt(var))
        upper = torch.where(x0 > 0.999, torch.ones_like(x0), normal.cdf(x0 + 1 / 255))
        lower = torch.where(x0 < -0.999, torch.zeros_like(x0), normal.cdf(x0 - 1 / 255))
        want = -torch.log(upper - lower).flatten() / math.log(2)
        assert torch.isfinite(vb).all()
        torch.testing.assert_close(vb, want, rtol=2e-3, atol=1e-4)
    # a mean far off the data: probability underflows, the NLL stays finite
    inwards = noise + 50.0 * x0.sign()  # moves the mean 0.5 towards 0, ~60 sigma off each x0
    far = d.training_losses(learned(inwards, torch.zeros_like(x0)), x0, t, noise)["vb"]
    assert torch.isfinite(far).all() and torch.all(far > 30)


# 7. errors


def test_errors(base):
    with pytest.raises(ValueError, match="1001"):
        base.respace(1001)
    with pytest.raises(ValueError, match="0"):
        base.respace(0)
    with pytest.raises(ValueError, match="251"):
        base.respace(250).respace(251)
    with pytest.raises(ValueError, match="ddim999"):
        base.respace("ddim999")  # no integer stride gives 999 of 1000
    with pytest.raises(ValueError, match="ddim0"):
        base.respace("ddim0")
    with pytest.raises(ValueError, match="fifty"):
        base.respace("fifty")
    with pytest.raises(ValueError, match="channels"):
        x = torch.zeros(2, 3)
        GaussianDiffusion.linear(learn_sigma=True).p_mean_variance(x, x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(np.array([0.1, 0.0]))
