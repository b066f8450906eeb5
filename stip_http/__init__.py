"""The HTTP code both services (and the clients' TLS) share, beside the pure protocol core `shared/`.

- `stip_http.edge`: body-size bounds, bounded metrics labels, the uvicorn launch, the last-resort 500;
- `stip_http.settings`: settings helpers (secrets read from `*_FILE` variables);
- `stip_http.tls`: client-side TLS trust and its failures.

Nothing is imported here, so `import stip_http.tls` stays cheap for the SDK.
"""
