"""An encoder-decoder with cross-attention (``nn.Transformer``), a model this project did not
write. Its MultiheadAttention splits ``in_proj_weight`` into views (queries; keys and values)
and saves each for backward in turn; at ``fast_memory="min"`` the parameter may move between
the two saves, and the second view (of the storage it left) was once rebuilt over the arena at
an offset not its own: ``RuntimeError: Tensor: invalid storage offset``."""

from __future__ import annotations

import pytest
import torch

import sentinel_hm as sh

from .test_sentinel import assert_same, assert_steady_within_budget

STEPS = 12  # warm-up, profile, trials and re-plans, then steady; the last is audited


def _train(budget: str | None) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                        sh.Sentinel | None]:
    torch.manual_seed(0)
    model = torch.nn.Transformer(d_model=64, nhead=4, num_encoder_layers=2,
                                 num_decoder_layers=2, dim_feedforward=128, batch_first=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sentinel = sh.Sentinel(model, opt, fast_memory=budget) if budget else None
    gen = torch.Generator().manual_seed(1)
    losses = []
    for i in range(STEPS):
        src, tgt = torch.randn(8, 32, 64, generator=gen), torch.randn(8, 24, 64, generator=gen)
        if sentinel is not None and i == STEPS - 1:
            sentinel.audit()
        with sentinel.step() if sentinel is not None else torch.enable_grad():
            loss = model(src, tgt).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(loss.detach())
    state = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
    return losses, state, sentinel


@pytest.mark.parametrize("budget", ["min", "50%"])
def test_an_encoder_decoder_with_cross_attention_trains_bitwise(budget):
    plain_losses, plain_state, _ = _train(None)
    losses, state, sentinel = _train(budget)
    assert sentinel is not None
    try:
        assert_same(plain_losses, losses)
        assert_same(plain_state, state)
        assert_steady_within_budget(sentinel)
    finally:
        sentinel.close()
