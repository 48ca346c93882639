"""The reference architectures at the seed project's scale (d_model 384, 6 layers, 8 heads).

Real architectures' numbers (DeepSeek-V3, GLM-4.5) are scaled down here; each function says which
numbers are kept from the release and which were scaled. All MoE presets keep the same active FFN
width as `baseline` (2 x 1536 = 3072 hidden units per token) so that they compare at equal compute.
"""

from zoo.overrides import with_changes
from zoo.presets.registry import preset
from zoo.specs import (
    MHASpec,
    MLASpec,
    MLPSpec,
    ModelSpec,
    MoESpec,
    MTPSpec,
    RunSpec,
    SigmoidGroupTopKRouterSpec,
    SoftmaxTopKRouterSpec,
    TrainSpec,
)

SEED_D_MODEL = 384
SEED_LAYERS = 6
SEED_HEADS = 8
SEED_SEQ = 512
SEED_EXPERT_HIDDEN = 1536
VOCAB = 4096  # a SentencePiece vocabulary sized for the CPU-scale default corpus
ACTIVE_FFN_HIDDEN = 2 * SEED_EXPERT_HIDDEN  # the baseline's top-2 experts
# 62 optimizer steps of 3 x 8 x 256 tokens (381k tokens, ~1.5 epochs of the builtin corpus): the README's
# main job, sized for 2 CPU cores (the README states its measured time). Muon's Newton-Schulz costs the same
# per step whatever its tokens, so fewer, larger steps train faster; in loss-per-second trials on the
# default preset this reached about the validation loss of 150 steps of 2,048 tokens in about half the time.
CPU_BUDGET = TrainSpec(steps=62, micro_batch_size=8, grad_accum=3, warmup_steps=6, eval_every=31, ckpt_every=31)


def deepseek_mla() -> MLASpec:
    """MLA at d_model 384. DeepSeek-V3 uses q_lora 1536, kv_lora 512, nope 128, rope 64, v 128 at
    d_model 7168; here q_lora 128, kv_lora 64, nope/rope 32/32, v 64 (the performance workloads' dims)."""
    return MLASpec(
        n_heads=SEED_HEADS, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64
    )


def glm4_attention() -> MHASpec:
    """GLM-4.5 attention: GQA (96 query / 8 kv heads in the release; 8 / 2 here), partial rotary 0.5,
    per-head RMSNorm on q and k, q/k/v bias."""
    return MHASpec(n_heads=SEED_HEADS, n_kv_heads=2, qk_norm="head", qkv_bias=True, rotary_fraction=0.5)


def _sigmoid_moe(n_groups: int, topk_groups: int) -> MoESpec:
    # 2 routed + 1 shared expert of 1024 = 3072 active hidden units, as the baseline's 2 x 1536.
    return MoESpec(
        n_experts=8,
        top_k=2,
        d_expert=ACTIVE_FFN_HIDDEN // 3,
        n_shared_experts=1,
        router=SigmoidGroupTopKRouterSpec(
            n_groups=n_groups,
            topk_groups=topk_groups,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,  # DeepSeek-V3 and GLM-4.5 configs
            bias_update_rate=1e-3,  # DeepSeek-V3 paper, gamma = 0.001
            seq_aux_loss_weight=1e-4,  # DeepSeek-V3 paper, alpha = 0.0001
        ),
    )


def deepseek_v3_moe() -> MoESpec:
    """DeepSeek-V3 MoE: sigmoid routing with group limit (8 groups / top 4 of 256 experts in the
    release; 4 groups / top 2 of 8 here), one shared expert."""
    return _sigmoid_moe(n_groups=4, topk_groups=2)


def glm4_moe() -> MoESpec:
    """GLM-4.5 MoE: the same sigmoid routing without group limit (n_group = topk_group = 1 in the release)."""
    return _sigmoid_moe(n_groups=1, topk_groups=1)


def _dense_first_layer() -> dict:
    # DeepSeek-V3 keeps its first 3 of 61 layers dense, GLM-4.5 its first 3 of 92; 1 of 6 here,
    # as wide as the active experts.
    return {"model.first_k_dense": 1, "model.dense_ffn": MLPSpec(d_hidden=ACTIVE_FFN_HIDDEN)}


@preset
def baseline() -> RunSpec:
    """The seed project's MoE model at its defaults: MHA + 8 experts top-2, softmax router, balance loss 0.01.

    d_model 384, 8 heads, 6 layers, expert hidden 1536, max sequence 512, tied embeddings: the seed
    project's defaults. Vocabulary 4096 fits the CPU-scale default corpus.
    """
    return RunSpec(
        train=CPU_BUDGET,
        model=ModelSpec(
            vocab_size=VOCAB,
            d_model=SEED_D_MODEL,
            n_layers=SEED_LAYERS,
            max_seq_len=SEED_SEQ,
            tie_embeddings=True,
            attention=MHASpec(n_heads=SEED_HEADS),
            ffn=MoESpec(
                n_experts=8,
                top_k=2,
                d_expert=SEED_EXPERT_HIDDEN,
                router=SoftmaxTopKRouterSpec(balance_loss_weight=0.01),
            ),
        )
    )


@preset
def dense() -> RunSpec:
    """`baseline` with a SwiGLU MLP (hidden 1536, the seed project's dense default) instead of the MoE."""
    return with_changes(baseline(), {"model.ffn": MLPSpec(d_hidden=SEED_EXPERT_HIDDEN)})


@preset
def deepseek() -> RunSpec:
    """DeepSeek-V3 at the seed scale: MLA + sigmoid group-limited MoE with a shared expert, first layer dense.

    Kept from the release: the routing (sigmoid, bias for selection only, top-2-sum group scores,
    norm_topk_prob, routed_scaling_factor 2.5, bias rate 1e-3, sequence aux loss 1e-4) and the block
    structure. Scaled: dims (see deepseek_mla), 8 experts top-2 in 4 groups / top 2 groups.
    """
    return with_changes(
        baseline(), {"model.attention": deepseek_mla(), "model.ffn": deepseek_v3_moe(), **_dense_first_layer()}
    )


@preset
def glm4() -> RunSpec:
    """GLM-4.5 at the seed scale: GQA with partial rotary 0.5, qk-norm and q/k/v bias + GLM-4.5 MoE.

    The MoE routes like DeepSeek-V3's (sigmoid, correction bias, routed scaling 2.5, one shared
    expert, first layer dense) without the group limit, as GLM-4.5 does.
    """
    return with_changes(
        baseline(), {"model.attention": glm4_attention(), "model.ffn": glm4_moe(), **_dense_first_layer()}
    )


@preset
def deepseek_glm4() -> RunSpec:
    """The default: DeepSeek's MLA attention + GLM-4.5's MoE (`glm4` with its attention swapped for MLA)."""
    return with_changes(glm4(), {"model.attention": deepseek_mla()})


@preset
def deepseek_glm4_mtp() -> RunSpec:
    """`deepseek_glm4` with one multi-token-prediction module (DeepSeek-V3's and GLM-4.5's depth 1).

    The module is one more MLA + MoE block after the 6 layers, sharing the embedding and head, trained
    with weight 0.3 on the token two ahead (DeepSeek-V3's lambda for its first 10T tokens). At 6 layers
    it adds 11.3M parameters and 23% to the FLOPs per token (DeepSeek-V3: 2% of 61 layers' worth);
    `zoo generate --speculative mtp` drafts with it. Hypothesis: the denser training signal lowers the
    main model's validation loss at equal tokens, and the module's drafts are accepted often enough to
    decode more than one token per forward.
    """
    return with_changes(deepseek_glm4(), {"model.mtp": MTPSpec(depth=1, loss_weight=0.3)})
