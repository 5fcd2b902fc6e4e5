"""The benchmark harness (seqgraph/bench.py) measures what it says: its eager loops compute the
same cells as seqgraph (same weights, same outputs), and a run yields one row per peer with
the ratio column. Nothing here times anything."""
import pytest
import torch

import seqgraph as sg
from seqgraph import bench


@pytest.mark.parametrize("name", bench.CELLS)
def test_the_eager_loop_computes_the_same_cell_as_seqgraph(name):
    torch.manual_seed(0)
    rec = sg.Recurrence(bench.make_cell(name, 6, 6)).double()
    params = {k: v.detach() for k, v in rec.param_tensors().items()}
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    zeros = tuple(torch.zeros((3,) + prev.shape, dtype=torch.float64) for prev, _ in rec.cell.states)
    want, _ = rec(x)
    got, _ = bench.eager_loop(bench.eager_step(name, params))(x, zeros)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_a_run_gives_one_row_per_peer_and_a_table_with_ratios(monkeypatch):
    monkeypatch.setitem(bench.SIZES, "tiny", (3, 2, 4))
    peers = {"cudnn", "eager", "seqgraph-torch", "seqgraph-cpu"}
    rows = bench.run_case("lstm", "tiny", torch.device("cpu"), torch.float32, 1, peers)
    assert [r["peer"] for r in rows] == ["torch.nn.LSTM", "eager loop", "seqgraph torch", "seqgraph cpu"]
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 for r in rows)
    table = bench.format_table(rows)
    assert "| lstm | 3,2,4 | torch.nn.LSTM |" in table and "| 1.00x |" in table


def test_interleaved_medians_run_each_function_in_turn():
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    medians = bench.interleaved_medians_ms(fns, torch.device("cpu"), reps=3, warmup=1)
    assert len(medians) == 2 and calls == ["a", "b"] + ["a", "b"] * 3


def test_bursts_run_each_function_several_times_in_a_row_and_time_all_but_the_first(monkeypatch):
    now, calls = [0.0], []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])

    def fn(name):
        def run():  # the first run of a burst takes 1 s, the others 2 ms
            now[0] += 1.0 if not calls or calls[-1] != name else 0.002
            calls.append(name)
        return run
    medians = bench.interleaved_medians_ms([fn("a"), fn("b")], torch.device("cpu"), reps=2, warmup=0, burst=3)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert medians == pytest.approx([2.0, 2.0])


def test_peak_memory_on_the_cpu_counts_what_is_held_at_once_not_what_was_ever_allocated():
    def hold_four():  # four 1 MiB tensors alive together
        kept = [torch.empty(1 << 18) for _ in range(4)]
        return kept

    def one_at_a_time():  # four 1 MiB tensors, each freed before the next
        for _ in range(4):
            torch.empty(1 << 18).fill_(1.0)
    cpu = torch.device("cpu")
    assert 3.9 < bench.peak_mib(hold_four, cpu) < 4.1
    assert 0.9 < bench.peak_mib(one_at_a_time, cpu) < 1.1


def test_the_harness_refuses_a_burst_below_one():
    with pytest.raises(SystemExit):
        bench.main(["--burst", "0", "--sizes", "small", "--cells", "lstm"])


def test_the_cpu_gemm_benchmark_compares_the_same_products(monkeypatch):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "cpu_gemm.py"
    spec = importlib.util.spec_from_file_location("cpu_gemm_benchmark", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setenv("SEQGRAPH_CPU_GEMM", "seqgraph")
    assert {kind for _, kind, *_ in script.PRODUCTS} == {"fwd", "wgrad"}
    for kind in ("fwd", "wgrad"):
        ref, own = script.pair(kind, 37, 20, 9)
        torch.testing.assert_close(own(), ref(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flag", ["--cells", "--sizes"])
def test_the_harness_names_an_unknown_cell_or_size_and_the_choices(flag, capsys):
    with pytest.raises(SystemExit):
        bench.main([flag, "nosuch"])
    assert f"{flag}: unknown 'nosuch'; choose from" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["--peers", "eagr"], "--peers: unknown 'eagr'; choose from cudnn, eager"),
    (["--peers", "eager,"], "--peers: unknown ''; choose from"),
    (["--reps", "0"], "--reps must be at least 1, got 0"),
    (["--peers", "seqgraph-triton", "--device", "cpu"], "--peers: none of seqgraph-triton runs on cpu"),
    (["--device", "tpu"], "--device:"),
    (["--device", "meta"], "the benchmark runs on cpu or cuda, not meta")])
def test_the_harness_refuses_peers_and_devices_it_cannot_run_before_running(args, says, capsys):
    with pytest.raises(SystemExit):
        bench.main(args + ["--cells", "lstm", "--sizes", "small"])
    assert says in capsys.readouterr().err


def test_the_harness_refuses_an_output_file_it_cannot_write_before_running(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path / "no_such_folder" / "b.md"), "--cells", "lstm", "--sizes", "small"])
    assert "--out: cannot write" in capsys.readouterr().err


def _script(name: str):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_step_calls_script_prints_a_row_per_module(capsys):
    script = _script("step_calls")
    threads = torch.get_num_threads()
    try:
        script.main(B=2, H=4, threads=1, reps=1, calls=2)
    finally:
        torch.set_num_threads(threads)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "us per" not in line]
    backend = sg.compile(sg.Recurrence(sg.cells.lstm(4, 4))).backend_for()
    assert [r.split(" | ")[0] for r in rows] == [
        "| sg.Recurrence (reference)", f"| sg.compile ({backend})", f"| sg.nn.LSTMCell ({backend})",
        "| torch.nn.LSTMCell"]


def _row(cell, peer, ms):
    return dict(cell=cell, size="small", T=2, B=1, H=3, peer=peer, fwd_ms=ms, fwdbwd_ms=ms, peak_mib=None, compile_s=None)


def test_a_cell_without_a_peer_of_its_own_is_compared_with_nn_lstm_of_its_size_or_not_at_all():
    with_lstm = bench.format_table([_row("lstm", "torch.nn.LSTM", 2.0), _row("mufuru", "seqgraph cpu", 3.0)])
    assert "| mufuru | 2,1,3 | seqgraph cpu | 3.00 | 3.00 | 1.50x of nn.LSTM |" in with_lstm
    alone = bench.format_table([_row("mufuru", "seqgraph cpu", 3.0)])
    assert "| mufuru | 2,1,3 | seqgraph cpu | 3.00 | 3.00 |  |" in alone  # never 1.00x against itself


def test_a_new_or_empty_output_file_gets_a_title(tmp_path):
    out = tmp_path / "b.md"
    out.write_text("")
    assert bench.write_section(str(out), "machine", "\n| table |\n") is False
    assert out.read_text().startswith("# Benchmarks\n") and "## machine\n" in out.read_text()
    assert f"--out {out}`" in out.read_text()  # the command that wrote this file


def test_a_second_run_on_one_machine_replaces_its_section_and_says_so(tmp_path):
    out = tmp_path / "b.md"
    bench.write_section(str(out), "machine", "\n| first |\n")
    assert bench.write_section(str(out), "machine", "\n| second |\n") is True
    assert "| second |" in out.read_text() and "| first |" not in out.read_text()


def test_a_seqgraph_peer_that_runs_the_torch_code_for_the_dtype_says_so(monkeypatch):
    monkeypatch.setitem(bench.SIZES, "small", (3, 2, 4))
    rows = bench.run_case("gru", "small", torch.device("cpu"), torch.bfloat16, 1, {"seqgraph-cpu"})
    assert [r["peer"] for r in rows] == ["seqgraph cpu (runs torch)"]


def test_the_real_rows_threshold_script_prints_a_row_per_share_and_restores_the_threshold(capsys):
    import importlib.util
    import pathlib
    from seqgraph.compiler import codegen_torch
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "real_rows_threshold.py"
    spec = importlib.util.spec_from_file_location("real_rows_threshold", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    kept = codegen_torch.REAL_ROWS_BELOW
    script.main(T=6, B=4, H=4, reps=1)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) == len(script.SHARES) and codegen_torch.REAL_ROWS_BELOW == kept


def test_the_attention_decoder_script_prints_a_row_per_call(capsys):
    script = _script("attention_decoder")
    threads = torch.get_num_threads()
    try:
        script.main(T=3, B=2, H=8, S=3, threads=1, reps=1)  # (H: a multiple of the 8 heads)
    finally:
        torch.set_num_threads(threads)
    rows = [tuple(line.split(" | ")[:2]) for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    calls = ["forward", "fwd+bwd", "fwd+bwd, memory trained"]
    assert rows == [(f"| {scores}", c) for scores in ("dot", "additive", "8 heads") for c in calls]


# ---------------------------------------------------------------------------------------
# the optional JAX peer (seqgraph/bench_jax.py): run where JAX is installed (not in CI, where
# seqgraph's dependencies do not include it: these tests skip there, saying so)
# ---------------------------------------------------------------------------------------
@pytest.fixture
def jax64():
    jax = pytest.importorskip("jax", reason="JAX is not a dependency; the JAX peer is checked where it is installed")
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("name", bench.CELLS)
def test_the_jax_step_computes_the_same_cell_as_seqgraph(name, jax64):
    from seqgraph.bench_jax import jax_step
    jnp = jax64.numpy
    torch.manual_seed(0)
    rec = sg.Recurrence(bench.make_cell(name, 6, 6)).double()
    params = {k: jnp.asarray(v.detach().numpy()) for k, v in rec.param_tensors().items()}
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    want, _ = rec(x)
    step, state, outs = jax_step(name, params), tuple(jnp.zeros((3,) + p.shape) for p, _ in rec.cell.states), []
    for t in range(5):
        out, state = step(jnp.asarray(x[t].numpy()), state)
        outs.append(torch.from_numpy(jax64.device_get(out).copy()))
    torch.testing.assert_close(torch.stack(outs), want, atol=1e-10, rtol=1e-10)


def test_the_jax_peer_gives_a_row_with_its_compile_time_and_no_torch_memory(monkeypatch, jax64):
    monkeypatch.setitem(bench.SIZES, "tiny", (3, 2, 4))
    rows = bench.run_case("gru", "tiny", torch.device("cpu"), torch.float32, 1, {"eager", "jax"})
    assert [r["peer"] for r in rows] == ["eager loop", "jax.lax.scan (jit)"]
    assert rows[1]["fwdbwd_ms"] > 0 and rows[1]["compile_s"] > 0 and rows[1]["peak_mib"] is None


def test_the_harness_refuses_the_jax_peer_where_jax_is_missing(monkeypatch, capsys):
    from seqgraph import bench_jax
    monkeypatch.setattr(bench_jax, "available", lambda: False)
    with pytest.raises(SystemExit):
        bench.main(["--peers", "jax", "--cells", "lstm", "--sizes", "small"])
    assert "--peers jax: JAX is not installed here (pip install jax)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# the optional Keras peer (seqgraph/bench_keras.py): Keras 3 on the torch backend, installed by
# the test extra; seqgraph itself does not depend on it
# ---------------------------------------------------------------------------------------
@pytest.fixture
def keras_peer():
    from seqgraph import bench_keras
    if not bench_keras.available():
        pytest.skip("Keras is not a dependency of seqgraph; the Keras peer is checked where it is installed")
    bench_keras._keras()  # (imported on the torch backend, as the peer imports it)
    return bench_keras


@pytest.mark.parametrize("name", bench.CELLS)
def test_the_keras_layer_computes_the_same_cell_and_input_gradient_as_seqgraph(name, keras_peer):
    # (float32: Keras's torch backend runs some float64 products in float32)
    torch.manual_seed(0)
    rec = sg.Recurrence(bench.make_cell(name, 6, 6))
    params = {k: v.detach() for k, v in rec.param_tensors().items()}
    x = torch.randn(5, 3, 6, requires_grad=True)
    want, _ = rec(x)
    (want_dx,) = torch.autograd.grad(want.sum(), x)
    layer = keras_peer.keras_layer(name, params, [tuple(p.shape) for p, _ in rec.cell.states],
                                   torch.device("cpu"), torch.float32)
    got = layer(x)
    (got_dx,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_dx, want_dx, atol=2e-5, rtol=1e-4)


def test_the_keras_peer_gives_a_row_named_after_the_keras_layer(monkeypatch, keras_peer):
    monkeypatch.setitem(bench.SIZES, "tiny", (3, 2, 4))
    rows = bench.run_case("gru", "tiny", torch.device("cpu"), torch.float32, 1, {"eager", "keras"})
    rows += bench.run_case("mufuru", "tiny", torch.device("cpu"), torch.float32, 1, {"keras"})
    assert [r["peer"] for r in rows] == ["eager loop", "keras.layers.GRU", "keras.layers.RNN(cell)"]
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["peak_mib"] is not None for r in rows)


def test_the_keras_peer_refuses_keras_on_another_backend(monkeypatch, keras_peer):
    import keras
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match="needs Keras on the torch backend, but this process imported Keras on 'jax'"):
        keras_peer.keras_layer("lstm", {}, [(4,), (4,)], torch.device("cpu"), torch.float32)


def test_the_harness_refuses_the_keras_peer_where_keras_is_missing(monkeypatch, capsys):
    from seqgraph import bench_keras
    monkeypatch.setattr(bench_keras, "available", lambda: False)
    with pytest.raises(SystemExit):
        bench.main(["--peers", "keras", "--cells", "lstm", "--sizes", "small"])
    assert "--peers keras: Keras is not installed here (pip install keras)" in capsys.readouterr().err
