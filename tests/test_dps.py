"""DPS: eligibility, row scores, global ranking and ratios, exact row freezing under AdamW, end to end."""

import math

import pytest
import torch
from torch import nn

from rftlib.methods import run_method
from rftlib.methods.dps import (
    Config,
    DPSTask,
    RowFreezer,
    is_eligible,
    mask_stats,
    mask_sweep,
    masks_for_ratio,
    rank_rows,
    row_scores,
)
from rftlib.results import load

from .helpers import tiny_clip

TINY = {"epochs": 1, "batch_size": 32, "warmup_steps": 2}
MATRICES = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def perturbed(state: dict, seed: int = 1, scale: float = 0.01) -> dict:
    """A fake 'fine-tuned' state: every floating tensor moved by independent noise."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


@pytest.fixture(scope="module")
def states():
    theta0 = {k: v.clone() for k, v in tiny_clip().model.state_dict().items()}
    return theta0, perturbed(theta0)


def test_eligibility_selects_exactly_the_weight_matrices(states):
    theta0, ref = states
    expected = {"text_projection", "visual.proj", "visual.conv1.weight", "token_embedding.weight"}
    expected |= {f"{tower}transformer.resblocks.{i}.{m}" for tower in ("visual.", "") for i in (0, 1) for m in MATRICES}
    ranking = rank_rows(theta0, ref)
    assert set(ranking.names) == expected
    # never eligible: biases, LayerNorms, positional/class embeddings, the logit scale
    assert not any(is_eligible(n, theta0[n]) for n in ("positional_embedding", "visual.positional_embedding",
                                                       "visual.class_embedding", "logit_scale", "ln_final.weight",
                                                       "visual.transformer.resblocks.0.attn.in_proj_bias"))
    assert ranking.num_rows == sum(theta0[n].shape[0] for n in expected)
    visual = rank_rows(theta0, ref, image_tower_only=True).names
    assert visual and all(n.startswith("visual.") for n in visual)
    assert "token_embedding.weight" not in rank_rows(theta0, ref, exclude_token_embedding=True).names


def test_row_score_is_row_max_change_over_the_tensor_change_norm(states):
    theta0, ref = states
    ranking = rank_rows(theta0, ref)
    for name in ("visual.conv1.weight", "text_projection", "transformer.resblocks.1.mlp.c_fc.weight"):
        delta = (ref[name] - theta0[name]).abs()
        want = delta.reshape(len(delta), -1).max(dim=1).values / torch.linalg.vector_norm(delta)
        assert torch.allclose(ranking.scores[name], want, rtol=1e-6)
    raw = row_scores(theta0["visual.proj"], ref["visual.proj"], "none")
    assert torch.allclose(raw, (ref["visual.proj"] - theta0["visual.proj"]).abs().max(dim=1).values)
    assert torch.equal(row_scores(theta0["visual.proj"], theta0["visual.proj"]), torch.zeros(64))  # no nan
    with pytest.raises(ValueError, match="valid: per_tensor, none"):
        row_scores(theta0["visual.proj"], ref["visual.proj"], "global")


def test_floor_m_n_rows_masked_globally_and_nested_across_ratios(states):
    ranking = rank_rows(*states)
    ratios = [0.0, 0.1, 0.33, 0.5, 0.9, 1.0]
    sweep = mask_sweep(ranking, ratios)
    for m in ratios:
        masks = sweep[m]
        assert sum(int(mk.sum()) for mk in masks.values()) == math.floor(m * ranking.num_rows)
        assert all(torch.equal(masks[n], masks_for_ratio(ranking, m)[n]) for n in masks)
        suppressed = torch.cat([ranking.scores[n][masks[n]] for n in masks])
        kept = torch.cat([ranking.scores[n][~masks[n]] for n in masks])
        if len(suppressed) and len(kept):  # the most-changed rows are the ones frozen
            assert suppressed.min() >= kept.max()
    for low, high in zip(ratios, ratios[1:]):  # one ranking: a higher ratio freezes a superset
        assert all(bool((sweep[low][n] <= sweep[high][n]).all()) for n in ranking.names)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        masks_for_ratio(ranking, 1.5)


def test_per_tensor_quota_freezes_the_top_rows_within_each_tensor(states):
    ranking = rank_rows(*states)
    masks = masks_for_ratio(ranking, 0.3, per_tensor_quota=True)
    for name, mask in masks.items():
        assert int(mask.sum()) == math.floor(0.3 * len(mask))
        scores = ranking.scores[name]
        assert scores[mask].min() >= scores[~mask].max()
    stats = mask_stats(masks, states[0])
    assert stats.summary["rows_frac"] == pytest.approx(sum(int(m.sum()) for m in masks.values()) / ranking.num_rows)
    assert set(stats.per_tensor.tensor) == set(ranking.names) and stats.per_tensor.frac.max() < 0.31
    assert 0 < stats.summary["params_frac"] < stats.summary["eligible_params_frac"] <= 1


def test_ddp_prefixed_state_dicts_still_match_the_model_names(states):
    """The released code's bug: names with a 'module.' prefix never matched, so nothing was frozen."""
    theta0, ref = states
    clip = tiny_clip()

    class Wrapped(nn.Module):  # what DataParallel / DDP do to parameter names
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = Wrapped(clip.model)
    prefixed = rank_rows(wrapped.state_dict(), {f"module.{k}": v for k, v in ref.items()})
    plain = rank_rows(theta0, ref)
    assert prefixed.names == plain.names and torch.equal(prefixed.order_row, plain.order_row)
    masks = masks_for_ratio(prefixed, 0.5)
    assert not any(n in masks for n, _ in wrapped.named_parameters())  # the release's lookup finds nothing...
    freezer = RowFreezer(dict(wrapped.named_parameters()), masks)  # ...ours finds every masked tensor
    assert set(freezer.names) == {n for n, m in masks.items() if m.any()}
    freezer.release()


def _adamw_steps(model: nn.Module, freezer: RowFreezer | None, steps: int, restore: bool = True) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.2)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 700, (4, 32), generator=g)
    for _ in range(steps):
        img = model.encode_image(torch.randn(4, 3, 32, 32, generator=g))
        loss = (img ** 2).mean() + (model.encode_text(tokens) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if freezer is not None and restore:
            freezer.restore()


def test_suppressed_rows_stay_bit_identical_under_adamw_with_weight_decay(states):
    clip = tiny_clip()
    theta0 = {k: v.clone() for k, v in clip.model.state_dict().items()}
    masks = masks_for_ratio(rank_rows(theta0, states[1]), 0.5, per_tensor_quota=True)
    masks["visual.proj"][:] = True  # one tensor frozen whole: taken out of training
    freezer = RowFreezer(dict(clip.model.named_parameters()), masks)
    assert not clip.model.visual.proj.requires_grad
    _adamw_steps(clip.model, freezer, steps=5)
    after = clip.model.state_dict()
    for name, mask in masks.items():
        assert torch.equal(after[name][mask], theta0[name][mask]), name
        if not mask.all():
            assert not torch.equal(after[name][~mask], theta0[name][~mask]), name  # the rest trained
    assert freezer.changed() == []
    freezer.release()
    assert clip.model.visual.proj.requires_grad


def test_zeroing_gradients_alone_lets_weight_decay_move_frozen_rows(states):
    """Why DPS must restore rows: AdamW's decoupled decay shrinks rows whose gradient is zero."""
    clip = tiny_clip()
    theta0 = {k: v.clone() for k, v in clip.model.state_dict().items()}
    masks = masks_for_ratio(rank_rows(theta0, states[1]), 0.5, per_tensor_quota=True)
    freezer = RowFreezer(dict(clip.model.named_parameters()), masks)
    _adamw_steps(clip.model, freezer, steps=3, restore=False)
    name = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    moved, base = clip.model.state_dict()[name][masks[name]], theta0[name][masks[name]]
    assert not torch.equal(moved, base)
    assert torch.allclose(moved, base * (1 - 1e-2 * 0.2) ** 3)  # pure decay: the gradient was zeroed
    freezer.release()


def test_objectives_and_config_errors(data):
    clip = tiny_clip()
    for objective in ("ce_language_head", "flyp", "ce_image_head"):
        task = DPSTask(clip, data.classnames, data.templates, {}, Config(objective=objective))
        assert any(p.requires_grad for n, p in clip.model.named_parameters() if not n.startswith("visual."))\
            == (objective != "ce_image_head")
        assert (task.head is not None) == (objective == "ce_image_head")
    with pytest.raises(ValueError, match="valid: ce_language_head, flyp, ce_image_head"):
        DPSTask(clip, data.classnames, data.templates, {}, Config(objective="ce"))
    with pytest.raises(ValueError, match="mask_ratio"):
        run_method("dps", data=data, clip=tiny_clip(), overrides={**TINY, "mask_ratio": 2.0})


def test_end_to_end_with_its_own_reference_run(data, tmp_path):
    clip = tiny_clip()
    theta0 = {k: v.clone() for k, v in clip.model.state_dict().items()}
    result = run_method("dps", data=data, clip=clip, out_dir=tmp_path / "dps", overrides={**TINY, "mask_ratio": 0.5})
    assert set(result.metrics) == {"id_val", "id_test", "val", "test"}
    assert result.checkpoint is not None and result.checkpoint.exists()
    masks, after = result.extra["masks"], result.clip.model.state_dict()
    assert sum(int(m.sum()) for m in masks.values()) == math.floor(0.5 * result.extra["ranking"].num_rows)
    for name, mask in masks.items():  # suppressed rows are exactly pretrained after training
        assert torch.equal(after[name][mask], theta0[name][mask]), name
    assert not torch.equal(after["visual.ln_post.weight"], theta0["visual.ln_post.weight"])  # never eligible: trains
    rows = load(run_id=result.run_id)
    assert (rows.mask_ratio == 0.5).all()
    assert set(rows[rows.split == "mask"].metric) >= {"rows_frac", "params_frac"}
    assert rows[(rows.split == "mask") & (rows.metric == "rows_frac")].value.item() == pytest.approx(0.5, abs=1e-3)
    reference = load(method="dps")
    reference = reference[reference.run_id != result.run_id]
    assert set(reference.mask_ratio) == {0.0}  # the reference is a DPS run with nothing suppressed


def test_reference_checkpoint_and_ratio_sweep(data, tmp_path):
    """A finetune checkpoint as the reference, the image-head objective, and one training run per ratio."""
    ft = run_method("finetune", data=data, clip=tiny_clip(), out_dir=tmp_path / "ft", overrides=TINY)
    result = run_method("dps", data=data, clip=tiny_clip(), results_db=str(tmp_path / "s.db"),
                        overrides={**TINY, "mask_ratio": 0.25, "mask_ratios": [0.0, 0.75],
                                   "reference": str(ft.checkpoint), "objective": "ce_image_head",
                                   "image_tower_only": True})
    table = result.extra["sweep"]
    assert list(table.columns) == ["mask_ratio", "split", "role", "metric", "value", "headline"]
    assert sorted(table.mask_ratio.unique()) == [0.0, 0.25, 0.75]
    frac = table[(table.split == "mask") & (table.metric == "rows_frac")].set_index("mask_ratio").value
    assert frac[0.25] == pytest.approx(0.25, abs=0.01) and frac[0.75] == pytest.approx(0.75, abs=0.01)
    f1 = table[table.metric == "macro_f1"]
    assert set(f1.split) == {"id_val", "id_test", "val", "test"} and f1.value.between(0, 1).all()
    stored = load(tmp_path / "s.db")
    assert sorted(stored.mask_ratio.dropna().unique()) == [0.0, 0.25, 0.75]
    assert {"id_test", "test", "mask"} <= set(stored.split) and (stored.method == "dps").all()
    assert set(stored[stored.kind == "final"].mask_ratio) == {0.25}  # the run's own ratio is its result
    assert set(stored[stored.kind == "sweep"].mask_ratio) == {0.0, 0.25, 0.75}
    assert result.metrics["test"] == table[(table.mask_ratio == 0.25) & (table.split == "test")].set_index(
        "metric").value.to_dict()


def test_a_sweeps_ratio_zero_reuses_the_reference_run(data, tmp_path):
    """The default reference is this config at ratio 0, so the sweep's ratio 0 is not trained twice."""
    result = run_method("dps", data=data, clip=tiny_clip(), out_dir=tmp_path / "dps",
                        overrides={**TINY, "mask_ratio": 0.5, "mask_ratios": [0.0]})
    table = result.extra["sweep"]
    at0 = table[(table.mask_ratio == 0.0) & (table.role.isin(["id", "ood"]))].set_index(["split", "metric"]).value
    reference = load(method="dps", kind="final")
    reference = reference[reference.run_id != result.run_id].set_index(["split", "metric"]).value
    assert at0.to_dict() == pytest.approx(reference.to_dict())
    assert not (tmp_path / "dps" / "mask_0").exists()
