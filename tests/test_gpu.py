"""CUDA checks (``pytest -m gpu``; skipped without a GPU, so never in CI): bf16 training and
evaluation, streamed input with pinned memory and workers, resume, and a one-rank NCCL group whose
per-step scalar reduction runs on the GPU. ``benchmarks/gpu_check.sh`` runs them with the
throughput benchmark."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rftlib.data import get_dataset
from rftlib.data.loading import LoaderSettings
from rftlib.data.pipeline import ImageSpec
from rftlib.evaluate import evaluate
from rftlib.methods import list_methods, run_method
from rftlib.methods.finetune import FinetuneTask
from rftlib.models import build_image_classifier, build_zeroshot_head
from rftlib.results import load
from rftlib.train import TrainConfig, fit

from .conftest import tiny_overrides
from .fakes import write_image_folder
from .helpers import free_port, python_path, tiny_clip

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]


def test_bf16_training_and_evaluation_on_cuda(data):
    clip = tiny_clip()
    result = run_method("finetune", data=data, clip=clip, device="cuda", out_dir=None,
                        overrides={"epochs": 1, "batch_size": 64, "warmup_steps": 2})
    assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for m in result.metrics.values())
    model = result.classifier
    spec = ImageSpec.of(clip)
    bf16 = evaluate(model, data, "id_test", spec, device="cuda", amp=True)
    fp32 = evaluate(model, data, "id_test", spec, device="cuda", amp=False)
    assert (bf16.logits - fp32.logits).abs().max() < 0.5 and (bf16.preds == fp32.preds).mean() > 0.95


@pytest.mark.parametrize("method", list_methods())
def test_every_method_runs_on_cuda_with_a_clip_loaded_on_the_cpu(method, data, tmp_path):
    """A notebook loads CLIP once and passes it to every run: the run moves it to its device (CRoFT
    encoded on a CPU tower with CUDA inputs before)."""
    result = run_method(method, data=data, clip=tiny_clip(), device="cuda", out_dir=tmp_path / method,
                        overrides=tiny_overrides(method))
    assert torch.isfinite(torch.tensor(result.metrics["id_test"]["macro_f1"]))


def test_streamed_input_with_workers_resumes_on_cuda(data, tmp_path):
    files = get_dataset("folder", root=write_image_folder(tmp_path / "data", data, per_split=64))
    cfg = TrainConfig(epochs=2, batch_size=16, warmup_steps=2, lr=1e-3, augment="rrc", checkpoint_every=3,
                      eval_splits=("id_val",))
    loader = LoaderSettings(workers=2)

    def run(out, stop_at=None):
        clip = tiny_clip()
        task = FinetuneTask(clip, build_zeroshot_head(clip, files.classnames, files.templates))

        def interrupt(event):
            if stop_at is not None and event.kind == "step" and event.step == stop_at:
                raise KeyboardInterrupt
        fit(task, files, cfg, spec=ImageSpec.of(clip), device="cuda", out_dir=out, loader=loader,
            callbacks=[interrupt], progress_mode="off")
        return {k: v.detach().cpu() for k, v in task.checkpoint_state().items()}

    clean = run(tmp_path / "clean")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", stop_at=5)
    resumed = run(tmp_path / "resumed")
    assert all(torch.allclose(clean[k], resumed[k], atol=1e-5) for k in clean)


def test_one_rank_nccl_group_trains_and_records_one_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": python_path(ROOT), "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "rftlib.train", "--method", "flyp", "--model", "rft-tiny", "--pretrained", "none",
           "--device", "cuda", "--data-option", "size=tiny", "cache=false", "--set", "epochs=1", "batch_size=32",
           "--results-db", str(tmp_path / "r.db"), "--out-dir", str(tmp_path / "run"), "--progress", "off"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert load(tmp_path / "r.db").run_id.nunique() == 1


def test_scalar_reduction_runs_on_the_device_in_a_nccl_group():
    code = ("import torch, torch.distributed as d; from rftlib import dist; info = dist.init_distributed('cuda');"
            "x = torch.tensor([1.0, 3.0], device='cuda'); y = dist.all_reduce_mean(x);"
            "assert d.get_backend() == 'nccl' and y.device.type == 'cuda' and y.tolist() == [1.0, 3.0]")
    env = {**os.environ, "PYTHONPATH": python_path(ROOT), "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_cpu_and_cuda_evaluations_agree(data):
    """The same weights give the same predictions on CPU (fp32) and CUDA (fp32)."""
    clip = tiny_clip()
    model = build_image_classifier(clip, build_zeroshot_head(clip, data.classnames, data.templates))
    spec = ImageSpec.of(clip)
    cpu = evaluate(model, data, "id_val", spec, device="cpu")
    gpu = evaluate(model.to("cuda"), data, "id_val", spec, device="cuda", amp=False)
    assert torch.allclose(cpu.logits, gpu.logits, atol=1e-3)
