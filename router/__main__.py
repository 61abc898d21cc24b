"""`python -m pdcluster.router --worker HOST:PORT ...`: the router alone, in front of running workers."""

import sys

from pdcluster.router.config import parse_router_args
from pdcluster.router.server import run_router

if __name__ == "__main__":
    sys.exit(run_router(parse_router_args()))
