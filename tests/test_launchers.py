"""The launch/ commands: slurm.sh builds the right per-node `accelerate launch` (checked with stand-ins for srun and
scontrol); compare.py tabulates and plots finished runs."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO, results, run_here


def test_slurm_script_launches_one_accelerate_per_node_with_its_rank(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun runs its command once per node here, as SLURM would, with that node's SLURM_NODEID
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nshift\nfor id in 0 1; do SLURM_NODEID=$id "$@"; done\n')
    # many nodes: a reader that stops after the first line would make scontrol die of SIGPIPE under pipefail
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nfor i in $(seq -w 7 2000); do echo gpu-node-$i; done\n")
    (bin_dir / "accelerate").write_text('#!/usr/bin/env bash\necho "accelerate $*"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8",
               SLURM_JOB_NODELIST="gpu-node-[07-2000]")
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sh"), "accelerate_configs/multi_node.yaml",
                           "recipes/adalomo.py", "--output_dir", "runs/x y", "--save_steps", "200"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        assert line.startswith("accelerate launch --config_file accelerate_configs/multi_node.yaml --num_machines 2 "
                               f"--num_processes 16 --machine_rank {rank} --main_process_ip gpu-node-0007 "
                               "--main_process_port 29500 --rdzv_backend static recipes/adalomo.py")
        assert line.endswith("--output_dir runs/x y --save_steps 200")


def test_slurm_script_outside_slurm_says_what_is_missing():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sh"), "a.yaml", "b.py"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "run this under sbatch or salloc" in proc.stderr


def test_compare_tabulates_runs_and_plots_their_losses(tmp_path):
    runs = [tmp_path / "adamw", tmp_path / "lomo"]
    for run in runs:
        run_here(run.name, "--max_steps", "4", "--logging_steps", "1", "--output_dir", str(run))
    table, image = tmp_path / "table.md", tmp_path / "loss.png"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "compare.py"), *map(str, runs), "--markdown",
                           str(table), "--plot", str(image)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = proc.stdout.splitlines()[2:]
    assert proc.stdout == table.read_text() and len(rows) == 2
    for run, row in zip(runs, rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:4] == [run.name, run.name, "a single process", "4"]
        assert float(cells[6]) == round(results(run)["eval_loss"], 4)
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    proc = subprocess.run([sys.executable, str(REPO / "launch" / "compare.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "is not a run's output folder" in proc.stderr
