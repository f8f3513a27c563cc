"""CLIP score: 100 x max(cos(image embedding, caption embedding), 0), from a CLIP folder the user provides.

    scorer = ClipScorer("weights/clip-vit-large-patch14")   # a transformers CLIPModel folder (local files only)
    scores = scorer(images, captions)                        # (N,) for images (N, 3, H, W) in [0, 1]

The usual weights are openai/clip-vit-large-patch14 (torchmetrics' default) or ViT-B/32; nothing is downloaded.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from evaluation.inception import WeightsError


class ClipScorer:
    """A CLIP model and its processor (resize, centre crop, normalise; tokenise to the text model's length)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        path = Path(path)
        if not (path / "config.json").is_file():
            raise WeightsError(f"CLIP folder {str(path)!r} has no config.json: pass a transformers CLIP folder, e.g. "
                               f"hf download openai/clip-vit-large-patch14 --local-dir {path}")
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().to(device)
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise WeightsError(f"cannot load CLIP from {str(path)!r}: {e}") from e
        self.device = torch.device(device)
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Scores (N,) in [0, 100] of images (N, 3, H, W) in [0, 1] against their captions."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        pixels = [(img.clamp(0, 1) * 255).round().to(torch.uint8) for img in images.cpu()]
        inputs = self.processor(text=list(captions), images=pixels, return_tensors="pt", padding=True,
                                truncation=True, max_length=self.max_tokens)
        image = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
        text = self.model.get_text_features(input_ids=inputs["input_ids"].to(self.device),
                                            attention_mask=inputs["attention_mask"].to(self.device))
        image, text = (getattr(v, "pooler_output", v) for v in (image, text))  # transformers 5 returns outputs
        return 100 * F.cosine_similarity(image.float(), text.float(), dim=-1).clamp(min=0).cpu()
