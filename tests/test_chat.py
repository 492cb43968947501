"""`pipeline chat`: a conversation through the chat template, its history kept within the model's context (the
oldest turns dropped, and the user told), `/settings`, `/reset`, `/exit`; driven by a stdin script in a subprocess.
`--show-prompt` writes each prompt sent to the model to stderr, so the test sees exactly what the model got."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import rows_quill, rows_tokenizer

from pipeline.inference import (
    Conversation,
    Sampling,
    chat_session,
    complete,
    encode_prompt,
    load_for_inference,
)

CONTEXT = 128  # our test tokenizer is nearly bytes: the template's markers alone take ~40 tokens
MAX_NEW = 8
SYSTEM = "Be brief."
LONG = " ".join(["fever"] * 60)  # more than the context on its own
TURNS = ["A01 Acute fever", "Notes: left lung", "the heart kidney bone", LONG, "fracture of the limb"]
AFTER_RESET = ["injury of the bone"]
SCRIPT = [
    f"/settings temperature=0 max_new_tokens={MAX_NEW}",
    "/settings bogus=1",
    *TURNS,
    "/settings",
    "/reset",
    *AFTER_RESET,
    "/nonsense",
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat") / "model"
    tokenizer = rows_tokenizer()
    rows_quill(tokenizer, max_position_embeddings=CONTEXT).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def session(chat_model):
    """The chat run on the script (then end of input): (stdout, the prompts it showed, its exit code)."""
    result = subprocess.run(  # noqa: PLW1510  (the exit code is a test of its own)
        [sys.executable, "-m", "pipeline", "chat", str(chat_model), "--system", SYSTEM, "--show-prompt"],
        input="\n".join(SCRIPT) + "\n", capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
    )
    shown = [json.loads(line) for line in result.stderr.splitlines() if line.startswith('{"messages"')]
    return result.stdout, shown, result.returncode, result.stderr


def test_the_chat_ends_cleanly_at_the_end_of_input(session):
    _, shown, code, stderr = session
    assert code == 0, stderr[-3000:]
    assert len(shown) == len(TURNS) - 1 + len(AFTER_RESET)  # the too-long message never reached the model


def test_settings_are_shown_changed_and_checked(session):
    stdout = session[0]
    assert f"max_new_tokens={MAX_NEW} temperature=0.0 top_k=50" in stdout
    assert "[unknown setting 'bogus'; the settings are max_new_tokens, temperature" in stdout
    assert "[unknown command /nonsense: /settings [key=value ...]" in stdout


def test_each_prompt_is_the_template_applied_to_the_kept_history(session, chat_model):
    stdout, shown, _, _ = session
    model, tokenizer = load_for_inference(chat_model)
    greedy = Sampling(max_new_tokens=MAX_NEW, temperature=0)
    system = [{"role": "system", "content": SYSTEM}]
    history: list[dict[str, str]] = []
    drops = 0
    users = [t for t in TURNS if t != LONG] + AFTER_RESET
    for number, (user, prompt) in enumerate(zip(users, shown, strict=True)):
        if user == AFTER_RESET[0]:
            history = []  # /reset
        history.append({"role": "user", "content": user})
        messages = prompt["messages"]
        assert prompt["prompt"] == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        kept = messages[1:]
        assert messages[:1] == system  # the system message is never dropped
        assert kept == history[len(history) - len(kept):], number  # the latest turns, in order
        assert kept[0]["role"] == "user"
        assert len(encode_prompt(tokenizer, messages)) + MAX_NEW <= CONTEXT
        if len(kept) < len(history):  # one more exchange would not have fitted
            drops += 1
            longer = system + history[len(history) - len(kept) - 2:]
            assert len(encode_prompt(tokenizer, longer)) + MAX_NEW > CONTEXT
        reply = complete(model, tokenizer, messages, greedy)[0]  # what the model said to exactly this prompt
        assert reply in stdout
        history.append({"role": "assistant", "content": reply})
    assert drops >= 1  # the script did fill the context
    assert stdout.count("[the context is full: the oldest") == drops
    assert "the prompt is" in stdout and "Fix: shorten the prompt" in stdout  # the too-long message, refused
    assert "[the conversation is reset]" in stdout


def test_a_conversation_drops_whole_exchanges_and_keeps_the_system_message(chat_model):
    _, tokenizer = load_for_inference(chat_model)
    conversation = Conversation(tokenizer, context=CONTEXT, system=SYSTEM)
    for i in range(3):
        conversation.turns += [{"role": "user", "content": f"A0{i} fever"}, {"role": "assistant", "content": "ok"}]
    conversation.turns.append({"role": "user", "content": "A09 fever"})
    full = len(encode_prompt(tokenizer, conversation.messages()))
    dropped = conversation.fit(max_new_tokens=CONTEXT - full + 1)  # one token too many: the oldest exchange goes
    assert dropped == 2
    assert conversation.turns[0] == {"role": "user", "content": "A01 fever"}
    assert conversation.messages()[0] == {"role": "system", "content": SYSTEM}
    kept = list(conversation.turns)
    with pytest.raises(ValueError, match="the prompt is .* tokens and max_new_tokens is 100"):
        conversation.fit(max_new_tokens=100)  # even the latest message alone leaves too little room
    assert conversation.turns == kept[:-1]  # only that message is removed


def test_a_model_without_a_chat_template_is_refused_before_the_chat_starts(chat_model):
    model, tokenizer = load_for_inference(chat_model)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat_session(model, tokenizer, Sampling())
