"""Every GPU figure README lacks, in one run of one script, on SD v1.4's architecture with random weights.

    python benchmarks/gpu_check.py --out results                     # a CUDA machine: within --budget (480 s)
    python benchmarks/gpu_check.py --out /tmp/check --arch tiny --device cpu --num-steps 2 --budget 1800   # the dry run

Each check runs in a process of its own, so that a crash or an out-of-memory in one leaves the
others, with what is left of --budget as its time limit; each result is appended to
OUT/gpu_check.jsonl the moment it is measured, so a run cut short keeps what it measured. In order:

- exactness: the largest |ratio - 1| over every trained step of one epoch, as train.update
  recomputes the log-probs before its first optimiser step, in fp32 and in bf16 (the clip range is 1e-4);
- default: `train.py --reward jpeg` with every default (the paper's: fp32, batch 8, no gradient
  checkpointing) for one epoch of one minibatch an update, at 10 steps: does it fit, its peak memory;
- memory: peak memory and samples per second (gpu_memory.measure) at train batch 1, 2 and 4 in
  bf16 with and without gradient checkpointing, fp32 at batch 1, --steps-per-forward 5 at batch 1;
- overhead: an epoch against its UNet compute floor (benchmarks/overhead.py);
- torchrun: one epoch under `torchrun --nproc-per-node 1` (NCCL on CUDA);
- tutorial: tutorial.ipynb's code cells as one script with MODEL the random pipeline, EPOCHS = 1.

The model is built once into --work (not under --out: it is GBs) or taken from --model.
"""

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CHECKS = ("exactness", "default", "memory", "overhead", "torchrun", "tutorial")
MEMORY = [("bf16", b, gc, 1) for gc in (False, True) for b in (1, 2, 4)] + [
    ("no", 1, False, 1),
    ("bf16", 1, False, 5),
]


def record(args, check, **result):
    with open(args.out / "gpu_check.jsonl", "a") as file:
        file.write(json.dumps({"check": check, **result}) + "\n")
    print(check, result, flush=True)


def small_run(args, model, out, precision="bf16"):
    """train.py flags for one small epoch: 4 samples, one update, every step trained."""
    return [
        "--model",
        str(model),
        "--device",
        args.device,
        "--epochs",
        "1",
        "--samples-per-epoch",
        "4",
        "--batch-size",
        "2",
        "--updates-per-epoch",
        "1",
        "--num-steps",
        str(args.num_steps),
        "--timestep-fraction",
        "1",
        "--mixed-precision",
        precision,
        "--prompts",
        "shapes",
        "--reward",
        "jpeg",
        "--out",
        str(out),
    ]


def peak_gib(args):
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None


def exactness(args, model):
    import ddpo
    import train

    diagnostics, worst = ddpo.diagnostics, []

    def spy(
        log_prob, old_log_prob, clip_range
    ):  # the update's own recomputed log-probs, before its one optimiser step
        worst.append(
            (log_prob.detach().float() - old_log_prob.float()).exp().sub(1).abs().max().item()
        )
        return diagnostics(log_prob, old_log_prob, clip_range)

    ddpo.diagnostics = spy
    try:
        for precision in ("no", "bf16"):
            worst.clear()
            with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
                train.main(small_run(args, model, f"{tmp}/run", precision))
            record(
                args,
                "exactness",
                mixed_precision=precision,
                max_abs_ratio_minus_1=max(worst),
                minibatch_steps=len(worst),
            )
    finally:
        ddpo.diagnostics = diagnostics


def default(args, model):
    import torch

    from machinery import cli
    import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = cli.parse_args(
            [
                "--reward",
                "jpeg",
                "--model",
                str(model),
                "--device",
                args.device,
                "--out",
                f"{tmp}/run",
            ]
        )
        samples = (
            cfg.updates_per_epoch * cfg.batch_size
        )  # one minibatch a update: the smallest epoch the defaults allow
        cfg.epochs, cfg.samples_per_epoch, cfg.num_steps = (
            1,
            samples,
            min(cfg.num_steps, 10),
        )  # fewer steps: the same peak, a fifth of the time
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                history = train.main(cfg)
        except torch.OutOfMemoryError as error:
            return record(
                args, "default", fits=False, peak_gib=peak_gib(args), error=str(error)[:300]
            )
    last = history[-1]
    record(
        args,
        "default",
        fits=True,
        peak_gib=peak_gib(args),
        samples=samples,
        batch_size=cfg.batch_size,
        mixed_precision=cfg.mixed_precision,
        gradient_checkpointing=cfg.gradient_checkpointing,
        sample_seconds=last["sample_seconds"],
        train_seconds=last["train_seconds"],
    )


def memory(args, model):
    import gpu_memory

    for precision, batch, checkpointing, steps_per_forward in MEMORY:
        settings = argparse.Namespace(
            device=args.device,
            num_steps=args.num_steps,
            mixed_precision=precision,
            gradient_checkpointing=checkpointing,
        )
        peak, sampling, training, epoch = gpu_memory.measure(
            model, batch, settings, extra=["--steps-per-forward", str(steps_per_forward)]
        )
        record(
            args,
            "memory",
            mixed_precision=precision,
            train_batch=batch,
            gradient_checkpointing=checkpointing,
            steps_per_forward=steps_per_forward,
            peak_gib=peak,
            sampling_per_s=sampling,
            training_per_s=training,
            epoch_per_s=epoch,
        )


def overhead(args, model):
    import overhead as benchmark

    flags = [
        "--model",
        str(model),
        "--device",
        args.device,
        "--samples-per-epoch",
        "8",
        "--batch-size",
        "4",
        "--updates-per-epoch",
        "1",
        "--num-steps",
        str(args.num_steps),
        "--mixed-precision",
        "bf16",
        "--prompts",
        "shapes",
        "--reward",
        "jpeg",
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        result = benchmark.main(["--epochs", "3", "--", *flags])
    record(args, "overhead", **result)


def torchrun(args, model):
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "1",
            str(ROOT / "train.py"),
            *small_run(args, model, f"{tmp}/run"),
        ]
        start = time.time()
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        metrics = Path(tmp) / "run" / "metrics.jsonl"
        epochs = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    record(
        args,
        "torchrun",
        returncode=result.returncode,
        epochs=epochs,
        seconds=time.time() - start,
        stderr_tail=result.stderr[-600:],
    )


def tutorial(args, model):
    notebook = json.loads(
        (ROOT / "tutorial.ipynb").read_text()
    )  # read as JSON: the GPU machine may lack nbformat and a kernel
    cells = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    cells[0] = f"MODEL = {str(model)!r}\nEPOCHS = 1\nSAMPLES = 8\n"  # the parameters cell
    script = "\n\n".join(
        "\n".join(line for line in cell.splitlines() if not line.lstrip().startswith("%"))
        for cell in cells
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tutorial.py").write_text(script)
        start = time.time()
        result = subprocess.run(
            [sys.executable, f"{tmp}/tutorial.py"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "MPLBACKEND": "Agg"},
        )
    record(
        args,
        "tutorial",
        returncode=result.returncode,
        seconds=time.time() - start,
        stderr_tail=result.stderr[-600:],
    )


def environment(args):
    """What ran: the Python, every package the checks import, the device and its driver's CUDA."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "packages": versions,
        "torch_cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
    }


PACKAGES = [
    "torch",
    "diffusers",
    "transformers",
    "tokenizers",
    "huggingface-hub",
    "peft",
    "accelerate",
    "safetensors",
    "numpy",
    "pillow",
    "matplotlib",
]


def build(args):
    """The pipeline folder: --model's, or SD v1.4's architecture (or a tiny one) with random weights, built once into --work."""
    if args.model:
        return args.model
    folder = args.work / f"{args.arch}-random"
    if not (folder / "model_index.json").is_file():
        import gpu_memory
        from toy_world.pretrain import build_pipeline

        pipe = (
            gpu_memory.sd14_random_pipeline()
            if args.arch == "sd14"
            else build_pipeline(image_size=64, words=gpu_memory.WORDS, seed=0)
        )
        pipe.save_pretrained(folder)
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="where gpu_check.jsonl goes")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "gpu_check",
        help="where the random model is built",
    )
    parser.add_argument(
        "--model", type=Path, help="a pipeline folder to use instead of building one"
    )
    parser.add_argument("--arch", choices=("sd14", "tiny"), default="sd14")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument(
        "--budget",
        type=float,
        default=480,
        help="seconds for everything, the model's building included",
    )
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    parser.add_argument(
        "--check", choices=CHECKS, help=argparse.SUPPRESS
    )  # run one check in this process (what each child does)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.check:  # (benchmarks/ is on the path: this script's folder)
        return globals()[args.check](args, args.model)
    start = time.time()
    record(args, "environment", **environment(args))
    model = build(args)
    record(
        args,
        "build",
        arch=args.arch,
        device=args.device,
        seconds=time.time() - start,
        model=str(model),
    )
    for check in args.checks:
        left = args.budget - (time.time() - start)
        if left < 10:
            record(args, check, skipped=f"the budget of {args.budget:.0f} s was spent")
            continue
        command = [
            sys.executable,
            __file__,
            "--check",
            check,
            "--model",
            str(model),
            "--out",
            str(args.out),
            "--arch",
            args.arch,
            "--device",
            args.device,
            "--num-steps",
            str(args.num_steps),
        ]
        began = time.time()
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=left)
            if result.returncode:
                record(args, check, failed=result.returncode, stderr_tail=result.stderr[-1500:])
        except subprocess.TimeoutExpired:
            record(args, check, timed_out=f"after {left:.0f} s, the budget's rest")
        record(args, f"{check} done", seconds=time.time() - began)


if __name__ == "__main__":
    main()
