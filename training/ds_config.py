"""The DeepSpeed config a run trains with: a JSON file (`--ds-config`, `deepspeed.config`, or the
shipped `ds_configs/zero{stage}_{precision}.json`) with every "auto" filled from the run spec, and
every value that contradicts the spec refused in one line naming both.
"""

from __future__ import annotations

import json
from pathlib import Path

from training.errors import TrainingError
from zoo.specs import RunSpec

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
DS_CONFIG_FILE = "ds_config.json"  # the resolved config, in the run folder


def ds_config_source(spec: RunSpec, path: str | None) -> tuple[Path, str]:
    """The DeepSpeed config file a run uses, and how the user named it (for error messages)."""
    if path:
        return Path(path), f"--ds-config {path}"
    if spec.deepspeed.config:
        return Path(spec.deepspeed.config), f"deepspeed.config={spec.deepspeed.config}"
    default = DS_CONFIG_DIR / f"zero{spec.deepspeed.zero_stage}_{spec.train.precision}.json"
    return default, str(default)


# What each DeepSpeed key the trainer fills is called in the run spec.
SPEC_FIELDS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
}
# Sections the trainer reads or fills: DeepSpeed indexes into them as dicts.
OBJECT_SECTIONS = ("zero_optimization", "bf16", "fp16")


def resolve_ds_config(spec: RunSpec, path: str | None, world_size: int, named: str | None = None) -> dict:
    """The DeepSpeed config with every "auto" filled from the run spec; conflicts are errors. `named`: how
    errors name the file (default: as the user gave it, see ds_config_source)."""
    train, stage = spec.train, spec.deepspeed.zero_stage
    if train.precision == "auto":
        raise TrainingError("train.precision=auto is resolved per device first (training.precision.resolve_precision)")
    path, default_name = ds_config_source(spec, path)
    named = named or default_name
    if not path.is_file():
        raise TrainingError(f"{named} does not exist; the shipped configs are in {DS_CONFIG_DIR}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TrainingError(f"{named} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise TrainingError(f"{named} holds a JSON {type(config).__name__}; a DeepSpeed config is an object "
                            '({"zero_optimization": {...}, ...})')
    for section in OBJECT_SECTIONS:
        if section in config and not isinstance(config[section], dict):
            raise TrainingError(f"{path} sets \"{section}\": {json.dumps(config[section])}; it must be an object, "
                                f'e.g. \"{section}\": {{{_EXAMPLES[section]}}}')
    wanted = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
    }
    for key, value in wanted.items():
        _fill(config, key, value, path, SPEC_FIELDS[key])
    config.setdefault("zero_optimization", {})
    _fill(config["zero_optimization"], "stage", stage, path, "deepspeed.zero_stage")
    for precision in ("bf16", "fp16"):
        section = config.setdefault(precision, {})
        _fill(section, "enabled", train.precision == precision, path,
              f"train.precision={train.precision!r}, so {precision}.enabled")
    if "train_batch_size" in config:
        _fill(config, "train_batch_size", train.micro_batch_size * train.grad_accum * world_size, path,
              "train.micro_batch_size x train.grad_accum x world size")
    if "optimizer" in config or "scheduler" in config:
        raise TrainingError(
            f"{path} sets an optimizer or scheduler; the trainer builds Muon + AdamW and the warmup-cosine "
            "schedule from train.* fields, so remove those sections"
        )
    config.update(zero_allow_untested_optimizer=True, steps_per_print=10**9, wall_clock_breakdown=False)
    return config


_EXAMPLES = {"zero_optimization": '"stage": "auto"', "bf16": '"enabled": "auto"', "fp16": '"enabled": "auto"'}


def _fill(section: dict, key: str, value, path: Path, field: str) -> None:
    if section.get(key, "auto") == "auto":
        section[key] = value
    elif section[key] != value:
        raise TrainingError(
            f"{path} sets {key}={section[key]!r} but the run has {field}={value!r}; "
            f"make them agree (or write \"auto\" in the config)"
        )
