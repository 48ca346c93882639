"""A finished run as a small JSON file, committed under `experiments/results/expN/runs/VARIANT/seedS.json`.

The summary holds what the experiment's report needs (the final metrics, the curves it plots, the
experts' final loads) and the run's key: its spec as trained, the data file's content hash, the
document split's version and the zoo's results version (`training.RESULTS_VERSION`). A summary whose
key matches the run an experiment asks for is that run, on any machine: the tables and plots are
rebuilt from summaries alone, and a run already summarised is never trained again. A key that differs
is a different run, and `mismatch` says how.

Nothing here computes a metric: values are the trainer's own TensorBoard scalars, read back.
"""

from __future__ import annotations

import glob
import hashlib
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from training import RESULTS_VERSION
from training.split import SPLIT_VERSION
from zoo.overrides import diff
from zoo.specs import RunSpec

ROOT = Path(__file__).resolve().parents[1]
FORMAT = 1  # of the summary file itself
MAX_VIO = "moe/layer_{}/max_vio"
# Phases of `time/...` that are not training: a run's training time leaves them out, so that equal-time
# readings do not depend on how often a run was evaluated or saved.
NOT_TRAINING = ("time/evaluation", "time/checkpoint")


UNHASHED = "unhashed:"


def data_fingerprint(source: str) -> str:
    """sha256 of the corpus a run reads: the file's bytes, or each matched file's name and bytes for a glob.
    A source that is no local file ('builtin', 'hf:...') is named as it is: its content cannot be hashed here."""
    path = ROOT / source
    files = [path] if path.is_file() else sorted(Path(p) for p in glob.glob(str(path), recursive=True)
                                                 if Path(p).is_file())
    if not files:
        return f"{UNHASHED}{source}"
    digest = hashlib.sha256()
    for file in files:
        if len(files) > 1:
            digest.update(str(file.relative_to(ROOT) if file.is_relative_to(ROOT) else file).encode() + b"\0")
        with open(file, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def run_key(spec: RunSpec) -> dict[str, Any]:
    """What, besides the spec, makes two runs the same run."""
    return {"data_sha256": data_fingerprint(spec.data.source), "split_version": SPLIT_VERSION,
            "results_version": RESULTS_VERSION}


def mismatch(recorded: dict[str, Any] | None, wanted: dict[str, Any], *, trust_data: bool = False) -> str | None:
    """Why a run keyed `recorded` is not the run keyed `wanted` (None: it is). `trust_data`: the data file
    cannot be read here (a report on a machine without it), so the recorded hash is taken as it is."""
    if not recorded:
        return "it records no data hash, split version or results version"
    reasons = []
    if recorded.get("data_sha256") != wanted["data_sha256"] and not trust_data:
        reasons.append(f"its data file differs (sha256 {str(recorded.get('data_sha256'))[:12]}..., "
                       f"now {wanted['data_sha256'][:12]}...)")
    for field, what in (("split_version", "split version"), ("results_version", "results version")):
        if recorded.get(field) != wanted[field]:
            reasons.append(f"its {what} is {recorded.get(field)}, now {wanted[field]}")
    return "; ".join(reasons) or None


def spec_mismatch(recorded: RunSpec, wanted: RunSpec, ignore: tuple[str, ...] = ()) -> str | None:
    """Which fields of the spec differ (None: none but those in `ignore`)."""
    changed = [path for path, _, _ in diff(recorded, wanted) if path not in ignore]
    if not changed:
        return None
    return f"its spec differs ({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''})"


# ------------------------------------------------------------------------------------ reading a run folder


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every event file of a run (a resumed run writes one per process, in time
    order). A process killed outright may have logged steps past its last checkpoint; the process that
    resumed from that checkpoint logs them again, and only its values count: each process's file drops
    what the files before it logged from its own first logged step on."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, dict[int, float]] = defaultdict(dict)
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
        # A training process logs time/step from its first step on; other files in the folder (the
        # hparams summary written at the end, at step 0) start no process and drop nothing.
        steps = list(scalars.get("time/step", {}))
        if steps:
            first = min(steps)
            for curve in values.values():
                for step in [s for s in curve if s >= first]:
                    del curve[step]
        for tag, curve in scalars.items():
            values[tag].update(curve)
    return {tag: curve for tag, curve in values.items() if curve}


def summarize(run_dir: Path, *, experiment: str, variant: str, seed: int, spec: RunSpec, key: dict[str, Any],
              wall_s: float | None, machine: dict | None = None) -> dict[str, Any]:
    """The summary of a finished run folder. `spec` is the spec as trained (spec.json: precision resolved)."""
    from zoo.describe import describe

    scalars = read_scalars(run_dir)
    if "val/loss" not in scalars:
        raise ValueError(f"{run_dir} has no val/loss scalars: is it a finished run?")
    tokens_per_step = spec.train.micro_batch_size * spec.train.grad_accum * spec.data.seq_len
    counts = describe(spec, seq_len=spec.data.seq_len)
    train_flops_per_token = 3 * counts["flops_per_token"]  # forward + backward (twice the forward)
    seconds = _training_seconds(scalars)
    evals = []
    for step in sorted(scalars["val/loss"]):
        row = {"step": step, "tokens": step * tokens_per_step, "flops": step * tokens_per_step * train_flops_per_token,
               "train_s": seconds.get(step), "val_loss": scalars["val/loss"][step]}
        if step in scalars.get("val/max_vio_global", {}):
            row["max_vio_global"] = scalars["val/max_vio_global"][step]
        evals.append(row)
    final = max(scalars["val/loss"])
    values: dict[str, Any] = {"total_params": counts["total_params"], "active_params": counts["active_params"],
                              "tokens": spec.train.steps * tokens_per_step,
                              "train_flops": spec.train.steps * tokens_per_step * train_flops_per_token}
    for tag, column in (("val/loss", "val_loss"), ("val/ppl", "val_ppl"), ("val/acc", "val_acc"),
                        ("val/max_vio_global", "max_vio_global"), ("hellaswag/acc_norm", "hellaswag_acc_norm"),
                        ("hellaswag/acc", "hellaswag_acc")):
        if tag in scalars:
            values[column] = scalars[tag][max(scalars[tag])]
    throughput = scalars.get("perf/tokens_per_s", {})
    # The first step carries one-off costs (allocation, warm caches): the median of the others.
    steady = [v for s, v in throughput.items() if s > 1] or list(throughput.values())
    if steady:
        values["tokens_per_s"] = statistics.median(steady)
    vio = _layer_mean({tag: curve for tag, curve in scalars.items() if _is_batch_max_vio(tag)})
    if vio:
        values["max_vio"] = vio[max(vio)]
        values["max_vio_mean"] = statistics.fmean(vio.values())
    if seconds:
        values["train_s"] = seconds[max(seconds)]
    if wall_s is not None:
        values["wall_s"] = wall_s
    return {
        "format": FORMAT, "experiment": experiment, "variant": variant, "seed": seed,
        "key": {**key, "spec": json.loads(spec.model_dump_json())},
        "precision": spec.train.precision, "machine": machine, "final_step": final, "values": values, "evals": evals,
        # MaxVio of each logged batch (the accumulation window), mean over MoE layers: (tokens, value).
        "max_vio_batch": [[step * tokens_per_step, v] for step, v in sorted(vio.items())],
        "expert_share": {str(layer): shares for layer, shares in _final_shares(scalars).items()},
    }


def _is_batch_max_vio(tag: str) -> bool:
    parts = tag.split("/")
    return len(parts) == 3 and parts[0] == "moe" and parts[1].startswith("layer_") and parts[2] == "max_vio"


def _training_seconds(scalars: dict[str, dict[int, float]]) -> dict[int, float]:
    """{step: seconds of training up to that step}, from the trainer's per-interval `time/...` scalars
    (seconds per step over the steps since the previous log): wall time less evaluation and checkpointing.
    Steps between logs are not timed; evaluations fall on logged steps (eval_every is a multiple of
    log_every in every budget). After a resume, the interval from the checkpoint to the first log is
    the resumed process's (its first step's one-off costs included)."""
    wall = scalars.get("time/step", {})
    total, previous, out = 0.0, 0, {}
    for step in sorted(wall):
        per_step = wall[step] - sum(scalars.get(tag, {}).get(step, 0.0) for tag in NOT_TRAINING)
        total += per_step * (step - previous)
        previous = step
        out[step] = total
    return out


def _layer_mean(curves: dict[str, dict[int, float]]) -> dict[int, float]:
    """The mean over MoE layers at every step that all layers logged."""
    if not curves:
        return {}
    steps = set.intersection(*(set(c) for c in curves.values()))
    return {s: statistics.fmean(c[s] for c in curves.values()) for s in sorted(steps)}


def _final_shares(scalars: dict[str, dict[int, float]]) -> dict[int, list[float]]:
    shares: dict[int, dict[int, float]] = defaultdict(dict)
    for tag, curve in scalars.items():
        parts = tag.split("/")
        if len(parts) == 3 and parts[0] == "moe_load":
            shares[int(parts[1].removeprefix("layer_"))][int(parts[2].removeprefix("expert_"))] = curve[max(curve)]
    return {layer: [experts[e] for e in sorted(experts)] for layer, experts in sorted(shares.items())}


# ------------------------------------------------------------------------------------ the file


def summary_path(results_root: Path, experiment: str, variant: str, seed: int) -> Path:
    return results_root / experiment / "runs" / variant / f"seed{seed}.json"


def write(path: Path, summary: dict[str, Any]) -> None:
    from zoo.files import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(summary, indent=1, sort_keys=True) + "\n")


def read(path: Path) -> dict[str, Any] | None:
    """A summary file's content; None when there is none. A file that is not a summary's JSON (cut short,
    edited by hand) reads as a summary of no format, so the runner calls it another run and says so."""
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"format": "unreadable"}
    return found if isinstance(found, dict) else {"format": "unreadable"}


def saved_spec(summary: dict[str, Any]) -> RunSpec:
    """The spec a summary's run trained; a SpecError when this zoo's rules refuse it (a summary of an older zoo)."""
    from zoo.overrides import SpecError, validation_message

    data = summary["key"]["spec"]
    try:
        return RunSpec.model_validate(data)
    except ValueError as err:  # pydantic's ValidationError
        raise SpecError(f"not a valid run spec for this version of the zoo: {validation_message(err, data)}") from None


def saved_key(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary["key"].items() if k != "spec"}
