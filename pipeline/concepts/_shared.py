"""What every view needs: model inputs checked against the model's positions, single-token lookups, range checks,
the unwrapped model under a PEFT adapter, and a headless pyplot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def encode(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, text: str, reserve: int = 0) -> dict[str, Any]:
    """The text as model inputs, refused when it (plus ``reserve`` generated tokens) needs more positions than the
    model has: a learned table would fail with an index error, rotary positions silently extrapolate."""
    inputs = tokenizer(text, return_tensors="pt")
    check_positions(model, inputs["input_ids"].shape[1], reserve)
    return inputs


def check_positions(model: torch.nn.Module, length: int, reserve: int = 0, what: str = "the text") -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and length + reserve > limit:
        extra = f" + {reserve} new tokens" if reserve else ""
        raise ValueError(
            f"{what} is {length} tokens{extra}, more than the model's {limit} positions "
            f"(max_position_embeddings). Fix: shorten the text{' or lower --max-new-tokens' if reserve else ''}."
        )


def token_id(tokenizer: PreTrainedTokenizerBase, word: str) -> int:
    """The id of ``word`` when it is one token; otherwise an error listing its pieces (and the one-token spelling
    with a leading space, when there is one: byte-level BPE keeps the space that precedes a word)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return ids[0]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    fix = "pick a word that is one token (see `pipeline inspect tokens`)"
    if not word.startswith(" ") and len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1:
        fix = f"pass ' {word}' (with the leading space a word has inside a sentence): that is one token"
    raise ValueError(f"{word!r} is {len(ids)} tokens {pieces}, not one. Fix: {fix}.")


def check_top(top: int, available: int) -> None:
    if not 1 <= top <= available:
        raise ValueError(f"--top {top} is outside 1..{available} (the tokens there are to rank). Fix: pick one in range.")


def check_length(length: int, config: Any, flag: str) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if length < 1 or (limit is not None and length > limit):
        raise ValueError(f"{flag} {length} is outside 1..{limit} (the model's max_position_embeddings). Fix: pick one in range.")


def base_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model itself, under a PEFT wrapper if there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def label(token: str, width: int = 14, spaces: bool = False) -> str:
    """A token as a readable tick label: escapes shown (a newline as \\n), long ones cut; with ``spaces``, its
    leading and trailing spaces drawn as ␣ (in a plot, " she" and "she" would look alike)."""
    text = repr(token)[1:-1]
    if spaces:
        stripped = text.strip(" ")
        start = text.index(stripped) if stripped else len(text)
        text = "␣" * start + stripped + "␣" * (len(text) - start - len(stripped))
    return text if len(text) <= width else text[: width - 1] + "…"


def pyplot():
    """matplotlib.pyplot without a display (imported only when a view draws)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path
