"""Loading costs about the memory of the weights it ends with: no float32 detour, no float decoder when
quantizing. Measured in a fresh process as the growth of its peak resident memory (Linux `VmHWM`).

With the chunk sizes cut to 256 KB the bounds are tight enough that the old loader (which cast through the
memory map: every float32 page of the file stayed resident beside the bf16 copy) fails the first one.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paligemma_cli.checkpoints.hf import save_model
from paligemma_cli.model.config import PaliGemmaConfig, TextConfig, VisionConfig
from paligemma_cli.model.paligemma import PaliGemma

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")

MB = 1 << 20
SCRIPT = r"""
import json, sys, torch
import paligemma_cli.checkpoints.hf as checkpoint, paligemma_cli.speed.quantize as quantize
import paligemma_cli.checkpoints.safetensors_io as safetensors_io
from paligemma_cli.model.config import PaliGemmaConfig
from paligemma_cli.model.paligemma import PaliGemma
safetensors_io.READ_CHUNK_ELEMENTS = quantize.CHUNK_ELEMENTS = 1 << 16
with torch.device("meta"):  # the first model built pulls in ~70 MB of torch's Python meta kernels: not ours
    quantize.quantize_model(PaliGemma(PaliGemmaConfig.from_name("tiny-32")))
folder, dtype, mode = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]

def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

open("/proc/self/clear_refs", "w").write("5")  # reset the peak
start = hwm()
model = checkpoint.load_model(folder, dtype=dtype, quantize=None if mode == "none" else mode)
loaded = hwm() - start
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
for t in model.state_dict().values():  # use every weight: memory-mapped pages become resident
    float(t.reshape(-1)[::512].float().sum())
print(json.dumps({"loaded": loaded, "used": hwm() - start, "weights": weights}))
"""


@pytest.fixture(scope="module")
def fp32_folder(tmp_path_factory):
    """A ~24M-parameter random checkpoint in float32 (~94 MB on disk), and the same in bf16."""
    cfg = PaliGemmaConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=8),
        text=TextConfig(vocab_size=16384, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=128),
        image_token_id=16383,
    )
    torch.manual_seed(0)
    model = PaliGemma(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    root = tmp_path_factory.mktemp("mem")
    save_model(model, root / "fp32")
    save_model(model.to(torch.bfloat16), root / "bf16")
    return root


def measure(folder: Path, dtype: str, mode: str = "none") -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), dtype, mode], capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""}, cwd=Path(__file__).parents[2])
    result = json.loads(out.stdout)
    print(f"{folder.name} -> {dtype} {mode}: weights {result['weights'] / MB:.0f} MB, "
          f"peak while loading +{result['loaded'] / MB:.0f} MB, after using them +{result['used'] / MB:.0f} MB")
    return result


def test_float32_file_into_bfloat16_holds_no_float32_copy(fp32_folder):
    r = measure(fp32_folder / "fp32", "bfloat16")
    assert r["used"] < 1.2 * r["weights"] + 8 * MB  # the old loader: about 3x (float32 pages + bf16 copy)


def test_bfloat16_file_into_bfloat16_is_memory_mapped(fp32_folder):
    r = measure(fp32_folder / "bf16", "bfloat16")
    assert r["loaded"] < 0.2 * r["weights"] + 8 * MB  # nothing is read until it is used
    assert r["used"] < 1.2 * r["weights"] + 8 * MB


@pytest.mark.parametrize("source", ["fp32", "bf16"])
def test_quantizing_while_loading_never_holds_the_float_decoder(fp32_folder, source):
    r = measure(fp32_folder / source, "bfloat16", "int8")
    bf16_bytes = measure(fp32_folder / "bf16", "bfloat16")["weights"]
    assert r["weights"] < 0.6 * bf16_bytes
    assert r["used"] < 1.2 * r["weights"] + 8 * MB
