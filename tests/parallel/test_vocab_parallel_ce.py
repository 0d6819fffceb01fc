"""Vocab-parallel cross-entropy equals F.cross_entropy: value and logits gradient, padded
vocabularies (including a rank holding only padding), ignored targets, large logits."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from evoformer.distributed.testing import run_distributed
from evoformer.parallel import VocabParallelLMHead, count_collectives, vocab_parallel_cross_entropy

B, T = 3, 5
# (vocab, pad_to_multiple_of): 37 over tp=2 pads to 48 (24 columns each, rank 1 holds 13 real);
# 3 with multiple 4 pads to 8: rank 1 holds padding only.
CASES = [(37, 8), (3, 4)]


def _case(vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, vocab, generator=g) * 4 + 1000  # a large offset: needs the max
    targets = torch.randint(0, vocab, (B, T), generator=g)
    targets[0, 0] = targets[2, 4] = -1
    return logits, targets


def _reference(logits, targets):
    logits = logits.clone().requires_grad_()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1
    )
    loss.backward()
    return loss.detach(), logits.grad


def _worker(rank: int, world: int) -> list:
    out = []
    for vocab, multiple in CASES:
        logits, targets = _case(vocab, seed=vocab)
        head = VocabParallelLMHead(4, vocab, dist.group.WORLD, pad_to_multiple_of=multiple)
        width = head.weight.shape[0]
        # This rank's columns: its real vocabulary slice, then padding filled with huge values
        # that would dominate the loss if they were not excluded.
        local = torch.full((B, T, width), 1e4)
        n_real = head.vocab_end - head.vocab_start
        local[..., :n_real] = logits[..., head.vocab_start : head.vocab_end]
        local.requires_grad_()
        with count_collectives() as n:
            loss = vocab_parallel_cross_entropy(
                local, targets, dist.group.WORLD, head.vocab_start, head.vocab_end
            )
            loss.backward()
        out.append((head.vocab_start, head.vocab_end, width, loss.detach(), local.grad, dict(n)))
    return out


@pytest.fixture(scope="module")
def results() -> list[list]:
    return run_distributed(_worker, 2)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_tp2_equals_cross_entropy(results, case):
    vocab, _ = CASES[case]
    ref_loss, ref_grad = _reference(*_case(vocab, seed=vocab))
    covered = []
    for rank in range(2):
        start, end, width, loss, grad, counts = results[rank][case]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(
            grad[..., : end - start], ref_grad[..., start:end], rtol=1e-5, atol=1e-7
        )
        assert grad[..., end - start :].abs().sum() == 0  # padding columns get no gradient
        assert counts == {"all_reduce": 2}  # max, then (sum-exp, target logit) stacked
        covered.append((start, end))
    assert covered[0][0] == 0 and covered[0][1] == covered[1][0] and covered[1][1] == vocab
    if case == 1:
        assert covered[1] == (3, 3)  # rank 1 held padding only


def test_single_process_equals_cross_entropy_and_ignores_padding():
    logits, targets = _case(37, seed=0)
    ref_loss, ref_grad = _reference(logits, targets)
    padded = torch.cat([logits, torch.full((B, T, 3), 1e4)], -1).requires_grad_()
    loss = vocab_parallel_cross_entropy(padded, targets, None, 0, 37)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(padded.grad[..., :37], ref_grad, rtol=1e-5, atol=1e-7)
    assert padded.grad[..., 37:].abs().sum() == 0


def test_bf16_logits_compute_in_fp32():
    logits, targets = _case(37, seed=1)
    low = logits.bfloat16().requires_grad_()
    ref_loss, ref_grad = _reference(low.detach().float(), targets)
    loss = vocab_parallel_cross_entropy(low, targets, None, 0, 37)
    loss.backward()
    assert loss.dtype == torch.float32 and low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(low.grad.float(), ref_grad, rtol=1e-2, atol=1e-4)


def test_bad_range_is_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        vocab_parallel_cross_entropy(torch.randn(2, 2, 4), torch.zeros(2, 2).long(), None, 0, 5)
