"""A character language model with a cell of our own, trained by truncated backpropagation.

The ancestors' classic: one long text cut into B streams, read in windows of T characters.
`remember=True` starts each window from where the last one ended (the state carried over,
detached, so gradients stay within a window), as rnn's `Recurrent` with `remember('both')` or
torch.nn users' `h = h.detach()`. The cell is a layer-norm GRU written with the DSL, so no
library ships it; `sg.compile` gives it the C kernels on the CPU (Triton on a GPU). Checks the
compiled model against the reference interpreter, then trains for a fixed number of steps
(a few seconds on a 2-core CPU) and checks that it learned: python examples/03_char_language_model.py
"""
import math

import torch
from torch import nn

import seqgraph as sg

TEXT = ("the cat sat on the mat. the dog sat on the log. the cat saw the dog and the dog saw the cat. "
        "a cat and a dog sat on a mat and a log. ") * 40
CHARS = sorted(set(TEXT))
EMB, HID, B, T = 16, 64, 8, 25


def layer_norm_gru(input_size: int, hidden: int) -> sg.Cell:
    """A GRU whose gate pre-activations are layer-normalised (one LayerNorm per gate group)."""
    x, h = sg.Input(input_size, name="x"), sg.State(hidden, name="h")
    gi = sg.LayerNorm(3 * hidden, name="ln_x")(sg.Linear(input_size, 3 * hidden, name="ih")(x))
    gh = sg.LayerNorm(3 * hidden, name="ln_h")(sg.Linear(hidden, 3 * hidden, name="hh")(h))
    xr, xz, xn = sg.chunk(gi, 3)
    hr, hz, hn = sg.chunk(gh, 3)
    r, z = sg.sigmoid(xr + hr), sg.sigmoid(xz + hz)
    n = sg.tanh(xn + r * hn)
    h_next = (1 - z) * n + z * h
    return sg.Cell(inputs=[x], states={h: h_next}, outputs=[h_next])


class CharModel(nn.Module):
    def __init__(self, recurrence: nn.Module):
        super().__init__()
        self.embed = nn.Embedding(len(CHARS), EMB)
        self.rnn = recurrence
        self.readout = nn.Linear(HID, len(CHARS))

    def forward(self, chars):  # (T, B) ids -> (T, B, vocabulary) logits
        out, _ = self.rnn(self.embed(chars))
        return self.readout(out)


def streams() -> torch.Tensor:
    """The text as B parallel streams of ids, (length, B)."""
    ids = torch.tensor([CHARS.index(ch) for ch in TEXT])
    per = len(ids) // B
    return ids[:per * B].view(B, per).t().contiguous()


def main(epochs: int = 3) -> float:
    torch.manual_seed(0)
    data = streams()
    rec = sg.Recurrence(layer_norm_gru(EMB, HID), remember=True)
    model = CharModel(sg.compile(rec))  # shares rec's parameters
    loss_fn = nn.CrossEntropyLoss()

    # the compiled recurrence and the reference interpreter give the same loss and gradients
    reference = CharModel(rec)
    reference.embed, reference.readout = model.embed, model.readout
    window, target = data[:T], data[1:T + 1]
    results = []
    for m in (model, reference):
        m.rnn.forget()
        loss = loss_fn(m(window).flatten(0, 1), target.flatten())
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (loss, grads), (want_loss, want_grads) = results
    torch.testing.assert_close(loss, want_loss)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    bits = []
    for epoch in range(epochs):
        model.rnn.forget()  # each epoch reads the streams from their start
        total, count = 0.0, 0
        for start in range(0, data.shape[0] - 1 - T, T):
            window, target = data[start:start + T], data[start + 1:start + T + 1]
            loss = loss_fn(model(window).flatten(0, 1), target.flatten())
            opt.zero_grad()
            loss.backward()  # within the window only: the carried state is detached
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total, count = total + loss.item(), count + 1
        bits.append(total / count / math.log(2))
        print(f"epoch {epoch + 1}: {bits[-1]:.2f} bits per character")

    model.rnn.forget()
    with torch.no_grad():  # sample greedily, one character per call, the state carried between calls
        ch = torch.tensor([[CHARS.index("t")]])
        sample = "t"
        for _ in range(60):
            ch = model(ch)[-1].argmax(-1, keepdim=True)
            sample += CHARS[ch.item()]
    print(f"sample: {sample!r}")
    uniform = math.log2(len(CHARS))
    assert bits[-1] < 0.25 * uniform, f"did not learn: {bits[-1]:.2f} bits per character (uniform: {uniform:.2f})"
    return bits[-1]


if __name__ == "__main__":
    main()
