"""The course (docs/course/): every lesson's code runs, every number its text quotes is the one its code
printed, every figure it shows is one its code drew.

A lesson's fenced `python` and `bash` blocks run in order, in one fresh folder laid out like the
repository root (`training/`, `ds_configs/` and `../shared/data/` are there), in a child interpreter: python blocks
share one namespace, as in a notebook; bash blocks run with `zoo`, `python` and `deepspeed` meaning this
interpreter's `zoo.cli`, this interpreter and its `deepspeed` launcher (on a free port). A block whose
fence says `fails="TEXT"` must fail, with TEXT in its error.

A quoted number is bold and followed by a marker naming what it quotes: `**144**<!-- KV cache per token -->`
takes the first number after `KV cache per token` on a line printed by the nearest code block before
it that printed that key (or, failing that, the nearest after it), and the quote must equal it rounded
to the quote's digits; `<!-- val loss ±0.05 -->` allows that much for figures that vary with the CPU,
and `<!-- leak at most -->` (or `at least`) makes the quote a bound on the printed number.

    python -m tests.test_course --figures    # rerun the lessons that show figures, copy them to docs/course/figures/
"""

import argparse
import atexit
import contextlib
import functools
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COURSE = ROOT / "docs" / "course"
LESSONS = sorted(COURSE.glob("[0-9][0-9]-*.md"))
LESSON_LIMIT_S = 60  # the budget per lesson on 2 CPU cores; reported, not asserted (shared machines)
# The fast lane runs lesson 1 (and the quote checks on it); the others take 5-40 s each on 2 cores.
SLOW_LESSONS = {"02-rope-scaling.md", "03-mla.md", "04-moe.md", "05-sigmoid-routing.md", "06-composing-a-hybrid.md",
                "07-training.md", "08-evaluating-and-exporting.md"}

FENCE = re.compile(r"^```(python|bash)([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
ANY_FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
QUOTE = re.compile(r"\*\*([^*\n]+)\*\*(?:<!--(.*?)-->)?")
NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
TOLERANCE = re.compile(r"^(.*?)\s*±\s*(\S+)$")
BOUND = re.compile(r"^(.*?)\s+(at most|at least)$")
FIGURE = re.compile(r"!\[[^\]]*\]\((figures/[^)\s]+)\)")
BASH_PRELUDE = """set -euo pipefail
zoo() { "$COURSE_PYTHON" -m zoo.cli "$@"; }
python() { "$COURSE_PYTHON" "$@"; }
deepspeed() { "$COURSE_DEEPSPEED" --master_port "$COURSE_PORT" "$@"; }
"""


@dataclass
class Block:
    lang: str
    code: str
    fails: str | None  # the text its error must hold, for a block meant to fail
    start: int  # offsets in the lesson's text
    end: int


def blocks_of(text: str) -> list[Block]:
    blocks = []
    for m in FENCE.finditer(text):
        fails = re.search(r'fails="([^"]*)"', m.group(2))
        blocks.append(Block(m.group(1), m.group(3), fails and fails.group(1), m.start(), m.end()))
    return blocks


# ----------------------------------------------------------------------------- checking quotes


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _printed(output: str, key: str) -> str | None:
    """The first number after `key` on the first line of `output` that holds it."""
    for line in output.splitlines():
        at = line.find(key)
        if at >= 0:
            found = NUMBER.search(line, at + len(key))
            if found:
                return found.group(0)
    return None


def check_quotes(text: str, blocks: list[Block], outputs: list[str]) -> list[str]:
    """What is wrong with the lesson's quoted numbers, given each block's output (empty: nothing)."""
    in_code = [(m.start(), m.end()) for m in ANY_FENCE.finditer(text)]
    problems = []
    for m in QUOTE.finditer(text):
        quoted, marker = m.group(1).strip(), m.group(2)
        if not NUMBER.fullmatch(quoted) or any(a <= m.start() < b for a, b in in_code):
            continue  # bold words, or code
        if marker is None:
            problems.append(f"**{quoted}** has no <!-- key --> marker saying which printed number it quotes")
            continue
        key, tolerance, bound = marker.strip(), None, None
        if tol := TOLERANCE.match(key):
            key, tolerance = tol.group(1), float(tol.group(2))
        if b := BOUND.match(key):
            key, bound = b.groups()
        before = [i for i, b in enumerate(blocks) if b.end <= m.start()][::-1]
        after = [i for i, b in enumerate(blocks) if b.start > m.start()]
        printed = next((p for i in before + after if (p := _printed(outputs[i], key)) is not None), None)
        if printed is None:
            problems.append(f"**{quoted}**<!-- {marker.strip()} -->: no code block printed {key!r} with a number")
            continue
        mantissa, _, exponent = quoted.lower().replace(",", "").partition("e")
        digits = len(mantissa.partition(".")[2]) - int(exponent or 0)  # 5.25: 2; 3.0e-07: 8
        value, want = _number(printed), _number(quoted)
        allowed = tolerance if tolerance is not None else 0.5 * 10**-digits * (1 + 1e-9)
        if bound is not None:
            if value > want if bound == "at most" else value < want:
                problems.append(f"**{quoted}**<!-- {marker.strip()} -->: the code printed {key} {printed}")
        elif abs(value - want) > allowed:
            problems.append(f"**{quoted}**<!-- {marker.strip()} -->: the code printed {key} {printed}")
    return problems


# ----------------------------------------------------------------------------- running a lesson


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workspace(folder: Path) -> Path:
    """A folder that reads like the repository root: `training/`, `ds_configs/` and `../shared/data/` resolve."""
    work = folder / "work"
    work.mkdir()
    for name in ("training", "ds_configs"):
        (work / name).symlink_to(ROOT / name)
    (folder / "shared").symlink_to(ROOT.parent / "shared")
    return work


def _run_blocks(lesson: Path, work: Path) -> list[dict]:
    """In this (child) process: run the lesson's blocks in `work`; each gives its output and error."""
    os.chdir(work)
    namespace = {"__name__": "__lesson__"}
    results = []
    for i, block in enumerate(blocks_of(lesson.read_text())):
        out, error = io.StringIO(), None
        if block.lang == "python":
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                try:
                    exec(compile(block.code, f"<{lesson.name} block {i + 1}>", "exec"), namespace)
                except Exception as e:  # noqa: BLE001 (a lesson's error is reported, not raised)
                    error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
        else:
            proc = subprocess.run(["bash", "-c", BASH_PRELUDE + block.code], capture_output=True, text=True)
            out.write(proc.stdout + proc.stderr)
            if proc.returncode:
                error = f"exit status {proc.returncode}: {proc.stderr[-3000:]}"
        results.append({"output": out.getvalue(), "error": error})
        if error and block.fails is None:
            break  # the rest of the lesson depends on this block
    return results


@dataclass
class LessonRun:
    text: str
    blocks: list[Block]
    results: list[dict]
    work: Path
    seconds: float


@functools.cache
def run_lesson(lesson: Path) -> LessonRun:
    folder = Path(tempfile.mkdtemp(prefix=f"course-{lesson.stem}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    work = _workspace(folder)
    python_path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": python_path, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "COURSE_PYTHON": sys.executable, "COURSE_PORT": str(_free_port()),
           "COURSE_DEEPSPEED": str(Path(sys.executable).parent / "deepspeed")}
    env.setdefault("ZOO_CACHE", str(Path(tempfile.gettempdir()) / "zoo-course-cache"))
    env.setdefault("OMP_NUM_THREADS", "1")  # toy shapes gain nothing from threads; on a busy machine they stall
    report = folder / "results.json"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tests.test_course", "--run", str(lesson), "--work", str(work),
                           "--report", str(report)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"the lesson runner crashed: {proc.stderr[-3000:]}")
    text = lesson.read_text()
    return LessonRun(text, blocks_of(text), json.loads(report.read_text()), work, seconds)


# ----------------------------------------------------------------------------- tests


def _lesson_params():
    return [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.name in SLOW_LESSONS else [])
            for p in LESSONS]


def test_the_course_has_an_index_and_eight_lessons():
    assert (COURSE / "README.md").is_file()
    assert len(LESSONS) >= 8
    index = (COURSE / "README.md").read_text()
    for lesson in LESSONS:
        assert f"({lesson.name})" in index, f"the index does not link {lesson.name}"


@pytest.mark.parametrize("lesson", _lesson_params())
def test_lesson(lesson):
    run = run_lesson(lesson)
    assert len(run.results) == len(run.blocks), (
        f"{lesson.name}: block {len(run.results)} failed:\n{run.results[-1]['error']}\n{run.results[-1]['output'][-3000:]}")
    for i, (block, result) in enumerate(zip(run.blocks, run.results)):
        if block.fails is not None:
            assert result["error"] is not None, f"{lesson.name} block {i + 1} should fail ({block.fails}) but ran"
            assert block.fails in result["error"] + result["output"], (
                f"{lesson.name} block {i + 1} failed otherwise than the text says:\n{result['error']}")
    problems = check_quotes(run.text, run.blocks, [r["output"] for r in run.results])
    assert not problems, f"{lesson.name}:\n" + "\n".join(problems)
    for figure in FIGURE.findall(run.text):
        assert (run.work / figure).is_file(), f"{lesson.name} shows {figure}, which its code did not draw"
        assert (COURSE / figure).is_file(), f"{figure} is not committed: python -m tests.test_course --figures"
    print(f"{lesson.name}: {run.seconds:.1f} s (budget {LESSON_LIMIT_S} s)")


def test_a_changed_quote_fails_the_check():
    lesson = LESSONS[0]
    run = run_lesson(lesson)
    outputs = [r["output"] for r in run.results]
    quotes = [m for m in QUOTE.finditer(run.text) if NUMBER.fullmatch(m.group(1).strip()) and m.group(2)
              and not BOUND.match(m.group(2).strip())]  # a bound may still hold with another digit
    assert quotes and not check_quotes(run.text, run.blocks, outputs)
    for m in quotes:
        quoted = m.group(1).strip()
        first = re.search(r"\d", quoted).start()  # the leading digit: a change beyond any tolerance
        wrong = quoted[:first] + str((int(quoted[first]) + 1) % 10) + quoted[first + 1:]
        mutated = run.text[:m.start(1)] + wrong + run.text[m.end(1):]
        assert check_quotes(mutated, blocks_of(mutated), outputs), f"**{wrong}** instead of **{quoted}** passed"


def test_quote_rules():
    text = "```python\nprint('loss: 5.2520')\n```\nLoss **5.25**<!-- loss -->, about **5.3**<!-- loss ±0.1 -->."
    blocks = blocks_of(text)
    assert check_quotes(text, blocks, ["loss: 5.2520\n"]) == []
    assert check_quotes(text.replace("5.25*", "5.26*"), blocks, ["loss: 5.2520\n"])
    assert check_quotes(text.replace("5.3*", "5.4*"), blocks, ["loss: 5.2520\n"])
    bound = "```python\nprint('leak: 2.4e-07')\n```\nunder **1e-06**<!-- leak at most -->"
    assert check_quotes(bound, blocks_of(bound), ["leak: 2.4e-07\n"]) == []
    assert check_quotes(bound.replace("1e-06", "1e-07"), blocks_of(bound), ["leak: 2.4e-07\n"])
    assert "no <!-- key --> marker" in check_quotes("We got **12**.", [], [])[0]
    assert "no code block printed" in check_quotes(text.replace("<!-- loss -->", "<!-- ppl -->"), blocks,
                                                   ["loss: 5.2520\n"])[0]


# ----------------------------------------------------------------------------- command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--figures", action="store_true", help="run every lesson that shows a figure and copy "
                        "its figures to docs/course/figures/")
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)  # the child: run one lesson's blocks
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        args.report.write_text(json.dumps(_run_blocks(args.run, args.work)))
        return
    if not args.figures:
        parser.error("nothing to do: pass --figures (the tests run with pytest)")
    (COURSE / "figures").mkdir(exist_ok=True)
    for lesson in [p for p in LESSONS if FIGURE.search(p.read_text())]:
        run = run_lesson(lesson)
        for figure in FIGURE.findall(run.text):
            shutil.copyfile(run.work / figure, COURSE / figure)
            print(f"{lesson.name}: {figure}")


if __name__ == "__main__":
    main()
