"""Adagrad with momentum: hand-computed updates, row updates touch only their rows, and
the C kernel (model.native) agrees with the torch path."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from model import native
from model.optim import EPSILON, AdagradMomentum, FlatParameters, grow_rows

#: Both update paths: the C kernel (where a compiler is found) and the torch ops.
PATHS = pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])


def reference(
    param: list[float], grads: list[list[float]], lr: float, mu: float, nesterov: bool
) -> list[float]:
    """The update rule in plain Python, step by step."""
    p = list(param)
    acc = [0.0] * len(p)
    velocity = [0.0] * len(p)
    for grad in grads:
        for k, g in enumerate(grad):
            acc[k] += g * g
            scaled = g / math.sqrt(acc[k] + EPSILON)
            velocity[k] = mu * velocity[k] - lr * scaled
            p[k] += mu * velocity[k] - lr * scaled if nesterov else velocity[k]
    return p


GRADS = [[0.5, -1.0, 0.0], [0.25, 2.0, -0.5], [-1.0, 0.1, 0.3]]


@PATHS
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("mu", [0.0, 0.2])
def test_flat_update_matches_the_rule(nesterov: bool, mu: float, use_native: bool) -> None:
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    flat = FlatParameters([param])
    optimizer = AdagradMomentum(lr=0.2, momentum=mu, nesterov=nesterov, native=use_native)
    for grad in GRADS:
        flat.grads[0].copy_(torch.tensor(grad))
        optimizer.step_flat(flat)
    expected = reference([1.0, 2.0, 3.0], GRADS, 0.2, mu, nesterov)
    assert param.detach().tolist() == pytest.approx(expected, rel=1e-5)


@PATHS
@pytest.mark.parametrize("nesterov", [False, True])
def test_row_updates_follow_the_rule_and_leave_other_rows_alone(
    nesterov: bool, use_native: bool
) -> None:
    table = torch.nn.Parameter(torch.arange(12, dtype=torch.float32).reshape(4, 3))
    before = table.detach().clone()
    optimizer = AdagradMomentum(lr=0.2, momentum=0.2, nesterov=nesterov, native=use_native)
    rows = torch.tensor([1, 3])
    for grad in GRADS:
        optimizer.step_rows(table, rows, torch.tensor([grad, [2 * g for g in grad]]))
    for row, scale in ((1, 1.0), (3, 2.0)):
        expected = reference(
            before[row].tolist(), [[scale * g for g in grad] for grad in GRADS], 0.2, 0.2, nesterov
        )
        assert table[row].tolist() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(table[[0, 2]], before[[0, 2]])


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_the_kernel_is_built_where_a_compiler_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMREC_NATIVE", raising=False)
    param, state = torch.zeros(2, 3), torch.zeros(2, 6)
    assert native.adagrad_momentum_rows_(
        param, state, None, torch.ones(2, 3), 0.1, 0.0, EPSILON, False
    )
    assert torch.allclose(param, torch.full((2, 3), -0.1))


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
@pytest.mark.parametrize("rows", [[0, 2], [-1], [1, 0, 3]], ids=["past-end", "negative", "count"])
def test_the_kernel_refuses_rows_outside_the_parameter(
    rows: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STREAMREC_NATIVE", raising=False)
    param, state = torch.zeros(2, 3), torch.zeros(2, 6)
    with pytest.raises(IndexError):
        native.adagrad_momentum_rows_(
            param, state, torch.tensor(rows), torch.ones(2, 3), 0.1, 0.0, EPSILON, False
        )
    assert not param.any() and not state.any()


def test_the_kernel_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_NATIVE", "0")
    param, state = torch.zeros(2, 3), torch.zeros(2, 6)
    assert not native.adagrad_momentum_rows_(
        param, state, None, torch.ones(2, 3), 0.1, 0.0, EPSILON, False
    )
    assert not param.any()


@pytest.mark.parametrize(
    "compiler", [shutil.which("false") or "false", "/no/such/cc"], ids=["fails", "missing"]
)
def test_a_failed_build_warns_once_and_leaves_the_update_to_torch(
    compiler: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("STREAMREC_NATIVE", raising=False)
    monkeypatch.setenv("CC", compiler)
    native._library.cache_clear()
    try:
        table = torch.nn.Parameter(torch.zeros(2, 3))
        optimizer = AdagradMomentum(lr=0.2, momentum=0.0)
        for _ in range(2):
            optimizer.step_rows(table, torch.tensor([1]), torch.ones(1, 3))
    finally:
        native._library.cache_clear()
    failed = "compiling adagrad_rows.c and rank_blocks.c failed"
    assert sum(failed in r.getMessage() for r in caplog.records) == 1
    expected = -(0.2 + 0.2 / math.sqrt(2))  # Adagrad: the second step is 1/sqrt(2) the first
    assert table[1].tolist() == pytest.approx([expected] * 3, rel=1e-4) and not table[0].any()


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
@pytest.mark.parametrize("nesterov", [False, True])
def test_kernel_and_torch_path_agree_on_a_training_like_update(
    nesterov: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hundreds of steps over scattered, varying rows of a wide table and a flat vector."""
    monkeypatch.delenv("STREAMREC_NATIVE", raising=False)
    generator = torch.Generator().manual_seed(0)
    tables = [torch.nn.Parameter(torch.randn(500, 40, generator=generator)) for _ in range(2)]
    dense = [[torch.nn.Parameter(torch.randn(7, 30, generator=generator))] for _ in range(2)]
    dense[1][0].data.copy_(dense[0][0].data)
    tables[1].data.copy_(tables[0].data)
    start = tables[0].detach().clone()
    flats = [FlatParameters(d) for d in dense]
    optimizers = [AdagradMomentum(0.2, 0.2, nesterov, native=use) for use in (True, False)]
    for _ in range(200):
        rows = torch.randperm(500, generator=generator)[:120].sort().values
        grad = torch.randn(120, 40, generator=generator)
        flat_grad = torch.randn(210, generator=generator)
        for table, flat, optimizer in zip(tables, flats, optimizers):
            optimizer.step_rows(table, rows, grad)
            flat.grad.copy_(flat_grad)
            optimizer.step_flat(flat)
    torch.testing.assert_close(tables[0], tables[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flats[0].values, flats[1].values, rtol=1e-5, atol=1e-5)
    assert (tables[0] - start).abs().max() > 0.5  # the steps did move the rows


def test_flat_parameters_are_views_of_one_vector() -> None:
    a = torch.nn.Parameter(torch.ones(2, 3))
    b = torch.nn.Parameter(torch.zeros(4))
    flat = FlatParameters([a, b])
    flat.values.add_(1.0)
    assert torch.equal(a.detach(), torch.full((2, 3), 2.0))
    assert torch.equal(b.detach(), torch.ones(4))
    flat.grads[1].fill_(5.0)
    assert flat.grad[-4:].tolist() == [5.0] * 4


# --- carrying the state -----------------------------------------------------------------------


def two_kinds() -> tuple[dict[str, torch.nn.Parameter], FlatParameters]:
    """A table updated by rows and two small parameters updated as one flat vector."""
    generator = torch.Generator().manual_seed(0)
    params = {
        "table": torch.nn.Parameter(torch.randn(5, 3, generator=generator)),
        "matrix": torch.nn.Parameter(torch.randn(2, 3, generator=generator)),
        "bias": torch.nn.Parameter(torch.randn(4, generator=generator)),
    }
    return params, FlatParameters([params["matrix"], params["bias"]])


def run_steps(
    optimizer: AdagradMomentum,
    params: dict[str, torch.nn.Parameter],
    flat: FlatParameters,
    steps: range,
) -> None:
    for k in steps:
        generator = torch.Generator().manual_seed(100 + k)
        flat.grad.copy_(torch.randn(flat.grad.shape, generator=generator))
        optimizer.step_flat(flat)
        rows = torch.tensor([k % 5, (k + 2) % 5])
        optimizer.step_rows(params["table"], rows, torch.randn(2, 3, generator=generator))


@pytest.mark.parametrize("nesterov", [False, True])
def test_an_exported_state_resumes_the_optimisation_exactly(nesterov: bool) -> None:
    straight, straight_flat = two_kinds()
    optimizer = AdagradMomentum(lr=0.2, momentum=0.2, nesterov=nesterov)
    run_steps(optimizer, straight, straight_flat, range(6))

    first, first_flat = two_kinds()
    optimizer = AdagradMomentum(lr=0.2, momentum=0.2, nesterov=nesterov)
    run_steps(optimizer, first, first_flat, range(3))
    state = optimizer.export_state(first, first_flat)
    assert {name: tuple(t.shape) for name, t in state.items()} == {
        "table": (5, 6),
        "matrix": (2, 6),
        "bias": (8,),
    }
    # a new optimizer (and new parameter objects, as after loading a saved model)
    second, second_flat = two_kinds()
    with torch.no_grad():
        for name in second:
            second[name].copy_(first[name])
    resumed = AdagradMomentum(lr=0.2, momentum=0.2, nesterov=nesterov)
    resumed.import_state(second, state, second_flat)
    run_steps(resumed, second, second_flat, range(3, 6))
    for name in straight:
        torch.testing.assert_close(second[name], straight[name], rtol=1e-6, atol=1e-6)
    # the export is a copy: stepping on does not change it
    before = {name: t.clone() for name, t in state.items()}
    run_steps(resumed, second, second_flat, range(6, 8))
    assert all(torch.equal(state[name], before[name]) for name in state)


def test_the_packed_state_is_accumulator_then_velocity() -> None:
    param = torch.nn.Parameter(torch.zeros(1, 2))
    optimizer = AdagradMomentum(lr=0.5, momentum=0.0)
    optimizer.step_rows(param, torch.tensor([0]), torch.tensor([[3.0, -4.0]]))
    state = optimizer.export_state({"p": param})["p"]
    accumulator, velocity = state[0, :2], state[0, 2:]
    assert accumulator.tolist() == pytest.approx([9.0, 16.0])
    assert velocity.tolist() == pytest.approx(
        [-0.5 * 3 / math.sqrt(9 + EPSILON), 0.5 * 4 / math.sqrt(16 + EPSILON)]
    )


def test_a_parameter_never_stepped_has_no_state_to_export() -> None:
    params, flat = two_kinds()
    assert AdagradMomentum(lr=0.1, momentum=0.0).export_state(params, flat) == {}


def test_import_refuses_missing_or_misshapen_state() -> None:
    params, flat = two_kinds()
    optimizer = AdagradMomentum(lr=0.2, momentum=0.2)
    run_steps(optimizer, params, flat, range(2))
    state = optimizer.export_state(params, flat)
    with pytest.raises(ValueError, match="do not match"):
        AdagradMomentum(lr=0.2, momentum=0.2).import_state(
            params, {k: v for k, v in state.items() if k != "bias"}, flat
        )
    with pytest.raises(ValueError, match="table"):
        AdagradMomentum(lr=0.2, momentum=0.2).import_state(
            params, {**state, "table": state["table"][:4]}, flat
        )


def test_growing_the_state_keeps_old_rows_and_starts_new_ones_at_zero() -> None:
    params, flat = two_kinds()
    optimizer = AdagradMomentum(lr=0.2, momentum=0.2)
    run_steps(optimizer, params, flat, range(5))
    state = optimizer.export_state(params, flat)
    grown = grow_rows(state, ("table", "absent"), 8)
    assert grown["table"].shape == (8, 6)
    assert torch.equal(grown["table"][:5], state["table"])
    assert torch.equal(grown["table"][5:], torch.zeros(3, 6))
    assert grown["matrix"] is state["matrix"] and grown["bias"] is state["bias"]
    assert grow_rows(state, ("table",), 5)["table"] is state["table"]
    with pytest.raises(ValueError, match="shrink"):
        grow_rows(state, ("table",), 4)
