"""Pretrain the bundled model that writes, tiny-words, on the words world (toy_world/words.py).

    python -m toy_world.pretrain_words --out toy_world/tiny-words      # the shipped model

The bundled DDIM model's recipe (toy_world/pretrain.py) on other images, with three changes:
- its VAE's latents have 16 channels (as SD3's and FLUX's) instead of 4, 16 x 8 x 8 for a 64 x 64
  image: with 4 the letters do not survive the factor 8 (the OCR model read none of the VAE's
  reconstructions after 500 steps). The UNet keeps its 8 x 8 grid; only its first and last layers
  grow;
- the latent cells with ink weigh 11 times in the UNet's loss (ink_weight): with the plain loss
  the model learned to draw the world's words, but not the one the caption asks for
  (docs/learns-to-write.md);
- the UNet's learning rate is constant after the warm-up, so that the model saved at step N is
  the model of an N-step run: the shipped model is the step whose words the OCR model reads
  neither too well nor too badly for the OCR reward to teach (toy_world/tiny-words/README.md).
"""

from dataclasses import dataclass

from toy_world import words
from toy_world.pretrain import Config as ShapesConfig
from toy_world.pretrain import build_pipeline, parse_config, pretrain


@dataclass
class Config(ShapesConfig):
    out: str = "toy_world/tiny-words"
    latent_channels: int = 16
    vae_steps: int = 2000
    edge_steps: int = 0  # the backgrounds are plain: nothing for the decoder to paint on them
    ink_weight: float = 10.0
    unet_steps: int = 2250
    unet_schedule: str = "constant_with_warmup"
    save_every: int = 250


def main(argv=None):
    cfg = parse_config(Config, argv, __doc__)
    tokens = ["the", "word", "in", *(word.lower() for word in words.WORDS), *words.COLOURS]
    # the longest first: their merges rank first, so that each is one token ("green" is not g-re-e-n)
    tokens.sort(key=len, reverse=True)
    pipe = build_pipeline(
        image_size=words.SIZE,
        words=tokens,
        max_length=12,  # <start> the word " cat " in red <end>: 9 tokens
        latent_channels=cfg.latent_channels,
        symbols="-,.'\"",  # the quotes around the word
        seed=cfg.seed,
    )
    return pretrain(pipe, cfg, words)


if __name__ == "__main__":
    main()
