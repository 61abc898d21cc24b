"""Workers and the connector refuse a vLLM release they were not built for, by name."""

from __future__ import annotations

import pytest

from pdcluster.kv_transfer.vllm_version import SUPPORTED_VLLM_VERSIONS, check_vllm_version


def test_the_installed_vllm_is_supported():
    check_vllm_version()


@pytest.mark.parametrize("version", [f"{SUPPORTED_VLLM_VERSIONS[-1]}+cpu", f"{SUPPORTED_VLLM_VERSIONS[-1]}+cu129"])
def test_local_builds_of_a_supported_release_pass(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.33.0", "0.31.2+cpu", "0.32.1"])
def test_other_releases_fail_with_a_clear_message(version):
    with pytest.raises(RuntimeError, match=rf"vLLM {version.replace('+', '.')} is installed.*vllm==0\.32\.0"):
        check_vllm_version(version)
