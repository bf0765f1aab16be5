"""MoE ops (router top-k, slot assignment, permute, unpermute) and their backends."""
from . import reference
from .registry import Backend, available_backends, get_backend, register_backend

__all__ = ["reference", "Backend", "available_backends", "get_backend", "register_backend"]
