"""The `moe` FFN kind: routed experts (stacked weights), a router kind, optional shared experts."""

from __future__ import annotations

import math
from typing import Literal

import fiddle as fdl
from pydantic import Field, model_validator

from zoo.blocks.moe import MoE
from zoo.kinds.registry import Count, Kind, Size, Spec, build_slot, kind_of, matrix_numel, numel, register, union
from zoo.kinds.routers import SoftmaxTopKRouterSpec

TOY_EXPERT_HIDDEN = 32  # zoo.presets.tiny
TOY_EXPERTS_PER_GROUP = 2  # so group-limited routing still chooses within each group

# A field annotation, re-pointed by every later registration; zoo.kinds.union("router") is the live union.
RouterSpec = union("router")


class MoESpec(Spec):
    """Routed experts (stacked weights) plus optional always-on shared experts."""

    kind: Literal["moe"] = "moe"
    n_experts: int = Field(8, ge=1)
    top_k: int = Field(2, ge=1)
    d_expert: int = Field(1536, ge=1)
    n_shared_experts: int = Field(0, ge=0)
    router: RouterSpec = SoftmaxTopKRouterSpec()
    dispatcher: Literal["dropless"] = "dropless"

    @model_validator(mode="after")
    def _routing(self) -> MoESpec:
        if self.top_k > self.n_experts:
            raise ValueError(
                f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts}); "
                f"lower top_k or raise n_experts"
            )
        router = self.router
        check = kind_of(router).check
        if check is not None:
            check(router, n_experts=self.n_experts, top_k=self.top_k)
        return self

    def training_warning(self) -> str | None:
        """What makes this MoE a poor thing to train although it computes what it says (a released model
        may do it): the trainer warns, import, evaluation and generation do not."""
        # A router kind without the field does not normalise.
        if self.top_k == 1 and getattr(self.router, "norm_topk_prob", False):
            # One weight normalised by itself is 1 (times routed_scaling_factor): a constant, so the LM
            # loss sends the router no gradient.
            return ("top_k (1) with router.norm_topk_prob (True) makes every combine weight a constant and "
                    "leaves the router without gradient from the LM loss; set router.norm_topk_prob=false "
                    "or top_k >= 2")
        return None


def build(spec: MoESpec, *, d_model: int) -> fdl.Config:
    router = build_slot("router", spec.router, d_model=d_model, n_experts=spec.n_experts, top_k=spec.top_k)
    return fdl.Config(
        MoE,
        d_model=d_model,
        n_experts=spec.n_experts,
        d_expert=spec.d_expert,
        router=router,
        n_shared_experts=spec.n_shared_experts,
    )


def shrink(node: dict, size: Size) -> None:
    """Expert counts shrink only to `size.max_experts`; top-k, routing and balancing are kept."""
    if size.max_experts is not None:
        router = node["router"]
        groups, chosen = router.get("n_groups", 1), router.get("topk_groups", 1)
        # A multiple of n_groups whose topk_groups chosen groups hold more than top_k experts, so the
        # router still picks; never more than the full size, which already satisfies every rule.
        per_group = max(math.ceil(size.max_experts / groups), TOY_EXPERTS_PER_GROUP,
                        math.ceil((node["top_k"] + 1) / chosen))
        node["n_experts"] = min(node["n_experts"], groups * per_group)
    node["d_expert"] = size.width(node["d_expert"], toy=TOY_EXPERT_HIDDEN)


def describe(ffn: MoE, seq_len: int) -> Count:
    """A token uses top_k / n_experts of the routed experts; the router and shared experts in full."""
    params, experts = numel(ffn), numel(ffn.experts)
    # Active routed params = experts * K / E exactly, since every expert has the same size.
    active_experts = experts // ffn.router.n_experts * ffn.router.top_k
    return Count("moe", params, params - experts + active_experts,
                 2 * (matrix_numel(ffn) - experts + active_experts))


register(Kind("ffn", MoESpec, build=build, shrink=shrink, describe=describe,
              hf_formats=("deepseek_v3", "glm4_moe", "qwen3_moe", "olmoe", "mixtral")))
