"""`ZooLM`: an lm-eval model (registered as `zoo`) over a run folder or an in-memory DecoderLM.

    lm = ZooLM("runs/my_run")                           # spec.json + model.safetensors + tokenizer.model
    lm = ZooLM(model=model, tokenizer=tok, max_length=spec.data.seq_len)   # during training
    lm_eval.simple_evaluate(model=lm, tasks=[...])      # or: zoo eval RUN_DIR --tasks ...

From a run folder the context (`max_length`) is the model's `max_seq_len`, what its positions support,
as lm-eval's `hf` class reads it from an export's `max_position_embeddings`; `max_length=` (`zoo eval
--max-length`) may lower it, e.g. to the training block length `data.seq_len`. An item that cannot be
scored is an error naming which of these limits refused it.

It subclasses lm-eval's `TemplateLM`, so a (context, continuation) request is split into tokens by
lm-eval's own code (`TemplateLM._encode_pair`: trailing spaces of the context move to the
continuation, the pair is encoded whole and the context's tokens cut off the front; an empty context
becomes the prefix token, EOS here). Scoring mirrors the `hf` class (lm_eval/models/huggingface.py):
requests sorted longest first, batches right-padded, inputs left-truncated to `max_length + 1` tokens
minus the last, log-softmax in fp32, one-token continuations sharing a context scored once, and
`is_greedy` meaning every continuation token is the argmax. Rolling loglikelihoods (perplexity)
use lm-eval's windows: every token is a target once, `max_length` targets per window, the first
window after the prefix token, later full windows conditioned on the one token before them and the
last, shorter window on as much preceding text as fits.

Generation (`generate_until`) runs each request through `zoo.generate` with the KV cache, stops at
any `until` string or EOS, and cuts the text at the first stop string, as the `hf` class does.

Legend: B = batch, T = padded length, V = vocab.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn
from tqdm import tqdm

from zoo.generate import Sampling, iter_generate, load_run

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_LENGTH = 2048  # lm-eval's default for models that do not say (HFLM._DEFAULT_MAX_LENGTH)
DEFAULT_MAX_GEN_TOKS = 256  # as HFLM.max_gen_toks
PAD_ID = 0  # right padding; causal attention keeps it out of every scored position


class EvalError(ValueError):
    """Bad evaluation input (run folder, task, file); the message names the value and the fix."""


@register_model("zoo")
class ZooLM(TemplateLM):
    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: nn.Module | None = None,
        tokenizer=None,
        max_length: int | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        dtype: str = "float32",
        device: str | None = None,
        **ignored,  # lm-eval passes max_batch_size to every model class
    ):
        super().__init__()
        if (pretrained is None) == (model is None):
            raise EvalError("ZooLM needs either pretrained=RUN_DIR or model= and tokenizer=")
        if pretrained is not None:
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise EvalError(f"dtype={dtype!r} is not a torch dtype; use float32 or bfloat16")
            model, spec, tokenizer = load_run(pretrained, dtype=getattr(torch, dtype))
            model = model.to(device or "cpu")
            # The model's context (what its positions support, and what lm-eval's hf class reads from an
            # export's max_position_embeddings), not the training block length data.seq_len.
            positions = spec.model.max_seq_len
            if max_length is None:
                max_length = positions
                self._limit = (f"{positions} tokens, the model's context (model.max_seq_len of {pretrained}, "
                               "what its positions support, fixed when it was built)")
            elif not 1 <= int(max_length) <= positions:
                raise EvalError(f"max_length={max_length} (zoo eval --max-length) must be in [1, {positions}], "
                                f"the model's context (model.max_seq_len of {pretrained})")
            else:
                self._limit = (f"{max_length} tokens, the max_length asked for (zoo eval --max-length); raise it "
                               f"up to {positions}, the model's context (model.max_seq_len)")
        elif tokenizer is None:  # an in-memory model stays where it is (`device` is ignored)
            raise EvalError("ZooLM(model=...) also needs tokenizer= (encode/decode/eos_id)")
        else:
            self._limit = (f"{max_length} tokens, the max_length ZooLM was given" if max_length else
                           f"{DEFAULT_MAX_LENGTH} tokens, lm-eval's default max_length (ZooLM was given none)")
        self.model, self.tokenizer = model, tokenizer
        self._max_length = int(max_length or DEFAULT_MAX_LENGTH)
        # "auto" (lm-eval's CLI) has no meaning on CPU: take the default.
        self.batch_size = DEFAULT_BATCH_SIZE if batch_size in (None, "auto") else int(batch_size)
        if self.batch_size < 1:  # lm-eval's Collator would make one batch of everything
            raise EvalError(f"batch_size={batch_size} must be >= 1 (default {DEFAULT_BATCH_SIZE})")
        self.max_gen_toks = DEFAULT_MAX_GEN_TOKS

    # ------------------------------------------------------------------ what TemplateLM asks for

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return "zoo-sentencepiece"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # The SentencePiece model has no BOS and adds nothing: one encoding whatever the flag says.
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ scoring

    @contextmanager
    def _eval_mode(self):
        """The model in eval mode for the call (a model lent by a training loop gets its mode back)."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def _model_logprobs(self, inps_BT: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, T, V) in fp32."""
        with self._eval_mode():
            logits = self.model(inps_BT.to(self.device)).logits
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per (strings, context_tokens, continuation_tokens)."""

        def longest_first(req):
            tokens = req[1] + req[2]
            return -len(tokens), tuple(tokens)

        def shared_prefix(req):  # one-token continuations after the same context are scored once
            return req[-2] + req[-1][:-1]

        # Checked before any scoring: an item that cannot be scored stops the run before it spends time.
        if any(not continuation for _, _, continuation in requests):
            raise EvalError("a request has an empty continuation: nothing to score")
        longest = max((len(continuation) for _, _, continuation in requests), default=0)
        if longest > self.max_length:
            too_long = sum(len(continuation) > self.max_length for _, _, continuation in requests)
            raise EvalError(f"{too_long} of {len(requests)} requests have a continuation longer than the limit (the "
                            f"longest: {longest} tokens), which cannot be scored: the limit is {self._limit}")
        reordered = Collator(requests, sort_fn=longest_first, group_by="contexts", group_fn=shared_prefix)
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="zoo loglikelihood")
        for chunk in reordered.get_batched(n=self.batch_size):
            inputs, input_lens = [], []
            for _, context, continuation in chunk:
                # Left-truncate to the context window; the last token is only ever a target.
                inputs.append((context + continuation)[-(self.max_length + 1):][:-1])
                input_lens.append(len(inputs[-1]))
            padded = max(input_lens)
            inps_BT = torch.tensor([ids + [PAD_ID] * (padded - len(ids)) for ids in inputs], dtype=torch.long)
            logprobs_BTV = self._model_logprobs(inps_BT)
            for (strings, context, continuation), logprobs_TV, input_len in zip(chunk, logprobs_BTV, input_lens):
                # Position t predicts token t+1: the continuation's log-probs are the last len(cont) inputs'.
                cont_logprobs_1CV = logprobs_TV[input_len - len(continuation):input_len].unsqueeze(0)
                greedy_1C = cont_logprobs_1CV.argmax(dim=-1)
                for strings_, cont, logprobs_1CV in reordered.get_cache(
                    req_str=strings, cxt_toks=context, cont_toks=continuation, logits=cont_logprobs_1CV
                ):
                    cont_1C = torch.tensor([cont], dtype=torch.long, device=logprobs_1CV.device)
                    is_greedy = bool((greedy_1C[:, -cont_1C.shape[1]:] == cont_1C).all())
                    # A request sharing the input with a shorter continuation: its tokens are the last ones.
                    logprob = float(logprobs_1CV[:, -cont_1C.shape[1]:].gather(2, cont_1C.unsqueeze(-1)).sum())
                    results.append((logprob, is_greedy))
                    if strings_ is not None:
                        self.cache_hook.add_partial("loglikelihood", strings_, (logprob, is_greedy))
                    bar.update(1)
        bar.close()
        return reordered.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(string) per request, every token predicted once (lm-eval's rolling windows)."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            token_windows = get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )
            for context, continuation in map(make_disjoint_window, token_windows):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for req in tqdm(requests, disable=disable_tqdm, desc="zoo generate_until"):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise EvalError(f"max_gen_toks ({max_gen_toks}) must be below the context: the limit is {self._limit}")
            sampling = Sampling(
                temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"),
            )
            # As the hf class: keep the last (max_length - max_gen_toks) context tokens.
            prompt = self.tok_encode(context)[-(self.max_length - max_gen_toks):] or [self.prefix_token_id]
            tokens, text = [], ""
            with self._eval_mode():
                for token in iter_generate(self.model, prompt, max_new_tokens=max_gen_toks, sampling=sampling,
                                           seed=kwargs.get("seed"), eos_id=self.eot_token_id,
                                           tokenizer_vocab_size=self.tokenizer.vocab_size):
                    tokens.append(token)
                    text = self.tok_decode(tokens)
                    if any(stop and stop in text for stop in until):
                        break
            text = postprocess_generated_text(text, stop=until, think_end_token=None)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return outputs

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype)}
