"""The official `openai` Python package's embeddings call against airgate
over mutual TLS.

usage: openai_embeddings.py BASE_URL CA CERT KEY MODEL
Prints one JSON line with what it saw; the end-to-end test checks it.
"""

import json
import ssl
import sys

import openai


def main() -> None:
    base_url, ca, cert, key, model = sys.argv[1:6]
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    client = openai.OpenAI(
        base_url=base_url,
        api_key="unused: the client certificate is the identity",
        http_client=openai.DefaultHttpxClient(verify=ctx),
        max_retries=0,
    )
    texts = ["The cat sat on the mat.", "Quarterly claims rose by four percent."]
    # The client asks for base64 by default and decodes it itself.
    default = client.embeddings.create(model=model, input=texts, user="py-user")
    floats = client.embeddings.create(model=model, input=texts[0], encoding_format="float", user="py-user")
    print(json.dumps({
        "count": len(default.data),
        "indexes": [d.index for d in default.data],
        "first": default.data[0].embedding,
        "first_float": floats.data[0].embedding,
        "second": default.data[1].embedding,
        "usage": default.usage.prompt_tokens,
        "model": default.model,
    }))


if __name__ == "__main__":
    main()
