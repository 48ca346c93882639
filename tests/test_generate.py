"""Generation with a KV cache: cached decoding equals the full forward for every attention kind, greedy
generation with the cache equals generation without it for every preset, sampling obeys its knobs,
and `zoo generate` answers bad input with one line."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import zoo  # noqa: E402
from training.data import load_or_train_tokenizer  # noqa: E402
from zoo import presets  # noqa: E402
from zoo.checkpoint import save_run_folder  # noqa: E402
from zoo.describe import describe  # noqa: E402
from zoo.generate import GenerationError, Sampling, dynamic_ntk_limit, generate, sample_next  # noqa: E402
from zoo.overrides import with_changes  # noqa: E402
from zoo.tokenizer import Tokenizer  # noqa: E402
from zoo.specs import (  # noqa: E402
    DynamicNTKScaling,
    LinearScaling,
    MHASpec,
    MLASpec,
    ModelSpec,
    MoESpec,
    RopeSpec,
    SigmoidGroupTopKRouterSpec,
    YarnScaling,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# CLI subprocesses: no hub, and one thread (see _one_thread).
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
VOCAB = 512  # a byte-fallback BPE needs > 258 pieces; the tiny presets' 256 is raised to this
FP32_TOL = 1e-5  # cached vs full forward: the same math on different tensor shapes, fp32 rounding only


pytestmark = pytest.mark.usefixtures("one_thread")

YARN = RopeSpec(scaling=YarnScaling(factor=4.0, original_max_seq_len=16, mscale=1.0, mscale_all_dim=1.0))
NTK_ORIGINAL = 16
ATTENTION_KINDS = {
    "mha": MHASpec(n_heads=4),
    "gqa": MHASpec(n_heads=4, n_kv_heads=2),
    "mqa": MHASpec(n_heads=4, n_kv_heads=1),
    "gqa_partial_rotary_qk_norm_bias": MHASpec(n_heads=4, n_kv_heads=2, qk_norm="head", qkv_bias=True,
                                               rotary_fraction=0.5),
    "gqa_projection_qk_norm_biases": MHASpec(n_heads=4, n_kv_heads=2, qk_norm="projection", qkv_bias=True,
                                             o_bias=True),  # as in olmoe
    "gqa_head_qk_norm_sliding_window": MHASpec(n_heads=4, n_kv_heads=2, qk_norm="head", sliding_window=5),
    "mha_linear_rope": MHASpec(n_heads=4, rope=RopeSpec(scaling=LinearScaling(factor=2.0))),
    "mha_yarn": MHASpec(n_heads=4, rope=YARN),
    "mla": MLASpec(n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16),
    "mla_q_lora": MLASpec(n_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                          v_head_dim=16),
    "mla_interleaved_yarn": MLASpec(n_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                                    qk_rope_head_dim=8, v_head_dim=12, rope_layout="interleaved", rope=YARN),
}
MOE = MoESpec(n_experts=4, top_k=2, d_expert=32, n_shared_experts=1,
              router=SigmoidGroupTopKRouterSpec(n_groups=2, topk_groups=1))


def _model(attention, vocab=97):
    spec = ModelSpec(vocab_size=vocab, d_model=64, n_layers=2, max_seq_len=64, attention=attention, ffn=MOE)
    return zoo.build(spec).eval()


def _incremental_logits(model, ids, splits=(10, 13)):
    """Prefill ids[:, :10], then a 3-token chunk, then one token at a time, all through one cache."""
    cache = model.new_cache()
    bounds = [0, *splits, *range(splits[-1] + 1, ids.shape[1] + 1)]
    with torch.no_grad():
        parts = [model(ids[:, a:b], cache=cache).logits for a, b in zip(bounds, bounds[1:])]
    assert cache.length == ids.shape[1]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_cached_decoding_equals_full_forward(kind):
    model = _model(ATTENTION_KINDS[kind])
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(_incremental_logits(model, ids), full, atol=FP32_TOL, rtol=0)


def test_dynamic_ntk_cache_matches_within_the_original_context_only():
    """Dynamic NTK rescales frequencies by the length seen so far; cached keys keep the rotation of
    their own step (as in transformers), so equality holds up to original_max_seq_len and not past it."""
    rope = RopeSpec(scaling=DynamicNTKScaling(factor=2.0, original_max_seq_len=NTK_ORIGINAL))
    model = _model(MHASpec(n_heads=4, rope=rope))
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full_short = model(ids[:, :NTK_ORIGINAL]).logits
        full_long = model(ids).logits
    incremental = _incremental_logits(model, ids, splits=(8, 11))
    torch.testing.assert_close(incremental[:, :NTK_ORIGINAL], full_short, atol=FP32_TOL, rtol=0)
    assert (incremental[:, NTK_ORIGINAL:] - full_long[:, NTK_ORIGINAL:]).abs().max() > 1e-4


@pytest.mark.parametrize("name", presets.names())
def test_greedy_with_cache_equals_without_token_for_token(name):
    spec = presets.get(name, tiny=True)
    model = zoo.build(spec).eval()
    prompt = torch.randint(0, spec.model.vocab_size, (9,)).tolist()
    n_new = spec.model.max_seq_len - len(prompt)  # run to the end of the context
    cached = generate(model, prompt, max_new_tokens=n_new, max_seq_len=spec.model.max_seq_len)
    uncached = generate(model, prompt, max_new_tokens=n_new, max_seq_len=spec.model.max_seq_len, use_cache=False)
    assert len(cached) == n_new
    assert cached == uncached


@pytest.mark.parametrize("name", ["deepseek_glm4", "glm4", "baseline"])
def test_cache_bytes_per_token_match_describe(name):
    """What the cache holds is what `zoo describe` reports (describe counts bf16; this cache is fp32)."""
    spec = presets.get(name, tiny=True)
    model = zoo.build(spec).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, spec.model.vocab_size, (3, 5)), cache=cache)
    assert cache.nbytes_per_token() == describe(spec)["kv_cache_bytes_per_token"] * 4 // 2


def test_cache_grows_past_its_capacity():
    model = _model(ATTENTION_KINDS["mla"])
    ids = torch.randint(0, 97, (1, 30))
    cache = model.new_cache(capacity=4)
    with torch.no_grad():
        full = model(ids).logits
        parts = [model(ids[:, t:t + 1], cache=cache).logits for t in range(30)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=FP32_TOL, rtol=0)


# ----------------------------------------------------------------------------- sampling


def test_top_k_and_top_p_keep_the_right_tokens():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    generator = torch.Generator().manual_seed(0)

    def support(sampling):
        return {int(sample_next(logits, sampling, generator)) for _ in range(400)}

    assert support(Sampling(temperature=1.0)) == {0, 1, 2, 3}
    assert support(Sampling(temperature=1.0, top_k=2)) == {1, 3}
    # 0.5 < 0.7: token 3 (0.3) is still needed to reach 0.7; token 2 is not.
    assert support(Sampling(temperature=1.0, top_p=0.7)) == {1, 3}
    assert support(Sampling(temperature=1.0, top_p=0.5)) == {1}
    assert support(Sampling(temperature=1.0, top_k=3, top_p=0.95)) == {1, 2, 3}
    assert int(sample_next(logits, Sampling())) == 1  # greedy


def test_sampling_is_reproducible_with_a_seed_and_degenerates_to_greedy():
    spec = presets.get("deepseek_glm4", tiny=True)
    model = zoo.build(spec).eval()
    prompt = [1, 2, 3]
    hot = Sampling(temperature=1.5)
    first = generate(model, prompt, max_new_tokens=20, sampling=hot, seed=7)
    assert first == generate(model, prompt, max_new_tokens=20, sampling=hot, seed=7)
    assert first != generate(model, prompt, max_new_tokens=20, sampling=hot, seed=8)
    greedy = generate(model, prompt, max_new_tokens=20)
    assert generate(model, prompt, max_new_tokens=20, sampling=Sampling(temperature=1.0, top_k=1), seed=3) == greedy


def test_generation_stops_before_eos_and_checks_the_context():
    spec = presets.get("glm4", tiny=True)
    model = zoo.build(spec).eval()
    prompt, hot = [5, 6, 7], Sampling(temperature=2.0)
    tokens = generate(model, prompt, max_new_tokens=20, sampling=hot, seed=0)
    first_new = next(i for i, token in enumerate(tokens) if i > 0 and token not in tokens[:i])
    stopped = generate(model, prompt, max_new_tokens=20, sampling=hot, seed=0, eos_id=tokens[first_new])
    assert stopped == tokens[:first_new]
    ctx = spec.model.max_seq_len
    with pytest.raises(GenerationError, match=f"context \\(max_seq_len\\) is {ctx}"):
        generate(model, list(range(ctx)), max_new_tokens=1, max_seq_len=ctx)
    with pytest.raises(GenerationError, match=f"max_new_tokens <= {ctx - 3}"):
        generate(model, prompt, max_new_tokens=ctx, max_seq_len=ctx)
    with pytest.raises(GenerationError, match="top_p"):
        Sampling(temperature=1.0, top_p=1.5)


def test_tiny_temperatures_sample_the_top_token_and_non_finite_ones_are_refused():
    """logits / 1e-39 overflows to inf, and a softmax of that is NaN that torch.multinomial refuses: a tiny
    temperature must still sample the top token."""
    logits = torch.tensor([[3.0, 40.0, 39.0, -2.0]])
    generator = torch.Generator().manual_seed(0)
    for temperature in (1e-39, 1e-37, 1e-6):
        for top_k, top_p in ((None, None), (2, None), (None, 0.9)):
            sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
            assert int(sample_next(logits, sampling, generator)) == 1
    for temperature in (float("inf"), float("nan")):
        with pytest.raises(GenerationError, match=f"temperature={temperature} must be a finite number"):
            Sampling(temperature=temperature)


def test_new_tokens_stay_within_the_tokenizer_vocab():
    """A model's vocab may be larger than its tokenizer's; ids past the tokenizer's cannot be decoded."""
    torch.manual_seed(0)
    model = _model(ATTENTION_KINDS["mha"])
    prompt, limit = [1, 2, 3], 10
    for sampling in (Sampling(), Sampling(temperature=1.0), Sampling(temperature=1.0, top_k=50)):
        tokens = generate(model, prompt, max_new_tokens=40, sampling=sampling, seed=0, tokenizer_vocab_size=limit)
        assert len(tokens) == 40 and max(tokens) < limit, tokens
    assert max(generate(model, prompt, max_new_tokens=40, sampling=Sampling(temperature=1.0), seed=0)) >= limit


def test_dynamic_ntk_limit_finds_every_dynamic_ntk_layer():
    ntk = MHASpec(n_heads=4, rope=RopeSpec(scaling=DynamicNTKScaling(original_max_seq_len=24)))
    base = ModelSpec(vocab_size=97, d_model=64, n_layers=2, max_seq_len=64, attention=MHASpec(n_heads=4), ffn=MOE)
    assert dynamic_ntk_limit(base) is None
    assert dynamic_ntk_limit(base.model_copy(update={"attention": ntk})) == 24
    assert dynamic_ntk_limit(with_changes(base, {"overrides": [{"layers": [1], "attention": ntk}]})) == 24


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny deepseek_glm4 run folder with a tokenizer trained on a slice of Tiny Shakespeare."""
    paragraphs = [p for p in (DATA / "tinyshakespeare.txt").read_text().split("\n\n") if p.strip()][:1500]
    tokenizer, _ = load_or_train_tokenizer(paragraphs, vocab_size=VOCAB, cache_dir=tmp_path_factory.mktemp("cache"))
    spec = with_changes(presets.get("deepseek_glm4", tiny=True), {"model.vocab_size": VOCAB})
    run = tmp_path_factory.mktemp("run")
    save_run_folder(zoo.build(spec), spec, run)
    tokenizer.save(run)
    return run


@pytest.fixture(scope="module")
def big_vocab_run_dir(run_dir, tmp_path_factory):
    """run_dir's tokenizer (512 pieces) with a model of 8x its vocab: a random model samples ids past 512."""
    spec = with_changes(presets.get("deepseek_glm4", tiny=True), {"model.vocab_size": 8 * VOCAB})
    run = tmp_path_factory.mktemp("big_vocab_run")
    save_run_folder(zoo.build(spec), spec, run)
    Tokenizer.load(run_dir).save(run)
    return run


NTK_RUN_ORIGINAL = 16


@pytest.fixture(scope="module")
def ntk_run_dir(run_dir, tmp_path_factory):
    spec = with_changes(presets.get("deepseek_glm4", tiny=True), {
        "model.vocab_size": VOCAB, "model.attention.rope.scaling.kind": "dynamic_ntk",
        "model.attention.rope.scaling.original_max_seq_len": NTK_RUN_ORIGINAL})
    run = tmp_path_factory.mktemp("ntk_run")
    save_run_folder(zoo.build(spec), spec, run)
    Tokenizer.load(run_dir).save(run)
    return run


@pytest.fixture(scope="module")
def junk_tokenizer_run_dir(run_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("junk_tokenizer_run")
    for path in run_dir.iterdir():
        if path.is_file():
            (run / path.name).write_bytes(path.read_bytes())
    (run / "tokenizer.model").write_bytes(b"junk\n")
    return run


def zoo_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=OFFLINE_ENV)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.slow
def test_cli_generate_cached_and_uncached_agree(run_dir):
    outputs = []
    for flags in ([], ["--no-cache"]):
        code, out, err = zoo_cli("generate", run_dir, "--prompt", "ROMEO:", "--max-new-tokens", 12, *flags)
        assert code == 0, err
        assert out.startswith("ROMEO:") and "12 new tokens" in err
        outputs.append(out)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("args,words", [
    (["generate", "{missing}", "--prompt", "hi"], ["does not exist"]),
    (["generate", "{run}", "--prompt", "word " * 200], ["the prompt is", "max_seq_len", "64"]),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [
        (["generate", "{run}", "--prompt", "hi", "--max-new-tokens", "100"], ["max_new_tokens <="]),
        (["generate", "{run}", "--prompt", "hi", "--temperature", "-1"], ["temperature=-1.0"]),
        (["generate", "{run}", "--prompt", "hi", "--temperature", "inf", "--max-new-tokens", "4"],
         ["temperature=inf", "finite"]),
        (["generate", "{run}", "--prompt", "hi", "--top-k", "5", "--max-new-tokens", "4"],
         ["--top-k only applies when sampling", "--temperature 0.0 decodes greedily", "drop --top-k"]),
        (["generate", "{run}", "--prompt", "hi", "--top-p", "0.9", "--temperature", "0", "--max-new-tokens", "4"],
         ["--top-p only applies when sampling", "--temperature > 0"]),
        (["generate", "{junk}", "--prompt", "hi"], ["tokenizer.model", "is not a SentencePiece model"]),
        (["eval", "{junk}", "--ppl", "{junk}/spec.json"], ["tokenizer.model", "is not a SentencePiece model"]),
    ]),
])
def test_cli_generate_bad_input_is_one_line_exit_2(run_dir, junk_tokenizer_run_dir, tmp_path, args, words):
    args = [a.format(run=run_dir, junk=junk_tokenizer_run_dir, missing=tmp_path / "nope") for a in args]
    code, _, err = zoo_cli(*args)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err


def test_cli_generate_samples_only_ids_the_tokenizer_can_decode(big_vocab_run_dir):
    """A random 4096-token model samples ids past the 512-piece tokenizer, which cannot decode them
    (IndexError): new tokens are kept within the tokenizer's vocabulary."""
    code, out, err = zoo_cli("generate", big_vocab_run_dir, "--prompt", "ROMEO:", "--max-new-tokens", 20,
                             "--temperature", 1.0, "--seed", 0)
    assert code == 0, err
    assert out.startswith("ROMEO:") and "20 new tokens" in err


@pytest.mark.slow
def test_cli_generate_warns_when_dynamic_ntk_and_the_cache_may_differ(ntk_run_dir):
    """Past original_max_seq_len cached keys keep their own step's rotation: say so, once, only then."""
    def warnings(*flags, new=40):
        code, _, err = zoo_cli("generate", ntk_run_dir, "--prompt", "ROMEO:", "--max-new-tokens", new, *flags)
        assert code == 0, err
        return [line for line in err.splitlines() if "warning" in line]

    long = warnings()
    assert len(long) == 1 and "dynamic-NTK" in long[0] and f"({NTK_RUN_ORIGINAL} tokens)" in long[0]
    assert warnings("--no-cache") == []
    assert warnings(new=2) == []
