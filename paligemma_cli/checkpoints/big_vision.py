"""big_vision `.npz` PaliGemma checkpoints: read them into this project's model, and write them back.

References: big_vision's `models/proj/paligemma/paligemma.py`, `models/vit.py` and `models/ppp/gemma.py` (the
layout); transformers' `convert_paligemma_weights_to_hf.py` and `convert_paligemma2_weights_to_hf.py`
(the same mapping, one layer at a time).

The layout: keys may start with `params/`; the layers of each tower are stacked on axis 0 (big_vision
scans over them); bfloat16 arrays are stored as 2-byte raw data (numpy has no bfloat16, so JAX writes
`|V2`). The npz does not store the config, so it is read off the array shapes; what shapes cannot tell
(Gemma 2's soft-caps, query scale and sliding window) comes from overrides or the published defaults.

Only the scanned layout with separate `q_einsum`/`kv_einsum` is read: every published PaliGemma has
fewer kv heads than query heads, which is when big_vision writes it that way.

One mapping is written out in code, the inverse (model -> npz, `_to_big_vision`). The expected npz
shapes of a config come from running it on a `meta` model, so the check and the writer cannot disagree.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.model.config import PaliGemmaConfig, TextConfig, VisionConfig
from paligemma_cli.model.paligemma import PaliGemma
from paligemma_cli.model.skeleton import empty_skeleton

ENC = "img/Transformer/encoderblock/"
MHA = ENC + "MultiHeadDotProductAttention_0/"
LLM = "llm/layers/"

# What big_vision's PaliGemma 2 runs with where the shapes say nothing: its Gemma 2 has an attention soft-cap
# of 50 and no sliding window, and PaliGemma's transfer configs turn the final-logit soft-cap off (0). The
# Hugging Face configs of the same models say final soft-cap 30 and a 4096 window (transformers' Gemma2Config
# defaults); past 4096 tokens (896 px: 4096 image tokens + the prompt) the window changes the answer. The
# flags `--final-logit-softcap 30 --sliding-window 4096` give the Hugging Face behaviour.
GEMMA2_DEFAULTS = dict(attn_logit_softcap=50.0, final_logit_softcap=0.0, sliding_window=0)
# Gemma 2 scales queries by head_dim**-0.5, except the 27B decoder (PaliGemma 2 28B, hidden 4608),
# which was trained with (hidden / heads)**-0.5 = 144**-0.5.
_QUERY_SCALAR_BY_HIDDEN = {4608: 144}


# --- reading the file -------------------------------------------------------------------------------


class NpzCheckpoint:
    """An `.npz` opened lazily: shapes come from the array headers, data is read one array at a time.

    A 3B checkpoint is 6-12 GB; reading it whole before knowing whether it is the right file would be
    slow and could run out of memory.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise PaliGemmaError(f"'{self.path}' does not exist")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._members: dict[str, str] = {}
        try:
            self._zip = zipfile.ZipFile(self.path)
            for member in self._zip.namelist():
                if not member.endswith(".npy"):
                    continue
                key = member[: -len(".npy")].removeprefix("params/")
                with self._zip.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, _ = read_header(f)
                self.shapes[key] = tuple(shape)
                self._members[key] = member
        except (zipfile.BadZipFile, zlib.error, ValueError, EOFError, OSError) as e:
            raise PaliGemmaError(f"'{self.path}' is not a readable .npz checkpoint ({e})") from None
        if not self.shapes:
            raise PaliGemmaError(f"'{self.path}' holds no arrays: it is not a big_vision .npz checkpoint")

    def tensor(self, key: str) -> torch.Tensor:
        try:
            with self._zip.open(self._members[key]) as f:
                array = np.lib.format.read_array(f)
        except (zipfile.BadZipFile, zlib.error, ValueError, EOFError, OSError) as e:
            raise PaliGemmaError(f"cannot read '{key}' from '{self.path}': the file is damaged ({e})") from None
        return numpy_to_torch(array)

    def close(self) -> None:
        self._zip.close()


def numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    """A numpy array as a tensor; 2-byte raw (`|V2`, or ml_dtypes' bfloat16) is read as bfloat16 bits."""
    array = np.ascontiguousarray(array)
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    """The inverse: bfloat16 becomes 2-byte raw data, as in the PaliGemma 2 `.npz` files."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view("V2")
    return t.numpy()


# --- the config, from the shapes -------------------------------------------------------------------


def infer_config(shapes: dict[str, tuple[int, ...]], *, final_logit_softcap: float | None = None,
                 attn_logit_softcap: float | None = None, query_pre_attn_scalar: int | None = None,
                 sliding_window: int | None = None) -> PaliGemmaConfig:
    """The PaliGemmaConfig whose model has arrays of these shapes.

    The vocabulary: the npz embedding has one row per piece up to, not including, `<image>` (257152 rows
    for the published models), so `<image>` is the next id and the table is padded past it to a
    multiple of 64 (257216), as the Hugging Face checkpoints are. Overrides apply to Gemma 2 only;
    0 turns a soft-cap or the sliding window off.
    """

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        if key not in shapes:
            raise PaliGemmaError(f"the npz has no '{key}': it is not a PaliGemma checkpoint (or is damaged)")
        if len(shapes[key]) != ndim:
            raise PaliGemmaError(f"'{key}' has shape {shapes[key]}, expected {ndim} dimensions")
        return shapes[key]

    patch, _, channels, width = shape("img/embedding/kernel", 4)
    _, n_patches, _ = shape("img/pos_embedding", 3)
    v_layers, _, v_heads, _ = shape(MHA + "query/kernel", 4)
    _, _, v_mlp = shape(ENC + "MlpBlock_0/Dense_0/kernel", 3)
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise PaliGemmaError(f"'img/pos_embedding' has {n_patches} rows: not a square grid of patches")
    vision = VisionConfig(hidden_size=width, intermediate_size=v_mlp, num_hidden_layers=v_layers,
                          num_attention_heads=v_heads, image_size=side * patch, patch_size=patch,
                          num_channels=channels)

    rows, hidden = shape("llm/embedder/input_embedding", 2)
    layers, heads, _, head_dim = shape(LLM + "attn/q_einsum/w", 4)
    _, _, kv_heads, _, _ = shape(LLM + "attn/kv_einsum/w", 5)
    _, _, _, mlp = shape(LLM + "mlp/gating_einsum", 4)
    gemma2 = LLM + "post_attention_norm/scale" in shapes
    text = TextConfig(model_type="gemma2" if gemma2 else "gemma", vocab_size=_round_up(rows + 1, 64),
                      hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    overrides = dict(final_logit_softcap=final_logit_softcap, attn_logit_softcap=attn_logit_softcap,
                     query_pre_attn_scalar=query_pre_attn_scalar, sliding_window=sliding_window)
    if gemma2:
        o = {k: (GEMMA2_DEFAULTS.get(k) if v is None else v) for k, v in overrides.items()}
        # An int: transformers' Gemma2Config refuses a float here.
        text.query_pre_attn_scalar = int(o["query_pre_attn_scalar"] or _QUERY_SCALAR_BY_HIDDEN.get(hidden, head_dim))
        text.attn_logit_softcapping = o["attn_logit_softcap"] or None
        text.final_logit_softcapping = o["final_logit_softcap"] or None
        text.sliding_window = int(o["sliding_window"]) or None
        # Local (sliding) attention on even layers, global on odd ones, as Gemma 2 was trained.
        text.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    else:
        given = [k.replace("_", "-") for k, v in overrides.items() if v is not None]
        if given:
            raise PaliGemmaError(f"--{', --'.join(given)} only apply to Gemma 2 (PaliGemma 2) checkpoints; "
                                 "this one has a Gemma 1 decoder")
    return PaliGemmaConfig(vision=vision, text=text, image_token_id=rows)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --- the mapping ---------------------------------------------------------------------------------------


def _to_big_vision(state: dict[str, torch.Tensor], cfg: PaliGemmaConfig) -> dict[str, torch.Tensor]:
    """This project's state dict -> big_vision arrays (unprefixed keys). Works on `meta` tensors too."""
    v, t = cfg.vision, cfg.text
    D, H = v.hidden_size, v.num_attention_heads
    out = {}

    def stack(n_layers: int, prefix: str, name: str, fn: Callable = lambda w: w) -> torch.Tensor:
        return torch.stack([fn(state[f"{prefix}.{i}.{name}"]) for i in range(n_layers)])

    # Vision tower. Flax kernels are (in, out); the attention ones keep heads as their own axis.
    vt = "vision_tower."
    out["img/embedding/kernel"] = state[vt + "embeddings.patch_embedding.weight"].permute(2, 3, 1, 0)
    out["img/embedding/bias"] = state[vt + "embeddings.patch_embedding.bias"]
    out["img/pos_embedding"] = state[vt + "embeddings.position_embedding.weight"][None]
    enc = vt + "encoder.layers"
    vstack = lambda name, fn=lambda w: w: stack(v.num_hidden_layers, enc, name, fn)  # noqa: E731
    for ln, flax in (("layer_norm1", "LayerNorm_0"), ("layer_norm2", "LayerNorm_1")):
        out[ENC + f"{flax}/scale"] = vstack(f"{ln}.weight")
        out[ENC + f"{flax}/bias"] = vstack(f"{ln}.bias")
    for fc, flax in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
        out[ENC + f"MlpBlock_0/{flax}/kernel"] = vstack(f"mlp.{fc}.weight", lambda w: w.T)
        out[ENC + f"MlpBlock_0/{flax}/bias"] = vstack(f"mlp.{fc}.bias")
    for proj, flax in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        out[MHA + f"{flax}/kernel"] = vstack(f"self_attn.{proj}.weight", lambda w: w.T.reshape(D, H, D // H))
        out[MHA + f"{flax}/bias"] = vstack(f"self_attn.{proj}.bias", lambda b: b.reshape(H, D // H))
    out[MHA + "out/kernel"] = vstack("self_attn.out_proj.weight", lambda w: w.T.reshape(H, D // H, D))
    out[MHA + "out/bias"] = vstack("self_attn.out_proj.bias")
    out["img/Transformer/encoder_norm/scale"] = state[vt + "post_layernorm.weight"]
    out["img/Transformer/encoder_norm/bias"] = state[vt + "post_layernorm.bias"]
    out["img/head/kernel"] = state["multi_modal_projector.linear.weight"].T
    out["img/head/bias"] = state["multi_modal_projector.linear.bias"]

    # Decoder. Einsum weights keep heads first: q (N, D, H), kv (2, K, D, H), attn_vec (N, H, D).
    Dt, N, K, hd = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
    lm = "language_model.layers"
    tstack = lambda name, fn=lambda w: w: stack(t.num_hidden_layers, lm, name, fn)  # noqa: E731
    # The npz has no padding rows: it ends just before <image>.
    out["llm/embedder/input_embedding"] = state["language_model.embed_tokens.weight"][: cfg.image_token_id]
    out[LLM + "attn/q_einsum/w"] = tstack("self_attn.q_proj.weight", lambda w: w.reshape(N, hd, Dt).transpose(1, 2))
    k = tstack("self_attn.k_proj.weight", lambda w: w.reshape(K, hd, Dt).transpose(1, 2))
    v_ = tstack("self_attn.v_proj.weight", lambda w: w.reshape(K, hd, Dt).transpose(1, 2))
    out[LLM + "attn/kv_einsum/w"] = torch.stack([k, v_], dim=1)
    out[LLM + "attn/attn_vec_einsum/w"] = tstack("self_attn.o_proj.weight",
                                                 lambda w: w.reshape(Dt, N, hd).permute(1, 2, 0))
    gate = tstack("mlp.gate_proj.weight", lambda w: w.T)
    up = tstack("mlp.up_proj.weight", lambda w: w.T)
    out[LLM + "mlp/gating_einsum"] = torch.stack([gate, up], dim=1)
    out[LLM + "mlp/linear"] = tstack("mlp.down_proj.weight", lambda w: w.T)
    out[LLM + "pre_attention_norm/scale"] = tstack("input_layernorm.weight")
    for flax, ours in _decoder_norms(t):
        out[LLM + f"{flax}/scale"] = tstack(f"{ours}.weight")
    out["llm/final_norm/scale"] = state["language_model.norm.weight"]
    return out


def _decoder_norms(t: TextConfig) -> list[tuple[str, str]]:
    # Gemma 1 has one norm before the MLP, which transformers calls post_attention_layernorm.
    if t.is_gemma2:
        return [("pre_ffw_norm", "pre_feedforward_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                ("post_ffw_norm", "post_feedforward_layernorm")]
    return [("pre_ffw_norm", "post_attention_layernorm")]


def _from_big_vision(get: Callable[[str], torch.Tensor], cfg: PaliGemmaConfig) -> dict[str, torch.Tensor]:
    """big_vision arrays (read through `get`) -> this project's state dict; the inverse of `_to_big_vision`."""
    v, t = cfg.vision, cfg.text
    D = v.hidden_size
    Dt, N, K, hd = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
    state = {}

    def unstack(key: str, prefix: str, name: str, fn: Callable = lambda w: w, stacked=None) -> None:
        stacked = get(key) if stacked is None else stacked
        for i in range(stacked.shape[0]):
            # A copy per layer: the stacked array can then be freed, and no two weights share one buffer
            # (safetensors refuses to write those).
            state[f"{prefix}.{i}.{name}"] = fn(stacked[i]).clone(memory_format=torch.contiguous_format)

    vt = "vision_tower."
    state[vt + "embeddings.patch_embedding.weight"] = get("img/embedding/kernel").permute(3, 2, 0, 1)
    state[vt + "embeddings.patch_embedding.bias"] = get("img/embedding/bias")
    state[vt + "embeddings.position_embedding.weight"] = get("img/pos_embedding")[0]
    enc = vt + "encoder.layers"
    for ln, flax in (("layer_norm1", "LayerNorm_0"), ("layer_norm2", "LayerNorm_1")):
        unstack(ENC + f"{flax}/scale", enc, f"{ln}.weight")
        unstack(ENC + f"{flax}/bias", enc, f"{ln}.bias")
    for fc, flax in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
        unstack(ENC + f"MlpBlock_0/{flax}/kernel", enc, f"mlp.{fc}.weight", lambda w: w.T)
        unstack(ENC + f"MlpBlock_0/{flax}/bias", enc, f"mlp.{fc}.bias")
    for proj, flax in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        unstack(MHA + f"{flax}/kernel", enc, f"self_attn.{proj}.weight", lambda w: w.reshape(D, D).T)
        unstack(MHA + f"{flax}/bias", enc, f"self_attn.{proj}.bias", lambda b: b.reshape(-1))
    unstack(MHA + "out/kernel", enc, "self_attn.out_proj.weight", lambda w: w.reshape(D, D).T)
    unstack(MHA + "out/bias", enc, "self_attn.out_proj.bias")
    state[vt + "post_layernorm.weight"] = get("img/Transformer/encoder_norm/scale")
    state[vt + "post_layernorm.bias"] = get("img/Transformer/encoder_norm/bias")
    state["multi_modal_projector.linear.weight"] = get("img/head/kernel").T
    state["multi_modal_projector.linear.bias"] = get("img/head/bias")

    lm = "language_model.layers"
    embed = get("llm/embedder/input_embedding")
    # Zero rows for <image> and the padding: <image>'s row is always replaced by an image feature, and
    # the padding ids are never produced by the tokenizer.
    pad = embed.new_zeros(t.vocab_size - embed.shape[0], Dt)
    state["language_model.embed_tokens.weight"] = torch.cat([embed, pad])
    unstack(LLM + "attn/q_einsum/w", lm, "self_attn.q_proj.weight", lambda w: w.transpose(1, 2).reshape(N * hd, Dt))
    kv = get(LLM + "attn/kv_einsum/w")
    unstack("", lm, "self_attn.k_proj.weight", lambda w: w[0].transpose(1, 2).reshape(K * hd, Dt), kv)
    unstack("", lm, "self_attn.v_proj.weight", lambda w: w[1].transpose(1, 2).reshape(K * hd, Dt), kv)
    del kv
    unstack(LLM + "attn/attn_vec_einsum/w", lm, "self_attn.o_proj.weight",
            lambda w: w.permute(2, 0, 1).reshape(Dt, N * hd))
    gating = get(LLM + "mlp/gating_einsum")  # the largest array: read it once
    unstack("", lm, "mlp.gate_proj.weight", lambda w: w[0].T, gating)
    unstack("", lm, "mlp.up_proj.weight", lambda w: w[1].T, gating)
    del gating
    unstack(LLM + "mlp/linear", lm, "mlp.down_proj.weight", lambda w: w.T)
    unstack(LLM + "pre_attention_norm/scale", lm, "input_layernorm.weight")
    for flax, ours in _decoder_norms(t):
        unstack(LLM + f"{flax}/scale", lm, f"{ours}.weight")
    state["language_model.norm.weight"] = get("llm/final_norm/scale")
    return state


# --- public entry points ---------------------------------------------------------------------------------


def expected_npz_shapes(cfg: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    with empty_skeleton():
        model = PaliGemma(cfg)
    return {k: tuple(a.shape) for k, a in _to_big_vision(model.state_dict(), cfg).items()}


def check_arrays(shapes: dict[str, tuple[int, ...]], cfg: PaliGemmaConfig, path: str | Path = "the npz") -> None:
    """Every array the model needs is there with the right shape, and none is left over."""
    expected = expected_npz_shapes(cfg)
    problems = [f"missing '{k}'" for k in expected if k not in shapes]
    problems += [f"'{k}' has shape {shapes[k]}, expected {want}" for k, want in expected.items()
                 if k in shapes and shapes[k] != want]
    # An array we do not map would be silently dropped: refuse rather than write a wrong model.
    problems += [f"unexpected '{k}'" for k in shapes if k not in expected]
    if problems:
        raise PaliGemmaError(f"'{path}' does not match a PaliGemma model: " + "; ".join(problems))


def load_npz(path: str | Path, dtype: torch.dtype | None = None, progress: Callable[[str], None] | None = None,
             **overrides):
    """A `PaliGemma` from a big_vision `.npz`, in `dtype` (default: the file's), loaded strictly.

    `overrides`: final_logit_softcap, attn_logit_softcap, query_pre_attn_scalar, sliding_window (Gemma 2).
    """
    npz = NpzCheckpoint(path)
    try:
        cfg = infer_config(npz.shapes, **overrides)
        check_arrays(npz.shapes, cfg, path)
        if progress:
            t = cfg.text
            progress(f"{'Gemma 2' if t.is_gemma2 else 'Gemma 1'} decoder: {t.num_hidden_layers} layers, width "
                     f"{t.hidden_size}; SigLIP {cfg.vision.num_hidden_layers} layers; {cfg.image_size} px images")

        def get(key: str) -> torch.Tensor:
            t = npz.tensor(key)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        state = {k: w.contiguous() for k, w in _from_big_vision(get, cfg).items()}
    finally:
        npz.close()
    with empty_skeleton():
        model = PaliGemma(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def state_dict_to_npz(model, prefix: str = "params/") -> dict[str, np.ndarray]:
    """A model's weights in big_vision's layout, ready for `np.savez(path, **arrays)`.

    bfloat16 weights become 2-byte raw data, as in the published PaliGemma 2 files.
    """
    arrays = _to_big_vision(model.state_dict(), model.config)
    return {prefix + k: torch_to_numpy(a) for k, a in arrays.items()}
