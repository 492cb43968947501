"""`pipeline inspect WHAT MODEL ...`: load the model (with ``--adapter``), run one view, print it as text or as one
JSON object (``--json``), and say where its PNG went. The arguments are declared in `pipeline.cli`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.concepts import (
    attention,
    basics,
    context,
    decoding,
    embeddings,
    positions,
)
from pipeline.concepts._shared import base_model

Model, Tokenizer, Args = torch.nn.Module, PreTrainedTokenizerBase, argparse.Namespace
Result = tuple[dict[str, Any], str]  # the view as JSON data, and as text for the terminal
View = Callable[[Model, Tokenizer, Args], Result]


def inspect_command(args: argparse.Namespace) -> int:
    """A user's mistake (a folder that holds no model, a word of several tokens, a layer the model lacks, a prompt
    too long, a word missing from a sentence) raises `ValueError` or `OSError` with the fix; the CLI prints it.
    Whatever can be checked without the model is checked before it loads."""
    from pipeline.artifacts import model_folder_problem, tokenizer_folder_problem

    _check_arguments(args)
    problem = tokenizer_folder_problem(args.model) if args.what == "tokens" else model_folder_problem(args.model)
    if problem:
        raise ValueError(f"model {problem}")
    if args.what == "tokens":
        from pipeline.loading import load_tokenizer

        data, text = _tokens(None, load_tokenizer(args.model), args)
    else:
        from pipeline.inference import load_for_inference

        model, tokenizer = load_for_inference(args.model, getattr(args, "adapter", None))
        data, text = VIEWS[args.what](model, tokenizer, args)
    print(json.dumps(data, ensure_ascii=False) if args.json else text)
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    if args.what == "similarity" and len(args.texts) < 2:
        raise ValueError("give at least two TEXTs to compare (each is one quoted argument)")
    if args.what == "context":
        if len(args.sentences) < 2:
            raise ValueError("give WORD and at least two SENTENCEs that contain it")
        for sentence in args.sentences:
            context.find_word(args.word, sentence)


def _name(args: argparse.Namespace) -> str:
    adapter = getattr(args, "adapter", None)
    return f"{args.model}" + (f" + adapter {adapter}" if adapter else "")


def _ranked(rows: list[tuple[str, float]], key: str = "score") -> tuple[list[dict[str, Any]], str]:
    return [{"token": t, key: s} for t, s in rows], "\n".join(f"{s:8.4f}  {t!r}" for t, s in rows)


# ---------------------------------------------------------------------------------------------------- views
def _tokens(model: Model | None, tokenizer: Tokenizer, args: Args) -> Result:
    rows = basics.tokenize_table(tokenizer, args.text)
    return {"text": args.text, "tokens": rows}, "\n".join(f"{r['id']:>7}  {r['token']!r}" for r in rows)


def _params(model: Model, tokenizer: Tokenizer, args: Args) -> Result:
    counts = basics.parameter_counts(model)
    last = ("LoRA adapter", "total")  # the adapter after the base model's parts, then the total
    counts = {name: counts[name] for name in sorted(counts, key=lambda name: last.index(name) if name in last else -1)}
    return {"model": _name(args), "counts": counts}, "\n".join(f"{k:>20}: {v:,}" for k, v in counts.items())


def _similar(model: Model, tokenizer: Tokenizer, args: Args) -> Result:
    data, text = _ranked(embeddings.embedding_similarity(model, tokenizer, args.text, args.top, args.metric))
    return {"token": args.text, "metric": args.metric, "neighbours": data}, text


def _analogy(model: Model, tokenizer: Tokenizer, args: Args) -> Result:
    data, text = _ranked(embeddings.analogy(model, tokenizer, args.a, args.b, args.c, args.top))
    query = f"{args.b!r} − {args.a!r} + {args.c!r}"
    return ({"a": args.a, "b": args.b, "c": args.c, "nearest": data},
            f"{args.a!r} is to {args.b!r} as {args.c!r} is to ...  (cosine to {query}; the three left out)\n{text}")


def _similarity(model: Model, tokenizer: Tokenizer, args: Args) -> Result:
    vectors = {f"contextual ({args.pooling} pooling)": embeddings.sentence_embeddings(model, tokenizer, args.texts,
                                                                                       args.pooling)}
    if args.bag_of_words:
        vectors["bag of words (summed input embeddings)"] = embeddings.bag_of_words_embeddings(model, tokenizer,
                                                                                              args.texts)
    matrices = {kind: embeddings.pairwise(v) for kind, v in vectors.items()}
    png = None
    if args.png:
        png = str(embeddings.plot_similarity(matrices, args.texts, args.png, f"sentence similarity · {_name(args)}"))
    lines = [f"[{i + 1}] {t!r}" for i, t in enumerate(args.texts)]
    for kind, pair in matrices.items():
        for metric, matrix in pair.items():
            lines += ["", f"{kind}, {metric}:", _matrix(matrix)]
    if png:
        lines += ["", f"wrote {png}"]
    data = {"texts": args.texts, "pooling": args.pooling, "png": png,
            "matrices": {kind: {m: x.tolist() for m, x in pair.items()} for kind, pair in matrices.items()}}
    return data, "\n".join(lines)


def _matrix(matrix: torch.Tensor) -> str:
    n = len(matrix)
    width = max(8, max(len(f"{v:.3f}") for v in matrix.flatten().tolist()) + 2)
    rows = ["     " + "".join(f"{f'[{j + 1}]':>{width}}" for j in range(n))]
    rows += [f"{f'[{i + 1}]':<5}" + "".join(f"{v:>{width}.3f}" for v in matrix[i].tolist()) for i in range(n)]
    return "\n".join(rows)


def _context(model: Model, tokenizer: Tokenizer, args: Args) -> Result:
    found = context.word_in_context(model, tokenizer, args.word, args.sentences)
    pairs, cosines = context.layer_similarities(found)
    names = context.layer_names(cosines.shape[0])
    png = str(context.plot_context(args.word, found, pairs, cosines, args.png,
                                   f"{args.word.strip()!r} in context · {_name(args)}"))
    lines = [f"[{i + 1}] {f.sentence!r}  ({args.word.strip()!r} = pieces {f.pieces})" for i, f in enumerate(found)]
    lines += ["", f"cosine similarity of the vectors of {args.word.strip()!r}, per layer:",
              f"{'layer':<12}" + "".join(f"{f'{i + 1} vs {j + 1}':>10}" for i, j in pairs)]
    lines += [f"{name:<12}" + "".join(f"{v:>10.4f}" for v in row) for name, row in zip(names, cosines.tolist())]
    if len({tuple(f.pieces) for f in found}) > 1:
        lines.append("note: the word is different tokens in some sentences, so its layer-0 vectors differ too")
    if getattr(base_model(model).config, "position_embedding_type", None) in ("learned", "sinusoidal"):
        lines.append("note: this model adds absolute positions at the input, so layer 0 differs where the word sits "
                     "at different positions")
    lines += ["", f"wrote {png}"]
    data = {"word": args.word, "sentences": args.sentences, "pieces": [f.pieces for f in found], "layers": names,
            "pairs": [list(p) for p in pairs], "cosine": cosines.tolist(), "png": png}
    return data, "\n".join(lines)


def _positions(model: Model, tokenizer: Tokenizer, args: Args) -> Result:
    table = positions.positional_encoding(model, args.length)
    kind = positions.position_kind(model)
    titles = {"rope": f"RoPE rotation angles of the {table.shape[1]} query/key channel pairs of each head",
              "sinusoidal": "sinusoidal positions added to the embeddings", "learned": "learned position embeddings"}
    png = str(positions.plot_positions(table, kind, args.png, f"{titles[kind]}\n{_name(args)}"))
    what = "rotation angle (radians, not wrapped) per position × frequency pair" if kind == "rope" else \
        "value added per position × channel"
    data = {"kind": kind, "shape": list(table.shape), "values": what, "table": table.tolist(), "png": png}
    return data, f"wrote {png} ({kind}: {what}, {tuple(table.shape)})"


MAX_MAPS = 64  # one figure of 8 × 8 maps is still readable


def _attention(model: Model, tokenizer: Tokenizer, args: Args) -> Result:
    config = base_model(model).config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    if args.layer is not None and args.layer >= layers:
        raise ValueError(f"--layer {args.layer}: the model has layers 0..{layers - 1}. Fix: pick one of those.")
    if args.head is not None and args.head >= heads:
        raise ValueError(f"--head {args.head}: the model has heads 0..{heads - 1}. Fix: pick one of those.")
    chosen_layers = list(range(layers)) if args.layer is None else [args.layer]
    chosen_heads = list(range(heads)) if args.head is None else [args.head]
    if len(chosen_layers) * len(chosen_heads) > MAX_MAPS:
        raise ValueError(f"one grid of {layers} layers × {heads} heads would be {layers * heads} maps, too many to "
                         f"read (at most {MAX_MAPS}). Fix: pick --layer L (its heads) or --head H (across layers).")
    maps, tokens = attention.attention_maps(model, tokenizer, args.text)
    png = str(attention.plot_attention(maps, tokens, args.png, layers=chosen_layers, heads=chosen_heads,
                                       title=f"attention · {_name(args)}\n{args.text!r}"))
    summary = [row for row in attention.top_attended(maps, tokens, args.top)
               if row["layer"] in chosen_layers and row["head"] in chosen_heads]
    lines = ["share of each head's attention (mean over queries) on its top keys; mean weight on the first token, "
             "the previous one, the query itself:"]
    for row in summary:
        top = "  ".join(f"{t['token']!r}@{t['position']} {t['share']:.2f}" for t in row["top"])
        lines.append(f"layer {row['layer']} head {row['head']}:  {top}   | first {row['first']:.2f}  "
                     f"previous {row['previous']:.2f}  self {row['self']:.2f}")
    lines += ["", f"wrote {png} ({_count(chosen_layers, 'layer')} × {_count(chosen_heads, 'head')}, "
                  f"{len(tokens)} tokens)"]
    data = {"tokens": tokens, "layers": chosen_layers, "heads": chosen_heads, "heads_summary": summary,
            "maps": maps[chosen_layers][:, chosen_heads].tolist(), "png": png}
    return data, "\n".join(lines)


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"


def _next(model: Model, tokenizer: Tokenizer, args: Args) -> Result:
    data, text = _ranked(decoding.next_token_distribution(model, tokenizer, args.text, args.top, args.temperature),
                         key="probability")
    if args.temperature == 0:
        text = "temperature 0: greedy decoding, all the probability on the most likely token\n" + text
    return {"text": args.text, "temperature": args.temperature, "next": data}, text


def _decode(model: Model, tokenizer: Tokenizer, args: Args) -> Result:
    outputs = decoding.decode_side_by_side(model, tokenizer, args.text, args.max_new_tokens)
    return ({"prompt": args.text, "completions": outputs},
            "\n".join(f"--- {name}\n{args.text}{text}" for name, text in outputs.items()))


VIEWS: dict[str, View] = {
    "params": _params, "similar": _similar, "analogy": _analogy, "similarity": _similarity, "context": _context,
    "positions": _positions, "attention": _attention, "next": _next, "decode": _decode,
}
