"""NeMo-Run experiments for megatron-ghpo: one per recipe, on this machine or on Slurm, colocated or split.

Runs with the launch environment (nemo-run's pins clash with vLLM's, so it has its own venv; it only
launches jobs, the ranks run the project's own python given by --python / GHPO_PYTHON):

    .venv-launch/bin/python slurm/recipes.py --recipe tiny --executor local --set max_steps=2
    .venv-launch/bin/python slurm/recipes.py --recipe qwen-ghpo --executor slurm --nodes 4 \
        --layout split --account ACCT --partition PART --container-image nvcr.io/nvidia/pytorch:25.01-py3 \
        --container-mounts /lustre:/lustre --dry-run --out sbatch/

Every node runs ``slurm/ghpo_node.sh`` once (``srun --ntasks-per-node=1``), which starts torchrun
(training nodes) or the rollout server (node 0 of the split layout). ``--nodes`` counts training
nodes; the split layout asks Slurm for one more. ``--dry-run`` writes the sbatch script (Slurm) or
prints the command (local) without running anything.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Recipe:
    config: str
    nproc_per_node_cpu: int
    """Ranks on a CPU machine (the tiny demo: TP 2 = 2 processes)."""
    server_args: str
    """rollout-server options matching the recipe's engine (dtype, max length)."""


RECIPES = {
    "tiny": Recipe("examples/tiny-cpu/ghpo.yaml", 2, "--dtype float32 --max-model-len 177 --kv-cache-gb 0.5"),
    "qwen-ghpo": Recipe("examples/qwen2.5-math-7b/ghpo.yaml", 8, "--dtype bfloat16 --max-model-len 4097"),
    "qwen-grpo": Recipe("examples/qwen2.5-math-7b/grpo.yaml", 8, "--dtype bfloat16 --max-model-len 4097"),
}
DEFAULT_ENV = {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--layout", choices=("colocated", "split"), default="colocated")
    p.add_argument("--nodes", type=int, default=1, help="training nodes (split adds one rollout node)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="ranks per node (default: 8 on Slurm, the recipe's CPU count locally)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--container-image")
    p.add_argument("--container-mounts", action="append", default=[], metavar="SRC:DST")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="job environment (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override passed to `megatron-ghpo train --set` (repeatable)")
    p.add_argument("--server-model", help="split layout: model folder the rollout server starts from")
    p.add_argument("--server-port", type=int, default=8000)
    p.add_argument("--rdzv-port", type=int, default=29500)
    p.add_argument("--python", default=None, help="python with megatron_ghpo installed (default: REPO/.venv/bin/python locally, `python` on Slurm)")
    p.add_argument("--repo", default=str(REPO), help="repository path as seen by the job's nodes")
    p.add_argument("--job-dir", default=str(REPO / ".cache" / "nemo_run_jobs"), help="NeMo-Run job directory")
    p.add_argument("--name", default=None, help="experiment name (default: ghpo-RECIPE-LAYOUT)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", default=None, help="with --dry-run on Slurm: folder to copy the sbatch script to")
    args = p.parse_args(argv)
    for kv in args.env + args.overrides:
        if "=" not in kv:
            p.error(f"{kv!r} must be KEY=VALUE")
    if args.executor == "slurm" and not args.account:
        p.error("--executor slurm needs --account")
    if args.layout == "split" and not args.server_model:
        p.error("--layout split needs --server-model DIR (the model folder the rollout server starts from)")
    if args.executor == "local" and args.nodes != 1:
        p.error("--executor local runs on this machine: --nodes must be 1")
    if args.executor == "local" and args.layout == "split":
        p.error("--layout split needs >= 2 nodes: use --executor slurm (or start `rollout-server` by hand, see docs/cluster.md)")
    return args


def node_args(args: argparse.Namespace) -> list[str]:
    """Arguments of slurm/ghpo_node.sh for this experiment."""
    recipe = RECIPES[args.recipe]
    nproc = args.gpus_per_node or (recipe.nproc_per_node_cpu if args.executor == "local" else 8)
    out = ["--layout", args.layout, "--nproc-per-node", str(nproc), "--rdzv-port", str(args.rdzv_port)]
    if args.layout == "split":
        out += ["--server-model", args.server_model, "--server-port", str(args.server_port),
                "--server-args", f"'{recipe.server_args}'"]
    train = ["train", "--config", f"{args.repo}/{recipe.config}"]
    for kv in args.overrides:
        train += ["--set", kv]
    return out + ["--"] + train


def build(args: argparse.Namespace):
    """(task, executor) for the experiment."""
    import nemo_run as run

    py = args.python or (str(Path(args.repo) / ".venv" / "bin" / "python") if args.executor == "local" else "python")
    env = {**DEFAULT_ENV, "GHPO_PYTHON": py, "GHPO_REPO": args.repo,
           **dict(kv.split("=", 1) for kv in args.env)}
    task = run.Script(path=f"{args.repo}/slurm/ghpo_node.sh", args=node_args(args), entrypoint="bash")
    if args.executor == "local":
        return task, run.LocalExecutor(ntasks_per_node=1, env_vars=env)
    nodes = args.nodes + (1 if args.layout == "split" else 0)
    mounts = list(args.container_mounts)
    if args.container_image and not any(m.split(":")[1] == args.repo for m in mounts if ":" in m):
        mounts.append(f"{args.repo}:{args.repo}")
    executor = run.SlurmExecutor(
        account=args.account, partition=args.partition, nodes=nodes, ntasks_per_node=1,
        gpus_per_node=args.gpus_per_node or 8, time=args.time, exclusive=True,
        container_image=args.container_image, container_mounts=mounts, env_vars=env,
        packager=run.Packager(),
        tunnel=run.LocalTunnel(job_dir=args.job_dir),
    )
    return task, executor


def final_states(exp, timeout_s: float = 60.0) -> dict[str, str]:
    """Task name -> final state (the state store can lag behind the finished processes briefly)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        states = {k: str(v.get("status")) for k, v in (exp.status(return_dict=True) or {}).items()}
        if not any(s.endswith(("RUNNING", "PENDING", "SUBMITTED", "UNKNOWN")) for s in states.values()):
            return states
        if time.monotonic() > deadline:
            return states
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import nemo_run as run

    task, executor = build(args)
    name = args.name or f"ghpo-{args.recipe}-{args.layout}"
    if args.dry_run and args.executor == "local":
        print(" ".join(["bash", task.path, *task.args]))
        return 0
    with run.Experiment(name, executor=executor, log_level="WARN") as exp:
        exp.add(task, name="ghpo")
        if args.dry_run:
            exp.dryrun(log=False, delete_exp_dir=False)
            exp_dir = Path(exp._exp_dir)
            scripts = sorted(exp_dir.rglob("*_sbatch.sh"))
            if not scripts:
                print(f"error: NeMo-Run wrote no sbatch script under {exp_dir}", file=sys.stderr)
                return 1
            out = Path(args.out or ".")
            out.mkdir(parents=True, exist_ok=True)
            dest = Path(shutil.copy(scripts[-1], out / f"{name}.sbatch"))
            shutil.rmtree(exp_dir, ignore_errors=True)
            print(f"sbatch script: {dest}")
            return 0
        exp.run(sequential=True, detach=False, tail_logs=True)
        states = final_states(exp)
    bad = {k: v for k, v in states.items() if "SUCCEEDED" not in v}
    if bad:
        print(f"error: experiment {name} did not succeed: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
