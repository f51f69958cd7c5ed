"""The packed scorer: an ``lm_eval.api.model.LM`` around an in-memory (or streamed) causal LM.

:class:`PackedLM` implements lm-eval's public model interface (``loglikelihood``,
``loglikelihood_rolling``, ``generate_until``) and scores the same requests as lm-eval's ``HFLM``:

- the pair encoding is HFLM's (trailing context spaces move to the continuation, the whole string is
  encoded and split at the context's length, the BOS/EOS prefix token stands in for an empty context),
  with each context tokenised once instead of once per choice;
- ``pack=True`` packs each document into one row: its context once, then the inputs of all its choices,
  with a block attention mask and position ids such that every choice sees exactly its context and its
  own prefix (:mod:`crepe.zeroshot.rows`); ``pack=False`` keeps lm-eval's one row per request;
- the vocabulary projection runs only at the positions whose log-probabilities are read, without a KV
  cache; a ``streamer`` (:class:`crepe.streaming.Streamer`) reads the decoder blocks from the shards one
  at a time per group of batches.

Scores equal stock ``HFLM``'s bit for bit with ``pack=False`` and up to float rounding (about 1e-5) with
packing (tested). :func:`stock_hflm` builds lm-eval's own ``HFLM`` around the same model, for comparison.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.models.utils import DEFAULT_MAX_LENGTH, resolve_max_length
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from crepe.zeroshot.rows import Row, batch_rows, plan_rows
from crepe.zeroshot.sources import DEFAULT_BATCH_SIZE, Progress, check_batch_size, quiet_lm_eval

Request = tuple[Any, list[int], list[int]]  # (strings or None, context tokens, continuation tokens)


@dataclass
class Throughput:
    """Work done by the model: scored requests, forward rows, real and padded tokens, seconds.

    ``request_tokens`` is what stock lm-eval feeds the model for the same requests (one row per request
    except one-token continuations sharing a context); ``tokens`` is what crepe fed it after packing.
    """

    requests: int = 0
    rows: int = 0
    packed_rows: int = 0  # rows holding a shared context plus several continuations
    tokens: int = 0  # real tokens in the forward rows
    padded_tokens: int = 0  # rows x padded length
    request_tokens: int = 0
    scored_positions: int = 0  # positions whose vocabulary logits were computed
    model_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model_seconds": round(self.model_seconds, 3)}


class PackedLM(LM):
    """lm-eval's model interface over a live causal LM, scoring with packed rows (see the module doc)."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = DEFAULT_BATCH_SIZE,
                 progress: Progress | None = None, pack: bool = True, max_length: int | None = None,
                 streamer: Any = None, device: str | torch.device | None = None):
        super().__init__()
        config = model.config
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError("crepe's packed scorer scores causal (decoder-only) models only")
        self.model = model
        self.tokenizer = tokenizer  # only read: encode/decode
        self.batch_size = check_batch_size(batch_size)
        self.progress = progress
        self.pack = pack
        self.streamer = streamer  # a streamed model: its blocks are read from the shards per group of batches
        self.stats = Throughput()
        self.max_length = max_length or resolve_max_length(config, tokenizer, default=DEFAULT_MAX_LENGTH)
        self.target = torch.device(device) if device is not None else next(model.parameters()).device
        bos = tokenizer.bos_token_id
        self.prefix_token_id = bos if bos is not None else tokenizer.eos_token_id
        self.prefix_text = tokenizer.decode(self.prefix_token_id)
        forward = inspect.signature(type(model).forward).parameters
        self.keep_arg = "logits_to_keep" in forward  # tried once; falls back to full logits
        self.cache_arg = "use_cache" in forward
        self.pack_limit: int | None = None  # longest packed row; None: no packing
        custom_masks = getattr(config, "_attn_implementation", None) in ("eager", "sdpa")
        if pack and custom_masks and "position_ids" in forward and "attention_mask" in forward:
            window = getattr(config, "sliding_window", None)  # a custom mask replaces sliding windows
            self.pack_limit = min(self.max_length, window) if isinstance(window, int) and window > 0 else self.max_length

    @property
    def device(self) -> torch.device:
        return self.target

    # --- tokenisation (HFLM's, with each context encoded once) ------------------------------------

    def tok_encode(self, string: str, add_special_tokens: bool | None = None) -> list[int]:
        """HFLM's encoding: the tokenizer's own special tokens unless the string already starts with the prefix."""
        if add_special_tokens is None and string.startswith(self.prefix_text):
            add_special_tokens = False
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **kwargs)

    def encode_requests(self, pairs: Sequence[tuple[str, str]]) -> list[Request]:
        """``((context, continuation), context tokens, continuation tokens)`` for each pair, as HFLM splits them."""
        contexts: dict[str, list[int]] = {}
        out: list[Request] = []
        for context, continuation in pairs:
            if context == "":
                cont = self.tok_encode(continuation, add_special_tokens=False)
                ctx_enc, cont_enc = (([self.prefix_token_id], cont) if cont[0] != self.prefix_token_id
                                     else (cont[:1], cont[1:]))
            else:
                n_spaces = len(context) - len(context.rstrip())
                ctx, cont_text = (context[:-n_spaces], context[-n_spaces:] + continuation) if n_spaces else (
                    context, continuation)
                whole = self.tok_encode(ctx + cont_text)
                if ctx not in contexts:
                    contexts[ctx] = self.tok_encode(ctx)
                ctx_enc, cont_enc = list(contexts[ctx]), whole[len(contexts[ctx]):]
            out.append(((context, continuation), ctx_enc, cont_enc))
        return out

    # --- lm-eval's model interface ------------------------------------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), greedy)`` for each lm-eval ``Instance``."""
        return self.loglikelihood_tokens(self.encode_requests([r.args for r in requests]))

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-string log-likelihoods in disjoint windows of ``max_length`` tokens, as HFLM computes them."""
        out = []
        for request in requests:
            (string,) = request.args
            windows = [(None, *make_disjoint_window(w)) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(value for value, _ in self.loglikelihood_tokens(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("crepe's packed scorer scores log-likelihoods only; generative tasks need HFLM")

    # --- scoring ------------------------------------------------------------------------------------

    def scored_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits at ``batch["keep"]`` positions of each row, (rows, width, vocab)."""
        keep = batch["keep"]
        kwargs: dict[str, Any] = {"position_ids": batch["position_ids"]}
        if "attention_mask" in batch:
            kwargs["attention_mask"] = batch["attention_mask"]
        if self.cache_arg:
            kwargs["use_cache"] = False
        with torch.no_grad():
            if self.keep_arg:
                try:
                    logits = self.model(batch["input_ids"], logits_to_keep=keep, **kwargs).logits
                    if logits.shape[:2] == keep.shape:
                        return logits
                except torch.OutOfMemoryError:
                    raise
                except (TypeError, IndexError, RuntimeError):
                    pass
                self.keep_arg = False  # this model cannot take per-row positions
            logits = self.model(batch["input_ids"], **kwargs).logits
        return torch.take_along_dim(logits, keep[..., None], dim=1)

    def loglikelihood_tokens(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        """Score tokenised requests: rows planned by :func:`plan_rows`, ``batch_size`` rows per forward."""
        max_length = self.max_length
        self.stats.requests += len(requests)
        self.stats.request_tokens += sum(
            min(len(c) + len(x) - 1, max_length)
            for c, x in {(tuple(c), tuple(x[:-1])): (c, x) for _, c, x in requests}.values()
        )
        rows = plan_rows(requests, max_length, self.pack_limit)
        mask_dtype = next(self.model.parameters()).dtype
        if mask_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            mask_dtype = torch.float32
        res: list[tuple[float, bool] | None] = [None] * len(requests)
        done = 0
        step = self.batch_size
        # Packed rows (custom mask) and plain rows (the model's own causal/sliding masks) never share a batch.
        packed = [r for r in rows if r.segment is not None]
        plain = [r for r in rows if r.segment is None]
        chunks = [part[lo: lo + step] for part in (packed, plain) for lo in range(0, len(part), step)]
        batches = ((chunk, batch_rows(chunk, self.target, mask_dtype)) for chunk in chunks)
        if self.streamer is not None:
            scored = self.streamer.forwards(batches, lambda cb: self.scored_logits(cb[1]),
                                            lambda cb: cb[1]["input_ids"].numel(), self.target)
        else:
            scored = ((cb, self.scored_logits(cb[1])) for cb in batches)
        while True:
            started = time.perf_counter()
            try:
                (chunk, batch), logits = next(scored)
            except StopIteration:
                break
            logprobs = F.log_softmax(logits, dim=-1)
            self.stats.model_seconds += time.perf_counter() - started
            self._count(chunk, batch)
            for row, lp in zip(chunk, logprobs, strict=True):
                for i, cont, idx in row.scores:
                    lp_i = lp[torch.tensor(idx, device=lp.device) - row.first_scored]  # (len(cont), vocab)
                    cont_t = torch.tensor(cont, dtype=torch.long, device=lp.device)
                    greedy = bool((lp_i.argmax(dim=-1) == cont_t).all())
                    answer = (float(lp_i.gather(1, cont_t[:, None]).sum()), greedy)
                    res[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                    done += 1
            if self.progress:
                self.progress("zero-shot", done, len(requests))
        assert all(r is not None for r in res)
        return res  # type: ignore[return-value]

    def _count(self, chunk: list[Row], batch: dict[str, torch.Tensor]) -> None:
        self.stats.rows += len(chunk)
        self.stats.packed_rows += sum(r.segment is not None for r in chunk)
        self.stats.tokens += sum(len(r.tokens) for r in chunk)
        self.stats.padded_tokens += batch["input_ids"].numel()
        self.stats.scored_positions += batch["keep"].numel()


def live_hflm(model: Any, tokenizer: Any, batch_size: int = DEFAULT_BATCH_SIZE, progress: Progress | None = None,
              pack: bool = True, max_length: int | None = None) -> PackedLM:
    """crepe's scorer around the in-memory ``model`` (``max_length``: lm-eval's context length override).

    The name is historical (it used to subclass ``HFLM``); it returns a :class:`PackedLM`."""
    return PackedLM(model, tokenizer, batch_size, progress, pack, max_length)


def stock_hflm(model: Any, tokenizer: Any, batch_size: int = DEFAULT_BATCH_SIZE,
               max_length: int | None = None) -> LM:
    """lm-eval's own ``HFLM`` around the in-memory ``model`` (it may set a pad token: it gets a tokenizer copy)."""
    from lm_eval.models.huggingface import HFLM  # optional extra: lm-eval's stock HFLM

    with quiet_lm_eval():
        return HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=check_batch_size(batch_size),
                    max_length=max_length)
