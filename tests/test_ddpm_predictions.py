"""patchflow.flow.ddpm's prediction types (eps, v, x0) and cosine schedule: closed forms, and diffusers' schedulers."""
import math

import numpy as np
import pytest
import torch

from patchflow.config import FlowConfig
from patchflow.flow.ddpm import PREDICTIONS, SCHEDULES, GaussianDiffusion
from patchflow.flow.objective import DiffusionObjective

MU, S = 0.3, 0.5  # toy data x0 ~ N(MU, S^2 I)
COMBOS = [(p, s) for s in SCHEDULES for p in PREDICTIONS]
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors on 2 shared cores: intra-op threading makes these loops much slower under contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(prediction: str, schedule: str, T: int = 1000, learn_sigma: bool = False) -> GaussianDiffusion:
    return getattr(GaussianDiffusion, schedule)(T, learn_sigma=learn_sigma, prediction=prediction)


def bcast(a, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) in x's dtype."""
    a = torch.as_tensor(a, dtype=x.dtype)
    return a.reshape(-1, *([1] * (x.dim() - 1)))


def as_prediction(prediction: str, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The model output for (x0, eps) at acp = a (broadcast), written out from the definitions."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def exact_model(d: GaussianDiffusion, seen: list | None = None):
    """E[prediction | x_t] for x0 ~ N(MU, S^2 I); `d` is the ORIGINAL schedule (the model sees original timesteps)."""
    acp = torch.tensor(d.alphas_cumprod)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype.is_floating_point and t.shape == x.shape[:1]
        if seen is not None:
            seen.append(float(t[0]))
        a = bcast(acp[t.long()], x)
        centred, var = x - a.sqrt() * MU, a * S * S + 1 - a
        eps = (1 - a).sqrt() * centred / var
        x0 = MU + a.sqrt() * S * S * centred / var
        return as_prediction(d.prediction, x0, eps, a)

    return fn


# 1. schedules


@pytest.mark.parametrize("T", [1000, 50])
def test_cosine_schedule(T):
    d = GaussianDiffusion.cosine(T)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert d.betas.dtype == np.float64 and d.num_timesteps == T and d.prediction == "eps"
    assert np.all(d.betas > 0) and d.betas.max() == 0.999 and d.betas[-1] == 0.999  # only the last one is capped
    assert np.all(np.diff(d.betas) > 0)
    for t in (0, 1, T // 2, T - 2):  # below the cap, acp is the formula's, normalised by acp(0)
        assert d.alphas_cumprod[t] == pytest.approx(f((t + 1) / T) / f(0), rel=1e-12)
    assert d.alphas_cumprod[-1] == pytest.approx(d.alphas_cumprod[-2] * 0.001, rel=1e-12)  # not 0: x_T keeps a trace


@pytest.mark.parametrize("T", [1000, 50])
def test_cosine_betas_equal_diffusers(T):
    from diffusers import DDPMScheduler

    theirs = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").betas
    assert theirs.dtype == torch.float32
    np.testing.assert_allclose(GaussianDiffusion.cosine(T).betas, theirs.double().numpy(), rtol=2e-7, atol=0)


def test_prediction_is_kept_and_built_from_config():
    d = GaussianDiffusion.cosine(500, learn_sigma=True, prediction="v")
    assert (d.prediction, d.learn_sigma) == ("v", True) and "prediction='v'" in repr(d)
    for steps in (50, "ddim10"):
        r = d.respace(steps)
        assert (r.prediction, r.learn_sigma) == ("v", True)
    assert GaussianDiffusion.linear().prediction == "eps"
    assert GaussianDiffusion.linear(prediction="x0").prediction == "x0"

    cfg = FlowConfig(objective="ddpm", prediction="x0", schedule="cosine", num_timesteps=500)
    built = GaussianDiffusion.from_config(cfg, learn_sigma=True)
    assert (built.prediction, built.learn_sigma, built.num_timesteps) == ("x0", True, 500)
    np.testing.assert_array_equal(built.betas, GaussianDiffusion.cosine(500).betas)
    obj = DiffusionObjective(cfg, learn_sigma=False).diffusion
    assert (obj.prediction, obj.learn_sigma) == ("x0", False)
    np.testing.assert_array_equal(obj.betas, GaussianDiffusion.cosine(500).betas)
    default = DiffusionObjective(FlowConfig(objective="ddpm"), learn_sigma=True).diffusion
    assert default.prediction == "eps"
    np.testing.assert_array_equal(default.betas, GaussianDiffusion.linear().betas)

    with pytest.raises(ValueError, match="prediction 'noise'"):
        GaussianDiffusion.linear(prediction="noise")


# 2. conversions


@pytest.mark.parametrize("prediction, schedule", COMBOS)
def test_conversions_round_trip(prediction, schedule):
    d = make(prediction, schedule)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    x0 = torch.rand(6, 3, 2, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(6, 3, 2, generator=g, dtype=torch.float64)
    a = bcast(d.alphas_cumprod[t.numpy()], x0)
    xt = d.q_sample(x0, t, eps)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-12, atol=1e-12)
    pred = d.prediction_target(x0, eps, t)
    torch.testing.assert_close(pred, as_prediction(prediction, x0, eps, a), rtol=1e-12, atol=1e-12)
    back_x0, back_eps = d.x0_eps(pred, xt, t)
    torch.testing.assert_close(back_x0, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(back_eps, eps, rtol=1e-9, atol=1e-9)
    # and through every other prediction: eps -> x0 -> v -> eps ...
    for other in PREDICTIONS:
        o = make(other, schedule)
        there = o.prediction_target(*d.x0_eps(pred, xt, t), t)
        torch.testing.assert_close(there, as_prediction(other, x0, eps, a), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(d.prediction_target(*o.x0_eps(there, xt, t), t), pred, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction, schedule", COMBOS)
def test_point_mass_gives_the_exact_posterior(prediction, schedule):
    """Data = the point c: the optimal prediction is exact, so p's mean is q(x_{t-1} | x_t, c)'s, by Bayes."""
    d = make(prediction, schedule)
    g = torch.Generator().manual_seed(1)
    steps = [0, 1, 5, 100, 500, 998, 999]
    c = torch.rand(len(steps), 4, generator=g, dtype=torch.float64) * 2 - 1
    xt = torch.randn(len(steps), 4, generator=g, dtype=torch.float64)
    t = torch.tensor(steps)
    a = bcast(d.alphas_cumprod[steps], xt)
    eps = (xt - a.sqrt() * c) / (1 - a).sqrt()
    out = d.p_mean_variance(as_prediction(prediction, c, eps, a), xt, t)
    torch.testing.assert_close(out["pred_x0"], c, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out["eps"], eps, rtol=1e-9, atol=1e-9)
    for i, step in enumerate(steps):
        beta = d.betas[step]
        acp_prev = float(np.prod(1 - d.betas[:step]))
        if step == 0:
            want = c[i]  # the posterior at t = 0 is the point x0
        else:  # prior q(x_{t-1}|c) = N(sqrt(acp_prev) c, 1 - acp_prev); q(x_t|x_{t-1}) = N(sqrt(1-beta) x_{t-1}, beta)
            prec = 1 / (1 - acp_prev) + (1 - beta) / beta
            want = (math.sqrt(acp_prev) * c[i] / (1 - acp_prev) + math.sqrt(1 - beta) * xt[i] / beta) / prec
        torch.testing.assert_close(out["mean"][i], want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("prediction, schedule", COMBOS)
def test_clip_denoised_keeps_eps_consistent(prediction, schedule):
    d = make(prediction, schedule)
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([0, 10, 500, 999])
    xt = 3 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    out = d.p_mean_variance(3 * torch.randn(4, 5, generator=g, dtype=torch.float64), xt, t, clip_denoised=True)
    assert out["pred_x0"].abs().max() <= 1 and (out["pred_x0"].abs() == 1).any()
    a = bcast(d.alphas_cumprod[t.numpy()], xt)
    torch.testing.assert_close(a.sqrt() * out["pred_x0"] + (1 - a).sqrt() * out["eps"], xt, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out["mean"], d.q_posterior_mean_variance(out["pred_x0"], xt, t)[0])


# 3. training loss


def test_v_loss_values():
    d = GaussianDiffusion.linear(prediction="v")
    t = torch.tensor([0, 500, 999])
    acp = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[[0, 500, 999]]
    assert acp == pytest.approx([0.9999, 0.0777967, 4.03583e-5], rel=1e-5)
    x0, noise = torch.ones(3, 2, 2, dtype=torch.float64), torch.ones(3, 2, 2, dtype=torch.float64)
    zero = d.training_losses(lambda x, s: torch.zeros_like(x), x0, t, noise)
    # v = sqrt(a) - sqrt(1 - a), so mse = (sqrt(a) - sqrt(1 - a))^2 = 1 - 2 sqrt(a (1 - a))
    want = 1 - 2 * np.sqrt(acp * (1 - acp))
    torch.testing.assert_close(zero["mse"], torch.tensor(want), rtol=1e-12, atol=0)
    assert zero["mse"].tolist() == pytest.approx([0.980001, 0.464297, 0.987295], abs=1e-6)
    torch.testing.assert_close(zero["loss"], zero["mse"])
    # noise -1 on half of each sample, a constant 0.5 output: the mean of the two squared errors
    noise[:, 1] = -1
    half = d.training_losses(lambda x, s: torch.full_like(x, 0.5), x0, t, noise)
    sa, sb = np.sqrt(acp), np.sqrt(1 - acp)
    want = ((sa - sb - 0.5) ** 2 + (-sa - sb - 0.5) ** 2) / 2
    torch.testing.assert_close(half["mse"], torch.tensor(want), rtol=1e-12, atol=0)
    # with learn_sigma only the first C channels are the v prediction
    ls = GaussianDiffusion.linear(learn_sigma=True, prediction="v")
    out = ls.training_losses(lambda x, s: torch.cat([torch.full_like(x, 0.5), torch.zeros_like(x)], 1), x0, t, noise)
    torch.testing.assert_close(out["mse"], half["mse"])


@pytest.mark.parametrize("prediction, schedule", COMBOS)
def test_mse_equals_irreducible_error(prediction, schedule):
    d = make(prediction, schedule)
    g = torch.Generator().manual_seed(3)
    n = 20000
    x0 = MU + S * torch.randn(n, 8, generator=g, dtype=torch.float64)
    t = d.sample_timesteps(n, generator=g)
    noise = torch.randn(n, 8, generator=g, dtype=torch.float64)  # both models see the same draw
    losses = d.training_losses(exact_model(d), x0, t, noise)
    a = torch.tensor(d.alphas_cumprod)[t]
    var_x0 = S * S * (1 - a) / (a * S * S + 1 - a)  # Var(x0 | x_t) per dim
    # eps = (x_t - sqrt(a) x0) / sqrt(1 - a) and v = (sqrt(a) x_t - x0) / sqrt(1 - a) given x_t
    irreducible = {"x0": var_x0, "eps": a * var_x0 / (1 - a), "v": var_x0 / (1 - a)}[prediction]
    assert losses["mse"].mean().item() == pytest.approx(irreducible.mean().item(), rel=0.03)
    # a worse model does worse
    worse = d.training_losses(lambda x, s: 1.1 * exact_model(d)(x, s), x0, t, noise)
    assert worse["mse"].mean() > losses["mse"].mean()


# 4. sampling with the exact predictor of a Gaussian data set


def sampler_moments(base: GaussianDiffusion, d: GaussianDiffusion, ddim: bool, eta: float) -> tuple[float, float]:
    """Mean and variance the discrete sampler gives for the Gaussian data: every step is affine in x plus noise."""
    m, v = 0.0, 1.0
    for i in reversed(range(d.num_timesteps)):
        a = base.alphas_cumprod[d.timestep_map[i]]
        ap = base.alphas_cumprod[d.timestep_map[i - 1]] if i > 0 else 1.0
        var = a * S * S + 1 - a
        k = math.sqrt(1 - a) / var  # eps = k (x - sqrt(a) MU)
        p, q = math.sqrt(a) * S * S / var, (1 - a) * MU / var  # x0_hat = p x + q
        if ddim:
            sig = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
            c = math.sqrt(max(1 - ap - sig * sig, 0.0))
            gain, shift, noise_var = math.sqrt(ap) * p + c * k, math.sqrt(ap) * q - c * k * math.sqrt(a) * MU, sig * sig
        else:
            beta = 1 - a / ap
            c1, c2 = math.sqrt(ap) * beta / (1 - a), math.sqrt(1 - beta) * (1 - ap) / (1 - a)
            gain, shift, noise_var = c1 * p + c2, c1 * q, beta  # DiT's fixed-large variance
        m, v = gain * m + shift, gain * gain * v + (noise_var if i > 0 else 0.0)
    return m, v


@pytest.mark.parametrize("steps, ddim, eta", [(250, False, 0.0), ("ddim50", True, 0.0), ("ddim50", True, 1.0)])
@pytest.mark.parametrize("prediction, schedule", COMBOS)
def test_sampling_recovers_gaussian(prediction, schedule, steps, ddim, eta):
    base = make(prediction, schedule)
    d = base.respace(steps)
    seen: list[float] = []
    model = exact_model(base, seen)
    g = torch.Generator().manual_seed(4)
    n = 8000
    if ddim:
        x = d.ddim_sample_loop(model, (n, 2), eta=eta, generator=g)
    else:
        x = d.p_sample_loop(model, (n, 2), generator=g)
    assert x.shape == (n, 2) and torch.isfinite(x).all()
    assert seen == [float(s) for s in d.timestep_map[::-1]]
    want_m, want_v = sampler_moments(base, d, ddim, eta)
    got_m, got_v = x.mean().item(), x.var().item()
    assert abs(got_m - want_m) < 4 * math.sqrt(want_v / (2 * n))
    assert got_v == pytest.approx(want_v, rel=4 * math.sqrt(2 / (2 * n)))
    assert abs(got_m - MU) < 0.02
    assert got_v == pytest.approx(S * S, rel=0.25 if ddim else 0.05)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_prediction_samples_the_same(schedule):
    """The exact eps, v and x0 models are one model: same noise in, the same samples out, from both samplers."""
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    runs = {}
    for prediction in PREDICTIONS:
        base = make(prediction, schedule)
        model = exact_model(base)
        runs[prediction] = (
            base.respace(100).p_sample_loop(model, noise.shape, noise=noise,
                                            generator=torch.Generator().manual_seed(6)),
            base.respace("ddim25").ddim_sample_loop(model, noise.shape, noise=noise),
        )
    for prediction in ("v", "x0"):
        for got, want in zip(runs[prediction], runs["eps"]):
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)


# 5. learned variance


def learned(pred: torch.Tensor, u: torch.Tensor):
    return lambda x, t: torch.cat([pred, u], dim=1)


@pytest.mark.parametrize("prediction, schedule", COMBOS)
def test_vb_zero_at_true_posterior_and_kl_otherwise(prediction, schedule):
    d = make(prediction, schedule, learn_sigma=True)
    g = torch.Generator().manual_seed(7)
    shape = (6, 3, 4, 4)
    x0 = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 300, 700, 999])
    exact = as_prediction(prediction, x0, noise, bcast(d.alphas_cumprod[t.numpy()], x0))
    # exact prediction -> exact posterior mean; u = -1 -> log var = the posterior's (clipped) log variance
    at_posterior = d.training_losses(learned(exact, -torch.ones_like(noise)), x0, t, noise)
    assert set(at_posterior) == {"loss", "mse", "vb"}
    torch.testing.assert_close(at_posterior["vb"], torch.zeros(6, dtype=torch.float64), atol=1e-9, rtol=0)
    assert at_posterior["mse"].abs().max() < 1e-20
    # u = +1 -> variance beta_t: KL between two Gaussians with the same mean, in bits
    at_beta = d.training_losses(learned(exact, torch.ones_like(noise)), x0, t, noise)
    Normal = torch.distributions.Normal
    post_std = torch.tensor(np.sqrt(d.posterior_variance[t.numpy()]))
    beta_std = torch.tensor(np.sqrt(d.betas[t.numpy()]))
    want = torch.distributions.kl_divergence(Normal(0.0, post_std), Normal(0.0, beta_std)) / math.log(2)
    torch.testing.assert_close(at_beta["vb"], want, rtol=1e-6, atol=1e-9)
    assert torch.all(at_beta["vb"][:3] > 1e-3)
    torch.testing.assert_close(at_beta["loss"], at_beta["mse"] + at_beta["vb"])
    rand = d.training_losses(learned(torch.randn(shape, generator=g, dtype=torch.float64),
                                     torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1), x0, t, noise)
    assert torch.all(rand["vb"] > 0) and torch.all(rand["vb"] > at_posterior["vb"])


@pytest.mark.parametrize("prediction, schedule", [("v", "linear"), ("x0", "linear"), ("v", "cosine"), ("x0", "cosine")])
def test_vb_matches_eps_for_the_same_mean(prediction, schedule):
    """Any output, t = 0 (the decoder) included: vb of a v / x0 model = vb of the eps model with the same x0."""
    d, ref = make(prediction, schedule, learn_sigma=True), make("eps", schedule, learn_sigma=True)
    g = torch.Generator().manual_seed(8)
    shape = (6, 2, 3, 3)
    x0 = torch.randint(0, 256, shape, generator=g).double() / 127.5 - 1  # 8-bit levels: the decoder's bins
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 0, 1, 20, 600, 999])
    xt = d.q_sample(x0, t, noise)
    eps_out = noise + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    u = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    converted = d.prediction_target(*ref.x0_eps(eps_out, xt, t), t)
    want = ref.training_losses(learned(eps_out, u), x0, t, noise)["vb"]
    got = d.training_losses(learned(converted, u), x0, t, noise)["vb"]
    assert torch.all(want > 0)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_vb_trains_only_the_variance(prediction):
    d = GaussianDiffusion.cosine(learn_sigma=True, prediction=prediction)
    g = torch.Generator().manual_seed(9)
    shape = (4, 2, 3)
    x0, noise = torch.rand(shape, generator=g) * 2 - 1, torch.randn(shape, generator=g)
    t = torch.tensor([0, 1, 50, 900])
    # near the target: a far-off x0 at t = 0 puts x0 in a tail where the decoder's probability is clamped (no gradient)
    pred = (d.prediction_target(x0, noise, t) + 0.1 * torch.randn(shape, generator=g)).requires_grad_()
    u = torch.zeros(shape).requires_grad_()
    losses = d.training_losses(learned(pred, u), x0, t, noise)
    g_pred, g_u = torch.autograd.grad(losses["vb"].sum(), [pred, u], allow_unused=True)
    assert g_pred is None or torch.all(g_pred == 0)
    assert g_u is not None and torch.all(g_u.abs().sum(dim=(1, 2)) > 0)
    g_pred, g_u = torch.autograd.grad(losses["mse"].sum(), [pred, u], allow_unused=True)
    assert g_pred is not None and g_pred.abs().sum() > 0
    assert g_u is None or torch.all(g_u == 0)


# 6. against diffusers' schedulers


def toy_model(x: torch.Tensor, t) -> torch.Tensor:
    """Some smooth, t-dependent model output, the same whoever calls it."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.8 * torch.tanh(x) - 0.3 * x.flip(1) + 0.2 * torch.cos(t / 170.0)


def diffusers_scheduler(cls, d: GaussianDiffusion, schedule: str, **kwargs):
    """diffusers' `cls` scheduler for `d`'s schedule and prediction, with `d`'s float64 alphas_cumprod swapped in.

    Its own float32 ones agree to float32 precision, which is not enough to compare the steps: 1 - acp_t cancels at
    small t, so float32 moves x0's coefficient in the posterior mean by ~1e-4 there."""
    beta_schedule = {"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule]
    sched = cls(num_train_timesteps=d.num_timesteps, beta_schedule=beta_schedule, beta_start=1e-4, beta_end=0.02,
                prediction_type=DIFFUSERS_PREDICTION[d.prediction], clip_sample=False, **kwargs)
    np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), d.alphas_cumprod, rtol=2e-5, atol=0)
    sched.alphas_cumprod = torch.tensor(d.alphas_cumprod)
    return sched


@pytest.mark.parametrize("prediction, schedule", COMBOS)
def test_one_step_equals_diffusers_ddpm(prediction, schedule):
    from diffusers import DDPMScheduler

    d = make(prediction, schedule)
    sched = diffusers_scheduler(DDPMScheduler, d, schedule, variance_type="fixed_small")
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    for step in (999, 998, 700, 250, 37, 1, 0):
        out_t = toy_model(x, float(step))
        ours = d.p_mean_variance(out_t, x, torch.tensor([step]))
        theirs = sched.step(out_t, step, x, generator=torch.Generator().manual_seed(step))
        # fixed_small adds sqrt(posterior variance) * N(0, I) from the generator for t > 0: take it off again
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(step), dtype=x.dtype)
        their_mean = theirs.prev_sample - (math.sqrt(d.posterior_variance[step]) * z if step > 0 else 0.0)
        torch.testing.assert_close(ours["pred_x0"], theirs.pred_original_sample, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours["mean"], their_mean, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction, schedule", COMBOS)
def test_sampling_loops_equal_diffusers(prediction, schedule):
    """50 respaced steps: DDIM (eta 0) against DDIMScheduler, ancestral against DDPMScheduler's fixed_large."""
    from diffusers import DDIMScheduler, DDPMScheduler

    base = make(prediction, schedule)
    d = base.respace("ddim50")
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)

    ddim = diffusers_scheduler(DDIMScheduler, base, schedule)
    ddim.set_timesteps(50)
    np.testing.assert_array_equal(ddim.timesteps.numpy(), d.timestep_map[::-1])
    x = noise
    for t in ddim.timesteps:
        x = ddim.step(toy_model(x, float(t)), t, x, eta=0.0).prev_sample
    ours = d.ddim_sample_loop(toy_model, noise.shape, noise=noise)
    torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)

    ddpm = diffusers_scheduler(DDPMScheduler, base, schedule, variance_type="fixed_large")
    ddpm.set_timesteps(50)
    np.testing.assert_array_equal(ddpm.timesteps.numpy(), d.timestep_map[::-1])
    x, g = noise, torch.Generator().manual_seed(12)
    for t in ddpm.timesteps:
        x = ddpm.step(toy_model(x, float(t)), t, x, generator=g).prev_sample
    ours = d.p_sample_loop(toy_model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)
