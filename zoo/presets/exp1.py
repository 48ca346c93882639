"""exp1: which matters more at this scale, the attention (MHA vs MLA) or the FFN (dense vs MoE)?

One base and four variants, each a diff from the base, at equal width (d_model 384) and depth (6
layers) and equal active FFN width (3072 hidden units per token).
"""

from zoo.overrides import with_changes
from zoo.presets.core import ACTIVE_FFN_HIDDEN, baseline, deepseek_mla, glm4_moe
from zoo.presets.registry import preset
from zoo.specs import MLPSpec, RunSpec

MLA = {"model.attention": deepseek_mla()}
DENSE = {"model.ffn": MLPSpec(d_hidden=ACTIVE_FFN_HIDDEN)}
GLM4_MOE = {"model.ffn": glm4_moe(), "model.first_k_dense": 1, "model.dense_ffn": MLPSpec(d_hidden=ACTIVE_FFN_HIDDEN)}


@preset
def exp1_baseline() -> RunSpec:
    """exp1 base: standard attention + softmax-routed MoE (the seed project's `baseline`)."""
    return baseline()


@preset
def exp1_mlp() -> RunSpec:
    """exp1: standard attention + dense SwiGLU as wide as the MoE's active experts.

    Hypothesis: at equal active compute the MoE's extra parameters lower validation loss, so this
    variant ends above exp1_baseline.
    """
    return with_changes(exp1_baseline(), DENSE)


@preset
def exp1_attention_mlp() -> RunSpec:
    """exp1: MLA + dense SwiGLU. Hypothesis: MLA matches MHA's loss while caching far fewer bytes per token."""
    return with_changes(exp1_baseline(), {**MLA, **DENSE})


@preset
def exp1_moe() -> RunSpec:
    """exp1: standard attention + GLM-4.5 MoE. Hypothesis: sigmoid routing with aux-loss-free balancing
    and a shared expert beats the softmax router with a balance loss at equal active width."""
    return with_changes(exp1_baseline(), GLM4_MOE)


@preset
def exp1_attention_moe() -> RunSpec:
    """exp1: MLA + GLM-4.5 MoE (the architecture of `deepseek_glm4`). Hypothesis: the two gains add up."""
    return with_changes(exp1_baseline(), {**MLA, **GLM4_MOE})
