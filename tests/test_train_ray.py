"""The training job on Ray Train: two FSDP2 workers over gloo, data streamed from the S3 test
server, checkpoints in the bucket, resume (also with fewer workers), and the failures that must
stop before any training starts."""

from __future__ import annotations

import json

import boto3
import pytest

from ray_jobs import prepare as prepare_job
from ray_jobs import train as train_job
from tests.conftest import TINY_TRAIN

pytestmark = [pytest.mark.ray, pytest.mark.s3]

TINY = [*TINY_TRAIN, "train.micro_batch_size=8", "train.checkpoint_every=2"]


def last_json(out: str) -> dict:
    lines = [l for l in out.splitlines() if l.startswith("{")]
    assert lines, out
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def digits_parquet_uri(ray_session, s3_endpoint):
    bucket = "train-data"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/digits-parquet"
    code = prepare_job.main(
        ["-c", "configs/prepare/digits.yaml", f"prepare.output_uri={uri}", "prepare.format=parquet",
         "prepare.image_size=8", "prepare.channels=1", "prepare.num_shards=4"]
    )
    assert code == 0
    return uri


def test_two_fsdp_workers_from_s3_checkpoint_and_resume(digits_parquet_uri, s3_bucket, s3_endpoint, capsys):
    data = ["data.format=parquet", f"data.uri={digits_parquet_uri}", "data.resolution=8", "data.channels=1"]
    common = [*TINY, *data, f"run.output_uri={s3_bucket}/runs", "run.name=fsdp-s3"]
    assert train_job.main([*common, "train.steps=4", "ray.num_workers=2", "parallel.strategy=fsdp"]) == 0
    first = last_json(capsys.readouterr().out)
    assert first["event"] == "train_done" and first["steps"] == 4 and first["start_step"] == 0
    assert first["export"].endswith("export/ema.safetensors")
    bucket = s3_bucket.removeprefix("s3://")
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket, Prefix="runs/fsdp-s3/")["Contents"]]
    assert any("checkpoint_" in k and k.endswith("state.json") for k in keys)
    assert any(k.endswith(".metadata") for k in keys) and any(k.endswith(".distcp") for k in keys)
    assert any(k.startswith("runs/fsdp-s3/metrics-") and k.endswith(".jsonl") for k in keys)

    # Same run.name again, one worker instead of two: resumes from step 4 (DCP reshards).
    assert train_job.main([*common, "train.steps=6", "ray.num_workers=1"]) == 0
    second = last_json(capsys.readouterr().out)
    assert second["start_step"] == 4 and second["steps"] == 6


def test_failures_before_training(s3_endpoint, s3_bucket, tmp_path, capsys, monkeypatch):
    # Bad config: one clear line naming the key, exit code 2.
    assert train_job.main([*TINY, "train.stepz=3"]) == 2
    assert "unknown config key 'train.stepz'" in capsys.readouterr().err
    # Missing bucket.
    assert train_job.main([*TINY, "run.output_uri=s3://no-such-bucket-xyz/runs"]) == 2
    assert "bucket 'no-such-bucket-xyz' does not exist" in capsys.readouterr().err
    # Unreachable endpoint.
    assert train_job.main([*TINY, f"run.output_uri={s3_bucket}/runs", "storage.endpoint_url=http://127.0.0.1:9",
                           "storage.connect_timeout_s=1"]) == 2
    assert "cannot reach endpoint http://127.0.0.1:9" in capsys.readouterr().err
    # A checkpoint URI that does not exist.
    assert train_job.main([*TINY, f"run.output_uri={tmp_path}", f"train.resume_from={tmp_path}/nope"]) == 2
    assert "train.resume_from: checkpoint" in capsys.readouterr().err


def test_checkpoint_of_another_model_size_is_refused(tmp_path, capsys):
    from speed.config import load_config
    from speed.train.checkpoint import TrainState
    from speed.models import describe

    cfg = load_config(None, [*TINY, f"run.output_uri={tmp_path}", "run.name=sized"])
    ckpt = tmp_path / "sized" / "checkpoint_0000002"
    ckpt.mkdir(parents=True)
    state = TrainState(step=2, description=json.loads(describe(cfg.model, cfg.data, cfg.diffusion).to_json()))
    (ckpt / "state.json").write_text(state.to_json())
    assert train_job.main([*TINY, f"run.output_uri={tmp_path}", "run.name=sized", "model.name=DiT-T/2"]) == 2
    err = capsys.readouterr().err
    assert "model.name='DiT-N/2'" in err and "model.name='DiT-T/2'" in err
    # The same model, but its only checkpoint lacks its shards: refused rather than started afresh
    # over the run's metrics.
    assert train_job.main([*TINY, f"run.output_uri={tmp_path}", "run.name=sized"]) == 2
    err = capsys.readouterr().err
    assert "none is complete" in err and ".metadata is missing" in err
