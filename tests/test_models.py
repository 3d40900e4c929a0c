import math

import numpy as np
import pytest
import torch

from speed.models import DIT_PRESETS, DiT, build_dit, count_parameters, list_presets
from speed.models.dit import get_2d_sincos_pos_embed

CPU_PRESETS = ("DiT-N/2", "DiT-N/1")


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter random values so zero-initialised gates do not hide the conditioning."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def _inputs(n=2, channels=4, size=8, num_classes=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=generator)
    t = torch.randint(0, 1000, (n,), generator=generator)
    y = torch.randint(0, num_classes, (n,), generator=generator)
    return x, t, y


def test_presets_table():
    assert set(list_presets()) == set(DIT_PRESETS)
    for size in ("S", "B", "L", "XL"):
        for patch in (2, 4, 8):
            assert f"DiT-{size}/{patch}" in DIT_PRESETS
    for name in ("DiT-T/2", "DiT-T/4", "DiT-N/2", "DiT-N/1"):
        assert name in DIT_PRESETS
    assert DIT_PRESETS["DiT-XL/2"] == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    assert DIT_PRESETS["DiT-N/1"] == dict(depth=2, hidden_size=64, num_heads=2, patch_size=1)


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds(name):
    if name in CPU_PRESETS:
        model = build_dit(name, input_size=8, in_channels=4, num_classes=10)
    else:
        with torch.device("meta"):
            model = build_dit(name, input_size=32, in_channels=4, num_classes=1000)
    assert isinstance(model, DiT)
    assert len(model.blocks) == DIT_PRESETS[name]["depth"]
    assert model.patch_size == DIT_PRESETS[name]["patch_size"]


@pytest.mark.parametrize(
    "name,published",
    # Published DiT counts (32x32x4 latents, 1000 classes, learn_sigma) include the frozen pos_embed.
    [("DiT-XL/2", 675_129_632), ("DiT-L/2", 458e6), ("DiT-B/2", 130e6), ("DiT-S/2", 33e6)],
)
def test_parameter_counts_match_paper(name, published):
    with torch.device("meta"):
        model = build_dit(name, input_size=32, in_channels=4, num_classes=1000)
    trainable = count_parameters(model, trainable_only=True)
    assert trainable == count_parameters(model)
    assert abs(trainable - published) / published < 0.005
    if name == "DiT-XL/2":
        assert trainable + model.pos_embed.numel() == published


def test_adaln_zero_init_gives_zero_output():
    model = build_dit("DiT-N/2", input_size=8, in_channels=4, num_classes=10)
    x, t, y = _inputs()
    out = model(x, t, y)
    assert out.shape == (2, 8, 8, 8)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_forward_shapes(channels, learn_sigma):
    model = build_dit("DiT-N/2", input_size=8, in_channels=channels, num_classes=10, learn_sigma=learn_sigma)
    x, t, y = _inputs(channels=channels)
    out = model(x, t.float() + 0.5, y)  # fractional timesteps are fine
    assert out.shape == (2, channels * (2 if learn_sigma else 1), 8, 8)


def test_patch_one_and_non_default_size():
    model = build_dit("DiT-N/1", input_size=4, in_channels=3, num_classes=10)
    _randomize(model)
    x, t, y = _inputs(channels=3, size=4)
    out = model(x, t, y)
    assert out.shape == (2, 6, 4, 4)
    assert torch.isfinite(out).all()


def test_unpatchify_inverts_patching():
    model = build_dit("DiT-N/2", input_size=8, in_channels=2, num_classes=10, learn_sigma=False)
    image = torch.arange(2 * 2 * 8 * 8, dtype=torch.float32).reshape(2, 2, 8, 8)
    # [N, C, h, p, w, p] -> [N, h, w, p, p, C] -> tokens [N, T, p*p*C]
    tokens = image.reshape(2, 2, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 8)
    assert torch.equal(model.unpatchify(tokens), image)


def test_label_dropout_equals_null_class():
    model = build_dit("DiT-N/2", input_size=8, in_channels=4, num_classes=10)
    _randomize(model)
    assert model.y_embedder.embedding_table.num_embeddings == 11  # num_classes + null
    x, t, y = _inputs()
    null_labels = torch.full_like(y, 10)
    model.eval()
    expected = model(x, t, null_labels)
    assert not torch.allclose(expected, model(x, t, y))
    all_dropped = torch.ones_like(y, dtype=torch.bool)
    assert torch.equal(model(x, t, y, drop_mask=all_dropped), expected)
    model.train()  # explicit masks make training deterministic
    assert torch.equal(model(x, t, y, drop_mask=all_dropped), expected)
    none_dropped = torch.zeros_like(y, dtype=torch.bool)
    model.eval()
    conditional = model(x, t, y)
    model.train()
    assert torch.equal(model(x, t, y, drop_mask=none_dropped), conditional)


def test_draw_drop_mask_reproducible_with_generator():
    model = build_dit("DiT-N/2", input_size=8, in_channels=4, num_classes=10, class_dropout_prob=0.5)
    draw = lambda: model.y_embedder.draw_drop_mask(64, generator=torch.Generator().manual_seed(3))  # noqa: E731
    assert torch.equal(draw(), draw())
    assert draw().dtype == torch.bool and 0 < int(draw().sum()) < 64


def test_no_null_class_without_dropout():
    model = build_dit("DiT-N/2", input_size=8, in_channels=4, num_classes=10, class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.num_embeddings == 10
    x, t, y = _inputs()
    assert model(x, t, y, drop_mask=torch.zeros_like(y, dtype=torch.bool)).shape == (2, 8, 8, 8)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as error:
        build_dit("DiT-XL/3", input_size=32, in_channels=4, num_classes=1000)
    message = str(error.value)
    assert "DiT-XL/2" in message and "DiT-N/1" in message
    assert "Did you mean" in message


def test_invalid_configs_raise():
    with pytest.raises(ValueError, match="dropout"):
        build_dit("DiT-N/2", input_size=8, in_channels=4, num_classes=10, dropout=0.1)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        build_dit("DiT-N/2", input_size=7, in_channels=4, num_classes=10)
    with pytest.raises(ValueError, match="num_heads"):
        build_dit("DiT-N/2", input_size=8, in_channels=4, num_classes=10, num_heads=3)


def test_overrides_apply():
    model = build_dit("DiT-N/2", input_size=8, in_channels=4, num_classes=10, depth=1, hidden_size=32, patch_size=4)
    assert len(model.blocks) == 1 and model.patch_size == 4
    assert model.pos_embed.shape == (1, 4, 32)


def test_state_dict_uses_reference_names():
    model = build_dit("DiT-N/2", input_size=8, in_channels=4, num_classes=10)
    keys = set(model.state_dict())
    expected = {
        "pos_embed",
        "x_embedder.proj.weight",
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.2.weight",
        "y_embedder.embedding_table.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.qkv.bias",
        "blocks.0.attn.proj.weight",
        "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc2.bias",
        "blocks.1.adaLN_modulation.1.weight",
        "final_layer.linear.weight",
        "final_layer.adaLN_modulation.1.bias",
    }
    assert expected <= keys
    per_block = {k.split(".", 2)[2] for k in keys if k.startswith("blocks.0.")}
    assert len(per_block) == 10  # qkv, proj, fc1, fc2, adaLN (weight + bias each); norms have no params
    assert "pos_embed" not in dict(model.named_parameters())  # fixed, never optimised


def _reference_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """The MAE/DiT numpy recipe, written out independently to pin the layout."""

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_pos_embed_matches_reference_layout():
    ours = get_2d_sincos_pos_embed(64, 4, 4)
    assert torch.allclose(ours, torch.from_numpy(_reference_pos_embed(64, 4)).float(), atol=1e-6)
    model = build_dit("DiT-N/2", input_size=8, in_channels=4, num_classes=10)
    assert torch.equal(model.pos_embed[0], ours)


def test_one_optimizer_step_makes_output_nonzero():
    torch.manual_seed(0)
    model = build_dit("DiT-N/2", input_size=8, in_channels=4, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t, y = _inputs()
    loss = (model(x, t, y) - torch.randn(2, 8, 8, 8)).square().mean()
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    optimizer.step()
    out = model(x, t, y)
    assert torch.count_nonzero(out) > 0
    assert math.isfinite(out.abs().sum().item())


# --- the default model is DiT ------------------------------------------------------------------


class _ReferenceDiT(torch.nn.Module):
    """DiT's own model (facebookresearch/DiT models.py), written out independently with its module
    names: a checkpoint of it loads into ours strictly, and both compute the same function."""

    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                 num_classes=10):
        super().__init__()
        import functools

        from timm.models.vision_transformer import Attention, Mlp, PatchEmbed

        nn = torch.nn
        self.patch_size, self.out_channels = patch_size, 2 * in_channels
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        gelu = functools.partial(nn.GELU, approximate="tanh")
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            block = nn.Module()
            block.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            block.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
            block.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            block.mlp = Mlp(in_features=hidden_size, hidden_features=4 * hidden_size, act_layer=gelu, drop=0)
            block.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
            self.blocks.append(block)
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, t, y):
        def modulate(h, shift, scale):
            return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        c = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1)) + self.y_embedder.embedding_table(y)
        x = self.x_embedder(x) + self.pos_embed
        for b in self.blocks:
            s1, sc1, g1, s2, sc2, g2 = b.adaLN_modulation(c).chunk(6, dim=1)
            x = x + g1.unsqueeze(1) * b.attn(modulate(b.norm1(x), s1, sc1))
            x = x + g2.unsqueeze(1) * b.mlp(modulate(b.norm2(x), s2, sc2))
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        x = self.final_layer.linear(modulate(self.final_layer.norm_final(x), shift, scale))
        p, ch = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, ch))
        return x.reshape(x.shape[0], ch, h * p, h * p)


def test_default_model_loads_an_official_state_dict_and_matches_dits_forward():
    reference = _ReferenceDiT()
    _randomize(reference, seed=3)
    official = reference.state_dict()  # what DiT's published .pt files hold (pos_embed included)
    ours = build_dit("DiT-N/2", input_size=8, in_channels=4, num_classes=10)
    ours.load_state_dict(official, strict=True)
    assert set(ours.state_dict()) == set(official)
    ours.eval()
    reference.eval()
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), reference(x, t, y), rtol=1e-5, atol=1e-6)
        # Training mode without routing and with no label dropped is the same function.
        ours.train()
        torch.testing.assert_close(ours(x, t, y, drop_mask=torch.zeros(2, dtype=torch.bool)), reference(x, t, y),
                                   rtol=1e-5, atol=1e-6)
