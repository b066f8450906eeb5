"""P2 behind a RecordingProxy and P1, as real processes, with deployments by name (the e2e suites'
second and third stacks: test_families_e2e, test_token_mode_e2e)."""

import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from developer_service.client import DeveloperAdminClient
from developer_service.schemas import DeploymentStatus, ModelInfo
from tests.e2e.processes import CLOUD, DEVELOPER, free_port, start, stop, wait_ready
from tests.e2e.proxy import RecordingProxy
from user_client import StipClient


class ProxiedStack:
    """P1 and P2 running; every byte P2 receives passes `proxy`. Models are registered and deployed
    by name; `client(name)` is a StipClient of that deployment with a fresh credential."""

    def __init__(self, work: Path, proxy: RecordingProxy, dev_url: str, admin: DeveloperAdminClient) -> None:
        self.work, self.proxy, self.dev_url, self.admin = work, proxy, dev_url, admin
        self.deployments: dict[str, str] = {}
        self.model_dirs: dict[str, Path] = {}

    def deploy(
        self, name: str, path: Path, *, mode: Literal["embeds", "token"] = "embeds"
    ) -> tuple[ModelInfo, DeploymentStatus]:
        """Register `path` as `name` and deploy it to P2 through the proxy; waits until it is active."""
        model = self.admin.register(path, name=name)
        dep = self.admin.deploy(model.model_id, cloud_url=f"http://127.0.0.1:{self.proxy.port}", mode=mode)
        status = self.admin.wait(dep.deployment_id, timeout_s=300)
        assert status.status == "active", status.error
        self.model_dirs[name], self.deployments[name] = path, dep.deployment_id
        return model, status

    def credential(self, name: str) -> str:
        return self.admin.issue_credential(self.deployments[name], name=f"e2e-{name}").credential

    def client(self, name: str) -> StipClient:
        return StipClient(
            self.dev_url,
            deployment_id=self.deployments[name],
            credential=self.credential(name),
            cache_dir=self.work / "cache",
        )


@contextmanager
def proxied_stack(work: Path, developer_env: dict[str, str] | None = None) -> Iterator[ProxiedStack]:
    """Start P2 (behind a recording proxy) and P1 with fresh tokens; stop both when the block ends.
    `developer_env` adds `STIP_DEVELOPER_*` settings (token mode, say)."""
    admin_token, push_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    cloud_port, dev_port = free_port(), free_port()
    dev_url = f"http://127.0.0.1:{dev_port}"
    procs: list[subprocess.Popen] = []
    with RecordingProxy(cloud_port) as proxy:
        admin = DeveloperAdminClient(dev_url, admin_token=admin_token)
        try:
            cloud = start(
                CLOUD, {"STIP_CLOUD_PUSH_TOKEN": push_token}, work / "cloud.log",
                host="127.0.0.1", port=cloud_port, data_dir=work / "cloud",
            )  # fmt: skip
            procs.append(cloud)
            wait_ready(f"http://127.0.0.1:{cloud_port}", cloud)
            env = {"STIP_DEVELOPER_ADMIN_TOKEN": admin_token, "STIP_DEVELOPER_PUSH_TOKEN": push_token}
            env |= developer_env or {}
            developer = start(DEVELOPER, env, work / "dev.log", host="127.0.0.1", port=dev_port, data_dir=work / "dev")
            procs.append(developer)
            wait_ready(dev_url, developer)
            yield ProxiedStack(work, proxy, dev_url, admin)
        finally:
            for proc in reversed(procs):
                stop(proc)
            admin.close()
