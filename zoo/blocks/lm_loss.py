"""The LM head and cross-entropy in one pass over row chunks, without keeping the logits.

Legend: N = rows (tokens), D = d_model, V = vocabulary, C = rows per chunk.

`F.cross_entropy(lm_head(h).float(), labels)` materialises the (N, V) logits, an fp32 copy, the
log-softmax and, in the backward, a zero-filled gradient of the same size: five (N, V) tensors for a
(N, D) input. Here each chunk of C rows computes its logits, their log-sum-exp and its gradients at
once (the gradient of a mean cross-entropy w.r.t. the logits is (softmax - one_hot) / n_valid, known
in the forward), so only (C, V) is ever alive and the backward just scales the stored gradients of
h and of the weight. Softmax statistics are fp32; the matmuls run in the inputs' dtype.
"""

import torch

# Logits per chunk: C = CHUNK_ELEMENTS // V rows. On CPU a chunk that stays in cache (256 rows at
# V = 4096); on a GPU few large chunks (16384 rows at V = 4096, 256 MiB of fp32 logits), since
# each chunk costs a dozen kernel launches and small matmuls leave the GPU idle.
CHUNK_ELEMENTS = {"cpu": 2**20, "cuda": 2**26}


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_in, weight_in, labels_N, ignore_index: int, dtype: torch.dtype, needs_grad: bool):
        h_ND, weight_VD = h_in.to(dtype), weight_in.to(dtype)
        N, V = h_ND.shape[0], weight_VD.shape[0]
        valid_N = labels_N != ignore_index
        n_valid = valid_N.sum()
        targets_N = labels_N.where(valid_N, 0)
        scale = 1.0 / n_valid.clamp_min(1).float()
        grad_h_ND = torch.empty_like(h_ND) if needs_grad else None
        grad_w_VD = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) if needs_grad else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        rows = max(1, CHUNK_ELEMENTS.get(h_ND.device.type, CHUNK_ELEMENTS["cpu"]) // V)
        for start in range(0, N, rows):
            end = min(N, start + rows)
            h_CD, t_C, keep_C = h_ND[start:end], targets_N[start:end], valid_N[start:end]
            logits_CV = (h_CD @ weight_VD.T).float()
            lse_C = logits_CV.logsumexp(dim=-1)
            target_logit_C = logits_CV.gather(1, t_C[:, None]).squeeze(1)
            loss_sum += ((lse_C - target_logit_C) * keep_C).sum()
            if needs_grad:
                # d loss / d logits = (softmax - one_hot) / n_valid on kept rows, 0 on ignored ones
                grad_CV = logits_CV.sub_(lse_C[:, None]).exp_()
                grad_CV[torch.arange(end - start, device=h_ND.device), t_C] -= 1.0
                grad_CV.mul_((keep_C.float() * scale)[:, None])
                grad_CV = grad_CV.to(h_ND.dtype)
                torch.mm(grad_CV, weight_VD, out=grad_h_ND[start:end])
                grad_w_VD.add_(grad_CV.T @ h_CD)
        if needs_grad:
            ctx.save_for_backward(grad_h_ND.to(h_in.dtype), grad_w_VD.to(weight_in.dtype))
        return loss_sum / n_valid  # nan without a valid label, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        return grad_h_ND * grad_loss.to(grad_h_ND.dtype), grad_w_VD * grad_loss.to(grad_w_VD.dtype), None, None, None, None


def linear_cross_entropy(
    h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor, *, ignore_index: int = -100,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight.T against `labels` (rows with `ignore_index` skipped),
    as `F.cross_entropy(F.linear(h, weight).float(), labels, ignore_index=ignore_index)`. `dtype`: the
    matmuls' dtype (default: h's); the weight's gradient is accumulated over chunks in fp32 and
    returned in the weight's own dtype. Under no_grad or inference_mode only the loss is computed."""
    # Decided here, not from ctx.needs_input_grad inside the Function: that stays True under no_grad
    # when the inputs require grad, and evaluation would pay two extra matmuls per chunk and a (V, D) buffer.
    needs_grad = torch.is_grad_enabled() and (h_ND.requires_grad or weight_VD.requires_grad)
    return _LinearCrossEntropy.apply(h_ND, weight_VD, labels_N, ignore_index, dtype or h_ND.dtype, needs_grad)
