"""A reward served over HTTP, on the loopback address (issue 40): the served JPEG reward equals the
in-process one bit for bit, and so does a run on it; a server that goes away mid-run stops the run
in one line with its checkpoint whole, and the resumed run equals an uninterrupted one; a slow
server times out in one line; a wrong answer is named in one line; the server answers what it
cannot read with a 4xx and goes on serving."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import venv
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch

import train
from machinery import serving
from machinery.served import ServedReward, encode
import rewards

TIMING = ("sample_seconds", "train_seconds", "eval_seconds")


def start(reward="jpeg", requests=None, port=0, **cfg):
    """A reward server in a thread: for ever, or for that many requests; its URL and the server."""
    config, _ = serving.parse_args(["--reward", reward, "--device", "cpu"])
    for key, value in cfg.items():
        setattr(config, key, value)
    handler = serving.make_handler(reward, serving.load(config), "cpu", 10**8)
    server = serving.SERVER(("127.0.0.1", port), handler)

    def serve():
        if requests is None:
            server.serve_forever()
        else:
            for _ in range(requests):
                server.handle_request()
        server.server_close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/score", server


def images(n=6, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=generator), size)
    return (smooth + 0.2 * torch.rand(n, 3, size, size, generator=generator)).clamp(0, 1)


def test_the_served_jpeg_reward_equals_the_in_process_one_bit_for_bit():
    url, server = start("jpeg")
    batch = images()
    served = ServedReward(url)(batch, ["a cat"] * 6)
    assert torch.equal(served, rewards.jpeg_compressibility(batch, ["a cat"] * 6))
    server.shutdown()


def test_a_pixel_map_travels_as_float32_and_comes_back_equal():
    url, server = start("pixel_color", target_color="0.2,0.4,0.6")
    batch = images(n=3)
    served = ServedReward(url, fmt="float32")(batch, ["x"] * 3)
    assert served.shape == (3, 32, 32)
    assert torch.equal(served, rewards.pixel_color(batch, ["x"] * 3, target=[0.2, 0.4, 0.6]))
    server.shutdown()


def test_a_client_that_stalls_mid_request_holds_only_its_own_connection():
    url, server = start("jpeg")
    stalled = socket.create_connection(server.server_address[:2])
    stalled.sendall(b'POST /score HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n{"prompts"')
    began = time.time()
    served = ServedReward(url, timeout=10, retries=0)(images(n=2), ["a cat"] * 2)
    assert served.shape == (2,) and time.time() - began < 10  # not the stalled one's 60 s
    stalled.close()
    server.shutdown()


@pytest.fixture
def args(tiny_run):
    return tiny_run


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def train_lines(capsys):
    """What train.py said on stderr (the in-test server logs its requests there too)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py")]


def test_a_run_on_the_served_reward_equals_one_on_the_in_process_reward(args, tmp_path):
    url, server = start("jpeg")
    train.main(args(tmp_path / "served", 2, "--reward", url))
    train.main(args(tmp_path / "local", 2, "--reward", "jpeg"))
    assert metrics(tmp_path / "served") == metrics(tmp_path / "local")
    server.shutdown()


def test_a_server_gone_mid_run_stops_it_in_one_line_and_the_resumed_run_equals_a_straight_one(
    args, tmp_path, capsys
):
    url, _ = start("jpeg", requests=3)  # the probe, then epoch 0's two batches; then it is gone
    port = int(url.split(":")[2].split("/")[0])
    with pytest.raises(SystemExit) as exit:
        train.main(args(tmp_path / "run", 2, "--reward", url, "--reward-retries", "1"))
    error = train_lines(capsys)
    assert exit.value.code == 1 and len(error) == 1, error
    assert f"--reward {url}: no answer from {url} after 2 tries" in error[0]
    assert "the checkpoint epoch_0000.pt is kept" in error[0]
    assert f"continue with: python train.py --resume {tmp_path / 'run'}" in error[0]
    assert len(metrics(tmp_path / "run")) == 1
    _, server = start("jpeg", port=port)  # the server is back
    train.main(["--resume", str(tmp_path / "run")])
    train.main(args(tmp_path / "straight", 2, "--reward", "jpeg"))
    assert metrics(tmp_path / "run") == metrics(tmp_path / "straight")
    server.shutdown()


class Scripted(BaseHTTPRequestHandler):
    """A server of the test's own: answers GET, and POST with what answer() returns."""

    def do_GET(self):
        self.reply({"up": True})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.reply(self.answer(request))

    def reply(self, payload):
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def scripted(answer):
    handler = type("Handler", (Scripted,), {"answer": staticmethod(answer)})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/", server


def test_a_slow_server_times_out_in_one_line(args, tmp_path, capsys):
    url, server = scripted(lambda request: time.sleep(3) or {"rewards": [0.0] * 2})
    flags = ["--reward", url, "--reward-timeout", "0.5", "--reward-retries", "0"]
    with pytest.raises(SystemExit) as exit:
        train.main(args(tmp_path / "run", 1, *flags))
    error = train_lines(capsys)
    assert exit.value.code == 1 and len(error) == 1, error
    assert "after 1 tries, 0.5 s each at most" in error[0] and "timed out" in error[0]
    assert "no epoch had finished" in error[0]
    server.shutdown()


def test_a_server_that_answers_the_wrong_count_is_named_in_one_line(args, tmp_path, capsys):
    url, server = scripted(lambda request: {"rewards": [1.0] * (len(request["prompts"]) - 1)})
    with pytest.raises(SystemExit) as exit:
        train.main(args(tmp_path / "run", 1, "--reward", url))
    error = train_lines(capsys)
    assert exit.value.code == 1 and len(error) == 1, error
    assert f"--reward {url}: the server answered 1 scores (shape (1,)) for 2 images" in error[0]
    server.shutdown()


def test_a_reward_that_fails_on_the_server_stops_the_run_at_once_in_one_line(
    args, tmp_path, capsys
):
    (tmp_path / "broken.py").write_text("def score(images, prompts):\n    raise KeyError('x')\n")
    url, server = start(str(tmp_path / "broken.py:score"))
    start_time = time.time()
    with pytest.raises(SystemExit) as exit:
        train.main(args(tmp_path / "run", 1, "--reward", url))
    error = train_lines(capsys)
    assert exit.value.code == 1 and len(error) == 1, error
    assert "the server answered HTTP 500: the reward" in error[0] and "KeyError" in error[0]
    assert "fix the reward on the server" in error[0]
    assert (
        time.time() - start_time < 30
    )  # no retries, no backoff: a reward's bug is not a server away
    server.shutdown()


def test_no_server_at_the_url_is_refused_before_anything_is_written(args, tmp_path, capsys):
    url, server = scripted(lambda request: {})
    server.shutdown()
    server.server_close()  # nothing listens on its port now
    with pytest.raises(SystemExit) as exit:
        train.main(args(tmp_path / "run", 1, "--reward", url))
    error = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and "nothing answers there" in error and "reward_server.py" in error
    assert not (tmp_path / "run").exists()


def post(url, body):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_server_answers_what_it_cannot_read_with_a_4xx_and_goes_on_serving():
    url, server = start("jpeg")
    good = {"prompts": ["a"], "format": "png", "images": encode(images(n=1), "png")}
    wrong = {
        b"not json": 400,
        json.dumps([1, 2]).encode(): 400,
        json.dumps({**good, "prompts": ["a", "b"]}).encode(): 400,
        json.dumps({**good, "format": "pickle"}).encode(): 400,
        json.dumps({**good, "images": ["bm90IGEgcG5n"]}).encode(): 400,  # "not a png"
        json.dumps({**good, "format": "float32"}).encode(): 400,
    }
    for body, status in wrong.items():
        code, answer = post(url, body)
        assert code == status and answer["error"], (body, answer)
    small = HTTPServer(
        ("127.0.0.1", 0), serving.make_handler("jpeg", rewards.jpeg_compressibility, "cpu", 100)
    )
    threading.Thread(target=small.serve_forever, daemon=True).start()
    code, answer = post(f"http://127.0.0.1:{small.server_address[1]}/", json.dumps(good).encode())
    assert code == 413 and "takes 100" in answer["error"]
    pixels = HTTPServer(
        ("127.0.0.1", 0), serving.make_handler("jpeg", rewards.jpeg_compressibility, "cpu", 9000)
    )
    threading.Thread(target=pixels.serve_forever, daemon=True).start()
    big = {
        **good,
        "images": encode(images(n=1, size=28), "png"),
    }  # 784 pixels, 9408 bytes as float32
    code, answer = post(f"http://127.0.0.1:{pixels.server_address[1]}/", json.dumps(big).encode())
    assert code == 400 and "784 pixels take 9408 bytes" in answer["error"], answer
    pixels.shutdown()
    code, answer = post(url, json.dumps(good).encode())  # still serving
    assert code == 200 and len(answer["rewards"]) == 1
    server.shutdown()
    small.shutdown()


def test_reward_server_py_serves_your_own_file_from_the_command_line(tmp_path):
    (tmp_path / "mine.py").write_text(
        "def redness(images, prompts, metadata):\n"
        "    return images[:, 0].mean(dim=(1, 2)), {}  # the official port's signature\n"
    )
    root = Path(train.__file__).parent
    command = [sys.executable, str(root / "reward_server.py"), "--reward"]
    process = subprocess.Popen(
        [*command, str(tmp_path / "mine.py:redness"), "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("reward_server.py: serving") and "(cpu)" in line, line
        url = line.split(" on ")[1].split(" ")[0]
        batch = images(n=2)
        served = ServedReward(url, fmt="float32")(batch, ["a", "b"])
        torch.testing.assert_close(served, batch[:, 0].mean(dim=(1, 2)))  # another process's sums
    finally:
        process.terminate()
        process.wait(timeout=30)


def serve(root, reward, port=0):
    """reward_server.py in a process of its own, and its URL once it listens."""
    command = [sys.executable, "reward_server.py", "--reward", reward, "--port", str(port)]
    server = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, text=True)
    return server, server.stdout.readline().split(" on ", 1)[1].split()[0]


def test_two_torchrun_processes_share_one_slow_server_through_its_restart_as_if_in_process(
    tiny_pipeline_dir, tmp_path
):
    """One reward_server.py for both processes of a run, slower than a batch (their requests wait
    in its queue), stopped after the first epoch and started again on its port: every process
    retries, and the run equals the same run with the reward in process, bit for bit."""
    slow = tmp_path / "slow.py"
    slow.write_text(
        "import time\n\nimport rewards\n\n\ndef slow(images, prompts):\n    time.sleep(0.3)\n"
        "    return rewards.jpeg_compressibility(images, prompts)\n"
    )
    root, env = Path(train.__file__).parent, {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    flags = (
        f"--nproc-per-node 2 train.py --model {tiny_pipeline_dir} --device cpu --epochs 2 "
        "--samples-per-epoch 8 --batch-size 2 --updates-per-epoch 2 --num-steps 2 "
        "--prompts simple_animals --seed 3 --reward-retries 6"
    ).split()
    server, url = serve(root, f"{slow}:slow")
    metrics = tmp_path / "served" / "metrics.jsonl"
    run = subprocess.Popen(
        [*torchrun, *flags, "--reward", url, "--out", str(metrics.parent)], cwd=root, env=env
    )
    try:
        deadline = time.time() + 240
        while (
            not (metrics.is_file() and metrics.read_text().count("\n")) and time.time() < deadline
        ):
            time.sleep(0.2)
        server.terminate()  # between the epochs, or with a request in flight
        server.wait()
        server, _ = serve(root, f"{slow}:slow", port=url.rsplit(":", 1)[1].strip("/"))
        assert run.wait(timeout=240) == 0
    finally:
        run.kill()
        server.terminate()
        server.wait()
    inline = ["--reward", f"{slow}:slow", "--out", str(tmp_path / "in-process")]
    subprocess.run([*torchrun, *flags, *inline], cwd=root, env=env, check=True)
    served, in_process = (
        [
            {k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
        for name in ("served", "in-process")
    )
    assert len(served) == 2 and served == in_process
    lora = "lora/pytorch_lora_weights.safetensors"
    assert (tmp_path / "served" / lora).read_bytes() == (
        tmp_path / "in-process" / lora
    ).read_bytes()


def bare_environment(path):
    """A fresh virtual environment that holds numpy and pillow only (linked from this one's, as
    pip would install them): no torch, no transformers, none of this project's other pins."""
    venv.create(path, with_pip=False, symlinks=True)
    python = path / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    numpy, pil = Path(np.__file__).parent, Path(PIL.__file__).parent
    for folder in (numpy, numpy.with_name("numpy.libs"), pil, pil.with_name("pillow.libs")):
        if folder.exists():  # the .libs: the wheels' own shared libraries, on Linux
            (Path(site) / folder.name).symlink_to(folder)
    return python


def test_your_own_file_is_served_from_an_environment_with_only_numpy_and_pillow(args, tmp_path):
    python = bare_environment(tmp_path / "bare")
    for package, present in (("numpy", 0), ("PIL", 0), ("torch", 1), ("transformers", 1)):
        imported = subprocess.run([python, "-c", f"import {package}"], capture_output=True)
        assert bool(imported.returncode) == bool(present), package
    (tmp_path / "mine.py").write_text(
        "import numpy as np\n\n\n"
        "def brightness(images, prompts):\n"
        "    return np.asarray(images, dtype=np.float32).mean(axis=(1, 2, 3))\n"
    )
    root = Path(train.__file__).parent
    command = [python, "reward_server.py", "--reward", str(tmp_path / "mine.py:brightness")]
    server = subprocess.Popen(
        [*command, "--port", "0"], cwd=root, stdout=subprocess.PIPE, text=True
    )
    try:
        url = server.stdout.readline().split(" on ", 1)[1].split()[0]
        served = ("--reward", url, "--reward-format", "float32")
        train.main(args(tmp_path / "served", 1, *served))
    finally:
        server.terminate()
        server.wait(timeout=30)
    train.main(args(tmp_path / "local", 1, "--reward", str(tmp_path / "mine.py:brightness")))
    # the same images in another memory layout: numpy's sums may round otherwise
    served, local = metrics(tmp_path / "served"), metrics(tmp_path / "local")
    assert [row.keys() for row in served] == [row.keys() for row in local]
    for row, expected in zip(served, local):
        assert row == {k: pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in expected.items()}
