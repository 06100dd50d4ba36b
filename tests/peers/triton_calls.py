"""Triton's model-level calls through modelgate with NVIDIA's Triton gRPC client, naming the
model only in the request messages (no x-model-name header), as Triton users do.

Usage: triton_calls.py HOST:PORT MODEL
Prints one JSON object: the calls that failed (name -> message), the ids and values of three
streamed inferences, and the status of an inference naming a version that does not exist.
"""
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url, model = sys.argv[1], sys.argv[2]
client = grpcclient.InferenceServerClient(url=url)
errors = {}


def attempt(name, fn):
    try:
        return fn()
    except InferenceServerException as e:
        errors[name] = f"{e.status()} {e.message()}"


def inputs(value):
    x = np.array([[value, 1.0]], dtype=np.float32)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


# Every call has a deadline, so that a call modelgate mishandles fails instead of hanging.
T = 10
attempt("get_model_config", lambda: client.get_model_config(model, client_timeout=T))
attempt(
    "get_inference_statistics",
    lambda: client.get_inference_statistics(model, client_timeout=T),
)
attempt(
    "get_model_repository_index",
    lambda: client.get_model_repository_index(client_timeout=T),
)
attempt(
    "infer_version_2",
    lambda: client.infer(model, inputs(0.5), model_version="2", client_timeout=T),
)

answers = queue.Queue()
client.start_stream(
    callback=lambda result, error: answers.put((result, error)), stream_timeout=T
)
for i in range(3):
    client.async_stream_infer(model, inputs(float(i)), request_id=f"s{i}")
stream_ids, stream_values = [], []
for _ in range(3):
    try:
        result, error = answers.get(timeout=T)
    except queue.Empty:
        errors["stream"] = "no answer within 10 s"
        break
    if error is not None:
        errors["stream"] = str(error)
        continue
    stream_ids.append(result.get_response().id)
    stream_values.append(float(result.as_numpy("value").flatten()[0]))
client.stop_stream()

missing = "OK"
try:
    client.infer(model, inputs(0.0), model_version="9", client_timeout=T)
except InferenceServerException as e:
    missing = e.status()

print(
    json.dumps(
        {
            "errors": errors,
            "stream_ids": stream_ids,
            "stream_values": stream_values,
            "missing_version": missing,
        }
    )
)
