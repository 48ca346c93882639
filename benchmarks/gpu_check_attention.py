"""gpu_check's flash section: SDPA's FLASH_ATTENTION backend on our MHA/GQA/MLA blocks (bf16, forward
+ backward): which shapes it accepts, which backend runs by default, agreement with the math backend
and an fp32 reference, timings; for MLA with qk dim != v dim also the padded-v variant.

Shapes: B = batch, T = positions, D = d_model; q, k, v are (B, H, T, Dk|Dv) as zoo.blocks.sdpa has them."""

from __future__ import annotations

import copy
import re
import types
import warnings
from contextlib import contextmanager

from benchmarks import gpu_check_common as common
from benchmarks.gpu_check_common import BF16_TOL, cuda_time_ms, note, rel_err, say
from benchmarks.gpu_check_train import TRAIN_PRESET

BACKEND_NAMES = {0: "MATH", 1: "FLASH_ATTENTION", 2: "EFFICIENT_ATTENTION", 3: "CUDNN_ATTENTION", 4: "OVERRIDEABLE"}


@contextmanager
def patched_sdpa(module, wrapper):
    """Route `module`'s `F.scaled_dot_product_attention` through wrapper(orig, *args, **kwargs)."""
    import torch.nn.functional as F

    orig_F = module.F
    proxy = types.ModuleType("F_proxy")
    proxy.__dict__.update(F.__dict__)
    proxy.scaled_dot_product_attention = lambda *a, **k: wrapper(F.scaled_dot_product_attention, *a, **k)
    module.F = proxy
    try:
        yield
    finally:
        module.F = orig_F


def padded_v_sdpa(orig, q, k, v, **kw):
    """The suggested MLA fix: zero-pad v to q's head dim so FLASH_ATTENTION accepts it, then slice."""
    import torch.nn.functional as F

    dv, dq = v.shape[-1], q.shape[-1]
    if dv == dq:
        return orig(q, k, v, **kw)
    if dv < dq:
        return orig(q, k, F.pad(v, (0, dq - dv)), **kw)[..., :dv]
    return orig(q, k, v, **kw)


def attention_cases():
    """(label, RunSpec) pairs: the presets' attention shapes (the ~0.5B training run's MLA included)
    plus a DeepSeek-V3-ratio MLA (qk 192, v 128)."""
    from zoo import presets
    from zoo.overrides import with_changes

    cases, seen = [], set()
    for name in presets.names():
        spec = presets.get(name)
        key = spec.model.attention.model_dump_json() + str(spec.model.d_model)
        if key in seen:
            continue
        seen.add(key)
        cases.append((name, spec))
    big = presets.get(TRAIN_PRESET)  # in the loop above: the ~0.5B training run's MLA (qk 96 / v 64)
    v3 = with_changes(big, {"model.attention.qk_nope_head_dim": 128, "model.attention.qk_rope_head_dim": 64,
                            "model.attention.v_head_dim": 128, "model.attention.n_heads": 8})
    cases.append(("v3-ratio mla (qk 192 / v 128)", v3))
    gqa = with_changes(presets.get("glm4"), {"model.d_model": 1024, "model.attention.n_heads": 16,
                                             "model.attention.n_kv_heads": 4, "model.attention.head_dim": 128})
    cases.append(("gqa 16/4 heads, head_dim 128", gqa))
    return cases


def build_attention(spec):
    """Layer 0's attention block, built by our builders (one layer of the preset)."""
    import zoo
    from zoo.overrides import with_changes

    one = with_changes(spec, {"model.n_layers": 1, "model.first_k_dense": 0, "model.vocab_size": 512,
                              "model.ffn": {"kind": "mlp", "d_hidden": 64}})
    return zoo.build(one).layers[0].attention


def run_attention(block, x, g, backends):
    """Forward + backward under `backends` (None: default choice); returns (out, grads) or raises."""
    from torch.nn.attention import sdpa_kernel

    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    if backends is None:
        out = block(x)
        out.backward(g)
    else:
        with sdpa_kernel(backends):
            out = block(x)
            out.backward(g)
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in block.named_parameters() if p.grad is not None})
    return out.detach(), grads


def section_flash(args) -> None:
    import torch
    from torch.nn.attention import SDPBackend

    import zoo.blocks.sdpa as sdpa_mod  # MHA and MLA both call SDPA through zoo.blocks.sdpa

    B, T = (4, 1024) if common.DEV == "cuda" else (1, 64)
    for label, spec in attention_cases():
        try:
            att = spec.model.attention
            torch.manual_seed(0)  # before the build: the weights, not only x and g, are the same every run
            block32 = build_attention(spec).to(common.DEV)
            block = copy.deepcopy(block32).to(torch.bfloat16)
            module = sdpa_mod
            x = torch.randn(B, T, spec.model.d_model, device=common.DEV)
            g = torch.randn(B, T, spec.model.d_model, device=common.DEV)
            if att.kind == "mla":
                dims = f"mla H={att.n_heads} qk={att.qk_nope_head_dim + att.qk_rope_head_dim} v={att.v_head_dim}"
            else:
                H = att.n_heads
                dims = f"mha H={H} G={att.n_kv_heads or H} Dh={att.head_dim or spec.model.d_model // H}"

            # Which backend SDPA picks by default for these q, k, v.
            chosen = []

            def spy(orig, q, k, v, **kw):
                try:
                    idx = torch._fused_sdp_choice(q, k, v, attn_mask=kw.get("attn_mask"), dropout_p=kw.get("dropout_p", 0.0),
                                                  is_causal=kw.get("is_causal", False), scale=kw.get("scale"),
                                                  enable_gqa=kw.get("enable_gqa", False))
                    chosen.append(BACKEND_NAMES.get(int(idx), str(idx)))
                except Exception as err:  # private API; best effort
                    chosen.append(f"unknown ({type(err).__name__})")
                return orig(q, k, v, **kw)

            with patched_sdpa(module, spy):
                block(x.to(torch.bfloat16))
            default = chosen[0] if chosen else "?"

            ref_out, ref_grads = run_attention(block32, x, g, [SDPBackend.MATH])  # fp32 reference
            xb, gb = x.to(torch.bfloat16), g.to(torch.bfloat16)
            results = {}
            for name, backends in (("math", [SDPBackend.MATH]), ("flash", [SDPBackend.FLASH_ATTENTION]),
                                   ("efficient", [SDPBackend.EFFICIENT_ATTENTION]), ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
                                   ("default", None)):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        out, grads = run_attention(block, xb, gb, backends)
                    except RuntimeError as err:
                        reasons = [str(w.message).split("\n")[0] for w in caught
                                   if "kernel" in str(w.message).lower() or "requires" in str(w.message).lower()
                                   or "not" in str(w.message).lower()]
                        reasons = [re.sub(r"\s*\(Triggered internally[^)]*\)\.?", "", r).strip() for r in reasons]
                        reasons = [r for r in reasons if r and not r.endswith("because:")]
                        results[name] = ("REJECTED", "; ".join(dict.fromkeys(reasons))[:300] or str(err).split("\n")[0][:200])
                        continue
                err_out = rel_err(out, ref_out)
                err_grad = max(rel_err(grads[n], ref_grads[n]) for n in ref_grads)
                ms = cuda_time_ms(lambda b=backends, m=block: run_attention(m, xb, gb, b), warmup=2, reps=5)
                ok = err_out < BF16_TOL and err_grad < BF16_TOL
                results[name] = ("ok" if ok else "MISMATCH", f"rel err out {err_out:.1e} grads {err_grad:.1e} (vs fp32 math); fwd+bwd {ms:.2f} ms")
            if att.kind == "mla" and att.qk_nope_head_dim + att.qk_rope_head_dim != att.v_head_dim:
                try:
                    with patched_sdpa(sdpa_mod, padded_v_sdpa):
                        out, grads = run_attention(block, xb, gb, [SDPBackend.FLASH_ATTENTION])
                        err_out = rel_err(out, ref_out)
                        err_grad = max(rel_err(grads[n], ref_grads[n]) for n in ref_grads)
                        ms = cuda_time_ms(lambda m=block: run_attention(m, xb, gb, [SDPBackend.FLASH_ATTENTION]),
                                          warmup=2, reps=5)
                    ok = err_out < BF16_TOL and err_grad < BF16_TOL
                    results["flash+pad v"] = ("ok" if ok else "MISMATCH",
                                              f"rel err out {err_out:.1e} grads {err_grad:.1e}; fwd+bwd {ms:.2f} ms")
                except RuntimeError as err:
                    results["flash+pad v"] = ("REJECTED", str(err).split("\n")[0][:200])
            flash = results["flash"][0]
            verdict = {"ok": "FLASH OK", "REJECTED": "flash REJECTED (falls back)", "MISMATCH": "flash MISMATCH"}[flash]
            note(f"flash [{label}] {dims} B={B} T={T} bf16 causal: {verdict}; default backend {default}")
            for name, (status, detail) in results.items():
                say(f"      {name:12s} {status:9s} {detail}")
            del block, block32
            if common.DEV == "cuda":
                torch.cuda.empty_cache()
        except Exception as err:
            note(f"flash [{label}]: FAILED {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
