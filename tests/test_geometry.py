import math

import pytest

from obcompress.geometry import LayerGeometry, check_geometry, kernel_shape, output_shape


def test_kernel_and_output_shapes_follow_from_the_counts():
    conv = LayerGeometry("c", "conv2d", 1, 8, 4 * 9, taps=9, positions=50.0)
    assert kernel_shape(conv) == (3, 3)
    assert output_shape(conv) == (7, 7)  # the square nearest to 50 positions
    odd = LayerGeometry("c", "conv2d", 1, 8, 4 * 6, taps=6, positions=16.0)
    assert kernel_shape(odd) == (1, 6) and math.prod(kernel_shape(odd)) == odd.taps
    c1 = LayerGeometry("c", "conv1d", 2, 3, 5, taps=5, positions=10.4)
    assert kernel_shape(c1) == (5,) and output_shape(c1) == (10,)
    fc = LayerGeometry("fc", "linear", 1, 4, 8, positions=3.0)
    assert output_shape(fc) == (3,) and fc.weights == 32 and fc.macs == 96.0
    assert LayerGeometry.from_dict(conv.to_dict()) == conv


@pytest.mark.parametrize("geom, message", [
    (LayerGeometry("x", "lstm", 1, 2, 3), "layer 'x': unknown layer kind 'lstm'"),
    (LayerGeometry("x", "linear", 1, 0, 3), "layer 'x': rows must be an integer >= 1, got 0"),
    (LayerGeometry("x", "conv2d", 1, 2, 10, taps=4), "10 columns are not a whole number"),
    (LayerGeometry("x", "linear", 1, 2, 3, positions=float("nan")), "positions must be a finite number > 0"),
    ("fc", "needs a LayerGeometry"),
])
def test_check_geometry_names_the_layer_and_the_problem(geom, message):
    with pytest.raises(ValueError, match=message):
        check_geometry(geom)
