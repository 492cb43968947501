"""How a model encodes positions: the table added to the input embeddings (sinusoidal, learned), or for RoPE the
angle by which each pair of query/key channels is turned at each position."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from pipeline.concepts._shared import base_model, check_length, pyplot, save


def position_kind(model: torch.nn.Module) -> str:
    """``rope``, ``sinusoidal`` or ``learned``: a Quill says so in its config; another model with a rotary
    module (a Llama) is ``rope``."""
    inner = base_model(model)
    kind = getattr(inner.config, "position_embedding_type", None)
    if kind in ("rope", "sinusoidal", "learned"):
        return kind
    if hasattr(_body(inner), "rotary_emb"):
        return "rope"
    raise ValueError(f"cannot tell how {type(inner).__name__} encodes positions (no position_embedding_type, no "
                     "rotary_emb). Fix: `inspect positions` reads Quill and Llama-style (RoPE) models.")


def _body(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "model", model)


def rope_frequencies(model: torch.nn.Module) -> torch.Tensor:
    """(head_dim / 2,) angular speed of each channel pair, θ^(−2i/d): the rotary module's own ``inv_freq``
    (a Llama's, scaling included), else Quill's formula from its file (ours, or its remote-code copy)."""
    inner = base_model(model)
    rotary = _body(inner).rotary_emb
    if isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        return rotary.inv_freq.detach().float().cpu()
    modeling = sys.modules[type(rotary).__module__]
    return modeling.inverse_frequencies(inner.config.head_dim, inner.config.rope_theta)


def positional_encoding(model: torch.nn.Module, length: int) -> torch.Tensor:
    """(length, d) view of how positions are encoded: the added table for sinusoidal/learned encodings, or the
    rotation angle in radians (position × frequency, not wrapped) per position and frequency pair for RoPE
    (d = head_dim / 2)."""
    inner = base_model(model)
    kind = position_kind(inner)
    check_length(length, inner.config, "--length")
    positions = torch.arange(length)
    body = _body(inner)
    if kind == "learned":
        return body.embed_positions.weight[:length].detach().float()
    if kind == "sinusoidal":
        modeling = sys.modules[type(body).__module__]
        return modeling.sinusoidal_positions(positions[None], inner.config.hidden_size)[0]
    return positions[:, None].float() * rope_frequencies(inner)[None]


AXES = {  # kind: (x axis, colour bar)
    "rope": (r"frequency pair $i$ (turned by $\theta^{-2i/d}$ radians per position)", "rotation angle mod 2π (radians)"),
    "sinusoidal": (r"channel (first half $\sin(p\,\omega_i)$, second half $\cos(p\,\omega_i)$)",
                   "value added to the token embedding"),
    "learned": ("channel", "value added to the token embedding (learned)"),
}


def plot_positions(table: torch.Tensor, kind: str, path: Path, title: str) -> Path:
    """RoPE angles are drawn mod 2π on a cyclic colour map (an angle and that angle + 2π turn a pair alike); the
    added tables on a diverging map centred on 0."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    values = table.numpy()
    if kind == "rope":
        image = ax.imshow(values % (2 * math.pi), aspect="auto", cmap="twilight", vmin=0, vmax=2 * math.pi,
                          interpolation="nearest")
        bar = fig.colorbar(image, ax=ax, label=AXES[kind][1])
        bar.set_ticks([0, math.pi / 2, math.pi, 3 * math.pi / 2, 2 * math.pi], labels=["0", "π/2", "π", "3π/2", "2π"])
    else:
        limit = float(abs(values).max()) or 1.0
        image = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        fig.colorbar(image, ax=ax, label=AXES[kind][1])
    ax.set_xlabel(AXES[kind][0])
    ax.set_ylabel("position")
    ax.set_title(title, fontsize=10)
    return save(fig, path)
