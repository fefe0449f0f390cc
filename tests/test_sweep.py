"""Sweeps (rftlib.sweep): a grid planned into content-addressed runs, run through submitit's local
executor, re-run without relaunching what is done, a killed job finished by running the sweep
again, and the SLURM path as far as it goes without a cluster (the submitted scripts and jobs)."""

import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rftlib.methods import run_method
from rftlib.results import compare, load
from rftlib.results.journal import RunJournal
from rftlib.sweep import ExecutorSettings, Sweep, SweepSpec, folder_status, list_tables
from rftlib.sweep.__main__ import main as sweep_main

ROOT = Path(__file__).resolve().parents[1]
TINY = {"epochs": 1, "batch_size": 32, "warmup_steps": 2}
DATA = {"size": "tiny", "cache": False}
MODEL = {"model": "rft-tiny", "pretrained": "none"}


def _sweep(tmp_path, name: str, spec: SweepSpec, **executor) -> Sweep:
    return Sweep(spec, executor=ExecutorSettings(**executor), runs_dir=tmp_path / name,
                 results_db=tmp_path / name / "results.db")


def test_planned_run_ids_are_the_ids_runs_get(tmp_path):
    spec = SweepSpec(methods=["finetune", "zeroshot"], seeds=[0, 1], set=TINY, grid={"lr": [1e-4, 1e-3]},
                     data_options=DATA, **MODEL)
    runs = spec.expand()
    # zeroshot has no lr or schedule: its grid points collapse onto one run per seed
    assert [r.method for r in runs] == ["finetune"] * 4 + ["zeroshot"] * 2
    assert len({r.run_id for r in runs}) == 6
    first = runs[1]
    result = run_method(first.method, dataset="synthwild", dataset_options=DATA, model="rft-tiny", pretrained=None,
                        seed=first.seed, overrides=first.overrides, results_db=str(tmp_path / "r.db"),
                        out_dir=tmp_path / "one")
    assert result.run_id == first.run_id and first.overrides == {**TINY, "lr": 1e-3}


def test_sweep_files_and_bad_grids_are_named(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('methods = ["finetune"]\nseeds = [0, 1]\n[set]\nepochs = 1\n[grid]\nlr = [1e-5, 3e-5]\n')
    spec = SweepSpec.from_file(path, set={"batch_size": 8})
    assert spec.set == {"epochs": 1, "batch_size": 8} and len(spec.expand()) == 4
    path.write_text('methods = ["finetune"]\nlearning_rate = 1\n')
    with pytest.raises(ValueError, match="unknown field.*learning_rate.*valid: methods"):
        SweepSpec.from_file(path)
    with pytest.raises(ValueError, match="no method of the sweep.*has the setting.*learnig_rate"):
        SweepSpec(methods=["finetune"], set={"learnig_rate": 1}).expand()
    with pytest.raises(ValueError, match="grid 'lr' must be a non-empty list"):
        SweepSpec(methods=["finetune"], grid={"lr": 1e-5})
    with pytest.raises(Exception, match="finetun.*finetune"):
        SweepSpec(methods=["finetun"])


@pytest.mark.slow
def test_a_local_sweep_completes_compares_and_relaunches_nothing(tmp_path, capsys):
    spec = SweepSpec(methods=["zeroshot", "finetune", "wiseft"], seeds=[0, 1], set=TINY, data_options=DATA, **MODEL)
    sweep = _sweep(tmp_path, "runs", spec, parallel=2)
    report = sweep.launch(poll_s=0.5)
    assert report.counts == {"done": 6, "queued": 0, "running": 0, "failed": 0}
    assert report.gathered.statuses["done"] >= 6  # wiseft's base runs live in its folders and are gathered too
    out = capsys.readouterr().out
    assert "6 run(s): 0 done, 4 queued, 2 running, 0 failed" in out and "6 done" in out
    table = compare(load(sweep.results_db)).table.set_index("method")
    assert set(table.index) == {"zeroshot", "finetune", "wiseft (finetune)"} and (table.n_seeds == 2).all()
    assert (sweep.plan().state == "done").all()
    shown = _compare_notebook_text(sweep.results_db, tmp_path)
    assert all(f"{m}" in shown for m in table.index) and "reported" in shown
    again = sweep.launch(poll_s=0.5)
    assert again.states == [] and len(again.skipped) == 6 and again.seconds < 30


def _compare_notebook_text(results_db: Path, tmp_path: Path) -> str:
    """Run notebooks/compare.ipynb on ``results_db`` under papermill; the text of its outputs."""
    import nbformat
    import papermill

    out = tmp_path / "compare-out.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "compare.ipynb"), str(out), kernel_name="python3",
                               parameters={"results_db": str(results_db), "progress": "off", **MODEL},
                               cwd=str(tmp_path), progress_bar=False, start_timeout=120)
    outputs = [o for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", [])]
    return "\n".join(str(o.get("data", {}).get("text/plain", "")) + str(o.get("text", "")) for o in outputs)


def _checkpoints(folder: Path) -> dict:
    return {p.name: load_file(p) for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.slow
def test_a_killed_job_is_finished_by_running_the_sweep_again(tmp_path):
    spec = SweepSpec(methods=["finetune"], set={**TINY, "epochs": 3, "batch_size": 16, "checkpoint_every": 2},
                     data_options=DATA, **MODEL)
    clean = _sweep(tmp_path, "clean", spec)
    assert clean.launch(poll_s=0.2, progress=None).counts["done"] == 1
    sweep = _sweep(tmp_path, "killed", spec, retries=0)
    folder = sweep.folder(sweep.runs[0])
    first = sweep.launch(wait=False, progress=None)  # keeps the job object: submitit cancels dropped local jobs
    deadline = time.monotonic() + 120
    while not list(folder.glob("ckpt-*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(int((folder / ".lock").read_text()), signal.SIGKILL)  # the run's process, mid-run
    while not first.states[0].job.done():
        time.sleep(0.1)
    assert folder_status(folder) == "interrupted"
    report = sweep.launch(poll_s=0.2, progress=None)
    assert report.counts["done"] == 1
    starts = [r for r in RunJournal(folder).records() if r["op"] == "start_run"]
    assert len(starts) == 2, "the second job resumes the run the killed one started"
    a, b = _checkpoints(clean.folder(clean.runs[0])), _checkpoints(folder)
    assert a.keys() == b.keys() and all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])
    rows = load(sweep.results_db)
    assert not rows.duplicated(["split", "metric", "kind", "epoch", "step"]).any()


FAKE_SBATCH = """#!/bin/sh
n=$(ls "{out}" | wc -l)
cp "$1" "{out}/submission-$n.sh"
echo "Submitted batch job $((4242 + n))"
"""


def test_slurm_needs_a_cluster_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="slurm executor needs SLURM's srun and sbatch"):
        _sweep(tmp_path, "runs", SweepSpec(methods=["zeroshot"]), kind="slurm").launch(wait=False, progress=None)


FAKE_SACCT = """#!/bin/sh
printf 'JobID|State|NodeList\\n4242_0|PENDING|\\n4242_1|RUNNING|n1\\n4242_2|FAILED|n2\\n4242_3|CANCELLED by 7|\\n'
"""


def _fake_slurm(tmp_path, monkeypatch) -> Path:
    """sbatch (keeps each submitted script in the returned folder), srun and sacct on PATH."""
    bin_dir, out = tmp_path / "bin", tmp_path / "submitted"
    bin_dir.mkdir(), out.mkdir()
    fakes = {"sbatch": FAKE_SBATCH.format(out=out), "srun": "#!/bin/sh\nexit 0\n", "sacct": FAKE_SACCT}
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return out


def test_slurm_jobs_are_submitted_as_one_array_with_torchrun_for_several_nodes(tmp_path, monkeypatch):
    out = _fake_slurm(tmp_path, monkeypatch)
    spec = SweepSpec(methods=["finetune", "flyp"], datasets=["iwildcam"], seeds=[0, 1],
                     model="ViT-B-16", pretrained="openai", data_root="/data")
    sweep = _sweep(tmp_path, "runs", spec, kind="slurm", gpus=4, nodes=2, partition="gpu", time_min=720,
                   parallel=3, slurm_extra={"account": "proj"})
    report = sweep.launch(wait=False, progress=None)
    scripts = list(out.iterdir())
    assert len(scripts) == 1 and len(report.states) == 4  # one array of four jobs
    text = scripts[0].read_text()
    for line in ("--partition=gpu", "--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=1", "--time=720",
                 "--array=0-3%3", "--account=proj"):
        assert f"#SBATCH {line}" in text, line
    assert "srun" in text and sys.executable in text
    job = report.states[0].job.submission().function  # what the array task unpickles and calls
    command = job.command("node17", "4242_0")
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert " ".join(command).count("--rdzv_endpoint node17:29500") == 1 and "--nnodes 2" in " ".join(command)
    assert command[command.index("-m", 3):][:2] == ["-m", "rftlib.train"]
    assert job.environment() == {"RFT_RESULTS_SINK": "folder", "RFT_RUNS_DIR": str(tmp_path / "runs")}
    cpu = _sweep(tmp_path, "cpu", spec, parallel=2)._job(spec.expand()[0])
    assert cpu.environment()["OMP_NUM_THREADS"] == str(max(1, os.cpu_count() // 2))  # cores shared, not oversubscribed
    args = job.train_args()
    assert args[args.index("--method") + 1] == "finetune" and args[args.index("--device") + 1] == "cuda"
    assert "--track" not in args
    single = _sweep(tmp_path, "one", spec, kind="slurm", gpus=2)._job(spec.expand()[0]).command()
    assert "--standalone" in single and "--nproc_per_node" in single


def test_the_command_line_dry_run_and_bad_arguments(tmp_path, capsys):
    args = ["--methods", "finetune", "zeroshot", "--seeds", "0", "1", "--set", "epochs=1",
            "--data-option", "size=tiny", "--runs-dir", str(tmp_path / "runs")]
    assert sweep_main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 run(s): 4 new" in out and "finetune synthwild seed=1 epochs=1" in out
    with pytest.raises(SystemExit) as exit_info:
        sweep_main([*args, "--set", "lrr=1", "--dry-run"])
    assert exit_info.value.code == 2 and "lrr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep_main(["--methods", "finetune", "--executor", "local", "--nodes", "2", "--dry-run"])
    assert "nodes=1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep_main(["--methods", "finetune", "--track", "mlflow", "--dry-run"])
    assert "mlflow" in capsys.readouterr().err
    tracked = Sweep(SweepSpec(methods=["zeroshot"]), runs_dir=tmp_path / "t", track="tensorboard")
    assert tracked._job(tracked.runs[0]).train_args()[-2:] == ["--track", "tensorboard"]
    assert json.loads(json.dumps(ExecutorSettings(kind="slurm", gpus=1).slurm_parameters("x")))["gpus_per_node"] == 1


def test_a_failed_run_is_reported_with_its_log(tmp_path, capsys):
    spec = SweepSpec(methods=["zeroshot"], datasets=["imagenet"], data_root=str(tmp_path / "no-data"), **MODEL)
    report = _sweep(tmp_path, "runs", spec, retries=0).launch(poll_s=0.2)
    assert report.counts == {"done": 0, "queued": 0, "running": 0, "failed": 1}
    out = capsys.readouterr().out
    log = Path(report.failed[0].log)
    assert f"log: {log}" in out and "failed: zeroshot imagenet seed=0" in out
    assert "prepare_imagenet.py" in log.read_text()  # the run's own error, naming the command that prepares data


@pytest.mark.parametrize("table", list_tables())
def test_every_shipped_paper_table_plans(table):
    spec = SweepSpec.from_file(table, data_root="/data")
    runs = spec.expand()
    assert len(runs) == len(spec.methods) * len(spec.seeds) and {r.model for r in runs} == {"ViT-B-16"}
    assert all("--data-root" in r.cli_args() for r in runs)


def test_running_a_slurm_sweep_again_submits_only_runs_whose_jobs_ended(tmp_path, monkeypatch):
    out = _fake_slurm(tmp_path, monkeypatch)
    spec = SweepSpec(methods=["finetune", "flyp"], seeds=[0, 1], model="ViT-B-16", pretrained="openai")
    sweep = _sweep(tmp_path, "runs", spec, kind="slurm", gpus=1)
    first = sweep.launch(wait=False, progress=None)
    assert [s.job.job_id for s in first.states] == ["4242_0", "4242_1", "4242_2", "4242_3"]
    again = sweep.launch(wait=False, progress=None)  # sacct: 4242_0 pending, _1 running, _2 failed, _3 cancelled
    assert [r.run_id for r in again.elsewhere] == [s.run.run_id for s in first.states[:2]]
    assert [s.run.run_id for s in again.states] == [s.run.run_id for s in first.states[2:]]
    assert len(list(out.iterdir())) == 2 and "--array=0-1" in sorted(out.iterdir())[-1].read_text()
