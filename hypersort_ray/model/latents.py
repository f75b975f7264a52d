"""Per-sample latent vectors λ_n with a row-sparse Adam.

HyperSORT gives every training sample ``n`` its own trainable latent ``λ_n ∈ R^d``. The reference code
keeps one ``torch.optim.Adam`` per sample (created at the sample's first visit, betas (0.7, 0.9)), so a
sample's latent moves only in the steps that visit it, with its own step count and bias correction.
:class:`LatentTable` stores the latents of one worker's samples as a dense ``[N, d]`` table plus per-row
Adam state and reproduces that behaviour exactly, without thousands of optimizer objects. A dense Adam
over the whole table would be wrong: its momentum keeps moving rows that were not visited.

Initialisation depends only on ``(seed, sample index)`` (see :func:`initial_latent`), so the union of
the shards of W workers starts from the very same latents as one worker that owns every sample.

This module is core math: it imports nothing from Ray, MLflow or Serve.

Example:
    >>> import torch
    >>> table = LatentTable([0, 2, 4], dim=2, seed=0)
    >>> lam = table.gather(torch.tensor([4, 0]))          # [2, 2] leaf, requires_grad
    >>> lam.abs().sum().backward()
    >>> table.apply_gradients(torch.tensor([4, 0]), lam.grad)
    >>> table.step_counts().tolist()                      # row 2 was not visited
    [1, 0, 1]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hypersort_ray.errors import ModelError

__all__ = ["LatentTable", "initial_latent", "row_seed", "ROW_SEED_MULTIPLIER"]

# Row n of a table built with seed s is drawn from a generator seeded with (s * M + n) mod 2**64. M is a
# prime larger than any realistic dataset, so (seed, index) pairs of datasets below a million samples
# never share a stream.
ROW_SEED_MULTIPLIER = 1_000_003

_STATE_KEYS = ("indices", "values", "exp_avg", "exp_avg_sq", "step")
_FLOAT_HP = ("lr", "beta1", "beta2", "eps", "init_std")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def row_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index``'s initial latent: ``(seed * 1_000_003 + index) mod 2**64``.

    Args:
        seed: the table's seed (``training.seed``).
        index: the sample index in the datalist.

    Example:
        >>> row_seed(0, 7), row_seed(1, 7)
        (7, 1000010)
    """
    return (int(seed) * ROW_SEED_MULTIPLIER + int(index)) % 2**64


def initial_latent(index: int, dim: int, *, seed: int = 0, init_std: float = 0.05) -> Tensor:
    """The initial latent of one sample, in float64: ``init_std * randn(dim)`` from :func:`row_seed`.

    The draw is made in float64 whatever the table's dtype, so float32 and float64 tables start from
    the same values up to rounding.

    Args:
        index: sample index.
        dim: latent dimension.
        seed: table seed.
        init_std: standard deviation of the normal draw.

    Example:
        >>> torch.equal(initial_latent(3, 2, seed=1), initial_latent(3, 2, seed=1))
        True
    """
    gen = torch.Generator().manual_seed(row_seed(seed, index))
    return torch.randn(dim, generator=gen, dtype=torch.float64) * init_std


def _preview(items: Sequence[int], limit: int = 10) -> str:
    """``[1, 2, 3]`` or ``[1, 2, ..., (25 in all)]`` for error messages."""
    items = list(items)
    if len(items) <= limit:
        return str(items)
    return "[" + ", ".join(str(i) for i in items[:limit]) + f", ... ({len(items)} in all)]"


def _as_index_tensor(index: Any, what: str) -> Tensor:
    """A 1-D int64 CPU-or-device tensor from a tensor, array or sequence of ints."""
    if isinstance(index, Tensor):
        t = index.detach()
    else:
        try:
            t = torch.as_tensor(index if not isinstance(index, range) else list(index))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ModelError(
                f"{what}: expected sample indices (integers), got {type(index).__name__}"
            ) from exc
    if t.numel() == 0:
        return t.reshape(0).to(torch.int64)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ModelError(f"{what}: sample indices must be integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ModelError(f"{what}: sample indices must be a 1-D tensor, got shape {tuple(t.shape)}")
    return t.to(torch.int64)


def _sorted_unique_indices(indices: Any, what: str) -> Tensor:
    """Validate indices for a new table: non-negative, no duplicates; returned sorted, on the CPU."""
    t = _as_index_tensor(indices, what).cpu()
    if t.numel() and int(t.min()) < 0:
        raise ModelError(f"{what}: sample indices must be >= 0, got {_preview(t[t < 0].tolist())}")
    t, _ = torch.sort(t)
    dup = t[1:][t[1:] == t[:-1]]
    if dup.numel():
        raise ModelError(f"{what}: duplicated sample indices {_preview(torch.unique(dup).tolist())}")
    return t


def _check_hyperparams(lr: float, betas: Sequence[float], eps: float, init_std: float, seed: int) -> None:
    if not lr >= 0:
        raise ModelError(f"latent optimizer: lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ModelError(f"latent optimizer: betas must be two values in [0, 1), got {tuple(betas)}")
    if not eps >= 0:
        raise ModelError(f"latent optimizer: eps must be >= 0, got {eps}")
    if not init_std >= 0:
        raise ModelError(f"latent table: init_std must be >= 0, got {init_std}")
    if not _INT64_MIN <= int(seed) <= _INT64_MAX:
        raise ModelError(f"latent table: seed must fit in int64, got {seed}")


class LatentTable:
    """The latents of a set of samples, each row with its own Adam state (row-sparse Adam).

    Rows are kept sorted by sample index. :meth:`apply_gradients` steps exactly the rows named in the
    call, once each, with the update of ``torch.optim.Adam`` (no weight decay, no amsgrad) using the
    row's own step count for bias correction; all other rows keep their value and moments untouched.
    That is the reference's "one Adam per sample, created lazily" behaviour: a never-visited row has
    step 0 and zero moments, exactly as an Adam whose ``step()`` was never called.

    Args:
        indices: the sample indices this table owns (any order; must be distinct and >= 0).
        dim: latent dimension d.
        init_std: standard deviation of the initial latents (see :func:`initial_latent`).
        lr: Adam learning rate.
        betas: Adam (beta1, beta2); the reference uses (0.7, 0.9).
        eps: Adam epsilon.
        seed: initialisation seed; row n gets :func:`initial_latent` (n, dim, seed=seed), so the values
            do not depend on which other rows the table holds.
        dtype: dtype of the values and moments.
        device: where the tensors live; :meth:`gather` returns tensors there.

    Example:
        >>> import torch
        >>> full = LatentTable(range(6), dim=3, seed=5)
        >>> half = LatentTable([1, 3, 5], dim=3, seed=5)
        >>> torch.equal(full.values(torch.tensor([1, 3, 5])), half.values())
        True
    """

    def __init__(
        self,
        indices: Sequence[int] | Tensor,
        dim: int,
        *,
        init_std: float = 0.05,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.7, 0.9),
        eps: float = 1e-8,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if int(dim) < 1:
            raise ModelError(f"latent table: dim must be >= 1, got {dim}")
        _check_hyperparams(lr, betas, eps, init_std, seed)
        idx = _sorted_unique_indices(indices, "latent table")
        dim = int(dim)
        values = torch.empty(len(idx), dim, dtype=torch.float64)
        for row, n in enumerate(idx.tolist()):
            values[row] = initial_latent(n, dim, seed=seed, init_std=init_std)
        self._set_state(
            indices=idx,
            values=values.to(dtype),
            exp_avg=torch.zeros(len(idx), dim, dtype=dtype),
            exp_avg_sq=torch.zeros(len(idx), dim, dtype=dtype),
            step=torch.zeros(len(idx), dtype=torch.int64),
            device=torch.device(device) if device is not None else torch.device("cpu"),
        )
        self._dim = dim
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.init_std = float(init_std)
        self.seed = int(seed)

    # ------------------------------------------------------------------------------------ internals
    def _set_state(
        self,
        *,
        indices: Tensor,
        values: Tensor,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        step: Tensor,
        device: torch.device,
    ) -> None:
        self._indices = indices.to(device=device, dtype=torch.int64).contiguous()
        self._values = values.to(device).contiguous()
        self._exp_avg = exp_avg.to(device=device, dtype=values.dtype).contiguous()
        self._exp_avg_sq = exp_avg_sq.to(device=device, dtype=values.dtype).contiguous()
        self._step = step.to(device=device, dtype=torch.int64).contiguous()

    @classmethod
    def _from_parts(cls, parts: dict[str, Tensor], hp: dict[str, Any], device: torch.device) -> LatentTable:
        """Build a table from validated, index-sorted parts without drawing initial values."""
        table = cls.__new__(cls)
        table._set_state(
            indices=parts["indices"],
            values=parts["values"],
            exp_avg=parts["exp_avg"],
            exp_avg_sq=parts["exp_avg_sq"],
            step=parts["step"],
            device=device,
        )
        table._dim = int(parts["values"].shape[1])
        table.lr = float(hp["lr"])
        table.betas = (float(hp["beta1"]), float(hp["beta2"]))
        table.eps = float(hp["eps"])
        table.init_std = float(hp["init_std"])
        table.seed = int(hp["seed"])
        _check_hyperparams(table.lr, table.betas, table.eps, table.init_std, table.seed)
        return table

    def _hyperparams(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "beta1": self.betas[0],
            "beta2": self.betas[1],
            "eps": self.eps,
            "init_std": self.init_std,
            "seed": self.seed,
        }

    def _rows(self, index: Any, what: str) -> Tensor:
        """Row positions of the given sample indices; a clear error for any index this table lacks."""
        idx = _as_index_tensor(index, what).to(self._indices.device)
        n = self._indices.numel()
        if idx.numel() == 0:
            return idx
        if n == 0:
            found = torch.zeros_like(idx, dtype=torch.bool)
            pos = torch.zeros_like(idx)
        else:
            pos = torch.searchsorted(self._indices, idx).clamp_(max=n - 1)
            found = self._indices[pos] == idx
        if not bool(found.all()):
            missing = torch.unique(idx[~found]).tolist()
            raise ModelError(
                f"{what}: sample index {_preview(missing)} is not in this latent table "
                f"(it holds {n} samples: {_preview(self.indices)}); the sample belongs to another "
                "worker's shard or the table was built for another datalist"
            )
        return pos

    # ------------------------------------------------------------------------------------ properties
    @property
    def indices(self) -> list[int]:
        """The sample indices held, ascending."""
        return self._indices.tolist()

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def dtype(self) -> torch.dtype:
        return self._values.dtype

    @property
    def device(self) -> torch.device:
        return self._values.device

    def __len__(self) -> int:
        return int(self._indices.numel())

    def __contains__(self, index: object) -> bool:
        try:
            n = int(index)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False
        pos = int(torch.searchsorted(self._indices, torch.tensor([n], device=self._indices.device)))
        return pos < len(self) and int(self._indices[pos]) == n

    def __repr__(self) -> str:
        visited = int((self._step > 0).sum()) if len(self) else 0
        return (
            f"LatentTable(samples={len(self)}, dim={self.dim}, visited={visited}, dtype={self.dtype}, "
            f"device={self.device}, lr={self.lr}, betas={self.betas})"
        )

    # ------------------------------------------------------------------------------------ training
    def gather(self, index: Tensor | Sequence[int]) -> Tensor:
        """The latents of a batch, as a fresh leaf tensor that requires grad.

        Args:
            index: ``[B]`` sample indices (duplicates allowed: each position gets its own row copy).

        Returns:
            ``[B, d]`` tensor on the table's device; its ``.grad`` after backward feeds
            :meth:`apply_gradients`. Editing it never changes the table.

        Example:
            >>> t = LatentTable([3, 8], dim=2)
            >>> lam = t.gather(torch.tensor([8, 8, 3]))
            >>> lam.shape, lam.requires_grad, lam.is_leaf
            (torch.Size([3, 2]), True, True)
        """
        rows = self._rows(index, "gather")
        return self._values.index_select(0, rows).detach().requires_grad_(True)

    def apply_gradients(self, index: Tensor | Sequence[int], grad: Tensor) -> None:
        """One Adam step on each distinct row of ``index``; every other row is left untouched.

        Gradients of a sample that appears several times in ``index`` are summed and its row is stepped
        once, as autograd would accumulate them on a per-sample parameter before ``optimizer.step()``.

        Args:
            index: ``[B]`` sample indices, as passed to :meth:`gather`.
            grad: ``[B, d]`` gradients (any float dtype/device; cast to the table's).

        Raises:
            ModelError: an index not in this table, a shape mismatch, or a non-finite gradient (the
                table is left unchanged: one NaN would otherwise poison that latent for good).

        Example:
            >>> t = LatentTable([0, 1], dim=2)
            >>> t.apply_gradients(torch.tensor([1, 1]), torch.ones(2, 2))
            >>> t.step_counts().tolist()
            [0, 1]
        """
        rows = self._rows(index, "apply_gradients")
        if not isinstance(grad, Tensor):
            raise ModelError(f"apply_gradients: grad must be a tensor, got {type(grad).__name__}")
        if tuple(grad.shape) != (rows.numel(), self.dim):
            raise ModelError(
                f"apply_gradients: grad has shape {tuple(grad.shape)}, expected ({rows.numel()}, {self.dim}) "
                "for the given indices"
            )
        if rows.numel() == 0:
            return
        grad = grad.detach().to(device=self.device, dtype=self.dtype)
        finite = torch.isfinite(grad).all(dim=1)
        if not bool(finite.all()):
            bad = torch.unique(self._indices[rows[~finite]]).tolist()
            raise ModelError(
                f"apply_gradients: non-finite latent gradient for sample {_preview(bad)}; no row was "
                "updated (check the loss for NaN/inf, e.g. bf16 overflow)"
            )
        uniq, inverse = torch.unique(rows, return_inverse=True)
        if uniq.numel() == rows.numel():
            # No duplicates: keep the gradient bit-for-bit (a sum into zeros would also be exact, but
            # this avoids the allocation on the hot path).
            order = torch.argsort(rows)
            g = grad.index_select(0, order)
        else:
            g = torch.zeros(uniq.numel(), self.dim, dtype=self.dtype, device=self.device)
            g.index_add_(0, inverse, grad)
        self._adam_rows(uniq, g)

    def _adam_rows(self, rows: Tensor, grad: Tensor) -> None:
        """``torch.optim.Adam``'s single-tensor update (torch 2.x), vectorised over independent rows.

        Every operation mirrors the reference implementation in order and precision (lerp for the first
        moment, python-float bias corrections cast to the table dtype, ``p - s * m / denom``), so a float64
        table matches per-sample ``torch.optim.Adam`` to the last bit in practice.
        """
        beta1, beta2 = self.betas
        step = self._step.index_select(0, rows) + 1
        self._step.index_copy_(0, rows, step)

        exp_avg = self._exp_avg.index_select(0, rows)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq = self._exp_avg_sq.index_select(0, rows)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        # Bias corrections are computed in python floats, per row, exactly as Adam does for its scalar
        # step; only B numbers, so the host round-trip is cheap.
        steps = [float(s) for s in step.tolist()]
        step_size = [self.lr / (1 - beta1**s) for s in steps]
        bc2_sqrt = [(1 - beta2**s) ** 0.5 for s in steps]
        step_size_t = torch.tensor(step_size, dtype=torch.float64).to(self.device, self.dtype).unsqueeze(1)
        bc2_sqrt_t = torch.tensor(bc2_sqrt, dtype=torch.float64).to(self.device, self.dtype).unsqueeze(1)

        denom = (exp_avg_sq.sqrt() / bc2_sqrt_t).add_(self.eps)
        values = self._values.index_select(0, rows)
        values.sub_(step_size_t * exp_avg / denom)

        self._exp_avg.index_copy_(0, rows, exp_avg)
        self._exp_avg_sq.index_copy_(0, rows, exp_avg_sq)
        self._values.index_copy_(0, rows, values)

    # ------------------------------------------------------------------------------------ reading
    def values(self, index: Tensor | Sequence[int] | None = None) -> Tensor:
        """Detached copy of the latents: all rows in :attr:`indices` order, or the rows of ``index``.

        Example:
            >>> LatentTable([5, 1], dim=2).values().shape
            torch.Size([2, 2])
        """
        if index is None:
            return self._values.detach().clone()
        return self._values.index_select(0, self._rows(index, "values")).detach()

    def step_counts(self, index: Tensor | Sequence[int] | None = None) -> Tensor:
        """Adam step count of each row (int64): how many steps visited the sample; 0 = never.

        Example:
            >>> LatentTable([5, 1], dim=2).step_counts().tolist()
            [0, 0]
        """
        if index is None:
            return self._step.clone()
        return self._step.index_select(0, self._rows(index, "step_counts"))

    # ------------------------------------------------------------------------------------ state
    def _export(self, rows: Tensor | None) -> dict[str, Tensor]:
        def take(t: Tensor) -> Tensor:
            return t.detach().clone() if rows is None else t.index_select(0, rows).detach()

        state = {
            "indices": take(self._indices),
            "values": take(self._values),
            "exp_avg": take(self._exp_avg),
            "exp_avg_sq": take(self._exp_avg_sq),
            "step": take(self._step),
        }
        for key in _FLOAT_HP:
            state[key] = torch.tensor(self._hyperparams()[key], dtype=torch.float64)
        state["seed"] = torch.tensor(self.seed, dtype=torch.int64)
        state["dim"] = torch.tensor(self.dim, dtype=torch.int64)
        return state

    def state_dict(self) -> dict[str, Tensor]:
        """Everything needed to continue training bit-identically, as tensors only.

        Keys: ``indices`` [N] int64 (ascending), ``values``/``exp_avg``/``exp_avg_sq`` [N, d],
        ``step`` [N] int64, and 0-d tensors ``lr``, ``beta1``, ``beta2``, ``eps``, ``init_std`` (float64),
        ``seed``, ``dim`` (int64). Only tensors, so ``safetensors`` and ``torch.load(weights_only=True)``
        both read it. Tensors are copies on the table's device.

        Example:
            >>> sorted(LatentTable([0], dim=2).state_dict())[:3]
            ['beta1', 'beta2', 'dim']
        """
        return self._export(None)

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Restore rows, optimizer state and hyper-parameters from :meth:`state_dict` output.

        Args:
            state: a state dict (values are cast to this table's dtype and device).
            strict: if True the state must hold exactly this table's sample indices (catches loading
                the whole table into one worker's shard); if False the table takes the state's rows.
                To take a subset of a bigger state use ``LatentTable.merge([state]).shard(indices)``.

        Example:
            >>> a, b = LatentTable([0, 1], dim=2, seed=1), LatentTable([0, 1], dim=2, seed=2)
            >>> b.load_state_dict(a.state_dict()); torch.equal(a.values(), b.values())
            True
        """
        parts, hp = _parse_state(state, "load_state_dict")
        if strict and not torch.equal(parts["indices"], self._indices.cpu()):
            have, got = set(self.indices), set(parts["indices"].tolist())
            raise ModelError(
                "load_state_dict: the state holds other samples than this table "
                f"(missing {_preview(sorted(have - got))}, extra {_preview(sorted(got - have))}); "
                "use strict=False to replace the rows, or LatentTable.merge([state]).shard(indices)"
            )
        merged = {**self._hyperparams(), **hp}
        # Validate before mutating anything: a rejected state must leave the table as it was.
        betas = (merged["beta1"], merged["beta2"])
        _check_hyperparams(merged["lr"], betas, merged["eps"], merged["init_std"], merged["seed"])
        parts["values"] = parts["values"].to(self.dtype)
        self._set_state(**parts, device=self.device)
        self._dim = int(parts["values"].shape[1])
        self.lr, self.eps, self.init_std = merged["lr"], merged["eps"], merged["init_std"]
        self.betas = betas
        self.seed = int(merged["seed"])

    def export_rows(self, indices: Tensor | Sequence[int]) -> dict[str, Tensor]:
        """The given rows with their optimizer state, in :meth:`state_dict` format (rows ascending).

        Example:
            >>> LatentTable([0, 1, 2], dim=2).export_rows([2, 0])["indices"].tolist()
            [0, 2]
        """
        idx = _sorted_unique_indices(_as_index_tensor(indices, "export_rows"), "export_rows")
        return self._export(self._rows(idx, "export_rows"))

    def import_rows(self, rows: Mapping[str, Any]) -> None:
        """Add rows (with their optimizer state) or overwrite the ones already held.

        The rows' hyper-parameters, if present, are ignored: the table keeps its own.

        Example:
            >>> a, b = LatentTable([0, 1], dim=2), LatentTable([5], dim=2)
            >>> a.import_rows(b.export_rows([5])); a.indices
            [0, 1, 5]
        """
        parts, _ = _parse_state(rows, "import_rows")
        if parts["values"].shape[1] != self.dim:
            raise ModelError(
                f"import_rows: the rows have latent dim {parts['values'].shape[1]}, this table {self.dim}"
            )
        if parts["indices"].numel() == 0:
            return
        cpu_idx = self._indices.cpu()
        pos = torch.searchsorted(cpu_idx, parts["indices"])
        held = torch.zeros_like(parts["indices"], dtype=torch.bool)
        if cpu_idx.numel():
            held = cpu_idx[pos.clamp(max=cpu_idx.numel() - 1)] == parts["indices"]
        names = ("values", "exp_avg", "exp_avg_sq", "step")
        mine = {name: getattr(self, f"_{name}") for name in names}
        if bool(held.any()):
            where = pos[held].to(self.device)
            for name in names:
                src = parts[name][held].to(device=self.device, dtype=mine[name].dtype)
                mine[name].index_copy_(0, where, src)
        new = ~held
        if bool(new.any()):
            idx = torch.cat([cpu_idx, parts["indices"][new]])
            order = torch.argsort(idx)
            merged = {
                name: torch.cat([mine[name], parts[name][new].to(self.device, mine[name].dtype)])[
                    order.to(self.device)
                ]
                for name in names
            }
            self._set_state(indices=idx[order], device=self.device, **merged)

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Any],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LatentTable:
        """A table holding exactly the rows of ``state`` (a :meth:`state_dict` or :meth:`export_rows`).

        Example:
            >>> t = LatentTable([4, 9], dim=3)
            >>> LatentTable.from_state_dict(t.state_dict()).indices
            [4, 9]
        """
        return cls.merge([state], dtype=dtype, device=device)

    @classmethod
    def merge(
        cls,
        shards: Iterable[Mapping[str, Any] | LatentTable],
        *,
        lr: float | None = None,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        init_std: float | None = None,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LatentTable:
        """The union of several shards (tables or state dicts), e.g. every worker's part of a checkpoint.

        A sample held by several shards with identical row and optimizer state is kept once; with
        different contents it is an error (two workers trained the same sample). Hyper-parameters come
        from the keyword arguments or, when not given, must agree across shards.

        Args:
            shards: tables or state dicts.
            lr, betas, eps, init_std, seed: override the shards' hyper-parameters.
            dtype: dtype of the result (default: the first shard's).
            device: device of the result (default: CPU).

        Example:
            >>> full = LatentTable(range(4), dim=2)
            >>> parts = [full.shard([0, 2]), full.shard([1, 3]).state_dict()]
            >>> torch.equal(LatentTable.merge(parts).values(), full.values())
            True
        """
        parsed: list[tuple[dict[str, Tensor], dict[str, Any]]] = []
        for i, shard in enumerate(shards):
            if isinstance(shard, LatentTable):
                parsed.append(_parse_state(shard.state_dict(), f"merge: shard {i}"))
            else:
                parsed.append(_parse_state(shard, f"merge: shard {i}"))
        if not parsed:
            raise ModelError("merge: no shards given")
        dims = {p["values"].shape[1] for p, _ in parsed}
        if len(dims) > 1:
            raise ModelError(f"merge: shards have different latent dims {sorted(dims)}")
        out_dtype = dtype or parsed[0][0]["values"].dtype

        given = {"lr": lr, "eps": eps, "init_std": init_std, "seed": seed}
        if betas is not None:
            given["beta1"], given["beta2"] = betas
        defaults = {"lr": 1e-3, "beta1": 0.7, "beta2": 0.9, "eps": 1e-8, "init_std": 0.05, "seed": 0}
        hp: dict[str, Any] = {}
        for key, default in defaults.items():
            if given.get(key) is not None:
                hp[key] = given[key]
                continue
            seen = {h[key] for _, h in parsed if key in h}
            if len(seen) > 1:
                raise ModelError(
                    f"merge: shards disagree on the latent optimizer's {key} ({sorted(seen)}); "
                    f"pass {key if not key.startswith('beta') else 'betas'}= to choose"
                )
            hp[key] = seen.pop() if seen else default

        names = ("values", "exp_avg", "exp_avg_sq", "step")
        cat = {"indices": torch.cat([p["indices"] for p, _ in parsed])}
        for name in names:
            dt = torch.int64 if name == "step" else out_dtype
            cat[name] = torch.cat([p[name].to(dt) for p, _ in parsed])
        source = torch.cat([torch.full((p["indices"].numel(),), i) for i, (p, _) in enumerate(parsed)])
        order = torch.sort(cat["indices"], stable=True).indices
        cat = {k: v[order] for k, v in cat.items()}
        source = source[order]

        idx = cat["indices"]
        dup = torch.nonzero(idx[1:] == idx[:-1]).flatten() + 1  # positions repeating the previous row
        if dup.numel():
            for name in names:
                a, b = cat[name][dup], cat[name][dup - 1]
                same = (a == b).reshape(len(dup), -1).all(dim=1)
                if not bool(same.all()):
                    bad = dup[~same][0]
                    raise ModelError(
                        f"merge: sample {int(idx[bad])} is held by shards {int(source[bad - 1])} and "
                        f"{int(source[bad])} with different {name} (the same sample was trained by two "
                        "workers: the sharding rule is broken or shards from different checkpoints were mixed)"
                    )
            keep = torch.ones(idx.numel(), dtype=torch.bool)
            keep[dup] = False
            cat = {k: v[keep] for k, v in cat.items()}
        out_device = torch.device(device) if device is not None else torch.device("cpu")
        return cls._from_parts(cat, hp, out_device)

    def shard(self, indices: Tensor | Sequence[int]) -> LatentTable:
        """A new table with a subset of the rows (and their optimizer state), e.g. for re-sharding.

        Example:
            >>> t = LatentTable(range(6), dim=2)
            >>> t.shard([i for i in range(6) if i % 3 == 1]).indices
            [1, 4]
        """
        rows = self._export(self._rows(_sorted_unique_indices(indices, "shard"), "shard"))
        parts, _ = _parse_state(rows, "shard")
        return LatentTable._from_parts(parts, self._hyperparams(), self.device)

    def to(self, device: torch.device | str) -> LatentTable:
        """Move the table to ``device`` in place (like ``nn.Module.to``) and return it.

        Example:
            >>> LatentTable([0], dim=2).to("cpu").device
            device(type='cpu')
        """
        self._set_state(
            indices=self._indices,
            values=self._values,
            exp_avg=self._exp_avg,
            exp_avg_sq=self._exp_avg_sq,
            step=self._step,
            device=torch.device(device),
        )
        return self


def _parse_state(state: Mapping[str, Any], what: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Validate a state dict; return index-sorted CPU parts and the hyper-parameters it carries."""
    if not isinstance(state, Mapping):
        raise ModelError(f"{what}: expected a latent state dict, got {type(state).__name__}")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ModelError(f"{what}: latent state lacks {missing} (has {sorted(state)})")
    parts: dict[str, Tensor] = {}
    for key in _STATE_KEYS:
        value = state[key]
        if not isinstance(value, Tensor):
            raise ModelError(f"{what}: latent state '{key}' must be a tensor, got {type(value).__name__}")
        parts[key] = value.detach().cpu()
    idx = _sorted_unique_indices(parts["indices"], f"{what}: latent state 'indices'")
    n = parts["indices"].numel()
    values = parts["values"]
    if values.dim() != 2 or values.shape[0] != n or not values.dtype.is_floating_point:
        raise ModelError(
            f"{what}: latent state 'values' must be a float [{n}, d] tensor, got {values.dtype} "
            f"{tuple(values.shape)}"
        )
    for key in ("exp_avg", "exp_avg_sq"):
        if tuple(parts[key].shape) != tuple(values.shape) or not parts[key].dtype.is_floating_point:
            raise ModelError(
                f"{what}: latent state '{key}' has shape {tuple(parts[key].shape)}, expected {tuple(values.shape)}"
            )
    step = parts["step"]
    if (
        step.dim() != 1
        or step.numel() != n
        or step.dtype.is_floating_point
        and bool((step != step.round()).any())
    ):
        raise ModelError(f"{what}: latent state 'step' must be [{n}] integer counts, got {tuple(step.shape)}")
    if n and int(step.min()) < 0:
        raise ModelError(f"{what}: latent state 'step' has negative counts")
    if "dim" in state and int(state["dim"]) != values.shape[1]:
        raise ModelError(
            f"{what}: latent state says dim={int(state['dim'])} but values have {values.shape[1]} columns"
        )
    parts["step"] = step.to(torch.int64)
    parts["exp_avg"] = parts["exp_avg"].to(values.dtype)
    parts["exp_avg_sq"] = parts["exp_avg_sq"].to(values.dtype)
    order = torch.argsort(parts["indices"])
    if not torch.equal(order, torch.arange(n)):
        parts = {k: v[order] for k, v in parts.items()}
    parts["indices"] = idx

    hp: dict[str, Any] = {}
    for key in (*_FLOAT_HP, "seed"):
        if key in state:
            value = state[key]
            try:
                number = value.item() if isinstance(value, Tensor) else value
                hp[key] = int(number) if key == "seed" else float(number)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ModelError(f"{what}: latent state '{key}' must be a scalar, got {value!r}") from exc
    return parts, hp
