"""The Ray jobs: batch sampling (determinism across actor counts, resume), the grid job, evaluation."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from speed import storage
from speed.config import load_config
from speed.sample import NpzArray, NpzWriter, decode_shard, shard_uri
from tests.test_sample import random_export, save_training_checkpoint

pytestmark = pytest.mark.ray

NUM_SAMPLES = 18
BATCH = 4


def last_json(captured: str) -> dict:
    return json.loads(captured.strip().splitlines()[-1])


def inference_args(export: str, output: str, actors: int, run_dir) -> list:
    return ["model.name=DiT-N/2", "sampling.steps=5", "sampling.guidance_scale=2.0",
            f"inference.checkpoint_uri={export}", f"inference.output_uri={output}",
            f"inference.num_samples={NUM_SAMPLES}", f"inference.batch_size={BATCH}",
            f"inference.num_actors={actors}", f"run.output_uri={run_dir}"]


def read_npz(uri: str):
    with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    _, uri = random_export(tmp_path_factory.mktemp("export"))
    return uri


@pytest.fixture(scope="module")
def one_actor_run(ray_session, export, tmp_path_factory):
    """The reference run: one actor, local output."""
    from ray_jobs import inference

    root = tmp_path_factory.mktemp("one-actor")
    output = str(root / "samples")
    record = inference.run_inference(load_config(None, inference_args(export, output, 1, root)))
    return output, record


def test_npz_has_adm_keys_dtype_and_shape(one_actor_run):
    output, record = one_actor_run
    assert record["num_samples"] == NUM_SAMPLES and record["npz"] == os.path.join(output, "samples.npz")
    assert record["images_per_sec"] > 0 and record["shards_sampled"] == 5
    data = read_npz(record["npz"])
    assert sorted(data) == ["arr_0", "arr_1"]
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (NUM_SAMPLES, 8, 8, 1)
    assert data["arr_1"].tolist() == [i % 10 for i in range(NUM_SAMPLES)]
    assert Image.open(os.path.join(output, "preview.png")).format == "PNG"
    assert json.loads(Path(output, "sample_result.json").read_text())["npz"] == record["npz"]


def test_two_actors_on_s3_give_identical_images(one_actor_run, export, s3_bucket, tmp_path, capsys):
    from ray_jobs import inference

    output = f"{s3_bucket}/samples"
    assert inference.main(inference_args(export, output, 2, tmp_path)) == 0
    record = last_json(capsys.readouterr().out)
    assert record["event"] == "sample_done" and record["num_actors"] == 2
    assert record["npz"] == f"{output}/samples.npz"
    two = read_npz(record["npz"])
    one = read_npz(one_actor_run[1]["npz"])
    assert np.array_equal(two["arr_0"], one["arr_0"]) and np.array_equal(two["arr_1"], one["arr_1"])
    assert np.array_equal(NpzArray(record["npz"]).read(5, 9), one["arr_0"][5:9])  # ranged reads from S3


def test_deleting_a_shard_regenerates_only_that_shard(one_actor_run, export, tmp_path, capsys):
    from ray_jobs import inference

    output = str(tmp_path / "samples")
    shutil.copytree(one_actor_run[0], output)  # a finished run's folder, as a killed rerun would find it
    args = inference_args(export, output, 1, tmp_path)
    first = read_npz(os.path.join(output, "samples.npz"))
    shards = sorted(Path(output, "shards").iterdir())
    assert len(shards) == 5
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    victim = Path(shard_uri(output, 8, 12))
    victim.unlink()
    assert inference.main(args) == 0
    record = last_json(capsys.readouterr().out)
    assert record["shards_sampled"] == 1 and record["shards_reused"] == 4 and record["generated"] == BATCH
    for shard in Path(output, "shards").iterdir():
        if shard.name != victim.name:
            assert shard.stat().st_mtime_ns == stamps[shard.name], shard.name
    images, labels, indices = decode_shard(victim.read_bytes())
    assert indices.tolist() == [8, 9, 10, 11] and np.array_equal(images, first["arr_0"][8:12])
    assert np.array_equal(read_npz(record["npz"])["arr_0"], first["arr_0"])
    # Changing what determines the images is refused rather than mixed into the same folder.
    assert inference.main([*args, "inference.seed=5"]) == 2
    assert "inference.output_uri" in capsys.readouterr().err


def test_sample_grid_job(ray_session, export, tmp_path, capsys):
    from ray_jobs import sample

    png = str(tmp_path / "grid.png")
    assert sample.main(["model.name=DiT-N/2", "sampling.steps=5", "sampling.guidance_scale=1.5",
                        f"sample.checkpoint_uri={export}", f"sample.output_uri={png}", "sample.classes=[1,7]",
                        "sample.per_class=3", f"run.output_uri={tmp_path}"]) == 0
    record = last_json(capsys.readouterr().out)
    assert record["event"] == "sample_grid_done" and record["num_images"] == 6 and record["guidance_scale"] == 1.5
    # 2 rows x 3 columns of 8 px cells (2 px padding), upscaled x4.
    assert Image.open(png).size == ((3 * 10 + 2) * 4, (2 * 10 + 2) * 4)



def test_jobs_sample_a_training_checkpoint_a_run_folder_and_the_default_export(ray_session, tmp_path, capsys):
    """What python -m ray_jobs.train prints is what the sampling jobs take: its checkpoint, its run
    folder (newest complete checkpoint while there is no export) and, with no key, the run's export."""
    from speed.train.run_layout import RunLayout

    from ray_jobs import inference, sample

    run_args = [f"run.output_uri={tmp_path}", "run.name=r1"]
    layout = RunLayout.for_run(load_config(None, run_args).run)
    checkpoint = layout.checkpoint_uri(4)
    save_training_checkpoint(checkpoint, step=4)
    grid = ["model.name=DiT-N/2", "sampling.steps=3", "sample.classes=[1]", "sample.per_class=2", *run_args]
    assert sample.main([*grid, f"sample.checkpoint_uri={layout.root}"]) == 0
    record = last_json(capsys.readouterr().out)
    assert record["event"] == "sample_grid_done" and record["weights"] == checkpoint and record["model_step"] == 4
    output = str(tmp_path / "from-checkpoint")
    assert inference.main([*inference_args(checkpoint, output, 1, tmp_path), *run_args,
                           "inference.num_samples=4", "sampling.steps=3"]) == 0
    record = last_json(capsys.readouterr().out)
    assert record["event"] == "sample_done" and record["weights"] == checkpoint and record["generated"] == 4
    random_export(layout.export_uri)
    assert sample.main(grid) == 0  # no key: the run's export
    record = last_json(capsys.readouterr().out)
    assert record["weights"] == os.path.join(layout.export_uri, "ema.safetensors") and record["model_step"] == 0

def test_evaluate_job_digits(one_actor_run, tmp_path, capsys):
    from ray_jobs import evaluate

    output, _ = one_actor_run
    assert evaluate.main([f"eval.samples_uri={output}", f"run.output_uri={tmp_path}", "eval.batch_size=8"]) == 0
    record = last_json(capsys.readouterr().out)
    assert record["event"] == "evaluate_done" and record["feature_extractor"] == "digits"
    for key in ("fid", "digits_fid", "inception_score", "precision", "recall", "class_accuracy"):
        assert record[key] is not None and np.isfinite(record[key]), key
    assert record["num_samples"] == NUM_SAMPLES and record["num_reference"] == 1797
    assert 1.0 <= record["inception_score"] <= 10.0
    written = json.loads(Path(output, "samples.eval.json").read_text())
    assert written["fid"] == pytest.approx(record["fid"])
    assert (tmp_path / "cache").is_dir()  # the classifier was cached under run.output_uri


def test_evaluate_job_with_dataset_reference_caches_statistics(one_actor_run, tmp_path, capsys):
    from speed.data.digits import load_digits
    from speed.data.transforms import to_uint8_images

    from ray_jobs import evaluate

    images, labels = load_digits(8, 1)
    pixels = to_uint8_images(images[:60])
    for k, (image, label) in enumerate(zip(pixels, labels[:60].tolist())):
        folder = tmp_path / "reference" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(folder / f"{k:03d}.png")
    output, _ = one_actor_run
    args = [f"eval.samples_uri={output}/samples.npz", f"eval.reference_uri={tmp_path / 'reference'}",
            f"run.output_uri={tmp_path}", "eval.batch_size=16"]
    assert evaluate.main(args) == 0
    record = last_json(capsys.readouterr().out)
    cache = tmp_path / "reference.digits-reference.npz"
    assert cache.exists() and record["num_reference"] == 60 and record["num_reference_pr"] == 60
    # A second evaluation finds the statistics cached beside the dataset and extracts nothing for it.
    cfg = load_config(None, args)
    spec = evaluate.build_extractor_spec(cfg)
    plan = evaluate.plan_reference(cfg, spec, (8, 8, 1))
    assert plan.ready is not None and plan.source is None
    assert plan.ready.stats.count == 60 and plan.ready.features.shape == (60, 128)
    changed = evaluate.plan_reference(cfg, spec, (16, 16, 1))  # another crop size: not the cached one
    assert changed.ready is None and changed.source is not None


@pytest.mark.slow
def test_evaluate_job_inception_path_with_random_weights(ray_session, tmp_path):
    """The Inception pipeline end to end, shape-wise: random weights (hash check bypassed only through
    the library argument), an ADM-style reference batch with stored mu/sigma."""
    from ray_jobs import evaluate
    from tests.test_evaluate import save_random_inception_weights

    weights = save_random_inception_weights(tmp_path / "random-inception.pth")
    rng = np.random.default_rng(0)
    samples = tmp_path / "samples.npz"
    with NpzWriter(str(samples)) as writer:
        writer.write_array("arr_0", (6, 16, 16, 3), np.uint8, [rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)])
    reference = tmp_path / "ref.npz"
    np.savez(reference, arr_0=rng.integers(0, 255, (5, 16, 16, 3), dtype=np.uint8),
             mu=np.zeros(2048), sigma=np.eye(2048))
    cfg = load_config(None, [f"eval.samples_uri={samples}", f"eval.reference_uri={reference}",
                             "eval.feature_extractor=inception", f"eval.inception_weights={weights}",
                             f"run.output_uri={tmp_path}", "eval.batch_size=4", "eval.pr_k=2"])
    with pytest.raises(Exception, match="6726825d"):
        evaluate.run_evaluation(cfg)  # the config path always checks the hash
    record = evaluate.run_evaluation(cfg, inception_sha256=None)
    assert record["num_samples"] == 6 and record["num_reference_pr"] == 5
    assert np.isfinite(record["fid"]) and record["inception_score"] >= 1.0
    assert 0.0 <= record["precision"] <= 1.0 and 0.0 <= record["recall"] <= 1.0
    assert (tmp_path / "ref.inception-reference.npz").exists()

