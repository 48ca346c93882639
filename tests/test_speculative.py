"""Speculative greedy decoding with the MTP modules (zoo/speculative.py): the same tokens as plain greedy
decoding, token for token, whether the drafts are mostly accepted (a model trained on a repeating text) or
mostly rejected (a random one), at depth 1 and 2, up to the token budget and EOS; and `zoo generate
--speculative mtp`."""

from functools import cache
from pathlib import Path

import pytest
import torch

import zoo
from training.data import load_or_train_tokenizer
from zoo import presets
from zoo.checkpoint import save_run_folder
from zoo.cli import main
from zoo.generate import GenerationError, generate
from zoo.overrides import with_changes
from zoo.speculative import SpeculativeStats, iter_generate_mtp

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CYCLE = 11  # the period of the text the trained models learn
TRAIN_STEPS = 20  # enough for every draft on the cycle to be right


def _spec(name: str, depth: int):
    return with_changes(presets.get(name, tiny=True).model, {"mtp.depth": depth})


def _cycle(spec, n: int, start: int = 0) -> torch.Tensor:
    tokens = torch.randperm(spec.vocab_size, generator=torch.Generator().manual_seed(7))[:CYCLE]
    return tokens[(torch.arange(n) + start) % CYCLE]


@cache
def _trained(name: str, depth: int):
    """The model after a few Adam steps on a text that repeats every CYCLE tokens: the main model and its
    MTP modules learn it, so most drafts are right. Built first in its test, under the tests' fixed seed."""
    spec = _spec(name, depth)
    model = zoo.build(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = torch.stack([_cycle(spec, 48, start) for start in range(4)])
    for _ in range(TRAIN_STEPS):
        optimizer.zero_grad()
        model(batch, labels=batch).loss.backward()
        optimizer.step()
    return model.eval()


def _both(model, prompt, max_new_tokens, **kwargs):
    stats = SpeculativeStats()
    fast = list(iter_generate_mtp(model, prompt, max_new_tokens=max_new_tokens, stats=stats, **kwargs))
    plain = generate(model, prompt, max_new_tokens=max_new_tokens, **kwargs)
    return fast, plain, stats


@pytest.mark.parametrize("name,depth", [("deepseek_glm4", 1), ("glm4", 2)])
def test_speculative_greedy_equals_plain_greedy_token_for_token(name, depth):
    spec = _spec(name, depth)
    trained, random = _trained(name, depth), zoo.build(spec).eval()
    prompt = _cycle(spec, 6).tolist()
    n_new = spec.max_seq_len - len(prompt)  # to the end of the context
    fast, plain, stats = _both(trained, prompt, n_new, max_seq_len=spec.max_seq_len)
    assert fast == plain and len(fast) == n_new
    assert stats.tokens == n_new and stats.acceptance_rate > 0.5, stats
    assert stats.tokens_per_forward > 1.5 and stats.forwards == n_new - stats.accepted  # one per forward + accepted
    # A random model's drafts are mostly wrong: the rejections (and cache truncations) must not change a token.
    random_prompt = torch.randint(0, spec.vocab_size, (9,)).tolist()
    fast, plain, stats = _both(random, random_prompt, spec.max_seq_len - 9)
    assert fast == plain and stats.drafted > stats.accepted
    # Mixed: a trained model on a prompt off its cycle, at every budget up to a few tokens.
    mixed = [*random_prompt[:3], *_cycle(spec, 5).tolist()]
    for budget in (1, 2, 3, 5, 17):
        fast, plain, _ = _both(trained, mixed, budget)
        assert fast == plain and len(fast) == budget


def test_speculative_stops_before_eos_like_plain_greedy():
    spec = _spec("deepseek_glm4", 1)
    model = _trained("deepseek_glm4", 1)
    prompt = _cycle(spec, 6).tolist()
    eos = int(_cycle(spec, 1, start=9))  # three tokens into the continuation
    fast, plain, _ = _both(model, prompt, 30, eos_id=eos)
    assert fast == plain == _cycle(spec, 3, start=6).tolist()


def test_a_model_without_mtp_modules_is_refused():
    with pytest.raises(GenerationError, match="model.mtp.depth"):
        next(iter_generate_mtp(zoo.build(_spec("deepseek_glm4", 0)), [1, 2], max_new_tokens=4))


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """Tiny deepseek_glm4 run folders with and without an MTP module, sharing a tokenizer trained on a slice
    of Tiny Shakespeare."""
    paragraphs = [p for p in (DATA / "tinyshakespeare.txt").read_text().split("\n\n") if p.strip()][:800]
    tokenizer, _ = load_or_train_tokenizer(paragraphs, vocab_size=512, cache_dir=tmp_path_factory.mktemp("cache"))
    runs = {}
    for depth in (0, 1):
        spec = with_changes(presets.get("deepseek_glm4", tiny=True), {"model.mtp.depth": depth})
        runs[depth] = tmp_path_factory.mktemp(f"run_mtp{depth}")
        save_run_folder(zoo.build(spec), spec, runs[depth])
        tokenizer.save(runs[depth])
    return runs


def test_cli_generate_speculative_prints_the_plain_text_and_the_acceptance(run_dirs, capsys):
    texts = []
    for flags in ([], ["--speculative", "mtp"]):
        assert main(["generate", str(run_dirs[1]), "--prompt", "ROMEO:", "--max-new-tokens", "12", *flags]) == 0
        out, err = capsys.readouterr()
        texts.append(out)
    assert texts[0] == texts[1] and texts[0].startswith("ROMEO:")
    assert "12 new tokens" in err and "drafts accepted (acceptance rate" in err and "tokens per forward" in err


@pytest.mark.parametrize("run,flags,words", [
    (0, [], ["no MTP modules", "model.mtp.depth = 0"]),
    (1, ["--temperature", "0.8"], ["decodes greedily", "drop --temperature 0.8"]),
    (1, ["--no-cache"], ["drop --no-cache"]),
])
def test_cli_generate_speculative_bad_input_is_one_line_exit_2(run_dirs, capsys, run, flags, words):
    args = ["generate", str(run_dirs[run]), "--prompt", "hi", "--max-new-tokens", "4", "--speculative", "mtp", *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo: error:") and err.count("\n") == 1 and all(w in err for w in words), err
