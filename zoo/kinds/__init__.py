"""Every attention, FFN, router and RoPE-scaling kind, one module per family, each registered once
(zoo/kinds/registry.py says what a registration holds). Importing this package registers them all."""

from zoo.kinds import mha, mla, mlp, moe, rope_scaling, routers  # noqa: F401  (registers the kinds)
from zoo.kinds.registry import (
    Count,
    Kind,
    Size,
    Spec,
    build_slot,
    kind_of,
    kinds,
    register,
    registered,
    shrink,
    union,
    unregister,
)

__all__ = ["Count", "Kind", "Size", "Spec", "build_slot", "kind_of", "kinds", "register", "registered", "shrink",
           "union", "unregister"]
