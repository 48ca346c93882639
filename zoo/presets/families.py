"""Qwen3-MoE, OLMoE and Mixtral at the seed project's scale (d_model 384, 6 layers, 8 heads, context
512, vocabulary 4096, tied embeddings), each one `zoo export-hf` writes in its own Hugging Face format.

As in zoo/presets/core.py, every MoE keeps the baseline's active FFN width (3072 hidden units per
token), and each docstring says what is kept from the release and what is scaled. `zoo diff olmoe
deepseek_glm4` (or any pair) prints what separates two of them.
"""

from zoo.overrides import with_changes
from zoo.presets.core import ACTIVE_FFN_HIDDEN, SEED_D_MODEL, SEED_EXPERT_HIDDEN, SEED_HEADS, baseline
from zoo.presets.registry import preset
from zoo.specs import MHASpec, MoESpec, RopeSpec, RunSpec, SoftmaxTopKRouterSpec

FINE_GRAINED_TOP_K = 8  # Qwen3-MoE and OLMoE route each token to 8 experts
FINE_GRAINED_EXPERTS = 24  # 24 experts of 3072 / 8 = 384: about deepseek_glm4's parameter count
SEED_KV_HEADS = 2  # GQA at 8 query heads, as glm4


def _fine_grained_moe(router: SoftmaxTopKRouterSpec) -> MoESpec:
    return MoESpec(n_experts=FINE_GRAINED_EXPERTS, top_k=FINE_GRAINED_TOP_K,
                   d_expert=ACTIVE_FFN_HIDDEN // FINE_GRAINED_TOP_K, router=router)


@preset
def qwen3_moe() -> RunSpec:
    """Qwen3-30B-A3B at the seed scale: GQA with per-head q/k norm, softmax top-8 renormalised, every layer MoE.

    Kept from the release (Qwen3-30B-A3B config.json): RMSNorm on q and k per head, head_dim twice
    d_model / n_heads (128 at d_model 2048 and 32 heads; 96 here), no attention bias, RoPE theta 1e6,
    norm eps 1e-6, top-8 softmax routing with norm_topk_prob, no shared expert, no dense layer
    (mlp_only_layers empty, decoder_sparse_step 1), balance loss 0.001 (router_aux_loss_coef).
    Scaled: 32 query / 4 kv heads -> 8 / 2; 48 layers -> 6; 128 experts of 768 -> 24 of 384.
    """
    attention = MHASpec(n_heads=SEED_HEADS, n_kv_heads=SEED_KV_HEADS, head_dim=2 * SEED_D_MODEL // SEED_HEADS,
                        qk_norm="head", rope=RopeSpec(theta=1e6))
    router = SoftmaxTopKRouterSpec(norm_topk_prob=True, balance_loss_weight=1e-3)
    return with_changes(baseline(), {"model.attention": attention, "model.ffn": _fine_grained_moe(router),
                                     "model.norm_eps": 1e-6})


@preset
def olmoe() -> RunSpec:
    """OLMoE-1B-7B at the seed scale: MHA with q/k norm over the whole projection, softmax top-8, every layer MoE.

    Kept from the release (OLMoE-1B-7B-0924 config.json and the OLMoE paper): RMSNorm over the whole q
    and k projections (all heads at once), plain MHA (as many kv heads as query heads), no attention
    bias, RoPE theta 1e4, norm eps 1e-5, top-8 softmax routing without renormalisation, no shared
    expert, no dense layer, balance loss 0.01 and router z-loss 0.001 (the paper's).
    Scaled: 16 heads -> 8; 16 layers -> 6; 64 experts of 1024 -> 24 of 384.
    """
    attention = MHASpec(n_heads=SEED_HEADS, qk_norm="projection")
    router = SoftmaxTopKRouterSpec(norm_topk_prob=False, balance_loss_weight=1e-2, z_loss_weight=1e-3)
    return with_changes(baseline(), {"model.attention": attention, "model.ffn": _fine_grained_moe(router),
                                     "model.norm_eps": 1e-5})


@preset
def mixtral() -> RunSpec:
    """Mixtral-8x7B at the seed scale: GQA, 8 experts softmax top-2 renormalised, every layer MoE.

    Kept from the release (Mixtral-8x7B-v0.1 config.json): 8 experts, top-2 with the weights
    renormalised over the two (a softmax over the selected logits), no shared expert, no dense layer,
    GQA with 4 query heads per kv head, no q/k norm and no bias, no sliding window (sliding_window
    null), RoPE theta 1e6, norm eps 1e-5, balance loss 0.02 (router_aux_loss_coef).
    Scaled: 32 query / 8 kv heads -> 8 / 2; 32 layers -> 6; experts of 14336 -> 1536 (the baseline's).
    """
    attention = MHASpec(n_heads=SEED_HEADS, n_kv_heads=SEED_KV_HEADS, rope=RopeSpec(theta=1e6))
    moe = MoESpec(n_experts=8, top_k=2, d_expert=SEED_EXPERT_HIDDEN,
                  router=SoftmaxTopKRouterSpec(norm_topk_prob=True, balance_loss_weight=2e-2))
    return with_changes(baseline(), {"model.attention": attention, "model.ffn": moe, "model.norm_eps": 1e-5})
