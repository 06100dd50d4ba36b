"""Sends a ModelInfer with a wrong shape through modelgate with NVIDIA's Triton gRPC client.

Usage: triton_error.py HOST:PORT MODEL
Prints one JSON object: the status and message of the error the client raised.
"""
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url, model = sys.argv[1], sys.argv[2]
client = grpcclient.InferenceServerClient(url=url)
x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
inp = grpcclient.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
try:
    client.infer(model, [inp])
except InferenceServerException as e:
    print(json.dumps({"status": e.status(), "message": e.message()}))
else:
    print(json.dumps({"status": "OK", "message": ""}))
