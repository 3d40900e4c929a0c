"""Elastic training on a two-node local Ray cluster (run in its own process by test_elastic.py).

Starts ray.cluster_utils.Cluster with two single-CPU nodes and trains with ray.num_workers=[1, 2].
After a checkpoint has been committed it removes the second node (the run must restart from its
latest checkpoint with one worker), then adds a node back (the run must grow to two workers at the
next resize check). Prints one JSON line: the (step, world_size) records as they appeared over time,
the checkpoints complete when the node was removed, and the final metrics log.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

CHECKPOINT_EVERY = 4
LOG_EVERY = 2
STEPS = 60


def main(output_dir: str) -> int:
    # Ray's resource view refreshes every ~20 s, so the first restart after a node loss may still
    # ask for two workers; a short start-up timeout makes that attempt give up sooner.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "20"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    second = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    from ray_jobs import train as train_job
    from speed import storage
    from speed.train.run_layout import RunLayout

    from tests.conftest import TINY_TRAIN

    args = [
        *TINY_TRAIN, f"train.log_every={LOG_EVERY}", f"train.checkpoint_every={CHECKPOINT_EVERY}",
        "train.keep_checkpoints=50", "ray.cpus_per_worker=1", "ray.num_workers=[1,2]", "ray.max_failures=5",
        "ray.resize_interval_s=3", f"train.steps={STEPS}", f"run.output_uri={output_dir}", "run.name=elastic",
    ]
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", train_job.main(args)))
    thread.start()
    run_dir = Path(output_dir) / "elastic"
    layout = RunLayout(str(run_dir))
    observed = []  # (step, world_size) in the order they first appeared

    def records():
        # A restart drops the metrics parts after its checkpoint: a part listed a moment ago may be
        # gone when it is read; the next poll reads again.
        try:
            return layout.read_metrics()
        except (OSError, storage.StorageError):
            return []

    def poll():
        for record in records():
            entry = [record["step"], record["world_size"]]
            if entry not in observed:
                observed.append(entry)
        return observed

    def wait_for(predicate, what, timeout=420):
        deadline = time.time() + timeout
        while not predicate(poll()):
            if time.time() > deadline or not thread.is_alive():
                print(json.dumps({"error": f"timed out waiting for {what}", "observed": observed}), flush=True)
                raise SystemExit(1)
            time.sleep(0.25)

    # A record two log steps past a checkpoint means every rank got through that checkpoint's report.
    wait_for(lambda seen: any(ws == 2 and step >= CHECKPOINT_EVERY + LOG_EVERY for step, ws in seen),
             "two workers past the first committed checkpoint")
    complete = sorted(json.loads((Path(uri) / "state.json").read_text())["step"]
                      for _, uri in layout.checkpoints() if (Path(uri) / "state.json").exists())
    cluster.remove_node(second)
    wait_for(lambda seen: any(ws == 1 for _, ws in seen), "shrink to one worker")
    cluster.add_node(num_cpus=1)
    shrunk = len(observed)
    wait_for(lambda seen: any(ws == 2 for _, ws in seen[shrunk:]), "grow back to two workers")
    thread.join(timeout=600)
    poll()
    history = records()
    print(json.dumps({
        "code": result.get("code"),
        "observed": observed,
        "checkpoints_at_removal": complete,
        "final_steps": [r["step"] for r in history],
        "global_batches": sorted({r["global_batch_size"] for r in history}),
    }), flush=True)
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
