"""Attention decoders over whole sequences: what compiling gives cells with per-example matrices.

Each cell reads an encoder's memory (a Context of S x H per sequence) at every step, scores it
against the state, takes a masked softmax and the attended sum, then a tanh layer. "dot" scores
with a product of the memory and a query (Luong), "additive" with tanh(keys + query) summed
(Bahdanau; the keys, a Linear of the memory, once per call), "8 heads" with sg.Attention's
scaled dot-product scores over 8 heads (a Transformer's, each head reading H/8 features) and
its mask. The compiler writes all three over the memory flattened to rows (the pass
flatten_per_example_matrices), so on the CPU the whole loop runs in C (`model.plan()` says so). Runs taken in turn (`seqgraph.bench.interleaved_medians_ms`),
the reference interpreter against `sg.compile` (backend "cpu"), forward (`no_grad`) and
fwd+bwd, with the memory needing no gradient and needing one (an encoder trained with the
decoder):

    python benchmarks/attention_decoder.py [T B H S [threads [reps]]] [cuda]     (default 30 32 256 30 2 9)

With `cuda`, on a GPU, the backends "torch" and "triton" against the reference (the dot and
additive scores' row ops are fused into the Triton kernels; the 8 heads' products stay cuBLAS's).
"""
import sys

import torch

import seqgraph as sg
from seqgraph.bench import interleaved_medians_ms


def attention_cell(input_size: int, hidden: int, positions: int, scoring: str = "dot") -> sg.Cell:
    x, h = sg.Input(input_size, name="x"), sg.State(hidden, name="h")
    memory = sg.Context((positions, hidden), name="memory")
    real = sg.Context(positions, name="real")
    query = sg.Linear(hidden, hidden, name="query")(h)
    if scoring == "8 heads":
        context, weights = sg.Attention(hidden, hidden, score="scaled_dot", heads=8)([query, memory, real])
    elif scoring == "dot":
        scores = sg.squeeze(sg.matmul(memory, sg.unsqueeze(query, -1)), -1)
    else:
        keys = sg.Linear(hidden, hidden, bias=False, name="keys")(memory)
        scores = sg.sum(sg.tanh(keys + sg.unsqueeze(query, 0)), dim=-1)
    if scoring != "8 heads":
        weights = sg.softmax(scores + (real - 1.0) * 1e4)
        context = sg.sum(memory * sg.unsqueeze(weights, -1), dim=0)
    h_next = sg.tanh(sg.Linear(input_size + 2 * hidden, hidden, name="mix")(sg.concat([x, context, h])))
    return sg.Cell([x], {h: h_next}, [h_next, weights])


def main(T: int = 30, B: int = 32, H: int = 256, S: int = 30, threads: int = 2, reps: int = 9,
         device: str = "cpu") -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device)
    x = torch.randn(T, B, 128, device=device, requires_grad=True)
    memory = torch.randn(B, S, H, device=device)
    trained_memory = memory.clone().requires_grad_()
    real = torch.ones(B, S, device=device)

    def run(module, mem, backward):
        def f():
            if not backward:
                with torch.no_grad():
                    module(x, context={"memory": mem, "real": real})
                return
            (out, weights), _ = module(x, context={"memory": mem, "real": real})
            (out.sum() + weights.sum()).backward()
        return f

    cases = [("forward", memory, False), ("fwd+bwd", memory, True), ("fwd+bwd, memory trained", trained_memory, True)]
    backends = ["torch", "triton"] if device.type == "cuda" else ["cpu"]
    print(f"attention decoders T={T} B={B} H={H} S={S} on {device.type}, {threads} thread(s): median ms")
    print("| scores | call | reference | " + " | ".join(f"sg.compile ({b})" for b in backends) + " | ratio |")
    print("|---|---|---:|" + "---:|" * (len(backends) + 1))
    for scoring in ("dot", "additive", "8 heads"):
        reference = sg.Recurrence(attention_cell(128, H, S, scoring)).to(device)
        compiled = [sg.compile(reference, backend=b) for b in backends]
        modules = [reference] + compiled
        fns = [run(m, mem, bwd) for _, mem, bwd in cases for m in modules]
        times = interleaved_medians_ms(fns, device, reps)
        for k, (name, _, _) in enumerate(cases):
            ref, *comp = times[len(modules) * k:len(modules) * (k + 1)]
            ratios = " / ".join(f"{c / ref:.2f}x" for c in comp)
            print(f"| {scoring} | {name} | {ref:.2f} | " + " | ".join(f"{c:.2f}" for c in comp) + f" | {ratios} |")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a not in ("cpu", "cuda")]
    main(*[int(a) for a in args], device="cuda" if "cuda" in sys.argv[1:] else "cpu")
