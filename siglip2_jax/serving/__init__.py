"""`siglip2-jax serve`: an OpenAI-compatible HTTP server for embeddings, zero-shot classification and ranking.

    server.py   the process: uvicorn, and the drain on SIGTERM (the flags: `siglip2_jax.commands.serve`)
    app.py      the FastAPI app: routes, API key, body limit, errors in OpenAI's shape, metrics
    inputs.py   request parsing: texts, image content parts, data URLs, guarded URL fetches
    batcher.py  dynamic batching: concurrent requests merged into the engine's compiled buckets
"""
