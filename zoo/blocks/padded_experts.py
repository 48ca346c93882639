"""The CPU padded expert path: experts sorted by count, in buckets each padded to its own largest
count, every bucket two batched matmuls.

Legend: A = assignments (rows of x, sorted by expert), D = d_model, E = experts, F = expert hidden
size, N = padded rows in all, B = experts in a bucket, C = a bucket's rows per expert (its cap),
M = B*C, a bucket's rows.

On CPU, torch._grouped_mm loops over the experts, and small experts make small, slow matmuls;
padding every expert to a common row count turns them into one batched matmul at the price of the
padding rows' FLOPs. Sorting the experts by count first and padding per bucket keeps that price
low on unbalanced loads (`experts_padded_bmm`). `dropless_dispatch` (zoo/blocks/moe.py) decides
when this path is worth it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zoo.blocks.dtypes import compute_dtype

# Padded dispatch: experts sorted by count go in (at most) BUCKETS buckets of at least
# MIN_EXPERTS_PER_BUCKET, each padded to its own largest count. Measured on the compiled bf16 train
# step (2 CPU cores): W2 (64 experts) 4 buckets of 16 beat 8 of 8 and 16 of 4 (fewer, larger
# batched matmuls); W1 (8 experts) 2 buckets of 4 beat 1 of 8 and 4 of 2.
BUCKETS, MIN_EXPERTS_PER_BUCKET = 4, 4
# Each bucket's cap rounded up to a multiple of this: the batched matmuls then see few distinct
# shapes, and oneDNN builds a kernel per new shape (a bmm of a new shape took ~1 ms longer here).
# Paired in-process A/B on the compiled bf16 step: 16 against 1 saved 13 ms (W1) and 21 ms (W2);
# 32 was 4-10 ms slower than 16 (more padding).
CAP_MULTIPLE = 16


class _ScatterRows(torch.autograd.Function):
    """x (A, D) written to rows `slot` (all distinct) of an otherwise zero (n, D) tensor; the
    backward gathers those rows (the inverse of `_GatherSlots`, with no zero-fill)."""

    @staticmethod
    def forward(ctx, x_AD, slot_A, n: int):
        ctx.save_for_backward(slot_A)
        return x_AD.new_zeros(n, x_AD.shape[1]).index_copy_(0, slot_A, x_AD)

    @staticmethod
    def backward(ctx, grad_ND):
        (slot_A,) = ctx.saved_tensors
        return grad_ND.index_select(0, slot_A), None, None


class _GatherSlots(torch.autograd.Function):
    """Rows `slot` (all distinct) of x (n, D); the backward copies into zeros instead of index_select's
    accumulating index_add (no duplicate index can occur)."""

    @staticmethod
    def forward(ctx, x_ND, slot_A):
        ctx.save_for_backward(slot_A)
        ctx.n = x_ND.shape[0]
        return x_ND.index_select(0, slot_A)

    @staticmethod
    def backward(ctx, grad_AD):
        (slot_A,) = ctx.saved_tensors
        return grad_AD.new_zeros(ctx.n, grad_AD.shape[1]).index_copy_(0, slot_A, grad_AD), None


class _BucketedExperts(torch.autograd.Function):
    """SwiGLU experts in buckets of padded rows: bucket b holds experts `by_count[first:first +
    sizes[b]]`, each on caps[b] consecutive rows of x (N, D), and runs as two batched matmuls in
    `dtype`. Forward and backward are written out so that the weights are gathered and cast per
    bucket once, and each weight's gradient comes out in the weight's own layout (dy^T a, dh^T x;
    autograd's bmm gives the transpose, x^T dh, and the copy back cost 53 ms a step at W2) and is
    written straight to its experts' rows: no concatenation, no sum over buckets."""

    @staticmethod
    def forward(ctx, x_ND, gate_up_E2FD, down_EDF, by_count_E, sizes: tuple[int, ...], caps: tuple[int, ...],
                dtype: torch.dtype):
        D, used = x_ND.shape[1], sum(1 for cap in caps if cap)  # buckets after an empty one are empty
        rows = [size * cap for size, cap in zip(sizes, caps)]
        saved, outs = [], []
        for x_MD, experts_B, size, cap in zip(x_ND.split(rows), by_count_E.split(sizes), sizes[:used], caps[:used]):
            gate_up_B2FD = gate_up_E2FD.index_select(0, experts_B).to(dtype)
            down_BDF = down_EDF.index_select(0, experts_B).to(dtype)
            gate_up_BC2F = torch.bmm(x_MD.view(size, cap, D), gate_up_B2FD.transpose(1, 2))
            gate_BCF, up_BCF = gate_up_BC2F.chunk(2, dim=-1)
            outs.append(torch.bmm(F.silu(gate_BCF) * up_BCF, down_BDF.transpose(1, 2)).view(size * cap, D))
            saved += [gate_up_B2FD, down_BDF, gate_up_BC2F]
        ctx.save_for_backward(x_ND, by_count_E, *saved)
        ctx.sizes, ctx.caps, ctx.used = sizes, caps, used
        ctx.weight_shapes = (gate_up_E2FD.shape, down_EDF.shape)
        ctx.weight_dtypes = (gate_up_E2FD.dtype, down_EDF.dtype)
        return torch.cat(outs) if len(outs) != 1 else outs[0]

    @staticmethod
    def backward(ctx, grad_ND):
        x_ND, by_count_E, *saved = ctx.saved_tensors
        sizes, caps, used = ctx.sizes, ctx.caps, ctx.used
        D = x_ND.shape[1]
        rows = [size * cap for size, cap in zip(sizes, caps)]
        (gate_up_shape, down_shape), (gate_up_dtype, down_dtype) = ctx.weight_shapes, ctx.weight_dtypes
        grad_gate_up = grad_ND.new_empty(gate_up_shape, dtype=gate_up_dtype)
        grad_down = grad_ND.new_empty(down_shape, dtype=down_dtype)
        experts = by_count_E.split(sizes)
        grad_x = []
        pieces = zip(grad_ND.split(rows), x_ND.split(rows), sizes[:used], caps[:used])
        for b, (dy_MD, x_MD, size, cap) in enumerate(pieces):
            gate_up_B2FD, down_BDF, gate_up_BC2F = saved[3 * b:3 * b + 3]
            dy_BCD, x_BCD = dy_MD.view(size, cap, D), x_MD.view(size, cap, D)
            gate_BCF, up_BCF = gate_up_BC2F.chunk(2, dim=-1)
            sigmoid_BCF = torch.sigmoid(gate_BCF)
            silu_BCF = gate_BCF * sigmoid_BCF
            grad_down.index_copy_(0, experts[b], torch.bmm(dy_BCD.transpose(1, 2), silu_BCF * up_BCF).to(down_dtype))
            da_BCF = torch.bmm(dy_BCD, down_BDF)
            dgate_BCF = da_BCF * up_BCF * sigmoid_BCF * (1 + gate_BCF * (1 - sigmoid_BCF))
            dh_BC2F = torch.cat((dgate_BCF, da_BCF * silu_BCF), dim=-1)
            grad_gate_up.index_copy_(0, experts[b], torch.bmm(dh_BC2F.transpose(1, 2), x_BCD).to(gate_up_dtype))
            grad_x.append(torch.bmm(dh_BC2F, gate_up_B2FD).view(size * cap, D))
        if used < len(sizes):  # experts without rows
            unused_E = by_count_E[sum(sizes[:used]):]
            grad_gate_up.index_fill_(0, unused_E, 0)
            grad_down.index_fill_(0, unused_E, 0)
        grad_x = torch.cat(grad_x) if len(grad_x) != 1 else grad_x[0]
        return grad_x, grad_gate_up, grad_down, None, None, None, None


@dataclass(frozen=True)
class BucketPlan:
    """Experts sorted by count (largest first) in buckets of `per_bucket`; bucket b pads each of its
    experts to `caps[b]` rows, its largest count. Host integers: the padded path's one sync.
    Buckets are equal in size (not cut where the counts jump) so that under torch.compile only the
    caps vary from step to step, not the graph."""

    per_bucket: int
    caps: tuple[int, ...]
    n_experts: int
    assignments: int  # the counts' sum

    def sizes(self) -> list[int]:
        """Experts in each bucket (the last may hold fewer)."""
        return [min(self.per_bucket, self.n_experts - b * self.per_bucket) for b in range(len(self.caps))]

    def padded_rows(self) -> int:
        return sum(size * cap for size, cap in zip(self.sizes(), self.caps))


@torch.compiler.disable  # a deliberate graph break under torch.compile, without dynamo's warning
def plan_buckets(sorted_counts_E: torch.Tensor) -> BucketPlan:
    per_bucket = max(MIN_EXPERTS_PER_BUCKET, -(-sorted_counts_E.numel() // BUCKETS))
    *caps, assignments = torch.cat((sorted_counts_E[::per_bucket], sorted_counts_E.sum()[None])).tolist()
    caps = tuple(-(-cap // CAP_MULTIPLE) * CAP_MULTIPLE for cap in caps)
    return BucketPlan(per_bucket=per_bucket, caps=caps, n_experts=sorted_counts_E.numel(), assignments=assignments)


def experts_padded_bmm(x_AD, counts_E, gate_up_E2FD, down_EDF, plan: BucketPlan | None = None) -> torch.Tensor:
    """Experts sorted by count and split into BUCKETS buckets (`BucketPlan`); each bucket's rows
    copied into an (Eb, C_b, D) block, C_b the bucket's largest count rounded up to CAP_MULTIPLE
    (so nothing is dropped;
    padding rows are zeros and cost FLOPs only), and two batched matmuls per bucket. Sorting before
    padding keeps the padding small on unbalanced loads: W2's six layers at initialisation held
    1.7-3.5x their assignments when padded to the overall largest count, 1.15-1.5x in 4 buckets
    (W1's: 1.1-1.3x, and 1.03-1.12x in 2 buckets). On CPU this beats torch._grouped_mm, which
    loops over the experts, when experts are many and small. The bucket sizes need the counts on
    the host: one sync, and a graph break under torch.compile (after one recompilation the sizes
    are dynamic)."""
    E, A, D = counts_E.numel(), x_AD.shape[0], x_AD.shape[1]
    dtype = compute_dtype(x_AD)
    sorted_counts_E, by_count_E = counts_E.sort(descending=True, stable=True)
    if plan is None:
        plan = plan_buckets(sorted_counts_E)
    Eb, sizes = plan.per_bucket, plan.sizes()
    arange_E = torch.arange(E, device=x_AD.device)
    # first slot of each expert: its bucket's start plus its place in the bucket times the bucket's cap
    bucket_P = arange_E // Eb  # bucket of each sorted position
    cap_B = (sorted_counts_E[::Eb] + CAP_MULTIPLE - 1) // CAP_MULTIPLE * CAP_MULTIPLE  # plan.caps, on the device
    cap_P = cap_B.repeat_interleave(Eb)[:E]
    rows_B = torch.tensor(sizes, device=x_AD.device) * cap_B
    start_P = (rows_B.cumsum(0) - rows_B)[bucket_P] + (arange_E % Eb) * cap_P
    start_E = torch.empty_like(start_P).scatter_(0, by_count_E, start_P)
    first_E = counts_E.cumsum(0) - counts_E  # each expert's first row in x_AD
    expert_A = torch.repeat_interleave(arange_E, counts_E, output_size=A)
    slot_A = start_E[expert_A] + torch.arange(A, device=x_AD.device) - first_E[expert_A]

    x_ND = _ScatterRows.apply(x_AD.to(dtype), slot_A, plan.padded_rows())  # copy half the bytes under autocast
    out_ND = _BucketedExperts.apply(x_ND, gate_up_E2FD, down_EDF, by_count_E, tuple(sizes), plan.caps, dtype)
    return _GatherSlots.apply(out_ND, slot_A)
