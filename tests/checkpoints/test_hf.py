"""Checkpoint folders: names, shards, strictness, dtypes, and the published configs' sizes."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from paligemma_cli.checkpoints.hf import canonical_key, hub_key, load_model, save_model
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.model.config import PRESETS, PaliGemmaConfig
from paligemma_cli.model.paligemma import PaliGemma
from tests.fixtures.hf_reference import make_inputs


@pytest.fixture(scope="module")
def reference(hf_checkpoint):
    folder, _ = hf_checkpoint
    model = load_model(folder)
    batch = make_inputs([4, 2], seed=5)
    with torch.no_grad():
        return folder, model(**batch), batch


def _copy_with_state(src, dst, state):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(state, str(dst / "model.safetensors"))


def _logits(folder, batch, **kw):
    with torch.no_grad():
        return load_model(folder, **kw)(**batch)


def test_in_memory_names_load(reference, tmp_path):
    folder, expected, batch = reference
    state = load_file(folder / "model.safetensors")
    renamed = {"model." + canonical_key(k): v for k, v in state.items() if canonical_key(k)}
    renamed["lm_head.weight"] = renamed["model.language_model.embed_tokens.weight"].clone()
    _copy_with_state(folder, tmp_path / "mem", renamed)
    assert torch.equal(_logits(tmp_path / "mem", batch), expected)


def test_hub_names_load(reference, tmp_path):
    folder, expected, batch = reference
    state = load_file(folder / "model.safetensors")
    hub = {hub_key(canonical_key(k)): v for k, v in state.items()}
    assert any(k.startswith("vision_tower.vision_model.") for k in hub)
    _copy_with_state(folder, tmp_path / "hub", hub)
    assert torch.equal(_logits(tmp_path / "hub", batch), expected)


def test_sharded_checkpoint_loads(reference, tmp_path):
    folder, expected, batch = reference
    model = load_model(folder)
    save_model(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    assert torch.equal(_logits(tmp_path / "sharded", batch), expected)


def test_saved_folder_loads_in_transformers(reference, tmp_path):
    from transformers import PaliGemmaForConditionalGeneration

    folder, expected, batch = reference
    save_model(load_model(folder), tmp_path / "ours")
    hf = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    from tests.fixtures.hf_reference import hf_position_ids

    with torch.no_grad():
        got = hf(**batch, position_ids=hf_position_ids(batch["attention_mask"])).logits
    real = batch["attention_mask"].bool()
    assert (got[real] - expected[real]).abs().max() < 1e-4


def test_missing_key_is_named(reference, tmp_path):
    folder, _, _ = reference
    state = load_file(folder / "model.safetensors")
    victim = "language_model.model.layers.1.mlp.up_proj.weight"
    del state[victim]
    _copy_with_state(folder, tmp_path / "missing", state)
    with pytest.raises(PaliGemmaError, match=r"missing language_model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path / "missing")


def test_extra_key_is_named(reference, tmp_path):
    folder, _, _ = reference
    state = load_file(folder / "model.safetensors")
    state["vision_tower.head.probe"] = torch.zeros(1, 1, 24)
    _copy_with_state(folder, tmp_path / "extra", state)
    with pytest.raises(PaliGemmaError, match=r"unexpected vision_tower\.head\.probe"):
        load_model(tmp_path / "extra")


def test_shape_mismatch_is_explained(reference, tmp_path):
    folder, _, _ = reference
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 64
    (tmp_path / "bad").mkdir()
    shutil.copy(folder / "model.safetensors", tmp_path / "bad" / "model.safetensors")
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PaliGemmaError, match="config.json and weights do not match"):
        load_model(tmp_path / "bad")


@pytest.mark.parametrize("make", ["empty", "no_weights", "not_json", "missing"])
def test_not_a_checkpoint(tmp_path, make):
    folder = tmp_path / "x"
    if make != "missing":
        folder.mkdir()
    if make == "no_weights":
        (folder / "config.json").write_text(json.dumps(PaliGemmaConfig().to_dict()))
    if make == "not_json":
        (folder / "config.json").write_text("{not json")
    with pytest.raises(PaliGemmaError) as e:
        load_model(folder)
    assert "\n" not in str(e.value)


def test_loads_straight_into_bfloat16(reference):
    folder, expected, batch = reference
    model = load_model(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        got = model(**batch).float()
    real = batch["attention_mask"].bool()
    # bf16 keeps ~3 significant digits; the logits must still be close to the float32 ones.
    assert (got[real] - expected[real]).abs().max() < 0.15


@pytest.mark.parametrize("name", ["paligemma-3b-224", "paligemma-3b-896", "paligemma2-3b-224",
                                  "paligemma2-10b-448", "paligemma2-28b-224"])
def test_published_configs_match_transformers_parameter_count(name):
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration

    cfg = PaliGemmaConfig.from_name(name)
    with torch.device("meta"):
        ours = PaliGemma(cfg)
        hf = PaliGemmaForConditionalGeneration(HFConfig(**cfg.to_dict()))
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())  # the tied head is counted once
    assert n_ours == n_hf
    assert set(PRESETS) >= {name}


def test_config_round_trip_and_overrides():
    cfg = PaliGemmaConfig.from_name("paligemma2-28b-448", text__num_hidden_layers=2)
    assert cfg.text.num_hidden_layers == 2 and cfg.text.query_pre_attn_scalar == 144
    assert cfg.num_image_tokens == 1024
    again = PaliGemmaConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_a_vision_config_with_use_head_loads_without_the_head_and_says_so(hf_checkpoint, tmp_path):
    """SigLIP's default is `vision_use_head: true`: a folder saved from a config that omits it carries
    `vision_tower.head.*`, which PaliGemma never uses. Exactly those are passed over, with one warning."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    folder, _ = hf_checkpoint
    copy = tmp_path / "with-head"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["vision_config"].pop("vision_use_head", None)
    (copy / "config.json").write_text(json.dumps(cfg))
    weights = load_file(copy / "model.safetensors")
    head = {"vision_tower.vision_model.head.probe": torch.zeros(1, 1, 24),
            "vision_tower.vision_model.head.mlp.fc1.weight": torch.zeros(8, 24)}
    save_file({**weights, **head}, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="pooling head"):
        model = load_model(copy)
    reference = load_model(folder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    cfg["vision_config"]["vision_use_head"] = False  # says it has none: then the extra keys are an error
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PaliGemmaError, match="unexpected vision_tower.vision_model.head"):
        load_model(copy)
