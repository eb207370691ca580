"""The codec interface: pixels in [-1, 1] <-> normalised latents, for images and clips.

A codec sits between the data and the model (and between the sampler and the files): `encode` before the
objective, `decode` after the sampler. Images are (B, C, H, W), clips (B, C, T, H, W); every codec takes both
and returns the same rank it was given. Latents are normalised as `(mode - shift) * scale` so a diffusion model
sees roughly unit-variance inputs; `shift` and `scale` are stored with the codec (scalars, or one value per
latent channel).
"""
from __future__ import annotations

import hashlib
import json
import math

import torch
import torch.nn as nn


class CodecError(ValueError):
    """A codec that cannot be loaded or an input it cannot take; the message says what and how to fix it."""


def _per_channel(values, channels: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if t.numel() not in (1, channels):
        raise CodecError(f"latent {name} must be one number or one per latent channel ({channels}), got {t.numel()}")
    return t.expand(channels).clone()


class Codec(nn.Module):
    """Base class. Subclasses set the attributes below and implement `encode_moments` and `decode_raw`.

    Attributes:
      in_channels      pixel channels (None: any, e.g. identity)
      latent_channels  latent channels (None: same as the input)
      time_factor      frames per latent frame; a causal codec maps T = 1 + time_factor * k frames to 1 + k
      space_factor     pixels per latent pixel along H and W
      causal           the first frame is encoded on its own (an image is a one-frame clip)
      kind             short name of the implementation, recorded in caches ("identity", "kl", "diffusers-kl", ...)
    """

    in_channels: int | None = None
    latent_channels: int | None = None
    time_factor: int = 1
    space_factor: int = 1
    causal: bool = False
    kind: str = "codec"
    version: int = 1  # bump when an implementation's numerics change: caches made by another version are refused

    def __init__(self, shift=0.0, scale=1.0):
        super().__init__()
        channels = self.latent_channels or 1
        # not in state_dict(): codec.json holds them (a trained codec's weights exist before its statistics)
        self.register_buffer("latent_shift", _per_channel(shift, channels, "shift"), persistent=False)
        self.register_buffer("latent_scale", _per_channel(scale, channels, "scale"), persistent=False)

    # ---- what subclasses implement ---------------------------------------------------------------
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, T, H, W) in [-1, 1] -> posterior mean and log-variance, each (B, c, t, h, w), unnormalised."""
        raise NotImplementedError

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, c, t, h, w) unnormalised -> (B, C, T, H, W) in about [-1, 1]."""
        raise NotImplementedError

    def config_dict(self) -> dict:
        """What rebuilds this codec (saved in codec.json and hashed into its identity)."""
        return {}

    # ---- shapes ----------------------------------------------------------------------------------
    def frames_ok(self, frames: int) -> bool:
        if self.time_factor == 1:
            return frames >= 1
        return frames >= 1 and (frames - 1) % self.time_factor == 0 if self.causal else frames % self.time_factor == 0

    def latent_frames(self, frames: int) -> int:
        if self.time_factor == 1:
            return frames
        return 1 + (frames - 1) // self.time_factor if self.causal else frames // self.time_factor

    def pixel_frames(self, latent_frames: int) -> int:
        if self.time_factor == 1:
            return latent_frames
        return 1 + (latent_frames - 1) * self.time_factor if self.causal else latent_frames * self.time_factor

    def check_input(self, shape) -> None:
        """Raise CodecError naming the size this codec cannot take and what it can. shape: (B, C, [T,] H, W)."""
        shape = tuple(shape)
        if len(shape) not in (4, 5):
            raise CodecError(f"a codec takes images (B, C, H, W) or clips (B, C, T, H, W), got shape {shape}")
        c, (h, w) = shape[1], shape[-2:]
        if self.in_channels is not None and c != self.in_channels:
            raise CodecError(f"this {self.kind} codec takes {self.in_channels}-channel pixels, got {c} channels "
                             f"(shape {shape}); set data.channels = {self.in_channels} or use a codec for {c} channels")
        f = self.space_factor
        if h % f or w % f or h < f or w < f:
            raise CodecError(f"this {self.kind} codec downsamples space by {f}: height and width must be positive "
                             f"multiples of {f}, got {h}x{w}; resize or crop to e.g. "
                             f"{max(f, h // f * f)}x{max(f, w // f * f)}")
        if len(shape) == 5 and not self.frames_ok(shape[2]):
            want = f"1 + {self.time_factor} * k" if self.causal else f"a multiple of {self.time_factor}"
            ok = [t for t in range(1, 4 * self.time_factor + 2) if self.frames_ok(t)][:4]
            raise CodecError(f"this {self.kind} codec compresses time by {self.time_factor}: a clip needs {want} "
                             f"frames (e.g. {', '.join(map(str, ok))}), got {shape[2]}")

    def latent_shape(self, shape) -> tuple[int, ...]:
        """The latent shape encode() gives for a pixel shape (B, C, [T,] H, W)."""
        self.check_input(shape)
        shape = tuple(shape)
        c = self.latent_channels or shape[1]
        h, w = shape[-2] // self.space_factor, shape[-1] // self.space_factor
        if len(shape) == 4:
            return (shape[0], c, h, w)
        return (shape[0], c, self.latent_frames(shape[2]), h, w)

    def pixel_shape(self, latent_shape) -> tuple[int, ...]:
        """The pixel shape decode() gives for a latent shape (B, c, [t,] h, w)."""
        s = tuple(latent_shape)
        c = self.in_channels or s[1]
        h, w = s[-2] * self.space_factor, s[-1] * self.space_factor
        return (s[0], c, h, w) if len(s) == 4 else (s[0], c, self.pixel_frames(s[2]), h, w)

    # ---- normalisation ---------------------------------------------------------------------------
    def _stat(self, name: str, z: torch.Tensor) -> torch.Tensor:
        v = getattr(self, name)
        if self.latent_channels is None:  # channel-agnostic (identity): one value for every channel
            v = v[:1]
        return v.to(device=z.device, dtype=z.dtype).reshape(1, -1, *([1] * (z.ndim - 2)))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._stat("latent_shift", z)) * self._stat("latent_scale", z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self._stat("latent_scale", z) + self._stat("latent_shift", z)

    def set_latent_stats(self, shift, scale) -> None:
        channels = self.latent_channels or 1
        self.latent_shift.copy_(_per_channel(shift, channels, "shift"))
        self.latent_scale.copy_(_per_channel(scale, channels, "scale"))

    # ---- the interface -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: (B, C, H, W) or (B, C, T, H, W) in [-1, 1] -> normalised latents of the same rank.

        The posterior mode, unless a generator is given: then a sample mean + std * N(0, 1) drawn from it.
        """
        self.check_input(x.shape)
        image = x.ndim == 4
        x5 = x.unsqueeze(2) if image else x
        mean, logvar = self.encode_moments(x5)
        z = mean
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        z = self.normalize(z)
        return z.squeeze(2) if image else z

    @torch.no_grad()
    def encode_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised posterior mean and standard deviation, each shaped like encode(x)."""
        self.check_input(x.shape)
        image = x.ndim == 4
        mean, logvar = self.encode_moments(x.unsqueeze(2) if image else x)
        mean = self.normalize(mean)
        std = torch.exp(0.5 * logvar) * self._stat("latent_scale", logvar).abs()
        return (mean.squeeze(2), std.squeeze(2)) if image else (mean, std)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: normalised latents (B, c, h, w) or (B, c, t, h, w) -> pixels in about [-1, 1], same rank."""
        if z.ndim not in (4, 5):
            raise CodecError(f"decode takes latents (B, c, h, w) or (B, c, t, h, w), got shape {tuple(z.shape)}")
        if self.latent_channels is not None and z.shape[1] != self.latent_channels:
            raise CodecError(f"this {self.kind} codec has {self.latent_channels} latent channels, got latents of "
                             f"shape {tuple(z.shape)}")
        image = z.ndim == 4
        z5 = z.unsqueeze(2) if image else z
        x = self.decode_raw(self.denormalize(z5))
        return x.squeeze(2) if image else x

    # ---- identity ------------------------------------------------------------------------------------
    def identity(self) -> dict:
        """What a latent cache records: the kind, its version, its config, and a hash over config, weights and
        normalisation. Two codecs with the same identity encode alike."""
        h = hashlib.sha256()
        config = {"kind": self.kind, "version": self.version, **self.config_dict(),
                  "shift": self.latent_shift.tolist(), "scale": self.latent_scale.tolist()}
        h.update(json.dumps(config, sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
        return {"kind": self.kind, "version": self.version, "sha256": h.hexdigest()[:16],
                "latent_channels": self.latent_channels, "time_factor": self.time_factor,
                "space_factor": self.space_factor}

    def compression(self, shape) -> float:
        """Pixel values per latent value for inputs of `shape` (B, C, [T,] H, W); a causal codec keeps frame 0
        whole, so a clip's ratio depends on its length."""
        latent = self.latent_shape(shape)
        return math.prod(shape[1:]) / math.prod(latent[1:])


class IdentityCodec(Codec):
    """Pixels are the latents (today's behaviour): encode and decode return their input."""

    kind = "identity"

    def __init__(self):
        super().__init__()

    def encode_moments(self, x):
        return x, torch.full_like(x, float("-inf"))  # a point mass: std 0, so a sample is x itself

    def decode_raw(self, z):
        return z
