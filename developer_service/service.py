"""P1's logic, testable without HTTP: registry, deployments, rotation, credentials, bundles.

Who holds what: P1 keeps the original weights θ and every key version's full key
(`DATA/deployments/{id}/v{n}/developer/key.safetensors`, 0600); it sends θ′ (`v{n}/cloud/`)
to P2 and hands `v{n}/user/` (π, π_c, embedding module, tokenizer) to authorised users.

A deployment runs at most one job at a time (a thread: transform, then push). The version
users receive (`key_version`) changes only once P2 has acknowledged the new θ′; until then
the new version is `pending_key_version`. Versions are never reused.
"""

import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from developer_service.bundle import MANIFEST, Bundle, open_bundle
from developer_service.errors import (
    BadRequest,
    Conflict,
    DeveloperError,
    Forbidden,
    InvalidModel,
    JobCancelled,
    JobRunning,
    NoActiveVersion,
    NotConfigured,
    Unauthorized,
    UnknownDeployment,
)
from developer_service.metrics import Metrics
from developer_service.push import Pusher, PushRequest
from developer_service.schemas import (
    CreateDeployment,
    CredentialInfo,
    CredentialIssued,
    DeletedDeployment,
    DeletedModel,
    DeploymentStatus,
    IssueCredential,
    ModelInfo,
    Progress,
    RegisterModel,
    from_fields,
)
from developer_service.settings import DeveloperSettings
from developer_service.store import CredentialRecord, DeploymentRecord, ModelRecord, Store
from shared.api import (
    BundleManifest,
    Revocations,
    Revoked,
    push_metadata,
)
from shared.checkpoint import bundle_side_files, checkpoint_files, count_tensors, read_config, transform_model_dir
from shared.credentials import Claims, Signer, verify
from shared.errors import CredentialError, StipCoreError
from shared.families import detect_family
from shared.transform import check_mode
from shared.wire import tensor_bytes
from stip_http.tls import tls_verify

log = logging.getLogger("stip.developer")

STATE_FILE = "state.json"
SIGNING_KEY_FILE = "signing.key"
DEPLOYMENTS_DIR = "deployments"
_VERSION_DIR = re.compile(r"\.?v(\d+)(\.partial-.*)?")  # v3, and .v3.partial-xyz while transforming


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def normalize_cloud_url(url: str) -> str:
    """An absolute http(s) URL without a trailing slash, or BadRequest."""
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError):
        raise BadRequest(f"cloud_url {url!r} is not a URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise BadRequest(f"cloud_url must be an absolute http(s) URL, got {url!r}")
    if parsed.query or parsed.fragment:
        raise BadRequest("cloud_url must not carry a query or a fragment")
    return str(parsed).rstrip("/")


def inspect_model(path: Path) -> tuple[str, list[str], int, int, int]:
    """Check a model directory: config.json, a supported family, readable checkpoint files.

    Returns (family, architectures, d_model, d_out, n_layers). Raises InvalidModel or the
    core's CheckpointError / UnsupportedModel, each naming what is wrong.
    """
    if not path.is_absolute():
        raise InvalidModel(f"model path must be absolute (a directory on P1's machine): {path}")
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise InvalidModel(f"{path} {what} on P1's machine: register a Hugging Face model directory there")
    config = read_config(path)
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise InvalidModel(f"{path}/config.json: 'architectures' must be a list of class names")
    family = detect_family(config)
    try:
        dims = family.dims(config)
    except StipCoreError:
        raise
    except Exception as e:  # wrong types, zero heads ...: the family's code cannot read this config
        problem = f"{type(e).__name__}: {e}"
        raise InvalidModel(f"{path}/config.json is not a usable {family.name} config: {problem}") from None
    count_tensors(checkpoint_files(path))  # every shard exists and has a readable header
    bundle_side_files(path)  # what users will receive: regular files, no symbolic link
    return family.name, archs, dims.d_model, dims.d_out, dims.n_layers


def _make_http_client(settings: DeveloperSettings, transport: httpx.BaseTransport | None) -> httpx.Client:
    verify_tls = tls_verify(settings.ca_bundle) if settings.ca_bundle is not None else True
    timeout = httpx.Timeout(settings.push_timeout_s, connect=15.0)
    return httpx.Client(transport=transport, verify=verify_tls, timeout=timeout, follow_redirects=False)


@dataclass
class _Job:
    thread: threading.Thread
    kind: str  # "deploy", "rotate" or "recover" (settling a job interrupted by a restart)
    version: int


class DeveloperService:
    """Everything P1 does; the HTTP layer (api.py) only translates."""

    def __init__(
        self,
        settings: DeveloperSettings,
        *,
        transport: httpx.BaseTransport | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.expanduser().resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        (self.data_dir / DEPLOYMENTS_DIR).mkdir(mode=0o700, exist_ok=True)
        self.store = Store(self.data_dir / STATE_FILE)
        self.signer = Signer.load_or_create(self.data_dir / SIGNING_KEY_FILE)
        self.metrics = metrics or Metrics()
        self.metrics.on_scrape(self._refresh_gauges)
        self._http = _make_http_client(settings, transport)
        self._closing = threading.Event()
        self._lock = threading.RLock()  # serialises job start/commit against reads of versions
        self._jobs: dict[str, _Job] = {}
        self._revocation_syncs: dict[str, threading.Thread] = {}  # deployment -> retrying sender
        self._delete_syncs: dict[str, threading.Thread] = {}  # deployment -> retrying delete on P2
        self._progress: dict[str, Progress] = {}
        self._slots = threading.Semaphore(settings.max_parallel_jobs)
        self.ready = False

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Recover from an interrupted run, then accept requests."""
        self._recover()
        for dep in self.store.list_deployments():
            if dep.status == "deleting":  # a delete that P2 had not confirmed when P1 stopped
                self._finish_delete(dep.deployment_id, background=True)
            elif dep.key_version is not None and self._revocations(dep.deployment_id).revoked:
                self._start_revocation_sync(dep.deployment_id)  # P2 may have missed one while P1 was down
        if self.settings.admin_token is None:
            log.warning("no admin token configured: the /v1 admin routes answer 503")
        if self.settings.push_token is None:
            log.warning("no push token configured: deployments cannot be pushed to P2")
        self.ready = True
        log.info(
            "P1 ready: %d models, %d deployments", len(self.store.list_models()), len(self.store.list_deployments())
        )

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop running jobs at their next checkpoint and wait for them (bounded)."""
        self.ready = False
        self._closing.set()
        deadline = time.monotonic() + timeout_s
        threads = [job.thread for job in list(self._jobs.values())]
        threads += [*self._revocation_syncs.values(), *self._delete_syncs.values()]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._http.close()

    def wait(self, deployment_id: str, timeout_s: float | None = None) -> DeploymentStatus:
        """Block until the deployment's current job (if any) ends; for tests and scripts."""
        job = self._jobs.get(deployment_id)
        if job is not None:
            job.thread.join(timeout_s)
        return self.deployment(deployment_id)

    def _recover(self) -> None:
        """Settle the jobs a previous run left mid-way, and remove their half-done version dirs.

        A job whose version dir is incomplete never pushed: it is marked interrupted. One whose
        push may have reached P2 is settled by P2's answer: the pending version is adopted when
        P2 serves it, else the job is marked interrupted. While P2 cannot answer (down, or still
        loading after a restart of its own) nothing is decided, since deleting the keys of a
        version that P2 then serves would leave users stuck: a background check asks again with
        backoff (every 5 s at most) for up to `push_timeout_s`; the deployment stays `pending` /
        `rotating` meanwhile and users keep the active version.
        """
        for dep in self.store.list_deployments():
            if dep.status == "deleting":
                continue  # start() finishes the delete
            if dep.status not in ("pending", "rotating"):
                self._prune(dep.deployment_id, keep=dep.key_version)
                continue
            pending = dep.pending_key_version or dep.last_version
            if not self._complete(self._version_dir(dep.deployment_id, pending)):  # the push never began
                self._mark_interrupted(dep.deployment_id, pending)
            elif not self._settle(dep.deployment_id, dep.cloud_url, pending, timeout_s=5.0):
                message = f"interrupted: P1 stopped while pushing key version {pending}; asking P2 whether it took it"
                log.warning("deployment %s: %s", dep.deployment_id, message)
                self.store.update_deployment(dep.deployment_id, error=message)
                self._start_reconcile(dep.deployment_id, dep.cloud_url, pending)

    def _settle(self, deployment_id: str, cloud_url: str, version: int, *, timeout_s: float) -> bool:
        """Adopt `version` if P2 serves it, else mark the job interrupted; False when P2 cannot say."""
        answered, active = self._pusher().probe(cloud_url, deployment_id, timeout_s=timeout_s)
        if not answered:
            return False
        if active == version:
            log.info("deployment %s: adopting key version %d, active on P2", deployment_id, version)
            self._commit(deployment_id, version)
        else:
            self._mark_interrupted(deployment_id, version)
        return True

    def _mark_interrupted(self, deployment_id: str, version: int, why: str = "") -> None:
        message = f"interrupted: P1 stopped while deploying key version {version}{why}; rotate to try again"
        log.warning("deployment %s: %s", deployment_id, message)
        self._mark_failed(deployment_id, version, message)

    def _start_reconcile(self, deployment_id: str, cloud_url: str, version: int) -> None:
        def run() -> None:
            deadline = time.monotonic() + self.settings.push_timeout_s
            delay = 0.5
            try:
                while not self._closing.wait(delay):  # P1 stopping: its next start decides
                    if self._settle(deployment_id, cloud_url, version, timeout_s=10.0):
                        return
                    if time.monotonic() > deadline:
                        self._mark_interrupted(deployment_id, version, ", and P2 never said whether it took it")
                        return
                    delay = min(2 * delay, 5.0)  # one GET per few seconds: cheap, and quick to settle
            finally:
                with self._lock:
                    job = self._jobs.get(deployment_id)
                    if job is not None and job.thread is threading.current_thread():
                        del self._jobs[deployment_id]

        thread = threading.Thread(target=run, name=f"stip-recover-{deployment_id}-v{version}", daemon=True)
        with self._lock:
            self._jobs[deployment_id] = _Job(thread=thread, kind="recover", version=version)
        thread.start()

    # --- models ----------------------------------------------------------------------------

    def register_model(self, request: RegisterModel) -> tuple[ModelInfo, bool]:
        """Register a local model directory. Idempotent on (path, name): returns (info, created)."""
        try:
            path = Path(request.path).expanduser()
        except RuntimeError:  # `~user/...` of an unknown user
            raise InvalidModel(f"model path {request.path!r}: no home directory for its '~'") from None
        family, archs, d_model, d_out, n_layers = inspect_model(path)
        path = path.resolve()
        name = request.name or path.name
        for existing in self.store.list_models():
            if existing.path == str(path) and existing.name == name:
                return ModelInfo.model_validate(existing.model_dump()), False
        record = ModelRecord(
            model_id=_new_id("m"),
            name=name,
            path=str(path),
            family=family,
            architectures=archs,
            d_model=d_model,
            d_out=d_out,
            n_layers=n_layers,
            registered_at=int(time.time()),
        )
        self.store.add_model(record)
        log.info("registered model %s (%s, %s) from %s", record.model_id, name, family, path)
        return ModelInfo.model_validate(record.model_dump()), True

    def delete_model(self, model_id: str) -> DeletedModel:
        """Unregister a model that no deployment uses; its directory on disk is left alone."""
        with self._lock:
            model = self.store.get_model(model_id)
            users = sorted(d.deployment_id for d in self.store.list_deployments() if d.model_id == model_id)
            if users:
                raise Conflict(
                    f"model {model_id} is used by deployment(s) {', '.join(users)}: delete them first "
                    "(stip-developer delete-deployment DEPLOYMENT_ID)"
                )
            self.store.remove_model(model_id)
        log.info("unregistered model %s (%s); %s is left on disk", model_id, model.name, model.path)
        return DeletedModel(model_id=model_id, path=model.path)

    def models(self) -> list[ModelInfo]:
        return [ModelInfo.model_validate(m.model_dump()) for m in self.store.list_models()]

    def model(self, model_id: str) -> ModelInfo:
        return ModelInfo.model_validate(self.store.get_model(model_id).model_dump())

    # --- deployments -----------------------------------------------------------------------

    def create_deployment(self, request: CreateDeployment) -> DeploymentStatus:
        model = self.store.get_model(request.model_id)
        cloud_url = normalize_cloud_url(request.cloud_url)
        self._push_token()
        inspect_model(Path(model.path))  # still there and still valid
        if request.mode == "token":
            if not self.settings.allow_token_mode:
                raise Forbidden(
                    "token mode is disabled on this P1: P2 would hold the permuted token table and see "
                    "relabelled token ids (SECURITY.md); the operator enables it with "
                    "STIP_DEVELOPER_ALLOW_TOKEN_MODE=true"
                )
            check_mode(detect_family(read_config(Path(model.path))), request.mode)  # decoders only
        now = int(time.time())
        record = DeploymentRecord(
            deployment_id=_new_id("dep"),
            model_id=model.model_id,
            family=model.family,
            cloud_url=cloud_url,
            status="pending",
            pending_key_version=1,
            last_version=1,
            created_at=now,
            updated_at=now,
            mode=request.mode,
        )
        with self._lock:
            self.store.add_deployment(record)
            self._start_job(record.deployment_id, 1, kind="deploy")
        log.info(
            "deployment %s of model %s to %s (%s mode): queued",
            record.deployment_id,
            model.model_id,
            cloud_url,
            record.mode,
        )
        return self.deployment(record.deployment_id)

    def rotate(self, deployment_id: str) -> DeploymentStatus:
        """Draw key version n+1 and push its θ′; users keep version n until P2 activates it."""
        self._push_token()
        with self._lock:
            dep = self.store.get_deployment(deployment_id)
            if dep.status in ("pending", "rotating"):
                raise JobRunning(f"deployment {deployment_id} has a job running; wait for it to finish")
            self._refuse_deleting(dep)
            version = dep.last_version + 1
            self.store.update_deployment(
                deployment_id,
                status="rotating" if dep.key_version is not None else "pending",
                pending_key_version=version,
                last_version=version,
                progress=Progress(stage="queued"),
                error=None,
            )
            self._start_job(deployment_id, version, kind="rotate")
        log.info("deployment %s: rotating to key version %d", deployment_id, version)
        return self.deployment(deployment_id)

    def deployment(self, deployment_id: str) -> DeploymentStatus:
        return self._status(self.store.get_deployment(deployment_id))

    # --- deletion ----------------------------------------------------------------------------

    def delete_deployment(self, deployment_id: str) -> DeletedDeployment:
        """Delete a deployment on P1 and P2: keys, versions, credentials, θ′ and sessions.

        Crash-safe order: the record is marked `deleting` durably first (from then on no bundle
        is handed out and no credential accepted), then P1's key material is removed, then P2
        is told; only once P2 holds nothing of it does the record (with its credentials) go,
        in one atomic write. A P2 that cannot be told now is told in the background, with
        backoff, and again on every start of P1 until it confirms.
        """
        with self._lock:
            dep = self.store.get_deployment(deployment_id)
            if dep.status in ("pending", "rotating"):
                raise JobRunning(
                    f"deployment {deployment_id} has a job running ({dep.status}); wait for it to end "
                    f"(stip-developer status {deployment_id}), then delete it"
                )
            credentials = len(self.store.list_credentials(deployment_id))
            if dep.status != "deleting":
                self.store.update_deployment(deployment_id, status="deleting", error=None)
        log.info("deployment %s: deleting (%d credential(s) revoked)", deployment_id, credentials)
        done = self._finish_delete(deployment_id, background=False)
        return DeletedDeployment(
            deployment_id=deployment_id,
            status="deleted" if done else "deleting",
            credentials_revoked=credentials,
            cloud_deleted=done,
        )

    def _finish_delete(self, deployment_id: str, *, background: bool) -> bool:
        """Remove P1's files, then (now, or in the background) P2's copy, then the record."""
        shutil.rmtree(self._deployment_dir(deployment_id), ignore_errors=True)
        self._progress.pop(deployment_id, None)
        if not background and self._delete_on_cloud(deployment_id):
            return True
        self._start_delete_sync(deployment_id)
        return False

    def _delete_on_cloud(self, deployment_id: str) -> bool:
        """One attempt to have P2 drop the deployment; on success forget it on P1 as well.

        Two attempts may overlap (a repeated DELETE and the background sender): the one that
        finds the record already gone is done too.
        """
        try:
            dep = self.store.get_deployment(deployment_id)
            problem = self._pusher().delete_deployment(dep.cloud_url, deployment_id)
            if problem is not None:
                message = f"deleted on P1; P2 has not confirmed yet ({problem}); P1 keeps asking"
                if dep.error != message:
                    self.store.update_deployment(deployment_id, error=message)
                return False
            self.store.remove_deployment(deployment_id)
        except UnknownDeployment:
            return True
        log.info("deployment %s deleted on P1 and P2", deployment_id)
        return True

    def _start_delete_sync(self, deployment_id: str) -> None:
        """Ask P2 again with backoff (up to 30 s apart) until it confirms or P1 stops."""
        self._retry_in_background(
            self._delete_syncs, deployment_id, "delete", lambda: self._delete_on_cloud(deployment_id)
        )

    def _retry_in_background(
        self, syncs: dict[str, threading.Thread], deployment_id: str, what: str, attempt: Callable[[], bool]
    ) -> None:
        """Call `attempt` in a thread, 1 s then doubling up to 30 s apart, until it returns True or
        P1 stops. One thread per deployment in `syncs` (the `what` of P2 that is not in sync yet)."""

        def run() -> None:
            delay = 1.0
            try:
                while not self._closing.wait(delay):
                    if attempt():
                        return
                    delay = min(2 * delay, 30.0)
            finally:
                with self._lock:
                    syncs.pop(deployment_id, None)

        with self._lock:
            if deployment_id in syncs:
                return
            thread = threading.Thread(target=run, name=f"stip-{what}-{deployment_id}", daemon=True)
            syncs[deployment_id] = thread
        log.warning("deployment %s: P2 has not confirmed the %s yet; retrying in the background", deployment_id, what)
        thread.start()

    @staticmethod
    def _refuse_deleting(dep: DeploymentRecord) -> None:
        if dep.status == "deleting":
            raise UnknownDeployment(f"deployment {dep.deployment_id} is being deleted")

    def deployments(self) -> list[DeploymentStatus]:
        return [self._status(d) for d in self.store.list_deployments()]

    def _status(self, dep: DeploymentRecord) -> DeploymentStatus:
        progress = self._progress.get(dep.deployment_id) or dep.progress
        return from_fields(DeploymentStatus, dep, progress=progress.model_copy())

    # --- jobs ------------------------------------------------------------------------------

    def _start_job(self, deployment_id: str, version: int, *, kind: str) -> None:
        self._progress[deployment_id] = Progress(stage="queued")
        thread = threading.Thread(
            target=self._run_job,
            args=(deployment_id, version, kind),
            name=f"stip-{kind}-{deployment_id}-v{version}",
            daemon=True,
        )
        with self._lock:
            self._jobs[deployment_id] = _Job(thread=thread, kind=kind, version=version)
        thread.start()

    def _run_job(self, deployment_id: str, version: int, kind: str) -> None:
        start = time.monotonic()
        outcome = "failed"
        try:
            while not self._slots.acquire(timeout=0.5):
                if self._closing.is_set():
                    raise JobCancelled("P1 shut down before the job started")
            try:
                self._transform_and_push(deployment_id, version)
                outcome = "succeeded"
            finally:
                self._slots.release()
        except JobCancelled:
            outcome = "interrupted"
            self._mark_failed(
                deployment_id, version, f"interrupted: P1 shut down during key version {version}; rotate to try again"
            )
        except (DeveloperError, StipCoreError) as e:
            log.warning("deployment %s, key version %d failed: %s", deployment_id, version, e)
            self._mark_failed(deployment_id, version, str(e))
        except Exception:
            log.exception("deployment %s, key version %d: unexpected error", deployment_id, version)
            self._mark_failed(deployment_id, version, "internal error during the job; see P1's log")
        finally:
            self.metrics.jobs.labels(kind, outcome).inc()
            self.metrics.job_seconds.labels(kind).observe(time.monotonic() - start)
            with self._lock:
                job = self._jobs.get(deployment_id)
                if job is not None and job.thread is threading.current_thread():
                    del self._jobs[deployment_id]

    def _transform_and_push(self, deployment_id: str, version: int) -> None:
        dep = self.store.get_deployment(deployment_id)
        model = self.store.get_model(dep.model_id)
        vdir = self._version_dir(deployment_id, version)
        if vdir.exists():
            shutil.rmtree(vdir)

        def on_tensors(done: int, total: int) -> None:
            if self._closing.is_set():
                raise JobCancelled("P1 is shutting down")
            self._progress[deployment_id] = Progress(stage="transforming", done=done, total=total)

        self._set_stage(deployment_id, "transforming")
        result = transform_model_dir(
            Path(model.path),
            vdir,
            key_version=version,
            shard_bytes=self.settings.shard_bytes,
            progress=False,
            on_progress=on_tensors,
            mode=dep.mode,
        )
        log.info("deployment %s: key version %d transformed into %s", deployment_id, version, vdir)

        sent = [0]  # the body's size in bytes

        def on_bytes(done: int, total: int) -> None:
            sent[0] = total
            self._progress[deployment_id] = Progress(stage="pushing", done=done, total=total)

        loaded_total = tensor_bytes(result.cloud_files)  # what P2 loads; its own report counts the same

        def on_loading(done: int, total: int) -> None:  # P2 builds the model on θ′ and tests it
            self._progress[deployment_id] = Progress(stage="loading", done=done, total=total or loaded_total)

        self._set_stage(deployment_id, "pushing")
        metadata = push_metadata(
            deployment_id=deployment_id,
            family=result.family,
            config_json=(vdir / "cloud" / "config.json").read_text(),
            key_version=version,
            verify_key=self.signer.public_key,
            mode=dep.mode,
        )
        request = PushRequest(dep.cloud_url, deployment_id, version, list(result.cloud_files), metadata)
        pushed = self._pusher().push(request, on_bytes, on_loading)
        self.metrics.pushed_bytes.inc(sent[0])
        log.info("deployment %s: P2 activated key version %d (sha256 %s)", deployment_id, version, pushed.sha256)
        self._commit(deployment_id, version, pushed_bytes=sent[0])
        if not self._send_revocations(deployment_id):  # a P2 that lost its list gets it back
            self._start_revocation_sync(deployment_id)

    def _commit(self, deployment_id: str, version: int, *, pushed_bytes: int = 0) -> None:
        """P2 serves `version`: hand it to users and delete every older version's material."""
        fingerprint = self._manifest_fingerprint(self._version_dir(deployment_id, version))
        with self._lock:
            live = self._progress.get(deployment_id)
            total = pushed_bytes or (live.total if live and live.stage == "pushing" else 0)
            progress = Progress(stage="done", done=total, total=total)  # in bytes pushed
            self.store.update_deployment(
                deployment_id,
                status="active",
                key_version=version,
                pending_key_version=None,
                fingerprint=fingerprint,
                progress=progress,
                error=None,
            )
            self._progress[deployment_id] = progress
        self._prune(deployment_id, keep=version, upto=version)

    def _mark_failed(self, deployment_id: str, version: int, message: str) -> None:
        """The job for `version` did not complete: the active version (if any) stays."""
        with self._lock:
            dep = self.store.get_deployment(deployment_id)
            if dep.key_version is not None:
                status, error = "active", f"rotation to key version {version} failed: {message}"
            else:
                status, error = "failed", f"deployment of key version {version} failed: {message}"
            live = self._progress.get(deployment_id) or dep.progress
            progress = Progress(stage="failed", done=live.done, total=live.total)
            self.store.update_deployment(
                deployment_id, status=status, pending_key_version=None, progress=progress, error=error
            )
            self._progress[deployment_id] = progress
        self._prune(deployment_id, keep=dep.key_version, upto=version)

    def _set_stage(self, deployment_id: str, stage: str) -> None:
        progress = Progress.model_validate({"stage": stage})
        self.store.update_deployment(deployment_id, progress=progress)
        self._progress[deployment_id] = progress

    def _pusher(self) -> Pusher:
        token = self.settings.push_token
        return Pusher(
            self._http,
            token.get_secret_value() if token else "",
            attempts=self.settings.push_attempts,
            backoff_s=self.settings.push_retry_backoff_s,
            cancelled=self._closing,
        )

    def _push_token(self) -> str:
        if self.settings.push_token is None:
            raise NotConfigured("P1 has no push token for P2: set STIP_DEVELOPER_PUSH_TOKEN(_FILE)")
        return self.settings.push_token.get_secret_value()

    # --- files -----------------------------------------------------------------------------

    def _deployment_dir(self, deployment_id: str) -> Path:
        return self.data_dir / DEPLOYMENTS_DIR / deployment_id

    def _version_dir(self, deployment_id: str, version: int) -> Path:
        return self._deployment_dir(deployment_id) / f"v{version}"

    @staticmethod
    def _complete(vdir: Path) -> bool:
        return all(
            (vdir / rel).is_file()
            for rel in ("cloud/config.json", "user/stip.json", "user/key.safetensors", "developer/key.safetensors")
        )

    @staticmethod
    def _manifest_fingerprint(vdir: Path) -> str | None:
        try:
            return BundleManifest.model_validate_json((vdir / "user" / MANIFEST).read_bytes()).fingerprint
        except (OSError, ValueError):
            return None

    def _prune(self, deployment_id: str, *, keep: int | None, upto: int | None = None) -> None:
        """Remove version dirs (and transform leftovers) other than `v{keep}`.

        With `upto`, only versions up to it: a job for a newer version may be writing.
        """
        ddir = self._deployment_dir(deployment_id)
        if not ddir.is_dir():
            return
        for child in ddir.iterdir():
            m = _VERSION_DIR.fullmatch(child.name)
            if m is None:
                continue
            version = int(m.group(1))
            if version == keep and not m.group(2):
                continue
            if upto is not None and version > upto:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)

    # --- credentials -----------------------------------------------------------------------

    def issue_credential(self, deployment_id: str, request: IssueCredential) -> CredentialIssued:
        self._refuse_deleting(self.store.get_deployment(deployment_id))  # 404 for an unknown deployment
        ttl_s = request.ttl_s or self.settings.credential_ttl_s
        user_id = _new_id("u")
        token, claims = self.signer.issue(subject=user_id, deployment_id=deployment_id, ttl_s=ttl_s)
        self.store.add_credential(
            CredentialRecord(
                user_id=user_id,
                name=request.name,
                deployment_id=deployment_id,
                jti=claims.jti,
                token_sha256=_sha256(token),
                issued_at=claims.iat,
                expires_at=claims.exp,
            )
        )
        self.metrics.credentials_issued.inc()
        log.info(
            "deployment %s: issued credential %s (%s), expires at %d", deployment_id, user_id, request.name, claims.exp
        )
        return CredentialIssued(user_id=user_id, deployment_id=deployment_id, credential=token, expires_at=claims.exp)

    def credentials(self, deployment_id: str) -> list[CredentialInfo]:
        self.store.get_deployment(deployment_id)
        return [CredentialInfo.from_record(c) for c in self.store.list_credentials(deployment_id)]

    def revoke_credential(self, deployment_id: str, user_id: str) -> CredentialInfo:
        """Revoke on P1 (no more bundles), then tell P2, which checks credentials offline.

        When P2 cannot be told now, a background sender retries until it can (and P1's next
        start or push sends the list again); `cloud_synced` says which happened.
        """
        record = self.store.revoke_credential(deployment_id, user_id)
        log.info("deployment %s: revoked credential %s", deployment_id, user_id)
        synced = self._send_revocations(deployment_id)
        if not synced:
            self._start_revocation_sync(deployment_id)
        return CredentialInfo.from_record(record).model_copy(update={"cloud_synced": synced})

    def _revocations(self, deployment_id: str) -> Revocations:
        """The deployment's revoked credentials that have not expired: what P2 must refuse."""
        now = int(time.time())
        return Revocations(
            revoked=[
                Revoked(jti=c.jti, expires_at=c.expires_at)
                for c in self.store.list_credentials(deployment_id)
                if c.revoked_at is not None and c.expires_at > now
            ]
        )

    def _send_revocations(self, deployment_id: str) -> bool:
        """One attempt to replace P2's list with the current one; True when P2 holds it."""
        try:
            dep = self.store.get_deployment(deployment_id)
        except UnknownDeployment:
            return True  # deleted meanwhile: P2 holds nothing of it
        if dep.status == "deleting" or (dep.key_version is None and dep.pending_key_version is None):
            return True  # nothing on P2 to protect (or soon): the first push sends the list
        return self._pusher().send_revocations(dep.cloud_url, deployment_id, self._revocations(deployment_id))

    def _start_revocation_sync(self, deployment_id: str) -> None:
        """Send the list again with backoff (up to 30 s apart) until P2 holds it or P1 stops.

        One sender per deployment; each attempt reads the current list, so revocations made
        meanwhile ride along.
        """

        def attempt() -> bool:
            if not self._send_revocations(deployment_id):
                return False
            log.info("deployment %s: P2 now holds the revocation list", deployment_id)
            return True

        self._retry_in_background(self._revocation_syncs, deployment_id, "revocations", attempt)

    # --- authentication --------------------------------------------------------------------

    def authenticate_admin(self, token: str | None) -> None:
        expected = self.settings.admin_token
        if expected is None:
            raise NotConfigured("the admin API is disabled: set STIP_DEVELOPER_ADMIN_TOKEN(_FILE)")
        if token is None:
            self.metrics.auth_failures.labels("admin").inc()
            raise Unauthorized("missing admin token (Authorization: Bearer <token>)")
        if not secrets.compare_digest(token.encode(), expected.get_secret_value().encode()):
            self.metrics.auth_failures.labels("admin").inc()
            raise Unauthorized("invalid admin token")

    def authenticate_user(self, deployment_id: str, token: str | None) -> Claims:
        """A user credential for this deployment: signed by P1, unexpired, issued and not revoked."""
        try:
            return self._check_user(deployment_id, token)
        except (Unauthorized, Forbidden):
            self.metrics.auth_failures.labels("user").inc()
            raise

    def _check_user(self, deployment_id: str, token: str | None) -> Claims:
        if token is None:
            raise Unauthorized("missing user credential (Authorization: Bearer <credential>)")
        digest = _sha256(token)
        record = self.store.credential_by_hash(digest)
        if record is None or not secrets.compare_digest(record.token_sha256, digest):
            raise Unauthorized("unknown user credential")
        try:
            claims = verify(token, self.signer.public_key, deployment_id=record.deployment_id)
        except CredentialError as e:
            raise Unauthorized(str(e)) from None
        if claims.jti != record.jti or claims.sub != record.user_id:
            raise Unauthorized("unknown user credential")
        if record.revoked_at is not None:
            raise Unauthorized("user credential has been revoked")
        if self.store.get_deployment(record.deployment_id).status == "deleting":
            raise Unauthorized(f"the credential's deployment {record.deployment_id} has been deleted")
        if record.deployment_id != deployment_id:
            raise Forbidden(
                f"credential is for another deployment ({record.deployment_id!r}, not {deployment_id!r}): use it "
                f"with {record.deployment_id!r}, or issue one for {deployment_id!r} "
                f"(stip-developer issue-credential {deployment_id})"
            )
        return claims

    # --- the user bundle -------------------------------------------------------------------

    def user_bundle(self, deployment_id: str) -> Bundle:
        """The active version's user/ directory as a tar, its one archive file opened now (see bundle.py)."""
        with self._lock:
            dep = self.store.get_deployment(deployment_id)
            self._refuse_deleting(dep)
            if dep.key_version is None:
                raise NoActiveVersion(f"deployment {deployment_id} has no active key version yet (status {dep.status})")
            user_dir = self._version_dir(deployment_id, dep.key_version) / "user"
            cloud_url = self.settings.public_cloud_url or dep.cloud_url
            bundle = open_bundle(user_dir, deployment_id=deployment_id, cloud_url=cloud_url)
        self.metrics.bundles.inc()
        return bundle

    # --- metrics -----------------------------------------------------------------------------

    def _refresh_gauges(self) -> None:
        counts = dict.fromkeys(("pending", "active", "rotating", "failed", "deleting"), 0)
        for dep in self.store.list_deployments():
            counts[dep.status] += 1
        for status, n in counts.items():
            self.metrics.deployments.labels(status).set(n)
