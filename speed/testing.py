"""Helpers shared by the tests and the benchmarks: a local S3 server (moto) on 127.0.0.1.

moto is a test requirement, run as its own process (``python -m moto.server``) and reached
through the real boto3 and pyarrow clients, exactly as production reaches S3 or MinIO.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Tuple

AWS_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto_server(env: Optional[Dict[str, str]] = None, timeout_s: float = 60.0) -> Tuple[subprocess.Popen, str]:
    """Start moto's S3 server on a free loopback port; returns (process, endpoint URL) once it answers.
    ``env`` replaces the server's environment (e.g. ``INITIAL_NO_AUTH_ACTION_COUNT=0`` turns on
    credential checks)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return proc, endpoint
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the moto S3 server did not start on {endpoint} within {timeout_s:.0f} s")
            time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextmanager
def moto_s3(access_key: str, secret_key: str) -> Iterator[Tuple[str, subprocess.Popen]]:
    """A moto S3 server with the AWS_* environment pointed at it for the duration (restored after),
    so boto3, pyarrow (through ``speed.storage``) and Ray workers started meanwhile all reach it."""
    saved = {key: os.environ.get(key) for key in AWS_KEYS}
    proc, endpoint = start_moto_server()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key,
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        yield endpoint, proc
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop_server(proc)
