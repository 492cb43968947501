"""The default recipe end to end, shrunk by command-line overrides: every stage, every artefact, a push to a local
stand-in for the Hub, a reload of the pushed model where `pipeline` cannot be imported, and stage skipping."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hub_server import HubStandIn

ROOT = Path(__file__).resolve().parents[1]
REPO = "tester/quill-quickstart"
SMALL = [
    "tokenizer.vocab_size=512",
    "model.hidden_size=64", "model.num_hidden_layers=2",
    "data.max_documents=120", "data.block_size=64", "data.validation_fraction=0.05",
    "pretrain.max_steps=60", "pretrain.batch_size=8", "pretrain.warmup_steps=5",
    "pretrain.eval_every=30", "pretrain.save_every=30",
    "finetune.data.sources[0].max_documents=600", "finetune.data.block_size=64",
    "finetune.train.max_steps=40", "finetune.train.batch_size=8", "finetune.train.eval_every=20",
    "finetune.train.save_every=20",
    "evaluate.max_documents=16", "evaluate.few_shot=1", "evaluate.generation.max_new_tokens=8",
]


def environment(hub: HubStandIn, tmp_path: Path) -> dict[str, str]:
    """A process that talks to the stand-in only: its endpoint, a dummy token, a fresh cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return env | {"HF_ENDPOINT": hub.url, "HF_TOKEN": "dummy", "HF_HOME": str(tmp_path / "hf_home"),
                  "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}


def run_pipeline(out: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipeline", "run", str(ROOT / "recipes" / "quickstart.yaml"), f"output_dir={out}",
               *SMALL, "hub.push=true", f"hub.repo_id={REPO}", *extra]
    result = subprocess.run(command, env=env, cwd=out.parent, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def statuses(result: subprocess.CompletedProcess) -> dict[str, str]:
    rows = [line.split(":", 1) for line in result.stdout.splitlines() if line.strip().split(":")[0] in
            ("tokenizer", "pretrain", "finetune", "evaluate", "hub")]
    return {stage.strip(): rest.split("/")[0].strip() for stage, rest in rows}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("quickstart")
    with HubStandIn() as hub:
        env = environment(hub, tmp_path)
        out = tmp_path / "run"
        first = run_pipeline(out, env)
        yield hub, env, out, first, tmp_path


def test_every_stage_runs_and_leaves_its_artefacts(quickstart) -> None:
    _, _, out, first, _ = quickstart
    assert statuses(first) == dict.fromkeys(("tokenizer", "pretrain", "finetune", "evaluate", "hub"), "ran")
    for path in (
        "recipe.yaml", "tokenizer/tokenizer.json", "tokenizer/fertility.json",
        "pretrain/config.json", "pretrain/model.safetensors", "pretrain/modeling_quill.py", "pretrain/metrics.jsonl",
        "pretrain/loss_curve.png", "pretrain/checkpoints/checkpoint-00000060/model.safetensors",
        "finetune/adapter/adapter_config.json", "finetune/adapter/adapter_model.safetensors",
        "finetune/merged/model.safetensors", "finetune/metrics.jsonl",
        "eval/report.json", "eval/report.md", "eval/perplexity.png",
        "hub/upload/README.md", "hub/upload/model.safetensors",
    ):
        assert (out / path).is_file(), path
    for stage in ("tokenizer", "pretrain", "finetune", "eval", "hub"):
        assert json.loads((out / stage / "stage.json").read_text())["complete"] is True


def test_the_report_shows_the_tuned_model_better_on_the_domain(quickstart) -> None:
    _, _, out, _, _ = quickstart
    report = json.loads((out / "eval" / "report.json").read_text())
    domain, general = report["domain"], report["general"]
    assert domain["tuned"]["perplexity"] < domain["base"]["perplexity"]
    assert domain["tuned"]["bits_per_byte"] < domain["base"]["bits_per_byte"]
    assert "change" in general  # forgetting is reported either way
    generation = report["tasks"]["generation"]
    assert set(generation["base"]) >= {"exact_match", "rouge_l"} and generation["rows"] == 16
    markdown = (out / "eval" / "report.md").read_text()
    assert f"{domain['tuned']['perplexity']:.4f}" in markdown


def test_the_push_is_one_commit_that_loads_where_pipeline_is_absent(quickstart) -> None:
    hub, env, out, _, tmp_path = quickstart
    files = set(hub.files(REPO, "main"))
    assert {"config.json", "model.safetensors", "configuration_quill.py", "modeling_quill.py", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= files
    # the root is the merged model; its LoRA adapter would need the local base, so it is not offered on top of it
    assert "stage.json" not in files and not any(f.startswith("adapter/") for f in files)
    assert hub.commit_count(REPO) == 2  # the repo's creation, then the whole upload at once (the first test to push)
    script = tmp_path / "load.py"
    script.write_text(
        "import sys, json, torch\n"
        "sys.modules['pipeline'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "ids = tok('E11.9 Type 2 diabetes', return_tensors='pt').input_ids\n"
        "torch.save({'ids': ids, 'logits': model(ids).logits.detach()}, sys.argv[2])\n"
        "print(type(model).__module__)\n"
    )
    result = subprocess.run([sys.executable, "-I", str(script), REPO, str(tmp_path / "remote.pt")], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "transformers_modules" in result.stdout
    remote = torch.load(tmp_path / "remote.pt")
    import pipeline.models.quill  # noqa: F401  (registers Quill for the local load)
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(out / "finetune" / "merged").eval()
    torch.testing.assert_close(remote["logits"], local(remote["ids"]).logits.detach(), rtol=0, atol=0)


def test_a_rerun_skips_finished_stages_and_a_change_reruns_only_what_depends_on_it(quickstart) -> None:
    hub, env, out, _, _ = quickstart
    commits = hub.commit_count(REPO)
    again = run_pipeline(out, env)
    assert set(statuses(again).values()) == {"skipped (up to date)"}
    assert hub.commit_count(REPO) == commits  # nothing pushed twice
    copy = out.parent / "changed"  # the module's other tests keep reading the original run
    shutil.copytree(out, copy)
    changed = run_pipeline(copy, env, "finetune.train.learning_rate=1e-3")
    assert statuses(changed) == {"tokenizer": "skipped (up to date)", "pretrain": "skipped (up to date)",
                                 "finetune": "ran", "evaluate": "ran", "hub": "ran"}
    assert hub.commit_count(REPO) == commits + 1
    assert list(copy.glob("finetune.replaced-*"))  # the earlier adapter is kept, not overwritten


def test_a_push_without_network_fails_clearly_and_leaves_a_complete_folder(quickstart, tmp_path: Path) -> None:
    _, env, out, _, _ = quickstart
    offline = {k: v for k, v in env.items() if k != "HF_TOKEN"} | {"HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "pipeline", "run", str(ROOT / "recipes" / "quickstart.yaml"), f"output_dir={out}",
               *SMALL, "hub.push=true", "hub.repo_id=tester/elsewhere", "--stages", "hub"]
    result = subprocess.run(command, env=offline, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "error: Could not push to the Hub repo tester/elsewhere" in result.stderr
    assert "Traceback" not in result.stderr and f"{out / 'hub' / 'upload'}" in result.stderr
    assert "hf upload tester/elsewhere" in result.stderr
    upload = out / "hub" / "upload"
    assert {"config.json", "model.safetensors", "modeling_quill.py", "tokenizer.json", "README.md"} <= {
        p.name for p in upload.iterdir()}
    assert json.loads((out / "hub" / "stage.json").read_text())["complete"] is False  # a rerun will try again


def test_without_a_merge_the_upload_is_the_base_with_its_adapter(quickstart, tmp_path: Path, monkeypatch) -> None:
    _, _, out, _, _ = quickstart
    import pipeline.hub
    from accelerate import PartialState

    from pipeline.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml",
                         [f"output_dir={out}", *SMALL, "hub.push=true", f"hub.repo_id={REPO}", "finetune.merge=false"])
    pushed = []
    from types import SimpleNamespace

    monkeypatch.setattr(pipeline.hub, "push_to_hub", lambda folder, cfg: pushed.append(folder) or SimpleNamespace(oid="0"))
    pipeline.hub.run(recipe, PartialState())
    upload = pushed[0]
    assert (upload / "model.safetensors").read_bytes() == (out / "pretrain" / "model.safetensors").read_bytes()
    assert (upload / "adapter" / "adapter_model.safetensors").is_file()
    card = (upload / "README.md").read_text()
    assert 'PeftModel.from_pretrained(base, repo, subfolder="adapter"' in card
    assert "base = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, revision=revision)" in card
    # The adapter names its base portably: the run's copy by the path from where the run started, the pushed copy by
    # the repo whose root holds that base; and the public card shows no absolute local path.
    run_config = json.loads((out / "finetune" / "adapter" / "adapter_config.json").read_text())
    assert run_config["base_model_name_or_path"] == "run/pretrain"  # the run started in out.parent
    assert json.loads((upload / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO
    assert "output_dir: " in card and not re.search(rf"(?<!\.\.){re.escape(str(out))}", card)  # ../../tmp/... only
    adapter_card = (out / "finetune" / "adapter" / "README.md").read_text()
    assert "# LoRA adapter for `run/pretrain`" in adapter_card and "More Information Needed" not in adapter_card


def test_the_readme_snippet_loads_without_the_package_and_never_prompts(quickstart, tmp_path: Path) -> None:
    """The README's loading snippet, as written, in a process where `pipeline` cannot be imported: the lines meant
    for that case must not stop at transformers' "[y/N]" remote-code prompt (AutoTokenizer reads config.json too)."""
    _, env, out, _, _ = quickstart
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("Every artefact loads with plain transformers / peft:", 1)[1].split("```python\n", 1)[1]
    snippet = snippet.split("```", 1)[0]
    without = snippet.split("# where the package is not installed", 1)[1].split("\n", 1)[1]
    assert "AutoTokenizer.from_pretrained" in without and "AutoModelForCausalLM.from_pretrained" in without
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quickstart").symlink_to(out)
    script = ("import sys\nsys.modules['pipeline'] = None\n"
              "from transformers import AutoModelForCausalLM, AutoTokenizer\nfrom peft import PeftModel\n" + without
              + "\nprint('loaded', type(model).__name__, type(tokenizer).__name__)\n")
    offline = env | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-I", "-c", script], env=offline, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert "[y/N]" not in result.stdout + result.stderr, result.stdout[-2000:]
    assert result.returncode == 0 and "loaded QuillForCausalLM" in result.stdout, result.stderr[-3000:]


def test_evaluation_under_two_cpu_ranks_reports_what_one_process_reports(quickstart) -> None:
    _, env, out, _, _ = quickstart
    copy = out.parent / "two-ranks"
    shutil.copytree(out, copy)
    (copy / "eval" / "stage.json").unlink()  # make the evaluate stage run again, on two ranks
    offline = {k: v for k, v in env.items() if k != "HF_ENDPOINT"} | {"HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "accelerate" / "cpu-2proc.yaml"), "--main_process_port", "0",
               "-m", "pipeline", "run", str(ROOT / "recipes" / "quickstart.yaml"), f"output_dir={copy}", *SMALL,
               "hub.push=true", f"hub.repo_id={REPO}", "--stages", "evaluate", "--num-processes", "2"]
    result = subprocess.run(command, env=offline, cwd=copy.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    one = json.loads((out / "eval" / "report.json").read_text())
    two = json.loads((copy / "eval" / "report.json").read_text())
    for name in ("general", "domain"):
        for model in ("base", "tuned"):
            assert two[name][model]["tokens"] == one[name][model]["tokens"]  # every document scored exactly once
            assert two[name][model]["perplexity"] == pytest.approx(one[name][model]["perplexity"], rel=1e-5)
    assert two["tasks"]["generation"]["tuned"] == pytest.approx(one["tasks"]["generation"]["tuned"])
