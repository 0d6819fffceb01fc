"""The fused-softmax LM loss equals F.cross_entropy in value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evoformer.model import lm_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_cross_entropy_with_ignored_and_extreme_rows(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 50, generator=g) * 4).to(dtype)
    logits[0, 0, 3] = 80.0  # target probabilities that underflow in fp32
    targets = torch.randint(0, 50, (3, 7), generator=g)
    targets[1, 2] = -1
    targets[0, 0] = 4
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ours = lm_loss(a, targets)
    ref = F.cross_entropy(b.float().reshape(-1, 50), targets.reshape(-1), ignore_index=-1)
    ours.backward()
    ref.backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    tol = 1e-7 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=0, atol=tol)
    assert torch.all(a.grad[1, 2] == 0)


def test_second_backward_is_refused():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = lm_loss(logits, torch.zeros(2, 3, dtype=torch.long))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="can run only once"):
        loss.backward()
