"""Evaluation: the `zoo` lm-eval class scores what a hand computation scores (batching, truncation,
rolling windows, generation, held-out perplexity), HellaSwag files are read strictly, and multiple-choice
scoring follows lm-eval's. CPU, no network (the hub is switched off below)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

import zoo  # noqa: E402
from zoo.checkpoint import save_run_folder  # noqa: E402
from zoo.evaluation import ZooLM, hellaswag_accuracy, hellaswag_docs  # noqa: E402
from zoo.evaluation.harness import perplexity  # noqa: E402
from zoo.evaluation.lm import EvalError  # noqa: E402
from zoo.evaluation.tasks import (  # noqa: E402
    HellaSwagTooLong, check_hellaswag_fits, multiple_choice_scores,
)
from zoo.overrides import with_changes  # noqa: E402

from _evaluation import (  # noqa: E402, F401  (fixtures)
    DATA, HELLASWAG, LOGPROB_TOL, MAX_LEN, VOCAB, lm, run,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _logprobs(model, ids):
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # (T, V)


def _score(model, context, continuation):
    """log p(continuation | context) by hand: position t predicts token t+1."""
    logprobs = _logprobs(model, context + continuation[:-1])
    return sum(logprobs[len(context) - 1 + i, token].item() for i, token in enumerate(continuation))


def _request(context, continuation):
    return Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)


# ----------------------------------------------------------------------------- the zoo class


def test_loglikelihood_equals_a_hand_computation_with_lm_evals_split(run, lm):
    _, model, _, tokenizer = run
    # lm-eval moves the context's trailing space to the continuation and encodes the pair whole.
    context, continuation = "To be, or not to be, ", "that is the question"
    context_ids = tokenizer.encode(context.rstrip())
    continuation_ids = tokenizer.encode(context + continuation)[len(context_ids):]
    assert len(continuation_ids) >= 2
    (logprob, is_greedy), = lm.loglikelihood([_request(context, continuation)], disable_tqdm=True)
    assert logprob == pytest.approx(_score(model, context_ids, continuation_ids), abs=LOGPROB_TOL)
    assert not is_greedy

    greedy = [int(_logprobs(model, context_ids)[-1].argmax())]
    greedy.append(int(_logprobs(model, context_ids + greedy)[-1].argmax()))
    (logprob, is_greedy), = lm._loglikelihood_tokens([(None, context_ids, greedy)], disable_tqdm=True)
    assert is_greedy and logprob == pytest.approx(_score(model, context_ids, greedy), abs=LOGPROB_TOL)


def test_batching_padding_and_left_truncation_do_not_change_scores(run):
    run_dir, model, _, tokenizer = run
    texts = (DATA / "tinyshakespeare.txt").read_text()[:20_000].split("\n\n")[:12]
    encoded = [tokenizer.encode(t) for t in texts]
    requests = [(None, ids[:-3], ids[-3:]) for ids in encoded if len(ids) > 4]
    long_ids = tokenizer.encode(" ".join(texts))[:MAX_LEN + 40]
    requests.append((None, long_ids[:-2], long_ids[-2:]))
    one = ZooLM(str(run_dir), batch_size=1)._loglikelihood_tokens(requests, disable_tqdm=True)
    many = ZooLM(str(run_dir), batch_size=5)._loglikelihood_tokens(requests, disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(one, many):
        assert a == pytest.approx(b, abs=LOGPROB_TOL) and greedy_a == greedy_b
    # The long request keeps its last MAX_LEN + 1 tokens, as lm-eval's hf class does.
    kept = long_ids[-(MAX_LEN + 1):]
    assert many[-1][0] == pytest.approx(_score(model, kept[:-2], kept[-2:]), abs=LOGPROB_TOL)


def test_the_context_is_the_models_max_seq_len_and_an_error_names_the_limit(run, lm):
    """The run's positions go to model.max_seq_len = MAX_LEN, its training blocks to data.seq_len =
    MAX_LEN / 2: a continuation between the two is scored; past the limit, the error names which limit
    refused it and how to change it."""
    run_dir, model, spec, tokenizer = run
    assert lm.max_length == spec.model.max_seq_len == MAX_LEN > spec.data.seq_len
    ids = tokenizer.encode((DATA / "tinyshakespeare.txt").read_text()[:5000])
    between = ids[:spec.data.seq_len + 20]
    (logprob, _), = lm._loglikelihood_tokens([(None, [tokenizer.eos_id], between)], disable_tqdm=True)
    assert logprob == pytest.approx(_score(model, [tokenizer.eos_id], between), abs=LOGPROB_TOL)
    requests = [(None, [tokenizer.eos_id], ids[:MAX_LEN + 1]), (None, [tokenizer.eos_id], between)]
    with pytest.raises(EvalError, match=rf"1 of 2 requests have a continuation longer than the limit \(the longest: "
                                        rf"{MAX_LEN + 1} tokens\), which cannot be scored: the limit is {MAX_LEN} "
                                        r"tokens, the model's context \(model.max_seq_len of "):
        lm._loglikelihood_tokens(requests, disable_tqdm=True)
    shorter = ZooLM(str(run_dir), max_length=spec.data.seq_len)
    with pytest.raises(EvalError, match=rf"the limit is {spec.data.seq_len} tokens, the max_length asked for "
                                        rf"\(zoo eval --max-length\); raise it up to {MAX_LEN}"):
        shorter._loglikelihood_tokens([(None, [tokenizer.eos_id], between)], disable_tqdm=True)
    with pytest.raises(EvalError, match=rf"max_length={MAX_LEN + 1} \(zoo eval --max-length\) must be in "
                                        rf"\[1, {MAX_LEN}\]"):
        ZooLM(str(run_dir), max_length=MAX_LEN + 1)


def test_a_shorter_continuation_sharing_the_input_is_scored_on_the_last_positions(run, lm):
    """lm-eval's Collator scores requests whose context + continuation[:-1] agree once, with the
    longest continuation's log-probs; a request with a shorter continuation owns the last ones."""
    _, model, _, tokenizer = run
    ids = tokenizer.encode("Now is the winter of our discontent made glorious summer")
    requests = [(None, ids[:-3], ids[-3:]), (None, ids[:-1], ids[-1:]), (None, ids[:-2], ids[-2:])]
    scores = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    for (_, context, continuation), (logprob, _) in zip(requests, scores):
        assert logprob == pytest.approx(_score(model, context, continuation), abs=LOGPROB_TOL)


def test_batch_size_below_one_is_refused(run):
    with pytest.raises(EvalError, match="batch_size=0 must be >= 1"):
        ZooLM(str(run[0]), batch_size=0)


def test_malformed_hellaswag_file_names_the_file_and_line(tmp_path):
    with pytest.raises(EvalError, match=r"lambada_openai_test.jsonl, line 1: not a HellaSwag record \(KeyError"):
        hellaswag_docs(DATA / "lambada_openai_test.jsonl")
    bad = tmp_path / "h.jsonl"
    bad.write_text(HELLASWAG.read_text().split("\n", 1)[0] + "\n{not json\n")
    with pytest.raises(EvalError, match=r"h.jsonl, line 2: not a HellaSwag record \(JSONDecodeError"):
        hellaswag_docs(bad)
    assert len(hellaswag_docs(bad, limit=1)) == 1


def test_a_non_utf8_hellaswag_file_names_the_line_and_byte(tmp_path):
    """An EvalError naming the line and the bad byte's offset in the file (not within a decoder's chunk);
    a bad byte beyond the records asked for is never read, however far a read-ahead would go."""
    records = HELLASWAG.read_text().splitlines(keepends=True)[:40]
    good = "".join(records).encode()
    bad = tmp_path / "h.jsonl"
    bad.write_bytes(good + b'{"ctx_a": "\xff"}\n')
    where = rf"h.jsonl, line 41: not UTF-8 text \(invalid start byte at byte {len(good) + 11}\)"
    with pytest.raises(EvalError, match=where):
        hellaswag_docs(bad)
    assert len(hellaswag_docs(bad, limit=2)) == 2  # the bad line is never read


def test_the_length_check_agrees_with_scoring_at_the_boundary(run, tmp_path):
    """check_hellaswag_fits refuses exactly what hellaswag_accuracy cannot score, counting tokens the way
    it encodes them, also for an item whose query is empty (lm-eval's empty-context branch)."""
    _, model, _, tokenizer = run
    record = json.loads(HELLASWAG.read_text().split("\n", 1)[0])
    empty_query = {**record, "activity_label": "[x", "ctx_a": "y]", "ctx_b": ""}  # preprocess() leaves ""
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (record, empty_query)) + "\n")
    docs = hellaswag_docs(path)
    assert docs[1]["query"] == ""
    with pytest.raises(HellaSwagTooLong) as caught:
        check_hellaswag_fits(model, tokenizer, path, 2, 1)
    longest = caught.value.longest  # in tokens, as the check counts them
    assert caught.value.first == 0 and caught.value.count == 2 and 1 < longest < MAX_LEN
    check_hellaswag_fits(model, tokenizer, path, 2, longest)
    assert hellaswag_accuracy(model, tokenizer, path, max_length=longest)["n"] == 2
    with pytest.raises(HellaSwagTooLong):
        check_hellaswag_fits(model, tokenizer, path, 2, longest - 1)
    with pytest.raises(EvalError, match=f"cannot be scored: the limit is {longest - 1} tokens, the max_length ZooLM"):
        hellaswag_accuracy(model, tokenizer, path, max_length=longest - 1)


def test_rolling_loglikelihood_scores_every_token_once(run, lm):
    _, model, _, tokenizer = run
    short = "Now is the winter of our discontent"
    ids = tokenizer.encode(short)
    rolling, = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (short,), 0)], disable_tqdm=True)
    assert rolling == pytest.approx(_score(model, [tokenizer.eos_id], ids), abs=LOGPROB_TOL)

    long_text = (DATA / "tinyshakespeare.txt").read_text()[:3000]
    ids = tokenizer.encode(long_text)
    assert len(ids) > 2 * MAX_LEN
    # lm-eval's windows: MAX_LEN targets each, the first after EOS; every later window's input is the
    # MAX_LEN tokens ending just before its last target (one token of context for a full window,
    # the rest of the context window for the shorter last one).
    expected = _score(model, [tokenizer.eos_id], ids[:MAX_LEN])
    for start in range(MAX_LEN, len(ids), MAX_LEN):
        end = min(start + MAX_LEN, len(ids))
        expected += _score(model, ids[end - MAX_LEN - 1:start], ids[start:end])
    assert len(ids) % MAX_LEN, "the text should end in a partial window"
    rolling, = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long_text,), 0)], disable_tqdm=True)
    assert rolling == pytest.approx(expected, abs=1e-3)


def test_perplexity_of_a_held_out_file(lm, run, tmp_path):
    _, _, _, tokenizer = run
    paragraphs = ["First Citizen:\nBefore we proceed any further, hear me speak.", "All:\nSpeak, speak.",
                  "MENENIUS:\nWhat work's, my countrymen, in hand?"]
    path = tmp_path / "heldout.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    result = perplexity(lm, path)
    requests = [Instance("loglikelihood_rolling", {}, (p,), 0) for p in paragraphs]
    logprob = sum(lm.loglikelihood_rolling(requests, disable_tqdm=True))
    assert result["documents"] == 3 and result["tokens"] == sum(len(tokenizer.encode(p)) for p in paragraphs)
    assert result["token_perplexity"] == pytest.approx(math.exp(-logprob / result["tokens"]), rel=1e-5)
    n_bytes = len("".join(paragraphs).encode())
    assert result["bits_per_byte"] == pytest.approx(-logprob / math.log(2) / n_bytes, rel=1e-5)


def _generate_request(context, **gen_kwargs):
    return Instance(request_type="generate_until", doc={}, arguments=(context, gen_kwargs), idx=0)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(run, lm):
    _, model, _, tokenizer = run
    context = "ROMEO:\nBut soft, what light"
    (text,) = lm.generate_until([_generate_request(context, until=["e"], max_gen_toks=24)], disable_tqdm=True)
    # The same tokens by hand: greedy decoding of the encoded context, decoded, cut before the stop string.
    ids = tokenizer.encode(context)
    new = []
    with torch.no_grad():
        for _ in range(24):
            next_id = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if next_id == tokenizer.eos_id:
                break
            new.append(next_id)
            if "e" in tokenizer.decode(new):
                break
    assert text == tokenizer.decode(new).split("e")[0]


def test_generate_until_samples_only_ids_the_tokenizer_can_decode(run, tmp_path, monkeypatch):
    """A model vocab larger than the tokenizer's (allowed, as for an imported model): sampling from a
    near-uniform untrained model drew ids past the tokenizer's 512 and SentencePiece raised. Every id
    sampled is recorded and must be below 512; the text is their decoding."""
    import zoo.evaluation.lm as lm_module

    _, _, spec, tokenizer = run
    big = with_changes(spec, {"model.vocab_size": 4 * VOCAB})
    save_run_folder(zoo.build(big), big, tmp_path)
    tokenizer.save(tmp_path)
    sampled, iter_generate = [], lm_module.iter_generate

    def recording(*args, **kwargs):
        for token in iter_generate(*args, **kwargs):
            sampled.append(token)
            yield token

    monkeypatch.setattr(lm_module, "iter_generate", recording)
    request = _generate_request("To be", until=["\n\n"], max_gen_toks=32, do_sample=True, temperature=1.0, seed=0)
    (text,) = ZooLM(str(tmp_path)).generate_until([request], disable_tqdm=True)
    # 3/4 of a near-uniform 2048-id model's mass lies past 512: 8 draws all below it by chance have odds 4^-8.
    assert len(sampled) >= 8, sampled
    assert max(sampled) < tokenizer.vocab_size == VOCAB
    assert text == tokenizer.decode(sampled).split("\n\n")[0]


def test_multiple_choice_scores_follow_lm_eval():
    choices = ["a long answer", "no", "xyz", "b"]
    # acc takes the raw argmax (choice 1); acc_norm divides by characters: -10/13 beats -9/2.
    assert multiple_choice_scores([-10.0, -9.0, -20.0, -30.0], choices, gold=0) == (0.0, 1.0)
    assert multiple_choice_scores([-10.0, -9.0, -20.0, -30.0], choices, gold=1) == (1.0, 0.0)
    ties = [-5.0, -5.0, -50.0, -50.0]  # np.argmax: the first of equal scores wins
    assert multiple_choice_scores(ties, ["ab", "ab", "c", "d"], gold=0) == (1.0, 1.0)
