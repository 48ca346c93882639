"""exp1: which matters more at this scale, the attention (MHA vs MLA) or the FFN (dense vs MoE)?

The five registered exp1 presets (zoo/presets/exp1.py), unchanged apart from the CPU scale every
variant shares: equal width and depth, and equal active FFN width per token (dense hidden = the
MoE's top-2 experts = GLM-4.5's 2 routed + 1 shared expert). Hypotheses, from the presets'
docstrings: at equal active compute the MoEs beat the dense MLP; MLA matches MHA; the GLM-4.5 MoE
(sigmoid routing, aux-loss-free bias, shared expert) beats the softmax MoE with a balance loss.
"""

from dataclasses import replace

from experiments.base import SMOKE_BUDGET, Budget, Experiment, Variant

EXPERIMENT = Experiment(
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
    budget=Budget(steps=150, micro_batch_size=8, warmup_steps=15, eval_every=30, log_every=5, val_blocks=128,
                  hellaswag_limit=1000),
    metrics=("total_params", "active_params", "val_loss", "val_ppl", "val_acc", "hellaswag_acc_norm", "max_vio",
             "tokens_per_s"),
    seeds=(0, 1, 2),
    smoke_budget=replace(SMOKE_BUDGET, hellaswag_limit=8),
)
