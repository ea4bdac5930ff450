"""The libraries offload_tensor knows (see registry.py for the protocol): importing this package
registers each one's Integration, and hands on the registry's queries."""

from offload_tensor.integrations import accelerate, diffusers, quanto, torchao, transformers  # noqa: F401
from offload_tensor.integrations.registry import (  # noqa: F401
    Integration,
    WrapOps,
    active,
    before_load,
    block_names,
    carrier,
    check,
    components,
    install,
    keep_in_fp32,
    opaque,
)
