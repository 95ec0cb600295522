"""--reward clipscore: how well the image matches its prompt by CLIP ViT-L/14, as DDPO's successors
score it (Flow-GRPO's flow_grpo/clip_scorer.py, and the forks that keep it): CLIP's logit,
exp(logit_scale) times the cosine of the image's and the prompt's embeddings, over 30. With
ViT-L/14's logit scale of 100 that is 10/3 of the cosine.

(Hessel et al.'s CLIPScore, 2.5 max(cos, 0), is the same cosine, scaled otherwise and clipped at
0; DDPO's advantages, normalised per prompt, make any positive scale alike to the policy, RWR's
weights exp(beta r) do not.)
"""

import torch
from transformers import AutoProcessor, CLIPModel

from machinery.hub import pretrained
from rewards import to_pil


def similarity(model, processor, device="cpu", batch_size=32, scale=1.0):
    """scale x exp(logit_scale) x cos(image embedding, prompt embedding) of a CLIPModel, each image
    and prompt through the model's own processor (the images as 8-bit pictures, as its authors
    feed them)."""

    @torch.no_grad()
    def score(images, prompts):
        scores = []
        for start in range(0, len(prompts), batch_size):
            inputs = processor(
                images=to_pil(images[start : start + batch_size]),
                text=prompts[start : start + batch_size],
                padding=True,
                truncation=True,
                return_tensors="pt",
            ).to(device)
            scores.append(model(**inputs).logits_per_image.diagonal() * scale)
        return torch.cat(scores).float()

    return score


def load(clipscore_model, device="cpu"):
    """The reward on the CLIP model of --clipscore-model (a hub id or a folder)."""
    processor = pretrained(AutoProcessor, clipscore_model, "--clipscore-model")
    model = pretrained(CLIPModel, clipscore_model, "--clipscore-model")
    return similarity(model.to(device).eval(), processor, device, scale=1 / 30)
