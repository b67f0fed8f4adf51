"""One rank of the colocated-engine test (launched twice over gloo by test_rollout_vllm_colocated.py).

Phase 1, ``per_rank``: every rank builds its own engine (construction is collective), only rank 0
generates, as a trainer whose rollout leader is rank 0 would. Phase 2, ``external_launcher``: one
TP=2 engine spans both ranks; both ranks generate the same prompts, get identical results, load
new weights and agree with transformers. Between and after the phases the trainer's own gloo
world must keep working. Phase 3: only rank 0 builds an engine; it must get a clear error, not hang.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _rollout_helpers import MAX_MODEL_LEN, hf_token_logprobs, load_hf, safetensors_stream

from megatron_ghpo.rollout import SamplingParams, VLLMEngine, vllm_setup

TOL = 1e-4


def trainer_allreduce_works() -> None:
    t = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)
    assert t.item() == 3.0, t


def greedy(engine: VLLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    return [g[0].token_ids for g in engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))]


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    prompts, timings = spec["prompts"], {}

    start = time.perf_counter()
    engine = VLLMEngine(spec["A"], max_model_len=MAX_MODEL_LEN, colocate="per_rank")
    timings["per_rank_start_s"] = time.perf_counter() - start
    trainer_allreduce_works()
    if rank == 0:
        assert greedy(engine, prompts) == spec["greedy_A"], "per-rank engine disagrees with transformers"
    dist.barrier()
    engine.close()
    trainer_allreduce_works()

    start = time.perf_counter()
    engine = VLLMEngine(
        spec["A"], max_model_len=MAX_MODEL_LEN, colocate="external_launcher", tensor_parallel_size=2
    )
    timings["tp2_start_s"] = time.perf_counter() - start
    assert greedy(engine, prompts) == spec["greedy_A"], "TP=2 engine disagrees with transformers"
    sampled = engine.generate(prompts, SamplingParams(n=2, temperature=0.8, max_tokens=12))  # unseeded
    mine = [[(c.token_ids, c.logprobs) for c in g] for g in sampled]
    both: list = [None, None]
    dist.all_gather_object(both, mine)
    assert both[0] == both[1], "TP ranks sampled different completions"
    start = time.perf_counter()
    engine.load_weights(safetensors_stream(spec["B"]))
    timings["tp2_load_weights_s"] = time.perf_counter() - start
    assert engine.weight_version == 1
    assert greedy(engine, prompts) == spec["greedy_B"], (
        "TP=2 engine after load_weights disagrees with model B"
    )
    if rank == 0:
        hf = load_hf(spec["B"])
        after = engine.generate(prompts[:2], SamplingParams(n=2, temperature=0.8, max_tokens=12, seed=1))
        worst = max(
            (hf_token_logprobs(hf, p, c.token_ids, 0.8) - torch.tensor(c.logprobs)).abs().max().item()
            for p, g in zip(prompts, after, strict=False)
            for c in g
        )
        assert worst <= TOL, f"TP=2 log-probs differ from transformers by {worst:.2e}"
    else:
        engine.generate(prompts[:2], SamplingParams(n=2, temperature=0.8, max_tokens=12, seed=1))
    engine.close()
    trainer_allreduce_works()
    Path(spec["out"]).joinpath(f"rank{rank}.json").write_text(json.dumps(timings))
    dist.barrier()

    # Phase 3: a rank that does not build its engine is reported, not waited for forever. The failed
    # monitored barrier closes the gloo pairs, so this phase comes last.
    flag = Path(spec["out"]) / "phase3.done"
    if rank == 0:
        vllm_setup.ARRIVAL_TIMEOUT_S = 3.0
        try:
            VLLMEngine(spec["A"], max_model_len=MAX_MODEL_LEN, colocate="per_rank")
            raise AssertionError("engine built although rank 1 never started one")
        except RuntimeError as exc:
            assert "collective" in str(exc), exc
        vllm_setup.ARRIVAL_TIMEOUT_S = 600.0
        flag.write_text("ok")
    else:
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert time.monotonic() < deadline, "rank 0 never finished phase 3"
            time.sleep(0.2)


if __name__ == "__main__":
    main()
