"""The `zoo` command: list, show, diff, describe and graph presets.

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
from zoo.overrides import ABSENT, SpecError, apply_sets, diff
from zoo.specs import RunSpec

EXIT_USAGE = 2
GRAPH_FORMATS = ("png", "svg", "pdf", "dot")


class UsageError(Exception):
    """A user error: printed as one line, exit status 2."""


def resolve(name: str, sets: list[str] | None = None, tiny: bool = False) -> RunSpec:
    """A preset with --set edits applied: what every command (training included) starts from."""
    return apply_sets(presets.get(name, tiny=tiny), sets or [])


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
