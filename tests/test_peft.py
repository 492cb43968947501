"""PEFT on Quill: LoRA, DoRA, rsLoRA, prefix tuning, prompt tuning and p-tuning each train, save, reload, generate and
(the LoRA family) merge on the trained Shakespeare fixture, checked against an equivalent LlamaForCausalLM carrying
the same weights as the control: where Llama fails too, the fault is in PEFT or transformers, not in Quill."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
import transformers
from packaging import version
from peft import (
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peft.tuners.lora import LoraLayer
from peft.utils import constants as peft_constants
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import pipeline.models.quill  # noqa: F401  (registers Quill with the Auto classes and PEFT)
from pipeline.models.quill import QuillConfig, QuillForCausalLM
from pipeline.models.quill.modeling_quill import CACHE_FIELD

LORA_FAMILY = ("lora", "dora", "rslora")
PROMPT_LEARNING = ("prefix", "prompt", "ptuning")
METHODS = LORA_FAMILY + PROMPT_LEARNING
VIRTUAL_TOKENS, RANK, ALPHA = 6, 4, 8
TRAIN_STEPS, TRAIN_ROWS, TRAIN_LENGTH = 6, 4, 48
LEARNING_RATE = {"lora": 1e-2, "dora": 1e-2, "rslora": 1e-2, "prefix": 1e-2, "prompt": 1e-1, "ptuning": 1e-2}
PROMPT_LENGTH, NEW_TOKENS = 20, 6
SCORE_TOLERANCE = 1e-4

# transformers 5.24 renamed the KV cache kwarg of generate()'s model inputs to `cache`; peft <= 0.21.2 (the newest
# release when this was written) still reads and writes `past_key_values` in
# PeftModelForCausalLM.prepare_inputs_for_generation. Measured on LlamaForCausalLM (the control) with these versions:
# prompt tuning and p-tuning re-insert the virtual tokens at every decoding step (the cache grows 15 -> 21 -> 27 for
# 5 virtual + 10 prompt tokens) and prefix tuning's prefix cache is dropped by Llama's `past_key_values` -> `cache`
# deprecation shim, so cached generation ignores the prefix; cached and uncached greedy scores differ by 0.1-1.0.
# Quill refuses the two caches prefix tuning hands it (ValueError) rather than silently dropping one.
# transformers 5.1 with the same peft: every method's cached generation matches the uncached one on Quill.
PEFT_MISSES_CACHE_RENAME = CACHE_FIELD == "cache" and version.parse(peft.__version__) <= version.parse("0.21.2")


def _cached_prompt_learning_broken(raises: type[Exception]):
    return pytest.mark.xfail(
        PEFT_MISSES_CACHE_RENAME,
        raises=raises,
        strict=True,
        reason=f"peft {peft.__version__} passes prompt-learning caches as `past_key_values`, transformers "
        f"{transformers.__version__} as `cache`: cached generation breaks for LlamaForCausalLM too (comment above)",
    )


# Uncached generation of a prefix-tuned LlamaForCausalLM (the control) with peft 0.21.2: transformers 5.1 raises in
# sdpa ("The expanded size of the tensor (16) must match the existing size (26)", 6 virtual + 10 real tokens: the mask
# is longer than the keys); transformers 5.24 returns the prefix cache, grown by the prompt, although use_cache=False,
# generate() hands it back next step as `cache`, and the tokens drift from those of repeated full forward passes.
# Quill returns no cache when use_cache=False and follows its forward on both versions.
UNCACHED_PREFIX_BROKEN_ON_LLAMA = pytest.mark.xfail(
    version.parse(peft.__version__) <= version.parse("0.21.2"),
    raises=AssertionError if CACHE_FIELD == "cache" else RuntimeError,
    strict=True,
    reason=f"transformers {transformers.__version__} + peft {peft.__version__}: prefix-tuned LlamaForCausalLM "
    "generates wrongly without a cache (comment above; the control only, Quill runs unmarked)",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: on 2 shared cores, torch's 2-thread kernels wait on each other (a fwd/bwd step measured
    20x slower than with 1 thread under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _peft_config(method: str, identity_init: bool = True):
    """The adapter for `method`. LoRA starts as the identity (B = 0) unless `identity_init` is False, which draws both
    factors at random so an untrained adapter already changes the output."""
    if method in LORA_FAMILY:
        return LoraConfig(task_type="CAUSAL_LM", r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                          use_dora=method == "dora", use_rslora=method == "rslora", init_lora_weights=identity_init)
    if method == "prefix":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)
    if method == "prompt":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)
    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS, encoder_hidden_size=32)


def _quill(trained_lm) -> QuillForCausalLM:
    """A fresh copy of the fixture model (adapters must never be attached to `trained_lm.model` itself)."""
    return AutoModelForCausalLM.from_pretrained(trained_lm.folder, dtype=torch.float32).eval()


def _llama_twin(trained_lm) -> LlamaForCausalLM:
    """LlamaForCausalLM with the fixture's shapes and weights: Quill's parameter names are Llama's."""
    q: QuillConfig = trained_lm.model.config
    config = LlamaConfig(
        vocab_size=q.vocab_size, hidden_size=q.hidden_size, intermediate_size=q.intermediate_size,
        num_hidden_layers=q.num_hidden_layers, num_attention_heads=q.num_attention_heads,
        num_key_value_heads=q.num_key_value_heads, head_dim=q.head_dim, hidden_act=q.hidden_act,
        max_position_embeddings=q.max_position_embeddings, rope_theta=q.rope_theta, rms_norm_eps=q.rms_norm_eps,
        attention_bias=q.attention_bias, mlp_bias=q.mlp_bias, tie_word_embeddings=q.tie_word_embeddings,
        pad_token_id=q.pad_token_id, bos_token_id=q.bos_token_id, eos_token_id=q.eos_token_id,
    )
    llama = LlamaForCausalLM(config)
    llama.load_state_dict(trained_lm.model.state_dict(), strict=True)
    return llama.eval()


BASES = {"quill": _quill, "llama": _llama_twin}


def _prompt_ids(trained_lm) -> torch.Tensor:
    ids = trained_lm.tokenizer(trained_lm.held_out, add_special_tokens=False)["input_ids"][:PROMPT_LENGTH]
    return torch.tensor([ids])


def _training_batch(trained_lm) -> torch.Tensor:
    start = 1000  # clear of the generation prompt
    ids = trained_lm.tokenizer(trained_lm.held_out, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[start : start + TRAIN_ROWS * TRAIN_LENGTH]).view(TRAIN_ROWS, TRAIN_LENGTH)


@torch.no_grad()
def _last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].float()


@torch.no_grad()
def _loss(model, batch: torch.Tensor) -> float:
    return model(input_ids=batch, labels=batch).loss.item()


def _base_weights(peft_model) -> dict[str, torch.Tensor]:
    """The base model's parameters under their original names (LoRA wraps each target as `<name>.base_layer`)."""
    return {
        name.replace(".base_layer", ""): p
        for name, p in peft_model.get_base_model().named_parameters()
        if "lora_" not in name
    }


def _generate(model, ids: torch.Tensor, use_cache: bool):
    return model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False, use_cache=use_cache, output_scores=True, output_logits=True, return_dict_in_generate=True,
        pad_token_id=model.config.pad_token_id,
    )


# ----------------------------------------------------------------------------------------------------------------
# Default target modules
# ----------------------------------------------------------------------------------------------------------------
def test_quill_has_llamas_default_targets_in_every_peft_mapping():
    mappings = {
        name: mapping
        for name, mapping in vars(peft_constants).items()
        if name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(mapping, dict) and "llama" in mapping
    }
    assert "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING" in mappings
    assert len(mappings) >= 10, sorted(mappings)  # peft 0.18 has 23 such mappings, 0.21 over 30
    missing = {name for name, mapping in mappings.items() if mapping.get("quill") != mapping["llama"]}
    assert not missing


def test_default_lora_targets_match_llama(trained_lm):
    def targeted(model) -> set[str]:
        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))  # no target_modules
        return {name for name, module in peft_model.get_base_model().named_modules() if isinstance(module, LoraLayer)}

    quill_targets = targeted(_quill(trained_lm))
    llama_targets = targeted(_llama_twin(trained_lm))
    layers = trained_lm.model.config.num_hidden_layers
    assert quill_targets == llama_targets
    assert quill_targets == {f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in ("q_proj", "v_proj")}


# ----------------------------------------------------------------------------------------------------------------
# The control: a LlamaForCausalLM with the fixture's weights computes what Quill computes
# ----------------------------------------------------------------------------------------------------------------
def test_llama_twin_computes_the_same_logits(trained_lm):
    ids = _prompt_ids(trained_lm)
    torch.testing.assert_close(_last_logits(_llama_twin(trained_lm), ids), _last_logits(trained_lm.model, ids),
                               rtol=0, atol=1e-5)


def test_fixture_output_depends_on_early_context(trained_lm):
    """Without this, cached generation that forgets the prompt could still match uncached generation."""
    ids = _prompt_ids(trained_lm)
    changed = ids.clone()
    changed[0, 1] = (changed[0, 1] + 1) % trained_lm.model.config.vocab_size
    difference = (_last_logits(trained_lm.model, ids) - _last_logits(trained_lm.model, changed)).abs().max().item()
    assert difference > 1e-2


# ----------------------------------------------------------------------------------------------------------------
# Training: a few steps lower the loss and change the adapter only
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Tuned:
    method: str
    model: PeftModel  # trained, eval mode
    batch: torch.Tensor
    loss_before: float
    loss_after: float
    before: dict[str, torch.Tensor]  # every parameter right after get_peft_model
    base_loss: float  # the fixture model on the same batch


@pytest.fixture(scope="module", params=METHODS)
def tuned(request, trained_lm) -> Tuned:
    method = request.param
    torch.manual_seed(0)
    model = get_peft_model(_quill(trained_lm), _peft_config(method))
    batch = _training_batch(trained_lm)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss_before = _loss(model, batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE[method],
                                  weight_decay=0.0)
    model.train()
    for _ in range(TRAIN_STEPS):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return Tuned(method, model, batch, loss_before, _loss(model, batch), before, _loss(trained_lm.model, batch))


def test_forward_gives_logits_and_loss(tuned, trained_lm):
    out = tuned.model(input_ids=tuned.batch, labels=tuned.batch)
    rows, length = tuned.batch.shape
    # Prompt and p-tuning put the virtual tokens in front of the input embeddings, so they get logits too; prefix
    # tuning puts them into the KV cache only.
    length += VIRTUAL_TOKENS if tuned.method in ("prompt", "ptuning") else 0
    assert out.logits.shape == (rows, length, trained_lm.model.config.vocab_size)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)


def test_the_adapter_is_the_configured_method(tuned):
    config = tuned.model.peft_config["default"]
    if tuned.method in LORA_FAMILY:
        layers = [m for m in tuned.model.modules() if isinstance(m, LoraLayer)]
        assert layers
        scaling = layers[0].scaling["default"]
        assert scaling == pytest.approx(ALPHA / RANK**0.5 if tuned.method == "rslora" else ALPHA / RANK)
        has_magnitude = any("lora_magnitude_vector" in name for name, _ in tuned.model.named_parameters())
        assert has_magnitude == (tuned.method == "dora")
    else:
        assert config.is_prompt_learning and config.num_virtual_tokens == VIRTUAL_TOKENS


def test_training_lowers_the_loss(tuned):
    if tuned.method in LORA_FAMILY:  # identity at initialisation
        assert tuned.loss_before == pytest.approx(tuned.base_loss, abs=1e-6)
    assert tuned.loss_after < tuned.loss_before - 0.02, (tuned.loss_before, tuned.loss_after)


def test_training_changes_the_adapter_and_nothing_else(tuned, trained_lm):
    changed, unchanged = set(), set()
    for name, p in tuned.model.named_parameters():
        (unchanged if torch.equal(p, tuned.before[name]) else changed).add(name)
    trainable = {name for name, p in tuned.model.named_parameters() if p.requires_grad}
    assert changed == trainable, (changed ^ trainable)
    marker = "lora_" if tuned.method in LORA_FAMILY else "prompt_encoder"
    assert trainable and all(marker in name for name in trainable)
    # The base weights are bit-identical to the untouched fixture model, every one of them.
    base = _base_weights(tuned.model)
    reference = dict(trained_lm.model.named_parameters())
    assert base.keys() == reference.keys()
    assert [name for name in base if not torch.equal(base[name], reference[name])] == []


# ----------------------------------------------------------------------------------------------------------------
# Save and reload
# ----------------------------------------------------------------------------------------------------------------
def test_save_and_reload_gives_identical_logits(tuned, trained_lm, tmp_path):
    tuned.model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_quill(trained_lm), tmp_path).eval()
    with torch.no_grad():
        expected = tuned.model(input_ids=tuned.batch).logits
        actual = reloaded(input_ids=tuned.batch).logits
        base = trained_lm.model(input_ids=tuned.batch).logits
    # The trained adapter matters (on the text positions), so a reload that dropped it would show.
    assert (expected[:, -base.shape[1] :] - base).abs().max() > 1e-3
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# merge_and_unload
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", LORA_FAMILY)
def test_merge_and_unload_matches_the_adapter(method, trained_lm):
    """On random (non-identity) factors, so the merge has something to fold in; fp32 throughout."""
    torch.manual_seed(0)
    model = get_peft_model(_quill(trained_lm), _peft_config(method, identity_init=False)).eval()
    batch = _training_batch(trained_lm)
    with torch.no_grad():
        adapter = model(input_ids=batch).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(input_ids=batch).logits
        base = trained_lm.model(input_ids=batch).logits
    assert type(merged_model) is QuillForCausalLM
    assert not any(isinstance(m, LoraLayer) for m in merged_model.modules())
    assert (adapter - base).abs().max() > 1e-2
    torch.testing.assert_close(merged, adapter, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------
def _adapted(trained_lm, arch: str, method: str) -> PeftModel:
    """A fresh random (non-identity) adapter; the same one on either base, as both have the same parameters."""
    base = BASES[arch](trained_lm)
    torch.manual_seed(0)
    return get_peft_model(base, _peft_config(method, identity_init=False)).eval()


def _uncached_generation_cases():
    for method in METHODS:
        for arch in sorted(BASES):
            marks = [UNCACHED_PREFIX_BROKEN_ON_LLAMA] if (method, arch) == ("prefix", "llama") else []
            yield pytest.param(method, arch, marks=marks, id=f"{method}-{arch}")


@pytest.mark.parametrize(("method", "arch"), list(_uncached_generation_cases()))
def test_uncached_generation_follows_the_adapters_forward(method, arch, trained_lm):
    """Greedy generation without a cache equals argmax decoding by repeated full forward passes of the adapted model,
    token by token and logit by logit; Llama is the control."""
    model = _adapted(trained_lm, arch, method)
    ids = _prompt_ids(trained_lm)
    out = _generate(model, ids, use_cache=False)
    sequence = ids
    for step in range(NEW_TOKENS):
        logits = _last_logits(model, sequence)
        torch.testing.assert_close(out.logits[step].float(), logits, rtol=0, atol=SCORE_TOLERANCE)
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, sequence)
    base = _last_logits(trained_lm.model, ids)
    assert (out.logits[0].float() - base).abs().max() > 1e-2  # the adapter takes part in generation


def _cached_generation_cases():
    for method in METHODS:
        for arch in sorted(BASES):
            marks = []
            if method in PROMPT_LEARNING and PEFT_MISSES_CACHE_RENAME:
                # Quill refuses the two caches of prefix tuning; everywhere else the scores differ
                quill_refuses = method == "prefix" and arch == "quill"
                marks.append(_cached_prompt_learning_broken(ValueError if quill_refuses else AssertionError))
            elif (method, arch) == ("prefix", "llama"):  # its uncached reference is broken
                marks.append(UNCACHED_PREFIX_BROKEN_ON_LLAMA)
            yield pytest.param(method, arch, marks=marks, id=f"{method}-{arch}")


@pytest.mark.parametrize(("method", "arch"), list(_cached_generation_cases()))
def test_cached_generation_matches_uncached(method, arch, trained_lm):
    """Same tokens and the same scores (1e-4) with and without the KV cache; Llama is the control."""
    model = _adapted(trained_lm, arch, method)
    ids = _prompt_ids(trained_lm)
    cached, uncached = _generate(model, ids, use_cache=True), _generate(model, ids, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert len(cached.scores) == len(uncached.scores) == NEW_TOKENS
    for step, (a, b) in enumerate(zip(cached.scores, uncached.scores)):
        torch.testing.assert_close(a, b, rtol=0, atol=SCORE_TOLERANCE, msg=lambda m, s=step: f"step {s}: {m}")
