"""An lm-eval ``HFLM`` for a resident in-memory model, with a cheap greedy decoder.

For tiny models the Python around a forward pass costs more than the pass itself:
``HFLM.generate_until`` re-tokenizes and re-sorts every request and runs
``model.generate`` (tens of milliseconds of set-up per call) for each batch. Here the
requests are tokenized, sorted and padded once (``plan_generation``); each trial then
runs only a batched greedy decode with a KV cache (``run_plan``).

The decode feeds the model exactly what ``HFLM.generate_until`` → ``model.generate``
feeds it (same batches in the same order, left padding, attention mask dropped when it
is all ones, position ids from the mask, a ``DynamicCache``, ``logits_to_keep=1``, pad
after EOS, lm-eval's stop-sequence rule) so its outputs are identical; anything it does
not reproduce (sampling, logits processors from the model's generation config, encoder-
decoder models, static caches) falls back to ``HFLM.generate_until``.
``loglikelihood`` requests take HFLM's normal path, with tokenization memoized.

``HFLM`` imports torch, which ``import evaluators`` must not: the methods live in a mixin,
and :class:`FastHFLM` (the mixin over ``HFLM``) is built on first use
(:func:`fast_hflm_class`; ``from evaluators.runtime.fast_lm import FastHFLM`` does that).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# generation_config fields that do not change a greedy decode (sampling knobs are
# ignored when do_sample=False; the rest are bookkeeping or token ids we honour).
_HARMLESS_GEN_CONFIG = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
    "transformers_version", "_from_model_config", "use_cache", "cache_implementation",
    "output_attentions", "output_hidden_states", "output_scores", "output_logits",
    "return_dict_in_generate", "do_sample", "temperature", "top_k", "top_p", "min_p",
    "typical_p", "epsilon_cutoff", "eta_cutoff", "num_return_sequences",
    "max_length",  # lm-eval passes its own, which wins
    "max_new_tokens",  # wins over lm-eval's max_length in model.generate: honoured in _greedy
})


@dataclass
class _Batch:
    rows: list[int]  # positions in the request list
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # None when there is no padding
    position_ids: torch.Tensor


@dataclass
class _Group:
    until: list[str]
    max_gen_toks: int
    batches: list[_Batch] = field(default_factory=list)


@dataclass
class GenerationPlan:
    """Tokenized, sorted, padded generation requests, reusable for every candidate."""

    n: int
    groups: list[_Group]


def _group_key(gen_kwargs: dict) -> Any:
    # the key lm_eval's Collator groups generation requests by
    try:
        return tuple(
            (k, tuple(v) if isinstance(v, Iterable) else v) for k, v in sorted(gen_kwargs.items())
        )
    except (TypeError, AttributeError):
        return tuple(gen_kwargs)


class _FastDecoding:
    """What :class:`FastHFLM` adds to ``HFLM(pretrained=model, tokenizer=...)`` for one
    worker's resident model (a mixin: it comes before ``HFLM`` in the class's bases)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64, **kwargs: Any) -> None:
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        self._encode_cache: dict[tuple, list[int]] = {}
        self._decode_cache: dict[tuple[int, ...], str] = {}
        # (id(model), fast path ok, takes logits_to_keep, name of its cache argument)
        self._model_ok: tuple[int, bool, bool, str] | None = None
        self._resolved_max_length: int | None = None

    def set_model(self, model) -> None:
        """Score another in-memory model of the same architecture and tokenizer."""
        model.eval()
        self._model = model
        self._config = model.config
        self._device = model.device
        self._model_ok = None
        self._resolved_max_length = None

    @property
    def max_length(self) -> int:
        # HFLM re-derives it from the config on every access (thousands per loglikelihood call)
        if self._resolved_max_length is None:
            self._resolved_max_length = super().max_length  # HFLM's
        return self._resolved_max_length

    # -- tokenization, memoized: the same prompts are encoded for every candidate --
    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        if kwargs:
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        key = (string, add_special_tokens, left_truncate_len)
        hit = self._encode_cache.get(key)
        if hit is None:
            if len(self._encode_cache) > 1_000_000:
                self._encode_cache.clear()
            hit = super().tok_encode(string, add_special_tokens, left_truncate_len)
            self._encode_cache[key] = hit
        return list(hit)

    # -- generation --
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        plan = self.plan_generation(requests)
        if plan is None:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        return self.run_plan(plan, requests)

    def plan_generation(self, requests: Sequence) -> GenerationPlan | None:
        """Batches for ``run_plan``, or None if these requests need ``HFLM.generate_until``."""
        if self.backend != "causal" or isinstance(self.think_end_token, int) or not requests:
            return None
        if self.mixed_precision_dtype is not None or not isinstance(self.batch_size, int):
            return None
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        grouped: dict[Any, list[int]] = {}
        for i, req in enumerate(requests):
            grouped.setdefault(_group_key(req.args[1]), []).append(i)
        groups = []
        for rows in grouped.values():
            kwargs = normalize_gen_kwargs(requests[rows[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            greedy = kwargs.pop("do_sample", None) is False and not kwargs.pop("temperature", 0.0)
            if kwargs or not greedy or max_gen_toks < 1 or self.max_length - max_gen_toks <= 0:
                return None
            # HFLM's order: longest prompt first, ties by text (a stable sort, like Collator's)
            contexts = {i: requests[i].args[0] for i in rows}
            rows = sorted(rows, key=lambda i: (-len(self.tok_encode(contexts[i])), contexts[i]))
            size = self.batch_size or len(rows)
            group = _Group(until=until, max_gen_toks=max_gen_toks)
            for start in range(0, len(rows), size):
                chunk = rows[start:start + size]
                ids, mask = self.tok_batch_encode(
                    [requests[i].args[0] for i in chunk],
                    left_truncate_len=self.max_length - max_gen_toks,
                    truncation=self.truncation,
                )
                position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
                group.batches.append(_Batch(
                    rows=chunk, input_ids=ids, position_ids=position_ids,
                    attention_mask=None if bool((mask == 1).all()) else mask,
                ))
            groups.append(group)
        return GenerationPlan(n=len(requests), groups=groups)

    def fast_path_available(self) -> bool:
        """Whether ``run_plan`` can reproduce ``model.generate`` for the current model."""
        model = self.model
        if self._model_ok is None or self._model_ok[0] != id(model):
            params = inspect.signature(model.forward).parameters
            self._model_ok = (id(model), self._check_model(model, params), "logits_to_keep" in params,
                              _cache_argument(params) or "")
        return self._model_ok[1]

    @staticmethod
    def _check_model(model, params) -> bool:
        config = model.config
        if getattr(config, "is_encoder_decoder", False):
            return False
        if not getattr(model, "_supports_default_dynamic_cache", lambda: False)():
            return False
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            if set(gen.to_diff_dict()) - _HARMLESS_GEN_CONFIG:
                return False
            if gen.cache_implementation not in (None, "dynamic"):
                return False
        has_inputs = all(p in params for p in ("attention_mask", "position_ids"))
        return has_inputs and _cache_argument(params) is not None

    def run_plan(self, plan: GenerationPlan, requests: Sequence | None = None) -> list[str]:
        """The generated strings, in request order, for the current model."""
        if not self.fast_path_available():
            if requests is None:
                raise RuntimeError("this model needs HFLM.generate_until: pass the requests")
            return super().generate_until(list(requests), disable_tqdm=True)
        from lm_eval.models.utils import postprocess_generated_text

        out: list[str | None] = [None] * plan.n
        think = self.think_end_token if isinstance(self.think_end_token, str) else None
        for group in plan.groups:
            windows = self._stop_windows(group.until)
            # a max_new_tokens in the model's generation config wins over lm-eval's max_gen_toks
            # in model.generate (which lm-eval calls with max_length): so here too
            max_new = getattr(self.model.generation_config, "max_new_tokens", None) or group.max_gen_toks
            for batch in group.batches:
                texts = self._decode(self._greedy(batch, max_new, windows))
                for row, text in zip(batch.rows, texts):
                    out[row] = postprocess_generated_text(generation=text, stop=group.until,
                                                          think_end_token=think)
        return out  # type: ignore[return-value]

    def _decode(self, rows: list[list[int]]) -> list[str]:
        """``tokenizer.decode(row, skip_special_tokens=True)`` per row, memoized: candidates
        of one study keep producing the same few answers."""
        keys = [tuple(r) for r in rows]
        new = list(dict.fromkeys(k for k in keys if k not in self._decode_cache))
        if new:
            if len(self._decode_cache) > 200_000:
                self._decode_cache.clear()
            texts = self.tokenizer.batch_decode([list(k) for k in new], skip_special_tokens=True)
            self._decode_cache.update(zip(new, texts))
        return [self._decode_cache[k] for k in keys]

    def _eos_ids(self) -> list[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    def _stop_windows(self, until: list[str]) -> list[tuple[str, int]]:
        """Stop strings that need lm-eval's look-back check, with its window length.

        A stop string that is exactly the text of an EOS token needs none: a row that
        emits it is finished by EOS, and a row that spells it otherwise keeps it in its
        text, where post-processing cuts it, so generating further changes nothing.
        """
        eos_texts = {self.tokenizer.decode([e]) for e in self._eos_ids()}
        return [
            (s, len(self.tokenizer.encode(s, add_special_tokens=False)) + 2)
            for s in until if s not in eos_texts
        ]

    def _greedy(self, batch: _Batch, max_new: int, windows: list[tuple[str, int]]) -> list[list[int]]:
        import torch
        from transformers import DynamicCache

        with torch.inference_mode():
            model = self.model
            device = model.device
            eos_ids = self._eos_ids()
            pad = self.tokenizer.pad_token_id
            if pad is None:  # as model.generate does: pad with EOS
                pad = eos_ids[0] if eos_ids else 0
            ids = batch.input_ids.to(device)
            mask = batch.attention_mask.to(device) if batch.attention_mask is not None else None
            pos = batch.position_ids.to(device)
            extra: dict[str, Any] = {"use_cache": True}
            if self._model_ok is not None and self._model_ok[2]:
                extra["logits_to_keep"] = 1
            cache = DynamicCache(config=model.config.get_text_config(decoder=True))
            cache_arg = self._model_ok[3] if self._model_ok is not None else "past_key_values"
            extra[cache_arg] = cache
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **extra)
            n = ids.shape[0]
            unfinished = torch.ones(n, dtype=torch.bool, device=device)
            eos = torch.tensor(eos_ids, device=device) if eos_ids else None
            trackers = [torch.zeros(n, dtype=torch.bool) for _ in windows]
            steps: list[torch.Tensor] = []
            for step in range(max_new):
                nxt = out.logits[:, -1].float().argmax(-1)
                if eos is not None:
                    nxt = torch.where(unfinished, nxt, pad)
                    unfinished &= (nxt != eos) if eos.numel() == 1 else ~torch.isin(nxt, eos)
                steps.append(nxt)
                if step == max_new - 1 or (eos is not None and not bool(unfinished.any())):
                    break
                if windows and self._stop_strings_seen(steps, windows, trackers):
                    break
                pos = pos[:, -1:] + 1
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones((n, 1))], dim=-1)
                out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, **extra)
            return torch.stack(steps, dim=1).tolist()

    def _stop_strings_seen(self, steps: list[torch.Tensor], windows: list[tuple[str, int]],
                           trackers: list[torch.Tensor]) -> bool:
        # lm-eval's MultiTokenEOSCriteria: per stop string, a row is done once the string
        # shows in its last few generated tokens (decoded with special tokens); the batch
        # stops when every row is done for one of the strings.
        import torch

        generated = torch.stack(steps, dim=1)
        for (stop, width), done in zip(windows, trackers):
            texts = self.tokenizer.batch_decode(generated[:, -width:])
            for i, text in enumerate(texts):
                if not done[i] and stop in text:
                    done[i] = True
            if bool(done.all()):
                return True
        return False


def _cache_argument(params: Any) -> str | None:
    """The name ``forward`` takes the KV cache by: ``past_key_values`` (transformers < 5.24)
    or ``cache`` (5.24 renamed it)."""
    for name in ("past_key_values", "cache"):
        if name in params:
            return name
    return None


@functools.cache
def fast_hflm_class() -> type:
    """``FastHFLM``: the fast decoding over lm-eval's ``HFLM`` (imports torch and lm-eval's
    model code, once)."""
    from lm_eval.models.huggingface import HFLM

    class FastHFLM(_FastDecoding, HFLM):
        """``HFLM(pretrained=model, tokenizer=...)`` for one worker's resident model."""

    FastHFLM.__qualname__ = "FastHFLM"  # found as evaluators.runtime.fast_lm.FastHFLM (pickle)
    return FastHFLM


def __getattr__(name: str) -> Any:
    if name == "FastHFLM":
        return fast_hflm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
