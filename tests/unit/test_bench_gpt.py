"""The bench's language model (``--model gpt``): its workload of random token ids, the run config that trains
it as nanoGPT does (AdamW, gradient clipped to norm 1), the honesty of the precision phase's comparison (the
package's step and the plain loop start from the same weights and reach the same ones), and the arithmetic
of its tokens/s and MFU figures."""

from __future__ import annotations

import pytest
import torch

from hpc_localsgd.bench import precision
from hpc_localsgd.bench.context import BenchContext, tokens_twin
from hpc_localsgd.bench.options import BenchOptions
from hpc_localsgd.bench.runner import bench_config
from hpc_localsgd.bench.stats import Figure
from hpc_localsgd.bench.workload import BATCHES_PER_RANK, EngineLoop, PlainLoop, Workload, plain_loss
from hpc_localsgd.comm import SingleCommunicator
from hpc_localsgd.config.schema import GptConfig
from hpc_localsgd.train.gpt import GPT, flops_per_token

BATCH, SEQ_LEN, VOCAB = 4, 16, 256


def gpt_options(**given: object) -> BenchOptions:
    shape = {"gpt_layers": 2, "gpt_heads": 2, "gpt_dim": 32, "gpt_seq_len": SEQ_LEN, "batch": BATCH}
    return BenchOptions.from_given(quick=True, model="gpt", device="cpu", **{**shape, **given})


def workload(options: BenchOptions | None = None, rank: int = 0) -> Workload:
    options = options or gpt_options()
    return Workload.create(bench_config(options, 1), torch.device("cpu"), rank, options.num_classes)


def context(options: BenchOptions, device: str = "cpu") -> BenchContext:
    """A context for the figure arithmetic alone: one rank, no launcher (nothing here communicates)."""
    return BenchContext(options, SingleCommunicator(), None, torch.device(device), workload(options))  # type: ignore[arg-type]


def test_the_gpt_workload_gives_int64_token_ids_of_batch_by_seq_len() -> None:
    w = workload()
    assert w.input_shape == (SEQ_LEN,) and w.num_classes == VOCAB and w.tokens_per_sample == SEQ_LEN
    assert len(w.batches) == BATCHES_PER_RANK
    for x, y in w.batches:
        for ids in (x, y):
            assert ids.dtype == torch.int64 and ids.shape == (BATCH, SEQ_LEN)
            assert 0 <= int(ids.min()) and int(ids.max()) < VOCAB
    # Seeded: the same batches again on the same rank, others on another (data-parallel shards).
    assert all(torch.equal(a, b) for a, b in zip(w.batches[0], workload().batches[0], strict=True))
    assert not torch.equal(w.batches[0][0], workload(rank=1).batches[0][0])
    model = w.new_model()
    assert isinstance(model, GPT) and model(w.batches[0][0]).shape == (BATCH, SEQ_LEN, VOCAB)
    assert workload(BenchOptions.from_given(quick=True)).tokens_per_sample is None  # a classifier


def test_the_bench_trains_the_gpt_with_adamw_clipped_as_nanogpt_does() -> None:
    cfg = bench_config(gpt_options(), 1)
    assert cfg.model.name == "gpt"
    assert cfg.model.gpt == GptConfig(layers=2, heads=2, dim=32, seq_len=SEQ_LEN, vocab=VOCAB, dropout=0.0)
    assert (cfg.optim.name, cfg.optim.clip_grad_norm, cfg.optim.weight_decay) == ("adamw", 1.0, 0.1)
    classifier = bench_config(BenchOptions.from_given(quick=True), 1)
    assert (classifier.optim.name, classifier.optim.clip_grad_norm) == ("sgd", None)  # as before


@pytest.mark.parametrize("steps", [1, 3])
def test_the_plain_loop_and_the_packages_step_start_equal_and_reach_the_same_weights(steps: int) -> None:
    """fp32 on the CPU, the same batches, AdamW on both sides, the gradient clipped on both: what makes
    precision.<p>.vs_plain a comparison of like with like."""
    w = workload()
    engine = EngineLoop("engine", w, SingleCommunicator(), "local_sgd", None)
    plain = PlainLoop(w)
    try:
        assert type(engine.optimizer) is type(plain.optimizer) is torch.optim.AdamW
        names = [name for name, _ in plain.model.named_parameters()]
        assert [name for name, _ in engine.model.named_parameters()] == names
        for a, b in zip(engine.model.parameters(), plain.model.parameters(), strict=True):
            assert torch.equal(a, b)
        # The first gradient is longer than the clip norm: clipping acts, on both sides.
        fresh = w.new_model()
        plain_loss(fresh(w.batches[0][0]), w.batches[0][1]).backward()
        assert float(torch.nn.utils.clip_grad_norm_(fresh.parameters(), float("inf"))) > 1.0
        engine.run(steps)
        plain.run(steps)
        start = dict(w.new_model().named_parameters())
        moved = dict(engine.model.named_parameters())
        assert all(not torch.equal(moved[name], start[name]) for name in names)
        for a, b in zip(engine.model.parameters(), plain.model.parameters(), strict=True):
            torch.testing.assert_close(a, b)
    finally:
        engine.close()


def test_tokens_per_s_is_samples_per_s_times_seq_len_beside_every_rate() -> None:
    ctx = context(gpt_options(precisions=("bf16",)))
    times = {"engine_eager": [0.5, 0.25], "plain_eager": [0.4, 0.3]}
    precision._add_figures(ctx, "bf16", "contiguous", times)
    by_id = {f.id: f for f in ctx.figures}
    assert [f.id for f in ctx.figures] == [
        "precision.bf16.samples_per_s",
        "precision.bf16.tokens_per_s",
        "precision.bf16.plain_samples_per_s",
        "precision.bf16.plain_tokens_per_s",
        "precision.bf16.vs_plain",
    ]
    samples = BATCH * ctx.options.window_steps()
    assert by_id["precision.bf16.samples_per_s"].samples == [samples / t for t in times["engine_eager"]]
    for rate in ("samples_per_s", "plain_samples_per_s"):
        tokens = by_id[f"precision.bf16.{rate.replace('samples', 'tokens')}"]
        assert tokens.unit == "tokens/s" and tokens.target is None
        assert tokens.samples == [v * SEQ_LEN for v in by_id[f"precision.bf16.{rate}"].samples]
    vs_plain = by_id["precision.bf16.vs_plain"]
    assert vs_plain.samples == pytest.approx([0.4 / 0.5, 0.3 / 0.25]) and vs_plain.target is not None
    # A classifier's rates have no twin, nor has any figure of another unit.
    assert tokens_twin(Figure("a.samples_per_s", "precision", "", "samples/s", [1.0]), None) is None
    assert tokens_twin(Figure("a.vs_plain", "precision", "", "ratio", [1.0]), SEQ_LEN) is None


def test_mfu_is_flops_per_token_times_tokens_per_s_per_gpu_over_the_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    ctx = context(gpt_options(precisions=("bf16",)), device="cuda")
    basis = precision.mfu_basis(ctx)
    flops = flops_per_token(ctx.workload.cfg.model.gpt)
    assert basis is not None
    assert basis["flops_per_token"] == flops and basis["device"] == "NVIDIA H100 80GB HBM3"
    assert basis["peak_flops"] == {"bf16": 989e12} and basis["reason"] is None
    times = {"engine_eager": [0.5, 0.25], "engine_compiled": [0.2, 0.4]}
    precision._add_mfu(ctx, "bf16", basis, times)
    tokens = BATCH * ctx.options.window_steps() * SEQ_LEN  # one GPU's tokens in a window
    by_id = {f.id: f for f in ctx.figures}
    for figure_id, loop in (("mfu", "engine_eager"), ("compiled_mfu", "engine_compiled")):
        figure = by_id[f"precision.bf16.{figure_id}"]
        assert figure.unit == "fraction" and any("9.89e+14" in note for note in figure.notes)
        assert figure.samples == pytest.approx([flops * tokens / t / 989e12 for t in times[loop]])
    assert ctx.skipped == []


@pytest.mark.parametrize(
    "device,name,reason",
    [
        ("cpu", None, "no GPU"),
        ("cuda", "Tesla T4", "Tesla T4: no peak for bf16 in the table (train/device.py PEAK_FLOPS)"),
    ],
)
def test_without_a_peak_the_mfu_is_null_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, device: str, name: str | None, reason: str
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    ctx = context(gpt_options(precisions=("bf16",)), device=device)
    basis = precision.mfu_basis(ctx)
    assert basis is not None and basis["peak_flops"] == {"bf16": None} and basis["reason"] == reason
    assert basis["device"] == name
    precision._add_mfu(ctx, "bf16", basis, {"engine_eager": [0.5]})
    assert ctx.figures == [] and ctx.skipped == [{"id": "precision.bf16.mfu", "reason": reason}]
    assert precision.mfu_basis(context(BenchOptions.from_given(quick=True))) is None  # a classifier: no FLOPs counted
