"""The `zoo` command as a user runs it: output, exit codes, and one-line errors without tracebacks."""

import contextlib
import io
import json
import shutil
import subprocess
import sys

import pytest

import zoo
from zoo import presets
from zoo.cli import main


def run(*args):
    """`zoo ARGS` in this process (an uncaught exception fails the test); argparse's own errors exit 2."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def test_list_shows_every_preset():
    """As a process, the way a user runs it: the entry point itself is under test here."""
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "list"], capture_output=True, text=True, timeout=120)
    code, out = proc.returncode, proc.stdout
    assert code == 0
    listed = [line.split()[0] for line in out.strip().splitlines()]
    assert listed == presets.names()


def test_show_json_is_the_resolved_spec():
    code, out, _ = run("show", "deepseek_glm4", "--set", "model.ffn.n_experts=16", "--json")
    assert code == 0
    spec = json.loads(out)
    assert spec["model"]["ffn"]["n_experts"] == 16 and spec["model"]["attention"]["kind"] == "mla"
    code, out, err = run("show", "deepseek_glm4", "--set", "model.ffn.kind=mlp", "--set", "model.ffn.d_hidden=256",
                         "--json")
    assert code == 0, err
    assert json.loads(out)["model"]["ffn"] == {"kind": "mlp", "d_hidden": 256}


@pytest.mark.parametrize("args,words", [
    (["show", "nope"], ["unknown preset 'nope'", "deepseek_glm4"]),
    (["show", "deepseek_glm4", "--set", "model.ffn.top_k=99"], ["top_k (99)"]),
    (["show", "deepseek_glm4", "--set", "model.nosuch=1"], ["unknown field 'model.nosuch'", "valid keys"]),
    (["show", "deepseek_glm4", "--set", "model.d_model=abc"], ["model.d_model", "integer"]),
    (["describe", "nope"], ["unknown preset"]),
    (["diff", "glm4", "nope"], ["unknown preset"]),
    (["graph", "deepseek_glm4", "-o", "g.jpeg"], [".png", ".svg"]),
])
def test_bad_input_is_one_line_exit_2(args, words):
    code, out, err = run(*args)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err


def test_diff_shows_attention_only():
    code, out, _ = run("diff", "glm4", "deepseek_glm4")
    assert code == 0
    fields = [line.split()[0] for line in out.strip().splitlines()[1:]]
    assert fields and all(f.startswith("model.attention.") for f in fields)


def test_describe_json_matches_the_built_module():
    code, out, _ = run("describe", "deepseek_glm4", "--json")
    assert code == 0
    info = json.loads(out)
    model = zoo.build(presets.get("deepseek_glm4"))
    assert info["total_params"] == sum(p.numel() for p in model.parameters())
    assert info["active_params"] < info["total_params"]
    # MLA caches only the latent and the shared rope key: (64 + 32) x 2 bytes x 6 layers.
    assert info["kv_cache_bytes_per_token"] == (64 + 32) * 2 * 6


def test_graph_writes_a_picture_or_says_how_to_get_dot(tmp_path):
    target = tmp_path / "g.png"
    code, out, err = run("graph", "deepseek_glm4", "--tiny", "-o", str(target))
    if shutil.which("dot"):
        assert code == 0, err
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert code == 2 and "apt-get install graphviz" in err and not target.exists()
    dot_file = tmp_path / "g.dot"
    code, _, err = run("graph", "deepseek_glm4", "-o", str(dot_file))
    assert code == 0, err
    assert "MultiHeadLatentAttention" in dot_file.read_text()
