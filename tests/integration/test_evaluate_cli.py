"""`sora eval` end to end on a tiny random export: metrics.json keys, the table, samples, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.evaluate.features import save_small_encoder
from sora_model.config import DiffusionConfig, PipelineConfig, SampleConfig, dit_preset
from sora_model.pipeline import TextToVideoPipeline
from sora_model.video import write_video

TOP_KEYS = {
    "version",
    "model",
    "prompts_file",
    "num_prompts",
    "num_seeds",
    "num_clips",
    "sampling",
    "attribute_accuracy",
    "temporal_consistency",
    "frame_change",
    "diversity",
    "fid",
    "fvd",
    "fvd_features",
    "clip_score",
    "clip_temporal_consistency",
    "per_prompt",
    "timing_s",
}
ACCURACY_KEYS = {"color", "shape", "direction", "all", "n"}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> str:
    config = PipelineConfig(
        model=dit_preset("DiT-tiny", text_dim=384),
        sample=SampleConfig(num_frames=4, height=16, width=16),
        diffusion=DiffusionConfig(num_sampling_steps=2),
    )
    return TextToVideoPipeline.from_config(config).save(str(tmp_path_factory.mktemp("export")))


@pytest.fixture
def prompts(tmp_path) -> str:
    rows = [
        {"prompt": "a red circle moving left"},
        {"prompt": "a blue square moving up", "held_out": True},
        {"prompt": "a cat playing the piano"},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_eval_writes_metrics_json_with_documented_keys(export, prompts, tmp_path, capsys):
    out = tmp_path / "m" / "metrics.json"
    rc = main(
        [
            "eval",
            "--model",
            export,
            "--prompts",
            prompts,
            "--out",
            str(out),
            "--seeds",
            "2",
            "--quiet",
            "--save-samples",
            str(tmp_path / "samples"),
        ]
    )
    assert rc == 0
    m = json.loads(out.read_text())
    assert TOP_KEYS <= set(m)
    assert m["num_prompts"] == 3 and m["num_seeds"] == 2 and m["num_clips"] == 6
    assert m["sampling"]["num_frames"] == 4 and m["sampling"]["steps"] == 2  # the export's defaults
    acc = m["attribute_accuracy"]
    assert set(acc) == {"overall", "seen", "held_out"}
    assert acc["overall"]["n"] == 4 and acc["seen"]["n"] == 2 and acc["held_out"]["n"] == 2  # grammar prompts x seeds
    assert all(ACCURACY_KEYS == set(a) for a in acc.values())
    assert -1.0 <= m["temporal_consistency"] <= 1.0 and m["diversity"] > 0  # random model, different seeds
    assert m["fid"] is None and m["clip_score"] is None
    assert [p["prompt"] for p in m["per_prompt"]][2] == "a cat playing the piano"
    assert m["per_prompt"][2]["attributes"] is None and m["per_prompt"][2]["clips"][0]["correct"] is None
    assert len(m["per_prompt"][0]["clips"]) == 2 and {"seed", "color", "shape", "direction", "confidence"} <= set(
        m["per_prompt"][0]["clips"][0]
    )
    printed = capsys.readouterr().out
    assert "attribute accuracy" in printed and "temporal_consistency" in printed and str(out) in printed
    assert (tmp_path / "samples" / "grid.gif").is_file() and len(list((tmp_path / "samples").glob("*.gif"))) == 7


def test_eval_fid_fvd_with_local_features_and_reference(export, tmp_path):
    ref = tmp_path / "ref"
    rng = np.random.default_rng(0)
    for i in range(3):  # different size and length from the generated clips: resized and cut
        write_video(str(ref / f"{i}.mp4"), rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    feats = save_small_encoder(str(tmp_path / "enc.safetensors"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a green triangle moving down\na white circle moving right\n")
    out = tmp_path / "metrics.json"
    rc = main(
        [
            "eval",
            "--model",
            export,
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--seeds",
            "1",
            "--quiet",
            "--features",
            feats,
            "--reference",
            str(ref),
        ]
    )
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["fid"] > 0 and m["fvd"] >= 0 and m["fvd_features"] == "video" and m["num_reference_clips"] == 3
    assert m["diversity"] is None  # one seed
    assert m["attribute_accuracy"]["seen"] is None and m["attribute_accuracy"]["overall"]["n"] == 2


def test_evaluate_export_python_api(export):
    from pipelines.evaluate.run import evaluate_export

    m = evaluate_export(export, ["a yellow square moving left"], seeds=2, progress=False, num_frames=2)
    assert m["sampling"]["num_frames"] == 2 and m["num_clips"] == 2 and m["attribute_accuracy"]["overall"]["n"] == 2


def test_evaluate_export_returns_the_clips_it_judged(export):
    from pipelines.evaluate import attributes as attr
    from pipelines.evaluate.run import evaluate_export

    prompts = ["a yellow square moving left", "a red circle moving up"]
    m, clips = evaluate_export(export, prompts, seeds=2, progress=False, num_frames=2, return_clips=True)
    assert clips.shape[:3] == (2, 2, 2) and clips.dtype == np.uint8
    for k, row in enumerate(m["per_prompt"]):  # the returned clips are the judged ones, in prompt x seed order
        for j, judged in enumerate(row["clips"]):
            assert attr.detect(clips[k, j]).attributes() == {
                key: judged[key] for key in ("color", "shape", "direction")
            }


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--features", "/no/such/feat.pt", "--reference", "/tmp"], "/no/such/feat.pt"),
        (["--clip", "/no/such/clip"], "/no/such/clip"),
        (["--features", "x.pt"], "--reference"),
    ],
)
def test_missing_local_files_are_one_line_errors_exit_2(export, prompts, tmp_path, capsys, extra, needle):
    rc = main(["eval", "--model", export, "--prompts", prompts, "--out", str(tmp_path / "m.json"), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and "\n" not in err
    assert not (tmp_path / "m.json").exists()


def test_missing_model_or_prompts_exit_2(export, prompts, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "none"), "--prompts", prompts, "--quiet"]) == 2
    assert "export folder not found" in capsys.readouterr().err
    assert main(["eval", "--model", export, "--prompts", str(tmp_path / "none.txt"), "--quiet"]) == 2
    assert "none.txt" in capsys.readouterr().err
