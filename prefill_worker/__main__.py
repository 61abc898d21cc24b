from pdcluster.common.worker_record import Role
from pdcluster.prefill_worker.prefill_handler import PrefillHandler
from pdcluster.worker.config import parse_worker_config
from pdcluster.worker.host import run_worker

if __name__ == "__main__":  # vLLM's CPU backend spawns processes
    run_worker(parse_worker_config(Role.PREFILL), {Role.PREFILL: PrefillHandler})
