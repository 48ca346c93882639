"""The training loop: a preset, its data, a DeepSpeed engine, and honest numbers.

    python training/run.py --preset deepseek_glm4 [--set path=value ...] [--out runs/NAME] [--resume]
    deepspeed --num_gpus 2 training/run.py --preset deepseek_glm4 --set deepspeed.ep_size=2

Steps are optimizer steps; each takes `train.grad_accum` micro-batches of `train.micro_batch_size`
sequences per rank. After every optimizer step the routers' auxiliary-loss-free biases move once,
on expert loads summed over the accumulation window and all ranks, so every rank keeps the same
biases. User errors (a bad preset, path, setting or checkpoint) print one line and exit 2; a NaN or
inf loss stops the run with one line naming the step and exits 1; SIGTERM/SIGINT save a checkpoint
and exit 0.

A run, step by step:

1. plan.py: the command line (or the run folder, on --resume) becomes one immutable Plan: the final
   spec, the run folder, the start step, the DeepSpeed config, the rank layout. Bad input stops here.
2. startup.py: from the plan, the data (rank 0 first), the model in its DeepSpeed engine (engine.py,
   optim.py, ds_config.py), and the run folder's files.
3. On --resume, the checkpoint's engine, data position and generators (checkpoints.py).
4. The loop: each optimizer step, then logging (report.py: console and TensorBoard), validation
   (validation.py), checkpoints (checkpoints.py), and a stop on a signal (signals.py) or --stop-after.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from training import checkpoints, report, startup
from training.allocator import retain_freed_memory
from training.data import DataError, TrainBatches, Tokenizer
from training.engine import unreported_grad_norm
from training.memory import checkpoint_bytes
from training.errors import TrainingError
from training.mfu import MFU_ABOVE_PEAK_NOTE, BusyPeakWarning, mfu as model_flops_utilisation, peak_flops
from training.observe import Observer
from training.plan import Plan, make_plan
from training.precision import DTYPES
from training.report import StepStats
from training.signals import StopFlag
from training.timing import PhaseTimer
from training.validation import evaluate, hellaswag_scores
from zoo.checkpoint import CHECKPOINTS, latest_tag, save_run_folder
from zoo.describe import describe
from zoo.overrides import SpecError
from zoo.presets import DEFAULT_PRESET
from zoo.specs import RunSpec

PROCESS_START = time.perf_counter()
EXIT_USAGE, EXIT_NONFINITE = 2, 1


class NonFiniteLoss(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="training/run.py", description="Train a zoo preset with DeepSpeed.")
    p.add_argument("--preset", default=None, help=f"a preset from `zoo list` (default {DEFAULT_PRESET})")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="edit a spec field (repeatable)")
    p.add_argument("--ds-config", default=None, help="a DeepSpeed JSON config (default: ds_configs/zero{stage}_{precision}.json)")
    p.add_argument("--out", default=None, help="the run folder (default runs/PRESET)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="checkpoint and stop after this optimizer step, as an interruption would (resume with --resume)")
    p.add_argument("--tiny", action="store_true", help="the preset at toy size (smoke tests)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)


@dataclass
class _Run:
    """A started run: its plan, what every step uses, and what the steps add up."""

    plan: Plan
    engine: object  # DeepSpeed's engine
    optimizer: torch.optim.Optimizer
    tokenizer: Tokenizer
    train_batches: TrainBatches
    val_batches: list[torch.Tensor]
    observer: Observer
    stop: StopFlag
    biased: dict  # the routers with auxiliary-loss-free biases, by layer
    flops_per_token: float
    machine_peak: float
    tokens_seen: int
    timer: PhaseTimer
    val: dict[str, float] = field(default_factory=dict)  # the latest validation
    logged: tuple[int, float] = (0, 0.0)  # the step and time of the last log, for time/... per step
    above_peak_said: bool = False


def train(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    if plan is None:  # a --resume of a run that already finished
        return 0
    spec, out = plan.spec, plan.out
    run = _start(plan)
    wall_start = time.perf_counter()
    try:
        for step in range(plan.start_step, spec.train.steps):
            if _one_step(run, step):
                return 0
    except (NonFiniteLoss, checkpoints.CheckpointWriteError) as err:
        run.observer.close()
        last = latest_tag(out)
        print(f"training: stopped: {err}; last good checkpoint: {out / CHECKPOINTS / last if last else 'none'}",
              file=sys.stderr)
        return EXIT_NONFINITE

    wall = time.perf_counter() - wall_start
    run.observer.hparams(report.hparams(spec), {"hparam/val_loss": run.val.get("val/loss", float("nan"))})
    run.observer.close()
    run.timer.take()
    if plan.ranks.rank == 0:
        print(report.closing_line(out, spec, start_step=plan.start_step, tokens_seen=run.tokens_seen, val=run.val,
                                  wall=wall), flush=True)
        print(report.time_line(run.timer.totals, wall, run.engine, plan.ranks.device), flush=True)
    return 0


def _start(plan: Plan) -> _Run:
    """The data and engine (training/startup.py); on --resume the checkpoint's state; the opening line."""
    spec, env = plan.spec, plan.ranks
    rank0 = env.rank == 0
    engine, optimizer, prepared = startup.build(plan)
    train_batches = prepared.train_batches(spec.train.micro_batch_size, rank=env.rank, world_size=env.world_size)
    val_batches = prepared.val_batches(spec.train.micro_batch_size, max_blocks=spec.eval.val_blocks)
    tokens_seen = 0
    if plan.resume:
        state = checkpoints.load(engine, plan.out, plan.start_step, expert_parallel=spec.deepspeed.ep_size > 1)
        tokens_seen = state["tokens"]
        train_batches.load_state_dict(state["data"])
        _restore_rng(state)

    flops_per_token = describe(spec, seq_len=spec.data.seq_len)["flops_per_token"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BusyPeakWarning)
        machine_peak = peak_flops(DTYPES[spec.train.precision], env.device) * env.world_size
    for warning in caught if rank0 else ():  # one line, without the source line `warnings` would print
        print(f"training: warning: {warning.message}", file=sys.stderr, flush=True)
    startup_s = time.perf_counter() - PROCESS_START
    observer = Observer(plan.out, total_steps=spec.train.steps, start_step=plan.start_step, enabled=rank0)
    observer.message(report.opening_line(plan.out, spec, env.world_size, prepared.summary(), startup_s))
    # The peak perf/mfu divides by (all ranks'), so that any MFU can be checked against tokens/s.
    observer.scalars(plan.start_step, {"perf/startup_s": startup_s,
                                       **({} if math.isnan(machine_peak) else {"perf/peak_flops": machine_peak})})
    stop = StopFlag(announce=rank0)
    biased = {i: m.router for i, m in engine.module.moe_layers().items() if m.router.has_routing_bias}
    timer = PhaseTimer.for_device(env.device)
    engine.optimizer.phase = timer.phase  # Newton-Schulz apart (training/zero_clip.py, ZeRO-1/2)
    timer.watch_optimizer(getattr(engine.optimizer, "optimizer", engine.optimizer))
    return _Run(plan, engine, optimizer, prepared.tokenizer, train_batches, val_batches, observer, stop, biased,
                flops_per_token, machine_peak, tokens_seen, timer, logged=(plan.start_step, time.perf_counter()))


def _one_step(run: _Run, step: int) -> bool:
    """Optimizer step `step` + 1 and what follows it: logging, validation, a checkpoint. True when the run
    stops after it (a signal or --stop-after) before train.steps."""
    plan, spec, observer = run.plan, run.plan.spec, run.observer
    result = _update(run, step)
    run.tokens_seen += result.tokens
    done = step + 1
    if done % spec.train.log_every == 0 or done == spec.train.steps or done == plan.start_step + 1:
        _log(run, done, result)
    if done % spec.train.eval_every == 0 or done == spec.train.steps:
        with run.timer.phase("evaluation"):
            _validate(run, done)
    stopping = result.signalled or done == plan.stop_after
    if done % spec.train.ckpt_every == 0 or done == spec.train.steps or stopping:
        with run.timer.phase("checkpoint"):
            try:
                _save(run.engine, plan.out, done, run.tokens_seen, run.train_batches, spec, run.tokenizer,
                      plan.ranks.rank == 0)
            except Exception as err:  # torch.save, safetensors and the OS each word a full disk their own way
                stop = checkpoints.no_room(err, plan.out, done, checkpoint_bytes(run.engine))
                if stop is None:
                    raise
                raise stop from None
    if stopping and done < spec.train.steps:
        # Every rank takes this branch alike (result.signalled is all-reduced), so the collective is safe.
        reason = f"signal {_agreed_signal(run.stop.signum, plan.ranks.device)}" if result.signalled else "--stop-after"
        observer.message(f"stopped by {reason} at step {done}; resume with --resume; "
                         f"checkpoint {plan.out / CHECKPOINTS / checkpoints.tag_for(done)}")
        observer.close()
        return True
    return False


def _update(run: _Run, step: int) -> StepStats:
    """The accumulation window's micro-batches and one update; then one all-reduce carries every layer's
    expert loads, the losses and the stop request, and the routing biases move on the summed loads."""
    spec, engine, ranks = run.plan.spec, run.engine, run.plan.ranks
    t0 = time.perf_counter()
    sums, loads, stats, lrs, own_norm = _accumulate(run, step)
    applied = engine.was_step_applied()  # False when fp16's loss scaler skipped the update
    grad_norm = engine.get_global_grad_norm() if own_norm is None else own_norm
    _check_grad_norm(grad_norm, spec, step + 1, applied=applied)
    layers = sorted(loads)
    stop_requested = torch.tensor([float(run.stop.signum)], dtype=torch.float64, device=ranks.device)
    packed = torch.cat([*(loads[i].double() for i in layers), sums, stop_requested])
    dist.all_reduce(packed)
    sizes = [loads[i].numel() for i in layers]
    for layer, load in zip(layers, packed[: sum(sizes)].split(sizes)):
        loads[layer] = load.float()
    if applied:  # a skipped update leaves the weights, so the biases stay too
        engine.module.update_routing_biases({i: loads[i] for i in run.biased})
    loss, ce, aux, *mtp = (packed[sum(sizes):-1] / (spec.train.grad_accum * ranks.world_size)).tolist()
    tokens = spec.train.micro_batch_size * spec.train.grad_accum * ranks.world_size * spec.data.seq_len
    return StepStats(loss, ce, aux, grad_norm, lrs, stats, loads, tokens, seconds=time.perf_counter() - t0,
                     signalled=packed[-1].item() > 0, mtp=mtp)


def _accumulate(run: _Run, step: int) -> tuple[torch.Tensor, dict, dict, dict[str, float], torch.Tensor | None]:
    """Forward and backward of each micro-batch, engine.step() after each (DeepSpeed updates after the last).
    The summed (loss, ce, aux, each MTP depth's ce), each MoE layer's summed loads and last stats, the LRs
    the update used, and the gradient norm where DeepSpeed reports none (unreported_grad_norm), checked
    before the update."""
    spec, engine, device, phase = run.plan.spec, run.engine, run.plan.ranks.device, run.timer.phase
    sums, loads, stats = torch.zeros(3 + spec.model.mtp.depth, dtype=torch.float64, device=device), {}, {}
    for micro in range(spec.train.grad_accum):
        with phase("data"):
            batch = next(run.train_batches).to(device)
        with phase("forward"):
            result = engine(batch, labels=batch, return_logits=False)
        _check_finite(result.loss, step + 1, micro)
        with phase("backward"):
            engine.backward(result.loss)
        if micro == spec.train.grad_accum - 1:
            # DeepSpeed steps the scheduler inside engine.step(): read the LR this update uses first.
            lrs = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(run.optimizer.param_groups)}
            own_norm = unreported_grad_norm(engine, spec.deepspeed.ep_size)
            if own_norm is not None:
                _check_grad_norm(own_norm, spec, step + 1, applied=False)  # before the update
        with phase("optimizer"):
            _step(engine, step + 1)
        sums += report.loss_terms(result)
        for layer, s in result.router_stats.items():
            loads[layer] = loads.get(layer, 0) + s.load_E
            stats[layer] = s
    return sums, loads, stats, lrs, own_norm


def _log(run: _Run, step: int, result: StepStats) -> None:
    with run.timer.phase("logging"):
        mfu = model_flops_utilisation(result.tokens_per_s, run.flops_per_token, run.machine_peak)  # None: no peak
        skipped = run.engine.skipped_steps if run.plan.spec.train.precision == "fp16" else None
        report.log_step(run.observer, step, result, tokens_seen=run.tokens_seen, mfu=mfu, biased=run.biased,
                        world_size=run.plan.ranks.world_size, skipped_steps=skipped)
    (last_step, last_time), now = run.logged, time.perf_counter()
    run.logged = (step, now)
    run.observer.scalars(step, report.time_scalars(run.timer.take(), steps=step - last_step, wall=now - last_time))
    if mfu is not None and mfu > 1 and not run.above_peak_said:
        run.observer.message(MFU_ABOVE_PEAK_NOTE)
        run.above_peak_said = True


def _validate(run: _Run, step: int) -> None:
    spec = run.plan.spec
    val, hellaswag = evaluate(run.engine, run.val_batches, run.plan.ranks.device), ""
    if spec.eval.hellaswag_limit:
        scores = hellaswag_scores(run.engine, run.tokenizer, spec)
        val.update({"hellaswag/acc": scores["acc"], "hellaswag/acc_norm": scores["acc_norm"]})
        hellaswag = f", HellaSwag acc_norm {scores['acc_norm']:.3f} (n={scores['n']})"  # items scored
    run.observer.scalars(step, val)
    run.observer.message(f"step {step}: val loss {val['val/loss']:.4f} ppl {val['val/ppl']:.1f} "
                         f"acc {val['val/acc']:.3f}{report.mtp_validation(val)}{hellaswag}")
    run.val = val


def _check_grad_norm(norm, spec: RunSpec, step: int, *, applied: bool) -> None:
    """A non-finite gradient norm outside fp16's loss scaling (where early overflows are normal and
    DeepSpeed skips the update) means the run has diverged. Nothing is checkpointed after it."""
    if spec.train.precision != "fp16" and norm is not None and not math.isfinite(float(norm)):
        what = "the update was applied but not saved" if applied else "the update was not applied"
        raise NonFiniteLoss(f"the gradient norm is {float(norm)} at step {step} ({what})")


def _step(engine, step: int) -> None:
    """engine.step(), with fp16's give-up (the loss scale cannot shrink further) as a one-line stop."""
    try:
        engine.step()
    except Exception as err:  # DeepSpeed raises a bare Exception for it
        if "loss scale already at minimum" not in str(err):
            raise
        raise NonFiniteLoss(f"fp16 gradients overflow at step {step} even at the smallest loss scale") from None


def _check_finite(loss: torch.Tensor, step: int, micro: int) -> None:
    finite = torch.isfinite(loss.detach()).float()
    if dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank stops together
    if finite.item() < 1:
        raise NonFiniteLoss(f"the loss is {loss.item()} at step {step} (micro-batch {micro + 1})")


def _agreed_signal(own: int, device: torch.device) -> int:
    """The stop signal as every rank sees it: the largest any rank got (a SUM over two SIGTERMs read 30)."""
    value = torch.tensor([float(own)], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def _rng_state() -> dict:
    # Every CUDA device's generator too: dropout or sampling on the GPU would otherwise not resume exactly.
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda}


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    cuda = state.get("cuda_rng")  # absent in older checkpoints, None from a CPU run
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _save(engine, out, step, tokens_seen, train_batches, spec, tokenizer, rank0) -> None:
    state = {"step": step, "tokens": tokens_seen, "data": train_batches.state_dict(), **_rng_state()}

    def run_folder() -> None:  # before `latest` moves: the run folder's weights are never older than it
        full = None
        if spec.deepspeed.ep_size > 1:
            from training.expert_parallel import full_state_dict

            full = full_state_dict(engine.module)  # a collective: every rank takes part
        if rank0:
            save_run_folder(engine.module, spec, out, state_dict=full)
            tokenizer.save(out)

    checkpoints.save(engine, out, step, state, spec.train.keep_last, expert_parallel=spec.deepspeed.ep_size > 1,
                     before_commit=run_folder)


def _print_error(err: Exception) -> None:
    # Every rank raises the same error (the checkpoint loader agrees on one across ranks): rank 0 says it.
    if os.environ.get("RANK", "0") == "0":
        print(f"training: error: {err}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # DeepSpeed's ZeRO still calls the c10d collectives torch renamed; the warning is theirs to act on.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning)
    args = parse_args(argv)
    retain_freed_memory()  # no page faults for memory freed and reallocated every step (training/allocator.py)
    try:
        code = train(args)
    except (SpecError, DataError, TrainingError) as err:
        _print_error(err)
        code = EXIT_USAGE
    except ValueError as err:
        from zoo.evaluation.lm import EvalError  # e.g. a HellaSwag item longer than the context

        if not isinstance(err, EvalError):
            raise
        _print_error(err)
        code = EXIT_USAGE
    if dist.is_available() and dist.is_initialized():
        multi = dist.get_world_size() > 1
        if code == 0:
            dist.barrier(device_ids=[torch.cuda.current_device()] if torch.cuda.is_available() else None)
        dist.destroy_process_group()
        if multi:
            # gloo sometimes aborts a rank while tearing down after all work is done: leave at once.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code
