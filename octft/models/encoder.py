"""V-JEPA 2 compatible video ViT: tubelet embedding, 3-D RoPE (or sin-cos table), timm layers.

Parameter names are V-JEPA's own (`patch_embed.proj`, `blocks.{i}.attn.qkv`, `norm`, ...), so a
V-JEPA pretraining checkpoint loads strictly (see `octft.models.checkpoint`).

Example:
    >>> encoder = build_encoder("vit_micro", img_size=32, num_frames=4)
    >>> encoder(torch.zeros(2, 1, 4, 32, 32)).shape
    torch.Size([2, 8, 48])
"""

from __future__ import annotations

import inspect
import math
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

RopeLayout = Literal["vjepa2", "interleaved"]

# Widths, depths and heads as V-JEPA defines them; `vit_micro` is ours, for tests.
VIT_SIZES: dict[str, dict[str, float]] = {
    "vit_micro": {"embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 4.0},
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_ratio": 4.0},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6, "mlp_ratio": 4.0},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0},
    "vit_huge": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "mlp_ratio": 4.0},
    "vit_giant": {"embed_dim": 1408, "depth": 40, "num_heads": 22, "mlp_ratio": 48 / 11},
}


# ---------------------------------------------------------------------------------------------
# Position encodings
# ---------------------------------------------------------------------------------------------


def grid_positions(frames: int, rows: int, cols: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(frames*rows*cols, 3) float positions (time, row, column), in token order."""
    t, r, c = torch.meshgrid(
        torch.arange(frames, device=device),
        torch.arange(rows, device=device),
        torch.arange(cols, device=device),
        indexing="ij",
    )
    return torch.stack([t, r, c], dim=-1).reshape(-1, 3).float()


def rope_axis_dim(head_dim: int) -> int:
    """Channels of a head rotated per axis; V-JEPA 2 gives each of (t, h, w) an even third."""
    return 2 * ((head_dim // 3) // 2)


def rope_tables(
    positions: torch.Tensor, head_dim: int, layout: RopeLayout = "vjepa2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (N, head_dim), for `positions` (N, 3) in (time, row, column).

    A head's channels are split into three sections of `rope_axis_dim(head_dim)` channels, one
    per axis, followed by channels left unrotated (angle 0). Within a section of d channels,
    frequency i is 10000**(-i / (d/2)). Adjacent channel pairs are rotated in both layouts;
    they differ in which frequency each channel gets:
    - "vjepa2": the released V-JEPA 2 code repeats the half (`cat([theta, theta])`), so the two
      channels of a pair usually get different frequencies. Its checkpoints need this.
    - "interleaved": each pair shares one frequency (`repeat_interleave(2)`), the standard RoPE
      that V-JEPA 2.1 uses; only then does q.k depend on position differences alone.
    """
    if layout not in ("vjepa2", "interleaved"):
        raise ValueError(f"rope_layout={layout!r} is not known; use 'vjepa2' or 'interleaved'")
    axis_dim = rope_axis_dim(head_dim)
    if axis_dim == 0:
        raise ValueError(f"head_dim={head_dim} is too small for 3-D RoPE; it needs at least 6 channels per head")
    # Computed in float32 whatever the model's dtype: bf16 angles would lose whole periods.
    exponent = torch.arange(axis_dim // 2, dtype=torch.float32, device=positions.device) / (axis_dim / 2.0)
    omega = 1.0 / 10000**exponent
    angles = []
    for axis in range(3):
        theta = positions[:, axis, None].float() * omega  # (N, d/2)
        if layout == "vjepa2":
            angles.append(torch.cat([theta, theta], dim=-1))
        else:
            angles.append(theta.repeat_interleave(2, dim=-1))
    unrotated = head_dim - 3 * axis_dim
    angles.append(positions.new_zeros(positions.shape[0], unrotated, dtype=torch.float32))
    angle = torch.cat(angles, dim=-1)
    return angle.cos(), angle.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of `x` (..., N, head_dim) by the tables' angles."""
    x_pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-x_pairs[..., 1], x_pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def sincos_table(embed_dim: int, frames: int, rows: int, cols: int) -> torch.Tensor:
    """V-JEPA 1's fixed 3-D sin-cos table, (frames*rows*cols, embed_dim).

    Half the channels encode time, a quarter each row and column; each part is [sin, cos].
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim={embed_dim} must be a multiple of 4 for the sin-cos position table")
    # float64 as V-JEPA computes it (numpy), so tables match its checkpoints bit for bit in float32.
    positions = grid_positions(frames, rows, cols).double()

    def one_axis(dim: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        angle = pos[:, None] * omega
        return torch.cat([angle.sin(), angle.cos()], dim=-1)

    table = torch.cat(
        [
            one_axis(embed_dim // 2, positions[:, 0]),
            one_axis(embed_dim // 4, positions[:, 1]),
            one_axis(embed_dim // 4, positions[:, 2]),
        ],
        dim=-1,
    )
    return table.float()


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def input_as_float(x: torch.Tensor) -> torch.Tensor:
    """A batch of clips as the encoder computes on it: float32, with uint8 read as round(x * 255) of [0, 1].

    The one place where input becomes float32 (training, validation, frozen features and predict all
    enter through `VideoViT.forward_features`): batches cross from the host in their pack's dtype (uint8
    or float16, see `octft.data.dataset.resolve_pack_dtype`) and are converted here, on the device.

    >>> input_as_float(torch.tensor([0, 51, 255], dtype=torch.uint8))
    tensor([0.0000, 0.2000, 1.0000])
    """
    if x.dtype == torch.uint8:
        return x.float() / 255  # a division, not a multiply: k / 255 is then exactly what float32 packs hold
    return x.float()


class PatchEmbed3D(nn.Module):
    """Conv3d tubelets -> tokens (B, N, D) ordered time, row, column."""

    def __init__(self, patch_size: int, tubelet_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with optional 3-D RoPE on queries and keys (V-JEPA 2 names)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block.

    timm's `Block` has the same parameter names, but its forward cannot carry the RoPE tables,
    which depend on each input's grid; so this block passes them to its attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), rope))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


class VideoViT(nn.Module):
    """V-JEPA (2) video encoder: (B, C, T, H, W) -> tokens (B, N, D) ordered time, row, column.

    With `use_rope` (V-JEPA 2), positions enter as rotations of queries and keys, computed from
    each input's own grid, so any T/H/W divisible by the tubelet and patch sizes works. Without
    it (V-JEPA 1), a fixed sin-cos table `pos_embed` is added to the tokens and interpolated
    when the input's grid differs from the configured one.
    """

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        num_frames: int = 16,
        tubelet_size: int = 2,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        use_rope: bool = True,
        rope_layout: RopeLayout = "vjepa2",
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
    ):
        super().__init__()
        img_height, img_width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        for name, size, divisor in (
            ("img_size height", img_height, patch_size),
            ("img_size width", img_width, patch_size),
            ("num_frames", num_frames, tubelet_size),
        ):
            if size % divisor != 0:
                raise ValueError(f"{name}={size} is not a multiple of {divisor}; pick sizes the patches tile exactly")
        if use_rope and rope_layout not in ("vjepa2", "interleaved"):
            raise ValueError(f"rope_layout={rope_layout!r} is not known; use 'vjepa2' or 'interleaved'")
        if use_rope and rope_axis_dim(embed_dim // num_heads) == 0:
            raise ValueError(f"embed_dim/num_heads={embed_dim // num_heads} is too small for 3-D RoPE (needs >= 6)")

        self.img_size = (img_height, img_width)
        self.patch_size = patch_size
        self.num_frames = num_frames
        self.tubelet_size = tubelet_size
        self.in_chans = in_chans
        self.num_features = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.use_rope = use_rope
        self.rope_layout = rope_layout

        self.patch_embed = PatchEmbed3D(patch_size, tubelet_size, in_chans, embed_dim)
        self.grid_size = (num_frames // tubelet_size, img_height // patch_size, img_width // patch_size)
        if use_rope:
            self.pos_embed = None
        else:
            # A buffer, not a parameter: it is saved under V-JEPA's name but never trained.
            self.register_buffer("pos_embed", sincos_table(embed_dim, *self.grid_size).unsqueeze(0))
        # Stochastic depth grows linearly with depth (plain floats, so a meta-device build works).
        drop_path_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            [
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=drop_path_rates[i],
                    norm_eps=norm_eps,
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self._init_weights(init_std)

    def _init_weights(self, init_std: float) -> None:
        # V-JEPA's init, so a from-scratch run starts where V-JEPA's would.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv3d)):
                trunc_normal_(module.weight, std=init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            for layer_id, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def token_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(time, rows, columns) of tokens for an input of that size; errors name the bad size."""
        for name, size, divisor, what in (
            ("frames", frames, self.tubelet_size, "tubelet_size"),
            ("height", height, self.patch_size, "patch_size"),
            ("width", width, self.patch_size, "patch_size"),
        ):
            if size < divisor or size % divisor != 0:
                raise ValueError(
                    f"input {name}={size} is not a positive multiple of {what}={divisor}; "
                    "resize or crop the volume so the tubelets tile it exactly"
                )
        return frames // self.tubelet_size, height // self.patch_size, width // self.patch_size

    def _position_table(self, grid: tuple[int, int, int]) -> torch.Tensor:
        if grid == self.grid_size:
            return self.pos_embed
        frames, rows, cols = grid
        if grid[1:] == self.grid_size[1:] and frames <= self.grid_size[0]:
            # Fewer frames only: the table's first rows are exactly those positions (as V-JEPA does).
            return self.pos_embed[:, : frames * rows * cols]
        table = self.pos_embed.reshape(1, *self.grid_size, self.embed_dim).permute(0, 4, 1, 2, 3)
        table = F.interpolate(table, size=grid, mode="trilinear", align_corners=False)
        return table.permute(0, 2, 3, 4, 1).reshape(1, -1, self.embed_dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> normed tokens (B, N, D), N = T/tubelet * H/patch * W/patch.

        `x` is float, or uint8 holding round(x * 255) (see `input_as_float`)."""
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected input (batch, {self.in_chans}, frames, height, width), got shape {tuple(x.shape)}"
            )
        grid = self.token_grid(*x.shape[2:])
        tokens = self.patch_embed(input_as_float(x))
        rope = None
        if self.use_rope:
            # Shapes are static, so XLA sees these tables as constants of the graph.
            positions = grid_positions(*grid, device=x.device)
            rope = rope_tables(positions, self.embed_dim // self.num_heads, self.rope_layout)
        else:
            tokens = tokens + self._position_table(grid).to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens, rope)
        return self.norm(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def build_encoder(
    size: str,
    *,
    img_size: int | tuple[int, int],
    patch_size: int = 16,
    num_frames: int = 16,
    tubelet_size: int = 2,
    in_chans: int = 1,
    use_rope: bool = True,
    rope_layout: RopeLayout = "vjepa2",
    drop_path_rate: float = 0.0,
    **overrides,
) -> VideoViT:
    """A `VideoViT` of a named size (`VIT_SIZES`); `overrides` replace any of its arguments.

    Example:
        >>> encoder = build_encoder("vit_base", img_size=224, in_chans=3)
        >>> encoder.num_features
        768
    """
    if size not in VIT_SIZES:
        raise ValueError(f"encoder size {size!r} is not known; choose one of {', '.join(VIT_SIZES)}")
    known = set(inspect.signature(VideoViT.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown encoder argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    arguments = {**VIT_SIZES[size], **overrides}
    return VideoViT(
        img_size=img_size,
        patch_size=patch_size,
        num_frames=num_frames,
        tubelet_size=tubelet_size,
        in_chans=in_chans,
        use_rope=use_rope,
        rope_layout=rope_layout,
        drop_path_rate=drop_path_rate,
        **arguments,
    )


def encoder_flops_per_sample(encoder: VideoViT, frames: int, height: int, width: int) -> int:
    """Forward FLOPs (a multiply-add counts 2) of `encoder` for one (C, frames, height, width) input.

    Counted on the meta device, so no weights are copied and no arithmetic runs: ViT-B at
    16x224x224 takes well under a second. A training step costs about three times this.

    Example:
        >>> encoder_flops_per_sample(build_encoder("vit_micro", img_size=32, num_frames=4), 4, 32, 32) > 0
        True
    """
    meta_state = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in [*encoder.named_parameters(), *encoder.named_buffers()]
    }
    x = torch.empty(1, encoder.in_chans, frames, height, width, device="meta")
    # The math kernel spells attention as matmuls, which the counter knows; fused CPU kernels it does not.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            torch.func.functional_call(encoder, meta_state, (x,))
    return int(counter.get_total_flops())
