"""exp2: the Muon learning rate of MLA + dense MLP (exp1's `attention_mlp`).

Hypothesis: the project default (train.muon_lr 0.02) lies near the minimum of final validation loss
at this scale and budget. Learning rates spaced by factors of 2 (log-spaced) around it; AdamW's rate
for embeddings, head, norms and biases stays at 3e-3.

MUON_LRS is the grid of the committed results (experiments/results/exp2), measured before 7aa0e47:
the sweep first ran 0.005-0.08 and was extended up to 5.12 because the loss kept falling. That was
the bug 7aa0e47 fixed: DeepSpeed's ZeRO-1 divided every Muon update by the norm of the orthogonalised
update (~96 for this model), so each value here was in effect ~96x smaller, and the pre-fix best,
1.28-2.56, is about 0.013-0.027 after the fix. Re-centre the grid near 0.01 (e.g. 0.0025-0.04) when
rerunning exp2.
"""

from dataclasses import replace

from experiments.base import Experiment, Variant
from experiments.exp1 import EXPERIMENT as EXP1

MUON_LRS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)

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
