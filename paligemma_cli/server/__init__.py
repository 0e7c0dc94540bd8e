"""`paligemma serve`'s HTTP side: an OpenAI-compatible API (Starlette + uvicorn) over the batching engine.

`app.create_app` builds the ASGI app from a loaded `BatchEngine` and/or SigLIP dual encoder; the other
modules parse and check what a request may ask (`config.ServerConfig` holds the limits), turn chat
messages into a PaliGemma prompt (`prompts`), read images (`images`) and shape OpenAI's JSON (`chat`,
`embeddings`, `errors`). Nothing here imports torch models directly or runs code from a request.
"""
