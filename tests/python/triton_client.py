"""Drives airgate's KServe v2 endpoint with NVIDIA's `tritonclient[http]`
over mutual TLS and prints what it saw as one JSON line.

Usage: triton_client.py HOST:PORT CA CERT KEY MODEL
"""
import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

url, ca, cert, key, model = sys.argv[1:6]
client = httpclient.InferenceServerClient(
    url=url,
    ssl=True,
    ssl_options={"keyfile": key, "certfile": cert, "ca_certs": ca},
)
seen = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model),
}
meta = client.get_model_metadata(model)
seen["inputs"] = [i["name"] for i in meta["inputs"]]
output = next(o["name"] for o in meta["outputs"] if o["shape"] == [-1, 384])
seen["output"] = output

ids = np.array([[101, 7592, 2088, 102]], dtype=np.int64)
mask = np.ones_like(ids)


def inputs(id_type="INT64", ids=ids):
    a = httpclient.InferInput("input_ids", list(ids.shape), id_type)
    a.set_data_from_numpy(ids, binary_data=True)
    b = httpclient.InferInput("attention_mask", list(mask.shape), "INT64")
    b.set_data_from_numpy(mask, binary_data=False)
    return [a, b]


result = client.infer(model, inputs(), outputs=[httpclient.InferRequestedOutput(output, binary_data=True)],
                      request_id="triton-7")
embedding = result.as_numpy(output)
seen["shape"] = list(embedding.shape)
seen["embedding"] = embedding[0].tolist()
seen["id"] = result.get_response()["id"]
result = client.infer(model, inputs(), outputs=[httpclient.InferRequestedOutput(output, binary_data=False)])
seen["json_embedding"] = result.as_numpy(output)[0].tolist()
try:
    client.infer(model, inputs("INT32", ids.astype(np.int32)))
    seen["error"] = None
except InferenceServerException as e:
    seen["error"] = e.message()
print(json.dumps(seen))
