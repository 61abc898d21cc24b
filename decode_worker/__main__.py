from cluster.worker_config import parse_worker_args
from cluster.worker_host import run_worker
from decode_worker.decode_handler import DecodeHandler

if __name__ == "__main__":  # vLLM's CPU backend spawns processes
    run_worker(parse_worker_args("decode"), DecodeHandler)
