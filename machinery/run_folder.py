"""What a training run writes to its folder, and how it stops and resumes:

    config.json           every setting, after presets and defaults, and the run's id (its
                          checkpoints carry it)
    prompts.txt           the prompts it trains on, copied at the start (eval_prompts.txt:
                          --eval-prompts'); resume reads them here
    metrics.jsonl         one line of metrics per epoch (and one for the final evaluation)
    samples/epoch_N.png   the first 16 samples of each epoch, captioned with prompt and reward
    samples/eval_epoch_N.png  the first 16 images of the fixed-noise evaluation after N epochs
                          (--eval-every)
    reward_curve.png      reward mean and spread against reward queries
    checkpoints/epoch_N.pt  what `train.py --resume` needs to continue exactly after epoch N
                          (checkpoints.py)
    lora/ (or unet/)      the trained weights after the last epoch (pipeline.save_weights)

Every file is written aside under a name of this process's own and renamed into place: a rename is
atomic, so a kill at any moment leaves either the old file or the new one, and a write that fails
(a full disk) removes what it wrote aside. One process at a time writes a folder (claim).
"""

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import sys

try:
    import fcntl  # POSIX; on Windows a run folder is not locked
except ImportError:
    fcntl = None


from machinery import parallel
from machinery.checks import check_out
from machinery.config import EVAL_PROMPTS_COPY, LOCK, PROMPTS_COPY
from machinery.errors import fail, stop


@contextlib.contextmanager
def claim(out, resuming, rank, needed):
    """While inside, this process alone writes the run folder: it holds an advisory lock on
    out/.lock, which the kernel releases when the process ends, however it ends (kill -9 included),
    so it never goes stale. A second train.py in the same folder, a new run or a resume, is refused
    in one line and writes nothing; what a killed run left written aside is removed. A full disk
    stops the run in one line (needed: about what an epoch writes, in bytes). Under torchrun rank 0,
    which writes the folder, holds it."""
    if rank:
        yield
        return
    # a folder can refuse what its permissions seemed to allow (a read-only or special file system)
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK, "a")
    except OSError as error:
        fail(
            f"--out {out}: the run folder cannot be made there ({error.strerror}); choose a "
            "folder you can write to"
        )
    with handle:
        try:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if resuming:
                fail(
                    f"--resume {out}: that run is still going (another process holds "
                    f"{out / LOCK}); stop it first (Ctrl-C, or kill its process), then resume it"
                )
            fail(
                f"--out {out}: another train.py is running in this folder (it holds "
                f"{out / LOCK}); choose another --out"
            )
        if not resuming:
            # again, now that it is ours: a run may have begun and ended
            # since the flags were checked
            check_out(out)
        remove_leftovers(out)
        with stopping_on_full_disk(out, needed):
            yield


# no space left, over a quota, over the file-size limit
FULL_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class FullDisk(Exception):
    """A write into the run folder failed for want of space."""

    def __init__(self, path, code):
        super().__init__(path, code)
        self.path, self.code = path, code


@contextlib.contextmanager
def stopping_on_full_disk(out, needed):
    """A FullDisk inside ends the run with one line: what failed, the space free and needed,
    how to go on."""
    try:
        yield
    except FullDisk as error:
        last = sorted((out / "checkpoints").glob("epoch_*.pt"))
        # it failed first: the folder holds nothing of the run
        if not (out / "config.json").is_file():
            then = "free space, then run the same command again"
        elif last:
            then = (
                f"the last checkpoint ({last[-1].name}) is whole: free space, then continue with: "
                f"python train.py --resume {out}"
            )
        else:
            then = (
                "the run has no checkpoint yet: free space, then start it again from epoch 0 "
                f"with: python train.py --resume {out}"
            )
        stop(
            f"writing {error.path} failed: {os.strerror(error.code)} "
            f"({megabytes(shutil.disk_usage(out).free)} free; an epoch writes about "
            f"{megabytes(needed)}); nothing half-written is left, {then}"
        )


def megabytes(size):
    return f"{size / 2**20:.1f} MB"


def epoch_bytes(params):
    """About what an epoch adds to the run folder before it removes the old: a checkpoint (the
    trainable weights and Adam's two moments), the exported weights, and under 1 MB of images
    and metrics."""
    return 4 * sum(p.nbytes for p in params) + 2**20


def full_disk_errno(error):
    """The errno of a write that failed for want of space, from error or the errors behind it
    (torch.save and safetensors wrap Python's OSError, or give only its number in their
    message); else None."""
    while error is not None:
        codes = (
            [error.errno]
            if isinstance(error, OSError)
            else [int(n) for n in re.findall(r"os error (\d+)", str(error))]
        )
        if FULL_DISK.intersection(codes):
            return FULL_DISK.intersection(codes).pop()
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def writing(path, aside=None):
    """Around the writing of path, through the file or folder aside: whatever stops it, aside is
    removed; a write that failed for want of space is raised again as FullDisk(path)."""
    try:
        yield
    except BaseException as error:
        if aside is not None:
            remove(aside)
        code = full_disk_errno(error)
        if code is not None:
            raise FullDisk(path, code) from error
        raise


def remove(path):
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def aside(path, kind="tmp"):
    """The name path is written under before it is renamed into place: hidden, and this
    process's own."""
    return path.with_name(f".{path.stem}.{os.getpid()}.{kind}{path.suffix}")


# aside()'s names, and those of earlier versions
LEFTOVER = re.compile(r"\.(.+?)\.(\d+\.)?(tmp|new|old)(\.\w+)?")


def remove_leftovers(out):
    """What a killed run left written aside (the lock says no other process is writing): removed,
    but for exported weights it had moved aside and not yet replaced, which go back in place."""
    for folder in (out, out / "checkpoints", out / "samples"):
        for leftover in folder.glob(".*"):
            match = LEFTOVER.fullmatch(leftover.name)
            if match and match[3] == "old" and not (folder / match[1]).exists():
                leftover.rename(folder / match[1])  # killed between export_weights' two renames
            elif match:
                remove(leftover)


def write_config(out, config, prompts, eval_prompts):
    """config.json, and the prompts copied beside it (resume trains on these,
    whatever became of --prompts)."""
    write_atomic(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    for name, lines in ((PROMPTS_COPY, prompts), (EVAL_PROMPTS_COPY, eval_prompts)):
        if lines is not None:
            write_atomic(
                out / name,
                lambda tmp: tmp.write_text(
                    "".join(line + "\n" for line in lines), encoding="utf-8"
                ),
            )
    with writing(out / "samples"):
        (out / "samples").mkdir(exist_ok=True)


def update_config(out, **changes):
    """config.json with these settings changed (a resumed run's reward
    file, accepted as it is now)."""
    saved = json.loads((out / "config.json").read_text())
    if any(saved.get(key) != value for key, value in changes.items()):
        write_atomic(
            out / "config.json",
            lambda tmp: tmp.write_text(json.dumps({**saved, **changes}, indent=2)),
        )


def write_atomic(path, write):
    """write(tmp_path), flushed to disk, then renamed onto path; on a failure nothing is
    left aside."""
    tmp = aside(path)
    with writing(path, tmp):
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


# exit status of a run stopped cleanly by a signal at a checkpoint: resume it
# (EX_TEMPFAIL, "try again")
STOPPED = 75
# no SIGHUP on Windows
STOP_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []),
)


@contextlib.contextmanager
def stop_signals(out):
    """Inside it, the first Ctrl-C, a SIGTERM (preemption, time limits) or a SIGHUP (its terminal
    closed) only asks the run to stop: the list it yields is no longer empty, and the loop stops
    after the epoch's checkpoint. A second Ctrl-C stops at once (exit 130), losing only the epoch in
    progress. On the way out the signal handlers are given back and the processes
    leave their group."""
    requested = []

    def on_signal(signum, frame):
        requested.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        print(
            f"\n{signal.Signals(signum).name}: stopping after this epoch's checkpoint (Ctrl-C "
            "again to stop at once)",
            file=sys.stderr,
        )

    previous_handlers = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    try:
        yield requested
    except KeyboardInterrupt:
        print(
            "\nstopped during an epoch; its work is lost, the checkpoints before it are not: "
            f"python train.py --resume {out}",
            file=sys.stderr,
        )
        sys.exit(130)
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        parallel.teardown()


def write_metrics(out, history):
    """metrics.jsonl, one line an epoch, written whole each time (a failed write never
    leaves half a line)."""
    lines = "".join(json.dumps(m) + "\n" for m in history)
    write_atomic(out / "metrics.jsonl", lambda tmp: tmp.write_text(lines))
