"""What a follow-up question in `paligemma chat` costs: only its own tokens, with the image cache reused in place.

These count work instead of timing it (timings in tests are flaky): the vision tower and the image block
are not run again, the KV cache is neither reallocated nor copied, and no op writes over the cached
image block. See bench/chat_ttft.py for the timings themselves.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from paligemma_cli.inference.chat_session import ChatSession
from paligemma_cli.inference.generate import SamplingOptions
from paligemma_cli.inference.pipeline import Pipeline
from paligemma_cli.model.config import PaliGemmaConfig
from paligemma_cli.model.gemma import RopeTable, rope_cos_sin
from paligemma_cli.model.kv_cache import KVCache
from paligemma_cli.model.paligemma import PaliGemma
from paligemma_cli.speed.cpu_layout import use_fast_cpu_layout
from tests.fixtures.checkpoints import make_tiny_checkpoint, write_images

QUESTION = "answer en what color is the square?"
FOLLOW_UP = "answer en how many circles are there?"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.load(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model"), "cpu", "fp32")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("img"), 1)[0]


class CacheWrites(TorchDispatchMode):
    """Records every op that writes into, or makes a same-shaped copy of, the given cache tensors."""

    def __init__(self, cache: KVCache):
        super().__init__()
        self.shape = tuple(cache.k[0].shape)
        self.storages = {t.untyped_storage().data_ptr() for t in cache.k + cache.v}
        self.writes = []  # (op, number of elements written into cache storage)
        self.copies = []  # ops whose output is a new tensor shaped like a whole layer's cache

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        for i, arg in enumerate(schema.arguments):
            value = args[i] if i < len(args) else (kwargs or {}).get(arg.name)
            written = arg.alias_info is not None and arg.alias_info.is_write
            if written and isinstance(value, torch.Tensor) and \
                    value.untyped_storage().data_ptr() in self.storages:
                self.writes.append((str(func), value.numel()))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape and \
                    t.untyped_storage().data_ptr() not in self.storages:
                self.copies.append(str(func))
        return out


def test_follow_up_reuses_the_image_cache_in_place_and_prefills_only_the_question(pipe, image, monkeypatch):
    model = pipe.model
    session = ChatSession(pipe, SamplingOptions(max_new_tokens=3))
    session.set_image(image)
    first = "".join(session.ask(QUESTION))
    cache = session._cache
    prefix_len = session._snap[0]
    assert prefix_len == model.config.num_image_tokens + 1
    tensors = [(t, t.data_ptr()) for t in cache.k + cache.v]
    image_block = [t[:, :, :prefix_len].clone() for t in cache.k + cache.v]

    extends, allocations, towers = [], [], []
    extend = model.extend
    monkeypatch.setattr(model, "extend", lambda c, ids, pix=None, *a, **k: extends.append(
        (c, ids.shape[1], pix is not None, c.length)) or extend(c, ids, pix, *a, **k))
    allocate = KVCache.allocate.__func__
    monkeypatch.setattr(KVCache, "allocate", classmethod(
        lambda cls, *a, **k: allocations.append(a) or allocate(cls, *a, **k)))
    tower = model.vision_tower.forward
    monkeypatch.setattr(model.vision_tower, "forward", lambda *a, **k: towers.append(1) or tower(*a, **k))

    watch = CacheWrites(cache)
    with watch:
        answer = "".join(session.ask(FOLLOW_UP))

    question = pipe.tokenizer.encode(FOLLOW_UP + "\n")
    assert towers == [] and allocations == []  # no vision tower, no new cache
    assert session._cache is cache and all(t.data_ptr() == p for t, p in tensors)
    # The first call prefills exactly the question's tokens, right after the cached image block;
    # the rest are one-token decode steps.
    c, n, with_pixels, start = extends[0]
    assert (c, n, with_pixels, start) == (cache, len(question), False, prefix_len)
    assert all(n == 1 and not px for _, n, px, _ in extends[1:])
    # Restoring the image prefix is a length reset: nothing wrote over it or copied the whole cache.
    kv_slot = cache.k[0].shape[0] * cache.k[0].shape[1] * cache.k[0].shape[3]
    assert watch.copies == []
    assert watch.writes and max(n for _, n in watch.writes) <= len(question) * kv_slot
    assert all(torch.equal(t[:, :, :prefix_len], saved) for t, saved in zip(cache.k + cache.v, image_block))
    # ... and the answers are what a fresh session gives.
    fresh = ChatSession(pipe, SamplingOptions(max_new_tokens=3))
    fresh.set_image(image)
    assert "".join(fresh.ask(FOLLOW_UP)) == answer
    assert "".join(fresh.ask(QUESTION)) == first


def test_extend_without_a_mask_equals_extend_with_an_all_ones_mask(pipe, image):
    model = pipe.model
    pixels = pipe.processor.pixel_values(image)
    n = model.config.num_image_tokens
    head = torch.tensor([[pipe.tokenizer.image_token_id] * n + [pipe.tokenizer.bos_id]])
    question = torch.tensor([pipe.tokenizer.encode(QUESTION + "\n")])
    results = []
    for mask in (True, False):
        cache = model.new_cache(1, 128)
        ones = (lambda t: torch.ones_like(t)) if mask else (lambda t: None)
        with torch.inference_mode():
            model.extend(cache, head, pixels, torch.zeros_like(head), ones(head))
            logits = model.extend(cache, question, None, torch.zeros_like(question), ones(question))
            step = model.extend(cache, logits.argmax(-1, keepdim=True), None, None, None)
        assert cache.pos_bound >= int(cache.next_pos.max())
        results.append((logits, step, cache.next_pos.clone(), cache.valid.clone(), cache.prefix.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_rope_table_equals_rope_cos_sin_and_grows():
    torch.manual_seed(0)
    head_dim = 16
    table = RopeTable(head_dim, 10000.0)
    positions = torch.randint(0, 300, (2, 7))  # past the first table's 256 rows
    cos, sin_folded = table.lookup(positions, 300, torch.float32)
    ref_cos, ref_sin = rope_cos_sin(positions, head_dim, 10000.0, torch.float32)  # (B, 1, T, hd)
    ref_cos, ref_sin = ref_cos.transpose(1, 2), ref_sin.transpose(1, 2)  # (B, T, 1, hd)
    half = head_dim // 2
    assert torch.equal(cos, ref_cos)
    assert torch.equal(sin_folded, torch.cat((-ref_sin[..., :half], ref_sin[..., half:]), -1))
    assert table._tables[(positions.device, torch.float32)][0].shape[0] == 512


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
def test_fast_cpu_layout_keeps_weights_and_logits(capability, monkeypatch):
    from paligemma_cli.speed import cpu_layout
    from paligemma_cli.speed.kernel_choice import CpuFacts

    # float32 weights go column-major where MKL's AVX-512 kernels gain from it, and stay as they are on AVX2.
    monkeypatch.setattr(cpu_layout, "cpu_facts", lambda: CpuFacts(capability, False, False, True))
    torch.manual_seed(0)
    cfg = PaliGemmaConfig.from_name("tiny-32")
    model = PaliGemma(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 100, (1, 20))
    ids[:, : cfg.num_image_tokens] = cfg.image_token_id
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with torch.inference_mode():
        expected = model(ids, pixels)
        use_fast_cpu_layout(use_fast_cpu_layout(model))  # idempotent
        got = model(ids, pixels)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    q = model.language_model.layers[0].self_attn.q_proj.weight
    if capability == "AVX512":
        assert not q.is_contiguous() and q.t().is_contiguous()
    else:
        assert q.is_contiguous()
    assert (got - expected).abs().max() < 1e-4
