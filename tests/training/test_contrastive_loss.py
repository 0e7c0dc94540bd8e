"""CLIP and SigLIP losses against values worked out by hand, gradcheck, and chunked == direct."""

import math

import pytest
import torch

from paligemma_cli.model.siglip import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE
from paligemma_cli.training.contrastive_loss import (
    CLIP_INIT_LOGIT_SCALE,
    clip_loss,
    siglip_loss,
    siglip_loss_chunked,
)

A = 1 / math.sqrt(2)
# img = [e1, e2]; txt = [e1, (1, 1)] whose unit vector is (A, A). So
#   cos = [[1, A],
#          [0, A]]      (rows = images, columns = texts)
IMG2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
TXT2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # -log(sigmoid(-x)) = log(1 + e^x)


def test_init_constants():
    assert SIGLIP_INIT_LOGIT_SCALE == pytest.approx(math.log(10))
    assert SIGLIP_INIT_LOGIT_BIAS == -10
    assert CLIP_INIT_LOGIT_SCALE == pytest.approx(math.log(1 / 0.07))


def test_clip_loss_2x2_by_hand():
    # logit_scale 0 -> scale 1, logits = cos.
    # image -> text (rows):    row 0, target 0: -log(e^1 / (e^1 + e^A)) = log(1 + e^(A-1))
    #                          row 1, target 1: -log(e^A / (e^0 + e^A)) = log(1 + e^-A)
    # text -> image (columns): col 0, target 0: entries (1, 0)  -> log(1 + e^-1)
    #                          col 1, target 1: entries (A, A)  -> log(2)
    # loss = (mean of rows + mean of columns) / 2
    rows = (softplus(A - 1) + softplus(-A)) / 2
    cols = (softplus(-1) + math.log(2)) / 2
    loss = clip_loss(IMG2, TXT2, torch.tensor(0.0, dtype=torch.float64))
    assert loss.item() == pytest.approx((rows + cols) / 2, abs=1e-12)


def test_clip_loss_3x3_by_hand_and_scale_invariance_of_norm():
    # img = txt = I3 (scaled by 5 and 0.5: the loss normalises, so lengths must not matter).
    # logit_scale log 2 -> logits = 2 I. Every row and column: -log(e^2 / (e^2 + 2 e^0)) = log(1 + 2 e^-2).
    eye = torch.eye(3, dtype=torch.float64)
    loss = clip_loss(5 * eye, 0.5 * eye, math.log(2))
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), abs=1e-12)


def test_clip_scale_is_clamped_at_100():
    # exp(log 1000) = 1000 is clamped to 100: same loss as log 100, and no gradient pushes it further.
    img, txt = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor(math.log(1000.0), dtype=torch.float64, requires_grad=True)
    loss = clip_loss(img, txt, t)
    assert loss.item() == pytest.approx(clip_loss(img, txt, math.log(100.0)).item(), abs=1e-12)
    loss.backward()
    assert t.grad.item() == 0.0


def test_siglip_loss_2x2_by_hand():
    # logit_scale log 10, bias -10 (SigLIP's init): logits = 10 cos - 10 = [[0, 10A-10], [-10, 10A-10]]
    # z = [[+1, -1], [-1, +1]]; each term is -logsigmoid(z * l) = log(1 + e^(-z l)):
    #   [0,0]: log 2      [0,1]: log(1 + e^(10A-10))
    #   [1,0]: log(1 + e^-10)   [1,1]: log(1 + e^(10-10A))
    # loss = sum / batch (2)
    expected = (math.log(2) + softplus(10 * A - 10) + softplus(-10) + softplus(10 - 10 * A)) / 2
    loss = siglip_loss(IMG2, TXT2, math.log(10), -10.0)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_siglip_loss_3x3_by_hand():
    # img = txt = I3, logit_scale 0 (scale 1), bias 0.5: logits = I + 0.5.
    # 3 diagonal terms: -logsigmoid(1.5) = log(1 + e^-1.5); 6 off-diagonal: -logsigmoid(-0.5) = log(1 + e^0.5).
    eye = torch.eye(3, dtype=torch.float64)
    expected = (3 * softplus(-1.5) + 6 * softplus(0.5)) / 3
    assert siglip_loss(eye, 2 * eye, 0.0, 0.5).item() == pytest.approx(expected, abs=1e-12)
    # Same matrix through the chunked path with a chunk that does not divide 3.
    assert siglip_loss_chunked(eye, 2 * eye, 0.0, 0.5, chunk_size=2).item() == pytest.approx(expected, abs=1e-12)


# Hard negatives: TXT2 plus a third text (0, 1), which matches neither image. With it,
#   cos = [[1, A, 0],
#          [0, A, 1]]
TXT2_NEG = torch.cat([TXT2, torch.tensor([[0.0, 1.0]], dtype=torch.float64)])


def test_clip_loss_with_a_hard_negative_by_hand():
    # image -> text rows now have three choices: row 0: log(1 + e^(A-1) + e^-1); row 1 (target A):
    # -log(e^A / (1 + e^A + e^1)). The negative is not a query, so the column terms are the 2x2 ones.
    rows = (math.log(1 + math.exp(A - 1) + math.exp(-1)) + math.log((1 + math.exp(A) + math.e) / math.exp(A))) / 2
    cols = (softplus(-1) + math.log(2)) / 2
    loss = clip_loss(IMG2, TXT2_NEG, 0.0)
    assert loss.item() == pytest.approx((rows + cols) / 2, abs=1e-12)


def test_siglip_loss_with_a_hard_negative_by_hand():
    # logits = 10 cos - 10; the third column (0, 1) -> logits [-10, 0], both negatives (z = -1):
    # two more terms, log(1 + e^-10) and log 2, still divided by the batch size 2.
    base = math.log(2) + softplus(10 * A - 10) + softplus(-10) + softplus(10 - 10 * A)
    expected = (base + softplus(-10) + math.log(2)) / 2
    assert siglip_loss(IMG2, TXT2_NEG, math.log(10), -10.0).item() == pytest.approx(expected, abs=1e-12)
    for chunk_size in (1, 2, 3):
        assert siglip_loss_chunked(IMG2, TXT2_NEG, math.log(10), -10.0, chunk_size).item() == pytest.approx(expected, abs=1e-12)


def test_a_missing_text_is_an_error():
    img, txt = torch.randn(3, 4), torch.randn(2, 4)
    for loss in (lambda: clip_loss(img, txt, 0.0), lambda: siglip_loss(img, txt, 0.0, 0.0),
                 lambda: siglip_loss_chunked(img, txt, 0.0, 0.0, 2)):
        with pytest.raises(ValueError, match="3 images but 2 texts"):
            loss()


def test_parameter_tensors_of_shape_1_work():
    # The model stores logit_scale / logit_bias as shape [1]; the loss must still be a scalar.
    img, txt = torch.randn(3, 4), torch.randn(3, 4)
    s, b = torch.full((1,), 1.0), torch.full((1,), -2.0)
    for loss in (clip_loss(img, txt, s), siglip_loss(img, txt, s, b), siglip_loss_chunked(img, txt, s, b, 2)):
        assert loss.shape == ()


def _leaves(B=4, D=3, seed=0, M=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(B, D, dtype=torch.float64, generator=g, requires_grad=True)
    txt = torch.randn(B + M, D, dtype=torch.float64, generator=g, requires_grad=True)  # M hard negatives
    scale = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([-1.3], dtype=torch.float64, requires_grad=True)
    return img, txt, scale, bias


def test_gradcheck_clip():
    img, txt, scale, _ = _leaves()
    assert torch.autograd.gradcheck(clip_loss, (img, txt, scale))
    img, txt, scale, _ = _leaves(M=2)
    assert torch.autograd.gradcheck(clip_loss, (img, txt, scale))


def test_gradcheck_siglip():
    assert torch.autograd.gradcheck(siglip_loss, _leaves())
    assert torch.autograd.gradcheck(siglip_loss, _leaves(M=2))


def test_gradcheck_siglip_chunked():
    assert torch.autograd.gradcheck(lambda *a: siglip_loss_chunked(*a, chunk_size=3), _leaves(B=5))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 7, 10])
@pytest.mark.parametrize("negatives", [0, 3])
def test_chunked_equals_direct_value_and_gradients(chunk_size, negatives):
    # B = 7: chunk sizes 2, 3, 4 leave a short last block; 10 is larger than the batch (not with 3 negatives).
    direct_in, chunked_in = _leaves(B=7, D=5, seed=1, M=negatives), _leaves(B=7, D=5, seed=1, M=negatives)
    direct = siglip_loss(*direct_in)
    chunked = siglip_loss_chunked(*chunked_in, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, direct, rtol=0, atol=1e-12)
    direct.backward()
    chunked.backward()
    for a, b in zip(chunked_in, direct_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


def test_chunked_never_keeps_the_full_matrix_for_backward():
    # Every tensor autograd saves for backward is recorded; the direct loss keeps (B, B) ones, the
    # chunked loss nothing larger than its inputs or a (B, chunk) block.
    B, D, chunk = 64, 4, 8

    def largest_saved(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            loss = fn(*_leaves(B=B, D=D))
        loss.backward()
        return max(sizes)

    assert largest_saved(siglip_loss) >= B * B
    assert largest_saved(lambda *a: siglip_loss_chunked(*a, chunk_size=chunk)) <= B * max(D, chunk)


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError):
        siglip_loss_chunked(*_leaves(), chunk_size=0)
