"""The training loop: a preset, its data, a DeepSpeed engine, and honest numbers.

    python training/run.py --preset deepseek_glm4 [--set path=value ...] [--out runs/NAME] [--resume]
    deepspeed --num_gpus 2 training/run.py --preset deepseek_glm4 --set deepspeed.ep_size=2

Steps are optimizer steps; each takes `train.grad_accum` micro-batches of `train.micro_batch_size`
sequences per rank. After every optimizer step the routers' auxiliary-loss-free biases move once,
on expert loads summed over the accumulation window and all ranks, so every rank keeps the same
biases. User errors (a bad preset, path, setting or checkpoint) print one line and exit 2; a NaN or
inf loss stops the run with one line naming the step and exits 1; SIGTERM/SIGINT save a checkpoint
and exit 0.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from training import checkpoints
from training.allocator import retain_freed_memory
from training.data import DataError, PreparedData, Tokenizer, prepare_data
from training.engine import (
    TrainingError,
    ds_config_source,
    init_distributed,
    initialize,
    optimizer_groups,
    lr_factor,
    resolve_ds_config,
    unreported_grad_norm,
)
from training.mfu import MFU_ABOVE_PEAK_NOTE, format_mfu, mfu as model_flops_utilisation, peak_flops
from training.observe import Observer
from training.precision import DTYPES, resolve_precision
from zoo.blocks.routers import SigmoidGroupTopKRouter
from zoo.checkpoint import save_run_folder
from zoo.cli import resolve
from zoo.describe import describe
from zoo.overrides import SpecError, apply_sets, diff
from zoo.specs import MoESpec, RunSpec

PROCESS_START = time.perf_counter()
DEFAULT_PRESET = "deepseek_glm4"
# Fields a resumed run may change: budget and reporting, never the model, data or optimisation.
RESUMABLE = ("train.steps", "train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_last", "eval.")
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


def resolve_run(args: argparse.Namespace) -> tuple[RunSpec, Path, int]:
    """The run's spec, folder and the step it starts from (the checkpoint's, on --resume)."""
    preset = args.preset or DEFAULT_PRESET
    out = Path(args.out or f"runs/{preset}")
    if not args.resume:
        if checkpoints.latest_tag(out):
            raise TrainingError(f"{out} already holds a checkpoint: pass --resume to continue it, or --out NEW_DIR")
        spec = resolve(preset, args.set, args.tiny)
        _check_stop_after(args.stop_after, 0, spec)
        return spec, out, 0
    if args.preset is not None or args.tiny:
        # The model comes from OUT/spec.json; a preset named again could only disagree with it.
        flags = " and ".join(flag for flag, given in (("--preset", args.preset is not None), ("--tiny", args.tiny))
                             if given)
        raise TrainingError(f"--resume continues the run saved in {out / 'spec.json'}: drop {flags} "
                            "(only --set of budget and eval fields may change)")
    saved = out / "spec.json"
    if not saved.is_file() or not checkpoints.latest_tag(out):
        unfinished = checkpoints.incomplete_tags(out)
        why = f" ({', '.join(unfinished)} never finished saving)" if unfinished else ""
        raise TrainingError(f"--resume: {out} holds no complete checkpoint to resume from{why}; start it without "
                            "--resume")
    try:
        spec = RunSpec.model_validate_json(saved.read_text())
    except ValueError as err:
        raise TrainingError(f"--resume: {saved} is not a valid run spec ({str(err).splitlines()[0]})") from None
    edited = apply_sets(spec, args.set)
    changed = [path for path, _, _ in diff(spec, edited) if not path.startswith(RESUMABLE)]
    if changed:
        raise TrainingError(f"--resume cannot change {', '.join(changed)}: only {', '.join(RESUMABLE)} may change")
    start = int(checkpoints.latest_tag(out).removeprefix("step_"))
    if edited.train.steps < start:
        raise TrainingError(f"--resume: the checkpoint is at step {start} but train.steps={edited.train.steps}; "
                            f"pass --set train.steps={start} or more")
    if edited.train.steps > start:
        _check_stop_after(args.stop_after, start, edited)
    if edited.train.steps != spec.train.steps and start < edited.train.steps and os.environ.get("RANK", "0") == "0":
        # The LR follows train.steps (lr_factor): a new length re-spaces the rest of the cosine.
        print(f"--resume: train.steps {spec.train.steps} -> {edited.train.steps} re-spaces the LR schedule: its "
              f"factor goes from {lr_factor(start - 1, spec):.3f} (step {start}) to {lr_factor(start, edited):.3f} "
              f"(step {start + 1})", flush=True)
    return edited, out, start


def _check_stop_after(stop_after: int | None, start: int, spec: RunSpec) -> None:
    if stop_after is not None and not start < stop_after <= spec.train.steps:
        raise TrainingError(f"--stop-after {stop_after} must be a step this run reaches: after its start "
                            f"(step {start}) and at most train.steps={spec.train.steps}")


def _ds_config(args: argparse.Namespace, out: Path, spec: RunSpec, world_size: int) -> tuple[str, dict]:
    """How errors name the run's DeepSpeed config, and the config resolved. On --resume the run keeps the
    one it started with (OUT/ds_config.json, resolved): a different one could change how it trains, and
    a --ds-config given again must resolve to the same."""
    saved = out / "ds_config.json"
    if not args.resume or not saved.is_file():
        return ds_config_source(spec, args.ds_config)[1], resolve_ds_config(spec, args.ds_config, world_size)
    name = f"{saved} (the config the run started with)"
    config = resolve_ds_config(spec, str(saved), world_size, named=name)
    if args.ds_config is not None:
        given = resolve_ds_config(spec, args.ds_config, world_size)
        if given != config:
            keys = sorted(k for k in {*given, *config} if given.get(k) != config.get(k))
            raise TrainingError(f"--ds-config {args.ds_config} differs from the config the run started with "
                                f"({saved}) in {', '.join(keys)}; drop --ds-config to resume with that one")
    return name, config


def _check_layout(spec: RunSpec, world_size: int) -> None:
    moe = [layer.ffn for layer in spec.model.layer_specs() if isinstance(layer.ffn, MoESpec)]
    ep = spec.deepspeed.ep_size
    if spec.deepspeed.zero_stage == 3 and moe:
        raise TrainingError("deepspeed.zero_stage=3 serves dense presets only (DeepSpeed's MoE path rejects "
                            "ZeRO-3); use --set deepspeed.zero_stage=2")
    if spec.eval.hellaswag_limit:
        path = spec.eval.hellaswag_path
        if path is None or not Path(path).is_file():
            raise TrainingError(f"eval.hellaswag_limit={spec.eval.hellaswag_limit} needs eval.hellaswag_path to name "
                                f"a HellaSwag JSONL file (got {path!r}), e.g. ../shared/data/hellaswag_val.jsonl")
        from training.evaluation.lm import EvalError
        from training.evaluation.tasks import hellaswag_docs

        try:  # the records the evaluations will read, now rather than eval_every steps into training
            docs = hellaswag_docs(path, spec.eval.hellaswag_limit)
        except EvalError as err:
            raise TrainingError(f"eval.hellaswag_path: {err}") from None
        if not docs:
            raise TrainingError(f"eval.hellaswag_path={path!r} holds no HellaSwag records")
    if ep > 1:
        if world_size % ep:
            raise TrainingError(f"deepspeed.ep_size={ep} must divide the number of ranks ({world_size})")
        bad = sorted({f.n_experts for f in moe if f.n_experts % ep})
        if not moe or bad:
            raise TrainingError(f"deepspeed.ep_size={ep} must divide every MoE layer's n_experts "
                                f"(found {bad or 'no MoE layer'})")


def _prepare_data(spec: RunSpec, rank: int) -> PreparedData:
    """Rank 0 trains or loads the cached tokenizer first; the others then hit the cache."""
    data = spec.data
    kwargs = dict(source=data.source, seq_len=data.seq_len, vocab_size=spec.model.vocab_size,
                  val_fraction=data.val_fraction, seed=spec.train.seed, text_field=data.text_field,
                  max_documents=data.max_documents, tokenizer_sample_chars=data.tokenizer_sample_chars,
                  cache_dir=Path(os.environ.get("ZOO_CACHE", Path.home() / ".cache" / "zoo")))
    error, prepared, unexpected = None, None, None
    if rank == 0:
        try:
            prepared = prepare_data(**kwargs)
        except DataError as err:
            error = str(err)
        except Exception as err:  # a bug or an environment problem: rank 0 shows the traceback
            error, unexpected = f"rank 0 failed to prepare the data ({type(err).__name__}: {err})", err
    shared = [error]
    dist.broadcast_object_list(shared, src=0)  # so no rank waits forever on one that failed
    if unexpected is not None:
        raise unexpected
    if shared[0]:
        raise DataError(shared[0])
    return prepared if prepared is not None else prepare_data(**kwargs)


def _check_min_data(prepared: PreparedData, spec: RunSpec, world_size: int) -> None:
    needed = spec.train.micro_batch_size * world_size
    if len(prepared.train_blocks) < needed:
        raise TrainingError(
            f"the corpus gives {len(prepared.train_blocks)} training blocks of {spec.data.seq_len} tokens, fewer than "
            f"one global micro-batch ({needed}); use more text, a smaller data.seq_len or train.micro_batch_size"
        )


@torch.no_grad()
def evaluate(engine, batches: list[torch.Tensor], device: torch.device) -> dict[str, float]:
    """Token-weighted validation cross-entropy, perplexity and next-token accuracy."""
    engine.module.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in batches:
        batch = batch.to(device)
        out = engine(batch, labels=batch)
        n = batch[:, 1:].numel()
        loss_sum += out.ce_loss.item() * n
        correct += (out.logits[:, :-1].argmax(-1) == batch[:, 1:]).sum().item()
        count += n
    engine.module.train()
    loss = loss_sum / count
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), "val/acc": correct / count}


class StopFlag:
    """SIGTERM/SIGINT ask the loop to save and stop at the next step boundary. After that a SIGINT (a second
    Ctrl-C) kills at once, the default action, so a hung step or collective never needs kill -9. Further
    SIGTERMs are still caught: DeepSpeed's launcher SIGTERMs every rank on top of the signal the ranks got
    themselves (Ctrl-C, a scheduler's SIGTERM to the whole job), and that must not cost the checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: bool = False):
        self.signum = 0
        self.announce = announce
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        first, self.signum = not self.signum, signum
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self.announce and first:  # os.write: print() may be mid-call in the interrupted frame
            os.write(2, f"training: {signal.Signals(signum).name}: saving a checkpoint after this step; "
                        "Ctrl-C (SIGINT) again stops at once without it\n".encode())


def _agreed_signal(own: int, device: torch.device) -> int:
    """The stop signal as every rank sees it: the largest any rank got (a SUM over two SIGTERMs read 30)."""
    value = torch.tensor([float(own)], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def train(args: argparse.Namespace) -> int:
    spec, out, resumed_at = resolve_run(args)
    if args.resume and resumed_at == spec.train.steps:
        if os.environ.get("RANK", "0") == "0":
            print(f"{out} already finished its train.steps={spec.train.steps} steps; nothing to do "
                  f"(pass --set train.steps=N with N > {resumed_at} to train further)", flush=True)
        return 0
    env = init_distributed()
    if not args.resume and env.rank == 0:
        # Folders of a save that never finished (the run was killed during its first checkpoint).
        removed = checkpoints.remove_incomplete(out)
        if removed:
            print(f"{out}: removed unfinished checkpoint folders {', '.join(removed)}", flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = resolve_precision(spec, env.device)  # auto -> bf16 or fp32 for this device; spec.json records it
    if env.rank == 0:
        for warning in caught:  # one line, without the source line `warnings` would print
            print(f"training: warning: {warning.message}", file=sys.stderr)
    _check_layout(spec, env.world_size)
    import deepspeed

    deepspeed.utils.logger.setLevel("WARNING")
    rank0 = env.rank == 0
    torch.manual_seed(spec.train.seed)

    prepared = _prepare_data(spec, env.rank)
    _check_min_data(prepared, spec, env.world_size)
    tokenizer: Tokenizer = prepared.tokenizer
    if args.resume and not Tokenizer.load(out).same_model(tokenizer):
        raise TrainingError(f"--resume: the data now gives a different tokenizer than {out / 'tokenizer.model'}; "
                            "the corpus or its settings changed since the run started")

    import zoo

    model = zoo.build(spec)
    ep_size = spec.deepspeed.ep_size
    ds_name, ds_config = _ds_config(args, out, spec, env.world_size)
    if ep_size > 1:
        from training.expert_parallel import check_ds_config, enable_expert_parallel, moe_param_groups

        try:
            check_ds_config(ds_config, ep_size)
            enable_expert_parallel(model, ep_size)  # before the groups: it replaces the expert parameters
        except ValueError as err:
            raise TrainingError(str(err)) from None
        groups = moe_param_groups(optimizer_groups(model, spec, env.device))
    else:
        groups = optimizer_groups(model, spec, env.device)
    engine, optimizer, _ = initialize(model, spec, groups, ds_config, source=ds_name)
    if spec.train.compile:
        engine.compile()

    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "ds_config.json").write_text(_json(ds_config))
        (out / "spec.json").write_text(spec.model_dump_json(indent=2) + "\n")
        tokenizer.save(out)
    train_batches = prepared.train_batches(spec.train.micro_batch_size, rank=env.rank, world_size=env.world_size)
    val_batches = prepared.val_batches(spec.train.micro_batch_size, max_batches=spec.eval.val_batches)

    start_step, tokens_seen = 0, 0
    if args.resume:
        state = checkpoints.load(engine, out, expert_parallel=ep_size > 1)
        start_step, tokens_seen = state["step"], state["tokens"]
        train_batches.load_state_dict(state["data"])
        _restore_rng(state)

    seq_len = spec.data.seq_len
    flops_per_token = describe(spec, seq_len=seq_len)["flops_per_token"]
    machine_peak = peak_flops(DTYPES[spec.train.precision], env.device) * env.world_size
    startup_s = time.perf_counter() - PROCESS_START
    observer = Observer(out, total_steps=spec.train.steps, start_step=start_step, enabled=rank0)
    observer.message(
        f"{out}: {spec.train.steps} steps x {spec.train.micro_batch_size * spec.train.grad_accum * env.world_size} "
        f"sequences x {seq_len} tokens on {env.world_size} rank(s), {spec.train.precision}, ZeRO-{spec.deepspeed.zero_stage}"
        f"{f', ep_size {ep_size}' if ep_size > 1 else ''}; {prepared.summary()}; start-up {startup_s:.1f} s"
    )
    observer.scalars(start_step, {"perf/startup_s": startup_s})
    stop = StopFlag(announce=rank0)
    biased = {i: m.router for i, m in engine.module.moe_layers().items()
              if isinstance(m.router, SigmoidGroupTopKRouter)}
    val: dict[str, float] = {}
    above_peak_said = False
    step = start_step
    wall_start = time.perf_counter()
    try:
        for step in range(start_step, spec.train.steps):
            t0 = time.perf_counter()
            sums, loads, stats = torch.zeros(3, dtype=torch.float64, device=env.device), {}, {}
            for micro in range(spec.train.grad_accum):
                batch = next(train_batches).to(env.device)
                result = engine(batch, labels=batch, return_logits=False)
                _check_finite(result.loss, step + 1, micro)
                engine.backward(result.loss)
                if micro == spec.train.grad_accum - 1:
                    # DeepSpeed steps the scheduler inside engine.step(): read the LR this update uses first.
                    lrs = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}
                    own_norm = unreported_grad_norm(engine, ep_size)
                    if own_norm is not None:
                        _check_grad_norm(own_norm, spec, step + 1, applied=False)  # before the update
                _step(engine, step + 1)
                sums += torch.stack([result.loss.detach(), result.ce_loss.detach(), result.aux_loss.detach()]).double()
                for layer, s in result.router_stats.items():
                    loads[layer] = loads.get(layer, 0) + s.load_E
                    stats[layer] = s
            applied = engine.was_step_applied()  # False when fp16's loss scaler skipped the update
            grad_norm = engine.get_global_grad_norm() if own_norm is None else own_norm
            _check_grad_norm(grad_norm, spec, step + 1, applied=applied)
            # One all-reduce carries the loads of every layer, the losses and the stop request.
            layers = sorted(loads)
            stop_requested = torch.tensor([float(stop.signum)], dtype=torch.float64, device=env.device)
            packed = torch.cat([*(loads[i].double() for i in layers), sums, stop_requested])
            dist.all_reduce(packed)
            sizes = [loads[i].numel() for i in layers]
            for layer, load in zip(layers, packed[: sum(sizes)].split(sizes)):
                loads[layer] = load.float()
            if applied:  # a skipped update leaves the weights, so the biases stay too
                engine.module.update_routing_biases({i: loads[i] for i in biased})
            loss, ce, aux = (packed[sum(sizes):sum(sizes) + 3] / (spec.train.grad_accum * env.world_size)).tolist()
            tokens = spec.train.micro_batch_size * spec.train.grad_accum * env.world_size * seq_len
            tokens_seen += tokens
            seconds = time.perf_counter() - t0
            done = step + 1
            if done % spec.train.log_every == 0 or done == spec.train.steps or done == start_step + 1:
                tps = tokens / seconds
                mfu = model_flops_utilisation(tps, flops_per_token, machine_peak)  # None without a peak
                observer.scalars(done, {"train/loss": loss, "train/ce_loss": ce, "train/aux_loss": aux,
                                        "perf/tokens_per_s": tps, "train/tokens": tokens_seen,
                                        **({"perf/mfu": mfu} if mfu is not None else {}),
                                        **({"train/grad_norm": float(grad_norm)} if grad_norm is not None else {}),
                                        **({"train/skipped_steps": engine.skipped_steps}
                                           if spec.train.precision == "fp16" else {}),
                                        **lrs})
                observer.routers(done, stats, loads, {i: r.e_score_correction_bias for i, r in biased.items()})
                if env.world_size > 1 and biased:
                    observer.scalars(done, {"moe/routing_bias_rank_spread": _rank_spread(biased)})
                observer.progress(done, {"loss": f"{loss:.3f}", "tok/s": f"{tps:,.0f}", "mfu": format_mfu(mfu)})
                if mfu is not None and mfu > 1 and not above_peak_said:
                    observer.message(MFU_ABOVE_PEAK_NOTE)
                    above_peak_said = True
            if done % spec.train.eval_every == 0 or done == spec.train.steps:
                val, hellaswag = evaluate(engine, val_batches, env.device), ""
                if spec.eval.hellaswag_limit:
                    scores = _hellaswag(engine, tokenizer, spec)
                    val.update({"hellaswag/acc": scores["acc"], "hellaswag/acc_norm": scores["acc_norm"]})
                    hellaswag = f", HellaSwag acc_norm {scores['acc_norm']:.3f} (n={scores['n']})"  # items scored
                observer.scalars(done, val)
                observer.message(f"step {done}: val loss {val['val/loss']:.4f} ppl {val['val/ppl']:.1f} "
                                 f"acc {val['val/acc']:.3f}{hellaswag}")
            stopping = packed[-1].item() > 0 or done == args.stop_after
            if done % spec.train.ckpt_every == 0 or done == spec.train.steps or stopping:
                _save(engine, out, done, tokens_seen, train_batches, spec, tokenizer, rank0)
            if stopping and done < spec.train.steps:
                # Every rank takes this branch alike (packed is all-reduced), so the collective is safe.
                reason = (f"signal {_agreed_signal(stop.signum, env.device)}" if packed[-1].item() > 0
                          else "--stop-after")
                observer.message(f"stopped by {reason} at step {done}; resume with --resume; "
                                 f"checkpoint {out / checkpoints.CHECKPOINTS / checkpoints.tag_for(done)}")
                observer.close()
                return 0
    except NonFiniteLoss as err:
        observer.close()
        last = checkpoints.latest_tag(out)
        print(f"training: stopped: {err}; last good checkpoint: {out / checkpoints.CHECKPOINTS / last if last else 'none'}",
              file=sys.stderr)
        return EXIT_NONFINITE

    wall = time.perf_counter() - wall_start
    observer.hparams(_hparams(spec), {"hparam/val_loss": val.get("val/loss", float("nan"))})
    observer.close()
    if rank0:
        final = out / checkpoints.CHECKPOINTS / checkpoints.tag_for(spec.train.steps)
        print(
            f"done: {spec.train.steps} steps ({spec.train.steps - start_step} this run), {tokens_seen:,} tokens, "
            f"val loss {val.get('val/loss', float('nan')):.4f} (ppl {val.get('val/ppl', float('nan')):.1f}, "
            f"ln V = {math.log(spec.model.vocab_size):.2f}), {wall:.0f} s; checkpoint {final}; "
            f"view: tensorboard --logdir {out.parent}",
            flush=True,
        )
    return 0


def _hellaswag(engine, tokenizer: Tokenizer, spec: RunSpec) -> dict[str, float]:
    """hellaswag_accuracy's {"acc", "acc_norm", "n"} at the length the model trains on."""
    from training.evaluation import hellaswag_accuracy

    return hellaswag_accuracy(engine.module, tokenizer, spec.eval.hellaswag_path, limit=spec.eval.hellaswag_limit,
                              batch_size=spec.train.micro_batch_size, max_length=spec.data.seq_len)


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


def _rank_spread(routers: dict) -> float:
    """Largest difference of any routing bias between ranks (0 when the update is in sync)."""
    flat = torch.cat([r.e_score_correction_bias for r in routers.values()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return (high - low).max().item()


def _check_finite(loss: torch.Tensor, step: int, micro: int) -> None:
    finite = torch.isfinite(loss.detach()).float()
    if dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank stops together
    if finite.item() < 1:
        raise NonFiniteLoss(f"the loss is {loss.item()} at step {step} (micro-batch {micro + 1})")


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


def _hparams(spec: RunSpec) -> dict:
    from zoo.overrides import flatten

    return {k: v for k, v in flatten(spec).items() if isinstance(v, (int, float, str, bool))}


def _json(value) -> str:
    import json

    return json.dumps(value, indent=2) + "\n"


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
        from training.evaluation.lm import EvalError  # e.g. a HellaSwag item longer than the context

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
