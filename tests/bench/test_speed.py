"""bench/common.py's roofline arithmetic, and a short bench/speed.py run on the demo model (ours only, no children)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "speed.py"
COMMON = ROOT / "bench" / "common.py"


def load_common():
    spec = importlib.util.spec_from_file_location("bench_common", COMMON)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_bytes_of_paligemma_3b():
    common = load_common()
    from paligemma_cli.model.config import PaliGemmaConfig

    shapes = common.linear_shapes(PaliGemmaConfig.from_name("paligemma-3b-224"))
    # Per layer q, o 2048x2048, k, v 256x2048, gate, up, down 16384x2048; 18 layers; the head once.
    per_layer = 2 * 2048 * 2048 + 2 * 256 * 2048 + 3 * 16384 * 2048
    assert common.decode_bytes(shapes, 2) == 2 * (18 * per_layer + 257216 * 2048)


def test_prefill_work_scales_with_batch_and_skips_the_last_layers_tail():
    common = load_common()
    from paligemma_cli.model.config import PaliGemmaConfig

    cfg = PaliGemmaConfig.from_name("paligemma-3b-224", text__num_hidden_layers=2)
    one, eight = common.prefill_flops(cfg, 262, 1), common.prefill_flops(cfg, 262, 8)
    assert eight["total_flops"] == 8 * one["total_flops"]
    # The last layer runs its MLP for one position: of the 262-row (16384, 2048) matmuls only the first
    # layer's gate and up remain; the last layer's are one-row (with the head) in `last_token`.
    assert one["linears"][((16384, 2048), 262)] == 2
    assert one["linears"][((256, 2048), 262)] == 4  # k and v of both layers: the cache needs every position
    assert one["last_token"][(16384, 2048)] == 2  # gate and up of the last layer
    assert one["last_token"][(257216, 2048)] == 1  # the head


@pytest.mark.skipif(not (ROOT / "paligemma_cli" / "demo" / "model" / "config.json").exists(), reason="no demo model")
def test_short_demo_run_writes_consistent_json(tmp_path):
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(SCRIPT), "--config", "demo", "--dtype", "fp32", "--reps", "1", "--threads", "1",
           "--new-tokens", "4", "--skip", "transformers,rss,process-start,int8", "--pool-mib", "8", "--bw-mib", "32",
           "--cache", str(tmp_path / "cache"), "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["threads"] == 1 and report["torch"] and report["cpu"] and "speed.py" in report["command"]
    assert set(report["results"]) == {"ours fp32"}  # transformers and int8 skipped
    row = report["results"]["ours fp32"]
    for key in ("ttft_s", "decode_tok_s", "caption_img_s_b1", "caption_img_s_b8", "chat_follow_up_ttft_s"):
        assert row[key]["median"] > 0, key
        assert row[key]["n"] == 1
    assert len(row["ids_b1"]) == 4
    roof, frac = row["roofline"], row["fraction"]
    bw = report["rooflines"]["bandwidth"]["sum_gbs"] * 1e9
    assert roof["decode_tok_s"] == pytest.approx(bw / roof["decode_bytes_per_token"])
    assert frac["decode"] == pytest.approx(row["decode_tok_s"]["median"] / roof["decode_tok_s"])
    assert frac["ttft"] == pytest.approx(roof["ttft_s"] / row["ttft_s"]["median"])
    assert frac["caption_b8"] == pytest.approx(row["caption_img_s_b8"]["median"] / roof["caption_img_s_b8"])
    assert "decode" in p.stdout and "roofline" in p.stdout  # the tables went to stdout
    machine = report["machine"]  # which CPU class produced the file
    assert machine["cpu"] == report["cpu"] and machine["torch"] == report["torch"]
    assert machine["physical_cores"] >= 1 and set(machine["env"]) == {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                                   "MKL_ENABLE_INSTRUCTIONS", "FBGEMM_ENABLE_INSTRUCTIONS"}
    assert "machine:" in p.stdout


def test_machine_info_names_the_cpu_class(monkeypatch):
    common = load_common()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    info = common.machine_info()
    assert info["cpu"] and info["torch"] and info["torch_cpu_capability"]
    assert set(info["cpu_flags"]) <= set(common.SPEED_FLAGS)
    assert set(info["env"]) == {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                "FBGEMM_ENABLE_INSTRUCTIONS"}
    assert info["env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    line = common.machine_line(info)
    assert line.startswith("machine: ") and info["cpu"] in line and "ONEDNN_MAX_CPU_ISA=AVX2" in line
