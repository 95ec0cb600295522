"""Your own reward (--reward FILE.py:NAME or module:NAME): imported from its file or module, and
called as this project calls a reward. The standard library only, so that reward_server.py can
serve your file from an environment that holds none of this project's packages.
"""

import importlib
import importlib.util
import inspect
from pathlib import Path

from machinery.errors import fail


def own_reward(spec):
    """Your function NAME of --reward FILE.py:NAME (the file run as a module of its own) or
    module:NAME (imported), or one line on why it cannot be had."""
    where, _, name = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            found = importlib.util.spec_from_file_location(f"reward_{Path(where).stem}", where)
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as error:  # the user's code, raising anything
        fail(f"--reward {spec}: importing {where} failed ({type(error).__name__}: {error})")
    if not callable(getattr(module, name, None)):
        fail(f"--reward {spec}: {where} defines no function {name}")
    return getattr(module, name)


def as_ours(fn):
    """fn called as this project calls a reward, fn(images, prompts) -> scores. A function of TRL's
    or the official port's signature, fn(images, prompts, metadata) returning (rewards, info), is
    called as they call it (metadata: one empty dict a prompt) and its info dropped."""
    with_metadata = takes_metadata(fn)

    def reward(images, prompts):
        values = fn(images, prompts, *([[{} for _ in prompts]] if with_metadata else []))
        if isinstance(values, tuple) and len(values) == 2 and isinstance(values[1], dict):
            values = values[0]  # TRL's and the port's (rewards, info)
        return values

    return reward


def takes_metadata(fn):
    """Whether fn is called as TRL and the official port call a reward, fn(images, prompts,
    metadata): it needs a third positional argument. Ours is fn(images, prompts)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without one: called as ours
        return False
    try:
        signature.bind(None, None)
        return False
    except TypeError:
        pass
    try:
        signature.bind(None, None, None)
        return True
    except TypeError:
        return False
