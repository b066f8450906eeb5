"""P2's data directory: pushed weights, which version is active, and nothing half-written.

    DATA/tmp/push-<random>.partial        a push being received (removed on any failure)
    DATA/deployments/{id}/v{N}.safetensors the weights of key version N (one body, as pushed)
    DATA/deployments/{id}/active.json      which file serves (ActiveRecord), tmp + os.replace
    DATA/deployments/{id}/revoked.json     credentials P1 revoked (shared.api.Revocations), tmp + os.replace

A deleted deployment's directory is removed whole, `active.json` first (`remove_deployment`).

A version file appears only when its push is complete, verified and loaded; `active.json`
switches to it in one rename, and the previous version file is removed after the switch.
`prepare` (at startup) deletes whatever a crash left behind: partial pushes, version files
that never became active, a half-written `active.json`.
"""

import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from pydantic import ValidationError

from cloud_service.schemas import ActiveRecord
from shared.api import Revocations
from shared.files import write_atomic

log = logging.getLogger("stip.cloud.storage")

ACTIVE = "active.json"
REVOKED = "revoked.json"
DEPLOYMENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def valid_deployment_id(deployment_id: str) -> bool:
    """Ids name directories: letters, digits, `.`, `_`, `-`, not starting with a dot."""
    return DEPLOYMENT_ID.fullmatch(deployment_id) is not None


def version_file(key_version: int) -> str:
    return f"v{key_version}.safetensors"


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.deployments_dir = self.root / "deployments"

    def prepare(self) -> None:
        """Create the layout (owner-only) and delete what an interrupted push left behind."""
        for d in (self.root, self.tmp_dir, self.deployments_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        for stray in self.tmp_dir.iterdir():
            log.warning("removing %s, left by an interrupted push", stray.name)
            _remove(stray)
        for d in self.deployments_dir.iterdir():
            if not d.is_dir():
                continue
            record = self.read_active(d.name)
            keep = record.file if record else None
            for f in d.iterdir():
                if f.name not in (ACTIVE, REVOKED, keep):
                    log.warning("removing %s/%s: not the active version", d.name, f.name)
                    _remove(f)
            if record is None and not any(d.iterdir()):
                d.rmdir()

    def new_temp(self) -> Path:
        """A fresh file under DATA/tmp for a push being received."""
        path = self.tmp_dir / f"push-{secrets.token_hex(8)}.partial"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        return path

    def read_active(self, deployment_id: str) -> ActiveRecord | None:
        path = self.deployments_dir / deployment_id / ACTIVE
        if not path.is_file():
            return None
        try:
            record = ActiveRecord.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as e:
            log.error("%s is unreadable (%s); the deployment is not reloaded", path, type(e).__name__)
            return None
        if record.deployment_id != deployment_id or Path(record.file).name != record.file:
            log.error("%s names another deployment or file; the deployment is not reloaded", path)
            return None
        return record

    def active_records(self) -> list[ActiveRecord]:
        out = []
        for d in sorted(self.deployments_dir.iterdir()):
            if d.is_dir() and valid_deployment_id(d.name):
                record = self.read_active(d.name)
                if record is not None:
                    out.append(record)
        return out

    def path(self, record: ActiveRecord) -> Path:
        return self.deployments_dir / record.deployment_id / record.file

    def activate(self, temp: Path, *, deployment_id: str, key_version: int, sha256: str) -> ActiveRecord:
        """Move a verified push into place and switch `active.json` to it, durably.

        The previous version file stays until `remove_inactive`, so the old model (memory
        mapped from it) keeps serving until the caller has switched its registry.
        """
        d = self.deployments_dir / deployment_id
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o700)
        final = d / version_file(key_version)
        size = temp.stat().st_size
        os.replace(temp, final)
        try:
            record = ActiveRecord(
                deployment_id=deployment_id,
                key_version=key_version,
                file=final.name,
                sha256=sha256,
                size=size,
                activated_at=int(time.time()),
            )
            write_atomic(d / ACTIVE, record.model_dump_json(indent=2).encode())
        except BaseException:
            final.unlink(missing_ok=True)  # never active: leave no orphan (active.json still names the old file)
            raise
        return record

    def read_revocations(self, deployment_id: str) -> Revocations:
        """The revocation list P1 last sent for a deployment (empty if none, or unreadable)."""
        path = self.deployments_dir / deployment_id / REVOKED
        if not path.is_file():
            return Revocations(revoked=[])
        try:
            return Revocations.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as e:  # written in one rename: only tampering or a disk fault gets here
            log.error(
                "%s is unreadable (%s): no credential of %s counts as revoked until P1 sends its list again",
                path,
                type(e).__name__,
                deployment_id,
            )
            return Revocations(revoked=[])

    def write_revocations(self, deployment_id: str, revocations: Revocations) -> None:
        d = self.deployments_dir / deployment_id
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o700)
        write_atomic(d / REVOKED, revocations.model_dump_json().encode())

    def remove_inactive(self, record: ActiveRecord) -> None:
        """Delete every version file of the deployment except the active one."""
        d = self.deployments_dir / record.deployment_id
        for f in d.glob("v*.safetensors"):
            if f.name != record.file:
                _remove(f)

    def remove_deployment(self, deployment_id: str) -> bool:
        """Delete a deployment's directory; True if there was one.

        `active.json` goes first (unlink, then fsync of the directory), so a crash part-way
        leaves a directory that no restart loads: `prepare` then removes its version files,
        and P1, which retries the delete until P2 answers, removes the rest.
        """
        d = self.deployments_dir / deployment_id
        if not d.is_dir():
            return False
        (d / ACTIVE).unlink(missing_ok=True)
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        shutil.rmtree(d)
        return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
