"""The floor of one more Python HTTP hop: a bare streaming relay in front of an engine.

No framework, no authentication, no routing, no rewriting: uvicorn (httptools) hands each
`POST /v1/chat/completions` body to the gateway's own keep-alive engine pool
(`fedpersona.service.engine.stream_http.StreamPool`) and writes back whatever the engine sends,
as it arrives. `serve_overhead.py --floor` puts it beside the gateway, so the gateway's added
time to first token splits into what any Python hop on this machine costs (this relay) and
what the gateway's own work costs (the rest). Not a product component: it checks nothing.

    python benchmarks/bare_relay.py --engine-url http://127.0.0.1:8000 --port 8100
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn
from fedpersona.service.engine.stream_http import StreamPool

Scope = dict[str, Any]


def relay_app(engine_url: str, engine_key: str | None) -> Any:
    headers = {"Authorization": f"Bearer {engine_key}"} if engine_key else {}
    pool = StreamPool(
        engine_url,
        headers=headers,
        connect_timeout_s=10,
        read_timeout_s=300,
        max_idle=64,
        keepalive_expiry_s=4,
    )

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            pool.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        conn = await pool.open(b"".join(parts))
        headers = [(k.lower(), v) for k, v in conn.headers if k.lower() == b"content-type"]
        await send({"type": "http.response.start", "status": conn.status, "headers": headers})
        while chunk := await conn.read(pool.read_timeout_s):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        pool.release(conn)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-url", required=True)
    parser.add_argument("--engine-key")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        relay_app(args.engine_url, args.engine_key),
        host="127.0.0.1",
        port=args.port,
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
