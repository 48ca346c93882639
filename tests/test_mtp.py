"""Multi-token prediction in the model (zoo/blocks/mtp.py, DecoderLM): causality at every depth, depth 0
exactly the model without MTP, the loss as main + weight x mean(depth losses), the modules' own or shared
embedding and head, their MoE layers in the routing statistics, and the cached step equal to the full one."""

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo import presets
from zoo.blocks.lm_loss import linear_cross_entropy
from zoo.blocks.moe import MoE
from zoo.cli import main
from zoo.overrides import SpecError, apply_sets, diff, with_changes

T = 24
FP32_TOL = 1e-5  # the same math on different shapes: fp32 rounding only


def _model(name="deepseek_glm4", **mtp):
    spec = with_changes(presets.get(name, tiny=True).model, {f"mtp.{k}": v for k, v in mtp.items()})
    return zoo.build(spec), spec


@pytest.mark.parametrize("name", ["deepseek_glm4", pytest.param("glm4", marks=pytest.mark.slow)])  # MLA, GQA + MoE
def test_every_depth_is_causal(name):
    """Module k at position t sees tokens 0 .. t+k and predicts t+1+k: changing any later token changes
    none of its logits up to t (beyond fp32 rounding), while changing token t+k does change the logit at t."""
    model, spec = _model(name, depth=2)
    model.eval()
    ids = torch.randint(0, spec.vocab_size, (2, T))
    t = 10
    with torch.no_grad():
        base = model(ids, labels=ids).mtp_logits
        for k in range(1, 3):
            later = ids.clone()
            later[:, t + k + 1:] = (later[:, t + k + 1:] + 1) % spec.vocab_size
            seen = ids.clone()
            seen[:, t + k] = (seen[:, t + k] + 1) % spec.vocab_size
            after_later = model(later, labels=later).mtp_logits[k - 1]
            after_seen = model(seen, labels=seen).mtp_logits[k - 1]
            # (not bit for bit: the MoE groups rows by expert, and other tokens' routing changes the group sizes)
            torch.testing.assert_close(after_later[:, : t + 1], base[k - 1][:, : t + 1], atol=FP32_TOL, rtol=0,
                                       msg=f"depth {k} saw the future")
            assert (after_later[:, t + 1:] - base[k - 1][:, t + 1:]).abs().max() > 1e-4
            assert (after_seen[:, t] - base[k - 1][:, t]).abs().max() > 1e-4, f"depth {k} ignores token t+{k}"


def test_depth_zero_is_the_model_without_mtp_bit_for_bit():
    """Depth 0 computes what the model computed before MTP existed, op for op: embed, layers, final norm,
    head, cross-entropy of position t against token t+1, plus the MoE auxiliary losses."""
    model, spec = _model(depth=0)
    assert len(model.mtp) == 0 and spec.mtp.depth == 0
    ids = torch.randint(0, spec.vocab_size, (2, T))
    labels = ids.clone()
    labels[0, :5] = -100
    out, lean = model(ids, labels=labels), model(ids, labels=labels, return_logits=False)
    x = model.embed(ids)
    aux = torch.zeros(())
    for layer in model.layers:
        x = layer(x)
        if isinstance(layer.ffn, MoE):
            aux = aux + layer.ffn.pop_stats().aux_loss
    h = model.norm(x)
    logits = model.lm_head(h)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    next_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    lean_ce = linear_cross_entropy(h.flatten(0, 1), model.lm_head.weight, next_labels.flatten(), ignore_index=-100)
    assert torch.equal(out.logits, logits) and torch.equal(out.ce_loss, ce) and torch.equal(lean.ce_loss, lean_ce)
    assert torch.equal(out.aux_loss, aux) and torch.equal(out.loss, ce + aux) and torch.equal(lean.loss, lean_ce + aux)
    assert out.mtp_losses is None and out.mtp_logits is None


def test_mtp_leaves_the_main_model_alone_and_its_loss_decomposes():
    """With the main weights of a depth-0 model, a depth-2 model gives the same main logits and cross-entropy
    bit for bit; its loss is exactly main + aux + weight x the mean of the depths' cross-entropies, each
    the cross-entropy of module k's logits at t against token t+1+k."""
    plain, _ = _model(depth=0)
    model, spec = _model(depth=2, loss_weight=0.25)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(name.startswith("mtp.") for name in missing)
    ids = torch.randint(0, spec.vocab_size, (2, T))
    ref, out = plain(ids, labels=ids), model(ids, labels=ids)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.ce_loss, ref.ce_loss)
    assert out.mtp_losses.shape == (2,)
    assert [tuple(x.shape) for x in out.mtp_logits] == [(2, T - 1, spec.vocab_size), (2, T - 2, spec.vocab_size)]
    for k, logits in enumerate(out.mtp_logits, start=1):
        expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, k + 1:].flatten())
        torch.testing.assert_close(out.mtp_losses[k - 1], expected, rtol=0, atol=1e-6)
    assert torch.equal(out.loss, out.ce_loss + out.aux_loss + 0.25 * out.mtp_losses.mean())
    assert out.aux_loss > ref.aux_loss  # the MTP modules' MoE layers add theirs
    lean = model(ids, labels=ids, return_logits=False)  # the training path: no logits held
    torch.testing.assert_close(lean.mtp_losses, out.mtp_losses, rtol=0, atol=FP32_TOL)
    torch.testing.assert_close(lean.loss, out.loss, rtol=0, atol=FP32_TOL)


def test_mtp_moe_layers_are_numbered_after_the_main_ones_and_balance():
    model, spec = _model(depth=2)
    n = spec.n_layers
    assert sorted(model.moe_layers()) == [*range(spec.first_k_dense, n), n, n + 1]
    ids = torch.randint(0, spec.vocab_size, (2, T))
    out = model(ids, labels=ids)
    assert sorted(out.router_stats) == sorted(model.moe_layers())
    before = model.mtp[1].block.ffn.router.e_score_correction_bias.clone()
    model.update_routing_biases({i: s.load_E for i, s in out.router_stats.items()})
    assert not torch.equal(model.mtp[1].block.ffn.router.e_score_correction_bias, before)
    assert model(ids).router_stats.keys() == set(range(spec.first_k_dense, n))  # without labels: no MTP


@pytest.mark.slow
def test_own_embedding_and_head_are_used_and_trained_apart():
    shared, _ = _model(depth=1)
    own, spec = _model(depth=1, share_embedding=False, share_head=False)
    assert shared.mtp[0].embed is None and shared.mtp_head(1) is shared.lm_head
    assert own.mtp_embedding(1) is own.mtp[0].embed and own.mtp_head(1) is own.mtp[0].head
    assert len(own.vocab_parameters()) == 3 and len(shared.vocab_parameters()) == 1  # tied embed = head
    ids = torch.randint(0, spec.vocab_size, (2, T))
    own(ids, labels=ids).mtp_losses.sum().backward()
    assert own.mtp[0].embed.weight.grad.abs().sum() > 0 and own.mtp[0].head.weight.grad.abs().sum() > 0
    own.zero_grad()
    own(ids, labels=ids).ce_loss.backward()
    assert own.mtp[0].head.weight.grad is None


def test_cached_mtp_step_equals_the_full_one():
    model, spec = _model(depth=1)
    model.eval()
    h = torch.randn(2, T, spec.d_model)
    ids = torch.randint(0, spec.vocab_size, (2, T))
    cache = zoo.blocks.kv_cache.LayerCache()
    with torch.no_grad():
        full = model.mtp_step(1, h, ids)
        parts = [model.mtp_step(1, h[:, a:b], ids[:, a:b], cache=cache) for a, b in ((0, 10), (10, 13), (13, T))]
        torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=FP32_TOL, rtol=0)
        cache.truncate(12)  # drop the last positions, then feed them again
        again = model.mtp_step(1, h[:, 12:], ids[:, 12:], cache=cache)
    torch.testing.assert_close(again, full[:, 12:], atol=FP32_TOL, rtol=0)


def test_the_mtp_preset_is_the_default_plus_the_mtp_section():
    assert diff(presets.get("deepseek_glm4"), presets.get("deepseek_glm4_mtp")) == [("model.mtp.depth", 0, 1)]


def test_bad_mtp_settings_are_refused_naming_the_field(capsys):
    assert main(["show", "deepseek_glm4_mtp", "--set", "model.mtp.depth=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo: error:") and "model.mtp.depth" in err and err.count("\n") == 1, err
    spec = presets.get("deepseek_glm4", tiny=True)
    with pytest.raises(SpecError, match=r"model\.mtp\.depth"):
        apply_sets(spec, ["model.mtp.depth=-1"])
    with pytest.raises(SpecError, match=r"model\.mtp\.loss_weight"):
        apply_sets(spec, ["model.mtp.loss_weight=-0.1"])
    with pytest.raises(SpecError, match=r"data\.seq_len \(4\) leaves MTP module 3"):
        apply_sets(spec, ["model.mtp.depth=3", "data.seq_len=4"])
