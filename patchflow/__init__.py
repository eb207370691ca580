"""patchflow: train and sample diffusion transformers."""
__version__ = "0.1.0"


def load(run_dir, ema: bool = True, device="cpu", loras=()):
    """The trained model of a run directory as an nn.Module (EMA weights by default); `loras`: adapters merged
    in, each "FILE[:scale]" (a patchflow adapter file or a LoRA run)."""
    from patchflow.pipeline import load as _load

    return _load(run_dir, ema=ema, device=device, loras=loras)


def __getattr__(name):
    if name == "Pipeline":
        from patchflow.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
