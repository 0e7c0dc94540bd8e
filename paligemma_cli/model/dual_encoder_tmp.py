"""SigLIP dual encoder: image tower + MAP pooling head, text tower, learned temperature and bias.

References: Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (2023); big_vision's
`models/proj/image_text/two_towers.py` and `models/vit.py` (MAP head); `transformers`'
`SiglipModel` (`models/siglip/modeling_siglip.py`), whose `config.json` and `model.safetensors`
layout this module reads and writes. The image tower is this project's `SiglipVisionTower` (the one
PaliGemma uses) with a pooling head on top, so a tower trained here drops into PaliGemma through
`DualEncoder.vision_tower_state_dict()`.

Scores follow `transformers`: both pooled vectors are L2-normalised and
`logits = cos_sim * exp(logit_scale) + logit_bias`; `sigmoid(logits)` is the per-pair probability.
Losses for training live in `contrastive_loss.py`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from paligemma_cli.checkpoints.hf import replace_folder, weight_files, write_safetensors
from paligemma_cli.model.config import VisionConfig
from paligemma_cli.training.contrastive_loss import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE
from paligemma_cli.model.skeleton import empty_skeleton
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.model.siglip import SiglipEncoder, SiglipMLP, SiglipVisionTower, init_siglip_weights

__all__ = ["DualEncoder", "MapHead", "SiglipConfig", "SiglipTextConfig", "SiglipTextTower", "SiglipVisionWithHead",
           "SIGLIP_PRESETS"]

# --- configuration ---------------------------------------------------------------------------------


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
class SiglipConfig:
    """Both towers of a `transformers` `SiglipModel` (`model_type: siglip`)."""

    vision: VisionConfig = field(default_factory=_base_vision)
    text: SiglipTextConfig = field(default_factory=SiglipTextConfig)

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
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise PaliGemmaError(f"'{path.parent}' is not a checkpoint folder: it has no config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PaliGemmaError(f"'{path}' is not valid JSON ({e})") from None
        if d.get("model_type") != "siglip":
            raise PaliGemmaError(f"'{path}' describes a {d.get('model_type')!r} model, not a SigLIP dual encoder "
                                 "(model_type 'siglip')")
        return cls.from_dict(d)

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
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_hidden_layers,
                "num_attention_heads": v.num_attention_heads,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "layer_norm_eps": v.layer_norm_eps,
                "num_channels": v.num_channels,
                "hidden_act": "gelu_pytorch_tanh",
                "vision_use_head": True,
            },
        }

    def save(self, folder: str | Path) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "SiglipConfig":
        """A published shape by name, e.g. `siglip-so400m-patch14-384`; overrides as `text__hidden_size=64`."""
        if name not in SIGLIP_PRESETS:
            raise PaliGemmaError(f"unknown SigLIP config {name!r}; known: {', '.join(sorted(SIGLIP_PRESETS))}")
        cfg = SIGLIP_PRESETS[name]()
        for key, value in overrides.items():
            part, _, attr = key.partition("__")
            setattr(getattr(cfg, part) if attr else cfg, attr or part, value)
        return cfg


def _so400m(image_size: int) -> SiglipConfig:
    # Both towers are So400m-shaped; the vision tower is the one PaliGemma starts from.
    return SiglipConfig(
        vision=VisionConfig(image_size=image_size, patch_size=14),
        text=SiglipTextConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
    )


SIGLIP_PRESETS = {
    "siglip-base-patch16-224": SiglipConfig,
    "siglip-so400m-patch14-224": lambda: _so400m(224),
    "siglip-so400m-patch14-384": lambda: _so400m(384),
}

# --- modules ---------------------------------------------------------------------------------------


class MapHead(nn.Module):
    """Multihead attention pooling: one learned query (`probe`) attends to all patches, then a residual MLP.

    `torch.nn.MultiheadAttention` is used as is because its parameter names (`in_proj_weight` packing
    q, k, v; `out_proj`) are exactly the checkpoint's.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) patch states -> (B, D) pooled."""
        probe = self.probe.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = self.attention(probe, x, x, need_weights=False)[0]  # (B, 1, D)
        x = x + self.mlp(self.layernorm(x))  # the residual is around the MLP only, not the attention
        return x[:, 0]


class SiglipVisionWithHead(SiglipVisionTower):
    """PaliGemma's vision tower plus the MAP head; `forward` returns the pooled vector, not patch states.

    Subclassing keeps the tower's parameter names (`embeddings.*`, `encoder.*`, `post_layernorm.*`), so
    the checkpoint's `vision_model.*` keys and PaliGemma's `vision_tower.*` keys differ only by `head.*`.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        self.head = MapHead(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, D) pooled image embedding (not normalised)."""
        return self.head(super().forward(pixel_values))


class SiglipTextEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:T]  # (B, T, D)


class SiglipTextTower(nn.Module):
    """Token + learned position embeddings, bidirectional pre-LN encoder, final LayerNorm, last position, head."""

    def __init__(self, cfg: SiglipTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipTextEmbeddings(cfg)
        self.encoder = SiglipEncoder(
            cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.num_hidden_layers, cfg.layer_norm_eps
        )
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.output_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids, T <= max_position_embeddings -> (B, P) pooled text embedding (not normalised).

        SigLIP was trained on texts padded to `max_position_embeddings` with no attention mask, and pools
        the **last** position (usually a pad token that has attended to the whole text). Pass
        `attention_mask` (B, T; 1 = real token) only to reproduce a caller that masks padding keys.
        """
        T, limit = input_ids.shape[1], self.config.max_position_embeddings
        if T > limit:
            raise PaliGemmaError(f"text is {T} tokens but the SigLIP text tower takes at most {limit}: truncate it")
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T): masks keys, every query still runs
        x = self.encoder(self.embeddings(input_ids), mask)  # (B, T, D)
        return self.head(self.final_layer_norm(x)[:, -1])  # (B, P)


class DualEncoder(nn.Module):
    """SigLIP image and text towers with a learned temperature and bias (HF's `SiglipModel` layout).

    `DualEncoder(cfg)` is freshly initialised for training from scratch (SigLIP's init:
    `logit_scale = log 10`, `logit_bias = -10`); `DualEncoder.from_pretrained(folder)` loads a checkpoint.
    To train: `siglip_loss(m.encode_image(px), m.encode_text(ids), m.logit_scale, m.logit_bias)`.
    """

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        if cfg.text.output_size != cfg.vision.hidden_size:
            raise PaliGemmaError(f"text projection size {cfg.text.output_size} must equal the vision hidden size "
                                 f"{cfg.vision.hidden_size}: the two embeddings are compared by dot product")
        self.config = cfg
        self.vision_model = SiglipVisionWithHead(cfg.vision)
        self.text_model = SiglipTextTower(cfg.text)
        self.logit_scale = nn.Parameter(torch.zeros(1))  # shape [1] as in the checkpoint
        self.logit_bias = nn.Parameter(torch.zeros(1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init as big_vision / HF `SiglipModel` do it, for training from scratch."""
        init_siglip_weights(self)
        for m in self.modules():
            if isinstance(m, MapHead):
                nn.init.xavier_uniform_(m.probe)
                nn.init.xavier_uniform_(m.attention.in_proj_weight)
                nn.init.zeros_(m.attention.in_proj_bias)
        self.logit_scale.fill_(SIGLIP_INIT_LOGIT_SCALE)
        self.logit_bias.fill_(SIGLIP_INIT_LOGIT_BIAS)

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, D) pooled image embeddings, not normalised (HF `get_image_features`)."""
        return self.vision_model(pixel_values.to(self.dtype))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids padded to max_position_embeddings -> (B, D) pooled text embeddings, not normalised."""
        return self.text_model(input_ids, attention_mask)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img)), as `SiglipModel` does."""
        img = F.normalize(self.encode_image(pixel_values), dim=-1)  # (B_img, D)
        txt = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)  # (B_txt, D)
        logits_per_text = txt @ img.T * self.logit_scale.exp() + self.logit_bias  # (B_txt, B_img)
        return logits_per_text.T, logits_per_text

    def vision_tower_state_dict(self) -> dict[str, torch.Tensor]:
        """The image tower without its head, named as `SiglipVisionTower` names it (`embeddings.*`,
        `encoder.*`, `post_layernorm.*`): `PaliGemma(cfg).vision_tower.load_state_dict(...)` takes it as is."""
        return {k: v for k, v in self.vision_model.state_dict().items() if not k.startswith("head.")}

    # --- checkpoints -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> "DualEncoder":
        """Load a `SiglipModel` folder (config.json + model.safetensors or shards), strictly.

        Keys are `vision_model.*`, `text_model.*`, `logit_scale`, `logit_bias`, optionally under `model.`.
        `dtype` defaults to the checkpoint's. Raises `PaliGemmaError` naming any missing or unexpected key.
        """
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise PaliGemmaError(f"model folder '{folder}' does not exist")
        cfg = SiglipConfig.from_json(folder / "config.json")
        with empty_skeleton():  # no memory until the real tensors arrive
            model = cls(cfg)
        expected = model.state_dict()

        state, unexpected = {}, []
        for file in weight_files(folder):
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for key in f.keys():
                        name = key.removeprefix("model.")
                        if name.endswith("embeddings.position_ids"):
                            continue  # an arange buffer some older transformers versions saved; rebuilt here
                        if name not in expected:
                            unexpected.append(key)
                            continue
                        t = f.get_tensor(key)
                        if t.shape != expected[name].shape:
                            raise PaliGemmaError(f"'{key}' in {file.name} has shape {tuple(t.shape)}, the config "
                                                 f"says {tuple(expected[name].shape)}: config.json and weights differ")
                        state[name] = t
            except SafetensorError as e:
                raise PaliGemmaError(f"cannot read '{file}': {e}") from None
        missing = sorted(set(expected) - set(state))
        if missing or unexpected:
            parts = ([f"missing {_names(missing)}"] if missing else []) + (
                [f"unexpected {_names(sorted(unexpected))}"] if unexpected else [])
            raise PaliGemmaError(f"checkpoint '{folder}' does not match a SigLIP dual encoder: " + "; ".join(parts))
        dtype = dtype or state["logit_scale"].dtype
        device = torch.device(device or "cpu")
        state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json + model.safetensors in HF's `SiglipModel` layout, atomically."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            self.config.save(tmp)
            write_safetensors({k: v.detach().contiguous() for k, v in self.state_dict().items()}, tmp)
            replace_folder(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder


def _names(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
