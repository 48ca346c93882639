"""exp3: expert granularity at fixed active width, total width and sparsity, MLA + GLM-4.5 MoE.

(experts, top-k) in (8, 2), (16, 4), (32, 8), DeepSeekMoE's fine-grained segmentation: each step splits
every routed expert in two and routes to twice as many, and the shared expert keeps its width (one
third of the active FFN width, as GLM-4.5's MoE here) by counting as 1, 2, 4 routed experts. So the
active width (ACTIVE_FFN_HIDDEN: 1,024 hidden units per token at the CPU scale), the total expert
width and the sparsity (a quarter of the routed experts active) stay equal up to rounding, and only
the granularity changes. (8, 2) is exp1's `attention_moe`.

Beside the series, top-1 routing at the same active width: 4 experts of half the active width, top-1,
plus one shared expert as wide, with norm_topk_prob=false (one weight renormalised by itself is a constant
1, and the router would get no gradient from the loss). It is not a point of the series: its shared
expert is half the active width rather than a third, it has 13% fewer parameters in all, and its one
routed weight is 2.5 x its sigmoid score where the series' weights sum to 2.5. Its hypothesis compares
top-1 with top-2 routing as each would be set up, not the routing alone.
"""

from experiments.base import BUDGET, Experiment, Hypothesis, Variant
from zoo.presets.core import ACTIVE_FFN_HIDDEN

SHARED = ACTIVE_FFN_HIDDEN // 3  # the shared expert's width, as in the GLM-4.5 MoE preset
SERIES = ((8, 2), (16, 4), (32, 8))  # (n_experts, top_k): top_k / n_experts = 1/4 throughout
FINE_GRAINED = "DeepSeekMoE (Dai et al. 2024); Krajewski et al. 2024, scaling laws for fine-grained MoE"


def _fine(n_experts: int, top_k: int) -> Variant:
    d_expert = (ACTIVE_FFN_HIDDEN - SHARED) // top_k
    return Variant(changes={"model.ffn.n_experts": n_experts, "model.ffn.top_k": top_k,
                            "model.ffn.d_expert": d_expert, "model.ffn.n_shared_experts": SHARED // d_expert})


def _top1() -> Variant:
    return Variant(changes={"model.ffn.n_experts": 4, "model.ffn.top_k": 1, "model.ffn.d_expert": ACTIVE_FFN_HIDDEN // 2,
                            "model.ffn.n_shared_experts": 1, "model.ffn.router.norm_topk_prob": False})


EXPERIMENT = Experiment(
    notes=__doc__,
    name="exp3",
    title="expert granularity at equal active and total width, MLA + GLM-4.5 MoE",
    hypothesis="at equal active and total FFN width, more and finer-grained experts lower the validation loss",
    base="exp1_attention_moe",
    variants={"e4_k1": _top1(), **{f"e{e}_k{k}": _fine(e, k) for e, k in SERIES}},
    budget=BUDGET,
    metrics=("total_params", "active_params", "val_loss", "val_ppl", "val_acc", "max_vio", "max_vio_global",
             "tokens_to_target", "train_s", "tokens_per_s"),
    seeds=(0, 1, 2),
    sweep="model.ffn.top_k",
    reference_variant="e8_k2",
    hypotheses=(
        Hypothesis("16 experts, top-4 beat 8 experts, top-2", "e16_k4", "e8_k2", source=FINE_GRAINED),
        Hypothesis("32 experts, top-8 beat 8 experts, top-2", "e32_k8", "e8_k2", source=FINE_GRAINED),
        Hypothesis("8 experts, top-2 beat 4 experts, top-1, at equal active width", "e8_k2", "e4_k1",
                   source="Switch Transformer (Fedus et al. 2021) found top-1 competitive; GShard routes top-2"),
    ),
)
