"""python -m experiments {exp1,exp2,exp3,exp4,all} [--smoke] [--show] [--report] [--jobs N] [--runs DIR] [--results DIR]

Trains what is missing (each finished run summarised into RESULTS/expN/runs/ at once), then writes the
results folder. TensorBoard reads the run folders themselves: tensorboard --logdir runs/experiments/expN
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

from experiments import EXPERIMENTS
from experiments.report import summary_lines, write_report
from experiments.results import collect
from experiments.runner import ROOT, RunFailed, run_experiment

RUNS = ROOT / "runs" / "experiments"  # runs/ is git-ignored
RESULTS = ROOT / "experiments" / "results"


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of runs >= 1")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    p.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    p.add_argument("--show", action="store_true", help="print each variant's diff from the base, the scale and budget")
    p.add_argument("--smoke", action="store_true",
                   help="every variant, one seed, a few steps at toy size; writes under --out (default a temp dir)")
    p.add_argument("--report", action="store_true",
                   help="train nothing: rebuild results.csv, table.md, README.md and the plots from the run "
                        "summaries (and from finished run folders not yet summarised)")
    p.add_argument("--jobs", type=_positive, default=None,
                   help="runs trained at once (default 1; 2 with --smoke, whose runs are mostly start-up)")
    p.add_argument("--out", type=Path, default=None, help="smoke: where runs/ and results/ go")
    p.add_argument("--runs", type=Path, default=None, help=f"run folders (default {RUNS.relative_to(ROOT)})")
    p.add_argument("--results", type=Path, default=None,
                   help=f"results folders (default {RESULTS.relative_to(ROOT)})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    if args.show:
        print("\n\n".join(EXPERIMENTS[n].show(smoke=args.smoke) for n in names))
        return 0
    runs_root, results_root = args.runs or RUNS, args.results or RESULTS
    if args.smoke:  # never over the committed results
        out = args.out or Path(tempfile.mkdtemp(prefix="experiments-smoke-"))
        runs_root, results_root = args.runs or out / "runs", args.results or out / "results"
    for name in names:
        experiment = EXPERIMENTS[name]
        start = time.perf_counter()
        try:
            runs = run_experiment(experiment, runs_root.resolve(), results_root.resolve(), smoke=args.smoke,
                                  train=not args.report, jobs=args.jobs or (2 if args.smoke else 1),
                                  log=lambda line: print(line, flush=True))
        except RunFailed as err:
            print(f"experiments: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("experiments: stopped; the interrupted runs saved checkpoints; run the same command to resume",
                  file=sys.stderr)
            return 128 + signal.SIGINT
        results = collect(experiment, runs)
        folder = results_root / name
        planned = len(experiment.variants) * len(experiment.seeds_for(args.smoke))
        files = write_report(experiment, results, folder, planned=planned, smoke=args.smoke)
        print(f"{name}: {len(runs)} of {planned} runs summarised, {time.perf_counter() - start:.0f} s; wrote "
              f"{len(files)} files in {folder}")
        print("\n".join(summary_lines(experiment, results)))
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM stops the runs as Ctrl-C does, with checkpoints
    sys.exit(main())
