"""exp3: MLA + GLM-4.5 MoE over experts {4, 8, 16} x top_k {1, 2, 4} x two Muon learning rates.

Active parameters are held (nearly) fixed: every token passes through top_k routed experts plus the
one shared expert, so each expert's hidden width is ACTIVE_FFN_HIDDEN / (top_k + 1) (3072 at the
presets' scale, 1024 at the CPU scale: top_k 1 -> 512, 2 -> 341, 4 -> 205 per expert). Total
parameters then grow with n_experts / (top_k + 1). With 4 experts and top_k 4 every expert is active
for every token (a dense layer with router-weighted branches).

Hypothesis: at fixed active width, more and finer experts (higher n_experts, higher top_k) lower the
validation loss, as in fine-grained MoE scaling results; at this tiny budget the effect may be small.
"""

from dataclasses import replace

from experiments.base import Experiment, Variant
from experiments.exp1 import EXPERIMENT as EXP1
from zoo.presets.core import ACTIVE_FFN_HIDDEN

N_EXPERTS = (4, 8, 16)
TOP_K = (1, 2, 4)
# exp2's best (0.02, the project default) and the value one halving below it (0.01, within 0.012 of it):
# both in the flat region of exp2's curve, where 0.04 is already 0.088 worse.
MUON_LRS = (0.01, 0.02)
N_SHARED = 1  # the GLM-4.5 MoE's shared expert, as wide as a routed one


def _variant(n_experts: int, top_k: int, lr: float) -> Variant:
    changes = {"model.ffn.n_experts": n_experts, "model.ffn.top_k": top_k,
               "model.ffn.d_expert": ACTIVE_FFN_HIDDEN // (top_k + N_SHARED), "train.muon_lr": lr}
    if top_k == 1:
        # One weight normalised by itself is a constant 1: the router would get no LM-loss gradient.
        changes["model.ffn.router.norm_topk_prob"] = False
    return Variant(changes=changes)


EXPERIMENT = Experiment(
    name="exp3",
    title="expert count x top-k x Muon LR, MLA + GLM-4.5 MoE at equal active width",
    hypothesis="at equal active FFN width, more and finer-grained experts lower the validation loss",
    base="exp1_attention_moe",
    variants={f"e{e}_k{k}_lr{lr:g}": _variant(e, k, lr) for e in N_EXPERTS for k in TOP_K for lr in MUON_LRS},
    budget=replace(EXP1.budget, hellaswag_limit=0),  # the same budget as exp1, no HellaSwag
    metrics=("total_params", "active_params", "val_loss", "val_ppl", "val_acc", "max_vio", "max_vio_mean",
             "tokens_per_s"),
    seeds=(0,),
    sweep="train.muon_lr",
    groups=("model.ffn.n_experts", "model.ffn.top_k"),
)
