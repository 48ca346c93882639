"""exp3: expert granularity at fixed active width and fixed sparsity, MLA + GLM-4.5 MoE.

(experts, top-k) in (4, 1), (8, 2), (16, 4), (32, 8): a quarter of the routed experts is active in every
row, and every token passes through its top_k routed experts plus the one shared expert, each of
hidden width ACTIVE_FFN_HIDDEN / (top_k + 1) (at the CPU scale 512, 341, 205, 114: 1,024 active hidden
units per token, up to rounding). So the active compute and the total parameters stay nearly equal,
and only the granularity changes: more, narrower experts, more of them per token. (8, 2) is exp1's
`attention_moe`. Top-1 routes with norm_topk_prob=false: one weight renormalised by itself is a
constant 1, and the router would get no gradient from the loss.
"""

from experiments.base import BUDGET, Experiment, Hypothesis, Variant
from zoo.presets.core import ACTIVE_FFN_HIDDEN

GRANULARITY = ((4, 1), (8, 2), (16, 4), (32, 8))  # (n_experts, top_k): top_k / n_experts = 1/4 throughout
N_SHARED = 1  # the GLM-4.5 MoE's shared expert, as wide as a routed one
FINE_GRAINED = "DeepSeekMoE (Dai et al. 2024); Krajewski et al. 2024, scaling laws for fine-grained MoE"


def _variant(n_experts: int, top_k: int) -> Variant:
    changes = {"model.ffn.n_experts": n_experts, "model.ffn.top_k": top_k,
               "model.ffn.d_expert": ACTIVE_FFN_HIDDEN // (top_k + N_SHARED)}
    if top_k == 1:
        changes["model.ffn.router.norm_topk_prob"] = False
    return Variant(changes=changes)


EXPERIMENT = Experiment(
    notes=__doc__,
    name="exp3",
    title="expert granularity at equal active width and sparsity, MLA + GLM-4.5 MoE",
    hypothesis="at equal active FFN width and sparsity, more and finer-grained experts lower the validation loss",
    base="exp1_attention_moe",
    variants={f"e{e}_k{k}": _variant(e, k) for e, k in GRANULARITY},
    budget=BUDGET,
    metrics=("total_params", "active_params", "val_loss", "val_ppl", "val_acc", "max_vio", "max_vio_global",
             "tokens_to_target", "train_s", "tokens_per_s"),
    seeds=(0, 1, 2),
    sweep="model.ffn.top_k",
    reference_variant="e8_k2",
    hypotheses=(
        Hypothesis("16 experts, top-4 beat 8 experts, top-2", "e16_k4", "e8_k2", source=FINE_GRAINED),
        Hypothesis("32 experts, top-8 beat 8 experts, top-2", "e32_k8", "e8_k2", source=FINE_GRAINED),
        Hypothesis("8 experts, top-2 beat 4 experts, top-1", "e8_k2", "e4_k1", source=FINE_GRAINED),
    ),
)
