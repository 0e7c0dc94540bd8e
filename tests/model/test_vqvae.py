"""The torch VQ-VAE against a NumPy transcription of big_vision's decoder and encoder, on random weights
with the names and shapes of `vae-oid.npz`."""

import numpy as np
import pytest
import torch

from paligemma_cli.checkpoints.vae import expected_shapes, load_vae, save_vae
from paligemma_cli.model.vqvae import VQVAE, mask_iou, vqvae_loss
from tests.fixtures.vae_oracle import decode_masks, encode_masks, random_vae_params, vae_oid_shapes

GOLDEN_IDX = np.stack([np.arange(16), (np.arange(16) * 37 + 5) % 128])


def write_params(path, params):
    np.savez(path, **params)
    return path


@pytest.fixture(scope="module", params=[512, 8])
def vae_file(request, tmp_path_factory):
    dim = request.param
    path = tmp_path_factory.mktemp(f"vae{dim}") / "vae-oid.npz"
    return dim, write_params(path, random_vae_params(0, dim))


def test_published_names_and_shapes():
    assert expected_shapes(512) == vae_oid_shapes(512)
    assert expected_shapes(8) == vae_oid_shapes(8)
    assert len(vae_oid_shapes()) == 47


@pytest.mark.parametrize("seed", [0, 1])
def test_decoder_equals_the_oracle(vae_file, seed, tmp_path):
    dim, _ = vae_file
    params = random_vae_params(seed, dim)
    model, has_encoder = load_vae(write_params(tmp_path / "v.npz", params))
    assert has_encoder and model.dim == dim
    idx = np.random.RandomState(seed + 10).randint(0, 128, (3, 16))
    expected = decode_masks(params, idx)[..., 0]
    got = model.decode_codes(torch.from_numpy(idx)).numpy()
    assert got.shape == (3, 64, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert expected.std() > 0.1 and (expected > 0).mean() not in (0.0, 1.0)  # a test that can fail


GOLDEN = {  # out.mean(), out[0,0,0], out[1,31,17], out[0,63,63], foreground counts per row
    512: (0.109382, 0.084035, -0.458689, 0.083017, [2023, 2035]),
    8: (0.397577, 0.222162, 0.972588, 0.224727, [3270, 3293]),
}


def test_golden_values(vae_file):
    dim, path = vae_file
    model, _ = load_vae(path)
    out = model.decode_codes(torch.from_numpy(GOLDEN_IDX)).numpy()
    mean, a, b, c, counts = GOLDEN[dim]
    assert out.mean() == pytest.approx(mean, abs=2e-6)
    assert out[0, 0, 0] == pytest.approx(a, abs=2e-6)
    assert out[1, 31, 17] == pytest.approx(b, abs=2e-6)
    assert out[0, 63, 63] == pytest.approx(c, abs=2e-6)
    assert (out > 0).sum((1, 2)).tolist() == counts


def test_token_layout_is_row_major():
    model = VQVAE(8)
    codes = torch.arange(16)[None] * 7 % 128
    grid = model.embed_codes(codes)  # (1, D, 4, 4)
    for k in range(16):
        torch.testing.assert_close(grid[0, :, k // 4, k % 4], model._vq_vae._embedding[codes[0, k]])


def test_encoder_equals_the_oracle(tmp_path):
    params = random_vae_params(3, 8)
    model, _ = load_vae(write_params(tmp_path / "v.npz", params))
    rs = np.random.RandomState(0)
    masks = (rs.rand(4, 64, 64) > 0.5).astype(np.float32)
    masks[0] = 0
    masks[1, 10:40, 5:60] = 1
    expected = encode_masks(params, masks)
    z = model.encode(torch.from_numpy(masks)[:, None])
    got = model.codes(torch.from_numpy(masks)[:, None]).numpy()
    assert (got == expected).mean() >= 0.95, (got, expected)  # float32 vs float64 may flip a near tie
    assert len(set(expected.ravel().tolist())) > 3
    assert z.shape == (4, 8, 4, 4)


def test_extra_keys_are_ignored_and_a_decoder_only_file_decodes(tmp_path):
    params = random_vae_params(0, 8)
    extra = dict(params, **{"_vq_vae._ema_cluster_size": np.ones(128, np.float32),
                            "_vq_vae._ema_w": np.ones((128, 8), np.float32)})
    model, _ = load_vae(write_params(tmp_path / "extra.npz", extra))
    decoder_only = {k: v for k, v in params.items() if not k.startswith("encoder.")}
    small, has_encoder = load_vae(write_params(tmp_path / "dec.npz", decoder_only))
    assert not has_encoder
    idx = torch.from_numpy(GOLDEN_IDX)
    torch.testing.assert_close(small.decode_codes(idx), model.decode_codes(idx), rtol=0, atol=0)


def test_save_and_load_round_trip(tmp_path):
    model = VQVAE(8)
    path = save_vae(model, tmp_path / "out" / "vae-oid.npz")
    loaded, _ = load_vae(path)
    with np.load(path) as npz:
        assert set(npz.files) == set(vae_oid_shapes(8))
    for k, v in loaded.state_dict().items():
        if not k.startswith("_vq_vae._ema"):
            torch.testing.assert_close(v, model.state_dict()[k], rtol=0, atol=0)


def test_training_pass_moves_the_codebook_and_learns():
    torch.manual_seed(0)
    model = VQVAE(8).train()
    masks = torch.zeros(4, 1, 64, 64)
    masks[:2, :, 8:56, 8:56] = 1
    masks[2, :, 20:50, 0:30] = 1
    before = model._vq_vae._embedding.clone()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        with torch.no_grad():
            z = model.encode(masks).permute(0, 2, 3, 1).reshape(-1, 8)
        model._vq_vae.restart_dead_codes(z)
        loss, stats = vqvae_loss(model, masks)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(before, model._vq_vae._embedding)
    assert losses[-1] < losses[0] * 0.5 and stats["iou"] > 0.6


def test_dead_codes_restart_on_encoder_outputs():
    vq = VQVAE(4)._vq_vae
    z = torch.randn(32, 4)
    assert vq.restart_dead_codes(z) == 128  # a fresh codebook: every code is unused
    assert all(any(torch.equal(row, v) for v in z) for row in vq._embedding)
    vq._ema_cluster_size[:100] = 5.0
    assert vq.restart_dead_codes(z) == 0 and vq._ema_cluster_size.min() == 1.0


def test_mask_iou():
    a = torch.zeros(3, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[0, :2], b[0, 1:3] = True, True  # 4 shared of 12
    a[1, 0, 0] = True
    assert mask_iou(a, b).tolist() == pytest.approx([4 / 12, 0.0, 1.0])


def test_convert_recasts_a_vae_file(tmp_path):
    from typer.testing import CliRunner

    from paligemma_cli.cli import app

    params = random_vae_params(0, 8)
    src = write_params(tmp_path / "v.npz", params)
    result = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "half.npz"), "--dtype", "fp16"])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "half.npz") as npz:
        assert set(npz.files) == set(params) and all(npz[k].dtype == np.float16 for k in npz.files)
    half, _ = load_vae(tmp_path / "half.npz")
    full, _ = load_vae(src)
    idx = torch.from_numpy(GOLDEN_IDX)
    torch.testing.assert_close(half.decode_codes(idx), full.decode_codes(idx), rtol=0, atol=0.05)
    again = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "half.npz"), "--dtype", "bf16", "--force"])
    assert again.exit_code == 1 and "fp32 or fp16" in again.stderr


def test_convert_never_replaces_its_input(tmp_path):
    from typer.testing import CliRunner

    from paligemma_cli.cli import app

    path = tmp_path / "vae-oid.npz"
    np.savez(path, **random_vae_params(0, 8))
    before = path.read_bytes()
    result = CliRunner().invoke(app, ["convert", str(path), str(path), "--dtype", "fp16", "--force"])
    assert result.exit_code == 1 and "is one of the inputs" in result.stderr
    assert path.read_bytes() == before
