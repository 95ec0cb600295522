"""Rewards r(x_0, c): functions of a batch of images in [0, 1], shape (B, 3, H, W), and their
prompts, returning one float per image as a tensor of shape (B,), or, for a pixel-wise reward, a
map (B, H, W) whose mean over the pixels is the image's reward (`scalar`), so that every algorithm
can use it and PXPO can use the map itself.

The names that `train.py --reward` accepts are declared in machinery/reward_specs.py, one line a
reward. The paper's two learned rewards (sections 5.2 and 5.3) need models: `aesthetic` and
`alignment` build a reward function around them, given the models (machinery/reward_loading.py
loads them, once a run).

Your own reward (`--reward FILE.py:NAME` or `module:NAME`, or `train.main(argv, reward_fn=fn)`) is
a function NAME(images, prompts): images a float tensor (B, 3, H, W) in [0, 1] on the training
device, prompts a list of B strings. It returns B scores, higher is better (a tensor, a numpy array
or a list), or a (B, H, W) map for a pixel-wise reward. examples/brightness.py is one.
"""

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import toy_world

AESTHETIC_HEAD = Path(__file__).parent / "data" / "sac+logos+ava1-l14-linearMSE.pth"
# the paper's question (section 5.3); the public PyTorch port prefixes it with "Answer concisely: "
QUESTION = "What is going on in this image?"


def to_pil(images):
    """(B, 3, H, W) floats in [0, 1] -> list of 8-bit RGB PIL images."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in array.permute(0, 2, 3, 1).cpu().numpy()]


def jpeg_kilobytes(images):
    """Size of each image saved as JPEG, in kB (bytes / 1000) (paper, section 5.1; quality 95, as
    the public code saves it)."""
    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(np.array(sizes), dtype=torch.float32)


def jpeg_compressibility(images, prompts):
    """Minus the JPEG size: smaller files score higher."""
    return -jpeg_kilobytes(images)


def jpeg_incompressibility(images, prompts):
    """Plus the JPEG size: larger files score higher."""
    return jpeg_kilobytes(images)


def pixel_color(images, prompts, target=(1.0, 1.0, 1.0)):
    """Per-pixel closeness to a target RGB colour in [0, 1]: 1 - distance / sqrt(3), a map (B, H, W)
    in [0, 1] (1 where a pixel is the colour). Its scalar form is the mean closeness."""
    target = torch.as_tensor(target, dtype=torch.float32, device=images.device)[:, None, None]
    return 1 - (images.float() - target).norm(dim=1) / 3**0.5


def pixel_background(images, prompts, target=(1.0, 1.0, 1.0)):
    """A pixel-wise reward for the toy world whose map differs inside each image by construction:
    the pixels that show the prompt's colour (the shape, as toy_world.judge sees it) score their
    closeness to that colour, every other pixel (the background) its closeness to the target, each
    as 1 - distance / sqrt(3) in [0, 1]. It asks to recolour the background and keep the shape:
    credit that a scalar reward spreads over the whole image belongs to its background."""
    distance_to_prompt = toy_world.colour_distance(images, prompts)
    on_shape = distance_to_prompt < toy_world.MATCH_DISTANCE
    return torch.where(
        on_shape, 1 - distance_to_prompt / 3**0.5, pixel_color(images, prompts, target)
    )


def clip_preprocess(images, processor):
    """CLIP's own preprocessing, on tensors on their device: the shortest side resized (bicubic,
    antialiased) to the processor's size, a centre crop, then its mean and std."""
    height, width = images.shape[-2:]
    scale = processor.size["shortest_edge"] / min(height, width)
    resized = F.interpolate(
        images.float(),
        size=(int(height * scale), int(width * scale)),
        mode="bicubic",
        antialias=True,
    )
    crop_h, crop_w = processor.crop_size["height"], processor.crop_size["width"]
    top, left = (resized.shape[-2] - crop_h) // 2, (resized.shape[-1] - crop_w) // 2
    cropped = resized[..., top : top + crop_h, left : left + crop_w].clamp(0, 1)
    mean, std = (
        torch.tensor(v, device=images.device)[:, None, None]
        for v in (processor.image_mean, processor.image_std)
    )
    return (cropped - mean) / std


def aesthetic_head(path=AESTHETIC_HEAD):
    """LAION's improved aesthetic predictor: an MLP 768-1024-128-64-16-1 with dropouts 0.2, 0.2,
    0.1 and no activations, its weights from the shipped state dict."""
    head = torch.nn.Sequential(
        torch.nn.Linear(768, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )
    state = torch.load(path, map_location="cpu", weights_only=True)
    head.load_state_dict({key.removeprefix("layers."): value for key, value in state.items()})
    return head.eval()


def aesthetic(clip, processor, head=None, device="cpu", batch_size=32):
    """The LAION aesthetic score (paper, section 5.2): CLIP's image embedding, L2-normalised, into
    the aesthetic head; roughly 1 to 10. clip: a CLIPVisionModelWithProjection, processor: its
    image processor."""
    head = (head or aesthetic_head()).to(device)

    @torch.no_grad()
    def score(images, prompts):
        scores = []
        for batch in images.split(batch_size):
            embeds = clip(pixel_values=clip_preprocess(batch.to(device), processor)).image_embeds
            scores.append(head(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(1))
        return torch.cat(scores).float()

    return score


def bertscore_recall(candidate_embeds, candidate_mask, reference_embeds, reference_weight):
    """BERTScore recall (Zhang et al. 2020): each reference token is matched with its most similar
    candidate token (cosine similarity), and the matches are averaged, weighted by
    reference_weight (1 for words, 0 for [CLS], [SEP] and padding). Embeddings (B, L, D); the
    candidate mask (B, L) marks its real tokens, special ones included, as bert_score does."""
    candidate = F.normalize(candidate_embeds.float(), dim=-1) * candidate_mask[..., None]
    reference = F.normalize(reference_embeds.float(), dim=-1)
    best = torch.einsum("brd,bcd->brc", reference, candidate).max(dim=2).values
    return (best * reference_weight).sum(dim=1) / reference_weight.sum(dim=1)


def bert_embeddings(texts, tokenizer, model, layer, device):
    """Token embeddings of one hidden layer (0 = the embedding layer), the tokens' mask, and each
    token's weight in the score (0 for special tokens and padding)."""
    tokens = tokenizer(
        texts, padding=True, truncation=True, return_tensors="pt", return_special_tokens_mask=True
    ).to(device)
    special = tokens.pop("special_tokens_mask")
    hidden = model(**tokens, output_hidden_states=True).hidden_states[layer]
    mask = tokens["attention_mask"].float()
    return hidden, mask, mask * (1 - special.float())


def alignment(
    vlm, processor, tokenizer, scorer, scorer_layer, device="cpu", batch_size=8, max_new_tokens=64
):
    """Prompt alignment (paper, section 5.3): a vision-language model (vlm, its processor) answers
    QUESTION about each image; the reward is the BERTScore recall of its answer against "The image
    contains <prompt>", from the scorer's (a BERT and its tokenizer) hidden layer scorer_layer."""
    dtype = vlm.dtype
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    question = processor.apply_chat_template(chat, add_generation_prompt=True)

    @torch.no_grad()
    def score(images, prompts):
        answers = []
        for batch in images.split(batch_size):
            inputs = processor(
                images=to_pil(batch),
                text=[question] * len(batch),
                return_tensors="pt",
                padding=True,
            ).to(device, dtype)
            output = vlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            answers += processor.batch_decode(
                output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
        score.answers = [answer.strip() for answer in answers]  # what the VLM said, for a look
        references = [f"The image contains {prompt}" for prompt in prompts]
        recalls = []
        for start in range(0, len(answers), batch_size):
            candidate, candidate_mask, _ = bert_embeddings(
                score.answers[start : start + batch_size], tokenizer, scorer, scorer_layer, device
            )
            reference, _, reference_weight = bert_embeddings(
                references[start : start + batch_size], tokenizer, scorer, scorer_layer, device
            )
            recalls.append(bertscore_recall(candidate, candidate_mask, reference, reference_weight))
        return torch.cat(recalls).float()

    return score
