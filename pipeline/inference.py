"""Running a trained model: load it, choose how it samples, complete or stream prompts, hold a chat.

    folder / Hub id (+ adapter) ──load_for_inference──► model (eval, fp32) + its own tokenizer
    --temperature, --top-k, ... ──Sampling (validated)──► `model.generate` kwargs
    prompt (text, or a conversation through the chat template) ──stream──► text pieces as they are decoded
    prompts ──completions / complete (left-padded batches)──► num_samples completions each, with token counts
    a terminal ──chat_session (history kept within the context)──► a conversation

The ``generate``, ``chat`` and ``serve`` commands stand on these functions; every result equals `model.generate`
with `Sampling.generate_kwargs` (tested), except that text is cut at the first stop string.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

# Importing loading registers Quill with the Auto classes.
from pipeline.loading import load_tokenizer

__all__ = [
    "Completion",
    "Conversation",
    "Prompt",
    "Sampling",
    "Stream",
    "as_chat",
    "chat_session",
    "check_prompt_length",
    "complete",
    "completions",
    "context_length",
    "encode_prompt",
    "load_for_inference",
    "print_completions",
    "read_prompts",
    "render_prompt",
    "stream",
]

Prompt = str | Sequence[dict[str, Any]]
"""Plain text, or a conversation: ``[{"role": "user", "content": "..."}, ...]`` (rendered by the chat template)."""


# ------------------------------------------------------------------------------------------ loading


def load_for_inference(model: str | Path, adapter: str | Path | None = None
                       ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM in eval mode and float32 (on the CPU) and its own tokenizer: a folder the pipeline wrote (a Quill,
    ``finetune/merged``), any folder or Hub id `AutoModelForCausalLM.from_pretrained` loads, or with ``adapter`` a
    PEFT adapter attached to that base. The tokenizer is the adapter's when it ships one, else the model's."""
    _check_model_folder(model, "MODEL")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    except OSError as error:  # a Hub id that does not exist (or is not reachable offline)
        raise FileNotFoundError(f"cannot load a model from {model!s}: {_first_line(error)}") from None
    tokenizer_source: str | Path = model
    if adapter is not None:
        loaded = _attach_adapter(loaded, Path(adapter), model)
        if any((Path(adapter) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer_source = adapter
    tokenizer = load_tokenizer(tokenizer_source)
    embedded = loaded.get_input_embeddings().num_embeddings
    if len(tokenizer) > embedded:
        raise ValueError(f"the tokenizer of {tokenizer_source} has {len(tokenizer)} tokens but the model embeds only "
                         f"{embedded}: save the model's own tokenizer into its folder")
    return loaded.eval(), tokenizer


def _check_model_folder(model: str | Path, what: str) -> None:
    local = Path(model).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return
        if (local / "adapter_config.json").is_file():
            base = json.loads((local / "adapter_config.json").read_text()).get("base_model_name_or_path")
            raise ValueError(f"{local} is a PEFT adapter, not a model: pass its base as {what} and this folder as "
                             f"--adapter (its adapter_config.json names the base {base!r})")
        raise ValueError(f"{local} is not a model folder (no config.json): pass a folder written by save_pretrained, "
                         "e.g. a run's pretrain/ or finetune/merged/")
    text = str(model)
    # A Hub id is "name" or "owner/name"; anything else that does not exist is a path with a typo.
    if local.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise FileNotFoundError(f"no model folder at {local}: check the path (a Hub id looks like owner/name)")


def _attach_adapter(base: PreTrainedModel, adapter: Path, base_name: str | Path) -> torch.nn.Module:
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    trained_on = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    try:
        return PeftModel.from_pretrained(base, str(adapter))
    except (RuntimeError, ValueError, KeyError) as error:  # shape mismatches, target modules missing
        raise ValueError(f"the adapter {adapter} does not fit the base {base_name}: {_first_line(error)}. Fix: pass "
                         f"the base it was trained on (its adapter_config.json names {trained_on!r})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ------------------------------------------------------------------------------------------ sampling


@dataclass(frozen=True)
class Sampling:
    """How a completion is decoded. Invalid values raise `ValueError` when the object is made."""

    max_new_tokens: int = 128
    """Tokens to generate at most (fewer when EOS or a stop string comes first)."""
    temperature: float = 0.8
    """Softmax temperature; 0 decodes greedily (the most likely token each step; top_k/top_p/min_p/seed unused)."""
    top_k: int = 50
    """Sample among the k most likely tokens only; 0 for all."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p; 1.0 for all."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0 for none."""
    repetition_penalty: float = 1.0
    """Divide the logits of tokens already in the text by this (1.0: none; also applies when greedy)."""
    stop: tuple[str, ...] = ()
    """Strings that end a completion; the text is cut before the first one."""
    seed: int | None = None
    """Seed of the sampling RNG, for reproducible samples; None draws a fresh one."""
    num_samples: int = 1
    """Completions per prompt (needs temperature > 0: greedy ones would all be the same)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))  # a list from JSON or argparse: keep it hashable
        problems = [message for broken, message in (
            (self.max_new_tokens < 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (not (math.isfinite(self.temperature) and self.temperature >= 0),
             f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k < 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (not 0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {self.top_p}"),
            (not 0 <= self.min_p < 1, f"min_p must be in [0, 1) (0 = off), got {self.min_p}"),
            (not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0),
             f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"),
            (any(not isinstance(s, str) or not s for s in self.stop), f"stop strings must be non-empty, got {self.stop}"),
            (self.seed is not None and self.seed < 0, f"seed must be >= 0, got {self.seed}"),
            (self.num_samples < 1, f"num_samples must be >= 1, got {self.num_samples}"),
            (self.num_samples > 1 and self.temperature == 0,
             (f"num_samples={self.num_samples} with temperature=0 (greedy) gives identical completions: "
              "set temperature > 0 or num_samples=1")),
        ) if broken]
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        """These settings as `model.generate` keyword arguments. Every knob is passed, "off" included, so that the
        model's own `generation_config` (or transformers' default top_k=50) never changes what was asked for."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": not self.greedy,
            "num_return_sequences": self.num_samples,
            "repetition_penalty": self.repetition_penalty,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        if not self.greedy:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p or None)
        else:  # unset, or the model's generation_config could turn them on and warn
            kwargs.update(temperature=None, top_k=None, top_p=None, min_p=None)
        if self.stop:
            kwargs.update(stop_strings=list(self.stop), tokenizer=tokenizer)
        return kwargs

    def with_settings(self, assignments: dict[str, str]) -> Sampling:
        """A copy with ``{"temperature": "0.7", "stop": "\\n,###"}`` applied (text values, as typed in a chat);
        ``seed=none`` clears the seed, ``stop=`` the stop strings."""
        known = {field.name: field for field in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for key, text in assignments.items():
            if key not in known:
                raise ValueError(f"unknown setting {key!r}; the settings are {', '.join(known)}")
            default = known[key].default
            try:
                if key == "stop":
                    changes[key] = tuple(s for s in text.encode().decode("unicode_escape").split(",") if s)
                elif key == "seed":
                    changes[key] = None if text.lower() in ("", "none") else int(text)
                else:
                    changes[key] = type(default)(text)
            except ValueError:
                raise ValueError(f"{key}={text!r}: expected a {type(default).__name__}") from None
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        return " ".join(f"{key}={value!r}" if key == "stop" else f"{key}={value}"
                        for key, value in dataclasses.asdict(self).items())


# ------------------------------------------------------------------------------------------ prompts


def context_length(model: torch.nn.Module) -> int | None:
    """The model's positions (``config.max_position_embeddings``), or None when its config does not say."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def check_prompt_length(prompt_tokens: int, max_new_tokens: int, context: int | None) -> None:
    """Refuse a prompt that leaves no room for ``max_new_tokens`` in ``context`` positions (None: unbounded)."""
    if context is None or prompt_tokens + max_new_tokens <= context:
        return
    room = context - prompt_tokens
    fix = (f"lower max_new_tokens to at most {room}, or shorten the prompt" if room >= 1 else
           f"shorten the prompt to at most {context - max_new_tokens} tokens" if context > max_new_tokens else
           f"lower max_new_tokens below {context} and shorten the prompt")
    raise ValueError(f"the prompt is {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}, but the model "
                     f"has {context} positions ({prompt_tokens} + {max_new_tokens} > {context}). Fix: {fix}")


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    """The text the model continues: ``prompt`` itself, or a conversation through the tokenizer's chat template
    with the assistant's turn opened (``add_generation_prompt=True``)."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template, so a conversation cannot be rendered: give plain text, "
                         "or set tokenizer.chat_template and save the tokenizer into the model folder")
    for message in prompt:
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise ValueError(f"a conversation is a list of {{'role': ..., 'content': ...}}, got {message!r}")
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """The prompt's token ids, as the model saw text in training: plain text with the tokenizer's own special tokens
    (``[bos] + ids`` for ours and Llama's); a rendered chat template without them (it writes its own BOS)."""
    text = render_prompt(tokenizer, prompt)
    ids = tokenizer(text, add_special_tokens=isinstance(prompt, str), verbose=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:  # the text already started with the BOS token
        ids = ids[1:]
    return ids


def _encode_checked(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: Prompt,
                    sampling: Sampling) -> list[int]:
    ids = encode_prompt(tokenizer, prompt)
    if not ids:
        raise ValueError("the prompt is empty and the tokenizer adds no start token: give some text")
    check_prompt_length(len(ids), sampling.max_new_tokens, context_length(model))
    return ids


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """With a seed: the global RNG seeded with it, and the caller's RNG state restored afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(seed)
        yield


# ------------------------------------------------------------------------------------------ completing


@dataclass(frozen=True)
class Completion:
    """One completion: its text (new tokens only, special tokens dropped, cut before a stop string), how many tokens
    the prompt and the completion took, and why it ended (``stop``: EOS or a stop string; ``length``: max_new_tokens)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def completions(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                sampling: Sampling, *, batch_size: int = 8) -> list[list[Completion]]:
    """``sampling.num_samples`` completions of each prompt, generated in left-padded batches of ``batch_size``
    prompts (the positions come from the attention mask). Every prompt is checked against the context first. A
    seeded result depends on the batch it was generated in, as `model.generate`'s does."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = [_encode_checked(model, tokenizer, prompt, sampling) for prompt in prompts]
    device = next(model.parameters()).device
    kwargs = sampling.generate_kwargs(tokenizer)
    pad = kwargs["pad_token_id"]
    results: list[list[Completion]] = []
    with _seeded(sampling.seed, device), torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
            output = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)[:, width:]
            n = sampling.num_samples
            for i, ids in enumerate(batch):
                results.append([_completion(tokenizer, row.tolist(), len(ids), sampling)
                                for row in output[i * n : (i + 1) * n]])
    return results


def _completion(tokenizer: PreTrainedTokenizerBase, new: list[int], prompt_tokens: int, sampling: Sampling
                ) -> Completion:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    length = new.index(eos) if eos in new else len(new)
    ended = length < len(new)
    if not ended:  # a row that met a stop string is filled with padding up to the batch's longest
        while length and new[length - 1] == pad:
            length -= 1
    text, stopped = _cut_at_stop(tokenizer.decode(new[:length], skip_special_tokens=True), sampling.stop)
    finished = ended or stopped or length < sampling.max_new_tokens
    return Completion(text, prompt_tokens, length + ended, "stop" if finished else "length")  # the EOS counts too


def complete(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: Prompt, sampling: Sampling
             ) -> list[str]:
    """The ``sampling.num_samples`` completions of one prompt, as text."""
    return [c.text for c in completions(model, tokenizer, [prompt], sampling)[0]]


# ------------------------------------------------------------------------------------------ streaming


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _CountingStreamer(TextIteratorStreamer):
    """The streamer, keeping the new token ids too (for the token counts and the finish reason)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.generated: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            self.generated += value.reshape(-1).tolist()
        super().put(value)


class Stream(Iterator[str]):
    """The text pieces of one completion as they are decoded; after the last, `prompt_tokens`,
    `completion_tokens` and `finish_reason` are set as in `Completion`. Closing it early (or breaking out of a
    ``for``) stops the generation."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, ids: list[int],
                 sampling: Sampling, cancel: threading.Event | None) -> None:
        self.prompt_tokens, self.completion_tokens, self.finish_reason = len(ids), 0, "stop"
        self._stop_event = threading.Event()  # set by close(), or by the caller's cancel through the criteria
        self._cancel = cancel
        self._tokenizer, self._sampling = tokenizer, sampling
        self._streamer = _CountingStreamer(tokenizer)
        self._error: BaseException | None = None
        self._stopped = False
        device = next(model.parameters()).device
        criteria = StoppingCriteriaList([_Cancelled(self._stop_event)] + ([_Cancelled(cancel)] if cancel else []))
        input_ids = torch.tensor([ids], device=device)
        kwargs = dict(sampling.generate_kwargs(tokenizer), streamer=self._streamer, stopping_criteria=criteria,
                      input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        self._thread = threading.Thread(target=self._generate, args=(model, kwargs, sampling.seed, device), daemon=True)
        self._thread.start()
        self._pieces = self._cut(iter(self._streamer))

    def _generate(self, model: torch.nn.Module, kwargs: dict[str, Any], seed: int | None, device: torch.device) -> None:
        try:
            with _seeded(seed, device), torch.no_grad():
                model.generate(**kwargs)
        except BaseException as error:  # noqa: BLE001  (handed to the reader, which would otherwise wait forever)
            self._error = error
            self._streamer.end()

    def _cut(self, pieces: Iterator[str]) -> Iterator[str]:
        """The pieces up to the first stop string; text that may begin one is held back until it is known."""
        stop = self._sampling.stop
        held = ""
        for piece in pieces:
            held += piece
            text, self._stopped = _cut_at_stop(held, stop)
            if self._stopped:
                if text:
                    yield text
                self._stop_event.set()
                return
            keep = max((k for s in stop for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
            if len(held) > keep:
                yield held[: len(held) - keep]
                held = held[len(held) - keep :]
        if held:
            yield held

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration:
            self._finish()
            raise

    def _finish(self) -> None:
        self.close()
        if self._error is not None:
            raise self._error
        generated = self._streamer.generated
        self.completion_tokens = len(generated)
        if self._tokenizer.eos_token_id in generated or self._stopped:
            self.finish_reason = "stop"
        elif self._cancel is not None and self._cancel.is_set():
            self.finish_reason = "cancelled"
        elif len(generated) >= self._sampling.max_new_tokens:
            self.finish_reason = "length"

    def close(self) -> None:
        """Stop the generation and wait for its thread."""
        self._stop_event.set()
        self._thread.join()

    def __del__(self) -> None:
        self._stop_event.set()


def stream(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: Prompt, sampling: Sampling,
           cancel: threading.Event | None = None) -> Stream:
    """Generate one completion in a background thread and yield its text as the tokens come (transformers'
    `TextIteratorStreamer`: whole words, a line at a time at most). Setting ``cancel`` stops the generation at the
    next token. The pieces joined equal `complete` with the same settings. Bad settings or a too-long prompt raise
    here, before anything is generated."""
    if sampling.num_samples != 1:
        raise ValueError(f"stream makes one completion; num_samples is {sampling.num_samples}: use complete")
    return Stream(model, tokenizer, _encode_checked(model, tokenizer, prompt, sampling), sampling, cancel)


# ------------------------------------------------------------------------------------------ the generate command


def read_prompts(path: Path, *, chat: bool = False, system: str | None = None) -> list[Prompt]:
    """The prompts of a file: a ``.jsonl`` file holds one JSON object a line, with ``prompt`` (text) or ``messages``
    (a conversation); any other file, one prompt a line (blank lines skipped). With ``chat``, a text prompt becomes
    the user's message (after ``system``) of a conversation."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file at {path}")
    prompts: list[Prompt] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not JSON ({error.msg}): a .jsonl file holds one object a line, "
                             'like {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]}') from None
        if not isinstance(row, dict) or not ({"prompt", "messages"} & set(row)):
            raise ValueError(f'{path}:{number} has neither "prompt" nor "messages"')
        prompts.append(row["messages"] if "messages" in row else row["prompt"])
    if not prompts:
        raise ValueError(f"{path} holds no prompt")
    return [as_chat(prompt, system) if chat and isinstance(prompt, str) else prompt for prompt in prompts]


def as_chat(text: str, system: str | None = None) -> list[dict[str, str]]:
    """``text`` as the user's message of a conversation, after the ``system`` message if any."""
    return [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": text}]


def print_completions(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                      sampling: Sampling, *, as_json: bool = False, batch_size: int = 8,
                      out: IO[str] | None = None) -> None:
    """The ``generate`` command's output: one prompt and one sample stream as they come; otherwise each completion
    under a header, or with ``as_json`` one JSON object a prompt (its completions, token counts and settings)."""
    out = out or sys.stdout
    if len(prompts) == 1 and sampling.num_samples == 1 and not as_json:
        for piece in stream(model, tokenizer, prompts[0], sampling):
            out.write(piece)
            out.flush()
        out.write("\n")
        return
    results = completions(model, tokenizer, prompts, sampling, batch_size=batch_size)
    for number, (prompt, samples) in enumerate(zip(prompts, results, strict=True), 1):
        if as_json:
            out.write(json.dumps({
                "prompt": prompt, "completions": [c.text for c in samples],
                "finish_reasons": [c.finish_reason for c in samples], "prompt_tokens": samples[0].prompt_tokens,
                "completion_tokens": [c.completion_tokens for c in samples], "settings": dataclasses.asdict(sampling),
            }, ensure_ascii=False) + "\n")
            continue
        for index, sample in enumerate(samples, 1):
            out.write(f"--- prompt {number}, sample {index} ---\n{sample.text}\n")


# ------------------------------------------------------------------------------------------ chat


@dataclass
class Conversation:
    """A chat's history, rendered through the chat template and kept within the model's context: when the next
    reply would not fit, the oldest turns (a user message and its reply) are dropped; the system message stays."""

    tokenizer: PreTrainedTokenizerBase
    context: int | None
    system: str | None = None
    turns: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def messages(self, turns: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        """The system message (if any) and ``turns`` (default: the whole history)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.turns if turns is None else turns)

    def fit(self, max_new_tokens: int) -> int:
        """Drop the oldest turns until the prompt and ``max_new_tokens`` fit; returns how many messages were dropped.
        When even the latest message alone does not fit, it is removed and `ValueError` says the lengths."""
        alone = len(encode_prompt(self.tokenizer, self.messages(self.turns[-1:])))
        try:
            check_prompt_length(alone, max_new_tokens, self.context)
        except ValueError:
            self.turns.pop()
            raise
        dropped = 0
        while len(encode_prompt(self.tokenizer, self.messages())) + max_new_tokens > (self.context or math.inf):
            pair = len(self.turns) > 1 and [t["role"] for t in self.turns[:2]] == ["user", "assistant"]
            cut = 2 if pair else 1
            del self.turns[:cut]
            dropped += cut
        return dropped


_CHAT_HELP = "/settings [key=value ...] shows or changes the sampling, /reset forgets the conversation, /exit ends"


def chat_session(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, sampling: Sampling, *,
                 system: str | None = None, stdin: IO[str] | None = None, stdout: IO[str] | None = None,
                 show_prompt: IO[str] | None = None) -> int:
    """A conversation in the terminal until ``/exit`` or end of input; replies stream as they are decoded. With
    ``show_prompt``, each prompt sent to the model is written there as a JSON line (its messages and text)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    render_prompt(tokenizer, [{"role": "user", "content": ""}])  # no chat template: say so before the first turn
    conversation = Conversation(tokenizer, context_length(model), system)
    interactive = stdin.isatty()
    stdout.write(f"chat with a model of {conversation.context or 'unbounded'} positions. {_CHAT_HELP}.\n")
    while True:
        if interactive:
            stdout.write(">>> ")
        stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:  # end of input
            stdout.write("\n" if interactive else "")
            return 0
        message = line.rstrip("\n")
        if not message.strip():
            continue
        if message.startswith("/"):
            command, _, rest = message.partition(" ")
            if command in ("/exit", "/quit", "/bye"):
                return 0
            if command == "/reset":
                conversation.turns.clear()
                stdout.write("[the conversation is reset]\n")
            elif command == "/settings":
                sampling = _settings(sampling, rest, stdout)
            else:
                stdout.write(f"[unknown command {command}: {_CHAT_HELP}]\n")
            continue
        conversation.turns.append({"role": "user", "content": message})
        try:
            dropped = conversation.fit(sampling.max_new_tokens)
        except ValueError as error:
            stdout.write(f"[{error}]\n")
            continue
        if dropped:
            stdout.write(f"[the context is full: the oldest {dropped} messages were dropped; "
                         f"{len(conversation.turns)} kept]\n")
        messages = conversation.messages()
        if show_prompt is not None:
            show_prompt.write(json.dumps({"messages": messages, "prompt": render_prompt(tokenizer, messages)}) + "\n")
            show_prompt.flush()
        conversation.turns.append({"role": "assistant", "content": _reply(model, tokenizer, messages, sampling, stdout)})


def _settings(sampling: Sampling, text: str, stdout: IO[str]) -> Sampling:
    try:
        assignments = dict(item.split("=", 1) for item in text.split())
        sampling = sampling.with_settings(assignments)
    except ValueError as error:  # a malformed item, an unknown key or a bad value: keep the old settings
        stdout.write(f"[{error}. Usage: /settings temperature=0.7 top_k=40]\n")
    stdout.write(f"[{sampling.describe()}]\n")
    return sampling


def _reply(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
           sampling: Sampling, stdout: IO[str]) -> str:
    cancel = threading.Event()
    pieces = []
    tokens = stream(model, tokenizer, messages, sampling, cancel)
    try:
        for piece in tokens:
            pieces.append(piece)
            stdout.write(piece)
            stdout.flush()
    except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
        cancel.set()
        tokens.close()
    stdout.write("\n")
    return "".join(pieces)
