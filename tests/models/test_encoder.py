"""The V-JEPA 2 video encoder: reference outputs, names, token order, RoPE, sin-cos, FLOPs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from octft.models.checkpoint import load_encoder_checkpoint
from octft.models.encoder import (
    VIT_SIZES,
    apply_rope,
    build_encoder,
    encoder_flops_per_sample,
    grid_positions,
    rope_axis_dim,
    rope_tables,
    sincos_table,
)

REFERENCE = Path(__file__).parents[2].parent / "shared" / "reference" / "vjepa2"
needs_reference = pytest.mark.skipif(
    not (REFERENCE / "vjepa2_rope_tiny.pt").is_file(), reason=f"V-JEPA 2 reference files not found at {REFERENCE}"
)


def micro(**overrides):
    arguments = {"img_size": 32, "num_frames": 4, "in_chans": 1} | overrides
    return build_encoder("vit_micro", **arguments)


def reference_encoder(**overrides):
    # The reference was built as VisionTransformer(**config) directly, whose LayerNorm has
    # torch's default eps 1e-5; V-JEPA's named sizes (vit_large, ...) use 1e-6, our default.
    arguments = {"img_size": (32, 48), "num_frames": 4, "in_chans": 1, "embed_dim": 96, "depth": 2, "num_heads": 3}
    return build_encoder("vit_tiny", norm_eps=1e-5, **(arguments | overrides)).eval()


def read_keys_tsv(name: str) -> list[tuple[str, list[int]]]:
    rows = []
    for line in (REFERENCE / name).read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, [int(size) for size in shape.strip("[]").split(",")]))
    return rows


@needs_reference
@pytest.mark.parametrize(
    ("key", "input_name", "output_name"),
    [
        (None, "x", "target_encoder_out"),
        ("encoder", "x", "encoder_out"),
        (None, "x_short", "target_encoder_out_short"),
    ],
)
def test_reference_checkpoint_reproduces_original_vjepa2_outputs(key, input_name, output_name):
    reference_io = torch.load(REFERENCE / "vjepa2_rope_tiny_io.pt", weights_only=True)
    encoder = reference_encoder()
    load_encoder_checkpoint(REFERENCE / "vjepa2_rope_tiny.pt", encoder, key=key)
    with torch.no_grad():
        tokens = encoder(reference_io[input_name])
    torch.testing.assert_close(tokens, reference_io[output_name], atol=1e-5, rtol=1e-5)


@needs_reference
def test_interleaved_layout_does_not_reproduce_vjepa2_outputs():
    reference_io = torch.load(REFERENCE / "vjepa2_rope_tiny_io.pt", weights_only=True)
    encoder = reference_encoder(rope_layout="interleaved")
    load_encoder_checkpoint(REFERENCE / "vjepa2_rope_tiny.pt", encoder)
    with torch.no_grad():
        tokens = encoder(reference_io["x"])
    assert (tokens - reference_io["target_encoder_out"]).abs().max() > 1e-4


@needs_reference
def test_vit_base_has_vjepa2_parameter_names_and_shapes():
    with torch.device("meta"):
        encoder = build_encoder("vit_base", img_size=224, in_chans=3, tubelet_size=2, use_rope=True)
    ours = [(key, list(tensor.shape)) for key, tensor in encoder.state_dict().items()]
    assert ours == read_keys_tsv("vit_base_rope_keys.tsv")


@pytest.mark.parametrize("size", list(VIT_SIZES))
def test_named_sizes_have_vjepa_widths(size):
    with torch.device("meta"):
        encoder = build_encoder(size, img_size=224)
    spec = VIT_SIZES[size]
    assert encoder.num_features == spec["embed_dim"]
    assert len(encoder.blocks) == spec["depth"]
    assert encoder.blocks[0].attn.num_heads == spec["num_heads"]
    assert encoder.blocks[0].mlp.fc1.out_features == int(spec["embed_dim"] * spec["mlp_ratio"])


def test_giant_mlp_width_is_vjepa_6144():
    with torch.device("meta"):
        encoder = build_encoder("vit_giant", img_size=224)
    assert encoder.blocks[0].mlp.fc1.weight.shape == (6144, 1408)


def test_forward_returns_one_token_per_tubelet():
    encoder = micro(num_frames=4, img_size=(32, 48)).eval()
    x = torch.randn(2, 1, 4, 32, 48)
    with torch.no_grad():
        tokens = encoder(x)
        torch.testing.assert_close(tokens, encoder.forward_features(x))
    assert tokens.shape == (2, 2 * 2 * 3, encoder.num_features)


@pytest.mark.parametrize("use_rope", [True, False])
def test_tokens_are_ordered_time_row_column(use_rope):
    # With no blocks each token sees only its own tubelet, so a change in one tubelet shows
    # which token index it maps to.
    encoder = micro(depth=0, img_size=(32, 48), num_frames=4, use_rope=use_rope).eval()
    x = torch.randn(1, 1, 4, 32, 48)
    changed = x.clone()
    frame, row, col = 1, 1, 2  # tubelet grid is (2, 2, 3)
    changed[:, :, 2 * frame : 2 * frame + 2, 16 * row : 16 * row + 16, 16 * col : 16 * col + 16] += 1.0
    with torch.no_grad():
        differs = (encoder(changed) - encoder(x)).abs().amax(dim=-1)[0] > 1e-6
    assert differs.nonzero().flatten().tolist() == [frame * 2 * 3 + row * 3 + col]


def test_rope_encoder_accepts_other_grid_sizes():
    encoder = micro(img_size=32, num_frames=4).eval()
    with torch.no_grad():
        tokens = encoder(torch.randn(1, 1, 6, 16, 48))
    assert tokens.shape == (1, 3 * 1 * 3, 48)
    assert torch.isfinite(tokens).all()


def test_rope_makes_outputs_depend_on_where_content_is():
    # Without positions, self-attention is permutation-equivariant: swapping the two time steps
    # of the input would just swap the output tokens. RoPE must break that.
    encoder = micro(use_rope=True).eval()
    x = torch.randn(1, 1, 4, 32, 32)
    swapped = torch.cat([x[:, :, 2:], x[:, :, :2]], dim=2)
    with torch.no_grad():
        tokens, tokens_swapped = encoder(x), encoder(swapped)
    per_frame = 4  # 2x2 tokens per time step
    tokens_permuted = torch.cat([tokens[:, per_frame:], tokens[:, :per_frame]], dim=1)
    assert not torch.allclose(tokens_swapped, tokens_permuted, atol=1e-4)


def _scores(q, k, positions_q, positions_k, layout):
    cos_q, sin_q = rope_tables(positions_q, q.shape[-1], layout)
    cos_k, sin_k = rope_tables(positions_k, k.shape[-1], layout)
    return apply_rope(q, cos_q, sin_q) @ apply_rope(k, cos_k, sin_k).transpose(-1, -2)


def test_interleaved_rope_scores_depend_only_on_position_differences():
    torch.manual_seed(0)
    head_dim = 24
    q, k = torch.randn(5, head_dim, dtype=torch.float64), torch.randn(7, head_dim, dtype=torch.float64)
    positions_q = torch.randint(0, 8, (5, 3)).double()
    positions_k = torch.randint(0, 8, (7, 3)).double()
    shift = torch.tensor([3.0, -2.0, 5.0], dtype=torch.float64)
    scores = _scores(q, k, positions_q, positions_k, "interleaved")
    shifted = _scores(q, k, positions_q + shift, positions_k + shift, "interleaved")
    # The tables are float32 whatever the input's dtype.
    torch.testing.assert_close(scores, shifted, atol=1e-5, rtol=1e-5)
    # A rotation keeps lengths.
    cos, sin = rope_tables(positions_q, head_dim, "interleaved")
    torch.testing.assert_close(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_vjepa2_rope_gives_each_channel_the_repeated_half_frequency():
    # The released V-JEPA 2 layout: in a section of d channels, channel j turns at frequency
    # omega[j mod d/2] (not omega[j // 2]), so the two channels of a pair turn at different
    # rates and scores are not shift-invariant; its checkpoints were trained that way.
    head_dim = 24
    axis_dim = rope_axis_dim(head_dim)
    omega = 1.0 / 10000 ** (torch.arange(axis_dim // 2, dtype=torch.float64) / (axis_dim / 2))
    position = torch.tensor([[2.0, 0.0, 0.0]])
    cos, _ = rope_tables(position, head_dim, "vjepa2")
    expected = torch.cos(2.0 * omega.repeat(2))
    torch.testing.assert_close(cos[0, :axis_dim].double(), expected, rtol=1e-6, atol=1e-6)
    cos_interleaved, _ = rope_tables(position, head_dim, "interleaved")
    torch.testing.assert_close(cos_interleaved[0, :axis_dim].double(), torch.cos(2.0 * omega.repeat_interleave(2)))

    torch.manual_seed(0)
    q, k = torch.randn(4, head_dim), torch.randn(4, head_dim)
    positions = torch.randint(0, 8, (4, 3)).float()
    shift = torch.tensor([3.0, 0.0, 0.0])
    assert not torch.allclose(
        _scores(q, k, positions, positions, "vjepa2"), _scores(q, k, positions + shift, positions + shift, "vjepa2")
    )


@pytest.mark.parametrize("layout", ["vjepa2", "interleaved"])
def test_rope_rotates_three_sections_and_leaves_the_rest(layout):
    head_dim = 16  # 3 sections of 4 channels, 4 channels unrotated
    x = torch.randn(6, head_dim)
    positions = grid_positions(1, 2, 3) + 1.0
    cos, sin = rope_tables(positions, head_dim, layout)
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(rotated[:, 12:], x[:, 12:])
    assert (rotated[:, :12] - x[:, :12]).abs().max() > 1e-3
    # At position zero nothing turns.
    cos0, sin0 = rope_tables(torch.zeros(6, 3), head_dim, layout)
    torch.testing.assert_close(apply_rope(x, cos0, sin0), x)


def test_rope_layouts_differ():
    positions = grid_positions(2, 2, 2)
    cos_a, _ = rope_tables(positions, 24, "vjepa2")
    cos_b, _ = rope_tables(positions, 24, "interleaved")
    assert not torch.allclose(cos_a, cos_b)


def test_sincos_table_follows_vjepa1_layout():
    embed_dim = 16
    table = sincos_table(embed_dim, 2, 3, 4)
    assert table.shape == (2 * 3 * 4, embed_dim)
    position = {(t, r, c): i for i, (t, r, c) in enumerate(grid_positions(2, 3, 4).long().tolist())}
    token = table[position[(1, 2, 3)]].double()
    half_omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    quarter_omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    expected = torch.cat(
        [
            (1 * half_omega).sin(), (1 * half_omega).cos(),
            (2 * quarter_omega).sin(), (2 * quarter_omega).cos(),
            (3 * quarter_omega).sin(), (3 * quarter_omega).cos(),
        ]
    )  # fmt: skip
    torch.testing.assert_close(token, expected, rtol=1e-6, atol=1e-6)


def test_sincos_encoder_has_fixed_pos_embed_buffer():
    encoder = micro(use_rope=False, img_size=32, num_frames=4)
    assert "pos_embed" in encoder.state_dict()
    assert encoder.state_dict()["pos_embed"].shape == (1, 2 * 2 * 2, 48)
    assert "pos_embed" not in dict(encoder.named_parameters())
    torch.testing.assert_close(encoder.pos_embed[0], sincos_table(48, 2, 2, 2))


def test_sincos_encoder_with_fewer_frames_uses_the_first_table_rows():
    encoder = micro(depth=0, use_rope=False, img_size=32, num_frames=8).eval()
    x = torch.randn(1, 1, 8, 32, 32)
    with torch.no_grad():
        full = encoder(x)
        short = encoder(x[:, :, :4])
    torch.testing.assert_close(short, full[:, : short.shape[1]])


def test_sincos_encoder_interpolates_for_a_larger_grid():
    encoder = micro(use_rope=False, img_size=32, num_frames=4).eval()
    with torch.no_grad():
        tokens = encoder(torch.randn(1, 1, 8, 48, 64))
    assert tokens.shape == (1, 4 * 3 * 4, 48)
    assert torch.isfinite(tokens).all()


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 1, 3, 32, 32), "frames=3"),
        ((1, 1, 4, 30, 32), "height=30"),
        ((1, 1, 4, 32, 8), "width=8"),
        ((1, 3, 4, 32, 32), "expected input (batch, 1, frames, height, width)"),
        ((1, 4, 32, 32), "got shape (1, 4, 32, 32)"),
    ],
)
def test_bad_input_shapes_name_the_problem(shape, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        micro()(torch.zeros(shape))


def test_bad_build_arguments_are_named():
    with pytest.raises(ValueError, match="'vit_colossal' is not known"):
        build_encoder("vit_colossal", img_size=32)
    with pytest.raises(ValueError, match="unknown encoder argument\\(s\\) embed_size; known: "):
        micro(embed_size=64)
    with pytest.raises(ValueError, match="rope_layout='axial'"):
        micro(rope_layout="axial")
    with pytest.raises(ValueError, match="num_frames=5"):
        micro(num_frames=5)
    with pytest.raises(ValueError, match="too small for 3-D RoPE"):
        micro(embed_dim=8, num_heads=4)


def test_gradients_reach_every_parameter():
    encoder = micro(drop_path_rate=0.1).train()
    encoder(torch.randn(2, 1, 4, 32, 32)).pow(2).mean().backward()
    without_grad = [name for name, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_grad == []


def test_drop_path_grows_to_the_rate_at_the_last_block():
    encoder = micro(depth=3, drop_path_rate=0.2)
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for block in encoder.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])


def _expected_flops(dim, depth, hidden, tokens, patch_volume):
    per_block = 2 * tokens * dim * (3 * dim + dim + 2 * hidden) + 4 * tokens * tokens * dim
    return 2 * tokens * dim * patch_volume + depth * per_block


def test_flops_count_matches_the_vit_formula():
    encoder = micro(img_size=32, num_frames=4)
    flops = encoder_flops_per_sample(encoder, 4, 32, 48)
    assert flops == _expected_flops(48, 2, 192, tokens=2 * 2 * 3, patch_volume=2 * 16 * 16)
    assert encoder.patch_embed.proj.weight.device.type == "cpu"  # weights were not moved


def test_flops_for_vit_base_at_16x224x224_is_feasible_on_a_small_machine():
    encoder = build_encoder("vit_base", img_size=224, in_chans=1)
    flops = encoder_flops_per_sample(encoder, 16, 224, 224)
    assert flops == _expected_flops(768, 12, 3072, tokens=8 * 14 * 14, patch_volume=2 * 16 * 16)
    assert math.isclose(flops / 1e9, 360, rel_tol=0.02)
