#!/usr/bin/env python3
"""Drives a running apiserver with the official `openai` SDK (pip install openai) through the
modern OpenAI surface: a forced tool call and its follow-up turn, json_schema output,
/v1/responses whole and streamed, logprobs with n=2. Prints what came back; exits non-zero
on the first SDK error or wrong shape.

    scripts/openai-sdk-check.py [BASE_URL] [API_KEY] [MODEL]
    (defaults: http://127.0.0.1:8100/v1, $OPENAI_API_KEY or "none", smollm2)
"""
import json
import os
import sys

from openai import OpenAI

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8100/v1"
key = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("OPENAI_API_KEY", "none")
model = sys.argv[3] if len(sys.argv) > 3 else "smollm2"
client = OpenAI(base_url=base, api_key=key)
tools = [{"type": "function", "function": {"name": "get_weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}}]
r = client.chat.completions.create(model=model, tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "Weather in Paris?"}])
call = r.choices[0].message.tool_calls[0]
print("finish:", r.choices[0].finish_reason)
args = json.loads(call.function.arguments)
print(call.function.name, args)
assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
assert isinstance(args.get("city"), str)
r2 = client.chat.completions.create(model=model, tools=tools, messages=[
        {"role": "user", "content": "Weather in Paris?"}, r.choices[0].message,
        {"role": "tool", "tool_call_id": call.id, "content": "18C, sunny"}])
print("follow-up:", r2.choices[0].finish_reason, repr(r2.choices[0].message.content)[:100], r2.choices[0].message.tool_calls)
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A person, as JSON"}],
  response_format={"type": "json_schema", "json_schema": {"name": "person", "strict": True,
    "schema": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}}})
print("json_schema:", r.choices[0].message.content)
person = json.loads(r.choices[0].message.content)
assert isinstance(person["name"], str) and isinstance(person["age"], int)
r = client.responses.create(model=model, instructions="Be brief.", input="Name a color.")
print("responses:", repr(r.output_text), r.usage.input_tokens)
with client.responses.stream(model=model, input="Count to three.") as s:
    out = []
    for e in s:
        if e.type == "response.output_text.delta": out.append(e.delta)
    print("stream:", repr("".join(out)), s.get_final_response().status)
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], logprobs=True, top_logprobs=2, max_tokens=3, n=2)
print("logprobs:", [(c.index, [t.token for t in c.logprobs.content]) for c in r.choices])
assert len(r.choices) == 2 and all(c.logprobs.content for c in r.choices)
print("sdk check: ok")
