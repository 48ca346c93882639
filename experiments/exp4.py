"""exp4: how to balance the experts. Softmax router + balance loss vs sigmoid router + aux-loss-free
bias vs no balancing, on MLA + GLM-4.5 MoE (exp1's `attention_moe`), equal active parameters.

- softmax_balance: the seed project's router (softmax top-k, Switch balance loss 0.01, gates not
  renormalised); the scoring function changes together with the balancing method.
- sigmoid_bias: DeepSeek-V3's auxiliary-loss-free balancing alone (bias rate 1e-3, no
  sequence-wise auxiliary loss).
- sigmoid_none: the same sigmoid router with no balancing at all (bias frozen at 0, no aux loss).

Hypothesis: both balancing methods keep MaxVio far below no balancing; the bias does so without
the balance loss's cost in validation loss.
"""

from dataclasses import replace

from experiments.base import Experiment, Variant
from experiments.exp1 import EXPERIMENT as EXP1
from zoo.specs import SoftmaxTopKRouterSpec

ROUTER = "model.ffn.router"

EXPERIMENT = Experiment(
    name="exp4",
    title="expert balancing: softmax + balance loss vs sigmoid + aux-loss-free bias vs none",
    hypothesis="balancing keeps MaxVio low; the aux-loss-free bias costs no validation loss",
    base="exp1_attention_moe",
    variants={
        "softmax_balance": Variant(changes={ROUTER: SoftmaxTopKRouterSpec(balance_loss_weight=0.01)}),
        "sigmoid_bias": Variant(changes={f"{ROUTER}.seq_aux_loss_weight": 0.0}),
        "sigmoid_none": Variant(changes={f"{ROUTER}.seq_aux_loss_weight": 0.0, f"{ROUTER}.bias_update_rate": 0.0}),
    },
    budget=replace(EXP1.budget, hellaswag_limit=0),  # the same budget as exp1, no HellaSwag
    metrics=("total_params", "active_params", "val_loss", "val_ppl", "val_acc", "max_vio", "max_vio_mean",
             "tokens_per_s"),
    seeds=(0, 1, 2),
    reference_variant="sigmoid_bias",
)
