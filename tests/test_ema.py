import socket

import pytest
import torch
import torch.nn as nn

from speed.models import build_dit
from speed.train.ema import EMA


def _tiny_dit():
    torch.manual_seed(0)
    return build_dit("DiT-N/2", input_size=8, in_channels=4, num_classes=10)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_warmup_decay_formula():
    ema = EMA(nn.Linear(2, 2), decay=0.9999)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(10) == pytest.approx(11 / 20)
    assert ema.decay_at(1000) == pytest.approx(1001 / 1010)
    assert ema.decay_at(10**7) == 0.9999  # capped at the configured decay
    assert EMA(nn.Linear(2, 2), decay=0.99, warmup=False).decay_at(0) == 0.99
    with pytest.raises(ValueError):
        EMA(nn.Linear(2, 2), decay=1.5)


def test_update_is_a_lerp():
    model = nn.Linear(3, 1)
    ema = EMA(model, decay=0.75, warmup=False)
    start = ema.state_dict()["weight"].clone()
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=0)
    assert torch.allclose(ema.state_dict()["weight"], 0.75 * start + 0.25)


def test_converges_to_constant_params():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.5)
    for step in range(200):
        ema.update(model, step)
    for p in ema.state_dict().values():
        assert torch.allclose(p, torch.full_like(p, 2.5), atol=1e-6)


def test_update_does_not_change_model():
    model = _tiny_dit()
    ema = EMA(model)
    with torch.no_grad():
        for p in ema.state_dict().values():
            p.add_(1.0)  # make the shadow differ so a wrong-direction update would show
    before = _snapshot(model)
    ema.update(model, step=5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_state_dict_round_trip():
    model = _tiny_dit()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model, step=3)
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    assert set(saved) == set(model.state_dict())  # loadable straight into a DiT

    restored = EMA(_tiny_dit(), decay=0.5)
    restored.load_state_dict(saved)
    assert all(torch.equal(saved[k], v) for k, v in restored.state_dict().items())
    fresh = _tiny_dit()
    fresh.load_state_dict(saved)


def test_dit_bf16_model_with_fp32_shadow():
    model = _tiny_dit().to(torch.bfloat16)
    ema = EMA(model, decay=0.9)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ema.state_dict().values())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    t, y = torch.tensor([3, 700]), torch.tensor([1, 9])
    (model(x, t, y).float() - 1).square().mean().backward()
    optimizer.step()
    ema.update(model, step=0)
    # A torch.compile wrapper (parameter names prefixed "_orig_mod.") is unwrapped; nothing compiles here.
    ema.update(torch.compile(model), step=1)
    plain = _tiny_dit()
    plain.load_state_dict(ema.full_state_dict(), strict=True)
    out = plain.eval()(x.float(), t, y)
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()

    target = _tiny_dit()
    ema.copy_to(target)
    for name, p in target.named_parameters():
        assert torch.equal(p, ema.state_dict()[name])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_fsdp2_sharded_model(monkeypatch):
    """Single-process gloo group: FSDP2 params are DTensors; the EMA keeps DTensor shards."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = _tiny_dit()
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        ema = EMA(model, decay=0.5, warmup=False)
        assert ema.sharded
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([1, 2])
        (model(x, t, y) - 1).square().mean().backward()
        before = model.final_layer.linear.weight.full_tensor().clone()
        shadow_before = ema.state_dict()["final_layer.linear.weight"].full_tensor().clone()
        optimizer.step()
        ema.update(model, step=0)
        after = model.final_layer.linear.weight.full_tensor()
        assert not torch.equal(before, after)
        state = ema.state_dict()
        assert isinstance(state["final_layer.linear.weight"], DTensor)
        assert set(state) == set(model.state_dict())
        assert torch.allclose(state["final_layer.linear.weight"].full_tensor(), 0.5 * shadow_before + 0.5 * after)
        full = ema.full_state_dict()
        assert torch.equal(full["final_layer.linear.weight"], state["final_layer.linear.weight"].full_tensor())
        ema.copy_to(model)
        assert torch.equal(model.final_layer.linear.weight.full_tensor(), full["final_layer.linear.weight"])
    finally:
        dist.destroy_process_group()
