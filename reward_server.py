"""Serve a reward over HTTP, for train.py --reward http://HOST:PORT/ (docs/reward-server.md): a
built-in one, a learned one on a device of its own, or your own FILE.py:NAME.

    python reward_server.py --reward jpeg --port 8000
    python reward_server.py --reward aesthetic --device cuda:1 --port 8001
    python train.py --reward http://127.0.0.1:8000/

Its code is in machinery/serving.py; it listens on the loopback address unless --host says.
"""

from machinery import serving

if __name__ == "__main__":
    serving.main()
