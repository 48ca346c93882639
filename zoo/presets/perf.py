"""The performance workloads of `benchmarks/train_step.py`, diffs of `deepseek_glm4`: W1, W2 and a
~0.5B-parameter model for GPUs (`perf_0p5b`).

W1 and W2 are batch 8 x 256 tokens, vocab 4096, d_model 384, 6 layers, 8 heads, MLA (q_lora 128,
kv_lora 64, nope/rope 32/32, v 64), every layer MoE with one shared expert. W1 has a few wide
experts, W2 many narrow ones with DeepSeek-V3's group limit. Their active FFN widths per token
differ: W1 has 3 x 384 = 1152 hidden units (top-2 + shared), W2 7 x 128 = 896 (top-6 + shared), 22%
fewer: W2 does less FFN work per token.
"""

from zoo.overrides import with_changes
from zoo.presets.core import deepseek_glm4
from zoo.presets.registry import preset
from zoo.specs import RunSpec

_WORKLOAD = {"model.first_k_dense": 0, "model.dense_ffn": None, "model.max_seq_len": 256, "data.seq_len": 256,
             "train.micro_batch_size": 8}


@preset
def perf_w1() -> RunSpec:
    """Benchmark workload W1: deepseek_glm4 with 8 experts top-2 + 1 shared of hidden 384, every layer MoE."""
    return with_changes(deepseek_glm4(), {**_WORKLOAD, "model.ffn.d_expert": 384})


@preset
def perf_w2() -> RunSpec:
    """Benchmark workload W2: 64 experts top-6 + 1 shared of hidden 128, 8 groups / top 4, every layer MoE."""
    return with_changes(deepseek_glm4(), {
        **_WORKLOAD, "model.ffn.n_experts": 64, "model.ffn.top_k": 6, "model.ffn.d_expert": 128,
        "model.ffn.router.n_groups": 8, "model.ffn.router.topk_groups": 4,
    })


@preset
def perf_0p5b() -> RunSpec:
    """GPU benchmark workload: deepseek_glm4 at ~0.5B total (~0.1B active) parameters, 64 experts top-6, T 1024.

    d_model 1024, 10 layers, 16 heads, MLA (q_lora 512, kv_lora 256, nope/rope 64/32, v 64), 64
    experts of hidden 256 top-6 + 1 shared, first layer dense (hidden 4096); batch 16 x 1024 tokens.
    """
    return with_changes(deepseek_glm4(), {
        "model.d_model": 1024, "model.n_layers": 10, "model.max_seq_len": 1024,
        "model.attention.n_heads": 16, "model.attention.q_lora_rank": 512, "model.attention.kv_lora_rank": 256,
        "model.attention.qk_nope_head_dim": 64, "model.attention.qk_rope_head_dim": 32,
        "model.attention.v_head_dim": 64,
        "model.ffn.n_experts": 64, "model.ffn.top_k": 6, "model.ffn.d_expert": 256, "model.dense_ffn.d_hidden": 4096,
        "data.seq_len": 1024, "train.micro_batch_size": 16,
    })
