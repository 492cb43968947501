"""Model card, upload folder and push to the Hub (pipeline/hub.py), against a local stand-in of the Hub API.

``HF_ENDPOINT`` is read once, when huggingface_hub is imported, so everything that talks to the stand-in runs in a
subprocess started with ``HF_ENDPOINT`` pointing at it; the test process inspects the stand-in's state directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

import pipeline.hub
from hub_server import HubStandIn
from pipeline.hub import prepare_upload_folder, write_model_card

REPO = "tester/tiny"
CORPUS = ["the cat sat on the mat", "a dog ate the bone", "the patient has a mild fever", "no fever, no cough"] * 4
SENTENCE = "the dog sat on a mat"


# ---------------------------------------------------------------------------------------------------------------
# Tiny artefacts
# ---------------------------------------------------------------------------------------------------------------


def save_tiny_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=64, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=64)
    fast.save_pretrained(path)
    return fast


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def make_model_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make(model=None, name="upload", **card_kwargs)`` saves ``model`` (default: a tiny Llama) and a tiny
    tokenizer in ``tmp_path/<name>_artifacts/{model,tokenizer}``, assembles them with ``prepare_upload_folder`` in
    ``tmp_path/<name>`` and returns that ready-to-upload folder."""

    def make(model: PreTrainedModel | None = None, name: str = "upload", **card_kwargs) -> Path:
        work = tmp_path / f"{name}_artifacts"
        (model if model is not None else tiny_llama()).save_pretrained(work / "model")
        save_tiny_tokenizer(work / "tokenizer")
        return prepare_upload_folder(_artifacts(work), tmp_path / name, **{"repo_id": REPO, **card_kwargs})

    return make


def _artifacts(work: Path) -> dict[str, Path]:
    return {"model": work / "model", "tokenizer": work / "tokenizer"}


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file: equal snapshots mean an untouched folder."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# Subprocesses talking to the stand-in
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def hub():
    with HubStandIn() as server:
        yield server


def hub_env(hub: HubStandIn, tmp_path: Path, **overrides: str | None) -> dict[str, str]:
    """Environment of a process that talks to the stand-in: its endpoint, a dummy token, a fresh cache, no offline
    switch (the test process has one), no Xet. ``overrides`` set (or, with None, remove) variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    env |= {"HF_ENDPOINT": hub.url, "HF_TOKEN": "dummy", "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_python(code: str, env: dict[str, str], *args: str, cwd: Path | None = None, isolated: bool = False):
    """Run ``code`` in a fresh interpreter; returns the JSON it prints last."""
    command = [sys.executable, *(["-I"] if isolated else []), "-c", code, *args]
    result = subprocess.run(
        command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


PUSH = """
import importlib.util, json, sys, types
from pathlib import Path

# The push needs neither torch nor transformers, and `pipeline.hub` imports neither: each of these subprocesses
# starts in well under a second.
spec = importlib.util.spec_from_file_location("pipeline_hub", sys.argv[1])
hub = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hub)

results = []
for folder, cfg in json.loads(sys.argv[2]):
    try:
        target = types.SimpleNamespace(**{"private": False, "revision": None, "create_pr": False, "token": None,
                                          "commit_message": "Upload with pipeline", **cfg})
        info = hub.push_to_hub(Path(folder), target)
        results.append({"url": str(info), "oid": info.oid, "pr_url": info.pr_url})
    except hub.HubPushError as err:
        results.append({"error": str(err)})
print(json.dumps(results))
"""


def push(env: dict[str, str], *jobs: tuple[Path, dict]) -> list[dict]:
    """Push each ``(folder, hub settings)`` in turn, in one subprocess; one result dict per push."""
    jobs_json = json.dumps([(str(folder), {"repo_id": REPO, **cfg}) for folder, cfg in jobs])
    return run_python(PUSH, env, pipeline.hub.__file__, jobs_json)


LOAD = """
import json, sys
{prelude}
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

repo, revision, sentence, out = sys.argv[1:5]
tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(repo, revision=revision, trust_remote_code=True).eval()
ids = tokenizer(sentence, return_tensors="pt").input_ids
with torch.no_grad():
    torch.save(model(ids).logits, out)
print(json.dumps({{"ids": ids[0].tolist(), "class": type(model).__name__, "module": type(model).__module__}}))
"""


def load_from_hub(
    env: dict[str, str], tmp_path: Path, revision: str, *, isolated: bool = False
) -> tuple[dict, torch.Tensor]:
    """``from_pretrained`` the repo at ``revision`` in a fresh process; returns what it saw and the logits.
    ``isolated``: ``python -I``, run from outside the repo, with ``import pipeline`` made impossible."""
    prelude = "sys.modules['pipeline'] = None  # the repo alone has to suffice" if isolated else ""
    out = tmp_path / f"logits-{revision[:8]}.pt"
    seen = run_python(LOAD.format(prelude=prelude), env, REPO, revision, SENTENCE, str(out),
                      cwd=tmp_path, isolated=isolated)
    return seen, torch.load(out)


def assert_same_logits(model: PreTrainedModel, seen: dict, logits: torch.Tensor, tokenizer_dir: Path) -> None:
    local_ids = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)(SENTENCE).input_ids
    assert seen["ids"] == local_ids, "the tokenizer from the Hub does not tokenize like the local one"
    with torch.no_grad():
        expected = model(torch.tensor([local_ids])).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Model card and upload folder (no Hub needed)
# ---------------------------------------------------------------------------------------------------------------


def test_model_card_has_metadata_metrics_table_and_plots(tmp_path):
    folder, outside = tmp_path / "folder", tmp_path / "eval"
    folder.mkdir()
    outside.mkdir()
    plot = outside / "loss curve.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    secret = "hf_" + "x" * 34
    recipe = {"seed": 7, "train": {"lr": 1e-4}, "hub": {"repo_id": REPO, "token": secret}}
    metrics = {"base": {"perplexity": 31.41592, "accuracy": 0.25}, "tuned": {"perplexity": 12.5, "accuracy": 0.625}}

    path = write_model_card(folder, repo_id=REPO, recipe=recipe, metrics=metrics, plots=[str(plot)],
                            base_model="tester/base", datasets=["tester/notes"], tags=["medical"])

    card = ModelCard.load(path)  # parses the YAML metadata, as the Hub does
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.base_model == "tester/base" and card.data.datasets == ["tester/notes"]
    assert {"medical", "pipeline"} <= set(card.data.tags)
    # model-index: the last metrics row is the uploaded model.
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == metrics["tuned"]
    assert card.data.model_name == "tiny"

    rows = {cells[0]: cells[1:] for line in card.text.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert rows["model"] == ["perplexity", "accuracy"]
    for label, values in metrics.items():
        assert [float(c) for c in rows[label]] == pytest.approx(list(values.values()), rel=1e-3)

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.text)
    assert len(links) == 1 and not links[0].startswith(("/", "http"))  # relative: renders on the Hub
    assert (folder / unquote(links[0])).read_bytes() == plot.read_bytes()

    recipe_block = re.search(r"```yaml\n(.*?)```", card.text, flags=re.S).group(1)
    assert yaml.safe_load(recipe_block) == {**recipe, "hub": {"repo_id": REPO, "token": "<redacted>"}}
    assert secret not in path.read_text()
    assert "clinical" in card.text and "from_pretrained" in card.text


def test_upload_folder_layout_and_what_is_missing(tmp_path, make_model_folder):
    folder = make_model_folder()
    files = set(snapshot(folder))
    assert {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= files

    work = tmp_path / "upload_artifacts"
    (work / "adapter").mkdir()
    (work / "adapter" / "adapter_config.json").write_text("{}")
    (work / "adapter" / "adapter_model.safetensors").write_bytes(b"lora")
    (work / "plots").mkdir()
    (work / "plots" / "eval.png").write_bytes(b"png")
    with_extras = prepare_upload_folder({**_artifacts(work), "adapter": work / "adapter", "plots": work / "plots"},
                                        tmp_path / "extras", repo_id=REPO, recipe=None, metrics=None)
    extras = {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "plots/eval.png"}
    assert extras <= set(snapshot(with_extras))
    card = (with_extras / "README.md").read_text()
    assert "](plots/eval.png)" in card and 'subfolder="adapter"' in card

    with pytest.raises(FileNotFoundError, match=r"tokenizer_config\.json[\s\S]*tokenizer vocabulary"):
        prepare_upload_folder({"model": work / "model"}, tmp_path / "no_tokenizer")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_upload_folder(_artifacts(work), folder)
    with pytest.raises(ValueError, match="unknown artifact role"):
        prepare_upload_folder({"weights": work / "model"}, tmp_path / "bad_role")

    # Remote code: every module auto_map names must ship, and the modules those import with `from .x import`.
    config = json.loads((work / "model" / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyLM"}
    (work / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"configuration_tiny\.py[\s\S]*modeling_tiny\.py"):
        prepare_upload_folder(_artifacts(work), tmp_path / "no_code")
    (work / "model" / "modeling_tiny.py").write_text(
        "from .configuration_tiny import TinyConfig\nfrom .layers_tiny import Block\n"
    )
    (work / "model" / "configuration_tiny.py").write_text("")
    with pytest.raises(FileNotFoundError, match=r"layers_tiny\.py") as missing:
        prepare_upload_folder(_artifacts(work), tmp_path / "no_layers")
    assert "modeling_tiny.py" not in str(missing.value)

    # The same file name from two artifacts must agree.
    (work / "tokenizer" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="config.json is in both"):
        prepare_upload_folder(_artifacts(work), tmp_path / "clash")


# ---------------------------------------------------------------------------------------------------------------
# Push, against the stand-in
# ---------------------------------------------------------------------------------------------------------------


def test_push_is_one_commit_holding_all_from_pretrained_needs(hub, make_model_folder, tmp_path):
    model = tiny_llama()
    folder = make_model_folder(model)
    before = snapshot(folder)
    env = hub_env(hub, tmp_path)

    [result] = push(env, (folder, {}))

    repo = hub.repos[REPO]
    assert [c.oid for c in repo.commits[1:]] == [result["oid"]], "the push must be exactly one commit"
    initial = hub.files(REPO, repo.commits[0].oid)  # what create_repo put there: .gitattributes
    assert hub.files(REPO) == {**initial, **local_files(folder)}
    assert [m for m, p in hub.requests if "/commit/" in p] == ["POST"]
    assert snapshot(folder) == before
    seen, logits = load_from_hub(env, tmp_path, result["oid"])  # pinned to the commit the push returned
    assert seen["class"] == "LlamaForCausalLM"
    assert_same_logits(model, seen, logits, tmp_path / "upload_artifacts" / "tokenizer")


def test_failed_commit_leaves_repo_and_folder_as_they_were(hub, make_model_folder, tmp_path):
    env = hub_env(hub, tmp_path)
    [first] = push(env, (make_model_folder(name="v1"), {}))
    files_before, commits_before = hub.files(REPO), hub.commit_count(REPO)
    folder = make_model_folder(tiny_llama(seed=1), name="v2")
    before = snapshot(folder)

    hub.fail_commits = True  # HTTP 500 once the whole commit payload has arrived
    [result] = push(env, (folder, {}))

    assert "error" in result and str(folder) in result["error"]
    assert hub.files(REPO) == files_before and hub.commit_count(REPO) == commits_before
    assert hub.repos[REPO].refs["main"] == first["oid"]
    assert snapshot(folder) == before

    # The way out the error gives works: its `hf upload` command uploads the folder as it is.
    hub.fail_commits = False
    command = shlex.split(result["error"].splitlines()[-1])
    assert command[:2] == ["hf", "upload"]
    hf_cli = Path(sys.executable).with_name("hf")
    upload = subprocess.run([str(hf_cli), *command[1:]], env=env, capture_output=True, text=True, timeout=60)
    assert upload.returncode == 0, upload.stderr[-2000:]
    assert hub.files(REPO).items() >= local_files(folder).items()


@pytest.mark.parametrize("failure", ["no token", "offline", "unreachable"])
def test_push_without_token_or_network_raises_and_keeps_folder(hub, make_model_folder, tmp_path, failure):
    folder = make_model_folder()
    before = snapshot(folder)
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    overrides = {
        "no token": {"HF_TOKEN": None},
        "offline": {"HF_HUB_OFFLINE": "1"},
        "unreachable": {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port}"},
    }[failure]

    start = time.monotonic()
    [result] = push(hub_env(hub, tmp_path, **overrides), (folder, {"revision": "dev", "create_pr": True}))

    # without HF_HUB_OFFLINE a dead endpoint retries for ~30 s per call; a generous bound still catches that
    assert time.monotonic() - start < 60, "a push that cannot happen must fail at once, not retry"
    message = result["error"]
    assert str(folder) in message and "complete and unchanged" in message
    assert f"hf upload {REPO} {folder} . --revision dev --create-pr" in message
    assert hub.requests == []
    assert snapshot(folder) == before


def test_push_to_branch_and_as_pull_request(hub, make_model_folder, tmp_path):
    v1, v2 = make_model_folder(name="v1"), make_model_folder(tiny_llama(seed=1), name="v2")
    env = hub_env(hub, tmp_path)

    to_dev, pr_on_dev, pr_on_main = push(
        env, (v1, {"revision": "dev"}), (v2, {"revision": "dev", "create_pr": True}), (v2, {"create_pr": True})
    )

    repo = hub.repos[REPO]
    assert set(hub.files(REPO)) == {".gitattributes"}, "pushing to a branch must leave main alone"
    assert repo.refs["dev"] == to_dev["oid"] and hub.files(REPO, "dev").items() >= local_files(v1).items()
    assert pr_on_dev["pr_url"] and repo.refs["dev"] == to_dev["oid"], "a PR must not move its target branch"
    assert repo.refs["refs/pr/1"] == pr_on_dev["oid"]
    assert hub.files(REPO, "refs/pr/1").items() >= local_files(v2).items()
    pr_parent = next(c.parent for c in repo.commits if c.oid == pr_on_dev["oid"])
    assert pr_parent == to_dev["oid"], "the PR must be opened against the branch"
    assert repo.refs["refs/pr/2"] == pr_on_main["oid"] and repo.refs["main"] == repo.commits[0].oid


def test_push_removes_weights_an_earlier_push_left(hub, make_model_folder, tmp_path):
    """A stale model.safetensors next to a new sharded index would be what from_pretrained loads."""
    single = make_model_folder(name="single")
    work = tmp_path / "sharded_artifacts"
    tiny_llama(seed=2).save_pretrained(work / "model", max_shard_size="4KB")
    save_tiny_tokenizer(work / "tokenizer")
    sharded = prepare_upload_folder(_artifacts(work), tmp_path / "sharded", repo_id=REPO, recipe=None, metrics=None)
    env = hub_env(hub, tmp_path)

    _, result = push(env, (single, {}), (sharded, {}))

    files = set(hub.files(REPO))
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    weights = {p for p in snapshot(sharded) if p.endswith(".safetensors")}
    assert {p for p in files if p.endswith(".safetensors")} == weights
    assert hub.files(REPO, result["oid"]) == hub.files(REPO)


def test_quill_pushed_to_the_hub_loads_without_the_pipeline_package(hub, make_model_folder, tmp_path):
    from pipeline.models.quill import QuillConfig, QuillForCausalLM

    torch.manual_seed(0)
    config = QuillConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = QuillForCausalLM(config).eval()
    folder = make_model_folder(model)
    assert {"configuration_quill.py", "modeling_quill.py"} <= set(snapshot(folder)), "the remote code must ship"
    env = hub_env(hub, tmp_path)

    [result] = push(env, (folder, {}))
    seen, logits = load_from_hub(env, tmp_path, result["oid"], isolated=True)

    assert seen["class"] == "QuillForCausalLM" and not seen["module"].startswith("pipeline")
    assert_same_logits(model, seen, logits, tmp_path / "upload_artifacts" / "tokenizer")
