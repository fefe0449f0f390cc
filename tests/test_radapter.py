"""R-Adapter: adapter construction (rank condition fixed), dropping, EMA, MPM-NCE, merge/unmerge, export, run."""

import math

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from rftlib.methods import get_config, run_method
from rftlib.methods.flyp import contrastive_loss
from rftlib.methods.radapter import (
    ADAPTER_PREFIX,
    EMA_PREFIX,
    LinearAdapter,
    RAdapterTask,
    adapter_mode,
    add_adapters,
    drop_path,
    ema_update,
    export_merged,
    iter_adapters,
    load_radapter,
    merge_adapters,
    mpm_nce_loss,
    plain_state_dict,
    remove_adapters,
    unmerge_adapters,
)
from rftlib.models import load_classifier
from rftlib.results import load

from .helpers import run_single_and_two_ranks, tiny_clip

TINY = {"epochs": 1, "batch_size": 32, "warmup_steps": 2}
WIDTH = 64  # rft-tiny's width in both towers


def inputs(clip, n=6):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, clip.image_size, clip.image_size, generator=g)
    tokens = clip.tokenizer(["a photo of a cat.", "a small orange animal", "a fox", "art of the owl."])
    return images, tokens


def encode(clip, images, tokens):
    with torch.no_grad():
        return clip.model.encode_image(images), clip.model.encode_text(tokens)


def randomise(clip, scale=0.05, seed=3):
    """Give every adapter (live and EMA, different values) non-zero weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in iter_adapters(clip.model):
            for p, shadow in adapter.parameter_shadow_pairs():
                p.copy_(torch.randn(p.shape, generator=g) * scale + (0.1 if p.dim() == 0 else 0.0))
                shadow.copy_(torch.randn(p.shape, generator=g) * scale + (0.2 if p.dim() == 0 else 0.0))


def test_low_rank_is_used_exactly_when_rank_is_below_the_width():
    low = LinearAdapter(8, 4)
    assert low.low_rank and low.up.shape == (8, 4) and low.down.shape == (4, 8)
    assert torch.count_nonzero(low.up) == 0 and torch.count_nonzero(low.down) > 0  # U zero, D Xavier
    for rank in (None, 8, 16):  # the released code had this inverted (low rank only when width < rank)
        full = LinearAdapter(8, rank)
        assert not full.low_rank and full.weight.shape == (8, 8) and torch.count_nonzero(full.weight) == 0
    assert LinearAdapter(8).scale.item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="rank"):
        LinearAdapter(8, 0)
    with pytest.raises(ValueError, match="granularity"):
        LinearAdapter(8, granularity="layer")
    clip = tiny_clip()
    adapters = add_adapters(clip, rank_vision=16, rank_text=None)
    vision = [a for n, a in iter_adapters(clip.model) if n.startswith("visual.")]
    text = [a for n, a in iter_adapters(clip.model) if not n.startswith("visual.")]
    assert len(adapters) == 2 * (2 + 2)  # attention + MLP in each of the 2 + 2 blocks
    assert all(a.low_rank and a.rank == 16 for a in vision) and all(not a.low_rank for a in text)


def test_zero_init_adapters_leave_outputs_unchanged_and_only_adapters_train():
    clip = tiny_clip()
    images, tokens = inputs(clip)
    before = {}
    for mode in (True, False):  # training mode (adapters drop) and eval mode (attention fast path)
        before[mode] = encode(clip.model.train(mode) and clip, images, tokens)
    add_adapters(clip, rank_vision=None, rank_text=8, drop=0.5, granularity="sample")
    for mode in (True, False):
        clip.model.train(mode)
        assert all(torch.equal(a, b) for a, b in zip(before[mode], encode(clip, images, tokens)))
    trainable = {n for n, p in clip.model.named_parameters() if p.requires_grad}
    assert trainable and all(".ls_1." in n or ".ls_2." in n for n in trainable)
    assert not clip.model.logit_scale.requires_grad
    with pytest.raises(ValueError, match="already has R-Adapters"):
        add_adapters(clip)
    with pytest.raises(ValueError, match="already carries R-Adapters"):  # a second run must not resume silently
        RAdapterTask(clip, ["cat"], ["a {}"], get_config("radapter", "synthwild"))
    remove_adapters(clip)
    assert not list(iter_adapters(clip.model))
    assert add_adapters(clip, rank_vision=0, rank_text=None) and all(
        not n.startswith("visual.") for n, _ in iter_adapters(clip.model))


@pytest.mark.parametrize("batch_first", [True, False])
def test_drop_granularity_shapes(batch_first):
    torch.manual_seed(0)
    p = 0.5
    x = torch.ones(8, 5, 3)  # (N, L, D) if batch_first else (L, N, D)
    batch_axis, token_axis = (0, 1) if batch_first else (1, 0)
    for _ in range(5):
        out = drop_path(x, p, "module", batch_first)
        assert set(out.unique().tolist()) <= {0.0, 2.0} and out.unique().numel() == 1
        out = drop_path(x, p, "sample", batch_first)
        assert set(out.unique().tolist()) <= {0.0, 2.0}
        per_sample = out.transpose(0, batch_axis).reshape(x.shape[batch_axis], -1)
        assert (per_sample == per_sample[:, :1]).all()  # one draw per example
        out = drop_path(x, p, "token", batch_first)
        per_token = out.transpose(0, token_axis).reshape(x.shape[token_axis], -1)
        assert (per_token == per_token[:, :1]).all()  # one draw per position, shared by the batch
    many = torch.stack([drop_path(x, p, "sample", batch_first) for _ in range(200)])
    assert many.mean().item() == pytest.approx(1.0, abs=0.1)  # kept paths rescaled by 1 / (1 - p)
    adapter = LinearAdapter(3, drop=0.9, granularity="token", batch_first=batch_first)
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(3))
    adapter.eval()  # no dropping at evaluation
    assert torch.allclose(adapter(x), x * 1.1)
    with pytest.raises(ValueError, match="valid: module, sample, token"):
        drop_path(x, p, "channel")


def test_ema_update_rule():
    adapter = LinearAdapter(4, 2)
    for p, shadow in adapter.parameter_shadow_pairs():  # the shadow starts from the initial adapter
        assert torch.equal(p, shadow)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p, shadow in adapter.parameter_shadow_pairs():
            p.copy_(torch.randn(p.shape, generator=g))
            shadow.copy_(torch.randn(p.shape, generator=g))
    old = [shadow.clone() for _, shadow in adapter.parameter_shadow_pairs()]
    ema_update(adapter, 0.9)
    for (p, shadow), before in zip(adapter.parameter_shadow_pairs(), old):
        assert torch.allclose(shadow, 0.9 * before + 0.1 * p)
    # a task updates the shadow after every optimiser step; evaluation uses it
    clip = tiny_clip()
    task = RAdapterTask(clip, ["cat", "dog"], ["a photo of a {}."], get_config("radapter", "synthwild"))
    _, adapter = next(iter_adapters(clip.model))
    with torch.no_grad():
        adapter.weight.fill_(1.0)
    task.after_optimizer_step()
    assert torch.allclose(adapter.ema_weight, torch.full_like(adapter.weight, 1.0 - task.cfg.ema))


def test_mpm_nce_on_a_hand_computed_example():
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    txt = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    scale, margin, eps = 2.0, 0.1, 0.2
    sim, y = (img @ txt.T).tolist(), labels.tolist()  # unit vectors already
    logits = [[scale * (sim[i][j] + margin * (y[i] != y[j])) for j in range(3)] for i in range(3)]

    def target(i, j):
        pos = [k for k in range(3) if y[k] == y[i]]
        return (1 - eps) / len(pos) if y[j] == y[i] else eps / (3 - len(pos))

    def nll(row):  # row(i, j) -> logit; cross-entropy of each anchor row with its smoothed targets
        total = 0.0
        for i in range(3):
            lse = math.log(sum(math.exp(row(i, j)) for j in range(3)))
            total += sum(-target(i, j) * (row(i, j) - lse) for j in range(3))
        return total / 3

    expected = 0.5 * (nll(lambda i, j: logits[i][j]) + nll(lambda i, j: logits[j][i]))
    got = mpm_nce_loss(img, txt, labels, scale, margin, eps)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # no margin, no smoothing, distinct labels: plain symmetric InfoNCE (FLYP's loss)
    distinct = torch.tensor([0, 1, 2])
    assert mpm_nce_loss(img, txt, distinct, scale, 0.0, 0.0).item() == pytest.approx(
        contrastive_loss(img, txt, torch.tensor(scale)).item(), rel=1e-5)


def test_mpm_nce_is_finite_when_every_label_is_the_same():
    img, txt = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    same = torch.zeros(4, dtype=torch.long)
    for eps in (0.0, 0.1):
        loss = mpm_nce_loss(img, txt, same, 10.0, 0.05, eps)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(img.grad).all()
        img.grad = None
    # with no negatives, all mass sits on the positives: -mean log softmax over the row
    lsm = (10.0 * torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T)
    expected = 0.5 * (-lsm.log_softmax(1).mean() - lsm.T.log_softmax(1).mean())
    assert mpm_nce_loss(img, txt, same, 10.0, 0.05, 0.1).item() == pytest.approx(expected.item(), rel=1e-5)


def test_merge_reproduces_the_adapted_model_and_unmerge_is_exact():
    clip = tiny_clip()
    images, tokens = inputs(clip)
    zeroshot_state = {k: v.clone() for k, v in clip.model.state_dict().items()}
    zeroshot = encode(clip, images, tokens)
    add_adapters(clip, rank_vision=16, rank_text=None)  # low rank merges too (the release crashed here)
    randomise(clip)
    clip.model.eval()
    for alpha in (1.0, 0.5):
        with adapter_mode(clip.model, ema=True, alpha=alpha):
            adapted = encode(clip, images, tokens)
        merge_adapters(clip, alpha, use_ema=True)
        merged_out = encode(clip, images, tokens)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(adapted, merged_out))
        with pytest.raises(ValueError, match="already merged"):
            merge_adapters(clip, alpha)
        unmerge_adapters(clip)
        assert all(torch.equal(v, zeroshot_state[k]) for k, v in plain_state_dict(clip).items())  # bit-exact
    live = encode(clip, images, tokens)  # the live (non-EMA) adapters differ from the shadow
    assert not torch.allclose(live[0], adapted[0], atol=1e-4)
    merge_adapters(clip, 0.0)  # alpha 0 is the zero-shot model exactly
    assert all(torch.equal(v, zeroshot_state[k]) for k, v in plain_state_dict(clip).items())
    assert all(torch.equal(a, b) for a, b in zip(zeroshot, encode(clip, images, tokens)))
    unmerge_adapters(clip)


def test_merged_export_loads_into_stock_open_clip(tmp_path):
    clip = tiny_clip()
    images, tokens = inputs(clip)
    add_adapters(clip, rank_vision=None, rank_text=8)
    randomise(clip)
    clip.model.eval()
    with adapter_mode(clip.model, ema=True, alpha=0.7):
        expected = encode(clip, images, tokens)
    path = export_merged(clip, 0.7, tmp_path / "merged", classnames=["cat", "dog"], templates=["a photo of a {}."])
    state = load_file(str(path))
    assert not any(k.startswith((ADAPTER_PREFIX, EMA_PREFIX)) or ".ls_" in k for k in state)
    stock = open_clip.create_model("rft-tiny")  # rftlib registered the project configs above
    stock.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=True)
    stock.eval()
    with torch.no_grad():
        got = stock.encode_image(images), stock.encode_text(tokens)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(expected, got))
    _, classifier, sidecar = load_classifier(path)
    assert classifier is not None and sidecar["extra"]["scale"] == 0.7
    assert not any(a.merged for _, a in iter_adapters(clip.model))  # the live model is left un-merged


def test_checkpoint_state_round_trip(tmp_path):
    cfg = get_config("radapter", "synthwild", {"rank_text": 8})
    clip = tiny_clip()
    task = RAdapterTask(clip, ["cat", "dog"], ["a photo of a {}."], cfg)
    randomise(clip)
    state = task.checkpoint_state()
    stock_keys = set(open_clip.create_model("rft-tiny").state_dict())
    plain = {k for k in state if not k.startswith((ADAPTER_PREFIX, EMA_PREFIX))}
    assert plain == stock_keys
    assert any(k.startswith(EMA_PREFIX) and k.endswith(".up") for k in state)
    other = RAdapterTask(tiny_clip(), ["cat", "dog"], ["a photo of a {}."], cfg)
    other.load_checkpoint_state({k: v.clone() for k, v in state.items()})
    assert all(torch.equal(v, other.checkpoint_state()[k]) for k, v in state.items())
    from rftlib.models import save_checkpoint

    path = save_checkpoint(tmp_path / "ckpt", state, clip=clip, method="radapter", method_config=cfg)
    rebuilt, _ = load_radapter(path)
    assert all(torch.equal(v, rebuilt.model.state_dict()[k]) for k, v in clip.model.state_dict().items())


def test_run_end_to_end_logs_scaled_rows(data, tmp_path):
    result = run_method("radapter", data=data, clip=tiny_clip(), out_dir=tmp_path / "ra",
                        overrides={**TINY, "scales": [0.0], "rank_vision": 16})
    assert set(result.metrics) == {"id_val", "id_test", "val", "test"}
    rows = load(run_id=result.run_id)
    scaled = rows[rows.scale.notna()]
    assert sorted(scaled.scale.unique()) == [0.0, 0.5]
    assert set(rows[rows.kind == "final"].scale) == {0.5}  # the configured scale is the run's result
    assert (rows.method == "radapter").all() and rows.epoch.notna().any()
    assert result.checkpoint is not None and result.checkpoint.exists()
    _, classifier, _ = load_classifier(result.extra["merged_checkpoint"])
    assert classifier is not None
    zs = run_method("zeroshot", data=data, clip=tiny_clip())
    sweep = result.extra["sweep"]
    at0 = sweep[(sweep.scale == 0.0) & (sweep.metric == "macro_f1")].set_index("split").value
    for split in ("id_test", "test"):  # re-scaling by 0 is the zero-shot model
        assert at0[split] == pytest.approx(zs.metrics[split]["macro_f1"])
    more = result.extra["scale_sweep"]([0.25], splits=["id_val"])
    assert set(more.scale) == {0.25} and np.isfinite(more.value).all()


DDP_SCRIPT = '''
import sys
import torch
from safetensors.torch import save_file
from rftlib import dist as rdist
from rftlib.data import get_dataset
from rftlib.data.pipeline import ImageSpec
from rftlib.methods import get_config
from rftlib.methods.radapter import RAdapterTask
from rftlib.models import load_clip
from rftlib.train import fit

torch.set_num_threads(1)
info = rdist.init_distributed("cpu")
torch.manual_seed(0)
clip, data = load_clip("rft-tiny", None), get_dataset("synthwild", size="tiny", cache=False)
cfg = get_config("radapter", "synthwild", {"epochs": 1, "batch_size": 16, "warmup_steps": 3, "lr": 1e-3,
                                           "drop": 0.0, "rank_text": 8, "eval_splits": [], "select_split": None})
task = RAdapterTask(clip, data.classnames, data.templates, cfg)
fit(task, data, cfg.train, spec=ImageSpec.of(clip), progress_mode="off")
if info.is_main:
    save_file({k: v.contiguous() for k, v in task.checkpoint_state().items()}, sys.argv[1])
'''


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    """Features and labels are gathered with gradients: the multi-positive loss spans the global batch."""
    single, ddp = run_single_and_two_ranks(DDP_SCRIPT, tmp_path)
    moved = [k for k in single if k.startswith(ADAPTER_PREFIX) and single[k].abs().sum() > 0 and k.endswith(".up")]
    assert moved  # the adapters were trained
    assert all(torch.allclose(single[k], ddp[k], atol=1e-5) for k in single)
