"""Hugging Face checkpoints <-> zoo models: DeepSeek-V3 (`deepseek_v3`), GLM-4-MoE (`glm4_moe`),
Qwen3-MoE (`qwen3_moe`), OLMoE (`olmoe`) and Mixtral (`mixtral`).

    model, spec = from_hf("path/to/hf_dir")      # config.json + safetensors -> DecoderLM, ModelSpec
    to_hf(model, spec, "path/to/out")             # -> a directory AutoModelForCausalLM.from_pretrained loads

The five formats are one decoder (pre-norm blocks, SwiGLU FFNs, dense or MoE layers) with different
attention and routing: MLA for `deepseek_v3`; GQA with options for the others (partial rotary, q/k
norm per head or over the whole projection, biases, a sliding window); sigmoid group-limited routing
with shared experts for `deepseek_v3`/`glm4_moe`, softmax top-k for the rest. Export writes the first
format, in the order above, that expresses the spec. Parity means the forward pass: transformers'
logits and loss.

Split by topic: `families/` holds one module per format (its config.json fields and weight names),
`hf_config` reads config.json and picks the format a spec is written as, `hf_weights` maps tensor names
and layouts (the name map is in its docstring), and this module puts them together.

Multi-token-prediction modules (`model.mtp`) are the layers after the last, as the released
DeepSeek-V3 / GLM-4.5 checkpoints store them (`zoo.interop.hf_mtp`): read on import, written on export
(only `deepseek_v3` and `glm4_moe` hold them; the other formats refuse a spec with model.mtp);
`to_hf_model` leaves them out (transformers has no MTP modules).

Not carried over, by design: training-only fields (the routing-bias update rate, the auxiliary losses,
router noise and the MTP loss weight: import takes the spec defaults, export drops them;
`attention_dropout` and Mixtral's `router_jitter_noise` are dropped with a warning);
`num_key_value_heads` of a `deepseek_v3` config (MLA gives every head its own key, the field changes
no weight; export writes n_heads). Anything else a format cannot say is an error naming the field.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.blocks.model import DecoderLM
from zoo.builders import build
from zoo.interop.hf_config import (  # noqa: F401  (spec_from_hf_config: part of this module's API)
    SPECIAL_TOKENS,
    hf_config_dict,
    read_hf_config,
    spec_from_hf_config,
    transformers_module,
)
from zoo.interop.families.common import DroppedField
from zoo.interop.hf_mtp import is_mtp_key, spec_from_checkpoint
from zoo.interop.hf_weights import SafetensorsDir, hf_tensors, load_hf_weights, write_safetensors
from zoo.overrides import SpecError
from zoo.specs import DataSpec, ModelSpec, RunSpec
from zoo.tokenizer import HF_TOKENIZER_DIR

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


def from_hf(path: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[DecoderLM, ModelSpec]:
    """Read a transformers directory of a supported model_type: (model in eval mode, spec)."""
    path = Path(path)
    config = read_hf_config(path)
    tensors = SafetensorsDir(path)
    spec = spec_from_checkpoint(config, tensors)
    model = build(spec).to(dtype)
    load_hf_weights(model, spec, config.model_type, tensors)
    return model.eval(), spec


def to_hf(
    model: nn.Module,
    spec: ModelSpec | RunSpec,
    path: str | Path,
    *,
    special_tokens: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write config.json, generation_config.json and safetensors (sharded above `max_shard_bytes`) that
    transformers' AutoModelForCausalLM.from_pretrained loads as `model`. `special_tokens` may give
    bos_token_id / eos_token_id / pad_token_id."""
    spec = spec.model if isinstance(spec, RunSpec) else spec
    if not isinstance(model, DecoderLM) or len(model.layers) != spec.n_layers:
        raise SpecError(f"to_hf needs the DecoderLM built from this spec ({spec.n_layers} layers)")
    fields = hf_config_dict(spec, special_tokens=special_tokens)
    path = Path(path)
    holds_checkpoint = (path / "config.json").exists() or any(path.glob("*.safetensors"))
    if holds_checkpoint and not overwrite:
        raise SpecError(f"{path} already holds a checkpoint; pick an empty directory")
    tensors = hf_tensors(model, spec, fields["model_type"])

    transformers = transformers_module()
    config = transformers.AutoConfig.for_model(**fields)
    config.dtype = model.embed.weight.dtype
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("model*.safetensors*"):
        stale.unlink()
    config.save_pretrained(str(path))
    transformers.GenerationConfig.from_model_config(config).save_pretrained(str(path))
    write_safetensors(tensors, path, max_shard_bytes)
    return path


def to_hf_model(model: nn.Module, spec: ModelSpec | RunSpec, **from_config_kwargs: Any) -> nn.Module:
    """The transformers model (in memory, same weights, dtype and device) that `to_hf` would write;
    `from_config_kwargs` go to `AutoModelForCausalLM.from_config` (attn_implementation,
    experts_implementation)."""
    spec = spec.model if isinstance(spec, RunSpec) else spec
    if not isinstance(model, DecoderLM) or len(model.layers) != spec.n_layers:
        raise SpecError(f"to_hf_model needs the DecoderLM built from this spec ({spec.n_layers} layers)")
    fields = hf_config_dict(spec)
    transformers = transformers_module()
    config = transformers.AutoConfig.for_model(**fields)
    weight = model.embed.weight
    hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=weight.dtype, **from_config_kwargs)
    hf_model.to(weight.device)
    # transformers has no MTP modules: the model it builds is the main one
    tensors = {k: v for k, v in hf_tensors(model, spec, fields["model_type"], stacked=True).items()
               if not is_mtp_key(k, spec.n_layers)}
    missing, unexpected = hf_model.load_state_dict(tensors, strict=False)
    missing = [name for name in missing if not (spec.tie_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise SpecError(f"to_hf_model: weights that do not map: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if spec.tie_embeddings:
        hf_model.tie_weights()
    return hf_model


def import_hf(source: str | Path, run_dir: str | Path) -> list[str]:
    """`zoo import-hf`: a transformers directory -> a run folder (spec.json + model.safetensors, and the
    source's tokenizer files under hf_tokenizer/). Returns the lines to print."""
    from zoo.checkpoint import SPEC_FILE, save_run_folder

    source, run_dir = Path(source), Path(run_dir)
    if (run_dir / SPEC_FILE).exists():
        raise SpecError(f"--out {run_dir} already holds a run folder; pick a new directory")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, spec = from_hf(source)
    data = DataSpec(seq_len=min(DataSpec().seq_len, spec.max_seq_len))
    save_run_folder(model, RunSpec(model=spec, data=data), run_dir)
    kind = json.loads((source / "config.json").read_text())["model_type"]
    n_params = sum(p.numel() for p in model.parameters())
    mtp = f", {spec.mtp.depth} MTP module{'s' if spec.mtp.depth > 1 else ''}" if spec.mtp.depth else ""
    lines = [f"imported {kind} ({spec.n_layers} layers{mtp}, {n_params / 1e6:.2f}M parameters) from {source} "
             f"into {run_dir}"]
    lines += [f"warning: {warning.message}" for warning in caught if issubclass(warning.category, DroppedField)]
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if copied:
        (run_dir / HF_TOKENIZER_DIR).mkdir(exist_ok=True)
        for name in copied:
            shutil.copy2(source / name, run_dir / HF_TOKENIZER_DIR / name)
        lines.append(f"copied {', '.join(copied)} to {run_dir / HF_TOKENIZER_DIR}/ (export-hf puts them back)")
    if not set(copied) - {"generation_config.json"}:
        lines.append(f"{source} has no tokenizer files: the run folder has no tokenizer")
    else:
        lines.append("the Hugging Face tokenizer is kept as is: zoo generate and zoo eval use it")
    return lines


def export_hf(run_dir: str | Path, out: str | Path) -> list[str]:
    """`zoo export-hf`: a run folder -> a transformers directory with a tokenizer: the run's SentencePiece
    model converted (zoo.interop.hf_tokenizer), else hf_tokenizer/'s files, if any."""
    from zoo.checkpoint import load_run_folder
    from zoo.interop.hf_tokenizer import special_token_ids, write_hf_tokenizer
    from zoo.tokenizer import TOKENIZER_FILENAME, Tokenizer

    run_dir, out = Path(run_dir), Path(out)
    model, run = load_run_folder(run_dir)
    tokenizer_dir = run_dir / HF_TOKENIZER_DIR
    tokenizer = Tokenizer.load(run_dir) if (run_dir / TOKENIZER_FILENAME).is_file() else None
    special_tokens = None
    generation = tokenizer_dir / "generation_config.json"
    if tokenizer is not None:
        special_tokens = special_token_ids(tokenizer)
    elif generation.is_file():
        special_tokens = {k: v for k, v in json.loads(generation.read_text()).items() if k in SPECIAL_TOKENS}
    to_hf(model, run.model, out, special_tokens=special_tokens)
    kind = json.loads((out / "config.json").read_text())["model_type"]
    lines = [f"exported {run_dir} as {kind} to {out} (AutoModelForCausalLM.from_pretrained loads it)"]
    if tokenizer is not None:
        written = write_hf_tokenizer(tokenizer, out, model_max_length=run.model.max_seq_len)
        lines.append(f"wrote the run's tokenizer as {', '.join(written)} (AutoTokenizer.from_pretrained loads it)")
    elif tokenizer_dir.is_dir():
        copied = [p.name for p in sorted(tokenizer_dir.iterdir()) if p.is_file() and p.name != "generation_config.json"]
        for name in copied:
            shutil.copy2(tokenizer_dir / name, out / name)
        if copied:
            lines.append(f"copied tokenizer files {', '.join(copied)}")
    else:
        lines.append(f"no {TOKENIZER_FILENAME} or {HF_TOKENIZER_DIR}/ in the run folder: the export has no tokenizer files")
    return lines
