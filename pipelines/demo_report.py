"""The demo's results, written for a person: OUT/report/ holds

samples.png   rows = prompts, frames across; each row labelled with its prompt, "held out of training"
              where it was, and what the judge (the attribute detector of `sora eval`) read, in red
              where that differs from what was asked
samples.gif   the same clips animated, each under its label (samples.mp4: the same, as video)
samples.txt   the same rows as text: prompt, [held out], and what the judge read where it differs
report.md     the numbers, for a terminal or a repository
report.html   the page to open: the animated samples, the sheet, the loss curve, each stage's sample grid,
              the served clip and the results table

Beside them pipelines/demo.py puts loss.png, metrics.json (`sora eval`), served.mp4 and summary.json.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import numpy as np

SHOWCASE_SCALE = 4
"""Sample sheets are upscaled 4x (nearest) so 32-pixel clips can be seen."""


def showcase(
    frames: np.ndarray,
    prompts: list[str],
    held_out: list[bool],
    report: Path,
    judged: list[dict[str, str | None]] | None = None,
) -> dict[str, Any]:
    """samples.png (a row per prompt), samples.gif / .mp4 (animated tiles), samples.txt; labelled and judged.

    `judged`: what the judge already read from these clips ({color, shape, direction} each, as `sora eval`
    records them); judged here when not given."""
    from pipelines.sheets import judge, labelled_grid, labelled_sheet, verdict
    from sora_model.video import write_video

    judged = judge(frames) if judged is None else judged
    grid = labelled_grid(frames, prompts, held_out, judged, scale=SHOWCASE_SCALE)  # (T, H', W', 3)
    sheet = labelled_sheet(frames, prompts, held_out, judged, scale=SHOWCASE_SCALE)  # (H', W', 3)
    paths = {"gif": str(report / "samples.gif"), "mp4": str(report / "samples.mp4"), "png": str(report / "samples.png")}
    write_video(paths["gif"], grid, fps=4)
    # H.264 wants even sizes
    write_video(paths["mp4"], grid[:, : grid.shape[1] // 2 * 2, : grid.shape[2] // 2 * 2], fps=4)
    write_video(paths["png"], sheet[None], fps=1)
    rows = []
    for i, p in enumerate(prompts):
        v = verdict(p, judged[i])
        rows.append(
            {
                "prompt": p,
                "held_out": held_out[i],
                "judged": judged[i],
                "right": v is not None and v[0] == "judged: as asked",
            }
        )
    (report / "samples.txt").write_text(
        "\n".join(
            f"{i}: {r['prompt']}"
            + (" [held out]" if r["held_out"] else "")
            + (
                ""
                if r["right"]
                else f" (judged: {' '.join(str(r['judged'][k]) for k in ('color', 'shape', 'direction'))})"
            )
            for i, r in enumerate(rows)
        )
        + "\n"
    )
    return {**paths, "rows": rows}


def _acc_rows(acc: dict[str, Any]) -> list[tuple[str, dict | None]]:
    return [
        ("seen combinations", acc.get("seen")),
        ("held-out combinations", acc.get("held_out")),
        ("all", acc.get("overall")),
    ]


def _serve_line(summary: dict[str, Any]) -> str:
    s = summary.get("serve")
    if not s:
        return "skipped (--no-serve)"
    return (
        f"one request through Ray Serve: {s['status']} in {s['request_s']} s (app start {s['startup_s']} s), "
        f"{s['bytes']} bytes → `served.mp4`"
    )


def write_report(out: Path, summary: dict[str, Any]) -> Path:
    """OUT/report/report.md."""
    report = out / "report"
    acc = summary["eval"]["attribute_accuracy"]

    def row(name: str, a: dict | None) -> str:
        if not a:
            return f"| {name} | – | – | – | – | – |"
        return (
            f"| {name} | {a['color']:.0%} | {a['shape']:.0%} | {a['direction']:.0%} | **{a['all']:.0%}** | {a['n']} |"
        )

    train, synth = summary["train"], summary["synth"]
    lines = [
        "# sora demo report",
        "",
        f"Run on {time.strftime('%Y-%m-%d %H:%M')} with `{summary['command']}`; total {summary['seconds'] / 60:.1f} "
        "min. Open `report.html` for the animated samples.",
        "",
        "## Data",
        f"- {synth['videos']} synthetic videos ({synth['frames']} frames, 32x32); held out of training: "
        + ", ".join(f"`{c}`" for c in synth["held_out"]),
        *(f"- bucket `{b}`: {n} clips" for b, n in summary["prepare"].items()),
        "",
        "## Training",
        f"- recipe `{summary['recipe']}` ({train['steps']} steps over {len(train['stages'])} stages: "
        + ", ".join(train["stages"])
        + f"), {summary.get('workers', 2)} workers, DeepSpeed ZeRO-3, seed {summary.get('seed', 0)}; "
        f"{train['seconds'] / 60:.1f} min",
        f"- final loss {train['final_loss']:.4f} (first logged {train['first_loss']:.4f}); curve: `loss.png`",
        "",
        "## Prompt following (judged by `sora eval`'s attribute detector)",
        "",
        "| prompts | colour | shape | direction | all three | clips |",
        "| --- | --- | --- | --- | --- | --- |",
        *(row(name, a) for name, a in _acc_rows(acc)),
        "",
        "Targets: all three right on ≥ 80% of seen and ≥ 60% of held-out clips. Temporal consistency "
        f"{summary['eval']['temporal_consistency']:.3f}, diversity across seeds {summary['eval']['diversity']:.3f}.",
        "",
        "## Samples",
        "`samples.gif` / `samples.mp4` (animated), `samples.png` (rows = prompts, columns = frames). Each clip is "
        "labelled with its prompt, *held out of training* where it was, and what the judge read: red where it "
        "differs.",
        "",
        "![samples](samples.png)",
        "",
        "## Serving",
        _serve_line(summary),
        "",
        "## Files",
        f'- export: `{summary["export"]}` (try `sora generate --model {summary["export"]} --prompt "a red circle '
        'moving left" --out clip.gif`)',
        f"- run folder: `{out / 'run'}` (metrics.csv, tensorboard/, samples/)",
        f"- log: `{summary.get('log') or '-'}` (what Ray, DeepSpeed and torch printed)",
        "- metrics: `metrics.json`",
    ]
    path = report / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


PAGE_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } .muted { color: #666; }
table { border-collapse: collapse; margin: 0.5em 0; } \
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; } td.all { font-weight: bold; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; background: #181818; }
.stages { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; }
.legend span { padding: 0 6px; } .held { color: #c07800; } .wrong { color: #d22; } .right { color: #2a2; }
"""

# Sets data-images="loaded" (or "broken: NAME ...") on <body> once every image has loaded or failed; the test
# that renders this page in headless Chromium reads it from the DOM.
IMAGE_CHECK = """
function sora_check() {
  const imgs = Array.from(document.images);
  if (!imgs.every(i => i.complete)) { setTimeout(sora_check, 50); return; }
  const broken = imgs.filter(i => !(i.naturalWidth > 0)).map(i => i.getAttribute('src'));
  document.body.dataset.images = broken.length ? 'broken: ' + broken.join(' ') : 'loaded';
  document.body.dataset.imageCount = String(imgs.length);
}
window.addEventListener('load', sora_check);
"""


def write_html(out: Path, summary: dict[str, Any]) -> Path:
    """OUT/report/report.html: the page a person opens (images by relative path, beside it)."""
    report = out / "report"
    acc = summary["eval"]["attribute_accuracy"]
    train, e = summary["train"], html.escape
    rows = (summary.get("samples") or {}).get("rows") or []
    wrong = [r for r in rows if not r["right"]]
    loss, stage_grids = _training_figures(out)
    served = (
        "<p><video src='served.mp4' controls loop muted width='256'></video></p>"
        if (report / "served.mp4").is_file()
        else ""
    )
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sora demo report</title><style>{PAGE_STYLE}</style></head>
<body data-images="pending">
<h1>sora demo report</h1>
<p class="muted">{e(time.strftime("%Y-%m-%d %H:%M"))} · <code>{e(summary["command"])}</code> · \
{summary["seconds"] / 60:.1f} min</p>
<h2>Prompt following</h2>
<p>Judged by <code>sora eval</code>'s attribute detector over {summary["eval"].get("num_clips", "")} clips.
Targets: all three right on ≥ 80% of seen and ≥ 60% of held-out clips.</p>
<table><tr><th>prompts</th><th>colour</th><th>shape</th><th>direction</th><th>all three</th><th>clips</th></tr>
{"".join(_accuracy_row(n, a) for n, a in _acc_rows(acc))}
</table>
<p class="muted">Temporal consistency {summary["eval"]["temporal_consistency"]:.3f}, \
diversity across seeds {summary["eval"]["diversity"]:.3f}.</p>
<h2>Samples</h2>
<p class="legend">Each clip under its prompt: <span class="held">held out of training</span>
<span class="right">judged: as asked</span> <span class="wrong">judged: what the detector read instead</span>
({len(wrong)} of {len(rows)} shown here read wrong).</p>
<p><img src="samples.gif" alt="animated samples, each under its prompt"></p>
<p><img src="samples.png" alt="samples: a row per prompt, frames left to right"></p>
<h2>Training</h2>
<p>{train["steps"]} steps: {e(", ".join(train["stages"]))}; {train["seconds"] / 60:.1f} min.
Final loss {train["final_loss"]:.4f} (first logged {train["first_loss"]:.4f}).</p>
<p>{loss}</p>
<div class="stages">{stage_grids}</div>
<h2>Serving</h2>
<p>{e(_serve_line(summary))}</p>{served}
<h2>Files</h2>
<ul><li>export: <code>{e(summary["export"])}</code></li><li>numbers: <a href="report.md">report.md</a>,
<a href="metrics.json">metrics.json</a></li><li>log: <code>{e(str(summary.get("log") or "-"))}</code></li></ul>
<script>{IMAGE_CHECK}</script>
</body></html>
"""
    path = report / "report.html"
    path.write_text(body)
    return path


def _accuracy_row(name: str, a: dict | None) -> str:
    """One row of the page's prompt-following table; a dash in every cell where the group has no clips."""
    e = html.escape
    if not a:
        return f"<tr><td>{e(name)}</td>" + "<td>–</td>" * 5 + "</tr>"
    return (
        f"<tr><td>{e(name)}</td><td>{a['color']:.0%}</td><td>{a['shape']:.0%}</td><td>{a['direction']:.0%}</td>"
        f"<td class='all'>{a['all']:.0%}</td><td>{a['n']}</td></tr>"
    )


def _training_figures(out: Path) -> tuple[str, str]:
    """The loss curve (or a note that there is none) and one figure per stage's sample grid, as HTML."""
    e = html.escape
    loss = (
        "<img src='loss.png' alt='training loss by step'>"
        if (out / "report" / "loss.png").is_file()
        else "<p class='muted'>no loss curve</p>"
    )
    stage_grids = "".join(
        f"<figure><img src='../run/samples/{e(g.name)}' alt='samples at the end of stage {e(g.stem)}'>"
        f"<figcaption>end of stage <code>{e(g.stem)}</code></figcaption></figure>"
        for g in sorted((out / "run" / "samples").glob("*.gif"))
    )
    return loss, stage_grids
