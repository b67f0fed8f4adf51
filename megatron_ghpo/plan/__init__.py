"""Scaling planner (``megatron-ghpo plan``): per-GPU memory and step time of GHPO/GRPO layouts.

Pure Python except :mod:`~megatron_ghpo.plan.measure` / :mod:`~megatron_ghpo.plan.check`, which build
the real policy (lazily) to check the predictions on CPU.

* ``shapes`` — HF config -> the parameters one (TP, PP, EP) rank holds, in Megatron's order;
* ``buffers`` — Megatron DDP buffers (padding, buckets) and optimizer state, exact;
* ``activations`` — the transient peak of one training step, walked event by event;
* ``timing`` — rollout decode / prefill, training FLOPs, refit and gradient-sync time;
* ``layouts`` — one layout's train- and rollout-phase memory, fit check, enumeration;
* ``cli`` — the ``plan`` subcommand (``add_plan_parser``, ``run_plan``).
"""
