"""Beyond the paper: a reward served over HTTP (--reward http://HOST:PORT/PATH), the client's side
and its half of the wire format (encode; the server's decode and the FORMATS both take are in
serving.py, python reward_server.py). The
protocol is docs/reward-server.md.

Each batch's request leaves as soon as the sampler has drawn the batch (submit), so the server
scores it while the next batch is sampled; the epoch's reward call then collects the answers. A
request has a timeout; a failed one is tried again, waiting 1, 2, 4 ... s; a server that stays away
ends the run in one line. Nothing on the wire is unpickled: JSON, with the images as base64 PNG
(8-bit, what the in-process rewards see through rewards.to_pil) or raw little-endian float32.
"""

import base64
import io
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from rewards import to_pil


class Unavailable(Exception):
    """The server did not answer, or answered what is not a batch's scores: one line on which, and
    what to do before the run continues (fix)."""

    def __init__(self, problem, fix="once the server answers again,"):
        super().__init__(problem)
        self.fix = fix


def encode(images, fmt):
    """(B, 3, H, W) in [0, 1] -> the request's "images": a list of base64 PNGs, or float32 bytes."""
    if fmt == "png":
        pngs = []
        for image in to_pil(images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            pngs.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        return pngs
    array = images.detach().float().cpu().numpy().astype("<f4")
    return {"shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode("ascii")}


class ServedReward:
    """reward(images, prompts) -> the server's scores, a tensor (B,) or (B, H, W). submit(images,
    prompts) posts a batch now, one request of this process in flight at a time (the timeout covers
    its wait behind other processes' requests in the server's queue); the call on the submitted
    batches' prompts collects them, and a call on the first submitted batch's own images peeks at
    its answer (the run's check). Proxies in the environment are not used: a reward server is
    near."""

    def __init__(self, url, fmt="png", timeout=120.0, retries=3, backoff=1.0):
        self.url, self.fmt, self.timeout, self.retries, self.backoff = (
            url,
            fmt,
            timeout,
            retries,
            backoff,
        )
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="served-reward")
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.pending, self.closed = [], False  # (images, prompts, future) of each batch posted

    def submit(self, images, prompts):
        future = self.pool.submit(self.post, images.detach().cpu(), list(prompts))
        self.pending.append((images, list(prompts), future))

    def __call__(self, images, prompts):
        prompts, submitted = list(prompts), [p for _, batch, _ in self.pending for p in batch]
        if self.pending and images is self.pending[0][0]:  # the first batch's check
            return self.pending[0][2].result()
        pending, self.pending = self.pending, []
        if pending and submitted == prompts:  # the epoch, posted batch by batch
            return torch.cat([future.result() for _, _, future in pending])
        for _, _, future in pending:  # not this call's: nothing waits for them
            future.cancel()
        return self.post(images, prompts)

    def abandon(self):
        """The run stops: no more tries, nothing queued; at most the request in flight finishes."""
        self.closed = True
        self.pool.shutdown(wait=False, cancel_futures=True)

    def post(self, images, prompts):
        body = json.dumps(
            {"prompts": prompts, "format": self.fmt, "images": encode(images, self.fmt)}
        ).encode()
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            if self.closed:
                raise Unavailable("the run stopped")
            request = urllib.request.Request(
                self.url, data=body, headers={"Content-Type": "application/json"}
            )
            try:
                with self.opener.open(request, timeout=self.timeout) as response:
                    return scores(response.read(), len(prompts))
            except urllib.error.HTTPError as error:
                last = f"HTTP {error.code}: {server_reason(error)}"
                if error.code not in (502, 503, 504):  # not a server away: asking again won't help
                    fix = "fix the reward on the server (its traceback is on its console), then"
                    raise Unavailable(
                        f"the server answered {last}", fix if error.code >= 500 else "fix it, then"
                    ) from None
            except (urllib.error.URLError, OSError) as error:
                reason = getattr(error, "reason", error)
                last = f"{type(reason).__name__}: {reason}"
        raise Unavailable(
            f"no answer from {self.url} after {self.retries + 1} tries, {self.timeout:g} s each "
            f"at most ({last})"
        )


def scores(body, count):
    """The answer {"rewards": [...]} -> a float32 tensor of count scores (or maps)."""
    try:
        values = np.asarray(json.loads(body)["rewards"], dtype=np.float32)
    except (ValueError, KeyError, TypeError) as error:
        raise Unavailable(
            f'the server answered what is not {{"rewards": [...]}} ({error})',
            "fix the server's answers, then",
        ) from None
    if values.ndim not in (1, 3) or len(values) != count:
        raise Unavailable(
            f"the server answered {values.shape[0] if values.ndim else 'no'} scores (shape "
            f"{values.shape}) for {count} images",
            "fix the server's answers, then",
        )
    return torch.from_numpy(values)


def server_reason(error):
    try:
        return json.loads(error.read())["error"]
    except (ValueError, KeyError, TypeError, OSError):
        return error.reason


def probe(url, timeout=10.0):
    """None when something answers HTTP at url (any status), else one line on why not."""
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # a server, even one that answers GET with an error
    except (urllib.error.URLError, OSError, ValueError) as error:
        return (
            f"{type(getattr(error, 'reason', error)).__name__}: {getattr(error, 'reason', error)}"
        )
    return None
