"""A tiny random PaliGemma checkpoint with a real (tiny) tokenizer, for command tests."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from paligemma_cli.model.config import PaliGemmaConfig, TextConfig, VisionConfig
from paligemma_cli.model.paligemma import PaliGemma
from paligemma_cli.processing.tokenizer import PaliGemmaTokenizer
from tests.tokenizer_fixture import make_tiny_tokenizer


def make_tiny_checkpoint(folder: Path, seed: int = 0, max_positions: int = 8192) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    make_tiny_tokenizer(folder)
    tok = PaliGemmaTokenizer.from_folder(folder)
    vocab = -(-(tok.image_token_id + 1) // 64) * 64
    cfg = PaliGemmaConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8),
        text=TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                        max_position_embeddings=max_positions),
        image_token_id=tok.image_token_id,
    )
    torch.manual_seed(seed)
    model = PaliGemma(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(folder, tokenizer_dir=folder)
    return folder


def write_images(folder: Path, n: int, size=(40, 30)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.new("RGB", size, (40 * i % 256, 100, 200)).save(p)
        paths.append(p)
    return paths
