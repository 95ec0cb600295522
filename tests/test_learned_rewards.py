"""The paper's learned rewards (sections 5.2 and 5.3) on tiny random-weight models built from configs: LAION's
aesthetic score on CLIP embeddings, and the VLM + BERTScore prompt alignment. No downloads."""

import huggingface_hub
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

import train
from machinery.learned_rewards import clipscore, pickscore
from machinery.reward_loading import aesthetic_reward as aesthetic
from machinery.reward_loading import alignment_reward as alignment
from toy_world.pretrain import clip_config, make_tokenizer
from rewards import AESTHETIC_HEAD, aesthetic_head, bertscore_recall, clip_preprocess, to_pil

WORDS = "the image contains a an cat dog riding bike what is going on in this ? user assistant : . , red blue".split()
CHAT = (
    "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def tiny_clip(path, seed=0, projection_scale=1.0):
    torch.manual_seed(seed)
    clip = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=768,
        )
    )
    clip.visual_projection.weight.data *= projection_scale
    clip.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(path)
    return path


def tiny_llava(path):
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", "<image>", *WORDS])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )
    processor = LlavaProcessor(
        CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=CHAT,
        num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    text = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=4,
            vision_feature_select_strategy="default",
        )
    ).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_bert(path):
    (path / "vocab.txt").parent.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])
    )
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(WORDS) + 5,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).save_pretrained(path)
    return path


def test_clip_preprocessing_on_tensors_matches_clips_own_processor():
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    y, x = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 64), indexing="ij")
    images = torch.stack(
        [torch.stack([x, y, x * y]), torch.stack([1 - x, y**2, 0.5 + 0 * x])]
    )  # smooth, 48 x 64
    images = (images * 255).round() / 255  # 8-bit, as the processor's PIL input is
    ours = clip_preprocess(images, processor)
    theirs = processor(images=to_pil(images), return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    error = (ours - theirs).abs()
    assert error.mean() < 0.01 and error.max() < 0.1, (
        error.mean(),
        error.max(),
    )  # PIL's bicubic filter and torch's differ slightly


def test_aesthetic_head_loads_the_shipped_weights_and_is_affine():
    head = aesthetic_head()
    state = torch.load(AESTHETIC_HEAD, map_location="cpu", weights_only=True)
    torch.testing.assert_close(head[0].weight, state["layers.0.weight"])
    torch.testing.assert_close(head[7].bias, state["layers.7.bias"])
    x, y = torch.randn(4, 768), torch.randn(4, 768)
    with torch.no_grad():  # eval mode: no dropout, and no activations, so the head is affine
        torch.testing.assert_close(
            head(0.3 * x + 0.7 * y), 0.3 * head(x) + 0.7 * head(y), atol=1e-5, rtol=1e-4
        )


def test_aesthetic_scores_normalised_embeddings_in_batches(tmp_path):
    images = torch.rand(5, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    score = aesthetic(tiny_clip(tmp_path / "clip"), batch_size=2)
    scores = score(images, ["a cat"] * 5)
    assert scores.shape == (5,) and torch.isfinite(scores).all()
    torch.testing.assert_close(
        aesthetic(str(tmp_path / "clip"), batch_size=5)(images, ["a cat"] * 5), scores
    )
    processor = CLIPImageProcessor.from_pretrained(tmp_path / "clip")
    clip = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip")
    with torch.no_grad():
        embeds = clip(pixel_values=clip_preprocess(images, processor)).image_embeds
        torch.testing.assert_close(
            scores, aesthetic_head()(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(1)
        )
    # the embedding is L2-normalised: scaling CLIP's projection does not change a score
    scaled = aesthetic(tiny_clip(tmp_path / "clip3", projection_scale=3.0), batch_size=5)(
        images, ["a cat"] * 5
    )
    torch.testing.assert_close(scaled, scores)


def test_bertscore_recall_matches_each_reference_word_with_its_closest_candidate_word():
    candidate = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])  # the third is padding
    candidate_mask = torch.tensor([[1.0, 1.0, 0.0]])
    reference = torch.tensor(
        [[[0.0, -1.0], [3.0, 0.0], [1.0, 1.0]]]
    )  # the first is [CLS]: weight 0
    weight = torch.tensor([[0.0, 1.0, 1.0]])
    recall = bertscore_recall(candidate, candidate_mask, reference, weight)
    torch.testing.assert_close(recall, torch.tensor([(1.0 + 2**-0.5) / 2]))


def test_alignment_describes_each_image_and_scores_the_answer_against_the_prompt(tmp_path):
    score = alignment(
        str(tiny_llava(tmp_path / "vlm")),
        str(tiny_bert(tmp_path / "bert")),
        scorer_layer=2,
        batch_size=2,
        max_new_tokens=6,
    )
    images = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat riding a bike", "a dog", "a red cat"]
    rewards = score(images, prompts)
    assert rewards.shape == (3,) and ((rewards > -1.001) & (rewards < 1.001)).all()
    assert len(score.answers) == 3 and all(isinstance(a, str) for a in score.answers)
    again = alignment(
        str(tmp_path / "vlm"),
        str(tmp_path / "bert"),
        scorer_layer=2,
        batch_size=3,
        max_new_tokens=6,
    )(images, prompts)
    torch.testing.assert_close(again, rewards)  # the same, batched differently


@pytest.mark.parametrize(
    "flags, named, fix",
    [
        (
            ["--reward", "aesthetic", "--aesthetic-model", "{missing}"],
            "--aesthetic-model",
            "folder saved by save_pretrained",
        ),
        (
            ["--reward", "alignment", "--alignment-model", "{missing}"],
            "--alignment-model",
            "folder saved by save_pretrained",
        ),
        (
            ["--reward", "aesthetic", "--aesthetic-model", "no-such-org/no-such-clip"],
            "--aesthetic-model",
            "hf download",
        ),
        (
            ["--reward", "clipscore", "--clipscore-model", "no-such/clip"],
            "--clipscore-model",
            "hf download",
        ),
        (
            ["--reward", "clipscore", "--clipscore-model", "{missing}"],
            "--clipscore-model",
            "folder saved",
        ),
        (
            ["--reward", "pickscore", "--pickscore-model", "no-such/pick"],
            "--pickscore-model",
            "hf download",
        ),
    ],
)
def test_a_reward_model_that_cannot_load_exits_2_with_one_line_and_writes_nothing(
    flags, named, fix, tiny_pipeline_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", True
    )  # as HF_HUB_OFFLINE=1 (no network, no cache)
    flags = [f.format(missing=tmp_path / "not-downloaded") for f in flags]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        train.main(
            [
                "--model",
                str(tiny_pipeline_dir),
                "--out",
                str(out),
                "--prompts",
                "simple_animals",
                *flags,
            ]
        )
    error = capsys.readouterr().err.strip().splitlines()
    assert (
        exit.value.code == 2
        and len(error) == 1
        and named in error[0]
        and flags[-1] in error[0]
        and fix in error[0]
    )
    assert not out.exists()


def tiny_clip_pair(path, seed=0, width=32):
    """A tiny CLIPModel (text and image towers) and its CLIPProcessor, saved to path."""
    tokenizer = make_tokenizer(["a", "cat", "dog", "red", "blue", "riding", "bike"], max_length=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=clip_config(tokenizer, width),
        vision_config=dict(**vision, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def by_hand(path, images, prompts):
    """exp(logit_scale) cos(image, prompt), each tower run by hand, the cosine in float64."""
    model, processor = CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path)
    pixels = processor(images=to_pil(images), return_tensors="pt").pixel_values
    tokens = processor.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(**tokens).pooler_output)
    cos = torch.nn.functional.cosine_similarity(image.double(), text.double(), dim=-1)
    return model.logit_scale.exp().double() * cos


def test_clipscore_is_clips_logit_over_30_and_pickscore_its_logit(tmp_path):
    images = torch.rand(5, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "a red dog riding a bike", "a blue cat", "a dog", "a cat riding a bike"]
    clip, pick = tiny_clip_pair(tmp_path / "clip", seed=0), tiny_clip_pair(tmp_path / "pick", 1)
    close = dict(rtol=1e-5, atol=1e-5)  # float32 against the float64 cosine
    clip_scores = clipscore.load(str(clip))(images, prompts)
    torch.testing.assert_close(clip_scores.double(), by_hand(clip, images, prompts) / 30, **close)
    scores = pickscore.load(str(pick), str(pick))(images, prompts)
    torch.testing.assert_close(scores.double(), by_hand(pick, images, prompts), **close)
    model, processor = CLIPModel.from_pretrained(pick), CLIPProcessor.from_pretrained(pick)
    in_twos = clipscore.similarity(model, processor, batch_size=2)
    torch.testing.assert_close(in_twos(images, prompts), scores, **close)  # batched otherwise


def test_one_epoch_trains_on_the_clip_score(tiny_run, tmp_path):
    clip = tiny_clip_pair(tmp_path / "clip")
    out = tmp_path / "run"
    train.main(tiny_run(out, 1, "--reward", "clipscore", "--clipscore-model", str(clip)))
    assert (out / "checkpoints").is_dir()
