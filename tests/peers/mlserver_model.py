"""Writes an MLServer model repository: a scikit-learn logistic regression named `iris`, trained
on scikit-learn's bundled iris data, and settings on the given loopback ports.

Usage: mlserver_model.py DIR HTTP_PORT GRPC_PORT METRICS_PORT
"""

import json
import os
import sys

import joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

root, http_port, grpc_port, metrics_port = sys.argv[1], *map(int, sys.argv[2:5])
x, y = load_iris(return_X_y=True)
model = LogisticRegression(max_iter=500).fit(x, y)
os.makedirs(os.path.join(root, "iris"), exist_ok=True)
joblib.dump(model, os.path.join(root, "iris", "model.joblib"))
with open(os.path.join(root, "iris", "model-settings.json"), "w") as f:
    json.dump(
        {
            "name": "iris",
            "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": "./model.joblib", "version": "v1"},
        },
        f,
    )
with open(os.path.join(root, "settings.json"), "w") as f:
    json.dump(
        {
            "host": "127.0.0.1",
            "http_port": http_port,
            "grpc_port": grpc_port,
            "metrics_port": metrics_port,
            "parallel_workers": 0,
            "load_models_at_startup": True,
        },
        f,
    )
print(root)
