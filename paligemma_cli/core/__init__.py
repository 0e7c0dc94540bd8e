"""The PaliGemma core: torch only, nothing from the CLI.

Importing this package is cheap; the model classes are imported on first use so that the CLI's
`--help` never pays for torch.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from paligemma_cli.core.config import PaliGemmaConfig, TextConfig, VisionConfig
    from paligemma_cli.core.paligemma import PaliGemma

__all__ = ["PaliGemma", "PaliGemmaConfig", "TextConfig", "VisionConfig"]


def __getattr__(name):
    if name == "PaliGemma":
        from paligemma_cli.core.paligemma import PaliGemma

        return PaliGemma
    if name in ("PaliGemmaConfig", "TextConfig", "VisionConfig"):
        from paligemma_cli.core import config

        return getattr(config, name)
    raise AttributeError(name)
