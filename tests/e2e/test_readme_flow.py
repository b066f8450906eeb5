"""The README's manual flow, run as a shell script against real services (decoder included).

`readme_flow.sh` holds the README's commands (ids captured from the outputs, ports chosen
here); the first test checks that every command of the README's manual-flow blocks is in the
script, so the two cannot drift apart; the second runs the script and checks what it printed,
the decoder's text against plaintext greedy decoding with the stock class.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tests.e2e.processes import free_port
from tests.vllm.engine import p2_engine_env

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("readme_flow.sh")
README_PORTS = {"8002": "$P2_PORT", "8001": "$P1_PORT"}


def manual_flow_blocks() -> list[tuple[str, str]]:
    """(language, text) of the fenced blocks of the README's "The manual flow" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The manual flow", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)


def as_script_line(line: str) -> str:
    """A README command as the script spells it: placeholders as variables, the test's ports."""
    line = re.sub(r"\s+# .*$", "", line)  # a trailing comment
    line = re.sub(r"<([A-Z_]+)>", r"$\1", line)
    for port, variable in README_PORTS.items():
        line = line.replace(f":{port}", f":{variable}").replace(f"--port {port}", f"--port {variable}")
    return line


def test_the_script_runs_every_command_of_the_readme() -> None:
    script = SCRIPT.read_text()
    blocks = manual_flow_blocks()
    assert [lang for lang, _ in blocks].count("python") == 2 and len(blocks) >= 7
    for lang, text in blocks:
        if lang == "python":
            assert text in script, f"README python block not in the script:\n{text}"
            continue
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            command = as_script_line(line)
            assert any(command in s for s in script.splitlines()), f"README line not in the script: {command!r}"


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the script once, in a fresh directory, as a new user would; its outputs in OUT."""
    work = tmp_path_factory.mktemp("readme-flow")
    out = work / "out"
    out.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))  # `source .venv/bin/activate`
    env = {**os.environ, "P1_PORT": str(free_port()), "P2_PORT": str(free_port()), "OUT": str(out)}
    for name in list(env):
        if name.startswith(("STIP_CLIENT_", "STIP_DEVELOPER_", "STIP_CLOUD_")):
            del env[name]
    env["STIP_CLIENT_CACHE_DIR"] = str(work / "client-cache")
    env |= p2_engine_env(work / "data" / "cloud")  # the engine STIP_TEST_ENGINE chooses
    log = work / "flow.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            ["bash", str(SCRIPT)], cwd=work, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert code == 0, f"the README flow failed (exit {code}):\n{log.read_text()[-6000:]}"
    return out


def last_renderings(stderr: str) -> dict[str, str]:
    """The last state of each tqdm bar in a command's stderr, by its label (polling may skip a
    short stage, such as P2 loading a small model: it then has no bar)."""
    bars: dict[str, str] = {}
    for part in re.split(r"[\r\n]", stderr):
        label = part.split(":", 1)[0]
        if "|" in part and label in ("transforming", "pushing", "loading on P2", "user bundle"):
            bars[label] = part
    return bars


def test_the_encoder_part(flow: Path) -> None:
    registered = json.loads((flow / "curl-register.json").read_text())
    assert registered["family"] == "bert" and registered["d_model"] == 384
    deploy_err = (flow / "deploy.err").read_text()
    assert "100%" in deploy_err and "tensor" in deploy_err  # the bars complete, in real units
    assert "TB/s" not in deploy_err and "PB/s" not in deploy_err
    for err in (deploy_err, (flow / "rotate.err").read_text()):
        bars = last_renderings(err)
        assert bars and set(bars) <= {"transforming", "pushing", "loading on P2"}, bars
        assert all(bar.startswith(f"{desc}: 100%") for desc, bar in bars.items()), bars  # every bar completes
    (download,) = last_renderings((flow / "embed.err").read_text()).values()  # the bundle, fetched once
    assert re.match(r"user bundle: 100%\|[^|]*\| (\d+\.\d+M)/\1 \[", download), download  # in bytes (MiB)
    assert re.search(r"expires \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", (flow / "issue.err").read_text())
    assert json.loads((flow / "rotate.json").read_text())["key_version"] == 2

    rows = [json.loads(line) for line in (flow / "embed.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r) == 384 for r in rows)
    assert all(abs(math.fsum(x * x for x in r) - 1) < 1e-5 for r in rows)  # L2-normalised
    cosine = math.fsum(a * b for a, b in zip(*rows, strict=True))
    assert f"{cosine:.3f}" == "0.974"  # the figure the README states
    assert "0.974" in (flow / "embed-sdk.txt").read_text()


def test_the_decoder_part(flow: Path, tmp_path: Path) -> None:
    assert "RANDOM weights" in (flow / "example-model.err").read_text()
    deployment_id, model_id, model_dir, encoder_deployment = (flow / "ids.txt").read_text().split()
    text = (flow / "generate.txt").read_text()
    assert text == (flow / "generate-stream.txt").read_text() and text.strip()

    # plaintext: the stock class on the original weights, greedy, 16 new tokens
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    assert text == tokenizer.decode(out[0, ids.shape[1] :]) + "\n"
    assert "torch.Size([1, 3, 30522])" in (flow / "generate-sdk.txt").read_text()

    deleted = json.loads((flow / "delete-deployment.json").read_text())
    assert deleted["status"] == "deleted" and deleted["cloud_deleted"] is True
    assert json.loads((flow / "delete-model.json").read_text())["model_id"] == model_id
    remaining = [d["deployment_id"] for d in json.loads((flow / "deployments.json").read_text())]
    assert remaining == [encoder_deployment]
    data = flow.parent / "data"
    assert sorted(p.name for p in (data / "cloud" / "deployments").iterdir()) == [encoder_deployment]
    assert not (data / "developer" / "deployments" / deployment_id).exists()
    assert (flow / "stopped.txt").is_file()
