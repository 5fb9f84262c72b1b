"""Tools and structured outputs through the official `openai` package, as an
agent would use them.

Usage: python tools_client.py BASE_URL MODEL. Prints one JSON line of results.
"""
import json
import sys
from typing import List

import openai
from pydantic import BaseModel

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)

tools = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string"},
                                      "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_time",
        "description": "Current local time in a timezone",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                       "required": ["timezone"]}}},
]
ask = [{"role": "user", "content": "What's the weather in Berlin in celsius?"}]
out = {}

# auto, whole answer
r = client.chat.completions.create(model=model, messages=ask, tools=tools, temperature=0, max_tokens=120)
m = r.choices[0].message
out["auto"] = {
    "finish": r.choices[0].finish_reason,
    "content": m.content,
    "calls": [{"id": c.id, "type": c.type, "name": c.function.name,
               "arguments": json.loads(c.function.arguments)} for c in (m.tool_calls or [])],
}

# auto, streamed: the deltas reassemble to the same call
calls, finish, content = {}, None, []
for chunk in client.chat.completions.create(model=model, messages=ask, tools=tools, temperature=0,
                                            max_tokens=120, stream=True):
    for ch in chunk.choices:
        if ch.delta.content:
            content.append(ch.delta.content)
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
    "content": "".join(content),
    "calls": [{"id": c["id"], "name": c["name"], "arguments": json.loads(c["arguments"])}
              for _, c in sorted(calls.items())],
}

# named and required choices, on a question that does not call for the tool
named = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Tell me a joke."}], tools=tools, temperature=0,
    tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=120)
out["named"] = {"finish": named.choices[0].finish_reason,
                "name": named.choices[0].message.tool_calls[0].function.name,
                "arguments": json.loads(named.choices[0].message.tool_calls[0].function.arguments)}
required = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "What time is it in Tokyo?"}], tools=tools,
    temperature=0, tool_choice="required", parallel_tool_calls=False, max_tokens=120)
out["required"] = {"finish": required.choices[0].finish_reason,
                   "names": [c.function.name for c in required.choices[0].message.tool_calls]}

# the loop: call -> tool result -> answer
call = required.choices[0].message.tool_calls[0]
history = [
    {"role": "user", "content": "What time is it in Tokyo?"},
    required.choices[0].message.model_dump(exclude_none=True),
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"time": "14:05"})},
]
final = client.chat.completions.create(model=model, messages=history, tools=tools, temperature=0, max_tokens=60)
out["loop"] = {"finish": final.choices[0].finish_reason, "content": final.choices[0].message.content}


class Person(BaseModel):
    name: str
    age: int
    languages: List[str]


parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
parsed = parse(model=model, temperature=0, max_tokens=120, response_format=Person, messages=[
    {"role": "user", "content": "Marie Curie (born 1867) spoke Polish and French. Describe her."}])
p = parsed.choices[0].message.parsed
out["parse"] = p.model_dump() if p else None

js = client.chat.completions.create(
    model=model, temperature=0, max_tokens=80, response_format={"type": "json_object"},
    messages=[{"role": "user", "content": "Give three primary colours as JSON."}])
out["json_object"] = json.loads(js.choices[0].message.content)

# vLLM's constraint fields, as its users send them.
yes_no = client.chat.completions.create(
    model=model, temperature=0, max_tokens=8, extra_body={"guided_choice": ["yes", "no"]},
    messages=[{"role": "user", "content": "Is Berlin in Germany?"}])
out["guided_choice"] = yes_no.choices[0].message.content
city = client.chat.completions.create(
    model=model, temperature=0, max_tokens=60,
    extra_body={"guided_json": {"type": "object", "properties": {"city": {"type": "string"},
        "country": {"type": "string"}}, "required": ["city", "country"], "additionalProperties": False}},
    messages=[{"role": "user", "content": "Where is the Brandenburg Gate?"}])
out["guided_json"] = json.loads(city.choices[0].message.content)
# llama.cpp's GBNF grammar, as its server's users send it.
date = client.chat.completions.create(
    model=model, temperature=0, max_tokens=16,
    extra_body={"grammar": 'root ::= year "-" [01] [0-9] "-" [0-3] [0-9]\nyear ::= [12] [0-9]{3}'},
    messages=[{"role": "user", "content": "When did the Berlin Wall fall?"}])
out["grammar"] = date.choices[0].message.content

try:
    client.chat.completions.create(
        model=model, messages=ask, max_tokens=5,
        response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}}})
    out["unsupported"] = None
except openai.BadRequestError as e:
    out["unsupported"] = {"status": e.status_code, "param": e.param, "message": e.message}

print(json.dumps(out))
