"""Classification heads and the encoder+head Classifier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from octft.models.encoder import build_encoder
from octft.models.heads import AttentiveProbe, Classifier, LinearHead, MLPHead, build_head

REFERENCE = Path(__file__).parents[2].parent / "shared" / "reference" / "vjepa2"


@pytest.mark.parametrize("kind", ["mlp", "attentive", "linear"])
def test_heads_map_tokens_to_logits(kind):
    head = build_head(kind, 48, 4).eval()
    logits = head(torch.randn(3, 10, 48))
    assert logits.shape == (3, 4)
    # Logits follow the tokens.
    assert not torch.allclose(head(torch.randn(3, 10, 48)), logits)


@pytest.mark.parametrize("kind", ["mlp", "attentive", "linear"])
def test_heads_ignore_token_order(kind):
    # Mean and attention pooling both treat tokens as a set: positions live in the encoder.
    head = build_head(kind, 48, 4).eval()
    tokens = torch.randn(2, 12, 48)
    shuffled = tokens[:, torch.randperm(12)]
    torch.testing.assert_close(head(shuffled), head(tokens), atol=1e-5, rtol=1e-5)


def test_build_head_passes_arguments_and_rejects_unknown_kinds():
    assert build_head("mlp", 48, 4, hidden_features=32).mlp.fc1.out_features == 32
    assert isinstance(build_head("linear", 48, 4, norm=True).norm, torch.nn.LayerNorm)
    assert isinstance(build_head("linear", 48, 4).norm, torch.nn.Identity)
    with pytest.raises(ValueError, match="'transformer' is not known; choose one of mlp, attentive, linear"):
        build_head("transformer", 48, 4)


def test_mlp_head_is_linear_gelu_dropout_linear():
    head = MLPHead(48, 4, hidden_features=16, dropout=0.1)
    tokens = torch.randn(2, 5, 48)
    pooled = tokens.mean(dim=1)
    expected = head.mlp.fc2(torch.nn.functional.gelu(head.mlp.fc1(pooled)))
    torch.testing.assert_close(head.eval()(tokens), expected)


def test_mlp_head_dropout_only_in_training():
    head = MLPHead(48, 4, dropout=0.5)
    tokens = torch.randn(4, 5, 48)
    head.train()
    torch.manual_seed(0)
    first = head(tokens)
    torch.manual_seed(1)
    assert not torch.allclose(head(tokens), first)
    head.eval()
    torch.testing.assert_close(head(tokens), head(tokens))


def test_linear_head_is_mean_pool_then_linear():
    head = LinearHead(48, 2)
    tokens = torch.randn(2, 7, 48)
    torch.testing.assert_close(head(tokens), head.linear(tokens.mean(dim=1)))


@pytest.mark.skipif(not (REFERENCE / "attentive_probe_vit_tiny_depth4_keys.tsv").is_file(), reason=f"no {REFERENCE}")
def test_attentive_probe_has_vjepa2_names_and_shapes():
    expected = []
    for line in (REFERENCE / "attentive_probe_vit_tiny_depth4_keys.tsv").read_text().splitlines():
        key, shape = line.split("\t")
        expected.append((key, [int(size) for size in shape.strip("[]").split(",")]))
    probe = AttentiveProbe(192, 2, num_heads=3, depth=4)
    assert [(key, list(tensor.shape)) for key, tensor in probe.state_dict().items()] == expected


def test_attentive_probe_defaults_to_64_channel_heads_and_one_query():
    probe = AttentiveProbe(192, 4)
    assert probe.pooler.cross_attention_block.xattn.num_heads == 3
    assert probe.pooler.query_tokens.shape == (1, 1, 192)
    assert len(probe.pooler.blocks) == 0
    assert len(AttentiveProbe(192, 4, depth=3).pooler.blocks) == 2


def test_attentive_probe_rejects_bad_settings():
    with pytest.raises(ValueError, match="in_features=100 is not divisible by num_heads=3"):
        AttentiveProbe(100, 4, num_heads=3)
    with pytest.raises(ValueError, match="depth=0"):
        AttentiveProbe(192, 4, depth=0)


def test_attentive_pooling_of_one_token_returns_its_value():
    # With a single token the attention weight is 1, so the pooled query is query + value:
    # this pins the kv layout (keys first, then values) that V-JEPA's probes were trained with.
    probe = AttentiveProbe(48, 3, num_heads=3).eval()
    block = probe.pooler.cross_attention_block
    token = torch.randn(2, 1, 48)
    with torch.no_grad():
        pooled = probe.pooler.query_tokens + block.xattn.kv(block.norm1(token))[..., 48:]
        pooled = pooled + block.mlp(block.norm2(pooled))
        torch.testing.assert_close(probe(token), probe.linear(pooled[:, 0]))


def micro_classifier(kind: str = "mlp") -> Classifier:
    torch.manual_seed(0)
    encoder = build_encoder("vit_micro", img_size=32, num_frames=4)
    return Classifier(encoder, build_head(kind, encoder.num_features, 4))


def test_classifier_runs_encoder_then_head():
    model = micro_classifier().eval()
    x = torch.randn(2, 1, 4, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        torch.testing.assert_close(tokens, model.encoder(x))
        torch.testing.assert_close(model(x), model.head(tokens))
    assert model(x).shape == (2, 4)


def test_parameter_groups_split_encoder_and_head_exactly():
    model = micro_classifier("attentive")
    encoder_ids = {id(p) for p in model.encoder_parameters()}
    head_ids = {id(p) for p in model.head_parameters()}
    assert encoder_ids.isdisjoint(head_ids)
    assert encoder_ids | head_ids == {id(p) for p in model.parameters()}
    assert encoder_ids == {id(p) for p in model.encoder.parameters()}


@pytest.mark.parametrize("kind", ["mlp", "attentive", "linear"])
def test_gradients_reach_encoder_and_head(kind):
    model = micro_classifier(kind).train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 1, 4, 32, 32)), torch.tensor([0, 3]))
    loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head_parameters())


XLA_SCRIPT = """
import torch, torch_xla
from octft.models import Classifier, build_encoder, build_head
torch.manual_seed(0)
encoder = build_encoder("vit_micro", img_size=32, num_frames=4, use_rope=True)
model = Classifier(encoder, build_head("attentive", 48, 4, depth=2)).eval()
x = torch.randn(2, 1, 4, 32, 32)
with torch.no_grad():
    expected = model(x)
    got = model.to(torch_xla.device())(x.to(torch_xla.device())).cpu()
torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
model.train()
model(x.to(torch_xla.device())).logsumexp(-1).mean().backward()
torch_xla.sync()
assert encoder.patch_embed.proj.weight.grad.abs().sum().cpu() > 0
print("ok")
"""


@pytest.mark.integration
def test_classifier_runs_on_xla_cpu(tmp_path):
    environment = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"}
    result = subprocess.run(
        [sys.executable, "-c", XLA_SCRIPT], env=environment, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
