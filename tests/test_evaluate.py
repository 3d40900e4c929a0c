"""Evaluation library (no Ray): FID, IS, precision/recall, Inception weights, the digits classifier, and
a short CPU training run whose samples the classifier must recognise."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from speed.config import load_config
from speed.diffusion import create_diffusion
from speed.evaluate import (
    INCEPTION_WEIGHTS_FILE,
    ExtractorSpec,
    InceptionWeightsError,
    RunningStatistics,
    digits_metrics,
    feature_statistics,
    frechet_distance,
    get_digits_classifier,
    inception_score,
    load_inception,
    load_inception_state_dict,
    precision_recall,
)
from speed.evaluate import digits as digits_module
from speed.sample import NpzWriter, generate, load_sampling_model
from speed.models import build_model, describe
from speed.models.export import save_export


class PassThrough(torch.nn.Module):
    """A torchmetrics ``feature=`` module for features computed elsewhere."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def gaussian_features(n, dim, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, dim)) * scale + shift).astype(np.float32)


# --- FID and IS ------------------------------------------------------------------------------------


def test_frechet_distance_matches_torchmetrics_on_shared_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real = gaussian_features(600, 16, 0)
    fake = gaussian_features(500, 16, 1, shift=0.3, scale=1.2)
    metric = FrechetInceptionDistance(feature=PassThrough(16), reset_real_features=False)
    metric.update(torch.from_numpy(real).double(), real=True)
    metric.update(torch.from_numpy(fake).double(), real=False)
    a, b = feature_statistics(real), feature_statistics(fake)
    ours = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert ours == pytest.approx(float(metric.compute()), rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
    features = gaussian_features(1000, 32, 2)
    base = feature_statistics(features)
    assert abs(frechet_distance(base.mu, base.sigma, base.mu, base.sigma)) < 1e-6
    rng = np.random.default_rng(3)
    distances = []
    for noise in (0.1, 0.3, 1.0):
        noisy = feature_statistics(features + noise * rng.standard_normal(features.shape))
        distances.append(frechet_distance(noisy.mu, noisy.sigma, base.mu, base.sigma))
    assert 0 < distances[0] < distances[1] < distances[2]


def test_running_statistics_equal_batch_statistics():
    features = gaussian_features(301, 8, 4, shift=5.0)
    left, right = RunningStatistics(8).update(features[:100]), RunningStatistics(8).update(features[100:])
    merged = left.merge(right).result()
    direct = feature_statistics(features)
    np.testing.assert_allclose(merged.mu, direct.mu, rtol=1e-10)
    np.testing.assert_allclose(merged.sigma, direct.sigma, rtol=1e-8, atol=1e-10)
    assert merged.count == 301


def test_inception_score_matches_torchmetrics_and_bounds():
    from torchmetrics.image.inception import InceptionScore

    logits = gaussian_features(400, 12, 5, scale=3.0)
    metric = InceptionScore(feature=PassThrough(12), splits=1)
    metric.update(torch.from_numpy(logits).double())
    assert inception_score(logits) == pytest.approx(float(metric.compute()[0]), rel=1e-6)
    assert inception_score(np.zeros((50, 10))) == pytest.approx(1.0)
    confident = np.eye(10)[np.arange(100) % 10] * 50.0
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-3)


# --- precision and recall --------------------------------------------------------------------------


def brute_force_precision_recall(real, fake, k):
    from scipy.spatial.distance import cdist

    def radii(x):
        return np.sort(cdist(x, x, "sqeuclidean"), axis=1)[:, k]

    cross = cdist(fake, real, "sqeuclidean")
    precision = (cross <= radii(real)[None, :]).any(axis=1).mean()
    recall = (cross <= radii(fake)[:, None]).any(axis=0).mean()
    return precision, recall


def test_precision_recall_on_gaussian_clouds_with_known_overlap():
    real = gaussian_features(1000, 2, 10)
    same = gaussian_features(1000, 2, 11)
    p_same, r_same = precision_recall(real, same, k=3, batch_size=300)
    assert p_same > 0.9 and r_same > 0.9
    # Half the generated samples lie in a far-away cloud: precision halves, recall is kept.
    half = np.concatenate([gaussian_features(500, 2, 12), gaussian_features(500, 2, 13, shift=50.0)])
    p_half, r_half = precision_recall(real, half, k=3)
    assert p_half == pytest.approx(0.5 * p_same, abs=0.05)
    assert r_half > 0.85
    # Disjoint clouds: nothing of either set is inside the other's manifold.
    assert precision_recall(real, gaussian_features(1000, 2, 14, shift=50.0), k=3) == (0.0, 0.0)
    # Mode collapse: every sample looks real, but most of the real data is not covered.
    p_collapsed, r_collapsed = precision_recall(real, gaussian_features(1000, 2, 15, scale=0.05), k=3)
    assert p_collapsed > 0.99 and r_collapsed < 0.1
    # Block sizes do not change the answer, which equals the definition computed directly.
    expected = brute_force_precision_recall(real.astype(np.float64), half.astype(np.float64), 3)
    assert precision_recall(real, half, k=3, batch_size=64) == pytest.approx(expected, abs=2e-3)


# --- Inception weights -----------------------------------------------------------------------------


def save_random_inception_weights(path) -> str:
    """torch-fidelity's Inception architecture with random weights, saved like the real file."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            network = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(network.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    return save_random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth")


def test_missing_inception_weights_name_the_key_and_file(tmp_path):
    for uri in (None, str(tmp_path / INCEPTION_WEIGHTS_FILE)):
        with pytest.raises(InceptionWeightsError) as error:
            load_inception_state_dict(uri)
        assert "eval.inception_weights" in str(error.value) and INCEPTION_WEIGHTS_FILE in str(error.value)


def test_wrong_inception_weights_fail_the_hash_check(random_inception_weights):
    with pytest.raises(InceptionWeightsError, match=r"eval.inception_weights: .*SHA-256 .*6726825d"):
        load_inception(random_inception_weights)
    with pytest.raises(InceptionWeightsError, match="6726825d"):
        ExtractorSpec("inception", inception_weights=random_inception_weights).build(torch.device("cpu"))


def test_malicious_pickle_is_refused_by_the_inception_loader(tmp_path):
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save({"fc.weight": RunsCode()}, path)
    with pytest.raises(InceptionWeightsError, match="SHA-256"):
        load_inception_state_dict(str(path))
    # Even with the hash check off, weights_only unpickling refuses to run the code.
    with pytest.raises(InceptionWeightsError, match="refusing to load .*GLOBAL"):
        load_inception_state_dict(str(path), expected_sha256=None)
    assert not marker.exists()


def test_inception_features_have_the_fid_shapes(random_inception_weights):
    network = load_inception(random_inception_weights, expected_sha256=None)
    grey = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 1), dtype=np.uint8)
    features, logits = network.embed(grey)
    assert features.shape == (3, 2048) and logits.shape == (3, 1008)
    assert features.dtype == np.float32 and np.isfinite(features).all() and np.isfinite(logits).all()
    rgb_features, _ = network.embed(np.repeat(grey, 3, axis=-1))
    np.testing.assert_allclose(rgb_features, features, rtol=1e-5, atol=1e-5)


def test_evaluate_job_without_inception_weights_fails_clearly(tmp_path, capsys):
    from ray_jobs import evaluate

    samples = tmp_path / "samples.npz"
    with NpzWriter(str(samples)) as writer:
        writer.write_array("arr_0", (4, 8, 8, 3), np.uint8, [np.zeros((4, 8, 8, 3), np.uint8)])
    code = evaluate.main([f"eval.samples_uri={samples}", "eval.feature_extractor=inception",
                          f"run.output_uri={tmp_path}"])
    captured = capsys.readouterr()
    assert code == 2
    assert "eval.inception_weights is not set" in captured.err and INCEPTION_WEIGHTS_FILE in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["event"] == "evaluate_failed"


# --- the digits classifier -------------------------------------------------------------------------


def test_digits_classifier_heldout_accuracy():
    from speed.data.digits import load_digits

    classifier = get_digits_classifier()
    images, labels = load_digits(8, 1)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(digits_module.CLASSIFIER_SEED))
    heldout = order[: int(round(len(labels) * digits_module.HELDOUT_FRACTION))]
    _, logits = classifier.embed(images[heldout])
    accuracy = float((logits.argmax(1) == labels[heldout].numpy()).mean())
    assert accuracy > 0.95
    assert float(classifier.heldout_accuracy) == pytest.approx(accuracy)


def test_digits_classifier_cache_file(tmp_path, monkeypatch):
    uri = str(tmp_path / "cache" / "digits.safetensors")
    first = get_digits_classifier(uri)
    assert os.path.exists(uri)
    monkeypatch.setattr(digits_module, "_CACHE", {})  # a fresh process: loads the file, no training
    monkeypatch.setattr(digits_module, "train_digits_classifier", lambda *a, **k: pytest.fail("retrained"))
    loaded = get_digits_classifier(uri)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_digits_metrics_real_noisy_and_fast():
    from speed.data.digits import load_digits

    images, labels = load_digits(8, 1)
    get_digits_classifier()  # trained once per process; later calls are what the trainer pays
    began = time.perf_counter()
    real = digits_metrics(images[:500], labels[:500])
    assert time.perf_counter() - began < 2.0
    assert set(real) == {"digits_fid", "precision", "recall", "class_accuracy"}
    assert real["class_accuracy"] > 0.95 and real["precision"] > 0.9 and real["digits_fid"] < 20
    uint8 = ((images[:500] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert digits_metrics(uint8, labels[:500])["digits_fid"] == pytest.approx(real["digits_fid"], rel=0.05)
    rng = torch.Generator().manual_seed(0)
    noisy = (images[:500] + 0.6 * torch.randn(images[:500].shape, generator=rng)).clamp(-1, 1)
    worse = digits_metrics(noisy, labels[:500])
    assert worse["digits_fid"] > 3 * real["digits_fid"] and worse["precision"] < real["precision"]
    assert digits_metrics(images[:500], None)["class_accuracy"] is None


# --- a real (short) training run -------------------------------------------------------------------

TRAINED_OVERRIDES = ["model.name=DiT-N/2", "model.hidden_size=96", "sampling.sampler=ddim", "sampling.steps=25",
                     "sampling.guidance_scale=4.0"]


def train_digits_export(folder, steps: int = 500, seed: int = 0) -> str:
    """A DiT-N/2 (hidden 96) trained briefly on the digits with the hybrid loss; ~30 s on one core."""
    from speed.data.digits import load_digits

    cfg = load_config(None, TRAINED_OVERRIDES)
    description = describe(cfg.model, cfg.data, cfg.diffusion, step=steps)
    images, labels = load_digits(8, 1)
    diffusion = create_diffusion(cfg.diffusion.num_timesteps, cfg.diffusion.schedule, learn_sigma=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # initialisation and label dropout
        model = build_model(cfg.model, description.input_size, description.in_channels)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            batch = torch.randint(0, len(labels), (64,), generator=generator)
            t = torch.randint(0, diffusion.num_timesteps, (64,), generator=generator)
            noise = torch.randn(images[batch].shape, generator=generator)
            loss = diffusion.training_losses(model, images[batch], t, {"y": labels[batch]}, noise=noise)["loss"].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    save_export(model.state_dict(), description, str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def trained_digits_export(tmp_path_factory):
    return train_digits_export(tmp_path_factory.mktemp("trained"))


def test_trained_checkpoint_samples_are_recognised(trained_digits_export):
    cfg = load_config(None, TRAINED_OVERRIDES)
    model, description = load_sampling_model(trained_digits_export)
    labels = np.arange(200) % 10
    images = generate(model, description, cfg.sampling, labels, np.arange(200), seed=0, device="cpu")
    metrics = digits_metrics(images, labels)
    # Chance is 0.1; random-weight models score about that.
    assert metrics["class_accuracy"] > 0.4, metrics
    assert metrics["precision"] > 0.2, metrics


# --- the in-training evaluator of any dataset (speed.evaluate.dataset_fid) --------------------------

from speed.config.schema import DataConfig  # noqa: E402
from speed.data.builtin import load_builtin  # noqa: E402
from speed.evaluate import dataset_fid  # noqa: E402


@pytest.fixture(scope="module")
def quick_evaluators():
    """The digits (8x8 grey) and patches (8x8 RGB) evaluators, trained with fewer steps (tests only)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dataset_fid, "TARGET_STEPS", 150)
        mp.setattr(dataset_fid, "_CACHE", {})
        out = {}
        for fmt, channels in (("digits", 1), ("patches", 3)):
            data = dataset_fid.eval_data_from_config(DataConfig(format=fmt, resolution=8, channels=channels), None, 10)
            out[fmt] = (data, dataset_fid.get_dataset_evaluator(data))
        yield out


@pytest.mark.parametrize("name, other", [("digits", "patches"), ("patches", "digits")])
def test_dataset_evaluator_ranks_real_above_noise_and_another_dataset(quick_evaluators, name, other):
    data, evaluator = quick_evaluators[name]
    channels = 1 if name == "digits" else 3
    images, labels = load_builtin(name, 8, channels)
    train_idx, held_idx = dataset_fid.split_indices(labels)
    assert len(set(train_idx.tolist()) & set(held_idx.tolist())) == 0
    assert len(held_idx) == evaluator.classifier.reference_features.shape[0]
    assert labels[held_idx].bincount().min() > 0.25 * len(labels) / 10  # every class in the reference
    assert evaluator.metric_name == f"fid_{name}" and evaluator.heldout_accuracy > 0.9
    g = torch.Generator().manual_seed(1)
    pick = train_idx[torch.randperm(len(train_idx), generator=g)[:250]]
    real = evaluator.metrics(images[pick], labels[pick])
    assert set(real) == {f"fid_{name}", "precision", "recall", "class_accuracy"}
    noisy = evaluator.metrics((images[pick] + 0.3 * torch.randn(images[pick].shape, generator=g)).clamp(-1, 1))
    noise = evaluator.metrics(torch.rand(250, channels, 8, 8, generator=g) * 2 - 1)
    other_images, other_labels = load_builtin(other, 8, channels)
    foreign = evaluator.metrics(other_images[torch.randperm(len(other_labels), generator=g)[:250]])
    fid = f"fid_{name}"
    assert real[fid] < noisy[fid] < noise[fid] and real[fid] * 5 < foreign[fid], (real, noisy, noise, foreign)
    assert real["class_accuracy"] > 0.9 and real["recall"] > foreign["recall"]
    # uint8 NHWC samples (what generate returns) score as their float form.
    uint8 = ((images[pick] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert evaluator.metrics(uint8)[fid] == pytest.approx(real[fid], rel=0.05)


def test_dataset_evaluator_cache_is_per_dataset(quick_evaluators, tmp_path, monkeypatch):
    digits, patches = quick_evaluators["digits"][0], quick_evaluators["patches"][0]
    assert digits.key != patches.key
    grey16 = dataset_fid.eval_data_from_config(DataConfig(format="digits", resolution=16, channels=1), None, 10)
    assert grey16.key != digits.key
    cache = str(tmp_path / "cache")
    for data, evaluator in quick_evaluators.values():  # write both files
        monkeypatch.setattr(dataset_fid, "_CACHE", {})
        monkeypatch.setattr(dataset_fid, "train_dataset_classifier", lambda *a, _e=evaluator, **k: _e.classifier)
        dataset_fid.get_dataset_evaluator(data, cache)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == sorted([f"eval-digits-{digits.key}.safetensors", f"eval-patches-{patches.key}.safetensors"])
    monkeypatch.setattr(dataset_fid, "_CACHE", {})  # a fresh process: loads the files, no training
    monkeypatch.setattr(dataset_fid, "train_dataset_classifier", lambda *a, **k: pytest.fail("retrained"))
    loaded = dataset_fid.get_dataset_evaluator(patches, cache)
    for key, tensor in quick_evaluators["patches"][1].classifier.state_dict().items():
        assert torch.equal(tensor, loaded.classifier.state_dict()[key]), key
    # A file holding another dataset's classifier is never taken for this one.
    blob = (tmp_path / "cache" / f"eval-digits-{digits.key}.safetensors").read_bytes()
    assert dataset_fid._from_bytes(blob, patches.key) is None and dataset_fid._from_bytes(blob, digits.key) is not None


def test_imagefolder_evaluator_identity(tmp_path):
    from speed.data.patches import write_patches

    root = tmp_path / "My-Patches"
    write_patches(str(root), resolution=8, channels=3)
    data_cfg = DataConfig(format="imagefolder", uri=str(root), resolution=8, channels=3)
    assert dataset_fid.dataset_name(data_cfg) == "my_patches"
    assert dataset_fid.fid_metric_name(data_cfg) == "fid_my_patches"
    first = dataset_fid.eval_data_from_config(data_cfg, None, 10)
    images, labels = first.load()
    assert images.shape == (3000, 3, 8, 8) and labels.bincount().tolist() == [300] * 10
    assert first.key == dataset_fid.eval_data_from_config(data_cfg, None, 10).key
    (root / "0_sky" / "00000.png").unlink()  # the folder changed: another key, so another cache file
    assert dataset_fid.eval_data_from_config(data_cfg, None, 10).key != first.key
    with pytest.raises(ValueError, match="train.eval_every=0"):
        dataset_fid.eval_data_from_config(DataConfig(format="parquet", uri=str(root)), None, 10)


def test_stratified_subset_caps_large_datasets():
    labels = np.repeat(np.arange(4), [1000, 500, 300, 200])
    chosen = dataset_fid._stratified_subset(labels, 1000, 0)
    assert len(chosen) == 1000 and len(set(chosen.tolist())) == 1000
    assert np.bincount(labels[chosen]).tolist() == [500, 250, 150, 100]
    assert np.array_equal(chosen, dataset_fid._stratified_subset(labels, 1000, 0))


def test_trained_samples_score_with_the_dataset_evaluator(trained_digits_export, quick_evaluators):
    cfg = load_config(None, TRAINED_OVERRIDES)
    model, description = load_sampling_model(trained_digits_export)
    labels = np.arange(200) % 10
    images = generate(model, description, cfg.sampling, labels, np.arange(200), seed=0, device="cpu")
    evaluator = quick_evaluators["digits"][1]
    trained = evaluator.metrics(images, labels)
    noise = evaluator.metrics(torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, labels)
    assert trained["class_accuracy"] > 0.4 and trained["fid_digits"] < noise["fid_digits"] / 3, (trained, noise)
