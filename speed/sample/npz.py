""".npz files in ADM's sample format (``arr_0`` uint8 [N, H, W, C], labels in ``arr_1``), streamed.

A 50,000-image ImageNet-256 sample file is ~10 GB, so it is never held in memory: the writer
streams arrays chunk by chunk into an uncompressed zip (what ``np.savez`` writes), and the reader
locates an array's bytes inside the zip and reads row ranges directly, from local disk or with
ranged GETs from object storage. Both produce and accept ordinary ``np.load``-able files.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import pyarrow.fs as pafs

from speed import storage
from speed.config.schema import StorageConfig

log = logging.getLogger(__name__)

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # zip local file header, 30 bytes
_LOCAL_HEADER_SIGNATURE = 0x04034B50


class NpzFormatError(ValueError):
    """An .npz that is not what the evaluator expects; the message names the file and the fix."""


class NpzWriter:
    """Write arrays into an uncompressed .npz one chunk at a time.

    Usage: ``with NpzWriter(uri) as w: w.write_array("arr_0", shape, dtype, chunks)``. The file
    appears at ``uri`` only when the block exits cleanly (temporary name, then rename or upload).
    """

    def __init__(self, uri: str, storage_cfg: Optional[StorageConfig] = None):
        self.uri = uri
        self.storage_cfg = storage_cfg
        fs, path = storage.filesystem(uri, storage_cfg)
        self._fs, self._path = fs, path
        if isinstance(fs, pafs.LocalFileSystem):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._tmpdir = None
            self._local = str(Path(path).with_name(f".{Path(path).name}.tmp-{uuid.uuid4().hex}"))
        else:
            self._tmpdir = tempfile.mkdtemp(prefix="speed-npz-")
            self._local = os.path.join(self._tmpdir, "out.npz")
        self._zip = zipfile.ZipFile(self._local, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def write_array(self, name: str, shape: Sequence[int], dtype, chunks: Iterable[np.ndarray]) -> None:
        """Write array ``name`` of ``shape``/``dtype`` from C-ordered chunks along axis 0."""
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        expected = int(np.prod(shape)) * dtype.itemsize
        written = 0
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, header)
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype=dtype)
                if chunk.shape[1:] != shape[1:]:
                    raise ValueError(f"{name}: chunk of shape {chunk.shape} does not fit array shape {shape}")
                member.write(chunk.tobytes())
                written += chunk.nbytes
        if written != expected:
            raise ValueError(f"{name}: wrote {written} bytes, expected {expected} for shape {shape}")

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._zip.close()
        try:
            if exc_type is None:
                self._publish()
        finally:
            if os.path.exists(self._local):
                os.unlink(self._local)
            if self._tmpdir:
                shutil.rmtree(self._tmpdir, ignore_errors=True)

    def _publish(self) -> None:
        if self._tmpdir is None:
            os.replace(self._local, self._path)  # atomic within one folder
            return
        # Object stores publish an object only when its (multipart) upload completes.
        pafs.copy_files(self._local, self._path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self._fs)


class NpzArray:
    """Row-range access to one array inside an .npz, without reading the rest of the file."""

    def __init__(self, uri: str, name: str = "arr_0", storage_cfg: Optional[StorageConfig] = None):
        self.uri = uri
        self.name = name
        self.storage_cfg = storage_cfg
        self._fs, self._path = storage.filesystem(uri, storage_cfg)
        self._whole: Optional[np.ndarray] = None
        try:
            with self._fs.open_input_file(self._path) as handle:
                with zipfile.ZipFile(handle) as archive:
                    names = archive.namelist()
                    member = f"{name}.npy"
                    if member not in names:
                        raise KeyError(member)
                    info = archive.getinfo(member)
                    if info.compress_type != zipfile.ZIP_STORED:
                        # np.savez_compressed output: no byte offsets to seek to, so read it whole.
                        log.warning("'%s' is compressed: %s is read whole by every reader (np.savez avoids that)",
                                    uri, name)
                        with archive.open(member) as stream:
                            self._whole = np.lib.format.read_array(stream, allow_pickle=False)
                        self.shape, self.dtype = self._whole.shape, self._whole.dtype
                        self.keys = [n[:-4] for n in names if n.endswith(".npy")]
                        return
                    handle.seek(info.header_offset)
                    fields = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
                    if fields[0] != _LOCAL_HEADER_SIGNATURE:
                        raise zipfile.BadZipFile("bad local header")
                    name_len, extra_len = fields[9], fields[10]
                    handle.seek(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len)
                    version = np.lib.format.read_magic(handle)
                    shape, fortran, dtype = _read_header(handle, version)
                    self._data_offset = handle.tell()
                    self.keys = [n[:-4] for n in names if n.endswith(".npy")]
        except FileNotFoundError:
            raise NpzFormatError(f"'{uri}' does not exist") from None
        except KeyError:
            raise NpzFormatError(
                f"'{uri}' has no array '{name}'; sample files need ADM's keys (arr_0 uint8 [N, H, W, C], "
                "optional arr_1 labels)"
            ) from None
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise NpzFormatError(f"'{uri}' is not a readable .npz file ({exc})") from None
        if fortran:
            raise NpzFormatError(f"'{uri}': array '{name}' is Fortran-ordered; save it C-ordered (np.savez)")
        if dtype.hasobject:
            raise NpzFormatError(f"'{uri}': array '{name}' holds Python objects; refusing to unpickle it")
        self.shape, self.dtype = tuple(shape), dtype

    def __len__(self) -> int:
        return int(self.shape[0]) if self.shape else 1

    def read(self, start: int = 0, end: Optional[int] = None) -> np.ndarray:
        """Rows [start, end) (all rows by default)."""
        end = len(self) if end is None else min(int(end), len(self))
        start = max(0, int(start))
        if self._whole is not None:
            return self._whole[start:end]
        if not self.shape:
            start, end = 0, 1
        row_items = int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        row_bytes = row_items * self.dtype.itemsize
        count = max(0, end - start)
        with self._fs.open_input_file(self._path) as handle:
            handle.seek(self._data_offset + start * row_bytes)
            data = handle.read(count * row_bytes)
        if len(data) != count * row_bytes:
            raise NpzFormatError(f"'{self.uri}' is truncated inside array '{self.name}'")
        array = np.frombuffer(data, dtype=self.dtype)
        return array.reshape(self.shape) if not self.shape else array.reshape((count, *self.shape[1:]))


def _read_header(handle, version) -> Tuple[Tuple[int, ...], bool, np.dtype]:
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(handle)
    raise ValueError(f"unsupported .npy format version {version}")


def npz_keys(uri: str, storage_cfg: Optional[StorageConfig] = None) -> list:
    """Names of the arrays in an .npz."""
    fs, path = storage.filesystem(uri, storage_cfg)
    try:
        with fs.open_input_file(path) as handle, zipfile.ZipFile(handle) as archive:
            return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
    except FileNotFoundError:
        raise NpzFormatError(f"'{uri}' does not exist") from None
    except zipfile.BadZipFile as exc:
        raise NpzFormatError(f"'{uri}' is not a readable .npz file ({exc})") from None


def read_small_arrays(uri: str, names: Sequence[str], storage_cfg: Optional[StorageConfig] = None) -> Dict[str, np.ndarray]:
    """Whole arrays (e.g. ``mu``, ``sigma``, ``arr_1``) that are present; missing names are skipped."""
    present = set(npz_keys(uri, storage_cfg))
    return {name: NpzArray(uri, name, storage_cfg).read() for name in names if name in present}
