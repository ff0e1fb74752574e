"""NSAConfig: its fields are positive ints below 2**31, numpy ints included."""
import pytest

from nsa import NSAConfig

np = pytest.importorskip("numpy")


def test_numpy_ints_become_python_ints():
    config = NSAConfig(cmp_block=np.int64(16), cmp_stride=np.int32(8), slc_block=np.int64(32),
                       num_selected=np.int16(4), window=np.uint32(64))
    assert config == NSAConfig(16, 8, 32, 4, 64)
    assert all(type(getattr(config, f)) is int for f in ("cmp_block", "cmp_stride", "slc_block", "num_selected", "window"))
    assert hash(config) == hash(NSAConfig(16, 8, 32, 4, 64))


@pytest.mark.parametrize("field", ["cmp_block", "cmp_stride", "slc_block", "num_selected", "window"])
def test_fields_must_fit_int32(field):
    with pytest.raises(ValueError, match=rf"NSAConfig.{field} must be < 2\*\*31"):
        NSAConfig(**{field: 2 ** 31})
    NSAConfig(window=2 ** 31 - 1)


@pytest.mark.parametrize("value", [True, 4.0, np.float64(4), "4", None])
def test_fields_must_be_ints(value):
    with pytest.raises(ValueError, match="NSAConfig.window must be a positive int"):
        NSAConfig(window=value)
