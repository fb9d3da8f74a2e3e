"""Token generation with a KV cache: greedy, or temperature with top-p (nucleus) sampling."""

from __future__ import annotations

import math
import os
import time
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


DECODE_THREADS = 2  # at most this many torch threads for token-at-a-time decoding


def idle_cores(sample_seconds: float = 0.1) -> float:
    """Cores no process used over the next `sample_seconds` (from /proc/stat; all cores where the
    kernel does not say)."""
    cores = os.cpu_count() or 1

    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)   # idle + iowait
        return sum(v[:8]) - idle, sum(v[:8])
    try:
        b0, t0 = ticks()
        time.sleep(sample_seconds)
        b1, t1 = ticks()
    except (OSError, ValueError, IndexError):
        return float(cores)
    return cores * (1 - (b1 - b0) / (t1 - t0)) if t1 > t0 else float(cores)


def torch_threads(most: int | None = None) -> int:
    """FLASHNB_TORCH_THREADS if set (one clear error unless it is 1 to this machine's cores), else as many
    threads as there are idle cores, measured over 0.1 s (at least 1, at most `most`)."""
    env = os.environ.get("FLASHNB_TORCH_THREADS")
    cores = os.cpu_count() or 1
    if env is None:
        return max(1, min(most or cores, cores, int(idle_cores() + 0.25)))
    try:
        n = int(env)
    except ValueError:
        n = 0
    if not 1 <= n <= cores:
        raise FlashnbError(f"FLASHNB_TORCH_THREADS must be a whole number from 1 to {cores} (this machine's "
                           f"cores), got {env!r}; unset it for the default")
    return n


def set_decode_threads() -> int:
    """Set torch's thread count for token-at-a-time decoding and return it: FLASHNB_TORCH_THREADS if
    set, else as many threads (at most DECODE_THREADS) as there are idle cores (`torch_threads`).

    Threads that find their core taken wait for each other at every matrix product: measured on a
    2-core VM with two busy processes beside it, the engine with every technique took 118 ms per token
    with 2 threads against 27 ms with 1 (dense: 23 against 15); idle, 2 threads and 1 were within the
    spread for the engine (14-19 ms) and 2 were faster for the dense model (3.9-6.7 against 5.2-9.2 ms).
    So: 2 threads only when 2 cores are idle.
    """
    n = torch_threads(DECODE_THREADS)
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
                           f"model's context of {limit} positions; "
                           + (f"ask for {limit - len(prompt_ids)} new tokens or fewer, or shorten the prompt"
                              if len(prompt_ids) < limit else f"shorten the prompt to fewer than {limit} tokens"))


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


@torch.no_grad()
def greedy_with_logits(loop, prompt_ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """`n` greedy tokens from a TokenLoop (flashnb.core.engine: the engine or a baseline), one step per token,
    and the logits of every position it ran [len(prompt_ids) + n - 1, vocab]: what a reference model's
    logits over prompt + tokens[:-1] are compared with."""
    kv = loop.model.new_cache(1, len(prompt_ids) + n)
    logits = [loop.step(t, kv) for t in prompt_ids]
    out: list[int] = []
    for _ in range(n):
        out.append(int(torch.argmax(logits[-1])))
        if len(out) < n:
            logits.append(loop.step(out[-1], kv))
    return out, torch.stack(logits)
