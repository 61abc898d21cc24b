"""The front door: OpenAI-compatible HTTP and gRPC `Inference`, routing prefill -> decode."""
