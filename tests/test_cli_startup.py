"""The three command lines answer `--help` and usage errors before importing torch or transformers.

Measured in fresh subprocesses: the CPU time the process used must stay under a second (the
heavy imports alone cost several), and its wall time under a bound generous enough for a
machine shared by many (load averages of 10 on 2 cores); the module check is exact.
"""

import resource
import subprocess
import sys
import time

import pytest

CLIS = {
    "stip": "user_client.cli",
    "stip-developer": "developer_service.cli",
    "stip-cloud": "cloud_service.cli",
}
HEAVY = ("torch", "transformers", "fastapi", "uvicorn", "httpx", "pydantic", "safetensors")

PROBE = """
import sys
from {module} import main
try:
    code = main({argv!r})
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
sys.exit(code)
"""


CPU_S = 1.0  # the process's own user + system time
WALL_S = 5.0  # includes waiting for a loaded machine's CPUs


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(module: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    code = PROBE.format(module=module, argv=argv, heavy=HEAVY)
    cpu, start = _cpu_of_children(), time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    wall, cpu = time.monotonic() - start, _cpu_of_children() - cpu
    assert cpu < CPU_S and wall < WALL_S, f"{module} {argv}: {cpu:.2f} s CPU, {wall:.2f} s wall"
    return done


@pytest.mark.parametrize("prog", CLIS)
def test_help_is_fast_and_imports_nothing_heavy(prog: str) -> None:
    done = _run(CLIS[prog], ["--help"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {prog}")
    assert "HEAVY=\n" in done.stdout, done.stdout.splitlines()[-1]


@pytest.mark.parametrize("subcommand", ["demo", "audit", "classify"])
def test_subcommand_help_is_fast_and_imports_nothing_heavy(subcommand: str) -> None:
    """Subcommands that parse their own arguments (demo, audit) answer --help before their imports too."""
    done = _run(CLIS["stip"], [subcommand, "--help"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: stip {subcommand}")
    assert "HEAVY=\n" in done.stdout, done.stdout.splitlines()[-1]


@pytest.mark.parametrize(
    ("prog", "argv", "subcommand"),
    [
        ("stip", ["generate"], "stip generate"),
        ("stip", ["embed", "--batch-size", "x", "hello"], "stip embed"),
        ("stip-developer", ["deploy", "m-1"], "stip-developer deploy"),
        ("stip-developer", ["example-model", "bert", "/tmp/x"], "stip-developer example-model"),
        ("stip-cloud", ["serve", "--dtype", "int3"], "stip-cloud serve"),
    ],
)
def test_usage_errors_are_fast_and_name_the_subcommand(prog: str, argv: list[str], subcommand: str) -> None:
    done = _run(CLIS[prog], argv)
    assert done.returncode == 2
    usage = [line for line in done.stderr.splitlines() if line.startswith("usage:")]
    assert len(usage) == 1 and usage[0].startswith(f"usage: {subcommand} "), done.stderr  # not the top level's
    assert "HEAVY=\n" in done.stdout


def test_every_subcommand_names_a_handler_that_exists() -> None:
    """The dispatch tables (stip's COMMANDS / PASSTHROUGH, stip-developer's handler=) resolve."""
    import argparse

    from developer_service import cli as developer_cli
    from user_client import cli as user_cli

    def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(action.choices)

    assert set(subcommands(user_cli.build_parser())) == set(user_cli.COMMANDS) | set(user_cli.PASSTHROUGH)
    for target in [*user_cli.COMMANDS.values(), *user_cli.PASSTHROUGH.values()]:
        assert callable(user_cli.load(target)), target
    for name, sub in subcommands(developer_cli.build_parser()).items():
        assert callable(developer_cli.load(sub.get_default("handler"))), name
