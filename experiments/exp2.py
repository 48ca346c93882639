"""exp2: Muon against AdamW, each at its own best learning rate, on MLA + dense MLP (exp1's `attention_mlp`).

Muon rows sweep train.muon_lr (the matrices' rate; AdamW keeps the embeddings, head, norms and biases
at 3e-3); AdamW rows put every parameter on AdamW (`train.optimizer=adamw`) and sweep train.adam_lr.
Both grids are spaced by factors of about 2-3 around each optimizer's default, so that an optimum
inside the grid shows as a minimum. The Muon-vs-AdamW claim compares each optimizer's best rate (the
lowest mean final loss over seeds); the tokens-to-target are timed to AdamW at its default 3e-3.
Choosing each best rate on the seeds that then test it favours both optimizers' luck alike, and the
grid with more points (Muon's four against AdamW's three) a little more: a narrow win is weaker
evidence than its interval says.
"""

from experiments.base import BUDGET, OWN_LR, Experiment, Hypothesis, Variant

MUON_LRS = (0.005, 0.01, 0.02, 0.04)
ADAMW_LRS = (0.001, 0.003, 0.01)

EXPERIMENT = Experiment(
    notes=__doc__,
    name="exp2",
    title="Muon learning-rate sweep against AdamW's, MLA + dense MLP",
    hypothesis="Muon at its best rate reaches a lower validation loss than AdamW at its best rate",
    base="exp1_attention_mlp",
    variants={
        **{f"muon_lr{lr:g}": Variant(changes={"train.muon_lr": lr}) for lr in MUON_LRS},
        **{f"adamw_lr{lr:g}": Variant(changes={"train.optimizer": "adamw", "train.adam_lr": lr}) for lr in ADAMW_LRS},
    },
    budget=BUDGET,
    metrics=("total_params", "active_params", "val_loss", "val_ppl", "val_acc", "tokens_to_target", "train_s",
             "tokens_per_s"),
    seeds=(0, 1, 2),
    reference_variant="adamw_lr0.003",
    hypotheses=(
        Hypothesis("Muon at its best rate beats AdamW at its best rate, at equal tokens", "muon_lr*", "adamw_lr*",
                   source="Jordan et al. 2024 (Muon); Liu et al. 2025 (Muon is scalable for LLM training)"),
    ),
    sweep=OWN_LR,
    groups=("train.optimizer",),
)
