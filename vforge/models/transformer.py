"""Standard pre-norm transformers over feature tokens, with a selectable attention: sequential blocks (Xiong et al.
2020, https://arxiv.org/abs/2002.04745), alternating linear and softmax attention (``model=transformer_hybrid``;
linear attention of Katharopoulos et al. 2020, https://arxiv.org/abs/2006.16236), and attention and feed-forward in
parallel (``model=transformer_parallel``; GPT-J, Wang & Komatsuzaki 2021; PaLM, https://arxiv.org/abs/2204.02311)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from vforge.layers.attention import get_attention
from vforge.layers.blocks import TransformerBackbone, check_transformer_sizes
from vforge.layers.embeddings import FeatureTokenizer
from vforge.layers.norms import get_norm
from vforge.models.base import Model


class Transformer(Model):
    """Feature tokenizer + CLS -> pre-norm blocks x = x + attn(norm(x)); x = x + ffn(norm(x)) -> norm(CLS) -> Linear.

    Unlike FT-Transformer every block normalizes its input, the norm is selectable (layernorm, rmsnorm), and blocks
    may use stochastic depth and LayerScale.

    Args:
        attention: the attention kind, a name from vforge.layers.attention.ATTENTIONS.
        attention_n_kv_heads: key/value heads for ``attention=grouped_query``.
        attention_window: the half-width for ``attention=sliding_window``.
        attention_qk_norm: RMS-normalize queries and keys per head.
        drop_path: the stochastic-depth rate of the last block (rising linearly from 0).
        layer_scale_init: the initial LayerScale of each residual branch; null turns LayerScale off.

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, d_out)
    """

    _parallel = False

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, n_blocks: int, d_block: int,
                 attention_n_heads: int, attention_dropout: float, ffn_d_hidden_multiplier: float, ffn_dropout: float,
                 residual_dropout: float, ffn_activation: str = "gelu", norm: str = "layernorm",
                 attention: str = "multi_head", attention_n_kv_heads: int | None = None,
                 attention_window: int | None = None, attention_qk_norm: bool = False, drop_path: float = 0.0,
                 layer_scale_init: float | None = None, num_embeddings: str = "linear",
                 num_embeddings_options: dict | None = None) -> None:
        super().__init__()
        check_transformer_sizes(n_blocks=n_blocks, d_block=d_block, attention_n_heads=attention_n_heads)
        self.tokenizer = FeatureTokenizer(n_num, cat_cardinalities, d_block, num_embeddings=num_embeddings,
                                          num_embeddings_options=num_embeddings_options)
        options = dict(d_embedding=d_block, n_heads=attention_n_heads, dropout=attention_dropout,
                       qk_norm=attention_qk_norm)
        attentions = [self._attention(i, attention, attention_n_kv_heads, attention_window, options)
                      for i in range(n_blocks)]
        self.backbone = TransformerBackbone(
            d_block, attentions, ffn_d_hidden=int(d_block * ffn_d_hidden_multiplier), ffn_activation=ffn_activation,
            ffn_dropout=ffn_dropout, residual_dropout=residual_dropout, norm=norm, parallel=self._parallel,
            drop_path=drop_path, layer_scale_init=layer_scale_init)
        self.head = nn.Sequential(get_norm(norm, d_block), nn.Linear(d_block, d_out))

    def _attention(self, i: int, name: str, n_kv_heads: int | None, window: int | None, options: dict) -> nn.Module:
        return get_attention(name, n_kv_heads=n_kv_heads, window=window, **options)

    def forward(self, x_num: Tensor, x_cat: Tensor | None = None) -> Tensor:
        return self.head(self.backbone(self.tokenizer(x_num, x_cat), run_block=self.run_block))

    def checkpoint_blocks(self) -> nn.ModuleList:
        return self.backbone.blocks


class HybridTransformer(Transformer):
    """Transformer whose blocks alternate linear attention (even blocks) and the selected softmax attention (odd
    blocks, and always the last, which reads out CLS): linear cost where it suffices, exact attention where it counts.

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, d_out)
    """

    def __init__(self, *, n_blocks: int, attention: str = "multi_head", **kwargs: Any) -> None:
        if attention == "linear":
            raise ValueError("transformer_hybrid alternates linear with a softmax attention; choose attention from "
                             "multi_head, multi_query, grouped_query, sliding_window")
        if n_blocks < 2:
            raise ValueError(f"transformer_hybrid needs n_blocks >= 2 to alternate, got {n_blocks=}")
        self._n_blocks = n_blocks
        super().__init__(n_blocks=n_blocks, attention=attention, **kwargs)

    def _attention(self, i: int, name: str, n_kv_heads: int | None, window: int | None, options: dict) -> nn.Module:
        if i % 2 == 0 and i != self._n_blocks - 1:
            return get_attention("linear", **options)
        return get_attention(name, n_kv_heads=n_kv_heads, window=window, **options)


class ParallelTransformer(Transformer):
    """Transformer whose blocks compute attention and feed-forward from one norm, in parallel:
    x = x + attn(norm(x)) + ffn(norm(x)).

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, d_out)
    """

    _parallel = True
