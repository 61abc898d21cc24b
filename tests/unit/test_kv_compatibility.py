"""What two workers must share to exchange KV: stated by each from its engine's config and
weights, compared field by field, and used by the router, which pairs a prefill worker only
with a decode worker whose KV fits, and otherwise has the decode worker compute the prompt."""

from __future__ import annotations

import shutil

from pdcluster.common.kv_compatibility import describe_mismatch, kv_mismatch, weights_digest
from pdcluster.common.tiny_model.generate import TinyModelSpec, ensure_tiny_model
from pdcluster.router.config import RouterConfig
from pdcluster.router.routing_policy import PrefixIndex, place_prefill

from tests.support.worker_views import worker

SAME = {"weights": "abc", "dtype": "float32", "block_size": "128", "pdcluster": "0.1.0"}


def test_the_first_field_that_differs_is_named():
    assert kv_mismatch(SAME, dict(SAME)) is None
    assert kv_mismatch(SAME, {**SAME, "dtype": "bfloat16", "weights": "abd"}) == "dtype"  # fields in order
    assert kv_mismatch({}, {}) is None
    assert kv_mismatch(SAME, {k: v for k, v in SAME.items() if k != "pdcluster"}) == "pdcluster"  # an older worker states less
    assert describe_mismatch("block_size", SAME, {**SAME, "block_size": "16"}) == "block_size 128 != 16"
    assert describe_mismatch("pdcluster", SAME, {}) == "pdcluster 0.1.0 != unstated"


def test_weights_are_told_apart_by_content_not_by_where_they_are(model_dir, tmp_path):
    copy = shutil.copytree(model_dir, tmp_path / "elsewhere")
    assert weights_digest(str(copy)) == weights_digest(model_dir)
    # Another checkpoint of the very same shape (only the seed differs): another digest.
    assert weights_digest(str(ensure_tiny_model(spec=TinyModelSpec(seed=1)))) != weights_digest(model_dir)
    assert weights_digest("org/model-on-the-hub") == "org/model-on-the-hub"


def test_a_prefill_worker_whose_kv_does_not_fit_the_decode_worker_is_passed_over():
    config = RouterConfig(bypass_prefill_below_tokens=8)
    decode = worker("d", "decode", kv_compatibility=SAME)
    fits = worker("p1", "prefill", kv_compatibility=SAME, queued_prefill_tokens=5000)  # busier, still the only choice
    other = worker("p2", "prefill", kv_compatibility={**SAME, "weights": "xyz"})
    placement = place_prefill([other, fits], decode, 64, PrefixIndex(), lambda bs: [], config)
    assert placement.worker is fits and placement.incompatible == ((other, "weights"),)
    alone = place_prefill([other], decode, 64, PrefixIndex(), lambda bs: [], config)
    assert alone.worker is None and alone.bypass == "kv_incompatible" and alone.incompatible == ((other, "weights"),)
    short = place_prefill([other], decode, 4, PrefixIndex(), lambda bs: [], config)
    assert short.bypass == "short_prompt" and short.incompatible == ()  # no KV would move anyway
