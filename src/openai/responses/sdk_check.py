"""Checks the Responses answers written by the `sdk_samples` test against the official
`openai` Python SDK: every whole answer must validate as `openai.types.responses.Response`,
every stream event as the `ResponseStreamEvent` union (strict pydantic validation, not the
SDK's lenient construct), and each stream must replay through the SDK's own
`client.responses.stream()` accumulator (served from an in-process httpx transport).

    RESPONSES_SDK_DIR=/tmp/x cargo test --lib responses::tests::sdk_samples -- --ignored
    python3 src/openai/responses/sdk_check.py /tmp/x
"""

import json
import pathlib
import sys

import openai

try:  # newer SDKs ship on httpx2
    import httpx2 as httpx
except ImportError:
    import httpx
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

EVENTS = TypeAdapter(ResponseStreamEvent)


def sse_events(raw: str):
    for block in raw.split("\n\n"):
        if not block:
            continue
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name, block
        yield data


def client_for(body: bytes, content_type: str) -> openai.OpenAI:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path.endswith("/responses"), request.url
        return httpx.Response(200, content=body, headers={"content-type": content_type})

    return openai.OpenAI(
        api_key="x",
        base_url="http://test/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )


def main(d: pathlib.Path) -> None:
    print("openai", openai.__version__)
    for f in sorted(d.glob("whole_*.json")):
        raw = f.read_bytes()
        r = Response.model_validate_json(raw)
        sdk = client_for(raw, "application/json").responses.create(model="m", input="x")
        assert sdk.id == r.id and sdk.output_text == r.output_text
        print(f"{f.name}: Response ok, status={r.status}, output_text={r.output_text!r}, "
              f"items={[i.type for i in r.output]}")
    for f in sorted(d.glob("stream_*.sse")):
        raw = f.read_text()
        events = [EVENTS.validate_python(e) for e in sse_events(raw)]
        seqs = [e.sequence_number for e in events]
        assert seqs == list(range(len(events))), seqs
        last = events[-1]
        Response.model_validate(last.response.model_dump())
        # Replay through the SDK's streaming helper, which checks indices and item identity.
        client = client_for(raw.encode(), "text/event-stream")
        with client.responses.stream(model="m", input="x") as stream:
            seen = [e.type for e in stream]
            if last.type == "response.completed":
                final = stream.get_final_response()
                assert final.output_text == last.response.output_text
                summary = f"final output_text={final.output_text!r}"
            else:
                summary = f"ended {last.type}"
        print(f"{f.name}: {len(events)} events ok ({summary}); "
              f"items={[i.type for i in last.response.output]}")
    print("all ok")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
