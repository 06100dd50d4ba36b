"""Talks to modelgate's data port with NVIDIA's Triton gRPC client, a real OIP peer.

Usage: triton_client.py HOST:PORT MODEL
Prints one JSON object: liveness, readiness, metadata and the `value` output of a 2x2 FP32
inference sent the way tritonclient sends it (raw_input_contents).
"""
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient

url, model = sys.argv[1], sys.argv[2]
client = grpcclient.InferenceServerClient(url=url)
x = np.array([[1.0, 2.0], [0.5, -1.0]], dtype=np.float32)
inp = grpcclient.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
result = client.infer(
    model,
    [inp],
    outputs=[grpcclient.InferRequestedOutput("value")],
    request_id="triton-peer-1",
)
metadata = client.get_model_metadata(model, as_json=True)
print(
    json.dumps(
        {
            "live": client.is_server_live(),
            "ready": client.is_server_ready(),
            "model_ready": client.is_model_ready(model),
            "metadata_inputs": [i["name"] for i in metadata["inputs"]],
            "value": result.as_numpy("value").tolist(),
            "id": result.get_response().id,
        }
    )
)
