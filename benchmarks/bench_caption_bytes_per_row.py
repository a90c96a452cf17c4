"""Caption bytes per prepared row at Wan size: tokens stored at their true length ÷ padded to the encoder's maximum.

What is compared: the caption-token column of one batch of rows, umT5-XXL's shapes (Wan2.1: max length 512,
width 4096, fp16 as `sora data prepare` stores them), two ways:
- true length (format 2): `captions.ragged_tokens`, each caption's tokens up to its last real one, what the
  caption stage now writes;
- padded (format 1): every caption padded to 512 x 4096 with zeros, what it wrote before.
The figure is the Arrow bytes (what Ray Data blocks carry through the object store between stages, and what
a reader holds) per row, true length ÷ padded. The Parquet bytes (zstd, the shards on disk) are in the details:
zstd squeezes the padding's zeros, so on disk the gap is smaller.

Real lengths: the captions below are tokenized by the packaged MiniLM tokenizer (WordPiece; umT5's SentencePiece
gives counts within ~20% on English prose; no umT5 tokenizer ships offline), plus the end-of-sequence token. They
are a mix of short retrieval-style captions (MSR-VTT, WebVid) and long Wan/Open-Sora-style recaptions. Token
values are random fp16 (embeddings do not compress), zeros at padding, as the encoder returns them.
"""

from __future__ import annotations

import io
import sys

import numpy as np

from benchmarks.common import main

FIGURE = "caption_bytes_per_row"
GOAL = ("<=", 0.2)
MAX_LENGTH, WIDTH = 512, 4096
CAPTIONS = (
    "a man is playing a guitar on stage",
    "a dog runs across a grassy field toward the camera",
    "aerial view of a city at night with traffic on the highway",
    "a woman slices vegetables in a kitchen",
    "two children ride bicycles down a quiet suburban street in autumn",
    "close-up of raindrops falling on a window, the city lights blurred behind it",
    "A golden retriever sprints along a sandy beach at sunset, kicking up sprays of wet sand. Waves roll in gently "
    "behind it, and the low sun casts long shadows. The camera tracks the dog from the side at a low angle, keeping "
    "it centred in the frame as it runs.",
    "A young woman in a red coat walks through a crowded night market in Taipei. Neon signs in Chinese characters "
    "glow above food stalls, steam rises from bowls of noodles, and people move around her in soft focus. The shot "
    "is handheld, following her from behind, then she turns and smiles toward the camera.",
    "Time-lapse of storm clouds gathering over a wheat field. The clouds darken and churn, lightning flickers on the "
    "horizon, and the wheat sways in waves under the rising wind. Wide shot, static camera, cinematic colour grade.",
    "An elderly man sits on a park bench feeding pigeons. He tosses crumbs from a paper bag while the birds gather at "
    "his feet. Autumn leaves drift down around him. Medium shot, shallow depth of field, warm afternoon light, the "
    "camera slowly pushes in toward his face as he laughs.",
    "Macro shot of a bee landing on a purple lavender flower, its wings beating rapidly, pollen on its legs. The "
    "background is a soft green blur. Natural light, slow motion.",
    "A red sports car drifts around a mountain hairpin bend on a wet road, tyres smoking, water spraying from the "
    "wheels. Pine forests and mist cover the slopes. The drone camera circles the car from above as it exits the "
    "turn and accelerates up the road into the fog, its tail lights fading.",
)
ROWS = 48


def _rows(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R, L, D) fp16 tokens, zeros after each caption's length, and the (R, L) mask."""
    rng = np.random.default_rng(0)
    mask = np.arange(MAX_LENGTH)[None, :] < lengths[:, None]  # (R, L)
    tokens = np.zeros((len(lengths), MAX_LENGTH, WIDTH), np.float16)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.standard_normal((n, WIDTH), dtype=np.float32).astype(np.float16)
    return tokens, mask


def _parquet_bytes(column: object) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.data.prepare.options import PARQUET_COMPRESSION

    buf = io.BytesIO()
    pq.write_table(pa.table({"text_tokens": column}), buf, compression=PARQUET_COMPRESSION)
    return buf.getbuffer().nbytes


def run(quick: bool) -> dict:
    import pyarrow as pa
    from transformers import AutoTokenizer

    from pipelines.data.load import _column_to_numpy
    from pipelines.data.prepare.captions import ragged_tokens, true_lengths
    from pipelines.data.prepare.encode import _fixed_list
    from sora_model.text import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    counts = [min(MAX_LENGTH, len(ids)) for ids in tokenizer(list(CAPTIONS), truncation=False)["input_ids"]]
    rows = (ROWS // 4) if quick else ROWS
    lengths = np.resize(np.asarray(counts, np.int64), rows)
    tokens, mask = _rows(lengths)
    assert (true_lengths(mask) == lengths).all()
    ragged = ragged_tokens(tokens, true_lengths(mask), np.arange(rows))
    padded = _fixed_list(tokens, pa.float16())
    # What a reader gets back is the padded array, exactly.
    assert np.array_equal(_column_to_numpy(ragged, MAX_LENGTH), tokens)
    arrow = {"true_length": ragged.nbytes / rows, "padded": padded.nbytes / rows}
    disk = {"true_length": _parquet_bytes(ragged) / rows, "padded": _parquet_bytes(padded) / rows}
    return {
        "value": round(arrow["true_length"] / arrow["padded"], 4),
        "compared": (
            "Arrow bytes per row of the caption tokens, stored at their true length ÷ padded to "
            f"{MAX_LENGTH}x{WIDTH} fp16 (umT5-XXL / Wan2.1 shapes), {rows} rows of {len(CAPTIONS)} real captions' "
            f"lengths ({min(counts)}-{max(counts)} tokens, mean {np.mean(counts):.0f})"
        ),
        "details": {
            "arrow_bytes_per_row": {k: round(v) for k, v in arrow.items()},
            "parquet_zstd_bytes_per_row": {k: round(v) for k, v in disk.items()},
            "parquet_ratio": round(disk["true_length"] / disk["padded"], 4),
            "caption_tokens": counts,
            "tokenizer": "packaged MiniLM WordPiece (+ [CLS]/[SEP]); umT5 not available offline",
        },
    }


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
