"""Shared by the text-model tests (MMDiT, CrossDiT): tiny sizes, random weights and random inputs."""
import torch

C, TEXT_DIM, POOLED_DIM = 4, 12, 10


def randomize(model, seed=0, std=0.2):
    """Every parameter random, the zero-initialised adaLN and output layers too, so a wrong path shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(batch=3, height=8, width=8, length=5, seed=1):
    """(x (B, C, H, W), t (B,) in 0..1000, text (B, L, TEXT_DIM), pooled (B, POOLED_DIM))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, height, width, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, length, TEXT_DIM, generator=g)
    pooled = torch.randn(batch, POOLED_DIM, generator=g)
    return x, t, text, pooled
