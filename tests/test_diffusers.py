"""diffusers interop against the real diffusers package: forward equality, DiTPipeline end to end
from an export (tiny random AutoencoderKL built here), the bit-exact round trip, and the refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from speed.config.load import to_dict
from speed.config.schema import Config, DataConfig, DiffusionConfig, ModelConfig
from speed.models import diffusers_interop as interop
from speed.models.export import read_weights, save_export
from speed.models.registry import ModelDescription, describe

diffusers = pytest.importorskip("diffusers")


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere, so the zero-initialised gates hide nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def _description(num_classes=10, data=None, learn_sigma=True, **model) -> ModelDescription:
    return describe(ModelConfig(name="DiT-N/2", num_classes=num_classes, learn_sigma=learn_sigma, **model),
                    data or DataConfig(), DiffusionConfig())


def _latent_data() -> DataConfig:
    return DataConfig(format="latents", resolution=64, channels=4)


def _export(tmp_path: Path, description: ModelDescription, name="export", seed=0):
    model = description.build()
    _randomize(model, seed)
    save_export(model.state_dict(), description, str(tmp_path / name))
    return model.eval(), str(tmp_path / name)


def _tiny_vae(folder: Path, scaling_factor=0.18215):
    """A random AutoencoderKL with SD-VAE's geometry (4 latent channels, 8x downsampling), tiny widths."""
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=scaling_factor,
    )
    vae.save_pretrained(folder, safe_serialization=True)
    return str(folder)


@pytest.mark.parametrize("data,learn_sigma", [(None, True), (None, False), (_latent_data(), True)])
def test_diffusers_forward_equals_ours(data, learn_sigma):
    description = _description(data=data, learn_sigma=learn_sigma)
    model = description.build()
    _randomize(model)
    model.eval()
    transformer = interop.to_diffusers_transformer(model.state_dict(), description)
    generator = torch.Generator().manual_seed(1)
    channels, size = description.in_channels, description.input_size
    x = torch.randn(4, channels, size, size, generator=generator)
    t = torch.tensor([0, 17, 500, 999])
    y = torch.tensor([0, 3, 9, 10])  # 10: our null class, DiTPipeline's id 1000
    with torch.no_grad():
        ours = model(x, t, y)
        theirs_y = torch.where(y == 10, torch.tensor(interop.PIPELINE_NULL_CLASS), y)
        stock = transformer(x, timestep=t, class_labels=theirs_y).sample
        interop.use_dit_timestep_frequencies(transformer)
        theirs = transformer(x, timestep=t, class_labels=theirs_y).sample
    assert theirs.shape == ours.shape == (4, (2 if learn_sigma else 1) * channels, size, size)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # Known difference: stock diffusers' DiT embeds timesteps with other frequencies (shift 1).
    assert not torch.allclose(stock, ours, atol=1e-3)


def test_round_trip_ours_diffusers_ours_is_bit_exact(tmp_path):
    description = dataclasses.replace(_description(data=_latent_data()), step=123)
    _, export = _export(tmp_path, description)
    done = interop.export_to_diffusers(export, str(tmp_path / "hf"))
    assert done["kind"] == "DiTTransformer2DModel"
    assert (tmp_path / "hf" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((tmp_path / "hf").glob("*.bin"))
    back = interop.import_from_diffusers(str(tmp_path / "hf"), str(tmp_path / "back"))
    original, _ = read_weights(export, None, "x")
    restored, metadata = read_weights(back["export"], None, "x")
    assert set(original) == set(restored)
    for name, value in original.items():
        assert restored[name].dtype == value.dtype and torch.equal(restored[name], value), name
    assert ModelDescription.from_json(metadata["speed"]) == description


def test_import_of_a_foreign_transformer_folder(tmp_path):
    """A DiTTransformer2DModel saved by diffusers itself (no speed_model.json): described from its config."""
    description = _description(num_classes=1000, data=_latent_data())
    model, export = _export(tmp_path, description)
    transformer = interop.to_diffusers_transformer(model.state_dict(), description)
    transformer.save_pretrained(tmp_path / "foreign", safe_serialization=True)
    done = interop.import_from_diffusers(str(tmp_path / "foreign"), str(tmp_path / "back"))
    assert done["described_from"] == "the diffusers configs" and done["model"] == "DiT-N/2"
    restored, metadata = read_weights(done["export"], None, "x")
    original, _ = read_weights(export, None, "x")
    assert all(torch.equal(restored[k], v) for k, v in original.items())
    imported = ModelDescription.from_json(metadata["speed"])
    assert (imported.input_size, imported.in_channels, imported.data_format) == (8, 4, "latents")


def test_import_refuses_per_block_embedders_that_differ(tmp_path):
    from safetensors.torch import load_file, save_file

    _, export = _export(tmp_path, _description())
    interop.export_to_diffusers(export, str(tmp_path / "hf"))
    weights = tmp_path / "hf" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"] += 1e-3
    save_file(tensors, str(weights))
    with pytest.raises(interop.InteropError, match=r"transformer_blocks\.1: .*timestep_embedder"):
        interop.import_from_diffusers(str(tmp_path / "hf"), str(tmp_path / "back"))


def test_dit_pipeline_runs_from_our_export(tmp_path):
    description = _description(num_classes=1000, data=_latent_data())
    _, export = _export(tmp_path, description)
    vae = _tiny_vae(tmp_path / "vae")
    done = interop.export_to_diffusers(export, str(tmp_path / "pipe"), vae_uri=vae)
    assert done["kind"] == "DiTPipeline"
    pipe = diffusers.DiTPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert isinstance(pipe.scheduler, diffusers.DDPMScheduler)
    assert pipe.get_label_ids(["tench"]) == [0]  # ImageNet id2label
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[0, 207], num_inference_steps=3, guidance_scale=1.5, output_type="np",
                  generator=torch.manual_seed(0)).images
    assert images.shape == (2, 64, 64, 3) and images.min() >= 0 and images.max() <= 1
    # The pipeline folder imports back too, bit-exact.
    back = interop.import_from_diffusers(str(tmp_path / "pipe"), str(tmp_path / "back"))
    original, _ = read_weights(export, None, "x")
    restored, _ = read_weights(back["export"], None, "x")
    assert all(torch.equal(restored[k], v) for k, v in original.items())


def test_pixel_model_samples_in_dit_pipeline_with_the_pixel_decoder(tmp_path):
    _, export = _export(tmp_path, _description())
    interop.export_to_diffusers(export, str(tmp_path / "hf"))
    transformer = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path / "hf"))
    scheduler = diffusers.DDPMScheduler.from_pretrained(str(tmp_path / "hf"))
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=interop.PixelSpaceDecoder(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[0, 9], num_inference_steps=3, guidance_scale=2.0, output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    with pytest.raises(interop.InteropError, match="works on pixels"):
        interop.export_to_diffusers(export, str(tmp_path / "pipe"), vae_uri=_tiny_vae(tmp_path / "vae"))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_scheduler_config_matches_our_betas(schedule):
    from speed.diffusion.gaussian import get_beta_schedule

    description = dataclasses.replace(_description(), schedule=schedule, num_timesteps=500)
    scheduler = interop.ddpm_scheduler(description)
    ours = torch.from_numpy(get_beta_schedule(schedule, 500)).float()
    torch.testing.assert_close(scheduler.betas, ours, rtol=1e-5, atol=1e-7)


def test_model_card_and_flow_models_export_the_transformer_only(tmp_path):
    description = dataclasses.replace(_description(learn_sigma=False), objective="flow", step=7)
    run = tmp_path / "run"
    _export(run, description)
    cfg = Config()
    cfg.data.format = "digits"
    (run / "config.yaml").write_text(json.dumps(to_dict(cfg)))
    done = interop.export_to_diffusers(str(run), str(tmp_path / "hf"), vae_uri=str(tmp_path / "no-vae-needed"))
    assert done["kind"] == "DiTTransformer2DModel" and done["objective"] == "flow"
    assert "DiTPipeline samples DDPM" in done["message"]
    assert not (tmp_path / "hf" / "scheduler_config.json").exists()
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| objective | flow" in card and "| timestep strategy | speed" in card and "tau=700" in card
    assert "digits" in card and "DiTPipeline samples DDPM" in card


def test_export_refuses_what_diffusers_dit_cannot_hold(tmp_path):
    _, export = _export(tmp_path, _description(mlp_ratio=2.0))
    with pytest.raises(interop.InteropError, match="mlp_ratio=2"):
        interop.export_to_diffusers(export, str(tmp_path / "hf"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    _, ok = _export(tmp_path, _description(), name="ok")
    with pytest.raises(interop.InteropError, match="not empty"):
        interop.export_to_diffusers(ok, str(tmp_path / "full"))


def test_cli_prints_one_json_line_each_way(tmp_path, capsys):
    from ray_jobs import export_diffusers

    _, export = _export(tmp_path, _description())
    assert export_diffusers.main([export, str(tmp_path / "hf")]) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["event"] == "export_diffusers_done" and done["direction"] == "to_diffusers"
    assert export_diffusers.main([str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["direction"] == "from_diffusers" and Path(done["export"]).is_file()
    assert export_diffusers.main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    failed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert failed["event"] == "export_diffusers_failed" and "SRC" in failed["error"] and "missing" in failed["error"]


@pytest.mark.s3
def test_export_and_import_through_object_storage(tmp_path, s3_bucket):
    _, export = _export(tmp_path, _description())
    done = interop.export_to_diffusers(export, f"{s3_bucket}/hf/digits")
    assert done["folder"] == f"{s3_bucket}/hf/digits"
    assert interop.is_diffusers_folder(f"{s3_bucket}/hf/digits")
    back = interop.import_from_diffusers(f"{s3_bucket}/hf/digits", f"{s3_bucket}/exports/back")
    original, _ = read_weights(export, None, "x")
    restored, _ = read_weights(back["export"], None, "x")
    assert all(torch.equal(restored[k], v) for k, v in original.items())
