"""pdcluster: a disaggregated prefill/decode LLM serving cluster on vLLM and Ray.

The top-level folders of the repository install under this one import root
(`pdcluster.router`, `pdcluster.cluster`, ...); `pdcluster.common` holds the helpers they share.
"""
