"""Muon's Newton-Schulz, batched over every matrix of one shape.

DeepSpeed's ZeRO-1/2 optimizer orthogonalises a Muon group one parameter at a time while it fills the
group's gradient partition (`muon_update` inside `get_flat_partition`), so a MoE model's dozens of
small matrices each pay for their own kernel launches and a finiteness check. `deferred_muon`
replaces `muon_update` for the length of that fill with the same momentum arithmetic and an empty
output, and `run` then orthogonalises all collected updates at once: matrices are turned wide (rows
<= columns), grouped by shape (a stacked expert tensor adds one matrix per expert) and iterated as a
batch, so that a (1024, 384) and a (384, 1024) matrix share one batched matmul chain. Each output is
written back where DeepSpeed already placed it in the partition.

`standard` is Keller Jordan's quintic iteration with the two matmul-plus-scale steps fused into
`baddbmm` on a contiguous wide matrix; `gram` is DeepSpeed's Gram iteration on the batch (cheaper
FLOPs on rectangular matrices, in fp16 where the device has it). The finiteness check DeepSpeed
makes per matrix is not needed here: fp16's overflow check runs before this fill and skips it, and
a non-finite bf16 or fp32 gradient stops the run at its gradient norm.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager

import torch

NS_STEPS = 5
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
BATCH = 16  # matrices per batched call: measured no slower than larger batches, and a smaller peak


def newton_schulz_standard(stack: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Quintic Newton-Schulz on a (N, n, m) stack of wide matrices (n <= m), in bf16 where the device
    supports it (as DeepSpeed's `zeropower_via_newtonschulz5`), fp32 otherwise."""
    from deepspeed.runtime.zero.muon.original_muon import ns_compute_dtype

    a, b, c = NS_COEFFICIENTS
    x = stack.to(ns_compute_dtype("standard"))
    x = (x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)).contiguous()
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b*A + c*A@A
        x = torch.baddbmm(x, poly, x, beta=a)  # a*X + B@X
    return x


def newton_schulz(stack: torch.Tensor, method: str) -> torch.Tensor:
    if method == "gram":
        from deepspeed.runtime.zero.muon.original_muon import zeropower_via_gram_newtonschulz

        return zeropower_via_gram_newtonschulz(stack, steps=NS_STEPS)
    return newton_schulz_standard(stack)


def newton_schulz_flops(shape: tuple[int, ...], method: str) -> float:
    """Matmul FLOPs of one orthogonalisation of a matrix (or a stack of them) of `shape`."""
    *stack, rows, cols = shape
    n, m = min(rows, cols), max(rows, cols)
    count = math.prod(stack)
    if method == "gram" and n < m:
        # DeepSpeed's Gram iteration: XX^T, the restart's Q@X and XX^T and the final Q@X (n x n x m);
        # Z in all five iterations, Q in four, R's two-product update in three (n x n x n).
        return count * (4 * 2 * n * n * m + (5 * 2 + 4 * 2 + 3 * 4) * n**3)
    return count * NS_STEPS * (2 * 2 * n * n * m + 2 * n**3)


def orthogonalise_into(pairs: list[tuple[torch.Tensor, torch.Tensor]], method: str) -> None:
    """For each (update, out): out = the Newton-Schulz orthogonalisation of update times
    sqrt(max(1, rows / cols)), as DeepSpeed's `muon_update` returns it; a 3-D update is a stack of
    matrices (experts), each done on its own. Matrices of one wide shape go through in batches of
    BATCH, so the temporaries stay a batch's size whatever the model's."""
    shapes: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor, float]]] = defaultdict(list)
    for update, out in pairs:
        rows, cols = update.shape[-2:]
        scale = math.sqrt(rows / cols) if rows > cols else 1.0
        for matrix, target in zip(update.reshape(-1, rows, cols), out.view(-1, rows, cols)):
            if rows > cols:
                matrix, target = matrix.mT, target.mT
            shapes[tuple(matrix.shape)].append((matrix, target, scale))
    for members in shapes.values():
        for start in range(0, len(members), BATCH):
            batch = members[start:start + BATCH]
            done = newton_schulz(torch.stack([matrix for matrix, _, _ in batch]), method)
            for (_, target, scale), result in zip(batch, done):
                target.copy_(result * scale if scale != 1.0 else result)


def orthogonalise(updates: list[torch.Tensor], method: str) -> list[torch.Tensor]:
    """`orthogonalise_into` with new output tensors."""
    outs = [torch.empty_like(update) for update in updates]
    orthogonalise_into(list(zip(updates, outs)), method)
    return outs


class DeferredMuon:
    """What `deferred_muon` collected: each (update, output) pair of one partition fill."""

    def __init__(self):
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.method = "standard"

    def update(self, grad, momentum, beta=0.95, ns_steps=NS_STEPS, nesterov=True, ns_method="gram",
               is_expert_group=False, num_heads=None):
        """DeepSpeed's `muon_update` signature: the momentum step now, Newton-Schulz in `run`."""
        if ns_steps != NS_STEPS or num_heads is not None or (grad.ndim > 2 and not is_expert_group):
            raise ValueError("batched Newton-Schulz covers 5 steps on matrices and expert stacks only")
        momentum.lerp_(grad, 1 - beta)
        update = grad.lerp_(momentum, beta) if nesterov else momentum
        out = torch.empty_like(grad)
        self.pending.append((update, out))
        self.method = ns_method
        return out

    def run(self) -> None:
        orthogonalise_into(self.pending, self.method)
        self.pending = []

    def flops(self) -> float:
        return sum(newton_schulz_flops(tuple(update.shape), self.method) for update, _ in self.pending)


@contextmanager
def deferred_muon():
    """Within it, DeepSpeed's partition fill collects Muon updates instead of orthogonalising them;
    call `run()` on what it yields once the fill is done."""
    from deepspeed.runtime.zero.muon import original_muon

    deferred = DeferredMuon()
    original = original_muon.muon_update
    original_muon.muon_update = deferred.update  # get_flat_partition imports it at each call
    try:
        yield deferred
    finally:
        original_muon.muon_update = original
