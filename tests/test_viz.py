"""Pictures: DOT that Graphviz accepts, exact node/edge counts for unrolled steps, shared
parameters drawn once, error pictures in red, render() in every format, the CLI, tooltips."""
import json
import os
import subprocess
import sys
import textwrap

import graphviz
import pytest

import seqgraph as sg
from seqgraph import viz

I, H = 3, 4


def _lstm():
    x, h, c = sg.Input(I, name="x"), sg.State(H, name="h"), sg.State(H, name="c")
    gates = sg.Linear(I + H, 4 * H, name="gates")(sg.concat([x, h]))
    i, f, g, o = sg.chunk(gates, 4)
    c_next = (sg.sigmoid(f) * c + sg.sigmoid(i) * sg.tanh(g)).named("c_next")
    h_next = (sg.sigmoid(o) * sg.tanh(c_next)).named("h_next")
    return sg.Cell(inputs=[x], states={h: h_next, c: c_next}, outputs=[h_next], name="lstm")


def _cell_with_context_and_noise():
    """Shared weights (one Linear used twice), a context and a per-sequence noise mask."""
    x, h, ctx = sg.Input(I, name="x"), sg.State(H, name="h"), sg.Context(H, name="ctx")
    keep = sg.Noise(H, 0.2, per_sequence=True, name="keep")
    step = sg.Linear(H, H, name="shared")
    a = sg.tanh(step(h) + sg.Linear(I, H, name="inp")(x) + ctx)
    h_next = step(a) * keep
    return sg.Cell(inputs=[x], states={h: h_next}, outputs=[h_next, a])


def _layout(dot) -> dict:
    """What Graphviz itself made of the picture: objects (clusters first) and edges."""
    return json.loads(dot.pipe(format="json0"))


def _nodes(layout) -> list[dict]:
    return layout["objects"][layout.get("_subgraph_cnt", 0):]


def _folded(cell) -> set:
    kept = {o.id for o in cell.outputs} | {n.id for _, n in cell.states}
    return {n.id for n in cell.order
            if n.op == "slice" and "group" in n.attrs and n.name is None and n.id not in kept}


def _is_shared(n) -> bool:
    return n.op in ("param", "context") or (n.op == "noise" and n.attrs["per_sequence"])


def _expected_unrolled(cell, k):
    """Nodes and edges k unrolled steps demand: shared leaves once, every other visible node
    and an output sink per step, an initial and a final node per state; an edge per operand of
    a visible node, per output, and k+1 carries per state."""
    folded = _folded(cell)
    visible = [n for n in cell.order if n.id not in folded]
    shared = [n for n in visible if _is_shared(n)]
    per_step = [n for n in visible if not _is_shared(n)]
    operands = sum(len(n.inputs) for n in per_step)
    S, O = len(cell.states), len(cell.outputs)
    return len(shared) + k * (len(per_step) + O) + 2 * S, k * (operands + O) + S * (k + 1)


def test_cell_picture_renders_with_graphviz_dot():
    svg = viz.to_dot(_lstm()).pipe(format="svg").decode()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg


def test_cell_picture_has_every_node_with_its_shape():
    cell = _lstm()
    layout = _layout(viz.to_dot(cell))
    labels = {o["name"]: o["label"] for o in _nodes(layout)}
    for n in cell.order:
        if n.id in _folded(cell):
            assert viz.node_id(n) not in labels
            continue
        assert viz._shape_text(n) in labels[viz.node_id(n)]
    h_next = cell.outputs[0]
    assert labels[viz.node_id(h_next)] == "h_next\\nmul\\n(B,4)"


def test_parameters_are_cylinders_labelled_with_state_dict_keys():
    cell = _lstm()
    src = viz.to_dot(cell).source
    for key, node in cell.params.items():
        line = next(ln for ln in src.splitlines() if ln.strip().startswith(viz.node_id(node) + " "))
        assert "shape=cylinder" in line and key in line and viz._shape_text(node) in line


def test_next_state_edges_are_dashed_into_next_sinks():
    cell = _lstm()
    src = viz.to_dot(cell).source
    for k, (prev, nxt) in enumerate(cell.states):
        assert f'next_{k} [label="next {prev.name}' in src
        edge = next(ln for ln in src.splitlines() if f"{viz.node_id(nxt)} -> next_{k}" in ln)
        assert "style=dashed" in edge


def test_chunk_pieces_become_labelled_edges():
    cell = _lstm()
    src = viz.to_dot(cell).source
    assert len(_folded(cell)) == 4
    for piece in ("[0:4]", "[4:8]", "[8:12]", "[12:16]"):
        assert f'label="{piece}"' in src


@pytest.mark.parametrize("make", [_lstm, _cell_with_context_and_noise])
@pytest.mark.parametrize("k", [1, 3])
def test_unrolled_picture_has_exactly_the_nodes_and_edges_k_steps_demand(make, k):
    cell = make()
    layout = _layout(viz.to_dot(cell, unroll=k))
    assert (len(_nodes(layout)), len(layout["edges"])) == _expected_unrolled(cell, k)
    assert layout["_subgraph_cnt"] == k


def test_unrolled_picture_draws_each_parameter_once_outside_every_step():
    cell = _cell_with_context_and_noise()
    layout = _layout(viz.to_dot(cell, unroll=3))
    names = [o["name"] for o in _nodes(layout)]
    clustered = {g for c in layout["objects"][:layout["_subgraph_cnt"]] for g in c["nodes"]}
    gvid = {o["name"]: o["_gvid"] for o in _nodes(layout)}
    edges_from = {}
    for e in layout["edges"]:
        edges_from[e["tail"]] = edges_from.get(e["tail"], 0) + 1
    for key, p in cell.params.items():
        assert names.count(viz.node_id(p)) == 1
        assert gvid[viz.node_id(p)] not in clustered
        assert sum(1 for lbl in (o["label"] for o in _nodes(layout)) if lbl.startswith(key + "\\n")) == 1
    shared = cell.params["shared.weight"]  # the Linear called twice: two uses per step
    assert edges_from[gvid[viz.node_id(shared)]] == 2 * 3


def test_unrolled_state_edges_run_from_each_step_to_the_next():
    cell = _lstm()
    src = viz.to_dot(cell, unroll=3).source
    for k, (prev, nxt) in enumerate(cell.states):
        assert f"init_{k} -> {viz.node_id(prev, 's0_')}" in src
        assert f"{viz.node_id(nxt, 's0_')} -> {viz.node_id(prev, 's1_')}" in src
        assert f"{viz.node_id(nxt, 's1_')} -> {viz.node_id(prev, 's2_')}" in src
        assert f"{viz.node_id(nxt, 's2_')} -> final_{k}" in src
        assert f'label="initial {prev.name}' in src and f'label="final {prev.name}' in src


def test_compact_unrolled_picture_has_one_box_per_step():
    cell = _cell_with_context_and_noise()
    k = 3
    layout = _layout(viz.to_dot(cell, unroll=k, compact=True))
    shared = [n for n in cell.order if _is_shared(n) and n.op != "param"]
    O, X = len(cell.outputs), len(cell.inputs)
    steps = [o for o in _nodes(layout) if o["name"].startswith("step_")]
    assert len(steps) == k
    # one parameters node, one initial and one final state node
    assert len(_nodes(layout)) == k + 1 + len(shared) + k * (X + O) + 2
    assert len(layout["edges"]) == k * (X + 1 + len(shared) + O) + (k + 1)


def test_compact_picture_bundles_many_states_and_parameters():
    x = sg.Input(I, name="x")
    hs = [sg.State(H, name=f"h{k}") for k in range(5)]
    below, nxt = x, {}
    for k, h in enumerate(hs):
        below = nxt[h] = sg.tanh(sg.Linear(below.shape[-1] + H, H, name=f"layer{k}")(sg.concat([below, h])))
    src = viz.to_dot(sg.Cell(inputs=[x], states=nxt), unroll=2, compact=True).source
    assert src.count(" -> step_1") == 3  # x[1], the parameters, and the states of step 0
    assert "10 parameters" in src and "... and 2 more" in src
    assert 'label="h0, h1, h2, h3\\nh4"' in src


def test_tooltips_carry_the_users_file_and_line():
    line = sys._getframe().f_lineno + 1
    x = sg.Input(I, name="x")
    y = sg.tanh(x, name="y")
    src = viz.to_dot(sg.Graph(inputs=[x], outputs=[y])).source
    here = os.path.basename(__file__)
    assert f"{here}:{line}" in src and f"{here}:{line + 1}" in src
    assert "tooltip=" in next(ln for ln in src.splitlines() if ln.strip().startswith(viz.node_id(y) + " "))


def test_recurrence_is_drawn_from_its_cell():
    cell = _lstm()
    assert viz.to_dot(sg.Recurrence(cell), unroll=2).source == viz.to_dot(cell, unroll=2).source


def test_compiled_model_is_drawn_by_its_plans_to_dot():
    plan_picture = graphviz.Digraph(name="plan")

    class Plan:
        def to_dot(self):
            return plan_picture

    class Compiled:
        cell = _lstm()

        def plan(self):
            return Plan()

    assert viz.to_dot(Compiled()) is plan_picture
    assert viz.to_dot(Compiled(), unroll=2).source == viz.to_dot(Compiled.cell, unroll=2).source


def test_unrolling_a_graph_without_states_is_refused():
    x = sg.Input(I, name="x")
    g = sg.Graph(inputs=[x], outputs=[sg.relu(x)])
    assert "relu" in viz.to_dot(g).source
    with pytest.raises(ValueError, match="no states"):
        viz.to_dot(g, unroll=2)


def test_bare_nodes_are_drawn_with_all_they_depend_on():
    x = sg.Input(I, name="x")
    y = sg.relu(sg.Linear(I, H, name="lin")(x))
    src = viz.to_dot(y).source
    assert all(viz.node_id(n) in src for n in (x, y, y.inputs[0], y.inputs[0].inputs[0]))
    assert "lin.weight" in src and "lin.bias" in src


def test_names_with_backslashes_and_angle_brackets_stay_literal():
    x = sg.Input(I, name="<eos>")
    y = sg.tanh(x, name="a\\b")
    svg = viz.to_dot(sg.Graph(inputs=[x], outputs=[y])).pipe(format="svg").decode()
    assert "&lt;eos&gt;" in svg and "a\\b" in svg


def test_add_node_gives_a_plan_picture_the_same_node_look():
    cell = _lstm()
    node = cell.outputs[0]
    dot = graphviz.Digraph()
    name = viz.add_node(dot, node, prefix="k0_", color="purple")
    assert name == "k0_" + viz.node_id(node)
    style = viz.node_style(node)
    assert style["label"] in dot.source and "color=purple" in dot.source


def _broken_chunk():
    x, h = sg.Input(I, name="x"), sg.State(H, name="h")
    a, _unused = sg.chunk(sg.Linear(I + H, 2 * H)(sg.concat([x, h])), 2)
    sg.Cell(inputs=[x], states={h: sg.tanh(a)})


def test_error_picture_of_a_failed_op_draws_the_op_in_red_with_every_operand():
    a = sg.Linear(I, 8, name="a")(sg.Input(I, name="x"))
    b = sg.Linear(H, 6, name="b")(sg.State(H, name="h"))
    with pytest.raises(sg.ShapeError) as info:
        a + b
    src = viz.error_dot(info.value).source
    failed = next(ln for ln in src.splitlines() if ln.strip().startswith(viz.node_id(info.value.node) + " "))
    assert "color=red" in failed and "(shape error)" in failed
    assert f"{viz.node_id(a)} -> {viz.node_id(info.value.node)}" in src
    assert f"{viz.node_id(b)} -> {viz.node_id(info.value.node)}" in src


def test_error_picture_draws_the_failing_node_in_red():
    with pytest.raises(sg.GraphError) as info:
        _broken_chunk()
    err = info.value
    src = viz.error_dot(err).source
    line = next(ln for ln in src.splitlines() if ln.strip().startswith(viz.node_id(err.node) + " "))
    assert "color=red" in line
    assert viz.node_id(err.node.inputs[0]) in src  # its neighbourhood
    viz.error_dot(err).pipe(format="svg")


def test_error_picture_draws_a_bad_next_state_edge_in_red():
    x, h = sg.Input(I, name="x"), sg.State(H, name="h")
    with pytest.raises(sg.ShapeError) as info:
        sg.Cell(inputs=[x], states={h: sg.tanh(sg.Linear(I + H, 2)(sg.concat([x, h])))})
    src, (nxt, prev) = viz.error_dot(info.value).source, info.value.edge
    edge = next(ln for ln in src.splitlines() if f"{viz.node_id(nxt)} -> {viz.node_id(prev)}" in ln)
    assert "color=red" in edge and "next h" in edge


def test_error_picture_reaches_consumers_when_given_the_graph():
    x, h = sg.Input(I, name="x"), sg.State(H, name="h")
    mixed = sg.concat([x, h])
    h_next = sg.tanh(sg.Linear(I + H, 2)(mixed))
    err = sg.ShapeError("made up for the test", node=h)
    assert viz.node_id(mixed) not in viz.error_dot(err).source  # a leaf knows no consumers
    src = viz.error_dot(err, around=[h_next]).source
    assert viz.node_id(mixed) in src and viz.node_id(h_next) not in src  # two hops, not three


def test_checker_writes_a_picture_named_in_the_message_when_debugging(monkeypatch, tmp_path):
    monkeypatch.setenv("SEQGRAPH_DEBUG", "1")
    monkeypatch.setenv("SEQGRAPH_DEBUG_DIR", str(tmp_path))
    with pytest.raises(sg.GraphError) as info:
        _broken_chunk()
    err = info.value
    path = err.dot_path
    assert os.path.dirname(path) == str(tmp_path)
    assert str(err).endswith(f"\n(picture of the failing node: {path})")
    with open(path, encoding="utf-8") as f:
        assert f.read() == err.dot and "color=red" in err.dot


def test_attach_error_picture_only_sets_dot_without_debugging(monkeypatch):
    monkeypatch.delenv("SEQGRAPH_DEBUG", raising=False)
    with pytest.raises(sg.GraphError) as info:
        _broken_chunk()
    message = str(info.value)
    assert viz.attach_error_picture(info.value) is None
    assert "color=red" in info.value.dot and info.value.dot_path is None and str(info.value) == message


def test_attach_error_picture_never_raises(monkeypatch):
    err = sg.GraphError("broken on purpose", node=sg.Input(3, name="x"))

    def broken(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(viz, "error_dot", broken)
    assert viz.attach_error_picture(err, write=True) is None
    assert str(err) == "broken on purpose" and err.dot is None


_MAGIC = {"svg": b"<?xml", "png": b"\x89PNG", "pdf": b"%PDF", "dot": b"digraph"}


@pytest.mark.parametrize("fmt", sorted(_MAGIC))
def test_render_writes_each_format(tmp_path, fmt):
    path = viz.render(_lstm(), tmp_path / f"lstm.{fmt}", unroll=2)
    assert path == str(tmp_path / f"lstm.{fmt}")
    with open(path, "rb") as f:
        assert f.read().startswith(_MAGIC[fmt])


def test_render_without_dot_says_how_to_install_graphviz(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(viz.GraphvizMissing, match="install Graphviz"):
        viz.render(_lstm(), tmp_path / "lstm.svg")
    assert open(viz.render(_lstm(), tmp_path / "lstm.dot")).read().startswith("digraph")


def test_render_refuses_an_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match=r"\.svg"):
        viz.render(_lstm(), tmp_path / "lstm.jpeg")


_FACTORY = textwrap.dedent("""
    import seqgraph as sg

    def make_cell():
        x, h = sg.Input(3, name="x"), sg.State(4, name="h")
        return sg.Cell(inputs=[x], states={h: sg.tanh(sg.Linear(7, 4, name="step")(sg.concat([x, h])))})

    def make_compiled():
        return sg.compile(sg.Recurrence(make_cell()), backend="torch")

    def make_broken():
        x, h = sg.Input(3, name="x"), sg.State(4, name="h")
        return sg.Cell(inputs=[x], states={h: sg.tanh(sg.Linear(7, 2)(sg.concat([x, h])))})
""")


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "mycell.py"
    path.write_text(_FACTORY)
    return path


def test_cli_draws_a_factory_from_a_file(factory_file, tmp_path, capsys):
    out = tmp_path / "cell.svg"
    assert viz.main([f"{factory_file}:make_cell", "--unroll", "3", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    svg = out.read_text()
    assert "step 2" in svg and "step.weight" in svg


def test_cli_prints_compact_dot_source_without_output_file(factory_file, capsys):
    assert viz.main([f"{factory_file}:make_cell", "--unroll", "2", "--compact"]) == 0
    src = capsys.readouterr().out
    assert src.startswith("digraph") and "step_0 -> step_1" in src


def test_cli_draws_the_backward_plan_of_a_compiled_model(factory_file, capsys):
    assert viz.main([f"{factory_file}:make_compiled", "--backward"]) == 0
    src = capsys.readouterr().out
    assert src.startswith("digraph plan_backward") and "per step, from the last to the first" in src


def test_cli_refuses_backward_for_a_cell(factory_file, capsys):
    assert viz.main([f"{factory_file}:make_cell", "--backward"]) == 2
    assert "backward=True draws the backward plan of a compiled model" in capsys.readouterr().err


def test_cli_reports_a_missing_function(factory_file, capsys):
    assert viz.main([f"{factory_file}:nope"]) == 2
    assert "has no function 'nope'" in capsys.readouterr().err


def test_cli_writes_the_error_picture_of_a_broken_factory(factory_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEQGRAPH_DEBUG_DIR", str(tmp_path / "debug"))
    assert viz.main([f"{factory_file}:make_broken"]) == 1
    err = capsys.readouterr().err
    assert "ShapeError" in err and "picture of the failing node: " + str(tmp_path / "debug") in err


def test_cli_writes_the_error_picture_of_a_broken_factory_where_o_says(factory_file, tmp_path, capsys):
    out = tmp_path / "broken.dot"
    assert viz.main([f"{factory_file}:make_broken", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "ShapeError" in err and f"the error's picture: {out}" in err
    assert "color=red" in out.read_text()


def test_python_m_seqgraph_viz_runs_the_cli(factory_file, tmp_path):
    out = tmp_path / "cell.dot"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "seqgraph", "viz", f"{factory_file}:make_cell", "-o", str(out)],
                         capture_output=True, text=True, cwd=root, timeout=120)
    assert run.returncode == 0, run.stderr
    assert out.read_text().startswith("digraph")


def test_cell_shows_itself_as_svg_in_jupyter():
    assert "</svg>" in _lstm()._repr_svg_()
    x = sg.Input(I, name="x")
    assert "</svg>" in sg.Graph(inputs=[x], outputs=[sg.relu(x)])._repr_svg_()


def test_to_dot_and_render_are_exported():
    assert sg.to_dot is viz.to_dot and sg.render is viz.render


def test_cli_reports_a_factory_that_needs_arguments(factory_file, tmp_path, capsys):
    with open(factory_file, "a") as f:
        f.write("\n\ndef make_sized(size):\n    return None\n")
    assert viz.main([f"{factory_file}:make_sized"]) == 1
    assert "calling" in (err := capsys.readouterr().err) and "TypeError" in err and "no arguments" in err


def test_cli_reports_an_error_inside_the_factory_at_the_users_line(factory_file, capsys):
    with open(factory_file, "a") as f:
        f.write("\n\ndef make_typo():\n    return sg.tanh([1, 2])\n")
    assert viz.main([f"{factory_file}:make_typo"]) == 1
    err = capsys.readouterr().err
    assert "TypeError" in err and err.rstrip().endswith(f"at mycell.py:{len(_FACTORY.splitlines()) + 4}")
    assert "no arguments" not in err


@pytest.mark.parametrize("output,says", [("missing/cell.dot", "its folder does not exist"),
                                         ("cell.txt", "cannot tell the format; end the name with one of .svg")])
def test_cli_refuses_an_output_it_cannot_write_before_running_the_factory(factory_file, tmp_path, capsys, output, says):
    with pytest.raises(SystemExit) as exit_:
        viz.main([f"{factory_file}:make_broken", "-o", str(tmp_path / output)])  # (the factory is never called)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and "ShapeError" not in err


def test_drawing_a_container_names_the_recurrences_inside_it():
    with pytest.raises(TypeError, match=r"draw one of them: model.recurrence\(0\), model.recurrence\(1\)"):
        sg.to_dot(sg.nn.GRU(3, 4, num_layers=2))


@pytest.mark.parametrize("name", ["<b>bold</b>", "end\\", "two words", "7up"])
def test_any_cell_name_makes_a_picture_graphviz_accepts(name):
    x, h = sg.Input(I, name="x"), sg.State(H, name="h")
    cell = sg.Cell(inputs=[x], states={h: sg.tanh(sg.Linear(I + H, H)(sg.concat([x, h])))}, name=name)
    for kw in ({}, {"unroll": 2}, {"unroll": 2, "compact": True}):
        assert "</svg>" in viz.to_dot(cell, **kw).pipe(format="svg").decode()


def test_a_name_with_an_html_entity_is_shown_as_typed():
    x = sg.Input(I, name="a&lt;b")
    svg = viz.to_dot(sg.Graph(inputs=[x], outputs=[sg.relu(x)])).pipe(format="svg").decode()
    assert "a&amp;lt;b" in svg


def test_a_chunk_of_a_chunk_piece_draws_edges_from_the_drawn_node():
    x, h = sg.Input(4, name="x"), sg.State(4, name="h")
    a, b = sg.chunk(sg.Linear(8, 8, name="gates")(sg.concat([x, h])), 2)
    a1, a2 = sg.chunk(a, 2)
    cell = sg.Cell(inputs=[x], states={h: sg.tanh(b) * sg.concat([a2, a1])})
    for kw in ({}, {"unroll": 2}):
        layout = _layout(viz.to_dot(cell, **kw))
        drawn = {o["_gvid"] for o in _nodes(layout)}
        assert all(e["tail"] in drawn and e["head"] in drawn for e in layout["edges"])
        assert len(_nodes(layout)) == len([o for o in _nodes(layout) if o.get("label") != "\\N"])
    assert 'label="#2 [0:2] of [0:4]"' in viz.to_dot(cell).source  # concat's second operand


def test_without_graphviz_jupyter_falls_back_to_the_text_repr(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _lstm()._repr_svg_() is None
    assert sg.Recurrence(_lstm())._repr_svg_() is None
    assert sg.compile(sg.Recurrence(_lstm()), backend="torch")._repr_svg_() is None


def test_cli_reports_an_error_while_importing_the_file(tmp_path, capsys):
    (tmp_path / "broken.py").write_text("import seqgraph as sg\nx = sg.Input(3) + sg.Input(4)\n")
    assert viz.main([f"{tmp_path / 'broken.py'}:f"]) == 1
    err = capsys.readouterr().err
    assert "importing" in err and "raised ShapeError" in err
    (tmp_path / "syntax.py").write_text("def f(:\n")
    assert viz.main([f"{tmp_path / 'syntax.py'}:f"]) == 1
    assert "raised SyntaxError" in (err := capsys.readouterr().err) and "at syntax.py:1" in err


def test_cli_draws_a_factory_from_a_file_with_dataclasses(tmp_path):
    (tmp_path / "dc.py").write_text(textwrap.dedent("""
        from __future__ import annotations
        from dataclasses import dataclass
        import seqgraph as sg

        @dataclass
        class Sizes:
            i: int
            h: int

        def make_cell():
            s = Sizes(3, 4)
            return sg.cells.gru(s.i, s.h)
    """))
    assert viz.main([f"{tmp_path / 'dc.py'}:make_cell", "-o", str(tmp_path / "dc.dot")]) == 0


def test_operands_are_numbered_where_their_order_matters():
    x, z = sg.Input(I, name="x"), sg.Input(I, name="z")
    g = sg.Graph(inputs=[x, z], outputs=[(1.0 - z) * sg.tanh(x) + z / x])
    edges = {(e["tail"], e["head"]): e.get("label") for e in _layout(viz.to_dot(g))["edges"]}
    names = {o["_gvid"]: o["label"].split("\\n")[0] for o in _nodes(_layout(viz.to_dot(g)))}
    labelled = sorted((names[t], names[h], lab) for (t, h), lab in edges.items() if lab)
    assert labelled == [("1", "sub", "#1"), ("x", "div", "#2"), ("z", "div", "#1"), ("z", "sub", "#2")]
