"""exp2: the Muon learning rate of MLA + dense MLP (exp1's `attention_mlp`).

Hypothesis: the project default (train.muon_lr 0.02) lies near the minimum of final validation loss
at this scale and budget. Learning rates spaced by factors of 2 (log-spaced) around it; AdamW's rate
for embeddings, head, norms and biases stays at 3e-3.

MUON_LRS spans 0.00125-0.08, centred on 0.01. Before 7aa0e47, DeepSpeed's ZeRO-1 clip divided every
orthogonalised Muon update by its norm (~96), so the first sweep ran 0.005-5.12 and found its best at
1.28-2.56, which is 0.013-0.027 in post-fix units.
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
