"""exp1: which matters more at this scale, the attention (MHA vs MLA) or the FFN (dense vs MoE)?

The five registered exp1 presets (zoo/presets/exp1.py), unchanged apart from the CPU scale every
variant shares: equal width and depth, and equal active FFN width per token (dense hidden = the
softmax MoE's top-2 experts = GLM-4.5's 2 routed + 1 shared expert). Paired differences and the
tokens-to-target are against the dense MHA model (`mlp`), the one every MoE claim is about.
"""

from experiments.base import BUDGET, Experiment, Hypothesis, Variant

MOE_BEATS_DENSE = "Switch Transformer (Fedus et al. 2021); OLMoE (Muennighoff et al. 2024)"

EXPERIMENT = Experiment(
    notes=__doc__,
    name="exp1",
    title="attention (MHA / MLA) x FFN (dense / softmax MoE / GLM-4.5 MoE)",
    hypothesis="at equal active FFN width the MoEs beat the dense MLP, and MLA matches MHA",
    base="exp1_baseline",
    variants={
        "baseline": Variant(preset="exp1_baseline"),  # MHA + softmax top-2 MoE (balance loss 0.01)
        "mlp": Variant(preset="exp1_mlp"),  # MHA + dense SwiGLU
        "attention_mlp": Variant(preset="exp1_attention_mlp"),  # MLA + dense SwiGLU
        "moe": Variant(preset="exp1_moe"),  # MHA + GLM-4.5 MoE
        "attention_moe": Variant(preset="exp1_attention_moe"),  # MLA + GLM-4.5 MoE
    },
    budget=BUDGET,
    metrics=("total_params", "active_params", "val_loss", "val_ppl", "val_acc", "max_vio", "max_vio_global",
             "tokens_to_target", "train_s", "tokens_per_s"),
    seeds=(0, 1, 2),
    reference_variant="mlp",
    hypotheses=(
        Hypothesis("a softmax top-2 MoE beats the dense MLP at equal active parameters", "baseline", "mlp",
                   source=MOE_BEATS_DENSE),
        Hypothesis("the GLM-4.5 MoE beats the dense MLP at equal active parameters", "moe", "mlp",
                   source=MOE_BEATS_DENSE),
        Hypothesis("with MLA too, the GLM-4.5 MoE beats the dense MLP", "attention_moe", "attention_mlp",
                   source=MOE_BEATS_DENSE),
        Hypothesis("the GLM-4.5 MoE (sigmoid routing, bias balancing, shared expert) beats the softmax MoE",
                   "moe", "baseline", source="DeepSeek-V3 (2024), GLM-4.5 (2025): the designs they chose"),
        Hypothesis("MLA beats MHA (dense FFN)", "attention_mlp", "mlp",
                   source="DeepSeek-V2 (2024): MLA outperforms MHA at a fraction of the KV cache"),
    ),
)
