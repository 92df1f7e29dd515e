"""Call the example's Greeter through Bilayer (or any address): SayHello, then SayHelloStream.

python examples/grpc/client.py 127.0.0.1:8090
"""

from __future__ import annotations

import argparse

import grpc
from server import decode_string, encode_string  # the hand-written helloworld messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="127.0.0.1:8090")
    parser.add_argument("--name", default="bilayer")
    args = parser.parse_args()
    with grpc.insecure_channel(args.address) as channel:
        say_hello = channel.unary_unary(
            "/helloworld.Greeter/SayHello",
            request_serializer=encode_string,
            response_deserializer=decode_string,
        )
        print(say_hello(args.name, timeout=5))
        stream = channel.unary_stream(
            "/helloworld.Greeter/SayHelloStream",
            request_serializer=encode_string,
            response_deserializer=decode_string,
        )
        for reply in stream(args.name, timeout=5):
            print(reply)


if __name__ == "__main__":
    main()
