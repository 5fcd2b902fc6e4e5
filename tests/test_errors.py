"""seqgraph/errors.py: the user's creation site and how messages name a node."""
import inspect
import os

import pytest

import seqgraph as sg
from seqgraph.errors import UNKNOWN_SITE, Site, describe, user_site


def test_user_site_is_the_first_frame_outside_the_package():
    site = user_site()
    assert (os.path.basename(site.path), site.line) == ("test_errors.py", inspect.currentframe().f_lineno - 1)
    assert site.function == "test_user_site_is_the_first_frame_outside_the_package"


def test_a_node_records_the_line_that_made_it_not_a_line_inside_seqgraph():
    x = sg.Input(3, name="x"); line = inspect.currentframe().f_lineno  # noqa: E702
    assert str(x.site) == f"test_errors.py:{line}"


def test_a_site_prints_as_file_and_line():
    assert str(Site("/a/b/cell.py", 12, "make")) == "cell.py:12"
    assert str(UNKNOWN_SITE) == "<unknown>:0"


def test_describe_names_the_op_the_name_and_the_site():
    lin = sg.Linear(3, 4, name="gate")
    y = lin(sg.Input(3, name="x")); line = inspect.currentframe().f_lineno  # noqa: E702
    assert describe(y) == f"Linear 'gate' (declared at test_errors.py:{line})"


def test_a_linear_given_the_wrong_size_carries_the_linear_it_could_not_build_reading_its_input():
    x = sg.Input(3, name="x")
    lin = sg.Linear(4, 2, name="gate")
    with pytest.raises(sg.ShapeError) as err:
        lin(x)
    assert err.value.node.op == "linear" and err.value.node.name == "gate"
    assert err.value.node.inputs == (x, lin.weight) and "color=red" in err.value.dot


def test_a_layer_norm_of_the_wrong_size_names_itself_and_carries_a_picture():
    h = sg.State(8, name="h")
    with pytest.raises(sg.ShapeError, match=r"LayerNorm 'ln' \(declared at .*\) normalises 6 features but 'h' has 8") \
            as err:
        sg.LayerNorm(6, name="ln")(h)
    assert err.value.node.op == "layer_norm" and err.value.node.inputs == (h,) and "color=red" in err.value.dot


def test_a_shape_error_of_an_op_carries_the_op_that_could_not_be_built_with_all_its_operands():
    a, b = sg.Input(8, name="a"), sg.Input(6, name="b")
    with pytest.raises(sg.ShapeError) as err:
        a + b
    assert err.value.node.op == "add" and err.value.node.inputs == (a, b)


def test_the_error_classes_nest_as_documented():
    assert issubclass(sg.ShapeError, sg.GraphError) and issubclass(sg.WiringError, sg.GraphError)
    assert issubclass(sg.InputError, ValueError)
