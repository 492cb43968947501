"""`pipeline serve`: the OpenAI-compatible API, tested with the official `openai` client against a server this module
starts in a subprocess on a free localhost port. Every answer is greedy and must equal `inference.complete` on the
same model loaded here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from tiny import rows_quill, rows_tokenizer

from pipeline.inference import Sampling, complete, encode_prompt, load_for_inference

openai = pytest.importorskip("openai")

NAME = "tiny"
LIMIT = 200  # --max-tokens-limit
MAX_BYTES = 20_000  # --max-request-bytes
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A02 Chronic"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, the model and tokenizer as loaded here, the server's log file)."""
    root = tmp_path_factory.mktemp("serve")
    tokenizer = rows_tokenizer()
    rows_quill(tokenizer, max_position_embeddings=256).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    port, log = _free_port(), root / "server.log"
    command = [sys.executable, "-m", "pipeline", "serve", str(root / "model"), "--port", str(port),
               "--model-name", NAME, "--max-tokens-limit", str(LIMIT), "--max-request-bytes", str(MAX_BYTES)]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1],
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_until_ready(url, process, log)
        model, tokenizer = load_for_inference(root / "model")
        yield url, model, tokenizer, log
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait_until_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    pytest.fail(f"the server did not answer within 180 s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=120)


def greedy(server, prompt, max_tokens: int) -> str:
    _, model, tokenizer, _ = server
    return complete(model, tokenizer, prompt, Sampling(max_new_tokens=max_tokens, temperature=0))[0]


def test_the_one_model_is_listed(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completions_equal_greedy_generation_with_usage(server, client):
    tokenizer = server[2]
    prompts = ["A01 Acute fever", "Notes: left"]
    response = client.completions.create(model=NAME, prompt=prompts, max_tokens=12, temperature=0)
    assert [c.text for c in response.choices] == [greedy(server, p, 12) for p in prompts]
    assert [c.finish_reason for c in response.choices] == ["length", "length"]
    assert response.usage.prompt_tokens == sum(len(encode_prompt(tokenizer, p)) for p in prompts)
    assert response.usage.completion_tokens == 24


def test_a_streamed_completion_is_the_same_text_in_openai_chunks(server, client):
    chunks = list(client.completions.create(model=NAME, prompt="A01 Acute fever", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy(server, "A01 Acute fever", 12)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12  # the usage chunk comes last, without choices
    assert len(chunks) > 3  # it did stream


def test_chat_completions_go_through_the_chat_template(server, client):
    response = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=10, temperature=0)
    assert response.choices[0].message.content == greedy(server, CHAT, 10)
    assert response.choices[0].message.role == "assistant"
    assert response.usage.prompt_tokens == len(encode_prompt(server[2], CHAT))
    chunks = list(client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == greedy(server, CHAT, 10)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seeded_sampling_settings_reach_the_model(server, client):
    _, model, tokenizer, _ = server
    extra = {"top_k": 30, "min_p": 0.01, "repetition_penalty": 1.2}
    response = client.completions.create(model=NAME, prompt="Notes: left", max_tokens=10, temperature=0.9,
                                         top_p=0.95, seed=11, stop=["zz"], extra_body=extra)
    sampling = Sampling(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=11, stop=("zz",), **extra)
    assert response.choices[0].text == complete(model, tokenizer, "Notes: left", sampling)[0]


def test_concurrent_clients_each_get_exactly_their_own_answer(server, client):
    prompts = ["A01 Acute fever", "Notes: left", "the lung heart kidney", "fracture of the"]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        if i % 2:  # half of them stream, so streams run beside plain requests
            chunks = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=16, temperature=0,
                                               stream=True)
            answers[i] = "".join(c.choices[0].text for c in chunks if c.choices)
        else:
            answers[i] = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=16,
                                                   temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert answers == {i: greedy(server, p, 16) for i, p in enumerate(prompts)}


def test_a_client_that_leaves_mid_stream_stops_its_generation_and_the_server_keeps_serving(server, client):
    log = server[3]
    before = log.read_text().count("a client left")
    stream = client.completions.create(model=NAME, prompt="A01 Acute fever", max_tokens=LIMIT, temperature=0,
                                       stream=True)
    next(iter(stream))
    stream.close()
    response = client.completions.create(model=NAME, prompt="Notes: left", max_tokens=8, temperature=0)
    assert response.choices[0].text == greedy(server, "Notes: left", 8)
    lines = [line for line in log.read_text().splitlines() if "a client left" in line][before:]
    assert lines, log.read_text()[-2000:]
    if "stopped after" in lines[0]:  # else it was still queued, and skipped
        stopped = int(lines[0].split("stopped after ")[1].split()[0])
        assert stopped < LIMIT


def test_bad_requests_get_openai_errors(server, client):
    with pytest.raises(openai.BadRequestError, match=f"max_tokens=500 is above this server's limit of {LIMIT}"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=500)
    with pytest.raises(openai.BadRequestError, match=r"the model has 256 positions.*Fix: shorten the prompt"):
        client.completions.create(model=NAME, prompt="fever " * 300, max_tokens=10)
    with pytest.raises(openai.NotFoundError, match="'gpt-4' is not served here; this server serves 'tiny'"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=5, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="logprobs is not supported"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=5, logprobs=2)
    with pytest.raises(openai.APIStatusError, match=f"this server takes at most {MAX_BYTES}") as error:
        client.completions.create(model=NAME, prompt="x" * (MAX_BYTES + 1), max_tokens=5)
    assert error.value.status_code == 413
    assert error.value.body["type"] == "invalid_request_error"


def test_malformed_json_is_a_400_in_openais_error_shape(server):
    request = urllib.request.Request(f"{server[0]}/chat/completions", data=b'{"model": "tiny", "messages": [',
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    assert error.value.code == 400
    body = json.loads(error.value.read())
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "JSON" in body["error"]["message"]
