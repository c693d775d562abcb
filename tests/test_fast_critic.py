"""The concat critic's fast path (first layer split, row chunks, recomputed backward) against
its reference implementation (all pairs materialised): same scores, same gradients, same step."""
import pytest
import torch
from torch import nn

from common import ConcatCritic, ConvEncoder, GaussianHead, infonce


def scores_and_grads(critic, a, b, fast, amp=False, device="cpu"):
    """Scores and the gradients of a loss that weighs every score differently."""
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    critic.zero_grad(set_to_none=True)
    with torch.autocast(device, torch.bfloat16, enabled=amp):
        scores = (critic if fast else critic.reference)(a, b).float()
    weights = torch.linspace(-1, 2, scores.numel(), device=device).view_as(scores)
    (scores.logsumexp(1).sum() + (weights * scores).sum()).backward()
    return [scores.detach(), a.grad, b.grad] + [p.grad.clone() for p in critic.parameters()]


def relative_errors(xs, ys):
    return [((x - y).norm() / y.norm()).item() for x, y in zip(xs, ys, strict=True)]


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_fast_scores_and_gradients_equal_reference_in_float32(rows):
    torch.manual_seed(0)
    critic = ConcatCritic(3, rows=rows)
    a, b = torch.randn(37, 3), torch.randn(41, 3)
    fast = scores_and_grads(critic, a, b, fast=True)
    reference = scores_and_grads(critic, a, b, fast=False)
    assert fast[0].shape == (37, 41)
    for x, y in zip(fast, reference, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_fast_bfloat16_is_as_close_to_float32_as_reference_bfloat16():
    torch.manual_seed(0)
    critic = ConcatCritic(2)
    a, b = torch.randn(128, 2), torch.randn(128, 2)
    exact = scores_and_grads(critic, a, b, fast=False)
    fast = relative_errors(scores_and_grads(critic, a, b, fast=True, amp=True), exact)
    reference = relative_errors(scores_and_grads(critic, a, b, fast=False, amp=True), exact)
    assert max(fast) < 0.03, fast
    assert max(fast) < 3 * max(reference), (fast, reference)


def test_training_step_gives_the_same_loss_with_either_path():
    """Three Adam steps of the Section 3 model (encoder, Theorem 3.4 head, noise, concat critic,
    InfoNCE of eq. 2): both paths follow the same trajectory."""
    x = torch.rand(32, 1, 24, 24)
    losses = {}
    for fast in (True, False):
        torch.manual_seed(0)
        models = nn.ModuleDict({"encoder": ConvEncoder(2), "head": GaussianHead(2),
                                "critic": ConcatCritic(2)})
        opt = torch.optim.Adam(models.parameters(), lr=1e-3)
        torch.manual_seed(1)
        losses[fast] = []
        for _ in range(3):
            a = models["head"](models["encoder"](x + 0.6 * torch.randn_like(x)))
            b = models["head"](models["encoder"](x))
            critic = models["critic"] if fast else models["critic"].reference
            loss = infonce(critic(a, b + 0.5 * torch.randn_like(b)))[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[fast].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert losses[True][0] != losses[True][2]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fast_path_on_cuda_matches_reference():
    torch.manual_seed(0)
    critic = ConcatCritic(2).cuda()
    a, b = torch.randn(256, 2, device="cuda"), torch.randn(256, 2, device="cuda")
    exact = scores_and_grads(critic, a, b, fast=False, device="cuda")
    for x, y in zip(scores_and_grads(critic, a, b, fast=True, device="cuda"), exact, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-3)
    fast = relative_errors(scores_and_grads(critic, a, b, fast=True, amp=True, device="cuda"),
                           exact)
    assert max(fast) < 0.03, fast
