import pytest

from critlib import CritlibError
from critlib.params import Params, load_params, valid_keys


def test_default_params_file_is_valid():
    p = load_params("params/default.yaml")
    assert p.model == "default" and p.output_dir == "outputs/default"
    assert p.metrics == ["grad_x_weight", "grad_squared", "fisher", "magnitude", "wanda"]


def test_overrides_are_typed(tmp_path):
    p = load_params(None, ["seq_len=32", "metrics=magnitude, wanda", "prepend_bos=false", "tokenizer=default"])
    assert p.seq_len == 32 and p.metrics == ["magnitude", "wanda"] and p.prepend_bos is False
    with pytest.raises(CritlibError, match="prepend_bos must be true or false"):
        load_params(None, ["prepend_bos=maybe"])
    with pytest.raises(CritlibError, match="--set expects key=value"):
        load_params(None, ["seq_len"])


def test_unknown_key_lists_valid_keys(tmp_path):
    (tmp_path / "p.yaml").write_text("modle: default\n")
    with pytest.raises(CritlibError) as e:
        load_params(tmp_path / "p.yaml")
    assert "modle" in str(e.value) and all(k in str(e.value) for k in valid_keys())


@pytest.mark.parametrize("bad", [{"n_sequences": 0}, {"dtype": "fp8"}, {"metrics": []}, {"device": "tpu"},
                                 {"metrics": ["magnitude", "magnitude"]}, {"seq_len": 1}])
def test_invalid_values(bad):
    with pytest.raises(CritlibError):
        Params(**bad).validate()
