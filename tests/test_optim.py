import torch

from patchflow.train.optim import adamw


def _train(opt_factory, steps: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = opt_factory(model.parameters())
    data = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(data).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def test_adamw_uses_the_fused_kernel_and_matches_the_reference_loop():
    opt = adamw(torch.nn.Linear(3, 3).parameters(), lr=1e-3)
    assert opt.defaults["fused"] is True
    fused = _train(lambda p: adamw(p, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1))
    loop = _train(lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, foreach=False))
    untrained = _train(lambda p: torch.optim.AdamW(p, lr=0.0))
    for a, b, start in zip(fused.parameters(), loop.parameters(), untrained.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert (a - start).abs().max() > 1e-3  # the steps moved the weights


def test_adamw_falls_back_to_foreach_where_no_fused_kernel_exists():
    params = [torch.nn.Parameter(torch.zeros(2, device="meta"))]
    opt = adamw(params, lr=1e-3)
    assert not opt.defaults["fused"] and opt.defaults["foreach"] is True
