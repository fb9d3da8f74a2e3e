"""Token generation with a KV cache: greedy, or temperature with top-p (nucleus) sampling."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from flashnb.errors import FlashnbError


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise FlashnbError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:  # also refuses nan
            raise FlashnbError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise FlashnbError(f"seed must be a whole number from 0 to 2**63 - 1, got {self.seed!r}")


DECODE_THREADS = 2  # torch threads for token-at-a-time decoding, unless the machine has fewer cores


def set_decode_threads() -> int:
    """Set torch's thread count for token-at-a-time decoding and return it: FLASHNB_TORCH_THREADS if
    set, else min(DECODE_THREADS, cores).

    A token is a chain of small matrix-vector products, so more threads help only a little; the
    flash reader needs no CPU thread of its own when native AIO carries its reads. Measured on a
    2-core VM (flashnb bench, shipped model): 2 threads against 1 gave the dense model in DRAM
    5.5-6.9 ms against 7.6-8.4 ms per token, and the engine with every technique 17-23 ms against
    28-29 ms.
    """
    env = os.environ.get("FLASHNB_TORCH_THREADS")
    cores = os.cpu_count() or 1
    if env is not None:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if not 1 <= n <= cores:
            raise FlashnbError(f"FLASHNB_TORCH_THREADS must be a whole number from 1 to {cores} (this machine's "
                               f"cores), got {env!r}; unset it for the default")
    else:
        n = min(DECODE_THREADS, cores)
    torch.set_num_threads(n)
    return n


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> int:
    """One token id from the logits [vocab] of the last position."""
    if cfg.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < cfg.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def check_context(prompt_ids: list[int], max_new_tokens: int, config) -> None:
    """One clear error when the prompt is empty, holds ids outside the model's vocabulary (a tokenizer of
    another model), or prompt + new tokens exceed the model's context."""
    if not prompt_ids:
        raise FlashnbError("the prompt is empty after tokenization; give at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise FlashnbError(f"the number of new tokens must be a whole number >= 0, got {max_new_tokens!r}")
    bad = [t for t in prompt_ids if not 0 <= int(t) < config.vocab_size]
    if bad:
        raise FlashnbError(f"token ids {bad[:5]} lie outside the model's vocabulary of {config.vocab_size}: the "
                           "tokenizer belongs to another model; use the model's own tokenizer.json")
    limit = config.max_position_embeddings
    if len(prompt_ids) + max_new_tokens > limit:
        raise FlashnbError(f"prompt ({len(prompt_ids)} tokens) + {max_new_tokens} new tokens exceeds the "
                           f"model's context of {limit} positions; shorten the prompt or ask for fewer tokens")


def decode(run: Callable[[list[int]], torch.Tensor], prompt_ids: list[int], max_new_tokens: int,
           sampling: SamplingConfig | None = None, eos_id: int | list[int] | None = None) -> Iterator[int]:
    """The sampling loop: `run(ids)` appends ids to the model's KV cache and returns the logits of
    the last one; it is called once with the prompt, then once per new token."""
    sampling = sampling or SamplingConfig()
    gen = torch.Generator().manual_seed(sampling.seed)
    stop = set(eos_id) if isinstance(eos_id, (list, tuple)) else {eos_id}  # Llama 3 configs list several
    logits = run(list(prompt_ids))
    for i in range(max_new_tokens):
        tok = sample_next(logits, sampling, gen)
        if tok in stop:
            return
        yield tok
        if i + 1 < max_new_tokens:
            logits = run([tok])


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig | None = None,
             eos_id: int | None = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after `prompt_ids`, one forward pass per token.

    The prompt is run once (prefill) into a KV cache; each later step feeds only the newest token.
    Stops early at `eos_id` (not yielded) when given.
    """
    check_context(prompt_ids, max_new_tokens, model.config)
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    return decode(lambda ids: model(torch.tensor([ids]), cache)[0, -1], prompt_ids, max_new_tokens, sampling, eos_id)
