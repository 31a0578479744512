"""Tests of ws_micro's settings: the one-line description of each, where values come from (flags, variables, the
config file, defaults) and in which order, the one-line errors for bad values, ``ws-micro --help``,
``ws-micro config``, and docs/configuration.md's tables.

Most call ``main(argv, environ)`` in-process (it exits before serving when it refuses a value, or prints help or a
file), or ``_configured``, the app and server settings ``ws-micro`` would serve with; a few start a real process:
``ws-micro --config``, ``uvicorn ws_micro:app`` with ``WS_MICRO_CONFIG``, and a copied file under ``python -OO``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT, TIMEOUT, free_port, run_server

import ws_micro
from ws_micro import ServerSettings, Settings, create_app

DEFAULTS = {field.name: field.default for cls in (Settings, ServerSettings) for field in dataclasses.fields(cls)}


def refusal(capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str]) -> str:
    """What ``ws-micro argv`` says when it refuses to start: it must exit with 2, having written one line."""
    with pytest.raises(SystemExit) as exited:
        ws_micro.main(argv, environ)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    return re.sub(r"^ws-micro( config| client)?: error: ", "", err).removesuffix("\n")


@pytest.mark.parametrize("url", ["localhost:8000/ws/py_client", "http://localhost:8000/ws/py_client"])
def test_the_client_command_refuses_a_url_that_is_not_a_websockets_in_one_line(
        capsys: pytest.CaptureFixture[str], url: str) -> None:
    # It used to print websockets' traceback (InvalidURI).
    assert refusal(capsys, ["client", url], {}) == f"the URL must start with ws:// or wss://, but got {url!r}"


# --------------------------------------------------------------------------
# Where values come from, and in which order
# --------------------------------------------------------------------------


def test_settings_come_from_ws_micro_environment_variables() -> None:
    env = {"WS_MICRO_MAX_MESSAGE_SIZE": "2048", "WS_MICRO_RATE_LIMIT": "2.5", "WS_MICRO_API_TOKEN": "t",
           "WS_MICRO_ALLOWED_ORIGINS": "https://a.example, https://b.example", "OTHER": "x"}
    assert ws_micro.options_from_env(Settings, env) == {
        "max_message_size": 2048, "rate_limit": 2.5, "api_token": "t",
        "allowed_origins": ("https://a.example", "https://b.example"),
    }
    assert ws_micro.options_from_env(ServerSettings, {"WS_MICRO_PER_MESSAGE_DEFLATE": "on"}) == {
        "per_message_deflate": True}


def test_the_config_file_gives_each_setting_its_type(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('max_message_size = 2048\nrate_limit = 3  # an integer, for a number\napi_token = "t"\n'
                      'allowed_origins = ["https://a.example"]\npresence_events = true\njwt_secret = ""\n'
                      'port = 9000\n')
    env = {"WS_MICRO_CONFIG": str(config)}
    assert ws_micro.options_from_env(Settings, env) == {  # what an embedding program passes to create_app()
        "max_message_size": 2048, "rate_limit": 3.0, "api_token": "t", "allowed_origins": ("https://a.example",),
        "presence_events": True, "jwt_secret": None}  # an empty string is unset, as in a variable
    assert ws_micro.options_from_env(ServerSettings, env) == {"port": 9000}
    assert isinstance(ws_micro.options_from_env(Settings, env)["rate_limit"], float)


# A value from each source, for a setting of each type, and a server setting: the one in use must be the first
# source's, in this order.
FLAGS = ["--max-connections", "1", "--presence-events", "--allowed-origins", "https://flag.example", "--port", "9001"]
VARIABLES = {"WS_MICRO_MAX_CONNECTIONS": "2", "WS_MICRO_PRESENCE_EVENTS": "off",
             "WS_MICRO_ALLOWED_ORIGINS": "https://variable.example", "WS_MICRO_PORT": "9002"}
FILE = 'max_connections = 3\npresence_events = true\nallowed_origins = ["https://file.example"]\nport = 9003\n'
IN_USE = {"flag": (1, True, ("https://flag.example",), 9001),
          "variable": (2, False, ("https://variable.example",), 9002),
          "file": (3, True, ("https://file.example",), 9003),
          "default": (10_000, False, (), 8000)}


@pytest.mark.parametrize("given", [(), ("file",), ("variable",), ("flag",), ("variable", "file"), ("flag", "file"),
                                   ("flag", "variable"), ("flag", "variable", "file")],
                         ids=lambda given: "+".join(given) or "default")
def test_a_flag_beats_a_variable_which_beats_the_file_which_beats_the_default(tmp_path: Path,
                                                                              given: tuple[str, ...]) -> None:
    argv = FLAGS.copy() if "flag" in given else []
    env = VARIABLES.copy() if "variable" in given else {}
    if "file" in given:
        config = tmp_path / "gateway.toml"
        config.write_text(FILE)
        argv += ["--config", str(config)]
    app, server = ws_micro._configured(argv, env)
    settings = app.state.settings
    in_use = (settings.max_connections, settings.presence_events, settings.allowed_origins, server.port)
    assert in_use == IN_USE[(*given, "default")[0]]


def test_config_beats_the_file_ws_micro_config_names_which_is_then_not_read(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("max_connections = 7\n")
    app, _ = ws_micro._configured(["--config", str(config)], {"WS_MICRO_CONFIG": str(tmp_path / "missing.toml")})
    assert app.state.settings.max_connections == 7
    app, _ = ws_micro._configured([], {"WS_MICRO_CONFIG": str(config)})
    assert app.state.settings.max_connections == 7
    app, _ = ws_micro._configured([], {"WS_MICRO_CONFIG": ""})  # empty: no file, as an empty value is unset
    assert app.state.settings.max_connections == DEFAULTS["max_connections"]


def test_the_module_app_reads_the_file_ws_micro_config_names_under_its_variables(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("max_connections = 7\nrate_burst = 8\nport = 1\n")  # port: ws-micro's alone, not read here
    monkeypatch.setenv("WS_MICRO_CONFIG", str(config))
    monkeypatch.setenv("WS_MICRO_RATE_BURST", "9")
    settings = ws_micro._AppFromEnvironment().state.settings
    assert (settings.max_connections, settings.rate_burst) == (7, 9)


def test_probing_the_module_app_builds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WS_MICRO_MAX_CONNECTIONS", "lots")  # building it now would raise
    unbuilt = ws_micro._AppFromEnvironment()
    assert inspect.unwrap(unbuilt) is unbuilt and not hasattr(unbuilt, "__wrapped__")
    with pytest.raises(ValueError, match="WS_MICRO_MAX_CONNECTIONS must be an integer"):
        unbuilt.state  # noqa: B018  (an attribute of the app builds it)


# --------------------------------------------------------------------------
# Bad values: one line naming where the value came from, what it was and what is accepted
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WS_MICRO_MAX_CONNECTIONS": "lots"}, "WS_MICRO_MAX_CONNECTIONS must be an integer, but got 'lots'"),
        ({"WS_MICRO_MAX_MESSAGE_SIZE": "0"}, "max_message_size must be at least 1, but got 0"),
        ({"WS_MICRO_RATE_LIMIT": "-1"}, "rate_limit must be 0 (off) or more, but got -1.0"),
        ({"WS_MICRO_RATE_LIMIT": "nan"}, "rate_limit must be a finite number, but got nan"),
        ({"WS_MICRO_SEND_TIMEOUT": "inf"}, "send_timeout must be a finite number, but got inf"),
        ({"WS_MICRO_RECOVERY_WINDOW": "-Infinity"}, "recovery_window must be a finite number, but got -inf"),
        ({"WS_MICRO_FORWARD_MAX_PENDING_PER_USER": "-1"},
         "forward_max_pending_per_user must be 0 (off) or more, but got -1"),
        ({"WS_MICRO_CONNECT_HOOK_URL": "ftp://backend/hook", "WS_MICRO_BACKEND_SECRET": "s"},
         "connect_hook_url must be an http:// or https:// URL, but got 'ftp://backend/hook'"),
        ({"WS_MICRO_CONNECT_HOOK_URL": "http://[backend/hook", "WS_MICRO_BACKEND_SECRET": "s"},
         "connect_hook_url must be an http:// or https:// URL, but got 'http://[backend/hook'"),
        ({"WS_MICRO_CONNECT_HOOK_URL": "http://backend/hook"},
         "connect_hook_url needs backend_secret, the key the backend checks the gateway's requests with "
         "(python -c 'import secrets; print(secrets.token_hex(32))')"),
        ({"WS_MICRO_REDIS_URL": "notredis://x"},
         "redis_url must be a redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel:// URL, "
         "but got 'notredis://x'"),
        ({"WS_MICRO_REDIS_URL": "http://:hunter2@cache:6379/0"},  # its password starred out
         "redis_url must be a redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel:// URL, "
         "but got 'http://:***@cache:6379/0'"),
        ({"WS_MICRO_REDIS_URL": "sentinel://admin:hunter2@s1/mymaster?sentinel_password=hunter2&db=1"},
         "redis_url must be a redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel:// URL, "
         "but got 'sentinel://admin:***@s1/mymaster?sentinel_password=***&db=1'"),
        ({"WS_MICRO_FORWARD_URL": "ftp://gateway:hunter2@backend/events", "WS_MICRO_BACKEND_SECRET": "s"},
         "forward_url must be an http:// or https:// URL, but got 'ftp://gateway:***@backend/events'"),
        ({"WS_MICRO_REDIS_URL": "redis+sentinel://:hunter2@s1:26379,s2:port/mymaster"},
         "redis_url must name each sentinel as host or host:port, but got 's2:port'"),
        ({"WS_MICRO_REDIS_URL": "redis+sentinel://:hunter2@s1,s2"},
         "redis_url must end in /service or /service/db after its sentinels, but got '/'"),
        ({"WS_MICRO_REDIS_URL": "redis+sentinel://s1/mymaster/zero"},
         "redis_url must end in /service or /service/db after its sentinels, but got '/mymaster/zero'"),
        ({"WS_MICRO_REDIS_URL": "rediss+sentinel://s1/mymaster?socket_timeout=soon"},
         "redis_url: Invalid value for 'socket_timeout' in connection URL."),
        ({"WS_MICRO_JWT_PUBLIC_KEY": "/no/such/key.pem"},
         "jwt_public_key must be PEM text or a PEM file, but cannot read '/no/such/key.pem': No such file"),
        ({"WS_MICRO_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----"},
         "jwt_public_key is not a PEM public key:"),
    ],
)
def test_bad_settings_are_refused_with_the_bad_value(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as refused:
        create_app(**ws_micro.options_from_env(Settings, env))
    assert str(refused.value).startswith(message)
    assert "hunter2" not in str(refused.value)  # a password in redis_url is not echoed


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--max-connections", "many"], {}, "--max-connections must be an integer, but got 'many'"),
        (["--max-connections", "0"], {}, "--max-connections must be at least 1, but got 0"),
        (["--port", "70000"], {}, "--port must be between 0 and 65535, but got 70000"),
        (["--max-head-size", "0"], {}, "--max-head-size must be at least 1, but got 0"),
        (["--ping-timeout", "-1"], {}, "--ping-timeout must be 0 or more, but got -1.0"),
        (["--ping-interval", "nan"], {}, "--ping-interval must be a finite number, but got nan"),
        (["--instance-ttl", "1"], {}, "--instance-ttl must be longer than heartbeat_interval (2.0), but got 1.0"),
        (["--log-level", "verbose"], {},
         "--log-level must be one of critical, error, warning, info, debug, trace, but got 'verbose'"),
        (["--max-conections", "5"], {}, "unrecognized arguments: --max-conections 5 (did you mean --max-connections?)"),
        ([], {"WS_MICRO_MAX_CONNECTIONS": "lots"}, "WS_MICRO_MAX_CONNECTIONS must be an integer, but got 'lots'"),
        ([], {"WS_MICRO_SEND_TIMEOUT": "0"}, "WS_MICRO_SEND_TIMEOUT must be more than 0, but got 0.0"),
        ([], {"WS_MICRO_PRESENCE_EVENTS": "maybe"}, "WS_MICRO_PRESENCE_EVENTS must be true or false, but got 'maybe'"),
        ([], {"WS_MICRO_REDIS_URL": "notredis://x"},
         "WS_MICRO_REDIS_URL must be a redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel:// URL, "
         "but got 'notredis://x'"),
        ([], {"WS_MICRO_PORT": "-1"}, "WS_MICRO_PORT must be between 0 and 65535, but got -1"),
        ([], {"WS_MICRO_FORWARD_URL": "http://backend/events"},
         "WS_MICRO_FORWARD_URL needs backend_secret, the key the backend checks the gateway's requests with "
         "(python -c 'import secrets; print(secrets.token_hex(32))')"),
        (["--max-connections", "5"], {"WS_MICRO_MAX_CONNECTIONS": "lots"},  # every source is read whole
         "WS_MICRO_MAX_CONNECTIONS must be an integer, but got 'lots'"),
    ],
)
def test_a_bad_flag_or_variable_is_refused_in_one_line_naming_it(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                                  env: dict[str, str], message: str) -> None:
    assert refusal(capsys, argv, env) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('max_connections = "3"', "{path}: max_connections must be an integer, but got '3'"),
        ("max_connections = 0", "{path}: max_connections must be at least 1, but got 0"),
        ("max_connections = 2.5", "{path}: max_connections must be an integer, but got 2.5"),
        ("rate_limit = true", "{path}: rate_limit must be a number, but got True"),
        ("rate_limit = inf", "{path}: rate_limit must be a finite number, but got inf"),
        ('allowed_origins = "https://a.example"',
         "{path}: allowed_origins must be a list of strings, but got 'https://a.example'"),
        ("allowed_origins = [1]", "{path}: allowed_origins must be a list of strings, but got [1]"),
        ('presence_events = "yes"', "{path}: presence_events must be true or false, but got 'yes'"),
        ("api_token = 1", "{path}: api_token must be a string, but got 1"),
        ("port = 70000", "{path}: port must be between 0 and 65535, but got 70000"),
        ('forward_url = "http://backend/events"', "{path}: forward_url needs backend_secret, the key the backend "
         "checks the gateway's requests with (python -c 'import secrets; print(secrets.token_hex(32))')"),
        ("max_conections = 3", "{path}: 'max_conections' is not a setting; did you mean 'max_connections'?"),
        ("max-connections = 3", "{path}: 'max-connections' is not a setting; did you mean 'max_connections'?"),
        ("[limits]\nmax_connections = 3", "{path}: 'limits' is not a setting; settings are top-level keys, not tables"),
        ("zzz = 3", "{path}: 'zzz' is not a setting; the keys are the settings' names (ws-micro config)"),
        ("max_connections = ", "{path}: not a TOML file: Invalid value (at line 1, column 19)"),
    ],
)
def test_a_bad_config_file_is_refused_in_one_line_naming_the_file_and_key(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(text + "\n")
    assert refusal(capsys, ["--config", str(config)], {}) == message.format(path=config)
    assert refusal(capsys, [], {"WS_MICRO_CONFIG": str(config)}) == message.format(path=config)


def test_a_config_file_that_cannot_be_read_is_refused_naming_where_it_was_named(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.toml")
    assert refusal(capsys, ["--config", missing], {}) == (
        f"--config names {missing!r}, which cannot be read: No such file or directory")
    assert refusal(capsys, [], {"WS_MICRO_CONFIG": missing}) == (
        f"WS_MICRO_CONFIG names {missing!r}, which cannot be read: No such file or directory")
    assert refusal(capsys, ["--config", str(tmp_path)], {}) == (
        f"--config names {str(tmp_path)!r}, which cannot be read: Is a directory")
    assert refusal(capsys, ["--config", "/dev/zero"], {}) == (  # read no further than a config file could go
        "/dev/zero: not a config file: larger than 1048576 bytes")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"api_token = '\xff'\n")
    assert refusal(capsys, ["--config", str(binary)], {}).startswith(f"{binary}: not a TOML file: 'utf-8' codec")


@pytest.mark.process
def test_uvicorn_fails_the_startup_with_the_one_line_naming_a_bad_variable_or_file_key(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("max_connections = 0\n")
    for env, message in (
            ({"WS_MICRO_MAX_CONNECTIONS": "0"}, "WS_MICRO_MAX_CONNECTIONS must be at least 1, but got 0"),
            ({"WS_MICRO_CONFIG": str(config)}, f"{config}: max_connections must be at least 1, but got 0")):
        result = subprocess.run([sys.executable, "-m", "uvicorn", "ws_micro:app", "--port", str(free_port())],
                                cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=TIMEOUT)
        assert result.returncode != 0
        assert f"ERROR:    {message}\n" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.process
def test_uvicorn_fails_the_startup_when_the_gateway_cannot_be_built_for_another_reason(tmp_path: Path) -> None:
    # A sibling module that does not compile: uvicorn used to take the failure for a lifespan it does not
    # support, and served an app that failed at every request.
    shutil.copy(ROOT / "ws_micro.py", tmp_path)
    (tmp_path / "ws_micro_servers.py").write_text((ROOT / "ws_micro_servers.py").read_text() + "\ndef broken(:\n")
    result = subprocess.run([sys.executable, "-m", "uvicorn", "ws_micro:app", "--port", str(free_port())],
                            cwd=tmp_path, env=os.environ.copy(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode != 0, result.stderr
    assert "ERROR:    SyntaxError: invalid syntax (ws_micro_servers.py, line" in result.stderr, result.stderr
    assert "Application startup failed. Exiting." in result.stderr
    assert "lifespan' protocol appears unsupported" not in result.stderr


# --------------------------------------------------------------------------
# A config file that holds a secret and that others can read
# --------------------------------------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX's")
@pytest.mark.parametrize(("text", "mode", "warned"), [
    ('api_token = "t"\nbackend_secret = "s"', 0o644, "api_token and backend_secret"),
    ('redis_url = "redis://:password@localhost:6379/0"', 0o640, "redis_url"),
    ('redis_url = "redis+sentinel://s1,s2/mymaster?sentinel_password=p"', 0o644, "redis_url"),  # the sentinels'
    ('api_token = "t"', 0o600, None),  # private
    ('redis_url = "redis://localhost:6379/0"\napi_token = ""', 0o644, None),  # no secret in it
])
def test_a_config_file_others_can_read_that_holds_a_secret_is_named_in_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, mode: int, warned: str | None) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(text + "\n")
    config.chmod(mode)
    with caplog.at_level("WARNING", logger="ws_micro"):
        ws_micro.options_from_env(Settings, {"WS_MICRO_CONFIG": str(config)})
        ws_micro.options_from_env(ServerSettings, {"WS_MICRO_CONFIG": str(config)})  # holds none of the secrets
    expected = [] if warned is None else [f"{config} holds {warned}, but other users can read it: chmod 600 {config}"]
    assert [record.getMessage() for record in caplog.records] == expected


# --------------------------------------------------------------------------
# --help, and each setting's one-line description
# --------------------------------------------------------------------------


def test_every_setting_has_a_one_line_description_and_a_group() -> None:
    described = ws_micro._described()
    assert [setting.name for setting in described] == list(DEFAULTS)
    for setting in described:
        # One line that fits an 80-column terminal under its flag (indented by 4).
        assert setting.description.endswith(".") and len(ws_micro._plain(setting.description)) <= 74, setting
        assert setting.group not in ("Settings", "ServerSettings"), setting  # under a group comment
    groups = [setting.group.split(" (")[0] for setting in described]
    assert list(dict.fromkeys(groups)) == [
        "Endpoint", "Limits", "Browser page", "Sidecar API", "Authentication", "Forwarding", "Connection recovery",
        "Cluster over Redis", "Server", "Server timeouts"]


def help_text(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: int) -> list[str]:
    monkeypatch.setenv("COLUMNS", str(columns))
    with pytest.raises(SystemExit) as exited:
        ws_micro.main(["--help"], {"WS_MICRO_MAX_CONNECTIONS": "lots"})  # help reads no variable
    assert exited.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert all(len(line) <= columns for line in out.splitlines())
    return out.splitlines()


def test_help_gives_each_setting_its_flag_default_and_description_in_two_lines_of_80_columns(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    lines = help_text(capsys, monkeypatch, 80)
    described = ws_micro._described()
    for setting in described:
        flag = setting.name.replace("_", "-")
        [at] = [n for n, line in enumerate(lines) if re.match(rf"  --(\[no-\])?{flag} ", line)]
        assert lines[at + 1] == "    " + ws_micro._plain(setting.description)
        assert not [*lines, ""][at + 2].startswith("    ")  # nothing more
    shown = {line.split("  (default: ")[0].strip(): line.split("  (default: ")[1] for line in lines
             if "  (default: " in line}
    assert shown["--path TEXT"] == "/ws/py_client)"
    assert shown["--allowed-origins LIST"] == "none)"  # not Python's ()
    assert shown["--forward-events LIST"] == "*)"  # not ('*',)
    assert shown["--api-token TEXT"] == "none)"  # not None
    assert shown["--[no-]presence-events"] == "off)"  # not False
    assert shown["--rate-limit N"] == "5000)"
    # Two lines a setting, and a few more for the usage, the groups' headings and what the flags are: the help before
    # had 180 lines here, three for each setting, and none said what a setting does.
    assert len(lines) <= 2 * len(described) + 36


def test_help_in_a_wide_terminal_is_a_table_of_a_line_for_each_setting(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    lines = help_text(capsys, monkeypatch, 150)
    described = ws_micro._described()
    for setting in described:
        [line] = [line for line in lines if re.match(rf"  --(\[no-\])?{setting.name.replace('_', '-')} ", line)]
        assert line.endswith("  " + ws_micro._plain(setting.description))
    assert any(re.fullmatch(r"  --max-message-size N +65536 +Largest frame .*", line) for line in lines)
    assert len(lines) <= len(described) + 36  # the help before had 145 lines here


def test_version_and_the_commands_help_still_work(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, says in ((["--version"], ws_micro.__version__), (["client", "--help"], "usage: ws-micro client"),
                       (["config", "--help"], "usage: ws-micro config")):
        with pytest.raises(SystemExit) as exited:
            ws_micro.main(argv, {})
        assert exited.value.code == 0
        assert says in capsys.readouterr().out


# --------------------------------------------------------------------------
# docs/configuration.md's tables: the declarations' descriptions
# --------------------------------------------------------------------------


def settings_tables() -> list[tuple[str, list[str]]]:
    """The tables docs/configuration.md's "Settings" holds: a heading and a table for each group of settings."""
    tables: list[tuple[str, list[str]]] = []
    for setting in ws_micro._described():
        title = re.split(r" \(|:", setting.group)[0]
        if not tables or tables[-1][0] != f"### {title}":
            tables.append((f"### {title}", ["| Key | Flag | Variable | Default | Description |",
                                             "| --- | --- | --- | --- | --- |"]))
        shown = ws_micro._shown(DEFAULTS[setting.name])
        default = shown if shown in ("none", "off", "on") else f"`{shown}`"
        flag = f"--[no-]{setting.name.replace('_', '-')}" if isinstance(DEFAULTS[setting.name], bool) else \
            f"--{setting.name.replace('_', '-')}"
        description = setting.description.replace("``", "`")
        tables[-1][1].append(f"| `{setting.name}` | `{flag}` | `WS_MICRO_{setting.name.upper()}` | {default} | "
                             f"{description} |")
    return tables


def test_the_settings_tables_of_the_configuration_page_are_the_declarations() -> None:
    section = (ROOT / "docs" / "configuration.md").read_text().split("\n## Settings\n")[1].split("\n## ")[0]
    page: list[tuple[str, list[str]]] = []
    for block in re.split(r"\n(?=### )", section)[1:]:
        heading, _, rest = block.partition("\n")
        table = re.search(r"^\|.*(?:\n\|.*)*", rest, flags=re.MULTILINE)
        page.append((heading, table.group().splitlines() if table else []))
    expected = settings_tables()
    assert page == expected, "paste these tables into docs/configuration.md:\n\n" + "\n\n".join(
        f"{heading}\n\n" + "\n".join(table) for heading, table in expected)


# --------------------------------------------------------------------------
# ws-micro config
# --------------------------------------------------------------------------


def uncommented(text: str) -> str:
    """The file with every setting's line uncommented: each at its default, each secret at its fresh value."""
    return re.sub(r"^#(\w+ = )", r"\1", text, flags=re.MULTILINE)


def test_ws_micro_config_prints_every_setting_with_fresh_secrets_and_loads_back_unchanged(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    texts = []
    for _ in range(2):
        assert ws_micro.main(["config"], {}) == 0
        texts.append(capsys.readouterr().out)
    text = texts[0]
    assert tomllib.loads(text) == {}  # all commented out: as it is, the file changes nothing
    for setting in ws_micro._described():  # each under its description
        assert f"\n# {ws_micro._plain(setting.description)}\n#{setting.name} = " in text
    config = tmp_path / "gateway.toml"
    config.write_text(uncommented(text))
    config.chmod(0o600)
    secrets = {name: value for name, value in tomllib.loads(uncommented(text)).items() if name in ws_micro._SECRETS}
    assert set(secrets) == {"api_token", "jwt_secret", "backend_secret"} and all(
        len(value) >= 43 for value in secrets.values())  # 32 random bytes
    loaded = {name: given.value for name, given in ws_micro._given({}, list(DEFAULTS), str(config)).items()}
    assert loaded == {**DEFAULTS, **secrets}
    app, server = ws_micro._configured(["--config", str(config)], {})  # and is served as it says
    assert app.state.settings == Settings(**{**{f.name: DEFAULTS[f.name] for f in dataclasses.fields(Settings)},
                                             **secrets})
    assert server == ServerSettings()
    other = tomllib.loads(uncommented(texts[1]))
    assert all(other[name] != value for name, value in secrets.items())  # fresh each time


def test_ws_micro_config_file_writes_a_private_file_and_never_over_one(capsys: pytest.CaptureFixture[str],
                                                                     tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    assert ws_micro.main(["config", str(config)], {}) == 0
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert "#api_token = " in config.read_text()
    written = config.read_text()
    assert refusal(capsys, ["config", str(config)], {}) == f"cannot write {str(config)!r}: File exists"
    assert config.read_text() == written


# --------------------------------------------------------------------------
# Real processes: a copied file under -OO, ws-micro --config, uvicorn ws_micro:app with WS_MICRO_CONFIG
# --------------------------------------------------------------------------


@pytest.mark.process
def test_a_copied_file_under_python_oo_describes_its_settings_and_refuses_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "ws_micro.py").write_bytes((ROOT / "ws_micro.py").read_bytes())

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-OO", "ws_micro.py", *argv], cwd=tmp_path, capture_output=True,
                              text=True, timeout=TIMEOUT, env={**os.environ, "COLUMNS": "80"})

    helped = run("--help")
    assert helped.returncode == 0, helped.stderr
    for setting in ws_micro._described():
        assert "\n    " + ws_micro._plain(setting.description) + "\n" in helped.stdout, setting.name
    printed = run("config")
    assert printed.returncode == 0, printed.stderr
    assert "\n# Largest frame a client may send, in bytes: 1009 past it (API pushes: 413).\n" in printed.stdout
    refused = run("--max-connections", "0")
    assert (refused.returncode, refused.stdout, refused.stderr) == (
        2, "", "ws-micro: error: --max-connections must be at least 1, but got 0\n")


def write_config(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.process
def test_ws_micro_serves_with_the_config_file_under_its_variables_and_flags(tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.toml", 'api_token = "from-file"\nmax_message_size = 100\n'
                          'max_connections = 3\n', mode=0o644)
    log = tmp_path / "server.log"
    env = {"WS_MICRO_MAX_MESSAGE_SIZE": "200"}
    with run_server("--config", str(config), "--max-connections", "4", env=env, log=log) as server:
        assert server.get("/api/clients").status_code == 401  # the file's token is asked for, even on loopback
        assert server.get("/api/clients", headers={"Authorization": "Bearer from-file"}).status_code == 200
        # max_message_size: the variable's, over the file's; API pushes bigger than it get 413.
        headers = {"Authorization": "Bearer from-file"}
        assert server.post("/api/broadcast", {"event": "e", "data": {"data": {"x": "y" * 120}}},
                           headers=headers).status_code == 202
        assert server.post("/api/broadcast", {"event": "e", "data": {"data": {"x": "y" * 220}}},
                           headers=headers).status_code == 413
    # Others can read the file, which holds a token: one line says so.
    assert log.read_text().count(f"{config} holds api_token, but other users can read it: chmod 600 {config}") == 1


@pytest.mark.process
def test_uvicorn_serves_the_module_app_with_the_file_ws_micro_config_names(tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.toml", 'api_token = "from-file"\n')
    with run_server(uvicorn_app=True, env={"WS_MICRO_CONFIG": str(config)}) as server:
        assert server.get("/api/clients").status_code == 401
        assert server.get("/api/clients", headers={"Authorization": "Bearer from-file"}).status_code == 200
