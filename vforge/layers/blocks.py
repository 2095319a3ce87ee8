"""Blocks composed from the other layers: stochastic depth, the feed-forward block, the transformer block."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from vforge.layers.activations import get_activation, glu_factor
from vforge.layers.dropout import Dropout
from vforge.layers.norms import LayerScale, get_norm


def check_transformer_sizes(*, n_blocks: int, d_block: int, attention_n_heads: int) -> None:
    """The size rules of every transformer-family model, checked at the top of its ``__init__``."""
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks=}")
    if d_block % attention_n_heads:
        raise ValueError(f"d_block must be a multiple of attention_n_heads, got {d_block=}, {attention_n_heads=}")


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per row with probability ``p`` and rescale the kept ones by
    1 / (1 - p) (Huang et al. 2016, https://arxiv.org/abs/1603.09382). Identity in eval mode.

    Shape:
        x: (batch, ...)
        returns: (batch, ...)
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p=}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((len(x),) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FeedForward(nn.Module):
    """Linear(d, d_hidden * g) -> activation -> dropout -> Linear(d_hidden, d_out), g = 2 for GLU activations.

    Shape:
        x: (..., d_in)
        returns: (..., d_out)
    """

    def __init__(self, d_in: int, d_hidden: int, d_out: int | None = None, *, activation: str = "relu",
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_in, d_hidden * glu_factor(activation))
        self.activation = get_activation(activation, d_hidden)
        self.dropout = Dropout(dropout) if dropout else nn.Identity()
        self.linear2 = nn.Linear(d_hidden, d_out or d_in)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class TransformerBlock(nn.Module):
    """A pre-norm transformer block over tokens, sequential or parallel.

    sequential: x = x + f(attn(norm1(x))); x = x + f(ffn(norm2(x)))
    parallel:   x = x + f(attn(norm1(x))) + f(ffn(norm1(x)))      (Wang & Komatsuzaki 2021, GPT-J; PaLM)

    f is residual dropout, then LayerScale (if ``layer_scale_init``), then DropPath. ``first_norm=False`` skips the
    attention input norm, which FT-Transformer does in its first block. ``n_queries`` restricts the output to the first
    tokens (cross-attention of those queries over all tokens): the last FT-Transformer block only needs the CLS token.

    Shape:
        x: (batch, n_tokens, d_block)
        returns: (batch, n_queries or n_tokens, d_block)
    """

    def __init__(self, d_block: int, attention: nn.Module, *, ffn_d_hidden: int, ffn_activation: str = "reglu",
                 ffn_dropout: float = 0.0, residual_dropout: float = 0.0, norm: str = "layernorm",
                 first_norm: bool = True, parallel: bool = False, drop_path: float = 0.0,
                 layer_scale_init: float | None = None) -> None:
        super().__init__()
        self.attention = attention
        self.attention_norm = get_norm(norm, d_block) if first_norm else nn.Identity()
        self.ffn = FeedForward(d_block, ffn_d_hidden, activation=ffn_activation, dropout=ffn_dropout)
        self.ffn_norm = None if parallel else get_norm(norm, d_block)
        self.parallel = parallel
        self.residual_dropout = Dropout(residual_dropout) if residual_dropout else nn.Identity()
        self.attention_scale = LayerScale(d_block, layer_scale_init) if layer_scale_init else nn.Identity()
        self.ffn_scale = LayerScale(d_block, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def _branch(self, y: Tensor, scale: nn.Module) -> Tensor:
        return self.drop_path(scale(self.residual_dropout(y)))

    def forward(self, x: Tensor, n_queries: int | None = None) -> Tensor:
        h = self.attention_norm(x)
        if n_queries is None:
            a = self.attention(h)
        else:
            x, a = x[:, :n_queries], self.attention(h[:, :n_queries], h)
        if self.parallel:
            h_q = h if n_queries is None else h[:, :n_queries]
            return x + self._branch(a, self.attention_scale) + self._branch(self.ffn(h_q), self.ffn_scale)
        x = x + self._branch(a, self.attention_scale)
        assert self.ffn_norm is not None  # set unless parallel
        return x + self._branch(self.ffn(self.ffn_norm(x)), self.ffn_scale)


class TransformerBackbone(nn.Module):
    """A stack of TransformerBlocks over tokens whose first token is CLS; returns the CLS token's final state.

    The last block computes only the CLS query (cross-attention of CLS over all tokens): the other tokens' outputs
    would be thrown away, so it skips their attention and feed-forward work (as rtdl's FT-Transformer does).

    Args:
        attentions: one attention module per block (so a model can alternate kinds).
        drop_path: the stochastic-depth rate of the last block; it rises linearly from 0 over the blocks.

    Shape:
        x: (batch, n_tokens, d_block)
        returns: (batch, d_block)
    """

    def __init__(self, d_block: int, attentions: list[nn.Module], *, ffn_d_hidden: int, ffn_activation: str,
                 ffn_dropout: float, residual_dropout: float, norm: str = "layernorm", skip_first_norm: bool = False,
                 parallel: bool = False, drop_path: float = 0.0, layer_scale_init: float | None = None) -> None:
        super().__init__()
        n_blocks = len(attentions)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_block, attention, ffn_d_hidden=ffn_d_hidden, ffn_activation=ffn_activation,
                             ffn_dropout=ffn_dropout, residual_dropout=residual_dropout, norm=norm,
                             first_norm=not (skip_first_norm and i == 0), parallel=parallel,
                             drop_path=drop_path * i / max(n_blocks - 1, 1), layer_scale_init=layer_scale_init)
            for i, attention in enumerate(attentions)
        )

    def forward(self, x: Tensor, run_block: Callable[..., Tensor] | None = None) -> Tensor:
        """``run_block(block, x, **kwargs)`` calls each block (the model's, to recompute it in backward under
        gradient checkpointing); by default a plain call."""
        run = run_block or (lambda block, *args, **kwargs: block(*args, **kwargs))
        for block in self.blocks[:-1]:
            x = run(block, x)
        return run(self.blocks[-1], x, n_queries=1)[:, 0]
