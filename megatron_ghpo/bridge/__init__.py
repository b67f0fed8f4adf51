"""Weight bridge: Megatron-Core (any TP x PP x VPP) <-> Hugging Face names and layouts.

One declarative table per architecture (:mod:`~megatron_ghpo.bridge.mapping`) and one set of
layout views (:mod:`~megatron_ghpo.bridge.layout`) drive every direction:

* live export to the rollout engine after each optimizer step —
  :func:`megatron_ghpo.bridge.export.export_hf_weights` (and ``export_hf_weight_buckets``);
* HF safetensors into a live sharded model — :func:`megatron_ghpo.bridge.hf_load.load_hf_weights`;
* offline conversion — :func:`megatron_ghpo.bridge.checkpoint.hf_to_megatron`, and the
  ``megatron-ghpo convert hf-to-megatron | megatron-to-hf | verify`` commands
  (:func:`megatron_ghpo.bridge.cli.add_convert_parser`).

Submodules import ``megatron.core`` lazily; importing this package is cheap.
"""
