"""Peak host memory of loading a Wan2.1-1.3B-shaped export in bf16, over the bf16 bytes of its weights.

What is measured: the benchmark writes a random export at the Wan2.1-T2V-1.3B shape (width 1536, 30 blocks, FFN
8960, umT5 width 4096: 1.42 B parameters) as `sora convert` and training exports hold it, fp32 safetensors, tensor by
tensor (the writer never holds the model). A fresh subprocess then imports the library, resets its peak RSS
(/proc/self/clear_refs 5; VmHWM), reads its RSS, loads the DiT the way `TextToVideoPipeline.load(...,
precision="bf16")` does (`dit_load.load_dit`: meta-device build, each tensor read, cast and assigned), and reads
VmHWM again. The figure is (peak - RSS before) / (bf16 bytes of the loaded weights: fp32 for the `FP32_MODULES`
conditioning path, which is what the model holds). The ideal is 1.0 (the bf16 model itself); what the loader holds
on top (one fp32 tensor at a time, allocator slack) is the excess.

Compared: the loader before issue 29 (an fp32 DiT with its random init, `safetensors.torch.load_file` of the whole
file, `load_state_dict`, then the cast), measured the same way at 6 of the 30 blocks (the full shape would need
~11 GB on a shared 2-core machine; the ratio does not depend on depth), with the new loader at the same 6 blocks
beside it.

Why fair: the same file and the same measurement in fresh processes; memory is counted, not timed, so load from
other processes does not move it, and `--quick` changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from benchmarks.common import main

FIGURE = "load_peak_rss_over_bf16_bytes"
GOAL = ("<=", 1.3)

CHILD = r"""
import json, os, sys, torch
from sora_model.dit_load import load_dit
from sora_model.export_io import MODEL_FILE, load_export_config
from sora_model.dit import DiT

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024

export, path = sys.argv[1], sys.argv[2]
config = load_export_config(export)
weights = os.path.join(export, MODEL_FILE)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
before = status("VmRSS")
if path == "meta":
    model = load_dit(config, weights, dtype=torch.bfloat16)
else:  # the loader before issue 29
    from safetensors.torch import load_file
    model = DiT(config.model)
    model.load_state_dict(load_file(weights))
    model.to_inference_dtype(torch.bfloat16)
peak = status("VmHWM")
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"rss_before": before, "peak": peak, "model_bytes": nbytes}))
"""


def _write_export(folder: str, depth: int) -> int:
    """A random fp32 export of the Wan2.1-1.3B shape with `depth` blocks; returns the parameter count."""
    import torch

    from sora_model.config import PipelineConfig, dit_preset, to_dict
    from sora_model.dit import DiT
    from sora_model.export_io import CONFIG_FILE, EXPORT_FORMAT_VERSION, MODEL_FILE
    from sora_model.weights_io import write_tensors

    cfg = dit_preset("Wan2.1-T2V-1.3B", depth=depth)
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), torch.float32) for k, v in DiT(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = ((k, torch.randn(shape, generator=g).mul_(0.02)) for k, (shape, _) in shapes.items())
    os.makedirs(folder, exist_ok=True)
    write_tensors(os.path.join(folder, MODEL_FILE), shapes, tensors)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump({"format_version": EXPORT_FORMAT_VERSION, **to_dict(PipelineConfig(model=cfg))}, f)
    return sum(int(torch.Size(s).numel()) for s, _ in shapes.values())


def _measure(folder: str, path: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, folder, path],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["ratio"] = round((r["peak"] - r["rss_before"]) / r["model_bytes"], 4)
    return r


def run(quick: bool) -> dict:
    del quick  # memory is counted, not timed: one size
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        full, short = os.path.join(tmp, "wan13b"), os.path.join(tmp, "wan13b-6")
        n_full = _write_export(full, 30)
        new = _measure(full, "meta")
        os.remove(os.path.join(full, "model.safetensors"))  # disk back before the second export
        n_short = _write_export(short, 6)
        new_short, old_short = _measure(short, "meta"), _measure(short, "eager")
    return {
        "value": new["ratio"],
        "compared": (
            f"peak RSS increase of loading a Wan2.1-1.3B-shaped fp32 export ({n_full:,} parameters) in bf16, in a "
            f"fresh process, over the loaded weights' bytes; the loader before issue 29: {old_short['ratio']} (at 6 "
            f"of 30 blocks, the new one {new_short['ratio']} there)"
        ),
        "details": {
            "meta_load_1_3b": new,
            "meta_load_6_blocks": new_short,
            "eager_load_6_blocks_before_issue_29": old_short,
            "parameters_6_blocks": n_short,
            "file_dtype": "fp32",
            "ideal": 1.0,
        },
    }


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
