"""Running on real clusters: the manifests in cluster/ and the Dockerfile are checked against
requirements.txt and the configs they run, and the whole `ray job submit` path is exercised for
real on a local two-node Ray cluster started by scripts/local_cluster.sh.

The live test never uses the session's local Ray (``ray_session``) and never runs ``ray stop``,
which would kill every Ray process on the machine: the cluster gets its own temp dir and ports,
and the script stops exactly the processes that carry its marker in their environment.

By default the live cluster is a head node only, every port on 127.0.0.1 (about 40% faster on a
2-core machine); SPEED_TEST_CLUSTER_WORKERS=1 adds a worker node process (the script's default),
so that the driver runs on the head and the Train worker on the other node.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import yaml

from speed.config import load_config, num_workers_range

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "aws" / "cluster.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
SCRIPT = ROOT / "scripts" / "local_cluster.sh"
GPUS_PER_POD = 8
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "RAY_AUTH_TOKEN")
PUBLIC_SERVICE_TYPES = ("LoadBalancer", "NodePort")


# --- helpers -------------------------------------------------------------------------------------


def ray_pin() -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"^ray(\[[^\]]*\])?==([\w.]+)", line.strip())
        if match:
            return match.group(2)
    raise AssertionError("requirements.txt pins no ray==X")


def kuberay_docs() -> List[Tuple[str, Dict[str, Any]]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    assert docs, "no manifests in cluster/kuberay"
    return docs


def cluster_specs() -> List[Tuple[str, Dict[str, Any], str]]:
    """(file, RayCluster spec, the job command it is sized for) of every RayCluster and RayJob."""
    specs = []
    for name, doc in kuberay_docs():
        if doc["kind"] == "RayCluster":
            command = doc["metadata"].get("annotations", {}).get("speed.dev/sized-for")
            assert command, f"{name}: annotate the RayCluster with speed.dev/sized-for: <the job it is sized for>"
            specs.append((name, doc["spec"], command))
        elif doc["kind"] == "RayJob":
            specs.append((name, doc["spec"]["rayClusterSpec"], doc["spec"]["entrypoint"]))
    return specs


def parse_job(command: str) -> Tuple[str, Optional[str], List[str]]:
    """`python -m ray_jobs.PHASE -c CONFIG k=v ...` -> (phase, config, overrides)."""
    args = shlex.split(command)
    assert args[:2] == ["python", "-m"] and args[2].startswith("ray_jobs."), command
    phase, rest, config = args[2].split(".", 1)[1], args[3:], None
    if rest[:1] in (["-c"], ["--config"]):
        config, rest = rest[1], rest[2:]
    return phase, config, rest


def job_config(command: str):
    phase, config, overrides = parse_job(command)
    if config is not None and not (ROOT / config).is_file():
        pytest.skip(f"{config} (run by a manifest) is not in this checkout yet")
    return phase, load_config(ROOT / config if config else None, overrides, phase=phase)


def quantity(value: Any) -> float:
    """A Kubernetes CPU quantity ("88", "500m") as a number of CPUs."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def gpu_group(spec: Dict[str, Any], where: str) -> Dict[str, Any]:
    groups = [g for g in spec["workerGroupSpecs"]
              if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0]
    assert len(groups) == 1, f"{where}: expected one GPU worker group"
    return groups[0]


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def pod_templates(spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


# --- the manifests -------------------------------------------------------------------------------


def test_every_manifest_parses_and_names_its_kind():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {p.relative_to(CLUSTER).as_posix() for p in files} >= {
        "runtime_env.yaml", "aws/cluster.yaml", "kuberay/raycluster.yaml",
        "kuberay/rayjob-train.yaml", "kuberay/rayjob-tune.yaml", "kuberay/rayjob-inference.yaml",
    }
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), path
    kinds = [doc["kind"] for _, doc in kuberay_docs()]
    assert set(kinds) == {"RayCluster", "RayJob"} and kinds.count("RayJob") >= 3, kinds
    for name, doc in kuberay_docs():
        assert doc["apiVersion"] == "ray.io/v1", name
        assert doc["metadata"]["name"], name


def test_rayjobs_run_the_three_jobs_with_the_required_fields():
    jobs = {name: doc["spec"] for name, doc in kuberay_docs() if doc["kind"] == "RayJob"}
    commands = {name: parse_job(spec["entrypoint"]) for name, spec in jobs.items()}
    assert commands["rayjob-train.yaml"][:2] == ("train", "configs/imagenet_256/speed.yaml")
    assert commands["rayjob-tune.yaml"][:2] == ("tune", "configs/ablations/imagenet_speed.yaml")
    phase, config, overrides = commands["rayjob-inference.yaml"]
    assert (phase, config) == ("inference", "configs/imagenet_256/speed.yaml")
    assert any(o.startswith("inference.checkpoint_uri=s3://") for o in overrides)
    for name, spec in jobs.items():
        assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode"), name
        assert spec["shutdownAfterJobFinishes"] is True, name
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime_env["env_vars"]["OMP_WAIT_POLICY"] == "PASSIVE", name
        assert "pip" not in runtime_env and "conda" not in runtime_env, f"{name}: the image holds the requirements"
        for key, value in runtime_env["env_vars"].items():
            assert not re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", key), f"{name}: secret {key} in runtimeEnvYAML"


def test_ray_version_and_image_match_requirements_and_dockerfile():
    version = ray_pin()
    dockerfile = (ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile, re.M))
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    match = re.fullmatch(r"rayproject/ray:([\d.]+)-(py\d+)-(gpu|cu\d+)", base)
    assert match, f"Dockerfile FROM {base}: use rayproject/ray:<version>-py<python>-gpu"
    assert match.group(1) == version, f"Dockerfile builds on Ray {match.group(1)}, requirements.txt pins {version}"
    python_tag = match.group(2)
    # The requirements are baked in: copied, then installed in a RUN before the code is copied.
    install = re.search(r"^RUN pip install[^\n]*-r requirements\.txt", dockerfile, re.M)
    assert install and dockerfile.index("COPY --chown=ray:users requirements.txt") < install.start()
    images = set()
    for name, spec, _ in cluster_specs():
        assert spec["rayVersion"] == version, f"{name}: rayVersion {spec['rayVersion']} != {version}"
        for template in pod_templates(spec):
            for container in template["spec"]["containers"]:
                images.add(container["image"])
                assert f"ray{version}-{python_tag}-gpu" in container["image"].split(":")[-1], (name, container["image"])
    assert len(images) == 1, f"head and workers must run the same image: {images}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "outputs" in ignored


def test_gpu_worker_groups_match_the_configs_they_run():
    """One Train worker per GPU, 8 GPUs per pod: replicas * 8 == ray.num_workers (min, max)."""
    for name, spec, command in cluster_specs():
        phase, cfg = job_config(command)
        group = gpu_group(spec, name)
        container = group["template"]["spec"]["containers"][0]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) == GPUS_PER_POD, name
        assert str(requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"])) == str(limits["nvidia.com/gpu"]), name
        lo, hi = group["minReplicas"], group["maxReplicas"]
        assert 0 <= lo <= group["replicas"] <= hi, name
        pod_cpus = min(quantity(limits["cpu"]), quantity(requests.get("cpu", limits["cpu"])))
        if phase == "inference":
            gpus = cfg.inference.num_actors * cfg.inference.num_gpus_per_actor
            assert lo == hi == math.ceil(gpus / GPUS_PER_POD), f"{name}: {gpus} GPUs of inference actors"
            assert cfg.inference.num_actors * cfg.inference.num_cpus_per_actor <= pod_cpus * hi, name
            continue
        assert cfg.ray.use_gpu, f"{name}: the config trains without GPUs"
        low, high = num_workers_range(cfg.ray)
        concurrent = cfg.tune.max_concurrent_trials if phase == "tune" else 1
        assert (lo * GPUS_PER_POD, hi * GPUS_PER_POD) == (low, high * concurrent), (
            f"{name}: GPU pods {lo}..{hi} x {GPUS_PER_POD} != ray.num_workers {cfg.ray.num_workers}"
            + (f" x tune.max_concurrent_trials {concurrent}" if concurrent > 1 else "")
        )
        # Train workers' CPUs fit in the pod and leave some for Ray Data's read/decode tasks.
        assert cfg.ray.cpus_per_worker * GPUS_PER_POD + cfg.data.read_cpus <= pod_cpus, name
        assert cfg.train.global_batch_size >= high, f"{name}: every worker needs a share of the global batch"


def test_cluster_specs_have_cpu_head_shm_autoscaling_and_token_auth():
    for name, spec, _ in cluster_specs():
        head = spec["headGroupSpec"]
        head_resources = head["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in head_resources.get("limits", {}), f"{name}: the head is a CPU pod"
        assert str(head["rayStartParams"].get("num-cpus")) == "0", f"{name}: keep tasks off the head"
        assert spec["enableInTreeAutoscaling"] is True, name
        assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"], name
        for template in pod_templates(spec):
            pod = template["spec"]
            shm = [v for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
            assert shm, f"{name}: mount an emptyDir (medium: Memory) on /dev/shm"
            mounts = [m for m in pod["containers"][0].get("volumeMounts", []) if m["name"] == shm[0]["name"]]
            assert mounts and mounts[0]["mountPath"] == "/dev/shm", name
            env = {e["name"]: e for e in pod["containers"][0].get("env", [])}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
                assert "secretKeyRef" in env[key]["valueFrom"], f"{name}: {key} must come from a Secret"


def test_no_inline_secrets_and_nothing_exposed_publicly():
    for name, doc in kuberay_docs():
        assert doc["kind"] not in ("Secret", "Ingress", "Route", "Gateway"), f"{name}: no {doc['kind']} here"
        for node in walk(doc):
            if isinstance(node, dict) and node.get("name") in SECRET_ENV and "value" in node:
                raise AssertionError(f"{name}: {node['name']} has an inline value; use valueFrom.secretKeyRef")
            if isinstance(node, dict) and node.get("kind") == "Service":
                assert node.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", name
            if isinstance(node, dict):
                assert node.get("serviceType", "ClusterIP") not in PUBLIC_SERVICE_TYPES, f"{name}: serviceType"
                assert node.get("enableIngress") is not True, f"{name}: no Ingress"
    for path in [*CLUSTER.rglob("*.yaml"), ROOT / "Dockerfile"]:
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path}: an AWS access key"
        assert not re.search(r"(?i)(secret_access_key|auth_token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{16,}", text), path
    assert "--dashboard-host=127.0.0.1" in SCRIPT.read_text()


def test_runtime_env_file_uploads_the_checkout_without_secrets():
    runtime_env = yaml.safe_load(RUNTIME_ENV.read_text())
    assert runtime_env["working_dir"] == "."
    excludes = runtime_env["excludes"]
    assert ".venv/" in excludes and "outputs/" in excludes and ".git/" in excludes
    assert runtime_env["env_vars"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values()), "env_vars values must be strings"
    for key in runtime_env["env_vars"]:
        assert not key.startswith("AWS_") and "TOKEN" not in key and "SECRET" not in key, key
    assert set(runtime_env) <= {"working_dir", "excludes", "env_vars"}, "no pip/conda: the image has the requirements"


def test_launcher_config_is_valid_and_sized_for_its_job():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = LAUNCHER.read_text()
    raw = yaml.safe_load(text)
    validate_config(prepare_config(yaml.safe_load(text)))  # the launcher's own schema and checks
    command = re.search(r"^# sized-for: (.+)$", text, re.M).group(1)
    phase, cfg = job_config(command)
    low, high = num_workers_range(cfg.ray)
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and "GPU" not in head["resources"]
    gpu_types = {k: v for k, v in raw["available_node_types"].items() if k != raw["head_node_type"]}
    active = [v for v in gpu_types.values() if v["max_workers"] > 0]
    assert len(active) == 1, "one active GPU node type"
    node = active[0]
    assert node["node_config"]["InstanceType"] in ("p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge")
    assert (node["min_workers"] * GPUS_PER_POD, node["max_workers"] * GPUS_PER_POD) == (low, high)
    assert raw["max_workers"] >= node["max_workers"]
    assert all(v["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for v in gpu_types.values())
    assert any(re.search(r"pip install .*-r \S*requirements\.txt", c) for c in raw["setup_commands"])
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(raw["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in raw["file_mounts"]


# --- the live submit path ------------------------------------------------------------------------


def free_ports(count: int) -> List[int]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def routable_ip() -> Optional[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # no packet is sent
            ip = sock.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def marked_pids(cluster_dir: str) -> List[int]:
    marker = f"SPEED_RAY_CLUSTER_DIR={cluster_dir}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def http_json(url: str, token: Optional[str]) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the local cluster script needs Linux /proc")
def test_submit_training_to_a_local_cluster(s3_endpoint, s3_bucket):
    import boto3

    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        ray_bin = Path(shutil.which("ray") or "ray")
    cluster_dir = tempfile.mkdtemp(prefix="spr-", dir="/tmp")  # short: Unix socket paths live under it
    gcs_port, dashboard_port = free_ports(2)
    workers = int(os.environ.get("SPEED_TEST_CLUSTER_WORKERS", "0"))
    env = {
        **os.environ,  # AWS_* of the S3 test server: the cluster's processes (and so the job) inherit them
        "RAY_BIN": str(ray_bin),
        "SPEED_RAY_DIR": cluster_dir,
        "SPEED_RAY_PORT": str(gcs_port),
        "SPEED_RAY_DASHBOARD_PORT": str(dashboard_port),
        "SPEED_RAY_WORKERS": str(workers),
        # With a worker node: the job driver on the head, the Train worker on the other node.
        "SPEED_RAY_HEAD_CPUS": "0" if workers else "1",
        "SPEED_RAY_WORKER_CPUS": "1",
        "SPEED_RAY_OBJECT_STORE_MB": "128",
        "SPEED_RAY_STOP_GRACE_S": "3",
    }
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    api = f"http://127.0.0.1:{dashboard_port}"
    started = time.monotonic()
    phases: Dict[str, float] = {}
    try:
        start = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300)
        assert start.returncode == 0, start.stdout + start.stderr
        phases["start"] = time.monotonic() - started
        client_env = dict(re.findall(r"^export (\w+)=(\S+)$", start.stdout, re.M))
        assert client_env["RAY_AUTH_MODE"] == "token" and client_env["RAY_API_SERVER_ADDRESS"] == api
        token = Path(client_env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()

        # Token authentication is on, and the job API answers on loopback only (a head-only
        # cluster keeps every port there, the GCS included).
        with pytest.raises(urllib.error.HTTPError) as denied:
            http_json(f"{api}/api/jobs/", None)
        assert denied.value.code in (401, 403)
        ip = routable_ip()
        if ip is not None:
            for port in [dashboard_port] + ([] if workers else [gcs_port]):
                with pytest.raises(OSError):
                    socket.create_connection((ip, port), timeout=2).close()
        nodes = http_json(f"{api}/api/v0/nodes?detail=false", token)["data"]["result"]["result"]
        assert sum(n["state"] == "ALIVE" for n in nodes) == 1 + workers, nodes

        run_name = f"cluster-{uuid.uuid4().hex[:8]}"
        submission_id = f"speed-{run_name}"
        bucket = s3_bucket.removeprefix("s3://")
        submit = subprocess.run(
            [str(ray_bin), "job", "submit", "--address", api, "--submission-id", submission_id,
             "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", ".", "--",
             "python", "-m", "ray_jobs.train",
             "model.name=DiT-N/2", "train.steps=4", "train.log_every=2", "train.checkpoint_every=4",
             "train.eval_every=0", "train.sample_every=0", "train.eval_num_samples=20",
             "sampling.steps=5", "sample.classes=[0,1]", "sample.per_class=1",
             "ray.num_workers=1", "ray.cpus_per_worker=1",
             f"run.output_uri={s3_bucket}/runs", f"run.name={run_name}"],
            cwd=ROOT, env={**env, **client_env}, capture_output=True, text=True, timeout=420,
        )
        logs = submit.stdout + submit.stderr
        phases["job"] = time.monotonic() - started - phases["start"]
        assert submit.returncode == 0, logs[-6000:]
        assert http_json(f"{api}/api/jobs/{submission_id}", token)["status"] == "SUCCEEDED"
        done = [json.loads(line) for line in submit.stdout.splitlines() if line.startswith('{"event": "train_done"')]
        assert done, logs[-6000:]
        assert done[-1]["steps"] == 4 and done[-1]["start_step"] == 0
        assert done[-1]["checkpoint"].startswith(f"{s3_bucket}/runs/{run_name}/checkpoint_")

        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"runs/{run_name}/checkpoint_")
        keys = [o["Key"] for o in listed.get("Contents", [])]
        assert any(k.endswith("/state.json") for k in keys), keys
        assert any(k.endswith(".metadata") for k in keys), keys  # the DCP shards' metadata
    finally:
        stopping = time.monotonic()
        stop = subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)
        phases["stop"] = time.monotonic() - stopping
        leftovers = marked_pids(cluster_dir)
        shutil.rmtree(cluster_dir, ignore_errors=True)
        print("local cluster test: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
              + f"; {time.monotonic() - started:.0f} s in all")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not leftovers, f"processes of the test cluster survived stop: {leftovers}"
