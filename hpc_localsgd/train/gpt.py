"""A decoder-only transformer language model (``model.name: gpt``), in the shape of nanoGPT's.

Pre-norm blocks (LayerNorm, causal self-attention, residual; LayerNorm, GELU MLP of width 4·dim,
residual), learned position embeddings, and an output head that shares the token embedding's
matrix. No Linear or LayerNorm has a bias (nanoGPT's ``bias=False``: a little better and faster),
which keeps the parameter count a short formula (``parameter_count``).

The model maps token ids ``[B, T]`` to logits ``[B, T, vocab]`` at every position, because the
training loss is over all positions. It runs inside ``torch.func.vmap`` (the simulated backend's
``ReplicatedModel``): nothing in it depends on the batch size or mutates state in place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import GptConfig

# GPT-2's initialisation: N(0, 0.02) for every matrix and embedding; the projections that write into
# the residual stream are scaled down by sqrt(2·layers) (two per block), so that the stream's variance
# does not grow with depth.
INIT_STD = 0.02


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees positions ≤ t only.

    ``c_attn`` projects to queries, keys and values at once (one matmul instead of three);
    ``scaled_dot_product_attention`` picks the flash or memory-efficient kernel where the device has one.
    """

    def __init__(self, cfg: GptConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.dim = cfg.dim
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.c_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        head_dim = dim // self.heads
        # [B, T, 3·dim] → three [B, heads, T, head_dim]
        q, k, v = (
            t.view(batch, length, self.heads, head_dim).transpose(1, 2) for t in self.c_attn(x).split(dim, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(batch, length, dim)  # the heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Linear(dim → 4·dim), GELU, Linear(4·dim → dim), dropout."""

    def __init__(self, cfg: GptConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.dim, 4 * cfg.dim, bias=False)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.dim, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x)): pre-norm, so the residual stream is never
    normalised and gradients reach the embeddings undamped."""

    def __init__(self, cfg: GptConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, bias=False)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.dim, bias=False)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids ``[B, T]`` (int64, T ≤ seq_len) → next-token logits ``[B, T, vocab]``.

    Parameters (``parameter_count``): vocab·dim (``wte``, also the head) + seq_len·dim (``wpe``)
    + layers·(12·dim² + 2·dim) (per block: c_attn 3·dim², attention c_proj dim², c_fc 4·dim², MLP c_proj
    4·dim², two LayerNorm weights) + dim (the final LayerNorm).

    ``lm_head.weight`` is ``wte.weight`` (the same Parameter): the head scores a token by the similarity of
    the output to its embedding, with vocab·dim fewer parameters. ``named_parameters`` lists it once, as
    ``wte.weight``. The head is the last module registered, so that ``hidden_matrix_names`` (every Linear's
    weight but the last) gives exactly the four matrices of each block.
    """

    def __init__(self, cfg: GptConfig) -> None:
        super().__init__()
        self.seq_len = cfg.seq_len
        self.wte = nn.Embedding(cfg.vocab, cfg.dim)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.ln_f = nn.LayerNorm(cfg.dim, bias=False)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self._init_weights(cfg.layers)

    def _init_weights(self, layers: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            assert isinstance(block, Block)
            for projection in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(projection.weight, mean=0.0, std=INIT_STD / math.sqrt(2 * layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[-1]
        if length > self.seq_len:
            raise ValueError(f"a sequence of {length} tokens is longer than the model's seq_len ({self.seq_len})")
        positions = torch.arange(length, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def parameter_count(cfg: GptConfig) -> int:
    """The number of parameters of ``GPT(cfg)``, the head counted once (it is the token embedding)."""
    per_block = 12 * cfg.dim**2 + 2 * cfg.dim
    return cfg.vocab * cfg.dim + cfg.seq_len * cfg.dim + cfg.layers * per_block + cfg.dim


def non_embedding_parameters(model: GPT) -> int:
    """N of the FLOPs estimate: every parameter but the position embedding's. The token embedding stays,
    as in nanoGPT's ``get_num_params``: as the output head it does a matmul per token."""
    return sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()


def flops_per_token(cfg: GptConfig) -> int:
    """Model FLOPs per trained token of a decoder-only transformer, forward and backward, attention included:
    6·N + 12·layers·seq_len·dim, N = ``parameter_count(cfg)`` less the position embedding (PaLM's appendix B,
    as nanoGPT's ``estimate_mfu`` counts). 6·N: a multiply-add per parameter forward, two backward;
    12·layers·seq_len·dim: the attention scores and their weighted sum, which have no parameters."""
    non_embedding = parameter_count(cfg) - cfg.seq_len * cfg.dim
    return 6 * non_embedding + 12 * cfg.layers * cfg.seq_len * cfg.dim
