"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

Entry points: `deltaserve.server.app.run_server(args)` with options from `deltaserve.server.args.add_serve_args`,
`build_app(engine, config)` for an ASGI app around an existing AsyncLLM, and `python -m deltaserve.server`.
"""
