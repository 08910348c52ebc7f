import json
import struct

import pytest
import torch

import zqhero_fx
from tests.models import ConvNet, bert_batch


def test_round_trip_gives_identical_outputs_without_recalibration(bert_traced, bert_calibration, tmp_path):
    _, gm = bert_traced("h64_l2")
    q = zqhero_fx.convert(gm, "M3", calibration=bert_calibration)
    path = zqhero_fx.save(q, tmp_path / "model.zq.safetensors")
    loaded = zqhero_fx.load(path)
    for batch, seq in [(2, 12), (5, 33)]:
        test = bert_batch(batch, seq, pad_from=seq - 3, seed=seq)
        a, b = q(**test), loaded(**test)
        assert type(a) is type(b)
        assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(a.pooler_output, b.pooler_output)
    assert loaded.meta["zqhero"]["mode"] == "M3"
    assert zqhero_fx.ops_histogram(loaded) == zqhero_fx.ops_histogram(q)


def test_file_is_plain_safetensors_with_int8_weights(bert_traced, tmp_path):
    _, gm = bert_traced("h64_l2")
    path = zqhero_fx.save(zqhero_fx.convert(gm, "M1"), tmp_path / "m1.safetensors")
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    assert "zqhero_fx" in header["__metadata__"]
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert "I8" in dtypes
    assert b"\x80\x04" not in raw[:8 + header_len]  # no pickle protocol marker in the header


def test_refuses_graphs_with_module_calls(tmp_path):
    gm = torch.fx.symbolic_trace(ConvNet().eval())
    q = zqhero_fx.convert(gm, "M1", example_inputs=(torch.randn(2, 3, 8, 8),))
    with pytest.raises(zqhero_fx.SerializationError, match="calls module 'conv'"):
        zqhero_fx.save(q, tmp_path / "conv.safetensors")


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(zqhero_fx.SerializationError, match="no zqhero_fx graph"):
        zqhero_fx.load(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(zqhero_fx.SerializationError, match="not a safetensors file"):
        zqhero_fx.load(tmp_path / "junk.safetensors")
    with pytest.raises(zqhero_fx.SerializationError, match="no saved model"):
        zqhero_fx.load(tmp_path / "missing.safetensors")


def test_fp8_model_round_trips(bert_traced, bert_calibration, tmp_path):
    _, gm = bert_traced("h64_l2")
    q = zqhero_fx.convert(gm, "M3-fp8", calibration=bert_calibration)
    path = zqhero_fx.save(q, tmp_path / "m3-fp8.safetensors")
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert "F8_E4M3" in {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    loaded = zqhero_fx.load(path)
    test = bert_batch(2, 9, seed=5)
    with torch.no_grad():
        assert torch.equal(q(**test).last_hidden_state, loaded(**test).last_hidden_state)
    assert loaded.meta["zqhero"]["activation_format"] == "fp8_e4m3"


def test_files_of_the_int8_only_format_are_refused_with_a_reason(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "old.safetensors"),
              metadata={"zqhero_fx": json.dumps({"format": "zqhero_fx.graph/1", "nodes": []})})
    with pytest.raises(zqhero_fx.SerializationError, match="older zqhero_fx.*convert the model again"):
        zqhero_fx.load(tmp_path / "old.safetensors")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_file_gets_the_mode_the_umask_gives_new_files(bert_traced, tmp_path, umask, mode):
    import os
    import stat

    _, gm = bert_traced("h64_l2")
    q = zqhero_fx.convert(gm, "M1")
    before = os.umask(umask)
    try:
        path = zqhero_fx.save(q, tmp_path / "m1.safetensors")
        assert os.umask(umask) == umask  # save left the process umask as it found it
    finally:
        os.umask(before)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_loaded_model_still_refuses_float_token_ids(bert_traced, tmp_path):
    _, gm = bert_traced("h64_l2")
    loaded = zqhero_fx.load(zqhero_fx.save(zqhero_fx.convert(gm, "M1"), tmp_path / "m1.safetensors"))
    test = bert_batch(2, 8)
    with pytest.raises(zqhero_fx.InputError, match="'input_ids' holds token ids"):
        loaded(input_ids=test["input_ids"].float(), attention_mask=test["attention_mask"])
