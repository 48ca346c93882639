"""What the tests/test_hf_*.py files share: random tiny transformers models saved as released checkpoints,
the inputs, and the comparison of logits and loss (no network).

Every weight is random (norms, biases and the routing correction bias included), so that no mapping
error hides behind a default. Logits are compared in fp32 (max |diff| <= 1e-4 and the same argmax at
every position), the loss with labels within 1e-5. fp32 matmuls in a different order (SDPA vs eager,
dropless dispatch vs transformers' expert loop) differ by ~1e-6 on logits of size ~1; the tolerances
leave a margin of 50x and still catch any real mapping error (those are O(0.1)). The largest
differences are written to `hf_parity_diffs.json` in pytest's base temp dir and printed at the end of
each module (run with -s to see them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bars in the test log

LOGITS_ATOL, LOSS_ATOL = 1e-4, 1e-5
VOCAB, BATCH, SEQ = 128, 2, 12
DIFFS: dict[str, dict[str, float]] = {}

COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-5,
)
DEEPSEEK = dict(COMMON, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=16)
GLM = dict(COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16)

# YaRN from 16 to 64 positions (factor 4); the correction range then covers part of the rotary dims.
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16)


@dataclass
class Case:
    arch: str  # a transformers model_type
    fields: dict
    attn: str = "eager"
    seq: int = SEQ
    save: dict = field(default_factory=dict)  # save_pretrained options: on-disk layout, sharding


def ds(**changes) -> Case:
    return Case("deepseek_v3", {**DEEPSEEK, **changes})


def glm(**changes) -> Case:
    return Case("glm4_moe", {**GLM, **changes})


CASES = {
    "ds-qlora-g1x1-dense1-shared1-norm-rsf2.5-rope_none": ds(
        q_lora_rank=32, n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, norm_topk_prob=True,
        routed_scaling_factor=2.5, rope_interleave=True),
    "ds-noqlora-g4x2-dense0-shared0-nonorm-rsf1-linear-halfrope": ds(
        q_lora_rank=None, n_group=4, topk_group=2, first_k_dense_replace=0, n_shared_experts=0, norm_topk_prob=False,
        routed_scaling_factor=1.0, rope_interleave=False, rope_parameters=dict(rope_type="linear", factor=2.0)),
    "ds-qlora-g4x2-dense2-shared2-norm-rsf2.5-yarn_mscale-bias": ds(
        q_lora_rank=32, n_group=4, topk_group=2, first_k_dense_replace=2, n_shared_experts=2, norm_topk_prob=True,
        routed_scaling_factor=2.5, attention_bias=True,
        rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=0.8)),
    "ds-noqlora-g1x1-dense1-shared1-nonorm-rsf1.5-yarn_msad_only_notrunc": ds(
        q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, norm_topk_prob=False,
        routed_scaling_factor=1.5,
        rope_parameters=dict(YARN, mscale_all_dim=0.707, beta_fast=16, beta_slow=2, truncate=False)),
    "ds-qlora-g4x2-dense1-shared1-dynamic_beyond_max-tied": Case("deepseek_v3", {
        **DEEPSEEK, "q_lora_rank": 32, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5, "tie_word_embeddings": True, "max_position_embeddings": 16,
        "rope_parameters": dict(rope_type="dynamic", factor=2.0)}, seq=24),
    "ds-qlora-g1x1-dense1-shared1-sdpa": Case("deepseek_v3", {
        **DEEPSEEK, "q_lora_rank": 32, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5}, attn="sdpa"),
    "ds-all_dense": ds(q_lora_rank=32, first_k_dense_replace=3),
    # Top-1 with renormalised weights: every combine weight is routed_scaling_factor (the trainer warns).
    "ds-top1-norm-g4x2-dense1-shared1-rsf2.5": ds(
        q_lora_rank=32, n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=1, num_experts_per_tok=1,
        norm_topk_prob=True, routed_scaling_factor=2.5),
    "glm-partial0.5-qknorm-qkvbias-g1x1-dense1-shared1-norm-rsf1-rope_none": glm(
        partial_rotary_factor=0.5, use_qk_norm=True, attention_bias=True, n_group=1, topk_group=1,
        first_k_dense_replace=1, n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=1.0),
    "glm-fullrotary-mqa-headdim32-g4x2-dense0-shared0-nonorm-rsf2.5-linear": glm(
        num_key_value_heads=1, head_dim=32, use_qk_norm=False, attention_bias=False, n_group=4, topk_group=2,
        first_k_dense_replace=0, n_shared_experts=0, norm_topk_prob=False, routed_scaling_factor=2.5,
        rope_parameters=dict(rope_type="linear", factor=2.0, partial_rotary_factor=1.0)),
    "glm-partial0.5-qknorm-qkvbias-g4x2-dense2-shared2-norm-rsf2.5-yarn": glm(
        use_qk_norm=True, attention_bias=True, n_group=4, topk_group=2, first_k_dense_replace=2,
        n_shared_experts=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_parameters=dict(YARN, partial_rotary_factor=0.5, mscale_all_dim=1.0)),
    "glm-partial0.25-qknorm-g1x1-dense1-shared1-dynamic_beyond_max-tied": Case("glm4_moe", {
        **GLM, "use_qk_norm": True, "first_k_dense_replace": 1, "routed_scaling_factor": 2.5,
        "tie_word_embeddings": True, "max_position_embeddings": 16,
        "rope_parameters": dict(rope_type="dynamic", factor=2.0, partial_rotary_factor=0.25)}, seq=24),
    "glm-partial0.5-qknorm-qkvbias-g1x1-dense1-shared1-sdpa": Case("glm4_moe", {
        **GLM, "use_qk_norm": True, "attention_bias": True, "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5}, attn="sdpa"),
    "glm-all_dense": glm(use_qk_norm=True, first_k_dense_replace=3),
    # transformers rotates int(16 x 0.3) = 4 dims: rotary_fraction 0.25.
    "glm-top1-norm-partial0.3-qknorm": glm(num_experts_per_tok=1, norm_topk_prob=True, use_qk_norm=True,
                                           first_k_dense_replace=1, partial_rotary_factor=0.3),
    # On-disk layouts other than the default per-expert one.
    "ds-stacked_experts_on_disk-sharded": Case("deepseek_v3", {
        **DEEPSEEK, "q_lora_rank": 32, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1},
        save=dict(save_original_format=False, max_shard_size="40KB")),
    "glm-per_expert-sharded": Case("glm4_moe", {**GLM, "use_qk_norm": True, "first_k_dense_replace": 1},
                                   save=dict(max_shard_size="40KB")),
}


def randomize_(model: torch.nn.Module) -> None:
    """Every weight random at a scale that keeps activations O(1): no default (ones, zeros) can hide
    a wrongly mapped tensor. The routing correction bias too, so selection depends on it."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.numel() == 0:
                continue
            if param.ndim >= 2:
                param.normal_(0.0, 1.0 if "embed" in name else param.shape[-1] ** -0.5)
            elif "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)


def make_hf(case: Case, path, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(case.arch, **case.fields)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=case.attn).eval()
    randomize_(model)
    model.save_pretrained(path, **case.save)
    return model


def inputs(seq: int = SEQ, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (BATCH, seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100  # ignored positions count in neither loss
    return ids, labels


def compare(name: str, hf_logits, hf_loss, zoo_logits, zoo_loss) -> None:
    """`zoo_loss`: the zoo's cross-entropy (transformers' loss leaves the auxiliary losses out unless
    output_router_logits is set)."""
    logit_diff = (hf_logits - zoo_logits).abs().max().item()
    loss_diff = (hf_loss - zoo_loss).abs().item()
    DIFFS[name] = {"logits": logit_diff, "loss": loss_diff}
    assert logit_diff <= LOGITS_ATOL, f"{name}: max |logit diff| {logit_diff:.3g}"
    assert torch.equal(hf_logits.argmax(-1), zoo_logits.argmax(-1)), f"{name}: argmax differs"
    assert loss_diff <= LOSS_ATOL, f"{name}: |loss diff| {loss_diff:.3g}"


@pytest.fixture(scope="module", autouse=True)
def report(tmp_path_factory):
    """Print (and write) the largest differences once a module's parity tests have run."""
    yield
    out = tmp_path_factory.getbasetemp() / "hf_parity_diffs.json"
    out.write_text(json.dumps(DIFFS, indent=2) + "\n")
    width = max(map(len, DIFFS), default=0)
    print(f"\nHF parity, max |diff| (written to {out}):")
    for name, diff in DIFFS.items():
        print(f"  {name:<{width}}  logits {diff['logits']:.2e}  loss {diff['loss']:.2e}")


def greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat((ids, model(ids).logits[:, -1:].argmax(-1)), dim=1)
    return ids


def edit_config(path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def export_error(spec) -> str:
    """The one-line SpecError the HF exporter gives for `spec` (a ModelSpec)."""
    from zoo.interop.hf import hf_config_dict
    from zoo.overrides import SpecError

    with pytest.raises(SpecError) as err:
        hf_config_dict(spec)
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)
