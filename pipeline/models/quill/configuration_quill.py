"""Configuration of Quill, the pipeline's own decoder-only transformer.

This file is exported next to the weights (``trust_remote_code=True``): it imports nothing but
transformers.
"""

from transformers import PretrainedConfig

POSITION_EMBEDDING_TYPES = ("rope", "sinusoidal", "learned")

# Where each Auto class finds Quill in an exported folder. `save_pretrained` writes only the saved class's entry;
# keeping all of them lets one exported folder load as any head with `trust_remote_code=True`.
AUTO_MAP = {
    "AutoConfig": "configuration_quill.QuillConfig",
    "AutoModel": "modeling_quill.QuillModel",
    "AutoModelForCausalLM": "modeling_quill.QuillForCausalLM",
    "AutoModelForSequenceClassification": "modeling_quill.QuillForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_quill.QuillForTokenClassification",
}
HIDDEN_ACTS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


class QuillConfig(PretrainedConfig):
    r"""Hyper-parameters of a Quill model. Field names follow Llama's, so transformers users and tools
    (PEFT, FSDP, vLLM-style inspection) find them where they expect.

    Args:
        vocab_size: number of token ids the embedding and the output softmax cover.
        hidden_size: width of the residual stream.
        intermediate_size: width of the feed-forward layer.
        num_hidden_layers: number of decoder blocks.
        num_attention_heads: query heads per block.
        num_key_value_heads: key/value heads (grouped-query attention); ``None`` means one per query
            head (multi-head attention), 1 means multi-query attention.
        head_dim: width of one head; defaults to ``hidden_size // num_attention_heads``.
        hidden_act: activation of the gated MLP (``silu`` gives SwiGLU).
        mlp_type: ``gated`` (SwiGLU-style, ``down(act(gate(x)) * up(x))``) or ``plain`` (``down(act(up(x)))``
            as in the original Transformer).
        position_embedding_type: ``rope`` (rotary, default), ``sinusoidal`` (fixed, added to the token
            embeddings as in "Attention Is All You Need") or ``learned`` (a trained table, as in GPT-2).
        max_position_embeddings: longest sequence the positional encoding is built for.
        rope_theta: base of the rotary frequencies.
        rms_norm_eps: epsilon of the RMSNorm layers.
        attention_bias / mlp_bias: biases on the attention / MLP projections.
        attention_dropout, hidden_dropout, embedding_dropout: dropout probabilities (0 for pretraining
            small models on little data is rarely right; 0 is still the default, as in Llama).
        initializer_range: standard deviation of the normal initialisation of linear and embedding weights.
        tie_word_embeddings: share the input embedding matrix with the output projection ``lm_head``.
        use_cache: return a KV cache from the forward pass (generation).
    """

    model_type = "quill"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 8192,
        hidden_size: int = 256,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        mlp_type: str = "gated",
        position_embedding_type: str = "rope",
        max_position_embeddings: int = 1024,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        embedding_dropout: float = 0.0,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        if head_dim is None:
            head_dim = hidden_size // num_attention_heads
        if intermediate_size is None:
            # Llama's rule: 2/3 of 4h for a gated MLP keeps the parameter count of a plain 4h MLP,
            # rounded up to a multiple of 64 for efficient matmuls.
            intermediate_size = 4 * hidden_size if mlp_type == "plain" else 64 * -(-(8 * hidden_size // 3) // 64)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.mlp_type = mlp_type
        self.position_embedding_type = position_embedding_type
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        self.embedding_dropout = embedding_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self._refuse_rope_scaling(kwargs)
        self._validate()
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @staticmethod
    def _refuse_rope_scaling(kwargs: dict) -> None:
        """Quill's RoPE is the plain one (`rope_theta` only). A scaling request (linear, dynamic, YaRN, ...) would be
        stored and silently ignored by the model, so it is refused instead."""
        for key in ("rope_scaling", "rope_parameters"):
            value = kwargs.get(key)
            if isinstance(value, dict) and value.get("rope_type", value.get("type", "default")) != "default":
                raise ValueError(
                    f"{key}={value!r}: Quill implements plain RoPE only (set rope_theta to change its base); "
                    "remove the scaling, or export the model as Llama to use transformers' RoPE scaling"
                )

    def _validate(self) -> None:
        """Reject impossible shapes here, with the fix, instead of as a reshape error deep in forward."""
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"position_embedding_type={self.position_embedding_type!r} is not one of {POSITION_EMBEDDING_TYPES}"
            )
        if self.mlp_type not in ("gated", "plain"):
            raise ValueError(f"mlp_type={self.mlp_type!r} must be 'gated' or 'plain'")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.position_embedding_type == "sinusoidal" and self.hidden_size % 2:
            raise ValueError(f"sinusoidal positions need an even hidden_size, got {self.hidden_size}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


__all__ = ["QuillConfig"]
