"""seqgraph/buffers.py: large CPU buffers come back for a later call only once nothing else
holds their memory, small ones and reuse switched off come straight from torch, what is kept
is bounded, and a compiled loop whose buffers are reused computes what the reference does."""
import pytest
import torch

import seqgraph as sg
from seqgraph import buffers

BIG = (1024, 512)  # 2 MiB of float32: above MIN_BYTES


@pytest.fixture(autouse=True)
def fresh_pool():
    buffers.clear()
    yield
    buffers.clear()


def test_a_buffer_comes_back_once_nothing_else_holds_it():
    like = torch.zeros(())
    a = buffers.empty(like, BIG)
    ptr = a.data_ptr()
    del a
    b = buffers.empty(like, BIG)
    assert b.data_ptr() == ptr and b.shape == BIG and b.is_contiguous()


def test_a_buffer_in_use_is_not_handed_out_again():
    like = torch.zeros(())
    a = buffers.empty(like, BIG)
    b = buffers.empty(like, BIG)
    assert a.data_ptr() != b.data_ptr()


def test_a_view_or_a_saved_tensor_keeps_a_buffer_taken():
    like = torch.zeros(())
    a = buffers.empty(like, BIG)
    row = a[3]  # a view the caller keeps
    ptr = a.data_ptr()
    del a
    assert buffers.empty(like, BIG).data_ptr() != ptr
    del row
    w = torch.ones(BIG[1], requires_grad=True)
    c = buffers.empty(like, BIG)
    assert c.data_ptr() == ptr
    y = c * w  # autograd saves c for w's gradient
    del c
    assert buffers.empty(like, BIG).data_ptr() != ptr
    y.sum().backward()  # the saved tensor is released
    assert buffers.empty(like, BIG).data_ptr() == ptr


def test_small_buffers_and_reuse_switched_off_come_straight_from_torch(monkeypatch):
    like = torch.zeros(())
    small = buffers.empty(like, (4, 4))
    assert small._base is None and buffers.kept_bytes() == 0
    monkeypatch.setenv("SEQGRAPH_REUSE_BUFFERS", "0")
    big = buffers.empty(like, BIG)
    assert big._base is None and buffers.kept_bytes() == 0


def test_every_buffer_of_a_shape_a_call_took_comes_back_for_the_next():
    like = torch.zeros(())
    first = [buffers.empty(like, BIG) for _ in range(5)]  # a layer-norm LSTM saves five of a shape
    pointers = {t.data_ptr() for t in first}
    del first
    again = [buffers.empty(like, BIG) for _ in range(5)]  # (held: a dropped one is free at once)
    assert {t.data_ptr() for t in again} == pointers


def test_past_the_cap_a_buffer_comes_straight_from_torch_and_none_in_use_is_dropped():
    like = torch.zeros(())
    held = [buffers.empty(like, BIG) for _ in range(buffers.KEEP)]
    extra = buffers.empty(like, BIG)
    assert extra._base is None and buffers.kept_bytes() == buffers.KEEP * 2 * 2**20
    pointers = {t.data_ptr() for t in held}
    del held
    again = [buffers.empty(like, BIG) for _ in range(buffers.KEEP)]
    assert {t.data_ptr() for t in again} == pointers


def test_kept_buffers_are_bounded_in_number_and_in_bytes(monkeypatch):
    like = torch.zeros(())
    held = [buffers.empty(like, BIG) for _ in range(buffers.KEEP + 2)]
    assert buffers.kept_bytes() == buffers.KEEP * 2 * 2**20
    monkeypatch.setattr(buffers, "LIMIT", 5 * 2**20)
    held += [buffers.empty(like, (2048, 512)) for _ in range(2)]  # 4 MiB each: the oldest go first
    assert buffers.kept_bytes() <= 5 * 2**20
    assert len(held) == buffers.KEEP + 4


def test_zeros_are_zero_even_when_the_memory_is_reused():
    like = torch.zeros(())
    a = buffers.empty(like, BIG)
    a.fill_(7.0)
    del a
    assert torch.count_nonzero(buffers.zeros(like, BIG)) == 0


def test_buffers_made_in_inference_mode_are_not_handed_to_autograd():
    like = torch.zeros(())
    with torch.inference_mode():
        a = buffers.empty(like, BIG)
    assert a.is_inference()
    del a
    assert not buffers.empty(like, BIG).is_inference()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_compiled_loop_reusing_its_buffers_gives_the_reference_gradients(backend):
    torch.manual_seed(0)
    rec = sg.Recurrence(sg.cells.lstm(64, 128))
    comp = sg.compile(rec, backend=backend)
    xs = [torch.randn(40, 64, 64, requires_grad=True) for _ in range(4)]  # a state is (41, 64, 128): 1.3 MiB
    losses = [lambda y: y.sum(), lambda y: y.square().sum(), lambda y: y.sum() + y.square().sum(),
              lambda y: y.cos().sum()]
    outs = [comp(x)[0] for x in xs[:3]]  # three graphs alive at once: each has buffers of its own
    losses[1](outs[1]).backward()  # gives its buffers back
    kept = buffers.kept_bytes()
    outs.append(comp(xs[3])[0])  # takes them
    assert buffers.kept_bytes() == kept
    for k in (0, 3, 2):
        losses[k](outs[k]).backward()
    for x, loss in zip(xs, losses):
        ref_x = x.detach().requires_grad_()
        loss(rec(ref_x)[0]).backward()
        torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork is POSIX only")
def test_a_child_forked_while_another_thread_holds_the_lock_can_take_buffers():
    import os
    import threading
    like = torch.zeros(())
    buffers._lock.acquire()  # as another thread inside empty() at the moment of the fork
    try:
        pid = os.fork()
        if pid == 0:  # the child: one pooled allocation, then out (a hang fails the wait below)
            ok = buffers.empty(like, BIG).shape == BIG
            os._exit(0 if ok else 1)
    finally:
        buffers._lock.release()
    done = threading.Event()
    result = {}

    def wait():
        result["status"] = os.waitpid(pid, 0)[1]
        done.set()
    threading.Thread(target=wait, daemon=True).start()
    if not done.wait(20):
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung taking a buffer")
    assert os.WIFEXITED(result["status"]) and os.WEXITSTATUS(result["status"]) == 0


def test_a_free_buffer_serves_a_call_of_fewer_elements_down_to_half():
    like = torch.zeros(())
    a = buffers.empty(like, (300, 2048))  # another T every batch (bucketed or unpadded batches)
    ptr = a.data_ptr()
    del a
    b = buffers.empty(like, (200, 2048))
    assert b.data_ptr() == ptr and b.shape == (200, 2048) and b.is_contiguous()
    del b
    assert buffers.empty(like, (100, 2048)).data_ptr() != ptr  # (less than half: a buffer of its own)


def test_calls_of_changing_sizes_keep_about_what_the_largest_call_takes():
    # (kept by exact shape, 200 batches of random T filled the pool to its 1 GiB limit)
    like, gen = torch.zeros(()), torch.Generator().manual_seed(0)
    for _ in range(200):
        T = int(torch.randint(20, 301, (1,), generator=gen))
        held = [buffers.empty(like, (T, 32, 1024)) for _ in range(4)]  # one call's saved gates
        del held
    largest = 4 * 300 * 32 * 1024 * 4
    assert buffers.kept_bytes() <= 2.5 * largest


def test_a_larger_buffer_supersedes_the_free_smaller_ones():
    like = torch.zeros(())
    [buffers.empty(like, BIG) for _ in range(2)]  # both free again at once
    new = buffers.empty(like, (4096, 512))
    assert new._base is not None and buffers.kept_bytes() == 8 * 2**20


def test_past_the_cap_a_free_buffer_no_longer_asked_for_makes_room(monkeypatch):
    monkeypatch.setattr(buffers, "KEEP", 2)
    like = torch.zeros(())
    [buffers.empty(like, (8192, 512)) for _ in range(2)]  # 16 MiB each, free again at once
    small = buffers.empty(like, (512, 512))  # 1 MiB: less than 1/SPARE of them, a base of its own
    assert small._base is not None and buffers.kept_bytes() == (16 + 1) * 2**20


def test_capacity_rounds_up_by_at_most_a_quarter():
    for n in (1, 7, 8, 9, 1000, 2**20, 2**20 + 1, 3 * 10**6):
        c = buffers._capacity(n)
        assert n <= c <= max(n * 5 // 4, n + 1)
