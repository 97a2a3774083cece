"""Drives airgate with the official `openai` Python package over mutual TLS.

usage: openai_client.py BASE_URL CA CERT KEY MODEL
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
    messages = [{"role": "user", "content": "Name three colours."}]
    plain = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, seed=7, user="py-user"
    )
    chunks = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=12,
        temperature=0,
        seed=7,
        user="py-user",
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed, usage = [], None
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            streamed.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    models = [m.id for m in client.models.list()]
    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
        missing = None
    except openai.NotFoundError as e:
        missing = e.status_code
    print(
        json.dumps(
            {
                "text": plain.choices[0].message.content,
                "finish_reason": plain.choices[0].finish_reason,
                "usage": plain.usage.model_dump(),
                "streamed": "".join(streamed),
                "stream_usage": usage.model_dump() if usage else None,
                "models": models,
                "missing_status": missing,
                "id": plain.id,
            }
        )
    )


if __name__ == "__main__":
    main()
