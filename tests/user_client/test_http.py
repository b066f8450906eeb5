"""`Http.url`: the forward URL built once per session equals the one httpx builds from `params=`."""

import httpx
import pytest

from user_client._http import URLS_KEPT, Http

PATH = "/v1/deployments/dep-1%2F2/forward"
PARAMS: dict[str, str | int] = {"output": "topk", "k": 1, "session_id": "s-a b&c"}


@pytest.mark.parametrize("base", ["http://127.0.0.1:8002", "https://p2.example/prefix/", "http://[::1]:9/a/b"])
def test_the_url_equals_httpx_own_merge_of_base_path_and_params(base: str) -> None:
    client = httpx.Client(base_url=base)
    http = Http(client, party="P2", retries=0, backoff=0.0)
    built = http.url(PATH, PARAMS)
    assert built == client.build_request("POST", PATH, params=PARAMS).url
    assert http.url(PATH, dict(PARAMS)) is built  # the next step reuses it


def test_the_url_cache_is_bounded() -> None:
    http = Http(httpx.Client(base_url="http://127.0.0.1:8002"), party="P2", retries=0, backoff=0.0)
    first = http.url(PATH, {"session_id": "s-0"})
    for n in range(1, URLS_KEPT + 1):
        http.url(PATH, {"session_id": f"s-{n}"})
    assert len(http._urls) == URLS_KEPT
    assert http.url(PATH, {"session_id": "s-0"}) is not first  # the oldest was dropped, and is rebuilt equal
    assert http.url(PATH, {"session_id": "s-0"}) == first
