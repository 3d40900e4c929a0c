"""One URI resolver for every path in the config: local folders and s3:// object storage.

S3 settings come from the ``storage`` config section, falling back to the standard AWS
environment variables, so the same code runs on AWS S3, MinIO, Ceph or GCS's S3 interface.
pyarrow filesystems serve Ray Data and Ray Train; boto3 serves the preflight checks, where its
error codes tell a missing bucket from bad credentials. Secrets never enter messages: every
error passes through ``redact``.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pyarrow.fs as pafs

from speed.config.schema import StorageConfig


class StorageError(RuntimeError):
    """A storage problem whose message names the URI and what to fix."""


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: Optional[str]
    region: Optional[str]
    access_key_id: Optional[str]
    secret_access_key: Optional[str]
    session_token: Optional[str]
    path_style: bool
    connect_timeout_s: float


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> Tuple[str, str]:
    """s3://bucket/a/b -> ('bucket', 'a/b')."""
    rest = str(uri)[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"'{uri}' names no bucket; write s3://bucket/prefix")
    return bucket, key.strip("/")


def absolute(uri: Optional[str]) -> Optional[str]:
    """A local path made absolute against this process's working directory (``file://`` and ``~``
    resolved); s3:// URIs and None unchanged. Called once, on the driver, for every path in a
    config: a Ray worker's working directory is not the driver's."""
    if uri is None or uri == "" or is_s3(uri):
        return uri
    return str(Path(str(uri).removeprefix("file://")).expanduser().resolve())


# Config fields that hold a path or URI besides the ``*_uri`` ones.
_PATH_FIELDS = ("uri", "init_from", "resume_from", "inception_weights", "path")


def absolute_paths(config: Any) -> Any:
    """Every local path of a config tree (``*_uri`` fields and ``_PATH_FIELDS``) made absolute, in
    place; returns the config. Jobs call this once on the driver, right after loading."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            absolute_paths(value)
        elif isinstance(value, str) and value and (item.name.endswith("_uri") or item.name in _PATH_FIELDS):
            setattr(config, item.name, absolute(value))
    return config


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', for s3:// and local paths alike."""
    if is_s3(base):
        return posixpath.join(str(base).rstrip("/"), *[p.strip("/") for p in parts if p])
    return str(Path(base, *[p for p in parts if p]))


def s3_settings(storage: Optional[StorageConfig] = None) -> S3Settings:
    storage = storage or StorageConfig()
    env = os.environ
    endpoint = storage.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    return S3Settings(
        endpoint_url=endpoint or None,
        region=storage.region or env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
        access_key_id=storage.access_key_id or env.get("AWS_ACCESS_KEY_ID"),
        secret_access_key=storage.secret_access_key or env.get("AWS_SECRET_ACCESS_KEY"),
        session_token=env.get("AWS_SESSION_TOKEN"),
        path_style=bool(storage.path_style),
        connect_timeout_s=storage.connect_timeout_s,
    )


def _secrets(storage: Optional[StorageConfig] = None) -> List[str]:
    settings = s3_settings(storage)
    values = [settings.secret_access_key, settings.session_token, settings.access_key_id]
    return [v for v in values if v and len(v) >= 4]


def redact(text: str, storage: Optional[StorageConfig] = None) -> str:
    """Replace every known credential value in ``text`` with '***'."""
    for secret in _secrets(storage):
        text = text.replace(secret, "***")
    return text


def filesystem(uri: str, storage: Optional[StorageConfig] = None) -> Tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) for a local path or s3:// URI."""
    if is_s3(uri):
        settings = s3_settings(storage)
        bucket, key = split_s3(uri)
        kwargs = dict(
            region=settings.region,
            connect_timeout=settings.connect_timeout_s,
            request_timeout=max(30.0, settings.connect_timeout_s),
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        )
        if settings.access_key_id and settings.secret_access_key:
            kwargs.update(
                access_key=settings.access_key_id,
                secret_key=settings.secret_access_key,
                session_token=settings.session_token,
            )
        if settings.endpoint_url:
            scheme, _, host = settings.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        if settings.path_style or settings.endpoint_url:
            # Custom endpoints (MinIO, Ceph, test servers) expect path-style addressing.
            kwargs.update(force_virtual_addressing=False)
        return pafs.S3FileSystem(**kwargs), posixpath.join(bucket, key) if key else bucket
    if str(uri).startswith("file://"):
        uri = str(uri)[len("file://") :]
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def boto3_client(storage: Optional[StorageConfig] = None):
    import boto3
    from botocore.config import Config as BotoConfig

    settings = s3_settings(storage)
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        aws_session_token=settings.session_token,
        config=BotoConfig(
            connect_timeout=settings.connect_timeout_s,
            read_timeout=max(30.0, settings.connect_timeout_s),
            retries={"max_attempts": 2, "mode": "standard"},
            s3={"addressing_style": "path" if settings.path_style or settings.endpoint_url else "auto"},
        ),
    )


def _endpoint_text(storage: Optional[StorageConfig]) -> str:
    endpoint = s3_settings(storage).endpoint_url
    return f"endpoint {endpoint}" if endpoint else "the default AWS endpoint"


def preflight(
    uri: str,
    storage: Optional[StorageConfig] = None,
    *,
    key: str = "uri",
    must_exist: bool = True,
    nonempty: bool = False,
    writable: bool = False,
) -> None:
    """Fail fast, with one clear message, if ``uri`` cannot be used as asked.

    ``key`` is the config key that holds the URI; it is named in the message so users know what
    to change. Checks: endpoint reachable, credentials accepted, bucket exists, prefix non-empty
    (``nonempty``), and a probe object can be written and deleted (``writable``).
    """
    if not uri:
        raise StorageError(f"{key} is empty; give a local folder or s3://bucket/prefix")
    try:
        if is_s3(uri):
            _preflight_s3(uri, storage, key=key, nonempty=nonempty, writable=writable)
        else:
            _preflight_local(uri, key=key, must_exist=must_exist, nonempty=nonempty, writable=writable)
    except StorageError as exc:
        raise StorageError(redact(str(exc), storage)) from None


def _preflight_local(uri: str, *, key: str, must_exist: bool, nonempty: bool, writable: bool) -> None:
    path = Path(str(uri).removeprefix("file://")).expanduser()
    if (must_exist or nonempty) and not path.exists():
        raise StorageError(f"{key}: '{uri}' does not exist; create it or fix the path")
    if nonempty and path.is_dir() and not any(path.iterdir()):
        raise StorageError(f"{key}: '{uri}' is empty; write the dataset there first (python -m ray_jobs.prepare)")
    if writable:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".speed-write-probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"{key}: cannot write to '{uri}': {exc.strerror}; fix permissions or the path") from None


def _preflight_s3(uri: str, storage: Optional[StorageConfig], *, key: str, nonempty: bool, writable: bool) -> None:
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    bucket, prefix = split_s3(uri)
    client = boto3_client(storage)
    where = _endpoint_text(storage)
    try:
        client.head_bucket(Bucket=bucket)
    except EndpointConnectionError:
        raise StorageError(
            f"{key}: cannot reach {where} for '{uri}'; check storage.endpoint_url / AWS_ENDPOINT_URL "
            "and that the object store is running"
        ) from None
    except NoCredentialsError:
        raise StorageError(
            f"{key}: no credentials for '{uri}'; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or storage.access_key_id / storage.secret_access_key)"
        ) from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket") or status == 404:
            raise StorageError(
                f"{key}: bucket '{bucket}' does not exist at {where}; create it or fix {key}"
            ) from None
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied") or status == 403:
            raise StorageError(
                f"{key}: credentials were refused for bucket '{bucket}' at {where} ({code or status}); "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or storage.* keys)"
            ) from None
        raise StorageError(f"{key}: '{uri}' at {where} failed: {code or status}") from None
    except BotoCoreError as exc:
        raise StorageError(f"{key}: cannot use '{uri}' at {where}: {type(exc).__name__}; check storage settings") from None
    if nonempty:
        listing = client.list_objects_v2(Bucket=bucket, Prefix=(prefix + "/") if prefix else "", MaxKeys=1)
        if listing.get("KeyCount", 0) == 0:
            raise StorageError(
                f"{key}: nothing under '{uri}' at {where}; write the dataset there first "
                "(python -m ray_jobs.prepare) or fix the prefix"
            )
    if writable:
        probe = posixpath.join(prefix, f".speed-write-probe-{uuid.uuid4().hex}") if prefix else (
            f".speed-write-probe-{uuid.uuid4().hex}"
        )
        try:
            client.put_object(Bucket=bucket, Key=probe, Body=b"")
            client.delete_object(Bucket=bucket, Key=probe)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise StorageError(f"{key}: cannot write to '{uri}' at {where} ({code}); check bucket permissions") from None


# --- small file helpers shared by the jobs -------------------------------------------------------


def exists(uri: str, storage: Optional[StorageConfig] = None) -> bool:
    fs, path = filesystem(uri, storage)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str, storage: Optional[StorageConfig] = None) -> bool:
    fs, path = filesystem(uri, storage)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str, storage: Optional[StorageConfig] = None) -> bytes:
    fs, path = filesystem(uri, storage)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise StorageError(f"'{uri}' does not exist") from None


def write_bytes(uri: str, data: bytes, storage: Optional[StorageConfig] = None) -> None:
    """Write a whole object so that readers never see it half-written.

    S3 PUTs are atomic; locally the bytes go to a temporary name in the same folder, then rename.
    """
    fs, path = filesystem(uri, storage)
    if isinstance(fs, pafs.LocalFileSystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def write_text(uri: str, text: str, storage: Optional[StorageConfig] = None) -> None:
    write_bytes(uri, text.encode("utf-8"), storage)


def read_text(uri: str, storage: Optional[StorageConfig] = None) -> str:
    return read_bytes(uri, storage).decode("utf-8")


def list_files(uri: str, storage: Optional[StorageConfig] = None, recursive: bool = True) -> List[str]:
    """Full URIs of the files under ``uri`` (sorted), excluding hidden temporary names."""
    fs, path = filesystem(uri, storage)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [uri]
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    base = path.rstrip("/")
    out = []
    for entry in fs.get_file_info(selector):
        if entry.type != pafs.FileType.File:
            continue
        rel = entry.path[len(base) :].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        out.append(join(uri, rel))
    return sorted(out)


def delete(uri: str, storage: Optional[StorageConfig] = None) -> None:
    fs, path = filesystem(uri, storage)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def local_copy(uri: str, dest_dir: str, storage: Optional[StorageConfig] = None) -> str:
    """Copy a file or folder from any URI to a local folder; returns the local path.

    Local paths are returned unchanged.
    """
    if not is_s3(uri):
        return str(Path(str(uri).removeprefix("file://")).expanduser().resolve())
    fs, path = filesystem(uri, storage)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"'{uri}' does not exist")
    target = Path(dest_dir) / posixpath.basename(path.rstrip("/"))
    if info.type == pafs.FileType.File:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(uri, storage))
        return str(target)
    # pyarrow's copy_files does not create the local destination folder (or its subfolders).
    for entry in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if entry.type == pafs.FileType.Directory:
            (target / entry.path[len(path.rstrip("/")) :].lstrip("/")).mkdir(parents=True, exist_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return str(target)

