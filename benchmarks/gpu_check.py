"""One-GPU health and speed check of Blueberry Zoo: `bash benchmarks/gpu_check.sh` (or this file).

Sections (each fails on its own, with one line, and the rest still run):
  env       device, driver-visible memory, torch and CUDA versions
  matmul    bf16 dense matmul TFLOP/s, 8192^3, mean of timed reps after warm-up (CUDA events)
  flash     SDPA's FLASH_ATTENTION backend on our MHA/GQA/MLA blocks (bf16, forward + backward):
            which shapes it accepts, which backend runs by default, agreement with the math backend
            and an fp32 reference, timings; for MLA with qk dim != v dim also the padded-v variant
  grouped   `dropless_dispatch`'s torch._grouped_mm path (CUDA bf16) against the per-expert loop
            (bf16) and an fp32 loop reference, forward and backward, and both timed
  pytest    tests/test_devices.py (the CUDA paths against fp32 references), tests/test_moe.py and
            tests/test_attention.py under this machine's torch
  trainstep benchmarks/train_step.py on perf_0p5b (~0.5B total parameters) in bf16: the zoo against
            transformers' DeepseekV3ForCausalLM (grouped_mm experts, SDPA), tokens/s, MFU, memory
  train     the real trainer (training/run.py, DeepSpeed, ZeRO-1, bf16) at ~0.5B total parameters:
            tokens/s and MFU as the trainer prints them

Exit status: 0 when CUDA is there (whatever the sections found; read the report), 2 without CUDA.
Options: --sections a,b,c   --train-steps N   --train-timeout S   --trainstep-timeout S   --micro-batch N   --compile
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
import types
import warnings
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SECTIONS = ("env", "matmul", "flash", "grouped", "pytest", "trainstep", "train")
RESULTS: list[str] = []  # one line per figure, reprinted in the summary
BF16_TOL = 2e-2  # relative L2 error vs an fp32 reference that bf16 results must stay under
DEV = "cuda"  # "cpu" only with --cpu-smoke (a developer's dry run of the code paths, no real figures)


def say(text: str = "") -> None:
    print(text, flush=True)


def note(line: str) -> None:
    """A figure for the report: printed now and repeated in the summary."""
    RESULTS.append(line)
    say("  " + line)


def header(title: str) -> None:
    say(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


def rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def cuda_time_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Mean milliseconds per call of fn, CUDA events around `reps` calls after `warmup` calls."""
    import torch

    if DEV != "cuda":
        for _ in range(warmup):
            fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) * 1e3 / reps
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


# --------------------------------------------------------------------------------------------- env
def section_env(args) -> None:
    import torch

    props = torch.cuda.get_device_properties(0)
    note(f"device: {torch.cuda.get_device_name(0)}, {props.multi_processor_count} SMs, "
         f"{props.total_memory / 2**30:.1f} GiB, capability {props.major}.{props.minor}")
    note(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
         f"python {sys.version.split()[0]}")
    versions = []
    for name in ("deepspeed", "pydantic", "fiddle", "datasets", "pyarrow", "sentencepiece", "transformers"):
        try:
            from importlib.metadata import version

            versions.append(f"{name} {version(name)}")
        except Exception:
            versions.append(f"{name} MISSING")
    note("packages: " + ", ".join(versions))


# ------------------------------------------------------------------------------------------ matmul
def section_matmul(args) -> None:
    import torch

    from benchmarks.common import measured_cuda_peak
    from training.mfu import peak_flops

    n = 8192
    flops = measured_cuda_peak(torch.bfloat16, torch.device("cuda"), size=n, reps=10)
    note(f"matmul bf16 {n}^3: {flops / 1e12:.0f} TFLOP/s ({2 * n**3 / flops * 1e3:.2f} ms mean of 10 after 3 warm-ups, "
         "random data)")

    note(f"trainer's MFU peak for this GPU: {peak_flops(torch.bfloat16, torch.device('cuda')) / 1e12:.0f} TFLOP/s (training/mfu.py)")


# ------------------------------------------------------------------------------------------- flash
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
    import torch
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

    B, T = (4, 1024) if DEV == "cuda" else (1, 64)
    for label, spec in attention_cases():
        try:
            att = spec.model.attention
            block32 = build_attention(spec).to(DEV)
            block = copy.deepcopy(block32).to(torch.bfloat16)
            module = sdpa_mod
            torch.manual_seed(0)
            x = torch.randn(B, T, spec.model.d_model, device=DEV)
            g = torch.randn(B, T, spec.model.d_model, device=DEV)
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
                ms = cuda_time_ms(lambda b=backends: run_attention(block, xb, gb, b), warmup=2, reps=5)
                ok = err_out < BF16_TOL and err_grad < BF16_TOL
                results[name] = ("ok" if ok else "MISMATCH", f"rel err out {err_out:.1e} grads {err_grad:.1e} (vs fp32 math); fwd+bwd {ms:.2f} ms")
            if att.kind == "mla" and att.qk_nope_head_dim + att.qk_rope_head_dim != att.v_head_dim:
                try:
                    with patched_sdpa(sdpa_mod, padded_v_sdpa):
                        out, grads = run_attention(block, xb, gb, [SDPBackend.FLASH_ATTENTION])
                        err_out = rel_err(out, ref_out)
                        err_grad = max(rel_err(grads[n], ref_grads[n]) for n in ref_grads)
                        ms = cuda_time_ms(lambda: run_attention(block, xb, gb, [SDPBackend.FLASH_ATTENTION]), warmup=2, reps=5)
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
            if DEV == "cuda":
                torch.cuda.empty_cache()
        except Exception as err:
            note(f"flash [{label}]: FAILED {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")


# ----------------------------------------------------------------------------------------- grouped
def routing(T, E, K, device, active_experts=None, seed=0):
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(T, E, device=device, generator=gen)
    if active_experts is not None:
        logits[:, active_experts:] = -1e9  # leave experts with no tokens at all
    weights, experts = logits.softmax(-1).topk(K, dim=-1)
    return weights, experts


def dispatch_call(moe_mod, grouped: bool, x, w, ex, gu, dn, gy):
    """Forward + backward of dropless_dispatch; grouped=False forces the per-expert loop."""
    saved = moe_mod._grouped_mm_available
    if not grouped:
        moe_mod._grouped_mm_available = lambda t: False
    try:
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, gu, dn)]
        y, counts = moe_mod.dropless_dispatch(leaves[0], leaves[1], ex, leaves[2], leaves[3])
        if gy is not None:
            y.backward(gy)
        return y.detach(), [t.grad for t in leaves] if gy is not None else None, counts
    finally:
        moe_mod._grouped_mm_available = saved


def time_dispatch(moe_mod, grouped, x, w, ex, gu, dn, gy, backward):
    import torch

    saved = moe_mod._grouped_mm_available
    if not grouped:
        moe_mod._grouped_mm_available = lambda t: False
    try:
        leaves = [t.detach().clone().requires_grad_(backward) for t in (x, w, gu, dn)]

        def step():
            y, _ = moe_mod.dropless_dispatch(leaves[0], leaves[1], ex, leaves[2], leaves[3])
            if backward:
                torch.autograd.backward(y, gy)

        return cuda_time_ms(step, warmup=3, reps=10)
    finally:
        moe_mod._grouped_mm_available = saved


def section_grouped(args) -> None:
    import torch

    import zoo.blocks.moe as moe_mod

    if not hasattr(torch, "_grouped_mm"):
        note("grouped: torch has no _grouped_mm: dropless_dispatch always takes the per-expert loop")
        return
    cases = [  # label, T tokens, D, E, K, F, experts that receive tokens (None: all)
        ("W2-like", 8192, 384, 64, 6, 128, None),
        ("W2-like, 24 of 64 experts empty", 2048, 384, 64, 6, 128, 40),
        ("big", 16384, 1024, 64, 6, 512, None),
    ]
    names = ("y", "dx", "dweights", "dgate_up", "ddown")
    if DEV != "cuda":
        cases = [(label, 256, 64, 8, 2, 32, 6 if active else None) for label, *_, active in cases[:2]]
    for label, T, D, E, K, Fh, active in cases:
        try:
            torch.manual_seed(0)
            dev = DEV
            w, ex = routing(T, E, K, dev, active)
            x = torch.randn(T, D, device=dev)
            gu = torch.randn(E, 2 * Fh, D, device=dev) * D**-0.5
            dn = torch.randn(E, D, Fh, device=dev) * Fh**-0.5
            gy = torch.randn(T, D, device=dev)
            ref_y, ref_g, counts = dispatch_call(moe_mod, False, x, w, ex, gu, dn, gy)  # fp32: loop path
            bf = [t.to(torch.bfloat16) for t in (x, w, gu, dn, gy)]
            errs = {}
            for path, grouped in (("grouped", True), ("loop", False)):
                y, grads, _ = dispatch_call(moe_mod, grouped, bf[0], bf[1], ex, bf[2], bf[3], bf[4])
                errs[path] = [rel_err(y, ref_y)] + [rel_err(a, b) for a, b in zip(grads, ref_g)]
                errs[path] = dict(zip(("y", "dx", "dweights", "dgate_up", "ddown"), errs[path]))
            # grouped vs loop directly (both bf16)
            yg, gg, _ = dispatch_call(moe_mod, True, bf[0], bf[1], ex, bf[2], bf[3], bf[4])
            yl, gl, _ = dispatch_call(moe_mod, False, bf[0], bf[1], ex, bf[2], bf[3], bf[4])
            direct = dict(zip(names, [rel_err(yg, yl)] + [rel_err(a, b) for a, b in zip(gg, gl)]))
            worst_g = max(errs["grouped"].values())
            worst_l = max(errs["loop"].values())
            ok = worst_g < BF16_TOL and max(direct.values()) < BF16_TOL
            empty = int((counts == 0).sum())
            note(f"grouped [{label}] T={T} D={D} E={E} K={K} F={Fh} ({empty} empty experts): "
                 f"{'EQUAL' if ok else 'MISMATCH'} within bf16 tol {BF16_TOL:g}: worst rel err vs fp32 grouped "
                 f"{worst_g:.1e}, loop {worst_l:.1e}; grouped vs loop {max(direct.values()):.1e}")
            say("      grouped vs fp32: " + ", ".join(f"{k} {v:.1e}" for k, v in errs["grouped"].items()))
            say("      loop    vs fp32: " + ", ".join(f"{k} {v:.1e}" for k, v in errs["loop"].items()))
            say("      grouped vs loop: " + ", ".join(f"{k} {v:.1e}" for k, v in direct.items()))
            A = T * K
            flops_fwd = 6 * A * D * Fh
            t = {}
            for path, grouped in (("grouped", True), ("loop", False)):
                t[path] = (time_dispatch(moe_mod, grouped, *bf[:2], ex, *bf[2:4], bf[4], False),
                           time_dispatch(moe_mod, grouped, *bf[:2], ex, *bf[2:4], bf[4], True))
            note(f"grouped [{label}] timings bf16: grouped fwd {t['grouped'][0]:.2f} ms, fwd+bwd {t['grouped'][1]:.2f} ms "
                 f"({flops_fwd * 3 / (t['grouped'][1] * 1e-3) / 1e12:.0f} TFLOP/s expert matmuls); loop fwd "
                 f"{t['loop'][0]:.2f} ms, fwd+bwd {t['loop'][1]:.2f} ms; speed-up fwd+bwd {t['loop'][1] / t['grouped'][1]:.1f}x")
            if DEV == "cuda":
                torch.cuda.empty_cache()
        except Exception as err:
            note(f"grouped [{label}]: FAILED {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
            traceback.print_exc(limit=3)


# ------------------------------------------------------------------------------------------ pytest
def section_pytest(args) -> None:
    files = ["tests/test_devices.py", "tests/test_moe.py", "tests/test_attention.py"]  # test_devices: the CUDA paths
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    say("  $ " + " ".join(cmd[1:]))
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.pytest_timeout,
                              env={**os.environ, "PYTHONPATH": _pythonpath()})
    except subprocess.TimeoutExpired:
        note(f"pytest: TIMED OUT after {args.pytest_timeout} s")
        return
    tail = [line for line in proc.stdout.splitlines() if line.strip()]
    for line in tail[-15:]:
        say("      " + line)
    summary = tail[-1] if tail else proc.stderr.strip().splitlines()[-1:]
    note(f"pytest {' '.join(files)}: exit {proc.returncode}: {summary}")


def _pythonpath() -> str:
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([*parts, str(REPO)] if str(REPO) not in parts else parts)


# ------------------------------------------------------------------------------------------- train
# ~0.5B total parameters (~0.1B active) on the built-in corpus: the perf_0p5b preset (MLA attention,
# 64 experts top-6, T 1024).
TRAIN_PRESET = "perf_0p5b"


def train_sets(args) -> dict:
    sets = {}
    sets.update({
        "train.micro_batch_size": args.micro_batch,
        "train.steps": args.train_steps,
        "train.warmup_steps": 5,
        "train.log_every": 5,
        "train.eval_every": 10**6,
        "train.ckpt_every": 10**6,
        "train.keep_last": 1,
        "train.precision": "bf16",
        "deepspeed.zero_stage": 1,
        "eval.val_batches": 2,
    })
    if args.compile:
        sets["train.compile"] = True
    return sets


class GpuPoller:
    """Samples nvidia-smi's memory.used (MiB) and utilization.gpu (%) every 2 s in a thread."""

    def __init__(self):
        import threading

        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        import shutil

        if shutil.which("nvidia-smi"):
            self._thread.start()

    def stop(self):
        self._stop.set()

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=10).stdout
                mem, util = (float(v) for v in out.strip().split(","))
                self.samples.append((mem, util))
            except Exception:
                pass
            self._stop.wait(2.0)


def _datasets_stub_dir() -> str | None:
    """training/corpus.py imports `datasets` at the top but needs it only for hub/json/parquet sources;
    when it cannot be imported here, give the trainer a stub so the built-in corpus still works."""
    probe = subprocess.run([sys.executable, "-c", "import datasets"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": _pythonpath()})
    if probe.returncode == 0:
        return None
    reason = (probe.stderr.strip().splitlines() or ["?"])[-1]
    stub = Path("/tmp/gpu_check_datasets_stub/datasets")
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text(
        "def load_dataset(*a, **k):\n    raise RuntimeError('datasets is a stub (gpu_check): builtin corpus only')\n")
    note(f"train: `import datasets` fails here ({reason[:150]}); the trainer runs with a stub (built-in corpus only)")
    return str(stub.parent)


def section_train(args) -> None:
    import json

    import torch

    from training.mfu import format_mfu

    sets = train_sets(args)
    try:
        from zoo.cli import resolve
        from zoo.describe import describe

        spec = resolve(TRAIN_PRESET, [], False)
        d = describe(spec, seq_len=1024)
        note(f"train model: {TRAIN_PRESET}: {d['total_params'] / 1e6:.0f}M total, "
             f"{d['active_params'] / 1e6:.0f}M active per token, {d['flops_per_token'] / 1e6:.0f} MFLOP/token forward at T=1024")
    except Exception as err:
        note(f"train model: describe failed: {type(err).__name__}: {str(err)[:200]}")
    out = Path(args.train_out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cmd = [sys.executable, "training/run.py", "--preset", TRAIN_PRESET, "--out", str(out)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    say("  $ " + " ".join(["python", *cmd[1:]]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ZOO_CACHE": os.environ.get("ZOO_CACHE", "/tmp/gpu_check_zoo_cache")}
    stub = _datasets_stub_dir()
    env["PYTHONPATH"] = os.pathsep.join(([stub] if stub else []) + [_pythonpath()])
    lines: list[str] = []
    poller = GpuPoller()
    poller.start()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    timed_out = False
    try:
        assert proc.stdout is not None
        deadline = start + args.train_timeout
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            if time.perf_counter() > deadline:
                timed_out = True
                break
            if not sel.select(timeout=1.0):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()
            if not line:
                break
            line = line.rstrip()
            lines.append(line)
            if line.strip():
                say("    | " + line[:400])
    finally:
        if timed_out or proc.poll() is None:
            import signal

            try:
                os.killpg(proc.pid, signal.SIGTERM if not timed_out else signal.SIGKILL)
            except ProcessLookupError:
                pass
        code = proc.wait()
        poller.stop()
    wall = time.perf_counter() - start
    steps = []
    for line in lines:
        m = re.search(r"step (\d+)/(\d+) loss ([\d.]+) tok/s ([\d,]+) mfu ([\d.]+)%", line)
        if m:
            steps.append((int(m[1]), float(m[3]), float(m[4].replace(",", "")), float(m[5])))
    status = "TIMED OUT" if timed_out else f"exit {code}"
    if steps:
        steady = [s for s in steps if s[0] > 1] or steps
        tps = statistics.median(s[2] for s in steady)
        mfu = statistics.median(s[3] for s in steady)
        note(f"train{' (compile)' if args.compile else ''}: {status} after {wall:.0f} s; logged steps "
             + ", ".join(f"{s[0]}: {s[2]:,.0f} tok/s {format_mfu(s[3] / 100)}" for s in steps))
        note(f"train{' (compile)' if args.compile else ''}: median over logged steps > 1: {tps:,.0f} tokens/s, "
             f"MFU {format_mfu(mfu / 100)} "
             f"(trainer's figures; loss {steps[0][1]:.2f} -> {steps[-1][1]:.2f})")
    else:
        errs = [line for line in lines if "error" in line.lower() or "Error" in line][-3:]
        note(f"train: {status} after {wall:.0f} s, no step logged; last lines: " + " / ".join((errs or lines[-3:]))[:400])
    for line in lines:
        if line.startswith("done:") or "start-up" in line or "val loss" in line:
            note("train: " + line[:300])
    if poller.samples:
        mem = max(m for m, _ in poller.samples)
        busy = [u for _, u in poller.samples if u > 0]
        note(f"train: nvidia-smi every 2 s during the run: peak memory used {mem / 1024:.1f} GiB, "
             f"mean utilisation {statistics.mean(busy) if busy else 0:.0f}% over {len(busy)} busy samples")


# ---------------------------------------------------------------------------------------- trainstep
def section_trainstep(args) -> None:
    import json

    from training.mfu import MFU_ABOVE_PEAK_NOTE, format_mfu

    out, profile = Path(args.train_out + "_trainstep.json"), Path(args.train_out + "_trainstep_profile.txt")
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--preset", TRAIN_PRESET, "--precisions", "bf16",
           "--hf-experts", "grouped_mm", "--hf-attention", "sdpa", "--reps", "10", "--json", str(out),
           "--profile", str(profile)]
    cmd += ["--set", f"train.micro_batch_size={args.micro_batch}"] + (["--compile"] if args.compile else [])
    say("  $ " + " ".join(["python", *cmd[1:]]))
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.trainstep_timeout,
                              env={**os.environ, "PYTHONPATH": _pythonpath()})
    except subprocess.TimeoutExpired:
        note(f"trainstep: TIMED OUT after {args.trainstep_timeout} s")
        return
    for line in (proc.stdout + proc.stderr).splitlines()[-25:]:
        say("    | " + line[:300])
    if proc.returncode or not out.exists():
        note(f"trainstep: exit {proc.returncode}; see the lines above")
        return
    result = json.loads(out.read_text())
    for row in result["results"].values():
        memory = row.get("peak_step_memory_bytes") or 0
        measured = f" (of the measured {row['peak_flops'] / 1e12:.0f} TFLOP/s)" if row.get("peak_flops") else ""
        datasheet = (f", {format_mfu(row['mfu_datasheet'])} of the datasheet's {row['datasheet_peak_flops'] / 1e12:.0f}"
                     " TFLOP/s" if row.get("mfu_datasheet") is not None else "")
        note(f"trainstep {TRAIN_PRESET} batch {args.micro_batch}x1024: {row['label']}: {row['step_ms']:.0f} ms/step, "
             f"{row['tokens_per_s']:,.0f} tokens/s, MFU {format_mfu(row['mfu'])}{measured}{datasheet}, "
             f"step memory {memory / 2**30:.1f} GiB")
        if row.get("mfu_above_peak"):
            note("trainstep: " + MFU_ABOVE_PEAK_NOTE)
    if "speedup" in result:
        note(f"trainstep: zoo / transformers speed {result['speedup']:.2f}x")
    if profile.exists():
        note(f"trainstep profile ({profile}): " + profile.read_text().splitlines()[0])


# -------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--train-timeout", type=int, default=100, help="seconds before the trainer is killed")
    p.add_argument("--pytest-timeout", type=int, default=60)
    p.add_argument("--trainstep-timeout", type=int, default=300)
    p.add_argument("--micro-batch", type=int, default=None, help="default: 32 on GPUs with >= 100 GiB, else 16 (seq 1024)")
    p.add_argument("--train-out", default="/tmp/gpu_check_run")
    p.add_argument("--compile", action="store_true", help="train with --set train.compile=true")
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # dry run of flash/grouped on CPU
    args = p.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")

    try:
        import torch
    except Exception as err:
        say(f"gpu_check: cannot import torch ({err}); nothing was measured")
        return 2
    global DEV
    if args.cpu_smoke:
        DEV = "cpu"
        say("gpu_check: --cpu-smoke: a dry run of the code paths on CPU; no figure below means anything")
        wanted = [s for s in wanted if s in ("flash", "grouped")]
        args.micro_batch = 1
    elif not torch.cuda.is_available():
        say(f"gpu_check: NO CUDA: torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no CUDA GPU "
            f"on {os.uname().nodename}; this check needs an NVIDIA GPU, nothing was measured")
        return 2
    if args.micro_batch is None and DEV == "cuda":
        args.micro_batch = 32 if torch.cuda.get_device_properties(0).total_memory >= 100 * 2**30 else 16
    torch.backends.cuda.matmul.allow_tf32 = False

    t0 = time.perf_counter()
    say(f"Blueberry Zoo GPU check, {time.strftime('%Y-%m-%d %H:%M:%S')}; sections: {', '.join(wanted)}")
    for name in wanted:
        header(name)
        s0 = time.perf_counter()
        try:
            globals()[f"section_{name}"](args)
        except Exception as err:
            note(f"{name}: FAILED {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
            traceback.print_exc(limit=4)
        say(f"  ({name}: {time.perf_counter() - s0:.1f} s)")
    header("summary")
    for line in RESULTS:
        say("  " + line)
    say(f"  total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
