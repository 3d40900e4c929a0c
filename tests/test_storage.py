"""speed.storage against the S3 test server (real boto3 and pyarrow clients over HTTP) and local
folders: settings precedence, file helpers, and preflight errors that name the URI and the fix
without leaking secrets."""

import os
import time

import pyarrow.fs as pafs
import pytest

from speed import storage
from speed.config.schema import StorageConfig
from speed.testing import free_port, start_moto_server, stop_server



def test_settings_come_from_env_and_config_wins(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env-endpoint:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-key")
    from_env = storage.s3_settings(StorageConfig())
    assert (from_env.endpoint_url, from_env.region, from_env.access_key_id) == ("http://env-endpoint:9000", "eu-west-1", "env-access-key")
    configured = storage.s3_settings(StorageConfig(endpoint_url="http://minio:9000", region="us-west-2", path_style=True,
                                                   access_key_id="cfg-key", secret_access_key="cfg-secret"))
    assert (configured.endpoint_url, configured.region, configured.path_style) == ("http://minio:9000", "us-west-2", True)
    assert (configured.access_key_id, configured.secret_access_key) == ("cfg-key", "cfg-secret")
    assert storage.redact("key env-secret-key and env-access-key") == "key *** and ***"
    fs, path = storage.filesystem("s3://bucket/some/prefix", StorageConfig(endpoint_url="http://minio:9000"))
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/some/prefix"


@pytest.mark.s3
def test_s3_file_helpers(s3_bucket, tmp_path):
    base = f"{s3_bucket}/helpers"
    storage.write_bytes(f"{base}/a/one.bin", b"\x00\x01")
    storage.write_text(f"{base}/a/sub/two.txt", "two")
    storage.write_bytes(f"{base}/.hidden", b"x")
    assert storage.read_bytes(f"{base}/a/one.bin") == b"\x00\x01"
    assert storage.read_text(f"{base}/a/sub/two.txt") == "two"
    assert storage.exists(f"{base}/a/one.bin") and storage.is_dir(f"{base}/a") and not storage.exists(f"{base}/nope")
    assert storage.list_files(base) == [f"{base}/a/one.bin", f"{base}/a/sub/two.txt"]
    copied = storage.local_copy(f"{base}/a", str(tmp_path))
    assert open(os.path.join(copied, "sub", "two.txt")).read() == "two"
    storage.delete(f"{base}/a/one.bin")
    assert not storage.exists(f"{base}/a/one.bin")
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.read_bytes(f"{base}/a/one.bin")


def test_local_helpers_write_atomically(tmp_path):
    target = tmp_path / "deep" / "file.bin"
    storage.write_bytes(str(target), b"first")
    storage.write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]  # no temporary leftovers
    assert storage.local_copy(str(target), "/unused") == str(target)
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.preflight(str(tmp_path / "missing"), key="data.uri")
    (tmp_path / "empty").mkdir()
    with pytest.raises(storage.StorageError, match="data.uri: .*is empty"):
        storage.preflight(str(tmp_path / "empty"), key="data.uri", nonempty=True)
    storage.preflight(str(tmp_path / "new" / "out"), key="run.output_uri", must_exist=False, writable=True)
    with pytest.raises(storage.StorageError, match="data.uri is empty"):
        storage.preflight("", key="data.uri")


@pytest.mark.s3
def test_preflight_names_the_problem(s3_bucket):
    storage.preflight(s3_bucket, key="run.output_uri", writable=True)
    with pytest.raises(storage.StorageError, match=r"data.uri: bucket 'no-such-bucket-here' does not exist"):
        storage.preflight("s3://no-such-bucket-here/data", key="data.uri")
    with pytest.raises(storage.StorageError, match=r"data.uri: nothing under .*empty-prefix.*python -m ray_jobs.prepare"):
        storage.preflight(f"{s3_bucket}/empty-prefix", key="data.uri", nonempty=True)

    dead = StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout_s=1.0)
    started = time.time()
    with pytest.raises(storage.StorageError, match=r"cannot reach endpoint http://127.0.0.1:\d+ .*storage.endpoint_url") as failure:
        storage.preflight(f"{s3_bucket}/x", dead, key="data.uri")
    assert time.time() - started < 20
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(failure.value)


@pytest.fixture
def auth_s3_endpoint():
    """A second moto server that checks credentials (moto accepts any by default)."""
    proc, endpoint = start_moto_server(env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0"))
    yield endpoint
    stop_server(proc)


@pytest.mark.s3
def test_preflight_reports_refused_credentials(auth_s3_endpoint):
    secret = "wrong-secret-value-that-must-not-leak"
    bad = StorageConfig(endpoint_url=auth_s3_endpoint, access_key_id="AKIAWRONGKEY0000", secret_access_key=secret)
    with pytest.raises(storage.StorageError, match=r"data.uri: credentials were refused for bucket 'any-bucket'.*AWS_ACCESS_KEY_ID") as failure:
        storage.preflight("s3://any-bucket/data", bad, key="data.uri")
    assert secret not in str(failure.value) and "AKIAWRONGKEY0000" not in str(failure.value)
