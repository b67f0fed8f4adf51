"""Slurm launch scripts without a cluster: the per-node entry (slurm/ghpo_node.sh) and the plain
sbatch scripts run with a stand-in `srun` that plays every node, and NeMo-Run dry-run sbatch scripts
for 1+1 split, 2 colocated and 4+1 split nodes, whose srun line is replayed per node the same way.
Each node's command is printed (GHPO_NODE_PRINT=1), not run, and checked: roles, torchrun node
count / node rank / rendezvous / processes per node (world size), server URL, container flags."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
NODE = ROOT / "slurm" / "ghpo_node.sh"
LAUNCH_PY = ROOT / ".venv-launch" / "bin" / "python"

FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in srun: echo the srun options, then run the command once per node of the allocation.
opts=()
while [[ $# -gt 0 && $1 == -* ]]; do
  case "$1" in --output|--container-image|--container-mounts|--container-workdir|--container-env|-w|--nodes|--ntasks) opts+=("$1" "$2"); shift 2 ;;
  *) opts+=("$1"); shift ;; esac
done
echo "SRUN_OPTS ${opts[*]}"
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i GHPO_NODE_PRINT=1 "$@"; done
"""


def run_nodes(cmd: list[str], nnodes: int, tmp_path: Path, **env: str) -> tuple[list[str], dict[int, dict]]:
    """Run ``cmd`` (an sbatch script or an srun line) with the fake srun; return srun options and,
    per node, its role and command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": str(nnodes),
                "GHPO_NODELIST": " ".join(f"gpu{i:03d}" for i in range(nnodes)), "SLURM_JOB_ID": "4242",
                "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NODELIST": f"gpu[000-{nnodes - 1:03d}]", **env}
    done = subprocess.run(cmd, check=False, env=full_env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    opts, nodes = [], {}
    for line in done.stdout.splitlines():
        if line.startswith("SRUN_OPTS "):
            opts = line.split()[1:]
        m = re.match(r"node=(\d+) role=(\w+) cmd=(.*)", line)
        if m:
            nodes[int(m.group(1))] = {"role": m.group(2), "cmd": m.group(3).split()}
    assert len(nodes) == nnodes, done.stdout
    return opts, nodes


def arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def check_layout(nodes: dict[int, dict], *, split: bool, train_nodes: int, nproc: int, server_port: int = 8000):
    """Roles, torchrun rendezvous and world size of every node."""
    first = 1 if split else 0
    if split:
        server = nodes[0]
        assert server["role"] == "server"
        assert server["cmd"][1:3] == ["-m", "megatron_ghpo.rollout.server"]
        assert arg(server["cmd"], "--port") == str(server_port) and arg(server["cmd"], "--host") == "0.0.0.0"
    ranks = []
    for i in range(first, first + train_nodes):
        cmd = nodes[i]["cmd"]
        assert nodes[i]["role"] == "train"
        assert cmd[1:3] == ["-m", "torch.distributed.run"]
        assert arg(cmd, "--nproc-per-node") == str(nproc)
        assert cmd[cmd.index("--nproc-per-node") + 2:][:3] == ["-m", "megatron_ghpo.cli", "train"]
        if train_nodes == 1:
            assert "--standalone" in cmd and arg(cmd, "--nnodes") == "1"
        else:
            assert arg(cmd, "--nnodes") == str(train_nodes)
            assert arg(cmd, "--rdzv-backend") == "c10d" and arg(cmd, "--rdzv-id") == "4242"
            assert arg(cmd, "--rdzv-endpoint") == f"gpu{first:03d}:29500"  # the first training node
            ranks.append(int(arg(cmd, "--node-rank")))
        sets = [cmd[j + 1] for j, a in enumerate(cmd) if a == "--set"]
        if split:
            assert "rollout_mode=server" in sets and f"rollout_server_url=http://gpu000:{server_port}" in sets
        else:
            assert not any(s.startswith("rollout_") for s in sets)
    if train_nodes > 1:
        assert ranks == list(range(train_nodes))
    world = train_nodes * nproc
    return world


@pytest.mark.parametrize("split,nnodes,nproc", [(True, 2, 8), (False, 2, 8), (True, 5, 4)])
def test_plain_sbatch_scripts_place_roles_and_rendezvous(tmp_path, split, nnodes, nproc):
    script = ROOT / "slurm" / ("split.sbatch" if split else "colocated.sbatch")
    env = {"GHPO_GPUS_PER_NODE": str(nproc), "GHPO_CONTAINER_IMAGE": "nvcr.io/nvidia/pytorch:25.01-py3",
           "GHPO_CONTAINER_MOUNTS": "/lustre:/lustre"}
    if split:
        env["GHPO_SERVER_MODEL"] = "/lustre/models/m"
    opts, nodes = run_nodes(["bash", str(script), "train", "--config", "c.yaml"], nnodes, tmp_path, **env)
    assert "--kill-on-bad-exit=1" in opts and "--ntasks-per-node=1" in opts
    assert arg(opts, "--container-image") == "nvcr.io/nvidia/pytorch:25.01-py3"
    assert arg(opts, "--container-mounts") == f"/lustre:/lustre,{ROOT}:{ROOT}"
    world = check_layout(nodes, split=split, train_nodes=nnodes - split, nproc=nproc)
    assert world == (nnodes - split) * nproc
    header = script.read_text()
    assert "#SBATCH --ntasks-per-node=1" in header


def test_node_entry_rejects_bad_layouts(tmp_path):
    def run(*a: str, nnodes: int = 1) -> subprocess.CompletedProcess:
        env = {**os.environ, "SLURM_NNODES": str(nnodes), "GHPO_NODELIST": " ".join(f"n{i}" for i in range(nnodes))}
        return subprocess.run(check=False, args=["bash", str(NODE), *a, "--print", "--", "train"], env=env, capture_output=True,
                              text=True, timeout=30)

    r = run("--layout", "split", "--server-model", "/m")
    assert r.returncode == 2 and ">= 2 nodes" in r.stderr
    r = run("--layout", "split", nnodes=2)
    assert r.returncode == 2 and "--server-model" in r.stderr
    r = run("--layout", "ring")
    assert r.returncode == 2 and "colocated or split" in r.stderr
    r = run("--layout", "colocated")
    assert r.returncode == 0 and "--standalone" in r.stdout


DRY_RUN = """
import sys
sys.path.insert(0, {slurm!r})
import recipes
common = ["--executor", "slurm", "--account", "acct", "--partition", "batch", "--job-dir", {jobs!r},
          "--container-image", "nvcr.io/nvidia/pytorch:25.01-py3", "--container-mounts", "/lustre:/lustre",
          "--env", "NCCL_IB_HCA=mlx5", "--dry-run", "--out", {out!r}, "--gpus-per-node", "8"]
for name, extra in [("split-1+1", ["--recipe", "qwen-ghpo", "--nodes", "1", "--layout", "split"]),
                    ("colocated-2", ["--recipe", "qwen-grpo", "--nodes", "2", "--layout", "colocated"]),
                    ("split-4+1", ["--recipe", "qwen-ghpo", "--nodes", "4", "--layout", "split"])]:
    if "split" in extra:
        extra += ["--server-model", "/lustre/models/Qwen2.5-Math-7B"]
    assert recipes.main(common + extra + ["--name", name]) == 0
"""


@pytest.mark.skipif(not LAUNCH_PY.exists(), reason="NeMo-Run launch env missing: run "
                    "`python3.11 -m venv .venv-launch && .venv-launch/bin/pip install nemo-run==0.11.1 leptonai==0.27.3`")
def test_nemo_run_dry_run_sbatch_for_1p1_2_and_4p1_nodes(tmp_path):
    out, jobs = tmp_path / "sbatch", tmp_path / "jobs"
    env = {**os.environ, "NEMORUN_HOME": str(tmp_path / "nemorun")}
    code = DRY_RUN.format(slurm=str(ROOT / "slurm"), jobs=str(jobs), out=str(out))
    done = subprocess.run(check=False, args=[str(LAUNCH_PY), "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name, nnodes, split in [("split-1+1", 2, True), ("colocated-2", 2, False), ("split-4+1", 5, True)]:
        text = (out / f"{name}.sbatch").read_text()
        assert f"#SBATCH --nodes={nnodes}\n" in text and "#SBATCH --ntasks-per-node=1\n" in text
        assert "#SBATCH --gpus-per-node=8\n" in text and "#SBATCH --account=acct\n" in text
        assert "#SBATCH --partition=batch\n" in text
        assert "export NCCL_IB_HCA=mlx5\n" in text and "export GHPO_PYTHON=python\n" in text
        srun = next(line for line in text.splitlines() if line.startswith("srun "))
        words = shlex.split(srun)
        assert arg(words, "--container-image") == "nvcr.io/nvidia/pytorch:25.01-py3"
        assert arg(words, "--container-mounts").startswith(f"/lustre:/lustre,{ROOT}:{ROOT},")
        assert "--kill-on-bad-exit=1" in words
        recipe = "grpo" if "colocated" in name else "ghpo"
        assert f"{ROOT}/examples/qwen2.5-math-7b/{recipe}.yaml" in words
        # replay the srun line on every node of the allocation
        srun_line = srun.replace("${SLURM_RESTART_COUNT:-0}", "0")
        _, nodes = run_nodes(["bash", "-c", srun_line], nnodes, tmp_path)
        check_layout(nodes, split=split, train_nodes=nnodes - split, nproc=8)
        if split:
            assert arg(nodes[0]["cmd"], "--model") == "/lustre/models/Qwen2.5-Math-7B"
            assert arg(nodes[0]["cmd"], "--dtype") == "bfloat16"


def test_recipe_arguments_are_checked():
    if not LAUNCH_PY.exists():
        pytest.skip("NeMo-Run launch env missing (.venv-launch)")
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'slurm')!r}); import recipes\n"
            "try:\n    recipes.parse_args(sys.argv[1:])\nexcept SystemExit as e:\n    sys.exit(e.code)")
    for argv, msg in [(["--recipe", "tiny", "--executor", "slurm"], "--account"),
                      (["--recipe", "tiny", "--layout", "split", "--server-model", "m"], "--executor slurm"),
                      (["--recipe", "qwen-ghpo", "--executor", "slurm", "--account", "a", "--layout", "split"], "--server-model")]:
        r = subprocess.run(check=False, args=[str(LAUNCH_PY), "-c", code, *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and msg in r.stderr, (argv, r.stderr)
