"""How well a VQ-VAE reproduces masks through its 16 tokens: reconstruction IoU on held-out masks.

For every mask image in a JSONL (`mask`, else `image`, as `train --objective vqvae` reads them), the mask is
cropped to its box, stretched to 64x64 and encoded to 16 codes (big_vision's `refcoco_mask2str`), decoded
back, and compared at 64x64 (decoder output > 0 against the crop > 0.5) and at the image's own resolution,
after placing the decoded mask in the box the way `segment` and `eval` do (bins / 1023, int(), Pillow
bilinear, > 0), with the box binned two ways: its edges as big_vision's `refcoco_mask2str` bins them
(round(edge * 1023)), and its pixel centres as `demo-data --task segment` does (on small images the
first loses a pixel row or column whenever an edge's bin lands just below it). The same placement of
the ideal 64x64 crop is printed for reference. Also prints how many distinct codes and code sequences
the masks use.

    .venv/bin/python bench/vqvae_recon.py data/shapes-masks-test/data.jsonl --vae paligemma_cli/demo/model/vae-oid.npz

Prints numbers only; not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from paligemma_cli.data.jsonl import read_jsonl  # noqa: E402
from paligemma_cli.inference.segmentation import MaskCodec  # noqa: E402
from paligemma_cli.processing.segmentation import crop_mask, mask_box, paste_mask  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="JSONL naming mask images")
    ap.add_argument("--vae", required=True, help="vae-oid.npz (with its encoder)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    codec = MaskCodec.load(args.vae)
    iou64, iou_full, sequences, codes_used, kinds = [], defaultdict(list), Counter(), set(), Counter()
    for ex in read_jsonl(args.data)[: args.limit]:
        with Image.open(ex.mask or ex.image) as im:
            full = np.asarray(im.convert("L")) > 127
        box = mask_box(full)
        if box is None:
            continue
        crop = crop_mask(full, box)
        codes = codec.encode(crop[None])[0]
        decoded = codec.decode([codes])[0]
        a, b = decoded > 0, crop > 0.5
        iou64.append((a & b).sum() / max((a | b).sum(), 1))
        h, w = full.shape
        edges = [min(1023, max(0, round(v * 1023))) for v in box]
        centres = [min(1023, max(0, round((v * n + 0.5) / n * 1023))) for v, n in zip(box, (h, w, h, w))]
        for key, bins, m64 in (("edges", edges, decoded), ("centres", centres, decoded),
                               ("edges_ideal_crop", edges, 2 * crop - 1), ("centres_ideal_crop", centres, 2 * crop - 1)):
            pasted = paste_mask(m64, bins, w, h)
            iou_full[key].append((pasted & full).sum() / max((pasted | full).sum(), 1))
        sequences[tuple(codes.tolist())] += 1
        codes_used.update(codes.tolist())
        kinds[ex.prefix] += 1
    result = {
        "masks": len(iou64), "vae": args.vae, "data": args.data,
        "iou_64": round(100 * float(np.mean(iou64)), 2),
        **{f"iou_original_resolution_{k}": round(100 * float(np.mean(v)), 2) for k, v in iou_full.items()},
        "iou_original_resolution_centres_min": round(100 * float(np.min(iou_full["centres"])), 2),
        "codes_used": len(codes_used), "distinct_sequences": len(sequences),
        "most_common_sequence_share": round(100 * sequences.most_common(1)[0][1] / len(iou64), 2),
        "prompts": dict(kinds),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
