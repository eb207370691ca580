"""What a codec run trains: the codec with its losses and discriminator, and the objective that drives it
through the one trainer (the flows' interface: loss(model_fn, x0, generator, shard) -> (B,)).

Training-only: sampling, conversion and evaluation use the exported codec (`patchflow.codecs.load`)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.func import functional_call

from patchflow.codecs.autoencoder import AutoencoderConfig, KLAutoencoder
from patchflow.flow.draws import global_draw


def shift(x: torch.Tensor, dy: float, dx: float) -> torch.Tensor:
    """x (..., H, W) moved down dy and right dx pixels, wrapping around; a fractional shift blends the two nearest
    whole ones (linear interpolation)."""
    for amount, dim in ((dy, -2), (dx, -1)):
        whole = math.floor(amount)
        w = amount - whole
        moved = x.roll(whole, dims=dim)
        x = moved if w == 0 else (1 - w) * moved + w * x.roll(whole + 1, dims=dim)
    return x


def equivariance_error(encode, x: torch.Tensor, mean: torch.Tensor, dy: int, dx: int, factor: int) -> torch.Tensor:
    """Per-sample (B,) squared distance of encode(x shifted (dy, dx) pixels) from the latent mean shifted
    (dy, dx) / factor latent pixels, relative to the latents' mean square (so shrinking the latents cannot win)."""
    moved = encode(shift(x, dy, dx))
    target = shift(mean, dy / factor, dx / factor)
    return (moved.float() - target.float()).pow(2).flatten(1).mean(1) / target.float().pow(2).mean().detach().clamp(
        min=1e-6)


class PatchDiscriminator(nn.Module):
    """A small PatchGAN on single frames: (N, C, H, W) -> (N, 1, H / 4, W / 4) realness logits."""

    def __init__(self, in_channels: int, ch: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.GroupNorm(8, 2 * ch), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * ch, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AutoencoderModel(nn.Module):
    """What a codec run trains: the codec and, with adversarial_weight > 0, its discriminator.

    forward(x, noise, moves) -> per-sample loss terms (B,) in one call, so DDP/FSDP see every parameter used in
    forward. x: (B, C, T, H, W) in [-1, 1]; noise: N(0, I) of the latent shape (the posterior sample's noise);
    moves: (2,) integer pixel shift (dy, dx) of the equivariance term, None without it.
    """

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.codec = KLAutoencoder(cfg)
        self.discriminator = PatchDiscriminator(cfg.in_channels, cfg.disc_channels) \
            if cfg.adversarial_weight > 0 else None

    def forward(self, x: torch.Tensor, noise: torch.Tensor,
                moves: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        mean, logvar = self.codec.encode_moments(x)
        z = mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)
        recon = self.codec.decode_raw(z)
        err = (recon.float() - x.float()).flatten(1)
        pixels = err.shape[1]
        terms = {"l1": err.abs().mean(1), "mse": err.pow(2).mean(1),
                 # KL(q(z|x) || N(0, I)) summed over latent values, per pixel value like the reconstruction terms
                 "kl": 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).flatten(1).sum(1)
                 / pixels}
        if moves is not None:
            dy, dx = (int(v) for v in moves)
            terms["equivariance"] = equivariance_error(lambda v: self.codec.encode_moments(v)[0], x, mean, dy, dx,
                                                       self.config.space_factor)
        if self.discriminator is not None:
            frames = lambda v: rearrange(v, "b c t h w -> (b t) c h w")
            per_sample = lambda v: rearrange(v, "(b t) 1 h w -> b (t h w)", b=x.shape[0]).mean(1)
            # the generator's term must not train the discriminator: it sees detached discriminator weights
            frozen = {k: p.detach() for k, p in self.discriminator.named_parameters()}
            terms["generator"] = -per_sample(functional_call(self.discriminator, frozen, (frames(recon),)))
            real = self.discriminator(frames(x))
            fake = self.discriminator(frames(recon.detach()))
            terms["discriminator"] = per_sample(F.relu(1 - real)) + per_sample(F.relu(1 + fake))
        return terms


class AutoencoderObjective:
    """The codec run's objective, with the flows' interface: loss(model_fn, x0, generator, shard) -> (B,)."""

    def __init__(self, cfg: AutoencoderConfig):
        self.cfg = cfg

    def loss(self, model_fn, x0: torch.Tensor, generator: torch.Generator | None = None,
             shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        c = self.cfg
        f, frames = c.space_factor, x0.shape[2]
        t = frames if c.time_downsample == 1 else 1 + (frames - 1) // c.time_downsample
        shape = (c.latent_channels, t, x0.shape[-2] // f, x0.shape[-1] // f)
        noise = global_draw(x0, generator, shard, lambda n: torch.randn(
            (n, *shape), generator=generator, device=x0.device))
        moves = None
        if c.equivariance_weight > 0:  # one shift per step, up to one latent pixel each way (the same on every rank)
            moves = torch.randint(-f, f + 1, (2,), generator=generator, device=generator.device if generator else None)
        terms = model_fn(x0, noise, moves)
        total = terms["l1"] + c.mse_weight * terms["mse"] + c.kl_weight * terms["kl"]
        if "equivariance" in terms:
            total = total + c.equivariance_weight * terms["equivariance"]
        if "generator" in terms:
            total = total + c.adversarial_weight * terms["generator"] + terms["discriminator"]
        return total
