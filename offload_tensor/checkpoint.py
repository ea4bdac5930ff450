"""safetensors files, read and written without holding a model twice.

Reading goes straight from the file into memory we own (a host arena, a staging buffer) with
`os.preadv`: no memory map (its touched pages would count in the process's RSS) and no temporary
tensor per weight. That needs each tensor's byte range, which the safetensors Python API does not
expose, so the header is read here: 8 bytes (little-endian u64) of header size N, N bytes of
JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
data, offsets counted from the end of the header. Writing goes the same way, to a temporary
file renamed into place, so a reader never sees a half-written file, with every tensor aligned.

Checkpoints come as one `.safetensors` file, a folder of shards with their `*.index.json` (the
layout transformers and diffusers save, e.g. `transformer/diffusion_pytorch_model-0000N-of-0000M
.safetensors`), or a folder holding a single `.safetensors` file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint (or a disk-tier file) is missing, truncated, or does not fit the model."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are: `nbytes` bytes at `offset` of `path`."""

    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """The tensors of a safetensors file (by name) and its metadata; checks that every byte range
    lies inside the file, so a truncated file is refused here, not read short later."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than its header size).")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated: its header says {n} bytes, the file has {size - 8} after it.")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON: {e}).") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    tensors = {name: _stored(path, name, entry, 8 + n) for name, entry in header.items()}
    for name, t in tensors.items():
        if t.offset + t.nbytes > size:
            raise CheckpointError(
                f"{path} is truncated: {name} ends at byte {t.offset + t.nbytes}, the file has {size}. Download or "
                "write "
                "it again."
            )
    return tensors, metadata


def _stored(path: str, name: str, entry, data_start: int) -> StoredTensor:
    """One header entry, checked: a malformed one would otherwise surface as a KeyError here or a
    short read mid-build, after part of the model was changed."""
    broken = f"{path}: the header entry of {name} is malformed"
    fix = "the file is damaged or was not written by safetensors; download or write it again."
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{broken} ({entry!r}; it needs dtype, shape and data_offsets): {fix}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise CheckpointError(f"{path}: {name} has dtype {dtype}, which offload_tensor does not read.")
    if not _ints(shape) or not _ints(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise CheckpointError(f"{broken} (shape {shape!r}, data_offsets {offsets!r}): {fix}")
    begin, end = offsets
    expected = DTYPES[dtype].itemsize * _numel(shape)
    if end - begin != expected:
        raise CheckpointError(
            f"{broken}: its data_offsets {offsets} span {end - begin} bytes, its shape {tuple(shape)} of {dtype} needs "
            f"{expected}: {fix}"
        )
    return StoredTensor(path, DTYPES[dtype], tuple(shape), data_start + begin, end - begin)


def _ints(values) -> bool:
    return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)


def _numel(shape: list[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def checkpoint_files(checkpoint: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint (see the module docstring for the layouts)."""
    path = Path(checkpoint)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint={os.fspath(checkpoint)!r} is neither a file nor a folder; pass a local .safetensors file, or "
            "a folder of shards with their .index.json (offload_tensor downloads nothing)."
        )
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{path} holds several checkpoints ({[i.name for i in indexes]}); pass the one to load.")
    if indexes:
        files = [path / name for name in sorted(set(_weight_map(indexes[0]).values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{indexes[0]} names shards that are not in {path}: {missing}.")
        return files
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        found = [f.name for f in files] or "none"
        raise CheckpointError(
            f"{path} has no *.safetensors.index.json and {len(files)} .safetensors files ({found}); pass a file, or a "
            "folder with one checkpoint."
        )
    return files


def _weight_map(index_file: Path) -> dict[str, str]:
    """The `weight_map` (tensor name -> shard file name) of a `*.safetensors.index.json`."""
    fix = "the index is damaged; download it again, or remove it to load a folder holding a single .safetensors file."
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_file} is not JSON ({e}): {fix}") from e
    except (KeyError, TypeError) as e:
        raise CheckpointError(f'{index_file} has no "weight_map" object: {fix}') from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f'{index_file}: its "weight_map" is not an object of tensor name -> shard file: {fix}')
    return weight_map


def index(checkpoint: str | os.PathLike) -> dict[str, StoredTensor]:
    """Every tensor of a checkpoint, by name, across its shards."""
    tensors: dict[str, StoredTensor] = {}
    for path in checkpoint_files(checkpoint):
        found, _ = read_header(path)
        for name in found.keys() & tensors.keys():
            raise CheckpointError(f"{name} is stored twice: in {tensors[name].path} and {path}.")
        tensors.update(found)
    return tensors


def fingerprint(paths: list[Path]) -> str:
    """What identifies the content of files without reading them: names, sizes, modification times."""
    digest = hashlib.blake2b(digest_size=12)
    for p in paths:
        stat = os.stat(p)
        digest.update(f"{os.path.abspath(p)}|{stat.st_size}|{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def read_into(stored: StoredTensor, out: torch.Tensor, fd: int | None = None) -> None:
    """Read `stored`'s bytes into `out` (a contiguous CPU tensor of exactly that many bytes)."""
    if out.nbytes != stored.nbytes or not out.is_contiguous():
        raise AssertionError(f"buffer of {out.nbytes} bytes for {stored.nbytes}")
    own = fd is None
    if own:
        fd = os.open(stored.path, os.O_RDONLY)
    try:
        read_exactly(fd, byte_view(out), stored.offset, stored.path)
    finally:
        if own:
            os.close(fd)


def same_bytes(a: StoredTensor, b: StoredTensor, chunk: int = 64 << 20) -> bool:
    """Whether two stored tensors hold the same bytes (shape and dtype included), compared a chunk
    at a time: tied weights can be the largest tensors of a model (a vocabulary's embedding)."""
    if (a.dtype, a.shape, a.nbytes) != (b.dtype, b.shape, b.nbytes):
        return False
    if (a.path, a.offset) == (b.path, b.offset):
        return True
    x, y = torch.empty(min(chunk, a.nbytes), dtype=torch.uint8), torch.empty(min(chunk, a.nbytes), dtype=torch.uint8)
    with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
        for start in range(0, a.nbytes, chunk):
            n = min(chunk, a.nbytes - start)
            read_exactly(fa.fileno(), byte_view(x[:n]), a.offset + start, a.path)
            read_exactly(fb.fileno(), byte_view(y[:n]), b.offset + start, b.path)
            if not torch.equal(x[:n], y[:n]):
                return False
    return True


def read_exactly(fd: int, buffer: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            raise CheckpointError(
                f"{path} ended early while reading bytes {offset}..{offset + len(buffer)}: truncated?"
            )
        done += n


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable (for preadv)."""
    return memoryview(as_bytes(t).numpy()).cast("B")


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a 1-d uint8 view of the same memory. Flattened first: torch
    refuses to view a 0-d tensor (a BatchNorm's num_batches_tracked, a scalar parameter) as
    another element size."""
    return t.reshape(-1).view(torch.uint8)


ALIGN = 64  # bytes: where a tensor starts in files we write, as the CPU allocator aligns memory
PAD = "__pad__."  # names of the uint8 tensors that fill the gaps (safetensors allows no holes)


CHECKSUM = "offload_tensor.xxh3_128"  # metadata key: the checksum of a file's data, where written


def write_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, owner: str = "",
                     checksum: bool = False) -> None:  # fmt: skip
    """Write a safetensors file whose tensors start at `ALIGN`-byte boundaries (so views of a
    buffer read from it are as aligned as fresh tensors: some CPU kernels round differently on
    unaligned data), so that a reader sees the whole file or none: to a temporary file in the
    same folder (`owner` in its name), then renamed over `path` (two processes writing the same
    file each rename a complete one). `checksum`: the xxh3-128 of the data (every byte after
    the header) is recorded in the metadata under `CHECKSUM`. Plain safetensors:
    `safetensors.torch.load_file` reads it (with the padding tensors)."""
    names = {dtype: name for name, dtype in DTYPES.items()}
    header: dict = {"__metadata__": dict(metadata)}
    chunks: list[torch.Tensor] = []
    offset = 0
    for name, t in tensors.items():
        gap = -offset % ALIGN
        if gap:
            header[f"{PAD}{len(chunks)}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            chunks.append(torch.zeros(gap, dtype=torch.uint8))
            offset += gap
        t = t.detach().contiguous().cpu()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        chunks.append(t)
        offset += t.nbytes
    if checksum:
        import xxhash

        digest = xxhash.xxh3_128()
        for t in chunks:
            if t.nbytes:
                digest.update(memoryview(as_bytes(t).numpy()))
        header["__metadata__"][CHECKSUM] = digest.hexdigest()
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % ALIGN)  # the data starts aligned too
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{owner}-" if owner else f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for t in chunks:
                if t.nbytes:
                    f.write(memoryview(as_bytes(t).numpy()))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
