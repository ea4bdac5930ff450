"""The settings of a wrap, as small frozen policies (FSDP2 keeps its policies the same way).

`Storage`: how a weight is encoded where it lives. `Streaming`: how weights move (prefetch depth,
pinning, grouping). `Placement`: where the model computes and where each group lives (the
offload tier, a disk folder, a device budget). Each is validated when built, so a bad setting is
an error before anything else happens.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from offload_tensor.payloads import FLOAT8_DTYPES


class Tier(str, enum.Enum):
    """Where compute reads a weight from: resident on the GPU, from host RAM, or from disk. A str,
    so `by_tier["gpu"]` and `tier == "ram"` hold, and printed as its value."""

    GPU = "gpu"
    RAM = "ram"
    DISK = "disk"

    __str__ = str.__str__


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_bytes(value: int | str, what: str) -> int:
    """`12GiB`, `500MB`, `1.5 GB`, or an int of bytes."""
    size = None if isinstance(value, float) else _signed_size(value)
    if size is None:
        raise ValueError(f"{what}={value!r} is not a size; use an int of bytes or a string such as '12GiB' or '500MB'.")
    if size < 0:
        raise ValueError(f"{what}={value!r} is negative; use a size >= 0 (bytes, or a string such as '12GiB').")
    return int(size)


def parse_bandwidth(value: float | int | str, what: str) -> float:
    """Bytes per second, > 0: a number, or a size moved per second (`25GB`)."""
    rate = _signed_size(value)
    if rate is None or not 0 < rate < float("inf"):
        problem = "is negative" if rate is not None and rate < 0 else "is not a rate"
        raise ValueError(f"{what}={value!r} {problem}; use bytes per second > 0 (a number, or a string such as "
                         "'25GB').")  # fmt: skip
    return float(rate)


def _signed_size(value) -> float | None:
    """A size as written, sign included, or None when it is not one."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(-?)\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(3).lower() in _UNITS:
            return float(match.group(1) + match.group(2)) * _UNITS[match.group(3).lower()]
    return None


_FLOAT8_BY_NAME = {str(dtype).removeprefix("torch."): dtype for dtype in FLOAT8_DTYPES}  # "float8_e4m3fn": ...


@dataclass(frozen=True)
class Storage:
    """How weights are stored: as they are, or matrices and conv kernels in fp8 with a float32
    scale per output channel (`scale="channel"`) or per weight (`"tensor"`). `dtype` may be given
    by name, as configs carry it ("float8_e4m3fn", "torch.float8_e5m2"); it is kept as the dtype."""

    dtype: torch.dtype | None = None
    scale: str = "channel"

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):
            named = _FLOAT8_BY_NAME.get(self.dtype.strip().removeprefix("torch."))
            if named is None:
                raise ValueError(
                    f"storage_dtype={self.dtype!r} is not supported; use 'float8_e4m3fn' or 'float8_e5m2' (or "
                    "torch.float8_e4m3fn, torch.float8_e5m2), or None to keep the weights' own dtype."
                )
            object.__setattr__(self, "dtype", named)
        if self.dtype is not None and self.dtype not in FLOAT8_DTYPES:
            raise ValueError(
                f"storage_dtype={self.dtype} is not supported; use torch.float8_e4m3fn, torch.float8_e5m2 "
                "or None (keep the weights' own dtype)."
            )
        if self.scale not in ("channel", "tensor"):
            raise ValueError(f"fp8_scale={self.scale!r} is not supported; use 'channel' or 'tensor'.")


@dataclass(frozen=True)
class Streaming:
    """How streamed weights move: `prefetch` groups ahead of use; host memory pinned once at exact
    size (`pin_memory`); grouped by repeated block or by module (`granularity`)."""

    prefetch: int = 1
    pin_memory: bool = True
    granularity: str = "block"

    def __post_init__(self) -> None:
        if not isinstance(self.prefetch, int) or isinstance(self.prefetch, bool) or self.prefetch < 0:
            raise ValueError(f"prefetch={self.prefetch!r} must be an int >= 0 (the number of groups fetched ahead).")
        if not isinstance(self.pin_memory, bool):
            raise ValueError(f"pin_memory={self.pin_memory!r} must be True or False.")
        if self.granularity not in ("block", "leaf"):
            raise ValueError(f"granularity={self.granularity!r} is not supported; use 'block' or 'leaf'.")


@dataclass(frozen=True)
class Placement:
    """Where the model computes (`device`: "cuda", "cuda:N", "cpu", or None for CUDA when there is
    one) and where weights live between uses: `offload="cpu"` (host RAM) or `"disk"` (files under
    `disk_path`; a folder given as `offload` means the same). `budget`: bytes the weights may take
    where the model computes, resident groups and the streaming slots together, of which `reserve`
    is kept free (for activations); None: nothing resident on a GPU, everything resident in RAM.
    Sizes may be strings ("12GiB"). Validated when built; the device is resolved when a wrap (or a
    plan) uses it (`resolved`)."""

    device: torch.device | str | None = None
    offload: str = "cpu"
    disk_path: Path | None = None
    budget: int | None = None
    reserve: int = 0

    def __post_init__(self) -> None:
        offload, disk_path = self.offload, self.disk_path
        if isinstance(offload, torch.device):
            offload = str(offload)
        if isinstance(offload, os.PathLike) or (
            isinstance(offload, str)
            and offload not in ("cpu", "disk")
            and (os.sep in offload or os.path.isdir(offload))
        ):
            if disk_path is not None and Path(disk_path) != Path(offload):
                raise ValueError(f"offload={os.fspath(offload)!r} and disk_path={os.fspath(disk_path)!r} name two "
                                 "folders; pass one.")  # fmt: skip
            offload, disk_path = "disk", offload
        if offload not in ("cpu", "disk"):
            raise ValueError(f"offload={offload!r} is not understood; use 'cpu' (host RAM), 'disk' (with disk_path=), "
                             "or a folder.")  # fmt: skip
        if offload == "disk" and disk_path is not None:
            disk_path = Path(disk_path)
            if disk_path.exists() and not disk_path.is_dir():
                raise ValueError(f"disk_path={os.fspath(disk_path)!r} is a file; pass a folder (created if missing).")
        elif disk_path is not None:
            raise ValueError(
                f"disk_path={os.fspath(disk_path)!r} is given but offload={offload!r}; pass offload='disk'."
            )
        budget = None if self.budget is None else parse_bytes(self.budget, "budget")
        reserve = parse_bytes(self.reserve, "reserve")
        if budget is None and reserve:
            raise ValueError(f"reserve={reserve} applies within a budget; pass budget= too.")
        device = None if self.device is None else _planned_device(self.device)
        for name, value in (("device", device), ("offload", offload), ("disk_path", disk_path), ("budget", budget),
                            ("reserve", reserve)):  # fmt: skip
            object.__setattr__(self, name, value)

    def resolved(self, *, for_plan: bool = False) -> Placement:
        """This placement on a concrete device: CUDA when there is one (a plan: CUDA, which this
        machine may lack), else the CPU; a wrap also needs the disk tier's folder."""
        if not for_plan and self.offload == "disk" and self.disk_path is None:
            raise ValueError("offload='disk' needs disk_path=: the folder where the weights are written.")
        device = (
            _planned_device(self.device if self.device is not None else "cuda")
            if for_plan
            else compute_device(self.device)
        )
        return replace(self, device=device)

    @property
    def resident_tier(self) -> Tier:
        return Tier.GPU if self.device.type == "cuda" else Tier.RAM

    def check_has_a_tier(self) -> None:
        """A budget needs somewhere to stream from: computing on the CPU from RAM, every weight is
        where the model computes already."""
        if self.budget is not None and self.device.type == "cpu" and self.offload == "cpu":
            raise ValueError(
                "budget= limits what stays where the model computes, but computing on the CPU with offload='cpu' "
                "every weight is there already; to keep part of the model on disk, pass offload='disk' (disk_path=...)."
            )


# The keyword arguments of wrap_model_for_offload, plan and the pipeline functions, by the policy
# they build and the policy's field; their defaults are the policies' own.
KEYWORDS = {
    Storage: {"storage_dtype": "dtype", "fp8_scale": "scale"},
    Streaming: {"prefetch": "prefetch", "pin_memory": "pin_memory", "granularity": "granularity"},
    Placement: {"device": "device", "offload": "offload", "disk_path": "disk_path", "budget": "budget",
                "reserve": "reserve"},
}  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """Everything a wrap or a plan was asked for: the three policies (the placement on a resolved
    device) and the host RAM the weights may take (`ram`: None, this machine's)."""

    storage: Storage
    streaming: Streaming
    placement: Placement
    ram: int | None = None


def settings(*, storage: Storage | None = None, streaming: Streaming | None = None, placement: Placement | None = None,
             max_memory: dict | None = None, ram=None, for_plan: bool = False, **keywords) -> Settings:  # fmt: skip
    """The one place where the keyword arguments users know become policies: each policy is the
    object given (`storage=Storage(...)`, as FSDP2 takes its policies), or built from its keywords
    (None: the policy's default). A policy given both ways is an error; so is an unknown keyword.
    `max_memory` is accelerate's form of `budget` and `ram`."""
    known = {k for names in KEYWORDS.values() for k in names}
    unknown = sorted(keywords.keys() - known)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; the settings are {sorted(known)}.")
    given = {k: v for k, v in keywords.items() if v is not None}
    if max_memory is not None:
        if "budget" in given or ram is not None:
            raise ValueError("pass max_memory= or budget=/ram=, not both.")
        device = given.get("device", placement.device if placement is not None else None)
        planned = _planned_device(device if device is not None else "cuda") if for_plan else compute_device(device)
        budget, ram = _max_memory(max_memory, planned)
        if budget is not None:
            given["budget"] = budget
    policies = {}
    for cls, value in ((Storage, storage), (Streaming, streaming), (Placement, placement)):
        names = KEYWORDS[cls]
        if value is None:
            value = cls(**{field: given[k] for k, field in names.items() if k in given})
        elif not isinstance(value, cls):
            raise TypeError(f"{cls.__name__.lower()}={value!r} must be an offload_tensor.{cls.__name__}.")
        elif any(k in given for k in names):
            both = [k for k in names if k in given]
            raise ValueError(f"pass {cls.__name__.lower()}= or {'/'.join(both)}=, not both.")
        policies[cls] = value
    ram = None if ram is None else parse_bytes(ram, "ram")
    return Settings(policies[Storage], policies[Streaming], policies[Placement].resolved(for_plan=for_plan), ram)


def _max_memory(max_memory, device: torch.device) -> tuple[int | None, int | None]:
    """accelerate-style `max_memory={"cuda:0": "10GiB", "cpu": "30GiB"}`: (budget, ram)."""
    if not isinstance(max_memory, dict):
        raise ValueError(f"max_memory={max_memory!r} must be a dict such as {{'cuda:0': '10GiB', 'cpu': '30GiB'}}.")
    budget = ram = None
    for key, value in max_memory.items():
        k = f"cuda:{key}" if isinstance(key, int) else str(key)
        if k == "cpu":
            ram = parse_bytes(value, "max_memory['cpu']")
        elif k in ("cuda", f"cuda:{device.index or 0}", str(device)) and device.type == "cuda":
            budget = parse_bytes(value, f"max_memory[{key!r}]")
        else:
            raise ValueError(
                f"max_memory key {key!r} is not the compute device ({device}) or 'cpu'; offload_tensor computes on one "
                "device: pass {'cuda:0': ..., 'cpu': ...}."
            )
    return budget, ram


# The device backend is written against torch's device-generic streams and events, but only CUDA
# and the CPU have run it; MPS would take the synchronous engine (its events work on the default
# stream only).
UNRUN = "xpu and mps are not supported yet."


def _planned_device(device) -> torch.device:
    try:
        resolved = torch.device(device if device is not None else "cuda")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device; use 'cuda', 'cuda:N' or 'cpu'.") from e
    if resolved.type not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: offload_tensor computes on 'cuda' (ROCm included) or 'cpu'; {UNRUN}")
    return resolved


_announced_cpu = False


def compute_device(device: str | torch.device | None) -> torch.device:
    global _announced_cpu
    import logging

    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if not _announced_cpu:
            _announced_cpu = True
            logging.getLogger("offload_tensor").info(
                "offload_tensor: CUDA is not available; computing on the CPU (pass device= to choose)."
            )
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device; use 'cuda', 'cuda:N' or 'cpu'.") from e
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} asks for CUDA, which is not available here; use device='cpu' or None.")
        return torch.device("cuda", torch.cuda.current_device() if resolved.index is None else resolved.index)
    if resolved.type != "cpu":
        raise ValueError(f"device={device!r}: offload_tensor computes on 'cuda' (ROCm included) or 'cpu'; {UNRUN}")
    return resolved
