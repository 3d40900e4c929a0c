"""Session-wide fixtures: one S3 test server (moto) and one local Ray instance for the whole run.

The S3 server runs in its own process on 127.0.0.1 and is reached through the real boto3 and
pyarrow clients over HTTP. Its address and dummy credentials go into the environment before Ray
starts, so Ray workers inherit them just as production workers inherit the real ones.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from speed.testing import free_port, moto_s3  # noqa: F401  (free_port: re-exported to tests)

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_ACCESS_KEY = "speedtestaccesskey"
TEST_SECRET_KEY = "speedtestsecret-do-not-log-0123456789"

# The smallest training run of the Ray tests: DiT-N/2 on the digits, no periodic eval or sampling,
# a tiny end-of-run evaluation; tests append what they vary (later overrides win).
TINY_TRAIN = [
    "model.name=DiT-N/2",
    "train.global_batch_size=16",
    "train.micro_batch_size=16",
    "train.log_every=2",
    "train.eval_every=0",
    "train.sample_every=0",
    "train.eval_num_samples=20",
    "sample.classes=[0,1]",
    "sample.per_class=1",
    "sampling.steps=5",
    "ray.cpus_per_worker=0.5",
]

# Tests never leave the machine, never spin OpenMP threads and never pick up a stray cluster.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start moto's S3 server on 127.0.0.1 and point the AWS environment variables at it."""
    with moto_s3(TEST_ACCESS_KEY, TEST_SECRET_KEY) as (endpoint, _):
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket; yields its s3:// URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for the whole test session (never attaches to another cluster)."""
    import ray

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO_ROOT)}},
    )
    yield ray
    ray.shutdown()
