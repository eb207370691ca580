"""Gaussian diffusion (DDPM) as DiT uses it: Ho et al. 2020 plus Nichol & Dhariwal 2021's learned variance.

Shapes: B = batch, C = channels (dim 1), `...` = any number of trailing dims.

- `model_fn(x, t)` gets x (B, C, ...) and t float32 (B,) of ORIGINAL timestep indices (`timestep_map`), and returns
  its prediction (B, C, ...), or with `learn_sigma` (B, 2C, ...): the prediction, then u in [-1, 1] that sets
  log_var = frac * log(beta_t) + (1 - frac) * log(posterior_var_t) with frac = (u + 1) / 2.
- The prediction is `prediction` of x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) eps: "eps" (DiT), "x0", or "v" =
  sqrt(acp_t) eps - sqrt(1 - acp_t) x0 (Salimans & Ho 2022). Everything downstream goes through (pred_x0, eps).
- Schedules: "linear" (DiT) and "cosine" (Nichol & Dhariwal 2021).
- Schedule arrays are float64 numpy (read-only), gathered into x's dtype/device when used.
- Without `learn_sigma` the reverse variance is DiT's "fixed large" one: beta_t (posterior_var_1 at t = 0).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

ModelFn = Callable[[Tensor, Tensor], Tensor]
PREDICTIONS = ("eps", "v", "x0")  # what the model's first C channels predict
SCHEDULES = ("linear", "cosine")


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise in nats; arguments broadcast."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) by the tanh approximation, as the improved-DDPM decoder uses (cheap and differentiable)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) elementwise, for x in [-1, 1] on 256 levels (bins of width 2/255) under N(mean, e^(2 log_scale)).

    The two end bins take the whole tails. Arguments broadcast; result has their broadcast shape.
    """
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))  # clamp: log(0) when the bin is far in a tail
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: Tensor) -> Tensor:
    """(B, ...) -> (B,) mean over all non-batch dims."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _gather(a: np.ndarray, t: Tensor, x: Tensor) -> Tensor:
    """a[t] in x's dtype/device, shaped (B, 1, ..., 1) to broadcast against x (B, ...)."""
    out = torch.tensor(a, dtype=x.dtype).to(x.device)[t]  # cast on cpu first: some devices lack float64
    return out.reshape(out.shape + (1,) * (x.dim() - 1))


def _parse_count(text: str, original: int | str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"cannot respace to {original!r}: expected an int, a digit string or 'ddimN'") from None


def spaced_indices(num_timesteps: int, steps: int | str) -> np.ndarray:
    """Sorted int64 (steps,) indices of a `num_timesteps` schedule to keep, as DiT's `space_timesteps` (one section).

    `steps` is a count N (int or digit string): N indices evenly spaced from 0 to T-1, both ends included; or
    "ddimN": every k-th index from 0 with the integer stride k that gives exactly N.
    """
    T = num_timesteps
    ddim = isinstance(steps, str) and steps.strip().startswith("ddim")
    if isinstance(steps, str):
        n = _parse_count(steps.strip()[4:] if ddim else steps.strip(), steps)
    elif isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        n = int(steps)
    else:
        raise TypeError(f"steps must be an int or a str, got {type(steps).__name__}")
    if not 1 <= n <= T:
        raise ValueError(f"cannot respace to {steps!r}: the count must be between 1 and {T} (the schedule's length)")
    if ddim:
        for stride in range(1, T + 1):
            if len(range(0, T, stride)) == n:
                return np.arange(0, T, stride, dtype=np.int64)
        raise ValueError(f"cannot respace to {steps!r}: no integer stride takes exactly {n} of {T} timesteps")
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    stride, cur, taken = (T - 1) / (n - 1), 0.0, []
    for _ in range(n):
        taken.append(round(cur))  # accumulate and round like DiT, so the kept timesteps are exactly DiT's
        cur += stride
    return np.asarray(taken, dtype=np.int64)


class GaussianDiffusion:
    """A discrete Gaussian diffusion over `num_timesteps` steps; immutable after construction.

    betas: float (T,) in (0, 1]. timestep_map: int (T,) index -> ORIGINAL timestep passed to the model
    (identity unless the schedule was respaced). Every schedule array below is float64 (T,), read-only.
    """

    num_timesteps: int
    learn_sigma: bool
    prediction: str  # one of PREDICTIONS: what the model's first C channels are
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    posterior_variance: np.ndarray  # 0 at t = 0
    posterior_log_variance_clipped: np.ndarray  # log posterior_variance, with t = 1's value at t = 0
    timestep_map: np.ndarray  # int64

    def __init__(self, betas: np.ndarray, learn_sigma: bool = False, timestep_map: np.ndarray | None = None,
                 prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas <= 1)):
            raise ValueError(f"betas must lie in (0, 1], got min {betas.min()} max {betas.max()}")
        T = betas.size
        tmap = np.arange(T, dtype=np.int64) if timestep_map is None else np.array(timestep_map, dtype=np.int64)
        if tmap.shape != (T,):
            raise ValueError(f"timestep_map must have shape ({T},), got {tmap.shape}")

        acp = np.cumprod(1.0 - betas)
        acp_prev = np.append(1.0, acp[:-1])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        var_1 = post_var[1] if T > 1 else betas[0]  # posterior var is 0 at t=0: borrow t=1's, as the papers do
        arrays = dict(
            betas=betas,
            alphas_cumprod=acp,
            alphas_cumprod_prev=acp_prev,
            sqrt_alphas_cumprod=np.sqrt(acp),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - acp),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / acp),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / acp - 1.0),
            posterior_variance=post_var,
            posterior_log_variance_clipped=np.log(np.append(var_1, post_var[1:])),
            posterior_mean_coef1=betas * np.sqrt(acp_prev) / (1.0 - acp),
            posterior_mean_coef2=(1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp),
            log_betas=np.log(betas),
            fixed_log_variance=np.log(np.append(var_1, betas[1:])),  # DiT's "fixed large"
            timestep_map=tmap,
        )
        for name, a in arrays.items():
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        object.__setattr__(self, "num_timesteps", T)
        object.__setattr__(self, "learn_sigma", bool(learn_sigma))
        object.__setattr__(self, "prediction", prediction)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"GaussianDiffusion is immutable (tried to set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"GaussianDiffusion is immutable (tried to delete {name!r})")

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(num_timesteps={self.num_timesteps}, learn_sigma={self.learn_sigma}, "
                f"prediction={self.prediction!r})")

    @classmethod
    def linear(cls, num_timesteps: int = 1000, learn_sigma: bool = False, prediction: str = "eps") -> GaussianDiffusion:
        """DiT's linear schedule: betas = linspace(1e-4 * 1000/T, 0.02 * 1000/T, T) (scaled so any T matches T=1000)."""
        scale = 1000.0 / num_timesteps
        betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
        return cls(betas, learn_sigma, prediction=prediction)

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, learn_sigma: bool = False, prediction: str = "eps") -> GaussianDiffusion:
        """Nichol & Dhariwal's cosine schedule: acp(u) = cos((u + s) / (1 + s) * pi / 2)^2 at u = t / T, s = 0.008.

        beta_t = 1 - acp((t + 1) / T) / acp(t / T), capped at 0.999 (the last one would be 1: x_T carries no signal).
        """
        s = 0.008  # keeps beta_0 from vanishing, so the first step still adds noise worth predicting
        u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        acp = np.cos((u + s) / (1.0 + s) * (math.pi / 2)) ** 2
        betas = np.minimum(1.0 - acp[1:] / acp[:-1], 0.999)
        return cls(betas, learn_sigma, prediction=prediction)

    @classmethod
    def from_config(cls, cfg, learn_sigma: bool = False) -> GaussianDiffusion:
        """From a `patchflow.config.FlowConfig` (its schedule, num_timesteps and prediction)."""
        build = {"linear": cls.linear, "cosine": cls.cosine}.get(cfg.schedule)
        if build is None:
            raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        return build(cfg.num_timesteps, learn_sigma=learn_sigma, prediction=cfg.prediction)

    def respace(self, steps: int | str) -> GaussianDiffusion:
        """A diffusion over `steps` evenly spaced timesteps of this one (see `spaced_indices`: 250, "250", "ddim50").

        New betas keep alphas_cumprod at the kept steps: beta_i = 1 - acp[k_i] / acp[k_{i-1}]; timestep_map composes,
        so the model still sees the original indices.
        """
        keep = spaced_indices(self.num_timesteps, steps)
        acp = self.alphas_cumprod[keep]
        betas = 1.0 - acp / np.append(1.0, acp[:-1])
        return GaussianDiffusion(betas, self.learn_sigma, self.timestep_map[keep], prediction=self.prediction)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Uniform int64 (batch,) in 0..T-1."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """int (B,) indices -> float32 (B,) original timesteps for the model (float32: bf16 can't hold 999)."""
        return torch.tensor(self.timestep_map, device=t.device)[t].float()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(acp_t) x0, (1 - acp_t) I). x0, noise: (B, ...); t: int (B,) -> (B, ...)."""
        noise = torch.randn_like(x0) if noise is None else noise
        a, b = _gather(self.sqrt_alphas_cumprod, t, x0), _gather(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return a * x0 + b * noise

    def q_posterior_mean_variance(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x_0): mean, variance and clipped log variance, each (B, ...) like x0."""
        mean = _gather(self.posterior_mean_coef1, t, xt) * x0 + _gather(self.posterior_mean_coef2, t, xt) * xt
        var = _gather(self.posterior_variance, t, xt).expand_as(xt)
        log_var = _gather(self.posterior_log_variance_clipped, t, xt).expand_as(xt)
        return mean, var, log_var

    def prediction_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What a perfect model outputs for x_t = q_sample(x0, t, noise): eps, v or x0 (B, C, ...); t int (B,)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a, b = _gather(self.sqrt_alphas_cumprod, t, x0), _gather(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return a * noise - b * x0

    def x0_eps(self, pred: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """A prediction (B, C, ...) at x_t (B, C, ...), t int (B,) -> (pred_x0, eps), each (B, C, ...), with
        x_t = sqrt(acp_t) pred_x0 + sqrt(1 - acp_t) eps."""
        if self.prediction == "v":
            a, b = _gather(self.sqrt_alphas_cumprod, t, xt), _gather(self.sqrt_one_minus_alphas_cumprod, t, xt)
            return a * xt - b * pred, b * xt + a * pred  # rotate (x_t, v) back to (x0, eps): a^2 + b^2 = 1
        r, rm1 = _gather(self.sqrt_recip_alphas_cumprod, t, xt), _gather(self.sqrt_recipm1_alphas_cumprod, t, xt)
        if self.prediction == "x0":
            return pred, (r * xt - pred) / rm1
        return r * xt - rm1 * pred, pred

    def p_mean_variance(
        self, model_out: Tensor, xt: Tensor, t: Tensor, clip_denoised: bool = False
    ) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from a model output (B, C or 2C, ...) at x_t (B, C, ...), t int (B,).

        Returns mean, var, log_var, pred_x0 (clamped to [-1, 1] if clip_denoised), eps (consistent with pred_x0:
        x_t = sqrt(acp) pred_x0 + sqrt(1 - acp) eps, also after clipping); all (B, C, ...).
        """
        C = xt.shape[1]
        if model_out.shape[1] != (2 * C if self.learn_sigma else C):
            raise ValueError(
                f"model output has {model_out.shape[1]} channels; expected {2 * C if self.learn_sigma else C} "
                f"for {C}-channel x with learn_sigma={self.learn_sigma}"
            )
        if self.learn_sigma:
            pred, u = model_out[:, :C], model_out[:, C:]
            frac = (u + 1.0) / 2.0
            max_log, min_log = _gather(self.log_betas, t, xt), _gather(self.posterior_log_variance_clipped, t, xt)
            log_var = frac * max_log + (1.0 - frac) * min_log
        else:
            pred = model_out
            log_var = _gather(self.fixed_log_variance, t, xt).expand_as(xt)
        pred_x0, eps = self.x0_eps(pred, xt, t)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
            r, rm1 = _gather(self.sqrt_recip_alphas_cumprod, t, xt), _gather(self.sqrt_recipm1_alphas_cumprod, t, xt)
            eps = (r * xt - pred_x0) / rm1  # keep eps consistent with the clipped x0 (DDIM uses it)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, xt, t)
        return dict(mean=mean, var=torch.exp(log_var), log_var=log_var, pred_x0=pred_x0, eps=eps)

    def _vb(self, model_out: Tensor, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """(B,) variational-bound term in bits/dim: KL(q || p) for t > 0, the discretised decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        out = self.p_mean_variance(model_out, xt, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_var"])) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_var"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self, model_fn: ModelFn, x0: Tensor, t: Tensor, noise: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Per-sample (B,) losses for data x0 (B, C, ...), int t (B,), noise (B, C, ...) (default N(0, I)).

        "mse": to `prediction_target` (noise, v or x0), unweighted (DiT's MSE setting); "vb" if learn_sigma, in
        bits/dim, through the detached prediction's posterior mean; "loss" = their sum.
        """
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        out = model_fn(xt, self.model_timesteps(t))
        C = x0.shape[1]
        terms = {"mse": _mean_flat((self.prediction_target(x0, noise, t) - out[:, :C]) ** 2)}
        if self.learn_sigma:
            frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1)  # vb trains only the variance (improved DDPM)
            terms["vb"] = self._vb(frozen, x0, xt, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def _start(self, shape, noise: Tensor | None, generator: torch.Generator | None, device) -> Tensor:
        if noise is not None:
            return noise
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        return torch.randn(tuple(shape), generator=generator, device=device)

    def _steps(self, progress, first: int | None = None):
        """Indices first..0 (default T-1..0); `progress` is False, True (own tqdm bar) or a caller's bar to update."""
        first = self.num_timesteps - 1 if first is None else first
        steps = range(first, -1, -1)
        if hasattr(progress, "update"):
            for i in steps:
                yield i
                progress.update(1)
        else:
            yield from (tqdm(steps, total=first + 1) if progress else steps)

    def _hold(self, x: Tensor, t: Tensor, edit: tuple | None) -> Tensor:
        """After the step from t: edit = (init, keep, noise) holds share `keep` of x at init noised to t - 1 (init
        itself after the last step), the same noise the sample started from (inpainting)."""
        if edit is None:
            return x
        init, keep, noise = edit
        target = init if int(t[0]) == 0 else self.q_sample(init, t - 1, noise)
        return keep * target + (1 - keep) * x

    def p_sample_loop(
        self,
        model_fn: ModelFn,
        shape,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
        progress: bool = False,
        device=None,
        first: int | None = None,
        edit: tuple | None = None,
    ) -> Tensor:
        """Ancestral sampling from x_{T-1} = noise (default N(0, I) of `shape`) down to x_0 (shape).

        The start and the per-step noise are drawn with `generator`; `device` (default: the generator's, else cpu)
        is only used when `noise` is not given. Edits: `first` starts at that index with `noise` as x_first (SDEdit);
        `edit` = (init, keep, noise) holds part of every step at the input (see `_hold`).
        """
        x = self._start(shape, noise, generator, device)
        for i in self._steps(progress, first):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            out = self.p_mean_variance(model_fn(x, self.model_timesteps(t)), x, t, clip_denoised)
            x = out["mean"]
            if i > 0:  # the last step returns the mean: no noise at t = 0
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + torch.exp(0.5 * out["log_var"]) * z
            x = self._hold(x, t, edit)
        return x

    def ddim_sample_loop(
        self,
        model_fn: ModelFn,
        shape,
        noise: Tensor | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
        progress: bool = False,
        device=None,
        first: int | None = None,
        edit: tuple | None = None,
    ) -> Tensor:
        """DDIM sampling (Song et al. 2021) over this schedule; eta = 0 is deterministic, eta = 1 is DDPM-like.

        Respace first (e.g. `respace("ddim50")`) to take fewer steps. Same arguments as `p_sample_loop`.
        """
        x = self._start(shape, noise, generator, device)
        for i in self._steps(progress, first):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            out = self.p_mean_variance(model_fn(x, self.model_timesteps(t)), x, t, clip_denoised)
            acp, acp_prev = _gather(self.alphas_cumprod, t, x), _gather(self.alphas_cumprod_prev, t, x)
            sigma = eta * torch.sqrt((1.0 - acp_prev) / (1.0 - acp) * (1.0 - acp / acp_prev))
            dir_xt = torch.sqrt((1.0 - acp_prev - sigma**2).clamp(min=0.0))  # clamp: rounding can go below 0 at eta=1
            x = torch.sqrt(acp_prev) * out["pred_x0"] + dir_xt * out["eps"]
            if i > 0 and eta > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = self._hold(x, t, edit)
        return x
