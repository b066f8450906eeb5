"""The weight push, P1 -> P2: θ′ streamed as one safetensors body with its SHA-256.

`PUT {cloud_url}/v1/deployments/{id}/weights`, `Authorization: Bearer <push token>`,
`X-Stip-Sha256: <hex>`. The digest is computed by a first pass over the concatenated shards
and the body streamed by a second, so the model is never held in memory. P2 activates the
new version only when the body is complete and the digest matches (PROTOCOL.md section 4).
"""

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import ValidationError

from developer_service.errors import JobCancelled, PushFailed
from shared.api import DIGEST_HEADER, KEY_VERSION_HEADER, DeploymentInfo, LoadProgress, PushResult, Revocations
from shared.wire import CONTENT_TYPE, concat_files
from stip_http.tls import certificate_refused

log = logging.getLogger("stip.developer.push")

ByteProgress = Callable[[int, int], None]
RETRY_STATUSES = frozenset({500, 502, 503, 504})
LOAD_POLL_S = 0.25  # how often P1 asks P2 how far the load of a pushed θ′ is
LOAD_POLL_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class PushRequest:
    cloud_url: str
    deployment_id: str
    key_version: int
    files: list[Path]  # the cloud shards of one version
    metadata: dict[str, str]  # safetensors __metadata__ of the body (shared.api PUSH_*)

    @property
    def url(self) -> str:
        return f"{self.cloud_url}/v1/deployments/{self.deployment_id}/weights"


def body_digest(files: list[Path], metadata: dict[str, str], cancelled: threading.Event) -> tuple[int, str]:
    """(size, hex SHA-256) of the concatenated body, read once from disk."""
    total, chunks = concat_files(files, metadata)
    h = hashlib.sha256()
    for chunk in chunks:
        if cancelled.is_set():
            raise JobCancelled("P1 is shutting down")
        h.update(chunk)
    return total, h.hexdigest()


def _error_detail(response: httpx.Response) -> str:
    """P2's error as `code: message`, from its JSON error shape when it has one."""
    try:
        error = response.json()["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase


def _refusal(response: httpx.Response) -> str:
    """P2's error, with the fix when it refused P1's push token."""
    detail = _error_detail(response)
    if response.status_code == 401:
        detail += (
            "; P1's push token (STIP_DEVELOPER_PUSH_TOKEN) must equal P2's (STIP_CLOUD_PUSH_TOKEN): "
            "set both to the same value and restart the service whose token changed"
        )
    return detail


class Pusher:
    """Pushes θ′ to P2 with retries on network errors and 5xx, never on 4xx or an untrusted certificate."""

    def __init__(
        self,
        client: httpx.Client,
        token: str,
        *,
        attempts: int = 3,
        backoff_s: float = 2.0,
        cancelled: threading.Event | None = None,
    ) -> None:
        self._client, self._token = client, token
        self.attempts, self.backoff_s = attempts, backoff_s
        self.cancelled = cancelled or threading.Event()

    def push(
        self,
        request: PushRequest,
        on_progress: ByteProgress | None = None,
        on_loading: ByteProgress | None = None,
    ) -> PushResult:
        """Push θ′; `on_progress(done, total)` counts the bytes sent, then, once the last byte is
        out and until P2 answers, `on_loading(done, total)` the tensor bytes P2 reports loaded
        ((0, 0) first, and nothing more from a P2 that does not report them)."""
        total, digest = body_digest(request.files, request.metadata, self.cancelled)
        error = PushFailed("no push attempted")
        for attempt in range(1, self.attempts + 1):
            try:
                response = self._put(request, total, digest, on_progress, on_loading)
            except httpx.TransportError as e:
                if certificate_refused(e):  # permanent: retrying cannot help
                    raise PushFailed(
                        f"P2's TLS certificate at {request.url} is not trusted: {e}; if P2 uses a private CA, "
                        "set STIP_DEVELOPER_CA_BUNDLE"
                    ) from None
                error = PushFailed(f"cannot reach P2 at {request.url}: {type(e).__name__}: {e}")
            else:
                if response.is_success:
                    return self._result(request, response, digest)
                error = PushFailed(f"P2 refused the push (HTTP {response.status_code}): {_refusal(response)}")
                if response.status_code not in RETRY_STATUSES:
                    raise error
            # The body may have arrived even though the answer did not: ask P2.
            if self.cloud_version(request.cloud_url, request.deployment_id) == request.key_version:
                log.info("P2 reports key version %d active after an unanswered push", request.key_version)
                return PushResult(
                    deployment_id=request.deployment_id,
                    key_version=request.key_version,
                    status="active",
                    sha256=digest,
                )
            if attempt < self.attempts:
                log.warning("push attempt %d/%d failed: %s", attempt, self.attempts, error.message)
                if self.cancelled.wait(self.backoff_s * attempt):
                    raise JobCancelled("P1 is shutting down")
        raise error

    def _put(
        self,
        request: PushRequest,
        total: int,
        digest: str,
        on_progress: ByteProgress | None,
        on_loading: ByteProgress | None,
    ) -> httpx.Response:
        _, chunks = concat_files(request.files, request.metadata)
        answered = threading.Event()
        follower: list[threading.Thread] = []

        def body() -> Iterator[bytes]:
            done = 0
            if on_progress:
                on_progress(0, total)
            for chunk in chunks:
                if self.cancelled.is_set():
                    raise JobCancelled("P1 is shutting down")
                done += len(chunk)
                yield chunk
                if on_progress:
                    on_progress(done, total)
            if on_loading:  # the last byte is out: P2 verifies, loads and tests θ′ before it answers
                on_loading(0, 0)
                thread = threading.Thread(
                    target=self._follow_load,
                    args=(request, on_loading, answered),
                    name=f"stip-load-{request.deployment_id}",
                    daemon=True,
                )
                follower.append(thread)
                thread.start()

        headers = {
            "Authorization": f"Bearer {self._token}",
            DIGEST_HEADER: digest,
            KEY_VERSION_HEADER: str(request.key_version),
            "Content-Type": CONTENT_TYPE,
            "Content-Length": str(total),  # a sized body, not chunked: P2 can refuse it up front
        }
        try:
            return self._client.put(request.url, content=body(), headers=headers)
        finally:
            answered.set()
            for thread in follower:
                thread.join()  # no report of this load arrives after the push has returned

    def _follow_load(self, request: PushRequest, on_loading: ByteProgress, answered: threading.Event) -> None:
        """Poll P2's `GET .../weights` until the push is answered; report the load of this version."""
        headers = {"Authorization": f"Bearer {self._token}"}
        while not answered.wait(LOAD_POLL_S):
            try:
                response = self._client.get(request.url, headers=headers, timeout=LOAD_POLL_TIMEOUT_S)
                progress = LoadProgress.model_validate_json(response.content) if response.status_code == 200 else None
            except (httpx.HTTPError, ValidationError):
                continue  # a poll that failed says nothing about the push; the PUT's answer decides
            if progress is not None and progress.key_version == request.key_version and not answered.is_set():
                on_loading(progress.done, progress.total)

    @staticmethod
    def _result(request: PushRequest, response: httpx.Response, digest: str) -> PushResult:
        try:
            result = PushResult.model_validate_json(response.content)
        except ValidationError:
            raise PushFailed("P2 acknowledged the push with a body that is not a PushResult") from None
        if result.sha256 != digest or result.key_version != request.key_version:
            raise PushFailed(
                f"P2 acknowledged key version {result.key_version} with digest {result.sha256[:12]}…, "
                f"expected version {request.key_version} with {digest[:12]}…"
            )
        return result

    def send_revocations(
        self, cloud_url: str, deployment_id: str, revocations: Revocations, timeout_s: float = 10.0
    ) -> bool:
        """Replace P2's list of the deployment's revoked credentials; True once P2 holds it.

        A P2 without the deployment (404) needs no list: the next push sends it along.
        """
        url = f"{cloud_url}/v1/deployments/{deployment_id}/revocations"
        headers = {"Authorization": f"Bearer {self._token}"}
        try:
            response = self._client.put(url, json=revocations.model_dump(), headers=headers, timeout=timeout_s)
        except httpx.HTTPError as e:
            log.warning("cannot send revocations to P2 at %s: %s", url, type(e).__name__)
            return False
        if response.is_success or response.status_code == 404:
            return True
        log.warning("P2 refused the revocations (HTTP %d): %s", response.status_code, _refusal(response))
        return False

    def delete_deployment(self, cloud_url: str, deployment_id: str, timeout_s: float = 30.0) -> str | None:
        """Ask P2 to remove θ′ and the sessions; None once P2 holds nothing of it, else why not.

        P2's 404 counts as done: it has no such deployment (never pushed, or already deleted).
        """
        url = f"{cloud_url}/v1/deployments/{deployment_id}"
        headers = {"Authorization": f"Bearer {self._token}"}
        try:
            response = self._client.delete(url, headers=headers, timeout=timeout_s)
        except httpx.HTTPError as e:
            return f"cannot reach P2 at {cloud_url}: {type(e).__name__}"
        if response.is_success or response.status_code == 404:
            return None
        return f"P2 refused the delete (HTTP {response.status_code}): {_refusal(response)}"

    def cloud_version(self, cloud_url: str, deployment_id: str, timeout_s: float = 10.0) -> int | None:
        """The key version P2 reports active for a deployment, or None (unknown or unreachable)."""
        return self.probe(cloud_url, deployment_id, timeout_s)[1]

    def probe(self, cloud_url: str, deployment_id: str, timeout_s: float = 10.0) -> tuple[bool, int | None]:
        """(answered, version): P2's active key version, None when P2 says it has no such
        deployment (404); answered is False when P2 could not say (unreachable, not ready, 5xx)."""
        try:
            response = self._client.get(f"{cloud_url}/v1/deployments/{deployment_id}", timeout=timeout_s)
            if response.status_code == 404:
                return True, None
            if response.status_code != 200:
                return False, None
            return True, DeploymentInfo.model_validate_json(response.content).key_version
        except (httpx.HTTPError, ValidationError):
            return False, None
