"""`pipeline.export`: a Quill (or Llama) as a native Llama folder and as a GGUF file.

The Llama folder is checked by what a server sees: `AutoModelForCausalLM` without remote code gives the Quill's
logits and greedy tokens, and its tokenizer loads as a plain `PreTrainedTokenizerFast` with the same encodings.
The GGUF file is read back with the gguf library and compared tensor by tensor and key by key; llama.cpp itself runs
it only where llama-cpp-python is installed (optional)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import WORDS, fitted_quill, make_rows, rows_tokenizer, tiny_quill
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pipeline.export import (
    GGUF_PRE_TOKENIZER,
    export_gguf,
    export_llama,
    gguf_name,
    rotary_interleave,
)
from pipeline.models.quill import QuillConfig

PROMPT = "A03 Acute fever of the lung\nNotes: chronic infection"
TEXTS = [PROMPT, "Notes: <|bos|> left upper limb fracture", "naïve café — 10% über", "  two  spaces\tand a tab\n"]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tokenizer():
    return rows_tokenizer()


def _perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Noise on every parameter: biases and norm gains leave their init values (zeros, ones), so a bias or norm that
    went to the wrong place, or was dropped, changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def sources(tokenizer, tmp_path_factory):
    """Saved Quill folders: ``fitted`` (trained a few steps: multi-head, tied, default θ, like the quickstart's) and
    ``wide`` (random: grouped-query 4/2 heads, head_dim 16 ≠ hidden/heads, θ = 500, untied head, all biases)."""
    root = tmp_path_factory.mktemp("export-sources")
    models = {
        "fitted": fitted_quill(tokenizer, [row["text"] for row in make_rows(12)]),
        "wide": _perturbed(tiny_quill(tokenizer, head_dim=16, rope_theta=500.0, tie_word_embeddings=False,
                                      attention_bias=True, mlp_bias=True)),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {name: (root / name, model) for name, model in models.items()}


@pytest.fixture(scope="module")
def llama_folder(tokenizer, tmp_path_factory):
    """A Llama saved by transformers (random, grouped-query, untied), with our byte-level BPE tokenizer."""
    folder = tmp_path_factory.mktemp("llama-source")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_parameters={"rope_type": "default", "rope_theta": 2000.0},
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = _perturbed(LlamaForCausalLM(config))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def _ids(tokenizer, text: str = PROMPT) -> torch.Tensor:
    return torch.tensor([tokenizer(text).input_ids])


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


# ------------------------------------------------------------------------------------------ Llama folder
@pytest.mark.parametrize("name", ["fitted", "wide"])
def test_exported_llama_gives_the_quills_logits_and_greedy_tokens(sources, tokenizer, tmp_path, name) -> None:
    folder, quill = sources[name]
    ids = _ids(tokenizer)
    changed = ids.clone()
    changed[0, 2] = (changed[0, 2] + 7) % len(tokenizer)
    # The check can see a difference: an early token moves the last position's logits far beyond the tolerance.
    assert (_logits(quill, ids)[0, -1] - _logits(quill, changed)[0, -1]).abs().max() > 1e-2

    out = export_llama(folder, tmp_path / "llama")
    llama = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code: nothing of Quill is needed
    assert type(llama) is LlamaForCausalLM
    assert (_logits(llama, ids) - _logits(quill, ids)).abs().max() <= 1e-5
    assert (_logits(llama, changed) - _logits(quill, changed)).abs().max() <= 1e-5
    settings = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False, "use_cache": True}
    assert torch.equal(llama.generate(ids, **settings), quill.generate(ids, **settings))


def test_the_llama_folder_holds_no_remote_code_and_keeps_rope_theta_where_transformers_4_reads_it(sources, tmp_path) -> None:
    out = export_llama(sources["wide"][0], tmp_path / "llama")
    assert not list(out.glob("*.py"))
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config
    assert (config["model_type"], config["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert config["rope_theta"] == 500.0  # transformers 4.x would fall back to 10000 without it
    assert (config["head_dim"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (16, 2, False)
    assert (config["attention_bias"], config["mlp_bias"]) == (True, True)


def test_a_lost_rope_theta_would_be_caught_by_the_logits_check(sources, tokenizer, tmp_path) -> None:
    """The parity test is sensitive to θ: the same weights under transformers' default θ give other logits."""
    folder, quill = sources["wide"]
    out = export_llama(folder, tmp_path / "llama")
    config = LlamaConfig.from_pretrained(out)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    wrong = AutoModelForCausalLM.from_pretrained(out, config=config)
    assert (_logits(wrong, _ids(tokenizer)) - _logits(quill, _ids(tokenizer))).abs().max() > 1e-3


def test_the_exported_tokenizer_is_a_plain_fast_tokenizer_with_identical_encodings(sources, tokenizer, tmp_path) -> None:
    folder = sources["fitted"][0]
    out = export_llama(folder, tmp_path / "llama")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4.x has no TokenizersBackend
    assert config["chat_template"] == tokenizer.chat_template
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads((folder / "tokenizer.json").read_text())
    conversation = [{"role": "user", "content": "A03?"}, {"role": "assistant", "content": "Acute fever"}]
    for loaded in (AutoTokenizer.from_pretrained(out), PreTrainedTokenizerFast.from_pretrained(out)):
        assert loaded(TEXTS).input_ids == tokenizer(TEXTS).input_ids
        assert loaded(TEXTS, add_special_tokens=False).input_ids == tokenizer(TEXTS, add_special_tokens=False).input_ids
        assert loaded.special_tokens_map == tokenizer.special_tokens_map
        assert loaded.apply_chat_template(conversation, tokenize=False) == tokenizer.apply_chat_template(
            conversation, tokenize=False)


def test_an_adapter_is_merged_into_the_export(sources, tokenizer, tmp_path) -> None:
    folder, quill = sources["fitted"]
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(folder)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter").eval()
    ids = _ids(tokenizer)
    assert (_logits(tuned, ids) - _logits(quill, ids)).abs().max() > 1e-2  # the adapter changes the model

    out = export_llama(folder, tmp_path / "llama", adapter=tmp_path / "adapter")
    assert (_logits(AutoModelForCausalLM.from_pretrained(out), ids) - _logits(tuned, ids)).abs().max() <= 1e-5
    assert not (out / "adapter_config.json").exists()


def test_a_llama_folder_is_resaved_with_a_portable_tokenizer(llama_folder, tokenizer, tmp_path) -> None:
    folder, llama = llama_folder
    out = export_llama(folder, tmp_path / "llama")
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 2000.0
    again = AutoModelForCausalLM.from_pretrained(out)
    assert (_logits(again, _ids(tokenizer)) - _logits(llama, _ids(tokenizer))).abs().max() == 0


# ------------------------------------------------------------------------------------------ refusals
REFUSALS = {
    "learned": ({"position_embedding_type": "learned"},
                ["position_embedding_type='learned'", "rotary positions only", "model.position_embedding_type: rope",
                 "trust_remote_code=True"]),
    "sinusoidal": ({"position_embedding_type": "sinusoidal"},
                   ["position_embedding_type='sinusoidal'", "rotary positions only"]),
    "plain MLP": ({"mlp_type": "plain"}, ["mlp_type='plain'", "gated", "SwiGLU"]),
    "gelu": ({"hidden_act": "gelu"}, ["hidden_act='gelu'", "silu", "model.hidden_act: silu"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
@pytest.mark.parametrize("export", [export_llama, export_gguf], ids=["llama", "gguf"])
def test_an_architecture_llama_lacks_is_refused_before_any_weight_is_read(tmp_path, case, export) -> None:
    overrides, phrases = REFUSALS[case]
    folder = tmp_path / "quill"
    QuillConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, **overrides
                ).save_pretrained(folder)  # a config and no weights: loading them would fail with another error
    out = tmp_path / ("out.gguf" if export is export_gguf else "out")
    with pytest.raises(ValueError) as error:
        export(folder, out)
    for phrase in phrases:
        assert phrase in str(error.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["quill"]


def test_another_architecture_and_an_adapter_as_model_are_refused(tmp_path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="model_type='gpt2': export takes a Quill or a Llama"):
        export_llama(tmp_path / "gpt2", tmp_path / "out")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a PEFT adapter: pass its base model as MODEL"):
        export_llama(tmp_path / "adapter", tmp_path / "out")


def test_an_existing_export_is_never_overwritten(sources, tmp_path) -> None:
    folder = sources["fitted"][0]
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists: remove it or choose another"):
        export_llama(folder, tmp_path / "llama")
    assert [p.name for p in (tmp_path / "llama").iterdir()] == ["keep.txt"]
    (tmp_path / "m.gguf").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_text() == "mine"
    with pytest.raises(FileExistsError, match="already exists"):
        export_llama(folder, folder)  # the source itself


# ------------------------------------------------------------------------------------------ GGUF
def _field(reader: gguf.GGUFReader, key: str):
    """A metadata value as Python (gguf < 0.11 has no ReaderField.contents)."""
    field = reader.fields[key]
    kind = field.types[-1]
    values = [bytes(field.parts[i]).decode("utf-8") if kind == gguf.GGUFValueType.STRING else field.parts[i].tolist()[0]
              for i in field.data]
    return values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]


def _undo_interleave(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's adjacent-pair rows back to transformers' halves, written independently of `rotary_interleave`."""
    rows = weight.shape[0] // n_heads
    return weight.reshape(n_heads, rows // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _expected_tensors(model: torch.nn.Module, config) -> dict[str, torch.Tensor]:
    expected = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        expected[gguf_name(name)] = tensor
    return expected


def _check_gguf(path: Path, model: torch.nn.Module, tokenizer, theta: float, atol: float = 0.0) -> gguf.GGUFReader:
    config = model.config
    reader = gguf.GGUFReader(path)
    expected = _expected_tensors(model, config)
    assert sorted(t.name for t in reader.tensors) == sorted(expected)
    assert ("output.weight" in expected) == (not config.tie_word_embeddings)  # tied: llama.cpp reuses token_embd
    for tensor in reader.tensors:
        value = torch.from_numpy(tensor.data.astype("float32").reshape(tuple(reversed(tensor.shape.tolist()))))
        if ".attn_q." in tensor.name:
            value = _undo_interleave(value, config.num_attention_heads)
        elif ".attn_k." in tensor.name:
            value = _undo_interleave(value, config.num_key_value_heads)
        torch.testing.assert_close(value, expected[tensor.name].float(), atol=atol, rtol=0, msg=tensor.name)

    head_dim = config.head_dim
    assert _field(reader, "general.architecture") == "llama"
    assert {key: _field(reader, f"llama.{key}") for key in (
        "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.dimension_count",
        "vocab_size")} == {
        "context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads, "attention.head_count_kv": config.num_key_value_heads,
        "attention.key_length": head_dim, "attention.value_length": head_dim, "rope.dimension_count": head_dim,
        "vocab_size": config.vocab_size}
    assert _field(reader, "llama.rope.freq_base") == theta
    assert math.isclose(_field(reader, "llama.attention.layer_norm_rms_epsilon"), config.rms_norm_eps, rel_tol=1e-6)

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == GGUF_PRE_TOKENIZER == "gpt-2"
    assert _field(reader, "tokenizer.ggml.tokens") == [by_id[i] for i in range(config.vocab_size)]
    specials = set(tokenizer.all_special_ids)
    assert _field(reader, "tokenizer.ggml.token_type") == [
        gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL for i in range(config.vocab_size)]
    assert _field(reader, "tokenizer.ggml.merges") == [" ".join(pair) for pair in backend["model"]["merges"]]
    assert [_field(reader, f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding", "unknown")] == [
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    assert tokenizer("a").input_ids[0] == tokenizer.bos_token_id  # our tokenizers add BOS, so must llama.cpp
    assert (_field(reader, "tokenizer.ggml.add_bos_token"), _field(reader, "tokenizer.ggml.add_eos_token")) == (True, False)
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    return reader


@pytest.mark.parametrize("name", ["fitted", "wide"])
def test_gguf_holds_every_tensor_and_the_llama_metadata(sources, tokenizer, tmp_path, name) -> None:
    folder, quill = sources[name]
    path = export_gguf(folder, tmp_path / "model.gguf")
    reader = _check_gguf(path, quill, tokenizer, theta=quill.config.rope_theta)
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}


def test_gguf_of_a_llama_folder_saved_by_transformers(llama_folder, tokenizer, tmp_path) -> None:
    folder, llama = llama_folder
    _check_gguf(export_gguf(folder, tmp_path / "llama.gguf"), llama, tokenizer, theta=2000.0)


def test_gguf_in_f16_halves_the_matrices_and_keeps_norms_in_f32(sources, tokenizer, tmp_path) -> None:
    folder, quill = sources["wide"]
    reader = _check_gguf(export_gguf(folder, tmp_path / "model.gguf", dtype="f16"), quill, tokenizer,
                         theta=500.0, atol=1e-3)
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    for tensor in reader.tensors:
        two_d = len(tensor.shape) == 2
        assert tensor.tensor_type == (gguf.GGMLQuantizationType.F16 if two_d else gguf.GGMLQuantizationType.F32)


def test_gguf_tensor_names_are_the_gguf_librarys_own_for_llama(sources) -> None:
    quill = sources["wide"][1]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, quill.config.num_hidden_layers)
    for name in quill.state_dict():
        assert gguf_name(name) == names.get_name(name, try_suffixes=(".weight", ".bias")), name


def test_the_interleaved_q_k_rows_rotate_as_llama_cpp_rotates_adjacent_pairs() -> None:
    """llama.cpp's llama kernel rotates channels (2i, 2i+1) of a head by position·θ^(-2i/D); transformers rotates
    (i, i + D/2) by the same angle. The reordered projection must give, under llama.cpp's rule, the reordered
    output of transformers' rule."""
    n_heads, head_dim, hidden, length, theta = 3, 8, 12, 5, 500.0
    weight = torch.randn(n_heads * head_dim, hidden, dtype=torch.float64)
    x = torch.randn(length, hidden, dtype=torch.float64)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * theta ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (T, D/2)

    cos, sin = torch.cat((angles, angles), -1).cos()[None], torch.cat((angles, angles), -1).sin()[None]
    q = (x @ weight.T).view(length, n_heads, head_dim).transpose(0, 1)[None]  # (1, H, T, D)
    hf, _ = apply_rotary_pos_emb(q, q, cos, sin)
    hf_rows = hf[0].transpose(0, 1).reshape(length, -1)  # (T, H*D) in transformers' row order

    pairs = (x @ rotary_interleave(weight, n_heads).T).view(length, n_heads, head_dim // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = angles.cos()[:, None], angles.sin()[:, None]
    cpp = torch.stack((a * c - b * s, a * s + b * c), -1).reshape(length, -1)  # adjacent-pair rotation
    torch.testing.assert_close(cpp, rotary_interleave(hf_rows.T, n_heads).T)


def test_gguf_refuses_a_tokenizer_llama_cpp_would_split_differently(sources, tokenizer, tmp_path) -> None:
    from tokenizers import pre_tokenizers

    folder = tmp_path / "prefix-space"
    sources["fitted"][1].config.save_pretrained(folder)  # no weights: the refusal comes before they are read
    other = AutoTokenizer.from_pretrained(sources["fitted"][0])
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    other.save_pretrained(folder)
    with pytest.raises(ValueError, match="not ByteLevel\\(add_prefix_space=False\\) with GPT-2's regex"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_llama_cpp_generates_what_transformers_generates(sources, tokenizer, tmp_path) -> None:
    """Optional: runs where llama-cpp-python is installed (it is not a test dependency: it builds llama.cpp)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    folder, quill = sources["fitted"]
    path = export_gguf(folder, tmp_path / "model.gguf")
    runner = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False)
    prompt = " ".join(WORDS[:6])
    ids = tokenizer(prompt).input_ids
    assert runner.tokenize(prompt.encode(), add_bos=True) == ids
    expected = quill.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    produced = []
    for token in runner.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        produced.append(token)
        if len(produced) == len(expected) or token == tokenizer.eos_token_id:
            break
    assert produced == expected  # both stop after EOS, transformers by its generation config
