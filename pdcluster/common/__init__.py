"""Helpers every part may use: TLS, processes, files, periodic loops, the worker record, the
Redis registry and the tiny model. They import no other pdcluster package."""
