"""How many CPUs each training worker gets, and whether the request can be placed at all.

``ray.cpus_per_worker: auto`` sizes workers from what the cluster has: in-memory digits give
the workers every CPU; streamed formats first leave room for Ray Data's read and decode tasks
(at least one CPU, or ``data.read_cpus`` on a one-CPU machine). An explicit request that can
never be placed (more CPUs than the cluster or any node has, no CPU left for the reads, more GPU
workers than GPUs) stops within seconds with a message naming the keys, instead of waiting
through Ray's worker-group start-up timeouts.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import List

from speed.config import Config, ConfigError, num_workers_range

log = logging.getLogger("speed.train")

# Below this a worker spends more time waiting for its share of a core than computing.
MIN_CPUS_PER_WORKER = 0.25


@dataclass(frozen=True)
class ClusterCapacity:
    total_cpus: float
    node_cpus: List[float]  # CPUs of each alive node
    total_gpus: float

    def describe(self) -> str:
        nodes = ", ".join(f"{c:g}" for c in self.node_cpus)
        return f"{self.total_cpus:g} CPUs on {len(self.node_cpus)} node(s) ({nodes}) and {self.total_gpus:g} GPUs"


def reserved_data_cpus(cfg: Config, capacity: ClusterCapacity) -> float:
    """CPUs kept free for Ray Data while streamed formats train (none for in-memory digits)."""
    if cfg.data.format in ("digits", "patches"):  # built in, in memory
        return 0.0
    return max(cfg.data.read_cpus, 1.0) if capacity.total_cpus >= 2 else cfg.data.read_cpus


def plan_cpus_per_worker(cfg: Config, capacity: ClusterCapacity, *, can_grow: bool = False) -> float:
    """The CPUs each worker asks for; raises ConfigError when the request can never be placed.

    ``can_grow``: a cluster that may add nodes (an autoscaler); an explicit request larger than
    today's cluster is then logged and left to the autoscaler instead of refused."""
    low, high = num_workers_range(cfg.ray)
    reserve = reserved_data_cpus(cfg, capacity)
    largest_node = max(capacity.node_cpus, default=0.0)
    have = f"the cluster has {capacity.describe()}"
    if can_grow and cfg.ray.cpus_per_worker != "auto":
        per = float(cfg.ray.cpus_per_worker)
        if per * low > capacity.total_cpus or (cfg.ray.use_gpu and capacity.total_gpus < low):
            log.warning("ray.num_workers=%s x ray.cpus_per_worker=%g does not fit %s now; waiting for the "
                        "cluster to add nodes", cfg.ray.num_workers, per, capacity.describe())
        return per
    if cfg.ray.use_gpu and capacity.total_gpus < low:
        raise ConfigError(
            f"ray.num_workers={cfg.ray.num_workers} with ray.use_gpu=true needs {low} GPU(s), but {have}; "
            "lower ray.num_workers or add GPU nodes"
        )
    if cfg.ray.cpus_per_worker == "auto":
        per = min((capacity.total_cpus - reserve) / high, largest_node - (reserve if len(capacity.node_cpus) == 1 else 0))
        per = math.floor(per * 20) / 20  # whole twentieths: readable in logs, never over the total
        if per < MIN_CPUS_PER_WORKER:
            raise ConfigError(
                f"ray.num_workers={cfg.ray.num_workers} cannot be placed with ray.cpus_per_worker=auto: {have}, "
                f"{reserve:g} of them kept for data reads, which leaves under {MIN_CPUS_PER_WORKER} CPU per worker; "
                "lower ray.num_workers or add nodes"
            )
        return per
    per = float(cfg.ray.cpus_per_worker)
    if per > largest_node or per * low > capacity.total_cpus:
        raise ConfigError(
            f"ray.num_workers={cfg.ray.num_workers} x ray.cpus_per_worker={per:g} can never be placed: {have}; "
            "lower ray.cpus_per_worker or ray.num_workers, or set ray.cpus_per_worker=auto"
        )
    placed = min(high, math.floor(capacity.total_cpus / per + 1e-9))
    free = capacity.total_cpus - placed * per
    if cfg.data.format not in ("digits", "patches") and free + 1e-9 < cfg.data.read_cpus:
        raise ConfigError(
            f"streaming data.format={cfg.data.format} needs {cfg.data.read_cpus:g} CPU per read task "
            f"(data.read_cpus), but {placed} worker(s) x ray.cpus_per_worker={per:g} take {placed * per:g} of the "
            f"{capacity.total_cpus:g} CPUs, so the reads could never be scheduled; lower ray.cpus_per_worker "
            "(or set it to auto) or ray.num_workers"
        )
    return per


def cluster_can_grow(cfg: Config) -> bool:
    """A cluster this job joined (``ray.address`` / ``RAY_ADDRESS``) may autoscale; a local Ray
    started by the job cannot."""
    import os

    return bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def cluster_capacity() -> ClusterCapacity:
    """What the connected Ray cluster has now (alive nodes only)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = [float(n.get("Resources", {}).get("CPU", 0.0)) for n in nodes]
    gpus = sum(float(n.get("Resources", {}).get("GPU", 0.0)) for n in nodes)
    return ClusterCapacity(total_cpus=sum(node_cpus), node_cpus=node_cpus, total_gpus=gpus)
