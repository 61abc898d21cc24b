"""PID 1 of an emulated host: gives the host its hostname, then reaps orphans (as an init does)
until the lab is torn down. `python -m pdcluster.lab.host_init NAME`, run inside fresh PID,
mount and UTS namespaces."""

from __future__ import annotations

import os
import socket
import sys
import time


def main() -> None:
    socket.sethostname(sys.argv[1])
    print("ready", flush=True)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(0.5)


if __name__ == "__main__":
    main()
