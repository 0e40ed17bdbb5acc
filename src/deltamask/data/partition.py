"""Client partitioning: which training samples each client holds (iid or Dirichlet label skew)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .sources import DataError

__all__ = ["PARTITION_SCHEMES", "partition"]

PARTITION_SCHEMES = ("iid", "dirichlet")


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 1,
) -> list[np.ndarray]:
    """Split sample indices across clients with flwr-datasets partitioners.

    Returns one sorted int64 index array per client; together they are a partition
    of ``range(len(labels))``.  ``"iid"`` shuffles (seeded) and then uses
    ``IidPartitioner`` (which shards contiguously); ``"dirichlet"`` uses
    ``DirichletPartitioner`` over labels with concentration ``alpha`` (smaller is
    more skewed), without self-balancing so the label skew follows Dirichlet(alpha).
    """
    try:
        import datasets
        from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner
    except ImportError as exc:
        raise DataError(
            "partitioning needs 'flwr-datasets' and 'datasets'; install them with "
            "`pip install flwr-datasets` (or `pip install deltamask[flower]`)"
        ) from exc

    labels = np.asarray(labels)
    n = len(labels)
    scheme_l = scheme.lower()
    if labels.ndim != 1:
        raise DataError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if scheme_l not in PARTITION_SCHEMES:
        raise DataError(f"unknown partition scheme '{scheme}'; use one of {list(PARTITION_SCHEMES)}")
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise DataError(
            f"cannot give {num_clients} clients at least one sample each from {n} samples; "
            "use fewer clients or more training samples"
        )
    if min_partition_size > n // num_clients:
        raise DataError(
            f"min_partition_size={min_partition_size} is impossible with {n} samples over "
            f"{num_clients} clients (at most {n // num_clients} each); lower it or use fewer clients"
        )

    if scheme_l == "iid":
        perm = np.random.default_rng(seed).permutation(n)
        table = datasets.Dataset.from_dict({"label": labels[perm], "idx": perm})
        part: Any = IidPartitioner(num_partitions=num_clients)
    else:
        if not alpha > 0:
            raise DataError(f"Dirichlet alpha must be > 0, got {alpha}")
        table = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(n)})
        part = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    # Arrow format keeps column reads vectorized: under datasets>=4 the default format
    # returns a lazy Column that np.array() walks row by row (seconds for 60k labels).
    part.dataset = table.with_format("arrow")
    try:
        with warnings.catch_warnings():
            # The Dirichlet partitioner warns on every resampling attempt; we report failure once.
            warnings.simplefilter("ignore", UserWarning)
            out = [
                np.sort(part.load_partition(i)[:]["idx"].to_numpy().astype(np.int64))
                for i in range(num_clients)
            ]
    except ValueError as exc:
        raise DataError(
            f"Dirichlet partitioning (alpha={alpha}, {num_clients} clients, "
            f"min_partition_size={min_partition_size}) failed: {exc} Raise alpha, lower "
            "min_partition_size, or use fewer clients."
        ) from exc

    # Guard the invariant callers rely on: disjoint and covering.
    flat = np.concatenate(out) if out else np.zeros(0, np.int64)
    if len(flat) != n or not np.array_equal(np.sort(flat), np.arange(n)):
        raise RuntimeError(
            f"{scheme_l} partitioner returned {len(flat)} indices for {n} samples "
            "(not a partition); this is a bug"
        )
    return out
