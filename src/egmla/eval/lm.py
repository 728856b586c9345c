"""`EgmlaLM`: our Transformer as an lm-eval model, registered as "egmla".

    lm_eval --model egmla --model_args checkpoint=RUN_DIR,device=cuda,batch_size=32 --tasks hellaswag
    lm_eval --model egmla --model_args checkpoint=RUN_DIR --tasks hellaswag_offline --include_path data/eval/tasks
    EgmlaLM(model, tokenizer, batch_size=8)                 # in memory, e.g. right after training
    EgmlaLM.from_checkpoint("runs/120m-egmla-kv64-g256")     # what the command line does

It scores exactly as lm-eval's own HFLM does, so numbers are comparable with published ones (a test holds this
against HFLM on an equivalent `transformers` Llama):
* requests are split into context and continuation tokens by TemplateLM (encode context + continuation as a
  whole, then cut at the context's length), an empty context is conditioned on EOS (our documents are separated
  by EOS in training, so EOS is the natural "start of text");
* a context too long for the model is truncated from the left, the continuation is always scored whole;
* requests are sorted longest first (batches of similar length, the first batch is the largest), padded on the
  right (causal attention: padding after a token cannot change it) and scored with one forward per batch;
  requests that share everything but their last token (one-token multiple-choice answers) share that forward
  (where such requests cut context and continuation at different tokens, the shorter continuation is scored on
  its own positions; HFLM 0.4.13 sums the wrong ones there, the only known difference);
* loglikelihood_rolling cuts long texts into lm-eval's disjoint rolling windows of the model's max length.

Generation decodes with the model's own decode cache (the cache each attention variant is measured by). Prompts
of different lengths share one cache without padding or masks: every row starts generating at its own length
while longer prompts are still being fed token by token, so each row sees exactly what it would see alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from ..data.tokenizer import Tokenizer
from ..model import ConfigError, Transformer, sample_next_token

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16  # also what batch_size=auto means: we do not probe memory
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's default
MODEL_ARGS = ("checkpoint", "device", "batch_size", "max_length", "max_gen_toks")

# A scoring request: (its strings for lm-eval's response cache, or None for rolling windows; context ids;
# continuation ids).
Request = tuple[tuple[str, str] | None, list[int], list[int]]


@register_model("egmla")
class EgmlaLM(TemplateLM):
    """lm-eval's LM interface over an egmla Transformer and its tokenizer (single process, one device)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        if device is not None:
            model = model.to(device)
        self._model = model.eval()
        self.tokenizer = tokenizer
        self._device = next(model.parameters()).device
        self._batch_size = _parse_batch_size(batch_size)
        self._max_length = _parse_max_length(max_length, model.cfg.max_seq_len)
        self._max_gen_toks = int(max_gen_toks)
        if self._max_gen_toks <= 0:
            raise ConfigError(f"max_gen_toks={max_gen_toks!r} is invalid: expected a positive integer")

    # --- construction from lm-eval's model_args ---------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str | None = None, **kwargs: Any) -> EgmlaLM:
        """Load a run directory (or a .ckpt file) with `load_run`; kwargs as in the constructor."""
        from .load import load_run

        model, tokenizer, _ = load_run(checkpoint, device=device or "auto")
        return cls(model, tokenizer, **kwargs)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> EgmlaLM:
        """`--model_args checkpoint=RUN_DIR,device=cuda,batch_size=32,max_length=1024,max_gen_toks=128`."""
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> EgmlaLM:
        """model_args win over lm-eval's own options, which its CLI always passes: batch_size (1 unless
        --batch_size) and device ("cuda:0" unless --device; on a machine without CUDA that means the CPU, as
        for HFLM). A device named in model_args is taken as asked."""
        options = {k: v for k, v in (additional_config or {}).items() if v is not None}
        options.pop("max_batch_size", None)  # only for HFLM's batch_size=auto probing
        if "device" in options:
            options["device"] = _available(options["device"])
        args = options | dict(arg_dict)
        unknown = sorted(set(args) - set(MODEL_ARGS))
        if unknown:
            raise ConfigError(
                f"model_args {', '.join(unknown)} not understood by egmla: expected {', '.join(MODEL_ARGS)}"
            )
        if not args.get("checkpoint"):
            raise ConfigError("model egmla needs model_args checkpoint=RUN_DIR (an egmla-train run directory)")
        return cls.from_checkpoint(**args)

    # --- what lm-eval asks of a model -------------------------------------------------------------------

    @property
    def model(self) -> Transformer:
        return self._model

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Our tokenizers never add special tokens, so `add_special_tokens` changes nothing."""
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        """Recorded by lm-eval in its results' config."""
        cfg = self.model.cfg
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "attention": cfg.attention.variant,
            "max_length": self.max_length,
        }

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        raise NotImplementedError(
            "egmla models are base language models without a chat template: drop --apply_chat_template"
        )

    # --- scoring ----------------------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(sum of continuation log-probabilities, whether greedy decoding would produce the continuation).

        A continuation longer than max_length is scored in pieces of max_length tokens, each conditioned on as
        much of what precedes it as fits, and the pieces' answers are combined."""
        pieces, owners = [], []
        for index, (strings, context, continuation) in enumerate(requests):
            if len(continuation) <= self.max_length:
                pieces.append((strings, context, continuation))
                owners.append(index)
                continue
            for start in range(0, len(continuation), self.max_length):
                pieces.append((None, context + continuation[:start], continuation[start : start + self.max_length]))
                owners.append(index)
        totals = [[0.0, True] for _ in requests]
        for index, (logprob, greedy) in zip(owners, self._score_requests(pieces, disable_tqdm), strict=True):
            totals[index][0] += logprob
            totals[index][1] &= greedy
        answers = [(logprob, greedy) for logprob, greedy in totals]
        for (strings, _, continuation), answer in zip(requests, answers, strict=True):
            if strings is not None and len(continuation) > self.max_length:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def _score_requests(self, requests: list[Request], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Batched scoring of requests whose continuations fit max_length."""
        collator = Collator(requests, sort_fn=_longest_first, group_by="contexts", group_fn=_all_but_last_token)
        results = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="egmla loglikelihood") as bar, self._inference():
            for chunk in collator.get_batched(n=self.batch_size):
                for strings, answer in self._score_batch(chunk, collator):
                    results.append(answer)
                    if strings is not None:  # rolling windows are cached per document instead
                        self.cache_hook.add_partial("loglikelihood", strings, answer)
                    bar.update(1)
        return collator.get_original(results)

    def _score_batch(self, chunk: list[Request], collator: Collator) -> Iterator[tuple[Any, tuple[float, bool]]]:
        """One forward for a batch; yields (strings, (logprob, is_greedy)) for every request it serves."""
        inputs = [self._input_window(context, continuation) for _, context, continuation in chunk]
        logits = self._call(_pad_right(inputs, self.eot_token_id, self.device))
        for (strings, context, continuation), window, row in zip(chunk, inputs, logits, strict=True):
            end = len(window)  # logits at position t predict token t + 1: the last input predicts the last token
            logprobs = F.log_softmax(row[end - len(continuation) : end].float(), dim=-1)
            # Requests equal to this one up to their last token get their answers from the same log-probs.
            for strings_i, continuation_i, logprobs_i in collator.get_cache(
                req_str=strings, cxt_toks=context, cont_toks=continuation, logits=logprobs[None]
            ):
                yield strings_i, _score(logprobs_i[0], continuation_i)

    def _input_window(self, context: list[int], continuation: list[int]) -> list[int]:
        """context + continuation without its last token, truncated from the left to the model's max length."""
        if not continuation or len(continuation) > self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens cannot be scored with max_length={self.max_length}"
            )
        return (context + continuation)[-(self.max_length + 1) :][:-1]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: disjoint windows of max_length tokens, each with the most context."""
        windows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in self._rolling_windows(self.tok_encode(text)):
                windows.append((None, context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[index] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], list[int]]]:
        """lm-eval's windows (the same as HFLM's): EOS starts the text, every token is predicted exactly once."""
        windows = lm_utils.get_rolling_token_windows(
            token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
        )
        return [lm_utils.make_disjoint_window(window) for window in windows]

    # --- generation -------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string, EOS or max_gen_toks; greedy unless do_sample/temperature."""
        args = [req.args for req in requests]
        encoded = {context: self.tok_encode(context) for context, _ in args}
        collator = Collator(
            args,
            sort_fn=lambda a: (-len(encoded[a[0]]), a[0]),
            group_by="gen_kwargs",
            group_fn=lambda a: a[1],
        )
        eos = self.tok_decode([self.eot_token_id])
        results = []
        with tqdm(total=len(args), disable=disable_tqdm, desc="egmla generate_until") as bar:
            for chunk in collator.get_batched(n=self.batch_size):
                contexts, all_kwargs = zip(*chunk, strict=True)
                options = _GenerationOptions.from_kwargs(all_kwargs[0], self.max_gen_toks, eos, self.max_length)
                prompts = [encoded[context][-options.max_context :] or [self.prefix_token_id] for context in contexts]
                for context, tokens in zip(contexts, self._generate(prompts, options), strict=True):
                    text = postprocess_generated_text(self.tok_decode(tokens), options.until, None)
                    results.append(text)
                    self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                    bar.update(1)
        return collator.get_original(results)

    def _generate(self, prompts: list[list[int]], options: _GenerationOptions) -> list[list[int]]:
        """New tokens per prompt, decoded with the model's cache; a row stops at EOS, a stop string or the limit.

        All rows advance one position per step. Row i feeds its own prompt until position len(prompt_i), then
        its picks: no padding, no mask, every row at its true positions.
        """
        n, lengths = len(prompts), [len(p) for p in prompts]
        start, total = min(lengths), max(lengths) + options.max_gen_toks
        ids = torch.full((n, total), self.eot_token_id, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)] = torch.tensor(prompt)
        ids = ids.to(self.device)
        prompt_lengths = torch.tensor(lengths, device=self.device)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * n
        with self._inference():
            cache = self.model.new_cache(n, total, dtype=self._cache_dtype())
            logits = self._call(ids[:, :start], cache, last_only=True)[:, -1]
            for pos in range(start, total):
                generating = prompt_lengths <= pos
                picked = sample_next_token(logits, options.temperature, options.top_k)
                token = torch.where(generating, picked, ids[:, pos])
                ids[:, pos] = token
                for i, (is_new, tok) in enumerate(zip(generating.tolist(), token.tolist(), strict=True)):
                    if is_new and not done[i]:
                        out[i].append(tok)
                        done[i] = self._finished(out[i], options)
                if all(done) or pos + 1 == total:
                    break
                logits = self._call(token[:, None], cache)[:, -1]
        return out

    def _finished(self, tokens: list[int], options: _GenerationOptions) -> bool:
        if tokens[-1] == self.eot_token_id or len(tokens) >= options.max_gen_toks:
            return True
        text = self.tok_decode(tokens)
        return any(stop and stop in text for stop in options.until)

    # --- the model call ---------------------------------------------------------------------------------

    def _call(self, ids: torch.Tensor, cache=None, last_only: bool = False) -> torch.Tensor:
        """bf16 autocast on CUDA (as the model trains), full precision on the CPU."""
        autocast = (
            torch.autocast(device_type="cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with autocast:
            return self.model(ids, cache, last_only=last_only)

    def _inference(self):
        self.model.eval()
        return torch.inference_mode()

    def _cache_dtype(self) -> torch.dtype | None:
        """The decode cache holds what autocast computes: bf16 on CUDA, else the weights' dtype."""
        return torch.bfloat16 if self.device.type == "cuda" else None


def _score(logprobs: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """(sum of the continuation's log-probs, whether each token is the argmax) from log-probs [>= len, vocab].

    A shorter continuation sharing a longer one's forward reads the trailing rows: those that predict its tokens.
    (HFLM 0.4.13 does so for is_greedy but sums the leading rows' log-probs: wrong in that rare case.)
    """
    logprobs = logprobs[-len(continuation) :]
    target = torch.tensor(continuation, device=logprobs.device)
    picked = logprobs.gather(-1, target[:, None])
    return float(picked.sum()), bool((logprobs.argmax(dim=-1) == target).all())


class _GenerationOptions:
    """lm-eval's generation kwargs, normalised as HFLM does (EOS's text is always a stop string)."""

    def __init__(self, until: list[str], max_gen_toks: int, temperature: float, top_k: int | None, max_context: int):
        self.until, self.max_gen_toks, self.temperature, self.top_k = until, max_gen_toks, temperature, top_k
        self.max_context = max_context

    @classmethod
    def from_kwargs(cls, gen_kwargs: dict, default_max_gen_toks: int, eos: str, max_length: int) -> _GenerationOptions:
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, default_max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
        top_k = kwargs.pop("top_k", None)
        if kwargs:
            log.warning(
                "egmla ignores generation kwargs %s (supported: until, max_gen_toks, do_sample, temperature, top_k)",
                sorted(kwargs),
            )
        if max_gen_toks >= max_length:
            raise ValueError(
                f"max_gen_toks={max_gen_toks} leaves no room for a context within max_length={max_length}: "
                "lower max_gen_toks (gen_kwargs or model_args)"
            )
        return cls(until, max_gen_toks, temperature, int(top_k) if top_k else None, max_length - max_gen_toks)


def _longest_first(request: Request) -> tuple[int, tuple[int, ...]]:
    """HFLM's order: longest first, so a batch's first row sets its width and memory errors happen at once."""
    tokens = request[1] + request[2]
    return -len(tokens), tuple(tokens)


def _all_but_last_token(request: Request) -> list[int]:
    """Requests equal up to their last token can share one forward (one-token multiple-choice answers)."""
    return request[1] + request[2][:-1]


def _pad_right(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    batch = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return batch.to(device)


def _available(device: str) -> str:
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        log.warning("egmla: device %s is not available (no CUDA GPU here): using the CPU", device)
        return "cpu"
    return device


def _parse_batch_size(batch_size: int | str) -> int:
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        log.info("egmla: batch_size=%s means %d (no memory probing)", batch_size, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    try:
        value = int(batch_size)
    except (TypeError, ValueError):
        value = 0
    if value <= 0:
        raise ConfigError(f"batch_size={batch_size!r} is invalid: expected a positive integer (or auto)")
    return value


def _parse_max_length(max_length: int | None, model_max: int) -> int:
    if max_length is None:
        return model_max
    if not isinstance(max_length, int) or not 1 < max_length <= model_max:
        raise ConfigError(
            f"max_length={max_length!r} is invalid: expected an integer in [2, {model_max}] (the model's max_seq_len)"
        )
    return max_length
