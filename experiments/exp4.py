"""exp4: how to balance the experts, with the scoring function and the balancing method separated, on
MLA + GLM-4.5 MoE (exp1's `attention_moe`), equal active parameters.

- softmax_balance: softmax top-k router + the Switch balance loss, weight 0.01, over each micro-batch
  (gates not renormalised, as the seed project's router).
- sigmoid_balance: the sigmoid router + the same loss (E * sum of f_e * P_e), weight 0.01, over each
  sequence (DeepSeek-V3's sequence-wise form, Wang et al.'s baseline), no bias.
- sigmoid_bias: DeepSeek-V3's auxiliary-loss-free bias alone, update rate u = 1e-3, no loss.
- sigmoid_bias_fast: the same at u = 1e-2.
- sigmoid_none: the sigmoid router with no balancing at all (bias frozen at 0, no loss).

MaxVio (max load / mean load - 1) is read per training batch (the accumulation window) and globally over
the whole validation set at every evaluation (Wang et al.'s MaxVio_global). Paired differences are
against sigmoid_balance, the balance-loss baseline of the auxiliary-loss-free paper.

The four sigmoid variants differ only in how they balance. softmax_balance against sigmoid_balance
compares the two routers as their models ship them, so more than the scoring function differs: the
sigmoid router renormalises its top-k weights and scales them by 2.5 (DeepSeek-V3, GLM-4.5), the
softmax one keeps its top-k probabilities as they are, and its loss averages over the micro-batch
rather than over each sequence.
"""

from experiments.base import BUDGET, Experiment, Hypothesis, Variant
from zoo.specs import SoftmaxTopKRouterSpec

ROUTER = "model.ffn.router"
LOSS_FREE = "Wang et al. 2024, auxiliary-loss-free load balancing (arXiv 2408.15664)"

EXPERIMENT = Experiment(
    notes=__doc__,
    name="exp4",
    title="expert balancing: scoring function x balancing method, MLA + GLM-4.5 MoE",
    hypothesis="the aux-loss-free bias reaches a lower MaxVio than a balance loss at equal or better loss",
    base="exp1_attention_moe",
    variants={
        "softmax_balance": Variant(changes={ROUTER: SoftmaxTopKRouterSpec(balance_loss_weight=0.01)}),
        "sigmoid_balance": Variant(changes={f"{ROUTER}.seq_aux_loss_weight": 0.01, f"{ROUTER}.bias_update_rate": 0.0}),
        "sigmoid_bias": Variant(changes={f"{ROUTER}.seq_aux_loss_weight": 0.0}),
        "sigmoid_bias_fast": Variant(changes={f"{ROUTER}.seq_aux_loss_weight": 0.0, f"{ROUTER}.bias_update_rate": 1e-2}),
        "sigmoid_none": Variant(changes={f"{ROUTER}.seq_aux_loss_weight": 0.0, f"{ROUTER}.bias_update_rate": 0.0}),
    },
    budget=BUDGET,
    metrics=("total_params", "active_params", "val_loss", "val_ppl", "val_acc", "max_vio", "max_vio_mean",
             "max_vio_global", "tokens_to_target", "train_s", "tokens_per_s"),
    seeds=(0, 1, 2),
    reference_variant="sigmoid_balance",
    hypotheses=(
        Hypothesis("the bias (u = 1e-3) reaches a lower global MaxVio than the balance loss", "sigmoid_bias",
                   "sigmoid_balance", column="max_vio_global", source=LOSS_FREE),
        Hypothesis("the bias (u = 1e-3) reaches a lower validation loss than the balance loss (the paper claims "
                   "equal or better: inconclusive is consistent with it)", "sigmoid_bias", "sigmoid_balance",
                   source=LOSS_FREE),
        Hypothesis("a faster bias (u = 1e-2) reaches a lower global MaxVio than u = 1e-3", "sigmoid_bias_fast",
                   "sigmoid_bias", column="max_vio_global", source=LOSS_FREE + ", which compares update rates"),
        Hypothesis("the bias balances: a lower global MaxVio than no balancing", "sigmoid_bias", "sigmoid_none",
                   column="max_vio_global", source=LOSS_FREE),
        Hypothesis("the balance loss balances: a lower global MaxVio than no balancing", "sigmoid_balance",
                   "sigmoid_none", column="max_vio_global", source="Switch Transformer (Fedus et al. 2021)"),
        Hypothesis("the sigmoid router (renormalised, scaled top-k) beats the softmax router, both with the "
                   "balance loss at 0.01", "sigmoid_balance", "softmax_balance",
                   source="DeepSeek-V3 (2024) and Wang et al. 2024 route with sigmoid scores"),
    ),
)
