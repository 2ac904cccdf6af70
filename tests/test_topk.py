import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neuroidx_fast as nx
from neuroidx_fast import backends
from oracles import assert_same_topk, spatial_reduce_oracle, topk_oracle
from conftest import cpu_backends

BACKENDS = cpu_backends()
INF = float("inf")


def stream(top, values, ids, positions, splits):
    start = 0
    for end in list(splits) + [values.shape[0]]:
        if end > start:
            top.update(values[start:end], ids[start:end], positions[start:end])
        start = max(start, end)
    return top


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_batches_equal_full_sort(backend, data):
    n = data.draw(st.integers(1, 40), label="images")
    c = data.draw(st.integers(1, 7), label="units")
    k = data.draw(st.integers(1, 12), label="k")
    levels = data.draw(st.sampled_from([2, 3, 1000]), label="levels")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, levels, (n, c), generator=g).float()
    values[torch.rand(n, c, generator=g) < 0.05] = INF
    values[torch.rand(n, c, generator=g) < 0.05] = -INF
    ids = torch.randperm(3 * n, generator=g)[:n]  # any distinct ids, in any order
    positions = torch.randint(0, 50, (n, c), generator=g)
    splits = sorted(data.draw(st.lists(st.integers(0, n), max_size=5), label="splits"))
    top = stream(nx.TopK(c, k, backend=backend), values, ids, positions, splits)
    assert top.count == n
    assert_same_topk(top.result(), topk_oracle(values, ids, positions, k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_larger_than_images_seen(backend):
    top = nx.TopK(3, 10, backend=backend)
    top.update(torch.tensor([[1.0, -INF, 2.0], [5.0, -INF, 2.0]]), torch.tensor([4, 2]), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    values, ids, positions = top.result()
    assert ids[0].tolist() == [2, 4] + [-1] * 8
    assert ids[1].tolist() == [2, 4] + [-1] * 8  # real -inf entries rank before empty slots, lower id first
    assert ids[2].tolist() == [2, 4] + [-1] * 8  # a value tie: the lower id first
    assert positions[0].tolist() == [4, 1] + [-1] * 8
    assert values[0, 2:].eq(-INF).all() and values[1, :2].eq(-INF).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_holds_values_not_their_graph_and_empty_batches(backend):
    # Activations that require grad (a TopK fed outside no_grad): the state must not join their graph
    # (it would keep every batch's inputs alive); an empty batch with ids=[] is nothing to add.
    top = nx.TopK(2, 3, backend=backend)
    weight = torch.ones(2, requires_grad=True)
    top.update(torch.tensor([[1.0, 2.0], [3.0, 0.5]]) * weight, torch.tensor([0, 1]))
    top.update(torch.empty(0, 2), [])
    values, ids, _ = top.result()
    assert not values.requires_grad and values.grad_fn is None
    assert values[:, :2].tolist() == [[3.0, 1.0], [2.0, 0.5]] and ids[:, :2].tolist() == [[1, 0], [0, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_unit_and_k_one(backend):
    values = torch.tensor([[3.0], [7.0], [7.0], [1.0]])
    ids = torch.tensor([9, 5, 2, 0])
    top = nx.TopK(1, 1, backend=backend)
    for i in range(4):
        top.update(values[i : i + 1], ids[i : i + 1], torch.tensor([[i]]))
    assert top.result()[1].item() == 2 and top.result()[2].item() == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 3, 5), (3, 1, 1), (2, 4, 1), (6, 3, 1)])
def test_observe_activation_maps(backend, dtype, shape):
    c, h, w = shape
    g = torch.Generator().manual_seed(c * 100 + h * 10 + w)
    x = torch.randn(11, c, h, w, generator=g).to(dtype)
    if h > 1:
        x = x.contiguous(memory_format=torch.channels_last)
    top = nx.TopK(c, 4, backend=backend)
    means = [top.observe(x[i : i + 3], torch.arange(i, min(i + 3, 11))) for i in range(0, 11, 3)]
    vmax, arg, vmean = spatial_reduce_oracle(x)
    assert_same_topk(top.result(), topk_oracle(vmax, torch.arange(11), arg, 4))
    assert torch.allclose(torch.cat(means).double(), vmean, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_observe_two_dimensional(backend):
    x = torch.randn(9, 5)
    top = nx.TopK(5, 3, backend=backend)
    top.observe(x, torch.arange(9))
    assert_same_topk(top.result(), topk_oracle(x, torch.arange(9), torch.zeros(9, 5, dtype=torch.int64), 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_raises_naming_unit_and_ids(backend):
    top = nx.TopK(4, 2, backend=backend, name="features.3")
    values = torch.zeros(3, 4)
    values[1, 2] = float("nan")
    with pytest.raises(ValueError) as info:
        top.update(values, torch.tensor([10, 11, 12]), torch.zeros(3, 4, dtype=torch.int64))
    message = str(info.value)
    assert "features.3" in message and "unit(s) 2" in message and "[11]" in message and "nan='ignore'" in message
    assert top.count == 0 and top.ids.eq(-1).all()  # nothing half-applied


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_ignore_treats_nan_as_minus_inf(backend):
    values = torch.tensor([[float("nan"), 1.0], [2.0, float("nan")], [-INF, 0.0]])
    ids = torch.tensor([0, 1, 2])
    positions = torch.zeros(3, 2, dtype=torch.int64)
    top = nx.TopK(2, 3, nan="ignore", backend=backend).update(values, ids, positions)
    expected = topk_oracle(torch.nan_to_num(values, nan=-INF, posinf=INF, neginf=-INF), ids, positions, 3)
    assert_same_topk(top.result(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_observe_nan_ignore_drops_nan_elements(backend):
    x = torch.tensor([[[[float("nan"), 2.0], [3.0, float("nan")]], [[float("nan")] * 2] * 2]])  # [1, 2, 2, 2]
    top = nx.TopK(2, 1, nan="ignore", backend=backend)
    means = top.observe(x, torch.tensor([0]))
    values, ids, positions = top.result()
    assert values[0].item() == 3.0 and positions[0].item() == 2 and means[0, 0].item() == 2.5
    assert values[1].item() == -INF and ids[1].item() == 0  # an all-NaN map counts as -inf
    with pytest.raises(ValueError, match="NaN activation"):
        nx.TopK(2, 1, backend=backend).observe(x, torch.tensor([0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_of_shards_equals_whole(backend):
    g = torch.Generator().manual_seed(3)
    values = torch.randint(0, 4, (60, 6), generator=g).float()
    ids = torch.arange(60)
    positions = torch.randint(0, 9, (60, 6), generator=g)
    shards = [nx.TopK(6, 7, backend=backend).update(values[i::3], ids[i::3], positions[i::3]) for i in range(3)]
    whole = shards[2].merge(shards[0]).merge(shards[1])
    assert whole.count == 60
    assert_same_topk(whole.result(), topk_oracle(values, ids, positions, 7))
    with pytest.raises(ValueError, match="shapes differ"):
        whole.merge(nx.TopK(6, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_of_overlapping_shards_is_refused_and_changes_nothing(backend):
    values = torch.arange(12.0).reshape(4, 3)
    a = nx.TopK(3, 2, backend=backend).update(values[:2], torch.arange(2))
    b = nx.TopK(3, 2, backend=backend).update(values[1:3], torch.arange(1, 3))  # image 1 in both tops
    before = a.result()
    with pytest.raises(ValueError, match="image id 1 .*overlap"):
        a.merge(b)
    with pytest.raises(ValueError, match="overlap"):
        a.merge(a)  # the same shard twice
    assert all(torch.equal(x, y) for x, y in zip(a.result(), before)) and a.count == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_and_resume(backend, tmp_path):
    g = torch.Generator().manual_seed(4)
    values = torch.randn(30, 5, generator=g)
    ids = torch.arange(30)
    positions = torch.randint(0, 9, (30, 5), generator=g)
    top = nx.TopK(5, 4, backend=backend).update(values[:20], ids[:20], positions[:20])
    torch.save(top.state_dict(), tmp_path / "state.pt")
    resumed = nx.TopK.from_state_dict(torch.load(tmp_path / "state.pt", weights_only=True), backend=backend)
    assert resumed.count == 20
    resumed.update(values[20:], ids[20:], positions[20:])
    assert_same_topk(resumed.result(), topk_oracle(values, ids, positions, 4))


def test_corrupt_or_foreign_state_rejected():
    state = nx.TopK(3, 2).update(torch.randn(4, 3), torch.arange(4)).state_dict()
    with pytest.raises(ValueError, match="not a TopK state"):
        nx.TopK.from_state_dict({"format": "something else"})
    shuffled = dict(state, values=state["values"].flip(1).contiguous(), ids=state["ids"].flip(1).contiguous())
    with pytest.raises(ValueError, match="top-K order"):
        nx.TopK.from_state_dict(shuffled)
    with pytest.raises(ValueError, match="must be a \\[3, 2\\]"):
        nx.TopK.from_state_dict(dict(state, ids=state["ids"].int()))
    with pytest.raises(ValueError, match="missing"):
        nx.TopK.from_state_dict({k: v for k, v in state.items() if k != "count"})
    with pytest.raises(ValueError, match="same image id twice"):
        nx.TopK.from_state_dict(dict(state, values=torch.full((3, 2), 1.0), ids=torch.zeros(3, 2, dtype=torch.int64),
                                     positions=torch.zeros(3, 2, dtype=torch.int64)))
    with pytest.raises(ValueError, match="holds 2 images but count says 1"):
        nx.TopK.from_state_dict(dict(state, count=1))
    for key, value in (("k", 2.7), ("count", 4.0), ("num_units", "3"), ("count", True)):  # (were read as ints)
        with pytest.raises(ValueError, match=f"TopK state: {key} must be an int, got {value!r}"):
            nx.TopK.from_state_dict(dict(state, **{key: value}))
    assert nx.TopK.from_state_dict(dict(state, k=np.int64(2), count=torch.tensor(4))).count == 4
    # an empty slot (id -1) ahead of a real entry: updates would drop the real one on one backend only
    one_row = {"format": state["format"], "num_units": 1, "k": 2, "count": 1, "values": torch.tensor([[5.0, 3.0]]),
               "ids": torch.tensor([[-1, 0]]), "positions": torch.tensor([[-1, 0]])}
    with pytest.raises(ValueError, match="empty slot"):
        nx.TopK.from_state_dict(one_row)
    with pytest.raises(ValueError, match="empty slot"):
        nx.TopK.from_state_dict(dict(one_row, values=torch.tensor([[3.0, float("-inf")]]), ids=torch.tensor([[0, -1]]),
                                     positions=torch.tensor([[0, 4]])))
    with pytest.raises(ValueError, match="empty slot"):  # empty slots hold id -1, not any negative id
        nx.TopK.from_state_dict(dict(one_row, values=torch.tensor([[3.0, float("-inf")]]), ids=torch.tensor([[0, -7]]),
                                     positions=torch.tensor([[0, -1]])))


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_is_a_snapshot_and_from_state_dict_copies(backend):
    a = nx.TopK(3, 2, backend=backend).update(torch.randn(4, 3), torch.arange(4))
    snapshot = a.state_dict()
    frozen = {k: v.clone() for k, v in snapshot.items() if isinstance(v, torch.Tensor)}
    b = nx.TopK.from_state_dict(snapshot, backend=backend)
    b.update(torch.full((2, 3), 100.0), torch.tensor([10, 11]))
    a.update(torch.full((1, 3), 50.0), torch.tensor([20]))
    assert all(torch.equal(snapshot[k], v) for k, v in frozen.items())  # the snapshot did not move
    assert int(a.result()[1][0, 0]) == 20 and int(b.result()[1][0, 0]) == 10  # nor did either write the other


def test_state_memory_is_constant():
    top = nx.TopK(8, 5)
    for start in range(0, 2000, 100):
        top.update(torch.randn(100, 8), torch.arange(start, start + 100))
    assert top.values.shape == top.ids.shape == top.positions.shape == (8, 5) and top.count == 2000


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda t: t.update(torch.zeros(2, 5), torch.arange(2)), ValueError, "[B, 4]"),
        (lambda t: t.update(torch.zeros(2, 4), torch.arange(3)), ValueError, "ids must be a [B] = [2]"),
        (lambda t: t.update(torch.zeros(2, 4), torch.tensor([0.0, 1.0])), TypeError, "integers"),
        (lambda t: t.update(torch.zeros(2, 4, dtype=torch.int64), torch.arange(2)), TypeError, "floating point"),
        (lambda t: t.update(torch.zeros(2, 4), torch.tensor([1, 1])), ValueError, "same image id twice"),
        (lambda t: t.update(torch.zeros(2, 4), torch.tensor([-1, 1])), ValueError, "must lie in [0, 2^63 - 1)"),
        # the largest int64 sorts with the empty slots: the torch backend and merge dropped such an image
        (lambda t: t.update(torch.zeros(1, 4), torch.tensor([2**63 - 1])), ValueError, "got 9223372036854775807"),
        # an image added twice: held twice, then refused as a corrupt state on load
        (lambda t: t.update(torch.ones(1, 4), [3]).update(torch.ones(1, 4), [3]), ValueError,
         "image id 3 was added before (unit 0 ranks it)"),
        (lambda t: t.update(torch.zeros(1, 4), [0], torch.tensor([[0, 1, -2, 0]])), ValueError,
         "positions must be flat indices >= 0 of the maxima, got -2"),
        (lambda t: t.update(torch.zeros(2, 4), torch.arange(2), torch.zeros(2, 3)), ValueError, "positions"),
        (lambda t: t.observe(torch.zeros(2, 3, 2, 2), torch.arange(2)), ValueError, "3 channels"),
    ],
)
def test_bad_update_input(call, error, words):
    with pytest.raises(error) as info:
        call(nx.TopK(4, 2))
    assert words in str(info.value)


@pytest.mark.parametrize("kwargs, words", [({"k": 0}, "k must"), ({"k": 2, "nan": "drop"}, "nan must")])
def test_bad_construction(kwargs, words):
    with pytest.raises(ValueError, match=words):
        nx.TopK(4, **kwargs)


def test_backend_choice(monkeypatch):
    assert nx.TopK(2, 2).backend == backends.AUTO_ORDER["cpu"][0]
    monkeypatch.setenv("NEUROIDX_BACKEND", "torch")
    assert nx.TopK(2, 2).backend == "torch"
    assert nx.TopK(2, 2, backend="cpp").backend == "cpp"  # the keyword wins over the environment
    monkeypatch.setenv("NEUROIDX_BACKEND", "fastest")
    with pytest.raises(ValueError, match="NEUROIDX_BACKEND"):
        nx.TopK(2, 2)
    monkeypatch.delenv("NEUROIDX_BACKEND")
    with pytest.raises(backends.BackendUnavailable, match="cannot run on cpu"):
        nx.TopK(2, 2, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        nx.spatial_reduce(torch.zeros(1, 1, 1, 1), backend="cudnn")


def test_a_device_named_with_or_without_an_index_is_the_tensors_device():
    # "cpu:0" (and on a GPU "cuda", whose tensors report "cuda:0"): batches on the device must be accepted
    top = nx.TopK(3, 2, device="cpu:0")
    top.update(torch.randn(2, 3), torch.arange(2))
    assert top.device == torch.device("cpu") and top.count == 2


def test_reduce_flags_exactly_the_batches_that_need_the_careful_path():
    """index_dataset reads every layer's ``rare`` flag in one sync a batch: a batch not flagged skips the
    NaN and overflow handling, so the flag must be up wherever that handling changes something."""
    top = nx.TopK(3, 2, backend="torch")  # (the torch reduction sums maps in float32, so 16 x 3e37 overflows)
    clean = torch.rand(2, 3, 4, 4)
    assert not bool(top.reduce(clean).rare)
    with_nan = clean.clone()
    with_nan[1, 2, 0, 0] = float("nan")
    assert bool(top.reduce(with_nan).rare)
    with pytest.raises(ValueError, match=r"NaN activation in TopK: unit\(s\) 2 on image id\(s\) \[1\]"):
        top.add_reduced(top.reduce(with_nan), True, with_nan, torch.arange(2))
    overflowing = torch.full((2, 3, 4, 4), 3e37)
    reduced = top.reduce(overflowing)
    assert bool(reduced.rare) and torch.isinf(reduced.vmean).all()
    means = top.add_reduced(reduced, True, overflowing, torch.arange(2))  # summed again in float64
    assert torch.equal(means, torch.full((2, 3), 3e37))


def test_a_batch_added_through_reduce_equals_observe():
    x = torch.randn(5, 4, 3, 3)
    seen, split = nx.TopK(4, 3), nx.TopK(4, 3)
    means = seen.observe(x, torch.arange(5))
    reduced = split.reduce(x)
    assert torch.equal(split.add_reduced(reduced, bool(reduced.rare), x, torch.arange(5)), means)
    for a, b in zip(seen.result(), split.result()):
        assert torch.equal(a, b)
