"""sg.Attention: each score as plain torch computes it, the mask, the compiled loops (one C
loop on the cpu backend, equal to the reference), parameter keys and the errors it gives."""
import math
import os
import sys

import pytest
import torch

import seqgraph as sg

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "kernels"))
from backend_cases import check_against_reference  # noqa: E402

SCORES = ["dot", "scaled_dot", "general", "additive"]
S, D, H = 4, 6, 5


def _decoder(score, name=None):
    """A tanh RNN over [x, attended memory] whose query is its state; outputs h and the weights."""
    x, h = sg.Input(3, name="x"), sg.State(H if score in ("general", "additive") else D, name="h")
    memory, mask = sg.Context((S, D), name="memory"), sg.Context(S, name="mask")
    context, weights = sg.Attention(h.shape[0], D, score=score, name=name)([h, memory, mask])
    h2 = sg.tanh(sg.Linear(3 + D + h.shape[0], h.shape[0], name="out")(sg.concat([x, context, h])))
    return sg.Cell([x], {h: h2}, [h2, weights])


def _torch_scores(score, params, q, memory):
    if score in ("dot", "scaled_dot"):
        s = torch.einsum("bsd,bd->bs", memory, q)
        return s / math.sqrt(D) if score == "scaled_dot" else s
    if score == "general":
        return torch.einsum("bsd,bd->bs", memory, q @ params["attention.general_weight"].t())
    keys = memory @ params["attention.keys_weight"].t()
    query = q @ params["attention.query_weight"].t() + params["attention.query_bias"]
    return (torch.tanh(keys + query[:, None, :]) @ params["attention.v_weight"].t()).squeeze(-1)


@pytest.mark.parametrize("score", SCORES)
def test_each_score_weights_and_sums_the_memory_as_plain_torch_does(score):
    rec = sg.Recurrence(_decoder(score)).double()
    B = 3
    h0 = torch.randn(B, rec.cell.states[0][0].shape[0], dtype=torch.float64)
    memory = torch.randn(B, S, D, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    (_, weights), _ = rec(torch.randn(1, B, 3, dtype=torch.float64), {"h": h0},
                          context={"memory": memory, "mask": mask})
    params = {k: v for k, v in rec.params.named_parameters()}
    scores = _torch_scores(score, params, h0, memory).masked_fill(mask == 0, -1e4)
    torch.testing.assert_close(weights[0], torch.softmax(scores, -1))
    assert (weights[0, 1, 2:] == 0).all()  # padding gets no weight
    torch.testing.assert_close(weights[0, 2], torch.full((S,), 1 / S, dtype=torch.float64))  # all padding: equal


@pytest.mark.parametrize("score", SCORES)
def test_a_compiled_decoder_equals_the_reference_and_runs_one_c_loop(score):
    rec = sg.Recurrence(_decoder(score)).double()
    comp = sg.compile(rec, backend="cpu")
    assert "time loops: C" in str(comp.plan())
    B = 3
    xs = [torch.randn(5, B, 3, dtype=torch.float64, requires_grad=True)]
    ctx = {"memory": torch.randn(B, S, D, dtype=torch.float64, requires_grad=True),
           "mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float64)}
    check_against_reference(rec, comp, xs, ctx, 1e-10, lengths=torch.tensor([5, 2, 0]))


def _heads_decoder(score, heads=3, Dh=2):
    """_decoder with `heads` heads over a memory of heads * Dh features."""
    x, h = sg.Input(3, name="x"), sg.State(heads * Dh, name="h")
    memory, mask = sg.Context((S, heads * Dh), name="memory"), sg.Context(S, name="mask")
    context, weights = sg.Attention(heads * Dh, heads * Dh, score=score, heads=heads)([h, memory, mask])
    h2 = sg.tanh(sg.Linear(3 + 2 * heads * Dh, heads * Dh, name="out")(sg.concat([x, context, h])))
    return sg.Cell([x], {h: h2}, [h2, weights, context])  # (weights: (heads, S) per step)


@pytest.mark.parametrize("score", ["dot", "scaled_dot", "general"])
def test_heads_attend_as_torchs_scaled_dot_product_attention_does(score):
    heads, Dh, B = 3, 2, 3
    rec = sg.Recurrence(_heads_decoder(score, heads, Dh)).double()
    h0 = torch.randn(B, heads * Dh, dtype=torch.float64)
    memory = torch.randn(B, S, heads * Dh, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.float64)
    (_, weights, context), _ = rec(torch.randn(1, B, 3, dtype=torch.float64), {"h": h0},
                                   context={"memory": memory, "mask": mask})
    q = h0 @ rec.params.attention.general_weight.t() if score == "general" else h0
    qh = q.view(B, heads, 1, Dh)
    kh = memory.view(B, S, heads, Dh).transpose(1, 2)  # (B, heads, S, Dh): keys and values alike
    scale = 1 / math.sqrt(Dh) if score == "scaled_dot" else 1.0
    expect = torch.nn.functional.scaled_dot_product_attention(qh, kh, kh, attn_mask=mask.bool().view(B, 1, 1, S),
                                                               scale=scale)
    torch.testing.assert_close(context[0], expect.reshape(B, heads * Dh))
    assert weights.shape == (1, B, heads, S) and (weights[0, 1, :, 2:] == 0).all()  # padding: no weight, any head


def test_a_compiled_multi_head_decoder_equals_the_reference_and_runs_one_c_loop():
    rec = sg.Recurrence(_heads_decoder("scaled_dot")).double()
    comp = sg.compile(rec, backend="cpu")
    assert "time loops: C" in str(comp.plan())
    B = 3
    xs = [torch.randn(5, B, 3, dtype=torch.float64, requires_grad=True)]
    ctx = {"memory": torch.randn(B, S, 6, dtype=torch.float64, requires_grad=True),
           "mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float64)}
    check_against_reference(rec, comp, xs, ctx, 1e-10, lengths=torch.tensor([5, 2, 0]))


def test_heads_that_do_not_divide_the_memory_size_are_refused():
    with pytest.raises(ValueError, match="heads=4 split the memory_size \\(6\\) features into equal parts"):
        sg.Attention(6, 6, heads=4)


def test_heads_are_refused_for_an_additive_score():
    with pytest.raises(ValueError, match="an 'additive' score has one head"):
        sg.Attention(6, 6, score="additive", heads=2)


def test_its_repr_names_the_heads():
    assert repr(sg.Attention(6, 6, score="scaled_dot", heads=2)) == "sg.Attention(6, 6, score='scaled_dot', heads=2)"


def test_its_parameters_are_keyed_by_its_name():
    rec = sg.Recurrence(_decoder("additive", name="attn"))
    assert [k for k in rec.state_dict() if "attn" in k] == [
        "params.attn.keys_weight", "params.attn.query_weight", "params.attn.query_bias", "params.attn.v_weight"]


def test_without_a_mask_every_row_is_weighted():
    q, memory = sg.Input(D, name="q"), sg.Context((S, D), name="memory")
    context, weights = sg.Attention(D, D)([q, memory])
    assert context.shape == (D,) and weights.shape == (S,)


def test_an_unknown_score_names_the_known_ones():
    with pytest.raises(ValueError, match="score must be one of 'dot', 'scaled_dot', 'general', 'additive'"):
        sg.Attention(D, D, score="cosine")


def test_a_dot_score_needs_equal_query_and_memory_sizes():
    with pytest.raises(ValueError, match=r"query_size \(5\) must equal memory_size \(6\)"):
        sg.Attention(5, 6)


@pytest.mark.parametrize("query,memory,mask,text", [
    ((5,), (S, D), None, r"the query must have shape \(6,\)"),
    ((D,), (D,), None, r"the memory must have shape \(S, 6\)"),
    ((D,), (S, 5), None, r"the memory must have shape \(S, 6\)"),
    ((D,), (S, D), (S + 1,), r"the mask must have shape \(4,\), one value per memory row"),
], ids=["query", "memory rank", "memory size", "mask"])
def test_a_wrong_shape_names_the_operand_and_the_line(query, memory, mask, text):
    nodes = [sg.Input(query, name="q"), sg.Context(memory, name="memory")]
    if mask is not None:
        nodes.append(sg.Context(mask, name="mask"))
    with pytest.raises(sg.ShapeError, match=text) as info:
        sg.Attention(D, D, name="attn")(nodes)
    assert "Attention 'attn' (declared at test_attention.py:" in str(info.value)


def test_it_takes_two_or_three_nodes():
    q = sg.Input(D, name="q")
    with pytest.raises(TypeError, match=r"takes \[query, memory\] or \[query, memory, mask\], got 1"):
        sg.Attention(D, D)([q])


def test_padding_gets_no_weight_whatever_the_scale_of_the_real_scores():
    # real scores near -20000 (a review's case): a fixed fill of -10000 gave padding all the weight
    q, memory, mask = sg.Input(D, name="q"), sg.Context((S, D), name="memory"), sg.Context(S, name="mask")
    _, weights = sg.Attention(D, D)([q, memory, mask])
    h = sg.State(1, name="h")
    rec = sg.Recurrence(sg.Cell([q], {h: h + sg.sum(weights, keepdim=True)}, [weights]))
    mem = torch.randn(1, S, D) * 10
    query = -(mem[:, 0] + mem[:, 1]) * 20
    w, _ = rec(query[None], context={"memory": mem, "mask": torch.tensor([[1.0, 1, 0, 0]])})
    want = torch.softmax(torch.einsum("bsd,bd->bs", mem[:, :2], query), -1)
    assert (w[0, 0, 2:] == 0).all()
    torch.testing.assert_close(w[0, 0, :2], want[0])


def test_keras_style_mask_keyword_is_the_third_node():
    q, memory, mask = sg.Input(D, name="q"), sg.Context((S, D), name="memory"), sg.Context(S, name="mask")
    attend = sg.Attention(D, D)
    _, by_keyword = attend([q, memory], mask=mask)
    _, in_list = attend([q, memory, mask])
    assert by_keyword.inputs[0].op == in_list.inputs[0].op and mask in _leaves(by_keyword)


def _leaves(node):
    from seqgraph.compiler.ir import topo_order
    return [n for n in topo_order([node]) if not n.inputs]


def test_a_mask_of_integers_is_refused_naming_the_mask():
    q, memory, mask = sg.Input(D, name="q"), sg.Context((S, D), name="memory"), sg.Context(S, name="valid", dtype="long")
    with pytest.raises(sg.ShapeError, match="the mask must be a float value .* 'valid' has dtype long"):
        sg.Attention(D, D)([q, memory, mask])


def test_hidden_size_is_refused_for_a_score_without_one():
    with pytest.raises(ValueError, match="hidden_size is the additive score's hidden width; a 'dot' score has none"):
        sg.Attention(D, D, hidden_size=8)


def test_a_memory_given_as_an_input_of_one_step_suggests_a_context():
    x, h, memory = sg.Input(3, name="x"), sg.State(D, name="h"), sg.Input((S, D), name="memory")
    context, _ = sg.Attention(D, D)([h, memory])
    rec = sg.Recurrence(sg.Cell([x, memory], {h: sg.tanh(context + sg.Linear(3, D)(x))}, [h]))
    with pytest.raises(sg.InputError, match=r"got \(2, 4, 6\); a tensor that is the same at every step .* sg.Context"):
        rec((torch.randn(5, 2, 3), torch.randn(2, S, D)))


def test_a_single_node_instead_of_a_list_shows_the_call_to_make():
    with pytest.raises(TypeError, match=r"e\.g\. sg\.Attention\(Q, D\)\(\[query, memory, mask\]\)"):
        sg.Attention(D, D)(sg.Input(D, name="q"))


def test_a_memory_of_another_length_is_refused_with_the_advice_to_pad_it():
    rec = sg.Recurrence(_decoder("dot"))
    with pytest.raises(sg.InputError, match=r"expects shape \(2, 4, 6\), got \(2, 3, 6\); its length 4 is fixed "
                                            r"when the cell is declared: pad every such tensor to 4"):
        rec(torch.randn(5, 2, 3), context={"memory": torch.randn(2, 3, D), "mask": torch.ones(2, S)})
