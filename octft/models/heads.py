"""Classification heads over encoder tokens (B, N, D) -> logits (B, num_classes), and `Classifier`.

Example:
    >>> head = build_head("mlp", in_features=48, num_classes=4)
    >>> head(torch.zeros(2, 8, 48)).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch
from timm.layers import Mlp, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

HeadKind = Literal["mlp", "attentive", "linear"]


class LinearHead(nn.Module):
    """Mean-pooled tokens -> (optional LayerNorm) -> Linear: the linear probe."""

    def __init__(self, in_features: int, num_classes: int, norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(in_features) if norm else nn.Identity()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(tokens.mean(dim=1)))


class MLPHead(nn.Module):
    """Mean-pooled tokens -> Linear -> GELU -> Dropout -> Linear (Scenario A)."""

    def __init__(self, in_features: int, num_classes: int, hidden_features: int = 256, dropout: float = 0.1):
        super().__init__()
        # timm's Mlp is fc1 -> act -> drop1 -> fc2 -> drop2; no dropout after the logits.
        self.mlp = Mlp(in_features, hidden_features, num_classes, act_layer=nn.GELU, drop=(dropout, 0.0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens.mean(dim=1))


class CrossAttention(nn.Module):
    """Queries attend to tokens; no output projection, as in V-JEPA 2 (its `proj` is commented out)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        batch, num_queries, dim = queries.shape
        head_dim = dim // self.num_heads
        q = self.q(queries).unflatten(-1, (self.num_heads, head_dim)).transpose(1, 2)
        k, v = self.kv(tokens).unflatten(-1, (2, self.num_heads, head_dim)).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(batch, num_queries, dim)


class CrossAttentionBlock(nn.Module):
    """q + xattn(q, norm1(tokens)), then q + mlp(norm2(q)); the queries themselves are not normed."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.xattn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        queries = queries + self.xattn(queries, self.norm1(tokens))
        return queries + self.mlp(self.norm2(queries))


class AttentivePooler(nn.Module):
    """`depth - 1` self-attention blocks over the tokens, then learned queries cross-attend to them."""

    def __init__(self, dim: int, num_heads: int, depth: int = 1, mlp_ratio: float = 4.0, num_queries: int = 1):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.cross_attention_block = CrossAttentionBlock(dim, num_heads, mlp_ratio=mlp_ratio)
        # timm's Block has V-JEPA's names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2);
        # torch's LayerNorm keeps V-JEPA's eps of 1e-5 here.
        self.blocks = nn.ModuleList(
            [
                Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
                for _ in range(depth - 1)
            ]
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        queries = self.query_tokens.expand(tokens.shape[0], -1, -1)
        return self.cross_attention_block(queries, tokens)


class AttentiveProbe(nn.Module):
    """V-JEPA's attentive classifier: attentive pooling to one query token, then Linear.

    Its state dict has the names of V-JEPA 2's `AttentiveClassifier`, so its probes load as they are.
    `num_heads` defaults to one head per 64 channels (V-JEPA's widths: 192 -> 3, 1024 -> 16).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        num_heads: int | None = None,
        depth: int = 1,
        mlp_ratio: float = 4.0,
        init_std: float = 0.02,
    ):
        super().__init__()
        num_heads = num_heads or max(1, in_features // 64)
        if in_features % num_heads != 0:
            raise ValueError(f"attentive probe: in_features={in_features} is not divisible by num_heads={num_heads}")
        if depth < 1:
            raise ValueError(f"attentive probe: depth={depth} must be at least 1 (the cross-attention block)")
        self.pooler = AttentivePooler(in_features, num_heads, depth=depth, mlp_ratio=mlp_ratio)
        self.linear = nn.Linear(in_features, num_classes)
        self._init_weights(init_std)

    def _init_weights(self, init_std: float) -> None:
        # V-JEPA's init: truncated normal, then residual outputs shrunk with depth.
        trunc_normal_(self.pooler.query_tokens, std=init_std)
        for module in self.pooler.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        with torch.no_grad():
            layer_id = 0
            for layer_id, block in enumerate(self.pooler.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))
            self.pooler.cross_attention_block.mlp.fc2.weight.div_(math.sqrt(2.0 * max(layer_id, 1)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pooler(tokens)[:, 0])


def build_head(kind: HeadKind, in_features: int, num_classes: int, **kwargs) -> nn.Module:
    """A head by name: "mlp" (`MLPHead`), "attentive" (`AttentiveProbe`) or "linear" (`LinearHead`).

    Example:
        >>> build_head("attentive", 192, 4, depth=4)(torch.zeros(2, 10, 192)).shape
        torch.Size([2, 4])
    """
    heads = {"mlp": MLPHead, "attentive": AttentiveProbe, "linear": LinearHead}
    if kind not in heads:
        raise ValueError(f"head kind {kind!r} is not known; choose one of {', '.join(heads)}")
    return heads[kind](in_features, num_classes, **kwargs)


class Classifier(nn.Module):
    """Encoder + head: video (B, C, T, H, W) -> logits (B, num_classes).

    `encoder_parameters()` and `head_parameters()` give the two learning-rate groups.

    Example:
        >>> from octft.models import build_encoder
        >>> model = Classifier(build_encoder("vit_micro", img_size=32, num_frames=4), build_head("mlp", 48, 4))
        >>> optimizer = torch.optim.AdamW([
        ...     {"params": list(model.encoder_parameters()), "lr": 1e-5},
        ...     {"params": list(model.head_parameters()), "lr": 1e-3}])
    """

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(x)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.head.parameters()
