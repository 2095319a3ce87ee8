"""Attention selectable by name: ``get_attention("grouped_query", d_embedding=64, n_heads=8, n_kv_heads=2)``.

Every attention takes ``(x_q, x_kv=None)``: self-attention when ``x_kv`` is None, cross-attention otherwise (the
queries attend over ``x_kv``; FT-Transformer's last block uses it to let only the CLS token query all tokens). The
softmax kinds share ``attend``: ``F.scaled_dot_product_attention`` for sequences of ``SDPA_MIN_TOKENS`` or more,
explicit matmuls below (see there why; tests check the two paths agree). Below it, ``MultiHeadAttention`` runs the
same explicit math straight from the projections' outputs (``attend_projected``, with its backward written out),
which saves the copies that putting heads into the batch and back costs autograd.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

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
        mask, keep = keep_mask(weights.shape, dropout_p, weights.device, weights.dtype)
        weights = weights * mask
        denominator = denominator * keep
    # Normalize after the product with v: the same function, on d_head instead of n_kv columns.
    return (torch.bmm(weights, v) / denominator).view(batch, n_heads, n_q, d_head)


def attend_projected(q: Tensor, kv: Tensor | None, n_kv_heads: int, d_head: int, *, mask: Tensor | None = None,
                     dropout_p: float = 0.0) -> Tensor:
    """``attend`` on the projections' outputs, heads still in the last dimension: the same function (the same
    dropout masks for the same random state), with its backward written out (``_ProjectedAttention``) where a
    gradient is needed.

    autograd would save, and copy back in backward, every layout change between the projections and the batched
    matmuls (q, k, v each into (batch * heads, tokens, d_head), the output back, the concatenation of the q/kv split's
    gradients); here each direction copies once, into buffers whose head views ``bmm`` reads in place, and the
    gradients of q, k and v are written straight into one tensor shaped like the projection's output.

    Args:
        q: the queries (batch, n_q, n_heads * d_head); with ``kv=None``, the self-attention projection
            (batch, n, n_heads * d_head + 2 * n_kv_heads * d_head), queries first, then keys and values.
        kv: keys and values (batch, n_kv, 2 * n_kv_heads * d_head) (keys first), or None.

    Shape:
        returns: (batch, n_q, n_heads * d_head)
    """
    if torch.is_grad_enabled() and (q.requires_grad or (kv is not None and kv.requires_grad)):
        return _ProjectedAttention.apply(q, kv, n_kv_heads, d_head, mask, dropout_p)
    q_heads, kv_heads = _to_heads(q, kv, n_kv_heads, d_head)
    return _attention_forward(q_heads, kv_heads, mask, dropout_p)[0]


def _to_heads(q: Tensor, kv: Tensor | None, n_kv_heads: int, d_head: int) -> tuple[Tensor, Tensor]:
    """The projections copied into the layouts ``bmm`` batches over: q as (batch, n_kv_heads, group, n_q, d_head)
    (query head i = kv head i // group, as ``attend``) and keys, values as (2, batch, n_kv_heads, n_kv, d_head)."""
    d_kv = n_kv_heads * d_head
    if kv is None:
        d = q.shape[-1] - 2 * d_kv
        q, kv = q[..., :d], q[..., d:]
    batch, n_q, d = q.shape
    n_kv, group = kv.shape[1], d // d_kv
    q_heads = q.new_empty(batch, n_kv_heads, group, n_q, d_head)
    q_heads.copy_(q.view(batch, n_q, n_kv_heads, group, d_head).permute(0, 2, 3, 1, 4))
    kv_heads = kv.new_empty(2, batch, n_kv_heads, n_kv, d_head)
    kv_heads.copy_(kv.view(batch, n_kv, 2, n_kv_heads, d_head).permute(2, 0, 3, 1, 4))
    return q_heads, kv_heads


def _attention_forward(q_heads: Tensor, kv_heads: Tensor, mask: Tensor | None,
                       dropout_p: float) -> tuple[Tensor, Tensor, Tensor | None, Tensor, float]:
    """The output (batch, n_q, n_heads * d_head) of ``attend``'s explicit math, and what its backward needs: the
    unnormalized weights, the dropout mask, the softmax denominators and the keep probability."""
    batch, n_kv_heads, group, n_q, d_head = q_heads.shape
    n_kv = kv_heads.shape[3]
    q = q_heads.view(batch * n_kv_heads, group * n_q, d_head)
    k, v = kv_heads.view(2, batch * n_kv_heads, n_kv, d_head).unbind(0)
    weights = torch.baddbmm(q.new_zeros(1, 1, 1), q, k.transpose(-1, -2), beta=0.0,
                            alpha=d_head**-0.5)  # (batch * n_kv_heads, group * n_q, n_kv)
    if mask is not None:
        weights.masked_fill_(~mask.repeat(group, 1), float("-inf"))
    weights.sub_(weights.amax(dim=-1, keepdim=True)).exp_()  # in place: no autograd records these
    denominator = weights.sum(dim=-1, keepdim=True)
    keep, drop_mask, kept = 1.0, None, weights
    if dropout_p:
        drop_mask, keep = keep_mask(weights.shape, dropout_p, weights.device, weights.dtype)
        kept = weights * drop_mask
    x = torch.bmm(kept, v)  # (batch * n_kv_heads, group * n_q, d_head), normalized on the copy out
    out = q.new_empty(batch, n_q, n_kv_heads * group * d_head)
    torch.div(x.view(batch, n_kv_heads, group, n_q, d_head).permute(0, 3, 1, 2, 4),
              (denominator * keep).view(batch, n_kv_heads, group, n_q, 1).permute(0, 3, 1, 2, 4),
              out=out.view(batch, n_q, n_kv_heads, group, d_head))
    return out, weights, drop_mask, denominator, keep


def _bmm(a: Tensor, b: Tensor, *, out: Tensor, alpha: float = 1.0) -> Tensor:
    """``out = alpha * a @ b`` for 3-d a, b; with one column in a (one query row: the CLS-only last block) it is an
    outer product, which the broadcast multiply computes several times faster than bmm's kernel at these sizes."""
    if a.shape[-1] == 1:
        torch.mul(a, b, out=out)
        return out if alpha == 1.0 else out.mul_(alpha)
    return torch.baddbmm(a.new_zeros(1, 1, 1), a, b, beta=0.0, alpha=alpha, out=out)


class _ProjectedAttention(torch.autograd.Function):
    """``attend_projected`` with a gradient. With c = 1 / (denominator * keep), e = exp(logits - max), e' = e * mask
    and o = c e' v (per query row):

        de' = (c g) v^T,  dv = e'^T (c g),  dlogits = t - e * sum(t) / denominator with t = e' * de',
        dq = dlogits k / sqrt(d_head),  dk = dlogits^T q / sqrt(d_head)

    (the softmax's backward, the mask and the 1 / keep rescaling included; tests check it against autograd
    through ``attend``)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, kv: Tensor | None, n_kv_heads: int, d_head: int, mask: Tensor | None,
                dropout_p: float) -> Tensor:
        q_heads, kv_heads = _to_heads(q, kv, n_kv_heads, d_head)
        out, weights, drop_mask, denominator, keep = _attention_forward(q_heads, kv_heads, mask, dropout_p)
        ctx.save_for_backward(q_heads, kv_heads, weights, drop_mask, denominator)
        ctx.keep, ctx.packed, ctx.q_width = keep, kv is None, q.shape[-1]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q_heads, kv_heads, weights, drop_mask, denominator = ctx.saved_tensors
        batch, n_kv_heads, group, n_q, d_head = q_heads.shape
        n_kv, scale = kv_heads.shape[3], d_head**-0.5
        q = q_heads.view(batch * n_kv_heads, group * n_q, d_head)
        k, v = kv_heads.view(2, batch * n_kv_heads, n_kv, d_head).unbind(0)
        # c g: the output's gradient in head layout, divided by denominator * keep on the copy in
        grad_x = q_heads.new_empty(batch, n_kv_heads, group, n_q, d_head)
        torch.div(grad_out.reshape(batch, n_q, n_kv_heads, group, d_head).permute(0, 2, 3, 1, 4),
                  (denominator * ctx.keep).view(batch, n_kv_heads, group, n_q, 1), out=grad_x)
        grad_x3 = grad_x.view(batch * n_kv_heads, group * n_q, d_head)
        kept = weights if drop_mask is None else weights * drop_mask
        grad_heads = kv_heads.new_empty(2, batch * n_kv_heads, n_kv, d_head)  # dk, dv
        _bmm(kept.transpose(-1, -2), grad_x3, out=grad_heads[1])
        t = torch.bmm(grad_x3, v.transpose(-1, -2)).mul_(kept)  # e' * de'
        t.addcmul_(weights, t.sum(dim=-1, keepdim=True) / denominator, value=-1.0)  # dlogits
        grad_q_heads = q_heads.new_empty(batch, n_kv_heads, group, n_q, d_head)
        torch.baddbmm(t.new_zeros(1, 1, 1), t, k, beta=0.0, alpha=scale,
                      out=grad_q_heads.view(batch * n_kv_heads, group * n_q, d_head))
        _bmm(t.transpose(-1, -2), q, out=grad_heads[0], alpha=scale)
        # back to the projections' layout: (batch, tokens, heads * d_head), q's and kv's columns
        d, d_kv = ctx.q_width - (2 * n_kv_heads * d_head if ctx.packed else 0), 2 * n_kv_heads * d_head
        grad_all = q_heads.new_empty(batch, n_q, d + d_kv) if ctx.packed else None
        grad_q = grad_all[..., :d] if grad_all is not None else q_heads.new_empty(batch, n_q, d)
        grad_kv = grad_all[..., d:] if grad_all is not None else q_heads.new_empty(batch, n_kv, d_kv)
        grad_q.view(batch, n_q, n_kv_heads, group, d_head).copy_(grad_q_heads.permute(0, 3, 1, 2, 4))
        grad_kv.view(batch, n_kv, 2, n_kv_heads, d_head).copy_(
            grad_heads.view(2, batch, n_kv_heads, n_kv, d_head).permute(1, 3, 0, 2, 4))
        if grad_all is not None:
            return grad_all, None, None, None, None, None
        return grad_q, grad_kv, None, None, None, None


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
        n_kv = n_q if x_kv is None else x_kv.shape[1]
        if x_kv is None:
            qkv = self.qkv(x_q)  # (batch, n_q, d + 2 * n_kv_heads * d_head)
            q, kv = qkv.split([d, self.qkv.out_features - d], dim=-1)
        else:
            w, b = self.qkv.weight, self.qkv.bias
            q, kv = F.linear(x_q, w[:d], b[:d]), F.linear(x_kv, w[d:], b[d:])
        if self.qk_norm is None and self._fused(n_kv, x_q.device):
            # attend's function, straight from the projections (no layout copies for autograd to save and undo)
            x = attend_projected(qkv if x_kv is None else q, None if x_kv is None else kv, self.n_kv_heads,
                                 self.d_head, mask=self._mask(n_q, n_kv, x_q.device),
                                 dropout_p=self.dropout if self.training else 0.0)
            return self.out(x)
        q = q.reshape(batch, n_q, self.n_heads, self.d_head).transpose(1, 2)  # (batch, n_heads, n_q, d_head)
        k, v = kv.reshape(batch, n_kv, 2, self.n_kv_heads, self.d_head).permute(2, 0, 3, 1, 4)
        # k, v: (batch, n_kv_heads, n_kv, d_head)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        x = self._attend(q, k, v)  # (batch, n_heads, n_q, d_head)
        return self.out(x.transpose(1, 2).reshape(batch, n_q, d))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attend(q, k, v, mask=self._mask(q.shape[-2], k.shape[-2], q.device),
                      dropout_p=self.dropout if self.training else 0.0)

    def _mask(self, n_q: int, n_kv: int, device: torch.device) -> Tensor | None:
        """Which keys each query may attend to, (n_q, n_kv) bool (True = attend); None: all."""
        return None

    def _fused(self, n_kv: int, device: torch.device) -> bool:
        """Whether forward takes ``attend_projected``: softmax attention over fewer than SDPA_MIN_TOKENS keys, not
        under autocast (its dtypes are autograd's business) nor while tracing for export (plain ops only)."""
        return (type(self)._attend is MultiHeadAttention._attend and n_kv < SDPA_MIN_TOKENS
                and not torch.is_autocast_enabled(device.type) and not torch.jit.is_tracing())


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

    def _mask(self, n_q: int, n_kv: int, device: torch.device) -> Tensor:
        i = torch.arange(n_q, device=device)[:, None]
        j = torch.arange(n_kv, device=device)[None, :]
        return (i - j).abs() <= self.window  # (n_q, n_kv), True = attend


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
