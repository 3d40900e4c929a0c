"""The ``webdataset`` format: tar shards of samples, each a group of members sharing a key.

``data.uri`` is the prefix (folder) holding the ``.tar`` shards, or a brace pattern such as
``s3://bucket/imagenet/train-{000000..001023}.tar`` (ranges keep their zero padding; lists
``{a,b}`` work too; several braces expand as a product). A sample is ``<key>.jpg`` (or ``.jpeg``,
``.png``, ``.webp``: the first present in that order) with its label in ``<key>.cls`` (an integer
as text) or, failing that, in ``<key>.json`` under ``data.label_column`` (``{"label": 3, ...}``),
as in ImageNet's common WebDataset copies. Members are grouped as WebDataset does: the key is the
member name up to the first dot of its base name, and a sample's members are adjacent.

``scan_shard`` reads a shard once (a tar has no index) and returns its sample keys and labels, or
the reason it cannot be read with the last good key; the catalog keeps them, so a shard is read
for this only when it is new or changed. Pure Python: tarfile and pyarrow streams, no Ray.
"""

from __future__ import annotations

import io
import itertools
import json
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSIONS = ("cls", "json")
_BRACE = re.compile(r"\{([^{}]*)\}")


def has_braces(uri: str) -> bool:
    return bool(_BRACE.search(str(uri)))


def _alternatives(body: str, uri: str) -> List[str]:
    if "," in body:
        return body.split(",")
    match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if not match:
        raise ValueError(
            f"data.uri: cannot expand '{{{body}}}' in '{uri}'; write a range {{000000..001023}} or a list {{a,b}}"
        )
    first, last = match.groups()
    if int(last) < int(first):
        raise ValueError(f"data.uri: the range '{{{body}}}' in '{uri}' runs backwards")
    width = len(first) if first.startswith("0") or len(first) == len(last) else 0
    return [str(i).zfill(width) for i in range(int(first), int(last) + 1)]


def expand_braces(uri: str) -> List[str]:
    """``train-{000..002}.tar`` -> ['train-000.tar', 'train-001.tar', 'train-002.tar']."""
    parts = _BRACE.split(str(uri))  # literal, body, literal, body, ..., literal
    literals, bodies = parts[0::2], parts[1::2]
    out = []
    for choice in itertools.product(*[_alternatives(body, uri) for body in bodies]):
        out.append("".join(lit + alt for lit, alt in zip(literals, list(choice) + [""])))
    return out


def pattern_root(uri: str) -> str:
    """The folder of a brace pattern (where the catalog is kept): the part before the first brace,
    up to its last '/'."""
    head = str(uri)[: str(uri).index("{")] if has_braces(uri) else str(uri)
    return head.rsplit("/", 1)[0] if "/" in head else head


def split_name(name: str) -> Tuple[Optional[str], Optional[str]]:
    """Member name -> (sample key, extension), as WebDataset groups them: 'a/b.c.jpg' -> ('a/b', 'c.jpg')."""
    directory, base = posixpath.split(name)
    if "." not in base or base.startswith("."):
        return None, None
    stem, extension = base.split(".", 1)
    return (posixpath.join(directory, stem) if directory else stem), extension.lower()


def parse_label(sample: Dict[str, Any], label_key: str = "label") -> Optional[int]:
    """The integer label of a sample (raw member bytes by extension); None when it has none.

    Raises ValueError for a label that is present but not an integer."""
    if sample.get("cls") is not None:
        text = bytes(sample["cls"]).decode("utf-8").strip()
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"its .cls member holds {text[:20]!r}, not an integer label") from None
    if sample.get("json") is not None:
        value = sample["json"]
        try:
            parsed = json.loads(bytes(value).decode("utf-8")) if isinstance(value, (bytes, bytearray, memoryview)) else value
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"its .json member is not valid JSON ({exc})") from None
        label = parsed.get(label_key) if isinstance(parsed, dict) else None
        if label is None:
            return None
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(f"its .json member has {label_key}={label!r}, not an integer label")
        return int(label)
    return None


def image_member(sample: Dict[str, Any]) -> Tuple[Optional[str], Optional[bytes]]:
    """(extension, bytes) of the sample's image member; (None, None) when it has none."""
    for extension in IMAGE_EXTENSIONS:
        value = sample.get(extension)
        if value is not None:
            return extension, bytes(value)
    return None, None


def iter_samples(stream) -> Iterator[Dict[str, Any]]:
    """Samples of a tar stream: {"__key__": key, <extension>: bytes, ...}, members grouped by key.

    Raises tarfile.TarError / OSError for a corrupt or truncated shard (after yielding the samples
    before it)."""
    current: Optional[Dict[str, Any]] = None
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, extension = split_name(info.name)
            if key is None:
                continue
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current  # complete: its members are adjacent
                current = {"__key__": key}
            handle = tar.extractfile(info)
            current[extension] = handle.read() if handle is not None else b""
    if current is not None:
        yield current


@dataclass
class ShardIndex:
    keys: List[str] = field(default_factory=list)
    labels: List[Optional[int]] = field(default_factory=list)  # None: no label member, or unreadable
    error: Optional[str] = None  # why the shard could not be read to its end
    last_key: Optional[str] = None  # the last sample read before the error


def scan_shard(stream, label_key: str = "label") -> ShardIndex:
    """Read a whole shard: its sample keys and labels (images are not decoded here)."""
    index = ShardIndex()
    try:
        for sample in iter_samples(stream):
            index.keys.append(sample["__key__"])
            try:
                index.labels.append(parse_label(sample, label_key))
            except ValueError:
                index.labels.append(None)  # the decode step reports it, naming the member
            index.last_key = sample["__key__"]
    except (tarfile.TarError, OSError, EOFError) as exc:
        index.error = f"{type(exc).__name__}: {exc}"
    return index


def tar_bytes(members: Sequence[Tuple[str, bytes]]) -> bytes:
    """An uncompressed tar holding ``members`` (name, bytes) in order, with fixed metadata."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(blob))
    return buffer.getvalue()


def sample_members(key: str, image: bytes, label: int, extension: str = "jpg",
                   extra: Optional[Dict[str, Any]] = None) -> List[Tuple[str, bytes]]:
    """The members of one sample as this project writes them: image, .cls and .json."""
    meta = {"label": int(label), **(extra or {})}
    return [(f"{key}.{extension}", image), (f"{key}.cls", str(int(label)).encode()),
            (f"{key}.json", json.dumps(meta, sort_keys=True).encode())]
