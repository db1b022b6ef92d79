"""Fixed-shape batches: every global batch exactly `batch_size` rows, the last padded with weight-0 rows.

Fixed shapes keep a compiled (XLA) step at one graph; the 0/1 weight `w` keeps padding out of the loss and the
metrics; `row` says where each row came from, so evaluation logits are placed back by row (`place_rows`). Each
host reads only its own rows of every global batch (torch_xla's per-host input contract).

    >>> batches = Batches(dataset, 8, order=range(len(dataset)))                 # doctest: +SKIP
    >>> for batch in batches: ...                                                 # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from octft.data.pack import prefetch


def padded_batches(
    dataset, batch_size: int, *, order: Sequence[int], host_index: int = 0, host_count: int = 1, workers: int = 0,
    micro_batches: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """This host's rows of each global batch of exactly `batch_size` rows in `order`, in `micro_batches` pieces.

    The last global batch is padded with weight-0 copies. Fixed shapes keep XLA at one graph per step
    kind; the 0/1 weight `w` keeps padding out of the loss and the metrics; `row` is each row's index
    in `dataset`; `scale` is each row's weight over its global batch (`w / sum(w)`), what an optimizer step
    over the batch's micro-batches weighs its rows by. Each global batch is yielded as `micro_batches`
    consecutive micro-batches of `batch_size / micro_batches` rows (global); with several hosts, host `h`
    reads and yields only rows `[h * M/P, (h+1) * M/P)` of each global micro-batch of M rows (torch_xla's
    per-host input contract: the runtime assembles the hosts' rows, in host order, into the global batch),
    so no row is read or fed twice. `workers` background threads gather batches ahead (`train.num_workers`;
    0: each batch is gathered when it is asked for).
    """
    if batch_size % micro_batches or (batch_size // micro_batches) % host_count:
        raise ValueError(f"a global batch of {batch_size} rows cannot be split evenly over {host_count} hosts"
                         + (f" in {micro_batches} micro-batches" if micro_batches > 1 else ""))
    micro_rows = batch_size // micro_batches
    host_rows = micro_rows // host_count

    def plans():
        for start in range(0, len(order), batch_size):
            indices = list(order[start : start + batch_size])
            real = len(indices)
            indices += [indices[-1]] * (batch_size - real)
            weights = [1.0] * real + [0.0] * (batch_size - real)
            for micro in range(micro_batches):
                first = micro * micro_rows + host_index * host_rows
                mine = slice(first, first + host_rows)
                yield indices[mine], weights[mine], real

    def batch(plan: tuple[list[int], list[float], int]) -> dict[str, torch.Tensor]:
        indices, weights, real = plan
        if hasattr(dataset, "gather"):  # a packed dataset reads the whole batch in one gather
            x, y = dataset.gather(indices)
        else:
            rows = [dataset[i] for i in indices]
            x, y = torch.stack([row["x"] for row in rows]), torch.stack([row["y"] for row in rows])
        w = torch.tensor(weights)
        return {
            "x": x,
            "y": y,
            "w": w,
            "scale": w / max(real, 1),
            "row": torch.tensor(indices, dtype=torch.long),  # dataset index, to place eval logits
        }

    return prefetch(batch, plans(), workers=workers)


class Batches:
    """A re-iterable, sized view of `padded_batches` (device loaders want both); `hosts` is (this host's index,
    the host count), e.g. `(runtime.process_index, runtime.process_count)`."""

    def __init__(self, dataset, batch_size: int, order: Sequence[int], hosts: tuple[int, int] = (0, 1), workers: int = 1,
                 micro_batches: int = 1):
        self.dataset, self.batch_size, self.order, self.workers = dataset, batch_size, list(order), workers
        self.host_index, self.host_count = hosts
        self.micro_batches = micro_batches

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size) * self.micro_batches

    def __iter__(self):
        # Stored pooled features gather quicker than a hand-over between threads: no background worker for them.
        workers = 0 if getattr(self.dataset, "cheap_to_gather", False) else self.workers
        return padded_batches(self.dataset, self.batch_size, order=self.order, host_index=self.host_index,
                              host_count=self.host_count, workers=workers, micro_batches=self.micro_batches)


def place_rows(logits: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, total_rows: int) -> torch.Tensor:
    """(B, C) batch logits scattered into a (total_rows, C) zero tensor at `rows`; weight-0 rows add nothing.

    A sum over the batch dim, not a cat: under SPMD the batch dim is sharded, and fetching a sharded
    tensor makes torch_xla compile a new replication graph on every fetch (one more compile each
    epoch). A reduction over the sharded dim comes back replicated, from one graph. Exact in fp32:
    each output element is one logit plus zeros.
    """
    placement = F.one_hot(rows, total_rows).to(logits.dtype) * weights.to(logits.dtype)[:, None]  # (B, total_rows)
    return (placement[:, :, None] * logits[:, None, :]).sum(dim=0)
