"""`sora eval`: attribute accuracy on the synthetic grammar, temporal consistency, diversity, FID/FVD, CLIP score.

The entry point for code is `pipelines.evaluate.run.evaluate_export(export_dir, prompts, ...)`; the
detector is `pipelines.evaluate.attributes.detect(clip)`. Kept import-free so `sora --help` stays fast.
"""
