"""Drives a Tandem server with the official `openai` package, as an app would.

Usage: python openai_client.py BASE_URL MODEL. Prints one JSON line of results.
"""
import json
import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]

whole = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=30)

parts, usage, finish = [], None, None
stream = client.chat.completions.create(
    model=model, messages=question, temperature=0, max_tokens=30,
    stream=True, stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            parts.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason

completion = client.completions.create(model=model, prompt="The sky is", max_tokens=5, temperature=0)
models = [m.id for m in client.models.list()]

error = None
try:
    client.chat.completions.create(model="no-such-model", messages=question)
except openai.NotFoundError as e:
    error = {"status": e.status_code, "message": e.message}

print(json.dumps({
    "text": whole.choices[0].message.content,
    "finish": whole.choices[0].finish_reason,
    "usage": whole.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}),
    "streamed": "".join(parts),
    "stream_finish": finish,
    "stream_usage": usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
    if usage else None,
    "completion": completion.choices[0].text,
    "models": models,
    "error": error,
}))
