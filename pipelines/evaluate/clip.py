"""CLIP score from a local CLIP checkpoint folder (`save_pretrained` of a transformers CLIPModel and its processor).

CLIP score = 100 * max(cos(image embedding, text embedding), 0), averaged over a clip's frames and
then over clips (the torchmetrics / Hessel et al. definition without the 2.5 rescale). Also gives
CLIP-space temporal consistency: the mean cosine similarity of consecutive frames' image embeddings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

SCALE = 100.0
"""The customary CLIP-score scale: a cosine of 0.3 reads as 30."""
BATCH = 64


class ClipScorer:
    def __init__(self, path: str, device: str = "cpu", option: str = "--clip"):
        path = str(path)
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"CLIP checkpoint not found: {path} ({option} takes a local folder written by "
                "CLIPModel.save_pretrained and CLIPProcessor.save_pretrained: config.json, weights, tokenizer and "
                "preprocessor files)"
            )
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().to(device)
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"{option} {path} is not a usable CLIP checkpoint: {str(err).splitlines()[0]}") from None
        self.device = torch.device(device)
        self.path = path

    @torch.no_grad()
    def _image_embeds(self, frames: np.ndarray) -> torch.Tensor:
        outs = []
        for i in range(0, len(frames), BATCH):
            inputs = self.processor(images=list(frames[i : i + BATCH]), return_tensors="pt")
            out = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
            outs.append(torch.nn.functional.normalize(_tensor(out), dim=-1))
        return torch.cat(outs)  # (N, D)

    @torch.no_grad()
    def _text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        out = self.model.get_text_features(
            input_ids=inputs["input_ids"].to(self.device), attention_mask=inputs["attention_mask"].to(self.device)
        )
        return torch.nn.functional.normalize(_tensor(out), dim=-1)  # (B, D)

    def score(self, clips: np.ndarray, prompts: Sequence[str]) -> tuple[list[float], list[float]]:
        """Per clip: (CLIP score, CLIP temporal consistency) for (B, T, H, W, 3) uint8 clips and their prompts."""
        clips = np.asarray(clips)
        b, t = clips.shape[:2]
        img = self._image_embeds(clips.reshape(b * t, *clips.shape[2:])).view(b, t, -1)  # (B, T, D)
        txt = self._text_embeds(prompts)  # (B, D)
        cos = torch.einsum("btd,bd->bt", img, txt).clamp(min=0)  # (B, T)
        scores = (SCALE * cos.mean(dim=1)).tolist()
        if t > 1:
            consistency = (img[:, 1:] * img[:, :-1]).sum(-1).mean(dim=1).tolist()  # (B,)
        else:
            consistency = [1.0] * b
        return [float(s) for s in scores], [float(c) for c in consistency]


def _tensor(out) -> torch.Tensor:
    """transformers 5 may return a model output object from get_*_features; take its pooled embedding."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out[0]
