"""ONNX external data: reading it, and sharing a source model's data files with blocks and stages.

[Note: why hard links]
Measured with onnxruntime 1.32 and onnx 1.23 (``tests/graph/test_graph_extdata.py``): onnxruntime refuses
an external-data ``location`` that is absolute, that leads out of the model's directory with ``..``, or
that is a symbolic link resolving outside it; it accepts a hard link. So blocks and stages reference a hard
link, placed in their own directory, to the source model's data file, with the source's offsets: no
weight is copied, and a sliced directory stays self-contained (it can be moved or copied whole, and the
source may even be deleted). Where no hard link can be made (another filesystem, ``fs.protected_hardlinks``,
a filesystem without links) the data file is copied once instead, with a warning.

onnx's own loader refuses a data file with more than one hard link ("potential hardlink attack"), so
layerline reads external tensors with :func:`layerline.graph.modelio.load_tensor_data`, never with
``onnx.load(..., load_external_data=True)``; and writes models that reference data with :func:`write_model`,
which never opens a data file.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx.external_data_helper import uses_external_data

from layerline.errors import FormatError, SliceError
from layerline.graph.modelio import iter_tensors, load_tensor_data, location_of, tensor_nbytes

__all__ = [
    "INLINE_BELOW",
    "LINK_MODES",
    "DataFile",
    "check_data_files",
    "external_locations",
    "fingerprint",
    "link_file",
    "relocate",
    "require_files",
    "share_data_files",
    "source_data_name",
    "write_model",
]

log = logging.getLogger(__name__)

#: How a data file in a sliced directory relates to the source's: the same inode, or a copy.
LINK_MODES = ("hardlink", "copy")

#: External tensors smaller than this (bytes) are copied into the block instead of referenced.
INLINE_BELOW = 1024

_SAMPLES = 16
_SAMPLE_BYTES = 4096
_FIX = "re-run `layerline slice` (slice_model) on the source model to rewrite the sliced directory"


def source_data_name(index: int) -> str:
    """The name, in a sliced directory, of the source model's ``index``-th external data file."""
    return f"source_{index:03d}.data"


@dataclass(frozen=True)
class DataFile:
    """One external data file the blocks of a sliced directory reference.

    ``file``: its name in the sliced directory (the ``location`` the blocks' tensors carry);
    ``source``: the location the source model gave it; ``size_bytes`` and ``mtime_ns``: its size and
    modification time when sliced; ``fingerprint``: a hash of its size and 16 samples of 4 KiB, to tell a
    copy with a new mtime from changed data; ``link``: ``"hardlink"`` (the source's own inode) or ``"copy"``.
    """

    file: str
    source: str
    size_bytes: int
    mtime_ns: int
    fingerprint: str
    link: str = "hardlink"

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "source": self.source,
            "size_bytes": self.size_bytes,
            "mtime_ns": self.mtime_ns,
            "fingerprint": self.fingerprint,
            "link": self.link,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataFile:
        link = str(data["link"])
        if link not in LINK_MODES:
            raise ValueError(f"data file link {link!r} is not one of {LINK_MODES}")
        file = str(data["file"])
        if Path(file).name != file:
            raise ValueError(f"data file name {file!r} must be a plain file name")
        return cls(
            file=file,
            source=str(data["source"]),
            size_bytes=int(data["size_bytes"]),
            mtime_ns=int(data["mtime_ns"]),
            fingerprint=str(data["fingerprint"]),
            link=link,
        )


def external_locations(model: onnx.ModelProto) -> list[str]:
    """The distinct normalised locations the model's external tensors reference, in first-use order."""
    seen: dict[str, None] = {}
    for tensor in iter_tensors(model.graph):
        if uses_external_data(tensor):
            seen.setdefault(location_of(tensor), None)
    return list(seen)


def relocate(model: onnx.ModelProto, names: dict[str, str], base_dir: Path | None = None) -> None:
    """Point every external tensor of ``model`` at ``names[its location]`` (offsets unchanged).

    With ``base_dir`` (where the current locations lie), tensors under ``INLINE_BELOW`` bytes are read
    into the model instead: onnxruntime's load-time shape inference cannot read the external data of a
    shape or scales input (``Resize``, ``Reshape``), and tensors that small cost nothing to keep inline.
    """
    for tensor in iter_tensors(model.graph):
        if not uses_external_data(tensor):
            continue
        if base_dir is not None and tensor_nbytes(tensor) < INLINE_BELOW:
            load_tensor_data(tensor, base_dir)
            continue
        new = names[location_of(tensor)]
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = new


def write_model(model: onnx.ModelProto, path: Path) -> None:
    """Serialize ``model`` to ``path`` as is: external tensors keep their references, no data is written."""
    path.write_bytes(model.SerializeToString())


def fingerprint(path: Path) -> str:
    """sha256 of the file size and of 16 evenly spaced 4 KiB samples (the whole file when small)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        if size <= _SAMPLES * _SAMPLE_BYTES:
            h.update(f.read())
        else:
            step = (size - _SAMPLE_BYTES) // (_SAMPLES - 1)
            for i in range(_SAMPLES):
                f.seek(i * step)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def link_file(src: Path, dst: Path, *, allow_copy: bool) -> str:
    """Make ``dst`` a hard link to ``src`` (replacing ``dst``); returns ``"hardlink"`` or ``"copy"``.

    Without ``allow_copy`` an OSError propagates when no link can be made. ``dst`` is unlinked, never
    written through, so a previous link's target is left intact.
    """
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    real = src.resolve()
    try:
        os.link(real, dst)
        return "hardlink"
    except OSError as exc:
        if not allow_copy:
            raise
        why = errno.errorcode.get(exc.errno or 0, str(exc))
        log.warning("cannot hard-link %s to %s (%s: %s); copying it instead", dst, real, why, exc.strerror)
    shutil.copyfile(real, dst)
    return "copy"


def _describe(path: Path, source: str, link: str) -> DataFile:
    st = path.stat()
    return DataFile(path.name, source, st.st_size, st.st_mtime_ns, fingerprint(path), link)


def require_files(base_dir: Path, locations: Iterable[str]) -> None:
    """Raise SliceError when a data file the source model names is not there."""
    for location in locations:
        src = base_dir / location
        if not src.is_file():
            raise SliceError(
                f"external data file {src} (location {location!r}) does not exist; keep the model's data "
                "files next to it, where its external_data locations point"
            )


def share_data_files(
    base_dir: Path, locations: list[str], out: Path, *, copy: bool
) -> tuple[tuple[DataFile, ...], dict[str, str]]:
    """Link (or with ``copy``, copy) each source data file into ``out`` as ``source_NNN.data``.

    Returns the manifest records and the map from source location to the name in ``out``.
    """
    require_files(base_dir, locations)
    files: list[DataFile] = []
    names: dict[str, str] = {}
    for i, location in enumerate(locations):
        src = base_dir / location
        dst = out / source_data_name(i)
        if copy:
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            shutil.copyfile(src.resolve(), dst)
            link = "copy"
        else:
            link = link_file(src, dst, allow_copy=True)
        files.append(_describe(dst, location, link))
        names[location] = dst.name
    return tuple(files), names


def check_data_files(directory: Path, files: Iterable[DataFile]) -> None:
    """Raise FormatError when a data file the blocks reference is gone or differs from when sliced.

    A changed modification time alone is accepted when the fingerprint still matches (a copied directory).
    """
    for d in files:
        path = directory / d.file
        origin = f"a hard link to the source model's {d.source!r}" if d.link == "hardlink" else "a copy"
        try:
            st = path.stat()
        except OSError as exc:
            raise FormatError(
                f"external data file {path} is missing ({exc.strerror}): the blocks of {directory} read "
                f"their weights from it ({origin} made when slicing); {_FIX}"
            ) from exc
        changed = None
        if st.st_size != d.size_bytes:
            changed = f"{d.size_bytes} bytes when sliced, {st.st_size} now"
        elif st.st_mtime_ns != d.mtime_ns and fingerprint(path) != d.fingerprint:
            changed = "same size, different content"
        if changed:
            raise FormatError(
                f"external data file {path} changed since slicing ({changed}): it is {origin}, and the "
                f"blocks' offsets into it no longer hold; {_FIX}"
            )
        if st.st_mtime_ns != d.mtime_ns:
            log.debug("%s has a new mtime but the same size and fingerprint; accepted", path)
