"""The disk tier: each group's payload in a safetensors file of its own, read ahead in a background
thread by the same scheduler that streams host arenas.

Files. A group's payload tensors are written once to `<disk_path>/<group>-<layout>.safetensors`,
where `layout` hashes the group's weight names, shapes, dtypes and encodings; its metadata records
that hash and where the values came from (a checkpoint's fingerprint, or "memory"). A file is
written to a temporary name and renamed, so readers (another process wrapping from the same
folder) see a whole file or none. On reuse the header is checked against the group (names,
shapes, dtypes, byte ranges inside the file, layout hash, source): a truncated or stale file is a
`CheckpointError` that names it, never wrong weights. Only files written from a checkpoint are
shared (reused); a write into one first moves its group to a private copy (`make_private`).
Files written from memory get a name of their wrap's own and are deleted with their group.

Reads. `DiskBackend` (computing on the CPU) loads a group with `os.preadv` straight into freshly
allocated tensors, one per payload tensor, on a background thread, so reading overlaps compute
(preadv releases the GIL). Fresh tensors, because a fetch hands its result over (see [Note: fetch
hands over ownership] in ops.py): a read pops the tensors from the slot, nothing is shared. No
memory map is read from, so the page cache holding the files is never part of the process's RSS;
the payload tensors the weights report are a shared memory map of the file, touched only when
something reads them directly (a state_dict, unwrap_model), and writes into them (load_state_dict)
land in the file. `DiskDeviceBackend` reads into (pinned) staging buffers and copies each on to
the device slot on the device backend's copy stream.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import re
import shutil
import socket
import uuid
import warnings
import weakref
from collections.abc import Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from compile_rules.table import RefusedOpError
from offload_tensor.checkpoint import CHECKSUM, CheckpointError, byte_view, read_exactly, read_header, write_atomically
from offload_tensor.engine.host_store import Region, aligned_empty, contiguous_stride, give_back_freed_memory
from offload_tensor.engine.scheduler import Backend, StreamRaceError


@dataclass
class DiskGroup:
    """One group's payload on disk: `nbytes` bytes at `offset` of `path`; `regions[i][j]` is
    tensor j of weight i, relative to `offset`."""

    path: Path
    offset: int
    nbytes: int
    regions: list[list[Region]]
    shared: bool = False  # a cache of a checkpoint: other wraps (and processes) read the same file
    checksum: str | None = None  # of the group's bytes, written with the file (see `check`)
    verified: bool = True  # the bytes were checked against the checksum in this process, or need no check
    _map: mmap.mmap | None = field(default=None, repr=False)

    def payloads(self) -> list[tuple[torch.Tensor, ...]]:
        """The payload tensors as views of a shared memory map of the file (reads fault pages in;
        writes land in the file: see `before_write`). A cache is mapped read-only (its folder may
        be read-only): a write first moves the group to a private copy, mapped writable in its place."""
        if self._map is None:
            with open(self.path, "rb" if self.shared else "r+b") as f:
                self._map = mmap.mmap(
                    f.fileno(), 0, prot=mmap.PROT_READ if self.shared else mmap.PROT_READ | mmap.PROT_WRITE
                )
        flat = _frombuffer(self._map)
        _MAPPED[flat.data_ptr()] = self
        return [tuple(p.view(flat[self.offset : self.offset + self.nbytes]) for p in weight) for weight in self.regions]

    def check(self, data: torch.Tensor) -> None:
        """Check the group's bytes, just read into `data` (a uint8 tensor), against the checksum
        written with the file, the first time they are read in this process: a byte changed on
        disk (bit rot, another program) is an error naming the file, never a wrong weight."""
        if self.verified:
            return
        if xxhash.xxh3_128(memoryview(data[: self.nbytes].numpy())).hexdigest() != self.checksum:
            raise self._corrupted()
        self.verified = True

    def verify(self) -> None:
        """`check` for reads that go through the memory map (state_dict, unwrap_model, a write):
        the group's bytes are read from the file in chunks and hashed."""
        if self.verified:
            return
        digest, chunk = xxhash.xxh3_128(), torch.empty(min(self.nbytes, 64 << 20), dtype=torch.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for start in range(0, self.nbytes, chunk.numel()):
                n = min(chunk.numel(), self.nbytes - start)
                read_exactly(fd, byte_view(chunk[:n]), self.offset + start, str(self.path))
                digest.update(memoryview(chunk[:n].numpy()))
        finally:
            os.close(fd)
        if digest.hexdigest() != self.checksum:
            raise self._corrupted()
        self.verified = True

    def _corrupted(self) -> CheckpointError:
        return CheckpointError(
            f"{self.path} is corrupted: its bytes differ from the checksum written with it (a disk error, or another "
            "program wrote into it); nothing read from it was used. Delete it: the next wrap writes it again from the "
            "checkpoint."
        )

    def write(self, index: int, values: Sequence[torch.Tensor]) -> None:
        """Write weight `index`'s payload tensors into the file (with pwrite: no page of the memory
        map enters this process's RSS), moving to a private copy first if the file is shared."""
        self.make_private()
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for region, value in zip(self.regions[index], values):
                flat = torch.empty(region.nbytes // region.dtype.itemsize, dtype=region.dtype)
                flat.as_strided(region.shape, region.stride).copy_(value)  # in the file's layout
                raw, written = byte_view(flat), 0
                while written < len(raw):
                    written += os.pwrite(fd, raw[written:], self.offset + region.offset + written)
        finally:
            os.close(fd)

    def make_private(self) -> None:
        """Before the first write into a shared file: copy it to a file of this wrap's own and map
        the copy at the same address, so every payload view now reads and writes the copy. The
        cache, and every other model reading it, keep the checkpoint's values. Refused, with
        nothing changed, when the cache's folder is not writable."""
        if not self.shared:
            return
        self.verify()  # the copy starts from the checkpoint's bytes, or not at all
        private = unique_file(self.path)
        try:
            shutil.copyfile(self.path, private)
        except OSError as e:
            _unlink(private)
            raise RefusedOpError(
                f"a write into a weight stored in the disk-tier cache {self.path} goes to a private copy of its group, "
                f"written beside it, and that failed ({e.strerror or e}). Wrap with a writable disk_path (with room "
                "for the copy) to change the weights; nothing was changed."
            ) from e
        if self._map is not None:
            _remap_in_place(self._map, private)
        self.path, self.shared = private, False
        weakref.finalize(self, _unlink, private)


def _frombuffer(mapped: mmap.mmap) -> torch.Tensor:
    with warnings.catch_warnings():  # a read-only map: written only after make_private remapped it
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(mapped, dtype=torch.uint8)


_MAPPED: weakref.WeakValueDictionary[int, DiskGroup] = weakref.WeakValueDictionary()  # map address -> group


def before_write(payload: Sequence[torch.Tensor]) -> None:
    """Called before anything writes into a payload: a payload in a shared disk file is moved to
    a private copy first (a write never reaches a checkpoint cache)."""
    for t in payload:
        group = _MAPPED.get(t.untyped_storage().data_ptr())
        if group is not None:
            group.make_private()


def before_read(payload: Sequence[torch.Tensor]) -> None:
    """Called before something reads a payload through its memory map (state_dict, unwrap_model,
    a write): a cache file's bytes are checked once per process first (see `DiskGroup.verify`)."""
    if not _MAPPED:
        return
    for t in payload:
        group = _MAPPED.get(t.untyped_storage().data_ptr())
        if group is not None:
            group.verify()


# [Note: file owners]
# A file of one wrap alone (written from memory, or a private copy of a cache) and a temporary
# file being written carry their owner in their name: a tag of this host and pid namespace, the
# pid and the process's start time. A process killed before it could delete its files (kill -9,
# the OOM killer, a power loss) leaves them behind; the next wrap into the folder removes those
# whose owner is on this host and no longer runs (the pid is gone, or now belongs to a process
# started at another time). Files of other hosts sharing the folder, of live processes, and
# caches (which have no owner) are never touched.
_OWNED = re.compile(r"\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-(?:[0-9a-f]{8}\.safetensors|\w{8}\.tmp)$")
_owner: tuple[int, str] | None = None  # (pid, owner tag) of this process


def owner_tag() -> str:
    """This process's part of the names of the files it owns (see [Note: file owners])."""
    global _owner
    pid = os.getpid()
    if _owner is None or _owner[0] != pid:  # computed again in a forked child
        _owner = (pid, f"{_host_tag()}-{pid}-{_start_time(pid) or 0}")
    return _owner[1]


def _host_tag() -> str:
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return hashlib.blake2b(f"{socket.gethostname()}|{namespace}".encode(), digest_size=4).hexdigest()


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot, /proc/<pid>/stat field 22), None if it
    does not run."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def reclaim(folder: Path) -> tuple[int, int]:
    """Remove the files in `folder` of processes of this host that no longer run (see [Note:
    file owners]); returns how many and their bytes."""
    if not os.path.isdir("/proc/self") or not folder.is_dir():
        return 0, 0  # no way to tell which processes run: keep everything
    host, count, nbytes = _host_tag(), 0, 0
    for path in folder.iterdir():
        found = _OWNED.search(path.name)
        if found is None or found["host"] != host or _start_time(int(found["pid"])) == found["start"]:
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:  # gone already, or a read-only folder
            continue
        count, nbytes = count + 1, nbytes + size
    return count, nbytes


def check_room(folder: Path, nbytes: int, files: int, why: str) -> None:
    """Before writing `files` group files of `nbytes` in all into `folder`: the folder is created
    if missing and must be writable and have the room, else an OSError naming the folder, the
    bytes needed and the bytes free. `why`: what the files are, for the message."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        probe = folder / f".offload_tensor-probe.{owner_tag()}-{uuid.uuid4().hex[:8]}.tmp"
        probe.touch()  # root passes os.access on a read-only file system
        probe.unlink()
    except OSError as e:
        raise OSError(
            e.errno, f"disk_path {folder} is not writable ({e.strerror or e}), and {files} group files ({why}) must be "
            "written there; pass a writable disk_path."
        ) from e
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise OSError(
            errno.ENOSPC, f"offload='disk' writes {files} group files ({why}), {_size(nbytes)}, to {folder}, which has "
            f"{_size(free)} free; free space there, or pass another disk_path."
        )


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def unique_file(path: Path) -> Path:
    """A new name beside `path` for a file of this wrap alone (deleted when its group is collected;
    after a crash, by the next wrap into the folder: see [Note: file owners])."""
    return path.with_name(f"{path.name.removesuffix('.safetensors')}.{owner_tag()}-{uuid.uuid4().hex[:8]}.safetensors")


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:  # gone already, or its folder became read-only
        pass


def _remap_in_place(mapped: mmap.mmap, path: Path) -> None:
    """Map `path` over the pages of `mapped` (same address, same length; MAP_FIXED replaces the
    old mapping atomically), so tensors viewing those pages see the new file."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    address = _frombuffer(mapped).data_ptr()
    fd = os.open(path, os.O_RDWR)
    try:
        got = libc.mmap(
            address, len(mapped), mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | 0x10, fd, 0
        )  # 0x10: MAP_FIXED
        if got != address:
            raise OSError(ctypes.get_errno(), f"could not map {path} in place of the shared file")
    finally:
        os.close(fd)


def read_exactly_into(group: DiskGroup, arena: torch.Tensor) -> None:
    """Copy a group's bytes from its file into `arena` (laid out as the group's regions)."""
    fd = os.open(group.path, os.O_RDONLY)
    try:
        read_exactly(fd, memoryview(arena[: group.nbytes].numpy()), group.offset, str(group.path))
    finally:
        os.close(fd)


def layout_hash(names: Sequence[str], payloads: Sequence[Sequence[tuple]]) -> str:
    """What a group file must hold: weight names and each payload tensor's (name, shape, dtype)."""
    digest = hashlib.blake2b(digest_size=8)
    for name, inner in zip(names, payloads):
        digest.update(f"{name}:{inner};".encode())
    return digest.hexdigest()


def group_file(folder: Path, group_name: str, layout: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in group_name) or "root"
    return folder / f"{safe}-{layout}.safetensors"


def write_group(
    path: Path,
    names: Sequence[str],
    inner_names: Sequence[Sequence[str]],
    payloads: Sequence[Sequence[torch.Tensor]],
    metadata: dict[str, str],
    *,
    shared: bool,
) -> DiskGroup:
    """Write a group's file. `shared`: a cache of a checkpoint, at its reusable name, with the
    checksum of its bytes; else a file of this wrap alone, at a name no other wrap uses, deleted
    when the group is collected."""
    if not shared:
        path = unique_file(path)
    tensors = {f"{n}.{inner}": t for n, inners, ts in zip(names, inner_names, payloads) for inner, t in zip(inners, ts)}
    try:
        write_atomically(path, tensors, metadata, owner=owner_tag(), checksum=shared)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise OSError(e.errno, f"{path.parent} ran out of space while writing {path.name}; free space there, or pass "
                               "another disk_path.") from e  # fmt: skip
    group = open_group(path, names, inner_names, metadata, shared=shared)
    group.verified = True  # its bytes came from this process's memory; other processes check a cache's
    if not shared:
        weakref.finalize(group, _unlink, path)
    return group


def write_private(folder: Path, group_name: str, names: Sequence[str], inner_names: Sequence[Sequence[str]],
                  payloads: Sequence[Sequence[torch.Tensor]]) -> DiskGroup:  # fmt: skip
    """A group file of this wrap's own in `folder`, holding `payloads` (new payloads of a group's
    weights after the wrap: dequantized, or weights added); the group's old file is left to its
    owner (a cache to other wraps, or deleted with the old group)."""
    layout = layout_hash(names, [[(t.shape, t.dtype) for t in p] for p in payloads])
    return write_group(group_file(folder, group_name, layout), names, inner_names, payloads,
                       {"offload_tensor.source": "memory"}, shared=False)  # fmt: skip


def open_group(path: Path, names: Sequence[str], inner_names: Sequence[Sequence[str]], metadata: dict[str, str],
               specs: Sequence[Sequence[tuple]] | None = None, *, shared: bool = True) -> DiskGroup:  # fmt: skip
    """The group stored in `path`, checked: every tensor present with the expected shape and dtype
    (`specs`: (shape, dtype) per payload tensor), inside the file, `metadata` as written, and (a
    cache) a checksum of its bytes recorded, which its first read in this process checks. A
    CheckpointError says what does not fit."""
    stored, found_metadata = read_header(path)
    for key, value in metadata.items():
        if found_metadata.get(key) != value:
            raise CheckpointError(
                f"{path} is stale: it was written for {key}={found_metadata.get(key)!r}, not {value!r}"
            )
    entries = []
    for w, (name, inners) in enumerate(zip(names, inner_names)):
        weight = []
        for j, inner in enumerate(inners):
            entry = stored.get(f"{name}.{inner}")
            if entry is None:
                raise CheckpointError(f"{path} does not hold {name}.{inner}")
            if specs is not None and (tuple(specs[w][j][0]), specs[w][j][1]) != (entry.shape, entry.dtype):
                raise CheckpointError(
                    f"{path}: {name}.{inner} is {entry.shape} {entry.dtype}, not "
                    f"{tuple(specs[w][j][0])} {specs[w][j][1]}"
                )
            weight.append(entry)
        entries.append(weight)
    start = min((e.offset for weight in entries for e in weight), default=0)
    end = max((e.offset + e.nbytes for weight in entries for e in weight), default=0)
    checksum = found_metadata.get(CHECKSUM)
    if shared:
        data = (
            min((e.offset for e in stored.values()), default=0),
            max((e.offset + e.nbytes for e in stored.values()), default=0),
        )
        if checksum is None:
            raise CheckpointError(f"{path} has no checksum (written by an earlier offload_tensor)")
        if data != (start, end):
            raise CheckpointError(f"{path} holds more than its group")
    regions = [
        [Region(e.offset - start, torch.Size(e.shape), contiguous_stride(e.shape), e.dtype) for e in weight]
        for weight in entries
    ]
    return DiskGroup(path, start, end - start, regions, shared, checksum, verified=not shared)


IO_ALIGN = 4096  # direct I/O needs buffer, offset and length aligned to the device's block size


def _shut(reader: ThreadPoolExecutor, files: _Files) -> None:
    reader.shutdown(wait=True)
    files.close()


class _BufferPool:
    """Read buffers, reused once nothing holds them any more.

    A group's weights are handed over as views of its buffer, so the buffer is free exactly when
    its storage has no user left but the pool: `_storage_Use_Count` counts every tensor (and
    autograd's saved tensors) over the storage, in C++, which Python reference counts would miss.
    Reuse spares the kernel zeroing fresh pages for every read (a large part of a step's CPU time
    on a small machine). Free buffers are kept up to `keep_bytes` (one group's worth), so the pool
    adds at most that to the memory the model holds."""

    def __init__(self, keep_bytes: int) -> None:
        self.keep_bytes = keep_bytes
        self.buffers: list[_Buffer] = []  # oldest use first

    def take(self, nbytes: int) -> torch.Tensor:
        idle = [b for b in self.buffers if b.idle]
        fits = [b for b in idle if b.tensor.numel() >= nbytes]
        if fits:
            chosen = min(fits, key=lambda b: b.tensor.numel())
            idle = [b for b in idle if b is not chosen]
        else:
            chosen = _Buffer(aligned_empty(nbytes))
        spare = sum(b.tensor.numel() for b in idle)
        dropped = set()
        for b in idle:  # oldest first: give back what exceeds one group's worth
            if spare <= self.keep_bytes:
                break
            dropped.add(id(b))
            spare -= b.tensor.numel()
        self.buffers = [b for b in self.buffers if id(b) not in dropped and b is not chosen] + [chosen]
        if dropped:
            give_back_freed_memory()  # below glibc's mmap threshold, freed buffers stay in the heap otherwise
        return chosen.tensor[:nbytes]


class _Buffer:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.idle_count = _use_count(tensor) if REUSES_BUFFERS else 0  # nothing but the pool holds it

    @property
    def idle(self) -> bool:
        return REUSES_BUFFERS and _use_count(self.tensor) == self.idle_count


def _use_count(t: torch.Tensor) -> int:
    return _storage_use_count(t.untyped_storage()._cdata)


def _counts_users() -> bool:
    """Whether the private `torch._C._storage_Use_Count` counts a storage's users as the pool
    needs: one more while a view of it lives, as many as before once the view is gone. Where it
    does not (another torch), a buffer is never reused: fresh buffers, slower, the same results."""
    if _storage_use_count is None:
        return False
    try:
        buffer = torch.empty(64, dtype=torch.uint8)
        before = _use_count(buffer)
        view = buffer[8:16]
        during = _use_count(buffer)
        del view
        return during == before + 1 and _use_count(buffer) == before
    except Exception:
        return False


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)
REUSES_BUFFERS = _counts_users()


class _Files:
    """Descriptors per file, opened once (preadv takes explicit offsets: one descriptor serves
    every thread). Group reads use direct I/O where the file system has it: the bytes go from the
    disk into our buffer without a copy through the page cache, which costs CPU time the compute
    would otherwise have (and the page cache never holds the model)."""

    def __init__(self) -> None:
        self.fds: dict[Path, int] = {}
        self.direct: dict[Path, int | None] = {}

    def fd(self, path: Path) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read(self, path: Path, buffer: torch.Tensor, offset: int, needed: int) -> None:
        """Read at least `needed` bytes at `offset` into `buffer` (aligned, for direct I/O)."""
        direct = self.direct.get(path, 0)
        if direct == 0:
            try:
                direct = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)) if hasattr(os, "O_DIRECT") else None
            except OSError:  # tmpfs and others refuse O_DIRECT
                direct = None
            self.direct[path] = direct
        view, done = byte_view(buffer), 0
        if direct is not None:
            try:
                while done < needed:
                    n = os.preadv(direct, [view[done:]], offset + done)
                    if n == 0 or n % 512:
                        done += n
                        break  # the end of the file
                    done += n
            except OSError:  # EINVAL: this file system refuses the alignment after all
                os.close(direct)
                self.direct[path] = None
                done = 0
        if done < needed:
            read_exactly(self.fd(path), view[done:needed], offset + done, str(path))

    def close(self) -> None:
        for fd in [*self.fds.values(), *(d for d in self.direct.values() if d)]:
            os.close(fd)
        self.fds.clear()
        self.direct.clear()


def _unaliased(regions: Sequence[Region], flat: torch.Tensor) -> list[torch.Tensor]:
    """One weight's payload tensors out of its group's read buffer: the largest a view of the
    buffer (no copy of the bulk of the bytes), every other one a copy of its own. The fetch op
    returns a weight's tensors as one list whose entries must not alias each other (an fp8 or
    quantized payload's data and scales would otherwise share the buffer's storage). The copies
    hold no reference to the buffer, so the pool's use counts still see only the views."""
    largest = max(range(len(regions)), key=lambda j: regions[j].nbytes, default=0)
    return [p.view(flat) if j == largest else p.view(flat).clone() for j, p in enumerate(regions)]


class _Load:
    """One group's bytes read into a pooled buffer (`flat`), handed over once, weight by weight
    (`taken`) or whole; once all of it is handed over the load lets go of the buffer (the pool
    reuses it when the last view of it is gone), and a second read of the same bytes reads the
    file again."""

    def __init__(self, flat: torch.Tensor, weights: int) -> None:
        self.flat: torch.Tensor | None = flat
        self.taken: set = set()
        self.weights = weights


class DiskBackend(Backend):
    """Computing on the CPU: a group is read into a pooled buffer by a background thread, and
    handed over as views of it."""

    def __init__(self) -> None:
        self.groups: list[DiskGroup] = []
        self.files = _Files()
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="offload_tensor-disk")
        self.slots: list[Future | None] = []
        self.bytes_read = 0
        # A model dropped without unwrap_model: its descriptors and reader thread go with it.
        weakref.finalize(self, _shut, self.reader, self.files)

    def prepare(self, groups: Sequence[DiskGroup], keys: Sequence[Sequence[Hashable]], slots: int) -> None:
        self.groups = list(groups)
        self.buffers = _BufferPool(keep_bytes=max((g.nbytes for g in self.groups), default=0) + IO_ALIGN)
        self.key_index = {key: (g, i) for g, group_keys in enumerate(keys) for i, key in enumerate(group_keys)}
        self.slots = [None] * slots

    def _load(self, group: int) -> _Load:
        """The group's bytes, read in one go into a buffer of the pool (see the module doc)."""
        g = self.groups[group]
        start = g.offset // IO_ALIGN * IO_ALIGN
        end = -(-(g.offset + g.nbytes) // IO_ALIGN) * IO_ALIGN
        buffer = self.buffers.take(end - start)
        self.files.read(g.path, buffer, start, needed=g.offset + g.nbytes - start)
        flat = buffer[g.offset - start : g.offset - start + g.nbytes]
        g.check(flat)  # a cache's first read in this process: its checksum
        self.bytes_read += g.nbytes
        return _Load(flat, len(g.regions))

    def copy(self, group: int, slot: int, wait_for) -> Future:
        # Release events are None here: compute on the CPU has finished every read by the time
        # the scheduler moves on, and reads hand their tensors over, so the slot shares nothing.
        future = self.reader.submit(self._load, group)
        self.slots[slot] = future
        return future

    def wait(self, event: Future) -> None:
        event.result()  # a read error surfaces here, in the thread that asked

    def _landed(self, group: int, slot: int) -> _Load:
        future = self.slots[slot]
        if future is None or not future.done():
            raise StreamRaceError(f"compute reads slot {slot} (group {group}) before its read from disk finished")
        return future.result()

    def read(self, group: int, slot: int, key: Hashable) -> list[torch.Tensor]:
        load, (g, i) = self._landed(group, slot), self.key_index[key]
        if load.flat is None or key in load.taken:  # read twice while in its slot (a tied weight): again
            load = self._reload(g)
        load.taken.add(key)
        tensors = _unaliased(self.groups[g].regions[i], load.flat)
        if len(load.taken) == load.weights:
            load.flat = None
        return tensors

    def read_group(self, group: int, slot: int) -> torch.Tensor:
        load = self._landed(group, slot)
        if load.flat is None or load.taken:  # handed over already: the file again, into a buffer of its own
            load = self._reload(group)
        flat, load.flat = load.flat, None
        return flat

    def _reload(self, group: int) -> _Load:
        g = self.groups[group]
        flat = torch.empty(g.nbytes, dtype=torch.uint8)
        read_exactly(self.files.fd(g.path), byte_view(flat), g.offset, str(g.path))
        return _Load(flat, len(g.regions))

    def release(self, slot: int) -> None:
        return None

    def quiesce(self) -> None:
        for future in self.slots:
            if future is not None:
                future.exception()  # wait; errors surface on the read that needs it

    def close(self) -> None:
        self.quiesce()
        self.reader.shutdown(wait=True)
        self.files.close()


class DiskDeviceBackend(Backend):
    """Computing on an accelerator from the disk tier: a background thread reads a group into a
    (pinned, where the device backend pins) staging buffer, one per slot, then the copy stream
    moves it into the device slot; a staging buffer is reused only after its copy to the device
    finished. Reads and releases are the device backend's."""

    def __init__(self, device: torch.device, pin_memory: bool = True) -> None:
        from offload_tensor.engine.device import DeviceBackend

        self.device = DeviceBackend(device, pin_memory=pin_memory)
        self.files = _Files()
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="offload_tensor-disk")
        self.bytes_read = 0
        weakref.finalize(self, _shut, self.reader, self.files)

    def prepare(self, groups: Sequence[DiskGroup], keys: Sequence[Sequence[Hashable]], slots: int) -> None:
        self.groups = list(groups)
        largest = max((g.nbytes for g in self.groups), default=0) + 2 * IO_ALIGN  # room to align the read
        self.staging = [aligned_empty(largest, pin_memory=self.device.pin_memory) for _ in range(slots)]
        self.staged: list = [None] * slots  # the last copy out of each staging buffer (an event)
        self.device.prepare(self.groups, keys, slots)  # device slots, key index, regions (no arenas to pin)

    def copy(self, group: int, slot: int, wait_for) -> Future:
        def job():
            g = self.groups[group]
            if self.staged[slot] is not None:
                self.staged[slot].synchronize()  # this staging buffer's previous copy left it
            start = g.offset // IO_ALIGN * IO_ALIGN
            self.files.read(g.path, self.staging[slot], start, needed=g.offset + g.nbytes - start)
            staging = self.staging[slot][g.offset - start : g.offset - start + g.nbytes]
            g.check(staging)
            self.bytes_read += g.nbytes
            ready = self.device.copy_from(staging, slot, wait_for)
            self.staged[slot] = ready
            return ready

        self.device.check_not_capturing()
        return self.reader.submit(job)

    def wait(self, event: Future) -> None:
        self.device.wait(event.result())

    def read(self, group: int, slot: int, key: Hashable) -> list[torch.Tensor]:
        return self.device.read(group, slot, key)

    def read_group(self, group: int, slot: int) -> torch.Tensor:
        return self.device.read_group(group, slot)

    def release(self, slot: int):
        return self.device.release(slot)

    def quiesce(self) -> None:
        self.reader.submit(lambda: None).result()
        self.device.quiesce()

    def close(self) -> None:
        self.quiesce()
        self.reader.shutdown(wait=True)
        self.files.close()
        self.device.close()

    @property
    def pinned_bytes(self) -> int:
        return sum(t.numel() for t in self.staging) if self.device.pin_memory else 0
