"""The command line as a user types it: options and overrides in any order, `--version`, and the `merge` and
`export` commands over the functions that do the work (their numerics are tested in test_finetune / test_export;
here: what the command writes, refuses and prints)."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import rows_tokenizer, tiny_quill
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import pipeline
from pipeline.cli import main, parse


def test_overrides_may_follow_the_options() -> None:
    args = parse(["run", "r.yaml", "--dry-run", "pretrain.max_steps=5", "--stages", "pretrain", "data.block_size=64"])
    assert args.dry_run and args.stages == "pretrain"
    assert args.overrides == ["pretrain.max_steps=5", "data.block_size=64"]
    assert parse(["run", "r.yaml", "pretrain.max_steps=5"]).overrides == ["pretrain.max_steps=5"]


def test_leftover_arguments_are_still_errors(capsys) -> None:
    for argv in (["run", "r.yaml", "--dry-run", "stray"], ["schema", "a=b"], ["run", "r.yaml", "--no-such-flag"]):
        with pytest.raises(SystemExit) as exit_:
            parse(argv)
        assert exit_.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


def test_version(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"pipeline {pipeline.__version__}"


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """A saved tiny Quill and a LoRA adapter on it whose weights are not zero (so merging changes the logits)."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = rows_tokenizer()
    model = tiny_quill(tokenizer)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    tuned = get_peft_model(tiny_quill(tokenizer), config)
    tuned.save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    return root / "base", root / "adapter", tokenizer


def test_merge_writes_a_model_with_the_adapters_logits(base_and_adapter, tmp_path, capsys) -> None:
    base, adapter, tokenizer = base_and_adapter
    out = tmp_path / "merged"
    assert main(["merge", str(base), str(adapter), str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    ids = torch.tensor([tokenizer("A03 acute fever of the lung")["input_ids"]])
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        before = plain(ids).logits
    assert (expected - before).abs().max() > 1e-2  # the adapter matters: the comparison below can fail
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)
    assert {"configuration_quill.py", "modeling_quill.py", "tokenizer.json"} <= {p.name for p in out.iterdir()}


def test_merge_never_writes_into_a_non_empty_folder(base_and_adapter, tmp_path, capsys) -> None:
    base, adapter, _ = base_and_adapter
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(base), str(adapter), str(out)]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_export_writes_a_llama_folder_and_refuses_clearly(base_and_adapter, tmp_path, capsys) -> None:
    base, adapter, tokenizer = base_and_adapter
    assert main(["export", str(base), str(tmp_path / "llama"), "--format", "llama", "--adapter", str(adapter)]) == 0
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "llama"), LlamaForCausalLM)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "llama").stat().st_mode & 0o777 == 0o777 & ~umask  # not tempfile's private 0700
    assert (tmp_path / "llama" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    learned = tmp_path / "learned"
    tiny_quill(tokenizer, position_embedding_type="learned").save_pretrained(learned)
    tokenizer.save_pretrained(learned)
    capsys.readouterr()
    assert main(["export", str(learned), str(tmp_path / "no"), "--format", "gguf"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "position_embedding_type='learned'" in err and "Traceback" not in err
    assert not (tmp_path / "no").exists()
