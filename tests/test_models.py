"""Model loading, zero-shot heads and checkpoints (tiny configs, CPU, offline)."""

import ast
import importlib.util
import json
import pickle
from pathlib import Path

import open_clip
import pytest
import torch

from rftlib.models import (
    CheckpointMismatchError,
    ImageClassifier,
    WeightsUnavailableError,
    build_zeroshot_head,
    class_prompts,
    classifier_state,
    encode_class_prompts,
    export_open_clip_weights,
    load_checkpoint,
    load_classifier,
    load_clip,
    save_checkpoint,
)
from rftlib.models.loading import WeightsRefusedError
from rftlib.registry import UnknownNameError

from .helpers import tiny_clip

CLASSES = ["zarvok", "mellibun", "red round animal"]
TEMPLATES = ["a photo of a {}.", "a camera trap image of a {}."]


@pytest.fixture(scope="module")
def tiny():
    return tiny_clip()


def test_head_rows_have_norm_exp_logit_scale(tiny):
    head = build_zeroshot_head(tiny, CLASSES, TEMPLATES)
    norms = head.weight.norm(dim=1)
    assert torch.allclose(norms, tiny.logit_scale().expand_as(norms), rtol=1e-5)
    assert torch.equal(head.bias, torch.zeros(len(CLASSES)))


def test_head_matches_reference_recipe(tiny):
    """Normalise per template, average, renormalise, scale: computed by hand here."""
    rows = []
    with torch.no_grad():
        for name in CLASSES:
            emb = tiny.model.encode_text(tiny.tokenizer([t.format(name) for t in TEMPLATES]))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            rows.append(mean / mean.norm())
    expected = torch.stack(rows) * tiny.logit_scale()
    head = build_zeroshot_head(tiny, CLASSES, TEMPLATES)
    assert torch.allclose(head.weight, expected, atol=1e-5)


def test_head_normalises_image_features(tiny):
    head = build_zeroshot_head(tiny, CLASSES, TEMPLATES)
    feats = torch.randn(5, head.weight.shape[1])
    assert torch.allclose(head(feats), head(feats * 7.0), atol=1e-4)


def test_prompts_may_be_one_string_or_a_list_per_class(tiny):
    single = build_zeroshot_head(tiny, prompts=["a zarvok", ["a mellibun", "a photo of a mellibun"]])
    assert single.weight.shape[0] == 2
    lists = class_prompts(["zarvok"], TEMPLATES)
    assert torch.allclose(encode_class_prompts(tiny, lists), encode_class_prompts(tiny, [tuple(lists[0])]))
    with pytest.raises(ValueError, match="class 0"):
        build_zeroshot_head(tiny, prompts=[[]])


def test_classifier_forward_shape(tiny):
    clf = ImageClassifier(tiny.visual, build_zeroshot_head(tiny, CLASSES, TEMPLATES))
    out = clf(torch.randn(2, 3, tiny.image_size, tiny.image_size))
    assert out.shape == (2, len(CLASSES))


def test_run_method_moves_a_passed_clip_to_its_device(tiny, data, tmp_path, monkeypatch):
    """``ClipModel.to`` moves in place like ``nn.Module.to``, and a run moves the clip it is given
    (the GPU check found CRoFT encoding on a CPU tower with CUDA inputs)."""
    from rftlib.methods import run_method

    assert tiny.to("cpu") is tiny and tiny.device == torch.device("cpu")
    moved = []
    original = type(tiny).to

    def spy(self, device):
        moved.append(str(device))
        return original(self, device)

    monkeypatch.setattr(type(tiny), "to", spy)
    run_method("zeroshot", data=data, clip=tiny, device="cpu", out_dir=tmp_path / "run")
    assert moved == ["cpu"]


def test_checkpoint_round_trip_and_stock_open_clip_reload(tiny, tmp_path):
    head = build_zeroshot_head(tiny, CLASSES, TEMPLATES)
    with torch.no_grad():
        tiny.visual.conv1.weight.add_(0.01)  # pretend it was fine-tuned
    path = save_checkpoint(tmp_path / "ft", classifier_state(tiny, head), clip=tiny, classnames=CLASSES,
                           method="finetune", method_config={"lr": 1e-5})
    assert path.suffix == ".safetensors" and path.with_suffix(".json").exists()
    clip2, clf2, sidecar = load_classifier(path, architecture="rft-tiny", classnames=CLASSES)
    assert sidecar["method_config"] == {"lr": 1e-5} and sidecar["rftlib_version"]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(clf2(x), ImageClassifier(tiny.visual, head)(x), atol=1e-6)
    # stock open_clip loads the CLIP part with strict=True and computes the same image features
    exported = export_open_clip_weights(path, tmp_path / "clip_only.safetensors")
    stock = open_clip.create_model("rft-tiny", pretrained=str(exported))
    with torch.no_grad():
        assert torch.allclose(stock.encode_image(x), tiny.model.encode_image(x), atol=1e-6)


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "openai-shaped"])
def test_stock_open_clip_rebuilds_an_export_from_its_recipe_with_identical_logits(quick_gelu, tmp_path):
    """An export says how stock open_clip must build it: with OpenAI-shaped (QuickGELU) weights the
    plain architecture name gives other features, the exported config gives identical logits."""
    torch.manual_seed(0)
    clip = load_clip("rft-tiny", None, force_quick_gelu=quick_gelu)
    head = build_zeroshot_head(clip, CLASSES, ["a photo of a {}."])
    path = save_checkpoint(tmp_path / "m", classifier_state(clip, head), clip=clip, classnames=CLASSES)
    exported = export_open_clip_weights(path, tmp_path / "export.safetensors")
    sidecar = json.loads(exported.with_suffix(".json").read_text())
    assert sidecar["quick_gelu"] is quick_gelu and sidecar["open_clip_model_name"] is None  # not a stock arch
    namespace = {"open_clip": open_clip}
    exec("\n".join(sidecar["load_recipe"]), namespace)  # the two lines the sidecar prints
    stock = namespace["model"].eval()
    x, tokens = torch.randn(2, 3, 32, 32), clip.tokenizer(["a photo of a zarvok.", "a photo of a red round animal."])
    with torch.no_grad():
        ours = clip.model.encode_image(x) @ clip.model.encode_text(tokens).T
        theirs = stock.encode_image(x) @ stock.encode_text(tokens).T
        assert torch.allclose(theirs, ours, atol=1e-5)
        plain = open_clip.create_model("rft-tiny", pretrained=str(exported)).eval()  # the architecture name alone
        assert torch.allclose(plain.encode_image(x), clip.model.encode_image(x), atol=1e-5) is not quick_gelu


def test_stock_names_of_openai_shaped_architectures():
    from rftlib.models.checkpoint import stock_model_name

    assert stock_model_name("ViT-B-16", quick_gelu=True) == "ViT-B-16-quickgelu"
    assert stock_model_name("ViT-B-16", quick_gelu=False) == "ViT-B-16"
    assert stock_model_name("synthclip", quick_gelu=False) is None


def test_checkpoint_mismatch_names_the_field(tiny, tmp_path):
    path = save_checkpoint(tmp_path / "m", classifier_state(tiny), clip=tiny, classnames=CLASSES)
    with pytest.raises(CheckpointMismatchError, match="classnames.*entry 1"):
        load_checkpoint(path, classnames=["zarvok", "other", "red round animal"])
    with pytest.raises(CheckpointMismatchError, match="architecture"):
        load_checkpoint(path, architecture="ViT-B-16")
    with pytest.raises(ValueError, match="architecture 'rft-tiny'"):
        load_clip("synthclip", str(path))


def test_integer_buffers_are_recorded_in_the_sidecar_and_load(tiny, tmp_path):
    state = {**classifier_state(tiny), "visual.bn.num_batches_tracked": torch.tensor(7), "extra.count": torch.tensor(3)}
    path = save_checkpoint(tmp_path / "bn", state, clip=tiny)
    loaded, sidecar = load_checkpoint(path)
    assert sidecar["non_float_keys"] == ["extra.count", "visual.bn.num_batches_tracked"]
    assert loaded["extra.count"].dtype == torch.int64
    # a sidecar written before the record: BatchNorm's counter passes, any other integer tensor is refused
    side = path.with_suffix(".json")
    side.write_text(json.dumps({k: v for k, v in json.loads(side.read_text()).items() if k != "non_float_keys"}))
    with pytest.raises(WeightsRefusedError, match="'extra.count' is int64 where the model has floating-point"):
        load_checkpoint(path)
    assert load_checkpoint(path, allow_dtype_cast=True)[0]["extra.count"].item() == 3


def test_half_precision_weights_load_as_float32(tiny, tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.half() for k, v in tiny.model.state_dict().items()}, str(tmp_path / "half.safetensors"))
    clip = load_clip("rft-tiny", str(tmp_path / "half.safetensors"))
    assert clip.model.logit_scale.dtype == torch.float32
    assert torch.allclose(clip.model.logit_scale, tiny.model.logit_scale.half().float())


def test_local_pt_state_dict_with_ddp_prefix(tiny, tmp_path):
    state = {"state_dict": {f"module.{k}": v for k, v in tiny.model.state_dict().items()}, "epoch": 3}
    torch.save(state, tmp_path / "ddp.pt")
    clip = load_clip("rft-tiny", str(tmp_path / "ddp.pt"))
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(clip.model.state_dict()[k], v)


def test_pickled_modules_are_refused(tiny, tmp_path):
    path = tmp_path / "pickled.pt"
    with open(path, "wb") as f:
        pickle.dump(tiny.model, f)
    with pytest.raises(WeightsUnavailableError, match="never unpickles"):
        load_clip("rft-tiny", str(path))
    with pytest.raises(ValueError, match="pickles are never loaded"):
        load_checkpoint(path)


def test_unknown_names_list_valid_choices():
    with pytest.raises(UnknownNameError, match="Did you mean.*ViT-B-16"):
        load_clip("ViT-B-61", None)
    with pytest.raises(WeightsUnavailableError, match="valid tags:.*openai"):
        load_clip("ViT-B-16", "not-a-tag")
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_clip("rft-tiny", "/nonexistent/weights.safetensors")


def test_open_clip_tag_fails_fast_offline(monkeypatch):
    """With HF_HUB_OFFLINE set the error says so (and comes before any network retry)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE is set"):
        load_clip("ViT-B-32", "openai")


def test_decoded_image_cache_never_serves_another_array():
    """Regression: keys used id(array); a freed array's id can be reused by a new one."""
    import numpy as np

    from rftlib.data.base import ArrayImages, Split
    from rftlib.data.pipeline import decode_split

    for value in range(20):
        arr = np.full((2, 8, 8, 3), value, dtype=np.uint8)
        split = Split("s", "id", ArrayImages(arr), np.zeros(2))
        assert int(decode_split(split, 8)[0, 0, 0, 0]) == value
        del arr, split


def _imported_modules(module: str) -> set[str]:
    """The modules ``module``'s source imports anywhere (inside functions too), as absolute names;
    ``from a import b`` counts ``a`` and ``a.b`` (``b`` may be a module)."""
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    package = module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            names |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return names


def test_checkpoint_and_loading_form_no_import_circle():
    """checkpoint imports loading (to rebuild a CLIP); loading reaches the sidecar through the leaf
    module, never through checkpoint, and the leaf imports neither."""
    assert "rftlib.models.loading" in _imported_modules("rftlib.models.checkpoint")
    assert "rftlib.models.checkpoint" not in _imported_modules("rftlib.models.loading")
    leaf = _imported_modules("rftlib.models.sidecar")
    assert not leaf & {"rftlib.models.checkpoint", "rftlib.models.loading", "rftlib.models"}
