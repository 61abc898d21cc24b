"""The worker process shared by both pools: its typed config, vLLM engine arguments, the
gRPC `Worker` service shell and metrics. The role handlers live in `prefill_worker/` and
`decode_worker/`."""
