"""One rank of a 2-rank policy-gradient job whose rollouts come from a rollout server.

Rank 0 (the rollout leader) holds a RemoteRolloutEngine; both ranks hold the same transformers
policy and all-reduce gradients over the default gloo group (the job's own world, untouched by the
weight channel). Each step: generate groups on the server, check the server's sampling log-probs
against the policy, take a group-normalised policy-gradient step, push the weights, then compare the
server's log-probs on fixed tokens with the policy's. Rank 0 prints one ``RESULT {json}`` line.

argv: model_dir server_url steps bucket_bytes
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

FIXED = [[1, 7, 30, 99, 5, 250, 17, 3], [11, 12, 13, 14, 15, 16]]


def policy_logprobs(model, rows: list[list[int]]) -> list[list[float]]:
    """log p(ids[t] | ids[:t]) for t >= 1, per row (temperature 1)."""
    out = []
    for ids in rows:
        x = torch.tensor([ids])
        lp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
        out.append(lp.gather(-1, x[0, 1:, None])[:, 0].tolist())
    return out


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def main() -> None:
    model_dir, url, steps, bucket_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    from megatron_ghpo.algo.advantages import group_advantages
    from megatron_ghpo.rollout.base import SamplingParams

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = None
    if rank == 0:
        from megatron_ghpo.rollout.remote import RemoteRolloutEngine

        engine = RemoteRolloutEngine(url, timeout_s=60, ready_timeout_s=120, bucket_bytes=bucket_bytes)
    prompts = [[2, 40 + i, 41 + i, 42] for i in range(4)]
    report = {"sample_diff": [], "sync_diff": [], "versions": [], "server_versions": [], "changed": []}
    before = policy_logprobs(model, FIXED)
    for step in range(steps):
        box = [None]
        if rank == 0:
            sampling = SamplingParams(n=4, max_tokens=8, temperature=1.0, top_k=-1, seed=100 + step)
            groups = engine.generate(prompts, sampling)
            rows = [p + c.token_ids for p, cs in zip(prompts, groups) for c in cs]
            with torch.no_grad():
                pol = policy_logprobs(model, rows)
            eng = [c.logprobs for cs in groups for c in cs]
            report["sample_diff"].append(max_diff([r[-len(e):] for r, e in zip(pol, eng)], eng))
            box = [[(p, [c.token_ids for c in cs]) for p, cs in zip(prompts, groups)]]
        dist.broadcast_object_list(box, src=0)
        mine = box[0][rank::2]  # each rank trains on half of the groups
        rewards = torch.tensor([[sum(t % 2 == 0 for t in c) / len(c) for c in cs] for _, cs in mine])
        adv = group_advantages(rewards, "group")
        opt.zero_grad()
        loss = torch.zeros(())
        for (p, cs), a_row in zip(mine, adv):
            for c, a in zip(cs, a_row):
                lp = policy_logprobs_graph(model, p + c)[len(p) - 1:]
                loss = loss - a * lp.sum() / len(c)
        loss.backward()
        for prm in model.parameters():  # data-parallel gradient average over the job's default group
            dist.all_reduce(prm.grad)
            prm.grad /= 2
        opt.step()
        if rank == 0:
            engine.load_weights((k, v.detach()) for k, v in model.state_dict().items())
            with torch.no_grad():
                pol = policy_logprobs(model, FIXED)
            report["sync_diff"].append(max_diff(engine.score_tokens(FIXED), pol))
            report["changed"].append(max_diff(pol, before))
            report["versions"].append(engine.weight_version)
            report["server_versions"].append(engine.server_weight_version())
    dist.barrier()
    if rank == 0:
        engine.close()
        print("RESULT " + json.dumps(report), flush=True)
    dist.destroy_process_group()


def policy_logprobs_graph(model, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    lp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
    return lp.gather(-1, x[0, 1:, None])[:, 0]


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
