"""Exporting a trained model for the serving ecosystem: a native Llama folder, or a GGUF file for llama.cpp.

    Quill or Llama folder / Hub id (+ a PEFT adapter, merged in fp32) ──llama_config──► LlamaConfig, or a refusal
        ──export_llama──► OUT/  config.json (LlamaForCausalLM), model.safetensors, a tokenizer 4.x and 5.x both load
        ──export_gguf───► OUT.gguf  llama architecture, llama.cpp's tensor names and rotary layout, the BPE vocabulary

A Quill with RoPE, a gated silu MLP and RMSNorm computes exactly what `LlamaForCausalLM` computes, under the same
parameter names (pre-norm blocks, a final norm, 1/sqrt(head_dim) attention scaling, no embedding scaling), so the
export is a relabelling: no weight changes value. Anything else is refused before any weight is read, naming the
field. Quill's residual and embedding dropout do nothing at inference and have no Llama counterpart: they are dropped.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipeline.loading import load_base, load_tuned

__all__ = ["GGUF_PRE_TOKENIZER", "export_gguf", "export_llama", "gguf_name", "llama_config", "llama_problems",
           "rotary_interleave", "save_portable_tokenizer"]

GGUF_PRE_TOKENIZER = "gpt-2"
"""llama.cpp's name for the GPT-2 pre-tokenizer (byte-level, GPT-2's split regex, no prefix space): what the
tokenizer stage trains (`pre_tokenizers.ByteLevel(add_prefix_space=False)`)."""

_TRUST_REMOTE_CODE = "or use the Quill folder as it is, with trust_remote_code=True"
_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "attention_bias",
               "mlp_bias", "attention_dropout", "initializer_range", "tie_word_embeddings", "use_cache",
               "bos_token_id", "eos_token_id", "pad_token_id")


# ------------------------------------------------------------------------------------------ config mapping
def llama_problems(config: PretrainedConfig) -> list[str]:
    """Why ``config`` (a Quill's or a Llama's) cannot become a Llama that vLLM, TGI and llama.cpp run: one message
    per field, naming its value, what Llama needs and the fix. Empty when it maps exactly."""
    if config.model_type == "llama":
        return []
    if config.model_type != "quill":
        return [(f"model_type={config.model_type!r}: export takes a Quill or a Llama model (LlamaForCausalLM); "
                "convert other architectures with their own tools (llama.cpp's convert_hf_to_gguf.py)")]
    problems = []
    if config.position_embedding_type != "rope":
        problems.append(
            f"position_embedding_type={config.position_embedding_type!r}: Llama has rotary positions only; retrain "
            f"with model.position_embedding_type: rope, {_TRUST_REMOTE_CODE}")
    if config.mlp_type != "gated":
        problems.append(
            f"mlp_type={config.mlp_type!r}: Llama's MLP is gated (SwiGLU: down(silu(gate(x)) * up(x))); retrain a "
            f"Quill with mlp_type='gated', {_TRUST_REMOTE_CODE}")
    if config.hidden_act != "silu":
        problems.append(
            f"hidden_act={config.hidden_act!r}: Llama's gated MLP uses silu (SwiGLU), the only activation vLLM and "
            f"llama.cpp run for it; retrain with model.hidden_act: silu, {_TRUST_REMOTE_CODE}")
    return problems


def llama_config(config: PretrainedConfig) -> LlamaConfig:
    """The `LlamaConfig` that computes what ``config``'s model computes, or `ValueError` with every reason it cannot.
    A Llama config comes back as it is (less any ``auto_map``)."""
    problems = llama_problems(config)
    if problems:
        raise ValueError("cannot export as Llama: " + "; ".join(problems))
    if config.model_type == "llama":
        values = {k: v for k, v in config.to_dict().items() if k not in ("auto_map", "architectures")}
        return LlamaConfig(**values)
    return LlamaConfig(
        **{key: getattr(config, key) for key in _LLAMA_KEYS},
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
    )


def _rope_theta(config: LlamaConfig) -> float:
    """The RoPE base, wherever this transformers version keeps it (``rope_parameters`` in 5.x, top level in 4.x)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _rope_type(config: LlamaConfig) -> str:
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return parameters.get("rope_type", parameters.get("type", "default"))


# ------------------------------------------------------------------------------------------ loading the source
def _source_config(model: str | Path, adapter: str | Path | None) -> PretrainedConfig:
    """The source's config, read without its weights, so that a refusal comes before any compute."""
    if Path(model).expanduser().joinpath("adapter_config.json").is_file():
        raise ValueError(f"{model} is a PEFT adapter: pass its base model as MODEL and this folder as the adapter")
    if adapter is not None and not Path(adapter).expanduser().joinpath("adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    return AutoConfig.from_pretrained(model)


def _source_tokenizer(model: str | Path, adapter: str | Path | None) -> PreTrainedTokenizerBase:
    """The adapter's tokenizer when it saved one, else the model's; exactly as saved (no pad token added), and fast
    (a `tokenizer.json`), which both exports need."""
    source = model
    if adapter is not None and (Path(adapter) / "tokenizer.json").is_file():
        source = adapter
    if Path(source).expanduser().is_dir() and not (Path(source).expanduser() / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {source}: save the model's tokenizer into it "
                                "(tokenizer.save_pretrained), as the pipeline's stages do")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if not tokenizer.is_fast:
        raise ValueError(f"the tokenizer of {source} has no tokenizer.json (a slow tokenizer): save it as a fast one")
    return tokenizer


def _load_llama(model: str | Path, adapter: str | Path | None, config: LlamaConfig,
                tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """The source (merged with ``adapter`` in float32) as a `LlamaForCausalLM` with ``config`` (`llama_config` of
    the source's) holding the same tensors. `load_state_dict(strict=True)` proves that the parameter names match
    one for one."""
    source: PreTrainedModel = load_base(model, "causal_lm", None, tokenizer)
    if adapter is not None:
        source = load_tuned(Path(adapter), "causal_lm", tokenizer, base=source).merge_and_unload()
    if isinstance(source, LlamaForCausalLM):
        return source.eval()
    llama = LlamaForCausalLM(config).to(next(source.parameters()).dtype)
    llama.load_state_dict(source.state_dict(), strict=True)
    llama.generation_config = source.generation_config
    return llama.eval()


# ------------------------------------------------------------------------------------------ writing safely
def _refuse_existing(out: Path) -> None:
    """Never overwrite: an existing export (the source model folder too) stays as it is; an empty folder may be filled."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists: remove it or choose another output path")


def _usual_permissions(path: Path) -> None:
    """tempfile makes private (0600/0700) files and folders; give an export the modes any new file gets (umask), so a
    server running as another user can read it."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def _publish(build: Path, out: Path) -> None:
    """Move a finished export into place in one rename, so a failure midway leaves no half-written OUT."""
    _usual_permissions(build)
    if out.is_dir():  # empty, as _refuse_existing checked
        out.rmdir()
    os.replace(build, out)


# ------------------------------------------------------------------------------------------ Llama folder
def export_llama(model: str | Path, out: Path, adapter: str | Path | None = None) -> Path:
    """Write ``model`` (a Quill or Llama folder or Hub id, plus an optional PEFT ``adapter`` merged in float32) to
    ``out`` as a native `LlamaForCausalLM` folder that loads without remote code, with a tokenizer transformers 4.x
    and 5.x both load. A Llama source is re-saved as it is (same config, same tensors), with the same tokenizer fix.
    Refuses (`ValueError`) a Quill whose architecture Llama does not have, before reading any weight."""
    out = Path(out)
    _refuse_existing(out)
    config = llama_config(_source_config(model, adapter))  # refuses before any weight is read
    tokenizer = _source_tokenizer(model, adapter)
    llama = _load_llama(model, adapter, config, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        llama.save_pretrained(build, safe_serialization=True)
        _config_for_transformers_4(build / "config.json", llama.config)
        save_portable_tokenizer(tokenizer, build)
        _publish(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return out


def _config_for_transformers_4(path: Path, config: LlamaConfig) -> None:
    """transformers 5 writes the RoPE base inside ``rope_parameters`` and the dtype as ``dtype``; 4.x (and the
    servers pinned to it) read ``rope_theta`` and ``torch_dtype`` at the top level and would silently fall back to
    θ = 10000. Write both spellings; 5.x reads its own and ignores the others."""
    values = json.loads(path.read_text())
    values.pop("auto_map", None)
    if _rope_type(config) == "default":
        values.setdefault("rope_theta", _rope_theta(config))
    if "dtype" in values:
        values.setdefault("torch_dtype", values["dtype"])
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def save_portable_tokenizer(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Save ``tokenizer`` so that transformers 4.x and 5.x both load it: 5.x names its class `TokenizersBackend`,
    which 4.x lacks, while `PreTrainedTokenizerFast` (a plain `tokenizer.json` wrapper) exists in both. The chat
    template also goes into tokenizer_config.json, where 4.x releases before `chat_template.jinja` look for it."""
    tokenizer.save_pretrained(out)
    path = Path(out) / "tokenizer_config.json"
    values = json.loads(path.read_text())
    values["tokenizer_class"] = "PreTrainedTokenizerFast"
    values.pop("auto_map", None)
    if isinstance(tokenizer.chat_template, str):
        values["chat_template"] = tokenizer.chat_template
    path.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------ GGUF
def rotary_interleave(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection (weight or bias) from transformers' rotary layout to llama.cpp's.

    transformers rotates channel i with channel i + D/2 of each head (`rotate_half`); llama.cpp's llama kernel rotates
    adjacent channels 2i and 2i + 1. Row 2i of a head must be its old row i, row 2i + 1 its old row i + D/2: the
    reordering llama.cpp's own converter applies to Hugging Face Llama checkpoints."""
    head_dim = weight.shape[0] // n_heads
    half = head_dim // 2
    within_head = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).reshape(-1)  # 0, D/2, 1, ...
    order = (torch.arange(n_heads)[:, None] * head_dim + within_head).reshape(-1)
    return weight[order]


_GGUF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(name: str) -> str:
    """llama.cpp's name for a Hugging Face Llama parameter: ``model.layers.3.mlp.up_proj.weight`` → ``blk.3.ffn_up.weight``."""
    module, kind = name.rsplit(".", 1)  # kind: weight or bias
    if module in _GGUF_GLOBAL:
        return f"{_GGUF_GLOBAL[module]}.{kind}"
    parts = module.split(".", 3)  # model, layers, N, the block's module
    if len(parts) != 4 or parts[:2] != ["model", "layers"] or parts[3] not in _GGUF_BLOCK:
        raise ValueError(f"no GGUF name for the parameter {name!r}")
    return f"blk.{parts[2]}.{_GGUF_BLOCK[parts[3]]}.{kind}"


def _gguf_tensors(llama: LlamaForCausalLM, dtype: str) -> Iterator[tuple[str, Any]]:
    """(GGUF name, numpy array) for every tensor llama.cpp loads. q/k are reordered for its rotary layout; 1-D
    tensors (norms, biases) stay float32, as llama.cpp's converter keeps them; a tied output head is left out
    (llama.cpp reuses token_embd)."""
    config = llama.config
    for name, tensor in llama.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        tensor = tensor.detach().float()
        if ".self_attn.q_proj." in name:
            tensor = rotary_interleave(tensor, config.num_attention_heads)
        elif ".self_attn.k_proj." in name:
            tensor = rotary_interleave(tensor, config.num_key_value_heads)
        if dtype == "f16" and tensor.dim() > 1:
            tensor = tensor.half()
        yield gguf_name(name), tensor.contiguous().numpy()


def _check_gguf_tokenizer(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """llama.cpp's "gpt2" vocabulary is byte-level BPE with GPT-2's split regex: refuse anything it would tokenize
    differently (a normalizer, a prefix space, byte fallback, another model type)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    n_tokens = len(tokenizer.get_vocab())
    problems = []
    if backend["model"]["type"] != "BPE":
        problems.append(f"the tokenizer model is {backend['model']['type']}, not BPE")
    if backend["model"].get("byte_fallback"):
        problems.append("the BPE uses byte_fallback (a SentencePiece-style vocabulary)")
    if backend.get("normalizer") is not None:
        problems.append(f"the tokenizer has a normalizer ({backend['normalizer'].get('type')})")
    pre = backend.get("pre_tokenizer") or {}
    if not (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")):
        problems.append(f"the pre-tokenizer is {json.dumps(pre)}, not ByteLevel(add_prefix_space=False) with GPT-2's regex")
    if n_tokens > vocab_size:
        problems.append(f"the tokenizer has {n_tokens} tokens but the model embeds only {vocab_size}")
    if problems:
        raise ValueError("cannot write the tokenizer as llama.cpp's gpt2 vocabulary: " + "; ".join(problems) +
                         ". Export with --format llama and convert with llama.cpp's convert_hf_to_gguf.py")


def _add_tokenizer(writer: Any, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """The BPE vocabulary as llama.cpp reads it: tokens by id (byte-level strings, as in tokenizer.json), their
    types (special added tokens are control tokens), the merges, the special ids, whether BOS/EOS are added, and
    the chat template. Ids the tokenizer never produces (an embedding padded beyond it) become unused tokens."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = {entry["id"]: entry for entry in backend["added_tokens"]}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            entry = added.get(index)
            types.append(gguf.TokenType.NORMAL if entry is None else
                         gguf.TokenType.CONTROL if entry["special"] else gguf.TokenType.USER_DEFINED)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in backend["model"]["merges"]]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(GGUF_PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{key}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    with_special = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    adds_bos = len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id
    adds_eos = len(with_special) > len(plain) and with_special[-1] == tokenizer.eos_token_id
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(adds_eos)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)


def export_gguf(model: str | Path, out_file: Path, adapter: str | Path | None = None,
                dtype: Literal["f32", "f16"] = "f32") -> Path:
    """Write ``model`` (as `export_llama` takes it) as one GGUF file for llama.cpp (and Ollama, LM Studio, ...):
    the ``llama`` architecture with its hyper-parameters, the weights in ``dtype`` (``f16`` halves the file; norms
    and biases stay float32), and the byte-level BPE tokenizer. Refuses, before reading weights, what `llama_config`
    refuses, RoPE scaling, and tokenizers llama.cpp's gpt2 vocabulary would not reproduce."""
    try:
        import gguf
    except ImportError as error:
        raise ImportError("GGUF export needs the gguf package: pip install 'pipeline[export]' (or pip install gguf)") from error
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype={dtype!r}: GGUF export writes f32 or f16 (quantize the file with llama.cpp's llama-quantize)")
    out_file = Path(out_file)
    if out_file.exists():
        raise FileExistsError(f"{out_file} already exists: remove it or choose another output file")
    config = llama_config(_source_config(model, adapter))
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act={config.hidden_act!r}: llama.cpp's llama architecture runs SwiGLU with silu only")
    if _rope_type(config) != "default":
        raise ValueError(f"RoPE scaling {_rope_type(config)!r}: GGUF export writes plain RoPE only; export with "
                         "--format llama and convert with llama.cpp's convert_hf_to_gguf.py")
    tokenizer = _source_tokenizer(model, adapter)
    _check_gguf_tokenizer(tokenizer, config.vocab_size)
    llama = _load_llama(model, adapter, config, tokenizer)
    config = llama.config

    out_file.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{out_file.name}.", dir=out_file.parent)
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(partial, arch="llama")
        writer.add_name(Path(str(model)).name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_key_length(config.head_dim)  # llama.cpp assumes hidden_size / heads unless told
        writer.add_value_length(config.head_dim)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        for name, array in _gguf_tensors(llama, dtype):
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _usual_permissions(Path(partial))
        os.replace(partial, out_file)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return out_file
