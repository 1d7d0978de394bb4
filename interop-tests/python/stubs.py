"""Python message and service code for proto/, generated at import time with grpcio-tools into
a temporary directory (nothing generated is committed), then importable as usual:

    import stubs  # noqa: F401  (must come first)
    from grpc_testing import messages_pb2, test_pb2_grpc
"""

import atexit
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[2] / "proto"
FILES = ["grpc/testing/empty.proto", "grpc/testing/messages.proto", "grpc/testing/test.proto"]


def _generate() -> pathlib.Path:
    out = pathlib.Path(tempfile.mkdtemp(prefix="pnp-py-stubs-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    well_known = pathlib.Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *[str(PROTO_ROOT / f) for f in FILES],
        ]
    )
    if status != 0:
        raise RuntimeError(f"grpc_tools.protoc failed with status {status}")
    # `grpc` is the installed grpcio package, so the generated `grpc.testing` modules cannot
    # live under it: they become the top-level package `grpc_testing`.
    shutil.move(str(out / "grpc" / "testing"), str(out / "grpc_testing"))
    for path in (out / "grpc_testing").glob("*.py"):
        text = path.read_text()
        text = text.replace("from grpc.testing import", "from grpc_testing import")
        path.write_text(text)
    (out / "grpc_testing" / "__init__.py").touch()
    return out


sys.path.insert(0, str(_generate()))
