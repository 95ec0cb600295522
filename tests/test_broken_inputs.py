"""Every input a run reads can be broken: each case must end with exit status 2, one line on stderr
naming the flag or file, no traceback, and the disk exactly as it was (nothing written, nothing
lost). The cases run through train.py's main in one process of their own, one after the other
(importing torch and diffusers once, not once a case); that process must write nothing else to
stderr. tests/test_command_line.py runs flag errors through the command line itself."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train

# one worker runs the module: its cases share one process (the fixture outcomes, run once a worker)
pytestmark = pytest.mark.xdist_group("broken_inputs")

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--samples-per-epoch",
    "4",
    "--batch-size",
    "2",
    "--updates-per-epoch",
    "1",
    "--num-steps",
    "2",
    "--prompts",
    "simple_animals",
]


@pytest.fixture(scope="session")
def finished_run(tiny_pipeline_dir, tmp_path_factory):
    """A finished 2-epoch run with both its checkpoints, copied by the cases that break it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main(["--model", str(tiny_pipeline_dir), "--out", str(out), "--epochs", "2", *TINY])
    return out


class Payload:
    """Unpickling this would create the file `marker`: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def edit_config(run, change):
    config = json.loads((run / "config.json").read_text())
    change(config)
    (run / "config.json").write_text(json.dumps(config))


def truncate_checkpoints(run):
    for path in (run / "checkpoints").glob("*.pt"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def edit_checkpoints(run, change):
    for path in (run / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)


def plant_payload(run):
    latest = run / "checkpoints" / "epoch_0001.pt"
    state = torch.load(latest, weights_only=True)
    torch.save({**state, "note": Payload(run.parent / "payload-ran")}, latest)


def model_copy(w, r, file, **changes):
    """The finished run's model copied into w, with changes to one of its JSON files; -> --model and the copy."""
    model = w / "model"
    shutil.copytree(json.loads((r / "config.json").read_text())["model"], model)
    (model / file).write_text(json.dumps({**json.loads((model / file).read_text()), **changes}))
    return ["--model", str(model)]


# name: (how to break the inputs, given the work folder w and a copy of the finished run r, -> the extra argv; what stderr must name)
CASES = {
    "negative lr": (lambda w, r: ["--lr", "-1"], "--lr"),
    "nan lr": (lambda w, r: ["--lr", "nan"], "--lr"),
    "eta above 1": (lambda w, r: ["--eta", "1.5"], "--eta"),
    "negative guidance": (lambda w, r: ["--guidance-scale", "-2"], "--guidance-scale"),
    "guidance below 1": (lambda w, r: ["--guidance-scale", "0.5"], "--guidance-scale"),
    "more steps than timesteps": (lambda w, r: ["--num-steps", "5000"], "--num-steps"),
    "more steps than the scheduler takes": (lambda w, r: ["--num-steps", "1000"], "--num-steps"),
    "lora rank above the model's": (lambda w, r: ["--lora-rank", "10000"], "--lora-rank"),
    "reward unknown": (lambda w, r: ["--reward", "brightness"], "--reward"),
    "reward file missing": (lambda w, r: ["--reward", f"{w / 'none.py'}:score"], "--reward"),
    "reward module missing": (lambda w, r: ["--reward", "no_such_rewards:score"], "--reward"),
    "reward function missing": (
        lambda w, r: ["--reward", f"{write(w / 'mine.py', 'x = 1')}:score"],
        "--reward",
    ),
    "reward file fails to import": (
        lambda w, r: ["--reward", f"{write(w / 'mine.py', 'import no_such_module')}:score"],
        "--reward",
    ),
    "reward a python function": (lambda w, r: ["--reward", "python:mine.score"], "--reward"),
    "negative weight decay": (lambda w, r: ["--weight-decay", "-0.1"], "--weight-decay"),
    "zero grad norm": (lambda w, r: ["--max-grad-norm", "0"], "--max-grad-norm"),
    "min count above buffer": (lambda w, r: ["--min-count", "40"], "--min-count"),
    "negative kl coef": (lambda w, r: ["--kl-coef", "-1"], "--kl-coef"),
    "kl coef with rwr": (lambda w, r: ["--kl-coef", "0.1", "--algo", "rwr"], "--kl-coef"),
    "negative eval every": (lambda w, r: ["--eval-every", "-1"], "--eval-every"),
    "zero eval samples": (lambda w, r: ["--eval-samples", "0"], "--eval-samples"),
    "zero steps per forward": (lambda w, r: ["--steps-per-forward", "0"], "--steps-per-forward"),
    "zero sample batch size": (lambda w, r: ["--sample-batch-size", "0"], "--sample-batch-size"),
    "eval prompts missing": (
        lambda w, r: ["--eval-every", "1", "--eval-prompts", str(w / "none.txt")],
        "--eval-prompts",
    ),
    "pixel_background eval off the toy world": (
        lambda w, r: [
            "--reward",
            "pixel_background",
            "--prompts",
            "shapes",
            "--eval-prompts",
            "simple_animals",
        ],
        "--eval-prompts",
    ),
    "epochs not a number": (lambda w, r: ["--epochs", "ten"], "--epochs"),
    "samples not a multiple": (lambda w, r: ["--samples-per-epoch", "7"], "--samples-per-epoch"),
    "unknown algo": (lambda w, r: ["--algo", "ppo"], "--algo"),
    "colour out of range": (lambda w, r: ["--target-color", "2,0,0"], "--target-color"),
    "fp16 on the cpu": (lambda w, r: ["--mixed-precision", "fp16"], "--mixed-precision"),
    "pixel_background off the toy world": (
        lambda w, r: ["--reward", "pixel_background"],
        "--reward pixel_background",
    ),
    "prompts missing": (lambda w, r: ["--prompts", str(w / "none.txt")], "--prompts"),
    "prompts empty": (
        lambda w, r: ["--prompts", str(write(w / "empty.txt", "\n \n"))],
        "--prompts",
    ),
    "prompts not text": (
        lambda w, r: ["--prompts", str(write(w / "image.txt", bytes(range(256)) * 4))],
        "--prompts",
    ),
    "prompts a folder": (lambda w, r: ["--prompts", str(w)], "--prompts"),
    "model folder empty": (
        lambda w, r: ["--model", str(write(w / "model" / ".keep", "").parent)],
        "--model",
    ),
    "model index damaged": (
        lambda w, r: ["--model", str(write(w / "model" / "model_index.json", "{").parent)],
        "--model",
    ),
    "model missing": (lambda w, r: ["--model", str(w / "no_such_model") + "/"], "--model"),
    "noise level on a DDIM model": (lambda w, r: ["--noise-level", "0.5"], "--noise-level"),
    "eta on a flow model": (
        lambda w, r: ["--model", str(ROOT / "toy_world" / "tiny-flow"), "--eta", "0.5"],
        "--eta",
    ),
    "model another pipeline": (
        lambda w, r: model_copy(w, r, "model_index.json", _class_name="PixArtAlphaPipeline"),
        "PixArtAlphaPipeline",
    ),
    "model's steps end without noise": (
        lambda w, r: model_copy(
            w, r, "scheduler/scheduler_config.json", timestep_spacing="linspace"
        ),
        "sigma_t = 0",
    ),
    "model epsilon on a zero-snr schedule": (
        lambda w, r: model_copy(
            w,
            r,
            "scheduler/scheduler_config.json",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
        ),
        "zero terminal SNR",
    ),
    "device not a device": (lambda w, r: ["--device", "gpu0"], "--device gpu0"),
    "device not here": (
        lambda w, r: ["--device", "cuda:99"],
        "--device cuda:99",
    ),  # no CUDA, or no 100th GPU
    "model predicts the sample": (
        lambda w, r: model_copy(w, r, "scheduler/scheduler_config.json", prediction_type="sample"),
        "'sample'",
    ),
    "samples per prompt not dividing": (
        lambda w, r: ["--samples-per-prompt", "3"],
        "--samples-per-prompt",
    ),
    "group advantages without groups": (
        lambda w, r: ["--advantages", "group"],
        "--advantages group",
    ),
    "shared noise without groups": (lambda w, r: ["--shared-noise"], "--shared-noise"),
    "train window past the steps": (lambda w, r: ["--train-window", "3"], "--train-window"),
    "train window with rwr": (
        lambda w, r: ["--train-window", "1", "--algo", "rwr"],
        "--train-window",
    ),
    "train window with nft": (
        lambda w, r: ["--train-window", "1", "--algo", "nft"],
        "--train-window",
    ),
    "eval steps past the timesteps": (
        lambda w, r: ["--eval-num-steps", "1000"],
        "--eval-num-steps",
    ),
    "aesthetic model missing": (
        lambda w, r: ["--reward", "aesthetic", "--aesthetic-model", str(w / "no_clip")],
        "--aesthetic-model",
    ),
    "out is a file": (lambda w, r: ["--out", str(write(w / "file", "x"))], "--out"),
    "out under a file": (lambda w, r: ["--out", str(write(w / "file", "x") / "run")], "--out"),
    "out is a finished run": (lambda w, r: ["--out", str(r)], "--out"),
    "out cannot be made": (
        lambda w, r: ["--out", "/proc/ddpo-test/run"],
        "--out",
    ),  # /proc passes the permission check for root
    "resume no folder": (lambda w, r: ["--resume", str(w / "no_run")], "--resume"),
    "resume empty folder": (
        lambda w, r: ["--resume", str((w / "empty").mkdir() or w / "empty")],
        "--resume",
    ),
    "resume config missing": (
        lambda w, r: (r / "config.json").unlink() or ["--resume", str(r)],
        "config.json",
    ),
    "resume config not json": (
        lambda w, r: write(r / "config.json", "{'lr': ") and ["--resume", str(r)],
        "config.json",
    ),
    "resume config not text": (
        lambda w, r: write(r / "config.json", b"\xff\xfe\x00") and ["--resume", str(r)],
        "config.json",
    ),
    "resume config a list": (
        lambda w, r: write(r / "config.json", "[1, 2]") and ["--resume", str(r)],
        "config.json",
    ),
    "resume config unknown key": (
        lambda w, r: edit_config(r, lambda c: c.update(ppo=1)) or ["--resume", str(r)],
        "config.json",
    ),
    "resume config wrong type": (
        lambda w, r: (
            edit_config(r, lambda c: c.update(epochs="ten"))
            or ["--resume", str(r), "--epochs", "3"]
        ),
        "config.json",
    ),
    "resume config bad value": (
        lambda w, r: (
            edit_config(r, lambda c: c.update(lr=-1.0)) or ["--resume", str(r), "--epochs", "3"]
        ),
        "--lr",
    ),
    "resume checkpoints damaged": (
        lambda w, r: truncate_checkpoints(r) or ["--resume", str(r), "--epochs", "3"],
        "no readable checkpoint",
    ),
    "resume checkpoint not ours": (
        lambda w, r: (
            [torch.save({"weights": torch.ones(2)}, p) for p in (r / "checkpoints").glob("*.pt")]
            and ["--resume", str(r), "--epochs", "3"]
        ),
        "no readable checkpoint",
    ),
    "resume checkpoint runs code": (
        lambda w, r: plant_payload(r) or ["--resume", str(r), "--epochs", "3"],
        "epoch_0001.pt",
    ),
    "resume another run's checkpoint": (
        lambda w, r: (
            edit_checkpoints(r, lambda state: state.update(run_id="0123456789ab"))
            or ["--resume", str(r), "--epochs", "3"]
        ),
        "another run's checkpoint",
    ),
    "resume other lora rank": (
        lambda w, r: (
            edit_config(r, lambda c: c.update(lora_rank=8)) or ["--resume", str(r), "--epochs", "3"]
        ),
        "--lora-rank",
    ),
    "resume nothing left to do": (lambda w, r: ["--resume", str(r)], "--epochs"),
    "resume fewer epochs": (lambda w, r: ["--resume", str(r), "--epochs", "1"], "--epochs"),
    "resume with other flags": (lambda w, r: ["--resume", str(r), "--lr", "1"], "--resume"),
}


# the cases in one process: each through train.main, as `python train.py ARGV` would run it,
# with its stderr kept apart; anything but an exit (a traceback) is reported as such
RUNNER = """import contextlib, io, json, sys, traceback
import train
outcomes = {}
for name, argv in json.load(open(sys.argv[1])).items():
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            train.main(argv)
            status = 0
        except SystemExit as exit:
            status = exit.code
        except BaseException:
            status = "traceback"
            traceback.print_exc()
    outcomes[name] = {"status": status, "stderr": stderr.getvalue()}
json.dump(outcomes, open(sys.argv[2], "w"))
"""


def snapshot(folder):
    return {
        str(p.relative_to(folder)): (
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        if p.is_file()
        else None
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="session")
def outcomes(finished_run, tiny_pipeline_dir, tmp_path_factory):
    """Each case broken in a folder of its own (a work folder and a copy of the finished run), the
    folder's snapshot taken, then every case run by RUNNER. Returns, by case: its folder, what stderr
    must name, the snapshot before, the exit status and stderr."""
    cases, plan = {}, {}
    for name, (break_it, named) in CASES.items():
        root = tmp_path_factory.mktemp("case")
        (root / "work").mkdir()
        shutil.copytree(finished_run, root / "run")
        extra = break_it(root / "work", root / "run")
        plan[name] = (
            extra
            if extra[0] == "--resume"
            else ["--model", str(tiny_pipeline_dir), "--out", str(root / "new"), *TINY, *extra]
        )
        cases[name] = {"root": root, "named": named, "before": snapshot(root)}
    work = tmp_path_factory.mktemp("runner")
    (work / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(work / "plan.json"), str(work / "outcomes.json")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0 and not result.stderr, (
        result.stderr
    )  # nothing on stderr outside the cases
    for name, outcome in json.loads((work / "outcomes.json").read_text()).items():
        cases[name].update(outcome)
    return cases


@pytest.mark.parametrize("case", CASES)
def test_a_broken_input_exits_2_with_one_line_and_leaves_the_disk_as_it_was(case, outcomes):
    outcome = outcomes[case]
    error = outcome["stderr"].strip()
    assert outcome["status"] == 2, outcome["stderr"]
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    assert outcome["named"] in error
    assert snapshot(outcome["root"]) == outcome["before"]  # nothing written, nothing lost
    assert not (outcome["root"] / "payload-ran").exists()  # and the planted pickle never ran
