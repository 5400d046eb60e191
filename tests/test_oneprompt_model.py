"""One-Prompt model (Wu et al., CVPR 2024): prompt encoder, Prompt-Parser against a literal implementation of eqs. (1)-(3),
its memory, the frozen encoder, a one-pair overfit, and the SegLab autoencoder. CPU, one thread, < 60 s."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lib.oneprompt.model import (OnePromptModel, Prompt, PromptParser, SegLabAutoencoder, build_oneprompt,
                                  train_seglab)
from lib.oneprompt.model.prompt_encoder import NEG_CLICK, NEG_DOODLE
from lib.models.sam import TinyViTImageEncoder

from oneprompt_helpers import SMALL_LEVELS, one_thread  # noqa: E402,F401  (one_thread: autouse fixture)


def tiny_encoder() -> TinyViTImageEncoder:
    """A random TinyViT with LiteMedSAM's strides and tiny widths: the same feature names and resolutions."""
    torch.manual_seed(0)
    return TinyViTImageEncoder(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
                               window_sizes=(7, 7, 7, 7), out_chans=32)


def tiny_model(seglab=None, additions: bool = False) -> OnePromptModel:
    """additions: our prompt map on the template tokens and head priors (model.py), on top of the paper's."""
    torch.manual_seed(1)
    return OnePromptModel(tiny_encoder(), embed_dim=64, levels=SMALL_LEVELS, mlp_dim=128, seglab=seglab,
                          prompt_map=additions, head_priors=additions)


def disk_image(cx: float, cy: float, radius: float = 28.0, seed: int = 0):
    """A bright disk on noise: image (1, 3, 256, 256) in [0, 1] and its mask (1, 1, 256, 256)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    mask = (((xx - cx) ** 2 + (yy - cy) ** 2) <= radius ** 2).float()[None, None]
    image = (0.25 * torch.rand(1, 3, 256, 256, generator=g) + 0.6 * mask).clamp(0, 1)
    return image, mask


def dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    pred, target = pred.bool(), target.bool()
    return float(2 * (pred & target).sum() / (pred.sum() + target.sum()).clamp_min(1))


# -- prompt encoder and shapes --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    seglab = SegLabAutoencoder().eval()
    model = tiny_model(seglab).eval()
    image_t, mask_t = disk_image(100, 110)
    image_q, _ = disk_image(140, 150, seed=1)
    return model, model.encode(torch.cat([image_q, image_q])), model.encode(image_t), image_t, mask_t


def test_every_prompt_kind_gives_two_tokens_and_a_full_size_mask(tiny):
    model, query, template, image_t, mask_t = tiny
    c = model.prompt_encoder.embed_dim
    prompts = {
        "click": Prompt.click([[[100.0, 110.0], [20.0, 30.0]]] * 2, [[1, 0]] * 2),
        "bbox": Prompt.bbox([[72.0, 82.0, 128.0, 138.0]] * 2),
        "doodle": Prompt.doodle([[[95.0, 110.0], [100.0, 110.0], [105.0, 110.0], [10.0, 10.0]]] * 2,
                                [[1, 1, 1, 0]] * 2),
        "seglab": Prompt.seglab(mask_t.expand(2, -1, -1, -1), image_t.expand(2, -1, -1, -1)),
    }
    with torch.no_grad():
        for kind, prompt in prompts.items():
            p1, p2 = model.prompt_encoder(prompt)
            assert p1.shape == p2.shape == (2, 1, c), kind
            # Two queries, one template shared by both.
            logits = model(query, template, prompt)
            assert logits.shape == (2, 1, 256, 256), kind
            assert torch.isfinite(logits).all(), kind
        # SegLab: "two prompt embeddings share the same parameters".
        p1, p2 = model.prompt_encoder(prompts["seglab"])
        assert torch.equal(p1, p2)


def test_click_and_doodle_rules_of_the_supplement(tiny):
    encoder = tiny[0].prompt_encoder
    bare_negative = encoder.point_embeddings.weight[NEG_CLICK]
    with torch.no_grad():
        # No negative click: p2 is the bare negative embedding (no positional encoding).
        p1, p2 = encoder(Prompt.click([[[50.0, 60.0], [0.0, 0.0]]], [[1, -1]]))
        assert torch.allclose(p2[0, 0], bare_negative)
        # Several positives: their encodings are averaged (order and padding do not matter).
        a, _ = encoder(Prompt.click([[[50.0, 60.0], [90.0, 20.0]]], [[1, 1]]))
        b, _ = encoder(Prompt.click([[[90.0, 20.0], [7.0, 7.0], [50.0, 60.0]]], [[1, -1, 1]]))
        assert torch.allclose(a, b, atol=1e-6)
        # Doodle: a repeated point counts once; no negative doodle -> the bare negative-doodle embedding.
        a, a2 = encoder(Prompt.doodle([[[10.0, 10.0], [40.0, 10.0]]], [[1, 1]]))
        b, _ = encoder(Prompt.doodle([[[10.0, 10.0], [10.0, 10.0], [10.0, 10.0], [40.0, 10.0]]], [[1, 1, 1, 1]]))
        assert torch.allclose(a, b, atol=1e-6)
        assert torch.allclose(a2[0, 0], encoder.point_embeddings.weight[NEG_DOODLE])
        with pytest.raises(ValueError, match="positive"):
            encoder(Prompt.click([[[10.0, 10.0]]], [[0]]))


# -- Prompt-Parser --------------------------------------------------------------------------------------------
def naive_parser(parser: PromptParser, w, e_t, e_q, p1, p2):
    """Eqs. (1)-(3) literally, with the full w in R^{N x 3N}, M materialised and the Gaussian weight computed
    pixel by pixel (the documented reading of the masking step)."""
    b_size, n, dim = e_t.shape
    h, wd = parser.grid_size
    r = parser.gauss_radius
    out = torch.empty_like(e_t)
    for b in range(b_size):
        stack = torch.cat([e_t[b], p1[b].expand(n, dim), p2[b].expand(n, dim)])  # [e_t; p1; p2], 3N x L
        m = w @ stack @ e_q[b].T / math.sqrt(dim)  # (2): N x N, column j = query position j
        conv = F.conv2d(m.reshape(1, n, h, wd), parser.mask_conv.weight, parser.mask_conv.bias,
                        padding=parser.conv_kernel // 2)[0]
        mean, var = F.softplus(conv[0]), F.softplus(conv[1]) + parser.min_variance
        k_g = torch.zeros(h, wd, dtype=e_t.dtype)
        for y in range(h):
            for x in range(wd):
                num = den = 0.0
                for dy in range(-r, r + 1):
                    for dx in range(-r, r + 1):
                        g = math.exp(-(dy * dy + dx * dx) / (2 * float(var[y, x])))
                        inside = 0 <= y + dy < h and 0 <= x + dx < wd
                        num += g * (float(mean[y + dy, x + dx]) if inside else 0.0)
                        den += g
                k_g[y, x] = num / den
        e_tq = e_t[b] * (p1[b] + p2[b] + e_q[b])  # (1)
        e_g = torch.maximum(e_tq * k_g.reshape(n, 1), e_tq)  # (3)
        out[b] = e_g * e_t[b]
    return out


@pytest.mark.parametrize("grid, dim, batch", [((4, 4), 8, 2), ((5, 6), 16, 3)])
def test_prompt_parser_equals_the_literal_equations(grid, dim, batch):
    torch.manual_seed(0)
    parser = PromptParser(dim, grid, gauss_radius=2).double()
    n = grid[0] * grid[1]
    w = torch.randn(n, 3 * n, dtype=torch.float64) / math.sqrt(n)
    parser.load_full_weight(w)
    with torch.no_grad():
        parser.mask_conv.weight.normal_(0, 0.3)
    e_t, e_q = torch.randn(batch, n, dim, dtype=torch.float64), torch.randn(batch, n, dim, dtype=torch.float64)
    p1, p2 = torch.randn(batch, 1, dim, dtype=torch.float64), torch.randn(batch, 1, dim, dtype=torch.float64)
    with torch.no_grad():
        fast = parser(e_t, e_q, p1, p2)
        reference = naive_parser(parser, w, e_t, e_q, p1, p2)
        # The w the module reports computes the same function.
        again = naive_parser(parser, parser.full_weight(), e_t, e_q, p1, p2)
    assert torch.allclose(fast, reference, rtol=1e-9, atol=1e-9)
    assert torch.allclose(fast, again, rtol=1e-9, atol=1e-9)


class PeakTensorBytes(TorchDispatchMode):
    """Live bytes of the tensor storages allocated by the ops run inside the mode (a view shares its base's
    storage): `peak` and the `largest` single allocation."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage address -> [bytes, live tensors using it]
        self.current = self.peak = self.largest = 0

    def _release(self, key):
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key == 0:
                    continue
                if key in self.live:
                    self.live[key][1] += 1
                else:
                    self.live[key] = [storage.nbytes(), 1]
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    self.largest = max(self.largest, storage.nbytes())
                weakref.finalize(t, self._release, key)
        return out


def test_prompt_parser_memory_at_the_default_grid():
    """Default level: 32 x 32 tokens of width 128. Nothing N x N (4 MiB) nor per-token L x L (64 MiB at this
    grid, the public code's layout) is allocated: the largest tensor is one N x L map (512 KiB) and the peak
    of live tensors stays under four of them (measured 1.6 MB)."""
    n, dim = 32 * 32, 128
    parser = PromptParser(dim, (32, 32))
    e_t, e_q, p1, p2 = torch.randn(1, n, dim), torch.randn(1, n, dim), torch.randn(1, 1, dim), torch.randn(1, 1, dim)
    with torch.no_grad():
        parser(e_t, e_q, p1, p2)  # warm-up
        with PeakTensorBytes() as memory:
            parser(e_t, e_q, p1, p2)
    one_map = n * dim * 4
    assert memory.largest <= one_map
    assert memory.peak <= 4 * one_map < n * n * 4


# -- the frozen encoder, gradients ----------------------------------------------------------------------------
def test_gradients_reach_the_decoder_and_prompt_encoder_not_the_encoder(tiny):
    model = tiny_model()
    model.train()
    assert not model.image_encoder.training  # BatchNorms stay in eval mode
    image_t, mask_t = disk_image(100, 110)
    image_q, mask_q = disk_image(140, 150, seed=1)
    logits = model(model.encode(image_q), model.encode(image_t), Prompt.click([[[100.0, 110.0]]], [[1]]))
    F.binary_cross_entropy_with_logits(logits, mask_q).backward()
    encoder_params = list(model.image_encoder.parameters())
    assert encoder_params and all(not p.requires_grad and p.grad is None for p in encoder_params)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {name for name, _ in model.named_parameters() if not name.startswith("image_encoder.")}
    assert all(p.grad is not None for p in model.blocks.parameters())
    for name in ("level_proj.0.0.weight", "blocks.2.parser.w_template", "blocks.2.parser.w_prompt",
                 "blocks.2.parser.mask_conv.weight", "mask_head.2.weight", "prompt_encoder.point_embeddings.weight"):
        assert trainable[name].grad.abs().sum() > 0, name


def test_litemedsam_encoder_is_frozen_and_gives_three_levels():
    model = build_oneprompt().eval()
    counts = model.parameter_counts()
    assert counts["trainable"] == counts["decoder"] + counts["prompt_encoder"]
    assert counts["image_encoder"] == 5_726_740 and not any(p.requires_grad for p in model.image_encoder.parameters())
    features = model.encode(torch.rand(1, 3, 256, 256))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "stage1": (1, 128, 128, 128), "stage2": (1, 160, 64, 64), "neck": (1, 256, 64, 64)}
    with torch.no_grad():
        logits = model(features, features, Prompt.bbox([[60.0, 60.0, 180.0, 170.0]]))
    assert logits.shape == (1, 1, 256, 256)


# -- our two additions: the drawn prompt on the template tokens, and the head's priors -------------------------
def test_prompt_map_draws_each_prompt_kind(tiny):
    encoder = tiny[0].prompt_encoder
    box = encoder.prompt_map(Prompt.bbox([[10.0, 20.0, 40.0, 60.0]]))
    expected = torch.zeros(256, 256)
    expected[20:61, 10:41] = 1
    assert box.shape == (1, 2, 256, 256) and torch.equal(box[0, 0], expected) and not box[0, 1].any()
    clicks = encoder.prompt_map(Prompt.click([[[100.0, 50.0], [30.0, 200.0]]], [[1, 0]]))
    assert float(clicks[0, 0, 50, 100]) == pytest.approx(1.0) and float(clicks[0, 1, 200, 30]) == pytest.approx(1.0)
    assert float(clicks[0, 0, 200, 30]) < 1e-6 and float(clicks[0, 0, 50, 130]) < 1e-3  # 30 px = 5 sigma away
    padded = encoder.prompt_map(Prompt.doodle([[[100.0, 50.0], [0.0, 0.0]]], [[1, -1]]))
    assert not padded[0, 1].any() and float(padded[0, 0, 0, 0]) < 1e-6  # padding draws nothing
    mask = (torch.rand(1, 1, 256, 256) > 0.5).float()
    assert torch.equal(encoder.prompt_map(Prompt.seglab(mask))[:, :1], mask)


def test_prompt_map_starts_as_the_paper_model(tiny):
    """The drawn prompt enters through zero-initialised projections: untrained, it changes nothing."""
    paper = tiny_model().eval()
    drawn = OnePromptModel(tiny_encoder(), embed_dim=64, levels=SMALL_LEVELS, mlp_dim=128, prompt_map=True).eval()
    missing, unexpected = drawn.load_state_dict(paper.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("prompt_map_proj.") for k in missing) and missing
    _, query, template, _, _ = tiny
    prompt = Prompt.bbox([[70.0, 80.0, 130.0, 140.0]])
    with torch.no_grad():
        assert torch.allclose(paper(query, template, prompt), drawn(query, template, prompt), atol=1e-6)


def test_head_priors_carry_the_prompt_and_its_prototype(tiny):
    model = tiny_model(additions=True).eval()
    image, mask = disk_image(100, 110)
    feats = model.encode(image)
    prompt = Prompt.bbox([[80.0, 90.0, 120.0, 130.0]])
    priors = model.prompt_priors(feats, feats, model.prompt_encoder.prompt_map(prompt), 128)
    assert priors.shape == (1, 3, 128, 128)
    assert float(priors[0, 0, 55, 50]) == 1.0 and float(priors[0, 0, 10, 10]) == 0.0  # the box, at half size
    similar_inside, similar_outside = priors[0, 1][mask[0, 0, ::2, ::2] > 0], priors[0, 1][mask[0, 0, ::2, ::2] == 0]
    assert float(similar_inside.mean()) > float(similar_outside.mean())  # the query's disk is like the prompted one


# -- learning -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("additions", [False, True], ids=["paper", "with_additions"])
def test_the_decoder_overfits_one_template_query_pair(additions):
    """Template: disk at (100, 110), clicked at its centre; query: the disk moved to (140, 150). 50 steps."""
    model = tiny_model(additions=additions)
    image_t, _ = disk_image(100, 110)
    image_q, mask_q = disk_image(140, 150, seed=1)
    query, template = model.encode(image_q), model.encode(image_t)
    prompt = Prompt.click([[[100.0, 110.0]]], [[1]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(50):
        logits = model(query, template, prompt)
        prob = torch.sigmoid(logits)
        loss = (F.binary_cross_entropy_with_logits(logits, mask_q)
                + 1 - 2 * (prob * mask_q).sum() / (prob.sum() + mask_q.sum()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        pred = model(query, template, prompt) > 0
    assert dice(pred, mask_q) > 0.8


def random_shapes(count: int, seed: int):
    """Disks and rectangles of assorted sizes on noisy images: masks (n, 1, 256, 256), images (n, 3, 256, 256)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    masks = torch.zeros(count, 1, 256, 256)
    for i in range(count):
        cy, cx = torch.randint(40, 216, (2,), generator=g).tolist()
        if i % 2:
            r = torch.randint(12, 40, (1,), generator=g).item()
            masks[i, 0] = (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).float()
        else:
            h, w = torch.randint(10, 40, (2,), generator=g).tolist()
            masks[i, 0] = (((yy - cy).abs() <= h) & ((xx - cx).abs() <= w)).float()
    images = (0.5 * masks.expand(-1, 3, -1, -1) + 0.3 * torch.rand(count, 3, 256, 256, generator=g)).clamp(0, 1)
    return masks, images


def test_seglab_autoencoder_reconstructs_unseen_disks_and_rectangles():
    masks, images = random_shapes(200, seed=0)
    model = train_seglab(masks, images, steps=100, batch_size=8)
    test_masks, test_images = random_shapes(16, seed=1)
    recon = model.reconstruct(test_images, test_masks) > 0
    scores = [dice(recon[i], test_masks[i]) for i in range(len(test_masks))]
    assert sum(scores) / len(scores) > 0.8
    tokens = model.embed(test_images[:2], test_masks[:2])
    assert tokens.shape == (2, 16 * 16, 64)
