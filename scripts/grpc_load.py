#!/usr/bin/env python3
"""ModelInfer calls with a distinct caller per call, for scripts/callgrind.sh (USERS=N).

h2load sends one fixed request, so every call it makes has the same headers: no x-user-id, hence
no experiment unit and no feature-store entity. This sends the same message with `x-user-id`
drawn from N users (seeded), over 4 connections with 32 calls in flight, and prints
"requests: <n> succeeded" as the script expects. Needs grpcio (pip install grpcio).

    grpc_load.py HOST:PORT CALLS USERS REQUEST_FILE   (REQUEST_FILE: one framed gRPC message)
"""
import asyncio
import random
import sys

import grpc

METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def main(addr, calls, users, request_file):
    message = open(request_file, "rb").read()[5:]  # the gRPC frame's 5-byte prefix off
    channels = [grpc.aio.insecure_channel(addr) for _ in range(4)]
    stubs = [c.unary_unary(METHOD) for c in channels]
    rng = random.Random(18)
    left, ok = [calls], [0]

    async def caller(i):
        while left[0] > 0:
            left[0] -= 1
            user = "user-%d" % rng.randrange(users)
            await stubs[i % len(stubs)](message, metadata=(("x-user-id", user),))
            ok[0] += 1

    await asyncio.gather(*(caller(i) for i in range(32)))
    for c in channels:
        await c.close()
    print("requests: %d succeeded" % ok[0])


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
