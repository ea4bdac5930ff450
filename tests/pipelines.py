"""Tiny diffusers pipelines built offline (from offload_tensor.testing, which the examples share)."""

from offload_tensor.testing import flux_call, tiny_flux_pipeline, tiny_wan_pipeline, wan_call  # noqa: F401
