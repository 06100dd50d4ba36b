#!/usr/bin/env python3
"""Writes the benchmark's request: OIP ModelInfer for model "bench", one FP32 input "input" of
shape [1, 16] (0.0, 0.1, … 1.5).

    bench_request.py request.grpc [request.json]

request.grpc: ModelInferRequest{model_name, inputs [{name, datatype, shape, fp32_contents}]}
framed as one gRPC message (h2load's body). request.json: the same tensor as a REST body
(POST /v2/models/bench/infer).
"""
import json
import struct
import sys


def varint(n):
    out = b''
    while True:
        b, n = n & 0x7f, n >> 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, payload):
    return varint(num << 3 | 2) + varint(len(payload)) + payload


values = [i / 10 for i in range(16)]
fp32 = b''.join(struct.pack('<f', v) for v in values)
tensor = (field(1, b'input') + field(2, b'FP32') + field(3, varint(1) + varint(16))
          + field(5, field(6, fp32)))
msg = field(1, b'bench') + field(5, tensor)
with open(sys.argv[1], 'wb') as f:
    f.write(b'\x00' + struct.pack('>I', len(msg)) + msg)
if len(sys.argv) > 2:
    with open(sys.argv[2], 'w') as f:
        json.dump({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16],
                               "data": values}]}, f)
