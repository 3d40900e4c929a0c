"""Worker sizing from the cluster (ray.cpus_per_worker=auto) and requests that can never be placed."""

from __future__ import annotations

import pytest

from ray_jobs.resources import ClusterCapacity, plan_cpus_per_worker
from speed.config import ConfigError, load_config

TWO_CORES = ClusterCapacity(total_cpus=2, node_cpus=[2], total_gpus=0)
PARQUET = ["data.format=parquet", "data.uri=s3://bucket/digits"]


def plan(capacity, *overrides):
    return plan_cpus_per_worker(load_config(None, list(overrides)), capacity)


def test_auto_gives_in_memory_digits_the_whole_machine():
    assert plan(TWO_CORES) == 2.0
    assert plan(TWO_CORES, "ray.num_workers=2") == 1.0
    assert plan(ClusterCapacity(16, [8, 8], 0), "ray.num_workers=2") == 8.0


def test_auto_leaves_room_for_data_reads_when_streaming():
    assert plan(TWO_CORES, *PARQUET) == 1.0
    assert plan(TWO_CORES, *PARQUET, "ray.num_workers=2") == 0.5
    assert plan(ClusterCapacity(1, [1], 0), *PARQUET) == 0.75  # data.read_cpus=0.25 kept


def test_requests_that_can_never_fit_name_the_keys_and_what_the_cluster_has():
    with pytest.raises(ConfigError, match=r"ray.num_workers=2 x ray.cpus_per_worker=2 can never be placed: "
                                          r"the cluster has 2 CPUs on 1 node"):
        plan(TWO_CORES, "ray.num_workers=2", "ray.cpus_per_worker=2")
    with pytest.raises(ConfigError, match=r"ray.cpus_per_worker=5 can never be placed.*\(4, 4\)"):
        plan(ClusterCapacity(8, [4, 4], 0), "ray.cpus_per_worker=5")
    with pytest.raises(ConfigError, match="ray.num_workers=16 cannot be placed with ray.cpus_per_worker=auto"):
        plan(TWO_CORES, "ray.num_workers=16", "train.global_batch_size=64")
    with pytest.raises(ConfigError, match="needs 2 GPU"):
        plan(TWO_CORES, "ray.num_workers=2", "ray.use_gpu=true")


def test_a_worker_that_takes_every_cpu_while_streaming_is_refused():
    with pytest.raises(ConfigError, match=r"data.read_cpus.*ray.cpus_per_worker=2 take 2 of the 2 CPUs"):
        plan(TWO_CORES, *PARQUET, "ray.cpus_per_worker=2")
    assert plan(TWO_CORES, *PARQUET, "ray.cpus_per_worker=1.5") == 1.5


def test_a_cluster_that_can_grow_gets_the_explicit_request():
    cfg = load_config(None, ["ray.num_workers=4", "ray.cpus_per_worker=8"])
    assert plan_cpus_per_worker(cfg, TWO_CORES, can_grow=True) == 8.0
