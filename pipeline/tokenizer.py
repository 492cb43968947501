"""Tokenizer stage: train a byte-level BPE and wrap it as a transformers fast tokenizer.

`train_tokenizer` returns a `PreTrainedTokenizerFast`; `tokenizer.save_pretrained(dir)` writes
`tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja`, and `AutoTokenizer.from_pretrained(dir)`
loads it back offline, with no remote code.

Conventions every other stage relies on:

* **Lossless.** Byte-level pre-tokenizer, the 256 byte symbols always in the vocabulary, no normalizer, no
  prefix space, no clean-up of spaces on decode: `decode(encode(text)) == text` for any Unicode string, and no
  text ever maps to `unk_token` (it is declared only because tools expect one).
* **BOS, never EOS, on plain encoding.** `tokenizer(text)` gives `[bos, *ids]` (as Llama does): the
  post-processor lives in `tokenizer.json`, so it survives a reload. Note that transformers 5 does not persist
  `add_bos_token`, so `tokenizer.add_bos_token` reads False even though BOS is added; do not toggle
  `add_bos_token`/`add_eos_token` on these tokenizers: the setters rebuild the post-processor from that flag.
* **Chat.** `DEFAULT_CHAT_TEMPLATE` writes the BOS itself, and `apply_chat_template(tokenize=True)` encodes
  with `add_special_tokens=False`, so a chat gets exactly one BOS. If you render with `tokenize=False`, encode
  the text with `add_special_tokens=False` or it starts with two BOS.
* **pad != eos**, so collators that mask padding never mask the real end of a document.
* **`padding_side="right"`** (training, packing, collators). Batched generation pads on the left: pass
  `padding_side="left"` to the call or set `tokenizer.padding_side = "left"` there.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pipeline.artifacts import RunArtifacts
from pipeline.data import held_out_sections, load_splits, tokenizer_section
from pipeline.loading import DEFAULT_SPECIAL_TOKENS

if TYPE_CHECKING:
    from accelerate import Accelerator

    from pipeline.recipe import Recipe

NAME = "tokenizer"


# One BOS for the whole chat, a role line per turn, EOS after every turn (the model learns to stop after its
# answer). `{% generation %}` marks what the assistant wrote, so fine-tuning can train on those tokens only
# via `apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True)`.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")
_N_BYTES = len(pre_tokenizers.ByteLevel.alphabet())  # 256: every byte has a symbol, so nothing is ever unknown
_FERTILITY_BATCH = 1_000


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8192,
    min_frequency: int = 2,
    special_tokens: Mapping[str, str] | None = None,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    model_max_length: int = 1024,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and return it as a transformers fast tokenizer.

    Args:
        texts: strings, or batches (lists) of strings, streamed once: a list, a generator, a `datasets`
            column (`ds["text"]`) or `(batch["text"] for batch in ds.iter(batch_size=1000))`.
        vocab_size: upper bound on the whole vocabulary (bytes + merges + special tokens); `len(tokenizer)`
            never exceeds it, so a model built with `vocab_size=len(tokenizer)` covers every id.
        min_frequency: a pair must occur this often to be merged.
        special_tokens: overrides merged over `DEFAULT_SPECIAL_TOKENS` (keys like `"eos_token"`). They get
            the first ids, in order.
        chat_template: Jinja chat template saved with the tokenizer; None for none.
        model_max_length: the context length; `truncation=True` cuts there.
        show_progress: show the `tokenizers` training progress bar.
    """
    specials = _resolve_special_tokens(special_tokens)
    _check_sizes(vocab_size, min_frequency, model_max_length, n_special=len(specials))
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not one string: pass [text] or text.splitlines().")
    stream = _iter_texts(texts)
    first = next(stream, None)  # peek, so an empty corpus fails before training and nothing is materialised
    if first is None:
        raise ValueError("train_tokenizer got no text: the iterable is empty or holds only empty strings.")

    backend = Tokenizer(models.BPE())
    # No normalizer and no prefix space: either would make decode(encode(text)) differ from text.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(specials.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # keep all 256 bytes, even those never seen
        show_progress=show_progress,
    )
    backend.train_from_iterator(itertools.chain([first], stream), trainer=trainer)

    bos = specials["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,  # the clean-up deletes spaces before punctuation
        chat_template=chat_template,
        **specials,  # `tokenizer_object=` alone leaves bos/eos/pad/unk unset
    )


def fertility_report(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> dict[str, float]:
    """How finely `tokenizer` cuts `texts` (held-out text, special tokens not counted).

    Returns `tokens_per_word` (words = whitespace-separated), `bytes_per_token` (UTF-8),
    `chars_per_token`, `unk_rate` (share of tokens that are `unk_token`) and the raw counts
    `n_words`, `n_tokens`, `n_bytes`, `n_chars`.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not one string: pass [text].")
    n_words = n_tokens = n_bytes = n_chars = n_unk = 0
    unk_id = tokenizer.unk_token_id
    stream = _iter_texts(texts)
    while batch := list(itertools.islice(stream, _FERTILITY_BATCH)):
        # verbose=False: held-out documents longer than model_max_length are fine here, no warning wanted.
        for text, ids in zip(batch, tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]):
            n_words += len(text.split())
            n_bytes += len(text.encode("utf-8"))
            n_chars += len(text)
            n_tokens += len(ids)
            n_unk += 0 if unk_id is None else ids.count(unk_id)
    if n_words == 0:
        raise ValueError("fertility_report got no words: pass non-empty held-out texts.")
    return {
        "tokens_per_word": n_tokens / n_words,
        "bytes_per_token": n_bytes / n_tokens,
        "chars_per_token": n_chars / n_tokens,
        "unk_rate": n_unk / n_tokens,
        "n_words": n_words,
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
        "n_chars": n_chars,
    }


def _resolve_special_tokens(overrides: Mapping[str, str] | None) -> dict[str, str]:
    specials = {**DEFAULT_SPECIAL_TOKENS, **(overrides or {})}
    unknown = sorted(set(specials) - set(_SPECIAL_TOKEN_KEYS))
    if unknown:
        raise ValueError(f"Unknown special token keys {unknown}; use some of {list(_SPECIAL_TOKEN_KEYS)}.")
    if not all(isinstance(token, str) and token for token in specials.values()):
        raise ValueError(f"Special tokens must be non-empty strings, got {specials}.")
    if len(set(specials.values())) != len(specials):
        # Shared strings would share an id: pad == eos makes collators mask the real EOS.
        raise ValueError(f"Special tokens must be distinct strings (pad_token != eos_token), got {specials}.")
    return specials


def _check_sizes(vocab_size: int, min_frequency: int, model_max_length: int, n_special: int) -> None:
    smallest = _N_BYTES + n_special
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size={vocab_size} cannot hold the {_N_BYTES} byte symbols and {n_special} special tokens: "
            f"use vocab_size >= {smallest} (a few thousand for real use)."
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}.")
    if model_max_length < 1:
        raise ValueError(f"model_max_length must be >= 1, got {model_max_length}.")


def _iter_texts(texts: Iterable[str | list[str]]) -> Iterator[str]:
    """Flatten strings and batches of strings lazily, skipping empty ones, rejecting anything else."""
    for item in texts:
        batch = item if isinstance(item, (list, tuple)) else (item,)
        for text in batch:
            if not isinstance(text, str):
                raise TypeError(f"Expected str texts (or lists of str), got {type(text).__name__}: {text!r:.80}")
            if text:
                yield text


def run(recipe: Recipe, accelerator: Accelerator) -> PreTrainedTokenizerBase:
    """The tokenizer stage of a recipe → `output_dir/tokenizer/`: an existing tokenizer (`tokenizer.path`) copied
    there, or a byte-level BPE trained on the TRAINING documents of `data.tokenizer_section` (``data`` split as
    every stage splits it, over `tokenizer.sources`), so that no document the recipe holds out (pretraining's or
    fine-tuning's, `data.held_out_sections`) is seen, with its fertility on the held-out documents in
    `fertility.json`."""
    section, folder = recipe.tokenizer, RunArtifacts.of(recipe).tokenizer
    report = None
    if section.path is not None:
        tokenizer = AutoTokenizer.from_pretrained(section.path)
    else:
        with accelerator.main_process_first():
            train_docs, held_out = load_splits(tokenizer_section(recipe), recipe.seed, held_out_sections(recipe))
        if accelerator.is_main_process:
            batches = (batch["text"] for batch in train_docs.iter(batch_size=_FERTILITY_BATCH))
            tokenizer = train_tokenizer(
                batches, vocab_size=section.vocab_size, min_frequency=section.min_frequency,
                model_max_length=recipe.model.max_position_embeddings,
            )
            report = fertility_report(tokenizer, held_out["text"])
    if accelerator.is_main_process:
        tokenizer.save_pretrained(folder)
        if report is not None:
            (folder / "fertility.json").write_text(json.dumps(report, indent=2))
            accelerator.print(
                f"tokenizer: {len(tokenizer)} tokens | held-out fertility {report['tokens_per_word']:.2f} tokens/word, "
                f"{report['bytes_per_token']:.2f} bytes/token"
            )
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(folder)
