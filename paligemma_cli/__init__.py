"""paligemma: run, fine-tune and evaluate PaliGemma vision-language models locally.

The library's entry points, imported on first use (so that `import paligemma_cli` and the CLI's
`--help` stay free of torch):

    from paligemma_cli import load_model, Pipeline
    model = load_model("path/to/checkpoint", dtype=torch.bfloat16)   # a PaliGemma (torch.nn.Module)
    pipe = Pipeline.load("path/to/checkpoint")                       # model + tokenizer + processor
    print(pipe.generate(["photo.jpg"], ["caption en"], SamplingOptions())[0])
    print(pipe.generate([["left.jpg", "right.jpg"]], ["answer en is there a dog in both?"], SamplingOptions())[0])
    codec = MaskCodec.load("vae-oid.npz")                            # <seg> tokens -> masks
    masks = codec.segments(pipe.generate(["photo.jpg"], ["segment cat"], SamplingOptions())[0], 640, 480)
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from paligemma_cli.checkpoints.hf import load_dual_encoder, load_model, save_dual_encoder, save_model
    from paligemma_cli.inference.chat_session import ChatSession
    from paligemma_cli.inference.generate import SamplingOptions
    from paligemma_cli.inference.pipeline import Pipeline
    from paligemma_cli.inference.segmentation import MaskCodec
    from paligemma_cli.model.config import PaliGemmaConfig, SiglipConfig
    from paligemma_cli.model.paligemma import PaliGemma
    from paligemma_cli.model.siglip import DualEncoder

# name -> the module that defines it
_API = {
    "load_model": "paligemma_cli.checkpoints.hf",
    "save_model": "paligemma_cli.checkpoints.hf",
    "load_dual_encoder": "paligemma_cli.checkpoints.hf",
    "save_dual_encoder": "paligemma_cli.checkpoints.hf",
    "Pipeline": "paligemma_cli.inference.pipeline",
    "MaskCodec": "paligemma_cli.inference.segmentation",
    "ChatSession": "paligemma_cli.inference.chat_session",
    "SamplingOptions": "paligemma_cli.inference.generate",
    "PaliGemma": "paligemma_cli.model.paligemma",
    "PaliGemmaConfig": "paligemma_cli.model.config",
    "SiglipConfig": "paligemma_cli.model.config",
    "DualEncoder": "paligemma_cli.model.siglip",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'paligemma_cli' has no attribute {name!r}")
