"""Gradient clipping before Newton-Schulz in DeepSpeed's ZeRO optimizers.

Muon's update is the Newton-Schulz orthogonalisation of the momentum, which ignores its input's
scale; clipping must therefore act on the raw gradients, before they enter the momentum, or it
shrinks the update itself. DeepSpeed's ZeRO-0 path and its BF16_Optimizer do so: norm of the raw
gradients, every gradient clipped by it, then Newton-Schulz. Its ZeRO 1/2/3 optimizers orthogonalise
first and take the norm after (stage_1_and_2.py: `get_flat_partition` runs `muon_update` in the
step's last backward, `step` then calls `scaled_global_norm`; stage3.py: `step` calls
`_apply_muon_to_accumulated_grads` before `_get_norm_groups`). A Newton-Schulz output has norm
~sqrt(min(m, n)) per matrix, so that norm is in the tens to hundreds whatever the gradients are, a
clip at 1.0 would always fire, and it would divide every Muon update by that norm.

`clip_before_newton_schulz` mixes `_ClipBeforeMuonZero12` / `_ClipBeforeMuonZero3` into DeepSpeed's
ZeRO optimizer (DeepSpeed builds it inside `deepspeed.initialize` and has no hook) to get the ZeRO-0
order. For Muon the clip then only bounds one step's weight in the momentum; it never shrinks the
update.
"""

from __future__ import annotations

import torch

from training.errors import TrainingError
from training.muon import deferred_muon
from training.timing import no_phase


def clip_before_newton_schulz(optimizer) -> None:
    """Give DeepSpeed's ZeRO optimizer our order: raw norm, clip, then Muon (see the module docstring)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, (MuonWithAuxAdam, FP16_UnfusedOptimizer, BF16_Optimizer)):
        return  # ZeRO-0 (fp32, fp16) and BF16_Optimizer already clip before orthogonalising
    mixin = {DeepSpeedZeroOptimizer: _ClipBeforeMuonZero12, DeepSpeedZeroOptimizer_Stage3: _ClipBeforeMuonZero3}.get(
        type(optimizer))
    if mixin is None:
        raise TrainingError(f"DeepSpeed wrapped the optimizer in {type(optimizer).__name__}, whose gradient clipping "
                            "the trainer has not checked against Muon; use the shipped ds_configs/")
    if getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False):
        raise TrainingError("zero_optimization.offload_optimizer with Muon is refused: DeepSpeed's offload path "
                            "clips the orthogonalised update, not the gradient; remove offload_optimizer")
    if any(any(padding) for padding in getattr(optimizer, "round_robin_bit16_padding", [])):
        raise TrainingError("zero_optimization.parameter_alignment with Muon is refused: the trainer's clip before "
                            "Newton-Schulz reads DeepSpeed's unpadded partition layout; remove parameter_alignment")
    # DeepSpeed constructs its ZeRO optimizer inside deepspeed.initialize: the mixin goes in afterwards.
    optimizer.__class__ = type(f"ClipBeforeMuon{type(optimizer).__name__}", (mixin, type(optimizer)), {})
    optimizer.clipped_muon_groups = set()  # groups whose gradient was clipped before Newton-Schulz this step
    optimizer.deferred_muon = {}  # ZeRO-1/2: group -> what Newton-Schulz needs, held until the norm is known
    optimizer.raw_norm_groups = None  # ZeRO-3: the raw gradients' group norms, handed to step()
    optimizer.phase = no_phase  # the trainer's PhaseTimer.phase, to time Newton-Schulz apart
    optimizer.newton_schulz_flops = 0.0  # ZeRO-1/2: summed over the run, for the optimizer's own FLOP/s


def _clip_coefficient(norm: torch.Tensor, loss_scale: float, clip: float) -> torch.Tensor | None:
    """What DeepSpeed divides the gradients by (its unscale_and_clip_grads), or None for no clip."""
    from deepspeed.runtime.utils import is_invalid_grad_norm

    if clip <= 0 or is_invalid_grad_norm(norm):
        return None  # an invalid norm: DeepSpeed's own clip zeroes the step, Muon's included
    return torch.clamp((norm / loss_scale + 1e-6) / clip, min=1.0)


class _ClipBeforeMuonZero12:
    """Mixed into DeepSpeed's ZeRO-1/2 optimizer: Newton-Schulz waits for the norm of the raw gradients.

    DeepSpeed orthogonalises a Muon group while filling its gradient partition at the end of the
    step's last backward (`get_flat_partition`). Here that call keeps the group's full gradient
    matrices and hands back their raw slices for this rank's partition, so the norm `step` takes
    is the raw one; `scaled_global_norm` then clips the kept matrices by the global coefficient and
    runs DeepSpeed's own Muon partition fill on them, and `unscale_and_clip_grads` does not clip
    the resulting update again.
    """

    def get_flat_partition(self, tensor_list, first_offset, partition_size, dtype, device, param_group_idx,
                           return_tensor_list=False):
        if not (return_tensor_list and tensor_list and self._is_muon_group(tensor_list) and self.compute_grad_norm):
            return super().get_flat_partition(tensor_list, first_offset, partition_size, dtype, device,
                                              param_group_idx, return_tensor_list)
        grads = self.all_grad_tensors[param_group_idx]  # full matrices, reduced over the ranks
        self.deferred_muon[param_group_idx] = (tensor_list, first_offset, partition_size, dtype, device, grads)
        # This rank's slice of the group's flat gradient: the first tensor from first_offset, then whole
        # tensors until partition_size, zero-padded at the end (DeepSpeed's unpadded layout).
        slices, used = [], 0
        for i, grad in enumerate(grads):
            start = first_offset if i == 0 else 0
            count = min(grad.numel() - start, partition_size - used)
            slices.append(grad.reshape(-1).narrow(0, start, count))
            used += count
        if used < partition_size:
            slices.append(torch.zeros(partition_size - used, dtype=dtype, device=device))
        return slices

    def scaled_global_norm(self, norm_type=2):
        deferred, self.deferred_muon = self.deferred_muon, {}
        # Raw gradients carry the loss scale that a Newton-Schulz output lacks: not marked as lacking it yet.
        self.groups_lacking_loss_scale.difference_update(deferred)
        norm = super().scaled_global_norm(norm_type)
        coefficient = _clip_coefficient(norm, self.loss_scale, self.clip_grad)
        self.clipped_muon_groups = set(deferred) if coefficient is not None else set()
        with deferred_muon() as muon:
            for i, (tensor_list, first_offset, partition_size, dtype, device, grads) in deferred.items():
                if coefficient is not None:
                    for grad in grads:
                        grad.div_(coefficient.to(grad.dtype))
                self.all_grad_tensors[i] = grads
                self.averaged_gradients[i] = super().get_flat_partition(tensor_list, first_offset, partition_size,
                                                                        dtype, device, i, return_tensor_list=True)
                self.all_grad_tensors[i] = None
        with self.phase("newton_schulz"):
            self.newton_schulz_flops += muon.flops()
            muon.run()  # fills the partitions get_flat_partition returned, every Muon group in one batch
        return norm

    def unscale_and_clip_grads(self, grad_groups_flat, total_norm):
        clipped = {id(self.single_partition_of_fp32_groups[i].grad) for i in self.clipped_muon_groups}
        if any(id(grad) in clipped for grad in grad_groups_flat):
            total_norm = torch.zeros_like(total_norm)  # clipped before Newton-Schulz: only the loss scale is left
        super().unscale_and_clip_grads(grad_groups_flat, total_norm)


class _ClipBeforeMuonZero3:
    """Mixed into DeepSpeed's ZeRO-3 optimizer: the raw gradients' norm and clip come before Newton-Schulz.

    DeepSpeed's `step` orthogonalises (`_apply_muon_to_accumulated_grads`) and then takes the norm
    (`_get_norm_groups`). Here the first takes the raw norm, clips the Muon partitions by it and
    leaves the raw group norms for the second to return; `unscale_and_clip_grads` does not clip
    the Muon update again.
    """

    def _apply_muon_to_accumulated_grads(self):
        from deepspeed.runtime.utils import combine_grad_norm_groups

        muon = [i for i, uses in enumerate(getattr(self, "sub_groups_using_muon", [])) if uses]
        self.sub_groups_lacking_loss_scale.difference_update(muon)  # raw gradients carry the loss scale
        norm_groups = self._get_norm_groups()
        coefficient = _clip_coefficient(combine_grad_norm_groups(norm_groups), self.loss_scale, self.clip_grad)
        self.clipped_muon_groups = set(muon) if coefficient is not None else set()
        if coefficient is not None:
            for i in muon:
                for grad in self.averaged_gradients[i]:
                    grad.div_(coefficient.to(grad.dtype))
        super()._apply_muon_to_accumulated_grads()
        self.raw_norm_groups = norm_groups

    def _get_norm_groups(self):
        norm_groups, self.raw_norm_groups = self.raw_norm_groups, None
        return norm_groups if norm_groups is not None else super()._get_norm_groups()

    def unscale_and_clip_grads(self, sub_group_id, total_norm):
        if sub_group_id in self.clipped_muon_groups:
            total_norm = torch.zeros_like(total_norm)  # clipped before Newton-Schulz: only the loss scale is left
        super().unscale_and_clip_grads(sub_group_id, total_norm)
