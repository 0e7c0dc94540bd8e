"""Model configuration: dataclasses read from a checkpoint's `config.json`, and named presets.

The on-disk formats are Hugging Face's `PaliGemmaConfig` and `SiglipConfig` (a `vision_config` and a
`text_config` inside one JSON object). Keys a checkpoint leaves out take the defaults `transformers`
would use for its `model_type`, so a hub `config.json` and a `save_pretrained` one read the same.
Presets (`PaliGemmaConfig.from_name("paligemma2-3b-448", text__num_hidden_layers=2)`) give the published
shapes and the small ones this project trains; overrides make tiny test versions of them (litgpt's way).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from paligemma_cli.errors import PaliGemmaError

GEMMA_VOCAB = 257216  # 256000 pieces + 1024 <loc> + 128 <seg> + <image>, padded to a multiple of 64
IMAGE_TOKEN_ID = 257152


class ConfigFile:
    """What the model configs share: `config.json` in and out, and named presets with overrides."""

    presets: ClassVar[dict[str, Callable]]
    kind: ClassVar[str]  # for messages: "model", "SigLIP"

    def to_dict(self) -> dict:
        raise NotImplementedError

    def save(self, folder: str | Path) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @staticmethod
    def read_json(path: str | Path) -> dict:
        """The JSON object in `path`; a missing or malformed file is a one-line error."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise PaliGemmaError(f"'{path.parent}' is not a checkpoint folder: it has no config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PaliGemmaError(f"'{path}' is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise PaliGemmaError(f"'{path}' must hold a JSON object, not {type(d).__name__}")
        for name in ("vision_config", "text_config"):
            if d.get(name) is not None and not isinstance(d[name], dict):
                raise PaliGemmaError(f"'{path}': {name} must be a JSON object, not {type(d[name]).__name__}")
        return d

    @classmethod
    def parse(cls, d: dict, path: str | Path):
        """`from_dict(d)` with every field checked: a value of the wrong type or size is a one-line error
        naming `path` (a config.json from elsewhere must not fail later, deep in the model)."""
        try:
            cfg = cls.from_dict(d)
        except (TypeError, ValueError, AttributeError) as e:
            raise PaliGemmaError(f"'{path}' has a value of the wrong kind ({e})") from None
        for part_name in ("vision", "text"):
            part = getattr(cfg, part_name)
            for f in dataclasses.fields(part):
                _check_field(path, f"{part_name}_config.{f.name}", getattr(part, f.name), f.type)
        cfg.check_shapes(path)
        return cfg

    @classmethod
    def from_name(cls, name: str, **overrides):
        """A preset by name; overrides as `text__hidden_size=64` (part__field) or `image_token_id=5`."""
        if name not in cls.presets:
            raise PaliGemmaError(f"unknown {cls.kind} config {name!r}; known: {', '.join(sorted(cls.presets))}")
        cfg = cls.presets[name]()
        for key, value in overrides.items():
            part, _, attr = key.partition("__")
            setattr(getattr(cfg, part) if attr else cfg, attr or part, value)
        return cfg


@dataclass
class VisionConfig:
    """SigLIP vision tower (no pooling head)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        """The keys `transformers`' `SiglipVisionConfig` reads."""
        return {"model_type": "siglip_vision_model", **dataclasses.asdict(self)}


@dataclass
class TextConfig:
    """Gemma 1 (`model_type` "gemma") or Gemma 2 ("gemma2") decoder."""

    model_type: str = "gemma"
    vocab_size: int = GEMMA_VOCAB
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_hidden_layers: int = 18
    num_attention_heads: int = 8
    num_key_value_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    # Gemma 2 only; None disables each.
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # "sliding_attention" | "full_attention" per layer

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"

    @property
    def attn_scale(self) -> float:
        if self.query_pre_attn_scalar:
            return float(self.query_pre_attn_scalar) ** -0.5
        return self.head_dim**-0.5

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer i, or None for full attention."""
        if not self.sliding_window or self.layer_types is None:
            return None
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None


@dataclass
class PaliGemmaConfig(ConfigFile):
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = IMAGE_TOKEN_ID

    presets: ClassVar[dict[str, Callable]] = {}
    kind: ClassVar[str] = "model"

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    # --- reading and writing config.json -------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict) -> "PaliGemmaConfig":
        v = dict(d.get("vision_config") or {})
        t = dict(d.get("text_config") or {})
        patch = v.get("patch_size", 14)
        image_size = v.get("image_size")
        if image_size is None:
            # Hub 224 configs omit image_size; num_image_tokens still tells the resolution.
            n = v.get("num_image_tokens") or t.get("num_image_tokens")
            image_size = int(math.isqrt(n)) * patch if n else 224
        vision = VisionConfig(
            hidden_size=v.get("hidden_size", 1152),
            intermediate_size=v.get("intermediate_size", 4304),
            num_hidden_layers=v.get("num_hidden_layers", 27),
            num_attention_heads=v.get("num_attention_heads", 16),
            image_size=int(image_size),
            patch_size=patch,
            layer_norm_eps=v.get("layer_norm_eps", 1e-6),
            num_channels=v.get("num_channels", 3),
        )
        text = _text_config_from_dict(t)
        image_token_id = d.get("image_token_index", d.get("image_token_id", IMAGE_TOKEN_ID))
        return cls(vision=vision, text=text, image_token_id=image_token_id)

    @classmethod
    def from_json(cls, path: str | Path) -> "PaliGemmaConfig":
        d = cls.read_json(path)
        if d.get("model_type") not in (None, "paligemma"):
            raise PaliGemmaError(f"'{path}' describes a {d.get('model_type')!r} model, not a PaliGemma one")
        if "text_config" not in d:
            raise PaliGemmaError(f"'{path}' has no text_config: it is not a PaliGemma config")
        return cls.parse(d, path)

    def check_shapes(self, path) -> None:
        v, t = self.vision, self.text
        _check_field(path, "image_token_index", self.image_token_id, "int")
        if v.hidden_size % v.num_attention_heads or v.image_size % v.patch_size:
            raise PaliGemmaError(f"'{path}': the vision tower's sizes do not fit together (hidden {v.hidden_size}, "
                                 f"{v.num_attention_heads} heads, image {v.image_size}, patch {v.patch_size})")
        if t.num_attention_heads % t.num_key_value_heads:
            raise PaliGemmaError(f"'{path}': {t.num_attention_heads} attention heads cannot share "
                                 f"{t.num_key_value_heads} key/value heads")
        if t.layer_types is not None and len(t.layer_types) != t.num_hidden_layers:
            raise PaliGemmaError(f"'{path}': layer_types names {len(t.layer_types)} layers, not {t.num_hidden_layers}")

    def to_dict(self) -> dict:
        """The Hugging Face layout, loadable by `transformers.PaliGemmaConfig` too."""
        v, t = self.vision, self.text
        text = {
            "model_type": t.model_type,
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "max_position_embeddings": t.max_position_embeddings,
            "hidden_activation": "gelu_pytorch_tanh",
            "num_image_tokens": self.num_image_tokens,
        }
        if t.is_gemma2:
            text.update(
                query_pre_attn_scalar=t.query_pre_attn_scalar,
                attn_logit_softcapping=t.attn_logit_softcapping,
                final_logit_softcapping=t.final_logit_softcapping,
                sliding_window=t.sliding_window,
                layer_types=t.layer_types,
            )
        return {
            "architectures": ["PaliGemmaForConditionalGeneration"],
            "model_type": "paligemma",
            "image_token_index": self.image_token_id,
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "projection_dim": t.hidden_size,
            "text_config": text,
            "vision_config": {**v.to_dict(), "num_image_tokens": self.num_image_tokens,
                              "projection_dim": t.hidden_size, "vision_use_head": False},
        }


_GEMMA2_LAYERS = lambda n: ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]  # noqa: E731


_POSITIVE = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size", "image_size", "patch_size", "num_channels", "max_position_embeddings"}


def _check_field(path, name: str, value, annotation: str) -> None:
    """`value` has the type the dataclass annotation names ("int", "float | None", "list[str] | None")."""
    optional = annotation.endswith("| None")
    kind = annotation.removesuffix("| None").strip()
    if value is None and optional:
        return
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str),
          "list[str]": isinstance(value, list) and all(isinstance(x, str) for x in value)}.get(kind, True)
    if not ok:
        raise PaliGemmaError(f"'{path}': {name} must be {kind.replace('list[str]', 'a list of names')}, "
                             f"got {value!r}")
    if name.split(".")[-1] in _POSITIVE and value < 1:
        raise PaliGemmaError(f"'{path}': {name} must be at least 1, got {value!r}")


def _text_config_from_dict(t: dict) -> TextConfig:
    model_type = t.get("model_type", "gemma")
    if model_type not in ("gemma", "gemma2"):
        raise PaliGemmaError(f"unsupported text model {model_type!r}: expected gemma or gemma2")
    rope = t.get("rope_parameters") or {}
    common = dict(
        model_type=model_type,
        vocab_size=t.get("vocab_size", GEMMA_VOCAB),
        head_dim=t.get("head_dim", 256),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", t.get("rope_theta", 10000.0)),
        max_position_embeddings=t.get("max_position_embeddings", 8192),
    )
    if model_type == "gemma":
        # transformers' GemmaConfig defaults (the 7B shape) for anything the file leaves out.
        return TextConfig(
            hidden_size=t.get("hidden_size", 3072),
            intermediate_size=t.get("intermediate_size", 24576),
            num_hidden_layers=t.get("num_hidden_layers", 28),
            num_attention_heads=t.get("num_attention_heads", 16),
            num_key_value_heads=t.get("num_key_value_heads", 16),
            **common,
        )
    layers = t.get("num_hidden_layers", 26)
    return TextConfig(
        hidden_size=t.get("hidden_size", 2304),
        intermediate_size=t.get("intermediate_size", 9216),
        num_hidden_layers=layers,
        num_attention_heads=t.get("num_attention_heads", 8),
        num_key_value_heads=t.get("num_key_value_heads", 4),
        query_pre_attn_scalar=t.get("query_pre_attn_scalar", 256),
        attn_logit_softcapping=t.get("attn_logit_softcapping", 50.0) or None,
        final_logit_softcapping=t.get("final_logit_softcapping", 30.0) or None,
        sliding_window=t.get("sliding_window", 4096),
        layer_types=t.get("layer_types") or _GEMMA2_LAYERS(layers),
        **common,
    )


def _paligemma1(image_size: int) -> PaliGemmaConfig:
    return PaliGemmaConfig(vision=VisionConfig(image_size=image_size), text=TextConfig())


def _paligemma2(image_size: int, hidden: int, layers: int, heads: int, kv: int, head_dim: int, mlp: int,
                scalar: int) -> PaliGemmaConfig:
    text = TextConfig(
        model_type="gemma2", hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, query_pre_attn_scalar=scalar,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
        layer_types=_GEMMA2_LAYERS(layers),
    )
    return PaliGemmaConfig(vision=VisionConfig(image_size=image_size), text=text)


PRESETS = PaliGemmaConfig.presets
for _size in (224, 448, 896):
    PRESETS[f"paligemma-3b-{_size}"] = lambda s=_size: _paligemma1(s)
    PRESETS[f"paligemma2-3b-{_size}"] = lambda s=_size: _paligemma2(s, 2304, 26, 8, 4, 256, 9216, 256)
    PRESETS[f"paligemma2-10b-{_size}"] = lambda s=_size: _paligemma2(s, 3584, 42, 16, 8, 256, 14336, 256)
    PRESETS[f"paligemma2-28b-{_size}"] = lambda s=_size: _paligemma2(s, 4608, 46, 32, 16, 128, 36864, 144)


def _demo_64() -> PaliGemmaConfig:
    """The built-in demo model's shape: ~5M parameters, 64 px images in 8 px patches (64 image tokens).

    The vocabulary is set from the tokenizer trained for it (`text__vocab_size`, `image_token_id`).
    """
    vision = VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                          image_size=64, patch_size=8)
    text = TextConfig(model_type="gemma", vocab_size=2048, hidden_size=256, intermediate_size=1024,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=64)
    return PaliGemmaConfig(vision=vision, text=text, image_token_id=2047)


PRESETS["demo-64"] = _demo_64


def _tiny_32() -> PaliGemmaConfig:
    """A ~0.1M-parameter PaliGemma for training tests: 32 px images in 8 px patches (16 image tokens).

    Like demo-64, the vocabulary is set from the tokenizer trained for it.
    """
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8)
    text = TextConfig(model_type="gemma", vocab_size=2048, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    return PaliGemmaConfig(vision=vision, text=text, image_token_id=2047)


PRESETS["tiny-32"] = _tiny_32


# --- SigLIP dual encoder ------------------------------------------------------------------------------


@dataclass
class SiglipTextConfig:
    """SigLIP text tower. Defaults are `transformers`' `SiglipTextConfig` (the base model)."""

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64  # texts are padded to exactly this many tokens
    layer_norm_eps: float = 1e-6
    projection_size: int | None = None  # output of `head`; None means hidden_size
    # SigLIP's SentencePiece tokenizer uses `</s>` (id 1) both to end and to pad a text.
    pad_token_id: int = 1
    eos_token_id: int = 1

    @property
    def output_size(self) -> int:
        return self.projection_size or self.hidden_size


def _base_vision() -> VisionConfig:
    # transformers' SiglipVisionConfig defaults (siglip-base-patch16-224), not PaliGemma's So400m.
    return VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=16)


@dataclass
class SiglipConfig(ConfigFile):
    """Both towers of a `transformers` `SiglipModel` (`model_type: siglip`)."""

    vision: VisionConfig = field(default_factory=_base_vision)
    text: SiglipTextConfig = field(default_factory=SiglipTextConfig)

    presets: ClassVar[dict[str, Callable]] = {}
    kind: ClassVar[str] = "SigLIP"

    @classmethod
    def from_dict(cls, d: dict) -> "SiglipConfig":
        """Read the HF layout; keys left out take `transformers`' defaults."""
        v, t = dict(d.get("vision_config") or {}), dict(d.get("text_config") or {})
        base = _base_vision()
        vision = VisionConfig(**{f: v.get(f, getattr(base, f)) for f in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size", "layer_norm_eps", "num_channels")})
        text_defaults = SiglipTextConfig()
        text = SiglipTextConfig(**{f: t.get(f, getattr(text_defaults, f)) for f in text_defaults.__dataclass_fields__})
        for name in ("pad_token_id", "eos_token_id"):  # may be null in the file
            if getattr(text, name) is None:
                setattr(text, name, getattr(text_defaults, name))
        return cls(vision=vision, text=text)

    @classmethod
    def from_json(cls, path: str | Path) -> "SiglipConfig":
        d = cls.read_json(path)
        if d.get("model_type") != "siglip":
            raise PaliGemmaError(f"'{path}' describes a {d.get('model_type')!r} model, not a SigLIP dual encoder "
                                 "(model_type 'siglip')")
        return cls.parse(d, path)

    def check_shapes(self, path) -> None:
        v, t = self.vision, self.text
        if v.hidden_size % v.num_attention_heads or t.hidden_size % t.num_attention_heads:
            raise PaliGemmaError(f"'{path}': the towers' widths do not divide into their heads")

    def to_dict(self) -> dict:
        """The HF layout, loadable by `transformers.SiglipModel.from_pretrained`."""
        v, t = self.vision, self.text
        return {
            "architectures": ["SiglipModel"],
            "model_type": "siglip",
            "text_config": {
                "model_type": "siglip_text_model",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "max_position_embeddings": t.max_position_embeddings,
                "layer_norm_eps": t.layer_norm_eps,
                "projection_size": t.output_size,
                "hidden_act": "gelu_pytorch_tanh",
                "pad_token_id": t.pad_token_id,
                "eos_token_id": t.eos_token_id,
                "bos_token_id": None,  # SigLIP adds none; HF's default (49406) is outside a 32k vocabulary
            },
            "vision_config": {**v.to_dict(), "hidden_act": "gelu_pytorch_tanh", "vision_use_head": True},
        }


def _so400m(image_size: int) -> SiglipConfig:
    # Both towers are So400m-shaped; the vision tower is the one PaliGemma starts from.
    return SiglipConfig(
        vision=VisionConfig(image_size=image_size, patch_size=14),
        text=SiglipTextConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
    )


SIGLIP_PRESETS = SiglipConfig.presets
SIGLIP_PRESETS["siglip-base-patch16-224"] = SiglipConfig
SIGLIP_PRESETS["siglip-so400m-patch14-224"] = lambda: _so400m(224)
SIGLIP_PRESETS["siglip-so400m-patch14-384"] = lambda: _so400m(384)


def _siglip_demo_64() -> SiglipConfig:
    """~2M parameters; the image tower is exactly `demo-64`'s, so `paligemma train --model-config demo-64
    --init-vision RUN` can start from it. The vocabulary is set from the tokenizer trained for the run."""
    vision = VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                          image_size=64, patch_size=8)
    text = SiglipTextConfig(vocab_size=1000, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64)
    return SiglipConfig(vision=vision, text=text)


def _siglip_tiny_32() -> SiglipConfig:
    """A ~60k-parameter dual encoder for tests; the image tower is `tiny-32`'s. Texts are 16 tokens."""
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8)
    text = SiglipTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16)
    return SiglipConfig(vision=vision, text=text)


# The vocabulary of these two is set from the tokenizer trained for the run.
SIGLIP_PRESETS["siglip-demo-64"] = _siglip_demo_64
SIGLIP_PRESETS["siglip-tiny-32"] = _siglip_tiny_32
