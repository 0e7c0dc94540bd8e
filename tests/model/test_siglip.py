"""SigLIP dual encoder: parity with `transformers`' `SiglipModel`, checkpoint round trips, strict loading.

The reference is a tiny random `SiglipModel` with odd sizes: vision head_dim 5, text head_dim 7, a text
width (28) different from the shared embedding width (20) so the text `head` is non-square, 9 patches,
13 text positions. Every parameter, LayerNorms, the probe and logit_scale/bias included, is moved away
from its init so that a wrong formula shows.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from paligemma_cli.checkpoints.hf import load_dual_encoder, save_dual_encoder
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.model.config import SiglipConfig
from paligemma_cli.model.siglip import DualEncoder, SiglipVisionTower
from tests.fixtures.hf_reference import randomize_

VOCAB, MAX_LEN, PAD, EOS = 50, 13, 1, 1
IMAGE, PATCH = 21, 7


def tiny_hf_siglip():
    from transformers import SiglipConfig as HFSiglipConfig
    from transformers import SiglipModel

    cfg = HFSiglipConfig(
        vision_config=dict(hidden_size=20, intermediate_size=36, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE, patch_size=PATCH),
        text_config=dict(hidden_size=28, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=VOCAB, max_position_embeddings=MAX_LEN, projection_size=20,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None),
    )
    torch.manual_seed(0)
    model = SiglipModel(cfg).eval()
    randomize_(model, seed=3)
    with torch.no_grad():
        model.logit_scale.fill_(1.7)  # exp = 5.47, neither SigLIP's init (log 10) nor HF's zeros
        model.logit_bias.fill_(-2.3)
    return model


@pytest.fixture(scope="module")
def hf_siglip(tmp_path_factory):
    model = tiny_hf_siglip()
    folder = tmp_path_factory.mktemp("hf-siglip")
    model.save_pretrained(folder)
    return folder, model


def make_batch(n_images=3, lengths=(4, 12, 1, 7), seed=0):
    """Images in [-1, 1], and texts of random tokens + </s>, padded with </s> to MAX_LEN like SigLIP's processor."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.rand(n_images, 3, IMAGE, IMAGE, generator=g) * 2 - 1
    input_ids = torch.full((len(lengths), MAX_LEN), PAD)
    attention_mask = torch.zeros(len(lengths), MAX_LEN, dtype=torch.long)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        input_ids[i, n] = EOS
        attention_mask[i, :n + 1] = 1
    return pixel_values, input_ids, attention_mask


def test_config_reads_hf_config(hf_siglip):
    folder, _ = hf_siglip
    cfg = SiglipConfig.from_json(folder / "config.json")
    v = cfg.vision
    assert (v.hidden_size, v.image_size, v.patch_size, v.num_patches) == (20, IMAGE, PATCH, 9)
    assert (cfg.text.hidden_size, cfg.text.output_size, cfg.text.max_position_embeddings) == (28, 20, MAX_LEN)
    assert (cfg.text.vocab_size, cfg.text.pad_token_id, cfg.text.eos_token_id) == (VOCAB, PAD, EOS)


def test_parity_with_transformers(hf_siglip):
    folder, hf = hf_siglip
    model = load_dual_encoder(folder)
    pixel_values, input_ids, _ = make_batch()
    with torch.no_grad():
        ref = hf(input_ids=input_ids, pixel_values=pixel_values)
        logits_per_image, logits_per_text = model(pixel_values, input_ids)
    assert logits_per_image.shape == (3, 4)
    assert (logits_per_image - ref.logits_per_image).abs().max().item() < 1e-4
    torch.testing.assert_close(logits_per_text, ref.logits_per_text, rtol=0, atol=1e-4)
    # The pooled, unnormalised features too (HF get_image_features / get_text_features).
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixel_values), hf.get_image_features(pixel_values).pooler_output,
                                   rtol=0, atol=1e-4)
        torch.testing.assert_close(model.encode_text(input_ids), hf.get_text_features(input_ids).pooler_output,
                                   rtol=0, atol=1e-4)


def test_parity_with_attention_mask(hf_siglip):
    # Not how SigLIP was trained, but a caller that masks padding keys must get what transformers gives.
    folder, hf = hf_siglip
    model = load_dual_encoder(folder)
    pixel_values, input_ids, attention_mask = make_batch(seed=1)
    with torch.no_grad():
        ref = hf(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask).logits_per_image
        ours = model(pixel_values, input_ids, attention_mask)[0]
        unmasked = model(pixel_values, input_ids)[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    assert (ours - unmasked).abs().max() > 1e-3  # the mask does change the numbers


def test_vision_tower_state_dict_drops_into_siglip_vision_tower(hf_siglip):
    folder, hf = hf_siglip
    model = load_dual_encoder(folder)
    tower = SiglipVisionTower(model.config.vision)
    tower.load_state_dict(model.vision_tower_state_dict(), strict=True)
    assert not any(k.startswith("head.") for k in model.vision_tower_state_dict())
    pixel_values, _, _ = make_batch(seed=2)
    with torch.no_grad():
        ref = hf.vision_model(pixel_values).last_hidden_state  # (B, N, D) before the head
        torch.testing.assert_close(tower(pixel_values), ref, rtol=0, atol=1e-4)


def test_save_pretrained_loads_in_transformers(hf_siglip, tmp_path):
    from transformers import SiglipModel

    folder, hf = hf_siglip
    model = load_dual_encoder(folder)
    out = save_dual_encoder(model, tmp_path / "ours")
    assert set(load_file(out / "model.safetensors")) == set(load_file(folder / "model.safetensors"))
    reloaded = SiglipModel.from_pretrained(out).eval()
    pixel_values, input_ids, _ = make_batch(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids, pixel_values=pixel_values).logits_per_image,
                                   hf(input_ids=input_ids, pixel_values=pixel_values).logits_per_image,
                                   rtol=0, atol=1e-6)
    # ... and back into this project unchanged.
    again = load_dual_encoder(out)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)


def _copy_with_weights(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    save_file(edit(state), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_model_prefix_is_accepted(hf_siglip, tmp_path):
    folder, _ = hf_siglip
    prefixed = _copy_with_weights(folder, tmp_path / "p", lambda s: {"model." + k: v for k, v in s.items()})
    model = load_dual_encoder(prefixed)
    assert model.logit_bias.item() == pytest.approx(-2.3)


def test_missing_key_is_named(hf_siglip, tmp_path):
    folder, _ = hf_siglip
    key = "vision_model.head.probe"
    broken = _copy_with_weights(folder, tmp_path / "m", lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(PaliGemmaError, match=r"missing vision_model\.head\.probe"):
        load_dual_encoder(broken)


def test_unexpected_key_is_named(hf_siglip, tmp_path):
    folder, _ = hf_siglip
    broken = _copy_with_weights(folder, tmp_path / "u", lambda s: {**s, "text_model.extra.weight": torch.zeros(2)})
    with pytest.raises(PaliGemmaError, match=r"unexpected text_model\.extra\.weight"):
        load_dual_encoder(broken)


def test_shape_mismatch_is_named(hf_siglip, tmp_path):
    folder, _ = hf_siglip
    broken = _copy_with_weights(folder, tmp_path / "s", lambda s: {**s, "logit_bias": torch.zeros(2)})
    with pytest.raises(PaliGemmaError, match="logit_bias"):
        load_dual_encoder(broken)


def test_wrong_model_type_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
    with pytest.raises(PaliGemmaError, match="not a SigLIP"):
        load_dual_encoder(tmp_path)


def test_text_longer_than_positions_is_an_error(hf_siglip):
    model = load_dual_encoder(hf_siglip[0])
    with pytest.raises(PaliGemmaError, match="at most 13"):
        model.encode_text(torch.ones(1, MAX_LEN + 1, dtype=torch.long))


def test_fresh_model_init_and_one_training_step():
    from paligemma_cli.training.contrastive_loss import siglip_loss_chunked

    cfg = SiglipConfig.from_name(
        "siglip-base-patch16-224", vision__hidden_size=20, vision__intermediate_size=36, vision__num_hidden_layers=1,
        vision__num_attention_heads=4, vision__image_size=IMAGE, vision__patch_size=PATCH, text__hidden_size=20,
        text__intermediate_size=24, text__num_hidden_layers=1, text__num_attention_heads=4, text__vocab_size=VOCAB,
        text__max_position_embeddings=MAX_LEN,
    )
    torch.manual_seed(0)
    model = DualEncoder(cfg)
    assert model.logit_scale.item() == pytest.approx(math.log(10))
    assert model.logit_bias.item() == pytest.approx(-10)
    pixel_values, input_ids, _ = make_batch(n_images=4)
    loss = siglip_loss_chunked(model.encode_image(pixel_values), model.encode_text(input_ids),
                               model.logit_scale, model.logit_bias, chunk_size=3)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_mismatched_embedding_widths_are_rejected():
    cfg = SiglipConfig.from_name("siglip-base-patch16-224", text__projection_size=10)
    with pytest.raises(PaliGemmaError, match="projection size 10"):
        DualEncoder(cfg)
