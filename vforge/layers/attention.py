"""Attention selectable by name: ``get_attention("grouped_query", d_embedding=64, n_heads=8, n_kv_heads=2)``.

Every attention takes ``(x_q, x_kv=None)``: self-attention when ``x_kv`` is None, cross-attention otherwise (the
queries attend over ``x_kv``; FT-Transformer's last block uses it to let only the CLS token query all tokens). The
softmax kinds share ``attend``: ``F.scaled_dot_product_attention`` for sequences of ``SDPA_MIN_TOKENS`` or more,
explicit matmuls below (see there why; tests check the two paths agree).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vforge.layers.dropout import keep_mask
from vforge.layers.norms import QKNorm

# Below this many keys, attention runs as explicit matmuls with an exp/sum softmax instead of
# F.scaled_dot_product_attention: tabular rows are ~12 tokens, and on CPU aten's softmax over such a short last
# dimension is several times slower than exp/sum (fwd+bwd of one (512, 8, 12, 8) attention with dropout 0.2 on
# 2 cores: 16.4 ms through SDPA, 10.3 ms explicit). Longer sequences (SAINT's intersample attention over a batch)
# go through SDPA. Both paths compute the same function; tests/test_layers.py checks them against each other.
SDPA_MIN_TOKENS = 64


def attend(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(d_head) + mask) v with grouped key/value heads (query head i reads kv head
    i // (n_heads // n_kv_heads), as SDPA's ``enable_gqa``).

    Shape:
        q: (batch, n_heads, n_q, d_head); k, v: (batch, n_kv_heads, n_kv, d_head); mask: (n_q, n_kv) bool | None
        returns: (batch, n_heads, n_q, d_head)
    """
    batch, n_heads, n_q, d_head = q.shape
    n_kv_heads, n_kv = k.shape[1], k.shape[2]
    if n_kv >= SDPA_MIN_TOKENS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              enable_gqa=n_kv_heads != n_heads)
    group = n_heads // n_kv_heads
    # Fold each group of query heads into the query axis (no copy of k and v per query head), and the batch into
    # the heads: 3-d tensors, so that the scale rides on the logits' matmul (baddbmm's alpha) instead of a pass.
    q = q.reshape(batch * n_kv_heads, group * n_q, d_head)
    k, v = k.reshape(batch * n_kv_heads, n_kv, d_head), v.reshape(batch * n_kv_heads, n_kv, d_head)
    logits = torch.baddbmm(q.new_zeros(1, 1, 1), q, k.transpose(-1, -2), beta=0.0,
                           alpha=d_head**-0.5)  # (batch * n_kv_heads, group * n_q, n_kv)
    if mask is not None:
        logits = logits.masked_fill(~mask.repeat(group, 1), float("-inf"))
    weights = (logits - logits.amax(dim=-1, keepdim=True).detach()).exp()
    denominator = weights.sum(dim=-1, keepdim=True)
    if dropout_p:  # inverted dropout; its 1 / (1 - p) rides on the softmax's denominator, saving a pass
        mask, keep = keep_mask(weights.shape, dropout_p, weights.device)
        weights = weights * mask
        denominator = denominator * keep
    # Normalize after the product with v: the same function, on d_head instead of n_kv columns.
    return (torch.bmm(weights, v) / denominator).view(batch, n_heads, n_q, d_head)


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017, https://arxiv.org/abs/1706.03762).

    Subclasses change how many key/value heads there are and how queries meet keys; the projections and their
    parameter names are shared, so a state_dict moves between kinds whose shapes agree.

    Shape:
        x_q: (batch, n_q, d_embedding); x_kv: (batch, n_kv, d_embedding) | None
        returns: (batch, n_q, d_embedding)

    >>> MultiHeadAttention(d_embedding=16, n_heads=4)(torch.randn(2, 5, 16)).shape
    torch.Size([2, 5, 16])
    """

    def __init__(self, *, d_embedding: int, n_heads: int, dropout: float = 0.0, qk_norm: bool = False,
                 n_kv_heads: int | None = None) -> None:
        super().__init__()
        if n_heads < 1 or d_embedding % n_heads:
            raise ValueError(f"d_embedding must be a positive multiple of n_heads, got {d_embedding=}, {n_heads=}")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads must be a multiple of n_kv_heads, got {n_heads=}, {n_kv_heads=}")
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_embedding // n_heads
        self.dropout = dropout
        # One projection for q, k, v (rows [0, d) make q): one matmul for self-attention; cross-attention
        # slices the weight (views, no copies).
        self.qkv = nn.Linear(d_embedding, d_embedding + 2 * n_kv_heads * self.d_head)
        self.out = nn.Linear(d_embedding, d_embedding)
        self.qk_norm = QKNorm(self.d_head) if qk_norm else None
        for m in (self.qkv, self.out):
            nn.init.zeros_(m.bias)

    def forward(self, x_q: Tensor, x_kv: Tensor | None = None) -> Tensor:
        batch, n_q, d = x_q.shape
        if x_kv is None:
            q, kv = self.qkv(x_q).split([d, self.qkv.out_features - d], dim=-1)
            n_kv = n_q
        else:
            w, b = self.qkv.weight, self.qkv.bias
            q, kv = F.linear(x_q, w[:d], b[:d]), F.linear(x_kv, w[d:], b[d:])
            n_kv = x_kv.shape[1]
        q = q.reshape(batch, n_q, self.n_heads, self.d_head).transpose(1, 2)  # (batch, n_heads, n_q, d_head)
        k, v = kv.reshape(batch, n_kv, 2, self.n_kv_heads, self.d_head).permute(2, 0, 3, 1, 4)
        # k, v: (batch, n_kv_heads, n_kv, d_head)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        x = self._attend(q, k, v)  # (batch, n_heads, n_q, d_head)
        return self.out(x.transpose(1, 2).reshape(batch, n_q, d))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attend(q, k, v, dropout_p=self.dropout if self.training else 0.0)


class GroupedQueryAttention(MultiHeadAttention):
    """Grouped-query attention: ``n_kv_heads`` key/value heads, each shared by ``n_heads // n_kv_heads`` query heads
    (Ainslie et al. 2023, https://arxiv.org/abs/2305.13245). ``n_kv_heads == n_heads`` is multi-head attention,
    ``n_kv_heads == 1`` multi-query attention.

    Shape:
        x_q: (batch, n_q, d_embedding); x_kv: (batch, n_kv, d_embedding) | None
        returns: (batch, n_q, d_embedding)
    """

    def __init__(self, *, d_embedding: int, n_heads: int, n_kv_heads: int, dropout: float = 0.0,
                 qk_norm: bool = False) -> None:
        super().__init__(d_embedding=d_embedding, n_heads=n_heads, dropout=dropout, qk_norm=qk_norm,
                         n_kv_heads=n_kv_heads)


class MultiQueryAttention(MultiHeadAttention):
    """Multi-query attention: one key/value head shared by all query heads (Shazeer 2019,
    https://arxiv.org/abs/1911.02150).

    Shape:
        x_q: (batch, n_q, d_embedding); x_kv: (batch, n_kv, d_embedding) | None
        returns: (batch, n_q, d_embedding)
    """

    def __init__(self, *, d_embedding: int, n_heads: int, dropout: float = 0.0, qk_norm: bool = False) -> None:
        super().__init__(d_embedding=d_embedding, n_heads=n_heads, dropout=dropout, qk_norm=qk_norm, n_kv_heads=1)


class SlidingWindowAttention(MultiHeadAttention):
    """Each query at position i attends only to keys at positions j with |i - j| <= ``window`` (Beltagy et al. 2020,
    Longformer, https://arxiv.org/abs/2004.05150). Query i is matched to key position i, so cross-attention with
    fewer queries (a CLS prefix) keeps the queries' positions.

    Shape:
        x_q: (batch, n_q, d_embedding); x_kv: (batch, n_kv, d_embedding) | None
        returns: (batch, n_q, d_embedding)
    """

    def __init__(self, *, d_embedding: int, n_heads: int, window: int, dropout: float = 0.0,
                 qk_norm: bool = False) -> None:
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window=}")
        super().__init__(d_embedding=d_embedding, n_heads=n_heads, dropout=dropout, qk_norm=qk_norm)
        self.window = window

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        i = torch.arange(q.shape[-2], device=q.device)[:, None]
        j = torch.arange(k.shape[-2], device=q.device)[None, :]
        mask = (i - j).abs() <= self.window  # (n_q, n_kv), True = attend
        return attend(q, k, v, mask=mask, dropout_p=self.dropout if self.training else 0.0)


class LinearAttention(MultiHeadAttention):
    """Linear attention with the feature map elu(x) + 1 (Katharopoulos et al. 2020, https://arxiv.org/abs/2006.16236):
    softmax(q k^T) v is replaced by phi(q) (phi(k)^T v) / (phi(q) sum_j phi(k_j)), linear in the sequence length.

    NOTE[paper]: ``dropout`` is ignored: there is no attention matrix to drop entries from.

    Shape:
        x_q: (batch, n_q, d_embedding); x_kv: (batch, n_kv, d_embedding) | None
        returns: (batch, n_q, d_embedding)
    """

    def __init__(self, *, d_embedding: int, n_heads: int, dropout: float = 0.0, qk_norm: bool = False,
                 eps: float = 1e-6) -> None:
        super().__init__(d_embedding=d_embedding, n_heads=n_heads, dropout=dropout, qk_norm=qk_norm)
        self.eps = eps

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kv = torch.einsum("bhnd,bhne->bhde", k, v)  # (batch, n_heads, d_head, d_head)
        z = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2)) + self.eps  # (batch, n_heads, n_q)
        return torch.einsum("bhnd,bhde->bhne", q, kv) / z[..., None]


ATTENTIONS: dict[str, type[MultiHeadAttention]] = {
    "multi_head": MultiHeadAttention,
    "multi_query": MultiQueryAttention,
    "grouped_query": GroupedQueryAttention,
    "sliding_window": SlidingWindowAttention,
    "linear": LinearAttention,
}


def get_attention(name: str, *, d_embedding: int, n_heads: int, dropout: float = 0.0, qk_norm: bool = False,
                  n_kv_heads: int | None = None, window: int | None = None) -> MultiHeadAttention:
    """A fresh attention by name; unknown names list the valid ones.

    Args:
        n_kv_heads: key/value heads, for (and only for) grouped_query.
        window: the half-width in tokens, for (and only for) sliding_window.
    """
    try:
        cls = ATTENTIONS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}; valid names: {', '.join(ATTENTIONS)}") from None
    extra: dict[str, int] = {}
    for key, value, needed_by in (("n_kv_heads", n_kv_heads, GroupedQueryAttention),
                                  ("window", window, SlidingWindowAttention)):
        if cls is needed_by:
            if value is None:
                raise ValueError(f"attention {name!r} needs {key}; set it (e.g. attention_{key}=2)")
            extra[key] = value
        elif value is not None:
            raise ValueError(f"{key}={value} only applies to attention {needed_by.__name__}, not {name!r}")
    return cls(d_embedding=d_embedding, n_heads=n_heads, dropout=dropout, qk_norm=qk_norm, **extra)
