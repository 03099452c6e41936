"""The layer split's plan and the multi-device options' checks (engine.split): no tensors."""

import pytest

from engine.errors import InvalidRequestError
from engine.split import (check_available, check_mode, parse_devices, parse_split_ratio, plan_layer_split)

MB = 2**20


def test_devices_are_read_as_canonical_names():
    assert parse_devices("cuda:0, CUDA:1,cpu") == ("cuda:0", "cuda:1", "cpu")
    assert parse_devices("cuda") == ("cuda:0",)
    assert parse_devices("cpu,cpu") == ("cpu", "cpu")  # both modes can be tried without a GPU


@pytest.mark.parametrize("text, says", [("", "separated by commas"), ("cuda:0,,cpu", "separated by commas"),
                                        ("gpu0", "unknown device 'gpu0'"), ("cuda:0,cuda", "cuda:0 twice"),
                                        ("mps", "unknown device")])
def test_bad_devices_say_what_to_write(text, says):
    with pytest.raises(InvalidRequestError, match=says) as e:
        parse_devices(text)
    assert e.value.options == ("devices",)


def test_a_gpu_that_is_not_here_is_named():
    check_available(("cuda:0", "cuda:1"), 2)
    with pytest.raises(InvalidRequestError, match=r"cuda:2, but torch sees 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        check_available(("cuda:0", "cuda:2"), 2)
    with pytest.raises(InvalidRequestError, match="no CUDA GPU"):
        check_available(("cuda:0", "cpu"), 0)
    check_available(("cpu", "cpu"), 0)


def test_split_ratio_is_one_positive_share_per_device():
    assert parse_split_ratio("3,1", 2) == (0.75, 0.25)
    for text, says in (("0.6", "1 shares for 2 devices"), ("0.6,x", "one number per device"),
                       ("1,0", "positive"), ("1,-1", "positive"), ("1,nan", "positive"), ("1,inf", "positive")):
        with pytest.raises(InvalidRequestError, match=says):
            parse_split_ratio(text, 2)


def test_tensor_parallel_needs_devices_of_one_kind():
    assert check_mode("tensor", ("cuda:0", "cuda:1")) == "tensor"
    assert check_mode("tensor", ("cpu", "cpu")) == "tensor"
    assert check_mode("layer", ("cuda:0", "cpu")) == "layer"
    with pytest.raises(InvalidRequestError, match="--split layer"):
        check_mode("tensor", ("cuda:0", "cpu"))
    with pytest.raises(InvalidRequestError, match="layer or tensor"):
        check_mode("pipeline", ("cuda:0", "cuda:1"))


def test_gpus_share_layers_by_their_room_and_the_ends_carry_embedding_and_head():
    plan = plan_layer_split(("cuda:0", "cuda:1"), 32, 100 * MB, 500 * MB, 600 * MB, room=(3000 * MB, 1700 * MB))
    # 3000 : 1700 of 32 layers is 20.4 : 11.6; the first can hold 25, the second 11
    assert plan.ranges == (range(0, 21), range(21, 32))
    assert plan.bytes_per_device == (21 * 100 * MB + 500 * MB, 11 * 100 * MB + 600 * MB)
    assert plan.device_of(20) == "cuda:0" and plan.device_of(21) == "cuda:1"
    assert plan.describe() == "cuda:0: layers 0-20, cuda:1: layers 21-31"


def test_a_gpu_takes_no_more_than_it_holds():
    # room about 1 : 1, but the first also holds a 900 MB embedding: 11 layers at most there
    plan = plan_layer_split(("cuda:0", "cuda:1"), 32, 100 * MB, 900 * MB, 0, room=(2000 * MB, 2100 * MB))
    assert [len(r) for r in plan.ranges] == [11, 21]


def test_a_trailing_cpu_takes_only_what_the_gpus_cannot_hold():
    plan = plan_layer_split(("cuda:0", "cpu"), 32, 100 * MB, 50 * MB, 60 * MB, room=(2000 * MB, 64 * 2**30))
    # The head stays on the GPU beside the embedding: (2000 - 50 - 60) // 100 = 18 layers there.
    assert plan.ranges == (range(0, 18), range(18, 32))
    plan = plan_layer_split(("cuda:0", "cpu"), 32, 100 * MB, 50 * MB, 60 * MB, room=(80 * 2**30, 64 * 2**30))
    assert plan.ranges == (range(0, 31), range(31, 32))  # named, so it holds one


def test_a_ratio_places_layers_whatever_the_room():
    plan = plan_layer_split(("cuda:0", "cuda:1"), 32, MB, 0, 0, ratio=parse_split_ratio("0.6,0.4", 2))
    assert [len(r) for r in plan.ranges] == [19, 13]
    plan = plan_layer_split(("cpu", "cpu", "cpu"), 4, MB, 0, 0, ratio=(0.98, 0.01, 0.01))
    assert [len(r) for r in plan.ranges] == [2, 1, 1]  # every device named holds a layer


def test_a_model_that_does_not_fit_says_by_how_much_and_what_to_do():
    with pytest.raises(InvalidRequestError, match=r"needs about 3\.23 GiB .* 0\.30 GiB more than they have\. "
                                                  r"Add a device \(the CPU last"):
        plan_layer_split(("cuda:0", "cuda:1"), 32, 100 * MB, 50 * MB, 60 * MB, room=(1500 * MB, 1500 * MB))
    with pytest.raises(InvalidRequestError, match="cuda:1 can't hold even one layer"):
        plan_layer_split(("cuda:0", "cuda:1"), 4, 100 * MB, 0, 60 * MB, room=(10**5 * MB, 100 * MB))
    with pytest.raises(InvalidRequestError, match="fewer than the 3 devices"):
        plan_layer_split(("cpu", "cpu", "cpu"), 2, MB, 0, 0, ratio=(1, 1, 1))
