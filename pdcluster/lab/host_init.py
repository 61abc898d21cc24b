"""PID 1 of an emulated host: gives the host its own /tmp and hostname, then reaps orphans (as
an init does) until the lab is torn down. `python -m pdcluster.lab.host_init TMP_DIR NAME`, run
inside fresh PID, mount and UTS namespaces."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def main() -> None:
    tmp_dir, name = sys.argv[1], sys.argv[2]
    subprocess.run(["mount", "--bind", tmp_dir, "/tmp"], check=True)  # Ray's session, sockets and logs stay on their host
    socket.sethostname(name)
    print("ready", flush=True)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(0.5)


if __name__ == "__main__":
    main()
