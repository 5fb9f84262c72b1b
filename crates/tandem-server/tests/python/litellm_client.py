"""`litellm` (the SDK, not its proxy) against Tandem as an OpenAI-compatible
provider: tool calls whole and streamed, a call -> result -> answer loop,
and structured output from a Pydantic model.

Usage: python litellm_client.py BASE_URL MODEL. Prints one JSON line of results.
"""
import json
import os
import sys
from typing import List

# No network here: litellm reads its bundled price map instead of fetching it.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from pydantic import BaseModel  # noqa: E402

base_url, model = sys.argv[1], sys.argv[2]
common = dict(model=f"openai/{model}", api_base=base_url, api_key="unused", temperature=0,
              max_tokens=150, num_retries=0)

tools = [{"type": "function", "function": {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
ask = [{"role": "user", "content": "What's the weather in Lisbon?"}]
out = {}

r = litellm.completion(messages=ask, tools=tools, tool_choice="required", **common)
m = r.choices[0].message
out["whole"] = {
    "finish": r.choices[0].finish_reason,
    "calls": [{"id": c.id, "name": c.function.name, "arguments": json.loads(c.function.arguments)}
              for c in (m.tool_calls or [])],
}

calls, finish = {}, None
for chunk in litellm.completion(messages=ask, tools=tools, tool_choice="required", stream=True,
                                **common):
    for ch in chunk.choices:
        for tc in ch.delta.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                c["id"] = tc.id
            if tc.function and tc.function.name:
                c["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                c["arguments"] += tc.function.arguments
        if ch.finish_reason:
            finish = ch.finish_reason
out["stream"] = {
    "finish": finish,
    "calls": [{"id": c["id"], "name": c["name"], "arguments": json.loads(c["arguments"] or "null")}
              for _, c in sorted(calls.items())],
}

# The agent loop: run the call, send its result, get the answer.
call = m.tool_calls[0]
call_city = json.loads(call.function.arguments).get("city", "Lisbon")
history = ask + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"city": call_city, "sky": "sunny", "celsius": 23})},
]
# `none` once the result is in, as agents do for the final answer.
r = litellm.completion(messages=history, tools=tools, tool_choice="none", **common)
out["loop"] = {"finish": r.choices[0].finish_reason, "content": r.choices[0].message.content}


class Person(BaseModel):
    name: str
    age: int
    languages: List[str]


r = litellm.completion(
    messages=[{"role": "user", "content": "Marie Curie, 66, spoke Polish and French. As JSON."}],
    response_format=Person, **common)
try:
    out["structured"] = Person.model_validate_json(r.choices[0].message.content).model_dump()
except Exception as e:  # reported, so the test names what went wrong
    out["structured"] = {"error": str(e), "content": r.choices[0].message.content}

print(json.dumps(out))
