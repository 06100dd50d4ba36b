"""Talks to modelgate's data port over REST with NVIDIA's Triton HTTP client, a real OIP REST peer.

Usage: triton_http.py HOST:PORT MODEL
Prints one JSON object: liveness, readiness, metadata, and the `probabilities` of a 1x3 FP32
inference sent as JSON and again as binary tensors both ways (Inference-Header-Content-Length).
"""
import json
import sys

import numpy as np
import tritonclient.http as httpclient

url, model = sys.argv[1], sys.argv[2]
client = httpclient.InferenceServerClient(url=url)
x = np.array([[2.0, 0.0, 0.0]], dtype=np.float32)
out = {}
for binary in (False, True):
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    result = client.infer(
        model,
        [inp],
        # Binary tensors both ways in the second round: the answer's outputs come back binary too.
        outputs=[
            httpclient.InferRequestedOutput("probabilities", binary_data=binary),
            httpclient.InferRequestedOutput("label", binary_data=binary),
        ],
        request_id="http-peer-%d" % binary,
        headers={"x-user-id": "user-1"},
    )
    out["binary" if binary else "json"] = result.as_numpy("probabilities").tolist()
    out["label_%d" % binary] = result.as_numpy("label").tolist()
    out["id_%d" % binary] = result.get_response()["id"]
metadata = client.get_model_metadata(model)
try:
    client.infer("nope", [inp])
    out["unknown_model"] = "no error"
except Exception as e:  # InferenceServerException
    out["unknown_model"] = str(e)
out.update(
    {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "metadata_inputs": [i["name"] for i in metadata["inputs"]],
    }
)
print(json.dumps(out))
