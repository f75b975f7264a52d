"""LatentTable: row-sparse Adam == one torch.optim.Adam per sample, sharding-independent init, state I/O."""

from __future__ import annotations

import io

import pytest
import safetensors.torch
import torch

from hypersort_ray.errors import ModelError
from hypersort_ray.model.latents import LatentTable, initial_latent, row_seed

LR, BETAS = 1e-2, (0.7, 0.9)


def _batches(n_steps: int, n_rows: int, dim: int, *, seed: int = 0):
    """An irregular visiting pattern: rows 0-1 very often, 2..n-3 sometimes, the last two never;
    duplicates within a batch happen."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        size = int(torch.randint(1, 6, (1,), generator=gen))
        idx = torch.randint(0, n_rows - 2, (size,), generator=gen)
        idx = torch.where(torch.rand(size, generator=gen) < 0.5, idx % 2, idx)
        yield idx, torch.randn(size, dim, generator=gen, dtype=torch.float64)


class _PerSampleAdam:
    """The reference: one Parameter and one Adam per sample, the Adam created at the first visit."""

    def __init__(self, table: LatentTable) -> None:
        self.params = {i: torch.nn.Parameter(table.values([i])[0].clone()) for i in table.indices}
        self.optims: dict[int, torch.optim.Adam] = {}

    def step(self, idx: torch.Tensor, grad: torch.Tensor) -> None:
        acc: dict[int, torch.Tensor] = {}
        for i, g in zip(idx.tolist(), grad, strict=True):  # autograd sums a duplicated leaf's grads
            acc[i] = acc[i] + g if i in acc else g.clone()
        for i, g in acc.items():
            if i not in self.optims:
                self.optims[i] = torch.optim.Adam([self.params[i]], lr=LR, betas=BETAS)
            self.params[i].grad = g
            self.optims[i].step()

    def values(self) -> torch.Tensor:
        return torch.stack([self.params[i].detach() for i in sorted(self.params)])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_row_sparse_adam_matches_one_torch_adam_per_sample(dtype):
    table = LatentTable(range(9), dim=3, lr=LR, betas=BETAS, seed=4, dtype=dtype)
    ref = _PerSampleAdam(table)
    start = table.values()
    visits = torch.zeros(9, dtype=torch.int64)
    saw_duplicate = False
    for idx, grad in _batches(150, 9, 3):
        table.apply_gradients(idx, grad.to(dtype))
        ref.step(idx, grad.to(dtype))
        visits[torch.unique(idx)] += 1
        saw_duplicate |= torch.unique(idx).numel() < idx.numel()
    assert saw_duplicate
    torch.testing.assert_close(
        table.values(), ref.values(), rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0
    )
    assert table.step_counts().tolist() == visits.tolist()
    assert visits[-2:].tolist() == [0, 0] and visits[0] > 50 and visits[2:-2].min() > 0
    # Never-visited rows kept their initial value and zero moments.
    assert torch.equal(table.values([7, 8]), start[7:])
    state = table.state_dict()
    assert not state["exp_avg"][7:].any() and not state["exp_avg_sq"][7:].any()


def test_apply_gradients_sums_duplicates_and_steps_once():
    a = LatentTable([0, 1, 2], dim=2, lr=LR, dtype=torch.float64)
    b = LatentTable([0, 1, 2], dim=2, lr=LR, dtype=torch.float64)
    g = torch.tensor([[1.0, -2.0], [0.5, 0.25], [3.0, 1.0]], dtype=torch.float64)
    a.apply_gradients(torch.tensor([2, 0, 2]), g)
    b.apply_gradients(torch.tensor([0, 2]), torch.stack([g[1], g[0] + g[2]]))
    assert torch.equal(a.values(), b.values())
    assert a.step_counts().tolist() == [1, 0, 1]


def test_unvisited_rows_never_move_even_with_momentum():
    table = LatentTable(range(4), dim=2, lr=0.1)
    start = table.values()
    for _ in range(5):
        table.apply_gradients(torch.tensor([0]), torch.ones(1, 2))
    # A dense Adam would keep moving row 0's neighbours by momentum; here only row 0 moves.
    assert torch.equal(table.values([1, 2, 3]), start[1:])
    assert not torch.equal(table.values([0]), start[:1])
    table.apply_gradients(torch.tensor([1]), torch.zeros(1, 2))  # a zero grad still counts as a visit
    assert table.step_counts().tolist() == [5, 1, 0, 0]


def test_gather_returns_a_leaf_copy_on_the_table_device():
    table = LatentTable([3, 8], dim=2)
    lam = table.gather(torch.tensor([8, 3, 8]))
    assert lam.shape == (3, 2) and lam.requires_grad and lam.is_leaf and lam.device == table.device
    assert torch.equal(lam[0], lam[2]) and torch.equal(lam[1], table.values([3])[0])
    with torch.no_grad():
        lam.add_(1.0)
    assert not torch.equal(table.values([8])[0], lam[0].detach())


def test_foreign_index_is_a_clear_error():
    table = LatentTable([0, 2, 4], dim=2)
    with pytest.raises(ModelError, match=r"sample index \[3\] is not in this latent table"):
        table.gather(torch.tensor([0, 3]))
    with pytest.raises(ModelError, match=r"\[5\]"):
        table.apply_gradients(torch.tensor([5]), torch.zeros(1, 2))
    with pytest.raises(ModelError, match="shape"):
        table.apply_gradients(torch.tensor([0]), torch.zeros(2, 2))
    assert 2 in table and 3 not in table and len(table) == 3


def test_non_finite_gradient_is_rejected_without_touching_the_table():
    table = LatentTable([0, 1], dim=2)
    before = table.state_dict()
    with pytest.raises(ModelError, match=r"non-finite latent gradient for sample \[1\]"):
        table.apply_gradients(torch.tensor([0, 1]), torch.tensor([[1.0, 1.0], [float("nan"), 0.0]]))
    after = table.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_init_depends_only_on_seed_and_index():
    world = 3
    full = LatentTable(range(20), dim=4, seed=7)
    shards = [LatentTable([i for i in range(20) if i % world == w], dim=4, seed=7) for w in range(world)]
    assert torch.equal(LatentTable.merge(shards).values(), full.values())
    reordered = LatentTable([19, 4, 0, 11], dim=4, seed=7)
    assert torch.equal(reordered.values(), full.values([0, 4, 11, 19]))
    assert not torch.equal(LatentTable(range(20), dim=4, seed=8).values(), full.values())
    # The documented rule, and float32 = rounded float64 draw.
    assert row_seed(7, 5) == 7 * 1_000_003 + 5
    assert torch.equal(full.values([5])[0], (initial_latent(5, 4, seed=7) * 1).to(torch.float32))
    assert torch.equal(full.step_counts(), torch.zeros(20, dtype=torch.int64))
    # init_std scales the draw; std of many rows is near it.
    big = LatentTable(range(2000), dim=2, init_std=0.05)
    assert abs(float(big.values().std()) - 0.05) < 0.005


def test_constructor_rejects_bad_indices():
    with pytest.raises(ModelError, match="duplicated"):
        LatentTable([1, 2, 1], dim=2)
    with pytest.raises(ModelError, match=">= 0"):
        LatentTable([-1], dim=2)
    with pytest.raises(ModelError, match="dim"):
        LatentTable([0], dim=0)


def _trained(indices=range(10), steps=40, seed=1) -> LatentTable:
    table = LatentTable(indices, dim=3, lr=LR, seed=seed, dtype=torch.float64)
    for idx, grad in _batches(steps, len(table), 3, seed=seed):
        table.apply_gradients(torch.tensor(table.indices)[idx], grad)
    return table


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_import_merge_shard_round_trip_keep_optimizer_state():
    full = _trained()
    evens, odds = full.shard(range(0, 10, 2)), full.shard(range(1, 10, 2))
    assert evens.indices == [0, 2, 4, 6, 8]
    assert torch.equal(evens.step_counts(), full.step_counts(evens.indices))
    assert _same_state(LatentTable.merge([odds, evens.state_dict()]).state_dict(), full.state_dict())

    rows = full.export_rows([9, 1])
    assert rows["indices"].tolist() == [1, 9]
    evens.import_rows(rows)  # adds 1 and 9
    assert evens.indices == [0, 1, 2, 4, 6, 8, 9]
    assert _same_state(evens.export_rows([1, 9]), rows)
    # Overwrite an existing row with another table's version of it.
    other = LatentTable([2], dim=3, lr=LR, seed=99, dtype=torch.float64)
    evens.import_rows(other.export_rows([2]))
    assert torch.equal(evens.values([2]), other.values()) and evens.step_counts([2]).tolist() == [0]

    # Re-sharding 2 workers -> 3 workers, and continuing training, equals training the full table.
    regrouped = [LatentTable.merge([full]).shard([i for i in range(10) if i % 3 == w]) for w in range(3)]
    g = torch.randn(10, 3, dtype=torch.float64)
    full.apply_gradients(torch.arange(10), g)
    for shard in regrouped:
        shard.apply_gradients(torch.tensor(shard.indices), g[shard.indices])
    assert _same_state(LatentTable.merge(regrouped).state_dict(), full.state_dict())


def test_merge_rejects_conflicting_duplicates_and_accepts_identical_ones():
    full = _trained()
    a, b = full.shard([0, 1, 2]), full.shard([2, 3])
    assert LatentTable.merge([a, b]).indices == [0, 1, 2, 3]  # identical copy of row 2: fine
    b.apply_gradients(torch.tensor([2]), torch.ones(1, 3, dtype=torch.float64))
    with pytest.raises(ModelError, match="sample 2 is held by shards 0 and 1 with different values"):
        LatentTable.merge([a, b])
    with pytest.raises(ModelError, match="disagree on the latent optimizer's lr"):
        LatentTable.merge([LatentTable([0], dim=2, lr=0.1), LatentTable([1], dim=2, lr=0.2)])
    assert LatentTable.merge([LatentTable([0], dim=2, lr=0.1), LatentTable([1], dim=2)], lr=0.5).lr == 0.5
    with pytest.raises(ModelError, match="latent dims"):
        LatentTable.merge([LatentTable([0], dim=2), LatentTable([1], dim=3)])


def test_load_state_dict_is_strict_about_samples():
    a = _trained()
    b = LatentTable(range(10), dim=3, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    assert _same_state(a.state_dict(), b.state_dict())
    shard = LatentTable([0, 1], dim=3, dtype=torch.float64)
    with pytest.raises(ModelError, match="other samples"):
        shard.load_state_dict(a.state_dict())
    shard.load_state_dict(a.state_dict(), strict=False)
    assert shard.indices == list(range(10))


def _via_safetensors(state: dict) -> dict:
    return safetensors.torch.load(safetensors.torch.save(state))


def _via_torch_save(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


@pytest.mark.parametrize("roundtrip", [_via_safetensors, _via_torch_save])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_dict_round_trip_gives_bit_identical_next_updates(roundtrip, dtype):
    table = LatentTable(range(6), dim=2, lr=LR, seed=3, dtype=dtype)
    for idx, grad in _batches(20, 6, 2, seed=5):
        table.apply_gradients(idx, grad.to(dtype))
    state = roundtrip(table.state_dict())
    assert all(v.dim() == 0 for k, v in state.items() if k in ("lr", "beta1", "beta2", "eps", "seed", "dim"))
    restored = LatentTable.from_state_dict(state)
    assert restored.dtype == dtype and restored.betas == table.betas and restored.lr == table.lr
    for idx, grad in _batches(20, 6, 2, seed=6):
        table.apply_gradients(idx, grad.to(dtype))
        restored.apply_gradients(idx, grad.to(dtype))
    assert _same_state(table.state_dict(), restored.state_dict())


def test_empty_shard_round_trips():
    # More workers than samples: a worker may own nothing.
    empty = LatentTable([], dim=2)
    assert len(empty) == 0 and empty.values().shape == (0, 2)
    again = LatentTable.from_state_dict(_via_safetensors(empty.state_dict()))
    assert again.dim == 2 and len(again) == 0
    empty.apply_gradients(torch.tensor([], dtype=torch.int64), torch.zeros(0, 2))
    assert LatentTable.merge([empty, LatentTable([0], dim=2)]).indices == [0]


def test_to_device_moves_everything():
    table = LatentTable([0, 1], dim=2).to("cpu")
    assert table.gather(torch.tensor([1])).device.type == "cpu"
    assert all(v.device.type == "cpu" for v in table.state_dict().values())
