"""torch -> ONNX export with both exporters, and MODULE:FACTORY / weights loading."""

from __future__ import annotations

import os
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from sglp_onnx.errors import UserError
from sglp_onnx.tools.export.torch_export import export_torch, load_factory, load_torch_model


class TinyResidual(nn.Module):
    """Stem, two identity residual blocks with BN, a head: the shape of a small CNN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()) for _ in range(2)
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(x.mean(dim=(2, 3)))


def tiny_model(seed: int = 0) -> TinyResidual:
    torch.manual_seed(seed)
    model = TinyResidual()
    # Non-trivial BN statistics, so a wrong BN folding would show in the outputs.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    return model


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.fixture(scope="module", params=["dynamo", "legacy"])
def exported(request, tmp_path_factory):
    model = tiny_model()
    model.train()
    model.blocks[1].eval()
    path = tmp_path_factory.mktemp(request.param) / "tiny.onnx"
    proto = export_torch(model, (torch.randn(1, 1, 6, 6),), path, exporter=request.param)
    # Export must leave every module's train/eval mode as the caller set it.
    assert model.training and model.blocks[0][1].training and not model.blocks[1][1].training
    return request.param, model, path, proto


@pytest.mark.parametrize("batch", [1, 5])
def test_export_matches_torch(exported, batch):
    _, model, path, _ = exported
    x = torch.randn(batch, 1, 6, 6, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    (actual,) = run_onnx(path, {"input": x.numpy()})
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def test_export_is_one_self_contained_file_with_dynamic_batch(exported):
    exporter, model, path, proto = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.onnx"]
    on_disk = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in on_disk.graph.initializer)
    assert on_disk == proto
    for value in list(on_disk.graph.input) + list(on_disk.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [i.name for i in on_disk.graph.input] == ["input"]
    assert [o.name for o in on_disk.graph.output] == ["logits"]


@pytest.mark.parametrize("exported", ["dynamo"], indirect=True)
def test_dynamo_export_keeps_name_scopes(exported):
    _, _, _, proto = exported
    scopes = [
        prop.value for node in proto.graph.node for prop in node.metadata_props if prop.key == "pkg.torch.onnx.name_scopes"
    ]
    assert scopes, "dynamo export lost the pkg.torch.onnx.name_scopes metadata"
    assert any("blocks.1" in scope for scope in scopes)


def test_export_is_quiet(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("SGLP_ONNX_VERBOSE", raising=False)
    export_torch(tiny_model(), (torch.randn(1, 1, 6, 6),), tmp_path / "m.onnx", exporter="dynamo")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_export_multiple_inputs_and_opset(tmp_path):
    class TwoInputs(nn.Module):
        def forward(self, a, b):
            return a * 2 + b

    path = tmp_path / "two.onnx"
    proto = export_torch(
        TwoInputs(), (torch.randn(1, 3), torch.randn(1, 3)), path,
        input_names=("a", "b"), output_names=("y",), exporter="legacy", opset=17,
    )
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    a, b = np.ones((4, 3), np.float32), np.full((4, 3), 0.5, np.float32)
    (y,) = run_onnx(path, {"a": a, "b": b})
    np.testing.assert_allclose(y, 2.5)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_export_failure_is_user_error_and_writes_nothing(tmp_path, exporter):
    class Unsupported(nn.Module):
        def forward(self, x):
            return torch.linalg.eigh(x @ x.transpose(-1, -2))[0]

    path = tmp_path / "bad.onnx"
    with pytest.raises(UserError, match=f"{exporter} exporter failed.*eigh"):
        export_torch(Unsupported(), (torch.randn(2, 3, 3),), path, exporter=exporter)
    assert list(tmp_path.iterdir()) == []


def test_export_argument_errors(tmp_path):
    model = tiny_model()
    x = (torch.randn(1, 1, 6, 6),)
    with pytest.raises(UserError, match="unknown exporter"):
        export_torch(model, x, tmp_path / "m.onnx", exporter="jit")
    with pytest.raises(UserError, match="one name per input"):
        export_torch(model, x, tmp_path / "m.onnx", input_names=("a", "b"))
    with pytest.raises(UserError, match="output folder does not exist"):
        export_torch(model, x, tmp_path / "missing" / "m.onnx")


# --- MODULE:FACTORY and weights -------------------------------------------------

FACTORY_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    NOT_CALLABLE = 3

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x):
            return self.bn(self.fc(x))

    def build():
        return Net()

    def not_a_module():
        return {"fc": 1}

    def broken():
        raise RuntimeError("factory exploded")
    """
)


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A module importable only because it sits in the current directory."""
    name = f"sglp_test_factory_{os.getpid()}_{tmp_path.name}".replace("-", "_")
    (tmp_path / f"{name}.py").write_text(FACTORY_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield name
    sys.modules.pop(name, None)


def test_load_factory_from_cwd_restores_sys_path(factory_module):
    before = list(sys.path)
    factory = load_factory(f"{factory_module}:build")
    assert isinstance(factory(), nn.Module)
    assert sys.path == before


def test_load_factory_dotted_attribute():
    assert load_factory("collections:OrderedDict.fromkeys")(["a"]) == {"a": None}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon_here", "expected MODULE:FACTORY"),
        (":build", "expected MODULE:FACTORY"),
        ("mod:", "expected MODULE:FACTORY"),
        ("a:b:c", "expected MODULE:FACTORY"),
        ("sglp_no_such_module_xyz:build", "cannot import module"),
        ("{mod}:missing", "has no attribute"),
        ("{mod}:NOT_CALLABLE", "not a callable"),
    ],
)
def test_load_factory_errors(factory_module, spec, message):
    with pytest.raises(UserError, match=message):
        load_factory(spec.format(mod=factory_module))


def test_load_factory_reports_a_failing_import(tmp_path, monkeypatch):
    (tmp_path / "sglp_test_broken_import.py").write_text("import sglp_missing_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="sglp_missing_dependency_xyz"):
        load_factory("sglp_test_broken_import:build")
    sys.modules.pop("sglp_test_broken_import", None)


def test_load_torch_model_rejects_bad_factories(factory_module):
    with pytest.raises(UserError, match="not a torch.nn.Module"):
        load_torch_model(f"{factory_module}:not_a_module")
    with pytest.raises(UserError, match="factory exploded"):
        load_torch_model(f"{factory_module}:broken")


def trained_state(module_name: str) -> dict[str, torch.Tensor]:
    model = load_factory(f"{module_name}:build")()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    return model.state_dict()


@pytest.mark.parametrize("layout", ["raw", "state_dict", "model", "safetensors"])
def test_load_torch_model_weights(factory_module, tmp_path, layout):
    state = trained_state(factory_module)
    if layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "w.pt"
        torch.save(state if layout == "raw" else {layout: state, "epoch": 3}, path)
    model = load_torch_model(f"{factory_module}:build", path)
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_load_torch_model_names_mismatched_keys(factory_module, tmp_path):
    state = trained_state(factory_module)
    state["extra.weight"] = state.pop("fc.weight")
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"missing keys: fc\.weight.*unexpected keys: extra\.weight"):
        load_torch_model(f"{factory_module}:build", path)


def test_load_torch_model_shape_mismatch(factory_module, tmp_path):
    state = trained_state(factory_module)
    state["fc.weight"] = torch.zeros(5, 3)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match="fc.weight"):
        load_torch_model(f"{factory_module}:build", path)


def test_load_torch_model_rejects_non_state_dicts(factory_module, tmp_path):
    path = tmp_path / "w.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(UserError, match="not a state_dict"):
        load_torch_model(f"{factory_module}:build", path)
    with pytest.raises(UserError, match="weights file not found"):
        load_torch_model(f"{factory_module}:build", tmp_path / "absent.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(UserError, match="cannot read safetensors"):
        load_torch_model(f"{factory_module}:build", tmp_path / "junk.safetensors")


class _Payload:
    """Unpickling this would create the marker file: the attack a weights file can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_not_run(factory_module, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        pickle.dump({"fc.weight": _Payload(marker)}, handle)
    with pytest.raises(UserError, match="refusing to load"):
        load_torch_model(f"{factory_module}:build", path)
    assert not marker.exists()
    # Same payload inside a torch.save zip archive.
    torch.save({"state_dict": _Payload(marker)}, path)
    with pytest.raises(UserError, match="refusing to load"):
        load_torch_model(f"{factory_module}:build", path)
    assert not marker.exists()
    # Control: the payload is live, so the checks above are not vacuous.
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()
