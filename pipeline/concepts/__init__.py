"""See inside a trained model: the concepts the pipeline is built from, as functions and `pipeline inspect` commands.

    tokens      text → subwords → ids (and the bytes each stands for)                          basics.py
    params      parameter counts per component (embeddings, attention, feed-forward, norms, head, LoRA adapter)
    similar     nearest tokens in embedding space, by cosine similarity or dot product        embeddings.py
    analogy     "A is to B as C is to ?": the tokens nearest to B − A + C
    similarity  sentence embeddings (pooled hidden states) and bags of words, pairwise cosine and dot product
    context     one word in several sentences: its vectors layer by layer, and how alike they are  context.py
    positions   the positional encoding (sinusoidal table, learned table, or RoPE rotation angles)  positions.py
    attention   attention maps (queries × keys) of every layer and head, in one grid          attention.py
    next        the softmax over the vocabulary for the next token                            decoding.py
    decode      greedy, temperature, top-k and top-p decoding of the same prompt side by side

Every function takes a causal LM (a Quill, a Llama saved by transformers, either with a PEFT adapter) and its
tokenizer; every command a model folder (or Hub id), with ``--adapter``, ``--json``, and ``--help`` examples.
"""

from pipeline.concepts.attention import attention_maps, plot_attention, top_attended
from pipeline.concepts.basics import parameter_counts, tokenize_table
from pipeline.concepts.command import inspect_command
from pipeline.concepts.context import (
    WordInContext,
    find_word,
    layer_similarities,
    plot_context,
    word_in_context,
)
from pipeline.concepts.decoding import (
    DECODING,
    decode_side_by_side,
    next_token_distribution,
)
from pipeline.concepts.embeddings import (
    POOLINGS,
    analogy,
    bag_of_words_embeddings,
    embedding_similarity,
    pairwise,
    plot_similarity,
    sentence_embeddings,
    similarity,
)
from pipeline.concepts.positions import (
    plot_positions,
    position_kind,
    positional_encoding,
    rope_frequencies,
)
from pipeline.models import quill  # noqa: F401  (registers Quill: AutoModelForCausalLM must know it)

__all__ = [
    "DECODING", "POOLINGS", "WordInContext", "analogy", "attention_maps", "bag_of_words_embeddings",
    "decode_side_by_side", "embedding_similarity", "find_word", "inspect_command", "layer_similarities",
    "next_token_distribution", "pairwise", "parameter_counts", "plot_attention", "plot_context", "plot_positions",
    "plot_similarity", "position_kind", "positional_encoding", "rope_frequencies", "sentence_embeddings",
    "similarity", "tokenize_table", "top_attended", "word_in_context",
]
