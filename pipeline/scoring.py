"""Held-out language-model scoring: the one definition of loss, perplexity and bits per byte.

    training's validation blocks ────────────────────────────┐ (training.evaluate_lm, bytes from token ids)
    documents ──document_loader──► one document per window ──┴─ score_batches (language_model_metrics: the
                                                                 evaluate stage, `pipeline eval`; bytes of the texts)
        per batch: example_sums ──► per example: Σ NLL, targets, Σ NLL of the byte-bearing targets, their bytes
                   accelerator.gather_for_metrics ──► every example once (accelerate's padding repeats dropped)
        all batches: Totals.pool (math.fsum) ──► Totals ──► loss, perplexity, bits_per_byte

Definitions, shared by the training loop's validation, the evaluation stage and `pipeline eval`:

* **loss**: nats per target token (``labels != -100`` after the shift), zero-byte targets such as a document's
  closing EOS included: the model must learn to stop.
* **perplexity**: ``exp(loss)``; ``inf`` once that overflows a float (loss ≥ 709 nats per token, the guard of the
  ``perplexity`` metric module too); NaN stays NaN.
* **bits per byte**, as lm-evaluation-harness defines it: the NLL in bits of the targets that stand for at least
  one byte of text, over those bytes. Unlike perplexity it compares models with different tokenizers. Which
  targets bear bytes comes with the batch: a ``text`` column (1 on the tokens of the text itself; the caller
  counts the text's UTF-8 bytes, which works for any tokenizer) or else ``byte_lengths[target] > 0``
  (`pipeline.data.token_byte_lengths`, byte-level BPE).

Per-example sums are pooled with `math.fsum` (exactly rounded), so the totals do not depend on the order in which
the examples arrive: batches, processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from pipeline.data import IGNORE_INDEX, collate
from pipeline.sources import evenly_spaced

__all__ = ["TEXT", "Totals", "document_loader", "example_sums", "language_model_metrics", "perplexity", "score_batches"]

TEXT = "text"
"""Optional batch column, (B, T): 1 where the token belongs to the scored text. Marks the targets that count in
bits per byte; the model never sees it."""

_NOT_MODEL_INPUTS = ("labels", TEXT)
_OVERFLOW = 709.0  # math.exp overflows a float just above 709.78


def perplexity(loss: float) -> float:
    """``exp(loss)``, or ``inf`` where that no longer fits a float; a NaN loss (diverged training) stays NaN."""
    return math.inf if loss >= _OVERFLOW else math.exp(loss)


@dataclass(frozen=True)
class Totals:
    """Pooled sums over every scored example."""

    nll: float = 0.0  # nats, every target
    targets: int = 0
    text_nll: float = 0.0  # nats, the targets that stand for at least one byte
    bytes: int = 0  # UTF-8 bytes those targets stand for

    @classmethod
    def pool(cls, rows: torch.Tensor) -> Totals:
        """Sum (N, 4) per-example rows (see `example_sums`) exactly rounded."""
        nll, targets, text_nll, n_bytes = (math.fsum(column) for column in rows.double().cpu().T.tolist())
        return cls(nll, int(targets), text_nll, int(n_bytes))

    @property
    def loss(self) -> float:
        """Nats per target token (0 when nothing was scored)."""
        return self.nll / max(self.targets, 1)

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    @property
    def bits_per_byte(self) -> float | None:
        """None when no target stands for a byte (no byte lengths given)."""
        return self.text_nll / (math.log(2) * self.bytes) if self.bytes > 0 else None


def example_sums(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], byte_lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, 4) float64 per example: Σ NLL (nats) of its targets, their number, Σ NLL of the targets that bear bytes
    (the ``text`` column, else ``byte_lengths[target] > 0``) and the bytes they bear (0 with a ``text`` column:
    its caller counts the text's bytes)."""
    inputs = {name: tensor for name, tensor in batch.items() if name not in _NOT_MODEL_INPUTS}
    logits = model(**inputs, use_cache=False).logits.float()
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    mask = targets != IGNORE_INDEX
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    if TEXT in batch:
        text, n_bytes = batch[TEXT][:, 1:], torch.zeros_like(targets)
    elif byte_lengths is not None:
        n_bytes = byte_lengths.to(targets.device)[targets.clamp(min=0)] * mask
        text = n_bytes > 0
    else:
        text = n_bytes = torch.zeros_like(targets)
    sums = (nll.sum(-1), mask.sum(-1), (nll * text).sum(-1), n_bytes.sum(-1))
    return torch.stack([column.double() for column in sums], dim=-1)


@torch.no_grad()
def score_batches(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    accelerator: Accelerator,
    byte_lengths: torch.Tensor | None = None,
    max_batches: int | None = None,
) -> Totals:
    """`Totals` of ``model`` over ``batches`` (a prepared loader: its examples are split over the processes, and
    `gather_for_metrics` drops the examples accelerate repeats to even out the last batch). The model's mode is
    left to the caller."""
    rows = []
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        rows.append(accelerator.gather_for_metrics(example_sums(model, batch, byte_lengths)))
    return Totals.pool(torch.cat(rows)) if rows else Totals()


def document_loader(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], block_size: int, batch_size: int
) -> DataLoader:
    """Each document scored on its own as ``[bos] + tokens + [eos]``: every token of the text and the closing EOS is
    a target, predicted from the tokens before it in the document. A document longer than ``block_size`` is cut
    into windows of ``block_size`` tokens overlapping by one, so each target is predicted exactly once (with at most
    ``block_size - 1`` tokens of context). The windows carry a `TEXT` column; prepare the loader before scoring."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (a token and the token it predicts), got {block_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked, any id works
    windows = _windows(tokenizer, list(texts), block_size)
    return DataLoader(windows, batch_size=batch_size, collate_fn=partial(_collate_windows, pad_token_id=pad_id))


def language_model_metrics(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts_dataset: Dataset | Sequence[str],
    *,
    block_size: int,
    batch_size: int,
    accelerator: Accelerator,
    max_documents: int | None = None,
) -> dict[str, float]:
    """Perplexity and bits per byte of ``model`` on the documents of ``texts_dataset`` (a ``text`` column or strings),
    as this module defines them.

    Each document is scored on its own as ``[bos] + tokens + [eos]``, in windows of ``block_size`` tokens
    overlapping by one, so each target is predicted exactly once (`document_loader`). Perplexity
    and ``loss`` are per target token and include the closing EOS (the model must learn to stop). Bits per byte is
    the standard one (as lm-evaluation-harness computes it): the NLL in bits of the text's own tokens, over the
    UTF-8 bytes of the texts; the EOS stands for no byte of the text and is left out of it.

    ``model`` must be on ``accelerator.device``. Windows are split over the processes by the prepared loader and
    gathered with ``gather_for_metrics``. At most ``max_documents`` documents, evenly spaced, are scored.
    Returns ``perplexity``, ``bits_per_byte``, ``loss`` (nats per target token), ``tokens`` (targets scored),
    ``documents`` and ``bytes``.
    """
    texts = _texts(texts_dataset, max_documents)
    loader = accelerator.prepare(document_loader(tokenizer, texts, block_size, batch_size))
    model.eval()
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    # Over the texts' own bytes, which any tokenizer has (token byte lengths need byte-level BPE).
    totals = replace(score_batches(model, loader, accelerator), bytes=n_bytes)
    return {
        "perplexity": totals.perplexity,
        "bits_per_byte": totals.bits_per_byte,
        "loss": totals.loss,
        "tokens": totals.targets,
        "documents": len(texts),
        "bytes": n_bytes,
    }


def _texts(texts_dataset: Dataset | Sequence[str], max_documents: int | None) -> list[str]:
    if isinstance(texts_dataset, Dataset):
        if "text" not in texts_dataset.column_names:
            raise ValueError(f"the dataset has no 'text' column (columns: {texts_dataset.column_names})")
        texts_dataset = evenly_spaced(texts_dataset, max_documents)["text"]
    else:
        texts_dataset = evenly_spaced(texts_dataset, max_documents)
    texts = [text for text in texts_dataset if text]
    if not texts:
        raise ValueError("no text to score: every document is empty")
    return texts


def _windows(tokenizer: PreTrainedTokenizerBase, texts: list[str], block_size: int) -> list[dict[str, Any]]:
    """Per document, windows of ``block_size`` tokens overlapping by one, longest first (less padding per batch).
    ``text`` marks the tokens of the text itself (not the added BOS and EOS): the targets counted in bits per byte."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start a document with")
    end = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    windows = []
    for ids in encoded:
        sequence, text = [start, *ids, *end], [0, *[1] * len(ids), *[0] * len(end)]
        for offset in range(0, len(sequence) - 1, block_size - 1):
            window = slice(offset, offset + block_size)
            windows.append({"input_ids": sequence[window], TEXT: text[window]})
    return sorted(windows, key=lambda window: -len(window["input_ids"]))


def _collate_windows(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    batch = collate(rows, pad_token_id)  # right-padded, labels -100 on padding
    texts = [torch.tensor(row[TEXT]) for row in rows]
    batch[TEXT] = torch.nn.utils.rnn.pad_sequence(texts, batch_first=True)  # 0 on padding, like the labels
    return batch
