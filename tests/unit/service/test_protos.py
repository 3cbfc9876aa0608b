"""The .proto files speak the same wire format as the clients users already have.

v2 is checked against tritonclient's own descriptors; TorchServe against the inference.proto shipped
inside TorchServe 0.12's model-server.jar, compiled here with grpcio-tools.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.grpc import service_pb2_grpc as triton_pb2_grpc

from service import protos

V2_RPCS = {
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
}


def _messages(descriptors: Any) -> Iterator[Any]:
    """Every message descriptor, nested ones (map entries included) too."""
    for descriptor in descriptors:
        yield descriptor
        yield from _messages(descriptor.nested_types)


def _fields(proto: descriptor_pb2.DescriptorProto) -> dict[str, tuple[object, ...]]:
    """name -> (number, type, label, type name, oneof, proto3 optional, packed option) of a DescriptorProto."""
    oneofs = [oneof.name for oneof in proto.oneof_decl]
    return {
        f.name: (
            f.number,
            f.type,
            f.label,
            f.type_name,
            oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
            f.proto3_optional,
            f.options.packed if f.options.HasField("packed") else None,
        )
        for f in proto.field
    }


def _as_proto(descriptor: Any) -> descriptor_pb2.DescriptorProto:
    proto = descriptor_pb2.DescriptorProto()
    descriptor.CopyToProto(proto)
    return proto


def test_v2_messages_match_tritonclient() -> None:
    ours = protos.load_v2().messages.DESCRIPTOR
    assert ours.package == triton_pb2.DESCRIPTOR.package == "inference"
    pool = triton_pb2.DESCRIPTOR.pool
    checked = 0
    for descriptor in _messages(ours.message_types_by_name.values()):
        theirs = pool.FindMessageTypeByName(descriptor.full_name)
        assert _fields(_as_proto(descriptor)) == _fields(_as_proto(theirs)), descriptor.full_name
        assert descriptor.GetOptions().map_entry == theirs.GetOptions().map_entry, descriptor.full_name
        checked += 1
    assert checked >= 30  # 21 top-level messages, their nested tensors and map entries


def test_v2_service_matches_tritonclient() -> None:
    ours = protos.load_v2().messages.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    assert {method.name for method in ours.methods} == V2_RPCS
    for method in ours.methods:
        triton = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == triton.input_type.full_name
        assert method.output_type.full_name == triton.output_type.full_name
        assert (method.client_streaming, method.server_streaming) == (False, False)
        assert (triton.client_streaming, triton.server_streaming) == (False, False)


class _RecordingChannel:
    """Stands in for a grpc channel: records the method paths a generated stub asks for."""

    def __init__(self) -> None:
        self.paths: dict[str, str] = {}

    def _record(self, kind: str) -> Any:
        def method(path: str, *args: object, **kwargs: object) -> None:
            self.paths[path] = kind

        return method

    def __getattr__(self, kind: str) -> Any:
        if kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            return self._record(kind)
        raise AttributeError(kind)


def test_v2_method_paths_equal_tritonclients() -> None:
    ours, theirs = _RecordingChannel(), _RecordingChannel()
    protos.load_v2().services.GRPCInferenceServiceStub(ours)
    triton_pb2_grpc.GRPCInferenceServiceStub(theirs)
    assert set(ours.paths) == {f"/inference.GRPCInferenceService/{rpc}" for rpc in V2_RPCS}
    assert ours.paths.items() <= theirs.paths.items()


def test_v2_messages_cross_parse_with_tritonclient() -> None:
    """Both copies of inference.* live in one process (separate pools) and read each other's bytes."""
    messages = protos.load_v2().messages
    request = messages.ModelInferRequest(model_name="m", id="7", raw_input_contents=[b"\x00" * 4])
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
    tensor.parameters["p"].int64_param = 3
    request.outputs.add(name="y").parameters["classification"].int64_param = 2
    theirs = triton_pb2.ModelInferRequest.FromString(request.SerializeToString())
    assert theirs.inputs[0].parameters["p"].int64_param == 3
    assert theirs.outputs[0].parameters["classification"].int64_param == 2
    assert messages.ModelInferRequest.FromString(theirs.SerializeToString()) == request
    assert type(request).__module__ == "service._proto.grpc_predict_v2_pb2"


# ---- TorchServe ---------------------------------------------------------------------------------


def _torchserve_reference(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    """Compile the inference.proto inside TorchServe's jar (with the google/rpc protos it ships)."""
    spec = importlib.util.find_spec("ts")
    if spec is None or spec.origin is None:
        pytest.skip("torchserve is not installed (pip install -e .[test])")
    jar = Path(spec.origin).parent / "frontend" / "model-server.jar"
    with zipfile.ZipFile(jar) as archive:
        for name in ("proto/inference.proto", "google/rpc/status.proto"):
            target = tmp_path / "src" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
    from grpc_tools import protoc

    out = tmp_path / "torchserve.pb"
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = ["protoc", f"-I{tmp_path / 'src'}", f"-I{well_known}", f"--descriptor_set_out={out}", "--include_imports"]
    assert protoc.main([*args, str(tmp_path / "src" / "proto" / "inference.proto")]) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def test_torchserve_matches_torchserve_0_12(tmp_path: Path) -> None:
    compiled = _torchserve_reference(tmp_path)
    reference = {message.name: message for f in compiled.file for message in f.message_type}
    jar_file = next(f for f in compiled.file if f.name == "proto/inference.proto")
    ours = descriptor_pb2.FileDescriptorProto.FromString(protos.load_torchserve().messages.DESCRIPTOR.serialized_pb)
    assert ours.package == jar_file.package == "org.pytorch.serve.grpc.inference"
    mine = {message.name: message for message in ours.message_type}
    for name in ("PredictionsRequest", "PredictionResponse", "TorchServeHealthResponse"):
        expected = _fields(reference[name])
        if name == "PredictionResponse":  # google.rpc.Status is not bundled: RpcStatus has its wire layout
            status = expected["status"]
            assert status[3] == ".google.rpc.Status"
            expected["status"] = (*status[:3], ".org.pytorch.serve.grpc.inference.RpcStatus", *status[4:])
        assert _fields(mine[name]) == expected, name
    assert _fields(mine["RpcStatus"]) == _fields(reference["Status"])
    assert [
        (m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming) for m in ours.service[0].method
    ] == [
        (m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
        for m in jar_file.service[0].method
    ]
    assert ours.service[0].name == jar_file.service[0].name == "InferenceAPIsService"


# ---- generation ---------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in sorted(folder.iterdir())}


def test_generation_is_idempotent_and_follows_the_sources(tmp_path: Path) -> None:
    proto_dir, out_dir = tmp_path / "proto", tmp_path / "out" / "_proto"
    shutil.copytree(protos.PROTO_DIR, proto_dir)
    protos.ensure_generated(proto_dir=proto_dir, out_dir=out_dir)
    first = _snapshot(out_dir)
    assert set(first) == {".stamp", *protos.expected_outputs(sorted(proto_dir.glob("*.proto")))}
    assert "from . import grpc_predict_v2_pb2 as" in (out_dir / "grpc_predict_v2_pb2_grpc.py").read_text()
    assert "_add_isolated_file(" in (out_dir / "grpc_predict_v2_pb2.py").read_text()

    protos.ensure_generated(proto_dir=proto_dir, out_dir=out_dir)
    assert _snapshot(out_dir) == first  # nothing rewritten

    stamp = (out_dir / ".stamp").read_text()
    with (proto_dir / "torchserve_inference.proto").open("a") as handle:
        handle.write("\n// changed\n")
    protos.ensure_generated(proto_dir=proto_dir, out_dir=out_dir)
    assert (out_dir / ".stamp").read_text() != stamp

    (out_dir / "grpc_predict_v2_pb2.py").unlink()  # a damaged output is regenerated too
    protos.ensure_generated(proto_dir=proto_dir, out_dir=out_dir)
    assert (out_dir / "grpc_predict_v2_pb2.py").is_file()


def test_generated_code_is_used_when_the_sources_are_absent(tmp_path: Path) -> None:
    out_dir = tmp_path / "_proto"
    protos.ensure_generated(out_dir=out_dir)
    before = _snapshot(out_dir)
    protos.ensure_generated(proto_dir=tmp_path / "missing", out_dir=out_dir)
    assert _snapshot(out_dir) == before


def test_missing_sources_and_output_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="proto/ folder must sit next to service/"):
        protos.ensure_generated(proto_dir=tmp_path / "missing", out_dir=tmp_path / "_proto")


def test_the_repository_output_is_current() -> None:
    protos.ensure_generated()
    sources = sorted(protos.PROTO_DIR.glob("*.proto"))
    assert protos._is_current(protos.OUT_DIR, sources, protos._digest(sources))
