"""Elastic training on a two-node local Ray cluster (run in its own process by test_elastic.py).

Starts ray.cluster_utils.Cluster with two single-CPU nodes, trains with ray.num_workers=[1, 2],
removes the second node after the first checkpoint (the run restarts from its latest checkpoint
with one worker), adds a node back (the run grows to two workers again at the next resize check),
and prints one JSON line with what happened.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path


def main(output_dir: str) -> int:
    os.environ["SPEED_RESIZE_INTERVAL_S"] = "3"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    second = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    from ray_jobs import train as train_job

    args = [
        "model.name=DiT-N/2", "train.global_batch_size=16", "train.micro_batch_size=16", "train.log_every=2",
        "train.checkpoint_every=2", "train.eval_every=0", "train.sample_every=0", "train.eval_num_samples=20",
        "sample.classes=[0,1]", "sample.per_class=1", "sampling.steps=5", "ray.cpus_per_worker=1",
        "ray.num_workers=[1,2]", "ray.max_failures=5", "train.steps=60", f"run.output_uri={output_dir}",
        "run.name=elastic",
    ]
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", train_job.main(args)))
    thread.start()
    run_dir = Path(output_dir) / "elastic"
    metrics = run_dir / "metrics.jsonl"

    def records():
        if not metrics.exists():
            return []
        return [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]

    def wait_for(predicate, what, timeout=300):
        deadline = time.time() + timeout
        while not predicate():
            if time.time() > deadline or not thread.is_alive():
                raise SystemExit(f"timed out waiting for {what}")
            time.sleep(0.5)

    wait_for(lambda: any(r["world_size"] == 2 for r in records()), "two workers")
    wait_for(lambda: any((p / "state.json").exists() for p in run_dir.glob("checkpoint_*")), "a checkpoint")
    cluster.remove_node(second)
    removed_at = max(r["step"] for r in records())
    wait_for(lambda: any(r["world_size"] == 1 and r["step"] > removed_at for r in records()), "shrink to one worker")
    cluster.add_node(num_cpus=1)
    shrunk_at = max(r["step"] for r in records())
    wait_for(lambda: any(r["world_size"] == 2 and r["step"] > shrunk_at for r in records()), "grow back to two")
    thread.join(timeout=600)
    history = records()
    print(json.dumps({
        "code": result.get("code"),
        "world_sizes": [r["world_size"] for r in history],
        "steps": [r["step"] for r in history],
        "global_batches": sorted({r["global_batch_size"] for r in history}),
    }), flush=True)
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
