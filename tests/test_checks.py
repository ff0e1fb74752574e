"""Bad input raises a ValueError/TypeError that names the argument and what was expected."""
import pytest
import torch

import nsa
from test_reference import SMALL, make_inputs


def good():
    return make_inputs(1, 20, 4, 2, 8, 6, SMALL, dtype=torch.float32)


def call(**overrides):
    x = {**good(), **overrides}
    config = x.pop("config", SMALL)
    cu = x.pop("cu_seqlens", None)
    scale = x.pop("scale", None)
    backend = x.pop("backend", None)
    return nsa.nsa_attention(**x, config=config, cu_seqlens=cu, scale=scale, backend=backend)


@pytest.mark.parametrize("overrides,error,words", [
    (dict(q=torch.randn(20, 4, 8)), ValueError, ["q", "4 dims"]),
    (dict(gates=torch.rand(1, 20, 4)), ValueError, ["gates", "4 dims"]),
    (dict(k_cmp=torch.randn(1, 9, 3, 8)), ValueError, ["multiple", "k_cmp"]),   # Hq = 4 % Hkv = 3
    (dict(v_slc=torch.randn(1, 20, 1, 6)), ValueError, ["v_slc", "key/value heads"]),
    (dict(k_swa=torch.randn(1, 20, 2, 7)), ValueError, ["k_swa", "Dk"]),
    (dict(v_swa=torch.randn(1, 20, 2, 5)), ValueError, ["v_swa", "Dv"]),
    (dict(k_cmp=torch.randn(1, 7, 2, 8), v_cmp=torch.randn(1, 7, 2, 6)), ValueError, ["k_cmp", "compressed", "8"]),
    (dict(k_slc=torch.randn(1, 19, 2, 8)), ValueError, ["k_slc", "tokens"]),
    (dict(gates=torch.rand(1, 20, 4, 2)), ValueError, ["gates", "3"]),
    (dict(gates=torch.rand(1, 20, 2, 3)), ValueError, ["gates", "query heads"]),
    (dict(q=torch.randn(1, 20, 4, 8, dtype=torch.float64)), TypeError, ["k_cmp", "dtype"]),
    (dict(v_cmp=torch.randint(0, 3, (1, 9, 2, 6))), TypeError, ["v_cmp", "float"]),
    (dict(k_slc=[1, 2]), TypeError, ["k_slc", "Tensor"]),
    (dict(scale=-1.0), ValueError, ["scale"]),
    (dict(backend="cuda"), ValueError, ["backend", "reference"]),
    (dict(backend="triton"), ValueError, ["backend='triton'", "CUDA"]),
    (dict(config=dict(window=4)), TypeError, ["config", "NSAConfig"]),
    (dict(cu_seqlens=torch.tensor([0, 20])), TypeError, ["cu_seqlens", "int32"]),
    (dict(cu_seqlens=torch.tensor([0, 10, 19], dtype=torch.int32)), ValueError, ["cu_seqlens", "20"]),
    (dict(cu_seqlens=torch.tensor([[0, 20]], dtype=torch.int32)), ValueError, ["cu_seqlens", "1-D"]),
    (dict(cu_seqlens=torch.tensor([0, 12, 8, 20], dtype=torch.int32)), ValueError, ["cu_seqlens", "non-decreasing"]),
    (dict(cu_seqlens=torch.tensor([0, 10, 20], dtype=torch.int32)), ValueError, ["k_cmp", "compressed"]),
])
def test_bad_input_names_the_argument(overrides, error, words, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(error) as info:
        call(**overrides)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_packed_batch_must_have_batch_one():
    x = make_inputs(2, 20, 4, 2, 8, 6, SMALL, dtype=torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens.*packed"):
        nsa.nsa_attention(**x, config=SMALL, cu_seqlens=torch.tensor([0, 20], dtype=torch.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_mixed_devices():
    x = good()
    x["v_swa"] = x["v_swa"].cuda()
    with pytest.raises(ValueError, match="v_swa.*device"):
        nsa.nsa_attention(**x, config=SMALL)


def test_mixed_devices_on_meta():
    """The device check runs before any compute, so a meta tensor exercises it without a GPU."""
    x = good()
    x["k_slc"] = x["k_slc"].to("meta")
    with pytest.raises(ValueError, match="k_slc is on meta"):
        nsa.nsa_attention(**x, config=SMALL)


@pytest.mark.parametrize("kwargs,words", [
    (dict(cmp_block=16, cmp_stride=32), ["cmp_block", ">= cmp_stride"]),
    (dict(cmp_block=24, cmp_stride=16), ["divide cmp_block"]),
    (dict(cmp_block=32, cmp_stride=16, slc_block=40), ["divide slc_block"]),
    (dict(num_selected=0), ["num_selected", "positive"]),
    (dict(window=2.5), ["window", "positive int"]),
])
def test_config_rejects_broken_constraints(kwargs, words):
    with pytest.raises(ValueError) as info:
        nsa.NSAConfig(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_select_blocks_checks_its_inputs():
    x = good()
    with pytest.raises(ValueError, match="k_cmp"):
        nsa.select_blocks(x["q"], x["k_cmp"][:, :3], SMALL)
    with pytest.raises(ValueError, match="q must have 4 dims"):
        nsa.select_blocks(x["q"][0], x["k_cmp"], SMALL)


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), -float("inf"), 0, True, "0.5"])
def test_scale_must_be_finite_and_positive(scale):
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        call(scale=scale)


def test_scale_accepts_numpy_scalars():
    np = pytest.importorskip("numpy")
    torch.testing.assert_close(call(scale=np.float32(0.25)), call(scale=0.25))
    torch.testing.assert_close(call(scale=np.int64(1)), call(scale=1.0))


def test_head_dim_zero_is_a_clear_error():
    x = good()
    q = torch.randn(1, 20, 4, 0)
    with pytest.raises(ValueError, match=r"q must have at least one head and a head dim >= 1"):
        call(q=q, k_cmp=x["k_cmp"][..., :0], k_slc=x["k_slc"][..., :0], k_swa=x["k_swa"][..., :0])
    with pytest.raises(ValueError, match=r"q must have at least one head and a head dim >= 1"):
        nsa.select_blocks(q, x["k_cmp"][..., :0], SMALL)
    with pytest.raises(ValueError, match=r"v_cmp must have at least one head and a head dim >= 1"):
        call(v_cmp=x["v_cmp"][..., :0], v_slc=x["v_slc"][..., :0], v_swa=x["v_swa"][..., :0])
