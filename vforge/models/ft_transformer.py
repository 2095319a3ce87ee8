"""FT-Transformer of Gorishniy et al. 2021 (https://arxiv.org/abs/2106.11959), and its variant with periodic (PLR)
numerical embeddings of Gorishniy et al. 2022 (https://arxiv.org/abs/2203.05556): ``model=ft_transformer_plr``."""

from __future__ import annotations

from torch import Tensor, nn

from vforge.layers.attention import get_attention
from vforge.layers.blocks import TransformerBackbone, check_transformer_sizes
from vforge.layers.embeddings import FeatureTokenizer
from vforge.layers.norms import get_norm
from vforge.models.base import Model


class FTTransformer(Model):
    """Feature tokenizer + CLS token -> pre-norm transformer blocks (the first without its input norm) -> the CLS
    token's state -> LayerNorm -> ReLU -> Linear.

    Args:
        attention: the attention kind, a name from vforge.layers.attention.ATTENTIONS.
        attention_n_kv_heads: key/value heads for ``attention=grouped_query``.
        attention_window: the half-width for ``attention=sliding_window``.
        num_embeddings: linear (the paper's tokenizer), periodic (PLR) or piecewise_linear.
        num_embeddings_options: extra arguments of the numeric embeddings (e.g. sigma, n_frequencies, lite).

    Shape:
        x_num: (batch, n_num); x_cat: (batch, n_cat) | None
        returns: (batch, d_out)
    """

    def __init__(self, *, n_num: int, cat_cardinalities: list[int], d_out: int, n_blocks: int, d_block: int,
                 attention_n_heads: int, attention_dropout: float, ffn_d_hidden_multiplier: float, ffn_dropout: float,
                 residual_dropout: float, ffn_activation: str = "reglu", attention: str = "multi_head",
                 attention_n_kv_heads: int | None = None, attention_window: int | None = None,
                 num_embeddings: str = "linear", num_embeddings_options: dict | None = None) -> None:
        super().__init__()
        check_transformer_sizes(n_blocks=n_blocks, d_block=d_block, attention_n_heads=attention_n_heads)
        self.tokenizer = FeatureTokenizer(n_num, cat_cardinalities, d_block, num_embeddings=num_embeddings,
                                          num_embeddings_options=num_embeddings_options)
        attentions: list[nn.Module] = [get_attention(attention, d_embedding=d_block, n_heads=attention_n_heads,
                                    dropout=attention_dropout, n_kv_heads=attention_n_kv_heads,
                                    window=attention_window) for _ in range(n_blocks)]
        self.backbone = TransformerBackbone(
            d_block, attentions, ffn_d_hidden=int(d_block * ffn_d_hidden_multiplier), ffn_activation=ffn_activation,
            ffn_dropout=ffn_dropout, residual_dropout=residual_dropout, skip_first_norm=True)
        self.head = nn.Sequential(get_norm("layernorm", d_block), nn.ReLU(), nn.Linear(d_block, d_out))

    def forward(self, x_num: Tensor, x_cat: Tensor | None = None) -> Tensor:
        return self.head(self.backbone(self.tokenizer(x_num, x_cat), run_block=self.run_block))

    def checkpoint_blocks(self) -> nn.ModuleList:
        return self.backbone.blocks
