"""Declare one step of a recurrent cell, run it over padded sequences, check it against torch.

The cell is an LSTM written by hand with the DSL; with its weights copied from a
torch.nn.LSTM it must give the same outputs and final states.  python examples/01_custom_cell.py
"""
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqgraph as sg

I, H = 8, 16

# one step: symbolic nodes in, symbolic nodes out (batch dims are implicit)
x = sg.Input(I, name="x")
h, c = sg.State(H, name="h"), sg.State(H, name="c")
gates = sg.Linear(I, 4 * H, name="ih")(x) + sg.Linear(H, 4 * H, name="hh")(h)
i, f, g, o = sg.chunk(gates, 4)
c_next = sg.sigmoid(f) * c + sg.sigmoid(i) * sg.tanh(g)
h_next = sg.sigmoid(o) * sg.tanh(c_next)
cell = sg.Cell(inputs=[x], states={h: h_next, c: c_next}, outputs=[h_next])
print(cell)

rnn = sg.Recurrence(cell)  # a torch.nn.Module: parameters under rnn.params.<module>.<weight|bias>
ref = torch.nn.LSTM(I, H)
with torch.no_grad():
    for mine, theirs in (("ih", "ih_l0"), ("hh", "hh_l0")):
        getattr(rnn.params, mine).weight.copy_(getattr(ref, "weight_" + theirs))
        getattr(rnn.params, mine).bias.copy_(getattr(ref, "bias_" + theirs))

xs = torch.randn(6, 3, I)  # (T, B, I)
lengths = torch.tensor([6, 2, 4])  # a padded batch: each sequence stops at its own length
out, final = rnn(xs, lengths=lengths)

packed_out, (h_n, c_n) = ref(pack_padded_sequence(xs, lengths, enforce_sorted=False))
torch.testing.assert_close(out, pad_packed_sequence(packed_out)[0], atol=1e-5, rtol=1e-5)
torch.testing.assert_close(final["h"], h_n[0], atol=1e-5, rtol=1e-5)
torch.testing.assert_close(final["c"], c_n[0], atol=1e-5, rtol=1e-5)
print("hand-written LSTM == torch.nn.LSTM on a padded batch")

# the library's cells are written the same way; sg.nn.LSTM takes torch's state_dict as is
lstm = sg.nn.LSTM(I, H)
lstm.load_state_dict(ref.state_dict())
torch.testing.assert_close(lstm(xs)[0], ref(xs)[0], atol=1e-5, rtol=1e-5)
print("sg.nn.LSTM == torch.nn.LSTM")
