"""Quill: numerics, equivalences between code paths, and save/load round trips (tiny configs, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

import pipeline.models.quill  # noqa: F401  (registers the Auto classes)
from generation_checks import (
    CONTEXT_MARGIN,
    SCORE_ATOL,
    assert_depends_on_context,
    assert_same_generation,
    cache_of,
    greedy,
    left_pad,
)
from pipeline.models.quill import (
    QuillConfig,
    QuillForCausalLM,
    QuillForSequenceClassification,
    QuillForTokenClassification,
    QuillModel,
)

VOCAB = 97


def tiny_config(**overrides) -> QuillConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return QuillConfig(**kwargs)


def tiny_lm(**overrides) -> QuillForCausalLM:
    return QuillForCausalLM(tiny_config(**overrides)).eval()


def random_ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length))


def context_lm(**overrides) -> QuillForCausalLM:
    """A random model whose outputs depend on their context: at the default 0.02 initialisation the last logits barely
    move when an early token changes (sinusoidal: by ~3e-5), so an equivalence test on it could not fail."""
    overrides.setdefault("initializer_range", 0.3)
    return tiny_lm(**overrides)


POSITIONS = ["rope", "learned", "sinusoidal"]
ATTENTIONS = ["sdpa", "eager"]
positions_and_attention = pytest.mark.parametrize(
    ("position_embedding_type", "attn_implementation"), [(p, a) for p in POSITIONS for a in ATTENTIONS]
)


def context_lm_with(position_embedding_type: str, attn_implementation: str, **overrides) -> QuillForCausalLM:
    model = context_lm(position_embedding_type=position_embedding_type, **overrides)
    model.set_attn_implementation(attn_implementation)
    assert model.config._attn_implementation == attn_implementation  # transformers refuses silently for some files
    return model


# ---------------------------------------------------------------------------------------------- config
def test_config_uses_transformers_field_names_and_defaults_to_llama_style() -> None:
    config = QuillConfig(hidden_size=96, num_attention_heads=6)
    assert config.model_type == "quill" and config.model_type not in _transformers_model_types()
    assert config.num_key_value_heads == 6 and config.head_dim == 16
    assert config.position_embedding_type == "rope" and config.hidden_act == "silu" and config.mlp_type == "gated"
    assert config.intermediate_size % 64 == 0 and config.intermediate_size >= 8 * 96 // 3
    assert config.tie_word_embeddings is True


def _transformers_model_types() -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads"),
        (dict(position_embedding_type="alibi"), "position_embedding_type"),
        (dict(mlp_type="moe"), "mlp_type"),
        (dict(hidden_size=30, num_attention_heads=10), "even head_dim"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "plain RoPE only"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "plain RoPE only"),
    ],
)
def test_config_rejects_impossible_shapes(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_parameter_names_are_the_ones_peft_and_fsdp_expect() -> None:
    names = {name for name, _ in tiny_lm().named_parameters()}
    for expected in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
    ):
        assert expected in names
    model = tiny_lm()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied by default
    untied = tiny_lm(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_grouped_query_attention_shapes_the_key_value_projections() -> None:
    attention = tiny_lm(num_attention_heads=4, num_key_value_heads=1).model.layers[0].self_attn
    assert attention.q_proj.out_features == 32 and attention.k_proj.out_features == 8 == attention.v_proj.out_features


# ---------------------------------------------------------------------------------------------- loss
def test_causal_lm_loss_is_shifted_cross_entropy_ignoring_minus_100() -> None:
    model = tiny_lm()
    ids = random_ids(2, 9)
    labels = ids.clone()
    labels[0, :4] = -100  # e.g. a masked prompt
    labels[1, -2:] = -100
    out = model(ids, labels=labels)
    logits = out.logits.float()
    terms = []
    for b in range(2):
        for t in range(8):  # position t predicts token t+1
            if labels[b, t + 1] != -100:
                terms.append(-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]])
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(out.loss, expected)


def test_loss_with_num_items_in_batch_is_a_sum_over_the_accumulation_window() -> None:
    model = tiny_lm()
    ids = random_ids(2, 9)
    n_targets = 2 * 8
    out = model(ids, labels=ids, num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(out.loss * 40 / n_targets, model(ids, labels=ids).loss)


@pytest.mark.parametrize("num_items_in_batch", [None, 40])
def test_pre_shifted_labels_give_the_loss_of_labels(num_items_in_batch: int | None) -> None:
    """`shift_labels` (label t is what position t predicts, as context-parallel training hands them over) give the loss
    `labels` give, which is the hand-computed cross-entropy: a mean over targets, or a sum / num_items_in_batch."""
    model = tiny_lm()
    ids = random_ids(2, 9)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, -2:] = -100
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)  # labels[:, 1:], padded back to the sequence length
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    from_labels = model(ids, labels=labels, **kwargs)
    from_shifted = model(ids, shift_labels=shift_labels, **kwargs)
    logits = from_labels.logits.float()
    terms = [-torch.log_softmax(logits[b, t], -1)[shift_labels[b, t]]
             for b in range(2) for t in range(9) if shift_labels[b, t] != -100]
    assert len(terms) == 11
    expected = torch.stack(terms).sum() / (len(terms) if num_items_in_batch is None else num_items_in_batch)
    assert from_shifted.loss is not None
    torch.testing.assert_close(from_labels.loss, expected)
    torch.testing.assert_close(from_shifted.loss, expected)
    # shift_labels take the place of labels: labels passed alongside do not count
    torch.testing.assert_close(model(ids, labels=torch.full_like(ids, 5), shift_labels=shift_labels, **kwargs).loss,
                               expected)
    # and the comparison can fail: unshifted labels as shift_labels give another loss
    assert not torch.allclose(model(ids, shift_labels=labels, **kwargs).loss, expected)


def test_all_masked_labels_give_zero_loss_not_nan() -> None:
    model = tiny_lm().train()
    ids = random_ids(1, 6)
    loss = model(ids, labels=torch.full_like(ids, -100)).loss
    assert loss.item() == 0.0
    loss.backward()  # graph-connected: a micro-batch with no targets still backpropagates (zeros)


# ---------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip_gives_identical_logits_with_safetensors_only(tmp_path: Path) -> None:
    model = tiny_lm()
    ids = random_ids(2, 12)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert {"configuration_quill.py", "modeling_quill.py"} <= files  # the code travels with the weights
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is QuillForCausalLM and reloaded.dtype == torch.float32
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_every_auto_class_resolves_to_quill(tmp_path: Path) -> None:
    tiny_lm().save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is QuillConfig
    assert type(AutoModel.from_pretrained(tmp_path)) is QuillModel
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert type(classifier) is QuillForSequenceClassification and classifier.score.out_features == 3
    tagger = AutoModelForTokenClassification.from_pretrained(tmp_path, num_labels=5)
    assert type(tagger) is QuillForTokenClassification
    # the body's weights carry over into the heads
    torch.testing.assert_close(classifier.model.embed_tokens.weight, AutoModel.from_pretrained(tmp_path).embed_tokens.weight)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModelForTokenClassification"]


REMOTE_LOAD = textwrap.dedent(
    """
    import sys
    sys.modules["pipeline"] = None  # importing the package is impossible in this process
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    folder, ids_path, out_path = sys.argv[1:4]
    ids = torch.load(ids_path)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert "pipeline" not in type(model).__module__, type(model).__module__
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, num_labels=2)
    with torch.no_grad():
        torch.save({"logits": model(ids).logits, "generated": model.generate(ids[:, :5], max_new_tokens=4, do_sample=False),
                    "classifier": type(classifier).__name__}, out_path)
    """
)


def test_saved_model_loads_with_trust_remote_code_where_pipeline_cannot_be_imported(tmp_path: Path) -> None:
    model = tiny_lm(position_embedding_type="rope")
    folder, workdir = tmp_path / "model", tmp_path / "elsewhere"
    workdir.mkdir()
    model.save_pretrained(folder)
    ids = random_ids(2, 10)
    torch.save(ids, tmp_path / "ids.pt")
    script = workdir / "load.py"
    script.write_text(REMOTE_LOAD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(remote["logits"], model(ids).logits, rtol=0, atol=0)
    assert torch.equal(remote["generated"], model.generate(ids[:, :5], max_new_tokens=4, do_sample=False))
    assert remote["classifier"] == "QuillForSequenceClassification"


def test_exported_model_code_imports_nothing_from_pipeline() -> None:
    folder = Path(pipeline.__file__).parent / "models" / "quill"
    for name in ("configuration_quill.py", "modeling_quill.py"):
        source = (folder / name).read_text()
        assert "import pipeline" not in source and "from pipeline" not in source
        imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
        allowed = {"torch", "transformers", "__future__", ""} | set(sys.stdlib_module_names)
        assert all(line.split()[1].split(".")[0] in allowed for line in imports), imports


# ---------------------------------------------------------------------------------------------- generation
@positions_and_attention
def test_greedy_generation_with_kv_cache_equals_generation_without(position_embedding_type: str,
                                                                    attn_implementation: str) -> None:
    model = context_lm_with(position_embedding_type, attn_implementation)
    prompt = random_ids(2, 6)
    assert_depends_on_context(model, prompt)
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, eos_token_id=None)
    uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, eos_token_id=None)
    assert cached.shape == (2, 18)
    assert torch.equal(cached, uncached)
    assert_same_generation(greedy(model, prompt, max_new_tokens=12, use_cache=True),
                           greedy(model, prompt, max_new_tokens=12, use_cache=False), atol=SCORE_ATOL)


@positions_and_attention
def test_static_cache_generation_equals_dynamic_cache_generation(position_embedding_type: str,
                                                                 attn_implementation: str) -> None:
    model = context_lm_with(position_embedding_type, attn_implementation)
    prompts = [random_ids(1, n)[0] for n in (3, 7, 5)]
    for prompt in prompts:
        assert_depends_on_context(model, prompt[None])
    input_ids, attention_mask = left_pad(prompts, model.config.pad_token_id)
    for ids, mask in ((prompts[1][None], None), (input_ids, attention_mask)):
        assert_same_generation(greedy(model, ids, mask, max_new_tokens=10, cache_implementation="static"),
                               greedy(model, ids, mask, max_new_tokens=10, cache_implementation="dynamic"))


def _cache(kind: str, model: QuillForCausalLM):
    from transformers import DynamicCache, StaticCache

    return DynamicCache(config=model.config) if kind == "dynamic" else StaticCache(config=model.config, max_cache_len=16)


@positions_and_attention
@pytest.mark.parametrize(("cache_kind", "cache_kwarg"),
                         [("dynamic", "cache"), ("dynamic", "past_key_values"), ("static", "cache")])
def test_cached_forward_matches_full_forward_position_by_position(position_embedding_type: str, attn_implementation: str,
                                                                  cache_kind: str, cache_kwarg: str) -> None:
    """Prefill 6 tokens, then feed one token at a time: the logits equal those of one forward over all 10. The cache
    goes in under either name (transformers >= 5.24 passes `cache`, earlier versions `past_key_values`)."""
    model = context_lm_with(position_embedding_type, attn_implementation)
    ids = random_ids(1, 10)
    assert_depends_on_context(model, ids)
    full = model(ids).logits
    cache = _cache(cache_kind, model)
    out = model(ids[:, :6], use_cache=True, **{cache_kwarg: cache})
    step_logits = [out.logits]
    assert cache_of(out) is cache and cache.get_seq_length() == 6  # the cache passed in was filled and returned
    for t in range(6, 10):
        out = model(ids[:, t : t + 1], use_cache=True, **{cache_kwarg: cache})
        assert cache_of(out) is cache  # the same cache object comes back, one token longer
        step_logits.append(out.logits)
    assert cache.get_seq_length() == 10
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full, rtol=1e-5, atol=1e-5)
    # the comparison can fail: the last token without its cache predicts something clearly different
    assert (model(ids[:, -1:]).logits[:, -1] - full[:, -1]).abs().max() > CONTEXT_MARGIN


@pytest.mark.parametrize("position_embedding_type", POSITIONS)
@pytest.mark.parametrize("attn_implementation", ATTENTIONS)
def test_batched_left_padded_generation_equals_one_by_one(position_embedding_type: str, attn_implementation: str) -> None:
    # large initial weights: a model at the default 0.02 repeats one token whatever it attends to
    model = tiny_lm(position_embedding_type=position_embedding_type, initializer_range=0.3, eos_token_id=None)
    model.set_attn_implementation(attn_implementation)
    assert model.config._attn_implementation == attn_implementation
    prompts = [random_ids(1, n)[0] for n in (3, 7, 5)]
    for prompt in prompts:
        assert_depends_on_context(model, prompt[None])
    width = max(len(p) for p in prompts)
    pad = model.config.pad_token_id
    input_ids = torch.stack([F.pad(p, (width - len(p), 0), value=pad) for p in prompts])
    attention_mask = torch.stack([F.pad(torch.ones_like(p), (width - len(p), 0)) for p in prompts])
    batched = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False, pad_token_id=pad)
    batched_sequences, batched_scores = greedy(model, input_ids, attention_mask, max_new_tokens=8)
    assert torch.equal(batched_sequences, batched)
    for row, prompt in enumerate(prompts):
        single = model.generate(prompt[None], max_new_tokens=8, do_sample=False, pad_token_id=pad)[0]
        assert torch.equal(batched[row, width:], single[len(prompt):])
        single_sequences, single_scores = greedy(model, prompt[None], max_new_tokens=8)
        assert_same_generation((batched_sequences[row : row + 1, width:], batched_scores[row : row + 1]),
                               (single_sequences[:, len(prompt):], single_scores), atol=SCORE_ATOL)
    # the test can fail: attending to the padding gives other tokens
    unmasked = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=pad)
    assert not torch.equal(unmasked[:, width:], batched[:, width:])


# ---------------------------------------------------------------------------------------------- attention
def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids(3, 10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("position_embedding_type", POSITIONS)
@pytest.mark.parametrize("with_padding", [False, True])
def test_sdpa_and_eager_attention_agree(with_padding: bool, position_embedding_type: str) -> None:
    model = context_lm(position_embedding_type=position_embedding_type)
    ids, mask = _padded_batch()
    assert_depends_on_context(model, ids)
    mask = mask if with_padding else None
    model.set_attn_implementation("sdpa")
    sdpa = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"  # transformers refuses silently for some model files
    eager = model(ids, attention_mask=mask).logits
    assert not sdpa.isnan().any()
    keep = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    torch.testing.assert_close(sdpa[keep], eager[keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("position_embedding_type", POSITIONS)
def test_padding_does_not_change_the_real_tokens_outputs(position_embedding_type: str) -> None:
    model = context_lm(position_embedding_type=position_embedding_type)
    ids = random_ids(1, 6)
    assert_depends_on_context(model, ids)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, attention_mask=mask, position_ids=position_ids).logits[:, 3:]
    torch.testing.assert_close(out, model(ids).logits, rtol=1e-5, atol=1e-5)
    # the comparison can fail: without the mask the real tokens see the padding
    unmasked = model(padded, attention_mask=torch.ones_like(mask), position_ids=position_ids)
    assert not torch.allclose(unmasked.logits[:, 3:], model(ids).logits, atol=CONTEXT_MARGIN)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_documents_do_not_attend_to_each_other(attn_implementation: str) -> None:
    """position_ids restarting at 0 (and no attention_mask) mark packed documents, as in transformers."""
    model = tiny_lm()
    model.set_attn_implementation(attn_implementation)
    a, b = random_ids(1, 5), random_ids(1, 7)
    packed = torch.cat([a, b], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    out = model(packed, position_ids=position_ids).logits
    torch.testing.assert_close(out[:, :5], model(a).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 5:], model(b).logits, rtol=1e-5, atol=1e-5)
    # without the restart, the second document sees the first and its outputs change
    assert not torch.allclose(model(packed).logits[:, 5:], model(b).logits, atol=1e-4)


class _LogitsOf(torch.nn.Module):
    def __init__(self, model: QuillForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@positions_and_attention
def test_forward_exports_with_no_data_dependent_branch(position_embedding_type: str, attn_implementation: str) -> None:
    """torch.export traces one graph; a Python branch on tensor values (e.g. `if mask.all()`) fails the export or bakes
    the traced padding into the graph. The exported forward must equal eager on other ids and another padding."""
    model = context_lm_with(position_embedding_type, attn_implementation)
    ids, mask = random_ids(3, 10), torch.ones(3, 10, dtype=torch.long)
    mask[0, :4] = 0  # traced with left padding in row 0 only
    exported = torch.export.export(_LogitsOf(model), (ids, mask)).module()
    other_ids, other_mask = random_ids(3, 10), torch.ones(3, 10, dtype=torch.long)
    other_mask[1, :6] = 0  # left padding in another row
    other_mask[2, 7:] = 0  # and right padding
    for test_ids, test_mask in ((ids, mask), (other_ids, other_mask), (other_ids, torch.ones_like(other_mask))):
        with torch.no_grad():
            expected = _LogitsOf(model)(test_ids, test_mask)
            torch.testing.assert_close(exported(test_ids, test_mask), expected, rtol=1e-5, atol=1e-5)
    # the comparison can fail: the padding pattern changes the outputs
    with torch.no_grad():
        assert not torch.allclose(exported(other_ids, other_mask), exported(other_ids, torch.ones_like(other_mask)),
                                  atol=CONTEXT_MARGIN)


def test_attention_maps_and_hidden_states_are_returned() -> None:
    model = tiny_lm()  # sdpa: asking for attention maps falls back to eager for that call
    ids = random_ids(2, 7)
    out = model(ids, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 7, 7)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 7))  # each row is a distribution
    assert torch.all(out.attentions[1].triu(diagonal=1) == 0)  # causal: no looking ahead
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 7, 32)
    torch.testing.assert_close(out.logits, model.lm_head(out.hidden_states[-1]))


# ---------------------------------------------------------------------------------------------- training
def test_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    ids = random_ids(2, 12)
    plain = tiny_lm().train()
    checkpointed = tiny_lm().train()
    checkpointed.load_state_dict(plain.state_dict())
    # renamed in transformers 5.x; the old name still works but warns
    getattr(checkpointed, "activation_checkpointing_enable", checkpointed.gradient_checkpointing_enable)()
    losses, saved = [], []
    for model in (plain, checkpointed):
        count = [0]

        def pack(tensor: torch.Tensor, count=count) -> torch.Tensor:
            count[0] += tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
        saved.append(count[0])
    assert saved[1] < saved[0] / 2  # checkpointing keeps block inputs only; activations are recomputed
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("position_embedding_type", ["rope", "sinusoidal", "learned"])
def test_each_positional_encoding_trains_and_round_trips(position_embedding_type: str, tmp_path: Path) -> None:
    model = tiny_lm(position_embedding_type=position_embedding_type).train()
    ids = random_ids(4, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    model.eval().save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.position_embedding_type == position_embedding_type
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_positional_encodings_make_the_model_order_aware() -> None:
    for kind in ("rope", "sinusoidal", "learned"):
        model = tiny_lm(position_embedding_type=kind)
        ids = random_ids(1, 6)
        swapped = ids[:, [1, 0, 2, 3, 4, 5]]
        # the last position sees the same multiset of tokens; only position information can tell them apart
        assert not torch.allclose(model(ids).logits[:, -1], model(swapped).logits[:, -1]), kind


def test_lora_on_attention_and_mlp_projections_trains_only_the_adapter() -> None:
    from peft import LoraConfig, get_peft_model

    model = tiny_lm().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    wrapped = {name.split(".")[-2] for name, _ in peft_model.named_parameters() if "lora_A" in name}
    assert {n for n, m in peft_model.named_modules() if n.endswith(tuple(targets)) and hasattr(m, "lora_A")}
    assert len([n for n, _ in peft_model.named_parameters() if "lora_A" in n]) == len(targets) * 2  # 2 layers
    del wrapped
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(4, 16)
    losses = []
    for _ in range(6):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    base_state = peft_model.get_base_model().state_dict()
    for key, value in before.items():
        peft_key = key.replace(".weight", ".base_layer.weight") if any(f"{t}.weight" in key for t in targets) else key
        torch.testing.assert_close(base_state[peft_key], value, rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------------------------------------- heads
def test_sequence_classification_pools_the_last_real_token_for_either_padding_side() -> None:
    torch.manual_seed(0)
    model = QuillForSequenceClassification(tiny_config(num_labels=3)).eval()
    ids = random_ids(1, 5)
    pad = torch.zeros(1, 3, dtype=torch.long)
    right = model(torch.cat([ids, pad], 1), attention_mask=torch.tensor([[1] * 5 + [0] * 3])).logits
    left_mask = torch.tensor([[0] * 3 + [1] * 5])
    left = model(torch.cat([pad, ids], 1), attention_mask=left_mask, position_ids=(left_mask.cumsum(-1) - 1).clamp(min=0)).logits
    alone = model(ids).logits
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-5)
    labels = torch.tensor([2])
    torch.testing.assert_close(model(ids, labels=labels).loss, F.cross_entropy(alone, labels))


def test_token_classification_loss_ignores_minus_100() -> None:
    model = QuillForTokenClassification(tiny_config(num_labels=5)).eval()
    ids = random_ids(2, 6)
    labels = torch.randint(0, 5, (2, 6))
    labels[:, 0] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 6, 5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[:, 1:].reshape(-1, 5), labels[:, 1:].reshape(-1)))


def test_quill_with_rope_and_swiglu_computes_exactly_what_llama_computes() -> None:
    """Same parameter names, same maths: Llama's weights load into Quill unchanged and give the same logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    quill = tiny_lm()
    common = {k: getattr(quill.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings")}
    llama = LlamaForCausalLM(LlamaConfig(**common)).eval()
    llama.load_state_dict(quill.state_dict())
    ids, mask = _padded_batch()
    torch.testing.assert_close(quill(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)
    keep = mask.bool()
    torch.testing.assert_close(quill(ids, attention_mask=mask).logits[keep], llama(ids, attention_mask=mask).logits[keep],
                               rtol=1e-5, atol=1e-5)


def test_transformers_text_generation_pipeline_runs_our_model() -> None:
    from transformers import pipeline as hf_pipeline

    from pipeline.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["to be or not to be, that is the question. " * 20], vocab_size=300, min_frequency=1)
    model = tiny_lm(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id)
    tokenizer.padding_side = "left"  # batched generation pads on the left (transformers < 5.24's pipeline does not set it)
    generator = hf_pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator("to be or", max_new_tokens=6, do_sample=False, return_full_text=False)
    ids = tokenizer("to be or", return_tensors="pt")["input_ids"]
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out[0]["generated_text"] == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    prompts = ["to be or", "the question is whether"]
    batch = generator(prompts, max_new_tokens=4, do_sample=False, batch_size=2, return_full_text=False)
    one_by_one = [generator(p, max_new_tokens=4, do_sample=False, return_full_text=False) for p in prompts]
    assert [row[0]["generated_text"] for row in batch] == [row[0]["generated_text"] for row in one_by_one]


def test_flex_attention_inference_matches_eager_with_and_without_padding() -> None:
    """(Flex attention has no backward on CPU; training with it is a GPU path.)"""
    model = tiny_lm()
    ids, mask = _padded_batch()
    keep = mask.bool()
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager, eager_unpadded = model(ids, attention_mask=mask).logits, model(ids).logits
        model.set_attn_implementation("flex_attention")
        assert model.config._attn_implementation == "flex_attention"
        flex, flex_unpadded = model(ids, attention_mask=mask).logits, model(ids).logits
    torch.testing.assert_close(flex[keep], eager[keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(flex_unpadded, eager_unpadded, rtol=1e-4, atol=1e-5)


def test_sdpa_gets_no_mask_tensor_when_causality_is_all_there_is(monkeypatch) -> None:
    """Unpadded, unpacked input keeps sdpa on its mask-free causal kernel; restarting position_ids (packed
    documents) and padding do build a mask. Guards the fast path, which a wrong test order once disabled."""
    from pipeline.models.quill import modeling_quill

    built = []
    original = modeling_quill._attention_mask
    monkeypatch.setattr(modeling_quill, "_attention_mask", lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    model = tiny_lm()
    model.set_attn_implementation("sdpa")
    ids = random_ids(2, 6)
    model(input_ids=ids, use_cache=False)
    assert built[-1] is None
    model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]] * 2), use_cache=False)
    assert built[-1] is not None and built[-1].shape == (2, 1, 6, 6)
    model(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6]), use_cache=False)
    assert built[-1] is not None and not built[-1][0, 0, :, 0][1:].any()  # nobody attends the padding
