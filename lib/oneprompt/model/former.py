"""One-Prompt Former block (Wu et al., CVPR 2024, section 2.2, Fig. 2b): one decoder step at one feature level.

Inputs, all (B, N, C) token sequences on this level's h x w grid (row-major) unless said otherwise:
  e_s (B, N_prev, C)  the previous block's output (for the first block: the coarsest query tokens), on the
                      previous level's grid, which may be coarser;
  e_q, e_t            this level's skip-connected query and template tokens;
  p1, p2 (B, 1, C)    the prompt embeddings;
  pe (1, N, C), pe_prev (1, N_prev, C)  positional encodings of the two grids (the prompt encoder's pe_layer).

  Query branch:     a = LN(e_q + CrossAttn(q: e_q, kv: e_s))         the level's query tokens read the decoding
                    a = LN(a + CrossAttn(q: a, kv: e_t))             ... then the template ("symmetrically")
  Template branch:  t = LN(e_t + PromptParser(e_t, e_q, p1, p2))     the prompted template
                    t = LN(t + CrossAttn(q: t, kv: e_q))             ... reads the query
  Join:             x = LN(a + CrossAttn(q: a, kv: t))               the prompted template segmentation
                                                                     transferred to the query domain
  Then:             x = LN(x + SelfAttn(x));  x = LN(x + FFN(x))     -> (B, N, C), the block's output e_s.

As in SAM, positional encodings are added to attention queries and keys (not values), so every attention can
match positions across grids of different sizes (encodings are of normalised coordinates). The Prompt-Parser is
given position-encoded tokens (e_t + pe, e_q + pe): its eq. (2) then contains <p, e_q + pe>, so a click's (or a
box corner's) position, encoded by the same pe_layer, reaches the query grid, and eq. (1)'s products let later
linear layers read how close each template token is to the prompt.
"""

from __future__ import annotations

from typing import Tuple

from torch import Tensor, nn

from lib.models.sam.common import MLPBlock
from lib.models.sam.transformer import Attention
from lib.oneprompt.model.prompt_parser import PromptParser


class OnePromptFormerBlock(nn.Module):
    def __init__(self, embedding_dim: int, grid_size: Tuple[int, int], num_heads: int = 4, mlp_dim: int = 512,
                 attention_downsample_rate: int = 2, parser_kernel: int = 3, gauss_radius: int = 3) -> None:
        """
        embedding_dim: C.
        grid_size: (h, w) of this level's token grid (the Prompt-Parser's N = h * w is fixed by it).
        num_heads: attention heads.
        mlp_dim: hidden width of the FFN.
        attention_downsample_rate: the cross-attentions project q/k/v to C / rate (SAM's decoder uses 2); the
            self-attention keeps C.
        parser_kernel, gauss_radius: the Prompt-Parser's Conv(M) kernel and Gaussian window radius.
        """
        super().__init__()
        rate = attention_downsample_rate
        self.grid_size = tuple(grid_size)
        self.query_to_previous = Attention(embedding_dim, num_heads, rate)
        self.norm_q1 = nn.LayerNorm(embedding_dim)
        self.query_to_template = Attention(embedding_dim, num_heads, rate)
        self.norm_q2 = nn.LayerNorm(embedding_dim)
        self.parser = PromptParser(embedding_dim, grid_size, parser_kernel, gauss_radius)
        self.norm_t1 = nn.LayerNorm(embedding_dim)
        self.template_to_query = Attention(embedding_dim, num_heads, rate)
        self.norm_t2 = nn.LayerNorm(embedding_dim)
        self.join = Attention(embedding_dim, num_heads, rate)
        self.norm_j = nn.LayerNorm(embedding_dim)
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm_s = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim)
        self.norm_out = nn.LayerNorm(embedding_dim)

    def forward(self, e_s: Tensor, e_q: Tensor, e_t: Tensor, p1: Tensor, p2: Tensor, pe: Tensor,
                pe_prev: Tensor) -> Tensor:
        q_pe, t_pe = e_q + pe, e_t + pe
        # Query branch.
        a = self.norm_q1(e_q + self.query_to_previous(q_pe, e_s + pe_prev, e_s))
        a = self.norm_q2(a + self.query_to_template(a + pe, t_pe, e_t))
        # Template branch.
        t = self.norm_t1(e_t + self.parser(t_pe, q_pe, p1, p2))
        t = self.norm_t2(t + self.template_to_query(t + pe, q_pe, e_q))
        # Join, then self-attention and FFN.
        x = self.norm_j(a + self.join(a + pe, t + pe, t))
        xp = x + pe
        x = self.norm_s(x + self.self_attn(xp, xp, x))
        return self.norm_out(x + self.mlp(x))
