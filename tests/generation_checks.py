"""Checks shared by the equivalence tests of test_model.py and test_generation.py.

An equivalence between two code paths (KV cache or none, a left-padded batch or one prompt at a time, eager or sdpa,
static or dynamic cache) proves nothing on a model whose outputs do not depend on their context: a model that only
looks at the last token gives the same greedy tokens whether its cache works or not. So every equivalence test first
asserts that dependence (`assert_depends_on_context`), then compares logits or generation scores, not only tokens,
with the explicit tolerances below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging as hf_logging

SCORE_ATOL = 1e-4  # fp32 scores of two equivalent code paths differ by ~1e-6 on these models
CONTEXT_MARGIN = 0.05  # changing an early token must move the last logits by at least 500 x SCORE_ATOL
FIRST_ORDINARY_ID = 3  # ids 0-2 are bos/eos/pad in every test model

# The output field holding the KV cache in the installed transformers: `cache` from 5.24, `past_key_values` before.
# Determined here, independently of the model code under test. (Reading `.past_key_values` on 5.24 logs a deprecation.)
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def cache_of(output):
    return getattr(output, CACHE_FIELD)


def with_token_changed(ids: torch.Tensor, position: int, vocab_size: int) -> torch.Tensor:
    """A copy of `ids` (B, T) whose token at `position` is another ordinary (non-special) token in every row."""
    changed = ids.clone()
    span = vocab_size - FIRST_ORDINARY_ID
    changed[:, position] = FIRST_ORDINARY_ID + (changed[:, position] - FIRST_ORDINARY_ID + span // 3) % span
    assert not torch.equal(changed, ids)
    return changed


@torch.no_grad()
def context_sensitivity(model, ids: torch.Tensor, position: int = 0) -> torch.Tensor:
    """Per row of `ids` (B, T), unpadded: max |change| of the last position's logits when token `position` changes."""
    last = model(ids, use_cache=False).logits[:, -1].float()
    changed = model(with_token_changed(ids, position, model.config.vocab_size), use_cache=False).logits[:, -1].float()
    return (last - changed).abs().amax(-1)


def assert_depends_on_context(model, ids: torch.Tensor, position: int = 0, margin: float = CONTEXT_MARGIN) -> None:
    sensitivity = context_sensitivity(model, ids, position)
    assert bool((sensitivity > margin).all()), (
        f"the fixture's last logits barely depend on token {position} (max change {sensitivity.tolist()} <= {margin}):"
        " an equivalence test on it could not fail"
    )


def left_pad(prompts: Sequence[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D prompts -> left-padded (B, T) ids and their attention mask."""
    width = max(len(p) for p in prompts)
    input_ids = torch.stack([F.pad(p, (width - len(p), 0), value=pad_token_id) for p in prompts])
    attention_mask = torch.stack([F.pad(torch.ones_like(p), (width - len(p), 0)) for p in prompts])
    return input_ids, attention_mask


@torch.no_grad()
def greedy(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 16,
           **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation of exactly `max_new_tokens` (no EOS stop): (sequences (B, T + N), scores (B, N, vocab))."""
    out = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
        output_scores=True, return_dict_in_generate=True, pad_token_id=model.config.pad_token_id, eos_token_id=None,
        **kwargs,
    )
    scores = torch.stack(out.scores, dim=1).float()
    assert scores.shape[1] == max_new_tokens and out.sequences.shape[1] == input_ids.shape[1] + max_new_tokens
    return out.sequences, scores


def assert_same_generation(actual: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor],
                           atol: float = SCORE_ATOL) -> None:
    """Same tokens, token for token, and scores within `atol` at every step."""
    (sequences, scores), (expected_sequences, expected_scores) = actual, expected
    assert torch.equal(sequences, expected_sequences), (sequences, expected_sequences)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=atol)


@contextlib.contextmanager
def captured_messages() -> Iterator[list[str]]:
    """Everything emitted through the `warnings` module and transformers' loggers while the block runs.
    transformers logs most deprecations with `warning_once`, which stays silent after the first time in a process:
    its memory is cleared first, and the verbosity is raised to WARNING (other tests may have lowered it)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.DEBUG)
    library_logger = logging.getLogger("transformers")
    verbosity = hf_logging.get_verbosity()
    hf_logging.warning_once.cache_clear()
    hf_logging.set_verbosity_warning()
    library_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        library_logger.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
