"""A picture of cross-attention: output tokens (rows) against source tokens (columns), saved as PNG."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor


def plot_attention(alignment: Tensor, src_pieces: list[str], out_pieces: list[str], path: Path) -> Path:
    """Save alignment (T, S) as a heat map labelled with the pieces; returns path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    T, S = alignment.shape
    if (T, S) != (len(out_pieces), len(src_pieces)):
        raise ValueError(f"alignment is {T}x{S} but there are {len(out_pieces)}x{len(src_pieces)} labels")
    fig = Figure(figsize=(2.0 + 0.35 * S, 1.5 + 0.35 * T))
    FigureCanvasAgg(fig)  # render with Agg, whatever backend pyplot is set to
    ax = fig.add_subplot()
    image = ax.imshow(alignment.float().numpy(), cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(S), labels=src_pieces, rotation=90)
    ax.set_yticks(range(T), labels=out_pieces)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    fig.colorbar(image, ax=ax, label="attention")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
