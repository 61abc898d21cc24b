"""`python -m pdcluster.role_switching_worker --role prefill|decode [worker flags]`: a worker
that starts in one pool and can move to the other (`SwitchRole`), so the cluster follows a
shift in the load's prefill:decode balance without starting engines. It hosts both roles'
handlers, the one place that composes them."""

from __future__ import annotations

import argparse

from pdcluster.common.worker_record import ROLES, Role
from pdcluster.decode_worker.decode_handler import DecodeHandler
from pdcluster.prefill_worker.prefill_handler import PrefillHandler
from pdcluster.worker.config import parse_worker_config
from pdcluster.worker.host import run_worker

if __name__ == "__main__":  # vLLM's CPU backend spawns processes
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--role", choices=ROLES, required=True, help="the role it starts in")
    known, rest = parser.parse_known_args()
    config = parse_worker_config(Role(known.role), [*rest, "--role-switching"])
    run_worker(config, {Role.PREFILL: PrefillHandler, Role.DECODE: DecodeHandler})
