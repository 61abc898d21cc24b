from cluster.worker_config import parse_worker_args
from cluster.worker_host import run_worker
from prefill_worker.prefill_handler import PrefillHandler

if __name__ == "__main__":  # vLLM's CPU backend spawns processes
    run_worker(parse_worker_args("prefill"), PrefillHandler)
