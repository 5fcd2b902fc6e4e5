"""Benchmark harness: seqgraph against its peers, side by side in one process.

`python -m seqgraph bench` times, for each cell and size, the forward pass and forward+backward
of: torch.nn.LSTM/GRU (cuDNN on GPU, oneDNN on CPU) where the cell has one, the same cell as an
eager PyTorch loop (plain torch ops, autograd), torch.compile of that loop (compile time
reported apart), optionally JAX's jitted lax.scan of it (bench_jax.py) and Keras's RNN layer
(bench_keras.py), and seqgraph's compiled backends, their runs taken in turn. It prints medians
and ratios to the fastest peer, peak memory, and with --out FILE writes the table as a
Markdown section named after the machine into FILE (docs/benchmarks.md holds ours). Timing is
never a unit test; this module only measures.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import torch

SIZES = {"fastrnns": (100, 64, 512), "small": (50, 16, 128), "medium": (20, 64, 256), "smallbatch": (50, 4, 1024)}
CELLS = ("lstm", "gru", "peephole_lstm", "layer_norm_lstm", "mufuru", "qrnn", "qrnn_window2", "mlstm")


# ---------------------------------------------------------------------------------------
# the cells: seqgraph's declaration and an independent eager step with the same weights
# ---------------------------------------------------------------------------------------
def make_cell(name: str, I: int, H: int):
    import seqgraph as sg
    return {
        "lstm": lambda: sg.cells.lstm(I, H),
        "gru": lambda: sg.cells.gru(I, H),
        "peephole_lstm": lambda: sg.cells.lstm(I, H, peephole=True),
        "layer_norm_lstm": lambda: sg.cells.lstm(I, H, layer_norm=True),
        "mufuru": lambda: sg.cells.mufuru(I, H),
        "qrnn": lambda: sg.cells.qrnn(I, H),
        "qrnn_window2": lambda: sg.cells.qrnn(I, H, window=2),
        "mlstm": lambda: sg.cells.mlstm(I, H),
    }[name]()


def eager_step(name: str, p: dict[str, torch.Tensor]) -> Callable:
    """The cell's published equations as a plain torch step(x, state) -> (out, state)."""
    F = torch.nn.functional
    if name in ("lstm", "peephole_lstm", "layer_norm_lstm"):
        ln = name == "layer_norm_lstm"
        H = p["hh.weight"].shape[1]

        def step(x, st):
            h, c = st
            gx, gh = F.linear(x, p["ih.weight"], p.get("ih.bias")), F.linear(h, p["hh.weight"], p.get("hh.bias"))
            if ln:
                gx = F.layer_norm(gx, gx.shape[-1:], p["ln_ih.weight"], p["ln_ih.bias"])
                gh = F.layer_norm(gh, gh.shape[-1:], p["ln_hh.weight"], p["ln_hh.bias"])
            i, f, g, o = (gx + gh).chunk(4, 1)
            if name == "peephole_lstm":
                i, f = i + p["w_ci"] * c, f + p["w_cf"] * c
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            if name == "peephole_lstm":
                o = o + p["w_co"] * c
            cr = F.layer_norm(c, (H,), p["ln_c.weight"], p["ln_c.bias"]) if ln else c
            h = torch.sigmoid(o) * torch.tanh(cr)
            return h, (h, c)
        return step
    if name == "gru":
        def step(x, st):
            (h,) = st
            xr, xz, xn = F.linear(x, p["ih.weight"], p["ih.bias"]).chunk(3, 1)
            hr, hz, hn = F.linear(h, p["hh.weight"], p["hh.bias"]).chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h = (1 - z) * torch.tanh(xn + r * hn) + z * h
            return h, (h,)
        return step
    if name == "mufuru":
        def step(x, st):
            (s,) = st
            H = s.shape[1]
            gx = F.linear(x, p["ih.weight"], p["ih.bias"])
            gh = F.linear(s, p["hh.weight"], p["hh.bias"])
            xr, xv, xp = gx[:, :H], gx[:, H:2 * H], gx[:, 2 * H:]
            sr, sp = gh[:, :H], gh[:, H:]
            r = torch.sigmoid(xr + sr)
            v = torch.tanh(xv + F.linear(r * s, p["hv.weight"]))
            w = torch.softmax((xp + sp).view(-1, 8, H), dim=1)
            ops = torch.stack([s, v, s * v, s - v, torch.zeros_like(s), 0.25 * torch.sqrt(torch.abs(s - v)),
                               torch.maximum(s, v), torch.minimum(s, v)], 1)
            s = (w * ops).sum(1)
            return s, (s,)
        return step
    if name == "qrnn":
        def step(x, st):
            (c,) = st
            z, f, o = F.linear(x, p["w.weight"], p["w.bias"]).chunk(3, 1)
            z, f, o = torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)
            c = f * c + (1 - f) * z
            return o * c, (c,)
        return step
    if name == "qrnn_window2":
        def step(x, st):
            c, x_prev = st
            gates = F.linear(x, p["w.weight"], p["w.bias"]) + F.linear(x_prev, p["w_prev1.weight"])
            z, f, o = gates.chunk(3, 1)
            z, f, o = torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)
            c = f * c + (1 - f) * z
            return o * c, (c, x)
        return step
    if name == "mlstm":
        def step(x, st):
            C, n, m = st
            q, k, v, o = (F.linear(x, p[f"{key}.weight"], p[f"{key}.bias"]) for key in "qkvo")
            k = k / k.shape[1] ** 0.5
            i_pre = F.linear(x, p["i.weight"], p["i.bias"])
            log_f = F.logsigmoid(F.linear(x, p["f.weight"]) + p["f_bias"])
            m_next = torch.maximum(log_f + m, i_pre)
            i, f = torch.exp(i_pre - m_next), torch.exp(log_f + m - m_next)
            C = f.unsqueeze(-1) * C + i.unsqueeze(-1) * (v.unsqueeze(-1) * k.unsqueeze(-2))
            n = f * n + i * k
            scale = torch.maximum((n * q).sum(-1, keepdim=True).abs(), torch.exp(-m_next))
            h = torch.sigmoid(o) * (C @ q.unsqueeze(-1)).squeeze(-1) / scale
            return h, (C, n, m_next)
        return step
    raise KeyError(name)


def eager_loop(step: Callable) -> Callable:
    def run(x, state):
        outs = []
        for t in range(x.shape[0]):
            o, state = step(x[t], state)
            outs.append(o)
        return torch.stack(outs), state
    return run


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians_ms(fns: list[Callable], device, reps: int, warmup: int = 2, burst: int = 1) -> list[float]:
    """The median time of each of `fns`, their runs taken in turn (run 1 of each, then run 2
    of each, ...), so that a slow spell of a shared machine slows every peer alike.

    With burst > 1 each turn is `burst` runs in a row, of which the first is not timed: the
    median is then of back-to-back runs, which a machine that slows a call following other
    work (a VM whose idle cores sleep) does not slow."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            for k in range(burst):
                t0 = time.perf_counter()
                fn()
                _sync(device)
                if k > 0 or burst == 1:
                    times[i].append(1e3 * (time.perf_counter() - t0))
    return [statistics.median(t) for t in times]


def peak_mib(fn: Callable, device) -> float | None:
    """The most memory one call of `fn` holds at once beyond what was allocated before it.

    On CUDA, from the allocator's peak. On the CPU, which keeps no such statistic, from
    torch.profiler's memory events: each op's own allocations net of its own frees, summed in
    the order the ops started (a temporary that lives and dies inside one op is not seen), with
    seqgraph's kept buffers (seqgraph/buffers.py) forgotten first, so that the call allocates
    them again."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if device.type != "cpu":
        return None
    import os
    from torch.profiler import ProfilerActivity, profile

    from . import buffers
    buffers.clear()  # the buffers a compiled loop reuses across calls count as what this call allocates
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # else every profile prints its stages to stderr
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage  # frees outside ops: "[memory]"
        peak = max(peak, held)
    return peak / 2**20


def run_case(cell_name: str, size: str, device, dtype, reps: int, peers: set[str], burst: int = 1) -> list[dict]:
    import seqgraph as sg
    T, B, H = SIZES[size]
    torch.manual_seed(0)
    rec = sg.Recurrence(make_cell(cell_name, H, H)).to(device=device, dtype=dtype)
    params = {k: v.detach().requires_grad_() for k, v in rec.param_tensors().items()}
    x = torch.randn(T, B, H, device=device, dtype=dtype, requires_grad=True)
    zeros = tuple(torch.zeros((B,) + prev.shape, device=device, dtype=dtype) for prev, _ in rec.cell.states)
    entries: list[tuple] = []  # (label, fwd, compile_s, fwd+bwd or None: fwd's backward), timed together at the end

    def add(label, fwd, compile_s=None, fwdbwd=None):
        entries.append((label, fwd, compile_s, fwdbwd))

    if "cudnn" in peers and cell_name in ("lstm", "gru"):
        ref = (torch.nn.LSTM if cell_name == "lstm" else torch.nn.GRU)(H, H).to(device=device, dtype=dtype)
        add("torch.nn." + ("LSTM" if cell_name == "lstm" else "GRU"), lambda: ref(x)[0])
    loop = eager_loop(eager_step(cell_name, params))
    if "eager" in peers:
        add("eager loop", lambda: loop(x, zeros)[0])
    if "torch.compile" in peers:
        compiled = torch.compile(loop, dynamic=False)
        t0 = time.perf_counter()
        compiled(x, zeros)[0].float().sum().backward()
        _sync(device)
        add("torch.compile(loop)", lambda: compiled(x, zeros)[0], compile_s=time.perf_counter() - t0)
    if "jax" in peers:  # (jax arrays: no torch tensor or autograd; its own device, the CPU here)
        from .bench_jax import jax_peer
        jf, jfb, jcs = jax_peer(cell_name, params, x, zeros)
        add("jax.lax.scan (jit)", jf, compile_s=jcs, fwdbwd=jfb)
    if "keras" in peers:  # (Keras 3 on the torch backend: the same tensors and autograd)
        from .bench_keras import keras_layer
        layer = keras_layer(cell_name, params, [tuple(p.shape) for p, _ in rec.cell.states], device, dtype)
        add({"lstm": "keras.layers.LSTM", "gru": "keras.layers.GRU"}.get(cell_name, "keras.layers.RNN(cell)"),
            lambda: layer(x))
    backends = ["torch"] + (["triton"] if device.type == "cuda" else ["cpu"])
    for backend in backends:
        if f"seqgraph-{backend}" not in peers:
            continue
        sg.compiled.clear_cache()
        t0 = time.perf_counter()
        comp = sg.compile(rec, backend=backend)
        cold = time.perf_counter() - t0
        runs = comp.backend_for(dtype, device)  # (the cpu backend runs bfloat16 as the torch code)
        label = f"seqgraph {backend}" + (f" (runs {runs})" if runs != backend else "")
        add(label, (lambda c: lambda: c(x)[0])(comp), compile_s=cold)

    def no_grad(fwd):
        def run():
            with torch.no_grad():
                return fwd()
        return run

    def train(fwd):
        def run():
            fwd().float().sum().backward()
        return run
    f_ms = interleaved_medians_ms([no_grad(f) for _, f, _, _ in entries], device, reps, burst=burst)
    fb_ms = interleaved_medians_ms([fb or train(f) for _, f, _, fb in entries], device, reps, burst=burst)
    return [dict(cell=cell_name, size=size, T=T, B=B, H=H, peer=label, fwd_ms=f, fwdbwd_ms=fbm,
                 peak_mib=peak_mib(train(fwd), device) if fb is None else None, compile_s=cs)
            for (label, fwd, cs, fb), f, fbm in zip(entries, f_ms, fb_ms)]


def format_table(rows: list[dict]) -> str:
    out = ["| cell | T,B,H | peer | fwd ms | fwd+bwd ms | fwd+bwd vs best peer | peak MiB | compile s |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["cell"], r["size"]), []).append(r)
    for (cell, size), rs in groups.items():
        # the fastest peer that is not seqgraph; a cell without one in the run (no cuDNN version,
        # no eager loop asked for) against torch.nn.LSTM of the same size where the run has it
        peers, against = [r for r in rs if not r["peer"].startswith("seqgraph")], ""
        if not peers:
            peers = [r for r in rows if r["size"] == size and r["peer"] == "torch.nn.LSTM"]
            against = " of nn.LSTM"
        best = min((r["fwdbwd_ms"] for r in peers), default=None)
        for r in rs:
            pk = "" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
            cs = "" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
            ratio = f"{r['fwdbwd_ms'] / best:.2f}x{against}" if best else ""
            out.append(f"| {cell} | {r['T']},{r['B']},{r['H']} | {r['peer']} | {r['fwd_ms']:.2f} | "
                       f"{r['fwdbwd_ms']:.2f} | {ratio} | {pk} | {cs} |")
    return "\n".join(out)


def machine_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"CPU {cpu_model()}, {n} thread{'s' if n != 1 else ''}"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_section(path: str, title: str, body: str) -> bool:
    """Replace (or append) the section `## title` of a Markdown file; True when it replaced one."""
    try:
        text = open(path).read()
    except FileNotFoundError:
        text = ""
    if not text.strip():  # a new (or empty) file starts with a title
        text = f"# Benchmarks\n\nWritten by `python -m seqgraph bench --out {path}`.\n"
    head = f"## {title}\n"
    replaced = head in text
    if replaced:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + head + body + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + head + body
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + "\n")
    return replaced


PEERS = ("cudnn", "eager", "torch.compile", "seqgraph-torch", "seqgraph-triton", "seqgraph-cpu")
OPTIONAL_PEERS = ("jax", "keras")  # asked for by name: neither is a dependency (bench_jax.py, bench_keras.py)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m seqgraph bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--cells", default=",".join(CELLS), help=f"comma list of {list(CELLS)}")
    ap.add_argument("--sizes", default="fastrnns,small,medium", help=f"comma list of {list(SIZES)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where every peer runs: cpu, or cuda (the default where torch sees a GPU)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=5, help="turns of every peer; the median is reported")
    ap.add_argument("--burst", type=int, default=1,
                    help="runs of a peer in a row per turn, the first untimed (1: strictly in turn)")
    ap.add_argument("--peers", default=",".join(PEERS),
                    help=f"comma list of {list(PEERS + OPTIONAL_PEERS)} (seqgraph-triton on CUDA only, seqgraph-cpu "
                         f"on the CPU only; torch.nn's LSTM and GRU are the cudnn column; jax, a jitted lax.scan "
                         f"of the cell, where JAX is installed, on the CPU; keras, Keras 3's RNN layer on the torch backend, where "
                         f"Keras is installed)")
    ap.add_argument("--out", default=None, help="Markdown file to write the table into (a section per machine)")
    args = ap.parse_args(argv)
    for flag in ("reps", "burst"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag, given, known in (("--cells", args.cells, CELLS), ("--sizes", args.sizes, tuple(SIZES)),
                               ("--peers", args.peers, PEERS + OPTIONAL_PEERS)):
        unknown = [v for v in given.split(",") if v not in known]
        if unknown:
            ap.error(f"{flag}: unknown {', '.join(repr(v) for v in unknown)}; choose from {', '.join(known)}")
    try:
        device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    except RuntimeError as e:
        ap.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: this machine has no CUDA device torch can use")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device: the benchmark runs on cpu or cuda, not {device.type}")
    peers = set(args.peers.split(","))
    if "jax" in peers:
        from .bench_jax import available
        if not available():
            ap.error("--peers jax: JAX is not installed here (pip install jax); seqgraph does not depend on it")
        if device.type != "cpu":
            ap.error(f"--peers jax: the JAX peer runs on the CPU only, not {device.type}")
    if "keras" in peers:
        from .bench_keras import available as keras_available
        if not keras_available():
            ap.error("--peers keras: Keras is not installed here (pip install keras); seqgraph does not depend on it")
    runnable = peers - {"seqgraph-cpu" if device.type == "cuda" else "seqgraph-triton"}
    if not runnable:
        ap.error(f"--peers: none of {args.peers} runs on {device.type}")
    if args.out:  # refused now, not after the whole run (and without creating the file)
        folder = os.path.dirname(os.path.abspath(args.out))
        if os.path.isdir(args.out) or not os.path.isdir(folder) or not os.access(
                args.out if os.path.exists(args.out) else folder, os.W_OK):
            ap.error(f"--out: cannot write {args.out!r} (a writable file, or a new one in an existing folder)")
    from .kernels.c_launch import CompilerMissing
    rows = []
    for size in args.sizes.split(","):
        for cell in args.cells.split(","):
            try:
                rs = run_case(cell, size, device, dtype, args.reps, peers, args.burst)
            except CompilerMissing as e:  # (not found until the cpu backend is built)
                ap.error(f"--peers seqgraph-cpu: {e}")
            rows += rs
            for r in rs:
                print(f"{cell:16s} {size:9s} {r['peer']:22s} fwd {r['fwd_ms']:9.2f} ms  fwd+bwd {r['fwdbwd_ms']:9.2f} ms",
                      flush=True)
    table = format_table(rows)
    title = f"{machine_name(device)}, {args.dtype}"
    print(f"\n{title}\n{table}")
    if args.out:
        cmd = "python -m seqgraph bench " + " ".join(argv or [])
        runs = f"{args.reps} runs" if args.burst == 1 else f"{args.reps} bursts of {args.burst - 1} timed runs"
        replaced = write_section(args.out, title, f"\nMedians of {runs}; command: `{cmd.strip()}`; "
                                                  f"torch {torch.__version__}.\n\n{table}\n")
        print(f"{'replaced' if replaced else 'wrote'} the section '## {title}' of {args.out}"
              + (" (the rows of its earlier run are gone: one run writes one whole section)" if replaced else ""))
    return 0
