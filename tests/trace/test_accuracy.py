"""Tracer accuracy: saved bytes per layer by hand from the shapes, peak against torch.profiler."""

from __future__ import annotations

import pytest
import torch

import sentinel_hm as sh
from sentinel_hm.trace import Trace
from sentinel_hm.trace.crosscheck import profile_with_reference, step_allocated_peak
from sentinel_hm.workloads import Workload, make_workload
from sentinel_hm.workloads.gpt import GPT, GPTConfig
from sentinel_hm.workloads.mlp import PRESETS as MLP_PRESETS

F32, I64 = 4, 8


def _saved_by_layer(trace: Trace) -> dict[str | None, int]:
    names = {layer.index: layer.name for layer in trace.layers}
    return {
        names[st.layer] if st.layer is not None else None: st.saved_bytes
        for st in trace.layer_stats()
    }


def _steady_trace(wl: Workload) -> Trace:
    wl.step()
    return sh.profile(wl.step, model=wl.model, optimizer=wl.optimizer)


def test_mlp_saved_bytes_per_layer_by_hand():
    cfg = MLP_PRESETS["tiny"]
    trace = _steady_trace(make_workload("mlp", "tiny"))
    b, h, classes = cfg.batch_size, cfg.hidden, cfg.n_classes
    expected: dict[str | None, int] = {f"blocks.{i}": b * h * F32 for i in range(cfg.n_layers)}
    expected["head"] = 0  # the logits are read by log-softmax, which saves its own output
    # outside the layers: the batch (x, y, both saved) and the loss's log-softmax output and
    # total weight (a scalar)
    expected[None] = b * cfg.in_features * F32 + b * I64 + b * classes * F32 + F32
    assert _saved_by_layer(trace) == expected


def test_gpt_saved_bytes_per_layer_by_hand():
    # Sizes chosen so that B*T*C, B*H*T*T and B*T differ and cannot be confused.
    cfg = GPTConfig(vocab_size=64, seq_len=8, d_model=48, n_layers=2, n_heads=3, dropout=0.1,
                    batch_size=2)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters())
    g = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=g)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    trace = _steady_trace(Workload("gpt", model, opt, batch))
    B, T, C, H, V = cfg.batch_size, cfg.seq_len, cfg.d_model, cfg.n_heads, cfg.vocab_size
    btc, bt, bhtt = B * T * C * F32, B * T * F32, B * H * T * T * F32
    # One pre-LN block on CPU (SDPA takes its math path when dropout is on):
    #   ln1: output + mean + rstd                       btc + 2 bt
    #   attention: contiguous q, k, v copies            3 btc
    #              softmax, dropout mask, dropped probs 3 bhtt
    #              heads merged (reshape copy)          btc
    #   residual dropout mask, residual sum             2 btc
    #   ln2: output + mean + rstd                       btc + 2 bt
    #   MLP: fc output, GELU output (4C wide)           8 btc
    #        dropout mask, residual sum                 2 btc
    block = 18 * btc + 4 * bt + 3 * bhtt
    expected: dict[str | None, int] = {
        "tok_emb": 0,
        "pos_emb": 0,
        "drop": 2 * btc,  # dropout mask and output (ln1 of block 0 saves it)
        "blocks.0": block,
        "blocks.1": block,
        "ln_f": btc + 2 * bt,
        "head": 0,
        # the token and target batches, the positions, log-softmax output, total weight
        None: 2 * B * T * I64 + T * I64 + B * T * V * F32 + F32,
    }
    assert _saved_by_layer(trace) == expected


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_peak_agrees_with_torch_profiler(name):
    wl = make_workload(name, "tiny")
    wl.step()
    trace, reference = profile_with_reference(wl.step, model=wl.model, optimizer=wl.optimizer)
    ours = step_allocated_peak(trace)
    assert reference > 0
    assert abs(ours - reference) <= 0.05 * reference, (ours, reference)
