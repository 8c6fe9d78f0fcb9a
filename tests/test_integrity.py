import hashlib
import json

import pytest
import torch

from critlib import CritlibError
from critlib.cli import main
from critlib.integrity import (critical_coords, fingerprint, format_report, load_fingerprint, save_fingerprint,
                               tensor_sha256, verify)
from critlib.models import load_model
from tests.conftest import tiny

NAME = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tiny("tiny-llama").save_pretrained(d)  # safetensors
    return d


def flip_and_save(src, dst, name, flat, bit=0):
    m = load_model(str(src), device="cpu").model
    with torch.no_grad():
        v = dict(m.named_parameters())[name].data.view(-1)[flat:flat + 1].view(torch.int32)
        v ^= 1 << bit
    m.save_pretrained(dst)


def test_tensor_sha256_is_of_the_stored_bytes():
    t = torch.randn(3, 5).to(torch.bfloat16)
    assert tensor_sha256(t) == hashlib.sha256(t.view(torch.int16).numpy().tobytes()).hexdigest()
    assert tensor_sha256(t.t()) == hashlib.sha256(t.t().contiguous().view(torch.int16).numpy().tobytes()).hexdigest()


def test_flipped_bit_in_saved_model_is_named(saved, tmp_path):
    m = load_model(str(saved), device="cpu").model
    crit = critical_coords(m, ["magnitude"], 20)
    flat = next(f for n, f, _ in crit if n == NAME) if any(n == NAME for n, _, _ in crit) else None
    if flat is None:  # make sure the changed weight is a recorded critical one
        flat = 11
        crit.append((NAME, flat, ["manual"]))
    fp = fingerprint(m, crit)
    assert verify(m, fp)["ok"]
    flip_and_save(saved, tmp_path / "flipped", NAME, flat, bit=0)
    report = verify(load_model(str(tmp_path / "flipped"), device="cpu").model, fp)
    assert not report["ok"]
    assert [c["param"] for c in report["changed_tensors"]] == [NAME]
    cols = m.get_parameter(NAME).shape[1]
    [w] = report["changed_weights"]
    assert (w["param"], w["row"], w["col"], w["flat"]) == (NAME, flat // cols, flat % cols, flat)
    assert int(w["bits_expected"], 16) ^ int(w["bits_found"], 16) == 1
    text = format_report(report)
    assert NAME in text and f"[{flat // cols}, {flat % cols}]" in text
    # a change outside the critical set is still caught at tensor level
    flip_and_save(saved, tmp_path / "other", "model.layers.0.self_attn.q_proj.weight", 0, bit=3)
    report = verify(load_model(str(tmp_path / "other"), device="cpu").model, fp)
    assert [c["param"] for c in report["changed_tensors"]] == ["model.layers.0.self_attn.q_proj.weight"]


def test_critical_coords_equal_full_sort_of_magnitude():
    m = tiny("tiny-llama")
    got = [(n, f) for n, f, _ in critical_coords(m, ["magnitude"], 7)]
    order = [n for n, _ in m.named_parameters()]
    allw = [(-abs(float(v)), order.index(n), i, n) for n, p in m.named_parameters()
            for i, v in enumerate(p.detach().reshape(-1).tolist())]
    ref = sorted(sorted(allw)[:7], key=lambda t: (t[1], t[2]))
    assert got == [(n, i) for _, _, i, n in ref]


def test_edited_or_truncated_fingerprint_is_rejected(tmp_path):
    m = tiny("tiny-llama")
    fp = fingerprint(m, critical_coords(m, ["magnitude"], 5))
    path = tmp_path / "fp.json"
    save_fingerprint(fp, path)
    assert load_fingerprint(path) == fp
    text = path.read_text()
    (tmp_path / "trunc.json").write_text(text[: len(text) // 2])
    with pytest.raises(CritlibError, match="not valid JSON"):
        load_fingerprint(tmp_path / "trunc.json")
    edited = json.loads(text)
    edited["critical"][0]["bits"] = "0x00000000"
    (tmp_path / "edit.json").write_text(json.dumps(edited))
    with pytest.raises(CritlibError, match="edited or corrupted"):
        load_fingerprint(tmp_path / "edit.json")
    dropped = json.loads(text)
    dropped["tensors"].pop(NAME)
    with pytest.raises(CritlibError, match="edited or corrupted"):
        verify(m, dropped)
    with pytest.raises(CritlibError, match="not a critlib fingerprint"):
        verify(m, {"tensors": {}})


def test_cli_fingerprint_verify_return_codes(saved, tmp_path, capsys):
    out = tmp_path / "fp.json"
    assert main(["fingerprint", str(saved), "-o", str(out), "--k", "5", "--set", "device=cpu"]) == 0
    assert len(json.loads(out.read_text())["critical"]) == 5
    assert main(["verify", str(saved), str(out), "--set", "device=cpu"]) == 0
    assert "OK" in capsys.readouterr().out
    flip_and_save(saved, tmp_path / "bad", NAME, 4, bit=30)
    assert main(["verify", str(tmp_path / "bad"), str(out), "--set", "device=cpu"]) == 1
    assert NAME in capsys.readouterr().out
    out.write_text(out.read_text()[:-40])
    assert main(["verify", str(saved), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("critlib: error:")
    # gradient metrics take their data from the params (random tokens for this tokenizer-less model)
    out2 = tmp_path / "fp2.json"
    rc = main(["fingerprint", str(saved), "-o", str(out2), "--k", "3", "--metric", "grad_x_weight", "--metric",
               "magnitude", "--set", "data=random", "--set", "seq_len=8", "--set", "n_sequences=2",
               "--set", "n_heldout=0", "--set", "device=cpu"])
    assert rc == 0
    fp2 = load_fingerprint(out2)
    assert 3 <= len(fp2["critical"]) <= 6 and fp2["meta"]["metrics"] == ["grad_x_weight", "magnitude"]
    assert main(["fingerprint", str(saved), "-o", str(out2), "--metric", "nope"]) == 2
