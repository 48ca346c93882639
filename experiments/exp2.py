"""exp2: the Muon learning rate of MLA + dense MLP (exp1's `attention_mlp`).

Hypothesis: the project default (train.muon_lr 0.02) lies near the minimum of final validation loss
at this scale and budget. Learning rates spaced by factors of 2 (log-spaced) around it; AdamW's rate
for embeddings, head, norms and biases stays at 3e-3.

MUON_LRS spans 0.00125-0.08 in factors of 2, centred on 0.01, so the default sits inside the grid with
room on both sides for the minimum to show.
"""

from dataclasses import replace

from experiments.base import Experiment, Variant
from experiments.exp1 import EXPERIMENT as EXP1

MUON_LRS = (0.00125, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)

EXPERIMENT = Experiment(
    name="exp2",
    title="Muon learning-rate sweep, MLA + dense MLP",
    hypothesis="the default Muon LR 0.02 is near the best final validation loss at this scale",
    base="exp1_attention_mlp",
    variants={f"lr_{lr:g}": Variant(changes={"train.muon_lr": lr}) for lr in MUON_LRS},
    budget=replace(EXP1.budget, hellaswag_limit=0),  # the same budget as exp1, no HellaSwag
    seeds=(0,),
    sweep="train.muon_lr",
)
