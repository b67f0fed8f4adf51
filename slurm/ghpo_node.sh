#!/usr/bin/env bash
# Per-node entry of a megatron-ghpo job: run once per node (srun --ntasks-per-node=1, or by hand on
# one machine). Picks this node's role from SLURM_NODEID and starts torchrun or the rollout server.
#
#   ghpo_node.sh [--layout colocated|split] [--nproc-per-node N] [--rdzv-port P] [--server-port P]
#                [--server-model DIR] [--server-args "ARGS"] [--print] -- TRAIN_ARGS...
#
# colocated: every node trains (torchrun, c10d rendezvous on the first node).
# split:     node 0 runs `rollout-server --model DIR --port P`; nodes 1..N train, pointed at it with
#            --set rollout_mode=server --set rollout_server_url=http://NODE0:P.
# TRAIN_ARGS go to `python -m megatron_ghpo.cli` (e.g. `train --config examples/... --set k=v`).
# --print (or GHPO_NODE_PRINT=1) shows the command this node would run instead of running it.
# Environment: GHPO_PYTHON (python with megatron_ghpo installed; default `python`), GHPO_REPO
# (repository root; default this script's parent), SLURM_NODEID / SLURM_NNODES / SLURM_JOB_NODELIST /
# SLURM_JOB_ID (absent = one local node; GHPO_NODELIST overrides the node list, space-separated).
set -euo pipefail

layout=colocated nproc=1 rdzv_port=29500 server_port=8000 server_model="" server_args="" print=${GHPO_NODE_PRINT:-0}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --layout) layout=$2; shift 2 ;;
    --nproc-per-node) nproc=$2; shift 2 ;;
    --rdzv-port) rdzv_port=$2; shift 2 ;;
    --server-port) server_port=$2; shift 2 ;;
    --server-model) server_model=$2; shift 2 ;;
    --server-args) server_args=$2; shift 2 ;;
    --print) print=1; shift ;;
    --) shift; break ;;
    *) echo "ghpo_node.sh: unknown option $1 (train arguments go after --)" >&2; exit 2 ;;
  esac
done
[[ $layout == colocated || $layout == split ]] || { echo "ghpo_node.sh: --layout must be colocated or split, got $layout" >&2; exit 2; }

repo=${GHPO_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
py=${GHPO_PYTHON:-python}
node_id=${SLURM_NODEID:-0}
nnodes=${SLURM_NNODES:-1}
if [[ -n ${GHPO_NODELIST:-} ]]; then
  read -r -a nodes <<< "$GHPO_NODELIST"
elif [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
  nodes=(127.0.0.1)
fi
[[ ${#nodes[@]} -eq $nnodes ]] || { echo "ghpo_node.sh: node list has ${#nodes[@]} hosts but SLURM_NNODES=$nnodes" >&2; exit 2; }
job_id=${SLURM_JOB_ID:-local$$}

train_args=("$@")
first_train=0
if [[ $layout == split ]]; then
  (( nnodes >= 2 )) || { echo "ghpo_node.sh: the split layout needs >= 2 nodes (1 rollout server + N training)" >&2; exit 2; }
  [[ -n $server_model ]] || { echo "ghpo_node.sh: --server-model DIR is required with --layout split" >&2; exit 2; }
  first_train=1
  train_args+=(--set rollout_mode=server --set "rollout_server_url=http://${nodes[0]}:${server_port}")
fi
train_nodes=$(( nnodes - first_train ))

if [[ $layout == split && $node_id -eq 0 ]]; then
  # shellcheck disable=SC2206  # server_args is a flat option string by design
  cmd=("$py" -m megatron_ghpo.rollout.server --model "$server_model" --host 0.0.0.0 --port "$server_port" $server_args)
else
  node_rank=$(( node_id - first_train ))
  if (( train_nodes == 1 )); then
    rdzv=(--standalone --nnodes 1)
  else
    rdzv=(--nnodes "$train_nodes" --node-rank "$node_rank" --rdzv-backend c10d
          --rdzv-endpoint "${nodes[$first_train]}:${rdzv_port}" --rdzv-id "$job_id")
  fi
  cmd=("$py" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$nproc" -m megatron_ghpo.cli "${train_args[@]}")
fi

if (( print )); then
  echo "node=$node_id role=$([[ $layout == split && $node_id -eq 0 ]] && echo server || echo train) cmd=${cmd[*]}"
  exit 0
fi
cd "$repo"
echo "[ghpo_node] node $node_id/$nnodes ($(hostname)): ${cmd[*]}" >&2
exec "${cmd[@]}"
