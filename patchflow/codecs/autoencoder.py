"""patchflow's own KL autoencoders: a convolutional image codec and a causal video codec (Sora's "video
compression network" in miniature), small enough to train on a CPU.

Encoder: conv in, per level residual blocks then a 2x downsample (space; time too in the first
log2(time_downsample) levels of a video codec), a middle block, norm + conv to the posterior's mean and log-variance.
The decoder mirrors it. Shapes: x (B, C, T, H, W) -> latents (B, c, t, H / f, W / f), f = 2^(levels - 1).

Image codec (time_downsample = 1): every frame is coded on its own with 2D convolutions.
Video codec (time_downsample = 2, 4, ...): 3D convolutions padded on the past side only (the first frame repeated),
group norms per frame, and time downsampled as [frame 0] + pairs of later frames. So latent frame 0 depends on pixel
frame 0 alone: a still image is a one-frame clip (T = 1 + time_downsample * k frames -> 1 + k latent frames), and
image-to-video can condition on one pixel frame. Decoding is causal the same way.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from patchflow.codecs.base import Codec


@dataclass
class AutoencoderConfig:
    """The `[model]` section of a codec run (`arch = "autoencoder"`): architecture and loss weights."""

    arch: str = "autoencoder"
    in_channels: int = 3
    latent_channels: int = 4
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # width per level; each later level halves H, W
    blocks: int = 1                   # residual blocks per level
    time_downsample: int = 1          # 1: image codec; 2, 4, ...: causal video codec compressing time by this
    init_from: str = ""               # video codec: start from this image codec (a codec spec), inflated in time
    kl_weight: float = 1e-4           # KL to N(0, I), per latent value, relative to the per-pixel L1
    mse_weight: float = 1.0           # reconstruction = L1 + mse_weight * MSE (MSE drives PSNR, L1 keeps edges)
    adversarial_weight: float = 0.0   # hinge GAN with a patch discriminator; 0 (default) leaves it out
    disc_channels: int = 32
    equivariance_weight: float = 0.0  # shift equivariance (EQ-VAE's idea, for shifts): encode(shift(x)) pulled toward
                                      # shift(encode(x)) for shifts of up to one latent pixel, off the grid included

    @property
    def space_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def temporal_levels(self) -> int:
        return int(math.log2(self.time_downsample))

    def validate(self) -> None:
        if self.arch != "autoencoder":
            raise ValueError(f"model.arch must be 'autoencoder' for an autoencoder config, got {self.arch!r}")
        for key, most in (("in_channels", 64), ("latent_channels", 256), ("blocks", 16), ("disc_channels", 1024)):
            value = getattr(self, key)
            if not 1 <= value <= most:
                raise ValueError(f"model.{key} must be in 1..{most}, got {value}")
        if not 1 <= len(self.channels) <= 6 or not all(1 <= c <= 2048 for c in self.channels):
            raise ValueError(f"model.channels must be 1 to 6 widths, each in 1..2048, got {self.channels}")
        if any(c % 8 for c in self.channels):
            raise ValueError(f"model.channels must be multiples of 8 (group norms of 8 groups), got {self.channels}")
        t = self.time_downsample
        if t < 1 or t & (t - 1) or t > self.space_factor:
            raise ValueError(f"model.time_downsample must be 1 or a power of 2 up to {self.space_factor} (one time "
                             f"halving per spatial level), got {t}")
        if self.init_from and t == 1:
            raise ValueError("model.init_from inflates an image codec into a video codec; it needs "
                             "model.time_downsample > 1")
        for key in ("kl_weight", "mse_weight", "adversarial_weight", "equivariance_weight"):
            if not 0 <= getattr(self, key) < 1e6:
                raise ValueError(f"model.{key} must be >= 0, got {getattr(self, key)}")


# ---- layers: 2D for image codecs, causal 3D for video codecs ----------------------------------------------

class CausalConv3d(nn.Conv3d):
    """k x k x k convolution that sees only the present and the past: time is padded on the left with the first
    frame, space symmetrically with zeros. (B, C, T, H, W) -> (B, C', T, H, W)."""

    def __init__(self, cin: int, cout: int, k: int = 3):
        super().__init__(cin, cout, k, padding=(0, k // 2, k // 2))
        self.time_pad = k - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad:
            x = torch.cat([x[:, :, :1]] * self.time_pad + [x], dim=2)
        return super().forward(x)


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 4D op to each frame of a 5D tensor (norms and resampling must not mix frames)."""
    if x.ndim == 4:
        return fn(x)
    b = x.shape[0]
    y = fn(rearrange(x, "b c t h w -> (b t) c h w"))
    return rearrange(y, "(b t) c h w -> b c t h w", b=b)


def _conv(cin: int, cout: int, video: bool, k: int = 3) -> nn.Module:
    return CausalConv3d(cin, cout, k) if video else nn.Conv2d(cin, cout, k, padding=k // 2)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, video: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(8, cin), nn.GroupNorm(8, cout)
        self.conv1, self.conv2 = _conv(cin, cout, video), _conv(cout, cout, video)
        self.skip = nn.Identity() if cin == cout else _conv(cin, cout, video, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(_per_frame(self.norm1, x)))
        h = self.conv2(F.silu(_per_frame(self.norm2, h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve H and W (strided conv per frame); with `time`, also fold [frame 0] + pairs of later frames."""

    def __init__(self, ch: int, time: bool):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.time = nn.Conv3d(2 * ch, ch, 1) if time else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _per_frame(self.conv, x)
        if self.time is None:
            return x
        first = torch.cat([x[:, :, :1], x[:, :, :1]], dim=1)  # frame 0 pairs with itself: it stays on its own
        rest = rearrange(x[:, :, 1:], "b c (t two) h w -> b (two c) t h w", two=2)
        return self.time(torch.cat([first, rest], dim=2))


class Upsample(nn.Module):
    """Double H and W (nearest + conv per frame); with `time`, each latent frame but the first becomes two."""

    def __init__(self, ch: int, time: bool):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.time = nn.Conv3d(ch, 2 * ch, 1) if time else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time is not None:
            pairs = rearrange(self.time(x), "b (two c) t h w -> b c (t two) h w", two=2)
            x = pairs[:, :, 1:]  # frame 0 gives one frame (its pair's second), later frames two each
        return _per_frame(lambda f: self.conv(F.interpolate(f, scale_factor=2.0, mode="nearest")), x)


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        video, ch = cfg.time_downsample > 1, cfg.channels
        self.conv_in = _conv(cfg.in_channels, ch[0], video)
        layers, prev = [], ch[0]
        for i, c in enumerate(ch):
            for _ in range(cfg.blocks):
                layers.append(ResBlock(prev, c, video))
                prev = c
            if i < len(ch) - 1:
                layers.append(Downsample(c, time=i < cfg.temporal_levels))
        self.down = nn.Sequential(*layers)
        self.mid = ResBlock(prev, prev, video)
        self.norm_out = nn.GroupNorm(8, prev)
        self.conv_out = _conv(prev, 2 * cfg.latent_channels, video)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(_per_frame(self.norm_out, h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        video, ch = cfg.time_downsample > 1, cfg.channels
        self.conv_in = _conv(cfg.latent_channels, ch[-1], video)
        self.mid = ResBlock(ch[-1], ch[-1], video)
        layers, prev = [], ch[-1]
        for i in reversed(range(len(ch))):
            for _ in range(cfg.blocks):
                layers.append(ResBlock(prev, ch[i], video))
                prev = ch[i]
            if i > 0:
                layers.append(Upsample(prev, time=i - 1 < cfg.temporal_levels))
        self.up = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(8, prev)
        self.conv_out = _conv(prev, cfg.in_channels, video)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(_per_frame(self.norm_out, h)))


# ---- the codec ---------------------------------------------------------------------------------------------

class KLAutoencoder(Codec):
    """patchflow's KL autoencoder as a Codec: `encode(x)`, `decode(z)` on images or clips in [-1, 1]."""

    kind = "kl"
    version = 1

    def __init__(self, cfg: AutoencoderConfig, shift=0.0, scale=1.0):
        cfg.validate()
        self.cfg = cfg
        self.in_channels, self.latent_channels = cfg.in_channels, cfg.latent_channels
        self.space_factor, self.time_factor = cfg.space_factor, cfg.time_downsample
        self.causal = cfg.time_downsample > 1
        super().__init__(shift=shift, scale=scale)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    @torch.no_grad()
    def inflate_from(self, image: "KLAutoencoder") -> None:
        """Start this causal video codec as the image codec `image` applied frame by frame (Open-Sora and MAGVIT-v2
        start their video autoencoders the same way): each 2D kernel becomes the present-frame tap of its causal 3D
        kernel (past taps zero), time downsampling averages a pair of frames, time upsampling copies a frame to two.
        Only the motion is left to learn."""
        mine, theirs = self.cfg, image.cfg
        same = ("in_channels", "latent_channels", "channels", "blocks")
        if image.causal or any(getattr(mine, k) != getattr(theirs, k) for k in same):
            raise ValueError(f"cannot inflate: model.init_from must be an image codec (time_downsample = 1) with "
                             f"the same {', '.join(same)}; it has "
                             f"{', '.join(f'{k} = {getattr(theirs, k)}' for k in same)}, time_downsample = "
                             f"{theirs.time_downsample}")
        source = image.state_dict()
        for name, p in self.state_dict().items():
            if name in source and source[name].shape == p.shape:  # norms, biases, per-frame 2D convs
                p.copy_(source[name])
            elif name in source:  # a 2D kernel (o, i, k, k) -> the last (present) tap of a causal (o, i, k, k, k)
                p.zero_()
                p[:, :, -1] = source[name]
            elif name.endswith("time.weight"):
                c = p.shape[1] if p.shape[0] > p.shape[1] else p.shape[0]
                eye = torch.eye(c).reshape(c, c, 1, 1, 1)
                # downsample (c, 2c): the mean of the pair; upsample (2c, c): both frames a copy
                p.copy_(torch.cat([eye, eye], dim=0 if p.shape[0] > p.shape[1] else 1)
                        * (1.0 if p.shape[0] > p.shape[1] else 0.5))
            elif name.endswith("time.bias"):
                p.zero_()
            else:
                raise ValueError(f"cannot inflate {name}: the image codec has no matching weight")

    def _frames_in(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.causal else rearrange(x, "b c t h w -> (b t) c h w")  # image codec: frames independent

    def _frames_out(self, y: torch.Tensor, b: int) -> torch.Tensor:
        return y if self.causal else rearrange(y, "(b t) c h w -> b c t h w", b=b)

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self._frames_out(self.encoder(self._frames_in(x)), x.shape[0])
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # as LDM: keeps exp() finite early in training

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self._frames_out(self.decoder(self._frames_in(z)), z.shape[0])
