"""Deprecated: the model moved to `paligemma_cli.model`. Kept importable for one release."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from paligemma_cli.model.config import PaliGemmaConfig, TextConfig, VisionConfig
    from paligemma_cli.model.paligemma import PaliGemma

__all__ = ["PaliGemma", "PaliGemmaConfig", "TextConfig", "VisionConfig"]


def __getattr__(name):
    if name == "PaliGemma":
        from paligemma_cli.model.paligemma import PaliGemma

        return PaliGemma
    if name in ("PaliGemmaConfig", "TextConfig", "VisionConfig"):
        from paligemma_cli.model import config

        return getattr(config, name)
    raise AttributeError(name)
