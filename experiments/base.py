"""What an experiment is: a base preset, named variants as diffs from it, one scale, a budget, seeds.

    spec = experiment.spec("mlp", seed=1)            # the full RunSpec a run trains
    experiment.variant_spec("mlp")                   # the variant at its preset's own (seed) scale
    preset, sets = experiment.command_args("mlp", 1) # what `training/run.py --preset P --set ...` gets

A variant is a registered preset (`preset=`), a diff from the base (`changes=`), or both (a preset
with changes). Every variant of an experiment goes through the same `Scale` (one documented diff
that shrinks the architecture for a CPU) and the same `Budget`, so the only differences between the
runs of an experiment are the variant's own diff and the seed.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from zoo import presets
from zoo.kinds import shrink
from zoo.overrides import apply_sets, diff, with_changes
from zoo.specs import RunSpec

# The Linux kernel's English documentation: 4,267 documents, 27.3 M characters, about 8-9 M tokens at the
# CPU scale's 2,048-piece vocabulary, so a run of 3 M tokens trains on less than one epoch of its 95%.
CORPUS = "../shared/data/linux_docs.parquet"  # relative to the repository root, where runs start
HELLASWAG = "../shared/data/hellaswag_val.jsonl"
# A sweep over each optimizer's own peak learning rate: train.muon_lr under Muon, train.adam_lr under AdamW.
OWN_LR = "lr"


@dataclass(frozen=True)
class Scale:
    """One diff applied to every variant alike: smaller width, depth, context and vocabulary.

    Widths that follow d_model (the dense FFN, the experts' hidden size) shrink by `width_factor`,
    so each architecture keeps its ratios: equal active FFN width across dense and MoE variants stays
    equal up to rounding (3 x 341 = 1023 against 1024). MLA sets its ranks and head dims per head
    rather than from d_model; they shrink by `mla_factor`. Expert counts, top-k, routing and
    balancing settings are kept as they are.
    """

    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    vocab_size: int
    width_factor: float
    mla_factor: float

    max_experts: ClassVar[None] = None  # expert counts are kept

    def __call__(self, spec: RunSpec) -> RunSpec:
        data = spec.model_dump(mode="json")
        model = data["model"]
        model.update(d_model=self.d_model, n_layers=self.n_layers, max_seq_len=self.seq_len,
                     vocab_size=self.vocab_size)
        model["first_k_dense"] = min(model["first_k_dense"], self.n_layers - 1)
        shrink(spec.model, model, self)
        data["data"]["seq_len"] = self.seq_len
        return RunSpec.model_validate(data)

    # What each sort of dimension becomes (zoo.kinds.Size); each kind's shrink rule says which are which.

    def kv_heads(self, n_heads: int, n_kv_heads: int) -> int:
        # Keep the query-to-kv-head ratio (GQA stays GQA, MQA stays MQA).
        return max(1, n_kv_heads * self.n_heads // n_heads)

    def width(self, value: int, *, toy: int) -> int:
        return max(1, round(value * self.width_factor))

    def per_head(self, value: int, *, toy: int, even: bool = False) -> int:
        scaled = max(2 if even else 1, round(value * self.mla_factor))
        return scaled + scaled % 2 if even else scaled

    def context(self, value: int) -> int:
        return value


# d_model 384 -> 128 (x 1/3), 6 -> 4 layers, 8 -> 4 heads (head_dim 48 -> 32), context 512 -> 256
# (HellaSwag continuations reach ~130 tokens of this vocabulary; the context must hold them), vocabulary
# 4096 -> 2048; FFN and expert widths x 1/3 (3072 active hidden units -> 1024); MLA ranks and head dims
# x 1/2 (q_lora 64, kv_lora 32, nope/rope 16/16, v 32: per head as wide as MHA's 32).
CPU = Scale(d_model=128, n_layers=4, n_heads=4, seq_len=256, vocab_size=2048, width_factor=1 / 3, mla_factor=1 / 2)
# The smoke scale: the same diffs, small enough that a step takes milliseconds.
SMOKE = Scale(d_model=32, n_layers=2, n_heads=2, seq_len=128, vocab_size=512, width_factor=1 / 12, mla_factor=1 / 8)


@dataclass(frozen=True)
class Budget:
    """How long and on what every run of an experiment trains, and how it is measured."""

    steps: int
    micro_batch_size: int
    warmup_steps: int
    eval_every: int
    log_every: int
    val_blocks: int
    precision: str = "auto"
    source: str = CORPUS
    max_documents: int | None = None
    tokenizer_sample_chars: int = 5_000_000
    hellaswag_limit: int = 0  # > 0: HellaSwag on the final model only (see runner.final_only_evals)

    def changes(self, *, hellaswag: bool = True) -> dict[str, Any]:
        """Field path -> value; `hellaswag=False` leaves HellaSwag off (the first phase of a run)."""
        limit = self.hellaswag_limit if hellaswag else 0
        return {
            "train.steps": self.steps, "train.micro_batch_size": self.micro_batch_size, "train.grad_accum": 1,
            "train.warmup_steps": self.warmup_steps, "train.eval_every": self.eval_every,
            # A checkpoint at every evaluation: a run killed outright (kill -9, power) loses at most that.
            "train.log_every": self.log_every, "train.ckpt_every": self.eval_every, "train.keep_last": 1,
            "train.precision": self.precision, "eval.val_blocks": self.val_blocks,
            "data.source": self.source, "data.max_documents": self.max_documents,
            "data.tokenizer_sample_chars": self.tokenizer_sample_chars,
            "eval.hellaswag_limit": limit, "eval.hellaswag_path": HELLASWAG if limit else None,
        }

    def tokens(self, seq_len: int) -> int:
        return self.steps * self.micro_batch_size * seq_len


# Every experiment's budget: 1,470 steps x 8 x 256 = 3,010,560 training tokens per run (1.4 tokens per active
# parameter, about 0.4 epoch of the corpus' training documents); 21 evaluations of the
# same 128 validation blocks, one every 70 steps, for curves fine enough to read the tokens a run needs to
# reach a given loss.
BUDGET = Budget(steps=1470, micro_batch_size=8, warmup_steps=50, eval_every=70, log_every=10, val_blocks=128)

# A few optimizer steps on a few hundred paragraphs: every variant builds, trains, evaluates, logs.
SMOKE_BUDGET = Budget(steps=3, micro_batch_size=2, warmup_steps=1, eval_every=2, log_every=1, val_blocks=4,
                      precision="fp32", max_documents=1500, tokenizer_sample_chars=100_000)


@dataclass(frozen=True)
class Variant:
    """A registered preset (default: the experiment's base) with optional changes (field path -> value)."""

    preset: str | None = None
    changes: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # for plots; defaults to the variant's name


@dataclass(frozen=True)
class Hypothesis:
    """A prediction that one variant's `column` ends below (`lower`) or above a reference variant's, judged on
    the paired difference over seeds and its 95% t-interval (experiments/results.py `verdict`)."""

    claim: str
    variant: str  # a variant's name, or a pattern ("muon_*"): the matching variant of lowest mean val loss
    reference: str  # the same
    column: str = "val_loss"
    lower: bool = True
    source: str = ""  # where the prediction comes from (a paper), or "" for the zoo's own


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    hypothesis: str
    base: str  # a registered preset
    variants: dict[str, Variant]
    budget: Budget
    seeds: tuple[int, ...]
    # Columns of the table (experiments/results.py COLUMNS), read from the trainer's TensorBoard scalars.
    metrics: tuple[str, ...] = ("total_params", "active_params", "val_loss", "val_ppl", "val_acc", "tokens_per_s")
    scale: Scale = CPU
    sweep: str | None = None  # a field path plotted on the x axis of loss-vs-value plots (e.g. train.muon_lr)
    groups: tuple[str, ...] = ()  # field paths that group a sweep's variants into lines (exp3: experts, top_k)
    smoke_budget: Budget = SMOKE_BUDGET
    smoke_scale: Scale = SMOKE
    reference_variant: str | None = None  # the table's paired differences are against it (default: the base)
    hypotheses: tuple[Hypothesis, ...] = ()
    notes: str = ""  # what the README says about the design, beside the generated numbers

    def __post_init__(self):
        if not self.variants or not self.seeds:
            raise ValueError(f"{self.name}: an experiment needs at least one variant and one seed")
        for h in self.hypotheses:
            if not all(fnmatch.filter(self.variants, name) for name in (h.variant, h.reference)):
                raise ValueError(f"{self.name}: hypothesis {h.claim!r} names a variant the experiment lacks")

    @property
    def reference(self) -> str:
        if self.reference_variant:
            return self.reference_variant
        base = self.base_spec()
        return next((n for n in self.variants if not diff(base, self.variant_spec(n))), next(iter(self.variants)))

    # ------------------------------------------------------------------ specs

    def base_spec(self) -> RunSpec:
        return presets.get(self.base)

    def variant_spec(self, name: str) -> RunSpec:
        """The variant at the registered presets' own scale: what `--show` diffs against the base."""
        variant = self.variants[name]
        return with_changes(presets.get(variant.preset or self.base), variant.changes)

    def spec(self, name: str, seed: int, *, smoke: bool = False, hellaswag: bool = True) -> RunSpec:
        """The run spec of one variant and seed: variant -> scale -> budget -> seed."""
        scale, budget = (self.smoke_scale, self.smoke_budget) if smoke else (self.scale, self.budget)
        changes = {**budget.changes(hellaswag=hellaswag), "train.seed": seed}
        return with_changes(scale(self.variant_spec(name)), changes)

    def active_budget(self, smoke: bool) -> Budget:
        return self.smoke_budget if smoke else self.budget

    def seeds_for(self, smoke: bool) -> tuple[int, ...]:
        return self.seeds[:1] if smoke else self.seeds

    def command_args(self, name: str, seed: int, *, smoke: bool = False,
                     hellaswag: bool = True) -> tuple[str, list[str]]:
        """(preset, ["path=value", ...]): the trainer's --preset and --set arguments for this run."""
        preset = self.variants[name].preset or self.base
        target = self.spec(name, seed, smoke=smoke, hellaswag=hellaswag)
        sets = spec_sets(presets.get(preset), target)
        if apply_sets(presets.get(preset), sets) != target:
            raise AssertionError(f"{self.name}/{name}: the --set list does not rebuild the run spec")
        return preset, sets

    def sweep_value(self, name: str, path: str | None = None) -> Any:
        from zoo.overrides import flatten

        flat, path = flatten(self.variant_spec(name)), path or self.sweep
        if path == OWN_LR:
            return flat["train.muon_lr" if flat["train.optimizer"] == "muon" else "train.adam_lr"]
        return flat[path]

    # ------------------------------------------------------------------ printing

    def show(self, smoke: bool = False) -> str:
        """Each variant as its diff from the base, then the scale and budget every variant shares."""
        base = self.base_spec()
        lines = [f"{self.name}: {self.title}", f"hypothesis: {self.hypothesis}", f"base preset: {self.base}", ""]
        for name, variant in self.variants.items():
            source = f"preset {variant.preset}" if variant.preset else f"{self.base} + changes"
            changes = diff(base, self.variant_spec(name))
            lines.append(f"{name}  ({source}; {len(changes)} field(s) differ from {self.base})")
            lines += [f"    {path}: {_short(a)} -> {_short(b)}" for path, a, b in changes] or ["    (the base itself)"]
        scale = self.smoke_scale if smoke else self.scale
        budget = self.active_budget(smoke)
        which = "smoke" if smoke else "CPU"
        lines += ["", f"{which} scale, the same function of every variant (its changes over all variants):"]
        seen: dict[str, list[tuple[Any, Any]]] = {}
        for name in self.variants:
            spec = self.variant_spec(name)
            for path, a, b in diff(spec, scale(spec)):
                if (a, b) not in seen.setdefault(path, []):
                    seen[path].append((a, b))
        lines += [f"    {path}: " + ", ".join(f"{_short(a)} -> {_short(b)}" for a, b in pairs)
                  for path, pairs in seen.items()]
        lines += [f"{which} budget, the same for every variant:"]
        lines += [f"    {path} = {_short(value)}" for path, value in budget.changes().items()]
        lines += [f"    train.seed in {list(self.seeds_for(smoke))}",
                  f"    = {budget.tokens(scale.seq_len):,} training tokens per run"]
        if budget.hellaswag_limit:
            lines.append(f"    + HellaSwag acc_norm on the first {budget.hellaswag_limit} validation items, "
                         "final model only")
        return "\n".join(lines)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 100 else text[:97] + "..."


def spec_sets(start: RunSpec, target: RunSpec) -> list[str]:
    """`--set path=value` strings that turn `start` into `target`.

    Leaves are set one by one; a sub-spec whose `kind` (or shape) changes is set whole, as JSON,
    because setting a kind starts that slot from the new kind's defaults."""
    sets: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if a == b:
            return
        same_dict = (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                     and a.get("kind") == b.get("kind"))
        same_list = isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
        if same_dict:
            for key in a:
                walk(a[key], b[key], f"{path}.{key}" if path else key)
        elif same_list:
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}.{i}")
        else:
            sets.append(f"{path}={json.dumps(b)}")

    walk(start.model_dump(mode="json"), target.model_dump(mode="json"), "")
    return sets

