"""Rank entry for the bridge's distributed tests: ``python _bridge_worker.py TASK ARGS_JSON``.

Tasks (each rank writes ``{out}/rank<r>.json``: a list of check records the test asserts on):

``import``   one rank: ``hf_to_megatron`` for every model, then at TP=PP=1 load each checkpoint,
             export and compare with the HF safetensors bit for bit, Megatron logits vs HF logits,
             the measured export memory, and the errors for HF folders with an unknown / a missing tensor.
``layouts``  N ranks: for each (TP, PP, VPP[, EP, ETP]) layout and model, load the checkpoint, export to
             every rank (``destination="all"``) and compare bit for bit on every rank, check the key set,
             check ``destination="first"``, and measure peak extra memory on the memory model. Layouts
             with expert parallelism (EP > 1 or ETP != TP) run the mixture-of-experts models only.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback
from pathlib import Path

import torch

RECORDS: list[dict] = []


def record(check: str, ok: bool, **detail) -> None:
    RECORDS.append({"check": check, "ok": bool(ok), **detail})


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure_export(chunks, config, bucket_bytes: int, transport: str = "auto") -> dict:
    """Peak resident-memory growth (VmHWM after - VmRSS before) while streaming the export.

    Needs MALLOC_MMAP_THRESHOLD_ set small by the launcher so freed tensors leave the RSS.
    """
    from megatron_ghpo.bridge.buckets import largest_tensor_bytes, plan_buckets
    from megatron_ghpo.bridge.export import export_hf_weights
    from megatron_ghpo.bridge.plan import build_plan

    plan = build_plan(chunks, config)
    for item in export_hf_weights(chunks, config, bucket_bytes=bucket_bytes, plan=plan, transport=transport):
        pass  # warm-up: fault in code pages and lazily created communicator state before measuring
    del item  # the last tensor keeps the warm-up's buffer alive
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    base = _proc_status("VmRSS")
    n = 0
    for _name, t in export_hf_weights(chunks, config, bucket_bytes=bucket_bytes, plan=plan, transport=transport):
        n += int(torch.isfinite(t.sum()).item())  # reads every byte, as a consumer does
    peak = _proc_status("VmHWM") - base
    del t
    biggest_bucket = max(b.nbytes for b in plan_buckets(plan, bucket_bytes, None))
    model_bytes = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    return {"peak_extra": peak, "bucket_bytes": bucket_bytes, "largest": largest_tensor_bytes(plan, None),
            "biggest_bucket": biggest_bucket, "model_bytes_this_rank": model_bytes, "tensors": n}  # fmt: skip


def compare_export(
    chunks, config, hf_dir: str, tag: dict, *, bucket_bytes: int, destination: str = "all", transport: str = "auto",
    clone: bool = True, keep_buffer: bool = False, dtype: torch.dtype | None = None,
) -> None:
    """Export and compare with the HF safetensors: same key set, each key once, bit-identical values.

    ``clone=False`` keeps the yielded tensors themselves (a consumer that does not copy): they must
    keep their values although the bucket buffer is reused. ``dtype``: export cast on the fly; the
    reference is the HF tensor cast the same way.
    """
    from safetensors.torch import load_file

    from megatron_ghpo.bridge.export import export_hf_weights

    ref = {k: v if dtype is None else v.to(dtype) for k, v in load_file(str(Path(hf_dir) / "model.safetensors")).items()}
    got: dict[str, torch.Tensor] = {}
    dupes = []
    for name, t in export_hf_weights(chunks, config, bucket_bytes=bucket_bytes, destination=destination,
                                     transport=transport, keep_buffer=keep_buffer, dtype=dtype):  # fmt: skip
        if name in got:
            dupes.append(name)
        got[name] = t.clone() if clone else t
    from megatron.core import parallel_state as ps

    receives = destination == "all" or (ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0)
    if not receives:
        record("export_first_nonreceiver_empty", not got, **tag, got=len(got))
        return
    record("export_keys", sorted(got) == sorted(ref) and not dupes, **tag,
           missing=sorted(set(ref) - set(got)), extra=sorted(set(got) - set(ref)), dupes=dupes)  # fmt: skip
    bad = [k for k in ref if k in got and not (got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]))]
    record("export_bit_exact", not bad, **tag, mismatched=bad)


def stored_dtype(m: dict) -> torch.dtype | None:
    """Export dtype giving back the stored HF tensors: bf16 for the bf16 model, whose Megatron norm
    weights are fp32 (the local spec's torch norms ignore params_dtype), else each parameter's own."""
    return torch.bfloat16 if "bf16" in m["name"] else None


def task_import(args: dict) -> None:
    from transformers import AutoModelForCausalLM

    from megatron_ghpo.bridge.checkpoint import build_and_load, hf_to_megatron
    from megatron_ghpo.policy.forward import full_logits
    from megatron_ghpo.policy.parallel import init_parallel

    init_parallel()
    for m in args["models"]:
        tag = {"model": m["name"], "layout": [1, 1, None]}
        hf_to_megatron(m["hf_dir"], m["ckpt"])
        chunks = build_and_load(m["ckpt"], m["hf_dir"])
        compare_export(chunks, m["hf_dir"], m["hf_dir"], tag, bucket_bytes=args["bucket_bytes"], dtype=stored_dtype(m))
        tokens = torch.randint(0, m["vocab"], (2, 12), generator=torch.Generator().manual_seed(1))
        fp32 = chunks if next(chunks[0].parameters()).dtype == torch.float32 else build_and_load(
            m["ckpt"], m["hf_dir"], dtype=torch.float32
        )  # logits compared in fp32 on both sides (bf16 weights upcast exactly)
        ours = full_logits(fp32, tokens, vocab_size=m["vocab"], device=torch.device("cpu"))
        hf = AutoModelForCausalLM.from_pretrained(m["hf_dir"], dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(tokens).logits
        diff = (ours - ref).abs().max().item()
        record("megatron_logits_vs_hf", diff <= 1e-4, **tag, max_abs_diff=diff)
        record("checkpoint_dtype", next(chunks[0].parameters()).dtype == (torch.bfloat16 if "bf16" in m["name"] else torch.float32), **tag)
        if m.get("memory"):
            stats = measure_export(chunks, m["hf_dir"], args["memory_bucket_bytes"])
            record("export_memory", stats["peak_extra"] <= stats["bucket_bytes"] + stats["largest"], **tag, **stats)
        del chunks
    for bad in args.get("bad", []):
        try:
            hf_to_megatron(bad["hf_dir"], bad["ckpt"])
        except (KeyError, ValueError) as exc:
            record("import_rejects", bad["expect"] in str(exc) and not Path(bad["ckpt"]).exists(),
                   case=bad["name"], message=str(exc)[:400])  # fmt: skip
        else:
            record("import_rejects", False, case=bad["name"], message="no error raised")


def task_layouts(args: dict) -> None:
    from megatron_ghpo.bridge.checkpoint import build_and_load
    from megatron_ghpo.bridge.hf_load import load_hf_weights
    from megatron_ghpo.policy.model import build_gpt_model
    from megatron_ghpo.policy.parallel import destroy_parallel, init_parallel

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    for layout in args["layouts"]:
        tp, pp, vpp, ep, etp = (*layout, 1, layout[0])[:5] if len(layout) == 3 else layout
        expert_layout = len(layout) > 3
        init_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                      expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)  # fmt: skip
        for m in args["models"]:
            if (vpp and m["layers"] % (pp * vpp)) or (expert_layout and not m.get("moe")):
                continue
            chunks = build_and_load(m["ckpt"], m["hf_dir"])
            for transport in ("collective", "shm"):
                tag = {"model": m["name"], "layout": layout, "transport": transport}
                if transport == "shm" and tp % (ep * etp) and tp * pp > 1:  # (one-rank groups need no sharing)
                    check_shm_rejects_outside_experts(chunks, m["hf_dir"], tag)
                    continue
                compare_export(chunks, m["hf_dir"], m["hf_dir"], tag, bucket_bytes=args["bucket_bytes"], transport=transport,
                               dtype=stored_dtype(m))  # fmt: skip
                if m.get("first"):
                    compare_export(chunks, m["hf_dir"], m["hf_dir"], {**tag, "destination": "first"},
                                   bucket_bytes=args["bucket_bytes"], destination="first", transport=transport)  # fmt: skip
                    for _ in range(2):  # the kept buffer is reused by the second export
                        compare_export(chunks, m["hf_dir"], m["hf_dir"], {**tag, "keep_buffer": True},
                                       bucket_bytes=args["bucket_bytes"], transport=transport, keep_buffer=True)  # fmt: skip
                    compare_export(chunks, m["hf_dir"], m["hf_dir"], {**tag, "consumer_keeps": True},
                                   bucket_bytes=args["bucket_bytes"], transport=transport, clone=False)  # fmt: skip
                    compare_export(chunks, m["hf_dir"], m["hf_dir"], {**tag, "cast_bf16": True},
                                   bucket_bytes=args["bucket_bytes"], transport=transport, dtype=torch.bfloat16)  # fmt: skip
                if m.get("memory"):
                    stats = measure_export(chunks, m["hf_dir"], args["memory_bucket_bytes"], transport)
                    record("export_memory", stats["peak_extra"] <= stats["bucket_bytes"] + stats["largest"], **tag, **stats)
            if not (m.get("first") or m.get("moe") or m["name"] == "qwen2_tied_gqa"):
                del chunks
                continue
            # Direct HF import into the sharded model (what the policy does at start-up), then export.
            live = build_gpt_model(m["hf_dir"], params_dtype=stored_dtype(m) or torch.float32, transformer_impl="local",
                                   for_training=False)  # fmt: skip
            load_hf_weights(live, m["hf_dir"])
            compare_export(live, m["hf_dir"], m["hf_dir"], {"model": m["name"], "layout": layout, "live_import": True},
                           bucket_bytes=args["bucket_bytes"], dtype=stored_dtype(m))  # fmt: skip
            del chunks, live
            gc.collect()
        destroy_parallel()


def check_shm_rejects_outside_experts(chunks, config, tag: dict) -> None:
    """``transport="shm"`` with experts outside the TP group: a RuntimeError naming the sizes."""
    from megatron_ghpo.bridge.export import export_hf_weights

    try:
        for _ in export_hf_weights(chunks, config, transport="shm"):
            pass
    except RuntimeError as exc:
        record("shm_rejects_experts_outside_tp", "expert_model_parallel_size" in str(exc), **tag, message=str(exc)[:300])
    else:
        record("shm_rejects_experts_outside_tp", False, **tag, message="no error raised")


def main() -> int:
    task, args = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    try:
        {"import": task_import, "layouts": task_layouts}[task](args)
    except Exception:  # noqa: BLE001  (recorded, printed, and the rank exits 1 so the launcher stops the others)
        record("worker_exception", False, traceback=traceback.format_exc()[-3000:])
        Path(args["out"], f"rank{rank}.json").write_text(json.dumps(RECORDS, indent=1))
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    Path(args["out"], f"rank{rank}.json").write_text(json.dumps(RECORDS, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
