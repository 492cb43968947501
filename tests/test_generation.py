"""Generation invariants on a model whose outputs depend on their context: the tiny Quill trained on Shakespeare
(`trained_lm`, conftest.py). transformers 5.24 renamed the KV cache kwarg; a model reading only the old name
generated from the last token alone, and greedy tokens of a random model did not show it. Each test here first asserts
that the context matters, then compares tokens and scores (tolerance SCORE_ATOL) of two code paths that must agree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import pipeline.models.quill  # noqa: F401  (registers the Auto classes)
from generation_checks import (
    CONTEXT_MARGIN,
    SCORE_ATOL,
    assert_depends_on_context,
    assert_same_generation,
    captured_messages,
    greedy,
    left_pad,
)

PROMPTS = ((0, 5), (80, 8), (200, 11))  # (token offset into the held-out text, prompt length in tokens)
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def prompts(trained_lm) -> list[torch.Tensor]:
    """Three held-out prompts of different lengths (so a batch of them is left-padded)."""
    ids = trained_lm.tokenizer(trained_lm.held_out[:5000], add_special_tokens=False, verbose=False)["input_ids"]
    return [torch.tensor(ids[start : start + length]) for start, length in PROMPTS]


@pytest.fixture(scope="module")
def eager_lm(trained_lm):
    """The trained model reloaded with eager attention (`trained_lm.model` itself must not be modified)."""
    model = AutoModelForCausalLM.from_pretrained(trained_lm.folder, attn_implementation="eager").eval()
    assert model.config._attn_implementation == "eager"
    return model


@pytest.fixture(params=["sdpa", "eager"])
def lm(request, trained_lm, eager_lm):
    model = trained_lm.model if request.param == "sdpa" else eager_lm
    assert model.config._attn_implementation == request.param
    return model


def padded_batch(model, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids, attention_mask = left_pad(prompts, model.config.pad_token_id)
    assert not attention_mask.all()  # the batch really is padded
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------- the fixture
@torch.no_grad()
def test_the_trained_model_depends_on_its_context(trained_lm, prompts) -> None:
    model = trained_lm.model
    for prompt in prompts:
        assert_depends_on_context(model, prompt[None], position=0)
        # what a lost KV cache amounts to: predicting from the last token alone gives clearly other logits
        alone = model(prompt[None, -1:], use_cache=False).logits[0, -1]
        assert (model(prompt[None], use_cache=False).logits[0, -1] - alone).abs().max() > 10 * CONTEXT_MARGIN


# ---------------------------------------------------------------------------------------------- cache or not
def test_greedy_generation_with_the_cache_equals_generation_without(lm, prompts) -> None:
    for prompt in prompts:
        assert_depends_on_context(lm, prompt[None])
        cached = greedy(lm, prompt[None], max_new_tokens=NEW_TOKENS, use_cache=True)
        uncached = greedy(lm, prompt[None], max_new_tokens=NEW_TOKENS, use_cache=False)
        assert_same_generation(cached, uncached, atol=SCORE_ATOL)
    input_ids, attention_mask = padded_batch(lm, prompts)
    assert_same_generation(greedy(lm, input_ids, attention_mask, NEW_TOKENS, use_cache=True),
                           greedy(lm, input_ids, attention_mask, NEW_TOKENS, use_cache=False))


def test_static_cache_generates_what_the_dynamic_cache_generates(lm, prompts) -> None:
    for prompt in prompts:
        assert_depends_on_context(lm, prompt[None])
        static = greedy(lm, prompt[None], max_new_tokens=NEW_TOKENS, cache_implementation="static")
        assert_same_generation(static, greedy(lm, prompt[None], max_new_tokens=NEW_TOKENS))
    input_ids, attention_mask = padded_batch(lm, prompts)
    static = greedy(lm, input_ids, attention_mask, NEW_TOKENS, cache_implementation="static")
    assert_same_generation(static, greedy(lm, input_ids, attention_mask, NEW_TOKENS))


def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(lm, prompts) -> None:
    input_ids, attention_mask = padded_batch(lm, prompts)
    sequences, scores = greedy(lm, input_ids, attention_mask, NEW_TOKENS)
    width = input_ids.shape[1]
    for row, prompt in enumerate(prompts):
        assert_depends_on_context(lm, prompt[None])
        alone_sequences, alone_scores = greedy(lm, prompt[None], max_new_tokens=NEW_TOKENS)
        assert_same_generation((sequences[row : row + 1, width:], scores[row : row + 1]),
                               (alone_sequences[:, len(prompt):], alone_scores))
    # the comparison can fail: attending to the padding changes the scores of the padded rows
    _, unmasked_scores = greedy(lm, input_ids, torch.ones_like(input_ids), NEW_TOKENS)
    padded_rows = ~attention_mask.bool().all(-1)
    assert (unmasked_scores[padded_rows, 0] - scores[padded_rows, 0]).abs().amax() > CONTEXT_MARGIN


def test_eager_and_sdpa_attention_generate_the_same(trained_lm, eager_lm, prompts) -> None:
    input_ids, attention_mask = padded_batch(eager_lm, prompts)
    for prompt in prompts:
        assert_depends_on_context(eager_lm, prompt[None])
    for cache_implementation in (None, "static"):
        assert_same_generation(
            greedy(eager_lm, input_ids, attention_mask, NEW_TOKENS, cache_implementation=cache_implementation),
            greedy(trained_lm.model, input_ids, attention_mask, NEW_TOKENS, cache_implementation=cache_implementation),
        )


def test_generate_logs_and_warns_no_deprecation(trained_lm, prompts) -> None:
    """On transformers 5.24 a model that returns its cache as `past_key_values` (or reads it back under that name)
    logs "`past_key_values`/`cache_params` are deprecated": once per process, hence `captured_messages`."""
    model = trained_lm.model
    input_ids, attention_mask = padded_batch(model, prompts)
    with captured_messages() as messages:
        greedy(model, prompts[0][None], max_new_tokens=4)
        greedy(model, input_ids, attention_mask, max_new_tokens=4, use_cache=False)
        greedy(model, prompts[0][None], max_new_tokens=4, cache_implementation="static")
        greedy(model, input_ids, attention_mask, max_new_tokens=4)
        greedy(model, input_ids, attention_mask, max_new_tokens=4, cache_implementation="static")
    deprecations = [m for m in messages if "deprecat" in m.lower()]
    assert not deprecations, deprecations


def test_the_capture_sees_transformers_deprecation_messages() -> None:
    """The test above can fail: `captured_messages` sees a `warning_once` even when it was logged before."""
    logger = hf_logging.get_logger("transformers.generation.utils")
    logger.warning_once("`something` is deprecated (seen before the capture)")
    with captured_messages() as messages:
        logger.warning_once("`something` is deprecated (seen before the capture)")
        warnings.warn("old API is deprecated", FutureWarning)
    assert sum("deprecated" in m for m in messages) == 2, messages


# ---------------------------------------------------------------------------------------------- exported code
REMOTE_GENERATE = textwrap.dedent(
    """
    import sys
    sys.modules["pipeline"] = None  # importing the package is impossible in this process
    import torch
    from transformers import AutoModelForCausalLM
    folder, inputs_path, out_path = sys.argv[1:4]
    inputs = torch.load(inputs_path)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    results = {"module": type(model).__module__}
    with torch.no_grad():
        for name, use_cache in (("cached", True), ("uncached", False)):
            out = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=use_cache,
                                 max_new_tokens=inputs["new_tokens"], do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=model.config.pad_token_id, eos_token_id=None)
            results[name] = (out.sequences, torch.stack(out.scores, dim=1))
    torch.save(results, out_path)
    """
)


def test_the_code_exported_next_to_the_weights_generates_with_its_cache(trained_lm, prompts, tmp_path: Path) -> None:
    """A `trust_remote_code=True` load runs the folder's modeling_quill.py, not the package: it must carry the fix."""
    assert (trained_lm.folder / "modeling_quill.py").is_file() and (trained_lm.folder / "configuration_quill.py").is_file()
    input_ids, attention_mask = padded_batch(trained_lm.model, prompts)
    for prompt in prompts:
        assert_depends_on_context(trained_lm.model, prompt[None])
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask, "new_tokens": NEW_TOKENS},
               tmp_path / "inputs.pt")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    (workdir / "generate.py").write_text(REMOTE_GENERATE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, "generate.py", str(trained_lm.folder), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    assert remote["module"].startswith("transformers_modules"), remote["module"]  # the exported file ran
    assert_same_generation(remote["cached"], remote["uncached"], atol=SCORE_ATOL)
    assert_same_generation(remote["cached"], greedy(trained_lm.model, input_ids, attention_mask, NEW_TOKENS))


# ---------------------------------------------------------------------------------------------- old checkpoints
# config.json as the code before the cache fix (commit 59a7b43) wrote it for the trained model's shape, under
# transformers 5.23; the token ids and vocabulary size come from the trained tokenizer.
CONFIG_WRITTEN_BEFORE_THE_FIX = {
    "architectures": ["QuillForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_quill.QuillConfig",
        "AutoModel": "modeling_quill.QuillModel",
        "AutoModelForCausalLM": "modeling_quill.QuillForCausalLM",
        "AutoModelForSequenceClassification": "modeling_quill.QuillForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_quill.QuillForTokenClassification",
    },
    "bos_token_id": None,
    "dtype": "float32",
    "embedding_dropout": 0.0,
    "eos_token_id": None,
    "head_dim": 16,
    "hidden_act": "silu",
    "hidden_dropout": 0.0,
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 192,
    "max_position_embeddings": 128,
    "mlp_bias": False,
    "mlp_type": "gated",
    "model_type": "quill",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "pad_token_id": None,
    "position_embedding_type": "rope",
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "transformers_version": "5.23.0",
    "use_cache": True,
    "vocab_size": None,
}


def test_a_config_written_before_the_fix_still_loads_and_generates(trained_lm, prompts, tmp_path: Path) -> None:
    model = trained_lm.model
    old = dict(CONFIG_WRITTEN_BEFORE_THE_FIX)
    for field in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"):
        old[field] = getattr(model.config, field)
    # the fix added no config field: today's config.json has exactly the old fields
    assert set(json.loads((trained_lm.folder / "config.json").read_text())) == set(old)
    (tmp_path / "config.json").write_text(json.dumps(old, indent=2))
    shutil.copy(trained_lm.folder / "model.safetensors", tmp_path / "model.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model) and reloaded.config.position_embedding_type == "rope"
    prompt = prompts[1][None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(prompt).logits, model(prompt).logits, rtol=0, atol=0)
    assert_depends_on_context(reloaded, prompt)
    cached = greedy(reloaded, prompt, max_new_tokens=NEW_TOKENS)
    assert_same_generation(cached, greedy(reloaded, prompt, max_new_tokens=NEW_TOKENS, use_cache=False))
    assert_same_generation(cached, greedy(model, prompt, max_new_tokens=NEW_TOKENS))
