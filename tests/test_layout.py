"""The layout is part of the spec: the paper is four short files that name no model family and take
no option they do not declare; the machinery beside them is files a reader can live in; a model
family is one module of machinery/families/ with the same names as the others."""

import ast
import re
from pathlib import Path

import pytest

from machinery.families import FAMILIES, family

ROOT = Path(__file__).resolve().parents[1]
PAPER = ("sampler.py", "ddpo.py", "rewards.py", "train.py")
# the families beyond the paper's SD 1.x, and the ways code has told them apart
FAMILY_WORDS = re.compile(
    r"SDXL|SD ?[23]|\bsdxl\b|\bsd3\b|FLUX|\bflow model|\bflow\.|[Tt]ransformer|text_encoder_2"
    r"|addition_embed|is_flow|FlowMatch|StableDiffusion(XL|3)"
)


def functions(path):
    return [
        node
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


@pytest.mark.parametrize("name", PAPER)
def test_a_paper_file_names_no_model_family_and_reads_no_undeclared_option(name):
    text = (ROOT / name).read_text()
    assert not FAMILY_WORDS.search(text), FAMILY_WORDS.search(text)
    for function in functions(ROOT / name):
        assert function.args.kwarg is None, (
            f"{name}: {function.name} takes **{function.args.kwarg.arg}"
        )


def test_the_paper_is_four_short_files():
    lengths = {name: len((ROOT / name).read_text().splitlines()) for name in PAPER}
    assert max(lengths.values()) <= 300 and sum(lengths.values()) <= 1000, lengths


@pytest.mark.parametrize("path", sorted((ROOT / "machinery").rglob("*.py")), ids=lambda p: p.name)
def test_a_machinery_file_is_one_short_room_of_short_functions(path):
    assert len(path.read_text().splitlines()) <= 350
    for function in functions(path):
        assert function.end_lineno - function.lineno < 70, function.name


@pytest.mark.parametrize("class_name", FAMILIES)
def test_every_model_family_gives_the_same_names(class_name):
    module = family(class_name)
    for name in ("PIPELINE", "POLICY", "LORA_TARGETS", "NOISE", "DENOISER"):
        assert hasattr(module, name), (class_name, name)
    for name in ("load", "check_steps", "save_lora"):
        assert callable(getattr(module, name)), (class_name, name)
    assert module.PIPELINE.__name__.endswith(class_name) or class_name in [
        base.__name__ for base in module.PIPELINE.__mro__
    ]
    assert set(module.POLICY._fields) == {"encode_prompts", "predict", "mean_std", "decode"}
