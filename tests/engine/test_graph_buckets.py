"""Decode-graph bucket sizes and the measured routing between them (CPU: pure logic)."""

from __future__ import annotations

from engine.runner.cuda_graphs import batch_buckets, route_buckets


def test_buckets_cover_every_batch_up_to_the_maximum():
    for max_batch in (1, 3, 8, 100, 256, 300, 512):
        b = batch_buckets(max_batch)
        assert b == sorted(set(b)) and b[0] == 1 and b[-1] == max_batch
        assert all(y - x <= 32 for x, y in zip(b, b[1:]))


def test_a_slower_bucket_is_served_by_the_cheaper_larger_one():
    # The H100 8B shape: 448 rows cost more than 512 (cuBLAS picks another kernel).
    ms = {384: 8.9, 416: 10.6, 448: 14.5, 480: 10.5, 512: 10.3}
    routes = route_buckets(ms)
    assert routes == {384: 384, 416: 416, 448: 480, 480: 480, 512: 512}
    # 480 and 416 are within 3% of 512: they keep their own graphs, and 448 goes to the
    # smallest bucket that is as cheap as anything larger.


def test_routing_needs_more_than_the_margin_and_skips_to_the_cheapest():
    ms = {8: 1.0, 16: 1.02, 24: 3.0, 32: 2.0, 40: 1.5}
    assert route_buckets(ms, margin=0.03, min_rows=0) == {8: 8, 16: 16, 24: 40, 32: 40, 40: 40}
    assert route_buckets(ms, margin=10.0, min_rows=0) == {b: b for b in ms}
    assert route_buckets({}) == {}
    # The margin is against the cheapest larger bucket, not compounded along the way.
    assert route_buckets({8: 1.05, 16: 1.02, 24: 1.0}, min_rows=0) == {8: 16, 16: 16, 24: 24}


def test_small_buckets_are_never_rerouted():
    """Their attention split depends on the batch size, which the timing can't see."""
    ms = {64: 9.0, 128: 5.0, 256: 9.0, 288: 5.0}
    assert route_buckets(ms, min_rows=256) == {64: 64, 128: 128, 256: 288, 288: 288}
