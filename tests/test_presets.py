"""Registry-driven: every preset, at toy size, builds, trains a step's worth, and is described truthfully.

Adding a preset adds it to every test here; nobody writes a new test.
"""

import pytest
import torch

import zoo
from zoo import presets
from zoo.describe import describe
from zoo.presets.tiny import tiny
from zoo.specs import (
    LayerOverride,
    MLPSpec,
    ModelSpec,
    MoESpec,
    RunSpec,
    SigmoidGroupTopKRouterSpec,
    SoftmaxTopKRouterSpec,
)

PRESETS = presets.names()


@pytest.mark.parametrize("name", PRESETS)
def test_preset_forward_backward_every_param_gets_gradient(name):
    spec = presets.get(name, tiny=True)
    model = zoo.build(spec)
    vocab = spec.model.vocab_size
    # 4 x 64 tokens: enough assignments that every expert of a tiny MoE is routed to at least once.
    ids = torch.randint(0, vocab, (4, spec.model.max_seq_len))
    out = model(ids, labels=ids)
    assert out.logits.shape == (4, spec.model.max_seq_len, vocab)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    # Cross-entropy of a fresh model is near ln(V); the aux losses are small positive extras.
    assert abs(out.ce_loss.item() - torch.log(torch.tensor(float(vocab))).item()) < 0.5
    assert out.loss.item() == pytest.approx(out.ce_loss.item() + out.aux_loss.item(), rel=1e-6)
    out.loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_spec_json_round_trip(name):
    for spec in (presets.get(name), presets.get(name, tiny=True)):
        assert RunSpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize("name", PRESETS)
def test_describe_counts_match_the_built_module(name):
    spec = presets.get(name)
    info = describe(spec)
    model = zoo.build(spec.model)
    assert info["total_params"] == sum(p.numel() for p in model.parameters())
    assert sum(b["params"] for b in info["blocks"]) == info["total_params"]
    # Active = total minus the routed experts a token skips, counted here independently.
    skipped = 0
    for layer in model.layers:
        if isinstance(layer.ffn, zoo.blocks.moe.MoE):
            experts = sum(p.numel() for p in layer.ffn.experts.parameters())
            k, e = layer.ffn.router.top_k, layer.ffn.router.n_experts
            skipped += experts * (e - k) // e
    assert info["active_params"] == info["total_params"] - skipped


def test_every_preset_has_a_description():
    for name in PRESETS:
        assert len(presets.describe_line(name)) > 20


def test_required_presets_exist():
    required = {"baseline", "dense", "deepseek", "glm4", "deepseek_glm4", "exp1_baseline", "exp1_mlp",
                "exp1_attention_mlp", "exp1_moe", "exp1_attention_moe"}
    assert required <= set(PRESETS)


def test_preset_architectures_are_what_they_say():
    base = presets.get("baseline").model
    assert (base.d_model, base.n_layers, base.attention.n_heads, base.max_seq_len) == (384, 6, 8, 512)
    assert (base.ffn.n_experts, base.ffn.top_k, base.ffn.d_expert) == (8, 2, 1536)
    assert base.ffn.router.kind == "softmax_topk" and base.ffn.router.balance_loss_weight == 0.01
    assert base.tie_embeddings
    assert presets.get("dense").model.ffn.kind == "mlp"
    ds = presets.get("deepseek").model
    assert ds.attention.kind == "mla" and ds.ffn.router.kind == "sigmoid_group_topk"
    assert ds.ffn.router.n_groups > 1 and ds.ffn.n_shared_experts == 1 and ds.first_k_dense == 1
    glm = presets.get("glm4").model
    assert glm.attention.kind == "mha" and glm.attention.kv_heads() < glm.attention.n_heads
    assert glm.attention.rotary_fraction == 0.5 and glm.attention.qk_norm and glm.attention.qkv_bias
    dg = presets.get("deepseek_glm4").model
    assert dg.attention == ds.attention and dg.ffn == glm.ffn


def test_tiny_keeps_the_architecture():
    full, small = presets.get("glm4").model, presets.get("glm4", tiny=True).model
    assert small.d_model < full.d_model and small.n_layers <= full.n_layers
    assert small.attention.kind == full.attention.kind
    assert 1 < small.attention.kv_heads() < small.attention.n_heads  # GQA stays GQA
    assert small.first_k_dense == full.first_k_dense
    assert small.ffn.router == full.ffn.router


def test_tiny_keeps_routing_valid_whatever_top_k_and_grouping():
    """tiny() capped n_experts at max(8, 2 x n_groups) whatever top_k: a 64-expert top-10 preset failed."""
    flat = MoESpec(n_experts=64, top_k=10, router=SoftmaxTopKRouterSpec(norm_topk_prob=True))
    grouped = MoESpec(n_experts=64, top_k=10, router=SigmoidGroupTopKRouterSpec(n_groups=8, topk_groups=2))
    for ffn in (flat, grouped):
        small = tiny(RunSpec(model=ModelSpec(ffn=ffn))).model.ffn
        groups, chosen = getattr(ffn.router, "n_groups", 1), getattr(ffn.router, "topk_groups", 1)
        assert small.top_k == 10 and small.router == ffn.router and small.n_experts < ffn.n_experts
        assert small.n_experts % groups == 0 and chosen * small.n_experts // groups > small.top_k  # still a choice
    few = tiny(RunSpec(model=ModelSpec(ffn=MoESpec(n_experts=4, top_k=4)))).model.ffn
    assert few.n_experts == 4  # never more experts than the full size


def test_tiny_keeps_the_first_layer_of_each_periodic_override():
    """tiny() kept only listed override layers: every=3 from offset=3 vanished at 2 layers."""
    spec = RunSpec(model=ModelSpec(n_layers=12, ffn=MoESpec(), overrides=[
        LayerOverride(every=3, offset=3, ffn=MLPSpec(d_hidden=256))]))
    small = tiny(spec).model
    assert small.n_layers < spec.model.n_layers
    assert [layer.ffn.kind for layer in small.layer_specs()][3] == "mlp"
