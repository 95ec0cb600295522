"""--reward pickscore: PickScore (Kirstain et al. 2023, arXiv 2305.01569), a CLIP ViT-H/14
fine-tuned on Pick-a-Pic's human preferences, scored as its authors' code scores it (the model
card of yuvalkirstain/PickScore_v1): the image and the prompt through CLIP-H's processor, their
embeddings' cosine times exp(logit_scale).

Flow-GRPO (flow_grpo/pickscore_scorer.py) divides it by 26: a constant scale, which DDPO's
advantages, normalised per prompt, do not see; RWR's weights exp(beta r) do (--beta / 26 weighs as
that scale would).
"""

from transformers import AutoProcessor, CLIPModel

from machinery.hub import pretrained
from machinery.learned_rewards.clipscore import similarity


def load(pickscore_model, pickscore_processor, device="cpu"):
    """The reward on --pickscore-model, its images and prompts through --pickscore-processor."""
    model = pretrained(CLIPModel, pickscore_model, "--pickscore-model")
    processor = pretrained(AutoProcessor, pickscore_processor, "--pickscore-processor")
    return similarity(model.to(device).eval(), processor, device)
