"""One optimizer step of the trainer's loop, in this process: the validation numbers, the router
statistics it logs, and the routing biases moving on the whole accumulation window (and staying on a
skipped fp16 step)."""

import json
import math
import signal
import sys

import pytest
import torch

import zoo
from training import trainer
from zoo import presets
from zoo.overrides import with_changes

from _training import scalars
from _training import cache_dir, one_rank  # noqa: F401  (fixtures)


class _Engine:
    """What trainer.evaluate uses of a DeepSpeed engine: `module`, and calling it runs the module's forward."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _partly_predictable_batch(model, rows: int, length: int, generator) -> torch.Tensor:
    """Random tokens, but every other position holds the model's own argmax for it given the tokens before
    (causal: setting token t + 1 leaves the prediction at t as it was). An untrained model's accuracy on
    random tokens is ~1/V, where a misaligned accuracy would go unseen."""
    vocab = model.lm_head.weight.shape[0]
    batch = torch.randint(0, vocab, (rows, length), generator=generator)
    with torch.no_grad():
        for t in range(1, length, 2):
            batch[:, t] = model(batch[:, :t]).logits[:, -1].argmax(-1)
    return batch


def test_evaluate_is_token_weighted_cross_entropy_and_next_token_accuracy():
    spec = with_changes(presets.get("deepseek_glm4", tiny=True), {"train.precision": "fp32"})
    model = zoo.build(spec)
    g = torch.Generator().manual_seed(3)
    # Two batches of different sizes (3 x 24 and 1 x 16 tokens): a mean of per-batch means would weigh
    # the second batch's 15 targets like the first one's 69.
    batches = [_partly_predictable_batch(model, 3, 24, g), _partly_predictable_batch(model, 1, 16, g)]
    got = trainer.evaluate(_Engine(model), batches, torch.device("cpu"))
    assert model.training, "evaluate hands the model back in training mode"

    model.eval()
    nll, correct, wrong_alignment, count = 0.0, 0, 0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch).logits  # (B, T, V): position t predicts token t + 1
            targets = batch[:, 1:]
            nll += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum")
            correct += (logits[:, :-1].argmax(-1) == targets).sum().item()
            wrong_alignment += (logits[:, 1:].argmax(-1) == targets).sum().item()
            count += targets.numel()
    loss = nll.item() / count
    # fp32 throughout; the model's mean and this sum differ in summation order only (~1e-7 relative).
    assert got["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert got["val/ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert got["val/acc"] == correct / count
    # At least the 3 * 12 + 1 * 8 planted predictions are right; logits[:, 1:] (an untrained model with tied
    # embeddings mostly predicts the token it reads) scores otherwise, so a misaligned evaluate fails above.
    assert correct >= 44 and wrong_alignment != correct


def test_evaluate_max_vio_global_is_of_loads_summed_over_the_validation_set():
    """MaxVio_global (Wang et al. 2024) is one MaxVio of the loads summed over every batch, per MoE layer:
    not the mean of per-batch MaxVios, which is larger whenever batches are unbalanced in different ways."""
    spec = with_changes(presets.get("deepseek_glm4", tiny=True), {"train.precision": "fp32"})
    model = zoo.build(spec)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, spec.model.vocab_size, (2, 20), generator=g) for _ in range(3)]
    got = trainer.evaluate(_Engine(model), batches, torch.device("cpu"))

    model.eval()
    summed, per_batch = {}, {}
    with torch.no_grad():
        for batch in batches:
            for layer, stats in model(batch).router_stats.items():
                summed[layer] = summed.get(layer, 0) + stats.load_E.double()
                per_batch.setdefault(layer, []).append(stats.max_vio.item())
    assert summed, "the tiny deepseek_glm4 has MoE layers"
    for layer, load in summed.items():
        want = ((load.max() - load.mean()) / load.mean()).item()
        assert got[f"moe/layer_{layer}/max_vio_global"] == pytest.approx(want, rel=1e-6)
        assert want < sum(per_batch[layer]) / len(per_batch[layer])  # summing over batches evens loads out
    assert got["val/max_vio_global"] == pytest.approx(
        sum(got[f"moe/layer_{layer}/max_vio_global"] for layer in summed) / len(summed))


def test_evaluate_of_a_dense_model_has_no_max_vio():
    spec = with_changes(presets.get("exp1_mlp", tiny=True), {"train.precision": "fp32"})
    got = trainer.evaluate(_Engine(zoo.build(spec)), [torch.randint(0, 50, (1, 12))], torch.device("cpu"))
    assert not any("max_vio" in key for key in got)


def test_observer_logs_expert_loads_max_vio_entropy_and_bias_norm(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.observe import Observer
    from zoo.blocks.moe import RouterStats

    def stats(entropy):
        return RouterStats(load_E=torch.zeros(1), max_vio=torch.tensor(-1.0), entropy=torch.tensor(entropy),
                           aux_loss=torch.tensor(0.0))

    # Layer 1: a sigmoid router with a bias; layer 3: a softmax router, none. Loads summed over a step.
    loads = {1: torch.tensor([6.0, 2.0, 0.0, 4.0]), 3: torch.tensor([5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 9.0])}
    observer = Observer(tmp_path, total_steps=10, start_step=0, enabled=True)
    observer.routers(7, {1: stats(1.25), 3: stats(2.0)}, loads, {1: torch.tensor([0.003, -0.004, 0.0, 0.0])})
    observer.close()

    # MaxVio (Wang et al. 2024, arXiv:2408.15664, the loss-free balancing paper): max load / mean load - 1.
    expected = {
        "moe/layer_1/max_vio": 6 / 3 - 1, "moe/layer_3/max_vio": 9 / 5.5 - 1,
        "moe/layer_1/router_entropy": 1.25, "moe/layer_3/router_entropy": 2.0,
        "moe/layer_1/routing_bias_norm": 0.005,
        **{f"moe_load/layer_1/expert_{e}": share for e, share in enumerate([0.5, 1 / 6, 0.0, 1 / 3])},
        **{f"moe_load/layer_3/expert_{e}": 5 / 44 for e in range(7)}, "moe_load/layer_3/expert_7": 9 / 44,
    }
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected), "no other scalars; no bias norm for the softmax router"
    for tag, value in expected.items():
        (event,) = events.Scalars(tag)
        assert event.step == 7 and event.value == pytest.approx(value, rel=1e-6, abs=1e-7), tag  # float32
    histogram = events.Histograms("moe/layer_1/expert_share")[0].histogram_value
    assert (histogram.num, histogram.min, histogram.max) == (4, 0.0, 0.5)
    assert histogram.sum == pytest.approx(1.0) and histogram.sum_squares == pytest.approx(0.25 + 1 / 36 + 1 / 9)


def test_routing_biases_move_on_the_loads_of_the_whole_accumulation_window(one_rank, cache_dir, tmp_path, monkeypatch):
    """docs/training.md: the biases move once per optimizer step, on expert loads summed over the accumulation
    window. The trainer's loop, in this process, for one step of two micro-batches: the loads it hands to
    update_routing_biases are the sum of the two forwards' loads, and the bias moves by
    bias_update_rate * sign(mean load - load) of that sum (DeepSeek-V3's auxiliary-loss-free rule)."""
    from zoo.blocks.model import DecoderLM

    micro_loads, updates = [], []
    forward, update = DecoderLM.forward, DecoderLM.update_routing_biases

    def recording_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:  # not the validation at the end
            micro_loads.append({i: s.load_E.detach().clone() for i, s in out.router_stats.items()})
        return out

    def recording_update(self, loads):
        routers = {i: m.router for i, m in self.moe_layers().items()}
        before = {i: r.e_score_correction_bias.clone() for i, r in routers.items()}
        update(self, loads)
        updates.append(({i: load.clone() for i, load in loads.items()}, before,
                        {i: r.e_score_correction_bias.clone() for i, r in routers.items()}, routers))

    monkeypatch.setattr(DecoderLM, "forward", recording_forward)
    monkeypatch.setattr(DecoderLM, "update_routing_biases", recording_update)
    monkeypatch.setattr(trainer, "_save", lambda *args: None)  # checkpoints are tested elsewhere
    monkeypatch.setattr(trainer, "peak_flops", lambda dtype, device: math.nan)  # no MFU: no peak to measure
    for key, value in {**one_rank, "ZOO_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)  # OMP_NUM_THREADS: init_distributed leaves the thread count alone
    handlers = {sig: signal.getsignal(sig) for sig in trainer.StopFlag.SIGNALS}
    try:
        args = trainer.parse_args(["--tiny", "--out", str(tmp_path / "run"), "--set", "train.steps=1",
                                   "--set", "train.grad_accum=2", "--set", "train.precision=fp32"])
        assert trainer.train(args) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

    assert len(micro_loads) == 2 and len(updates) == 1
    loads, before, after, routers = updates[0]
    assert sorted(loads) == sorted(routers) == sorted(micro_loads[0]) and loads  # sigmoid routers, every MoE layer
    last_alone_differs = False
    for i, router in routers.items():
        summed = micro_loads[0][i] + micro_loads[1][i]  # integer counts in float32: exact
        torch.testing.assert_close(loads[i], summed, rtol=0, atol=0)
        step = router.bias_update_rate * torch.sign(summed.mean() - summed)
        torch.testing.assert_close(after[i], before[i] + step, rtol=0, atol=1e-9)
        last = micro_loads[1][i]
        last_alone_differs |= not torch.equal(torch.sign(summed.mean() - summed), torch.sign(last.mean() - last))
    assert last_alone_differs, "the last micro-batch alone moves the biases alike here: the check could not fail"


def test_an_fp16_overflow_skips_the_step_and_leaves_the_routing_biases(one_rank, cache_dir, tmp_path, monkeypatch):
    """When fp16's loss scaler finds an overflowed gradient, DeepSpeed skips the update (was_step_applied()
    is False) and counts it in engine.skipped_steps. The weights did not move, so the trainer's loop must
    leave the routers' auxiliary-loss-free biases as they were, and it logs train/skipped_steps.

    fp16 is refused on a CPU, so this run's spec says fp16 while DeepSpeed trains it in fp32 under ZeRO-1,
    and step 2's gradients are made inf: ZeRO's optimizer then takes the branch its fp16 loss scaler
    takes on an overflow (no update, gradients zeroed, `overflow` set, which the engine turns into
    skipped_steps += 1 and was_step_applied() False). Everything else is the trainer's own loop, in this
    process; what is checked is what it leaves behind: the biases and weights each forward sees, and
    the TensorBoard scalars."""
    import deepspeed

    from training import precision
    from training.mfu import cpu_peak_cache_key

    overflow_step, steps = 2, 3
    real_resolve, real_initialize = precision.resolve_precision, deepspeed.initialize

    def resolve_without_the_cpu_refusal(spec, device):
        return spec if spec.train.precision == "fp16" else real_resolve(spec, device)

    # Replaced in every training module that imported it by name: the test holds wherever the loop moves.
    holders = [m for name, m in list(sys.modules.items())
               if name.split(".")[0] == "training" and getattr(m, "resolve_precision", None) is real_resolve]
    assert holders
    for module in holders:
        monkeypatch.setattr(module, "resolve_precision", resolve_without_the_cpu_refusal)

    seen = []  # (training?, routing biases, a weight) as each forward starts
    inf_grad = []  # the hook that overflows step 2's gradients, while it is registered

    def before_forward(model, args):
        biases = {i: m.router.e_score_correction_bias.clone() for i, m in model.moe_layers().items()}
        weight = model.embed.weight
        seen.append((model.training, biases, weight.detach().clone()))
        while inf_grad:
            inf_grad.pop().remove()
        if model.training and sum(training for training, _, _ in seen) == overflow_step:
            inf_grad.append(weight.register_hook(lambda grad: torch.full_like(grad, math.inf)))

    def initialize_in_fp32(**kwargs):
        config = kwargs["config"]
        assert config["fp16"]["enabled"], "the trainer asked DeepSpeed for fp16"
        kwargs["config"] = {**config, "fp16": {**config["fp16"], "enabled": False}}
        kwargs["model"].register_forward_pre_hook(before_forward)
        return real_initialize(**kwargs)

    monkeypatch.setattr(deepspeed, "initialize", initialize_in_fp32)
    # The fp16 peak MFU divides by, as if measured and cached: measuring would time fp16 matmuls on a CPU,
    # the slow path the refusal is about.
    peaks = cache_dir / "matmul_peak.json"
    cached = json.loads(peaks.read_text()) if peaks.is_file() else {}
    peaks.write_text(json.dumps({**cached, cpu_peak_cache_key(torch.float16): 1e15}))
    for key, value in {**one_rank, "ZOO_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)  # OMP_NUM_THREADS: init_distributed leaves the thread count alone
    handlers = {sig: signal.getsignal(sig) for sig in trainer.StopFlag.SIGNALS}
    out = tmp_path / "run"
    try:
        args = trainer.parse_args(["--tiny", "--out", str(out), "--set", f"train.steps={steps}",
                                   "--set", "train.precision=fp16", "--set", "deepspeed.zero_stage=1",
                                   "--set", "train.log_every=1", "--set", f"train.eval_every={steps}",
                                   "--set", "eval.val_blocks=1"])
        assert trainer.train(args) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

    assert [training for training, _, _ in seen] == [True] * steps + [False]  # then one validation batch
    biases, weights = [b for _, b, _ in seen], [w for _, _, w in seen]  # before steps 1..3, after step 3
    assert biases[0] and all(len(b) == len(biases[0]) for b in biases)  # the preset has sigmoid routers
    for step in range(1, steps + 1):
        before, after = step - 1, step
        if step == overflow_step:
            assert torch.equal(weights[after], weights[before]), "DeepSpeed applied the overflowed step"
            for i in biases[before]:
                torch.testing.assert_close(biases[after][i], biases[before][i], rtol=0, atol=0,
                                           msg=f"layer {i}'s routing bias moved on the skipped step {step}")
        else:
            assert not torch.equal(weights[after], weights[before]), f"step {step} was not applied"
            assert all(not torch.equal(biases[after][i], biases[before][i]) for i in biases[before]), step
    assert scalars(out, "train/skipped_steps") == {1: 0, 2: 1, 3: 1}
    assert math.isinf(scalars(out, "train/grad_norm")[overflow_step])  # DeepSpeed's report of an overflow
