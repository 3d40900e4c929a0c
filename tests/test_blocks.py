"""Block options (norm, MLP, QK-norm, 2-D RoPE) and the LightningDiT presets: each builds, trains
a few steps and round-trips through an export that rebuilds it without a matching config."""

from __future__ import annotations

import pytest
import torch

from speed.config import load_config
from speed.models import build_dit
from speed.models.blocks import Rope2D
from speed.models.export import load_export, save_export
from speed.models.registry import DIT_PRESETS, ModelDescription, describe, preset_summary
from speed.train import components, loop
from speed.train.distributed import DistEnv
from speed.train.run_layout import RunLayout
from speed.train.sources import FixedSource, LocalReporter

OPTIONS = [
    ["model.norm=rmsnorm"],
    ["model.mlp=swiglu"],
    ["model.qk_norm=true"],
    ["model.pos_embed=rope2d"],
    ["model.name=LightningDiT-N/2"],
]


def _randomize(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def _inputs(n=2, channels=1, size=8):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(n, channels, size, size, generator=generator), torch.randint(0, 1000, (n,), generator=generator),
            torch.randint(0, 10, (n,), generator=generator))


def test_lightning_presets_hold_the_modern_blocks():
    preset = DIT_PRESETS["LightningDiT-B/2"]
    assert preset == dict(depth=12, hidden_size=768, num_heads=12, patch_size=2, norm="rmsnorm", mlp="swiglu",
                          qk_norm=True, pos_embed="rope2d")
    assert "rmsnorm" in preset_summary("LightningDiT-B/2") and "rope2d" in preset_summary("LightningDiT-B/2")
    assert "layernorm, gelu MLP, no QK-norm, sincos" in preset_summary("DiT-XL/2")
    for name in ("LightningDiT-XL/1", "LightningDiT-XL/2", "LightningDiT-N/2", "LightningDiT-D/2"):
        assert name in DIT_PRESETS


def test_module_choices_come_from_timm():
    from timm.layers import AttentionRope, RmsNorm, SwiGLU

    model = build_dit("LightningDiT-N/2", input_size=8, in_channels=1, num_classes=10)
    block = model.blocks[0]
    assert isinstance(block.norm1, RmsNorm) and isinstance(block.mlp, SwiGLU) and isinstance(block.attn, AttentionRope)
    assert isinstance(block.attn.q_norm, RmsNorm) and model.pos_embed is None and model.rope is not None
    # SwiGLU at 2/3 width keeps the MLP's parameter count within a few percent.
    plain = build_dit("DiT-N/2", input_size=8, in_channels=1, num_classes=10).blocks[0].mlp
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(block.mlp) - count(plain)) / count(plain) < 0.05
    # The rotary table is recomputed from the grid, never stored.
    assert not any("rope" in k for k in model.state_dict())


def test_rope_is_relative_and_gathers_per_sample():
    rope = Rope2D(16, (4, 4))
    rope.reset()
    table = rope.embed()
    assert table.shape == (16, 32) and torch.count_nonzero(table) > 0
    keep = torch.tensor([[0, 5, 9], [1, 2, 15]])
    gathered = rope.embed(keep)
    assert gathered.shape == (2, 1, 3, 32)
    assert torch.equal(gathered[1, 0, 2], table[15])


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o[0])
def test_each_option_trains_and_exports(tmp_path, option, monkeypatch):
    monkeypatch.setattr(components.Evaluator, "run", lambda *a, **k: {})
    monkeypatch.setattr(components.SampleGrid, "run", lambda *a, **k: {})
    cfg = load_config(None, ["model.name=DiT-N/2", *option, f"run.output_uri={tmp_path}", "parallel.strategy=none",
                             "train.global_batch_size=8", "train.micro_batch_size=8", "train.steps=3",
                             "train.log_every=1", "train.checkpoint_every=100", "train.eval_every=0",
                             "train.sample_every=0", "optim.lr=1e-3", "optim.warmup_steps=0"])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8, generator=g).clamp(-1, 1), torch.arange(8) % 10
    result = loop.train(cfg, DistEnv(), FixedSource(x, y), LocalReporter(RunLayout.for_run(cfg.run)), progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history if "loss" in r)
    # The export records the architecture: it rebuilds from its description alone.
    model, description = load_export(result.export_uri)
    key, value = option[0].split("=")
    field = key.split(".")[1]
    if field != "name":
        assert str(description.model[field]).lower() == value
    else:
        assert description.model["norm"] == "rmsnorm" and description.model["pos_embed"] == "rope2d"
    assert "routing" not in description.model
    x0, t, labels = _inputs()
    assert model(x0, t, labels).shape == (2, 2, 8, 8)


def test_options_change_the_function_and_defaults_do_not():
    x, t, y = _inputs()
    base = build_dit("DiT-N/2", input_size=8, in_channels=1, num_classes=10)
    _randomize(base)
    base.eval()
    same = build_dit("DiT-N/2", input_size=8, in_channels=1, num_classes=10, norm="layernorm", mlp="gelu",
                     qk_norm=False, pos_embed="sincos")
    same.load_state_dict(base.state_dict(), strict=True)
    same.eval()
    assert torch.equal(same(x, t, y), base(x, t, y))
    for option in (dict(norm="rmsnorm"), dict(pos_embed="rope2d")):
        other = build_dit("DiT-N/2", input_size=8, in_channels=1, num_classes=10, **option)
        other.load_state_dict({k: v for k, v in base.state_dict().items() if k in other.state_dict()}, strict=True)
        other.eval()
        assert not torch.allclose(other(x, t, y), base(x, t, y))


def test_old_descriptions_without_block_options_build_dit():
    cfg = load_config(None, ["model.name=DiT-N/2"])
    description = describe(cfg.model, cfg.data, cfg.diffusion)
    old = {k: v for k, v in description.model.items() if k not in ("norm", "mlp", "qk_norm", "pos_embed")}
    restored = ModelDescription.from_dict({**description.__dict__, "model": {**old, "some_future_key": 1}})
    model = restored.build()
    assert model.options.norm == "layernorm" and model.pos_embed is not None


def test_export_of_a_modern_model_loads_without_its_config(tmp_path):
    cfg = load_config(None, ["model.name=DiT-N/2", "model.mlp=swiglu", "model.pos_embed=rope2d"])
    description = describe(cfg.model, cfg.data, cfg.diffusion)
    model = description.build()
    _randomize(model)
    save_export(model.state_dict(), description, str(tmp_path / "export"))
    loaded, loaded_description = load_export(str(tmp_path / "export"))
    assert loaded_description.model["mlp"] == "swiglu" and loaded_description.model["pos_embed"] == "rope2d"
    x, t, y = _inputs()
    model.eval()
    assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_bad_options_name_the_key():
    from speed.config.schema import ConfigError

    with pytest.raises(ConfigError, match="model.norm"):
        load_config(None, ["model.norm=batchnorm"])
    with pytest.raises(ConfigError, match="model.pos_embed"):
        load_config(None, ["model.pos_embed=learned"])
