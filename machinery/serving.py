"""Beyond the paper: the server of a served reward (python reward_server.py; the client is
served.py, the protocol docs/reward-server.md). It serves any reward --reward takes but a URL,
with the Python standard library's HTTP server: each connection is read in a thread of its own, so
a client that stalls mid-request holds only its own (up to 60 s a read), and the requests are
scored one at a time (the reward's model on one device).

POST {"prompts": [...], "format": "png" | "float32", "images": ...} -> 200 {"rewards": [...]};
a request it cannot read, or larger than --max-mb, gets a 4xx and {"error": why}; a reward that
raises or returns what is not scores, a 500 (its traceback on the server's console). GET answers
{"reward": ..., "formats": [...], "max_bytes": ...}, so a client can see that it is up.

Serving your own FILE.py:NAME imports only the standard library, numpy and pillow (and what your
file imports): it runs from an environment of the reward's own, which need not hold torch or this
project's pins (docs/rewards.md, "Rewards from an environment of their own"). Your function gets
the images as a torch tensor where torch is installed, as train.py gives them, else as a numpy
array of the same shape. A built-in reward loads as a run loads it, with torch.
"""

import argparse
import base64
import binascii
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image, UnidentifiedImageError

from machinery import checks, errors
from machinery.config import Config
from machinery.devices import cuda_available
from machinery.errors import fail
from machinery.own_reward import as_ours, own_reward
from machinery.reward_specs import REWARDS, is_url

# how the images travel: 8-bit PNG (what the built-in rewards see) or raw little-endian float32
FORMATS = ("png", "float32")
# each connection read in a thread of its own: a client that stalls holds only its own thread
SERVER = ThreadingHTTPServer


class Refused(Exception):
    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


def load(cfg):
    """The reward of cfg.reward, unchecked (the server checks its answers): reward(images,
    prompts). Your own file or module, imported by itself; a built-in one as a run loads it."""
    if is_url(cfg.reward):
        fail(f"--reward {cfg.reward}: a served reward is served already; give its name or file")
    checks.check_reward(cfg.reward)
    if cfg.reward not in REWARDS:
        return as_ours(own_reward(cfg.reward))
    from machinery.reward_loading import load_reward  # torch, transformers: a built-in's needs

    reward_fn = load_reward(cfg)
    return getattr(reward_fn, "raw", reward_fn)


def torch_or_none():
    """torch, where this environment has it (the images are then handed over as a tensor)."""
    return importlib.import_module("torch") if importlib.util.find_spec("torch") else None


def decode(images, fmt, max_bytes):
    """The request's "images" -> a numpy array (B, 3, H, W) of float32 in [0, 1]; ValueError on
    anything else, and on PNGs whose pixels as float32 would take more than max_bytes (read before
    decoding)."""
    try:
        if fmt == "png":
            if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
                raise ValueError(
                    '"images" must be a list of base64 PNG strings for "format": "png"'
                )
            decoded = [Image.open(io.BytesIO(base64.b64decode(s, validate=True))) for s in images]
            if any(image.format != "PNG" or image.mode != "RGB" for image in decoded):
                raise ValueError("every image must be an 8-bit RGB PNG")
            pixels = sum(image.size[0] * image.size[1] for image in decoded)
            if 12 * pixels > max_bytes:
                raise ValueError(
                    f"{pixels} pixels take {12 * pixels} bytes as float32, over {max_bytes}"
                )
            if len({image.size for image in decoded}) > 1:
                raise ValueError("the images differ in size")
            array = np.stack([np.asarray(image) for image in decoded]) if decoded else None
            if array is None:
                raise ValueError('"images" is empty')
            return array.transpose(0, 3, 1, 2).astype(np.float32) / 255
        shape, data = images["shape"], base64.b64decode(images["data"], validate=True)
        if len(shape) != 4 or shape[1] != 3 or min(shape) < 1:
            raise ValueError(f'"shape" {shape} is not [B, 3, H, W]')
        if len(data) != 4 * int(np.prod(shape)):
            raise ValueError(f'"data" holds {len(data)} bytes, not 4 x {"x".join(map(str, shape))}')
        return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)
    except (binascii.Error, UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
        raise ValueError(f'"images" could not be read: {error}') from None
    except (KeyError, TypeError, AttributeError):
        raise ValueError(
            '"images" must be {"shape": [B, 3, H, W], "data": base64 float32}'
        ) from None


def as_scores(values, batch, size):
    """A reward's return -> a float32 array of batch scores or (batch, H, W) maps (size: (H, W)),
    or ValueError on what it returned instead (reward_loading.as_scores, for any array type)."""
    if values is None:
        raise ValueError("returned None (no return statement?), not the batch's scores")
    if hasattr(values, "detach"):  # a torch tensor: its numbers
        values = values.detach().float().cpu().numpy()
    try:
        values = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"returned {type(values).__name__}, not numbers ({error})") from None
    if values.shape not in ((batch,), (batch, *size)):
        raise ValueError(
            f"returned shape {values.shape} for {batch} images; return {batch} scores, or a "
            f"({batch}, {size[0]}, {size[1]}) map for a pixel-wise reward"
        )
    if not np.isfinite(values).all():
        raise ValueError(f"returned non-finite values ({values.flatten()[:4].tolist()} ...)")
    return values


def read_request(handler, max_bytes):
    """The request's images (B, 3, H, W) and prompts, or Refused with the status and why."""
    length = handler.headers.get("Content-Length")
    if length is None or not (length.isascii() and length.isdigit()):
        raise Refused(411, "send a Content-Length")
    if int(length) > max_bytes:
        raise Refused(413, f"the request is {int(length)} bytes; this server takes {max_bytes}")
    try:
        request = json.loads(handler.rfile.read(int(length)))
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise Refused(400, f"the body is not JSON ({error})") from None
    if not isinstance(request, dict):
        raise Refused(400, 'the body must be a JSON object {"prompts": ..., "images": ...}')
    prompts, fmt = request.get("prompts"), request.get("format", "png")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise Refused(400, '"prompts" must be a list of strings')
    if fmt not in FORMATS:
        raise Refused(400, f'"format" {fmt!r} is not one of {", ".join(FORMATS)}')
    try:
        images = decode(request.get("images"), fmt, max_bytes)
    except ValueError as error:
        raise Refused(400, str(error)) from None
    if len(images) != len(prompts):
        raise Refused(400, f"{len(images)} images but {len(prompts)} prompts")
    return images, prompts


def make_handler(name, reward_fn, device, max_bytes):
    scoring = threading.Lock()  # one request scored at a time; the others wait their turn
    torch = torch_or_none()
    quiet = torch.no_grad if torch else contextlib.nullcontext

    class Handler(BaseHTTPRequestHandler):
        timeout = 60  # a client that stops sending mid-request frees the server

        def do_GET(self):
            self.answer(200, {"reward": name, "formats": list(FORMATS), "max_bytes": max_bytes})

        def do_POST(self):
            try:
                images, prompts = read_request(self, max_bytes)
            except Refused as error:
                return self.answer(error.status, {"error": str(error)})
            try:
                with scoring, quiet():
                    given = torch.from_numpy(images).to(device) if torch else images
                    values = reward_fn(given, prompts)
                rewards = as_scores(values, len(prompts), images.shape[-2:])
            except Exception as error:  # the reward's code, raising anything
                traceback.print_exc()
                return self.answer(
                    500, {"error": f"the reward {name}: {type(error).__name__}: {error}"}
                )
            self.answer(200, {"rewards": rewards.tolist()})

        def answer(self, status, payload):
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="reward_server.py",
        description="Serve a reward over HTTP to train.py --reward http://HOST:PORT/ "
        "(docs/reward-server.md).",
    )
    parser.error = fail
    fields = {f.name: f for f in dataclasses.fields(Config)}
    parser.add_argument("--reward", required=True, help=fields["reward"].metadata["help"])
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: loopback only)"
    )
    parser.add_argument("--device", help="torch device; default cuda when available, else cpu")
    parser.add_argument(
        "--max-mb", type=float, default=256, help="largest request taken, in MB (default: 256)"
    )
    options = {name: fields[name] for reward in REWARDS.values() for name in reward.options}
    for name, f in options.items():  # the built-in rewards' own settings
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        parser.add_argument("--" + name.replace("_", "-"), default=f.default, **kind)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if cuda_available() else "cpu")
    settings = {k: v for k, v in vars(args).items() if k in fields and k != "device"}
    return Config(**settings, device=device, out="."), args


@errors.speaking_as("reward_server.py")  # its one-line refusals say who refuses
def main(argv=None):
    cfg, args = parse_args(argv)
    if not 0 < args.max_mb < float("inf"):
        fail(f"--max-mb {args.max_mb}: give a positive number of megabytes")
    if not 0 <= args.port <= 65535:
        fail(f"--port {args.port}: a port is a number from 0 to 65535 (0: any free one)")
    reward_fn = load(cfg)
    handler = make_handler(cfg.reward, reward_fn, cfg.device, int(args.max_mb * 1e6))
    try:
        server = SERVER((args.host, args.port), handler)
    except OSError as error:  # the port taken, an address this machine does not have
        fail(f"--host {args.host} --port {args.port}: cannot listen there ({error.strerror})")
    host, port = server.server_address[:2]
    print(
        f"reward_server.py: serving {cfg.reward} on http://{host}:{port}/ ({cfg.device})",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
