"""LoRA adapters on the DiT: which projections they target, and merging an adapter folder into the weights.

An adapter folder is what peft's `save_pretrained` writes: `adapter_config.json` and `adapter_model.safetensors`.
"""

from __future__ import annotations

LORA_TARGET_MODULES = r"blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q|kv|proj)|mlp\.(0|2))"
"""peft `target_modules` (a regex on module names) for every block's attention projections (self: fused q/k/v
and output; cross: q, fused k/v and output) and MLP projections: where LoRA fine-tuning of video DiTs puts
adapters (diffusers' and DiffSynth's Wan recipes target the same projections)."""
