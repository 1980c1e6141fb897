"""``model.name: gpt``: the decoder-only transformer is causal, has the parameters its formula counts, ties its
head to the token embedding, starts from GPT-2's initialisation, runs stacked under the simulated backend
exactly as each worker alone, and counts its FLOPs per token as stated. Quick tier (tests/conftest.py marks
every unit test)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from hpc_localsgd.config.schema import GptConfig, ModelConfig
from hpc_localsgd.errors import ConfigError
from hpc_localsgd.train.device import has_2d_convolutions
from hpc_localsgd.train.gpt import GPT, flops_per_token, non_embedding_parameters, parameter_count
from hpc_localsgd.train.models import build_model, hidden_matrix_names
from hpc_localsgd.train.replicas import ReplicatedModel

SMALL = GptConfig(layers=2, heads=2, dim=16, seq_len=8, vocab=11)


def make_gpt(cfg: GptConfig = SMALL, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def tokens(cfg: GptConfig, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def formula_parameters(layers: int, dim: int, vocab: int, seq_len: int) -> int:
    """Token embedding (also the head), position embedding, per block c_attn 3d² + attention c_proj d²
    + c_fc 4d² + MLP c_proj 4d² + two LayerNorm weights, and the final LayerNorm."""
    return vocab * dim + seq_len * dim + layers * (12 * dim**2 + 2 * dim) + dim


@pytest.mark.parametrize("changed", [0, 3, 7])
def test_a_token_changes_its_own_and_later_logits_only(changed: int) -> None:
    model = make_gpt().eval()
    idx = tokens(SMALL, 2, SMALL.seq_len)
    other = idx.clone()
    other[:, changed] = (idx[:, changed] + 1) % SMALL.vocab
    with torch.no_grad():
        before, after = model(idx), model(other)
    assert torch.equal(before[:, :changed], after[:, :changed])
    assert not torch.allclose(before[:, changed], after[:, changed])


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("length", [1, 5, SMALL.seq_len])
def test_logits_at_every_position(batch: int, length: int) -> None:
    assert make_gpt()(tokens(SMALL, batch, length)).shape == (batch, length, SMALL.vocab)


def test_a_sequence_longer_than_seq_len_is_refused() -> None:
    with pytest.raises(ValueError, match=r"9 tokens is longer than the model's seq_len \(8\)"):
        make_gpt()(tokens(SMALL, 2, SMALL.seq_len + 1))


@pytest.mark.parametrize(
    "cfg",
    [SMALL, GptConfig(layers=1, heads=1, dim=8, seq_len=3, vocab=2), GptConfig(layers=3, heads=4, dim=32, seq_len=16)],
)
def test_parameter_count_is_the_formula(cfg: GptConfig) -> None:
    expected = formula_parameters(cfg.layers, cfg.dim, cfg.vocab, cfg.seq_len)
    model = make_gpt(cfg)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert parameter_count(cfg) == expected
    assert non_embedding_parameters(model) == expected - cfg.seq_len * cfg.dim


def test_flops_per_token_is_six_n_plus_attention() -> None:
    for cfg in (SMALL, GptConfig(layers=12, heads=12, dim=768, seq_len=1024, vocab=50304)):
        non_embedding = formula_parameters(cfg.layers, cfg.dim, cfg.vocab, cfg.seq_len) - cfg.seq_len * cfg.dim
        assert flops_per_token(cfg) == 6 * non_embedding + 12 * cfg.layers * cfg.seq_len * cfg.dim


def test_the_head_is_the_token_embedding() -> None:
    model = make_gpt()
    assert model.lm_head.weight is model.wte.weight
    names = [name for name, _ in model.named_parameters()]
    assert "wte.weight" in names and "lm_head.weight" not in names
    # Tokens 0 and 1 only in the input: the other rows of the matrix get gradient through the head alone.
    idx = torch.randint(0, 2, (2, SMALL.seq_len), generator=torch.Generator().manual_seed(2))
    before = model.wte.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    optimizer.step()
    assert not torch.equal(model.wte.weight[2:], before[2:])  # the head's gradient reached the embedding
    assert not torch.equal(model.wte.weight[:2], before[:2])
    assert torch.equal(model.lm_head.weight, model.wte.weight)


def test_initialisation_is_gpt2s() -> None:
    cfg = GptConfig(layers=4, heads=4, dim=256, seq_len=64, vocab=1000)
    model = make_gpt(cfg)
    residual_std = 0.02 / math.sqrt(2 * cfg.layers)
    for name, p in model.named_parameters():
        if p.dim() == 1:  # LayerNorm weights
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        expected = residual_std if name.endswith("c_proj.weight") else 0.02
        assert p.std().item() == pytest.approx(expected, rel=0.05), name
        assert abs(p.mean().item()) < expected / 10, name


def perturbed_replicas(workers: int) -> ReplicatedModel:
    """``workers`` copies of a GPT, each moved to its own point, so that a mix-up of rows would show."""
    replicated = ReplicatedModel(make_gpt(), workers)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in replicated.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    return replicated


def test_stacked_workers_compute_what_each_worker_alone_does() -> None:
    workers = 3
    replicated = perturbed_replicas(workers)
    idx = torch.stack([tokens(SMALL, 2, SMALL.seq_len, seed=10 + w) for w in range(workers)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = replicated(idx)
    assert not [w for w in caught if "performance drop" in str(w.message)]  # vmap's CPU attention fallback
    loss = sum(F.cross_entropy(logits[w].flatten(0, 1), idx[w].flatten()) for w in range(workers))
    assert isinstance(loss, torch.Tensor)
    loss.backward()
    for w in range(workers):
        alone = GPT(SMALL)
        alone.load_state_dict(replicated.worker_state(w))  # strict: the tied head's name is there too
        own = alone(idx[w])
        torch.testing.assert_close(logits[w], own, rtol=1e-5, atol=1e-6)
        F.cross_entropy(own.flatten(0, 1), idx[w].flatten()).backward()
        for name, p in alone.named_parameters():
            stacked = replicated.stacked_parameter(name).grad
            assert stacked is not None and p.grad is not None
            torch.testing.assert_close(stacked[w], p.grad, rtol=1e-4, atol=1e-6, msg=f"worker {w}: {name}")


def test_muon_steps_the_four_matrices_of_each_block() -> None:
    cfg = GptConfig(layers=3, heads=2, dim=16, seq_len=8, vocab=11)
    expected = [
        f"blocks.{layer}.{matrix}.weight"
        for layer in range(cfg.layers)
        for matrix in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert hidden_matrix_names(make_gpt(cfg)) == expected


def test_bf16_autocast_on_cpu_gives_finite_logits() -> None:
    model = make_gpt()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens(SMALL, 2, SMALL.seq_len))
    assert logits.dtype == torch.bfloat16
    assert logits.shape == (2, SMALL.seq_len, SMALL.vocab)
    assert torch.isfinite(logits).all()


def test_dropout_draws_in_training_only() -> None:
    cfg = GptConfig(layers=2, heads=2, dim=16, seq_len=8, vocab=11, dropout=0.2)
    model = make_gpt(cfg)
    idx = tokens(cfg, 2, cfg.seq_len)
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_build_model_gives_the_transformer() -> None:
    cfg = ModelConfig(name="gpt", gpt=SMALL)
    torch.manual_seed(0)
    model = build_model(cfg, SMALL.vocab, (SMALL.seq_len,))
    assert isinstance(model, GPT)
    assert not has_2d_convolutions(model)  # so train.channels_last: auto leaves it alone


def test_build_model_refuses_what_the_transformer_cannot_learn() -> None:
    cfg = ModelConfig(name="gpt", gpt=SMALL)
    with pytest.raises(ConfigError, match=r"^model.gpt.vocab: 11 is smaller than the data's 12 token ids; raise it$"):
        build_model(cfg, 12, (SMALL.seq_len,))
    with pytest.raises(ConfigError, match=r"model.name: gpt learns token sequences .*\(3, 32, 32\)"):
        build_model(cfg, 10, (3, 32, 32))
    with pytest.raises(ConfigError, match="model.gpt.seq_len: 8 is shorter than the data's windows of 9 tokens"):
        build_model(cfg, SMALL.vocab, (SMALL.seq_len + 1,))


def test_stacked_workers_draw_their_own_dropout() -> None:
    cfg = GptConfig(layers=2, heads=2, dim=16, seq_len=8, vocab=11, dropout=0.2)
    replicated = ReplicatedModel(make_gpt(cfg), 2).train()
    idx = tokens(cfg, 2, cfg.seq_len).expand(2, -1, -1)  # the same model and batch on both workers
    logits = replicated(idx)
    assert not torch.equal(logits[0], logits[1])
    replicated.eval()
    logits = replicated(idx)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_the_summary_line_gives_mfu_against_the_devices_peak() -> None:
    """MFU = model FLOPs per second per device / the device's dense peak at the run's precision: a GPT-2-small
    step at 500k tokens/s on one H100 SXM in bf16 is (6·N + attention) FLOPs per token × 5e5 / 989e12."""
    from hpc_localsgd.train.run import utilisation_text

    cfg = GptConfig(layers=12, heads=12, dim=768, seq_len=1024, vocab=50304)
    achieved = flops_per_token(cfg) * 500_000
    line = utilisation_text(achieved, "NVIDIA H100 80GB HBM3", "bf16")
    assert line == f" | MFU {100 * achieved / 989e12:.1f}% of NVIDIA H100 80GB HBM3's 989 TFLOPS bf16 peak"
    # 6 × 123.6M parameters (the tied embedding counted once, the position embedding not) + 12 × 12 × 1024 ×
    # 768 for attention = 0.855 GFLOP per token.
    assert flops_per_token(cfg) == 6 * (124_373_760 - 1024 * 768) + 12 * 12 * 1024 * 768
    assert "| MFU 43." in line
    pcie = utilisation_text(achieved, "NVIDIA H100 PCIe", "bf16")  # the more specific name wins
    assert pcie.endswith("NVIDIA H100 PCIe's 756 TFLOPS bf16 peak")
    assert utilisation_text(achieved, "NVIDIA GeForce RTX 4090", "bf16") == (
        " | MFU unknown (no bf16 peak known for NVIDIA GeForce RTX 4090)"
    )
