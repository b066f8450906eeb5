"""`stip gateway`: the user side (P3) as an OpenAI-compatible server on the user's machine.

    app.py       create_app(settings): FastAPI app, lifespan, OpenAI-shaped errors
    api.py       the routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings
    service.py   OpenAI parameters -> StipClient calls (testable without HTTP)
    schemas.py   the OpenAI request and response shapes
    settings.py  STIP_GATEWAY_* settings and the models file
    cli.py       the `stip gateway` command

Any OpenAI client (the `openai` package, LangChain, curl) gets private inference: prompts are
tokenised, templated, sampled and detokenised here; P2 receives only x·π.
"""
