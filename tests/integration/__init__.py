"""Real vLLM engines on CPU, gRPC over loopback, Redis and TLS, without Ray."""
