"""SAINT of Somepalli et al. 2021 (https://arxiv.org/abs/2106.01342): attention over columns and between rows."""

from __future__ import annotations

from torch import Tensor, nn

from vforge.layers.attention import MultiHeadAttention
from vforge.layers.blocks import TransformerBlock, check_transformer_sizes
from vforge.layers.embeddings import FeatureTokenizer
from vforge.layers.norms import get_norm
from vforge.models.base import Model


class IntersampleAttention(nn.Module):
    """Attention between the rows of a batch: each row's tokens are concatenated into one vector of width
    n_tokens * d_block and attend to the other rows' vectors (SAINT's "intersample attention"), followed by a
    feed-forward block, both pre-norm residual.

    A batch of one row attends only to itself, so single rows predict (the softmax over one key is 1).

    Shape:
        x: (batch, n_tokens, d_block)
        returns: (batch, n_tokens, d_block)
    """

    def __init__(self, n_tokens: int, d_block: int, *, n_heads: int, dropout: float, ffn_d_hidden_multiplier: float,
                 ffn_dropout: float, residual_dropout: float) -> None:
        super().__init__()
        d_row = n_tokens * d_block
        attention = MultiHeadAttention(d_embedding=d_row, n_heads=n_heads, dropout=dropout)
        self.block = TransformerBlock(d_row, attention, ffn_d_hidden=int(d_row * ffn_d_hidden_multiplier),
                                      ffn_activation="gelu", ffn_dropout=ffn_dropout,
                                      residual_dropout=residual_dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, n_tokens, d = x.shape
        rows = x.reshape(1, batch, n_tokens * d)  # one "sequence" whose tokens are the batch's rows
        return self.block(rows).reshape(batch, n_tokens, d)


class SAINT(Model):
    """Feature tokenizer + CLS -> [column attention block -> intersample attention block] x n_blocks -> CLS -> Linear.

    NOTE[paper]: numeric features are embedded by a per-feature linear map (FT-Transformer's tokenizer) instead of
    the paper's per-feature MLP, and the self-supervised pre-training stage is left out (vforge trains supervised).
    NOTE[paper]: in eval mode a row's prediction depends on the other rows of its batch, as in the paper; predict
    with the same batch size as training, or one row at a time, and expect slightly different numbers.

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, d_out)
    """

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, n_blocks: int, d_block: int,
                 attention_n_heads: int, attention_dropout: float, ffn_d_hidden_multiplier: float, ffn_dropout: float,
                 residual_dropout: float, intersample: bool = True, num_embeddings: str = "linear",
                 num_embeddings_options: dict | None = None) -> None:
        super().__init__()
        check_transformer_sizes(n_blocks=n_blocks, d_block=d_block, attention_n_heads=attention_n_heads)
        self.tokenizer = FeatureTokenizer(n_num, cat_cardinalities, d_block, num_embeddings=num_embeddings,
                                          num_embeddings_options=num_embeddings_options)
        n_tokens = self.tokenizer.n_tokens
        self.blocks = nn.ModuleList()
        for _ in range(n_blocks):
            column = TransformerBlock(
                d_block, MultiHeadAttention(d_embedding=d_block, n_heads=attention_n_heads, dropout=attention_dropout),
                ffn_d_hidden=int(d_block * ffn_d_hidden_multiplier), ffn_activation="gelu", ffn_dropout=ffn_dropout,
                residual_dropout=residual_dropout)
            row = IntersampleAttention(
                n_tokens, d_block, n_heads=attention_n_heads, dropout=attention_dropout,
                ffn_d_hidden_multiplier=ffn_d_hidden_multiplier, ffn_dropout=ffn_dropout,
                residual_dropout=residual_dropout) if intersample else nn.Identity()
            self.blocks.append(nn.Sequential(column, row))
        self.head = nn.Sequential(get_norm("layernorm", d_block), nn.ReLU(), nn.Linear(d_block, d_out))

    def forward(self, x_num: Tensor, x_cat: Tensor | None = None) -> Tensor:
        x = self.tokenizer(x_num, x_cat)  # (batch, n_tokens, d_block)
        x = self.run_blocks(self.blocks, x)
        return self.head(x[:, 0])

    def checkpoint_blocks(self) -> nn.ModuleList:
        return self.blocks
