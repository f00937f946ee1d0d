"""``profiling.host_syncs``: each call that reads a tensor's data on the host is counted once, with its tensor's
device; the calls that only queue work are not."""

from __future__ import annotations

import torch

from spava_ds.profiling import host_syncs


def test_counts_each_syncing_call_once():
    x = torch.tensor([3, 1, 2])
    with host_syncs() as syncs:
        x.tolist()
        x[0].item()
        bool(x[1])
        torch.unique_consecutive(x, return_counts=True)
        torch.unique(x)
        torch.repeat_interleave(x, x)
        x.nonzero()
        torch.masked_select(x, x > 1)
        torch.equal(x, x)
    assert syncs.by_name() == {"tolist": 1, "_local_scalar_dense": 2, "unique_consecutive": 1, "_unique2": 1,
                               "repeat_interleave": 1, "nonzero": 1, "masked_select": 1, "equal": 1}
    assert syncs.count("cpu") == 9 and syncs.count("cuda") == 0 and syncs.count() == 9


def test_queued_work_is_not_counted():
    x = torch.randn(4, 3, requires_grad=True)
    with host_syncs() as syncs:
        y = (x @ x.T).softmax(-1)[torch.tensor([0, 2])]
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 1]), output_size=3)
        y.sum().backward()
        x.to(torch.float64)
    assert syncs.calls == []
    with host_syncs() as syncs:   # the block ends its hooks: nothing is counted after it
        pass
    x.sum().item()
    assert syncs.count() == 0


def test_copies_between_host_and_device_are_counted_with_the_device():
    # The meta device stands in for a GPU on a CPU-only machine: the same copies, no data.
    x = torch.tensor([1, 2, 3])
    with host_syncs() as syncs:
        x.to("meta")
        torch.tensor([[4, 5, 6]], device="meta")
        torch.empty(3, device="meta").copy_(x)
        x.to("meta", non_blocking=True)         # queued, not waited for
        torch.arange(3, device="meta")          # made on the device: no host data
    assert syncs.calls == [("copy_to_device", "meta")] * 3
