"""Reaching the Hugging Face hub: whether it answers, and a model loaded from a folder, the hub's
cache or the hub, or one line on why it cannot be (the flag that chose it and the fix)."""

import os
import re
import socket
import urllib.parse
from pathlib import Path

from huggingface_hub import constants as hf_constants


def hub_reachable(timeout=3.0):
    """Whether the Hugging Face hub can be reached (HF_HUB_OFFLINE=1: no), asked once with a short
    timeout: without a network the hub client would spend a minute and a half in retries. Behind a
    proxy the answer is yes, and the client's own retries decide."""
    if hf_constants.HF_HUB_OFFLINE:
        return False
    if any(
        os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    ):
        return True
    url = urllib.parse.urlparse(hf_constants.ENDPOINT)
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout
        ).close()
        return True
    except OSError:
        return False


def pretrained(cls, model_id, flag, **kwargs):
    """cls.from_pretrained(model_id) from a folder, the hub cache, or the hub when it is reachable;
    else an OSError whose one line names the model, the flag that chose it, and the fix."""
    try:
        return cls.from_pretrained(model_id, local_files_only=not hub_reachable(), **kwargs)
    except (OSError, ValueError) as error:
        # a folder, not a hub id
        if Path(model_id).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", model_id):
            raise OSError(
                f"{flag} {model_id}: not a readable model folder ({type(error).__name__}); pass a "
                "folder saved by save_pretrained, or a hub id"
            ) from error
        raise OSError(
            f"{flag} {model_id}: cannot load it ({type(error).__name__}: no network, not in the "
            f"hub cache, or no such model); download it first with `hf download {model_id}`, or "
            f"pass a local folder with {flag}"
        ) from error
