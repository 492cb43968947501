"""Quill: a decoder-only transformer in the Llama family, written to be read top-down.

token ids ─► embed_tokens (+ sinusoidal / learned positions) ─► N × QuillDecoderLayer ─► norm ─► lm_head ─► logits
QuillDecoderLayer:  x = x + self_attn(input_layernorm(x))     (RoPE on q and k, grouped-query attention)
                    x = x + mlp(post_attention_layernorm(x))  (SwiGLU: down(silu(gate(x)) * up(x)))

This file is exported next to the weights and loaded with ``trust_remote_code=True`` on machines where the
``pipeline`` package is absent, so it imports only torch, transformers' stable public API and
``.configuration_quill``. Masks are built here rather than with transformers' mask helpers, whose signatures
changed within 5.x.
The KV cache is called ``cache`` from transformers 5.24 on and ``past_key_values`` before: the model accepts both
and returns it under the name the installed version's output classes declare.
Shapes in comments: B batch, T query length, S key length (cache + T), H heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_quill import QuillConfig

# The output field that holds the KV cache: `cache` from transformers 5.24, `past_key_values` before. `generate()`
# reads the cache back from the model's output under this name, so returning it under the other one loses it.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache under either name (`generate()` passes `cache=` from transformers 5.24, `past_key_values=` before)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the KV cache once, as `cache` (transformers >= 5.24) or `past_key_values`, not both")
    if past_key_values is not None and CACHE_FIELD == "cache":
        # As transformers' own models do from 5.24 on (its common test `test_bc_cache_name_forward` checks this).
        warnings.warn("`past_key_values` is deprecated from transformers 5.24 on: pass the KV cache as `cache`",
                      FutureWarning, stacklevel=3)
    return cache if cache is not None else past_key_values


def _cache_capacity(cache: Cache | None) -> int | None:
    """Slots of a fixed-size (static) cache, whose keys always come back at full length; None for a growing cache."""
    layers = getattr(cache, "layers", None)
    if not layers or not getattr(layers[0], "is_compileable", False):
        return None
    return layers[0].max_cache_len


class QuillRMSNorm(nn.Module):
    """Root-mean-square norm: rescales each vector to unit RMS, then by a learned gain (no mean, no bias)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.float()  # the mean of squares overflows/underflows in half precision
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


# ----------------------------------------------------------------------------------------------------------------
# Positional encodings. Frequencies are recomputed on every forward (a few hundred floats) instead of kept in
# non-persistent buffers, which `from_pretrained` would leave uninitialised.
# ----------------------------------------------------------------------------------------------------------------
def inverse_frequencies(dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """1 / base^(2i/dim) for i < dim/2: the angular speeds shared by RoPE and the sinusoidal encoding."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def sinusoidal_positions(position_ids: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed encoding of "Attention Is All You Need": [sin(p·ω), cos(p·ω)] per position. (B, T) -> (B, T, dim)."""
    angles = position_ids[..., None].float() * inverse_frequencies(dim, base, position_ids.device)
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


class QuillRotary(nn.Module):
    """Rotary position embedding (RoPE): rotates each (q, k) pair of channels by an angle proportional to the
    position, so q·k depends only on the relative distance between tokens."""

    def __init__(self, config: QuillConfig):
        super().__init__()
        self.dim = config.head_dim
        self.base = config.rope_theta

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * inverse_frequencies(self.dim, self.base, x.device)  # (B, T, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, D)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q: (B, H, T, D), k: (B, K, T, D), cos/sin: (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------
def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, K, S, D) -> (B, K * n_rep, S, D): each key/value head serves n_rep query heads (grouped-query attention)."""
    if n_rep == 1:
        return hidden_states
    b, k, s, d = hidden_states.shape
    return hidden_states[:, :, None].expand(b, k, n_rep, s, d).reshape(b, k * n_rep, s, d)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ · scaling + mask) v, written out so the attention map can be returned and inspected."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, S)
    if attention_mask is not None:
        scores = scores + attention_mask  # additive: 0 where allowed, dtype-min where masked
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, H, D)
    return output, weights


class QuillAttention(nn.Module):
    """Multi-head self-attention with grouped key/value heads and a KV cache."""

    def __init__(self, config: QuillConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        cache: Cache | None = None,
        cache_slots: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`cache_slots` (T,) are the cache positions the new keys go to; static caches of transformers < 5.24 need
        them (later versions track the position themselves and ignore them)."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, D)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, K, T, D)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, K, T, D)
        if position_embeddings is not None:  # RoPE; absolute encodings were added to the embeddings instead
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, {"cache_position": cache_slots})  # (B, K, S, D)

        implementation = _effective_implementation(self.config, output_attentions)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        output = self.o_proj(output.reshape(*input_shape, -1).contiguous())
        return output, weights


def _effective_implementation(config: QuillConfig, output_attentions: bool) -> str:
    """Fused kernels never materialise the attention map: asking for it falls back to eager for that call."""
    implementation = config._attn_implementation
    return "eager" if output_attentions or implementation is None else implementation


def _block_mask(allowed: torch.Tensor):
    """A (B, 1, T, S) boolean mask as flex attention's BlockMask (dense masks crash its CPU path)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return allowed[b, 0, q, kv]

    batch, _, q_len, kv_len = allowed.shape
    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=allowed.device)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" mask -> additive mask for eager softmax attention."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class QuillMLP(nn.Module):
    """Position-wise feed-forward layer: gated (SwiGLU with silu) or plain (two layers with an activation)."""

    def __init__(self, config: QuillConfig):
        super().__init__()
        self.gated = config.mlp_type == "gated"
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


class QuillDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block. `GradientCheckpointingLayer` recomputes it in backward when checkpointing is on."""

    def __init__(self, config: QuillConfig, layer_idx: int):
        super().__init__()
        self.self_attn = QuillAttention(config, layer_idx)
        self.mlp = QuillMLP(config)
        self.input_layernorm = QuillRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = QuillRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            cache=cache,
            output_attentions=output_attentions,
            **kwargs,
        )
        hidden_states = hidden_states + self.dropout(attn_out)
        hidden_states = hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))
        return hidden_states, attn_weights


class QuillPreTrainedModel(PreTrainedModel):
    config_class = QuillConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QuillDecoderLayer"]  # FSDP wraps, and device maps split, at block boundaries
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # DynamicCache; a static cache is not wired up


class QuillModel(QuillPreTrainedModel):
    """The transformer body: token ids -> final hidden states (B, T, hidden_size)."""

    def __init__(self, config: QuillConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        if config.position_embedding_type == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.rotary_emb = QuillRotary(config) if config.position_embedding_type == "rope" else None
        self.embed_dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList(QuillDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = QuillRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """`attention_mask` is (B, S) with 1 for real tokens and 0 for padding, or a ready (B, 1, T, S) mask (boolean
        "may attend", or additive). Without it, `position_ids` that restart at 0 inside a row mark packed documents,
        which then do not attend to each other (as in transformers). The KV cache comes as `cache` or
        `past_key_values`."""
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        cache = _one_cache(cache, past_key_values)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        seq_length = inputs_embeds.shape[1]
        capacity = _cache_capacity(cache)
        past_length = cache.get_seq_length() if cache is not None else 0  # a tensor for static caches
        cache_slots = kwargs.pop("cache_position", None)  # transformers < 5.24 still passes it
        if cache_slots is None:
            cache_slots = torch.arange(seq_length, device=inputs_embeds.device) + past_length  # (T,)
        # Only caller-given position_ids can mark packed documents (the default ones never restart).
        packed_documents = attention_mask is None and position_ids is not None and capacity is None and past_length == 0
        if position_ids is None:
            position_ids = cache_slots[None]
        implementation = _effective_implementation(self.config, output_attentions)
        key_length = capacity if capacity is not None else past_length + seq_length
        mask = _attention_mask(implementation, attention_mask, position_ids, packed_documents, cache_slots, key_length,
                               capacity is not None, inputs_embeds)

        hidden_states = inputs_embeds
        position_embeddings = None
        if self.config.position_embedding_type == "rope":
            position_embeddings = self.rotary_emb(hidden_states, position_ids)
        elif self.config.position_embedding_type == "learned":
            hidden_states = hidden_states + self.embed_positions(position_ids)
        else:
            hidden_states = hidden_states + sinusoidal_positions(position_ids, self.config.hidden_size).to(hidden_states.dtype)
        hidden_states = self.embed_dropout(hidden_states)

        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, attn_weights = layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                cache=cache,
                cache_slots=cache_slots,
                output_attentions=output_attentions,
                position_ids=position_ids,  # flash-attention uses it to find packed documents
                **kwargs,
            )
            if output_attentions:
                all_attentions += (attn_weights,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            **{CACHE_FIELD: cache if use_cache else None},
        )
        return output if return_dict is not False else output.to_tuple()


def _attention_mask(
    implementation: str,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    packed_documents: bool,
    query_slots: torch.Tensor,
    key_length: int,
    fixed_size_cache: bool,
    inputs_embeds: torch.Tensor,
):
    """The mask each attention kernel wants: None where a fused causal kernel suffices, the 2-D padding mask for
    flash-attention, a boolean (B, 1, T, S) "may attend" mask for sdpa, an additive one for eager, a BlockMask for
    flex. Query t sits at cache slot `query_slots[t]`; the keys are cache slots 0..S-1. Every branch depends on
    shapes and settings only, never on tensor values, so the forward traces under torch.compile and torch.export."""
    seq_length = inputs_embeds.shape[1]
    if implementation.startswith("flash"):
        if attention_mask is not None and attention_mask.dim() == 4:
            raise ValueError("flash-attention takes a 2-D padding mask; use sdpa or eager for a 4-D attention mask")
        return attention_mask  # None for unpadded input; packed documents travel as position_ids
    # sdpa's own causal handling needs no mask tensor (its fastest kernel) when every key slot is real: with no cache
    # or a growing one, for a whole sequence (is_causal) or one new token (which may see everything).
    every_slot_real = not fixed_size_cache and (key_length == seq_length or seq_length == 1)
    if attention_mask is None and not packed_documents and implementation == "sdpa" and every_slot_real:
        return None

    key_slots = torch.arange(key_length, device=inputs_embeds.device)
    if attention_mask is not None and attention_mask.dim() == 4:
        allowed = attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask == 0
    else:
        allowed = (key_slots[None, :] <= query_slots[:, None])[None, None]  # causal, (1, 1, T, S)
        if attention_mask is not None:
            padding = attention_mask.bool()[:, :key_length]  # (B, tokens so far); unfilled static slots are causal-masked
            padding = F.pad(padding, (0, key_length - padding.shape[-1]), value=False)
            allowed = allowed & padding[:, None, None, :]
        if packed_documents:
            document = torch.cumsum(position_ids == 0, dim=-1)  # (B, T): a new document starts at each position 0
            allowed = allowed & (document[:, None, :, None] == document[:, None, None, :])
    # A padding query may attend nothing; letting it see itself avoids NaNs from an all-masked softmax row.
    allowed = allowed | (key_slots[None, :] == query_slots[:, None])[None, None]
    if implementation == "sdpa":
        return allowed
    if implementation == "flex_attention":
        return _block_mask(allowed.expand(inputs_embeds.shape[0], -1, -1, -1))
    return _additive(allowed, inputs_embeds.dtype)


class QuillForCausalLM(QuillPreTrainedModel, GenerationMixin):
    """Body + `lm_head`, the projection of each hidden state onto the vocabulary (softmax gives next-token odds)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: QuillConfig):
        super().__init__(config)
        self.model = QuillModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """`labels` are the input ids (shifted inside the loss); -100 marks positions without a target.
        `shift_labels` are targets already aligned with the positions (label t is what position t predicts), as
        sequence- and context-parallel training hands them over; they take the place of `labels`.
        `num_items_in_batch` is the number of target tokens in the whole accumulation window: the loss is then a sum
        divided by it, so gradient accumulation over uneven micro-batches matches one big batch."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        # Generation only needs the last position's logits: skip the (T, vocab) projection for the rest.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None or shift_labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch, shift_labels=shift_labels)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return output if return_dict is not False else output.to_tuple()


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[t + 1] (or shift_labels[t]); -100 targets are ignored.
    In fp32 for stability."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
    shift_labels = shift_labels.to(logits.device)
    logits = logits.float().reshape(-1, logits.shape[-1])
    if num_items_in_batch is None:
        # A micro-batch with no target at all would be 0/0 with mean reduction: return a graph-connected zero.
        n_targets = (shift_labels != -100).sum().clamp(min=1)
    else:
        n_targets = torch.as_tensor(num_items_in_batch, device=logits.device)
    return F.cross_entropy(logits, shift_labels.reshape(-1), ignore_index=-100, reduction="sum") / n_targets


def _last_token_index(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, pad_token_id: int | None,
                      batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Index of the last real token per row, for left or right padding alike (the argmax of position·mask)."""
    if attention_mask is None and input_ids is not None and pad_token_id is not None:
        attention_mask = (input_ids != pad_token_id).long()
    if attention_mask is None:
        return torch.full((batch,), length - 1, device=device)
    positions = torch.arange(attention_mask.shape[-1], device=device)
    return (positions * attention_mask.to(device).long()).argmax(-1)


class QuillForSequenceClassification(QuillPreTrainedModel):
    """Classifies a sequence from the hidden state of its last real token (the only one that has seen all others)."""

    def __init__(self, config: QuillConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = QuillModel(config)  # built explicitly: Auto-built backbones fail under trust_remote_code
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        batch, length = hidden_states.shape[:2]
        last = _last_token_index(input_ids, attention_mask, self.config.pad_token_id, batch, length, hidden_states.device)
        logits = self.score(hidden_states[torch.arange(batch, device=hidden_states.device), last])  # (B, num_labels)

        loss = None
        if labels is not None:
            loss = _classification_loss(self.config, logits, labels)
        output = SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict is not False else output.to_tuple()


def _classification_loss(config: QuillConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Regression for one label, multi-label BCE when asked for, single-label cross-entropy otherwise."""
    problem_type = config.problem_type
    if problem_type is None:
        problem_type = "regression" if config.num_labels == 1 else "single_label_classification"
    if problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float().view(-1, config.num_labels), labels.view(-1).to(logits.device))


class QuillForTokenClassification(QuillPreTrainedModel):
    """One label per token (named-entity recognition is the classic use)."""

    def __init__(self, config: QuillConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = QuillModel(config)
        classifier_dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(classifier_dropout if classifier_dropout is not None else config.hidden_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TokenClassifierOutput | tuple:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        logits = self.score(self.dropout(outputs.last_hidden_state))  # (B, T, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1).to(logits.device), ignore_index=-100)
        output = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict is not False else output.to_tuple()


__all__ = [
    "QuillPreTrainedModel",
    "QuillModel",
    "QuillForCausalLM",
    "QuillForSequenceClassification",
    "QuillForTokenClassification",
]
