"""A tiny gRPC backend for the example: helloworld.Greeter with SayHello (unary) and
SayHelloStream (server streaming), served with grpcio's generic handlers, so no protoc step.

The messages are helloworld's HelloRequest/HelloReply ({string name = 1} and
{string message = 1}), encoded by hand: one length-delimited field. Each reply names the
backend that wrote it, to show where Bilayer routed the call.

    python examples/grpc/server.py --name a --port 50051
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from concurrent import futures

import grpc


def encode_string(value: str) -> bytes:
    """A protobuf message whose field 1 is the string value."""
    data = value.encode()
    length = len(data)
    varint = bytearray()
    while True:
        byte = length & 0x7F
        length >>= 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    return b"\x0a" + bytes(varint) + data


def decode_string(message: bytes) -> str:
    """Field 1 of a protobuf message, as a string ("" when absent)."""
    if not message or message[0] != 0x0A:
        return ""
    length, shift, i = 0, 0, 1
    while True:
        byte = message[i]
        length |= (byte & 0x7F) << shift
        shift += 7
        i += 1
        if not byte & 0x80:
            break
    return message[i : i + length].decode()


def serve(name: str, port: int) -> grpc.Server:
    """Start the Greeter on 127.0.0.1:port."""

    def say_hello(request: str, context: grpc.ServicerContext) -> str:
        return f"hello {request or 'world'}, from backend {name}"

    def say_hello_stream(request: str, context: grpc.ServicerContext) -> Iterator[str]:
        for count in range(1, 4):
            yield f"hello {request or 'world'} #{count}, from backend {name}"

    handlers = {
        "SayHello": grpc.unary_unary_rpc_method_handler(
            say_hello, request_deserializer=decode_string, response_serializer=encode_string
        ),
        "SayHelloStream": grpc.unary_stream_rpc_method_handler(
            say_hello_stream, request_deserializer=decode_string, response_serializer=encode_string
        ),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("helloworld.Greeter", handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="a", help="shown in every reply")
    parser.add_argument("--port", type=int, default=50051)
    args = parser.parse_args()
    server = serve(args.name, args.port)
    print(f"helloworld.Greeter (backend {args.name}) on 127.0.0.1:{args.port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
