"""`pipeline inspect attention / positions / params --adapter`, and every inspect command end to end (`--json`, its
PNG) on a Quill and on a Llama saved by transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.concepts import (
    attention_maps,
    parameter_counts,
    plot_attention,
    positional_encoding,
    top_attended,
)
from pipeline.tokenizer import train_tokenizer

TEXT = "the king and the queen ride to the castle; the knight and the squire follow the old king. " * 30
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT], vocab_size=300, min_frequency=1)


def tiny_llama(tokenizer, layers: int = 2, heads: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=500.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def folders(tokenizer, tiny_quill, tmp_path_factory) -> dict:
    """A Quill and a Llama (and a Llama of 9 layers × 8 heads), each saved with save_pretrained (the Llamas by plain
    transformers) with the tokenizer."""
    saved = {}
    for name, model in (("quill", tiny_quill(tokenizer)), ("llama", tiny_llama(tokenizer)),
                        ("wide", tiny_llama(tokenizer, layers=9, heads=8))):
        saved[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(saved[name])
        tokenizer.save_pretrained(saved[name])
    return saved


# ---------------------------------------------------------------------------------------------------- attention
def test_attention_rows_are_distributions_on_the_trained_model_and_a_llama(trained_lm, tokenizer) -> None:
    for model, tok in ((trained_lm.model, trained_lm.tokenizer), (tiny_llama(tokenizer), tokenizer)):
        before = model.config._attn_implementation
        maps, tokens = attention_maps(model, tok, "ROMEO: O, she doth teach the torches")
        layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
        assert maps.shape == (layers, heads, len(tokens), len(tokens))
        torch.testing.assert_close(maps.sum(-1), torch.ones(layers, heads, len(tokens)))
        assert torch.all(maps.triu(diagonal=1) == 0)  # causal: no query sees a later key
        assert model.config._attn_implementation == before  # eager only for the call (a Llama's is sdpa)


def test_top_attended_shares_are_the_mean_over_queries(trained_lm) -> None:
    maps, tokens = attention_maps(trained_lm.model, trained_lm.tokenizer, "ROMEO: O, she doth teach the torches")
    rows = top_attended(maps, tokens, top=len(tokens))
    assert len(rows) == maps.shape[0] * maps.shape[1]
    for row in rows:
        grid = maps[row["layer"], row["head"]]
        assert sum(t["share"] for t in row["top"]) == pytest.approx(1.0, abs=1e-5)  # all keys: the whole attention
        top = row["top"][0]
        assert top["share"] == pytest.approx(grid[:, top["position"]].mean().item())
        assert top["token"] == tokens[top["position"]]
        assert row["previous"] == pytest.approx(torch.stack([grid[t, t - 1] for t in range(1, len(tokens))]).mean().item())
        assert row["first"] == pytest.approx(grid[:, 0].mean().item())
        assert row["self"] == pytest.approx(grid.diagonal().mean().item())


def test_the_grid_and_the_zoomed_map_are_pngs(trained_lm, tmp_path) -> None:
    maps, tokens = attention_maps(trained_lm.model, trained_lm.tokenizer, "ROMEO: O, she doth")
    grid = plot_attention(maps, tokens, tmp_path / "grid.png", title="all")
    one = plot_attention(maps, tokens, tmp_path / "one.png", layers=[1], heads=[0], title="one")
    for path in (grid, one):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------- positions
def test_a_llamas_rope_angles_are_position_times_its_frequencies(folders) -> None:
    model = load(folders["llama"])  # inv_freq is a buffer rebuilt on load: check it
    angles = positional_encoding(model, 12)
    d, theta = model.config.head_dim, 500.0
    assert angles.shape == (12, d // 2)
    assert angles[7, 1].item() == pytest.approx(7 * theta ** (-2 / d), rel=1e-5)
    assert angles[11, 0].item() == pytest.approx(11.0)


# ---------------------------------------------------------------------------------------------------- params
@pytest.fixture(scope="module")
def adapter(folders, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("adapter")
    base = load(folders["quill"])
    get_peft_model(base, LoraConfig(r=4, target_modules=LORA_TARGETS)).save_pretrained(folder)
    return folder


def test_params_with_an_adapter_put_it_in_its_own_bucket(folders, adapter, capsys) -> None:
    from pipeline.cli import main

    base = parameter_counts(load(folders["quill"]))
    assert main(["inspect", "params", str(folders["quill"]), "--adapter", str(adapter), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)["counts"]
    with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
        own = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    assert counts["LoRA adapter"] == own > 0
    assert {k: v for k, v in counts.items() if k not in ("LoRA adapter", "total")} == \
        {k: v for k, v in base.items() if k != "total"}  # attention and the MLP read as without the adapter
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"] == base["total"] + own


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------- every command
COMMANDS = [
    (["tokens", "{model}", "the king rides"], "tokens"),
    (["params", "{model}"], "counts"),
    (["similar", "{model}", " king", "--top", "3"], "neighbours"),
    (["analogy", "{model}", " king", " queen", " old", "--top", "3"], "nearest"),
    (["similarity", "{model}", "the king rides", "the queen", "old king", "--bag-of-words", "--pooling", "last",
      "--png", "{out}/similarity.png"], "matrices"),
    (["context", "{model}", "king", "the king rides", "the old king", "--png", "{out}/context.png"], "cosine"),
    (["positions", "{model}", "--length", "16", "--png", "{out}/positions.png"], "table"),
    (["attention", "{model}", "the king rides", "--png", "{out}/attention.png"], "maps"),
    (["attention", "{model}", "the king rides", "--layer", "1", "--head", "2", "--png", "{out}/head.png"], "maps"),
    (["next", "{model}", "the king", "--top", "3"], "next"),
    (["decode", "{model}", "the king", "--max-new-tokens", "4"], "completions"),
]


@pytest.mark.parametrize("kind", ["quill", "llama"])
def test_every_inspect_command_runs_on_a_quill_and_on_a_llama(kind, folders, tmp_path, capsys) -> None:
    from pipeline.cli import main

    for argv, key in COMMANDS:
        argv = [a.format(model=folders[kind], out=tmp_path) for a in argv]
        assert main(["inspect", *argv, "--json"]) == 0, argv
        data = json.loads(capsys.readouterr().out)
        assert data[key], argv
        if "--png" in argv:
            png = argv[argv.index("--png") + 1]
            assert data["png"] == png and open(png, "rb").read(4) == b"\x89PNG"
    assert len(list(tmp_path.glob("*.png"))) == 5
    main(["inspect", "attention", str(folders[kind]), "the king", "--png", str(tmp_path / "a.png")])
    assert f"wrote {tmp_path / 'a.png'}" in capsys.readouterr().out  # the text output says where the PNG went


def test_similarity_json_has_both_matrices_and_ones_on_the_diagonal(folders, capsys) -> None:
    from pipeline.cli import main

    assert main(["inspect", "similarity", str(folders["quill"]), "the king", "the queen", "--bag-of-words",
                 "--json"]) == 0
    matrices = json.loads(capsys.readouterr().out)["matrices"]
    assert len(matrices) == 2 and all(set(m) == {"cosine", "dot"} for m in matrices.values())
    for pair in matrices.values():
        assert [pair["cosine"][i][i] for i in range(2)] == pytest.approx([1.0, 1.0], abs=1e-12)


@pytest.mark.parametrize(("argv", "message"), [
    (["similarity", "{missing}", "only one"], "give at least two TEXTs"),
    (["context", "{missing}", "bank", "the bank", "a river"], "'bank' does not occur as a word in 'a river'"),
    (["context", "{missing}", "bank", "the bank"], "at least two SENTENCEs"),
    (["attention", "{quill}", "the king", "--head", "9"], "--head 9: the model has heads 0..3"),
    (["analogy", "{quill}", " king", "kni", " old"], "not one. Fix: pick a word that is one token"),
    (["attention", "{wide}", "the king"], "9 layers × 8 heads would be 72 maps, too many to read (at most 64)"),
])
def test_a_mistake_is_refused_with_the_fix_and_argument_ones_before_loading(argv, message, folders, tmp_path,
                                                                           capsys, monkeypatch) -> None:
    from pipeline.cli import main

    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)
    # a missing model folder: the argument mistakes are refused before it is even looked for
    paths = {"missing": tmp_path / "missing", "quill": folders["quill"], "wide": folders["wide"]}
    assert main(["inspect", *[a.format(**paths) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
