"""What FLUX.1-dev asks of one GPU with a LoRA, computed (not measured) from its configuration,
its weights built on PyTorch's meta device (no memory, no download):

    python benchmarks/flux_memory.py --keep docs/flux-memory.json --page docs/flow-models.md

The configurations: the transformer is diffusers' FluxTransformer2DModel defaults with the
guidance input (black-forest-labs/FLUX.1-dev's transformer/config.json); T5 is google/t5-v1_1-xxl's
(d_model 4096, d_ff 10240, 24 layers, 64 heads, gated GELU); CLIP's text encoder is
openai/clip-vit-large-patch14's (768 wide, 12 layers); the VAE is FLUX.1's (16 latent channels,
blocks 128, 256, 512, 512). Parameters and their bytes in bf16 are counted exactly. A training
step's activations are the tensors autograd saves for the backward of one transformer forward at
1024 px (4096 image tokens, 512 text tokens, one sample, bf16), its weights frozen and the LoRA on,
counted as they are saved, the attention's as a fused kernel (flash or memory-efficient) saves them: q, k, v, the
output and a float32 log-sum-exp a row, not the attention matrix. With gradient checkpointing
(each block's input kept, the block recomputed in the backward), the inputs of every block and
the largest block's own activations.
"""

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machinery.families.flux import LORA_TARGETS  # noqa: E402
from page import parse_with_result_flags, provenance, report  # noqa: E402

GIB = 2**30


def models(reduced=False):
    """FLUX.1-dev's four networks on the meta device (reduced: a few layers, for the tests)."""
    depth = dict(num_layers=1, num_single_layers=1) if reduced else {}
    with torch.device("meta"):
        return {
            "transformer": FluxTransformer2DModel(guidance_embeds=True, **depth),
            "T5-XXL encoder": T5EncoderModel(
                T5Config(
                    vocab_size=32128,
                    d_model=4096,
                    d_kv=64,
                    d_ff=10240,
                    num_layers=2 if reduced else 24,
                    num_heads=64,
                    feed_forward_proj="gated-gelu",
                )
            ),
            "CLIP ViT-L/14 text encoder": CLIPTextModel(
                CLIPTextConfig(
                    hidden_size=768,
                    intermediate_size=3072,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    projection_dim=768,
                )
            ),
            "VAE": AutoencoderKL(
                latent_channels=16,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
        }


class FusedAttention(torch.autograd.Function):
    """Attention whose backward keeps what a fused kernel keeps: q, k, v, the output and a float32
    log-sum-exp a query (shapes only: it runs on the meta device)."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty_like(query)
        lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, grad, grad


@contextmanager
def counted(parameters):
    """Bytes of the activations autograd saves meanwhile (the module's parameters not counted)."""
    own, total = {id(p) for p in parameters}, [0]

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(tensor) not in own and id(base) not in own:
            total[0] += tensor.numel() * tensor.element_size()
        return tensor

    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda query, key, value, **_: (
        FusedAttention.apply(query, key, value)
    )
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield total
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def activations(transformer, rank, image_tokens=4096, text_tokens=512):
    """Saved bytes of one forward at batch 1, with the LoRA on (its inputs are saved for its
    gradient): the whole transformer, each kind of block alone, and under checkpointing."""
    transformer = transformer.to(torch.bfloat16).requires_grad_(False)
    with torch.device("meta"):
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS)
        transformer.add_adapter(config)
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    with torch.device("meta"):
        inputs = dict(
            hidden_states=torch.randn(1, image_tokens, 64, dtype=torch.bfloat16).requires_grad_(),
            encoder_hidden_states=torch.randn(1, text_tokens, 4096, dtype=torch.bfloat16),
            pooled_projections=torch.randn(1, 768, dtype=torch.bfloat16),
            timestep=torch.ones(1, dtype=torch.bfloat16),
            guidance=torch.ones(1, dtype=torch.bfloat16),
            img_ids=torch.zeros(image_tokens, 3),
            txt_ids=torch.zeros(text_tokens, 3),
        )
        with counted(transformer.parameters()) as whole:
            transformer(**inputs, return_dict=False)
        hidden = torch.randn(1, image_tokens, width, dtype=torch.bfloat16).requires_grad_()
        context = torch.randn(1, text_tokens, width, dtype=torch.bfloat16).requires_grad_()
        temb = torch.randn(1, width, dtype=torch.bfloat16)
        rope = transformer.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
        with counted(transformer.transformer_blocks[0].parameters()) as double:
            transformer.transformer_blocks[0](hidden, context, temb, image_rotary_emb=rope)
        with counted(transformer.single_transformer_blocks[0].parameters()) as single:
            transformer.single_transformer_blocks[0](hidden, context, temb, image_rotary_emb=rope)
    blocks = transformer.config.num_layers + transformer.config.num_single_layers
    block_input = (image_tokens + text_tokens) * width * 2  # bf16
    return {
        "whole": whole[0],
        "double block": double[0],
        "single block": single[0],
        "checkpointed": blocks * block_input + max(double[0], single[0]),
    }


def lora_parameters(transformer, rank):
    """Parameters of a rank-r LoRA on the family's targets: r (in + out) a projection."""
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and name.endswith(tuple(LORA_TARGETS))
    )


def measure(reduced=False, rank=64):
    networks = models(reduced)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in networks.items()}
    lora = lora_parameters(networks["transformer"], rank)
    tokens = (256, 32) if reduced else (4096, 512)
    saved = activations(networks["transformer"], rank, *tokens)
    return {"parameters": counts, "lora_rank": rank, "lora_parameters": lora, "activations": saved}


def table(result):
    gib = lambda n: f"{n / GIB:.2f}"  # noqa: E731
    rows = ["| what | parameters | GiB in bf16 | on the GPU |", "|---|---|---|---|"]
    where = {
        "transformer": "always: every sampling step and every update",
        "T5-XXL encoder": "whenever prompts are encoded: each sampling batch (this code keeps it there)",
        "CLIP ViT-L/14 text encoder": "as T5",
        "VAE": "to decode each sampling batch",
    }
    for name, count in result["parameters"].items():
        rows.append(f"| {name} | {count / 1e9:.3f} B | {gib(2 * count)} | {where[name]} |")
    lora, saved = result["lora_parameters"], result["activations"]
    rows.append(
        f"| LoRA, rank {result['lora_rank']} (fp32, its gradient and AdamW's two moments) | "
        f"{lora / 1e6:.1f} M | {gib(16 * lora)} | during the update |"
    )
    rows += [
        "",
        "| a training forward, one sample at 1024 px, bf16 | GiB saved for the backward |",
        "|---|---|",
        f"| the whole transformer | {gib(saved['whole'])} |",
        f"| one double block / one single block | {gib(saved['double block'])} / "
        f"{gib(saved['single block'])} |",
        f"| with gradient checkpointing (every block's input, one block's own) | "
        f"{gib(saved['checkpointed'])} |",
    ]
    weights = {name: 2 * count for name, count in result["parameters"].items()}
    held = sum(weights.values()) + 16 * lora  # all four networks stay; the LoRA's state
    rows += [
        "",
        "| one sample at 1024 px, the sum | GiB |",
        "|---|---|",
        f"| weights held (the four networks in bf16) and the LoRA's state | {gib(held)} |",
        f"| an update without gradient checkpointing | {gib(held + saved['whole'])} |",
        f"| an update with gradient checkpointing | {gib(held + saved['checkpointed'])} |",
        f"| saved by encoding the prompts once, then moving T5 and CLIP off the GPU (this code "
        f"does not) | {gib(weights['T5-XXL encoder'] + weights['CLIP ViT-L/14 text encoder'])} |",
    ]
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (Flow-GRPO's FLUX: 64)")
    parser.add_argument("--reduced", action="store_true", help="a few layers, small inputs")
    args = parse_with_result_flags(parser, argv)
    command = f"python benchmarks/flux_memory.py --rank {args.rank}"
    command += " --reduced" if args.reduced else ""
    result = {**measure(args.reduced, args.rank), "command": command, **provenance()}
    return report(args, "flux_memory", result, table)


if __name__ == "__main__":
    main()
