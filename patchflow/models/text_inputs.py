"""What every text-conditioned image model (MMDiT, CrossDiT) takes, checked once: an image, a timestep, text token
features, a pooled text vector and a text mask."""
from __future__ import annotations

import torch


def check_config(name: str, config, arch: str) -> None:
    """The config must be valid, of this arch, and for images (one frame)."""
    config.validate()
    if config.arch != arch:
        raise ValueError(f"{name} needs model.arch = {arch!r}, got {config.arch!r}")
    if config.frames != 1:
        raise ValueError(f"{name} is an image model: model.frames must be 1, got {config.frames}")


def image_input(name: str, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x: (B, C, H, W) or (B, C, 1, H, W) -> ((B, C, H, W), whether it came as 5D). Image models take one frame."""
    if x.ndim == 5:
        if x.shape[2] != 1:
            raise ValueError(f"{name} is an image model: x of shape (B, C, 1, H, W) must have 1 frame, got "
                             f"{tuple(x.shape)}")
        return x[:, :, 0], True
    return x, False


def check_text_inputs(name: str, config, x, t, text, pooled, text_mask) -> None:
    """ValueError naming the argument and the shape it needs; x is (B, C, H, W) here."""
    m = config
    if x.ndim != 4 or x.shape[1] != m.in_channels:
        raise ValueError(f"{name} expects x of shape (B, {m.in_channels}, H, W) or (B, {m.in_channels}, 1, H, W), "
                         f"got {tuple(x.shape)}")
    b, _, height, width = x.shape
    p = m.patch_size
    if height % p or width % p:
        raise ValueError(f"input {height}x{width} is not divisible by the patch size {p}")
    if t.ndim != 1 or t.shape[0] != b:
        raise ValueError(f"t must have shape ({b},) (one timestep per image, flow time * 1000), got {tuple(t.shape)}")
    check_text(m, b, text, pooled, text_mask)


def check_text(config, b: int, text, pooled, text_mask) -> None:
    """ValueError naming the argument when text (B, L, text_dim), pooled (B, pooled_dim) or text_mask (B, L) do
    not fit a batch of b."""
    m = config
    if text.ndim != 3 or text.shape[0] != b or text.shape[2] != m.text_dim:
        raise ValueError(f"text must have shape ({b}, L, {m.text_dim}) (model.text_dim = {m.text_dim}), "
                         f"got {tuple(text.shape)}")
    if pooled.ndim != 2 or tuple(pooled.shape) != (b, m.pooled_dim):
        raise ValueError(f"pooled must have shape ({b}, {m.pooled_dim}) (model.pooled_dim = {m.pooled_dim}), "
                         f"got {tuple(pooled.shape)}")
    if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
        raise ValueError(f"text_mask must have shape {tuple(text.shape[:2])} (one flag per text token, True = "
                         f"a real token), got {tuple(text_mask.shape)}")


def bool_mask(text_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A (B, L) text mask as bool (True = a real token); 0/1 masks are converted, additive ones refused."""
    if text_mask is None or text_mask.dtype == torch.bool:
        return text_mask
    if not bool(((text_mask == 0) | (text_mask == 1)).all()):
        raise ValueError("text_mask must be bool or 0/1 (1 = a real token, 0 = padding); an additive mask "
                         "of 0 / -inf is not accepted")
    return text_mask != 0
