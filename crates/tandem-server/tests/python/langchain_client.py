"""`langchain-openai` against Tandem: `bind_tools` and `with_structured_output`
in all three of its methods.

Usage: python langchain_client.py BASE_URL MODEL. Prints one JSON line of results.
"""
import json
import sys
from typing import List

from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

base_url, model = sys.argv[1], sys.argv[2]
llm = ChatOpenAI(base_url=base_url, api_key="unused", model=model, temperature=0, max_tokens=150,
                 max_retries=0)


class GetWeather(BaseModel):
    """Current weather in a city."""
    city: str = Field(description="The city")


class Person(BaseModel):
    """A person."""
    name: str
    age: int
    languages: List[str]


out = {}
msg = llm.bind_tools([GetWeather]).invoke("What's the weather in Madrid?")
out["bind_tools"] = [{"name": c["name"], "args": c["args"]} for c in msg.tool_calls]

question = "Marie Curie (born 1867, died 1934 aged 66) spoke Polish and French. Describe her."
for method in ["function_calling", "json_schema", "json_mode"]:
    prompt = question
    if method == "json_mode":
        prompt += ' Answer as JSON with keys "name", "age" and "languages".'
    try:
        p = llm.with_structured_output(Person, method=method).invoke(prompt)
        out[method] = p.model_dump()
    except Exception as e:  # reported, so the test shows which method failed and why
        out[method] = {"error": f"{type(e).__name__}: {e}"}

print(json.dumps(out))
