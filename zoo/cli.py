"""The `zoo` command: list, show, diff, describe and graph presets; import/export Hugging Face checkpoints;
evaluate (`eval`) and sample from (`generate`) run folders.

Every user error (unknown preset, bad --set, missing program) prints one line `zoo: error: ...`
and exits 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from zoo import presets
from zoo.overrides import ABSENT, SpecError, diff
from zoo.presets import resolve
from zoo.specs import RunSpec

EXIT_USAGE = 2
GRAPH_FORMATS = ("png", "svg", "pdf", "dot")


class UsageError(Exception):
    """A user error: printed as one line, exit status 2."""


def _add_spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", help="a preset name (see `zoo list`)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="edit a field, e.g. model.ffn.top_k=4 (repeatable; values are JSON)")
    parser.add_argument("--tiny", action="store_true", help="the same architecture at toy size")


def cmd_list(args: argparse.Namespace) -> None:
    width = max(len(n) for n in presets.names())
    for name in presets.names():
        print(f"{name:<{width}}  {presets.describe_line(name)}")


def cmd_show(args: argparse.Namespace) -> None:
    spec = resolve(args.preset, args.set, args.tiny)
    if args.json:
        print(spec.model_dump_json(indent=2))
    else:
        from zoo.overrides import flatten

        for path, value in flatten(spec).items():
            print(f"{path} = {json.dumps(value)}")


def cmd_diff(args: argparse.Namespace) -> None:
    a, b = resolve(args.a, args.set), resolve(args.b, args.set)
    rows = diff(a, b)
    if not rows:
        print(f"{args.a} and {args.b} are identical")
        return
    width = max(len(path) for path, _, _ in rows)
    print(f"{'field':<{width}}  {args.a} -> {args.b}")
    for path, left, right in rows:
        show = lambda v: v if v == ABSENT else json.dumps(v)  # noqa: E731
        print(f"{path:<{width}}  {show(left)} -> {show(right)}")


def cmd_describe(args: argparse.Namespace) -> None:
    from zoo.describe import describe, format_description

    spec = resolve(args.preset, args.set, args.tiny)
    info = describe(spec)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    if args.forward:
        _forward_pass(spec)


def _forward_pass(spec: RunSpec) -> None:
    """Build the real module and push one random sequence through it: proof the preset runs."""
    import math
    import time

    import torch

    from zoo.builders import build

    torch.manual_seed(spec.train.seed)
    model = build(spec).eval()
    ids = torch.randint(0, spec.model.vocab_size, (1, spec.model.max_seq_len))
    start = time.perf_counter()
    with torch.no_grad():
        out = model(ids, labels=ids)
    seconds = time.perf_counter() - start
    print(
        f"forward pass: 1 x {ids.shape[1]} random tokens -> logits {tuple(out.logits.shape)}, "
        f"cross-entropy {out.ce_loss.item():.3f} (ln V = {math.log(spec.model.vocab_size):.3f}), "
        f"aux loss {out.aux_loss.item():.2e}, {seconds:.2f} s"
    )


def cmd_graph(args: argparse.Namespace) -> None:
    out = Path(args.output)
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in GRAPH_FORMATS:
        raise UsageError(f"-o {args.output}: use a file ending in {', '.join('.' + f for f in GRAPH_FORMATS)}")
    if fmt != "dot" and shutil.which("dot") is None:
        raise UsageError(
            "zoo graph needs Graphviz's `dot` program: install it (Debian/Ubuntu: apt-get install graphviz; "
            "macOS: brew install graphviz), or write -o FILE.dot"
        )
    import fiddle.graphviz

    from zoo.builders import model_config

    graph = fiddle.graphviz.render(model_config(resolve(args.preset, args.set, args.tiny)), max_depth=args.max_depth)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(graph.source.encode() if fmt == "dot" else graph.pipe(format=fmt))
    print(f"wrote {out}")


def cmd_import_hf(args: argparse.Namespace) -> None:
    from zoo.interop.hf import import_hf

    print("\n".join(import_hf(args.source, args.out)))


def cmd_export_hf(args: argparse.Namespace) -> None:
    from zoo.interop.hf import export_hf
    from zoo.tokenizer import TokenizerError

    try:
        print("\n".join(export_hf(args.run_dir, args.out)))
    except TokenizerError as err:
        raise UsageError(str(err)) from None


def cmd_eval(args: argparse.Namespace) -> None:
    from zoo.evaluation.harness import EvalError, eval_run
    from zoo.generate import RunError
    from zoo.tokenizer import TokenizerError

    tasks = [name.strip() for name in (args.tasks or "").split(",") if name.strip()]
    data_files = {}
    for item in args.data_file:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--data-file {item!r}: write it as TASK=PATH, "
                             "e.g. hellaswag=../shared/data/hellaswag_val.jsonl")
        data_files[name] = path
    try:
        eval_run(args.run_dir, tasks=tasks, data_files=data_files, limit=args.limit, ppl=args.ppl,
                 batch_size=args.batch_size, max_length=args.max_length, output=args.output, step=args.step)
    except (EvalError, RunError, TokenizerError) as err:
        raise UsageError(str(err)) from None


def cmd_generate(args: argparse.Namespace) -> None:
    import time

    from zoo.generate import (GenerationError, RunError, Sampling, check_fits, dynamic_ntk_limit, generate,
                              load_run)
    from zoo.tokenizer import TokenizerError

    if args.speculative and (args.temperature > 0 or args.no_cache):
        flag = "--no-cache" if args.no_cache else f"--temperature {args.temperature}"
        raise UsageError(f"--speculative {args.speculative} decodes greedily with the KV cache: drop {flag}")
    cuts = [flag for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p)) if value is not None]
    if cuts and not args.temperature > 0:
        # Temperature 0 is greedy and would ignore them: the user asked to sample but would not.
        flags = " and ".join(cuts)
        raise UsageError(f"{flags} only appl{'y' if len(cuts) > 1 else 'ies'} when sampling, and --temperature "
                         f"{args.temperature} decodes greedily: give --temperature > 0 (e.g. 0.8) to sample, "
                         f"or drop {flags}")
    try:
        sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        model, spec, tokenizer = load_run(args.run_dir)
        # The prompt starts a document, as every training document starts after an EOS.
        prompt = [tokenizer.eos_id, *tokenizer.encode(args.prompt)]
        check_fits(len(prompt), args.max_new_tokens, spec.model.max_seq_len)
    except (GenerationError, RunError, TokenizerError) as err:
        raise UsageError(str(err)) from None
    if args.speculative and not spec.model.mtp.depth:
        raise UsageError(f"--speculative mtp: {args.run_dir} has no MTP modules (model.mtp.depth = 0); train one "
                         "with model.mtp.depth >= 1 (e.g. --preset deepseek_glm4_mtp), or drop --speculative")
    ntk_limit = dynamic_ntk_limit(spec.model)
    # The last forward pass sees the prompt and every new token but the last.
    if not args.no_cache and ntk_limit is not None and len(prompt) + args.max_new_tokens - 1 > ntk_limit:
        print(f"zoo: warning: dynamic-NTK RoPE with the KV cache: past original_max_seq_len ({ntk_limit} tokens) "
              "cached keys keep their own step's rotation (as in transformers), so the tokens may differ from "
              "--no-cache", file=sys.stderr)
    start = time.perf_counter()
    common = dict(max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_id, max_seq_len=spec.model.max_seq_len,
                  tokenizer_vocab_size=tokenizer.vocab_size)
    if args.speculative:
        from zoo.speculative import SpeculativeStats, iter_generate_mtp

        stats = SpeculativeStats()
        tokens = list(iter_generate_mtp(model, prompt, stats=stats, **common))
    else:
        tokens = generate(model, prompt, sampling=sampling, seed=args.seed, use_cache=not args.no_cache, **common)
    seconds = time.perf_counter() - start
    print(args.prompt + tokenizer.decode(tokens))
    print(f"{len(tokens)} new tokens in {seconds:.2f} s ({len(tokens) / seconds:.1f} tokens/s, "
          f"KV cache {'off' if args.no_cache else 'on'})", file=sys.stderr)
    if args.speculative:
        print(f"speculative mtp: {stats.accepted} of {stats.drafted} drafts accepted (acceptance rate "
              f"{stats.acceptance_rate:.3f}), {stats.tokens_per_forward:.2f} tokens per forward of the main model "
              f"({stats.forwards} forwards)", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo", description="Blueberry Zoo: compose, inspect and compare MoE presets.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("list", help="every preset with one line of description").set_defaults(fn=cmd_list)

    show = sub.add_parser("show", help="the resolved spec of a preset")
    _add_spec_args(show)
    show.add_argument("--json", action="store_true", help="the spec as JSON (loadable with RunSpec.model_validate_json)")
    show.set_defaults(fn=cmd_show)

    d = sub.add_parser("diff", help="field-path differences between two presets")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="applied to both sides")
    d.set_defaults(fn=cmd_diff)

    desc = sub.add_parser("describe", help="parameters, active parameters, FLOPs and KV cache per block")
    _add_spec_args(desc)
    desc.add_argument("--json", action="store_true")
    desc.add_argument("--forward", action="store_true", help="also build the module and run one forward pass")
    desc.set_defaults(fn=cmd_describe)

    g = sub.add_parser("graph", help="draw the Fiddle config graph with Graphviz")
    _add_spec_args(g)
    g.add_argument("-o", "--output", required=True, help="FILE.png, .svg, .pdf or .dot")
    g.add_argument("--max-depth", type=int, default=None, help="collapse the graph below this depth")
    g.set_defaults(fn=cmd_graph)

    imp = sub.add_parser("import-hf", help="a Hugging Face deepseek_v3 / glm4_moe directory -> a run folder")
    imp.add_argument("source", metavar="DIR", help="a transformers directory (config.json + safetensors)")
    imp.add_argument("--out", required=True, metavar="RUN_DIR", help="the run folder to write")
    imp.set_defaults(fn=cmd_import_hf)

    exp = sub.add_parser("export-hf", help="a run folder -> a directory transformers loads")
    exp.add_argument("run_dir", metavar="RUN_DIR")
    exp.add_argument("--out", required=True, metavar="DIR", help="the transformers directory to write")
    exp.set_defaults(fn=cmd_export_hf)

    ev = sub.add_parser("eval", help="lm-eval tasks (HellaSwag, LAMBADA, ...) and held-out perplexity of a run")
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a run folder: spec.json, model.safetensors, and tokenizer.model "
                    "(or hf_tokenizer/ in an imported run)")
    ev.add_argument("--tasks", default="", help="comma-separated lm-eval tasks, e.g. hellaswag,lambada_openai")
    ev.add_argument("--data-file", action="append", default=[], metavar="TASK=PATH",
                    help="read the split lm-eval's TASK evaluates from a local .jsonl, .json or .parquet file "
                         "instead of the hub (any task whose documents come from one split)")
    ev.add_argument("--limit", type=int, default=None, help="the first N items of each task (documents for --ppl)")
    ev.add_argument("--ppl", metavar="PATH", default=None, help="perplexity of a held-out text/JSONL file")
    ev.add_argument("--batch-size", type=int, default=None, help="sequences per forward pass (default 16)")
    ev.add_argument("--max-length", type=int, default=None,
                    help="the context in tokens (default: the model's max_seq_len; e.g. data.seq_len to score at "
                         "the training length)")
    ev.add_argument("--output", default=None, help="the JSON file to write (default RUN_DIR/eval/eval-<time>.json)")
    ev.add_argument("--step", type=int, default=None,
                    help="the TensorBoard step to log the scores at (default: the run's latest checkpoint step)")
    ev.set_defaults(fn=cmd_eval)

    gen = sub.add_parser("generate", help="sample text from a run folder (KV cache; greedy by default)")
    gen.add_argument("run_dir", metavar="RUN_DIR")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    gen.add_argument("--top-k", type=int, default=None,
                     help="sample among the k most likely tokens (needs --temperature > 0)")
    gen.add_argument("--top-p", type=float, default=None,
                     help="sample within the top-p probability mass (needs --temperature > 0)")
    gen.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (reference)")
    gen.add_argument("--speculative", choices=["mtp"], default=None,
                     help="greedy speculative decoding: the MTP modules draft, one main forward verifies "
                          "(the same tokens as plain greedy)")
    gen.set_defaults(fn=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except (SpecError, UsageError) as err:
        print(f"zoo: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `zoo show x | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
