"""MoE: equivalences (one expert = dense SwiGLU; dropless dispatch = per-token loop) and router invariants."""

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.blocks.mlp import SwiGLU
from zoo.blocks.moe import MoE, dropless_dispatch
import zoo.blocks.moe as moe_mod
import zoo.blocks.padded_experts as padded_mod
from zoo.blocks.routers import SigmoidGroupTopKRouter, SoftmaxTopKRouter
from zoo.specs import MHASpec, ModelSpec, MoESpec, SigmoidGroupTopKRouterSpec

D, F_HIDDEN = 32, 48


def _randomize(module, std=0.3):
    for p in module.parameters():
        torch.nn.init.normal_(p, std=std)


@pytest.mark.parametrize("router_cls", [SoftmaxTopKRouter, SigmoidGroupTopKRouter])
def test_one_expert_top1_equals_dense_swiglu(router_cls):
    kwargs = {} if router_cls is SoftmaxTopKRouter else {"routed_scaling_factor": 1.0, "norm_topk_prob": True}
    moe = MoE(d_model=D, n_experts=1, d_expert=F_HIDDEN, router=router_cls(d_model=D, n_experts=1, top_k=1, **kwargs))
    _randomize(moe)
    mlp = SwiGLU(d_model=D, d_hidden=F_HIDDEN)
    with torch.no_grad():
        gate, up = moe.experts.gate_up_proj[0].chunk(2, dim=0)
        mlp.gate_proj.weight.copy_(gate)
        mlp.up_proj.weight.copy_(up)
        mlp.down_proj.weight.copy_(moe.experts.down_proj[0])
    x = torch.randn(3, 10, D)
    torch.testing.assert_close(moe(x), mlp(x), atol=1e-6, rtol=1e-6)


def _loop_reference(x_TD, weights_TK, experts_TK, gate_up, down):
    """The naive definition: for each token, for each of its K experts, add weight * expert(token)."""
    rows = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros_like(x_TD[t])
        for k in range(experts_TK.shape[1]):
            e = experts_TK[t, k]
            gate, up = (gate_up[e] @ x_TD[t]).chunk(2)
            acc = acc + weights_TK[t, k] * (down[e] @ (F.silu(gate) * up))
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm", "padded_bmm"])
def test_dropless_dispatch_equals_per_token_loop_outputs_and_gradients(impl):
    T, K, E = 37, 3, 6
    x = torch.randn(T, D, requires_grad=True)
    gate_up = (torch.randn(E, 2 * F_HIDDEN, D) * 0.2).requires_grad_()
    down = (torch.randn(E, D, F_HIDDEN) * 0.2).requires_grad_()
    weights = torch.rand(T, K, requires_grad=True)
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    experts[:, 0] = torch.where(experts[:, 0] == 5, 4, experts[:, 0])  # uneven loads

    y, counts = dropless_dispatch(x, weights, experts, gate_up, down, impl=impl)
    grads = torch.autograd.grad(y.square().sum(), (x, gate_up, down, weights))
    y_ref = _loop_reference(x, weights, experts, gate_up, down)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (x, gate_up, down, weights))

    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)
    assert counts.tolist() == torch.bincount(experts.flatten(), minlength=E).tolist()


@pytest.mark.parametrize("impl", ["loop", "grouped_mm", "padded_bmm"])
def test_dropless_dispatch_handles_unused_experts(impl):
    x = torch.randn(5, D)
    experts = torch.zeros(5, 1, dtype=torch.long)  # everything to expert 0 of 4
    gate_up, down = torch.randn(4, 2 * F_HIDDEN, D), torch.randn(4, D, F_HIDDEN)
    y, counts = dropless_dispatch(x, torch.ones(5, 1), experts, gate_up, down, impl=impl)
    assert counts.tolist() == [5, 0, 0, 0]
    torch.testing.assert_close(y, _loop_reference(x, torch.ones(5, 1), experts, gate_up, down), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm", "padded_bmm", "auto"])
def test_dropless_dispatch_of_no_tokens(impl):
    x = torch.zeros(0, D, requires_grad=True)
    gate_up = torch.randn(4, 2 * F_HIDDEN, D, requires_grad=True)
    down = torch.randn(4, D, F_HIDDEN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, counts = dropless_dispatch(x, torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long), gate_up, down, impl=impl)
    y.float().sum().backward()
    assert y.shape == (0, D) and counts.tolist() == [0, 0, 0, 0] and x.grad.shape == (0, D)


@pytest.mark.parametrize("impl", ["grouped_mm", "padded_bmm"])
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-tensors", "fp32-under-autocast"])
def test_bf16_dispatch_tracks_the_fp32_reference(impl, autocast):
    """bf16 (or autocast to it) agrees with the fp32 loop to bf16 precision, gradients included, and
    fp32 gradients reach fp32 weights under autocast."""
    T, K, E = 64, 2, 4
    x32 = torch.randn(T, D)
    gate_up32, down32 = torch.randn(E, 2 * F_HIDDEN, D) * 0.2, torch.randn(E, D, F_HIDDEN) * 0.2
    weights32 = torch.rand(T, K)
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    leaves32 = [t.clone().requires_grad_() for t in (x32, weights32, gate_up32, down32)]
    y32, _ = dropless_dispatch(leaves32[0], leaves32[1], experts, *leaves32[2:], impl="loop")
    grads32 = torch.autograd.grad(y32.square().sum(), leaves32)
    if autocast:
        leaves = [t.clone().requires_grad_() for t in (x32, weights32, gate_up32, down32)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = dropless_dispatch(leaves[0], leaves[1], experts, *leaves[2:], impl=impl)
    else:
        leaves = [t.to(torch.bfloat16).requires_grad_() for t in (x32, weights32, gate_up32, down32)]
        y, _ = dropless_dispatch(leaves[0], leaves[1], experts, *leaves[2:], impl=impl)
    grads = torch.autograd.grad(y.float().square().sum(), leaves)
    assert y.dtype == leaves[0].dtype and all(g.dtype == t.dtype for g, t in zip(grads, leaves))

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert rel(y.detach(), y32.detach()) < 2e-2
    for g, g32 in zip(grads, grads32):
        assert rel(g, g32) < 3e-2


def test_auto_dispatch_choice():
    """fp32 on CPU: the loop; bf16 on CPU: padded_bmm while padding (per bucket of experts sorted by
    count) wastes little, more allowed for small experts, else grouped_mm."""

    def choice(x, counts):
        impl, plan = moe_mod._auto_impl(x, counts)
        assert (plan is not None) == (impl == "padded_bmm")
        return impl

    x32, x16 = torch.randn(8, D), torch.randn(8, D).to(torch.bfloat16)
    rows = moe_mod.SMALL_EXPERT_ROWS
    balanced, skewed = torch.tensor([4, 4, 4, 4]) * rows, torch.tensor([13, 1, 1, 1]) * rows
    small_skewed = torch.tensor([40, 10, 10, 10])  # 70 rows over 4 experts: padding 2.3x is still worth it
    assert choice(x32, balanced) == "loop"
    assert choice(x16, balanced) == "padded_bmm"
    assert choice(x16, skewed) == "grouped_mm"
    assert choice(x16, small_skewed) == "padded_bmm"
    # two loads of large experts: 1.33x padded to the overall largest count, 1.0x in two buckets of 4
    assert choice(x16, torch.tensor([500, 1000, 500, 1000, 500, 1000, 500, 1000])) == "padded_bmm"
    one_hot = torch.zeros(64, dtype=torch.long)
    one_hot[5] = 1000  # 64 small experts, one of them used: a bucket of 16 padded to 1000 rows, 16x
    assert choice(x16, one_hot) == "grouped_mm"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert choice(x32, balanced) == "padded_bmm"


def test_bucket_plan_pads_each_bucket_to_its_own_largest_count(monkeypatch):
    counts = torch.tensor([3, 90, 7, 50, 0, 64, 20, 1, 33, 12])  # 10 experts: 3 buckets of 4, 4, 2
    monkeypatch.setattr(padded_mod, "CAP_MULTIPLE", 1)
    plan = padded_mod.plan_buckets(counts.sort(descending=True).values)
    assert plan.per_bucket == 4 and plan.sizes() == [4, 4, 2]
    assert plan.caps == (90, 20, 1) and plan.assignments == 280
    assert plan.padded_rows() == 4 * 90 + 4 * 20 + 2 * 1
    monkeypatch.setattr(padded_mod, "CAP_MULTIPLE", 16)  # caps rounded up: few distinct matmul shapes
    assert padded_mod.plan_buckets(counts.sort(descending=True).values).caps == (96, 32, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_dispatch_with_empty_buckets_matches_the_loop(dtype):
    """Experts with no rows (here a whole bucket of them) get zero weight gradients, not garbage."""
    torch.manual_seed(0)
    T, K, E = 40, 2, 12
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    gate_up = (torch.randn(E, 2 * F_HIDDEN, D) * 0.2).to(dtype).requires_grad_()
    down = (torch.randn(E, D, F_HIDDEN) * 0.2).to(dtype).requires_grad_()
    weights = torch.rand(T, K, dtype=dtype)
    experts = torch.stack([torch.tensor([t % 3, 3 + t % 4]) for t in range(T)])  # experts 7-11 unused
    results = []
    for impl in ("loop", "padded_bmm"):
        y, counts = dropless_dispatch(x, weights, experts, gate_up, down, impl=impl)
        results.append((y, *torch.autograd.grad(y.float().square().sum(), (x, gate_up, down))))
    assert (counts[7:] == 0).all()
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-6  # relative L2 error, loop against padded
    for a, b in zip(*results):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < tolerance
    assert (results[1][2][7:] == 0).all() and (results[1][3][7:] == 0).all()


def _sigmoid_router(**kw):
    router = SigmoidGroupTopKRouter(d_model=D, n_experts=16, top_k=4, **kw)
    _randomize(router, std=0.5)
    return router


def test_group_limited_routing_only_picks_experts_in_chosen_groups():
    router = _sigmoid_router(n_groups=4, topk_groups=2)
    x = torch.randn(2, 50, D)
    routing = router(x)
    groups_TK = routing.experts_TK // 4
    assert (torch.tensor([len(set(row.tolist())) for row in groups_TK]) <= 2).all()
    # And they are the groups with the best top-2 sums, recomputed here.
    scores = torch.sigmoid(x.reshape(-1, D) @ router.weight.T)
    best = scores.view(-1, 4, 4).topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
    for chosen, allowed in zip(groups_TK, best):
        assert set(chosen.tolist()) <= set(allowed.tolist())
    # Without the limit some tokens do use more than 2 groups: the check above could fail.
    free = _sigmoid_router(n_groups=1, topk_groups=1)
    free.load_state_dict(router.state_dict())
    assert max(len(set((row // 4).tolist())) for row in free(x).experts_TK) > 2


def test_correction_bias_changes_choice_not_weights():
    router = _sigmoid_router(norm_topk_prob=False)
    x = torch.randn(1, 40, D)
    before = router(x)
    router.e_score_correction_bias[3] = 10.0  # force expert 3 into every token's top-k
    after = router(x)
    assert (after.experts_TK == 3).any(dim=-1).all()
    assert not torch.equal(before.experts_TK.sort(-1).values, after.experts_TK.sort(-1).values)
    scores = torch.sigmoid(x.reshape(-1, D) @ router.weight.T)
    # Weights are the unbiased sigmoid scores of the chosen experts.
    torch.testing.assert_close(after.weights_TK, scores.gather(1, after.experts_TK))


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_norm_topk_prob_makes_weights_sum_to_scaling_factor(scale):
    router = _sigmoid_router(norm_topk_prob=True, routed_scaling_factor=scale)
    weights = router(torch.randn(2, 30, D)).weights_TK
    torch.testing.assert_close(weights.sum(-1), torch.full((60,), scale))


def test_bias_update_moves_toward_balance():
    router = _sigmoid_router(bias_update_rate=0.01)
    load = torch.tensor([10.0] * 8 + [0.0] * 8)
    router.update_bias(load)
    assert torch.equal(router.e_score_correction_bias, torch.tensor([-0.01] * 8 + [0.01] * 8))


def test_bias_stays_fp32_in_a_bf16_model():
    router = _sigmoid_router(bias_update_rate=1e-3).to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16 and router.e_score_correction_bias.dtype == torch.float32
    router.e_score_correction_bias.fill_(1.0)
    router.update_bias(torch.tensor([1.0] + [0.0] * 15))
    assert router.e_score_correction_bias[0].item() == pytest.approx(1.0 - 1e-3)  # bf16 would round to 1.0


@pytest.mark.parametrize("router_cls", [SoftmaxTopKRouter, SigmoidGroupTopKRouter])
def test_routing_stays_fp32_under_bf16_autocast(router_cls):
    """Autocast would run the router's linear in bf16 (the .float() casts do not stop it); in this
    64-expert top-6 case that changed the expert set of 2% (softmax) and 12% (grouped) of tokens."""
    torch.manual_seed(0)
    kwargs = {} if router_cls is SoftmaxTopKRouter else {"n_groups": 8, "topk_groups": 4}
    router = router_cls(d_model=64, n_experts=64, top_k=6, **kwargs)
    _randomize(router)
    x = torch.randn(2, 128, 64)
    reference = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x)
    assert routing.weights_TK.dtype == routing.probs_TE.dtype == torch.float32
    assert torch.equal(routing.experts_TK, reference.experts_TK)
    assert torch.equal(routing.weights_TK, reference.weights_TK)


def test_softmax_router_balance_and_z_loss_closed_form():
    router = SoftmaxTopKRouter(d_model=D, n_experts=4, top_k=2, balance_loss_weight=0.1, z_loss_weight=0.01)
    _randomize(router)
    x = torch.randn(2, 25, D)
    routing = router(x)
    logits = x.reshape(-1, D) @ router.weight.T
    probs = logits.softmax(-1)
    frac = torch.bincount(probs.topk(2).indices.flatten(), minlength=4).float() / (50 * 2)
    balance = 0.1 * 4 * (frac * probs.mean(0)).sum()
    z = 0.01 * logits.logsumexp(-1).square().mean()
    torch.testing.assert_close(routing.aux_loss, balance + z)


def test_sequence_aux_loss_closed_form():
    router = _sigmoid_router(seq_aux_loss_weight=0.5)
    x = torch.randn(3, 20, D)
    routing = router(x)
    scores = torch.sigmoid(x.reshape(3, 20, D) @ router.weight.T)  # (B, S, E)
    normed = scores / scores.sum(-1, keepdim=True)
    chosen = routing.experts_TK.view(3, 20, 4)
    loss = 0.0
    for b in range(3):
        f = torch.bincount(chosen[b].flatten(), minlength=16).float() * 16 / (4 * 20)
        loss += (f * normed[b].mean(0)).sum()
    torch.testing.assert_close(routing.aux_loss, 0.5 * loss / 3)


def test_model_reports_router_stats_and_updates_biases():
    spec = ModelSpec(vocab_size=64, d_model=D, n_layers=2, max_seq_len=32, attention=MHASpec(n_heads=4),
                     ffn=MoESpec(n_experts=4, top_k=2, d_expert=16,
                                 router=SigmoidGroupTopKRouterSpec(bias_update_rate=0.1)))
    model = zoo.build(spec)
    ids = torch.randint(0, 64, (2, 32))
    out = model(ids, labels=ids)
    assert sorted(out.router_stats) == [0, 1]
    for stats in out.router_stats.values():
        assert stats.load_E.sum() == 2 * 32 * 2
        mean = stats.load_E.mean()
        assert stats.max_vio == pytest.approx(((stats.load_E.max() - mean) / mean).item())
        assert 0 < stats.entropy <= torch.log(torch.tensor(4.0)) + 1e-6
    loads = {i: s.load_E for i, s in out.router_stats.items()}
    model.update_routing_biases(loads)
    bias = model.layers[0].ffn.router.e_score_correction_bias
    expected = 0.1 * torch.sign(loads[0].mean() - loads[0])
    torch.testing.assert_close(bias, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_forms_agree(dtype):
    """The CPU (bmm) and CUDA (multiply and sum) forms of the weighted sum over K, values and grads."""
    torch.manual_seed(0)
    out = torch.randn(37, 6, 24, dtype=dtype, requires_grad=True)
    weights = torch.rand(37, 6, requires_grad=True)
    results = []
    for bmm in (True, False):
        y = moe_mod._combine(out, weights, bmm=bmm)
        grads = torch.autograd.grad((y.float() * torch.linspace(-1, 1, 24)).sum(), (out, weights))
        results.append((y, *grads))
    reference = (out.float() * weights.unsqueeze(-1)).sum(1)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    for a, b in zip(*results):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    torch.testing.assert_close(results[1][0].float(), reference, **tol)


def test_misaligned_expert_widths_never_take_grouped_mm():
    """torch._grouped_mm needs 16-byte rows: in bf16 a 41-wide expert (exp3's 341 and 205 alike) on
    skewed loads, where grouped_mm would otherwise be chosen, runs the loop and still tracks fp32;
    asking for grouped_mm by name is a ValueError naming the widths."""
    torch.manual_seed(0)
    T, K, E, F_odd = 64, 2, 32, 41
    x, weights = torch.randn(T, D), torch.rand(T, K)
    gate_up, down = torch.randn(E, 2 * F_odd, D) * 0.2, torch.randn(E, D, F_odd) * 0.2
    experts = torch.stack([torch.tensor([0, 1 + t % 31]) for t in range(T)])  # expert 0 takes every token
    skewed = torch.bincount(experts.reshape(-1), minlength=E)
    assert moe_mod._auto_impl(x.bfloat16(), skewed, aligned=True)[0] == "grouped_mm"
    assert moe_mod._auto_impl(x.bfloat16(), skewed, aligned=False)[0] == "loop"
    assert not moe_mod._grouped_mm_aligned(torch.bfloat16, D, F_odd) and moe_mod._grouped_mm_aligned(torch.bfloat16, D, 48)
    y32, _ = dropless_dispatch(x, weights, experts, gate_up, down, impl="loop")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = dropless_dispatch(x, weights, experts, gate_up, down)
    assert ((y.float() - y32).norm() / y32.norm()).item() < 2e-2
    with pytest.raises(ValueError, match="multiples of 8.*41"):
        dropless_dispatch(x.bfloat16(), weights, experts, gate_up.bfloat16(), down.bfloat16(), impl="grouped_mm")
