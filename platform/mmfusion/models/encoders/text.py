"""Text encoders: `(B, L)` int64 token ids + `(B, L)` int64 mask (1 = token, 0 = padding) -> `(B, D)`.

    RnnTextEncoder          embedding + (Bi)LSTM/GRU; the final hidden states, projected
    TransformerTextEncoder  a small pre-norm Transformer trained from scratch; masked mean over tokens
    HfTextEncoder           any Hugging Face encoder (hub name or local folder); masked mean; may be frozen

Token ids come from the data config's tokenizer (mmfusion.data.text): the builtin byte vocabulary for
the small encoders, the model's own tokenizer for an hf encoder. A row with no tokens at all (missing text)
is treated as one pad token, so every encoder stays finite on an all-padding batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfusion.errors import ConfigError
from mmfusion.models.encoders import (
    FrozenBackboneMixin,
    hf_tower,
    load_hf_model,
)


def token_mask(ids: Tensor, mask: Tensor | None, pad_id: int) -> Tensor:
    """(B, L) bool mask of real tokens; a row without any gets its first position, so attention is defined."""
    m = (ids != pad_id) if mask is None else mask.bool()
    empty = ~m.any(dim=1, keepdim=True)  # (B, 1)
    return torch.cat([m[:, :1] | empty, m[:, 1:]], dim=1)


def masked_mean(h: Tensor, mask: Tensor) -> Tensor:  # (B, L, D), (B, L) bool -> (B, D)
    w = mask.unsqueeze(-1).to(h.dtype)
    return (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + MLP block over `(B, N, D)` tokens, with a `(B, N)` key mask (True = attend).

    Uses `F.scaled_dot_product_attention`; every row must keep at least one key.
    """

    def __init__(self, dim: int, heads: int, ffn_mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"transformer width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:  # (B, N, D), (B, N) bool -> (B, N, D)
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(  # (B, H, N, D/H)
            q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ffn(self.norm2(x)))


class RnnTextEncoder(nn.Module):
    """Embedding -> LSTM/GRU (packed, so padding never enters) -> last layer's final states -> Linear -> ReLU.

    Args:
        vocab_size, pad_id: from the tokenizer (InputSpec).
        cell: "lstm" or "gru".
        embed_dim, hidden, layers, bidirectional: the recurrent stack.
        dim: output size; dropout: between RNN layers and before the projection.
    """

    def __init__(self, vocab_size: int, pad_id: int = 0, cell: str = "lstm", embed_dim: int = 64,
                 hidden: int = 128, layers: int = 1, bidirectional: bool = True, dim: int = 128,
                 dropout: float = 0.1) -> None:
        super().__init__()
        rnns = {"lstm": nn.LSTM, "gru": nn.GRU}
        if cell not in rnns:
            raise ConfigError(f"unknown rnn cell {cell!r}; known: {', '.join(rnns)}")
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.rnn = rnns[cell](embed_dim, hidden, num_layers=layers, batch_first=True,
                              bidirectional=bidirectional, dropout=dropout if layers > 1 else 0.0)
        self.dirs = 2 if bidirectional else 1
        self.proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.dirs * hidden, dim),
                                  nn.ReLU(inplace=True))
        self.out_dim = dim

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:  # (B, L), (B, L) -> (B, dim)
        m = token_mask(ids, mask, self.pad_id)
        lengths = m.sum(dim=1).cpu()  # (B,) >= 1; left-aligned tokens, as the tokenizer pads on the right
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True,
                                                   enforce_sorted=False)
        _, h = self.rnn(packed)
        h = h[0] if isinstance(h, tuple) else h  # LSTM: (h_n, c_n); h_n: (layers*dirs, B, hidden)
        last = h[-self.dirs:].transpose(0, 1).reshape(ids.shape[0], -1)  # (B, dirs*hidden)
        return self.proj(last)


class TransformerTextEncoder(nn.Module):
    """Token + learned position embeddings -> `layers` pre-norm blocks -> LayerNorm -> masked mean:
    (B, dim)."""

    def __init__(self, vocab_size: int, pad_id: int = 0, max_len: int = 32, dim: int = 128, layers: int = 2,
                 heads: int = 4, ffn_mult: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, ffn_mult, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:  # (B, L), (B, L) -> (B, dim)
        L = ids.shape[1]
        if L > self.max_len:
            raise ValueError(f"text has {L} tokens, the encoder was built for at most {self.max_len}")
        m = token_mask(ids, mask, self.pad_id)
        x = self.drop(self.embed(ids) + self.pos[:L])  # (B, L, dim)
        for block in self.blocks:
            x = block(x, m)
        return masked_mean(self.norm(x), m)


class HfTextEncoder(FrozenBackboneMixin):
    """A Hugging Face text encoder (BERT, RoBERTa, DistilBERT, MiniLM, CLIP's text tower, T5's encoder, ...).

    `(B, L)` ids + mask -> last hidden states -> masked mean -> optional Linear: `(B, hidden | dim)`.
    The ids must come from the same model's tokenizer (data.text.tokenizer = the model's name or folder).
    """

    def __init__(self, name_or_path: str, vocab_size: int, pad_id: int = 0, max_len: int = 32,
                 freeze: bool = True, dim: int | None = None, load_weights: bool = True) -> None:
        super().__init__()
        self.backbone = hf_tower(load_hf_model(name_or_path, pretrained=load_weights), "text")
        model_vocab = getattr(self.backbone.config, "vocab_size", None)
        if model_vocab is not None and vocab_size > model_vocab:
            raise ConfigError(f"the tokenizer's vocabulary ({vocab_size} ids) is larger than "
                              f"{name_or_path!r}'s ({model_vocab}); set data.text.tokenizer to the model's "
                              "own tokenizer")
        self.pad_id = pad_id
        probe = torch.full((2, max_len), pad_id, dtype=torch.long)
        self.setup_head(name_or_path, dim, freeze, lambda: self._backbone(probe, None))

    def _backbone(self, ids: Tensor, mask: Tensor | None) -> Tensor:  # -> (B, hidden)
        m = token_mask(ids, mask, self.pad_id)
        out = self.backbone(input_ids=ids, attention_mask=m.long())
        return masked_mean(out.last_hidden_state, m)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:  # (B, L), (B, L) -> (B, out_dim)
        return self.proj(self.features(ids, mask))
